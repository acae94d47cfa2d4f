"""QLoRA's 4-bit products as operations ``torch.compile`` can see into, for the compiled decoder layers.

bitsandbytes computes a 4-bit layer's product as its own operators (``gemm_4bit`` forward; ``dequantize_blockwise``
and ``dequantize_4bit`` backward, twice that with double quantisation), each a Python kernel calling the C library
through ctypes. A compiled layer keeps them as opaque calls, so a QLoRA micro-batch of the 3B model spends that
host time ~1,000 times (36 layers x 7 products, forward and backward), and the step waits on the host: the defaults'
step (bf16 weights, the same compiled layers) ran at twice QLoRA's rate on an H200 (bench/results/LOG.md).

Here the weight is unpacked with plain tensor operations (two 4-bit codes a byte, the high nibble first; each code's
value from the 16-entry table, times its block's scale; with double quantisation the scales are themselves 8-bit
codes times a scale per 256 blocks, plus an offset), which Inductor fuses into one generated kernel per weight
and launches from its compiled wrapper. The arithmetic is bitsandbytes' own: float32 table value times float32
scale, rounded once to the compute dtype (tests compare it with bitsandbytes' dequantisation bit for bit).

The unpacking is marked for recomputation (an activation-checkpoint region of its own): the backward pass unpacks
the weight again from the packed codes, as bitsandbytes does, and the unpacked weight is never kept between the
passes, so memory stays QLoRA's. Without the mark the compiler's partitioner saves every unpacked weight for the
backward pass (it may not recompute a tensor the backward's matrix product reads): +5.2 GiB at 3B on an H200,
measured (bench/results/LOG.md, 2026-12-03 eleventh session).

Only inside a compiled graph (``torch.compiler.is_compiling()``): eager calls (validation, generation, export, a
CPU run without ``model.compile``) keep bitsandbytes' fused operators, which are faster one call at a time.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

TABLE_SIZE = 16  # 4-bit codes


def eligible(weight: Any) -> bool:
    """Whether a 4-bit weight's layout is one this module unpacks: bitsandbytes' NF4/FP4, each row a whole number
    of blocks.

    Blocks run over the flattened weight, as the quantiser and the CUDA kernel lay them out; bitsandbytes' CPU
    kernel reads them per row instead, so where a block straddles two rows (Qwen2.5-VL's 3420-wide vision MLP; the
    tiny test towers' 32-wide rows) the two disagree. Such layers keep bitsandbytes' operators: the compiled and
    eager paths of one machine then compute the same weight.
    """
    state = getattr(weight, "quant_state", None)
    if state is None or state.quant_type not in ("nf4", "fp4") or state.code is None:
        return False
    if state.code.numel() != TABLE_SIZE or len(state.shape) != 2:
        return False
    if state.shape[1] % state.blocksize or getattr(state, "packing_format_for_cpu", False):
        return False
    return not state.nested or (state.state2.code is not None and state.state2.absmax is not None)


def _scales(absmax: torch.Tensor, absmax2: torch.Tensor | None, code2: torch.Tensor | None,
            offset: torch.Tensor | None, blocksize2: int) -> torch.Tensor:
    """Each block's float32 scale; with double quantisation, an 8-bit code times its group's scale, plus the offset."""
    if absmax2 is None:
        return absmax.float()
    group = torch.arange(absmax.numel(), device=absmax.device) // blocksize2
    return code2[absmax.reshape(-1).long()] * absmax2[group] + offset


def unpack(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, absmax2: torch.Tensor | None,
           code2: torch.Tensor | None, offset: torch.Tensor | None, blocksize: int, blocksize2: int,
           shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """The ``shape`` weight in ``dtype`` from its packed 4-bit codes (any storage dtype) and block scales."""
    n = shape[0] * shape[1]
    codes = packed.reshape(-1).view(torch.uint8) if packed.dtype != torch.uint8 else packed.reshape(-1)
    pairs = torch.stack((codes >> 4, codes & 0xF), dim=-1).reshape(-1)[:n]
    values = code[pairs.long()].view(-1, blocksize)
    scale = _scales(absmax, absmax2, code2, offset, blocksize2)
    return (values * scale.view(-1, 1)).view(shape).to(dtype)


def _state(s: Any) -> tuple:
    """``unpack``'s arguments after the packed codes and before the dtype, from a bitsandbytes ``QuantState``."""
    n = s.nested
    return (s.absmax, s.code, s.state2.absmax if n else None, s.state2.code if n else None, s.offset if n else None,
            s.blocksize, s.state2.blocksize if n else 0, tuple(s.shape))


def dequantize(weight: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A bitsandbytes 4-bit weight (``Params4bit``) unpacked with tensor operations."""
    return unpack(weight, *_state(weight.quant_state), dtype or weight.quant_state.dtype)


def product(module: Any, x: torch.Tensor) -> torch.Tensor:
    """What ``bitsandbytes.nn.Linear4bit.forward`` computes, traceable: input in the compute dtype, result back;
    the unpacked weight recomputed for the backward pass, not saved."""
    dtype = module.compute_dtype or x.dtype
    bias = module.bias.to(dtype) if module.bias is not None else None
    w = torch.utils.checkpoint.checkpoint(unpack, module.weight, *_state(module.weight.quant_state), dtype,
                                          use_reentrant=False)
    return torch.nn.functional.linear(x.to(dtype), w, bias).to(x.dtype)


@functools.cache
def _compilable_class() -> type:
    import bitsandbytes as bnb

    class CompilableLinear4bit(bnb.nn.Linear4bit):
        """bitsandbytes' 4-bit layer whose product, inside a compiled graph, is ``product`` (tensor operations)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if torch.compiler.is_compiling() and not getattr(self.weight.quant_state, "packing_format_for_cpu",
                                                             False):
                return product(self, x)
            return super().forward(x)

    CompilableLinear4bit.__module__, CompilableLinear4bit.__qualname__ = __name__, "CompilableLinear4bit"
    return CompilableLinear4bit


def __getattr__(name: str) -> Any:
    # the subclass by its module path (pickle, copies in other processes), made on first use
    if name == "CompilableLinear4bit":
        return _compilable_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_compilable(model: torch.nn.Module) -> int:
    """Give every eligible bitsandbytes 4-bit layer of ``model`` the traceable product; returns how many.

    The layer keeps its class's every other behaviour (it becomes a subclass, so PEFT still wraps it as a 4-bit
    layer, and saving, loading and merging are bitsandbytes' own).
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    cls = _compilable_class()
    n = 0
    for module in model.modules():
        if type(module) is bnb.nn.Linear4bit and eligible(module.weight):
            module.__class__ = cls
            n += 1
    return n
