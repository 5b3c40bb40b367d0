"""``python -m bench --only varlen``: a packed batch of variable-length sequences against padding.

    python -m bench --only varlen [--quick] [--batch 32] [--mean 512] [--max 2048] [--buckets 4]
                                  [--heads 8] [--kv-heads H] [--head-dim 64] [--dtype float32|bfloat16]
                                  [--modes fwd,fwd+bwd] [--specs rope,relbias] [--providers P,...]
                                  [--backend cpu|triton|reference] [--device cpu|cuda] [--reps 5] [--out DIR]

Lengths: L_i = clip(round(exp(z_i)), 1, --max), z_i ~ Normal(ln(--mean) − σ²/2, σ²), σ = 0.8, numpy
seed 0 (a lognormal whose mean before the clip is --mean; the same lengths every run). Two variants
of the same sequences (same rows, same inputs):

* ``batch``: the sequences in drawn order, padded to the longest into one [B, H, Lmax, D] call;
* ``bucketed``: the sequences sorted by length, longest first, cut into --buckets consecutive groups
  of (near) equal count (``numpy.array_split``: 32 → 4 × 8), each group padded to its own longest
  and run as a separate call.

Padded tokens: Σ over the calls of (sequences × the call's Lmax); real tokens: Σ L_i. The padded
providers run per call; posattn-varlen, sdpa-nested and sdpa-loop see the same pack either way
(in that variant's order).

Specs (both causal, positions restarting at 0 in every sequence, right padding): ``rope``
(``posattn.RoPE()``) and ``relbias`` (a learnable ``posattn.RelativeBias`` table [H, 2M+1],
M = 128). Modes: fwd, and fwd+bwd = the forward and the gradients of sum(out · dout) with respect
to every input that requires grad (q, k, v and the table).

Providers:

* ``posattn-varlen``: ``posattn.attention_varlen`` on the packed [T, H, D] rows, one call (--backend,
  default cpu on CPU, triton on CUDA; ``reference`` is the per-sequence dense oracle);
* ``posattn-padded``: ``posattn.attention`` per padded call, key padding as a bool attn_mask [b, 1, 1, Lmax];
* ``sdpa-padded``: torch SDPA per padded call, causal & key padding as a bool mask [b, 1, Lmax, Lmax];
  RoPE rotated in PyTorch first; the bias gathered from the table under autograd into a float mask
  [b, H, Lmax, Lmax] (−inf where masked), inside the timed call;
* ``sdpa-nested``: SDPA on nested jagged tensors (``nested_tensor_from_jagged`` over the packed rows,
  RoPE rotated on the rows first); where torch refuses (is_causal or a mask), n/a with its reason;
* ``sdpa-loop``: one SDPA call per sequence ([1, H, L_i, D] inputs), is_causal=True, or the bias
  materialised per sequence with causality folded into it.

Before timing, every provider's output (and, for fwd+bwd, its gradients on the real rows and the
table's) is compared with posattn-varlen's (or the first provider that ran); a difference beyond a
loose tolerance stops the run. Timing: every configuration is warmed before any is timed, the
providers of one (variant, spec, mode) round-robin, median over --reps. GFLOP/s count the real work
only (the harness's formula per sequence, Σ 4·H·L_i²·D / 2, ×3.5 for fwd+bwd), so padding shows as
a lower rate. Targets: (a) varlen's speed-up over the best padded provider (its time / varlen's)
≥ 0.9 × padded/real tokens; (b) loop time / varlen time ≥ 0.9 (varlen's FLOP rate at least 0.9 of
the per-sequence loop's at equal work). Table on stdout; CSV rows appended to
bench/results/varlen.csv (--out DIR: DIR/varlen.csv).
"""
import argparse
import logging
import math
import os
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

import posattn
from posattn import reference

from . import harness as H
from ._common import cpu_seconds, reason

SIGMA = 0.8                    # lognormal shape of the lengths
SEED = 0
TABLE_M = 128
WARMUP = 2                     # calls before timing, the first one checked
TOL = {"float32": 1e-3, "bfloat16": 5e-2}   # max |diff| / max |value| against the anchor
DEFAULTS = dict(batch=32, mean=512, max=2048, reps=5)
QUICK = dict(batch=8, mean=128, max=512, reps=3)
PADDED = ("posattn-padded", "sdpa-padded")
VARLEN, LOOP = "posattn-varlen", "sdpa-loop"


