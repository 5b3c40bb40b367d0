"""posattn.attention_varlen: packed variable-length batches (FlashAttention's varlen layout).

The oracle of the packed path is independent of it: the same sequences padded into a
[n, H, max L, D] batch, run through posattn.reference.attention with a key-padding bool
mask and explicit (n, max L) position tensors, and the valid rows gathered back
(docs/math.md, ByteTransformer's equivalence). The per-sequence reference backend
(``backend="reference"``) is checked against it in float64, output, lse and every gradient;
the kernel backends are then checked against that reference with tests/tolerance.py.
"""
from dataclasses import dataclass, field

import pytest
import torch

import posattn
from conftest import CPU, HAS_CUDA, backend_device, kernel_dropout_mask, requires_ext
from tolerance import assert_close

# Lengths 0, 1, 7, 63 and 130 in one pack (DESIGN §5's odd shapes, plus an empty sequence).
LENS = (0, 1, 7, 63, 130)


@dataclass
class Case:
    lq: tuple = LENS
    lk: tuple = None  # None: the query lengths
    H: int = 2
    Hkv: int = 2
    D: int = 16
    Dv: int = None
    kw: dict = field(default_factory=dict)
    # position specs: (id, make(n, H, Hkv, Tq, Tk) -> {name: (float64 tensor, takes grad)}, build(params) -> kwargs)
    spec: tuple = None
    positions: str = None  # "q", "k" or "qk": explicit position tensors (Hugging Face style, shuffled offsets)

    def __post_init__(self):
        self.lk = self.lq if self.lk is None else self.lk
        self.Dv = self.D if self.Dv is None else self.Dv

    @property
    def id(self):
        parts = ["L" + "_".join(map(str, self.lq))]
        if self.lk != self.lq:
            parts.append("S" + "_".join(map(str, self.lk)))
        parts.append(f"H{self.H}" + (f"-Hkv{self.Hkv}" if self.Hkv != self.H else "") + f"-D{self.D}"
                     + (f"-Dv{self.Dv}" if self.Dv != self.D else ""))
        for key, val in self.kw.items():
            parts.append(key if val is True else f"{key}{'_'.join(map(str, val)) if isinstance(val, tuple) else val}")
        if self.spec:
            parts.append(self.spec[0])
        if self.positions:
            parts.append(f"pos-{self.positions}")
        return "-".join(parts)


