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
