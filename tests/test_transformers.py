"""posattn.integrations.transformers: tiny random-config HF models, offline, fp32 on CPU.

Every comparison runs three twins with one state dict: the model with
attn_implementation="posattn" (and fuse_positions where named) in float32, the stock model
(eager or sdpa) in float64 as the reference, and the stock model in float32 for the rounding
the tolerance allows (tests/tolerance.py). Logits are compared at the real (unpadded) tokens,
and every parameter gradient of a loss over those tokens.
"""
import copy
import subprocess
import sys

import pytest
import torch

import posattn
from conftest import requires_ext
from tolerance import assert_close

transformers = pytest.importorskip("transformers")
from transformers import (BloomConfig, BloomForCausalLM, DynamicCache, Gemma2Config,  # noqa: E402
                          Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, T5Config,
                          T5ForConditionalGeneration)

from posattn.integrations.transformers import fuse_positions, register, unfuse_positions  # noqa: E402

pytestmark = requires_ext

VOCAB = 61


def llama_config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)
    return LlamaConfig(**{**base, **kw})


def twins(cls, config, stock="eager", fuse=False):
    """(posattn model fp32, stock fp64, stock fp32), one state dict, eval mode (no dropout)."""
    register()
    torch.manual_seed(0)
    ours = cls(copy.deepcopy(config)).eval()
    stock32 = cls(copy.deepcopy(config)).eval()
    stock32.load_state_dict(ours.state_dict())
    if hasattr(stock32, "set_attn_implementation") and cls not in (BloomForCausalLM, transformers.FalconForCausalLM):
        stock32.set_attn_implementation(stock)
        ours.set_attn_implementation("posattn")
    stock64 = copy.deepcopy(stock32).double()
    if fuse:
        fuse_positions(ours)
    return ours, stock64, stock32


