"""Training on a packed batch: ragged sequences in one row, no padding, RoPE and a learnable
relative bias computed in the kernel.

A Hugging Face collator that flattens a batch (DataCollatorWithFlattening) hands the model one
row of tokens and `position_ids` that restart at 0 for every sequence. The prefix sums of the
sequence lengths come from those positions; `posattn.attention_varlen` then attends within each
sequence only. The result (and the bias table's gradient) equals attention run on each sequence
alone, which the script checks before a few optimisation steps.

    python examples/packed_batches.py
"""
import torch

import posattn

torch.manual_seed(0)
H, Hkv, D, M = 4, 2, 32, 16
lengths = [37, 5, 120, 64, 1]
position_ids = torch.cat([torch.arange(n) for n in lengths])        # what the collator gives
starts = (position_ids == 0).nonzero().flatten()
cu = torch.cat((starts, torch.tensor([position_ids.numel()]))).to(torch.int32)
T = position_ids.numel()
q = torch.randn(T, H, D)                                             # [total rows, H, D]
k, v = torch.randn(T, Hkv, D), torch.randn(T, Hkv, D)
target = torch.randn(T, H, D) * 0.1
table = torch.zeros(H, 2 * M + 1, requires_grad=True)
rope = posattn.RoPE(theta=10000.0)


def packed():
    return posattn.attention_varlen(q, k, v, cu, cu, max(lengths), max(lengths), causal=True, rope=rope,
                                    bias=posattn.RelativeBias(table), q_pos=position_ids, k_pos=position_ids)


# one sequence at a time through posattn.attention: the packed call must agree, gradient included
out = packed()
out.pow(2).sum().backward()
packed_grad, table.grad = table.grad.clone(), None
for i, n in enumerate(lengths):
    rows = slice(int(cu[i]), int(cu[i + 1]))
    one = posattn.attention(*(t[rows].transpose(0, 1)[None] for t in (q, k, v)), causal=True, rope=rope,
                            bias=posattn.RelativeBias(table))[0].transpose(0, 1)
    assert torch.allclose(out[rows], one, atol=1e-5), (out[rows] - one).abs().max()
    one.pow(2).sum().backward()
assert torch.allclose(packed_grad, table.grad, atol=1e-4, rtol=1e-4), (packed_grad - table.grad).abs().max()
table.grad = None

opt = torch.optim.Adam([table], lr=0.05)
losses = []
for step in range(5):
    opt.zero_grad()
    loss = ((packed() - target) ** 2).mean()
    loss.backward()
    opt.step()
    losses.append(loss.item())
    print(f"step {step}: loss {loss.item():.5f}")
assert losses[-1] < losses[0]
print(f"{len(lengths)} sequences, {T} rows, no padding; backend {posattn.ops.cpu_isa()!r}. OK")
