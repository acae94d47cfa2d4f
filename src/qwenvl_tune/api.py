"""The library API: ``train``, ``evaluate``, ``predict``, ``check``. The CLI only parses arguments and calls these.

    from qwenvl_tune import api
    run = api.train(api.build_config("configs/demo.yaml"))
    metrics = api.evaluate(run, "valid")
    rows = api.predict(run, ["scan.jpg", "invoice.pdf", ["page1.png", "page2.png"]])
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from .config import Config, build_config
from .data.check import SplitReport, check_split, hold_out
from .data.documents import PageLimits, load_files
from .data.formats import Columns
from .data.records import SplitError
from .evaluation.report import read_predictions, write_outputs
from .inference.session import Predictor
from .rundir import RunDir
from .training.run import train
from .training.setup import naming_run_folder

__all__ = ["build_config", "train", "evaluate", "predict", "Config", "Predictor"]


def _split_of(run: RunDir, data: str, split: str) -> SplitReport:
    """A split of the run's data; for 'valid', when the data has none, the training documents the run held out to
    validate on (``data.valid_fraction``)."""
    config = run.config
    kw = dict(limits=PageLimits.from_config(config.data), columns=Columns.from_config(config.data))
    try:
        return check_split(data, split, **kw)
    except SplitError:
        held = run.holdout() if split == "valid" else None
        if held is None:
            raise
        return hold_out(check_split(data, "train", only=held, **kw), held)[1]


def evaluate(run_dir: str | Path, split: str = "valid", *, which: str = "best", compare_base: bool = False,
             data_path: str | None = None, limit: int | None = None, from_predictions: bool = False,
             constrained: bool | None = None, compare_constrained: bool = False,
             overrides: dict[str, Any] | None = None, progress: bool = False) -> dict[str, Any]:
    """Score the run's ``best`` (or ``last``) model on a split; writes the run's eval folder for that split and
    checkpoint: predictions.jsonl, metrics.json, fields.csv, field_accuracy.png and report.html.

    With ``from_predictions`` no model is loaded: the stored raw outputs are re-scored with the
    run's current metric options and every output is rewritten. ``constrained`` (default: the
    run's generate.constrained) decodes under the learnt JSON schema; ``compare_constrained`` adds
    the fine-tuned model decoded the other way, as a column named for how it was decoded
    ("constrained" or "unconstrained"). ``compare_base`` adds the base model, decoded like the fine-tuned one.
    ``overrides`` change config keys for this evaluation (``{"metrics.list_matching": "unordered"}``).

    Returns:
        {"split", "n", "skipped", "checkpoint", "decoding", "options", "finetuned": metrics, ...}
    """
    run = RunDir.open(run_dir).with_overrides(overrides)
    config = run.config
    out_dir = run.eval_dir(split, which)
    title = f"{run.name} · {split} · {which}/"
    if from_predictions:
        rows = read_predictions(out_dir / "predictions.jsonl")
        before = out_dir / "metrics.json"  # the rows the evaluation could not read stay named
        kept = {k: v for k, v in json.loads(before.read_text(encoding="utf-8")).items()
                if k in ("skipped", "problems", "decoding", "max_new_tokens")} if before.is_file() else {}
        return write_outputs(out_dir, title, rows, config.metric_options(),
                             {**kept, "split": split, "n": len(rows), "checkpoint": which, "rescored": True},
                             review_below=config.generate.review_below, protocol=config.metrics.protocol)
    report = _split_of(run, data_path or config.data.path, split)
    records = report.records[:limit] if limit else report.records
    outputs: dict[str, list[dict[str, Any]]] = {}
    decoding: dict[str, str] = {}
    tuned = Predictor.from_run(run, which, constrained=constrained)
    sessions = [tuned]
    if compare_constrained:
        other = not tuned.constrained
        sessions.append(tuned.with_decoding(other, "constrained" if other else "unconstrained"))
    for session in sessions:
        outputs[session.name] = session.generate_records(records, progress=progress)
        decoding[session.name] = session.decoding
    tuned.close()
    if compare_base:
        base = Predictor.from_run(run, which, constrained=tuned.constrained, base=True)
        outputs["base"] = base.generate_records(records, progress=progress)
        decoding["base"] = base.decoding
        base.close()
    rows = [{"id": r.id, "images": r.image_names, "gold": r.suffix,
             **{name: answers[i] for name, answers in outputs.items()}}
            for i, r in enumerate(records)]
    extra = {"split": split, "n": len(records), "skipped": len(report.errors), "checkpoint": which,
             "decoding": decoding, "max_new_tokens": config.generate.max_new_tokens}
    if report.errors:
        extra["problems"] = [str(p) for p in report.errors]
    return write_outputs(out_dir, title, rows, config.metric_options(), extra,
                         sources={r.id: r.sources for r in records}, review_below=config.generate.review_below,
                         protocol=config.metrics.protocol)


def predict(run_dir: str | Path, images: Sequence[str | Path | Sequence[str | Path]], prompt: str | None = None, *,
            which: str = "best", compare_base: bool = False, constrained: bool | None = None,
            overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Extract JSON from documents with a run's model; one dict per document, in order.

    A document is an image file, a PDF (every page) or a list of files (its pages, in order). Each dict has
    ``image`` (or ``images`` for a list), ``pages``, ``output`` (raw text), ``json`` (parsed or None),
    ``valid``, ``truncated``, and with ``compare_base`` the same under ``base`` (decoded the same way). An
    unreadable document gets an ``error`` entry instead of stopping the others.
    """
    run = RunDir.open(run_dir).with_overrides(overrides)
    limits = PageLimits.from_config(run.config.data)
    docs = [[p] if isinstance(p, (str, Path)) else list(p) for p in images]
    rows: list[dict[str, Any]] = [{"image": str(d[0])} if isinstance(p, (str, Path)) else
                                  {"images": [str(x) for x in d]} for p, d in zip(images, docs)]
    loaded: list[tuple[int, Any]] = []
    for i, d in enumerate(docs):
        try:
            loaded.append((i, load_files(d, limits)))
        except Exception as e:  # noqa: BLE001 - reported per input, the others still run
            rows[i]["error"] = str(e)
    if not loaded:
        return rows  # no model loaded for nothing
    tuned = Predictor.from_run(run, which, constrained=constrained)
    prompts = [prompt] * len(loaded)
    for (i, _), entry in zip(loaded, tuned.predict([im for _, im in loaded], prompts)):
        rows[i].update(entry)
    tuned.close()
    if compare_base:
        base = Predictor.from_run(run, which, constrained=tuned.constrained, base=True)
        for (i, _), entry in zip(loaded, base.predict([im for _, im in loaded], prompts)):
            rows[i]["base"] = entry
        base.close()
    return rows


