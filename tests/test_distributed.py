"""posattn.distributed: ring and Ulysses attention on spawned gloo process groups (CPU).

Every check runs inside one spawn per world size (2 and 4 ranks, one thread each): each rank
compares its shard of the output and of every gradient with the float64 reference on the
unsharded inputs (tests/tolerance.py's rule, the same-dtype reference as the base), and the
gradients of spec tables summed over the ranks with the reference's. The ranks write their
failures to a file; the tests below read them by case.
"""
import datetime
import json
import os
import pathlib
import time
import traceback

import pytest
import torch

import posattn
from conftest import requires_ext
from tolerance import assert_close, max_err

WORLDS = (2, 4)
SPAWN_TIMEOUT_S = 240
DROPOUT_SEED = 99


# --------------------------------------------------------------------------------------------------
# the case matrix: name -> dict(fn, layout, shapes, specs)
# --------------------------------------------------------------------------------------------------

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8}


def _tables(H, width):
    return {"table": ("shared", torch.randn(H, width, dtype=torch.float64) * 0.5)}


def _case(fn="ring", layout="zigzag", H=4, Hkv=2, chunk=5, s_chunk=None, n=None, D=16, Dv=None, dtype=torch.float32,
          kw=None, params=None, specs=None, backend="cpu", worlds=WORLDS):
    return dict(fn=fn, layout=layout, H=H, Hkv=Hkv, chunk=chunk, n=n, s_chunk=s_chunk or chunk, D=D, Dv=Dv or D,
                dtype=dtype, kw=kw or {}, params=params or (lambda H, W, N: {}), specs=specs or (lambda p: {}),
                backend=backend, worlds=worlds)


CASES = {
    "ring-contiguous-plain-gqa": _case(layout="contiguous"),
    "ring-zigzag-plain-LneS": _case(s_chunk=3, Dv=24),
    "ring-zigzag-causal-rope-llama3": _case(kw=dict(causal=True), specs=lambda p: dict(
        rope=posattn.RoPE(theta=500.0, scaling=LLAMA3))),
    "ring-contiguous-causal-rope-llama3": _case(layout="contiguous", kw=dict(causal=True), specs=lambda p: dict(
        rope=posattn.RoPE(theta=500.0, scaling=LLAMA3))),
    "ring-zigzag-alibi-bidirectional": _case(
        params=lambda H, W, N: {"slopes": ("shared", posattn.alibi_slopes(H, dtype=torch.float64))},
        specs=lambda p: dict(bias=posattn.ALiBi(p["slopes"]))),
    "ring-zigzag-causal-relbias": _case(kw=dict(causal=True), params=lambda H, W, N: _tables(H, 2 * 6 + 1),
                                        specs=lambda p: dict(bias=posattn.RelativeBias(p["table"]))),
    "ring-contiguous-t5-LneS": _case(layout="contiguous", s_chunk=3, params=lambda H, W, N: _tables(H, 8),
                                     specs=lambda p: dict(bias=posattn.T5Bias(p["table"], max_distance=12))),
    "ring-zigzag-causal-window": _case(kw=dict(causal=True, window=(4, -1))),
    "ring-contiguous-window-both-sides": _case(layout="contiguous", kw=dict(window=(3, 2))),
    "ring-zigzag-softcap-urpe-xpos": _case(kw=dict(causal=True, softcap=2.0),
                                           params=lambda H, W, N: {"table": ("shared", 1 + 0.3 * torch.randn(
                                               H, 2 * 4 + 1, dtype=torch.float64))},
                                           specs=lambda p: dict(urpe=posattn.URPE(p["table"]),
                                                                rope=posattn.XPos(scale_base=16.0))),
    "ring-contiguous-manhattan": _case(layout="contiguous", params=lambda H, W, N: {
        "log_gamma": ("shared", -0.1 - 0.2 * torch.rand(H, dtype=torch.float64))},
        specs=lambda p: dict(bias=posattn.ManhattanDecay(p["log_gamma"], width=3))),
    "ring-zigzag-causal-rotary-angles": _case(
        params=lambda H, W, N: {"angles": ("rows", torch.randn(1, 1, N, 8, dtype=torch.float64))},
        specs=lambda p: dict(rope=posattn.RotaryAngles(p["angles"]))),
    "ring-zigzag-causal-rope-bf16": _case(kw=dict(causal=True), dtype=torch.bfloat16, n=80, specs=lambda p: dict(
        rope=posattn.RoPE())),
    "ring-zigzag-causal-rope-dropout-triton": _case(kw=dict(causal=True, dropout_p=0.3), chunk=4, backend="triton",
                                                    specs=lambda p: dict(rope=posattn.RoPE()),
                                                    worlds=(2,)),     # the interpreter is slow: W=2 only
    "ring-zigzag-causal-dropout-rope": _case(kw=dict(causal=True, dropout_p=0.3), specs=lambda p: dict(
        rope=posattn.RoPE())),
    "ring-contiguous-dropout-alibi-LneS": _case(layout="contiguous", s_chunk=3, kw=dict(dropout_p=0.4), params=lambda
                                                H, W, N: {"slopes": ("shared", posattn.alibi_slopes(
                                                    H, dtype=torch.float64))},
                                                specs=lambda p: dict(bias=posattn.ALiBi(p["slopes"]))),
    "ulysses-zigzag-causal-rope-llama3": _case(fn="ulysses", H=8, Hkv=4, kw=dict(causal=True), specs=lambda p: dict(
        rope=posattn.RoPE(theta=500.0, scaling=LLAMA3))),
    "ulysses-contiguous-alibi-LneS": _case(fn="ulysses", layout="contiguous", H=8, Hkv=4, s_chunk=3,
                                           params=lambda H, W, N: {"slopes": ("shared", posattn.alibi_slopes(
                                               H, dtype=torch.float64))},
                                           specs=lambda p: dict(bias=posattn.ALiBi(p["slopes"]))),
    "ulysses-zigzag-relbias-window-softcap": _case(fn="ulysses", H=8, Hkv=4, kw=dict(window=(3, 5), softcap=3.0),
                                                   params=lambda H, W, N: _tables(H, 2 * 5 + 1),
                                                   specs=lambda p: dict(bias=posattn.RelativeBias(p["table"]))),
    "ulysses-zigzag-causal-t5-urpe": _case(fn="ulysses", H=8, Hkv=4, kw=dict(causal=True), params=lambda H, W, N: {
        **_tables(H, 8), "gate": ("shared", 1 + 0.3 * torch.randn(H, 7, dtype=torch.float64))},
        specs=lambda p: dict(bias=posattn.T5Bias(p["table"], bidirectional=False, max_distance=12),
                             urpe=posattn.URPE(p["gate"]))),
    "ulysses-zigzag-rotary-angles": _case(fn="ulysses", H=8, Hkv=4, params=lambda H, W, N: {
        "angles": ("rows", torch.randn(1, 8, N, 8, dtype=torch.float64)),
        "k_angles": ("rows", torch.randn(1, 1, N, 8, dtype=torch.float64))},
        specs=lambda p: dict(rope=posattn.RotaryAngles(p["angles"], p["k_angles"]))),
    "ulysses-zigzag-float64-reference": _case(fn="ulysses", H=8, Hkv=4, dtype=torch.float64, kw=dict(causal=True),
                                              backend="reference"),
}


