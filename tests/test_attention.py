"""posattn.attention on the kernel backends against posattn.reference in float64.

Every case runs on both kernel backends, "triton" and "cpu" (the C++ extension posattn._C),
and checks the output, lse and every gradient (q, k, v, float mask, spec tensors) with the
one tolerance rule of tests/tolerance.py. On a machine without a GPU the Triton kernels run
in Triton's interpreter (fp32, fp16); bf16 Triton runs on CUDA only (tl.dot on bf16 is
broken in the interpreter, triton issue #11584). The cpu backend always takes CPU tensors,
also where the test device is CUDA, and is checked in fp32, bf16 and fp16.
"""
from dataclasses import dataclass, field, replace

import pytest
import torch

import posattn
from conftest import backend_dtype_params, backend_fixtures, kernel_dropout_mask
from tolerance import assert_close

HALF = backend_dtype_params()  # (backend, dtype): triton-float16, cpu-bfloat16, cpu-float16, …


backend, device = backend_fixtures()


@dataclass
class Case:
    B: int = 1
    H: int = 2
    Hkv: int = 2
    L: int = 63
    S: int = 63
    D: int = 40
    Dv: int = None
    kw: dict = field(default_factory=dict)
    mask: tuple = None  # (shape, "bool" | "float" | "float-grad" | "float-inf-grad": 20% of entries −inf)
    blhd: bool = False  # q, k, v as transposed (B, L, H, D) views
    lse_grad: bool = True
    # position specs: (id, make(device) -> {name: (float64 tensor, takes grad)}, build({name: tensor}) -> kwargs)
    spec: tuple = None

    def __post_init__(self):
        self.Dv = self.D if self.Dv is None else self.Dv

    @property
    def id(self):
        parts = [f"B{self.B}-H{self.H}" + (f"-Hkv{self.Hkv}" if self.Hkv != self.H else ""),
                 f"L{self.L}-S{self.S}-D{self.D}" + (f"-Dv{self.Dv}" if self.Dv != self.D else "")]
        for k, v in self.kw.items():
            if isinstance(v, torch.Tensor):  # position tensors: T and their shape, not their values
                parts.append(f"{k}T{'x'.join(map(str, v.shape))}")
            elif isinstance(v, tuple):
                parts.append(f"{k}{'_'.join(map(str, v))}")
            else:
                parts.append(k if v is True else f"{k}{v}" if not isinstance(v, str) else v)
        if self.mask:
            parts.append(f"{self.mask[1]}mask{'x'.join(map(str, self.mask[0]))}")
        if self.spec:
            parts.append(self.spec[0])
        if self.blhd:
            parts.append("blhd")
        if not self.lse_grad:
            parts.append("nolse")
        return "-".join(parts)


def make_inputs(c: Case, dtype, device):
    def rand(b, h, n, d):
        if c.blhd:
            return torch.randn(b, n, h, d, device=device).transpose(1, 2)
        return torch.randn(b, h, n, d, device=device)

    q, k, v = rand(c.B, c.H, c.L, c.D), rand(c.B, c.Hkv, c.S, c.D), rand(c.B, c.Hkv, c.S, c.Dv)
    mask = None
    if c.mask is not None:
        shape, kind = c.mask
        if kind == "bool":
            mask = torch.rand(shape, device=device) > 0.3
        else:
            mask = torch.randn(shape, device=device)
            if "inf" in kind:
                mask = mask.masked_fill(torch.rand(shape, device=device) < 0.2, float("-inf"))
    return q, k, v, mask


def positions_for(kw, device):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def run(q, k, v, mask, dout, dlse, backend, dtype, kw, mask_grad, spec=None):
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    params = {}
    if spec is not None:
        _, tensors, build = spec
        params = {name: t.detach().to(dtype).requires_grad_(g) for name, (t, g) in tensors.items()}
        kw = {**kw, **build(params)}
    if mask is not None:
        mask = mask.detach()
        if mask.is_floating_point():
            mask = mask.to(dtype).requires_grad_(mask_grad)
    fn = posattn.reference.attention if backend == "reference" else posattn.attention
    extra = {} if backend == "reference" else {"backend": backend}
    out, lse = fn(q, k, v, attn_mask=mask, return_lse=True, **kw, **extra)
    loss = (out.double() * dout).sum()
    if dlse is not None:
        loss = loss + (lse.double().masked_fill(torch.isinf(lse), 0) * dlse).sum()
    loss.backward()
    grads = {"dq": q.grad, "dk": k.grad, "dv": v.grad}
    if mask_grad:
        grads["dmask"] = mask.grad
    grads.update({f"d{name}": t.grad for name, t in params.items() if t.requires_grad})
    return {"out": out.detach(), "lse": lse.detach(), **grads}


def check(c: Case, dtype, device, backend):
    q, k, v, mask = make_inputs(c, torch.float64, device)
    kw = positions_for(c.kw, device)
    dout = torch.randn(c.B, c.H, c.L, c.Dv, device=device, dtype=torch.float64)
    dlse = torch.randn(c.B, c.H, c.L, device=device, dtype=torch.float64) if c.lse_grad else None
    mask_grad = c.mask is not None and c.mask[1].endswith("-grad")
    spec = None
    if c.spec is not None:
        spec = (c.spec[0], c.spec[1](device), c.spec[2])
    ref = run(q, k, v, mask, dout, dlse, "reference", torch.float64, kw, mask_grad, spec)
    low = run(q, k, v, mask, dout, dlse, "reference", dtype, kw, mask_grad, spec)
    got = run(q, k, v, mask, dout, dlse, backend, dtype, kw, mask_grad, spec)
    for name in ref:
        assert_close(f"{c.id}-{dtype}-{name}", got[name], ref[name], low[name])
    return got


