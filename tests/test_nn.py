"""posattn.nn.Attention: the layer against the same layer on the dense float64 reference, the KV
cache against the full sequence, the position parameters as parameters, torch.compile."""
import copy
import dataclasses

import pytest
import torch

import posattn
from conftest import requires_ext
from posattn.nn import Attention, KVCache
from tolerance import assert_close

pytestmark = requires_ext

H, HKV, E = 4, 2, 32


def spec_sets():
    g = torch.Generator().manual_seed(3)
    return {
        "rope-alibi": [posattn.RoPE(theta=500.0), posattn.ALiBi(posattn.alibi_slopes(H))],
        "xpos-relative": [posattn.XPos(), posattn.RelativeBias(torch.randn(H, 9, generator=g))],
        "t5-urpe": [posattn.T5Bias(torch.randn(H, 8, generator=g), max_distance=16),
                    posattn.URPE(1 + 0.1 * torch.randn(H, 7, generator=g))],
        "manhattan": [posattn.ManhattanDecay(-0.1 * torch.rand(H, generator=g), width=4)],
    }


def by_hand(layer, specs, **kw):
    """The layer's computation written out with posattn.reference.attention and its own weights
    (the position tensors replaced by the layer's parameters), as a module-like callable."""
    F = torch.nn.functional

    def forward(x, attn_mask=None):
        B, L, _ = x.shape
        D = layer.head_dim
        q, k, v = (F.linear(x, p.weight, p.bias).view(B, L, -1, D).transpose(1, 2)
                   for p in (layer.q_proj, layer.k_proj, layer.v_proj))
        given = {}
        for spec in specs:
            if isinstance(spec, (posattn.RoPE, posattn.XPos)):
                given["rope"] = spec
                continue
            field = {posattn.ALiBi: "slopes", posattn.ManhattanDecay: "log_gamma"}.get(type(spec), "table")
            param = getattr(layer, "position_urpe" if isinstance(spec, posattn.URPE) else f"position_{field}")
            spec = dataclasses.replace(spec, **{field: param})
            given["urpe" if isinstance(spec, posattn.URPE) else "bias"] = spec
        out = posattn.reference.attention(q, k, v, attn_mask=attn_mask, **given, **kw)
        return layer.o_proj(out.transpose(1, 2).reshape(B, L, -1))

    forward.zero_grad, forward.named_parameters = layer.zero_grad, layer.named_parameters
    return forward


def layer_twins(specs=(), **kw):
    """(layer fp32 on the kernels, the same computation by hand on the dense reference in float64
    and in float32)."""
    torch.manual_seed(0)
    layer = Attention(E, H, HKV, positions=list(specs), **kw)
    ref64, same = copy.deepcopy(layer).double(), copy.deepcopy(layer)
    attn = dict(causal=kw.get("causal", False), window=kw.get("window"), softcap=kw.get("softcap"),
                scale=kw.get("scale"))
    return layer, by_hand(ref64, specs, **attn), by_hand(same, specs, **attn)


def forward_backward(layer, x, **kw):
    layer.zero_grad()
    x = x.clone().requires_grad_()
    out = layer(x, **kw)
    g = torch.Generator().manual_seed(5)
    (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}


@pytest.mark.parametrize("name", list(spec_sets()))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_layer_matches_reference(name, causal):
    specs = spec_sets()[name]
    layer, ref64, same = layer_twins(specs, causal=causal)
    x = torch.randn(2, 13, E)
    got, got_dx, got_g = forward_backward(layer, x)
    ref, ref_dx, ref_g = forward_backward(ref64, x.double())
    s, s_dx, s_g = forward_backward(same, x)
    assert_close("out", got, ref, s)
    assert_close("dx", got_dx, ref_dx, s_dx)
    assert got_g.keys() == ref_g.keys()
    for n in ref_g:
        assert_close(f"grad {n}", got_g[n], ref_g[n], s_g[n])
    learnable = [n for n in got_g if n.startswith("position_")]
    assert len(learnable) == sum(not isinstance(s, (posattn.RoPE, posattn.XPos)) for s in specs)
    assert all(got_g[n].abs().sum() > 0 for n in learnable)


def test_window_softcap_scale_and_mask():
    layer, ref64, same = layer_twins([posattn.RoPE()], causal=True, window=(3, 0), softcap=2.0, scale=0.3)
    x = torch.randn(2, 11, E)
    mask = torch.ones(2, 1, 1, 11, dtype=torch.bool)
    mask[0, ..., :2] = False
    got, got_dx, _ = forward_backward(layer, x, attn_mask=mask)
    ref, ref_dx, _ = forward_backward(ref64, x.double(), attn_mask=mask)
    s, s_dx, _ = forward_backward(same, x, attn_mask=mask)
    assert_close("out", got, ref, s)
    assert_close("dx", got_dx, ref_dx, s_dx)


def test_kv_cache_decoding_equals_the_full_sequence():
    layer, ref64, same = layer_twins([posattn.RoPE(), posattn.ALiBi(posattn.alibi_slopes(H))], causal=True)
    x = torch.randn(2, 12, E)
    with torch.no_grad():
        ref, s = ref64(x.double()), same(x)
        cache = KVCache()
        steps = [layer(x[:, :7], cache=cache)] + [layer(x[:, i:i + 1], cache=cache) for i in range(7, 12)]
    assert len(cache) == 12 and cache.k.shape == (2, HKV, 12, E // H)
    assert_close("decoded", torch.cat(steps, dim=1), ref, s)


def test_position_tensors_are_parameters_or_buffers():
    slopes = posattn.alibi_slopes(H)
    layer = Attention(E, H, positions=posattn.ALiBi(slopes))
    assert isinstance(layer.position_slopes, torch.nn.Parameter)
    assert "position_slopes" in layer.state_dict()
    frozen = Attention(E, H, positions=posattn.ALiBi(slopes), learnable_positions=False)
    assert "position_slopes" in dict(frozen.named_buffers())
    assert not any(n.startswith("position_") for n, _ in frozen.named_parameters())


def test_bad_specs_raise():
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        Attention(E, H, 3)
    with pytest.raises(ValueError, match="two rope"):
        Attention(E, H, positions=[posattn.RoPE(), posattn.XPos()])
    with pytest.raises(ValueError, match="num_heads=4"):
        Attention(E, H, positions=posattn.ALiBi(posattn.alibi_slopes(8)))
    with pytest.raises(TypeError, match="not a posattn spec"):
        Attention(E, H, positions="rope")


def test_torch_compile_one_graph():
    layer = Attention(E, H, HKV, positions=[posattn.RoPE(), posattn.ALiBi(posattn.alibi_slopes(H))], causal=True)
    x = torch.randn(2, 9, E)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, layer(x))
    assert layer.position_slopes.grad is not None
