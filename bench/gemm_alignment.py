"""GPU time of the vision tower's MLP products at Qwen2.5-VL's width (3420) and padded to 3424.

    python bench/gemm_alignment.py [--out FILE]

Qwen2.5-VL's vision MLP is 1280 -> 3420 -> 1280. A row of 3420 bf16 values is 6,840 bytes, not a
multiple of 16, so the product's output (gate/up) or input (down) cannot use Hopper's TMA kernels,
which need 16-byte-aligned rows; the profile of a training step shows these products on sm80 cutlass
kernels. This times them as the tower runs them (one batch of two documents: ~9,900 patches, with
bias, bf16, no autograd since the tower is frozen) at 3420 and at 3424 (zero-padded, same result).
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import torch
import torch.nn.functional as F


def gpu_ms(fn, reps: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def kernels(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted({e.key[:90] for e in prof.key_averages() if e.device_type.name == "CUDA"})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=9920)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    m, hidden = args.tokens, 1280
    x = torch.randn(m, hidden, device=dev, dtype=dt)
    out: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": m, "rows": {}}
    for width in (3420, 3424, 3456):
        w_in = torch.randn(width, hidden, device=dev, dtype=dt) * 0.02
        b_in = torch.randn(width, device=dev, dtype=dt)
        w_out = torch.randn(hidden, width, device=dev, dtype=dt) * 0.02
        b_out = torch.randn(hidden, device=dev, dtype=dt)
        h = torch.randn(m, width, device=dev, dtype=dt)
        up = partial(F.linear, x, w_in, b_in)
        down = partial(F.linear, h, w_out, b_out)

        def mlp(w_in=w_in, b_in=b_in, w_out=w_out, b_out=b_out):
            return F.linear(F.silu(F.linear(x, w_in, b_in)) * F.linear(x, w_in, b_in), w_out, b_out)

        with torch.no_grad():
            row = {"gate_or_up_ms": gpu_ms(up), "down_ms": gpu_ms(down), "mlp_ms": gpu_ms(mlp),
                   "up_kernels": kernels(up), "down_kernels": kernels(down)}
        flops = 2 * m * hidden * width
        row["gate_or_up_tflops"] = flops / row["gate_or_up_ms"] / 1e9
        row["down_tflops"] = flops / row["down_ms"] / 1e9
        out["rows"][width] = row
        print(f"width {width}: up {row['gate_or_up_ms']:.3f} ms ({row['gate_or_up_tflops']:.0f} TFLOP/s), "
              f"down {row['down_ms']:.3f} ms ({row['down_tflops']:.0f}), whole MLP {row['mlp_ms']:.3f} ms; "
              f"kernels {row['up_kernels']} / {row['down_kernels']}", flush=True)
    base, pad = out["rows"][3420]["mlp_ms"], out["rows"][3424]["mlp_ms"]
    out["mlp_speedup_3424_over_3420"] = base / pad
    print(f"MLP 3420 -> 3424: {base / pad:.2f}x faster")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
