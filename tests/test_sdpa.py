"""posattn.scaled_dot_product_attention as an exact drop-in for torch's SDPA (docs/semantics.md).

The oracle is ``torch.nn.functional.scaled_dot_product_attention`` itself, in float64, on
the same inputs: for every case the output and the gradients of q, k, v (and of a float
mask that requires grad) are compared with it.

* Default backend (float64 → "reference"), float64: ``assert_close64`` (rtol 1e-10, atol
  1e-12 × max(1, |expected|), i.e. a few thousand float64 ulps; measured differences are
  ≲ 1e-15 relative).
* Kernel backends, selected with ``POSATTN_BACKEND``: Triton (under the interpreter on CPU)
  on the cases marked ``triton`` in float32 and a few float16 cases; the C++ cpu backend
  (CPU tensors, also on a machine with a GPU) on every case in float32 and on the float16
  cases in float16 and bfloat16. Both with ``tolerance.assert_close`` (docs/math.md §7),
  ref64 = torch SDPA in float64 and same_dtype = torch SDPA in the input dtype.

Behaviour of torch 2.13 (CPU) that these tests rely on or document, checked by hand:

* A fully masked query row (bool mask all False, or a float mask all −inf) gives output 0
  and zero (finite) gradients in torch too, so those rows are compared with torch as well.
* ``attn_mask`` together with ``is_causal=True``: torch 2.13 raises RuntimeError
  ("_scaled_dot_product_attention: Explicit attn_mask should not be set when is_causal=True")
  on its math path (e.g. Ev ≠ E), while its fused CPU path (Ev = E) applies both (the result
  equals ``attn_mask & tril``). posattn always raises, with torch's text.
* Argument errors (types, dims, dtypes, devices, heads, batch broadcast, head dims, lengths,
  mask shape, dropout_p > 1): posattn raises torch's exception type with a message that
  starts with torch's text (``test_raises_like_torch`` runs both on each bad input). A
  negative ``dropout_p`` is ignored by torch and rejected by posattn (ValueError).
* Mask dtypes: torch accepts a bool mask, a float32 mask with any floating query (float16,
  bfloat16, float32, float64), or a mask of the query's dtype; a float64 or float16 mask with
  a float32 query and an int mask raise RuntimeError; posattn follows the same rule.
* Empty sequences (L = 0 or S = 0): torch returns an empty output, resp. zeros; so does
  posattn.
* Differing heads without ``enable_gqa`` raise RuntimeError unless one side has one head
  (broadcast); ``enable_gqa`` with Hq % Hkv != 0 raises RuntimeError; with ``enable_gqa``
  key and value may have different heads, each dividing Hq.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F

import posattn
from conftest import HAS_CUDA, backend_device, requires_ext
from tolerance import assert_close

F64 = torch.float64
RTOL64 = 1e-10
ATOL64 = 1e-12


def torch_sdpa(*args, **kwargs):
    return F.scaled_dot_product_attention(*args, **kwargs)


def posattn_sdpa(*args, **kwargs):
    return posattn.scaled_dot_product_attention(*args, **kwargs)


def assert_close64(name, got, expected):
    """float64 against torch's float64 SDPA: both compute the same sums, so only rounding differs."""
    assert got.dtype == expected.dtype == F64, f"{name}: dtype {got.dtype}, expected float64"
    atol = ATOL64 * max(1.0, expected.abs().max().item() if expected.numel() else 0.0)
    torch.testing.assert_close(got, expected, rtol=RTOL64, atol=atol, msg=lambda m: f"{name}: {m}")


# --------------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------------

LETTERS = {2: "LS", 3: "NLS", 4: "BHLS", 5: "NMHLS"}  # names of the dims of the attention weights


