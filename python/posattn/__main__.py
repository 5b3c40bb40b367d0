"""``python -m posattn`` (``make demo``): the environment, a correctness table, and timing.

1. Environment: versions, CPU, GPU, and which backend serves which device (the C++ CPU
   backend with the ISA its kernels run with, or why ``posattn._C`` did not load).
2. Correctness: for every available backend, a few realistic cases (GQA, bottom-right
   causal, bool padding mask, sliding window, softcap, position encodings), the largest
   absolute error of the output and of dq, dk, dv against ``posattn.reference.attention``
   in float64. On CPU: ``backend="cpu"`` in float32, bfloat16 and float16, each beside the
   dense reference in the same dtype. On a CPU without ``TRITON_INTERPRET=1`` the Triton
   kernels are shown by re-running the check, on smaller shapes, in a subprocess that sets
   ``TRITON_INTERPRET=1`` before anything imports ``posattn.triton_kernels`` (Triton reads
   it when the kernels are decorated).
3. Timing: on CUDA with Triton, posattn against torch SDPA. Without CUDA, the benchmark:
   ``python -m bench --quick`` (posattn's CPU backend against torch SDPA, SDPA with a
   materialised bias, FlexAttention and the dense reference, every case) in a subprocess
   from the repository root, its output streamed; only from a source checkout (``bench/``
   is not part of an installed package).
4. Hugging Face transformers: ``python -m bench.hf`` (posattn inside real models: a tiny Llama
   trained 50 steps with "sdpa" / "posattn" / fused positions, loss curves, tokens/s, peak
   memory; a T5 forward + backward at L=2048 with stock SDPA vs ``fuse_positions``), likewise
   from a source checkout.

Only run as ``__main__``: nothing here runs when ``posattn`` is imported.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata

import torch

import posattn
from posattn import _config
from posattn.functional import select_backend

INTERPRETER_FLAG = "--interpreter-check"
# Under the interpreter bf16 tl.dot returns garbage (upstream triton issue #11584).
INTERPRETER_DTYPES = (torch.float32, torch.float16)
INTERPRETER_TIMEOUT_S = 180
BENCH_TIMEOUT_S = 600
HF_TIMEOUT_S = 1200


# --------------------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------------------

def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _cpu_backend_label() -> str:
    """"cpu (<ISA>)": the C++ backend and the instruction set its kernels run with."""
    try:
        return f"cpu ({posattn.ops.cpu_isa()})"
    except RuntimeError as e:
        return f"cpu (ISA unknown: {e})"


def available_backends() -> list[tuple[str, str]]:
    """(backend label, device) pairs that can run here."""
    pairs = []
    if _config.triton_available():
        if torch.cuda.is_available() and not _config.triton_interpret():
            pairs.append(("triton", "cuda"))
        if _config.triton_interpret():
            pairs.append(("triton (interpreter)", "cpu"))
    if posattn.ops.cpu_available():
        pairs.append((_cpu_backend_label(), "cpu"))
    pairs.append(("reference", "cpu"))
    if torch.cuda.is_available():
        pairs.append(("reference", "cuda"))
    return pairs


def _default_backend(device: str) -> str:
    if device == "cpu" and not posattn.ops.cpu_available() and _config.backend_override() is None:
        return "an error (posattn._C did not load)"
    try:
        return select_backend(None, torch.empty(0, device=device))
    except (ValueError, RuntimeError) as e:
        return f"error: {e}"


def print_environment() -> None:
    print("== environment")
    print(f"posattn  {posattn.__version__}  ({os.path.dirname(posattn.__file__)})")
    print(f"python   {platform.python_version()}")
    print(f"torch    {torch.__version__}")
    print(f"triton   {_version('triton')}")
    print(f"CPU      {_cpu_model()}, {_usable_cores()} usable cores (os.cpu_count() = {os.cpu_count()}), "
          f"torch threads {torch.get_num_threads()}")
    if torch.cuda.is_available():
        print(f"CUDA     yes: {torch.cuda.get_device_name(0)} (torch CUDA {torch.version.cuda})")
    else:
        print("CUDA     not available")
    print(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}  "
          f"POSATTN_BACKEND={os.environ.get('POSATTN_BACKEND', '')!r}  "
          f"POSATTN_CPU_ISA={os.environ.get('POSATTN_CPU_ISA', '')!r}")
    print("backends:")
    for label, device in available_backends():
        print(f"  {label:<22} {device}")
    if not _config.triton_available():
        print("  (triton is not installed: pip install triton)")
    elif not torch.cuda.is_available() and not _config.triton_interpret():
        print("  (triton on CPU tensors needs TRITON_INTERPRET=1 set before posattn.triton_kernels is imported)")
    if not posattn.ops.cpu_available():
        print(f"  (backend='cpu' is not available: the C++ extension posattn._C did not load: {posattn.ops._C_ERROR}; "
              f"build it with `make install`)")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print("backend=None picks: " + ", ".join(f"{_default_backend(d)} for {d} tensors" for d in devices))
    print()


# --------------------------------------------------------------------------------------------------
# correctness
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    name: str
    B: int
    H: int
    Hkv: int
    L: int
    S: int
    D: int
    causal: bool = False
    bottom_right: bool = False  # q_pos = S - L: the last query sees every key
    window: tuple[int, int] | None = None
    softcap: float | None = None
    padding: bool = False  # bool key-padding mask (B, 1, 1, S), a different length per batch item
    spec: str | None = None  # a position encoding, see position_specs()

    @property
    def shape(self) -> str:
        return f"B{self.B}-H{self.H}/{self.Hkv}-L{self.L}-S{self.S}-D{self.D}"


def make_cases(small: bool) -> list[Case]:
    """The realistic shapes, or smaller ones for the interpreter (~2.5 ms per tile iteration)."""
    H, Hkv, N, D = (4, 2, 96, 32) if small else (8, 2, 128, 64)
    return [
        Case("gqa", 1, H, Hkv, N, N, D),
        Case("causal, q_pos=S-L", 1, H, Hkv, N // 2, N, D, causal=True, bottom_right=True),
        Case("bool padding mask", 2, H, Hkv, N, N, D, padding=True),
        Case("window=(32, 0)", 1, H, Hkv, N, N, D, window=(32, 0)),
        Case("softcap=5", 1, H, Hkv, N, N, D, softcap=5.0),
        Case("RoPE llama3 decode", 1, H, Hkv, N // 2, N, D, causal=True, bottom_right=True, spec="rope"),
        Case("ALiBi, causal", 1, H, Hkv, N, N, D, causal=True, spec="alibi"),
        Case("T5 buckets, scale=1", 2, H, Hkv, N, N, D, spec="t5"),
        Case("RelBias + URPE gate", 1, H, Hkv, N, N, D, spec="urpe"),
    ]


def position_specs(name: str | None, H: int, device: str) -> dict:
    """The position-encoding keywords of a demo case (fixed, seeded tables)."""
    gen = torch.Generator(device="cpu").manual_seed(1)

    def table(width, scale=0.5):
        return (torch.randn(H, width, generator=gen, dtype=torch.float64) * scale).to(device)

    if name == "rope":
        llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}
        return {"rope": posattn.RoPE(theta=5e5, scaling=llama3)}
    if name == "alibi":
        return {"bias": posattn.ALiBi(posattn.alibi_slopes(H, device=device, dtype=torch.float64))}
    if name == "t5":
        return {"bias": posattn.T5Bias(table(32)), "scale": 1.0}
    if name == "urpe":
        return {"bias": posattn.RelativeBias(table(33)), "urpe": posattn.URPE(1.0 + table(65, 0.1))}
    return {}


def make_inputs(case: Case, device: str):
    """float64 q, k, v, dout on ``device`` and the keywords of posattn.attention for ``case``."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device)

    q = randn(case.B, case.H, case.L, case.D)
    k = randn(case.B, case.Hkv, case.S, case.D)
    v = randn(case.B, case.Hkv, case.S, case.D)
    dout = randn(case.B, case.H, case.L, case.D)
    kwargs = dict(causal=case.causal, window=case.window, softcap=case.softcap,
                  q_pos=case.S - case.L if case.bottom_right else 0)
    kwargs.update(position_specs(case.spec, case.H, device))
    if case.padding:
        lengths = torch.tensor([case.S - (b * case.S) // 4 for b in range(case.B)], device=device)
        kwargs["attn_mask"] = (torch.arange(case.S, device=device) < lengths[:, None])[:, None, None, :]
    return (q, k, v, dout), kwargs


def forward_backward(fn, inputs, dtype, kwargs):
    """out, dq, dk, dv of ``fn`` with q, k, v, dout cast to ``dtype``."""
    q, k, v, dout = (t.detach().to(dtype) for t in inputs)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kwargs)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    return out.detach(), dq, dk, dv


def _spec_to(spec, dtype):
    """A position spec with its float tensors cast to ``dtype`` (other values unchanged)."""
    if not dataclasses.is_dataclass(spec):
        return spec
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    return type(spec)(**{name: value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point()
                         else value for name, value in fields.items()})


def max_errors(got, ref) -> list[float]:
    return [(g.double() - r).abs().max().item() for g, r in zip(got, ref)]


def check_rows(cases, runs, device: str, note: str = "") -> list[dict]:
    """One row per (case, backend, dtype): max |x − reference float64| for out, dq, dk, dv."""
    rows = []
    for case in cases:
        inputs, kwargs = make_inputs(case, device)
        ref = forward_backward(posattn.reference.attention, inputs, torch.float64, kwargs)
        for backend, dtype in runs:
            def fn(q, k, v, **kw):
                # spec tables follow the inputs' dtype, as a model's parameters would
                kw = {key: _spec_to(value, q.dtype) for key, value in kw.items()}
                return posattn.attention(q, k, v, backend=backend, **kw)

            got = forward_backward(fn, inputs, dtype, kwargs)
            rows.append(dict(case=case.name, shape=case.shape, backend=backend, device=device,
                             dtype=str(dtype).replace("torch.", ""), errors=max_errors(got, ref),
                             note=note if backend == "triton" else ""))
    return rows


def interpreter_rows() -> list[dict]:
    """The Triton kernels on CPU tensors through the interpreter, small shapes, with the dense
    reference in the same dtypes beside them as the baseline."""
    runs = [(b, dt) for dt in INTERPRETER_DTYPES for b in ("triton", "reference")]
    return check_rows(make_cases(small=True), runs, "cpu", note="interpreter")


def interpreter_rows_in_subprocess() -> tuple[list[dict], str | None]:
    """Re-runs this module with TRITON_INTERPRET=1 (it must be set before posattn.triton_kernels
    is imported, so it cannot be switched on in this process). Returns (rows, error)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    try:
        proc = subprocess.run([sys.executable, "-m", "posattn", INTERPRETER_FLAG], env=env, capture_output=True,
                              text=True, timeout=INTERPRETER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return [], f"the interpreter subprocess took longer than {INTERPRETER_TIMEOUT_S} s and was stopped"
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0:
        return rows, f"the interpreter subprocess failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}"
    return rows, None


def print_rows(title: str, rows: list[dict]) -> None:
    print(title)
    header = f"  {'case':<19} {'shape':<22} {'backend':<10} {'dtype':<9} {'out':>8} {'dq':>8} {'dk':>8} {'dv':>8}"
    print(header)
    last = None
    for r in rows:
        key = (r["case"], r["shape"])
        case, shape = key if key != last else ("", "")
        last = key
        errs = " ".join(f"{e:8.1e}" for e in r["errors"])
        print(f"  {case:<19} {shape:<22} {r['backend']:<10} {r['dtype']:<9} {errs}  {r['note']}".rstrip())


def print_correctness() -> None:
    print("== correctness: max |x - posattn.reference.attention in float64| for out, dq, dk, dv")
    print("   (the reference rows in float32/float16/bfloat16 are torch's own rounding error in that dtype;")
    print("    the tests accept a kernel whose error is <= 2x that plus a small floor: tests/tolerance.py)")
    cuda = torch.cuda.is_available()
    interpret = _config.triton_interpret()
    has_triton = _config.triton_available()
    has_cpu = posattn.ops.cpu_available()
    if cuda:
        device, dtypes = "cuda", (torch.float32, torch.float16, torch.bfloat16)
        backends = (["triton"] if has_triton and not interpret else []) + ["reference"]
    else:
        # the C++ backend in each dtype it takes, beside the dense reference's own rounding in that dtype
        device = "cpu"
        dtypes = (torch.float32, torch.bfloat16, torch.float16) if has_cpu else (torch.float32,)
        backends = (["cpu"] if has_cpu else []) + ["reference"]
    runs = [(b, dt) for dt in dtypes for b in backends]
    print_rows(f"-- {device}, realistic shapes", check_rows(make_cases(small=False), runs, device))
    if not cuda and not has_cpu:
        print(f"  cpu: not run (posattn._C did not load: {posattn.ops._C_ERROR})")

    if not has_triton:
        print("  triton: not run (the triton package is not installed)")
    elif interpret or not cuda:
        print_interpreter_check(in_process=interpret)
    print()


def print_interpreter_check(in_process: bool) -> None:
    """The Triton kernels on CPU tensors: here if TRITON_INTERPRET=1 is already set, else in a subprocess."""
    if in_process:
        print()
        print_rows("-- Triton kernels on CPU through the interpreter (TRITON_INTERPRET=1), smaller shapes",
                   interpreter_rows())
    else:
        print("  triton: not run in this process: CPU tensors need TRITON_INTERPRET=1 set before "
              "posattn.triton_kernels is imported")
        print()
        t0 = time.perf_counter()
        rows, error = interpreter_rows_in_subprocess()
        print_rows(f"-- Triton kernels on CPU through the interpreter: a subprocess with TRITON_INTERPRET=1, "
                   f"smaller shapes ({time.perf_counter() - t0:.1f} s)", rows)
        if error:
            print(f"  {error}")
    print("  bfloat16 is not run under the interpreter (tl.dot on bf16 is wrong there, triton issue #11584);")
    print("  bf16 Triton results are checked on GPU only")


# --------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------

def median_ms(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median CUDA time of ``fn`` in ms, after ``warmup`` calls (which also compile the kernels)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_pair(attn, q, k, v, dout) -> tuple[float, float]:
    """(forward ms, forward+backward ms) of ``attn(q, k, v)``."""
    with torch.no_grad():
        fwd = median_ms(lambda: attn(q, k, v))
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))

    def step():
        torch.autograd.grad(attn(q, k, v), (q, k, v), dout)

    return fwd, median_ms(step)


def bench_root() -> str | None:
    """The source checkout this posattn comes from (the repository root is the parent of python/)
    when it has the ``bench`` package, else None (e.g. an installed wheel: bench/ is not packaged)."""
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(posattn.__file__)))
    if os.path.basename(package_parent) != "python":
        return None
    root = os.path.dirname(package_parent)
    return root if os.path.isfile(os.path.join(root, "bench", "__main__.py")) else None


def run_bench_module(module: str, what: str, timeout: int, *args: str) -> None:
    """``python -m bench.<module> *args`` (or ``python -m bench``) in a subprocess from the repository
    root, its output streamed; only from a source checkout (bench/ is not part of an installed package)."""
    root = bench_root()
    name = "bench" + (f".{module}" if module else "")
    if root is None:
        print(f"bench/ is not here (posattn is not run from a source checkout): no {what}; run it from the "
              f"repository: python -m {name} {' '.join(args)}")
        return
    cmd = [sys.executable, "-m", name, *args]
    print(f"$ {' '.join(cmd)}   (in {root})", flush=True)
    # the same posattn in the bench and in its subprocesses; unbuffered, so its lines stream
    package_parent = os.path.join(root, "python")
    pythonpath = os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=pythonpath, PYTHONUNBUFFERED="1")
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"python -m {name} took longer than {timeout} s and was stopped")
        return
    if proc.returncode != 0:
        print(f"python -m {name} failed (exit {proc.returncode})")


def print_cpu_timing() -> None:
    """The benchmark: python -m bench --quick in a subprocess (repository root), its output streamed."""
    print("== timing: posattn backend='cpu' vs torch SDPA / SDPA + bias / FlexAttention / reference (python -m bench)")
    if not posattn.ops.cpu_available():
        print(f"the C++ CPU backend is not available (posattn._C did not load: {posattn.ops._C_ERROR}): no timing")
        return
    run_bench_module("", "timing", BENCH_TIMEOUT_S, "--quick")


def print_timing() -> None:
    if not torch.cuda.is_available():
        print_cpu_timing()
        return
    print("== timing: torch SDPA vs posattn")
    if not _config.triton_available():
        print("the triton package is not installed, so posattn has no CUDA kernel here: no timing")
        return
    if _config.triton_interpret():
        print("TRITON_INTERPRET=1 runs the Triton kernels in the interpreter: no timing")
        return
    F = torch.nn.functional
    print(f"on {torch.cuda.get_device_name(0)}; median of 20 runs; ratio = posattn / SDPA (> 1: posattn slower)")
    print(f"  {'dtype':<9} {'shape':<26} {'causal':<7} {'SDPA fwd':>9} {'posattn':>9} {'ratio':>6}   "
          f"{'SDPA f+b':>9} {'posattn':>9} {'ratio':>6}")
    B, H, N = 2, 16, 2048
    for dtype, D, causal in ((torch.float16, 64, False), (torch.float16, 64, True), (torch.bfloat16, 64, True),
                             (torch.float16, 128, True)):
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, dout = (torch.randn(B, H, N, D, device="cuda", dtype=dtype, generator=gen) for _ in range(4))
        sdpa = time_pair(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal), q, k, v, dout)
        ours = time_pair(lambda a, b, c: posattn.attention(a, b, c, causal=causal, backend="triton"), q, k, v, dout)
        shape = f"B{B}-H{H}-L{N}-S{N}-D{D}"
        print(f"  {str(dtype).replace('torch.', ''):<9} {shape:<26} {str(causal):<7} "
              f"{sdpa[0]:7.3f}ms {ours[0]:7.3f}ms {ours[0] / sdpa[0]:6.2f}   "
              f"{sdpa[1]:7.3f}ms {ours[1]:7.3f}ms {ours[1] / sdpa[1]:6.2f}")


# --------------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m posattn", description=__doc__.split("\n\n")[0])
    parser.add_argument(INTERPRETER_FLAG, action="store_true",
                        help="only run the Triton-interpreter correctness rows and print them as JSON lines "
                             "(needs TRITON_INTERPRET=1; the demo runs this in a subprocess)")
    args = parser.parse_args(argv)
    if args.interpreter_check:
        if not _config.triton_interpret():
            parser.error(f"{INTERPRETER_FLAG} needs TRITON_INTERPRET=1 in the environment")
        for row in interpreter_rows():
            print(json.dumps(row), flush=True)
        return

    t0 = time.perf_counter()
    print_environment()
    print_correctness()
    print_timing()
    print()
    run_bench_module("hf", "Hugging Face section", HF_TIMEOUT_S)
    print(f"\ndemo finished in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
