"""posattn.attention on the Triton kernels against posattn.reference in float64.

Every case checks the output, lse and every gradient (q, k, v, float mask) with the one
tolerance rule of tests/tolerance.py. On a machine without a GPU the kernels run in
Triton's interpreter (fp32, fp16); bf16 runs on CUDA only (tl.dot on bf16 is broken in
the interpreter, triton issue #11584).
"""
from dataclasses import dataclass, field, replace

import pytest
import torch

import posattn
from conftest import HAS_CUDA
from tolerance import assert_close

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])


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
    mask: tuple = None  # (shape, "bool" | "float" | "float-grad")
    blhd: bool = False  # q, k, v as transposed (B, L, H, D) views
    lse_grad: bool = True

    def __post_init__(self):
        self.Dv = self.D if self.Dv is None else self.Dv

    @property
    def id(self):
        parts = [f"B{self.B}-H{self.H}" + (f"-Hkv{self.Hkv}" if self.Hkv != self.H else ""),
                 f"L{self.L}-S{self.S}-D{self.D}" + (f"-Dv{self.Dv}" if self.Dv != self.D else "")]
        for k, v in self.kw.items():
            parts.append(k if v is True else f"{k}{v}" if not isinstance(v, str) else v)
        if self.mask:
            parts.append(f"{self.mask[1]}mask{'x'.join(map(str, self.mask[0]))}")
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
    return q, k, v, mask


def positions_for(kw, device):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def run(q, k, v, mask, dout, dlse, backend, dtype, kw, mask_grad):
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
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
    return {"out": out.detach(), "lse": lse.detach(), **grads}


def check(c: Case, dtype, device, backend="triton"):
    q, k, v, mask = make_inputs(c, torch.float64, device)
    kw = positions_for(c.kw, device)
    dout = torch.randn(c.B, c.H, c.L, c.Dv, device=device, dtype=torch.float64)
    dlse = torch.randn(c.B, c.H, c.L, device=device, dtype=torch.float64) if c.lse_grad else None
    mask_grad = c.mask is not None and c.mask[1] == "float-grad"
    ref = run(q, k, v, mask, dout, dlse, "reference", torch.float64, kw, mask_grad)
    low = run(q, k, v, mask, dout, dlse, "reference", dtype, kw, mask_grad)
    got = run(q, k, v, mask, dout, dlse, backend, dtype, kw, mask_grad)
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
def test_shapes(c, causal, device):
    check(replace(c, kw={"causal": causal}), torch.float32, device)


@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
@pytest.mark.parametrize("c", [Case(B=2, L=63, S=130, D=72, kw={"causal": True}),
                               Case(H=4, Hkv=1, L=130, S=7, D=128, Dv=40),
                               Case(L=63, S=63, D=40, mask=((63, 63), "float-grad"), kw={"softcap": 5.0})],
                         ids=lambda c: c.id)
def test_half_precision(c, dtype, device):
    check(c, dtype, device)


@pytest.mark.parametrize("c", [
    Case(H=4, Hkv=1, L=63, S=63, D=40, kw={"causal": True}),
    Case(H=8, Hkv=1, L=7, S=130, D=16),
    Case(B=2, H=8, Hkv=2, L=63, S=63, D=72, kw={"window": (8, 0)}),
], ids=lambda c: c.id)
def test_gqa(c, device):
    check(c, torch.float32, device)


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
def test_position_offsets(c, device):
    check(c, torch.float32, device)


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
def test_position_tensors(c, device):
    check(c, torch.float32, device)


@pytest.mark.parametrize("window", [(8, 0), (0, 8), (16, 16), (-1, 4), (4, -1), (0, 0), (200, 200)],
                         ids=lambda w: f"w{w[0]}_{w[1]}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_window(window, causal, device):
    check(Case(L=130, S=130, D=16, kw={"window": window, "causal": causal}), torch.float32, device)


MASKS = [((63, 130), "bool"), ((63, 130), "float"), ((63, 130), "float-grad"), ((2, 1, 1, 130), "bool"),
         ((2, 1, 1, 130), "float-grad"), ((1, 2, 63, 130), "float-grad"), ((2, 2, 63, 130), "float-grad"),
         ((2, 2, 63, 130), "bool"), ((63, 1), "float-grad"), ((1, 130), "float-grad"), ((2, 1, 63, 1), "bool")]


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: f"{m[1]}-{'x'.join(map(str, m[0]))}")
def test_masks(mask, device):
    check(Case(B=2, L=63, S=130, D=40, mask=mask), torch.float32, device)


def test_mask_with_causal_window_softcap(device):
    check(Case(B=2, H=4, Hkv=2, L=130, S=130, D=40, mask=((2, 1, 130, 130), "float-grad"),
               kw={"causal": True, "window": (40, -1), "softcap": 3.0}), torch.float32, device)


def test_fully_masked_rows(device):
    # rows 0, 5 and 62 see no key at all: output 0, lse −inf, no NaN anywhere (also in grads)
    mask = torch.rand(2, 1, 63, 130) > 0.5
    mask[:, :, [0, 5, 62]] = False
    c = Case(B=2, L=63, S=130, D=40)
    q, k, v, _ = make_inputs(c, torch.float32, device)
    out, lse = posattn.attention(q, k, v, attn_mask=mask.to(device), return_lse=True, backend="triton")
    assert torch.all(out[:, :, [0, 5, 62]] == 0)
    assert torch.all(torch.isneginf(lse[:, :, [0, 5, 62]]))
    check(Case(B=2, L=63, S=130, D=40, mask=((2, 1, 63, 130), "bool")), torch.float32, device)