# --------------------------------------------------------------------------------------------------
# what each rank runs
# --------------------------------------------------------------------------------------------------

def _leaf(t, dtype):
    return t.detach().to(dtype, copy=True).requires_grad_()


def _run_case(case, world):
    """The failures (strings) of one case on this rank, and the largest errors it saw."""
    from posattn import distributed as sp
    torch.manual_seed(1234)                  # the same full inputs on every rank
    B, H, Hkv, D, Dv, dtype = 2, case["H"], case["Hkv"], case["D"], case["Dv"], case["dtype"]
    chunks = world if case["layout"] == "contiguous" else 2 * world
    N, S = chunks * case["chunk"], chunks * case["s_chunk"]
    if case["n"]:                            # a fixed length, to compare world sizes on the same inputs
        N = S = case["n"]
    full = dict(q=torch.randn(B, H, N, D, dtype=torch.float64), k=torch.randn(B, Hkv, S, D, dtype=torch.float64),
                v=torch.randn(B, Hkv, S, Dv, dtype=torch.float64))
    dout = torch.randn(B, H, N, Dv, dtype=torch.float64)
    dlse = torch.randn(B, H, N, dtype=torch.float64)
    params = case["params"](H, world, N)
    p = case["kw"].get("dropout_p", 0.0)
    # dropout: the reference takes the mask that one process's kernels draw for the seed that
    # torch.manual_seed(DROPOUT_SEED) gives posattn.attention
    torch.manual_seed(DROPOUT_SEED)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    keep = {"dropout_mask": posattn.ops.cpu_dropout_mask(seed, B, H, N, S, p)} if p else {}

    def reference(dt):
        leaves = {n: _leaf(t, dt) for n, t in full.items()}
        ps = {n: _leaf(t, dt) for n, (_, t) in params.items()}
        out, lse = posattn.reference.attention(**leaves, **case["kw"], **case["specs"](ps), **keep, return_lse=True)
        torch.autograd.backward((out, lse), (dout.to(dt), dlse.to(dt)))
        return {"out": out, "lse": lse, **{f"d{n}": t.grad for n, t in {**leaves, **ps}.items()}}

    ref64, same = reference(torch.float64), reference(dtype)
    layout = case["layout"]

    def cut(t):
        return sp.shard(t, 2, layout=layout)

    leaves = {n: _leaf(cut(t), dtype) for n, t in full.items()}
    ps = {n: _leaf(cut(t) if kind == "rows" else t, dtype) for n, (kind, t) in params.items()}
    fn = sp.ring_attention if case["fn"] == "ring" else sp.ulysses_attention
    torch.manual_seed(DROPOUT_SEED)
    out, lse = fn(leaves["q"], leaves["k"], leaves["v"], layout=layout, **case["kw"], **case["specs"](ps),
                  backend=case["backend"], return_lse=True)
    torch.autograd.backward((out, lse), (cut(dout).to(dtype), cut(dlse).float() if dtype != torch.float64
                                         else cut(dlse)))
    got = {"out": out, "lse": lse, **{f"d{n}": t.grad for n, t in leaves.items()}}
    for n, (kind, _) in params.items():
        g = ps[n].grad
        if kind == "shared":        # per-rank partial sums: their sum is the single-process gradient
            g = g.clone()
            torch.distributed.all_reduce(g)
        got[f"d{n}"] = g
    fails, errs = [], {}
    for name, g in got.items():
        shared = name[1:] in params and params[name[1:]][0] == "shared"
        r64, rs = (ref64[name], same[name]) if shared else (cut(ref64[name]), cut(same[name]))
        if name == "lse":
            rs = rs.float() if dtype != torch.float64 else rs
        if g is None:
            fails.append(f"{name}: no gradient")
            continue
        errs[name] = max_err(g, r64)
        try:
            if dtype == torch.float64:      # the reference backend itself: equal up to float64 rounding
                assert errs[name] <= 1e-10 * max(1.0, r64.abs().max().item()), f"{name}: error {errs[name]:.3e}"
            else:
                assert_close(name, g.to(rs.dtype), r64, rs)
        except AssertionError as e:
            fails.append(str(e))
    return fails, errs