def sequence_lengths(n, mean, max_len, seed=SEED):
    """n lognormal lengths (see the module doc)."""
    rng = np.random.default_rng(seed)
    z = rng.lognormal(math.log(mean) - SIGMA ** 2 / 2, SIGMA, n)
    return np.clip(np.rint(z), 1, max_len).astype(int).tolist()


def variants(lengths, buckets):
    """(name, order of the sequences in the pack, sequences per padded call) of both variants."""
    by_length = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    split = [len(g) for g in np.array_split(by_length, min(buckets, len(lengths)))]
    return [("batch", list(range(len(lengths))), [len(lengths)]), ("bucketed", by_length, split)]


def split(lengths, groups):
    """The lengths of each group of consecutive sequences (``groups``: sequences per group)."""
    bounds = np.cumsum([0] + groups)
    return [lengths[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def padded_tokens(lengths, groups):
    return sum(len(ls) * max(ls) for ls in split(lengths, groups))


def pad(x, lengths, groups):
    """Packed rows [T, H, D] -> one zero-padded [b, H, Lmax, D] tensor per group."""
    out, row = [], 0
    for ls in split(lengths, groups):
        t = x.new_zeros(len(ls), x.shape[1], max(ls), x.shape[2])
        for j, n in enumerate(ls):
            t[j, :, :n] = x[row:row + n].transpose(0, 1)
            row += n
        out.append(t)
    return out


def unpad(ts, lengths, groups):
    """The inverse of :func:`pad`: the real rows of every group, packed [T, H, D]."""
    return torch.cat([t[j, :, :n].transpose(0, 1) for t, ls in zip(ts, split(lengths, groups))
                      for j, n in enumerate(ls)])


def packed_inputs(lengths, heads, kv_heads, dim, dtype, device, seed=SEED):
    """q [T, H, D], k, v [T, Hkv, D] and dout [T, H, D] of the sequences in drawn order."""
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    return [torch.randn(t, h, dim, generator=g).to(device, dtype) for h in (heads, kv_heads, kv_heads, heads)]


def make_spec(name, heads, device, seed=SEED + 1):
    if name == "rope":
        return SimpleNamespace(name=name, rope=posattn.RoPE(), bias=None, table=None)
    g = torch.Generator().manual_seed(seed)
    table = (0.1 * torch.randn(heads, 2 * TABLE_M + 1, generator=g)).to(device).requires_grad_()
    return SimpleNamespace(name=name, rope=None, bias=posattn.RelativeBias(table), table=table)


def layout(tensors, lengths, groups):
    """q, k, v (leaves requiring grad) and dout in a provider's layout: lists of one packed tensor
    (``groups`` None) or of one padded tensor per group."""
    q, k, v, do = (([t] if groups is None else pad(t, lengths, groups)) for t in tensors)
    cu = torch.tensor(np.cumsum([0] + lengths), dtype=torch.int32, device=q[0].device)
    pos = torch.cat([torch.arange(n, device=q[0].device) for n in lengths])[None]      # [1, T]
    return SimpleNamespace(q=[t.requires_grad_() for t in q], k=[t.requires_grad_() for t in k],
                           v=[t.requires_grad_() for t in v], do=do, lengths=lengths, groups=groups, cu=cu, pos=pos)


class Variant:
    """One variant: the pack (its order), its padded calls and its inputs per provider layout."""

    def __init__(self, name, order, groups, lengths, tensors):
        self.name, self.groups = name, groups
        self.lengths = [lengths[i] for i in order]
        starts = np.cumsum([0] + lengths)
        rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in order]).to(tensors[0].device)
        self.tensors = [t[rows] for t in tensors]
        self.real, self.padded = sum(self.lengths), padded_tokens(self.lengths, groups)
        self._layouts = {}

    def layout(self, kind):
        if kind not in self._layouts:
            groups = {"packed": None, "calls": self.groups, "loop": [1] * len(self.lengths)}[kind]
            self._layouts[kind] = layout(self.tensors, self.lengths, groups)
        return self._layouts[kind]

    def calls(self):
        return ", ".join(f"{len(ls)} x {max(ls)}" for ls in split(self.lengths, self.groups))


