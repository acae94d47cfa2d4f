"""Extraction metrics. Pure functions: no model code, no I/O.

- ``edit_distance``: the guide's normalised Levenshtein distance (distance / longer length), C-backed.
- ``parse_json``: strict parse; ``json_valid`` is the strict parse rate. ``repair_json`` strips code
  fences and closes truncated brackets; outputs that parse only after repair are counted apart
  (``json_repaired``) and never as valid.
- field metrics on flattened key paths (``products[2].cases``): precision, recall, F1 and
  per-field accuracy (``products[].cases`` aggregates list items); lists compared by position or,
  with ``list_matching="unordered"``, after an optimal item-to-item assignment; values compared
  after configurable normalisation.
- ``ted_accuracy``: 1 - TED(pred, gold) / TED(empty, gold), floored at 0 (tree edit distance as
  used for document parsing, e.g. Donut), computed with a Cython TED.
- exact document match and the rate of outputs cut off by ``max_new_tokens``.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import numpy as np
from rapidfuzz.distance import Levenshtein

from ..config import METRICS
from ..data.records import loads_json

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
        return True, loads_json(text)
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


_FENCE = re.compile(r"^\s*```[a-zA-Z]*\s*\n?(.*?)\n?\s*(```\s*)?$", re.S)


def repair_json(text: str) -> tuple[bool, Any]:
    """Parse after lenient repair: code fences and surrounding prose stripped, truncated strings,
    objects and arrays closed, a dangling comma or key dropped. Returns (ok, value)."""
    m = _FENCE.match(text)
    if m:
        text = m.group(1)
    starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    if not starts:
        return False, None
    text = text[min(starts):]
    ok, value = parse_json(text)
    if ok:
        return ok, value
    # close what is open, scanning with a stack (strings respected)
    stack: list[str] = []
    in_str = esc = False
    last_complete = 0
    for i, ch in enumerate(text):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]":
            if not stack:
                text = text[:i]
                break
            stack.pop()
            if not stack:
                last_complete = i + 1
                break
    candidates = []
    if last_complete:
        candidates.append(text[:last_complete])
    body = text + ('"' if in_str else "")
    closing = "".join(reversed(stack))
    candidates.append(body + closing)
    trimmed = re.sub(r',\s*("[^"]*"\s*:?\s*)?$', "", body.rstrip())
    candidates.append(trimmed + closing)
    trimmed2 = re.sub(r',?\s*"[^"]*"\s*:\s*("[^"]*)?$', "", body.rstrip())
    candidates.append(trimmed2 + closing)
    for c in candidates:
        ok, value = parse_json(c)
        if ok:
            return True, value
    return False, None


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


def _tree(value: Any, label: str, nodes: list[str], adj: list[list[int]]) -> None:
    i = len(nodes)
    nodes.append(label)
    adj.append([])
    if isinstance(value, dict):
        # an object's keys have no order: sorted, so {"b", "a"} and {"a", "b"} are the same tree
        kids = [(f"<{k}>", v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))]
    elif isinstance(value, list):
        kids = [("<item>", v) for v in value]
    else:
        adj[i].append(len(nodes))
        nodes.append(json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value)
        adj.append([])
        return
    for lab, v in kids:
        adj[i].append(len(nodes))
        _tree(v, lab, nodes, adj)


def json_tree(value: Any) -> tuple[list[str], list[list[int]]]:
    """A JSON value as a labelled tree (depth-first node list + child lists), rooted at '<root>'; list items keep
    their order, object keys are sorted."""
    nodes: list[str] = []
    adj: list[list[int]] = []
    if value is None:
        return ["<root>"], [[]]
    _tree(value, "<root>", nodes, adj)
    return nodes, adj


def ted_accuracy(pred: Any, gold: Any) -> float:
    """1 - TED(pred, gold) / TED(empty, gold), floored at 0. ``pred=None`` means nothing parsed."""
    from edist.ted import standard_ted

    g_nodes, g_adj = json_tree(gold)
    p_nodes, p_adj = json_tree(pred)
    denom = standard_ted(["<root>"], [[]], g_nodes, g_adj)
    if denom == 0:
        return 1.0 if len(p_nodes) == 1 else 0.0
    return max(0.0, 1.0 - standard_ted(p_nodes, p_adj, g_nodes, g_adj) / denom)


def _similarity(a: Any, b: Any) -> int:
    fa, fb = flatten(a), flatten(b)
    return sum(1 for k, v in fb.items() if k in fa and fa[k] == v)


def align_lists(pred: Any, gold: Any) -> Any:
    """Reorder every list in ``pred`` to best match the list at the same place in ``gold``.

    Items are paired by an optimal assignment (most equal leaves); unmatched predicted items
    keep their relative order after the matched ones.
    """
    if isinstance(gold, dict) and isinstance(pred, dict):
        return {k: align_lists(v, gold[k]) if k in gold else v for k, v in pred.items()}
    if isinstance(gold, list) and isinstance(pred, list) and pred and gold:
        from scipy.optimize import linear_sum_assignment

        sim = np.array([[_similarity(p, g) for g in gold] for p in pred], dtype=float)
        rows, cols = linear_sum_assignment(-sim)
        placed: list[Any] = [None] * len(gold)
        used = set()
        for r, c in zip(rows, cols):
            placed[c] = align_lists(pred[r], gold[c])
            used.add(r)
        # gold slots with no predicted item stay empty (a sentinel that never equals a gold leaf)
        out = [p if p is not None else UNMATCHED for p in placed]
        return out + [pred[i] for i in range(len(pred)) if i not in used]
    return pred


UNMATCHED = {"__unmatched__": True}


def without_placeholders(value: Any) -> Any:
    """``align_lists``' output without its empty gold slots: the prediction itself, reordered."""
    if isinstance(value, dict):
        return {k: without_placeholders(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_placeholders(v) for v in value if v is not UNMATCHED and v != UNMATCHED]
    return value


@dataclass
class SampleScore:
    edit_distance: float
    json_valid: bool
    exact_match: bool
    truncated: bool = False
    json_repaired: bool = False
    ted_accuracy: float = 0.0
    # Donut's protocol (evaluation/donut.py), for comparison with published numbers
    donut_ted_accuracy: float = 0.0
    donut_tp: int = 0
    donut_wrong: int = 0
    tp: int = 0
    fp: int = 0
    fn: int = 0
    # whole list items (an item counts only when every one of its fields is right), per list: (tp, fp, fn)
    items: dict[str, tuple[int, int, int]] = field(default_factory=dict)
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
        d["items"] = {k: list(v) for k, v in self.items.items()}
        return d


def score_sample(pred_text: str, gold: Any, *, truncated: bool = False, list_matching: str = "position",
                 casefold: bool = False, whitespace: bool = True, numeric: bool = False) -> SampleScore:
    """Score one prediction against its gold answer (a JSON value or a string).

    Field counts: a gold leaf matched by an equal predicted leaf at the same path is a true
    positive; a gold leaf that is missing or different is a false negative; a predicted leaf
    that is extra or different is a false positive. Field and tree metrics use the strictly
    parsed output only; a repaired parse is reported (``json_repaired``) but not scored.
    """
    if list_matching not in ("position", "unordered"):
        raise ValueError(f"list_matching must be 'position' or 'unordered', got {list_matching!r}")
    norm = {"casefold": casefold, "whitespace": whitespace, "numeric": numeric}
    gold_text = gold if isinstance(gold, str) else json.dumps(gold, ensure_ascii=False)
    ok, pred = parse_json(pred_text)
    repaired = not ok and repair_json(pred_text)[0]
    gold_is_json = not isinstance(gold, str)
    if not gold_is_json:
        g_ok, g_val = parse_json(gold)
        if g_ok and isinstance(g_val, (dict, list)):
            gold, gold_is_json = g_val, True
    # an output cut off by max_new_tokens never counts as valid, even when the text so far happens to parse
    score = SampleScore(edit_distance(pred_text.strip(), gold_text.strip()), ok and not truncated, False, truncated,
                        repaired)
    if not gold_is_json:
        score.exact_match = pred_text.strip() == gold_text.strip()
        score.ted_accuracy = score.donut_ted_accuracy = 1.0 if score.exact_match else 0.0
        return score
    from . import donut

    donut_pred = pred if ok else None
    score.donut_ted_accuracy = donut.ted_accuracy(donut_pred, gold)
    score.donut_tp, score.donut_wrong = donut.field_counts(donut_pred, gold)
    if ok and list_matching == "unordered":
        pred = align_lists(pred, gold)
    # the tree of what was predicted: alignment placeholders are not part of it
    score.ted_accuracy = ted_accuracy(without_placeholders(pred) if ok else None, gold)
    gold_flat = {k: normalize_value(v, **norm) for k, v in flatten(gold).items()}
    pred_flat = {k: normalize_value(v, **norm) for k, v in flatten(pred).items()} if ok else {}
    pred_flat = {k: v for k, v in pred_flat.items() if not k.endswith("__unmatched__")}
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
    score.items = item_counts(pred if ok else None, gold, norm)
    # Exact match is strict: the parsed document equals the gold one, no normalisation, lists in order.
    score.exact_match = bool(ok and parse_json(pred_text)[1] == gold)
    return score


def _item_lists(value: Any, prefix: str = "") -> dict[str, list]:
    """Every list of objects in a JSON value, by key path (``products``, ``pages[0].lines``)."""
    out: dict[str, list] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            out.update(_item_lists(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value):
            out[prefix or "$"] = value
        for i, v in enumerate(value):
            out.update(_item_lists(v, f"{prefix}[{i}]"))
    return out


def item_counts(pred: Any, gold: Any, norm: dict[str, Any]) -> dict[str, tuple[int, int, int]]:
    """Line items scored whole, per list (by field name, ``products`` or ``pages[].lines``): an item is right
    only when all its fields equal the gold item's at the same position (after ``align_lists`` for unordered
    matching). Returns (tp, fp, fn) per list."""
    def canon(item: Any) -> dict[str, Any]:
        return {k: normalize_value(v, **norm) for k, v in flatten(item).items()}

    gold_lists, pred_lists = _item_lists(gold), _item_lists(pred) if pred is not None else {}
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for path, g_items in gold_lists.items():
        p_items = pred_lists.get(path, [])  # with alignment placeholders at gold positions, which are no items
        tp = sum(1 for p, g in zip(p_items, g_items) if p != UNMATCHED and canon(p) == canon(g))
        cell = out[field_name(path)]
        cell[0] += tp
        cell[1] += sum(1 for p in p_items if p != UNMATCHED) - tp
        cell[2] += len(g_items) - tp
    for path, p_items in pred_lists.items():  # lists the gold does not have: every item is extra
        if path not in gold_lists:
            out[field_name(path)][1] += sum(1 for i in p_items if i != UNMATCHED)
    return {k: (v[0], v[1], v[2]) for k, v in out.items()}


def _f1(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def _donut_f1(tp: int, wrong: int) -> float:
    return tp / (tp + wrong / 2) if tp + wrong else 0.0


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
    per_list: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for s in scores:
        for k, counts in s.items.items():
            for j in range(3):
                per_list[k][j] += counts[j]
    items = [sum(c[j] for c in per_list.values()) for j in range(3)]
    return {
        "item_f1": _f1(*items),
        "per_list_item_f1": {k: _f1(*c) for k, c in sorted(per_list.items())},
        "n": n,
        "edit_distance": sum(s.edit_distance for s in scores) / n,
        "json_valid": sum(s.json_valid for s in scores) / n,
        "json_repaired": sum(s.json_repaired for s in scores) / n,
        "ted_accuracy": sum(s.ted_accuracy for s in scores) / n,
        "donut_ted_accuracy": sum(s.donut_ted_accuracy for s in scores) / n,
        "donut_field_f1": _donut_f1(sum(s.donut_tp for s in scores), sum(s.donut_wrong for s in scores)),
        "exact_match": sum(s.exact_match for s in scores) / n,
        "truncated": sum(s.truncated for s in scores) / n,
        "field_precision": p,
        "field_recall": r,
        "field_f1": 2 * p * r / (p + r) if p + r else 0.0,
        "field_accuracy": tp / (tp + fn) if tp + fn else 0.0,
        "per_field_accuracy": {k: c / t for k, (c, t) in sorted(per_field.items())},
        "per_field_support": {k: t for k, (_, t) in sorted(per_field.items())},
    }


SCALAR_METRICS = tuple(METRICS)  # names and directions are declared once, in config
HIGHER_IS_BETTER = dict(METRICS)
