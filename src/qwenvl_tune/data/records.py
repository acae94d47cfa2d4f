"""JSONL annotations -> validated records.

One row per line: ``{"image": "scan.jpg", "prefix": "...", "suffix": ...}``.
``image`` is relative to the split folder and may not resolve outside it;
``prefix`` is the instruction; ``suffix`` is the target, a non-empty string or
a JSON object/array. Every problem names the file, the line and the field.

This module imports no model code.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ..errors import QwenVLTuneError

REQUIRED_KEYS = ("image", "prefix", "suffix")

SPLIT_ALIASES = {"train": ("train",), "valid": ("valid", "val", "validation"), "test": ("test",)}
ANNOTATIONS = "annotations.jsonl"


class DataError(QwenVLTuneError):
    """Bad input data. ``file``, ``line`` and ``field`` say where."""

    def __init__(self, message: str, file: str | Path | None = None, line: int | None = None, field: str | None = None):
        self.file = str(file) if file is not None else None
        self.line = line
        self.field = field
        self.reason = message
        where = ""
        if self.file:
            where = self.file + (f":{line}" if line is not None else "")
            where += f" [{field}]" if field else ""
            where += ": "
        super().__init__(where + message)


class JSONLError(DataError):
    """A line is not a valid JSON object (malformed, duplicate keys, not an object)."""


class SchemaError(DataError):
    """A row is valid JSON but a key is missing, extra or of the wrong type."""


class ImagePathError(DataError):
    """An image path is missing, absolute, a directory or escapes its split folder."""


class ImageError(DataError):
    """An image file cannot be used (corrupt, not an image, too large, too small, animated)."""


class SplitError(DataError):
    """A split folder or its annotations file is missing."""


class DuplicateKeyError(ValueError):
    pass


@dataclass
class Problem:
    """One finding of the data check. ``level`` is 'error' (row unusable) or 'warning'."""

    file: str
    line: int | None
    field: str | None
    message: str
    level: str = "error"
    kind: str = "DataError"

    def __str__(self) -> str:
        loc = self.file + (f":{self.line}" if self.line is not None else "")
        fld = f" [{self.field}]" if self.field else ""
        return f"{loc}{fld}: {self.level}: {self.message}"

    @classmethod
    def from_error(cls, err: DataError, level: str = "error") -> "Problem":
        return cls(err.file or "", err.line, err.field, err.reason, level, type(err).__name__)


@dataclass
class Record:
    """One validated sample: a document (one or more input files, each an image or a PDF), its prompt and answer.

    ``id`` is stable: ``<split>:<line>`` (or ``<split>:<row>`` for table formats). ``system`` is a row's own
    system message (messages-style rows), used instead of ``data.system_message``.
    """

    id: str
    split: str
    sources: tuple[Any, ...]
    prefix: str
    suffix: Any
    file: str
    line: int
    system: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    answer_field: str = "suffix"  # where the row holds its answer, for messages about it

    @property
    def target_text(self) -> str:
        return serialize_target(self.suffix)

    @property
    def image_names(self) -> list[str]:
        """The document's input files, as predictions and reports name them."""
        return [s.name for s in self.sources]

    @property
    def where(self) -> tuple[str, int]:
        return self.file, self.line


def data_fingerprint(records: Sequence[Record]) -> str:
    """What a split's usable documents are, in one line: their count and a digest of each one's id, files, prompt,
    system message and answer (not the files' bytes: reading every image again would cost a run's start minutes)."""
    h = hashlib.sha256()
    for r in records:
        # files by their place in the split, so the same documents moved elsewhere are the same documents
        here = os.path.dirname(r.file)
        files = [os.path.relpath(n, here) if os.path.isabs(n) else n for n in r.image_names]
        h.update("\x1f".join([r.id, *files, r.prefix, r.system or "", r.target_text]).encode() + b"\x1e")
    return f"{len(records)} documents, sha256 {h.hexdigest()[:16]}"


def read_text_file(path: Path) -> str:
    """A user's UTF-8 text file (a byte-order mark dropped); a missing or undecodable one is a DataError naming it."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError("file not found", path) from None
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text ({e.reason} at byte {e.start})", path) from None


def serialize_target(suffix: Any) -> str:
    """The assistant's answer as text: strings as is, JSON with key order and non-ASCII kept."""
    if isinstance(suffix, str):
        return suffix
    return json.dumps(suffix, ensure_ascii=False, allow_nan=False)


