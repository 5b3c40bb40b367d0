"""posattn inside Hugging Face transformers models: the two calls, and posattn.nn in a plain model.

1. ``register()`` makes ``attn_implementation="posattn"`` available: a tiny random-init Llama
   (grouped-query attention) gives the same logits as with "sdpa" on a left-padded batch, and
   greedy generation produces the same tokens.
2. ``fuse_positions(model)`` moves the position encoding into the kernel: the Llama's rotary
   (its own inv_freq) and a T5's bucketed relative bias (gradients reach block 0's table).
3. ``posattn.nn.Attention``: a layer with a learnable ALiBi slope per head, decoding with a KVCache.

Runs offline (no downloads), fp32 on the CPU.

    python examples/hf_transformers.py
"""
import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

import posattn
from posattn.integrations.transformers import fuse_positions, register, unfuse_positions

torch.manual_seed(0)
register()

# 1. attn_implementation="posattn" on a padded batch
config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
stock = LlamaForCausalLM(config).eval()
stock.set_attn_implementation("sdpa")
model = copy.deepcopy(stock)
model.set_attn_implementation("posattn")
ids = torch.randint(1, 100, (2, 12))
mask = torch.ones_like(ids)
mask[0, :4] = 0  # left padding
with torch.no_grad():
    diff = (model(ids, attention_mask=mask).logits - stock(ids, attention_mask=mask).logits)[mask.bool()].abs().max()
print(f"Llama, posattn vs sdpa, left-padded batch: max |Δlogits| = {diff:.1e}")
assert diff < 1e-4
kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
same = torch.equal(model.generate(ids, **kw), stock.generate(ids, **kw))
print(f"greedy generate, 10 new tokens: identical = {same}")
assert same

# 2. fuse_positions: RoPE inside the kernel (the KV cache then holds un-rotated keys)
fuse_positions(model)
same = torch.equal(model.generate(ids, **kw), stock.generate(ids, **kw))
print(f"after fuse_positions(llama), greedy generate: identical = {same}")
assert same
unfuse_positions(model)

t5 = T5ForConditionalGeneration(T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                         dropout_rate=0.0, decoder_start_token_id=0))
t5_stock = copy.deepcopy(t5)
t5_stock.set_attn_implementation("sdpa")
fuse_positions(t5)  # every layer reads block 0's relative_attention_bias inside the kernel
src, tgt = torch.randint(1, 100, (2, 30)), torch.randint(1, 100, (2, 20))
losses = [m(input_ids=src, labels=tgt).loss for m in (t5, t5_stock)]
for loss in losses:
    loss.backward()
table = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
grads = [dict(m.named_parameters())[table].grad for m in (t5, t5_stock)]
print(f"T5 fused vs sdpa: |Δloss| = {abs(losses[0] - losses[1]).item():.1e}, "
      f"max |Δ grad of the bias table| = {(grads[0] - grads[1]).abs().max():.1e}")
assert abs(losses[0] - losses[1]) < 1e-4 and torch.allclose(grads[0], grads[1], atol=1e-5)

# 3. posattn.nn.Attention: learnable ALiBi slopes, decoding with a KV cache
layer = posattn.nn.Attention(64, num_heads=4, num_kv_heads=2, causal=True,
                             positions=posattn.ALiBi(posattn.alibi_slopes(4)))
x = torch.randn(1, 9, 64)
with torch.no_grad():
    full = layer(x)
    cache = posattn.nn.KVCache()
    steps = [layer(x[:, :5], cache=cache)] + [layer(x[:, t:t + 1], cache=cache) for t in range(5, 9)]
diff = (torch.cat(steps, dim=1) - full).abs().max()
print(f"posattn.nn.Attention: prefill 5 + decode 4 vs the full sequence: max diff {diff:.1e}; learnable: "
      f"{[n for n, _ in layer.named_parameters() if n.startswith('position_')]}")
assert diff < 1e-5
print("OK")
