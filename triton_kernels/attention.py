"""Fused attention in Triton: FlashAttention-2 forward, dK/dV and dQ backward kernels.

Layout: q [B, H, L, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv], any strides with a contiguous
last dim. Query head h reads KV head h // (H / Hkv) (grouped-query attention by index math).
Every mask is a function of absolute positions (q_pos, k_pos) and is applied by the shared
``score_tile``. Each program computes its loop bounds once, from its own tile's positions:
the tiles no position pair can see are never visited; the interior tiles (every pair in
bounds and visible, no attn_mask) run a block routine without masks, bounds or position
loads, the boundary tiles (causal diagonal, window edges, ragged ends, position tensors,
masks) the same routine with them (constexpr MASK). No loop has a branch around its loads,
so Triton software-pipelines them (async copies). Softmax runs in base 2.

Packed batches (``attention_varlen``, constexpr VARLEN) run the same kernels: q [Tq, H, D],
k / v [Tk, Hkv, D*] arrive as [n, H, T, D] views with batch stride 0, each program reads its
sequence and tile from a tile → sequence map built on the device, shifts its row pointers to
the sequence's first rows (cu_seqlens) and works on that sequence's lengths; lse and delta
are [H, Tq]. A new layout is a new way of computing row addresses, not a new loop.
"""
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import triton
import triton.language as tl

from posattn import _config
from posattn.positions import (BIAS_ALIBI, BIAS_MANHATTAN, BIAS_NONE, BIAS_RELATIVE, BIAS_T5, ROPE_ANGLES, ROPE_NONE,
                               ROPE_XPOS, KernelPositions)

from . import _autotune, _compat
from ._common import (LOG2E, MASK_BOOL, MASK_FLOAT, MASK_NONE, angle_grad, bias_operand, bias_tile,
                      boundary_count, boundary_start, dropout_keep, interior_tiles, keys_visible, load_positions,
                      load_rotated, normalise_rows, queries_visible, score_tile, softmax_update, table_grad_add,
                      tile_range, unrotate, urpe_index)

_NO_SPECIALIZE = ["L", "S", "q_offset", "k_offset", "window_left", "window_right", "seed", "drop_m0", "drop_n0",
                  "bias_i0", "bias_i1", "bias_i2", "urpe_m"]


# --------------------------------------------------------------------------------------------------
# loop bounds: computed once per program from its own tile's positions
# --------------------------------------------------------------------------------------------------

@triton.jit
def _visible_tiles(own_lo, own_hi, full, offset, window_left, window_right, N, BLOCK: tl.constexpr,
                   POS_TENSOR: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
                   WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, KEYS: tl.constexpr):
    """The rows [lo, hi) of the other side (keys if KEYS, else queries; positions offset +
    index) that the program's own rows, with positions in [own_lo, own_hi], can see, and the
    interior tiles [ilo, ihi) among them: whole tiles every pair of which is visible, so they
    need no mask. There are none when the own tile is ragged (``full`` false), with an
    attn_mask, or with a position tensor on the other side (then every row is a candidate)."""
    lo = 0
    hi = N
    first = 0
    last = N - BLOCK
    if not POS_TENSOR:
        if KEYS:  # keys that queries [own_lo, own_hi] see: k ≥ q − left, k ≤ q (causal), k ≤ q + right
            if WINDOW_LEFT:
                lo = tl.maximum(own_lo - window_left - offset, 0) // BLOCK * BLOCK
                first = own_hi - window_left - offset
            if IS_CAUSAL:
                hi = tl.minimum(own_hi - offset + 1, hi)
                last = tl.minimum(own_lo - offset - BLOCK + 1, last)
            if WINDOW_RIGHT:
                hi = tl.minimum(own_hi + window_right - offset + 1, hi)
                last = tl.minimum(own_lo + window_right - offset - BLOCK + 1, last)
        else:  # queries that see keys [own_lo, own_hi]: the same inequalities solved for q
            if IS_CAUSAL:
                lo = tl.maximum(own_lo - offset, lo)
                first = tl.maximum(own_hi - offset, first)
            if WINDOW_RIGHT:
                lo = tl.maximum(own_lo - window_right - offset, lo)
                first = tl.maximum(own_hi - window_right - offset, first)
            lo = lo // BLOCK * BLOCK
            if WINDOW_LEFT:
                hi = tl.minimum(own_hi + window_left - offset + 1, hi)
                last = tl.minimum(own_lo + window_left - offset - BLOCK + 1, last)
    if POS_TENSOR or MASK_KIND != 0:
        last = -BLOCK
    ilo, ihi = interior_tiles(lo, hi, first, tl.where(full, last, -BLOCK), BLOCK)
    return lo, hi, ilo, ihi


@triton.jit
def _varlen_tile(TILE_MAP, CU_Q, CU_K, slot, q_offset, Q_POS_TENSOR: tl.constexpr):
    """A packed batch's program ``slot``: its sequence (−1 for a spare program past the last
    tile), its tile index inside the sequence, the sequence's first query / key rows, its
    lengths, and its query offset (bottom-right by default: the last query sits at the last
    key's position). TILE_MAP [2, slots] is computed on the device by the launcher."""
    b = tl.load(TILE_MAP + slot)
    tile = tl.load(TILE_MAP + tl.num_programs(0) + slot)
    seq = tl.maximum(b, 0)
    q_start = tl.load(CU_Q + seq)
    k_start = tl.load(CU_K + seq)
    L = tl.load(CU_Q + seq + 1) - q_start
    S = tl.load(CU_K + seq + 1) - k_start
    if not Q_POS_TENSOR:
        q_offset += S - L
    return b, tile, q_start.to(tl.int64), k_start.to(tl.int64), L, S, q_offset


@triton.jit
def _varlen_inputs(q_start, k_start, Q, QPOS, QANG, K, V, KPOS, KANG, stride_q_l, stride_qpos_l, stride_qang_l,
                   stride_k_s, stride_v_s, stride_kpos_l, stride_kang_s):
    """The shared inputs' pointers moved to a sequence's first query / key rows (the launcher
    passes batch strides of 0 for a packed batch)."""
    return (Q + q_start * stride_q_l, QPOS + q_start * stride_qpos_l, QANG + q_start * stride_qang_l,
            K + k_start * stride_k_s, V + k_start * stride_v_s, KPOS + k_start * stride_kpos_l,
            KANG + k_start * stride_kang_s)


