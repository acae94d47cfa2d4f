"""JSONL annotations -> validated records.

One row per line: ``{"image": "scan.jpg", "prefix": "...", "suffix": ...}``.
``image`` is relative to the split folder and may not resolve outside it;
``prefix`` is the instruction; ``suffix`` is the target, a non-empty string or
a JSON object/array. Every problem names the file, the line and the field.

This module imports no model code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REQUIRED_KEYS = ("image", "prefix", "suffix")
from ..errors import QwenVLTuneError

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
    """One validated sample. ``id`` is stable: ``<split>:<line>``."""

    id: str
    split: str
    image_path: Path
    prefix: str
    suffix: Any
    file: str
    line: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def target_text(self) -> str:
        return serialize_target(self.suffix)


def serialize_target(suffix: Any) -> str:
    """The assistant's answer as text: strings as is, JSON with key order and non-ASCII kept."""
    if isinstance(suffix, str):
        return suffix
    return json.dumps(suffix, ensure_ascii=False)


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
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except DuplicateKeyError as e:
        raise JSONLError(f"duplicate key '{e.args[0]}' in one object", file, line, str(e.args[0])) from None
    except json.JSONDecodeError as e:
        raise JSONLError(f"malformed JSON at column {e.colno}: {e.msg}", file, line) from None
    except RecursionError:
        raise JSONLError("JSON nested too deeply to parse", file, line) from None
    if not isinstance(obj, dict):
        raise JSONLError(f"each line must be a JSON object, got {type(obj).__name__}", file, line)
    return obj


def validate_row(obj: dict[str, Any], file: str, line: int, split_dir: Path, allow_extra: bool = False) -> tuple[Path, str, Any]:
    """Check keys and types of one row and resolve its image path (existence is checked by the image loader)."""
    for key in REQUIRED_KEYS:
        if key not in obj:
            raise SchemaError(f"missing key '{key}' (a row needs {', '.join(REQUIRED_KEYS)})", file, line, key)
    extra = sorted(set(obj) - set(REQUIRED_KEYS))
    if extra and not allow_extra:
        raise SchemaError(f"unexpected key(s) {extra}; a row has exactly {', '.join(REQUIRED_KEYS)}", file, line, extra[0])
    image, prefix, suffix = obj["image"], obj["prefix"], obj["suffix"]
    if not isinstance(image, str) or not image.strip():
        raise SchemaError(f"'image' must be a non-empty string (a path relative to {split_dir}), got {image!r}", file, line, "image")
    if not isinstance(prefix, str):
        raise SchemaError(f"'prefix' must be a string, got {type(prefix).__name__}", file, line, "prefix")
    if suffix is None:
        raise SchemaError("'suffix' is null; it must be the target answer (a string or a JSON object/array)", file, line, "suffix")
    if isinstance(suffix, str):
        if not suffix.strip():
            raise SchemaError("'suffix' is empty; it must be the target answer", file, line, "suffix")
    elif isinstance(suffix, (dict, list)):
        if not suffix:
            raise SchemaError(f"'suffix' is an empty {type(suffix).__name__}; it must hold the target answer", file, line, "suffix")
    else:
        raise SchemaError(f"'suffix' must be a string, object or array, got {type(suffix).__name__}", file, line, "suffix")
    return resolve_image_path(image, split_dir, file, line), prefix, suffix


def resolve_image_path(image: str, split_dir: Path, file: str, line: int) -> Path:
    if os.path.isabs(image) or image.startswith(("/", "\\")) or (len(image) > 1 and image[1] == ":"):
        raise ImagePathError(f"image path '{image}' is absolute; it must be relative to the split folder {split_dir}", file, line, "image")
    if "\x00" in image:
        raise ImagePathError("image path contains a NUL character", file, line, "image")
    root = split_dir.resolve()
    try:
        path = (split_dir / image).resolve()
    except (OSError, RuntimeError, ValueError) as e:  # symlink loops, over-long names
        raise ImagePathError(f"image path '{image}' cannot be resolved: {e}", file, line, "image") from None
    if root != path and root not in path.parents:
        raise ImagePathError(f"image path '{image}' resolves to {path}, outside the split folder {root}", file, line, "image")
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except OSError as e:
        raise ImagePathError(f"image path '{image}' cannot be checked: {e.strerror}", file, line, "image") from None
    if not exists:
        raise ImagePathError(f"image '{image}' not found (looked for {path})", file, line, "image")
    if is_dir:
        raise ImagePathError(f"image '{image}' is a directory, not a file", file, line, "image")
    return path


def find_split(data_dir: str | Path, split: str) -> Path | None:
    """The folder of a split (``valid`` also accepts ``val``/``validation``), or None."""
    data_dir = Path(data_dir)
    for name in SPLIT_ALIASES.get(split, (split,)):
        if (data_dir / name / ANNOTATIONS).is_file():
            return data_dir / name
    return None


def read_split(split_dir: str | Path, split: str | None = None) -> tuple[list[Record], list[Problem], int]:
    """Read one split's annotations.

    Returns:
        (records, problems, n_rows): records that passed the row checks; every
        problem found (errors for rows that were not turned into records,
        warnings otherwise); the number of non-blank lines seen.

    Raises:
        SplitError: the annotations file is missing or not UTF-8 text.
    """
    split_dir = Path(split_dir)
    split = split or split_dir.name
    ann = split_dir / ANNOTATIONS
    if not ann.is_file():
        raise SplitError(f"annotations file not found: {ann}", ann)
    file = str(ann)
    records: list[Record] = []
    problems: list[Problem] = []
    n_rows = 0
    try:
        # utf-8-sig drops a BOM; newline=None turns CRLF into LF.
        with open(ann, encoding="utf-8-sig", newline=None) as fh:
            lines = fh.read().split("\n")
    except UnicodeDecodeError as e:
        raise SplitError(f"not UTF-8 text (byte {e.start}): {e.reason}", ann) from None
    for lineno, text in enumerate(lines, start=1):
        if not text.strip():
            if lineno < len(lines):
                problems.append(Problem(file, lineno, None, "blank line ignored", "warning", "JSONLError"))
            continue
        n_rows += 1
        try:
            obj = parse_line(text, file, lineno)
            path, prefix, suffix = validate_row(obj, file, lineno, split_dir)
        except DataError as e:
            problems.append(Problem.from_error(e))
            continue
        records.append(Record(f"{split}:{lineno}", split, path, prefix, suffix, file, lineno))
    return records, problems, n_rows
