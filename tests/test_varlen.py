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


def run_varlen(c, q, k, v, cu_q, cu_k, kw, dout, dlse, spec_params, fn):
    """Output, lse and every gradient of ``fn`` (attention_varlen or the padded oracle)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    params = {name: t.detach().clone().requires_grad_(g) for name, (t, g) in spec_params.items()}
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


def test_kernel_backends_not_built_yet():
    """Until the packed kernels exist, asking for them raises; nothing falls back silently."""
    args = _bad(q=torch.randn(10, 2, 8), k=torch.randn(12, 1, 8), v=torch.randn(12, 1, 8), backend=None)
    with pytest.raises(NotImplementedError, match="backend='reference'"):
        posattn.attention_varlen(**args)
