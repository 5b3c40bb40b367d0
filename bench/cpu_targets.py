"""Issue #5's targets for the C++ CPU backend: posattn against torch SDPA and FlexAttention, in one run.

    python bench/cpu_targets.py [--quick] [--reps R] [--no-mem] [--reference] [--only 1a,3b]

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

Harness: every configuration is built and warmed before any is timed; providers of one target
are timed round-robin (robust to load drifting on a shared machine); median and 20/80 %
quantiles of --reps runs; GFLOP/s from one formula (fwd 4·B·H·L·S·D, halved when causal;
fwd+bwd 3.5x fwd) next to the fp32 FMA peak (AVX-512 FMA, measured ~117 GFLOP/s per core).
Backward timing covers every input that requires grad (q, k, v and the table). Outputs and
gradients of the providers of one target are compared at warm-up (max |diff| relative to the
first peer's max |value|); a posattn result off by more than the dtype's tolerance is a MISS.

Peak memory: each (provider, case) runs again in a fresh subprocess (`--one PROVIDER CASE N`):
baseline = RSS after imports and input creation; then provider set-up, one warm-up call
(compiles Flex), the high-water mark is reset (/proc/self/clear_refs), one measured call;
peak_mem = VmHWM - baseline (set-up that persists, e.g. a materialised mask, counts; compile
transients do not; setup_MB = RSS after the warm-up - baseline, e.g. the mask or what torch.compile
keeps). Where the reset is not allowed, the high-water mark includes the warm-up. The run ends
with the cores this process and other processes used while timing (per target in the CSV): on a
shared 2-core machine a compile next door halves absolute speed (the round-robin ratios suffer
less). --only 1a,3b runs a subset of the targets.

--quick uses smaller sizes (1: N=1024, 2 and 3a: N=2048, 3b: N=4096), so its PASS/MISS are
indicative only. Unavailable providers (posattn's extension not built, Flex failing to compile)
are reported as n/a with the reason. Table on stdout; CSV rows appended to
bench/results/cpu_targets.csv. A one-off script until `python -m bench` (issue #7) takes it over.
"""
import argparse
import csv
import datetime
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

import posattn
from _common import cpu_seconds, git_sha, machine, reason, reset_hwm, run_child, status_kib

THREADS = 2
B, H, D = 1, 8, 64
M = 128                        # RelativeBias max distance: table [H, 2M+1]
FMA_PEAK_PER_CORE = 117.5      # GFLOP/s fp32, AVX-512 FMA, measured on the 2-core dev machine
TOL = {torch.float32: 1e-3, torch.bfloat16: 3e-2}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSV_PATH = os.path.join(ROOT, "bench", "results", "cpu_targets.csv")


@dataclass(frozen=True)
class Case:
    op: str                    # plain | alibi | relbias
    mode: str                  # fwd | fwd+bwd
    dtype: torch.dtype
    causal: bool = False


CASES = {
    "plain-fwd": Case("plain", "fwd", torch.float32),
    "plain-fwdbwd": Case("plain", "fwd+bwd", torch.float32),
    "plain-fwd-bf16": Case("plain", "fwd", torch.bfloat16),
    "alibi-causal-fwd": Case("alibi", "fwd", torch.float32, causal=True),
    "alibi-fwd": Case("alibi", "fwd", torch.float32),
    "relbias-fwdbwd": Case("relbias", "fwd+bwd", torch.float32),
}


@dataclass
class Target:
    name: str
    case: str
    n: int
    n_quick: int
    providers: list
    speedup: float = None      # posattn time <= best peer time / speedup
    mem_ratio: float = None    # posattn peak <= the peer's peak * mem_ratio
    mem_abs_mib: float = None  # posattn peak < this
    time_in_process: bool = True


