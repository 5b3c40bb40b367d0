// The CPU backend's ops: argument checks, allocation, the instruction-set dispatch and
// the deterministic reductions. The kernels themselves (attention_kernel.h) see no torch
// type; this file turns tensors into AttnArgs / BwdArgs.
//
// Schemas match posattn::triton_attention_{fwd,bwd} and posattn::triton_attention_varlen_{fwd,bwd}
// (python/posattn/ops.py), which registers the fake implementations and autograd for both backends.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "attention.h"

namespace posattn {
namespace {

using at::Tensor;
using c10::optional;

#if defined(POSATTN_HAVE_AMX)
// AMX-TILE and AMX-BF16 (CPUID.(7,0):EDX bits 24, 22), the tile state enabled by the OS in
// XCR0 (bits 17, 18), and Linux's per-process permission for it (asked once).
bool amx_usable() {
  static const bool usable = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 24) & 1) || !((d >> 22) & 1)) return false;
    if (!__get_cpuid_count(1, 0, &a, &b, &c, &d) || !((c >> 27) & 1)) return false;  // OSXSAVE
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if (((lo >> 17) & 3) != 3) return false;
    return amx::request_tiles();
  }();
  return usable;
}
#endif

bool cpu_supports(const char* feature) {
#if defined(POSATTN_HAVE_AVX512) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  const std::string f(feature);
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("fma");
  if (f == "avx512") return avx512;
  if (f == "avx512bf16") return avx512 && __builtin_cpu_supports("avx512bf16");
#if defined(POSATTN_HAVE_AMX)
  if (f == "amx") return avx512 && __builtin_cpu_supports("avx512bf16") && amx_usable();
#endif
  if (f == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
  (void)feature;
  return false;
}

// The kernel paths, best first; the portable one runs anywhere. A path is a build of
// attention_kernel.h and whether bf16 inputs are multiplied as bf16 (fp32 sums) or in fp32.
struct Kernels {
  const char* name;
  void (*forward)(const FwdProblem*, int64_t);
  void (*backward)(const BwdProblem*, int64_t);
  void (*decode)(const DecodeArgs&);
  void (*dropout_mask)(uint64_t, int64_t, int64_t, int64_t, int64_t, float, bool*, ParallelFor);
  bool bf16_dot;
};

const Kernels GENERIC{"generic", &generic::attention_forward, &generic::attention_backward, &generic::attention_decode,
                      &generic::dropout_mask, false};
#if defined(POSATTN_HAVE_AVX512)
const Kernels AVX2{"avx2", &avx2::attention_forward, &avx2::attention_backward, &avx2::attention_decode,
                   &avx2::dropout_mask, false};
const Kernels AVX512{"avx512", &avx512::attention_forward, &avx512::attention_backward, &avx512::attention_decode,
                     &avx512::dropout_mask, false};
const Kernels AVX512BF16{"avx512bf16", &avx512::attention_forward, &avx512::attention_backward,
                         &avx512::attention_decode, &avx512::dropout_mask, true};
#if defined(POSATTN_HAVE_AMX)
const Kernels AMX{"amx", &amx::attention_forward, &amx::attention_backward, &amx::attention_decode, &amx::dropout_mask,
                  true};
const Kernels* const BUILDS[] = {&AMX, &AVX512BF16, &AVX512, &AVX2, &GENERIC};
#else
const Kernels* const BUILDS[] = {&AVX512BF16, &AVX512, &AVX2, &GENERIC};
#endif
#else
const Kernels* const BUILDS[] = {&GENERIC};
#endif

std::string build_names() {
  std::string names;
  for (const Kernels* k : BUILDS) names += (names.empty() ? "'" : ", '") + std::string(k->name) + "'";
  return names;
}

// The best path this CPU runs, or the one POSATTN_CPU_ISA names (read at each call, so
// tests can force any of them).
const Kernels& kernels() {
  const char* env = std::getenv("POSATTN_CPU_ISA");
  const std::string want = env != nullptr ? env : "";
  for (const Kernels* k : BUILDS) {
    const bool runs = k == &GENERIC || cpu_supports(k->name);
    if (want.empty() && runs) return *k;
    if (want == k->name) {
      TORCH_CHECK(runs, "POSATTN_CPU_ISA=", want, " but this CPU (or its operating system) does not provide ", want,
                  "; unset it or pick one of ", build_names());
      return *k;
    }
  }
  TORCH_CHECK(false, "POSATTN_CPU_ISA=", want, " is not an instruction set of the CPU backend; use one of ",
              build_names(), " (or unset it)");
}

// Dynamic scheduling over the op layer's threads: tasks are pulled one at a time from a
// shared counter, so heavy tasks (long causal rows) balance. Which thread runs a task
// never changes its result.
void parallel(int64_t n, void* ctx, Body body) {
  if (n <= 0) return;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  if (threads <= 1 || at::in_parallel_region()) {
    body(ctx, 0, n);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) body(ctx, t, t + 1);
  });
}

DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kBFloat16: return DType::BF16;
    case at::kHalf: return DType::F16;
    default:
      TORCH_CHECK(false, "backend='cpu' takes float32, bfloat16 and float16, got ", t.scalar_type(),
                  "; float64 runs on backend='reference'");
  }
}

