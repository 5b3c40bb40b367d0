"""Helpers shared by the bench tools: the machine and code version a row was measured
on, a process's memory high-water mark, and CPU-time counters for contention checks.

bench/harness.py imports them as ``bench._common``; the stand-alone tools run as
``python bench/<script>.py`` (cpu_gemm.py, cpu_isa.py: this folder on ``sys.path``) import ``_common``.
"""
import os
import pathlib
import resource
import subprocess

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent


def machine():
    """(CPU model, logical cores)."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return model, os.cpu_count()


def git_sha():
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def reason(e):
    """One line naming an exception, for providers reported as n/a."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:160]


def status_kib(key):
    """A field of /proc/self/status in KiB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def reset_hwm():
    """Reset this process's RSS high-water mark (Linux clear_refs 5); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_seconds():
    """(this process's CPU seconds, the whole machine's busy CPU seconds, steal seconds)."""
    use = resource.getrusage(resource.RUSAGE_SELF)
    busy = steal = 0.0
    try:
        with open("/proc/stat") as f:
            ticks = [int(t) for t in f.readline().split()[1:]]
        hz = os.sysconf("SC_CLK_TCK")
        busy = (sum(ticks[:8]) - ticks[3] - ticks[4]) / hz  # all but idle and iowait
        steal = ticks[7] / hz
    except (OSError, ValueError, IndexError):
        pass
    return np.array([use.ru_utime + use.ru_stime, busy, steal])