def cu_seqlens(lens, device="cpu"):
    return torch.tensor((0, *torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device=device)


def hf_positions(lens, seed):
    """Hugging Face packed ``position_ids``: each sequence counts from its own start (some from
    a RoBERTa-style offset), and one sequence's positions shuffled (positions are data, not
    row indices)."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for i, n in enumerate(lens):
        p = torch.arange(n) + (2 if i % 2 else 0)
        if i == len(lens) - 1:
            p = p[torch.randperm(n, generator=g)]
        parts.append(p)
    return torch.cat(parts).long()


def make_pack(c: Case, dtype=torch.float64, device="cpu", seed=0):
    torch.manual_seed(seed)
    Tq, Tk = sum(c.lq), sum(c.lk)
    q = torch.randn(Tq, c.H, c.D, dtype=dtype, device=device)
    k = torch.randn(Tk, c.Hkv, c.D, dtype=dtype, device=device)
    v = torch.randn(Tk, c.Hkv, c.Dv, dtype=dtype, device=device)
    kw = dict(c.kw)
    if c.positions and "q" in c.positions:
        kw["q_pos"] = hf_positions(c.lq, seed + 1).to(device)
    if c.positions and "k" in c.positions:
        kw["k_pos"] = hf_positions(c.lk, seed + 2).to(device)
    return q, k, v, cu_seqlens(c.lq, device), cu_seqlens(c.lk, device), kw


def padded_oracle(q, k, v, lq, lk, q_pos=None, k_pos=None, rope=None, bias=None, **kw):
    """The packed sequences padded into one [n, H, max L, D] batch through the dense
    reference (key-padding bool mask, explicit positions), valid rows gathered back:
    out [Tq, H, Dv], lse [H, Tq]. The default positions are built here, independently:
    keys 0 .. S_i − 1, queries S_i − L_i .. S_i − 1."""
    n, Lm, Sm = len(lq), max(lq, default=0), max(lk, default=0)
    H, Hkv, D, Dv = q.shape[1], k.shape[1], q.shape[2], v.shape[2]
    cq, ck = cu_seqlens(lq).tolist(), cu_seqlens(lk).tolist()

    def pad(x, lens, cu, rows):  # [T, h, d] -> [n, h, rows, d]
        return torch.stack([torch.cat((x[cu[i]:cu[i + 1]], x.new_zeros(rows - lens[i], *x.shape[1:])))
                            for i in range(n)]).transpose(1, 2)

    qp = torch.zeros(n, Lm, dtype=torch.long)
    kp = torch.zeros(n, Sm, dtype=torch.long)
    keys = torch.zeros(n, 1, 1, Sm, dtype=torch.bool)
    for i in range(n):
        L, S = lq[i], lk[i]
        qp[i, :L] = torch.arange(S - L, S) if q_pos is None else q_pos[cq[i]:cq[i + 1]].cpu()
        kp[i, :S] = torch.arange(S) if k_pos is None else k_pos[ck[i]:ck[i + 1]].cpu()
        keys[i, ..., :S] = True
    if isinstance(rope, posattn.RotaryAngles):
        qa = rope.q_angles[0].transpose(0, 1)
        ka = qa if rope.k_angles is None else rope.k_angles[0].transpose(0, 1)
        rope = posattn.RotaryAngles(pad(qa, lq, cq, Lm), pad(ka, lk, ck, Sm), rope.interleaved)
    dev = q.device
    out, lse = posattn.reference.attention(pad(q, lq, cq, Lm), pad(k, lk, ck, Sm), pad(v, lk, ck, Sm),
                                           attn_mask=keys.to(dev), q_pos=qp.to(dev), k_pos=kp.to(dev), rope=rope,
                                           bias=bias, return_lse=True, **kw)
    rows = [(i, j) for i in range(n) for j in range(lq[i])]
    if not rows:
        return q.new_empty(0, H, Dv), q.new_empty(H, 0)
    bi, ri = torch.tensor(rows).T
    return out[bi, :, ri], lse[bi, :, ri].T


def run_varlen(c, q, k, v, cu_q, cu_k, kw, dout, dlse, spec_params, fn, dtype=torch.float64):
    """Output, lse and every gradient of ``fn`` (attention_varlen or the padded oracle), in ``dtype``."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    params = {name: t.detach().to(dtype).requires_grad_(g) for name, (t, g) in spec_params.items()}
    if c.spec is not None:
        kw = {**kw, **c.spec[2](params)}
    out, lse = fn(q, k, v, cu_q, cu_k, kw)
    loss = (out.double() * dout).sum() + (lse.double().masked_fill(torch.isinf(lse), 0) * dlse).sum()
    loss.backward()
    grads = {"dq": q.grad, "dk": k.grad, "dv": v.grad}
    grads.update({f"d{name}": t.grad for name, t in params.items() if t.requires_grad})
    return {"out": out.detach(), "lse": lse.detach(), **grads}


def varlen_fn(backend):
    def fn(q, k, v, cu_q, cu_k, kw):
        return posattn.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, backend=backend, **kw)
    return fn


def oracle_fn(c):
    def fn(q, k, v, cu_q, cu_k, kw):
        return padded_oracle(q, k, v, c.lq, c.lk, **kw)
    return fn


def spec_params(c, device="cpu"):
    if c.spec is None:
        return {}
    return c.spec[1](len(c.lq), c.H, c.Hkv, sum(c.lq), sum(c.lk), device)


# position specs --------------------------------------------------------------------------------------

def _table(name, cls, width, **kw):
    def make(n, H, Hkv, Tq, Tk, device):
        return {"table": (torch.randn(H, width, dtype=torch.float64, device=device), True)}
    return name, make, lambda p: {"bias": cls(p["table"], **kw)}


def _alibi_rows():
    def make(n, H, Hkv, Tq, Tk, device):  # one row of slopes per sequence
        slopes = posattn.alibi_slopes(H, dtype=torch.float64, device=device)
        return {"slopes": (slopes * torch.rand(n, 1, dtype=torch.float64, device=device).add(0.5), True)}
    return "alibi-nH", make, lambda p: {"bias": posattn.ALiBi(p["slopes"])}


