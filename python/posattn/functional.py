"""Public functions: :func:`attention`, :func:`attention_varlen` (packed variable-length batches) and the SDPA
drop-in :func:`scaled_dot_product_attention`."""
from __future__ import annotations

import math

import torch

from . import _config, ops, reference
from ._checks import check_attention_inputs, check_cu_values, check_varlen_inputs
from .kernelized import check_kernelized_inputs, features, kernelized
from .positions import ALiBi, RoPE, RotaryAngles, check_specs, kernel_positions


def select_backend(backend, q: torch.Tensor) -> str:
    """The backend that will run: an explicit choice is checked, None picks the best available."""
    if backend is None:
        backend = _config.backend_override()
    if backend is None:
        if q.dtype == torch.float64:
            return "reference"  # the kernels compute in fp32; float64 is the oracle's
        if q.device.type == "cuda" and _config.triton_available():
            return "triton"
        if q.device.type == "cpu":
            ops.require_cpu_extension()  # a missing build is an error, never a silent switch to the dense path
            return "cpu"
        return "reference"
    if backend not in _config.BACKENDS:
        raise ValueError(f"backend={backend!r} is not a backend; choose one of {_config.BACKENDS} or None")
    if backend == "triton":
        if not _config.triton_available():
            raise RuntimeError("backend='triton' needs the triton package; install it (pip install triton) or use "
                               "backend='reference'")
        if q.dtype == torch.float64:
            raise TypeError("backend='triton' takes float16, bfloat16 and float32; float64 runs on "
                            "backend='reference'")
    if backend == "cpu":
        ops.require_cpu_extension()
        if q.device.type != "cpu":
            raise RuntimeError(f"backend='cpu' needs CPU tensors, got q on {q.device}; move the inputs with .cpu() or "
                               f"use backend='triton' for CUDA tensors")
        if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"backend='cpu' takes float32, bfloat16 and float16, got {q.dtype}; float64 runs on "
                            f"backend='reference'")
    return backend


def _kernel_inputs(q, k, v, backend):
    """q, k, v as the kernels take them (last dim contiguous: copied once otherwise), after the
    head-dim limit."""
    if max(q.shape[-1], v.shape[-1]) > _config.MAX_HEAD_DIM:
        raise ValueError(f"head dims D={q.shape[-1]}, Dv={v.shape[-1]}: backend={backend!r} takes head dims up to "
                         f"{_config.MAX_HEAD_DIM}; use backend='reference' for larger ones")
    return (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))


