"""The one benchmark harness: cases, providers, inputs, timing, peak memory, CSV and plots.

``python -m bench`` (``bench/__main__.py``) measures through this module, in each of its modes: the
provider tables, the CPU target table (``--targets``) and the kernelized N sweep (``--only kernelized``).

* A configuration (:class:`Config`) is one (case, mode, provider, shape, dtype, device).
  Cases and providers are dicts (:data:`CASES`, :data:`PROVIDERS`), dispatched by exact name.
  A provider that cannot run a configuration raises :class:`NotApplicable` with the reason; it
  is reported as n/a with that reason, never silently dropped.
* Timing (:func:`measure`): every configuration is built and warmed (first call timed
  separately: for FlexAttention that is the compile) before any is timed; then the providers of
  one (case, mode, N) are timed round-robin (robust to load drifting on a shared machine);
  median and 20/80 % quantiles. Backward timing covers every input that requires grad (q, k, v
  and a learnable bias table). The CPU cores this process and others used while timing are
  recorded, so a contended run is visible.
* FLOPs: one formula (:func:`flops`): forward 4·B·H·L·S·D, halved when causal (a sliding window
  counts as causal: its GFLOP/s are nominal); backward 2.5x forward, so fwd+bwd is 3.5x.
* Peak memory (:func:`measure_memory`): CUDA: ``torch.cuda.max_memory_allocated`` around one call
  after the warm-up, in this process. CPU: in fresh subprocesses (``python -m bench --mem-child``):
  baseline = RSS after imports and the inputs; provider set-up, warm-up call(s), the RSS
  high-water mark is reset (``/proc/self/clear_refs``), one measured call; peak = VmHWM -
  baseline (set-up that persists, e.g. a materialised mask, counts; compile transients do not).
  glibc's mmap threshold is pinned in the child so that every freed tensor leaves the RSS, which
  lets one child measure several configurations one after another; where the reset is refused
  each configuration gets its own process and the peak includes the warm-up.
* Output: :func:`write_csv` (rows with the machine, versions and git sha), :func:`plot_case`
  (log-log time and memory vs N, one line per provider and mode).

The dense reference is ``posattn.reference`` itself, and the dense biases and rotations that the
SDPA / Flex peers use come from the position specs' own ``reference_bias`` / ``reference_rotate``
/ ``index``: bench copies no formula.
"""
import concurrent.futures
import csv
import datetime
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

import posattn
from posattn import reference

from ._common import ROOT, cpu_seconds, git_sha, machine, reason, reset_hwm, status_kib

RESULTS = ROOT / "bench" / "results"
MODES = ("fwd", "fwd+bwd")
REFERENCE_MAX_N = 2048         # the dense oracle is O(N^2) memory: timed only up to here
T5_BUCKETS = 32


class NotApplicable(Exception):
    """A provider cannot run this configuration; the message says why (shown as n/a)."""


# ---------------------------------------------------------------------------------------------
# cases

@dataclass(frozen=True)
class Case:
    label: str
    causal: bool = False
    window: tuple = None       # (left, right) as posattn.attention takes it
    bias: str = None           # alibi | relbias | t5
    rope: bool = False
    table_m: int = 128         # RelativeBias max distance M (table [H, 2M+1]); None: M = N, every distance


CASES = {
    "plain": Case("plain"),
    "causal": Case("causal", causal=True),
    "alibi": Case("ALiBi, causal", causal=True, bias="alibi"),
    "alibi-bidir": Case("ALiBi, bidirectional", bias="alibi"),
    "relbias": Case("learnable RelativeBias, M=128", bias="relbias"),
    "relbias-full": Case("learnable RelativeBias, M=N", bias="relbias", table_m=None),
    "t5": Case(f"learnable T5Bias, {T5_BUCKETS} buckets, bidirectional", bias="t5"),
    "rope": Case("RoPE, causal", causal=True, rope=True),
    "window": Case("sliding window 256, causal", causal=True, window=(256, 0)),
}


@dataclass(frozen=True)
class Config:
    case: str
    mode: str                  # fwd | fwd+bwd
    provider: str
    n: int                     # L = S
    b: int = 1
    h: int = 8
    d: int = 64
    dtype: str = "float32"
    device: str = "cpu"
    warmup: int = 1            # warm-up calls before timing (and before the memory measurement)
    dense_max_n: int = REFERENCE_MAX_N   # the dense reference runs up to this N

    @property
    def group(self):
        """Configurations timed round-robin against each other."""
        return (self.case, self.mode, self.n, self.dtype)