Tensor last_dim_contiguous(const Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// Tensors converted for the kernels, kept alive for the duration of one call.
struct Prepared {
  AttnArgs a{};
  Tensor q, k, v, mask, q_pos, k_pos, rope_table, q_ang, k_ang, bias, lut, urpe;
};

Tensor positions(const optional<Tensor>& pos, int64_t B, int64_t n, const char* name, int64_t& stride_b) {
  stride_b = 0;
  if (!pos.has_value()) return Tensor();
  const Tensor& p = *pos;
  TORCH_CHECK(p.device().is_cpu(), name, " is on ", p.device(), "; backend='cpu' needs CPU position tensors");
  TORCH_CHECK(!p.is_floating_point() && !p.is_complex() && p.scalar_type() != at::kBool, name,
              " must be an integer tensor, got ", p.scalar_type());
  TORCH_CHECK((p.dim() == 1 && p.size(0) == n) || (p.dim() == 2 && (p.size(0) == B || p.size(0) == 1) && p.size(1) == n),
              name, " has shape ", p.sizes(), "; expected (", n, ",) or (", B, " or 1, ", n, ")");
  if (p.numel() > 0) {
    const auto lo = p.min().item<int64_t>(), hi = p.max().item<int64_t>();
    TORCH_CHECK(lo >= -(int64_t{1} << 30) && hi < (int64_t{1} << 30), name, " holds positions in [", lo, ", ", hi,
                "]; the CPU kernels take positions of magnitude below 2^30");
  }
  Tensor out = p.to(at::kInt).contiguous();
  if (out.dim() == 2 && out.size(0) == B && B > 1) stride_b = n;
  return out;
}

Prepared prepare(const Tensor& q, const Tensor& k, const Tensor& v, const optional<Tensor>& attn_mask,
                 const optional<Tensor>& q_pos, const optional<Tensor>& k_pos, int64_t q_offset, int64_t k_offset,
                 bool causal, int64_t window_left, int64_t window_right, double softcap, double dropout_p,
                 const optional<Tensor>& seed, double scale, const optional<Tensor>& rope_table,
                 const optional<Tensor>& q_angles, const optional<Tensor>& k_angles,
                 const optional<Tensor>& bias_tensor, const optional<Tensor>& bias_lut,
                 const optional<Tensor>& urpe_table, at::IntArrayRef spec_ints, double rope_scale,
                 int64_t slope_rows = -1) {
  Prepared p;
  AttnArgs& a = p.a;
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be 4-d [B, H, L, D], got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  for (const Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->device().is_cpu(), "backend='cpu' needs CPU tensors, got one on ", t->device(),
                "; move the inputs with .cpu() or use backend='triton' for CUDA tensors");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  a.dtype = dtype_of(q);
  a.B = q.size(0); a.H = q.size(1); a.L = q.size(2); a.D = q.size(3);
  a.Hkv = k.size(1); a.S = k.size(2); a.Dv = v.size(3);
  TORCH_CHECK(k.size(0) == a.B && v.size(0) == a.B && v.size(1) == a.Hkv && v.size(2) == a.S && k.size(3) == a.D,
              "shapes q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes(),
              " do not match: expected k [B, Hkv, S, D] and v [B, Hkv, S, Dv]");
  TORCH_CHECK(a.Hkv > 0 && a.H % a.Hkv == 0, "k has ", a.Hkv, " heads but q has ", a.H,
              "; the query heads must be a multiple of the KV heads");
  TORCH_CHECK(a.D >= 1 && a.D <= 256 && a.Dv >= 1 && a.Dv <= 256, "head dims D=", a.D, ", Dv=", a.Dv,
              ": backend='cpu' takes head dims from 1 to 256; use backend='reference' for larger ones");
  TORCH_CHECK(a.L < (int64_t{1} << 30) && a.S < (int64_t{1} << 30), "sequence lengths must be below 2^30");
  p.q = last_dim_contiguous(q); p.k = last_dim_contiguous(k); p.v = last_dim_contiguous(v);
  a.q = p.q.data_ptr(); a.sq_b = p.q.stride(0); a.sq_h = p.q.stride(1); a.sq_l = p.q.stride(2);
  a.k = p.k.data_ptr(); a.sk_b = p.k.stride(0); a.sk_h = p.k.stride(1); a.sk_l = p.k.stride(2);
  a.v = p.v.data_ptr(); a.sv_b = p.v.stride(0); a.sv_h = p.v.stride(1); a.sv_l = p.v.stride(2);

  a.mask_kind = MASK_NONE;
  if (attn_mask.has_value()) {
    const Tensor& m = *attn_mask;
    TORCH_CHECK(m.device().is_cpu(), "attn_mask is on ", m.device(), "; backend='cpu' needs a CPU mask");
    TORCH_CHECK(m.dim() <= 4, "attn_mask has ", m.dim(), " dims; it must broadcast to [B, H, L, S]");
    Tensor mm = m.scalar_type() == at::kBool ? m : m.to(at::kFloat);
    a.mask_kind = m.scalar_type() == at::kBool ? MASK_BOOL : MASK_FLOAT;
    TORCH_CHECK(a.mask_kind == MASK_BOOL || m.is_floating_point(), "attn_mask must be bool or floating point, got ",
                m.scalar_type());
    p.mask = mm.expand({a.B, a.H, a.L, a.S});  // a view: broadcast dims get stride 0
    a.mask = p.mask.data_ptr();
    a.sm_b = p.mask.stride(0); a.sm_h = p.mask.stride(1); a.sm_l = p.mask.stride(2); a.sm_s = p.mask.stride(3);
  }
  p.q_pos = positions(q_pos, a.B, a.L, "q_pos", a.sqp_b);
  p.k_pos = positions(k_pos, a.B, a.S, "k_pos", a.skp_b);
  a.q_pos = p.q_pos.defined() ? p.q_pos.data_ptr<int32_t>() : nullptr;
  a.k_pos = p.k_pos.defined() ? p.k_pos.data_ptr<int32_t>() : nullptr;
  TORCH_CHECK(std::abs(q_offset) + a.L < (int64_t{1} << 30) && std::abs(k_offset) + a.S < (int64_t{1} << 30),
              "position offsets q_pos=", q_offset, ", k_pos=", k_offset, " are out of the CPU kernels' range (2^30)");
  a.q_offset = q_offset; a.k_offset = k_offset;
  a.causal = causal; a.window_left = window_left; a.window_right = window_right;
  a.scale = static_cast<float>(scale);
  a.softcap = static_cast<float>(softcap);
  a.dropout_p = static_cast<float>(dropout_p);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, "dropout_p=", dropout_p, " must be in [0, 1]");
  TORCH_CHECK(dropout_p == 0.0 || seed.has_value(), "dropout_p > 0 needs a seed tensor");
  // seed: [seed] or [seed, row, key], the last two offsetting the dropout counter's (row, key) so
  // that a block of a longer sequence (a ring shard) draws that sequence's mask
  a.seed = 0; a.drop_row0 = 0; a.drop_key0 = 0; a.drop_b0 = 0;
  if (seed.has_value()) {
    TORCH_CHECK(seed->numel() == 1 || seed->numel() == 3, "the dropout seed tensor holds 1 value (seed) or 3 (seed, "
                "row offset, key offset), got ", seed->numel());
    const Tensor s = seed->to(at::kCPU, at::kLong).contiguous();
    a.seed = static_cast<uint64_t>(s.data_ptr<int64_t>()[0]);
    if (s.numel() == 3) { a.drop_row0 = s.data_ptr<int64_t>()[1]; a.drop_key0 = s.data_ptr<int64_t>()[2]; }
  }

  TORCH_CHECK(spec_ints.size() == 8, "spec_ints must hold 8 ints, got ", spec_ints.size());
  a.rope_kind = static_cast<int>(spec_ints[0]);
  a.rotary_dim = static_cast<int>(spec_ints[1]);
  a.interleaved = spec_ints[2] != 0;
  a.rope_scale = static_cast<float>(rope_scale);
  TORCH_CHECK(a.rope_kind >= ROPE_NONE && a.rope_kind <= ROPE_ANGLES, "unknown rope kind ", a.rope_kind);
  if (a.rope_kind != ROPE_NONE) {
    TORCH_CHECK(a.rotary_dim >= 2 && a.rotary_dim % 2 == 0 && a.rotary_dim <= a.D, "rotary_dim=", a.rotary_dim,
                " must be even and in [2, D=", a.D, "]");
  }
  const int64_t half = a.rotary_dim / 2;
  if (a.rope_kind == ROPE_FREQ || a.rope_kind == ROPE_XPOS) {
    TORCH_CHECK(rope_table.has_value() && rope_table->numel() >= 2 * half,
                "the rotary frequency table must hold 2 x rotary_dim/2 entries");
    p.rope_table = rope_table->to(at::kCPU, at::kFloat).contiguous();
    a.rope_table = p.rope_table.data_ptr<float>();
  } else if (a.rope_kind == ROPE_ANGLES) {
    TORCH_CHECK(q_angles.has_value(), "RotaryAngles needs q_angles");
    const Tensor ka = k_angles.has_value() ? *k_angles : *q_angles;
    TORCH_CHECK(q_angles->size(-1) == half && ka.size(-1) == half, "angles must have rotary_dim/2 = ", half,
                " entries in their last dim, got ", q_angles->sizes(), " and ", ka.sizes());
    p.q_ang = q_angles->to(at::kFloat).contiguous().expand({a.B, a.H, a.L, half});
    p.k_ang = ka.to(at::kFloat).contiguous().expand({a.B, a.Hkv, a.S, half});
    a.q_ang = p.q_ang.data_ptr<float>();
    a.sqa_b = p.q_ang.stride(0); a.sqa_h = p.q_ang.stride(1); a.sqa_l = p.q_ang.stride(2);
    a.k_ang = p.k_ang.data_ptr<float>();
    a.ska_b = p.k_ang.stride(0); a.ska_h = p.k_ang.stride(1); a.ska_l = p.k_ang.stride(2);
  }

  a.bias_kind = static_cast<int>(spec_ints[3]);
  a.bias_i0 = spec_ints[4]; a.bias_i1 = spec_ints[5]; a.bias_i2 = spec_ints[6];
  TORCH_CHECK(a.bias_kind >= BIAS_NONE && a.bias_kind <= BIAS_MANHATTAN, "unknown bias kind ", a.bias_kind);
  if (a.bias_kind != BIAS_NONE) {
    TORCH_CHECK(bias_tensor.has_value(), "the position bias needs its parameter tensor");
    p.bias = bias_tensor->to(at::kFloat).contiguous();
    a.bias = p.bias.data_ptr<float>();
    const Tensor& t = p.bias;
    if (a.bias_kind == BIAS_ALIBI) {
      // one row of slopes per batch, or per sequence of a packed batch (slope_rows)
      const int64_t rows = slope_rows < 0 ? a.B : slope_rows;
      TORCH_CHECK((t.dim() == 1 && t.size(0) == a.H) ||
                  (t.dim() == 2 && (t.size(0) == rows || t.size(0) == 1) && t.size(1) == a.H),
                  "ALiBi slopes have shape ", t.sizes(), "; expected (", a.H, ",) or (", rows, " or 1, ", a.H, ")");
      a.sbias_b = t.dim() == 2 && t.size(0) > 1 ? t.stride(0) : 0;
      a.sbias_h = t.stride(t.dim() - 1);
    } else if (a.bias_kind == BIAS_MANHATTAN) {
      TORCH_CHECK(t.dim() == 1 && t.size(0) == a.H, "ManhattanDecay log_gamma has shape ", t.sizes(),
                  "; expected (", a.H, ",)");
      TORCH_CHECK(a.bias_i0 >= 1, "ManhattanDecay width must be >= 1, got ", a.bias_i0);
      a.sbias_b = 0; a.sbias_h = 1;
    } else {
      TORCH_CHECK(t.dim() == 2 && t.size(0) == a.H, "the bias table has shape ", t.sizes(), "; expected (", a.H,
                  ", T) for ", a.H, " heads");
      a.sbias_b = 0; a.sbias_h = t.stride(0);
      if (a.bias_kind == BIAS_RELATIVE) {
        TORCH_CHECK(a.bias_i0 >= 0 && t.size(1) == 2 * a.bias_i0 + 1, "RelativeBias table has ", t.size(1),
                    " entries per head; expected 2M+1 = ", 2 * a.bias_i0 + 1);
      } else {
        TORCH_CHECK(bias_lut.has_value() && bias_lut->numel() == a.bias_i0 + 1,
                    "T5Bias needs its bucket table of max_distance + 1 entries");
        p.lut = bias_lut->to(at::kCPU, at::kInt).contiguous();
        a.bias_lut = p.lut.data_ptr<int32_t>();
        const int64_t top = p.lut.max().item<int64_t>() + a.bias_i1;
        TORCH_CHECK(p.lut.min().item<int64_t>() >= 0 && top < t.size(1), "T5Bias buckets reach ", top,
                    " but the table has ", t.size(1), " buckets per head");
      }
    }
  }
  a.urpe_m = spec_ints[7];
  if (urpe_table.has_value()) {
    const Tensor& u = *urpe_table;
    TORCH_CHECK(u.dim() == 2 && u.size(0) == a.H && u.size(1) == 2 * a.urpe_m + 1, "the URPE table has shape ",
                u.sizes(), "; expected (", a.H, ", ", 2 * a.urpe_m + 1, ")");
    p.urpe = u.to(at::kFloat).contiguous();
    a.urpe = p.urpe.data_ptr<float>();
    a.surpe_h = p.urpe.stride(0);
  }
  a.out_s = {a.H * a.L * a.Dv, a.L * a.Dv, a.Dv};  // contiguous [B, H, L, Dv] and [B, H, L]
  a.lse_s = {a.H * a.L, a.L, 1};
  a.parallel = &parallel;
  // xPos keeps fp32 operands (its decays exceed bf16's precision budget), as on the GPU.
  a.bf16_dot = a.dtype == DType::BF16 && a.rope_kind != ROPE_XPOS && kernels().bf16_dot;
  return p;
}