class _Constant(Exception):
    pass


def _reject_constant(name: str) -> Any:
    raise _Constant(name)


# a JSON string (skipped) or one of Python's non-standard constants
_CONSTANT_OR_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|(-?Infinity|NaN)')


def loads_json(text: str, **kwargs: Any) -> Any:
    """``json.loads`` without Python's extensions: ``NaN``, ``Infinity`` and ``-Infinity`` are not JSON (RFC 8259),
    and a text holding one raises ``json.JSONDecodeError`` at its place, as any other invalid JSON does. Every
    answer, annotation and model output is read through this, so an answer that no JSON parser but Python's reads
    is never trained on, nor scored valid."""
    try:
        return json.loads(text, parse_constant=_reject_constant, **kwargs)
    except _Constant as e:
        found = next((m for m in _CONSTANT_OR_STRING.finditer(text) if m.group(1)), None)
        raise json.JSONDecodeError(f"{e.args[0]} is not JSON (write null or a string)", text,
                                   found.start(1) if found else 0) from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise DuplicateKeyError(k)
        out[k] = v
    return out


def parse_line(text: str, file: str, line: int) -> dict[str, Any]:
    """Parse one JSONL line into a dict; raise JSONLError naming the place."""
    try:
        obj = loads_json(text, object_pairs_hook=_no_duplicates)
    except DuplicateKeyError as e:
        raise JSONLError(f"duplicate key '{e.args[0]}' in one object", file, line, str(e.args[0])) from None
    except json.JSONDecodeError as e:
        raise JSONLError(f"malformed JSON at column {e.colno}: {e.msg}", file, line) from None
    except RecursionError:
        raise JSONLError("JSON nested too deeply to parse", file, line) from None
    if not isinstance(obj, dict):
        raise JSONLError(f"each line must be a JSON object, got {type(obj).__name__}", file, line)
    return obj


# Row layouts, detected per row by their keys. Each maps to (document files, prompt, answer[, system]).
ROBOFLOW = "roboflow"  # {"image" | "images", "prefix", "suffix"}: Roboflow / maestro JSONL
MESSAGES = "messages"  # {"messages": [{"role", "content"}], "images"}: LLaMA-Factory (openai style) / ms-swift
SHAREGPT = "sharegpt"  # {"conversations": [{"from", "value"}], "images"}: LLaMA-Factory sharegpt
IMAGEFOLDER = "imagefolder"  # {"file_name", "ground_truth" | ...}: Hugging Face ImageFolder / donut-python metadata
FORMAT_NAMES = {ROBOFLOW: "Roboflow/maestro rows (image, prefix, suffix)",
                MESSAGES: "messages rows (LLaMA-Factory / ms-swift: messages + images)",
                SHAREGPT: "ShareGPT rows (LLaMA-Factory: conversations + images)",
                IMAGEFOLDER: "ImageFolder metadata rows (Hugging Face / donut-python: file_name + answer)"}
METADATA_FILES = ("metadata.jsonl", "metadata.csv")  # what Hugging Face's ImageFolder (and donut-python) read
KNOWN_KEYS = {ROBOFLOW: {"image", "images", "prefix", "suffix"},
              MESSAGES: {"messages", "images", "image", "system"},
              SHAREGPT: {"conversations", "images", "image", "system"}}
IMAGE_MARKER = "<image>"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
          "bot": "assistant", "model": "assistant"}


@dataclass
class Row:
    """One row's content, whatever its layout: document files (unresolved), prompt, answer, system message."""

    layout: str
    images: list[Any]
    prompt: str
    answer: Any
    system: str | None = None
    ignored: tuple[str, ...] = ()
    answer_field: str = "suffix"
    donut: bool = False  # the answer was unwrapped from Donut-style ground truth ({"gt_parse": ...})
    image_field: str = ""  # the key of the row's document files, for messages about them ("" : image / images)


