"""Decoding with a KV cache: positions, not row indices, place the new tokens.

Prefill 100 tokens, then decode 4 more one at a time with RoPE computed inside the kernel on
un-rotated cached keys; every step equals full causal attention over the whole sequence.

    python examples/kv_cache_decoding.py
"""
import torch

import posattn

torch.manual_seed(0)
B, H, Hkv, D, prefill, steps = 1, 8, 2, 64, 100, 4
q_all = torch.randn(B, H, prefill + steps, D)
k_all = torch.randn(B, Hkv, prefill + steps, D)
v_all = torch.randn(B, Hkv, prefill + steps, D)
rope = posattn.RoPE(theta=10000.0)

full = posattn.attention(q_all, k_all, v_all, causal=True, rope=rope)

out = posattn.attention(q_all[:, :, :prefill], k_all[:, :, :prefill], v_all[:, :, :prefill], causal=True, rope=rope)
worst = (out - full[:, :, :prefill]).abs().max().item()
for t in range(prefill, prefill + steps):
    step = posattn.attention(q_all[:, :, t:t + 1], k_all[:, :, :t + 1], v_all[:, :, :t + 1], causal=True, rope=rope,
                             q_pos=t)
    worst = max(worst, (step - full[:, :, t:t + 1]).abs().max().item())
    print(f"decode position {t}: {tuple(step.shape)}")
assert worst < 1e-5, worst
print(f"prefill + {steps} decode steps equal full causal attention: max diff {worst:.1e}")
print("OK")
