"""posattn against its peers, side by side in one process, on the same inputs: the one benchmark harness.

    python -m bench [--quick] [--device cpu|cuda] [--dtype float32] [--only CASE,...] [--providers P,...]
    python -m bench --targets [--quick] ...     the CPU backend's speed targets (1a ... 3b), with verdicts
    python -m bench --only kernelized ...       the kernelized-attention N sweep (adaptive, up to 64k)
    python -m bench --only ring ...             sequence parallelism: ring / Ulysses ranks vs one process
    python -m bench --only varlen ...           a packed variable-length batch (attention_varlen) vs padding
    python -m bench --only decode ...           one decode step over a KV cache (attention_with_kvcache) vs context

Cases (``bench.harness.CASES``): plain, causal, ALiBi (causal), learnable RelativeBias (M=128),
learnable T5Bias (32 buckets), RoPE (causal; posattn's fused rotation against rotary-then-SDPA /
Flex) and a causal sliding window of 256; forward and forward+backward (every input that requires
grad, the bias table included). Providers (``bench.harness.PROVIDERS``): posattn's backend for the
device (posattn-cpu, or posattn-triton on CUDA), torch SDPA, SDPA with the position bias
materialised as a float mask (gathered under autograd when the table is learnable), FlexAttention
under torch.compile with the matching score_mod and block mask (its first call, the compile, is
reported apart and never timed; no CPU backward), and the dense posattn.reference (N <= 2048).

N: 512 ... 8192 on CPU (--quick: 512 and 1024, the reference at 512 only), 512 ... 32768 on CUDA
(--quick: 1024 and 4096); B=1, H=8, D=64 unless --batch / --heads / --head-dim. Output: a table
on stdout (median ms and the speed-up of posattn over each peer = peer time / posattn time, > 1:
posattn faster; peak memory), CSV rows appended to bench/results/bench.csv and a PNG per case,
bench/results/<case>.png (log-log time and memory vs N); --out DIR puts both elsewhere. See
bench/harness.py for the timing and memory method, and docs/benchmarks.md for the latest tables.

The other modes take their own options after --targets / --only kernelized / ring / varlen /
decode (listed with --help after them). --targets and --only kernelized measure through the same
harness (configurations, warm-up, round-robin timing, memory subprocesses, machine and version
columns) and only add what their question needs: target verdicts, and an adaptive size schedule
with growth fits and crossovers. --only ring (bench/ring.py) times ranks in spawned processes;
--only varlen (bench/varlen.py) times a packed batch against its padded and per-sequence peers,
round-robin with the harness's machine and version columns, after checking that they all compute
the same thing; --only decode (bench/decode.py) does the same for one decode step (append +
attend) over a KV cache against the context length, with the cache bytes read per step against
the machine's measured bandwidth.
"""
import argparse
import csv
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from . import harness as H

CPU_SIZES = [512, 1024, 2048, 4096, 8192]
CUDA_SIZES = [512, 1024, 2048, 4096, 8192, 16384, 32768]
QUICK_SIZES = {"cpu": [512, 1024], "cuda": [1024, 4096]}
QUICK_DENSE_MAX_N = {"cpu": 512, "cuda": 1024}     # the reference in --quick: the smallest N
DEFAULT_CASES = ["plain", "causal", "alibi", "relbias", "t5", "rope", "window"]
CSV_PATH = H.RESULTS / "bench.csv"


def plan(cases, providers, sizes, modes, device, dtype, warmup, b=1, h=8, d=64, dense_max_n=H.REFERENCE_MAX_N):
    """Every configuration: case x mode x N x provider."""
    out = []
    for case in cases:
        for mode in modes:
            for n in sizes:
                for p in providers:
                    out.append(H.Config(case, mode, p, n, b=b, h=h, d=d, dtype=dtype, device=device, warmup=warmup,
                                        dense_max_n=dense_max_n))
    return out


def run(configs, reps, mem=True, plot=True, csv_path=CSV_PATH, out_dir=H.RESULTS, verbose=True, mem_jobs=1):
    """Measure, print the tables, write the CSV (and the plots); returns the CSV rows."""
    t0 = time.perf_counter()
    info = H.meta()
    if verbose:
        print(f"machine: {info['machine']}, {info['cores']} cores, {info['threads']} threads"
              + (f", GPU {info['gpu']}" if info["gpu"] else "") + f" | torch {info['torch']} | triton "
              f"{info['triton'] or '-'} | posattn {info['posattn']} @ {info['git_sha']} | posattn cpu ISA: "
              f"{info['cpu_isa']}", flush=True)
        print(f"{len(configs)} configurations; {reps} timed runs each after {configs[0].warmup} warm-up(s), providers "
              f"of one (case, mode, N) round-robin", flush=True)
    results = H.measure(configs, reps, t0, verbose)
    if mem:
        H.measure_memory(results, t0, verbose=verbose, jobs=mem_jobs)
    else:
        for r in results:
            r.mem_note = r.mem_note or "memory skipped (--no-mem)"
    rows = [H.result_row(r, info) for r in results]
    if verbose:
        print_tables(results, info)
    path = H.write_csv(csv_path, rows)
    if verbose:
        print(f"CSV: {path} (run_id {info['run_id']})")
    if plot:
        others = max((r.cores[1] for r in results if r.times and r.cfg.device == "cpu"), default=0.0)
        busy = f"; other processes used up to {others:.1f} cores while timing" if others > 0.25 else ""
        for case in dict.fromkeys(r.cfg.case for r in results):
            mine = [row for row in rows if row["case"] == case]
            c = configs[0]
            title = (f"{case}: {H.CASES[case].label}; {c.device} {c.dtype}, B={c.b} H={c.h} D={c.d}\n"
                     f"{info['gpu'] or info['machine']}, {info['threads']} threads, torch {info['torch']}, "
                     f"posattn @ {info['git_sha']}, {info['run_id']}{busy}")
            out = H.plot_case(mine, title, os.path.join(out_dir, f"{case}.png"))
            if verbose:
                print(f"plot: {out}")
    if verbose:
        print(f"done in {time.perf_counter() - t0:.0f} s")
    return rows


