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
from ..errors import QwenVLTuneError
from ..rundir import EXPORT_INFO, RunDir, copy_public_files


def vision_adapter_modules(ckpt: Path) -> list[str]:
    """The adapted modules inside the vision tower, read from the adapter's weights (engines such as vLLM do
    not load LoRA weights there)."""
    path = Path(ckpt) / "adapter_model.safetensors"
    if not path.is_file():
        return []
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    return sorted({k.split(".lora_")[0] for k in keys if ".visual." in k and ".lora_" in k})


class ExportError(QwenVLTuneError, FileExistsError):
    """The export folder exists and holds files (nothing is overwritten)."""


def export_run(run_dir: str | Path, out: str | Path, *, merge: bool = False, which: str = "best",
               dtype: str = "bfloat16") -> Path:
    """Write the run's ``best`` (or ``last``) model to ``out``.

    Returns:
        ``out``, holding either the adapter (+ processor) or merged full weights (+ processor).

    Raises:
        RunFolderError: the run folder or the checkpoint is missing or incomplete.
        ExportError: ``out`` exists and is not empty.
    """
    run, out = RunDir.open(run_dir), Path(out)
    ckpt = run.checkpoint(which)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty")
    config = run.config
    processor = load_processor(ckpt, config.data.min_pixels, config.data.max_pixels)
    out.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"run": str(run.path.resolve()), "checkpoint": which, "method": config.model.method,
                            "base_model": config.model.name_or_path}
    if not merge:
        # the checkpoint as trained: an adapter (LoRA/QLoRA) or full weights in their saved dtype
        copy_public_files(ckpt, out)
        info["merged"] = config.model.method == "full"
        vision = vision_adapter_modules(ckpt)
        if vision:
            info["warning"] = (f"the adapter has LoRA weights on {len(vision)} vision-tower module(s) (e.g. {vision[0]}); "
                               f"vLLM loads LoRA adapters for the language model only and would ignore them: export "
                               f"with --merge to serve this run with vLLM")
            print(f"warning: {info['warning']}")
    else:
        from transformers import AutoModelForImageTextToText

        if config.model.method == "full":  # complete weights already: written again in the asked dtype
            merged = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=DTYPES[dtype])
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
    if run.schema_path.is_file():
        shutil.copy2(run.schema_path, out / run.schema_path.name)
    (out / EXPORT_INFO).write_text(json.dumps(info, indent=2))
    return out

