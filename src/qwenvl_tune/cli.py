"""qwenvl-tune command line: parse, call the library, print. No logic lives here.

    qwenvl-tune train --data ./Data --model Qwen/Qwen2.5-VL-3B-Instruct --method qlora
    qwenvl-tune train --config configs/qwen2_5_vl_3b_lora.yaml --lora.r 16
    qwenvl-tune evaluate --run runs/NAME --split valid [--compare-base]
    qwenvl-tune predict --run runs/NAME scan1.jpg scan2.jpg [--prompt "..."] [--compare-base]
    qwenvl-tune check ./Data [--config ...] [--json]
    qwenvl-tune demo

The options of every command are generated from typed dataclasses (``commands.py``). Errors a user
can fix (``QwenVLTuneError``) are one line and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from . import commands
from .errors import QwenVLTuneError, TrainingInterrupted


def _version() -> str:
    try:
        return version("qwenvl-tune")
    except PackageNotFoundError:
        return "unknown"


def _train(o: dict, cfg: dict) -> int:
    from .api import build_config, train

    run = train(build_config(o["config"], cfg), resume=o["resume"])
    print(f"\nbest model: {run / 'best'}\nnext: qwenvl-tune evaluate --run {run}   (writes the report)")
    return 0


def _review(o: dict, cfg: dict) -> None:
    """--review-below T is generate.review_below for this use of the run."""
    if o.get("review_below") is not None:
        cfg["generate.review_below"] = o["review_below"]


def _evaluate(o: dict, cfg: dict) -> int:
    _review(o, cfg)
    from .api import evaluate
    from .evaluation.report import format_metrics
    from .rundir import RunDir

    res = evaluate(o["run"], o["split"], which=o["checkpoint"], compare_base=o["compare_base"], limit=o["limit"],
                   from_predictions=o["from_predictions"], constrained=o["constrained"],
                   compare_constrained=o["compare_constrained"], overrides=cfg, progress=True)
    print(format_metrics(res))
    print(f"\nwritten: {RunDir(o['run']).eval_dir(o['split'], o['checkpoint'])}/report.html (and metrics.json, "
          f"predictions.jsonl, fields.csv)")
    return 0


def _predict(o: dict, cfg: dict) -> int:
    _review(o, cfg)
    if o["input"] or o["output"]:
        if not (o["input"] and o["output"]) or o["images"]:
            print("error: bulk extraction takes --input and --output (and no image arguments)", file=sys.stderr)
            return 2
        from .inference.bulk import bulk_predict

        counts = bulk_predict(o["run"], o["input"], o["output"], devices=o["devices"], which=o["checkpoint"],
                              constrained=o["constrained"], overrides=cfg)
        print(f"{counts['total']} inputs: {counts['skipped']} already in {o['output']}, {counts['written']} "
              f"written now; {counts['errors']} unreadable (see their 'error' lines)")
        return 1 if counts["errors"] else 0
    if not o["images"]:
        print("error: give image or PDF files, or --input and --output", file=sys.stderr)
        return 2
    from .api import predict

    documents = [o["images"]] if o["one_document"] else o["images"]
    rows = predict(o["run"], documents, which=o["checkpoint"], compare_base=o["compare_base"],
                   constrained=o["constrained"], overrides=cfg)
    for row in rows:
        print(json.dumps(row, ensure_ascii=False, indent=2))
    failed = sum(1 for r in rows if "error" in r)
    if failed:
        print(f"error: {failed} of {len(rows)} input(s) could not be read (see their 'error' entries)", file=sys.stderr)
        if any(Path(p).is_dir() for p in o["images"]):
            print("to extract every document in a folder: qwenvl-tune predict --run RUN --input FOLDER --output "
                  "OUT.jsonl", file=sys.stderr)
    return 1 if failed else 0


def _export(o: dict, cfg: dict) -> int:
    from .inference.export import export_run

    out = export_run(o["run"], o["out"], merge=o["merge"], which=o["checkpoint"], dtype=o["dtype"])
    print(f"exported {o['run']}/{o['checkpoint']} to {out} ({'merged weights' if o['merge'] else 'adapter'})")
    return 0


def _serve(o: dict, cfg: dict) -> int:
    _review(o, cfg)
    from .inference.server import serve

    serve(o["run"], host=o["host"], port=o["port"], which=o["checkpoint"],
          api_key=o["api_key"] or os.environ.get("QWENVL_TUNE_API_KEY"), max_upload_mb=o["max_upload_mb"],
          max_batch=o["max_batch"], overrides=cfg)
    return 0


def _check(o: dict, cfg: dict) -> int:
    from .api import build_config, check
    from .data.report import format_report

    notes: list[str] = []
    rep = check(o["path"], build_config(o["config"], {**cfg, "data.path": o["path"]}), notes=notes)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(json.dumps(rep, indent=2, ensure_ascii=False) if o["json"] else format_report(rep))
    return 1 if rep["errors"] else 0


def _score(o: dict, cfg: dict) -> int:
    from .api import score
    from .evaluation.report import format_metrics

    if o.get("protocol"):
        cfg["metrics.protocol"] = o["protocol"]
    res = score(o["pred"], o["gold"], o["out"], overrides=cfg)
    print(format_metrics(res))
    for note in res.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    print(f"\nwritten: {o['out']}/report.html (and metrics.json, predictions.jsonl, fields.csv)")
    return 0


def _demo(o: dict, cfg: dict) -> int:
    from .demo import run_demo

    run_demo(o["out"])
    return 0


HANDLERS = {"train": _train, "evaluate": _evaluate, "predict": _predict, "export": _export, "serve": _serve,
            "check": _check, "score": _score, "demo": _demo}


def _quiet() -> None:
    """Third-party chatter off (progress bars per weight file, info banners, deprecation notes); --verbose keeps it.
    Set before the libraries are imported, as some read these once."""
    import logging
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bars follow it
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in ("lightning", "lightning.fabric", "lightning_fabric", "pytorch_lightning", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # bitsandbytes, imported by PEFT whatever the method, warns on CPUs with AVX512-BF16 that a hub kernel for
    # 4-bit CPU products could not be fetched: nothing here runs 4-bit products on a CPU
    logging.getLogger("bitsandbytes.backends.cpu").setLevel(logging.ERROR)
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", message=".*Tensor Cores.*")
    warnings.filterwarnings("ignore", message=".*is not aligned for fast kernel.*")


def main(argv: list[str] | None = None) -> int:
    # Document batches vary in shape step to step; expandable segments keep the CUDA caching
    # allocator from fragmenting (set before torch initialises CUDA; a user's own setting wins).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    parser = commands.parser(_version())
    fixed = commands.run_folder_without_flag(sys.argv[1:] if argv is None else list(argv))
    if fixed:
        parser.error(f"a run folder is named with --run: {fixed}")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{commands.suggest_for(args.command, unknown)}")
    if not args.verbose:
        _quiet()
    try:
        return HANDLERS[args.command](commands.options(args), commands.overrides(args))
    except TrainingInterrupted as e:
        print(str(e), file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before training started (or a second Ctrl-C): nothing was saved by this command
        print("\ninterrupted", file=sys.stderr)
        return 130
    except QwenVLTuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
