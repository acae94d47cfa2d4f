"""Optional fused GPU kernels for training: liger-kernel's Triton RMSNorm, SwiGLU and rotary embeddings.

``model.kernels: liger`` swaps these modules of an already loaded Qwen-VL model for Liger's fused
versions (the element-wise work that the profiles in bench/results show taking ~40% of GPU time,
and whose unfused intermediates take activation memory). The loss stays ours (logits only on the
answer), so Liger's fused cross-entropy is not used. CUDA only; the default is ``none``.

Liger's rotary patch replaces a function of the transformers module, so it applies to every model
of that family in the process from then on.
"""

from __future__ import annotations

import torch

from ..config import ConfigError

LIGER_PATCHES = {
    "qwen2_vl": "apply_liger_kernel_to_qwen2_vl",
    "qwen2_5_vl": "apply_liger_kernel_to_qwen2_5_vl",
    "qwen3_vl": "apply_liger_kernel_to_qwen3_vl",
}


def apply_kernels(model: torch.nn.Module, kernels: str) -> bool:
    """Patch ``model`` (before adapters are attached) with the chosen kernels. Returns whether it did."""
    if kernels == "none":
        return False
    if kernels != "liger":
        raise ConfigError(f"model.kernels must be 'none' or 'liger', got {kernels!r}")
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
    getattr(liger, LIGER_PATCHES[model_type])(rope=True, rms_norm=True, cross_entropy=False,
                                              fused_linear_cross_entropy=False, model=model)
    return True
