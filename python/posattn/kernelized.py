"""Kernelized attention with relative positions in O(N log N) (Luo et al., NeurIPS 2021).

    z_i = φ(q_i)ᵀ Σ_j c_{j−i} φ(k_j) v_jᵀ  /  (φ(q_i)ᵀ Σ_j c_{j−i} φ(k_j) + eps)

with c_r = exp(table[h, clamp(r, −M, M) + M]) from a :class:`~posattn.RelativeBias`
(r = k_pos − q_pos, positions arange(L) and arange(S); c_r = 0 for r > 0 when causal).
C_ij = c_{j−i} is Toeplitz, so every product with it is a convolution computed with
``torch.fft`` on a circulant embedding of length ≥ L + S − 1 (docs/math.md §6). The
Toeplitz core is one autograd Function whose backward (docs/math.md §6) recomputes the
forward's products piece by piece (:func:`_chunks`) and obtains the table's gradient as one
cross-correlation from the same spectra, so memory stays O(N·piece) rather than O(N²).
The pieces around the FFTs (outer products, contractions) and the "prf" feature map come
from a backend's fused kernels (:func:`kernel_ops`) or from PyTorch ops.

Without ``rpe`` (c ≡ 1) this is plain linear attention, O(N).

eps is in the formula's own (unstabilised) units. The code computes with stabilised factors,
φ(q_i)·e^{−a_i}, φ(k_j)·e^{−b} and c_r·e^{−t} (a_i, b the "prf" map's stabilisers, t the
table's max; all cancel in the ratio), so its denominator is the formula's times
e^{−(a_i + b + t)}, and eps enters it as eps·e^{−(a_i + b + t)} (:func:`_row_eps`).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from ._checks import FLOAT_DTYPES
from .positions import RelativeBias

FEATURE_MAPS = ("prf", "elu", "relu")

# Feature columns per FFT chunk are chosen so one chunk's spectra stay near this size.
_CHUNK_BYTES = 64 * 2**20


def orthogonal_projection(num_features, head_dim, device=None, dtype=torch.float32, generator=None):
    """The PRF projection W (num_features, head_dim): blocks of head_dim mutually orthogonal
    Gaussian directions, each row rescaled to the norm of an independent Gaussian vector
    (Performer's FAVOR+, scenic's ``scaling=0``). Drawn from torch's global generator unless
    ``generator`` is given, so ``torch.manual_seed`` makes it reproducible."""
    if not (isinstance(num_features, int) and num_features >= 1 and isinstance(head_dim, int) and head_dim >= 1):
        raise ValueError(f"orthogonal_projection: num_features={num_features!r} and head_dim={head_dim!r} must be "
                         f"positive ints")
    blocks = []
    for _ in range(math.ceil(num_features / head_dim)):
        g = torch.randn(head_dim, head_dim, dtype=torch.float64, generator=generator)
        qmat, _ = torch.linalg.qr(g)
        blocks.append(qmat.T)
    w = torch.cat(blocks)[:num_features]
    norms = torch.randn(num_features, head_dim, dtype=torch.float64, generator=generator).norm(dim=1)
    return (w * norms[:, None]).to(device=device, dtype=dtype)


def feature_map(x, kind, projection, is_query):
    """φ(x) [..., m] for x [B, H, N, D] (autograd flows through).

    "prf": m^{-1/2}·exp(W·x̃ − ‖x̃‖²/2 − stabiliser) with x̃ = x·D^{-1/4}; the stabiliser is
    the row max for queries and one max per (batch, head) for keys, both constant factors
    that cancel between numerator and denominator. "elu": elu(x) + 1. "relu": relu(x).
    A callable is applied as is.
    """
    if callable(kind):
        return kind(x)
    if kind == "elu":
        return torch.nn.functional.elu(x) + 1.0
    if kind == "relu":
        return torch.relu(x)
    D = x.shape[-1]
    xs = x * D ** -0.25
    proj = xs @ projection.to(x.dtype).T  # [B, H, N, m]
    logits = proj - 0.5 * (xs * xs).sum(-1, keepdim=True)
    if is_query:
        stab = logits.amax(dim=-1, keepdim=True)
    else:
        stab = logits.amax(dim=(-2, -1), keepdim=True)
    return torch.exp(logits - stab.detach()) / math.sqrt(projection.shape[0])


def _rpe_index(r, M):
    """The table column of each relative offset r (clamped to the table's ±M)."""
    return r.clamp(-M, M) + M


def rpe_coefficients(table, L, S, causal, dtype):
    """c_r for r = −(L−1) … S−1 as [H, L+S−1] (index r + L − 1), scaled by exp(−max table)
    per head. That factor cancels in the ratio, so it is a constant to autograd, like the
    feature maps' stabilisers (∂c_r/∂table[h, j] = c_r·[index(r) = j])."""
    M = (table.shape[1] - 1) // 2
    r = torch.arange(-(L - 1), S, device=table.device)
    t = table.to(dtype)
    c = torch.exp(t[:, _rpe_index(r, M)] - t.amax(dim=1, keepdim=True).detach())
    if causal:
        c = c * (r <= 0).to(dtype)
    return c


def _fft_size(L, S):
    n = L + S - 1
    return 1 << max(0, (n - 1).bit_length())


def _kernel_spectrum(c, L, S, N, transpose):
    """rfft of the circulant first column that applies C (or Cᵀ) by convolution.

    C x: y_i = Σ_j c_{j−i} x_j = (h ⊛ x)_i with h[s] = c_{−s}, s = i − j ∈ (−S, L).
    Cᵀ y: x_j = Σ_i c_{j−i} y_i = (h' ⊛ y)_j with h'[s] = c_s, s = j − i ∈ (−L, S).
    """
    H = c.shape[0]
    col = c.new_zeros(H, N)
    idx_zero = L - 1  # c[:, idx_zero + r] is c_r
    if not transpose:
        col[:, :L] = c[:, idx_zero - torch.arange(L, device=c.device)]  # h[k] = c_{−k}, k ∈ [0, L)
        if S > 1:
            col[:, N - (S - 1):] = c[:, idx_zero + torch.arange(S - 1, 0, -1, device=c.device)]  # h[N−k] = c_k
    else:
        col[:, :S] = c[:, idx_zero + torch.arange(S, device=c.device)]  # h'[k] = c_k, k ∈ [0, S)
        if L > 1:
            col[:, N - (L - 1):] = c[:, idx_zero - torch.arange(L - 1, 0, -1, device=c.device)]  # h'[N−k] = c_{−k}
    return torch.fft.rfft(col, n=N, dim=-1)  # [H, N/2 + 1]


def _chunks(G, m, e1, N):
    """(heads, lo, hi): the pieces the Toeplitz products run in, each with spectra of about
    ``_CHUNK_BYTES`` or less: a range of features for every (batch, head) while one feature
    of all of them fits, else one feature for as many (batch, head) slices as fit (at least
    one: a single slice's (N/2 + 1) × e1 spectrum is the floor)."""
    unit = (N // 2 + 1) * 16 * e1  # bytes of one feature's complex128 spectra in one slice
    budget = max(1, _CHUNK_BYTES // unit)
    g_step, f_step = (G, min(m, budget // G)) if budget >= G else (budget, 1)
    for g0 in range(0, G, g_step):
        for lo in range(0, m, f_step):
            yield slice(g0, min(G, g0 + g_step)), lo, min(m, lo + f_step)


class _ToeplitzKernelized(torch.autograd.Function):
    """z = (φq · C(φk ⊗ v)) / (φq · C φk + eps), its custom backward and the table's gradient.

    Works on [1, G, N, ·] views with G = B·H (batch and heads folded), so the chunks of
    :func:`_chunks` can split them; ``ops`` supplies the outer products and contractions
    around the FFTs (fused kernels of a backend, or PyTorch ops). ``eps``: a number, or one
    per query row [B, H, L] (a constant to autograd, see :func:`_row_eps`); C here is scaled
    by e^{−max table}, which :func:`_row_eps` accounts for."""

    @staticmethod
    def forward(ctx, phi_q, phi_k, v, table, causal, eps, ops):
        B, H, L, m = phi_q.shape
        S, dv = phi_k.shape[2], v.shape[-1]
        G, N = B * H, _fft_size(L, S)
        pq, pk, vv = phi_q.reshape(1, G, L, m), phi_k.reshape(1, G, S, m), v.reshape(1, G, S, dv)
        c = rpe_coefficients(table, L, S, causal, phi_q.dtype)
        spec = _kernel_spectrum(c, L, S, N, transpose=False).repeat(B, 1)[None, :, None]  # [1, G, 1, N/2+1]
        nd = phi_q.new_zeros(1, G, L, dv + 1)  # [numerator, denominator]
        for g, lo, hi in _chunks(G, m, dv + 1, N):
            kv = torch.fft.rfft(ops.outer(pk[:, g], vv[:, g], lo, hi, True, N), dim=-1)  # φk⊗[v, 1]
            d = torch.fft.irfft(kv.mul_(spec[:, g]), n=N, dim=-1)[..., :L]  # C(φk⊗[v, 1])
            nd[:, g] += ops.contract_f(pq[:, g], d, lo, hi)
        den = nd[..., dv] + (eps.reshape(1, G, L) if isinstance(eps, torch.Tensor) else eps)
        z = (nd[..., :dv] / den[..., None]).view(B, H, L, dv)
        ctx.save_for_backward(phi_q, phi_k, v, table, c, z, den.view(B, H, L))
        ctx.causal, ctx.ops = causal, ops
        return z

    @staticmethod
    def backward(ctx, dz):
        phi_q, phi_k, v, table, c, z, den = ctx.saved_tensors
        ops = ctx.ops
        B, H, L, m = phi_q.shape
        S, dv = phi_k.shape[2], v.shape[-1]
        G, N = B * H, _fft_size(L, S)
        pq, pk, vv = phi_q.reshape(1, G, L, m), phi_k.reshape(1, G, S, m), v.reshape(1, G, S, dv)
        spec = _kernel_spectrum(c, L, S, N, transpose=False).repeat(B, 1)[None, :, None]
        spec_t = _kernel_spectrum(c, L, S, N, transpose=True).repeat(B, 1)[None, :, None]
        dnum = dz / den[..., None]  # [B, H, L, dv]
        dden = -(dz * z).sum(-1) / den  # [B, H, L]
        da = torch.cat((dnum, dden[..., None]), dim=-1).view(1, G, L, dv + 1)  # gradient pairs with [v, 1]
        d_phi_q = torch.empty_like(pq)
        d_phi_k = torch.empty_like(pk)
        d_v = torch.zeros_like(vv)
        corr = torch.zeros(G, N // 2 + 1, dtype=spec.dtype, device=spec.device)
        for g, lo, hi in _chunks(G, m, dv + 1, N):
            kv = torch.fft.rfft(ops.outer(pk[:, g], vv[:, g], lo, hi, True, N), dim=-1)  # φk⊗[v, 1]
            qa = torch.fft.rfft(ops.outer(pq[:, g], da[:, g], lo, hi, False, N), dim=-1)  # φq⊗[dnum, dden]
            if table.requires_grad:
                # ∂/∂c_r = Σ_{j−i=r} (φq⊗a)_i · (φk⊗[v,1])_j: a cross-correlation, summed over the
                # features in frequency space, from the same spectra the products below use
                corr[g] += torch.linalg.vecdot(qa, kv, dim=-2)[0]
            # dφq_i = Σ_e C(φk⊗[v,1])_i[l, e] · [dnum, dden]_ie
            d1 = torch.fft.irfft(kv.mul_(spec[:, g]), n=N, dim=-1)[..., :L]
            d_phi_q[:, g, :, lo:hi] = ops.contract_e(d1, da[:, g], hi - lo)
            # dφk_j = Σ_e Cᵀ(φq⊗[dnum, dden])_j[l, e] · [v, 1]_je ; dv_j = Σ_l φk_jl · Cᵀ(φq⊗dnum)_j[l]
            t1 = torch.fft.irfft(qa.mul_(spec_t[:, g]), n=N, dim=-1)[..., :S]
            d_phi_k[:, g, :, lo:hi] = ops.contract_e(t1, vv[:, g], hi - lo)  # v's implicit 1 takes t1[..., dv]
            d_v[:, g] += ops.contract_f(pk[:, g], t1, lo, hi)[..., :dv]
        d_table = None
        if table.requires_grad:
            xcorr = torch.fft.irfft(corr, n=N, dim=-1).view(B, H, N)  # index r ≥ 0 at r, r < 0 at N + r
            r = torch.arange(-(L - 1), S, device=phi_q.device)
            dc = xcorr[:, :, r % N].sum(0)  # [H, L+S−1]: ∂/∂c_r
            d_table = torch.zeros(table.shape, dtype=dc.dtype, device=dc.device).index_add_(
                1, _rpe_index(r, (table.shape[1] - 1) // 2), dc * c).to(table.dtype)
        return (d_phi_q.view_as(phi_q), d_phi_k.view_as(phi_k), d_v.view_as(v), d_table, None, None, None)


def _linear_attention(phi_q, phi_k, v, causal, eps):
    """c ≡ 1: plain linear attention in O(N) (prefix sums when causal, top-left aligned);
    ``eps`` a number or one per query row [B, H, L]."""
    if not causal:
        kv = torch.einsum("bhsm,bhsd->bhmd", phi_k, v)
        num = torch.einsum("bhlm,bhmd->bhld", phi_q, kv)
        den = torch.einsum("bhlm,bhm->bhl", phi_q, phi_k.sum(2))
    else:
        # query i sees keys j ≤ i (top-left); rows past the last key see all of them
        L, S = phi_q.shape[2], phi_k.shape[2]
        kv = torch.cumsum(phi_k[..., None] * v[..., None, :], dim=2)  # [B, H, S, m, dv]
        ks = torch.cumsum(phi_k, dim=2)
        rows = torch.arange(L, device=phi_q.device).clamp(max=S - 1)
        num = torch.einsum("bhlm,bhlmd->bhld", phi_q, kv[:, :, rows])
        den = torch.einsum("bhlm,bhlm->bhl", phi_q, ks[:, :, rows])
    return num / (den + eps)[..., None]


def _row_eps(eps, log_scale, table):
    """eps in the units of the stabilised denominator, one per query row [B, H, L] (float64).

    The stabilised features and coefficients are the formula's times e^{−s_i} with
    s_i = ``log_scale`` (the feature maps' stabilisers, :func:`features`) + max of the head's
    table (:func:`rpe_coefficients`), so eps becomes eps·e^{−s_i}. The stabilisers are
    constants to autograd, and the ratio with this eps equals the formula's for every value
    of them, so the gradients are the formula's too. A large negative s_i overflows to inf:
    the denominator is then eps-dominated and z = 0, the formula's limit."""
    if table is not None:
        log_scale = log_scale + table.detach().to(torch.float64).amax(dim=1)[None, :, None]
    return torch.exp(-log_scale) * eps if eps else torch.zeros_like(log_scale)


def check_kernelized_inputs(q, k, v, rpe, causal, feature_map_kind, projection, num_features, eps):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"kernelized_attention: {name} must be a 4-D float tensor [B, heads, length, dim], got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    if not (q.dtype == k.dtype == v.dtype and q.device == k.device == v.device):
        raise ValueError("kernelized_attention: q, k, v must share one dtype and device")
    B, H, L, D = q.shape
    if k.shape[0] != B or v.shape[0] != B or k.shape[3] != D or k.shape[1:3] != v.shape[1:3]:
        raise ValueError(f"kernelized_attention: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         f"do not fit [B, H, L, D], [B, Hkv, S, D], [B, Hkv, S, Dv]")
    if L == 0 or k.shape[2] == 0:
        raise ValueError(f"kernelized_attention: empty sequence (L={L}, S={k.shape[2]}); both must be ≥ 1")
    if k.shape[1] == 0 or H % k.shape[1]:
        raise ValueError(f"kernelized_attention: q has {H} heads but k/v have {k.shape[1]}; the query heads must be "
                         f"a multiple of the key/value heads")
    if rpe is not None:
        if not isinstance(rpe, RelativeBias):
            raise TypeError(f"kernelized_attention: rpe={rpe!r} must be posattn.RelativeBias(table) (or None)")
        rpe.check(B, H, q.device)
    if not (callable(feature_map_kind) or feature_map_kind in FEATURE_MAPS):
        raise ValueError(f"kernelized_attention: feature_map={feature_map_kind!r}; choose one of {FEATURE_MAPS} or "
                         f"pass a callable")
    if feature_map_kind == "prf" and projection is not None:
        if projection.dim() != 2 or projection.shape[1] != D:
            raise ValueError(f"kernelized_attention: projection has shape {tuple(projection.shape)}; expected "
                             f"(num_features, {D})")
        if num_features is not None and num_features != projection.shape[0]:
            raise ValueError(f"kernelized_attention: num_features={num_features} but projection has "
                             f"{projection.shape[0]} rows")
    if num_features is not None and not (isinstance(num_features, int) and num_features >= 1):
        raise ValueError(f"kernelized_attention: num_features={num_features!r} must be a positive int")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"kernelized_attention: eps={eps!r} must be a number ≥ 0")


def default_num_features(head_dim):
    """Performer's default: m = ⌈D·ln D⌉ (at least D)."""
    return max(head_dim, math.ceil(head_dim * math.log(max(head_dim, 2))))


def features(q, k, feature_map_kind, projection, num_features, normalize_qk, backend=None):
    """φ(q) [B, H, L, m], φ(k) [B, Hkv, S, m] (the projection drawn if needed), and the log of
    the factor the stabilisers took out of φ(q_i)·φ(k_j), one per query row [B, H, L] in
    float64 (0 for maps without stabiliser): the formula's product is the returned one times
    e^{log_scale_i}.

    With ``backend`` "cpu" or "triton", "prf" runs as that backend's fused kernels (one
    projection GEMM with the norm, stabiliser, exp and scale around it; the backward one GEMM
    as well) in fp32 (fp64 for fp64 inputs), and returns φ in that precision; otherwise
    (and for the element-wise maps) :func:`feature_map` in PyTorch ops, the definition."""
    if normalize_qk:
        q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        k = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if feature_map_kind == "prf" and projection is None:
        projection = orthogonal_projection(num_features or default_num_features(q.shape[-1]), q.shape[-1],
                                           device=q.device, dtype=q.dtype)
    if feature_map_kind == "prf" and backend is not None:
        ops = kernel_ops(backend)
        phi_q, phi_k = _FusedPRF.apply(q, projection, True, ops), _FusedPRF.apply(k, projection, False, ops)
    else:
        phi_q = feature_map(q, feature_map_kind, projection, True)
        phi_k = feature_map(k, feature_map_kind, projection, False)
    B, H, L = q.shape[:3]
    if feature_map_kind != "prf":
        return phi_q, phi_k, torch.zeros(B, H, L, dtype=torch.float64, device=q.device)
    stab_k = _prf_stabiliser(k, phi_k, projection, False).repeat_interleave(H // k.shape[1], dim=1)  # [B, H]
    return phi_q, phi_k, _prf_stabiliser(q, phi_q, projection, True) + stab_k[..., None]


def _prf_stabiliser(x, phi, projection, is_query):
    """The stabiliser that the "prf" map subtracted (float64): per row [B, H, N] for queries,
    per (batch, head) [B, H] for keys. φ's largest entry is exp(0)/√m, so the stabiliser is
    that feature's logit w_l·x̃ − ‖x̃‖²/2, recomputed here for the one feature: O(N·(m + D)),
    not a second projection, and the same for the fused kernels (which keep it to themselves)
    and for :func:`feature_map`."""
    xs = x.detach().to(torch.float64) * x.shape[-1] ** -0.25  # [B, H, N, D]
    w = projection.detach().to(torch.float64)
    if is_query:
        return (w[phi.detach().argmax(-1)] * xs).sum(-1) - 0.5 * (xs * xs).sum(-1)
    m = phi.shape[-1]
    flat = phi.detach().flatten(-2).argmax(-1)  # [B, H]: row · m + feature
    rows = xs.gather(2, (flat // m)[..., None, None].expand(-1, -1, 1, xs.shape[-1])).squeeze(2)  # [B, H, D]
    return (w[flat % m] * rows).sum(-1) - 0.5 * (rows * rows).sum(-1)


class KernelOps(NamedTuple):
    """The fused pieces of one backend (signatures and semantics of csrc/kernelized.cpp). The
    FFTs' operands hold one sequence per column c = f·E1 + e: [B, H, F·E1, n], so that every
    FFT runs over contiguous memory."""
    outer: Callable  # (phi, w, lo, hi, append_phi, n_pad) -> φ[.., lo:hi] ⊗ [w, (1)] zero-padded [B, H, F·E1, n_pad]
    contract_f: Callable  # (phi, x, lo, hi) -> Σ_f φ[n, lo+f] · x[f·E1 + e, n]  [B, H, N, E1]
    contract_e: Callable  # (x, w, F) -> Σ_e x[f·E1 + e, n] · w[n, e] (+ x[f·E1 + E1−1, n])  [B, H, N, F]
    prf: Callable = None  # (x, W, is_query) -> φ(x)  [B, H, N, m]
    prf_bwd: Callable = None  # (dφ, φ, x, W) -> dx  [B, H, N, D]


def _outer(phi, w, lo, hi, append_phi, n_pad):
    f = phi[..., lo:hi, None]
    out = f * w[..., None, :]
    out = (torch.cat((out, f), dim=-1) if append_phi else out).flatten(-2).transpose(-1, -2)
    return torch.nn.functional.pad(out, (0, n_pad - phi.shape[2]))


def _rows_view(x, n):
    """x [B, H, F·E1, ≥ n] as [B, H, n, F·E1]."""
    return x[..., :n].transpose(-1, -2)


def _contract_f(phi, x, lo, hi):
    return (phi[..., lo:hi, None] * _rows_view(x, phi.shape[2]).unflatten(-1, (hi - lo, -1))).sum(-2)


def _contract_e(x, w, F):
    x = _rows_view(x, w.shape[2]).unflatten(-1, (F, -1))
    E = w.shape[-1]
    out = (x[..., :E] * w[..., None, :]).sum(-1)
    return out + x[..., E] if x.shape[-1] == E + 1 else out


# The same pieces in broadcast PyTorch ops (any device; the fused kernels are tested against them)
TORCH_OPS = KernelOps(_outer, _contract_f, _contract_e)


def kernel_ops(backend):
    """The :class:`KernelOps` of a backend: "cpu" (posattn._C), "triton", or None (PyTorch ops)."""
    if backend is None:
        return TORCH_OPS
    from . import ops
    if backend == "cpu":
        ops.require_cpu_extension()
        o = torch.ops.posattn
        return KernelOps(o.kz_outer, o.kz_contract_f, o.kz_contract_e, o.kz_prf, o.kz_prf_bwd)
    if backend == "triton":
        return KernelOps(ops.triton_kz_outer, ops.triton_kz_contract_f, ops.triton_kz_contract_e, ops.triton_kz_prf,
                         ops.triton_kz_prf_bwd)
    raise ValueError(f"kernel_ops: backend={backend!r}; choose None, 'cpu' or 'triton'")


class _FusedPRF(torch.autograd.Function):
    """φ(x) of :func:`feature_map`'s "prf" through a backend's fused kernels. The stabiliser
    is a constant here as there (it cancels), so dx = D^{-1/4}·(g·W − x̃·Σ_l g_l) and
    dW = gᵀ·x̃ with g = dφ ⊙ φ and x̃ = x·D^{-1/4}."""

    @staticmethod
    def forward(ctx, x, projection, is_query, ops):
        phi = ops.prf(x, projection, is_query)
        ctx.save_for_backward(x, projection, phi)
        ctx.ops = ops
        return phi

    @staticmethod
    def backward(ctx, dphi):
        x, projection, phi = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = ctx.ops.prf_bwd(dphi.contiguous(), phi, x, projection)
        if ctx.needs_input_grad[1]:  # W is a fixed random matrix in FAVOR+, but a learnt one gets its gradient
            xs = x.to(phi.dtype) * x.shape[-1] ** -0.25
            dw = ((dphi * phi).flatten(0, -2).T @ xs.flatten(0, -2)).to(projection.dtype)
        return dx, dw, None, None


def kernelized(phi_q, phi_k, v, rpe, causal, eps, backend=None, log_scale=None):
    """The O(N log N) path on given features (GQA by repeating φ(k) and v per group).

    ``log_scale`` [B, H, L]: what :func:`features` returns with stabilised features (None:
    the features are the formula's own), so that eps is the formula's. ``backend``: whose
    fused kernels form the outer products φ(k)⊗[v, 1] that feed the FFTs and the
    contractions after them ("cpu": posattn._C; "triton"), or None for broadcast PyTorch
    ops."""
    groups = phi_q.shape[1] // phi_k.shape[1]
    if groups > 1:
        phi_k, v = phi_k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if log_scale is None:
        log_scale = torch.zeros(phi_q.shape[:3], dtype=torch.float64, device=phi_q.device)
    row_eps = _row_eps(eps, log_scale, None if rpe is None else rpe.table)
    if rpe is None:
        compute = torch.float64 if phi_q.dtype == torch.float64 else torch.float32
        pq, pk, vv = (t.to(compute) for t in (phi_q, phi_k, v))
        return _linear_attention(pq, pk, vv, causal, row_eps.to(compute)).to(v.dtype)
    # The circulant products run in float64 whatever the input dtype: an FFT's round-off is
    # absolute (≈ ε·‖c‖·‖x‖), so in float32 it swamps rows whose denominator is small, such
    # as the first rows of causal attention (measured at L = 130: 1.3e-4 against dense
    # float32's 1.2e-6).
    pq, pk, vv = (t.to(torch.float64) for t in (phi_q, phi_k, v))
    z = _ToeplitzKernelized.apply(pq, pk, vv, rpe.table, bool(causal), row_eps, kernel_ops(backend))
    return z.to(v.dtype)
