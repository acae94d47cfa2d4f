"""qwenvl-tune command line: parse, call the library, print. No logic lives here.

    qwenvl-tune train --data ./Data --model Qwen/Qwen2.5-VL-3B-Instruct --method qlora
    qwenvl-tune train --config configs/qwen2_5_vl_3b_lora.yaml --lora.r 16
    qwenvl-tune evaluate --run runs/NAME --split valid [--compare-base]
    qwenvl-tune predict --run runs/NAME scan1.jpg scan2.jpg [--prompt "..."] [--compare-base]
    qwenvl-tune check ./Data [--config ...] [--json]
    qwenvl-tune demo
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from .config import ConfigError, iter_fields

# Short spellings for the fields users type most; each maps to one config field.
ALIASES = {"data": "data.path", "model": "model.name_or_path", "method": "model.method", "name": "run.name",
           "output-dir": "run.output_dir", "skip-invalid": "data.skip_invalid"}


def _metavar(tp: Any) -> str:
    """How a config field's type reads in --help: {a,b} for choices, INT, FLOAT, BOOL, TEXT, LIST."""
    import types
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _metavar(inner[0]) if len(inner) == 1 else "VALUE"
    if origin is list:
        return "LIST"
    return {bool: "BOOL", int: "INT", float: "FLOAT", str: "TEXT"}.get(tp, "VALUE")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML preset (see configs/); dotted options below override it.")
    for alias, dest in ALIASES.items():
        p.add_argument(f"--{alias}", dest=f"cfg:{dest}", default=argparse.SUPPRESS, metavar="VALUE",
                       help=f"Same as --{dest}.", **({"nargs": "?", "const": "true"} if alias == "skip-invalid" else {}))
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, f, tp in iter_fields():
        section = name.split(".")[0]
        g = groups.setdefault(section, p.add_argument_group(f"{section} options"))
        default = f.default if f.default is not __import__("dataclasses").MISSING else f.default_factory()
        g.add_argument(f"--{name}", dest=f"cfg:{name}", default=argparse.SUPPRESS, metavar=_metavar(tp),
                       help=f"{f.metadata.get('help', '')} (default: {default!r})")


def _overrides(ns: argparse.Namespace) -> dict[str, Any]:
    return {k[4:]: v for k, v in vars(ns).items() if k.startswith("cfg:")}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwenvl-tune", description="Fine-tune Qwen-VL models to read documents into JSON.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="Fine-tune a model; writes a run folder.")
    t.add_argument("--resume", metavar="RUN|auto", help="Continue a run from its newest complete checkpoint "
                   "(weights, optimizer, scheduler, step, position in the epoch, RNG).")
    _add_config_args(t)
    e = sub.add_parser("evaluate", help="Score a run's best model on a split.")
    e.add_argument("--run", required=True, help="Run folder (runs/NAME).")
    e.add_argument("--split", default="valid", choices=["train", "valid", "test"])
    e.add_argument("--checkpoint", default="best", choices=["best", "last"])
    e.add_argument("--compare-base", action="store_true", help="Also score the base model.")
    e.add_argument("--data", help="Dataset folder (default: the run's data.path).")
    e.add_argument("--limit", type=int, help="Score only the first N samples.")
    e.add_argument("--no-constrained", dest="constrained", action="store_false", default=None,
                   help="Decode without the learnt JSON schema.")
    e.add_argument("--compare-constrained", action="store_true",
                   help="Also decode without the schema and report both (the 'unconstrained' column).")
    e.add_argument("--from-predictions", action="store_true",
                   help="Re-score the stored eval/<split>/predictions.jsonl without loading a model.")
    pr = sub.add_parser("predict", help="Extract JSON from document images with a run's model.")
    pr.add_argument("--run", required=True)
    pr.add_argument("images", nargs="*", help="Image files (printed as JSON), or use --input/--output for bulk runs.")
    pr.add_argument("--input", help="Folder of images or a .jsonl list: bulk extraction, streamed to --output.")
    pr.add_argument("--output", help="JSONL file for bulk results (resumable: inputs already in it are skipped).")
    pr.add_argument("--devices", type=int, default=1, help="Worker processes for bulk runs (one per GPU).")
    pr.add_argument("--batch-size", type=int, default=None, help="Images per generation batch (default: the run's).")
    pr.add_argument("--prompt", help="Instruction (default: the run's data.prompt).")
    pr.add_argument("--checkpoint", default="best", choices=["best", "last"])
    pr.add_argument("--compare-base", action="store_true", help="Also show the base model's answer.")
    pr.add_argument("--no-constrained", dest="constrained", action="store_false", default=None,
                    help="Decode without the learnt JSON schema.")
    x = sub.add_parser("export", help="Write a run's model for serving: the adapter, or merged full weights.")
    x.add_argument("--run", required=True)
    x.add_argument("--out", required=True, help="Output folder (must not exist or be empty).")
    x.add_argument("--merge", action="store_true", help="Merge the adapter into the (bf16) base weights.")
    x.add_argument("--checkpoint", default="best", choices=["best", "last"])
    x.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    s_ = sub.add_parser("serve", help="HTTP service and web page for a run's model.")
    s_.add_argument("--run", required=True)
    s_.add_argument("--host", default="127.0.0.1", help="Bind address (localhost unless told otherwise).")
    s_.add_argument("--port", type=int, default=8000)
    s_.add_argument("--checkpoint", default="best", choices=["best", "last"])
    s_.add_argument("--api-key", default=None, help="Require this key in the X-API-Key header (or set QWENVL_TUNE_API_KEY).")
    s_.add_argument("--max-upload-mb", type=float, default=20.0)
    s_.add_argument("--max-batch", type=int, default=8, help="Most concurrent requests generated together.")
    c = sub.add_parser("check", help="Validate a dataset and report what is wrong, per file and line.")
    c.add_argument("path", help="Dataset folder.")
    _add_config_args(c)
    c.add_argument("--json", action="store_true", help="Print the report as JSON.")
    d = sub.add_parser("demo", help="Sample documents + tiny model: the whole loop on CPU in minutes.")
    d.add_argument("--out", default="demo_output", help="Folder for the demo's data, model and run.")
    return p


