"""``posattn.nn``: attention layers for plain PyTorch models, positions computed inside the kernel.

:class:`Attention` is a multi-head (grouped-query) attention layer: q/k/v/o projections, a
``positions=`` spec or list of specs (RoPE, XPos, ALiBi, RelativeBias, T5Bias, ManhattanDecay,
URPE) whose tables, slopes and log-decays become ``nn.Parameter``\\ s of the layer (learnable, saved
in its ``state_dict``), causal / sliding-window masking, softcap, dropout, and a
:class:`KVCache` for step-by-step decoding. The forward is free of data-dependent Python control
flow, so ``torch.compile`` traces it in one graph.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from . import functional
from .positions import BIAS_SPECS, ROTARY_SPECS, URPE, ALiBi, ManhattanDecay, RelativeBias, T5Bias

__all__ = ["Attention", "KVCache"]

# the tensor field of each learnable spec
_LEARNABLE = {ALiBi: "slopes", RelativeBias: "table", T5Bias: "table", ManhattanDecay: "log_gamma", URPE: "table"}


class KVCache:
    """Keys and values of the tokens seen so far, [B, Hkv, S, D] each, for :class:`Attention`.

    One cache per layer. The layer appends the new keys and values at every call; the queries
    of a call sit at positions ``S_before … S_before + L − 1`` (bottom-right). Keys are cached
    before any rotation (RoPE rotates them inside the kernel at their positions).
    """

    def __init__(self):
        self.k = self.v = None

    def __len__(self):
        return 0 if self.k is None else self.k.shape[2]

    def update(self, k, v):
        """Append k, v [B, Hkv, L, D]; returns all keys and values."""
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k, self.v = torch.cat((self.k, k), dim=2), torch.cat((self.v, v), dim=2)
        return self.k, self.v


class Attention(nn.Module):
    """Multi-head attention with in-kernel positions: ``o_proj(attention(q_proj x, k_proj x, v_proj x))``.

    ``embed_dim``: model width. ``num_heads`` query heads of ``head_dim`` (default
    embed_dim // num_heads); ``num_kv_heads`` key/value heads (default num_heads; fewer = GQA,
    num_heads a multiple of it). ``positions``: None, one spec or a list of specs — at most one
    rotary (RoPE / XPos), one bias (ALiBi / RelativeBias / T5Bias / ManhattanDecay) and one URPE.
    A bias or URPE spec's tensor (slopes, table, log_gamma) becomes a parameter of this layer,
    learnable unless ``learnable_positions=False`` (then a buffer); it must have ``num_heads`` rows.
    ``causal``: mask future keys (bottom-right with a cache). ``window``: (left, right) as in
    :func:`posattn.attention`. ``softcap``, ``dropout`` (applied in training mode only), ``scale``
    (default 1/√head_dim), ``bias``: whether the projections have biases. ``backend``: as in
    :func:`posattn.attention`.

    ``forward(x, *, cache=None, attn_mask=None, pos=None)``: x [B, L, embed_dim] → [B, L, embed_dim].
    ``cache``: a :class:`KVCache` to decode with (new keys are appended; queries are the last L
    positions). ``attn_mask``: bool or float, broadcastable to [B, H, L, S]. ``pos``: the
    position of the first query (default: the cache's length, or 0).
    """

    def __init__(self, embed_dim, num_heads, num_kv_heads=None, head_dim=None, *, positions=None, causal=False,
                 window=None, softcap=None, dropout=0.0, scale=None, bias=True, learnable_positions=True,
                 backend=None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"Attention: num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        head_dim = embed_dim // num_heads if head_dim is None else head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.causal, self.window, self.softcap, self.dropout = causal, window, softcap, dropout
        self.scale, self.backend = scale, backend
        self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=bias)
        self.rope = self._bias_spec = self._urpe_spec = None
        specs = [] if positions is None else list(positions) if isinstance(positions, (list, tuple)) else [positions]
        for spec in specs:
            if isinstance(spec, ROTARY_SPECS):
                slot = "rope"
            elif isinstance(spec, BIAS_SPECS):
                slot = "_bias_spec"
            elif isinstance(spec, URPE):
                slot = "_urpe_spec"
            else:
                raise TypeError(f"Attention positions: {spec!r} is not a posattn spec (RoPE, XPos, ALiBi, "
                                f"RelativeBias, T5Bias, ManhattanDecay, URPE)")
            if getattr(self, slot) is not None:
                raise ValueError(f"Attention positions: two {slot.strip('_').replace('_spec', '')} specs; pass at "
                                 f"most one rotary, one bias and one URPE spec")
            if isinstance(spec, ROTARY_SPECS[2:]):
                raise TypeError("Attention positions: RotaryAngles depend on the input; call posattn.attention "
                                "directly for them")
            if slot != "rope":
                field = _LEARNABLE[type(spec)]
                tensor = getattr(spec, field).detach().clone().float()
                if tensor.shape[0] != num_heads:
                    raise ValueError(f"Attention positions: {type(spec).__name__}.{field} has {tensor.shape[0]} rows "
                                     f"but the layer has num_heads={num_heads}")
                name = "position_" + ("urpe" if slot == "_urpe_spec" else field)
                if learnable_positions:
                    setattr(self, name, nn.Parameter(tensor))
                else:
                    self.register_buffer(name, tensor)
                spec = (spec, field, name)
            setattr(self, slot, spec)

    def _spec(self, slot):
        if slot is None:
            return None
        spec, field, name = slot
        return dataclasses.replace(spec, **{field: getattr(self, name)})

    def forward(self, x, *, cache=None, attn_mask=None, pos=None):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        start = len(cache) if (pos is None and cache is not None) else (pos or 0)
        k_start = start
        if cache is not None:
            k_start = start - len(cache)
            k, v = cache.update(k, v)
        out = functional.attention(q, k, v, causal=self.causal, window=self.window, attn_mask=attn_mask, rope=self.rope,
                                   bias=self._spec(self._bias_spec), urpe=self._spec(self._urpe_spec),
                                   softcap=self.softcap, dropout_p=self.dropout if self.training else 0.0,
                                   scale=self.scale, q_pos=start, k_pos=k_start, backend=self.backend)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim))
