"""Tile tables, environment knobs and lazy capability probes.

Nothing here probes a device at import time: every probe is a function called when a
kernel is about to be launched.

Environment knobs (read at call time, so tests can set them with ``monkeypatch``):

``POSATTN_BACKEND``
    Overrides the backend that ``backend=None`` selects ("triton", "cpu", "reference").
    Used to drive :func:`posattn.scaled_dot_product_attention` (which has no
    ``backend`` argument) through a particular backend.
``POSATTN_ALLOW_TF32``
    "1" lets fp32 inputs use TF32 tensor cores in the Triton kernels (faster, ~1e-3
    relative error, like ``torch.backends.cuda.matmul.allow_tf32``). Default: exact fp32.
``POSATTN_CPU_ISA``
    "generic", "avx2" or "avx512": the build of the C++ CPU kernels to run (read by the
    extension at each call; default: the best one the CPU runs).
``POSATTN_POISON_ALLOC``
    "1" fills every buffer the launchers allocate with NaN before the kernels write it,
    so a tile that is never written shows up as NaN (the tests set it).
``TRITON_INTERPRET``
    "1" runs the Triton kernels on CPU tensors through Triton's interpreter (slow; for
    tests). Must be set before ``posattn.triton_kernels`` is first imported.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

BACKENDS = ("triton", "cpu", "reference")

# The largest head dim the Triton kernels take; larger head dims use backend="reference".
MAX_HEAD_DIM = 256


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def backend_override() -> str | None:
    value = os.environ.get("POSATTN_BACKEND", "").strip()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"POSATTN_BACKEND={value!r} is not a backend; choose one of {BACKENDS}")
    return value


def allow_tf32() -> bool:
    return env_flag("POSATTN_ALLOW_TF32")


def poison_allocations() -> bool:
    return env_flag("POSATTN_POISON_ALLOC")


def triton_interpret() -> bool:
    return env_flag("TRITON_INTERPRET")


# A file-system lookup only: Triton itself is imported on first use, not here.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_FOUND


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def padded_head_dim(d: int) -> int:
    """Head dims are padded (with masked loads) to a power of two, at least 16 for tl.dot."""
    return max(16, _next_pow2(d))


# Keyed by the padded head dim (max of D and Dv). GPU tiles follow the FlashAttention-2
# Triton tutorial's choices for sm_80/sm_90: large head dims shrink the tiles to keep
# the Q/K/V/acc tiles in registers. They are revisited with the AOT register/spill report
# (issue #7).
_FWD_GPU = {16: TileConfig(128, 64, 4, 3), 32: TileConfig(128, 64, 4, 3), 64: TileConfig(128, 64, 4, 3),
            128: TileConfig(128, 64, 8, 2), 256: TileConfig(64, 32, 4, 2)}
_BWD_GPU = {16: TileConfig(64, 64, 4, 2), 32: TileConfig(64, 64, 4, 2), 64: TileConfig(64, 64, 4, 2),
            128: TileConfig(64, 64, 8, 2), 256: TileConfig(32, 32, 4, 1)}
# The interpreter costs ~2.5 ms per tile iteration whatever the tile size, so it gets
# large tiles; 64 still leaves partial tiles in the test shapes (L, S = 63, 130).
_INTERPRET = TileConfig(64, 64, 4, 1)


# Rotating each K tile on load needs more registers: at D <= 64 the 4-warp forward spilled
# (sm_90 AOT, bf16: 259 LDL/STL) and 8 warps do not (0). Measured on an H100 (bf16, causal,
# B=4 H=16 N=2048 D=64), 8 warps made the plain forward slower (0.87 vs 0.57 ms), so only
# rotary forwards use them.
_FWD_GPU_ROTARY = {16: TileConfig(128, 64, 8, 3), 32: TileConfig(128, 64, 8, 3), 64: TileConfig(128, 64, 8, 3)}


def tile_config(kind: str, head_dim: int, interpret: bool, rotary: bool = False) -> TileConfig:
    if interpret:
        return _INTERPRET
    d = padded_head_dim(head_dim)
    if kind == "fwd" and rotary and d in _FWD_GPU_ROTARY:
        return _FWD_GPU_ROTARY[d]
    table = _FWD_GPU if kind == "fwd" else _BWD_GPU
    return table[d]