def print_tables(results, info):
    """Markdown tables: median ms with the speed-up of posattn over each peer, then peak memory."""
    providers = list(dict.fromkeys(r.cfg.provider for r in results))
    keys = list(dict.fromkeys((r.cfg.case, r.cfg.mode, r.cfg.n) for r in results))
    by = {(r.cfg.case, r.cfg.mode, r.cfg.n, r.cfg.provider): r for r in results}
    anchor = H.PEER_OF_POSATTN[results[0].cfg.device]
    head = "| case | mode | N | " + " | ".join(providers) + " |"
    rule = "|---|---|---:|" + "---:|" * len(providers)

    def cell(r, what):
        if r is None:
            return ""
        if r.na:
            return "n/a"
        if what == "time":
            if r.median is None:
                return "-"
            gf = H.flops(r.cfg) / r.median / 1e9
            extra = f" ({gf:.0f} GF/s)" if r.cfg.provider == anchor else (f" {r.ratio:.2f}x" if r.ratio else "")
            return f"{r.median * 1e3:.3g}{extra}"
        return f"{r.peak_mib:.0f}" if r.peak_mib is not None else "-"

    def busy(case, mode, n):
        """Cores other processes used while this row was timed (a shared machine slows every provider)."""
        timed = [r for r in results if (r.cfg.case, r.cfg.mode, r.cfg.n) == (case, mode, n) and r.times]
        return f"{timed[0].cores[1]:.1f}" if timed else "-"

    print(f"\ntime: median ms; {anchor} with its GFLOP/s, every other provider with posattn's speed-up over it "
          f"(its time / posattn's; > 1: posattn faster); others: CPU cores other processes used meanwhile\n")
    print(head + " others |\n" + rule + "---:|")
    for case, mode, n in keys:
        print(f"| {case} | {mode} | {n} | " + " | ".join(cell(by.get((case, mode, n, p)), "time") for p in providers)
              + f" | {busy(case, mode, n)} |")
    print("\npeak memory, MiB (CPU: RSS high-water mark in a memory subprocess above its baseline after imports and "
          "inputs)\n")
    print(head + "\n" + rule)
    for case, mode, n in keys:
        print(f"| {case} | {mode} | {n} | " + " | ".join(cell(by.get((case, mode, n, p)), "mem") for p in providers)
              + " |")
    reasons = {}
    for r in results:
        if r.na:
            reasons.setdefault((r.cfg.provider, r.na), []).append(f"{r.cfg.case}/{r.cfg.mode}/{r.cfg.n}")
    if reasons:
        print("\nn/a:")
        for (p, why), where in reasons.items():
            print(f"  {p}: {why} ({len(where)}: {', '.join(where[:4])}{', ...' if len(where) > 4 else ''})")
    compiles = [r for r in results if r.cfg.provider == "flex" and r.first_call_s is not None and not r.na]
    if compiles:
        print("\nflex compile (first call, not timed): " + ", ".join(
            f"{r.cfg.case}/{r.cfg.n} {r.first_call_s:.1f} s" for r in compiles))
    timed = {key: r.cores for r in results if r.times and r.cfg.device == "cpu" for key in [r.cfg.group]}
    if timed:
        busy = [key for key, cores in timed.items() if cores[1] > 0.25]
        print(f"\nwhile timing: this process used at least {min(c[0] for c in timed.values()):.2f} cores, other "
              f"processes at most {max(c[1] for c in timed.values()):.2f}"
              + (f"  !! {len(busy)} of {len(timed)} rows timed while other processes used > 0.25 cores: their "
                 f"absolute times are inflated; rerun on an idle machine" if busy else ""))
    bad = [r for r in results if r.rel_diff is not None and r.rel_diff > (1e-3 if r.cfg.dtype == "float32" else 3e-2)]
    for r in bad:
        print(f"!! {r.cfg.provider} {r.cfg.case}/{r.cfg.mode}/{r.cfg.n}: result differs from the group's first peer by "
              f"{r.rel_diff:.1e} (relative)")




# ---------------------------------------------------------------------------------------------
# --targets: the CPU backend's speed targets

TARGETS_DOC = """The C++ CPU backend's speed targets: posattn against torch SDPA and FlexAttention, in one run.

    python -m bench --targets [--quick] [--reps R] [--no-mem] [--reference] [--only 1a,3b]

2 threads, B=1, H=8, D=64, fp32 unless said. Every ratio is a speed-up of posattn
(backend="cpu") over a peer measured in the same process (> 1: posattn faster):

  1a-1d     plain, N=2048: fp32 fwd >= 1.1x SDPA, fp32 fwd+bwd >= 1.2x SDPA, bf16 fwd >= 1.2x SDPA
            bf16, bf16 fwd+bwd >= 1.2x SDPA bf16.
  2a/2b     ALiBi causal / bidirectional, N=4096, fwd: >= 1.3x the best of SDPA with a
            materialised ALiBi float mask (causality folded into the mask; built once, outside
            the timing, its memory counted) and FlexAttention under torch.compile (ALiBi
            score_mod, causal block mask); compile time is reported separately, not timed.
  3a        learnable RelativeBias (table [H, 2M+1], M=128), N=4096, fwd+bwd incl. the table
            gradient: >= 3x SDPA with the bias gathered under autograd (table[:, clamp(j-i)+M]
            as attn_mask), at <= 1/10 of its peak memory.
  3b        the same at N=16384, posattn only: completes in < 2 GiB peak memory.

Measured with bench/harness.py (the harness of ``python -m bench``: cases, providers, warm-up of
every configuration before any is timed, round-robin timing, median and 20/80 % quantiles, one
FLOP formula, peak RSS per configuration in a fresh process). GFLOP/s are shown next to the fp32
FMA peak (AVX-512 FMA, measured ~117 GFLOP/s per core). Outputs and gradients of the providers of
one target are compared at warm-up (max |diff| relative to the first peer's max |value|); a
posattn result off by more than the dtype's tolerance is a MISS. 3b is timed by the single run of
its memory process. The run ends with the cores this process and other processes used while
timing: on a shared 2-core machine a compile next door halves absolute speed (the round-robin
ratios suffer less).

--quick uses smaller sizes (1a-1d: N=1024, 2 and 3a: N=2048, 3b: N=4096), so its PASS/MISS are
indicative only. Unavailable providers are reported as n/a with the reason. Table on stdout; CSV
rows appended to bench/results/cpu_targets.csv.
"""
BENCH_THREADS = 2
FMA_PEAK_PER_CORE = 117.5      # GFLOP/s fp32, AVX-512 FMA, measured on the 2-core dev machine
TOL = {"float32": 1e-3, "bfloat16": 3e-2}
TARGETS_CSV = H.RESULTS / "cpu_targets.csv"
POSATTN = "posattn-cpu"


@dataclass(frozen=True)
class Target:
    name: str
    case: str                  # a bench.harness.CASES key
    mode: str
    dtype: str
    n: int
    n_quick: int
    providers: tuple
    speedup: float = None      # posattn time <= best peer time / speedup
    mem_ratio: float = None    # posattn peak <= the peer's peak * mem_ratio
    mem_abs_mib: float = None  # posattn peak < this
    time_in_process: bool = True


TARGETS = [
    Target("1a", "plain", "fwd", "float32", 2048, 1024, (POSATTN, "sdpa"), speedup=1.1),
    Target("1b", "plain", "fwd+bwd", "float32", 2048, 1024, (POSATTN, "sdpa"), speedup=1.2),
    Target("1c", "plain", "fwd", "bfloat16", 2048, 1024, (POSATTN, "sdpa"), speedup=1.2),
    Target("1d", "plain", "fwd+bwd", "bfloat16", 2048, 1024, (POSATTN, "sdpa"), speedup=1.2),
    Target("2a", "alibi", "fwd", "float32", 4096, 2048, (POSATTN, "sdpa+bias", "flex"), speedup=1.3),
    Target("2b", "alibi-bidir", "fwd", "float32", 4096, 2048, (POSATTN, "sdpa+bias", "flex"), speedup=1.3),
    Target("3a", "relbias", "fwd+bwd", "float32", 4096, 2048, (POSATTN, "sdpa+bias"), speedup=3.0, mem_ratio=0.1),
    Target("3b", "relbias", "fwd+bwd", "float32", 16384, 4096, (POSATTN,), mem_abs_mib=2048.0, time_in_process=False),
]
INFO_ONLY = {"reference"}      # timed and shown, never a peer in a verdict


