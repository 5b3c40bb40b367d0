"""``python -m bench --only decode``: one decode step (L = 1) over a KV cache against the context length.

    python -m bench --only decode [--quick] [--contexts 1024,...,131072] [--batches 1,8]
                                  [--max-batched-context 32768] [--dtypes bfloat16,float32]
                                  [--variants plain,rope,skewed] [--mqa | --no-mqa] [--heads 32] [--kv-heads 8]
                                  [--head-dim 128] [--providers P,...] [--backend cpu|triton|reference]
                                  [--device cpu|cuda] [--min-reps 3] [--budget-s 2] [--max-reps 1000]
                                  [--copy-mib 1024] [--out DIR]

Every provider does one full decode step: the new token's k, v [B, Hkv, 1, D] are appended into a
preallocated cache [B, Hkv, context + 1, D] at row ``context`` (per batch row: its own length), then
the query [B, H, 1, D] attends over the valid keys (context + 1 of them, the new one included). The
append is inside the timed step for every provider; a step writes the same row each time, so the
providers share one cache. Shapes: H=32, Hkv=8 (grouped-query), D=128, contexts 1024 ... 131072
(--quick: 1024, 8192), B in --batches, B > 1 only up to --max-batched-context (32768: a B=8 fp32
cache at 32k is already 1 GiB, at 128k it would be 4 GiB). Variants:

* ``plain``: no position spec; causal (with L = 1 the new token sees every cached key);
* ``rope``: ``posattn.RoPE(theta=5e5)`` on the new token at position ``context`` (posattn rotates q
  and the new key inside the kernel; the peers rotate both in PyTorch first, with the spec's own
  ``reference_rotate``, as Hugging Face does in its attention module);
* ``skewed``: a batch of 8, one long request (the context) and 7 short ones (context / 64), per-row
  ``cache_seqlens`` (an int32 tensor [B]); the peers attend over the longest row's keys with a bool
  key-padding mask [B, 1, 1, Smax] (built once, outside the timing), so they read the padding too;
* ``mqa`` (on by default, --no-mqa: off): B=1, Hkv=1, no position spec. With B·Hkv = 1 below the
  thread count, posattn splits each key range (split-KV) to use every core: the case target (a) is about.

Providers:

* ``posattn``: ``posattn.attention_with_kvcache`` (num_splits=0: chosen from B·Hkv, the lengths and
  the threads; --backend, default cpu, or triton on CUDA);
* ``posattn-split1``: the same with num_splits=1: what split-KV buys;
* ``sdpa``: slice assignment ``cache[:, :, n] = new`` (index_put_ with per-row lengths), then torch
  SDPA over ``k_cache[:, :, :S]`` with enable_gqa=True (no mask with L = 1; skewed: the key-padding mask);
* ``hf-sdpa``: the same append, then Hugging Face's ``sdpa_attention_forward``
  (``transformers.integrations.sdpa_attention``) on the [B, Hkv, S, D] slice, as a DynamicCache hands
  the keys to the attention function (a module stub carrying num_key_value_groups, scaling D^-1/2,
  HF's bool mask [B, 1, 1, S] where rows differ); it picks enable_gqa, or without it packs the
  query groups (``pack_gqa``). Its output [B, L, H, D] is transposed back for the check. Where
  transformers is missing or exposes no such function: n/a with the reason. (DynamicCache itself
  appends with torch.cat, a copy of the whole cache per step; that copy is not timed here: both
  peers get the cheaper in-place append of a preallocated, StaticCache-like buffer.)

Before timing, every provider's output is compared with posattn's (max |diff| / max |value|;
tolerance 1e-3 fp32, 5e-2 bf16); a mismatch stops the run. Timing: one configuration (variant,
dtype, B, context) at a time (its cache is freed before the next is built): every provider built
and warmed (2 calls, the first checked), then round-robin rounds until at least --min-reps rounds
and --budget-s seconds (at most --max-reps); median and 20/80 % quantiles per provider. Bytes per
step: the K and V rows read (Σ_b (len_b + 1) · Hkv · 2D · bytes per element: the valid rows, the
same figure for every provider, so the padding the peers read in ``skewed`` shows as a lower rate);
GB/s = bytes / median. The machine's bandwidth is measured once, before the configurations:
``copy_`` of a --copy-mib buffer (read + written bytes, STREAM's convention) and ``sum()`` of one
(read only), fp32; the larger is the reference of the "% bw" column. A cache smaller than the last
level cache (sysfs; shown in the header) may exceed it.

Targets (verdicts on posattn's rows): (a) posattn ≥ 2× the faster SDPA peer (sdpa, hf-sdpa) at
context ≥ 8k where B·Hkv < threads (split-KV's case; elsewhere the ratio is shown and the verdict
is "n/a", said why); (b) posattn reads the cache at ≥ 70 % of the measured bandwidth at context ≥
32k. Table on stdout; CSV rows appended to bench/results/decode.csv (--out DIR: DIR/decode.csv).
"""
import argparse
import math
import os
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

