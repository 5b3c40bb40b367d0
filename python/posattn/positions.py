"""Position-encoding specs: small frozen objects that the kernels compute on the fly.

Every spec knows two things (docs/design.md, "Position specs"):

- its dense meaning, used by :mod:`posattn.reference` (``reference_rotate`` for rotary
  specs, ``reference_bias`` for additive biases, ``reference_gate`` for URPE);
- how it flattens into kernel arguments (``kernel_args``): a kind number, a few ints and
  floats, and the tensors the kernel reads (tables, slopes, angles).

Conventions (docs/math.md, "Conventions"): positions are absolute integers, every
relative quantity is ``r = k_pos − q_pos``, tables of width 2M+1 are indexed by
``clamp(r, −M, M) + M``. Learnable tensors (slopes, tables, log-decays, angles) receive
gradients on every backend.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

__all__ = ["ALiBi", "ManhattanDecay", "RelativeBias", "RoPE", "RotaryAngles", "T5Bias", "URPE", "XPos",
           "alibi_slopes", "carope_angles", "t5_relative_position_bucket"]

# kernel kinds (the kernels spell the same numbers; see triton_kernels/_common.py)
ROPE_NONE, ROPE_FREQ, ROPE_XPOS, ROPE_ANGLES = 0, 1, 2, 3
BIAS_NONE, BIAS_ALIBI, BIAS_RELATIVE, BIAS_T5, BIAS_MANHATTAN = 0, 1, 2, 3, 4

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------------
# rotary: RoPE, XPos, RotaryAngles
# --------------------------------------------------------------------------------------------------

def _rotary_dim(dim, head_dim, what):
    r = head_dim if dim is None else dim
    if r % 2 or r <= 0 or r > head_dim:
        raise ValueError(f"{what}: rotary dim {r} must be even, positive and at most the head dim {head_dim}; pass "
                         f"dim=<even number ≤ {head_dim}>")
    return r


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rotate(x, cos, sin, rotary_dim, interleaved):
    """Rotate channel pairs of x[..., :rotary_dim] by angles whose cos/sin are [..., rotary_dim/2].

    Pairs are (t, t + r/2) in the half layout and (2t, 2t + 1) interleaved; the channels
    [rotary_dim, D) pass through. cos and sin may carry a per-pair scale (YaRN's attention
    factor, xPos's ζ power). The arithmetic runs in x's dtype, as HF does.
    """
    r = rotary_dim
    xr, rest = x[..., :r], x[..., r:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if interleaved:
        a, b = xr[..., 0::2], xr[..., 1::2]
        y = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
    else:
        a, b = xr[..., : r // 2], xr[..., r // 2:]
        y = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
    return torch.cat((y, rest), dim=-1)


def _positions_max(q_pos, k_pos, L, S):
    """The largest position (an int offset or a tensor; a tensor costs one device sync):
    dynamic NTK and LongRoPE choose their frequencies by it."""
    def largest(p, n):
        if isinstance(p, torch.Tensor):
            return int(p.max()) if p.numel() else 0
        return int(p) + n - 1
    return max(largest(q_pos, L), largest(k_pos, S))


def _hf_inv_freq(theta, r, device=None):
    # exactly HF's expression (float32): 1 / base ** (arange(0, r, 2) / r)
    return 1.0 / (theta ** (torch.arange(0, r, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / r))


def rope_frequencies(theta, rotary_dim, scaling=None, seq_len=None):
    """(inv_freq (r/2,) float32, attention_factor) for a HF-style ``rope_scaling`` dict.

    Computed with the same float32 expressions as HF transformers' ``modeling_rope_utils``
    (rope types "default", "linear", "dynamic", "yarn", "llama3", "longrope"), so the
    frequencies are bit-identical to HF's. ``seq_len`` (largest position + 1) matters for
    "dynamic" and "longrope" only.
    """
    r = rotary_dim
    if scaling is None:
        return _hf_inv_freq(theta, r), 1.0
    s = dict(scaling)
    kind = s.get("rope_type", s.get("type", "default"))

    def need(key):
        if s.get(key) is None:
            raise ValueError(f"RoPE scaling {kind!r} needs the key {key!r} (same meaning as in HF transformers' "
                             f"rope_scaling); got {scaling!r}")
        return s[key]

    def original_len():
        for key in ("original_max_position_embeddings", "max_position_embeddings"):
            if s.get(key) is not None:
                return s[key]
        raise ValueError(f"RoPE scaling {kind!r} needs 'original_max_position_embeddings' (the pretraining context "
                         f"length); got {scaling!r}")

    if kind == "default":
        return _hf_inv_freq(theta, r), 1.0
    if kind == "linear":
        return _hf_inv_freq(theta, r) / need("factor"), 1.0
    if kind == "dynamic":
        factor, l0 = need("factor"), original_len()
        if not seq_len or seq_len <= l0:
            return _hf_inv_freq(theta, r), 1.0
        # Past the original length HF's module recomputes the base from a tensor seq_len, in
        # float32 tensor arithmetic; doing the same keeps the frequencies bit-identical.
        n = torch.maximum(torch.tensor(seq_len), torch.tensor(l0))
        base = theta * ((factor * n / l0) - (factor - 1)) ** (r / (r - 2))
        return _hf_inv_freq(base, r), 1.0
    if kind == "llama3":
        factor, low, high = need("factor"), need("low_freq_factor"), need("high_freq_factor")
        l0 = original_len()
        inv_freq = _hf_inv_freq(theta, r)
        low_wavelen, high_wavelen = l0 / low, l0 / high
        wavelen = 2 * math.pi / inv_freq
        inv = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (l0 / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv / factor + smooth * inv
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, inv), 1.0
    if kind == "yarn":
        l0 = original_len()
        factor = s.get("factor")
        if factor is None:
            factor = need("max_position_embeddings") / l0

        def get_mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention_factor = s.get("attention_factor")
        if attention_factor is None:
            if s.get("mscale") and s.get("mscale_all_dim"):
                attention_factor = float(get_mscale(factor, s["mscale"]) / get_mscale(factor, s["mscale_all_dim"]))
            else:
                attention_factor = get_mscale(factor)
        beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

        def correction_dim(rotations):
            return (r * math.log(l0 / (rotations * 2 * math.pi))) / (2 * math.log(theta))

        lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
        if s.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, r - 1)
        if lo == hi:
            hi += 0.001
        ramp = torch.clamp((torch.arange(r // 2, dtype=torch.float32) - lo) / (hi - lo), 0, 1)
        pos_freqs = theta ** (torch.arange(0, r, 2).to(dtype=torch.float) / r)
        extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
        extra_factor = 1 - ramp
        return interpolation * (1 - extra_factor) + extrapolation * extra_factor, float(attention_factor)
    if kind == "longrope":
        l0 = original_len()
        factor = s.get("factor")
        if factor is None:
            factor = need("max_position_embeddings") / l0
        attention_factor = s.get("attention_factor")
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(l0))
        lists = need("long_factor") if seq_len and seq_len > l0 else need("short_factor")
        if len(lists) != r // 2:
            raise ValueError(f"LongRoPE factor lists need rotary_dim/2 = {r // 2} entries, got {len(lists)}")
        ext = torch.tensor(lists, dtype=torch.float32)
        shape = torch.arange(0, r, 2, dtype=torch.int64).float() / r
        return 1.0 / (ext * theta ** shape), float(attention_factor)
    raise ValueError(f"RoPE scaling rope_type={kind!r} is not supported; choose one of 'default', 'linear', "
                     f"'dynamic', 'yarn', 'llama3', 'longrope', or pass inv_freq=<tensor (r/2,)>")


@dataclass(frozen=True, eq=False)
class RoPE:
    """Rotary position embedding (RoFormer), computed inside the kernel from q_pos / k_pos.

    ``theta``: the base (10000; LLaMA-3 500000). ``dim``: rotary dim r (even, ≤ D; None = D);
    channels [r, D) pass through (partial rotary: NeoX/Pythia, GPT-J, Phi). ``interleaved``:
    False = half / rotate_half pairs (t, t + r/2) as HF LLaMA and GPT-NeoX; True = GPT-J /
    Meta LLaMA pairs (2t, 2t + 1). ``scaling``: a HF ``rope_scaling`` dict ({"rope_type":
    "linear" | "dynamic" | "yarn" | "llama3" | "longrope", ...}, same keys and meaning).
    ``inv_freq``: explicit frequencies (r/2,) instead of theta/scaling. ``attention_factor``:
    multiplies cos and sin (None: the scaling's own, e.g. YaRN's mscale; else 1).
    """
    theta: float = 10000.0
    dim: int | None = None
    interleaved: bool = False
    scaling: dict | None = None
    inv_freq: torch.Tensor | None = None
    attention_factor: float | None = None

    def __post_init__(self):
        if not (isinstance(self.theta, numbers.Real) and self.theta > 1):
            raise ValueError(f"RoPE theta={self.theta!r} must be a number > 1")
        if self.inv_freq is not None:
            if not isinstance(self.inv_freq, torch.Tensor) or self.inv_freq.dim() != 1:
                raise ValueError("RoPE inv_freq must be a 1-D tensor of r/2 frequencies")
            if self.inv_freq.requires_grad:
                raise ValueError("RoPE inv_freq does not receive gradients; for learnable rotations build angles and "
                                 "use posattn.RotaryAngles")
            if self.scaling is not None:
                raise ValueError("RoPE: pass either inv_freq or scaling, not both")
            if self.dim is not None and self.dim != 2 * self.inv_freq.numel():
                raise ValueError(f"RoPE dim={self.dim} but inv_freq has {self.inv_freq.numel()} entries (dim/2)")
        if self.scaling is not None and not isinstance(self.scaling, dict):
            raise TypeError(f"RoPE scaling must be a dict like HF's rope_scaling, got {type(self.scaling).__name__}")

    def rotary_dim(self, head_dim):
        dim = self.dim if self.inv_freq is None else (self.dim or 2 * self.inv_freq.numel())
        return _rotary_dim(dim, head_dim, "RoPE")

    def frequencies(self, head_dim, q_pos, k_pos, L, S):
        """(inv_freq float32 (r/2,), attention factor) for this call's positions."""
        r = self.rotary_dim(head_dim)
        if self.inv_freq is not None:
            inv, factor = self.inv_freq.detach().float().cpu(), 1.0
        else:
            kind = (self.scaling or {}).get("rope_type", (self.scaling or {}).get("type"))
            seq_len = _positions_max(q_pos, k_pos, L, S) + 1 if kind in ("dynamic", "longrope") else None
            inv, factor = rope_frequencies(self.theta, r, self.scaling, seq_len)
        if self.attention_factor is not None:
            factor = float(self.attention_factor)
        return inv, factor

    def cos_sin(self, x, pos, inv_freq, factor):
        """cos, sin [B or 1, 1, L, r/2] of pos · inv_freq (fp32, or fp64 for float64 x), times factor."""
        angle = pos[:, None, :, None].to(_compute_dtype(x)) * inv_freq.to(x.device, _compute_dtype(x))
        return torch.cos(angle) * factor, torch.sin(angle) * factor

    def reference_rotate(self, q, k, q_pos, k_pos):
        r = self.rotary_dim(q.shape[-1])
        inv, factor = self.frequencies(q.shape[-1], q_pos, k_pos, q.shape[2], k.shape[2])
        return (rotate(q, *self.cos_sin(q, q_pos, inv, factor), r, self.interleaved),
                rotate(k, *self.cos_sin(k, k_pos, inv, factor), r, self.interleaved))

    def kernel_args(self, q, k, q_pos, k_pos):
        r = self.rotary_dim(q.shape[-1])
        inv, factor = self.frequencies(q.shape[-1], q_pos, k_pos, q.shape[2], k.shape[2])
        table = torch.stack((inv, torch.zeros_like(inv))).to(q.device)
        return dict(rope_kind=ROPE_FREQ, rotary_dim=r, interleaved=self.interleaved, rope_scale=factor,
                    rope_table=table)


@dataclass(frozen=True, eq=False)
class XPos:
    """xPos (Sun et al. 2022): RoPE plus the decay ζ_t^{(q_pos − k_pos)/scale_base} per pair.

    θ_t = theta^{−2t/r}, ζ_t = (2t + γ·r)/((1 + γ)·r). The kernels apply the decay to each
    tile relative to a per-tile centre in fp32, so no position overflows fp16 (pre-scaling
    q and k by ζ^{±pos/B} overflows fp16 near position 4.5k). ``interleaved`` defaults to
    torchscale's layout (pairs (2t, 2t + 1)); False gives the half layout (flash-attn).
    """
    theta: float = 10000.0
    dim: int | None = None
    scale_base: float = 512.0
    gamma: float = 0.4
    interleaved: bool = True

    def __post_init__(self):
        if not (isinstance(self.scale_base, numbers.Real) and self.scale_base > 0):
            raise ValueError(f"XPos scale_base={self.scale_base!r} must be > 0")
        if not (isinstance(self.gamma, numbers.Real) and self.gamma > 0):
            raise ValueError(f"XPos gamma={self.gamma!r} must be > 0")

    def rotary_dim(self, head_dim):
        return _rotary_dim(self.dim, head_dim, "XPos")

    def parameters(self, head_dim):
        """inv_freq (r/2,) and log ζ (r/2,), float64."""
        r = self.rotary_dim(head_dim)
        t = torch.arange(0, r, 2, dtype=torch.float64)
        inv_freq = 1.0 / self.theta ** (t / r)
        zeta = (t + self.gamma * r) / ((1 + self.gamma) * r)
        return inv_freq, torch.log(zeta)

    def reference_rotate(self, q, k, q_pos, k_pos):
        r = self.rotary_dim(q.shape[-1])
        inv_freq, log_zeta = self.parameters(q.shape[-1])
        # The centre cancels in q̃·k̃; the middle of all positions keeps both scales near 1.
        allpos = torch.cat((q_pos.flatten(), k_pos.flatten()))
        center = (int(allpos.min()) + int(allpos.max())) // 2 if allpos.numel() else 0

        def apply(x, pos, sign):
            cd = _compute_dtype(x)
            p = pos[:, None, :, None].to(cd)
            angle = p * inv_freq.to(x.device, cd)
            scale = torch.exp(sign * (p - center) / self.scale_base * log_zeta.to(x.device, cd))
            return rotate(x, torch.cos(angle) * scale, torch.sin(angle) * scale, r, self.interleaved)

        return apply(q, q_pos, 1.0), apply(k, k_pos, -1.0)

    def kernel_args(self, q, k, q_pos, k_pos):
        inv_freq, log_zeta = self.parameters(q.shape[-1])
        table = torch.stack((inv_freq, log_zeta / math.log(2) / self.scale_base)).float().to(q.device)
        return dict(rope_kind=ROPE_XPOS, rotary_dim=self.rotary_dim(q.shape[-1]), interleaved=self.interleaved,
                    rope_scale=1.0, rope_table=table)


@dataclass(frozen=True, eq=False)
class RotaryAngles:
    """Explicit rotation angles per (batch, head, row, pair), which receive gradients.

    ``q_angles`` [B or 1, H or 1, L, r/2] rotates q row by row; ``k_angles`` [B or 1, Hkv or
    1, S, r/2] rotates k (None: the same tensor as q_angles, for self-attention with L == S).
    Angles index rows, not positions. The gradient of a pair rotated to (y_a, y_b) is
    ∂L/∂φ = −dy_a·y_b + dy_b·y_a, summed over the uses of each angle. Expresses CARoPE
    (see :func:`carope_angles`), 2-D/3-D RoPE and variable position increments.
    """
    q_angles: torch.Tensor
    k_angles: torch.Tensor | None = None
    interleaved: bool = False

    def __post_init__(self):
        for name, t in (("q_angles", self.q_angles), ("k_angles", self.k_angles)):
            if t is None and name == "k_angles":
                continue
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.dtype not in _FLOATS:
                raise ValueError(f"RotaryAngles {name} must be a 4-D float tensor [B or 1, heads or 1, rows, r/2], "
                                 f"got {getattr(t, 'shape', type(t).__name__)}")

    def rotary_dim(self, head_dim):
        return _rotary_dim(2 * self.q_angles.shape[-1], head_dim, "RotaryAngles")

    def angles(self, B, H, Hkv, L, S, head_dim, device):
        r = self.rotary_dim(head_dim)
        qa = self.q_angles
        ka = qa if self.k_angles is None else self.k_angles
        if self.k_angles is None and L != S:
            raise ValueError(f"RotaryAngles(k_angles=None) reuses q_angles for the keys, which needs L == S; got "
                             f"L={L}, S={S}: pass k_angles")
        if self.k_angles is None and qa.shape[1] not in (1, Hkv):
            raise ValueError(f"RotaryAngles(k_angles=None): q_angles has {qa.shape[1]} heads but k has {Hkv}; pass "
                             f"k_angles for grouped-query attention, or q_angles with 1 head")
        for name, t, heads, rows in (("q_angles", qa, H, L), ("k_angles", ka, Hkv, S)):
            if t.shape[0] not in (1, B) or t.shape[1] not in (1, heads) or t.shape[2] != rows:
                raise ValueError(f"RotaryAngles {name} has shape {tuple(t.shape)}; expected ({B} or 1, {heads} or 1, "
                                 f"{rows}, r/2)")
            if t.shape[3] * 2 != r:
                raise ValueError(f"RotaryAngles: q_angles and k_angles must share r/2 = {r // 2}, got {t.shape[3]}")
            if t.device != device:
                raise ValueError(f"RotaryAngles {name} is on {t.device} but the inputs are on {device}")
        return qa, ka, r

    def reference_rotate(self, q, k, q_pos, k_pos):
        qa, ka, r = self.angles(q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[-1], q.device)

        def apply(x, a):
            a = a.to(_compute_dtype(x)) if a.dtype != torch.float64 else a
            return rotate(x, torch.cos(a), torch.sin(a), r, self.interleaved)

        return apply(q, qa), apply(k, ka)

    def kernel_args(self, q, k, q_pos, k_pos):
        qa, ka, r = self.angles(q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[-1], q.device)
        return dict(rope_kind=ROPE_ANGLES, rotary_dim=r, interleaved=self.interleaved, rope_scale=1.0,
                    q_angles=qa, k_angles=None if self.k_angles is None else ka)


def carope_angles(x, weight, head_dim):
    """CARoPE angles (Veisi et al. 2025) for :class:`RotaryAngles`, in plain PyTorch (autograd).

    x [B, L, d_model] (token embeddings), weight [d_model, H]. Returns angles [B, H, L,
    head_dim/2]: f = 1/(softplus(x·W) + 1) ∈ (0, 1) per token and head, per-pair increments
    f^i (i = 0 … head_dim/2 − 1), and the phase φ_i(m) = Σ_{t ≤ m} f_t^i (prefix sum over
    positions). This exact formula is our reading of the paper (docs/math.md §3); no reference
    code was published. The prefix sum is accumulated in fp32 (fp64 for float64 input).
    """
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"carope_angles: x must be [B, L, d_model] and weight [d_model, H]; got {tuple(x.shape)} "
                         f"and {tuple(weight.shape)}")
    if head_dim % 2:
        raise ValueError(f"carope_angles: head_dim={head_dim} must be even")
    cd = _compute_dtype(x)
    f = 1.0 / (torch.nn.functional.softplus(x.to(cd) @ weight.to(cd)) + 1.0)  # [B, L, H]
    i = torch.arange(head_dim // 2, device=x.device, dtype=cd)
    increments = f.transpose(1, 2)[..., None] ** i  # [B, H, L, head_dim/2]
    return torch.cumsum(increments, dim=2)


# --------------------------------------------------------------------------------------------------
# additive biases: ALiBi, RelativeBias, T5Bias, ManhattanDecay; the URPE gate
# --------------------------------------------------------------------------------------------------

def alibi_slopes(num_heads, device=None, dtype=torch.float32):
    """ALiBi's slopes for any head count (Press et al.; docs/math.md §2), as a tensor (num_heads,).

    A power of two n gives 2^(−8/n), 2^(−16/n), …; otherwise the slopes of the lower power
    of two c followed by every other slope of 2c heads (BLOOM and MPT give the same list).
    """
    if not (isinstance(num_heads, numbers.Integral) and num_heads >= 1):
        raise ValueError(f"alibi_slopes: num_heads={num_heads!r} must be a positive int")

    def power_of_two(n):
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]

    def slopes(n):
        if math.log2(n).is_integer():
            return power_of_two(n)
        c = 2 ** math.floor(math.log2(n))
        return power_of_two(c) + slopes(2 * c)[0::2][: n - c]

    return torch.tensor(slopes(int(num_heads)), dtype=dtype, device=device)


