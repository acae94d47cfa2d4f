"""Always-valid JSON: decoding constrained to a JSON Schema (the run's learnt one, or a caller's).

``JsonConstraint`` compiles a schema with xgrammar for a processor's tokenizer and yields a fresh
``transformers`` logits processor per ``generate`` call; the grammar uses the same separators as the
training answers (``json.dumps`` defaults), so the constrained text is what the model learnt.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

# xgrammar 0.2 lowers a string with minLength/maxLength (every string of a learnt schema has maxLength) to a
# repetition of the class below (mlc-ai/xgrammar#800, open): no escapes, so a value holding a quote, a backslash or
# a line break (a multi-line address) cannot be written and the model is pushed to something else; and raw control
# characters U+0000-U+001F other than CR/LF allowed, which no JSON parser accepts. The grammar is printed, each such
# class replaced by one JSON string character (unescaped, or an escape, each counted once as maxLength counts the
# decoded string; not the UTF-8 bytes of a lone surrogate, which xgrammar's classes otherwise take as one character
# and which decode to three U+FFFD), and compiled from that text.
_BOUNDED_STRING_CHAR = r'(([^\"\\\r\n]))'  # as xgrammar prints it
_JSON_STRING_CHAR = r'(([^\0-\x1f\"\\\uD800-\uDFFF]) | ("\\" qwenvl_json_escape))'
_JSON_ESCAPE_RULE = r'qwenvl_json_escape ::= (([\"\\/bfnrt]) | ("u" [A-Fa-f0-9]{4, 4}))'


def json_schema_grammar(schema: dict[str, Any]) -> Any:
    """The xgrammar grammar of ``schema``'s JSON texts, written with ``json.dumps``' default separators; strings
    with length bounds repaired (see ``_BOUNDED_STRING_CHAR``)."""
    import xgrammar as xgr

    grammar = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, separators=(", ", ": "))
    text = str(grammar)
    if _BOUNDED_STRING_CHAR not in text:
        return grammar
    return xgr.Grammar.from_ebnf(text.replace(_BOUNDED_STRING_CHAR, _JSON_STRING_CHAR) + "\n" + _JSON_ESCAPE_RULE + "\n")


class JsonConstraint:
    """A schema compiled for one tokenizer; ``logits_processor()`` gives a fresh processor per generate call."""

    def __init__(self, schema: dict[str, Any], processor: Any, vocab_size: int, stop_ids: Sequence[int]):
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(processor.tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=list(stop_ids))
        self.schema = schema
        self.compiled = xgr.GrammarCompiler(info).compile_grammar(json_schema_grammar(schema))

    def logits_processor(self):
        from xgrammar.contrib.hf import LogitsProcessor

        return LogitsProcessor(self.compiled)


def constraint_for(model: Any, processor: Any, schema: dict[str, Any] | None) -> JsonConstraint | None:
    if schema is None:
        return None
    from ..modeling.generate import stop_token_ids

    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return JsonConstraint(schema, processor, cfg.vocab_size, stop_token_ids(model, processor))
