"""How sure the model is of each field: confidences from the log-probabilities of the tokens it generated.

A leaf value's confidence is the probability, under the distribution each token was drawn from (after the JSON
schema's mask), of the tokens that spell it: for a string, from its opening to its closing quote (so the end of the
value counts too: "D2" and "D29" differ there); for a number, ``true``, ``false`` or ``null``, its characters and
the token that ends it. A token that spans a value's edge counts for that value. A document's confidence is the
product of its fields' confidences: the model's probability that every value is as written.

Fields are named as the metrics name them (``products[0].cases``), so each confidence can be checked against
whether that field was right (``evaluation.calibration``).
"""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

from ..evaluation.metrics import parse_json


class _Walker:
    """Character spans of the leaf values of a JSON text (strict JSON; anything else raises ValueError)."""

    def __init__(self, text: str):
        self.s, self.i = text, 0
        self.spans: dict[str, tuple[int, int, bool]] = {}

    def ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t\r\n":
            self.i += 1

    def string(self) -> None:
        assert self.s[self.i] == '"'
        self.i += 1
        while self.s[self.i] != '"':
            self.i += 2 if self.s[self.i] == "\\" else 1
        self.i += 1

    def value(self, path: str) -> None:
        self.ws()
        c = self.s[self.i]
        start = self.i
        if c in "{[":
            closer = "}" if c == "{" else "]"
            self.i += 1
            self.ws()
            if self.s[self.i] == closer:
                self.i += 1
                self.spans[path or "$"] = (start, self.i, False)
                return
            k = 0
            while True:
                if c == "{":
                    self.ws()
                    k0 = self.i
                    self.string()
                    key = json.loads(self.s[k0:self.i])
                    self.ws()
                    if self.s[self.i] != ":":
                        raise ValueError("expected ':'")
                    self.i += 1
                    self.value(f"{path}.{key}" if path else str(key))
                else:
                    self.value(f"{path}[{k}]")
                    k += 1
                self.ws()
                if self.s[self.i] == ",":
                    self.i += 1
                    continue
                if self.s[self.i] != closer:
                    raise ValueError(f"expected '{closer}'")
                self.i += 1
                return
        if c == '"':
            self.string()
            self.spans[path or "$"] = (start, self.i, True)
            return
        while self.i < len(self.s) and self.s[self.i] not in ",]} \t\r\n":
            self.i += 1
        literal = self.s[start:self.i]
        if literal not in ("true", "false", "null"):
            float(literal)  # a number, or ValueError
            if literal.lower() in ("nan", "inf", "-inf", "infinity", "-infinity") or literal.startswith(("+", ".")):
                raise ValueError(f"not a JSON number: {literal!r}")
        self.spans[path or "$"] = (start, self.i, False)


def leaf_spans(text: str) -> dict[str, tuple[int, int, bool]] | None:
    """{field path: (start, end, is_string)} for each leaf of a JSON text; None when it is not strict JSON."""
    w = _Walker(text)
    try:
        w.value("")
        w.ws()
    except (IndexError, ValueError, AssertionError):
        return None
    return w.spans if w.i == len(text) else None


def token_ends(tokenizer: Any, ids: Sequence[int]) -> list[int]:
    """The end offset, in the decoded answer, of each token (prefix decoding: byte-level tokens that split a
    character end where the character does)."""
    ends, prev = [], 0
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:k], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        n = len(text.rstrip("\ufffd")) if text.endswith("\ufffd") else len(text)
        prev = max(prev, n)
        ends.append(prev)
    return ends


def field_confidences(text: str, ids: Sequence[int], logprobs: Sequence[float], tokenizer: Any
                      ) -> dict[str, float] | None:
    """Confidence of each leaf field of an answer, or None when the answer is not strict JSON."""
    spans = leaf_spans(text)
    if spans is None or not ids:
        return None
    ends = token_ends(tokenizer, ids)
    starts = [0] + ends[:-1]
    out = {}
    for path, (a, b, is_string) in spans.items():
        total, pending, hit = 0.0, 0.0, False
        for k, (s, e) in enumerate(zip(starts, ends)):
            if e == s:  # no text of its own yet (the first bytes of a split character): counts with the rest
                pending += logprobs[k]
                continue
            if e <= a:  # before the value
                pending = 0.0
                continue
            total += pending + logprobs[k]
            pending, hit = 0.0, True
            # a string ends with its closing quote; a number or literal with the token that ends it
            if (is_string and e >= b) or (not is_string and e > b):
                break
        out[path] = math.exp(total) if hit else 1.0
    return out


def document_confidence(fields: dict[str, float] | None) -> float | None:
    if fields is None:
        return None
    return math.prod(fields.values()) if fields else 1.0


def confidence_of(generation: Any, tokenizer: Any) -> dict[str, Any] | None:
    """``{"document": p, "fields": {path: p}}`` of a generation made with ``logprobs``; None without them, for an
    answer cut off at ``max_new_tokens``, or when its text is not valid JSON (as ``extraction_result`` judges it)."""
    if generation.logprobs is None or generation.truncated or not parse_json(generation.text)[0]:
        return None
    fields = field_confidences(generation.text, generation.token_ids, generation.logprobs, tokenizer)
    if fields is None:
        return None
    return {"document": round(document_confidence(fields), 6), "fields": {k: round(v, 6) for k, v in fields.items()}}


def review(confidence: dict[str, Any] | None, threshold: float) -> dict[str, Any]:
    """The ``needs_review`` flag of one answer: set when any field is under ``threshold`` (or when there is no
    confidence because the answer is not valid JSON), with the fields under it."""
    if confidence is None:
        return {"needs_review": True, "review_fields": []}
    low = sorted(k for k, v in confidence["fields"].items() if v < threshold)
    return {"needs_review": bool(low), "review_fields": low}
