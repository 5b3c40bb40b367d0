"""Sequence parallelism on ``torch.distributed``: ring and Ulysses attention.

Each rank of a process group holds a shard of the sequence along dim 2 (``shard`` cuts it,
``unshard`` puts it back). The global position of every local row follows from the layout, and
positions are all the kernels need: causal masks, windows and every position encoding (RoPE and
its scalings, xPos, ALiBi, T5 buckets, RelativeBias, URPE, 2-D decay) are functions of
``(q_pos, k_pos)``, so each (query shard, key block) pair is computed exactly by
:func:`posattn.attention`'s kernels when the block's global positions travel with it.

Layouts (N the global length, W the group size):

- ``"contiguous"``: rank r holds rows ``[r·N/W, (r+1)·N/W)``;
- ``"zigzag"``: of 2W equal chunks, rank r holds chunks r and 2W−1−r, in that order (balances
  causal work: every rank holds an early and a late chunk).

:func:`ring_attention` passes K/V blocks round the ring (``batch_isend_irecv``; the next block's
transfer overlaps the current block's kernel), merges the partial (out, lse) in fp32, skips
(query chunk, key chunk) pairs that causality or the window leave empty, and computes the
backward as a second ring: each block is recomputed with the final lse, dQ stays local and the
fp32 dK/dV accumulators travel on with the blocks back to their owners.
:func:`ulysses_attention` swaps the sequence split for a head split with two all-to-alls and runs
full-sequence attention on ``H/W`` heads.

Gradients of spec tensors (ALiBi slopes, bias / URPE tables, decay rates) are per-rank partial
sums: their sum over the group is the single-process gradient, like every other weight of a
sequence-parallel layer (all-reduce them with the rest of the gradients). Nothing here creates a
process group: ``group=None`` is the default group, which the caller initialises.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist

from . import ops
from ._checks import check_attention_inputs
from .functional import attention, select_backend
from .positions import ALiBi, ManhattanDecay, RoPE, RotaryAngles, check_specs, kernel_positions

__all__ = ["LAYOUTS", "ring_attention", "shard", "shard_positions", "ulysses_attention", "unshard"]

LAYOUTS = ("contiguous", "zigzag")


# --------------------------------------------------------------------------------------------------
# groups, layouts, positions
# --------------------------------------------------------------------------------------------------

def _group(group, what):
    """(world size, rank) of ``group``; a clear error when there is no process group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"posattn.distributed.{what} needs an initialised process group; call "
                           f"torch.distributed.init_process_group(...) first (posattn never creates one)")
    return dist.get_world_size(group), dist.get_rank(group)


def _check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not a sequence layout; choose one of {LAYOUTS}")


def _chunks(layout, world, rank):
    """The global chunk indices a rank holds, in local order, and the number of chunks."""
    if layout == "contiguous":
        return (rank,), world
    return (rank, 2 * world - 1 - rank), 2 * world


def _chunk_len(n_local, layout, what, name):
    """The length of one chunk of a local shard of ``n_local`` rows."""
    if layout == "zigzag" and n_local % 2:
        raise ValueError(f"{what}: layout='zigzag' holds two equal chunks per rank, but {name} has {n_local} local "
                         f"rows (odd); shard a sequence whose length is a multiple of 2·world_size, or use "
                         f"layout='contiguous'")
    return n_local // 2 if layout == "zigzag" else n_local


def shard_positions(n_local, group=None, layout="zigzag", rank=None, device=None):
    """The global positions (int64, (n_local,)) of the rows a rank holds under ``layout``
    (``rank`` defaults to this process's rank in ``group``)."""
    _check_layout(layout)
    world, own = _group(group, "shard_positions")
    rank = own if rank is None else rank
    m = _chunk_len(n_local, layout, "shard_positions", "the shard")
    chunks, _ = _chunks(layout, world, rank)
    return torch.cat([torch.arange(c * m, (c + 1) * m, device=device) for c in chunks])


def shard(x, dim=2, group=None, layout="zigzag"):
    """This rank's shard of ``x`` along ``dim`` (a differentiable view-and-copy of its chunks).

    ``x`` is the full sequence, the same on every rank; its length along ``dim`` must be a
    multiple of the layout's chunk count (W for "contiguous", 2W for "zigzag")."""
    _check_layout(layout)
    world, rank = _group(group, "shard")
    n = x.shape[dim]
    chunks, count = _chunks(layout, world, rank)
    if n % count:
        raise ValueError(f"shard: length {n} along dim {dim} is not a multiple of {count}, the number of chunks of "
                         f"layout={layout!r} over {world} ranks; pad the sequence to a multiple of {count}")
    m = n // count
    pieces = [x.narrow(dim, c * m, m) for c in chunks]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


