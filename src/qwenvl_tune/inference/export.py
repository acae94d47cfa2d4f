"""Export a run for serving: the adapter as is, or merged into the base weights.

A merged export is a plain Hugging Face folder (safetensors weights, config, processor, chat
template, generation config) that ``AutoModelForImageTextToText`` and engines reading that layout
load with no trace of this package. QLoRA runs merge into the bf16 base, never the 4-bit one
(merging into quantised weights would round the adapter away).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any


from ..modeling.load import DTYPES, load_base_model, load_processor
from ..training.checkpoints import is_complete, read_run_config


def export_run(run_dir: str | Path, out: str | Path, *, merge: bool = False, which: str = "best",
               dtype: str = "bfloat16") -> Path:
    """Write the run's ``best`` (or ``last``) model to ``out``.

    Returns:
        ``out``, holding either the adapter (+ processor) or merged full weights (+ processor).

    Raises:
        FileNotFoundError: the checkpoint is missing or incomplete.
        FileExistsError: ``out`` exists and is not empty.
    """
    run_dir, out = Path(run_dir), Path(out)
    ckpt = run_dir / which
    if not is_complete(ckpt):
        raise FileNotFoundError(f"{ckpt} is missing or incomplete")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    config = read_run_config(run_dir)
    processor = load_processor(ckpt, config.data.min_pixels, config.data.max_pixels)
    out.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"run": str(run_dir), "checkpoint": which, "method": config.model.method,
                            "base_model": config.model.name_or_path}
    if config.model.method == "full" or not merge:
        # full fine-tuning already has complete weights; an adapter export is the adapter as trained
        for f in ckpt.iterdir():
            if f.name not in ("COMPLETE", "trainer_state.ckpt"):
                (shutil.copytree if f.is_dir() else shutil.copy2)(f, out / f.name)
        info["merged"] = config.model.method == "full"
    else:
        from peft import PeftModel

        base_cfg = type(config.model)(**{**config.model.__dict__, "dtype": dtype})
        base = load_base_model(base_cfg, quantize=False)  # a QLoRA run merges into the bf16 base
        merged = PeftModel.from_pretrained(base, ckpt).merge_and_unload()
        merged.to(DTYPES[dtype])
        merged.save_pretrained(out, safe_serialization=True)
        processor.save_pretrained(out)
        info["merged"] = True
        info["dtype"] = dtype
    schema = run_dir / "answer_schema.json"
    if schema.is_file():
        shutil.copy2(schema, out / "answer_schema.json")
    (out / "qwenvl_tune_export.json").write_text(json.dumps(info, indent=2))
    return out

