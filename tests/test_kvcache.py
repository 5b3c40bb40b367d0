"""posattn.attention_with_kvcache: decoding over a KV cache updated in place.

The reference backend is checked first against posattn.reference.attention over the whole
sequence (a decode step is the last rows of one causal attention); the kernel backends are then
checked against the reference in float64 with tests/tolerance.py: outputs, lse, and the cache
after the call (the new rows rotated at their positions, every other slot untouched).
"""
from dataclasses import dataclass, field

import pytest
import torch

import posattn
from conftest import CPU, HAS_CUDA, TRITON, backend_device, requires_ext
from tolerance import assert_close

KERNELS = [TRITON, CPU]
# bf16 Triton runs on CUDA only (tl.dot on bf16 is broken in the interpreter)
HALF = [pytest.param("triton", torch.float16, id="triton-float16")] + (
    [pytest.param("triton", torch.bfloat16, id="triton-bfloat16")] if HAS_CUDA else []) + [
    pytest.param("cpu", dt, id=f"cpu-{str(dt)[6:]}", marks=requires_ext) for dt in (torch.bfloat16, torch.float16)]
LENS = (0, 1, 63, 130, 1000)


@dataclass
class Case:
    lens: tuple = LENS
    L: int = 1
    H: int = 8
    Hkv: int = 1
    D: int = 32
    Dv: int = None
    new: bool = True           # k / v appended by the call
    page: int = 0              # 0: contiguous caches; else the page size of a paged cache
    batch_idx: bool = False    # a permuted cache_batch_idx (contiguous caches)
    kw: dict = field(default_factory=dict)
    spec: str = None

    def __post_init__(self):
        self.Dv = self.D if self.Dv is None else self.Dv

    @property
    def id(self):
        parts = ["S" + "_".join(map(str, self.lens)), f"L{self.L}", f"H{self.H}-{self.Hkv}", f"D{self.D}"]
        parts += ["new" if self.new else "cached"]
        parts += [f"page{self.page}"] if self.page else []
        parts += ["idx"] if self.batch_idx else []
        parts += [k if v is True else f"{k}{v}" for k, v in self.kw.items()]
        parts += [self.spec] if self.spec else []
        return "-".join(str(p).replace(" ", "") for p in parts)


def specs(name, H, B):
    g = torch.Generator().manual_seed(3)
    if name is None:
        return {}
    if name.startswith("rope"):
        kw = {"rope": posattn.RoPE(theta=500.0), "rope-interleaved-partial": posattn.RoPE(dim=16, interleaved=True),
              "rope-llama3": posattn.RoPE(theta=5e5, scaling={"rope_type": "llama3", "factor": 8.0,
                                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                              "original_max_position_embeddings": 256}),
              "rope-dynamic": posattn.RoPE(scaling={"rope_type": "dynamic", "factor": 2.0,
                                                    "original_max_position_embeddings": 128})}[name]
        return {"rope": kw}
    table = torch.randn(H, 2 * 9 + 1, generator=g, dtype=torch.float64)
    return {"bias": {"alibi": posattn.ALiBi(posattn.alibi_slopes(H).double()),
                     "alibi-per-row": posattn.ALiBi(torch.rand(B, H, generator=g, dtype=torch.float64)),
                     "rel": posattn.RelativeBias(table),
                     "t5": posattn.T5Bias(torch.randn(H, 16, generator=g, dtype=torch.float64), bidirectional=False,
                                          max_distance=64),
                     "manhattan": posattn.ManhattanDecay(-torch.rand(H, generator=g, dtype=torch.float64), 17)}[name]}


def cast_spec(kw, dtype):
    """The spec tensors in the run's dtype (bias parameters stay float for the kernels)."""
    out = dict(kw)
    if "bias" in kw:
        b = kw["bias"]
        t = {posattn.ALiBi: "slopes", posattn.RelativeBias: "table", posattn.T5Bias: "table",
             posattn.ManhattanDecay: "log_gamma"}[type(b)]
        fields = {k: v for k, v in vars(b).items()}
        fields[t] = fields[t].to(torch.float32 if dtype != torch.float64 else torch.float64)
        out["bias"] = type(b)(**fields)
    return out


