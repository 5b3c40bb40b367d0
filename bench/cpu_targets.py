"""Issue #5's targets for the C++ CPU backend: posattn against torch SDPA and FlexAttention, in one run.

    python -m bench --targets [--quick] [--reps R] [--no-mem] [--reference] [--only 1a,3b]
    (the same as python -m bench.cpu_targets ...)

2 threads, B=1, H=8, D=64, fp32 unless said. Every ratio is a speed-up of posattn
(backend="cpu") over a peer measured in the same process (> 1: posattn faster):

  1a/1b/1c  plain, N=2048: fwd >= 1.0x SDPA, fwd+bwd >= 1.0x SDPA, bf16 fwd >= 1.5x SDPA bf16.
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

--quick uses smaller sizes (1: N=1024, 2 and 3a: N=2048, 3b: N=4096), so its PASS/MISS are
indicative only. Unavailable providers are reported as n/a with the reason. Table on stdout; CSV
rows appended to bench/results/cpu_targets.csv.
"""
import argparse
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

if __package__ in (None, ""):   # run as python bench/<this>.py: import it as part of the bench package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"
from . import harness as H  # noqa: E402

THREADS = 2
FMA_PEAK_PER_CORE = 117.5      # GFLOP/s fp32, AVX-512 FMA, measured on the 2-core dev machine
TOL = {"float32": 1e-3, "bfloat16": 3e-2}
CSV_PATH = H.RESULTS / "cpu_targets.csv"
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
    Target("1a", "plain", "fwd", "float32", 2048, 1024, (POSATTN, "sdpa"), speedup=1.0),
    Target("1b", "plain", "fwd+bwd", "float32", 2048, 1024, (POSATTN, "sdpa"), speedup=1.0),
    Target("1c", "plain", "fwd", "bfloat16", 2048, 1024, (POSATTN, "sdpa"), speedup=1.5),
    Target("2a", "alibi", "fwd", "float32", 4096, 2048, (POSATTN, "sdpa+bias", "flex"), speedup=1.3),
    Target("2b", "alibi-bidir", "fwd", "float32", 4096, 2048, (POSATTN, "sdpa+bias", "flex"), speedup=1.3),
    Target("3a", "relbias", "fwd+bwd", "float32", 4096, 2048, (POSATTN, "sdpa+bias"), speedup=3.0, mem_ratio=0.1),
    Target("3b", "relbias", "fwd+bwd", "float32", 16384, 4096, (POSATTN,), mem_abs_mib=2048.0, time_in_process=False),
]
INFO_ONLY = {"reference"}      # timed and shown, never a peer in a verdict


def judge(target, rows):
    """Verdict strings for the posattn row, and the speed-up of posattn over the best peer."""
    by = {r.cfg.provider: r for r in rows}
    pa = by[POSATTN]
    peers = [r for r in rows if r.cfg.provider != POSATTN and r.cfg.provider not in INFO_ONLY]
    verdicts, best_ratio = [], None
    wrong = pa.rel_diff is not None and pa.rel_diff > TOL[target.dtype]
    if target.speedup is not None:
        timed = [r for r in peers if r.median is not None]
        if pa.median is None:
            verdicts.append(f"speed n/a (posattn: {pa.na or 'not run'})")
        elif not timed:
            verdicts.append("speed n/a (no peer ran)")
        else:
            best = min(timed, key=lambda r: r.median)
            best_ratio = best.median / pa.median
            ok = best_ratio >= target.speedup and not wrong
            verdicts.append(f"speed {'PASS' if ok else 'MISS'} {best_ratio:.2f}x vs {best.cfg.provider} "
                            f"(target >= {target.speedup}x)" + (" [result off: MISS]" if wrong else ""))
    if target.mem_ratio is not None:
        mem_peers = [r for r in peers if r.peak_mib is not None]
        if pa.peak_mib is None:
            verdicts.append(f"memory n/a (posattn: {pa.mem_note or pa.na or 'not run'})")
        elif not mem_peers:
            verdicts.append("memory n/a (no peer measured)")
        else:
            peer = min(mem_peers, key=lambda r: r.peak_mib)
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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench --targets", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller N and fewer reps (a couple of minutes)")
    parser.add_argument("--reps", type=int, default=None, help="timed runs per configuration (default 10, quick 5)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls per configuration (default 2, quick 1)")
    parser.add_argument("--no-mem", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--reference", action="store_true", help="also time posattn's dense reference (info only)")
    parser.add_argument("--only", default=None, help="comma-separated target names to run, e.g. 1a,3b")
    args = parser.parse_args(argv)
    reps = args.reps or (5 if args.quick else 10)
    warmup = args.warmup or (1 if args.quick else 2)
    only = set(args.only.split(",")) if args.only else None
    if only and only - {t.name for t in TARGETS}:
        parser.error(f"--only {args.only}: unknown target(s) {sorted(only - {t.name for t in TARGETS})}; choose from "
                     f"{[t.name for t in TARGETS]}")

    torch.set_num_threads(THREADS)
    info = H.meta()
    peak = FMA_PEAK_PER_CORE * THREADS
    print(f"machine: {info['machine']}, {info['cores']} cores, {THREADS} threads | torch {info['torch']} | posattn "
          f"{info['posattn']} @ {info['git_sha']} | posattn cpu ISA: {info['cpu_isa']}")
    print(f"fp32 FMA peak {peak:.0f} GFLOP/s ({FMA_PEAK_PER_CORE} per core x {THREADS}); B=1 H=8 D=64; "
          f"{reps} timed runs after {warmup} warm-up(s), providers round-robin")
    if args.quick:
        print("QUICK: N reduced (1: 1024, 2 and 3a: 2048, 3b: 4096 instead of 2048/4096/4096/16384): "
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
                     f"{100 * gf / peak:.0f}%" if gf and t.dtype == "float32" else "-",
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
    print(f"while timing: this process used {own:.2f} of {THREADS} cores, other processes {others:.2f}, hypervisor "
          f"steal {steal:.2f}; 1-min load average {load_start:.1f} at start, {load_end:.1f} after timing")
    if own < 0.85 * THREADS:
        print(f"WARNING: this process got less than its {THREADS} cores: absolute times and GFLOP/s are low; the "
              f"round-robin ratios are less affected but noisier; rerun on an idle machine")
    print(f"done in {elapsed:.0f} s; CSV: {H.write_csv(CSV_PATH, csv_rows)}")


if __name__ == "__main__":
    main()