def _manhattan(width=5):
    def make(n, H, Hkv, Tq, Tk, device):
        return {"log_gamma": (-torch.rand(H, dtype=torch.float64, device=device) * 0.3, True)}
    return f"manhattan-w{width}", make, lambda p: {"bias": posattn.ManhattanDecay(p["log_gamma"], width)}


def _urpe(width):
    def make(n, H, Hkv, Tq, Tk, device):
        return {"gate": (torch.randn(H, width, dtype=torch.float64, device=device), True),
                "table": (torch.randn(H, width, dtype=torch.float64, device=device), True)}
    return f"urpe{width}-rel", make, lambda p: {"urpe": posattn.URPE(p["gate"]),
                                               "bias": posattn.RelativeBias(p["table"])}


def _fixed(name, **specs):
    return name, lambda *a: {}, lambda p: dict(specs)


def _angles(shared=False):
    def make(n, H, Hkv, Tq, Tk, device):
        out = {"qa": (torch.randn(1, H, Tq, 4, dtype=torch.float64, device=device), True)}
        if not shared:
            out["ka"] = (torch.randn(1, Hkv, Tk, 4, dtype=torch.float64, device=device), True)
        return out
    return ("angles-shared" if shared else "angles"), make, lambda p: {
        "rope": posattn.RotaryAngles(p["qa"], p.get("ka"))}


NTK = {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 32}

CASES = [
    Case(),
    Case(kw={"causal": True}),
    Case(lq=(3, 1, 0, 63, 130), lk=(7, 0, 5, 63, 90), kw={"causal": True}),  # L_i ≠ S_i, bottom-right
    Case(lq=(1, 1, 1, 1), lk=(9, 0, 130, 2), H=4, Hkv=1, kw={"causal": True}),  # decoding-like, GQA
    Case(H=4, Hkv=2, D=40, Dv=24, kw={"window": (5, 3), "softcap": 2.0}),
    Case(kw={"causal": True, "window": (16, -1)}, positions="qk"),
    Case(lq=(7, 0, 63), lk=(7, 5, 63), positions="q", kw={"causal": True}),
    Case(lq=(7, 0, 63), lk=(9, 5, 60), positions="qk", kw={"window": (9, 4)}),
    Case(spec=_fixed("rope-ntk", rope=posattn.RoPE(dim=8, scaling=NTK)), kw={"causal": True}),
    Case(spec=_fixed("xpos", rope=posattn.XPos()), lq=(7, 63), lk=(9, 63), kw={"causal": True}),
    Case(spec=_angles(), lq=(7, 0, 63), lk=(9, 3, 63)),
    Case(spec=_angles(shared=True), H=2, Hkv=2, lq=(7, 0, 63)),
    Case(spec=_alibi_rows(), kw={"causal": True}),
    Case(spec=_table("rel-M9", posattn.RelativeBias, 19), H=4, Hkv=2, positions="qk"),
    Case(spec=_table("t5", posattn.T5Bias, 8, bidirectional=True, max_distance=40), kw={"window": (20, 20)}),
    Case(spec=_manhattan(), lq=(7, 0, 63), lk=(7, 1, 63)),
    Case(spec=_urpe(21), kw={"causal": True}),
]


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.id)
def test_reference_matches_padded_batch(c):
    """The per-sequence reference against the padded dense batch, float64: output, lse and
    every gradient (q, k, v and each learnable spec tensor)."""
    q, k, v, cu_q, cu_k, kw = make_pack(c)
    dout = torch.randn(q.shape[0], c.H, c.Dv, dtype=torch.float64)
    dlse = torch.randn(c.H, q.shape[0], dtype=torch.float64)
    params = spec_params(c)
    got = run_varlen(c, q, k, v, cu_q, cu_k, kw, dout, dlse, params, varlen_fn("reference"))
    ref = run_varlen(c, q, k, v, cu_q, cu_k, kw, dout, dlse, params, oracle_fn(c))
    assert set(got) == set(ref)
    for name in ref:
        assert got[name] is not None, name
        torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_default_positions_are_bottom_right():
    """Sequence i's queries sit at S_i − L_i .. S_i − 1: causal, the last query of each sequence
    sees all of its keys, and the first of a 3-query / 7-key sequence sees keys 0..4."""
    q, k, v = (torch.randn(t, 1, 8, dtype=torch.float64) for t in (3, 7, 7))
    v = torch.eye(7, 8, dtype=torch.float64)[:, None]  # v_j = e_j: out row = the probabilities
    p = posattn.attention_varlen(q, k, v, cu_seqlens((3,)), cu_seqlens((7,)), causal=True, backend="reference")
    seen = (p[:, 0, :7] > 0).sum(-1).tolist()
    assert seen == [5, 6, 7]


