"""Checkpoint -> (model, processor) for LoRA, QLoRA or full fine-tuning, and back from a run folder.

The model class and processor come from the checkpoint (``AutoModelForImageTextToText``,
``AutoProcessor``), so Qwen2-VL, Qwen2.5-VL and Qwen3-VL load the same way,
from a hub id or a local folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..config import Config, ConfigError, ModelConfig


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# what a local folder must hold to be loaded as each kind (any one of the files)
FOLDER_FILES = {"model": ("config.json",),
                "processor": ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")}


def check_model_source(name_or_path: str | Path, kind: str = "model") -> str:
    """The model argument, stripped; a clear error at once when it names a local folder that is not there.

    ``org/name`` is a hub id unless ``org`` is a folder here; anything starting with ``.``, ``/`` or
    ``~``, or with more than two parts, is a path. Without this a typo in a local path is tried on
    the hub, retried for about half a minute, and ends in a traceback.
    """
    s = str(name_or_path).strip()
    p = Path(s).expanduser()
    if p.is_dir():
        if not any((p / f).is_file() for f in FOLDER_FILES[kind]):
            raise ConfigError(f"model.name_or_path={s!r}: the folder holds no {' or '.join(FOLDER_FILES[kind])}, so "
                              f"it is not a Hugging Face {kind} folder")
        return s
    local = s.startswith((".", "/", "~")) or len(p.parts) > 2 or p.exists() or (len(p.parts) == 2 and Path(p.parts[0]).is_dir())
    if local:
        raise ConfigError(f"model.name_or_path={s!r}: no such folder (a hub id looks like 'Qwen/Qwen2.5-VL-3B-Instruct')")
    return s


def _from_pretrained(loader: Any, name: str, **kwargs: Any) -> Any:
    try:
        return loader.from_pretrained(name, **kwargs)
    except OSError as e:  # not on the hub, hub unreachable, or files missing from the folder
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model.name_or_path={name!r} could not be loaded: {first}") from None


def load_processor(name_or_path: str | Path, min_pixels: int, max_pixels: int):
    from transformers import AutoProcessor

    processor = _from_pretrained(AutoProcessor, check_model_source(name_or_path, "processor"))
    set_pixel_limits(processor, min_pixels, max_pixels)
    return processor


def load_model_config(name_or_path: str | Path) -> Any:
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, check_model_source(name_or_path))


def set_pixel_limits(processor: Any, min_pixels: int, max_pixels: int) -> None:
    """Set the image processor's resize bounds (transformers 5 keeps them in ``size``)."""
    ip = processor.image_processor
    ip.size = {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if hasattr(ip, name):
            setattr(ip, name, int(value))


def quantization_config(cfg: ModelConfig):
    """4-bit NF4 with double quantisation, computing in ``cfg.dtype``.

    Built through the typed constructor so a misspelt argument fails loudly
    (the guide misspelt the compute-dtype argument, which was silently ignored: float32 compute).
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=DTYPES[cfg.dtype], bnb_4bit_quant_storage=DTYPES[cfg.dtype])


def vision_module_names(model: torch.nn.Module) -> set[str]:
    """Qualified names of every module inside the vision tower (and its merger)."""
    from .fast import vision_tower

    tower = vision_tower(model)
    if tower is None:
        return set()
    ids = {id(m) for m in tower.modules()}
    return {name for name, m in model.named_modules() if id(m) in ids}


def load_base_model(cfg: ModelConfig, device_map: Any = None, quantize: bool | None = None):
    from transformers import AutoModelForImageTextToText

    quantize = cfg.method == "qlora" if quantize is None else quantize
    kwargs: dict[str, Any] = {"dtype": DTYPES[cfg.dtype], "attn_implementation": cfg.attn_implementation}
    if quantize:
        kwargs["quantization_config"] = quantization_config(cfg)
        # 4-bit weights are quantised on the device they load to: in a data-parallel run each process
        # loads onto its own GPU (LOCAL_RANK, set by Lightning, torchrun and SLURM launchers).
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        kwargs["device_map"] = device_map or {"": local if torch.cuda.is_available() else "cpu"}
    elif device_map is not None:
        kwargs["device_map"] = device_map
    return _from_pretrained(AutoModelForImageTextToText, check_model_source(cfg.name_or_path), **kwargs)


def lora_targets(model: torch.nn.Module, suffixes: list[str], include_vision: bool) -> list[str]:
    """Full module names of the Linear layers to adapt; vision tower excluded unless trained."""
    skip = set() if include_vision else vision_module_names(model)
    all_linear = suffixes == ["all-linear"]
    names = []
    for name, module in model.named_modules():
        if name in skip or "lm_head" in name:
            continue
        is_linear = isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")
        if is_linear and (all_linear or name.rsplit(".", 1)[-1] in suffixes):
            names.append(name)
    if not names:
        raise ValueError(f"lora.target_modules {suffixes} matched no Linear layer of {type(model).__name__}")
    return names


def prepare_for_training(model: torch.nn.Module, config: Config) -> torch.nn.Module:
    """Freeze, attach adapters, enable checkpointing. Returns the (possibly PEFT-wrapped) model."""
    mcfg = config.model
    from .kernels import apply_kernels

    apply_kernels(model, mcfg.kernels)
    if mcfg.fast_path:
        from .fast import align_vision_mlp, enable_fast_vision_attention

        enable_fast_vision_attention(model)
        # A trained tower keeps its published shapes (adapters on it, optimizer state); FSDP shards
        # parameters after this point and gathers its own state dicts, so it keeps them too.
        if not mcfg.train_vision and config.train.strategy != "fsdp":
            align_vision_mlp(model)
    if mcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if mcfg.method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        if mcfg.gradient_checkpointing:
            model.enable_input_require_grads()
        lcfg = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                          target_modules=lora_targets(model, config.lora.target_modules, mcfg.train_vision),
                          bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, lcfg)
        from .fast import lora_inputs_in_compute_dtype, uses_autocast

        if mcfg.fast_path and uses_autocast(config.train.precision):
            lora_inputs_in_compute_dtype(model)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
        if not mcfg.train_vision:
            vision = vision_module_names(model)
            for name, module in model.named_modules():
                if name in vision:
                    for p in module.parameters(recurse=False):
                        p.requires_grad_(False)
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def load_for_inference(run_dir: str | Path, which: str = "best", config: Config | None = None, base_only: bool = False,
                       device: str | torch.device | None = None):
    """Load the model and processor saved in a run folder (``best`` or ``last``), or its base model.

    Returns:
        (model, processor, config) with the model in eval mode.
    """
    from ..training.checkpoints import read_run_config
    from .fast import align_vision_mlp

    run_dir = Path(run_dir)
    config = config or read_run_config(run_dir)
    ckpt = run_dir / which
    if not (ckpt / "COMPLETE").exists():
        raise FileNotFoundError(f"{ckpt} is missing or incomplete; has the run finished a validation or an epoch?")
    processor = load_processor(ckpt, config.data.min_pixels, config.data.max_pixels)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_cfg = config.model
    if device.type == "cpu" and dtype_cfg.dtype != "float32":
        # bf16 matmuls on CPU are slow and imprecise; inference on CPU runs in float32.
        dtype_cfg = ModelConfig(**{**dtype_cfg.__dict__, "dtype": "float32"})
    if config.model.method == "full" and not base_only:
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=DTYPES[dtype_cfg.dtype],
                                                            attn_implementation=dtype_cfg.attn_implementation)
        align_vision_mlp(model)
    else:
        # Adapters are applied to a non-quantised base for inference: QLoRA runs too, so
        # predictions match what a merged export gives.
        model = load_base_model(dtype_cfg, quantize=False)
        if base_only or not config.model.train_vision:  # adapters on the tower need its published shapes
            align_vision_mlp(model)
        if not base_only:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, ckpt)
    model.to(device).eval()
    return model, processor, config