@dataclass(frozen=True)
class Case:
    """One SDPA call. Shapes are the logical (post-transpose) shapes of q, k, v.

    ``mask``: the mask's shape in the letters of the weights' dims (``LETTERS``), right-aligned,
    "1" for a broadcast dim: "B11S" is (B, 1, 1, S), "H1S" is (H, 1, S).
    ``fill``: "random"; "inf" (a float mask with ~25 % −inf entries); "dead" (some query rows,
    or for a mask without an L dim the first batch, see no key at all).
    """
    q: tuple
    k: tuple
    v: tuple
    mask: str | None = None
    mask_kind: str = "bool"
    mask_grad: bool = False
    fill: str = "random"
    causal: bool = False
    scale: float | None = None
    gqa: bool = False
    transposed: bool = False
    triton: bool = False

    @property
    def full(self):
        """Shape of the attention weights (torch's broadcast result)."""
        L, S = self.q[-2], self.k[-2]
        if len(self.q) == 2:
            return (L, S)
        if self.gqa:
            return (*torch.broadcast_shapes(self.q[:-3], self.k[:-3]), self.q[-3], L, S)
        return (*torch.broadcast_shapes(self.q[:-2], self.k[:-2]), L, S)

    @property
    def mask_shape(self):
        full, letters = self.full, LETTERS[len(self.full)]
        assert len(self.mask) <= len(full) and all(c == "1" or c in letters for c in self.mask), self.mask
        names = letters[len(letters) - len(self.mask):]
        assert all(c in ("1", n) for c, n in zip(self.mask, names)), (self.mask, names)
        return tuple(1 if c == "1" else full[letters.index(c)] for c in self.mask)

    @property
    def id(self):
        letters = LETTERS[len(self.q)].replace("S", "E")  # q's dims: (..., L, E)
        parts = [f"{n}{d}" for n, d in zip(letters[:-2], self.q[:-2])]
        parts += [f"L{self.q[-2]}", f"S{self.k[-2]}", f"E{self.q[-1]}"]
        if self.v[-1] != self.q[-1]:
            parts.append(f"Ev{self.v[-1]}")
        parts += [f"{n}kv{kd}" for n, qd, kd in zip(letters[:-2], self.q[:-2], self.k[:-2]) if qd != kd]
        if self.causal:
            parts.append("causal")
        if self.gqa:
            parts.append("gqa")
        if self.scale is not None:
            parts.append(f"scale{self.scale:g}")
        if self.mask is not None:
            parts.append(f"{self.mask_kind}mask-{self.mask}")
            if self.mask_grad:
                parts.append("grad")
            if self.fill != "random":
                parts.append(self.fill)
        if self.transposed:
            parts.append("transposed")
        return "-".join(parts)


def c4(B, H, L, S, E, *, Ev=None, Hkv=None, Bkv=None, **kw):
    Hkv, Bkv, Ev = Hkv or H, Bkv or B, Ev or E
    return Case((B, H, L, E), (Bkv, Hkv, S, E), (Bkv, Hkv, S, Ev), **kw)


def c3(N, L, S, E, *, Ev=None, Nkv=None, **kw):
    Nkv, Ev = Nkv or N, Ev or E
    return Case((N, L, E), (Nkv, S, E), (Nkv, S, Ev), **kw)


def c2(L, S, E, *, Ev=None, **kw):
    return Case((L, E), (S, E), (S, Ev or E), **kw)


def c5(N, M, H, L, S, E, *, kv=None, Ev=None, **kw):
    """kv: (N, M, H) of key/value when they differ from the query's."""
    Nk, Mk, Hk = kv or (N, M, H)
    Ev = Ev or E
    return Case((N, M, H, L, E), (Nk, Mk, Hk, S, E), (Nk, Mk, Hk, S, Ev), **kw)


T = dict(triton=True)  # also run through the Triton kernels (the cpu backend runs every case)
ODD = (1, 7, 63, 130)