def _best_peer(what, own, own_note, peers, attr):
    """The peer with the smallest ``attr`` (time or memory), or None and the verdict saying why there is none."""
    measured = [r for r in peers if getattr(r, attr) is not None]
    if own is None:
        return None, f"{what} n/a (posattn: {own_note or 'not run'})"
    if not measured:
        return None, f"{what} n/a (no peer {'ran' if what == 'speed' else 'measured'})"
    return min(measured, key=lambda r: getattr(r, attr)), None


def judge(target, rows):
    """Verdict strings for the posattn row, and the speed-up of posattn over the best peer."""
    by = {r.cfg.provider: r for r in rows}
    pa = by[POSATTN]
    peers = [r for r in rows if r.cfg.provider != POSATTN and r.cfg.provider not in INFO_ONLY]
    verdicts, best_ratio = [], None
    wrong = pa.rel_diff is not None and pa.rel_diff > TOL[target.dtype]
    if target.speedup is not None:
        best, why = _best_peer("speed", pa.median, pa.na, peers, "median")
        if best is None:
            verdicts.append(why)
        else:
            best_ratio = best.median / pa.median
            ok = best_ratio >= target.speedup and not wrong
            verdicts.append(f"speed {'PASS' if ok else 'MISS'} {best_ratio:.2f}x vs {best.cfg.provider} "
                            f"(target >= {target.speedup}x)" + (" [result off: MISS]" if wrong else ""))
    if target.mem_ratio is not None:
        peer, why = _best_peer("memory", pa.peak_mib, pa.mem_note or pa.na, peers, "peak_mib")
        if peer is None:
            verdicts.append(why)
        else:
            frac = pa.peak_mib / max(peer.peak_mib, 1e-9)
            verdicts.append(f"memory {'PASS' if frac <= target.mem_ratio else 'MISS'} {frac:.3f} of "
                            f"{peer.cfg.provider}'s peak (target <= {target.mem_ratio})")
    if target.mem_abs_mib is not None:
        if pa.peak_mib is None:
            verdicts.append(f"memory n/a (posattn: {pa.mem_note or pa.na or 'not run'})")
        else:
            ok = pa.peak_mib < target.mem_abs_mib
            verdicts.append(f"memory {'PASS' if ok else 'MISS'} {pa.peak_mib:.0f} MiB "
                            f"(target < {target.mem_abs_mib:.0f} MiB)")
    return best_ratio, verdicts


def describe(target, n):
    what = {"plain": "plain", "alibi": "ALiBi causal", "alibi-bidir": "ALiBi bidirectional",
            "relbias": f"RelativeBias M={H.CASES['relbias'].table_m} (table grad incl.)"}[target.case]
    return f"{what}, {target.mode}, {'bf16' if target.dtype == 'bfloat16' else 'fp32'}, N={n}"


def measured_peaks(skip=False):
    """One core's fp32 FMA and AMX bf16 peaks in GFLOP/s, measured by loops in bench/cpu_gemm.cpp
    (built on first use); the fixed FMA_PEAK_PER_CORE where that build is skipped or fails."""
    fixed = {"fma_fp32": FMA_PEAK_PER_CORE, "amx_bf16": None, "source": "fixed figure, not measured here"}
    if skip:
        return fixed
    try:
        from .cpu_gemm import peaks
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return {**peaks(), "source": "measured: FMA loop, AMX tile loop, one core x threads"}
        finally:
            torch.set_num_threads(before)
    except Exception as e:  # no compiler, no AVX-512: the fixed figure, said so
        return {**fixed, "source": f"fixed figure; measuring failed: {str(e).splitlines()[0][:80]}"}


