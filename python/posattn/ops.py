"""Kernels as ``torch.library`` custom ops, with fake implementations and registered autograd.

Two backends share one op signature: ``posattn::triton_attention_{fwd,bwd}`` (defined here,
calling the Triton launchers) and ``posattn::cpu_attention_{fwd,bwd}`` (defined in C++ by the
extension ``posattn._C``; its fake implementations and autograd are registered here when the
extension loads). The ops are opaque to autograd and to ``torch.compile``: each one calls a launcher, and the
backward is itself an op. Positions travel as an optional tensor plus an int offset, the
window as two ints (−1: unbounded), softcap as a float (0: off), and the dropout seed as a
0-d int64 CPU tensor so that drawing it needs no ``.item()`` outside the op (or [seed, row, key]:
the counter's (row, key) offset of element (0, 0), for a block of a longer sequence).

Position specs travel flattened (:class:`posattn.positions.KernelPositions`): the tensors
the kernels read (rotary frequency table, q / k angles, bias parameter, T5 bucket table,
URPE table), ``spec_ints`` = [rope_kind, rotary_dim, interleaved, bias_kind, bias_i0,
bias_i1, bias_i2, urpe_m] and ``rope_scale``.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .positions import KernelPositions


def _load_extension():
    # The extension defines the posattn::cpu_* ops when it loads. A missing or broken build must
    # not break `import posattn`: the error is kept and raised when the CPU backend is asked for.
    try:
        from posattn import _C  # noqa: F401
    except ImportError as e:
        return e
    return None


_C_ERROR = _load_extension()


def cpu_available() -> bool:
    return _C_ERROR is None


def require_cpu_extension():
    if _C_ERROR is not None:
        raise RuntimeError(
            f"backend='cpu' needs the compiled extension posattn._C, which did not load ({_C_ERROR}). Build it with "
            f"`make install` (or `pip install --no-build-isolation -e .` with cmake and ninja installed), or use "
            f"backend='reference'")


def cpu_isa() -> str:
    """The path of the CPU kernels that runs: "amx", "avx512bf16", "avx512", "avx2" or
    "generic" (chosen at run time from the CPU, best first; POSATTN_CPU_ISA forces one).

    "amx" and "avx512bf16" multiply bf16 inputs as bf16 with fp32 sums (AMX tiles, or the
    AVX-512-BF16 dot instructions); "avx512" converts them to fp32 first. fp32 and fp16
    inputs take fp32 products on every AVX-512 path."""
    require_cpu_extension()
    return torch.ops.posattn.cpu_isa()


def cpu_isas() -> list[str]:
    """Every CPU kernel path this machine runs, best first (the values POSATTN_CPU_ISA may take here)."""
    require_cpu_extension()
    return list(torch.ops.posattn.cpu_isas())


def cpu_dropout_mask(seed: int, B: int, H: int, L: int, S: int, dropout_p: float) -> Tensor:
    """The keep-mask (bool [B, H, L, S]) that the CPU kernels draw for ``seed``: the same
    Philox stream as the Triton kernels, so both backends drop the same elements."""
    require_cpu_extension()
    return torch.ops.posattn.cpu_dropout_mask(seed, B, H, L, S, dropout_p)


def _triton():
    # Imported on first use: importing posattn must not import Triton.
    from posattn import triton_kernels
    return triton_kernels


def _pos(pos: Optional[Tensor], offset: int):
    return offset if pos is None else pos


def _seed_state(seed: Optional[Tensor]):
    """The dropout seed tensor as the Triton launchers take it: [seed] → seed, [seed, row, key]
    (a block of a longer sequence, e.g. a ring shard) → that triple."""
    if seed is None:
        return 0
    if seed.numel() not in (1, 3):
        raise ValueError(f"the dropout seed tensor holds 1 value (seed) or 3 (seed, row offset, key offset), got "
                         f"{seed.numel()}")
    return int(seed) if seed.numel() == 1 else tuple(int(x) for x in seed.tolist())


def _window(left: int, right: int):
    return None if left < 0 and right < 0 else (left, right)


def spec_ints(kp: KernelPositions) -> list[int]:
    return [int(kp.rope_kind), int(kp.rotary_dim), int(bool(kp.interleaved)), int(kp.bias_kind),
            *map(int, kp.bias_ints), int(kp.urpe_m)]


def _unflatten(rope_table, q_angles, k_angles, bias_tensor, bias_lut, urpe_table, ints, rope_scale):
    rope_kind, rotary_dim, interleaved, bias_kind, i0, i1, i2, urpe_m = ints
    return KernelPositions(rope_kind=rope_kind, rotary_dim=rotary_dim, interleaved=bool(interleaved),
                           rope_scale=rope_scale, rope_table=rope_table, q_angles=q_angles, k_angles=k_angles,
                           bias_kind=bias_kind, bias_tensor=bias_tensor, bias_lut=bias_lut, bias_ints=(i0, i1, i2),
                           urpe_table=urpe_table, urpe_m=urpe_m)


@torch.library.custom_op("posattn::triton_attention_fwd", mutates_args=())
def triton_attention_fwd(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], q_pos: Optional[Tensor],
                         k_pos: Optional[Tensor], q_offset: int, k_offset: int, causal: bool, window_left: int,
                         window_right: int, softcap: float, dropout_p: float, seed: Optional[Tensor],
                         scale: float, rope_table: Optional[Tensor], q_angles: Optional[Tensor],
                         k_angles: Optional[Tensor], bias_tensor: Optional[Tensor], bias_lut: Optional[Tensor],
                         urpe_table: Optional[Tensor], spec_ints: List[int], rope_scale: float,
                         deterministic: bool) -> tuple[Tensor, Tensor]:
    kp = _unflatten(rope_table, q_angles, k_angles, bias_tensor, bias_lut, urpe_table, spec_ints, rope_scale)
    return _triton().attn_fwd(q, k, v, attn_mask, _pos(q_pos, q_offset), _pos(k_pos, k_offset), causal,
                              _window(window_left, window_right), softcap or None, dropout_p,
                              _seed_state(seed), scale, kp)


@triton_attention_fwd.register_fake
def _fwd_fake(q, k, v, attn_mask, q_pos, k_pos, q_offset, k_offset, causal, window_left, window_right, softcap, dropout_p,
      seed, scale, rope_table, q_angles, k_angles, bias_tensor, bias_lut, urpe_table, spec_ints, rope_scale,
      deterministic):
    B, H, L, _ = q.shape
    return q.new_empty((B, H, L, v.shape[-1])), q.new_empty((B, H, L), dtype=torch.float32)


@torch.library.custom_op("posattn::triton_attention_bwd", mutates_args=())
def triton_attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                         dlse: Optional[Tensor], attn_mask: Optional[Tensor], q_pos: Optional[Tensor],
                         k_pos: Optional[Tensor], q_offset: int, k_offset: int, causal: bool, window_left: int,
                         window_right: int, softcap: float, dropout_p: float, seed: Optional[Tensor], scale: float,
                         rope_table: Optional[Tensor], q_angles: Optional[Tensor], k_angles: Optional[Tensor],
                         bias_tensor: Optional[Tensor], bias_lut: Optional[Tensor], urpe_table: Optional[Tensor],
                         spec_ints: List[int], rope_scale: float, deterministic: bool, mask_grad: bool,
                         angle_grad: bool, bias_grad: bool, urpe_grad: bool) -> List[Tensor]:
    kp = _unflatten(rope_table, q_angles, k_angles, bias_tensor, bias_lut, urpe_table, spec_ints, rope_scale)
    grads = _triton().attn_bwd(
        dout, q, k, v, out, lse, dlse, attn_mask, _pos(q_pos, q_offset), _pos(k_pos, k_offset), causal,
        _window(window_left, window_right), softcap or None, dropout_p, _seed_state(seed), scale,
        mask_grad, kp, (angle_grad, bias_grad, urpe_grad), deterministic)
    return _grad_list(grads, q, q_angles, k_angles)


def _grad_list(grads, q, q_angles, k_angles):
    """The launcher's gradients as the backward ops return them: angle gradients in the angles'
    dtype, and (custom ops cannot return None) an empty tensor for "no gradient"."""
    dq, dk, dv, dmask, dq_angles, dk_angles, dbias, durpe = grads
    if dq_angles is not None:
        dq_angles = dq_angles.to(q_angles.dtype)
    if dk_angles is not None:
        dk_angles = dk_angles.to(k_angles.dtype)
    return [dq, dk, dv, *(g if g is not None else q.new_empty(0) for g in (dmask, dq_angles, dk_angles, dbias, durpe))]


@triton_attention_bwd.register_fake
def _bwd_fake(dout, q, k, v, out, lse, dlse, attn_mask, q_pos, k_pos, q_offset, k_offset, causal, window_left, window_right,
      softcap, dropout_p, seed, scale, rope_table, q_angles, k_angles, bias_tensor, bias_lut, urpe_table, spec_ints,
      rope_scale, deterministic, mask_grad, angle_grad, bias_grad, urpe_grad):
    def like(t, wanted):
        return torch.empty_like(t) if wanted and t is not None else q.new_empty(0)

    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), like(attn_mask, mask_grad),
            like(q_angles, angle_grad), like(k_angles, angle_grad), like(bias_tensor, bias_grad),
            like(urpe_table, urpe_grad)]


_FWD_ARGS = ("q", "k", "v", "attn_mask", "q_pos", "k_pos", "q_offset", "k_offset", "causal", "window_left",
             "window_right", "softcap", "dropout_p", "seed", "scale", "rope_table", "q_angles", "k_angles",
             "bias_tensor", "bias_lut", "urpe_table", "spec_ints", "rope_scale", "deterministic")
# The packed-batch ops take the same arguments with the mask's place held by the prefix sums.
_VARLEN_FWD_ARGS = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", *_FWD_ARGS[4:])
_PARAMS = ("q_offset", "k_offset", "causal", "window_left", "window_right", "softcap", "dropout_p")
_SPEC_TENSORS = ("rope_table", "q_angles", "k_angles", "bias_tensor", "bias_lut", "urpe_table")


def _setup_context(ctx, inputs, output):
    names = _FWD_ARGS if len(inputs) == len(_FWD_ARGS) else _VARLEN_FWD_ARGS
    args = dict(zip(names, inputs))
    out, lse = output
    # the layout tensors: the mask (dense ops) or the two prefix sums (packed ops)
    layout = (args["attn_mask"],) if names is _FWD_ARGS else (args["cu_seqlens_q"], args["cu_seqlens_k"])
    ctx.names, ctx.n_layout = names, len(layout)
    ctx.save_for_backward(args["q"], args["k"], args["v"], out, lse, *layout, args["q_pos"],
                          args["k_pos"], args["seed"], *(args[n] for n in _SPEC_TENSORS))
    ctx.params = tuple(args[n] for n in _PARAMS)
    ctx.scale, ctx.spec_ints, ctx.rope_scale = args["scale"], args["spec_ints"], args["rope_scale"]
    ctx.deterministic = args["deterministic"]
    need = dict(zip(names, ctx.needs_input_grad))
    mask = args.get("attn_mask")
    ctx.mask_grad = mask is not None and mask.dtype.is_floating_point and need["attn_mask"]
    ctx.angle_grad = need["q_angles"] or need["k_angles"]
    ctx.bias_grad = need["bias_tensor"]
    ctx.urpe_grad = need["urpe_table"]
    ctx.set_materialize_grads(False)


def _make_backward(bwd_op):
    def backward(ctx, dout, dlse):
        return _backward(bwd_op, ctx, dout, dlse)
    return backward


def _backward(bwd_op, ctx, dout, dlse):
    q, k, v, out, lse, *saved = ctx.saved_tensors
    layout, (q_pos, k_pos, seed, *specs) = saved[:ctx.n_layout], saved[ctx.n_layout:]
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dmask, dqa, dka, dbias, durpe = bwd_op(
        dout, q, k, v, out, lse, dlse, *layout, q_pos, k_pos, *ctx.params, seed, ctx.scale, *specs,
        ctx.spec_ints, ctx.rope_scale, ctx.deterministic, ctx.mask_grad, ctx.angle_grad, ctx.bias_grad,
        ctx.urpe_grad)
    grads = dict(q=dq, k=dk, v=dv, attn_mask=dmask if ctx.mask_grad else None,
                 q_angles=dqa if ctx.angle_grad else None,
                 k_angles=dka if ctx.angle_grad and specs[2] is not None else None,
                 bias_tensor=dbias if ctx.bias_grad else None, urpe_table=durpe if ctx.urpe_grad else None)
    return tuple(grads.get(name) for name in ctx.names)


torch.library.register_autograd("posattn::triton_attention_fwd", _make_backward(triton_attention_bwd),
                                setup_context=_setup_context)


@torch.library.custom_op("posattn::triton_attention_varlen_fwd", mutates_args=())
def triton_attention_varlen_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                                q_pos: Optional[Tensor], k_pos: Optional[Tensor], q_offset: int, k_offset: int,
                                causal: bool, window_left: int, window_right: int, softcap: float, dropout_p: float,
                                seed: Optional[Tensor], scale: float, rope_table: Optional[Tensor],
                                q_angles: Optional[Tensor], k_angles: Optional[Tensor], bias_tensor: Optional[Tensor],
                                bias_lut: Optional[Tensor], urpe_table: Optional[Tensor], spec_ints: List[int],
                                rope_scale: float, deterministic: bool) -> tuple[Tensor, Tensor]:
    """A packed batch (q [Tq, H, D], cu_seqlens int32 [n+1]): out [Tq, H, Dv], lse [H, Tq]."""
    kp = _unflatten(rope_table, q_angles, k_angles, bias_tensor, bias_lut, urpe_table, spec_ints, rope_scale)
    return _triton().attn_fwd(q, k, v, None, _pos(q_pos, q_offset), _pos(k_pos, k_offset), causal,
                              _window(window_left, window_right), softcap or None, dropout_p,
                              0 if seed is None else int(seed), scale, kp, varlen=(cu_seqlens_q, cu_seqlens_k))


@triton_attention_varlen_fwd.register_fake
def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, *args):
    Tq, H, _ = q.shape
    return q.new_empty((Tq, H, v.shape[-1])), q.new_empty((H, Tq), dtype=torch.float32)


@torch.library.custom_op("posattn::triton_attention_varlen_bwd", mutates_args=())
def triton_attention_varlen_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                dlse: Optional[Tensor], cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                                q_pos: Optional[Tensor], k_pos: Optional[Tensor], q_offset: int, k_offset: int,
                                causal: bool, window_left: int, window_right: int, softcap: float, dropout_p: float,
                                seed: Optional[Tensor], scale: float, rope_table: Optional[Tensor],
                                q_angles: Optional[Tensor], k_angles: Optional[Tensor], bias_tensor: Optional[Tensor],
                                bias_lut: Optional[Tensor], urpe_table: Optional[Tensor], spec_ints: List[int],
                                rope_scale: float, deterministic: bool, mask_grad: bool, angle_grad: bool,
                                bias_grad: bool, urpe_grad: bool) -> List[Tensor]:
    """The backward of the packed forward; returns the dense op's list (the mask slot empty)."""
    kp = _unflatten(rope_table, q_angles, k_angles, bias_tensor, bias_lut, urpe_table, spec_ints, rope_scale)
    grads = _triton().attn_bwd(
        dout, q, k, v, out, lse, dlse, None, _pos(q_pos, q_offset), _pos(k_pos, k_offset), causal,
        _window(window_left, window_right), softcap or None, dropout_p, 0 if seed is None else int(seed), scale,
        False, kp, (angle_grad, bias_grad, urpe_grad), deterministic, varlen=(cu_seqlens_q, cu_seqlens_k))
    return _grad_list(grads, q, q_angles, k_angles)