class _Unshard(torch.autograd.Function):
    """All-gather of equal shards; the gradient of a shard is the sum over ranks of the
    gradients of their full copies at that shard (every rank's use of the result counts)."""

    @staticmethod
    def forward(ctx, x, dim, group, layout):
        world, rank = _group(group, "unshard")
        ctx.dim, ctx.group, ctx.layout = dim, group, layout
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x, group=group)
        m = _chunk_len(x.shape[dim], layout, "unshard", "x")
        order = {}
        for r, part in enumerate(parts):
            for i, c in enumerate(_chunks(layout, world, r)[0]):
                order[c] = part.narrow(dim, i * m, m)
        return torch.cat([order[c] for c in sorted(order)], dim)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)    # all_reduce works in place
        dist.all_reduce(grad, group=ctx.group)
        return shard(grad, ctx.dim, ctx.group, ctx.layout), None, None, None


def unshard(x, dim=2, group=None, layout="zigzag"):
    """The full sequence from every rank's shard along ``dim`` (an all-gather; every rank gets
    it). Differentiable: a shard's gradient is the sum over ranks of their copies' gradients."""
    _check_layout(layout)
    _group(group, "unshard")
    return _Unshard.apply(x, dim, group, layout)


def _global_rank(group, rank):
    return rank if group is None else dist.get_global_rank(group, rank)


def _visible(q_lo, q_hi, k_lo, k_hi, causal, left, right):
    """Whether some query position in [q_lo, q_hi] sees some key position in [k_lo, k_hi]."""
    lo = -math.inf if left < 0 else -left          # keys seen by query p: [p + lo, p + hi]
    hi = math.inf if right < 0 else right
    if causal:
        hi = min(hi, 0)
    return k_lo <= q_hi + hi and k_hi >= q_lo + lo


def _block_plan(q_chunks, mq, k_chunks, mk, causal, left, right):
    """The kernel calls for one (local queries, key block) pair: one (query rows, key rows) pair of
    slices per visible (query chunk, key chunk) pair, and none for an empty one. Each call's
    queries and keys lie contiguous in the global sequence, so the kernels take position offsets
    (analytic tile skipping, mask-free interior tiles) and dropout's global (row, key) counter
    starts from the call's first element."""
    return [(slice(i * mq, (i + 1) * mq), slice(j * mk, (j + 1) * mk))
            for i, qc in enumerate(q_chunks) for j, kc in enumerate(k_chunks)
            if _visible(qc * mq, qc * mq + mq - 1, kc * mk, kc * mk + mk - 1, causal, left, right)]


# --------------------------------------------------------------------------------------------------
# ring attention
# --------------------------------------------------------------------------------------------------

def _rows(t, rows):
    return None if t is None else t[:, :, rows]


