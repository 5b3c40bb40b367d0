"""``python -m bench --only ring``: sequence parallelism on one machine.

    python -m bench --only ring [--sizes 8192,16384] [--world 2] [--reps 3] [--modes fwd,fwd+bwd]

Providers, each in its own spawned processes on the same inputs (causal, RoPE, B=1, H=8, D=64,
float32 unless --dtype):

* ``single``: one process with W threads, ``posattn.attention`` on the whole sequence;
* ``ring``: W gloo processes with one thread each, ``posattn.distributed.ring_attention``
  (zigzag); ``ring-compute``: the same kernel calls with every transfer left out (each rank
  reuses its own block), ``ring-comm``: the same transfers with no kernel, so
  hidden = (compute + comm − ring) / comm is the fraction of the communication that the ring
  hides behind its kernels;
* ``ulysses``: W gloo processes, ``posattn.distributed.ulysses_attention``.

Time: the median over reps of the slowest rank (the ranks start each rep together). Peak
memory: per rank, the RSS high-water mark over the timed calls (reset after a warm-up call)
minus the RSS before the inputs were made, so the inputs (the whole sequence for ``single``,
a shard for the others; each rank builds the full inputs and keeps its shard), outputs,
gradients, transfer buffers and kernel scratch all count; glibc returns freed memory at once
(MALLOC_MMAP_THRESHOLD_). The table goes to stdout, CSV rows to bench/results/ring.csv.
"""
import argparse
import datetime
import os
import pathlib
import statistics
import tempfile
import time

import torch

from . import harness as H
from ._common import reset_hwm, status_kib

PROVIDERS = ("single", "ring", "ring-compute", "ring-comm", "ulysses")


def _inputs(n, dtype, heads, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, n, dim, generator=g).to(dtype) for _ in range(4)]   # q, k, v, dout


def _no_exchange(self, tensors, tag):
    return list(tensors), []


def _comm_only(ring_cls):
    """A ring with no kernel calls: the same transfers, sizes and order."""
    class CommOnly(ring_cls):
        def plan(self, src):
            return []
    return CommOnly


def _rank(rank, world, provider, n, mode, dtype, heads, dim, reps, init, out):
    torch.set_num_threads(world if provider == "single" else 1)
    import posattn
    from posattn import distributed as sp
    if provider != "single":
        torch.distributed.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                                             timeout=datetime.timedelta(seconds=600))
    before = status_kib("VmRSS")             # the inputs, the shards and the results count
    q, k, v, dout = _inputs(n, dtype, heads, dim)
    rope = posattn.RoPE()
    if provider == "single":
        def call(q, k, v):
            return posattn.attention(q, k, v, causal=True, rope=rope)
    else:
        q, k, v, dout = (sp.shard(t) for t in (q, k, v, dout))
        if provider == "ring-compute":
            sp._Ring.exchange = _no_exchange
        if provider == "ring-comm":
            sp._Ring = _comm_only(sp._Ring)
        fn = sp.ulysses_attention if provider == "ulysses" else sp.ring_attention

        def call(q, k, v):
            return fn(q, k, v, causal=True, rope=rope)
    leaves = [t.clone().requires_grad_(mode == "fwd+bwd") for t in (q, k, v)]

    def step():
        o = call(*leaves)
        if mode == "fwd+bwd":
            o.backward(dout)

    def barrier():
        if provider != "single":
            torch.distributed.barrier()

    step()                                   # warm-up
    reset_hwm()
    times = []
    for _ in range(reps):
        barrier()
        t0 = time.perf_counter()
        step()
        dt = torch.tensor(time.perf_counter() - t0, dtype=torch.float64)
        if provider != "single":
            torch.distributed.all_reduce(dt, op=torch.distributed.ReduceOp.MAX)
        times.append(float(dt))
    peak = (status_kib("VmHWM") - before) / 1024
    pathlib.Path(out, f"{rank}.txt").write_text(f"{statistics.median(times)} {peak}")
    if provider != "single":
        torch.distributed.destroy_process_group()


