"""A JSON Schema learnt from the training answers (saved in the run folder; decoding is constrained to it).

``infer_schema`` derives it from the answers: keys in the order the answers write them, nesting, value types, which
keys are always present (``required``), no other keys, and length bounds (strings and arrays at most
twice the longest seen) so constrained generation always finishes.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, Iterable, Sequence

from .records import loads_json

_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null", dict: "object",
          list: "array"}


def key_order(objects: Sequence[dict[str, Any]]) -> list[str]:
    """The keys of ``objects`` in one order that agrees with how the answers write them (constrained decoding
    writes the keys in the schema's order, so a first-seen order would make the model write, say, ``total`` before
    an optional ``date`` that every answer with both puts first). Among keys free to go next, the one seen first.
    Where answers disagree, a key comes before another when more answers holding both put it first, and in a cycle
    of such majorities the key seen first goes next."""
    sequences = Counter(tuple(obj) for obj in objects)  # answers share a few key sequences
    first: dict[str, int] = {}
    for keys in sequences:
        for k in keys:
            first.setdefault(k, len(first))
    # every answer's order holds when the orders of neighbouring keys do: try those alone first (linear)
    needs: dict[str, set[str]] = {k: set() for k in first}  # key -> keys that go before it
    for keys in sequences:
        for a, b in zip(keys, keys[1:]):
            needs[b].add(a)
    order = _topological(first, needs, strict=True)
    if order is not None:
        return order
    before: Counter = Counter()  # (a, b): answers writing a before b
    for keys, n in sequences.items():
        for i, a in enumerate(keys):
            for b in keys[i + 1:]:
                before[a, b] += n
    needs = {k: set() for k in first}
    for (a, b), n in before.items():
        if n > before[b, a]:
            needs[b].add(a)
    return _topological(first, needs, strict=False)


def _topological(first: dict[str, int], needs: dict[str, set[str]], strict: bool) -> list[str] | None:
    """Keys in an order meeting ``needs``, the first seen among those free to go next; at a cycle, None when
    ``strict``, else the first seen of the rest goes next."""
    order: list[str] = []
    placed: set[str] = set()
    left = sorted(first, key=first.__getitem__)
    while left:
        ready = next((k for k in left if needs[k] <= placed), None)
        if ready is None:
            if strict:
                return None
            ready = left[0]
        order.append(ready)
        placed.add(ready)
        left.remove(ready)
    return order


def _merge(values: Sequence[Any]) -> dict[str, Any]:
    kinds = Counter(_TYPES[type(v)] for v in values)
    schemas = []
    for kind in kinds:
        same = [v for v in values if _TYPES[type(v)] == kind]
        if kind == "object":
            order = key_order(same)
            counts: Counter = Counter(k for obj in same for k in obj)
            props = {k: _merge([o[k] for o in same if k in o]) for k in order}
            schemas.append({"type": "object", "properties": props,
                            "required": [k for k in order if counts[k] == len(same)], "additionalProperties": False})
        elif kind == "array":
            items = [x for arr in same for x in arr]
            s: dict[str, Any] = {"type": "array", "maxItems": max(2 * max(len(a) for a in same), 1)}
            if items:
                s["items"] = _merge(items)
            schemas.append(s)
        elif kind == "string":
            schemas.append({"type": "string", "maxLength": max(8, 2 * max(len(v) for v in same))})
        elif kind == "number":
            schemas.append({"type": "number"})
        else:
            schemas.append({"type": kind})
    if {"integer", "number"} <= set(kinds):
        schemas = [s for s in schemas if s["type"] != "integer"]
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def _json_value(answer: Any) -> dict | list | None:
    """The answer as a JSON object or array (a string is parsed), or None when it is neither."""
    if isinstance(answer, str):
        try:
            answer = loads_json(answer)
        except json.JSONDecodeError:
            return None
    return answer if isinstance(answer, (dict, list)) else None


def _schema_of(values: Sequence[Any]) -> dict[str, Any]:
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **_merge(values)}


def infer_schema(answers: Iterable[Any]) -> dict[str, Any] | None:
    """A JSON Schema covering every JSON answer; None when the answers are not JSON objects/arrays."""
    values = [_json_value(a) for a in answers]
    return _schema_of(values) if values and all(v is not None for v in values) else None


def learn_schema(records: Sequence[Any], shown: int = 3) -> tuple[dict[str, Any] | None, str]:
    """The schema of the training records' answers, and a line saying what decoding will do with it: the places
    (file:line) of answers that are not JSON objects/arrays when there are any, as one such answer leaves
    every answer undecided by a schema."""
    values = [_json_value(r.suffix) for r in records]  # each answer parsed once
    bad = [r for r, v in zip(records, values) if v is None]
    if bad:
        where = ", ".join(f"{r.file}:{r.line}" for r in bad[:shown]) + (", ..." if len(bad) > shown else "")
        return None, (f"answer schema: none, as {len(bad)} of {len(records)} training answers are not JSON objects or "
                      f"arrays ({where}); predict, evaluate and serve decode without one")
    if not values:
        return None, "answer schema: none (no training answers)"
    return _schema_of(values), (f"answer schema: learnt from {len(records)} answers; predict, evaluate and serve "
                                f"decode under it, so every answer parses")
