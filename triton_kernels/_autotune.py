"""A timed choice of tiles for the Triton attention kernels (``POSATTN_AUTOTUNE``, on by default).

On the first call of a key, every candidate config (:func:`posattn._config.tile_candidates`:
the tile table's entry first, then a few alternatives for the plain kernels) is launched and
timed, and the fastest is kept for the rest of the process. The key (built by the launcher):
the kernel, the GPU's capability, the dtype, the padded head dims, the flags and the sizes
rounded up to powers of two (rows, keys and programs), so shapes of the same bucket share one
choice. Every timed launch writes the same outputs (the launchers tune only calls without
accumulating outputs, and launch the chosen config last), and nothing is timed while a CUDA
graph is being captured or launches are being recorded (``capture_launches``): those calls
take the first candidate. A candidate the GPU cannot run (too much shared memory or too many
registers on a smaller part) is skipped.
"""
import time

import torch
from triton.runtime.errors import OutOfResources

_BEST: dict = {}


def bucket(n: int) -> int:
    """``n`` rounded up to a power of two (at least 1): the key's size classes."""
    return 1 << max(0, int(n) - 1).bit_length()


def time_launch(fn, device, reps: int = 3) -> float:
    """Mean time of ``fn()`` (a kernel launch) after one untimed call (its compile)."""
    fn()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / reps
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def may_time(device) -> bool:
    """Whether launches on ``device`` may be timed now (not while a CUDA graph is captured)."""
    return device.type != "cuda" or not torch.cuda.is_current_stream_capturing()


def choose(key, candidates, launch, device):
    """The config of ``candidates`` to launch for ``key``: the first one when there is no
    choice (one candidate, a CUDA-graph capture), else the fastest, timed once per
    process through ``launch(config)``."""
    if len(candidates) == 1 or not may_time(device):
        return _BEST.get(key, candidates[0])
    best = _BEST.get(key)
    if best is None:
        times = []
        for config in candidates:
            try:
                times.append(time_launch(lambda: launch(config), device))
            except OutOfResources:
                times.append(float("inf"))
        if min(times) == float("inf"):
            raise RuntimeError(f"no tile config of {key[0]} runs on this GPU: {candidates}")
        best = _BEST[key] = candidates[times.index(min(times))]
    return best


def clear():
    """Forget every choice (tests)."""
    _BEST.clear()