TARGETS = [
    Target("1a", "plain-fwd", 2048, 1024, ["posattn", "sdpa"], speedup=1.0),
    Target("1b", "plain-fwdbwd", 2048, 1024, ["posattn", "sdpa"], speedup=1.0),
    Target("1c", "plain-fwd-bf16", 2048, 1024, ["posattn", "sdpa"], speedup=1.5),
    Target("2a", "alibi-causal-fwd", 4096, 2048, ["posattn", "sdpa+alibi-mask", "flex+alibi"], speedup=1.3),
    Target("2b", "alibi-fwd", 4096, 2048, ["posattn", "sdpa+alibi-mask", "flex+alibi"], speedup=1.3),
    Target("3a", "relbias-fwdbwd", 4096, 2048, ["posattn", "sdpa+gathered-bias"], speedup=3.0, mem_ratio=0.1),
    Target("3b", "relbias-fwdbwd", 16384, 4096, ["posattn"], mem_abs_mib=2048.0, time_in_process=False),
]
INFO_ONLY = {"reference"}      # timed and shown, never a peer in a verdict


# ---------------------------------------------------------------------------------------------
# inputs and providers

@dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    do: torch.Tensor = None
    slopes: torch.Tensor = None
    table: torch.Tensor = None


def make_inputs(case, n):
    grad = case.mode == "fwd+bwd"
    q, k, v = (torch.randn(B, H, n, D).to(case.dtype).requires_grad_(grad) for _ in range(3))
    x = Inputs(q, k, v)
    if grad:
        x.do = torch.randn(B, H, n, D).to(case.dtype)
    if case.op == "alibi":
        x.slopes = posattn.alibi_slopes(H)
    if case.op == "relbias":
        x.table = (0.1 * torch.randn(H, 2 * M + 1)).requires_grad_(grad)
    return x


def grad_inputs(x):
    return [t for t in (x.q, x.k, x.v, x.table) if t is not None and t.requires_grad]


def _posattn_fwd(backend):
    def build(case, x, n):
        def fwd():
            bias = None
            if case.op == "alibi":
                bias = posattn.ALiBi(x.slopes)
            elif case.op == "relbias":
                bias = posattn.RelativeBias(x.table)
            return posattn.attention(x.q, x.k, x.v, causal=case.causal, bias=bias, backend=backend)
        return fwd
    return build


def sdpa(case, x, n):
    if case.op != "plain":
        raise ValueError(f"provider 'sdpa' has no {case.op} bias")
    return lambda: F.scaled_dot_product_attention(x.q, x.k, x.v, is_causal=case.causal)


def sdpa_alibi_mask(case, x, n):
    pos = torch.arange(n)
    rel = pos[None, :] - pos[:, None]                                      # k_pos - q_pos, [L, S]
    mask = -x.slopes[:, None, None] * rel.abs().float()                    # [H, L, S]
    if case.causal:   # SDPA refuses attn_mask with is_causal=True: fold causality into the mask
        mask = mask.masked_fill(rel > 0, float("-inf"))
    mask = mask[None].to(x.q.dtype)                                        # [1, H, L, S]
    return lambda: F.scaled_dot_product_attention(x.q, x.k, x.v, attn_mask=mask)


def flex_alibi(case, x, n):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    slopes = x.slopes

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (kv_idx - q_idx).abs()

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    block_mask = create_block_mask(causal, None, None, n, n, device="cpu") if case.causal else None
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda: compiled(x.q, x.k, x.v, score_mod=alibi, block_mask=block_mask)


def sdpa_gathered_bias(case, x, n):
    if case.op != "relbias":
        raise ValueError(f"provider 'sdpa+gathered-bias' is for relbias, not {case.op}")
    pos = torch.arange(n)
    idx = (pos[None, :] - pos[:, None]).clamp(-M, M) + M                   # [L, S]
    # gathered inside the step, under autograd: SDPA's mask gradient flows into the table
    return lambda: F.scaled_dot_product_attention(x.q, x.k, x.v, attn_mask=x.table[:, idx][None])


PROVIDERS = {
    "posattn": _posattn_fwd("cpu"),
    "reference": _posattn_fwd("reference"),
    "sdpa": sdpa,
    "sdpa+alibi-mask": sdpa_alibi_mask,
    "flex+alibi": flex_alibi,
    "sdpa+gathered-bias": sdpa_gathered_bias,
}


