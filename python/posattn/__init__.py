"""posattn: fused attention kernels with the position encoding computed inside the kernel.

No device is probed and Triton is not imported at import time.
"""
from . import reference
from . import kernelized
from .functional import attention, attention_varlen, kernelized_attention, scaled_dot_product_attention
from .positions import (URPE, ALiBi, ManhattanDecay, RelativeBias, RoPE, RotaryAngles, T5Bias, XPos, alibi_slopes,
                        carope_angles)

__version__ = "0.1.0"

__all__ = ["ALiBi", "ManhattanDecay", "RelativeBias", "RoPE", "RotaryAngles", "T5Bias", "URPE", "XPos", "__version__",
           "alibi_slopes", "attention", "attention_varlen", "carope_angles", "kernelized", "kernelized_attention", "reference",
           "scaled_dot_product_attention"]
