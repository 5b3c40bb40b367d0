"""The oracle itself, against torch's SDPA and explicit dense masks in float64."""
import pytest
import torch
import torch.nn.functional as F

import posattn


def qkv(B=2, H=4, Hkv=2, L=7, S=11, D=8, Dv=5):
    d = torch.float64
    return torch.randn(B, H, L, D, dtype=d), torch.randn(B, Hkv, S, D, dtype=d), torch.randn(B, Hkv, S, Dv, dtype=d)


def sdpa(q, k, v, mask=None, **kw):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, **kw)


def test_plain_and_gqa_equal_torch():
    q, k, v = qkv()
    torch.testing.assert_close(posattn.reference.attention(q, k, v), sdpa(q, k, v), rtol=1e-12, atol=1e-12)


def test_causal_is_top_left_and_offsets_give_bottom_right():
    q, k, v = qkv(L=7, S=11)
    torch.testing.assert_close(posattn.reference.attention(q, k, v, causal=True), sdpa(q, k, v, is_causal=True),
                               rtol=1e-12, atol=1e-12)
    bottom_right = torch.ones(7, 11, dtype=torch.bool).tril(diagonal=11 - 7)
    torch.testing.assert_close(posattn.reference.attention(q, k, v, causal=True, q_pos=11 - 7),
                               sdpa(q, k, v, bottom_right), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("window", [(2, 0), (0, 3), (2, 2), (-1, 1), (1, -1)])
def test_window_is_a_band(window):
    q, k, v = qkv(L=9, S=9)
    i = torch.arange(9)[:, None]
    j = torch.arange(9)[None, :]
    left, right = window
    band = torch.ones(9, 9, dtype=torch.bool)
    if left >= 0:
        band &= j >= i - left
    if right >= 0:
        band &= j <= i + right
    torch.testing.assert_close(posattn.reference.attention(q, k, v, window=window), sdpa(q, k, v, band),
                               rtol=1e-12, atol=1e-12)


def test_softcap_before_bias_and_float_mask():
    # s = cap·tanh(scale·q·kᵀ/cap) + bias + mask (−inf entries mask): forward and gradients
    # of q, k, v, the bias table and the mask against the formula written out densely
    q, k, v = (t.requires_grad_() for t in qkv())
    table = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    mask = torch.randn(7, 11, dtype=torch.float64).masked_fill(torch.rand(7, 11) < 0.2, float("-inf"))
    mask[:, 0] = 0.0  # every row keeps a key
    mask.requires_grad_()
    cap, dout = 1.5, torch.randn(2, 4, 7, 5, dtype=torch.float64)
    out = posattn.reference.attention(q, k, v, attn_mask=mask, softcap=cap, bias=posattn.RelativeBias(table))
    grads = torch.autograd.grad((out * dout).sum(), (q, k, v, table, mask))
    r = (torch.arange(11)[None, :] - torch.arange(7)[:, None]).clamp(-4, 4) + 4
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) / 8**0.5
    expect = torch.softmax(cap * torch.tanh(s / cap) + table[:, r] + mask, dim=-1) @ v.repeat_interleave(2, 1)
    expect_grads = torch.autograd.grad((expect * dout).sum(), (q, k, v, table, mask))
    torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-12)
    for g, e in zip(grads, expect_grads):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_lse_and_fully_masked_rows():
    q, k, v = qkv()
    mask = torch.rand(2, 1, 7, 11) > 0.4
    mask[:, :, 3] = False
    q.requires_grad_()
    out, lse = posattn.reference.attention(q, k, v, attn_mask=mask, return_lse=True)
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) / 8**0.5
    expect = torch.logsumexp(s.masked_fill(~mask, float("-inf")), dim=-1)
    torch.testing.assert_close(lse, expect, rtol=1e-12, atol=1e-12)
    assert torch.all(out[:, :, 3] == 0) and torch.all(torch.isneginf(lse[:, :, 3]))
    (out.sum() + lse.masked_fill(torch.isinf(lse), 0).sum()).backward()
    assert torch.isfinite(q.grad).all() and torch.all(q.grad[:, :, 3] == 0)


def test_gradcheck_with_lse_positions_and_mask():
    q, k, v = (t[:1, :2, :5, :4].clone().requires_grad_() for t in qkv())
    mask = torch.randn(5, 11, dtype=torch.float64)[:, :5].clone().requires_grad_()

    def f(q, k, v, mask):
        out, lse = posattn.reference.attention(q, k, v, attn_mask=mask, causal=True, q_pos=3, k_pos=1,
                                               window=(2, -1), softcap=2.0, return_lse=True)
        return out, lse.masked_fill(torch.isinf(lse), 0)

    assert torch.autograd.gradcheck(f, (q, k, v[:, :, :5].detach().requires_grad_(), mask))
