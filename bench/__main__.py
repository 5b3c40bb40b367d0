"""posattn against its peers, side by side in one process, on the same inputs.

    python -m bench [--quick] [--device cpu|cuda] [--dtype float32] [--only CASE,...] [--providers P,...]
    python -m bench --targets [--quick] ...     issue #5's CPU target table (bench/cpu_targets.py)
    python -m bench --only kernelized ...       issue #6's kernelized N sweep (bench/kernelized_scaling.py)

Cases (``bench.harness.CASES``): plain, causal, ALiBi (causal), learnable RelativeBias (M=128),
learnable T5Bias (32 buckets), RoPE (causal; posattn's fused rotation against rotary-then-SDPA /
Flex) and a causal sliding window of 256; forward and forward+backward (every input that requires
grad, the bias table included). Providers (``bench.harness.PROVIDERS``): posattn's backend for the
device (posattn-cpu, or posattn-triton on CUDA), torch SDPA, SDPA with the position bias
materialised as a float mask (gathered under autograd when the table is learnable), FlexAttention
under torch.compile with the matching score_mod and block mask (its first call, the compile, is
reported apart and never timed; no CPU backward), and the dense posattn.reference (N <= 2048).

N: 512 ... 8192 on CPU (--quick: 512 and 1024, the reference at 512 only), 512 ... 32768 on CUDA; B=1, H=8,
D=64. Output: a table on stdout (median ms and the speed-up of posattn over each peer = peer time /
posattn time, > 1: posattn faster; peak memory), CSV rows appended to bench/results/bench.csv and a
PNG per case, bench/results/<case>.png (log-log time and memory vs N). See bench/harness.py for the
timing and memory method.
"""
import argparse
import os
import sys
import time

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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--mem-child"]:
        H.mem_child(argv[1])
        return
    if "--targets" in argv:
        from . import cpu_targets
        cpu_targets.main([a for a in argv if a != "--targets"])
        return
    if "kernelized" in argv and argv[argv.index("kernelized") - 1] == "--only":
        from . import kernelized_scaling
        i = argv.index("kernelized")
        kernelized_scaling.main(argv[:i - 1] + argv[i + 1:])
        return
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0],
                                     epilog="--targets: issue #5's CPU target table; --only kernelized: issue #6's "
                                            "kernelized N sweep (each takes its own options after it)")
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
    parser.add_argument("--csv", default=str(CSV_PATH))
    args = parser.parse_args(argv)
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
    configs = plan(cases, providers, sizes, modes, args.device, args.dtype, warmup, dense_max_n=dense_max_n)
    # --quick's configurations are small: two memory children at once
    run(configs, reps, mem=not args.no_mem, plot=not args.no_plot, csv_path=args.csv, mem_jobs=2 if args.quick else 1)


if __name__ == "__main__":
    main()