# ---------------------------------------------------------------------------------------------
# providers: name -> (layout: "packed" | "calls" (the variant's padded calls) | "loop", builder);
# builder(x, spec, opts) returns the forward, a list of outputs in that layout

def _posattn_varlen(x, spec, opts):
    longest = max(x.lengths)
    return lambda: [posattn.attention_varlen(x.q[0], x.k[0], x.v[0], x.cu, x.cu, longest, longest, causal=True,
                                             rope=spec.rope, bias=spec.bias, backend=opts.backend)]


def _posattn_padded(x, spec, opts):
    keys = [_key_padding(t, ls) for t, ls in zip(x.q, split(x.lengths, x.groups))]
    return lambda: [posattn.attention(q, k, v, causal=True, attn_mask=m, rope=spec.rope, bias=spec.bias,
                                      backend=opts.padded_backend) for q, k, v, m in zip(x.q, x.k, x.v, keys)]


def _sdpa_padded(x, spec, opts):
    keeps = [reference.visibility(*(_arange(t),) * 2, True, None) & _key_padding(t, ls)
             for t, ls in zip(x.q, split(x.lengths, x.groups))]
    return lambda: [_sdpa(q, k, v, spec, keep) for q, k, v, keep in zip(x.q, x.k, x.v, keeps)]


def _sdpa_loop(x, spec, opts):
    # is_causal where there is no bias; SDPA refuses a mask with is_causal, so the bias carries causality
    keeps = [None if spec.bias is None else reference.visibility(*(_arange(t),) * 2, True, None) for t in x.q]
    return lambda: [_sdpa(q, k, v, spec, keep) for q, k, v, keep in zip(x.q, x.k, x.v, keeps)]


def _sdpa_nested(x, spec, opts):
    if spec.bias is not None:
        raise H.NotApplicable("SDPA on nested tensors takes no float mask to carry the bias")
    offsets = x.cu.long()
    gqa = x.q[0].shape[1] != x.k[0].shape[1]

    def fwd():
        q, k = x.q[0], x.k[0]
        if spec.rope is not None:     # on the packed rows, positions restarting per sequence
            q, k = (t[0].transpose(0, 1).contiguous() for t in spec.rope.reference_rotate(
                q.transpose(0, 1)[None], k.transpose(0, 1)[None], x.pos, x.pos))
        q, k, v = (torch.nested.nested_tensor_from_jagged(t, offsets).transpose(1, 2) for t in (q, k, x.v[0]))
        return [F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa).transpose(1, 2).values()]
    return fwd


def _sdpa(q, k, v, spec, keep):
    """SDPA on one [b, H, L, D] call: RoPE rotated in PyTorch, the bias gathered from the table
    under autograd; ``keep`` [b, 1, L, L] bool, None: is_causal."""
    pos = _arange(q)
    if spec.rope is not None:
        q, k = spec.rope.reference_rotate(q, k, pos, pos)
    gqa = q.shape[1] != k.shape[1]
    if keep is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if spec.bias is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=gqa)
    mask = spec.bias.reference_bias(pos, pos, q.shape[1]).masked_fill(~keep, float("-inf")).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def _arange(t):
    return torch.arange(t.shape[2], device=t.device)[None]      # [1, L]: positions from 0


def _key_padding(t, lengths):
    """[b, 1, 1, Lmax] bool of a padded [b, H, Lmax, D] call: key j of sequence i is real."""
    return (_arange(t) < torch.tensor(lengths, device=t.device)[:, None])[:, None, None]


PROVIDERS = {
    VARLEN: ("packed", _posattn_varlen),
    "posattn-padded": ("calls", _posattn_padded),
    "sdpa-padded": ("calls", _sdpa_padded),
    "sdpa-nested": ("packed", _sdpa_nested),
    LOOP: ("loop", _sdpa_loop),
}


# ---------------------------------------------------------------------------------------------
# measuring

def build_step(fwd, x, spec, mode):
    """One timed call: (outputs, gradients of sum(out · dout) w.r.t. q, k, v and the table)."""
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fwd(), []
        return step
    wrt = x.q + x.k + x.v + ([spec.table] if spec.table is not None else [])

    def step():
        outs = fwd()
        return outs, list(torch.autograd.grad(outs, wrt, x.do))
    return step


