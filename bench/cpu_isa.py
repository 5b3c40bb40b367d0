"""The CPU backend's three kernel builds side by side (POSATTN_CPU_ISA is read at each call):
fp32 forward, B=1, H=8, D=64, against torch SDPA, in one process.

    python bench/cpu_isa.py [--n 2048] [--reps 7]
"""
import argparse
import os
import time

import torch
import torch.nn.functional as F

import posattn
from _common import machine


def median_ms(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[reps // 2] * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    q, k, v = (torch.randn(1, 8, args.n, 64) for _ in range(3))
    model, cores = machine()
    print(f"{model}, {cores} cores, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"fp32 forward B=1 H=8 N={args.n} D=64, median of {args.reps}")
    sdpa = median_ms(lambda: F.scaled_dot_product_attention(q, k, v), args.reps)
    print(f"  {'sdpa':<8} {sdpa:8.1f} ms")
    for isa in ("avx512", "avx2", "generic"):
        os.environ["POSATTN_CPU_ISA"] = isa
        try:
            ms = median_ms(lambda: posattn.attention(q, k, v, backend="cpu"), args.reps)
        except RuntimeError as e:  # the CPU lacks this instruction set
            print(f"  {isa:<8} n/a ({str(e).splitlines()[0][:80]})")
            continue
        print(f"  {isa:<8} {ms:8.1f} ms  ({sdpa / ms:.2f}x sdpa)")
    os.environ.pop("POSATTN_CPU_ISA")


if __name__ == "__main__":
    main()