def format_metrics(results: dict[str, Any]) -> str:
    from .evaluation.metrics import SCALAR_METRICS

    cols = [k for k in ("finetuned", "unconstrained", "base") if k in results]
    w = 15
    lines = [f"{'metric':<18}" + "".join(f"{c:>{w}}" for c in cols), "-" * (18 + w * len(cols))]
    for m in SCALAR_METRICS:
        lines.append(f"{m:<18}" + "".join(f"{results[c][m]:>{w}.3f}" for c in cols))
    lines.append(f"{'samples':<18}" + "".join(f"{results[c]['n']:>{w}d}" for c in cols))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    # Document batches vary in shape step to step; expandable segments keep the CUDA caching
    # allocator from fragmenting (set before torch initialises CUDA; a user's own setting wins).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        from .config import _suggest

        names = [n for n, _, _ in iter_fields()] + list(ALIASES)
        flags = [u for u in unknown if u.startswith("--")]
        hint = _suggest(flags[0][2:].split("=")[0], names) if flags else ""
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    from .data.records import DataError
    from .training.checkpoints import CheckpointError
    from .training.module import NonFiniteError
    from .training.run import TrainingInterrupted

    try:
        if args.command == "train":
            from .api import build_config, train

            run = train(build_config(args.config, _overrides(args)), resume=args.resume)
            print(f"\nrun folder: {run}\nnext: qwenvl-tune evaluate --run {run}")
        elif args.command == "evaluate":
            from .api import evaluate

            res = evaluate(args.run, args.split, which=args.checkpoint, compare_base=args.compare_base,
                           data_path=args.data, limit=args.limit, from_predictions=args.from_predictions,
                           constrained=args.constrained, compare_constrained=args.compare_constrained)
            print(format_metrics(res))
            print(f"\nwritten: {args.run}/eval/{args.split}/ (report.html, metrics.json, predictions.jsonl, fields.csv)")
        elif args.command == "predict":
            from .api import predict

            if args.input or args.output:
                if not (args.input and args.output) or args.images:
                    print("error: bulk extraction takes --input and --output (and no image arguments)", file=sys.stderr)
                    return 2
                from .inference.bulk import bulk_predict

                counts = bulk_predict(args.run, args.input, args.output, devices=args.devices,
                                      batch_size=args.batch_size, which=args.checkpoint, constrained=args.constrained)
                print(f"{counts['total']} inputs: {counts['skipped']} already in {args.output}, {counts['written']} "
                      f"written now; {counts['errors']} unreadable (see their 'error' lines)")
                return 0
            if not args.images:
                print("error: give image files, or --input and --output", file=sys.stderr)
                return 2
            for row in predict(args.run, args.images, args.prompt, which=args.checkpoint, compare_base=args.compare_base,
                               constrained=args.constrained):
                print(json.dumps(row, ensure_ascii=False, indent=2))
        elif args.command == "export":
            from .inference.export import export_run

            out = export_run(args.run, args.out, merge=args.merge, which=args.checkpoint, dtype=args.dtype)
            print(f"exported {args.run}/{args.checkpoint} to {out} ({'merged weights' if args.merge else 'adapter'})")
        elif args.command == "serve":
            from .inference.server import serve

            serve(args.run, host=args.host, port=args.port, which=args.checkpoint,
                  api_key=args.api_key or os.environ.get("QWENVL_TUNE_API_KEY"),
                  max_upload_mb=args.max_upload_mb, max_batch=args.max_batch)
        elif args.command == "check":
            from .data.report import run_check

            return run_check(args.path, args.config, _overrides(args), as_json=args.json)
        elif args.command == "demo":
            from .demo import run_demo

            run_demo(args.out)
    except TrainingInterrupted as e:
        print(str(e), file=sys.stderr)
        return 130
    except (ConfigError, DataError, FileNotFoundError, FileExistsError, CheckpointError, NonFiniteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
