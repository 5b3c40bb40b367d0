"""Test configuration: device choice, interpreter, seeds, NaN-poisoned allocations, markers,
and the kernel backends that the kernel tests are parametrized over.

``requires_ext`` marks tests that need the compiled CPU backend ``posattn._C``. They are
never skipped: when the extension did not load, each of them fails in set-up with the
import error, so a CI run whose build is broken or missing fails loudly. To run the rest
of the suite on a machine without the build, deselect them explicitly:
``pytest -m "not requires_ext"``.
"""
import importlib.util
import inspect
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

requires_ext = pytest.mark.requires_ext

# The kernel backends. Triton runs on the test device (CUDA, else the CPU under the
# interpreter); the C++ backend always takes CPU tensors, also on a machine with a GPU.
TRITON = pytest.param("triton", id="triton")
CPU = pytest.param("cpu", id="cpu", marks=requires_ext)
KERNEL_BACKENDS = [TRITON, CPU]

# Dtypes each kernel backend is checked in besides float32. bf16 Triton runs on CUDA only
# (tl.dot on bf16 is broken in the interpreter, triton issue #11584); the C++ backend
# computes bf16 and fp16 on any CPU.
HALF_DTYPES = {"triton": [torch.float16] + ([torch.bfloat16] if HAS_CUDA else []),
               "cpu": [torch.bfloat16, torch.float16]}


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def backend_dtype_params(dtypes=HALF_DTYPES):
    """(backend, dtype) pairs with ids such as ``cpu-bfloat16``, the cpu ones marked requires_ext."""
    return [pytest.param(b, dt, id=f"{b}-{dtype_name(dt)}", marks=requires_ext if b == "cpu" else ())
            for b in ("triton", "cpu") for dt in dtypes[b]]


def backend_device(backend):
    """The device a backend's tensors live on in the tests."""
    return "cpu" if backend == "cpu" else DEVICE


def kernel_dropout_mask(backend, seed, B, H, L, S, p, device):
    """The keep-mask (bool [B, H, L, S]) that ``backend``'s kernels draw for ``seed``."""
    if backend == "cpu":
        import posattn
        return posattn.ops.cpu_dropout_mask(seed, B, H, L, S, p)
    from posattn.triton_kernels import dropout_mask
    return dropout_mask(seed, B, H, L, S, p, device)


def backend_fixtures(device_name="device"):
    """The fixtures of a module whose tests run once per kernel backend: ``backend``
    (ids ``triton`` / ``cpu``) and ``device``, the device that backend's tensors live on.
    A module binds both with ``backend, device = backend_fixtures()``; one whose other tests
    keep the plain ``device`` fixture names the backend's device otherwise
    (``backend, kdevice = backend_fixtures("kdevice")``)."""

    @pytest.fixture(params=KERNEL_BACKENDS)
    def backend(request):
        return request.param

    @pytest.fixture(name=device_name)
    def device(backend):
        return backend_device(backend)

    return backend, device


def _extension_error():
    from posattn import ops  # imports posattn (not Triton); ops holds the extension's import error
    return ops._C_ERROR


def pytest_configure(config):
    # Without a GPU the Triton kernels run in Triton's interpreter. This is process-wide
    # configuration, not a per-test knob: Triton reads it when the kernels are first
    # decorated, so it must be in place before anything imports posattn.triton_kernels.
    if not HAS_CUDA:
        os.environ["TRITON_INTERPRET"] = "1"
    config.addinivalue_line("markers", "requires_cuda: needs a CUDA device")
    config.addinivalue_line("markers", "requires_ext: needs the compiled extension posattn._C; fails (never skips) "
                                       "without it; deselect with -m 'not requires_ext'")
    config.addinivalue_line("markers", "slow: long-running test")
    config.addinivalue_line("markers", "gpu_smoke: the fast selection a GPU runner runs on every push "
                                       "(`pytest -m gpu_smoke`; chosen in tests/conftest.py, GPU_SMOKE)")
    config.addinivalue_line("markers", "requires_hf: compares with Hugging Face transformers; skipped where it is "
                                       "not installed (pip install posattn[hf])")


