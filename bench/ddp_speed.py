"""Multi-GPU training with the real training command: scaling, loss curves and memory, same data.

    PYTHONPATH=src python bench/ddp_speed.py --size 3b --steps 40 --runs 1_device_batch2,2_devices_batch2 --out $OUT
    PYTHONPATH=src python bench/ddp_speed.py --size 7b --method full --strategy fsdp --runs 2_devices_batch1 --cleanup
    PYTHONPATH=src python bench/ddp_speed.py --size tiny --steps 4 --cpu             # CPU smoke test (gloo)

Builds a random-init Qwen2.5-VL at the published size with the project's small test tokenizer (token
ids stay below the real vocabulary size, so the arithmetic is the real model's), renders sample
manifests at 1700x2200, then runs `qwenvl-tune train` once per requested run (N devices x batch B).
Reports, from each run's own log: samples/s from the start, the steady-state samples/s (wall clock
between logged steps after the first --skip steps, all ranks), rank 0's peak GPU memory, and the
per-step losses; runs with the same global batch have their loss curves compared.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _env import env_info

ROOT = Path(__file__).resolve().parents[1]
DIMS = {
    "3b": dict(hidden=2048, inter=11008, layers=36, heads=16, kv=2, vdepth=32, vhidden=1280, vinter=3420, vheads=16,
               full=[7, 15, 23, 31], section=[16, 24, 24]),
    "7b": dict(hidden=3584, inter=18944, layers=28, heads=28, kv=4, vdepth=32, vhidden=1280, vinter=3420, vheads=16,
               full=[7, 15, 23, 31], section=[16, 24, 24], vocab=152064, tie=False),
    "tiny": dict(hidden=64, inter=128, layers=2, heads=4, kv=2, vdepth=2, vhidden=32, vinter=64, vheads=2, full=[1],
                 section=[2, 3, 3]),
}


def build_checkpoint(out: Path, size: str) -> Path:
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig, Qwen2_5_VLConfig

    from qwenvl_tune.modeling.tiny import _token_ids, build_processor

    d = DIMS[size]
    proc = build_processor("qwen2_5_vl", 256 * 28 * 28, 1280 * 28 * 28)
    ids = _token_ids(proc.tokenizer)
    tie = d.get("tie", True)
    text = dict(vocab_size=d.get("vocab", 151936), hidden_size=d["hidden"], intermediate_size=d["inter"], num_hidden_layers=d["layers"],
                num_attention_heads=d["heads"], num_key_value_heads=d["kv"], tie_word_embeddings=tie,
                rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768,
                rope_scaling={"type": "mrope", "mrope_section": d["section"]}, bos_token_id=ids["bos_token_id"],
                eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"])
    vision = dict(depth=d["vdepth"], hidden_size=d["vhidden"], intermediate_size=d["vinter"], num_heads=d["vheads"],
                  out_hidden_size=d["hidden"], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  window_size=112, fullatt_block_indexes=d["full"], in_channels=3)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **ids)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.bfloat16 if dev == "cuda" else torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=[ids["eos_token_id"]], pad_token_id=ids["pad_token_id"])
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


def losses(run: Path, skip: int = 5) -> tuple[dict[int, float], float, float | None, float | None]:
    """Per-step losses, the run's own cumulative samples/s, the steady-state step time (seconds per
    optimizer step after the first ``skip`` steps, from the logged wall clock) and rank 0's peak GiB."""
    loss, sps, elapsed, peak = {}, 0.0, {}, None
    for f in run.glob("logs/**/metrics.csv"):
        for row in csv.DictReader(open(f)):
            step = int(row["step"])
            if row.get("train/loss"):
                loss[step] = float(row["train/loss"])
            if row.get("samples_per_s"):
                sps = float(row["samples_per_s"])
            if row.get("train/elapsed_s"):
                elapsed[step] = float(row["train/elapsed_s"])
            if row.get("gpu_peak_gib"):
                peak = max(peak or 0.0, float(row["gpu_peak_gib"]))
    steps = sorted(k for k in elapsed if k >= skip)
    step_s = (elapsed[steps[-1]] - elapsed[steps[0]]) / (steps[-1] - steps[0]) if len(steps) > 1 else None
    return loss, sps, step_s, peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="3b", choices=list(DIMS))
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--docs", type=int, default=96)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--runs", default="1_device_batch2,2_devices_batch1",
                    help="comma-separated runs named N_device(s)_batchB, e.g. 1_device_batch2,2_devices_batch2")
    ap.add_argument("--method", default="lora", choices=["lora", "qlora", "full"])
    ap.add_argument("--strategy", default="ddp", help="strategy of the multi-device runs (ddp, fsdp)")
    ap.add_argument("--max-new-tokens", type=int, default=4, help="generate.max_new_tokens saved in the run")
    ap.add_argument("--set", action="append", default=[], help="extra key=value overrides for train, e.g. "
                    "model.gradient_checkpointing=true")
    ap.add_argument("--cleanup", action="store_true", help="delete each run folder once measured (large models)")
    ap.add_argument("--workers", type=int, default=4, help="data.num_workers per process")
    ap.add_argument("--skip", type=int, default=5, help="steps left out of the steady-state rate (start-up)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    args = ap.parse_args()
    from qwenvl_tune.data.synthetic import write_dataset

    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"ddp-bench-{args.size}"
    ckpt = work / "model"
    if not (ckpt / "config.json").exists():
        build_checkpoint(ckpt, args.size)
    data = work / "data"
    if not (data / "train" / "annotations.jsonl").exists():
        size = (1700, 2200) if args.size != "tiny" else (300, 400)
        write_dataset(data, n_train=args.docs, n_valid=2, seed=0, size=size)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
           "TOKENIZERS_PARALLELISM": "false"}
    results = {"size": args.size, "steps": args.steps, "method": args.method, "overrides": args.set, "runs": {}}
    for name in args.runs.split(","):
        devices, batch = int(name.split("_")[0]), int(name.rsplit("batch", 1)[1])
        run_name = f"{name}-{int(time.time())}"
        cmd = [sys.executable, "-m", "qwenvl_tune.cli", "train", "--data", str(data), "--model", str(ckpt),
               "--method", args.method, f"--train.devices={devices}", f"--train.batch_size={batch}",
               "--train.accumulate_grad_batches=1", f"--train.max_steps={args.steps}", "--train.warmup_steps=2",
               "--train.check_val_every_n_epoch=1000", f"--generate.max_new_tokens={args.max_new_tokens}", f"--data.num_workers={args.workers}",
               "--data.max_length=8192", f"--train.strategy={args.strategy if devices > 1 else 'auto'}",
               "--train.log_every_n_steps=1", "--lora.dropout=0", f"--run.output_dir={work / 'runs'}",
               f"--run.name={run_name}"] + [f"--{kv}" for kv in args.set]
        if args.cpu:
            cmd += ["--train.accelerator=cpu", "--model.dtype=float32", "--train.precision=32-true"]
        t = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        run = work / "runs" / run_name
        if done.returncode != 0:
            print(done.stdout[-3000:], done.stderr[-5000:])
            results["runs"][name] = {"error": done.stderr[-1500:]}
            continue
        loss, sps, step_s, peak = losses(run, args.skip)
        steady = devices * batch / step_s if step_s else None
        results["runs"][name] = {"devices": devices, "batch_per_device": batch, "strategy": args.strategy,
                                 "method": args.method, "run_dir": str(run), "samples_per_s": sps,
                                 "steady_samples_per_s": steady, "steady_step_s": step_s, "peak_gib_rank0": peak,
                                 "wall_s": round(wall, 1), "loss": loss}
        print(f"{name}: {sps:.2f} samples/s from the start, {steady or 0:.2f} steady (steps >= {args.skip}), "
              f"peak {peak} GiB, wall {wall:.0f}s, losses {[round(loss[k], 4) for k in sorted(loss)]}", flush=True)
        results["runs"][name]["saved"] = sorted(str(p.relative_to(run)) for p in run.glob("*/*.safetensors*"))
        if args.cleanup:
            shutil.rmtree(run, ignore_errors=True)
        save(results, args)  # after every run, so a run cut short by a time limit leaves the others
    compare(results, verbose=True)
    save(results, args)