def attention(q, k, v, *, causal=False, window=None, attn_mask=None, rope=None, bias=None, urpe=None, softcap=None,
              dropout_p=0.0, scale=None, q_pos=0, k_pos=0, return_lse=False, backend=None, deterministic=False):
    """Fused attention with positions: ``softmax(scale·q·kᵀ + bias + mask) · v``.

    Shapes: q [B, H, L, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv], H a multiple of Hkv
    (grouped-query attention: query head h reads KV head h // (H / Hkv)). Any strides; the
    last dim should be contiguous (otherwise that tensor is copied once).

    Positions: every query row i has the absolute position ``q_pos(i)`` and every key j the
    position ``k_pos(j)``; each is an int offset (``offset + arange``) or an integer tensor
    (L,) / (B, L). ``causal`` keeps ``k_pos ≤ q_pos`` (with offsets 0 that is SDPA's
    top-left convention; bottom-right is ``q_pos=S-L``). ``window=(left, right)`` keeps
    ``q_pos − left ≤ k_pos ≤ q_pos + right``, −1 meaning unbounded on that side.

    ``attn_mask``: bool (True = takes part) or float (added to the scores), any shape that
    broadcasts to [B, H, L, S]; a float mask that requires grad gets its gradient, reduced to
    its own shape. ``softcap``: the scaled scores become ``softcap·tanh(s/softcap)`` before the
    position bias and the float mask are added (FlashAttention's and Gemma2's order:
    ``s = softcap·tanh(scale·q·kᵀ/softcap) + bias + mask``), so a −inf mask entry stays −inf
    and a bias is not capped. ``scale`` defaults to 1/√D. ``dropout_p`` is always applied
    (there is no training flag), with a counter-based RNG seeded from torch's generator.
    A query row that sees no key returns 0 (and lse −inf).

    Non-finite inputs (every backend alike): NaN in, NaN out, in the rows it reaches. A key is
    *seen* by a query row when it is not masked (causal, window, a False bool entry, a −inf
    float-mask entry: masked keys are never looked at, whatever their score) and its score is
    not −inf. A NaN or +inf score of a seen key (NaN or ±inf in q_i or k_j, in a bias table,
    slope or float-mask entry, ``scale`` NaN) makes that row's output and lse NaN; a −inf score
    masks the key. A NaN or ±inf anywhere in v_j acts as a NaN score of key j: the rows that
    see key j are NaN (output and lse), the others are not touched by it. A row that sees no
    key still gives 0 and lse −inf.
    Gradients of non-finite inputs are not specified (NaN where the reference's are, and
    possibly elsewhere).

    Returns out [B, H, L, Dv] in q's dtype, and with ``return_lse`` also
    lse [B, H, L] = log Σ_j exp(s_ij), natural log, fp32 on the kernel backends (gradients
    flow through lse too).

    Position encodings (specs from :mod:`posattn.positions`, all computed inside the kernel,
    all composable with each other and with everything above): ``rope`` = RoPE | XPos |
    RotaryAngles rotates q and k (step 1); ``bias`` = ALiBi | RelativeBias | T5Bias |
    ManhattanDecay is added to the (capped) scores before the float mask (step 4); ``urpe`` =
    URPE multiplies the probabilities after the softmax (step 8). Learnable spec tensors
    (slopes, tables, log-decays, angles) receive gradients.

    ``deterministic``: bitwise-reproducible gradients for the position parameters (tables,
    slopes, log-decays) and for a broadcast float mask: per-program partial sums reduced
    afterwards, at the cost of a scratch buffer (B·H·⌈L/BLOCK_M⌉ rows per table; the mask's
    full [B, H, L, S]). Default False: fp32 atomics, one per (tile, table entry).

    ``backend``: "triton" (CUDA tensors; CPU tensors under TRITON_INTERPRET=1), "cpu" (the
    C++ extension posattn._C: CPU tensors, float32 / bfloat16 / float16), "reference" (dense
    PyTorch, any dtype incl. float64) or None (best available: triton for CUDA, cpu for CPU,
    reference for float64; the environment variable POSATTN_BACKEND overrides).
    """
    check_specs(rope, bias, urpe)
    check_attention_inputs(q, k, v, window=window, attn_mask=attn_mask, softcap=softcap, dropout_p=dropout_p,
                           scale=scale, q_pos=q_pos, k_pos=k_pos)
    backend = select_backend(backend, q)
    # An empty sequence has nothing to compute (L = 0: empty output; S = 0: every row sees no
    # key, so output 0 and lse −inf); the dense path handles it without launching a kernel.
    if backend == "reference" or q.shape[2] == 0 or k.shape[2] == 0:
        return reference.attention(q, k, v, causal=causal, window=window, attn_mask=attn_mask, rope=rope, bias=bias,
                                   urpe=urpe, softcap=softcap, dropout_p=dropout_p, scale=scale, q_pos=q_pos,
                                   k_pos=k_pos, return_lse=return_lse)

    D = q.shape[-1]
    q, k, v = _kernel_inputs(q, k, v, backend)
    if attn_mask is not None and attn_mask.dim() < 4:
        attn_mask = attn_mask[(None,) * (4 - attn_mask.dim())]  # a view: the gradient keeps the mask's shape
    q_tensor = q_pos if isinstance(q_pos, torch.Tensor) else None
    k_tensor = k_pos if isinstance(k_pos, torch.Tensor) else None
    left, right = window if window is not None else (-1, -1)
    seed = torch.randint(0, 2**62, (), dtype=torch.int64) if dropout_p > 0 else None
    kp = kernel_positions(rope, bias, urpe, q, k, q_pos, k_pos)
    out, lse = ops.forward_op(backend)(
        q, k, v, attn_mask, q_tensor, k_tensor, 0 if q_tensor is not None else int(q_pos),
        0 if k_tensor is not None else int(k_pos), bool(causal), left, right, float(softcap or 0.0),
        float(dropout_p), seed, 1.0 / math.sqrt(D) if scale is None else float(scale), kp.rope_table, kp.q_angles,
        kp.k_angles, kp.bias_tensor, kp.bias_lut, kp.urpe_table, ops.spec_ints(kp), float(kp.rope_scale),
        bool(deterministic))
    return (out, lse) if return_lse else out


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, *, causal=False,
                     window=None, rope=None, bias=None, urpe=None, softcap=None, dropout_p=0.0, scale=None, q_pos=None,
                     k_pos=None, return_lse=False, backend=None, deterministic=False):
    """Attention over a packed batch of variable-length sequences, no padding (FlashAttention's
    varlen layout; ByteTransformer's padding-free packing).

    Shapes: q [Tq, H, D], k [Tk, Hkv, D], v [Tk, Hkv, Dv], the rows of n sequences packed along
    dim 0 (any strides, last dim contiguous); H a multiple of Hkv (grouped-query attention).
    ``cu_seqlens_q`` / ``cu_seqlens_k``: int32 (int64 accepted) prefix sums [n+1]: sequence i
    has the query rows [cu_seqlens_q[i], cu_seqlens_q[i+1]) (L_i of them) and the key rows
    [cu_seqlens_k[i], cu_seqlens_k[i+1]) (S_i). A query attends only to its own sequence's keys.
    Lengths may be 0 (a sequence with no keys gives output 0 and lse −inf).

    Positions restart in every sequence: keys 0 .. S_i−1 and queries S_i−L_i .. S_i−1
    (bottom-right, FlashAttention's convention: with ``causal`` the last query sees every key,
    chunked prefill and L_i ≠ S_i come out right). ``q_pos`` [Tq] / ``k_pos`` [Tk] int tensors
    override them row by row (e.g. Hugging Face's packed ``position_ids``). Causality, windows
    and every position encoding are functions of these positions, as in :func:`attention`.

    Every keyword means what it means in :func:`attention`; there is no ``attn_mask``. Specs
    across the pack: RoPE's dynamic / LongRoPE frequencies are chosen by the largest position
    in the whole pack (one frequency set for all sequences); ALiBi slopes are (H,) or (n, H)
    (one row per sequence); RotaryAngles' angles index packed rows: q_angles [1, H or 1, Tq, r/2],
    k_angles [1, Hkv or 1, Tk, r/2] (None: q_angles, which needs cu_seqlens_q == cu_seqlens_k).

    ``max_seqlen_q`` / ``max_seqlen_k``: the longest sequence (Python ints), as FlashAttention
    takes them. The lengths' values are checked (0 first, non-decreasing, the total last, the
    maxima not below the longest sequence) wherever that costs no device synchronisation: on
    CPU tensors always; on CUDA tensors when a maximum is not given (reading cu_seqlens once,
    one synchronisation); never while torch.compile traces. With both maxima given on a GPU
    the prefix sums are trusted, as FlashAttention does.

    Returns out [Tq, H, Dv] in q's dtype, and with ``return_lse`` also lse [H, Tq] (natural
    log; FlashAttention's layout), fp32 on the kernel backends.

    ``backend``: "triton" (CUDA tensors; CPU tensors under TRITON_INTERPRET=1: the attention
    kernels with the sequence of each program from a tile → sequence map, no padding), "cpu"
    (the C++ kernels, every sequence's (head, query tile) tasks in one parallel region),
    "reference" (per-sequence dense PyTorch, any dtype incl. float64: the oracle) or None
    (triton for CUDA, cpu for CPU tensors, the reference for float64).
    """
    check_specs(rope, bias, urpe)
    check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window=window,
                        softcap=softcap, dropout_p=dropout_p, scale=scale, q_pos=q_pos, k_pos=k_pos)
    n = cu_seqlens_q.numel() - 1
    _check_varlen_specs(rope, bias, urpe, q, k, n, cu_seqlens_q, cu_seqlens_k)
    backend = select_backend(backend, q)
    # RoPE with dynamic NTK / LongRoPE scaling needs the largest position of the pack on the host
    read = backend == "reference" or _dynamic_rope(rope) or (not torch.compiler.is_compiling() and (
        q.device.type == "cpu" or max_seqlen_q is None or max_seqlen_k is None))
    cu_q = cu_k = None
    if read:
        cu_q, cu_k = _read_cu_seqlens(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)
    rope = _pack_rope(rope, q.shape[-1], cu_q, cu_k, q_pos, k_pos)
    if backend == "reference":
        return _varlen_reference(q, k, v, cu_q, cu_k, causal=causal, window=window, rope=rope, bias=bias, urpe=urpe,
                                 softcap=softcap, dropout_p=dropout_p, scale=scale, q_pos=q_pos, k_pos=k_pos,
                                 return_lse=return_lse)
    forward = ops.varlen_forward_op(backend)
    D = q.shape[-1]
    q, k, v = _kernel_inputs(q, k, v, backend)
    cu_seqlens_q, cu_seqlens_k = (c.to(torch.int32).contiguous() for c in (cu_seqlens_q, cu_seqlens_k))
    left, right = window if window is not None else (-1, -1)
    seed = torch.randint(0, 2**62, (), dtype=torch.int64) if dropout_p > 0 else None
    # the specs see the pack as n sequences of Tq / Tk rows ([n, H, T, D] views, batch stride 0)
    kp = kernel_positions(rope, bias, urpe, q.transpose(0, 1)[None].expand(n, -1, -1, -1),
                          k.transpose(0, 1)[None].expand(n, -1, -1, -1), 0 if q_pos is None else q_pos,
                          0 if k_pos is None else k_pos)
    out, lse = forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, q_pos, k_pos, 0, 0, bool(causal), left, right, float(softcap or 0.0),
        float(dropout_p), seed, 1.0 / math.sqrt(D) if scale is None else float(scale), kp.rope_table, kp.q_angles,
        kp.k_angles, kp.bias_tensor, kp.bias_lut, kp.urpe_table, ops.spec_ints(kp), float(kp.rope_scale),
        bool(deterministic))
    return (out, lse) if return_lse else out