def flops(cfg):
    """One formula: forward 4·B·H·L·S·D, halved when causal (window: as causal); backward 2.5x forward."""
    case = CASES[cfg.case]
    fwd = 4.0 * cfg.b * cfg.h * cfg.n * cfg.n * cfg.d / (2 if case.causal else 1)
    return fwd * (3.5 if cfg.mode == "fwd+bwd" else 1.0)


def make_inputs(cfg, seed=0):
    """q, k, v [B, H, N, D] (+ the output gradient), the case's position spec, and ``wrt``: every
    tensor that requires grad (q, k, v and a learnable table) for fwd+bwd."""
    case = CASES[cfg.case]
    g = torch.Generator().manual_seed(seed)
    grad = cfg.mode == "fwd+bwd"
    dtype = getattr(torch, cfg.dtype)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(cfg.device, dtype if len(shape) == 4 else torch.float32)

    q, k, v = (randn(cfg.b, cfg.h, cfg.n, cfg.d).requires_grad_(grad) for _ in range(3))
    x = SimpleNamespace(q=q, k=k, v=v, do=randn(cfg.b, cfg.h, cfg.n, cfg.d) if grad else None, bias=None,
                        table=None, rope=posattn.RoPE() if case.rope else None)
    if case.bias == "alibi":
        x.bias = posattn.ALiBi(posattn.alibi_slopes(cfg.h, device=cfg.device))
    elif case.bias == "relbias":
        m = cfg.n if case.table_m is None else case.table_m
        x.table = randn(cfg.h, 2 * m + 1, scale=0.1).requires_grad_(grad)
        x.bias = posattn.RelativeBias(x.table)
    elif case.bias == "t5":
        x.table = randn(cfg.h, T5_BUCKETS, scale=0.1).requires_grad_(grad)
        x.bias = posattn.T5Bias(x.table)
    x.wrt = [t for t in (q, k, v, x.table) if t is not None and t.requires_grad]
    return x


# ---------------------------------------------------------------------------------------------
# providers: name -> builder(cfg, case, x) returning the forward callable

def _posattn(backend):
    def build(cfg, case, x):
        if backend == "triton" and cfg.device != "cuda":
            raise NotApplicable("Triton kernels run on CUDA (on CPU only through the slow interpreter)")
        if backend == "cpu" and cfg.device != "cpu":
            raise NotApplicable("the C++ backend takes CPU tensors")
        if backend == "cpu" and not posattn.ops.cpu_available():
            raise NotApplicable(f"posattn._C did not load: {posattn.ops._C_ERROR}")
        return lambda: posattn.attention(x.q, x.k, x.v, causal=case.causal, window=case.window, bias=x.bias,
                                         rope=x.rope, backend=backend)
    return build


def _reference(cfg, case, x):
    if cfg.n > cfg.dense_max_n:
        raise NotApplicable(f"dense O(N^2) oracle: run only up to N={cfg.dense_max_n}")
    return lambda: reference.attention(x.q, x.k, x.v, causal=case.causal, window=case.window, bias=x.bias,
                                       rope=x.rope)


def _positions(n, device):
    pos = torch.arange(n, device=device)[None]              # [1, N], as posattn's default positions
    return pos, pos


def _rotated(x):
    """q, k rotated by the case's RoPE spec (its own reference rotation), under autograd."""
    if x.rope is None:
        return x.q, x.k
    return x.rope.reference_rotate(x.q, x.k, *_positions(x.q.shape[2], x.q.device))


def _sdpa(cfg, case, x):
    if case.bias is not None or case.window is not None:
        raise NotApplicable("SDPA has no position bias or window: see sdpa+bias")

    def fwd():
        q, k = _rotated(x)            # RoPE: rotary (PyTorch ops) then SDPA
        return F.scaled_dot_product_attention(q, k, x.v, is_causal=case.causal)
    return fwd


