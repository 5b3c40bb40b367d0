"""Decoding with a KV cache: :func:`attention_with_kvcache` (flash-decoding split-KV, paged caches).

The cache is a sequence layout like any other: batch row b holds S_b keys at positions 0 .. S_b−1
(after this call's new rows are appended) and its L queries sit at the last L positions,
S_b − L .. S_b − 1 (bottom-right). Causality, windows and every bias are functions of these
positions, so a decode step computes exactly what one causal :func:`posattn.attention` over the
whole sequence computes for its last rows.
"""
from __future__ import annotations

import math
import numbers

import torch

from . import _config, ops, reference
from ._checks import FLOAT_DTYPES, _is_int
from .positions import ALiBi, ManhattanDecay, RelativeBias, RoPE, T5Bias, check_specs, kernel_positions


def attention_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens, cache_batch_idx=None,
                           block_table=None, causal=True, window=None, rope=None, bias=None, softcap=None, scale=None,
                           num_splits=0, return_lse=False, backend=None):
    """Attention of new queries over a KV cache, the cache updated in place (forward only).

    Shapes: q [B, H, L, D] (L = 1 for decode; a few rows for speculative or chunked steps).
    Caches in Hugging Face's layout, k_cache [Bc, Hkv, S_max, D] and v_cache [Bc, Hkv, S_max, Dv],
    or paged, [num_pages, Hkv, page_size, D*] with ``block_table`` int32 [B, max_pages]: key row j
    of batch row b lives in page ``block_table[b, j // page_size]`` at slot ``j % page_size`` (any
    page size ≥ 1). ``cache_batch_idx`` int32 [B] picks the cache row of each batch row
    (contiguous caches only; None: row b). H must be a multiple of Hkv (grouped-query attention).

    ``cache_seqlens``: an int or an int32 / int64 [B] tensor, the tokens already cached. With new
    ``k`` [B, Hkv, L, D] and ``v`` [B, Hkv, L, Dv] they are written into the caches in place at
    rows ``cache_seqlens[b] + arange(L)``, the keys rotated first by ``rope`` at those positions
    (the cache holds rotated keys, as Hugging Face and FlashAttention keep it); then S_b =
    cache_seqlens[b] + L. Without them S_b = cache_seqlens[b]. Attention runs over the first S_b
    keys (positions 0 .. S_b−1) with the queries at S_b − L .. S_b − 1 (bottom-right): ``causal``
    (default True), ``window=(left, right)``, ``softcap`` and ``bias`` (ALiBi, RelativeBias,
    T5Bias, ManhattanDecay) all act on these positions. ``rope``: a :class:`posattn.RoPE` (any
    scaling); q is rotated inside the kernel. Dynamic NTK / LongRoPE frequencies follow the
    longest sequence of the batch after the append (an int ``cache_seqlens`` costs nothing; a
    tensor one host read per call for those two scalings only).

    ``num_splits``: the key range of each (batch row, KV head) is cut into this many parts run in
    parallel and merged exactly (flash-decoding); 0 chooses from B·Hkv, the cache lengths and the
    machine (threads on CPU, SMs on GPU). Any fixed value gives run-to-run identical results, and
    1 also batch-invariant ones. Returns out [B, H, L, Dv] (q's dtype), with ``return_lse`` also
    lse [B, H, L] (fp32, natural log). A query row that sees no key gives 0 and lse −inf.

    Nothing here takes gradients: inputs that require grad while grad mode is on raise. Value
    checks that would need a device synchronisation (cache lengths against the capacity, page
    and batch indices in range) run on CPU tensors, and on CUDA tensors only when
    ``cache_seqlens`` is an int; otherwise a batch row whose lengths overflow the cache gets NaN
    outputs and lse, and only its new rows that fit are written.

    ``backend``: "triton" (CUDA tensors; CPU tensors under TRITON_INTERPRET=1), "cpu" (the C++
    extension), "reference" (PyTorch, any dtype incl. float64: the oracle) or None (as
    :func:`posattn.attention` chooses).
    """
    B, H, L, D, Dv, Hkv = _check_inputs(q, k_cache, v_cache, k, v, cache_batch_idx, block_table, window, softcap,
                                        scale, num_splits)
    check_specs(rope, bias, None)
    _check_specs(rope, bias, B, H, q)
    seqlens = _seqlens_tensor(cache_seqlens, B, q.device)
    _check_lengths(cache_seqlens, seqlens, L if k is not None else 0, k_cache, cache_batch_idx, block_table)
    from .functional import select_backend
    backend = select_backend(backend, q)
    new = L if k is not None else 0
    rope = _fixed_rope(rope, D, cache_seqlens, seqlens, new)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if backend == "reference":
        out, lse = _reference(q, k_cache, v_cache, k, v, seqlens, cache_batch_idx, block_table, causal, window, rope,
                              bias, softcap, scale)
        return (out, lse) if return_lse else out
    if backend == "triton" and q.dtype == torch.float64:
        raise TypeError("attention_with_kvcache: backend='triton' takes float16, bfloat16 and float32; float64 runs "
                        "on backend='reference'")
    if max(D, Dv) > _config.MAX_HEAD_DIM:
        raise ValueError(f"head dims D={D}, Dv={Dv}: backend={backend!r} takes head dims up to "
                         f"{_config.MAX_HEAD_DIM}; use backend='reference' for larger ones")
    left, right = window if window is not None else (-1, -1)
    # (the rotary spec sizes its tables from a key tensor: a stand-in of the cache's shape)
    keys = None if rope is None else q.new_empty(1, 1, 1, 1).expand(B, Hkv, k_cache.shape[2], D)
    kp = kernel_positions(rope, bias, None, q, keys, 0, 0)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k is not None and k.stride(-1) != 1:
        k = k.contiguous()
    if v is not None and v.stride(-1) != 1:
        v = v.contiguous()
    out, lse = ops.kvcache_op(backend)(
        q, k_cache, v_cache, k, v, seqlens, _int32(cache_batch_idx), _int32(block_table), bool(causal), left, right,
        float(softcap or 0.0), scale, kp.rope_table, kp.bias_tensor, kp.bias_lut, ops.spec_ints(kp),
        float(kp.rope_scale), int(num_splits))
    return (out, lse) if return_lse else out


