"""Hugging Face transformers: ``attn_implementation="posattn"`` and positions computed inside the kernel.

Two calls::

    from posattn.integrations.transformers import fuse_positions, register
    register()                                           # once: "posattn" in AttentionInterface + its mask function
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="posattn")
    fuse_positions(model)                                # optional: RoPE / ALiBi / T5 bias inside the kernel

``register()`` adds an attention function and a mask function under the name "posattn". The mask
function never builds an L×S mask: it hands the attention function the 2-D padding mask (B, S)
(or None without padding); causal masking, sliding windows and packed sequences are
reconstructed from positions inside the kernel. Query and key positions are bottom-right (the
queries are the last L of the S keys, as with a ``DynamicCache``).

``fuse_positions(model)`` patches one model instance (reversibly: :func:`unfuse_positions`) so
that its position encoding runs inside the kernel instead of as dense tensors:

- Llama-family rotary (Llama, Mistral, Qwen2, Qwen3, Gemma2, Gemma3): the kernel rotates q and k
  with the model's own ``inv_freq`` and ``attention_scaling`` (so every ``rope_type``), read at
  each call; the KV cache then holds un-rotated keys and posattn keeps their positions;
- T5 / mT5: every self-attention layer reads block 0's ``relative_attention_bias`` table as an
  in-kernel :class:`posattn.T5Bias` (gradients flow into that table); no (1, H, L, S) bias exists;
- Bloom: ALiBi as an in-kernel :class:`posattn.ALiBi` with HF's slopes and HF's positions
  (``(attention_mask.cumsum(-1) − 1)·attention_mask``).

Importing :mod:`posattn` never imports this module (or transformers).
"""
from __future__ import annotations

import torch

from .. import decode, functional
from ..positions import ALiBi, RoPE, T5Bias

NAME = "posattn"

# T5 layers receive this instead of a dense (1, H, L, S) position_bias once fused: the stock
# forward then skips compute_bias and hands the (empty) tensor on to the next layer.
_NO_DENSE_BIAS = torch.empty(0)

_ROPE_ATTENTION = {"LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention", "Gemma2Attention",
                   "Gemma3Attention"}
_T5_ATTENTION = {"T5Attention", "MT5Attention"}
_ALIBI_ATTENTION = {"BloomAttention"}

# The mask patterns of transformers' masking_utils that the kernel reconstructs from positions
# (the mask function checks every pattern it is handed against these, by qualified name).
_MASK_LEAVES = {"causal_mask_function", "bidirectional_mask_function", "sliding_window_overlay.<locals>.inner_mask",
                "sliding_window_bidirectional_overlay.<locals>.inner_mask",
                "packed_sequence_mask_function.<locals>.inner_mask", "padding_mask_function.<locals>.inner_mask"}
_MASK_COMBINERS = {"and_masks.<locals>.and_mask", "remap_positions_for_packed_sequence.<locals>.inner_mask"}


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - the tests run with transformers installed
        raise ImportError("posattn.integrations.transformers needs Hugging Face transformers: "
                          "pip install transformers") from e
    return transformers


def register():
    """Register ``"posattn"`` in transformers' ``AttentionInterface`` and ``AttentionMaskInterface``.

    Idempotent. Afterwards ``from_pretrained(..., attn_implementation="posattn")`` or
    ``model.set_attn_implementation("posattn")`` runs every attention layer that goes through
    the interface with :func:`posattn.attention` (padded batches, GQA, sliding windows, softcap,
    T5's position bias, decoding with a ``DynamicCache``) or ``posattn.attention_varlen`` (packed
    sequences: ``cu_seq_lens_*`` kwargs, or ``position_ids`` that restart).
    """
    _transformers()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask_function)


# --------------------------------------------------------------------------------------------------
# the mask function
# --------------------------------------------------------------------------------------------------

def _check_mask_pattern(fn, seen=None):
    """Raise unless ``fn`` is built only from the patterns posattn reconstructs from positions."""
    name = getattr(fn, "__qualname__", type(fn).__name__)
    if name in _MASK_LEAVES:
        return
    if name not in _MASK_COMBINERS:
        raise NotImplementedError(
            f"attn_implementation='posattn' cannot express the mask pattern {name!r} (posattn builds causal, "
            f"bidirectional, sliding-window, padding and packed-sequence masks from positions; chunked attention, "
            f"block-wise or custom or_mask/and_mask overlays are not supported): use attn_implementation='sdpa' for "
            f"this model")
    for cell in fn.__closure__ or ():
        value = cell.cell_contents
        for inner in value if isinstance(value, tuple) else (value,):
            if callable(inner) and not isinstance(inner, torch.Tensor):
                _check_mask_pattern(inner)


