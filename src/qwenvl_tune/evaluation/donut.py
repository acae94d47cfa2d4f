"""The Donut protocol: the tree-edit accuracy and field F1 that CORD / CC-OCR numbers (and those reported for
Qwen2.5-VL) are computed with, as Donut's ``JSONParseEvaluator`` defines them, so scores can be put beside
published ones. Pure functions; no model code.

Definitions (reproduced, tested against donut-python's own evaluator):

- **normalisation**: empty values are dropped; object keys sorted by (length, key); every value becomes a list;
  a list of objects keeps its non-empty objects, any other list keeps its str/int/float items as stripped
  strings; a scalar becomes a one-string list.
- **nTED accuracy**: ``max(0, 1 - TED(pred, gold) / TED(empty, gold))`` on trees of the normalised values
  (``<root>``, key nodes, ``<subtree>`` per object in a list, ``<leaf>text`` leaves); inserting or deleting a
  leaf costs its text length, any other node 1; relabelling two leaves costs their character edit distance, a
  leaf and a non-leaf ``1 +`` the leaf's length, two non-leaves 0 or 1.
- **field F1**: micro over the whole set: fields are (dotted key path, value) pairs of the normalised values
  (list positions dropped), matched as a multiset; ``F1 = tp / (tp + (fn + fp) / 2)``.
"""

from __future__ import annotations

from typing import Any, Iterable

from rapidfuzz.distance import Levenshtein

LEAF = "<leaf>"


def normalize(data: Any) -> Any:
    if not data:
        return {}
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key in sorted(data, key=lambda k: (len(k), k)):
            value = normalize(data[key])
            if value:
                out[key] = value if isinstance(value, list) else [value]
        return out
    if isinstance(data, list):
        if all(isinstance(item, dict) for item in data):
            return [n for n in (normalize(item) for item in data) if n]
        return [str(item).strip() for item in data if type(item) in (str, int, float) and str(item).strip()]
    return [str(data).strip()]


def fields(data: Any, key: str = "") -> list[tuple[str, Any]]:
    """(dotted key path, value) pairs; list items share their list's path."""
    out: list[tuple[str, Any]] = []
    if type(data) is dict:
        for k, v in data.items():
            out += fields(v, f"{key}.{k}" if key else k)
    elif type(data) is list:
        for item in data:
            out += fields(item, key)
    else:
        out.append((key, data))
    return out


def _tree(data: Any, label: str, nodes: list[str], adj: list[list[int]]) -> None:
    i = len(nodes)
    nodes.append(label)
    adj.append([])
    if isinstance(data, dict):
        kids = list(data.items())
    elif isinstance(data, list) and all(isinstance(item, dict) for item in data):
        kids = [("<subtree>", item) for item in data]
    elif isinstance(data, list):
        for item in data:
            adj[i].append(len(nodes))
            nodes.append(f"{LEAF}{item}")
            adj.append([])
        return
    else:  # normalisation leaves only dicts and lists
        raise TypeError(f"unexpected value in a normalised tree: {data!r}")
    for key, value in kids:
        adj[i].append(len(nodes))
        _tree(value, key, nodes, adj)


def tree(data: Any) -> tuple[list[str], list[list[int]]]:
    nodes: list[str] = []
    adj: list[list[int]] = []
    _tree(data, "<root>", nodes, adj)
    return nodes, adj


def _cost(a: str | None, b: str | None) -> float:
    if a is None or b is None:  # insertion or deletion
        label = b if a is None else a
        return len(label.replace(LEAF, "")) if LEAF in label else 1
    a_leaf, b_leaf = LEAF in a, LEAF in b
    if a_leaf and b_leaf:
        return Levenshtein.distance(a.replace(LEAF, ""), b.replace(LEAF, ""))
    if a_leaf or b_leaf:
        return 1 + len((a if a_leaf else b).replace(LEAF, ""))
    return int(a != b)


def _ted(x: tuple[list[str], list[list[int]]], y: tuple[list[str], list[list[int]]]) -> float:
    from edist.ted import ted

    return ted(x[0], x[1], y[0], y[1], _cost)


def ted_accuracy(pred: Any, gold: Any) -> float:
    """Donut's nTED accuracy of one prediction (a parsed JSON value, or None when nothing parsed)."""
    g = tree(normalize(gold))
    denom = _ted(tree(normalize({})), g)
    if denom == 0:
        return 1.0 if _ted(tree(normalize(pred)), g) == 0 else 0.0
    return max(0.0, 1.0 - _ted(tree(normalize(pred)), g) / denom)


def field_counts(pred: Any, gold: Any) -> tuple[int, int]:
    """(true positives, false negatives + false positives) of one prediction."""
    p, answer = fields(normalize(pred)), fields(normalize(gold))
    tp = wrong = 0
    for f in p:
        if f in answer:
            tp += 1
            answer.remove(f)
        else:
            wrong += 1
    return tp, wrong + len(answer)


def f1(pairs: Iterable[tuple[Any, Any]]) -> float:
    """Donut's micro field F1 over (prediction, gold) pairs; 0 when there are no fields at all."""
    tp = wrong = 0
    for pred, gold in pairs:
        t, w = field_counts(pred, gold)
        tp, wrong = tp + t, wrong + w
    return tp / (tp + wrong / 2) if tp + wrong else 0.0
