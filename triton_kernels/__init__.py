"""Triton kernels of posattn, installed as ``posattn.triton_kernels``.

Importing this package imports Triton; ``posattn`` imports it lazily, on the first call
that uses ``backend="triton"``.
"""
from .attention import attn_bwd, attn_fwd, dropout_mask
from .decode import kvcache_fwd
from .kernelized import kz_contract_e, kz_contract_f, kz_outer, kz_prf, kz_prf_bwd

__all__ = ["attn_bwd", "attn_fwd", "dropout_mask", "kvcache_fwd", "kz_contract_e", "kz_contract_f", "kz_outer",
           "kz_prf", "kz_prf_bwd"]
