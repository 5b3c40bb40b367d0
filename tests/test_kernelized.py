"""posattn.kernelized_attention (FFT path) against the dense O(L·S) float64 oracle."""
import math

import pytest
import torch

import posattn
from conftest import HAS_CUDA, HALF_DTYPES, backend_device, backend_fixtures, dtype_name, requires_ext
from posattn.kernelized import TORCH_OPS, _ToeplitzKernelized, features, kernel_ops, kernelized, orthogonal_projection
from tolerance import assert_close

F64 = torch.float64


def inputs(B, H, Hkv, L, S, D, Dv, M, device, dtype=F64):
    q = torch.randn(B, H, L, D, dtype=dtype, device=device)
    k = torch.randn(B, Hkv, S, D, dtype=dtype, device=device)
    v = torch.randn(B, Hkv, S, Dv, dtype=dtype, device=device)
    table = torch.randn(H, 2 * M + 1, dtype=dtype, device=device) * 0.5
    return q, k, v, table


def run(q, k, v, table, backend, **kw):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    rpe = None
    if table is not None:
        table = table.detach().requires_grad_()
        rpe = posattn.RelativeBias(table)
    z = posattn.kernelized_attention(q, k, v, rpe=rpe, backend=backend, **kw)
    weights = torch.linspace(-1, 1, z.numel(), dtype=F64, device=z.device).view_as(z)
    (z.double() * weights).sum().backward()
    out = {"z": z.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
    if table is not None:
        out["dtable"] = table.grad
    return out


def assert_matches(got, ref, rel=1e-9):
    for name in ref:
        scale = max(ref[name].abs().max().item(), 1e-3)
        err = (got[name] - ref[name]).abs().max().item()
        assert err <= rel * scale, f"{name}: max |fft − dense| = {err:.3e} > {rel:.0e} × {scale:.3e}"


CASES = [(1, 1, 2), (7, 7, 3), (100, 100, 200), (257, 257, 20), (33, 50, 10), (50, 33, 60)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("L, S, M", CASES, ids=[f"L{a}-S{b}-M{c}" for a, b, c in CASES])
@pytest.mark.parametrize("feature_map", ["prf", "elu"])
def test_fft_matches_dense_oracle(L, S, M, causal, feature_map, device):
    q, k, v, table = inputs(2, 4, 2, L, S, 16, 8, M, device)
    kw = dict(causal=causal, feature_map=feature_map)
    if feature_map == "prf":
        kw["projection"] = orthogonal_projection(32, 16, device=device, dtype=F64)
    got = run(q, k, v, table, None, **kw)
    ref = run(q, k, v, table, "reference", **kw)
    # FFT round-off is absolute (≈ ε·‖c‖·‖x‖), so the bound is relative to each result's scale
    assert_matches(got, ref, rel=1e-9)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_float32_within_the_tolerance_rule(causal, device):
    q, k, v, table = inputs(1, 2, 2, 130, 130, 16, 16, 40, device)
    kw = dict(causal=causal, feature_map="prf", projection=orthogonal_projection(64, 16, device=device, dtype=F64))
    ref = run(q, k, v, table, "reference", **kw)
    low = run(q.float(), k.float(), v.float(), table.float(), "reference", **kw)
    got = run(q.float(), k.float(), v.float(), table.float(), None, **kw)
    for name in ref:
        assert got[name].dtype == torch.float32
        assert_close(f"kernelized-{name}", got[name], ref[name], low[name])


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_without_rpe_is_linear_attention(causal, device):
    q, k, v, _ = inputs(2, 2, 1, 40, 40, 8, 8, 1, device)
    got = run(q, k, v, None, None, causal=causal, feature_map="elu")
    ref = run(q, k, v, None, "reference", causal=causal, feature_map="elu")
    assert_matches(got, ref, rel=1e-12)
    # explicitly: z_i = φq_i·Σ_{j visible} φk_j v_jᵀ / (φq_i·Σ_j φk_j + eps)
    fq, fk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    A = fq @ fk.transpose(-1, -2)
    if causal:
        A = A.tril()
    torch.testing.assert_close(got["z"], (A @ v) / (A.sum(-1, keepdim=True) + 1e-6), rtol=1e-12, atol=1e-12)
    # a zero table is c ≡ 1 as well
    zeros = torch.zeros(2, 9, dtype=F64, device=device)
    assert_matches(run(q, k, v, zeros, None, causal=causal, feature_map="elu"), {"z": got["z"]}, rel=1e-12)


def test_many_prf_features_approach_softmax_with_relative_bias(device):
    # E[φ(q)·φ(k)] = exp(q·k/√D) and c_r = exp(b_r): with many features the kernelized
    # output approaches softmax(q·kᵀ/√D + b) v (Monte-Carlo error ~ m^-1/2).
    torch.manual_seed(3)
    q, k, v, table = inputs(1, 2, 2, 24, 24, 8, 8, 6, device)
    q, k = q * 0.5, k * 0.5
    exact = posattn.reference.attention(q, k, v, bias=posattn.RelativeBias(table))
    errors = []
    for m in (64, 4096):
        proj = orthogonal_projection(m, 8, device=device, dtype=F64)
        z = posattn.kernelized_attention(q, k, v, rpe=posattn.RelativeBias(table), projection=proj)
        errors.append((z - exact).abs().max().item())
    print(f"max |kernelized − softmax|: m=64 {errors[0]:.3f}, m=4096 {errors[1]:.3f}")
    assert errors[1] < 0.1 and errors[1] < errors[0]


@pytest.mark.parametrize("backend", [None, pytest.param("cpu", marks=requires_ext), "triton"],
                         ids=["pytorch-ops", "fused-cpu", "fused-triton"])
def test_custom_backward_gradcheck(backend, device):
    device = backend_device(backend) if backend else device
    torch.manual_seed(1)
    phi_q = torch.rand(1, 2, 4, 2, dtype=F64, device=device, requires_grad=True)
    phi_k = torch.rand(1, 2, 3, 2, dtype=F64, device=device, requires_grad=True)
    v = torch.randn(1, 2, 3, 2, dtype=F64, device=device, requires_grad=True)
    table = torch.randn(2, 5, dtype=F64, device=device, requires_grad=True)
    ops = kernel_ops(backend)
    # eps = 0: the per-head max subtracted from the table is a constant to autograd (it cancels in
    # the ratio), which holds exactly only without eps
    for causal in (False, True):
        assert torch.autograd.gradcheck(
            lambda a, b, c, t: _ToeplitzKernelized.apply(a, b, c, t, causal, 0.0, ops), (phi_q, phi_k, v, table))


def formula(q, k, v, table, projection, causal, eps):
    """The documented definition evaluated densely in q's dtype, with no stabiliser anywhere:
    z = φ(q)ᵀΣ c φ(k) vᵀ / (φ(q)ᵀΣ c φ(k) + eps), φ(x) = exp(W·x̃ − ‖x̃‖²/2)/√m, x̃ = x·D^{-1/4}."""
    w = projection.to(q.dtype)
    D, m = q.shape[-1], w.shape[0]

    def phi(x):
        xs = x * D ** -0.25
        return torch.exp(xs @ w.T - 0.5 * (xs * xs).sum(-1, keepdim=True)) / math.sqrt(m)

    groups = q.shape[1] // k.shape[1]
    pq, pk, vv = phi(q), phi(k).repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    r = torch.arange(k.shape[2], device=q.device)[None, :] - torch.arange(q.shape[2], device=q.device)[:, None]
    C = torch.ones(r.shape, dtype=q.dtype, device=q.device)
    if table is not None:
        M = (table.shape[1] - 1) // 2
        C = torch.exp(table[:, r.clamp(-M, M) + M])  # [H, L, S]
    if causal:
        C = C * (r <= 0)
    A = C * (pq @ pk.transpose(-1, -2))
    return (A @ vv) / (A.sum(-1, keepdim=True) + eps)


EPS_CASES = [pytest.param(None, F64, c, r, id=f"pytorch-ops-f64-{c}-{r}") for c in ("causal", "full")
             for r in ("rpe", "linear")]
EPS_CASES += [pytest.param("reference", F64, "causal", "rpe", id="reference-f64-causal-rpe"),
              pytest.param("reference", F64, "full", "linear", id="reference-f64-full-linear")]
EPS_CASES += [pytest.param("cpu", dt, c, r, id=f"cpu-{dtype_name(dt)}-{c}-{r}", marks=requires_ext)
              for dt, cases in ((F64, (("causal", "rpe"), ("full", "linear"))), (torch.float32, (("causal", "rpe"),)))
              for c, r in cases]  # float32 cannot tell eps's units apart without rpe and causality (3e-6)
EPS_CASES += [pytest.param("triton", torch.float32, "causal", "rpe", id="triton-float32-causal-rpe")]


@pytest.mark.parametrize("backend, dtype, causal, rpe", EPS_CASES)
def test_eps_is_the_formulas(backend, dtype, causal, rpe, device):
    # the default eps = 1e-6 enters the denominator in the formula's own units, whatever the
    # stabilisers took out of φ and c (it used to be added to the stabilised denominator:
    # 3.9e-3 off the formula at L = 100, causal, with rpe; 6e-7 with eps = 0)
    device = backend_device(backend) if backend in ("cpu", "triton") else device
    causal, rpe = causal == "causal", rpe == "rpe"
    L = 50 if interpreted(backend) else 100
    q, k, v, table = inputs(2, 4, 2, L, L, 32, 32, 20, device)
    q, k, v, table = q * 0.5, k * 0.5, v * 0.5, table * 0.6  # inputs() scales the table by 0.5 already
    proj = orthogonal_projection(64, 32, device=device, dtype=F64)

    def exact(dt):  # the formula and its gradients (autograd) in dtype dt
        leaves = {n: t.detach().to(dt).requires_grad_() for n, t in (("q", q), ("k", k), ("v", v), ("table", table))
                  if rpe or n != "table"}
        z = formula(leaves["q"], leaves["k"], leaves["v"], leaves.get("table"), proj, causal, 1e-6)
        (z.double() * torch.linspace(-1, 1, z.numel(), dtype=F64, device=z.device).view_as(z)).sum().backward()
        return {"z": z.detach(), **{f"d{n}": t.grad for n, t in leaves.items()}}

    ref = exact(F64)
    got = run(q.to(dtype), k.to(dtype), v.to(dtype), table.to(dtype) if rpe else None, backend, causal=causal,
              feature_map="prf", projection=proj.to(dtype))
    if dtype == F64:
        assert_matches(got, ref, rel=1e-9)
    else:
        low = exact(dtype)
        for name in ref:
            assert_close(f"kernelized-eps-{name}", got[name], ref[name], low[name])


def test_default_projection_is_drawn_from_the_global_generator(device):
    q, k, v, table = inputs(1, 2, 2, 20, 20, 8, 8, 4, device)
    outs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        outs.append(posattn.kernelized_attention(q, k, v, rpe=posattn.RelativeBias(table), num_features=16))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    w = orthogonal_projection(16, 8, dtype=F64)
    block = w[:8] / w[:8].norm(dim=1, keepdim=True)
    torch.testing.assert_close(block @ block.T, torch.eye(8, dtype=F64), rtol=0, atol=1e-12)
    assert w.shape == (16, 8) and posattn.kernelized.default_num_features(64) == math.ceil(64 * math.log(64))


def test_normalize_qk_and_callable_feature_map(device):
    q, k, v, table = inputs(1, 2, 2, 30, 30, 8, 8, 5, device)
    got = run(q, k, v, table, None, feature_map=lambda x: torch.sigmoid(x) + 0.1, normalize_qk=True)
    ref = run(q, k, v, table, "reference", feature_map=lambda x: torch.sigmoid(x) + 0.1, normalize_qk=True)
    assert_matches(got, ref, rel=1e-9)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"rpe": posattn.ALiBi(torch.ones(2))}, TypeError, "RelativeBias"),
    ({"feature_map": "softmax"}, ValueError, "feature_map"),
    ({"projection": torch.randn(16, 5)}, ValueError, "projection"),
    ({"projection": torch.randn(16, 8), "num_features": 8}, ValueError, "num_features"),
    ({"backend": "triton"}, TypeError, "float64"),
    ({"backend": "fast"}, ValueError, "backend"),
    ({"eps": -1.0}, ValueError, "eps"),
], ids=["rpe-type", "feature-map", "projection-shape", "num-features", "triton", "backend-name", "eps"])
def test_errors(kwargs, error, match):
    q, k, v, _ = inputs(1, 2, 1, 5, 5, 8, 4, 1, "cpu")
    with pytest.raises(error, match=match):
        posattn.kernelized_attention(q, k, v, **kwargs)


