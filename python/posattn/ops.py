"""Kernels as ``torch.library`` custom ops, with fake implementations and registered autograd.

The ops are opaque to autograd and to ``torch.compile``: each one calls a launcher, and the
backward is itself an op. Positions travel as an optional tensor plus an int offset, the
window as two ints (−1: unbounded), softcap as a float (0: off), and the dropout seed as a
0-d int64 CPU tensor so that drawing it needs no ``.item()`` outside the op.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _triton():
    # Imported on first use: importing posattn must not import Triton.
    from posattn import triton_kernels
    return triton_kernels


def _pos(pos: Optional[Tensor], offset: int):
    return offset if pos is None else pos


def _window(left: int, right: int):
    return None if left < 0 and right < 0 else (left, right)


@torch.library.custom_op("posattn::triton_attention_fwd", mutates_args=())
def triton_attention_fwd(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], q_pos: Optional[Tensor],
                         k_pos: Optional[Tensor], q_offset: int, k_offset: int, causal: bool, window_left: int,
                         window_right: int, softcap: float, dropout_p: float, seed: Optional[Tensor],
                         scale: float) -> tuple[Tensor, Tensor]:
    return _triton().attn_fwd(q, k, v, attn_mask, _pos(q_pos, q_offset), _pos(k_pos, k_offset), causal,
                              _window(window_left, window_right), softcap or None, dropout_p,
                              0 if seed is None else int(seed), scale)


@triton_attention_fwd.register_fake
def _(q, k, v, attn_mask, q_pos, k_pos, q_offset, k_offset, causal, window_left, window_right, softcap, dropout_p,
      seed, scale):
    B, H, L, _ = q.shape
    return q.new_empty((B, H, L, v.shape[-1])), q.new_empty((B, H, L), dtype=torch.float32)


@torch.library.custom_op("posattn::triton_attention_bwd", mutates_args=())
def triton_attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                         dlse: Optional[Tensor], attn_mask: Optional[Tensor], q_pos: Optional[Tensor],
                         k_pos: Optional[Tensor], q_offset: int, k_offset: int, causal: bool, window_left: int,
                         window_right: int, softcap: float, dropout_p: float, seed: Optional[Tensor], scale: float,
                         mask_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, dmask = _triton().attn_bwd(
        dout, q, k, v, out, lse, dlse, attn_mask, _pos(q_pos, q_offset), _pos(k_pos, k_offset), causal,
        _window(window_left, window_right), softcap or None, dropout_p, 0 if seed is None else int(seed), scale,
        mask_grad)
    # custom ops cannot return None: an empty tensor stands for "no mask gradient"
    return dq, dk, dv, dmask if dmask is not None else q.new_empty(0)


@triton_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, dlse, attn_mask, q_pos, k_pos, q_offset, k_offset, causal, window_left, window_right,
      softcap, dropout_p, seed, scale, mask_grad):
    dmask = attn_mask.new_empty(attn_mask.shape) if mask_grad else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dmask


_FWD_ARGS = ("q", "k", "v", "attn_mask", "q_pos", "k_pos", "q_offset", "k_offset", "causal", "window_left",
             "window_right", "softcap", "dropout_p", "seed", "scale")


def _setup_context(ctx, inputs, output):
    args = dict(zip(_FWD_ARGS, inputs))
    out, lse = output
    ctx.save_for_backward(args["q"], args["k"], args["v"], out, lse, args["attn_mask"], args["q_pos"],
                          args["k_pos"], args["seed"])
    ctx.params = tuple(args[n] for n in ("q_offset", "k_offset", "causal", "window_left", "window_right",
                                         "softcap", "dropout_p"))
    ctx.scale = args["scale"]
    mask = args["attn_mask"]
    ctx.mask_grad = mask is not None and mask.dtype.is_floating_point and ctx.needs_input_grad[3]
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, attn_mask, q_pos, k_pos, seed = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dmask = triton_attention_bwd(dout, q, k, v, out, lse, dlse, attn_mask, q_pos, k_pos, *ctx.params,
                                             seed, ctx.scale, ctx.mask_grad)
    return (dq, dk, dv, dmask if ctx.mask_grad else None) + (None,) * (len(_FWD_ARGS) - 4)


torch.library.register_autograd("posattn::triton_attention_fwd", _backward, setup_context=_setup_context)