def targets_main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench --targets", description=TARGETS_DOC.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller N and fewer reps (a couple of minutes)")
    parser.add_argument("--reps", type=int, default=None, help="timed runs per configuration (default 10, quick 5)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls per configuration (default 2, quick 1)")
    parser.add_argument("--no-mem", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--no-peaks", action="store_true",
                        help="do not measure the FMA / AMX peaks (bench/cpu_gemm.cpp); use the fixed fp32 figure")
    parser.add_argument("--reference", action="store_true", help="also time posattn's dense reference (info only)")
    parser.add_argument("--only", default=None, help="comma-separated target names to run, e.g. 1a,3b")
    args = parser.parse_args(argv)
    reps = args.reps or (5 if args.quick else 10)
    warmup = args.warmup or (1 if args.quick else 2)
    only = set(args.only.split(",")) if args.only else None
    if only and only - {t.name for t in TARGETS}:
        parser.error(f"--only {args.only}: unknown target(s) {sorted(only - {t.name for t in TARGETS})}; choose from "
                     f"{[t.name for t in TARGETS]}")

    torch.set_num_threads(BENCH_THREADS)
    info = H.meta()
    per_core = measured_peaks(args.no_peaks)
    peaks = {"float32": per_core["fma_fp32"] * BENCH_THREADS,
             # bf16 products run on AMX tiles on the amx path, else on FMA-rate dot instructions
             "bfloat16": (per_core["amx_bf16"] if info["cpu_isa"] == "amx" and per_core["amx_bf16"]
                          else per_core["fma_fp32"]) * BENCH_THREADS}
    print(f"machine: {info['machine']}, {info['cores']} cores, {BENCH_THREADS} threads | torch {info['torch']} | posattn "
          f"{info['posattn']} @ {info['git_sha']} | posattn cpu ISA: {info['cpu_isa']}")
    print(f"peaks ({per_core['source']}): fp32 FMA {peaks['float32']:.0f} GFLOP/s, bf16 products on the "
          f"{info['cpu_isa']} path {peaks['bfloat16']:.0f} GFLOP/s ({BENCH_THREADS} cores); B=1 H=8 D=64; "
          f"{reps} timed runs after {warmup} warm-up(s), providers round-robin")
    if args.quick:
        print("QUICK: N reduced (1a-1d: 1024, 2 and 3a: 2048, 3b: 4096 instead of 2048/4096/4096/16384): "
              "PASS/MISS are indicative only")
    targets, configs = [], {}
    for t in TARGETS:
        if only and t.name not in only:
            continue
        n = t.n_quick if args.quick else t.n
        providers = t.providers + (("reference",) if args.reference and t.time_in_process else ())
        targets.append((t, n))
        configs[t.name] = [H.Config(t.case, t.mode, p, n, dtype=t.dtype, warmup=warmup, dense_max_n=n)
                           for p in providers]

    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    timed = [c for t, _ in targets if t.time_in_process for c in configs[t.name]]
    measured = iter(H.measure(timed, reps, t0))
    results = {t.name: [next(measured) if t.time_in_process else H.Result(c) for c in configs[t.name]]
               for t, _ in targets}
    load_end = os.getloadavg()[0]
    everything = [r for rs in results.values() for r in rs]
    if args.no_mem:
        for r in everything:
            r.mem_note = "memory skipped (--no-mem)"
    else:
        H.measure_memory(everything, t0, timeout=300 if args.quick else 900)
    elapsed = time.perf_counter() - t0

    csv_rows = []
    for t, n in targets:
        rows = results[t.name]
        if not t.time_in_process:      # timed by the single run of its memory process
            for r in rows:
                r.times = list(r.child_times or [])
        H.ratios(rows)
        best_ratio, verdicts = judge(t, rows)
        goal = []
        if t.speedup is not None:
            goal.append(f"posattn >= {t.speedup}x the best of "
                        + ", ".join(p for p in t.providers if p != POSATTN and p not in INFO_ONLY))
        if t.mem_ratio is not None:
            goal.append(f"peak memory <= {t.mem_ratio} of the peer's")
        if t.mem_abs_mib is not None:
            goal.append(f"peak memory < {t.mem_abs_mib:.0f} MiB")
        print(f"\n== {t.name}  {describe(t, n)}: {'; '.join(goal)}")
        own, others, steal = rows[0].cores
        if t.time_in_process and (others > 0.25 or steal > 0.1):
            print(f"  !! contended while timing: this process {own:.2f} cores, other processes {others:.2f}, "
                  f"hypervisor steal {steal:.2f}")
        print(f"  {'provider':20s} {'median ms':>10s} {'q20-q80 ms':>17s} {'GFLOP/s':>8s} {'%peak':>6s} "
              f"{'speed-up':>9s} {'peak MiB':>9s} {'rel diff':>9s}  note")
        for r in rows:
            notes = []
            if r.na is not None:
                notes.append("n/a: " + r.na)
            if r.cfg.provider == "flex" and r.first_call_s is not None:
                notes.append(f"compile (first call) {r.first_call_s:.1f} s, not timed")
            if r.mem_note:
                notes.append(r.mem_note)
            if r.peak_mib is not None and r.cfg.provider == "flex":
                notes.append(f"peak incl. {r.setup_mib:.0f} MiB resident after compile")
            if r.cfg.provider in INFO_ONLY:
                notes.append("info only")
            if not t.time_in_process:
                notes.append("time: the single run of the memory process")
            med = r.median
            gf = H.flops(r.cfg) / med / 1e9 if med else None
            ratio = r.ratio if r.cfg.provider != POSATTN else best_ratio
            q20, q80 = r.quantile(0.2), r.quantile(0.8)
            cells = [f"{med * 1e3:.1f}" if med else "n/a",
                     f"{q20 * 1e3:.1f}-{q80 * 1e3:.1f}" if q20 is not None and len(r.times) > 1 else "-",
                     f"{gf:.1f}" if gf else "-",
                     f"{100 * gf / peaks[t.dtype]:.0f}%" if gf else "-",
                     f"{ratio:.2f}x" if ratio else "-",
                     f"{r.peak_mib:.0f}" if r.peak_mib is not None else "-",
                     f"{r.rel_diff:.1e}" if r.rel_diff is not None else "-"]
            print(f"  {r.cfg.provider:20s} {cells[0]:>10s} {cells[1]:>17s} {cells[2]:>8s} {cells[3]:>6s} "
                  f"{cells[4]:>9s} {cells[5]:>9s} {cells[6]:>9s}  {'; '.join(notes)}")
            row = H.result_row(r, info)
            row.update(target=t.name, speedup_of_posattn=H.fmt(ratio), verdict=" | ".join(verdicts)
                       if r.cfg.provider == POSATTN else "", quick=int(args.quick), note="; ".join(notes))
            csv_rows.append(row)
        for v in verdicts:
            print(f"  -> {v}")
    print("\n(speed-up = peer time / posattn time, > 1: posattn faster; on the posattn row: over the best peer; "
          "peak MiB = RSS high-water mark of a fresh process minus its RSS after imports and inputs; rel diff = "
          "max |diff| / max |value| vs the first peer)")
    usage = [rs[0].cores for t, _ in targets if t.time_in_process for rs in [results[t.name]]]
    own, others, steal = np.mean(usage, axis=0) if usage else (float("nan"),) * 3
    print(f"while timing: this process used {own:.2f} of {BENCH_THREADS} cores, other processes {others:.2f}, hypervisor "
          f"steal {steal:.2f}; 1-min load average {load_start:.1f} at start, {load_end:.1f} after timing")
    if own < 0.85 * BENCH_THREADS:
        print(f"WARNING: this process got less than its {BENCH_THREADS} cores: absolute times and GFLOP/s are low; the "
              f"round-robin ratios are less affected but noisier; rerun on an idle machine")
    print(f"done in {elapsed:.0f} s; CSV: {H.write_csv(TARGETS_CSV, csv_rows)}")



# ---------------------------------------------------------------------------------------------
# --only kernelized: the adaptive N sweep of kernelized attention against softmax attention

SWEEP_DOC = """The kernelized-attention scaling sweep: kernelized attention with RPE (FFT path) versus softmax attention, N = 1k … 64k.

    python -m bench --only kernelized [--quick] [--max-n 65536] [--cap-s 180] [--budget-s 1500]
    python -m bench --only kernelized --from-csv   # table, fits and plot again from the last run in the CSV

CPU, fp32, 2 threads, B=1, H=8, D=64. Providers (configurations of bench/harness.py):

  kernelized+rpe   posattn.kernelized_attention(q, k, v, rpe=RelativeBias(table), feature_map="prf",
                   projection=W) with a fixed PRF projection W of m=64 rows (num_features=64); its default
                   backend (printed at the start: the fused CPU kernels around the FFTs when posattn._C has
                   them, else the FFT path in PyTorch ops). O(N log N) time, O(N) memory.
  posattn-cpu+rpe  posattn.attention(q, k, v, bias=RelativeBias(table), backend="cpu"): softmax with the
                   relative bias on the C++ CPU backend, flash-style, O(N^2) time, O(N) memory.
  sdpa             torch SDPA without any bias (the floor for exact softmax attention on CPU).
  dense+rpe        posattn.reference.attention(q, k, v, bias=RelativeBias(table)): the dense O(N^2)-memory
                   oracle, kept only where cheap (fwd up to --dense-max-n, fwd+bwd up to half of it).

The RelativeBias table is [H, 2N+1] (every distance learnable, no clamp: case "relbias-full"), 0.1·randn.
Modes: fwd, and fwd+bwd (one backward with a random output gradient into q, k, v and, where there is one,
the table).

Sweep. Sizes double from 1024 to --max-n, fwd first, then fwd+bwd. A configuration's time is
predicted from the same provider's previous sizes (last measured growth factor, clamped to [2, 4.5]):
  * predicted < --inproc-s (4 s): timed in this process by the harness (warm-up, then the cheap providers
    of one (mode, N) round-robin, 3-7 timed calls, about 10 s per provider); its peak memory from a fresh
    subprocess (the harness's: baseline = RSS after imports and inputs; one warm-up; the RSS high-water
    mark reset via /proc/self/clear_refs; one measured call; peak = VmHWM - baseline);
  * otherwise: one fresh subprocess gives both, with no warm-up and 1-3 timed calls (about 20 s in all:
    a single call at the largest sizes, flagged in the table), peak = VmHWM over those calls - baseline;
  * predicted time x calls > --cap-s (180 s), predicted peak > 70 % of the available memory, or a run
    that would end past --budget-s (1500 s) since the start: skipped, with the reason.
Each configuration records the cores this process and other processes used while it was timed and the
1-min load average (a compile next door halves absolute speed on this 2-core machine).

Analysis: growth exponents = least-squares slope of log(median time) on log(N) over all measured sizes
(listed), and over N >= 4096 (the tail, less dominated by fixed overheads); crossovers = the N where
kernelized+rpe becomes faster than each softmax provider: measured (log-log interpolation between the two
sizes that bracket the sign change) when it happens inside the sweep, else extrapolated from the tail fits
and marked as such. Table on stdout; CSV rows appended to bench/results/kernelized_scaling.csv (one run_id
per run); log-log plot (the harness's) to bench/results/kernelized_scaling.png.
"""
SWEEP_B, SWEEP_H, SWEEP_D = 1, 8, 64
SWEEP_MODES = H.MODES
# display name -> (harness case, harness provider)
SWEEP_PROVIDERS = {"kernelized+rpe": ("relbias-full", "kernelized"), "posattn-cpu+rpe": ("relbias-full", "posattn-cpu"),
             "sdpa": ("plain", "sdpa"), "dense+rpe": ("relbias-full", "reference")}
