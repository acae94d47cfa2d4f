"""Reading another system's outputs and the gold answers to score them against (``qwenvl-tune score``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..data.records import DataError, json_array_rows, loads_json, parse_row, read_text_file


def _lines(path: Path) -> list[tuple[int, str]]:
    return [(n, line) for n, line in enumerate(read_text_file(path).splitlines(), 1) if line.strip()]


def _prediction(line: str) -> tuple[str | None, str]:
    """(id, raw output) of a prediction line; a line that is no JSON at all is itself the raw output."""
    try:
        value = loads_json(line)
    except json.JSONDecodeError:
        return None, line
    if isinstance(value, dict) and "output" in value and isinstance(value["output"], str):
        return (str(value["id"]) if "id" in value else None), value["output"]
    if isinstance(value, str):
        return None, value
    return None, line


def _gold_rows(path: Path) -> list[tuple[int, Any]]:
    """(line, parsed row) of a gold file: JSON Lines, or a JSON array when it ends in ``.json``."""
    if path.suffix.lower() == ".json":
        rows = []
        for n, item in json_array_rows(read_text_file(path), str(path)):
            if isinstance(item, DataError):
                raise item
            rows.append((n, item))
        return rows
    rows = []
    for n, line in _lines(path):
        try:
            rows.append((n, loads_json(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"not valid JSON: {e.msg}", path, n) from None
    return rows


def _gold(path: Path, n: int, value: Any) -> tuple[str | None, Any, list[str]]:
    """(id, gold answer, document files) of a gold row: ``{"id", "gold"}`` or an annotation row of any layout."""
    if not isinstance(value, dict):
        raise DataError("each gold line must be an object with 'suffix' (or 'gold', or messages)", path, n)
    gid = str(value["id"]) if "id" in value else None
    if "gold" in value:
        return gid, value["gold"], []
    if not {"suffix", "messages", "conversations"} & set(value):
        raise DataError("no 'suffix' or 'gold' answer (nor a messages row)", path, n, "suffix")
    if "suffix" in value:  # an annotation row, or just {"id", "suffix"}
        files = value.get("images") or [value.get("image")]
        return gid, value["suffix"], [str(path.parent / i) for i in files if isinstance(i, str)]
    row = parse_row(value, str(path), n)
    return gid, row.answer, [str(path.parent / i) for i in row.images if isinstance(i, str)]


def read_pairs(pred_path: Path, gold_path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows in ``evaluate``'s stored-prediction form, and notes (e.g. how lines were joined)."""
    preds = [(n, *_prediction(line)) for n, line in _lines(pred_path)]
    golds = [(n, *_gold(gold_path, n, value)) for n, value in _gold_rows(gold_path)]
    notes: list[str] = []
    by_id = all(p[1] is not None for p in preds) and all(g[1] is not None for g in golds)
    rows = []
    if by_id:
        outputs = {p[1]: p[2] for p in preds}
        missing = [g[1] for g in golds if g[1] not in outputs]
        if missing:
            notes.append(f"{len(missing)} gold id(s) have no prediction (scored as empty output): {missing[:10]}")
        extra = set(outputs) - {g[1] for g in golds}
        if extra:
            notes.append(f"{len(extra)} prediction id(s) have no gold answer and are not scored: {sorted(extra)[:10]}")
        for n, gid, gold, image in golds:
            rows.append({"id": gid, "images": image, "gold": gold,
                         "finetuned": {"raw": outputs.get(gid, ""), "truncated": False}})
    else:
        if len(preds) != len(golds):
            raise DataError(f"{len(preds)} prediction line(s) for {len(golds)} gold line(s); give both files an "
                            f"'id' on every line to join them, or the same number of lines", pred_path)
        notes.append("joined by line (not every line has an 'id')")
        for (pn, _, raw), (gn, gid, gold, image) in zip(preds, golds):
            rows.append({"id": gid or f"{gold_path.name}:{gn}", "images": image, "gold": gold,
                         "finetuned": {"raw": raw, "truncated": False}})
    return rows, notes