def mask_function(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
                  **kwargs):
    """transformers' mask hook for "posattn": the 2-D padding mask (B, kv_length) bool, or None.

    Never materialises an L×S mask. The pattern (``mask_function``) must be one the kernel
    rebuilds from positions: causal, bidirectional, sliding window, padding, packed sequences.
    """
    if mask_function is not None:
        _check_mask_pattern(mask_function)
    if int(q_offset) + q_length != int(kv_offset) + kv_length and getattr(mask_function, "__qualname__", "") != \
            "bidirectional_mask_function":
        raise NotImplementedError(
            f"attn_implementation='posattn': the cache holds {kv_length} key slots for queries at "
            f"{int(q_offset)}…{int(q_offset) + q_length - 1} (a pre-allocated StaticCache); posattn decodes with "
            f"bottom-right positions: use a DynamicCache (the default of generate)")
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        return attention_mask  # an already prepared 4-D mask goes to the attention function as it is
    mask = attention_mask.to(torch.bool)[:, -kv_length:]
    if mask.shape[1] < kv_length:
        raise ValueError(f"attn_implementation='posattn': the attention_mask covers {mask.shape[1]} tokens but the "
                         f"keys are {kv_length}; pass a mask over the whole sequence (cache included)")
    return None if bool(mask.all()) else mask


# --------------------------------------------------------------------------------------------------
# the attention function
# --------------------------------------------------------------------------------------------------

def _reject_unsupported(kwargs):
    if kwargs.get("output_attentions"):
        raise NotImplementedError("attn_implementation='posattn' never forms the attention matrix, so it cannot "
                                  "return it: use output_attentions=False, or attn_implementation='eager'")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("attn_implementation='posattn' does not support attention sinks (s_aux, e.g. "
                                  "gpt-oss) yet: use attn_implementation='eager' or 'sdpa' for this model")
    cache = kwargs.get("cache")
    if cache is not None or kwargs.get("block_table") is not None:
        raise NotImplementedError(f"attn_implementation='posattn' does not support continuous batching's paged "
                                  f"cache ({type(cache).__name__}); use generate() with a DynamicCache")


# The last position_ids looked at and what was found: every layer of a forward receives the same
# tensor, so the scan (and its device sync) runs once per forward, not once per layer.
_LAST_PACKING = [None, None, None]


def _packed_cu_seqlens(position_ids, B, L):
    """Sequence starts where position_ids do not step by one (and at every row start), as int32
    cu_seqlens over the B·L tokens, with the longest sequence; None when nothing restarts."""
    seen, version, found = _LAST_PACKING
    if seen is position_ids and version == (position_ids._version, B):
        return found
    found = _scan_packing(position_ids, B, L)
    _LAST_PACKING[:] = [position_ids, (position_ids._version, B), found]
    return found