def _expect(exc, text, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except exc as e:
        if text not in str(e):
            return [f"{exc.__name__} raised, but {text!r} is not in its message: {e}"]
        return []
    except Exception as e:  # noqa: BLE001 - any other exception is the failure reported
        return [f"expected {exc.__name__} ({text!r}), got {type(e).__name__}: {e}"]
    return [f"expected {exc.__name__} ({text!r}), nothing raised"]


def _errors_case(world):
    from posattn import distributed as sp
    q = torch.randn(1, 2, 4, 8)
    k = torch.randn(1, 2, 4, 8)
    fails = []
    fails += _expect(ValueError, f"length {4 * world + 2} along dim 2 is not a multiple of {2 * world}", sp.shard,
                     torch.randn(1, 1, 4 * world + 2, 2))
    fails += _expect(ValueError, "layout='stripe'", sp.shard, q, layout="stripe")
    fails += _expect(ValueError, "has 3 local rows (odd)", sp.ring_attention, q[:, :, :3], k[:, :, :3], k[:, :, :3])
    fails += _expect(ValueError, "q has 2 heads and k/v 2", sp.ulysses_attention, q, k, k) if world == 4 else []
    fails += _expect(ValueError, "q has 6 heads and k/v 3", sp.ulysses_attention, torch.randn(1, 6, 4, 8),
                     torch.randn(1, 3, 4, 8), torch.randn(1, 3, 4, 8)) if world == 2 else []
    fails += _expect(NotImplementedError, "dropout_p=0.1", sp.ulysses_attention, q, k, k, dropout_p=0.1)
    fails += _expect(ValueError, "kernel backends", sp.ring_attention, q.double(), k.double(), k.double())
    fails += _expect(ValueError, "window=", sp.ring_attention, q, k, k, window=(2,))
    # shard / unshard round trip, and unshard's gradient: the sum over ranks at each shard
    x = torch.arange(2 * 4 * world, dtype=torch.float32).reshape(1, 2, 4 * world, 1)
    for layout in ("contiguous", "zigzag"):
        part = sp.shard(x, layout=layout).clone().requires_grad_()
        whole = sp.unshard(part, layout=layout)
        if not torch.equal(whole, x):
            fails.append(f"unshard(shard(x)) != x for layout={layout!r}")
        whole.backward(x)
        if not torch.equal(part.grad, world * sp.shard(x, layout=layout)):
            fails.append(f"unshard's gradient for layout={layout!r} is not the sum over ranks")
        pos = sp.shard_positions(part.shape[2], layout=layout)
        if not torch.equal(pos.float(), part.detach()[0, 0, :, 0]):
            fails.append(f"shard_positions disagrees with shard for layout={layout!r}")
    return fails


def _worker(rank, world, init_file, out_dir):
    os.environ["POSATTN_POISON_ALLOC"] = "1"
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=60))
    results = {}
    for name, case in CASES.items():
        try:
            heads_split = case["fn"] == "ulysses" and (case["H"] % world or case["Hkv"] % world)
            if world not in case["worlds"] or heads_split:
                continue
            fails, errs = _run_case(case, world)
            results[name] = {"fails": fails, "errs": errs}
        except Exception:  # noqa: BLE001 - reported as the case's failure
            results[name] = {"fails": [traceback.format_exc()], "errs": {}}
    try:
        results["errors"] = {"fails": _errors_case(world), "errs": {}}
    except Exception:  # noqa: BLE001
        results["errors"] = {"fails": [traceback.format_exc()], "errs": {}}
    pathlib.Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