def _sdpa_bias(cfg, case, x):
    if case.bias is None and case.window is None:
        raise NotApplicable("nothing to materialise: see sdpa")
    qp, kp = _positions(cfg.n, cfg.device)
    keep = reference.visibility(qp, kp, case.causal, case.window)          # [1, 1, L, S] bool or None
    if x.bias is None:                                                     # window only: a bool mask
        return lambda: F.scaled_dot_product_attention(x.q, x.k, x.v, attn_mask=keep)

    def mask():
        m = x.bias.reference_bias(qp, kp, cfg.h)                           # [1, H, L, S], float32
        if keep is not None:   # SDPA refuses attn_mask with is_causal=True: causality goes into the mask
            m = m.masked_fill(~keep, float("-inf"))
        return m.to(x.q.dtype)

    if x.table is not None and x.table.requires_grad:
        # gathered inside the step, under autograd: SDPA's mask gradient flows into the table
        return lambda: F.scaled_dot_product_attention(x.q, x.k, x.v, attn_mask=mask())
    fixed = mask()                     # built once, outside the timing (its memory counts)
    return lambda: F.scaled_dot_product_attention(x.q, x.k, x.v, attn_mask=fixed)


def _flex(cfg, case, x):
    if cfg.device == "cpu" and cfg.mode == "fwd+bwd":
        raise NotApplicable(f"FlexAttention has no CPU backward (torch {torch.__version__})")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    _raise_recompile_limit()
    score_mod = None
    if case.bias == "alibi":
        slopes = x.bias.slopes

        def score_mod(score, b, h, q_idx, kv_idx):
            return score - slopes[h] * (kv_idx - q_idx).abs()
    elif case.bias == "relbias":
        table, m = x.table, x.bias.max_distance

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + table[h, (kv_idx - q_idx).clamp(-m, m) + m]
    elif case.bias == "t5":
        # the spec's own bucket of every offset r = kv - q in [-(N-1), N-1], looked up at r + N - 1
        n = cfg.n
        lut = x.bias.index(torch.tensor([[n - 1]], device=cfg.device),
                           torch.arange(2 * n - 1, device=cfg.device)[None])[0, 0, 0]
        table = x.table

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + table[h, lut[kv_idx - q_idx + n - 1]]
    block_mask = None
    if case.causal or case.window is not None:
        left, right = case.window if case.window is not None else (-1, -1)

        def mask_mod(b, h, q_idx, kv_idx):
            keep = q_idx >= kv_idx if case.causal else q_idx == q_idx
            if left >= 0:
                keep = keep & (kv_idx >= q_idx - left)
            if right >= 0:
                keep = keep & (kv_idx <= q_idx + right)
            return keep
        block_mask = create_block_mask(mask_mod, None, None, cfg.n, cfg.n, device=cfg.device)
    compiled = torch.compile(flex_attention, dynamic=False)

    def fwd():
        q, k = _rotated(x)            # RoPE: rotary (PyTorch ops) then Flex
        return compiled(q, k, x.v, score_mod=score_mod, block_mask=block_mask)
    return fwd


def _raise_recompile_limit():
    # every (score_mod, N) is a recompile of the one flex_attention frame; the default limit (8)
    # would drop later configurations to eager mode
    cfg = torch._dynamo.config
    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, key):
            setattr(cfg, key, max(getattr(cfg, key), 256))


def _kernelized(cfg, case, x):
    if case.bias != "relbias":
        raise NotApplicable("kernelized attention takes a RelativeBias (rpe)")
    proj = posattn.kernelized.orthogonal_projection(KERNELIZED_FEATURES, cfg.d,
                                                    generator=torch.Generator().manual_seed(1))
    return lambda: posattn.kernelized_attention(x.q, x.k, x.v, rpe=x.bias, causal=case.causal, feature_map="prf",
                                                projection=proj, num_features=KERNELIZED_FEATURES)


KERNELIZED_FEATURES = 64
PROVIDERS = {
    "posattn-cpu": _posattn("cpu"),
    "posattn-triton": _posattn("triton"),
    "sdpa": _sdpa,
    "sdpa+bias": _sdpa_bias,
    "flex": _flex,
    "reference": _reference,
    "kernelized": _kernelized,
}
PEER_OF_POSATTN = {"cpu": "posattn-cpu", "cuda": "posattn-triton"}   # the ratios' anchor per device


def default_providers(device):
    """posattn's backend for the device, then its peers (the Triton backend on CPU only runs in the
    interpreter: left out)."""
    return [PEER_OF_POSATTN[device], "sdpa", "sdpa+bias", "flex", "reference"]


