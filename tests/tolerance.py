"""The one tolerance rule (docs/math.md §7, FlashAttention's):

    err(kernel, ref64) ≤ 2 · err(torch_same_dtype, ref64) + floor(dtype)

where err is the largest absolute difference, ref64 is ``posattn.reference`` in float64, and
torch_same_dtype is the same dense reference run in the kernel's dtype. The floor is relative
to the magnitude of the reference, so outputs and gradients of any scale are judged alike.
"""
import torch

FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def max_err(x, ref):
    return (x.double() - ref.double()).abs().max().item() if ref.numel() else 0.0


def assert_close(name, got, ref64, same_dtype):
    """Check one output or gradient; ``same_dtype`` is the dense reference in ``got``'s dtype."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref64.shape)}"
    assert not torch.isnan(got).any(), f"{name}: NaN in the kernel's result"
    finite = torch.isfinite(ref64)
    assert torch.equal(torch.isfinite(got), finite), f"{name}: the kernel's ±inf entries differ from the reference"
    got, ref64, same_dtype = (t.masked_fill(~finite, 0) for t in (got, ref64, same_dtype))
    err = max_err(got, ref64)
    base = max_err(same_dtype, ref64)
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    bound = 2 * base + FLOOR[got.dtype] * max(scale, 1.0)
    assert err <= bound, (f"{name}: max |kernel − ref64| = {err:.3e} > bound {bound:.3e} "
                          f"(2 × torch-{got.dtype} error {base:.3e} + floor; |ref| ≤ {scale:.3e})")
