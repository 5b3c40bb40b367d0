"""Issue #6's scaling bench: kernelized attention with RPE (FFT path) versus softmax attention, N = 1k … 64k.

    python -m bench --only kernelized [--quick] [--max-n 65536] [--cap-s 180] [--budget-s 1500]
    python -m bench --only kernelized --from-csv   # table, fits and plot again from the last run in the CSV
    (the same as python -m bench.kernelized_scaling ...)

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
import argparse
import csv
import math
import os
import sys
import time

import numpy as np
import torch

if __package__ in (None, ""):   # run as python bench/<this>.py: import it as part of the bench package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"
from . import harness as H  # noqa: E402

THREADS = 2
B, H_, D = 1, 8, 64
MODES = H.MODES
# display name -> (harness case, harness provider)
PROVIDERS = {"kernelized+rpe": ("relbias-full", "kernelized"), "posattn-cpu+rpe": ("relbias-full", "posattn-cpu"),
             "sdpa": ("plain", "sdpa"), "dense+rpe": ("relbias-full", "reference")}
NAME = {v[1]: k for k, v in PROVIDERS.items()}
KERNELIZED = "kernelized+rpe"
# growth per doubling assumed before a provider has two measured sizes
PRIOR_GROWTH = {"kernelized+rpe": 2.3, "posattn-cpu+rpe": 4.0, "sdpa": 4.0, "dense+rpe": 4.0}
TAIL_N = 4096
CSV_PATH = H.RESULTS / "kernelized_scaling.csv"
PNG_PATH = H.RESULTS / "kernelized_scaling.png"
CSV_FIELDS = ["run_id", "case", "mode", "provider", "B", "H", "L", "S", "D", "dtype", "device", "threads", "median_ms",
              "q20_ms", "q80_ms", "reps", "peak_mem_mib", "where", "hwm_reset", "cores_own", "cores_others",
              "cores_steal", "loadavg1", "status", "note", "kernelized_backend", "machine", "cores", "gpu", "torch",
              "triton", "posattn", "git_sha"]


def config(name, mode, n, warmup=1):
    case, provider = PROVIDERS[name]
    return H.Config(case, mode, provider, n, b=B, h=H_, d=D, warmup=warmup, dense_max_n=n)


def kernelized_backend():
    """Which path kernelized_attention's default backend takes on CPU tensors here."""
    cfg = config(KERNELIZED, "fwd", 64)
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


def predict(history, key, n, fallback_from=None):
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


def sweep(args, meta):
    sizes = []
    n = args.min_n
    while n <= args.max_n:
        sizes.append(n)
        n *= 2
    providers = [p for p in PROVIDERS if p in args.providers]
    modes = [m for m in MODES if m in args.modes]
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
        case = PROVIDERS[provider][0]
        row = dict(meta, case=case, mode=mode, provider=provider, B=B, H=H_, L=n, S=n, D=D, dtype="float32",
                   device="cpu", threads=THREADS, median_ms=H.fmt(med, 1e3), q20_ms=H.fmt(q20, 1e3),
                   q80_ms=H.fmt(q80, 1e3), reps=len(times) if times else 0, peak_mem_mib=H.fmt(peak), where=where,
                   hwm_reset=hwm_reset, cores_own=H.fmt(cores[0], 1, 3), cores_others=H.fmt(cores[1], 1, 3),
                   cores_steal=H.fmt(cores[2], 1, 3), loadavg1=H.fmt(load, 1, 3), status=status, note=note)
        if extension_stamp() != ext0:
            row["note"] = (row["note"] + "; " if row["note"] else "") + "posattn._C rebuilt during the run"
        row = {k: row.get(k, "") for k in CSV_FIELDS}
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
                pred = predict(history_t, key, n, fallback)
                pred_mem = predict(history_m, key, n)
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
                res = H.measure([config(p, mode, n) for p, _ in cheap], reps, verbose=False)
                load = os.getloadavg()[0]
                ran = [r for r in res if r.na is None]
                for r in res:
                    if r.na is not None:
                        emit(NAME[r.cfg.provider], mode, n, "failed", where="in-proc", note=r.na)
                if args.no_mem:
                    for r in ran:
                        r.mem_note = "memory skipped (--no-mem)"
                else:
                    H.measure_memory(ran, verbose=False, timeout=60 + 10 * max((max(r.times) for r in ran), default=1))
                for r in ran:
                    emit(NAME[r.cfg.provider], mode, n, "ok", times=r.times, peak=r.peak_mib, where="in-proc",
                         hwm_reset="" if r.peak_mib is None else int("warm-up" not in r.mem_note), cores=r.cores,
                         load=load, note=r.mem_note)

            # costly providers: time and memory from the same fresh process, no warm-up
            for p, pred, reps in costly:
                elapsed = time.perf_counter() - t_start
                if elapsed + pred * reps > args.budget_s:
                    emit(p, mode, n, "skipped", note=f"predicted {pred * reps:.0f} s would end past --budget-s "
                                                     f"{args.budget_s:.0f} s (at {elapsed:.0f} s)")
                    continue
                out, err = H.run_mem_child([config(p, mode, n, warmup=0)], max(120.0, 3 * pred * reps + 60), reps=reps)
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