def _check_float_tensor(t, what):
    if not isinstance(t, torch.Tensor) or t.dtype not in _FLOATS:
        raise TypeError(f"{what} must be a float tensor, got {getattr(t, 'dtype', type(t).__name__)}")


def _check_heads(t, what, H, device, shape_hint):
    if t.shape[0] != H:
        raise ValueError(f"{what} has {t.shape[0]} heads (dim 0) but q has {H}; expected {shape_hint}")
    if t.device != device:
        raise ValueError(f"{what} is on {t.device} but the inputs are on {device}; move it with .to({device})")


def _relative(q_pos, k_pos):
    """r = k_pos − q_pos as [B or 1, 1, L, S] int64."""
    return k_pos[:, None, None, :] - q_pos[:, None, :, None]


def _table_width_m(table, what):
    if table.dim() != 2 or table.shape[1] % 2 != 1:
        raise ValueError(f"{what} table must be [H, 2M+1] (odd width), got {tuple(table.shape)}")
    return (table.shape[1] - 1) // 2


def _gather(table, idx):
    """table [H, T] at idx [B', 1, L, S] → [B', H, L, S]."""
    return table[:, idx[:, 0]].permute(1, 0, 2, 3)


@dataclass(frozen=True, eq=False)
class ALiBi:
    """ALiBi: bias = −slope_h·|k_pos − q_pos| (one definition for causal and bidirectional).

    ``slopes``: (H,) or (B, H), float; they receive gradients when they require grad
    (d slope_h = −Σ dS·|r|). :func:`alibi_slopes` gives the published ones.
    """
    slopes: torch.Tensor

    def __post_init__(self):
        _check_float_tensor(self.slopes, "ALiBi slopes")
        if self.slopes.dim() not in (1, 2):
            raise ValueError(f"ALiBi slopes must be (H,) or (B, H), got shape {tuple(self.slopes.shape)}")

    def check(self, B, H, device):
        s = self.slopes
        if s.shape[-1] != H or (s.dim() == 2 and s.shape[0] not in (1, B)):
            raise ValueError(f"ALiBi slopes have shape {tuple(s.shape)}; expected ({H},) or ({B}, {H}) for q with "
                             f"B={B}, H={H}; build them with posattn.alibi_slopes({H})")
        if s.device != device:
            raise ValueError(f"ALiBi slopes are on {s.device} but the inputs are on {device}")

    def reference_bias(self, q_pos, k_pos, H):
        s = self.slopes if self.slopes.dim() == 2 else self.slopes[None]
        return -s[:, :, None, None] * _relative(q_pos, k_pos).abs().to(s.dtype)

    def kernel_args(self, B, H, device):
        self.check(B, H, device)
        return dict(bias_kind=BIAS_ALIBI, bias_tensor=self.slopes.float(), bias_ints=(0, 0, 0))


