"""Confidences on a model that memorised its two documents: near 1 where it knows, lower where it guesses,
checked against the answers by evaluate, and served on both routes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from conftest import swatch
from test_server import TARGETS, memorise, served_run  # noqa: F401 - the module's trained run, shared
from qwenvl_tune import api
from qwenvl_tune.inference.server import Extractor, create_app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def memorised(tiny_dir, tmp_path_factory):
    """The two documents of ``served_run``, learnt until the model is sure of them (loss near 0)."""
    return memorise(tiny_dir, tmp_path_factory.mktemp("sure"), lr=1e-2, epochs=150)


def test_memorised_documents_are_confident_and_a_perturbed_one_is_less(memorised, tmp_path):
    run, valid = memorised
    odd = tmp_path / "odd.png"
    swatch((120, 140, 90), text="Q999").save(odd)  # neither document: the model has to guess
    rows = api.predict(run, [valid / "0.png", valid / "1.png", odd])
    for row, target in zip(rows, TARGETS):
        assert row["json"] == target
        conf = row["confidence"]
        assert set(conf["fields"]) == set(target) and all(0.0 <= c <= 1.0 for c in conf["fields"].values())
        assert conf["document"] == pytest.approx(1.0, abs=0.02), conf
    assert rows[2]["confidence"]["document"] < min(r["confidence"]["document"] for r in rows[:2]) - 0.05


def test_token_logprobs_are_the_models_own_probabilities(served_run):
    """Unconstrained greedy decoding: each recorded log-probability equals the log-softmax of a plain forward
    pass over the prompt and the answer (teacher forcing), token by token."""
    import torch

    from qwenvl_tune.data.collate import collate
    from qwenvl_tune.inference.session import Predictor

    run, valid = served_run
    from PIL import Image

    session = Predictor.from_run(run, device="cpu").with_decoding(False)
    page = Image.open(valid / "1.png")
    gen = session.generate_images([page])[0]
    item = session.encoder.encode_prompt(page, session.default_prompt)
    answer = torch.tensor(gen.token_ids)
    batch = collate([item], session.encoder.pad_id, left=True)
    ids = torch.cat([batch["input_ids"], answer[None]], dim=1)
    extra = {}
    if "mm_token_type_ids" in batch:  # which tokens are image tokens (the model's rope index reads it)
        extra["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(answer)[None]], dim=1)
    with torch.no_grad():
        logits = session.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=batch["pixel_values"],
                               image_grid_thw=batch["image_grid_thw"], **extra).logits[0].float()
    n = batch["input_ids"].shape[1]
    expected = torch.log_softmax(logits[n - 1:-1], dim=-1).gather(1, answer[:, None]).squeeze(1)
    assert torch.allclose(torch.tensor(gen.logprobs), expected, atol=1e-4), (gen.logprobs, expected.tolist())


def test_evaluate_reports_calibration_and_the_review_split(memorised):
    run, _ = memorised
    metrics = api.evaluate(run, "valid", overrides={"generate.review_below": 0.9})
    cal = metrics["finetuned"]["calibration"]
    assert cal["fields"]["n"] == 4 and cal["documents"]["n"] == 2 and cal["documents_without_confidence"] == 0
    assert 0.0 <= cal["fields"]["ece"] <= 1.0
    assert cal["review"]["threshold"] == 0.9 and cal["review"]["documents_flagged"] == 0
    assert cal["review"]["field_accuracy_unflagged"] == 1.0
    out = Path(run) / "eval" / "valid"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["finetuned"]["calibration"]["review"] == cal["review"]
    pred = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert all(p["finetuned"]["confidence"]["document"] > 0.9 for p in pred)
    html = (out / "report.html").read_text()
    assert 'id="reliability"' in html and "field ECE" in html
    data = json.loads(html.split('<script id="data" type="application/json">')[1].split("</script>")[0])
    for sample in data["samples"]:  # each field's confidence travels with its row of the comparison
        assert sample["conf"] > 0.9 and all(row[4] is not None and row[4] > 0.9 for row in sample["rows"])
    # re-scoring the stored predictions keeps the confidences
    again = api.evaluate(run, "valid", from_predictions=True, overrides={"generate.review_below": 0.9})
    assert again["finetuned"]["calibration"] == cal


def test_extract_returns_confidences_and_review_flags(served_run):
    run, valid = served_run
    extractor = Extractor(run, device="cpu", overrides={"generate.review_below": 0.999999})
    with TestClient(create_app(extractor)) as client:
        body = client.post("/v1/extract", files={"image": ("0.png", (valid / "0.png").read_bytes(), "image/png")}).json()
    assert body["json"] == TARGETS[0]
    assert set(body["confidence"]["fields"]) == {"route", "dock"}
    below = sorted(k for k, v in body["confidence"]["fields"].items() if v < 0.999999)
    assert body["review_fields"] == below and body["needs_review"] == bool(below)


def test_openai_route_returns_logprobs_through_the_official_client(served_run):
    openai = pytest.importorskip("openai")
    import base64

    from test_server import _Server

    run, valid = served_run
    url = "data:image/png;base64," + base64.b64encode((valid / "0.png").read_bytes()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "extract data in JSON format"}]}]
    with _Server(create_app(Extractor(run, device="cpu"))) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=120)
        resp = client.chat.completions.create(model=run.name, messages=messages, logprobs=True, top_logprobs=2)
        plain = client.chat.completions.create(model=run.name, messages=messages)
        chunks = list(client.chat.completions.create(model=run.name, messages=messages, logprobs=True, stream=True))
    choice = resp.choices[0]
    tokens = choice.logprobs.content
    assert "".join(t.token for t in tokens) == choice.message.content
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in tokens)
    # greedy: the chosen token is the most likely one, and its log-probability is the first alternative's
    assert all(t.top_logprobs[0].token == t.token and abs(t.top_logprobs[0].logprob - t.logprob) < 1e-6
               for t in tokens)
    assert plain.choices[0].logprobs is None
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in tokens]


def test_evaluate_names_the_rows_it_could_not_read_and_rescoring_keeps_them(memorised, tmp_path):
    import shutil

    run, valid = memorised
    data = tmp_path / "data"
    shutil.copytree(valid.parent, data)
    with open(data / "valid" / "annotations.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"image": "gone.png", "prefix": "read", "suffix": {"route": "R1"}}\n')
    res = api.evaluate(run, "valid", data_path=str(data), which="last")
    assert res["skipped"] == 1 and res["finetuned"]["n"] == 2
    assert "gone.png" in res["problems"][0] and ":3 [image]" in res["problems"][0]
    again = api.evaluate(run, "valid", which="last", from_predictions=True)
    assert again["problems"] == res["problems"] and again["decoding"] == res["decoding"]
    assert "gone.png" in (Path(run) / "eval" / "valid-last" / "report.html").read_text()
