"""Batched, left-padded generation (greedy unless asked to sample) that stops at the end of the assistant turn."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..data.conversation import end_of_turn_text

MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


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


@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen: greedy by default (``temperature`` 0 or None); a ``seed`` makes sampling repeatable;
    ``stop`` strings end the answer early (the stop string is not part of it)."""

    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return not self.temperature


@dataclass
class Generation:
    text: str
    truncated: bool  # hit max_new_tokens before an end-of-turn token or a stop string
    prompt_tokens: int
    completion_tokens: int

    @property
    def finish_reason(self) -> str:
        return "length" if self.truncated else "stop"


@torch.no_grad()
def generate(model: Any, processor: Any, batch: dict[str, Any], max_new_tokens: int,
             stop_ids: Sequence[int] | None = None, constraint: Any = None, sampling: Sampling | None = None,
             streamer: Any = None) -> list[Generation]:
    """Generate for one left-padded batch: each answer with why it ended and its token counts.

    With ``constraint`` (a ``JsonConstraint``) every answer is decoded under its JSON schema; ``streamer`` (a
    transformers streamer, for a batch of one) receives the text as it is generated.
    """
    sampling = sampling or Sampling()
    stop_ids = list(stop_ids or stop_token_ids(model, processor))
    device = next(p.device for p in model.parameters())
    inputs = {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}
    if "pixel_values" in inputs:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    tok = processor.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else stop_ids[0]
    extra: dict[str, Any] = {"logits_processor": [constraint.logits_processor()]} if constraint is not None else {}
    if sampling.stop:
        extra.update(stop_strings=list(sampling.stop), tokenizer=tok)
    if streamer is not None:
        extra["streamer"] = streamer
    if sampling.greedy:
        extra.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        extra.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p or 1.0, top_k=None)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad_id,
                         use_cache=True, **extra)
    new = out[:, inputs["input_ids"].shape[1]:].cpu()
    stop = torch.tensor(stop_ids)
    prompt_lengths = inputs["attention_mask"].sum(dim=1).tolist() if "attention_mask" in inputs else \
        [inputs["input_ids"].shape[1]] * len(new)
    results = []
    for row, prompt_len in zip(new, prompt_lengths):
        ended = torch.isin(row, stop).nonzero()
        n = int(ended[0]) + 1 if len(ended) else int((row != pad_id).sum())
        text = tok.decode(row[:n], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        by_string = any(text.endswith(s) for s in sampling.stop)
        for s in sampling.stop:  # a stop string ends the answer and is not part of it
            if s in text:
                text = text[:text.index(s)]
        results.append(Generation(text, not len(ended) and not by_string and n >= max_new_tokens, int(prompt_len), n))
    return results


def generate_batch(model: Any, processor: Any, batch: dict[str, Any], max_new_tokens: int,
                   stop_ids: Sequence[int] | None = None, constraint: Any = None) -> tuple[list[str], list[bool]]:
    """Greedy answers for one left-padded batch: (texts, truncated), where truncated says that an answer hit
    ``max_new_tokens`` before its end-of-turn token."""
    results = generate(model, processor, batch, max_new_tokens, stop_ids, constraint)
    return [r.text for r in results], [r.truncated for r in results]
