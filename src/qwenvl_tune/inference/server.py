"""``qwenvl-tune serve``: an HTTP service and a web page around a run's model.

- ``POST /v1/extract`` (multipart: one or more ``image`` files — images or PDFs, the pages of one document in
  order — and an optional ``prompt``) -> the JSON, with the page count and timings.
  Concurrent requests are queued and generated together, up to ``max_batch`` at a time.
- ``GET /health``; ``GET /`` serves a page to drop or pick a document image and read the result.
- Limits on upload size and image pixels, an optional API key (``X-API-Key``), and clear 4xx
  errors for bad images, oversize uploads and wrong content types. Binds to localhost by default.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from ..data.documents import BytesSource, load_pages
from ..data.records import DataError
from ..modeling.generate import Generation, Sampling


def _error(status: int, message: str, code: str, param: str | None = None) -> JSONResponse:
    """Every error in OpenAI's shape (``message``, ``type``, ``param``, ``code``), whatever the route."""
    kind = {401: "authentication_error", 429: "rate_limit_error", 503: "server_busy"}.get(status, "invalid_request_error")
    if status >= 500 and status != 503:
        kind = "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


async def _read_limited(request: Request, limit: int) -> bytes | None:
    """The request body, counted as it arrives (chunked or not); None as soon as it passes ``limit``."""
    parts, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


def _replayed(request: Request, body: bytes) -> Request:
    """A request whose body is ``body`` (already read), for the form parser."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(request.scope, receive)


def _boundary(content_type: str) -> str | None:
    for part in content_type.split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key.lower() == "boundary" and value:
            return value.strip('"')
    return None


@dataclass
class _Job:
    image: Any
    prompt: str | None
    future: asyncio.Future
    system: str | None = None
    constraint: Any = "run"  # the session's own (learnt schema), None (free) or a compiled caller schema
    sampling: Sampling = field(default_factory=Sampling)
    max_new_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    item: dict[str, Any] | None = None  # the encoded inputs, when the route already made them
    queued: float = field(default_factory=time.perf_counter)
    timing: dict[str, Any] = field(default_factory=dict)

    def key(self) -> tuple:
        """Jobs with the same key are generated together."""
        return (self.system, self.constraint if isinstance(self.constraint, str) or self.constraint is None
                else id(self.constraint), self.sampling, self.max_new_tokens, self.logprobs, self.top_logprobs)


class QueueFull(Exception):
    pass


class Extractor:
    """A run's inference session plus a bounded queue that batches concurrent requests."""

    def __init__(self, run_dir: str | Path, which: str = "best", max_batch: int = 8, wait_ms: float = 10.0,
                 device: str | None = None, overrides: dict[str, Any] | None = None, max_queue: int = 256):
        from ..rundir import RunDir
        from .session import Predictor

        self.run_dir = Path(run_dir)
        self.predictor = Predictor.from_run(RunDir.open(run_dir).with_overrides(overrides), which, device=device)
        self.config = self.predictor.config
        self.max_batch, self.wait, self.max_queue = max_batch, wait_ms / 1000, max_queue
        self.queue: asyncio.Queue[_Job] | None = None
        self.batches: list[int] = []  # sizes of the batches generated (for /health and tests)
        self.model_lock = threading.Lock()  # one generation at a time on the model: batches and streams
        self._schemas: dict[str, Any] = {}
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        self.queue = asyncio.Queue(maxsize=self.max_queue)
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._worker:
            self._worker.cancel()

    def constraint_for_schema(self, schema: dict[str, Any]) -> Any:
        key = json.dumps(schema, sort_keys=True)
        if key not in self._schemas:
            if len(self._schemas) >= 64:
                self._schemas.pop(next(iter(self._schemas)))
            self._schemas[key] = self.predictor.compile_schema(schema)
        return self._schemas[key]

    async def submit(self, job: _Job) -> Generation:
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise QueueFull from None
        return await job.future

    async def extract(self, pages: Any, prompt: str) -> dict[str, Any]:
        job = _Job(pages, prompt, asyncio.get_running_loop().create_future(), logprobs=self.predictor.confidence)
        gen = await self.submit(job)
        return {**self.predictor.result(gen, len(pages) if isinstance(pages, list) else 1), **job.timing}

    def _generate(self, jobs: list[_Job]) -> list[Generation]:
        first = jobs[0]
        items = [j.item or self.predictor.encode(j.image, j.prompt, j.system) for j in jobs]
        with self.model_lock:
            return self.predictor.complete(items, constraint=first.constraint, max_new_tokens=first.max_new_tokens,
                                           sampling=first.sampling, logprobs=first.logprobs,
                                           top_logprobs=first.top_logprobs)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            deadline = loop.time() + self.wait
            while len(jobs) < self.max_batch:
                try:
                    jobs.append(await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time())))
                except asyncio.TimeoutError:
                    break
            groups: dict[tuple, list[_Job]] = {}
            for j in jobs:
                groups.setdefault(j.key(), []).append(j)
            for group in groups.values():  # a failing group fails its requests, never this loop

                started = time.perf_counter()
                try:
                    results = await loop.run_in_executor(None, self._generate, group)
                except Exception as e:  # noqa: BLE001 - every waiting request gets the error, the server stays up
                    for j in group:
                        if not j.future.done():
                            j.future.set_exception(e)
                    continue
                self.batches.append(len(group))
                done = time.perf_counter()
                for j, result in zip(group, results):
                    if j.future.done():  # the client went away
                        continue
                    j.timing = {"batch_size": len(group),
                                "timing_ms": {"queued": round((started - j.queued) * 1000, 1),
                                              "generate": round((done - started) * 1000, 1),
                                              "total": round((done - j.queued) * 1000, 1)}}
                    j.future.set_result(result)