// Sum a contiguous fp32 [B, H, L, S]-like gradient over the dims that `shape` broadcasts,
// each output element summed by one thread in index order (bitwise reproducible).
Tensor sum_to_shape(const Tensor& full, at::IntArrayRef shape) {
  TORCH_INTERNAL_ASSERT(full.dim() == 4 && full.is_contiguous());
  std::vector<int64_t> s4(4 - shape.size(), 1);
  s4.insert(s4.end(), shape.begin(), shape.end());
  bool same = true;
  for (int d = 0; d < 4; ++d) same = same && s4[d] == full.size(d);
  if (same) return full.reshape(shape);
  Tensor out = at::zeros(s4, full.options());
  const int64_t F0 = full.size(0), F1 = full.size(1), F2 = full.size(2), F3 = full.size(3);
  const float* src = full.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t rows = s4[0] * s4[1] * s4[2];
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o0 = r / (s4[1] * s4[2]), o1 = (r / s4[2]) % s4[1], o2 = r % s4[2];
      float* o = dst + r * s4[3];
      for (int64_t i0 = 0; i0 < F0; ++i0) {
        if (s4[0] != 1 && i0 != o0) continue;
        for (int64_t i1 = 0; i1 < F1; ++i1) {
          if (s4[1] != 1 && i1 != o1) continue;
          for (int64_t i2 = 0; i2 < F2; ++i2) {
            if (s4[2] != 1 && i2 != o2) continue;
            const float* x = src + ((i0 * F1 + i1) * F2 + i2) * F3;
            if (s4[3] == 1) {
              for (int64_t i3 = 0; i3 < F3; ++i3) o[0] += x[i3];
            } else {
              for (int64_t i3 = 0; i3 < F3; ++i3) o[i3] += x[i3];
            }
          }
        }
      }
    }
  });
  return out.reshape(shape);
}

// The per-task partial sums of a parameter gradient, [H, C_b, T] for each batch (or sequence)
// b in turn, summed over the chunks (and the batches unless per_batch) in a fixed order:
// [H, T] (or [B, H, T]).
Tensor sum_parts(const Tensor& part, int64_t H, int64_t T, const std::vector<int64_t>& chunks, bool per_batch) {
  const int64_t B = static_cast<int64_t>(chunks.size());
  Tensor out = per_batch ? at::zeros({B, H, T}, part.options()) : at::zeros({H, T}, part.options());
  const float* x = part.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t c = 0; c < chunks[b]; ++c, x += T) {
        float* o = dst + ((per_batch ? b * H : 0) + h) * T;
        for (int64_t t = 0; t < T; ++t) o[t] += x[t];
      }
  return out;
}