def _check_varlen_specs(rope, bias, urpe, q, k, n, cu_seqlens_q, cu_seqlens_k):
    """Spec shapes against the pack: heads (and ALiBi's optional row per sequence); rotary
    angles over packed rows."""
    for spec in (bias, urpe):
        if spec is not None:
            spec.check(n, q.shape[1], q.device)
    if isinstance(rope, RotaryAngles):
        for name, t, rows in (("q_angles", rope.q_angles, q.shape[0]), ("k_angles", rope.k_angles, k.shape[0])):
            if t is not None and (t.shape[0] != 1 or t.shape[2] != rows):
                raise ValueError(f"attention_varlen: RotaryAngles {name} has shape {tuple(t.shape)}; over a packed "
                                 f"batch it is [1, heads or 1, {rows}, r/2] (one row of angles per packed row)")
        if rope.k_angles is None and (q.shape[0] != k.shape[0] or not torch.equal(cu_seqlens_q, cu_seqlens_k)):
            raise ValueError("attention_varlen: RotaryAngles(k_angles=None) rotates the keys with q_angles, which "
                             "needs cu_seqlens_q == cu_seqlens_k; pass k_angles")


def _read_cu_seqlens(cu_seqlens_q, cu_seqlens_k, Tq, Tk, max_seqlen_q, max_seqlen_k):
    """The prefix sums as host lists (one device synchronisation on a GPU), checked."""
    cu_q, cu_k = torch.stack((cu_seqlens_q.long(), cu_seqlens_k.long())).tolist()
    check_cu_values(cu_q, "cu_seqlens_q", Tq, "q")
    check_cu_values(cu_k, "cu_seqlens_k", Tk, "k")
    for name, given, cu in (("max_seqlen_q", max_seqlen_q, cu_q), ("max_seqlen_k", max_seqlen_k, cu_k)):
        longest = max((b - a for a, b in zip(cu, cu[1:])), default=0)
        if given is not None and given < longest:
            raise ValueError(f"{name}={given} but the longest sequence has {longest} rows; pass the longest length "
                             f"(or None to have it computed)")
    return cu_q, cu_k


