"""Always-valid JSON: a schema learnt from the training answers, and decoding constrained to it.

``infer_schema`` derives a JSON Schema from the training answers: keys in their usual order,
nesting, value types, which keys are always present (``required``), no other keys, and length
bounds (strings and arrays at most twice the longest seen) so constrained generation always
finishes. ``JsonConstraint`` compiles it with xgrammar for a processor's tokenizer and yields a
fresh ``transformers`` logits processor per ``generate`` call; the grammar uses the same separators
as the training answers (``json.dumps`` defaults), so the constrained text is what the model learnt.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

SCHEMA_FILE = "answer_schema.json"
_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null", dict: "object",
          list: "array"}


def _merge(values: Sequence[Any]) -> dict[str, Any]:
    kinds = Counter(_TYPES[type(v)] for v in values)
    schemas = []
    for kind in kinds:
        same = [v for v in values if _TYPES[type(v)] == kind]
        if kind == "object":
            order: list[str] = []
            counts: Counter = Counter()
            for obj in same:
                for k in obj:
                    if k not in counts:
                        order.append(k)
                    counts[k] += 1
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


def infer_schema(answers: Iterable[Any]) -> dict[str, Any] | None:
    """A JSON Schema covering every JSON answer; None when the answers are not JSON objects/arrays."""
    values = []
    for a in answers:
        if isinstance(a, str):
            try:
                a = json.loads(a)
            except json.JSONDecodeError:
                return None
        if not isinstance(a, (dict, list)):
            return None
        values.append(a)
    if not values:
        return None
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **_merge(values)}


def save_schema(run_dir: str | Path, schema: dict[str, Any] | None) -> Path | None:
    if schema is None:
        return None
    path = Path(run_dir) / SCHEMA_FILE
    path.write_text(json.dumps(schema, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def load_schema(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / SCHEMA_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


class JsonConstraint:
    """A schema compiled for one tokenizer; ``logits_processor()`` gives a fresh processor per generate call."""

    def __init__(self, schema: dict[str, Any], processor: Any, vocab_size: int, stop_ids: Sequence[int]):
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(processor.tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=list(stop_ids))
        self.schema = schema
        self.compiled = xgr.GrammarCompiler(info).compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(", ", ": "))

    def logits_processor(self):
        from xgrammar.contrib.hf import LogitsProcessor

        return LogitsProcessor(self.compiled)


def run_constraint(run_dir: str | Path, model: Any, processor: Any, enabled: bool) -> JsonConstraint | None:
    """The run's learnt schema compiled for this model, or None when disabled or the run has none."""
    return constraint_for(model, processor, load_schema(run_dir)) if enabled else None


def constraint_for(model: Any, processor: Any, schema: dict[str, Any] | None) -> JsonConstraint | None:
    if schema is None:
        return None
    from .generate import stop_token_ids

    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return JsonConstraint(schema, processor, cfg.vocab_size, stop_token_ids(model, processor))
