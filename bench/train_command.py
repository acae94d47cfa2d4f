"""The real `qwenvl-tune train` command over a whole run, beside the guide as written on the same documents.

    PYTHONPATH=src python bench/train_command.py --size 3b --docs 128 --recipes defaults --guide --out $OUT
    PYTHONPATH=src python bench/train_command.py --size tiny --docs 8 --recipes defaults --cpu   # CPU smoke test

What a user runs: `qwenvl-tune train --data DIR --model CKPT` with the settings a recipe names (none for
``defaults``: batch 2, 4 micro-batches a step, 10 epochs, the image feature cache, compiled layers on a GPU),
in a process of its own, on rendered manifests at 1700x2200 (~1,240 image tokens a page at the default
max_pixels). The figures come from the run's own metrics.csv, as the console computes them:

- ``samples_per_s``: every training sample after the first optimizer step, over the wall time from the end of
  that step to the last one (the first step's compilation is left out, every later compilation and every
  epoch-end checkpoint is in); the whole run's rate, first epoch and later ones together;
- ``epoch_samples_per_s``: each epoch's documents over the time between its last step and the one before;
- ``peak_gib``: the largest ``gpu_peak_gib`` the run logged (PyTorch's allocator peak, as the other rows).

Validation runs once, after the last epoch (``train.check_val_every_n_epoch`` = the epochs), outside the timed
span; the guide's rows leave validation out too. The guide as written (and its bf16 LoRA, and TRL, when asked)
run through bench/train_speed.py ``--data`` on the same documents, each in its own process, timed in steady
state after a warm-up: a rate that ignores their start-up, which favours them.

The checkpoint is the published size at random init with the project's small test tokenizer (token ids below
the real vocabulary, so the arithmetic is the real model's); it is built once into --work and reused.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from _env import env_info
from ddp_speed import build_checkpoint

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
# recipe name -> (description, the settings it gives `train` beyond the defaults)
RECIPES = {
    "defaults": ("`qwenvl-tune train` with its defaults (lora, batch 2, 4 micro-batches a step, 10 epochs)", []),
    # the loader A/B: data.num_workers=auto (8 on a 16-CPU machine) against the default 2 workers; a page's pixels take
    # ~110-136 ms of a worker's CPU in the first epoch on a slow CPU (row command_workers2 of 2026-12-03 was this A/B
    # the other way round, when auto was briefly the default)
    "workers_auto": ("`qwenvl-tune train --data.num_workers auto`, its other defaults", ["--data.num_workers", "auto"]),
    "qlora": ("`qwenvl-tune train --method qlora`, its other defaults", ["--method", "qlora"]),
    "all_linear": ("`qwenvl-tune train` with LoRA on every linear layer of the language model",
                   ["--lora.target_modules", "all-linear"]),
    "auto": ("`qwenvl-tune train --train.batch_size auto`", ["--train.batch_size", "auto"]),
    # an 80 GB card's budget on a larger one: the default share (0.85) of 80 GB, as a share of this card
    "auto_80gb": ("`qwenvl-tune train --train.batch_size auto`, an 80 GB card's memory budget", ["--train.batch_size", "auto"]),
}


def epochs_from_metrics(run: Path, docs: int, first_step_samples: int) -> dict:
    """The run's figures from its metrics.csv (see the module docstring). The console's clock starts at the end
    of the first optimizer step, so the first epoch's span holds ``docs - first_step_samples`` samples."""
    rows = []
    for f in sorted(run.glob("logs/**/metrics.csv")):
        rows += [r for r in csv.DictReader(open(f)) if r.get("train/elapsed_s")]
    if not rows:
        raise RuntimeError(f"no logged steps in {run}/logs")
    rows.sort(key=lambda r: int(r["step"]))
    last_of_epoch: dict[int, float] = {}
    for r in rows:
        last_of_epoch[int(float(r["epoch"]))] = float(r["train/elapsed_s"])
    spans, before = [], 0.0
    for e in sorted(last_of_epoch):
        spans.append(last_of_epoch[e] - before)
        before = last_of_epoch[e]
    counts = [docs - first_step_samples] + [docs] * (len(spans) - 1)
    peaks = [float(r["gpu_peak_gib"]) for r in rows if r.get("gpu_peak_gib")]
    return {"samples_per_s": float(rows[-1]["samples_per_s"]), "train_elapsed_s": float(rows[-1]["train/elapsed_s"]),
            "optimizer_steps": len(rows), "epochs": len(spans), "epoch_s": [round(x, 2) for x in spans],
            "epoch_samples_per_s": [round(n / x, 2) if x > 0 else None for n, x in zip(counts, spans)],
            "peak_gib": max(peaks) if peaks else 0.0}