import posattn

from . import harness as H
from ._common import cpu_seconds, reason

CONTEXTS = [1024, 4096, 8192, 16384, 32768, 65536, 131072]
QUICK_CONTEXTS = [1024, 8192]
MAX_BATCHED_CONTEXT = 32768    # B > 1 only up to here by default (memory and time)
VARIANTS = ("plain", "rope", "skewed")
SKEW_B, SKEW_DIV = 8, 64       # skewed: one row of the context, 7 of context / 64
ROPE_THETA = 5e5
SEED = 0
WARMUP = 2                     # calls before timing, the first one checked
TOL = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 5e-2}   # max |diff| / max |value| against posattn
POSATTN, SPLIT1 = "posattn", "posattn-split1"
SDPA_PEERS = ("sdpa", "hf-sdpa")
TARGET_A = dict(speedup=2.0, min_context=8192)
TARGET_B = dict(fraction=0.7, min_context=32768)


@dataclass(frozen=True)
class Config:
    variant: str               # plain | rope | skewed | mqa
    dtype: str
    b: int
    h: int
    hkv: int
    d: int
    context: int               # tokens cached before the step (the longest row's, skewed)
    device: str = "cpu"

    @property
    def lengths(self):
        """Cached tokens per batch row before the step."""
        if self.variant == "skewed":
            return [self.context] + [self.context // SKEW_DIV] * (self.b - 1)
        return [self.context] * self.b

    @property
    def bytes_read(self):
        """K and V of the valid rows after the append."""
        elt = torch.empty((), dtype=getattr(torch, self.dtype)).element_size()
        return sum(n + 1 for n in self.lengths) * self.hkv * 2 * self.d * elt

    @property
    def cache_bytes(self):
        """Both caches as allocated (capacity context + 1 for every row)."""
        elt = torch.empty((), dtype=getattr(torch, self.dtype)).element_size()
        return 2 * self.b * self.hkv * (self.context + 1) * self.d * elt

    def rows(self):
        ls = self.lengths
        return str(ls[0]) if len(set(ls)) == 1 else f"{ls[0]}+{len(ls) - 1}x{ls[1]}"


def plan(variants, mqa, dtypes, batches, contexts, max_batched, heads, kv_heads, dim, device):
    """Every configuration: dtype x variant x B x context (B > 1 only up to ``max_batched``)."""
    out = []
    for dtype in dtypes:
        for variant in variants:
            bs = [SKEW_B] if variant == "skewed" else batches
            for b in bs:
                for n in contexts:
                    if b == 1 or n <= max_batched:
                        out.append(Config(variant, dtype, b, heads, kv_heads, dim, n, device))
        if mqa:
            out += [Config("mqa", dtype, 1, heads, 1, dim, n, device) for n in contexts]
    return out


def make_inputs(cfg, seed=SEED):
    """The caches (random rows: what is cached does not matter to the speed), q and the new k, v,
    the lengths (an int, or an int32 tensor [B] where rows differ) and the position spec."""
    g = torch.Generator(device=cfg.device).manual_seed(seed)
    dtype = getattr(torch, cfg.dtype)

    def randn(*shape):
        return torch.empty(*shape, dtype=dtype, device=cfg.device).normal_(generator=g)

    shape = (cfg.b, cfg.hkv, cfg.context + 1, cfg.d)
    lengths = cfg.lengths
    uniform = len(set(lengths)) == 1
    lens = torch.tensor(lengths, device=cfg.device)
    x = SimpleNamespace(k_cache=randn(*shape), v_cache=randn(*shape), q=randn(cfg.b, cfg.h, 1, cfg.d),
                        k=randn(cfg.b, cfg.hkv, 1, cfg.d), v=randn(cfg.b, cfg.hkv, 1, cfg.d),
                        seqlens=lengths[0] if uniform else lens.to(torch.int32), lens=lens,
                        rows=torch.arange(cfg.b, device=cfg.device), S=max(lengths) + 1, uniform=uniform,
                        rope=posattn.RoPE(theta=ROPE_THETA) if cfg.variant == "rope" else None, key_mask=None)
    x.pos = (lens if not uniform else lens[:1])[:, None]                  # [B or 1, 1]: the new token's position
    if not uniform:                                                       # key j of row b is valid: j <= len_b
        x.key_mask = (torch.arange(x.S, device=cfg.device)[None] <= lens[:, None])[:, None, None]   # [B, 1, 1, S]
    return x


# ---------------------------------------------------------------------------------------------
# providers: name -> builder(x, cfg, opts) returning the step, which returns out [B, H, 1, D]

def _posattn(splits):
    def build(x, cfg, opts):
        return lambda: posattn.attention_with_kvcache(x.q, x.k_cache, x.v_cache, x.k, x.v, cache_seqlens=x.seqlens,
                                                      rope=x.rope, num_splits=splits, backend=opts.backend)
    return build


def _append(x):
    """The peers' half of the step: q and the new key rotated (rope), the new rows written into the
    caches; returns q and the [B, Hkv, S, D] views of the valid keys and values."""
    q, k = x.q, x.k
    if x.rope is not None:
        q, k = x.rope.reference_rotate(q, k, x.pos, x.pos)
    if x.uniform:
        n = x.S - 1
        x.k_cache[:, :, n] = k[:, :, 0]
        x.v_cache[:, :, n] = x.v[:, :, 0]
    else:
        x.k_cache[x.rows, :, x.lens] = k[:, :, 0]
        x.v_cache[x.rows, :, x.lens] = x.v[:, :, 0]
    return q, x.k_cache[:, :, :x.S], x.v_cache[:, :, :x.S]


def _sdpa(x, cfg, opts):
    def step():
        q, k, v = _append(x)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=x.key_mask, enable_gqa=True)
    return step


