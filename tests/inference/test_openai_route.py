"""The OpenAI-compatible route, driven by the official `openai` client against `serve` on loopback."""

from __future__ import annotations

import base64
import io
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import ROOT, swatch
from test_server import TARGETS, _Server, served_run  # noqa: F401 - the module's trained run, shared
from qwenvl_tune.inference.server import Extractor, create_app
from qwenvl_tune.rundir import RunDir

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytestmark = pytest.mark.slow

KEY = "s3cret"


def _data_url(path_or_bytes, mime="image/png") -> str:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _messages(url: str, text: str | None = "extract data in JSON format") -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": url}}]
    if text:
        content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def server(served_run):
    app = create_app(Extractor(served_run[0], device="cpu", max_batch=8, wait_ms=20), api_key=KEY, max_upload_mb=1)
    with _Server(app) as url:
        yield url, served_run


def _client(url: str, key: str = KEY):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def test_official_client_gets_schema_valid_json(server):
    url, (run, valid) = server
    client = _client(url)
    resp = client.chat.completions.create(model=run.name, messages=_messages(_data_url(valid / "0.png")))
    content = resp.choices[0].message.content
    jsonschema.validate(json.loads(content), RunDir(run).schema())  # the learnt shape, by default
    assert json.loads(content) == TARGETS[0]
    assert resp.choices[0].finish_reason == "stop" and resp.object == "chat.completion"
    assert resp.usage.prompt_tokens > 0 and resp.usage.completion_tokens > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    # the caller's own schema
    schema = {"type": "object", "properties": {"dock": {"type": "string", "maxLength": 8}}, "required": ["dock"],
              "additionalProperties": False}
    resp = client.chat.completions.create(model=run.name, messages=_messages(_data_url(valid / "1.png")),
                                          response_format={"type": "json_schema",
                                                           "json_schema": {"name": "dock", "schema": schema}})
    jsonschema.validate(json.loads(resp.choices[0].message.content), schema)
    # a cut-off answer says so
    resp = client.chat.completions.create(model=run.name, messages=_messages(_data_url(valid / "0.png")), max_tokens=3)
    assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens == 3


def test_a_document_of_several_pages_or_a_pdf_through_the_official_client(server):
    from PIL import Image

    from qwenvl_tune.data.documents import pdf_bytes_from_images

    url, (run, valid) = server
    client = _client(url)
    one = client.chat.completions.create(model=run.name, messages=_messages(_data_url(valid / "0.png")))
    two = _messages(_data_url(valid / "0.png"))
    two[0]["content"].insert(1, {"type": "image_url", "image_url": {"url": _data_url(valid / "1.png")}})
    both = client.chat.completions.create(model=run.name, messages=two)
    pdf = pdf_bytes_from_images([Image.open(valid / "0.png"), Image.open(valid / "1.png")])
    as_pdf = client.chat.completions.create(model=run.name,
                                            messages=_messages(_data_url(pdf, "application/pdf")))
    # each page is its own image in the prompt: two pages cost the tokens of both
    assert both.usage.prompt_tokens > one.usage.prompt_tokens
    assert as_pdf.usage.prompt_tokens > one.usage.prompt_tokens
    for resp in (both, as_pdf):
        json.loads(resp.choices[0].message.content)  # constrained to the learnt schema: it parses


def test_streaming_chunks_concatenate_to_the_same_content(server):
    url, (run, valid) = server
    client = _client(url)
    messages = _messages(_data_url(valid / "1.png"))
    whole = client.chat.completions.create(model=run.name, messages=messages).choices[0].message.content
    pieces, finish = [], None
    for chunk in client.chat.completions.create(model=run.name, messages=messages, stream=True):
        assert chunk.object == "chat.completion.chunk"
        pieces.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == whole and finish == "stop"
    assert len([p for p in pieces if p]) > 1  # it streamed, not one block


def test_models_list_and_auth_and_limits(server):
    url, (run, valid) = server
    client = _client(url)
    ids = [m.id for m in client.models.list().data]
    assert ids == [run.name]
    with pytest.raises(openai.AuthenticationError):
        _client(url, "wrong").chat.completions.create(model=run.name, messages=_messages(_data_url(valid / "0.png")))
    big = io.BytesIO()
    swatch((9, 9, 9), (1400, 1400), text="x").save(big, "BMP")  # ~5.6 MB, over the 1 MiB limit
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=run.name, messages=_messages(_data_url(big.getvalue(), "image/bmp")))
    assert e.value.status_code == 413