def check(path: str | Path, config: Config | None = None, *, notes: list[str] | None = None) -> dict[str, Any]:
    """The data report of a dataset folder (``qwenvl-tune check``): every problem by file, line and field.

    Structural checks (JSON, keys, types, paths, images, duplicates) need no model. Token counts and
    the ``data.max_length`` check need the processor of ``config.model.name_or_path``; when it cannot
    be loaded (no hub, no local folder) they are skipped and ``notes`` gets one line saying why.
    """
    from .data.report import build_report
    from .errors import QwenVLTuneError
    from .modeling.load import load_processor

    config = config or build_config(None, {"data.path": str(path)})
    d = config.data
    try:
        processor = load_processor(config.model.name_or_path, d.min_pixels, d.max_pixels)
    except QwenVLTuneError as e:
        processor = None
        if notes is not None:
            notes.append(f"token counts and the data.max_length check skipped: {e}")
    with naming_run_folder(path):
        return build_report(path, processor, d.system_message, d.max_length if processor else None,
                            PageLimits.from_config(d), Columns.from_config(d))


def score(pred_path: str | Path, gold_path: str | Path, out_dir: str | Path, *,
          overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score any system's outputs against gold answers, writing what ``evaluate`` writes (metrics.json,
    fields.csv, predictions.jsonl, report.html) into ``out_dir``.

    ``pred_path``: one answer per line, as the raw text a system produced (a JSON value or a JSON string), or an
    object with ``id`` and ``output``. ``gold_path``: an ``annotations.jsonl`` (``image``, ``suffix``) or lines with
    ``id`` and ``gold``. Lines are joined by ``id`` when both files have ids, else by position. A prediction line
    that is not valid JSON is scored as invalid output, never dropped; a gold line that is not is an error.
    """
    from .evaluation.external import read_pairs

    config = build_config(None, overrides or {})
    rows, notes = read_pairs(Path(pred_path), Path(gold_path))
    extra = {"split": "external", "n": len(rows), "predictions": str(pred_path), "gold": str(gold_path),
             "decoding": {"finetuned": f"outputs read from {Path(pred_path).name}"}}
    if notes:
        extra["notes"] = notes
    return write_outputs(Path(out_dir), f"{Path(pred_path).name} vs {Path(gold_path).name}", rows,
                         config.metric_options(), extra, protocol=config.metrics.protocol)