class _Ring:
    """One ring_attention call: the group, the layout's positions and the kernel arguments."""

    def __init__(self, group, layout, L, S, device, backend, causal, window, softcap, dropout_p, scale, kp,
                 deterministic):
        self.group = group
        self.world, self.rank = _group(group, "ring_attention")
        self.next = _global_rank(group, (self.rank + 1) % self.world)
        self.prev = _global_rank(group, (self.rank - 1) % self.world)
        self.layout = layout
        self.mq = _chunk_len(L, layout, "ring_attention", "q")
        self.mk = _chunk_len(S, layout, "ring_attention", "k")
        self.fwd, self.bwd = ops.forward_op(backend), ops.backward_op(backend)
        self.causal = bool(causal)
        self.left, self.right = window if window is not None else (-1, -1)
        self.softcap, self.dropout_p, self.scale = float(softcap or 0.0), float(dropout_p), float(scale)
        self.seed = _shared_seed(group, device) if self.dropout_p > 0 else None
        self.q_chunks = _chunks(layout, self.world, self.rank)[0]
        self.rope_table, self.bias_lut = kp.rope_table, kp.bias_lut
        self.spec_ints, self.rope_scale = ops.spec_ints(kp), float(kp.rope_scale)
        self.deterministic = bool(deterministic)

    def plan(self, src):
        """The kernel calls of the block that rank ``src`` owns."""
        k_chunks = _chunks(self.layout, self.world, src)[0]
        calls = _block_plan(self.q_chunks, self.mq, k_chunks, self.mk, self.causal, self.left, self.right)
        return [(qr, kr, self.offsets(qr, kr, k_chunks)) for qr, kr in calls]

    def offsets(self, q_rows, k_rows, k_chunks):
        """The global positions of the first query and key of one call, and its dropout state
        (seed, global row, global key of its first element, so that the kernels draw the
        single-process mask; None without dropout)."""
        row = self.q_chunks[q_rows.start // self.mq] * self.mq
        key = k_chunks[k_rows.start // self.mk] * self.mk
        seed = None if self.seed is None else torch.tensor([self.seed, row, key], dtype=torch.int64)
        return row, key, seed

    def exchange(self, tensors, tag):
        """Send ``tensors`` to the next rank and receive the previous rank's into new buffers
        (asynchronous: returns the buffers and the pending works)."""
        recv = [torch.empty_like(t) for t in tensors]
        p2p = [dist.P2POp(dist.isend, t, self.next, self.group, tag) for t in tensors]
        p2p += [dist.P2POp(dist.irecv, t, self.prev, self.group, tag) for t in recv]
        return recv, dist.batch_isend_irecv(p2p)

    def kernel_args(self, offsets):
        row, key, seed = offsets
        return (None, None, row, key, self.causal, self.left, self.right, self.softcap, self.dropout_p, seed,
                self.scale)

    def forward(self, q, k, v, q_angles, k_angles, bias_tensor, urpe_table):
        B, H, L, _ = q.shape
        acc = torch.zeros((B, H, L, v.shape[-1]), dtype=torch.float32, device=q.device)
        acc_lse = torch.full((B, H, L), -math.inf, dtype=torch.float32, device=q.device)
        block = [t for t in (k, v, k_angles) if t is not None]
        for step in range(self.world):
            if step < self.world - 1:   # the next block travels while this one is computed
                incoming, works = self.exchange(block, tag=0)
            calls = self.plan((self.rank - step) % self.world)
            kb, vb, kab = block[0], block[1], block[2] if k_angles is not None else None
            for qr, kr, offs in calls:
                out, lse = self.fwd(q[:, :, qr], kb[:, :, kr], vb[:, :, kr], None,
                                    *self.kernel_args(offs),
                                    self.rope_table, _rows(q_angles, qr), _rows(kab, kr), bias_tensor, self.bias_lut,
                                    urpe_table, self.spec_ints, self.rope_scale, self.deterministic)
                _merge(acc, acc_lse, qr, out, lse)
            if step < self.world - 1:
                for w in works:
                    w.wait()
                block = incoming
        return acc.to(q.dtype), acc_lse

    def backward(self, saved, dout, dlse, needs):
        q, k, v, q_angles, k_angles, bias_tensor, urpe_table, out, lse = saved
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        dlse = None if dlse is None else dlse.contiguous()
        angle_grad, bias_grad, urpe_grad = needs[3] or needs[4], needs[5], needs[6]
        f32 = dict(dtype=torch.float32)
        dq = torch.zeros_like(q, **f32)
        dqa = torch.zeros_like(q_angles, **f32) if angle_grad else None
        dbias = torch.zeros_like(bias_tensor, **f32) if bias_grad else None
        durpe = torch.zeros_like(urpe_table, **f32) if urpe_grad else None
        block = [t for t in (k, v, k_angles) if t is not None]
        grads = None      # the fp32 dK, dV (, dk_angles) accumulators of the block being computed
        pending = None    # the accumulators in flight to the next rank
        for step in range(self.world):
            if step < self.world - 1:
                incoming, works = self.exchange(block, tag=0)
            calls = self.plan((self.rank - step) % self.world)
            kb, vb, kab = block[0], block[1], block[2] if k_angles is not None else None
            partial = [torch.zeros_like(t, **f32) for t in block]
            for qr, kr, offs in calls:
                # lse rows as a contiguous copy: the Triton backward indexes lse [B, H, L] densely
                g = self.bwd(dout[:, :, qr], q[:, :, qr], kb[:, :, kr], vb[:, :, kr], out[:, :, qr],
                             lse[:, :, qr].contiguous(), None if dlse is None else dlse[:, :, qr].contiguous(), None,
                             *self.kernel_args(offs),
                             self.rope_table, _rows(q_angles, qr), _rows(kab, kr), bias_tensor, self.bias_lut,
                             urpe_table, self.spec_ints, self.rope_scale, self.deterministic, False, angle_grad,
                             bias_grad, urpe_grad)
                dq_b, dk_b, dv_b, _, dqa_b, dka_b, dbias_b, durpe_b = g
                dq[:, :, qr] += dq_b
                partial[0][:, :, kr] += dk_b
                partial[1][:, :, kr] += dv_b
                if angle_grad:
                    dqa[:, :, qr] += dqa_b
                    if kab is not None:
                        partial[2][:, :, kr] += dka_b
                if bias_grad:
                    dbias += dbias_b
                if urpe_grad:
                    durpe += durpe_b
            if pending is not None:     # this block's accumulators, from the ranks before
                grads, works_d = pending
                for w in works_d:
                    w.wait()
                for a, p in zip(grads, partial):
                    a += p
            else:
                grads = partial
            if self.world > 1:          # on to the next rank; after W sends they are home
                pending = self.exchange(grads, tag=1)
            if step < self.world - 1:
                for w in works:
                    w.wait()
                block = incoming
        if pending is not None:
            grads, works_d = pending
            for w in works_d:
                w.wait()
        dk, dv = grads[0].to(k.dtype), grads[1].to(v.dtype)
        dka = grads[2].to(k_angles.dtype) if angle_grad and k_angles is not None else None
        return (dq.to(q.dtype), dk, dv, None if dqa is None else dqa.to(q_angles.dtype), dka,
                None if dbias is None else dbias.to(bias_tensor.dtype),
                None if durpe is None else durpe.to(urpe_table.dtype))


def _shared_seed(group, device):
    """The dropout seed, drawn as posattn.attention draws it and broadcast from the group's first
    rank, so every rank keys its blocks' masks by the same seed."""
    seed = torch.randint(0, 2**62, (), dtype=torch.int64).to(device)
    dist.broadcast(seed, src=_global_rank(group, 0), group=group)
    return int(seed)


def _merge(acc, acc_lse, rows, out, lse):
    """acc, acc_lse[rows] ← the softmax-weighted merge of (acc, acc_lse) and (out, lse), in fp32.
    Rows that see no key yet keep lse −inf and output 0."""
    a, la = acc[:, :, rows], acc_lse[:, :, rows]
    new = torch.logaddexp(la, lse)
    ref = torch.where(torch.isneginf(new), torch.zeros_like(new), new)
    a.mul_(torch.exp(la - ref)[..., None]).addcmul_(out, torch.exp(lse - ref)[..., None])  # in fp32, no copy of out
    la.copy_(new)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_angles, k_angles, bias_tensor, urpe_table, ring):
        out, lse = ring.forward(q, k, v, q_angles, k_angles, bias_tensor, urpe_table)
        ctx.save_for_backward(q, k, v, q_angles, k_angles, bias_tensor, urpe_table, out, lse)
        ctx.ring = ring
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        if dout is None and dlse is None:
            return (None,) * 8
        grads = ctx.ring.backward(ctx.saved_tensors, dout, dlse, ctx.needs_input_grad)
        return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad)), None)


