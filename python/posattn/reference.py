"""The dense oracle: the whole score pipeline of docs/semantics.md in plain PyTorch.

Any device, any floating dtype (float64 for tests), autograd for every gradient. It
materialises the (B, H, L, S) scores, so it is O(L·S) in memory: it is the definition
that the kernels are tested against, and the ``"reference"`` backend.

Position encodings plug in through their spec objects (``python/posattn/positions.py``):
a rotary spec rotates q and k (``spec.reference_rotate(q, k, q_pos, k_pos)``), a bias spec returns its dense
additive bias (``spec.reference_bias``), a URPE spec its post-softmax gate
(``spec.reference_gate``). Adding a spec adds a case there, not here.
"""
from __future__ import annotations

import math

import torch

from ._checks import check_attention_inputs, positions_tensor
from .positions import check_specs


def visibility(q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool, window) -> torch.Tensor | None:
    """Bool (B or 1, 1, L, S): which keys each query sees under causal / window (None: all)."""
    qp = q_pos[:, None, :, None]
    kp = k_pos[:, None, None, :]
    keep = None

    def both(a, b):
        return b if a is None else a & b

    if causal:
        keep = both(keep, kp <= qp)
    if window is not None:
        left, right = window
        if left >= 0:
            keep = both(keep, kp >= qp - left)
        if right >= 0:
            keep = both(keep, kp <= qp + right)
    return keep


def attention(q, k, v, *, causal=False, window=None, attn_mask=None, rope=None, bias=None, urpe=None, softcap=None,
              dropout_p=0.0, scale=None, q_pos=0, k_pos=0, return_lse=False, dropout_mask=None, deterministic=False):
    """Dense attention with posattn's exact semantics (see :func:`posattn.attention`, also
    for the rule on NaN and ±inf inputs).

    ``dropout_mask``: optional bool keep-mask broadcastable to [B, H, L, S] to use instead of
    drawing one (True keeps); the tests pass the kernels' own mask here to compare dropout
    exactly. ``deterministic`` is accepted for symmetry with :func:`posattn.attention`
    (the dense path always is). Returns out [B, H, L, Dv] (and lse [B, H, L] in q's dtype,
    natural log).
    """
    check_attention_inputs(q, k, v, window=window, attn_mask=attn_mask, softcap=softcap, dropout_p=dropout_p,
                           scale=scale, q_pos=q_pos, k_pos=k_pos)
    check_specs(rope, bias, urpe, q)
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    qp = positions_tensor(q_pos, B, L, q.device)
    kp = positions_tensor(k_pos, B, S, q.device)

    # 1. rotary encodings act on q and k themselves
    if rope is not None:
        q, k = rope.reference_rotate(q, k, qp, kp)
    if H != Hkv:
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    # 2. scaled scores
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, L, S]
    # 3. softcap, on the scaled scores alone (FlashAttention's and Gemma2's order)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    # 4. position bias
    if bias is not None:
        s = s + bias.reference_bias(qp, kp, H).to(s.dtype)
    # 5. float mask
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        s = s + attn_mask.to(s.dtype)
    # 6. masking to −inf (a −inf float-mask entry masks like a False one, whatever the score)
    keep = visibility(qp, kp, causal, window)
    if attn_mask is not None:
        mask_keep = attn_mask if attn_mask.dtype == torch.bool else ~torch.isneginf(attn_mask)
        keep = mask_keep if keep is None else keep & mask_keep
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    # a non-finite value in v_j acts as a NaN score of key j in the rows that see it
    bad = ~torch.isfinite(v)
    s = s.masked_fill(bad.any(-1)[:, :, None, :] & ~torch.isneginf(s), float("nan"))
    # 7. softmax; a fully masked row gives p = 0 and lse = −inf. Its scores are replaced by
    # zeros first so that neither the forward nor the backward ever sees NaN.
    dead = torch.isneginf(s).all(dim=-1, keepdim=True)
    s_safe = s.masked_fill(dead, 0.0)
    lse = torch.logsumexp(s_safe, dim=-1, keepdim=True)
    p = torch.exp(s_safe - lse).masked_fill(dead, 0.0)
    # a +inf score gives lse = +inf (and p = NaN at it): the row is NaN, lse included
    lse = lse.masked_fill(dead, float("-inf")).masked_fill(torch.isposinf(lse), float("nan")).squeeze(-1)
    # 8. URPE gate (after the normaliser)
    if urpe is not None:
        p = p * urpe.reference_gate(qp, kp, H).to(p.dtype)
    # 9. dropout
    if dropout_p > 0.0:
        if dropout_mask is None:
            dropout_mask = torch.rand(p.shape, device=p.device) >= dropout_p
        p = p * dropout_mask.to(p.dtype) / (1.0 - dropout_p) if dropout_p < 1.0 else p * 0.0
    # 10. output; v's non-finite values count as 0 here (the rows that see them are NaN
    # already; a plain product would give 0·NaN = NaN also in rows where their key is masked)
    out = torch.matmul(p.to(v.dtype), v.masked_fill(bad, 0.0))
    return (out, lse) if return_lse else out


def kernelized_attention(q, k, v, *, rpe=None, causal=False, feature_map="prf", projection=None, num_features=None,
                         eps=1e-6, normalize_qk=False):
    """Dense O(L·S) oracle of :func:`posattn.kernelized_attention`: the explicit Toeplitz C.

    A_ij = C_ij·(φ(q_i)·φ(k_j)), z = A·v / (A·1 + eps), C_ij = c_{j−i} (1 without ``rpe``;
    0 for j > i when causal). Same feature maps as the fast path. eps is in the formula's
    units: A is computed from stabilised φ and c (a constant factor e^{−s_i} per row, which
    cancels), so eps is scaled by the same factor.
    """
    from .kernelized import _row_eps, check_kernelized_inputs, features, rpe_coefficients

    check_kernelized_inputs(q, k, v, rpe, causal, feature_map, projection, num_features, eps)
    phi_q, phi_k, log_scale = features(q, k, feature_map, projection, num_features, normalize_qk)
    H, Hkv = q.shape[1], k.shape[1]
    if H != Hkv:
        phi_k, v = phi_k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    L, S = q.shape[2], k.shape[2]
    if rpe is not None:
        c = rpe_coefficients(rpe.table, L, S, causal, phi_q.dtype)  # [H, L+S−1], index r + L − 1
        r = torch.arange(S, device=q.device)[None, :] - torch.arange(L, device=q.device)[:, None]
        C = c[:, r + L - 1][None]  # [1, H, L, S]
    else:
        C = torch.ones(L, S, dtype=phi_q.dtype, device=q.device)
        if causal:
            C = torch.tril(C)
    A = C * (phi_q @ phi_k.transpose(-1, -2))
    row_eps = _row_eps(eps, log_scale, None if rpe is None else rpe.table).to(A.dtype)
    return (A @ v.to(A.dtype)) / (A.sum(-1, keepdim=True) + row_eps[..., None])
