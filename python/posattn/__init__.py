"""posattn: fused attention kernels with the position encoding computed inside the kernel.

No device is probed and Triton is not imported at import time.
"""
from . import reference
from . import kernelized
from . import nn
from .functional import attention, kernelized_attention, scaled_dot_product_attention
from .positions import (URPE, ALiBi, ManhattanDecay, RelativeBias, RoPE, RotaryAngles, T5Bias, XPos, alibi_slopes,
                        carope_angles)

__version__ = "0.1.0"

__all__ = ["ALiBi", "ManhattanDecay", "RelativeBias", "RoPE", "RotaryAngles", "T5Bias", "URPE", "XPos", "__version__",
           "alibi_slopes", "attention", "carope_angles", "kernelized", "kernelized_attention", "nn", "reference",
           "scaled_dot_product_attention"]
