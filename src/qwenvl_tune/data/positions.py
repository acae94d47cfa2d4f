"""Multimodal rotary (mrope) position ids of one training sample, computed in the data loader.

Qwen2-VL, Qwen2.5-VL and Qwen3-VL give every token three position ids (time, height, width). Text
tokens count up together; an image's tokens take the running index plus their row and column in
the merged patch grid, and the text after the image resumes at the running index plus the larger
of the grid's merged height and width. When a training batch carries no ``position_ids`` the model
works them out itself at every step (``get_rope_index``: a Python loop over each sample, with a
device-to-host copy). Computed here instead, on the loader's CPU workers, the step does not wait.

The model's own function is the reference: ``modeling.positions.PositionCheck`` compares the two
once, on the first training batch, and drops the precomputed ids (with a warning) if this
transformers release computes them differently.

``VisionIndex`` does the same for the vision tower's index tensors, with the library's own functions.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch


def image_token_id(processor: Any) -> int:
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None:
        token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return int(token_id)


def page_grid(image_processor: Any, height: int, width: int) -> list[int]:
    """A still page's patch grid [1, rows, columns] as a Qwen-VL image processor makes it, from the page's size
    alone: its resize rule (``smart_resize``: both sides multiples of patch x merge, the area within the
    processor's pixel bounds), the same arithmetic as the processor's ``get_number_of_image_patches``."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    ip, size = image_processor, getattr(image_processor, "size", None) or {}
    patch, merge = ip.patch_size, ip.merge_size
    if getattr(ip, "do_resize", True):
        lo = size.get("shortest_edge", getattr(ip, "min_pixels", None))
        hi = size.get("longest_edge", getattr(ip, "max_pixels", None))
        height, width = smart_resize(height, width, patch * merge, min_pixels=lo, max_pixels=hi)
    return [1, height // patch, width // patch]


def mrope_positions(input_ids: torch.Tensor, image_grid_thw: torch.Tensor, image_token: int,
                    merge_size: int) -> torch.Tensor:
    """(3, len) position ids of one unpadded sample holding still images (no video)."""
    n = len(input_ids)
    is_image = input_ids == image_token
    # starts and ends of the runs of image tokens, one run per image
    edges = torch.diff(is_image.to(torch.int8), prepend=torch.zeros(1, dtype=torch.int8),
                       append=torch.zeros(1, dtype=torch.int8))
    starts, ends = (edges == 1).nonzero().flatten().tolist(), (edges == -1).nonzero().flatten().tolist()
    if len(starts) != len(image_grid_thw):
        raise ValueError(f"{len(starts)} runs of image tokens but {len(image_grid_thw)} image grids")
    out = torch.empty(3, n, dtype=torch.long)
    pos, prev = 0, 0  # running index, and where the current text run begins
    for (t, h, w), s, e in zip(image_grid_thw.tolist(), starts, ends):
        out[:, prev:s] = torch.arange(pos, pos + s - prev)
        pos += s - prev
        gh, gw = h // merge_size, w // merge_size
        if t * gh * gw != e - s:
            raise ValueError(f"image grid {t}x{h}x{w} needs {t * gh * gw} tokens, the sample has {e - s}")
        out[0, s:e] = pos + torch.arange(t).repeat_interleave(gh * gw)
        out[1, s:e] = pos + torch.arange(gh).repeat_interleave(gw).repeat(t)
        out[2, s:e] = pos + torch.arange(gw).repeat(t * gh)
        pos += max(gh, gw)
        prev = e
    out[:, prev:] = torch.arange(pos, pos + n - prev)
    return out


# The vision tower's own per-step index tensors, by family: each name is a helper of
# ``transformers.vision_utils`` that the tower calls with its ``kwargs`` and that returns a
# precomputed value found there instead of computing it (transformers >= 5.17). Qwen3-VL's
# position-embedding interpolation is left to the model (its helper changed between releases).
_VISION_HELPERS = {
    "qwen2_vl": ("get_vision_position_ids", "get_vision_attention_seqlens"),
    "qwen2_5_vl": ("get_vision_position_ids", "get_vision_attention_seqlens", "get_vision_window_index"),
    "qwen3_vl": ("get_vision_position_ids", "get_vision_attention_seqlens"),
}


class VisionIndex:
    """The vision tower's index tensors for a batch's images, computed in the data loader.

    Every step the tower derives from ``image_grid_thw`` its rotary position ids, the
    boundaries of each image (``cu_seqlens``) and, for Qwen2.5-VL, the window permutation and
    window boundaries, with ``.tolist()``/``.item()`` calls that wait for the GPU. Here the
    same library functions run on the loader's CPU copy of the grids; the batch carries the
    results as ``image_*`` keys, which the model's ``get_image_features`` hands to the tower.
    Built only where the installed transformers' tower reads them (else ``for_config`` is None).
    """

    def __init__(self, spatial_merge_size: int, window_size: int | None, patch_size: int):
        self.merge, self.window_size, self.patch_size = spatial_merge_size, window_size, patch_size

    @classmethod
    def for_config(cls, config: Any) -> "VisionIndex | None":
        family = getattr(config, "model_type", None)
        vision = getattr(config, "vision_config", None)
        if family not in _VISION_HELPERS or vision is None:
            return None
        try:
            modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        except ImportError:
            return None
        if not all(hasattr(modeling, name) for name in _VISION_HELPERS[family]):
            return None  # this release's tower computes them itself and would not read ours
        window = getattr(vision, "window_size", None) if family == "qwen2_5_vl" else None
        return cls(vision.spatial_merge_size, window, vision.patch_size)

    def __call__(self, image_grid_thw: torch.Tensor) -> dict[str, Any]:
        from transformers import vision_utils as vu

        grid = image_grid_thw.cpu()
        cu = vu.get_vision_cu_seqlens(grid)
        out: dict[str, Any] = {
            "image_position_ids": vu.get_vision_position_ids(grid, self.merge),
            "image_cu_seqlens": cu,
            "image_max_seqlen": int((cu[1:] - cu[:-1]).max()),
        }
        if self.window_size is not None:
            index, cu_window = vu.get_vision_window_index(grid, self.merge, self.window_size, self.patch_size)
            out.update(image_window_index=index, image_cu_window_seqlens=cu_window,
                       image_max_window_seqlen=int((cu_window[1:] - cu_window[:-1]).max()))
        return out
