"""A few optimisation steps of a learnable relative-position bias (and a URPE gate).

The bias table is the only parameter: its gradient comes from the fused backward without an
N x N bias in memory. The loss falls; the gradient matches the dense reference's.

    python examples/learnable_bias_training.py
"""
import torch

import posattn

torch.manual_seed(0)
B, H, N, D, M = 2, 4, 96, 32, 16
q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
target = torch.randn(B, H, N, D) * 0.1
table = torch.zeros(H, 2 * M + 1, requires_grad=True)
gate = torch.ones(H, 2 * M + 1, requires_grad=True)
opt = torch.optim.Adam([table, gate], lr=0.05)


def loss_of(attn):
    out = attn(q, k, v, causal=True, bias=posattn.RelativeBias(table), urpe=posattn.URPE(gate))
    return ((out - target) ** 2).mean()


losses = []
for step in range(6):
    opt.zero_grad()
    loss = loss_of(posattn.attention)
    loss.backward()
    if step == 0:      # the fused gradient equals the dense oracle's
        fused = (table.grad.clone(), gate.grad.clone())
        table.grad = gate.grad = None
        loss_of(posattn.reference.attention).backward()
        for a, b in zip(fused, (table.grad, gate.grad)):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-4), (a - b).abs().max()
        table.grad, gate.grad = fused
    opt.step()
    losses.append(loss.item())
    print(f"step {step}: loss {loss.item():.5f}")
assert losses[-1] < losses[0]
print("OK")
