"""Extraction metrics. Pure functions: no model code, no I/O.

- ``edit_distance``: the guide's normalised Levenshtein distance (distance / longer length).
- ``parse_json``: strict parse; ``json_valid`` is the strict parse rate.
- field metrics on flattened key paths (``products[2].cases``): precision, recall,
  F1 and per-field accuracy (``products[].cases`` aggregates list items).
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from rapidfuzz.distance import Levenshtein

_MISSING = object()


def edit_distance(pred: str, gold: str) -> float:
    """Levenshtein distance over the longer length: 0 identical, 1 nothing in common."""
    longest = max(len(pred), len(gold))
    if longest == 0:
        return 0.0
    return Levenshtein.distance(pred, gold) / longest


def parse_json(text: str) -> tuple[bool, Any]:
    """Strict JSON parse of a model output (surrounding whitespace allowed). Returns (ok, value)."""
    try:
        return True, json.loads(text)
    except (json.JSONDecodeError, RecursionError, TypeError):
        return False, None


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Leaf values by key path: ``{"a": [{"b": 1}]}`` -> ``{"a[0].b": 1}``. Empty containers are leaves."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict) and obj:
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, list) and obj:
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}[{i}]"))
    else:
        out[prefix or "$"] = obj
    return out


_INDEX = re.compile(r"\[\d+\]")


def field_name(path: str) -> str:
    """``products[2].cases`` -> ``products[].cases``: the field, whatever the list position."""
    return _INDEX.sub("[]", path)


def normalize_value(value: Any, *, casefold: bool = False, whitespace: bool = True, numeric: bool = False) -> Any:
    """Comparable form of a leaf value. By default only whitespace runs are collapsed."""
    if isinstance(value, str):
        v = " ".join(value.split()) if whitespace else value
        if casefold:
            v = v.casefold()
        if numeric:
            try:
                f = float(v.replace(",", ""))
                if math.isfinite(f):
                    return f
            except ValueError:
                pass
        return v
    if numeric and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


@dataclass
class SampleScore:
    edit_distance: float
    json_valid: bool
    exact_match: bool
    truncated: bool = False
    tp: int = 0
    fp: int = 0
    fn: int = 0
    # field name -> (correct, total) over gold leaves of this sample
    fields: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else (1.0 if self.fn == 0 else 0.0)

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(precision=self.precision, recall=self.recall, f1=self.f1)
        d["fields"] = {k: list(v) for k, v in self.fields.items()}
        return d


def score_sample(pred_text: str, gold: Any, *, truncated: bool = False, **normalize: bool) -> SampleScore:
    """Score one prediction against its gold answer (a JSON value or a string).

    Field counts: a gold leaf matched by an equal predicted leaf at the same path
    is a true positive; a gold leaf that is missing or different is a false
    negative; a predicted leaf that is extra or different is a false positive.
    """
    gold_text = gold if isinstance(gold, str) else json.dumps(gold, ensure_ascii=False)
    ok, pred = parse_json(pred_text)
    gold_is_json = not isinstance(gold, str)
    if not gold_is_json:
        g_ok, g_val = parse_json(gold)
        if g_ok and isinstance(g_val, (dict, list)):
            gold, gold_is_json = g_val, True
    score = SampleScore(edit_distance(pred_text.strip(), gold_text.strip()), ok, False, truncated)
    if not gold_is_json:
        score.exact_match = pred_text.strip() == gold_text.strip()
        return score
    gold_flat = {k: normalize_value(v, **normalize) for k, v in flatten(gold).items()}
    pred_flat = {k: normalize_value(v, **normalize) for k, v in flatten(pred).items()} if ok else {}
    per_field: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for path, g in gold_flat.items():
        p = pred_flat.get(path, _MISSING)
        hit = p is not _MISSING and p == g and type(p) is type(g)
        score.tp += hit
        score.fn += not hit
        cell = per_field[field_name(path)]
        cell[0] += hit
        cell[1] += 1
    score.fp = sum(1 for path, p in pred_flat.items()
                   if not (path in gold_flat and gold_flat[path] == p and type(gold_flat[path]) is type(p)))
    score.fields = {k: (v[0], v[1]) for k, v in per_field.items()}
    # Exact match is strict: the parsed document equals the gold one, no normalisation.
    score.exact_match = bool(ok and pred == gold)
    return score


def aggregate(scores: Iterable[SampleScore]) -> dict[str, Any]:
    """Dataset-level metrics: means of per-sample values, micro-averaged field P/R/F1, per-field accuracy."""
    scores = list(scores)
    n = len(scores)
    if n == 0:
        return {"n": 0}
    tp, fp, fn = (sum(getattr(s, a) for s in scores) for a in ("tp", "fp", "fn"))
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    per_field: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for s in scores:
        for k, (c, t) in s.fields.items():
            per_field[k][0] += c
            per_field[k][1] += t
    return {
        "n": n,
        "edit_distance": sum(s.edit_distance for s in scores) / n,
        "json_valid": sum(s.json_valid for s in scores) / n,
        "exact_match": sum(s.exact_match for s in scores) / n,
        "truncated": sum(s.truncated for s in scores) / n,
        "field_precision": p,
        "field_recall": r,
        "field_f1": 2 * p * r / (p + r) if p + r else 0.0,
        "field_accuracy": tp / (tp + fn) if tp + fn else 0.0,
        "per_field_accuracy": {k: c / t for k, (c, t) in sorted(per_field.items())},
        "per_field_support": {k: t for k, (_, t) in sorted(per_field.items())},
    }


SCALAR_METRICS = ("edit_distance", "json_valid", "exact_match", "field_precision", "field_recall", "field_f1",
                  "field_accuracy", "truncated")