def build_step(provider, case, x, n):
    """One call of the provider: the forward, or forward + backward into every input that requires grad."""
    fwd = PROVIDERS[provider](case, x, n)
    if case.mode == "fwd":
        return lambda: [fwd()]
    wrt = grad_inputs(x)

    def step():
        out = fwd()
        return [out, *torch.autograd.grad(out, wrt, x.do)]
    return step


def flops(case, n):
    fwd = 4.0 * B * H * n * n * D / (2 if case.causal else 1)
    return fwd * (3.5 if case.mode == "fwd+bwd" else 1.0)


# ---------------------------------------------------------------------------------------------
# memory: one (provider, case, N) per fresh process


def one(provider, case_key, n, warmup):
    """Child of --one: print one RESULT line (JSON) with this configuration's memory."""
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    case = CASES[case_key]
    x = make_inputs(case, n)
    base = status_kib("VmRSS")
    step = build_step(provider, case, x, n)
    for _ in range(warmup):
        step()
    resident = status_kib("VmRSS")
    reset = reset_hwm()
    start = time.perf_counter()
    result = step()
    seconds = time.perf_counter() - start
    del result
    hwm = status_kib("VmHWM")
    print("RESULT " + json.dumps(dict(base_mib=base / 1024, setup_mib=(resident - base) / 1024, hwm_mib=hwm / 1024,
                                      peak_mib=(hwm - base) / 1024,
                                      maxrss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                      seconds=seconds, hwm_reset=reset)), flush=True)


def measure_memory(provider, case_key, n, warmup, timeout):
    return run_child(__file__, ["--one", provider, case_key, n, "--warmup", warmup], timeout)


# ---------------------------------------------------------------------------------------------
# the run

@dataclass
class Row:
    provider: str
    step: object = None
    na: str = None                  # reason the provider is unavailable
    first_call_s: float = None      # first warm-up call; for Flex this is compile + one run
    times: list = field(default_factory=list)
    rel_diff: float = None          # vs the target's anchor provider
    mem: dict = None
    mem_na: str = None

    @property
    def median(self):
        return float(np.median(self.times)) if self.times else None


def rel_diff(a, b):
    """max |a - b| / max |b| over the paired tensors (output, then gradients)."""
    worst = 0.0
    for s, t in zip(a, b):
        s, t = s.detach().float(), t.detach().float()
        worst = max(worst, float((s - t).abs().max() / t.abs().max().clamp_min(1e-30)))
    return worst


def warm_target(target, n, warmup):
    case = CASES[target.case]
    torch.manual_seed(0)
    x = make_inputs(case, n)
    rows, first = [], {}
    for name in target.providers:
        row = Row(name)
        rows.append(row)
        if not target.time_in_process:
            continue
        try:
            row.step = build_step(name, case, x, n)
            start = time.perf_counter()
            first[name] = row.step()
            row.first_call_s = time.perf_counter() - start
            for _ in range(warmup - 1):
                row.step()
        except Exception as e:  # a provider that cannot run is reported, never fatal
            row.step, row.na = None, reason(e)
    anchor = next((first[r.provider] for r in rows if r.provider in first and r.provider != "posattn"), None)
    if anchor is not None:
        for r in rows:
            if r.provider in first and first[r.provider] is not anchor:
                r.rel_diff = rel_diff(first[r.provider], anchor)
    return rows


def time_target(rows, reps):
    for _ in range(reps):
        for row in rows:
            if row.step is None:
                continue
            try:
                start = time.perf_counter()
                row.step()
                row.times.append(time.perf_counter() - start)
            except Exception as e:
                row.step, row.na, row.times = None, "failed while timing: " + reason(e), []


