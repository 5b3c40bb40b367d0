"""Ahead-of-time GPU code report of the Triton attention kernels: no GPU needed.

    python -m bench.gpu_report [--arch 80 90] [--head-dim 64 128 256] [--dtype fp16 bf16] [--candidates]
                               [--causal 0 1] [--spec none rope ...] [--kernel fwd pre dkdv dq]
                               [--quick] [--jobs 2] [--out bench/results/gpu_report.csv]

Every kernel launch that ``attn_fwd`` / ``attn_bwd`` would make on an sm_80 or sm_90 GPU is
recorded (``capture_launches``: the launchers' own tile choice and argument list, CPU
tensors standing in for CUDA ones), bound the way ``JITFunction.run`` binds it, and compiled
with ``triton.compile`` for ``GPUTarget("cuda", arch, 32)``. From the cubin, with the
``cuobjdump`` shipped in the Triton wheel: registers per thread, the spill stores / loads
(STL / LDL instructions in the SASS) and the stack frame they use, shared memory and the
tensor-core instructions (HMMA; HGMMA = wgmma on sm_90); and the main loops (innermost SASS
loops with tensor-core work): instructions per iteration of the interior (shortest) and
boundary (longest) loop, the interior loop's MMA, EX2 and async-copy / TMA instructions
(LDGSTS, UTMALDG) and TMA loads alone, and "pipelined" when every main loop issues async
copies or TMA. A table goes to stdout, CSV rows (with machine, versions and git sha) to ``--out``; ``--check``
exits 1 when a kernel spills, overflows shared memory, (all but the preprocess kernel) lacks
tensor cores, or when an attention kernel's main loop is not pipelined (no position spec,
RoPE) or its interior loop misses LOOP_TARGETS (no position spec), or when an sm_90 forward /
dQ interior loop (no position spec) reads K and V without TMA while POSATTN_TMA is on.

Specs: none, rope (RoPE), xpos, angles (RotaryAngles, with their gradient), alibi,
relative (RelativeBias), t5, manhattan (ManhattanDecay), urpe, varlen (no spec, a packed
batch of sequences: the VARLEN kernels of attention_varlen); the backward takes the
gradients of the learnable tables (relative, t5, urpe, angles). The preprocess kernel
("pre", delta = rowsum(dO * O)) has no dot and is reported once per arch, D and dtype.
"decode" stands for KV-cache decoding's kernels (triton_kernels/decode.py, attention_with_kvcache): a
decoding step of DECODE_B sequences, H = 4·Hkv query heads on a paged cache (pages of 16
rows) with RoPE and new keys, split 4 ways: the append kernel (rotate the new keys into the
cache), the split-KV attention kernel (its BLOCK_M rows are the G·L query rows of a KV group)
and the merge of the splits (combine); only the attention kernel has tensor-core work.
"kernelized" stands for kernelized attention's kernels (triton_kernels/kernelized.py,
launched by their own launchers): the PRF feature map of queries (prf_q), of keys (its
max pass prf_kmax, then prf_k) and its backward (prf_bwd) on x in the dtype, and the
float64 outer product and contractions around the FFTs (outer, contract_f, contract_e)
with Dv = D; none has tensor-core work (float64, and fp32 dots at ieee precision, since an
error in w·x̃ is an error in an exponent). Its BLOCK_M / BLOCK_N columns are the rows and
feature tiles.
The full sweep (660 kernels) takes about 20 minutes on two cores, ``--quick`` 2 to 3.

Compiles go to a fresh Triton cache, so compile seconds are real compiles.
TRITON_INTERPRET=1 (which replaces the kernels by interpreted ones) is removed from the
environment of the compile workers.
"""
import argparse
import csv
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, fields
from pathlib import Path

ARCHS = (80, 90)
HEAD_DIMS = (64, 128, 256)
DTYPES = ("fp16", "bf16")
# "varlen": no position spec, a packed batch (attention_varlen's layout: B sequences of N rows)
SPECS = ("none", "rope", "xpos", "angles", "alibi", "relative", "t5", "manhattan", "urpe", "kernelized", "varlen",
         "decode")
