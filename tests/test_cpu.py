"""What is specific to the C++ CPU backend (backend="cpu", the extension posattn._C).

Its numerics are checked case by case by the kernel suites, which run on both kernel
backends (tests/test_attention.py, test_api.py, test_sdpa.py). Here: the custom ops under
``torch.library.opcheck`` and ``torch.compile``; results that do not depend on the number of
threads; the portable ISA path; dropout masks equal to the Triton kernels' bit for bit;
larger shapes and RotaryAngles against the reference; backend selection and errors,
including a missing build.
"""
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import posattn
from conftest import DEVICE, dtype_name, requires_ext
from posattn import ops
from posattn.positions import kernel_positions
from test_attention import Case, alibi, check, check_dropout_with_kernel_mask, fixed, make_inputs, manhattan, rope, \
    run, table_spec, urpe

F64 = torch.float64
TESTS = Path(__file__).resolve().parent


def qkv(B=1, H=2, Hkv=2, L=7, S=9, D=16, Dv=16, dtype=torch.float32, device="cpu"):
    return (torch.randn(B, H, L, D, dtype=dtype, device=device), torch.randn(B, Hkv, S, D, dtype=dtype, device=device),
            torch.randn(B, Hkv, S, Dv, dtype=dtype, device=device))


def angles(name, H, Hkv, L, S, r, shared=False, interleaved=False, batch=1):
    """A RotaryAngles spec whose q (and k) angles take gradients."""
    def make(device):
        t = {"q_angles": (20 * torch.rand(batch, H, L, r // 2, dtype=F64, device=device), True)}
        if not shared:
            t["k_angles"] = (20 * torch.rand(batch, Hkv, S, r // 2, dtype=F64, device=device), True)
        return t

    def build(p):
        return {"rope": posattn.RotaryAngles(p["q_angles"], p.get("k_angles"), interleaved=interleaved)}

    return name, make, build


def with_rope(spec, rope_spec):
    """``spec`` (a bias / URPE spec) together with a fixed rotary spec."""
    name, make, build = spec
    return f"{name}+rope", make, lambda p: {**build(p), "rope": rope_spec}


# ---- the custom ops ---------------------------------------------------------------------------------

@requires_ext
def test_cpu_ops_have_the_triton_schemas():
    # ops.py registers one fake implementation and one autograd formula for both backends
    for name in ("attention_fwd", "attention_bwd"):
        cpu = str(getattr(torch.ops.posattn, f"cpu_{name}").default._schema)
        triton = str(getattr(torch.ops.posattn, f"triton_{name}").default._schema)
        assert cpu.replace(f"posattn::cpu_{name}", f"posattn::triton_{name}") == triton, f"{cpu}\n!=\n{triton}"


def in_schema_order(op, values):
    return tuple(values[a.name] for a in op._schema.arguments)


def forward_values(q, k, v, *, mask=None, q_pos=0, k_pos=0, causal=False, window=(-1, -1), softcap=0.0,
                   dropout_p=0.0, seed=None, scale=0.25, rope=None, bias=None, urpe=None, deterministic=False):
    """The forward op's arguments by name, as posattn.attention builds them."""
    kp = kernel_positions(rope, bias, urpe, q, k, q_pos, k_pos)
    q_tensor = q_pos if isinstance(q_pos, torch.Tensor) else None
    k_tensor = k_pos if isinstance(k_pos, torch.Tensor) else None
    return dict(q=q, k=k, v=v, attn_mask=mask, q_pos=q_tensor, k_pos=k_tensor,
                q_offset=0 if q_tensor is not None else q_pos, k_offset=0 if k_tensor is not None else k_pos,
                causal=causal, window_left=window[0], window_right=window[1], softcap=softcap, dropout_p=dropout_p,
                seed=seed, scale=scale, rope_table=kp.rope_table, q_angles=kp.q_angles, k_angles=kp.k_angles,
                bias_tensor=kp.bias_tensor, bias_lut=kp.bias_lut, urpe_table=kp.urpe_table,
                spec_ints=ops.spec_ints(kp), rope_scale=float(kp.rope_scale), deterministic=deterministic)


def op_cases():
    """(id, make() -> forward_values kwargs): masks, positions, windows, softcap, dropout, every spec."""
    def leaf(t):
        return t.requires_grad_()

    seed = torch.tensor(1234)
    pos_q = torch.tensor([3, 1, 4, 1, 5, 9, 2])
    pos_k = torch.randperm(18, generator=torch.Generator().manual_seed(0))[:9].repeat(2, 1).int()  # (B, S) int32
    return [
        ("floatmask-qpos-window-softcap-dropout", lambda: dict(
            mask=leaf(torch.randn(1, 1, 7, 9)), q_pos=pos_q, window=(3, 1), softcap=2.0, dropout_p=0.2, seed=seed)),
        ("boolmask-kpos-causal", lambda: dict(mask=torch.rand(2, 1, 7, 9) > 0.3, k_pos=pos_k, causal=True)),
        ("angles-relbias-urpe", lambda: dict(
            rope=posattn.RotaryAngles(leaf(torch.randn(1, 2, 7, 4)), leaf(torch.randn(1, 1, 9, 4))),
            bias=posattn.RelativeBias(leaf(torch.randn(2, 9))), urpe=posattn.URPE(leaf(torch.randn(2, 5))),
            q_pos=2, causal=True)),
        ("rope-alibi-dropout", lambda: dict(
            rope=posattn.RoPE(dim=8, interleaved=True), bias=posattn.ALiBi(leaf(posattn.alibi_slopes(2))),
            dropout_p=0.3, seed=seed, mask=leaf(torch.randn(7, 1)[None, None]))),
        ("xpos-t5", lambda: dict(rope=posattn.XPos(), bias=posattn.T5Bias(leaf(torch.randn(2, 32)),
                                                                           bidirectional=False), causal=True, q_pos=2)),
        ("manhattan-deterministic", lambda: dict(bias=posattn.ManhattanDecay(leaf(-torch.rand(2)), 3),
                                                 deterministic=True, window=(4, -1))),
    ]


OP_CASES = op_cases()
GQA = dict(B=2, H=2, Hkv=1, L=7, S=9, D=16, Dv=8)


@requires_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name, make", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_opcheck_forward(name, make, dtype):
    q, k, v = (t.to(dtype).requires_grad_() for t in qkv(**GQA))
    op = torch.ops.posattn.cpu_attention_fwd.default
    torch.library.opcheck(op, in_schema_order(op, forward_values(q, k, v, **make())))


@requires_ext
@pytest.mark.parametrize("dlse", [False, True], ids=["nodlse", "dlse"])
@pytest.mark.parametrize("name, make", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_opcheck_backward(name, make, dlse):
    q, k, v = qkv(**GQA)
    values = forward_values(q, k, v, **make())
    fwd = torch.ops.posattn.cpu_attention_fwd.default
    bwd = torch.ops.posattn.cpu_attention_bwd.default
    # The backward op takes no gradient itself: every input is detached, as autograd passes them.
    values = {n: t.detach() if isinstance(t, torch.Tensor) else t for n, t in values.items()}
    out, lse = fwd(*in_schema_order(fwd, values))
    mask = values["attn_mask"]
    values.update(dout=torch.randn_like(out), out=out, lse=lse,
                  dlse=torch.randn_like(lse) if dlse else None,
                  mask_grad=mask is not None and mask.is_floating_point(),
                  angle_grad=values["q_angles"] is not None, bias_grad=values["bias_tensor"] is not None
                  and values["bias_tensor"].is_floating_point(), urpe_grad=values["urpe_table"] is not None)
    grads = bwd(*in_schema_order(bwd, values))
    assert [tuple(g.shape) for g in grads[:3]] == [tuple(q.shape), tuple(k.shape), tuple(v.shape)]
    assert all(torch.isfinite(g).all() for g in grads)
    torch.library.opcheck(bwd, in_schema_order(bwd, values))


@requires_ext
def test_torch_compile_fullgraph_rope_relative_bias():
    # RoPE + RelativeBias + float mask + window + GQA, forward and backward: one graph, no
    # break, the cpu ops inside it, results bitwise equal to eager.
    q, k, v = qkv(B=2, H=4, Hkv=2, L=130, S=130, D=64, Dv=64)
    table = torch.randn(4, 65, requires_grad=True)
    mask = torch.randn(1, 1, 130, 130, requires_grad=True)
    inputs = (*(t.requires_grad_() for t in (q, k, v)), table, mask)

    def f(q, k, v, table, mask):
        return posattn.attention(q, k, v, attn_mask=mask, window=(40, 0), q_pos=5, k_pos=5,
                                 rope=posattn.RoPE(dim=32, interleaved=True), bias=posattn.RelativeBias(table),
                                 backend="cpu")

    torch._dynamo.reset()
    explained = torch._dynamo.explain(f)(*inputs)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained
    targets = {node.target for g in explained.graphs for node in g.graph.nodes}
    assert torch.ops.posattn.cpu_attention_fwd.default in targets, targets

    torch._dynamo.reset()
    eager = f(*inputs)
    eager_grads = torch.autograd.grad(eager.sum(), inputs)
    compiled = torch.compile(f, fullgraph=True)(*inputs)
    compiled_grads = torch.autograd.grad(compiled.sum(), inputs)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    for name, a, b in zip(("dq", "dk", "dv", "dtable", "dmask"), compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


# ---- threads: results that do not depend on the thread count -----------------------------------------

@contextmanager
def num_threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


THREAD_CASES = [
    (Case(B=2, H=4, L=300, S=300, D=64, kw={"causal": True}), torch.float32),
    # table gradients (RelativeBias + URPE), a float mask broadcast over batch and heads, GQA 4:1
    (Case(B=2, H=8, Hkv=2, L=300, S=300, D=64, mask=((1, 1, 300, 300), "float-grad"), spec=urpe(41, heads=8, bias=61),
          kw={"window": (100, 20)}), torch.float32),
    (Case(B=2, H=4, Hkv=1, L=257, S=300, D=40, Dv=72, mask=((2, 1, 1, 300), "float-grad"),
          spec=table_spec("t5", posattn.T5Bias, 32, heads=4), kw={"causal": True, "q_pos": 43}), torch.bfloat16),
    # angle gradients summed over the query heads of a KV head
    (Case(B=1, H=4, Hkv=2, L=300, S=300, D=64, spec=angles("angles-gqa", 4, 2, 300, 300, 48)), torch.float32),
    (Case(B=2, H=4, Hkv=2, L=300, S=200, D=64, spec=with_rope(alibi(per_batch=True, heads=4), posattn.XPos()),
          kw={"dropout_p": 0.2, "q_pos": 100}), torch.float16),
    (Case(B=1, H=4, Hkv=4, L=300, S=300, D=32, spec=manhattan(heads=4, width=20), mask=((300, 1), "float-grad")),
     torch.float32),
]


def thread_case_id(case_dtype):
    c, dtype = case_dtype
    return f"{c.id}-{str(dtype).removeprefix('torch.')}"


def run_case(c, dtype, seed=0):
    """Forward and backward of ``c`` on the cpu backend: out, lse and every gradient."""
    torch.manual_seed(seed)
    q, k, v, mask = make_inputs(c, F64, "cpu")
    dout = torch.randn(c.B, c.H, c.L, c.Dv, dtype=F64)
    dlse = torch.randn(c.B, c.H, c.L, dtype=F64)
    spec = None if c.spec is None else (c.spec[0], c.spec[1]("cpu"), c.spec[2])
    mask_grad = c.mask is not None and c.mask[1] == "float-grad"
    torch.manual_seed(seed + 1)  # the dropout seed
    return run(q, k, v, mask, dout, dlse, "cpu", dtype, c.kw, mask_grad, spec)


@requires_ext
@pytest.mark.parametrize("case_dtype", THREAD_CASES, ids=thread_case_id)
def test_thread_count_does_not_change_results(case_dtype):
    c, dtype = case_dtype
    results = {}
    for n in (1, 2, 3):
        with num_threads(n):
            results[n] = run_case(c, dtype)
    for n in (2, 3):
        for name, one in results[1].items():
            diff = (results[n][name].double() - one.double()).abs().max().item()
            assert torch.equal(results[n][name], one), f"{name}: {n} threads differ from 1 thread by {diff:.3e}"


SUBPROCESS_CASE = (Case(B=2, H=4, Hkv=2, L=130, S=100, D=40, mask=((1, 4, 1, 100), "float-grad"),
                        spec=table_spec("rel", posattn.RelativeBias, 33, heads=4), kw={"causal": True, "q_pos": 30}),
                   torch.float32)


def _run_subprocess_case(path):
    torch.save(run_case(*SUBPROCESS_CASE), path)


@requires_ext
def test_omp_num_threads_one_in_a_fresh_process(tmp_path):
    code = ("import sys, torch\n"
            f"sys.path.insert(0, {str(TESTS)!r})\n"
            "assert torch.get_num_threads() == 1, torch.get_num_threads()\n"
            "from test_cpu import _run_subprocess_case\n"
            "_run_subprocess_case(sys.argv[1])\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    path = tmp_path / "single.pt"
    res = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    single = torch.load(path)
    with num_threads(2):
        here = run_case(*SUBPROCESS_CASE)
    assert single.keys() == here.keys()
    for name in here:
        assert torch.equal(single[name], here[name]), \
            f"{name}: OMP_NUM_THREADS=1 differs by {(single[name].double() - here[name].double()).abs().max():.3e}"


# ---- every kernel path (POSATTN_CPU_ISA=amx | avx512bf16 | avx512 | avx2 | generic) ------------------------

def _cpu_flags():
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


ALL_ISAS = ("amx", "avx512bf16", "avx512", "avx2", "generic")
# what each path needs in /proc/cpuinfo (amx also needs the kernel's permission for the tile state)
ISA_FLAGS = {"amx": {"amx_tile", "amx_bf16", "avx512_bf16", "avx512f"}, "avx512bf16": {"avx512_bf16", "avx512f"},
             "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"}, "avx2": {"avx2", "fma"}, "generic": set()}


def _runnable_isas():
    return ops.cpu_isas() if ops.cpu_available() else []


def _isa_param(isa):
    return pytest.param(isa, marks=pytest.mark.skipif(isa not in _runnable_isas(),
                                                      reason=f"this CPU (or its OS) does not run the {isa} path"))


ISAS = [_isa_param(isa) for isa in ALL_ISAS]


@requires_ext
def test_cpu_isa(monkeypatch):
    monkeypatch.setenv("POSATTN_CPU_ISA", "generic")
    assert ops.cpu_isa() == "generic"
    monkeypatch.setenv("POSATTN_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="sse9 is not an instruction set") as info:
        ops.cpu_isa()
    assert "'amx', 'avx512bf16', 'avx512', 'avx2', 'generic'" in str(info.value)
    monkeypatch.delenv("POSATTN_CPU_ISA")
    runnable = ops.cpu_isas()
    assert runnable[-1] == "generic" and set(runnable) <= set(ALL_ISAS)
    assert ops.cpu_isa() == runnable[0], "the default path is the best one the CPU runs"
    flags = _cpu_flags()
    for isa in ALL_ISAS:
        if isa != "amx":  # the OS may refuse AMX's tile state even where the CPU has it
            assert (isa in runnable) == (ISA_FLAGS[isa] <= flags), f"{isa}: runnable {runnable}, cpu flags say otherwise"
        if isa not in runnable:  # forcing a path the CPU lacks is an error that names the choices
            monkeypatch.setenv("POSATTN_CPU_ISA", isa)
            with pytest.raises(RuntimeError, match=f"does not provide {isa}"):
                ops.cpu_isa()
            monkeypatch.delenv("POSATTN_CPU_ISA")
    if "amx" not in runnable and ISA_FLAGS["amx"] <= flags:
        pytest.skip("the CPU has AMX but the OS did not grant the tile state: amx unchecked")


GENERIC_CASES = [
    (Case(B=2, H=4, Hkv=2, L=130, S=63, D=72, Dv=40, mask=((2, 1, 130, 63), "float-grad"), kw={"causal": True,
                                                                                                 "q_pos": 67}),
     torch.float32),
    (Case(L=130, S=130, D=40, spec=rope("partial32-interleaved", dim=32, interleaved=True),
          kw={"window": (30, 0), "softcap": 3.0}), torch.float32),
    (Case(B=2, H=4, Hkv=1, L=63, S=130, D=128, spec=table_spec("rel-M16", posattn.RelativeBias, 33, heads=4),
          mask=((63, 130), "bool"), kw={"q_pos": 20}), torch.float32),
    (Case(L=63, S=63, D=40, spec=urpe(21, bias=41), kw={"causal": True}), torch.bfloat16),
    (Case(H=4, Hkv=2, L=63, S=130, D=40, spec=table_spec("t5", posattn.T5Bias, 32, heads=4),
          kw={"causal": True, "q_pos": 67}), torch.float16),
    (Case(L=63, S=63, D=16, spec=fixed("xpos", rope=posattn.XPos()), kw={"causal": True}), torch.bfloat16),
    # bf16 products (amx, avx512bf16): head dims that are not whole 32-element tile rows, ragged
    # tiles, GQA, strided (B, L, H, D) views, position tensors, and every gradient of the backward
    (Case(B=2, H=4, Hkv=2, L=130, S=257, D=72, Dv=40, blhd=True, kw={"causal": True, "q_pos": 127}), torch.bfloat16),
    (Case(B=1, H=4, Hkv=2, L=63, S=100, D=200, Dv=24, spec=angles("angles-bf16", 4, 2, 63, 100, 64),
          kw={"causal": True, "q_pos": 37}), torch.bfloat16),
    (Case(B=2, H=4, Hkv=4, L=100, S=130, D=64, mask=((2, 1, 100, 130), "float-grad"), spec=urpe(21, heads=4, bias=41),
          kw={"softcap": 5.0, "window": (40, 10)}), torch.bfloat16),
]


@requires_ext
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case_dtype", GENERIC_CASES, ids=thread_case_id)
def test_other_isa_against_reference(case_dtype, isa, monkeypatch):
    monkeypatch.setenv("POSATTN_CPU_ISA", isa)
    assert ops.cpu_isa() == isa
    c, dtype = case_dtype
    check(c, dtype, "cpu", "cpu")


@requires_ext
@pytest.mark.parametrize("isa", ISAS)
def test_other_isa_dropout_same_mask(isa, monkeypatch):
    monkeypatch.setenv("POSATTN_CPU_ISA", isa)
    c = Case(B=2, H=4, Hkv=2, L=63, S=130, D=40)
    q, k, v, _ = make_inputs(c, torch.float32, "cpu")
    kw = {"dropout_p": 0.3, "causal": True, "q_pos": 67, "rope": posattn.RoPE()}
    check_dropout_with_kernel_mask(f"{isa}-dropout", q, k, v, None, kw, 17, c, "cpu", "cpu")


# ---- dropout: the Triton kernels' Philox stream ------------------------------------------------------------

@requires_ext
@pytest.mark.parametrize("seed, B, H, L, S, p", [
    (0, 1, 1, 1, 1, 0.5),
    (11, 2, 3, 63, 130, 0.3),
    (2**62 - 1, 1, 2, 130, 7, 0.9),
    (123456789012345, 2, 1, 64, 64, 0.1),
    (2**33 + 5, 1, 1, 200, 65, 0.5),
], ids=lambda x: str(x))
def test_dropout_mask_equals_triton(seed, B, H, L, S, p):
    from posattn.triton_kernels import dropout_mask

    cpu = ops.cpu_dropout_mask(seed, B, H, L, S, p)
    triton = dropout_mask(seed, B, H, L, S, p, DEVICE).cpu()
    assert cpu.dtype == torch.bool and cpu.shape == (B, H, L, S) and cpu.device.type == "cpu"
    if cpu.numel() > 100:
        assert 0 < cpu.sum() < cpu.numel(), "a trivial mask cannot tell two streams apart"
    differ = (cpu != triton).sum().item()
    assert differ == 0, f"{differ} of {cpu.numel()} keep decisions differ from the Triton kernels'"


# ---- larger shapes and RotaryAngles against the reference ---------------------------------------------------

LARGE_CASES = [
    (Case(B=2, H=8, Hkv=2, L=300, S=300, D=64, kw={"causal": True}), torch.float32),
    (Case(B=2, H=8, Hkv=2, L=300, S=300, D=64, kw={"causal": True}), torch.bfloat16),
    (Case(B=1, H=4, Hkv=4, L=257, S=1000, D=128, kw={"window": (300, 50), "q_pos": 600}), torch.float32),
    (Case(B=1, H=4, Hkv=1, L=1000, S=33, D=256, Dv=64), torch.float16),
    (Case(B=2, H=4, Hkv=2, L=300, S=300, D=64, mask=((2, 1, 300, 300), "float-grad"),
          spec=urpe(201, heads=4, bias=101), kw={"causal": True, "softcap": 20.0}), torch.float32),
    (Case(B=2, H=4, Hkv=2, L=300, S=300, D=80, spec=with_rope(table_spec("t5", posattn.T5Bias, 32, heads=4),
                                                               posattn.RoPE(theta=5e5)),
          kw={"q_pos": 500, "k_pos": 500, "causal": True}), torch.bfloat16),
    (Case(B=1, H=4, Hkv=2, L=63, S=100, D=64, spec=angles("angles-sepk-gqa", 4, 2, 63, 100, 64),
          kw={"causal": True, "q_pos": 37}), torch.float32),
    (Case(B=2, H=2, Hkv=1, L=64, S=64, D=64, spec=angles("angles-shared-r16-interleaved", 1, 1, 64, 64, 16,
                                                         shared=True, interleaved=True, batch=2),
          kw={"causal": True}), torch.float32),
    (Case(B=1, H=2, L=40, S=40, D=64, spec=angles("angles-r48-half", 2, 2, 40, 40, 48)), torch.float32),
]


@requires_ext
@pytest.mark.parametrize("case_dtype", LARGE_CASES, ids=thread_case_id)
def test_larger_shapes_and_angles(case_dtype):
    c, dtype = case_dtype
    got = check(c, dtype, "cpu", "cpu")
    for name, g in got.items():
        if name.endswith("angles"):
            assert g.abs().max() > 0, f"{name}: no gradient reached the angles"


# ---- backend selection and errors -------------------------------------------------------------------------------

@requires_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_name)
def test_backend_none_on_cpu_is_cpu(dtype, monkeypatch):
    monkeypatch.delenv("POSATTN_BACKEND", raising=False)
    q, k, v = qkv(L=63, S=63, D=40, Dv=40, dtype=dtype)
    assert posattn.functional.select_backend(None, q) == "cpu"
    assert posattn.functional.select_backend(None, q.double()) == "reference"
    expected = posattn.attention(q, k, v, causal=True, backend="cpu")
    assert torch.equal(posattn.attention(q, k, v, causal=True), expected)
    assert torch.equal(posattn.scaled_dot_product_attention(q, k, v, is_causal=True), expected)


@requires_ext
@pytest.mark.parametrize("make, exc, words", [
    (lambda: qkv(dtype=F64), TypeError, "float64 runs on backend='reference'"),
    (lambda: qkv(D=300, Dv=16), ValueError, "head dims up to 256"),
    (lambda: qkv(D=16, Dv=300), ValueError, "head dims up to 256"),
    pytest.param(lambda: qkv(device="cuda"), RuntimeError, "backend='cpu' needs CPU tensors",
                 marks=pytest.mark.requires_cuda),
], ids=["float64", "D300", "Dv300", "cuda-tensors"])
def test_errors_name_the_value(make, exc, words):
    q, k, v = make()
    with pytest.raises(exc) as info:
        posattn.attention(q, k, v, backend="cpu")
    assert words in str(info.value)


def test_missing_extension_is_an_error_at_call_time(monkeypatch):
    monkeypatch.setattr(ops, "_C_ERROR", ImportError("No module named 'posattn._C'"))
    monkeypatch.delenv("POSATTN_BACKEND", raising=False)
    q, k, v = qkv()
    for backend in ("cpu", None):  # None on CPU tensors must not fall back to the dense path silently
        with pytest.raises(RuntimeError, match=r"posattn\._C") as info:
            posattn.attention(q, k, v, backend=backend)
        assert "make install" in str(info.value)
    with pytest.raises(RuntimeError, match=r"posattn\._C"):
        ops.cpu_dropout_mask(1, 1, 1, 4, 4, 0.5)
    with pytest.raises(RuntimeError, match=r"posattn\._C"):
        ops.cpu_isa()
    # float64 runs on the reference, which needs no build
    expected = posattn.reference.attention(q.double(), k.double(), v.double())
    assert torch.equal(posattn.attention(q.double(), k.double(), v.double()), expected)


def test_import_works_without_the_extension():
    # A fresh process in which posattn._C cannot be imported, as after a failed build.
    code = ("import importlib.abc, sys, torch\n"
            "class NoExtension(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name == 'posattn._C':\n"
            "            raise ImportError('posattn._C blocked by the test')\n"
            "sys.meta_path.insert(0, NoExtension())\n"
            "import posattn\n"
            "print('available', posattn.ops.cpu_available())\n"
            "q = torch.randn(1, 1, 4, 16)\n"
            "print('reference', posattn.attention(q.double(), q.double(), q.double()).shape)\n"
            "try:\n"
            "    posattn.attention(q, q, q, backend='cpu')\n"
            "except RuntimeError as e:\n"
            "    print('ERR', e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "available False" in res.stdout, res.stdout + res.stderr
    assert "reference torch.Size([1, 1, 4, 16])" in res.stdout, res.stdout + res.stderr
    assert "ERR backend='cpu' needs the compiled extension posattn._C" in res.stdout, res.stdout + res.stderr
    assert "blocked by the test" in res.stdout, res.stdout + res.stderr



# ---- non-finite inputs on the bf16 products (the fp32 matrix is tests/test_attention.py's) ------------------

BF16_ISAS = [_isa_param(isa) for isa in ("amx", "avx512bf16", "avx512")]


def _nan_pattern_matches(q, k, v, isa, monkeypatch, **kw):
    monkeypatch.setenv("POSATTN_CPU_ISA", isa)
    out, lse = posattn.attention(q, k, v, backend="cpu", return_lse=True, **kw)
    ref, ref_lse = posattn.reference.attention(q.double(), k.double(), v.double(), return_lse=True,
                                               **{n: (t.double() if torch.is_tensor(t) and t.is_floating_point()
                                                      else t) for n, t in kw.items()})
    for name, g, r in (("out", out, ref), ("lse", lse, ref_lse)):
        assert torch.equal(torch.isnan(g), torch.isnan(r)), \
            f"{isa} {name}: NaN at {torch.isnan(g).sum().item()} entries, the reference at {torch.isnan(r).sum().item()}"
        finite = ~torch.isnan(r) & ~torch.isinf(r)
        if finite.any():
            assert (g.double()[finite] - r[finite]).abs().max() < 5e-2, f"{isa} {name}: finite entries differ"
    return out


@requires_ext
@pytest.mark.parametrize("isa", BF16_ISAS)
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nonfinite_bf16_plain_tiles(where, isa, monkeypatch):
    # plain causal attention: interior tiles take the fast path (scale folded into the exponent)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 300, 64, dtype=torch.bfloat16) for _ in range(3))
    {"q": q, "k": k, "v": v}[where][0, 1, 150, 3] = float("nan")
    out = _nan_pattern_matches(q, k, v, isa, monkeypatch, causal=True)
    assert torch.isnan(out).any(), "the NaN reached no output"


@requires_ext
@pytest.mark.parametrize("isa", BF16_ISAS)
@pytest.mark.parametrize("what", ["q-nan", "k-inf", "v-nan", "mask-inf", "table-nan", "scale-nan"])
def test_nonfinite_bf16_with_bias_and_mask(what, isa, monkeypatch):
    from test_attention import NONFINITE, _nonfinite_inputs
    x = _nonfinite_inputs("cpu")
    if what == "scale-nan":
        x["scale"] = float("nan")
    else:
        NONFINITE[what][0](x)
    bf = {n: t.to(torch.bfloat16) for n, t in x.items() if torch.is_tensor(t)}
    _nan_pattern_matches(bf["q"], bf["k"], bf["v"], isa, monkeypatch, attn_mask=bf["mask"], causal=True, q_pos=67,
                         bias=posattn.RelativeBias(bf["table"].float()), scale=x["scale"])
