"""Property test of the loader, the check command, and --skip-invalid end to end."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import swatch, tiny_overrides
from qwenvl_tune.cli import main
from qwenvl_tune.config import build_config
from qwenvl_tune.data.images import load_image
from qwenvl_tune.data.records import DataError, read_split

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=12)
rows = st.one_of(
    st.dictionaries(st.sampled_from(["image", "prefix", "suffix", "extra"]), json_values, max_size=4),
    json_values,
    st.fixed_dictionaries({"image": st.text(max_size=20), "prefix": st.text(max_size=20), "suffix": json_values}),
    # messages / ShareGPT rows, well-formed or not
    st.fixed_dictionaries({"messages": st.one_of(json_values, st.lists(st.fixed_dictionaries({
        "role": st.sampled_from(["user", "assistant", "system", "bot", 3]),
        "content": st.one_of(st.text(max_size=20).map(lambda t: "<image>" + t), json_values)}), max_size=4)),
        "images": st.one_of(json_values, st.lists(st.sampled_from(["a.png", "b.png", ""]), max_size=3))}),
    st.fixed_dictionaries({"conversations": json_values, "images": json_values}),
    st.fixed_dictionaries({"images": st.lists(st.one_of(st.text(max_size=8), json_values), max_size=10),
                           "prefix": st.text(max_size=5), "suffix": json_values}),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(rows.map(lambda r: json.dumps(r)), st.text(max_size=40)), max_size=6))
def test_loader_returns_records_or_our_errors(tmp_path_factory, lines):
    folder = tmp_path_factory.mktemp("fuzz") / "train"
    folder.mkdir()
    swatch((1, 2, 3)).save(folder / "a.png")
    (folder / "annotations.jsonl").write_text("\n".join(lines), encoding="utf-8")
    try:
        got = read_split(folder)
    except DataError:
        return
    assert len(got.records) + sum(p.level == "error" for p in got.problems) == got.rows  # every row accounted for


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(rows, max_size=6), indent=st.sampled_from([None, 2]),
       noise=st.one_of(st.none(), st.text(max_size=30), st.sampled_from([",", "]", "[", "NaN", '{"a": 1, "a": 2}',
                                                                      '{"a": {"b": 1, "b": 2}, oops', '[NaN, x'])),
       at=st.integers(min_value=0, max_value=10_000))
def test_json_array_files_return_records_or_our_errors(tmp_path_factory, items, indent, noise, at):
    """LLaMA-Factory's .json files: any array of rows is read row by row; text spliced in anywhere gives records or
    our errors, never a traceback, and never a row silently lost."""
    folder = tmp_path_factory.mktemp("fuzzjson")
    swatch((1, 2, 3)).save(folder / "a.png")
    text = json.dumps(items, indent=indent)
    if noise is not None:
        at %= len(text) + 1
        text = text[:at] + noise + text[at:]
    (folder / "train.json").write_text(text, encoding="utf-8")
    try:
        got = read_split(folder, "train", file=folder / "train.json")
    except DataError:
        assert noise is not None  # a well-formed array is always read
        return
    assert len(got.records) + sum(p.level == "error" for p in got.problems) == got.rows
    if noise is None:
        assert got.rows == len(items)


csv_cells = st.one_of(st.text(max_size=12), st.sampled_from(["a.png", "", '{"total": "1"}', '{"gt_parse": {"a": 1}}',
                                                             '"quoted, with comma"', "line\nbreak", '"open']))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.lists(st.sampled_from(["file_name", "text", "ground_truth", "prompt", "x", ""]), min_size=0, max_size=4),
       cells=st.lists(st.lists(csv_cells, max_size=5), max_size=6), raw=st.booleans())
def test_metadata_csv_files_return_records_or_our_errors(tmp_path_factory, header, cells, raw):
    """ImageFolder's metadata.csv: any header and cells (written by the csv module, or joined raw so quotes and
    line breaks land anywhere) give records or our errors, and every row is accounted for."""
    import csv
    import io

    folder = tmp_path_factory.mktemp("fuzzcsv") / "train"
    folder.mkdir()
    swatch((1, 2, 3)).save(folder / "a.png")
    if raw:
        text = "\n".join(",".join(r) for r in [header, *cells])
    else:
        buf = io.StringIO()
        csv.writer(buf).writerows([header, *cells])
        text = buf.getvalue()
    (folder / "metadata.csv").write_text(text, encoding="utf-8")
    from qwenvl_tune.data.formats import read_location, locate_split

    try:
        got = read_location(locate_split(folder.parent, "train"))
    except DataError:
        return
    assert len(got.records) + sum(p.level == "error" for p in got.problems) == got.rows


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048))
def test_random_bytes_as_image_or_annotations(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("bytes")
    (d / "x.png").write_bytes(data)
    try:
        load_image(d / "x.png")
    except DataError:
        pass
    split = d / "train"
    split.mkdir()
    (split / "annotations.jsonl").write_bytes(data)
    (split / "annotations.json").write_bytes(data)
    (split / "metadata.csv").write_bytes(data)
    for name in ("annotations.jsonl", "annotations.json", "metadata.csv"):
        try:
            read_split(split, file=split / name)
        except DataError:
            pass


def _dataset_with_bad_rows(sample_data, tmp_path):
    """The sample data plus 3 bad training rows."""
    import shutil

    data = tmp_path / "Data"
    shutil.copytree(sample_data, data)
    ann = data / "train" / "annotations.jsonl"
    good = ann.read_text(encoding="utf-8")
    bad = ['{"image": "missing.jpg", "prefix": "x", "suffix": "y"}', '{"image": "manifest_0000.jpg", "prefix": 5, '
           '"suffix": "y"}', "{not json"]
    ann.write_text(good + "\n".join(bad) + "\n", encoding="utf-8")
    return data, len(good.splitlines())


def test_train_refuses_bad_data_and_skip_invalid_records_them(sample_data, tiny_dir, tmp_path):
    from qwenvl_tune import api

    data, n_good = _dataset_with_bad_rows(sample_data, tmp_path)
    cfg = build_config(None, tiny_overrides(data, tiny_dir, tmp_path / "runs", **{"train.max_steps": 2}))
    with pytest.raises(DataError, match=r"3 invalid row\(s\)"):
        api.train(cfg)
    cfg.data.skip_invalid = True
    cfg.run.name = "skipping"
    run = api.train(cfg)
    problems = [json.loads(l) for l in (run / "data_problems.jsonl").read_text().splitlines()]
    errors = [p for p in problems if p["level"] == "error"]
    assert sorted(p["line"] for p in errors) == [n_good + 1, n_good + 2, n_good + 3]
    summary = json.loads((run / "data_summary.json").read_text())
    assert summary["skipped"] == 3
    train = next(s for s in summary["splits"] if s["split"] == "train")
    assert train["rows"] == n_good + 3 and train["usable"] == n_good
    assert (run / "best" / "COMPLETE").exists()


def test_check_cli_report_and_exit_codes(sample_data, tiny_dir, tmp_path, capsys):
    assert main(["check", str(sample_data), "--model", str(tiny_dir)]) == 0
    out = capsys.readouterr().out
    for needle in ("train", "valid", "test", "answers parsing as JSON", "route (6)", "longest", "problems: 0 error(s)"):
        assert needle in out, needle
    data, n_good = _dataset_with_bad_rows(sample_data, tmp_path)
    assert main(["check", str(data), "--model", str(tiny_dir), "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    lines = sorted(p["line"] for p in rep["splits"]["train"]["problems"] if p["level"] == "error")
    assert rep["errors"] == 3 and lines == [n_good + 1, n_good + 2, n_good + 3]
    assert rep["splits"]["train"]["tokens"]["image"]["max"] > 0 and rep["notes"] == []


def test_check_says_a_missing_valid_split_stops_train_and_how_to_make_one(sample_data, tmp_path, capsys):
    import shutil

    shutil.copytree(sample_data / "train", tmp_path / "OnlyTrain" / "train")
    assert main(["check", str(tmp_path / "OnlyTrain")]) == 0  # the data is fine; the layout needs a word
    out = capsys.readouterr().out
    assert "note: no valid split: train validates on one" in out and "--data.valid_fraction 0.1" in out


def test_keys_never_seen_in_train_are_reported(tmp_path, tiny_dir, capsys):
    from conftest import write_split

    img = {"a.png": swatch((5, 5, 5))}
    write_split(tmp_path / "D" / "train", [{"image": "a.png", "prefix": "p", "suffix": {"total": "1"}}], img)
    write_split(tmp_path / "D" / "valid", [{"image": "a.png", "prefix": "p", "suffix": {"total": "1", "tax": "2"}}], img)
    main(["check", str(tmp_path / "D"), "--model", str(tiny_dir)])
    assert "keys never seen in train: tax" in capsys.readouterr().out


def test_train_help_names_each_option_type_plainly(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for shown in ("--model.kernels {auto,none,liger}", "--train.batch_size INT|auto", "--train.lr FLOAT",
                  "--model.fast_path BOOL", "--lora.target_modules LIST", "--data.system_message TEXT"):
        assert shown in out, shown
    assert "<class" not in out and "Literal[" not in out


@pytest.mark.parametrize("typed,hint", [
    ("Data/train/annotations.jsonl", "is a file: data.path is the folder that holds train/ and valid/, here {d}"),
    ("Data/train", "is a split folder itself: data.path is the folder above it, {d}"),
    ("Nowhere", "Nowhere does not exist"),
])
def test_a_data_path_one_level_off_says_which_folder_was_meant(sample_data, tmp_path, capsys, typed, hint):
    import shutil

    shutil.copytree(sample_data, tmp_path / "Data")
    assert main(["check", str(tmp_path / typed)]) == 2
    assert hint.format(d=tmp_path / "Data") in capsys.readouterr().err


def test_a_run_folder_given_as_data_says_what_it_trained_on(sample_data, tmp_path, capsys):
    import yaml

    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"path": str(sample_data)}}))
    assert main(["check", str(run)]) == 2
    assert f"{run} is a run folder, not a dataset; the run trained on {sample_data}" in capsys.readouterr().err