def donut_note(source: str, n: int) -> "Problem":
    """The one warning per split that ``n`` answers were unwrapped from Donut-style ground truth."""
    return Problem(source, None, None, f"{n} answer(s) taken from Donut-style ground truth ('gt_parse' inside the "
                   f"answer)", "warning", "DonutGroundTruth")


def row_layout(obj: dict[str, Any], file: str, line: int) -> str:
    if "messages" in obj:
        return MESSAGES
    if "conversations" in obj:
        return SHAREGPT
    if {"image", "images", "prefix", "suffix"} & set(obj):
        return ROBOFLOW
    where = (f"; rows with file_name are Hugging Face ImageFolder / donut-python metadata, read from a file named "
             f"{' or '.join(METADATA_FILES)} in the split folder" if "file_name" in obj else "")
    raise SchemaError(f"unrecognised row with keys {sorted(obj)[:6]}: a row needs image (or images), prefix and suffix "
                      f"(Roboflow/maestro), or messages + images (LLaMA-Factory / ms-swift){where}", file, line,
                      next(iter(sorted(obj)), None))


def check_answer(answer: Any, file: str, line: int, field: str) -> Any:
    if answer is None:
        raise SchemaError(f"'{field}' is null; it must be the target answer (a string or a JSON object/array)",
                          file, line, field)
    if isinstance(answer, str):
        if not answer.strip():
            raise SchemaError(f"'{field}' is empty; it must be the target answer", file, line, field)
    elif isinstance(answer, (dict, list)):
        if not answer:
            raise SchemaError(f"'{field}' is an empty {type(answer).__name__}; it must hold the target answer",
                              file, line, field)
        try:  # a table's cell can hold a float NaN, which JSON has no way to write
            json.dumps(answer, allow_nan=False)
        except ValueError:
            raise SchemaError(f"'{field}' holds NaN or Infinity, which JSON does not have (use null or a string)",
                              file, line, field) from None
        except TypeError as e:
            raise SchemaError(f"'{field}' holds a value JSON cannot write: {e}", file, line, field) from None
    else:
        raise SchemaError(f"'{field}' must be a string, object or array, got {type(answer).__name__}", file, line, field)
    return answer


def image_list(obj: dict[str, Any], file: str, line: int, required: bool = True) -> tuple[list[Any], str]:
    """The row's document files from ``image`` (one) or ``images`` (a list, in page order)."""
    if "image" in obj and "images" in obj:
        raise SchemaError("both 'image' and 'images' given; use 'images' for a document of several files",
                          file, line, "images")
    if "images" in obj:
        images = obj["images"]
        if not isinstance(images, list) or not images:
            raise SchemaError(f"'images' must be a non-empty list of file paths, got {images!r:.80}", file, line,
                              "images")
        return images, "images"
    if "image" in obj:
        return [obj["image"]], "image"
    if required:
        raise SchemaError("missing key 'image' (or 'images', a list of pages)", file, line, "image")
    return [], "images"


