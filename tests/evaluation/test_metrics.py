"""Metrics on hand-computed cases."""

import pytest

from qwenvl_tune.evaluation.metrics import aggregate, edit_distance, field_name, flatten, parse_json, score_sample


def test_edit_distance_is_levenshtein_over_longer_length():
    assert edit_distance("kitten", "sitting") == pytest.approx(3 / 7)
    assert edit_distance("", "") == 0.0
    assert edit_distance("abc", "") == 1.0
    assert edit_distance("same", "same") == 0.0


def test_parse_json_is_strict():
    assert parse_json(' {"a": 1} ') == (True, {"a": 1})
    assert parse_json('```json\n{"a": 1}\n```')[0] is False
    assert parse_json('{"a": 1')[0] is False
    # Python's json module reads NaN and Infinity; no JSON parser of a client does, so they are invalid output
    for text in ('{"a": NaN}', '[Infinity]', '{"a": -Infinity}', 'NaN'):
        assert parse_json(text) == (False, None), text
    assert parse_json('{"a": "NaN", "b": -1e400}') == (True, {"a": "NaN", "b": float("-inf")})


def test_flatten_paths():
    assert flatten({"a": [{"b": 1}, {"b": 2}], "c": {}, "d": "x"}) == {"a[0].b": 1, "a[1].b": 2, "c": {}, "d": "x"}
    assert field_name("products[12].cases") == "products[].cases"


def test_field_scores_missing_extra_wrong():
    gold = {"a": "1", "b": "2", "items": [{"x": "p"}, {"x": "q"}]}
    pred = '{"a": "1", "b": "3", "items": [{"x": "p"}], "extra": "z"}'
    s = score_sample(pred, gold)
    # gold leaves: a, b, items[0].x, items[1].x -> a and items[0].x right
    assert (s.tp, s.fn, s.fp) == (2, 2, 2)  # fp: wrong b, extra key
    assert s.precision == pytest.approx(0.5) and s.recall == pytest.approx(0.5) and s.f1 == pytest.approx(0.5)
    assert s.fields == {"a": (1, 1), "b": (0, 1), "items[].x": (1, 2)}
    assert s.json_valid and not s.exact_match


def test_non_json_output_scores_zero_fields():
    s = score_sample("I cannot read this", {"a": "1"})
    assert not s.json_valid and (s.tp, s.fn, s.fp) == (0, 1, 0) and s.f1 == 0.0


def test_exact_match_and_whitespace_normalisation():
    s = score_sample('{"a": "x  y"}', {"a": "x y"})
    assert s.tp == 1 and not s.exact_match  # values equal after whitespace folding; document not identical
    assert score_sample('{"a": "x y"}', {"a": "x y"}).exact_match
    # types matter: 1 is not "1"
    assert score_sample('{"a": 1}', {"a": "1"}).tp == 0


def test_string_targets():
    s = score_sample("hello", "hello")
    assert s.exact_match and s.edit_distance == 0.0 and not s.json_valid


def test_aggregate_micro_average():
    a = score_sample('{"a": "1", "b": "2"}', {"a": "1", "b": "2"})
    b = score_sample("oops", {"a": "1", "b": "2"})
    agg = aggregate([a, b])
    assert agg["json_valid"] == 0.5 and agg["exact_match"] == 0.5
    assert agg["field_recall"] == pytest.approx(0.5) and agg["field_precision"] == pytest.approx(1.0)
    assert agg["field_f1"] == pytest.approx(2 / 3)
    assert agg["per_field_accuracy"] == {"a": 0.5, "b": 0.5}


# ---------------------------------------------------------------- repair, TED, list matching, normalisation
from qwenvl_tune.evaluation.metrics import align_lists, repair_json, ted_accuracy  # noqa: E402


