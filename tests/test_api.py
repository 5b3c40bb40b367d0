"""posattn.attention's contract outside the kernels: errors, backend choice, op registration."""
import subprocess
import sys

import pytest
import torch

import posattn
from conftest import backend_fixtures
from posattn import ops


backend, device = backend_fixtures()


def qkv(B=1, H=2, Hkv=2, L=7, S=9, D=16, Dv=16, dtype=torch.float32, device="cpu"):
    return (torch.randn(B, H, L, D, dtype=dtype, device=device), torch.randn(B, Hkv, S, D, dtype=dtype, device=device),
            torch.randn(B, Hkv, S, Dv, dtype=dtype, device=device))


@pytest.mark.parametrize("make, kwargs, exc, words", [
    (lambda: qkv(H=3, Hkv=2), {}, ValueError, "3 heads but k/v have 2"),
    (lambda: tuple(t[0] for t in qkv()), {}, ValueError, "4-D"),
    (lambda: (qkv()[0], qkv(D=8)[1], qkv()[2]), {}, ValueError, "head dim 16 but k has 8"),
    (lambda: (qkv()[0], qkv()[1].half(), qkv()[2]), {}, TypeError, "one dtype"),
    (lambda: tuple(t.int() for t in qkv()), {}, TypeError, "dtype torch.int32"),
    (lambda: (qkv()[0], qkv(S=5)[1], qkv()[2]), {}, ValueError, "agree in heads and length"),
    (lambda: (qkv()[0], qkv(B=2)[1], qkv(B=2)[2]), {}, ValueError, "batch sizes differ"),
    (lambda: qkv(D=0, Dv=0), {}, ValueError, "empty head dim"),
    (qkv, {"window": (3,)}, ValueError, "window=(3,)"),
    (qkv, {"window": (-2, 0)}, ValueError, "-1 for unbounded"),
    (qkv, {"softcap": 0.0}, ValueError, "softcap=0.0"),
    (qkv, {"dropout_p": 1.5}, ValueError, "dropout_p=1.5"),
    (qkv, {"q_pos": torch.arange(5)}, ValueError, "q_pos has shape (5,)"),
    (qkv, {"k_pos": torch.arange(9.0)}, TypeError, "int32/int64"),
    (qkv, {"q_pos": 2**40}, ValueError, "out of range"),
    (qkv, {"q_pos": 1.5}, TypeError, "int offset"),
    (qkv, {"attn_mask": torch.ones(7, 8)}, ValueError, "does not broadcast to [B, H, L, S] = [1, 2, 7, 9]"),
    (qkv, {"attn_mask": torch.ones(7, 9, dtype=torch.int64)}, TypeError, "torch.int64"),
    (qkv, {"attn_mask": torch.ones(1, 1, 1, 7, 9)}, ValueError, "does not broadcast"),
    (qkv, {"backend": "cuda"}, ValueError, "backend='cuda' is not a backend"),
    (qkv, {"rope": object()}, TypeError, "posattn.RoPE, posattn.XPos or posattn.RotaryAngles"),
    (qkv, {"bias": object()}, TypeError, "ALiBi, RelativeBias, T5Bias or ManhattanDecay"),
    (qkv, {"urpe": object()}, TypeError, "posattn.URPE"),
    (lambda: qkv(dtype=torch.float64), {"backend": "triton"}, TypeError, "float64 runs on backend='reference'"),
    (lambda: qkv(D=320, Dv=16), {"backend": "triton"}, ValueError, "head dims up to 256"),
], ids=["heads", "ndim", "head-dim", "dtype-mix", "int-dtype", "kv-length", "batch", "empty", "window-len",
        "window-neg", "softcap", "dropout", "qpos-shape", "kpos-dtype", "qpos-range", "qpos-type", "mask-shape",
        "mask-dtype", "mask-5d", "backend-name", "rope", "bias", "urpe", "triton-fp64",
        "triton-headdim"])
def test_errors_name_the_value(make, kwargs, exc, words):
    q, k, v = make()
    with pytest.raises(exc) as info:
        posattn.attention(q, k, v, **kwargs)
    assert words in str(info.value)