def _content_text(content: Any, file: str, line: int, field: str) -> tuple[str, list[Any]]:
    """A message's text and the image paths given inline (``{"type": "image", "image": path}`` parts)."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise SchemaError(f"'{field}' must be a string or a list of parts, got {type(content).__name__}", file, line,
                          field)
    text, inline = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            text.append(part["text"])
        elif kind in ("image", "image_url"):
            text.append(IMAGE_MARKER)
            path = part.get("image")
            if kind == "image_url":
                path = path or (part.get("image_url") or {}).get("url")
            if path is not None:
                inline.append(path)
        else:
            raise SchemaError(f"part {j} must be {{'type': 'text', 'text': ...}} or {{'type': 'image'}}, got "
                              f"{part!r:.80}", file, line, f"{field}[{j}]")
    return "".join(text), inline


def parse_conversation(obj: dict[str, Any], layout: str, file: str, line: int) -> Row:
    """A messages / ShareGPT row: an optional system turn, one user turn with one ``<image>`` marker per
    document file, one assistant answer."""
    key, role_key, text_key = ("messages", "role", "content") if layout == MESSAGES else \
        ("conversations", "from", "value")
    turns = obj[key]
    if not isinstance(turns, list) or not turns:
        raise SchemaError(f"'{key}' must be a non-empty list of turns", file, line, key)
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        raise SchemaError(f"'system' must be a string, got {type(system).__name__}", file, line, "system")
    user = answer = None
    inline: list[Any] = []
    for i, turn in enumerate(turns):
        at = f"{key}[{i}]"
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise SchemaError(f"each turn needs '{role_key}' and '{text_key}', got {turn!r:.80}", file, line, at)
        role = _ROLES.get(turn[role_key]) if isinstance(turn[role_key], str) else None
        if role is None:
            raise SchemaError(f"unknown role {turn[role_key]!r} (system, user, assistant)", file, line,
                              f"{at}.{role_key}")
        text, paths = _content_text(turn[text_key], file, line, f"{at}.{text_key}")
        if role == "system":
            if i != 0:
                raise SchemaError("a system turn must come first", file, line, at)
            system = text
        elif role == "user":
            if user is not None:
                raise SchemaError("multi-turn conversations are not supported: a document sample is one user turn "
                                  "(the pages and the instruction) and one assistant answer", file, line, at)
            user, inline = (text, at), paths
        else:
            if user is None:
                raise SchemaError("the assistant answer comes before any user turn", file, line, at)
            if answer is not None:
                raise SchemaError("more than one assistant answer; a document sample has exactly one", file, line, at)
            if IMAGE_MARKER in text:
                raise SchemaError(f"'{IMAGE_MARKER}' in the assistant answer; images go in the user turn", file,
                                  line, f"{at}.{text_key}")
            answer = (turn[text_key], at)
    if user is None:
        raise SchemaError("no user turn", file, line, key)
    if answer is None:
        raise SchemaError("no assistant turn: the last turn must be the answer to learn", file, line, key)
    images, field = image_list(obj, file, line, required=not inline)
    if inline:
        if images:
            raise SchemaError("images given both inline in the user turn and in 'images'", file, line, field)
        images = inline
    (prompt, user_at), (text, answer_at) = user, answer
    markers = prompt.count(IMAGE_MARKER)
    if markers != len(images):
        raise SchemaError(f"the user turn has {markers} '{IMAGE_MARKER}' marker(s) but the row has {len(images)} "
                          f"image(s); there must be one marker per image", file, line, f"{user_at}.{text_key}")
    prompt = prompt.replace(IMAGE_MARKER, "").strip()
    if not isinstance(text, str):
        raise SchemaError("the assistant answer must be text", file, line, f"{answer_at}.{text_key}")
    check_answer(text, file, line, f"{answer_at}.{text_key}")
    return Row(layout, images, prompt, text, system, answer_field=f"{answer_at}.{text_key}")


def parse_row(obj: dict[str, Any], file: str, line: int) -> Row:
    """Check one row's keys and types, whatever its layout. Unknown keys are recorded in ``ignored``."""
    layout = row_layout(obj, file, line)
    if layout == ROBOFLOW:
        for key in ("prefix", "suffix"):
            if key not in obj:
                raise SchemaError(f"missing key '{key}' (a row needs image, prefix, suffix)", file, line, key)
        images, _ = image_list(obj, file, line)
        if not isinstance(obj["prefix"], str):
            raise SchemaError(f"'prefix' must be a string, got {type(obj['prefix']).__name__}", file, line, "prefix")
        row = Row(layout, images, obj["prefix"], check_answer(obj["suffix"], file, line, "suffix"))
    else:
        row = parse_conversation(obj, layout, file, line)
    row.ignored = tuple(sorted(set(obj) - KNOWN_KEYS[layout]))
    return row


def resolve_images(images: list[Any], split_dir: Path, file: str, line: int, max_pages: int | None = None,
                   field: str = "") -> tuple:
    """The row's files as sources: each a file checked to exist inside the split folder, or a data: URI's bytes.
    ``field`` names the row's key for them (default: ``image`` for one, ``images`` for several)."""
    field = field or ("image" if len(images) == 1 else "images")
    if max_pages is not None and len(images) > max_pages:
        raise SchemaError(f"{len(images)} images, over data.max_pages={max_pages}", file, line, field)
    out = []
    for k, image in enumerate(images):
        at = field if len(images) == 1 else f"{field}[{k}]"
        if not isinstance(image, str) or not image.strip():
            raise SchemaError(f"'{at}' must be a non-empty string (a path relative to {split_dir}), got {image!r:.80}",
                              file, line, at)
        out.append(image_source(image, split_dir, file, line, at))
    return tuple(out)


