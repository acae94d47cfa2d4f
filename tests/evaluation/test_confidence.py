"""Per-field confidence from token log-probabilities, and its calibration: spans, products, bins, review."""

from __future__ import annotations

import json
import math

import pytest

from qwenvl_tune.evaluation.calibration import field_outcomes, reliability, review_at
from qwenvl_tune.evaluation.metrics import flatten
from qwenvl_tune.inference.confidence import field_confidences, leaf_spans, review


class PieceTokenizer:
    """Decodes ids to fixed text pieces (``decode`` as a Hugging Face tokenizer does, special tokens dropped)."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return "".join(self.pieces[i] for i in ids if not (skip_special_tokens and self.pieces[i] == "<|im_end|>"))


@pytest.mark.parametrize("text", [
    '{"a": "D29", "b": [1, {"c": null}], "e": {}, "f": [], "g": -1.5e3, "h": true}',
    '[{"x": "q\\"uote\\\\"}, {"y": "ü"}]',
    ' {"nested": {"deep": [[1, 2], [3]]}} ',
    '"just a string"',
])
def test_leaf_spans_name_every_leaf_as_the_metrics_do(text):
    spans = leaf_spans(text)
    assert set(spans) == set(flatten(json.loads(text)))
    for path, (a, b, is_string) in spans.items():
        assert json.loads(text[a:b]) == flatten(json.loads(text))[path]
        assert is_string == text[a:b].startswith('"')


@pytest.mark.parametrize("text", ['{"a": 1,}', '{"a" 1}', "[1, 2", "nope", '{"a": "x"} extra'])
def test_leaf_spans_refuse_what_is_not_strict_json(text):
    assert leaf_spans(text) is None


def test_a_fields_confidence_is_the_probability_of_the_tokens_that_spell_it():
    # {"dock": "D29", "n": 12}<|im_end|> in pieces that straddle the values' edges, as BPE does
    pieces = ['{"', 'dock', '":', ' "', 'D', '29', '",', ' "', 'n', '":', ' 1', '2', '}', "<|im_end|>"]
    probs = [1.0, 0.99, 1.0, 0.98, 0.9, 0.8, 0.7, 1.0, 0.97, 1.0, 0.6, 0.5, 0.4, 0.95]
    tok = PieceTokenizer(pieces)
    ids = list(range(len(pieces)))
    text = tok.decode(ids)
    conf = field_confidences(text, ids, [math.log(p) for p in probs], tok)
    # "D29": the token holding its opening quote, D, 29, and the one holding its closing quote
    assert conf["dock"] == pytest.approx(0.98 * 0.9 * 0.8 * 0.7)
    # 12: its digits and the token that ends it ("}")
    assert conf["n"] == pytest.approx(0.6 * 0.5 * 0.4)
    assert all(0.0 <= c <= 1.0 for c in conf.values())


def test_characters_split_over_tokens_count_once():
    # byte-level tokens: "ü" is two bytes, decoded only once both tokens are there
    class Bytes(PieceTokenizer):
        def decode(self, ids, **kw):
            raw = b"".join(self.pieces[i] for i in ids)
            return raw.decode("utf-8", errors="replace")

    pieces = [b'{"k": "', "ü".encode()[:1], "ü".encode()[1:], b'x"}']
    tok = Bytes(pieces)
    conf = field_confidences('{"k": "üx"}', [0, 1, 2, 3], [math.log(0.9), math.log(0.5), math.log(0.8), 0.0], tok)
    assert conf["k"] == pytest.approx(0.9 * 0.5 * 0.8)


def test_review_flags_fields_under_the_threshold_and_answers_without_confidence():
    assert review({"document": 0.5, "fields": {"a": 0.99, "b": 0.6}}, 0.9) == \
        {"needs_review": True, "review_fields": ["b"]}
    assert review({"document": 0.9, "fields": {"a": 0.99}}, 0.9) == {"needs_review": False, "review_fields": []}
    assert review(None, 0.9)["needs_review"] is True


def test_reliability_bins_and_ece_by_hand():
    pairs = [(0.95, True), (0.95, True), (0.95, False), (0.95, True), (0.55, False), (0.55, True), (1.0, True)]
    rel = reliability(pairs)
    bins = {(round(b["from"], 1)): b for b in rel["bins"]}
    assert bins[0.9]["n"] == 5 and bins[0.9]["accuracy"] == pytest.approx(0.8)
    assert bins[0.9]["confidence"] == pytest.approx((0.95 * 4 + 1.0) / 5)
    assert bins[0.5]["accuracy"] == 0.5
    expected = 5 / 7 * abs(0.8 - 0.96) + 2 / 7 * abs(0.5 - 0.55)
    assert rel["ece"] == pytest.approx(expected, abs=1e-6)


def test_review_threshold_splits_as_documented():
    docs = [{"fields": [(0.99, True), (0.97, True)], "confidence": 0.96, "exact": True},
            {"fields": [(0.99, True), (0.6, False)], "confidence": 0.59, "exact": False},
            {"fields": [], "confidence": None, "exact": False}]  # an answer that does not parse
    r = review_at(docs, 0.9)
    assert r["documents_flagged"] == 2 and r["share_documents_flagged"] == pytest.approx(2 / 3)
    assert r["fields_flagged"] == 1
    assert r["field_accuracy_unflagged"] == 1.0 and r["field_accuracy_flagged"] == 0.0
    assert r["exact_match_unflagged"] == 1.0
    assert review_at(docs, 0.5)["documents_flagged"] == 1  # only the one without confidences


def test_field_outcomes_use_the_metrics_normalisation_and_json_string_gold():
    conf = {"document": 0.5, "fields": {"a": 0.9, "b[0]": 0.8, "c": 0.7}}
    out = field_outcomes('{"a": "X  Y", "b": ["1"], "c": "z"}', json.dumps({"a": "x y", "b": ["1"], "c": "q"}),
                         conf, casefold=True, whitespace=True)
    assert out == [(0.9, True), (0.8, True), (0.7, False)]
