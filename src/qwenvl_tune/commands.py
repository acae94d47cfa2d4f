"""Every command's options, declared once, as typed dataclasses; the argument parser is generated from them.

A command has its own options (a dataclass below) and may accept config sections as dotted overrides
(``--metrics.list_matching unordered`` for ``evaluate``): ``train`` and ``check`` take the whole config,
the commands that use a trained run take the sections that change how it is used, applied on top of
the run's saved config. Field help texts are the ``--help`` texts. Nothing heavy is imported here, so
an argument error is printed at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from .config import _f, _suggest, iter_fields

REQUIRED: Any = dataclasses.MISSING


def _req(help: str, **meta: Any) -> Any:
    return dataclasses.field(metadata={"help": help, **meta})


def _pos(help: str, default: Any = dataclasses.MISSING, **meta: Any) -> Any:
    kw = {"default_factory": list} if default == [] else ({} if default is dataclasses.MISSING else {"default": default})
    return dataclasses.field(metadata={"help": help, "positional": True, **meta}, **kw)


Checkpoint = Literal["best", "last"]


@dataclass
class TrainOptions:
    resume: str | None = _f(None, "Continue a run from its newest complete checkpoint (a run folder, or 'auto': the "
                                  "run named by --name if it has one, else start it).")


@dataclass
class EvaluateOptions:
    run: str = _req("Run folder (runs/NAME).")
    checkpoint: Checkpoint = _f("best", "Which checkpoint of the run.")
    split: Literal["train", "valid", "test"] = _f("valid", "Split of the dataset to score.")
    compare_base: bool = _f(False, "Also score the base model (decoded the same way as the fine-tuned one).")
    limit: int | None = _f(None, "Score only the first N samples.")
    constrained: bool | None = _f(None, "Decode under the JSON schema learnt from the training answers (default: "
                                        "the run's generate.constrained); --no-constrained decodes freely.")
    compare_constrained: bool = _f(False, "Also decode the other way (with or without the schema) and report both, "
                                          "each column named for how it was decoded.")
    from_predictions: bool = _f(False, "Re-score the stored predictions of this split without loading a model.")
    review_below: float | None = _f(None, "Mark fields whose confidence is under this (and their documents) "
                                          "needs_review (sets generate.review_below).")


@dataclass
class PredictOptions:
    run: str = _req("Run folder (runs/NAME).")
    images: list[str] = _pos("Documents: image files or PDFs, one result each (printed as JSON); or --input/--output "
                             "for bulk runs.", [])
    one_document: bool = _f(False, "The files are the pages of one document, in order (one result).")
    checkpoint: Checkpoint = _f("best", "Which checkpoint of the run.")
    input: str | None = _f(None, "Folder of images and PDFs, or a .jsonl list ({\"image\"} or {\"images\": [pages]} "
                                 "per line): bulk extraction, streamed to --output.")
    output: str | None = _f(None, "JSONL file for bulk results (resumable: inputs already in it are skipped).")
    devices: int = _f(1, "Worker processes for bulk runs (one per GPU).")
    compare_base: bool = _f(False, "Also show the base model's answer (decoded the same way).")
    constrained: bool | None = _f(None, "Decode under the learnt JSON schema (default: the run's "
                                        "generate.constrained); --no-constrained decodes freely.")
    review_below: float | None = _f(None, "Mark fields whose confidence is under this (and their documents) "
                                          "needs_review (sets generate.review_below).")


@dataclass
class ExportOptions:
    run: str = _req("Run folder (runs/NAME).")
    out: str = _req("Output folder (must not exist, or be empty).")
    checkpoint: Checkpoint = _f("best", "Which checkpoint of the run.")
    merge: bool = _f(False, "Merge the adapter into the (bf16) base weights: a plain Hugging Face model folder.")
    dtype: Literal["bfloat16", "float16", "float32"] = _f("bfloat16", "Dtype of merged weights.")


@dataclass
class ServeOptions:
    run: str = _req("Run folder (runs/NAME).")
    checkpoint: Checkpoint = _f("best", "Which checkpoint of the run.")
    host: str = _f("127.0.0.1", "Bind address (localhost unless told otherwise).")
    port: int = _f(8000, "Port.")
    api_key: str | None = _f(None, "Require this key in the X-API-Key header (or set QWENVL_TUNE_API_KEY).")
    max_upload_mb: float = _f(20.0, "Largest upload accepted, in MiB.")
    max_batch: int = _f(8, "Most concurrent requests generated together.")
    review_below: float | None = _f(None, "Mark fields whose confidence is under this (and their documents) "
                                          "needs_review (sets generate.review_below).")


@dataclass
class CheckOptions:
    path: str = _pos("Dataset folder (train/, valid/ or val/, optional test/).")
    json: bool = _f(False, "Print the report as JSON.")


@dataclass
class ScoreOptions:
    pred: str = _req("Predictions: one answer per line (raw text, or {\"id\", \"output\"}).")
    gold: str = _req("Gold answers: a file of annotation rows of any layout (JSON Lines, or a .json array) or "
                     "lines with {\"id\", \"gold\"}.")
    out: str = _f("score_output", "Folder for metrics.json, fields.csv, predictions.jsonl and report.html.")
    protocol: Literal["both", "strict", "donut"] | None = _f(None, "Scores to show: strict, donut (Donut's "
                                                                   "JSONParseEvaluator) or both (sets metrics.protocol).")


@dataclass
class DemoOptions:
    out: str = _f("demo_output", "Folder for the demo's data, model and run.")


# Short spellings for the config fields users type most; each maps to one config field.
ALIASES = {"data": "data.path", "model": "model.name_or_path", "method": "model.method", "name": "run.name",
           "output-dir": "run.output_dir", "skip-invalid": "data.skip_invalid", "prompt": "data.prompt",
           "batch-size": "generate.batch_size"}


@dataclass(frozen=True)
class Command:
    help: str
    options: type
    sections: tuple[str, ...] = ()  # config sections accepted as dotted overrides ("*": all)
    aliases: tuple[str, ...] = ()
    preset: bool = False  # accepts --config PRESET.yaml


COMMANDS: dict[str, Command] = {
    "train": Command("Fine-tune a model; writes a run folder.", TrainOptions, ("*",),
                     ("data", "model", "method", "name", "output-dir", "skip-invalid"), preset=True),
    "evaluate": Command("Score a run's model on a split; writes report.html, metrics.json, predictions.",
                        EvaluateOptions, ("metrics", "generate", "data.path"), ("data",)),
    "predict": Command("Extract JSON from document images with a run's model.", PredictOptions,
                       ("generate", "data.prompt"), ("prompt", "batch-size")),
    "export": Command("Write a run's model for serving: the adapter, or merged full weights.", ExportOptions),
    "serve": Command("HTTP service and web page for a run's model.", ServeOptions, ("generate",)),
    "check": Command("Validate a dataset and report what is wrong, per file and line.", CheckOptions, ("*",),
                     ("model", "skip-invalid"), preset=True),
    "score": Command("Score any system's outputs against gold answers (the metrics and report of evaluate).",
                     ScoreOptions, ("metrics",)),
    "demo": Command("Sample documents + tiny model: the whole loop on CPU in minutes.", DemoOptions),
}


def metavar(tp: Any) -> str:
    """How a type reads in --help: {a,b} for choices, INT, FLOAT, BOOL, TEXT, LIST."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return metavar(inner[0])
        # a type or named values: INT|auto
        names = [metavar(a).strip("{}").replace(",", "|") for a in inner]
        return "|".join(names) if all(n != "VALUE" for n in names) else "VALUE"
    if origin is list:
        return "LIST"
    return {bool: "BOOL", int: "INT", float: "FLOAT", str: "TEXT"}.get(tp, "VALUE")


