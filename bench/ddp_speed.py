"""Data-parallel scaling of the real training command: 1 GPU vs 2 GPUs, same global batch, same data.

    PYTHONPATH=src python bench/ddp_speed.py --size 3b --steps 24 --out $OUT       # on a 2-GPU machine
    PYTHONPATH=src python bench/ddp_speed.py --size tiny --steps 4 --cpu             # CPU smoke test (gloo)

Builds a random-init Qwen2.5-VL at the published size with the project's small test tokenizer (token
ids stay below the real vocabulary size, so the arithmetic is the real model's), renders sample
manifests at 1700x2200, then runs `qwenvl-tune train` twice: devices=1 with batch 2, and devices=2
(DDP) with batch 1 each. Reports samples/s (from the run's own log, all ranks) and the per-step
losses of both runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIMS = {
    "3b": dict(hidden=2048, inter=11008, layers=36, heads=16, kv=2, vdepth=32, vhidden=1280, vinter=3420, vheads=16,
               full=[7, 15, 23, 31], section=[16, 24, 24]),
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
    text = dict(vocab_size=151936, hidden_size=d["hidden"], intermediate_size=d["inter"], num_hidden_layers=d["layers"],
                num_attention_heads=d["heads"], num_key_value_heads=d["kv"], tie_word_embeddings=True,
                rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768,
                rope_scaling={"type": "mrope", "mrope_section": d["section"]}, bos_token_id=ids["bos_token_id"],
                eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"])
    vision = dict(depth=d["vdepth"], hidden_size=d["vhidden"], intermediate_size=d["vinter"], num_heads=d["vheads"],
                  out_hidden_size=d["hidden"], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  window_size=112, fullatt_block_indexes=d["full"], in_channels=3)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.bfloat16 if dev == "cuda" else torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=[ids["eos_token_id"]], pad_token_id=ids["pad_token_id"])
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


def losses(run: Path) -> tuple[dict[int, float], float]:
    loss, sps = {}, 0.0
    for f in run.glob("logs/**/metrics.csv"):
        for row in csv.DictReader(open(f)):
            if row.get("train/loss"):
                loss[int(row["step"])] = float(row["train/loss"])
            if row.get("samples_per_s"):
                sps = float(row["samples_per_s"])
    return loss, sps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="3b", choices=list(DIMS))
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--docs", type=int, default=96)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--runs", default="1_device_batch2,2_devices_batch1",
                    help="which of 1_device_batch2, 2_devices_batch1, 2_devices_batch2 to run")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
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
    results = {"size": args.size, "steps": args.steps, "runs": {}}
    plans = {"1_device_batch2": (1, 2), "2_devices_batch1": (2, 1), "2_devices_batch2": (2, 2)}
    for name in args.runs.split(","):
        devices, batch = plans[name]
        run_name = f"{name}-{int(time.time())}"
        cmd = [sys.executable, "-m", "qwenvl_tune.cli", "train", "--data", str(data), "--model", str(ckpt),
               "--method", "lora", f"--train.devices={devices}", f"--train.batch_size={batch}",
               "--train.accumulate_grad_batches=1", f"--train.max_steps={args.steps}", "--train.warmup_steps=2",
               "--train.check_val_every_n_epoch=1000", "--generate.max_new_tokens=4", "--data.num_workers=4",
               "--data.max_length=8192", f"--train.strategy={'ddp' if devices > 1 else 'auto'}",
               "--train.log_every_n_steps=1", "--lora.dropout=0", f"--run.output_dir={work / 'runs'}",
               f"--run.name={run_name}"]
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
        loss, sps = losses(run)
        results["runs"][name] = {"devices": devices, "batch_per_device": batch, "samples_per_s": sps,
                                 "wall_s": round(wall, 1), "loss": loss}
        print(f"{name}: {sps:.2f} samples/s, wall {wall:.0f}s, losses {[round(loss[k], 4) for k in sorted(loss)]}",
              flush=True)
    r = results["runs"]
    if all(k in r and "samples_per_s" in r[k] for k in ("1_device_batch2", "2_devices_batch1")):
        a, b = r["1_device_batch2"], r["2_devices_batch1"]
        results["speedup"] = b["samples_per_s"] / a["samples_per_s"]
        common = sorted(set(a["loss"]) & set(b["loss"]))
        results["max_loss_diff"] = max(abs(a["loss"][k] - b["loss"][k]) for k in common)
        print(f"speedup {results['speedup']:.2f}x, max per-step loss difference {results['max_loss_diff']:.4g}")
    if all(k in r and "samples_per_s" in r[k] for k in ("1_device_batch2", "2_devices_batch2")):
        results["speedup_equal_per_device_batch"] = r["2_devices_batch2"]["samples_per_s"] / r["1_device_batch2"]["samples_per_s"]
        print(f"2 devices x batch 2 vs 1 device x batch 2: {results['speedup_equal_per_device_batch']:.2f}x")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"ddp_speed_{args.size}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