SWEEP_NAME = {v[1]: k for k, v in SWEEP_PROVIDERS.items()}
SWEEP_KERNELIZED = "kernelized+rpe"
# growth per doubling assumed before a provider has two measured sizes
PRIOR_GROWTH = {"kernelized+rpe": 2.3, "posattn-cpu+rpe": 4.0, "sdpa": 4.0, "dense+rpe": 4.0}
TAIL_N = 4096
SWEEP_CSV = H.RESULTS / "kernelized_scaling.csv"
SWEEP_PNG = H.RESULTS / "kernelized_scaling.png"
SWEEP_CSV_FIELDS = ["run_id", "case", "mode", "provider", "B", "H", "L", "S", "D", "dtype", "device", "threads", "median_ms",
              "q20_ms", "q80_ms", "reps", "peak_mem_mib", "where", "hwm_reset", "cores_own", "cores_others",
              "cores_steal", "loadavg1", "status", "note", "kernelized_backend", "machine", "cores", "gpu", "torch",
              "triton", "posattn", "git_sha"]


def sweep_config(name, mode, n, warmup=1):
    case, provider = SWEEP_PROVIDERS[name]
    return H.Config(case, mode, provider, n, b=SWEEP_B, h=SWEEP_H, d=SWEEP_D, warmup=warmup, dense_max_n=n)


def kernelized_backend():
    """Which path kernelized_attention's default backend takes on CPU tensors here."""
    cfg = sweep_config(SWEEP_KERNELIZED, "fwd", 64)
    x = H.make_inputs(cfg)
    try:
        import posattn
        posattn.kernelized_attention(x.q, x.k, x.v, rpe=x.bias, num_features=H.KERNELIZED_FEATURES, backend="cpu")
    except Exception as e:
        return f"FFT path in PyTorch ops (backend='cpu' unavailable: {H.reason(e)[:80]})"
    return "backend=None -> 'cpu': fused CPU kernels (posattn._C) around torch.fft"


def extension_stamp():
    """mtime of the built posattn._C (another engineer may rebuild it while the sweep runs)."""
    import glob
    import posattn
    paths = glob.glob(os.path.join(os.path.dirname(posattn.__file__), "_C*.so"))
    return max((os.path.getmtime(p) for p in paths), default=0.0)


def mem_available_mib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("inf")


def sweep_predict(history, key, n, fallback_from=None):
    """Predicted value at n from the same provider's measured (N, value) pairs, else scaled from fallback_from."""
    pts = sorted((nn, val) for nn, val in history.get(key, {}).items() if val is not None and nn < n)
    if not pts:
        return fallback_from
    n1, v1 = pts[-1]
    growth = PRIOR_GROWTH[key[0]]
    if len(pts) >= 2:
        n0, v0 = pts[-2]
        growth = (v1 / v0) ** (1.0 / math.log2(n1 / n0)) if v0 > 0 else growth
        growth = min(max(growth, 2.0), 4.5)
    return v1 * growth ** math.log2(n / n1)


# ---------------------------------------------------------------------------------------------
# the sweep