def _scan_packing(position_ids, B, L):
    pid = position_ids.expand(B, L)
    restart = torch.ones(B, L, dtype=torch.bool, device=pid.device)
    restart[:, 1:] = pid[:, 1:] != pid[:, :-1] + 1
    if not bool(restart[:, 1:].any()):
        return None, None
    starts = restart.reshape(-1).nonzero().squeeze(1)
    cu = torch.cat((starts, starts.new_tensor([B * L]))).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _varlen(query, key, value, cu_q, cu_k, max_q, max_k, **kw):
    import posattn
    B, H, L, D = query.shape
    S, Hkv = key.shape[2], key.shape[1]
    q = query.transpose(1, 2).reshape(B * L, H, D)
    k = key.transpose(1, 2).reshape(B * S, Hkv, D)
    v = value.transpose(1, 2).reshape(B * S, Hkv, value.shape[-1])
    out = posattn.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kw)
    return out.view(B, L, H, value.shape[-1])


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      sliding_window=None, softcap=None, position_bias=None, **kwargs):
    """transformers' attention hook for "posattn".

    query [B, H, L, D], key/value [B, Hkv, S, D] (HF's layout after the cache update); returns
    (out [B, L, H, Dv], None). Positions are bottom-right (queries are the last L keys).
    ``attention_mask``: what :func:`mask_function` returned (2-D padding mask or None), or a
    prepared 4-D mask (bool or additive float, used as given, as SDPA does). ``position_bias``
    (T5's dense bias) is added as a float mask unless :func:`fuse_positions` moved it into the
    kernel. ``sliding_window`` keeps keys with ``q − k < sliding_window`` (causal) or
    ``|q − k| ≤ sliding_window`` (bidirectional), as transformers' masks do.
    """
    _reject_unsupported(kwargs)
    B, H, L, _ = query.shape
    S = key.shape[2]
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    fusion = getattr(module, "_posattn_fusion", None)
    pad = mask4 = None
    if attention_mask is not None:
        if attention_mask.dim() == 2:
            if attention_mask.shape[1] < S:
                raise ValueError(f"attn_implementation='posattn': a padding mask of {attention_mask.shape[1]} keys "
                                 f"for {S} keys")
            pad = attention_mask[:, -S:].to(torch.bool)
        elif attention_mask.dim() == 4:
            mask4, causal, sliding_window = attention_mask, False, None  # prepared masks carry their own pattern
        else:
            raise ValueError(f"attn_implementation='posattn' takes a 2-D padding mask or a prepared 4-D mask, got "
                             f"attention_mask of shape {tuple(attention_mask.shape)}")
    window = None
    if sliding_window is not None:
        window = (int(sliding_window) - 1, 0) if causal else (int(sliding_window), int(sliding_window))

    rope = bias = None
    q_pos, k_pos = S - L, 0
    if fusion is not None:
        if position_bias is not None and position_bias is not _NO_DENSE_BIAS:
            raise RuntimeError(f"{type(module).__name__} is fused (posattn computes its position bias) but received "
                               f"a dense position_bias; call unfuse_positions(model) before running it unfused")
        position_bias = None
        rope, bias = fusion.rope(), fusion.bias()
        if rope is not None:
            q_pos, k_hist = kwargs["posattn_positions"]
            if k_hist.shape[1] < S:
                raise RuntimeError(f"{type(module).__name__}: posattn knows the positions of {k_hist.shape[1]} keys "
                                   f"but the cache returned {S}; fill the cache only after fuse_positions(model)")
            k_pos = k_hist[:, -S:]
    elif position_bias is not None:
        # not fused: the dense bias is a float mask (padding folded in as −inf)
        m = position_bias
        if pad is not None:
            m = m.masked_fill(~pad[:, None, None, :], float("-inf"))
        elif mask4 is not None:
            m = m.masked_fill(~mask4, float("-inf")) if mask4.dtype == torch.bool else m + mask4
        pad, mask4 = None, m
    attn_mask = mask4 if mask4 is not None else (pad[:, None, None, :] if pad is not None else None)
    common = dict(causal=causal, window=window, rope=rope, bias=bias, softcap=softcap, dropout_p=float(dropout),
                  scale=scaling)

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    position_ids = kwargs.get("position_ids")
    if cu_q is not None or cu_k is not None:
        cu_q = cu_k if cu_q is None else cu_q
        cu_k = cu_q if cu_k is None else cu_k
        if attn_mask is not None:
            raise ValueError("attn_implementation='posattn': cu_seq_lens_* describe packed sequences; pass them "
                             "without an attention_mask")
        flat = _flat_positions(q_pos, k_pos, rope)
        out = _varlen(query, key, value, cu_q.to(torch.int32), cu_k.to(torch.int32), kwargs.get("max_length_q"),
                      kwargs.get("max_length_k"), **common, **flat)
        return out, None
    if position_ids is not None and position_ids.dim() == 2 and position_ids.shape[-1] == L and attn_mask is None \
            and L > 1:
        cu, longest = _packed_cu_seqlens(position_ids, B, L)
        if cu is not None:
            if S != L:
                raise ValueError(f"attn_implementation='posattn': position_ids restart inside the batch (packed "
                                 f"sequences) but the cache already holds {S - L} tokens; pack sequences only into "
                                 f"an empty cache")
            out = _varlen(query, key, value, cu, cu, longest, longest, **common, **_flat_positions(q_pos, k_pos, rope))
            return out, None
    if _decode_step(query, key, value, pad if mask4 is None else mask4, rope, q_pos, k_pos, dropout):
        # a few new queries over the cache, no gradient: the decode kernel reads each cached row once
        # for the whole GQA group (the keys sit at 0 .. S−1, the queries at S − L ..: bottom-right)
        out = decode.attention_with_kvcache(query, key, value, cache_seqlens=S, causal=causal, window=window,
                                             bias=bias, softcap=softcap, scale=scaling)
    else:
        out = functional.attention(query, key, value, attn_mask=attn_mask, q_pos=q_pos, k_pos=k_pos, **common)
    return out.transpose(1, 2).contiguous(), None