def packed_result(x, outs, grads):
    """{name: tensor} for the guard: the output and the q, k, v gradients as packed real rows, the table's gradient."""
    unpack = (lambda ts: ts[0]) if x.groups is None else (lambda ts: unpad(ts, x.lengths, x.groups))
    res, n = {"out": unpack(outs)}, len(x.q)
    if grads:
        res.update({name: unpack(grads[i * n:(i + 1) * n]) for i, name in enumerate(("dq", "dk", "dv"))})
        if len(grads) > 3 * n:
            res["dtable"] = grads[-1]
    return res


class _SdpaReasons(logging.Handler):
    """Keeps the reasons torch logs (as warnings) when SDPA refuses nested tensors, for the n/a
    line, instead of printing them."""
    log = logging.getLogger("torch.nested._internal.sdpa")

    def __enter__(self):
        self.lines, self.propagate = [], self.log.propagate
        self.log.addHandler(self)
        self.log.propagate = False
        return self

    def __exit__(self, *exc):
        self.log.removeHandler(self)
        self.log.propagate = self.propagate

    def emit(self, record):
        self.lines.append(record.getMessage().strip())

    def __str__(self):
        return "; ".join(dict.fromkeys(s for s in self.lines if not s.endswith("because:")))


def guard(first, dtype, where):
    """Every provider's result against the first one's (posattn-varlen's when it ran); stops the run on a mismatch."""
    if not first:
        return {}
    (anchor, ref), diffs = next(iter(first.items())), {}
    for p, res in first.items():
        for name, t in res.items():
            d = H._rel_diff([t], [ref[name]])
            diffs[p] = max(diffs.get(p, 0.0), d)
            if not d <= TOL[dtype]:
                raise SystemExit(f"bench varlen: {where}: {p}'s {name} differs from {anchor}'s by {d:.2e} (max |diff| / "
                                 f"max |value|, tolerance {TOL[dtype]}); the providers do not compute the same thing")
    return diffs


def measure(plan, providers, reps, opts, t0):
    """Warm and check every (variant, spec, mode, provider), then time each (variant, spec, mode)
    round-robin; returns {(variant, spec, mode): [result per provider]}."""
    groups, steps = {}, {}
    for i, (v, spec, mode) in enumerate(plan):
        rs, first = groups.setdefault((v.name, spec.name, mode), []), {}
        for p in providers:
            kind, build = PROVIDERS[p]
            x = v.layout(kind)
            r = SimpleNamespace(provider=p, na=None, times=[], rel_diff=None, cores=(math.nan, math.nan),
                                tokens=v.padded if kind == "calls" else v.real)
            rs.append(r)
            with _SdpaReasons() as why:
                try:
                    step = build_step(build(x, spec, opts), x, spec, mode)
                    first[p] = packed_result(x, *step())
                    for _ in range(WARMUP - 1):
                        step()
                    steps[id(r)] = step
                except H.NotApplicable as e:
                    r.na = str(e)
                except Exception as e:      # a provider that fails is reported, never fatal
                    r.na = reason(e) + (f" ({why})" if str(why) else "")
        diffs = guard(first, opts.dtype, f"{v.name} {spec.name} {mode}")
        for r in rs:
            r.rel_diff = diffs.get(r.provider)
        H.progress(f"warm + check {i + 1}/{len(plan)}: {v.name} {spec.name} {mode}", t0)
    for i, (key, rs) in enumerate(groups.items()):
        live = [(r, steps.pop(id(r))) for r in rs if id(r) in steps]
        before, wall = cpu_seconds(), time.perf_counter()
        for _ in range(reps):
            H.timed_round(live, opts.device)
        own, busy = ((cpu_seconds() - before) / max(time.perf_counter() - wall, 1e-9))[:2]
        for r, _ in live:
            r.cores = (float(own), float(max(busy - own, 0.0)))
        del live
        H.progress(f"time {i + 1}/{len(groups)}: {' '.join(key)} x{reps}", t0)
    for rs in groups.values():
        for r in rs:
            r.median = float(np.median(r.times)) if r.times else None
    return groups


def real_flops(lengths, heads, dim, mode):
    """The harness's formula per sequence (causal: halved), summed over the real sequences."""
    return sum(4.0 * heads * n * n * dim / 2 for n in lengths) * (3.5 if mode == "fwd+bwd" else 1.0)


