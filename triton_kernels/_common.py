"""Jit helpers shared by every attention kernel: positions, the score pipeline, dropout.

The score pipeline (DESIGN.md §3) is written once, in :func:`score_tile`, and called by the
forward kernel and both backward kernels, so the three can never disagree on a masked
element.
"""
import triton
import triton.language as tl
from triton.language.random import philox, uint_to_uniform_float

# attn_mask kinds (constexpr MASK_KIND)
MASK_NONE = 0
MASK_BOOL = 1
MASK_FLOAT = 2


@triton.jit
def load_positions(POS, offset, b, idx, valid, stride_b, stride_l, POS_TENSOR: tl.constexpr):
    """Absolute positions of rows ``idx`` of batch ``b``: a tensor (B or 1, L) or offset + idx."""
    if POS_TENSOR:
        pos = tl.load(POS + b * stride_b + idx * stride_l, mask=valid, other=0).to(tl.int32)
    else:
        pos = (offset + idx).to(tl.int32)
    return pos


@triton.jit
def position_range(pos, valid):
    """(min, max) of the valid positions of a tile, used to skip whole tiles."""
    lo = tl.min(tl.where(valid, pos, 2147483647), axis=0)
    hi = tl.max(tl.where(valid, pos, -2147483647), axis=0)
    return lo, hi


@triton.jit
def tile_visible(q_lo, q_hi, k_lo, k_hi, window_left, window_right,
                 IS_CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr):
    """Can any (query, key) pair of the two position ranges survive causal / window masking?"""
    visible = q_lo <= q_hi  # an empty tile (no valid row) is never visible
    if IS_CAUSAL:
        visible = visible & (k_lo <= q_hi)
    if WINDOW_RIGHT:
        visible = visible & (k_lo <= q_hi + window_right)
    if WINDOW_LEFT:
        visible = visible & (k_hi >= q_lo - window_left)
    return visible & (k_lo <= k_hi)


@triton.jit
def tanh(x):
    # tanh via exp: saturates to exactly ±1 at ±inf, so a −inf float mask under softcap
    # gives −softcap (as the dense reference does), never NaN.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def score_tile(qk, scale, q_pos, k_pos, m_valid, n_valid, mask_ptrs, softcap, window_left, window_right,
               MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IS_CAUSAL: tl.constexpr,
               WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr):
    """Steps 2–6 of the score pipeline on one [BLOCK_M, BLOCK_N] tile; masked entries are −inf."""
    s = qk * scale  # [BLOCK_M, BLOCK_N]
    valid = m_valid[:, None] & n_valid[None, :]
    if MASK_KIND == 2:
        s += tl.load(mask_ptrs, mask=valid, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        s = softcap * tanh(s / softcap)
    keep = valid
    if IS_CAUSAL:
        keep = keep & (k_pos[None, :] <= q_pos[:, None])
    if WINDOW_LEFT:
        keep = keep & (k_pos[None, :] >= q_pos[:, None] - window_left)
    if WINDOW_RIGHT:
        keep = keep & (k_pos[None, :] <= q_pos[:, None] + window_right)
    if MASK_KIND == 1:
        keep = keep & (tl.load(mask_ptrs, mask=valid, other=0) != 0)
    return tl.where(keep, s, float("-inf"))


@triton.jit
def dropout_keep(seed, bh, offs_m, offs_n, dropout_p):
    """Keep-mask of dropout for rows ``offs_m`` × keys ``offs_n`` of query head ``bh``.

    Philox keyed by the seed, counter (key, row, batch·head, 0): every element of the
    (B, H, L, S) score tensor gets its own counter, so the backward regenerates exactly
    the forward's mask tile by tile, whatever the tiling.
    """
    c0 = (offs_n[None, :] + 0 * offs_m[:, None]).to(tl.uint32)
    c1 = (offs_m[:, None] + 0 * offs_n[None, :]).to(tl.uint32)
    c2 = tl.zeros_like(c0) + bh.to(tl.uint32)
    r, _, _, _ = philox(seed, c0, c1, c2, tl.zeros_like(c0))
    return uint_to_uniform_float(r) >= dropout_p