def test_reference_validates_too():
    q, k, v = qkv(H=3, Hkv=2)
    with pytest.raises(ValueError, match="3 heads"):
        posattn.reference.attention(q, k, v)


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    # A fresh process without TRITON_INTERPRET: CPU tensors cannot run the Triton kernels.
    code = ("import torch, posattn\n"
            "q = torch.randn(1, 1, 4, 16)\n"
            "try:\n"
            "    posattn.attention(q, q, q, backend='triton')\n"
            "except RuntimeError as e:\n"
            "    print('ERR', e)\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "ERR backend='triton' needs CUDA tensors" in res.stdout, res.stdout + res.stderr
    assert "TRITON_INTERPRET=1" in res.stdout


def test_import_does_not_import_triton():
    code = "import sys, posattn; print('triton' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "False", res.stdout + res.stderr


def test_backend_none_and_the_override(monkeypatch):
    # None on CPU float32 picks "cpu" (tests/test_cpu.py); float64 always picks the oracle
    monkeypatch.delenv("POSATTN_BACKEND", raising=False)
    assert posattn.functional.select_backend(None, qkv(dtype=torch.float64)[0]) == "reference"
    q, k, v = qkv()
    monkeypatch.setenv("POSATTN_BACKEND", "triton")
    assert posattn.functional.select_backend(None, q) == "triton"
    monkeypatch.setenv("POSATTN_BACKEND", "reference")
    assert posattn.functional.select_backend(None, q) == "reference"
    monkeypatch.setenv("POSATTN_BACKEND", "fast")
    with pytest.raises(ValueError, match="POSATTN_BACKEND='fast'"):
        posattn.functional.select_backend(None, q)


def test_backends_agree_on_default_path(device, backend):
    q, k, v = qkv(B=2, H=4, Hkv=2, L=63, S=63, D=40, device=device)
    a = posattn.attention(q, k, v, causal=True, backend="reference")
    b = posattn.attention(q, k, v, causal=True, backend=backend)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask", [None, "float"], ids=["nomask", "floatmask"])
def test_opcheck(mask, device, backend):
    q, k, v = (t.requires_grad_() for t in qkv(L=7, S=9, Dv=8, device=device))
    m = torch.randn(1, 1, 7, 9, device=device, requires_grad=True) if mask else None
    seed = torch.tensor(1234)
    no_specs = (None, None, None, None, None, None, [0] * 8, 1.0, False)
    for args in [(q, k, v, m, None, None, 0, 0, True, -1, -1, 0.0, 0.0, None, 0.25, *no_specs),
                 (q, k, v, m, torch.arange(7, device=device), None, 2, 0, False, 3, 1, 2.0, 0.2, seed, 0.25,
                  *no_specs)]:
        torch.library.opcheck(ops.forward_op(backend), args)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_opcheck_with_position_specs(deterministic, device, backend):
    from posattn.positions import kernel_positions

    q, k, v = (t.requires_grad_() for t in qkv(L=7, S=9, Dv=8, device=device))
    angles_q = torch.randn(1, 2, 7, 4, device=device, requires_grad=True)
    angles_k = torch.randn(1, 1, 9, 4, device=device, requires_grad=True)
    table = torch.randn(2, 32, device=device, requires_grad=True)
    gate = torch.randn(2, 5, device=device, requires_grad=True)
    for rope, bias in [(posattn.RotaryAngles(angles_q, angles_k), posattn.T5Bias(table, bidirectional=False)),
                       (posattn.RoPE(dim=8, interleaved=True), posattn.ALiBi(posattn.alibi_slopes(2, device=device)
                                                                             .requires_grad_()))]:
        kp = kernel_positions(rope, bias, posattn.URPE(gate), q, k, 2, 0)
        args = (q, k, v, None, None, None, 2, 0, True, -1, -1, 0.0, 0.0, None, 0.25, kp.rope_table, kp.q_angles,
                kp.k_angles, kp.bias_tensor, kp.bias_lut, kp.urpe_table, ops.spec_ints(kp), kp.rope_scale,
                deterministic)
        torch.library.opcheck(ops.forward_op(backend), args)


def test_torch_compile_fullgraph_forward_and_backward(device, backend):
    q, k, v = (t.requires_grad_() for t in qkv(L=7, S=9, device=device))
    mask = torch.randn(7, 9, device=device, requires_grad=True)

    def f(q, k, v, mask):
        return posattn.attention(q, k, v, attn_mask=mask, causal=True, q_pos=2, backend=backend)

    eager = f(q, k, v, mask)
    eager_grads = torch.autograd.grad(eager.sum(), (q, k, v, mask))
    compiled = torch.compile(f, fullgraph=True)(q, k, v, mask)
    compiled_grads = torch.autograd.grad(compiled.sum(), (q, k, v, mask))
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_torch_compile_fullgraph_with_position_specs(device, backend):
    q, k, v = (t.requires_grad_() for t in qkv(L=7, S=9, device=device))
    table = torch.randn(2, 32, device=device, requires_grad=True)
    gate = torch.randn(2, 7, device=device, requires_grad=True)

    def f(q, k, v, table, gate):
        return posattn.attention(q, k, v, causal=True, q_pos=2, rope=posattn.RoPE(scaling=LLAMA3),
                                 bias=posattn.T5Bias(table, bidirectional=False), urpe=posattn.URPE(gate),
                                 backend=backend)

    inputs = (q, k, v, table, gate)
    eager = f(*inputs)
    eager_grads = torch.autograd.grad(eager.sum(), inputs)
    compiled = torch.compile(f, fullgraph=True)(*inputs)
    compiled_grads = torch.autograd.grad(compiled.sum(), inputs)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


def test_sdpa_float64_runs_on_reference_even_when_triton_is_forced(monkeypatch):
    monkeypatch.setenv("POSATTN_BACKEND", "triton")
    q, k, v = qkv(dtype=torch.float64)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(posattn.scaled_dot_product_attention(q, k, v, is_causal=True), expected)