def compare(results: dict, verbose: bool = False) -> None:
    """Steady-state ratios against the 1-device run, and loss curves of runs with the same global batch."""
    ok = {k: v for k, v in results["runs"].items() if v.get("steady_samples_per_s")}
    base = next((k for k in ok if k.startswith("1_")), None)
    for k, v in ok.items():
        if base and k != base:
            v["steady_speedup_vs_" + base] = v["steady_samples_per_s"] / ok[base]["steady_samples_per_s"]
            if verbose:
                print(f"{k} vs {base}: {v['steady_speedup_vs_' + base]:.2f}x steady-state samples/s")
    for a in ok:
        for b in ok:
            ga, gb = ok[a]["devices"] * ok[a]["batch_per_device"], ok[b]["devices"] * ok[b]["batch_per_device"]
            if a < b and ga == gb:
                common = sorted(set(ok[a]["loss"]) & set(ok[b]["loss"]))
                diff = max(abs(ok[a]["loss"][k] - ok[b]["loss"][k]) for k in common)
                results.setdefault("max_loss_diff", {})[f"{a}|{b}"] = diff
                if verbose:
                    print(f"same global batch {a} vs {b}: max per-step loss difference {diff:.4g} over {len(common)} steps")


def save(results: dict, args: argparse.Namespace) -> None:
    compare(results)  # also after each run, so a command cut short by a time limit keeps its ratios
    results["env"] = env_info()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"{args.strategy}_speed_{args.size}_{args.method}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