def make(c: Case, device="cpu", seed=0):
    """q, caches (float64, filled with random rows everywhere: stale slots must not be read),
    new k / v, cache_seqlens, cache_batch_idx, block_table."""
    torch.manual_seed(seed)
    B = len(c.lens)
    cap = max(c.lens) + c.L + 5
    q = torch.randn(B, c.H, c.L, c.D, dtype=torch.float64)
    kn = torch.randn(B, c.Hkv, c.L, c.D, dtype=torch.float64) if c.new else None
    vn = torch.randn(B, c.Hkv, c.L, c.Dv, dtype=torch.float64) if c.new else None
    lens = torch.tensor(c.lens, dtype=torch.int32)
    if not c.new:
        lens = lens + c.L  # the queries' own rows are already cached
    idx = table = None
    if c.page:
        per_row = -(-cap // c.page)
        pages = torch.randperm(B * per_row + 3)[:B * per_row].reshape(B, per_row).to(torch.int32)
        table = pages
        kc = torch.randn(B * per_row + 3, c.Hkv, c.page, c.D, dtype=torch.float64)
        vc = torch.randn(B * per_row + 3, c.Hkv, c.page, c.Dv, dtype=torch.float64)
    else:
        rows = B + 2 if c.batch_idx else B
        kc = torch.randn(rows, c.Hkv, cap, c.D, dtype=torch.float64)
        vc = torch.randn(rows, c.Hkv, cap, c.Dv, dtype=torch.float64)
        if c.batch_idx:
            idx = torch.randperm(rows)[:B].to(torch.int32)
    t = dict(q=q, k_cache=kc, v_cache=vc, k=kn, v=vn, cache_seqlens=lens, cache_batch_idx=idx, block_table=table)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}


def run(t, backend, dtype, kw):
    """One call on copies of the caches in ``dtype``: (out, lse, k_cache, v_cache)."""
    x = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in t.items()}
    x = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in x.items()}
    q, kc, vc, kn, vn = (x.pop(n) for n in ("q", "k_cache", "v_cache", "k", "v"))
    out, lse = posattn.attention_with_kvcache(q, kc, vc, kn, vn, **x, **cast_spec(kw, dtype), return_lse=True,
                                              backend=backend)
    return {"out": out, "lse": lse, "k_cache": kc, "v_cache": vc}


CASES = [
    Case(spec="rope"),
    Case(L=3, page=16, kw={"window": (40, 0)}, spec="alibi"),
    Case(L=16, H=4, Hkv=2, page=1, kw={"softcap": 2.0}, spec="t5"),
    Case(L=1, new=False, batch_idx=True, spec="rel"),
    Case(L=3, page=64, H=4, Hkv=4, D=24, Dv=40, spec="manhattan"),
    Case(L=3, H=4, Hkv=2, spec="rope-interleaved-partial"),
    Case(L=1, page=7, spec="rope-llama3"),
    Case(L=2, new=False, spec="rope-dynamic"),
    Case(L=3, H=4, Hkv=2, kw={"causal": False, "window": (8, 2)}, spec="alibi-per-row"),
]


def check(c: Case, backend, dtype=torch.float32, **extra):
    device = backend_device(backend)
    t = make(c, device)
    kw = {**c.kw, **specs(c.spec, c.H, len(c.lens)), **extra}
    ref = run(t, "reference", torch.float64, kw)
    low = run(t, "reference", dtype, kw)
    got = run(t, backend, dtype, kw)
    for name in ("out", "lse"):
        assert_close(f"{c.id}-{name}", got[name], ref[name], low[name].to(got[name].dtype))
    for name in ("k_cache", "v_cache"):  # written slots close to the reference, the rest bitwise untouched
        before = t[name].to(dtype)
        changed = (ref[name] != t[name]).any(dim=-1, keepdim=True).expand_as(ref[name])
        assert torch.equal(got[name][~changed], before[~changed]), f"{name}: a slot outside the new rows changed"
        assert_close(f"{c.id}-{name}", got[name][changed], ref[name][changed], low[name][changed])
    return got