DECODE_MAX_QUERIES = 16


def _decode_step(query, key, value, mask, rope, q_pos, k_pos, dropout):
    """A step attention_with_kvcache computes as it is: up to DECODE_MAX_QUERIES queries after a
    cache, no padding (``mask``: the 2-D padding mask, all True, or None), the keys already rotated
    by the model (no fused rotary), default positions, no dropout, nothing that needs a gradient."""
    L, S = query.shape[2], key.shape[2]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if not (1 <= L <= DECODE_MAX_QUERIES and S > L and rope is None and not dropout and not needs_grad
            and isinstance(q_pos, int) and q_pos == S - L and isinstance(k_pos, int) and k_pos == 0
            and key.stride(-1) == 1 and value.stride(-1) == 1):
        return False
    return mask is None or (mask.dim() == 2 and mask.dtype == torch.bool and bool(mask.all()))


def _flat_positions(q_pos, k_pos, rope):
    """Packed q_pos/k_pos for the varlen kernel: the rotary positions of each token (fused RoPE),
    else None (positions restart per sequence)."""
    if rope is None:
        return {}
    return dict(q_pos=q_pos.reshape(-1), k_pos=k_pos.reshape(-1))


# --------------------------------------------------------------------------------------------------
# fuse_positions
# --------------------------------------------------------------------------------------------------

class _Fusion:
    """What a fused attention module computes inside the kernel: a rotary spec and/or a bias spec,
    built at each call from the model's live tensors (its inv_freq, its bias table)."""

    def __init__(self, rope=None, bias=None):
        self._rope, self._bias = rope, bias

    def rope(self):
        return self._rope() if self._rope is not None else None

    def bias(self):
        return self._bias() if self._bias is not None else None


def _rope_getter(rotary, layer_type):
    if layer_type is not None and hasattr(rotary, f"{layer_type}_inv_freq"):  # Gemma3: one rotation per layer type
        return lambda: RoPE(inv_freq=getattr(rotary, f"{layer_type}_inv_freq"),
                            attention_factor=float(getattr(rotary, f"{layer_type}_attention_scaling")))
    return lambda: RoPE(inv_freq=rotary.inv_freq, attention_factor=float(rotary.attention_scaling))


def _key_positions(cache, layer_idx, q_pos):
    """The positions of every key this layer attends to: the query positions of each call, kept
    on the cache object (the cache holds un-rotated keys once RoPE is fused)."""
    if cache is None:
        return q_pos
    store = cache.__dict__.setdefault("_posattn_key_positions", {})
    prev = store.get(layer_idx)
    seen = int(cache.get_seq_length(layer_idx))
    if prev is None and seen:
        raise RuntimeError(f"fuse_positions: the cache already holds {seen} tokens of layer {layer_idx} whose "
                           f"positions posattn never saw (it was filled before fuse_positions); start a new cache")
    if prev is not None and prev.shape[1] != seen:
        if prev.shape[1] < seen:
            raise RuntimeError(f"fuse_positions: layer {layer_idx}'s cache holds {seen} tokens but posattn saw the "
                               f"positions of {prev.shape[1]}; fill the cache through the fused model only")
        prev = prev[:, :seen]  # the cache was cropped (assisted decoding)
    keys = q_pos if prev is None else torch.cat((prev.expand(q_pos.shape[0], -1), q_pos), dim=1)
    store[layer_idx] = keys
    return keys


