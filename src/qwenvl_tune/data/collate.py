"""Samples -> tensors. The label mask is built here, where the prompt is built.

Prompt and target are tokenised separately and concatenated: the labels are
-100 on every prompt position (system, user, image) and on padding, and the
token ids themselves on the answer and its end-of-turn marker. No token id is
looked for after the fact, so none is hard-coded.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence, Union

import torch
from PIL import Image
from torch.utils.data import Dataset

from .positions import VisionIndex, image_token_id, mrope_positions, page_grid
from .conversation import render
from .documents import PageLimits, load_pages
from .records import DataError, Record

IGNORE_INDEX = -100


class SampleTooLongError(DataError):
    """A sample does not fit ``data.max_length``; it is never truncated through image tokens."""


Pages = Union[Image.Image, Sequence[Image.Image]]


def as_pages(pages: Any) -> list[Image.Image]:
    """A document's pages as a list (one image is a one-page document)."""
    return [pages] if isinstance(pages, Image.Image) else list(pages)


@dataclass
class Encoder:
    """Turns (pages, prefix[, answer]) into model inputs with one processor and one system message.

    A document's pages go to the model in order, each its own image (its own grid of patches and its own
    rope positions), followed by the instruction.
    """

    processor: Any
    system_message: str | None = None
    max_length: int | None = None

    @property
    def pad_id(self) -> int:
        tok = self.processor.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def _prompt(self, pages: list[Image.Image], prompt_text: str) -> dict[str, torch.Tensor]:
        enc = self.processor(text=[prompt_text], images=pages, return_tensors="pt")
        out = {"input_ids": enc["input_ids"][0], "pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"]}
        if "mm_token_type_ids" in enc:
            out["mm_token_type_ids"] = enc["mm_token_type_ids"][0]
        return out

    def _prompt_without_pixels(self, pages: list[Image.Image], prompt_text: str) -> dict[str, torch.Tensor]:
        """What ``_prompt`` returns, less ``pixel_values``, without preparing any pixels: each page's patch grid
        from its size (the image processor's own resize rule), its image tokens expanded in the text as the
        processor expands them, the text tokenised as the processor tokenises it. For a document whose image
        features are kept (training/features.py): its pixels would be prepared only to be thrown away, and that
        is most of a page's CPU time in the loader (tests/data/test_collate.py checks equality with ``_prompt``)."""
        grids = torch.tensor([page_grid(self.processor.image_processor, p.height, p.width) for p in pages])
        token = self.processor.image_token
        parts = prompt_text.split(token)
        if len(parts) != len(pages) + 1:
            raise ValueError(f"the prompt holds {len(parts) - 1} image tokens for {len(pages)} page(s)")
        merge = self.processor.image_processor.merge_size ** 2
        text = parts[0] + "".join(token * (int(g.prod()) // merge) + rest for g, rest in zip(grids, parts[1:]))
        ids = torch.tensor(self.processor.tokenizer([text])["input_ids"][0], dtype=torch.long)
        out = {"input_ids": ids, "image_grid_thw": grids}
        if self._returns_token_types:
            out["mm_token_type_ids"] = (ids == self._image_token).long()
        return out

    @cached_property
    def _returns_token_types(self) -> bool:
        """Whether this processor returns ``mm_token_type_ids`` (transformers 5's Qwen-VL processors do)."""
        probe = self.processor(text=[self.processor.image_token], images=[Image.new("RGB", (56, 56))],
                               return_tensors="pt")
        return "mm_token_type_ids" in probe

    @cached_property
    def _image_token(self) -> int:
        return image_token_id(self.processor)

    def _text_ids(self, text: str) -> torch.Tensor:
        ids = self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    def encode_train(self, pages: Pages, prefix: str, answer: str, where: Record | None = None,
                     system: str | None = None, pixels: bool = True) -> dict[str, Any]:
        """Model inputs and labels; ``pixels=False`` leaves out ``pixel_values`` and does not prepare them."""
        pages = as_pages(pages)
        turns = render(self.processor, prefix, system or self.system_message, answer, len(pages))
        enc = self._prompt(pages, turns.prompt) if pixels else self._prompt_without_pixels(pages, turns.prompt)
        target, tail = self._text_ids(turns.target), self._text_ids(turns.tail)
        prompt_ids = enc.pop("input_ids")
        input_ids = torch.cat([prompt_ids, target, tail])
        if self.max_length is not None and len(input_ids) > self.max_length:
            file, line = (where.file, where.line) if where else (None, None)
            raise SampleTooLongError(
                f"sample is {len(input_ids)} tokens ({len(prompt_ids)} prompt incl. {len(pages)} page(s), "
                f"{len(target)} answer), "
                f"over data.max_length={self.max_length}; raise max_length or lower data.max_pixels", file, line, "suffix")
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[len(prompt_ids): len(prompt_ids) + len(target)] = target
        enc["input_ids"], enc["labels"] = input_ids, labels
        enc["position_ids"] = mrope_positions(input_ids, enc["image_grid_thw"], self._image_token,
                                              self.processor.image_processor.merge_size)
        if "mm_token_type_ids" in enc:
            enc["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros(len(target) + len(tail), dtype=torch.long)])
        return enc

    def encode_prompt(self, pages: Pages, prefix: str, system: str | None = None) -> dict[str, Any]:
        pages = as_pages(pages)
        return self._prompt(pages, render(self.processor, prefix, system or self.system_message, None,
                                          len(pages)).prompt)


def _pad(seqs: Sequence[torch.Tensor], value: int, left: bool, multiple: int = 1) -> torch.Tensor:
    n = -(-max(len(s) for s in seqs) // multiple) * multiple
    out = torch.full((len(seqs), n), value, dtype=seqs[0].dtype)
    for i, s in enumerate(seqs):
        if left:
            out[i, n - len(s):] = s
        else:
            out[i, : len(s)] = s
    return out


def collate(items: Sequence[dict[str, Any]], pad_id: int, left: bool, vision: VisionIndex | None = None,
            pad_to_multiple_of: int = 1) -> dict[str, Any]:
    """Pad a list of encoded samples into a batch. Training pads right; generation pads left.

    ``pad_to_multiple_of`` rounds the padded length up (measured on an H100 with the 3B model at
    batch 1 and 2: no speed change, so the trainer does not round; bench/train_speed.py keeps the
    variants).

    Training batches also carry ``answer_positions``: the positions whose next token is supervised
    in any sample (where the fast path computes logits), found here rather than with a
    ``nonzero()`` on the GPU, which waits for it. With ``vision``, the vision tower's index
    tensors for the batch's images come along too (``VisionIndex``).
    """
    m = pad_to_multiple_of
    batch: dict[str, Any] = {
        "input_ids": _pad([it["input_ids"] for it in items], pad_id, left, m),
        "attention_mask": _pad([torch.ones_like(it["input_ids"]) for it in items], 0, left, m),
        "image_grid_thw": torch.cat([it["image_grid_thw"] for it in items]),
    }
    with_pixels = sum("pixel_values" in it for it in items)
    if with_pixels == len(items):
        batch["pixel_values"] = torch.cat([it["pixel_values"] for it in items])
    elif with_pixels:  # RecordDataset leaves pixels out for a whole batch or for none of it
        raise ValueError(f"{with_pixels} of {len(items)} samples of a batch have pixel_values")
    if "labels" in items[0]:
        batch["labels"] = _pad([it["labels"] for it in items], IGNORE_INDEX, left, m)
        batch["answer_positions"] = (batch["labels"][:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().flatten()
    if "mm_token_type_ids" in items[0]:
        batch["mm_token_type_ids"] = _pad([it["mm_token_type_ids"] for it in items], 0, left, m)
    if "position_ids" in items[0]:  # (3, len) each -> (3, batch, len); padding positions are masked out
        rows = [_pad([it["position_ids"][r] for it in items], 0, left, m) for r in range(3)]
        batch["position_ids"] = torch.stack(rows)
    if vision is not None:
        batch.update(vision(batch["image_grid_thw"]))
    if "index" in items[0]:
        # host-side lists (never moved to the device): pages per sample and each page's grid, for the step's
        # image feature cache (training/features.py), which keys documents by ``index``; not ``image_*`` names,
        # which are the vision tower's inputs (loss.with_loader_indices)
        batch["page_counts"] = [len(it["image_grid_thw"]) for it in items]
        batch["page_grids"] = batch["image_grid_thw"].tolist()
    for key in ("ids", "index", "targets", "padding"):
        if key in items[0]:
            batch[key] = [it[key] for it in items]
    return batch


class TrainCollator:
    def __init__(self, pad_id: int, vision: VisionIndex | None = None):
        self.pad_id, self.vision = pad_id, vision

    def __call__(self, items):
        return collate(items, self.pad_id, left=False, vision=self.vision)


class GenerateCollator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items):
        return collate(items, self.pad_id, left=True)


class RecordDataset(Dataset):
    """Records -> encoded samples, decoding images lazily (in DataLoader workers).

    ``mode='train'`` yields input_ids + labels; ``mode='generate'`` yields the
    prompt only plus the gold target text for scoring.
    """

    def __init__(self, records: Sequence[Record], encoder: Encoder, mode: str = "train",
                 limits: PageLimits = PageLimits()):
        if mode not in ("train", "generate"):
            raise ValueError(f"mode must be 'train' or 'generate', got {mode!r}")
        self.records, self.encoder, self.mode, self.limits = list(records), encoder, mode, limits
        # Training rows whose image features the step keeps (training/features.py sets them; shared memory, so the
        # loader's worker processes see them): a batch of only such rows is made without pixels.
        self.kept = torch.zeros(len(self.records), dtype=torch.bool).share_memory_() if mode == "train" else None

    def __len__(self) -> int:
        return len(self.records)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """A batch's samples (the DataLoader fetches a batch through this): without pixels when every one of its
        documents has its image features kept, else all with them."""
        pixels = self.kept is None or not bool(self.kept[list(indices)].all())
        return [self._item(i, pixels) for i in indices]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self._item(i, pixels=True)

    def _item(self, i: int, pixels: bool) -> dict[str, Any]:
        r = self.records[i]
        pages = load_pages(r.sources, self.limits, where=r.where)
        if self.mode == "train":
            item = self.encoder.encode_train(pages, r.prefix, r.target_text, where=r, system=r.system, pixels=pixels)
        else:
            item = self.encoder.encode_prompt(pages, r.prefix, system=r.system)
        item["ids"] = r.id
        if self.mode == "train":
            item["index"] = i  # the row's place in the split: the key of its kept image features
        item["targets"] = r.target_text
        return item
