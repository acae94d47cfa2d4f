"""What a new user meets first: check offline, missing extras, moved run folders, exit codes, --version."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ENV, ROOT, tiny_overrides
from qwenvl_tune import api
from qwenvl_tune.config import build_config

pytestmark = pytest.mark.slow  # subprocesses and trained runs: tens of seconds on 2 CPU cores



def _cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 300):
    return subprocess.run([sys.executable, "-m", "qwenvl_tune.cli", *args], env=env or ENV, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def _messy(sample_data: Path, tmp_path: Path) -> tuple[Path, list[int]]:
    data = tmp_path / "Messy"
    shutil.copytree(sample_data, data)
    ann = data / "train" / "annotations.jsonl"
    good = ann.read_text(encoding="utf-8").splitlines()
    bad = ['{"image": "missing.jpg", "prefix": "x", "suffix": "y"}', '{"image": "manifest_0000.jpg", "prefix": 5, '
           '"suffix": "y"}', "{not json", '{"image": "../../etc/passwd", "prefix": "x", "suffix": "y"}',
           '{"prefix": "x", "suffix": "y"}']
    ann.write_text("\n".join(good + bad) + "\n", encoding="utf-8")
    return data, list(range(len(good) + 1, len(good) + len(bad) + 1))


def test_check_offline_without_a_model_names_every_bad_row_in_seconds(sample_data, tmp_path):
    data, bad_lines = _messy(sample_data, tmp_path)
    env = {**ENV, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    done = _cli("check", str(data), "--json", env=env)
    elapsed = time.perf_counter() - t0
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "token counts and the data.max_length check skipped" in done.stderr and "HF_HUB_OFFLINE" in done.stderr
    report = json.loads(done.stdout)
    lines = sorted(p["line"] for p in report["splits"]["train"]["problems"] if p["level"] == "error")
    assert lines == bad_lines
    assert elapsed < 60, elapsed  # no minutes of hub retries (imports alone take a few seconds on CI)


def test_check_without_a_reachable_hub_fails_fast_too(sample_data, tmp_path, monkeypatch):
    """No HF_HUB_OFFLINE: one quick probe of the hub decides, not the download client's retries."""
    from qwenvl_tune.modeling import load

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(load, "hub_reachable", lambda timeout=3.0: False)
    notes: list[str] = []
    data, bad_lines = _messy(sample_data, tmp_path)
    report = api.check(data, notes=notes)
    assert report["errors"] == len(bad_lines)
    assert notes and "cannot be reached" in notes[0] and "--model" in notes[0]


def test_qlora_without_bitsandbytes_is_one_line_and_leaves_no_run_folder(sample_data, tiny_dir, tmp_path):
    code = ("import importlib.util, sys\n"
            "real = importlib.util.find_spec\n"
            "importlib.util.find_spec = lambda n, *a: None if n == 'bitsandbytes' else real(n, *a)\n"
            "from qwenvl_tune.cli import main\n"
            f"sys.exit(main(['train', '--data', {str(sample_data)!r}, '--model', {str(tiny_dir)!r}, "
            f"'--method', 'qlora', '--output-dir', {str(tmp_path / 'runs')!r}, '--name', 'q']))\n")
    done = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and "pip install 'qwenvl-tune[qlora]'" in err[0], done.stderr
    assert not (tmp_path / "runs" / "q").exists()


def test_a_failed_start_leaves_no_stub_run_folder(sample_data, tmp_path):
    from qwenvl_tune.errors import QwenVLTuneError

    broken = tmp_path / "half-copied-model"  # a config but no processor: fails after the run folder is made
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    cfg = build_config(None, tiny_overrides(sample_data, broken, tmp_path / "runs"))
    with pytest.raises(QwenVLTuneError, match="processor"):
        api.train(cfg)
    assert not (tmp_path / "runs" / "run").exists()


def test_a_data_folder_without_a_valid_split_says_how_to_make_one_and_leaves_no_run_folder(
        sample_data, tiny_dir, tmp_path):
    import shutil

    from qwenvl_tune.data.records import SplitError

    data = tmp_path / "OnlyTrain"
    shutil.copytree(sample_data / "train", data / "train")
    cfg = build_config(None, tiny_overrides(data, tiny_dir, tmp_path / "runs"))
    with pytest.raises(SplitError, match=r"split 'valid' not found.*move some documents of the train split"):
        api.train(cfg)
    assert not (tmp_path / "runs" / "run").exists()


