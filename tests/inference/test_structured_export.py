"""Learnt answer schema, constrained decoding, and merged export."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_overrides
from qwenvl_tune import api
from qwenvl_tune.config import build_config
from qwenvl_tune.data.schema import infer_schema, learn_schema
from qwenvl_tune.rundir import RunDir


def test_infer_schema_hand_example():
    s = infer_schema([{"id": "A1", "items": [{"n": 1}], "note": "x"},
                      '{"id": "B22", "items": [{"n": 2.5}, {"n": 3}]}'])
    assert list(s["properties"]) == ["id", "items", "note"]          # key order kept
    assert s["required"] == ["id", "items"]                          # note is not always present
    assert s["additionalProperties"] is False
    assert s["properties"]["id"] == {"type": "string", "maxLength": 8}
    assert s["properties"]["items"]["maxItems"] == 4
    assert s["properties"]["items"]["items"]["properties"]["n"] == {"type": "number"}  # int and float merge
    assert infer_schema(["plain text answer"]) is None


def test_learn_schema_names_the_answers_that_leave_decoding_without_one():
    from types import SimpleNamespace as Row

    rows = [Row(suffix={"a": "1"}, file="t.jsonl", line=n) for n in range(1, 6)]
    schema, said = learn_schema(rows)
    assert schema == infer_schema([{"a": "1"}] * 5) and "learnt from 5 answers" in said
    rows[1].suffix, rows[3].suffix, rows[4].suffix = '{"a": 1', "plain text", '"a JSON string"'
    schema, said = learn_schema(rows, shown=2)
    assert schema is None
    assert "3 of 5 training answers are not JSON objects or arrays (t.jsonl:2, t.jsonl:4, ...)" in said


@pytest.fixture(scope="module")
def briefly_trained(sample_data, tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = build_config(None, tiny_overrides(sample_data, tiny_dir, out, **{
        "model.method": "full", "train.lr": 2e-3, "train.max_steps": 24, "train.max_epochs": 100,
        "train.check_val_every_n_epoch": 100, "generate.max_new_tokens": 1500}))
    return api.train(cfg)


def test_constrained_decoding_always_parses_with_schema_keys(briefly_trained):
    run = briefly_trained
    schema = RunDir(run).schema()
    assert schema and "route" in schema["required"]
    res = api.evaluate(run, "valid", compare_constrained=True)
    assert res["finetuned"]["json_valid"] == 1.0 and res["finetuned"]["truncated"] == 0.0
    assert 0.0 <= res["unconstrained"]["json_valid"] <= 1.0  # reported side by side
    for line in (run / "eval" / "valid" / "predictions.jsonl").read_text().splitlines():
        parsed = json.loads(line)["finetuned"]["parsed"]
        assert set(schema["required"]) <= set(parsed) <= set(schema["properties"])


def test_merged_export_matches_adapter_logits(sample_data, tiny_dir, tmp_path):
    from transformers import AutoModelForImageTextToText

    from qwenvl_tune.data.check import check_split
    from qwenvl_tune.data.collate import Encoder, RecordDataset
    from qwenvl_tune.inference.export import export_run
    from qwenvl_tune.inference.session import Predictor

    cfg = build_config(None, tiny_overrides(sample_data, tiny_dir, tmp_path, **{
        "train.max_steps": 4, "train.lr": 2e-2, "lora.target_modules": "all-linear"}))
    run = api.train(cfg)
    merged_dir = export_run(run, tmp_path / "merged", merge=True, dtype="float32")
    adapter_dir = export_run(run, tmp_path / "adapter")
    assert (merged_dir / "model.safetensors").exists() and not (merged_dir / "adapter_config.json").exists()
    assert (adapter_dir / "adapter_config.json").exists() and (merged_dir / "answer_schema.json").exists()
    assert "qwenvl" not in (merged_dir / "config.json").read_text()
    p = Predictor.from_run(run, "best", device="cpu")
    ours, proc = p.model, p.processor
    plain = AutoModelForImageTextToText.from_pretrained(merged_dir).eval()  # no trace of our package needed
    item = RecordDataset(check_split(sample_data, "valid").records[:1], Encoder(proc))[0]
    batch = {"input_ids": item["input_ids"][None], "pixel_values": item["pixel_values"],
             "image_grid_thw": item["image_grid_thw"]}
    with torch.no_grad():
        a, b = ours(**batch).logits, plain(**batch).logits
    assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())
    with pytest.raises(FileExistsError):
        export_run(run, merged_dir, merge=True)


def test_compare_constrained_columns_are_named_for_how_they_were_decoded(briefly_trained):
    # --no-constrained --compare-constrained: the extra column is the schema-decoded one, and says so
    res = api.evaluate(briefly_trained, "valid", constrained=False, compare_constrained=True)
    assert "constrained" in res and "unconstrained" not in res
    assert res["decoding"]["finetuned"] == "unconstrained"
    assert res["decoding"]["constrained"].startswith("constrained to")
    assert res["constrained"]["json_valid"] == 1.0  # every schema-decoded output parses
    # the default way round keeps the names users know
    res = api.evaluate(briefly_trained, "valid", compare_constrained=True)
    assert res["decoding"] == {"finetuned": res["decoding"]["finetuned"], "unconstrained": "unconstrained"}
    assert res["decoding"]["finetuned"].startswith("constrained to")


def test_evaluate_overrides_apply_to_this_evaluation_only(briefly_trained):
    from qwenvl_tune.cli import main

    assert main(["evaluate", "--run", str(briefly_trained), "--metrics.list_matching", "unordered",
                 "--generate.max_new_tokens", "64"]) == 0
    metrics = json.loads((briefly_trained / "eval" / "valid" / "metrics.json").read_text())
    assert metrics["options"]["list_matching"] == "unordered"
    assert RunDir(briefly_trained).config.metrics.list_matching == "position"  # the run folder is unchanged


def test_score_on_outputs_from_outside_gives_evaluates_numbers(briefly_trained, sample_data, tmp_path):
    from qwenvl_tune.cli import main
    from qwenvl_tune.config import METRICS

    res = api.evaluate(briefly_trained, "valid", constrained=False)
    stored = [json.loads(line) for line in (briefly_trained / "eval" / "valid" / "predictions.jsonl").read_text().splitlines()]
    pred = tmp_path / "other_system.jsonl"
    pred.write_text("".join(json.dumps({"output": r["finetuned"]["raw"]}) + "\n" for r in stored))
    gold = sample_data / "valid" / "annotations.jsonl"
    assert main(["score", "--pred", str(pred), "--gold", str(gold), "--out", str(tmp_path / "scored")]) == 0
    scored = json.loads((tmp_path / "scored" / "metrics.json").read_text())
    for m in METRICS:
        if m != "truncated":  # a file of outputs does not say which were cut off
            assert scored["finetuned"][m] == pytest.approx(res["finetuned"][m]), m
    assert (tmp_path / "scored" / "report.html").exists() and (tmp_path / "scored" / "fields.csv").exists()
    # a line that is not JSON is an invalid answer, never dropped
    pred.write_text("this is not json\n" + "".join(json.dumps({"output": r["finetuned"]["raw"]}) + "\n"
                                                    for r in stored[1:]))
    again = api.score(pred, gold, tmp_path / "scored2")
    assert again["finetuned"]["n"] == len(stored)
    assert again["finetuned"]["json_valid"] <= res["finetuned"]["json_valid"]


def test_adapter_export_warns_when_vllm_would_ignore_vision_adapters(sample_data, tiny_dir, tmp_path, capsys):
    from qwenvl_tune.inference.export import export_run

    run = api.train(build_config(None, tiny_overrides(sample_data, tiny_dir, tmp_path, **{
        "train.max_steps": 1, "model.train_vision": True, "lora.target_modules": "all-linear"})))
    out = export_run(run, tmp_path / "adapter")
    info = json.loads((out / "qwenvl_tune_export.json").read_text())
    assert "vLLM" in info["warning"] and "--merge" in info["warning"]
    assert "warning:" in capsys.readouterr().out
    quiet = api.train(build_config(None, tiny_overrides(sample_data, tiny_dir, tmp_path, **{
        "train.max_steps": 1, "run.name": "lm-only"})))
    assert "warning" not in json.loads((export_run(quiet, tmp_path / "a2") / "qwenvl_tune_export.json").read_text())


# answers as documents hold them: multi-line addresses, quotes, backslashes, tabs, accents, emoji, control bytes
_string_values = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12) | st.sampled_from(
    ["12 Main St\nSpringfield", 'ACME "Best" Ltd', "C:\\scans\\007.png", "a\tb", "Zürich — 5 €", "🧾", "\x1f\x00"])


@settings(max_examples=60, deadline=None)
@given(answers=st.lists(st.lists(st.one_of(st.none(), _string_values), min_size=3, max_size=3).map(
    lambda vs: {k: v for k, v in zip(("name", "address", "total"), vs) if v is not None} or {"name": ""}),
    min_size=1, max_size=4))
def test_the_constraint_accepts_every_training_answer_as_it_was_trained(answers):
    """Each answer, serialised as training writes it, is a text the learnt schema's grammar accepts (keys in the
    schema's order, as the grammar writes them): xgrammar's own
    grammar for a length-bounded string (mlc-ai/xgrammar#800) has no escapes, so any value with a quote, backslash,
    line break or tab could not be written."""
    from xgrammar.testing import _is_grammar_accept_string

    from qwenvl_tune.data.records import serialize_target
    from qwenvl_tune.inference.structured import json_schema_grammar

    grammar = json_schema_grammar(infer_schema(answers))
    for a in answers:
        assert _is_grammar_accept_string(grammar, serialize_target(a)), serialize_target(a)


def test_bounded_strings_refuse_raw_control_characters_and_count_an_escape_once():
    from xgrammar.testing import _is_grammar_accept_string

    from qwenvl_tune.inference.structured import json_schema_grammar

    grammar = json_schema_grammar({"type": "object", "properties": {"t": {"type": "string", "maxLength": 8}},
                                   "required": ["t"], "additionalProperties": False})
    ok = ['"1234567\\n"', '"\\u00e9\\"\\\\\\/\\b\\f\\r\\t"', '""', '"Zürich5€"']
    bad = ['"123456789"', '"a\x1fb"', '"a\x00"', '"a\tb"', '"a\\x"', '"\\u12"']
    assert [_is_grammar_accept_string(grammar, '{"t": ' + t + '}') for t in ok] == [True] * len(ok)
    assert [_is_grammar_accept_string(grammar, '{"t": ' + t + '}') for t in bad] == [False] * len(bad)


def test_token_by_token_walks_under_the_constraint_end_in_schema_valid_json(tiny_dir):
    """Random walks through the tiny tokenizer's vocabulary, each token drawn among those the constraint allows:
    every walk that ends is JSON that parses (strict: no raw control characters) and meets the schema."""
    import random

    import jsonschema
    import xgrammar as xgr
    from transformers import AutoProcessor

    from qwenvl_tune.inference.structured import JsonConstraint

    proc = AutoProcessor.from_pretrained(tiny_dir)
    tok = proc.tokenizer
    schema = infer_schema([{"name": 'ACME "Best"', "address": "1 Main St\nSpringfield", "lines": [{"qty": 2}]}])
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    constraint = JsonConstraint(schema, proc, len(tok), [stop])
    rng, ended = random.Random(0), 0
    for _ in range(40):
        matcher = xgr.GrammarMatcher(constraint.compiled)
        mask = xgr.allocate_token_bitmask(1, len(tok))
        ids = []
        for _ in range(400):
            matcher.fill_next_token_bitmask(mask)
            allowed = [i for i in range(len(tok)) if (int(mask[0, i // 32]) >> (i % 32)) & 1]
            token = stop if stop in allowed and rng.random() < 0.3 else rng.choice(allowed)
            assert matcher.accept_token(token)
            if token == stop:
                break
            ids.append(token)
        if matcher.is_terminated():
            ended += 1
            value = json.loads(tok.decode(ids))
            jsonschema.validate(value, schema)
    assert ended >= 20


def test_learnt_key_order_agrees_with_every_answer_that_holds_the_keys():
    """An optional key first seen in a later answer goes where the answers put it, not last: the constraint writes
    keys in the schema's order, so 'total' before 'date' would force an order no answer was trained on."""
    from qwenvl_tune.data.schema import key_order

    s = infer_schema([{"invoice": "A1", "total": "9"}, {"invoice": "B2", "date": "1 May", "total": "7"}])
    assert list(s["properties"]) == ["invoice", "date", "total"]
    # answers that disagree: the order most answers holding both keys use
    assert key_order([{"b": 1, "a": 1}, {"a": 1, "b": 1}, {"a": 1, "c": 1, "b": 1}]) == ["a", "c", "b"]
    assert key_order([{"a": 1, "b": 1}, {"b": 1, "c": 1}, {"c": 1, "a": 1}]) == ["a", "b", "c"]  # a cycle: first seen
    # nested objects too
    s = infer_schema([{"lines": [{"qty": 1}, {"sku": "x", "qty": 2}]}])
    assert list(s["properties"]["lines"]["items"]["properties"]) == ["sku", "qty"]