def targets(rs, pad_ratio):
    """(a): (best padded provider, varlen's speed-up over it, the target); (b): loop time / varlen time."""
    by = {r.provider: r for r in rs if r.median}
    if VARLEN not in by:
        return None, None
    varlen = by[VARLEN].median
    peers = [by[p] for p in PADDED if p in by]
    best = min(peers, key=lambda r: r.median) if peers else None
    a = (best.provider, best.median / varlen, 0.9 * pad_ratio) if best else None
    return a, (by[LOOP].median / varlen if LOOP in by else None)


def verdict(ratio, target):
    return "" if ratio is None else ("PASS" if ratio >= target else "MISS")


# ---------------------------------------------------------------------------------------------
# output

def print_tables(groups, vs, opts):
    by_name = {v.name: v for v in vs}
    print("\nmedian ms; GF/s of the real work (padding computed counts as lost time); tokens computed (padded "
          "providers: real + padding); others: CPU cores other processes used while timing\n")
    print("| variant | spec | mode | provider | ms | GF/s | tokens | x real | others |\n"
          "|---|---|---|---|---:|---:|---:|---:|---:|")
    for (vn, sn, mode), rs in groups.items():
        v = by_name[vn]
        flops = real_flops(v.lengths, opts.heads, opts.head_dim, mode)
        for r in rs:
            ms = "n/a" if r.na else (f"{r.median * 1e3:.3g}" if r.median else "-")
            gf = f"{flops / r.median / 1e9:.1f}" if r.median else ""
            busy = f"{r.cores[1]:.1f}" if r.times else ""
            print(f"| {vn} | {sn} | {mode} | {r.provider} | {ms} | {gf} | {r.tokens} | {r.tokens / v.real:.2f} | "
                  f"{busy} |")
    print("\ntargets: (a) varlen's speed-up over the best padded provider >= 0.9 x padded/real tokens; (b) sdpa-loop "
          "time / varlen time >= 0.9\n")
    print("| variant | spec | mode | padded/real | (a) best padded | speed-up | target | (a) | (b) loop/varlen | (b) |\n"
          "|---|---|---|---:|---|---:|---:|---|---:|---|")
    for (vn, sn, mode), rs in groups.items():
        v = by_name[vn]
        a, b = targets(rs, v.padded / v.real)
        cells = [a[0], f"{a[1]:.2f}x", f">= {a[2]:.2f}x", verdict(a[1], a[2])] if a else ["n/a"] + [""] * 3
        cells += [f"{b:.2f}", verdict(b, 0.9)] if b is not None else ["n/a", ""]
        print(f"| {vn} | {sn} | {mode} | {v.padded / v.real:.2f} | " + " | ".join(cells) + " |")
    reasons = {}
    for key, rs in groups.items():
        for r in rs:
            if r.na:
                reasons.setdefault((r.provider, r.na), []).append("/".join(key))
    if reasons:
        print("\nn/a:")
        for (p, why), where in reasons.items():
            print(f"  {p}: {why} ({', '.join(where)})")
    busy = [r.cores[1] for rs in groups.values() for r in rs if r.times]
    if busy and max(busy) > 0.25:
        print(f"\n!! other processes used up to {max(busy):.1f} cores while timing: absolute times are inflated")