SHAPES = [
    Case(L=1, S=1, D=16),
    Case(B=2, L=7, S=7, D=40),
    Case(L=63, S=130, D=72, Dv=40),
    Case(H=1, Hkv=1, L=130, S=63, D=128),
    Case(H=1, Hkv=1, L=63, S=63, D=256, Dv=16),
    Case(L=7, S=63, D=40, Dv=72),
    Case(L=130, S=130, D=16, Dv=1),
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("c", SHAPES, ids=lambda c: c.id)
def test_shapes(c, causal, device, backend):
    check(replace(c, kw={"causal": causal}), torch.float32, device, backend)


@pytest.mark.parametrize("c", [Case(B=2, L=63, S=130, D=72, kw={"causal": True}),
                               Case(H=4, Hkv=1, L=130, S=7, D=128, Dv=40),
                               Case(L=63, S=63, D=40, mask=((63, 63), "float-grad"), kw={"softcap": 5.0})],
                         ids=lambda c: c.id)
@pytest.mark.parametrize("backend, dtype", HALF)
def test_half_precision(c, dtype, device, backend):
    check(c, dtype, device, backend)


@pytest.mark.parametrize("c", [
    Case(H=4, Hkv=1, L=63, S=63, D=40, kw={"causal": True}),
    Case(H=8, Hkv=1, L=7, S=130, D=16),
    Case(B=2, H=8, Hkv=2, L=63, S=63, D=72, kw={"window": (8, 0)}),
], ids=lambda c: c.id)
def test_gqa(c, device, backend):
    check(c, torch.float32, device, backend)


@pytest.mark.parametrize("c", [
    # bottom-right causal (flash-attn's convention) is q_pos = S − L
    Case(L=7, S=130, D=40, kw={"causal": True, "q_pos": 123}),
    Case(L=63, S=130, D=40, kw={"causal": True, "q_pos": 67}),
    # decoding: one new query at the end of a cache
    Case(L=1, S=130, D=72, kw={"causal": True, "q_pos": 129}),
    # chunked prefill / ring attention: both sides offset
    Case(L=63, S=63, D=40, kw={"causal": True, "q_pos": 1000, "k_pos": 990}),
    # queries before every key: the first rows see nothing (output 0, lse −inf)
    Case(L=63, S=63, D=40, kw={"causal": True, "q_pos": 0, "k_pos": 20}),
], ids=lambda c: c.id)
def test_position_offsets(c, device, backend):
    check(c, torch.float32, device, backend)


def _perm_positions(n, seed, batch=None):
    g = torch.Generator().manual_seed(seed)
    if batch is None:
        return torch.randperm(2 * n, generator=g)[:n].sort().values
    return torch.stack([torch.randperm(2 * n, generator=g)[:n] for _ in range(batch)])


@pytest.mark.parametrize("c", [
    # sorted positions with gaps (packed / strided positions)
    Case(L=63, S=130, D=40, kw={"causal": True, "q_pos": _perm_positions(63, 1), "k_pos": _perm_positions(130, 2)}),
    # per-batch, unsorted positions: whole-tile skipping must look at each tile's min/max
    Case(B=2, L=130, S=130, D=16, kw={"causal": True, "q_pos": _perm_positions(130, 3, batch=2),
                                      "k_pos": _perm_positions(130, 4, batch=2)}),
    Case(B=2, L=63, S=130, D=16, kw={"window": (10, 5), "q_pos": _perm_positions(63, 5, batch=2),
                                     "k_pos": _perm_positions(130, 6)}),
    # a tensor on one side, an offset on the other
    Case(L=130, S=63, D=40, kw={"causal": True, "q_pos": _perm_positions(130, 7).int(), "k_pos": 30}),
    Case(L=63, S=130, D=40, kw={"window": (16, 16), "q_pos": 40, "k_pos": _perm_positions(130, 8)}),
], ids=["sorted-gaps", "batch-unsorted", "batch-window", "qtensor-koffset", "qoffset-ktensor"])
def test_position_tensors(c, device, backend):
    check(c, torch.float32, device, backend)


@pytest.mark.parametrize("window", [(8, 0), (0, 8), (16, 16), (-1, 4), (4, -1), (0, 0), (200, 200)],
                         ids=lambda w: f"w{w[0]}_{w[1]}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_window(window, causal, device, backend):
    check(Case(L=130, S=130, D=16, kw={"window": window, "causal": causal}), torch.float32, device, backend)


MASKS = [((63, 130), "bool"), ((63, 130), "float"), ((63, 130), "float-grad"), ((2, 1, 1, 130), "bool"),
         ((2, 1, 1, 130), "float-grad"), ((1, 2, 63, 130), "float-grad"), ((2, 2, 63, 130), "float-grad"),
         ((2, 2, 63, 130), "bool"), ((63, 1), "float-grad"), ((1, 130), "float-grad"), ((2, 1, 63, 1), "bool")]


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: f"{m[1]}-{'x'.join(map(str, m[0]))}")
def test_masks(mask, device, backend):
    check(Case(B=2, L=63, S=130, D=40, mask=mask), torch.float32, device, backend)


def test_mask_with_causal_window_softcap(device, backend):
    check(Case(B=2, H=4, Hkv=2, L=130, S=130, D=40, mask=((2, 1, 130, 130), "float-grad"),
               kw={"causal": True, "window": (40, -1), "softcap": 3.0}), torch.float32, device, backend)


def test_fully_masked_rows(device, backend):
    # rows 0, 5 and 62 see no key at all: output 0, lse −inf, no NaN anywhere (also in grads)
    mask = torch.rand(2, 1, 63, 130) > 0.5
    mask[:, :, [0, 5, 62]] = False
    c = Case(B=2, L=63, S=130, D=40)
    q, k, v, _ = make_inputs(c, torch.float32, device)
    out, lse = posattn.attention(q, k, v, attn_mask=mask.to(device), return_lse=True, backend=backend)
    assert torch.all(out[:, :, [0, 5, 62]] == 0)
    assert torch.all(torch.isneginf(lse[:, :, [0, 5, 62]]))
    check(Case(B=2, L=63, S=130, D=40, mask=((2, 1, 63, 130), "bool")), torch.float32, device, backend)


@pytest.mark.parametrize("c", [Case(B=2, H=4, Hkv=2, L=63, S=130, D=40, blhd=True, kw={"causal": True}),
                               Case(B=2, H=2, L=130, S=63, D=72, Dv=16, blhd=True,
                                    mask=((2, 1, 130, 63), "float-grad"))],
                         ids=lambda c: c.id)
def test_transposed_views(c, device, backend):
    q, _, _, _ = make_inputs(c, torch.float32, device)
    assert not q.is_contiguous()
    check(c, torch.float32, device, backend)


@pytest.mark.parametrize("c", [Case(L=63, S=130, D=40, kw={"softcap": 2.0}),
                               Case(L=130, S=130, D=16, kw={"softcap": 0.5, "causal": True}, lse_grad=False),
                               Case(L=7, S=63, D=40, kw={"scale": 0.7}),
                               Case(L=63, S=63, D=40, kw={"causal": True}, lse_grad=False)],
                         ids=lambda c: c.id)
def test_softcap_scale_and_no_lse(c, device, backend):
    check(c, torch.float32, device, backend)


# ---- dropout --------------------------------------------------------------------------------------

def _seed_drawn_after(manual_seed):
    # posattn.attention draws its Philox seed as the first torch.randint after manual_seed
    torch.manual_seed(manual_seed)
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


@pytest.mark.parametrize("c", [Case(B=2, H=4, Hkv=2, L=63, S=130, D=40, kw={"dropout_p": 0.3}),
                               Case(L=130, S=130, D=16, kw={"dropout_p": 0.5, "causal": True},
                                    mask=((130, 130), "float-grad"))],
                         ids=lambda c: c.id)
def test_dropout_matches_reference_with_same_mask(c, device, backend):
    q, k, v, mask = make_inputs(c, torch.float32, device)
    p = c.kw["dropout_p"]
    keep = kernel_dropout_mask(backend, _seed_drawn_after(11), c.B, c.H, c.L, c.S, p, device)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.03
    check_dropout_with_kernel_mask(c.id, q, k, v, mask, positions_for(c.kw, device), 11, c, device, backend)


def check_dropout_with_kernel_mask(label, q, k, v, mask, kw, seed, c, device, backend, spec=None):
    """Kernel with dropout against the reference given the kernel's own keep-mask."""
    keep = kernel_dropout_mask(backend, _seed_drawn_after(seed), c.B, c.H, c.L, c.S, kw["dropout_p"], device)
    dout = torch.randn(c.B, c.H, c.L, c.Dv, device=device, dtype=torch.float64)
    mask_grad = mask is not None and c.mask[1] == "float-grad"
    ref = run(q, k, v, mask, dout, None, "reference", torch.float64, {**kw, "dropout_mask": keep}, mask_grad, spec)
    low = run(q, k, v, mask, dout, None, "reference", torch.float32, {**kw, "dropout_mask": keep}, mask_grad, spec)
    torch.manual_seed(seed)
    got = run(q, k, v, mask, dout, None, backend, torch.float32, kw, mask_grad, spec)
    for name in ref:
        assert_close(f"{label}-{name}", got[name], ref[name], low[name])


def test_dropout_same_seed_same_result(device, backend):
    c = Case(L=63, S=63, D=40, kw={"dropout_p": 0.4})
    q, k, v, _ = make_inputs(c, torch.float32, device)
    dout = torch.randn(c.B, c.H, c.L, c.Dv, device=device, dtype=torch.float64)
    results = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        results.append(run(q, k, v, None, dout, None, backend, torch.float32, c.kw, False))
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name
    assert not torch.equal(results[0]["out"], results[2]["out"])


def test_dropout_expectation(device, backend):
    # E[dropout(P)] = P, so the mean output over many seeds approaches the no-dropout output.
    # Bound: 5 standard errors of the mean, estimated from the samples themselves.
    c = Case(H=1, Hkv=1, L=7, S=63, D=16)
    q, k, v, _ = make_inputs(c, torch.float32, device)
    clean = posattn.attention(q, k, v, backend=backend)
    outs = torch.stack([posattn.attention(q, k, v, dropout_p=0.3, backend=backend) for _ in range(120)])
    stderr = outs.std(dim=0) / outs.shape[0] ** 0.5
    assert torch.all((outs.mean(dim=0) - clean).abs() <= 5 * stderr + 1e-6)


def test_dropout_p_one_drops_everything(device, backend):
    c = Case(L=63, S=130, D=40)
    q, k, v, _ = make_inputs(c, torch.float32, device)
    dout = torch.randn(c.B, c.H, c.L, c.Dv, device=device, dtype=torch.float64)
    got = run(q, k, v, None, dout, None, backend, torch.float32, {"dropout_p": 1.0}, False)
    for name in ("out", "dq", "dk", "dv"):
        assert torch.all(got[name] == 0), name


@pytest.mark.parametrize("L, S", [(0, 9), (7, 0)], ids=["L0", "S0"])
def test_empty_sequences(L, S, device, backend):
    c = Case(L=L, S=S, D=16)
    q, k, v, _ = make_inputs(c, torch.float32, device)
    q.requires_grad_()
    out, lse = posattn.attention(q, k, v, return_lse=True, backend=backend)
    assert out.shape == (1, 2, L, 16) and lse.shape == (1, 2, L)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    out.sum().backward()
    assert torch.all(q.grad == 0)


# ---- position specs inside the kernels (issues #3, #4) ---------------------------------------------

def fixed(name, **specs):
    """A spec without tensors (RoPE, XPos): nothing learnable to check."""
    return name, lambda device: {}, lambda params: specs


def rope(name, **kw):
    return fixed(name, rope=posattn.RoPE(**kw))


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    # dynamic NTK grows the base once positions pass the original length (here: 200 > 64)
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64},
    "yarn-mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": 0.707,
                    "mscale_all_dim": 1.0, "beta_fast": 16},
    "llama3": LLAMA3,
    "longrope": {"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": 64,
                 "short_factor": [1.0 + 0.1 * i for i in range(20)], "long_factor": [1.0 + 0.5 * i for i in range(20)]},
}


