"""The language model's decoder layers through ``torch.compile`` while training (regional compilation).

The batch-2 training step is host-bound: the profiles in bench/results show the GPU idle half the time while
Python and the dispatcher launch ~3,700 kernels a micro-batch, most of them small element-wise ones around
the products (norms, rotary, residual adds, SwiGLU, LoRA's scale and add). Compiled, a decoder layer's forward
and backward each run as one graph: element-wise work fused by Inductor into a few Triton kernels, launched
from generated code instead of eager dispatch, one autograd node per layer instead of dozens.

How it is scoped:

- The language model's decoder layers, which all share one code path: the 36 layers of the 3B model reuse
  the same compiled graphs (a layer's parameters are graph inputs), so compiling costs the same as for one
  layer. With a frozen tower also its blocks (``FastPath.compile_vision``; inference graphs, no autograd),
  whose window and full-attention blocks share graphs too. The loss and the rest of the tower stay eager.
- Only in training (``TrainStep`` enters ``CompiledLayers.active`` around the loss): validation, generation
  and export call the same layers eagerly, so the key/value cache of decoding never meets a compiled graph.
- Shapes: the first batch compiles for its exact shape; the first batch of another length recompiles once
  with the sequence length symbolic (PyTorch's automatic dynamic shapes), and later lengths reuse it.
- Inputs: the model hands every layer its keyword arguments, the loader's vision-tower indices
  (``image_*``, read by the tower only) among them. A compiled layer does not get those: as graph inputs
  they would be guarded on, and a batch whose image features are kept (no tower, no indices) or whose
  window counts differ would recompile the layer.

``FastPath.compile_layers`` says whether it is on; ``model.compile`` chooses (auto: a CUDA GPU, no
gradient checkpointing, no FSDP).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

# Inductor on a GPU; tests on a CPU pass "aot_eager" (the same graph capture and autograd split, eager kernels).
BACKEND = "inductor"
RECOMPILE_LIMIT = 64


def _without_tower_inputs(fn):
    """The compiled layer called without the vision tower's ``image_*`` keyword arguments."""
    def call(*args, **kwargs):
        return fn(*args, **{k: v for k, v in kwargs.items() if not k.startswith("image_")})
    return call


def vision_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The vision tower's blocks (``<tower>.blocks``), or none."""
    from .align import vision_tower

    tower = vision_tower(model)
    blocks = getattr(tower, "blocks", None) if tower is not None else None
    return list(blocks) if isinstance(blocks, torch.nn.ModuleList) else []


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The language model's decoder layers (``<...>.language_model.layers``), through any PEFT wrapper."""
    for name, module in model.named_modules():
        if name.split(".")[-1] == "language_model" and isinstance(getattr(module, "layers", None),
                                                                    torch.nn.ModuleList):
            return list(module.layers)
    return []


class CompiledLayers:
    """A compiled callable per decoder layer, switched on only inside ``active()``.

    ``torch.nn.Module.compile`` would compile the layer for every call, generation included; here the compiled
    callable is set on the layer (the same attribute ``Module.compile`` sets, which ``Module.__call__`` reads)
    for the duration of a training forward pass and removed after it. The backward pass runs the graphs
    recorded in that forward pass, wherever it is called.
    """

    def __init__(self, model: torch.nn.Module, backend: str | None = None, vision: bool = False):
        self.text = decoder_layers(model)
        if not self.text:
            raise ValueError("no language-model decoder layers found to compile")
        self.vision = vision_blocks(model) if vision else []
        self.layers = self.text + self.vision
        # Graphs per layer code path: with and without an input gradient (the first layer's input is the frozen
        # embedding), one exact shape and one symbolic, a batch of one, lengths by multiple-of-8 alignment, and
        # in one process every model built (the benchmark builds many): PyTorch's default of 8 would run the
        # rest eagerly, without a word beyond one log line.
        cfg = torch._dynamo.config
        name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
        setattr(cfg, name, max(getattr(cfg, name), RECOMPILE_LIMIT))
        backend = backend or BACKEND
        self.compiled = [_without_tower_inputs(torch.compile(layer._call_impl, backend=backend))
                         for layer in self.layers]

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        for layer, fn in zip(self.layers, self.compiled):
            layer._compiled_call_impl = fn
        try:
            yield
        finally:
            for layer in self.layers:
                layer._compiled_call_impl = None
