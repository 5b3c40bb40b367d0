"""Fused pieces of kernelized attention in Triton (python/posattn/kernelized.py, docs/math.md §6).

The same five operations, with the same signatures and semantics, as the CPU backend's
csrc/kernelized.cpp; the FFTs between them are torch.fft's. Operands are [B, H, N, ·] rows or
[B, H, C, n] columns with any strides; one program takes BLOCK_R rows of one (batch, head).

  kz_outer:      out[f·E1 + e, n] = φ[n, lo+f] · w[n, e] (e < E), and out[f·E1 + E, n] = φ[n, lo+f]
                 with append_phi (the product with w's implicit "1"); [B, H, F·E1, n_pad], zero
                 for N ≤ n < n_pad: one sequence per column, the FFT's input as it is
  kz_contract_f: out[n, e] = Σ_f φ[n, lo+f] · x[f·E1 + e, n]      (x [B, H, F·E1, ≥ N])
  kz_contract_e: out[n, f] = Σ_e x[f·E1 + e, n] · w[n, e] (+ x[f·E1 + E1−1, n] when w has E1 − 1 columns)
  kz_prf:        φ[n, l] = exp(w_l·x̃_n − ‖x̃_n‖²/2 − stab) / √m, x̃ = x·D^{-1/4}; stab the row max
                 (queries) or the max over every row of the (batch, head) (keys)
  kz_prf_bwd:    dx[n] = D^{-1/4}·(Σ_l g[n, l]·w_l − x̃_n·Σ_l g[n, l]), g = dφ ⊙ φ

The outer products and contractions run in the dtype they are given (float64 on the FFT
path, so no tl.dot); the feature map computes in fp32 with exact (ieee) dots, since an
error in w·x̃ is an error in the exponent.
"""
import torch
import triton
import triton.language as tl

from .attention import _alloc, _check_device, _launch

_BLOCK_R = 32


