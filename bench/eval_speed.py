"""How long evaluating 1,000 stored predictions takes on CPU, with no model (`evaluate --from-predictions`).

    PYTHONPATH=src python bench/eval_speed.py --rows 1000 --out bench/out

Predictions are realistic manifests with typical model errors (wrong, missing and extra fields, reordered
products, a few truncated outputs). Times the metrics alone and the whole set of outputs (predictions.jsonl,
metrics.json, fields.csv, chart and the HTML report with a thumbnail per sample).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path


def perturb(doc: dict, rng: random.Random) -> str:
    d = copy.deepcopy(doc)
    r = rng.random()
    if r < 0.3:
        d["dock"] = "D99"
    if 0.2 < r < 0.4:
        d.pop("page_number", None)
    if 0.35 < r < 0.5 and len(d["products"]) > 1:
        d["products"].reverse()
    if 0.45 < r < 0.55:
        d["extra_note"] = "n/a"
    text = json.dumps(d, ensure_ascii=False)
    if r > 0.95:
        text = text[: len(text) // 2]  # cut off
    return text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args()
    from qwenvl_tune.data.synthetic import make_manifest, render_manifest
    from qwenvl_tune.evaluation.report import score_rows, write_outputs

    rng = random.Random(0)
    tmp = Path(tempfile.mkdtemp())
    rows = []
    for i in range(args.rows):
        doc = make_manifest(rng)
        img = tmp / f"{i}.jpg"
        if i < 50:
            render_manifest(doc, rng, 425, 550).save(img, quality=85)
        else:  # reuse rendered pages: the timing is about scoring and writing, not rendering
            img = tmp / f"{i % 50}.jpg"
        raw = perturb(doc, rng)
        rows.append({"id": f"valid:{i + 1}", "image": str(img), "gold": doc,
                     "finetuned": {"raw": raw, "truncated": len(raw) < 200}})
    options = {"list_matching": "unordered", "casefold": False, "whitespace": True, "numeric": False}
    res = {"rows": args.rows, "cpus": os.cpu_count(), "python": platform.python_version(), "timings_s": {}}
    for label, fn in (("metrics only (unordered lists)", lambda: score_rows(rows, options)),
                      ("metrics only (positional lists)", lambda: score_rows(rows, {**options, "list_matching": "position"})),
                      ("all outputs incl. HTML report", lambda: write_outputs(tmp / "eval", "bench", rows, options))):
        t = time.perf_counter()
        fn()
        res["timings_s"][label] = round(time.perf_counter() - t, 2)
        print(f"{label}: {res['timings_s'][label]:.2f}s for {args.rows} predictions")
    res["report_mb"] = round((tmp / "eval" / "report.html").stat().st_size / 2**20, 1)
    files = list((tmp / "eval" / "report_files").glob("*")) if (tmp / "eval" / "report_files").is_dir() else []
    res["report_files_mb"] = round(sum(f.stat().st_size for f in files) / 2**20, 1)  # thumbnails beside a large report
    # rows for bench/results.py --add: one per timing, the report's sizes with the full run
    res.update(bench="eval_speed", env={"cpus": res["cpus"], "gpu": f"cpu ({res['cpus']} cores)", "python": res["python"]},
               runs=[{"name": label, "seconds": t, "predictions": args.rows,
                      **({"report_mb": res["report_mb"], "report_files_mb": res["report_files_mb"]}
                         if "report" in label else {})} for label, t in res["timings_s"].items()])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_speed.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
