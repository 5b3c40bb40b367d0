"""GPU code quality without a GPU (issues #7, #14): the Triton kernels compiled ahead of time
for sm_80 and sm_90, as the launchers configure them, must use tensor cores, fit the target's
shared memory and not spill registers; the attention kernels' main loops must be
software-pipelined and their interior loops within ``gpu_report.LOOP_TARGETS``
(``python -m bench.gpu_report --check``'s rule, on the main configs).

The compiles run in worker processes of ``bench.gpu_report.measure`` whose environment
lacks TRITON_INTERPRET (which this process sets when there is no GPU, and which replaces
the kernels by interpreted ones). Missing ``cuobjdump`` / ``ptxas`` (shipped in the Triton
wheel) fail the test, they do not skip it.
"""
import sys
from pathlib import Path

import pytest

from posattn import _config

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ is a package at the repository root, not installed
    sys.path.insert(0, str(ROOT))

from bench import gpu_report  # noqa: E402
from bench.gpu_report import Case  # noqa: E402

# The main configs: forward and both backward kernels, D 64 and 128, fp16 and bf16 on both
# targets. Causal and RoPE in one dtype per target (fp16 on sm_80, bf16 on sm_90): the two
# dtypes give the same spills, shared memory and MMA counts, registers within 5, in the
# full report. This keeps the test near a minute of CPU time on two cores.
KERNELS, HEAD_DIMS = ("fwd", "dkdv", "dq"), (64, 128)
MAIN = [Case(arch, d, dtype, causal, spec, kernel)
        for arch, dtype in ((80, "fp16"), (90, "bf16")) for d in HEAD_DIMS for causal in (False, True)
        for spec in ("none", "rope") for kernel in KERNELS]
MAIN += [Case(arch, d, dtype, False, "none", kernel)
         for arch, dtype in ((80, "bf16"), (90, "fp16")) for d in HEAD_DIMS for kernel in KERNELS]
# Packed batches (attention_varlen): the same kernels with VARLEN, causal, both targets.
MAIN += [Case(arch, d, dtype, True, "varlen", kernel)
         for arch, dtype in ((80, "fp16"), (90, "bf16")) for d in HEAD_DIMS for kernel in KERNELS]
# The alternative tiles autotuning may pick for the plain kernels (the table's entry is in
# MAIN): one dtype per target, not causal (the full report with --candidates checked causal too).
CANDIDATES = gpu_report.candidate_cases([Case(arch, d, dtype, False, "none", kernel)
                                         for arch, dtype in ((80, "fp16"), (90, "bf16")) for d in HEAD_DIMS
                                         for kernel in KERNELS])
# POSATTN_AUTOTUNE=0's fixed config must hold up too (it ignores dtype and flags).
FIXED = [Case(arch, d, "fp16", False, "none", kernel) for arch in (80, 90) for d in HEAD_DIMS for kernel in KERNELS]
# Kernelized attention's kernels (feature map, outer product, contractions): no tensor-core
# work by design (float64, and fp32 dots at ieee precision), so only spills and shared memory.
KERNELIZED = [Case(arch, d, "bf16", False, "kernelized", kernel)
              for arch in (80, 90) for d in HEAD_DIMS for kernel in gpu_report.KZ_KERNELS]

# KV-cache decoding's kernels (triton_kernels/decode.py): the split-KV attention kernel (causal)
# and the append and merge kernels, D 64 and 128, one dtype per target.
DECODE = [Case(arch, d, dtype, kernel == "decode", "decode", kernel)
          for arch, dtype in ((80, "fp16"), (90, "bf16")) for d in HEAD_DIMS for kernel in gpu_report.DECODE_KERNELS]


# Compiles are cached between runs (build/ is git-ignored): a kernel whose source, options
# and Triton version did not change is read back, so a rerun of make test takes seconds here.
CACHE = ROOT / "build" / "triton-aot-cache"


def _rows(cases, env=None):
    return dict(zip(cases, gpu_report.measure(cases, jobs=2, progress=lambda line: None, env=env, cache_dir=CACHE)))


@pytest.fixture(scope="module")
def report():
    return _rows(MAIN)


@pytest.fixture(scope="module")
def fixed_report():
    return _rows(FIXED, env={"POSATTN_AUTOTUNE": "0"})


def _params(cases):
    return [pytest.param(c, id=f"{c.kernel}-sm{c.arch}-D{c.head_dim}-{c.dtype}{'-causal' if c.causal else ''}-{c.spec}"
                            f"{f'-candidate{c.candidate}' if c.candidate else ''}")
            for c in cases]


def _check(row, loops=True):
    label = (f"{row.kernel} sm_{row.arch} D={row.head_dim} {row.dtype} causal={row.causal} {row.spec} "
             f"{f'candidate {row.candidate} ' if row.candidate else ''}"
             f"(BLOCK_M={row.block_m} BLOCK_N={row.block_n} warps={row.num_warps} stages={row.num_stages})")
    # gpu_report --check's rule: no spills, shared memory within the target, tensor cores, and
    # (``loops``) pipelined main loops and the interior-loop instruction targets.
    bad = gpu_report.problems(row, loops=loops)
    assert not bad, (f"{label}: {'; '.join(bad)} ({row.registers} registers, interior loop {row.loop_insts} "
                     f"instructions per iteration); retune its tiles in posattn/_config.py")
    assert 0 < row.registers <= 255, f"{label}: {row.registers} registers"


@pytest.mark.parametrize("case", _params(MAIN))
def test_tables(report, case):
    _check(report[case])