# checks ------------------------------------------------------------------------------------------

def _check_inputs(q, k_cache, v_cache, k, v, cache_batch_idx, block_table, window, softcap, scale, num_splits):
    # (a decode step is short: these checks read each attribute once)
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"attention_with_kvcache: q must be a tensor, got {type(q).__name__}")
    dtype, device, grad = q.dtype, q.device, torch.is_grad_enabled()
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)):
        if t is None and name in ("k", "v"):
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention_with_kvcache: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention_with_kvcache: {name} must be 4-D ({_LAYOUTS[name]}), got shape "
                             f"{tuple(t.shape)}")
        if t.dtype != dtype or dtype not in FLOAT_DTYPES:
            raise TypeError(f"attention_with_kvcache: {name} has dtype {t.dtype} but q has {dtype}; q, the caches "
                            f"and new k/v share one float dtype")
        if t is not q and t.device != device:
            raise ValueError(f"attention_with_kvcache: {name} is on {t.device} but q on {device}")
        if grad and t.requires_grad:
            raise RuntimeError(f"attention_with_kvcache is forward only, but {name} requires grad; call it under "
                               f"torch.no_grad() / torch.inference_mode(), or detach {name}")
    if (k is None) != (v is None):
        raise ValueError("attention_with_kvcache: pass both k and v (the new rows to append), or neither")
    B, H, L, D = q.shape
    Hkv, Dv = k_cache.shape[1], v_cache.shape[3]
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must agree in their "
                         f"first three dims (rows or pages, KV heads, slots)")
    if k_cache.shape[3] != D:
        raise ValueError(f"attention_with_kvcache: q has head dim {D} but k_cache has {k_cache.shape[3]}")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"attention_with_kvcache: q has {H} heads but the caches have {Hkv}; the query heads must "
                         f"be a multiple of the KV heads (grouped-query attention)")
    if D == 0 or Dv == 0:
        raise ValueError("attention_with_kvcache: head dims must be ≥ 1")
    if k is not None:
        if tuple(k.shape) != (B, Hkv, L, D) or tuple(v.shape) != (B, Hkv, L, Dv):
            raise ValueError(f"attention_with_kvcache: new k {tuple(k.shape)} / v {tuple(v.shape)} must be "
                             f"[B, Hkv, L, D] = {(B, Hkv, L, D)} / [B, Hkv, L, Dv] = {(B, Hkv, L, Dv)} (one new row "
                             f"per query row)")
    for name, t, dims in (("cache_batch_idx", cache_batch_idx, 1), ("block_table", block_table, 2)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64) or t.dim() != dims:
            raise TypeError(f"attention_with_kvcache: {name} must be a {dims}-D int32 tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}"
                            f"{' of shape ' + str(tuple(t.shape)) if isinstance(t, torch.Tensor) else ''}")
        if t.shape[0] != B:
            raise ValueError(f"attention_with_kvcache: {name} has {t.shape[0]} rows but the batch has {B}")
        if t.device != q.device:
            raise ValueError(f"attention_with_kvcache: {name} is on {t.device} but q on {q.device}")
    if block_table is not None and cache_batch_idx is not None:
        raise ValueError("attention_with_kvcache: a paged cache (block_table) takes no cache_batch_idx: the block "
                         "table already says where each batch row's pages are")
    if block_table is None and cache_batch_idx is None and k_cache.shape[0] < B:
        raise ValueError(f"attention_with_kvcache: the caches hold {k_cache.shape[0]} rows but the batch has {B}; "
                         f"pass cache_batch_idx to map batch rows to cache rows")
    if window is not None and (not isinstance(window, (tuple, list)) or len(window) != 2
                               or not all(_is_int(w) and w >= -1 for w in window)):
        raise ValueError(f"window={window!r} must be a pair of ints (left, right), each ≥ 0 or -1 for unbounded")
    if softcap is not None and not (isinstance(softcap, numbers.Real) and softcap > 0):
        raise ValueError(f"softcap={softcap!r} must be a positive number (or None)")
    if scale is not None and not isinstance(scale, numbers.Real):
        raise TypeError(f"scale={scale!r} must be a number or None (None means 1/sqrt(D))")
    if not _is_int(num_splits) or num_splits < 0:
        raise ValueError(f"num_splits={num_splits!r} must be an int ≥ 0 (0: chosen from the sizes and the machine)")
    return B, H, L, D, Dv, Hkv