class _ToeplitzTable:
    """A per-head table [H, 2M+1] indexed by clamp(k_pos − q_pos, −M, M) + M."""

    def __post_init__(self):
        what = type(self).__name__
        _check_float_tensor(self.table, f"{what} table")
        _table_width_m(self.table, what)

    @property
    def max_distance(self):
        return (self.table.shape[1] - 1) // 2

    def index(self, q_pos, k_pos):
        m = self.max_distance
        return _relative(q_pos, k_pos).clamp(-m, m) + m

    def check(self, B, H, device):
        _check_heads(self.table, f"{type(self).__name__} table", H, device, "[H, 2M+1]")

    def dense(self, q_pos, k_pos, H):
        """The table gathered densely: [B or 1, H, L, S]."""
        return _gather(self.table, self.index(q_pos, k_pos))

    def kernel_table(self, B, H, device):
        """The table as the kernels read it (fp32, rows contiguous), after the shape checks."""
        self.check(B, H, device)
        return self.table.float().contiguous()


@dataclass(frozen=True, eq=False)
class RelativeBias(_ToeplitzTable):
    """Learnable clipped relative bias (Swin/DeBERTa-style; the kernelized attention's RPE).

    ``table`` [H, 2M+1]: bias = table[h, clamp(k_pos − q_pos, −M, M) + M]; gradients flow into
    the table (summed over every (batch, query, key) with that offset).
    """
    table: torch.Tensor

    def reference_bias(self, q_pos, k_pos, H):
        return self.dense(q_pos, k_pos, H)

    def kernel_args(self, B, H, device):
        return dict(bias_kind=BIAS_RELATIVE, bias_tensor=self.kernel_table(B, H, device),
                    bias_ints=(self.max_distance, 0, 0))


