"""Evaluation outputs from stored predictions, and the HTML report in a real headless Chromium."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, swatch
from qwenvl_tune.evaluation.report import read_predictions, write_outputs

ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", ROOT / "test-artifacts"))
OPTIONS = {"list_matching": "position", "casefold": False, "whitespace": True, "numeric": False}


def _rows(tmp_path: Path, n: int = 4) -> list[dict]:
    rows = []
    for i in range(n):
        img = tmp_path / f"{i}.png"
        swatch((40 * i, 120, 200), (200, 260), text=f"doc {i}").save(img)
        gold = {"route": f"R{i}", "dock": "D29", "products": [{"cases": "8"}, {"cases": str(i)}]}
        pred = dict(gold, dock="D29" if i % 2 else "D30")
        raw = json.dumps(pred) if i != 3 else '```json\n{"route": "R3"'  # one broken output
        rows.append({"id": f"valid:{i + 1}", "image": str(img), "gold": gold,
                     "finetuned": {"raw": raw, "truncated": i == 3},
                     "base": {"raw": "I see a document.", "truncated": False}})
    return rows


def test_outputs_written_and_consistent(tmp_path):
    out = tmp_path / "eval"
    res = write_outputs(out, "t", _rows(tmp_path), OPTIONS, {"split": "valid"})
    for name in ("predictions.jsonl", "metrics.json", "fields.csv", "field_accuracy.png", "report.html"):
        assert (out / name).stat().st_size > 0, name
    ft = res["finetuned"]
    assert ft["n"] == 4 and ft["json_valid"] == 0.75 and ft["json_repaired"] == 0.25 and ft["truncated"] == 0.25
    assert res["base"]["json_valid"] == 0.0
    fields = {r["field"]: r for r in csv.DictReader(open(out / "fields.csv"))}
    assert fields["dock"]["finetuned_accuracy"] == "0.2500"  # right only in sample 1 (0 and 2 say D30, 3 is broken)
    assert fields["products[].cases"]["support"] == "8"
    stored = read_predictions(out / "predictions.jsonl")
    assert [r["finetuned"]["raw"] for r in stored] == [r["finetuned"]["raw"] for r in _rows(tmp_path)]


def test_rescoring_stored_predictions_with_other_options(tmp_path):
    out = tmp_path / "eval"
    write_outputs(out, "t", _rows(tmp_path), OPTIONS)
    again = write_outputs(out, "t", read_predictions(out / "predictions.jsonl"), {**OPTIONS, "casefold": True})
    assert again["options"]["casefold"] is True and again["finetuned"]["n"] == 4


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="Debian's chromium is not installed (make test installs it)")
def test_report_renders_in_headless_chromium(tmp_path):
    from playwright.sync_api import sync_playwright

    out = tmp_path / "eval"
    rows = _rows(tmp_path, 5)
    write_outputs(out, "report test", rows, OPTIONS)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        errors: list[str] = []
        requests: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        page.goto((out / "report.html").as_uri())
        page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        assert errors == []
        assert all(u.startswith(("file:", "data:")) for u in requests), requests  # nothing fetched from outside
        assert page.locator("#samples .sample").count() == 5  # one row per sample
        from qwenvl_tune.evaluation.metrics import SCALAR_METRICS

        assert page.locator("#summary tr").count() == 1 + len(SCALAR_METRICS) + 1  # header, scalar metrics, samples
        assert page.evaluate("document.querySelector('#field-chart').naturalWidth") > 100
        assert page.evaluate("[...document.querySelectorAll('.sample img')].every(i => i.naturalWidth > 0)")
        # worst first: the broken output leads
        assert page.locator(".sample").first.get_attribute("data-id") == "valid:4"
        assert page.locator(".sample").first.locator("tr.missing").count() >= 1
        browser.close()
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000


def test_json_string_answers_get_the_per_field_view(tmp_path):
    from qwenvl_tune.evaluation.report import _diff_table

    gold = json.dumps({"total": "12.00", "tax": "1.20"})  # stored as a JSON string, as Roboflow exports answers
    table = _diff_table(gold, '{"total": "12.00", "tax": "9.99"}', OPTIONS)
    assert "<td>total</td>" in table and "<td>tax</td>" in table and "(text)" not in table
    assert table.count('class="wrong"') == 1 and table.count('class="ok"') == 1
