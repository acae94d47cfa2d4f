"""Two-page documents end to end: a tiny model memorises two of them (trained on their pages as images) and
reproduces them through predict, bulk extraction and evaluate on their PDF versions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import swatch, tiny_overrides, write_split
from qwenvl_tune import api
from qwenvl_tune.config import build_config
from qwenvl_tune.data.documents import FileSource, PageLimits, load_document, pdf_bytes_from_images

pytestmark = pytest.mark.slow

TARGETS = [{"invoice": "A-17", "total": "10.00"}, {"invoice": "B-23", "total": "7.50"}]
PIXELS = 16 * 28 * 28  # the tiny runs' data.max_pixels: 112 x 112 pages render at scale 1


@pytest.fixture(scope="module")
def two_page_run(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pages")
    pdfs = tmp / "pdfs"
    pdfs.mkdir()
    images: dict = {}
    rows = []
    for i, target in enumerate(TARGETS):
        pages = [swatch((220, 60 + 120 * i, 40), (112, 112), f"{target['invoice']} p1"),
                 swatch((40, 200 - 120 * i, 220), (112, 112), f"total {target['total']}")]
        pdf = pdfs / f"doc{i}.pdf"
        pdf.write_bytes(pdf_bytes_from_images(pages))
        # the model learns the pages as the PDF renders them, then reads the PDF itself
        rendered = load_document(FileSource(pdf), PageLimits(render_pixels=PIXELS))
        names = [f"doc{i}_p{k + 1}.png" for k in range(2)]
        images.update(zip(names, rendered))
        rows.append({"images": names, "prefix": "extract data in JSON format", "suffix": target})
    for split in ("train", "valid"):
        write_split(tmp / "mem" / split, rows, images)
    cfg = build_config(None, tiny_overrides(tmp / "mem", tiny_dir, tmp / "runs", **{
        "model.method": "full", "train.lr": 3e-3, "train.max_epochs": 80, "train.check_val_every_n_epoch": 80,
        "train.warmup_steps": 5}))
    return api.train(cfg), tmp


def test_predict_reads_the_pdf_versions(two_page_run):
    run, tmp = two_page_run
    rows = api.predict(run, [tmp / "pdfs" / "doc0.pdf", tmp / "pdfs" / "doc1.pdf",
                             [tmp / "mem" / "valid" / "doc1_p1.png", tmp / "mem" / "valid" / "doc1_p2.png"]])
    assert [r["json"] for r in rows] == [TARGETS[0], TARGETS[1], TARGETS[1]]
    assert [r["pages"] for r in rows] == [2, 2, 2]
    assert rows[2]["images"][1].endswith("doc1_p2.png")
    # one page alone is another document: the answer needs both
    alone = api.predict(run, [tmp / "mem" / "valid" / "doc0_p1.png"])[0]
    assert alone["pages"] == 1


def test_bulk_extraction_of_a_folder_of_pdfs_and_a_list_of_page_sets(two_page_run):
    from qwenvl_tune.inference.bulk import bulk_predict

    run, tmp = two_page_run
    counts = bulk_predict(run, tmp / "pdfs", tmp / "out.jsonl", progress=False)
    assert counts["written"] == 2 and counts["errors"] == 0
    lines = {Path(r["input"]).name: r for r in map(json.loads, (tmp / "out.jsonl").read_text().splitlines())}
    assert lines["doc0.pdf"]["json"] == TARGETS[0] and lines["doc1.pdf"]["pages"] == 2
    (tmp / "list.jsonl").write_text(json.dumps({"id": "second", "images": ["mem/valid/doc1_p1.png",
                                                                           "mem/valid/doc1_p2.png"]}) + "\n")
    bulk_predict(run, tmp / "list.jsonl", tmp / "out2.jsonl", progress=False)
    (line,) = map(json.loads, (tmp / "out2.jsonl").read_text().splitlines())
    assert line["input"] == "second" and line["json"] == TARGETS[1] and len(line["images"]) == 2


def test_evaluate_scores_two_page_documents_and_the_report_shows_every_page(two_page_run):
    run, tmp = two_page_run
    metrics = api.evaluate(run, "valid")
    assert metrics["finetuned"]["exact_match"] == 1.0
    out = Path(run) / "eval" / "valid"
    pred = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [len(p["images"]) for p in pred] == [2, 2]
    report = (out / "report.html").read_text()
    data = json.loads(report.split('<script id="data" type="application/json">')[1].split("</script>")[0])
    assert [len(s["pages"]) for s in data["samples"]] == [2, 2]  # a thumbnail of every page
    assert all(src.startswith("data:image/jpeg") for s in data["samples"] for src, _ in s["pages"])
    assert sorted(s["names"] for s in data["samples"]) == [["doc0_p1.png", "doc0_p2.png"],
                                                           ["doc1_p1.png", "doc1_p2.png"]]  # named by their files