def build_step(cfg, x):
    """One timed call: the forward, or forward + backward into every input that requires grad."""
    fwd = PROVIDERS[cfg.provider](cfg, CASES[cfg.case], x)
    if cfg.mode == "fwd":
        def step():
            with torch.no_grad():
                return [fwd()]
        return step

    def step():
        out = fwd()
        return [out, *torch.autograd.grad(out, x.wrt, x.do)]
    return step


# ---------------------------------------------------------------------------------------------
# timing

@dataclass
class Result:
    cfg: Config
    na: str = None                 # why the provider could not run it
    first_call_s: float = None     # the first warm-up call (Flex: compile + one run)
    times: list = field(default_factory=list)
    peak_mib: float = None
    setup_mib: float = None        # resident after the warm-up above the baseline (a mask, compiled code)
    mem_note: str = ""
    child_times: list = None       # the calls the memory process timed after its warm-up
    cores: tuple = (float("nan"),) * 3   # (this process, other processes, hypervisor steal) while timed
    rel_diff: float = None         # max |diff| / max |value| against the group's first other provider
    ratio: float = None            # this provider's time / posattn's (> 1: posattn faster)

    @property
    def median(self):
        return float(np.median(self.times)) if self.times else None

    def quantile(self, p):
        return float(np.quantile(self.times, p)) if self.times else None


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed_round(pairs, device=None):
    """One round-robin round: each live provider's step timed once, the device synchronised around
    it (``device``, else the provider's own); a step that raises marks its provider n/a and drops
    its times."""
    for r, step in pairs:
        if r.na is not None:
            continue
        try:
            _sync(device or r.cfg.device)
            start = time.perf_counter()
            step()
            _sync(device or r.cfg.device)
            r.times.append(time.perf_counter() - start)
        except Exception as e:
            r.na, r.times = "failed while timing: " + reason(e), []


def _rel_diff(a, b):
    worst = 0.0
    for s, t in zip(a, b):
        s, t = s.detach().float(), t.detach().float()
        worst = max(worst, float((s - t).abs().max() / t.abs().max().clamp_min(1e-30)))
    return worst


def progress(msg, t0):
    print(f"  [{time.perf_counter() - t0:6.1f} s] {msg}", flush=True)


def measure(configs, reps, t0=None, verbose=True):
    """Warm every configuration, then time each group round-robin; returns a Result per config.

    The first call of every configuration (compiles, lazy initialisation) happens in a warm-up
    pass over all groups before anything is timed. A group's steps are held from that pass
    until it is timed, except for large N (a materialised mask each): those are built again
    right before their timing and warmed once more (the compile caches stay warm)."""
    t0 = time.perf_counter() if t0 is None else t0
    results = [Result(c) for c in configs]
    groups = {}
    for r in results:
        groups.setdefault(r.cfg.group, []).append(r)
    held = {}
    for i, (key, rs) in enumerate(groups.items()):
        x = make_inputs(rs[0].cfg)
        first = {}
        for r in rs:
            try:
                step = build_step(r.cfg, x)
                _sync(r.cfg.device)
                start = time.perf_counter()
                first[id(r)] = step()
                _sync(r.cfg.device)
                r.first_call_s = time.perf_counter() - start
                for _ in range(r.cfg.warmup - 1):
                    step()
                if _hold(r.cfg):
                    held[id(r)] = step
            except NotApplicable as e:
                r.na = str(e)
            except Exception as e:  # a provider that fails is reported, never fatal
                r.na = reason(e)
        anchor = next((first[id(r)] for r in rs if id(r) in first and not r.cfg.provider.startswith("posattn")), None)
        for r in rs:
            if anchor is not None and id(r) in first and first[id(r)] is not anchor:
                r.rel_diff = _rel_diff(first[id(r)], anchor)
        del first
        if verbose:
            ran = [r for r in rs if r.na is None]
            slow = max(ran, key=lambda r: r.first_call_s, default=None)
            progress(f"warm {i + 1}/{len(groups)}: {key[0]} {key[1]} N={key[2]} ({len(ran)} of {len(rs)} providers"
                     + (f"; slowest first call {slow.cfg.provider} {slow.first_call_s:.1f} s" if slow else "")
                     + ")", t0)
    for i, (key, rs) in enumerate(groups.items()):
        steps = [(r, held.pop(id(r))) for r in rs if id(r) in held]
        if not _hold(rs[0].cfg):
            steps = _rebuild([r for r in rs if r.na is None])
        before, wall = cpu_seconds(), time.perf_counter()
        for _ in range(reps):
            timed_round(steps)
        own, busy, steal = (cpu_seconds() - before) / max(time.perf_counter() - wall, 1e-9)
        for r, _ in steps:
            r.cores = (float(own), float(max(busy - own, 0.0)), float(steal))
        del steps
        if verbose:
            progress(f"time {i + 1}/{len(groups)}: {key[0]} {key[1]} N={key[2]} x{reps}", t0)
    ratios(results)
    return results