def t5_relative_position_bucket(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
    """HF T5's ``_relative_position_bucket`` (same float32 expressions, same order).

    relative_position = k_pos − q_pos (memory − query). Bidirectional: half the buckets for
    keys at or before the query, half (offset by num_buckets/2) for keys after it;
    unidirectional: every future key → bucket 0. Exact up to max_exact = buckets/2, then
    logarithmic up to max_distance, then saturated.
    """
    rp = relative_position
    buckets = torch.zeros_like(rp)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rp > 0).to(torch.long) * num_buckets
        rp = torch.abs(rp)
    else:
        rp = -torch.min(rp, torch.zeros_like(rp))
    max_exact = num_buckets // 2
    is_small = rp < max_exact
    large = max_exact + (torch.log(rp.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).to(torch.long)
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(is_small, rp, large)


def _t5_lut_cpu(bidirectional, num_buckets, max_distance):
    # The bucket of |r| (bidirectional) or max(−r, 0) (causal) for 0 … max_distance; the
    # function saturates at max_distance, so the kernel clamps its distance there.
    n = torch.arange(max_distance + 1, dtype=torch.long)
    rel = -n  # keys at or before the query: the part of the function that depends on n alone
    return t5_relative_position_bucket(rel, bidirectional, num_buckets, max_distance).to(torch.int32)


@dataclass(frozen=True, eq=False)
class T5Bias:
    """T5's bucketed relative bias: bias = table[h, bucket(k_pos − q_pos)] with HF's buckets.

    ``table`` [H, num_buckets] (HF's ``relative_attention_bias.weight`` is [num_buckets, H]:
    pass ``weight.t()``); ``bidirectional`` True for encoders, False for decoder
    self-attention; T5 uses ``scale=1.0``. Gradients flow into the table.
    """
    table: torch.Tensor
    bidirectional: bool = True
    max_distance: int = 128

    def __post_init__(self):
        _check_float_tensor(self.table, "T5Bias table")
        if self.table.dim() != 2:
            raise ValueError(f"T5Bias table must be [H, num_buckets], got {tuple(self.table.shape)}")
        nb = self.table.shape[1]
        half = nb // 2 if self.bidirectional else nb
        if nb < 2 or half // 2 < 1 or not (isinstance(self.max_distance, numbers.Integral)
                                            and self.max_distance > half // 2):
            raise ValueError(f"T5Bias with {nb} buckets needs max_distance > {half // 2} (the exact range), got "
                             f"max_distance={self.max_distance}")

    @property
    def num_buckets(self):
        return self.table.shape[1]

    def index(self, q_pos, k_pos):
        return t5_relative_position_bucket(_relative(q_pos, k_pos), self.bidirectional, self.num_buckets,
                                           self.max_distance)

    def check(self, B, H, device):
        _check_heads(self.table, "T5Bias table", H, device, "[H, num_buckets] (HF's weight.t())")

    def reference_bias(self, q_pos, k_pos, H):
        return _gather(self.table, self.index(q_pos, k_pos))

    def kernel_args(self, B, H, device):
        self.check(B, H, device)
        t = self.table.float().contiguous()
        lut = _t5_lut_cpu(bool(self.bidirectional), self.num_buckets, int(self.max_distance)).to(device)
        half = self.num_buckets // 2 if self.bidirectional else 0
        return dict(bias_kind=BIAS_T5, bias_tensor=t, bias_lut=lut,
                    bias_ints=(int(self.max_distance), half, int(bool(self.bidirectional))))


@dataclass(frozen=True, eq=False)
class ManhattanDecay:
    """RMT's 2-D decay: bias = log_gamma_h·(|row_q − row_k| + |col_q − col_k|).

    row = pos // width, col = pos % width (row-major flattened grid positions). ``log_gamma``
    (H,) receives gradients when it requires grad (RMT keeps it fixed:
    log(1 − 2^(−a − r·h/H))).
    """
    log_gamma: torch.Tensor
    width: int

    def __post_init__(self):
        _check_float_tensor(self.log_gamma, "ManhattanDecay log_gamma")
        if self.log_gamma.dim() != 1:
            raise ValueError(f"ManhattanDecay log_gamma must be (H,), got {tuple(self.log_gamma.shape)}")
        if not (isinstance(self.width, numbers.Integral) and self.width >= 1):
            raise ValueError(f"ManhattanDecay width={self.width!r} must be a positive int (the grid's row length)")

    def distance(self, q_pos, k_pos):
        qp, kp = q_pos[:, None, :, None], k_pos[:, None, None, :]
        w = int(self.width)
        return (qp // w - kp // w).abs() + (qp % w - kp % w).abs()

    def check(self, B, H, device):
        _check_heads(self.log_gamma, "ManhattanDecay log_gamma", H, device, "(H,)")

    def reference_bias(self, q_pos, k_pos, H):
        return self.log_gamma[None, :, None, None] * self.distance(q_pos, k_pos).to(self.log_gamma.dtype)

    def kernel_args(self, B, H, device):
        self.check(B, H, device)
        t = self.log_gamma.float()
        return dict(bias_kind=BIAS_MANHATTAN, bias_tensor=t,
                    bias_ints=(int(self.width), 0, 0))


@dataclass(frozen=True, eq=False)
class URPE(_ToeplitzTable):
    """URPE's post-softmax Toeplitz gate (Luo et al. 2022): p_ij ← p_ij·table[h, clamp(r) + M].

    ``table`` [H, 2M+1], same indexing as :class:`RelativeBias`; applied after the softmax
    normaliser (rows of the gated matrix need not sum to 1) and before dropout. Gradients
    flow into the table (dC = Σ dA·P over each offset).
    """
    table: torch.Tensor

    def reference_gate(self, q_pos, k_pos, H):
        return self.dense(q_pos, k_pos, H)

    def kernel_args(self, B, H, device):
        return dict(urpe_table=self.kernel_table(B, H, device), urpe_m=self.max_distance)


ROTARY_SPECS = (RoPE, XPos, RotaryAngles)
BIAS_SPECS = (ALiBi, RelativeBias, T5Bias, ManhattanDecay)


@dataclass
class KernelPositions:
    """The flattened position arguments of one kernel call (what the custom ops carry)."""
    rope_kind: int = ROPE_NONE
    rotary_dim: int = 0
    interleaved: bool = False
    rope_scale: float = 1.0
    rope_table: torch.Tensor | None = None
    q_angles: torch.Tensor | None = None
    k_angles: torch.Tensor | None = None
    bias_kind: int = BIAS_NONE
    bias_tensor: torch.Tensor | None = None
    bias_lut: torch.Tensor | None = None
    bias_ints: tuple = (0, 0, 0)
    urpe_table: torch.Tensor | None = None
    urpe_m: int = 0


def check_specs(rope, bias, urpe, q=None):
    """Spec types, and (given q) their shapes against q's batch and heads."""
    if rope is not None and not isinstance(rope, ROTARY_SPECS):
        raise TypeError(f"rope={rope!r} must be posattn.RoPE, posattn.XPos or posattn.RotaryAngles")
    if bias is not None and not isinstance(bias, BIAS_SPECS):
        raise TypeError(f"bias={bias!r} must be posattn.ALiBi, RelativeBias, T5Bias or ManhattanDecay (a dense "
                        f"bias tensor goes in attn_mask)")
    if urpe is not None and not isinstance(urpe, URPE):
        raise TypeError(f"urpe={urpe!r} must be posattn.URPE(table)")
    if q is not None:
        for spec in (bias, urpe):
            if spec is not None:
                spec.check(q.shape[0], q.shape[1], q.device)


def kernel_positions(rope, bias, urpe, q, k, q_pos, k_pos) -> KernelPositions:
    """Flatten the specs for the kernels; q_pos/k_pos are int offsets or position tensors."""
    kp = KernelPositions()
    B, H = q.shape[:2]
    if rope is not None:
        for key, value in rope.kernel_args(q, k, q_pos, k_pos).items():
            setattr(kp, key, value)
    if bias is not None:
        for key, value in bias.kernel_args(B, H, q.device).items():
            setattr(kp, key, value)
    if urpe is not None:
        for key, value in urpe.kernel_args(B, H, q.device).items():
            setattr(kp, key, value)
    return kp