@functools.lru_cache(maxsize=8)
def _folder_index(folder: Path, mtime_ns: int) -> tuple[dict[str, str], dict[str, list[str]]]:
    """A folder's file names by lower-cased name and by lower-cased stem (a listing per folder and version of it,
    not per row)."""
    by_name: dict[str, str] = {}
    by_stem: dict[str, list[str]] = {}
    with os.scandir(folder) as entries:
        for e in entries:
            by_name.setdefault(e.name.lower(), e.name)
            by_stem.setdefault(os.path.splitext(e.name)[0].lower(), []).append(e.name)
    return by_name, by_stem


def _near_miss(image: str, split_dir: Path) -> str | None:
    """The file a missing path most likely meant: Windows separators, another letter case, another extension
    (exports from Windows and macOS, whose file systems ignore case, carry all three)."""
    rel = image.replace("\\", "/")
    if rel != image and (split_dir / rel).is_file():
        return rel
    parent, name = os.path.split(rel)
    folder = split_dir / parent
    try:
        by_name, by_stem = _folder_index(folder, folder.stat().st_mtime_ns)
    except OSError:
        return None
    found = by_name.get(name.lower())
    if found is None:
        same_stem = by_stem.get(os.path.splitext(name)[0].lower(), [])
        found = same_stem[0] if len(same_stem) == 1 else None
    return (f"{parent}/{found}" if parent else found) if found else None


_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+)://")  # two letters at least: C:// is a Windows drive


def decode_data_uri(image: str, file: str, line: int | None, field: str) -> bytes:
    """The bytes of an inline image (``data:image/png;base64,...``, as ms-swift and OpenAI-style rows carry them)."""
    import base64
    import binascii

    header, comma, payload = image.partition(",")
    if not comma or ";base64" not in header.lower():
        raise ImagePathError(f"image data: URI must be base64-encoded (data:image/png;base64,...), got "
                             f"'{image[:40]}...'", file, line, field)
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImagePathError(f"image data: URI is not valid base64 ({e})", file, line, field) from None
    if not data:
        raise ImagePathError("image data: URI holds no bytes", file, line, field)
    return data


def image_source(image: str, split_dir: Path, file: str, line: int, field: str = "image") -> Any:
    """Where one image of a row comes from: a file in the split folder, or the bytes of a data: URI."""
    from .documents import BytesSource, FileSource

    if image[:5].lower() == "data:":
        data = decode_data_uri(image, file, line, field)
        mime = image[5:].partition(",")[0].partition(";")[0] or "data"
        name = f"data URI ({mime}, sha256 {hashlib.sha256(data).hexdigest()[:12]})"
        return BytesSource(data, name)
    return FileSource(resolve_image_path(image, split_dir, file, line, field))


def resolve_image_path(image: str, split_dir: Path, file: str, line: int, field: str = "image") -> Path:
    url = _URL.match(image)
    if url and url.group(1).lower() == "file":
        raise ImagePathError(f"image '{image}' is a file: URL, an absolute path; images are named relative to the "
                             f"split folder {split_dir}", file, line, field)
    if url:
        raise ImagePathError(f"image '{image}' is a {url.group(1)}:// URL; nothing is fetched over the network: "
                             f"download the images into {split_dir} and name them relative to it (or inline them as "
                             f"data:image/...;base64, URIs)", file, line, field)
    if os.path.isabs(image) or image.startswith(("/", "\\")) or (len(image) > 1 and image[1] == ":"):
        raise ImagePathError(f"image path '{image}' is absolute; it must be relative to the split folder {split_dir}", file, line, field)
    if "\x00" in image:
        raise ImagePathError("image path contains a NUL character", file, line, field)
    root = split_dir.resolve()
    try:
        path = (split_dir / image).resolve()
    except (OSError, RuntimeError, ValueError) as e:  # symlink loops, over-long names
        raise ImagePathError(f"image path '{image}' cannot be resolved: {e}", file, line, field) from None
    if root != path and root not in path.parents:
        raise ImagePathError(f"image path '{image}' resolves to {path}, outside the split folder {root}", file, line, field)
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except OSError as e:
        raise ImagePathError(f"image path '{image}' cannot be checked: {e.strerror}", file, line, field) from None
    if not exists:
        hint = _near_miss(image, split_dir)
        hint = f"; did you mean '{hint}'?" if hint else ""
        raise ImagePathError(f"image '{image}' not found (looked for {path}){hint}", file, line, field)
    if is_dir:
        raise ImagePathError(f"image '{image}' is a directory, not a file", file, line, field)
    return path


