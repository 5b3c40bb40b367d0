"""Position encodings: the spec helpers against their upstream definitions, and the kernels
against the float64 oracle for every rotary variant.

- RoPE frequencies are bit-identical to HF transformers' ``modeling_rope_utils``;
- T5 buckets equal HF's ``T5Attention._relative_position_bucket`` (also as read back from
  the kernel);
- ALiBi slopes equal the reference ``get_slopes`` and MPT's ``gen_slopes``;
- xPos equals a transcription of torchscale's XPOS;
- RotaryAngles and CARoPE: gradcheck of the oracle, kernel vs oracle for every gradient;
- RoPE's relative property through the kernel;
- two whole layers against HF: LLaMA-3 attention with llama3 RoPE scaling past the
  original context, and T5Attention (encoder, decoder, decoder with a KV cache);
- every spec validation error.

Kernel cases follow test_attention.check: the kernel (fp32) against the float64 result,
bounded by twice the error of the same computation in plain PyTorch fp32 (tolerance.py).
Every kernel case runs on both kernel backends, "triton" (on the test device; the
interpreter on a machine without a GPU) and "cpu" (the C++ extension posattn._C, always on
CPU tensors; marked requires_ext), with the same assertions.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import posattn
from conftest import CPU, TRITON, backend_fixtures
from posattn.positions import rope_frequencies, t5_relative_position_bucket
from tolerance import assert_close

F64 = torch.float64
F32 = torch.float32


# Every test that runs a kernel asks for ``backend`` (and ``device``, the device that backend's
# tensors live on): it runs once per kernel backend, with ids such as ``triton-…`` / ``cpu-…``.
backend, device = backend_fixtures()


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

def run_grads(fn, inputs, dtype, dout):
    """fn(**inputs cast to dtype) → {"out", "d<name>" for every input} for the upstream gradient dout."""
    leaves = {n: t.detach().to(dtype).requires_grad_() for n, t in inputs.items()}
    out = fn(**leaves)
    (out.double() * dout).sum().backward()
    return {"out": out.detach(), **{f"d{n}": t.grad for n, t in leaves.items()}}


def compare(label, kernel_fn, ref_fn, inputs, dtype=F32):
    """kernel_fn in dtype vs ref_fn in float64, bounded by ref_fn in dtype (tolerance.py); every
    input is a leaf whose gradient is compared too."""
    device = next(iter(inputs.values())).device
    with torch.no_grad():
        shape = ref_fn(**{n: t.to(F64) for n, t in inputs.items()}).shape
    dout = torch.randn(shape, generator=torch.Generator().manual_seed(99), dtype=F64).to(device)
    ref = run_grads(ref_fn, inputs, F64, dout)
    low = run_grads(ref_fn, inputs, dtype, dout)
    got = run_grads(kernel_fn, inputs, dtype, dout)
    for name in ref:
        assert got[name] is not None, f"{label}-{name}: no gradient from the kernel path"
        assert_close(f"{label}-{name}", got[name], ref[name], low[name])
    return got


def attn_fn(backend, **kw):
    def fn(q, k, v):
        return posattn.attention(q, k, v, backend=backend, **kw)
    return fn


# --------------------------------------------------------------------------------------------------
# 1. RoPE frequencies vs HF transformers
# --------------------------------------------------------------------------------------------------

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


def _longrope(n, seed):
    g = torch.Generator().manual_seed(seed)
    short = (1.0 + 0.1 * torch.rand(n, generator=g, dtype=F64)).tolist()
    ramp = torch.linspace(0, 1, n, dtype=F64) ** 2
    long = (1.0 + 30.0 * ramp + 0.01 * torch.rand(n, generator=g, dtype=F64)).tolist()
    return short, long


_LR32 = _longrope(32, 1)
_LR16 = _longrope(16, 2)
_LR64 = _longrope(64, 3)

# (id, head_dim, partial_rotary_factor, theta, max_position_embeddings, HF rope parameters, seq_len,
#  extra keys that posattn's scaling dict needs beyond HF's parameters)
ROPE_CASES = [
    ("default-D64", 64, 1.0, 10000.0, 2048, {"rope_type": "default"}, None, {}),
    ("default-D128-theta5e5", 128, 1.0, 5e5, 8192, {"rope_type": "default"}, None, {}),
    ("default-partial-D80-r32", 80, 0.4, 10000.0, 2048, {"rope_type": "default"}, None, {}),
    ("linear-f4", 64, 1.0, 10000.0, 8192, {"rope_type": "linear", "factor": 4.0}, None, {}),
    ("linear-f2.5-partial-r32", 64, 0.5, 1e6, 8192, {"rope_type": "linear", "factor": 2.5}, None, {}),
    # HF's dynamic NTK measures the length against config.max_position_embeddings
    ("dynamic-below", 64, 1.0, 10000.0, 2048, {"rope_type": "dynamic", "factor": 2.0}, 1000,
     {"original_max_position_embeddings": 2048}),
    ("dynamic-at", 64, 1.0, 10000.0, 2048, {"rope_type": "dynamic", "factor": 2.0}, 2048,
     {"original_max_position_embeddings": 2048}),
    ("dynamic-above", 64, 1.0, 10000.0, 2048, {"rope_type": "dynamic", "factor": 2.0}, 5000,
     {"original_max_position_embeddings": 2048}),
    ("dynamic-above-f4-D128", 128, 1.0, 5e5, 4096, {"rope_type": "dynamic", "factor": 4.0}, 70001,
     {"original_max_position_embeddings": 4096}),
    ("dynamic-above-partial-r16", 64, 0.25, 10000.0, 2048, {"rope_type": "dynamic", "factor": 3.0}, 9000,
     {"original_max_position_embeddings": 2048}),
    ("yarn-f4", 64, 1.0, 10000.0, 16384,
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}, None, {}),
    ("yarn-f16-D128-theta5e5", 128, 1.0, 5e5, 131072,
     {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 8192}, None, {}),
    ("yarn-attention_factor", 64, 1.0, 10000.0, 16384,
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "attention_factor": 1.3},
     None, {}),
    ("yarn-mscale-mscale_all_dim", 128, 1.0, 10000.0, 163840,
     {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0,
      "mscale_all_dim": 0.707}, None, {}),
    ("yarn-betas-no-truncate", 64, 1.0, 10000.0, 32768,
     {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096, "beta_fast": 16.0,
      "beta_slow": 2.0, "truncate": False}, None, {}),
    ("yarn-partial-r32", 64, 0.5, 10000.0, 16384,
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}, None, {}),
    ("llama3-D128", 128, 1.0, 5e5, 131072, dict(LLAMA3), None, {}),
    ("llama3-D64", 64, 1.0, 5e5, 131072, dict(LLAMA3), None, {}),
    ("llama3-f32-orig2048", 64, 1.0, 10000.0, 65536,
     {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 8.0,
      "original_max_position_embeddings": 2048}, None, {}),
    ("llama3-partial-r32", 64, 0.5, 5e5, 131072, dict(LLAMA3), None, {}),
    ("longrope-short-below", 64, 1.0, 10000.0, 131072,
     {"rope_type": "longrope", "short_factor": _LR32[0], "long_factor": _LR32[1],
      "original_max_position_embeddings": 4096, "factor": 32.0}, 3000, {}),
    ("longrope-short-at", 64, 1.0, 10000.0, 131072,
     {"rope_type": "longrope", "short_factor": _LR32[0], "long_factor": _LR32[1],
      "original_max_position_embeddings": 4096, "factor": 32.0}, 4096, {}),
    ("longrope-long-above", 64, 1.0, 10000.0, 131072,
     {"rope_type": "longrope", "short_factor": _LR32[0], "long_factor": _LR32[1],
      "original_max_position_embeddings": 4096, "factor": 32.0}, 4097, {}),
    ("longrope-long-attention_factor", 128, 1.0, 10000.0, 131072,
     {"rope_type": "longrope", "short_factor": _LR64[0], "long_factor": _LR64[1],
      "original_max_position_embeddings": 4096, "factor": 32.0, "attention_factor": 1.1}, 20000, {}),
    ("longrope-partial-r32-above", 64, 0.5, 10000.0, 131072,
     {"rope_type": "longrope", "short_factor": _LR16[0], "long_factor": _LR16[1],
      "original_max_position_embeddings": 4096, "factor": 32.0}, 50000, {}),
]


def _hf_rope(head_dim, prf, theta, max_pos, params, seq_len):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.phi.modeling_phi import PhiRotaryEmbedding

    kw = {} if prf == 1.0 else {"partial_rotary_factor": prf}
    cfg = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                      max_position_embeddings=max_pos, rope_theta=theta, rope_parameters=copy.deepcopy(params), **kw)
    assert cfg.rope_parameters["rope_theta"] == theta
    assert cfg.rope_parameters.get("partial_rotary_factor", 1.0) == prf
    if params["rope_type"] == "default":
        # Llama's default RoPE ignores partial_rotary_factor; Phi's honours it
        fn = LlamaRotaryEmbedding.compute_default_rope_parameters if prf == 1.0 else \
            PhiRotaryEmbedding.compute_default_rope_parameters
        return fn(cfg)
    if params["rope_type"] == "dynamic" and seq_len is not None:
        # HF's module hands a tensor seq_len (max(position_ids) + 1) to the init function at
        # run time, which computes the NTK base in float32 tensor arithmetic; posattn matches
        # that (the frequencies the model actually uses), not the Python-int path.
        seq_len = torch.tensor(seq_len)
    return ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, None, seq_len=seq_len)


@pytest.mark.parametrize("case", ROPE_CASES, ids=[c[0] for c in ROPE_CASES])
def test_rope_frequencies_match_hf(case):
    _, head_dim, prf, theta, max_pos, params, seq_len, extra = case
    r = int(head_dim * prf)
    hf_inv, hf_factor = _hf_rope(head_dim, prf, theta, max_pos, params, seq_len)
    assert hf_inv.shape == (r // 2,)
    scaling = None if params["rope_type"] == "default" else {**params, **extra}
    inv, factor = rope_frequencies(theta, r, scaling, seq_len)
    assert inv.dtype == torch.float32 and hf_inv.dtype == torch.float32
    assert torch.equal(inv, hf_inv), f"inv_freq differs from HF's: max |Δ| = {(inv - hf_inv).abs().max():.3e}"
    assert factor == hf_factor, f"attention factor {factor} != HF's {hf_factor}"
    # The spec object derives seq_len from the call's positions (largest position + 1).
    spec = posattn.RoPE(theta=theta, dim=r, scaling=scaling)
    n = seq_len or 64
    L = min(n, 16)
    inv2, factor2 = spec.frequencies(head_dim, n - L, 0, L, L)
    assert torch.equal(inv2, hf_inv) and factor2 == hf_factor


RUNTIME_CASES = {
    "dynamic-above": ({"rope_type": "dynamic", "factor": 2.0}, {"original_max_position_embeddings": 2048}, 2048, 9000),
    "dynamic-below": ({"rope_type": "dynamic", "factor": 2.0}, {"original_max_position_embeddings": 2048}, 2048, 100),
    "longrope-above": ({"rope_type": "longrope", "short_factor": _LR32[0], "long_factor": _LR32[1],
                        "original_max_position_embeddings": 4096, "factor": 32.0}, {}, 131072, 9000),
    "longrope-below": ({"rope_type": "longrope", "short_factor": _LR32[0], "long_factor": _LR32[1],
                        "original_max_position_embeddings": 4096, "factor": 32.0}, {}, 131072, 100),
}


@pytest.mark.parametrize("name", list(RUNTIME_CASES))
def test_rope_frequencies_match_hf_module_at_runtime(name):
    # What a HF model actually rotates with: LlamaRotaryEmbedding re-derives the length-dependent
    # frequencies in its forward from max(position_ids) + 1, a tensor.
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    params, extra, max_pos, start = RUNTIME_CASES[name]
    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=64, max_position_embeddings=max_pos,
                      rope_theta=5e5, rope_parameters=copy.deepcopy(params))
    rotary = LlamaRotaryEmbedding(cfg)
    rotary(torch.zeros(1), (start + torch.arange(100))[None])
    inv, factor = posattn.RoPE(theta=5e5, scaling={**params, **extra}).frequencies(64, start, start, 100, 100)
    assert torch.equal(inv, rotary.inv_freq), (f"inv_freq differs from HF's LlamaRotaryEmbedding at positions "
                                               f"{start}…{start + 99}: max rel |Δ| = "
                                               f"{((inv - rotary.inv_freq).abs() / rotary.inv_freq).max():.3e}")
    assert factor == rotary.attention_scaling


def test_rope_scaling_changes_frequencies():
    # guard against a vacuous comparison: the scalings above really differ from plain RoPE
    base, _ = rope_frequencies(10000.0, 64)
    for params, n in [({"rope_type": "linear", "factor": 4.0}, None),
                      ({"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 2048}, 5000),
                      ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}, None),
                      ({**LLAMA3}, None)]:
        inv, _ = rope_frequencies(10000.0, 64, params, n)
        assert not torch.equal(inv, base), params["rope_type"]
    lr = {"rope_type": "longrope", "short_factor": _LR32[0], "long_factor": _LR32[1],
          "original_max_position_embeddings": 4096, "factor": 32.0}
    assert not torch.equal(rope_frequencies(10000.0, 64, lr, 3000)[0], rope_frequencies(10000.0, 64, lr, 5000)[0])


# --------------------------------------------------------------------------------------------------
# 2. T5 buckets
# --------------------------------------------------------------------------------------------------

T5_CONFIGS = [(32, 128), (64, 128), (32, 256), (128, 128)]


def _hf_bucket(rel, bidirectional, nb, md):
    from transformers.models.t5.modeling_t5 import T5Attention
    return T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=nb, max_distance=md)


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("nb, md", T5_CONFIGS, ids=[f"nb{a}-md{b}" for a, b in T5_CONFIGS])
def test_t5_buckets_match_hf(nb, md, bidirectional):
    rel = torch.arange(-3000, 3001)
    hf = _hf_bucket(rel, bidirectional, nb, md)
    ours = t5_relative_position_bucket(rel, bidirectional, nb, md)
    assert torch.equal(ours, hf), f"buckets differ at rel = {rel[ours != hf][:10].tolist()}"
    # the bucket T5Bias uses: index(q_pos, k_pos) of r = k_pos − q_pos, here with q_pos = 3000
    spec = posattn.T5Bias(torch.zeros(2, nb), bidirectional=bidirectional, max_distance=md)
    idx = spec.index(torch.tensor([[3000]]), torch.arange(0, 6001)[None])
    assert idx.shape == (1, 1, 1, 6001)
    assert torch.equal(idx[0, 0, 0], hf), f"T5Bias.index differs at rel = {rel[idx[0, 0, 0] != hf][:10].tolist()}"
    # several queries at once: every entry is the bucket of its own k_pos − q_pos
    qp, kp = torch.tensor([[5, 300, 77]]), torch.arange(-200, 400, 7)[None]
    idx = spec.index(qp, kp)
    assert torch.equal(idx[0, 0], _hf_bucket(kp[0][None, :] - qp[0][:, None], bidirectional, nb, md))
    assert int(hf.min()) >= 0 and int(hf.max()) < nb


def _first_rel_per_bucket(bidirectional):
    n = torch.arange(0, 3001)
    rel = -n  # keys at or before the query
    b = _hf_bucket(rel, bidirectional, 32, 128)
    return [int(n[b == k].min()) for k in range(int(b.max()) + 1)]


def test_t5_bucket_thresholds_math_md():
    bid = [0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 23, 32, 46, 64, 91]
    causal = list(range(16)) + [16, 19, 21, 24, 27, 31, 35, 40, 46, 52, 59, 67, 77, 87, 99, 113]
    assert _first_rel_per_bucket(True) == bid
    assert _first_rel_per_bucket(False) == causal
    for fn in (_hf_bucket, t5_relative_position_bucket):
        # bidirectional keys after the query: 16 + the same buckets, bucket 16 never used
        pos = fn(torch.arange(1, 3001), True, 32, 128)
        assert 16 not in pos.tolist() and int(pos.min()) == 17 and int(pos.max()) == 31
        first = [int(torch.nonzero(pos == 16 + b)[0]) + 1 for b in range(1, 16)]
        assert first == bid[1:]
        # causal: every future key → bucket 0; everything ≥ 113 back → 31
        assert torch.all(fn(torch.arange(1, 500), False, 32, 128) == 0)
        assert torch.all(fn(-torch.arange(113, 3001), False, 32, 128) == 31)
        assert int(fn(torch.tensor(-112), False, 32, 128)) == 30
        assert torch.all(fn(-torch.arange(91, 3001), True, 32, 128) == 15)


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("nb, md", T5_CONFIGS, ids=[f"nb{a}-md{b}" for a, b in T5_CONFIGS])
def test_t5_kernel_buckets(nb, md, bidirectional, device, backend):
    # Read the bucket the kernel uses back from its output: q = 0 makes the scores equal the
    # bias table[bucket] = c·bucket; v = identity makes out[j] = p_j, so bucket_j =
    # (log p_j + lse)/c.
    c = 0.03
    table = (c * torch.arange(nb, dtype=F32))[None].to(device)
    spec = posattn.T5Bias(table, bidirectional=bidirectional, max_distance=md)
    rels = torch.cat((torch.arange(-300, 301), torch.arange(-3000, 3001, 97), torch.tensor([-2999, 2999, 3000])))
    rels = rels.unique()
    q_at = 4000
    for chunk in rels.split(128):
        S = chunk.numel()
        q = torch.zeros(1, 1, 1, 16, device=device)
        k = torch.zeros(1, 1, S, 16, device=device)
        v = torch.eye(S, device=device)[None, None]
        out, lse = posattn.attention(q, k, v, bias=spec, scale=1.0, q_pos=q_at, k_pos=(q_at + chunk).to(device),
                                     return_lse=True, backend=backend)
        x = ((out[0, 0, 0].double().log() + lse[0, 0, 0].double()) / c).cpu()
        got = x.round().long()
        assert (x - got).abs().max() < 0.05, "kernel bias is not an exact table entry"
        want = _hf_bucket(chunk, bidirectional, nb, md)
        assert torch.equal(got, want), f"kernel buckets differ at rel = {chunk[got != want][:10].tolist()}"


# --------------------------------------------------------------------------------------------------
# 3. ALiBi slopes
# --------------------------------------------------------------------------------------------------

def reference_get_slopes(n):
    # ofirpress/attention_with_linear_biases, verbatim logic (docs/math.md §2)
    def get_slopes_power_of_2(n):
        start = 2 ** (-2 ** -(math.log2(n) - 3))
        ratio = start
        return [start * ratio ** i for i in range(n)]

    if math.log2(n).is_integer():
        return get_slopes_power_of_2(n)
    closest_power_of_2 = 2 ** math.floor(math.log2(n))
    return get_slopes_power_of_2(closest_power_of_2) + reference_get_slopes(2 * closest_power_of_2)[0::2][
        : n - closest_power_of_2]


def mpt_gen_slopes(n_heads, alibi_bias_max=8):
    # llm-foundry gen_slopes (float32, as there)
    _n_heads = 2 ** math.ceil(math.log2(n_heads))
    m = torch.arange(1, _n_heads + 1, dtype=torch.float32)
    m = m.mul(alibi_bias_max / _n_heads)
    slopes = 1.0 / torch.pow(2, m)
    if _n_heads != n_heads:
        slopes = torch.concat([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes


ALIBI_HEADS = [1, 2, 3, 5, 6, 7, 8, 12, 16, 20, 24, 32, 40, 48, 64, 71, 80, 96, 112, 127, 128]


@pytest.mark.parametrize("n", ALIBI_HEADS, ids=lambda n: f"H{n}")
def test_alibi_slopes_match_reference_and_mpt(n):
    ref = torch.tensor(reference_get_slopes(n), dtype=F64)
    got64 = posattn.alibi_slopes(n, dtype=F64)
    assert got64.shape == (n,)
    torch.testing.assert_close(got64, ref, rtol=1e-15, atol=0)
    got32 = posattn.alibi_slopes(n)
    assert got32.dtype == torch.float32
    assert torch.equal(got32, ref.float())
    torch.testing.assert_close(got32, mpt_gen_slopes(n), rtol=2e-7, atol=0)


def test_alibi_slopes_all_head_counts():
    for n in range(1, 129):
        torch.testing.assert_close(posattn.alibi_slopes(n, dtype=F64), torch.tensor(reference_get_slopes(n), dtype=F64),
                                   rtol=1e-15, atol=0, msg=f"H={n}")
        torch.testing.assert_close(posattn.alibi_slopes(n), mpt_gen_slopes(n), rtol=2e-7, atol=0, msg=f"H={n}")


def test_alibi_slopes_explicit_lists():
    want12 = [2.0 ** -e for e in (1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5)]
    want6 = [1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8]
    torch.testing.assert_close(posattn.alibi_slopes(12, dtype=F64), torch.tensor(want12, dtype=F64), rtol=1e-15, atol=0)
    torch.testing.assert_close(posattn.alibi_slopes(6, dtype=F64), torch.tensor(want6, dtype=F64), rtol=1e-15, atol=0)
    torch.testing.assert_close(posattn.alibi_slopes(8, dtype=F64), torch.tensor([2.0 ** -i for i in range(1, 9)],
                                                                               dtype=F64), rtol=1e-15, atol=0)


# --------------------------------------------------------------------------------------------------
# 4. xPos vs torchscale
# --------------------------------------------------------------------------------------------------
# A transcription of torchscale/component/xpos_relative_position.py (float64 throughout where
# torchscale uses float32 defaults, so that the comparison is exact up to rounding).

def ts_fixed_pos_embedding(x):
    seq_len, dim = x.shape
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, dtype=F64) / dim))
    sinusoid_inp = torch.einsum("i , j -> i j", torch.arange(0, seq_len, dtype=F64), inv_freq).to(x)
    return torch.sin(sinusoid_inp), torch.cos(sinusoid_inp)


def ts_rotate_every_two(x):
    x1 = x[:, :, ::2]
    x2 = x[:, :, 1::2]
    x = torch.stack((-x2, x1), dim=-1)
    return x.flatten(-2)


def ts_duplicate_interleave(m):
    dim0 = m.shape[0]
    m = m.view(-1, 1)
    m = m.repeat(1, 2)
    m = m.view(dim0, -1)
    return m


def ts_apply_rotary_pos_emb(x, sin, cos, scale=1):
    sin, cos = map(lambda t: ts_duplicate_interleave(t * scale), (sin, cos))
    return (x * cos) + (ts_rotate_every_two(x) * sin)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def half_apply_rotary_pos_emb(x, sin, cos, scale=1):
    # the same math with rotate_half pairs (t, t + D/2)
    sin, cos = map(lambda t: torch.cat((t * scale, t * scale), dim=-1), (sin, cos))
    return (x * cos) + (rotate_half(x) * sin)


class TorchscaleXPOS:
    def __init__(self, head_dim, scale_base=512, interleaved=True):
        self.head_dim = head_dim
        self.scale_base = scale_base
        self.scale = (torch.arange(0, head_dim, 2, dtype=F64) + 0.4 * head_dim) / (1.4 * head_dim)
        self.apply = ts_apply_rotary_pos_emb if interleaved else half_apply_rotary_pos_emb

    def __call__(self, x, offset=0, downscale=False):
        length = x.shape[1]
        min_pos = -(length + offset) // 2
        max_pos = length + offset + min_pos
        scale = self.scale ** torch.arange(min_pos, max_pos, 1).to(self.scale).div(self.scale_base)[:, None]
        sin, cos = ts_fixed_pos_embedding(scale)
        if scale.shape[0] > length:
            scale = scale[-length:]
            sin = sin[-length:]
            cos = cos[-length:]
        if downscale:
            scale = 1 / scale
        return self.apply(x, sin, cos, scale)


def torchscale_xpos_attention(q, k, v, offset, scale_base, interleaved, causal):
    B, H, L, D = q.shape
    S = k.shape[2]
    assert L + offset == S, "torchscale's centres coincide when q's offset + length = key length"
    xpos = TorchscaleXPOS(D, scale_base, interleaved)
    qx = xpos(q.reshape(B * H, L, D), offset=offset, downscale=False).reshape(B, H, L, D)
    kx = xpos(k.reshape(B * H, S, D), offset=0, downscale=True).reshape(B, H, S, D)
    s = qx @ kx.transpose(-1, -2) / math.sqrt(D)
    if causal:
        keep = torch.arange(S)[None, :] <= (offset + torch.arange(L))[:, None]
        s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


XPOS_CASES = [(16, 16, 0, True), (8, 40, 32, True), (1, 64, 63, True), (24, 24, 0, False), (5, 37, 32, False)]


@pytest.mark.parametrize("scale_base", [512, 16], ids=lambda b: f"base{b}")
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
@pytest.mark.parametrize("L, S, offset, causal", XPOS_CASES,
                         ids=[f"L{a}-S{b}-off{c}-{'causal' if d else 'full'}" for a, b, c, d in XPOS_CASES])
def test_xpos_matches_torchscale(L, S, offset, causal, interleaved, scale_base):
    B, H, D = 2, 3, 32
    q, k, v = (torch.randn(B, H, n, D, dtype=F64) for n in (L, S, S))
    want = torchscale_xpos_attention(q, k, v, offset, scale_base, interleaved, causal)
    got = posattn.reference.attention(q, k, v, causal=causal, q_pos=offset, k_pos=0,
                                      rope=posattn.XPos(scale_base=scale_base, interleaved=interleaved))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # and xPos is not plain RoPE: the decay changes the result
    rope = posattn.reference.attention(q, k, v, causal=causal, q_pos=offset,
                                       rope=posattn.RoPE(interleaved=interleaved))
    assert (rope - want).abs().max() > 1e-4


@pytest.mark.parametrize("kw", [
    dict(L=8, S=100, q_pos=92, causal=True, interleaved=True, scale_base=16.0),
    dict(L=100, S=100, q_pos=3000, causal=False, interleaved=False, scale_base=512.0, k_pos=2950),
    dict(L=1, S=130, q_pos=129, causal=True, interleaved=True, scale_base=512.0, dim=32),
], ids=["chunk-interleaved-base16", "full-half-shifted", "decode-partial-r32"])
def test_xpos_kernel(kw, device, backend):
    kw = dict(kw)
    L, S = kw.pop("L"), kw.pop("S")
    spec = posattn.XPos(scale_base=kw.pop("scale_base"), interleaved=kw.pop("interleaved"), dim=kw.pop("dim", None))
    q, k, v = (torch.randn(1, 2, n, 64, device=device) for n in (L, S, S))
    compare("xpos", attn_fn(backend, rope=spec, **kw), attn_fn("reference", rope=spec, **kw),
            dict(q=q, k=k, v=v))


# --------------------------------------------------------------------------------------------------
# 5. RotaryAngles
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("r, interleaved, separate_k", [(4, False, True), (2, True, True), (4, True, False)],
                         ids=["full-half-sepk", "partial-interleaved-sepk", "full-interleaved-shared"])
def test_rotary_angles_gradcheck(r, interleaved, separate_k):
    B, H, Hkv, L, S, D = 1, 2, (1 if separate_k else 2), 3, (4 if separate_k else 3), 4
    q = torch.randn(B, H, L, D, dtype=F64, requires_grad=True)
    k = torch.randn(B, Hkv, S, D, dtype=F64, requires_grad=True)
    v = torch.randn(B, Hkv, S, 3, dtype=F64, requires_grad=True)
    qa = (3 * torch.randn(B, H if separate_k else 1, L, r // 2, dtype=F64)).requires_grad_()
    ka = (3 * torch.randn(B, Hkv, S, r // 2, dtype=F64)).requires_grad_() if separate_k else None

    def fn(q, k, v, qa, *ka):
        spec = posattn.RotaryAngles(qa, ka[0] if ka else None, interleaved=interleaved)
        return posattn.reference.attention(q, k, v, rope=spec, causal=not separate_k)

    args = (q, k, v, qa) + ((ka,) if separate_k else ())
    assert torch.autograd.gradcheck(fn, args)


ANGLE_CASES = {
    # (a) separate q/k angles, GQA, L ≠ S, bottom-right causal
    "sepk-gqa-L63-S100": dict(B=1, H=4, Hkv=2, L=63, S=100, D=64, r=64, qa=(1, 4), ka=(1, 2),
                              kw=dict(causal=True, q_pos=37)),
    "sepk-gqa-L100-S40-full": dict(B=1, H=4, Hkv=2, L=100, S=40, D=32, r=32, qa=(1, 4), ka=(1, 1), kw={}),
    # (b) k_angles=None self-attention, angles broadcast over heads and batch
    "shared-1x1-B2": dict(B=2, H=2, Hkv=2, L=70, S=70, D=32, r=32, qa=(1, 1), ka=None, kw=dict(causal=True)),
    "shared-Bx1-B2": dict(B=2, H=2, Hkv=2, L=70, S=70, D=32, r=32, qa=(2, 1), ka=None, kw={}),
    "shared-1xH-B2": dict(B=2, H=2, Hkv=2, L=70, S=70, D=32, r=32, qa=(1, 2), ka=None, kw=dict(causal=True)),
    # interleaved pairs filling the head dim (the kernels sum each pair's gradient by a reshape)
    "full-r32-D32-interleaved": dict(B=1, H=2, Hkv=1, L=50, S=70, D=32, r=32, qa=(1, 2), ka=(1, 1),
                                     kw=dict(interleaved=True, causal=True)),
    # (c) partial rotary, interleaved pairs
    "partial-r32-D48-interleaved": dict(B=1, H=2, Hkv=2, L=63, S=90, D=48, r=32, qa=(1, 2), ka=(1, 2),
                                        kw=dict(interleaved=True)),
    "partial-r16-D64-interleaved-shared": dict(B=2, H=2, Hkv=1, L=64, S=64, D=64, r=16, qa=(2, 1), ka=None,
                                               kw=dict(interleaved=True, causal=True)),
    "partial-r48-D64-half": dict(B=1, H=2, Hkv=2, L=40, S=40, D=64, r=48, qa=(1, 2), ka=(1, 2), kw={}),
}


@pytest.mark.parametrize("name", list(ANGLE_CASES))
def test_rotary_angles_kernel(name, device, backend):
    c = ANGLE_CASES[name]
    kw = dict(c["kw"])
    interleaved = kw.pop("interleaved", False)
    inputs = dict(q=torch.randn(c["B"], c["H"], c["L"], c["D"]), k=torch.randn(c["B"], c["Hkv"], c["S"], c["D"]),
                  v=torch.randn(c["B"], c["Hkv"], c["S"], c["D"]),
                  qa=20 * torch.rand(*c["qa"], c["L"], c["r"] // 2))
    if c["ka"] is not None:
        inputs["ka"] = 20 * torch.rand(*c["ka"], c["S"], c["r"] // 2)
    inputs = {n: t.to(device) for n, t in inputs.items()}

    def make(backend):
        def fn(q, k, v, qa, ka=None):
            return posattn.attention(q, k, v, rope=posattn.RotaryAngles(qa, ka, interleaved=interleaved),
                                     backend=backend, **kw)
        return fn

    got = compare(name, make(backend), make("reference"), inputs)
    assert got["dqa"].abs().max() > 0
    if "ka" in inputs:
        assert got["dka"].abs().max() > 0


def test_rotary_angles_equal_rope_at_positions(device, backend):
    # RotaryAngles with angles pos·inv_freq is RoPE (kernel, both layouts)
    B, H, L, D = 1, 2, 70, 32
    pos = torch.arange(L, dtype=F64) + 500
    inv = 1.0 / 10000.0 ** (torch.arange(0, D, 2, dtype=F64) / D)
    ang = (pos[:, None] * inv[None])[None, None].to(device)
    q, k, v = (torch.randn(B, H, L, D, dtype=F64, device=device) for _ in range(3))
    for interleaved in (False, True):
        want = posattn.reference.attention(q, k, v, causal=True, q_pos=500, k_pos=500,
                                           rope=posattn.RoPE(interleaved=interleaved))
        got = posattn.reference.attention(q, k, v, causal=True,
                                          rope=posattn.RotaryAngles(ang, interleaved=interleaved))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # RoPE's inv_freq is float32
        got32 = posattn.attention(q.float(), k.float(), v.float(), causal=True, backend=backend,
                                  rope=posattn.RotaryAngles(ang.float(), interleaved=interleaved))
        torch.testing.assert_close(got32.double(), want, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# 6. CARoPE
# --------------------------------------------------------------------------------------------------

def test_carope_zero_weight_is_rope_at_m_plus_1():
    B, L, d_model, H, D = 2, 10, 8, 3, 16
    x = torch.randn(B, L, d_model, dtype=F64)
    ang = posattn.carope_angles(x, torch.zeros(d_model, H, dtype=F64), D)
    assert ang.shape == (B, H, L, D // 2) and ang.dtype == F64
    f = 1.0 / (math.log(2) + 1)
    inv = f ** torch.arange(D // 2, dtype=F64)
    want = (torch.arange(1, L + 1, dtype=F64)[:, None] * inv[None]).expand(B, H, L, D // 2)
    torch.testing.assert_close(ang, want, rtol=1e-13, atol=1e-13)
    # through attention: CARoPE(W = 0) = RoPE(inv_freq = f^i) with positions starting at 1
    q, k, v = (torch.randn(B, H, L, D, dtype=F64) for _ in range(3))
    got = posattn.reference.attention(q, k, v, causal=True, rope=posattn.RotaryAngles(ang))
    want = posattn.reference.attention(q, k, v, causal=True, q_pos=1, k_pos=1, rope=posattn.RoPE(inv_freq=inv))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # RoPE's inv_freq runs in float32


def test_carope_angles_nonzero_weight_formula():
    B, L, d_model, H, D = 1, 6, 5, 2, 8
    x, W = torch.randn(B, L, d_model, dtype=F64), torch.randn(d_model, H, dtype=F64)
    ang = posattn.carope_angles(x, W, D)
    f = 1.0 / (F.softplus(x @ W) + 1.0)  # [B, L, H]
    assert torch.all((f > 0) & (f < 1))
    want = torch.zeros(B, H, L, D // 2, dtype=F64)
    for m in range(L):
        for i in range(D // 2):
            want[:, :, m, i] = (f[:, : m + 1, :] ** i).sum(dim=1)
    torch.testing.assert_close(ang, want, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(ang[..., 0], torch.arange(1, L + 1, dtype=F64).expand(B, H, L))  # i = 0: +1 per token


def test_carope_angles_gradcheck():
    x = torch.randn(2, 5, 3, dtype=F64, requires_grad=True)
    W = torch.randn(3, 2, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, W: posattn.carope_angles(x, W, 6), (x, W))


@pytest.mark.parametrize("B, H, L, D", [(1, 2, 64, 32), (2, 2, 100, 16)], ids=["B1-H2-L64-D32", "B2-H2-L100-D16"])
def test_carope_attention_kernel(B, H, L, D, device, backend):
    d_model = 12
    inputs = dict(x=torch.randn(B, L, d_model), weight=0.5 * torch.randn(d_model, H),
                  q=torch.randn(B, H, L, D), k=torch.randn(B, H, L, D), v=torch.randn(B, H, L, D))
    inputs = {n: t.to(device) for n, t in inputs.items()}

    def make(backend):
        def fn(x, weight, q, k, v):
            ang = posattn.carope_angles(x, weight, D)
            return posattn.attention(q, k, v, causal=True, rope=posattn.RotaryAngles(ang), backend=backend)
        return fn

    got = compare("carope", make(backend), make("reference"), inputs)
    assert got["dweight"].abs().max() > 0 and got["dx"].abs().max() > 0


# --------------------------------------------------------------------------------------------------
# 7. RoPE's relative property
# --------------------------------------------------------------------------------------------------

REL_SPECS = {
    "rope": lambda: posattn.RoPE(),
    "rope-interleaved-r32": lambda: posattn.RoPE(dim=32, interleaved=True),
    "rope-llama3": lambda: posattn.RoPE(theta=5e5, scaling=dict(LLAMA3)),
    "xpos": lambda: posattn.XPos(scale_base=64.0),
}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("spec", list(REL_SPECS))
def test_rope_shift_invariance(spec, causal, device, backend):
    rope = REL_SPECS[spec]()
    B, H, L, S, D, shift = 1, 2, 63, 100, 64, 1000
    q, k, v = (torch.randn(B, H, n, D, device=device) for n in (L, S, S))
    base = dict(rope=rope, causal=causal, q_pos=S - L, k_pos=0)
    shifted = dict(rope=rope, causal=causal, q_pos=S - L + shift, k_pos=shift)
    # exact in float64
    ref0 = posattn.reference.attention(q.double(), k.double(), v.double(), **base)
    ref1 = posattn.reference.attention(q.double(), k.double(), v.double(), **shifted)
    torch.testing.assert_close(ref1, ref0, rtol=1e-9, atol=1e-9)
    # the kernel at the shifted positions is the unshifted result
    low = posattn.reference.attention(q, k, v, **shifted)
    got = posattn.attention(q, k, v, backend=backend, **shifted)
    assert_close(f"{spec}-shifted", got, ref0, low)
    got0 = posattn.attention(q, k, v, backend=backend, **base)
    torch.testing.assert_close(got, got0, rtol=1e-3, atol=1e-3)
    # control: shifting q alone changes the result
    q_only = posattn.attention(q, k, v, backend=backend, rope=rope, causal=causal, q_pos=S - L + 7, k_pos=0)
    assert (q_only - got0).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------------
# 8. Done-when A: LLaMA-3 attention with llama3 RoPE scaling, positions past 8192 (and other scalings)
# --------------------------------------------------------------------------------------------------

# (HF rope parameters, posattn's extra keys, max_position_embeddings); positions 9000 … 9099
LLAMA_SCALINGS = {
    "llama3": (dict(LLAMA3), {}, 131072),
    # the same layer with other HF scalings: YaRN's attention factor multiplies cos and sin,
    # LongRoPE switches to the long list past the original length, dynamic NTK re-bases
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}, {}, 16384),
    "longrope": ({"rope_type": "longrope", "short_factor": _LR32[0], "long_factor": _LR32[1],
                  "original_max_position_embeddings": 4096, "factor": 32.0}, {}, 131072),
    "dynamic": ({"rope_type": "dynamic", "factor": 2.0}, {"original_max_position_embeddings": 2048}, 2048),
}
LLAMA_CASES = [("llama3", 64, "offset"), ("llama3", 64, "tensor"), ("llama3", 128, "offset"), ("yarn", 64, "offset"),
               ("longrope", 64, "tensor"), ("dynamic", 64, "offset")]


@pytest.mark.parametrize("scaling, head_dim, positions", LLAMA_CASES,
                         ids=[f"{a}-D{b}-{c}" for a, b, c in LLAMA_CASES])
def test_llama_attention_matches_hf(scaling, head_dim, positions, device, backend):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb, repeat_kv

    params, extra, max_pos = LLAMA_SCALINGS[scaling]
    H, Hkv, L, start = 4, 2, 100, 9000
    cfg = LlamaConfig(hidden_size=H * head_dim, num_attention_heads=H, num_key_value_heads=Hkv, head_dim=head_dim,
                      max_position_embeddings=max_pos, rope_theta=5e5, rope_parameters=copy.deepcopy(params))
    position_ids = (start + torch.arange(L, device=device))[None]

    def hf(q, k, v):
        # A fresh module per call (dynamic/longrope keep state), run on CPU: dynamic and longrope
        # recompute their frequencies on the input's device, and CUDA's pow can differ from the
        # CPU's by an ulp, which at positions 9000+ moves angles by ~1e-3.
        rotary = LlamaRotaryEmbedding(cfg)
        cos, sin = (t.to(device) for t in rotary(q.cpu(), position_ids.cpu()))
        qe, ke = apply_rotary_pos_emb(q, k, cos, sin)
        return F.scaled_dot_product_attention(qe, repeat_kv(ke, H // Hkv), repeat_kv(v, H // Hkv), is_causal=True)

    pos = dict(q_pos=start, k_pos=start) if positions == "offset" else dict(q_pos=position_ids[0],
                                                                           k_pos=position_ids)
    spec = posattn.RoPE(theta=5e5, scaling={**params, **extra})

    def ours(q, k, v):
        return posattn.attention(q, k, v, causal=True, rope=spec, backend=backend, **pos)

    inputs = dict(q=torch.randn(1, H, L, head_dim, device=device), k=torch.randn(1, Hkv, L, head_dim, device=device),
                  v=torch.randn(1, Hkv, L, head_dim, device=device))
    compare(f"llama-{scaling}-D{head_dim}", ours, hf, inputs)
    # the scaling matters at positions 9000+: plain RoPE gives another result
    q, k, v = (t.float() for t in inputs.values())
    plain = posattn.attention(q, k, v, causal=True, rope=posattn.RoPE(theta=5e5), backend=backend, **pos)
    assert (plain - hf(q, k, v)).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------
# 9. Done-when B: T5Attention (encoder, decoder, decoder with a KV cache)
# --------------------------------------------------------------------------------------------------

def _t5_module(is_decoder):
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5Attention

    cfg = T5Config(d_model=64, d_kv=16, num_heads=4, relative_attention_num_buckets=32,
                   relative_attention_max_distance=128, dropout_rate=0.0, is_decoder=is_decoder)
    cfg._attn_implementation = "eager"
    m = T5Attention(cfg, has_relative_attention_bias=True, layer_idx=0, is_causal=is_decoder).double().eval()
    return m


def _causal_additive(L, S, offset, dtype, device):
    keep = torch.arange(S, device=device)[None, :] <= (offset + torch.arange(L, device=device))[:, None]
    return torch.zeros(L, S, dtype=dtype, device=device).masked_fill(~keep, torch.finfo(dtype).min)[None, None]


def _t5_posattn(m, h_new, h_all, is_decoder, q_offset, backend):
    B, L, _ = h_new.shape
    S = h_all.shape[1]
    H, dk = m.n_heads, m.key_value_proj_dim
    q = m.q(h_new).view(B, L, H, dk).transpose(1, 2)
    k = m.k(h_all).view(B, S, H, dk).transpose(1, 2)
    v = m.v(h_all).view(B, S, H, dk).transpose(1, 2)
    bias = posattn.T5Bias(m.relative_attention_bias.weight.t(), bidirectional=not is_decoder,
                          max_distance=m.relative_attention_max_distance)
    out = posattn.attention(q, k, v, scale=1.0, bias=bias, causal=is_decoder, q_pos=q_offset, backend=backend)
    return m.o(out.transpose(1, 2).reshape(B, L, H * dk))


def _t5_hf(m, h_past, h_new, is_decoder):
    from transformers.cache_utils import DynamicCache

    dtype, device = h_new.dtype, h_new.device
    if h_past is None:
        L = h_new.shape[1]
        mask = _causal_additive(L, L, 0, dtype, device) if is_decoder else None
        out, position_bias, _ = m(h_new, mask=mask)
        return out
    P, N = h_past.shape[1], h_new.shape[1]
    cache = DynamicCache()
    m(h_past, mask=_causal_additive(P, P, 0, dtype, device), past_key_values=cache)
    out, position_bias, _ = m(h_new, mask=_causal_additive(N, P + N, P, dtype, device), past_key_values=cache)
    assert position_bias.shape == (1, m.n_heads, N, P + N)
    return out


def _t5_run(kind, m, h_past, h_new, is_decoder, dtype, dout):
    """kind: "hf" (HF's T5Attention) or a posattn kernel backend."""
    m = copy.deepcopy(m).to(dtype)
    h_new = h_new.detach().to(dtype).requires_grad_()
    h_past = None if h_past is None else h_past.detach().to(dtype).requires_grad_()
    if kind == "hf":
        out = _t5_hf(m, h_past, h_new, is_decoder)
    else:
        h_all = h_new if h_past is None else torch.cat((h_past, h_new), dim=1)
        out = _t5_posattn(m, h_new, h_all, is_decoder, 0 if h_past is None else h_past.shape[1], kind)
    (out.double() * dout).sum().backward()
    res = {"out": out.detach(), "dh": h_new.grad}
    if h_past is not None:
        res["dh_past"] = h_past.grad
    for name, p in m.named_parameters():
        res[f"d{name}"] = p.grad
    return res


T5_LAYER_CASES = {"encoder-L70": (False, 0, 70), "decoder-L70": (True, 0, 70), "decoder-cache-P50-N20": (True, 50, 20),
                  "decoder-cache-P120-N1": (True, 120, 1), "encoder-L130": (False, 0, 130)}


@pytest.mark.parametrize("name", list(T5_LAYER_CASES))
def test_t5_attention_matches_hf(name, device, backend):
    is_decoder, P, N = T5_LAYER_CASES[name]
    B = 1
    m = _t5_module(is_decoder).to(device)
    h_new = torch.randn(B, N, 64, dtype=F64, device=device)
    h_past = torch.randn(B, P, 64, dtype=F64, device=device) if P else None
    dout = torch.randn(B, N, 64, dtype=F64, device=device)
    ref = _t5_run("hf", m, h_past, h_new, is_decoder, F64, dout)
    low = _t5_run("hf", m, h_past, h_new, is_decoder, F32, dout)
    got = _t5_run(backend, m, h_past, h_new, is_decoder, F32, dout)
    assert set(got) == set(ref) and "drelative_attention_bias.weight" in ref
    for key in ref:
        assert_close(f"t5-{name}-{key}", got[key], ref[key], low[key])
    # the bias matters: without it the result differs
    assert ref["drelative_attention_bias.weight"].abs().max() > 0


def test_t5_compute_bias_with_query_offset():
    # HF's compute_bias with past_seen_tokens = T5Bias.reference_bias with q_pos offset
    for is_decoder in (False, True):
        m = _t5_module(is_decoder)
        hf = m.compute_bias(20, 300, past_seen_tokens=280)
        spec = posattn.T5Bias(m.relative_attention_bias.weight.t(), bidirectional=not is_decoder, max_distance=128)
        ours = spec.reference_bias(torch.arange(280, 300)[None], torch.arange(300)[None], 4)
        assert torch.equal(ours, hf)


# --------------------------------------------------------------------------------------------------
# 10. spec validation errors
# --------------------------------------------------------------------------------------------------

def _qkv(D=32, L=8, S=8, H=2, Hkv=2, B=1):
    return torch.randn(B, H, L, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)


CALL_ERRORS = {
    "rope-odd-dim": (dict(rope=posattn.RoPE(dim=7)), {}, ValueError, r"rotary dim 7 must be even"),
    "rope-dim-gt-D": (dict(rope=posattn.RoPE(dim=64)), {}, ValueError, r"rotary dim 64 .* at most the head dim 32"),
    "xpos-odd-dim": (dict(rope=posattn.XPos(dim=5)), {}, ValueError, r"XPos: rotary dim 5"),
    "angles-odd-dim-D": (dict(rope=posattn.RotaryAngles(torch.zeros(1, 1, 8, 20))), {}, ValueError,
                         r"rotary dim 40 .* at most the head dim 32"),
    "angles-wrong-rows": (dict(rope=posattn.RotaryAngles(torch.zeros(1, 1, 7, 16))), {}, ValueError,
                          r"q_angles has shape \(1, 1, 7, 16\)"),
    "angles-wrong-heads": (dict(rope=posattn.RotaryAngles(torch.zeros(1, 3, 8, 16), torch.zeros(1, 2, 8, 16))), {},
                           ValueError, r"q_angles has shape \(1, 3, 8, 16\)"),
    "angles-wrong-batch": (dict(rope=posattn.RotaryAngles(torch.zeros(1, 2, 8, 16), torch.zeros(3, 2, 8, 16))), {},
                           ValueError, r"k_angles has shape \(3, 2, 8, 16\)"),
    "angles-pair-mismatch": (dict(rope=posattn.RotaryAngles(torch.zeros(1, 2, 8, 16), torch.zeros(1, 2, 8, 8))), {},
                             ValueError, r"share r/2 = 16"),
    "angles-shared-L-ne-S": (dict(rope=posattn.RotaryAngles(torch.zeros(1, 2, 8, 16))), dict(S=9), ValueError,
                             r"needs L == S"),
    "angles-shared-gqa": (dict(rope=posattn.RotaryAngles(torch.zeros(1, 4, 8, 16))), dict(H=4, Hkv=2), ValueError,
                          r"q_angles has 4 heads but k has 2"),
    "alibi-wrong-heads": (dict(bias=posattn.ALiBi(torch.ones(3))), {}, ValueError, r"ALiBi slopes have shape \(3,\)"),
    "alibi-wrong-batch": (dict(bias=posattn.ALiBi(torch.ones(3, 2))), dict(B=2), ValueError,
                          r"ALiBi slopes have shape \(3, 2\)"),
    "alibi-per-batch-slopes-B1": (dict(bias=posattn.ALiBi(torch.ones(2, 2))), {}, ValueError,
                                  r"ALiBi slopes have shape \(2, 2\)"),
    "relative-wrong-heads": (dict(bias=posattn.RelativeBias(torch.zeros(3, 9))), {}, ValueError,
                             r"RelativeBias table has 3 heads"),
    "t5-wrong-heads": (dict(bias=posattn.T5Bias(torch.zeros(4, 32))), {}, ValueError, r"T5Bias table has 4 heads"),
    "manhattan-wrong-heads": (dict(bias=posattn.ManhattanDecay(torch.zeros(5), width=4)), {}, ValueError,
                              r"log_gamma has 5 heads"),
    "urpe-wrong-heads": (dict(urpe=posattn.URPE(torch.zeros(1, 9))), {}, ValueError, r"URPE table has 1 heads"),
    "rope-unknown-type": (dict(rope=posattn.RoPE(scaling={"rope_type": "ntk-by-parts"})), {}, ValueError,
                          r"rope_type='ntk-by-parts' is not supported"),
    "rope-linear-no-factor": (dict(rope=posattn.RoPE(scaling={"rope_type": "linear"})), {}, ValueError,
                              r"'linear' needs the key 'factor'"),
    "rope-llama3-no-low": (dict(rope=posattn.RoPE(scaling={k: v for k, v in LLAMA3.items()
                                                           if k != "low_freq_factor"})), {}, ValueError,
                           r"'llama3' needs the key 'low_freq_factor'"),
    "rope-yarn-no-length": (dict(rope=posattn.RoPE(scaling={"rope_type": "yarn", "factor": 4.0})), {}, ValueError,
                            r"'yarn' needs 'original_max_position_embeddings'"),
    "rope-dynamic-no-factor": (dict(rope=posattn.RoPE(scaling={"rope_type": "dynamic",
                                                               "original_max_position_embeddings": 16})),
                               {}, ValueError, r"'dynamic' needs the key 'factor'"),
    # positions 0..7 lie past the original length 4, so the long list is needed
    "rope-longrope-no-long": (dict(rope=posattn.RoPE(scaling={"rope_type": "longrope", "short_factor": [1.0] * 16,
                                                              "factor": 2.0, "original_max_position_embeddings": 4})),
                              {}, ValueError, r"'longrope' needs the key 'long_factor'"),
    "rope-longrope-no-factor": (dict(rope=posattn.RoPE(scaling={"rope_type": "longrope", "short_factor": [1.0] * 16,
                                                                "long_factor": [1.0] * 16,
                                                                "original_max_position_embeddings": 16})),
                                {}, ValueError, r"'longrope' needs the key 'max_position_embeddings'"),
    "rope-longrope-list-length": (dict(rope=posattn.RoPE(scaling={"rope_type": "longrope", "short_factor": [1.0] * 8,
                                                                  "long_factor": [1.0] * 8, "factor": 2.0,
                                                                  "original_max_position_embeddings": 16})),
                                  {}, ValueError, r"need rotary_dim/2 = 16 entries, got 8"),
    "rope-spec-as-bias": (dict(bias=posattn.RoPE()), {}, TypeError, r"(?s)bias=.* must be posattn.ALiBi"),
    "bias-spec-as-rope": (dict(rope=posattn.ALiBi(torch.ones(2))), {}, TypeError, r"(?s)rope=.* must be posattn.RoPE"),
    "tensor-as-bias": (dict(bias=torch.zeros(1, 2, 8, 8)), {}, TypeError, r"dense bias tensor goes in attn_mask"),
    "relative-as-urpe": (dict(urpe=posattn.RelativeBias(torch.zeros(2, 9))), {}, TypeError,
                         r"(?s)urpe=.* must be posattn.URPE"),
    "urpe-as-bias": (dict(bias=posattn.URPE(torch.zeros(2, 9))), {}, TypeError, r"(?s)bias=.* must be posattn.ALiBi"),
}


@pytest.mark.parametrize("backend", ["reference", TRITON, CPU])
@pytest.mark.parametrize("name", list(CALL_ERRORS))
def test_call_time_errors(name, backend):
    kw, shape, exc, match = CALL_ERRORS[name]
    q, k, v = _qkv(**shape)
    with pytest.raises(exc, match=match):
        posattn.attention(q, k, v, backend=backend, **kw)


CONSTRUCTION_ERRORS = {
    "angles-3d": (lambda: posattn.RotaryAngles(torch.zeros(2, 8, 16)), ValueError, r"q_angles must be a 4-D float"),
    "angles-int": (lambda: posattn.RotaryAngles(torch.zeros(1, 1, 8, 16, dtype=torch.long)), ValueError,
                   r"q_angles must be a 4-D float"),
    "k-angles-3d": (lambda: posattn.RotaryAngles(torch.zeros(1, 1, 8, 16), torch.zeros(8, 16)), ValueError,
                    r"k_angles must be a 4-D float"),
    "alibi-3d-slopes": (lambda: posattn.ALiBi(torch.ones(1, 2, 3)), ValueError,
                        r"slopes must be \(H,\) or \(B, H\), got shape \(1, 2, 3\)"),
    "alibi-int-slopes": (lambda: posattn.ALiBi(torch.ones(4, dtype=torch.long)), TypeError,
                         r"ALiBi slopes must be a float tensor"),
    "relative-even-width": (lambda: posattn.RelativeBias(torch.zeros(2, 8)), ValueError,
                            r"RelativeBias table must be \[H, 2M\+1\] \(odd width\), got \(2, 8\)"),
    "relative-1d": (lambda: posattn.RelativeBias(torch.zeros(9)), ValueError, r"\[H, 2M\+1\]"),
    "urpe-even-width": (lambda: posattn.URPE(torch.zeros(2, 10)), ValueError, r"URPE table must be \[H, 2M\+1\]"),
    "t5-max-distance-small": (lambda: posattn.T5Bias(torch.zeros(2, 32), max_distance=8), ValueError,
                              r"max_distance > 8 .*got max_distance=8"),
    "t5-causal-max-distance-small": (lambda: posattn.T5Bias(torch.zeros(2, 32), bidirectional=False,
                                                            max_distance=16),
                                     ValueError, r"max_distance > 16"),
    "t5-1d-table": (lambda: posattn.T5Bias(torch.zeros(32)), ValueError, r"T5Bias table must be \[H, num_buckets\]"),
    "manhattan-width-0": (lambda: posattn.ManhattanDecay(torch.zeros(2), width=0), ValueError,
                          r"width=0 must be a positive int"),
    "manhattan-2d-gamma": (lambda: posattn.ManhattanDecay(torch.zeros(2, 2), width=4), ValueError,
                           r"log_gamma must be \(H,\)"),
    "rope-inv-freq-grad": (lambda: posattn.RoPE(inv_freq=torch.ones(8, requires_grad=True)), ValueError,
                           r"inv_freq does not receive gradients"),
    "rope-inv-freq-and-scaling": (lambda: posattn.RoPE(inv_freq=torch.ones(8), scaling={"rope_type": "linear",
                                                                                      "factor": 2.0}),
                                  ValueError, r"either inv_freq or scaling"),
    "rope-inv-freq-dim-mismatch": (lambda: posattn.RoPE(inv_freq=torch.ones(8), dim=8), ValueError,
                                   r"dim=8 but inv_freq has 8 entries"),
    "rope-scaling-not-dict": (lambda: posattn.RoPE(scaling="llama3"), TypeError, r"scaling must be a dict"),
    "rope-theta-le-1": (lambda: posattn.RoPE(theta=1.0), ValueError, r"theta=1.0 must be a number > 1"),
    "xpos-scale-base-0": (lambda: posattn.XPos(scale_base=0), ValueError, r"scale_base=0 must be > 0"),
    "alibi-slopes-0-heads": (lambda: posattn.alibi_slopes(0), ValueError, r"num_heads=0 must be a positive int"),
    "carope-bad-shapes": (lambda: posattn.carope_angles(torch.zeros(2, 3), torch.zeros(3, 2), 8), ValueError,
                          r"x must be \[B, L, d_model\]"),
    "carope-odd-head-dim": (lambda: posattn.carope_angles(torch.zeros(1, 2, 3), torch.zeros(3, 2), 7), ValueError,
                            r"head_dim=7 must be even"),
    "rope-frequencies-unknown": (lambda: rope_frequencies(10000.0, 32, {"rope_type": "su"}), ValueError,
                                 r"rope_type='su' is not supported"),
    "rope-frequencies-missing": (lambda: rope_frequencies(10000.0, 32, {"rope_type": "yarn", "factor": 2.0}),
                                 ValueError, r"needs 'original_max_position_embeddings'"),
}


@pytest.mark.parametrize("name", list(CONSTRUCTION_ERRORS))
def test_construction_errors(name):
    make, exc, match = CONSTRUCTION_ERRORS[name]
    with pytest.raises(exc, match=match):
        make()