KERNELS = ("fwd", "pre", "dkdv", "dq")
# kernelized attention's kernels, in launch order (spec "kernelized"); none uses tensor cores
KZ_KERNELS = ("prf_q", "prf_kmax", "prf_k", "prf_bwd", "outer", "contract_f", "contract_e")
# KV-cache decoding's kernels, in launch order (spec "decode")
DECODE_KERNELS = ("append", "decode", "combine")
NO_MMA = ("pre", *KZ_KERNELS, "append", "combine")
# Shared memory per block that each target allows (opt-in maximum): sm_80 163 KB, sm_90 227 KB.
# The sm_80 tile table also serves sm_86 / sm_89 (99 KB), so the attention kernels are held to that.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
SM86_SHARED_LIMIT = 99 * 1024
# Main-loop targets (issue #14), checked by --check and tests/test_gpu_report.py: the attention
# kernels' main loops are software-pipelined (async copies or TMA in every one) for these specs,
# and the interior loop of the plain kernels issues at most this many SASS instructions per
# iteration, (kernel, arch, padded head dim) -> instructions (the FlashAttention-2 tutorial's
# forward: 522 at sm_90 D=64, 364 at D=128).
ATTENTION_KERNELS = ("fwd", "dkdv", "dq")
PIPELINED_SPECS = ("none", "rope", "varlen")  # "varlen": plain kernels on a packed batch (VARLEN)
# With POSATTN_TMA on (sm_90's default), these kernels' plain interior loops read K and V
# through TMA descriptors (UTMALDG); the dK/dV kernel keeps async copies (see
# triton_kernels/attention.py: _tma_descriptors).
TMA_KERNELS = ("fwd", "dq")
LOOP_TARGETS = {("fwd", 90, 64): 560, ("fwd", 90, 128): 400, ("dq", 90, 64): 320, ("dq", 90, 128): 420,
                ("dkdv", 90, 64): 380, ("dkdv", 90, 128): 520, ("fwd", 80, 64): 700, ("fwd", 80, 128): 530}
# The shapes the launches are recorded with: no size is 1 and every stride is a multiple of
# 16, so Triton specialises the arguments as it does for real training shapes.
B, H, N = 2, 4, 1024
_REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Case:
    arch: int
    head_dim: int
    dtype: str
    causal: bool
    spec: str
    kernel: str
    candidate: int = 0  # the i-th tile config autotuning may choose (0: the tile table's)

    @property
    def name(self):
        flags = "causal" if self.causal else "-"
        tiles = f" candidate {self.candidate}" if self.candidate else ""
        return f"{self.kernel} sm_{self.arch} D={self.head_dim} {self.dtype} {flags} {self.spec}{tiles}"


@dataclass
class Row:
    kernel: str
    arch: int
    head_dim: int
    dtype: str
    causal: bool
    spec: str
    candidate: int
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    shared_bytes: int
    shared_limit: int
    hmma: int
    hgmma: int
    # main loops (innermost SASS loops with tensor-core work): how many, the instructions per
    # iteration of the shortest (the interior loop) and the longest (the boundary loop), the
    # interior loop's MMA / EX2 / async-copy (LDGSTS) + TMA (UTMALDG) counts and, of those, its
    # TMA loads, and whether every main loop issues async copies or TMA (software-pipelined)
    loops: int
    loop_insts: int
    boundary_insts: int
    loop_mma: int
    loop_ex2: int
    loop_async: int
    loop_tma: int
    pipelined: bool
    compile_s: float

    @property
    def tensor_core(self):
        return self.hmma + self.hgmma


def tool(name):
    """A binary shipped in the Triton wheel (ptxas, cuobjdump, nvdisasm)."""
    import triton
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the Triton wheel ships {name}; reinstall triton "
                                f"(make install pins triton==3.9.0)")
    return str(path)