@pytest.mark.parametrize("c", [
    Case(L=63, S=130, D=40, spec=rope("half"), kw={"causal": True, "q_pos": 67}),
    Case(L=63, S=130, D=40, spec=rope("interleaved", interleaved=True), kw={"causal": True, "q_pos": 67}),
    Case(L=63, S=63, D=72, spec=rope("partial32", dim=32), kw={"causal": True}),
    Case(L=63, S=63, D=72, spec=rope("partial32-interleaved", dim=32, interleaved=True)),
    Case(L=130, S=63, D=128, H=4, Hkv=2, spec=rope("half-dim-gqa", dim=64, theta=5e5)),
    Case(L=7, S=130, D=16, Dv=40, spec=rope("decode-theta", theta=1e6), kw={"causal": True, "q_pos": 123}),
    Case(L=63, S=63, D=40, spec=fixed("inv-freq", rope=posattn.RoPE(inv_freq=torch.linspace(1.0, 1e-3, 20)))),
], ids=lambda c: c.id)
def test_rope_layouts(c, device, backend):
    check(c, torch.float32, device, backend)


@pytest.mark.parametrize("name", list(SCALINGS))
def test_rope_scalings(name, device, backend):
    check(Case(L=63, S=63, D=40, spec=rope(name, scaling=SCALINGS[name], theta=500.0),
               kw={"causal": True, "q_pos": 137, "k_pos": 137}), torch.float32, device, backend)


@pytest.mark.parametrize("c", [
    # (B, L) position ids, unsorted per batch, GQA: angles come from q_pos / k_pos themselves
    Case(B=2, H=4, Hkv=2, L=63, S=130, D=40, spec=rope("half"),
         kw={"causal": True, "q_pos": _perm_positions(63, 9, batch=2), "k_pos": _perm_positions(130, 10, batch=2)}),
    # long contexts: angles pos·θ computed in fp32 from the integer positions, as HF does
    Case(L=63, S=63, D=40, spec=rope("llama3-1e5", theta=5e5, scaling={**LLAMA3, "original_max_position_embeddings":
                                                                         8192}),
         kw={"causal": True, "q_pos": 100_000, "k_pos": 99_990}),
    Case(B=2, L=63, S=130, D=72, spec=rope("window-blhd", dim=64, interleaved=True), blhd=True,
         kw={"window": (20, 3), "q_pos": 50}),
], ids=lambda c: c.id)
def test_rope_positions(c, device, backend):
    check(c, torch.float32, device, backend)


