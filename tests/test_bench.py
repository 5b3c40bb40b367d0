"""The benchmark harness (``python -m bench``) on a tiny configuration: the rows it writes, the
FLOP formula, the ratios against posattn, the n/a reasons and the memory subprocess."""
import csv
import math
import pathlib
import sys

import pytest

from conftest import requires_ext

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:       # bench/ is a package at the repository root, not installed
    sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402
from bench.__main__ import plan, run  # noqa: E402

N = 128
PROVIDERS = ["posattn-cpu", "sdpa", "sdpa+bias", "reference"]


def test_flops_formula():
    fwd = harness.Config("plain", "fwd", "sdpa", 1024, b=2, h=8, d=64)
    assert harness.flops(fwd) == 4 * 2 * 8 * 1024 * 1024 * 64
    assert harness.flops(harness.Config("causal", "fwd", "sdpa", 1024, b=2, h=8, d=64)) == harness.flops(fwd) / 2
    assert harness.flops(harness.Config("plain", "fwd+bwd", "sdpa", 1024, b=2, h=8, d=64)) == 3.5 * harness.flops(fwd)


def test_cpu_providers_leave_out_the_interpreter():
    # conftest sets TRITON_INTERPRET=1: bench must still never time the Triton kernels on CPU
    assert "posattn-triton" not in harness.default_providers("cpu")
    assert harness.default_providers("cpu")[0] == harness.PEER_OF_POSATTN["cpu"] == "posattn-cpu"


@requires_ext
def test_tiny_run_rows_ratios_memory_and_plot(tmp_path):
    configs = plan(["relbias"], PROVIDERS, [N], harness.MODES, "cpu", "float32", warmup=1)
    path = tmp_path / "bench.csv"
    rows = run(configs, reps=2, mem=True, plot=True, csv_path=path, out_dir=tmp_path, verbose=False)

    with open(path, newline="") as f:
        written = list(csv.DictReader(f))
    assert written == [{k: str(v) for k, v in r.items()} for r in rows]
    for col in ("case", "mode", "provider", "B", "H", "L", "S", "D", "dtype", "device", "median_ms", "q20_ms",
                "q80_ms", "gflops", "peak_mem_mib", "ratio_vs_posattn", "machine", "cores", "gpu", "torch", "triton",
                "posattn", "git_sha"):
        assert col in written[0], col
    by = {(r["mode"], r["provider"]): r for r in written}
    assert set(by) == {(m, p) for m in harness.MODES for p in PROVIDERS}

    for mode in harness.MODES:
        anchor = by[(mode, "posattn-cpu")]
        assert anchor["status"] == "ok" and float(anchor["ratio_vs_posattn"]) == 1.0
        for p in ("sdpa+bias", "reference"):
            r = by[(mode, p)]
            assert r["status"] == "ok", r["note"]
            assert int(r["reps"]) == 2
            assert float(r["q20_ms"]) <= float(r["median_ms"]) <= float(r["q80_ms"])
            # the ratio is the peer's median over posattn's (> 1: posattn faster)
            assert float(r["ratio_vs_posattn"]) == pytest.approx(float(r["median_ms"]) / float(anchor["median_ms"]),
                                                                 rel=1e-4)
        for p in ("posattn-cpu", "sdpa+bias", "reference"):
            r = by[(mode, p)]
            cfg = harness.Config("relbias", mode, p, N)
            assert float(r["gflops"]) == pytest.approx(harness.flops(cfg) / float(r["median_ms"]) / 1e6, rel=1e-4)
            assert float(r["peak_mem_mib"]) > 0, r["note"]
        # every provider computed the same thing on the same inputs (compared with the first peer)
        assert by[(mode, "sdpa+bias")]["rel_diff"] == ""
        assert float(anchor["rel_diff"]) < 1e-5 and float(by[(mode, "reference")]["rel_diff"]) < 1e-5
        # SDPA alone has no bias: reported n/a with the reason, never timed
        sdpa = by[(mode, "sdpa")]
        assert sdpa["status"] == "n/a" and "sdpa+bias" in sdpa["note"] and sdpa["median_ms"] == ""
    png = tmp_path / "relbias.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


@requires_ext
def test_hf_section_tiny(monkeypatch, tmp_path):
    """bench/hf.py (the demo's Hugging Face section) on tiny settings: the same losses for every
    attention implementation, its measurements, the plot."""
    pytest.importorskip("transformers")
    from bench import hf
    monkeypatch.setattr(hf, "LLAMA_LEN", 16)
    monkeypatch.setattr(hf, "LLAMA_STEPS", 3)
    monkeypatch.setattr(hf, "T5_LEN", 24)
    monkeypatch.setattr(hf, "T5_REPS", 1)
    monkeypatch.setattr(hf, "MEMORY_STEPS", 1)
    runs = hf.llama_time()
    for impl, r in runs.items():
        assert r["tokens_per_s"] > 0 and len(r["losses"]) == 3
        assert max(abs(a - b) for a, b in zip(r["losses"], runs["sdpa"]["losses"])) < 1e-4
    # at these sizes the peaks are allocator noise near zero (0 to 3 MiB seen): only their presence is checked
    assert math.isfinite(hf.llama_memory("posattn+fused")["peak_mib"])
    assert hf.t5_time()["posattn+fused"]["step_ms"] > 0 and math.isfinite(hf.t5_memory("sdpa")["peak_mib"])
    png = hf._plot({k: v["losses"] for k, v in runs.items()}, str(tmp_path / "loss.png"))
    assert pathlib.Path(png).stat().st_size > 0
