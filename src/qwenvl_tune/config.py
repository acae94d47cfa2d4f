"""One typed configuration for every command.

Three layers, applied in order: the dataclass defaults below, a YAML preset
(``--config configs/qwen2_5_vl_3b_qlora.yaml``) and dotted command-line
overrides (``--lora.r 16``). Each field exists once, here; its ``help`` text is
the CLI help. Unknown keys are rejected with a suggestion.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


from .errors import QwenVLTuneError


class ConfigError(QwenVLTuneError, ValueError):
    """A configuration key or value is wrong; the message says which and why."""


# The scalar metrics that evaluation reports and training can monitor, with whether larger is better.
# They live here so that validating a config needs no metric code (evaluation.metrics imports them).
METRICS = {"edit_distance": False, "json_valid": True, "json_repaired": False, "exact_match": True,
           "field_precision": True, "field_recall": True, "field_f1": True, "field_accuracy": True,
           "ted_accuracy": True, "truncated": False,
           "item_f1": True,  # whole line items right (every field of the item), micro over all lists
           # Donut's JSONParseEvaluator definitions (evaluation/donut.py), comparable with published CORD numbers
           "donut_ted_accuracy": True, "donut_field_f1": True}


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class DataConfig:
    path: str = _f("", "Dataset folder holding train, valid (or val) and optional test splits: <split>/annotations.jsonl (Roboflow, messages or ShareGPT rows), a datasets save_to_disk folder, or Parquet files.")
    system_message: str | None = _f(None, "System message; none by default, so the model's chat template decides.")
    prompt: str = _f("extract data in JSON format", "Instruction used by predict and serve when none is given.")
    min_pixels: int = _f(256 * 28 * 28, "Smallest image area (pixels) the processor resizes to.")
    max_pixels: int = _f(1280 * 28 * 28, "Largest image area (pixels) the processor resizes to.")
    max_length: int = _f(4096, "Longest training sequence in tokens; a longer sample is an error naming it (never truncated).")
    max_image_pixels: int = _f(178_956_970, "Decompression-bomb guard: images with more pixels than this are rejected.")
    max_pages: int = _f(8, "Most pages in one document (image files plus PDF pages); a longer one is an error naming it.")
    image_column: str = _f("", "Parquet/datasets input: the image column (an image, or a list of page images); empty: images, image or pages.")
    answer_column: str = _f("", "Parquet/datasets input: the answer column (text or JSON); empty: suffix, answer, ground_truth, ... or a messages column.")
    prompt_column: str = _f("", "Parquet/datasets input: the prompt column; empty: prefix, prompt, question, ... or data.prompt when there is none.")
    skip_invalid: bool = _f(False, "Skip rows that fail the data check (each one is reported and recorded) instead of stopping.")
    valid_fraction: float = _f(0.0, "With no valid split in data.path: hold out this share of the training documents (at least one) to validate on, drawn with train.seed and listed in the run folder, so evaluate and resumes use the same ones. 0: a valid split is required.")
    num_workers: int | Literal["auto"] = _f(2, "DataLoader worker processes (per training process) for image decoding and tokenisation. auto: this machine's CPUs shared among its training processes, one left to each process itself, at most 8 (stated in the log); for a slow CPU or a large batch.")


@dataclass
class LoraSettings:
    r: int = _f(8, "LoRA rank.")
    alpha: int = _f(16, "LoRA alpha (scale = alpha / r).")
    dropout: float = _f(0.05, "Dropout on the LoRA input.")
    target_modules: list[str] = _f(["q_proj", "v_proj"], "Module name suffixes that get adapters ('all-linear' for every linear layer).")


@dataclass
class ModelConfig:
    name_or_path: str = _f("Qwen/Qwen2.5-VL-3B-Instruct", "Hub id or local folder of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint.")
    method: Literal["lora", "qlora", "full"] = _f("lora", "lora: bf16 base + adapters; qlora: 4-bit NF4 base + adapters; full: all weights.")
    dtype: Literal["bfloat16", "float16", "float32"] = _f("bfloat16", "Dtype of the (non-quantised) base weights.")
    attn_implementation: str = _f("sdpa", "Attention kernel passed to transformers (sdpa, eager, flash_attention_2, ...).")
    train_vision: bool = _f(False, "Also train the vision tower (frozen by default).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass to save memory.")
    kernels: Literal["auto", "none", "liger"] = _f("auto", "Fused Triton kernels (liger: SwiGLU, rotary; RMSNorm is PyTorch's fused kernel either way; CUDA only, pip install 'qwenvl-tune[kernels]'); auto: liger where available.")
    compile: Literal["auto", "on", "off"] = _f("auto", "Compile the language model's decoder layers for training with torch.compile (fused element-wise kernels, far less host time a step; the first steps of each new batch shape compile, about a minute in all). auto: on with a CUDA GPU, off with gradient checkpointing or FSDP.")
    fast_path: bool = _f(True, "Fast training path: one varlen kernel for vision attention, Hopper-aligned vision MLP, bf16 LoRA inputs under autocast, logits only on answer tokens.")


@dataclass
class TrainConfig:
    max_epochs: int = _f(10, "Number of passes over the training split.")
    max_steps: int = _f(-1, "Stop after this many optimizer steps (-1: no limit).")
    batch_size: int | Literal["auto"] = _f(2, "Samples per micro-batch (per device); batches are length-grouped. auto: the largest that fits the GPU, found by a short probe at start (stated in the log and saved with the run).")
    auto_batch_memory: float = _f(0.85, "With batch_size=auto: the share of the GPU's memory a micro-batch may use at its peak.")
    image_cache_gib: float = _f(8.0, "Host memory (GiB) for the frozen vision tower's output per training document, kept from the first epoch so later epochs skip the tower (Qwen2-VL, Qwen2.5-VL); 0: off.")
    accumulate_grad_batches: int = _f(4, "Micro-batches per optimizer step.")
    lr: float | None = _f(None, "Peak learning rate (AdamW); unset: 2e-4 for lora/qlora, 1e-5 for full fine-tuning.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    warmup_steps: int = _f(50, "Linear warm-up steps, then linear decay to zero.")
    gradient_clip_val: float = _f(1.0, "Clip the gradient norm to this value (0: off).")
    precision: str = _f("bf16-mixed", "Lightning precision: bf16-mixed, 16-mixed, 32-true, ...")
    check_val_every_n_epoch: int = _f(2, "Validate every N epochs (on the whole validation split).")
    limit_val_batches: float | None = _f(None, "Validate on this many batches (int) or fraction (float); off by default.")
    monitor: str = _f("val/field_f1", "Validation metric for early stopping and best/.")
    monitor_mode: Literal["auto", "max", "min"] = _f("auto", "Whether a larger or smaller monitored value is better (auto: from the metric).")
    early_stopping_patience: int = _f(3, "Validations without improvement before stopping (0: off).")
    seed: int = _f(42, "Seed for Python, NumPy and torch, set once at start.")
    accelerator: str = _f("auto", "Lightning accelerator: auto, cpu, gpu.")
    devices: int = _f(1, "Devices (GPUs, or CPU processes) per node; each runs batch_size samples per micro-batch.")
    num_nodes: int = _f(1, "Machines taking part (launch with torchrun or SLURM; see README).")
    strategy: str = _f("auto", "Lightning strategy: auto, ddp, fsdp, deepspeed (needs the deepspeed extra).")
    log_every_n_steps: int = _f(10, "Logging interval in optimizer steps.")
    keep_checkpoints: int = _f(3, "Checkpoints kept in checkpoints/ (best/ and last/ are always kept).")
    checkpoint_every_n_steps: int = _f(0, "Also write a resumable checkpoint every N optimizer steps (0: only at epoch end).")


@dataclass
class GenerateConfig:
    max_new_tokens: int = _f(1024, "Longest generated answer in tokens.")
    batch_size: int = _f(4, "Samples per generation batch (left-padded).")
    qlora_base: Literal["4bit", "bf16"] = _f("4bit", "How evaluate/predict/serve load a QLoRA run's base model on a GPU: 4bit as it was trained (least memory), or bf16 (what a merged export computes).")
    constrained: bool = _f(True, "predict/evaluate/serve decode under the JSON schema learnt from the training answers (saved in the run folder), so every output parses.")
    confidence: bool = _f(True, "Give each field (and document) a confidence from its tokens' probabilities; evaluate checks them against the answers (calibration).")
    review_below: float = _f(0.0, "Mark fields under this confidence (and their documents) needs_review; evaluate reports the share flagged and the accuracy of the rest (0: off).")


@dataclass
class MetricsConfig:
    list_matching: Literal["position", "unordered"] = _f("position", "Compare list items by position, or after an optimal item-to-item assignment.")
    casefold: bool = _f(False, "Compare string values case-insensitively.")
    whitespace: bool = _f(True, "Collapse whitespace runs in string values before comparing.")
    numeric: bool = _f(False, "Compare numeric strings as numbers ('8' equals '8.0').")
    protocol: Literal["both", "strict", "donut"] = _f("both", "Which scores the console and the report show (metrics.json always has both): strict (this project's definitions), donut (Donut's JSONParseEvaluator, as CORD/CC-OCR numbers are published), or both, side by side.")


DEFAULT_LR = {"lora": 2e-4, "qlora": 2e-4, "full": 1e-5}


@dataclass
class RunConfig:
    output_dir: str = _f("runs", "Folder under which run folders are created.")
    name: str | None = _f(None, "Run folder name (default: a timestamp).")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        # dotted keys set by a preset or the command line (not a field: not saved in config.yaml, not compared)
        self.explicit: set[str] = set()

    @property
    def monitor_mode(self) -> str:
        if self.train.monitor_mode != "auto":
            return self.train.monitor_mode
        return "max" if METRICS[self.train.monitor.split("/", 1)[1]] else "min"

    def flat(self) -> dict[str, Any]:
        """Every leaf as a dotted key: ``{"lora.r": 8, ...}``."""
        return flatten(self.to_dict())

    def changed(self) -> dict[str, Any]:
        """The leaves that differ from the defaults (what the console shows; config.yaml holds all)."""
        default = Config().flat()
        default["train.lr"] = DEFAULT_LR[self.model.method]  # the learning-rate default depends on the method
        return {k: v for k, v in self.flat().items() if default.get(k) != v}

    def metric_options(self) -> dict[str, Any]:
        """How answers are compared (the metrics' keyword options); ``metrics.protocol`` only chooses what is shown."""
        return {k: v for k, v in dataclasses.asdict(self.metrics).items() if k != "protocol"}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def validate(self) -> "Config":
        d, t = self.data, self.train
        if d.min_pixels <= 0 or d.max_pixels < d.min_pixels:
            raise ConfigError(f"data.min_pixels ({d.min_pixels}) must be > 0 and <= data.max_pixels ({d.max_pixels})")
        if not 0.0 <= self.generate.review_below <= 1.0:
            raise ConfigError(f"generate.review_below is a confidence in [0, 1], got {self.generate.review_below}")
        if not 0.0 <= d.valid_fraction < 1.0:
            raise ConfigError(f"data.valid_fraction is a share of the training documents in [0, 1), got {d.valid_fraction}")
        if d.num_workers != "auto" and d.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0 or auto, got {d.num_workers}")
        if d.max_pages < 1:
            raise ConfigError(f"data.max_pages must be >= 1, got {d.max_pages}")
        if t.image_cache_gib < 0:
            raise ConfigError(f"train.image_cache_gib is a size in GiB (0 turns the cache off), got {t.image_cache_gib}")
        if not 0.1 <= t.auto_batch_memory <= 1.0:
            raise ConfigError(f"train.auto_batch_memory is a share of the GPU's memory in [0.1, 1], got {t.auto_batch_memory}")
        for name in ("batch_size", "accumulate_grad_batches", "max_epochs", "check_val_every_n_epoch"):
            if getattr(t, name) == "auto":
                continue
            if getattr(t, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(t, name)}")
        if t.lr is None:
            # an adapter's few new weights take a far larger step than a full model's pretrained ones
            t.lr = DEFAULT_LR[self.model.method]
        if t.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {t.lr}")
        if self.lora.r < 1:
            raise ConfigError(f"lora.r must be >= 1, got {self.lora.r}")
        names = [f"val/{m}" for m in METRICS]
        if t.monitor not in names:
            raise ConfigError(f"train.monitor must be one of {names}, got {t.monitor!r}{_suggest(t.monitor, names)}")
        if self.model.method == "qlora" and self.model.dtype == "float32":
            raise ConfigError("model.method=qlora computes in model.dtype; use bfloat16 (or float16), not float32")
        return self


# --------------------------------------------------------------------------- field walking


def iter_fields(cls: type = Config, prefix: str = "") -> typing.Iterator[tuple[str, dataclasses.Field, Any]]:
    """Yield (dotted name, field, resolved type) for every leaf field."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, tp


def _leaf_types() -> dict[str, Any]:
    return {name: tp for name, _, tp in iter_fields()}


# what users of other trainers call our options (suggested by meaning when the spelling is not close)
SYNONYMS = {"learning_rate": "lr", "epochs": "max_epochs", "num_epochs": "max_epochs", "num_train_epochs": "max_epochs",
            "rank": "r", "lora_rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "warmup": "warmup_steps",
            "gradient_accumulation_steps": "accumulate_grad_batches", "grad_accum": "accumulate_grad_batches",
            "per_device_train_batch_size": "batch_size", "bs": "batch_size", "max_grad_norm": "gradient_clip_val",
            "model": "name_or_path", "model_id": "name_or_path", "max_seq_length": "max_length",
            "max_tokens": "max_new_tokens", "output": "output_dir", "patience": "early_stopping_patience"}


def _suggest(key: str, options: list[str]) -> str:
    tail = key.rsplit(".", 1)[-1].replace("-", "_")
    meant = SYNONYMS.get(tail)
    close = [o for o in options if meant and o.rsplit(".", 1)[-1] == meant][:1]
    if not close:
        close = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    if not close:
        close = [o for o in options if o.rsplit(".", 1)[-1] == tail][:1]
    return f" (did you mean '{close[0]}'?)" if close else ""


def coerce(name: str, tp: Any, value: Any) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(name, a, value)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors) if errors else f"{name}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name} must be one of {list(args)}, got {value!r}{_suggest(str(value), [str(a) for a in args])}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [coerce(name, args[0], v) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{name}: unsupported type {tp}")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def apply(config: Config, values: dict[str, Any], source: str) -> Config:
    """Set dotted keys on config (in place), validating names and types."""
    leaves = _leaf_types()
    for key, value in values.items():
        if key not in leaves:
            raise ConfigError(f"{source}: unknown key '{key}'{_suggest(key, list(leaves))}")
        obj: Any = config
        *parents, last = key.split(".")
        for p in parents:
            obj = getattr(obj, p)
        try:
            setattr(obj, last, coerce(key, leaves[key], value))
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        config.explicit.add(key)
    return config


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return flatten(raw)


def build_config(yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the YAML preset, then dotted overrides; validated."""
    config = Config()
    if yaml_path:
        apply(config, load_yaml(yaml_path), str(yaml_path))
    if overrides:
        apply(config, overrides, "command line")
    return config.validate()


def config_from_dict(d: dict[str, Any]) -> Config:
    config = apply(Config(), flatten(d), "saved config").validate()
    config.explicit = set()  # a saved config records values, not what the user typed (see rundir.OVERRIDES_FILE)
    return config