// The spec tensors' gradients into the backward ops' list [dq, dk, dv, mask, q angles, k angles,
// bias, urpe] (empty: no gradient): angle gradients summed to the angles' shapes, the per-task
// bias / URPE partial sums (chunks: C per batch or sequence) reduced.
void spec_grads(std::vector<Tensor>& grads, const Prepared& p, const Tensor& dq_ang, const Tensor& dk_ang,
                const optional<Tensor>& q_angles, const optional<Tensor>& k_angles, const Tensor& dbias_part,
                const optional<Tensor>& bias_tensor, const Tensor& durpe_part, const optional<Tensor>& urpe_table,
                const std::vector<int64_t>& chunks) {
  const AttnArgs& a = p.a;
  if (dq_ang.defined()) {
    Tensor gq = sum_to_shape(dq_ang, q_angles->sizes());
    Tensor gk = sum_to_shape(dk_ang, (k_angles.has_value() ? *k_angles : *q_angles).sizes());
    if (k_angles.has_value()) {
      grads[4] = gq.to(q_angles->scalar_type());
      grads[5] = gk.to(k_angles->scalar_type());
    } else {
      grads[4] = (gq + gk).to(q_angles->scalar_type());
    }
  }
  const int64_t B = static_cast<int64_t>(chunks.size());
  if (dbias_part.defined()) {
    const bool per_batch = a.bias_kind == BIAS_ALIBI && p.bias.dim() == 2 && p.bias.size(0) == B && B > 1;
    grads[6] = sum_parts(dbias_part, a.H, dbias_part.size(-1), chunks, per_batch)
                   .reshape(bias_tensor->sizes()).to(bias_tensor->scalar_type());
  }
  if (durpe_part.defined())
    grads[7] = sum_parts(durpe_part, a.H, durpe_part.size(-1), chunks, false).to(urpe_table->scalar_type());
}

std::tuple<Tensor, Tensor> cpu_attention_fwd(
    const Tensor& q, const Tensor& k, const Tensor& v, const optional<Tensor>& attn_mask,
    const optional<Tensor>& q_pos, const optional<Tensor>& k_pos, int64_t q_offset, int64_t k_offset, bool causal,
    int64_t window_left, int64_t window_right, double softcap, double dropout_p, const optional<Tensor>& seed,
    double scale, const optional<Tensor>& rope_table, const optional<Tensor>& q_angles,
    const optional<Tensor>& k_angles, const optional<Tensor>& bias_tensor, const optional<Tensor>& bias_lut,
    const optional<Tensor>& urpe_table, at::IntArrayRef spec_ints, double rope_scale, bool deterministic) {
  (void)deterministic;  // the CPU backend is always deterministic
  Prepared p = prepare(q, k, v, attn_mask, q_pos, k_pos, q_offset, k_offset, causal, window_left, window_right,
                       softcap, dropout_p, seed, scale, rope_table, q_angles, k_angles, bias_tensor, bias_lut,
                       urpe_table, spec_ints, rope_scale);
  const AttnArgs& a = p.a;
  Tensor out = at::empty({a.B, a.H, a.L, a.Dv}, q.options());
  Tensor lse = at::empty({a.B, a.H, a.L}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  const FwdProblem problem{a, out.data_ptr(), lse.data_ptr<float>()};
  kernels().forward(&problem, 1);
  return {out, lse};
}

std::vector<Tensor> cpu_attention_bwd(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
    const optional<Tensor>& dlse, const optional<Tensor>& attn_mask, const optional<Tensor>& q_pos,
    const optional<Tensor>& k_pos, int64_t q_offset, int64_t k_offset, bool causal, int64_t window_left,
    int64_t window_right, double softcap, double dropout_p, const optional<Tensor>& seed, double scale,
    const optional<Tensor>& rope_table, const optional<Tensor>& q_angles, const optional<Tensor>& k_angles,
    const optional<Tensor>& bias_tensor, const optional<Tensor>& bias_lut, const optional<Tensor>& urpe_table,
    at::IntArrayRef spec_ints, double rope_scale, bool deterministic, bool mask_grad, bool angle_grad,
    bool bias_grad, bool urpe_grad) {
  (void)deterministic;
  Prepared p = prepare(q, k, v, attn_mask, q_pos, k_pos, q_offset, k_offset, causal, window_left, window_right,
                       softcap, dropout_p, seed, scale, rope_table, q_angles, k_angles, bias_tensor, bias_lut,
                       urpe_table, spec_ints, rope_scale);
  const AttnArgs& a = p.a;
  TORCH_CHECK(dout.sizes() == out.sizes() && out.sizes() == at::IntArrayRef({a.B, a.H, a.L, a.Dv}),
              "dout and out must be [B, H, L, Dv]");
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({a.B, a.H, a.L}) && lse.scalar_type() == at::kFloat,
              "lse must be float32 [B, H, L]");
  const Tensor d_out = last_dim_contiguous(dout.to(q.scalar_type()));
  const Tensor o = last_dim_contiguous(out);
  const Tensor l = lse.contiguous();
  Tensor dl;
  if (dlse.has_value()) dl = dlse->to(at::kFloat).contiguous();

  const int64_t C = backward_chunks(a.B, a.H, a.L);
  const int64_t Dp = pad_head(a.D, a.bf16_dot), Dvp = pad16(a.Dv), Sp = pad_keys(a.S), half = a.rotary_dim / 2;
  auto f32 = q.options().dtype(at::kFloat);
  Tensor dq = at::empty({a.B, a.H, a.L, a.D}, q.options());
  Tensor dk = at::empty({a.B, a.Hkv, a.S, a.D}, q.options());
  Tensor dv = at::empty({a.B, a.Hkv, a.S, a.Dv}, q.options());
  Tensor dk_part = at::zeros({a.B, a.H, C, Sp, Dp}, f32);
  Tensor dv_part = at::zeros({a.B, a.H, C, Sp, Dvp}, f32);
  mask_grad = mask_grad && a.mask_kind == MASK_FLOAT;
  angle_grad = angle_grad && a.rope_kind == ROPE_ANGLES;
  bias_grad = bias_grad && a.bias_kind != BIAS_NONE;
  urpe_grad = urpe_grad && a.urpe != nullptr;
  Tensor dmask_full = mask_grad ? at::zeros({a.B, a.H, a.L, a.S}, f32) : Tensor();
  Tensor dq_ang = angle_grad ? at::zeros({a.B, a.H, a.L, half}, f32) : Tensor();
  Tensor dk_ang = angle_grad ? at::zeros({a.B, a.Hkv, a.S, half}, f32) : Tensor();
  const bool scalar_bias = a.bias_kind == BIAS_ALIBI || a.bias_kind == BIAS_MANHATTAN;
  const int64_t T = bias_grad && !scalar_bias ? p.bias.size(1) : 1;
  Tensor dbias_part = bias_grad ? at::zeros({a.B, a.H, C, T}, f32) : Tensor();
  Tensor durpe_part = urpe_grad ? at::zeros({a.B, a.H, C, 2 * a.urpe_m + 1}, f32) : Tensor();

  BwdArgs g{};
  g.dout = d_out.data_ptr(); g.sdo_b = d_out.stride(0); g.sdo_h = d_out.stride(1); g.sdo_l = d_out.stride(2);
  g.out = o.data_ptr(); g.so_b = o.stride(0); g.so_h = o.stride(1); g.so_l = o.stride(2);
  g.lse = l.data_ptr<float>();
  g.dlse = dl.defined() ? dl.data_ptr<float>() : nullptr;
  g.dq = dq.data_ptr(); g.dk = dk.data_ptr(); g.dv = dv.data_ptr();
  g.dq_s = {a.H * a.L * a.D, a.L * a.D, a.D};
  g.dk_s = {a.Hkv * a.S * a.D, a.S * a.D, a.D};
  g.dv_s = {a.Hkv * a.S * a.Dv, a.S * a.Dv, a.Dv};
  g.dmask = mask_grad ? dmask_full.data_ptr<float>() : nullptr;
  g.dq_ang = angle_grad ? dq_ang.data_ptr<float>() : nullptr;
  g.dk_ang = angle_grad ? dk_ang.data_ptr<float>() : nullptr;
  g.dqa_s = {a.H * a.L * half, a.L * half, half};
  g.dka_s = {a.Hkv * a.S * half, a.S * half, half};
  g.dbias = bias_grad ? dbias_part.data_ptr<float>() : nullptr;
  g.durpe = urpe_grad ? durpe_part.data_ptr<float>() : nullptr;
  g.chunks = C;
  g.bias_T = T;
  g.dk_part = dk_part.data_ptr<float>();
  g.dv_part = dv_part.data_ptr<float>();
  // (L or S = 0 too: the kernels write the zero gradients of the other side)
  const BwdProblem problem{a, g};
  kernels().backward(&problem, 1);

  // an empty tensor stands for "no gradient" (ops cannot return None); outputs must not alias
  std::vector<Tensor> grads{dq, dk, dv};
  for (int i = 0; i < 5; ++i) grads.push_back(q.new_empty({0}));
  if (mask_grad) grads[3] = sum_to_shape(dmask_full, attn_mask->sizes()).to(attn_mask->scalar_type());
  spec_grads(grads, p, dq_ang, dk_ang, q_angles, k_angles, dbias_part, bias_tensor, durpe_part, urpe_table,
             std::vector<int64_t>(a.B, C));
  return grads;
}

