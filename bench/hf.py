"""posattn inside Hugging Face transformers models (``python -m bench.hf``; ``make demo`` runs it).

1. A tiny Llama (random init, fixed seed) trained for 50 AdamW steps on a synthetic next-token rule with
   ``attn_implementation="sdpa"``, ``"posattn"`` and ``"posattn"`` + ``fuse_positions``: the loss
   curves (PNG), training tokens/s (median step) and the peak memory of the training steps.
2. A T5 encoder-decoder at sequence length L: forward + backward of the whole model with stock
   ``"sdpa"`` (T5's dense (1, H, L, L) position bias, which needs a gradient, so SDPA takes its math
   path) against ``fuse_positions`` (the bias inside the kernel): median time and peak memory.

Timing: the implementations run in lockstep in one subprocess (``python -m bench.hf --child
llama-time all``), their order rotating, so that a busy machine slows them alike; the ratios are
within that run. Peak memory: each implementation in its own subprocess (``--child llama-memory
IMPL``): on CPU the resident-set high-water mark (VmHWM), reset after the
warm-up where the kernel allows (``/proc/self/clear_refs``), minus the resident set before the
measured steps (the model, its optimizer state and the inputs). The loss curves go to
bench/results/hf_llama_loss.png (``--out DIR`` elsewhere).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from ._common import ROOT, machine, reset_hwm, status_kib

IMPLS = ("sdpa", "posattn", "posattn+fused")
T5_IMPLS = ("sdpa", "posattn+fused")
MEMORY_STEPS = 3
LLAMA = dict(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024)
LLAMA_BATCH, LLAMA_LEN, LLAMA_STEPS = 4, 256, 50
T5 = dict(vocab_size=256, d_model=256, d_kv=32, d_ff=512, num_layers=2, num_decoder_layers=2, num_heads=8,
          relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0,
          decoder_start_token_id=0, pad_token_id=0)
T5_LEN, T5_REPS = 2048, 2
CHILD_TIMEOUT_S = 600


def _model(kind, impl):
    import transformers

    from posattn.integrations.transformers import fuse_positions, register
    register()
    torch.manual_seed(0)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    else:
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(**T5))
    model.set_attn_implementation(impl.split("+")[0])
    if impl.endswith("+fused"):
        fuse_positions(model)
    return model


def _task_batch(gen):
    """Token t+1 = PERM[token t] from a random start: a rule the model learns within the 50 steps."""
    perm = torch.randperm(LLAMA["vocab_size"], generator=torch.Generator().manual_seed(7))
    ids = torch.empty(LLAMA_BATCH, LLAMA_LEN, dtype=torch.long)
    ids[:, 0] = torch.randint(0, LLAMA["vocab_size"], (LLAMA_BATCH,), generator=gen)
    for t in range(1, LLAMA_LEN):
        ids[:, t] = perm[ids[:, t - 1]]
    return ids


def _llama_step(model, opt, ids):
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def _llama(impl):
    model = _model("llama", impl).train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def llama_time(impls=IMPLS):
    """The implementations trained in lockstep in one process (the same batch for each, their
    order rotating every step), so that a busy machine slows them alike: losses and median step."""
    runs = {impl: _llama(impl) for impl in impls}
    gen = torch.Generator().manual_seed(1)
    losses = {impl: [] for impl in impls}
    times = {impl: [] for impl in impls}
    for step in range(LLAMA_STEPS):
        ids = _task_batch(gen)
        for impl in impls[step % len(impls):] + impls[:step % len(impls)]:
            t0 = time.perf_counter()
            losses[impl].append(_llama_step(*runs[impl], ids))
            times[impl].append(time.perf_counter() - t0)
    med = {impl: statistics.median(t[1:]) for impl, t in times.items()}
    return {impl: dict(losses=losses[impl], step_ms=1e3 * med[impl], tokens_per_s=LLAMA_BATCH * LLAMA_LEN / med[impl])
            for impl in impls}


def llama_memory(impl):
    """Peak memory of training steps of one implementation, above the model and its optimizer state."""
    model, opt = _llama(impl)
    gen = torch.Generator().manual_seed(1)
    _llama_step(model, opt, _task_batch(gen))  # the optimizer state exists from here on
    reset = reset_hwm()
    base = status_kib("VmRSS")
    for _ in range(MEMORY_STEPS):
        _llama_step(model, opt, _task_batch(gen))
    return dict(peak_mib=(status_kib("VmHWM") - base) / 1024, peak_reset=reset)


def _t5(impl):
    model = _model("t5", impl).train()
    gen = torch.Generator().manual_seed(1)
    src = torch.randint(1, T5["vocab_size"], (1, T5_LEN), generator=gen)
    tgt = torch.randint(1, T5["vocab_size"], (1, T5_LEN), generator=gen)

    def step():
        model(input_ids=src, decoder_input_ids=tgt, labels=tgt, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=False)

    step()  # warm-up; the gradients' storage exists from here on
    return step


def t5_time(impls=T5_IMPLS):
    """Forward + backward of each implementation, alternating in one process: median."""
    steps = {impl: _t5(impl) for impl in impls}
    times = {impl: [] for impl in impls}
    for _ in range(T5_REPS):
        for impl in impls:
            t0 = time.perf_counter()
            steps[impl]()
            times[impl].append(time.perf_counter() - t0)
    return {impl: dict(step_ms=1e3 * statistics.median(t)) for impl, t in times.items()}


def t5_memory(impl):
    step = _t5(impl)
    reset = reset_hwm()
    base = status_kib("VmRSS")
    step()
    return dict(peak_mib=(status_kib("VmHWM") - base) / 1024, peak_reset=reset)


JOBS = {"llama-time": llama_time, "llama-memory": llama_memory, "t5-time": t5_time, "t5-memory": t5_memory}


def child(job, impl):
    result = JOBS[job]() if impl == "all" else JOBS[job](impl)
    print(json.dumps(result), flush=True)


def _run_child(job, impl):
    cmd = [sys.executable, "-m", "bench.hf", "--child", job, impl]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return None, f"took longer than {CHILD_TIMEOUT_S} s"
    if proc.returncode != 0:
        return None, proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), None


def _measure(model, impls):
    """{impl: timing + peak_mib}: the timing child (all implementations), then a memory child each."""
    rows, err = _run_child(f"{model}-time", "all")
    if err:
        print(f"  failed: {err}")
        return None
    for impl in impls:
        mem, err = _run_child(f"{model}-memory", impl)
        rows[impl]["peak_mib"] = mem["peak_mib"] if mem else float("nan")
        if err:
            print(f"  {impl} memory: failed: {err}")
    return rows


def _plot(curves, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for impl, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=impl, linestyle="--" if "posattn" in impl else "-")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"tiny Llama, next-token rule, B={LLAMA_BATCH} L={LLAMA_LEN}, same seed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def print_section(out_dir):
    print("\n== Hugging Face transformers: posattn inside real models (tiny random-init models, fp32 on CPU)")
    try:
        import transformers
    except ImportError:
        print("transformers is not installed (pip install posattn[hf]): section skipped")
        return
    from posattn import ops
    if not ops.cpu_available():
        print(f"the C++ CPU backend is not available ({ops._C_ERROR}): section skipped")
        return
    print(f"transformers {transformers.__version__}; {machine()[0]}, {torch.get_num_threads()} threads; "
          f"peak = resident-set high-water mark above the resident set before "
          f"the measured steps")
    cfg = LLAMA
    print(f"\n1. Llama ({cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, {cfg['num_attention_heads']} "
          f"heads / {cfg['num_key_value_heads']} KV heads), {LLAMA_STEPS} AdamW steps, batch {LLAMA_BATCH} x "
          f"{LLAMA_LEN} tokens, same seed and batches; trained in lockstep in one process (timing), peak memory "
          f"of {MEMORY_STEPS} steps in a process each")
    timed = _measure("llama", IMPLS)
    if timed is None:
        return
    ref = timed["sdpa"]
    print(f"  {'attn_implementation':<22} {'tokens/s':>9} {'step ms':>8} {'vs sdpa':>8} {'peak MiB':>9} "
          f"{'loss@1':>7} {'loss@50':>8} {'max |Δloss| vs sdpa':>20}")
    for impl, r in timed.items():
        diff = max(abs(a - b) for a, b in zip(r["losses"], ref["losses"]))
        print(f"  {impl:<22} {r['tokens_per_s']:9.0f} {r['step_ms']:8.1f} {r['step_ms'] / ref['step_ms']:7.2f}x "
              f"{r['peak_mib']:9.0f} {r['losses'][0]:7.3f} {r['losses'][-1]:8.3f} {diff:20.2e}")
    png = _plot({k: v["losses"] for k, v in timed.items()}, os.path.join(out_dir, "hf_llama_loss.png"))
    if png:
        print(f"  loss curves: {png}")
    c = T5
    print(f"\n2. T5 ({c['num_layers']}+{c['num_decoder_layers']} layers, d_model {c['d_model']}, {c['num_heads']} "
          f"heads), encoder and decoder L={T5_LEN}, batch 1: forward + backward of the whole model (loss.backward), "
          f"median of {T5_REPS}, the two alternating in one process")
    rows = _measure("t5", T5_IMPLS)
    if rows is None:
        return
    ref = rows["sdpa"]
    print(f"  {'attn_implementation':<22} {'fwd+bwd ms':>11} {'vs sdpa':>8} {'peak MiB':>9} {'vs sdpa':>8}")
    for impl, r in rows.items():
        print(f"  {impl:<22} {r['step_ms']:11.0f} {r['step_ms'] / ref['step_ms']:7.2f}x {r['peak_mib']:9.0f} "
              f"{r['peak_mib'] / ref['peak_mib']:7.2f}x")

def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.hf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", nargs=2, metavar=("JOB", "IMPL"),
                        help="run one job (llama-time|llama-memory|t5-time|t5-memory) for IMPL (sdpa|posattn|"
                             "posattn+fused, or all for the *-time jobs), print it as JSON")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="where the PNG goes")
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
    else:
        os.makedirs(args.out, exist_ok=True)
        print_section(args.out)


if __name__ == "__main__":
    main()