def _hold(cfg):
    """Whether a configuration's step (inputs, a materialised [B, H, N, N] mask) stays built
    between the warm-up pass and its timing: up to 128 MiB of fp32 mask."""
    return cfg.b * cfg.h * cfg.n * cfg.n <= 2**25


def _rebuild(rs):
    """A group's steps built again (same inputs: same seed) and warmed, right before timing."""
    if not rs:
        return []
    x, steps = make_inputs(rs[0].cfg), []
    for r in rs:
        try:
            step = build_step(r.cfg, x)
            for _ in range(max(r.cfg.warmup, 1)):
                step()
            steps.append((r, step))
        except Exception as e:
            r.na = "failed when built again for timing: " + reason(e)
    return steps


def ratios(results):
    """Each result's time relative to posattn's in its group (peer / posattn: > 1, posattn faster)."""
    groups = {}
    for r in results:
        groups.setdefault(r.cfg.group, []).append(r)
    for rs in groups.values():
        anchor = next((r for r in rs if r.cfg.provider == PEER_OF_POSATTN.get(r.cfg.device) and r.median), None)
        for r in rs:
            r.ratio = r.median / anchor.median if anchor is not None and r.median else None


# ---------------------------------------------------------------------------------------------
# peak memory

def measure_memory(results, t0=None, timeout=600, verbose=True, jobs=1):
    """Fill peak_mib / setup_mib of every result that ran (see the module doc). ``timeout``: per
    configuration; ``jobs``: CPU children at once (each its own RSS, so they do not disturb each
    other's peaks; more than one only where the largest configurations fit in memory together)."""
    t0 = time.perf_counter() if t0 is None else t0
    todo = [r for r in results if r.na is None]
    for r in [r for r in todo if r.cfg.device == "cuda"]:
        r.peak_mib, r.setup_mib, r.mem_note = _cuda_peak(r.cfg)
    pending = [r for r in todo if r.cfg.device != "cuda"]
    count, lock = [0], threading.Lock()

    def seen(r, res):
        with lock:
            count[0] += 1
            if verbose:
                c = r.cfg
                what = f"{res['peak_mib']:.0f} MiB" if "peak_mib" in res else res.get("error", "?")
                progress(f"memory {count[0]}/{len(pending)}: {c.case} {c.mode} N={c.n} {c.provider}: {what}", t0)

    def chunk(rs):
        while rs:
            out, err = run_mem_child([r.cfg for r in rs], timeout, on_result=lambda i, res, rs=rs: seen(rs[i], res))
            for r, res in zip(rs, out):
                if "error" in res:
                    r.mem_note = "memory: " + res["error"]
                    continue
                r.peak_mib, r.setup_mib, r.child_times = res["peak_mib"], res["setup_mib"], res["times"]
                if not res["hwm_reset"]:
                    r.mem_note = "peak includes the warm-up"
            if err is not None and len(out) < len(rs):   # the child died on rs[len(out)]: skip that one
                rs[len(out)].mem_note = "memory: " + err
                out.append(None)
            rs = rs[len(out):]

    jobs = max(1, min(jobs, len(pending)))
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        list(pool.map(chunk, [pending[i::jobs] for i in range(jobs)]))


def _cuda_peak(cfg):
    x = make_inputs(cfg)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    step = build_step(cfg, x)
    for _ in range(max(cfg.warmup, 1)):
        step()
    torch.cuda.synchronize()
    setup = torch.cuda.memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20, setup / 2**20, "max_memory_allocated"