def csv_rows(groups, vs, opts, info):
    by_name, rows = {v.name: v for v in vs}, []
    for (vn, sn, mode), rs in groups.items():
        v = by_name[vn]
        flops = real_flops(v.lengths, opts.heads, opts.head_dim, mode)
        a, b = targets(rs, v.padded / v.real)
        for r in rs:
            own = r.provider == VARLEN
            rows.append(dict(
                run_id=info["run_id"], op="varlen", variant=vn, spec=sn, mode=mode, provider=r.provider,
                sequences=len(v.lengths), mean=opts.mean, max=opts.max, longest=max(v.lengths), calls=len(v.groups),
                H=opts.heads, Hkv=opts.kv_heads, D=opts.head_dim, dtype=opts.dtype, device=opts.device,
                backend=opts.backend if own else "", real_tokens=v.real, padded_tokens=v.padded,
                tokens_computed=r.tokens, median_ms=H.fmt(r.median, 1e3),
                q20_ms=H.fmt(np.quantile(r.times, 0.2) if r.times else None, 1e3),
                q80_ms=H.fmt(np.quantile(r.times, 0.8) if r.times else None, 1e3), reps=len(r.times),
                gflops_real=H.fmt(flops / r.median / 1e9 if r.median else None), rel_diff=H.fmt(r.rel_diff),
                best_padded=a[0] if own and a else "", speedup_vs_best_padded=H.fmt(a[1]) if own and a else "",
                target_a=H.fmt(a[2]) if own and a else "", verdict_a=verdict(a[1], a[2]) if own and a else "",
                loop_over_varlen=H.fmt(b) if own else "", verdict_b=verdict(b, 0.9) if own else "",
                cores_own=H.fmt(r.cores[0], 1, 3), cores_others=H.fmt(r.cores[1], 1, 3),
                status="n/a" if r.na else "ok", note=r.na or "",
                **{k: info[k] for k in ("machine", "cores", "threads", "gpu", "torch", "triton", "posattn", "git_sha")}))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench --only varlen", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 sequences, mean 128, max 512, 3 reps")
    parser.add_argument("--batch", type=int, default=None, help="sequences (default 32)")
    parser.add_argument("--mean", type=int, default=None, help="mean length before the clip (default 512)")
    parser.add_argument("--max", type=int, default=None, help="longest length (default 2048)")
    parser.add_argument("--buckets", type=int, default=4, help="padded calls of the bucketed variant")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--reps", type=int, default=None, help="timed runs (default 5)")
    parser.add_argument("--modes", default=",".join(H.MODES))
    parser.add_argument("--specs", default="rope,relbias")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--backend", default=None, choices=("cpu", "triton", "reference"),
                        help="posattn-varlen's backend (default: cpu on CPU, triton on CUDA)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--out", default=None, help="folder for varlen.csv (default bench/results)")
    opts = parser.parse_args(argv)
    for key, value in (QUICK if opts.quick else DEFAULTS).items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)
    opts.kv_heads = opts.kv_heads or opts.heads
    opts.padded_backend = "triton" if opts.device == "cuda" else "cpu"
    opts.backend = opts.backend or opts.padded_backend
    providers, specs, modes = opts.providers.split(","), opts.specs.split(","), opts.modes.split(",")
    for what, got, known in (("provider", providers, PROVIDERS), ("spec", specs, ("rope", "relbias")),
                             ("mode", modes, H.MODES)):
        unknown = [g for g in got if g not in known]
        if unknown:
            parser.error(f"unknown {what}(s) {unknown}; choose from {list(known)}")
    if opts.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    t0 = time.perf_counter()
    info = H.meta()
    lengths = sequence_lengths(opts.batch, opts.mean, opts.max)
    tensors = packed_inputs(lengths, opts.heads, opts.kv_heads, opts.head_dim, getattr(torch, opts.dtype), opts.device)
    vs = [Variant(*v, lengths, tensors) for v in variants(lengths, opts.buckets)]
    print(f"machine: {info['machine']}, {info['cores']} cores, {info['threads']} threads"
          + (f", GPU {info['gpu']}" if info["gpu"] else "") + f" | torch {info['torch']} | posattn {info['posattn']} @ "
          f"{info['git_sha']} | posattn-varlen backend {opts.backend}")
    print(f"{len(lengths)} sequences, lengths {min(lengths)} ... {max(lengths)} (mean {np.mean(lengths):.0f}, median "
          f"{np.median(lengths):.0f}; lognormal, mean {opts.mean}, max {opts.max}), {sum(lengths)} real tokens; causal, "
          f"H={opts.heads} Hkv={opts.kv_heads} D={opts.head_dim} {opts.dtype} {opts.device}; {opts.reps} timed runs "
          f"after {WARMUP} warm-up calls, providers round-robin")
    for v in vs:
        print(f"  {v.name}: {len(v.groups)} padded call(s) [{v.calls()}], {v.padded} padded tokens "
              f"({v.padded / v.real:.2f}x real)")
    plan = [(v, make_spec(s, opts.heads, opts.device), m) for v in vs for s in specs for m in modes]
    groups = measure(plan, providers, opts.reps, opts, t0)
    print_tables(groups, vs, opts)
    path = H.write_csv(os.path.join(opts.out or str(H.RESULTS), "varlen.csv"), csv_rows(groups, vs, opts, info))
    print(f"\nCSV: {path} (run_id {info['run_id']}); done in {time.perf_counter() - t0:.0f} s")
