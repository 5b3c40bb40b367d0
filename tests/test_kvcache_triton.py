"""The Triton backend of KV-cache decoding: ``posattn::triton_attention_kvcache`` called directly.

The oracle never sees the cache: every batch row's keys are kept un-rotated (``k_raw``), and
the expected output is ``posattn.reference.attention`` in float64 over rows 0 … S_b − 1 of those
raw keys with the rotary spec applied to q and k at their positions (queries at S_b − L + i,
keys at 0 … S_b − 1), the bias spec, causal / window and softcap. The kernel instead reads a
cache that holds keys rotated once (rows written before the call by the test, rows written by
the call by the kernel). Rows of the cache past each batch row's keys, the rows of other batch
rows and unused pages hold large keys and NaN values, so any key the kernel wrongly reads
shows. tests/tolerance.py judges every output and lse.
"""
import math
from dataclasses import dataclass

import pytest
import torch

import posattn
from conftest import DEVICE
from posattn import reference
from posattn.ops import spec_ints
from posattn.positions import kernel_positions
from tolerance import assert_close

LENS = (0, 1, 7, 300)  # cached tokens before the call, one batch row each


@dataclass
class Case:
    lens: tuple = LENS
    L: int = 1
    H: int = 2
    Hkv: int = 2
    D: int = 16
    Dv: int = None
    page: int = None  # a paged cache with this page size and a shuffled block table
    batch_idx: bool = False  # a contiguous cache with more rows than the batch, rows chosen by cache_batch_idx
    new: bool = True  # new keys / values appended by the call
    causal: bool = True
    window: tuple = None
    softcap: float = None
    rope: str = None  # "half" (full rotary dim), "interleaved" (partial: 8 of 16 channels)
    bias: str = None  # "alibi" ((B, H) slopes), "relative", "t5", "manhattan"
    dtype: torch.dtype = torch.float32
    splits: int = 3
    strided_q: bool = False  # q as a [B, L, H, D] tensor transposed (not contiguous)

    def __post_init__(self):
        self.Dv = self.D if self.Dv is None else self.Dv

    @property
    def id(self):
        parts = [f"L{self.L}", f"H{self.H}" + (f"-Hkv{self.Hkv}" if self.Hkv != self.H else "")]
        if self.Dv != self.D:
            parts.append(f"Dv{self.Dv}")
        parts.append(f"page{self.page}" if self.page else "contig")
        for flag in ("batch_idx", "strided_q"):
            if getattr(self, flag):
                parts.append(flag)
        if not self.new:
            parts.append("no_new")
        parts.append("causal" if self.causal else "full")
        if self.window:
            parts.append("win" + "_".join(map(str, self.window)))
        if self.softcap:
            parts.append(f"cap{self.softcap:g}")
        parts += [x for x in (self.rope and f"rope-{self.rope}", self.bias) if x]
        parts += [str(self.dtype).removeprefix("torch."), f"splits{self.splits}"]
        return "-".join(parts)


def make_specs(c: Case, B, device):
    """(rope, bias, bias of batch row b for the per-row reference)."""
    rope = {None: None, "half": posattn.RoPE(), "interleaved": posattn.RoPE(dim=8, interleaved=True,
                                                                             theta=500.0)}[c.rope]
    g = torch.Generator().manual_seed(1)
    if c.bias == "alibi":
        slopes = posattn.alibi_slopes(c.H)[None].repeat(B, 1) * torch.rand(B, 1, generator=g).add(0.5)
        bias = posattn.ALiBi(slopes.to(device))
        return rope, bias, lambda b: posattn.ALiBi(bias.slopes[b:b + 1])
    if c.bias == "relative":
        bias = posattn.RelativeBias(torch.randn(c.H, 2 * 20 + 1, generator=g).to(device))
    elif c.bias == "t5":
        bias = posattn.T5Bias(torch.randn(c.H, 32, generator=g).to(device), bidirectional=not c.causal,
                              max_distance=64)
    elif c.bias == "manhattan":
        bias = posattn.ManhattanDecay(-torch.rand(c.H, generator=g).to(device) * 0.2, width=9)
    else:
        bias = None
    return rope, bias, lambda b: bias


def rotate_keys(rope, k, pos):
    """k [B', Hkv, n, D] rotated at positions pos (B' or 1, n), by the spec's reference rotation."""
    return k if rope is None else rope.reference_rotate(k, k, pos, pos)[1]


