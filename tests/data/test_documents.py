"""Documents as users have them: several pages per sample, PDFs, and the dataset formats of the peers.

Every format must load the same samples as its Roboflow-JSONL equivalent, and every bad input must be named
by file, row (or page) and field.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import BAD_PDF_MESSAGES, bad_pdfs, swatch, write_split
from qwenvl_tune.data.check import check_split
from qwenvl_tune.data.documents import FileSource, PageLimits, load_pages, pdf_bytes_from_images
from qwenvl_tune.data.formats import Columns, locate_split
from qwenvl_tune.data.records import DataError

PROMPT = "extract data in JSON format"
ANSWERS = [{"invoice": "A-1", "total": "10.00"}, {"invoice": "B-2", "total": "7.50"}, {"invoice": "C-3"}]


def _pages() -> dict[str, Image.Image]:
    return {"a1.png": swatch((200, 30, 30), (140, 180), "A p1"), "a2.png": swatch((30, 200, 30), (140, 180), "A p2"),
            "b.png": swatch((30, 30, 200), (180, 140), "B"), "c1.png": swatch((90, 90, 90), (150, 150), "C p1"),
            "c2.png": swatch((20, 120, 220), (150, 150), "C p2")}


DOCS = [["a1.png", "a2.png"], ["b.png"], ["c1.png", "c2.png"]]


def _roboflow(tmp_path: Path) -> Path:
    rows = [{"images": d, "prefix": PROMPT, "suffix": a} if len(d) > 1 else {"image": d[0], "prefix": PROMPT, "suffix": a}
            for d, a in zip(DOCS, ANSWERS)]
    write_split(tmp_path / "robo" / "train", rows, _pages())
    return tmp_path / "robo"


def _loaded(data_dir: Path, columns: Columns = Columns()):
    rep = check_split(data_dir, "train", columns=columns)
    assert not rep.errors, [str(p) for p in rep.errors]
    out = []
    for r in rep.records:
        answer = r.suffix if not isinstance(r.suffix, str) else json.loads(r.suffix)
        pages = [np.asarray(p) for p in load_pages(r.sources, PageLimits(), r.where)]
        out.append((r.prefix, answer, r.system, pages))
    return rep, out


def _same(a, b):
    assert len(a) == len(b)
    for (pa, aa, sa, ia), (pb, ab, sb, ib) in zip(a, b):
        assert (pa, aa, sa) == (pb, ab, sb)
        assert len(ia) == len(ib) and all(np.array_equal(x, y) for x, y in zip(ia, ib))


def test_multi_page_rows_keep_their_pages_in_order(tmp_path):
    rep, docs = _loaded(_roboflow(tmp_path))
    assert [len(d[3]) for d in docs] == [2, 1, 2]
    assert rep.summary()["pages"] == {"total": 5, "max": 2, "multi_page_documents": 2, "pdf_documents": 0}
    assert [Path(n).name for n in rep.records[0].image_names] == ["a1.png", "a2.png"]
    assert np.array_equal(docs[0][3][1], np.asarray(_pages()["a2.png"]))


def _messages_rows(style: str) -> list[dict]:
    rows = []
    for d, a in zip(DOCS, ANSWERS):
        user = "<image>" * len(d) + PROMPT
        if style == "messages":
            turns = [{"role": "user", "content": user}, {"role": "assistant", "content": json.dumps(a)}]
            rows.append({"messages": turns, "images": d})
        else:
            turns = [{"from": "human", "value": user}, {"from": "gpt", "value": json.dumps(a)}]
            rows.append({"conversations": turns, "images": d})
    return rows


@pytest.mark.parametrize("style", ["messages", "sharegpt"])
def test_llama_factory_and_ms_swift_rows_load_the_same_samples(tmp_path, style):
    _, want = _loaded(_roboflow(tmp_path))
    write_split(tmp_path / style / "train", _messages_rows(style), _pages())
    rep, got = _loaded(tmp_path / style)
    _same(got, want)
    assert list(rep.formats) == [style] and rep.formats[style] == 3


def test_a_rows_own_system_message_and_inline_image_parts(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "You read invoices."},
                          {"role": "user", "content": [{"type": "image", "image": "a1.png"},
                                                       {"type": "image", "image": "a2.png"},
                                                       {"type": "text", "text": PROMPT}]},
                          {"role": "assistant", "content": json.dumps(ANSWERS[0])}], "source": "scan-batch-4"}]
    write_split(tmp_path / "d" / "train", rows, _pages())
    rep, got = _loaded(tmp_path / "d")
    assert got[0][0] == PROMPT and got[0][2] == "You read invoices." and len(got[0][3]) == 2
    assert rep.ignored == {"source": 1}


@pytest.mark.parametrize("row,field,needle", [
    ({"messages": [{"role": "user", "content": "<image>" + PROMPT}, {"role": "assistant", "content": "{}"}],
      "images": ["a1.png", "a2.png"]}, "messages[0].content", "1 '<image>' marker(s) but the row has 2 image(s)"),
    ({"messages": [{"role": "user", "content": "<image><image><image>x"}, {"role": "assistant", "content": "{}"}],
      "images": ["a1.png"]}, "messages[0].content", "3 '<image>' marker(s)"),
    ({"messages": [{"role": "user", "content": "<image>x"}], "images": ["a1.png"]}, "messages", "no assistant turn"),
    ({"messages": [{"role": "user", "content": "<image>x"}, {"role": "assistant", "content": "a"},
                   {"role": "user", "content": "more"}, {"role": "assistant", "content": "b"}], "images": ["a1.png"]},
     "messages[2]", "multi-turn"),
    ({"messages": [{"role": "robot", "content": "x"}], "images": ["a1.png"]}, "messages[0].role", "unknown role"),
    ({"messages": [{"role": "user", "content": "<image>x"}, {"role": "assistant", "content": " "}],
      "images": ["a1.png"]}, "messages[1].content", "empty"),
    ({"conversations": [{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "<image>"}],
      "images": ["a1.png"]}, "conversations[1].value", "images go in the user turn"),
    ({"images": [], "prefix": PROMPT, "suffix": "x"}, "images", "non-empty list"),
    ({"images": ["a1.png", 3], "prefix": PROMPT, "suffix": "x"}, "images[1]", "non-empty string"),
    ({"images": ["a1.png", "missing.png"], "prefix": PROMPT, "suffix": "x"}, "images[1]", "not found"),
    ({"image": "a1.png", "images": ["a2.png"], "prefix": PROMPT, "suffix": "x"}, "images", "both 'image' and 'images'"),
    ({"images": ["a1.png"] * 9, "prefix": PROMPT, "suffix": "x"}, "images", "9 images, over data.max_pages=8"),
])
def test_bad_rows_of_any_layout_are_named_by_line_and_field(tmp_path, row, field, needle):
    good = {"images": ["a1.png", "a2.png"], "prefix": PROMPT, "suffix": ANSWERS[0]}
    write_split(tmp_path / "d" / "train", [good, row, good], _pages())
    rep = check_split(tmp_path / "d", "train")
    assert len(rep.errors) == 1 and [r.line for r in rep.records] == [1, 3]
    err = rep.errors[0]
    assert err.line == 2 and err.field == field and needle in err.message, str(err)
    assert err.file.endswith("annotations.jsonl")


# ---------------------------------------------------------------- PDFs


def test_pdf_rows_render_every_page_at_the_pixel_budget(tmp_path):
    pages = [swatch((240, 240, 240), (612, 792), "page 1"), swatch((250, 250, 250), (612, 792), "page 2")]
    folder = write_split(tmp_path / "d" / "train", [{"image": "doc.pdf", "prefix": PROMPT, "suffix": ANSWERS[0]}], {})
    (folder / "doc.pdf").write_bytes(pdf_bytes_from_images(pages))
    limits = PageLimits(render_pixels=200_000)
    rep = check_split(tmp_path / "d", "train", limits=limits)
    assert not rep.errors and rep.page_sizes["train:1"] and len(rep.page_sizes["train:1"]) == 2
    assert rep.summary()["pages"]["pdf_documents"] == 1
    for w, h in rep.page_sizes["train:1"]:
        assert abs(w * h - 200_000) / 200_000 < 0.01 and abs(w / h - 612 / 792) < 0.01  # the budget, the shape


def test_bad_pdfs_and_long_documents_are_named(tmp_path):
    page = swatch((240, 240, 240), (200, 260), "p")
    bad = bad_pdfs([page])
    files = {**bad, "three.pdf": pdf_bytes_from_images([page] * 3), "ok.pdf": pdf_bytes_from_images([page])}
    rows = [{"image": n, "prefix": PROMPT, "suffix": "x"} for n in files]
    rows.append({"images": ["ok.pdf", "big.png"], "prefix": PROMPT, "suffix": "x"})
    folder = write_split(tmp_path / "d" / "train", rows, {"big.png": swatch((1, 1, 1), (600, 600))})
    for name, data in files.items():
        (folder / name).write_bytes(data)
    rep = check_split(tmp_path / "d", "train", limits=PageLimits(max_image_pixels=300_000, max_pages=2))
    errors = {p.line: p for p in rep.errors}
    assert sorted(errors) == [1, 2, 3, 4, 5, 7] and [r.line for r in rep.records] == [6]
    for line, name in enumerate(bad, 1):
        assert BAD_PDF_MESSAGES[name] in errors[line].message and name in errors[line].message
        assert errors[line].field == "image"
    assert "three.pdf: PDF has 3 pages, over data.max_pages=2" in errors[5].message
    assert errors[7].field == "images[1]" and "big.png" in errors[7].message and "exceeds the limit" in errors[7].message


def test_skip_invalid_counts_bad_documents(tmp_path, tiny_dir):
    from qwenvl_tune.config import build_config
    from qwenvl_tune.modeling.load import load_processor
    from qwenvl_tune.rundir import RunDir
    from qwenvl_tune.training.setup import setup_data

    page = swatch((240, 240, 240), (112, 112), "p")
    rows = [{"image": "encrypted.pdf", "prefix": PROMPT, "suffix": "x"},
            {"images": ["p.png", "p.png"], "prefix": PROMPT, "suffix": "y"}]
    for split in ("train", "valid"):
        folder = write_split(tmp_path / "d" / split, rows, {"p.png": page})
        (folder / "encrypted.pdf").write_bytes(bad_pdfs([page])["encrypted.pdf"])
    cfg = build_config(None, {"data.path": str(tmp_path / "d"), "model.name_or_path": str(tiny_dir),
                              "data.skip_invalid": True, "data.min_pixels": 3136, "data.max_pixels": 12544})
    (tmp_path / "runs" / "r").mkdir(parents=True)
    proc = load_processor(tiny_dir, 3136, 12544)
    train, valid = setup_data(cfg, proc, RunDir.at(tmp_path / "runs", "r"))
    assert [r.line for r in train.records] == [2] and len(train.errors) == 1
    assert "encrypted" in train.errors[0].message
    assert train.tokens["train:2"]["pages"] == [16, 16] and train.tokens["train:2"]["image"] == 32


# ---------------------------------------------------------------- tables


def _table_rows(tmp_path: Path, multi: bool = True) -> dict[str, list]:
    pages = _pages()
    enc = lambda n: {"bytes": (tmp_path / "robo" / "train" / n).read_bytes(), "path": None}  # noqa: E731
    return {"pages": [[enc(n) for n in d] for d in DOCS], "question": [PROMPT] * 3,
            "ground_truth": [json.dumps({"gt_parse": a}) for a in ANSWERS], "vendor": ["x", "y", "z"]}


def test_a_datasets_folder_loads_the_same_samples(tmp_path):
    datasets = pytest.importorskip("datasets")
    _, want = _loaded(_roboflow(tmp_path))
    features = datasets.Features({"pages": datasets.Sequence(datasets.Image()), "question": datasets.Value("string"),
                                  "ground_truth": datasets.Value("string"), "vendor": datasets.Value("string")})
    ds = datasets.Dataset.from_dict(_table_rows(tmp_path), features=features)
    datasets.DatasetDict({"train": ds, "validation": ds}).save_to_disk(str(tmp_path / "hf"))
    assert locate_split(tmp_path / "hf", "valid").kind == "arrow"
    rep, got = _loaded(tmp_path / "hf")
    _same(got, want)
    assert rep.ignored == {"vendor": 3}
    kinds = {p.kind for p in rep.problems}
    assert {"IgnoredKeys", "DonutGroundTruth"} <= kinds  # each reported once, as a warning
    assert rep.records[0].file.endswith("train") and rep.records[2].id == "train:2"


def test_parquet_files_with_named_columns_load_the_same_samples(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    _, want = _loaded(_roboflow(tmp_path))
    rows = _table_rows(tmp_path)
    table = pa.table({"scan": rows["pages"], "ask": rows["question"],
                      "truth": [json.dumps(a) for a in ANSWERS]})
    (tmp_path / "pq" / "data").mkdir(parents=True)
    pq.write_table(table.slice(0, 2), tmp_path / "pq" / "data" / "train-00000-of-00002.parquet")
    pq.write_table(table.slice(2), tmp_path / "pq" / "data" / "train-00001-of-00002.parquet")
    columns = Columns(image="scan", answer="truth", prompt="ask")
    rep, got = _loaded(tmp_path / "pq", columns)
    _same(got, want)
    assert [r.id for r in rep.records] == ["train:0", "train:1", "train:2"]
    assert rep.records[2].file.endswith("train-00001-of-00002.parquet") and rep.records[2].line == 0
    # a column that is not there: the file, the option and the columns that are
    with pytest.raises(DataError, match=r"train-00000-of-00002.parquet.*no column 'answer' \(data.answer_column\); "
                                        r"the columns are scan, ask, truth"):
        check_split(tmp_path / "pq", "train", columns=Columns(image="scan", answer="answer"))
    with pytest.raises(DataError, match=r"no answer column \(looked for suffix, answer"):
        check_split(tmp_path / "pq", "train")


def test_bad_table_cells_are_named_by_row_and_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    _roboflow(tmp_path)
    rows = _table_rows(tmp_path)
    images = rows["pages"]
    images[1] = []
    images[2] = [{"bytes": b"not an image", "path": None}]
    pq.write_table(pa.table({"images": images, "answer": [json.dumps(a) for a in ANSWERS]}),
                   tmp_path / "train.parquet")
    rep = check_split(tmp_path, "train")
    errs = {p.line: p for p in rep.errors}
    assert sorted(errs) == [1, 2] and [r.line for r in rep.records] == [0]
    assert errs[1].field == "images" and "empty" in errs[1].message
    assert "train.parquet:2 [images[0]]" in errs[2].message and "not a readable image" in errs[2].message


# ---------------------------------------------------------------- sample data


def test_sample_data_has_two_page_documents_and_pdfs(tmp_path):
    from qwenvl_tune.data.synthetic import write_dataset

    data = write_dataset(tmp_path / "d", n_train=12, n_valid=0, size=(212, 275), multipage=0.5, pdf=0.4)
    rep = check_split(data, "train", limits=PageLimits(render_pixels=212 * 275))
    assert not rep.errors
    kinds = [(len(rep.page_sizes[r.id]), Path(r.image_names[0]).suffix) for r in rep.records]
    assert {(2, ".pdf"), (2, ".jpg"), (1, ".jpg")} <= set(kinds)
    two = next(r for r in rep.records if len(rep.page_sizes[r.id]) == 2)
    assert "total_cases" in two.suffix and len(two.suffix["products"]) >= 3  # totals are on the last page only


def test_a_datasets_folder_of_messages_rows_loads_the_same_samples(tmp_path):
    datasets = pytest.importorskip("datasets")
    _, want = _loaded(_roboflow(tmp_path))
    pages = _table_rows(tmp_path)["pages"]
    messages = [r["messages"] for r in _messages_rows("messages")]
    features = datasets.Features({
        "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
        "images": datasets.Sequence(datasets.Image())})
    ds = datasets.Dataset.from_dict({"messages": messages, "images": pages}, features=features)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "hf"))
    rep, got = _loaded(tmp_path / "hf")
    _same(got, want)
    # a row whose markers do not match its images is named by its index and field
    messages[1][0]["content"] = "<image><image>" + PROMPT
    bad = datasets.Dataset.from_dict({"messages": messages, "images": pages}, features=features)
    datasets.DatasetDict({"train": bad}).save_to_disk(str(tmp_path / "hf2"))
    rep = check_split(tmp_path / "hf2", "train")
    assert [r.line for r in rep.records] == [0, 2] and rep.errors[0].line == 1
    assert rep.errors[0].field == "messages[0].content" and "2 '<image>' marker(s) but the row has 1" in rep.errors[0].message


def _data_uri(path: Path) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_inline_data_uri_images_load_the_same_samples_in_jsonl_and_parquet(tmp_path):
    """ms-swift and OpenAI-style rows carry images inline; they load pixel for pixel as the files they came from."""
    _, want = _loaded(_roboflow(tmp_path))
    files = tmp_path / "robo" / "train"
    rows = [{"images": [_data_uri(files / n) for n in d], "prefix": PROMPT, "suffix": a} for d, a in zip(DOCS, ANSWERS)]
    write_split(tmp_path / "inline" / "train", rows, {})
    rep, got = _loaded(tmp_path / "inline")
    _same(got, want)
    assert rep.records[1].image_names[0].startswith("data URI (image/png, sha256 ")
    # a digest of the documents tells inline images apart by their bytes
    from qwenvl_tune.data.records import data_fingerprint

    swapped = [{**rows[0], "images": rows[0]["images"][::-1]}, *rows[1:]]
    write_split(tmp_path / "swapped" / "train", swapped, {})
    assert data_fingerprint(rep.records) != data_fingerprint(check_split(tmp_path / "swapped", "train").records)
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"images": [r["images"] for r in rows], "answer": [json.dumps(a) for a in ANSWERS]}),
                   tmp_path / "train.parquet")
    _same(_loaded(tmp_path)[1], want)


def test_urls_and_bad_data_uris_are_named_errors(tmp_path):
    bad = {"https://example.com/a.png": "is a https:// URL; nothing is fetched over the network",
           "s3://bucket/a.png": "is a s3:// URL",
           "file:///srv/a.png": "is a file: URL, an absolute path",
           "data:image/png;base64,@@@": "not valid base64",
           "data:image/png,rawtext": "must be base64-encoded",
           "data:image/png;base64,AAAA": "not a readable image"}
    write_split(tmp_path / "d" / "train", [{"image": k, "prefix": PROMPT, "suffix": ANSWERS[0]} for k in bad], {})
    rep = check_split(tmp_path / "d", "train")
    assert not rep.records and len(rep.errors) == len(bad)
    for line, (p, want) in enumerate(zip(rep.errors, bad.values()), start=1):
        assert p.line == line and p.field == "image" and want in p.message, str(p)


def _llama_factory_folder(tmp_path: Path, rows: list, name: str = "train.json") -> Path:
    """LLaMA-Factory's layout: JSON array files in the data folder, images in a folder beside them."""
    folder = tmp_path / "lf"
    (folder / "scans").mkdir(parents=True, exist_ok=True)
    for n, im in _pages().items():
        im.save(folder / "scans" / n)
    (folder / "dataset_info.json").write_text("{}")
    (folder / name).write_text(rows if isinstance(rows, str) else json.dumps(rows, indent=2))
    return folder