// ---------------------------------------------------------------------------------------
// packed batches (attention_varlen): every sequence a problem of its own, a batch of one
// whose pointers start at its first rows; the kernels run all of them in one parallel region
// ---------------------------------------------------------------------------------------

// The prefix sums [n+1] of a packed batch as host values, checked against the rows they cut.
std::vector<int64_t> prefix_sums(const Tensor& cu, const char* name, int64_t total, const char* rows) {
  TORCH_CHECK(cu.dim() == 1 && cu.numel() >= 1 && (cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong),
              name, " must be a 1-d int32 (or int64) tensor of n+1 prefix sums, got ", cu.scalar_type(), " of shape ",
              cu.sizes());
  TORCH_CHECK(cu.device().is_cpu(), name, " is on ", cu.device(), "; backend='cpu' needs CPU tensors");
  const Tensor c = cu.to(at::kLong).contiguous();
  const int64_t* x = c.data_ptr<int64_t>();
  std::vector<int64_t> out(x, x + c.numel());
  TORCH_CHECK(out[0] == 0, name, "[0] = ", out[0], "; the prefix sums start at 0");
  for (size_t i = 1; i < out.size(); ++i)
    TORCH_CHECK(out[i] >= out[i - 1], name, " decreases at index ", i, " (", out[i - 1], " -> ", out[i],
                "); sequence lengths cannot be negative");
  TORCH_CHECK(out.back() == total, name, "[-1] = ", out.back(), " but ", rows, " has ", total,
              " rows; the last prefix sum is the number of packed rows");
  return out;
}

// A packed [T, heads, dim] tensor seen as the dense [1, heads, T, dim] (the same memory).
Tensor as_batch(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3, name, " must be 3-d [total rows, heads, dim] in a packed batch, got shape ", t.sizes());
  return t.transpose(0, 1).unsqueeze(0);
}

const void* shift(const void* base, int64_t elements, DType dt) {
  return static_cast<const char*>(base) + elements * (dt == DType::F32 ? 4 : 2);
}
void* shift(void* base, int64_t elements, DType dt) {
  return static_cast<char*>(base) + elements * (dt == DType::F32 ? 4 : 2);
}

struct Pack {
  Prepared p;
  std::vector<int64_t> cq, ck;  // prefix sums
  int64_t n;
};

Pack prepare_pack(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens_q,
                  const Tensor& cu_seqlens_k, const optional<Tensor>& q_pos, const optional<Tensor>& k_pos,
                  int64_t q_offset, int64_t k_offset, bool causal, int64_t window_left, int64_t window_right,
                  double softcap, double dropout_p, const optional<Tensor>& seed, double scale,
                  const optional<Tensor>& rope_table, const optional<Tensor>& q_angles,
                  const optional<Tensor>& k_angles, const optional<Tensor>& bias_tensor,
                  const optional<Tensor>& bias_lut, const optional<Tensor>& urpe_table, at::IntArrayRef spec_ints,
                  double rope_scale) {
  Pack pk;
  const Tensor q4 = as_batch(q, "q"), k4 = as_batch(k, "k"), v4 = as_batch(v, "v");
  pk.cq = prefix_sums(cu_seqlens_q, "cu_seqlens_q", q.size(0), "q");
  pk.ck = prefix_sums(cu_seqlens_k, "cu_seqlens_k", k.size(0), "k");
  TORCH_CHECK(pk.cq.size() == pk.ck.size(), "cu_seqlens_q holds ", pk.cq.size() - 1, " sequences and cu_seqlens_k ",
              pk.ck.size() - 1, "; q and k must pack the same sequences");
  pk.n = static_cast<int64_t>(pk.cq.size()) - 1;
  pk.p = prepare(q4, k4, v4, c10::nullopt, q_pos, k_pos, q_offset, k_offset,
                 causal, window_left, window_right, softcap, dropout_p, seed, scale, rope_table, q_angles, k_angles,
                 bias_tensor, bias_lut, urpe_table, spec_ints, rope_scale, pk.n);
  TORCH_CHECK(!pk.p.q_pos.defined() || pk.p.q_pos.dim() == 1, "q_pos of a packed batch is 1-d [total query rows]");
  TORCH_CHECK(!pk.p.k_pos.defined() || pk.p.k_pos.dim() == 1, "k_pos of a packed batch is 1-d [total key rows]");
  return pk;
}

// Sequence s of the pack as a dense batch of one: inputs at its first rows, its own lengths,
// positions restarting (keys at k_offset + 0 .., queries bottom-right unless q_pos), its row
// of ALiBi slopes, its dropout counter (s·H + h, local row, local key), results in the packed
// [T, H, ..] / [H, T] layouts.
AttnArgs sequence(const Pack& pk, int64_t s) {
  const AttnArgs& a = pk.p.a;
  AttnArgs v = a;
  const int64_t q0 = pk.cq[s], k0 = pk.ck[s];
  v.B = 1;
  v.L = pk.cq[s + 1] - q0;
  v.S = pk.ck[s + 1] - k0;
  v.q = shift(a.q, q0 * a.sq_l, a.dtype);
  v.k = shift(a.k, k0 * a.sk_l, a.dtype);
  v.v = shift(a.v, k0 * a.sv_l, a.dtype);
  if (a.q_pos) v.q_pos = a.q_pos + q0; else v.q_offset = a.q_offset + v.S - v.L;
  if (a.k_pos) v.k_pos = a.k_pos + k0;
  if (a.q_ang) v.q_ang = a.q_ang + q0 * a.sqa_l;
  if (a.k_ang) v.k_ang = a.k_ang + k0 * a.ska_l;
  if (a.bias) v.bias = a.bias + s * a.sbias_b;
  v.sbias_b = 0;
  v.drop_b0 = s;
  v.out_s = {0, a.Dv, a.H * a.Dv};
  v.lse_s = {0, a.L, 1};  // a.L: the packed query rows
  return v;
}

// The sequences with the most work (L·S) first: their tasks start first and the short ones fill
// the gaps at the end of the region (the order changes which thread runs a task, never a result).
template <typename Problem>
void longest_first(std::vector<Problem>& problems) {
  std::stable_sort(problems.begin(), problems.end(),
                   [](const Problem& x, const Problem& y) { return x.a.L * x.a.S > y.a.L * y.a.S; });
}

