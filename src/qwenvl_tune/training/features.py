"""The frozen vision tower's output per training document, kept from the first epoch for the next ones.

With the tower frozen (the default: LoRA adapts the language model only) a page's image features are the same
every epoch: the tower has no dropout and no trained weights, and the data pipeline no augmentation. Computing
them again each epoch is about a fifth of a training step's arithmetic with Qwen2.5-VL-3B pages, and a quarter
of its kernel launches. So the first time a document is trained on, the tower's output for its pages is copied to
host memory (without waiting for the GPU); a later batch whose documents are all kept skips the tower, and the
language model takes the kept features where the image tokens are, as the model itself places them.

The loader learns which rows are kept (``RecordDataset.kept``, shared with its worker processes, set here as a
document is kept) and makes a batch of only kept rows without decoding its pixels into patches, most of a
page's CPU time in the loader.

Keys are the training split's row indices. Budget: ``train.image_cache_gib`` of host memory (0: off); once it
is full, later documents are not kept and the run says so once. A batch with any document not kept runs the
tower for the whole batch, as without the cache. Not used where the features would not be the same each epoch
or where the model builds more from the tower than these features: a trained tower (``model.train_vision`` or
adapters in it), Qwen3-VL (its tower also feeds intermediate layers, "deepstack"), FSDP, or without the loader's
rope positions.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from ..modeling.align import vision_tower

# families whose language model takes the tower's output only through the image tokens' embeddings
FAMILIES = ("qwen2_vl", "qwen2_5_vl")


def cache_blocker(model: torch.nn.Module, fast: Any, budget_gib: float, fsdp: bool = False) -> str | None:
    """Why the cache cannot be used for this model and run, or None when it can."""
    if budget_gib <= 0:
        return "train.image_cache_gib=0"
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family not in FAMILIES:
        return f"{family}: its tower feeds more than the image tokens"
    tower = vision_tower(model)
    if tower is None:
        return "no vision tower found"
    if any(p.requires_grad for p in tower.parameters()):
        return "the vision tower is trained"
    if fsdp:
        return "FSDP"
    if not (fast.loader_indices and fast.answer_only_loss):
        return "the fast path is off"
    return None


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


class HostSlabs:
    """Host memory for kept features, handed out from a few large buffers ("slabs") within a byte budget.

    PyTorch's page-locked allocator rounds every request up to a power of two and keeps the block: asked per
    document, the 3B model's ~5 MiB of features a page pinned 8 MiB, so the budget bounded what was asked for, not
    what was held (up to twice as much), and each document cost one ``cudaHostAlloc`` call (~4 ms on an H200 host,
    bench/results/logs/profile_3b_defaults_2026-12-03b.log). Here page-locked slabs are powers of two themselves
    (64 MiB, or the next power of two above a larger document), so ``held`` is what the machine gives up, and the
    budget bounds it; documents are placed one after another in a slab, each at a 256-byte boundary. Memory that
    is not page-locked (features computed on a CPU) is taken per document (``slab=0``): nothing to save there.
    """

    SLAB = 64 * 2**20
    ALIGN = 256

    def __init__(self, budget: int, pin: bool, slab: int | None = None):
        self.budget, self.pin = budget, pin
        self.slab = (self.SLAB if pin else 0) if slab is None else slab
        self.held = 0  # bytes of all slabs
        self.used = 0  # bytes of the documents placed in them
        self._slab: torch.Tensor | None = None
        self._offset = 0

    def _new_slab_size(self, nbytes: int) -> int:
        """The size of the next slab for a document of ``nbytes``, or 0 when the budget has no room for it."""
        size = max(nbytes, self.slab)
        left = self.budget - self.held
        if self.pin:
            size = 1 << (size - 1).bit_length()
        if size > left:
            size = left if not self.pin else (1 << (left.bit_length() - 1) if left > 0 else 0)
        return size if size >= nbytes else 0

    def take(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor | None:
        """An uninitialised host tensor of ``shape`` and ``dtype`` in a slab, or None when the budget is spent."""
        nbytes = shape.numel() * dtype.itemsize
        start = -(-self._offset // self.ALIGN) * self.ALIGN
        if self._slab is None or start + nbytes > self._slab.numel():
            size = self._new_slab_size(nbytes)
            if not size:
                return None
            self._slab = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
            self.held += size
            start = 0
        self._offset = start + nbytes
        self.used += nbytes
        return self._slab[start:start + nbytes].view(dtype).view(shape)


class ImageFeatureCache:
    """Per-document image features on the host, by training-split row index, within a byte budget."""

    def __init__(self, model: torch.nn.Module, budget_gib: float):
        self.budget = int(budget_gib * 2**30)
        self.merge = int(getattr(vision_tower(model), "spatial_merge_size", 2)) ** 2
        self.image_token = model.config.image_token_id
        self.kept: dict[int, torch.Tensor] = {}
        self.host: HostSlabs | None = None  # made at the first document kept, page-locked when features are on a GPU
        self.full = False
        self.hits = self.misses = 0
        self.without_pixels = 0  # document-steps whose batch came from the loader without pixels
        # the training dataset's flags (RecordDataset.kept): a row set there is made without pixels by the loader
        self.flags: torch.Tensor | None = None

    # ---- the step's side
    def inputs(self, model: torch.nn.Module, inputs: dict[str, Any],
               batch: dict[str, Any]) -> tuple[dict, contextlib.AbstractContextManager]:
        """The model inputs for this batch, and the context to run the model in. When every document of the batch
        is kept: the kept features in place of the pixels, and nothing to record. Otherwise the inputs as given,
        and a context that records the tower's output and keeps it per document once the forward pass is done."""
        rows = batch.get("index")
        pixels = "pixel_values" in inputs
        if rows is None or not (pixels or "image_grid_thw" in inputs):
            return inputs, contextlib.nullcontext()
        missing = [r for r in rows if r not in self.kept]
        if not pixels:  # the loader left them out: it saw every document of the batch flagged as kept
            if missing:
                raise RuntimeError(f"training rows {missing} came without pixels but their image features are not "
                                   f"kept (the loader's flags and the cache disagree)")
            self.without_pixels += len(rows)
        if not missing:
            self.hits += len(rows)
            # each kept copy goes to the device on its own and is joined there: the host never reads a pinned
            # buffer whose copy from the GPU may still be in flight (stream order makes the device side safe)
            device = inputs["input_ids"].device
            feats = torch.cat([self.kept[r].to(device, non_blocking=True) for r in rows])
            embeds = model.get_input_embeddings()(inputs["input_ids"])
            mask = (inputs["input_ids"] == self.image_token).unsqueeze(-1).expand_as(embeds)
            embeds = embeds.masked_scatter(mask, feats.to(embeds.dtype))
            out = {k: v for k, v in inputs.items()
                   if k not in ("input_ids", "pixel_values", "image_grid_thw") and not k.startswith("image_")}
            out["inputs_embeds"] = embeds
            return out, contextlib.nullcontext()
        self.misses += len(rows)
        return inputs, self._recording(model, batch)

    @contextlib.contextmanager
    def _recording(self, model: torch.nn.Module, batch: dict[str, Any]) -> Iterator[None]:
        """Record the tower's merged output (a forward hook on the tower) and keep it when the block ends."""
        captured: list[torch.Tensor] = []

        def hook(module, args, output):
            feats = getattr(output, "pooler_output", None)
            if feats is None:
                feats = output[0] if isinstance(output, tuple) else output
            if isinstance(feats, (list, tuple)):
                feats = torch.cat(list(feats))
            captured.append(feats.detach())

        handle = vision_tower(model).register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()
        self._keep(batch, captured)

    def _keep(self, batch: dict[str, Any], captured: list[torch.Tensor]) -> None:
        """Store the captured output per document of ``batch`` (split by its pages' token counts)."""
        rows, grids, counts = batch.get("index"), batch.get("page_grids"), batch.get("page_counts")
        if rows is None or grids is None or counts is None or len(captured) != 1 or self.full:
            return
        feats = captured[0]
        tokens = [t * h * w // self.merge for t, h, w in grids]
        if sum(tokens) != feats.shape[0]:
            return  # not this batch's tower output: keep nothing rather than something wrong
        start = page = 0
        for row, n_pages in zip(rows, counts):
            n = sum(tokens[page:page + n_pages])
            page += n_pages
            part = feats[start:start + n]
            start += n
            if row in self.kept:
                continue
            if self.host is None:
                self.host = HostSlabs(self.budget, pin=part.is_cuda)
            host = self.host.take(part.shape, part.dtype)
            if host is None:
                self.full = True
                print(f"image feature cache full ({_size(self.bytes)}, train.image_cache_gib): "
                      f"{len(self.kept)} documents kept; batches with others run the vision tower every epoch",
                      flush=True)
                return
            host.copy_(part, non_blocking=part.is_cuda)  # from a GPU: page-locked memory, without waiting for it
            self.kept[row] = host
            if self.flags is not None:
                self.flags[row] = True  # the loader's next batches of kept rows need no pixels

    @property
    def bytes(self) -> int:
        """Host memory held for kept features (the budget bounds it)."""
        return self.host.held if self.host else 0

    @property
    def used(self) -> int:
        """Bytes of the kept features themselves."""
        return self.host.used if self.host else 0

    def describe(self) -> str:
        return (f"image feature cache: {len(self.kept)} documents, {_size(self.used)} in {_size(self.bytes)} of host memory; "
                f"{self.hits} document-steps took kept features ({self.without_pixels} of them loaded without "
                f"preparing pixels), {self.misses} ran the tower")
