"""Where a split's rows come from, in the formats users already have.

- ``<data>/<split>/annotations.jsonl``: Roboflow/maestro rows (``image``/``images``, ``prefix``, ``suffix``),
  LLaMA-Factory / ms-swift ``messages`` rows or LLaMA-Factory ShareGPT ``conversations`` rows, detected per row
  (``records.parse_row``);
- a Hugging Face ``datasets`` folder written by ``save_to_disk`` (``<data>/<split>/`` with ``state.json``, or
  a ``DatasetDict`` folder holding one per split), read with ``datasets.load_from_disk``;
- Parquet files: ``<data>/<split>.parquet``, ``<data>/<split>/*.parquet``, ``<data>/<split>-*.parquet`` or the
  hub's ``<data>/data/<split>-*.parquet``, read with pyarrow.
- Hugging Face ImageFolder metadata, which is also donut-python's dataset layout: ``<data>/<split>/metadata.jsonl``
  or ``metadata.csv`` beside the images, a row per document with ``file_name`` and an answer column (Donut's
  ``ground_truth`` with ``gt_parse`` inside, or any of the usual answer names), read without extra packages.

Tables have an image column (an HF ``Image`` value, bytes, a path, or a list of them for several pages), an
answer column (text or a JSON object) or a ``messages``/``conversations`` column, and an optional prompt
column; the ``data.*_column`` options name them when the usual names are not used. Rows are named
``file:index`` (0-based, as ``datasets`` counts) in every message. Images stay in the table (memory-mapped)
until a data-loader worker reads one.

Both readers come with ``pip install 'qwenvl-tune[datasets]'``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MissingExtraError
from .records import (ANNOTATIONS, IMAGEFOLDER, MESSAGES, METADATA_FILES, SHAREGPT, SPLIT_ALIASES, DataError, Problem,
                      Record, Row, SchemaError, SplitError, SplitRows, check_answer, donut_note, loads_json,
                      parse_conversation, read_split)

JSONL, PARQUET, ARROW = "jsonl", "parquet", "arrow"  # JSONL: JSON Lines or a JSON array of rows
JSON_ANNOTATIONS = "annotations.json"
FORMAT_LABELS = {PARQUET: "Parquet", ARROW: "Hugging Face datasets folder (save_to_disk)"}
IMAGE_COLUMNS = ("images", "image", "pages", "page_images")
ANSWER_COLUMNS = ("suffix", "answer", "ground_truth", "json", "target", "output", "label", "response")
PROMPT_COLUMNS = ("prefix", "prompt", "question", "instruction", "query")
# ImageFolder metadata: the files are in file_name (Hugging Face's name); "text" is its image-to-text answer column
METADATA_IMAGE_COLUMNS = ("file_name", "file_names") + IMAGE_COLUMNS
METADATA_ANSWER_COLUMNS = ANSWER_COLUMNS + ("text",)


@dataclass(frozen=True)
class Columns:
    """How table rows map to samples (``data.image_column`` etc.; empty: the usual names)."""

    image: str = ""
    answer: str = ""
    prompt: str = ""
    default_prompt: str = "extract data in JSON format"
    max_pages: int | None = None

    @classmethod
    def from_config(cls, data: Any) -> "Columns":
        return cls(data.image_column, data.answer_column, data.prompt_column, data.prompt, data.max_pages)


@dataclass(frozen=True)
class SplitLocation:
    split: str
    kind: str
    path: Path  # the split folder (jsonl, arrow) or the data folder (parquet)
    files: tuple[Path, ...] = ()  # parquet files, in order; or the one JSON / JSONL file of rows

    @property
    def label(self) -> str:
        if self.kind == JSONL:
            return str(self.files[0] if self.files else self.path / ANNOTATIONS)
        return str(self.path) if self.kind == ARROW else ", ".join(str(f) for f in self.files)


def expected_layouts(data_dir: str | Path, split: str) -> str:
    """The places a split may be, for a 'not found' message."""
    d = Path(data_dir)
    return (f"{d / split / ANNOTATIONS} (or annotations.json, or ImageFolder's metadata.jsonl / metadata.csv), "
            f"{d / split}.jsonl or {d / split}.json, a datasets folder {d / split}/ or Parquet files named "
            f"{split}*.parquet")


_SPLIT_NAMES = frozenset(n for names in SPLIT_ALIASES.values() for n in names)


def layout_hint(data_dir: str | Path) -> str:
    """What is wrong with ``data_dir`` when it is missing, a split's annotations file or a split folder itself (the
    usual slips), as text to end a 'split not found' message with; else ''."""
    path = Path(data_dir)
    if not path.exists():
        return f" ({path} does not exist)"
    if path.is_file():
        above = path.parent.parent if path.parent.name in _SPLIT_NAMES else path.parent
        return f" ({path} is a file: data.path is the folder that holds train/ and valid/, here {above})"
    if (path / ANNOTATIONS).is_file() and path.name in _SPLIT_NAMES:
        return f" ({path} is a split folder itself: data.path is the folder above it, {path.parent})"
    if (path / "dataset_info.json").is_file():  # LLaMA-Factory's data folder: its datasets have their own names
        return (f" ({path} is laid out for LLaMA-Factory: name each split's file of rows after it, e.g. train.json "
                f"and valid.json beside dataset_info.json)")
    return ""


def locate_split(data_dir: str | Path, split: str) -> SplitLocation | None:
    """Where a split is, in any supported format (``valid`` also answers to ``val``/``validation``)."""
    data_dir = Path(data_dir)
    for name in SPLIT_ALIASES.get(split, (split,)):
        folder = data_dir / name
        if (folder / ANNOTATIONS).is_file():
            return SplitLocation(split, JSONL, folder)
        if (folder / JSON_ANNOTATIONS).is_file():
            return SplitLocation(split, JSONL, folder, (folder / JSON_ANNOTATIONS,))
        for meta in METADATA_FILES:
            if (folder / meta).is_file():
                return SplitLocation(split, JSONL, folder, (folder / meta,))
        if (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file():
            return SplitLocation(split, ARROW, folder)
        for pattern_dir, pattern in ((folder, "*.parquet"), (data_dir, f"{name}.parquet"),
                                     (data_dir, f"{name}-*.parquet"), (data_dir / "data", f"{name}-*.parquet"),
                                     (data_dir / "data", f"{name}.parquet")):
            files = sorted(pattern_dir.glob(pattern)) if pattern_dir.is_dir() else []
            if files:
                return SplitLocation(split, PARQUET, data_dir, tuple(files))
    for name in SPLIT_ALIASES.get(split, (split,)):  # one file of rows per split in the data folder itself
        for suffix in (".jsonl", ".json"):
            if (data_dir / f"{name}{suffix}").is_file():
                return SplitLocation(split, JSONL, data_dir, (data_dir / f"{name}{suffix}",))
    return None


def read_location(loc: SplitLocation, columns: Columns = Columns()) -> SplitRows:
    """Every row of a split as records (problems for the rows that are not usable)."""
    if loc.kind == JSONL:
        file = loc.files[0] if loc.files else None
        parse = metadata_row_parser(columns) if file is not None and file.name in METADATA_FILES else None
        return read_split(loc.path, loc.split, columns.max_pages, file=file, parse=parse)
    if loc.kind == ARROW:
        return _read_table(loc.split, [(loc.path, ARROW)], columns)
    return _read_table(loc.split, [(f, PARQUET) for f in loc.files], columns)


# ---- ImageFolder metadata rows

def _column(names: list[str], wanted: str, usual: tuple[str, ...], what: str, option: str, fail: Any,
            whose: str = "the", required: bool = True, guess: Any = None) -> str | None:
    """The column holding ``what``: the one named by ``option``, else the first usual name present, else what
    ``guess()`` finds; ``fail(message, field)`` makes the error when there is none (a table's or a row's)."""
    if wanted:
        if wanted not in names:
            raise fail(f"no column '{wanted}' ({option}); {whose} columns are {', '.join(names)}", wanted)
        return wanted
    found = next((k for k in usual if k in names), None) or (guess() if guess else None)
    if found is None and required:
        raise fail(f"no {what} column (looked for {', '.join(usual)}); name it with {option}; {whose} columns are "
                   f"{', '.join(names)}", usual[0])
    return found


def metadata_row_parser(columns: Columns):
    """How a row of ImageFolder's ``metadata.jsonl`` / ``metadata.csv`` becomes a Row: its files in ``file_name``
    (a path, or a list of pages in JSONL), its answer in the first of the usual answer columns (Donut's
    ``{"gt_parse": ...}`` unwrapped), an optional prompt column, else ``data.prompt``. A CSV's empty prompt cell
    means no prompt of its own."""

    def parse(obj: dict[str, Any], file: str, line: int) -> Row:
        names = list(obj)

        def fail(message: str, field: str) -> SchemaError:
            return SchemaError(message, file, line, field)

        image_key = _column(names, columns.image, METADATA_IMAGE_COLUMNS, "image", "data.image_column", fail,
                            "the row's")
        answer_key = _column(names, columns.answer, METADATA_ANSWER_COLUMNS, "answer", "data.answer_column", fail,
                             "the row's")
        prompt_key = _column(names, columns.prompt, PROMPT_COLUMNS, "prompt", "data.prompt_column", fail, "the row's",
                             required=False)
        files = obj[image_key]
        if isinstance(files, list):
            if not files:
                raise SchemaError(f"'{image_key}' is an empty list; it names the document's files", file, line,
                                  image_key)
        elif isinstance(files, str) and files.strip():
            files = [files]
        else:
            raise SchemaError(f"'{image_key}' must name the document's file (a path relative to the metadata file), "
                              f"got {files!r:.80}", file, line, image_key)
        answer, donut = _answer(obj[answer_key], file, line, answer_key)
        prompt = obj.get(prompt_key) if prompt_key else None
        if prompt is not None and not isinstance(prompt, str):
            raise SchemaError(f"the prompt must be text, got {type(prompt).__name__}", file, line, prompt_key)
        row = Row(IMAGEFOLDER, files, prompt or columns.default_prompt, answer, answer_field=answer_key, donut=donut,
                  image_field=image_key)
        row.ignored = tuple(sorted(set(obj) - {image_key, answer_key, prompt_key}))
        return row

    return parse


# ---- tables

_TABLES: dict[tuple[str, str], Any] = {}  # per process: each table opened (memory-mapped) once


def _require() -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise MissingExtraError("reading Parquet files or a datasets folder needs pyarrow and datasets: "
                                "pip install 'qwenvl-tune[datasets]'") from None


def open_table(path: Path, kind: str) -> Any:
    """The table of a Parquet file or a ``save_to_disk`` folder, memory-mapped, cached per process."""
    key = (str(path), kind)
    if key not in _TABLES:
        _require()
        if kind == PARQUET:
            import pyarrow.parquet as pq

            try:
                _TABLES[key] = pq.read_table(path, memory_map=True)
            except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a bad file
                raise SplitError(f"not a readable Parquet file: {e}", path) from None
        else:
            try:
                from datasets import load_from_disk
            except ImportError:
                raise MissingExtraError("reading a datasets folder needs the datasets library: "
                                        "pip install 'qwenvl-tune[datasets]'") from None
            try:
                ds = load_from_disk(str(path))
            except Exception as e:  # noqa: BLE001
                raise SplitError(f"not a readable datasets folder: {e}", path) from None
            if hasattr(ds, "keys"):  # a DatasetDict where a split was expected
                raise SplitError(f"a DatasetDict (splits {sorted(ds.keys())}); point data.path at its parent so "
                                 f"each split is found by name", path)
            _TABLES[key] = ds.with_format("arrow")[:]
    return _TABLES[key]


def _is_image_type(t: Any) -> bool:
    import pyarrow as pa

    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _is_image_type(t.value_type)
    return pa.types.is_struct(t) and {f.name for f in t} >= {"bytes", "path"}


def _choose(table: Any, wanted: str, usual: tuple[str, ...], what: str, option: str, file: Path,
            required: bool = True) -> str | None:
    """A table's column holding ``what`` (``_column``); an image column may also be found by its type."""
    names = table.column_names

    def by_type() -> str | None:
        return next((n for n in names if _is_image_type(table.schema.field(n).type)), None) if what == "image" else None

    return _column(names, wanted, usual, what, option, lambda message, _field: SplitError(message, file),
                   required=required, guess=by_type)