def pytest_report_header(config):
    error = _extension_error()
    if error is not None:
        return f"posattn._C: NOT LOADED ({error}); every requires_ext test will fail"
    return f"posattn._C: loaded, CPU kernels use {torch.ops.posattn.cpu_isa()}"


# The gpu_smoke selection: a GPU runner's per-push check, every kernel family forward and
# backward once (plain, GQA, masks, softcap, each position spec, SDPA, the CPU ops' schemas,
# kernelized attention, packed batches, KV-cache decoding), kept small because on a GPU every
# test compiles its own Triton specialisations: test function -> how many of its
# parametrizations (in collection order).
GPU_SMOKE = {
    "test_attention.py::test_shapes": 4,
    "test_attention.py::test_half_precision": 4,
    "test_attention.py::test_gqa": 1,
    "test_attention.py::test_position_offsets": 1,
    "test_attention.py::test_window": 2,
    "test_attention.py::test_masks": 2,
    "test_attention.py::test_fully_masked_rows": 2,
    "test_attention.py::test_softcap_scale_and_no_lse": 1,
    "test_attention.py::test_dropout_same_seed_same_result": 2,
    "test_attention.py::test_rope_layouts": 2,
    "test_attention.py::test_alibi": 2,
    "test_attention.py::test_relative_bias": 2,
    "test_attention.py::test_t5_bias": 2,
    "test_attention.py::test_manhattan_decay": 2,
    "test_attention.py::test_urpe": 2,
    "test_sdpa.py::test_kernel_matches_torch_float32": 2,
    "test_sdpa.py::test_kernel_matches_torch_half": 2,
    "test_api.py::test_backend_none_and_the_override": 1,
    "test_api.py::test_import_does_not_import_triton": 1,
    "test_kernelized.py::test_fused_backends_against_dense_oracle": 2,
    "test_varlen.py::test_kernel": 3,
    "test_varlen.py::test_kernel_never_reads_other_sequences": 1,
    "test_kvcache.py::test_kernel": 2,
    "test_kvcache_triton.py::test_kernel": 2,
}
HAS_HF = importlib.util.find_spec("transformers") is not None


def _uses_transformers(item):
    fn = getattr(item, "function", None)
    try:
        return fn is not None and "from transformers" in inspect.getsource(fn)
    except (OSError, TypeError):
        return False


@pytest.hookimpl(tryfirst=True)     # before -m filters on the markers added here
def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    skip_hf = pytest.mark.skip(reason="needs HF transformers (pip install posattn[hf]; `make test` installs it)")
    taken = {}
    for item in items:
        if "requires_cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)
        key = f"{item.path.name}::{item.originalname}"
        on_gpu_backend = item.get_closest_marker("requires_ext") is None      # the C++ backend's cases are not GPU work
        if on_gpu_backend and taken.get(key, 0) < GPU_SMOKE.get(key, 0):
            taken[key] = taken.get(key, 0) + 1
            item.add_marker(pytest.mark.gpu_smoke)
        if _uses_transformers(item):
            item.add_marker(pytest.mark.requires_hf)
            if not HAS_HF:
                item.add_marker(skip_hf)


@pytest.fixture(autouse=True)
def _require_extension(request):
    if request.node.get_closest_marker("requires_ext") is not None:
        error = _extension_error()
        if error is not None:
            pytest.fail(f"needs the compiled CPU backend posattn._C, which did not load: {error}. Build it with "
                        f"`make install`, or deselect these tests with -m 'not requires_ext'", pytrace=False)


@pytest.fixture(autouse=True)
def _seed_and_poison(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setenv("POSATTN_POISON_ALLOC", "1")


@pytest.fixture
def device():
    return DEVICE
