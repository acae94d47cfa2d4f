"""Attention kernels for training: the vision tower's window attention as one variable-length call, and
the choice of PyTorch's scaled-dot-product backends.

Qwen2.5-VL's window attention runs ~80 windows x 28 layers per page as separate ``sdpa`` calls; here it
goes through transformers' registered-attention extension point (``AttentionInterface``), under a name
containing "flash" so the tower hands it ``cu_seqlens`` in one call, and is switched on for the vision
sub-model only with ``set_attn_implementation``. No library class is patched.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator

import torch
import torch.nn.functional as F

VARLEN_ATTENTION = "qvt_flash_varlen"

try:  # PyTorch >= 2.10
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # pragma: no cover - older PyTorch
    _varlen_attn = None


# which keyword arguments this PyTorch's varlen_attn takes (read once: not in a compiled graph's path)
_VARLEN_PARAMS = frozenset(inspect.signature(_varlen_attn).parameters) if _varlen_attn is not None else frozenset()


def _varlen_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
                 scale: float | None) -> torch.Tensor:
    cu = cu.to(torch.int32)
    kwargs = {"scale": scale} if "scale" in _VARLEN_PARAMS else {}
    if "is_causal" in _VARLEN_PARAMS:
        kwargs["is_causal"] = False
    return _varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                             cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None,
                             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Non-causal attention over packed sequences delimited by ``cu_seq_lens_q``.

    Inputs are (1, heads, tokens, head_dim); the output is (1, tokens, heads, head_dim),
    as transformers' attention functions return. On CUDA one ``varlen_attn`` kernel;
    elsewhere (CPU tests) one ``sdpa`` per sequence, the plain path's arithmetic.
    """
    if cu_seq_lens_q is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, dim)
    if q.is_cuda and _varlen_attn is not None and q.dtype in (torch.float16, torch.bfloat16):
        max_len = int(max_length_q) if max_length_q is not None else int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max())
        out = _varlen_cuda(q, k, v, cu_seq_lens_q, max_len, scaling)
    else:
        bounds = cu_seq_lens_q.tolist()
        outs = []
        for s, e in zip(bounds[:-1], bounds[1:]):
            qs, ks, vs = (t[s:e].transpose(0, 1) for t in (q, k, v))
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, scale=scaling).transpose(0, 1))
        out = torch.cat(outs, dim=0)
    return out.unsqueeze(0), None


def register() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    return VARLEN_ATTENTION


def enable_fast_vision_attention(model: torch.nn.Module) -> bool:
    """Route the vision tower's attention through the varlen kernel. Returns whether a tower was found.

    Set on the vision configs themselves (the model's and its tower's, which may be a copy), which the tower's
    attention reads at each call, rather than through ``set_attn_implementation``: from transformers 5.25 that
    method takes any implementation whose name contains "flash" for a Hugging Face hub kernel and tries to download
    it, a registered function included ("Could not find the currently requested flash attention implementation").
    """
    from .align import vision_tower

    register()
    vision_config = getattr(getattr(model, "config", None), "vision_config", None)
    if vision_config is None:
        return False
    tower = vision_tower(model)
    for config in (vision_config, getattr(tower, "config", None)):
        if config is not None:
            config._attn_implementation = VARLEN_ATTENTION
    return model.config.vision_config._attn_implementation == VARLEN_ATTENTION


@contextlib.contextmanager
def flash_sdpa(enabled: bool = True) -> Iterator[None]:
    """Leave the cuDNN backend out of scaled-dot-product attention for the duration (restored after).

    Measured on an H100 (bench/results): cuDNN attention costs ~2 ms of host time per call, so a
    batch-1 step of a 36-layer model waits on the CPU; the flash and memory-efficient kernels
    compute the same attention with far less overhead. It is a process-wide switch rather than a
    per-call one because gradient checkpointing recomputes attention during backward, and the
    recomputation must use the same kernel as the forward pass.
    """
    if not (enabled and torch.cuda.is_available()):
        yield
        return
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def _library_vision_rope(attn: torch.nn.Module) -> Any:
    """The rotary function of the module's family (``apply_rotary_pos_emb_vision``), or None."""
    import sys

    return getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb_vision", None)