@pytest.mark.parametrize("c", [
    Case(B=2, H=2, L=63, S=130, D=72, spec=rope("half-partial", dim=64), kw={"causal": True, "q_pos": 67}),
    Case(L=63, S=63, D=40, spec=fixed("xpos", rope=posattn.XPos()), kw={"causal": True}),
], ids=lambda c: c.id)
@pytest.mark.parametrize("backend, dtype", HALF)
def test_rope_half_precision(c, dtype, device, backend):
    check(c, dtype, device, backend)


@pytest.mark.parametrize("c", [
    Case(L=63, S=130, D=40, spec=fixed("xpos", rope=posattn.XPos()), kw={"causal": True, "q_pos": 67}),
    Case(L=63, S=63, D=72, spec=fixed("xpos-half-partial", rope=posattn.XPos(dim=32, interleaved=False))),
    Case(H=4, Hkv=1, L=130, S=130, D=40, spec=fixed("xpos-gqa-window", rope=posattn.XPos(scale_base=64.0)),
         kw={"causal": True, "window": (70, 0)}),
], ids=lambda c: c.id)
def test_xpos(c, device, backend):
    check(c, torch.float32, device, backend)


def test_xpos_fp16_long_positions(device, backend):
    # Pre-scaling q and k by ζ^{±pos/512} overflows fp16 near position 4.5k; the kernels
    # apply the decay per tile relative to a nearby centre, so positions ~9k stay finite.
    c = Case(L=63, S=130, D=40, spec=fixed("xpos", rope=posattn.XPos()),
             kw={"causal": True, "q_pos": 9067, "k_pos": 9000})
    got = check(c, torch.float16, device, backend)
    assert all(torch.isfinite(t).all() for name, t in got.items() if name != "lse")


def test_rope_composes_with_everything(device, backend):
    # rotary + ALiBi + float mask + softcap + window + GQA + position tensors in one call
    def make(device):
        return {"slopes": (posattn.alibi_slopes(4, dtype=torch.float64, device=device), True)}

    c = Case(B=2, H=4, Hkv=2, L=63, S=130, D=40, mask=((2, 1, 63, 130), "float-grad"),
             spec=("rope+alibi", make, lambda p: {"rope": posattn.RoPE(dim=32), "bias": posattn.ALiBi(p["slopes"])}),
             kw={"causal": True, "softcap": 4.0, "window": (50, -1), "q_pos": _perm_positions(63, 11).add(67)})
    check(c, torch.float32, device, backend)


def test_rope_dropout_same_mask(device, backend):
    c = Case(B=2, H=2, L=63, S=63, D=40)
    q, k, v, _ = make_inputs(c, torch.float32, device)
    kw = {"dropout_p": 0.25, "causal": True, "rope": posattn.RoPE(interleaved=True),
          "bias": posattn.ALiBi(posattn.alibi_slopes(2, device=device))}
    check_dropout_with_kernel_mask("rope-dropout", q, k, v, None, kw, 5, c, device, backend)


# biases ---------------------------------------------------------------------------------------------

def alibi(per_batch=False, heads=2, batch=2):
    def make(device):
        slopes = posattn.alibi_slopes(heads, dtype=torch.float64, device=device)
        if per_batch:
            slopes = slopes * torch.rand(batch, 1, dtype=torch.float64, device=device).add(0.5)
        return {"slopes": (slopes, True)}

    return "alibi" + ("-BH" if per_batch else ""), make, lambda p: {"bias": posattn.ALiBi(p["slopes"])}


def table_spec(name, cls, width, heads=2, grad=True, **kw):
    def make(device):
        return {"table": (torch.randn(heads, width, dtype=torch.float64, device=device), grad)}

    return name, make, lambda p: {"bias": cls(p["table"], **kw)}


def manhattan(heads=2, width=9):
    def make(device):
        return {"log_gamma": (-torch.rand(heads, dtype=torch.float64, device=device) * 0.3, True)}

    return f"manhattan-w{width}", make, lambda p: {"bias": posattn.ManhattanDecay(p["log_gamma"], width)}


def urpe(width, heads=2, ones=False, bias=None):
    def make(device):
        t = torch.ones if ones else torch.randn
        params = {"gate": (t(heads, width, dtype=torch.float64, device=device), True)}
        if bias is not None:
            params["table"] = (torch.randn(heads, bias, dtype=torch.float64, device=device), True)
        return params

    def build(p):
        kw = {"urpe": posattn.URPE(p["gate"])}
        if "table" in p:
            kw["bias"] = posattn.RelativeBias(p["table"])
        return kw

    return f"urpe{width}" + ("-ones" if ones else "") + (f"-rel{bias}" if bias else ""), make, build


@pytest.mark.parametrize("H", [1, 3, 8, 12, 16])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_alibi_heads(H, causal, device, backend):
    check(Case(H=H, Hkv=1, L=33, S=40, D=16, spec=alibi(heads=H), kw={"causal": causal, "q_pos": 7}),
          torch.float32, device, backend)


@pytest.mark.parametrize("c", [
    Case(B=2, L=63, S=130, D=40, spec=alibi(per_batch=True), kw={"causal": True, "q_pos": 67}),
    Case(B=2, H=4, Hkv=2, L=130, S=63, D=40, spec=alibi(heads=4), kw={"window": (30, 30)}),
], ids=lambda c: c.id)
def test_alibi(c, device, backend):
    check(c, torch.float32, device, backend)


@pytest.mark.parametrize("c", [
    # M smaller than the sequence: most offsets clamp to the two end entries
    Case(B=2, L=63, S=130, D=40, spec=table_spec("rel-M5", posattn.RelativeBias, 11), kw={"q_pos": 30}),
    # M larger than the sequence: every offset has its own entry, some entries are never used
    Case(L=130, S=63, D=16, spec=table_spec("rel-M200", posattn.RelativeBias, 401), kw={"causal": True,
                                                                                         "q_pos": -67}),
    Case(B=2, H=4, Hkv=1, L=63, S=63, D=72, spec=table_spec("rel-M16-gqa", posattn.RelativeBias, 33, heads=4),
         kw={"window": (20, 8), "q_pos": _perm_positions(63, 12, batch=2), "k_pos": _perm_positions(63, 13, 2)}),
], ids=lambda c: c.id)
def test_relative_bias(c, device, backend):
    check(c, torch.float32, device, backend)


