"""Jit helpers shared by every attention kernel: positions, the score pipeline, dropout.

The score pipeline (docs/semantics.md) is written once, in :func:`score_tile`, and called by the
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

# Softmax runs in base 2 (exp2 is one MUFU.EX2; exp is a multiply plus denormal fix-ups):
# scores are scaled by log2(e) and the natural-log lse is (m + log2 l)·ln 2.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def load_positions(POS, offset, b, idx, valid, stride_b, stride_l, POS_TENSOR: tl.constexpr):
    """Absolute positions of rows ``idx`` of batch ``b``: a tensor (B or 1, L) or offset + idx."""
    if POS_TENSOR:
        pos = tl.load(POS + b * stride_b + idx * stride_l, mask=valid, other=0).to(tl.int32)
    else:
        pos = (offset + idx).to(tl.int32)
    return pos


@triton.jit
def tile_range(pos, valid, offset, start, BLOCK: tl.constexpr, N, POS_TENSOR: tl.constexpr):
    """(min, max) position of the valid rows [start, min(start + BLOCK, N)) of a tile: a
    reduction of a position tensor, or arithmetic on an offset. Computed once per program for
    its own tile; the tiles it loops over never reduce their positions."""
    if POS_TENSOR:
        lo = tl.min(tl.where(valid, pos, 2147483647), axis=0)
        hi = tl.max(tl.where(valid, pos, -2147483647), axis=0)
    else:
        lo = offset + start
        hi = offset + tl.minimum(start + BLOCK, N) - 1
    return lo, hi


@triton.jit
def keys_visible(k_pos, q_lo, q_hi, window_left, window_right,
                 IS_CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr):
    """Per key: can a query with a position in [q_lo, q_hi] see it through causal / window masking?

    Folded into the load masks of a key tile with position tensors, so that keys no query of
    the tile can see are never read, without a branch around the loads (which would stop the
    software pipeliner).
    """
    visible = k_pos == k_pos
    if IS_CAUSAL:
        visible = visible & (k_pos <= q_hi)
    if WINDOW_RIGHT:
        visible = visible & (k_pos <= q_hi + window_right)
    if WINDOW_LEFT:
        visible = visible & (k_pos >= q_lo - window_left)
    return visible


@triton.jit
def queries_visible(q_pos, k_lo, k_hi, window_left, window_right,
                    IS_CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr):
    """Per query: can it see a key with a position in [k_lo, k_hi]? (:func:`keys_visible` mirrored)"""
    visible = q_pos == q_pos
    if IS_CAUSAL:
        visible = visible & (q_pos >= k_lo)
    if WINDOW_RIGHT:
        visible = visible & (q_pos >= k_lo - window_right)
    if WINDOW_LEFT:
        visible = visible & (q_pos <= k_hi + window_left)
    return visible


@triton.jit
def interior_tiles(lo, hi, first, last, BLOCK: tl.constexpr):
    """[ilo, ihi) ⊆ [lo, hi): the tile starts t (multiples of BLOCK, like lo) with first ≤ t ≤ last.

    The loops run the interior tiles [ilo, ihi) on the unmasked path and the rest of the
    visible range, [lo, ilo) and [ihi, hi), on the masked one; ``last`` < 0 leaves no
    interior tile. No negative number is divided (integer division rounds differently on the
    GPU and in the interpreter).
    """
    ilo = tl.maximum((tl.maximum(first, 0) + BLOCK - 1) // BLOCK * BLOCK, lo)
    ihi = tl.maximum(last + BLOCK, 0) // BLOCK * BLOCK
    ilo = tl.minimum(ilo, tl.maximum(hi, lo))
    ihi = tl.maximum(tl.minimum(ihi, tl.maximum(hi, 0) // BLOCK * BLOCK), ilo)
    return ilo, ihi


@triton.jit
def boundary_start(i, lo, ilo, ihi, BLOCK: tl.constexpr):
    """Start of the i-th boundary tile: [lo, ilo) first (window-left edge), then [ihi, hi)."""
    n_front = (ilo - lo + BLOCK - 1) // BLOCK
    return tl.where(i < n_front, lo + i * BLOCK, ihi + (i - n_front) * BLOCK)


@triton.jit
def boundary_count(lo, hi, ilo, ihi, BLOCK: tl.constexpr):
    """Number of boundary tiles: those of [lo, ilo) and of [ihi, hi)."""
    return (tl.maximum(ilo - lo, 0) + BLOCK - 1) // BLOCK + (tl.maximum(hi - ihi, 0) + BLOCK - 1) // BLOCK


@triton.jit
def tanh(x):
    # tanh via exp: saturates to exactly ±1 at ±inf (a +inf score caps to +softcap), never NaN
    # for a non-NaN input.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def score_tile(qk, scale, bias, q_pos, k_pos, m_valid, n_valid, mask_ptrs, softcap, window_left, window_right,
               MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IS_CAUSAL: tl.constexpr,
               WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SCALED: tl.constexpr, MASK: tl.constexpr):
    """Steps 2–6 of the score pipeline on one [BLOCK_M, BLOCK_N] tile; masked entries are −inf.

    Returns (s, to_log2, dcap). The scores are s·to_log2 in log2 units, ready for exp2.
    ``SCALED`` false (the launcher's RAW_SCORES: no bias, softcap or float mask, and a positive
    scale): s is the raw q·k and to_log2 = scale·log2(e), so the caller's row max costs one
    multiply per row and exp2(s·to_log2 − m) one FFMA per score (rounding is monotonic, so
    max(s)·c = max(s·c) exactly for c > 0). Otherwise s is the natural-log score and
    to_log2 = log2(e). The cap acts on the scaled scores alone, before the bias and the
    float mask; dcap = ∂(capped score)/∂(scaled score) = 1 − tanh² (1.0 without softcap) is the
    factor dQ / dK take and the bias / mask gradients do not. ``bias`` is the tile's position
    bias (step 4, see :func:`bias_tile`) or 0.0. ``MASK`` false: an interior tile, where every
    (query, key) pair is in bounds and visible and there is no attn_mask, so nothing is masked.
    """
    dcap = 1.0
    if SCALED:
        s = qk * scale  # [BLOCK_M, BLOCK_N]
        if HAS_SOFTCAP:
            t = tanh(s / softcap)
            s = softcap * t
            dcap = 1.0 - t * t
        s += bias
        to_log2 = LOG2E
    else:
        s = qk
        to_log2 = scale * LOG2E
    if MASK:
        valid = m_valid[:, None] & n_valid[None, :]
        keep = valid
        if MASK_KIND == 2:
            mask = tl.load(mask_ptrs, mask=valid, other=0.0).to(tl.float32)
            s += mask
            keep = keep & (mask != float("-inf"))  # a −inf entry masks the key whatever its score (NaN too)
        if IS_CAUSAL:
            keep = keep & (k_pos[None, :] <= q_pos[:, None])
        if WINDOW_LEFT:
            keep = keep & (k_pos[None, :] >= q_pos[:, None] - window_left)
        if WINDOW_RIGHT:
            keep = keep & (k_pos[None, :] <= q_pos[:, None] + window_right)
        if MASK_KIND == 1:
            keep = keep & (tl.load(mask_ptrs, mask=valid, other=0) != 0)
        s = tl.where(keep, s, float("-inf"))
    return s, to_log2, dcap


@triton.jit
def softmax_update(s, to_log2, m_i, l_i, MAY_BE_MASKED: tl.constexpr):
    """One key tile of the online softmax (base 2): (p, alpha, l_i, m_new) from the tile's scores
    ``s`` (s·to_log2 in log2 units, see :func:`score_tile`) and the running row max and sum.

    ``MAY_BE_MASKED``: the tile may hold −inf scores (masks, biases). A row that has seen only
    such keys keeps m = −inf; subtracting 0 instead keeps exp2() at 0 rather than NaN, and
    :func:`normalise_rows` gives that row output 0 and lse −inf.
    """
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * to_log2)  # log2 units
    if MAY_BE_MASKED:
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_safe = m_new  # every score is > −inf
    p = tl.exp2(s * to_log2 - m_safe[:, None])  # [BLOCK_M, BLOCK_N]
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    return p, alpha, l_i, m_new


@triton.jit
def normalise_rows(acc, l_i, m_i):
    """(out, lse) of finished rows: out = acc / l, lse = (m + log2 l)·ln 2 (natural log).

    Rows that saw no key (l = 0) give output 0 and lse −inf; l = NaN (a NaN or +inf score)
    stays NaN; a row whose output is not finite (a non-finite v_j it sees, accumulated on an
    unmasked tile) becomes NaN in out and lse.
    """
    has_keys = l_i != 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * LN2, float("-inf"))
    row_nan = tl.sum(out * 0.0, axis=1)  # NaN in a row whose output is not finite, else 0
    return out + row_nan[:, None], lse + row_nan


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


# --------------------------------------------------------------------------------------------------
# rotary encodings (constexpr ROPE_KIND: 0 none, 1 RoPE frequencies, 2 xPos, 3 explicit angles)
# --------------------------------------------------------------------------------------------------

@triton.jit
def rope_channels(offs_d, ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Per channel: its pair index t, its partner channel and the sign of its sin term.

    Pairs are (2t, 2t+1) interleaved, (t, t + r/2) in the half layout; the first channel
    of a pair gets −sin, the second +sin; channels ≥ ROTARY_DIM pass through (sign 0,
    partner itself).
    """
    rot = offs_d < ROTARY_DIM
    if INTERLEAVED:
        first = (offs_d % 2) == 0
        t = offs_d // 2
        partner = tl.where(first, offs_d + 1, offs_d - 1)
    else:
        first = offs_d < ROTARY_DIM // 2
        t = tl.where(first, offs_d, offs_d - ROTARY_DIM // 2)
        partner = tl.where(first, offs_d + ROTARY_DIM // 2, offs_d - ROTARY_DIM // 2)
    t = tl.where(rot, t, 0)
    partner = tl.where(rot, partner, offs_d)
    sign = tl.where(rot, tl.where(first, -1.0, 1.0), 0.0)
    return t, partner, sign, rot


@triton.jit
def sincos(x):
    """(sin x, cos x) in fp32 for |x| up to ~1e6, within ~2 ulp of the correctly rounded values.

    Cody–Waite reduction by π/2 with fused multiply-adds, then the cephes sinf/cosf minimax
    polynomials on [−π/4, π/4] and a quadrant swap. One reduction serves both functions and
    there is no slow path: libdevice's sinf/cosf carry a Payne–Hanek branch for huge
    arguments whose local array made the rotary kernels spill heavily.
    """
    k = tl.floor(x * 0.6366197723675814 + 0.5)  # nearest multiple of π/2
    r = tl.fma(k, -1.5707963705062866, x)  # π/2 split into fp32(π/2) …
    r = tl.fma(k, 4.371139000186243e-08, r)  # … and its residual
    z = r * r
    sin_r = r + r * z * (-1.6666654611e-1 + z * (8.3321608736e-3 + z * -1.9515295891e-4))
    cos_r = 1.0 - 0.5 * z + z * z * (4.166664568298827e-2 + z * (-1.388731625493765e-3 + z * 2.443315711809948e-5))
    quadrant = k.to(tl.int32) & 3
    odd = (quadrant & 1) != 0
    sin = tl.where(odd, cos_r, sin_r)
    cos = tl.where(odd, sin_r, cos_r)
    sin = tl.where((quadrant & 2) != 0, -sin, sin)
    cos = tl.where(((quadrant + 1) & 2) != 0, -cos, cos)
    return sin, cos


@triton.jit
def rope_coefficients(pos, rel, row_valid, ANG_rows, stride_ang_t, ROPE_TABLE, rope_scale, offs_d,
                      ROPE_KIND: tl.constexpr, ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr):
    """cos and signed sin [ROWS, BLOCK_D] of one tile's rows, so that y = x·cos + x[partner]·sin.

    Angles are pos·inv_freq in fp32 (RoPE, xPos) or loaded (explicit angles). ``rope_scale``
    (YaRN's attention factor) scales both. xPos multiplies both by ζ_t^rel, ``rel`` being
    the row's position relative to the tile pair's centre (+ for queries, − for keys).
    """
    t, partner, sign, rot = rope_channels(offs_d, ROTARY_DIM, INTERLEAVED)
    # One angle per channel: per-pair angles expanded to channels by register reshuffles
    # spilled more (sm_90 AOT: 604 vs 259 LDL/STL in the forward at D = 64).
    angle = _rope_angles(pos, row_valid, ANG_rows, stride_ang_t, ROPE_TABLE, t, rot, ROPE_KIND)  # [ROWS, BLOCK_D]
    sin, cos = sincos(angle)
    cos = cos * rope_scale
    sin = sin * rope_scale
    if ROPE_KIND == 2:
        decay = _xpos_decay(rel, ROPE_TABLE, t, rot, ROTARY_DIM)
        cos = cos * decay
        sin = sin * decay
    return tl.where(rot[None, :], cos, 1.0), sin * sign[None, :], partner


@triton.jit
def _rope_angles(pos, row_valid, ANG_rows, stride_ang_t, ROPE_TABLE, t, t_valid, ROPE_KIND: tl.constexpr):
    """Rotation angles [ROWS, len(t)] of pairs t: loaded (explicit angles) or pos·inv_freq in fp32."""
    if ROPE_KIND == 3:
        angle = tl.load(ANG_rows[:, None] + t[None, :] * stride_ang_t, mask=row_valid[:, None] & t_valid[None, :],
                        other=0.0).to(tl.float32)
    else:
        inv_freq = tl.load(ROPE_TABLE + t, mask=t_valid, other=0.0)
        angle = pos.to(tl.float32)[:, None] * inv_freq[None, :]
    return angle


@triton.jit
def _xpos_decay(rel, ROPE_TABLE, t, t_valid, ROTARY_DIM: tl.constexpr):
    """ζ_t^(rel/scale_base) [ROWS, len(t)]; the table's second row holds log2(ζ_t)/scale_base."""
    log2_zeta = tl.load(ROPE_TABLE + ROTARY_DIM // 2 + t, mask=t_valid, other=0.0)
    return tl.exp2(rel.to(tl.float32)[:, None] * log2_zeta[None, :])


@triton.jit
def load_rotated(X_rows, row_valid, offs_d, D, pos, rel, ANG_rows, stride_ang_t, ROPE_TABLE, rope_scale,
                 ROPE_KIND: tl.constexpr, ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Load a [ROWS, BLOCK_D] tile of q or k and rotate it in fp32 (step 1 of the pipeline).

    The partner channels are a second, permuted load of the same rows (cache hits), so
    no register shuffle is needed. xPos tiles stay fp32 (their decay can exceed the half
    range); the others go back to the input dtype for the tensor-core dot.
    """
    d_valid = offs_d < D
    x = tl.load(X_rows[:, None] + offs_d[None, :], mask=row_valid[:, None] & d_valid[None, :], other=0.0)
    if ROPE_KIND != 0:
        cos, sin, partner = rope_coefficients(pos, rel, row_valid, ANG_rows, stride_ang_t, ROPE_TABLE, rope_scale,
                                              offs_d, ROPE_KIND, ROTARY_DIM, INTERLEAVED)
        xp = tl.load(X_rows[:, None] + partner[None, :], mask=row_valid[:, None] & d_valid[None, :], other=0.0)
        y = x.to(tl.float32) * cos + xp.to(tl.float32) * sin
        if ROPE_KIND == 2:
            x = y
        else:
            x = y.to(x.dtype)
    return x


@triton.jit
def permute_pairs(x, offs_d, partner, ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr):
    """x[:, partner] for a register tile [ROWS, BLOCK_D]: swaps the two channels of each pair.

    When the pairs fill the tile (ROTARY_DIM == BLOCK_D) this is a register reshuffle
    (reshape / split / join). Otherwise (partial rotary, padded head dims) it is a product
    with a 0/1 permutation matrix: exact (every output is one input times 1, fp32 "ieee"
    dot), used once per program to rotate the accumulated dQ / dK back.
    """
    ROWS: tl.constexpr = x.shape[0]
    BLOCK_D: tl.constexpr = x.shape[1]
    if ROTARY_DIM == BLOCK_D:
        if INTERLEAVED:
            a, b = tl.split(tl.reshape(x, [ROWS, BLOCK_D // 2, 2]))
            y = tl.reshape(tl.join(b, a), [ROWS, BLOCK_D])
        else:
            a, b = tl.split(tl.permute(tl.reshape(x, [ROWS, 2, BLOCK_D // 2]), (0, 2, 1)))
            y = tl.reshape(tl.permute(tl.join(b, a), (0, 2, 1)), [ROWS, BLOCK_D])
    else:
        perm = (offs_d[:, None] == partner[None, :]).to(tl.float32)  # [BLOCK_D, BLOCK_D]
        y = tl.dot(x, perm, input_precision="ieee")
    return y


@triton.jit
def unrotate(dy, pos, rel, row_valid, ANG_rows, stride_ang_t, ROPE_TABLE, rope_scale, offs_d,
             ROPE_KIND: tl.constexpr, ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr):
    """dx = Rᵀ dy: the gradient w.r.t. the un-rotated rows (rotation by −angle, same scales)."""
    if ROPE_KIND != 0:
        cos, sin, partner = rope_coefficients(pos, rel, row_valid, ANG_rows, stride_ang_t, ROPE_TABLE, rope_scale,
                                              offs_d, ROPE_KIND, ROTARY_DIM, INTERLEAVED)
        dy = dy * cos - permute_pairs(dy, offs_d, partner, ROTARY_DIM, INTERLEAVED) * sin
    return dy


@triton.jit
def angle_grad(dx, X_rows, row_valid, offs_d, D, ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr,
               BLOCK_R: tl.constexpr):
    """∂L/∂φ_t [ROWS, BLOCK_R] of explicit angles from dx (gradient w.r.t. the un-rotated x).

    For a pair (a, b): ∂L/∂φ = −dy_a·y_b + dy_b·y_a = −dx_a·x_b + dx_b·x_a (the rotation's
    generator commutes with the rotation). Each channel contributes sign·dx·x[partner];
    the two channels of a pair are summed: by a reshape when the pairs fill the tile, else
    by a 0/1 matrix product (exact, deterministic; a [BLOCK_D, BLOCK_R] fp32 operand).
    """
    t, partner, sign, rot = rope_channels(offs_d, ROTARY_DIM, INTERLEAVED)
    xp = tl.load(X_rows[:, None] + partner[None, :], mask=row_valid[:, None] & (offs_d < D)[None, :],
                 other=0.0).to(tl.float32)
    contrib = dx * xp * sign[None, :]  # [ROWS, BLOCK_D]
    ROWS: tl.constexpr = contrib.shape[0]
    BLOCK_D: tl.constexpr = contrib.shape[1]
    if ROTARY_DIM == BLOCK_D and BLOCK_D // 2 == BLOCK_R:  # the pairs fill the tile: a reshape, a sum of two
        if INTERLEAVED:
            return tl.sum(tl.reshape(contrib, [ROWS, BLOCK_D // 2, 2]), axis=2)
        return tl.sum(tl.reshape(contrib, [ROWS, 2, BLOCK_D // 2]), axis=1)
    offs_r = tl.arange(0, BLOCK_R)
    pairs = ((t[:, None] == offs_r[None, :]) & rot[:, None]).to(tl.float32)  # [BLOCK_D, BLOCK_R]
    return tl.dot(contrib, pairs, input_precision="ieee")


# --------------------------------------------------------------------------------------------------
# position biases (constexpr BIAS_KIND: 0 none, 1 ALiBi, 2 RelativeBias, 3 T5Bias, 4 ManhattanDecay)
# and the URPE gate
# --------------------------------------------------------------------------------------------------

@triton.jit
def _floor_divmod(p, w):
    # floor division for any sign of p (w > 0), whatever the integer division rounds to
    q = p // w
    r = p - q * w
    neg = r < 0
    return tl.where(neg, q - 1, q), tl.where(neg, r + w, r)


@triton.jit
def bias_operand(q_pos, k_pos, valid, LUT, bias_i0, bias_i1, bias_i2, BIAS_KIND: tl.constexpr):
    """Per element of a tile: the table index (RelativeBias, T5) or the multiplier of the
    head's parameter (ALiBi: −|r|, Manhattan: grid distance), r = k_pos − q_pos."""
    rel = k_pos[None, :] - q_pos[:, None]  # [BLOCK_M, BLOCK_N]
    if BIAS_KIND == 1:
        out = -tl.abs(rel).to(tl.float32)
    elif BIAS_KIND == 2:
        out = tl.minimum(tl.maximum(rel, -bias_i0), bias_i0) + bias_i0
    elif BIAS_KIND == 3:
        # HF's bucket of the distance, from a table built on the host by HF's own float32
        # expression (exact at every bucket boundary, whatever this device's logf rounds
        # to); the function saturates at max_distance (bias_i0). bias_i1: bucket offset of
        # keys after the query (bidirectional), bias_i2: bidirectional.
        bidirectional = bias_i2 != 0
        n = tl.where(bidirectional, tl.abs(rel), tl.maximum(-rel, 0))
        offset = tl.where(bidirectional & (rel > 0), bias_i1, 0)
        out = offset + tl.load(LUT + tl.minimum(n, bias_i0), mask=valid, other=0)
    else:
        row_q, col_q = _floor_divmod(q_pos, bias_i0)
        row_k, col_k = _floor_divmod(k_pos, bias_i0)
        out = (tl.abs(row_k[None, :] - row_q[:, None]) + tl.abs(col_k[None, :] - col_q[:, None])).to(tl.float32)
    return out


@triton.jit
def bias_tile(operand, valid, BIAS_h, BIAS_KIND: tl.constexpr):
    """Step 4 of the pipeline: the additive bias of one tile (BIAS_h: this head's parameters)."""
    if BIAS_KIND == 1 or BIAS_KIND == 4:
        bias = tl.load(BIAS_h).to(tl.float32) * operand
    else:
        bias = tl.load(BIAS_h + operand, mask=valid, other=0.0).to(tl.float32)
    return bias


@triton.jit
def urpe_index(q_pos, k_pos, urpe_m):
    rel = k_pos[None, :] - q_pos[:, None]
    return tl.minimum(tl.maximum(rel, -urpe_m), urpe_m) + urpe_m


@triton.jit
def table_grad_add(g, idx, live, DT_row):
    """Add Σ g over each table entry of one tile into DT_row[entry].

    The tile is reduced entry by entry first (a tile touches at most BLOCK_M + BLOCK_N − 1
    entries of a relative table, fewer for buckets), then one scalar atomic per (tile,
    entry). Into a per-program row (deterministic mode) the adds of one program land in
    program order, so the result is bitwise reproducible.
    """
    lo = tl.min(tl.min(tl.where(live, idx, 2147483647), axis=1), axis=0)
    hi = tl.max(tl.max(tl.where(live, idx, -1), axis=1), axis=0)
    for e in range(lo, hi + 1):
        tl.atomic_add(DT_row + e, tl.sum(tl.sum(tl.where(live & (idx == e), g, 0.0), axis=1), axis=0))
