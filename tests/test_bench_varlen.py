"""``python -m bench --only varlen`` (bench/varlen.py) on a tiny pack: the lengths and buckets, padding
round trips, the rows and ratios it writes, and the guard that stops a run whose providers differ."""
import csv
import pathlib
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import posattn
from conftest import requires_ext

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:       # bench/ is a package at the repository root, not installed
    sys.path.insert(0, str(ROOT))

from bench import varlen  # noqa: E402

TINY = ["--batch", "3", "--mean", "24", "--max", "48", "--buckets", "2", "--heads", "2", "--head-dim", "16",
        "--reps", "1"]


def tiny_run(tmp_path, *args):
    varlen.main(TINY + ["--out", str(tmp_path), *args])
    with open(tmp_path / "varlen.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_lengths_buckets_and_padding():
    lengths = varlen.sequence_lengths(32, 512, 2048)
    assert lengths == varlen.sequence_lengths(32, 512, 2048)
    assert min(lengths) >= 1 and max(lengths) <= 2048 and 300 < np.mean(lengths) < 700
    assert max(varlen.sequence_lengths(32, 512, 300)) == 300
    (_, order, groups), (_, by_length, buckets) = varlen.variants(lengths, 4)
    assert order == list(range(32)) and groups == [32]
    assert buckets == [8] * 4 and [lengths[i] for i in by_length] == sorted(lengths, reverse=True)
    ls = [lengths[i] for i in by_length]
    assert varlen.padded_tokens(ls, buckets) == sum(8 * ls[8 * i] for i in range(4))
    assert varlen.padded_tokens(lengths, groups) == 32 * max(lengths)

    ls, groups = [3, 1, 4, 2], [2, 2]
    x = torch.randn(10, 2, 5)
    ts = varlen.pad(x, ls, groups)
    assert [tuple(t.shape) for t in ts] == [(2, 2, 3, 5), (2, 2, 4, 5)]
    assert torch.equal(ts[1][0], x[4:8].transpose(0, 1)) and not ts[0][1, :, 1:].any()
    assert torch.equal(varlen.unpad(ts, ls, groups), x)


@requires_ext
def test_tiny_run_rows_and_targets(tmp_path, capsys):
    rows = tiny_run(tmp_path, "--backend", "reference", "--kv-heads", "1")
    out = capsys.readouterr().out
    lengths = varlen.sequence_lengths(3, 24, 48)
    by = {(r["variant"], r["spec"], r["mode"], r["provider"]): r for r in rows}
    assert set(by) == {(v, s, m, p) for v in ("batch", "bucketed") for s in ("rope", "relbias")
                       for m in ("fwd", "fwd+bwd") for p in varlen.PROVIDERS}
    assert {r["padded_tokens"] for r in rows if r["variant"] == "batch"} == {str(3 * max(lengths))}
    for (variant, spec, mode, p), r in by.items():
        assert int(r["real_tokens"]) == sum(lengths)
        if p == "sdpa-nested" and r["status"] == "n/a":     # torch refuses is_causal / a mask on nested tensors
            assert r["note"] and r["median_ms"] == "" and f"  sdpa-nested: {r['note']}" in out
            continue
        assert r["status"] == "ok", r["note"]
        assert float(r["rel_diff"]) < 1e-5 and float(r["median_ms"]) > 0
        assert r["tokens_computed"] == (r["padded_tokens"] if p in varlen.PADDED else r["real_tokens"])
    for variant in ("batch", "bucketed"):
        for spec in ("rope", "relbias"):
            for mode in ("fwd", "fwd+bwd"):
                ms = {p: float(by[(variant, spec, mode, p)]["median_ms"] or "nan") for p in varlen.PROVIDERS}
                r = by[(variant, spec, mode, varlen.VARLEN)]
                best = min(varlen.PADDED, key=ms.get)
                assert r["best_padded"] == best
                assert float(r["speedup_vs_best_padded"]) == pytest.approx(ms[best] / ms[varlen.VARLEN], rel=1e-4)
                assert float(r["target_a"]) == pytest.approx(0.9 * int(r["padded_tokens"]) / sum(lengths), rel=1e-5)
                assert float(r["loop_over_varlen"]) == pytest.approx(ms[varlen.LOOP] / ms[varlen.VARLEN], rel=1e-4)
                assert r["verdict_b"] == ("PASS" if float(r["loop_over_varlen"]) >= 0.9 else "MISS")
                assert f"| {variant} | {spec} | {mode} | {varlen.VARLEN} |" in out
    assert rows[0]["machine"] and rows[0]["git_sha"]


def test_guard_stops_a_run_whose_providers_differ(tmp_path, monkeypatch):
    def acausal(x, spec, opts):           # the loop without causality: another computation
        return lambda: [F.scaled_dot_product_attention(q, k, v) for q, k, v in zip(x.q, x.k, x.v)]
    monkeypatch.setitem(varlen.PROVIDERS, varlen.LOOP, ("loop", acausal))
    with pytest.raises(SystemExit, match="sdpa-loop's out differs from posattn-varlen's"):
        tiny_run(tmp_path, "--backend", "reference", "--specs", "relbias", "--modes", "fwd",
                 "--providers", f"{varlen.VARLEN},{varlen.LOOP}")


@requires_ext
def test_tiny_run_cpu_kernel(tmp_path):
    q, cu = torch.randn(4, 2, 16), torch.tensor([0, 4], dtype=torch.int32)
    try:
        posattn.attention_varlen(q, q, q, cu, cu, 4, 4, causal=True, backend="cpu")
    except NotImplementedError as e:
        pytest.skip(f"attention_varlen has no CPU kernel yet: {e}")
    rows = tiny_run(tmp_path, "--providers", f"{varlen.VARLEN},posattn-padded,{varlen.LOOP}")
    assert len(rows) == 2 * 2 * 2 * 3
    for r in rows:
        assert r["status"] == "ok" and float(r["rel_diff"]) < 1e-4, (r["provider"], r["note"])
    assert {r["backend"] for r in rows if r["provider"] == varlen.VARLEN} == {"cpu"}