# ---- the fused kernels of the CPU backend (posattn._C) and of Triton ------------------------------------

# the fused-kernel tests run once per backend on ``kdevice``; the others keep ``device``
backend, kdevice = backend_fixtures("kdevice")


def interpreted(backend):
    """Triton's interpreter runs every program of a grid in turn: tests take smaller shapes there."""
    return backend == "triton" and not HAS_CUDA


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_fused_kernels_match_pytorch_ops(backend, kdevice, causal, dtype):
    # the same FFT path with the outer products and contractions in PyTorch ops vs fused
    B, H, L, S, m = (1, 2, 37, 45, 12) if interpreted(backend) else (2, 4, 70, 90, 40)
    q, k, v, table = inputs(B, H, H // 2, L, S, 16, 8, 25, kdevice, dtype)
    proj = orthogonal_projection(m, 16, device=kdevice, dtype=dtype)
    results = []
    for be in (None, backend):
        qq, kk, vv, tt = (t.detach().requires_grad_() for t in (q, k, v, table))
        phi_q, phi_k, log_scale = features(qq, kk, "prf", proj, None, False)
        z = kernelized(phi_q, phi_k, vv, posattn.RelativeBias(tt), causal, 1e-6, be, log_scale)
        (z * torch.linspace(-1, 1, z.numel(), dtype=dtype, device=kdevice).view_as(z)).sum().backward()
        results.append({"z": z.detach(), "dq": qq.grad, "dk": kk.grad, "dv": vv.grad, "dtable": tt.grad})
    assert_matches(results[1], results[0], rel=1e-12 if dtype == F64 else 1e-5)


@pytest.mark.parametrize("chunk_bytes, pieces", [(1, "one (batch, head) and one feature"),
                                                 (4 * 3 * 65 * 16 * 5, "three features of every slice")])
def test_fused_kernels_chunked(backend, kdevice, monkeypatch, chunk_bytes, pieces):
    # chunks smaller than the problem: every piece's heads and [lo, hi) features reach the kernels
    import posattn.kernelized as kz
    monkeypatch.setattr(kz, "_CHUNK_BYTES", chunk_bytes)
    B, H, L, S = 2, 2, 40, 60
    N = kz._fft_size(L, S)
    chunks = list(kz._chunks(B * H, 12, 5, N))
    if chunk_bytes == 1:
        assert len(chunks) == B * H * 12 and all(c[0].stop - c[0].start == 1 and c[2] - c[1] == 1 for c in chunks)
    else:
        assert N == 128 and len(chunks) == 4 and all(c[0] == slice(0, B * H) and c[2] - c[1] == 3 for c in chunks)
    q, k, v, table = inputs(B, H, 1, L, S, 8, 4, 6, kdevice)
    q, k, v, table = (t.float() for t in (q, k, v, table))
    kw = dict(causal=True, feature_map="prf", projection=orthogonal_projection(12, 8, device=kdevice))
    monkeypatch.setattr(kz, "_CHUNK_BYTES", 64 * 2**20)
    whole = run(q, k, v, table, backend, **kw)
    monkeypatch.setattr(kz, "_CHUNK_BYTES", chunk_bytes)
    assert_matches(run(q, k, v, table, backend, **kw), whole, rel=1e-6)


# tl.dot on bf16 is broken in Triton's interpreter (triton #11584): Triton runs fp32 and fp16 here
HALF = {b: [torch.float32, *dtypes] for b, dtypes in HALF_DTYPES.items()}


PRF_CASES = [(torch.float32, 40), (torch.bfloat16, 40), (torch.float16, 40), (torch.float32, 100),
             (torch.float32, 200)]


@pytest.mark.parametrize("dtype, D", PRF_CASES, ids=[f"{dtype_name(dt)}-D{d}" for dt, d in PRF_CASES])
@pytest.mark.parametrize("is_query", [True, False], ids=["query", "key"])
def test_fused_prf_feature_map(backend, kdevice, dtype, D, is_query):
    # φ and dx of the fused map against feature_map's PyTorch ops in float64; m = 70 and D leave
    # partial blocks (D = 40, 100, 200: each head-dim tile class), x is a transposed view
    if dtype not in HALF[backend]:
        pytest.skip(f"tl.dot on {dtype} is broken in Triton's interpreter (triton #11584)")
    from posattn.kernelized import _FusedPRF, feature_map
    x = torch.randn(2, 37, 3, D, device=kdevice).to(dtype).transpose(1, 2).requires_grad_()
    w = orthogonal_projection(70, D, device=kdevice)
    phi = _FusedPRF.apply(x, w, is_query, kernel_ops(backend))
    assert phi.dtype == torch.float32 and phi.shape == (2, 3, 37, 70)
    dphi = torch.randn_like(phi)
    dx, = torch.autograd.grad(phi, x, dphi)
    x64 = x.detach().double().requires_grad_()
    ref = feature_map(x64, "prf", w.double(), is_query)
    dref, = torch.autograd.grad(ref, x64, dphi.double())
    xl = x.detach().requires_grad_()
    low = feature_map(xl, "prf", w, is_query)  # the same map in x's dtype: the tolerance's baseline
    dlow, = torch.autograd.grad(low, xl, dphi.to(low.dtype))
    assert_close("phi", phi, ref, low.float())
    assert dx.dtype == dtype
    assert_close("dx", dx, dref, dlow)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fused_backends_against_dense_oracle(backend, kdevice, causal):
    # the whole op, fused feature map included: GQA, L ≠ S, odd sizes, a transposed q, fp32
    # and a half dtype, against the float64 oracle with the shared tolerance rule
    B, H = (1, 2) if interpreted(backend) else (2, 4)
    q, k, v, table = inputs(B, H, H // 2, 63, 50, 40, 24, 20, kdevice)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, L, H, D] memory
    proj = orthogonal_projection(48, 40, device=kdevice, dtype=F64)
    kw = dict(causal=causal, feature_map="prf", projection=proj)
    ref = run(q, k, v, table, "reference", **kw)
    # a half dtype only on the CPU backend: the dense fp16 reference (the tolerance's baseline)
    # overflows to NaN in these gradients; the fp16 feature map has its own test above
    for dtype in HALF[backend][:2] if backend == "cpu" else [torch.float32]:
        args = [t.to(dtype) for t in (q, k, v, table)]
        low = run(*args, "reference", **kw)
        got = run(*args, backend, **kw)
        for name in ref:
            assert got[name].dtype == dtype
            assert_close(f"kernelized-{backend}-{dtype}-{name}", got[name], ref[name], low[name])


def test_fused_kernels_explicit_formulas_and_opcheck(backend, kdevice):
    ops = kernel_ops(backend)
    phi = torch.rand(2, 3, 5, 6, dtype=F64, device=kdevice)
    w = torch.randn(2, 3, 5, 4, dtype=F64, device=kdevice)
    outer = ops.outer(phi, w, 1, 4, True, 9)  # [B, H, F·E1, n_pad]: one zero-padded sequence per column
    assert outer.shape == (2, 3, 15, 9) and not outer[..., 5:].any()
    cols = outer[..., :5].transpose(-1, -2).unflatten(-1, (3, 5))  # [B, H, N, F, E1]
    torch.testing.assert_close(cols[..., :4], phi[..., 1:4, None] * w[..., None, :])
    torch.testing.assert_close(cols[..., 4], phi[..., 1:4])
    torch.testing.assert_close(outer, TORCH_OPS.outer(phi, w, 1, 4, True, 9))
    # x as the inverse FFT returns it, sliced to the rows: [B, H, F·E1, ≥ N] with a longer row stride
    x = torch.randn(2, 3, 3 * 5, 8, dtype=F64, device=kdevice)[..., :5]
    rows = x.transpose(-1, -2).unflatten(-1, (3, 5))  # [B, H, N, F, E1]
    torch.testing.assert_close(ops.contract_f(phi, x, 1, 4), (phi[..., 1:4, None] * rows).sum(-2))
    torch.testing.assert_close(ops.contract_f(phi, x, 1, 4), TORCH_OPS.contract_f(phi, x, 1, 4))
    torch.testing.assert_close(ops.contract_e(x, w, 3), (rows[..., :4] * w[..., None, :]).sum(-1) + rows[..., 4])
    torch.testing.assert_close(ops.contract_e(x, w, 3), TORCH_OPS.contract_e(x, w, 3))
    w5 = torch.randn(2, 3, 5, 5, dtype=F64, device=kdevice)
    torch.testing.assert_close(ops.contract_e(x, w5, 3), (rows * w5[..., None, :]).sum(-1))
    xq = torch.randn(2, 3, 5, 16, device=kdevice)
    proj = torch.randn(20, 16, device=kdevice)
    ph = ops.prf(xq, proj, False)
    for op, args in ((ops.outer, (phi, w, 1, 4, False, 7)), (ops.contract_f, (phi, x, 1, 4)),
                     (ops.contract_e, (x, w5, 3)), (ops.prf, (xq, proj, True)),
                     (ops.prf_bwd, (torch.randn_like(ph), ph, xq, proj))):
        torch.library.opcheck(op, args)


def test_fused_kernels_reject_bad_operands(backend, kdevice):
    ops = kernel_ops(backend)
    phi = torch.rand(1, 2, 5, 6, dtype=F64, device=kdevice)
    with pytest.raises((ValueError, RuntimeError), match="outside"):
        ops.outer(phi, phi, 4, 7, True, 5)
    with pytest.raises((ValueError, RuntimeError), match="n_pad"):
        ops.outer(phi, phi, 1, 2, True, 4)
    with pytest.raises((ValueError, RuntimeError), match=r"F·E1, ≥ N"):
        ops.contract_f(phi, torch.rand(1, 2, 6, 4, dtype=F64, device=kdevice), 0, 3)
    with pytest.raises((ValueError, RuntimeError), match=r"\[m, 8\]|projection"):
        ops.prf(torch.randn(1, 2, 5, 8, device=kdevice), torch.randn(4, 6, device=kdevice), True)


def test_torch_compile_fullgraph_forward_and_backward(backend, kdevice):
    # the fused pieces are custom ops with fakes and the Toeplitz backward calls no autograd:
    # the whole op, table gradient included, traces without a graph break; Inductor fuses the
    # PyTorch ops around the FFTs, so results equal eager's up to fp32 rounding
    q, k, v, table = (t.float() for t in inputs(1, 2, 2, 9, 11, 16, 8, 4, kdevice))
    proj = orthogonal_projection(16, 16, device=kdevice)
    q, k, v, table = (t.requires_grad_() for t in (q, k, v, table))

    def f(q, k, v, table):
        return posattn.kernelized_attention(q, k, v, rpe=posattn.RelativeBias(table), causal=True, projection=proj,
                                            backend=backend)

    eager = f(q, k, v, table)
    eager_grads = torch.autograd.grad(eager.sum(), (q, k, v, table))
    compiled = torch.compile(f, fullgraph=True)(q, k, v, table)
    compiled_grads = torch.autograd.grad(compiled.sum(), (q, k, v, table))
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)
