"""The README's tour of the API, runnable: every call checked against the dense float64 oracle.

    python examples/tour.py
"""
import torch

import posattn

torch.manual_seed(0)
q = torch.randn(2, 8, 128, 64)                                   # [B, H, L, D]
k, v = torch.randn(2, 2, 128, 64), torch.randn(2, 2, 128, 64)    # [B, Hkv, S, D]: GQA is implicit


def check(name, out, **kw):
    """Compare with posattn.reference in float64 on the same keywords."""
    qq = kw.pop("q", q)
    ref = posattn.reference.attention(qq.double(), k.double(), v.double(), **kw)
    err = (out.double() - ref).abs().max().item()
    assert err < 1e-4, f"{name}: max error {err:.2e}"
    print(f"{name:28s} {tuple(out.shape)}  max |out - ref64| = {err:.1e}")


out = posattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
check("SDPA drop-in", out, causal=True)
check("causal, top-left", posattn.attention(q, k, v, causal=True), causal=True)
q_new = q[:, :, -16:]
check("causal, bottom-right", posattn.attention(q_new, k, v, causal=True, q_pos=112), q=q_new, causal=True, q_pos=112)
check("window + softcap", posattn.attention(q, k, v, window=(32, 0), softcap=30.0), window=(32, 0), softcap=30.0)
rope = posattn.RoPE(theta=5e5)
check("RoPE in the kernel", posattn.attention(q, k, v, causal=True, rope=rope), causal=True, rope=rope)
alibi = posattn.ALiBi(posattn.alibi_slopes(8))
check("ALiBi", posattn.attention(q, k, v, causal=True, bias=alibi), causal=True, bias=alibi)

table = torch.zeros(8, 2 * 64 + 1, requires_grad=True)           # [H, 2M+1], learnable
out, lse = posattn.attention(q, k, v, bias=posattn.RelativeBias(table), return_lse=True)
out.sum().backward()
assert table.grad is not None and table.grad.shape == table.shape and torch.isfinite(table.grad).all()
check("RelativeBias (+ its grad)", out.detach(), bias=posattn.RelativeBias(table.detach()))
print(f"{'':28s} table.grad {tuple(table.grad.shape)}, lse {tuple(lse.shape)} {lse.dtype}")

t5 = posattn.T5Bias(torch.randn(8, 32), bidirectional=False)
check("T5 buckets", posattn.attention(q, k, v, scale=1.0, causal=True, bias=t5), scale=1.0, causal=True, bias=t5)

z = posattn.kernelized_attention(q, q, q, rpe=posattn.RelativeBias(table.detach()), causal=True)
assert z.shape == q.shape and torch.isfinite(z).all()
print(f"{'kernelized, O(N log N)':28s} {tuple(z.shape)}")
print("OK")