@pytest.mark.parametrize("c", [
    Case(B=2, L=130, S=130, D=16, spec=table_spec("t5-enc", posattn.T5Bias, 32), kw={"scale": 1.0}),
    # decoder self-attention while decoding: 7 new queries after 123 cached keys
    Case(L=7, S=130, D=40, spec=table_spec("t5-dec", posattn.T5Bias, 32, bidirectional=False),
         kw={"scale": 1.0, "causal": True, "q_pos": 123}),
    Case(L=63, S=63, D=40, spec=table_spec("t5-dec-md20", posattn.T5Bias, 16, bidirectional=False, max_distance=20),
         kw={"causal": True, "q_pos": 1000, "k_pos": 990}),
    Case(H=4, Hkv=2, L=63, S=130, D=40, spec=table_spec("t5-64b", posattn.T5Bias, 64, heads=4, max_distance=40),
         kw={"q_pos": _perm_positions(63, 14)}),
], ids=lambda c: c.id)
def test_t5_bias(c, device, backend):
    check(c, torch.float32, device, backend)


@pytest.mark.parametrize("c", [
    Case(L=63, S=63, D=16, spec=manhattan(width=9)),  # a 7×9 grid
    Case(B=2, H=4, Hkv=2, L=63, S=63, D=40, spec=manhattan(heads=4, width=7), kw={"window": (20, 20)}),
    Case(L=63, S=63, D=16, spec=manhattan(width=9), kw={"q_pos": -30, "k_pos": -30}),  # floor division below 0
], ids=lambda c: c.id)
def test_manhattan_decay(c, device, backend):
    check(c, torch.float32, device, backend)


@pytest.mark.parametrize("c", [
    Case(B=2, L=63, S=130, D=40, spec=urpe(21), kw={"causal": True, "q_pos": 67}),
    Case(H=4, Hkv=2, L=130, S=63, D=16, spec=urpe(301, heads=4, bias=41), kw={"window": (-1, 10)}),
    Case(L=63, S=63, D=40, spec=urpe(9, bias=9), mask=((63, 63), "float-grad"), kw={"softcap": 3.0}),
], ids=lambda c: c.id)
def test_urpe(c, device, backend):
    check(c, torch.float32, device, backend)


def test_urpe_ones_is_plain_attention(device, backend):
    c = Case(B=2, L=63, S=130, D=40)
    q, k, v, _ = make_inputs(c, torch.float32, device)
    gate = torch.ones(2, 41, device=device)
    for kw in ({"causal": True, "q_pos": 67}, {"bias": posattn.RelativeBias(torch.randn(2, 21, device=device))}):
        plain = posattn.attention(q, k, v, backend=backend, **kw)
        gated = posattn.attention(q, k, v, urpe=posattn.URPE(gate), backend=backend, **kw)
        assert torch.equal(plain, gated)
    check(Case(L=63, S=63, D=40, spec=urpe(41, ones=True), kw={"causal": True}), torch.float32, device, backend)


# The cap acts on the scaled scores alone; the bias and the float mask (−inf entries
# included) are added after it: s = c·tanh(scale·q·kᵀ/c) + bias + mask. Every gradient,
# the bias parameters' and the mask's included, against the float64 reference.
SOFTCAP_CASES = [
    Case(B=2, H=4, Hkv=2, L=63, S=130, D=40, spec=spec, mask=((2, 1, 63, 130), "float-inf-grad"),
         kw={"softcap": 2.0, **kw})
    for spec, kw in ((alibi(per_batch=True, heads=4), {"causal": True, "q_pos": 67}),
                     (table_spec("rel-M20", posattn.RelativeBias, 41, heads=4), {}),
                     (table_spec("t5", posattn.T5Bias, 32, heads=4), {"q_pos": 40}),
                     (manhattan(heads=4, width=9), {"window": (30, 30)}),
                     (urpe(21, heads=4, bias=41), {"causal": True, "q_pos": 67}))]


@pytest.mark.parametrize("c", SOFTCAP_CASES, ids=lambda c: c.id)
def test_softcap_before_bias_and_mask(c, device, backend):
    check(c, torch.float32, device, backend)


@pytest.mark.parametrize("backend, dtype", HALF)
def test_softcap_before_bias_and_mask_half(dtype, device, backend):
    check(replace(SOFTCAP_CASES[1], B=1, L=7, S=63, mask=((1, 1, 7, 63), "float-inf-grad")), dtype, device, backend)


def test_urpe_with_dropout_same_mask(device, backend):
    c = Case(B=2, H=2, L=63, S=63, D=40)
    q, k, v, _ = make_inputs(c, torch.float32, device)
    name, _, build = urpe(31)
    spec = (name, {"gate": (torch.randn(2, 31, dtype=torch.float64, device=device), True)}, build)
    check_dropout_with_kernel_mask("urpe-dropout", q, k, v, None, {"dropout_p": 0.3, "causal": True}, 8, c, device,
                                   backend, spec)