_LAYOUTS = {"q": "[B, H, L, D]", "k_cache": "[Bc, Hkv, S_max, D] or paged [pages, Hkv, page_size, D]",
            "v_cache": "[Bc, Hkv, S_max, Dv] or paged [pages, Hkv, page_size, Dv]", "k": "[B, Hkv, L, D]",
            "v": "[B, Hkv, L, Dv]"}


def _check_specs(rope, bias, B, H, q):
    if rope is not None and not isinstance(rope, RoPE):
        raise NotImplementedError(f"attention_with_kvcache takes rope=posattn.RoPE (any scaling), not "
                                  f"{type(rope).__name__}: the cache holds keys rotated once at their positions, and "
                                  f"xPos's decay or per-row angles are not a rotation fixed at insertion; use "
                                  f"posattn.attention over the cached keys for those")
    if bias is not None:
        if not isinstance(bias, (ALiBi, RelativeBias, T5Bias, ManhattanDecay)):
            raise TypeError(f"bias must be ALiBi, RelativeBias, T5Bias or ManhattanDecay, got {type(bias).__name__}")
        bias.check(B, H, q.device)
        for t in vars(bias).values():
            if isinstance(t, torch.Tensor) and t.requires_grad and torch.is_grad_enabled():
                raise RuntimeError("attention_with_kvcache is forward only, but the bias's tensor requires grad; "
                                   "call it under torch.no_grad() or pass a detached tensor")


def _seqlens_tensor(cache_seqlens, B, device):
    if _is_int(cache_seqlens):
        if not 0 <= cache_seqlens < 2**30:
            raise ValueError(f"cache_seqlens={cache_seqlens} must lie in [0, 2**30)")
        return torch.full((B,), cache_seqlens, dtype=torch.int32, device=device)
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cache_seqlens must be an int or an int32 tensor [B], got "
                        f"{cache_seqlens.dtype if isinstance(cache_seqlens, torch.Tensor) else type(cache_seqlens)}")
    if tuple(cache_seqlens.shape) != (B,):
        raise ValueError(f"cache_seqlens has shape {tuple(cache_seqlens.shape)}; it must be [B] = [{B}] (or an int)")
    if cache_seqlens.device != device:
        raise ValueError(f"cache_seqlens is on {cache_seqlens.device} but q on {device}")
    return cache_seqlens if cache_seqlens.dtype == torch.int32 else cache_seqlens.to(torch.int32)


