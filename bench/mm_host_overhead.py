"""Host (CPU) time per matrix-multiply launch on the GPU, by BLAS library and shape repetition.

    python bench/mm_host_overhead.py

The batch-1 training step is host-bound and ``aten::mm`` has the largest self-CPU time in its
profile. This asks whether that cost comes from the library choosing a kernel for every new shape:
small products (the GPU finishes each in microseconds, so the host is the bottleneck), timed with
M fixed, and with M changing on every call as document lengths do.
"""

from __future__ import annotations

import json
import time

import torch


def per_call_us(m_values: list[int], k: int, n: int, bias: bool) -> float:
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16) if bias else None
    xs = {m: torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for m in set(m_values)}
    for m in m_values[:50]:
        torch.nn.functional.linear(xs[m], w, b)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for m in m_values:
        torch.nn.functional.linear(xs[m], w, b)
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    return host / len(m_values) * 1e6


def main() -> None:
    calls = 2000
    fixed = [1792] * calls
    varying = [1500 + (i * 37) % 800 for i in range(calls)]  # 800 distinct lengths, each seen ~2-3 times
    out = {}
    for lib in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(lib)
        for bias in (False, True):
            for name, ms in (("fixed_m", fixed), ("varying_m", varying)):
                key = f"{lib}/{'addmm' if bias else 'mm'}/{name}"
                out[key] = round(per_call_us(ms, 256, 256, bias), 1)
                print(f"{key}: {out[key]} us host per call", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