def test_empty_pack_and_shapes():
    q = torch.randn(0, 2, 8, dtype=torch.float64)
    out, lse = posattn.attention_varlen(q, q, q, cu_seqlens(()), cu_seqlens(()), return_lse=True,
                                        backend="reference")
    assert out.shape == (0, 2, 8) and lse.shape == (2, 0)
    q = torch.randn(5, 2, 8, dtype=torch.float64)
    k = torch.randn(0, 1, 8, dtype=torch.float64)
    out, lse = posattn.attention_varlen(q, k, k, cu_seqlens((2, 3)), cu_seqlens((0, 0)), return_lse=True,
                                        backend="reference")
    assert torch.equal(out, torch.zeros(5, 2, 8, dtype=torch.float64))
    assert torch.isneginf(lse).all() and lse.shape == (2, 5)


def test_noncontiguous_views():
    """q, k, v as views with other strides (a [T, 3, H, D] qkv buffer, head-major storage)."""
    c = Case(lq=(7, 0, 63), H=2)
    torch.manual_seed(3)
    T = sum(c.lq)
    qkv = torch.randn(T, 3, c.H, c.D, dtype=torch.float64)
    q, k = qkv[:, 0], qkv[:, 1]
    v = torch.randn(c.H, T, c.D, dtype=torch.float64).transpose(0, 1)
    cu = cu_seqlens(c.lq)
    got = posattn.attention_varlen(q, k, v, cu, cu, causal=True, backend="reference")
    ref, _ = padded_oracle(q, k, v, c.lq, c.lq, causal=True)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def _bad(**over):
    q = torch.randn(10, 2, 8, dtype=torch.float64)
    k = torch.randn(12, 1, 8, dtype=torch.float64)
    args = dict(q=q, k=k, v=k.clone(), cu_seqlens_q=torch.tensor([0, 4, 10], dtype=torch.int32),
                cu_seqlens_k=torch.tensor([0, 5, 12], dtype=torch.int32), backend="reference")
    args.update(over)
    return args


