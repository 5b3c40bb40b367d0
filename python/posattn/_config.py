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
    "amx", "avx512bf16", "avx512", "avx2" or "generic": the path of the C++ CPU kernels to
    run (read by the extension at each call; default: the best one the CPU runs, see
    :func:`posattn.ops.cpu_isas`). Naming a path the CPU lacks is an error.
``POSATTN_POISON_ALLOC``
    "1" fills every buffer the launchers allocate with NaN before the kernels write it,
    so a tile that is never written shows up as NaN (the tests set it).
``POSATTN_AUTOTUNE``
    "0" gives every Triton kernel one fixed tile config per kernel and head dim, whatever the GPU
    (capability), dtype and flags: reproducible CI runs and benchmarks. Default: the tile
    tables per capability (sm_80, sm_90), keyed by kernel, head dim, dtype and flags, and for
    the plain kernels (no position spec) a timed choice among a few candidate tiles, once
    per process and key (see :func:`tile_candidates`, ``triton_kernels/_autotune.py``).
``POSATTN_MASK_ALL_TILES``
    "1" runs the interior tiles of the Triton kernels (every pair in bounds and visible)
    through the masked path of the boundary tiles too. For tests and debugging: both paths
    must give bitwise the same results.
``POSATTN_TMA``
    "1" loads the interior tiles' operands of the Triton attention kernels through TMA
    tensor descriptors (Hopper's bulk tensor copies), "0" through pointers (async copies).
    Default: TMA on sm_90 and newer GPUs when the installed Triton has host-side tensor
    descriptors, pointers elsewhere and in the interpreter (where "1" tests the descriptor
    path). Either way only inputs whose layout a descriptor can describe use one (see
    :func:`posattn.triton_kernels.attention.tma_operands`).
``TRITON_INTERPRET``
    "1" runs the Triton kernels on CPU tensors through Triton's interpreter (slow; for
    tests). Must be set before ``posattn.triton_kernels`` is first imported.