def _spawn(world, tmp):
    import torch.multiprocessing as mp
    init = tmp / "init"
    ctx = mp.start_processes(_worker, args=(world, str(init), str(tmp)), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"{world} spawned ranks did not finish within {SPAWN_TIMEOUT_S} s")
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return {w: _spawn(w, tmp_path_factory.mktemp(f"world{w}")) for w in WORLDS}


def _failures(results, world, name):
    if name not in results[world][0]:
        pytest.skip(f"{name} does not run on {world} ranks (heads not divisible, or the Triton interpreter's case)")
    return [f"rank {r}: {f}" for r, res in enumerate(results[world]) for f in res[name]["fails"]]


@requires_ext
@pytest.mark.parametrize("world", WORLDS, ids=lambda w: f"W{w}")
@pytest.mark.parametrize("name", list(CASES))
def test_sharded_matches_reference(results, world, name):
    fails = _failures(results, world, name)
    assert not fails, "\n".join(fails)


@requires_ext
@pytest.mark.parametrize("world", WORLDS, ids=lambda w: f"W{w}")
def test_errors_and_shard_helpers(results, world):
    fails = _failures(results, world, "errors")
    assert not fails, "\n".join(fails)


@requires_ext
def test_bf16_error_does_not_grow_with_world_size(results):
    """The partials merge in fp32 and dK/dV travel in fp32: bf16 errors at W=4 stay near W=2's."""
    name = "ring-zigzag-causal-rope-bf16"
    errs = {w: {k: max(r[name]["errs"][k] for r in results[w]) for k in results[w][0][name]["errs"]} for w in WORLDS}
    for what in errs[2]:
        assert errs[4][what] <= 1.5 * errs[2][what] + 1e-3, (what, errs)


def test_needs_a_process_group():
    from posattn import distributed as sp
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        sp.ring_attention(q, q, q)
    with pytest.raises(RuntimeError, match="init_process_group"):
        sp.shard(q)


def test_import_posattn_does_not_import_distributed():
    import subprocess
    import sys
    code = "import sys, posattn; print('posattn.distributed' in sys.modules); import posattn.distributed"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_block_plan_covers_exactly_the_visible_chunk_pairs(causal):
    """The ring's kernel calls touch every (query chunk, key chunk) pair with a visible
    (query, key) position pair, and no other, for both layouts, windows at every edge, and
    chunks of 1 to 3 rows."""
    from posattn.distributed import _block_plan, _chunks
    for world in (1, 2, 3, 4):
        for layout in ("contiguous", "zigzag"):
            for m in (1, 2, 3):
                for window in [(-1, -1), (0, 0), (1, -1), (-1, 2), (m, 0), (m - 1, m + 1), (2 * m, 1)]:
                    for rank in range(world):
                        for src in range(world):
                            qc, kc = _chunks(layout, world, rank)[0], _chunks(layout, world, src)[0]
                            want = {(i, j) for i, a in enumerate(qc) for j, b in enumerate(kc)
                                    if any(_sees(p, s, causal, window) for p in range(a * m, a * m + m)
                                           for s in range(b * m, b * m + m))}
                            got = {(i, j) for qr, kr in _block_plan(qc, m, kc, m, causal, *window)
                                   for i in range(qr.start // m, qr.stop // m)
                                   for j in range(kr.start // m, kr.stop // m)}
                            assert got == want, (world, layout, m, window, rank, src, got, want)


def _sees(p, s, causal, window):
    left, right = window
    return (not causal or s <= p) and (left < 0 or s >= p - left) and (right < 0 or s <= p + right)