def _base(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return inner[0] if len(inner) == 1 else tp
    return tp


def _accepts(cmd: Command, name: str) -> bool:
    return "*" in cmd.sections or name in cmd.sections or name.split(".")[0] in cmd.sections


def config_keys(cmd: Command) -> list[str]:
    return [n for n, _, _ in iter_fields() if _accepts(cmd, n)]


def _add_options(p: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, help_ = hints[f.name], f.metadata.get("help", "")
        base = _base(tp)
        if f.metadata.get("positional"):
            p.add_argument(f.name, nargs="*" if typing.get_origin(base) is list else None, help=help_,
                           **({} if f.default is dataclasses.MISSING else {"default": f.default}))
            continue
        flag = "--" + f.name.replace("_", "-")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        if base is bool:
            p.add_argument(flag, dest=f"opt:{f.name}", action=argparse.BooleanOptionalAction, default=default,
                           help=help_)
            continue
        choices = list(typing.get_args(base)) if typing.get_origin(base) is Literal else None
        conv = {int: int, float: float}.get(base, str)
        p.add_argument(flag, dest=f"opt:{f.name}", required=required, default=default, choices=choices,
                       type=conv, metavar=None if choices else metavar(tp),
                       help=help_ + ("" if required or default is None else f" (default: {default!r})"))


def _add_config(p: argparse.ArgumentParser, cmd: Command) -> None:
    if cmd.preset:
        p.add_argument("--config", dest="opt:config", help="YAML preset (see configs/); dotted options override it.")
    for alias in cmd.aliases:
        dest = ALIASES[alias]
        p.add_argument(f"--{alias}", dest=f"cfg:{dest}", default=argparse.SUPPRESS, metavar="VALUE",
                       help=f"Same as --{dest}.", **({"nargs": "?", "const": "true"} if alias == "skip-invalid" else {}))
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, f, tp in iter_fields():
        if not _accepts(cmd, name):
            continue
        section = name.split(".")[0]
        g = groups.setdefault(section, p.add_argument_group(f"{section} options"))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        g.add_argument(f"--{name}", dest=f"cfg:{name}", default=argparse.SUPPRESS, metavar=metavar(tp),
                       help=f"{f.metadata.get('help', '')} (default: {default!r})")


def parser(version: str = "") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwenvl-tune", description="Fine-tune Qwen-VL models to read documents into JSON.")
    p.add_argument("--version", action="version", version=f"qwenvl-tune {version}")
    p.add_argument("--verbose", action="store_true", help="Show third-party progress bars, banners and warnings.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, cmd in COMMANDS.items():
        sp = sub.add_parser(name, help=cmd.help, description=cmd.help)
        _add_options(sp, cmd.options)
        _add_config(sp, cmd)
    return p


def options(ns: argparse.Namespace) -> dict[str, Any]:
    """The command's own options from parsed arguments (``--compare-base`` -> ``compare_base``)."""
    return {k[4:]: v for k, v in vars(ns).items() if k.startswith("opt:")} | \
        {k: v for k, v in vars(ns).items() if k in ("images", "path")}


def overrides(ns: argparse.Namespace) -> dict[str, Any]:
    """The dotted config overrides given on the command line."""
    return {k[4:]: v for k, v in vars(ns).items() if k.startswith("cfg:")}


def suggest_for(command: str | None, unknown: list[str]) -> str:
    cmd = COMMANDS.get(command or "")
    names = ([f.name.replace("_", "-") for f in dataclasses.fields(cmd.options)] + config_keys(cmd)
             + list(cmd.aliases)) if cmd else []
    flags = [u for u in unknown if u.startswith("--")]
    return _suggest(flags[0][2:].split("=")[0], names) if flags and names else ""


def run_folder_without_flag(argv: list[str]) -> str:
    """``evaluate runs/demo``: a run folder given where ``--run`` is expected, which argparse would answer only with
    "the following arguments are required: --run". Returns the corrected command line, or "" when that is not it."""
    command = next((a for a in argv if not a.startswith("-")), None)
    cmd = COMMANDS.get(command or "")
    if cmd is None or not any(f.name == "run" for f in dataclasses.fields(cmd.options)):
        return ""
    if any(a == "--run" or a.startswith("--run=") for a in argv):
        return ""
    import shlex
    from pathlib import Path

    from .rundir import CONFIG_FILE  # only on this path: argument errors stay quick

    at = argv.index(command)
    for i in range(at + 1, len(argv)):
        a = argv[i]
        if not a.startswith("-") and (Path(a) / CONFIG_FILE).is_file():
            return shlex.join(["qwenvl-tune", *argv[:i], "--run", a, *argv[i + 1:]])
    return ""