CASES = [
    # shapes: 4-D, L != S, E != Ev, head dims 16 / 40 / 72 / 128
    c4(2, 4, 63, 130, 40, **T),
    c4(1, 2, 130, 63, 40, Ev=24, **T),
    c4(1, 2, 7, 130, 72, Ev=16, **T),
    c4(1, 1, 63, 7, 128, **T),
    # odd lengths (all 16 pairs in float64, a few through Triton)
    *[c4(1, 2, L, S, 16, triton=(L, S) in {(1, 130), (130, 1), (130, 130)}) for L in ODD for S in ODD],
    # 3-D (N, L, E): N plays the heads' role; key/value N = 1 broadcasts; query N = 1 broadcasts
    c3(3, 7, 63, 16, **T),
    c3(4, 63, 7, 16, Nkv=1, **T),
    c3(1, 7, 63, 16, Nkv=4),
    c3(8, 7, 63, 16, Nkv=2, gqa=True),
    # 2-D (L, E)
    c2(63, 130, 40, **T),
    c2(1, 1, 16, **T),
    c2(7, 7, 16, Ev=8),
    c2(130, 7, 16, causal=True),
    # 5-D (N, M, H, L, E), with batch broadcast and GQA
    c5(2, 2, 2, 7, 63, 16, **T),
    c5(2, 1, 2, 7, 63, 16, kv=(1, 3, 2), Ev=8, **T),
    c5(1, 2, 4, 7, 63, 16, kv=(1, 2, 1), gqa=True),
    # grouped-query attention 4:1 and 8:1
    c4(2, 4, 63, 130, 40, Hkv=1, gqa=True, **T),
    c4(1, 8, 7, 130, 16, Hkv=2, gqa=True, **T),
    c4(1, 8, 63, 63, 16, Hkv=1, gqa=True, **T),
    c4(1, 8, 130, 7, 16, Hkv=1, gqa=True, causal=True),
    c4(2, 4, 7, 63, 16, Hkv=4, gqa=True),  # ratio 1
    # heads broadcast without enable_gqa (one side has a single head), batch broadcast
    c4(2, 1, 7, 63, 16, Hkv=4, **T),
    c4(2, 4, 7, 63, 16, Hkv=1),
    c4(2, 2, 63, 130, 16, Bkv=1, **T),
    c4(2, 4, 7, 63, 16, Bkv=1, Hkv=2, gqa=True),
    # key and value with different heads: each broadcasts (one head) or, with enable_gqa, divides Hq
    Case((2, 4, 7, 16), (2, 1, 63, 16), (2, 4, 63, 16), triton=True),
    Case((2, 4, 7, 16), (2, 2, 63, 16), (2, 1, 63, 16), gqa=True),
    Case((1, 6, 7, 16), (1, 2, 63, 16), (1, 3, 63, 16), gqa=True),
    # explicit scale (the default is 1/sqrt(E), not 1/sqrt(Ev))
    c4(1, 2, 63, 130, 40, Ev=24, scale=0.3, **T),
    c4(1, 2, 7, 7, 16, scale=2.0),
    c4(1, 2, 7, 63, 16, Ev=64, causal=True, scale=0.05),
    # transposed views: created (B, L, H, E), then .transpose(1, 2)
    c4(2, 2, 63, 130, 40, transposed=True, **T),
    c4(1, 4, 7, 63, 16, Hkv=2, gqa=True, transposed=True, **T),
    c4(2, 2, 63, 63, 16, transposed=True, causal=True),
    # is_causal is top-left: L < S, L > S, L = S
    *[c4(1, 2, L, S, 16, causal=True, triton=(L, S) in {(63, 130), (130, 63)})
      for L, S in [(7, 63), (63, 7), (63, 63), (130, 63), (63, 130), (1, 130), (130, 1)]],
    # bool masks, broadcast shapes
    *[c4(2, 2, 63, 130, 16, mask=m, triton=m in {"LS", "B11S", "BHLS"})
      for m in ["LS", "B11S", "1HLS", "BHLS", "H1S", "1S", "L1", "B1LS"]],
    # float masks that require grad: the gradient has the mask's own shape
    *[c4(2, 2, 63, 130, 16, mask=m, mask_kind="float", mask_grad=True,
         triton=m in {"LS", "B11S", "BHLS", "H1S", "L1"})
      for m in ["LS", "B11S", "1HLS", "BHLS", "H1S", "1S", "L1", "B1LS"]],
    c4(2, 2, 63, 130, 16, mask="BHLS", mask_kind="float"),  # float mask without grad
    c4(1, 2, 63, 130, 16, mask="BHLS", mask_kind="float", mask_grad=True, fill="inf", **T),
    c4(1, 8, 63, 63, 16, Hkv=2, gqa=True, mask="1HLS", mask_kind="float", mask_grad=True, **T),
    c4(1, 8, 63, 63, 16, Hkv=2, gqa=True, mask="LS"),
    c4(2, 2, 7, 63, 16, Bkv=1, mask="B11S", mask_kind="float", mask_grad=True),
    c4(2, 2, 63, 63, 16, transposed=True, mask="B1LS", mask_kind="float", mask_grad=True),
    # masks on 2-D, 3-D and 5-D inputs (5-D masks with non-1 batch dims are materialised)
    c2(63, 130, 16, mask="LS", mask_kind="float", mask_grad=True),
    c3(3, 7, 63, 16, mask="NLS", mask_kind="float", mask_grad=True),
    c3(3, 7, 63, 16, mask="LS"),
    c5(2, 2, 2, 7, 63, 16, mask="LS", mask_kind="float", mask_grad=True),
    c5(2, 2, 2, 7, 63, 16, mask="N1HLS", mask_kind="float", mask_grad=True),
    c5(2, 1, 2, 7, 63, 16, kv=(1, 3, 2), mask="MHLS", mask_kind="float", mask_grad=True),
    c5(2, 2, 2, 7, 63, 16, mask="NM11S"),
]

