"""The embedded default: `qwenvl-tune demo` runs the whole loop on CPU and prints the metrics table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_command_end_to_end(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-m", "qwenvl_tune.cli", "demo", "--out", str(tmp_path / "demo")],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "=== validation metrics (tiny model, CPU) ===" in out
    table = out.split("=== validation metrics (tiny model, CPU) ===")[1].split("===")[0]
    header = table.strip().splitlines()[0].split()
    assert header == ["metric", "finetuned", "base"]
    rows = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in table.strip().splitlines()[2:]
            if line.strip()}
    for metric in ("edit_distance", "json_valid", "field_f1", "ted_accuracy", "samples"):
        assert metric in rows, metric
    assert rows["samples"] == [6.0, 6.0]
    # the fine-tuned tiny model learnt the answer format; the random base model did not
    assert rows["json_valid"][0] > rows["json_valid"][1]
    assert rows["edit_distance"][0] < rows["edit_distance"][1]
    run = tmp_path / "demo" / "runs" / "demo"
    for name in ("config.yaml", "answer_schema.json", "best/COMPLETE", "eval/valid/report.html"):
        assert (run / name).exists(), name