"""
from __future__ import annotations

import functools
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


def mask_all_tiles() -> bool:
    return env_flag("POSATTN_MASK_ALL_TILES")


def hopper_class(capability) -> bool:
    """sm_90 and newer (wgmma, TMA): the sm_90 tile tables and TMA; below, the sm_80 ones."""
    return tuple(capability) >= (9, 0)


def tma(capability, interpret: bool) -> bool:
    """Whether the Triton attention kernels load interior tiles through TMA descriptors
    (``POSATTN_TMA``; default: on sm_90+, off below and in the interpreter)."""
    value = os.environ.get("POSATTN_TMA", "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    if value:
        raise ValueError(f"POSATTN_TMA={value!r}: set it to 1 (TMA descriptors), 0 (pointers) or leave it unset")
    return not interpret and capability is not None and hopper_class(capability)


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


# GPU tile tables, one per capability class: sm_80 (A100; also used below sm_90) and sm_90
# (H100; also used above). Keys: (kernel, padded head dim) -> TileConfig, and more specific
# (kernel, padded head dim, variant) entries for variants that need other tiles. Variants
# (first match wins): "xpos" (fp32 rotated tiles), "angles" (RotaryAngles: angle tiles loaded,
# their gradient), "rotary" (RoPE / xPos / angles: tiles rotated on load), "table" (RelativeBias,
# T5: gathers from a learnable table, its gradient), "bias" (ALiBi, relative, T5, Manhattan),
# "urpe", "causal", "varlen" (packed batches: attention_varlen), then the dtype name
# ("float16", "bfloat16").
# Every entry was chosen with the AOT report (python -m bench.gpu_report; Triton 3.9,
# ptxas from its wheel): no register spills, shared memory within the target, tensor-core
# instructions; tests/test_gpu_report.py keeps the main configs that way. "Was a/b": the
# STL/LDL spill instructions of the replaced config (bf16, causal).
# Base entries: the FlashAttention-2 Triton tutorial's tiles, shared by both targets.
_BASE = {
    ("fwd", 16): TileConfig(128, 64, 4, 3), ("fwd", 32): TileConfig(128, 64, 4, 3),
    ("fwd", 64): TileConfig(128, 64, 4, 3), ("fwd", 128): TileConfig(128, 64, 8, 2),
    ("fwd", 256): TileConfig(64, 32, 4, 2),
    ("dkdv", 16): TileConfig(64, 64, 4, 2), ("dkdv", 32): TileConfig(64, 64, 4, 2),
    ("dkdv", 64): TileConfig(64, 64, 4, 2), ("dkdv", 128): TileConfig(64, 64, 8, 2),
    ("dkdv", 256): TileConfig(32, 32, 8, 2),  # 4 warps spilled 6/5 (sm_80), 39/41 (sm_90); 1 stage: not pipelined
    ("dq", 16): TileConfig(64, 64, 4, 2), ("dq", 32): TileConfig(64, 64, 4, 2),
    ("dq", 64): TileConfig(64, 64, 4, 2), ("dq", 128): TileConfig(64, 64, 8, 2),
    ("dq", 256): TileConfig(32, 32, 4, 2),  # 1 stage: not pipelined
    # a learnable table's gradient keeps one stage (2 stages spilled 2/1 to 6/6)
    ("dkdv", 256, "table"): TileConfig(32, 32, 8, 1), ("dkdv", 256, "urpe"): TileConfig(32, 32, 8, 1),
    # Rotating each tile on load needs the fp32 cos / sin tiles too: at D <= 64 the 4-warp
    # forward spilled (sm_90 bf16: 259) and 8 warps do not. On an H100 (bf16, causal, B=4
    # H=16 N=2048 D=64) 8 warps made the plain forward slower (0.87 vs 0.57 ms), so only
    # rotary forwards use them.
    ("fwd", 16, "rotary"): TileConfig(128, 64, 8, 3), ("fwd", 32, "rotary"): TileConfig(128, 64, 8, 3),
    ("fwd", 64, "rotary"): TileConfig(128, 64, 8, 3),
    # Bias tiles (bucket and table gathers) and URPE gates are more live [BLOCK_M, BLOCK_N] tiles.
    ("fwd", 64, "bias"): TileConfig(128, 64, 8, 3),  # was T5 77/49 on sm_80, 84/67 on sm_90
    ("fwd", 128, "bias"): TileConfig(128, 32, 8, 2),  # was T5 210/137 on sm_80, 152/111 on sm_90
    ("dkdv", 128, "rotary"): TileConfig(32, 32, 8, 2),  # was 44/76 (sm_80), 54/70; (64, 32, 8, 2): 16/23, 6/12
    ("dq", 64, "rotary"): TileConfig(64, 64, 8, 2),  # was 7/13 (sm_80), 6/12 (sm_90)
    ("dq", 128, "rotary"): TileConfig(32, 32, 8, 2),  # was 20/29 (sm_80), 24/40; (32, 64, 8, 2): 2/1, 5/6
}
# Issue #14 (interior / boundary loops, software-pipelined, dK/dV computed key-major): every
# main config re-chosen with the AOT report's loop columns. Tiles are (queries, keys): in
# dK/dV, BLOCK_N keys per program and BLOCK_M queries per loop iteration. "wi/1k": loop
# instructions × warps × 1000 / scores per iteration (bf16, non-causal).
_SM80 = {
    **_BASE,
    ("dkdv", 128): TileConfig(32, 64, 8, 2),  # wi/1k 968; (64, 64, 8, 2) spilled 2/1 (causal 10/9)
    # wi/1k 375; (64, 64, 4, 2) spilled 13/12 under Triton 3.6 (causal)
    ("dq", 16): TileConfig(64, 32, 4, 2), ("dq", 32): TileConfig(64, 32, 4, 2), ("dq", 64): TileConfig(64, 32, 4, 2),
    ("dq", 64, "rotary"): TileConfig(64, 32, 8, 2),  # (64, 64, 8, 2) spilled 6/6 (causal 14/13)
    # dK/dV keep k, v, dk, dv of BLOCK_N keys in registers: 64 keys spilled at D=64 (58/58)
    # and 8 warps did not help (38/37); 32 keys do not (168 registers).
    ("dkdv", 16): TileConfig(64, 32, 4, 2), ("dkdv", 32): TileConfig(64, 32, 4, 2),
    ("dkdv", 64): TileConfig(64, 32, 4, 2),
    ("dkdv", 64, "rotary"): TileConfig(32, 32, 4, 2),  # was 266/368; (64, 32, 4, 2): 18/33
    ("dkdv", 64, "bias"): TileConfig(64, 32, 8, 2),  # (64, 32, 4, 2): relative 8/6, Manhattan 8/6
    ("dq", 64, "bias"): TileConfig(64, 32, 4, 2),  # was relative 93/92, T5 45/44
    ("dq", 64, "urpe"): TileConfig(64, 32, 4, 2),  # was 92/91
    ("dkdv", 64, "varlen"): TileConfig(64, 32, 8, 2),  # packed batches: (64, 32, 4, 2) spilled 2/2 (causal, fp16)
    # The position specs of the full report (bf16 causal spills STL/LDL before; wi/1k after):
    ("dkdv", 128, "xpos"): TileConfig(16, 32, 8, 2),  # was 32×32 w8 18/20
    ("dkdv", 128, "table"): TileConfig(16, 64, 8, 2),  # was 32×64 w8 relative 13/11; wi/1k 1445 (T5 1734)
    ("dkdv", 128, "urpe"): TileConfig(16, 64, 8, 2),  # was 64×32 w8 28/26 (causal); wi/1k 1445
    ("dkdv", 64, "table"): TileConfig(32, 32, 8, 2),  # was 64×32 w8 T5 2/1
    ("dkdv", 64, "urpe"): TileConfig(32, 32, 8, 2),  # was 64×32 w4 27/27
    ("dkdv", 64, "xpos"): TileConfig(16, 32, 4, 2),  # was 32×32 w4 4/2
    ("dq", 128, "xpos"): TileConfig(16, 32, 8, 2),  # was 32×32 w8 57/30 (w4)
    ("dq", 64, "xpos"): TileConfig(32, 32, 8, 2),  # was 64×32 w8 28/26
    ("fwd", 64, "angles"): TileConfig(128, 64, 8, 2),  # 3 stages took 104 KB > sm_86's 99 KB
    ("fwd", 64, "table"): TileConfig(128, 32, 8, 3),  # was 128×64 3 stages: T5 40/39, > 99 KB
    ("fwd", 64, "urpe"): TileConfig(128, 32, 8, 3),  # was 128×64 w4: > 99 KB
    ("fwd", 128, "xpos"): TileConfig(128, 32, 8, 2),  # was 128×64: > 99 KB and spills
    ("fwd", 128, "angles"): TileConfig(128, 32, 8, 2),  # was 128×64: 128 KB
    ("fwd", 128, "urpe"): TileConfig(128, 32, 8, 2),  # was 128×64: 6/6
    # D = 256. Rotated tiles at D = 256 still spill (bf16 causal, best found): RoPE / xPos / angles
    # dK/dV 2/2, 27/41, 16/30; xPos forward, xPos and angles dQ: see docs/benchmarks.md.
    ("fwd", 256): TileConfig(32, 32, 4, 2),  # was 64×32: 5/5 (plain) to 14/14 (packed batches)
    ("fwd", 256, "angles"): TileConfig(32, 16, 4, 2),  # 32×32: 112 KB > 99 KB
    ("dkdv", 256, "rotary"): TileConfig(16, 16, 8, 2),  # was 32×32 w8: RoPE 10/20, angles 455/872
    ("dq", 256, "rotary"): TileConfig(16, 16, 4, 2),  # was 32×32: RoPE 54/108; 16×32 w8 over 99 KB
}
_SM90 = {
    **_BASE,
    # A wgmma instruction covers 64 rows per warpgroup: 8 warps on 64-row score tiles computed
    # every score twice (the old D=128 backward). dK/dV's score rows are its keys.
    ("dkdv", 16): TileConfig(32, 64, 4, 2), ("dkdv", 32): TileConfig(32, 64, 4, 2),
    ("dkdv", 64): TileConfig(32, 64, 4, 2),  # wi/1k 455; (64, 64, 4, 2) spilled 2/2
    # (32, 128, 8, 2): wi/1k 607 but 5/5 spills (row offsets kept for the stores, outside the loops)
    ("dkdv", 128): TileConfig(16, 128, 8, 2),  # wi/1k 917, was 64x64 w8 at 1441 (every score twice)
    ("dq", 128): TileConfig(128, 64, 8, 2),  # wi/1k 333, was 64x64 w8 at 1322 (every score twice)
    # wi/1k 1265; (32, 128, 8, 2) 1101 but spilled 6/12 under Triton 3.6, (64, 64, 8, 2) 2/3
    ("dkdv", 64, "rotary"): TileConfig(16, 128, 8, 2),
    ("fwd", 64, "urpe"): TileConfig(128, 64, 8, 3),  # was 26/21
    # 64×64 with 8 warps computed every score twice (wgmma: 64 rows per warpgroup); wi/1k 2816 → 1415
    ("fwd", 128, "rotary"): TileConfig(128, 64, 8, 2),
    ("dkdv", 128, "bias"): TileConfig(64, 32, 8, 2),  # was Manhattan 23/26, relative 2/1
    ("dq", 128, "bias"): TileConfig(64, 32, 8, 2),  # was T5 4/3, relative 2/1
    ("dq", 128, "urpe"): TileConfig(64, 32, 8, 2),  # was 15/15
    # The position specs of the full report (bf16 causal spills STL/LDL before; wi/1k after).
    # Tiles under 64 rows run mma.sync (HMMA) rather than wgmma: slower, but without spills.
    ("dkdv", 128, "xpos"): TileConfig(16, 32, 8, 2),  # was 32×32 w8 spilling
    ("dkdv", 128, "table"): TileConfig(16, 32, 4, 2),  # was 64×32 w8 T5 19/17; wi/1k 1703 (T5 2046)
    ("dkdv", 128, "urpe"): TileConfig(16, 32, 4, 2),  # was 64×32 w8 15/14
    ("dkdv", 64, "table"): TileConfig(16, 32, 4, 2),  # was 32×64 w4 spilling
    ("dkdv", 64, "urpe"): TileConfig(16, 32, 4, 2),
    ("dkdv", 64, "xpos"): TileConfig(16, 32, 4, 2),  # was 16×128 w8 spilling
    ("dkdv", 64, "angles"): TileConfig(16, 32, 8, 2),  # was 16×128 w8 12/16
    ("dq", 128, "xpos"): TileConfig(16, 32, 8, 2),  # was 32×32 w8 9/9
    ("dq", 128, "angles"): TileConfig(16, 32, 8, 2),  # 32×32 w8 6/5 after the angle-gradient fix
    ("dq", 64, "urpe"): TileConfig(64, 32, 4, 2),  # was 64×64 w4 spilling
    ("fwd", 128, "xpos"): TileConfig(128, 32, 8, 1),  # was 128×64 w8 spilling; 2 stages 13/14
    ("fwd", 128, "angles"): TileConfig(128, 32, 8, 2),  # was 128×64 w8 2/2
    # D = 256 (rotated tiles still spill there, fewer than before: RoPE forward 12/12, was 180/188)
    ("fwd", 256, "table"): TileConfig(64, 16, 4, 2),  # was 64×32: relative 7/7, T5 18/34
    ("fwd", 256, "urpe"): TileConfig(64, 16, 4, 2),  # was 64×32: 9/9
    ("fwd", 256, "rotary"): TileConfig(32, 32, 4, 2),
    ("dkdv", 256, "rotary"): TileConfig(16, 16, 8, 2),  # was 32×32 w8: RoPE 8/11, angles 1006/2382
    ("dq", 256, "rotary"): TileConfig(16, 32, 8, 2),  # was 32×32: RoPE 61/114, angles 7623/12936
    ("dq", 256, "urpe"): TileConfig(16, 32, 8, 2),  # was 32×32: 14/13
}

# POSATTN_AUTOTUNE=0: one fixed config per kernel and head dim, whatever the GPU, dtype and
# flags (reproducible CI runs and benchmarks): small tiles that compile without spills for
# the plain kernels on sm_80 and sm_90 (D=256: 4 warps spilled in dK/dV). dK/dV's products
# are key-major, so its key tile is the larger one up to D = 64 (64 queries × 32 keys
# spilled 4/4 on sm_80 at D = 64; 32 × 64 spilled 4/2 on sm_80 at D = 128).
_FIXED = {(kind, d): TileConfig(64, 32, 4, 1) for kind in ("fwd", "dkdv", "dq") for d in (16, 32, 64, 128)}
_FIXED.update({("dkdv", 16): TileConfig(32, 64, 4, 1), ("dkdv", 32): TileConfig(32, 64, 4, 1),
               ("dkdv", 64): TileConfig(32, 64, 4, 1)})
_FIXED.update({(kind, 256): TileConfig(32, 32, 8, 1) for kind in ("fwd", "dkdv", "dq")})

# The interpreter costs ~2.5 ms per tile iteration whatever the tile size, so it gets
# large tiles; 64 still leaves partial tiles in the test shapes (L, S = 63, 130).
_INTERPRET = TileConfig(64, 64, 4, 1)

KERNELS = ("fwd", "dkdv", "dq")


# Autotuning (POSATTN_AUTOTUNE unset or "1"): the plain kernels (no position spec, mask,
# dropout or softcap; any causal flag / window) on a GPU time these tiles against their table
# entry on the first call of each key and keep the fastest. Every candidate compiles without
# spills, within sm_86's 99 KB (sm_80 table), pipelined, and with TMA on sm_90 where the table's
# does (python -m bench.gpu_report --candidates; tests/test_gpu_report.py compiles each one).
# Rejected: sm_80 dQ D=128 (32, 64, 4, 2) spilled 1/1; sm_90 forward D=128 (128, 128, 8, 2) 8/8,
# (64, 128, 4, 2) 14/15 (causal).
_SM80_ALTERNATIVES = {
    ("fwd", 64): (TileConfig(64, 64, 4, 3), TileConfig(128, 32, 4, 3)),
    ("fwd", 128): (TileConfig(64, 64, 4, 3), TileConfig(128, 32, 8, 2)),
    ("dkdv", 64): (TileConfig(32, 32, 4, 3),),
    ("dkdv", 128): (TileConfig(32, 32, 4, 2),),
    ("dq", 64): (TileConfig(32, 64, 4, 2),),
    ("dq", 128): (TileConfig(32, 64, 8, 2), TileConfig(64, 32, 4, 2)),
}
_SM90_ALTERNATIVES = {
    ("fwd", 64): (TileConfig(64, 64, 4, 4), TileConfig(128, 128, 8, 2)),
    ("fwd", 128): (TileConfig(64, 64, 4, 3), TileConfig(128, 64, 8, 3)),
    # dK/dV at D = 128: (16, 64, 4, 3) spilled 20/20, (32, 64, 4, 2) 44/46, and 8 warps on 64
    # keys computed every score twice (wgmma: 64 rows per warpgroup), so the table's alone
    ("dkdv", 64): (TileConfig(16, 64, 4, 3),),
    ("dq", 64): (TileConfig(128, 64, 8, 2),),
    ("dq", 128): (TileConfig(64, 64, 4, 2),),
}
# The interpreter has none (its one config serves every kernel); the tests put some here to
# run the timed choice through the interpreter.
_INTERPRET_ALTERNATIVES: tuple = ()


def gpu_table(capability) -> dict:
    """The tile table that a GPU of ``capability`` (major, minor) uses."""
    return _SM90 if hopper_class(capability) else _SM80


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


VARIANTS = ("xpos", "angles", "rotary", "table", "bias", "urpe", "causal", "varlen")


def tile_config(kind: str, head_dim: int, interpret: bool, capability=(8, 0), dtype="float16",
                flags=()) -> TileConfig:
    """Tiles, warps and stages of kernel ``kind`` ("fwd", "dkdv", "dq").

    ``capability``: the GPU's (major, minor) (see :func:`cuda_capability`); ``dtype``: the
    inputs' dtype; ``flags``: the variants of the call, a subset of :data:`VARIANTS`. Under
    the interpreter one config serves every kernel; ``POSATTN_AUTOTUNE=0`` gives one
    fixed config per kernel and head dim.
    """
    if kind not in KERNELS:
        raise ValueError(f"kind={kind!r} is not a Triton attention kernel; choose one of {KERNELS}")
    unknown = set(flags) - set(VARIANTS)
    if unknown:
        raise ValueError(f"flags {sorted(unknown)} are not tile-table variants; choose from {VARIANTS}")
    if interpret:
        return _INTERPRET
    d = padded_head_dim(head_dim)
    if not autotune():
        return _FIXED[kind, d]
    table = gpu_table(capability)
    for variant in (*(v for v in VARIANTS if v in flags), _dtype_name(dtype)):
        if (kind, d, variant) in table:
            return table[kind, d, variant]
    return table[kind, d]


def tile_candidates(kind: str, head_dim: int, interpret: bool, capability=(8, 0), dtype="float16",
                    flags=(), plain=False) -> tuple:
    """The tiles a timed choice picks from: :func:`tile_config`'s first, then the
    alternatives for ``plain`` kernels (no position spec or mask, flags at most "causal")
    when autotuning is on. One config means no choice."""
    first = tile_config(kind, head_dim, interpret, capability, dtype, flags)
    if not autotune() or not plain or set(flags) - {"causal"}:
        return (first,)
    if interpret:
        alternatives = _INTERPRET_ALTERNATIVES
    else:
        table = _SM90_ALTERNATIVES if hopper_class(capability) else _SM80_ALTERNATIVES
        alternatives = table.get((kind, padded_head_dim(head_dim)), ())
    return (first, *(c for c in alternatives if c != first))


def autotune() -> bool:
    return os.environ.get("POSATTN_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")


@functools.lru_cache(maxsize=None)
def _device_capability(index: int) -> tuple[int, int]:
    import torch
    return torch.cuda.get_device_capability(index)


def cuda_capability(device) -> tuple[int, int]:
    """(major, minor) of a CUDA device, probed on first use and cached (never at import)."""
    import torch
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_capability(index)


# KV-cache decoding (triton_kernels/decode.py, attention_with_kvcache): (keys per tile, warps,
# stages) per padded head dim. Decode reads each cache byte once and is bound by memory
# bandwidth, not by the tensor cores: the query tile is small (the G·L query rows of one KV
# group, ≥ 16 for tl.dot), so large key tiles and deep pipelines keep enough loads in flight.
# Chosen with the AOT report (python -m bench.gpu_report --spec decode; Triton 3.9): no spills and
# ≤ 58.5 KB shared memory on sm_80 / sm_90 (every key tile and its values, 3 stages), main loops
# pipelined (the paged gathers too). 128 keys at D = 128 took 106 KB, over sm_86 / sm_89's 99 KB
# (with 4 warps it also spilled: bf16 sm_90 31/33 STL/LDL).
_DECODE = {16: (128, 4, 3), 32: (128, 4, 3), 64: (128, 4, 3), 128: (64, 4, 3), 256: (32, 4, 3)}
# The interpreter: one key tile per loop iteration costs the same whatever its size; 64 keys
# still leave interior and boundary tiles in the test shapes (cache lengths of a few hundred).
_DECODE_INTERPRET = (64, 4, 1)
# Query rows of one program (the G·L rows of a KV group, padded): more rows than this take
# more programs along the grid's third axis.
DECODE_MAX_BLOCK_M = 64


def decode_tile_config(head_dim: int, rows: int, interpret: bool) -> TileConfig:
    """Tiles of the KV-cache decode kernel: ``rows`` = G·L query rows per KV head (G = H / Hkv)."""
    block_n, num_warps, num_stages = _DECODE_INTERPRET if interpret else _DECODE[padded_head_dim(head_dim)]
    block_m = min(DECODE_MAX_BLOCK_M, padded_head_dim(rows))
    return TileConfig(block_m, block_n, num_warps, num_stages)


@functools.lru_cache(maxsize=None)
def _device_sm_count(index: int) -> int:
    import torch
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device, probed on first use and cached (a host query:
    no device synchronisation, safe inside CUDA-graph capture)."""
    import torch
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_sm_count(index)