def judge(target, rows, dtype):
    """Verdict strings for the posattn row, and the ratio of each row (posattn speed-up over it)."""
    by = {r.provider: r for r in rows}
    pa = by.get("posattn")
    peers = [r for r in rows if r.provider != "posattn" and r.provider not in INFO_ONLY]
    ratios, verdicts = {}, []
    if pa.median is not None:
        for r in rows:
            if r is not pa and r.median is not None:
                ratios[r.provider] = r.median / pa.median
    wrong = pa.rel_diff is not None and pa.rel_diff > TOL[dtype]
    if target.speedup is not None:
        timed = [r for r in peers if r.median is not None]
        if pa.median is None:
            verdicts.append(f"speed n/a (posattn: {pa.na or 'not run'})")
        elif not timed:
            verdicts.append("speed n/a (no peer ran)")
        else:
            best = min(timed, key=lambda r: r.median)
            ratios["posattn"] = best.median / pa.median
            ok = ratios["posattn"] >= target.speedup and not wrong
            verdicts.append(f"speed {'PASS' if ok else 'MISS'} {ratios['posattn']:.2f}x vs {best.provider} "
                            f"(target >= {target.speedup}x)" + (" [result off: MISS]" if wrong else ""))
    if target.mem_ratio is not None:
        mem_peers = [r for r in peers if r.mem is not None]
        if pa.mem is None:
            verdicts.append(f"memory n/a (posattn: {pa.mem_na or pa.na or 'not run'})")
        elif not mem_peers:
            verdicts.append("memory n/a (no peer measured)")
        else:
            peer = min(mem_peers, key=lambda r: r.mem["peak_mib"])
            frac = pa.mem["peak_mib"] / max(peer.mem["peak_mib"], 1e-9)
            verdicts.append(f"memory {'PASS' if frac <= target.mem_ratio else 'MISS'} {frac:.3f} of {peer.provider}'s "
                            f"peak (target <= {target.mem_ratio})")
    if target.mem_abs_mib is not None:
        if pa.mem is None:
            verdicts.append(f"memory n/a (posattn: {pa.mem_na or pa.na or 'not run'})")
        else:
            ok = pa.mem["peak_mib"] < target.mem_abs_mib
            verdicts.append(f"memory {'PASS' if ok else 'MISS'} {pa.mem['peak_mib']:.0f} MiB "
                            f"(target < {target.mem_abs_mib:.0f} MiB)")
    return ratios, verdicts


