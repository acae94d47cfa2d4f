"""The one conversation builder, used by training, validation, prediction and serving.

[system?] + user [page 1, ..., page n, prefix] + assistant [answer]: a document's pages in order, then the
instruction. With no system message the model's own chat template decides (Qwen2/2.5-VL add a default one,
Qwen3-VL none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def build_messages(prefix: str, system_message: str | None = None, answer: str | None = None,
                   pages: int = 1) -> list[dict[str, Any]]:
    """Chat messages for one sample; each page is a placeholder filled in by the processor."""
    messages: list[dict[str, Any]] = []
    if system_message:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_message}]})
    content = [{"type": "image"} for _ in range(pages)] + [{"type": "text", "text": prefix}]
    messages.append({"role": "user", "content": content})
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


@dataclass(frozen=True)
class RenderedTurns:
    """A sample rendered by the chat template, split where supervision starts and ends.

    ``prompt`` ends with the generation prompt (e.g. ``<|im_start|>assistant\\n``);
    ``target`` is what the model must produce: the answer and the end-of-turn
    marker; ``tail`` is what the template adds after that (e.g. a newline), kept
    in the sequence but not supervised.
    """

    prompt: str
    target: str
    tail: str


def render(processor: Any, prefix: str, system_message: str | None, answer: str | None = None,
           pages: int = 1) -> RenderedTurns:
    """Render prompt (and, with ``answer``, the supervised target) as text with the processor's template.

    The split is derived from the template itself, so no token or marker is
    hard-coded: the prompt is the template with ``add_generation_prompt``; the
    full conversation must start with it; the target runs to the first
    non-whitespace text after the answer (the end-of-turn marker).
    """
    prompt = processor.apply_chat_template(build_messages(prefix, system_message, pages=pages),
                                           add_generation_prompt=True, tokenize=False)
    if answer is None:
        return RenderedTurns(prompt, "", "")
    full = processor.apply_chat_template(build_messages(prefix, system_message, answer, pages), tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently with and without the answer; "
                         "cannot tell where the answer starts")
    rest = full[len(prompt):]
    at = rest.find(answer)
    if at < 0:
        raise ValueError("the chat template changed the answer text; cannot supervise it")
    after = rest[at + len(answer):]
    stripped = after.lstrip()
    end_marker = after[: len(after) - len(stripped)] + stripped.split("\n", 1)[0].split(" ", 1)[0]
    # The end-of-turn marker is the first token-like run after the answer, e.g. '<|im_end|>'.
    return RenderedTurns(prompt, rest[: at + len(answer)] + end_marker, after[len(end_marker):])


def end_of_turn_text(processor: Any) -> str:
    """The marker the template puts after an assistant answer (``<|im_end|>`` for Qwen)."""
    turns = render(processor, "x", None, "y")
    return turns.target[turns.target.rfind("y") + 1:].strip()