@dataclass(frozen=True)
class CellSource:
    """An image held in a table cell: an HF ``Image`` value ({bytes, path}), raw bytes or a path."""

    table: str
    kind: str
    row: int
    column: str
    k: int | None = None  # the position in a list of pages

    @property
    def name(self) -> str:
        return f"{self.table}:{self.row} [{self.column}{'' if self.k is None else f'[{self.k}]'}]"

    def read(self) -> bytes:
        value = open_table(Path(self.table), self.kind).column(self.column)[self.row].as_py()
        if self.k is not None:
            value = value[self.k]
        if isinstance(value, dict):
            if value.get("bytes"):
                return value["bytes"]
            value = value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        if isinstance(value, str) and value[:5].lower() == "data:":
            from .records import decode_data_uri

            return decode_data_uri(value, self.table, self.row, self.column)
        if isinstance(value, str) and value:
            base = Path(self.table) if self.kind == ARROW else Path(self.table).parent
            from .records import resolve_image_path

            return resolve_image_path(value, base, self.table, self.row, self.column).read_bytes()
        raise DataError(f"no image in this cell (got {type(value).__name__})", self.table, self.row, self.column)


def _cells(value: Any, table: str, kind: str, row: int, column: str, max_pages: int | None) -> tuple:
    if value is None:
        raise SchemaError("the image cell is empty", table, row, column)
    if isinstance(value, list):
        if not value:
            raise SchemaError("the list of page images is empty", table, row, column)
        if max_pages is not None and len(value) > max_pages:
            raise SchemaError(f"{len(value)} images, over data.max_pages={max_pages}", table, row, column)
        for k, v in enumerate(value):
            if v is None or (isinstance(v, dict) and not v.get("bytes") and not v.get("path")):
                raise SchemaError(f"page image {k} is empty", table, row, f"{column}[{k}]")
        return tuple(CellSource(table, kind, row, column, k) for k in range(len(value)))
    if isinstance(value, dict) and not value.get("bytes") and not value.get("path"):
        raise SchemaError("the image cell has neither bytes nor a path", table, row, column)
    return (CellSource(table, kind, row, column),)


