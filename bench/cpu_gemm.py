"""The GEMM choice behind the CPU backend: GFLOP/s of posattn's own kernels (the fp32 AVX-512
micro-kernel; for bf16 the AVX-512-BF16 micro-kernel and the AMX tile kernel), oneDNN's brgemm
(through ATen) and torch's BLAS matmul on the attention kernels' tile shapes, one thread, in one
process; with the core's measured peaks (an FMA loop, an AMX tile loop).

    python -m bench.cpu_gemm

Builds bench/cpu_gemm.cpp with torch.utils.cpp_extension (needs ninja, an AVX-512 CPU and a
compiler that knows AMX).
"""
import pathlib
import platform

import torch
from torch.utils.cpp_extension import load

HERE = pathlib.Path(__file__).resolve().parent
# (M, N, K): q·kᵀ of a 64-row query tile and a 128-key tile, p·v, and the backward's dK / dQ tiles
SHAPES = [(64, 128, 64), (64, 64, 128), (128, 64, 64), (64, 64, 64)]
FLAGS = ["-O3", "-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mavx512bf16", "-mfma", "-mf16c",
         "-mamx-tile", "-mamx-bf16"]


def extension():
    return load("posattn_cpu_gemm_bench", [str(HERE / "cpu_gemm.cpp")], extra_include_paths=[str(HERE.parent / "csrc")],
                extra_cflags=FLAGS)


def cpu_model():
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def peaks(ext=None):
    """One core's measured peaks in GFLOP/s: {'fma_fp32': ..., 'amx_bf16': ... or None}."""
    ext = ext or extension()
    flags = set(pathlib.Path("/proc/cpuinfo").read_text().split())
    amx = {"amx_tile", "amx_bf16"} <= flags and ext.request_tiles()
    return {"fma_fp32": ext.peak_fma(), "amx_bf16": ext.peak_amx() if amx else None}


def main():
    torch.set_num_threads(1)
    ext = extension()
    pk = peaks(ext)
    amx = pk["amx_bf16"] is not None
    print(f"{cpu_model()}, torch {torch.__version__}, 1 thread; median of 7")
    print(f"peaks: fp32 FMA loop {pk['fma_fp32']:.0f} GFLOP/s, AMX bf16 tile loop "
          + (f"{pk['amx_bf16']:.0f} GFLOP/s" if amx else "n/a (no AMX)"))
    print(f"{'M x N x K':<14} {'fp32 posattn':>13} {'brgemm':>8} {'at::mm':>8} | {'bf16 avx512bf16':>16} "
          f"{'amx':>8} {'brgemm':>8}   GFLOP/s")
    for m, n, k in SHAPES:
        own, brgemm, mm = ext.run(m, n, k, 20000)
        b_own, b_amx, b_brgemm = ext.run_bf16(m, n, k, 20000, amx)
        print(f"{m} x {n} x {k:<6} {own:13.1f} {brgemm:8.1f} {mm:8.1f} | {b_own:16.1f} "
              f"{b_amx if amx else float('nan'):8.1f} {b_brgemm:8.1f}")


if __name__ == "__main__":
    main()
