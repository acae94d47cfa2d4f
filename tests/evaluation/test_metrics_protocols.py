"""Metrics users can compare: the strict protocol's defects fixed, and Donut's protocol equal to donut-python's."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
import types
from pathlib import Path

import pytest

from qwenvl_tune.evaluation import donut
from qwenvl_tune.evaluation.metrics import aggregate, score_sample, ted_accuracy


def test_key_order_does_not_change_tree_accuracy():
    s = score_sample('{"b": "2", "a": "1"}', {"a": "1", "b": "2"})
    assert s.exact_match and s.f1 == 1.0
    assert s.ted_accuracy == 1.0  # was 0.0: an object's keys have no order


def test_unordered_matching_does_not_score_its_placeholders():
    gold = {"items": [{"n": "A"}, {"n": "B"}]}
    s = score_sample('{"items": [{"n": "B"}]}', gold, list_matching="unordered")
    itself = ted_accuracy({"items": [{"n": "B"}]}, gold)
    assert s.ted_accuracy == pytest.approx(itself) == pytest.approx(4 / 7)  # was 0.714 (5/7) with the placeholder
    assert (s.tp, s.fn, s.fp) == (1, 1, 0)


def _donut_evaluator():
    """donut-python's JSONParseEvaluator, loaded from its own source (the package's __init__ imports the
    whole model; the evaluator needs only zss and nltk)."""
    spec = importlib.util.find_spec("donut")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("donut-python is not installed (make test installs it)")
    path = Path(list(spec.submodule_search_locations)[0]) / "util.py"
    for name in ("datasets",):  # imported at the top of util.py for its dataset class, unused by the evaluator
        if importlib.util.find_spec(name) is None:
            sys.modules.setdefault(name, types.SimpleNamespace(load_dataset=None))
    module_spec = importlib.util.spec_from_file_location("donut_util_reference", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.JSONParseEvaluator()


KEYS = ["nm", "cnt", "price", "menu", "sub", "total", "a", "tax_price", "unitprice"]


def _value(rng: random.Random, depth: int):
    r = rng.random()
    if depth < 3 and r < 0.25:
        return {k: _value(rng, depth + 1) for k in rng.sample(KEYS, rng.randint(0, 4))}
    if depth < 3 and r < 0.4:
        return [_value(rng, depth + 1) if rng.random() < 0.7 else {k: _value(rng, depth + 2) for k in
                                                                      rng.sample(KEYS, rng.randint(1, 3))}
                for _ in range(rng.randint(0, 3))]
    if depth < 3 and r < 0.5:
        return [{k: _value(rng, 3) for k in rng.sample(KEYS, rng.randint(1, 3))} for _ in range(rng.randint(1, 3))]
    return rng.choice(["", " ", "cake", "2", "12,000", "juice ", "Cake", rng.randint(0, 20), 1.5, None, True,
                       "".join(rng.choice("ab 1") for _ in range(rng.randint(1, 6)))])


def _doc(rng: random.Random) -> dict:
    return {k: _value(rng, 1) for k in rng.sample(KEYS, rng.randint(1, 5))}


def _perturb(rng: random.Random, value):
    if isinstance(value, dict):
        out = {k: _perturb(rng, v) for k, v in value.items() if rng.random() > 0.15}
        if rng.random() < 0.2:
            out[rng.choice(KEYS)] = _value(rng, 2)
        return dict(rng.sample(list(out.items()), len(out)))  # any key order
    if isinstance(value, list):
        items = [_perturb(rng, v) for v in value if rng.random() > 0.15]
        rng.shuffle(items) if rng.random() < 0.3 else None
        return items
    if isinstance(value, str) and rng.random() < 0.4:
        return value[::-1] + rng.choice(["", "x", "1"])
    return value if rng.random() > 0.1 else _value(rng, 3)


def test_donut_protocol_equals_donut_pythons_evaluator_on_random_pairs():
    evaluator = _donut_evaluator()
    rng = random.Random(0)
    pairs = []
    while len(pairs) < 300:
        gold = _doc(rng)
        if not donut.normalize(gold):
            continue  # Donut divides by the gold tree's size: an empty gold has none
        pred = _perturb(rng, gold) if rng.random() < 0.8 else _doc(rng)
        pairs.append((pred, gold))
    differ = 0
    for pred, gold in pairs:
        ours, theirs = donut.ted_accuracy(pred, gold), evaluator.cal_acc(pred, gold)
        assert ours == pytest.approx(theirs, abs=1e-9), (pred, gold, ours, theirs)
        differ += ours != 1.0
    assert differ > 100  # the pairs exercise real differences, not only identities
    preds, golds = [p for p, _ in pairs], [g for _, g in pairs]
    assert donut.f1(pairs) == pytest.approx(evaluator.cal_f1(preds, golds), abs=1e-9)
    # the same numbers come out of the scorer's aggregate, beside the strict protocol's
    import json

    scores = [score_sample(json.dumps(p), g) for p, g in pairs]
    agg = aggregate(scores)
    assert agg["donut_field_f1"] == pytest.approx(evaluator.cal_f1(preds, golds), abs=1e-9)
    assert agg["donut_ted_accuracy"] == pytest.approx(sum(evaluator.cal_acc(p, g) for p, g in pairs) / len(pairs),
                                                      abs=1e-9)


def test_line_items_count_only_when_every_field_is_right():
    gold = {"items": [{"n": "A", "q": "1"}, {"n": "B", "q": "2"}], "total": "3"}
    s = score_sample('{"items": [{"n": "A", "q": "1"}, {"n": "B", "q": "3"}], "total": "3"}', gold)
    assert s.items == {"items": (1, 1, 1)}  # the second item has one wrong field: wrong as a whole
    assert (s.tp, s.fp, s.fn) == (4, 1, 1)  # while 4 of its 5 fields are right
    agg = aggregate([s])
    assert agg["item_f1"] == pytest.approx(0.5) and agg["per_list_item_f1"] == {"items": pytest.approx(0.5)}
    # order: positional matching counts a swapped pair wrong, unordered matching right
    swapped = '{"items": [{"n": "B", "q": "2"}, {"n": "A", "q": "1"}], "total": "3"}'
    assert score_sample(swapped, gold).items == {"items": (0, 2, 2)}
    assert score_sample(swapped, gold, list_matching="unordered").items == {"items": (2, 0, 0)}
    # a missing item is a miss, an extra one a false positive, an unparsable answer misses all
    assert score_sample('{"items": [{"n": "A", "q": "1"}]}', gold, list_matching="unordered").items == {"items": (1, 0, 1)}
    assert score_sample("not json", gold).items == {"items": (0, 0, 2)}
    nested = {"pages": [{"lines": [{"t": "x"}, {"t": "y"}]}]}
    assert score_sample(json.dumps(nested), nested).items == {"pages": (1, 0, 0), "pages[].lines": (2, 0, 0)}


def test_protocol_chooses_what_is_shown_and_metrics_json_keeps_both(tmp_path, capsys):
    import json as _json

    from qwenvl_tune.cli import main

    gold = tmp_path / "gold.jsonl"
    gold.write_text("\n".join(_json.dumps({"id": str(i), "gold": {"a": str(i), "b": "x"}}) for i in range(3)) + "\n")
    pred = tmp_path / "pred.jsonl"
    pred.write_text("\n".join(_json.dumps({"id": str(i), "output": _json.dumps({"a": str(i), "b": "y"})})
                              for i in range(3)) + "\n")
    shown = {}
    for protocol in ("donut", "strict", "both"):
        assert main(["score", "--pred", str(pred), "--gold", str(gold), "--out", str(tmp_path / protocol),
                     "--protocol", protocol]) == 0
        table = capsys.readouterr().out.split("\n\nwritten:")[0]
        shown[protocol] = {line.split()[0] for line in table.splitlines()[2:] if line and not line.startswith(" ")}
        saved = _json.loads((tmp_path / protocol / "metrics.json").read_text())
        assert saved["protocol"] == protocol and {"donut_field_f1", "field_f1"} <= set(saved["finetuned"])
    assert shown["donut"] == {"donut_ted_accuracy", "donut_field_f1", "json_valid", "truncated", "samples"}
    assert "field_f1" in shown["strict"] and not any(m.startswith("donut_") for m in shown["strict"])
    assert shown["both"] == shown["donut"] | shown["strict"]
    assert "donut_field_f1" not in (tmp_path / "strict" / "report.html").read_text().split("<h2>Field accuracy")[0]


def test_score_reads_gold_answers_from_messages_rows(tmp_path):
    import json as _json

    from qwenvl_tune.evaluation.external import read_pairs

    gold = tmp_path / "gold.jsonl"
    rows = [{"messages": [{"role": "user", "content": "<image><image>extract"},
                          {"role": "assistant", "content": _json.dumps({"a": str(i)})}],
             "images": [f"p{i}a.png", f"p{i}b.png"]} for i in range(2)]
    gold.write_text("\n".join(_json.dumps(r) for r in rows) + "\n")
    pred = tmp_path / "pred.jsonl"
    pred.write_text('{"a": "0"}\n{"a": "9"}\n')
    pairs, notes = read_pairs(pred, gold)
    assert [p["gold"] for p in pairs] == ['{"a": "0"}', '{"a": "1"}']
    assert pairs[1]["images"] == [str(tmp_path / "p1a.png"), str(tmp_path / "p1b.png")]
    assert notes == ["joined by line (not every line has an 'id')"]
    # the same rows as LLaMA-Factory keeps them: one pretty-printed JSON array
    gold_array = tmp_path / "valid.json"
    gold_array.write_text(_json.dumps(rows, indent=2))
    from_array, array_notes = read_pairs(pred, gold_array)
    assert [{**p, "id": None} for p in from_array] == [{**p, "id": None} for p in pairs] and array_notes == notes
    assert [p["id"] for p in from_array] == ["valid.json:2", "valid.json:18"]  # rows named by their first line
    gold_array.write_text(_json.dumps(rows, indent=2)[:-3])
    from qwenvl_tune.data.records import DataError

    with pytest.raises(DataError, match=r"valid.json:\d+: malformed JSON"):
        read_pairs(pred, gold_array)