def describe(target, n):
    case = CASES[target.case]
    what = {"plain": "plain", "alibi": "ALiBi " + ("causal" if case.causal else "bidirectional"),
            "relbias": f"RelativeBias M={M} (table grad incl.)"}[case.op]
    dt = "bf16" if case.dtype == torch.bfloat16 else "fp32"
    return f"{what}, {case.mode}, {dt}, N={n}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller N and fewer reps (a couple of minutes)")
    parser.add_argument("--reps", type=int, default=None, help="timed runs per configuration (default 10, quick 5)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls per configuration (default 2, quick 1)")
    parser.add_argument("--no-mem", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--reference", action="store_true", help="also time posattn's dense reference (info only)")
    parser.add_argument("--only", default=None, help="comma-separated target names to run, e.g. 1a,3b")
    parser.add_argument("--one", nargs=3, metavar=("PROVIDER", "CASE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    reps = args.reps or (5 if args.quick else 10)
    warmup = args.warmup or (1 if args.quick else 2)
    if args.one:
        provider, case_key, n = args.one
        one(provider, case_key, int(n), warmup)
        return

    torch.set_num_threads(THREADS)
    model, cores = machine()
    sha = git_sha()
    peak = FMA_PEAK_PER_CORE * THREADS
    try:
        isa = posattn.ops.cpu_isa()
    except Exception as e:
        isa = f"n/a ({reason(e)})"
    print(f"machine: {model}, {cores} cores, {THREADS} threads | torch {torch.__version__} | posattn "
          f"{posattn.__version__} @ {sha} | posattn cpu ISA: {isa}")
    print(f"fp32 FMA peak {peak:.0f} GFLOP/s ({FMA_PEAK_PER_CORE} per core x {THREADS}); B={B} H={H} D={D}; "
          f"{reps} timed runs after {warmup} warm-up(s), providers round-robin")
    if args.quick:
        print("QUICK: N reduced (1: 1024, 2 and 3a: 2048, 3b: 4096 instead of 2048/4096/4096/16384): "
              "PASS/MISS are indicative only")
    only = set(args.only.split(",")) if args.only else None
    if only and only - {t.name for t in TARGETS}:
        parser.error(f"--only {args.only}: unknown target(s) {sorted(only - {t.name for t in TARGETS})}; choose from "
                     f"{[t.name for t in TARGETS]}")
    targets = []
    for t in TARGETS:
        if only and t.name not in only:
            continue
        providers = t.providers + (["reference"] if args.reference and t.time_in_process else [])
        targets.append(Target(**{**t.__dict__, "providers": providers}))

    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    warmed = []
    for t in targets:        # warm every configuration before timing any
        n = t.n_quick if args.quick else t.n
        print(f"warming {t.name} ({describe(t, n)}) ...", flush=True)
        warmed.append((t, n, warm_target(t, n, warmup)))
    usage = {}
    for t, n, rows in warmed:
        if not t.time_in_process:
            continue
        print(f"timing {t.name} ...", flush=True)
        usage[t.name] = cores_while(lambda: time_target(rows, reps))
        for r in rows:
            r.step = None     # free the closures' graphs before the next target
    load_end = os.getloadavg()[0]
    if args.no_mem:
        for _, _, rows in warmed:
            for r in rows:
                r.mem_na = "memory skipped (--no-mem)"
    else:
        timeout = 300 if args.quick else 900
        for t, n, rows in warmed:
            for r in rows:
                if r.na is not None:
                    continue
                print(f"memory {t.name} {r.provider} ...", flush=True)
                r.mem, r.mem_na = measure_memory(r.provider, t.case, n, warmup, timeout)
    elapsed = time.perf_counter() - t_start

    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    csv_rows = []
    for t, n, rows in warmed:
        case = CASES[t.case]
        ratios, verdicts = judge(t, rows, case.dtype)
        goal = []
        if t.speedup is not None:
            peers = ", ".join(p for p in t.providers if p != "posattn" and p not in INFO_ONLY)
            goal.append(f"posattn >= {t.speedup}x the best of {peers}")
        if t.mem_ratio is not None:
            goal.append(f"peak memory <= {t.mem_ratio} of the peer's")
        if t.mem_abs_mib is not None:
            goal.append(f"peak memory < {t.mem_abs_mib:.0f} MiB")
        print(f"\n== {t.name}  {describe(t, n)}: {'; '.join(goal)}")
        own, others, steal = usage.get(t.name, (float("nan"),) * 3)
        if t.time_in_process and (others > 0.25 or steal > 0.1):
            print(f"  !! contended while timing: this process {own:.2f} cores, other processes {others:.2f}, "
                  f"hypervisor steal {steal:.2f}")
        print(f"  {'provider':20s} {'median ms':>10s} {'q20-q80 ms':>17s} {'GFLOP/s':>8s} {'%peak':>6s} "
              f"{'speed-up':>9s} {'peak MiB':>9s} {'rel diff':>9s}  note")
        for r in rows:
            notes = []
            if r.na is not None:
                notes.append("n/a: " + r.na)
            if r.provider == "flex+alibi" and r.first_call_s is not None:
                notes.append(f"compile (first call) {r.first_call_s:.1f} s, not timed")
            if r.mem_na is not None:
                notes.append(r.mem_na)
            if r.mem is not None and not r.mem["hwm_reset"]:
                notes.append("peak includes warm-up")
            if r.mem is not None and r.provider == "flex+alibi":
                notes.append(f"peak incl. {r.mem['setup_mib']:.0f} MiB resident after compile")
            if r.provider in INFO_ONLY:
                notes.append("info only")
            if not t.time_in_process:
                notes.append("time: the single run of the memory process")
            med = r.median
            q20 = q80 = None
            if med is not None:
                q20, q80 = (float(np.quantile(r.times, p)) for p in (0.2, 0.8))
            elif r.mem is not None and not t.time_in_process:
                med = r.mem["seconds"]
            gf = flops(case, n) / med / 1e9 if med else None
            ratio = ratios.get(r.provider)
            cells = [f"{med * 1e3:.1f}" if med else "n/a",
                     f"{q20 * 1e3:.1f}-{q80 * 1e3:.1f}" if q20 is not None else "-",
                     f"{gf:.1f}" if gf else "-",
                     f"{100 * gf / peak:.0f}%" if gf and case.dtype == torch.float32 else "-",
                     f"{ratio:.2f}x" if ratio else "-",
                     f"{r.mem['peak_mib']:.0f}" if r.mem else "-",
                     f"{r.rel_diff:.1e}" if r.rel_diff is not None else "-"]
            print(f"  {r.provider:20s} {cells[0]:>10s} {cells[1]:>17s} {cells[2]:>8s} {cells[3]:>6s} {cells[4]:>9s} "
                  f"{cells[5]:>9s} {cells[6]:>9s}  {'; '.join(notes)}")
            csv_rows.append(dict(
                timestamp=stamp, target=t.name, op=case.op + ("-causal" if case.causal else ""), mode=case.mode,
                provider=r.provider, shape=f"B{B}-H{H}-N{n}-D{D}", dtype=str(case.dtype).replace("torch.", ""),
                threads=THREADS, median_ms=_fmt(med, 1e3), q20_ms=_fmt(q20, 1e3), q80_ms=_fmt(q80, 1e3),
                gflops=_fmt(gf), ratio=_fmt(ratio), peak_mem_MB=_fmt(r.mem and r.mem["peak_mib"]),
                setup_MB=_fmt(r.mem and r.mem["setup_mib"]), rss_hwm_MB=_fmt(r.mem and r.mem["hwm_mib"]),
                first_call_s=_fmt(r.first_call_s),
                rel_diff=_fmt(r.rel_diff), verdict=" | ".join(verdicts) if r.provider == "posattn" else "",
                note="; ".join(notes), machine=model, cores=cores, torch=torch.__version__,
                posattn=posattn.__version__, git_sha=sha, quick=int(args.quick), cores_own=_fmt(own, 1, 3),
                cores_others=_fmt(others, 1, 3), cores_steal=_fmt(steal, 1, 3)))
        for v in verdicts:
            print(f"  -> {v}")
    print(f"\n(speed-up = peer time / posattn time, > 1: posattn faster; peak MiB = RSS high-water mark of a fresh "
          f"process minus its RSS after imports and inputs; rel diff = max |diff| / max |value| vs the first peer)")
    own, others, steal = np.mean(list(usage.values()), axis=0) if usage else (float("nan"),) * 3
    print(f"while timing: this process used {own:.2f} of {THREADS} cores, other processes {others:.2f}, hypervisor "
          f"steal {steal:.2f}; 1-min load average {load_start:.1f} at start, {load_end:.1f} after timing")
    if own < 0.85 * THREADS:
        print(f"WARNING: this process got less than its {THREADS} cores: absolute times and GFLOP/s are low; the "
              f"round-robin ratios are less affected but noisier; rerun on an idle machine")
    print(f"done in {elapsed:.0f} s; CSV: {write_csv(csv_rows)}")


def cores_while(fn):
    """Run fn; return (cores this process used, cores other processes used, cores stolen by the hypervisor)."""
    before, wall = cpu_seconds(), time.perf_counter()
    fn()
    own, busy, steal = (cpu_seconds() - before) / max(time.perf_counter() - wall, 1e-9)
    return own, max(busy - own, 0.0), steal


def _fmt(value, scale=1.0, digits=6):
    return "" if value is None or value != value else f"{value * scale:.{digits}g}"


def write_csv(rows):
    """Append to the results CSV (a fresh file, or a file with other columns, gets a new header)."""
    os.makedirs(os.path.dirname(CSV_PATH), exist_ok=True)
    header = list(rows[0].keys())
    mode = "a"
    if os.path.exists(CSV_PATH):
        with open(CSV_PATH, newline="") as f:
            if next(csv.reader(f), None) != header:
                mode = "w"
    else:
        mode = "w"
    with open(CSV_PATH, mode, newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        if mode == "w":
            w.writeheader()
        w.writerows(rows)
    return os.path.relpath(CSV_PATH, os.getcwd())


if __name__ == "__main__":
    main()
