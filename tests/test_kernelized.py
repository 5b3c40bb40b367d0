"""posattn.kernelized_attention (FFT path) against the dense O(L·S) float64 oracle."""
import math

import pytest
import torch

import posattn
from posattn.kernelized import _ToeplitzKernelized, orthogonal_projection
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


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=pytest.mark.requires_ext)],
                         ids=["pytorch-ops", "fused-cpu"])
def test_custom_backward_gradcheck(fused):
    torch.manual_seed(1)
    phi_q = torch.rand(1, 2, 6, 3, dtype=F64, requires_grad=True)
    phi_k = torch.rand(1, 2, 5, 3, dtype=F64, requires_grad=True)
    v = torch.randn(1, 2, 5, 2, dtype=F64, requires_grad=True)
    table = torch.randn(2, 7, dtype=F64, requires_grad=True)
    for causal in (False, True):
        assert torch.autograd.gradcheck(
            lambda a, b, c, t: _ToeplitzKernelized.apply(a, b, c, t, causal, 1e-6, fused), (phi_q, phi_k, v, table))


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
    ({"backend": "triton"}, NotImplementedError, "issue #6"),
    ({"backend": "fast"}, ValueError, "backend"),
    ({"eps": -1.0}, ValueError, "eps"),
], ids=["rpe-type", "feature-map", "projection-shape", "num-features", "triton", "backend-name", "eps"])
def test_errors(kwargs, error, match):
    q, k, v, _ = inputs(1, 2, 1, 5, 5, 8, 4, 1, "cpu")
    with pytest.raises(error, match=match):
        posattn.kernelized_attention(q, k, v, **kwargs)


# ---- the CPU backend's fused kernels (posattn._C: kz_outer, kz_contract_f, kz_contract_e) ----------------

@pytest.mark.requires_ext
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_fused_cpu_kernels_match_pytorch_ops(causal, dtype):
    # the same FFT path with the outer products and contractions in PyTorch ops vs fused
    from posattn.kernelized import features, kernelized
    q, k, v, table = inputs(2, 4, 2, 70, 90, 16, 8, 25, "cpu", dtype)
    proj = orthogonal_projection(40, 16, dtype=dtype)  # 40 features: more than one chunk is not needed here
    results = []
    for fused in (False, True):
        qq, kk, vv, tt = (t.detach().requires_grad_() for t in (q, k, v, table))
        phi_q, phi_k = features(qq, kk, "prf", proj, None, False)
        z = kernelized(phi_q, phi_k, vv, posattn.RelativeBias(tt), causal, 1e-6, fused=fused)
        (z * torch.linspace(-1, 1, z.numel(), dtype=dtype).view_as(z)).sum().backward()
        results.append({"z": z.detach(), "dq": qq.grad, "dk": kk.grad, "dv": vv.grad, "dtable": tt.grad})
    assert_matches(results[1], results[0], rel=1e-12)


@pytest.mark.requires_ext
def test_fused_cpu_kernels_chunked(monkeypatch):
    # a chunk smaller than the features: every chunk's [lo, hi) slice reaches the kernels
    import posattn.kernelized as kz
    monkeypatch.setattr(kz, "_CHUNK_BYTES", 1)
    q, k, v, table = inputs(1, 2, 2, 40, 40, 8, 4, 6, "cpu")
    kw = dict(causal=True, feature_map="prf", projection=orthogonal_projection(12, 8, dtype=F64))
    assert_matches(run(q, k, v, table, "cpu", **kw), run(q, k, v, table, "reference", **kw), rel=1e-9)


@pytest.mark.requires_ext
def test_fused_cpu_kernels_opcheck():
    phi = torch.rand(2, 3, 5, 6, dtype=F64)
    w = torch.randn(2, 3, 5, 4, dtype=F64)
    outer = torch.ops.posattn.kz_outer(phi, w, 1, 4, True)
    torch.testing.assert_close(outer.unflatten(-1, (3, 5))[..., :4], phi[..., 1:4, None] * w[..., None, :])
    torch.testing.assert_close(outer.unflatten(-1, (3, 5))[..., 4], phi[..., 1:4])
    x = torch.randn(2, 3, 5, 3 * 5, dtype=F64)
    torch.testing.assert_close(torch.ops.posattn.kz_contract_f(phi, x, 1, 4),
                               (phi[..., 1:4, None] * x.unflatten(-1, (3, 5))).sum(-2))
    torch.testing.assert_close(torch.ops.posattn.kz_contract_e(x, w, 3),
                               (x.unflatten(-1, (3, 5))[..., :4] * w[..., None, :]).sum(-1) + x.unflatten(-1, (3, 5))[..., 4])
    for op, args in ((torch.ops.posattn.kz_outer.default, (phi, w, 1, 4, False)),
                     (torch.ops.posattn.kz_contract_f.default, (phi, x, 1, 4)),
                     (torch.ops.posattn.kz_contract_e.default, (x, torch.randn(2, 3, 5, 5, dtype=F64), 3))):
        torch.library.opcheck(op, args)
