"""The embedded default: sample manifests (a quarter over two pages, a quarter as PDFs) + a tiny Qwen2.5-VL,
trained, evaluated and used on CPU.

    qwenvl-tune demo          # or: make demo
"""

from __future__ import annotations

import json
import shutil
import time
from importlib import resources
from pathlib import Path

from .config import build_config


def demo_config_path() -> Path:
    return Path(str(resources.files("qwenvl_tune") / "assets" / "demo.yaml"))


def run_demo(out: str | Path = "demo_output") -> dict:
    from .api import evaluate, predict, train
    from .evaluation.report import format_metrics
    from .data.synthetic import write_dataset
    from .modeling.tiny import build_tiny_checkpoint

    out = Path(out)
    t0 = time.perf_counter()
    data = out / "data"
    if not (data / "train" / "annotations.jsonl").exists():
        print(f"writing sample manifests to {data}")
        write_dataset(data, n_train=32, n_valid=6, n_test=0, seed=0, size=(425, 550), multipage=0.25, pdf=0.25)
    model_dir = out / "tiny-qwen2.5-vl"
    if not (model_dir / "config.json").exists():
        print(f"building a tiny random-init Qwen2.5-VL checkpoint in {model_dir}")
        build_tiny_checkpoint(model_dir, "qwen2_5_vl", hidden=128, layers=2)
    config = build_config(demo_config_path(), {"data.path": str(data), "model.name_or_path": str(model_dir),
                                                "run.output_dir": str(out / "runs")})
    previous = Path(config.run.output_dir) / config.run.name
    if previous.exists():
        # the demo's own folder: a second `make demo` starts over instead of refusing
        print(f"replacing the previous demo run in {previous}")
        shutil.rmtree(previous)
    run = train(config)
    results = evaluate(run, "valid", compare_base=True, compare_constrained=True)
    pdfs = sorted((data / "valid").glob("*.pdf"))
    sample = pdfs[0] if pdfs else sorted((data / "valid").glob("*.jpg"))[0]
    row = predict(run, [sample])[0]
    print("\n=== validation metrics (tiny model, CPU) ===")
    print(format_metrics(results))
    print("base: the random-init model before training, decoded the same way as the fine-tuned one.")
    print(f"\n=== predict {sample.name} ({row.get('pages', '?')} page(s)) ===\n{row.get('output', row.get('error'))}")
    rows = [json.loads(line) for line in (data / "valid" / "annotations.jsonl").read_text().splitlines()]
    gold = next(r["suffix"] for r in rows if sample.name in (r.get("image"), *r.get("images", [])))
    print(f"\ngold: {json.dumps(gold, ensure_ascii=False)}")
    print(f"\nrun folder: {run}  ({time.perf_counter() - t0:.0f} s)")
    return results
