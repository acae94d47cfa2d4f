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
        rows.append({"id": f"valid:{i + 1}", "images": [str(img)], "gold": gold,
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


def test_rows_that_could_not_be_read_are_named_in_the_console_and_the_report(tmp_path):
    from qwenvl_tune.evaluation.report import format_metrics

    problems = [f"valid/annotations.jsonl:{n} [image]: error: image 'x{n}.png' not found" for n in range(7, 14)]
    res = write_outputs(tmp_path / "eval", "t", _rows(tmp_path), OPTIONS,
                        {"split": "valid", "skipped": len(problems), "problems": problems})
    shown = format_metrics(res)
    assert "not scored: 7 row(s) of the split could not be read" in shown
    assert problems[0] in shown and problems[4] in shown and problems[5] not in shown and "    ..." in shown
    page = (tmp_path / "eval" / "report.html").read_text()
    assert "7 row(s) of this split could not be read and are not scored" in page
    assert all(p.replace("'", "&#x27;") in page for p in problems)
    clean = write_outputs(tmp_path / "clean", "t", _rows(tmp_path), OPTIONS, {"split": "valid"})
    assert "not scored" not in format_metrics(clean)
    assert 'id="not-scored"' not in (tmp_path / "clean" / "report.html").read_text()


def test_an_evaluation_failing_while_it_writes_leaves_the_previous_outputs_whole(tmp_path):
    out = tmp_path / "eval"
    write_outputs(out, "t", _rows(tmp_path), OPTIONS)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    rows = _rows(tmp_path)
    rows[2]["images"] = [object()]  # the third line cannot be written: the failure comes mid-file
    with pytest.raises(TypeError):
        write_outputs(out, "t", rows, {**OPTIONS, "casefold": True})
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # no half file, no temporary
    assert len(read_predictions(out / "predictions.jsonl")) == 4


def test_the_console_says_how_many_answers_the_token_limit_cut_off(tmp_path):
    from qwenvl_tune.evaluation.report import format_metrics

    res = write_outputs(tmp_path / "eval", "t", _rows(tmp_path), OPTIONS, {"max_new_tokens": 12}, html_report=False)
    shown = format_metrics(res)
    assert "finetuned: 1 of 4 answers cut off at generate.max_new_tokens (12)" in shown  # sample 3 was cut
    assert "base:" not in shown  # no base answer was cut off


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
    rows[1]["images"].append(rows[2]["images"][0])  # a two-page document
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
        assert "0.png" in page.locator(".sample .meta").nth(1).inner_text()  # samples named by their files
        two = page.locator('.sample[data-id="valid:2"]')
        assert two.locator("a.page img").count() == 2 and "2 pages" in two.inner_text()
        assert "1.png, 2.png" in two.locator(".meta").inner_text()
        # click a scan: it opens full size over the page; Esc closes it
        page.locator(".sample a.page").first.click()
        assert page.locator("#zoom").is_visible()
        page.keyboard.press("Escape")
        assert not page.locator("#zoom").is_visible()
        # filters: by error type and by field
        page.select_option("#f-error", "invalid")
        assert [page.locator(".sample").nth(i).get_attribute("data-id") for i in range(page.locator(".sample").count())] == ["valid:4"]
        page.select_option("#f-error", "")
        page.select_option("#f-field", "dock")
        assert page.locator(".sample").count() == 4  # dock is wrong in 0, 2 and 4, missing in the broken 3
        assert page.locator("#count").inner_text() == "4 of 5 samples"
        page.select_option("#f-field", "")
        page.fill("#f-name", "4.png")
        assert page.locator(".sample").count() == 1
        browser.close()
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000


@pytest.mark.skipif(_chromium() is None, reason="Debian's chromium is not installed (make test installs it)")
def test_a_large_report_pages_and_keeps_its_thumbnails_beside_it(tmp_path):
    from playwright.sync_api import sync_playwright

    from qwenvl_tune.evaluation.report import EMBED_LIMIT, PAGE_SIZE

    out = tmp_path / "eval"
    base = _rows(tmp_path, 4)
    rows = [dict(base[i % 4], id=f"valid:{i + 1}") for i in range(EMBED_LIMIT + 50)]
    write_outputs(out, "large report", rows, OPTIONS)
    html_size = (out / "report.html").stat().st_size
    thumbs = list((out / "report_files").glob("*.jpg"))
    assert len(thumbs) == len(rows) and html_size < 2_000 * len(rows)  # the HTML holds data, not pictures
    assert "data:image/jpeg" not in (out / "report.html").read_text()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone's screen
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((out / "report.html").as_uri())
        assert page.locator(".sample").count() == PAGE_SIZE
        assert page.locator("#where").inner_text() == f"page 1 of {-(-len(rows) // PAGE_SIZE)}"
        page.click("#next")
        assert page.locator(".sample .meta").first.inner_text().startswith(f"#{PAGE_SIZE + 1} ")
        # the page's thumbnails come from report_files/: every one of them loads
        page.wait_for_function("[...document.querySelectorAll('.sample img')].every(i => i.complete)", timeout=30_000)
        assert page.evaluate("[...document.querySelectorAll('.sample img')].every(i => i.naturalWidth > 0)")
        # nothing wider than the screen but the tables' own scrolling
        assert page.evaluate("document.documentElement.scrollWidth") <= 390 + 1
        page.screenshot(path=str(ARTIFACTS / "report_narrow.png"))
        assert errors == []
        browser.close()


def test_json_string_answers_get_the_per_field_view(tmp_path):
    from qwenvl_tune.evaluation.report import _diff_table

    gold = json.dumps({"total": "12.00", "tax": "1.20"})  # stored as a JSON string, as Roboflow exports answers
    table = _diff_table(gold, '{"total": "12.00", "tax": "9.99"}', OPTIONS)
    assert "<td>total</td>" in table and "<td>tax</td>" in table and "(text)" not in table
    assert table.count('class="wrong"') == 1 and table.count('class="ok"') == 1


def test_the_diff_table_shows_confidences_and_fields_without_one():
    from qwenvl_tune.evaluation.report import _diff_table

    conf = {"document": 0.5, "fields": {"total": 0.97, "tax": 0.4}}  # the extra "note" has none
    table = _diff_table({"total": "12.00", "tax": "1.20"}, '{"total": "12.00", "tax": "9.99", "note": 1}', OPTIONS,
                        conf, review_below=0.9)
    assert "<th>confidence</th>" in table and ">0.97<" in table
    assert '<td class="conf review">0.40</td>' in table  # under the review threshold
    assert table.count("<tr") == 4 and '<tr class="extra"><td>note</td><td>—</td><td>1</td><td></td></tr>' in table