def _patch_rope_attention(module, rotary, undo):
    original = module.forward

    def forward(hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            raise ValueError(f"fuse_positions: {type(module).__name__} was called without position_ids, which the "
                             f"in-kernel rotation needs")
        B, L = hidden_states.shape[:2]
        q_pos = position_ids.expand(B, L)
        kwargs["posattn_positions"] = (q_pos, _key_positions(past_key_values, module.layer_idx, q_pos))
        # The stock forward rotates with (cos, sin) = (1, 0): q and k pass through unchanged, and
        # the kernel rotates them at their positions.
        one = hidden_states.new_ones(1, 1)
        return original(hidden_states, position_embeddings=(one, torch.zeros_like(one)),
                        attention_mask=attention_mask, past_key_values=past_key_values, **kwargs)

    module.forward = forward
    module._posattn_fusion = _Fusion(rope=_rope_getter(rotary, getattr(module, "layer_type", None)))
    undo.append(lambda: (module.__dict__.pop("forward", None), module.__dict__.pop("_posattn_fusion", None)))


def _patch_t5_attention(module, table_owner, undo):
    original = module.forward

    def forward(hidden_states, mask=None, key_value_states=None, position_bias=None, past_key_values=None, **kwargs):
        return original(hidden_states, mask=mask, key_value_states=key_value_states, position_bias=_NO_DENSE_BIAS,
                        past_key_values=past_key_values, **kwargs)

    if table_owner is None:  # cross-attention: T5 adds no position bias there
        fusion = _Fusion()
    else:
        emb = table_owner.relative_attention_bias
        fusion = _Fusion(bias=lambda: T5Bias(emb.weight.t(), bidirectional=not table_owner.is_decoder,
                                             max_distance=table_owner.relative_attention_max_distance))
    module.forward = forward
    module._posattn_fusion = fusion
    undo.append(lambda: (module.__dict__.pop("forward", None), module.__dict__.pop("_posattn_fusion", None)))


def _alibi_positions(attention_mask, L, S):
    """(bool key mask or None, query positions, key positions) of HF's ALiBi models: positions count
    the non-padding tokens (``(mask.cumsum − 1)·mask``, as build_alibi_tensor), queries are the last L."""
    if attention_mask is None:
        return None, S - L, 0
    pad = attention_mask[:, -S:].to(torch.bool)
    pos = (pad.long().cumsum(-1) - 1) * pad
    return pad[:, None, None, :], pos[:, -L:], pos


def _patch_bloom_attention(module, undo):
    from transformers.models.bloom import modeling_bloom

    def forward(hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False,
                output_attentions=False, **kwargs):
        if output_attentions:
            _reject_unsupported({"output_attentions": True})
        if module.beta != 1.0 or (module.pretraining_tp > 1 and module.slow_but_exact):
            raise NotImplementedError("fuse_positions: BloomAttention with beta != 1 or slow_but_exact tensor "
                                      "parallelism is not supported")
        B, L, _ = hidden_states.shape
        q, k, v = module._reshape(module.query_key_value(hidden_states))
        if layer_past is not None:
            k, v = layer_past.update(k, v, module.layer_idx)
        attn_mask, q_pos, k_pos = _alibi_positions(attention_mask, L, k.shape[2])
        # HF's own slopes, from HF's own function (its API differs across versions): positions 0, 1
        slopes = modeling_bloom.build_alibi_tensor(hidden_states.new_ones(1, 2), module.num_heads,
                                                   torch.float32)[:, 0, 1]
        out = functional.attention(q, k, v, causal=True, attn_mask=attn_mask, bias=ALiBi(slopes),
                                   scale=module.inv_norm_factor, q_pos=q_pos, k_pos=k_pos,
                                   dropout_p=module.attention_dropout.p if module.training else 0.0)
        out = module.dense(out.transpose(1, 2).reshape(B, L, module.hidden_size))
        return modeling_bloom.dropout_add(out, residual, module.hidden_dropout, module.training), None

    module.forward = forward
    undo.append(lambda: module.__dict__.pop("forward", None))


def _patch_falcon_attention(module, undo):
    """Falcon's ALiBi models: logits = (q·k + alibi) / √D with HF's slopes rounded to bf16 and key
    positions from the padding mask's cumsum; in the kernel that is ALiBi(slopes / √D) at scale 1/√D
    (causal: the bias of a key behind the query differs from HF's key-only one by a per-row constant,
    which the softmax drops)."""
    from transformers.models.falcon import modeling_falcon

    def forward(hidden_states, alibi, attention_mask, position_ids=None, layer_past=None, use_cache=False,
                output_attentions=False, position_embeddings=None, **kwargs):
        if output_attentions:
            _reject_unsupported({"output_attentions": True})
        B, L, _ = hidden_states.shape
        H, D = module.num_heads, module.head_dim
        Hkv = H if module.new_decoder_architecture else module.num_kv_heads
        q, k, v = module._split_heads(module.query_key_value(hidden_states))
        q, k, v = (t.transpose(1, 2).reshape(B, n, L, D) for t, n in ((q, H), (k, Hkv), (v, Hkv)))
        if layer_past is not None:
            k, v = layer_past.update(k, v, module.layer_idx)
        attn_mask, q_pos, k_pos = _alibi_positions(attention_mask, L, k.shape[2])
        # HF's slopes, rounded to bf16 as HF rounds them, from HF's own function: positions 0, 1
        slopes = modeling_falcon.build_alibi_tensor(hidden_states.new_ones(1, 2), H, torch.float32)[:, 0, 1]
        out = functional.attention(q, k, v, causal=True, attn_mask=attn_mask,
                                   bias=ALiBi(slopes * module.inv_norm_factor), scale=module.inv_norm_factor,
                                   q_pos=q_pos, k_pos=k_pos,
                                   dropout_p=module.attention_dropout.p if module.training else 0.0)
        return module.dense(out.transpose(1, 2).reshape(B, L, H * D)), None

    module.forward = forward
    undo.append(lambda: module.__dict__.pop("forward", None))


def _set_implementation(model, undo):
    configs = {id(m.config): m.config for m in model.modules() if hasattr(getattr(m, "config", None),
                                                                          "_attn_implementation")}
    for config in configs.values():
        old = config._attn_implementation
        config._attn_implementation = NAME
        undo.append(lambda c=config, o=old: setattr(c, "_attn_implementation", o))


def fuse_positions(model):
    """Move the model's position encoding into the kernel (on this instance; reversible).

    Supported: Llama, Mistral, Qwen2, Qwen3, Gemma2, Gemma3 (rotary with the model's own
    ``inv_freq`` and ``attention_scaling``), T5 and mT5 (block 0's ``relative_attention_bias``
    as an in-kernel T5Bias in every self-attention layer; gradients reach that table), Bloom and
    Falcon's ALiBi models (in-kernel ALiBi with HF's slopes and positions). Registers "posattn" and switches the model
    to it. Any other architecture raises ``NotImplementedError`` naming its class. Returns the model.
    :func:`unfuse_positions` restores the stock modules and attention implementation.
    """
    if getattr(model, "_posattn_undo", None) is not None:
        return model  # already fused
    register()
    names = {type(m).__name__ for m in model.modules()}
    undo = []
    if names & _ROPE_ATTENTION:
        rotaries = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
        if len(rotaries) != 1:
            raise NotImplementedError(f"fuse_positions: {type(model).__name__} has {len(rotaries)} rotary "
                                      f"embedding modules; posattn fuses models with exactly one")
        for m in model.modules():
            if type(m).__name__ in _ROPE_ATTENTION:
                _patch_rope_attention(m, rotaries[0], undo)
    elif names & _T5_ATTENTION:
        for stack in (m for m in model.modules() if type(m).__name__ in ("T5Stack", "MT5Stack")):
            owner = stack.block[0].layer[0].SelfAttention
            for block in stack.block:
                _patch_t5_attention(block.layer[0].SelfAttention, owner, undo)
                if len(block.layer) > 2:  # decoder blocks: self-attention, cross-attention, feed-forward
                    _patch_t5_attention(block.layer[1].EncDecAttention, None, undo)
    elif names & _ALIBI_ATTENTION:
        for m in model.modules():
            if type(m).__name__ in _ALIBI_ATTENTION:
                _patch_bloom_attention(m, undo)
    elif "FalconAttention" in names:
        if not getattr(model.config, "alibi", False):
            raise NotImplementedError(
                f"fuse_positions supports Falcon's ALiBi models only; {type(model).__name__} uses rotary embeddings "
                f"(config.alibi=False), which Falcon applies outside the AttentionInterface; run it as it is")
        for m in model.modules():
            if type(m).__name__ == "FalconAttention":
                _patch_falcon_attention(m, undo)
    else:
        raise NotImplementedError(
            f"fuse_positions does not support {type(model).__name__}: it fuses Llama, Mistral, Qwen2, Qwen3, "
            f"Gemma2, Gemma3, T5, mT5, Bloom and Falcon (ALiBi); other models can still use attn_implementation='posattn' through "
            f"register()")
    _set_implementation(model, undo)
    model._posattn_undo = undo
    return model


def unfuse_positions(model):
    """Undo :func:`fuse_positions`: the stock forwards and attention implementation come back
    (the model keeps running with positions outside the kernel). Returns the model."""
    undo = model.__dict__.pop("_posattn_undo", None)
    if undo is None:
        raise ValueError(f"unfuse_positions: {type(model).__name__} was not fused with fuse_positions")
    for step in reversed(undo):
        step()
    return model