def fit(pts, min_n=0):
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


def report(rows, elapsed=None):
    present = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    meta = rows[0]
    print(f"\n== run {meta['run_id']}: {meta['machine']}, {meta['cores']} cores, {THREADS} threads | torch "
          f"{meta['torch']} | posattn {meta['posattn']} @ {meta['git_sha']}")
    print(f"   fp32, B={B} H={H_} D={D}, RelativeBias table [H, 2N+1]; kernelized: PRF m={H.KERNELIZED_FEATURES}, "
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
            full, tail = fit(pts), fit(pts, TAIL_N)
            fits[(p, mode)] = (full, tail)
            mem = fit(H.series(rows, p, mode, "peak_mem_mib"), TAIL_N)
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
        kern = H.series(rows, KERNELIZED, mode)
        for p in present:
            if p == KERNELIZED or not kern:
                continue
            kf, sf = fits.get((KERNELIZED, mode), (None, None)), fits.get((p, mode), (None, None))
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


def plot(rows, fits, crosses, path):
    meta = rows[0]

    def decorate(ax_t, ax_m):
        for p in PROVIDERS:
            single = [(int(r["L"]), H.num(r["median_ms"])) for r in rows
                      if r["provider"] == p and r["status"] == "ok" and r["reps"] == "1"]
            if single:
                ax_t.scatter(*zip(*single), s=120, facecolors="none", edgecolors=H.COLORS[PROVIDERS[p][1]],
                             linewidths=1.0)
        lines = []
        for (p, mode), (nx, measured) in crosses.items():
            if nx is None:
                continue
            if measured:
                ax_t.axvline(nx, color=H.COLORS[PROVIDERS[p][1]], ls=H.STYLES[mode][0], lw=0.8, alpha=0.6)
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
             f"SDPA: CPU fp32, B={B} H={H_} D={D}, {THREADS} threads\n{meta['machine']}, torch {meta['torch']}, "
             f"posattn @ {meta['git_sha']}, run {meta['run_id']}")
    return H.plot_case(rows, title, path, decorate, colors={k: H.COLORS[v[1]] for k, v in PROVIDERS.items()})


def load_csv(path, run_id=None):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{path}: no rows")
    run_id = run_id or rows[-1]["run_id"]
    rows = [r for r in rows if r["run_id"] == run_id]
    if not rows:
        raise SystemExit(f"{path}: no rows with run_id {run_id}")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench --only kernelized", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N 1024-4096 only, for a smoke test (a minute or two)")
    parser.add_argument("--min-n", type=int, default=1024)
    parser.add_argument("--max-n", type=int, default=65536)
    parser.add_argument("--dense-max-n", type=int, default=8192, help="dense+rpe fwd up to this N, fwd+bwd to half")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--modes", default=",".join(MODES))
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
    parser.add_argument("--csv", default=str(CSV_PATH))
    parser.add_argument("--png", default=str(PNG_PATH))
    args = parser.parse_args(argv)
    if args.from_csv is not None:
        rows = load_csv(args.csv, args.from_csv or None)
        fits, crosses = report(rows)
        if not args.no_plot:
            print(f"plot: {plot(rows, fits, crosses, args.png)}")
        return
    if args.quick:
        args.max_n = min(args.max_n, 4096)
        args.dense_max_n = min(args.dense_max_n, 4096)
    args.providers = set(args.providers.split(","))
    args.modes = set(args.modes.split(","))
    if args.providers - set(PROVIDERS) or args.modes - set(MODES):
        parser.error(f"providers from {list(PROVIDERS)}, modes from {MODES}")

    torch.set_num_threads(THREADS)
    info = H.meta()
    meta = {k: info[k] for k in ("run_id", "machine", "cores", "gpu", "torch", "triton", "posattn", "git_sha")}
    meta["kernelized_backend"] = kernelized_backend()
    print(f"machine: {info['machine']}, {info['cores']} cores, {THREADS} threads | torch {info['torch']} | posattn "
          f"{info['posattn']} @ {info['git_sha']} | posattn cpu ISA: {info['cpu_isa']}")
    print(f"kernelized+rpe runs: {meta['kernelized_backend']}")
    print(f"N {args.min_n}..{args.max_n} (dense+rpe fwd <= {args.dense_max_n}, fwd+bwd <= {args.dense_max_n // 2}); "
          f"in-process below {args.inproc_s:.0f} s per call, else a fresh process without warm-up; cap "
          f"{args.cap_s:.0f} s per config, budget {args.budget_s:.0f} s; 1-min load average now "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    rows, elapsed = sweep(args, meta)
    if H.git_sha() != meta["git_sha"]:
        print(f"WARNING: the checkout moved during the run ({meta['git_sha']} -> {H.git_sha()})")
    rows = [{k: str(v) for k, v in r.items()} for r in rows]
    fits, crosses = report(rows, elapsed)
    print(f"CSV: {os.path.relpath(args.csv, os.getcwd())} (run_id {meta['run_id']})")
    if not args.no_plot:
        print(f"plot: {plot(rows, fits, crosses, args.png)}")


if __name__ == "__main__":
    main()
