"""The OpenAI-compatible routes of ``serve``: ``POST /v1/chat/completions`` and ``GET /v1/models``.

Applications, gateways and SDKs written for the OpenAI API (and for vLLM, SGLang, LMDeploy, which speak it)
call the fine-tuned model unchanged. A request carries one document image as an ``image_url`` part holding a
``data:`` URL (nothing is fetched from the server) and, optionally, text: the instruction. ``response_format``
chooses the decoding: ``json_schema`` under the caller's schema, ``json_object`` or none under the run's learnt
answer schema (so every answer parses and has the learnt shape), ``text`` unconstrained.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..data.documents import BytesSource, PageLimits, load_document
from ..data.records import DataError
from ..modeling.generate import Sampling


class OpenAIError(Exception):
    """A request error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- request and response models (the OpenAPI schema at /openapi.json is generated from them)

class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    image_url: ImageURL | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # other OpenAI parameters are accepted and have no effect here
    model: str | None = None
    messages: list[Message]
    response_format: ResponseFormat | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    n: int = 1
    stop: str | list[str] | None = None
    stream: bool = False
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class Choice(BaseModel):
    index: int = 0
    message: ChatMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChoiceLogprobs | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "qwenvl-tune"
    base_model: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ---- turning a request into a generation job

def _text(content: str | list[ContentPart] | None) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(p.text for p in content or [] if p.type == "text" and p.text)


def decode_data_url(url: str, max_bytes: int, limits: PageLimits) -> list[Any]:
    """The pages of a ``data:`` URL (an image, or a PDF's pages), or an ``OpenAIError`` saying precisely what is
    wrong."""
    if url.startswith(("http://", "https://")):
        raise OpenAIError(400, "remote image URLs are not fetched by this server; send the image inline as a "
                               "data: URL (data:image/png;base64,...)", "messages", "remote_url_not_supported")
    if not url.startswith("data:") or "," not in url:
        raise OpenAIError(400, "image_url must be a data: URL (data:image/png;base64,...)", "messages",
                          "invalid_image_url")
    header, payload = url[5:].split(",", 1)
    mime = header.split(";")[0].lower()
    if not mime.startswith("image/") and mime != "application/pdf":
        raise OpenAIError(400, f"the data: URL holds {mime or 'no media type'}, not an image", "messages",
                          "invalid_image_url")
    if ";base64" not in header.lower():
        raise OpenAIError(400, "the image data: URL must be base64-encoded (data:image/png;base64,...)", "messages",
                          "invalid_image_url")
    if len(payload) * 3 // 4 > max_bytes:
        raise OpenAIError(413, f"image of {len(payload) * 3 / 4 / 2**20:.1f} MiB exceeds the "
                               f"{max_bytes / 2**20:g} MiB limit", "messages", "too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise OpenAIError(400, "the image's base64 data is invalid or truncated", "messages", "invalid_base64") \
            from None
    try:
        return load_document(BytesSource(data, "pdf" if mime == "application/pdf" else "image"), limits)
    except DataError as e:
        status = 413 if "exceeds the limit" in e.reason or "max_pages" in e.reason else 400
        raise OpenAIError(status, e.reason.removeprefix("image: "), "messages",
                          "too_large" if status == 413 else "invalid_image") from None


def parse_request(req: ChatCompletionRequest, max_bytes: int, limits: PageLimits
                  ) -> tuple[list[Any], str | None, str | None]:
    """(pages, instruction or None, system message or None) of a chat request. Each ``image_url`` part is a page
    (a PDF gives all of its pages), in the order they come; at most ``data.max_pages`` in all."""
    if req.n != 1:
        raise OpenAIError(400, "n must be 1: one answer per request", "n", "unsupported_value")
    images = [p.image_url for m in req.messages if isinstance(m.content, list) for p in m.content
              if p.type == "image_url"]
    if any(i is None for i in images):
        raise OpenAIError(400, "an image_url part has no image_url object", "messages", "invalid_image_url")
    if not images:
        raise OpenAIError(400, "no image: send the document as an image_url content part", "messages",
                          "missing_image")
    unknown = {p.type for m in req.messages if isinstance(m.content, list) for p in m.content} - {"text", "image_url"}
    if unknown:
        raise OpenAIError(400, f"unsupported content part type(s): {sorted(unknown)}", "messages", "invalid_content")
    pages: list[Any] = []
    for image in images:
        pages += decode_data_url(image.url, max_bytes, limits)
        if len(pages) > limits.max_pages:
            raise OpenAIError(413, f"the request holds {len(pages)}+ pages, over this model's data.max_pages="
                                   f"{limits.max_pages}", "messages", "too_many_pages")
    user = "\n".join(t for m in req.messages if m.role == "user" and (t := _text(m.content)))
    system = "\n".join(t for m in req.messages if m.role in ("system", "developer") and (t := _text(m.content)))
    return pages, user or None, system or None


def sampling_of(req: ChatCompletionRequest) -> Sampling:
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    return Sampling(temperature=req.temperature or None, top_p=req.top_p, seed=req.seed, stop=stop)


def _token(tokenizer: Any, token_id: int) -> tuple[str, list[int]]:
    text = tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return text, list(text.encode("utf-8"))


def choice_logprobs(gen: Any, tokenizer: Any) -> dict[str, Any] | None:
    """OpenAI's ``logprobs.content``: each answer token (the end-of-turn token excluded) with its log-probability
    under the distribution it was drawn from (after the schema's mask), and the most likely alternatives."""
    if gen.logprobs is None:
        return None
    content = []
    n = len(gen.token_ids) - (0 if gen.truncated else 1)  # the end-of-turn token is not part of the content
    for k in range(max(0, n)):
        text, raw = _token(tokenizer, gen.token_ids[k])
        top = [{"token": t, "logprob": lp, "bytes": b} for t, b, lp in
               ((*_token(tokenizer, i), lp) for i, lp in (gen.top_logprobs[k] if gen.top_logprobs else []))]
        content.append({"token": text, "logprob": gen.logprobs[k], "bytes": raw, "top_logprobs": top})
    return {"content": content}


def completion(model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int,
               logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return ChatCompletion(id=f"chatcmpl-{uuid.uuid4().hex[:24]}", created=int(time.time()), model=model,
                          choices=[Choice(message=ChatMessage(content=text), finish_reason=finish,
                                          logprobs=ChoiceLogprobs.model_validate(logprobs) if logprobs else None)],
                          usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                      total_tokens=prompt_tokens + completion_tokens)).model_dump()


def chunk(cid: str, model: str, created: int, delta: dict[str, Any], finish: str | None = None,
          usage: dict[str, int] | None = None, logprobs: dict[str, Any] | None = None) -> str:
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]}
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
