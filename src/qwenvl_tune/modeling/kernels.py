"""Fused GPU kernels for training: PyTorch's own fused RMSNorm, and liger-kernel's Triton SwiGLU and rotary
embeddings (and its RMSNorm where PyTorch has none).

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
import inspect

import torch
import torch.nn.functional as F

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


def apply_kernels(model: torch.nn.Module, kernels: str, rms_norm: bool = True, language_model: bool = True,
                  vision: bool = True) -> bool:
    """Patch ``model`` (before adapters are attached) with the chosen kernels. Returns whether it did.
    ``language_model=False`` leaves out Liger's SwiGLU and rotary, ``vision=False`` its vision-tower LayerNorm
    (Qwen2-VL): compiled layers and blocks fuse that work themselves."""
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
    patch = getattr(liger, LIGER_PATCHES[model_type])
    off = {} if language_model else {"rope": False, "swiglu": False}  # else Liger's own choice per family
    if not vision and "layer_norm" in inspect.signature(patch).parameters:
        off["layer_norm"] = False
    patch(rms_norm=rms_norm, cross_entropy=False, fused_linear_cross_entropy=False, model=model, **off)
    return True


def native_rms_norm_available() -> bool:
    """Whether this PyTorch has a fused CUDA RMSNorm (forward and backward in one kernel each) behind
    ``torch.nn.functional.rms_norm`` (PyTorch >= 2.8)."""
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key("aten::_fused_rms_norm", "CUDA"))
    except (AttributeError, RuntimeError):
        return False


class FusedRMSNorm(torch.nn.Module):
    """The RMSNorm of Qwen's language models and Qwen2.5-VL's vision tower (``weight * x / rms(x)``, statistics in
    float32), through ``torch.nn.functional.rms_norm``: on CUDA one fused kernel each way, launched from C++.

    Liger's Triton RMSNorm computes the same with ~100-250 us of Python and launch work per call on the host
    (bench/results: 137 calls a step with the 3B model), which the host-bound batch-2 step waits on. The module
    keeps the published one's ``weight`` parameter (same state-dict key) and epsilon. The product is taken in
    float32 and rounded once (the library rounds the normalised input to the weight's dtype first, then again
    after the product: values differ in the last bf16 bit). Autocast is kept off for the call, as the library's
    module computes in the input's dtype and autocast would run ``rms_norm`` in float32.
    """

    def __init__(self, source: torch.nn.Module):
        super().__init__()
        self.weight = source.weight
        self.variance_epsilon = float(getattr(source, "variance_epsilon", getattr(source, "eps", 1e-6)))
        self._shape = (self.weight.shape[-1],)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.dtype != self.weight.dtype:  # the library's mixed-dtype arithmetic, step by step
            h = hidden_states.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return self.weight * h.to(hidden_states.dtype)
        with torch.autocast(hidden_states.device.type, enabled=False):
            return F.rms_norm(hidden_states, self._shape, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{self._shape[0]}, eps={self.variance_epsilon}"


# The library's RMSNorm classes of the supported families: x * rsqrt(mean(x^2) + eps) * weight, nothing else
# (Gemma-style 1 + weight or other variants are not in this list and are never swapped).
RMS_NORM_CLASSES = ("Qwen2RMSNorm", "Qwen2_5_VLRMSNorm", "Qwen2VLRMSNorm", "Qwen3VLTextRMSNorm", "Qwen3RMSNorm")


def _is_plain_rms_norm(module: torch.nn.Module) -> bool:
    """One of the library's RMSNorm classes, or Liger's with the same arithmetic (no weight offset, Llama-style
    casting): Liger's patch replaces the library's class in its module for the whole process, so a model loaded
    after any earlier Liger patch (TRL's ``use_liger_kernel``, a user's own call) is built with Liger's class."""
    if not isinstance(getattr(module, "weight", None), torch.nn.Parameter):
        return False
    name = type(module).__name__
    if name in RMS_NORM_CLASSES:
        return True
    return (name == "LigerRMSNorm" and float(getattr(module, "offset", 1.0)) == 0.0
            and getattr(module, "casting_mode", None) == "llama")


def use_fused_rms_norm(model: torch.nn.Module) -> int:
    """Swap every plain RMSNorm module (``_is_plain_rms_norm``) for ``FusedRMSNorm``. Returns how many."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _is_plain_rms_norm(child):
                setattr(parent, name, FusedRMSNorm(child))
                swapped += 1
    return swapped