def run_mem_child(configs, timeout, reps=1, warmup=None, on_result=None):
    """``python -m bench --mem-child`` on these configurations, one after another in one fresh
    process: returns (a result dict per configuration it finished, None or why it stopped early).
    ``timeout`` applies per configuration; ``on_result(i, result)`` is called as results arrive.
    A child that cannot reset the high-water mark does only the first configuration."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072", PYTHONUNBUFFERED="1")
    payload = json.dumps(dict(configs=[asdict(c) for c in configs], reps=reps, warmup=warmup,
                              threads=torch.get_num_threads()))
    cmd = [sys.executable, "-m", "bench", "--mem-child", payload]
    out, expired = [], threading.Event()
    with tempfile.TemporaryFile(mode="w+") as errf:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errf, text=True, cwd=ROOT, env=env)

        def kill():
            expired.set()
            proc.kill()
        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            for line in proc.stdout:
                if line.startswith("RESULT "):
                    timer.cancel()
                    out.append(json.loads(line[len("RESULT "):]))
                    if on_result is not None:
                        on_result(len(out) - 1, out[-1])
                    timer = threading.Timer(timeout, kill)
                    timer.start()
            rc = proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        errf.seek(0)
        tail = [s for s in errf.read().strip().splitlines() if s.strip()]
    if len(out) == len(configs):
        return out, None
    if expired.is_set():
        return out, f"subprocess timed out after {timeout:.0f} s"
    if rc == 0 and out and not out[-1].get("hwm_reset", True):
        return out, None                                  # stopped on purpose: no reset, one per process
    return out, f"subprocess failed (rc {rc}): {tail[-1][:160] if tail else 'no output'}"


def mem_child(payload):
    """The child: one RESULT line (JSON) per configuration, each measured from its own baseline.
    With ``warmup`` 0 there is no warm-up and the peak covers every call (the kernelized sweep's
    costly sizes: time and memory from one fresh process)."""
    spec = json.loads(payload)
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    # start the thread pools and autograd's engine before any baseline, so that this one-time
    # state is charged to no configuration (whichever came first would carry it)
    for provider in ("sdpa", "posattn-cpu"):
        _mem_one(Config("plain", "fwd+bwd", provider, 64), 1, 1)
    if any(c["provider"] == "flex" for c in spec["configs"]):   # and torch.compile's machinery
        _mem_one(Config("plain", "fwd", "flex", 128), 1, 1)
    gc.collect()
    gc.freeze()
    for c in spec["configs"]:
        cfg = Config(**c)
        res = _mem_one(cfg, cfg.warmup if spec.get("warmup") is None else spec["warmup"], spec.get("reps", 1))
        gc.collect()               # this configuration is gone before the next baseline; the survivors
        gc.freeze()                # (torch.compile's state) are frozen so the next collect stays cheap
        print("RESULT " + json.dumps(res), flush=True)
        if not res.get("hwm_reset"):
            return                 # the next configuration needs a fresh process


def _mem_one(cfg, warmup, reps):
    x = make_inputs(cfg)
    base = status_kib("VmRSS")
    try:
        step = build_step(cfg, x)
        for _ in range(warmup):
            step()
        resident = status_kib("VmRSS")
        reset = reset_hwm() if warmup else False
        times, before, wall = [], cpu_seconds(), time.perf_counter()
        for _ in range(reps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        own, busy, steal = (cpu_seconds() - before) / max(time.perf_counter() - wall, 1e-9)
        hwm = status_kib("VmHWM")
    except Exception as e:
        return dict(error=reason(e), hwm_reset=reset_hwm())
    return dict(peak_mib=(hwm - base) / 1024, setup_mib=(resident - base) / 1024, hwm_reset=reset, times=times,
                cores=[own, max(busy - own, 0.0), steal], loadavg1=os.getloadavg()[0])


# ---------------------------------------------------------------------------------------------
# output

def meta():
    """The machine, versions and code version every CSV row carries."""
    model, cores = machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    try:
        isa = posattn.ops.cpu_isa()
    except Exception as e:
        isa = f"n/a ({reason(e)})"
    return dict(run_id=datetime.datetime.now().isoformat(timespec="seconds"), machine=model, cores=cores,
                threads=torch.get_num_threads(), gpu=gpu, torch=torch.__version__, triton=triton_version,
                posattn=posattn.__version__, git_sha=git_sha(), cpu_isa=isa)


def fmt(value, scale=1.0, digits=6):
    return "" if value is None or value != value else f"{value * scale:.{digits}g}"


def num(s):
    try:
        return float(s)
    except (TypeError, ValueError):
        return None


def result_row(r, info):
    """The CSV row of one result."""
    c = r.cfg
    med = r.median
    gf = flops(c) / med / 1e9 if med else None
    note = "; ".join(s for s in ((f"n/a: {r.na}" if r.na else ""), r.mem_note) if s)
    return dict(run_id=info["run_id"], case=c.case, mode=c.mode, provider=c.provider, B=c.b, H=c.h, L=c.n, S=c.n,
                D=c.d, dtype=c.dtype, device=c.device, median_ms=fmt(med, 1e3), q20_ms=fmt(r.quantile(0.2), 1e3),
                q80_ms=fmt(r.quantile(0.8), 1e3), reps=len(r.times), gflops=fmt(gf), peak_mem_mib=fmt(r.peak_mib),
                setup_mem_mib=fmt(r.setup_mib), ratio_vs_posattn=fmt(r.ratio), first_call_s=fmt(r.first_call_s),
                rel_diff=fmt(r.rel_diff), cores_own=fmt(r.cores[0], 1, 3), cores_others=fmt(r.cores[1], 1, 3),
                status="n/a" if r.na else "ok", note=note,
                **{k: info[k] for k in ("machine", "cores", "threads", "gpu", "torch", "triton", "posattn", "git_sha")})


def write_csv(path, rows):
    """Append rows to a CSV (a fresh file, or one with other columns, gets a new header)."""
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    header = list(rows[0].keys())
    mode = "w"
    if os.path.exists(path):
        with open(path, newline="") as f:
            if next(csv.reader(f), None) == header:
                mode = "a"
    with open(path, mode, newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        if mode == "w":
            w.writeheader()
        w.writerows(rows)
    return os.path.relpath(path, os.getcwd())


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("bench: matplotlib is needed for the plots: pip install matplotlib (make demo / make test "
                         "install it into .venv), or pass --no-plot") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


COLORS = {"posattn-cpu": "tab:blue", "posattn-triton": "tab:blue", "sdpa": "tab:green", "sdpa+bias": "tab:orange",
          "flex": "tab:purple", "reference": "tab:gray", "kernelized": "tab:red"}
STYLES = {"fwd": ("-", "o"), "fwd+bwd": ("--", "s")}


def series(rows, provider, mode, key="median_ms"):
    """Sorted (N, value) of CSV-style rows with a positive value."""
    pts = [(int(r["L"]), num(r[key])) for r in rows if r["provider"] == provider and r["mode"] == mode]
    return sorted((n, v) for n, v in pts if v is not None and v > 0)


def plot_case(rows, title, path, decorate=None, colors=None):
    """One figure, two log-log panels: median time vs N and peak memory vs N, one line per
    (provider, mode): fwd solid, fwd+bwd dashed. ``decorate(ax_time, ax_mem)`` may add to it;
    ``colors`` maps further provider names to colours."""
    colors = {**COLORS, **(colors or {})}
    plt = require_matplotlib()
    import matplotlib.ticker
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 5.2))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    for mode, (ls, mk) in STYLES.items():
        for p in providers:
            color = colors.get(p)
            pts = series(rows, p, mode)
            if pts:
                ax_t.plot(*zip(*pts), ls, marker=mk, color=color, label=f"{p} {mode}")
            mem = series(rows, p, mode, "peak_mem_mib")
            if mem:
                ax_m.plot(*zip(*mem), ls, marker=mk, color=color, label=f"{p} {mode}")
    for ax in (ax_t, ax_m):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (sequence length, L = S)")
        ax.grid(True, which="both", alpha=0.3)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda n, _: f"{n:g}"))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    ax_t.set_ylabel("median time per call (ms)")
    ax_t.set_title("time", fontsize=9)
    ax_m.set_ylabel("peak memory (MiB)")
    ax_m.set_title("peak memory (CPU: RSS high-water mark above baseline, memory subprocess)", fontsize=9)
    if decorate is not None:
        decorate(ax_t, ax_m)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return os.path.relpath(path, os.getcwd())
