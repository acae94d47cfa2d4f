"""The model's own rope position ids, and the one-time check of the data loader's against them
(the loader computes them in ``data.positions``)."""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch


def model_rope_index(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The position ids the model itself computes for ``batch`` (its ``get_rope_index``), or None."""
    owner = next((m for m in model.modules() if callable(getattr(m, "get_rope_index", None))), None)
    if owner is None:
        return None
    params = inspect.signature(owner.get_rope_index).parameters
    kwargs = {k: batch[k] for k in ("image_grid_thw", "attention_mask", "mm_token_type_ids") if k in params and k in batch}
    return owner.get_rope_index(batch["input_ids"], **kwargs)[0]


class PositionCheck:
    """Compares the loader's position ids with the model's own once; afterwards only reports the verdict."""

    def __init__(self) -> None:
        self.verdict: bool | None = None

    def usable(self, model: torch.nn.Module, batch: dict[str, Any]) -> bool:
        if self.verdict is None:
            ours = batch["position_ids"]
            theirs = model_rope_index(model, batch)
            mask = batch["attention_mask"].bool()
            self.verdict = theirs is not None and bool(
                torch.equal(ours[:, mask], theirs.to(ours.device)[:, mask]))
            if not self.verdict:
                warnings.warn("the data loader's rope position ids differ from this transformers release's "
                              "get_rope_index; the model computes them itself at every step (slower, same result)",
                              stacklevel=2)
        return self.verdict
