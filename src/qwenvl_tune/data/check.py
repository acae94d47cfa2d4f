"""Validate a dataset before any GPU time is spent.

Every row is parsed and type-checked, every page decoded (PDFs rendered), and (given a processor) every
sample's token count computed from its page sizes without loading model weights. Problems name file, line
(or table row) and field; nothing is dropped without being counted and listed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection

from .conversation import render
from .documents import BytesSource, FileSource, PageLimits, load_pages
from .formats import Columns, SplitLocation, expected_layouts, layout_hint, locate_split, read_location
from .records import DataError, Problem, Record, SplitError, data_fingerprint


@dataclass
class SplitReport:
    split: str
    folder: str
    rows: int = 0
    records: list[Record] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    page_sizes: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    duplicates: int = 0
    formats: dict[str, int] = field(default_factory=dict)
    ignored: dict[str, int] = field(default_factory=dict)
    pdf_ids: set[str] = field(default_factory=set)  # the documents holding a PDF

    @functools.cached_property
    def fingerprint(self) -> str:
        """The usable documents' count and digest (``records.data_fingerprint``), once per report."""
        return data_fingerprint(self.records)

    @property
    def pdf_documents(self) -> int:
        return len(self.pdf_ids)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "error"]

    def summary(self) -> dict[str, Any]:
        totals = [t["total"] for t in self.tokens.values()]
        pages = [len(s) for s in self.page_sizes.values()]
        return {
            "split": self.split, "folder": self.folder, "rows": self.rows, "usable": len(self.records),
            "errors": len(self.errors), "warnings": len(self.problems) - len(self.errors),
            "duplicates": self.duplicates, "max_tokens": max(totals) if totals else None,
            "formats": dict(self.formats), "ignored_keys": dict(self.ignored),
            "pages": {"total": sum(pages), "max": max(pages) if pages else 0,
                      "multi_page_documents": sum(1 for n in pages if n > 1), "pdf_documents": self.pdf_documents},
        }


def _check_pages(r: Record, limits: PageLimits) -> tuple[Record, list[tuple[int, int]] | None, bool, DataError | None]:
    """(record, page sizes, whether a file of it is a PDF, error)."""
    try:
        sizes = [im.size for im in load_pages(r.sources, limits, r.where)]
    except DataError as e:
        return r, None, False, e
    return r, sizes, any(isinstance(x, (FileSource, BytesSource)) and x.is_pdf() for x in r.sources), None


def sample_tokens(processor: Any, r: Record, sizes: list[tuple[int, int]], system_message: str | None
                  ) -> dict[str, Any]:
    """Token counts of one sample, computed from its page sizes (no pixels processed, no model)."""
    turns = render(processor, r.prefix, r.system or system_message, r.target_text, len(sizes))
    tok = processor.tokenizer
    prompt = len(tok(turns.prompt, add_special_tokens=False)["input_ids"])
    answer = len(tok(turns.target, add_special_tokens=False)["input_ids"])
    tail = len(tok(turns.tail, add_special_tokens=False)["input_ids"]) if turns.tail else 0
    pages = [int(n) for n in processor._get_num_multimodal_tokens(
        image_sizes=[(h, w) for w, h in sizes])["num_image_tokens"]]
    # The prompt text holds one placeholder token per page, which the processor expands to that page's tokens.
    prompt_total = prompt - len(sizes) + sum(pages)
    return {"image": sum(pages), "pages": pages, "prompt": prompt_total, "answer": answer,
            "total": prompt_total + answer + tail}


