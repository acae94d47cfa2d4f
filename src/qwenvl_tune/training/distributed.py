"""Fabric strategies as the recipe uses them: DDP and FSDP set up for Qwen-VL checkpoints.

DDP (``--train.strategy ddp``): buffers are not broadcast before every forward pass (Qwen-VL's only
buffers are rotary frequencies, computed identically on every rank), and gradients live in DDP's
communication buckets instead of being copied there after each backward pass.

FSDP (``--train.strategy fsdp``):
- one FSDP unit per module class the checkpoint marks as not to be split (``_no_split_modules``: the
  decoder layers and vision blocks), so only one layer's full weights exist on a GPU at a time;
- a leaf module whose weights have another dtype than the model's (PEFT keeps LoRA adapters in
  float32 on a bf16 base) becomes its own unit, as FSDP flattens one dtype per unit;
- the trainer state (weights, optimizer, scheduler) is saved sharded, each rank writing its part,
  so no rank gathers the optimizer state of a 7B model; the Hugging Face weights in each checkpoint
  folder are gathered on rank 0 (``gathered_state_dict``) so they load anywhere without FSDP.

Precision: FSDP keeps the sharded weights in the dtype they were loaded in and computes in the
precision's dtype. ``--model.dtype float32 --train.precision bf16-mixed`` is classic mixed precision
(float32 master weights, bf16 compute); the default ``bfloat16`` weights halve the memory and update
the weights in bf16.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError


class NoSplitWrapPolicy:
    """FSDP auto-wrap policy resolved from the model itself (callable with FSDP's policy signature)."""

    def __init__(self) -> None:
        self.classes: set[str] | None = None
        self.dtype: torch.dtype | None = None

    def _resolve(self, root: torch.nn.Module) -> None:
        names: set[str] = set()
        for m in root.modules():
            names.update(getattr(m, "_no_split_modules", None) or [])
        if not names:
            raise ConfigError(f"train.strategy=fsdp: {type(root).__name__} names no layer classes to shard by "
                              f"(_no_split_modules)")
        self.classes = names
        counts: Counter = Counter()
        for p in root.parameters():
            counts[p.dtype] += p.numel()
        self.dtype = counts.most_common(1)[0][0] if counts else None

    def __call__(self, module: torch.nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        if self.classes is None:
            self._resolve(module)  # FSDP asks about the root first
        if recurse:
            return True
        if type(module).__name__ in self.classes:
            return True
        own = list(module.parameters(recurse=False))
        return bool(own) and next(module.children(), None) is None and any(p.dtype != self.dtype for p in own)


def build_strategy(t: Any) -> Any:
    """The ``strategy`` argument for ``lightning_fabric.Fabric`` from the train config."""
    if t.strategy == "ddp":
        from lightning_fabric.strategies import DDPStrategy

        return DDPStrategy(broadcast_buffers=False, gradient_as_bucket_view=True)
    if t.strategy != "fsdp":
        return t.strategy
    from lightning_fabric.strategies import FSDPStrategy

    # use_orig_params (Fabric's default) lets frozen and trainable weights share a unit.
    return FSDPStrategy(auto_wrap_policy=NoSplitWrapPolicy(), state_dict_type="sharded")


def fabric_is_fsdp(fabric: Any) -> bool:
    from lightning_fabric.strategies import FSDPStrategy

    return isinstance(fabric.strategy, FSDPStrategy)


def gathered_state_dict(fabric: Any, module: Any, prefix: str = "model.") -> dict[str, torch.Tensor] | None:
    """Under FSDP: the full (unsharded) weights of the wrapped ``TrainStep``'s model, on rank 0's CPU.

    Collective: every rank must call it. Returns None on the other ranks, and None (nothing to
    gather) for strategies that keep whole weights on every rank.
    """
    if not fabric_is_fsdp(fabric):
        return None
    return full_state_dict(module._forward_module, fabric.is_global_zero, prefix)


def full_state_dict(root: torch.nn.Module, is_main: bool, prefix: str = "") -> dict[str, torch.Tensor] | None:
    """Gather an FSDP root's weights whole onto the main rank's CPU, keys without FSDP's wrapper names."""
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT,
                              FullStateDictConfig(offload_to_cpu=True, rank0_only=True)):
        full = root.state_dict()
    if not is_main:
        return None
    return {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}


WRAPPER_NAMES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    for w in WRAPPER_NAMES:
        name = name.replace(w, "")
    return name


def save_weights(model: Any, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """``model.save_pretrained`` (HF weights or PEFT adapter), optionally with gathered ``state_dict`` tensors.

    PEFT picks adapter weights by walking the model's module names, which under FSDP carry FSDP's wrapper
    names while a gathered state dict does not, so it would save an empty adapter; here the adapter
    entries are picked by the (cleaned) names of the trainable parameters instead, and renamed with
    PEFT's own key mapping, giving the same file as an unsharded save.
    """
    if state_dict is None:
        model.save_pretrained(folder, safe_serialization=True)
        return
    peft_config = getattr(model, "peft_config", None)
    if not peft_config:
        model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
        return
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = model.active_adapter
    trainable = {clean_name(n) for n, p in model.named_parameters() if p.requires_grad}
    rename = type(model.base_model)._remove_adapter_name_from_key
    adapter = {rename(k, name): v.contiguous() for k, v in state_dict.items() if k in trainable}
    if not adapter:
        raise RuntimeError("no adapter weights found in the gathered state dict")
    save_file(adapter, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg = peft_config[name]
    mode, cfg.inference_mode = cfg.inference_mode, True  # as PEFT writes it
    try:
        cfg.save_pretrained(folder)
    finally:
        cfg.inference_mode = mode
