"""The library API: ``train``, ``evaluate``, ``predict``. The CLI only parses arguments and calls these.

    from qwenvl_tune import api
    run = api.train(api.build_config("configs/demo.yaml"))
    metrics = api.evaluate(run, "valid")
    rows = api.predict(run, ["scan.jpg"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from .config import Config, build_config
from .data.check import check_split
from .data.collate import Encoder, GenerateCollator, RecordDataset
from .data.images import load_image
from .evaluation.report import read_predictions, write_outputs
from .inference.generate import extraction_result, generate_batch, generate_for_images, stop_token_ids
from .inference.structured import run_constraint
from .modeling.load import load_for_inference
from .training.checkpoints import read_run_config
from .training.run import train

__all__ = ["build_config", "train", "evaluate", "predict", "Config"]


def _release_cuda_cache() -> None:
    """After the caller dropped its model: hand cached GPU memory back before loading the next one."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _generate_split(model: Any, processor: Any, config: Config, records: list, constraint: Any = None
                    ) -> tuple[list[str], list[bool]]:
    enc = Encoder(processor, config.data.system_message)
    ds = RecordDataset(records, enc, "generate", config.data.max_image_pixels)
    loader = torch.utils.data.DataLoader(ds, batch_size=config.generate.batch_size, shuffle=False,
                                         collate_fn=GenerateCollator(enc.pad_id), num_workers=0)
    stop = stop_token_ids(model, processor)
    texts: list[str] = []
    cut: list[bool] = []
    for batch in loader:
        t, c = generate_batch(model, processor, batch, config.generate.max_new_tokens, stop, constraint)
        texts += t
        cut += c
    return texts, cut


def evaluate(run_dir: str | Path, split: str = "valid", *, which: str = "best", compare_base: bool = False,
             data_path: str | None = None, limit: int | None = None, from_predictions: bool = False,
             constrained: bool | None = None, compare_constrained: bool = False) -> dict[str, Any]:
    """Score the run's ``best`` (or ``last``) model on a split; writes ``eval/<split>/`` in the run folder:
    predictions.jsonl, metrics.json, fields.csv, field_accuracy.png and report.html.

    With ``from_predictions`` no model is loaded: the stored raw outputs are re-scored with the
    run's current metric options and every output is rewritten. ``constrained`` (default: the
    run's generate.constrained) decodes under the learnt JSON schema; ``compare_constrained`` adds
    the fine-tuned model decoded without it, as the "unconstrained" column.

    Returns:
        {"split", "n", "skipped", "checkpoint", "options", "finetuned": metrics, "base": metrics (with compare_base)}
    """
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    out_dir = run_dir / "eval" / split
    title = f"{run_dir.name} · {split} · {which}/"
    if from_predictions:
        rows = read_predictions(out_dir / "predictions.jsonl")
        return write_outputs(out_dir, title, rows, config.metric_options(),
                             {"split": split, "n": len(rows), "checkpoint": which, "rescored": True})
    report = check_split(data_path or config.data.path, split, max_image_pixels=config.data.max_image_pixels)
    records = report.records[:limit] if limit else report.records
    constrained = config.generate.constrained if constrained is None else constrained
    outputs: dict[str, tuple[list[str], list[bool]]] = {}
    model, processor, _ = load_for_inference(run_dir, which, config)
    outputs["finetuned"] = _generate_split(model, processor, config, records,
                                           run_constraint(run_dir, model, processor, constrained))
    if compare_constrained:
        outputs["unconstrained"] = _generate_split(model, processor, config, records,
                                                   run_constraint(run_dir, model, processor, not constrained))
    del model
    _release_cuda_cache()
    if compare_base:
        model, processor, _ = load_for_inference(run_dir, which, config, base_only=True)
        outputs["base"] = _generate_split(model, processor, config, records)
        del model
        _release_cuda_cache()
    rows = [{"id": r.id, "image": str(r.image_path), "gold": r.suffix,
             **{name: {"raw": texts[i], "truncated": cut[i]} for name, (texts, cut) in outputs.items()}}
            for i, r in enumerate(records)]
    extra = {"split": split, "n": len(records), "skipped": len(report.errors), "checkpoint": which,
             "constrained": constrained}
    if report.errors:
        extra["problems"] = [str(p) for p in report.errors]
    return write_outputs(out_dir, title, rows, config.metric_options(), extra)


def predict(run_dir: str | Path, images: Sequence[str | Path], prompt: str | None = None, *, which: str = "best",
            compare_base: bool = False, constrained: bool | None = None) -> list[dict[str, Any]]:
    """Extract JSON from image files with a run's model; one dict per image, in order.

    Each dict has ``image``, ``output`` (raw text), ``json`` (parsed or None), ``valid``,
    ``truncated``, and with ``compare_base`` the same under ``base``. An unreadable
    image gets an ``error`` entry instead of stopping the others.
    """
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    prompt = prompt or config.data.prompt
    rows: list[dict[str, Any]] = [{"image": str(p)} for p in images]
    loaded: list[tuple[int, Any]] = []
    for i, p in enumerate(images):
        try:
            loaded.append((i, load_image(p, max_pixels=config.data.max_image_pixels)))
        except Exception as e:  # noqa: BLE001 - reported per input, the others still run
            rows[i]["error"] = str(e)
    variants = (("finetuned", False), ("base", True)) if compare_base else (("finetuned", False),)
    for name, base_only in variants:
        if not loaded:
            break
        model, processor, _ = load_for_inference(run_dir, which, config, base_only=base_only)
        use = (config.generate.constrained if constrained is None else constrained) and not base_only
        texts, cut = generate_for_images(model, processor, [im for _, im in loaded], [prompt] * len(loaded),
                                         config.data.system_message, config.generate.batch_size,
                                         config.generate.max_new_tokens, run_constraint(run_dir, model, processor, use))
        del model
        _release_cuda_cache()
        for (i, _), text, c in zip(loaded, texts, cut):
            entry = extraction_result(text, c)
            if name == "finetuned":
                rows[i].update(entry)
            else:
                rows[i]["base"] = entry
    return rows