def _dynamic_rope(rope) -> bool:
    """A RoPE whose frequencies depend on the largest position (dynamic NTK, LongRoPE)."""
    if not isinstance(rope, RoPE) or rope.inv_freq is not None:
        return False
    return (rope.scaling or {}).get("rope_type", (rope.scaling or {}).get("type")) in ("dynamic", "longrope")


def _pack_rope(rope, D, cu_q, cu_k, q_pos, k_pos):
    """A dynamic RoPE gets its frequencies fixed by the largest position in the whole pack
    (the prefix sums ``cu_q`` / ``cu_k`` as host lists), so every sequence uses the same."""
    if not _dynamic_rope(rope):
        return rope
    largest = -1
    for i in range(len(cu_q) - 1):
        L, S = cu_q[i + 1] - cu_q[i], cu_k[i + 1] - cu_k[i]
        if k_pos is None and S:
            largest = max(largest, S - 1)
        if q_pos is None and L:
            largest = max(largest, S - 1)
    for pos in (q_pos, k_pos):
        if pos is not None and pos.numel():
            largest = max(largest, int(pos.max()))
    inv, factor = rope.frequencies(D, max(largest, 0), 0, 1, 1)
    return RoPE(theta=rope.theta, dim=2 * inv.numel(), interleaved=rope.interleaved, inv_freq=inv,
                attention_factor=factor)