def test_reference_is_the_last_rows_of_one_attention():
    """The oracle's own check: for each batch row, the decode step's output equals the last L rows
    of one causal posattn.reference.attention over the whole (updated) sequence, positions 0..S_b−1."""
    c = Case(L=3, page=16, H=4, Hkv=2, kw={"window": (50, 0)}, spec="rope")
    t = make(c)
    kw = {**c.kw, **specs(c.spec, c.H, len(c.lens))}
    got = run(t, "reference", torch.float64, kw)
    for b, n in enumerate(c.lens):
        S = n + c.L
        page, slot = posattn.decode._rows(got["k_cache"], b, S, None, t["block_table"])
        k_rot = got["k_cache"][page, :, slot].transpose(0, 1)[None]
        v = got["v_cache"][page, :, slot].transpose(0, 1)[None]
        # the cached rows are rotated keys: compare against attention with q rotated the same way
        pos = torch.arange(S - c.L, S)[None]
        q_rot = kw["rope"].reference_rotate(t["q"][b:b + 1], t["q"][b:b + 1], pos, pos)[0]
        full = posattn.reference.attention(q_rot, k_rot, v, causal=True, window=(50, 0), q_pos=S - c.L)
        assert torch.allclose(got["out"][b:b + 1], full, atol=1e-12)
        # and the appended rows are the new keys rotated at positions n .. n + L − 1
        new_rot = kw["rope"].reference_rotate(t["k"][b:b + 1], t["k"][b:b + 1], pos, pos)[1]
        assert torch.allclose(k_rot[:, :, n:], new_rot, atol=1e-12)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("c", CASES, ids=lambda c: c.id)
def test_kernel(c, backend):
    check(c, backend)


@pytest.mark.parametrize("backend, dtype", HALF)
def test_kernel_half(backend, dtype):
    check(Case(L=3, page=16, H=8, Hkv=2, D=64), backend, dtype, rope=posattn.RoPE())


