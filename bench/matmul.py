"""The machine's matrix-product rate (GFLOP/s) in float32 and bfloat16: the denominator of MFU.

A large square product (2*n^3 FLOPs), a warm-up, then the best of `--reps` timed products, with the torch
intra-op thread count the training runs use (torch's default: all cores, unless --threads). On CUDA the
products are timed with synchronisation. Prints one JSON line: {"float32": GFLOP/s, "bfloat16": GFLOP/s, ...}.

The product is `F.linear(x, w)` (x @ w.T), the op every nn.Linear of a model runs, so MFU is measured against
the rate training can reach. `torch.matmul` is reported too (`matmul_float32`, `matmul_bfloat16`): on a CPU
without native bf16 the two differ ~10x in bf16 (AVX2 EPYC: linear 7-15, matmul 0.7-1.2 GFLOP/s).

The size is capped per dtype so that one product takes at most about --max-seconds: a CPU without native
bf16 instructions (AVX2 only, e.g. some AMD EPYC VMs) multiplies bf16 matrices ~100x slower than float32,
and a 2048^3 bf16 product would take minutes there. `cpu_flags` in the output says what the CPU offers.

    python bench/matmul.py [--n 2048] [--reps 5] [--device cpu|cuda] [--threads N] [--max-seconds 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def matmul_rate(dtype: torch.dtype, n: int, reps: int, device: str, op: str = "linear") -> float:
    """Best-of-`reps` GFLOP/s of an (n x n) x (n x n) product in `dtype` on `device` (F.linear or matmul)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    inner = 10 if device.startswith("cuda") else 1  # GPU products are short: time several per sample
    product = torch.nn.functional.linear if op == "linear" else torch.matmul
    product(a, b)
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            product(a, b)
        sync()
        best = min(best, (time.perf_counter() - t0) / inner)
    return 2.0 * n ** 3 / best / 1e9


def affordable_size(dtype: torch.dtype, n_max: int, device: str, max_seconds: float, op: str) -> int:
    """The largest power-of-two-ish n <= n_max whose product takes about max_seconds or less."""
    n = 256
    while n < n_max:
        rate = matmul_rate(dtype, n, 1, device, op) * 1e9
        if 2.0 * (2 * n) ** 3 / rate > max_seconds:
            break
        n *= 2
    return min(n, n_max)


def cpu_flags() -> list[str]:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return []
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return sorted(f for f in line.split() if f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile",
                                                   "avx512_vnni", "avx_vnni"))


def measure(n: int = 2048, reps: int = 5, device: str = "cpu", threads: int | None = None,
            max_seconds: float = 2.0) -> dict:
    if threads:
        torch.set_num_threads(threads)
    out = {"device": device, "threads": torch.get_num_threads(), "reps": reps}
    for op, prefix in (("linear", ""), ("matmul", "matmul_")):
        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            size = affordable_size(dtype, n, device, max_seconds, op)
            out[prefix + name] = round(matmul_rate(dtype, size, reps, device, op), 1)
            out[f"n_{prefix}{name}"] = size
    if device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name()
    else:
        out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        out["cpu_flags"] = cpu_flags()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=None, help="matrix size (default 2048 on CPU, 8192 on CUDA)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-seconds", type=float, default=2.0, help="cap on one product's time (sets n per dtype)")
    args = ap.parse_args(argv)
    n = args.n or (8192 if args.device.startswith("cuda") else 2048)
    print(json.dumps(measure(n, args.reps, args.device, args.threads, args.max_seconds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