def _sequence_specs(rope, bias, i, qs, qe, ks, ke):
    """The specs of sequence i: ALiBi's row of slopes, RotaryAngles' rows of angles."""
    if isinstance(bias, ALiBi) and bias.slopes.dim() == 2 and bias.slopes.shape[0] != 1:
        bias = ALiBi(bias.slopes[i])
    if isinstance(rope, RotaryAngles):
        rope = RotaryAngles(rope.q_angles[:, :, qs:qe],
                            None if rope.k_angles is None else rope.k_angles[:, :, ks:ke], rope.interleaved)
    return rope, bias


def _varlen_reference(q, k, v, cu_q, cu_k, *, causal, window, rope, bias, urpe, softcap, dropout_p, scale, q_pos,
                      k_pos, return_lse):
    """posattn.reference.attention on each sequence, concatenated (autograd through it all)."""
    H, D, Dv = q.shape[1], q.shape[2], v.shape[2]
    rope = _pack_rope(rope, D, cu_q, cu_k, q_pos, k_pos)
    outs, lses = [q.new_empty((0, H, Dv))], [q.new_empty((H, 0))]
    for i in range(len(cu_q) - 1):
        qs, qe, ks, ke = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        seq_rope, seq_bias = _sequence_specs(rope, bias, i, qs, qe, ks, ke)
        out, lse = reference.attention(
            q[qs:qe].transpose(0, 1)[None], k[ks:ke].transpose(0, 1)[None], v[ks:ke].transpose(0, 1)[None],
            causal=causal, window=window, rope=seq_rope, bias=seq_bias, urpe=urpe, softcap=softcap,
            dropout_p=dropout_p, scale=scale, q_pos=(ke - ks) - (qe - qs) if q_pos is None else q_pos[qs:qe],
            k_pos=0 if k_pos is None else k_pos[ks:ke], return_lse=True)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    out, lse = torch.cat(outs), torch.cat(lses, dim=1)
    return (out, lse) if return_lse else out


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``, same semantics.

    query (N, ..., Hq, L, E), key (N, ..., H, S, E), value (N, ..., H, S, Ev); batch dims
    broadcast; 2-D and 3-D inputs work as in torch. ``attn_mask``: bool (True = takes part)
    or float in query's dtype or float32 (added), broadcastable to (N, ..., Hq, L, S). ``is_causal``:
    top-left causal mask; together with ``attn_mask`` it raises. ``scale`` defaults to
    1/√E. ``enable_gqa``: Hq a multiple of H (key and value may differ in heads, each dividing
    Hq, as in torch). ``dropout_p`` is always applied. A query row that sees no key returns 0.
    Returns (N, ..., Hq, L, Ev).

    Argument errors are torch's: the same exception type, and a message that starts with
    torch's text (posattn's explanation may follow), e.g. ``attn_mask`` with ``is_causal=True``
    raises ``RuntimeError("_scaled_dot_product_attention: Explicit attn_mask should not be set
    when is_causal=True …")`` always (torch raises so on its math path; its fused CPU path
    applies both instead).

    Runs on the backend that ``posattn.attention(backend=None)`` picks; float64 inputs always
    run on the dense reference.
    """
    _check_sdpa_arguments(query, key, value, attn_mask, dropout_p, is_causal)
    tensors = (query, key, value)
    out_2d = all(t.dim() == 2 for t in tensors)
    nd = max(3, *(t.dim() for t in tensors))
    query, key, value = (t[(None,) * (nd - t.dim())] for t in (query, key, value))
    L, S = query.shape[-2], key.shape[-2]
    Hq, Hk, Hv = query.shape[-3], key.shape[-3], value.shape[-3]
    if enable_gqa:
        if Hq % Hk or Hq % Hv:
            raise RuntimeError(f"Number of heads in key and value must divide the number of heads in query (query has "
                               f"{Hq}, key {Hk}, value {Hv}; enable_gqa=True)")
        if Hk != Hv:  # torch repeats key and value separately: bring both to one head count that divides Hq
            Hk = Hk * Hv // math.gcd(Hk, Hv)
            key = key.repeat_interleave(Hk // key.shape[-3], dim=-3)
            value = value.repeat_interleave(Hk // value.shape[-3], dim=-3)
    # torch's math: scores = q·kᵀ, scores + mask, scores·v, each broadcasting its batch dims
    # (heads included; with enable_gqa the key/value heads count as Hq)
    as_q = (lambda t: (*t.shape[:-3], Hq)) if enable_gqa else (lambda t: t.shape[:-2])
    scores = _broadcast_like_torch(query.shape[:-2], as_q(key))
    if query.shape[-1] != key.shape[-1]:
        raise RuntimeError(_bmm_message(scores, query.shape[-1], key.shape[-1]))
    if attn_mask is not None:
        full = (*scores, L, S)
        if _broadcast_like_torch(full, attn_mask.shape) != full:
            raise RuntimeError(f"output with shape {list(full)} doesn't match the broadcast shape "
                               f"{list(torch.broadcast_shapes(full, attn_mask.shape))}")
    out_batch = _broadcast_like_torch(scores, as_q(value))
    if value.shape[-2] != S:
        raise RuntimeError(_bmm_message(out_batch, S, value.shape[-2]))
    batch, Hq = out_batch[:-1], out_batch[-1]
    # a single query head, or a single key or value head, broadcasts (views); key and value
    # with one head each stay grouped-query attention
    query = query.expand(*query.shape[:-3], Hq, L, query.shape[-1])
    if key.shape[-3] != value.shape[-3]:
        key, value = (t.expand(*t.shape[:-3], Hq, *t.shape[-2:]) for t in (key, value))
    Hk = key.shape[-3]
    full = (*batch, Hq, L, S)

    def to4(t, heads, length, dim):
        t = t.expand(*batch, heads, length, dim)
        return t.reshape(-1, heads, length, dim) if len(batch) != 1 else t  # views except for >4-D broadcasts

    q4 = to4(query, Hq, L, query.shape[-1])
    k4 = to4(key, Hk, S, key.shape[-1])
    v4 = to4(value, Hk, S, value.shape[-1])
    mask4 = attn_mask
    if attn_mask is not None and len(batch) != 1:
        m = attn_mask[(None,) * (len(full) - attn_mask.dim())]
        lead = m.shape[:len(batch)]
        # (…, L, S) masks whose batch dims are all 1 stay un-materialised; others are expanded first
        mask4 = m.reshape(1, *m.shape[len(batch):]) if all(d == 1 for d in lead) else m.expand(full).reshape(
            -1, Hq, L, S)
    # float64 always runs on the dense reference (torch's SDPA takes it; the kernels do not)
    backend = "reference" if q4.dtype == torch.float64 else None
    out = attention(q4, k4, v4, causal=is_causal, attn_mask=mask4, dropout_p=dropout_p, scale=scale, backend=backend)
    out = out.reshape(*batch, Hq, L, out.shape[-1])
    return out.reshape(L, out.shape[-1]) if out_2d else out


# dtype names as torch's SDPA messages spell them (C++ type names)
_TORCH_DTYPE_NAMES = {torch.float32: "float", torch.float64: "double", torch.float16: "c10::Half",
                      torch.bfloat16: "c10::BFloat16", torch.int64: "long int", torch.int32: "int", torch.bool: "bool"}


def _dtype_name(dtype):
    return _TORCH_DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _check_sdpa_arguments(query, key, value, attn_mask, dropout_p, is_causal):
    """The argument errors of torch's SDPA, with torch's exception types and texts (posattn's
    explanation may follow), so that callers matching torch's errors match these."""
    for pos, (name, t) in enumerate((("query", query), ("key", key), ("value", value)), start=1):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"scaled_dot_product_attention(): argument '{name}' (position {pos}) must be Tensor, not "
                            f"{type(t).__name__}")
    if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"scaled_dot_product_attention(): argument 'attn_mask' must be Tensor, not "
                        f"{type(attn_mask).__name__}")
    if attn_mask is not None and is_causal:
        raise RuntimeError("_scaled_dot_product_attention: Explicit attn_mask should not be set when is_causal=True "
                           "(posattn raises on every path; fold the causal mask into attn_mask instead)")
    if min(t.dim() for t in (query, key, value)) < 2:
        raise RuntimeError(f"Expected query, key, and value to all be  at least 2 dimensional, but got query.dim: "
                           f"{query.dim()} key.dim: {key.dim()} and value.dim: {value.dim()} instead.")
    if not (query.device.type == key.device.type == value.device.type):
        raise RuntimeError(f"Expected query, key, and value to have the same device type, but got query.device: "
                           f"{query.device} key.device: {key.device} and value.device: {value.device} instead.")
    if not (query.dtype == key.dtype == value.dtype):
        raise RuntimeError(f"Expected query, key, and value to have the same dtype, but got query.dtype: "
                           f"{_dtype_name(query.dtype)} key.dtype: {_dtype_name(key.dtype)} and value.dtype: "
                           f"{_dtype_name(value.dtype)} instead.")
    if attn_mask is not None and attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
        raise RuntimeError(f"Expected attn_mask dtype to be bool or float or to match query dtype, but got "
                           f"attn_mask.dtype: {_dtype_name(attn_mask.dtype)} and  query.dtype: "
                           f"{_dtype_name(query.dtype)} instead.")
    if dropout_p > 1:  # torch ignores a negative dropout_p; posattn.attention rejects it (ValueError)
        raise RuntimeError(f"dropout probability has to be between 0 and 1, but got {dropout_p:g}")