def _position_specs(spec, head_dim, device):
    """(rope, bias, urpe, grads) for a spec kind; grads = the parameter gradients a training
    step takes (learnable tables and angles; ALiBi slopes and RMT's decay stay fixed)."""
    import torch

    import posattn
    if spec in ("none", "varlen"):
        return None, None, None, (False, False, False)
    if spec == "rope":
        return posattn.RoPE(), None, None, (False, False, False)
    if spec == "xpos":
        return posattn.XPos(), None, None, (False, False, False)
    if spec == "angles":
        angles = torch.zeros(1, H, N, head_dim // 2, device=device)
        return posattn.RotaryAngles(angles), None, None, (True, False, False)
    if spec == "alibi":
        return None, posattn.ALiBi(posattn.alibi_slopes(H, device=device)), None, (False, False, False)
    if spec == "relative":
        return None, posattn.RelativeBias(torch.zeros(H, 257, device=device)), None, (False, True, False)
    if spec == "t5":
        return None, posattn.T5Bias(torch.zeros(H, 32, device=device)), None, (False, True, False)
    if spec == "manhattan":
        return None, posattn.ManhattanDecay(torch.full((H,), -0.1, device=device), 32), None, (False, False, False)
    if spec == "urpe":
        return None, None, posattn.URPE(torch.ones(H, 257, device=device)), (False, False, True)
    raise ValueError(f"spec={spec!r} is not a position-spec kind; choose one of {SPECS}")


def record_kernelized_launches(arch, head_dim, dtype):
    """{kernel name: (JITFunction, args, kwargs)} of kernelized attention's launchers on sm_<arch>."""
    import torch

    from posattn.kernelized import default_num_features
    from posattn.triton_kernels import attention, kernelized
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    m = default_num_features(head_dim)
    x = torch.empty(B, H, N, head_dim, dtype=torch_dtype)
    w = torch.empty(m, head_dim)
    phi = torch.empty(B, H, N, m)
    phi64, v64 = torch.empty(B, H, N, m, dtype=torch.float64), torch.empty(B, H, N, head_dim, dtype=torch.float64)
    with attention.capture_launches((arch // 10, arch % 10)) as launches:
        kernelized.kz_prf(x, w, True)
        kernelized.kz_prf(x, w, False)
        kernelized.kz_prf_bwd(phi, phi, x, w)
        cols = kernelized.kz_outer(phi64, v64, 0, 1, True, 2 * N)  # one feature, as the FFT pieces take them
        kernelized.kz_contract_f(phi64, cols, 0, 1)
        kernelized.kz_contract_e(cols, v64, 1)
    return {name: (kernel, args, kwargs) for name, (kernel, _grid, args, kwargs) in zip(KZ_KERNELS, launches)}


# A decoding step: DECODE_B sequences, one query each, DECODE_HKV KV heads of 4 query heads,
# room for N keys per sequence in pages of DECODE_PAGE rows, DECODE_SPLITS splits.
DECODE_B, DECODE_HKV, DECODE_PAGE, DECODE_SPLITS = 8, 8, 16, 4


def record_decode_launches(arch, head_dim, dtype, causal):
    """{kernel name: (JITFunction, args, kwargs)} of kvcache_fwd (append, decode, combine) on sm_<arch>."""
    import torch

    import posattn
    from posattn.positions import kernel_positions
    from posattn.triton_kernels import attention, decode
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    pages = N // DECODE_PAGE
    q = torch.empty(DECODE_B, 4 * DECODE_HKV, 1, head_dim, dtype=torch_dtype)
    k_cache, v_cache = (torch.empty(DECODE_B * pages, DECODE_HKV, DECODE_PAGE, head_dim, dtype=torch_dtype)
                        for _ in range(2))
    k, v = (torch.empty(DECODE_B, DECODE_HKV, 1, head_dim, dtype=torch_dtype) for _ in range(2))
    seqlens = torch.zeros(DECODE_B, dtype=torch.int32)
    table = torch.zeros(DECODE_B, pages, dtype=torch.int32)
    kp = kernel_positions(posattn.RoPE(), None, None, q, k_cache, 0, 0)
    with attention.capture_launches((arch // 10, arch % 10)) as launches:
        decode.kvcache_fwd(q, k_cache, v_cache, k, v, seqlens, None, table, causal, None, None, head_dim ** -0.5, kp,
                           DECODE_SPLITS)
    return {name: (kernel, args, kwargs) for name, (kernel, _grid, args, kwargs) in zip(DECODE_KERNELS, launches)}


def record_launches(arch, head_dim, dtype, causal, spec, candidate=0):
    """{kernel name: (JITFunction, args, kwargs)} that attn_fwd / attn_bwd launch on sm_<arch>
    with their ``candidate``-th tile config (for spec "kernelized": kernelized attention's
    launchers)."""
    import torch

    from posattn.positions import kernel_positions
    from posattn.triton_kernels import attention
    if spec == "kernelized":
        return record_kernelized_launches(arch, head_dim, dtype)
    if spec == "decode":
        return record_decode_launches(arch, head_dim, dtype, causal)
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    q, k, v, do = (torch.empty(B, H, N, head_dim, dtype=torch_dtype) for _ in range(4))
    rope, bias, urpe, grads = _position_specs(spec, head_dim, q.device)
    kp = kernel_positions(rope, bias, urpe, q, k, 0, 0)
    scale = head_dim ** -0.5
    common = dict(attn_mask=None, q_pos=0, k_pos=0, causal=causal, window=None, softcap=None, dropout_p=0.0,
                  seed=0, scale=scale, kp=kp)
    if spec == "varlen":
        q, k, v, do = (torch.empty(B * N, H, head_dim, dtype=torch_dtype) for _ in range(4))
        cu = torch.arange(0, B * N + 1, N, dtype=torch.int32)
        common["varlen"] = (cu, cu)
    with attention.capture_launches((arch // 10, arch % 10), candidate) as launches:
        out, lse = attention.attn_fwd(q, k, v, **common)
        attention.attn_bwd(do, q, k, v, out, lse, None, mask_grad=False, grads=grads, **common)
    names = {attention._attn_fwd_kernel: "fwd", attention._attn_bwd_preprocess_kernel: "pre",
             attention._attn_bwd_dkdv_kernel: "dkdv", attention._attn_bwd_dq_kernel: "dq"}
    return {names[kernel]: (kernel, args, kwargs) for kernel, _grid, args, kwargs in launches}


def compile_launch(kernel, args, kwargs, arch):
    """triton.compile of one recorded launch for sm_<arch>, bound as JITFunction.run binds it
    (same signature, constexprs, specialisation attributes and options)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    if not isinstance(kernel, triton.runtime.jit.JITFunction):
        raise RuntimeError(f"{kernel!r} is not a JITFunction (TRITON_INTERPRET=1 is set?): the report needs the "
                           f"compiled kernels; run it without TRITON_INTERPRET")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_MMA = ("HMMA", "HGMMA")
_ASYNC = ("LDGSTS", "UTMALDG")


def sass_instructions(sass):
    """[(address, opcode with modifiers, operands)] of a ``cuobjdump -sass`` listing."""
    return [(int(m.group(1), 16), m.group(3), m.group(4)) for m in _SASS_LINE.finditer(sass)]


def main_loops(instructions):
    """The main loops of one kernel: [(first, last) instruction index] of every innermost loop
    with tensor-core work. A loop is a backward branch and the code it jumps back over (one
    per target, its last back-edge); a loop is not innermost when it contains another loop
    with tensor-core work (the dK/dV kernel's loop over the heads of a KV group). A jump back
    over an EXIT is no loop: it returns from an out-of-line slow path (after BRA.DIV)."""
    index = {addr: i for i, (addr, _, _) in enumerate(instructions)}
    spans = {}
    for i, (addr, op, operands) in enumerate(instructions):
        m = re.search(r"(0x[0-9a-f]+)\s*$", operands)
        if op.split(".")[0] == "BRA" and m and int(m.group(1), 16) < addr and int(m.group(1), 16) in index:
            first = index[int(m.group(1), 16)]
            if not any(instructions[j][1] == "EXIT" for j in range(first, i)):
                spans[first] = max(spans.get(first, i), i)
    with_mma = [(a, b) for a, b in spans.items()
                if any(instructions[j][1].split(".")[0] in _MMA for j in range(a, b + 1))]
    return sorted((a, b) for a, b in with_mma
                  if not any((c, d) != (a, b) and a <= c and d <= b for c, d in with_mma))


def loop_stats(instructions):
    """Per main loop: instructions per iteration, MMA, EX2 and async-copy / TMA instructions."""
    out = []
    for a, b in main_loops(instructions):
        ops = [op for _, op, _ in instructions[a:b + 1] if op != "NOP"]
        base = [op.split(".")[0] for op in ops]
        out.append(dict(insts=len(ops), mma=sum(o in _MMA for o in base), ex2=sum(o == "MUFU.EX2" for o in ops),
                        async_=sum(o in _ASYNC for o in base), tma=base.count("UTMALDG")))
    return out


def sass_stats(cubin):
    """Registers, stack bytes, STL / LDL / HMMA / HGMMA counts of a cubin (via cuobjdump), and
    its main loops (see :func:`main_loops`)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    fields_ = {key: re.search(rf"\b{key}:(\d+)", usage) for key in ("REG", "STACK", "LOCAL")}
    if not all(fields_.values()):
        raise RuntimeError(f"cuobjdump --dump-resource-usage printed no REG / STACK / LOCAL fields:\n{usage}")
    value = {key: int(m.group(1)) for key, m in fields_.items()}
    instructions = sass_instructions(sass)
    count = {op: 0 for op in ("STL", "LDL", "HMMA", "HGMMA")}
    for _, op, _ in instructions:
        op = op.split(".")[0]
        if op in count:
            count[op] += 1
    loops = loop_stats(instructions)
    inner = min(loops, key=lambda lp: lp["insts"], default=dict(insts=0, mma=0, ex2=0, async_=0, tma=0))
    # Spilled registers live in the per-thread stack frame (local memory).
    return dict(registers=value["REG"], stack_bytes=value["STACK"] + value["LOCAL"], spill_stores=count["STL"],
                spill_loads=count["LDL"], hmma=count["HMMA"], hgmma=count["HGMMA"], loops=len(loops),
                loop_insts=inner["insts"], boundary_insts=max((lp["insts"] for lp in loops), default=0),
                loop_mma=inner["mma"], loop_ex2=inner["ex2"], loop_async=inner["async_"],
                loop_tma=inner["tma"], pipelined=bool(loops) and all(lp["async_"] > 0 for lp in loops))


def run_case(case: Case) -> Row:
    """Record, compile and measure one kernel of one configuration (runs in a worker)."""
    kernel, args, kwargs = record_launches(case.arch, case.head_dim, case.dtype, case.causal, case.spec,
                                           case.candidate)[case.kernel]
    start = time.perf_counter()
    compiled = compile_launch(kernel, args, kwargs, case.arch)
    seconds = time.perf_counter() - start
    stats = sass_stats(compiled.asm["cubin"])
    # kernelized attention's kernels tile rows and features (BLOCK_R, BLOCK_F) where attention tiles M and N;
    # decoding's append and combine kernels tile new rows (BLOCK_L) and splits (BLOCK_S)
    tiles = dict(block_m=kwargs.get("BLOCK_M", kwargs.get("BLOCK_R", kwargs.get("BLOCK_L", kwargs.get("BLOCK_S")))),
                 block_n=kwargs.get("BLOCK_N", kwargs.get("BLOCK_F", 0)),
                 num_warps=kwargs.get("num_warps", 4), num_stages=kwargs.get("num_stages", 3))
    return Row(**asdict(case), **tiles, **stats, shared_bytes=compiled.metadata.shared,
               shared_limit=SHARED_LIMIT[case.arch], compile_s=round(seconds, 1))


def cases(archs, head_dims, dtypes, causals, specs, kernels):
    """Every requested case; the preprocess kernel (no positions, no mask) once per arch, D and dtype,
    and kernelized attention's kernels and decoding's append and merge kernels (no causal flag) once as well."""
    out = []
    for arch in archs:
        for d in head_dims:
            for dtype in dtypes:
                if "pre" in kernels:
                    out.append(Case(arch, d, dtype, False, "none", "pre"))
                if "kernelized" in specs:
                    out.extend(Case(arch, d, dtype, False, "kernelized", kernel) for kernel in KZ_KERNELS)
                if "decode" in specs:  # the append and merge kernels know nothing of causality
                    out.extend(Case(arch, d, dtype, False, "decode", kernel) for kernel in ("append", "combine"))
                for causal in causals:
                    for spec in specs:
                        if spec == "decode":
                            out.append(Case(arch, d, dtype, causal, spec, "decode"))
                        elif spec != "kernelized":
                            out.extend(Case(arch, d, dtype, causal, spec, kernel) for kernel in kernels
                                       if kernel != "pre")
    return out


def candidate_cases(todo):
    """The alternative tile configs autotuning may choose (``_config.tile_candidates``) for
    the plain attention kernels among ``todo``: one case per candidate after the first."""
    from posattn import _config
    out = []
    for case in todo:
        if case.spec != "none" or case.kernel not in ATTENTION_KERNELS or case.candidate:
            continue
        n = len(_config.tile_candidates(case.kernel, case.head_dim, False, capability=(case.arch // 10, case.arch % 10),
                                        dtype=case.dtype, flags=("causal",) if case.causal else (), plain=True))
        out.extend(Case(**{**asdict(case), "candidate": i}) for i in range(1, n))
    return out


def _worker_init(cache_dir, env):
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir  # fresh unless the caller keeps one: real compile seconds
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    os.environ.update(env)


def measure(todo, jobs=2, progress=print, env=None, cache_dir=None):
    """Rows for the cases, in the order of ``todo``, compiled in ``jobs`` fresh worker
    processes whose environment lacks TRITON_INTERPRET (Triton reads it at import) and has
    ``env`` added (e.g. POSATTN_AUTOTUNE="0"). Callable from a process that runs the
    interpreter, such as the test suite on a machine without a GPU. ``cache_dir``: a Triton
    cache kept between runs (the tests': kernels whose source and options did not change are
    not compiled again; compile seconds are then cache hits); default a fresh one."""
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="posattn-aot-") as fresh_dir, \
            ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init,
                                initargs=(str(cache_dir or fresh_dir), env or {})) as pool:
        futures = {pool.submit(run_case, case): case for case in todo}
        for i, future in enumerate(as_completed(futures), 1):
            case = futures[future]
            row = rows[case] = future.result()
            progress(f"[{i}/{len(todo)}] {case.name}: {row.registers} regs, {row.spill_stores}/{row.spill_loads} "
                     f"STL/LDL, {row.shared_bytes} B shared, {row.tensor_core} MMA, {row.compile_s} s")
    return [rows[case] for case in todo]


_COLUMNS = (("kernel", "kernel", "{}"), ("arch", "arch", "sm_{}"), ("head_dim", "D", "{}"), ("dtype", "dtype", "{}"),
            ("causal", "causal", "{:d}"), ("spec", "spec", "{}"), ("candidate", "cand", "{}"), ("block_m", "BM", "{}"), ("block_n", "BN", "{}"),
            ("num_warps", "warps", "{}"), ("num_stages", "stages", "{}"), ("registers", "regs", "{}"),
            ("spill_stores", "STL", "{}"), ("spill_loads", "LDL", "{}"), ("stack_bytes", "stack", "{}"),
            ("shared_bytes", "smem", "{}"), ("hmma", "HMMA", "{}"), ("hgmma", "HGMMA", "{}"), ("loops", "loops", "{}"),
            ("loop_insts", "insts/it", "{}"), ("boundary_insts", "bnd/it", "{}"), ("loop_mma", "MMA/it", "{}"),
            ("loop_ex2", "EX2/it", "{}"), ("loop_async", "async/it", "{}"), ("loop_tma", "TMA/it", "{}"),
            ("pipelined", "pipelined", "{:d}"),
            ("compile_s", "s", "{}"))


def table(rows):
    """A fixed-width text table (also the README's)."""
    cells = [[head for _, head, _ in _COLUMNS]]
    cells += [[fmt.format(getattr(row, key)) for key, _, fmt in _COLUMNS] for row in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(_COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells)


def _git_sha():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_csv(rows, path):
    import torch
    import triton

    import posattn
    context = dict(machine=f"{platform.node()} {platform.machine()} (AOT, no GPU)", git_sha=_git_sha(),
                   posattn=posattn.__version__, triton=triton.__version__, torch=torch.__version__)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [f.name for f in fields(Row)] + list(context)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        for row in rows:
            writer.writerow({**asdict(row), **context})


def tma_on():
    """Whether the launchers give sm_90 kernels TMA descriptors (POSATTN_TMA, this Triton)."""
    from posattn import _config
    from posattn.triton_kernels import _compat
    return _compat.host_tensor_descriptor() is not None and _config.tma((9, 0), False)


def problems(row, loops=True):
    """What the acceptance rule says about one row: no spills, shared memory within the
    target (sm_80's attention kernels: within sm_86's 99 KB), tensor cores in every kernel
    that multiplies tiles (all but NO_MMA's) and, with ``loops``, pipelined main loops
    (PIPELINED_SPECS), the interior-loop instruction targets (LOOP_TARGETS, for the tile
    tables' configs: an autotuning candidate may take more instructions for fewer scores) and TMA loads in
    the sm_90 interior loops of TMA_KERNELS (plain kernels, when :func:`tma_on`)."""
    out = []
    if loops and row.kernel in ATTENTION_KERNELS and row.spec in PIPELINED_SPECS and not row.pipelined:
        out.append(f"main loops not software-pipelined (no LDGSTS / UTMALDG in one of its {row.loops} loops)")
    target = LOOP_TARGETS.get((row.kernel, row.arch, row.head_dim))
    if loops and target is not None and row.spec in ("none", "varlen") and not row.candidate and row.loop_insts > target:
        out.append(f"interior loop {row.loop_insts} instructions per iteration > target {target}")
    if loops and row.kernel in TMA_KERNELS and row.arch >= 90 and row.spec == "none" and not row.loop_tma and tma_on():
        out.append("interior loop reads K / V without TMA (POSATTN_TMA is on for sm_90)")
    if row.arch == 80 and row.kernel in (*ATTENTION_KERNELS, "decode") and row.shared_bytes > SM86_SHARED_LIMIT:
        out.append(f"{row.shared_bytes} B shared > {SM86_SHARED_LIMIT} (sm_86 / sm_89 run the sm_80 tiles)")
    if row.spill_stores or row.spill_loads or row.stack_bytes:
        out.append(f"spills ({row.spill_stores} STL, {row.spill_loads} LDL, {row.stack_bytes} B stack)")
    if row.shared_bytes > row.shared_limit:
        out.append(f"{row.shared_bytes} B shared > {row.shared_limit}")
    if row.kernel not in NO_MMA and row.tensor_core == 0:
        out.append("no tensor-core instructions")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--head-dim", type=int, nargs="+", default=list(HEAD_DIMS))
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--causal", type=int, nargs="+", default=[0, 1], choices=(0, 1))
    parser.add_argument("--spec", nargs="+", default=list(SPECS), choices=SPECS)
    parser.add_argument("--kernel", nargs="+", default=list(KERNELS), choices=KERNELS)
    parser.add_argument("--quick", action="store_true",
                        help="the main configs only: D 64 and 128, no position spec, RoPE and kernelized attention "
                             "(overrides --head-dim, --spec)")
    parser.add_argument("--candidates", action="store_true",
                        help="also compile the alternative tiles that autotuning may choose for the plain kernels")
    parser.add_argument("--jobs", type=int, default=2, choices=(1, 2), help="compile worker processes (default 2)")
    parser.add_argument("--out", default=str(_REPO / "bench" / "results" / "gpu_report.csv"))
    parser.add_argument("--check", action="store_true",
                        help="exit with status 1 if a kernel spills, overflows shared memory, lacks tensor cores, has a "
                             "main loop that is not pipelined or misses its interior-loop target")
    args = parser.parse_args(argv)
    for d in args.head_dim:
        if not 1 <= d <= 256:
            parser.error(f"--head-dim {d}: the Triton kernels take head dims 1 to 256 (larger ones run on "
                         f"backend='reference')")
    head_dims, specs = ((64, 128), ("none", "rope", "kernelized")) if args.quick else (args.head_dim, args.spec)
    todo = cases(args.arch, head_dims, args.dtype, [bool(c) for c in args.causal], specs, args.kernel)
    if args.candidates:
        todo += candidate_cases(todo)
    print(f"compiling {len(todo)} kernels for {', '.join(f'sm_{a}' for a in args.arch)} "
          f"with {args.jobs} worker(s)", flush=True)
    rows = measure(todo, args.jobs, progress=lambda line: print(line, flush=True))
    print(table(rows))
    write_csv(rows, args.out)
    print(f"wrote {args.out}")
    bad = [(row, p) for row in rows if (p := problems(row))]
    for row, p in bad:
        tiles = f" candidate {row.candidate}" if row.candidate else ""
        print(f"{row.kernel} sm_{row.arch} D={row.head_dim} {row.dtype} causal={row.causal:d} {row.spec}{tiles}: "
              f"{'; '.join(p)}")
    if args.check and bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
