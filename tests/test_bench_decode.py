"""``python -m bench --only decode`` (bench/decode.py) on tiny contexts: the plan, the peers' append
against posattn's, the rows, rates and verdicts it writes, and the guard that stops a run whose
providers differ."""
import csv
import pathlib
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import requires_ext

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:       # bench/ is a package at the repository root, not installed
    sys.path.insert(0, str(ROOT))

from bench import decode  # noqa: E402

TINY = ["--contexts", "256,1024", "--batches", "1", "--min-reps", "2", "--budget-s", "0", "--copy-mib", "8"]


def tiny_run(tmp_path, *args):
    decode.main(TINY + ["--out", str(tmp_path), *args])
    with open(tmp_path / "decode.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_plan_lengths_and_bytes():
    configs = decode.plan(decode.VARIANTS, True, ["bfloat16"], [1, 8], [1024, 65536], 32768, 32, 8, 128, "cpu")
    keys = {(c.variant, c.b, c.hkv, c.context) for c in configs}
    assert keys == {("plain", 1, 8, 1024), ("plain", 8, 8, 1024), ("plain", 1, 8, 65536), ("rope", 1, 8, 1024),
                    ("rope", 8, 8, 1024), ("rope", 1, 8, 65536), ("skewed", 8, 8, 1024), ("mqa", 1, 1, 1024),
                    ("mqa", 1, 1, 65536)}
    skewed = next(c for c in configs if c.variant == "skewed")
    assert skewed.lengths == [1024] + [16] * 7 and skewed.rows() == "1024+7x16"
    assert skewed.bytes_read == (1025 + 7 * 17) * 8 * 2 * 128 * 2
    big = decode.Config("plain", "float32", 1, 32, 8, 128, 131072)
    assert big.cache_bytes == 2 * 8 * 131073 * 128 * 4 and big.bytes_read == big.cache_bytes


@requires_ext
@pytest.mark.parametrize("variant", ["rope", "skewed"])
def test_peers_append_what_posattn_appends(variant):
    cfg = decode.Config(variant, "float32", 8, 4, 2, 32, 64)
    x = decode.make_inputs(cfg)
    opts = SimpleNamespace(backend="cpu")
    with torch.no_grad():
        out = decode.PROVIDERS[decode.POSATTN](x, cfg, opts)()
        caches = x.k_cache.clone(), x.v_cache.clone()
        x.k_cache[x.rows, :, x.lens], x.v_cache[x.rows, :, x.lens] = 0, 0     # the rows posattn appended
        peer = decode.PROVIDERS["sdpa"](x, cfg, opts)()
    torch.testing.assert_close(x.k_cache, caches[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.v_cache, caches[1], rtol=0, atol=0)
    torch.testing.assert_close(peer, out, rtol=1e-4, atol=1e-5)


@requires_ext
def test_tiny_run_rows_and_targets(tmp_path, capsys):
    rows = tiny_run(tmp_path)
    out = capsys.readouterr().out
    by = {(r["variant"], r["dtype"], int(r["B"]), int(r["context"]), r["provider"]): r for r in rows}
    want = {(v, dt, 8 if v == "skewed" else 1, n, p) for v in decode.VARIANTS + ("mqa",)
            for dt in ("bfloat16", "float32") for n in (256, 1024) for p in decode.PROVIDERS}
    assert set(by) == want and len(rows) == len(want)
    for (variant, dtype, b, n, p), r in by.items():
        cfg = decode.Config(variant, dtype, b, 32, 1 if variant == "mqa" else 8, 128, n)
        assert int(r["bytes_read"]) == cfg.bytes_read and r["rows"] == cfg.rows()
        if p == "hf-sdpa" and r["status"] == "n/a":        # transformers missing or without the function
            assert r["note"] and f"  hf-sdpa: {r['note']}" in out
            continue
        assert r["status"] == "ok", (p, r["note"])
        assert float(r["rel_diff"]) <= decode.TOL[dtype] and int(r["reps"]) >= 2
        ms, pa = float(r["median_ms"]), float(by[(variant, dtype, b, n, decode.POSATTN)]["median_ms"])
        assert float(r["gbps"]) == pytest.approx(cfg.bytes_read / ms / 1e6, rel=1e-4)
        bw = max(float(r["copy_gbps"]), float(r["read_gbps"]))
        assert float(r["frac_of_bw"]) == pytest.approx(float(r["gbps"]) / bw, rel=1e-4)
        assert float(r["ratio_vs_posattn"]) == pytest.approx(ms / pa, rel=1e-4)
        assert r["backend"] == ("cpu" if p.startswith("posattn") else "")
        if p == decode.POSATTN:
            assert r["verdict_a"] == "n/a (context < 8192)" and r["verdict_b"] == "n/a (context < 32768)"
            assert r["best_sdpa_peer"] in decode.SDPA_PEERS
        assert f"| {variant} | {dtype} | {b} | {cfg.hkv} | {n} | {cfg.rows()} |" in out
    assert "copy_" in out and "verdicts: 0 PASS, 0 MISS" in out and rows[0]["machine"] and rows[0]["git_sha"]


def _result(cfg, provider, ms):
    return SimpleNamespace(cfg=cfg, provider=provider, median=ms / 1e3)


def test_verdicts():
    mqa, gqa = (decode.Config(v, "bfloat16", 1, 32, h, 128, 65536) for v, h in (("mqa", 1), ("plain", 8)))
    gbs = mqa.bytes_read / 10e-3 / 1e9                   # posattn's rate at 10 ms
    rs = [_result(mqa, "posattn", 10), _result(mqa, "sdpa", 25), _result(mqa, "hf-sdpa", 19)]
    (peer, ratio, a), (frac, b) = decode.targets(rs, bw=gbs / 0.75, threads=2)
    assert (peer, a, b) == ("hf-sdpa", "MISS", "PASS") and ratio == pytest.approx(1.9) and frac == pytest.approx(0.75)
    rs[2].median = 30e-3
    assert decode.targets(rs, bw=gbs / 0.5, threads=2) == (("sdpa", pytest.approx(2.5), "PASS"),
                                                            (pytest.approx(0.5), "MISS"))
    rs = [_result(gqa, "posattn", 10), _result(gqa, "sdpa", 30)]
    assert decode.targets(rs, bw=1.0, threads=2)[0][2] == "n/a (B·Hkv = 8 >= 2 threads)"
    assert decode.targets(rs, bw=1.0, threads=16)[0][2] == "PASS"
    assert decode.targets([_result(gqa, "sdpa", 30)], bw=1.0, threads=2) == (None, None)


def test_guard_stops_a_run_whose_providers_differ(tmp_path, monkeypatch):
    def wrong_heads(x, cfg, opts):        # query head h on KV head h % Hkv, not h // (H / Hkv): another computation
        def step():
            q, k, v = decode._append(x)
            g = q.shape[1] // k.shape[1]
            return F.scaled_dot_product_attention(q, k.repeat(1, g, 1, 1), v.repeat(1, g, 1, 1))
        return step
    monkeypatch.setitem(decode.PROVIDERS, "sdpa", wrong_heads)
    with pytest.raises(SystemExit, match="sdpa's out differs from posattn's"):
        tiny_run(tmp_path, "--variants", "plain", "--no-mqa", "--dtypes", "float32", "--providers", "posattn,sdpa",
                 "--backend", "reference")