def _hf_sdpa(x, cfg, opts):
    try:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
    except Exception as e:
        raise H.NotApplicable(f"transformers' sdpa_attention_forward: {reason(e)}") from None
    module = torch.nn.Module()          # what the function reads from an attention layer
    module.num_key_value_groups, module.is_causal, module.layer_idx = cfg.h // cfg.hkv, True, 0

    def step():
        q, k, v = _append(x)
        out, _ = sdpa_attention_forward(module, q, k, v, x.key_mask, dropout=0.0, scaling=cfg.d ** -0.5)
        return out.transpose(1, 2)      # [B, L, H, D] -> [B, H, L, D]
    return step


PROVIDERS = {
    POSATTN: _posattn(0),
    SPLIT1: _posattn(1),
    "sdpa": _sdpa,
    "hf-sdpa": _hf_sdpa,
}


# ---------------------------------------------------------------------------------------------
# measuring

def bandwidth(device, mib, reps=5):
    """(copy GB/s counting read + written bytes, read GB/s of sum()) over fp32 buffers of ``mib`` MiB."""
    n = mib * 2**20 // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)

    def best(f):
        f()
        ts = []
        for _ in range(reps):
            H._sync(device)
            start = time.perf_counter()
            f()
            H._sync(device)
            ts.append(time.perf_counter() - start)
        return float(np.median(ts))

    nbytes = n * 4
    copy, read = 2 * nbytes / best(lambda: dst.copy_(src)) / 1e9, nbytes / best(src.sum) / 1e9
    del src, dst
    return copy, read