@pytest.mark.parametrize("over, error, match", [
    (dict(cu_seqlens_q=torch.tensor([[0, 4, 10]], dtype=torch.int32)), ValueError, "1-D"),
    (dict(cu_seqlens_q=torch.tensor([0.0, 4.0, 10.0])), TypeError, "int32"),
    (dict(cu_seqlens_q=[0, 4, 10]), TypeError, "int32 tensor"),
    (dict(cu_seqlens_q=torch.tensor([0, 6, 4, 10], dtype=torch.int32),
          cu_seqlens_k=torch.tensor([0, 5, 6, 12], dtype=torch.int32)), ValueError, "decreases at index 2"),
    (dict(cu_seqlens_k=torch.tensor([1, 5, 12], dtype=torch.int32)), ValueError, r"cu_seqlens_k\[0\] = 1"),
    (dict(cu_seqlens_q=torch.tensor([0, 4, 9], dtype=torch.int32)), ValueError, "q has 10 rows"),
    (dict(cu_seqlens_k=torch.tensor([0, 12], dtype=torch.int32)), ValueError, "describes 2 sequences"),
    (dict(q_pos=torch.arange(9)), ValueError, r"q_pos has shape \(9,\); expected \(10,\)"),
    (dict(k_pos=torch.arange(12.0)), TypeError, "k_pos must be an int32/int64"),
    (dict(q=torch.randn(1, 10, 2, 8, dtype=torch.float64)), ValueError, r"q must be 3-D \[Tq, H, D\]"),
    (dict(v=torch.randn(11, 1, 8, dtype=torch.float64)), ValueError, "must agree in rows"),
    (dict(max_seqlen_q=5), ValueError, "max_seqlen_q=5 but the longest sequence has 6"),
    (dict(max_seqlen_k=7.0), TypeError, "max_seqlen_k"),
    (dict(attn_mask=torch.ones(10, 12, dtype=torch.bool)), TypeError, "attn_mask"),
    (dict(bias=posattn.ALiBi(torch.ones(3, 2, dtype=torch.float64))), ValueError, "slopes"),
    (dict(rope=posattn.RotaryAngles(torch.zeros(1, 2, 10, 4, dtype=torch.float64))), ValueError,
     "k_angles=None"),
    (dict(rope=posattn.RotaryAngles(torch.zeros(2, 2, 5, 4, dtype=torch.float64),
                                    torch.zeros(1, 1, 12, 4, dtype=torch.float64))), ValueError, r"\[1, heads or 1"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_argument_errors(over, error, match):
    with pytest.raises(error, match=match):
        posattn.attention_varlen(**_bad(**over))


# kernel backends -----------------------------------------------------------------------------------------

# Triton runs on CUDA, or on the CPU under the interpreter (fp32, fp16: bf16 tl.dot is broken there).
KERNELS = [pytest.param("triton", id="triton"), CPU]
HALF = [pytest.param("triton", torch.float16, id="triton-float16")] + (
    [pytest.param("triton", torch.bfloat16, id="triton-bfloat16")] if HAS_CUDA else []) + [
    pytest.param("cpu", dt, id=f"cpu-{str(dt)[6:]}", marks=requires_ext) for dt in (torch.bfloat16, torch.float16)]


def check_kernel(c: Case, backend, dtype=torch.float32, **kw_extra):
    """The kernel against the per-sequence reference in float64 (output, lse, every gradient)
    with the tolerance rule, the reference in ``dtype`` giving the rounding scale."""
    device = backend_device(backend)
    q, k, v, cu_q, cu_k, kw = make_pack(c, device=device)
    kw.update(kw_extra)
    dout = torch.randn(q.shape[0], c.H, c.Dv, dtype=torch.float64, device=device)
    dlse = torch.randn(c.H, q.shape[0], dtype=torch.float64, device=device)
    params = spec_params(c, device)
    args = (c, q, k, v, cu_q, cu_k, kw, dout, dlse, params)
    ref = run_varlen(*args, varlen_fn("reference"))
    low = run_varlen(*args, varlen_fn("reference"), dtype=dtype)
    got = run_varlen(*args, varlen_fn(backend), dtype=dtype)
    assert got["lse"].dtype == torch.float32 and got["out"].dtype == dtype
    for name in ref:
        assert_close(f"{c.id}-{name}", got[name], ref[name], low[name].to(dtype))
    return got


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("c", CASES, ids=lambda c: c.id)
def test_kernel(c, backend):
    check_kernel(c, backend)


@pytest.mark.parametrize("backend, dtype", HALF)
@pytest.mark.parametrize("c", [Case(H=4, Hkv=2, D=40, kw={"causal": True}), CASES[12]], ids=lambda c: c.id)
def test_kernel_half(c, backend, dtype):
    check_kernel(c, backend, dtype)


@pytest.mark.parametrize("backend", KERNELS)
def test_kernel_noncontiguous_views(backend):
    """Views with other strides, whose gaps hold NaN: a kernel that reads a row or channel
    outside the views fails. q, k from a [T, 3, 2H, D] qkv buffer (every other head), v
    head-major."""
    device = backend_device(backend)
    lens, H, D = (7, 0, 63, 1), 2, 16
    T = sum(lens)
    torch.manual_seed(4)
    buf = torch.full((T, 3, 2 * H, D), float("nan"), device=device)
    buf[:, :, ::2] = torch.randn(T, 3, H, D, device=device)
    q, k = buf[:, 0, ::2], buf[:, 1, ::2]
    v = torch.randn(H, T, D, device=device).transpose(0, 1)
    cu = cu_seqlens(lens, device)
    got = run_pack(q, k, v, cu, cu, backend, causal=True)
    ref = run_pack(q.double(), k.double(), v.double(), cu, cu, "reference", causal=True)
    low = run_pack(q, k, v, cu, cu, "reference", causal=True)
    for name in ref:
        assert_close(name, got[name], ref[name], low[name])


def run_pack(q, k, v, cu_q, cu_k, backend, **kw):
    q, k, v = (t.detach().clone().requires_grad_() if t.is_contiguous() else t.detach().requires_grad_()
               for t in (q, k, v))
    out, lse = posattn.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, backend=backend, **kw)
    g = torch.Generator(device="cpu").manual_seed(9)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device)
    (out.double() * dout).sum().backward()
    return {"out": out.detach(), "lse": lse.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


@pytest.mark.parametrize("backend", KERNELS)
def test_kernel_never_reads_other_sequences(backend):
    """NaN planted in every row of sequence 1 (q, k and v): the other sequences' outputs, lse
    and gradients have no NaN and are bitwise those of the clean pack (the last sequence's
    first queries see no key: lse −inf there, in both)."""
    device = backend_device(backend)
    lq, lk, H, D = (7, 63, 1, 70), (9, 63, 1, 66), 2, 16
    torch.manual_seed(5)
    q = torch.randn(sum(lq), H, D, device=device)
    k, v = (torch.randn(sum(lk), 1, D, device=device) for _ in range(2))
    cq, ck = cu_seqlens(lq, device), cu_seqlens(lk, device)
    clean = run_pack(q, k, v, cq, ck, backend, causal=True, window=(30, -1))
    q[7:70], k[9:72], v[9:72] = float("nan"), float("nan"), float("nan")
    poisoned = run_pack(q, k, v, cq, ck, backend, causal=True, window=(30, -1))
    rows_q = torch.cat((torch.arange(0, 7), torch.arange(70, sum(lq))))
    rows_k = torch.cat((torch.arange(0, 9), torch.arange(72, sum(lk))))
    for name, rows, dim in (("out", rows_q, 0), ("lse", rows_q, 1), ("dq", rows_q, 0), ("dk", rows_k, 0),
                            ("dv", rows_k, 0)):
        a, b = clean[name].index_select(dim, rows.to(device)), poisoned[name].index_select(dim, rows.to(device))
        assert not torch.isnan(b).any(), f"{name}: NaN reached another sequence"
        assert torch.equal(a, b), f"{name}: another sequence's rows changed the result"


@pytest.mark.parametrize("backend", KERNELS)
def test_kernel_deterministic_bitwise(backend):
    """deterministic=True: two runs give bitwise the same gradients, table ones included."""
    c = Case(lq=(7, 0, 63), lk=(9, 5, 63), spec=_table("rel-M9", posattn.RelativeBias, 19))
    a = check_kernel(c, backend, deterministic=True)
    b = check_kernel(c, backend, deterministic=True)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("backend", KERNELS)
def test_kernel_torch_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) traces the packed op, forward and backward, with the
    maxima given (no host read of cu_seqlens)."""
    device = backend_device(backend)
    c = Case(lq=(7, 0, 63), lk=(9, 5, 63))
    q, k, v, cu_q, cu_k, _ = make_pack(c, dtype=torch.float32, device=device)
    table = torch.randn(c.H, 9, device=device)

    def f(q, k, v, table):
        out, lse = posattn.attention_varlen(q, k, v, cu_q, cu_k, 63, 63, causal=True, return_lse=True,
                                            bias=posattn.RelativeBias(table), backend=backend)
        return out.sum() + lse.sum()

    compiled = torch.compile(f, fullgraph=True)
    ins = [t.clone().requires_grad_() for t in (q, k, v, table)]
    ins2 = [t.clone().requires_grad_() for t in (q, k, v, table)]
    compiled(*ins).backward()
    f(*ins2).backward()
    for a, b in zip(ins, ins2):
        assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("backend", KERNELS)
def test_opcheck(backend):
    """The packed op's schema, fake and autograd registration (torch.library.opcheck), with
    position tensors and a learnable table."""
    device = backend_device(backend)
    from posattn import ops
    from posattn.positions import kernel_positions

    torch.manual_seed(6)
    lq, lk = (3, 0, 5), (4, 2, 5)
    q = torch.randn(8, 2, 16, device=device, requires_grad=True)
    k, v = (torch.randn(11, 1, 16, device=device, requires_grad=True) for _ in range(2))
    cq, ck = cu_seqlens(lq, device), cu_seqlens(lk, device)
    table = torch.randn(2, 7, device=device, requires_grad=True)
    kp = kernel_positions(None, posattn.RelativeBias(table), None, q.transpose(0, 1)[None].expand(3, -1, -1, -1),
                          k.transpose(0, 1)[None].expand(3, -1, -1, -1), 0, 0)
    specs = (kp.rope_table, kp.q_angles, kp.k_angles, kp.bias_tensor, kp.bias_lut, kp.urpe_table, ops.spec_ints(kp),
             kp.rope_scale)
    for q_pos, causal in ((None, True), (torch.arange(8, device=device), False)):
        args = (q, k, v, cq, ck, q_pos, None, 0, 0, causal, -1, -1, 0.0, 0.0, None, 0.25, *specs, False)
        torch.library.opcheck(ops.varlen_forward_op(backend), args)


@pytest.mark.parametrize("backend", KERNELS)
def test_kernel_dropout_with_kernel_mask(backend):
    """Dropout in a packed batch is keyed by (sequence, head, row and key in the sequence):
    sequence i drops what posattn.attention's kernels drop for batch row i of a padded
    [n, H, max L, max S] batch, whatever the packing. Checked against the padded oracle given
    that keep-mask, output and every gradient."""
    device = backend_device(backend)
    c = Case(lq=(7, 0, 63, 30), lk=(9, 5, 63, 30), H=2, Hkv=1, kw={"causal": True, "dropout_p": 0.3},
             spec=_table("rel-M9", posattn.RelativeBias, 19))
    q, k, v, cu_q, cu_k, kw = make_pack(c, device=device)
    torch.manual_seed(11)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))  # attention_varlen's first draw after the seed
    keep = kernel_dropout_mask(backend, seed, len(c.lq), c.H, max(c.lq), max(c.lk), 0.3, device)
    assert abs(keep.float().mean().item() - 0.7) < 0.03
    dout = torch.randn(q.shape[0], c.H, c.Dv, dtype=torch.float64, device=device)
    dlse = torch.randn(c.H, q.shape[0], dtype=torch.float64, device=device)
    args = (c, q, k, v, cu_q, cu_k, kw, dout, dlse, spec_params(c, device))

    def oracle(q, k, v, cu_q, cu_k, kw):
        return padded_oracle(q, k, v, c.lq, c.lk, dropout_mask=keep, **kw)

    ref = run_varlen(*args, oracle)
    low = run_varlen(*args, oracle, dtype=torch.float32)
    torch.manual_seed(11)
    got = run_varlen(*args, varlen_fn(backend), dtype=torch.float32)
    for name in ref:
        assert_close(f"dropout-{name}", got[name], ref[name], low[name])


@pytest.mark.parametrize("backend", KERNELS)
def test_kernel_edge_packs(backend):
    """An empty pack, a pack without keys (output 0, lse −inf, zero gradients) and int64 prefix
    sums (the same result as int32)."""
    device = backend_device(backend)
    q = torch.randn(0, 2, 16, device=device, requires_grad=True)
    cu0 = torch.zeros(1, dtype=torch.int32, device=device)
    out, lse = posattn.attention_varlen(q, q, q, cu0, cu0, return_lse=True, backend=backend)
    assert out.shape == (0, 2, 16) and lse.shape == (2, 0)
    q = torch.randn(5, 2, 16, device=device, requires_grad=True)
    k = torch.randn(0, 1, 16, device=device, requires_grad=True)
    out, lse = posattn.attention_varlen(q, k, k, cu_seqlens((2, 3), device), cu_seqlens((0, 0), device),
                                        return_lse=True, backend=backend)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))
    c = Case(lq=(7, 0, 63), lk=(9, 5, 63), kw={"causal": True})
    q, k, v, cu_q, cu_k, _ = make_pack(c, dtype=torch.float32, device=device)
    a = posattn.attention_varlen(q, k, v, cu_q, cu_k, causal=True, backend=backend)
    b = posattn.attention_varlen(q, k, v, cu_q.long(), cu_k.long(), causal=True, backend=backend)
    assert torch.equal(a, b)