std::tuple<Tensor, Tensor> cpu_attention_varlen_fwd(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
    const optional<Tensor>& q_pos, const optional<Tensor>& k_pos, int64_t q_offset, int64_t k_offset, bool causal,
    int64_t window_left, int64_t window_right, double softcap, double dropout_p, const optional<Tensor>& seed,
    double scale, const optional<Tensor>& rope_table, const optional<Tensor>& q_angles,
    const optional<Tensor>& k_angles, const optional<Tensor>& bias_tensor, const optional<Tensor>& bias_lut,
    const optional<Tensor>& urpe_table, at::IntArrayRef spec_ints, double rope_scale, bool deterministic) {
  (void)deterministic;  // the CPU backend is always deterministic
  const Pack pk = prepare_pack(q, k, v, cu_seqlens_q, cu_seqlens_k, q_pos, k_pos, q_offset, k_offset, causal,
                               window_left, window_right, softcap, dropout_p, seed, scale, rope_table, q_angles,
                               k_angles, bias_tensor, bias_lut, urpe_table, spec_ints, rope_scale);
  const AttnArgs& a = pk.p.a;
  Tensor out = at::empty({a.L, a.H, a.Dv}, q.options());
  Tensor lse = at::empty({a.H, a.L}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  std::vector<FwdProblem> problems;
  for (int64_t s = 0; s < pk.n; ++s) {
    const AttnArgs seq = sequence(pk, s);
    problems.push_back({seq, shift(out.data_ptr(), pk.cq[s] * a.H * a.Dv, a.dtype), lse.data_ptr<float>() + pk.cq[s]});
  }
  longest_first(problems);
  kernels().forward(problems.data(), pk.n);
  return {out, lse};
}

std::vector<Tensor> cpu_attention_varlen_bwd(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
    const optional<Tensor>& dlse, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
    const optional<Tensor>& q_pos, const optional<Tensor>& k_pos, int64_t q_offset, int64_t k_offset, bool causal,
    int64_t window_left, int64_t window_right, double softcap, double dropout_p, const optional<Tensor>& seed,
    double scale, const optional<Tensor>& rope_table, const optional<Tensor>& q_angles,
    const optional<Tensor>& k_angles, const optional<Tensor>& bias_tensor, const optional<Tensor>& bias_lut,
    const optional<Tensor>& urpe_table, at::IntArrayRef spec_ints, double rope_scale, bool deterministic,
    bool mask_grad, bool angle_grad, bool bias_grad, bool urpe_grad) {
  (void)deterministic;
  (void)mask_grad;  // no mask in a packed batch
  const Pack pk = prepare_pack(q, k, v, cu_seqlens_q, cu_seqlens_k, q_pos, k_pos, q_offset, k_offset, causal,
                               window_left, window_right, softcap, dropout_p, seed, scale, rope_table, q_angles,
                               k_angles, bias_tensor, bias_lut, urpe_table, spec_ints, rope_scale);
  const AttnArgs& a = pk.p.a;
  const int64_t Tq = a.L, Tk = a.S, n = pk.n;
  TORCH_CHECK(dout.sizes() == out.sizes() && out.sizes() == at::IntArrayRef({Tq, a.H, a.Dv}),
              "dout and out must be [Tq, H, Dv] = [", Tq, ", ", a.H, ", ", a.Dv, "], got ", dout.sizes(), " and ",
              out.sizes());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({a.H, Tq}) && lse.scalar_type() == at::kFloat,
              "lse must be float32 [H, Tq] = [", a.H, ", ", Tq, "]");
  const Tensor d_out = last_dim_contiguous(dout.to(q.scalar_type()));
  const Tensor o = last_dim_contiguous(out);
  const Tensor l = lse.contiguous();
  Tensor dl;
  if (dlse.has_value()) dl = dlse->to(at::kFloat).contiguous();

  const int64_t Dp = pad_head(a.D, a.bf16_dot), Dvp = pad16(a.Dv), half = a.rotary_dim / 2;
  angle_grad = angle_grad && a.rope_kind == ROPE_ANGLES;
  bias_grad = bias_grad && a.bias_kind != BIAS_NONE;
  urpe_grad = urpe_grad && a.urpe != nullptr;
  const bool scalar_bias = a.bias_kind == BIAS_ALIBI || a.bias_kind == BIAS_MANHATTAN;
  const int64_t T = bias_grad && !scalar_bias ? pk.p.bias.size(1) : 1, U = 2 * a.urpe_m + 1;
  // each sequence's chunks and its share of the scratch (per task: keys padded to whole tiles)
  std::vector<int64_t> chunks(n);
  int64_t key_rows = 0, parts = 0;
  for (int64_t s = 0; s < n; ++s) {
    chunks[s] = backward_chunks(n, a.H, pk.cq[s + 1] - pk.cq[s]);
    key_rows += a.H * chunks[s] * pad_keys(pk.ck[s + 1] - pk.ck[s]);
    parts += a.H * chunks[s];
  }
  auto f32 = q.options().dtype(at::kFloat);
  Tensor dq = at::empty({Tq, a.H, a.D}, q.options());
  Tensor dk = at::empty({Tk, a.Hkv, a.D}, q.options());
  Tensor dv = at::empty({Tk, a.Hkv, a.Dv}, q.options());
  Tensor dk_part = at::zeros({key_rows, Dp}, f32);
  Tensor dv_part = at::zeros({key_rows, Dvp}, f32);
  Tensor dq_ang = angle_grad ? at::zeros({1, a.H, Tq, half}, f32) : Tensor();
  Tensor dk_ang = angle_grad ? at::zeros({1, a.Hkv, Tk, half}, f32) : Tensor();
  Tensor dbias_part = bias_grad ? at::zeros({parts, T}, f32) : Tensor();
  Tensor durpe_part = urpe_grad ? at::zeros({parts, U}, f32) : Tensor();

  std::vector<BwdProblem> problems;
  int64_t rows_done = 0, parts_done = 0;
  for (int64_t s = 0; s < n; ++s) {
    const int64_t q0 = pk.cq[s], k0 = pk.ck[s];
    BwdProblem pr{sequence(pk, s), BwdArgs{}};
    BwdArgs& g = pr.g;
    g.dout = shift(d_out.data_ptr(), q0 * d_out.stride(0), a.dtype);
    g.sdo_b = 0; g.sdo_h = d_out.stride(1); g.sdo_l = d_out.stride(0);
    g.out = shift(o.data_ptr(), q0 * o.stride(0), a.dtype);
    g.so_b = 0; g.so_h = o.stride(1); g.so_l = o.stride(0);
    g.lse = l.data_ptr<float>() + q0;
    g.dlse = dl.defined() ? dl.data_ptr<float>() + q0 : nullptr;
    g.dq = shift(dq.data_ptr(), q0 * a.H * a.D, a.dtype);
    g.dk = shift(dk.data_ptr(), k0 * a.Hkv * a.D, a.dtype);
    g.dv = shift(dv.data_ptr(), k0 * a.Hkv * a.Dv, a.dtype);
    g.dq_s = {0, a.D, a.H * a.D};
    g.dk_s = {0, a.D, a.Hkv * a.D};
    g.dv_s = {0, a.Dv, a.Hkv * a.Dv};
    g.dmask = nullptr;
    g.dq_ang = angle_grad ? dq_ang.data_ptr<float>() + q0 * half : nullptr;
    g.dk_ang = angle_grad ? dk_ang.data_ptr<float>() + k0 * half : nullptr;
    g.dqa_s = {0, Tq * half, half};
    g.dka_s = {0, Tk * half, half};
    g.dbias = bias_grad ? dbias_part.data_ptr<float>() + parts_done * T : nullptr;
    g.durpe = urpe_grad ? durpe_part.data_ptr<float>() + parts_done * U : nullptr;
    g.chunks = chunks[s];
    g.bias_T = T;
    g.dk_part = dk_part.data_ptr<float>() + rows_done * Dp;
    g.dv_part = dv_part.data_ptr<float>() + rows_done * Dvp;
    rows_done += a.H * chunks[s] * pad_keys(pr.a.S);
    parts_done += a.H * chunks[s];
    problems.push_back(pr);
  }
  longest_first(problems);
  kernels().backward(problems.data(), n);

  std::vector<Tensor> grads{dq, dk, dv};
  for (int i = 0; i < 5; ++i) grads.push_back(q.new_empty({0}));
  spec_grads(grads, pk.p, dq_ang, dk_ang, q_angles, k_angles, dbias_part, bias_tensor, durpe_part, urpe_table, chunks);
  return grads;
}