@pytest.fixture(scope="module")
def candidates_report():
    return _rows(CANDIDATES)


@pytest.mark.parametrize("case", _params(CANDIDATES))
def test_autotune_candidates(candidates_report, case):
    _check(candidates_report[case])


@pytest.mark.parametrize("case", _params(FIXED))
def test_fixed_config(fixed_report, case):
    _check(fixed_report[case], loops=False)


@pytest.fixture(scope="module")
def kernelized_report():
    return _rows(KERNELIZED)


@pytest.mark.parametrize("case", _params(KERNELIZED))
def test_kernelized_kernels(kernelized_report, case):
    _check(kernelized_report[case], loops=False)


@pytest.fixture(scope="module")
def decode_report():
    return _rows(DECODE)


@pytest.mark.parametrize("case", _params(DECODE))
def test_decode_kernels(decode_report, case):
    row = decode_report[case]
    _check(row, loops=False)
    if row.kernel == "decode":  # the paged cache's gathers too are issued as async copies
        assert row.pipelined, f"decode sm_{row.arch} D={row.head_dim}: main loop not software-pipelined"


def test_capability_tables(monkeypatch):
    """Each capability class gets its own table, variants their own entries, the
    interpreter its one config; POSATTN_AUTOTUNE=0 one config whatever the GPU and flags."""
    monkeypatch.setenv("POSATTN_AUTOTUNE", "1")
    assert _config.gpu_table((8, 0)) is _config._SM80
    assert _config.gpu_table((8, 6)) is _config._SM80
    assert _config.gpu_table((9, 0)) is _config._SM90
    assert _config.tile_config("dkdv", 100, False, capability=(8, 0)) == _config._SM80["dkdv", 128]
    assert _config.tile_config("dkdv", 64, False, capability=(9, 0)) == _config._SM90["dkdv", 64]
    assert (_config.tile_config("dq", 128, False, capability=(9, 0), flags=("causal", "rotary"))
            == _config._SM90["dq", 128, "rotary"])
    assert (_config.tile_config("dq", 128, False, capability=(9, 0), flags=("xpos", "rotary", "causal"))
            == _config._SM90["dq", 128, "xpos"])
    assert (_config.tile_config("fwd", 64, False, capability=(8, 0), flags=("table", "bias"))
            == _config._SM80["fwd", 64, "table"])
    assert _config.tile_config("fwd", 64, True, capability=(9, 0), flags=("rotary",)) == _config._INTERPRET
    monkeypatch.setenv("POSATTN_AUTOTUNE", "0")
    for kind in _config.KERNELS:
        configs = {_config.tile_config(kind, 128, False, capability=cap, dtype=dtype, flags=flags)
                   for cap in ((8, 0), (9, 0)) for dtype in ("float16", "bfloat16")
                   for flags in ((), ("rotary",), ("bias", "causal"), ("urpe",))}
        assert configs == {_config._FIXED[kind, 128]}
    assert _config.tile_candidates("fwd", 64, False, capability=(9, 0), plain=True) == (_config._FIXED["fwd", 64],)
    monkeypatch.setenv("POSATTN_AUTOTUNE", "1")
    # autotuning's candidates: the table's entry first, alternatives only for plain kernels
    assert (_config.tile_candidates("fwd", 64, False, capability=(9, 0), flags=("causal",), plain=True)
            == (_config._SM90["fwd", 64], *_config._SM90_ALTERNATIVES["fwd", 64]))
    assert (_config.tile_candidates("dq", 100, False, capability=(8, 6), plain=True)
            == (_config._SM80["dq", 128], *_config._SM80_ALTERNATIVES["dq", 128]))
    assert _config.tile_candidates("dkdv", 128, False, capability=(9, 0), plain=True) == (_config._SM90["dkdv", 128],)
    for flags, plain in ((("causal", "rotary"), True), (("varlen",), True), ((), False)):
        assert len(_config.tile_candidates("fwd", 64, False, capability=(9, 0), flags=flags, plain=plain)) == 1
    assert _config.tile_candidates("fwd", 64, True, plain=True) == (_config._INTERPRET,)
    with pytest.raises(ValueError, match="kind='bwd'"):
        _config.tile_config("bwd", 64, False)
    with pytest.raises(ValueError, match="alibi"):
        _config.tile_config("fwd", 64, False, flags=("alibi",))


def test_triton_features(monkeypatch):
    """triton_kernels/_compat.py detects what the installed Triton offers by name, never by
    version: Triton 3.6 (the GPU machine) and 3.9 (CI) both have TMA descriptors (host and
    device side), warp specialization and the allocator; a Triton without them gets None /
    False, not an error."""
    import triton.language as tl

    from posattn.triton_kernels import _compat
    assert _compat.features() == dict(triton=_compat.triton.__version__, device_tensor_descriptor=True,
                                      host_tensor_descriptor=True, warp_specialize=True, allocator=True)
    assert _compat.device_tensor_descriptor() is tl.make_tensor_descriptor
    for probe in (_compat.device_tensor_descriptor, _compat.has_warp_specialize):
        probe.cache_clear()
    try:
        monkeypatch.delattr(tl, "make_tensor_descriptor")
        monkeypatch.setattr(tl, "range", type("range", (), {"__init__": lambda self, a, b=None, step=None: None}))
        assert _compat.device_tensor_descriptor() is None
        assert not _compat.has_warp_specialize()
    finally:
        monkeypatch.undo()
        for probe in (_compat.device_tensor_descriptor, _compat.has_warp_specialize):
            probe.cache_clear()
    assert _compat.has_warp_specialize()