@pytest.mark.parametrize("window", [(0, 0), (5, 5), (40, 0), (-1, 20), (64, 64)], ids=lambda w: f"w{w[0]}_{w[1]}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_window_with_bias_tables(window, causal, device, backend):
    # key tiles outside the window are skipped in all three kernels; their table entries
    # must still get exactly the gradient of the visible pairs
    check(Case(L=130, S=130, D=16, spec=table_spec("rel-M70", posattn.RelativeBias, 141),
               kw={"window": window, "causal": causal}), torch.float32, device, backend)


@pytest.mark.parametrize("spec", [table_spec("t5", posattn.T5Bias, 32), urpe(21, bias=41),
                                  manhattan(width=9), alibi(per_batch=True)],
                         ids=lambda s: s[0])
def test_deterministic_gradients(spec, device, backend):
    c = Case(B=2, H=2, L=130, S=130, D=16, spec=spec, mask=((1, 2, 1, 130), "float-grad"))
    q, k, v, mask = make_inputs(c, torch.float32, device)
    dout = torch.randn(c.B, c.H, c.L, c.Dv, device=device, dtype=torch.float64)
    tensors = spec[1](device)
    kw = {"causal": True, "deterministic": True}
    first = run(q, k, v, mask, dout, None, backend, torch.float32, kw, True, (spec[0], tensors, spec[2]))
    second = run(q, k, v, mask, dout, None, backend, torch.float32, kw, True, (spec[0], tensors, spec[2]))
    ref = run(q, k, v, mask, dout, None, "reference", torch.float64, kw, True, (spec[0], tensors, spec[2]))
    low = run(q, k, v, mask, dout, None, "reference", torch.float32, kw, True, (spec[0], tensors, spec[2]))
    for name in first:
        assert torch.equal(first[name], second[name]), name
        assert_close(f"deterministic-{spec[0]}-{name}", first[name], ref[name], low[name])


@pytest.mark.parametrize("c", [
    Case(B=2, H=4, Hkv=2, L=63, S=130, D=40, spec=table_spec("t5", posattn.T5Bias, 32, heads=4),
         kw={"causal": True, "q_pos": 67}),
    Case(L=63, S=63, D=40, spec=urpe(21, bias=41), kw={"causal": True}),
    Case(L=63, S=63, D=40, spec=alibi(), kw={"causal": True}),
], ids=lambda c: c.id)
@pytest.mark.parametrize("backend, dtype", HALF)
def test_biases_half_precision(c, dtype, device, backend):
    check(c, dtype, device, backend)


@pytest.mark.parametrize("kw", [{"causal": True}, {"window": (16, 0)}, {"window": (8, 8)},
                                {"causal": True, "q_pos": _perm_positions(64, 15)}],
                         ids=["causal", "w16_0", "w8_8", "causal-qtensor"])
def test_invisible_key_tiles_are_never_read(kw, device, backend):
    # Keys 128…255 lie past every query's window (queries sit at positions < 128), so their
    # tiles must be skipped by every kernel, forward and backward, on both backends: NaN there
    # would poison any tile that is loaded, even fully masked (0·NaN = NaN). Their dK, dV must
    # come out exactly 0.
    B, H, L, S, D = 1, 2, 64, 256, 16
    q = torch.randn(B, H, L, D, device=device, requires_grad=True)
    k = torch.randn(B, H, S, D, device=device)
    v = torch.randn(B, H, S, D, device=device)
    k[:, :, 128:], v[:, :, 128:] = float("nan"), float("inf")
    k.requires_grad_()
    v.requires_grad_()
    table = torch.randn(H, 33, device=device, requires_grad=True)
    spec = {"bias": posattn.RelativeBias(table), "rope": posattn.RoPE()}
    out = posattn.attention(q, k, v, backend=backend, **spec, **kw)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all() and torch.isfinite(table.grad).all()
    visible = [t.detach()[:, :, :128] if t is not q else t.detach() for t in (q, k, v)]
    ref64, low = (posattn.reference.attention(*(t.to(dtype) for t in visible),
                                              bias=posattn.RelativeBias(table.detach().to(dtype)),
                                              rope=posattn.RoPE(), **kw) for dtype in (torch.float64, torch.float32))
    assert_close("out", out.detach(), ref64, low)
    assert torch.all(k.grad[:, :, 128:] == 0) and torch.all(v.grad[:, :, 128:] == 0)


# ---- non-finite inputs: NaN in, NaN out, in the rows it reaches (posattn.attention's docstring) ----
# B2 H4 Hkv2 L63 S130 D40, causal with q_pos 67 (row i sees keys j ≤ 67 + i), a RelativeBias, a float
# mask whose 15% −inf entries mask keys. Each case puts one non-finite value in, and the rows that
# must come out NaN (output and lse) are spelt out from the rule; every backend must agree with the
# float64 reference on where the NaN are, and on every finite value.

def _nonfinite_inputs(device):
    B, H, Hkv, L, S, D = 2, 4, 2, 63, 130, 40
    q, k, v = (torch.randn(B, h, n, D, dtype=torch.float64, device=device) for h, n in ((H, L), (Hkv, S), (Hkv, S)))
    mask = torch.randn(B, 1, L, S, dtype=torch.float64, device=device)
    mask = mask.masked_fill(torch.rand(B, 1, L, S, device=device) < 0.15, float("-inf"))
    mask[:, :, :, 0] = 0.0  # every row keeps a key
    table = torch.randn(H, 41, dtype=torch.float64, device=device)
    return {"q": q, "k": k, "v": v, "mask": mask, "table": table, "scale": None}


def _sees(x, i, j):
    """Does row i (of every head, batch-wise) see key j: causal (q_pos 67) and not masked by −inf."""
    return (j <= 67 + i) & ~torch.isneginf(x["mask"][:, 0, i, j])


def _rows(*index):
    def rows(x):
        nan = torch.zeros(2, 4, 63, dtype=torch.bool)
        if index:
            nan[index] = True
        return nan
    return rows


def _rows_seeing(b, heads, j):
    def rows(x):
        nan = torch.zeros(2, 4, 63, dtype=torch.bool)
        for h in heads:
            nan[b, h] = _sees(x, torch.arange(63), j)[b].cpu()
        return nan
    return rows


def _rows_seeing_offset(head, r):
    """Rows of ``head`` that see their key at offset r (key 67 + i + r), in both batches."""
    def rows(x):
        i = torch.arange(63)
        nan = torch.zeros(2, 4, 63, dtype=torch.bool)
        nan[:, head] = _sees(x, i, 67 + i + r).cpu()
        return nan
    return rows


def _set(name, index, value):
    def inject(x):
        x[name][index] = value
    return inject


def _all_rows(x):
    return torch.ones(2, 4, 63, dtype=torch.bool)


def _q_row_masked(x):
    x["q"][0, 1, 5] = float("nan")
    x["mask"][0, 0, 5] = float("-inf")  # row 5 of batch 0 sees no key: 0 and lse −inf, NaN or not


def _scale_nan(x):
    x["scale"] = float("nan")


def _v_at_masked_key(x):
    x["v"][0, 0, 128, 0] = float("-inf")
    x["mask"][0, 0, :, 128] = float("-inf")  # no row sees key 128 of batch 0


# case: (inject(inputs), rows whose output and lse are NaN)
NONFINITE = {
    "q-nan": (_set("q", (0, 1, 5, 3), float("nan")), _rows(0, 1, 5)),
    "q-inf": (_set("q", (0, 1, 5, 3), float("inf")), _rows(0, 1, 5)),
    "q-nan-row-fully-masked": (_q_row_masked, _rows()),
    # key 70 of KV head 0 (query heads 0, 1) of batch 1: the rows that see it
    "k-nan": (_set("k", (1, 0, 70, 2), float("nan")), _rows_seeing(1, (0, 1), 70)),
    "k-inf": (_set("k", (1, 0, 70), float("inf")), _rows_seeing(1, (0, 1), 70)),
    # v_j non-finite: a NaN score of key j (KV head 1: query heads 2, 3)
    "v-nan": (_set("v", (1, 1, 100, 7), float("nan")), _rows_seeing(1, (2, 3), 100)),
    "v-inf": (_set("v", (1, 1, 100, 7), float("inf")), _rows_seeing(1, (2, 3), 100)),
    "v-neginf-masked-key": (_v_at_masked_key, _rows()),
    "mask-nan": (_set("mask", (0, 0, 10, 20), float("nan")), _rows(0, slice(None), 10)),
    "mask-inf": (_set("mask", (0, 0, 10, 20), float("inf")), _rows(0, slice(None), 10)),
    # the table entry of offset −3 of head 2 (+0 of head 0): every row sees that key unless the mask hides it
    "table-nan": (_set("table", (2, 17), float("nan")), _rows_seeing_offset(2, -3)),
    "table-inf": (_set("table", (0, 20), float("inf")), _rows_seeing_offset(0, 0)),
    "scale-nan": (_scale_nan, _all_rows),
}


def _nonfinite_run(x, backend, dtype):
    kw = dict(attn_mask=x["mask"].to(dtype), causal=True, q_pos=67, return_lse=True,
              bias=posattn.RelativeBias(x["table"].to(dtype)), scale=x["scale"])
    if backend != "reference":
        kw["backend"] = backend
    fn = posattn.reference.attention if backend == "reference" else posattn.attention
    return fn(x["q"].to(dtype), x["k"].to(dtype), x["v"].to(dtype), **kw)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in Triton's interpreter
@pytest.mark.parametrize("what", list(NONFINITE))
def test_nonfinite_inputs(what, device, backend):
    x = _nonfinite_inputs(device)
    inject, nan_rows = NONFINITE[what]
    inject(x)
    rows = nan_rows(x)
    expect_out = rows[..., None].expand(2, 4, 63, 40)
    ref64, low, got = (_nonfinite_run(x, b, dt) for b, dt in (("reference", torch.float64),
                                                              ("reference", torch.float32), (backend, torch.float32)))
    for name, expect, r, lo, g in zip(("out", "lse"), (expect_out, rows), ref64, low, got):
        assert torch.equal(torch.isnan(r).cpu(), expect), f"{what}: the reference's NaN {name} break the rule"
        assert torch.equal(torch.isnan(g), torch.isnan(r)), (
            f"{what}: {name} NaN at {torch.isnan(g).sum().item()} entries, the reference at {torch.isnan(r).sum().item()}")
        nan = torch.isnan(r)
        assert_close(f"{what}-{name}", g.masked_fill(nan, 0), r.masked_fill(nan, 0), lo.masked_fill(nan, 0))
    if what == "q-nan-row-fully-masked":
        assert torch.all(got[0][0, :, 5] == 0) and torch.all(torch.isneginf(got[1][0, :, 5]))


# The same rule where the bad value row lies on interior tiles (no mask, no bias: the Triton
# forward does not check V there, it turns a row with a non-finite accumulator into NaN) and on
# boundary tiles of the same call: L = S = 192, so 64-row tiles are whole; key 100 is seen by
# rows ≥ 100 (causal), or by rows 100 − 70 … 100 + 40 (window), or by all (plain).
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in Triton's interpreter
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"window": (40, 70)}], ids=["plain", "causal", "window"])
def test_nonfinite_value_on_interior_tiles(kw, value, device, backend):
    q, k, v = (torch.randn(1, 2, 192, 16, dtype=torch.float64, device=device) for _ in range(3))
    v[0, 1, 100, 3] = value
    out, lse = posattn.attention(q.float(), k.float(), v.float(), backend=backend, return_lse=True, **kw)
    ref, ref_lse = posattn.reference.attention(q, k, v, return_lse=True, **kw)
    rows = torch.zeros(1, 2, 192, dtype=torch.bool)
    i = torch.arange(192)
    rows[0, 1] = ((i >= 100) if kw.get("causal") else
                  ((100 >= i - 40) & (100 <= i + 70)) if "window" in kw else torch.ones(192, dtype=torch.bool))
    for name, got, r in (("out", out, ref), ("lse", lse, ref_lse)):
        nan = torch.isnan(r).cpu()
        assert torch.equal(nan if name == "lse" else nan.any(-1), rows), f"{name}: the reference breaks the rule"
        assert torch.equal(torch.isnan(got).cpu(), nan), (
            f"{name}: NaN at {torch.isnan(got).sum().item()} entries, the reference at {nan.sum().item()}")
        assert_close(name, got.masked_fill(nan.to(got.device), 0), r.masked_fill(nan.to(r.device), 0),
                     r.float().masked_fill(nan.to(r.device), 0))