def _broadcast_like_torch(a, b):
    """torch.broadcast_shapes(a, b), raising torch's text for the first mismatch from the right."""
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    for d in reversed(range(n)):
        if a[d] != b[d] and a[d] != 1 and b[d] != 1:
            raise RuntimeError(f"The size of tensor a ({a[d]}) must match the size of tensor b ({b[d]}) at "
                               f"non-singleton dimension {d}")
    return tuple(max(x, y) if min(x, y) != 0 else 0 for x, y in zip(a, b))


def _bmm_message(batch, expected, got):
    """torch's text for a batched product whose inner sizes differ (head dims of q and k, or
    the key lengths of k and v)."""
    n = math.prod(batch)
    return f"Expected size for first two dimensions of batch2 tensor to be: [{n}, {expected}] but got: [{n}, {got}]."


def _kernelized_backend(backend, q):
    """The fused kernels kernelized attention runs with: "cpu", "triton", or None (the FFT
    path in PyTorch ops, for devices without fused kernels). Unlike softmax attention, float64
    stays on the fast path (its Toeplitz products are float64 anyway)."""
    if backend is None:
        if q.device.type == "cpu":
            ops.require_cpu_extension()  # a missing build is an error, never a silent switch
            return "cpu"
        if q.device.type == "cuda" and _config.triton_available() and q.dtype != torch.float64:
            return "triton"
        return None
    if backend == "cpu":
        ops.require_cpu_extension()
        if q.device.type != "cpu":
            raise RuntimeError(f"kernelized_attention(backend='cpu') needs CPU tensors, got q on {q.device}; use "
                               f"backend='triton' for CUDA tensors or backend=None")
        return backend
    if backend == "triton":
        return select_backend(backend, q)  # the same checks as softmax attention's Triton backend
    raise ValueError(f"kernelized_attention: backend={backend!r}; choose None, 'cpu', 'triton' or 'reference'")


