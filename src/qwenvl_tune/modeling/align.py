"""Hopper-aligned widths for the frozen vision tower's MLP (Qwen2.5-VL: 3420 -> 3424).

A 3420-wide bf16 row is not a multiple of 16 bytes, so cuBLAS runs those products on older kernels
at a third of the speed (bench/results/results.jsonl, run gemm_alignment). Zero-padding the hidden width computes
exactly the same function; checkpoints keep the published shapes.
"""

from __future__ import annotations

from typing import Any

import torch

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


def _vision_mlps(model: torch.nn.Module):
    """(module, input projections, output projection, hidden width) of each vision-tower MLP made of plain
    ``nn.Linear`` layers."""
    tower = vision_tower(model)
    for mlp in tower.modules() if tower is not None else ():
        ins = [(n, getattr(mlp, n)) for n in _MLP_IN if type(getattr(mlp, n, None)) is torch.nn.Linear]
        outs = [(n, getattr(mlp, n)) for n in _MLP_OUT if type(getattr(mlp, n, None)) is torch.nn.Linear]
        if ins and len(outs) == 1:
            yield mlp, ins, outs, outs[0][1].in_features


def vision_mlp_widths(model: torch.nn.Module) -> list[int]:
    """The hidden widths of the vision MLPs ``align_vision_mlp`` recognises (padded ones as padded)."""
    return [width for _, _, _, width in _vision_mlps(model)]


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
    padded = 0
    for mlp, ins, outs, width in _vision_mlps(model):
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