@dataclass
class SplitRows:
    """What reading one split found: the usable records, every problem, the rows seen, the row layouts
    (layout -> rows) and the keys that were ignored (key -> rows)."""

    records: list[Record] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    rows: int = 0
    layouts: dict[str, int] = field(default_factory=dict)
    ignored: dict[str, int] = field(default_factory=dict)
    source: str = ""

    def add(self, row: Row) -> None:
        self.layouts[row.layout] = self.layouts.get(row.layout, 0) + 1
        for key in row.ignored:
            self.ignored[key] = self.ignored.get(key, 0) + 1

    def note_ignored(self, file: str) -> None:
        """One warning per split for keys that were not used, with how many rows had each."""
        if self.ignored:
            keys = ", ".join(f"'{k}' ({n} row{'s' if n > 1 else ''})" for k, n in sorted(self.ignored.items()))
            self.problems.append(Problem(file, None, None, f"key(s) not used for training, ignored: {keys}",
                                         "warning", "IgnoredKeys"))


def json_array_rows(text: str, file: str) -> Iterator[tuple[int, Any]]:
    """The elements of a JSON array file (LLaMA-Factory's ``.json`` datasets), each with the line it starts on, so
    rows are named by file and line as JSONL rows are. An element with a duplicate key or a NaN comes back as its
    JSONLError (the others are still read); text that is not a JSON array is a SplitError at its line and column,
    as no element after a syntax error can be trusted."""
    strict = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    lenient = json.JSONDecoder()
    space = re.compile(r"\s*")
    seen = [0, 1]  # a position and its line: lines are counted from the last row on, not from the start each time

    def line_at(at: int) -> int:
        seen[1] += text.count("\n", seen[0], at)
        seen[0] = at
        return seen[1]

    def fail(msg: str, at: int) -> SplitError:
        line = text.count("\n", 0, at) + 1
        col = at - (text.rfind("\n", 0, at) + 1) + 1
        return SplitError(f"{msg} at column {col}; a .json file is read whole, so none of its rows is used until it "
                          f"is a valid JSON array", file, line)

    i = space.match(text, 0).end()
    if not text.startswith("[", i):
        raise fail("a .json annotations file holds one JSON array of rows; this does not start with '['", i)
    i = space.match(text, i + 1).end()
    if text.startswith("]", i):
        return
    while True:
        line = line_at(i)
        try:
            obj, end = strict.raw_decode(text, i)
            yield line, obj
        except json.JSONDecodeError as e:
            raise fail(f"malformed JSON: {e.msg}", e.pos) from None
        except (DuplicateKeyError, _Constant) as e:
            try:  # where the element ends, to read on after it; it may be broken further on too
                _, end = lenient.raw_decode(text, i)
            except json.JSONDecodeError as broken:
                raise fail(f"malformed JSON: {broken.msg}", broken.pos) from None
            what = (f"duplicate key '{e.args[0]}' in one object" if isinstance(e, DuplicateKeyError)
                    else f"{e.args[0]} is not JSON (write null or a string)")
            yield line, JSONLError(what, file, line)
        i = space.match(text, end).end()
        if text.startswith("]", i):
            return
        if not text.startswith(",", i):
            raise fail("expected ',' or ']' after a row", i)
        i = space.match(text, i + 1).end()