@pytest.mark.parametrize("style", ["messages", "sharegpt"])
def test_json_array_files_in_the_data_folder_load_the_same_samples_named_by_line(tmp_path, style):
    """LLaMA-Factory's datasets are pretty-printed JSON arrays with images relative to the data folder."""
    _, want = _loaded(_roboflow(tmp_path))
    rows = [{**r, "images": [f"scans/{n}" for n in r["images"]]} for r in _messages_rows(style)]
    folder = _llama_factory_folder(tmp_path, rows)
    assert locate_split(folder, "train").label == str(folder / "train.json")
    rep, got = _loaded(folder)
    _same(got, want)
    text = (folder / "train.json").read_text().split("\n")
    # each row is named by the line its object starts on, as in JSONL files
    assert [text[r.line - 1] for r in rep.records] == ["  {"] * 3 and rep.records[0].line == 2
    assert [r.id for r in rep.records] == [f"train:{r.line}" for r in rep.records]
    # the same rows one per line as valid.jsonl, and as annotations.json inside a split folder
    (folder / "valid.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    _same(_loaded_split(folder, "valid"), want)
    (folder / "test").mkdir()
    (folder / "test" / "annotations.json").write_text(json.dumps(_messages_rows(style)))
    for n, im in _pages().items():
        im.save(folder / "test" / n)
    _same(_loaded_split(folder, "test"), want)


def _loaded_split(data_dir: Path, split: str):
    rep = check_split(data_dir, split)
    assert not rep.errors, [str(p) for p in rep.errors]
    return [(r.prefix, json.loads(r.suffix) if isinstance(r.suffix, str) else r.suffix, r.system,
             [np.asarray(p) for p in load_pages(r.sources, PageLimits(), r.where)]) for r in rep.records]


def test_bad_json_array_files_are_named_by_line(tmp_path):
    row = _messages_rows("messages")[1] | {"images": ["scans/b.png"]}
    good = json.dumps(row)
    # one bad element: the others are still read, the bad one named by its line
    folder = _llama_factory_folder(tmp_path, "[\n" + good + ",\n" + good.replace('"messages"', '"images": [], "messages"', 1)
                                   + ",\n" + '{"a": NaN}' + ",\n" + good + "\n]\n")
    rep = check_split(folder, "train")
    assert [r.line for r in rep.records] == [2, 5]
    assert sorted((p.line, p.message[:30]) for p in rep.errors) == [
        (3, "duplicate key 'images' in one "), (4, "NaN is not JSON (write null or")]
    # broken JSON: nothing of the file is used, and the message says where and why
    for text, where in (("[\n" + good + ",\n{oops}\n]", ":3: malformed JSON: Expecting property name"),
                        ("[\n" + good + "\n" + good + "]", ":3: expected ',' or ']' after a row at column 1"),
                        ('{"rows": []}', ":1: a .json annotations file holds one JSON array"),
                        # a duplicate key or NaN first, then broken JSON further on in the same row
                        ('[\n{"x": {"a": 1, "a": 2}, oops}]', ":2: malformed JSON: Expecting property name"),
                        ('[\n{"x": [NaN,\n oops]}]', ":3: malformed JSON: Expecting value")):
        (folder / "train.json").write_text(text)
        with pytest.raises(DataError, match=re.escape(str(folder / "train.json") + where)):
            check_split(folder, "train")
    (folder / "train.json").unlink()
    with pytest.raises(DataError, match="laid out for LLaMA-Factory: name each split's file of rows after it"):
        check_split(folder, "train")


def test_openai_vision_fine_tuning_rows_with_inline_images_load_the_same_samples(tmp_path):
    """The chat format of OpenAI's vision fine-tuning files: image_url parts holding data: URIs, answer as text."""
    _, want = _loaded(_roboflow(tmp_path))
    files = tmp_path / "robo" / "train"
    rows = [{"messages": [{"role": "user", "content": [
        *[{"type": "image_url", "image_url": {"url": _data_uri(files / n), "detail": "high"}} for n in d],
        {"type": "text", "text": PROMPT}]}, {"role": "assistant", "content": json.dumps(a)}]}
        for d, a in zip(DOCS, ANSWERS)]
    write_split(tmp_path / "oa" / "train", rows, {})
    rep, got = _loaded(tmp_path / "oa")
    _same(got, want)
    assert list(rep.formats) == ["messages"]


def test_imagefolder_metadata_jsonl_rows_with_donut_ground_truth_load_the_same_samples(tmp_path):
    """donut-python's dataset layout is Hugging Face's ImageFolder: metadata.jsonl beside the images, a file_name
    and a ground_truth holding {"gt_parse": ...} as text; the prompt is data.prompt. A list in file_name keeps a
    document's pages in order."""
    _, want = _loaded(_roboflow(tmp_path))
    rows = [{"file_name": d if len(d) > 1 else d[0], "ground_truth": json.dumps({"gt_parse": a})}
            for d, a in zip(DOCS, ANSWERS)]
    folder = tmp_path / "donut"
    write_split(folder / "validation", rows, _pages())
    (folder / "validation" / "annotations.jsonl").rename(folder / "validation" / "metadata.jsonl")
    loc = locate_split(folder, "valid")
    assert loc.label == str(folder / "validation" / "metadata.jsonl")
    rep = check_split(folder, "valid")
    assert not rep.errors, [str(p) for p in rep.errors]
    got = _loaded_split(folder, "valid")
    _same(got, want)
    assert list(rep.formats) == ["imagefolder"] and rep.formats["imagefolder"] == 3
    warnings = [p for p in rep.problems if p.level == "warning"]
    assert [p.kind for p in warnings] == ["DonutGroundTruth"] and "3 answer(s)" in warnings[0].message
    assert [r.line for r in rep.records] == [1, 2, 3] and rep.records[0].answer_field == "ground_truth"


def test_imagefolder_metadata_csv_is_read_with_quoted_multi_line_cells_and_bad_rows_named(tmp_path):
    import csv

    pages = _pages()
    one_page = [("b.png", ANSWERS[1]), ("a1.png", ANSWERS[0]), ("c2.png", ANSWERS[2])]
    robo = [{"image": n, "prefix": PROMPT, "suffix": a} for n, a in one_page]
    write_split(tmp_path / "robo1" / "train", robo, pages)
    _, want = _loaded(tmp_path / "robo1")

    folder = tmp_path / "csv" / "train"
    folder.mkdir(parents=True)
    for n, im in pages.items():
        im.save(folder / n)
    with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["file_name", "text", "scanner"])  # "text": ImageFolder's answer column for image-to-text
        for n, a in one_page:
            w.writerow([n, json.dumps(a, indent=2), "x"])  # pretty-printed: each cell spans several lines
    rep, got = _loaded(tmp_path / "csv")
    _same(got, want)
    assert rep.formats == {"imagefolder": 3} and rep.ignored == {"scanner": 3}
    lines = (folder / "metadata.csv").read_text().split("\n")
    assert [lines[r.line - 1][:6] for r in rep.records] == ["b.png,", "a1.png", "c2.png"], "named by starting line"

    # bad rows: each named by line and column, the others still read
    with open(folder / "metadata.csv", "a", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerows([["b.png", '{"total": "1"}'], ["gone.png", '{"total": "1"}', ""], ["", '{"total": "1"}', ""],
                     ["b.png", "", ""], ["b.png", '{"total": "2"}', "y"]])
    start = len(lines)
    rep = check_split(tmp_path / "csv", "train")
    assert len(rep.records) == 4 and rep.records[-1].line == start + 4
    found = sorted((p.line - start, p.field, p.message) for p in rep.errors)
    expected = [(0, None, "2 cells, but the header names 3 columns"), (1, "file_name", "image 'gone.png' not found"),
                (2, "file_name", "'file_name' must name the document's file"), (3, "text", "'text' is empty")]
    assert [(n, f) for n, f, _ in found] == [(n, f) for n, f, _ in expected]
    assert all(m.startswith(want) for (_, _, m), (_, _, want) in zip(found, expected)), found

    # columns by other names, chosen with the data.*_column options; a prompt column of its own
    (folder / "metadata.csv").write_text("scan,truth,ask\nb.png,\"{\"\"total\"\": \"\"7.50\"\"}\",Read it.\n")
    unnamed = check_split(tmp_path / "csv", "train").errors
    assert len(unnamed) == 1 and unnamed[0].message.startswith("no image column (looked for file_name")
    assert unnamed[0].message.endswith("name it with data.image_column; the row's columns are scan, truth, ask")
    rep, got = _loaded(tmp_path / "csv", Columns(image="scan", answer="truth", prompt="ask"))
    assert got[0][:2] == ("Read it.", {"total": "7.50"}) and rep.records[0].answer_field == "truth"


def test_metadata_csv_saved_by_a_spreadsheet_reads_the_same(tmp_path):
    """Semicolon-separated, with a byte-order mark and CRLF line ends, as spreadsheets save CSV in many locales."""
    folder = tmp_path / "d" / "train"
    folder.mkdir(parents=True)
    _pages()["b.png"].save(folder / "b.png")
    text = '\ufefffile_name;ground_truth;note\r\nb.png;"{""total"": ""7,50""}";x\r\n'
    (folder / "metadata.csv").write_bytes(text.encode("utf-8"))
    rep, got = _loaded(tmp_path / "d")
    assert got[0][1] == {"total": "7,50"} and rep.ignored == {"note": 1} and rep.records[0].line == 2


@pytest.mark.parametrize("text,where", [
    ("", ":1: the CSV file is empty"),
    ("\n\n", ":1: the CSV file's first line is empty"),
    ("file_name,text,file_name\nb.png,x,y\n", ":1: the CSV header names column(s) 'file_name' twice"),
])
def test_broken_metadata_csv_files_are_named(tmp_path, text, where):
    folder = tmp_path / "d" / "train"
    folder.mkdir(parents=True)
    (folder / "metadata.csv").write_text(text)
    with pytest.raises(DataError, match=re.escape(str(folder / "metadata.csv") + where)):
        check_split(tmp_path / "d", "train")


def test_imagefolder_rows_in_an_annotations_file_say_where_they_belong(tmp_path):
    write_split(tmp_path / "d" / "train", [{"file_name": "b.png", "ground_truth": "{}"}], _pages())
    rep = check_split(tmp_path / "d", "train")
    assert len(rep.errors) == 1 and "metadata.jsonl or metadata.csv" in rep.errors[0].message