# where a command's time goes: the first output line that marks the end of each phase (the console's own lines)
PHASES = {"data_checked": r"data valid ", "model_loaded": r"model .*trainable of", "first_logged_step": r"step \d+/",
          "validated": r"validation after step", "done": r"done: "}


def phases(text: str) -> dict:
    """Seconds from the command's start to each phase's marker line (see run_recipe's log format)."""
    out = {}
    for key, pattern in PHASES.items():
        m = re.search(r"^\[\s*([\d.]+)s\] " + pattern, text, re.M)
        if m:
            out[key] = float(m.group(1))
    return out


def run_recipe(name: str, args, ckpt: Path, data: Path, env: dict) -> dict:
    desc, extra = RECIPES[name]
    if name == "auto_80gb":
        import torch

        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        extra = extra + ["--train.auto_batch_memory", f"{0.85 * min(1.0, 80 / total):.4f}"]
    run_name = f"{name}-{int(time.time())}"
    cmd = [sys.executable, "-m", "qwenvl_tune.cli", "train", "--data", str(data), "--model", str(ckpt),
           f"--train.check_val_every_n_epoch={args.epochs}", f"--train.max_epochs={args.epochs}",
           f"--generate.max_new_tokens={args.max_new_tokens}", f"--run.output_dir={args.work / 'runs'}",
           f"--run.name={run_name}", "--train.log_every_n_steps=8"] + extra
    if args.cpu:
        cmd += ["--train.accelerator=cpu", "--model.dtype=float32", "--train.precision=32-true"]
    log = Path(args.out) / f"log_command_{name}.txt"
    t0 = time.perf_counter()
    # each line of the command's output with the seconds since its start, so the log shows where the fixed
    # ~75 s of a 3B run go (imports and the data check, loading, the first step's compilation, validation)
    with open(log, "w") as fh, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                text=True, errors="replace") as proc:
        fh.write(" ".join(cmd) + "\n")
        for line in proc.stdout:
            fh.write(f"[{time.perf_counter() - t0:7.1f}s] {line}")
            fh.flush()
        rc = proc.wait()
    wall = time.perf_counter() - t0
    settings = [a for a in cmd[cmd.index(str(ckpt)) + 1:] if not a.startswith("--run.")]
    row = {"name": f"command_{name}", "desc": desc, "step": "command", "settings": " ".join(settings),
           "command_wall_s": round(wall, 1), "docs": args.docs}
    if rc != 0:
        return {**row, "error": f"exit {rc}: " + log.read_text(errors="replace")[-800:]}
    text = log.read_text(errors="replace")
    chosen = re.search(r"train\.batch_size=auto: (\d+)", text)
    accum = re.search(r"(\d+) micro-batch\(es\) per optimizer step", text)
    batch = int(chosen.group(1)) if chosen else 2
    row["batch"], row["accumulate_grad_batches"] = batch, int(accum.group(1)) if accum else 4
    row["recompiles"] = len(re.findall(r"\[__recompiles\] Recompiling function", text))  # TORCH_LOGS=recompiles
    row["phases_s"] = phases(text)
    row.update(epochs_from_metrics(args.work / "runs" / run_name, args.docs, batch * row["accumulate_grad_batches"]))
    return row


