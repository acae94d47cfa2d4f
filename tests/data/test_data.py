"""Every bad input gets our own error class naming file, line and field; awkward-but-valid images just work."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from conftest import swatch
from qwenvl_tune.data.check import check_split
from qwenvl_tune.data.documents import PageLimits
from qwenvl_tune.data.images import load_image
from qwenvl_tune.data.records import (DataError, ImageError, SplitError,
                                      read_split, serialize_target)

GOOD = {"image": "ok.png", "prefix": "extract data in JSON format", "suffix": {"dock": "D29"}}


def _split(tmp_path: Path, lines: list, extra_files: dict | None = None, raw: bytes | None = None) -> Path:
    folder = tmp_path / "train"
    folder.mkdir(parents=True, exist_ok=True)
    swatch((200, 200, 200)).save(folder / "ok.png")
    for name, data in (extra_files or {}).items():
        p = folder / name
        if isinstance(data, Image.Image):
            data.save(p)
        elif isinstance(data, bytes):
            p.write_bytes(data)
    ann = folder / "annotations.jsonl"
    if raw is not None:
        ann.write_bytes(raw)
    else:
        ann.write_text("\n".join(l if isinstance(l, str) else json.dumps(l, ensure_ascii=False) for l in lines) + "\n",
                       encoding="utf-8")
    return folder


def _only_problem(folder: Path, kind: str, line: int, field: str | None = None, level: str = "error"):
    rep = check_split(folder.parent, "train")
    probs = [p for p in rep.problems if p.level == level]
    assert len(probs) == 1, [str(p) for p in rep.problems]
    p = probs[0]
    assert p.kind == kind, str(p)
    assert p.line == line and p.file.endswith("annotations.jsonl")
    assert f"annotations.jsonl:{line}" in str(p)
    if field:
        assert p.field == field, str(p)
    return rep, p


# ---------------------------------------------------------------- JSONL


@pytest.mark.parametrize("bad,kind,field", [
    ('{"image": "ok.png", "prefix": "x", "suffix": ', "JSONLError", None),              # malformed
    ('["ok.png", "x", "y"]', "JSONLError", None),                                      # not an object
    ('"just a string"', "JSONLError", None),
    ('{"image": "ok.png", "image": "b.png", "prefix": "x", "suffix": "y"}', "JSONLError", "image"),  # duplicate key
    ({"prefix": "x", "suffix": "y"}, "SchemaError", "image"),                           # missing key
    ({**GOOD, "prefix": 3}, "SchemaError", "prefix"),                                   # wrong type
    ({**GOOD, "suffix": None}, "SchemaError", "suffix"),                                # null answer
    ({**GOOD, "suffix": "  "}, "SchemaError", "suffix"),                                # empty answer
    ({**GOOD, "suffix": {}}, "SchemaError", "suffix"),
    ({**GOOD, "suffix": 42}, "SchemaError", "suffix"),
    ({**GOOD, "image": ""}, "SchemaError", "image"),
    ('{"image": "ok.png", "prefix": "x", "suffix": {"total": NaN}}', "JSONLError", None),  # Python's json reads these
    ('{"image": "ok.png", "prefix": "x", "suffix": [1, -Infinity]}', "JSONLError", None),
])
def test_bad_rows(tmp_path, bad, kind, field):
    folder = _split(tmp_path, [GOOD, bad, GOOD])
    rep, p = _only_problem(folder, kind, 2, field)
    assert [r.line for r in rep.records] == [1, 3]  # the others are kept, nothing silently dropped
    assert rep.rows == 3


def test_nan_and_infinity_are_not_json_but_their_names_in_strings_are(tmp_path):
    line = '{"image": "ok.png", "prefix": "Infinity NaN", "suffix": {"note": "NaN", "total": Infinity}}'
    rep, p = _only_problem(_split(tmp_path, [GOOD, line]), "JSONLError", 2)
    # the column points at the constant, not at the same word inside a string before it
    assert "Infinity is not JSON" in str(p) and f"column {line.index('Infinity}') + 1}" in str(p)
    ok = {**GOOD, "prefix": "NaN", "suffix": {"note": "Infinity", "n": 1e308}}
    assert len(check_split(_split(tmp_path / "ok", [ok]).parent, "train").records) == 1


def test_a_tables_nan_answer_is_an_error_naming_the_cell():
    from qwenvl_tune.data.records import SchemaError, check_answer

    with pytest.raises(SchemaError, match=r"t.parquet:3 \[answer\]: 'answer' holds NaN or Infinity"):
        check_answer({"total": float("nan")}, "t.parquet", 3, "answer")
    assert check_answer({"total": 1.5}, "t.parquet", 3, "answer") == {"total": 1.5}


def test_extra_keys_are_ignored_and_reported_once_never_an_error(tmp_path):
    folder = _split(tmp_path, [{**GOOD, "comment": "hi"}, {**GOOD, "prefix": "b", "comment": "", "source": 3}, GOOD])
    rep = check_split(folder.parent, "train")
    assert not rep.errors and len(rep.records) == 3
    notes = [p for p in rep.problems if p.kind == "IgnoredKeys"]
    assert len(notes) == 1 and notes[0].level == "warning"
    assert "'comment' (2 rows)" in notes[0].message and "'source' (1 row)" in notes[0].message
    assert rep.ignored == {"comment": 2, "source": 1}
    assert all(r.extra == {} for r in rep.records)  # kept out of training


def test_blank_lines_bom_and_crlf(tmp_path):
    other = {**GOOD, "prefix": "read the manifest"}
    body = ("\ufeff" + json.dumps(GOOD) + "\r\n\r\n" + json.dumps(other) + "\r\n").encode("utf-8")
    folder = _split(tmp_path, [], raw=body)
    rep, p = _only_problem(folder, "JSONLError", 2, level="warning")
    assert "blank line" in p.message
    assert [r.line for r in rep.records] == [1, 3] and not rep.errors


def test_not_utf8_is_a_split_error(tmp_path):
    folder = _split(tmp_path, [], raw=json.dumps(GOOD).encode() + b"\n\xff\xfe bad\n")
    with pytest.raises(SplitError, match="annotations.jsonl.*not UTF-8"):
        read_split(folder)


# ---------------------------------------------------------------- paths


def test_missing_image(tmp_path):
    _only_problem(_split(tmp_path, [{**GOOD, "image": "nope.png"}]), "ImagePathError", 1, "image")


@pytest.mark.parametrize("written,hint", [
    ("OK.PNG", "ok.png"),                  # another letter case (exported from a case-blind file system)
    ("ok.jpg", "ok.png"),                  # another extension
    ("pages\\ok.png", "pages/ok.png"),     # Windows separators
    ("pages/Ok.png", "pages/ok.png"),
    ("nothing.png", None),
])
def test_missing_image_names_the_file_it_probably_meant(tmp_path, written, hint):
    folder = _split(tmp_path, [{**GOOD, "image": written}])
    (folder / "pages").mkdir()
    swatch((9, 9, 9)).save(folder / "pages" / "ok.png")
    _, p = _only_problem(folder, "ImagePathError", 1, "image")
    assert "not found" in str(p)
    assert (f"did you mean '{hint}'?" in str(p)) if hint else ("did you mean" not in str(p))


def test_directory_as_image(tmp_path):
    folder = _split(tmp_path, [{**GOOD, "image": "sub"}])
    (folder / "sub").mkdir()
    _, p = _only_problem(folder, "ImagePathError", 1, "image")
    assert "directory" in p.message


def test_dotdot_and_absolute_paths_escape(tmp_path):
    (tmp_path / "secret.png").write_bytes(b"x")
    _split(tmp_path, [{**GOOD, "image": "../secret.png"}, {**GOOD, "image": str(tmp_path / "secret.png")}])
    rep = check_split(tmp_path, "train")
    kinds = sorted((p.line, p.kind) for p in rep.errors)
    assert kinds == [(1, "ImagePathError"), (2, "ImagePathError")]
    assert "outside the split folder" in rep.errors[0].message and "absolute" in rep.errors[1].message


def test_symlink_escaping_the_split(tmp_path):
    outside = tmp_path / "elsewhere.png"
    swatch((1, 2, 3)).save(outside)
    folder = _split(tmp_path, [{**GOOD, "image": "link.png"}, {**GOOD, "image": "inner.png"}])
    os.symlink(outside, folder / "link.png")
    os.symlink(folder / "ok.png", folder / "inner.png")  # a link that stays inside is fine
    _, p = _only_problem(folder, "ImagePathError", 1, "image")
    assert "outside" in p.message


# ---------------------------------------------------------------- broken images


def _jpeg_bytes(size=(120, 90)) -> bytes:
    buf = io.BytesIO()
    swatch((10, 200, 30), size).save(buf, "JPEG")
    return buf.getvalue()


def _gif_two_frames() -> bytes:
    buf = io.BytesIO()
    a, b = swatch((255, 0, 0)), swatch((0, 255, 0))
    a.save(buf, "GIF", save_all=True, append_images=[b])
    return buf.getvalue()


@pytest.mark.parametrize("name,data,needle", [
    ("trunc.jpg", _jpeg_bytes()[:300], "truncated"),
    ("text.jpg", b"this is not an image at all", "not a readable image"),
    ("empty.png", b"", "empty"),
    ("anim.gif", _gif_two_frames(), "multi-frame"),
    ("tiny.png", swatch((0, 0, 0), (20, 20)), "smaller than"),
    ("thin.png", swatch((0, 0, 0), (6000, 28)), "aspect ratio"),
])
def test_broken_images(tmp_path, name, data, needle):
    folder = _split(tmp_path, [GOOD, {**GOOD, "image": name}], {name: data})
    _, p = _only_problem(folder, "ImageError", 2, "image")
    assert needle in p.message and name in p.message


def test_decompression_bomb_limit_is_configurable(tmp_path):
    _split(tmp_path, [{**GOOD, "image": "big.png"}], {"big.png": swatch((9, 9, 9), (400, 400))})
    rep = check_split(tmp_path, "train", limits=PageLimits(max_image_pixels=100_000))
    assert [p.kind for p in rep.errors] == ["ImageError"] and "exceeds the limit" in rep.errors[0].message
    assert not check_split(tmp_path, "train").errors


def test_load_image_raises_our_error_class(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(ImageError) as e:
        load_image(tmp_path / "x.jpg", where=("ann.jsonl", 7))
    assert e.value.file == "ann.jsonl" and e.value.line == 7 and e.value.field == "image"
    assert isinstance(e.value, DataError)


# ---------------------------------------------------------------- images that must just work


def test_exif_rotation_applied_once(tmp_path):
    im = swatch((255, 255, 255), (120, 60))
    im.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    im.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=100)
    out = load_image(tmp_path / "rot.jpg")
    assert out.size == (60, 120)
    assert "exif" not in out.info or Image.open(tmp_path / "rot.jpg").getexif().get(0x0112) == 6
    assert out.getexif().get(0x0112) in (None, 1)  # the orientation tag is consumed, so nothing rotates again


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "1"])
def test_modes_become_rgb(tmp_path, mode):
    base = swatch((120, 60, 30), (64, 64))
    if mode == "I;16":
        import numpy as np
        im = Image.fromarray((np.ones((64, 64)) * 40000).astype("uint16"))
    elif mode in ("RGBA", "LA"):
        im = base.convert(mode)
        im.putalpha(0)  # fully transparent: must come out white, not black
    else:
        im = base.convert(mode)
    ext = "jpg" if mode == "CMYK" else "png"
    im.save(tmp_path / f"x.{ext}")
    out = load_image(tmp_path / f"x.{ext}")
    assert out.mode == "RGB" and out.size == (64, 64)
    if mode in ("RGBA", "LA"):
        assert out.getpixel((10, 10)) == (255, 255, 255)
    if mode == "I;16":
        assert out.getpixel((0, 0))[0] == 255  # 16-bit range scaled, not clipped to garbage


# ---------------------------------------------------------------- answers


def test_unicode_kept_and_key_order_preserved():
    s = serialize_target({"z": "Müller — 東京", "a": [1, {"b": None}]})
    assert s == '{"z": "Müller — 東京", "a": [1, {"b": null}]}'


def test_deeply_nested_answers_load(tmp_path):
    deep: dict = {"v": "leaf"}
    for i in range(60):
        deep = {f"k{i}": deep}
    _split(tmp_path, [{**GOOD, "suffix": deep}])
    rep = check_split(tmp_path, "train")
    assert not rep.problems and rep.records[0].suffix == deep


def test_too_long_answers_are_reported_before_training(tmp_path, tiny_dir):
    from qwenvl_tune.modeling.load import load_processor

    long_answer = {"notes": "word " * 3000}
    as_messages = {"messages": [{"role": "user", "content": "<image>" + GOOD["prefix"]},
                                {"role": "assistant", "content": json.dumps(long_answer)}], "images": [GOOD["image"]]}
    _split(tmp_path, [GOOD, {**GOOD, "suffix": long_answer}, as_messages])
    proc = load_processor(tiny_dir, 16 * 28 * 28, 16 * 28 * 28)
    rep = check_split(tmp_path, "train", processor=proc, max_length=512)
    # each named by the field that holds its answer in its own layout
    assert [(p.line, p.kind, p.field) for p in rep.errors] == [(2, "SampleTooLongError", "suffix"),
                                                              (3, "SampleTooLongError", "messages[1].content")]
    assert "max_length=512" in rep.errors[0].message
    assert rep.tokens["train:1"]["total"] < 512