@requires_ext
@pytest.mark.parametrize("isa", ["amx", "avx512bf16", "avx512", "avx2", "generic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_every_cpu_path(isa, dtype, monkeypatch):
    """Each instruction-set build of the C++ decode kernel (POSATTN_CPU_ISA), odd head dims (the
    vector loads' tails), against the reference."""
    if isa not in posattn.ops.cpu_isas():
        pytest.skip(f"this CPU (or its OS) does not run the {isa} path")
    monkeypatch.setenv("POSATTN_CPU_ISA", isa)
    check(Case(lens=(0, 70, 300), L=3, H=4, Hkv=2, D=40, Dv=24, page=16, kw={"softcap": 3.0}), "cpu", dtype,
          rope=posattn.RoPE(dim=24))


BF16_TILES = [
    Case(lens=(0, 130, 700), H=8, Hkv=2, D=64),  # contiguous: the AMX scores read the cache rows in place
    Case(lens=(300, 1), L=3, H=32, Hkv=1, D=64, batch_idx=True),  # MQA: 96 rows in two row blocks
    Case(lens=(260,), L=2, H=8, Hkv=1, D=40, Dv=24, page=24, spec="alibi"),  # fp32 scores, bf16 p·v
    Case(lens=(400, 20), H=4, Hkv=2, D=96, page=32, spec="rope"),
    Case(lens=(1000, 200), H=20, Hkv=1, D=128, page=64),  # 64-key products in pages; 20 rows: a partial 16-row block
]


@requires_ext
@pytest.mark.parametrize("isa", ["amx", "avx512bf16"])
@pytest.mark.parametrize("c", BF16_TILES, ids=lambda c: c.id)
def test_bf16_tile_products(isa, c, monkeypatch):
    """bf16 caches: the full interior key tiles multiply in bf16 (p·v with V paired from the cache;
    on AMX q·kᵀ too, 64 cache rows at a time, or 16 in pages of 16k slots), the other tiles
    in fp32; both against the reference, on GQA and MQA groups, odd head dims and pages that split
    a 16-row block."""
    if isa not in posattn.ops.cpu_isas():
        pytest.skip(f"this CPU (or its OS) does not run the {isa} path")
    monkeypatch.setenv("POSATTN_CPU_ISA", isa)
    check(c, "cpu", torch.bfloat16)


@requires_ext
@pytest.mark.parametrize("isa", ["amx", "avx512bf16"])
def test_bf16_tile_nonfinite_value(isa, monkeypatch):
    """A NaN or inf in a cached value row of a full interior bf16 tile makes the rows that see it NaN
    (as on the fp32 path); the other batch row stays finite."""
    if isa not in posattn.ops.cpu_isas():
        pytest.skip(f"this CPU (or its OS) does not run the {isa} path")
    monkeypatch.setenv("POSATTN_CPU_ISA", isa)
    for bad in (float("nan"), float("inf")):
        q = torch.randn(2, 4, 1, 64, dtype=torch.bfloat16)
        kc, vc = torch.randn(2, 2, 300, 64, dtype=torch.bfloat16), torch.randn(2, 2, 300, 64, dtype=torch.bfloat16)
        vc[0, 1, 5, 7] = bad
        out = posattn.attention_with_kvcache(q, kc, vc, cache_seqlens=300, backend="cpu")
        assert torch.isnan(out[0, 2:]).all() and torch.isfinite(out[0, :2]).all() and torch.isfinite(out[1]).all()


@pytest.mark.parametrize("backend", KERNELS)
def test_num_splits_agree(backend):
    """num_splits 0 (chosen), 1, 3 and 64 agree up to rounding; a split really changes the arithmetic
    (else this test could not fail), yet each fixed count is run-to-run identical."""
    c = Case(lens=(2000, 5, 700), L=2, H=4, Hkv=2, page=16, spec="alibi")
    results = {s: check(c, backend, num_splits=s) for s in (0, 1, 3, 64)}
    for s in (0, 3, 64):
        assert torch.allclose(results[s]["out"], results[1]["out"], atol=2e-6, rtol=1e-5)
        assert torch.allclose(results[s]["lse"], results[1]["lse"], atol=2e-6, rtol=1e-5)
    assert not torch.equal(results[3]["out"], results[1]["out"])
    again = check(c, backend, num_splits=3)
    assert torch.equal(again["out"], results[3]["out"]) and torch.equal(again["lse"], results[3]["lse"])


@pytest.mark.parametrize("backend", [pytest.param("reference", id="reference"), *KERNELS])
def test_decode_loop_equals_one_attention(backend):
    """50 decode steps (a prompt of 13 rows first, then one row per step, RoPE and ALiBi) give the
    rows of one causal posattn.attention over the whole sequence."""
    device = backend_device(backend)
    torch.manual_seed(5)
    B, H, Hkv, D, N, P = 2, 4, 2, 32, 63, 13
    q, k, v = torch.randn(B, H, N, D, device=device), torch.randn(B, Hkv, N, D, device=device), \
        torch.randn(B, Hkv, N, D, device=device)
    spec = dict(rope=posattn.RoPE(), bias=posattn.ALiBi(posattn.alibi_slopes(H)))
    full = posattn.attention(q, k, v, causal=True, backend=backend, **spec)
    kc, vc = torch.zeros(B, Hkv, N, D, device=device), torch.zeros(B, Hkv, N, D, device=device)
    steps = [posattn.attention_with_kvcache(q[:, :, :P], kc, vc, k[:, :, :P], v[:, :, :P], cache_seqlens=0,
                                            backend=backend, **spec)]
    for n in range(P, N):
        steps.append(posattn.attention_with_kvcache(q[:, :, n:n + 1], kc, vc, k[:, :, n:n + 1], v[:, :, n:n + 1],
                                                    cache_seqlens=n, backend=backend, **spec))
    assert len(steps) == 51
    torch.testing.assert_close(torch.cat(steps, dim=2), full, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", KERNELS)
def test_nonfinite_value_reaches_only_the_rows_that_see_it(backend):
    """NaN in a cached value row: the queries that see it are NaN, a windowed query that does not is not."""
    device = backend_device(backend)
    q = torch.randn(1, 2, 2, 16, device=device)
    kc, vc = torch.randn(1, 1, 40, 16, device=device), torch.randn(1, 1, 40, 16, device=device)
    vc[0, 0, 4, 3] = float("nan")  # seen by the query at 28 (window 4 .. 28), not by the one at 29
    vc[0, 0, 30:] = float("nan")  # stale slots past the cached length are never read
    out = posattn.attention_with_kvcache(q, kc, vc, cache_seqlens=30, window=(24, 0), backend=backend)
    assert torch.isnan(out[:, :, 0]).all() and not torch.isnan(out[:, :, 1]).any()  # rows at 28 and 29


@requires_ext
def test_empty_batch_and_no_queries():
    """B = 0 or L = 0 with num_splits=0 (the split choice has no tasks to divide): empty results."""
    q, kc = torch.randn(0, 4, 1, 8), torch.zeros(0, 2, 10, 8)
    out = posattn.attention_with_kvcache(q, kc, kc.clone(), cache_seqlens=torch.zeros(0, dtype=torch.int32),
                                         backend="cpu")
    assert out.shape == (0, 4, 1, 8)
    q, kc = torch.randn(1, 4, 0, 8), torch.randn(1, 2, 10, 8)
    assert posattn.attention_with_kvcache(q, kc, kc.clone(), cache_seqlens=3, backend="cpu").shape == (1, 4, 0, 8)


@pytest.mark.parametrize("backend", KERNELS)
def test_torch_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) traces the mutating op; the caches are updated as in eager mode."""
    device = backend_device(backend)
    c = Case(lens=(5, 40), L=1, H=4, Hkv=2, page=8)
    t = make(c, device)
    t = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in t.items()}

    def step(q, kc, vc, kn, vn, lens, table):
        return posattn.attention_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens, block_table=table,
                                              rope=posattn.RoPE(), backend=backend)

    kc1, vc1, kc2, vc2 = (t[n].clone() for n in ("k_cache", "v_cache", "k_cache", "v_cache"))
    eager = step(t["q"], kc1, vc1, t["k"], t["v"], t["cache_seqlens"], t["block_table"])
    compiled = torch.compile(step, fullgraph=True)(t["q"], kc2, vc2, t["k"], t["v"], t["cache_seqlens"],
                                                   t["block_table"])
    assert torch.equal(eager, compiled) and torch.equal(kc1, kc2) and torch.equal(vc1, vc2)


def _bad(**over):
    args = dict(q=torch.randn(2, 4, 1, 8), k_cache=torch.zeros(2, 2, 10, 8), v_cache=torch.zeros(2, 2, 10, 8),
                k=torch.randn(2, 2, 1, 8), v=torch.randn(2, 2, 1, 8),
                cache_seqlens=torch.tensor([3, 9], dtype=torch.int32))
    args.update(over)
    return args


@pytest.mark.parametrize("over, error, match", [
    (dict(cache_seqlens=torch.tensor([3, 10], dtype=torch.int32)), ValueError, r"cache_seqlens\[1\] = 10 plus 1"),
    (dict(k_cache=torch.zeros(2, 2, 10, 8, dtype=torch.float64)), TypeError, "k_cache has dtype"),
    (dict(v=None), ValueError, "both k and v"),
    (dict(q=torch.randn(2, 3, 1, 8)), ValueError, "multiple of the KV heads"),
    (dict(k=torch.randn(2, 2, 2, 8)), ValueError, r"new k"),
    (dict(cache_seqlens=torch.tensor([3], dtype=torch.int32)), ValueError, r"\[B\] = \[2\]"),
    (dict(cache_seqlens=-1), ValueError, "cache_seqlens=-1"),
    (dict(block_table=torch.tensor([[0, 1], [2, 9]], dtype=torch.int32), k_cache=torch.zeros(4, 2, 5, 8),
          v_cache=torch.zeros(4, 2, 5, 8)), ValueError, r"block_table holds values in \[0, 9\]"),
    (dict(block_table=torch.tensor([[0], [1]], dtype=torch.int32), k_cache=torch.zeros(4, 2, 5, 8),
          v_cache=torch.zeros(4, 2, 5, 8)), ValueError, r"1 pages of 5"),
    (dict(block_table=torch.zeros(2, 2, dtype=torch.int32), cache_batch_idx=torch.zeros(2, dtype=torch.int32)),
     ValueError, "takes no cache_batch_idx"),
    (dict(cache_batch_idx=torch.tensor([0, 2], dtype=torch.int32)), ValueError, r"cache_batch_idx holds values"),
    (dict(rope=posattn.XPos()), NotImplementedError, "RoPE"),
    (dict(q=torch.randn(2, 4, 1, 8, requires_grad=True)), RuntimeError, "forward only"),
    (dict(num_splits=-1), ValueError, "num_splits"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_argument_errors(over, error, match):
    args = _bad(**over)
    with pytest.raises(error, match=match):
        posattn.attention_with_kvcache(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"), args.pop("k"),
                                       args.pop("v"), **args, backend="reference")
