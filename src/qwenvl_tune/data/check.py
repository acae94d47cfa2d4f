"""Validate a dataset before any GPU time is spent.

Every row is parsed and type-checked, every image decoded, and (given a
processor) every sample's token count computed from the image size without
loading model weights. Problems name file, line and field; nothing is dropped
without being counted and listed.
"""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .conversation import render
from .images import load_image
from .records import DataError, Problem, Record, SplitError, find_split, read_split


@dataclass
class SplitReport:
    split: str
    folder: str
    rows: int = 0
    records: list[Record] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    image_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    tokens: dict[str, dict[str, int]] = field(default_factory=dict)
    duplicates: int = 0

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "error"]

    def summary(self) -> dict[str, Any]:
        totals = [t["total"] for t in self.tokens.values()]
        return {
            "split": self.split, "folder": self.folder, "rows": self.rows, "usable": len(self.records),
            "errors": len(self.errors), "warnings": len(self.problems) - len(self.errors),
            "duplicates": self.duplicates, "max_tokens": max(totals) if totals else None,
        }


def _check_image(r: Record, max_image_pixels: int) -> tuple[Record, tuple[int, int] | None, DataError | None]:
    try:
        im = load_image(r.image_path, max_pixels=max_image_pixels, where=(r.file, r.line))
        return r, im.size, None
    except DataError as e:
        return r, None, e


def sample_tokens(processor: Any, r: Record, size: tuple[int, int], system_message: str | None) -> dict[str, int]:
    """Token counts of one sample, computed from the image size (no pixels processed, no model)."""
    turns = render(processor, r.prefix, system_message, r.target_text)
    tok = processor.tokenizer
    prompt = len(tok(turns.prompt, add_special_tokens=False)["input_ids"])
    answer = len(tok(turns.target, add_special_tokens=False)["input_ids"])
    tail = len(tok(turns.tail, add_special_tokens=False)["input_ids"]) if turns.tail else 0
    w, h = size
    image = processor._get_num_multimodal_tokens(image_sizes=[(h, w)])["num_image_tokens"][0]
    # The prompt text holds one image placeholder token, which the processor expands to `image` tokens.
    prompt_total = prompt - 1 + image
    return {"image": int(image), "prompt": prompt_total, "answer": answer, "total": prompt_total + answer + tail}


def check_split(data_dir: str | Path, split: str, *, processor: Any = None, system_message: str | None = None,
                max_length: int | None = None, max_image_pixels: int = 178_956_970, workers: int = 4) -> SplitReport:
    """Read, validate and measure one split. Missing optional splits raise SplitError."""
    folder = find_split(data_dir, split)
    if folder is None:
        raise SplitError(f"split '{split}' not found: expected {Path(data_dir) / split / 'annotations.jsonl'}",
                         Path(data_dir) / split)
    records, problems, rows = read_split(folder, split)
    report = SplitReport(split, str(folder), rows, problems=problems)
    seen: Counter = Counter()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        checked = list(pool.map(lambda r: _check_image(r, max_image_pixels), records))
    for r, size, err in checked:
        if err is not None:
            report.problems.append(Problem.from_error(err))
            continue
        key = (str(r.image_path), r.prefix)
        seen[key] += 1
        if seen[key] > 1:
            report.duplicates += 1
            report.problems.append(Problem(r.file, r.line, "image", f"duplicate of an earlier row (same image "
                                           f"'{r.image_path.name}' and prefix)", "warning", "DuplicateRow"))
        report.image_sizes[r.id] = size
        if processor is not None:
            counts = sample_tokens(processor, r, size, system_message)
            report.tokens[r.id] = counts
            if max_length is not None and counts["total"] > max_length:
                report.problems.append(Problem(
                    r.file, r.line, "suffix", f"sample is {counts['total']} tokens ({counts['image']} image, "
                    f"{counts['answer']} answer), over data.max_length={max_length}; it would have to be truncated",
                    "error", "SampleTooLongError"))
                continue
        report.records.append(r)
    report.problems.sort(key=lambda p: (p.file, p.line or 0))
    return report


def write_problems(path: str | Path, reports: list[SplitReport]) -> int:
    """Write every problem as one JSON line; returns how many were written."""
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for rep in reports:
            for p in rep.problems:
                fh.write(json.dumps({"split": rep.split, **p.__dict__}, ensure_ascii=False) + "\n")
                n += 1
    return n


__all__ = ["SplitReport", "check_split", "sample_tokens", "write_problems"]