@triton_attention_varlen_bwd.register_fake
def _varlen_bwd_fake(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, q_pos, k_pos, q_offset, k_offset,
                     causal, window_left, window_right, softcap, dropout_p, seed, scale, rope_table, q_angles,
                     k_angles, bias_tensor, bias_lut, urpe_table, spec_ints, rope_scale, deterministic, mask_grad,
                     angle_grad, bias_grad, urpe_grad):
    return _bwd_fake(dout, q, k, v, out, lse, dlse, None, q_pos, k_pos, q_offset, k_offset, causal, window_left,
                     window_right, softcap, dropout_p, seed, scale, rope_table, q_angles, k_angles, bias_tensor,
                     bias_lut, urpe_table, spec_ints, rope_scale, deterministic, False, angle_grad, bias_grad,
                     urpe_grad)


torch.library.register_autograd("posattn::triton_attention_varlen_fwd", _make_backward(triton_attention_varlen_bwd),
                                setup_context=_setup_context)

def _kz_outer_fake(phi, w, lo, hi, append_phi, n_pad):
    return phi.new_empty((*phi.shape[:2], (hi - lo) * (w.shape[3] + int(append_phi)), n_pad))


def _kz_contract_f_fake(phi, x, lo, hi):
    return phi.new_empty((*phi.shape[:3], x.shape[2] // (hi - lo)))


def _kz_contract_e_fake(x, w, F):
    return x.new_empty((*w.shape[:3], F))


def _kz_prf_fake(x, w, is_query):
    return x.new_empty((*x.shape[:3], w.shape[0]), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)


def _kz_prf_bwd_fake(dphi, phi, x, w):
    return torch.empty_like(x)


# The kernelized attention's fused pieces (python/posattn/kernelized.py): the C++ ops are
# defined by csrc/kernelized.cpp, the Triton ones here, with one signature and fake each.
_KZ_FAKES = {"kz_outer": _kz_outer_fake, "kz_contract_f": _kz_contract_f_fake, "kz_contract_e": _kz_contract_e_fake,
             "kz_prf": _kz_prf_fake, "kz_prf_bwd": _kz_prf_bwd_fake}


@torch.library.custom_op("posattn::triton_kz_outer", mutates_args=())
def triton_kz_outer(phi: Tensor, w: Tensor, lo: int, hi: int, append_phi: bool, n_pad: int) -> Tensor:
    return _triton().kz_outer(phi, w, lo, hi, append_phi, n_pad)


@torch.library.custom_op("posattn::triton_kz_contract_f", mutates_args=())
def triton_kz_contract_f(phi: Tensor, x: Tensor, lo: int, hi: int) -> Tensor:
    return _triton().kz_contract_f(phi, x, lo, hi)


@torch.library.custom_op("posattn::triton_kz_contract_e", mutates_args=())
def triton_kz_contract_e(x: Tensor, w: Tensor, F: int) -> Tensor:
    return _triton().kz_contract_e(x, w, F)


@torch.library.custom_op("posattn::triton_kz_prf", mutates_args=())
def triton_kz_prf(x: Tensor, w: Tensor, is_query: bool) -> Tensor:
    return _triton().kz_prf(x, w, is_query)


@torch.library.custom_op("posattn::triton_kz_prf_bwd", mutates_args=())
def triton_kz_prf_bwd(dphi: Tensor, phi: Tensor, x: Tensor, w: Tensor) -> Tensor:
    return _triton().kz_prf_bwd(dphi, phi, x, w)


for _name, _fake in _KZ_FAKES.items():
    torch.library.register_fake(f"posattn::triton_{_name}")(_fake)
    if _C_ERROR is None:
        torch.library.register_fake(f"posattn::{_name}")(_fake)

if _C_ERROR is None:
    torch.library.register_fake("posattn::cpu_attention_fwd")(_fwd_fake)
    torch.library.register_fake("posattn::cpu_attention_bwd")(_bwd_fake)
    torch.library.register_autograd("posattn::cpu_attention_fwd",
                                    _make_backward(torch.ops.posattn.cpu_attention_bwd.default),
                                    setup_context=_setup_context)
    torch.library.register_fake("posattn::cpu_attention_varlen_fwd")(_varlen_fwd_fake)
    torch.library.register_fake("posattn::cpu_attention_varlen_bwd")(_varlen_bwd_fake)
    torch.library.register_autograd("posattn::cpu_attention_varlen_fwd",
                                    _make_backward(torch.ops.posattn.cpu_attention_varlen_bwd.default),
                                    setup_context=_setup_context)


def varlen_forward_op(backend: str):
    """The packed-batch forward custom op of a kernel backend ("triton" or "cpu")."""
    if backend == "cpu":
        require_cpu_extension()
        return torch.ops.posattn.cpu_attention_varlen_fwd.default
    return triton_attention_varlen_fwd


def forward_op(backend: str):
    """The forward custom op of a kernel backend ("triton" or "cpu")."""
    if backend == "cpu":
        require_cpu_extension()
        return torch.ops.posattn.cpu_attention_fwd.default
    return triton_attention_fwd


def backward_op(backend: str):
    """The backward custom op of a kernel backend: one call computes the gradients of one
    (q rows, key block) pair given the final out and lse, which is how a ring of blocks
    (:mod:`posattn.distributed`) recomputes its blocks."""
    if backend == "cpu":
        require_cpu_extension()
        return torch.ops.posattn.cpu_attention_bwd.default
    return triton_attention_bwd


# --------------------------------------------------------------------------------------------------
# KV-cache decoding (posattn.attention_with_kvcache): the Triton op (triton_kernels/decode.py) and
# posattn::cpu_attention_kvcache (the C++ backend), one schema, one fake.
# --------------------------------------------------------------------------------------------------

@torch.library.custom_op("posattn::triton_attention_kvcache", mutates_args=("k_cache", "v_cache"))
def triton_attention_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor], v: Optional[Tensor],
                             cache_seqlens: Tensor, cache_batch_idx: Optional[Tensor], block_table: Optional[Tensor],
                             causal: bool, window_left: int, window_right: int, softcap: float, scale: float,
                             rope_table: Optional[Tensor], bias_tensor: Optional[Tensor], bias_lut: Optional[Tensor],
                             spec_ints: List[int], rope_scale: float, num_splits: int) -> tuple[Tensor, Tensor]:
    """Attention of q [B, H, L, D] over a KV cache after writing k / v (if given) into it in place:
    out [B, H, L, Dv] (q's dtype), lse [B, H, L] (fp32, natural log). Forward only."""
    kp = _unflatten(rope_table, None, None, bias_tensor, bias_lut, None, spec_ints, rope_scale)
    return _triton().kvcache_fwd(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, causal,
                                 _window(window_left, window_right), softcap or None, scale, kp, num_splits)


@triton_attention_kvcache.register_fake
def _kvcache_fake(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, causal, window_left,
                  window_right, softcap, scale, rope_table, bias_tensor, bias_lut, spec_ints, rope_scale, num_splits):
    B, H, L, _ = q.shape
    return q.new_empty((B, H, L, v_cache.shape[-1])), q.new_empty((B, H, L), dtype=torch.float32)


if _C_ERROR is None:
    torch.library.register_fake("posattn::cpu_attention_kvcache")(_kvcache_fake)


def kvcache_op(backend: str):
    """The KV-cache decode op of a kernel backend ("triton" or "cpu"); it appends to the caches in place."""
    if backend == "cpu":
        require_cpu_extension()
        return torch.ops.posattn.cpu_attention_kvcache.default
    return triton_attention_kvcache