def kernelized_attention(q, k, v, *, rpe=None, causal=False, feature_map="prf", projection=None, num_features=None,
                         eps=1e-6, backend=None, normalize_qk=False):
    """Kernelized attention with relative positions in O(N log N) (Luo et al., NeurIPS 2021).

    ``z_i = φ(q_i)ᵀ Σ_j c_{j−i} φ(k_j) v_jᵀ / (φ(q_i)ᵀ Σ_j c_{j−i} φ(k_j) + eps)``, with
    ``c_r = exp(table[h, clamp(r, −M, M) + M])`` from ``rpe=posattn.RelativeBias(table)``
    (r = k_pos − q_pos over positions arange(L), arange(S); None: c ≡ 1, plain linear
    attention in O(N)); ``causal`` sets c_r = 0 for r > 0 (top-left, like SDPA). ``eps`` (≥ 0)
    is added to this denominator as written, in its own units: the stabilisers that keep the
    computation finite (the "prf" map's maxima, the table's max) are taken out of eps too.

    q [B, H, L, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv] (GQA: H a multiple of Hkv); returns
    [B, H, L, Dv] in v's dtype. The fused "prf" feature map computes in fp32 (fp64 for fp64
    inputs; the other maps in the inputs' dtype); the Toeplitz products in float64 (an FFT's
    round-off is absolute, and in float32 it swamps rows with a small denominator, e.g. the
    first causal rows); linear attention (no ``rpe``) in fp32.

    ``feature_map``: "prf" (FAVOR+ positive random features exp(W·x̃ − ‖x̃‖²/2)/√m,
    x̃ = x·D^{-1/4}, with max-stabilisers that cancel), "elu" (elu(x) + 1), "relu", or a
    callable. ``projection``: the fixed (m, D) matrix W for "prf"; None draws an orthogonal
    one (:func:`posattn.kernelized.orthogonal_projection`) with ``num_features`` rows
    (default ⌈D·ln D⌉) from torch's global generator on every call, so pass a fixed
    projection in a model. ``normalize_qk``: L2-normalise q and k first (the paper's recipe
    for stable training, as we read it; docs/math.md §6).

    The Toeplitz products run through ``torch.fft`` on a circulant embedding of length
    ≥ L + S − 1; the backward is custom (docs/math.md §6): it recomputes those products piece by
    piece (a range of features, or one feature of some (batch, head) slices, so that each
    piece's spectra stay near 64 MiB), reuses each piece's spectra for the table's gradient
    (one cross-correlation), and never forms anything of size L·S.

    ``backend``: "cpu" (CPU tensors: posattn._C's fused kernels), "triton" (CUDA tensors, or
    CPU tensors under TRITON_INTERPRET=1: fused Triton kernels), "reference" (the dense O(L·S)
    oracle), or None: "cpu" for CPU tensors, "triton" for CUDA tensors (float64 CUDA inputs,
    and other devices, run the same FFT path in PyTorch ops). The fused kernels are the "prf"
    feature map (forward and backward around one projection GEMM each), the outer products
    φ(k)⊗[v, 1] that feed the FFTs and the contractions with φ(q) after them, so the
    (N, m·Dv) tensors exist once per piece: the FFT's input and output.
    """
    check_kernelized_inputs(q, k, v, rpe, causal, feature_map, projection, num_features, eps)
    if backend == "reference":
        return reference.kernelized_attention(q, k, v, rpe=rpe, causal=causal, feature_map=feature_map,
                                              projection=projection, num_features=num_features, eps=eps,
                                              normalize_qk=normalize_qk)
    backend = _kernelized_backend(backend, q)
    phi_q, phi_k, log_scale = features(q, k, feature_map, projection, num_features, normalize_qk, backend)
    return kernelized(phi_q, phi_k, v, rpe, causal, eps, backend, log_scale)
