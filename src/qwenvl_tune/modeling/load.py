"""Checkpoint -> (model, processor) for LoRA, QLoRA or full fine-tuning, and back from a run folder.

The model class and processor come from the checkpoint (``AutoModelForImageTextToText``,
``AutoProcessor``), so Qwen2-VL, Qwen2.5-VL and Qwen3-VL load the same way,
from a hub id or a local folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config import Config, ConfigError, ModelConfig

if TYPE_CHECKING:
    from .fastpath import FastPath


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
        if kind == "model" and not (p / "config.json").is_file() and (p / "adapter_config.json").is_file():
            # a run's best/ or last/ (or any PEFT adapter): the weights it adapts are elsewhere
            base = json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path") or "its base"
            raise ConfigError(f"model.name_or_path={s!r} holds a LoRA adapter, not a model: train from its base "
                              f"model ({base}), or from the adapter merged into it (qwenvl-tune export --run RUN "
                              f"--merge --out FOLDER, then --model FOLDER)")
        if not any((p / f).is_file() for f in FOLDER_FILES[kind]):
            raise ConfigError(f"model.name_or_path={s!r}: the folder holds no {' or '.join(FOLDER_FILES[kind])}, so "
                              f"it is not a Hugging Face {kind} folder")
        return s
    local = s.startswith((".", "/", "~")) or len(p.parts) > 2 or p.exists() or (len(p.parts) == 2 and Path(p.parts[0]).is_dir())
    if local:
        raise ConfigError(f"model.name_or_path={s!r}: no such folder (a hub id looks like 'Qwen/Qwen2.5-VL-3B-Instruct')")
    return s


def hub_offline() -> bool:
    """Whether the user said there is no model hub (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick attempt to open a connection to the hub (``HF_ENDPOINT`` if set), in ``timeout`` seconds at most.

    Without it an unreachable hub is retried by the download client for minutes before anything fails.
    """
    import socket
    import threading
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    ok: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=attempt, daemon=True)  # name resolution has no timeout of its own
    t.start()
    t.join(timeout)
    return bool(ok)


def _from_pretrained(loader: Any, name: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained`` that fails within seconds, with what to do, when the hub cannot be reached."""
    def fail(why: str) -> ConfigError:
        return ConfigError(f"model.name_or_path={name!r} could not be loaded: {why}")

    if Path(name).is_dir():
        try:
            return loader.from_pretrained(name, **kwargs)
        except OSError as e:  # files missing from the folder
            raise fail(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None
    try:  # a hub id already in the local cache needs no network
        return loader.from_pretrained(name, local_files_only=True, **kwargs)
    except OSError:
        pass
    hint = "pass --model with a local checkpoint folder"
    if hub_offline():
        raise fail(f"it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {hint}")
    if not hub_reachable():
        raise fail(f"the model hub cannot be reached and it is not in the local cache; {hint}, or set "
                   f"HF_HUB_OFFLINE=1 to stop trying the hub")
    try:
        return loader.from_pretrained(name, **kwargs)
    except OSError as e:  # not on the hub, or files missing
        raise fail(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None


def require_extras(config: Config) -> None:
    """Fail at once, in one line naming the ``pip install``, when the config needs an optional package
    that is not installed (before any run folder is made or weights load)."""
    import importlib.util

    from ..errors import MissingExtraError

    if config.model.method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        raise MissingExtraError("bitsandbytes", "qlora", "model.method=qlora (4-bit base weights)")
    if config.model.kernels == "liger" and importlib.util.find_spec("liger_kernel") is None:
        raise MissingExtraError("liger-kernel", "kernels", "model.kernels=liger")


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
    from .align import vision_tower

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


def prepare_for_training(model: torch.nn.Module, config: Config, fast: "FastPath | None" = None) -> torch.nn.Module:
    """Apply the fast path's model-side tricks, freeze, attach adapters, enable checkpointing.

    ``fast`` is the resolved fast path (the training recipe resolves it with the strategy and precision);
    by default it is resolved from the model settings alone. Returns the (possibly PEFT-wrapped) model.
    """
    from .fastpath import FastPath

    mcfg = config.model
    fast = fast or FastPath.resolve(mcfg, model.config)
    for line in fast.apply(model):
        if line.startswith("warning"):
            print(line)
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
