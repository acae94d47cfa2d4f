"""Bulk extraction killed halfway and restarted: each input must be written exactly once.

    PYTHONPATH=src python bench/bulk_restart.py --run RUN_DIR --n 1000 --devices 2 --out $OUT   # 2 GPUs
    PYTHONPATH=src python bench/bulk_restart.py --run RUN_DIR --n 40 --devices 2                # CPU smoke test

Writes ``n`` inputs (rendered manifests under distinct file names, plus a few unreadable files),
starts the real ``qwenvl-tune predict --input ... --output ... --devices N`` command, SIGKILLs it
and all its workers once about half the inputs are written, starts the same command again, and
checks the output: one line per input, no input twice, unreadable files as error lines.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from _env import env_info

ROOT = Path(__file__).resolve().parents[1]


def make_inputs(folder: Path, n: int, bad: int, distinct: int = 40) -> list[Path]:
    from qwenvl_tune.data.synthetic import write_dataset

    src = write_dataset(folder.parent / "bulk-src", n_train=distinct, n_valid=0, seed=1) / "train"
    images = sorted(src.glob("*.jpg"))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n - bad):
        dst = folder / f"doc{i:05d}.jpg"
        shutil.copyfile(images[i % len(images)], dst)
        paths.append(dst)
    for i in range(bad):
        dst = folder / f"broken{i:03d}.jpg"
        dst.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" if i % 2 else b"")
        paths.append(dst)
    return paths


def lines(out: Path) -> int:
    return out.read_bytes().count(b"\n") if out.exists() else 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--bad", type=int, default=10)
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--kill-at", type=float, default=0.5)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    args = ap.parse_args()

    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"bulk-bench-{os.getpid()}"
    inputs = make_inputs(work / "inputs", args.n, args.bad)
    out = work / "out.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "qwenvl_tune.cli", "predict", "--run", args.run, "--input", str(work / "inputs"),
           "--output", str(out), "--devices", str(args.devices), "--batch-size", str(args.batch_size)]

    t0 = time.perf_counter()
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    target = int(args.n * args.kill_at)
    while lines(out) < target and first.poll() is None:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # the launcher and every worker, as an OOM killer or scheduler would
    first.wait()
    killed_after = time.perf_counter() - t0
    raw = out.read_bytes()
    at_kill = {"lines": raw.count(b"\n"), "ends_mid_line": bool(raw) and not raw.endswith(b"\n"),
               "seconds": round(killed_after, 1), "exit": first.returncode}
    print(f"killed after {killed_after:.1f}s with {at_kill['lines']} lines written "
          f"(mid-line: {at_kill['ends_mid_line']})", flush=True)

    t1 = time.perf_counter()
    second = subprocess.run(cmd, env=env, capture_output=True, text=True)
    restart_s = time.perf_counter() - t1
    if second.returncode != 0:
        print(second.stdout[-3000:], second.stderr[-5000:])
        raise SystemExit(f"restart failed with exit code {second.returncode}")
    print(second.stdout.strip().splitlines()[-1])

    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    names = [r["input"] for r in rows]
    expected = {str(p) for p in inputs}
    errors = [r for r in rows if "error" in r]
    result = {
        "inputs": args.n, "unreadable_inputs": args.bad, "devices": args.devices, "batch_size": args.batch_size,
        "at_kill": at_kill, "restart_seconds": round(restart_s, 1),
        "restart_docs_per_s_incl_model_load": round((args.n - at_kill["lines"]) / restart_s, 2),
        "output_lines": len(rows), "distinct_inputs": len(set(names)), "error_lines": len(errors),
        "all_inputs_once": len(rows) == len(set(names)) == args.n and set(names) == expected,
        "restart_stdout": second.stdout.strip().splitlines()[-1],
    }
    result["env"] = env_info()
    print(json.dumps(result, indent=2))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"bulk_restart_{args.n}.json").write_text(json.dumps(result, indent=2))
    if not result["all_inputs_once"] or len(errors) != args.bad:
        raise SystemExit("FAILED: inputs missing, written twice, or unreadable files not recorded as errors")


if __name__ == "__main__":
    main()