def _rope_liger(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Liger's Triton rotary kernel: one pass over q and k (copied contiguous first, never written in place),
    computing in float32 from the bf16 values as the library's function does, stored back in q's dtype."""
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    q4, k4 = (t.clone(memory_format=torch.contiguous_format) for t in (q, k))  # Liger writes in place
    # (tokens, heads, dim) -> the (1, heads, tokens, dim) view Liger expects; cos/sin: (1, tokens, dim)
    qe, ke = liger_rotary_pos_emb(q4.unsqueeze(0).transpose(1, 2), k4.unsqueeze(0).transpose(1, 2),
                                  cos.float().unsqueeze(0), sin.float().unsqueeze(0))
    return qe.transpose(1, 2)[0], ke.transpose(1, 2)[0]


class FrozenVisionAttention(torch.nn.Module):
    """A frozen vision tower's attention: the published module's ``qkv`` and ``proj`` (the same parameters, so
    the same state-dict keys), the rotary embedding, and one variable-length attention call.

    Computes what the library's module computes with its varlen attention, with fewer passes over memory:
    ``rope="liger"`` applies the rotary embedding in one Triton kernel instead of the library's ~14 element-wise
    float32 operations per layer (they were ~8% of a training step's GPU time with Qwen2.5-VL-3B pages);
    ``rope="plain"`` calls the library's own ``apply_rotary_pos_emb_vision`` (the CPU tests compare the two
    modules exactly). Only for a tower that is not trained: the tower runs without autograd records.
    """

    def __init__(self, source: torch.nn.Module, rope: str = "plain"):
        super().__init__()
        self.qkv, self.proj = source.qkv, source.proj
        self.num_heads, self.scaling = source.num_heads, source.scaling
        self.rope = rope
        self._plain_rope = _library_vision_rope(source)

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, max_seqlen: Any = None,
                **kwargs: Any) -> torch.Tensor:
        if position_embeddings is None:
            raise ValueError("FrozenVisionAttention needs the tower's position_embeddings (cos, sin)")
        n = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).view(n, 3, self.num_heads, -1).unbind(1)  # (tokens, heads, dim) each
        cos, sin = position_embeddings
        if self.rope == "liger" and q.is_cuda:
            q, k = _rope_liger(q, k, cos, sin)
        else:
            q, k = self._plain_rope(q, k, cos, sin)
        out, _ = varlen_attention_forward(self, q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                          v.transpose(0, 1)[None], None, scaling=self.scaling,
                                          cu_seq_lens_q=cu_seqlens, max_length_q=max_seqlen)
        return self.proj(out[0].reshape(n, -1))


def swap_frozen_vision_attention(model: torch.nn.Module, rope: str = "plain") -> int:
    """Replace each vision block's attention by ``FrozenVisionAttention`` (Qwen2-VL, Qwen2.5-VL and Qwen3-VL
    towers: ``qkv`` + ``proj`` linear layers and the family's ``apply_rotary_pos_emb_vision``). Returns how many;
    0 when the tower has another layout (then it keeps the library's modules)."""
    from .align import vision_tower

    tower = vision_tower(model)
    if tower is None:
        return 0
    swapped = 0
    for block in getattr(tower, "blocks", []):
        attn = getattr(block, "attn", None)
        if (attn is None or isinstance(attn, FrozenVisionAttention)
                or not all(isinstance(getattr(attn, n, None), torch.nn.Module) for n in ("qkv", "proj"))
                or not hasattr(attn, "num_heads") or not hasattr(attn, "scaling")
                or _library_vision_rope(attn) is None):
            continue
        block.attn = FrozenVisionAttention(attn, rope)
        swapped += 1
    return swapped
