"""What bulk extraction reads before any model loads: a folder or a .jsonl list, every bad line named at once."""

from __future__ import annotations

import json

import pytest

from conftest import swatch
from qwenvl_tune.data.records import DataError
from qwenvl_tune.inference.bulk import list_inputs


def test_a_folder_gives_its_documents_sorted_and_an_empty_one_is_an_error(tmp_path):
    (tmp_path / "sub").mkdir()
    swatch((1, 2, 3)).save(tmp_path / "b.png")
    swatch((1, 2, 3)).save(tmp_path / "sub" / "a.JPG")
    (tmp_path / "notes.txt").write_text("not a document")
    assert [i["input"] for i in list_inputs(tmp_path)] == [str(tmp_path / "b.png"), str(tmp_path / "sub" / "a.JPG")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no image or PDF files in this folder or below it"):
        list_inputs(tmp_path / "empty")


@pytest.mark.parametrize("name,needle", [("missing.jsonl", "missing.jsonl: file not found"),
                                         ("scan.pdf", "--input takes a folder of images and PDFs or a .jsonl list")])
def test_an_input_that_is_neither_a_folder_nor_a_list_is_one_line(tmp_path, name, needle):
    with pytest.raises(DataError, match=needle):
        list_inputs(tmp_path / name)


def test_every_bad_line_of_a_list_is_named_before_anything_is_extracted(tmp_path):
    lines = [json.dumps({"image": "a.png"}), json.dumps({"id": "two", "images": ["b1.png", "b2.png"]}),
             json.dumps({"image": 5}), "not json", json.dumps({"id": "two", "image": "c.png"}), "",
             json.dumps({"image": "d.png", "prompt": ["x"]}), json.dumps({"image": "e.png", "id": {"k": 1}}),
             '{"image": "f.png", "id": NaN}', json.dumps("a.png")]
    (tmp_path / "list.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        list_inputs(tmp_path / "list.jsonl")
    said = str(e.value).splitlines()
    assert said[0].endswith("7 bad line(s) of 9; nothing was extracted:")
    assert [s.split(":")[1].split()[0] for s in said[1:]] == ["3", "4", "5", "7", "8", "9", "10"]
    assert "listed twice (line 2 too" in said[3] and "'prompt' must be a string" in said[4]
    assert "NaN is not JSON" in said[6] and "listed twice (line 1 too" in said[7]
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(lines[:2] + [json.dumps({"image": "c.png", "prompt": "read it", "id": 3})]) + "\n")
    items = list_inputs(good)
    assert [i["input"] for i in items] == [str(tmp_path / "a.png"), "two", "3"]
    assert items[1]["files"] == [str(tmp_path / "b1.png"), str(tmp_path / "b2.png")] and items[2]["prompt"] == "read it"