def padded_batch(B, L, side, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    if side == "left":
        mask[0, :3] = 0
        mask[1, :1] = 0
    elif side == "right":
        mask[0, -4:] = 0
    elif side == "middle":  # a hole: HF's ALiBi positions (mask.cumsum) skip it, token indices do not
        mask[0, 4:7] = 0
        mask[1, :2] = 0
    return ids.masked_fill(mask == 0, 0), mask


def run(model, weights, **inputs):
    """Logits, and the gradients of Σ weights·logits (weights zero at padded tokens)."""
    model.zero_grad()
    logits = model(**inputs).logits
    (logits.double() * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def softmax_keeps_float64(input, dim=None, _stacklevel=3, dtype=None):
    """HF's eager attention takes its softmax in float32 (dtype=torch.float32), which would cut the
    float64 reference down to float32 and turn its fully masked (padded) rows into NaN."""
    return _SOFTMAX(input, dim=dim, dtype=None if input.dtype == torch.float64 else dtype)


_SOFTMAX = torch.nn.functional.softmax


def compare(models, valid, **inputs):
    """Logits at the valid tokens and every parameter gradient: posattn vs the stock twins."""
    ours, stock64, stock32 = models
    g = torch.Generator().manual_seed(2)
    weights = torch.randn(*valid.shape, VOCAB, generator=g, dtype=torch.float64) * valid[..., None]
    cast = {k: (v.double() if torch.is_floating_point(v) else v) for k, v in inputs.items()}
    got, got_g = run(ours, weights, **inputs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "softmax", softmax_keeps_float64)
        ref, ref_g = run(stock64, weights, **cast)
    same, same_g = run(stock32, weights, **inputs)
    v = valid.bool()
    assert_close("logits", got[v], ref[v], same[v])
    assert ref_g.keys() == got_g.keys(), sorted(set(ref_g) ^ set(got_g))
    for name in ref_g:
        assert_close(f"grad {name}", got_g[name], ref_g[name], same_g[name])
    return got_g


# --------------------------------------------------------------------------------------------------
# register(): attn_implementation="posattn"
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["none", "left", "right"])
@pytest.mark.parametrize("fuse", [False, True], ids=["interface", "fused"])
def test_llama_gqa_padding(side, fuse):
    models = twins(LlamaForCausalLM, llama_config(), stock="sdpa", fuse=fuse)
    ids, mask = padded_batch(2, 11, side)
    compare(models, mask, input_ids=ids, attention_mask=mask)


def test_register_is_idempotent_and_masks_stay_2d(monkeypatch):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from posattn.integrations import transformers as integ
    register()
    register()
    assert AttentionInterface._global_mapping["posattn"] is integ.attention_forward
    assert AttentionMaskInterface._global_mapping["posattn"] is integ.mask_function
    seen = []
    original = integ.attention_forward

    def spy(module, q, k, v, attention_mask, **kw):
        seen.append(None if attention_mask is None else tuple(attention_mask.shape))
        return original(module, q, k, v, attention_mask, **kw)

    ours = twins(LlamaForCausalLM, llama_config())[0]
    monkeypatch.setitem(AttentionInterface._global_mapping, "posattn", spy)
    ids, mask = padded_batch(2, 11, "left")
    ours(input_ids=ids, attention_mask=mask)
    ours(input_ids=ids)
    assert seen == [(2, 11)] * 2 + [None] * 2  # the padding mask (B, S), never (B, 1, L, S)


def test_rope_types_fused():
    """The model's own inv_freq and attention_scaling: linear, llama3 and yarn scalings."""
    for rope in ({"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
                 {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64, "rope_theta": 500000.0},
                 {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}):
        models = twins(LlamaForCausalLM, llama_config(num_hidden_layers=1, rope_parameters=rope), fuse=True)
        ids, mask = padded_batch(2, 9, "none")
        compare(models, mask, input_ids=ids)


def test_generate_greedy_identical_tokens():
    ours, _, stock = twins(LlamaForCausalLM, llama_config(), stock="sdpa")
    ids, mask = padded_batch(2, 7, "left")
    kw = dict(attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    want = stock.generate(ids, **kw)
    assert torch.equal(ours.generate(ids, **kw), want)
    fuse_positions(ours)  # the cache now holds un-rotated keys; the kernel rotates them at their positions
    assert torch.equal(ours.generate(ids, **kw), want)


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_generate_unpadded_runs_the_decode_kernel(name, monkeypatch):
    """Without padding, each generated token's attention runs on posattn.attention_with_kvcache (the
    cache's keys read once per KV group), and the tokens are the stock model's."""
    cls, config = (LlamaForCausalLM, llama_config()) if name == "llama" else family_config(name)
    ours, _, stock = twins(cls, config, stock="sdpa")
    ids, mask = padded_batch(2, 7, "none")
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    calls = []
    real = posattn.decode.attention_with_kvcache
    monkeypatch.setattr(posattn.decode, "attention_with_kvcache", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert torch.equal(ours.generate(ids, **kw), stock.generate(ids, **kw))
    assert len(calls) == 11 * config.num_hidden_layers  # every step after the prompt


@pytest.mark.parametrize("name", ["mistral", "gemma3"])
def test_generate_sliding_window_cache(name):
    """Decoding past the window: the sliding layers' DynamicCache drops old keys, posattn's key
    positions follow (interface and fused)."""
    cls, config = family_config(name)
    ours, _, stock = twins(cls, config, stock="sdpa" if name == "mistral" else "eager")
    ids, mask = padded_batch(2, 7, "left")
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    want = stock.generate(ids, **kw)
    assert torch.equal(ours.generate(ids, **kw), want)
    fuse_positions(ours)
    assert torch.equal(ours.generate(ids, **kw), want)


def test_decode_with_dynamic_cache_matches_full_forward():
    ours, stock64, stock32 = twins(LlamaForCausalLM, llama_config(), fuse=True)
    ids, mask = padded_batch(2, 12, "left")
    cache = DynamicCache(config=ours.config)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    first = ours(input_ids=ids[:, :9], attention_mask=mask[:, :9], position_ids=pos[:, :9], past_key_values=cache,
                 use_cache=True).logits
    steps = [ours(input_ids=ids[:, i:i + 1], attention_mask=mask[:, :i + 1], position_ids=pos[:, i:i + 1],
                  past_key_values=cache, use_cache=True).logits for i in range(9, 12)]
    got = torch.cat([first] + steps, dim=1).detach()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "softmax", softmax_keeps_float64)
        ref = stock64(input_ids=ids, attention_mask=mask, position_ids=pos).logits.detach()
    same = stock32(input_ids=ids, attention_mask=mask, position_ids=pos).logits.detach()
    v = mask.bool()
    assert_close("logits", got[v], ref[v], same[v])


@pytest.mark.parametrize("cache", [False, True], ids=["no-cache", "cache"])
@pytest.mark.parametrize("fuse", [False, True], ids=["interface", "fused"])
def test_llama_packed_position_ids(cache, fuse):
    """Three sequences packed in one row, told apart by position_ids restarting. With a cache
    (the default use_cache=True makes one) HF skips its own packing detection, and the stock
    model lets the sequences see each other; posattn detects the packing either way. The
    reference is the stock model with use_cache=False (HF builds the block-diagonal mask then)."""
    ours, stock64, stock32 = twins(LlamaForCausalLM, llama_config(), fuse=fuse)
    ids = torch.randint(1, VOCAB, (1, 13))
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4]])
    ours = _with_kwargs(ours, use_cache=cache)
    stock64, stock32 = (_with_kwargs(m, use_cache=False) for m in (stock64, stock32))
    compare((ours, stock64, stock32), torch.ones(1, 13), input_ids=ids, position_ids=pos)


