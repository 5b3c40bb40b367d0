"""KV-cache decoding in Triton (``attention_with_kvcache``): split-KV attention over a cache.

Layout: q [B, H, L, D] (L = 1 for decoding, small L for speculative / chunked steps); the cache
is contiguous, k_cache [Bc, Hkv, S_max, D] / v_cache [Bc, Hkv, S_max, Dv] (Hugging Face's
layout; batch row b reads cache row cache_batch_idx[b], or b), or paged, [pages, Hkv,
page_size, D*] with block_table [B, max_pages] (logical key j of batch row b is slot
j % page_size of page block_table[b, j // page_size]; any page size). Positions define
everything: batch row b holds S_b keys at positions 0 … S_b − 1 and its queries sit at
S_b − L + i (bottom-right), so causality, windows, RoPE and biases are the dense kernels'
score pipeline (``_common.score_tile``, ``bias_operand``, ``load_rotated``) at those positions.

Three kernels, launched in this order on one stream:

- ``_append_kernel`` (only with new keys): rotates the new keys at positions
  cache_seqlens[b] + i (RoPE: the cache holds rotated keys) and writes them and the new
  values into the cache in place; S_b = cache_seqlens[b] + L.
- ``_decode_kernel``, grid (B·Hkv, splits, query blocks): one program per (batch row, KV
  head, split). Its query rows are the G·L rows of the KV group (G = H / Hkv; row i·G + g is
  query i of head hkv·G + g), so every key and value is read once per KV head and split, and
  the rows of a tile share few positions. The keys that the tile's queries can see (causal,
  window) are cut into ``splits`` runs of whole key tiles, per batch row on the device
  (cache_seqlens is never read on the host); the interior tiles run unmasked, the boundary
  ones (window edges, the causal diagonal, the ragged end) masked. One split writes the
  final rows; several write fp32 partials (normalised O_s, natural-log lse_s; an empty split
  O_s = 0, lse_s = −inf) to scratch [B, H, L, splits, Dv] / [B, H, L, splits].
- ``_combine_kernel`` (more than one split): the exact merge of docs/math.md §9.1, in split
  order, so a fixed split count is deterministic and one split is batch-invariant.

Nothing depends on the values of cache_seqlens on the host: no synchronisation and no
value-dependent allocation (CUDA graphs, ``torch.compile(fullgraph=True)``).
"""
import math

import torch
import triton
import triton.language as tl

from posattn import _config
from posattn.positions import BIAS_NONE, ROPE_FREQ, ROPE_NONE, KernelPositions

from ._common import (bias_operand, bias_tile, boundary_count, boundary_start, interior_tiles, load_rotated,
                      normalise_rows, score_tile, softmax_update)
from .attention import (_CAPTURE, _alloc, _bias_strides, _check_device, _dot_precision, _interpreting, _launch,
                        _pair_valid)

_NO_SPECIALIZE = ["L", "capacity", "window_left", "window_right", "bias_i0", "bias_i1", "bias_i2"]

# The most splits of one (batch row, KV head): FlashAttention's combine takes up to 128.
MAX_SPLITS = 128
# Streaming multiprocessors assumed where none can be asked: under the interpreter, and for
# the launches recorded for the AOT report (H100 SXM / H200: 132, A100: 108).
_INTERPRET_SMS = 4
_AOT_SMS = {8: 108, 9: 132}


@triton.jit
def _cache_bases(K, V, BATCH_IDX, BLOCK_TABLE, b, hkv, stride_k_b, stride_k_h, stride_v_b, stride_v_h, stride_bt_b,
                 PAGED: tl.constexpr, HAS_BATCH_IDX: tl.constexpr):
    """KV head ``hkv`` of batch row ``b``: its K and V base pointers and its block-table row. A
    contiguous cache starts at the row's cache row (cache_batch_idx[b], or b); a paged one
    at page 0, the page of each key being found by :func:`_cache_slots`."""
    BT_row = BLOCK_TABLE + b * stride_bt_b
    if PAGED:
        cb = 0
    elif HAS_BATCH_IDX:
        cb = tl.load(BATCH_IDX + b).to(tl.int64)
    else:
        cb = b
    return K + cb * stride_k_b + hkv * stride_k_h, V + cb * stride_v_b + hkv * stride_v_h, BT_row