def last_level_cache():
    """The last level cache of CPU 0 from sysfs ("300 MiB"), or None."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        levels = sorted(i for i in os.listdir(base) if i.startswith("index"))
        with open(os.path.join(base, levels[-1], "size")) as f:
            size = f.read().strip()
    except (OSError, IndexError):
        return None
    return f"{int(size[:-1]) / 1024:g} MiB" if size.endswith("K") and size[:-1].isdigit() else size


def guard(first, dtype, where):
    """Every provider's output against posattn's (or the first that ran); stops the run on a mismatch."""
    if not first:
        return {}
    anchor = POSATTN if POSATTN in first else next(iter(first))
    diffs = {}
    for p, out in first.items():
        d = H._rel_diff([out], [first[anchor]])
        diffs[p] = d
        if not d <= TOL[dtype]:
            raise SystemExit(f"bench decode: {where}: {p}'s out differs from {anchor}'s by {d:.2e} (max |diff| / max "
                             f"|value|, tolerance {TOL[dtype]}); the providers do not compute the same thing")
    return diffs


def measure_config(cfg, providers, opts):
    """Build, warm, check and time the providers of one configuration; returns a result per provider."""
    x = make_inputs(cfg)
    rs, steps, first = [], {}, {}
    with torch.no_grad():
        for p in providers:
            r = SimpleNamespace(cfg=cfg, provider=p, na=None, times=[], rel_diff=None, median=None,
                                cores=(math.nan, math.nan))
            rs.append(r)
            try:
                step = PROVIDERS[p](x, cfg, opts)
                first[p] = step()
                for _ in range(WARMUP - 1):
                    step()
                steps[p] = step
            except H.NotApplicable as e:
                r.na = str(e)
            except Exception as e:          # a provider that fails is reported, never fatal
                r.na = reason(e)
        diffs = guard(first, cfg.dtype, f"{cfg.variant} {cfg.dtype} B={cfg.b} context={cfg.context}")
        del first
        live = [(r, steps[r.provider]) for r in rs if r.provider in steps]
        for r in rs:
            r.rel_diff = diffs.get(r.provider)
        before, wall = cpu_seconds(), time.perf_counter()
        rounds = 0
        while live and rounds < opts.max_reps and (rounds < opts.min_reps
                                                   or time.perf_counter() - wall < opts.budget_s):
            H.timed_round(live, cfg.device)
            rounds += 1
        own, busy = ((cpu_seconds() - before) / max(time.perf_counter() - wall, 1e-9))[:2]
    for r in rs:
        r.median = float(np.median(r.times)) if r.times else None
        if r.times:
            r.cores = (float(own), float(max(busy - own, 0.0)))
    return rs


def targets(rs, bw, threads):
    """posattn's verdicts: (a) (best SDPA peer, posattn's speed-up over it, applies, verdict or why not);
    (b) (fraction of the bandwidth, verdict or why not). None where posattn did not run."""
    by = {r.provider: r for r in rs if r.median}
    if POSATTN not in by:
        return None, None
    cfg, pa = rs[0].cfg, by[POSATTN].median
    peers = [by[p] for p in SDPA_PEERS if p in by]
    a = None
    if peers:
        best = min(peers, key=lambda r: r.median)
        ratio = best.median / pa
        units = cfg.b * cfg.hkv
        if cfg.context < TARGET_A["min_context"]:
            why = f"n/a (context < {TARGET_A['min_context']})"
        elif units >= threads:
            why = f"n/a (B·Hkv = {units} >= {threads} threads)"
        else:
            why = "PASS" if ratio >= TARGET_A["speedup"] else "MISS"
        a = (best.provider, ratio, why)
    frac = cfg.bytes_read / pa / 1e9 / bw
    if cfg.context < TARGET_B["min_context"]:
        b = (frac, f"n/a (context < {TARGET_B['min_context']})")
    else:
        b = (frac, "PASS" if frac >= TARGET_B["fraction"] else "MISS")
    return a, b


# ---------------------------------------------------------------------------------------------
# output

def _ms(r):
    return "n/a" if r.na else (f"{r.median * 1e3:.3g}" if r.median else "-")


def print_tables(results, bw, threads):
    print(f"\nmedian ms per step (append + attend); GB/s = K/V bytes of the valid rows / time; % bw: of {bw:.1f} GB/s "
          f"(measured above); speed-up: this provider's time / posattn's (> 1: posattn faster); others: CPU cores "
          f"other processes used while timing\n")
    print("| variant | dtype | B | Hkv | context | rows | MiB read | provider | ms | GB/s | % bw | speed-up | others |\n"
          "|---|---|---:|---:|---:|---|---:|---|---:|---:|---:|---:|---:|")
    for rs in results:
        c = rs[0].cfg
        pa = next((r.median for r in rs if r.provider == POSATTN and r.median), None)
        for r in rs:
            gbs = c.bytes_read / r.median / 1e9 if r.median else None
            cells = [_ms(r), f"{gbs:.1f}" if gbs else "", f"{100 * gbs / bw:.0f}" if gbs else "",
                     f"{r.median / pa:.2f}x" if pa and r.median else "", f"{r.cores[1]:.1f}" if r.times else ""]
            print(f"| {c.variant} | {c.dtype} | {c.b} | {c.hkv} | {c.context} | {c.rows()} | "
                  f"{c.bytes_read / 2**20:.1f} | {r.provider} | " + " | ".join(cells) + " |")
    print(f"\ntargets: (a) posattn >= {TARGET_A['speedup']:g}x the faster of sdpa / hf-sdpa at context >= "
          f"{TARGET_A['min_context']} where B·Hkv < threads ({threads} here; split-KV's case); (b) posattn reads the "
          f"cache at >= {100 * TARGET_B['fraction']:.0f} % of {bw:.1f} GB/s at context >= {TARGET_B['min_context']}\n")
    print("| variant | dtype | B | Hkv | context | (a) best SDPA peer | speed-up | (a) | (b) % bw | (b) |\n"
          "|---|---|---:|---:|---:|---|---:|---|---:|---|")
    for rs in results:
        c = rs[0].cfg
        a, b = targets(rs, bw, threads)
        if b is None:
            continue
        cells = [a[0], f"{a[1]:.2f}x", a[2]] if a else ["n/a", "", ""]
        cells += [f"{100 * b[0]:.0f}", b[1]]
        print(f"| {c.variant} | {c.dtype} | {c.b} | {c.hkv} | {c.context} | " + " | ".join(cells) + " |")
    verdicts = [v for rs in results for ab in [targets(rs, bw, threads)] if ab[1] is not None
                for v in ((ab[0][2] if ab[0] else ""), ab[1][1])]
    print(f"\nverdicts: {verdicts.count('PASS')} PASS, {verdicts.count('MISS')} MISS")
    long = [rs[0].cfg for rs in results if rs[0].cfg.context >= TARGET_A["min_context"]]
    busy = sorted({c.b * c.hkv for c in long if c.b * c.hkv >= threads})
    if busy:
        split = sorted({f"{c.variant} B={c.b}" for c in long if c.b * c.hkv < threads})
        print(f"   (a) is n/a where B·Hkv ({', '.join(map(str, busy))}) >= {threads} threads: each (batch row, KV head) "
              f"task already has a core, so posattn does not split the keys and split-KV has nothing to add; the "
              f"condition holds on machines with more cores or with fewer KV heads"
              + (f"; here it is exercised by {', '.join(split)}" if split else "; no row here meets it (--mqa adds B=1, "
                                                                                 "Hkv=1)"))
    reasons = {}
    for rs in results:
        for r in rs:
            if r.na:
                c = r.cfg
                reasons.setdefault((r.provider, r.na), []).append(f"{c.variant}/{c.dtype}/B{c.b}/{c.context}")
    if reasons:
        print("\nn/a:")
        for (p, why), where in reasons.items():
            print(f"  {p}: {why} ({len(where)}: {', '.join(where[:4])}{', ...' if len(where) > 4 else ''})")
    busy = [r.cores[1] for rs in results for r in rs if r.times]
    if busy and max(busy) > 0.25:
        n = sum(1 for rs in results if any(r.times and r.cores[1] > 0.25 for r in rs))
        print(f"\n!! other processes used up to {max(busy):.1f} cores while timing ({n} of {len(results)} "
              f"configurations over 0.25): absolute times are inflated; rerun on an idle machine")


def csv_rows(results, info, bw_copy, bw_read, threads, opts):
    bw, rows = max(bw_copy, bw_read), []
    for rs in results:
        c = rs[0].cfg
        a, b = targets(rs, bw, threads)
        pa = next((r.median for r in rs if r.provider == POSATTN and r.median), None)
        for r in rs:
            own = r.provider == POSATTN
            gbs = c.bytes_read / r.median / 1e9 if r.median else None
            rows.append(dict(
                run_id=info["run_id"], op="decode", variant=c.variant, provider=r.provider, B=c.b, H=c.h, Hkv=c.hkv,
                D=c.d, L=1, context=c.context, rows=c.rows(), dtype=c.dtype, device=c.device,
                backend=opts.backend if r.provider in (POSATTN, SPLIT1) else "",
                bytes_read=c.bytes_read, median_ms=H.fmt(r.median, 1e3),
                q20_ms=H.fmt(np.quantile(r.times, 0.2) if r.times else None, 1e3),
                q80_ms=H.fmt(np.quantile(r.times, 0.8) if r.times else None, 1e3), reps=len(r.times),
                gbps=H.fmt(gbs), copy_gbps=H.fmt(bw_copy), read_gbps=H.fmt(bw_read),
                frac_of_bw=H.fmt(gbs / bw if gbs else None), ratio_vs_posattn=H.fmt(r.median / pa if pa and r.median
                                                                                  else None),
                rel_diff=H.fmt(r.rel_diff), best_sdpa_peer=a[0] if own and a else "",
                speedup_vs_sdpa=H.fmt(a[1]) if own and a else "", verdict_a=a[2] if own and a else "",
                verdict_b=b[1] if own and b else "", cores_own=H.fmt(r.cores[0], 1, 3),
                cores_others=H.fmt(r.cores[1], 1, 3), status="n/a" if r.na else "ok", note=r.na or "",
                **{k: info[k] for k in ("machine", "cores", "threads", "gpu", "torch", "triton", "posattn", "git_sha")}))
    return rows


def _ints(s):
    return [int(v) for v in s.split(",") if v]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench --only decode", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"contexts {QUICK_CONTEXTS}")
    parser.add_argument("--contexts", default=None, help=f"cached tokens before the step (default {CONTEXTS})")
    parser.add_argument("--batches", default="1,8", help="batch sizes of plain and rope")
    parser.add_argument("--max-batched-context", type=int, default=MAX_BATCHED_CONTEXT,
                        help="B > 1 (and skewed, B=8) only up to this context (memory and time)")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--mqa", action=argparse.BooleanOptionalAction, default=True,
                        help="also the MQA variant: B=1, Hkv=1 (split-KV's case on a few cores)")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--backend", default=None, choices=("cpu", "triton", "reference"),
                        help="posattn's backend (default: cpu on CPU, triton on CUDA; reference: the PyTorch oracle)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--min-reps", type=int, default=3, help="round-robin rounds at least")
    parser.add_argument("--budget-s", type=float, default=2.0, help="and at least this long per configuration")
    parser.add_argument("--max-reps", type=int, default=1000, help="rounds at most")
    parser.add_argument("--copy-mib", type=int, default=1024, help="buffer of the bandwidth measurement")
    parser.add_argument("--out", default=None, help="folder for decode.csv (default bench/results)")
    opts = parser.parse_args(argv)
    contexts = _ints(opts.contexts) if opts.contexts else (QUICK_CONTEXTS if opts.quick else CONTEXTS)
    batches, dtypes = _ints(opts.batches), opts.dtypes.split(",")
    providers, variants = opts.providers.split(","), [v for v in opts.variants.split(",") if v]
    for what, got, known in (("provider", providers, PROVIDERS), ("variant", variants, VARIANTS),
                             ("dtype", dtypes, TOL)):
        unknown = [g for g in got if g not in known]
        if unknown:
            parser.error(f"unknown {what}(s) {unknown}; choose from {list(known)}")
    if opts.heads % opts.kv_heads:
        parser.error(f"--heads {opts.heads} is not a multiple of --kv-heads {opts.kv_heads}")
    if opts.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    opts.backend = opts.backend or ("triton" if opts.device == "cuda" else "cpu")
    t0 = time.perf_counter()
    info = H.meta()
    threads = torch.get_num_threads()
    configs = plan(variants, opts.mqa, dtypes, batches, contexts, opts.max_batched_context, opts.heads, opts.kv_heads,
                   opts.head_dim, opts.device)
    if not configs:
        parser.error("no configuration to run (check --variants / --mqa / --batches / --contexts)")
    llc = last_level_cache() if opts.device == "cpu" else None
    print(f"machine: {info['machine']}, {info['cores']} cores, {threads} threads"
          + (f", last level cache {llc}" if llc else "") + (f", GPU {info['gpu']}" if info["gpu"] else "")
          + f" | load average {os.getloadavg()[0]:.2f} | torch {info['torch']} | posattn {info['posattn']} @ "
          f"{info['git_sha']} | posattn backend {opts.backend}")
    bw_copy, bw_read = bandwidth(opts.device, opts.copy_mib)
    bw = max(bw_copy, bw_read)
    print(f"bandwidth ({opts.copy_mib} MiB fp32 buffers, median of 5): copy_ {bw_copy:.1f} GB/s (read + written), "
          f"sum() {bw_read:.1f} GB/s (read); reference {bw:.1f} GB/s")
    print(f"{len(configs)} configurations: decode L=1, H={opts.heads} Hkv={opts.kv_heads} D={opts.head_dim}, "
          f"contexts {contexts}, B {batches} (B > 1 and skewed only up to context {opts.max_batched_context}: "
          f"--max-batched-context), dtypes {dtypes}, variants {variants}" + (" + mqa (B=1, Hkv=1)" if opts.mqa else "")
          + f"; largest cache pair {max(c.cache_bytes for c in configs) / 2**30:.2f} GiB; {WARMUP} warm-up calls, then "
          f"providers round-robin for >= {opts.min_reps} rounds and >= {opts.budget_s:g} s (<= {opts.max_reps})",
          flush=True)
    results = []
    for i, cfg in enumerate(configs):
        results.append(measure_config(cfg, providers, opts))
        times = ", ".join(f"{r.provider} {_ms(r)}" for r in results[-1])
        H.progress(f"{i + 1}/{len(configs)}: {cfg.variant} {cfg.dtype} B={cfg.b} Hkv={cfg.hkv} context={cfg.context} "
                   f"x{max((len(r.times) for r in results[-1]), default=0)}: {times} ms", t0)
    print_tables(results, bw, threads)
    path = H.write_csv(os.path.join(opts.out or str(H.RESULTS), "decode.csv"),
                       csv_rows(results, info, bw_copy, bw_read, threads, opts))
    print(f"\nCSV: {path} (run_id {info['run_id']}); done in {time.perf_counter() - t0:.0f} s")
    return results
