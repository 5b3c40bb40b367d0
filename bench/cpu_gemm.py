"""The GEMM choice behind the CPU backend: GFLOP/s of posattn's own AVX-512 micro-kernel,
oneDNN's brgemm (through ATen) and torch's BLAS matmul on the attention kernels' tile
shapes, one thread, in one process.

    python bench/cpu_gemm.py

Builds bench/cpu_gemm.cpp with torch.utils.cpp_extension (needs ninja and an AVX-512 CPU).
"""
import pathlib
import platform

import torch
from torch.utils.cpp_extension import load

HERE = pathlib.Path(__file__).resolve().parent
# (M, N, K): q·kᵀ of a 64-row query tile and a 128-key tile, p·v, and the backward's dK / dQ tiles
SHAPES = [(64, 128, 64), (64, 64, 128), (128, 64, 64), (64, 64, 64)]


def main():
    torch.set_num_threads(1)
    ext = load("posattn_cpu_gemm_bench", [str(HERE / "cpu_gemm.cpp")], extra_include_paths=[str(HERE.parent / "csrc")],
               extra_cflags=["-O3", "-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mavx512bf16", "-mfma"])
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread; median of 7")
    print(f"{'M x N x K':<14} {'posattn':>9} {'oneDNN brgemm':>14} {'at::mm':>8}   GFLOP/s")
    for m, n, k in SHAPES:
        own, brgemm, mm = ext.run(m, n, k, 20000)
        print(f"{m} x {n} x {k:<6} {own:9.1f} {brgemm:14.1f} {mm:8.1f}")


if __name__ == "__main__":
    main()
