"""The fast training path. Each piece is numerically the plain path, computed with less waste.

1. Vision attention in one variable-length kernel call instead of one ``sdpa`` call per
   64-patch window (Qwen2.5-VL's window attention runs ~80 windows x 28 layers per page).
   It goes through transformers' registered-attention extension point
   (``AttentionInterface``), under a name containing "flash" so the vision tower hands it
   ``cu_seqlens`` in one call; no library class is patched.
2. Logits only where the loss needs them: the language-model head runs on the supervised
   positions (the answer), not on every prompt and image position, through the model's
   own ``logits_to_keep`` argument, a chunk of positions at a time; the loss is the same
   token-mean cross-entropy.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..data.collate import IGNORE_INDEX

VARLEN_ATTENTION = "qvt_flash_varlen"

try:  # PyTorch >= 2.10
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # pragma: no cover - older PyTorch
    _varlen_attn = None


def _varlen_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
                 scale: float | None) -> torch.Tensor:
    params = inspect.signature(_varlen_attn).parameters
    cu = cu.to(torch.int32)
    kwargs = {"scale": scale} if "scale" in params else {}
    if "is_causal" in params:
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
    """Route the vision tower's attention through the varlen kernel. Returns whether a tower was found."""
    register()
    config = getattr(model, "config", None)
    vision = getattr(config, "vision_config", None)
    if vision is None:
        return False
    vision._attn_implementation = VARLEN_ATTENTION
    return True


def prefer_flash_sdpa(enabled: bool = True) -> None:
    """Leave the cuDNN backend out of scaled-dot-product attention (set once, at the training entry point).

    Measured on an H100 (bench/results): cuDNN attention costs ~2 ms of host time per call, so a
    batch-1 step of a 36-layer model waits on the CPU; the flash and memory-efficient kernels
    compute the same attention with far less overhead. It is a process-wide switch rather than
    a scoped one because gradient checkpointing recomputes attention during backward, and the
    recomputation must use the same kernel as the forward pass.
    """
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(not enabled)


def with_loader_indices(inputs: dict[str, Any], batch: dict[str, Any], positions: bool = True) -> dict[str, Any]:
    """The model inputs plus what the data loader precomputed: the vision tower's ``image_*`` index
    tensors and, with ``positions``, the rope position ids.

    With the position ids the padding mask is dropped: training batches are right-padded, and
    causal attention never looks past a sample's last token, so the mask changes nothing for real
    tokens (padding carries no label). Without it the language model runs plain causal flash
    attention instead of a masked kernel, and builds no mask. (Without the loader's ids the model
    derives rope positions from the mask, so it stays.)
    """
    out = {**inputs, **{k: v for k, v in batch.items() if k.startswith("image_") and k not in inputs}}
    if positions and "position_ids" in batch:
        out["position_ids"] = batch["position_ids"]
        out.pop("attention_mask", None)
    return out


# Rows of the language-model head computed at once by ``answer_only_loss``: 256 answer positions of a
# 152k vocabulary are 150 MB of float32 logits, instead of several GB for a whole batch.
LOSS_CHUNK = 256


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def answer_only_loss(model: torch.nn.Module, inputs: dict[str, Any], labels: torch.Tensor,
                     positions: torch.Tensor | None = None, chunked: bool = True) -> torch.Tensor:
    """Token-mean cross-entropy over supervised tokens, with logits computed only where needed.

    Equal to the model's own loss, which projects every position onto the vocabulary and
    then ignores the -100 ones. Positions are the union over the batch of those whose next
    token is supervised, passed as a 1-D ``logits_to_keep`` index (supported by every
    transformers 5 release); the collator computes them on the CPU (``answer_positions``),
    else they are found here.

    ``chunked``: the head's input is taken at the head (a pre-hook hands the head an empty
    slice, so the forward pass builds no logits), and logits plus cross-entropy are computed
    ``LOSS_CHUNK`` rows at a time, each chunk recomputed in the backward pass rather than kept:
    the full answer-by-vocabulary logits, their float32 copy and their gradient never exist at
    once, which lowers peak memory by about 1 GB per sample. The head must be callable outside
    the model's forward pass, which FSDP's sharded root does not allow (``chunked=False`` there).
    """
    shifted = labels[:, 1:]
    if positions is None:
        positions = (shifted != IGNORE_INDEX).any(dim=0).nonzero().flatten()
    targets = shifted[:, positions]
    if not chunked:
        out = model(**inputs, logits_to_keep=positions)
        return F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
    head = model.get_output_embeddings()
    taken: list[torch.Tensor] = []

    def take(module: torch.nn.Module, args: tuple) -> tuple:
        taken.append(args[0])
        return (args[0][..., :0, :], *args[1:])

    handle = head.register_forward_pre_hook(take)
    try:
        model(**inputs, logits_to_keep=positions)
    finally:
        handle.remove()
    hidden, flat = taken[-1].flatten(0, 1), targets.flatten()
    total = sum(checkpoint(_chunk_loss, head, hidden[s:s + LOSS_CHUNK], flat[s:s + LOSS_CHUNK], use_reentrant=False)
                for s in range(0, len(flat), LOSS_CHUNK))
    return total / (flat != IGNORE_INDEX).sum()