@pytest.mark.parametrize("fuse", [False, True], ids=["interface", "fused"])
def test_llama_cu_seq_lens_kwargs(fuse):
    """FlashAttention-style kwargs name the sequences (position_ids here do not restart, so only
    cu_seq_lens_* can split them); the reference runs each sequence alone."""
    ours, stock64, stock32 = twins(LlamaForCausalLM, llama_config(), fuse=fuse)
    ids = torch.randint(1, VOCAB, (1, 10))
    pos = torch.arange(10)[None]
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    got = ours(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=6,
               max_length_k=6).logits.detach()
    ref, same = (torch.cat([m(input_ids=ids[:, a:b], position_ids=pos[:, a:b]).logits.detach() for a, b in
                            ((0, 4), (4, 10))], dim=1) for m in (stock64, stock32))
    assert_close("logits", got, ref, same)


def _with_kwargs(model, **extra):
    """The model, its forward called with extra keyword arguments."""
    original = model.forward
    model.forward = lambda **kw: original(**kw, **extra)
    return model


def test_gemma2_softcap_and_sliding_window():
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                          attn_logit_softcapping=5.0, final_logit_softcapping=None, query_pre_attn_scalar=12,
                          max_position_embeddings=64, pad_token_id=0)
    assert config.layer_types[0] == "sliding_attention"
    ids, mask = padded_batch(2, 12, "left")
    compare(twins(Gemma2ForCausalLM, config), mask, input_ids=ids, attention_mask=mask)
    compare(twins(Gemma2ForCausalLM, config, fuse=True), mask, input_ids=ids, attention_mask=mask)


def family_config(name):
    small = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    if name == "mistral":
        return transformers.MistralForCausalLM, transformers.MistralConfig(**small, sliding_window=5)
    if name == "qwen2":
        return transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**small)
    if name == "qwen3":  # q_norm / k_norm before the rotation
        return transformers.Qwen3ForCausalLM, transformers.Qwen3Config(**small, head_dim=8)
    # Gemma3: sliding layers rotate with their own (local) base
    return transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig(
        **small, head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=8)


@pytest.mark.parametrize("name", ["mistral", "qwen2", "qwen3", "gemma3"])
def test_llama_family_fused(name):
    cls, config = family_config(name)
    ids, mask = padded_batch(2, 11, "left")
    compare(twins(cls, config, fuse=True), mask, input_ids=ids, attention_mask=mask)


# --------------------------------------------------------------------------------------------------
# fuse_positions: T5 (in-kernel T5Bias) and Bloom (in-kernel ALiBi)
# --------------------------------------------------------------------------------------------------

def t5_config():
    return T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
                    relative_attention_num_buckets=8, relative_attention_max_distance=12, dropout_rate=0.0,
                    decoder_start_token_id=0, pad_token_id=0)


@pytest.mark.parametrize("arch, fuse", [("t5", False), ("t5", True), ("mt5", True)],
                         ids=["t5-position_bias-as-mask", "t5-fused", "mt5-fused"])