def _run_paths(c, monkeypatch, env_a, env_b, dtype=torch.float32):
    """Forward and backward of case ``c`` on the Triton backend under two settings of
    environment knobs: both runs' outputs and gradients, from the same inputs and seeds."""
    from conftest import DEVICE
    q, k, v, _ = make_inputs(c, dtype, DEVICE)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    kw = positions_for(c.kw, DEVICE)
    spec = {name: t.float() for name, (t, _) in c.spec[1](DEVICE).items()} if c.spec else {}
    dout = torch.randn(c.B, c.H, c.L, c.Dv, device=DEVICE).to(dtype)

    def run_path(env):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        torch.manual_seed(5)  # the dropout seed
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        params = {name: t.clone().requires_grad_() for name, t in spec.items()}
        out, lse = posattn.attention(*leaves, backend="triton", return_lse=True,
                                     **(c.spec[2](params) if c.spec else {}), **kw)
        ((out.float() * dout.float()).sum() + lse.sum()).backward()
        return {"out": out, "lse": lse, **{f"d{n}": t.grad for n, t in zip("qkv", leaves)},
                **{f"d{n}": t.grad for n, t in params.items()}}

    return run_path(env_a), run_path(env_b)


def _assert_equal_paths(c, a, b, what):
    for name in a:
        assert not torch.isnan(a[name]).any(), f"{c.id} {name}: NaN"
        assert torch.equal(a[name], b[name]), (
            f"{c.id} {name}: {what} differ by {(a[name] - b[name]).abs().max().item():.3e}")


# Interior tiles (every (query, key) pair in bounds and visible, no attn_mask) run without any
# masking; POSATTN_MASK_ALL_TILES=1 sends them through the boundary tiles' masked path instead.
# The two paths must agree bitwise. The interpreter's tiles are 64 × 64, so these shapes mix
# both kinds of tile: L, S multiples of 64 or not, the causal diagonal mid-tile, windows over
# several tiles, query / key position tensors (which put the other side's tiles on the
# boundary path), and biases, softcap, URPE and dropout on interior tiles.
@pytest.mark.parametrize("c", [
    Case(L=128, S=128, D=16),  # every tile interior (non-causal, tile multiples)
    # the diagonal one key before / after a tile edge: an off-by-one in the interior bounds of
    # the forward / dQ (q_pos 62) or of dK/dV (q_pos −2) puts a masked pair on the interior path
    Case(L=130, S=200, D=16, kw={"causal": True, "q_pos": 62}),
    Case(L=130, S=200, D=16, kw={"causal": True, "q_pos": -2}),
    Case(L=130, S=256, D=16, kw={"window": (150, 70)}),
    Case(B=2, H=2, Hkv=1, L=128, S=192, D=16, kw={"causal": True, "q_pos": _perm_positions(128, 3) + 40}),
    Case(L=128, S=192, D=16, kw={"causal": True, "k_pos": _perm_positions(192, 4)}),
    Case(L=128, S=128, D=16, spec=urpe(21, bias=41), kw={"softcap": 3.0, "dropout_p": 0.25}),
], ids=lambda c: c.id)
def test_interior_and_boundary_paths_agree_bitwise(c, monkeypatch):
    interior, boundary = _run_paths(c, monkeypatch, {"POSATTN_MASK_ALL_TILES": "0"}, {"POSATTN_MASK_ALL_TILES": "1"})
    _assert_equal_paths(c, interior, boundary, "interior and boundary paths")


