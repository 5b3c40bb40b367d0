"""posattn: fused attention kernels with the position encoding computed inside the kernel.

No device is probed and Triton is not imported at import time.
"""
from . import reference
from .functional import attention, scaled_dot_product_attention

__version__ = "0.1.0"

__all__ = ["__version__", "attention", "reference", "scaled_dot_product_attention"]
