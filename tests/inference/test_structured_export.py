"""Learnt answer schema, constrained decoding, and merged export."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_overrides
from qwenvl_tune import api
from qwenvl_tune.config import build_config
from qwenvl_tune.inference.structured import infer_schema, load_schema


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


@pytest.fixture(scope="module")
def briefly_trained(sample_data, tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = build_config(None, tiny_overrides(sample_data, tiny_dir, out, **{
        "model.method": "full", "train.lr": 2e-3, "train.max_steps": 24, "train.max_epochs": 100,
        "train.check_val_every_n_epoch": 100, "generate.max_new_tokens": 1500}))
    return api.train(cfg)


def test_constrained_decoding_always_parses_with_schema_keys(briefly_trained):
    run = briefly_trained
    schema = load_schema(run)
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
    from qwenvl_tune.modeling.load import load_for_inference

    cfg = build_config(None, tiny_overrides(sample_data, tiny_dir, tmp_path, **{
        "train.max_steps": 4, "train.lr": 2e-2, "lora.target_modules": "all-linear"}))
    run = api.train(cfg)
    merged_dir = export_run(run, tmp_path / "merged", merge=True, dtype="float32")
    adapter_dir = export_run(run, tmp_path / "adapter")
    assert (merged_dir / "model.safetensors").exists() and not (merged_dir / "adapter_config.json").exists()
    assert (adapter_dir / "adapter_config.json").exists() and (merged_dir / "answer_schema.json").exists()
    assert "qwenvl" not in (merged_dir / "config.json").read_text()
    ours, proc, _ = load_for_inference(run, "best", device="cpu")
    plain = AutoModelForImageTextToText.from_pretrained(merged_dir).eval()  # no trace of our package needed
    item = RecordDataset(check_split(sample_data, "valid").records[:1], Encoder(proc))[0]
    batch = {"input_ids": item["input_ids"][None], "pixel_values": item["pixel_values"],
             "image_grid_thw": item["image_grid_thw"]}
    with torch.no_grad():
        a, b = ours(**batch).logits, plain(**batch).logits
    assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())
    with pytest.raises(FileExistsError):
        export_run(run, merged_dir, merge=True)