def _check_lengths(cache_seqlens, seqlens, new, k_cache, cache_batch_idx, block_table):
    """Cache lengths against the capacity, page and row indices in range: where no device sync
    is needed (CPU tensors; an int ``cache_seqlens`` for the capacity) and never while compiling."""
    if torch.compiler.is_compiling():
        return
    on_host = seqlens.device.type == "cpu"
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[2] if paged else k_cache.shape[2]
    if on_host or _is_int(cache_seqlens):
        lens = [cache_seqlens] if _is_int(cache_seqlens) else seqlens.tolist()
        for b, n in enumerate(lens):
            if n < 0:
                raise ValueError(f"cache_seqlens[{b}] = {n} is negative")
            if n + new > capacity:
                where = (f"{block_table.shape[1]} pages of {k_cache.shape[2]}" if paged else
                         f"S_max = {k_cache.shape[2]}")
                raise ValueError(f"cache_seqlens[{b}] = {n} plus {new} new rows needs {n + new} cache slots but the "
                                 f"cache holds {capacity} ({where}); allocate a longer cache or more pages")
    if not on_host:
        return
    for name, t, hi in (("cache_batch_idx", cache_batch_idx, k_cache.shape[0]), ("block_table", block_table,
                                                                                  k_cache.shape[0])):
        if t is not None and t.numel():
            lo_v, hi_v = int(t.min()), int(t.max())
            if lo_v < 0 or hi_v >= hi:
                what = "pages" if name == "block_table" else "rows"
                raise ValueError(f"{name} holds values in [{lo_v}, {hi_v}] but the caches have {hi} {what}; every "
                                 f"entry must lie in [0, {hi})")


def _int32(t):
    return None if t is None else t.to(torch.int32).contiguous()


def _fixed_rope(rope, D, cache_seqlens, seqlens, new):
    """A RoPE whose frequencies depend on the sequence length (dynamic NTK, LongRoPE) fixed by
    the longest sequence of the batch after the append, so q and the new keys share them."""
    if rope is None:
        return None
    from .functional import _dynamic_rope
    if not _dynamic_rope(rope):
        return rope
    longest = (cache_seqlens if _is_int(cache_seqlens) else int(seqlens.max()) if seqlens.numel() else 0) + new
    inv, factor = rope.frequencies(D, max(longest - 1, 0), 0, 1, 1)
    return RoPE(theta=rope.theta, dim=2 * inv.numel(), interleaved=rope.interleaved, inv_freq=inv,
                attention_factor=factor)


# the reference ----------------------------------------------------------------------------------

def _rows(cache, b, n, cache_batch_idx, block_table):
    """Row indices (page, slot) of batch row b's first n logical rows."""
    j = torch.arange(n, device=cache.device)
    if block_table is None:
        row = b if cache_batch_idx is None else int(cache_batch_idx[b])
        return torch.full_like(j, row), j
    ps = cache.shape[2]
    return block_table[b, j // ps].long(), j % ps


def _reference(q, k_cache, v_cache, k, v, seqlens, cache_batch_idx, block_table, causal, window, rope, bias, softcap,
               scale):
    """The oracle: append (rotating the new keys), then per batch row the dense reference over its
    cached keys with the queries rotated at their positions."""
    B, H, L, D = q.shape
    lens = [int(n) for n in seqlens.tolist()]
    if k is not None:
        for b in range(B):
            pos = torch.arange(lens[b], lens[b] + L, device=q.device)
            kb = k[b:b + 1]
            if rope is not None:
                kb = rope.reference_rotate(kb, kb, pos[None], pos[None])[1]
            page, slot = _rows(k_cache, b, lens[b] + L, cache_batch_idx, block_table)
            page, slot = page[lens[b]:], slot[lens[b]:]
            k_cache[page, :, slot] = kb[0].transpose(0, 1).to(k_cache.dtype)
            v_cache[page, :, slot] = v[b].transpose(0, 1)
        lens = [n + L for n in lens]
    outs, lses = [], []
    for b in range(B):
        S = lens[b]
        page, slot = _rows(k_cache, b, S, cache_batch_idx, block_table)
        kb = k_cache[page, :, slot].transpose(0, 1)[None]
        vb = v_cache[page, :, slot].transpose(0, 1)[None]
        qb = q[b:b + 1]
        if rope is not None:
            q_pos = torch.arange(S - L, S, device=q.device)
            qb = rope.reference_rotate(qb, qb, q_pos[None], q_pos[None])[0]
        o, lse = reference.attention(qb, kb, vb, causal=causal, window=window, bias=_row_bias(bias, b),
                                     softcap=softcap, scale=scale, q_pos=S - L, k_pos=0, return_lse=True)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses).float() if q.dtype != torch.float64 else torch.cat(lses)


def _row_bias(bias, b):
    """ALiBi with one row of slopes per batch row: batch row b's."""
    if isinstance(bias, ALiBi) and bias.slopes.dim() == 2 and bias.slopes.shape[0] != 1:
        return ALiBi(bias.slopes[b])
    return bias