def check_split(data_dir: str | Path, split: str, *, processor: Any = None, system_message: str | None = None,
                max_length: int | None = None, limits: PageLimits = PageLimits(), columns: Columns = Columns(),
                workers: int = 4, location: SplitLocation | None = None,
                only: Collection[str] | None = None) -> SplitReport:
    """Read, validate and measure one split, in any supported format. A missing split raises SplitError.
    ``only``: the documents (ids) to check and keep; the others are read but neither opened nor kept."""
    loc = location or locate_split(data_dir, split)
    if loc is None:
        raise SplitError(f"split '{split}' not found: expected {expected_layouts(data_dir, split)}"
                         f"{layout_hint(data_dir)}", Path(data_dir) / split)
    columns = Columns(columns.image, columns.answer, columns.prompt, columns.default_prompt, limits.max_pages)
    read = read_location(loc, columns)
    report = SplitReport(split, loc.label, read.rows, problems=read.problems, formats=read.layouts,
                         ignored=read.ignored)
    seen: Counter = Counter()
    wanted = None if only is None else set(only)
    records = read.records if wanted is None else [r for r in read.records if r.id in wanted]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        checked = list(pool.map(lambda r: _check_pages(r, limits), records))
    for r, sizes, pdf, err in checked:
        if err is not None:
            report.problems.append(Problem.from_error(err))
            continue
        key = (tuple(r.image_names), r.prefix)
        seen[key] += 1
        if seen[key] > 1:
            report.duplicates += 1
            report.problems.append(Problem(r.file, r.line, "image", f"duplicate of an earlier row (same document "
                                           f"'{Path(r.image_names[0]).name}' and prefix)", "warning", "DuplicateRow"))
        report.page_sizes[r.id] = sizes
        if pdf:
            report.pdf_ids.add(r.id)
        if processor is not None:
            counts = sample_tokens(processor, r, sizes, system_message)
            report.tokens[r.id] = counts
            if max_length is not None and counts["total"] > max_length:
                per_page = ", ".join(str(n) for n in counts["pages"])
                report.problems.append(Problem(
                    r.file, r.line, r.answer_field, f"sample is {counts['total']} tokens ({counts['image']} image over "
                    f"{len(sizes)} page(s): {per_page}; {counts['answer']} answer), over data.max_length="
                    f"{max_length}; it would have to be truncated", "error", "SampleTooLongError"))
                continue
        report.records.append(r)
    report.problems.sort(key=lambda p: (p.file, p.line or 0))
    return report


def choose_holdout(train: SplitReport, fraction: float, seed: int) -> list[str]:
    """The ids of ``fraction`` of the training documents (at least one, never all), drawn with ``seed``."""
    ids = [r.id for r in train.records]
    if len(ids) < 2:
        raise DataError(f"data.valid_fraction needs at least 2 usable training documents to hold some out, the "
                        f"train split has {len(ids)}", train.folder)
    k = min(len(ids) - 1, max(1, round(fraction * len(ids))))
    chosen = set(random.Random(seed).sample(ids, k))
    return [i for i in ids if i in chosen]


def hold_out(train: SplitReport, ids: Collection[str]) -> tuple[SplitReport, SplitReport]:
    """(the train split without the documents ``ids``, a 'valid' split of them): a run's validation documents when
    its data has no valid split (``data.valid_fraction``)."""
    ids = set(ids)
    kept = [r for r in train.records if r.id not in ids]
    held = [r for r in train.records if r.id in ids]

    def part(split: str, records: list[Record], rows: int, problems: list[Problem]) -> SplitReport:
        keys = {r.id for r in records}
        return dataclasses.replace(
            train, split=split, rows=rows, records=records, problems=problems,
            page_sizes={k: v for k, v in train.page_sizes.items() if k in keys},
            tokens={k: v for k, v in train.tokens.items() if k in keys},
            duplicates=0 if split == "valid" else train.duplicates, formats=dict(train.formats),
            pdf_ids=train.pdf_ids & keys)

    # a held-out document that is unusable now (its file gone or broken) is named, not silently left out
    found = {r.id for r in held}
    gone = [Problem(train.folder, None, None, f"held-out document {i} is not usable now (qwenvl-tune check says why)",
                    "error", "HoldoutError") for i in sorted(ids - found)]
    return (part("train", kept, train.rows - len(ids), list(train.problems)),
            part("valid", held, len(ids), gone))


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