# query rows that see no key: posattn returns 0 there (and so does torch 2.13)
DEAD_CASES = [
    c4(2, 2, 63, 130, 16, mask="LS", fill="dead", **T),
    c4(2, 2, 63, 130, 16, mask="BHLS", mask_kind="float", mask_grad=True, fill="dead", **T),
    c4(2, 2, 7, 63, 16, mask="B11S", fill="dead"),
    c4(1, 4, 7, 63, 16, Hkv=2, gqa=True, mask="1HLS", fill="dead"),
    c2(7, 63, 16, mask="LS", mask_kind="float", fill="dead"),
]

FP16_CASES = [
    c4(2, 2, 63, 130, 40, causal=True),
    c4(1, 4, 130, 63, 16, Hkv=2, gqa=True, mask="LS", mask_kind="float", mask_grad=True),
]


def params(cases):
    return [pytest.param(c, id=c.id) for c in cases]


def kernel_params(cases, dtypes=(torch.float32,), triton_dtypes=(torch.float32,)):
    """(case, backend, dtype): Triton on the cases marked ``triton`` (interpreter time), cpu on all."""
    def name(dt):
        return str(dt).removeprefix("torch.")

    triton = [pytest.param(c, "triton", dt, id=f"triton-{name(dt)}-{c.id}")
              for dt in triton_dtypes for c in cases if c.triton]
    cpu = [pytest.param(c, "cpu", dt, id=f"cpu-{name(dt)}-{c.id}", marks=requires_ext) for dt in dtypes for c in cases]
    return triton + cpu


# --------------------------------------------------------------------------------------------------
# running one case
# --------------------------------------------------------------------------------------------------