def csv_rows(text: str, file: str) -> Iterator[tuple[int, Any]]:
    """The rows of a CSV file with a header (ImageFolder's ``metadata.csv``) as dicts, each with the line it starts
    on (a quoted cell may span lines). Comma-separated, or by semicolons or tabs when the header has no comma but
    those (spreadsheets in many locales save so). A row with more or fewer cells than the header comes back as its
    SchemaError; a header that is empty or names a column twice is a SplitError."""
    import csv
    import io

    head = text.split("\n", 1)[0]
    delimiter = next((d for d in (";", "\t") if "," not in head and d in head), ",")
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise SplitError("the CSV file is empty: its first line names the columns", file, 1) from None
    except csv.Error as e:
        raise SplitError(f"malformed CSV header: {e}", file, 1) from None
    names = [h.strip() for h in header]
    if not any(names):
        raise SplitError("the CSV file's first line is empty: it must name the columns", file, 1)
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SplitError(f"the CSV header names column(s) {', '.join(map(repr, twice))} twice", file, 1)
    end = reader.line_num
    while True:
        start = end + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise SplitError(f"malformed CSV: {e}; none of the rows after it can be trusted", file, reader.line_num) \
                from None
        end = reader.line_num
        if not cells or cells == [""]:
            yield start, ""  # a blank line
        elif len(cells) != len(names):
            yield start, SchemaError(f"{len(cells)} cells, but the header names {len(names)} columns "
                                     f"({', '.join(names)})", file, start)
        else:
            yield start, dict(zip(names, cells))


def read_split(split_dir: str | Path, split: str | None = None, max_pages: int | None = None,
               file: str | Path | None = None, parse: Callable[[dict[str, Any], str, int], Row] | None = None
               ) -> SplitRows:
    """Read one split's rows (each Roboflow-, messages- or ShareGPT-style) from ``file``: JSON Lines, a JSON
    array when it ends in ``.json``, CSV with a header when it ends in ``.csv``; by default the split folder's
    ``annotations.jsonl``. Images are named relative to the file's folder. ``parse`` turns one row into a Row
    (default ``parse_row``, which detects the layout per row).

    Returns the records that passed the row checks, every problem found (errors for rows that were not turned
    into records, warnings otherwise) and the number of rows seen.

    Raises:
        SplitError: the annotations file is missing, not UTF-8 text, or a ``.json`` file that is not a JSON array.
    """
    ann = Path(file) if file is not None else Path(split_dir) / ANNOTATIONS
    split_dir = ann.parent
    split = split or split_dir.name
    if not ann.is_file():
        raise SplitError(f"annotations file not found: {ann}", ann)
    file = str(ann)
    out = SplitRows(source=file)
    donut = 0
    try:
        # utf-8-sig drops a BOM; newline=None turns CRLF into LF.
        with open(ann, encoding="utf-8-sig", newline=None) as fh:
            content = fh.read()
    except UnicodeDecodeError as e:
        raise SplitError(f"not UTF-8 text (byte {e.start}): {e.reason}", ann) from None
    if ann.suffix.lower() == ".json":
        items: Iterator[tuple[int, Any]] = json_array_rows(content, file)
        last = 0
    elif ann.suffix.lower() == ".csv":
        items, last = csv_rows(content, file), 0
    else:
        lines = content.split("\n")
        items, last = enumerate(lines, start=1), len(lines)
    for lineno, item in items:
        if isinstance(item, str) and not item.strip():
            if lineno < last:
                out.problems.append(Problem(file, lineno, None, "blank line ignored", "warning", "JSONLError"))
            continue
        out.rows += 1
        try:
            if isinstance(item, DataError):
                raise item
            obj = parse_line(item, file, lineno) if isinstance(item, str) else item
            if not isinstance(obj, dict):
                raise JSONLError(f"each row must be a JSON object, got {type(obj).__name__}", file, lineno)
            row = (parse or parse_row)(obj, file, lineno)
            sources = resolve_images(row.images, split_dir, file, lineno, max_pages, row.image_field)
        except DataError as e:
            out.problems.append(Problem.from_error(e))
            continue
        out.add(row)
        donut += row.donut
        out.records.append(Record(f"{split}:{lineno}", split, sources, row.prompt, row.answer, file, lineno,
                                  row.system, answer_field=row.answer_field))
    if donut:
        out.problems.append(donut_note(file, donut))
    out.note_ignored(file)
    return out