// ---------------------------------------------------------------------------------------
// decoding over a KV cache (attention_with_kvcache)
// ---------------------------------------------------------------------------------------

// Splits of each (batch row, KV head, row block)'s key range, from the work of those tasks (the
// rows' lengths; the threads take the tasks in turn as each finishes one). Fewer tasks than
// threads: enough splits for two tasks per thread. Otherwise none, unless one row is longer than
// a thread's fair share of all the work (one long request among short ones): then enough splits
// that its pieces fit that share. Each split keeps at least 4 key tiles.
int64_t decode_splits(int64_t units, const int32_t* lens, int64_t B, int64_t added) {
  if (units == 0) return 1;  // an empty batch or no query rows: nothing to split
  const int64_t threads = at::get_num_threads();
  int64_t longest = 0, total = 0;
  for (int64_t b = 0; b < B; ++b) {
    longest = std::max<int64_t>(longest, lens[b] + added);
    total += lens[b] + added;
  }
  const int64_t work = total * (units / std::max<int64_t>(B, 1));  // keys over all tasks
  int64_t want = 1;
  if (units < threads) want = (2 * threads + units - 1) / units;
  else if (longest * threads > work) want = (longest * threads + work - 1) / work;
  const int64_t most = std::max<int64_t>(1, longest / (4 * KEY_TILE));
  return std::max<int64_t>(1, std::min({want, most, int64_t{64}}));
}

// A cache index tensor (cache_batch_idx [B], block_table [B, pages]) as contiguous int32, its
// shape and every entry checked against the caches' first dim (`limit` rows or pages).
Tensor cache_indices(const Tensor& t, const char* name, const char* shape, int64_t dims, int64_t B, int64_t limit,
                     const char* what) {
  TORCH_CHECK(t.dim() == dims && t.size(0) == B && t.device().is_cpu(), name, " must be a CPU int32 tensor ", shape,
              " with B = ", B, ", got ", t.sizes());
  Tensor out = t.to(at::kInt).contiguous();
  if (out.numel() > 0) {
    const int64_t lo = out.min().item<int64_t>(), hi = out.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < limit, name, " holds ", what, " in [", lo, ", ", hi, "] but the caches have ", limit,
                " ", what);
  }
  return out;
}

std::tuple<Tensor, Tensor> cpu_attention_kvcache(
    const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const optional<Tensor>& k,
    const optional<Tensor>& v, const Tensor& cache_seqlens, const optional<Tensor>& cache_batch_idx,
    const optional<Tensor>& block_table, bool causal, int64_t window_left, int64_t window_right, double softcap,
    double scale, const optional<Tensor>& rope_table, const optional<Tensor>& bias_tensor,
    const optional<Tensor>& bias_lut, at::IntArrayRef spec_ints, double rope_scale, int64_t num_splits) {
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && v_cache.dim() == 4,
              "q [B, H, L, D] and the caches [rows or pages, Hkv, slots, D*] must be 4-d, got ", q.sizes(), ", ",
              k_cache.sizes(), ", ", v_cache.sizes());
  TORCH_CHECK(k_cache.sizes().slice(0, 3) == v_cache.sizes().slice(0, 3), "k_cache ", k_cache.sizes(),
              " and v_cache ", v_cache.sizes(), " must agree in their first three dims");
  TORCH_CHECK(k_cache.stride(-1) == 1 && v_cache.stride(-1) == 1, "the caches' last dim must be contiguous");
  const int64_t B = q.size(0), L = q.size(2), Hkv = k_cache.size(1), slots = k_cache.size(2);
  // the score parameters through prepare(), the cache seen as a [B, Hkv, slots, D] view
  const Tensor kv = k_cache.as_strided({B, Hkv, slots, k_cache.size(3)}, {0, k_cache.stride(1), k_cache.stride(2), 1});
  const Tensor vv = v_cache.as_strided({B, Hkv, slots, v_cache.size(3)}, {0, v_cache.stride(1), v_cache.stride(2), 1});
  Prepared p = prepare(q, kv, vv, c10::nullopt, c10::nullopt, c10::nullopt, 0, 0, causal, window_left, window_right,
                       softcap, 0.0, c10::nullopt, scale, rope_table, c10::nullopt, c10::nullopt, bias_tensor,
                       bias_lut, c10::nullopt, spec_ints, rope_scale);
  const AttnArgs& a = p.a;
  TORCH_CHECK(a.rope_kind == ROPE_NONE || a.rope_kind == ROPE_FREQ,
              "attention_with_kvcache rotates with RoPE frequencies only (rope kind ", a.rope_kind, ")");
  TORCH_CHECK(a.urpe == nullptr, "attention_with_kvcache takes no URPE gate");
  TORCH_CHECK(k.has_value() == v.has_value(), "pass both new k and v, or neither");
  Tensor kn, vn;
  if (k.has_value()) {
    TORCH_CHECK(k->sizes() == at::IntArrayRef({B, Hkv, L, a.D}) && v->sizes() == at::IntArrayRef({B, Hkv, L, a.Dv}),
                "new k ", k->sizes(), " / v ", v->sizes(), " must be [B, Hkv, L, D] / [B, Hkv, L, Dv]");
    TORCH_CHECK(k->scalar_type() == q.scalar_type() && v->scalar_type() == q.scalar_type(),
                "new k and v must have q's dtype ", q.scalar_type());
    kn = last_dim_contiguous(*k);
    vn = last_dim_contiguous(*v);
  }
  TORCH_CHECK(cache_seqlens.device().is_cpu() && cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B,
              "cache_seqlens must be a CPU int tensor [B] = [", B, "], got ", cache_seqlens.sizes());
  const Tensor lens = cache_seqlens.to(at::kInt).contiguous();
  Tensor rows, table;
  DecodeArgs d{};
  d.a = a;
  if (block_table.has_value()) {
    TORCH_CHECK(!cache_batch_idx.has_value(), "a paged cache (block_table) takes no cache_batch_idx");
    table = cache_indices(*block_table, "block_table", "[B, pages]", 2, B, k_cache.size(0), "pages");
    d.block_table = table.data_ptr<int32_t>();
    d.sbt_b = table.size(1);
    d.page_size = slots;
  } else if (cache_batch_idx.has_value()) {
    rows = cache_indices(*cache_batch_idx, "cache_batch_idx", "[B]", 1, B, k_cache.size(0), "rows");
    d.batch_idx = rows.data_ptr<int32_t>();
  } else {
    TORCH_CHECK(k_cache.size(0) >= B, "the caches hold ", k_cache.size(0), " rows for a batch of ", B,
                "; pass cache_batch_idx");
  }
  const int64_t capacity = block_table.has_value() ? table.size(1) * slots : slots;
  const int32_t* n = lens.data_ptr<int32_t>();
  const int64_t added = k.has_value() ? L : 0;
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(n[b] >= 0 && n[b] + added <= capacity, "cache_seqlens[", b, "] = ", n[b], " plus ", added,
                " new rows does not fit a cache of ", capacity, " slots");
  TORCH_CHECK(num_splits >= 0, "num_splits=", num_splits, " must be >= 0");
  const int64_t units = B * Hkv * decode_row_blocks(a.H, Hkv, L);
  const int64_t P = num_splits > 0 ? num_splits : decode_splits(units, n, B, added);
  const int64_t Dvp = pad16(a.Dv);
  auto f32 = q.options().dtype(at::kFloat);
  Tensor out = at::empty({B, a.H, L, a.Dv}, q.options());
  Tensor lse = at::empty({B, a.H, L}, f32);
  // each split's normalised output and lse, merged after (one split writes out and lse itself)
  Tensor part_out = at::empty({P > 1 ? B : 0, a.H, L, P, Dvp}, f32);
  Tensor part_lse = at::empty({P > 1 ? B : 0, a.H, L, P}, f32);
  d.k_cache = k_cache.data_ptr();
  d.skc_b = k_cache.stride(0); d.skc_h = k_cache.stride(1); d.skc_s = k_cache.stride(2);
  d.v_cache = v_cache.data_ptr();
  d.svc_b = v_cache.stride(0); d.svc_h = v_cache.stride(1); d.svc_s = v_cache.stride(2);
  if (kn.defined()) {
    d.k_new = kn.data_ptr(); d.skn_b = kn.stride(0); d.skn_h = kn.stride(1); d.skn_l = kn.stride(2);
    d.v_new = vn.data_ptr(); d.svn_b = vn.stride(0); d.svn_h = vn.stride(1); d.svn_l = vn.stride(2);
  }
  d.seqlens = n;
  d.splits = P;
  d.part_out = part_out.data_ptr<float>();
  d.part_lse = part_lse.data_ptr<float>();
  d.out = out.data_ptr();
  d.lse = lse.data_ptr<float>();
  if (B > 0 && L > 0) kernels().decode(d);
  return {out, lse};
}