@pytest.mark.parametrize("text,value", [
    ('```json\n{"a": 1}\n```', {"a": 1}),
    ('Here it is: {"a": [1, 2]} hope that helps', {"a": [1, 2]}),
    ('{"a": "x", "b": [1, 2', {"a": "x", "b": [1, 2]}),
    ('{"a": "trunc', {"a": "trunc"}),
    ('{"a": 1, "b":', {"a": 1}),
    ('{"a": 1,', {"a": 1}),
])
def test_repair_json(text, value):
    assert repair_json(text) == (True, value)


def test_repaired_outputs_are_never_valid():
    s = score_sample('```json\n{"a": "1"}\n```', {"a": "1"})
    assert not s.json_valid and s.json_repaired and s.tp == 0 and s.fn == 1
    assert not score_sample('{"a": "1"}', {"a": "1"}).json_repaired
    assert not score_sample("no json here", {"a": "1"}).json_repaired
    agg = aggregate([s, score_sample('{"a": "1"}', {"a": "1"})])
    assert agg["json_valid"] == 0.5 and agg["json_repaired"] == 0.5


def test_ted_accuracy_hand_computed():
    gold = {"a": "1", "b": "2"}
    # gold tree: <root> -> <a> -> "1", <b> -> "2": 5 nodes, TED(empty, gold) = 4
    assert ted_accuracy(gold, gold) == 1.0
    assert ted_accuracy({"a": "1", "b": "3"}, gold) == pytest.approx(1 - 1 / 4)   # one relabel
    assert ted_accuracy({"a": "1"}, gold) == pytest.approx(1 - 2 / 4)               # <b> and its leaf deleted
    assert ted_accuracy(None, gold) == 0.0                                          # nothing parsed
    big = {"x": [1, 2, 3, 4, 5, 6, 7, 8, 9]}
    assert ted_accuracy(big, gold) == 0.0                                           # floored at 0


def test_unordered_list_matching():
    gold = {"items": [{"d": "A", "n": "1"}, {"d": "B", "n": "2"}]}
    pred = '{"items": [{"d": "B", "n": "2"}, {"d": "A", "n": "1"}]}'
    by_pos = score_sample(pred, gold)
    assert (by_pos.tp, by_pos.fn, by_pos.fp) == (0, 4, 4)
    free = score_sample(pred, gold, list_matching="unordered")
    assert (free.tp, free.fn, free.fp) == (4, 0, 0) and free.ted_accuracy == 1.0
    assert not free.exact_match  # exact match stays strict about order
    # a missing item stays missing, an extra one stays extra
    short = score_sample('{"items": [{"d": "B", "n": "2"}]}', gold, list_matching="unordered")
    assert (short.tp, short.fn, short.fp) == (2, 2, 0)
    extra = score_sample('{"items": [{"d": "C", "n": "3"}, {"d": "B", "n": "2"}, {"d": "A", "n": "1"}]}', gold,
                         list_matching="unordered")
    assert (extra.tp, extra.fn, extra.fp) == (4, 0, 2)
    assert align_lists([3, 1], [1, 2, 3]) == [1, {"__unmatched__": True}, 3]


def test_normalisation_options():
    gold = {"name": "Katie Franco", "cases": "8"}
    pred = '{"name": "KATIE  FRANCO", "cases": "8.0"}'
    assert score_sample(pred, gold).tp == 0
    assert score_sample(pred, gold, casefold=True).tp == 1
    assert score_sample(pred, gold, casefold=True, numeric=True).tp == 2
    assert score_sample('{"name": "Katie  Franco"}', {"name": "Katie Franco"}, whitespace=False).tp == 0


def test_empty_and_nested_cases():
    assert score_sample("{}", {"a": "1"}).fn == 1
    s = score_sample('{"a": {}}', {"a": {}})
    assert s.tp == 1 and s.exact_match and s.ted_accuracy == 1.0
    nested = {"p": [{"q": [{"r": "1"}, {"r": "2"}]}]}
    s = score_sample('{"p": [{"q": [{"r": "1"}, {"r": "X"}]}]}', nested)
    assert s.fields == {"p[].q[].r": (1, 2)}