def test_t5_encoder_decoder(arch, fuse):
    if arch == "t5":
        cls, config = T5ForConditionalGeneration, t5_config()
    else:
        cls, config = transformers.MT5ForConditionalGeneration, transformers.MT5Config(**t5_config().to_dict())
    models = twins(cls, config, fuse=fuse)
    for stack in (models[0].encoder, models[0].decoder):
        assert hasattr(stack.block[1].layer[0].SelfAttention, "_posattn_fusion") == fuse
    src, src_mask = padded_batch(2, 14, "right")
    tgt = torch.randint(1, VOCAB, (2, 16))
    grads = compare(models, torch.ones(2, 16), input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt)
    for stack in ("encoder", "decoder"):
        g = grads[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        assert g.abs().sum() > 0  # the bias table is learned through the kernel


def test_t5_generate_fused():
    ours, _, stock = twins(T5ForConditionalGeneration, t5_config(), fuse=True)
    src, src_mask = padded_batch(2, 9, "right")
    kw = dict(attention_mask=src_mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours.generate(src, **kw), stock.generate(src, **kw))


@pytest.mark.parametrize("side", ["none", "left", "middle"])
def test_bloom_alibi_fused(side):
    config = BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, hidden_dropout=0.0,
                         attention_dropout=0.0, pad_token_id=0)
    ids, mask = padded_batch(2, 11, side)
    compare(twins(BloomForCausalLM, config, fuse=True), mask, input_ids=ids, attention_mask=mask)


def falcon_alibi_config(**kw):
    return transformers.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     alibi=True, hidden_dropout=0.0, attention_dropout=0.0, pad_token_id=0, **kw)


@pytest.mark.parametrize("side", ["none", "left", "middle"])
@pytest.mark.parametrize("arch", ["multi-query", "multi-head"])
def test_falcon_alibi_fused(side, arch):
    """Falcon's ALiBi (HF's bf16-rounded slopes, positions from the mask's cumsum) in the kernel:
    logits and every gradient as the stock model's (multi-query: one KV head; multi-head)."""
    config = falcon_alibi_config(multi_query=arch == "multi-query")
    ids, mask = padded_batch(2, 11, side)
    compare(twins(transformers.FalconForCausalLM, config, fuse=True), mask, input_ids=ids, attention_mask=mask)


def test_falcon_alibi_generate_fused():
    ours, _, stock = twins(transformers.FalconForCausalLM, falcon_alibi_config(), fuse=True)
    ids, mask = padded_batch(2, 7, "left")
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kw), stock.generate(ids, **kw))


def test_unfuse_restores_the_stock_model():
    ours, _, stock = twins(LlamaForCausalLM, llama_config(), stock="sdpa", fuse=True)
    assert "forward" in ours.model.layers[0].self_attn.__dict__
    unfuse_positions(ours)
    assert "forward" not in ours.model.layers[0].self_attn.__dict__
    assert ours.config._attn_implementation == "posattn"
    ids, _ = padded_batch(2, 8, "none")
    torch.testing.assert_close(ours(input_ids=ids).logits, stock(input_ids=ids).logits)


def test_unsupported_model_and_arguments_raise():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4))
    with pytest.raises(NotImplementedError, match="GPT2LMHeadModel"):
        fuse_positions(gpt2)
    falcon = transformers.FalconForCausalLM(transformers.FalconConfig(vocab_size=VOCAB, hidden_size=32,
                                                                       num_hidden_layers=1, num_attention_heads=4,
                                                                       alibi=False))
    with pytest.raises(NotImplementedError, match="Falcon's ALiBi models only; FalconForCausalLM uses rotary"):
        fuse_positions(falcon)
    ours = twins(LlamaForCausalLM, llama_config())[0]
    ids, _ = padded_batch(2, 8, "none")
    with pytest.raises(NotImplementedError, match="output_attentions"):
        ours(input_ids=ids, output_attentions=True)
    with pytest.raises(NotImplementedError, match="StaticCache"):
        ours.generate(ids, max_new_tokens=2, do_sample=False, cache_implementation="static")


def test_importing_posattn_does_not_import_transformers():
    code = "import sys, posattn, posattn.nn, posattn.integrations; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
