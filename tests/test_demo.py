"""The embedded default: `qwenvl-tune demo` runs the whole loop on CPU and prints the metrics table."""

from __future__ import annotations

from conftest import ROOT

import os
import subprocess
import sys
from pathlib import Path
import pytest

pytestmark = pytest.mark.slow  # subprocesses and trained runs: tens of seconds on 2 CPU cores



def test_demo_command_end_to_end(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-m", "qwenvl_tune.cli", "demo", "--out", str(tmp_path / "demo")],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "=== validation metrics (tiny model, CPU) ===" in out
    table = out.split("=== validation metrics (tiny model, CPU) ===")[1].split("===")[0]
    header = table.strip().splitlines()[0].split()
    assert header == ["metric", "finetuned", "unconstrained", "base"]
    lines = table.strip().splitlines()[2:]
    end = next(i for i, line in enumerate(lines) if line.startswith("samples")) + 1
    rows = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in lines[:end]}
    for metric in ("edit_distance", "json_valid", "field_f1", "ted_accuracy", "samples"):
        assert metric in rows, metric
    assert rows["samples"] == [6.0, 6.0, 6.0]
    finetuned, unconstrained, base = zip(*(rows[m] for m in ("json_valid", "edit_distance")))
    assert finetuned[0] == 1.0  # schema-constrained decoding: every output parses
    # trained, even unconstrained, the tiny model is closer to the answers than the random base model
    assert unconstrained[1] < base[1] and unconstrained[0] >= base[0]
    run = tmp_path / "demo" / "runs" / "demo"
    for name in ("config.yaml", "answer_schema.json", "best/COMPLETE", "eval/valid/report.html"):
        assert (run / name).exists(), name