def run_sweep(args, meta):
    sizes = []
    n = args.min_n
    while n <= args.max_n:
        sizes.append(n)
        n *= 2
    providers = [p for p in SWEEP_PROVIDERS if p in args.providers]
    modes = [m for m in SWEEP_MODES if m in args.modes]
    t_start = time.perf_counter()
    history_t, history_m = {}, {}     # (provider, mode) -> {N: per-call seconds | peak MiB}
    dropped = {}                      # (provider, mode) -> reason: larger N are skipped too
    results = []
    ext0 = extension_stamp()

    def emit(provider, mode, n, status, times=None, peak=None, where="", hwm_reset="", cores=(None,) * 3, load=None,
             note=""):
        med = q20 = q80 = None
        if times:
            med, q20, q80 = (float(np.quantile(times, p)) for p in (0.5, 0.2, 0.8))
        case = SWEEP_PROVIDERS[provider][0]
        row = dict(meta, case=case, mode=mode, provider=provider, B=SWEEP_B, H=SWEEP_H, L=n, S=n, D=SWEEP_D, dtype="float32",
                   device="cpu", threads=BENCH_THREADS, median_ms=H.fmt(med, 1e3), q20_ms=H.fmt(q20, 1e3),
                   q80_ms=H.fmt(q80, 1e3), reps=len(times) if times else 0, peak_mem_mib=H.fmt(peak), where=where,
                   hwm_reset=hwm_reset, cores_own=H.fmt(cores[0], 1, 3), cores_others=H.fmt(cores[1], 1, 3),
                   cores_steal=H.fmt(cores[2], 1, 3), loadavg1=H.fmt(load, 1, 3), status=status, note=note)
        if extension_stamp() != ext0:
            row["note"] = (row["note"] + "; " if row["note"] else "") + "posattn._C rebuilt during the run"
        row = {k: row.get(k, "") for k in SWEEP_CSV_FIELDS}
        H.write_csv(args.csv, [row])
        results.append(row)
        if med is not None:
            history_t.setdefault((provider, mode), {})[n] = med
        if peak is not None:
            history_m.setdefault((provider, mode), {})[n] = peak
        shown = f"{med:9.3f} s" if med is not None else f"{'-':>11s}"
        mem = f"{peak:8.0f} MiB" if peak is not None else f"{'-':>12s}"
        extra = f"  [{status}] {note}" if status != "ok" or note else ""
        print(f"  {mode:7s} N={n:6d} {provider:16s} {shown} x{len(times) if times else 0} {mem}  "
              f"{where:8s}{extra}  (t+{time.perf_counter() - t_start:.0f} s)", flush=True)

    for mode in modes:
        for n in sizes:
            cheap, costly = [], []
            for p in providers:
                key = (p, mode)
                limit = args.dense_max_n if mode == "fwd" else args.dense_max_n // 2
                if p == "dense+rpe" and n > limit:
                    emit(p, mode, n, "skipped", note=f"dense kept only up to N={limit} for {mode}")
                    continue
                if key in dropped:
                    emit(p, mode, n, "skipped", note=dropped[key])
                    continue
                fallback = None
                if mode == "fwd+bwd" and (p, "fwd") in history_t and n in history_t[(p, "fwd")]:
                    fallback = 4.0 * history_t[(p, "fwd")][n]      # a backward ~ 2.5-5x a forward
                pred = sweep_predict(history_t, key, n, fallback)
                pred_mem = sweep_predict(history_m, key, n)
                if pred_mem is not None and pred_mem > 0.7 * mem_available_mib():
                    dropped[key] = f"predicted peak {pred_mem:.0f} MiB > 70% of available memory"
                    emit(p, mode, n, "skipped", note=dropped[key])
                    continue
                if pred is None or pred < args.inproc_s:
                    cheap.append((p, pred))
                    continue
                reps = max(1, min(3, int(args.sub_target_s / pred)))
                if pred * reps > args.cap_s:
                    dropped[key] = f"predicted {pred:.0f} s > --cap-s {args.cap_s:.0f} s per configuration"
                    emit(p, mode, n, "skipped", note=dropped[key])
                    continue
                costly.append((p, pred, reps))

            # cheap providers: the harness, round-robin in this process, then memory in a fresh process
            if cheap:
                known = [pred for _, pred in cheap if pred is not None]
                slowest = max(known) if len(known) == len(cheap) else None
                reps = 3 if slowest is None else \
                    max(3, min(args.max_reps, int(args.inproc_target_s / max(slowest, 1e-6))))
                res = H.measure([sweep_config(p, mode, n) for p, _ in cheap], reps, verbose=False)
                load = os.getloadavg()[0]
                ran = [r for r in res if r.na is None]
                for r in res:
                    if r.na is not None:
                        emit(SWEEP_NAME[r.cfg.provider], mode, n, "failed", where="in-proc", note=r.na)
                if args.no_mem:
                    for r in ran:
                        r.mem_note = "memory skipped (--no-mem)"
                else:
                    H.measure_memory(ran, verbose=False, timeout=60 + 10 * max((max(r.times) for r in ran), default=1))
                for r in ran:
                    emit(SWEEP_NAME[r.cfg.provider], mode, n, "ok", times=r.times, peak=r.peak_mib, where="in-proc",
                         hwm_reset="" if r.peak_mib is None else int("warm-up" not in r.mem_note), cores=r.cores,
                         load=load, note=r.mem_note)

            # costly providers: time and memory from the same fresh process, no warm-up
            for p, pred, reps in costly:
                elapsed = time.perf_counter() - t_start
                if elapsed + pred * reps > args.budget_s:
                    emit(p, mode, n, "skipped", note=f"predicted {pred * reps:.0f} s would end past --budget-s "
                                                     f"{args.budget_s:.0f} s (at {elapsed:.0f} s)")
                    continue
                out, err = H.run_mem_child([sweep_config(p, mode, n, warmup=0)], max(120.0, 3 * pred * reps + 60), reps=reps)
                if not out or "error" in out[0]:
                    err = err or out[0]["error"]
                    dropped[(p, mode)] = f"skipped after N={n}: {err}"
                    emit(p, mode, n, "failed", where="fresh", note=err)
                    continue
                res = out[0]
                note = "single run" if reps == 1 else f"{reps} runs, no warm-up"
                emit(p, mode, n, "ok", times=res["times"], peak=res["peak_mib"], where="fresh", hwm_reset=0,
                     cores=res["cores"], load=res["loadavg1"], note=note)
    return results, time.perf_counter() - t_start


# ---------------------------------------------------------------------------------------------
# analysis: table, growth exponents, crossovers, plot (also from a CSV, --from-csv)

def loglog_fit(pts, min_n=0):
    pts = [(n, v) for n, v in pts if n >= min_n]
    if len(pts) < 2:
        return None
    x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    slope, intercept = np.polyfit(x, y, 1)
    return dict(slope=float(slope), intercept=float(intercept), sizes=[p[0] for p in pts])


def _sizes(ns):
    return ",".join(f"{n // 1024}k" for n in ns)


def crossover(kern, soft, kern_fit, soft_fit):
    """Where kernelized+rpe becomes faster than a softmax provider: (text, N or None, measured?)."""
    common = sorted(set(dict(kern)) & set(dict(soft)))
    kd, sd = dict(kern), dict(soft)
    if common:
        faster = [kd[n] < sd[n] for n in common]
        if all(faster):
            return f"kernelized faster at every common N ({_sizes(common)})", None, False
        for i in range(1, len(common)):
            if faster[i] and not faster[i - 1] and all(faster[i:]):
                n0, n1 = common[i - 1], common[i]
                r0, r1 = math.log(kd[n0] / sd[n0]), math.log(kd[n1] / sd[n1])
                nx = math.exp(math.log(n0) + (math.log(n1) - math.log(n0)) * r0 / (r0 - r1))
                return (f"measured: between N={n0} and N={n1} (~{nx:,.0f} by log-log interpolation; "
                        f"at N={n1}: {kd[n1]:.3g} s vs {sd[n1]:.3g} s)"), nx, True
        if any(faster):
            return f"mixed: kernelized faster at N in {_sizes([n for n, f in zip(common, faster) if f])} only", None, False
    if kern_fit is None or soft_fit is None:
        return "n/a (not enough sizes to fit, or no crossing in the sweep)", None, False
    db = soft_fit["slope"] - kern_fit["slope"]
    if db <= 0:
        return "never (the kernelized curve does not grow slower)", None, False
    nx = math.exp((kern_fit["intercept"] - soft_fit["intercept"]) / db)
    last = common[-1] if common else None
    ratio = f"; at N={last}: {kd[last] / sd[last]:.1f}x slower" if last else ""
    return (f"EXTRAPOLATED: N ~ {nx:,.0f} (fits N^{kern_fit['slope']:.2f} vs N^{soft_fit['slope']:.2f}, "
            f"sizes {_sizes(kern_fit['sizes'])} / {_sizes(soft_fit['sizes'])}; not crossed in the sweep{ratio})"), nx, False


