"""Time of kernelized attention with RPE (FFT path) versus N, against softmax attention.

    python bench/kernelized_scaling.py [--max-n 16384] [--reps 3]

Prints median times per N for: `posattn.kernelized_attention` with a RelativeBias (fwd and
fwd+bwd incl. the table gradient), torch SDPA without bias (fwd), and softmax attention
with a RelativeBias on the dense reference (fwd, up to 8192), then the growth exponent of
each curve (least-squares slope of log time on log N). fp32, B=1, H=8, D=64, m=64 PRF
features. A one-off script until `python -m bench` (issue #7) takes it over.
"""
import argparse
import time

import numpy as np
import torch

import posattn


def median_time(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-n", type=int, default=16384)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    H, D, m = 8, 64, 64
    W = posattn.kernelized.orthogonal_projection(m, D)
    rows = []
    n = 1024
    while n <= args.max_n:
        q, k, v = (torch.randn(1, H, n, D) for _ in range(3))
        table = torch.randn(H, 2 * n + 1) * 0.1
        rpe = posattn.RelativeBias(table)
        fwd = median_time(lambda: posattn.kernelized_attention(q, k, v, rpe=rpe, projection=W), args.reps)
        qg, kg, vg, tg = (t.clone().requires_grad_() for t in (q, k, v, table))

        def step():
            z = posattn.kernelized_attention(qg, kg, vg, rpe=posattn.RelativeBias(tg), projection=W)
            torch.autograd.grad(z.sum(), (qg, kg, vg, tg))

        both = median_time(step, 1)
        sdpa = median_time(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), args.reps)
        dense = (median_time(lambda: posattn.reference.attention(q, k, v, bias=rpe), 1) if n <= 8192
                 else float("nan"))
        rows.append((n, fwd, both, sdpa, dense))
        print(f"N={n:6d}  kernelized+RPE fwd {fwd * 1e3:9.1f} ms  fwd+bwd {both * 1e3:9.1f} ms  |  SDPA fwd "
              f"{sdpa * 1e3:8.1f} ms  |  dense softmax+RelativeBias fwd {dense * 1e3:9.1f} ms", flush=True)
        n *= 2
    data = np.array(rows)
    if len(data) < 2:
        print("growth exponents need at least two sizes (--max-n >= 2048)")
        return
    for col, name in [(1, "kernelized fwd"), (2, "kernelized fwd+bwd"), (3, "SDPA fwd"), (4, "dense softmax+bias fwd")]:
        ok = ~np.isnan(data[:, col])
        slope = np.polyfit(np.log(data[ok, 0]), np.log(data[ok, col]), 1)[0]
        print(f"growth exponent, {name}: {slope:.2f}")


if __name__ == "__main__":
    main()
