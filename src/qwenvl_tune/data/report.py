"""``qwenvl-tune check``: the data report, as a readable table or JSON.

Token counts need only the processor (tokenizer + image-size rule), never model weights.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from .check import SplitReport, check_split
from .documents import PageLimits
from .formats import Columns, expected_layouts, layout_hint, locate_split
from .records import FORMAT_NAMES, SplitError, loads_json


def _json_shape(report: SplitReport) -> dict[str, Any]:
    keys: Counter = Counter()
    types: dict[str, Counter] = {}
    parsed = 0
    for r in report.records:
        value = r.suffix
        if isinstance(value, str):
            try:
                value = loads_json(value)
            except json.JSONDecodeError:
                continue
        if not isinstance(value, (dict, list)):
            continue
        parsed += 1
        if isinstance(value, dict):
            for k, v in value.items():
                keys[k] += 1
                types.setdefault(k, Counter())[type(v).__name__] += 1
    return {"json_answers": parsed, "keys": dict(keys.most_common()),
            "value_types": {k: dict(c) for k, c in types.items()}}


def build_report(data_dir: str | Path, processor: Any = None, system_message: str | None = None,
                 max_length: int | None = None, limits: PageLimits = PageLimits(),
                 columns: Columns = Columns()) -> dict[str, Any]:
    splits: list[SplitReport] = []
    for split in ("train", "valid", "test"):
        loc = locate_split(data_dir, split)
        if loc is None:
            if split == "train":
                raise SplitError(f"no train split: expected {expected_layouts(data_dir, 'train')}"
                                 f"{layout_hint(data_dir)}", Path(data_dir) / "train")
            continue
        splits.append(check_split(data_dir, split, processor=processor, system_message=system_message,
                                  max_length=max_length, limits=limits, columns=columns, location=loc))
    out: dict[str, Any] = {"data": str(data_dir), "splits": {}}
    train_keys: set[str] = set()
    for rep in splits:
        shape = _json_shape(rep)
        entry: dict[str, Any] = {**rep.summary(), "answers": shape,
                                 "problems": [{**p.__dict__} for p in rep.problems]}
        entry["formats"] = {FORMAT_NAMES.get(k, k): n for k, n in rep.formats.items()}
        if rep.page_sizes:
            areas = [w * h for sizes in rep.page_sizes.values() for w, h in sizes]
            entry["image_pixels"] = {"min": min(areas), "median": int(statistics.median(areas)), "max": max(areas)}
        if rep.tokens:
            for part in ("image", "prompt", "answer", "total"):
                vals = [t[part] for t in rep.tokens.values()]
                entry.setdefault("tokens", {})[part] = {"min": min(vals), "median": int(statistics.median(vals)),
                                                        "max": max(vals)}
            per_page = [n for t in rep.tokens.values() for n in t["pages"]]
            entry["tokens"]["per_page"] = {"min": min(per_page), "median": int(statistics.median(per_page)),
                                           "max": max(per_page)}
            longest = sorted(rep.tokens.items(), key=lambda kv: -kv[1]["total"])[:3]
            entry["longest"] = [{"id": k, **v} for k, v in longest]
        if rep.split == "train":
            train_keys = set(shape["keys"])
        else:
            entry["keys_not_in_train"] = sorted(set(shape["keys"]) - train_keys)
        out["splits"][rep.split] = entry
    out["errors"] = sum(len(r.errors) for r in splits)
    out["max_length"] = max_length
    out["notes"] = [] if "valid" in out["splits"] else [
        "no valid split: train validates on one to choose best/ and to stop early; move about 10% of the training "
        "documents into one, or train with --data.valid_fraction 0.1 to hold them out"]
    return out


def format_report(rep: dict[str, Any]) -> str:
    lines = [f"data: {rep['data']}", ""]
    head = f"{'split':<6}{'rows':>7}{'usable':>8}{'errors':>8}{'warn':>6}{'dups':>6}{'pages (max)':>12}" \
           f"{'tok/page (med/max)':>20}{'answer tok (med/max)':>22}{'longest':>9}"
    lines += [head, "-" * len(head)]
    for s, e in rep["splits"].items():
        tok = e.get("tokens", {})
        img = f"{tok['per_page']['median']}/{tok['per_page']['max']}" if tok else "-"
        ans = f"{tok['answer']['median']}/{tok['answer']['max']}" if tok else "-"
        pages = f"{e['pages']['total']} ({e['pages']['max']})"
        lines.append(f"{s:<6}{e['rows']:>7}{e['usable']:>8}{e['errors']:>8}{e['warnings']:>6}{e['duplicates']:>6}"
                     f"{pages:>12}{img:>20}{ans:>22}{str(e.get('max_tokens') or '-'):>9}")
    for s, e in rep["splits"].items():
        a = e["answers"]
        lines += ["", f"[{s}] {e['folder']}"]
        for name, n in e["formats"].items():
            lines.append(f"  format: {name}: {n} row(s)")
        if e["pages"].get("pdf_documents"):
            lines.append(f"  PDF documents: {e['pages']['pdf_documents']} (pages rendered at data.max_pixels)")
        if e["pages"]["multi_page_documents"]:
            lines.append(f"  multi-page documents: {e['pages']['multi_page_documents']} (at most {e['pages']['max']} "
                         f"pages)")
        if e["ignored_keys"]:
            lines.append("  ignored (not used for training): " +
                         ", ".join(f"{k} ({n} rows)" for k, n in e["ignored_keys"].items()))
        lines.append(f"  answers parsing as JSON: {a['json_answers']}/{e['usable']}")
        if a["keys"]:
            lines.append("  keys: " + ", ".join(f"{k} ({n})" for k, n in a["keys"].items()))
        if e.get("keys_not_in_train"):
            lines.append(f"  keys never seen in train: {', '.join(e['keys_not_in_train'])}")
        for item in e.get("longest", []):
            pages = item["pages"]
            split_up = f" over {len(pages)} pages: {'+'.join(map(str, pages))}" if len(pages) > 1 else ""
            lines.append(f"  longest: {item['id']} {item['total']} tokens ({item['image']} image{split_up}, "
                         f"{item['answer']} answer)")
    if rep.get("max_length") and any(e.get("max_tokens") for e in rep["splits"].values()):
        longest = max((e.get("max_tokens") or 0) for e in rep["splits"].values())
        over = sum(1 for e in rep["splits"].values() for p in e["problems"] if p["kind"] == "SampleTooLongError")
        verdict = "all samples fit" if not over else f"{over} sample(s) over it (listed below)"
        lines += ["", f"longest sample {longest} tokens; data.max_length {rep['max_length']}: {verdict}"]
    for note in rep.get("notes", []):
        lines += ["", f"note: {note}"]
    problems = [(s, p) for s, e in rep["splits"].items() for p in e["problems"]]
    lines += ["", f"problems: {rep['errors']} error(s), {len(problems) - rep['errors']} warning(s)"]
    for s, p in problems:
        loc = f"{p['file']}:{p['line']}" if p["line"] is not None else p["file"]
        fld = f" [{p['field']}]" if p["field"] else ""
        lines.append(f"  {p['level']:<7} {loc}{fld}: {p['message']}")
    return "\n".join(lines)