@dataclass
class Inputs:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cache_seqlens: torch.Tensor
    cache_batch_idx: torch.Tensor
    block_table: torch.Tensor
    k_raw: torch.Tensor  # float64 [B, Hkv, S_max, D], un-rotated: the oracle's keys
    v_raw: torch.Tensor


def make_inputs(c: Case, device=DEVICE, seed=0):
    torch.manual_seed(seed)
    B, lens = len(c.lens), c.lens
    s_max = max(lens) + c.L + 5
    f64 = dict(dtype=torch.float64, device=device)
    q = torch.randn(B, c.H, c.L, c.D, **f64)
    k_raw, v_raw = torch.randn(B, c.Hkv, s_max, c.D, **f64), torch.randn(B, c.Hkv, s_max, c.Dv, **f64)
    rope, _, _ = make_specs(c, B, device)
    k_rot = rotate_keys(rope, k_raw, torch.arange(s_max, device=device)[None])
    new = torch.arange(c.L, device=device)[None] + torch.tensor(lens, device=device)[:, None]  # [B, L]
    k_new = torch.stack([k_raw[b, :, new[b]] for b in range(B)])
    v_new = torch.stack([v_raw[b, :, new[b]] for b in range(B)])
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)

    def garbage(n, d):  # keys that would dominate any softmax, values that poison any sum
        return (50.0 * torch.randn(n, c.Hkv, s_max, d, **f64), torch.full((n, c.Hkv, s_max, d), math.nan, **f64))

    idx = table = None
    if c.page:
        pages_per_row = -(-s_max // c.page)
        n_pages = B * pages_per_row + 3
        table = torch.randperm(n_pages, device=device)[:B * pages_per_row].view(B, pages_per_row).to(torch.int32)
        kc, _ = garbage(n_pages, c.D)
        vc = torch.full((n_pages, c.Hkv, c.page, c.Dv), math.nan, **f64)
        kc = kc[:, :, :c.page]
        for b in range(B):
            for j in range(lens[b]):
                page, slot = int(table[b, j // c.page]), j % c.page
                kc[page, :, slot], vc[page, :, slot] = k_rot[b, :, j], v_raw[b, :, j]
    else:
        rows = B + 2 if c.batch_idx else B
        kc, vc = garbage(rows, c.D)[0], garbage(rows, c.Dv)[1]
        if c.batch_idx:
            idx = torch.randperm(rows, device=device)[:B].to(torch.int32)
        for b in range(B):
            r = int(idx[b]) if c.batch_idx else b
            kc[r, :, :lens[b]], vc[r, :, :lens[b]] = k_rot[b, :, :lens[b]], v_raw[b, :, :lens[b]]
    dt = c.dtype
    if c.strided_q:
        q_kernel = q.transpose(1, 2).contiguous().to(dt).transpose(1, 2)
    else:
        q_kernel = q.to(dt)
    return Inputs(q_kernel, kc.to(dt), vc.to(dt), k_new.to(dt) if c.new else None, v_new.to(dt) if c.new else None,
                  seqlens, idx, table, k_raw, v_raw)


def run_kernel(c: Case, x: Inputs, splits=None, scale=None):
    rope, bias, _ = make_specs(c, x.q.shape[0], x.q.device)
    kp = kernel_positions(rope, bias, None, x.q, x.k_cache, 0, 0)
    wl, wr = c.window if c.window else (-1, -1)
    scale = c.D ** -0.5 if scale is None else scale
    return torch.ops.posattn.triton_attention_kvcache(
        x.q, x.k_cache, x.v_cache, x.k, x.v, x.cache_seqlens, x.cache_batch_idx, x.block_table, c.causal, wl, wr,
        c.softcap or 0.0, scale, kp.rope_table, kp.bias_tensor, kp.bias_lut, spec_ints(kp), float(kp.rope_scale),
        c.splits if splits is None else splits)


def expected(c: Case, x: Inputs, dtype):
    """The dense reference per batch row in ``dtype``: out [B, H, L, Dv], lse [B, H, L]."""
    B = len(c.lens)
    rope, _, bias_of = make_specs(c, B, x.q.device)
    q = x.q.to(torch.float64).to(dtype)
    outs, lses = [], []
    for b in range(B):
        S = c.lens[b] + (c.L if c.new else 0)
        if S == 0:  # no key at all: every row sees nothing
            outs.append(torch.zeros(1, c.H, c.L, c.Dv, dtype=dtype, device=q.device))
            lses.append(torch.full((1, c.H, c.L), -math.inf, dtype=dtype, device=q.device))
            continue
        o, lse = reference.attention(
            q[b:b + 1], x.k_raw[b:b + 1, :, :S].to(dtype), x.v_raw[b:b + 1, :, :S].to(dtype), causal=c.causal,
            window=c.window, rope=rope, bias=bias_of(b), softcap=c.softcap, scale=c.D ** -0.5, q_pos=S - c.L,
            k_pos=0, return_lse=True)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def check(c: Case, x: Inputs, out, lse):
    ref_out, ref_lse = expected(c, x, torch.float64)
    same_out, same_lse = expected(c, x, c.dtype)
    assert out.dtype == c.dtype and lse.dtype == torch.float32
    assert_close("out", out, ref_out, same_out)
    assert_close("lse", lse, ref_lse, same_lse)


CASES = [
    Case(splits=1),
    Case(L=3, H=8, Hkv=2, splits=3),  # GQA 4:1, a speculative step of 3 queries
    Case(H=8, Hkv=2, page=16),
    Case(L=3, page=1, splits=16),
    Case(L=3, page=7, H=4, Hkv=1, splits=1),
    Case(batch_idx=True, L=3),
    Case(L=3, rope="half", H=4, Hkv=2),
    Case(rope="interleaved", page=16, splits=1),
    Case(L=3, bias="alibi", H=4, Hkv=2),
    Case(L=3, bias="relative", window=(40, -1)),
    Case(L=3, bias="t5", causal=False, splits=16),
    Case(bias="manhattan", rope="half"),
    # key counts S_b = 64, 256: multiples of the interpreter's key tile, the causal diagonal in a whole tile
    Case(L=3, lens=(0, 1, 61, 253), H=4, Hkv=2, splits=3),
    Case(L=3, window=(100, -1), splits=3),  # the visible keys are split, not the whole cache
    Case(L=3, causal=False, window=(20, 1)),
    Case(L=3, softcap=5.0, bias="alibi", rope="half"),
    Case(L=3, causal=False, Dv=32, strided_q=True),
    Case(L=3, new=False),  # no new keys: queries are the cache's last L positions (row 0 sees nothing)
    Case(L=3, new=False, lens=(2, 5, 64, 200), page=16, rope="half"),  # negative and boundary query positions
    Case(dtype=torch.float16, L=3, H=4, Hkv=2, rope="half", page=16),
    Case(dtype=torch.float16, bias="alibi", window=(64, -1), splits=16),
]


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_kernel(c):
    x = make_inputs(c)
    out, lse = run_kernel(c, x)
    check(c, x, out, lse)


@pytest.mark.parametrize("c", [Case(L=3, H=4, Hkv=2, page=16, rope="interleaved"),
                               Case(L=3, batch_idx=True, rope="half", dtype=torch.float16)],
                         ids=lambda c: c.id)
def test_cache_update(c):
    """New keys land rotated at positions cache_seqlens[b] + i (new values copied); every other
    byte of both caches is untouched."""
    x = make_inputs(c)
    k0, v0 = x.k_cache.clone(), x.v_cache.clone()
    run_kernel(c, x)
    rope, _, _ = make_specs(c, len(c.lens), x.q.device)
    pos = torch.arange(c.L, device=x.q.device)[None] + x.cache_seqlens.long()[:, None]  # [B, L]
    # the kernels' angles are pos·inv_freq in fp32, as this fp32 reference rotation's
    want_k = rotate_keys(rope, x.k.float(), pos)
    written = torch.zeros(k0.shape[:3], dtype=torch.bool, device=k0.device)
    for b in range(len(c.lens)):
        for i in range(c.L):
            j = int(pos[b, i])
            if c.page:
                row, slot = int(x.block_table[b, j // c.page]), j % c.page
            else:
                row, slot = (int(x.cache_batch_idx[b]) if c.batch_idx else b), j
            written[row, :, slot] = True
            got_k = x.k_cache[row, :, slot].double()
            tol = 2e-6 if c.dtype == torch.float32 else 1e-3
            torch.testing.assert_close(got_k, want_k[b, :, i].to(c.dtype).double(), atol=tol, rtol=tol)
            assert torch.equal(x.v_cache[row, :, slot], x.v[b, :, i])
    bits = {torch.float32: torch.int32, torch.float16: torch.int16}[c.dtype]
    for got, before in ((x.k_cache, k0), (x.v_cache, v0)):
        assert torch.equal(got.view(bits)[~written], before.view(bits)[~written]), "a byte outside the new rows changed"


def test_one_split_is_batch_invariant():
    """num_splits=1: a batch row's result does not depend on the other rows of the batch."""
    c = Case(L=3, H=4, Hkv=2, rope="half", lens=(5, 300, 64), splits=1)
    x = make_inputs(c)
    out, lse = run_kernel(c, x)
    for b in range(len(c.lens)):
        one = Case(**{**c.__dict__, "lens": (c.lens[b],)})
        xb = make_inputs(one)
        xb.q, xb.k, xb.v = x.q[b:b + 1], x.k[b:b + 1], x.v[b:b + 1]
        xb.k_cache = x.k_cache[b:b + 1].clone()
        xb.v_cache = x.v_cache[b:b + 1].clone()
        ob, lb = run_kernel(one, xb)
        assert torch.equal(ob, out[b:b + 1]) and torch.equal(lb, lse[b:b + 1])


def test_interior_and_boundary_paths_agree(monkeypatch):
    """POSATTN_MASK_ALL_TILES=1 runs the interior tiles through the masked path: bitwise the same."""
    c = Case(L=3, H=4, Hkv=2, rope="half", bias="relative", window=(150, -1), page=16, splits=3)
    plain = run_kernel(c, make_inputs(c))
    monkeypatch.setenv("POSATTN_MASK_ALL_TILES", "1")
    masked = run_kernel(c, make_inputs(c))
    assert torch.equal(plain[0], masked[0]) and torch.equal(plain[1], masked[1])


@pytest.mark.parametrize("splits", [1, 3])
def test_non_finite_values(splits):
    """A non-finite v row makes exactly the rows that see it NaN (out and lse)."""
    c = Case(L=3, lens=(0, 200), H=2, Hkv=1, window=(70, -1), splits=splits)
    x = make_inputs(c)
    x.v[1, 0, 2] = math.inf  # the newest key of row 1: only its last query sees it
    x.v_cache[1, 0, 10] = math.nan  # outside every window of row 1 (queries at 200 … 202, left 70)
    x.v_cache[1, 0, 150] = math.nan  # seen by every query of row 1
    out, lse = run_kernel(c, x)
    assert torch.isfinite(out[0]).all() and torch.isfinite(lse[0]).all()
    assert torch.isnan(out[1]).all() and torch.isnan(lse[1]).all()
    x = make_inputs(c)
    x.v[1, 0, 2] = math.inf
    x.v_cache[1, 0, 10] = math.nan
    out, lse = run_kernel(c, x)
    assert torch.isnan(out[1, :, 2]).all() and torch.isnan(lse[1, :, 2]).all()
    assert torch.isfinite(out[1, :, :2]).all() and torch.isfinite(lse[1, :, :2]).all()


@pytest.mark.parametrize("page", [None, 16], ids=["contig", "page16"])
def test_overflowing_row_is_nan_and_stays_in_bounds(page):
    """cache_seqlens[b] + L beyond the cache (device lengths are never read on the host, so only
    the kernel can see it): that row's outputs and lse are NaN, the new rows that fit are written,
    nothing past the cache is (row 0 overflows: its overflow would land in row 1's slots), and the
    other batch rows give what they give alone."""
    c = Case(L=3, lens=(40, 5), H=2, Hkv=1, page=page, splits=2)
    out_ok, lse_ok = run_kernel(c, make_inputs(c))
    x = make_inputs(c)
    capacity = x.block_table.shape[1] * page if page else x.k_cache.shape[2]
    x.cache_seqlens[0] = capacity - 1  # the first of the three new rows fits

    def where(b, j):  # (cache row or page, slot) of logical row j of batch row b
        return (int(x.block_table[b, j // page]), j % page) if page else (b, j)

    for j in range(40, capacity - 1):  # finite rows up to the claimed length: only the overflow makes NaN
        r, s = where(0, j)
        x.k_cache[r, :, s], x.v_cache[r, :, s] = torch.randn(c.Hkv, c.D), torch.randn(c.Hkv, c.Dv)
    k0, v0 = x.k_cache.clone(), x.v_cache.clone()
    out, lse = run_kernel(c, x)
    assert torch.isnan(out[0]).all() and torch.isnan(lse[0]).all()
    assert torch.equal(out[1], out_ok[1]) and torch.equal(lse[1], lse_ok[1])
    written = {where(0, capacity - 1)} | {where(1, 5 + i) for i in range(3)}
    changed = ~((x.k_cache == k0) | (x.k_cache.isnan() & k0.isnan())).all(dim=-1)  # [rows, Hkv, slots]
    changed |= ~((x.v_cache == v0) | (x.v_cache.isnan() & v0.isnan())).all(dim=-1)
    assert {(int(r), int(s)) for r, _, s in changed.nonzero()} == written


def test_torch_compile_fullgraph():
    """The op traces through torch.compile(fullgraph=True) (fake + functionalised cache writes)."""
    c = Case(L=1, H=4, Hkv=2, lens=(3, 70))
    x = make_inputs(c)
    k0 = x.k_cache.clone()
    args = (c.causal, -1, -1, 0.0, c.D ** -0.5, None, None, None, [0] * 8, 1.0, 2)

    def step(q, kc, vc, k, v, seqlens):
        return torch.ops.posattn.triton_attention_kvcache(q, kc, vc, k, v, seqlens, None, None, *args)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out, lse = compiled(x.q, x.k_cache, x.v_cache, x.k, x.v, x.cache_seqlens)
    assert not torch.equal(x.k_cache, k0)  # the cache was written through the compiled call
    check(c, x, out, lse)


def test_split_heuristic():
    from posattn.triton_kernels.decode import MAX_SPLITS, num_splits_heuristic
    assert num_splits_heuristic(programs=132, tiles=1000, sms=132) == 1  # the grid already fills the GPU
    assert num_splits_heuristic(programs=8, tiles=1, sms=132) == 1  # nothing to split
    s = num_splits_heuristic(programs=8, tiles=1000, sms=132)
    assert 8 * s >= 0.8 * 132 and s <= MAX_SPLITS
    assert num_splits_heuristic(programs=1, tiles=4, sms=132) <= 4  # never more splits than key tiles


def _errors_case():
    c = Case(L=1, lens=(3, 4))
    return c, make_inputs(c)


@pytest.mark.parametrize("mutate, match", [
    (lambda c, x: setattr(x, "k_cache", x.k_cache.half()), "dtype|share one dtype"),
    (lambda c, x: setattr(x, "q", x.q[0]), "4 dims"),
    (lambda c, x: setattr(x, "k_cache", x.k_cache[..., :8]), "first 3 dims|head dim"),
    (lambda c, x: setattr(x, "v_cache", x.v_cache[:, :1]), "first 3 dims"),
    (lambda c, x: setattr(x, "q", x.q.repeat(1, 2, 1, 1)[:, :3]), "multiple of Hkv"),
    (lambda c, x: setattr(x, "cache_seqlens", x.cache_seqlens.long()), "int32"),
    (lambda c, x: setattr(x, "block_table", torch.zeros(2, 4, dtype=torch.int64, device=x.q.device)), "int32"),
    (lambda c, x: setattr(x, "v", None), "together"),
], ids=["cache-dtype", "q-rank", "k-d-mismatch", "kv-heads-mismatch", "heads", "seqlens-dtype", "block-table-dtype",
        "k-without-v"])
def test_launcher_errors(mutate, match):
    c, x = _errors_case()
    mutate(c, x)
    with pytest.raises(ValueError, match=match):
        run_kernel(c, x)


def test_launcher_rejects_other_rotations():
    c, x = _errors_case()
    kp = kernel_positions(posattn.XPos(), None, None, x.q, x.k_cache, 0, 0)
    with pytest.raises(ValueError, match="RoPE only"):
        torch.ops.posattn.triton_attention_kvcache(
            x.q, x.k_cache, x.v_cache, x.k, x.v, x.cache_seqlens, None, None, True, -1, -1, 0.0, 0.25,
            kp.rope_table, None, None, spec_ints(kp), 1.0, 1)