def run_one(provider, n, mode, world, dtype, heads, dim, reps):
    """(median seconds, largest per-rank peak MiB) of one provider in fresh processes."""
    import torch.multiprocessing as mp
    os.environ.update(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")   # read by the children
    with tempfile.TemporaryDirectory() as tmp:
        procs = 1 if provider == "single" else world
        mp.start_processes(_rank, args=(world, provider, n, mode, dtype, heads, dim, reps, f"{tmp}/init", tmp),
                           nprocs=procs, join=True, start_method="spawn")
        rows = [pathlib.Path(tmp, f"{r}.txt").read_text().split() for r in range(procs)]
    return float(rows[0][0]), max(float(r[1]) for r in rows)


def paper_estimate(n, world, heads=32, kv_heads=8, dim=128, bytes_per=2, link_gbs=450.0, tflops=400.0):
    """Bytes moved per ring step vs one block's kernel time on H100s linked by NVLink (the
    numbers in the arguments: Llama-3-8B-like heads, bf16, ~450 GB/s per direction, ~400 TFLOP/s
    dense bf16 attention throughput): the ring hides its transfers when the ratio is < 1."""
    rows = n // world
    step_bytes = 2 * kv_heads * rows * dim * bytes_per
    step_flops = 4 * heads * rows * rows * dim
    comm_s, kernel_s = step_bytes / (link_gbs * 1e9), step_flops / (tflops * 1e12)
    return step_bytes, comm_s, kernel_s


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench --only ring", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8192,16384", help="global sequence lengths N")
    parser.add_argument("--world", type=int, default=2, help="ranks W (default 2: one per core here)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--modes", default="fwd,fwd+bwd")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--csv", default=str(H.RESULTS / "ring.csv"))
    args = parser.parse_args(argv)
    providers = args.providers.split(",")
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        parser.error(f"unknown provider(s) {unknown}; choose from {list(PROVIDERS)}")
    dtype = getattr(torch, args.dtype)
    info = H.meta()
    print(f"machine: {info['machine']} ({info['cores']} logical cores); torch {info['torch']}; W={args.world}; "
          f"causal RoPE, B=1, H={args.heads}, D={args.head_dim}, {args.dtype}; {args.reps} reps, median of the "
          f"slowest rank")
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        for mode in args.modes.split(","):
            got = {}
            for p in providers:
                t, peak = run_one(p, n, mode, args.world, dtype, args.heads, args.head_dim, args.reps)
                got[p] = (t, peak)
                print(f"  N={n:6d} {mode:8s} {p:13s} {t * 1e3:10.1f} ms   peak/rank {peak:8.1f} MiB", flush=True)
            hidden = None
            if all(p in got for p in ("ring", "ring-compute", "ring-comm")):
                comm = got["ring-comm"][0]
                hidden = max(0.0, min(1.0, (got["ring-compute"][0] + comm - got["ring"][0]) / comm)) if comm else None
                print(f"  N={n:6d} {mode:8s} communication hidden: {hidden:.2f} (comm alone "
                      f"{comm * 1e3:.1f} ms)")
            for p, (t, peak) in got.items():
                ratio = got["single"][0] / t if "single" in got else None
                rows.append(dict(run_id=info["run_id"], op="ring", mode=mode, provider=p, world=args.world, N=n,
                                 H=args.heads, D=args.head_dim, dtype=args.dtype, median_ms=H.fmt(t, 1e3),
                                 speedup_vs_single=H.fmt(ratio), peak_mib_per_rank=H.fmt(peak),
                                 comm_hidden=H.fmt(hidden) if p == "ring" else "",
                                 **{k: info[k] for k in ("machine", "cores", "torch", "posattn", "git_sha")}))
    print("paper (multi-GPU, per ring step, Llama-3-8B-like heads, bf16, NVLink ~450 GB/s, ~400 TFLOP/s):")
    for n in (8192, 32768, 131072):
        b, c, k = paper_estimate(n, 8)
        print(f"  N={n:6d} W=8: {b / 2**20:7.1f} MiB per step, transfer {c * 1e3:6.3f} ms vs kernel "
              f"{k * 1e3:6.3f} ms ({'hidden' if c < k else 'exposed'})")
    if rows:
        print(f"CSV: {H.write_csv(args.csv, rows)}")
