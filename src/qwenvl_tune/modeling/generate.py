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
    token_ids: list[int] | None = None  # the answer's tokens (with ``logprobs``), end-of-turn token included
    logprobs: list[float] | None = None  # each token's log-probability under the distribution it was drawn from
    top_logprobs: list[list[tuple[int, float]]] | None = None  # the most likely alternatives at each step

    @property
    def finish_reason(self) -> str:
        return "length" if self.truncated else "stop"


class TokenLogprobs:
    """A logits processor, last in the chain, that records the log-probability of each chosen token.

    The distribution is the one the token was drawn from: after the JSON constraint's mask (so a token the
    schema forces has probability 1) and before sampling. The token chosen at step t is only known at step
    t+1 (the last column of ``input_ids``), so one step's log-softmax is kept (batch x vocabulary), never all.
    """

    def __init__(self, top: int = 0):
        self.top, self.prev = top, None
        self.chosen: list[torch.Tensor] = []
        self.alternatives: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _take(self, tokens: torch.Tensor) -> None:
        self.chosen.append(self.prev.gather(1, tokens[:, None]).squeeze(1).cpu())

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prev is not None:
            self._take(input_ids[:, -1])
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        if self.top:
            values, ids = self.prev.topk(self.top, dim=-1)
            self.alternatives.append((ids.cpu(), values.cpu()))
        return scores

    def finish(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """(batch, steps) log-probabilities, given the generated tokens (batch, steps)."""
        if self.prev is not None and len(self.chosen) < new_tokens.shape[1]:
            self._take(new_tokens[:, len(self.chosen)].to(self.prev.device))
        self.prev = None
        return torch.stack(self.chosen, dim=1) if self.chosen else torch.zeros(new_tokens.shape[0], 0)


@torch.no_grad()
def generate(model: Any, processor: Any, batch: dict[str, Any], max_new_tokens: int,
             stop_ids: Sequence[int] | None = None, constraint: Any = None, sampling: Sampling | None = None,
             streamer: Any = None, logprobs: bool = False, top_logprobs: int = 0) -> list[Generation]:
    """Generate for one left-padded batch: each answer with why it ended and its token counts.

    With ``constraint`` (a ``JsonConstraint``) every answer is decoded under its JSON schema; ``streamer`` (a
    transformers streamer, for a batch of one) receives the text as it is generated. With ``logprobs`` each
    answer carries its token ids and their log-probabilities (and ``top_logprobs`` alternatives per step).
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
    processors = [constraint.logits_processor()] if constraint is not None else []
    recorder = TokenLogprobs(top_logprobs) if logprobs or top_logprobs else None
    if recorder is not None:
        processors.append(recorder)  # after the constraint: probabilities under the schema's mask
    extra: dict[str, Any] = {"logits_processor": processors} if processors else {}
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
    token_logprobs = recorder.finish(new) if recorder is not None else None
    stop = torch.tensor(stop_ids)
    prompt_lengths = inputs["attention_mask"].sum(dim=1).tolist() if "attention_mask" in inputs else \
        [inputs["input_ids"].shape[1]] * len(new)
    results = []
    for b, (row, prompt_len) in enumerate(zip(new, prompt_lengths)):
        ended = torch.isin(row, stop).nonzero()
        n = int(ended[0]) + 1 if len(ended) else int((row != pad_id).sum())
        text = tok.decode(row[:n], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        by_string = any(text.endswith(s) for s in sampling.stop)
        for s in sampling.stop:  # a stop string ends the answer and is not part of it
            if s in text:
                text = text[:text.index(s)]
        gen = Generation(text, not len(ended) and not by_string and n >= max_new_tokens, int(prompt_len), n)
        if token_logprobs is not None:
            gen.token_ids, gen.logprobs = row[:n].tolist(), token_logprobs[b, :n].tolist()
            if recorder.top:
                gen.top_logprobs = [list(zip(ids[b].tolist(), vals[b].tolist())) for ids, vals in
                                    recorder.alternatives[:n]]
        results.append(gen)
    return results


def generate_batch(model: Any, processor: Any, batch: dict[str, Any], max_new_tokens: int,
                   stop_ids: Sequence[int] | None = None, constraint: Any = None) -> tuple[list[str], list[bool]]:
    """Greedy answers for one left-padded batch: (texts, truncated), where truncated says that an answer hit
    ``max_new_tokens`` before its end-of-turn token."""
    results = generate(model, processor, batch, max_new_tokens, stop_ids, constraint)
    return [r.text for r in results], [r.truncated for r in results]