def _check_common(q, k, v, layout, window, softcap, dropout_p, scale, rope, bias, urpe):
    _check_layout(layout)
    check_specs(rope, bias, urpe)
    check_attention_inputs(q, k, v, window=window, softcap=softcap, dropout_p=dropout_p, scale=scale)


def _global_rope(rope, D, n_q, n_k):
    """A RoPE whose frequencies are fixed by the global lengths: "dynamic" and "longrope"
    scalings choose them by the largest position, which a block alone does not know."""
    if not isinstance(rope, RoPE) or rope.inv_freq is not None:
        return rope
    inv, factor = rope.frequencies(D, 0, 0, n_q, n_k)
    return RoPE(dim=rope.rotary_dim(D), interleaved=rope.interleaved, inv_freq=inv, attention_factor=factor)


def ring_attention(q, k, v, *, group=None, layout="zigzag", causal=False, window=None, rope=None, bias=None,
                   urpe=None, softcap=None, scale=None, backend=None, deterministic=False, dropout_p=0.0,
                   return_lse=False):
    """Ring attention over the ranks of ``group``: each rank passes its shard along dim 2.

    q [B, H, L, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv] are this rank's shards (every rank the
    same shapes) of sequences of W·L queries and W·S keys cut by ``layout`` ("zigzag" or
    "contiguous", see :func:`shard`). Global positions follow from the layout: queries and keys
    each count from 0 (``causal`` is top-left, as :func:`posattn.attention` with offsets 0).
    Every other keyword means what it means in :func:`posattn.attention` (window, rope, bias,
    urpe, softcap, scale = 1/√D by default, backend, deterministic); the result equals that
    function on the unsharded inputs, sharded the same way: out [B, H, L, Dv] in q's dtype
    and, with ``return_lse``, lse [B, H, L] (fp32, natural log; differentiable).

    K/V blocks and their positions travel round the ring with ``batch_isend_irecv`` (the next
    transfer overlaps the current kernel); partial results merge in fp32; (query chunk, key
    chunk) pairs that ``causal`` or ``window`` leave empty are skipped. Backward: a second ring
    recomputes every block with the final lse; dQ stays local, the fp32 dK/dV accumulators
    travel back to their owners. ``RotaryAngles`` angles are row-indexed: pass this rank's
    rows (k_angles travel with their keys). Gradients of spec tensors (slopes, tables,
    log-decays) are per-rank partial sums.

    ``dropout_p``: the keep-mask is keyed by the global (batch·head, row, key) and one seed,
    drawn as :func:`posattn.attention` draws it (the first rank's draw is broadcast), so a ring
    run drops exactly the elements that one process with the same torch seed drops.

    Runs on the kernel backends ("cpu" for CPU tensors, "triton" for CUDA tensors).
    """
    _check_common(q, k, v, layout, window, softcap, dropout_p, scale, rope, bias, urpe)
    backend = select_backend(backend, q)
    if backend == "reference":
        raise ValueError(f"ring_attention runs on the kernel backends ('cpu', 'triton'), got backend='reference' "
                         f"(q is {q.dtype}); pass float32 / bfloat16 / float16 tensors, or use ulysses_attention, "
                         f"which runs on every backend")
    world, _ = _group(group, "ring_attention")
    B, H, L, D = q.shape
    S = k.shape[2]
    if max(D, v.shape[-1]) > 256:
        raise ValueError(f"head dims D={D}, Dv={v.shape[-1]}: the kernel backends take head dims up to 256")
    rope = _global_rope(rope, D, world * L, world * S)
    q, k, v = (t.contiguous() for t in (q, k, v))   # the blocks are sent whole, and sliced by rows
    kp = kernel_positions(rope, bias, urpe, q, k, 0, 0)
    if isinstance(rope, RotaryAngles) and kp.k_angles is None:
        kp.k_angles = kp.q_angles                   # self-attention: the keys' angles travel with the keys
    angles = [None if a is None else a.contiguous() for a in (kp.q_angles, kp.k_angles)]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    ring = _Ring(group, layout, L, S, q.device, backend, causal, window, softcap, dropout_p, scale, kp,
                 deterministic)
    out, lse = _RingAttention.apply(q, k, v, *angles, kp.bias_tensor, kp.urpe_table, ring)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------------------------------