@pytest.mark.parametrize("case,status,needle", [
    ("not_image", 400, "not an image"),
    ("truncated_base64", 400, "base64"),
    ("remote_url", 400, "remote image URLs are not fetched"),
    ("no_image", 400, "no image"),
    ("bad_schema", 422, "invalid JSON schema"),
    ("too_many_pages", 413, "data.max_pages=8"),
    ("corrupt_pdf", 400, "corrupt or unreadable PDF"),
    ("over_budget", 400, "over this model's budget"),
    ("n_2", 400, "n must be 1"),
    ("not_json", 400, "invalid request"),
])
def test_bad_requests_get_openai_shaped_4xx_and_the_server_keeps_serving(server, case, status, needle):
    import httpx

    url, (run, valid) = server
    good = _data_url(valid / "0.png")
    body: dict = {"model": run.name, "messages": _messages(good)}
    if case == "not_image":
        body["messages"] = _messages("data:text/plain;base64," + base64.b64encode(b"hello").decode())
    elif case == "truncated_base64":
        body["messages"] = _messages(good[:-7])
    elif case == "remote_url":
        body["messages"] = _messages("https://example.com/scan.png")
    elif case == "no_image":
        body["messages"] = [{"role": "user", "content": "extract data in JSON format"}]
    elif case == "bad_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    elif case == "too_many_pages":  # nine pages, one over the run's data.max_pages
        body["messages"][0]["content"] += [{"type": "image_url", "image_url": {"url": good}}] * 8
    elif case == "corrupt_pdf":
        body["messages"] = _messages("data:application/pdf;base64," + base64.b64encode(b"%PDF-1.4 broken").decode())
    elif case == "over_budget":
        body["messages"][0]["content"].append({"type": "text", "text": "word " * 5000})
    elif case == "n_2":
        body["n"] = 2
    headers = {"Authorization": f"Bearer {KEY}"}
    if case == "not_json":
        r = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", headers=headers, timeout=60)
    else:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and needle in err["message"], err
    assert "object at 0x" not in err["message"]
    ok = httpx.post(f"{url}/v1/chat/completions", json={"messages": _messages(good)}, headers=headers, timeout=120)
    assert ok.status_code == 200


def test_openapi_schema_types_every_route(server):
    import httpx

    url, _ = server
    spec = httpx.get(f"{url}/openapi.json", timeout=30).json()
    assert {"/v1/chat/completions", "/v1/models", "/v1/extract", "/health"} <= set(spec["paths"])
    assert "ChatCompletion" in spec["components"]["schemas"] and "ErrorResponse" in spec["components"]["schemas"]


def test_50_concurrent_chat_completions_through_the_official_client(server):
    url, (run, valid) = server
    client = _client(url)
    urls = [_data_url(valid / f"{i % 2}.png") for i in range(50)]

    def one(i: int) -> float:
        t0 = time.perf_counter()
        resp = client.chat.completions.create(model=run.name, messages=_messages(urls[i]))
        assert json.loads(resp.choices[0].message.content) == TARGETS[i % 2]
        return time.perf_counter() - t0

    with ThreadPoolExecutor(max_workers=50) as pool:
        latencies = sorted(pool.map(one, range(50)))
    p50, p95 = statistics.median(latencies), latencies[int(0.95 * len(latencies)) - 1]
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "openai_concurrency.json").write_text(json.dumps(
        {"bench": "openai_concurrency", "variants": [{"name": "chat_completions_50_concurrent_cpu", "requests": 50,
                                                     "p50_s": p50, "p95_s": p95, "max_s": latencies[-1]}],
         "env": {"gpu": "cpu (2 cores)", "threads": threading.active_count()}}, indent=2))
    assert len(latencies) == 50


def test_a_full_queue_answers_429_in_openai_shape(served_run, monkeypatch):
    import asyncio

    import httpx
    from fastapi.testclient import TestClient

    from qwenvl_tune.inference.server import QueueFull, _Job

    extractor = Extractor(served_run[0], device="cpu", max_queue=2)

    async def fill():
        loop = asyncio.get_running_loop()
        extractor.queue = asyncio.Queue(maxsize=extractor.max_queue)  # not started: nothing takes jobs off
        for _ in range(2):
            extractor.queue.put_nowait(_Job(None, None, loop.create_future()))
        with pytest.raises(QueueFull):
            await extractor.submit(_Job(None, None, loop.create_future()))

    asyncio.run(fill())
    app = create_app(extractor)

    async def full(job):
        raise QueueFull

    monkeypatch.setattr(extractor, "submit", full)
    with TestClient(app) as client:
        assert client.get("/health").json()["max_queue"] == 2
        r = client.post("/v1/chat/completions", json={"messages": _messages(_data_url(served_run[1] / "0.png"))})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        assert "queue is full" in r.json()["error"]["message"]
