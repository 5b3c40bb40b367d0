"""posattn: fused attention kernels with the position encoding computed inside the kernel.

No device is probed and Triton is not imported at import time.
"""
from . import reference
from . import kernelized
from . import nn
from .decode import attention_with_kvcache
from .functional import attention, attention_varlen, kernelized_attention, scaled_dot_product_attention
from .positions import (URPE, ALiBi, ManhattanDecay, RelativeBias, RoPE, RotaryAngles, T5Bias, XPos, alibi_slopes,
                        carope_angles)

__version__ = "0.1.0"


def __getattr__(name):
    # posattn.distributed is imported on first use: `import posattn` stays free of it.
    if name == "distributed":
        import importlib
        return importlib.import_module(".distributed", __name__)
    raise AttributeError(f"module 'posattn' has no attribute {name!r}")


__all__ = ["ALiBi", "ManhattanDecay", "RelativeBias", "RoPE", "RotaryAngles", "T5Bias", "URPE", "XPos",
           "__version__", "alibi_slopes", "attention", "attention_varlen", "attention_with_kvcache", "carope_angles",
           "distributed", "kernelized", "kernelized_attention", "nn", "reference", "scaled_dot_product_attention"]
