"""The CPU backend's kernel paths side by side (POSATTN_CPU_ISA is read at each call): every
path this CPU runs (amx, avx512bf16, avx512, avx2, generic), forward and forward+backward, fp32
and bf16, B=1, H=8, D=64, against torch SDPA in the same dtype, in one process.

    python bench/cpu_isa.py [--n 2048] [--reps 7] [--dtypes float32,bfloat16]
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
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    model, cores = machine()
    isas = posattn.ops.cpu_isas()
    print(f"{model}, {cores} cores, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"B=1 H=8 N={args.n} D=64, median of {args.reps}; paths this CPU runs: {', '.join(isas)}")
    for dtype in args.dtypes.split(","):
        q, k, v = (torch.randn(1, 8, args.n, 64, dtype=getattr(torch, dtype), requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)

        def fwd(f):
            with torch.no_grad():
                return median_ms(lambda: f(q, k, v), args.reps)

        def fwd_bwd(f):
            return median_ms(lambda: torch.autograd.grad(f(q, k, v), (q, k, v), do), args.reps)

        sdpa = F.scaled_dot_product_attention
        base = {"fwd": fwd(sdpa), "fwd+bwd": fwd_bwd(sdpa)}
        print(f"  {dtype:<9} {'sdpa':<11} fwd {base['fwd']:8.1f} ms            fwd+bwd {base['fwd+bwd']:8.1f} ms")
        for isa in isas:
            os.environ["POSATTN_CPU_ISA"] = isa
            ours = lambda q, k, v: posattn.attention(q, k, v, backend="cpu")  # noqa: E731
            f, fb = fwd(ours), fwd_bwd(ours)
            print(f"  {dtype:<9} {isa:<11} fwd {f:8.1f} ms ({base['fwd'] / f:4.2f}x)   "
                  f"fwd+bwd {fb:8.1f} ms ({base['fwd+bwd'] / fb:4.2f}x)")
        os.environ.pop("POSATTN_CPU_ISA")


if __name__ == "__main__":
    main()
