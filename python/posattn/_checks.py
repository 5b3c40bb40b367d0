"""Input validation shared by :func:`posattn.attention` and :func:`posattn.reference.attention`.

Every error names the offending value and the fix.
"""
from __future__ import annotations

import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_int(x) -> bool:
    return type(x) is int or (isinstance(x, numbers.Integral) and not isinstance(x, bool))


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


def check_cu_seqlens(cu, name: str, device) -> None:
    """The shape, dtype and device of a prefix-sum tensor [n+1] (its values: :func:`check_cu_values`)."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be an int32 tensor of prefix sums [n+1], got {type(cu).__name__}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name} has shape {tuple(cu.shape)}; it must be 1-D [n+1] (0, then the running total of "
                         f"the n sequence lengths), e.g. torch.tensor([0, 3, 7], dtype=torch.int32)")
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} has dtype {cu.dtype}; it must be int32 (int64 is accepted): convert it with "
                        f".to(torch.int32)")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but the inputs are on {device}; move it with .to({device})")


def check_cu_values(values: list, name: str, total: int, rows: str) -> None:
    """Prefix sums as a list on the host: 0 first, non-decreasing, the total number of rows last."""
    if values[0] != 0:
        raise ValueError(f"{name}[0] = {values[0]}; prefix sums start at 0 (prepend a 0)")
    for i in range(len(values) - 1):
        if values[i + 1] < values[i]:
            raise ValueError(f"{name} decreases at index {i + 1} ({values[i]} -> {values[i + 1]}); it must be the "
                             f"non-decreasing prefix sums of the sequence lengths (torch.cumsum of the lengths, "
                             f"with a leading 0)")
    if values[-1] != total:
        raise ValueError(f"{name}[-1] = {values[-1]} but {rows} has {total} rows; the last prefix sum is the total "
                         f"number of packed rows")


def check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, window=None,
                        softcap=None, dropout_p=0.0, scale=None, q_pos=None, k_pos=None):
    """Shapes, dtypes and devices of posattn.attention_varlen's inputs (no device sync: the
    values of cu_seqlens are checked by :func:`check_cu_values` where they are read)."""
    for name, t, layout in (("q", q, "[Tq, H, D]"), ("k", k, "[Tk, Hkv, D]"), ("v", v, "[Tk, Hkv, Dv]")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"attention_varlen: {name} must be 3-D {layout} (the sequences' rows packed along "
                             f"dim 0), got shape {tuple(t.shape)}; for [B, H, L, D] batches use posattn.attention")
    Tq, H, D = q.shape
    Tk, Hkv, _ = k.shape
    if v.shape[0] != Tk or v.shape[1] != Hkv:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree in rows and heads (dims 0, 1)")
    # the remaining checks (dtypes, devices, head dims, GQA, window, softcap, dropout, scale)
    # are posattn.attention's, on [1, H, T, D] views
    check_attention_inputs(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                           window=window, softcap=softcap, dropout_p=dropout_p, scale=scale)
    check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.device)
    check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", q.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q describes {cu_seqlens_q.numel() - 1} sequences but cu_seqlens_k "
                         f"{cu_seqlens_k.numel() - 1}; every sequence has queries and keys (an empty one has "
                         f"equal consecutive entries)")
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if m is not None and not (_is_int(m) and m >= 0):
            raise TypeError(f"{name}={m!r} must be a Python int ≥ 0 (the longest sequence) or None")
    for name, pos, total, rows in (("q_pos", q_pos, Tq, "Tq"), ("k_pos", k_pos, Tk, "Tk")):
        if pos is None:
            continue
        if not isinstance(pos, torch.Tensor) or pos.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"attention_varlen: {name} must be an int32/int64 tensor [{rows}] of positions (one per "
                            f"packed row) or None, got {getattr(pos, 'dtype', type(pos).__name__)}")
        if tuple(pos.shape) != (total,):
            raise ValueError(f"attention_varlen: {name} has shape {tuple(pos.shape)}; expected ({total},), one "
                             f"position per packed row ({rows} = {total})")
        if pos.device != q.device:
            raise ValueError(f"{name} is on {pos.device} but the inputs are on {q.device}; move it with "
                             f".to({q.device})")