# The forward's and dQ's interior tiles read K and V through TMA descriptors (POSATTN_TMA;
# the default on sm_90) or through pointers: the same values reach the same arithmetic, so the
# results agree bitwise. Ragged L / S and a padded head dim (D = 40: the descriptor zero-fills
# columns 40..63), GQA, a T5 bias on interior tiles, a transposed (B, L, H, D) layout,
# Dv ≠ D, a window, and fp16.
@pytest.mark.parametrize("c,dtype", [
    (Case(H=4, Hkv=2, L=130, S=200, D=40, kw={"causal": True, "q_pos": 70}), torch.float32),
    (Case(L=128, S=192, D=32, Dv=16, blhd=True, spec=table_spec("t5", posattn.T5Bias, 32), kw={"causal": True}),
     torch.float32),
    (Case(L=128, S=130, D=64, kw={"window": (200, 70)}), torch.float16),
], ids=lambda x: x.id if isinstance(x, Case) else str(x).removeprefix("torch."))
def test_tma_and_pointer_paths_agree_bitwise(c, dtype, monkeypatch):
    from posattn.positions import KernelPositions
    from posattn.triton_kernels import attention
    monkeypatch.setenv("POSATTN_TMA", "1")
    k = torch.empty(c.B, c.Hkv, c.S, c.D, dtype=dtype)
    assert attention._tma_descriptors(k, None, KernelPositions(), (k, 64, 64)) is not None, "no TMA path"
    tma, pointers = _run_paths(c, monkeypatch, {"POSATTN_TMA": "1"}, {"POSATTN_TMA": "0"}, dtype)
    _assert_equal_paths(c, tma, pointers, "TMA and pointer paths")


def test_tma_descriptors_only_for_layouts_tma_reads(monkeypatch):
    """Descriptors need a 16-byte aligned base and strides and a unit last stride: other
    layouts (and packed batches, rotary specs, POSATTN_TMA=0) keep pointers; a bad knob
    value raises."""
    from posattn.positions import KernelPositions, kernel_positions
    from posattn.triton_kernels import attention
    x = torch.empty(2, 3, 50, 40)
    kp = KernelPositions()
    monkeypatch.setenv("POSATTN_TMA", "1")
    descs = attention._tma_descriptors(x, None, kp, (x, 64, 64), (x[..., :32], 32, 32))
    assert [d.block_shape for d in descs] == [[1, 1, 64, 64], [1, 1, 32, 32]]
    assert list(descs[1].shape) == [2, 3, 50, 32] and list(descs[1].strides) == [6000, 2000, 40, 1]
    assert attention._tma_descriptors(x, None, kp, (torch.empty(2, 3, 50, 18), 64, 32)) is None  # 72-byte rows
    assert attention._tma_descriptors(x, None, kp, (x[..., 1:], 64, 64)) is None  # base 4 bytes off
    assert attention._tma_descriptors(x, None, kp, (x.transpose(2, 3), 64, 64)) is None  # last stride 40
    assert attention._tma_descriptors(x, None, kp, (x[:, :, :0], 64, 64)) is None  # an empty dim
    assert attention._tma_descriptors(x, (None, None), kp, (x, 64, 64)) is None  # a packed batch
    rope = kernel_positions(posattn.RoPE(), None, None, x, x, 0, 0)
    assert attention._tma_descriptors(x, None, rope, (x, 64, 64)) is None  # keys rotated on load
    monkeypatch.setenv("POSATTN_TMA", "0")
    assert attention._tma_descriptors(x, None, kp, (x, 64, 64)) is None
    monkeypatch.setenv("POSATTN_TMA", "maybe")
    with pytest.raises(ValueError, match="POSATTN_TMA='maybe'"):
        attention._tma_descriptors(x, None, kp, (x, 64, 64))


def test_autotune_times_each_key_once_and_keeps_the_fastest(monkeypatch):
    """A plain call (no position spec, mask or dropout) times every candidate tile config of
    each kernel on its key's first call and launches the fastest; later calls of that key and
    calls with a position spec time nothing. The interpreter has no alternatives of its own:
    the test gives it one (32 × 32 tiles) and a timer under which the second candidate wins."""
    from posattn import _config
    from posattn.triton_kernels import _autotune
    alt = _config.TileConfig(32, 32, 4, 1)
    timed = []

    def fake_time(fn, device, reps=3):
        fn()
        timed.append(len(timed))
        return 2.0 if len(timed) % 2 else 1.0  # each kernel's first candidate 2.0, its second 1.0

    q, k, v = (torch.randn(2, 2, 70, 16) for _ in range(3))

    def run(**kw):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = posattn.attention(*leaves, backend="triton", causal=True, **kw)
        out.backward(torch.ones_like(out))
        return [out, *(t.grad for t in leaves)]

    _autotune.clear()
    monkeypatch.setattr(_autotune, "time_launch", fake_time)
    monkeypatch.setattr(_config, "_INTERPRET_ALTERNATIVES", (alt,))
    monkeypatch.setenv("POSATTN_AUTOTUNE", "1")
    try:
        tuned = run()
        assert len(timed) == 6  # fwd, dK/dV, dQ: two candidates each
        assert sorted(key[0] for key in _autotune._BEST) == ["dkdv", "dq", "fwd"]
        assert set(_autotune._BEST.values()) == {alt}
        again = run()
        run(rope=posattn.RoPE())
        assert len(timed) == 6, "a known key or a call with a position spec was timed"
        monkeypatch.setattr(_config, "_INTERPRET", alt)  # what the chosen config computes
        monkeypatch.setattr(_config, "_INTERPRET_ALTERNATIVES", ())
        _autotune.clear()
        alone = run()
    finally:
        _autotune.clear()
    for a, b, c in zip(tuned, again, alone):
        assert torch.equal(a, c) and torch.equal(b, c)
