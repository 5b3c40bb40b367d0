"""Input validation shared by :func:`posattn.attention` and :func:`posattn.reference.attention`.

Every error names the offending value and the fix.
"""
from __future__ import annotations

import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_positions(pos, name: str, batch: int, length: int, device: torch.device):
    """``pos`` is an int offset or an integer tensor of shape (L,), (1, L) or (B, L)."""
    if _is_int(pos):
        if not -(2**30) <= pos <= 2**30:
            raise ValueError(f"{name}={pos} is out of range: positions must lie within ±2**30")
        return
    if not isinstance(pos, torch.Tensor):
        raise TypeError(f"{name} must be an int offset or an integer tensor, got {type(pos).__name__}")
    if pos.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32/int64 tensor of positions, got dtype {pos.dtype}; "
                        f"convert it with .long()")
    ok_shapes = [(length,), (1, length), (batch, length)]
    if tuple(pos.shape) not in ok_shapes:
        raise ValueError(f"{name} has shape {tuple(pos.shape)}; expected ({length},) or ({batch}, {length}) "
                         f"(one position per row of the sequence)")
    if pos.device != device:
        raise ValueError(f"{name} is on {pos.device} but the inputs are on {device}; move it with .to({device})")


def positions_tensor(pos, batch: int, length: int, device) -> torch.Tensor:
    """Positions as an int64 tensor of shape (B or 1, L)."""
    if _is_int(pos):
        return (pos + torch.arange(length, device=device, dtype=torch.int64))[None]
    pos = pos.to(torch.int64)
    return pos[None] if pos.dim() == 1 else pos


def check_attention_inputs(q, k, v, *, window=None, attn_mask=None, softcap=None, dropout_p=0.0, scale=None,
                           q_pos=0, k_pos=0):
    """Shapes, dtypes and devices of posattn.attention's inputs (see its docstring)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            layout = "[B, H, L, D]" if name == "q" else "[B, Hkv, S, D]" if name == "k" else "[B, Hkv, S, Dv]"
            raise ValueError(f"{name} must be 4-D {layout}, got shape {tuple(t.shape)}; for other layouts use "
                             f"posattn.scaled_dot_product_attention")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; posattn takes float16, bfloat16, float32 or float64")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, L, D = q.shape
    Bk, Hkv, S, Dk = k.shape
    if Bk != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {B}, k {Bk}, v {v.shape[0]}")
    if v.shape[1] != Hkv or v.shape[2] != S:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree in heads and length (dims 1, 2)")
    if Dk != D:
        raise ValueError(f"q has head dim {D} but k has {Dk}; q and k must share the head dim")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"q has {H} heads but k/v have {Hkv}; the query heads must be a multiple of the "
                         f"key/value heads (grouped-query attention)")
    if D == 0 or v.shape[3] == 0:
        raise ValueError(f"empty head dim: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; head "
                         f"dims must be ≥ 1")
    if window is not None:
        if (not isinstance(window, (tuple, list)) or len(window) != 2 or not all(_is_int(w) for w in window)
                or any(w < -1 for w in window)):
            raise ValueError(f"window={window!r} must be a pair of ints (left, right), each ≥ 0 or -1 for "
                             f"unbounded")
    if softcap is not None and not (isinstance(softcap, numbers.Real) and softcap > 0):
        raise ValueError(f"softcap={softcap!r} must be a positive number (or None)")
    if not (isinstance(dropout_p, numbers.Real) and 0.0 <= dropout_p <= 1.0):
        raise ValueError(f"dropout_p={dropout_p!r} must lie in [0, 1]")
    if scale is not None and not isinstance(scale, numbers.Real):
        raise TypeError(f"scale={scale!r} must be a number or None (None means 1/sqrt(D))")
    check_positions(q_pos, "q_pos", B, L, q.device)
    check_positions(k_pos, "k_pos", B, S, q.device)
    if attn_mask is not None:
        check_mask(attn_mask, (B, H, L, S), q)


def broadcasts_to(shape, full) -> bool:
    """True when a tensor of ``shape`` broadcasts to exactly ``full`` (no more dims than it)."""
    try:
        return len(shape) <= len(full) and torch.broadcast_shapes(shape, full) == torch.Size(full)
    except RuntimeError:
        return False


def check_mask(attn_mask, shape4, q):
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a tensor, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
        raise TypeError(f"attn_mask has dtype {attn_mask.dtype}; use a bool mask (True = takes part) or a float "
                        f"mask (added to the scores)")
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but the inputs are on {q.device}")
    if not broadcasts_to(attn_mask.shape, shape4):
        raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to [B, H, L, S] = "
                         f"{list(shape4)}")
