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


# Rows of a GEMM operand start on 16-byte boundaries, as Hopper's TMA-based kernels need, when the
# width is a multiple of 8 (bf16/fp16; 4 would do for float32).
ALIGN = 8
_MLP_IN = ("gate_proj", "up_proj", "fc1", "linear_fc1")
_MLP_OUT = ("down_proj", "fc2", "linear_fc2")


def vision_tower(model: torch.nn.Module) -> torch.nn.Module | None:
    """The model's vision tower (``model.model.visual`` in transformers 5, ``model.visual`` before), through a PEFT wrapper."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    for owner in (getattr(model, "model", None), model):
        if owner is not None and hasattr(owner, "visual"):
            return owner.visual
    return None


def _zero_at_zero(act: Any) -> bool:
    try:
        return bool(act(torch.zeros(2)).eq(0).all())
    except Exception:  # noqa: BLE001 - an activation we cannot evaluate is not padded
        return False


def _pad_rows(t: torch.Tensor, extra: int, dim: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def align_vision_mlp(model: torch.nn.Module, multiple: int = ALIGN) -> int:
    """Zero-pad each vision-tower MLP whose hidden width is not a multiple of ``multiple``.

    The MLP computes ``out(act(in(x)) [* up(x)])``. Padding the input projections with zero rows
    and the output projection with zero columns adds hidden units whose pre-activation is 0;
    the activations used by Qwen's towers (SiLU, GELU variants) give act(0) = 0, so each padded
    unit contributes exactly zero, and its gradients are zero too. Only plain ``nn.Linear``
    layers are padded (not quantised or adapter-wrapped ones), and only when act(0) == 0 is
    checked. ``state_dict()`` returns, and ``load_state_dict`` accepts, the published shapes,
    so saved checkpoints and exports are unchanged.

    Returns:
        The number of MLPs padded (0 when every width is already aligned: Qwen2-VL, Qwen3-VL).
    """
    tower = vision_tower(model)
    if tower is None:
        return 0
    padded = 0
    for mlp in tower.modules():
        ins = [(n, getattr(mlp, n)) for n in _MLP_IN if type(getattr(mlp, n, None)) is torch.nn.Linear]
        outs = [(n, getattr(mlp, n)) for n in _MLP_OUT if type(getattr(mlp, n, None)) is torch.nn.Linear]
        if not ins or len(outs) != 1:
            continue
        width = outs[0][1].in_features
        act = getattr(mlp, "act_fn", None) or getattr(mlp, "act", None)
        if (width % multiple == 0 or any(lin.out_features != width for _, lin in ins)
                or act is None or not _zero_at_zero(act)):
            continue
        extra = -width % multiple
        for _, lin in ins:
            lin.weight = torch.nn.Parameter(_pad_rows(lin.weight.data, extra, 0), requires_grad=lin.weight.requires_grad)
            if lin.bias is not None:
                lin.bias = torch.nn.Parameter(_pad_rows(lin.bias.data, extra, 0), requires_grad=lin.bias.requires_grad)
            lin.out_features = width + extra
        out = outs[0][1]
        out.weight = torch.nn.Parameter(_pad_rows(out.weight.data, extra, 1), requires_grad=out.weight.requires_grad)
        out.in_features = width + extra
        _keep_published_shapes(mlp, [n for n, _ in ins], outs[0][0], width, extra)
        padded += 1
    return padded


def _keep_published_shapes(mlp: torch.nn.Module, ins: list[str], out: str, width: int, extra: int) -> None:
    """State-dict hooks that cut the padding off on save and add it back on load.

    They touch only tensors of exactly the padded (or published) shape, so other views of the
    weights (FSDP's flat shards, empty placeholders on non-saving ranks) pass through unchanged.
    """
    wide = width + extra

    def keys(prefix):
        for name in ins:
            yield f"{prefix}{name}.weight", 0
            yield f"{prefix}{name}.bias", 0
        yield f"{prefix}{out}.weight", 1

    def unpad(module, state_dict, prefix, local_metadata):
        for key, dim in keys(prefix):
            t = state_dict.get(key)
            if t is not None and t.dim() > dim and t.shape[dim] == wide:
                state_dict[key] = t.narrow(dim, 0, width).contiguous()

    def pad(module, state_dict, prefix, *args):
        for key, dim in keys(prefix):
            t = state_dict.get(key)
            if t is not None and t.dim() > dim and t.shape[dim] == width:
                state_dict[key] = _pad_rows(t, extra, dim)

    mlp.register_state_dict_post_hook(unpad)
    mlp.register_load_state_dict_pre_hook(pad)


def uses_autocast(precision: str) -> bool:
    """Whether a Lightning precision setting runs the model under autocast."""
    return str(precision).endswith("-mixed") or str(precision) in ("16", "bf16")


def lora_inputs_in_compute_dtype(model: torch.nn.Module) -> int:
    """Let each LoRA branch take its input as it comes (bf16), for training under autocast.

    PEFT casts a LoRA layer's input to the adapter weights' dtype (float32, their master copy),
    and autocast casts it straight back to bf16 for the product: full-size casts, forward and
    backward, in every adapted layer, that change no value. (PEFT's bitsandbytes layers already
    skip the cast under autocast.) Without autocast the dtypes would not match, so this is only
    for mixed precision. Returns the number of LoRA layers changed.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.cast_input_dtype_enabled = False
    return len(layers)


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