@triton.jit
def _cache_slots(j, valid, BT_row, page_size, PAGED: tl.constexpr):
    """(page, slot) of logical cache rows ``j``: row j lives at page·stride_page + slot·stride_row
    of the head's base pointer (a contiguous cache: page 0, slot j)."""
    if PAGED:
        page = tl.load(BT_row + j // page_size, mask=valid, other=0).to(tl.int64)
        slot = (j % page_size).to(tl.int64)
    else:
        page = 0
        slot = j.to(tl.int64)
    return page, slot


@triton.jit(do_not_specialize=["L", "capacity"])
def _append_kernel(
    # the caches (written), the new keys / values, the per-row tables
    KC, VC, KN, VN, SEQLENS, BATCH_IDX, BLOCK_TABLE, ROPE_TABLE,
    # sizes
    HKV, L, D, DV, capacity, page_size,
    # strides
    stride_kc_b, stride_kc_h, stride_kc_s, stride_vc_b, stride_vc_h, stride_vc_s,
    stride_kn_b, stride_kn_h, stride_kn_l, stride_vn_b, stride_vn_h, stride_vn_l, stride_bt_b,
    # scalars
    rope_scale,
    # constexprs
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PAGED: tl.constexpr,
    HAS_BATCH_IDX: tl.constexpr, ROPE_KIND: tl.constexpr, ROTARY_DIM: tl.constexpr, ROPE_INTERLEAVED: tl.constexpr,
):
    """New keys (rotated at their positions) and values into cache rows cache_seqlens[b] + i.

    Rows past the cache's capacity (S_max, or max_pages·page_size) are dropped rather than
    written out of bounds (and _decode_kernel makes that batch row's outputs NaN)."""
    bkv = tl.program_id(0).to(tl.int64)
    b = bkv // HKV
    hkv = bkv % HKV
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    pos = tl.load(SEQLENS + b) + offs_l
    valid = (offs_l < L) & (pos >= 0) & (pos < capacity)
    K_base, V_base, BT_row = _cache_bases(KC, VC, BATCH_IDX, BLOCK_TABLE, b, hkv, stride_kc_b, stride_kc_h,
                                          stride_vc_b, stride_vc_h, stride_bt_b, PAGED, HAS_BATCH_IDX)
    page, slot = _cache_slots(pos, valid, BT_row, page_size, PAGED)
    kn_rows = KN + b * stride_kn_b + hkv * stride_kn_h + offs_l * stride_kn_l
    k = load_rotated(kn_rows, valid, offs_d, D, pos, pos, kn_rows, 0, ROPE_TABLE, rope_scale, ROPE_KIND, ROTARY_DIM,
                     ROPE_INTERLEAVED)  # [BLOCK_L, BLOCK_D]
    tl.store(K_base + (page * stride_kc_b + slot * stride_kc_s)[:, None] + offs_d[None, :], k.to(KC.dtype.element_ty),
             mask=valid[:, None] & (offs_d < D)[None, :])
    v_mask = valid[:, None] & (offs_dv < DV)[None, :]
    v = tl.load(VN + b * stride_vn_b + hkv * stride_vn_h + offs_l[:, None] * stride_vn_l + offs_dv[None, :],
                mask=v_mask)  # [BLOCK_L, BLOCK_DV]
    tl.store(V_base + (page * stride_vc_b + slot * stride_vc_s)[:, None] + offs_dv[None, :], v, mask=v_mask)


@triton.jit
def _split_tiles(S, q_lo, q_hi, split, num_splits, window_left, window_right, BLOCK_N: tl.constexpr,
                 IS_CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr):
    """This split's keys [lo, hi) and its interior tiles [ilo, ihi) (every pair in bounds and
    visible: no mask). The keys that queries at positions [q_lo, q_hi] may see, [vlo, vhi)
    with vlo on a tile boundary, are cut into ``num_splits`` runs of equally many whole tiles;
    the last runs may be short or empty (lo = hi)."""
    vlo = 0
    vhi = S
    first = 0
    last = S - BLOCK_N
    if WINDOW_LEFT:
        vlo = tl.maximum(q_lo - window_left, 0) // BLOCK_N * BLOCK_N
        first = q_hi - window_left
    if IS_CAUSAL:
        vhi = tl.minimum(vhi, q_hi + 1)
        last = tl.minimum(last, q_lo - BLOCK_N + 1)
    if WINDOW_RIGHT:
        vhi = tl.minimum(vhi, q_hi + window_right + 1)
        last = tl.minimum(last, q_lo + window_right - BLOCK_N + 1)
    vhi = tl.maximum(vhi, vlo)
    per = tl.cdiv(tl.cdiv(vhi - vlo, BLOCK_N), num_splits) * BLOCK_N
    lo = tl.minimum(vlo + split * per, vhi)
    hi = tl.minimum(lo + per, vhi)
    ilo, ihi = interior_tiles(lo, hi, first, last, BLOCK_N)
    return lo, hi, ilo, ihi


@triton.jit
def _decode_block(acc, l_i, m_i, q, q_pos, m_valid, start_n, S, K_base, V_base, BT_row, BIAS_rows, BIAS_LUT,
                  D, DV, page_size, stride_k_b, stride_k_s, stride_v_b, stride_v_s, window_left, window_right, scale,
                  softcap, bias_i0, bias_i1, bias_i2,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PAGED: tl.constexpr,
                  IS_CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, BIAS_KIND: tl.constexpr, RAW_SCORES: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, MASK: tl.constexpr):
    """One key tile of the online softmax, masked (boundary) or not (interior). Cached keys are
    already rotated: only q was rotated, once, at its positions."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    if MASK:
        n_valid = offs_n < S
    else:
        n_valid = tl.full([BLOCK_N], True, tl.int1)
    page, slot = _cache_slots(offs_n, n_valid, BT_row, page_size, PAGED)
    k = tl.load(K_base + (page * stride_k_b + slot * stride_k_s)[:, None] + offs_d[None, :],
                mask=n_valid[:, None] & (offs_d < D)[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(V_base + (page * stride_v_b + slot * stride_v_s)[:, None] + offs_dv[None, :],
                mask=n_valid[:, None] & (offs_dv < DV)[None, :], other=0.0)  # [BLOCK_N, BLOCK_DV]
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
    k_pos = offs_n.to(tl.int32)
    if MASK:
        # A non-finite value in v_j acts as a NaN score of key j (the dense kernels' rule): NaN
        # joins key j's q·k before the masks, which leave masked pairs at −inf, and its V is
        # read as 0 so that 0·NaN reaches no row that does not see it. Interior tiles need no
        # check: every row sees every key there, and normalise_rows turns a non-finite row NaN.
        v_bad = tl.sum(v.to(tl.float32) * 0.0, axis=1)  # [BLOCK_N]: NaN for such a key, else 0
        qk += v_bad[None, :]
        v = tl.where((v_bad == 0.0)[:, None], v, 0.0).to(v.dtype)
    bias = 0.0
    if BIAS_KIND != 0:
        valid = _pair_valid(m_valid, n_valid, MASK)
        bias = bias_tile(bias_operand(q_pos, k_pos, valid, BIAS_LUT, bias_i0, bias_i1, bias_i2, BIAS_KIND), valid,
                         BIAS_rows, BIAS_KIND)
    # no attn_mask here: the mask pointer is never read
    s, to_log2, _ = score_tile(qk, scale, bias, q_pos, k_pos, m_valid, n_valid, BIAS_LUT, softcap, window_left,
                               window_right, 0, HAS_SOFTCAP, IS_CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, not RAW_SCORES, MASK)
    p, alpha, l_i, m_new = softmax_update(s, to_log2, m_i, l_i, MASK or BIAS_KIND != 0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _decode_kernel(
    # outputs: the final rows (one split) or this split's partial rows (fp32), and their strides
    O, LSE,
    stride_o_b, stride_o_h, stride_o_l, stride_o_s, stride_lse_b, stride_lse_h, stride_lse_l,
    # inputs and the per-row tables
    Q, K, V, SEQLENS, BATCH_IDX, BLOCK_TABLE, ROPE_TABLE, BIAS, BIAS_LUT,
    # sizes
    HKV, G, L, D, DV, capacity, page_size,
    # strides
    stride_q_b, stride_q_h, stride_q_l, stride_k_b, stride_k_h, stride_k_s, stride_v_b, stride_v_h, stride_v_s,
    stride_bt_b, stride_bias_b, stride_bias_h,
    # scalars
    window_left, window_right, scale, softcap, rope_scale, bias_i0, bias_i1, bias_i2,
    # constexprs
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    NEW_KEYS: tl.constexpr, PAGED: tl.constexpr, HAS_BATCH_IDX: tl.constexpr, IS_CAUSAL: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, ROPE_KIND: tl.constexpr,
    ROTARY_DIM: tl.constexpr, ROPE_INTERLEAVED: tl.constexpr, BIAS_KIND: tl.constexpr, RAW_SCORES: tl.constexpr,
    DOT_PRECISION: tl.constexpr, MASK_INTERIOR: tl.constexpr,
):
    bkv = tl.program_id(0).to(tl.int64)
    b = bkv // HKV
    hkv = bkv % HKV
    split = tl.program_id(1)
    start_m = tl.program_id(2) * BLOCK_M
    S = tl.load(SEQLENS + b)
    if NEW_KEYS:
        S += L
    # A row whose keys do not fit the cache (the host never reads device lengths to check) attends
    # over the rows that are there, and its outputs and lse are made NaN below: a wrong
    # cache_seqlens shows in the result instead of passing as a shorter context.
    overflow = tl.where(S > capacity, float("nan"), 0.0)
    S = tl.minimum(S, capacity)  # rows past the capacity were never written (see _append_kernel)

    # Row i·G + g is query i of head hkv·G + g, at position S − L + i.
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_valid = offs_m < G * L
    i = tl.where(m_valid, offs_m // G, 0)  # padding rows read query 0 of head hkv·G: every load stays in bounds
    h = hkv * G + tl.where(m_valid, offs_m % G, 0)
    q_pos = (S - L + i).to(tl.int32)
    q_lo = S - L + start_m // G
    q_hi = S - L + (tl.minimum(start_m + BLOCK_M, G * L) - 1) // G
    q_rows = Q + b * stride_q_b + h * stride_q_h + i * stride_q_l
    q = load_rotated(q_rows, m_valid, offs_d, D, q_pos, q_pos, q_rows, 0, ROPE_TABLE, rope_scale, ROPE_KIND,
                     ROTARY_DIM, ROPE_INTERLEAVED)  # [BLOCK_M, BLOCK_D]
    K_base, V_base, BT_row = _cache_bases(K, V, BATCH_IDX, BLOCK_TABLE, b, hkv, stride_k_b, stride_k_h, stride_v_b,
                                          stride_v_h, stride_bt_b, PAGED, HAS_BATCH_IDX)
    BIAS_rows = (BIAS + b * stride_bias_b + h * stride_bias_h)[:, None]  # each row's head parameters

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # row maxima, log2 units
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    lo, hi, ilo, ihi = _split_tiles(S, q_lo, q_hi, split, tl.num_programs(1), window_left, window_right,
                                    BLOCK_N, IS_CAUSAL, WINDOW_LEFT, WINDOW_RIGHT)
    for start_n in range(ilo, ihi, BLOCK_N):
        acc, l_i, m_i = _decode_block(
            acc, l_i, m_i, q, q_pos, m_valid, start_n, S, K_base, V_base, BT_row, BIAS_rows, BIAS_LUT, D, DV,
            page_size, stride_k_b, stride_k_s, stride_v_b, stride_v_s, window_left, window_right, scale, softcap,
            bias_i0, bias_i1, bias_i2, BLOCK_N, BLOCK_D, BLOCK_DV, PAGED, IS_CAUSAL, WINDOW_LEFT, WINDOW_RIGHT,
            HAS_SOFTCAP, BIAS_KIND, RAW_SCORES, DOT_PRECISION, MASK_INTERIOR)
    for t in range(0, boundary_count(lo, hi, ilo, ihi, BLOCK_N)):
        acc, l_i, m_i = _decode_block(
            acc, l_i, m_i, q, q_pos, m_valid, boundary_start(t, lo, ilo, ihi, BLOCK_N), S, K_base, V_base, BT_row,
            BIAS_rows, BIAS_LUT, D, DV, page_size, stride_k_b, stride_k_s, stride_v_b, stride_v_s, window_left,
            window_right, scale, softcap, bias_i0, bias_i1, bias_i2, BLOCK_N, BLOCK_D, BLOCK_DV, PAGED, IS_CAUSAL,
            WINDOW_LEFT, WINDOW_RIGHT, HAS_SOFTCAP, BIAS_KIND, RAW_SCORES, DOT_PRECISION, True)

    # An empty split (no visible key) writes O_s = 0 and lse_s = −inf: weight 0 in the merge.
    out, lse = normalise_rows(acc, l_i, m_i)
    out += overflow
    lse += overflow
    o_rows = O + b * stride_o_b + h * stride_o_h + i * stride_o_l + split * stride_o_s
    tl.store(o_rows[:, None] + offs_dv[None, :], out.to(O.dtype.element_ty),
             mask=m_valid[:, None] & (offs_dv < DV)[None, :])
    tl.store(LSE + b * stride_lse_b + h * stride_lse_h + i * stride_lse_l + split, lse, mask=m_valid)


@triton.jit
def _combine_kernel(
    # the splits' partials (fp32, contiguous [rows, splits, DV] / [rows, splits]), the outputs
    O_PART, LSE_PART, O, LSE,
    # sizes and the output's strides over [B·H, L]
    L, DV, num_splits, stride_o_bh, stride_o_l,
    # constexprs
    SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """The exact merge of one query row's splits (docs/math.md §9.1), in split order.

    M = max lse_s (0 when every split is empty), LSE = log Σ exp(lse_s − M) + M, O =
    Σ exp(lse_s − LSE)·O_s. A row without keys gets O = 0 and lse = −inf; a NaN split (a
    non-finite value it saw) makes the row NaN."""
    row = tl.program_id(0).to(tl.int64)  # (b·H + h)·L + i
    offs_s = tl.arange(0, SPLITS)
    offs_dv = tl.arange(0, BLOCK_DV)
    lse_s = tl.load(LSE_PART + row * num_splits + offs_s, mask=offs_s < num_splits, other=float("-inf"))
    is_nan = lse_s != lse_s
    lse_s = tl.where(is_nan, float("-inf"), lse_s)
    m = tl.max(lse_s, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.exp(lse_s - m), axis=0)
    lse = tl.where(total == 0.0, float("-inf"), tl.log(tl.where(total == 0.0, 1.0, total)) + m)
    lse_w = tl.where(total == 0.0, float("inf"), lse)  # +inf: every weight 0, no NaN
    nan = tl.where(tl.max(is_nan.to(tl.int32), axis=0) > 0, float("nan"), 0.0)
    acc = tl.zeros([BLOCK_DV], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        offs = s0 + tl.arange(0, BLOCK_S)
        part = tl.load(LSE_PART + row * num_splits + offs, mask=offs < num_splits, other=float("-inf"))
        live = part != float("-inf")  # empty splits are not read (NaN ones are: their O_s is NaN)
        w = tl.exp(part - lse_w)  # [BLOCK_S]
        o = tl.load(O_PART + (row * num_splits + offs)[:, None] * DV + offs_dv[None, :],
                    mask=live[:, None] & (offs_dv < DV)[None, :], other=0.0)  # [BLOCK_S, BLOCK_DV]
        acc += tl.sum(tl.where(live[:, None], w[:, None] * o, 0.0), axis=0)
    bh = row // L
    tl.store(O + bh * stride_o_bh + (row % L) * stride_o_l + offs_dv, (acc + nan).to(O.dtype.element_ty),
             mask=offs_dv < DV)
    tl.store(LSE + row, lse + nan)


# --------------------------------------------------------------------------------------------------
# launcher: checks, the split count, allocation and grids
# --------------------------------------------------------------------------------------------------

def _fail(msg):
    raise ValueError(f"attention_with_kvcache (triton): {msg}")


def _check_inputs(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, kp, num_splits):
    """Shapes, dtypes and layouts that the kernels rely on; the public layer may have checked most."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)):
        if t is not None and t.dim() != 4:
            _fail(f"{name} has shape {tuple(t.shape)}; expected 4 dims (q [B, H, L, D], caches [Bc, Hkv, S_max, D*] "
                  f"or paged [pages, Hkv, page_size, D*], new k / v [B, Hkv, L, D*])")
        if t is not None and t.dtype != q.dtype:
            _fail(f"{name} is {t.dtype} but q is {q.dtype}; the cache, the new keys / values and q share one dtype "
                  f"(cast q, or allocate the cache in q's dtype)")
        if t is not None and t.shape[-1] > 1 and t.stride(-1) != 1:
            _fail(f"{name} has strides {t.stride()}; the last dim must be contiguous (call .contiguous())")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        _fail(f"q is {q.dtype}; the Triton kernels take float16, bfloat16 or float32 (float64: backend='reference')")
    B, H, L, D = q.shape
    if k_cache.shape[:3] != v_cache.shape[:3]:
        _fail(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in their first 3 dims")
    HKV, DV = k_cache.shape[1], v_cache.shape[-1]
    if k_cache.shape[-1] != D:
        _fail(f"k_cache has head dim {k_cache.shape[-1]} but q has {D}; they must be equal")
    if HKV == 0 or H % HKV:
        _fail(f"the cache has {HKV} KV heads but q has {H}; H must be a multiple of Hkv (grouped-query attention)")
    if max(D, DV) > _config.MAX_HEAD_DIM:
        _fail(f"head dims D={D}, Dv={DV} exceed {_config.MAX_HEAD_DIM}; use backend='reference'")
    if (k is None) != (v is None):
        _fail("k and v come together: pass both new keys and new values, or neither")
    if k is not None and (tuple(k.shape) != (B, HKV, L, D) or tuple(v.shape) != (B, HKV, L, DV)):
        _fail(f"new k {tuple(k.shape)} / v {tuple(v.shape)} must be [B, Hkv, L, D] = {(B, HKV, L, D)} / "
              f"[B, Hkv, L, Dv] = {(B, HKV, L, DV)}")
    if cache_seqlens.dtype != torch.int32 or tuple(cache_seqlens.shape) != (B,):
        _fail(f"cache_seqlens is {cache_seqlens.dtype} {tuple(cache_seqlens.shape)}; expected int32 [{B}] "
              f"(cache_seqlens.to(torch.int32))")
    if block_table is not None:
        if cache_batch_idx is not None:
            _fail("cache_batch_idx does not go with a paged cache: map batch rows to pages in block_table")
        if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != B:
            _fail(f"block_table is {block_table.dtype} {tuple(block_table.shape)}; expected int32 [B={B}, max_pages]")
        if block_table.shape[1] == 0 or k_cache.shape[0] == 0 or k_cache.shape[2] == 0:
            _fail(f"a paged cache needs at least one page per row and a page size ≥ 1: block_table "
                  f"{tuple(block_table.shape)}, cache {tuple(k_cache.shape)} [pages, Hkv, page_size, D]")
        if block_table.shape[1] * k_cache.shape[2] < L:
            _fail(f"block_table has {block_table.shape[1]} pages of {k_cache.shape[2]} rows per batch row, fewer "
                  f"than the L={L} queries; give each row enough pages for its keys")
    else:
        if cache_batch_idx is not None and (cache_batch_idx.dtype != torch.int32
                                            or tuple(cache_batch_idx.shape) != (B,)):
            _fail(f"cache_batch_idx is {cache_batch_idx.dtype} {tuple(cache_batch_idx.shape)}; expected int32 [{B}]")
        if cache_batch_idx is None and k_cache.shape[0] < B:
            _fail(f"the cache has {k_cache.shape[0]} rows but q has batch {B}; pass cache_batch_idx or a larger cache")
        if k_cache.shape[2] < L:
            _fail(f"the cache holds S_max={k_cache.shape[2]} rows, fewer than the L={L} queries")
    if kp.rope_kind not in (ROPE_NONE, ROPE_FREQ):
        _fail(f"rope_kind={kp.rope_kind}: a KV cache takes posattn.RoPE only (the cache holds keys rotated once); "
              f"apply xPos / RotaryAngles before caching, or use posattn.attention")
    if kp.urpe_m or kp.urpe_table is not None:
        _fail("URPE is not supported with a KV cache; use posattn.attention")
    if not 0 <= num_splits <= MAX_SPLITS:
        _fail(f"num_splits={num_splits}; choose 0 (heuristic), 1 (no split) or up to {MAX_SPLITS}")
    devices = {t.device for t in (q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table)
               if t is not None}
    if len(devices) > 1:
        _fail(f"the inputs are on several devices {sorted(map(str, devices))}; move them to one")


def num_splits_heuristic(programs, tiles, sms, max_splits=MAX_SPLITS):
    """Splits per (batch row, KV head) when num_splits=0, from the host's sizes only.

    FlashAttention's rule: none when the programs already fill 80% of the SMs; else the fewest
    splits whose wave efficiency (programs·splits spread over the SMs) is within 85% of the
    best, among the counts that change the tiles per split. ``tiles``: key tiles of the cache's
    capacity (the cache lengths themselves are on the device and never read)."""
    if programs >= 0.8 * sms or tiles <= 1:
        return 1
    limit = max(1, min(max_splits, sms, tiles))

    def efficiency(s):
        waves = programs * s / sms
        return waves / math.ceil(waves)

    def eligible(s):
        return s == 1 or math.ceil(tiles / s) != math.ceil(tiles / (s - 1))

    best = max(efficiency(s) for s in range(1, limit + 1) if eligible(s))
    return next(s for s in range(1, limit + 1) if eligible(s) and efficiency(s) >= 0.85 * best)


def _sm_count(device):
    capture = _CAPTURE.get()
    if capture is not None:
        return _AOT_SMS.get(capture[0][0], 132)
    if _config.triton_interpret():
        return _INTERPRET_SMS
    return _config.sm_count(device)


def kvcache_fwd(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, causal, window, softcap,
                scale, kp=None, num_splits=0):
    """Attention of q over a KV cache, appending k / v to it first (in place). Returns out
    [B, H, L, Dv] (q's dtype) and lse [B, H, L] (fp32, natural log).

    ``window``: (left, right) or None; ``softcap``: a float or None; ``kp``: the flattened
    position specs (RoPE frequencies and bias parameters, :class:`KernelPositions`);
    ``num_splits``: 0 for the heuristic, else the forced split count (1: no split, no merge).
    """
    kp = KernelPositions() if kp is None else kp
    _check_inputs(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, kp, num_splits)
    _check_device(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table)
    B, H, L, D = q.shape
    HKV, DV = k_cache.shape[1], v_cache.shape[-1]
    G = H // HKV
    paged = block_table is not None
    page_size = k_cache.shape[2] if paged else 1
    capacity = block_table.shape[1] * page_size if paged else k_cache.shape[2]
    # Absent tensors are replaced by q: their loads are compiled out by the constexpr flags.
    batch_idx = q if cache_batch_idx is None else cache_batch_idx
    table = q if block_table is None else block_table
    stride_bt = block_table.stride(0) if paged else 0
    rope = dict(ROPE_KIND=kp.rope_kind, ROTARY_DIM=kp.rotary_dim, ROPE_INTERLEAVED=bool(kp.interleaved))
    rope_table = q if kp.rope_table is None else kp.rope_table
    block_d, block_dv = _config.padded_head_dim(D), _config.padded_head_dim(DV)
    interpret = _interpreting()

    if k is not None and B * HKV * L > 0:
        block_l = min(64, triton.next_power_of_2(L))
        _launch(_append_kernel, (B * HKV, triton.cdiv(L, block_l)))(
            k_cache, v_cache, k, v, cache_seqlens, batch_idx, table, rope_table,
            HKV, L, D, DV, capacity, page_size,
            *k_cache.stride()[:3], *v_cache.stride()[:3], *k.stride()[:3], *v.stride()[:3], stride_bt,
            float(kp.rope_scale),
            BLOCK_L=block_l, BLOCK_D=block_d, BLOCK_DV=block_dv, PAGED=paged, HAS_BATCH_IDX=cache_batch_idx is not None,
            **rope)

    cfg = _config.decode_tile_config(max(D, DV), G * L, interpret)
    n_m = triton.cdiv(G * L, cfg.block_m)
    splits = num_splits or num_splits_heuristic(B * HKV * n_m, triton.cdiv(capacity, cfg.block_n),
                                                _sm_count(q.device))
    out = _alloc((B, H, L, DV), q.dtype, q.device)
    lse = _alloc((B, H, L), torch.float32, q.device)
    if B * H * L == 0:
        return out, lse
    if splits == 1:
        o_dst, lse_dst = out, lse
        o_strides, lse_strides = (*out.stride()[:3], 0), lse.stride()
    else:
        o_dst = _alloc((B, H, L, splits, DV), torch.float32, q.device)
        lse_dst = _alloc((B, H, L, splits), torch.float32, q.device)
        o_strides, lse_strides = o_dst.stride()[:4], lse_dst.stride()[:3]
    bias = q if kp.bias_tensor is None else kp.bias_tensor
    bias_lut = q if kp.bias_lut is None else kp.bias_lut
    w_left, w_right = window if window is not None else (-1, -1)
    _launch(_decode_kernel, (B * HKV, splits, n_m))(
        o_dst, lse_dst, *o_strides, *lse_strides,
        q, k_cache, v_cache, cache_seqlens, batch_idx, table, rope_table, bias, bias_lut,
        HKV, G, L, D, DV, capacity, page_size,
        *q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3], stride_bt, *_bias_strides(kp),
        max(w_left, 0), max(w_right, 0), float(scale), float(softcap or 0.0), float(kp.rope_scale), *kp.bias_ints,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, BLOCK_DV=block_dv, NEW_KEYS=k is not None,
        PAGED=paged, HAS_BATCH_IDX=cache_batch_idx is not None, IS_CAUSAL=bool(causal), WINDOW_LEFT=w_left >= 0,
        WINDOW_RIGHT=w_right >= 0, HAS_SOFTCAP=bool(softcap), BIAS_KIND=kp.bias_kind,
        RAW_SCORES=kp.bias_kind == BIAS_NONE and not softcap and scale > 0, DOT_PRECISION=_dot_precision(q.dtype),
        MASK_INTERIOR=_config.mask_all_tiles(), num_warps=cfg.num_warps, num_stages=cfg.num_stages, **rope)
    if splits > 1:
        _launch(_combine_kernel, (B * H * L,))(
            o_dst, lse_dst, out, lse, L, DV, splits, out.stride(1), out.stride(2),
            SPLITS=triton.next_power_of_2(splits), BLOCK_S=min(16, triton.next_power_of_2(splits)),
            BLOCK_DV=block_dv, num_warps=4 if block_dv >= 128 else 2)
    return out, lse
