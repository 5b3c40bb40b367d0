"""Train a tiny causal language model with sequence parallelism (ring attention) on CPU.

Each rank holds a zigzag shard of every sequence (posattn.distributed.shard); attention runs
round the ring with RoPE and a learnable relative bias computed inside the kernels, each rank
knowing its rows' global positions. Every other layer is per-token, so it runs on the shard as
it is; the parameter gradients are per-rank partial sums, all-reduced before the optimiser
step (as for data parallelism). The first step's loss and gradients equal a single-process
run on the whole sequence, and the loss falls.

    torchrun --nproc_per_node 2 examples/ring_attention_train.py
    python examples/ring_attention_train.py          # spawns 2 gloo processes itself
"""
import os
import sys
import tempfile

import torch
import torch.distributed as dist

import posattn
from posattn import distributed as sp

VOCAB, DIM, HEADS, N, PERIOD, STEPS = 16, 32, 4, 256, 37, 60


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, DIM)
        self.qkv = torch.nn.Linear(DIM, 3 * DIM)
        self.proj = torch.nn.Linear(DIM, DIM)
        self.table = torch.nn.Parameter(torch.zeros(HEADS, 2 * 64 + 1))
        self.head = torch.nn.Linear(DIM, VOCAB)

    def forward(self, tokens, attend):
        x = self.embed(tokens)                                              # [B, n, DIM]
        q, k, v = self.qkv(x).view(*x.shape[:2], 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        a = attend(q, k, v, causal=True, rope=posattn.RoPE(), bias=posattn.RelativeBias(self.table))
        x = x + self.proj(a.transpose(1, 2).reshape(x.shape))
        return self.head(x)


def batch(step):
    """Sequences that repeat with period PERIOD: a token is predictable from the one PERIOD back."""
    g = torch.Generator().manual_seed(step)
    motif = torch.randint(0, VOCAB, (4, PERIOD), generator=g)
    seq = motif.repeat(1, N // PERIOD + 2)[:, :N + 1]
    return seq[:, :-1], seq[:, 1:]


def loss_sum(model, tokens, labels, attend):
    logits = model(tokens, attend)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")


def train():
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)                      # the same initial weights on every rank
    model = TinyLM()
    opt = torch.optim.Adam(model.parameters(), lr=5e-2)
    count = 4 * N                             # tokens per batch: the loss is their mean
    losses = []
    for step in range(STEPS):
        tokens, labels = batch(step)
        part = sp.shard(tokens, dim=1), sp.shard(labels, dim=1)       # this rank's rows of every sequence
        opt.zero_grad()
        loss = loss_sum(model, *part, sp.ring_attention) / count
        loss.backward()
        for p in model.parameters():           # partial sums of the gradients -> the full batch's
            dist.all_reduce(p.grad)
        total = loss.detach().clone()
        dist.all_reduce(total)
        if step == 0:                          # the same step on one process, the whole sequence
            ring_grads = [p.grad.clone() for p in model.parameters()]
            model.zero_grad()
            single = loss_sum(model, tokens, labels, posattn.attention) / count
            single.backward()
            assert torch.allclose(total, single.detach(), rtol=1e-4), (total, single)
            for (name, p), g in zip(model.named_parameters(), ring_grads):
                assert torch.allclose(g, p.grad, rtol=1e-3, atol=1e-5), (name, (g - p.grad).abs().max())
                p.grad = g
        opt.step()
        losses.append(total.item())
        if rank == 0 and step % 5 == 0:
            print(f"step {step:2d}: loss {total.item():.4f}")
    if rank == 0:
        assert sum(losses[-5:]) / 5 < 0.8 * losses[0], losses
        print(f"world {world}: loss {losses[0]:.3f} -> {losses[-1]:.3f}")


def _spawned(rank, world, init):
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    train()
    dist.barrier()  # no rank tears gloo down while another is still talking to it
    dist.destroy_process_group()


if __name__ == "__main__":
    if "RANK" in os.environ:                  # started by torchrun
        dist.init_process_group("gloo")
        train()
        done = dist.get_rank() == 0
        dist.barrier()
        dist.destroy_process_group()
    else:
        with tempfile.TemporaryDirectory() as tmp:
            torch.multiprocessing.spawn(_spawned, args=(2, f"{tmp}/init"), nprocs=2)
        done = True
    if done:
        print("OK")
        sys.stdout.flush()