def make_inputs(case: Case, device):
    """float64 leaves (q, k, v stored in their allocation layout) and the mask."""
    def alloc(shape):
        if case.transposed:  # (B, H, L, E) allocated as (B, L, H, E)
            B, H, L, E = shape
            return torch.randn(B, L, H, E, dtype=F64, device=device)
        return torch.randn(shape, dtype=F64, device=device)

    data = {"q": alloc(case.q), "k": alloc(case.k), "v": alloc(case.v), "mask": None}
    if case.mask is not None:
        shape = case.mask_shape
        if case.mask_kind == "bool":
            mask = torch.rand(shape, device=device) < 0.75
        else:
            mask = torch.randn(shape, dtype=F64, device=device)
            if case.fill == "inf":
                mask = mask.masked_fill(torch.rand(shape, device=device) < 0.25, float("-inf"))
        if case.fill == "dead":
            off = False if case.mask_kind == "bool" else float("-inf")
            if "L" in case.mask:
                mask[..., [0, case.q[-2] // 2], :] = off
            else:
                mask[0] = off
        data["mask"] = mask
    return data


def dead_rows(mask):
    """Bool, broadcastable to the weights: the query rows that see no key at all."""
    keep = mask if mask.dtype == torch.bool else ~torch.isneginf(mask)
    return ~keep.any(dim=-1, keepdim=True)


def forward_backward(sdpa, case: Case, data, dtype, dout, **extra):
    """Run ``sdpa`` on the case in ``dtype``; returns out and the gradients of the leaves."""
    leaves = {n: data[n].detach().clone().to(dtype).requires_grad_() for n in "qkv"}
    mask = data["mask"]
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.detach().clone().to(dtype)
        if case.mask_grad:
            leaves["mask"] = mask.requires_grad_()
    args = [leaves[n].transpose(1, 2) if case.transposed else leaves[n] for n in "qkv"]
    kw = dict(attn_mask=mask, is_causal=case.causal, scale=case.scale, enable_gqa=case.gqa, **extra)
    out = sdpa(*args, **kw)
    assert out.dtype == dtype
    if dout is None:
        return {"out": out.detach()}
    grads = torch.autograd.grad(out, list(leaves.values()), dout.to(dtype))
    return {"out": out.detach(), **{f"d{n}": g for n, g in zip(leaves, grads)}}


def upstream_grad(case, data):
    with torch.no_grad():
        shape = forward_backward(torch_sdpa, case, data, F64, None)["out"].shape
    return torch.randn(shape, dtype=F64, device=data["q"].device)


def check_float64(case, device):
    data = make_inputs(case, device)
    dout = upstream_grad(case, data)
    expected = forward_backward(torch_sdpa, case, data, F64, dout)
    got = forward_backward(posattn_sdpa, case, data, F64, dout)
    assert got.keys() == expected.keys()
    for name in expected:
        assert_close64(name, got[name], expected[name])
    return data, got


def check_kernel(case, device, dtype):
    data = make_inputs(case, device)
    dout = upstream_grad(case, data)
    ref64 = forward_backward(torch_sdpa, case, data, F64, dout)
    same = forward_backward(torch_sdpa, case, data, dtype, dout)
    got = forward_backward(posattn_sdpa, case, data, dtype, dout)
    assert got.keys() == ref64.keys()
    for name in ref64:
        assert got[name].dtype == dtype, f"{name}: dtype {got[name].dtype}, expected {dtype}"
        assert_close(name, got[name], ref64[name], same[name])
    return data, got


@pytest.fixture
def reference_backend(monkeypatch):
    monkeypatch.delenv("POSATTN_BACKEND", raising=False)  # the default: float64 → "reference"
    return "reference"


def use_backend(monkeypatch, backend):
    """Route posattn's SDPA through ``backend``; returns the device its tensors live on."""
    if backend == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("POSATTN_BACKEND", backend)
    return backend_device(backend)


@pytest.fixture(params=["reference", "triton", pytest.param("cpu", marks=requires_ext)])
def backend(request, monkeypatch):
    if request.param == "reference":
        monkeypatch.delenv("POSATTN_BACKEND", raising=False)
    else:
        use_backend(monkeypatch, request.param)
    return request.param


# --------------------------------------------------------------------------------------------------
# forward and backward against torch
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", params(CASES))
def test_matches_torch_float64(case, device, reference_backend):
    check_float64(case, device)


@pytest.mark.parametrize("case, backend, dtype", kernel_params(CASES))
def test_kernel_matches_torch_float32(case, backend, dtype, monkeypatch):
    check_kernel(case, use_backend(monkeypatch, backend), dtype)


@pytest.mark.parametrize("case, backend, dtype", kernel_params([replace(c, triton=True) for c in FP16_CASES],
                                                               dtypes=(torch.float16, torch.bfloat16),
                                                               triton_dtypes=(torch.float16,)))
def test_kernel_matches_torch_half(case, backend, dtype, monkeypatch):
    check_kernel(case, use_backend(monkeypatch, backend), dtype)


def _check_dead_rows(data, got):
    dead = dead_rows(data["mask"])
    assert dead.any(), "the case must contain a fully masked row"
    out = got["out"]
    dead = dead.expand(*out.shape[:-1], 1)
    assert (out.masked_select(dead) == 0).all(), "fully masked rows must be exactly 0"
    for name, g in got.items():
        assert torch.isfinite(g).all(), f"{name}: non-finite values"


@pytest.mark.parametrize("case", params(DEAD_CASES))
def test_fully_masked_rows_float64(case, device, reference_backend):
    # torch 2.13 gives 0 (not NaN) on such rows and zero gradients, so the whole tensors are compared
    data, got = check_float64(case, device)
    _check_dead_rows(data, got)


@pytest.mark.parametrize("case, backend, dtype", kernel_params(DEAD_CASES))
def test_kernel_fully_masked_rows(case, backend, dtype, monkeypatch):
    data, got = check_kernel(case, use_backend(monkeypatch, backend), dtype)
    _check_dead_rows(data, got)


def test_gradient_has_the_masks_own_shape(device, reference_backend):
    case = c4(2, 2, 7, 63, 16, mask="H1S", mask_kind="float", mask_grad=True)
    data = make_inputs(case, device)
    got = forward_backward(posattn_sdpa, case, data, F64, upstream_grad(case, data))
    assert got["dmask"].shape == (2, 1, 63)


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------

def _qkv(*shapes, dtype=F64, device="cpu"):
    return [torch.randn(s, dtype=dtype, device=device) for s in shapes]


def _err_qkv(q=(1, 2, 4, 8), k=(1, 2, 5, 8), v=(1, 2, 5, 8), dtype=F64):
    return lambda d: [torch.randn(s, dtype=dtype, device=d) for s in (q, k, v)]


def _no_kw(device):
    return {}


# (q, k, v maker, keywords maker): every argument error of torch's SDPA that a caller may match
ERROR_CASES = {
    "mask-with-is-causal": (_err_qkv(v=(1, 2, 5, 6), dtype=torch.float32),  # Ev ≠ E: torch's math path
                            lambda d: dict(attn_mask=torch.ones(4, 5, dtype=torch.bool, device=d), is_causal=True)),
    "dtype-mismatch": (lambda d: [torch.randn(1, 2, 4, 8, dtype=F64, device=d),
                                  torch.randn(1, 2, 5, 8, dtype=torch.float32, device=d),
                                  torch.randn(1, 2, 5, 8, dtype=F64, device=d)], _no_kw),
    "device-mismatch": (lambda d: [torch.randn(1, 2, 4, 8, dtype=F64, device=d),
                                   torch.randn(1, 2, 5, 8, dtype=F64, device="meta"),
                                   torch.randn(1, 2, 5, 8, dtype=F64, device=d)], _no_kw),
    "query-not-a-tensor": (lambda d: [[1.0], *_err_qkv()(d)[1:]], _no_kw),
    "mask-not-a-tensor": (_err_qkv(), lambda d: dict(attn_mask=[True])),
    "query-1d": (_err_qkv(q=(8,)), _no_kw),
    "int-mask": (_err_qkv(), lambda d: dict(attn_mask=torch.ones(4, 5, dtype=torch.int64, device=d))),
    "float64-mask-float32-query": (_err_qkv(dtype=torch.float32),
                                   lambda d: dict(attn_mask=torch.zeros(4, 5, dtype=F64, device=d))),
    "bfloat16-mask-float32-query": (_err_qkv(dtype=torch.float32),
                                    lambda d: dict(attn_mask=torch.zeros(4, 5, dtype=torch.bfloat16, device=d))),
    "heads-8-2-without-gqa": (_err_qkv(q=(1, 8, 4, 8)), _no_kw),
    "value-heads-2-4-without-gqa": (_err_qkv(q=(1, 4, 4, 8), k=(1, 4, 5, 8), v=(1, 2, 5, 8)), _no_kw),
    "gqa-ratio-8-3": (_err_qkv(q=(1, 8, 4, 8), k=(1, 3, 5, 8), v=(1, 3, 5, 8)), lambda d: dict(enable_gqa=True)),
    "gqa-ratio-6-4": (_err_qkv(q=(1, 6, 4, 8), k=(1, 4, 5, 8), v=(1, 4, 5, 8)), lambda d: dict(enable_gqa=True)),
    "gqa-value-ratio-4-3": (_err_qkv(q=(1, 4, 4, 8), k=(1, 4, 5, 8), v=(1, 3, 5, 8)),
                            lambda d: dict(enable_gqa=True)),
    "batch-3-2": (_err_qkv(q=(3, 2, 4, 8), k=(2, 2, 5, 8), v=(2, 2, 5, 8)), _no_kw),
    "value-batch-3-2": (_err_qkv(q=(1, 2, 4, 8), k=(2, 2, 5, 8), v=(3, 2, 5, 8)), _no_kw),
    "head-dims-8-9": (_err_qkv(q=(3, 1, 2, 4, 8), k=(1, 2, 5, 9), v=(1, 2, 5, 8)), _no_kw),
    "key-value-lengths-5-6": (_err_qkv(v=(1, 2, 6, 6)), _no_kw),  # Ev ≠ E: torch's math path (its fused path takes it)
    "mask-not-broadcastable": (_err_qkv(), lambda d: dict(attn_mask=torch.ones(5, 4, dtype=torch.bool, device=d))),
    "mask-batch-3": (_err_qkv(), lambda d: dict(attn_mask=torch.ones(3, 1, 4, 5, dtype=torch.bool, device=d))),
    "mask-more-dims": (_err_qkv(), lambda d: dict(attn_mask=torch.ones(2, 1, 2, 4, 5, dtype=torch.bool, device=d))),
    "dropout-1.5": (_err_qkv(), lambda d: dict(dropout_p=1.5)),
}


@pytest.mark.parametrize("what", list(ERROR_CASES))
def test_raises_like_torch(what, device, reference_backend):
    # torch's exception type, and a message that starts with torch's own text
    make_qkv, make_kw = ERROR_CASES[what]
    raised = []
    args, kw = make_qkv(device), make_kw(device)
    for impl in (torch_sdpa, posattn_sdpa):
        with pytest.raises(Exception) as info:
            impl(*args, **kw)
        raised.append(info.value)
    expected, got = raised
    assert type(got) is type(expected), f"{what}: posattn raised {got!r}, torch {expected!r}"
    assert str(got).startswith(str(expected)), f"{what}: posattn says {str(got)!r}, torch {str(expected)!r}"


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
def test_mask_with_is_causal_raises(kind, dtype, device, reference_backend):
    # torch raises on its math path (e.g. Ev ≠ E); its fused CPU path (Ev = E, as here)
    # applies both (the result equals mask & tril). posattn always raises, in torch's words.
    q, k, v = _err_qkv(dtype=dtype)(device)
    if kind == "bool":
        mask = torch.ones(4, 5, dtype=torch.bool, device=device)
    else:
        mask = torch.zeros(4, 5, dtype=dtype, device=device)
    with pytest.raises(RuntimeError, match="^_scaled_dot_product_attention: Explicit attn_mask should not be set "
                                           "when is_causal=True"):
        posattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)


# float16 / bfloat16 run on the default kernel backend: triton on CUDA, the cpu backend on CPU
_ON_CPU_EXT = () if HAS_CUDA else requires_ext


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="float16", marks=_ON_CPU_EXT),
                                   pytest.param(torch.bfloat16, id="bfloat16", marks=_ON_CPU_EXT),
                                   pytest.param(F64, id="float64")])
