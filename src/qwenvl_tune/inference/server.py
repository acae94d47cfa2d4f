"""``qwenvl-tune serve``: an HTTP service and a web page around a run's model.

- ``POST /v1/extract`` (multipart: ``image`` file, optional ``prompt``) -> the JSON, with timings.
  Concurrent requests are queued and generated together, up to ``max_batch`` at a time.
- ``GET /health``; ``GET /`` serves a page to drop or pick a document image and read the result.
- Limits on upload size and image pixels, an optional API key (``X-API-Key``), and clear 4xx
  errors for bad images, oversize uploads and wrong content types. Binds to localhost by default.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from ..data.images import load_image_bytes
from ..data.records import DataError


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


@dataclass
class _Job:
    image: Any
    prompt: str
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)


class Extractor:
    """The loaded model plus a queue that batches concurrent requests."""

    def __init__(self, run_dir: str | Path, which: str = "best", max_batch: int = 8, wait_ms: float = 10.0,
                 device: str | None = None):
        from ..inference.structured import run_constraint
        from ..modeling.load import load_for_inference

        self.run_dir = Path(run_dir)
        self.model, self.processor, self.config = load_for_inference(self.run_dir, which, device=device)
        self.constraint = run_constraint(self.run_dir, self.model, self.processor, self.config.generate.constrained)
        self.max_batch, self.wait = max_batch, wait_ms / 1000
        self.queue: asyncio.Queue[_Job] | None = None
        self.batches: list[int] = []  # sizes of the batches generated (for /health and tests)
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._worker:
            self._worker.cancel()

    async def extract(self, image: Any, prompt: str) -> dict[str, Any]:
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put(_Job(image, prompt, fut))
        return await fut

    async def _run(self) -> None:
        from ..inference.generate import extraction_result, generate_for_images

        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            deadline = loop.time() + self.wait
            while len(jobs) < self.max_batch:
                try:
                    jobs.append(await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time())))
                except asyncio.TimeoutError:
                    break
            started = time.perf_counter()
            try:
                texts, cut = await loop.run_in_executor(None, lambda: generate_for_images(
                    self.model, self.processor, [j.image for j in jobs], [j.prompt for j in jobs],
                    self.config.data.system_message, len(jobs), self.config.generate.max_new_tokens, self.constraint))
            except Exception as e:  # noqa: BLE001 - every waiting request gets the error, the server stays up
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            self.batches.append(len(jobs))
            done = time.perf_counter()
            for j, text, c in zip(jobs, texts, cut):
                j.future.set_result({**extraction_result(text, c), "batch_size": len(jobs),
                                     "timing_ms": {"queued": round((started - j.queued) * 1000, 1),
                                                   "generate": round((done - started) * 1000, 1),
                                                   "total": round((done - j.queued) * 1000, 1)}})


def create_app(extractor: Extractor, *, api_key: str | None = None, max_upload_mb: float = 20.0,
               max_image_pixels: int = 50_000_000) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        extractor.start()
        yield
        await extractor.stop()

    app = FastAPI(title="qwenvl-tune", description="Document image -> JSON with a fine-tuned Qwen-VL model",
                  lifespan=lifespan)
    max_bytes = int(max_upload_mb * 2**20)

    def _authorised(request: Request) -> bool:
        return api_key is None or hmac.compare_digest(request.headers.get("x-api-key", ""), api_key)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "run": extractor.run_dir.name, "base_model": extractor.config.model.name_or_path,
                "method": extractor.config.model.method, "constrained": extractor.constraint is not None,
                "queued": extractor.queue.qsize() if extractor.queue else 0, "batches": len(extractor.batches),
                "largest_batch": max(extractor.batches, default=0), "api_key_required": api_key is not None}

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
        if length and length.isdigit() and int(length) > max_bytes + 64 * 1024:
            return _error(413, f"upload of {int(length) / 2**20:.1f} MiB exceeds the {max_upload_mb:g} MiB limit",
                          "too_large")
        try:
            form = await request.form(max_part_size=max_bytes + 1)
        except Exception as e:  # noqa: BLE001 - malformed multipart bodies and oversize parts
            msg = str(e)
            status = 413 if "size" in msg.lower() or "too large" in msg.lower() else 400
            return _error(status, f"could not read the upload: {msg}", "too_large" if status == 413 else "bad_request")
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            return _error(422, "no file in the 'image' field", "missing_image")
        data = await upload.read()
        if len(data) > max_bytes:
            return _error(413, f"image of {len(data) / 2**20:.1f} MiB exceeds the {max_upload_mb:g} MiB limit", "too_large")
        prompt = form.get("prompt") or extractor.config.data.prompt
        if not isinstance(prompt, str) or len(prompt) > 4000:
            return _error(422, "'prompt' must be text of at most 4000 characters", "bad_prompt")
        try:
            image = load_image_bytes(data, upload.filename or "upload", max_pixels=max_image_pixels)
        except DataError as e:
            status = 413 if "exceeds the limit" in e.reason else 400
            return _error(status, e.reason, "too_large" if status == 413 else "bad_image")
        try:
            result = await extractor.extract(image, prompt)
        except Exception as e:  # noqa: BLE001
            return _error(500, f"generation failed: {type(e).__name__}: {e}", "internal")
        return {"image": upload.filename, **result}

    return app


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, which: str = "best",
          api_key: str | None = None, max_upload_mb: float = 20.0, max_batch: int = 8) -> None:
    import uvicorn

    app = create_app(Extractor(run_dir, which, max_batch=max_batch), api_key=api_key, max_upload_mb=max_upload_mb)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {host}, reachable from other machines" +
              ("" if api_key else " without an API key (--api-key)"))
    print(f"qwenvl-tune serving {run_dir} on http://{host}:{port}/  (POST /v1/extract, GET /health)")
    uvicorn.run(app, host=host, port=port, log_level="info")


__all__ = ["Extractor", "create_app", "serve"]
