"""CUDA timing of posattn with position encodings against torch SDPA peers, in one process.

    python bench/gpu_positions.py

bf16, median of 20 runs after 3 warm-ups (CUDA events), peak memory per case: SDPA causal,
posattn causal, torch RoPE + SDPA vs posattn with RoPE fused, posattn + ALiBi, SDPA with a
dense learnable T5 bias (its gradient included) vs posattn + T5Bias. This is the script
behind the H100 numbers in the issue #3 / #4 notes; `python -m bench` (issue #7) takes it
over.
"""
import sys

import torch
import torch.nn.functional as F

import posattn

if not torch.cuda.is_available():
    sys.exit("bench/gpu_positions.py needs a CUDA device")
dev = "cuda"
torch.backends.cuda.matmul.allow_tf32 = False

def timeit(fn, reps=20):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    ts.sort(); return ts[len(ts)//2]

def rope_ref(x, pos, theta=1e4):
    d = x.shape[-1]; inv = 1.0 / theta ** (torch.arange(0, d, 2, device=dev).float() / d)
    ang = pos[:, None].float() * inv; cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    cos, sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat((-x2, x1), -1) * sin

def t5_bias_dense(table, L, S):
    from posattn.positions import t5_relative_position_bucket
    r = torch.arange(S, device=dev)[None] - torch.arange(L, device=dev)[:, None]
    return table[:, t5_relative_position_bucket(r, True, table.shape[1], 128)]  # [H, L, S]

rows = []
for (B, H, N, D) in [(4, 16, 2048, 64), (2, 16, 4096, 128), (1, 16, 8192, 64)]:
  for dtype in (torch.bfloat16,):
    q = torch.randn(B, H, N, D, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(B, H, N, D, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(B, H, N, D, device=dev, dtype=dtype, requires_grad=True)
    do = torch.randn_like(q)
    pos = torch.arange(N, device=dev)
    table = torch.randn(H, 32, device=dev, requires_grad=True)
    slopes = posattn.alibi_slopes(H, device=dev)
    cases = {
      "sdpa-causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
      "posattn-causal": lambda: posattn.attention(q, k, v, causal=True),
      "sdpa+rope(torch)-causal": lambda: F.scaled_dot_product_attention(rope_ref(q, pos), rope_ref(k, pos), v,
                                                                        is_causal=True),
      "posattn+rope-causal": lambda: posattn.attention(q, k, v, causal=True, rope=posattn.RoPE()),
      "posattn+alibi-causal": lambda: posattn.attention(q, k, v, causal=True, bias=posattn.ALiBi(slopes)),
      "sdpa+t5bias(dense)": lambda: F.scaled_dot_product_attention(
          q, k, v, attn_mask=t5_bias_dense(table, N, N).to(dtype)[None]),
      "posattn+t5bias": lambda: posattn.attention(q, k, v, bias=posattn.T5Bias(table), scale=None),
    }
    for name, fn in cases.items():
        try:
            torch.cuda.reset_peak_memory_stats()
            f = timeit(lambda: fn())
            fb = timeit(lambda: torch.autograd.grad(fn(), [q, k, v] + ([table] if "t5" in name else []), do))
            mem = torch.cuda.max_memory_allocated() / 2**30
            rows.append((B, H, N, D, str(dtype)[6:], name, f, fb, mem))
            print(f"B{B} H{H} N{N} D{D} {str(dtype)[6:]:9s} {name:26s} fwd {f:8.3f} ms  fwd+bwd {fb:8.3f} ms  "
                  f"peak {mem:6.2f} GiB", flush=True)
        except Exception as e:
            print(f"B{B} H{H} N{N} D{D} {name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