def test_float32_mask_with_other_query_dtype_like_torch(dtype, device, reference_backend):
    case = c4(1, 2, 7, 63, 16, mask="LS", mask_kind="float")
    data = make_inputs(case, device)
    q, k, v = (data[n].to(dtype) for n in "qkv")
    mask32 = data["mask"].float()
    same = torch_sdpa(q, k, v, attn_mask=mask32)  # torch accepts it and returns the query's dtype
    got = posattn_sdpa(q, k, v, attn_mask=mask32)
    assert got.dtype == same.dtype == dtype
    if dtype == F64:
        # torch 2.13 on CPU accepts this pair but its result is wrong (off by O(1) from the same call
        # with the mask cast to float64); posattn adds the mask's exact values, so it is compared
        # with that mathematically equal call instead.
        assert_close64("out", got, torch_sdpa(q, k, v, attn_mask=mask32.double()))
    else:
        ref64 = torch_sdpa(data["q"], data["k"], data["v"], attn_mask=mask32.double())
        assert_close("out", got, ref64, same)


@pytest.mark.parametrize("L, S", [(0, 5), (3, 0)], ids=["L0", "S0"])
def test_empty_sequences_like_torch(L, S, device, reference_backend):
    q, k, v = _qkv((1, 2, L, 8), (1, 2, S, 8), (1, 2, S, 6), device=device)
    expected = torch_sdpa(q, k, v)
    got = posattn_sdpa(q, k, v)
    assert got.shape == expected.shape == (1, 2, L, 6)
    assert torch.equal(got, expected)