Tensor cpu_dropout_mask(int64_t seed, int64_t B, int64_t H, int64_t L, int64_t S, double p) {
  TORCH_CHECK(B >= 0 && H >= 0 && L >= 0 && S >= 0, "cpu_dropout_mask: sizes must be >= 0");
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "dropout_p=", p, " must be in [0, 1]");
  Tensor keep = at::empty({B, H, L, S}, at::TensorOptions().dtype(at::kBool));
  if (keep.numel() == 0) return keep;
  kernels().dropout_mask(static_cast<uint64_t>(seed), B, H, L, S, static_cast<float>(p), keep.data_ptr<bool>(),
                         &parallel);
  return keep;
}

std::string cpu_isa() { return kernels().name; }

// Every path this CPU runs, best first (what POSATTN_CPU_ISA may name here).
std::vector<std::string> cpu_isas() {
  std::vector<std::string> names;
  for (const Kernels* k : BUILDS)
    if (k == &GENERIC || cpu_supports(k->name)) names.emplace_back(k->name);
  return names;
}

}  // namespace
}  // namespace posattn

TORCH_LIBRARY(posattn, m) {
  m.def(
      "cpu_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? q_pos, Tensor? k_pos, "
      "SymInt q_offset, SymInt k_offset, bool causal, SymInt window_left, SymInt window_right, float softcap, float dropout_p, "
      "Tensor? seed, float scale, Tensor? rope_table, Tensor? q_angles, Tensor? k_angles, Tensor? bias_tensor, "
      "Tensor? bias_lut, Tensor? urpe_table, SymInt[] spec_ints, float rope_scale, bool deterministic) "
      "-> (Tensor, Tensor)");
  m.def(
      "cpu_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, "
      "Tensor? attn_mask, Tensor? q_pos, Tensor? k_pos, SymInt q_offset, SymInt k_offset, bool causal, SymInt window_left, "
      "SymInt window_right, float softcap, float dropout_p, Tensor? seed, float scale, Tensor? rope_table, "
      "Tensor? q_angles, Tensor? k_angles, Tensor? bias_tensor, Tensor? bias_lut, Tensor? urpe_table, "
      "SymInt[] spec_ints, float rope_scale, bool deterministic, bool mask_grad, bool angle_grad, bool bias_grad, "
      "bool urpe_grad) -> Tensor[]");
  m.def(
      "cpu_attention_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, Tensor? q_pos, "
      "Tensor? k_pos, SymInt q_offset, SymInt k_offset, bool causal, SymInt window_left, SymInt window_right, "
      "float softcap, float dropout_p, Tensor? seed, float scale, Tensor? rope_table, Tensor? q_angles, "
      "Tensor? k_angles, Tensor? bias_tensor, Tensor? bias_lut, Tensor? urpe_table, SymInt[] spec_ints, "
      "float rope_scale, bool deterministic) -> (Tensor, Tensor)");
  m.def(
      "cpu_attention_varlen_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, Tensor? q_pos, Tensor? k_pos, SymInt q_offset, SymInt k_offset, "
      "bool causal, SymInt window_left, SymInt window_right, float softcap, float dropout_p, Tensor? seed, "
      "float scale, Tensor? rope_table, Tensor? q_angles, Tensor? k_angles, Tensor? bias_tensor, Tensor? bias_lut, "
      "Tensor? urpe_table, SymInt[] spec_ints, float rope_scale, bool deterministic, bool mask_grad, "
      "bool angle_grad, bool bias_grad, bool urpe_grad) -> Tensor[]");
  m.def(
      "cpu_attention_kvcache(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k, Tensor? v, "
      "Tensor cache_seqlens, Tensor? cache_batch_idx, Tensor? block_table, bool causal, SymInt window_left, "
      "SymInt window_right, float softcap, float scale, Tensor? rope_table, Tensor? bias_tensor, Tensor? bias_lut, "
      "SymInt[] spec_ints, float rope_scale, SymInt num_splits) -> (Tensor, Tensor)");
  m.def("cpu_dropout_mask(int seed, int B, int H, int L, int S, float dropout_p) -> Tensor");
  m.def("cpu_isa() -> str");
  m.def("cpu_isas() -> str[]");
}

TORCH_LIBRARY_IMPL(posattn, CPU, m) {
  m.impl("cpu_attention_fwd", &posattn::cpu_attention_fwd);
  m.impl("cpu_attention_bwd", &posattn::cpu_attention_bwd);
  m.impl("cpu_attention_varlen_fwd", &posattn::cpu_attention_varlen_fwd);
  m.impl("cpu_attention_varlen_bwd", &posattn::cpu_attention_varlen_bwd);
  m.impl("cpu_attention_kvcache", &posattn::cpu_attention_kvcache);
}

TORCH_LIBRARY_IMPL(posattn, CompositeExplicitAutograd, m) {
  m.impl("cpu_dropout_mask", &posattn::cpu_dropout_mask);
  m.impl("cpu_isa", &posattn::cpu_isa);
  m.impl("cpu_isas", &posattn::cpu_isas);
}
