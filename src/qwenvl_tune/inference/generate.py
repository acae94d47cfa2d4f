"""Batched, left-padded, greedy generation that stops at the end of the assistant turn."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image

from ..data.collate import Encoder, collate
from ..data.conversation import end_of_turn_text

MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


def extraction_result(text: str, truncated: bool) -> dict[str, Any]:
    """What predict, bulk extraction and the service return for one answer."""
    from ..evaluation.metrics import parse_json

    ok, value = parse_json(text)
    return {"json": value if ok else None, "valid": ok, "output": text, "truncated": truncated}


def stop_token_ids(model: Any, processor: Any) -> list[int]:
    """End-of-turn id derived from the chat template, plus the checkpoint's own eos ids."""
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if eos is not None:
        ids.extend(eos if isinstance(eos, (list, tuple)) else [eos])
    marker = processor.tokenizer(end_of_turn_text(processor), add_special_tokens=False)["input_ids"]
    if len(marker) == 1:
        ids.append(marker[0])
    if processor.tokenizer.eos_token_id is not None:
        ids.append(processor.tokenizer.eos_token_id)
    return sorted(set(ids))


@torch.no_grad()
def generate_batch(model: Any, processor: Any, batch: dict[str, Any], max_new_tokens: int,
                   stop_ids: Sequence[int] | None = None, constraint: Any = None) -> tuple[list[str], list[bool]]:
    """Generate for one left-padded batch.

    Returns:
        (texts, truncated): decoded answers without special tokens, and whether
        each hit ``max_new_tokens`` before an end-of-turn token.

    With ``constraint`` (a ``JsonConstraint``) every answer is decoded under its JSON schema.
    """
    stop_ids = list(stop_ids or stop_token_ids(model, processor))
    device = next(p.device for p in model.parameters())
    inputs = {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}
    if "pixel_values" in inputs:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    pad_id = processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None else stop_ids[0]
    extra = {"logits_processor": [constraint.logits_processor()]} if constraint is not None else {}
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                         pad_token_id=pad_id, use_cache=True, temperature=None, top_p=None, top_k=None, **extra)
    new = out[:, inputs["input_ids"].shape[1]:].cpu()
    stop = torch.tensor(stop_ids)
    truncated = [not bool(torch.isin(row, stop).any()) for row in new]
    texts = processor.tokenizer.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return texts, truncated


def generate_for_images(model: Any, processor: Any, images: Sequence[Image.Image], prompts: Sequence[str],
                        system_message: str | None = None, batch_size: int = 4, max_new_tokens: int = 1024,
                        constraint: Any = None) -> tuple[list[str], list[bool]]:
    """Answers for already-loaded images, in order, ``batch_size`` at a time."""
    encoder = Encoder(processor, system_message)
    stop_ids = stop_token_ids(model, processor)
    texts: list[str] = []
    truncated: list[bool] = []
    for i in range(0, len(images), batch_size):
        items = [encoder.encode_prompt(im, pr) for im, pr in zip(images[i:i + batch_size], prompts[i:i + batch_size])]
        t, tr = generate_batch(model, processor, collate(items, encoder.pad_id, left=True), max_new_tokens, stop_ids,
                               constraint)
        texts += t
        truncated += tr
    return texts, truncated