def create_app(extractor: Extractor, *, api_key: str | None = None, max_upload_mb: float = 20.0,
               max_image_pixels: int | None = None, max_concurrent_uploads: int = 16) -> FastAPI:
    """The service around ``extractor``. ``max_image_pixels`` defaults to the run's ``data.max_image_pixels``,
    the limit its training data was read under."""
    if max_image_pixels is None:
        max_image_pixels = extractor.predictor.max_image_pixels
    limits = dataclasses.replace(extractor.predictor.limits, max_image_pixels=max_image_pixels)
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        extractor.start()
        yield
        await extractor.stop()

    app = FastAPI(title="qwenvl-tune", description="Document image -> JSON with a fine-tuned Qwen-VL model",
                  lifespan=lifespan)
    max_bytes = int(max_upload_mb * 2**20)
    body_limit = max_bytes + 64 * 1024  # the file plus multipart headers and a prompt
    reading = asyncio.Semaphore(max_concurrent_uploads)
    app.state.last_body_bytes = 0

    def _authorised(request: Request) -> bool:
        """X-API-Key, or ``Authorization: Bearer KEY`` as OpenAI clients send it."""
        if api_key is None:
            return True
        bearer = request.headers.get("authorization", "")
        given = bearer[7:] if bearer.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        return hmac.compare_digest(given, api_key)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "run": extractor.run_dir.name, "base_model": extractor.config.model.name_or_path,
                "method": extractor.config.model.method, "constrained": extractor.predictor.constrained,
                "decoding": extractor.predictor.decoding, "max_image_pixels": max_image_pixels,
                "max_pages": limits.max_pages,
                "queued": extractor.queue.qsize() if extractor.queue else 0, "batches": len(extractor.batches),
                "largest_batch": max(extractor.batches, default=0), "max_queue": extractor.max_queue,
                "api_key_required": api_key is not None}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return (resources.files("qwenvl_tune") / "assets" / "serve.html").read_text(encoding="utf-8")

    @app.post("/v1/extract")
    async def extract(request: Request):
        if not _authorised(request):
            return _error(401, "missing or wrong API key (send it in the X-API-Key header)", "unauthorized")
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            return _error(415, f"send multipart/form-data with an 'image' file field, not '{ctype or 'nothing'}'",
                          "unsupported_media_type")
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > body_limit:
            return _error(413, f"upload of {int(length) / 2**20:.1f} MiB exceeds the {max_upload_mb:g} MiB limit",
                          "too_large")
        async with reading:  # a cap on uploads being read at once (each holds at most body_limit bytes)
            body = await _read_limited(request, body_limit)
        app.state.last_body_bytes = len(body) if body is not None else body_limit + 1
        if body is None:  # stopped reading at the limit: nothing past it was read or spooled
            return _error(413, f"upload exceeds the {max_upload_mb:g} MiB limit (stopped reading at the limit)",
                          "too_large")
        boundary = _boundary(ctype)
        if boundary is None:
            return _error(400, "multipart/form-data without a boundary parameter in its Content-Type", "bad_request")
        if b"--" + boundary.encode("latin-1") + b"--" not in body:
            return _error(400, "the multipart body ends without its closing boundary (a truncated upload?)",
                          "bad_request")
        try:
            form = await _replayed(request, body).form(max_part_size=max_bytes + 1)
        except Exception as e:  # noqa: BLE001 - malformed multipart bodies and oversize parts
            msg = str(e)
            status = 413 if "size" in msg.lower() or "too large" in msg.lower() else 400
            return _error(status, f"could not read the upload: {msg}", "too_large" if status == 413 else "bad_request")
        uploads = [u for u in form.getlist("image") if not isinstance(u, str)]
        if not uploads:
            return _error(422, "no file in the 'image' field", "missing_image")
        files = [BytesSource(await u.read(), u.filename or "upload") for u in uploads]
        size = sum(len(f.data) for f in files)
        if size > max_bytes:
            return _error(413, f"upload of {size / 2**20:.1f} MiB exceeds the {max_upload_mb:g} MiB limit", "too_large")
        prompt = form.get("prompt") or extractor.config.data.prompt
        if not isinstance(prompt, str) or len(prompt) > 4000:
            return _error(422, "'prompt' must be text of at most 4000 characters", "bad_prompt")
        try:  # PDF pages are rendered off the event loop
            pages = await asyncio.get_running_loop().run_in_executor(None, load_pages, files, limits)
        except DataError as e:
            status = 413 if "exceeds the limit" in e.reason or "max_pages" in e.reason else 400
            return _error(status, e.reason, "too_large" if status == 413 else "bad_image")
        try:
            result = await extractor.extract(pages, prompt)
        except QueueFull:
            return _error(429, f"the queue is full ({extractor.max_queue} requests waiting); retry later", "queue_full")
        except Exception as e:  # noqa: BLE001
            return _error(500, f"generation failed: {type(e).__name__}: {e}", "internal")
        names = [f.filename for f in files]
        return {"image": names[0] if len(names) == 1 else names, "pages": len(pages), **result}

    _openai_routes(app, extractor, _authorised, max_bytes, limits, reading)
    return app