# --------------------------------------------------------------------------------------------------
# dropout
# --------------------------------------------------------------------------------------------------

P_DROP = 0.3


def _dtype(backend):
    return F64 if backend == "reference" else torch.float32


def test_dropout_same_seed_same_result(backend):
    device = backend_device(backend)
    case = c4(2, 2, 63, 63, 16, Hkv=1, gqa=True, mask="LS", mask_kind="float", mask_grad=True)
    data = make_inputs(case, device)
    dout = upstream_grad(case, data)
    runs = []
    for seed in (123, 123, 124):
        torch.manual_seed(seed)
        runs.append(forward_backward(posattn_sdpa, case, data, _dtype(backend), dout, dropout_p=P_DROP))
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), f"{name}: differs between two runs with one seed"
    assert not torch.equal(runs[0]["out"], runs[2]["out"]), "two seeds gave the same dropout"
    plain = forward_backward(posattn_sdpa, case, data, _dtype(backend), dout)
    assert not torch.allclose(runs[0]["out"], plain["out"]), "dropout_p=0.3 changed nothing"


def test_dropout_matches_dense_with_its_own_mask(backend):
    """v carries an identity block, so the output shows the dropped weights: out[..., Ev + j] =
    P_ij · keep_ij / (1 − p) (P > 0 everywhere: no −inf in the mask). With that keep-mask, the
    output and the gradients of q, k, v and of the float mask must equal dense attention with
    the same keep-mask; the mask drops a fraction p of the weights, independently per
    (batch, query head)."""
    device = backend_device(backend)
    B, H, Hkv, L, S, E, Ev = 2, 4, 2, 63, 63, 16, 8
    dtype = _dtype(backend)
    q = torch.randn(B, H, L, E, dtype=F64, device=device)
    k = torch.randn(B, Hkv, S, E, dtype=F64, device=device)
    eye = torch.eye(S, dtype=F64, device=device).expand(B, Hkv, S, S)
    v = torch.cat([torch.randn(B, Hkv, S, Ev, dtype=F64, device=device), eye], dim=-1)
    mask = torch.randn(L, S, dtype=F64, device=device)
    dout = torch.randn(B, H, L, Ev + S, dtype=F64, device=device)
    names = ("out", "dq", "dk", "dv", "dmask")

    def run(fn, dt):
        leaves = [t.clone().to(dt).requires_grad_() for t in (q, k, v, mask)]
        out = fn(*leaves)
        return dict(zip(names, [out.detach(), *torch.autograd.grad(out, leaves, dout.to(dt))]))

    torch.manual_seed(7)
    got = run(lambda q_, k_, v_, m_: posattn_sdpa(q_, k_, v_, attn_mask=m_, dropout_p=P_DROP, enable_gqa=True),
              dtype)
    keep = got["out"][..., Ev:] != 0

    def dense(q_, k_, v_, m_):
        k_, v_ = (t.repeat_interleave(H // Hkv, dim=1) for t in (k_, v_))
        p = torch.softmax(q_ @ k_.transpose(-1, -2) / math.sqrt(E) + m_, dim=-1)
        return (p * keep.to(p.dtype) / (1 - P_DROP)) @ v_

    expected = run(dense, F64)
    same = run(dense, dtype) if dtype != F64 else None
    for name in names:
        if dtype == F64:
            assert_close64(name, got[name], expected[name])
        else:
            assert_close(name, got[name], expected[name], same[name])

    n = keep.numel()
    dropped = 1.0 - keep.double().mean().item()
    se = math.sqrt(P_DROP * (1 - P_DROP) / n)
    assert abs(dropped - P_DROP) <= 6 * se, f"dropped fraction {dropped:.4f}, expected {P_DROP} ± {6 * se:.4f}"
    flat = keep.reshape(B * H, L * S)
    for i in range(B * H):
        for j in range(i):
            assert not torch.equal(flat[i], flat[j]), f"(batch, head) slices {i} and {j} share one dropout mask"


def test_dropout_mean_over_seeds(backend):
    """E[dropout output] is the output without dropout. Each element is a sum of independent
    terms P_ij·v_jd·z_ij/(1−p), z ~ Bernoulli(1−p), of variance p/(1−p)·Σ_j P_ij² v_jd²; over n
    seeds the mean's error is judged in standard errors, with a Bonferroni bound for a 1e-6
    family-wise false alarm rate. The spread across seeds must match that variance."""
    device = backend_device(backend)
    n_seeds = 200
    B, H, L, S, E = 1, 2, 7, 63, 16
    dtype = _dtype(backend)
    q, k, v = (torch.randn(B, H, n, E, dtype=F64, device=device) for n in (L, S, S))
    outs = []
    for seed in range(n_seeds):
        torch.manual_seed(1000 + seed)
        outs.append(posattn_sdpa(q.to(dtype), k.to(dtype), v.to(dtype), dropout_p=P_DROP).double())
    outs = torch.stack(outs)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(E), dim=-1)
    expected = p @ v
    var = P_DROP / (1 - P_DROP) * ((p * p) @ (v * v))
    z = (outs.mean(0) - expected) / (var / n_seeds).sqrt()
    bound = torch.special.ndtri(torch.tensor(1 - 1e-6 / (2 * z.numel()), dtype=F64)).item()
    assert z.abs().max().item() <= bound, f"max |z| = {z.abs().max().item():.2f} > {bound:.2f}"
    # sample variance / true variance: relative sd ≤ sqrt(2/(n−1)) (weighted Bernoulli sums have
    # negative excess kurtosis); 6 sd either side
    ratio = (outs.var(0).sum() / var.sum()).item()
    tol = 6 * math.sqrt(2 / (n_seeds - 1))
    assert abs(ratio - 1) <= tol, f"variance across seeds / expected variance = {ratio:.3f}, not 1 ± {tol:.2f}"
