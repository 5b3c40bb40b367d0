// The interface between the op layer (ops.cpp, which sees torch tensors) and the kernels
// (attention_kernel.h, compiled once per instruction set). Plain C++ only: the kernel
// translation units include no torch header, so that no inline function compiled with
// AVX-512 flags can be merged by the linker into the portable build (and then run on a
// CPU without AVX-512).
#pragma once

#include <cstdint>

namespace posattn {

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

enum MaskKind : int { MASK_NONE = 0, MASK_BOOL = 1, MASK_FLOAT = 2 };
enum RopeKind : int { ROPE_NONE = 0, ROPE_FREQ = 1, ROPE_XPOS = 2, ROPE_ANGLES = 3 };
enum BiasKind : int { BIAS_NONE = 0, BIAS_ALIBI = 1, BIAS_RELATIVE = 2, BIAS_T5 = 3, BIAS_MANHATTAN = 4 };

// Runs body(ctx, begin, end) over [0, n) on the op layer's thread pool. Every task's
// result must not depend on which thread runs it (the kernels never reduce across tasks
// in a thread-dependent order), so any split is deterministic.
using Body = void (*)(void* ctx, int64_t begin, int64_t end);
using ParallelFor = void (*)(int64_t n, void* ctx, Body body);

// Where the entry of (batch b, head h, row i) of a per-row result sits, in elements from its
// pointer: contiguous [B, H, L, ..] results in a dense batch, [T, H, ..] rows or [H, T]
// entries in a sequence of a packed one.
struct RowStrides {
  int64_t b, h, l;
  int64_t at(int64_t bi, int64_t hi, int64_t i) const { return bi * b + hi * h + i * l; }
};

// Everything both passes read. Strides are in elements; the last dim is contiguous.
struct AttnArgs {
  int64_t B, H, Hkv, L, S, D, Dv;
  DType dtype;
  const void* q; int64_t sq_b, sq_h, sq_l;
  const void* k; int64_t sk_b, sk_h, sk_l;
  const void* v; int64_t sv_b, sv_h, sv_l;
  // attn_mask: bool (uint8) or float32, read through broadcast strides over [B, H, L, S]
  int mask_kind; const void* mask; int64_t sm_b, sm_h, sm_l, sm_s;
  // positions: int32 tensors [B or 1, n] (stride_b 0 when shared) or offset + index
  const int32_t* q_pos; int64_t sqp_b; int64_t q_offset;
  const int32_t* k_pos; int64_t skp_b; int64_t k_offset;
  bool causal; int64_t window_left, window_right;  // -1: unbounded on that side
  float scale, softcap, dropout_p;                 // softcap 0: off
  uint64_t seed; int64_t drop_row0, drop_key0;  // dropout: Philox key; global (row, key) of element (0, 0)
  int64_t drop_b0;                              // the counter's batch index of batch 0 (a packed sequence's index)
  // rotary: table = inv_freq [r/2] (+ log2(zeta)/scale_base [r/2] for xPos), or angles
  // (fp32, broadcast strides over [B, H|Hkv, n, r/2])
  int rope_kind, rotary_dim; bool interleaved; float rope_scale;
  const float* rope_table;
  const float* q_ang; int64_t sqa_b, sqa_h, sqa_l;
  const float* k_ang; int64_t ska_b, ska_h, ska_l;
  // bias: fp32 parameter (slopes [B|1, H], tables [H, T], log-decays [H]), T5 bucket LUT
  int bias_kind; const float* bias; int64_t sbias_b, sbias_h; const int32_t* bias_lut;
  int64_t bias_i0, bias_i1, bias_i2;
  // URPE gate table [H, 2M+1] fp32
  const float* urpe; int64_t surpe_h; int64_t urpe_m;
  // the forward's results: out [.., Dv] and lse (the backward reads lse and dlse with lse_s)
  RowStrides out_s, lse_s;
  ParallelFor parallel;
  // bf16 inputs multiplied as bf16 with fp32 sums, forward and backward (AMX tiles in the
  // amx build, AVX-512-BF16 dot instructions in the avx512 build); set by the op layer when
  // the chosen path has them
  bool bf16_dot;
};

// Backward outputs and scratch.
struct BwdArgs {
  const void* dout; int64_t sdo_b, sdo_h, sdo_l;
  const void* out; int64_t so_b, so_h, so_l;
  const float* lse;   // at AttnArgs::lse_s
  const float* dlse;  // at AttnArgs::lse_s, or null
  void* dq; void* dk; void* dv;  // in the input dtype at dq_s ([B, H, L, D] rows), dk_s, dv_s ([B, Hkv, S, ..])
  RowStrides dq_s, dk_s, dv_s;
  float* dmask;       // [B, H, L, S] or null: the float mask's gradient before reduction
  float* dq_ang;      // at dqa_s ([B, H, L, r/2] rows) or null
  float* dk_ang;      // at dka_s ([B, Hkv, S, r/2] rows) or null
  RowStrides dqa_s, dka_s;
  float* dbias;       // per task [B, H, C] (ALiBi, Manhattan) or [B, H, C, T] (tables), zeroed, or null
  float* durpe;       // per task [B, H, C, 2M+1], zeroed, or null
  int64_t chunks;     // C: query chunks per (batch, head)
  int64_t bias_T;     // entries of the bias table (tables) or 1
  float* dk_part;     // [B, H, C, pad_keys(S), pad_head(D)] zeroed scratch: each task's key gradient
  float* dv_part;     // [B, H, C, pad_keys(S), pad16(Dv)] zeroed scratch
};

// One problem of a call (a dense batch, or one sequence of a packed batch as a batch of one
// with every pointer at its first rows) and where its forward results go.
struct FwdProblem {
  AttnArgs a;
  void* out;
  float* lse;
};
struct BwdProblem {
  AttnArgs a;
  BwdArgs g;
};

// Decoding over a KV cache (attention_with_kvcache). `a` carries the queries and the score
// parameters (B, H, Hkv, L, D, Dv, dtype, q, causal, window, scale, softcap, rotary and bias
// specs; its S, k and v are unused): batch row b has S_b = seqlens[b] (+ L when new rows are
// appended) keys at positions 0 .. S_b − 1 and its queries at S_b − L .. S_b − 1.
struct DecodeArgs {
  AttnArgs a;
  void* k_cache; int64_t skc_b, skc_h, skc_s;  // [rows or pages, Hkv, slots, D]
  void* v_cache; int64_t svc_b, svc_h, svc_s;  // [rows or pages, Hkv, slots, Dv]
  const void* k_new; int64_t skn_b, skn_h, skn_l;  // [B, Hkv, L, D] rows to append, or null
  const void* v_new; int64_t svn_b, svn_h, svn_l;
  const int32_t* seqlens;      // [B] rows cached before the call
  const int32_t* batch_idx;    // [B] the cache row of each batch row, or null (row b)
  const int32_t* block_table;  // [B, pages] (row stride sbt_b) of a paged cache, or null
  int64_t sbt_b, page_size;
  int64_t splits;              // key ranges per (batch row, KV head, row block), merged exactly
  float* part_out;             // [B, H, L, splits, pad16(Dv)] scratch: each split's normalised output (splits > 1)
  float* part_lse;             // [B, H, L, splits] scratch: each split's lse (splits > 1)
  void* out;                   // [B, H, L, Dv] contiguous, q's dtype
  float* lse;                  // [B, H, L]
};

// Row padding of the packed fp32 operands (the micro-kernel works on whole vectors).
inline int64_t pad16(int64_t n) { return (n + 15) / 16 * 16; }
// The head dims as the kernels store them: whole vectors, and for bf16 dots whole 32-element
// tile rows (an AMX tile row holds 32 bf16; the zero padding adds nothing to a dot).
inline int64_t pad_head(int64_t n, bool bf16_dot) { return bf16_dot ? (n + 31) / 32 * 32 : pad16(n); }

// Query rows and keys per tile of the kernels (BM, BN in attention_kernel.h); the op layer
// sizes the backward's chunks and scratch with them.
constexpr int64_t QUERY_TILE = 64;
constexpr int64_t KEY_TILE = 128;
// Rows of the backward's per-task dK / dV scratch: whole key tiles (a tile's product is
// stored whole; the rows past S are never read).
inline int64_t pad_keys(int64_t S) { return (S + KEY_TILE - 1) / KEY_TILE * KEY_TILE; }

// Query-tile chunks per (batch, head) in the backward. Enough tasks to keep every core busy
// under causal imbalance when B·H is small (B: the sequences of a packed batch); one chunk
// per (batch, head) otherwise. A rule of the sizes only (never the thread count), so
// gradients are bitwise the same for any thread count.
inline int64_t backward_chunks(int64_t B, int64_t H, int64_t L) {
  const int64_t tiles = (L + QUERY_TILE - 1) / QUERY_TILE;
  const int64_t want = (32 + B * H - 1) / (B * H);
  return want < tiles ? want : (tiles > 1 ? tiles : 1);
}

// Blocks of query rows per (batch row, KV head) of a decode call: the rows are the H / Hkv query
// heads of the KV group times the L queries, QUERY_TILE to a block.
inline int64_t decode_row_blocks(int64_t H, int64_t Hkv, int64_t L) {
  return (H / Hkv * L + QUERY_TILE - 1) / QUERY_TILE;
}

namespace generic {
// Every problem's tasks in one parallel region.
void attention_forward(const FwdProblem* problems, int64_t n);
void attention_backward(const BwdProblem* problems, int64_t n);
void attention_decode(const DecodeArgs& d);
void dropout_mask(uint64_t seed, int64_t B, int64_t H, int64_t L, int64_t S, float p, bool* keep, ParallelFor par);
}  // namespace generic
namespace avx2 {
// Every problem's tasks in one parallel region.
void attention_forward(const FwdProblem* problems, int64_t n);
void attention_backward(const BwdProblem* problems, int64_t n);
void attention_decode(const DecodeArgs& d);
void dropout_mask(uint64_t seed, int64_t B, int64_t H, int64_t L, int64_t S, float p, bool* keep, ParallelFor par);
}  // namespace avx2
namespace avx512 {
// Every problem's tasks in one parallel region.
void attention_forward(const FwdProblem* problems, int64_t n);
void attention_backward(const BwdProblem* problems, int64_t n);
void attention_decode(const DecodeArgs& d);
void dropout_mask(uint64_t seed, int64_t B, int64_t H, int64_t L, int64_t S, float p, bool* keep, ParallelFor par);
}  // namespace avx512
namespace amx {
// Every problem's tasks in one parallel region.
void attention_forward(const FwdProblem* problems, int64_t n);
void attention_backward(const BwdProblem* problems, int64_t n);
void attention_decode(const DecodeArgs& d);
void dropout_mask(uint64_t seed, int64_t B, int64_t H, int64_t L, int64_t S, float p, bool* keep, ParallelFor par);
// Asks Linux for the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM); false where refused.
bool request_tiles();
}  // namespace amx

}  // namespace posattn