def _openai_routes(app: FastAPI, extractor: Extractor, authorised: Any, max_bytes: int, limits: Any,
                   reading: asyncio.Semaphore) -> None:
    """``/v1/chat/completions`` and ``/v1/models``: same queue, limits and key as ``/v1/extract``."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import StreamingResponse

    from . import openai_api as oa

    model_id = extractor.run_dir.name
    body_limit = max_bytes * 4 // 3 + 256 * 1024  # base64 of the largest image, plus the rest of the request

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return _error(400, f"invalid request: {where or 'body'}: {first.get('msg', 'malformed')}", "invalid_request",
                      where)

    @app.get("/v1/models", response_model=oa.ModelList)
    async def models(request: Request):
        if not authorised(request):
            return _error(401, "missing or wrong API key", "invalid_api_key")
        return oa.ModelList(data=[oa.ModelCard(id=model_id, created=int(extractor.run_dir.stat().st_mtime),
                                               base_model=extractor.config.model.name_or_path)]).model_dump()

    @app.post("/v1/chat/completions", response_model=oa.ChatCompletion,
              responses={400: {"model": oa.ErrorResponse}, 401: {"model": oa.ErrorResponse},
                         413: {"model": oa.ErrorResponse}, 422: {"model": oa.ErrorResponse},
                         429: {"model": oa.ErrorResponse}})
    async def chat(request: Request):
        if not authorised(request):
            return _error(401, "missing or wrong API key (Authorization: Bearer KEY, or X-API-Key)", "invalid_api_key")
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > body_limit:
            return _error(413, f"request of {int(length) / 2**20:.1f} MiB exceeds the limit", "too_large")
        async with reading:
            raw = await _read_limited(request, body_limit)
        if raw is None:
            return _error(413, "request exceeds the limit (stopped reading at the limit)", "too_large")
        try:
            req = oa.ChatCompletionRequest.model_validate_json(raw)
        except Exception as e:  # noqa: BLE001 - pydantic's ValidationError, or bytes that are no JSON
            errors = getattr(e, "errors", lambda: [])()
            first = errors[0] if errors else {}
            where = ".".join(str(x) for x in first.get("loc", ())) or None
            return _error(400, f"invalid request: {where or 'body'}: {first.get('msg', 'not valid JSON')}",
                          "invalid_request", where)
        try:
            loop = asyncio.get_running_loop()  # images decoded and PDF pages rendered off the event loop
            image, prompt, system = await loop.run_in_executor(None, oa.parse_request, req, max_bytes, limits)
            job = _Job(image, prompt, asyncio.get_running_loop().create_future(), system,
                       _constraint(extractor, req), oa.sampling_of(req), req.max_completion_tokens or req.max_tokens,
                       bool(req.logprobs), req.top_logprobs or 0)
            # encoded once, off the event loop: for the budget check here and for generation in the queue
            job.item = await asyncio.get_running_loop().run_in_executor(
                None, extractor.predictor.encode, image, prompt, system)
            prompt_tokens = len(job.item["input_ids"])
            budget = extractor.config.data.max_length
            if prompt_tokens > budget:
                raise oa.OpenAIError(400, f"the prompt and image take {prompt_tokens} tokens, over this model's "
                                          f"budget of {budget} (data.max_length)", "messages", "context_length_exceeded")
        except oa.OpenAIError as e:
            return _error(e.status, e.message, e.code or "invalid_request", e.param)
        if req.stream:
            return StreamingResponse(_stream(extractor, job, model_id), media_type="text/event-stream")
        try:
            gen = await extractor.submit(job)
        except QueueFull:
            return _error(429, f"the queue is full ({extractor.max_queue} requests waiting); retry later", "queue_full")
        except Exception as e:  # noqa: BLE001
            return _error(500, f"generation failed: {type(e).__name__}: {e}", "internal")
        return oa.completion(model_id, gen.text, gen.finish_reason, gen.prompt_tokens, gen.completion_tokens,
                             oa.choice_logprobs(gen, extractor.predictor.processor.tokenizer) if job.logprobs else None)


def _constraint(extractor: Extractor, req: Any) -> Any:
    """The decoding a request asks for: the caller's schema, the run's learnt one, or none."""
    from . import openai_api as oa

    fmt = req.response_format
    if fmt is None or fmt.type == "json_object":
        return "run" if extractor.predictor.schema is not None else None
    if fmt.type == "text":
        return None
    schema = fmt.json_schema.schema_ if fmt.json_schema else None
    if not isinstance(schema, dict):
        raise oa.OpenAIError(422, "response_format json_schema needs a 'schema' object", "response_format",
                             "invalid_json_schema")
    try:
        return extractor.constraint_for_schema(schema)
    except Exception as e:  # noqa: BLE001 - the grammar compiler's word on a schema it cannot compile
        raise oa.OpenAIError(422, f"invalid JSON schema: {str(e).splitlines()[0][:300]}", "response_format",
                             "invalid_json_schema") from None


async def _stream(extractor: Extractor, job: _Job, model_id: str):
    """Server-sent events in OpenAI's chunk format, text as it is generated (a request streams on its own)."""
    import uuid

    from transformers import TextIteratorStreamer

    from . import openai_api as oa

    cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    tok = extractor.predictor.processor.tokenizer
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=600)
    loop = asyncio.get_running_loop()

    def run() -> Generation:
        item = job.item or extractor.predictor.encode(job.image, job.prompt, job.system)
        with extractor.model_lock:
            return extractor.predictor.complete([item], constraint=job.constraint, max_new_tokens=job.max_new_tokens,
                                                sampling=job.sampling, streamer=streamer, logprobs=job.logprobs,
                                                top_logprobs=job.top_logprobs)[0]

    future = loop.run_in_executor(None, run)
    yield oa.chunk(cid, model_id, created, {"role": "assistant", "content": ""})
    hold = max((len(x) for x in job.sampling.stop), default=1) - 1  # chars that may start a stop string
    received, yielded = "", 0
    iterator = iter(streamer)
    while True:
        piece = await loop.run_in_executor(None, next, iterator, None)
        if piece is None:
            break
        received += piece
        cut = min([received.find(x) for x in job.sampling.stop if x in received] or [len(received) - hold])
        if cut > yielded:
            yield oa.chunk(cid, model_id, created, {"content": received[yielded:cut]})
            yielded = cut
    gen = await future
    if gen.text.startswith(received[:yielded]) and len(gen.text) > yielded:  # the rest, up to where it ends
        yield oa.chunk(cid, model_id, created, {"content": gen.text[yielded:]})
    if job.logprobs:  # the tokens' log-probabilities, once they are all known
        yield oa.chunk(cid, model_id, created, {}, logprobs=oa.choice_logprobs(gen, tok))
    yield oa.chunk(cid, model_id, created, {}, gen.finish_reason,
                   {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
                    "total_tokens": gen.prompt_tokens + gen.completion_tokens})
    yield "data: [DONE]\n\n"


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, which: str = "best",
          api_key: str | None = None, max_upload_mb: float = 20.0, max_batch: int = 8,
          overrides: dict[str, Any] | None = None) -> None:
    import uvicorn

    app = create_app(Extractor(run_dir, which, max_batch=max_batch, overrides=overrides), api_key=api_key,
                     max_upload_mb=max_upload_mb)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {host}, reachable from other machines" +
              ("" if api_key else " without an API key (--api-key)"))
    print(f"qwenvl-tune serving {run_dir} on http://{host}:{port}/  (POST /v1/extract, POST /v1/chat/completions, "
          f"GET /v1/models, GET /health, docs at /docs)")
    uvicorn.run(app, host=host, port=port, log_level="info")


__all__ = ["Extractor", "create_app", "serve"]