def run_peer_rows(args, ckpt: Path, data: Path, env: dict) -> list[dict]:
    """The guide's rows (and TRL's) through train_speed.py on the same documents, each in its own process."""
    out = Path(args.out) / "peers"
    cmd = [sys.executable, str(HERE / "train_speed.py"), "--size", args.size, "--data", str(data), "--ckpt", str(ckpt),
           "--samples", str(args.docs), "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--variants", args.peers, "--isolate", "--no-numerics", "--out", str(out)]
    with open(Path(args.out) / "log_peers.txt", "w") as fh:
        subprocess.call(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    for f in out.glob("log_*.txt"):  # one folder up: the device tool returns files no deeper than that
        (Path(args.out) / f"peers_{f.name}").write_text(f.read_text(errors="replace"))
    try:
        d = json.loads((out / f"train_speed_{args.size}.json").read_text())
    except (OSError, ValueError):
        return [{"name": "peers", "desc": args.peers, "error": "no results; see log_peers.txt"}]
    return [{**r, "env_samples": {k: d["env"].get(k) for k in ("mean_seq", "mean_image_tokens", "mean_answer_tokens")}}
            for r in d["variants"]]


def missing_packages(recipes: list[str], peers: str) -> list[str]:
    """What this machine lacks for the chosen rows: each process would otherwise fail at its import, after the
    checkpoint was built (as a device call did on 2026-12-03, its wheels not installed)."""
    import importlib.util

    need = ["rapidfuzz", "edist"]  # the final validation's scores
    if "qlora" in recipes or "qlora" in peers:
        need.append("bitsandbytes")
    if "trl_" in peers:
        need += ["trl", "datasets"]
    if "liger" in peers:
        need.append("liger_kernel")
    return [name for name in need if importlib.util.find_spec(name) is None]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="3b", choices=["tiny", "3b", "7b"])
    ap.add_argument("--docs", type=int, default=128, help="training documents (the run's epoch)")
    ap.add_argument("--valid", type=int, default=4, help="validation documents (validated once, at the end)")
    ap.add_argument("--epochs", type=int, default=10, help="train.max_epochs (10 is the default)")
    ap.add_argument("--recipes", default="defaults", help=f"comma-separated, of {', '.join(RECIPES)}")
    ap.add_argument("--peers", default="guide_qlora_as_written,guide_lora_bf16",
                    help="train_speed.py variants to run on the same documents ('' for none)")
    ap.add_argument("--warmup", type=int, default=32, help="the peers' warm-up micro-batches")
    ap.add_argument("--steps", type=int, default=32, help="the peers' timed micro-batches")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="generate.max_new_tokens of the final validation")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "train-command-bench")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    args = ap.parse_args()
    unknown = [r for r in args.recipes.split(",") if r and r not in RECIPES]
    if unknown:
        ap.error(f"unknown recipes {unknown}; known: {', '.join(RECIPES)}")
    missing = missing_packages(args.recipes.split(","), args.peers)
    if missing:
        ap.error(f"not installed here: {', '.join(missing)} (carry their wheels; see bench/gpu_check.sh)")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    args.work = args.work / args.size
    ckpt, data = args.work / "model", args.work / f"data_{args.docs}"
    t0 = time.perf_counter()
    # the command needs the processor beside the weights (train_speed.py's checkpoint of the same path has none)
    if not ((ckpt / "config.json").exists() and (ckpt / "tokenizer_config.json").exists()):
        build_checkpoint(ckpt, args.size)
    if not (data / "train" / "annotations.jsonl").exists():
        from qwenvl_tune.data.synthetic import write_dataset

        size = (1700, 2200) if args.size != "tiny" else (300, 400)
        write_dataset(data, n_train=args.docs, n_valid=args.valid, seed=0, size=size)
    print(f"checkpoint and data ready in {time.perf_counter() - t0:.0f}s", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           # each recompilation and its reason in the command's log: later epochs' rates wander by a third
           # (2026-12-03), and a new shape's compilation inside an epoch is one suspect
           "TORCH_LOGS": os.environ.get("TORCH_LOGS", "recompiles")}
    results = {"bench": "train_speed", "env": {**env_info(), "size": args.size, "docs": args.docs,
                                               "epochs": args.epochs, "source": "bench/train_command.py"},
               "variants": []}
    out = Path(args.out) / f"train_command_{args.size}.json"
    for name in filter(None, args.recipes.split(",")):
        row = run_recipe(name, args, ckpt, data, env)
        print(json.dumps(row), flush=True)
        results["variants"].append(row)
        out.write_text(json.dumps(results, indent=2))  # after each, so a call cut short keeps the rows before
    if args.peers:
        results["variants"] += run_peer_rows(args, ckpt, data, env)
    base = next((r for r in results["variants"] if r["name"] == "guide_qlora_as_written" and "error" not in r), None)
    for r in results["variants"]:
        if base and "samples_per_s" in r:
            r["x_guide_as_written"] = round(r["samples_per_s"] / base["samples_per_s"], 2)
        print(f"{r['name']:32s} {r.get('samples_per_s', 0):7.2f} samples/s  peak {r.get('peak_gib', 0):5.1f} GiB  "
              f"x guide {r.get('x_guide_as_written', '')}  {r.get('epoch_samples_per_s', '')}  {r.get('error', '')[:200]}",
              flush=True)
    out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