def sweep_report(rows, elapsed=None):
    present = [p for p in SWEEP_PROVIDERS if any(r["provider"] == p for r in rows)]
    modes = [m for m in SWEEP_MODES if any(r["mode"] == m for r in rows)]
    meta = rows[0]
    print(f"\n== run {meta['run_id']}: {meta['machine']}, {meta['cores']} cores, {BENCH_THREADS} threads | torch "
          f"{meta['torch']} | posattn {meta['posattn']} @ {meta['git_sha']}")
    print(f"   fp32, B={SWEEP_B} H={SWEEP_H} D={SWEEP_D}, RelativeBias table [H, 2N+1]; kernelized: PRF m={H.KERNELIZED_FEATURES}, "
          f"{meta['kernelized_backend']}")
    for mode in modes:
        ns = sorted({int(r["L"]) for r in rows if r["mode"] == mode})
        print(f"\n-- {mode}: median seconds per call [timed calls] / peak MiB above baseline "
              f"(* = a single timed call; s = skipped; f = failed)")
        print(f"  {'N':>6s}  " + "  ".join(f"{p:>24s}" for p in present))
        for n in ns:
            cells = []
            for p in present:
                r = next((r for r in rows if r["provider"] == p and r["mode"] == mode and int(r["L"]) == n), None)
                if r is None:
                    cells.append(f"{'':>24s}")
                elif r["status"] != "ok":
                    cells.append(f"{r['status'][0]:>24s}")
                else:
                    med, reps = H.num(r["median_ms"]) / 1e3, int(r["reps"])
                    peak = H.num(r["peak_mem_mib"])
                    mark = "*" if reps == 1 else " "
                    cells.append(f"{med:9.3f}{mark}[{reps}] / " + (f"{peak:7.0f}" if peak is not None else f"{'-':>7s}"))
            print(f"  {n:6d}  " + "  ".join(cells))
    print("\n-- detail (q20-q80 of the timed calls; where: in-proc = round-robin in the main process + memory in a "
          "fresh one, fresh = time and memory from one fresh process without warm-up; cores: this process / others "
          "while timed; load = 1-min load average)")
    for r in rows:
        if r["status"] == "ok":
            q = f"{H.num(r['q20_ms']) / 1e3:.3f}-{H.num(r['q80_ms']) / 1e3:.3f} s"
            print(f"  {r['mode']:7s} {int(r['L']):6d} {r['provider']:16s} {q:>19s} {r['where']:7s} cores "
                  f"{H.num(r['cores_own']) or 0:.2f}/{H.num(r['cores_others']) or 0:.2f} "
                  f"load {H.num(r['loadavg1']) or 0:.1f}"
                  + (f"  {r['note']}" if r["note"] else ""))
        else:
            print(f"  {r['mode']:7s} {int(r['L']):6d} {r['provider']:16s} {r['status']}: {r['note']}")

    print("\n-- growth exponents (least-squares slope of log time on log N; memory likewise)")
    fits = {}
    for mode in modes:
        for p in present:
            pts = H.series(rows, p, mode)
            full, tail = loglog_fit(pts), loglog_fit(pts, TAIL_N)
            fits[(p, mode)] = (full, tail)
            mem = loglog_fit(H.series(rows, p, mode, "peak_mem_mib"), TAIL_N)
            if full is None:
                print(f"  {mode:7s} {p:16s} n/a ({len(pts)} size(s))")
                continue
            tail_s = f"N^{tail['slope']:.2f} over {_sizes(tail['sizes'])}" if tail else "n/a"
            mem_s = f"N^{mem['slope']:.2f} over {_sizes(mem['sizes'])}" if mem else "n/a"
            print(f"  {mode:7s} {p:16s} time N^{full['slope']:.2f} over {_sizes(full['sizes'])}; tail {tail_s}; "
                  f"memory {mem_s}")

    print("\n-- crossovers: where kernelized+rpe becomes faster than")
    crosses = {}
    for mode in modes:
        kern = H.series(rows, SWEEP_KERNELIZED, mode)
        for p in present:
            if p == SWEEP_KERNELIZED or not kern:
                continue
            kf, sf = fits.get((SWEEP_KERNELIZED, mode), (None, None)), fits.get((p, mode), (None, None))
            if kf[1] is None or sf[1] is None:    # too few tail sizes (--quick): the fits over every size
                kf, sf = (kf[0], kf[0]), (sf[0], sf[0])
            soft = H.series(rows, p, mode)
            text, nx, measured = crossover([(n, v / 1e3) for n, v in kern], [(n, v / 1e3) for n, v in soft],
                                 kf[1], sf[1])
            crosses[(p, mode)] = (nx, measured)
            print(f"  {mode:7s} {p:16s} {text}")
    load = [H.num(r["cores_others"]) for r in rows if r["status"] == "ok" and H.num(r["cores_others"]) is not None]
    if load:
        worst = max(rows, key=lambda r: H.num(r["cores_others"]) or 0)
        print(f"\ncontention: other processes used {np.mean(load):.2f} cores on average while timing, at most "
              f"{max(load):.2f} ({worst['mode']} N={worst['L']} {worst['provider']})"
              + ("  !! absolute times are inflated where that is high" if max(load) > 0.25 else ""))
    if elapsed is not None:
        print(f"sweep took {elapsed:.0f} s ({elapsed / 60:.1f} min)")
    return fits, crosses


def sweep_plot(rows, fits, crosses, path):
    meta = rows[0]

    def decorate(ax_t, ax_m):
        for p in SWEEP_PROVIDERS:
            single = [(int(r["L"]), H.num(r["median_ms"])) for r in rows
                      if r["provider"] == p and r["status"] == "ok" and r["reps"] == "1"]
            if single:
                ax_t.scatter(*zip(*single), s=120, facecolors="none", edgecolors=H.COLORS[SWEEP_PROVIDERS[p][1]],
                             linewidths=1.0)
        lines = []
        for (p, mode), (nx, measured) in crosses.items():
            if nx is None:
                continue
            if measured:
                ax_t.axvline(nx, color=H.COLORS[SWEEP_PROVIDERS[p][1]], ls=H.STYLES[mode][0], lw=0.8, alpha=0.6)
            lines.append(f"{mode} vs {p}: N ~ {nx / 1024:,.0f}k ({'measured' if measured else 'extrapolated'})")
        if lines:
            ax_t.text(0.98, 0.02, "kernelized+rpe faster beyond\n" + "\n".join(lines), transform=ax_t.transAxes,
                      fontsize=7, ha="right", va="bottom", bbox=dict(boxstyle="round", fc="white", alpha=0.8))
        ax_t.set_title("time (open circles: a single timed call; thin verticals: measured crossovers)", fontsize=9)
        for (p, mode), (full, _) in fits.items():
            if full is not None:
                ax_t.plot([], [], " ", label=f"{p} {mode}: N^{full['slope']:.2f}")
        ax_t.legend(fontsize=6, loc="upper left")  # the lower right holds the crossover box

    title = (f"kernelized attention + RelativeBias (FFT, PRF m={H.KERNELIZED_FEATURES}) vs softmax + RelativeBias vs "
             f"SDPA: CPU fp32, B={SWEEP_B} H={SWEEP_H} D={SWEEP_D}, {BENCH_THREADS} threads\n{meta['machine']}, torch {meta['torch']}, "
             f"posattn @ {meta['git_sha']}, run {meta['run_id']}")
    return H.plot_case(rows, title, path, decorate, colors={k: H.COLORS[v[1]] for k, v in SWEEP_PROVIDERS.items()})


def sweep_load_csv(path, run_id=None):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{path}: no rows")
    run_id = run_id or rows[-1]["run_id"]
    rows = [r for r in rows if r["run_id"] == run_id]
    if not rows:
        raise SystemExit(f"{path}: no rows with run_id {run_id}")
    return rows


