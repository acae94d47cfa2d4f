"""Optional fused GPU kernels for training: liger-kernel's Triton RMSNorm, SwiGLU and rotary embeddings.

``model.kernels: liger`` swaps these modules of an already loaded Qwen-VL model for Liger's fused
versions (the element-wise work that the profiles in bench/results show taking ~40% of GPU time,
and whose unfused intermediates take activation memory). The loss stays ours (logits only on the
answer, chunked), so Liger's fused cross-entropy is not used. CUDA only.

The default, ``auto``, uses Liger where it can (a CUDA GPU, a supported family, the package
installed) and says so; else it trains without, and says how to get it.

Liger's rotary patch replaces a function of the transformers module, so it applies to every model
of that family in the process from then on.
"""

from __future__ import annotations

import importlib.util

import torch

from ..config import ConfigError

LIGER_PATCHES = {
    "qwen2_vl": "apply_liger_kernel_to_qwen2_vl",
    "qwen2_5_vl": "apply_liger_kernel_to_qwen2_5_vl",
    "qwen3_vl": "apply_liger_kernel_to_qwen3_vl",
}


def resolve_kernels(kernels: str, model_type: str | None, cuda: bool | None = None) -> tuple[str, str]:
    """``auto`` -> ``liger`` or ``none`` for this machine and model family, with the reason in words."""
    if kernels != "auto":
        return kernels, "asked for"
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda:
        return "none", "no CUDA GPU"
    if model_type not in LIGER_PATCHES:
        return "none", f"no Liger kernels for {model_type!r}"
    if importlib.util.find_spec("liger_kernel") is None:
        return "none", "liger-kernel is not installed; pip install 'qwenvl-tune[kernels]' for it (3B, batch 2: 3.7 GiB less memory)"
    return "liger", "CUDA GPU and liger-kernel found"


def apply_kernels(model: torch.nn.Module, kernels: str, rms_norm: bool = True) -> bool:
    """Patch ``model`` (before adapters are attached) with the chosen kernels. Returns whether it did."""
    if kernels == "none":
        return False
    if kernels != "liger":
        raise ConfigError(f"model.kernels must be 'auto', 'none' or 'liger', got {kernels!r}")
    if not torch.cuda.is_available():
        raise ConfigError("model.kernels=liger runs Triton kernels on a CUDA GPU; none is available here "
                          "(use model.kernels=none)")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LIGER_PATCHES:
        raise ConfigError(f"model.kernels=liger supports {sorted(LIGER_PATCHES)}, not {model_type!r}")
    try:
        import liger_kernel.transformers as liger
    except ImportError:
        raise ConfigError("model.kernels=liger needs the liger-kernel package: pip install 'qwenvl-tune[kernels]'") \
            from None
    getattr(liger, LIGER_PATCHES[model_type])(rope=True, rms_norm=rms_norm, cross_entropy=False,
                                              fused_linear_cross_entropy=False, model=model)
    return True