def test_a_moved_run_folder_predicts_from_another_directory(sample_data, tiny_dir, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(sample_data, work / "Data")
    shutil.copytree(tiny_dir, work / "tiny")
    monkeypatch.chdir(work)  # relative paths, as a user types them
    cfg = build_config(None, tiny_overrides(Path("Data"), Path("tiny"), Path("runs"), **{"train.max_steps": 2}))
    api.train(cfg)
    moved = tmp_path / "elsewhere" / "my-run"
    moved.parent.mkdir()
    shutil.move(str(work / "runs" / "run"), moved)
    other = tmp_path / "other-cwd"
    other.mkdir()
    image = sorted((work / "Data" / "valid").glob("*.jpg"))[0]
    done = _cli("predict", "--run", str(moved), str(image), "--generate.max_new_tokens", "8", cwd=other)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["image"] == str(image)


def test_predict_exit_code_counts_unreadable_inputs(sample_data, tiny_dir, tmp_path):
    run = api.train(build_config(None, tiny_overrides(sample_data, tiny_dir, tmp_path, **{"train.max_steps": 1})))
    (tmp_path / "not-an-image.jpg").write_bytes(b"text")
    done = _cli("predict", "--run", str(run), str(tmp_path / "missing.jpg"), str(tmp_path / "not-an-image.jpg"),
                str(tmp_path))
    assert done.returncode == 1
    assert "3 of 3 input(s) could not be read" in done.stderr
    errors = [json.loads(block)["error"] for block in done.stdout.replace("}\n{", "}\0{").split("\0")]
    assert errors == [f"{tmp_path / 'missing.jpg'} [image]: file not found",
                      f"{tmp_path / 'not-an-image.jpg'} [image]: not a readable image (not a format PIL can identify: "
                      "JPEG, PNG, TIFF, WebP, BMP, GIF, ...)",
                      f"{tmp_path} [image]: is a folder, not an image or PDF file"]
    assert "--input FOLDER --output" in done.stderr  # the way to extract a folder


def test_version_and_meaningful_suggestions(capsys):
    from qwenvl_tune.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("qwenvl-tune ")
    for typed, meant in (("--train.learning_rate", "train.lr"), ("--train.epochs", "train.max_epochs"),
                         ("--lora.rank", "lora.r")):
        with pytest.raises(SystemExit):
            main(["train", typed, "1"])
        assert f"did you mean '{meant}'" in capsys.readouterr().err


def test_quiet_output_drops_bitsandbytes_cpu_kernel_chatter_and_verbose_keeps_it():
    # bitsandbytes (imported by PEFT for any method) warns on AVX512-BF16 CPUs that a hub kernel is missing
    probe = ("import logging, sys; from qwenvl_tune import cli\n"
             "if sys.argv[1] == 'quiet': cli._quiet()\n"
             "import peft, bitsandbytes\n"
             "print(logging.getLogger('bitsandbytes.backends.cpu.ops').isEnabledFor(logging.WARNING))")
    shown = {mode: subprocess.run([sys.executable, "-c", probe, mode], env=ENV, capture_output=True, text=True,
                                  timeout=120).stdout.strip() for mode in ("quiet", "verbose")}
    assert shown == {"quiet": "False", "verbose": "True"}


@pytest.mark.parametrize("argv", [["evaluate", "{run}"], ["export", "{run}", "--out", "x"], ["serve", "{run}"],
                                  ["predict", "{run}", "page.png"], ["--verbose", "evaluate", "{run}", "--split", "test"]])
def test_a_run_folder_without_run_flag_gets_the_corrected_command(tmp_path, capsys, argv):
    from qwenvl_tune.cli import main

    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("data: {}\n")
    argv = [a.format(run=run) for a in argv]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    fixed = [a if a != str(run) else f"--run {run}" for a in argv]
    assert f"a run folder is named with --run: qwenvl-tune {' '.join(fixed)}" in capsys.readouterr().err


def test_a_folder_that_is_no_run_still_gets_argparse_s_own_message(tmp_path, capsys):
    from qwenvl_tune.cli import main

    with pytest.raises(SystemExit):
        main(["evaluate", str(tmp_path)])
    assert "the following arguments are required: --run" in capsys.readouterr().err