# Ulysses attention
# --------------------------------------------------------------------------------------------------

def _all_to_all(x, group, world, scatter_dim, gather_dim):
    """Cut x into W pieces along scatter_dim, send piece j to rank j, and concatenate the pieces
    received from ranks 0 … W−1 along gather_dim."""
    send = torch.stack([c.contiguous() for c in x.chunk(world, dim=scatter_dim)])
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, world, scatter_dim, gather_dim):
        ctx.args = (group, world, gather_dim, scatter_dim)
        return _all_to_all(x, group, world, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, *ctx.args), None, None, None, None


def _heads_slice(t, dim, world, rank, what):
    n = t.shape[dim]
    if n % world:
        raise ValueError(f"ulysses_attention: {what} has {n} heads, not a multiple of the world size {world}")
    return t.narrow(dim, rank * (n // world), n // world)


def _angles_to_heads(a, heads, group, world):
    """Row-indexed angles [B|1, heads|1, n, r/2] of this rank's rows → the full sequence's,
    for this rank's head group (differentiable)."""
    if a.shape[1] == 1:
        a = a.expand(a.shape[0], world, *a.shape[2:])     # every rank takes the one head
    elif a.shape[1] != heads:
        raise ValueError(f"ulysses_attention: RotaryAngles angles have {a.shape[1]} heads; expected 1 or {heads}")
    return _AllToAll.apply(a, group, world, 1, 2)


def _ulysses_specs(rope, bias, urpe, group, world, rank, H, Hkv):
    """The specs for this rank's head group: head-indexed tensors sliced, angles gathered."""
    if isinstance(rope, RotaryAngles):
        qa = _angles_to_heads(rope.q_angles, H, group, world)
        ka = None if rope.k_angles is None else _angles_to_heads(rope.k_angles, Hkv, group, world)
        rope = dataclasses.replace(rope, q_angles=qa, k_angles=ka)
    if isinstance(bias, ALiBi):
        bias = dataclasses.replace(bias, slopes=_heads_slice(bias.slopes, bias.slopes.dim() - 1, world, rank,
                                                             "ALiBi slopes"))
    elif isinstance(bias, ManhattanDecay):
        bias = dataclasses.replace(bias, log_gamma=_heads_slice(bias.log_gamma, 0, world, rank,
                                                                "ManhattanDecay log_gamma"))
    elif bias is not None:
        bias = dataclasses.replace(bias, table=_heads_slice(bias.table, 0, world, rank, f"{type(bias).__name__} "
                                                            f"table"))
    if urpe is not None:
        urpe = dataclasses.replace(urpe, table=_heads_slice(urpe.table, 0, world, rank, "URPE table"))
    return rope, bias, urpe


def ulysses_attention(q, k, v, *, group=None, layout="zigzag", causal=False, window=None, rope=None, bias=None,
                      urpe=None, softcap=None, scale=None, backend=None, deterministic=False, dropout_p=0.0,
                      return_lse=False):
    """Ulysses (DeepSpeed) sequence parallelism: all-to-all from sequence shards to head shards,
    full-sequence :func:`posattn.attention` on H/W heads, all-to-all back.

    Same inputs, keywords and result as :func:`ring_attention` (q [B, H, L, D], k/v [B, Hkv,
    S, D*] shards of W·L / W·S rows under ``layout``); H and Hkv must be multiples of the group
    size W. Head-indexed spec tensors (ALiBi slopes, bias / URPE tables, decay rates) are
    sliced to the rank's heads, so their gradients are per-rank partial sums. The full
    sequence keeps the layout's row order, its rows carrying their global positions. Runs on
    every backend of :func:`posattn.attention` (float64 on the reference). ``dropout_p > 0``
    raises NotImplementedError (use ring_attention).
    """
    _check_common(q, k, v, layout, window, softcap, dropout_p, scale, rope, bias, urpe)
    if dropout_p:
        raise NotImplementedError(f"ulysses_attention: dropout_p={dropout_p} is not supported: the kernels key the "
                                  f"dropout mask by (batch·head, row, key) of their call, and a rank's call holds "
                                  f"a slice of the heads, so it would drop other elements than one process; use "
                                  f"ring_attention, whose dropout equals the single-process mask")
    world, rank = _group(group, "ulysses_attention")
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if H % world or Hkv % world:
        raise ValueError(f"ulysses_attention splits heads over the {world} ranks, but q has {H} heads and k/v {Hkv}; "
                         f"both must be multiples of {world} (use ring_attention, which takes any head count)")
    check_specs(rope, bias, urpe, q)
    positions = [torch.cat([shard_positions(n, group, layout, rank=r, device=q.device) for r in range(world)])
                 for n in (L, S)]
    rope, bias, urpe = _ulysses_specs(rope, bias, urpe, group, world, rank, H, Hkv)
    qh, kh, vh = (_AllToAll.apply(t, group, world, 1, 2) for t in (q, k, v))
    out, lse = attention(qh, kh, vh, causal=causal, window=window, rope=rope, bias=bias, urpe=urpe, softcap=softcap,
                         scale=scale, q_pos=positions[0], k_pos=positions[1], return_lse=True, backend=backend,
                         deterministic=deterministic)
    out = _AllToAll.apply(out, group, world, 2, 1)
    if not return_lse:
        return out
    return out, _AllToAll.apply(lse, group, world, 2, 1)
