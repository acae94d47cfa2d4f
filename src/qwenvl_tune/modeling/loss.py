"""The training loss with logits only where it needs them, and the loader's precomputed model inputs.

The language-model head runs on the supervised positions (the answer), not on every prompt and image
position, through the model's own ``logits_to_keep`` argument, a chunk of positions at a time; the
loss is the same token-mean cross-entropy as the model's own.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..data.collate import IGNORE_INDEX


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

    No key/value cache is built (``use_cache=False``): with the config's default the language model fills a
    ``DynamicCache`` in training too, a copy of every layer's keys and values and two ``cat`` calls a layer.

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
        out = model(**inputs, logits_to_keep=positions, use_cache=False)
        return F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
    head = model.get_output_embeddings()
    taken: list[torch.Tensor] = []

    def take(module: torch.nn.Module, args: tuple) -> tuple:
        taken.append(args[0])
        return (args[0][..., :0, :], *args[1:])

    handle = head.register_forward_pre_hook(take)
    try:
        model(**inputs, logits_to_keep=positions, use_cache=False)
    finally:
        handle.remove()
    hidden, flat = taken[-1].flatten(0, 1), targets.flatten()
    total = sum(checkpoint(_chunk_loss, head, hidden[s:s + LOSS_CHUNK], flat[s:s + LOSS_CHUNK], use_reentrant=False)
                for s in range(0, len(flat), LOSS_CHUNK))
    return total / (flat != IGNORE_INDEX).sum()