@triton.jit
def _tma_tile(DESC, b, head, start, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Rows [start, start + ROWS) of head ``head`` of batch ``b`` from a [B, heads, rows, cols]
    tensor's TMA descriptor (block [1, 1, ROWS, COLS]): columns past the head dim read as 0.
    Only interior tiles use it (every row in bounds), so it has no mask."""
    block = DESC.load([tl.cast(b, tl.int32), tl.cast(head, tl.int32), tl.cast(start, tl.int32), 0])
    return tl.reshape(block, [ROWS, COLS])


@triton.jit
def _key_tile(start_n, b, hkv, K_DESC, q_lo, q_hi, K_base, KANG_base, KPOS, ROPE_TABLE, S, D, stride_k_s, stride_kang_s,
              stride_kang_t, stride_kpos_b, stride_kpos_l, k_offset, window_left, window_right, rope_scale,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr,
              WINDOW_RIGHT: tl.constexpr, K_POS_TENSOR: tl.constexpr, ROPE_KIND: tl.constexpr,
              ROTARY_DIM: tl.constexpr, ROPE_INTERLEAVED: tl.constexpr, MASK: tl.constexpr, TMA: tl.constexpr):
    """Key rows, their validity and positions, and the (rotated) key tile [BLOCK_N, BLOCK_D]
    of the forward and dQ loops. Interior tiles (MASK false) have no row bound and compute
    their positions (and read unrotated keys through K's TMA descriptor when TMA is set);
    with position tensors, keys no query of [q_lo, q_hi] sees are not read."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if MASK:
        n_valid = offs_n < S
        k_pos = load_positions(KPOS, k_offset, b, offs_n, n_valid, stride_kpos_b, stride_kpos_l, K_POS_TENSOR)
        if K_POS_TENSOR:
            n_valid = n_valid & keys_visible(k_pos, q_lo, q_hi, window_left, window_right, IS_CAUSAL, WINDOW_LEFT,
                                             WINDOW_RIGHT)
    else:
        n_valid = tl.full([BLOCK_N], True, tl.int1)
        k_pos = (k_offset + offs_n).to(tl.int32)
    if TMA and not MASK:  # (the launcher sets TMA only without rotation)
        k = _tma_tile(K_DESC, b, hkv, start_n, BLOCK_N, BLOCK_D)
    else:
        # xPos decays relative to the query tile's first position: the q-side factor stays ≤ 1
        # and the k-side factor carries the distance (it decays for keys behind the queries).
        k = load_rotated(K_base + offs_n * stride_k_s, n_valid, tl.arange(0, BLOCK_D), D, k_pos, q_lo - k_pos,
                         KANG_base + offs_n * stride_kang_s, stride_kang_t, ROPE_TABLE, rope_scale, ROPE_KIND,
                         ROTARY_DIM, ROPE_INTERLEAVED)  # [BLOCK_N, BLOCK_D]
    return offs_n, n_valid, k_pos, k


@triton.jit
def _pair_valid(m_valid, n_valid, MASK: tl.constexpr):
    """Validity of a tile's (query, key) pairs: all true on an interior tile (loads unmasked)."""
    if MASK:
        valid = m_valid[:, None] & n_valid[None, :]
    else:
        valid = tl.full([m_valid.shape[0], n_valid.shape[0]], True, tl.int1)
    return valid


@triton.jit
def _fwd_block(acc, l_i, m_i, q, q_pos, q_lo, q_hi, m_valid, offs_m, start_n, bh, b, hkv, vbad_keys, K_DESC, V_DESC,
               K_base, V_base, KANG_base, MASK_base, BIAS_h, URPE_h, KPOS, ROPE_TABLE, BIAS_LUT,
               S, D, DV, stride_k_s, stride_v_s, stride_kang_s, stride_kang_t, stride_mask_s, stride_kpos_b,
               stride_kpos_l, k_offset, window_left, window_right, scale, softcap, dropout_p, dropout_scale, seed,
               drop_m0, drop_n0,
               rope_scale, bias_i0, bias_i1, bias_i2, urpe_m,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, IS_CAUSAL: tl.constexpr,
               WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, K_POS_TENSOR: tl.constexpr,
               DOT_PRECISION: tl.constexpr, ROPE_KIND: tl.constexpr, ROTARY_DIM: tl.constexpr,
               ROPE_INTERLEAVED: tl.constexpr, BIAS_KIND: tl.constexpr, HAS_URPE: tl.constexpr,
               RAW_SCORES: tl.constexpr, MASK: tl.constexpr, TMA: tl.constexpr):
    """One key tile of the forward's online softmax (base 2), masked (boundary) or not (interior)."""
    offs_n, n_valid, k_pos, k = _key_tile(start_n, b, hkv, K_DESC, q_lo, q_hi, K_base, KANG_base, KPOS, ROPE_TABLE,
                                          S, D, stride_k_s, stride_kang_s, stride_kang_t, stride_kpos_b,
                                          stride_kpos_l, k_offset, window_left, window_right, rope_scale, BLOCK_N,
                                          BLOCK_D, IS_CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, K_POS_TENSOR, ROPE_KIND,
                                          ROTARY_DIM, ROPE_INTERLEAVED, MASK, TMA)
    valid = _pair_valid(m_valid, n_valid, MASK)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
    bias = 0.0
    if BIAS_KIND != 0:
        bias = bias_tile(bias_operand(q_pos, k_pos, valid, BIAS_LUT, bias_i0, bias_i1, bias_i2, BIAS_KIND),
                         valid, BIAS_h, BIAS_KIND)
    if MASK:
        # A non-finite value in v_j acts as a NaN score of key j (see the kernel): NaN is added
        # to key j's q·k before the masks, which leave masked pairs at −inf.
        qk += tl.load(vbad_keys + offs_n, mask=n_valid, other=0.0)[None, :]
    s, to_log2, _ = score_tile(qk, scale, bias, q_pos, k_pos, m_valid, n_valid,
                               MASK_base + offs_n[None, :] * stride_mask_s, softcap, window_left, window_right,
                               MASK_KIND, HAS_SOFTCAP, IS_CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, not RAW_SCORES, MASK)
    offs_dv = tl.arange(0, BLOCK_DV)
    v_mask = n_valid[:, None] & (offs_dv[None, :] < DV)
    if MASK:  # and its V is read as 0, so that 0·NaN reaches no row that does not see it
        v_mask = v_mask & (tl.load(vbad_keys + offs_n, mask=n_valid, other=0.0) == 0.0)[:, None]
    # the normaliser never sees the URPE gate; interior tiles without a bias have no −inf score
    p, alpha, l_i, m_new = softmax_update(s, to_log2, m_i, l_i, MASK or BIAS_KIND != 0)
    if HAS_URPE:
        p = p * tl.load(URPE_h + urpe_index(q_pos, k_pos, urpe_m), mask=valid, other=0.0)
    if HAS_DROPOUT:
        keep = dropout_keep(seed, bh, offs_m + drop_m0, offs_n + drop_n0, dropout_p)
        p = tl.where(keep, p * dropout_scale, 0.0)
    if TMA and not MASK:
        v = _tma_tile(V_DESC, b, hkv, start_n, BLOCK_N, BLOCK_DV)
    else:
        v = tl.load(V_base + offs_n[:, None] * stride_v_s + offs_dv[None, :], mask=v_mask, other=0.0)  # [BLOCK_N, BLOCK_DV]
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _fwd_loops(acc, l_i, m_i, q, q_pos, q_lo, q_hi, m_valid, offs_m, start_m, bh, b, hkv, vbad_keys, K_DESC, V_DESC,
               K_base, V_base, KANG_base, MASK_base, BIAS_h, URPE_h, KPOS, ROPE_TABLE, BIAS_LUT,
               L, S, D, DV, stride_k_s, stride_v_s, stride_kang_s, stride_kang_t, stride_mask_s, stride_kpos_b,
               stride_kpos_l, k_offset, window_left, window_right, scale, softcap, dropout_p, dropout_scale, seed,
               drop_m0, drop_n0,
               rope_scale, bias_i0, bias_i1, bias_i2, urpe_m,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
               IS_CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
               MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
               K_POS_TENSOR: tl.constexpr, DOT_PRECISION: tl.constexpr, ROPE_KIND: tl.constexpr,
               ROTARY_DIM: tl.constexpr, ROPE_INTERLEAVED: tl.constexpr, BIAS_KIND: tl.constexpr,
               HAS_URPE: tl.constexpr, MASK_INTERIOR: tl.constexpr, RAW_SCORES: tl.constexpr, TMA: tl.constexpr):
    """The forward's key loops over the visible tiles of one query tile."""
    lo, hi, ilo, ihi = _visible_tiles(q_lo, q_hi, (start_m + 1) * BLOCK_M <= L, k_offset, window_left, window_right,
                                      S, BLOCK_N, K_POS_TENSOR, MASK_KIND, IS_CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, True)
    # Interior tiles first (no mask, no bound, no position load), then the boundary ones: the
    # window's left edge, the causal diagonal / window's right edge and the ragged end.
    for start_n in range(ilo, ihi, BLOCK_N):
        acc, l_i, m_i = _fwd_block(
            acc, l_i, m_i, q, q_pos, q_lo, q_hi, m_valid, offs_m, start_n, bh, b, hkv, vbad_keys, K_DESC, V_DESC,
            K_base, V_base,
            KANG_base, MASK_base, BIAS_h, URPE_h, KPOS, ROPE_TABLE, BIAS_LUT, S, D, DV, stride_k_s, stride_v_s,
            stride_kang_s, stride_kang_t, stride_mask_s, stride_kpos_b, stride_kpos_l, k_offset, window_left,
            window_right, scale, softcap, dropout_p, dropout_scale, seed,
            drop_m0, drop_n0, rope_scale, bias_i0, bias_i1, bias_i2, urpe_m,
            BLOCK_N, BLOCK_D, BLOCK_DV, IS_CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, MASK_KIND, HAS_SOFTCAP, HAS_DROPOUT,
            K_POS_TENSOR, DOT_PRECISION, ROPE_KIND, ROTARY_DIM, ROPE_INTERLEAVED, BIAS_KIND, HAS_URPE, RAW_SCORES,
            MASK_INTERIOR, TMA)
    for i in range(0, boundary_count(lo, hi, ilo, ihi, BLOCK_N)):
        acc, l_i, m_i = _fwd_block(
            acc, l_i, m_i, q, q_pos, q_lo, q_hi, m_valid, offs_m, boundary_start(i, lo, ilo, ihi, BLOCK_N), bh, b,
            hkv, vbad_keys, K_DESC, V_DESC, K_base, V_base, KANG_base, MASK_base, BIAS_h, URPE_h, KPOS, ROPE_TABLE, BIAS_LUT, S, D,
            DV, stride_k_s, stride_v_s, stride_kang_s, stride_kang_t, stride_mask_s, stride_kpos_b, stride_kpos_l,
            k_offset, window_left, window_right, scale, softcap, dropout_p, dropout_scale, seed,
            drop_m0, drop_n0, rope_scale, bias_i0,
            bias_i1, bias_i2, urpe_m, BLOCK_N, BLOCK_D, BLOCK_DV, IS_CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, MASK_KIND,
            HAS_SOFTCAP, HAS_DROPOUT, K_POS_TENSOR, DOT_PRECISION, ROPE_KIND, ROTARY_DIM, ROPE_INTERLEAVED, BIAS_KIND,
            HAS_URPE, RAW_SCORES, True, TMA)

    return acc, l_i, m_i


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_fwd_kernel(
    # outputs, the per-key flags of non-finite values in V [B, HKV, S], the packed batch's tile map
    O, LSE, V_BAD_KEYS, TILE_MAP, K_DESC, V_DESC,
    stride_o_b, stride_o_h, stride_o_l,
    # shared by every kernel (one list, built once by the launcher): inputs, sizes, strides, scalars
    Q, K, V, MASK, QPOS, KPOS, ROPE_TABLE, QANG, KANG, BIAS, BIAS_LUT, URPE_T, CU_Q, CU_K,
    H, HKV, L, S, D, DV,
    stride_q_b, stride_q_h, stride_q_l,
    stride_k_b, stride_k_h, stride_k_s,
    stride_v_b, stride_v_h, stride_v_s,
    stride_mask_b, stride_mask_h, stride_mask_l, stride_mask_s,
    stride_qpos_b, stride_qpos_l, stride_kpos_b, stride_kpos_l,
    stride_qang_b, stride_qang_h, stride_qang_l, stride_qang_t,
    stride_kang_b, stride_kang_h, stride_kang_s, stride_kang_t,
    stride_bias_b, stride_bias_h, stride_urpe_h,
    q_offset, k_offset, window_left, window_right, scale, softcap, dropout_p, dropout_scale, seed, drop_m0, drop_n0,
    rope_scale, bias_i0, bias_i1, bias_i2, urpe_m,
    # constexprs
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, Q_POS_TENSOR: tl.constexpr, K_POS_TENSOR: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ROPE_KIND: tl.constexpr, ROTARY_DIM: tl.constexpr, ROPE_INTERLEAVED: tl.constexpr,
    BLOCK_R: tl.constexpr, BIAS_KIND: tl.constexpr, HAS_URPE: tl.constexpr, MASK_INTERIOR: tl.constexpr,
    RAW_SCORES: tl.constexpr, VARLEN: tl.constexpr, TMA: tl.constexpr,
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    if VARLEN:
        # A packed batch: the program's sequence b and query tile from the tile map, its rows
        # addressed from the sequence's first rows (the launcher passes batch strides of 0);
        # per-row buffers (lse, V's flags) are [heads, total rows]. No tile spans two sequences.
        b, start_m, q_start, k_start, L_seq, S_seq, q_offset = _varlen_tile(TILE_MAP, CU_Q, CU_K, start_m, q_offset,
                                                                            Q_POS_TENSOR)
        if b < 0:
            return
        h = bh
        bh = b * H + h
        q_row = h * L + q_start
        k_row = (h // (H // HKV)) * S + k_start
        L, S = L_seq, S_seq
        Q, QPOS, QANG, K, V, KPOS, KANG = _varlen_inputs(q_start, k_start, Q, QPOS, QANG, K, V, KPOS, KANG,
                                                         stride_q_l, stride_qpos_l, stride_qang_l, stride_k_s,
                                                         stride_v_s, stride_kpos_l, stride_kang_s)
        O += q_start * stride_o_l
    else:
        q_row = bh * L
    hkv = h // (H // HKV)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_valid = offs_m < L
    q_pos = load_positions(QPOS, q_offset, b, offs_m, m_valid, stride_qpos_b, stride_qpos_l, Q_POS_TENSOR)
    q_lo, q_hi = tile_range(q_pos, m_valid, q_offset, start_m * BLOCK_M, BLOCK_M, L, Q_POS_TENSOR)
    q = load_rotated(Q + b * stride_q_b + h * stride_q_h + offs_m * stride_q_l, m_valid, offs_d, D, q_pos,
                     q_pos - q_lo, QANG + b * stride_qang_b + h * stride_qang_h + offs_m * stride_qang_l,
                     stride_qang_t, ROPE_TABLE, rope_scale, ROPE_KIND, ROTARY_DIM,
                     ROPE_INTERLEAVED)  # [BLOCK_M, BLOCK_D]

    K_base = K + b * stride_k_b + hkv * stride_k_h
    V_base = V + b * stride_v_b + hkv * stride_v_h
    KANG_base = KANG + b * stride_kang_b + hkv * stride_kang_h
    MASK_base = MASK + b * stride_mask_b + h * stride_mask_h + offs_m[:, None] * stride_mask_l
    BIAS_h = BIAS + b * stride_bias_b + h * stride_bias_h
    URPE_h = URPE_T + h * stride_urpe_h

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # row maxima, log2 units
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    # A non-finite value in v_j acts as a NaN score of key j: the rows that see key j are NaN
    # and only those (a plain p·v would also spread 0·NaN into rows for which key j is
    # masked, and ±inf where it should give NaN). Boundary tiles add V_BAD_KEYS (NaN for such
    # a key, else 0; one pass over V before the launch) to the scores before the masks and
    # read those keys' V as 0. Interior tiles need no check: every row sees every key there, so a non-finite
    # v_j reaches each row's accumulator, and a row whose accumulator is not finite is NaN.

    acc, l_i, m_i = _fwd_loops(
        acc, l_i, m_i, q, q_pos, q_lo, q_hi, m_valid, offs_m, start_m, bh, b, hkv,
        V_BAD_KEYS + (k_row if VARLEN else (b * HKV + hkv) * S), K_DESC, V_DESC,
        K_base, V_base, KANG_base, MASK_base, BIAS_h, URPE_h, KPOS, ROPE_TABLE, BIAS_LUT, L, S, D, DV, stride_k_s,
        stride_v_s, stride_kang_s, stride_kang_t, stride_mask_s, stride_kpos_b, stride_kpos_l, k_offset,
        window_left, window_right, scale, softcap, dropout_p, dropout_scale, seed,
        drop_m0, drop_n0, rope_scale, bias_i0, bias_i1,
        bias_i2, urpe_m, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, IS_CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, MASK_KIND,
        HAS_SOFTCAP, HAS_DROPOUT, K_POS_TENSOR, DOT_PRECISION, ROPE_KIND, ROTARY_DIM, ROPE_INTERLEAVED, BIAS_KIND,
        HAS_URPE, MASK_INTERIOR, RAW_SCORES, TMA)

    # Fully masked rows: output 0 and lse = −inf; NaN rows stay NaN. lse is natural-log at the API.
    out, lse = normalise_rows(acc, l_i, m_i)
    tl.store(O + b * stride_o_b + h * stride_o_h + offs_m[:, None] * stride_o_l + offs_dv[None, :],
             out.to(O.dtype.element_ty), mask=m_valid[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + q_row + offs_m, lse, mask=m_valid)


@triton.jit(do_not_specialize=["L"])
def _attn_bwd_preprocess_kernel(
    O, DO, DLSE, DELTA,
    H, L, DV,
    stride_o_b, stride_o_h, stride_o_l,
    stride_do_b, stride_do_h, stride_do_l,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    """delta = rowsum(dO ⊙ O) − dlse: the softmax-backward row term (dlse: gradient into lse).

    With a URPE gate O = (P ⊙ C)·V, so rowsum(dO ⊙ O) = Σ_j dA_ij·A_ij still holds.
    """
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    valid = (offs_m[:, None] < L) & (offs_dv[None, :] < DV)
    o = tl.load(O + b * stride_o_b + h * stride_o_h + offs_m[:, None] * stride_o_l + offs_dv[None, :],
                mask=valid, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_do_b + h * stride_do_h + offs_m[:, None] * stride_do_l + offs_dv[None, :],
                 mask=valid, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, axis=1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + bh * L + offs_m, mask=offs_m < L, other=0.0)
    tl.store(DELTA + bh * L + offs_m, delta, mask=offs_m < L)


@triton.jit
def _lse2(lse):
    """lse in log2 units for exp2; a fully masked row (lse = −inf, every s = −inf) gets +inf so
    that exp2(s − lse2) = 0 there."""
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def _recompute_p(qk, scale, bias, q_pos, k_pos, m_valid, n_valid, mask_ptrs, softcap, window_left, window_right,
                 lse2, MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IS_CAUSAL: tl.constexpr,
                 WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SCALED: tl.constexpr, MASK: tl.constexpr):
    """P = exp(S − lse) for one tile of q·kᵀ (as exp2 of log2 units), and ∂(capped score)/∂(scaled
    score) for the softcap chain rule."""
    s, to_log2, dcap = score_tile(qk, scale, bias, q_pos, k_pos, m_valid, n_valid, mask_ptrs, softcap, window_left,
                                  window_right, MASK_KIND, HAS_SOFTCAP, IS_CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, SCALED,
                                  MASK)
    p = tl.exp2(s * to_log2 - lse2[:, None])  # [BLOCK_M, BLOCK_N]
    return p, dcap


@triton.jit
def _dscore(p, dp, delta, gate, keep, dropout_scale, HAS_DROPOUT: tl.constexpr, HAS_URPE: tl.constexpr):
    """dS w.r.t. the final score (what the bias and the float mask receive; dQ / dK take it
    times the softcap factor) from dP = dO·Vᵀ, and dA, the gradient w.r.t. the gated
    probabilities before dropout (URPE: dS = P ⊙ (dA ⊙ C − Δ), dC = dA ⊙ P)."""
    if HAS_DROPOUT:
        dp = tl.where(keep, dp * dropout_scale, 0.0)
    if HAS_URPE:
        ds = p * (dp * gate - delta[:, None])
    else:
        ds = p * (dp - delta[:, None])
    return ds, dp


@triton.jit
def _dkdv_block(dk, dv, k, v, k_pos, k_lo, k_hi, n_valid, offs_n, start_m, bh, b,
                Q_base, QANG_base, DO_base, LSE_bh, DELTA_bh, MASK_base, BIAS_h, URPE_h, QPOS, ROPE_TABLE, BIAS_LUT,
                L, D, DV, stride_q_l, stride_qang_l, stride_qang_t, stride_do_l, stride_mask_l, stride_qpos_b,
                stride_qpos_l, q_offset, window_left, window_right, scale, softcap, dropout_p, dropout_scale, seed,
                drop_m0, drop_n0,
                rope_scale, bias_i0, bias_i1, bias_i2, urpe_m,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, IS_CAUSAL: tl.constexpr,
                WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, Q_POS_TENSOR: tl.constexpr,
                DOT_PRECISION: tl.constexpr, ROPE_KIND: tl.constexpr, ROTARY_DIM: tl.constexpr,
                ROPE_INTERLEAVED: tl.constexpr, BIAS_KIND: tl.constexpr, HAS_URPE: tl.constexpr,
                RAW_SCORES: tl.constexpr, MASK: tl.constexpr):
    """One query tile's contribution to a key tile's dK, dV, masked (boundary) or not (interior)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    if MASK:
        m_valid = offs_m < L
        q_pos = load_positions(QPOS, q_offset, b, offs_m, m_valid, stride_qpos_b, stride_qpos_l, Q_POS_TENSOR)
        if Q_POS_TENSOR:  # queries that see no key of this tile are not read
            m_valid = m_valid & queries_visible(q_pos, k_lo, k_hi, window_left, window_right, IS_CAUSAL,
                                                WINDOW_LEFT, WINDOW_RIGHT)
    else:
        m_valid = tl.full([BLOCK_M], True, tl.int1)
        q_pos = (q_offset + offs_m).to(tl.int32)
    valid = _pair_valid(m_valid, n_valid, MASK)
    # xPos: here the centre is this key tile's first position (k-side factor ≤ 1).
    q = load_rotated(Q_base + offs_m * stride_q_l, m_valid, offs_d, D, q_pos, q_pos - k_lo,
                     QANG_base + offs_m * stride_qang_l, stride_qang_t, ROPE_TABLE, rope_scale, ROPE_KIND,
                     ROTARY_DIM, ROPE_INTERLEAVED)  # [BLOCK_M, BLOCK_D]
    do = tl.load(DO_base + offs_m[:, None] * stride_do_l + offs_dv[None, :],
                 mask=m_valid[:, None] & (offs_dv[None, :] < DV), other=0.0)  # [BLOCK_M, BLOCK_DV]
    lse2 = _lse2(tl.load(LSE_bh + offs_m, mask=m_valid, other=float("-inf")))
    delta = tl.load(DELTA_bh + offs_m, mask=m_valid, other=0.0)
    bias = 0.0
    if BIAS_KIND != 0:
        bias = bias_tile(bias_operand(q_pos, k_pos, valid, BIAS_LUT, bias_i0, bias_i1, bias_i2, BIAS_KIND), valid,
                         BIAS_h, BIAS_KIND)
    # Keys are the rows of every product here (the tiles transposed: Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ), so
    # P and dS feed dV += Pᵀ·dO and dK += dSᵀ·Q from registers with no transpose through shared
    # memory; the score pipeline still sees a [BLOCK_M, BLOCK_N] tile (a free register view).
    qk = tl.trans(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION))  # [BLOCK_M, BLOCK_N]
    p, dcap = _recompute_p(qk, scale, bias, q_pos, k_pos, m_valid, n_valid,
                           MASK_base + offs_m[:, None] * stride_mask_l, softcap, window_left, window_right, lse2,
                           MASK_KIND, HAS_SOFTCAP, IS_CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, not RAW_SCORES, MASK)
    gate = 1.0
    if HAS_URPE:
        gate = tl.load(URPE_h + urpe_index(q_pos, k_pos, urpe_m), mask=valid, other=0.0)
    a = p * gate  # [BLOCK_M, BLOCK_N], the probabilities that multiply V
    keep = True
    if HAS_DROPOUT:
        keep = dropout_keep(seed, bh, offs_m + drop_m0, offs_n + drop_n0, dropout_p)
        a = tl.where(keep, a * dropout_scale, 0.0)
    dv += tl.dot(tl.trans(a.to(do.dtype)), do, input_precision=DOT_PRECISION)
    dp = tl.trans(tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION))  # [BLOCK_M, BLOCK_N]
    ds, _ = _dscore(p, dp, delta, gate, keep, dropout_scale, HAS_DROPOUT, HAS_URPE)
    if Q_POS_TENSOR and MASK:
        # Queries that see no key of this tile are not read, but this tile's own keys are: a
        # query tile none of whose rows sees them must add exactly 0, even where they are NaN.
        ds = tl.where(valid, ds, 0.0)
    dk += tl.dot(tl.trans((ds * dcap).to(q.dtype)), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_bwd_dkdv_kernel(
    # backward inputs and outputs, the packed batch's tile map (over keys)
    DO, LSE, DELTA, DK, DV_OUT, DKANG, TILE_MAP,
    stride_do_b, stride_do_h, stride_do_l,
    stride_dk_b, stride_dk_h, stride_dk_s,
    stride_dv_b, stride_dv_h, stride_dv_s,
    # shared by every kernel (one list, built once by the launcher): inputs, sizes, strides, scalars
    Q, K, V, MASK, QPOS, KPOS, ROPE_TABLE, QANG, KANG, BIAS, BIAS_LUT, URPE_T, CU_Q, CU_K,
    H, HKV, L, S, D, DV,
    stride_q_b, stride_q_h, stride_q_l,
    stride_k_b, stride_k_h, stride_k_s,
    stride_v_b, stride_v_h, stride_v_s,
    stride_mask_b, stride_mask_h, stride_mask_l, stride_mask_s,
    stride_qpos_b, stride_qpos_l, stride_kpos_b, stride_kpos_l,
    stride_qang_b, stride_qang_h, stride_qang_l, stride_qang_t,
    stride_kang_b, stride_kang_h, stride_kang_s, stride_kang_t,
    stride_bias_b, stride_bias_h, stride_urpe_h,
    q_offset, k_offset, window_left, window_right, scale, softcap, dropout_p, dropout_scale, seed, drop_m0, drop_n0,
    rope_scale, bias_i0, bias_i1, bias_i2, urpe_m,
    # constexprs
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, Q_POS_TENSOR: tl.constexpr, K_POS_TENSOR: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ROPE_KIND: tl.constexpr, ROTARY_DIM: tl.constexpr, ROPE_INTERLEAVED: tl.constexpr,
    BLOCK_R: tl.constexpr, BIAS_KIND: tl.constexpr, HAS_URPE: tl.constexpr, MASK_INTERIOR: tl.constexpr,
    RAW_SCORES: tl.constexpr, VARLEN: tl.constexpr,
    ANGLE_GRAD: tl.constexpr,
):
    """One key tile of one KV head: dK, dV summed over every query head of its group (no atomics)."""
    start_n = tl.program_id(0)
    bhkv = tl.program_id(1).to(tl.int64)
    b = bhkv // HKV
    hkv = bhkv % HKV
    L_rows = L  # rows of the lse / delta buffers: [B·H, L], or [H, total queries] for a packed batch
    if VARLEN:  # as in the forward kernel, over key tiles
        b, start_n, q_start, k_start, L_seq, S_seq, q_offset = _varlen_tile(TILE_MAP, CU_Q, CU_K, start_n, q_offset,
                                                                            Q_POS_TENSOR)
        if b < 0:
            return
        hkv = bhkv
        k_row = hkv * S + k_start
        L, S = L_seq, S_seq
        Q, QPOS, QANG, K, V, KPOS, KANG = _varlen_inputs(q_start, k_start, Q, QPOS, QANG, K, V, KPOS, KANG,
                                                         stride_q_l, stride_qpos_l, stride_qang_l, stride_k_s,
                                                         stride_v_s, stride_kpos_l, stride_kang_s)
        DO += q_start * stride_do_l
        LSE += q_start
        DELTA += q_start
        DK += k_start * stride_dk_s
        DV_OUT += k_start * stride_dv_s
    else:
        k_row = bhkv * S

    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_valid = offs_n < S
    k_pos = load_positions(KPOS, k_offset, b, offs_n, n_valid, stride_kpos_b, stride_kpos_l, K_POS_TENSOR)
    k_lo, k_hi = tile_range(k_pos, n_valid, k_offset, start_n * BLOCK_N, BLOCK_N, S, K_POS_TENSOR)
    K_rows = K + b * stride_k_b + hkv * stride_k_h + offs_n * stride_k_s
    KANG_rows = KANG + b * stride_kang_b + hkv * stride_kang_h + offs_n * stride_kang_s
    # xPos: here the centre is this key tile's first position (k-side factor ≤ 1).
    k = load_rotated(K_rows, n_valid, offs_d, D, k_pos, k_lo - k_pos, KANG_rows, stride_kang_t, ROPE_TABLE,
                     rope_scale, ROPE_KIND, ROTARY_DIM, ROPE_INTERLEAVED)  # [BLOCK_N, BLOCK_D]
    v = tl.load(V + b * stride_v_b + hkv * stride_v_h + offs_n[:, None] * stride_v_s + offs_dv[None, :],
                mask=n_valid[:, None] & (offs_dv[None, :] < DV), other=0.0)  # [BLOCK_N, BLOCK_DV]

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    # The same query tiles for every head of the group (positions do not depend on the head).
    lo, hi, ilo, ihi = _visible_tiles(k_lo, k_hi, (start_n + 1) * BLOCK_N <= S, q_offset, window_left, window_right,
                                      L, BLOCK_M, Q_POS_TENSOR, MASK_KIND, IS_CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, False)
    GROUP = H // HKV
    for g in range(0, GROUP):
        h = hkv * GROUP + g
        bh = b * H + h
        if VARLEN:
            q_row = h * L_rows  # LSE, DELTA start at the sequence's first row
        else:
            q_row = bh * L_rows
        Q_base = Q + b * stride_q_b + h * stride_q_h
        QANG_base = QANG + b * stride_qang_b + h * stride_qang_h
        DO_base = DO + b * stride_do_b + h * stride_do_h
        MASK_base = MASK + b * stride_mask_b + h * stride_mask_h + offs_n[None, :] * stride_mask_s
        BIAS_h = BIAS + b * stride_bias_b + h * stride_bias_h
        URPE_h = URPE_T + h * stride_urpe_h
        for start_m in range(ilo, ihi, BLOCK_M):
            dk, dv = _dkdv_block(
                dk, dv, k, v, k_pos, k_lo, k_hi, n_valid, offs_n, start_m, bh, b, Q_base, QANG_base, DO_base,
                LSE + q_row, DELTA + q_row, MASK_base, BIAS_h, URPE_h, QPOS, ROPE_TABLE, BIAS_LUT, L, D, DV,
                stride_q_l, stride_qang_l, stride_qang_t, stride_do_l, stride_mask_l, stride_qpos_b, stride_qpos_l,
                q_offset, window_left, window_right, scale, softcap, dropout_p, dropout_scale, seed,
                drop_m0, drop_n0, rope_scale,
                bias_i0, bias_i1, bias_i2, urpe_m, BLOCK_M, BLOCK_D, BLOCK_DV, IS_CAUSAL, WINDOW_LEFT, WINDOW_RIGHT,
                MASK_KIND, HAS_SOFTCAP, HAS_DROPOUT, Q_POS_TENSOR, DOT_PRECISION, ROPE_KIND, ROTARY_DIM,
                ROPE_INTERLEAVED, BIAS_KIND, HAS_URPE, RAW_SCORES, MASK_INTERIOR)
        for i in range(0, boundary_count(lo, hi, ilo, ihi, BLOCK_M)):
            dk, dv = _dkdv_block(
                dk, dv, k, v, k_pos, k_lo, k_hi, n_valid, offs_n, boundary_start(i, lo, ilo, ihi, BLOCK_M), bh, b,
                Q_base, QANG_base, DO_base, LSE + q_row, DELTA + q_row, MASK_base, BIAS_h, URPE_h, QPOS,
                ROPE_TABLE, BIAS_LUT, L, D, DV, stride_q_l, stride_qang_l, stride_qang_t, stride_do_l, stride_mask_l,
                stride_qpos_b, stride_qpos_l, q_offset, window_left, window_right, scale, softcap, dropout_p,
                dropout_scale, seed,
                drop_m0, drop_n0, rope_scale, bias_i0, bias_i1, bias_i2, urpe_m, BLOCK_M, BLOCK_D, BLOCK_DV,
                IS_CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, MASK_KIND, HAS_SOFTCAP, HAS_DROPOUT, Q_POS_TENSOR,
                DOT_PRECISION, ROPE_KIND, ROTARY_DIM, ROPE_INTERLEAVED, BIAS_KIND, HAS_URPE, RAW_SCORES, True)

    # dK so far is w.r.t. the rotated keys; rotate it back by −angle (RoPE's Rᵀ).
    dk = unrotate(dk * scale, k_pos, k_lo - k_pos, n_valid, KANG_rows, stride_kang_t, ROPE_TABLE, rope_scale, offs_d,
                  ROPE_KIND, ROTARY_DIM, ROPE_INTERLEAVED)
    tl.store(DK + b * stride_dk_b + hkv * stride_dk_h + offs_n[:, None] * stride_dk_s + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=n_valid[:, None] & (offs_d[None, :] < D))
    tl.store(DV_OUT + b * stride_dv_b + hkv * stride_dv_h + offs_n[:, None] * stride_dv_s + offs_dv[None, :],
             dv.to(DV_OUT.dtype.element_ty), mask=n_valid[:, None] & (offs_dv[None, :] < DV))
    if ANGLE_GRAD:
        dang = angle_grad(dk, K_rows, n_valid, offs_d, D, ROTARY_DIM, ROPE_INTERLEAVED, BLOCK_R)
        offs_r = tl.arange(0, BLOCK_R)
        tl.store(DKANG + (k_row + offs_n[:, None]) * (ROTARY_DIM // 2) + offs_r[None, :], dang,
                 mask=n_valid[:, None] & (offs_r[None, :] < ROTARY_DIM // 2))


@triton.jit
def _dq_block(dq, dparam, q, do, lse2, delta, q_pos, q_lo, q_hi, m_valid, offs_m, start_n, bh, b, hkv, K_DESC,
              V_DESC, K_base, V_base, KANG_base, MASK_base, DMASK_base, BIAS_h, URPE_h, DBIAS_row, DURPE_row, KPOS,
              ROPE_TABLE, BIAS_LUT, S, D, DV, stride_k_s, stride_v_s, stride_kang_s, stride_kang_t, stride_mask_s,
              stride_dmask_s, stride_kpos_b, stride_kpos_l, k_offset, window_left, window_right, scale, softcap,
              dropout_p, dropout_scale, seed, drop_m0, drop_n0, rope_scale, bias_i0, bias_i1, bias_i2, urpe_m,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, IS_CAUSAL: tl.constexpr,
              WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, K_POS_TENSOR: tl.constexpr,
              DOT_PRECISION: tl.constexpr, ROPE_KIND: tl.constexpr, ROTARY_DIM: tl.constexpr,
              ROPE_INTERLEAVED: tl.constexpr, BIAS_KIND: tl.constexpr, HAS_URPE: tl.constexpr,
              MASK_GRAD: tl.constexpr, BIAS_GRAD: tl.constexpr, URPE_GRAD: tl.constexpr, RAW_SCORES: tl.constexpr,
              MASK: tl.constexpr, TMA: tl.constexpr):
    """One key tile's contribution to a query tile's dQ (and to the mask / position-parameter
    gradients), masked (boundary) or not (interior)."""
    offs_n, n_valid, k_pos, k = _key_tile(start_n, b, hkv, K_DESC, q_lo, q_hi, K_base, KANG_base, KPOS, ROPE_TABLE,
                                          S, D, stride_k_s, stride_kang_s, stride_kang_t, stride_kpos_b,
                                          stride_kpos_l, k_offset, window_left, window_right, rope_scale, BLOCK_N,
                                          BLOCK_D, IS_CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, K_POS_TENSOR, ROPE_KIND,
                                          ROTARY_DIM, ROPE_INTERLEAVED, MASK, TMA)
    valid = _pair_valid(m_valid, n_valid, MASK)
    offs_dv = tl.arange(0, BLOCK_DV)
    if TMA and not MASK:
        v = _tma_tile(V_DESC, b, hkv, start_n, BLOCK_N, BLOCK_DV)
    else:
        v = tl.load(V_base + offs_n[:, None] * stride_v_s + offs_dv[None, :],
                    mask=n_valid[:, None] & (offs_dv[None, :] < DV), other=0.0)  # [BLOCK_N, BLOCK_DV]
    bias = 0.0
    operand = 0
    if BIAS_KIND != 0:
        operand = bias_operand(q_pos, k_pos, valid, BIAS_LUT, bias_i0, bias_i1, bias_i2, BIAS_KIND)
        bias = bias_tile(operand, valid, BIAS_h, BIAS_KIND)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
    p, dcap = _recompute_p(qk, scale, bias, q_pos, k_pos, m_valid, n_valid,
                           MASK_base + offs_n[None, :] * stride_mask_s, softcap, window_left, window_right, lse2,
                           MASK_KIND, HAS_SOFTCAP, IS_CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, not RAW_SCORES, MASK)
    gate = 1.0
    uidx = 0
    if HAS_URPE:
        uidx = urpe_index(q_pos, k_pos, urpe_m)
        gate = tl.load(URPE_h + uidx, mask=valid, other=0.0)
    keep = True
    if HAS_DROPOUT:
        keep = dropout_keep(seed, bh, offs_m + drop_m0, offs_n + drop_n0, dropout_p)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
    ds, da = _dscore(p, dp, delta, gate, keep, dropout_scale, HAS_DROPOUT, HAS_URPE)
    dq += tl.dot((ds * dcap).to(k.dtype), k, input_precision=DOT_PRECISION)
    if MASK_GRAD:
        # The mask may broadcast over batch, heads, rows or keys (stride 0), so several
        # programs (or lanes) add into one element: fp32 atomics. A mask of full shape
        # gets exactly one add per element into a zeroed buffer, hence deterministic.
        tl.atomic_add(DMASK_base + offs_n[None, :] * stride_dmask_s, ds, mask=valid)
    live = valid & (p > 0.0)  # dS and dA·P vanish elsewhere
    if BIAS_GRAD:
        if BIAS_KIND == 1 or BIAS_KIND == 4:
            dparam += tl.sum(tl.where(live, ds * operand, 0.0), axis=1)
        else:
            table_grad_add(ds, operand, live, DBIAS_row)
    if URPE_GRAD:
        table_grad_add(da * p, uidx, live, DURPE_row)
    return dq, dparam


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_bwd_dq_kernel(
    # backward inputs and outputs, the packed batch's tile map
    DO, LSE, DELTA, DQ, DMASK, DQANG, DBIAS, DURPE, TILE_MAP, K_DESC, V_DESC,
    stride_do_b, stride_do_h, stride_do_l,
    stride_dq_b, stride_dq_h, stride_dq_l,
    stride_dmask_b, stride_dmask_h, stride_dmask_l, stride_dmask_s,
    stride_dbias_b, stride_dbias_h, stride_dbias_m, stride_durpe_b, stride_durpe_h, stride_durpe_m,
    # shared by every kernel (one list, built once by the launcher): inputs, sizes, strides, scalars
    Q, K, V, MASK, QPOS, KPOS, ROPE_TABLE, QANG, KANG, BIAS, BIAS_LUT, URPE_T, CU_Q, CU_K,
    H, HKV, L, S, D, DV,
    stride_q_b, stride_q_h, stride_q_l,
    stride_k_b, stride_k_h, stride_k_s,
    stride_v_b, stride_v_h, stride_v_s,
    stride_mask_b, stride_mask_h, stride_mask_l, stride_mask_s,
    stride_qpos_b, stride_qpos_l, stride_kpos_b, stride_kpos_l,
    stride_qang_b, stride_qang_h, stride_qang_l, stride_qang_t,
    stride_kang_b, stride_kang_h, stride_kang_s, stride_kang_t,
    stride_bias_b, stride_bias_h, stride_urpe_h,
    q_offset, k_offset, window_left, window_right, scale, softcap, dropout_p, dropout_scale, seed, drop_m0, drop_n0,
    rope_scale, bias_i0, bias_i1, bias_i2, urpe_m,
    # constexprs
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, Q_POS_TENSOR: tl.constexpr, K_POS_TENSOR: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ROPE_KIND: tl.constexpr, ROTARY_DIM: tl.constexpr, ROPE_INTERLEAVED: tl.constexpr,
    BLOCK_R: tl.constexpr, BIAS_KIND: tl.constexpr, HAS_URPE: tl.constexpr, MASK_INTERIOR: tl.constexpr,
    RAW_SCORES: tl.constexpr, VARLEN: tl.constexpr,
    ANGLE_GRAD: tl.constexpr, MASK_GRAD: tl.constexpr, BIAS_GRAD: tl.constexpr, URPE_GRAD: tl.constexpr,
    TMA: tl.constexpr,
):
    """One query tile of one query head: dQ, the float mask's gradient, and the gradients of
    the position parameters (angles, slopes / log-decays, bias and URPE tables)."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    slot = start_m  # the program's row of per-program partial sums
    if VARLEN:  # as in the forward kernel
        b, start_m, q_start, k_start, L_seq, S_seq, q_offset = _varlen_tile(TILE_MAP, CU_Q, CU_K, start_m, q_offset,
                                                                            Q_POS_TENSOR)
        if b < 0:
            return
        h = bh
        bh = b * H + h
        q_row = h * L + q_start
        L, S = L_seq, S_seq
        Q, QPOS, QANG, K, V, KPOS, KANG = _varlen_inputs(q_start, k_start, Q, QPOS, QANG, K, V, KPOS, KANG,
                                                         stride_q_l, stride_qpos_l, stride_qang_l, stride_k_s,
                                                         stride_v_s, stride_kpos_l, stride_kang_s)
        DO += q_start * stride_do_l
        DQ += q_start * stride_dq_l
    else:
        q_row = bh * L
    hkv = h // (H // HKV)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_valid = offs_m < L
    q_pos = load_positions(QPOS, q_offset, b, offs_m, m_valid, stride_qpos_b, stride_qpos_l, Q_POS_TENSOR)
    q_lo, q_hi = tile_range(q_pos, m_valid, q_offset, start_m * BLOCK_M, BLOCK_M, L, Q_POS_TENSOR)
    Q_rows = Q + b * stride_q_b + h * stride_q_h + offs_m * stride_q_l
    QANG_rows = QANG + b * stride_qang_b + h * stride_qang_h + offs_m * stride_qang_l
    q = load_rotated(Q_rows, m_valid, offs_d, D, q_pos, q_pos - q_lo, QANG_rows, stride_qang_t, ROPE_TABLE,
                     rope_scale, ROPE_KIND, ROTARY_DIM, ROPE_INTERLEAVED)  # [BLOCK_M, BLOCK_D]
    do = tl.load(DO + b * stride_do_b + h * stride_do_h + offs_m[:, None] * stride_do_l + offs_dv[None, :],
                 mask=m_valid[:, None] & (offs_dv[None, :] < DV), other=0.0)  # [BLOCK_M, BLOCK_DV]
    lse2 = _lse2(tl.load(LSE + q_row + offs_m, mask=m_valid, other=float("-inf")))
    delta = tl.load(DELTA + q_row + offs_m, mask=m_valid, other=0.0)

    K_base = K + b * stride_k_b + hkv * stride_k_h
    V_base = V + b * stride_v_b + hkv * stride_v_h
    KANG_base = KANG + b * stride_kang_b + hkv * stride_kang_h
    MASK_base = MASK + b * stride_mask_b + h * stride_mask_h + offs_m[:, None] * stride_mask_l
    DMASK_base = DMASK + b * stride_dmask_b + h * stride_dmask_h + offs_m[:, None] * stride_dmask_l
    BIAS_h = BIAS + b * stride_bias_b + h * stride_bias_h
    URPE_h = URPE_T + h * stride_urpe_h
    # Table gradients go to this program's own row (deterministic mode) or straight into
    # the [H, T] gradient (strides choose); ALiBi / Manhattan store one partial per program.
    DBIAS_row = DBIAS + b * stride_dbias_b + h * stride_dbias_h + slot * stride_dbias_m
    DURPE_row = DURPE + b * stride_durpe_b + h * stride_durpe_h + slot * stride_durpe_m

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dparam = tl.zeros([BLOCK_M], tl.float32)
    lo, hi, ilo, ihi = _visible_tiles(q_lo, q_hi, (start_m + 1) * BLOCK_M <= L, k_offset, window_left, window_right,
                                      S, BLOCK_N, K_POS_TENSOR, MASK_KIND, IS_CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, True)
    for start_n in range(ilo, ihi, BLOCK_N):
        dq, dparam = _dq_block(
            dq, dparam, q, do, lse2, delta, q_pos, q_lo, q_hi, m_valid, offs_m, start_n, bh, b, hkv, K_DESC, V_DESC,
            K_base, V_base,
            KANG_base, MASK_base, DMASK_base, BIAS_h, URPE_h, DBIAS_row, DURPE_row, KPOS, ROPE_TABLE, BIAS_LUT, S, D,
            DV, stride_k_s, stride_v_s, stride_kang_s, stride_kang_t, stride_mask_s, stride_dmask_s, stride_kpos_b,
            stride_kpos_l, k_offset, window_left, window_right, scale, softcap, dropout_p, dropout_scale, seed,
            drop_m0, drop_n0,
            rope_scale, bias_i0, bias_i1, bias_i2, urpe_m, BLOCK_N, BLOCK_D, BLOCK_DV, IS_CAUSAL, WINDOW_LEFT,
            WINDOW_RIGHT, MASK_KIND, HAS_SOFTCAP, HAS_DROPOUT, K_POS_TENSOR, DOT_PRECISION, ROPE_KIND, ROTARY_DIM,
            ROPE_INTERLEAVED, BIAS_KIND, HAS_URPE, MASK_GRAD, BIAS_GRAD, URPE_GRAD, RAW_SCORES, MASK_INTERIOR, TMA)
    for i in range(0, boundary_count(lo, hi, ilo, ihi, BLOCK_N)):
        dq, dparam = _dq_block(
            dq, dparam, q, do, lse2, delta, q_pos, q_lo, q_hi, m_valid, offs_m,
            boundary_start(i, lo, ilo, ihi, BLOCK_N), bh, b, hkv, K_DESC, V_DESC, K_base, V_base, KANG_base,
            MASK_base, DMASK_base,
            BIAS_h, URPE_h, DBIAS_row, DURPE_row, KPOS, ROPE_TABLE, BIAS_LUT, S, D, DV, stride_k_s, stride_v_s,
            stride_kang_s, stride_kang_t, stride_mask_s, stride_dmask_s, stride_kpos_b, stride_kpos_l, k_offset,
            window_left, window_right, scale, softcap, dropout_p, dropout_scale, seed,
            drop_m0, drop_n0, rope_scale, bias_i0, bias_i1,
            bias_i2, urpe_m, BLOCK_N, BLOCK_D, BLOCK_DV, IS_CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, MASK_KIND, HAS_SOFTCAP,
            HAS_DROPOUT, K_POS_TENSOR, DOT_PRECISION, ROPE_KIND, ROTARY_DIM, ROPE_INTERLEAVED, BIAS_KIND, HAS_URPE,
            MASK_GRAD, BIAS_GRAD, URPE_GRAD, RAW_SCORES, True, TMA)

    # dQ so far is w.r.t. the rotated queries; rotate it back by −angle (RoPE's Rᵀ).
    dq = unrotate(dq * scale, q_pos, q_pos - q_lo, m_valid, QANG_rows, stride_qang_t, ROPE_TABLE, rope_scale, offs_d,
                  ROPE_KIND, ROTARY_DIM, ROPE_INTERLEAVED)
    tl.store(DQ + b * stride_dq_b + h * stride_dq_h + offs_m[:, None] * stride_dq_l + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=m_valid[:, None] & (offs_d[None, :] < D))
    if ANGLE_GRAD:
        dang = angle_grad(dq, Q_rows, m_valid, offs_d, D, ROTARY_DIM, ROPE_INTERLEAVED, BLOCK_R)
        offs_r = tl.arange(0, BLOCK_R)
        tl.store(DQANG + (q_row + offs_m[:, None]) * (ROTARY_DIM // 2) + offs_r[None, :], dang,
                 mask=m_valid[:, None] & (offs_r[None, :] < ROTARY_DIM // 2))
    if BIAS_GRAD:
        if BIAS_KIND == 1 or BIAS_KIND == 4:
            tl.store(DBIAS_row, tl.sum(dparam, axis=0))


@triton.jit
def _dropout_mask_kernel(KEEP, H, L, S, dropout_p, seed, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0)
    start_n = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = dropout_keep(seed, bh, offs_m, offs_n, dropout_p)
    tl.store(KEEP + bh * L * S + offs_m[:, None] * S + offs_n[None, :], keep,
             mask=(offs_m[:, None] < L) & (offs_n[None, :] < S))


# --------------------------------------------------------------------------------------------------
# launchers: the only code that checks devices, allocates and builds grids
# --------------------------------------------------------------------------------------------------

# While set (by ``capture_launches``): the list that records launches instead of running them.
_CAPTURE: ContextVar = ContextVar("posattn_capture", default=None)


@contextmanager
def capture_launches(capability, candidate=0):
    """Record the kernel launches of ``attn_fwd`` / ``attn_bwd`` instead of running them.

    Yields a list that fills with ``(kernel, grid, args, kwargs)``, one entry per launch, as
    the launchers would make them on a GPU of ``capability`` (e.g. ``(9, 0)``): the tile
    table for that capability (or, with ``candidate`` i > 0, the i-th config autotuning may
    choose, the last one if there are fewer), the launcher's own argument list. Inputs may live on any
    device (the CPU will do): nothing is launched, the outputs stay uninitialised. This is
    what the ahead-of-time report (``python -m bench.gpu_report``) compiles, so the report
    and the launchers cannot disagree.
    """
    launches = []
    token = _CAPTURE.set((tuple(capability), launches, candidate))
    try:
        yield launches
    finally:
        _CAPTURE.reset(token)


def _launch(kernel, grid):
    """``kernel[grid]``, or a recorder of the call while ``capture_launches`` is active."""
    capture = _CAPTURE.get()
    if capture is None:
        return kernel[grid]
    return lambda *args, **kwargs: capture[1].append((kernel, grid, args, kwargs))


def _interpreting() -> bool:
    """Whether kernels launched now run in Triton's interpreter (never while launches are
    recorded: the report compiles them for a GPU)."""
    return _config.triton_interpret() and _CAPTURE.get() is None


def _capability(device):
    capture = _CAPTURE.get()
    return capture[0] if capture is not None else _config.cuda_capability(device)


def _check_device(*tensors):
    if _CAPTURE.get() is not None:
        return  # nothing runs: any device will do
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and _config.triton_interpret():
            if not _is_interpreted():
                raise RuntimeError(
                    "TRITON_INTERPRET=1 was set after posattn.triton_kernels was imported; set it before the "
                    "first use of the Triton backend (Triton decides at import time)")
            continue
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors, got a tensor on {t.device}; move the inputs to a GPU, use "
            f"backend='reference', or set TRITON_INTERPRET=1 (before importing posattn) to run the Triton kernels "
            f"on the CPU through Triton's (slow) interpreter")


def _is_interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(_attn_fwd_kernel, InterpretedFunction)


def _alloc(shape, dtype, device, zero=False):
    if zero:
        return torch.zeros(shape, dtype=dtype, device=device)
    if _config.poison_allocations():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _alloc_like(t):
    out = torch.empty_like(t)
    if _config.poison_allocations():
        out.fill_(float("nan"))
    return out


def _mask_args(attn_mask, shape4):
    """(pointer tensor, its 4 strides over [B, H, L, S], kind): masks are read by broadcast strides."""
    if attn_mask is None:
        return None, (0, 0, 0, 0), MASK_NONE
    view = attn_mask.expand(shape4)  # a view: broadcast dims get stride 0, nothing is copied
    kind = MASK_BOOL if attn_mask.dtype == torch.bool else MASK_FLOAT
    return view, tuple(view.stride()), kind


def _pos_args(pos, B, L):
    """Positions: an int offset (no tensor) or an integer tensor (L,) / (B, L)."""
    if isinstance(pos, int):
        return None, pos, (0, 0), False
    if pos.dim() == 1:
        return pos, 0, (0, pos.stride(0)), True
    return pos, 0, (pos.stride(0) if pos.shape[0] != 1 else 0, pos.stride(1)), True


def _window_args(window):
    left, right = window if window is not None else (-1, -1)
    return max(left, 0), max(right, 0), left >= 0, right >= 0


def _dropout_scale(dropout_p):
    # kept elements are scaled by 1/(1 − p); with p = 1 nothing is kept and the scale is unused
    return 1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0


def _dot_precision(dtype):
    if dtype == torch.float32 and not _config.allow_tf32():
        return "ieee"
    return "tf32"


def _rope_args(kp, B, H, HKV, L, S):
    """Rotary pointers (frequency table, q / k angles), their strides and constexprs."""
    table = qa = ka = None
    qa_strides = ka_strides = (0, 0, 0, 0)
    if kp.rope_kind == ROPE_ANGLES:
        qa = kp.q_angles.expand(B, H, L, kp.rotary_dim // 2)  # views: broadcast dims get stride 0
        ka = (kp.q_angles if kp.k_angles is None else kp.k_angles).expand(B, HKV, S, kp.rotary_dim // 2)
        qa_strides, ka_strides = qa.stride(), ka.stride()
    elif kp.rope_kind != ROPE_NONE:
        table = kp.rope_table
    constexprs = dict(ROPE_KIND=kp.rope_kind, ROTARY_DIM=kp.rotary_dim, ROPE_INTERLEAVED=bool(kp.interleaved),
                      BLOCK_R=_config.padded_head_dim(max(kp.rotary_dim // 2, 1)))
    return (table, qa, ka), (*qa_strides, *ka_strides), constexprs


def _bias_strides(kp):
    """(batch, head) strides of the bias parameter: slopes (H,) / (B, H), tables [H, T], log-decays (H,)."""
    t = kp.bias_tensor
    if t is None:
        return 0, 0
    if kp.bias_kind == BIAS_ALIBI and t.dim() == 2:
        return (t.stride(0) if t.shape[0] > 1 else 0), t.stride(1)
    return 0, t.stride(0)


def _dropout_state(seed):
    """(seed, row offset, key offset) of the dropout counter from a seed or such a triple: a block
    of a longer sequence (a ring shard) draws that sequence's mask at its global (row, key)."""
    return tuple(seed) if isinstance(seed, (tuple, list)) else (seed, 0, 0)


def _launch_meta(q, k, v, attn_mask, q_pos, k_pos, causal, window, softcap, dropout_p, seed, scale, kp, varlen=None):
    """Sizes, the shared argument list (the common tail of every kernel's signature) and constexprs.

    ``varlen``: (cu_seqlens_q, cu_seqlens_k) of a packed batch, whose q, k, v come as
    :func:`_packed` views (B = the number of sequences, L / S = the total rows)."""
    B, H, L, D = q.shape
    _, HKV, S, _ = k.shape
    DV = v.shape[-1]
    mask, mask_strides, mask_kind = _mask_args(attn_mask, (B, H, L, S))
    qpos, q_offset, qpos_strides, q_tensor = _pos_args(q_pos, B, L)
    kpos, k_offset, kpos_strides, k_tensor = _pos_args(k_pos, B, S)
    w_left, w_right, has_left, has_right = _window_args(window)
    (rope_table, qa, ka), angle_strides, rope_cx = _rope_args(kp, B, H, HKV, L, S)
    urpe_stride = kp.urpe_table.stride(0) if kp.urpe_table is not None else 0
    # Absent tensors are replaced by q: their loads are compiled out by the constexpr flags,
    # but the pointer arithmetic around them is still traced.
    pointers = (mask, qpos, kpos, rope_table, qa, ka, kp.bias_tensor, kp.bias_lut, kp.urpe_table)
    cu_q, cu_k = varlen if varlen is not None else (q, q)
    shared = [q, k, v, *(q if t is None else t for t in pointers), cu_q, cu_k,
              H, HKV, L, S, D, DV,
              *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *mask_strides, *qpos_strides, *kpos_strides,
              *angle_strides, *_bias_strides(kp), urpe_stride,
              q_offset, k_offset, w_left, w_right, scale, softcap or 0.0, dropout_p, _dropout_scale(dropout_p),
              *_dropout_state(seed), float(kp.rope_scale), *kp.bias_ints, kp.urpe_m]
    # xPos keeps its rotated tiles in fp32 (see load_rotated): half inputs then use TF32 dots.
    constexprs = dict(
        BLOCK_D=_config.padded_head_dim(D), BLOCK_DV=_config.padded_head_dim(DV), IS_CAUSAL=causal,
        WINDOW_LEFT=has_left, WINDOW_RIGHT=has_right, MASK_KIND=mask_kind, HAS_SOFTCAP=softcap is not None,
        HAS_DROPOUT=dropout_p > 0.0, Q_POS_TENSOR=q_tensor, K_POS_TENSOR=k_tensor,
        DOT_PRECISION=_dot_precision(q.dtype), BIAS_KIND=kp.bias_kind, HAS_URPE=kp.urpe_table is not None,
        MASK_INTERIOR=_config.mask_all_tiles(), VARLEN=varlen is not None,
        # q·k enters exp2 unscaled (the scale folded into the exponent): no bias, float mask or
        # softcap, and a positive scale (the row max commutes with the multiply only then)
        RAW_SCORES=kp.bias_kind == BIAS_NONE and mask_kind != MASK_FLOAT and softcap is None and scale > 0,
        **rope_cx)
    return (B, H, HKV, L, S, D, DV), shared, constexprs


def _tile_kwargs(cfg):
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _choose_tiles(kind, q, causal, kp, sizes, cx, plain, launch):
    """The tile config that kernel ``kind`` ("fwd", "dkdv", "dq") runs with: the tile table's
    (``_config.tile_config``) or, for a ``plain`` call (no position spec, mask, dropout,
    softcap or position tensor, not packed) with autotuning on, the fastest candidate for its
    key (``_autotune.choose``: timed once per process through ``launch(config)``).
    ``sizes``: (B, H, L, S)."""
    interpret = _interpreting()
    capability = None if interpret else _capability(q.device)
    flags = [name for name, on in (("xpos", kp.rope_kind == ROPE_XPOS), ("angles", kp.rope_kind == ROPE_ANGLES),
                                   ("rotary", kp.rope_kind != ROPE_NONE),
                                   ("table", kp.bias_kind in (BIAS_RELATIVE, BIAS_T5)),
                                   ("bias", kp.bias_kind != BIAS_NONE), ("urpe", kp.urpe_table is not None),
                                   ("causal", causal), ("varlen", cx["VARLEN"])) if on]
    candidates = _config.tile_candidates(kind, max(cx["BLOCK_D"], cx["BLOCK_DV"]), interpret, capability=capability,
                                         dtype=q.dtype, flags=flags, plain=plain)
    capture = _CAPTURE.get()
    if capture is not None:  # the report compiles the candidate it asks for (default: the first)
        return candidates[min(capture[2], len(candidates) - 1)]
    B, H, L, S = sizes
    key = (kind, capability, str(q.dtype), cx["BLOCK_D"], cx["BLOCK_DV"], tuple(flags), cx["WINDOW_LEFT"],
           cx["WINDOW_RIGHT"], _autotune.bucket(L), _autotune.bucket(S), _autotune.bucket(B * H))
    return _autotune.choose(key, candidates, launch, q.device)


def _plain(kp, attn_mask, q_pos, k_pos, dropout_p, softcap, varlen):
    """Whether a call runs the plain kernels that autotuning chooses tiles for."""
    return (kp.rope_kind == ROPE_NONE and kp.bias_kind == BIAS_NONE and kp.urpe_table is None and attn_mask is None
            and isinstance(q_pos, int) and isinstance(k_pos, int) and dropout_p == 0.0 and softcap is None
            and varlen is None)


def _tma_descriptors(q, varlen, kp, *operands):
    """TMA descriptors of K and V for the interior tiles of the forward and dQ kernels, or
    None (pointers then).

    ``operands``: (tensor [B, heads, rows, cols], rows, cols) each, read in [1, 1, rows, cols]
    blocks (columns past the tensor's zero-filled). None when ``POSATTN_TMA`` / the GPU says
    no (:func:`posattn._config.tma`), for packed batches (their sequences share one row
    axis), with a rotary spec (rotated keys are read through pointers, and V alone through a
    descriptor compiled longer and spilled: sm_90 D=128), or when a layout has no
    descriptor: TMA needs a 16-byte aligned base, 16-byte aligned strides, a unit last stride
    and no empty dim. Boundary tiles always read through pointers. The dK/dV kernel has no
    descriptors: its loop reads 16- to 32-row query tiles, for which descriptor loads
    compiled to more instructions per iteration than async copies (sm_90 D=64: 254 vs 233).
    """
    interpret = _interpreting()
    descriptor = _compat.host_tensor_descriptor()
    if (varlen is not None or kp.rope_kind != ROPE_NONE or descriptor is None
            or not _config.tma(None if interpret else _capability(q.device), interpret)):
        return None
    out = []
    for t, rows, cols in operands:
        size = t.element_size()
        if (t.numel() == 0 or t.stride(-1) != 1 or t.data_ptr() % 16
                or any(stride * size % 16 for stride in t.stride()[:-1])):
            return None
        out.append(descriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, cols]))
    return out


def _programs(varlen, side, rows, block, heads, B, dummy):
    """The tile map and grid of a kernel whose programs take ``block`` rows of ``rows`` each
    (queries: ``side`` 0, keys: 1): (``dummy``, (tiles, B · heads)), or for a packed batch its
    tile → sequence map and (slots, heads)."""
    if varlen is None:
        return dummy, (triton.cdiv(rows, block), B * heads)
    tile_map, slots = _tile_map(varlen[side], rows, block)
    return tile_map, (slots, heads)


def _packed(x, n):
    """A packed [T, h, d] tensor as the kernels' [B, h, T, d] with B = n sequences and batch
    stride 0: a view; each program finds its sequence's rows through cu_seqlens."""
    x = x.transpose(0, 1)
    return x[None].expand(n, *x.shape)


def _tile_map(cu, total, block):
    """The tile → sequence map of a packed batch, computed on the device without a host sync:
    int32 [2, slots], row 0 the sequence of each program (−1: spare), row 1 its tile index in
    that sequence. ``slots`` = ⌈total / block⌉ + n bounds Σ ⌈len_i / block⌉, known on the host."""
    n = cu.numel() - 1
    slots = triton.cdiv(total, block) + n
    if n == 0:
        return torch.full((2, slots), -1, dtype=torch.int32, device=cu.device), slots
    tiles = (cu[1:] - cu[:-1]).long().add(block - 1).div(block, rounding_mode="floor")  # [n]
    ends = tiles.cumsum(0)
    slot = torch.arange(slots, device=cu.device)
    seq = torch.searchsorted(ends, slot, right=True)
    tile = slot - (ends - tiles)[seq.clamp(max=n - 1)]
    return torch.stack((torch.where(seq < n, seq, -1), tile)).to(torch.int32), slots


def attn_fwd(q, k, v, attn_mask, q_pos, k_pos, causal, window, softcap, dropout_p, seed, scale, kp=None,
             varlen=None):
    """Forward. Returns out [B, H, L, Dv] (q's dtype) and lse [B, H, L] (fp32, natural log).

    ``kp``: the flattened position specs (:class:`posattn.positions.KernelPositions`).
    ``varlen``: (cu_seqlens_q, cu_seqlens_k), int32 [n+1], for a packed batch: q [Tq, H, D],
    k [Tk, Hkv, D], v [Tk, Hkv, Dv], positions [Tq] / [Tk] tensors or offsets (added to each
    sequence's default: keys 0.., queries S_i − L_i..); returns out [Tq, H, Dv], lse [H, Tq].
    """
    kp = KernelPositions() if kp is None else kp
    _check_device(q, k, v, attn_mask)
    if varlen is not None:
        n = varlen[0].numel() - 1
        out = _alloc((q.shape[0], q.shape[1], v.shape[-1]), q.dtype, q.device)
        lse = _alloc((q.shape[1], q.shape[0]), torch.float32, q.device)
        # [HKV, Tk]: NaN for a key whose value row is not finite, else 0
        v_bad_keys = torch.where(torch.isfinite(v).all(dim=-1), 0.0, float("nan")).to(torch.float32).T.contiguous()
        q, k, v, out_view = (_packed(t, n) for t in (q, k, v, out))
    (B, H, HKV, L, S, D, DV), shared, cx = _launch_meta(
        q, k, v, attn_mask, q_pos, k_pos, causal, window, softcap, dropout_p, seed, scale, kp, varlen)
    if varlen is None:
        out = out_view = _alloc((B, H, L, DV), q.dtype, q.device)
        lse = _alloc((B, H, L), torch.float32, q.device)
        # [B, HKV, S] on the device: NaN for a key whose value row is not finite, else 0
        v_bad_keys = torch.where(torch.isfinite(v).all(dim=-1), 0.0, float("nan")).to(torch.float32).contiguous()
    if L * B * H == 0:
        return out, lse

    def launch(cfg):
        tile_map, grid = _programs(varlen, 0, L, cfg.block_m, H, B, q)
        tma = _tma_descriptors(q, varlen, kp, (k, cfg.block_n, cx["BLOCK_D"]), (v, cfg.block_n, cx["BLOCK_DV"]))
        _launch(_attn_fwd_kernel, grid)(
            out_view, lse, v_bad_keys, tile_map, *(tma or (k, v)), *out_view.stride()[:3], *shared,
            TMA=tma is not None, **_tile_kwargs(cfg), **cx)

    launch(_choose_tiles("fwd", q, causal, kp, (B, H, L, S), cx,
                         _plain(kp, attn_mask, q_pos, k_pos, dropout_p, softcap, varlen), launch))
    return out, lse


def _sum_to(grad, shape):
    """Reduce a full-shape gradient over the dims that ``shape`` broadcasts (size 1)."""
    dims = [i for i, (g, s) in enumerate(zip(grad.shape, shape)) if s == 1 and g != 1]
    return grad.sum(dim=dims, keepdim=True) if dims else grad


def attn_bwd(do, q, k, v, out, lse, dlse, attn_mask, q_pos, k_pos, causal, window, softcap, dropout_p, seed, scale,
             mask_grad, kp=None, grads=(False, False, False), deterministic=False, varlen=None):
    """Backward. Returns dq, dk, dv (like q, k, v), the float mask's gradient reduced to the
    mask's own shape (if ``mask_grad``, else None), and the gradients of the position
    parameters that ``grads`` = (angles, bias, urpe) asks for (else None): the angles'
    (q_angles' shape; k_angles' shape or None when q_angles rotates the keys too), the
    bias parameter's (its shape) and the URPE table's.

    ``deterministic``: bitwise-reproducible parameter and mask gradients (per-program
    partial sums, reduced afterwards) instead of fp32 atomics into one buffer.
    ``varlen``: a packed batch, as in :func:`attn_fwd` (do, out [Tq, H, Dv], lse, dlse [H, Tq]).
    """
    kp = KernelPositions() if kp is None else kp
    angle_grad, bias_grad, urpe_grad = grads
    _check_device(do, q, k, v, attn_mask)
    if do.stride(-1) != 1:
        do = do.contiguous()
    if dlse is not None:
        dlse = dlse.contiguous()  # autograd hands out expanded (stride-0) gradients, e.g. of lse.sum()
    dq, dk, dv = _alloc_like(q), _alloc_like(k), _alloc_like(v)
    # the row-wise preprocess sees a packed batch as one sequence of Tq rows: delta [H, Tq] like lse
    rows_view = (lambda t: t.transpose(0, 1)[None]) if varlen is not None else (lambda t: t)
    out_rows, do_rows = rows_view(out), rows_view(do)
    if varlen is not None:
        n = varlen[0].numel() - 1
        q, k, v, do, dq, dk, dv = (_packed(t, n) for t in (q, k, v, do, dq, dk, dv))
    (B, H, HKV, L, S, D, DV), shared, cx = _launch_meta(
        q, k, v, attn_mask, q_pos, k_pos, causal, window, softcap, dropout_p, seed, scale, kp, varlen)
    dev = q.device
    B_rows = 1 if varlen is not None else B  # per-row buffers of a packed batch: [H, Tq]
    plain = _plain(kp, attn_mask, q_pos, k_pos, dropout_p, softcap, varlen)

    delta = _alloc((B_rows, H, L), torch.float32, dev)
    pre_block = 64
    if L * H > 0:
        _launch(_attn_bwd_preprocess_kernel, (triton.cdiv(L, pre_block), B_rows * H))(
            out_rows, do_rows, q if dlse is None else dlse, delta, H, L, DV, *out_rows.stride()[:3],
            *do_rows.stride()[:3], BLOCK_M=pre_block, BLOCK_DV=cx["BLOCK_DV"], HAS_DLSE=dlse is not None,
        )

    r2 = kp.rotary_dim // 2
    dq_ang = _alloc((B_rows, H, L, r2), torch.float32, dev) if angle_grad else None
    dk_ang = _alloc((B_rows, HKV, S, r2), torch.float32, dev) if angle_grad else None

    def launch_dkdv(cfg):
        kv_map, kv_grid = _programs(varlen, 1, S, cfg.block_n, HKV, B, q)
        if kv_grid[0] * kv_grid[1] > 0:
            _launch(_attn_bwd_dkdv_kernel, kv_grid)(
                do, lse, delta, dk, dv, q if dk_ang is None else dk_ang, kv_map, *do.stride()[:3], *dk.stride()[:3],
                *dv.stride()[:3], *shared, ANGLE_GRAD=angle_grad, **_tile_kwargs(cfg), **cx)

    launch_dkdv(_choose_tiles("dkdv", q, causal, kp, (B, H, L, S), cx, plain, launch_dkdv))

    def launch_dq(cfg):
        """dQ and the mask / parameter gradients' buffers (sized by the query tiles): a plain
        call (the only kind timed with several configs) has none, so every launch is alike."""
        q_map, q_grid = _programs(varlen, 0, L, cfg.block_m, H, B, q)
        n_m = q_grid[0]
        dmask_buf = None
        dmask_view = q  # a dummy pointer (and strides) when no mask gradient is taken: MASK_GRAD=False never reads it
        if mask_grad:
            # One add per element into a zeroed full-shape buffer is deterministic; a broadcast
            # mask shares elements between programs, hence atomics unless deterministic.
            shape = (B, H, L, S) if deterministic else attn_mask.shape
            dmask_buf = _alloc(shape, torch.float32, dev, zero=True)
            dmask_view = dmask_buf.expand(B, H, L, S)
        dbias_buf, dbias_strides = q, (0, 0, 0)
        if bias_grad:
            if kp.bias_kind in (BIAS_ALIBI, BIAS_MANHATTAN):  # one partial sum per program
                # (a packed batch's sequence b uses only its own programs' slots: the rest stay 0)
                dbias_buf = _alloc((B, H, n_m), torch.float32, dev, zero=varlen is not None)
                dbias_strides = dbias_buf.stride()
            else:
                dbias_buf, dbias_strides = _table_grad_buffer(kp.bias_tensor, B, H, n_m, deterministic, dev)
        durpe_buf, durpe_strides = (_table_grad_buffer(kp.urpe_table, B, H, n_m, deterministic, dev) if urpe_grad
                                    else (q, (0, 0, 0)))
        if q_grid[0] * q_grid[1] > 0:
            tma = _tma_descriptors(q, varlen, kp, (k, cfg.block_n, cx["BLOCK_D"]), (v, cfg.block_n, cx["BLOCK_DV"]))
            _launch(_attn_bwd_dq_kernel, q_grid)(
                do, lse, delta, dq, dmask_view, q if dq_ang is None else dq_ang, dbias_buf, durpe_buf, q_map,
                *(tma or (k, v)), *do.stride()[:3], *dq.stride()[:3], *dmask_view.stride(), *dbias_strides,
                *durpe_strides, *shared, ANGLE_GRAD=angle_grad, MASK_GRAD=mask_grad, BIAS_GRAD=bias_grad,
                URPE_GRAD=urpe_grad, TMA=tma is not None, **_tile_kwargs(cfg), **cx)
        return dmask_buf, dbias_buf, durpe_buf

    dmask_buf, dbias_buf, durpe_buf = launch_dq(_choose_tiles("dq", q, causal, kp, (B, H, L, S), cx, plain, launch_dq))
    if varlen is not None:
        dq, dk, dv = (t[0].transpose(0, 1) for t in (dq, dk, dv))

    dmask = dbias = None
    if mask_grad:
        dmask = _sum_to(dmask_buf, attn_mask.shape).to(attn_mask.dtype)
    dq_angles = dk_angles = None
    if angle_grad:
        dq_angles = _sum_to(dq_ang, kp.q_angles.shape)
        if kp.k_angles is None:
            dq_angles = dq_angles + _sum_to(dk_ang, kp.q_angles.shape)
        else:
            dk_angles = _sum_to(dk_ang, kp.k_angles.shape)
    if bias_grad:
        if kp.bias_kind == BIAS_ALIBI:
            dbias = _sum_to(dbias_buf.sum(-1), kp.bias_tensor.shape if kp.bias_tensor.dim() == 2 else (1, H))
            dbias = dbias.reshape(kp.bias_tensor.shape)
        elif kp.bias_kind == BIAS_MANHATTAN:
            dbias = dbias_buf.sum(dim=(0, 2))
        else:
            dbias = _reduce_table_grad(dbias_buf, deterministic)
    durpe = _reduce_table_grad(durpe_buf, deterministic) if urpe_grad else None
    return dq, dk, dv, dmask, dq_angles, dk_angles, dbias, durpe


def _table_grad_buffer(table, B, H, n_m, deterministic, device):
    """Zeroed fp32 buffer for a table gradient and the (batch, head, query-tile) strides of
    each program's row: one row per program (deterministic) or the [H, T] gradient itself."""
    T = table.shape[1]
    if deterministic:
        buf = _alloc((B, H, n_m, T), torch.float32, device, zero=True)
        return buf, buf.stride()[:3]
    buf = _alloc((H, T), torch.float32, device, zero=True)
    return buf, (0, buf.stride(0), 0)


def _reduce_table_grad(buf, deterministic):
    """[H, T]: the per-program rows summed in a fixed order (deterministic), or the buffer itself."""
    return buf.sum(dim=(0, 2)) if deterministic else buf


def dropout_mask(seed, B, H, L, S, dropout_p, device):
    """The keep-mask (bool [B, H, L, S]) that the kernels draw for ``seed``: for tests and debugging."""
    _check_device(torch.empty(0, device=device))
    keep = torch.empty((B, H, L, S), dtype=torch.bool, device=device)
    block = 64
    _dropout_mask_kernel[(triton.cdiv(L, block), triton.cdiv(S, block), B * H)](
        keep, H, L, S, dropout_p, seed, BLOCK_M=block, BLOCK_N=block)
    return keep