def sweep_main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench --only kernelized", description=SWEEP_DOC.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N 1024-4096 only, for a smoke test (a minute or two)")
    parser.add_argument("--min-n", type=int, default=1024)
    parser.add_argument("--max-n", type=int, default=65536)
    parser.add_argument("--dense-max-n", type=int, default=8192, help="dense+rpe fwd up to this N, fwd+bwd to half")
    parser.add_argument("--providers", default=",".join(SWEEP_PROVIDERS))
    parser.add_argument("--modes", default=",".join(SWEEP_MODES))
    parser.add_argument("--inproc-s", type=float, default=4.0, help="predicted call time below which a config is "
                        "timed in this process with several calls")
    parser.add_argument("--inproc-target-s", type=float, default=10.0, help="timed seconds per in-process config")
    parser.add_argument("--max-reps", type=int, default=7)
    parser.add_argument("--sub-target-s", type=float, default=20.0, help="timed seconds per fresh-process config "
                        "(1-3 calls)")
    parser.add_argument("--cap-s", type=float, default=180.0, help="skip a config predicted to take longer")
    parser.add_argument("--budget-s", type=float, default=1500.0, help="skip configs that would end past this")
    parser.add_argument("--no-mem", action="store_true", help="no memory subprocesses for the in-process configs")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--from-csv", nargs="?", const="", metavar="RUN_ID",
                        help="no measurement: report and plot the last run (or RUN_ID) in the CSV")
    parser.add_argument("--csv", default=str(SWEEP_CSV))
    parser.add_argument("--png", default=str(SWEEP_PNG))
    args = parser.parse_args(argv)
    if args.from_csv is not None:
        rows = sweep_load_csv(args.csv, args.from_csv or None)
        fits, crosses = sweep_report(rows)
        if not args.no_plot:
            print(f"plot: {sweep_plot(rows, fits, crosses, args.png)}")
        return
    if args.quick:
        args.max_n = min(args.max_n, 4096)
        args.dense_max_n = min(args.dense_max_n, 4096)
    args.providers = set(args.providers.split(","))
    args.modes = set(args.modes.split(","))
    if args.providers - set(SWEEP_PROVIDERS) or args.modes - set(SWEEP_MODES):
        parser.error(f"providers from {list(SWEEP_PROVIDERS)}, modes from {SWEEP_MODES}")

    torch.set_num_threads(BENCH_THREADS)
    info = H.meta()
    meta = {k: info[k] for k in ("run_id", "machine", "cores", "gpu", "torch", "triton", "posattn", "git_sha")}
    meta["kernelized_backend"] = kernelized_backend()
    print(f"machine: {info['machine']}, {info['cores']} cores, {BENCH_THREADS} threads | torch {info['torch']} | posattn "
          f"{info['posattn']} @ {info['git_sha']} | posattn cpu ISA: {info['cpu_isa']}")
    print(f"kernelized+rpe runs: {meta['kernelized_backend']}")
    print(f"N {args.min_n}..{args.max_n} (dense+rpe fwd <= {args.dense_max_n}, fwd+bwd <= {args.dense_max_n // 2}); "
          f"in-process below {args.inproc_s:.0f} s per call, else a fresh process without warm-up; cap "
          f"{args.cap_s:.0f} s per config, budget {args.budget_s:.0f} s; 1-min load average now "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    rows, elapsed = run_sweep(args, meta)
    if H.git_sha() != meta["git_sha"]:
        print(f"WARNING: the checkout moved during the run ({meta['git_sha']} -> {H.git_sha()})")
    rows = [{k: str(v) for k, v in r.items()} for r in rows]
    fits, crosses = sweep_report(rows, elapsed)
    print(f"CSV: {os.path.relpath(args.csv, os.getcwd())} (run_id {meta['run_id']})")
    if not args.no_plot:
        print(f"plot: {sweep_plot(rows, fits, crosses, args.png)}")



# ---------------------------------------------------------------------------------------------

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--mem-child"]:
        H.mem_child(argv[1])
        return
    if "--targets" in argv:
        targets_main([a for a in argv if a != "--targets"])
        return
    if "kernelized" in argv and argv[argv.index("kernelized") - 1] == "--only":
        i = argv.index("kernelized")
        sweep_main(argv[:i - 1] + argv[i + 1:])
        return
    if "ring" in argv and argv[argv.index("ring") - 1] == "--only":
        from . import ring
        i = argv.index("ring")
        ring.main(argv[:i - 1] + argv[i + 1:])
        return
    if "varlen" in argv and argv[argv.index("varlen") - 1] == "--only":
        from . import varlen
        i = argv.index("varlen")
        varlen.main(argv[:i - 1] + argv[i + 1:])
        return
    if "decode" in argv and argv[argv.index("decode") - 1] == "--only":
        from . import decode
        i = argv.index("decode")
        decode.main(argv[:i - 1] + argv[i + 1:])
        return
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0],
                                     epilog="--targets: the CPU backend's target table; --only kernelized: the kernelized "
                                            "N sweep; --only ring / varlen / decode: sequence parallelism / packed "
                                            "variable-length batches / KV-cache decoding (each takes its own options "
                                            "after it)")
    parser.add_argument("--quick", action="store_true",
                        help="N 512 and 1024, 3 timed runs, the reference at 512 only: < 2 minutes")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--only", default=",".join(DEFAULT_CASES), help=f"cases from {list(H.CASES)}")
    parser.add_argument("--providers", default=None, help=f"from {list(H.PROVIDERS)}")
    parser.add_argument("--modes", default=",".join(H.MODES))
    parser.add_argument("--sizes", default=None, help="comma-separated N (default: by device, --quick)")
    parser.add_argument("--reps", type=int, default=None, help="timed runs per configuration (default 10, quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 2, quick 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-mem", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--batch", type=int, default=1, help="B (default 1)")
    parser.add_argument("--heads", type=int, default=8, help="H (default 8)")
    parser.add_argument("--head-dim", type=int, default=64, help="D (default 64)")
    parser.add_argument("--out", default=None, help="folder for the CSV and the plots (default bench/results; "
                                                    "bench/gpu_check.sh passes $OUT)")
    parser.add_argument("--csv", default=None, help="CSV file (default: bench.csv in --out)")
    args = parser.parse_args(argv)
    out_dir = args.out or str(H.RESULTS)
    os.makedirs(out_dir, exist_ok=True)
    csv_path = args.csv or os.path.join(out_dir, "bench.csv")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    cases = args.only.split(",")
    providers = args.providers.split(",") if args.providers else H.default_providers(args.device)
    modes = args.modes.split(",")
    for what, got, known in (("case", cases, H.CASES), ("provider", providers, H.PROVIDERS), ("mode", modes, H.MODES)):
        unknown = [g for g in got if g not in known]
        if unknown:
            parser.error(f"unknown {what}(s) {unknown}; choose from {list(known)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",")]
    elif args.quick:
        sizes = QUICK_SIZES[args.device]
    else:
        sizes = CPU_SIZES if args.device == "cpu" else CUDA_SIZES
    reps = args.reps or (3 if args.quick else 10)
    warmup = args.warmup or (1 if args.quick else 2)
    if args.quick:
        print("QUICK: N 512 and 1024, 3 timed runs, the reference at the smallest N; python -m bench runs the "
              "full sweep")
    dense_max_n = QUICK_DENSE_MAX_N[args.device] if args.quick else H.REFERENCE_MAX_N
    configs = plan(cases, providers, sizes, modes, args.device, args.dtype, warmup, b=args.batch, h=args.heads,
                   d=args.head_dim, dense_max_n=dense_max_n)
    # --quick's configurations are small: two memory children at once
    run(configs, reps, mem=not args.no_mem, plot=not args.no_plot, csv_path=csv_path, out_dir=out_dir,
        mem_jobs=2 if args.quick else 1)


if __name__ == "__main__":
    main()
