"""Greedy generation from a tiny transformer with a paged KV cache: posattn.attention_with_kvcache.

Three prompts of different lengths share one pool of 16-token pages (a block table says which
pages each sequence owns, as a serving engine would allocate them). Each step appends the new
token's keys and values to the cache in place (the keys rotated by RoPE at their positions
inside the kernel) and attends over the cached tokens. Every step's logits equal those of the
same model run without a cache, one causal posattn.attention over the whole sequence so far.

    python examples/kv_cache_decoding.py
"""
import torch

import posattn

torch.manual_seed(0)
VOCAB, DIM, H, HKV, LAYERS, PAGE = 97, 64, 4, 2, 2, 16
D = DIM // H
rope = posattn.RoPE(theta=10000.0)
emb = torch.randn(VOCAB, DIM) * 0.5
SHAPES = {"q": (DIM, H * D), "k": (DIM, HKV * D), "v": (DIM, HKV * D), "o": (DIM, DIM), "up": (DIM, 2 * DIM),
          "down": (2 * DIM, DIM)}
layers = [{name: torch.randn(*shape) / shape[0] ** 0.5 for name, shape in SHAPES.items()} for _ in range(LAYERS)]


def heads(x, n):  # [B, T, n·D] -> [B, n, T, D]
    return x.view(x.shape[0], x.shape[1], n, D).transpose(1, 2)


def forward(tokens, attend):
    """Logits of the last position of each row; ``attend(layer, q, k, v)`` is the attention."""
    x = emb[tokens]
    for i, w in enumerate(layers):
        h = torch.nn.functional.rms_norm(x, (DIM,))
        a = attend(i, heads(h @ w["q"], H), heads(h @ w["k"], HKV), heads(h @ w["v"], HKV))
        x = x + a.transpose(1, 2).reshape(x.shape[0], x.shape[1], DIM) @ w["o"]
        x = x + torch.relu(torch.nn.functional.rms_norm(x, (DIM,)) @ w["up"]) @ w["down"]
    return x[:, -1] @ emb.T


def without_cache(seq):
    return forward(seq[None], lambda i, q, k, v: posattn.attention(q, k, v, causal=True, rope=rope))[0]


prompts = [torch.randint(VOCAB, (n,)) for n in (5, 21, 38)]
steps, B = 12, len(prompts)
pages_per_seq = -(-(max(len(p) for p in prompts) + steps) // PAGE)
pool = torch.randperm(B * pages_per_seq + 4)[:B * pages_per_seq]          # pages in any order
block_table = pool.view(B, pages_per_seq).to(torch.int32)
k_cache = [torch.zeros(B * pages_per_seq + 4, HKV, PAGE, D) for _ in range(LAYERS)]
v_cache = [torch.zeros(B * pages_per_seq + 4, HKV, PAGE, D) for _ in range(LAYERS)]
cached = torch.zeros(B, dtype=torch.int32)                                 # tokens in each row's cache


def with_cache(tokens):
    """One step for the batch: tokens [B, 1] (decode) or one prompt at a time (prefill below)."""
    return forward(tokens, lambda i, q, k, v: posattn.attention_with_kvcache(
        q, k_cache[i], v_cache[i], k, v, cache_seqlens=cached, block_table=block_table, rope=rope))


sequences = [p.clone() for p in prompts]
with torch.inference_mode():
    # prefill: each prompt is appended to its own pages (one row at a time, so lengths may differ)
    logits = []
    for b, p in enumerate(prompts):
        row = slice(b, b + 1)
        logits.append(forward(p[None], lambda i, q, k, v: posattn.attention_with_kvcache(
            q, k_cache[i], v_cache[i], k, v, cache_seqlens=cached[row], block_table=block_table[row], rope=rope))[0])
        cached[b] += len(p)
    logits = torch.stack(logits)
    worst = 0.0
    for step in range(steps):
        for b in range(B):
            worst = max(worst, (logits[b] - without_cache(sequences[b])).abs().max().item())
        nxt = logits.argmax(-1)
        sequences = [torch.cat((s, n[None])) for s, n in zip(sequences, nxt)]
        logits = with_cache(nxt[:, None])                                  # all rows decode together
        cached += 1
assert worst < 1e-4, worst
for s, p in zip(sequences, prompts):
    print(f"prompt {len(p):2d} tokens -> generated {s[len(p):].tolist()}")
print(f"{steps} steps over a paged cache ({PAGE}-token pages) match the uncached model: max |Δlogit| {worst:.1e}. OK")