def _answer(value: Any, table: str, row: int, column: str) -> tuple[Any, bool]:
    """The answer of a row; Donut-style ground truth (``{"gt_parse": ...}``, as CORD ships it) is unwrapped."""
    donut = False
    if isinstance(value, str):
        try:
            parsed = loads_json(value)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict) and "gt_parse" in parsed:
            value, donut = parsed["gt_parse"], True
    elif isinstance(value, dict) and "gt_parse" in value:
        value, donut = value["gt_parse"], True
    return check_answer(value, table, row, column), donut


def _read_table(split: str, tables: list[tuple[Path, str]], columns: Columns) -> SplitRows:
    out = SplitRows(source=", ".join(str(p) for p, _ in tables))
    donut = offset = 0
    for path, kind in tables:
        table = open_table(path, kind)
        name = str(path)
        image_col = _choose(table, columns.image, IMAGE_COLUMNS, "image", "data.image_column", path)
        convo = next((c for c in ("messages", "conversations") if c in table.column_names), None) \
            if not columns.answer else None
        answer_col = None if convo else _choose(table, columns.answer, ANSWER_COLUMNS, "answer", "data.answer_column",
                                                path)
        prompt_col = None if convo else _choose(table, columns.prompt, PROMPT_COLUMNS, "prompt",
                                                "data.prompt_column", path, required=False)
        used = {image_col, answer_col, prompt_col, convo, "system" if convo else None}
        unused = [c for c in table.column_names if c not in used]
        # image cells are only looked at (not decoded) here: the page images stay in the table
        images = table.column(image_col)
        cell_of = _image_cell if _is_image_type(images.type) else (lambda scalar: scalar.as_py())
        others = table.select([c for c in (answer_col, prompt_col, convo) if c] +
                              (["system"] if convo and "system" in table.column_names else [])).to_pylist()
        for i in range(table.num_rows):
            out.rows += 1
            try:
                cell = cell_of(images[i])
                sources = _cells(cell, name, kind, i, image_col, columns.max_pages)
                values = others[i]
                if convo:
                    layout = MESSAGES if convo == "messages" else SHAREGPT
                    obj = {convo: values[convo], "images": ["<cell>"] * len(sources)}
                    if values.get("system") is not None:
                        obj["system"] = values["system"]
                    row = parse_conversation(obj, layout, name, i)
                else:
                    answer, was_donut = _answer(values[answer_col], name, i, answer_col)
                    donut += was_donut
                    prompt = values.get(prompt_col) if prompt_col else None
                    if prompt is not None and not isinstance(prompt, str):
                        raise SchemaError(f"the prompt must be text, got {type(prompt).__name__}", name, i, prompt_col)
                    row = Row("table", [], prompt or columns.default_prompt, answer, answer_field=answer_col)
            except DataError as e:
                out.problems.append(Problem.from_error(e))
                continue
            out.layouts[FORMAT_LABELS[kind]] = out.layouts.get(FORMAT_LABELS[kind], 0) + 1
            out.records.append(Record(f"{split}:{offset + i}", split, sources, row.prompt, row.answer, name, i,
                                      row.system, answer_field=row.answer_field))
        offset += table.num_rows
        for c in unused:
            out.ignored[c] = out.ignored.get(c, 0) + table.num_rows
    if donut:
        out.problems.append(donut_note(out.source, donut))
    if out.ignored:
        keys = ", ".join(f"'{k}'" for k in sorted(out.ignored))
        out.problems.append(Problem(out.source, None, None, f"column(s) not used for training, ignored: {keys}",
                                    "warning", "IgnoredKeys"))
    return out


def _image_cell(scalar: Any) -> Any:
    """An HF Image cell (or a list of them) without copying the image bytes: only whether each is set."""
    import pyarrow as pa

    if not scalar.is_valid:
        return None
    if isinstance(scalar, (pa.ListScalar, pa.LargeListScalar)):
        return [_image_cell(v) for v in scalar.values] if scalar.values is not None else []
    b, p = scalar["bytes"], scalar["path"]
    return {"bytes": b.is_valid and len(b.as_buffer()) > 0, "path": p.as_py() if p.is_valid else None}