@triton.jit
def _rows(P, g, H, stride_b, stride_h):
    """The first element of (batch, head) slice g = b·H + h."""
    g = g.to(tl.int64)
    return P + (g // H) * stride_b + (g % H) * stride_h


@triton.jit(do_not_specialize=["N", "n_pad", "lo"])
def _kz_outer_kernel(
    # pointers
    OUT, PHI, W,
    # sizes
    H, N, n_pad, E, E1, lo,
    # strides
    stride_o_b, stride_o_h, stride_o_n, stride_o_e, stride_p_b, stride_p_h, stride_p_n, stride_p_f, stride_w_b,
    stride_w_h, stride_w_n, stride_w_e,
    # constexprs
    APPEND_PHI: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    g, rb, f = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_E)
    live = rows < N
    phi = tl.load(_rows(PHI, g, H, stride_p_b, stride_p_h) + rows * stride_p_n + (lo + f) * stride_p_f,
                  mask=live, other=0.0)  # [BLOCK_R]; rows N ≤ n < n_pad are the zero padding
    w = tl.load(_rows(W, g, H, stride_w_b, stride_w_h) + rows[:, None] * stride_w_n + cols[None, :] * stride_w_e,
                mask=live[:, None] & (cols[None, :] < E), other=0.0)  # [BLOCK_R, BLOCK_E]
    out = phi[:, None] * w
    if APPEND_PHI:
        out = tl.where(cols[None, :] == E, phi[:, None], out)
    out_cols = _rows(OUT, g, H, stride_o_b, stride_o_h) + (f * E1 + cols[None, :]) * stride_o_e
    tl.store(out_cols + rows[:, None] * stride_o_n, out, mask=(rows[:, None] < n_pad) & (cols[None, :] < E1))


@triton.jit(do_not_specialize=["N", "lo", "F"])
def _kz_contract_f_kernel(
    # pointers
    OUT, PHI, X,
    # sizes
    H, N, E1, lo, F,
    # strides
    stride_o_b, stride_o_h, stride_o_n, stride_o_e, stride_p_b, stride_p_h, stride_p_n, stride_p_f, stride_x_b,
    stride_x_h, stride_x_n, stride_x_e,
    # constexprs
    BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    g, rb = tl.program_id(0), tl.program_id(1)
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_E)
    live = rows < N
    both = live[:, None] & (cols[None, :] < E1)
    phi_row = _rows(PHI, g, H, stride_p_b, stride_p_h) + rows * stride_p_n + lo * stride_p_f
    x_rows = _rows(X, g, H, stride_x_b, stride_x_h) + rows[:, None] * stride_x_n + cols[None, :] * stride_x_e
    acc = tl.zeros([BLOCK_R, BLOCK_E], dtype=OUT.dtype.element_ty)
    for f in range(F):
        phi = tl.load(phi_row + f * stride_p_f, mask=live)  # [BLOCK_R]
        acc += phi[:, None] * tl.load(x_rows + f * E1 * stride_x_e, mask=both, other=0.0)
    tl.store(_rows(OUT, g, H, stride_o_b, stride_o_h) + rows[:, None] * stride_o_n + cols[None, :] * stride_o_e, acc,
             mask=both)


@triton.jit(do_not_specialize=["N", "F"])
def _kz_contract_e_kernel(
    # pointers
    OUT, X, W,
    # sizes
    H, N, E1, Ew, F,
    # strides
    stride_o_b, stride_o_h, stride_o_n, stride_o_f, stride_x_b, stride_x_h, stride_x_n, stride_x_e, stride_w_b,
    stride_w_h, stride_w_n, stride_w_e,
    # constexprs
    IMPLICIT_ONE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    g, rb = tl.program_id(0), tl.program_id(1)
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_E)
    live = rows < N
    w = tl.load(_rows(W, g, H, stride_w_b, stride_w_h) + rows[:, None] * stride_w_n + cols[None, :] * stride_w_e,
                mask=live[:, None] & (cols[None, :] < Ew), other=0.0)  # [BLOCK_R, BLOCK_E]
    if IMPLICIT_ONE:
        w = tl.where(cols[None, :] == Ew, 1.0, w)  # the "1" that x's last column pairs with
    x_rows = _rows(X, g, H, stride_x_b, stride_x_h) + rows[:, None] * stride_x_n + cols[None, :] * stride_x_e
    out_rows = _rows(OUT, g, H, stride_o_b, stride_o_h) + rows * stride_o_n
    for f in range(F):
        x = tl.load(x_rows + f * E1 * stride_x_e, mask=live[:, None] & (cols[None, :] < E1), other=0.0)
        tl.store(out_rows + f * stride_o_f, tl.sum(x * w, axis=1), mask=live)


@triton.jit
def _prf_logits(x, W, f0, m, D, stride_w_m, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr):
    """w_l·x̃ for features [f0, f0 + BLOCK_F) of the rows x̃ [BLOCK_R, BLOCK_D]; −inf past m."""
    feats = f0 + tl.arange(0, BLOCK_F)
    dims = tl.arange(0, BLOCK_D)
    w = tl.load(W + feats[:, None] * stride_w_m + dims[None, :], mask=(feats[:, None] < m) & (dims[None, :] < D),
                other=0.0).to(tl.float32)  # [BLOCK_F, BLOCK_D]
    s = tl.dot(x, tl.trans(w), input_precision="ieee")  # [BLOCK_R, BLOCK_F]
    return tl.where(feats[None, :] < m, s, float("-inf")), feats


@triton.jit(do_not_specialize=["N"])
def _prf_kernel(
    # pointers
    PHI, STAB, X, W,
    # sizes
    H, N, D, m,
    # strides
    stride_p_b, stride_p_h, stride_p_n, stride_x_b, stride_x_h, stride_x_n, stride_w_m,
    # scalars
    x_scale, inv_sqrt_m,
    # constexprs
    WRITE_PHI: tl.constexpr, ROW_STAB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """WRITE_PHI=False: STAB[g, n] = max_l (w_l·x̃_n − ‖x̃_n‖²/2) (the keys' first pass).
    WRITE_PHI=True: φ with the row's own max (ROW_STAB, queries) or STAB[g] (keys)."""
    g, rb = tl.program_id(0), tl.program_id(1)
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    dims = tl.arange(0, BLOCK_D)
    live = rows < N
    x = tl.load(_rows(X, g, H, stride_x_b, stride_x_h) + rows[:, None] * stride_x_n + dims[None, :],
                mask=live[:, None] & (dims[None, :] < D), other=0.0).to(tl.float32) * x_scale  # x̃ [BLOCK_R, BLOCK_D]
    half_sq = 0.5 * tl.sum(x * x, axis=1)  # [BLOCK_R]
    if ROW_STAB or not WRITE_PHI:
        # the stabiliser needs every feature before the first exp: the GEMM runs twice
        # rather than keep [BLOCK_R, m] logits in registers
        m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
        for f0 in range(0, m, BLOCK_F):
            s, _ = _prf_logits(x, W, f0, m, D, stride_w_m, BLOCK_F, BLOCK_D)
            m_i = tl.maximum(m_i, tl.max(s, axis=1))
        stab = m_i - half_sq
        if not WRITE_PHI:
            tl.store(STAB + g.to(tl.int64) * N + rows, stab, mask=live)
            return
    else:
        stab = tl.load(STAB + g) + tl.zeros([BLOCK_R], dtype=tl.float32)
    shift = half_sq + stab  # exp(w·x̃ − ‖x̃‖²/2 − stab)
    out_rows = _rows(PHI, g, H, stride_p_b, stride_p_h) + rows[:, None] * stride_p_n
    for f0 in range(0, m, BLOCK_F):
        s, feats = _prf_logits(x, W, f0, m, D, stride_w_m, BLOCK_F, BLOCK_D)
        phi = tl.exp(s - shift[:, None]) * inv_sqrt_m
        tl.store(out_rows + feats[None, :], phi, mask=live[:, None] & (feats[None, :] < m))


@triton.jit(do_not_specialize=["N"])
def _prf_bwd_kernel(
    # pointers
    DX, DPHI, PHI, X, W,
    # sizes
    H, N, D, m,
    # strides
    stride_dx_b, stride_dx_h, stride_dx_n, stride_p_b, stride_p_h, stride_p_n, stride_x_b, stride_x_h, stride_x_n,
    stride_w_m,
    # scalars
    x_scale,
    # constexprs
    BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
):
    g, rb = tl.program_id(0), tl.program_id(1)
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    dims = tl.arange(0, BLOCK_D)
    live = rows < N
    both = live[:, None] & (dims[None, :] < D)
    x = tl.load(_rows(X, g, H, stride_x_b, stride_x_h) + rows[:, None] * stride_x_n + dims[None, :], mask=both,
                other=0.0).to(tl.float32) * x_scale  # x̃ [BLOCK_R, BLOCK_D]
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)  # Σ_l g_l·w_l
    g_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
    # dφ and φ share one layout (the launcher makes dφ like φ)
    p_rows = rows[:, None] * stride_p_n
    for f0 in range(0, m, BLOCK_F):
        feats = f0 + tl.arange(0, BLOCK_F)
        fm = live[:, None] & (feats[None, :] < m)
        off = p_rows + feats[None, :]
        gt = (tl.load(_rows(DPHI, g, H, stride_p_b, stride_p_h) + off, mask=fm, other=0.0) *
              tl.load(_rows(PHI, g, H, stride_p_b, stride_p_h) + off, mask=fm, other=0.0))  # [BLOCK_R, BLOCK_F]
        w = tl.load(W + feats[:, None] * stride_w_m + dims[None, :], mask=(feats[:, None] < m) & (dims[None, :] < D),
                    other=0.0).to(tl.float32)  # [BLOCK_F, BLOCK_D]
        acc += tl.dot(gt, w, input_precision="ieee")
        g_sum += tl.sum(gt, axis=1)
    dx = x_scale * (acc - x * g_sum[:, None])
    tl.store(_rows(DX, g, H, stride_dx_b, stride_dx_h) + rows[:, None] * stride_dx_n + dims[None, :],
             dx.to(DX.dtype.element_ty), mask=both)


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _row_strides(t):
    """Strides of an operand the feature map reads row-wise (its last dim contiguous)."""
    assert t.shape[-1] <= 1 or t.stride(-1) == 1
    return t.stride(0), t.stride(1), t.stride(2)


def _unit_last(x):
    return x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()


def _block(n):
    return max(16, triton.next_power_of_2(n))


def _column_blocks(E1):
    """Tiles of the outer product and contractions: [BLOCK_R, BLOCK_E] float64 values with
    BLOCK_R·BLOCK_E ≤ 4096. AOT for sm_80 / sm_90 (python -m bench.gpu_report --spec
    kernelized): 32 rows at BLOCK_E = 256 spilled (contract_e 19-20 LDL/STL), at 512 up to
    1140; 4096 values do not."""
    block_e = _block(E1)
    return dict(BLOCK_R=max(1, 4096 // block_e), BLOCK_E=block_e)


def _grid_rows(rows, block_r):
    B, H, N = rows.shape[:3]
    return (B * H, triton.cdiv(N, block_r))


def _check(op, rows, *others):
    _check_device(rows, *others)
    for t in (rows, *others):
        if t.dim() != 4 or t.dtype != rows.dtype:
            raise ValueError(f"{op}: operands must be 4-D of one dtype, got {tuple(t.shape)} {t.dtype} and "
                             f"{tuple(rows.shape)} {rows.dtype}")


def _check_columns(op, x, rows, F):
    """x [B, H, F·E1, ≥ N] against an operand [B, H, N, ·]."""
    _check(op, rows, x)
    if F < 1 or x.shape[2] % F or x.shape[:2] != rows.shape[:2] or x.shape[3] < rows.shape[2]:
        raise ValueError(f"{op}: x {tuple(x.shape)} must be [B, H, F·E1, ≥ N] for F = {F} and [B, H, N, ·] = "
                         f"{tuple(rows.shape)}")


def _col_strides(x):
    """A [B, H, C, n] operand's strides in the kernels' (batch, head, row, column) order."""
    return x.stride(0), x.stride(1), x.stride(3), x.stride(2)


def kz_outer(phi, w, lo, hi, append_phi, n_pad):
    _check("kz_outer", phi, w)
    B, H, N = phi.shape[:3]
    if w.shape[:3] != phi.shape[:3]:
        raise ValueError(f"kz_outer: phi {tuple(phi.shape)} and w {tuple(w.shape)} must share [B, H, N]")
    if not 0 <= lo < hi <= phi.shape[3]:
        raise ValueError(f"kz_outer: feature chunk [{lo}, {hi}) is outside [0, {phi.shape[3]})")
    if n_pad < N:
        raise ValueError(f"kz_outer: n_pad={n_pad} is shorter than the {N} rows")
    E = w.shape[3]
    E1 = E + int(append_phi)
    out = _alloc((B, H, (hi - lo) * E1, n_pad), phi.dtype, phi.device)
    if out.numel():
        blocks = _column_blocks(E1)
        _launch(_kz_outer_kernel, (B * H, triton.cdiv(n_pad, blocks["BLOCK_R"]), hi - lo))(
            out, phi, w, H, N, n_pad, E, E1, lo, *_col_strides(out), *_strides(phi), *_strides(w),
            APPEND_PHI=append_phi, **blocks)
    return out


def kz_contract_f(phi, x, lo, hi):
    if not 0 <= lo < hi <= phi.shape[3]:
        raise ValueError(f"kz_contract_f: feature chunk [{lo}, {hi}) is outside [0, {phi.shape[3]})")
    F = hi - lo
    _check_columns("kz_contract_f", x, phi, F)
    E1 = x.shape[2] // F
    out = _alloc((*phi.shape[:3], E1), phi.dtype, phi.device)
    if out.numel():
        blocks = _column_blocks(E1)
        _launch(_kz_contract_f_kernel, _grid_rows(phi, blocks["BLOCK_R"]))(
            out, phi, x, phi.shape[1], phi.shape[2], E1, lo, F, *_strides(out), *_strides(phi), *_col_strides(x),
            **blocks)
    return out


def kz_contract_e(x, w, F):
    _check_columns("kz_contract_e", x, w, F)
    E1, Ew = x.shape[2] // F, w.shape[3]
    if Ew not in (E1, E1 - 1):
        raise ValueError(f"kz_contract_e: w {tuple(w.shape)} must have E1 = {E1} or E1 − 1 columns for x "
                         f"{tuple(x.shape)}")
    out = _alloc((*w.shape[:3], F), x.dtype, x.device)
    if out.numel():
        blocks = _column_blocks(E1)
        _launch(_kz_contract_e_kernel, _grid_rows(w, blocks["BLOCK_R"]))(
            out, x, w, w.shape[1], w.shape[2], E1, Ew, F, *_strides(out), *_col_strides(x), *_strides(w),
            IMPLICIT_ONE=Ew == E1 - 1, **blocks)
    return out


def _check_prf(op, x, w):
    _check_device(x, w)
    if x.dim() != 4 or not x.dtype.is_floating_point or x.dtype == torch.float64:
        raise ValueError(f"{op}: x must be [B, H, N, D] in float32, float16 or bfloat16, got {tuple(x.shape)} "
                         f"{x.dtype}")
    if w.dim() != 2 or w.shape[1] != x.shape[3] or w.shape[0] < 1:
        raise ValueError(f"{op}: the projection must be [m, {x.shape[3]}], got {tuple(w.shape)}")
    if x.shape[3] > 256:
        raise ValueError(f"{op}: head dim {x.shape[3]} > 256; use backend='cpu' or backend=None")


def _prf_blocks(x, w):
    # AOT-compiled for sm_80 and sm_90 (bf16 x, m = 266, 4 warps): BLOCK_F = 64 spilled at D = 64
    # (query map 19 / 57 LDL+STL, backward 1101 on sm_80); 32 does not there, but does at D = 128
    # (sm_90 query map 80), where 16 does not; D = 256 also needs 16 rows (backward spilled 5)
    d = _block(x.shape[3])
    return dict(BLOCK_R=16 if d > 128 else _BLOCK_R, BLOCK_F=min(32 if d <= 64 else 16, _block(w.shape[0])), BLOCK_D=d)


def kz_prf(x, w, is_query):
    _check_prf("kz_prf", x, w)
    x = _unit_last(x)
    B, H, N, D = x.shape
    m = w.shape[0]
    w = w.to(torch.float32).contiguous()
    phi = _alloc((B, H, N, m), torch.float32, x.device)
    if not phi.numel():
        return phi
    args = (H, N, D, m)
    phi_strides, x_strides = _row_strides(phi), _row_strides(x)
    scalars = (D ** -0.25, m ** -0.5)
    blocks = _prf_blocks(x, w)
    grid = _grid_rows(x, blocks["BLOCK_R"])
    if is_query:
        stab = phi  # not read: each row stabilises itself
    else:
        row_max = _alloc((B * H, N), torch.float32, x.device)
        _launch(_prf_kernel, grid)(phi, row_max, x, w, *args, *phi_strides, *x_strides, w.stride(0), *scalars,
                                   WRITE_PHI=False, ROW_STAB=False, **blocks)
        stab = row_max.amax(dim=1)  # [B·H]: keys share one stabiliser per (batch, head)
    _launch(_prf_kernel, grid)(phi, stab, x, w, *args, *phi_strides, *x_strides, w.stride(0), *scalars,
                               WRITE_PHI=True, ROW_STAB=is_query, **blocks)
    return phi


def kz_prf_bwd(dphi, phi, x, w):
    _check_prf("kz_prf_bwd", x, w)
    if phi.shape != (*x.shape[:3], w.shape[0]) or dphi.shape != phi.shape or phi.dtype != torch.float32:
        raise ValueError(f"kz_prf_bwd: dphi {tuple(dphi.shape)} and phi {tuple(phi.shape)} must be float32 "
                         f"[B, H, N, {w.shape[0]}] for x {tuple(x.shape)}")
    _check_device(dphi, phi)
    x = _unit_last(x)
    B, H, N, D = x.shape
    w = w.to(torch.float32).contiguous()
    phi, dphi = phi.contiguous(), dphi.contiguous()  # one layout for both (the kernel takes one set of strides)
    dx = _alloc(x.shape, x.dtype, x.device)
    if dx.numel():
        blocks = _prf_blocks(x, w)
        _launch(_prf_bwd_kernel, _grid_rows(x, blocks["BLOCK_R"]))(
            dx, dphi, phi, x, w, H, N, D, w.shape[0], *_row_strides(dx), *_row_strides(phi), *_row_strides(x),
            w.stride(0), D ** -0.25, **blocks)
    return dx