@pytest.mark.parametrize("c", [Case(B=2, H=4, Hkv=2, L=63, S=130, D=40, blhd=True, kw={"causal": True}),
                               Case(B=2, H=2, L=130, S=63, D=72, Dv=16, blhd=True,
                                    mask=((2, 1, 130, 63), "float-grad"))],
                         ids=lambda c: c.id)
def test_transposed_views(c, device):
    q, _, _, _ = make_inputs(c, torch.float32, device)
    assert not q.is_contiguous()
    check(c, torch.float32, device)


@pytest.mark.parametrize("c", [Case(L=63, S=130, D=40, kw={"softcap": 2.0}),
                               Case(L=130, S=130, D=16, kw={"softcap": 0.5, "causal": True}, lse_grad=False),
                               Case(L=7, S=63, D=40, kw={"scale": 0.7}),
                               Case(L=63, S=63, D=40, kw={"causal": True}, lse_grad=False)],
                         ids=lambda c: c.id)
def test_softcap_scale_and_no_lse(c, device):
    check(c, torch.float32, device)


# ---- dropout --------------------------------------------------------------------------------------

def _seed_drawn_after(manual_seed):
    # posattn.attention draws its Philox seed as the first torch.randint after manual_seed
    torch.manual_seed(manual_seed)
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


@pytest.mark.parametrize("c", [Case(B=2, H=4, Hkv=2, L=63, S=130, D=40, kw={"dropout_p": 0.3}),
                               Case(L=130, S=130, D=16, kw={"dropout_p": 0.5, "causal": True},
                                    mask=((130, 130), "float-grad"))],
                         ids=lambda c: c.id)
def test_dropout_matches_reference_with_same_mask(c, device):
    from posattn.triton_kernels import dropout_mask

    q, k, v, mask = make_inputs(c, torch.float32, device)
    p = c.kw["dropout_p"]
    keep = dropout_mask(_seed_drawn_after(11), c.B, c.H, c.L, c.S, p, device)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.03
    dout = torch.randn(c.B, c.H, c.L, c.Dv, device=device, dtype=torch.float64)
    kw = positions_for(c.kw, device)
    mask_grad = c.mask is not None and c.mask[1] == "float-grad"
    ref = run(q, k, v, mask, dout, None, "reference", torch.float64, {**kw, "dropout_mask": keep}, mask_grad)
    low = run(q, k, v, mask, dout, None, "reference", torch.float32, {**kw, "dropout_mask": keep}, mask_grad)
    torch.manual_seed(11)
    got = run(q, k, v, mask, dout, None, "triton", torch.float32, kw, mask_grad)
    for name in ref:
        assert_close(f"{c.id}-{name}", got[name], ref[name], low[name])


def test_dropout_same_seed_same_result(device):
    c = Case(L=63, S=63, D=40, kw={"dropout_p": 0.4})
    q, k, v, _ = make_inputs(c, torch.float32, device)
    dout = torch.randn(c.B, c.H, c.L, c.Dv, device=device, dtype=torch.float64)
    results = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        results.append(run(q, k, v, None, dout, None, "triton", torch.float32, c.kw, False))
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name
    assert not torch.equal(results[0]["out"], results[2]["out"])


def test_dropout_expectation(device):
    # E[dropout(P)] = P, so the mean output over many seeds approaches the no-dropout output.
    # Bound: 5 standard errors of the mean, estimated from the samples themselves.
    c = Case(H=1, Hkv=1, L=7, S=63, D=16)
    q, k, v, _ = make_inputs(c, torch.float32, device)
    clean = posattn.attention(q, k, v, backend="triton")
    outs = torch.stack([posattn.attention(q, k, v, dropout_p=0.3, backend="triton") for _ in range(120)])
    stderr = outs.std(dim=0) / outs.shape[0] ** 0.5
    assert torch.all((outs.mean(dim=0) - clean).abs() <= 5 * stderr + 1e-6)


def test_dropout_p_one_drops_everything(device):
    c = Case(L=63, S=130, D=40)
    q, k, v, _ = make_inputs(c, torch.float32, device)
    dout = torch.randn(c.B, c.H, c.L, c.Dv, device=device, dtype=torch.float64)
    got = run(q, k, v, None, dout, None, "triton", torch.float32, {"dropout_p": 1.0}, False)
    for name in ("out", "dq", "dk", "dv"):
        assert torch.all(got[name] == 0), name


@pytest.mark.parametrize("L, S", [(0, 9), (7, 0)], ids=["L0", "S0"])
def test_empty_sequences(L, S, device):
    c = Case(L=L, S=S, D=16)
    q, k, v, _ = make_inputs(c, torch.float32, device)
    q.requires_grad_()
    out, lse = posattn.attention(q, k, v, return_lse=True, backend="triton")
    assert out.shape == (1, 2, L, 16) and lse.shape == (1, 2, L)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    out.sum().backward()
    assert torch.all(q.grad == 0)
