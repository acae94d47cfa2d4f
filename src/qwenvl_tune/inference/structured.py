"""Always-valid JSON: decoding constrained to a JSON Schema (the run's learnt one, or a caller's).

``JsonConstraint`` compiles a schema with xgrammar for a processor's tokenizer and yields a fresh
``transformers`` logits processor per ``generate`` call; the grammar uses the same separators as the
training answers (``json.dumps`` defaults), so the constrained text is what the model learnt.
"""

from __future__ import annotations

import json
from typing import Any, Sequence


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


def constraint_for(model: Any, processor: Any, schema: dict[str, Any] | None) -> JsonConstraint | None:
    if schema is None:
        return None
    from ..modeling.generate import stop_token_ids

    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return JsonConstraint(schema, processor, cfg.vocab_size, stop_token_ids(model, processor))
