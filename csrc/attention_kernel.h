// The CPU attention kernels: flash-style forward and backward with every position
// feature. Included once per instruction set (attention_generic.cpp, attention_avx512.cpp)
// inside `namespace posattn::<isa>`; everything here has internal linkage, so the two
// builds never share a symbol.
//
// Layout of the work. A pre-pass packs K and V of every (batch, KV head) into fp32, K
// rotated (step 1 of the score pipeline, docs/semantics.md): K as transposed tiles [D][BN] for
// q·kᵀ and as rows [S][D] for dS·K; V as rows [S][Dv] for p·v and as transposed tiles for
// dO·vᵀ. Rows are padded to whole vectors with zeros, so the micro-kernel never masks.
// The forward runs one task per (batch, head, query tile) with the online softmax; the
// backward one task per (batch, head, chunk of query tiles), recomputing p from lse, with
// dQ finished in the task and dK / dV / table gradients accumulated into per-task partial
// buffers that a last pass reduces in a fixed order: the gradients are bitwise the same
// for any thread count. A call takes several problems (a packed batch: one per sequence, a
// batch of one whose pointers start at the sequence's first rows) and runs each pass over
// the tasks of all of them in one parallel region.

namespace {

constexpr int64_t BM = QUERY_TILE;  // query rows per tile
constexpr int64_t BN = 128; // keys per tile
constexpr int MR = 6;       // micro-kernel rows (6 x 4 vectors of accumulators)
constexpr float NEG_INF = -__builtin_inff();

// ---------------------------------------------------------------------------------------
// memory
// ---------------------------------------------------------------------------------------

template <typename T>
struct Array {
  T* p = nullptr;
  explicit Array(int64_t n, bool zero = false) {
    size_t bytes = (static_cast<size_t>(n > 0 ? n : 1) * sizeof(T) + 63) / 64 * 64;
    p = static_cast<T*>(aligned_alloc(64, bytes));
    if (p == nullptr) throw std::bad_alloc();
    if (zero) memset(p, 0, bytes);
  }
  ~Array() { free(p); }
  Array(const Array&) = delete;
  Array& operator=(const Array&) = delete;
};
using Buffer = Array<float>;
using Bf16Buffer = Array<uint16_t>;  // bf16 bits

// n heap objects, deleted together (no standard container: this header is compiled once per
// instruction set, and a container's out-of-line code could be shared between the builds).
template <typename T>
struct Owned {
  Array<T*> ptrs;
  int64_t n;
  T** p;
  explicit Owned(int64_t count) : ptrs(count, true), n(count), p(ptrs.p) {}
  ~Owned() {
    for (int64_t i = 0; i < n; ++i) delete p[i];
  }
  Owned(const Owned&) = delete;
  Owned& operator=(const Owned&) = delete;
};

// One parallel region over the tasks of several problems (a packed batch's sequences): task t
// is task t − first[s] of problem s, run by the problem's body with its context.
struct Regions {
  Array<int64_t> first;
  Array<void*> ctx;
  int64_t n;
  Body body;
  Regions(int64_t problems, Body b) : first(problems + 1, true), ctx(problems, true), n(problems), body(b) {}
  void add(int64_t s, void* c, int64_t tasks) {
    ctx.p[s] = c;
    first.p[s + 1] = first.p[s] + tasks;
  }
  static void run_body(void* vself, int64_t begin, int64_t end) {
    const Regions& r = *static_cast<const Regions*>(vself);
    while (begin < end) {
      int64_t lo = 0, hi = r.n - 1;  // the last problem whose first task is <= begin
      while (lo < hi) {
        const int64_t mid = (lo + hi + 1) / 2;
        if (r.first.p[mid] <= begin) lo = mid; else hi = mid - 1;
      }
      const int64_t stop = end < r.first.p[lo + 1] ? end : r.first.p[lo + 1];
      r.body(r.ctx.p[lo], begin - r.first.p[lo], stop - r.first.p[lo]);
      begin = stop;
    }
  }
  void run(ParallelFor parallel) { parallel(first.p[n], this, &run_body); }
};

// ---------------------------------------------------------------------------------------
// dtype conversion (bit-exact round-to-nearest-even, no library calls)
// ---------------------------------------------------------------------------------------

inline uint32_t f2u(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
inline float u2f(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }

inline float bf16_to_f32(uint16_t h) { return u2f(static_cast<uint32_t>(h) << 16); }
inline uint16_t f32_to_bf16(float x) {
  uint32_t u = f2u(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline float f16_to_f32(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t em = h & 0x7fffu;
  if (em >= 0x7c00u) return u2f(sign | 0x7f800000u | ((em & 0x3ffu) << 13));  // inf, NaN
  // normal and subnormal halves alike: shift into a float's bits and rescale by 2^112
  return u2f(f2u(u2f(em << 13) * 5.192296858534828e+33f) | sign);
}
inline uint16_t f32_to_f16(float x) {
  uint32_t f = f2u(x);
  uint32_t sign = f & 0x80000000u;
  f ^= sign;
  uint32_t o;
  if (f >= (127u + 16u) << 23) {  // ≥ 65536 (or inf / NaN): rounds to inf
    o = f > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (f < (113u << 23)) {  // below the smallest normal half: let the FPU round
    const float magic = 0.5f;
    o = f2u(u2f(f) + magic) - f2u(magic);
  } else {
    uint32_t odd = (f >> 13) & 1u;
    f += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + odd;
    o = f >> 13;
  }
  return static_cast<uint16_t>(o | (sign >> 16));
}

template <DType DT>
inline void load_row(const void* src, int64_t n, float* dst) {
  if constexpr (DT == DType::F32) {
    memcpy(dst, src, n * sizeof(float));
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (int64_t j = 0; j < n; ++j) dst[j] = DT == DType::BF16 ? bf16_to_f32(s[j]) : f16_to_f32(s[j]);
  }
}

template <DType DT>
inline void store_row(const float* src, int64_t n, void* dst) {
  if constexpr (DT == DType::F32) {
    memcpy(dst, src, n * sizeof(float));
  } else {
    uint16_t* d = static_cast<uint16_t*>(dst);
    for (int64_t j = 0; j < n; ++j) d[j] = DT == DType::BF16 ? f32_to_bf16(src[j]) : f32_to_f16(src[j]);
  }
}

template <DType DT>
inline const void* elem(const void* base, int64_t offset) {
  return static_cast<const char*>(base) + offset * (DT == DType::F32 ? 4 : 2);
}
template <DType DT>
inline void* elem(void* base, int64_t offset) {
  return static_cast<char*>(base) + offset * (DT == DType::F32 ? 4 : 2);
}

// ---------------------------------------------------------------------------------------
// the GEMM micro-kernel: C[M, N] (+)= A[M, K] · B[K, N]
//   A any strides (its elements are broadcast one at a time: a row-major tile or the
//   transpose of one), B rows contiguous, N a multiple of 16 (padded operands).
// ---------------------------------------------------------------------------------------

template <int R, int NV>
inline void micro(int64_t K, const float* A, int64_t ars, int64_t acs, const float* B, int64_t ldb, float* C,
                  int64_t ldc, bool accumulate) {
#if defined(__AVX512F__)
  __m512 c[R][NV];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) c[i][v] = accumulate ? _mm512_loadu_ps(C + i * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(B + k * ldb + 16 * v);
    const float* a = A + k * acs;
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      __m512 ai = _mm512_set1_ps(a[i * ars]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[i][v] = _mm512_fmadd_ps(ai, b[v], c[i][v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + i * ldc + 16 * v, c[i][v]);
#elif defined(__AVX2__) && defined(__FMA__)
  // 16 ymm registers: one 16-column group at a time (R x 2 accumulators), A re-broadcast per group
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    __m256 c[R][2];
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
      for (int u = 0; u < 2; ++u)
        c[i][u] = accumulate ? _mm256_loadu_ps(C + i * ldc + 16 * v + 8 * u) : _mm256_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
      const __m256 b0 = _mm256_loadu_ps(B + k * ldb + 16 * v), b1 = _mm256_loadu_ps(B + k * ldb + 16 * v + 8);
      const float* a = A + k * acs;
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) {
        const __m256 ai = _mm256_set1_ps(a[i * ars]);
        c[i][0] = _mm256_fmadd_ps(ai, b0, c[i][0]);
        c[i][1] = _mm256_fmadd_ps(ai, b1, c[i][1]);
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
      for (int u = 0; u < 2; ++u) _mm256_storeu_ps(C + i * ldc + 16 * v + 8 * u, c[i][u]);
  }
#else
  constexpr int W = 16 * NV;
  float c[R][W];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < W; ++j) c[i][j] = accumulate ? C[i * ldc + j] : 0.0f;
  for (int64_t k = 0; k < K; ++k) {
    const float* b = B + k * ldb;
    for (int i = 0; i < R; ++i) {
      const float ai = A[i * ars + k * acs];
      for (int j = 0; j < W; ++j) c[i][j] += ai * b[j];
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < W; ++j) C[i * ldc + j] = c[i][j];
#endif
}

// One instance per (rows, vectors): family K<R, NV>::fn for r rows (1..MR) and nv vectors (1..4).
template <template <int, int> class K, int R>
constexpr auto micro_for(int nv) {
  return nv == 1 ? K<R, 1>::fn : nv == 2 ? K<R, 2>::fn : nv == 3 ? K<R, 3>::fn : K<R, 4>::fn;
}

template <template <int, int> class K>
inline auto micro_fn(int r, int nv) {
  switch (r) {
    case 1: return micro_for<K, 1>(nv);
    case 2: return micro_for<K, 2>(nv);
    case 3: return micro_for<K, 3>(nv);
    case 4: return micro_for<K, 4>(nv);
    case 5: return micro_for<K, 5>(nv);
    default: return micro_for<K, 6>(nv);
  }
}

template <int R, int NV>
struct MicroF32 {
  static constexpr auto fn = &micro<R, NV>;
};

inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t ars, int64_t acs, const float* B,
                 int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  if (M <= 0) return;
  if (K <= 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) memset(C + i * ldc, 0, N * sizeof(float));
    return;
  }
  // B is consumed in [KC x 64] panels (16 KB) that stay in L1 while every row block uses them
  constexpr int64_t KC = 64;
  for (int64_t n0 = 0; n0 < N; n0 += 64) {
    const int nv = static_cast<int>(N - n0 >= 64 ? 4 : (N - n0) / 16);
    const auto full = micro_fn<MicroF32>(MR, nv);
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
      const int64_t kc = K - k0 < KC ? K - k0 : KC;
      const bool acc = accumulate || k0 > 0;
      const float* Ak = A + k0 * acs;
      const float* Bk = B + k0 * ldb + n0;
      int64_t m0 = 0;
      for (; m0 + MR <= M; m0 += MR) full(kc, Ak + m0 * ars, ars, acs, Bk, ldb, C + m0 * ldc + n0, ldc, acc);
      if (m0 < M)
        micro_fn<MicroF32>(static_cast<int>(M - m0), nv)(kc, Ak + m0 * ars, ars, acs, Bk, ldb, C + m0 * ldc + n0, ldc,
                                                          acc);
    }
  }
}

#if defined(__AVX512BF16__)
// ---------------------------------------------------------------------------------------
// bf16 products: C[M, N] (+)= A[M, K] · B[K, N], bf16 operands, fp32 sums. A row-major
// (K contiguous), B in pairs [K/2][N][2] ("VNNI": the two bf16 of consecutive k for one
// column are adjacent), N a multiple of 16. Two implementations of one contract:
//   amx build     AMX tiles; K a multiple of 32 and M rounded up to 16 (A and C must have
//                 the rows: the product of the padding rows is stored and never read)
//   avx512 build  vdpbf16ps, 2 products per lane; K even, any M
// ---------------------------------------------------------------------------------------
// (POSATTN_NO_AMX: bench/cpu_gemm.cpp builds both implementations into one file)
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && !defined(POSATTN_NO_AMX)
constexpr bool kAmx = true;

// Palette 1 with all 8 tiles at 16 rows × 64 bytes: tiles 0–3 hold up to four 16×16 fp32
// tiles of C, 4–7 the 16-row slabs of A and 16-column slabs of B (32 bf16 deep; which tile
// holds which: the blocks below).
struct alignas(64) TileConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Our tile configuration for one task, and whatever was there before restored afterwards:
// oneDNN (torch's CPU SDPA) caches its own configuration per thread and would otherwise run
// its tiles under ours.
class TileScope {
 public:
  explicit TileScope(bool on) : on_(on) {
    if (!on_) return;
    // a constant in read-only data: GCC 12 does not see ldtilecfg read its operand and drops
    // the stores that would build it on the stack
    static const TileConfig ours = {1, 0, {}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};
    _tile_storeconfig(&saved_);
    __asm__ volatile("" : : "r"(&saved_) : "memory");  // nor that sttilecfg writes saved_
    _tile_loadconfig(&ours);
  }
  ~TileScope() {
    if (!on_) return;
    if (saved_.palette == 0) _tile_release();
    else _tile_loadconfig(&saved_);
  }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;

 private:
  bool on_;
  TileConfig saved_;
};

// One (16·MT) × (16·NT) block of C over the whole K.
template <int MT, int NT>
inline void amx_block(int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb, float* C,
                      int64_t ldc, bool accumulate) {
  const int64_t sa = lda * 2, sb = ldb * 2, sc = ldc * 4;  // strides in bytes
  if (accumulate) {
    _tile_loadd(0, C, sc);
    if (NT == 2) _tile_loadd(1, C + 16, sc);
    if (MT == 2) _tile_loadd(2, C + 16 * ldc, sc);
    if (MT == 2 && NT == 2) _tile_loadd(3, C + 16 * ldc + 16, sc);
  } else {
    _tile_zero(0);
    if (NT == 2) _tile_zero(1);
    if (MT == 2) _tile_zero(2);
    if (MT == 2 && NT == 2) _tile_zero(3);
  }
  for (int64_t k = 0; k < K; k += 32) {
    _tile_loadd(4, A + k, sa);
    if (MT == 2) _tile_loadd(5, A + 16 * lda + k, sa);
    _tile_loadd(6, B + (k / 2) * ldb, sb);
    if (NT == 2) _tile_loadd(7, B + (k / 2) * ldb + 32, sb);
    _tile_dpbf16ps(0, 4, 6);
    if (NT == 2) _tile_dpbf16ps(1, 4, 7);
    if (MT == 2) _tile_dpbf16ps(2, 5, 6);
    if (MT == 2 && NT == 2) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, C, sc);
  if (NT == 2) _tile_stored(1, C + 16, sc);
  if (MT == 2) _tile_stored(2, C + 16 * ldc, sc);
  if (MT == 2 && NT == 2) _tile_stored(3, C + 16 * ldc + 16, sc);
}

// A 64 × 16 block of C: four row tiles (C tiles 0–3) against one column slab of B (tile 6),
// their A slabs in tiles 4, 5, 7, 4: four independent accumulators where a single column slab
// would otherwise run as 32-row blocks (decode's K·Qᵀ for up to 16 query rows: 2–18 % faster
// per key than two 2 × 1 blocks, in a microbenchmark on the AMX Xeon).
inline void amx_block_4x1(int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb, float* C,
                          int64_t ldc, bool accumulate) {
  const int64_t sa = lda * 2, sb = ldb * 2, sc = ldc * 4;
  if (accumulate) {
    _tile_loadd(0, C, sc);
    _tile_loadd(1, C + 16 * ldc, sc);
    _tile_loadd(2, C + 32 * ldc, sc);
    _tile_loadd(3, C + 48 * ldc, sc);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t k = 0; k < K; k += 32) {
    _tile_loadd(6, B + (k / 2) * ldb, sb);
    _tile_loadd(4, A + k, sa);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(5, A + 16 * lda + k, sa);
    _tile_dpbf16ps(1, 5, 6);
    _tile_loadd(7, A + 32 * lda + k, sa);
    _tile_dpbf16ps(2, 7, 6);
    _tile_loadd(4, A + 48 * lda + k, sa);
    _tile_dpbf16ps(3, 4, 6);
  }
  _tile_stored(0, C, sc);
  _tile_stored(1, C + 16 * ldc, sc);
  _tile_stored(2, C + 32 * ldc, sc);
  _tile_stored(3, C + 48 * ldc, sc);
}

inline void gemm_bf16(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B, float* C,
                      int64_t ldc, bool accumulate) {
  const int64_t ldb = 2 * N;
  const int64_t Mr = (M + 15) / 16 * 16;
  for (int64_t n0 = 0; n0 < N;) {
    const bool two_n = N - n0 >= 32;
    for (int64_t m0 = 0; m0 < Mr;) {
      const uint16_t* a = A + m0 * lda;
      const uint16_t* b = B + 2 * n0;
      float* c = C + m0 * ldc + n0;
      if (!two_n && Mr - m0 >= 64) {  // one column slab: four row tiles at a time
        amx_block_4x1(K, a, lda, b, ldb, c, ldc, accumulate);
        m0 += 64;
        continue;
      }
      if (Mr - m0 >= 32) {
        if (two_n) amx_block<2, 2>(K, a, lda, b, ldb, c, ldc, accumulate);
        else amx_block<2, 1>(K, a, lda, b, ldb, c, ldc, accumulate);
        m0 += 32;
      } else {
        if (two_n) amx_block<1, 2>(K, a, lda, b, ldb, c, ldc, accumulate);
        else amx_block<1, 1>(K, a, lda, b, ldb, c, ldc, accumulate);
        m0 += 16;
      }
    }
    n0 += two_n ? 32 : 16;
  }
}
#else
constexpr bool kAmx = false;

struct TileScope {
  explicit TileScope(bool) {}
};

template <int R, int NV>
inline void micro_bf16(int64_t Kp, const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb, float* C,
                       int64_t ldc, bool accumulate) {
  __m512 c[R][NV];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) c[i][v] = accumulate ? _mm512_loadu_ps(C + i * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t kp = 0; kp < Kp; ++kp) {
    __m512bh b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = (__m512bh)_mm512_loadu_si512(B + kp * ldb + 32 * v);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      // a broadcast from memory (load ports), not a move from a general register (port 5,
      // which the dot products need)
      const __m512bh ai =
          (__m512bh)_mm512_broadcastss_ps(_mm_load_ss(reinterpret_cast<const float*>(A + i * lda + 2 * kp)));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[i][v] = _mm512_dpbf16_ps(c[i][v], ai, b[v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + i * ldc + 16 * v, c[i][v]);
}

template <int R, int NV>
struct MicroBf16 {
  static constexpr auto fn = &micro_bf16<R, NV>;
};

inline void gemm_bf16(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B, float* C,
                      int64_t ldc, bool accumulate) {
  const int64_t ldb = 2 * N;
  for (int64_t n0 = 0; n0 < N; n0 += 64) {
    const int nv = static_cast<int>(N - n0 >= 64 ? 4 : (N - n0) / 16);
    const auto full = micro_fn<MicroBf16>(MR, nv);
    int64_t m0 = 0;
    for (; m0 + MR <= M; m0 += MR) full(K / 2, A + m0 * lda, lda, B + 2 * n0, ldb, C + m0 * ldc + n0, ldc, accumulate);
    if (m0 < M)
      micro_fn<MicroBf16>(static_cast<int>(M - m0), nv)(K / 2, A + m0 * lda, lda, B + 2 * n0, ldb, C + m0 * ldc + n0,
                                                         ldc, accumulate);
  }
}
#endif

// fp32 → bf16 (round to nearest even, NaN stays NaN) of n entries, n a multiple of 16.
inline void to_bf16(const float* x, int64_t n, uint16_t* y) {
  for (int64_t j = 0; j < n; j += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + j), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + j)));
}

// Rows i < m of an fp32 [rows][n] block (row stride ld) as bf16 pairs [rows/2][n][2] (the B
// operand of a product over the rows); rows m .. rows are zero. rows even, n a multiple of 16.
inline void to_bf16_pairs(const float* x, int64_t ld, int64_t m, int64_t rows, int64_t n, float mul, uint16_t* y) {
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                              22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512 vm = _mm512_set1_ps(mul), zero = _mm512_setzero_ps();
  for (int64_t i = 0; i < rows; i += 2) {
    const float* r0 = x + i * ld;
    const float* r1 = r0 + ld;
    uint16_t* out = y + i * n;
    for (int64_t j = 0; j < n; j += 16) {
      const __m512 a = i < m ? _mm512_mul_ps(_mm512_loadu_ps(r0 + j), vm) : zero;
      const __m512 b = i + 1 < m ? _mm512_mul_ps(_mm512_loadu_ps(r1 + j), vm) : zero;
      const __m512i ab = _mm512_inserti64x4(_mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(a)),
                                            (__m256i)_mm512_cvtneps_pbh(b), 1);
      _mm512_storeu_si512(out + 2 * j, _mm512_permutexvar_epi16(interleave, ab));
    }
  }
}
// 2^t on 16 lanes to ~2e-6 relative (enough for probabilities that are rounded to bf16);
// 0 below −126, NaN stays NaN.
inline __m512 exp2_bf16(__m512 t) {
  const __m512 lo = _mm512_set1_ps(-126.0f);
  const __m512 tc = _mm512_max_ps(lo, t);  // NaN kept (second operand)
  const __m512 n = _mm512_roundscale_ps(tc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(tc, n);  // exact, |f| ≤ 1/2
  // 2^f = e^(f·ln2): Taylor to degree 5
  __m512 p = _mm512_set1_ps(1.3333558e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(t, lo, _CMP_NLT_UQ), p, n);
}

// The probabilities of one row for the bf16 product: p_j = exp(mul·s_j − sub) written to p as
// bf16 (BN entries); returns Σ p_j of the unrounded values.
inline float row_exp_sum_bf16(const float* s, float mul, float sub, uint16_t* p) {
  constexpr float LOG2E = 1.44269504088896341f;
  const __m512 vm = _mm512_set1_ps(mul * LOG2E), vs = _mm512_set1_ps(sub * LOG2E);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < BN; j += 32) {
    const __m512 e0 = exp2_bf16(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), vm, vs));
    const __m512 e1 = exp2_bf16(_mm512_fmsub_ps(_mm512_loadu_ps(s + j + 16), vm, vs));
    acc = _mm512_add_ps(acc, _mm512_add_ps(e0, e1));
    _mm512_storeu_si512(p + j, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
  }
  return _mm512_reduce_add_ps(acc);
}
#define POSATTN_BF16_DOT 1
#endif

// ---------------------------------------------------------------------------------------
// elementwise math (branch-free, so the loops vectorise)
// ---------------------------------------------------------------------------------------

// e^x to ~2 ulp; exactly 0 below −87.3 (so −inf gives 0). Cody–Waite reduction by ln 2
// (the high part has few bits, so n·LN2_HI is exact without an FMA) and a degree-7 Taylor
// polynomial on |r| ≤ ln2/2.
inline float exp_approx(float x) {
  const float xc = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float scale = u2f(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
  return x < -87.3f ? 0.0f : p * scale;
}

// 2^x for the xPos decays (x may be large and negative: underflow to 0 is the limit).
inline float exp2_approx(float x) { return exp_approx(x * 0.693147180559945309f); }

// Reductions over a whole tile row (BN entries; entries past the tile's end are −inf, so
// they neither win the max nor add to the sum), 16 independent lanes so the loops
// vectorise without reassociation flags; the lanes are then combined in a fixed order.
// A NaN score poisons its row: the max is NaN when the other entries are all −inf, where the
// row would otherwise count as seeing nothing; elsewhere the max may skip it, and the
// exponent pass, which keeps NaN, poisons the row's sum (the scan for NaN runs only then).
inline bool row_has_nan(const float* s) {
  bool nan = false;
  for (int64_t j = 0; j < BN; ++j) nan |= s[j] != s[j];
  return nan;
}

inline float row_max(const float* s) {
#if defined(__AVX512F__)
  __m512 m = _mm512_loadu_ps(s);
  for (int64_t j = 16; j < BN; j += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(s + j));
  const float r = _mm512_reduce_max_ps(m);
#else
  float m[16];
  for (int l = 0; l < 16; ++l) m[l] = s[l];
  for (int64_t j = 16; j < BN; j += 16)
    for (int l = 0; l < 16; ++l) m[l] = s[j + l] > m[l] ? s[j + l] : m[l];
  float r = m[0];
  for (int l = 1; l < 16; ++l) r = m[l] > r ? m[l] : r;
#endif
  return r == NEG_INF && row_has_nan(s) ? __builtin_nanf("") : r;
}

// max(a, b) that keeps a NaN from either side (the running max of a NaN row stays NaN)
inline float nan_max(float a, float b) { return a > b ? a : (a <= b ? b : a + b); }

#if defined(__AVX512F__)
// exp_approx on 16 lanes (the same reduction and polynomial); NaN stays NaN.
inline __m512 exp512(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.3f);
  // max / min return their second operand when either is NaN: x goes second
  const __m512 xc = _mm512_max_ps(lo, _mm512_min_ps(_mm512_set1_ps(88.3f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(x, lo, _CMP_NLT_UQ), p, n);  // 0 below −87.3
}
#endif

// s = exp(mul·s − sub) in place; returns Σ s.
inline float row_exp_sum(float* s, float mul, float sub) {
#if defined(__AVX512F__)
  const __m512 vm = _mm512_set1_ps(mul), vs = _mm512_set1_ps(sub);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < BN; j += 16) {
    const __m512 e = exp512(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), vm, vs));
    _mm512_storeu_ps(s + j, e);
    acc = _mm512_add_ps(acc, e);
  }
  return _mm512_reduce_add_ps(acc);
#else
  float acc[16] = {};
  for (int64_t j = 0; j < BN; j += 16)
    for (int l = 0; l < 16; ++l) {
      const float e = exp_approx(s[j + l] * mul - sub);
      s[j + l] = e;
      acc[l] += e;
    }
  float r = 0.0f;
  for (int l = 0; l < 16; ++l) r += acc[l];
  return r;
#endif
}

// x *= f over n entries (n a multiple of 16)
inline void scale_row(float* x, int64_t n, float f) {
  for (int64_t j = 0; j < n; ++j) x[j] *= f;
}

inline int64_t clamp64(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

// floor division / modulo for any sign of p (w > 0)
inline void floor_divmod(int64_t p, int64_t w, int64_t& q, int64_t& r) {
  q = p / w;
  r = p - q * w;
  if (r < 0) { q -= 1; r += w; }
}

// ---------------------------------------------------------------------------------------
// dropout: the Triton kernels' Philox stream (key = seed, counter = (key, row, b·H + h, 0)),
// so both backends drop the same elements for one seed
// ---------------------------------------------------------------------------------------

inline uint32_t philox_first(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    const uint64_t pa = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t pb = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

inline float uniform_from(uint32_t r) {
  int32_t x = static_cast<int32_t>(r);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// keep[j] = 1 / (1 − p) or 0 for keys j0 .. j0 + n of row i of query head bh
inline void dropout_row(uint64_t seed, int64_t bh, int64_t i, int64_t j0, int64_t n, float p, float* keep) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const float scale = p < 1.0f ? 1.0f / (1.0f - p) : 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t r = philox_first(static_cast<uint32_t>(j0 + j), static_cast<uint32_t>(i),
                                    static_cast<uint32_t>(bh), 0u, k0, k1);
    keep[j] = uniform_from(r) >= p ? scale : 0.0f;
  }
}

// ---------------------------------------------------------------------------------------
// positions and rotary encodings
// ---------------------------------------------------------------------------------------

inline int32_t q_position(const AttnArgs& a, int64_t b, int64_t i) {
  return a.q_pos ? a.q_pos[b * a.sqp_b + i] : static_cast<int32_t>(a.q_offset + i);
}
inline int32_t k_position(const AttnArgs& a, int64_t b, int64_t j) {
  return a.k_pos ? a.k_pos[b * a.skp_b + j] : static_cast<int32_t>(a.k_offset + j);
}

// The channels of pair t: (2t, 2t+1) interleaved, (t, t + r/2) in the half layout.
inline int64_t pair_first(int64_t t, int64_t r, bool interleaved) { return interleaved ? 2 * t : t; }
inline int64_t pair_second(int64_t t, int64_t r, bool interleaved) { return interleaved ? 2 * t + 1 : t + r / 2; }

// cos / sin (scaled by rope_scale) of the pairs of one row: from pos·inv_freq (fp32 product,
// as HF computes it) or from the explicit angles.
inline void row_sincos(const AttnArgs& a, int32_t pos, const float* angles, float* cs, float* sn) {
  const int64_t half = a.rotary_dim / 2;
  for (int64_t t = 0; t < half; ++t) {
    const float angle = a.rope_kind == ROPE_ANGLES ? angles[t] : static_cast<float>(pos) * a.rope_table[t];
    cs[t] = std::cos(angle) * a.rope_scale;
    sn[t] = std::sin(angle) * a.rope_scale;
  }
}

// y = R x on the rotary channels (in place allowed); channels ≥ r pass through.
inline void rotate(float* x, const float* cs, const float* sn, int64_t r, bool interleaved) {
  for (int64_t t = 0; t < r / 2; ++t) {
    const int64_t ia = pair_first(t, r, interleaved), ib = pair_second(t, r, interleaved);
    const float xa = x[ia], xb = x[ib];
    x[ia] = xa * cs[t] - xb * sn[t];
    x[ib] = xb * cs[t] + xa * sn[t];
  }
}

// dx = Rᵀ dy (in place).
inline void unrotate(float* d, const float* cs, const float* sn, int64_t r, bool interleaved) {
  for (int64_t t = 0; t < r / 2; ++t) {
    const int64_t ia = pair_first(t, r, interleaved), ib = pair_second(t, r, interleaved);
    const float da = d[ia], db = d[ib];
    d[ia] = da * cs[t] + db * sn[t];
    d[ib] = db * cs[t] - da * sn[t];
  }
}

// ∂L/∂φ_t = −dy_a·y_b + dy_b·y_a for the gradient dy w.r.t. the rotated row y (the
// rotation's generator maps (y_a, y_b) to (−y_b, y_a)); g scales dy.
inline void angle_grad(const float* dy, float g, const float* y, int64_t r, bool interleaved, float* out) {
  for (int64_t t = 0; t < r / 2; ++t) {
    const int64_t ia = pair_first(t, r, interleaved), ib = pair_second(t, r, interleaved);
    out[t] = g * (dy[ib] * y[ia] - dy[ia] * y[ib]);
  }
}

// xPos: x[d] *= 2^(rel · log2(ζ_t)/scale_base) on both channels of each pair t.
inline void xpos_scale(float* x, float rel, const float* log2_zeta, int64_t r, bool interleaved) {
  for (int64_t t = 0; t < r / 2; ++t) {
    const float f = exp2_approx(rel * log2_zeta[t]);
    x[pair_first(t, r, interleaved)] *= f;
    x[pair_second(t, r, interleaved)] *= f;
  }
}

// Per-row cos / sin tables of rotary kinds 1 and 2 (positions shared by every head):
// rows [nb][n][r/2] with nb = 1 unless the positions differ per batch.
struct SinCosTable {
  Buffer cs, sn;
  int64_t nb, n, half;
  SinCosTable(const AttnArgs& a, bool keys)
      : cs(table_size(a, keys)), sn(table_size(a, keys)),
        nb(batches(a, keys)), n(keys ? a.S : a.L), half(a.rotary_dim / 2) {
    if (!used(a)) return;
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t i = 0; i < n; ++i) {
        const int32_t pos = keys ? k_position(a, b, i) : q_position(a, b, i);
        row_sincos(a, pos, nullptr, cs.p + (b * n + i) * half, sn.p + (b * n + i) * half);
      }
  }
  static int64_t batches(const AttnArgs& a, bool keys) {
    const bool per_batch = keys ? (a.k_pos && a.skp_b != 0) : (a.q_pos && a.sqp_b != 0);
    return per_batch ? a.B : 1;
  }
  // explicit angles differ per head: their rows compute cos / sin on the fly (RowRotation)
  static bool used(const AttnArgs& a) { return a.rope_kind == ROPE_FREQ || a.rope_kind == ROPE_XPOS; }
  static int64_t table_size(const AttnArgs& a, bool keys) {
    return used(a) ? batches(a, keys) * (keys ? a.S : a.L) * (a.rotary_dim / 2) : 1;
  }
  const float* cos_row(int64_t b, int64_t i) const { return cs.p + ((nb == 1 ? 0 : b) * n + i) * half; }
  const float* sin_row(int64_t b, int64_t i) const { return sn.p + ((nb == 1 ? 0 : b) * n + i) * half; }
};

// Rotation coefficients of one row, from the tables or computed from explicit angles.
struct RowRotation {
  const float* cs;
  const float* sn;
  float cs_buf[128], sn_buf[128];
  RowRotation(const AttnArgs& a, const SinCosTable& tab, int64_t b, int64_t head, int64_t i, bool keys) {
    if (a.rope_kind == ROPE_ANGLES) {
      const float* ang = keys ? a.k_ang + b * a.ska_b + head * a.ska_h + i * a.ska_l
                              : a.q_ang + b * a.sqa_b + head * a.sqa_h + i * a.sqa_l;
      row_sincos(a, 0, ang, cs_buf, sn_buf);
      cs = cs_buf;
      sn = sn_buf;
    } else {
      cs = tab.cos_row(b, i);
      sn = tab.sin_row(b, i);
    }
  }
};

// ---------------------------------------------------------------------------------------
// steps 3–6 of the score pipeline on one row of a tile
// ---------------------------------------------------------------------------------------

struct KeyTile {
  int64_t j0, n;         // first key, keys in the tile (≤ BN)
  int32_t pos[BN];       // their positions
  int32_t lo, hi;        // position range
};

// Can any (query, key) pair of the two ranges survive causal / window masking?
inline bool tile_visible(const AttnArgs& a, int32_t q_lo, int32_t q_hi, const KeyTile& kt) {
  if (q_lo > q_hi) return false;
  if (a.causal && kt.lo > q_hi) return false;
  if (a.window_right >= 0 && static_cast<int64_t>(kt.lo) > static_cast<int64_t>(q_hi) + a.window_right) return false;
  if (a.window_left >= 0 && static_cast<int64_t>(kt.hi) < static_cast<int64_t>(q_lo) - a.window_left) return false;
  return true;
}

// Does every pair pass causal / window masking (so the per-element position masks can be skipped)?
inline bool tile_interior(const AttnArgs& a, int32_t q_lo, int32_t q_hi, const KeyTile& kt) {
  if (a.causal && kt.hi > q_lo) return false;
  if (a.window_right >= 0 && static_cast<int64_t>(kt.hi) > static_cast<int64_t>(q_lo) + a.window_right) return false;
  if (a.window_left >= 0 && static_cast<int64_t>(kt.lo) < static_cast<int64_t>(q_hi) - a.window_left) return false;
  return true;
}

// The bias operand of (query at qp, key at kp): the table index (RelativeBias, T5) or the
// multiplier of the head's parameter (ALiBi: −|r|, Manhattan: grid distance), r = kp − qp.
inline int64_t bias_index(const AttnArgs& a, int32_t qp, int32_t kp) {
  const int64_t rel = static_cast<int64_t>(kp) - qp;
  if (a.bias_kind == BIAS_RELATIVE) return clamp64(rel, -a.bias_i0, a.bias_i0) + a.bias_i0;
  // T5: HF's bucket of the distance from the host-built table (exact at every boundary);
  // the function saturates at max_distance (bias_i0).
  const bool bidirectional = a.bias_i2 != 0;
  const int64_t n = bidirectional ? (rel < 0 ? -rel : rel) : (rel < 0 ? -rel : 0);
  const int64_t offset = bidirectional && rel > 0 ? a.bias_i1 : 0;
  return offset + a.bias_lut[n < a.bias_i0 ? n : a.bias_i0];
}

inline float bias_multiplier(const AttnArgs& a, int32_t qp, int32_t kp) {
  if (a.bias_kind == BIAS_ALIBI) {
    const int64_t rel = static_cast<int64_t>(kp) - qp;
    return -static_cast<float>(rel < 0 ? -rel : rel);
  }
  int64_t rq, cq, rk, ck;
  floor_divmod(qp, a.bias_i0, rq, cq);
  floor_divmod(kp, a.bias_i0, rk, ck);
  return static_cast<float>((rk > rq ? rk - rq : rq - rk) + (ck > cq ? ck - cq : cq - ck));
}

inline float bias_param(const AttnArgs& a, int64_t b, int64_t h) {
  return a.bias[(a.bias_kind == BIAS_ALIBI ? b * a.sbias_b : 0) + h * a.sbias_h];
}

inline int64_t urpe_index(const AttnArgs& a, int32_t qp, int32_t kp) {
  return clamp64(static_cast<int64_t>(kp) - qp, -a.urpe_m, a.urpe_m) + a.urpe_m;
}

// A row of a Toeplitz table clamp(r, −m, m) + m read at r = r0 + j, j < n: entry 0 for
// j < lo, entry r0 + j + m (= offset + j) for lo ≤ j < hi, entry 2m for j ≥ hi.
struct ToeplitzRun {
  int64_t lo, hi, offset;
  ToeplitzRun(int64_t r0, int64_t n, int64_t m) {
    lo = clamp64(-m - r0, 0, n);
    hi = clamp64(m - r0 + 1, lo, n);
    offset = r0 + m;
  }
};

// s[j] (j < BN) = the score of (row i, key kt.j0 + j) after softcap (on the scaled score
// alone), bias, float mask and masking; keys past the tile's end are −inf. th[j] keeps
// tanh(s/softcap) for the backward.
inline void score_row(const AttnArgs& a, int64_t b, int64_t h, int64_t i, int32_t qp, const KeyTile& kt,
                      bool interior, float* s, float* th) {
  const int64_t n = kt.n;
  if (a.softcap != 0.0f) {
    const float inv = 1.0f / a.softcap;
    for (int64_t j = 0; j < n; ++j) {
      const float t = std::tanh(s[j] * inv);
      if (th) th[j] = t;
      s[j] = a.softcap * t;
    }
  }
  switch (a.bias_kind) {
    case BIAS_ALIBI:
    case BIAS_MANHATTAN: {
      const float w = bias_param(a, b, h);
      if (a.bias_kind == BIAS_ALIBI) {
        for (int64_t j = 0; j < n; ++j) {
          const int32_t rel = kt.pos[j] - qp;
          s[j] += w * -static_cast<float>(rel < 0 ? -rel : rel);
        }
      } else {
        for (int64_t j = 0; j < n; ++j) s[j] += w * bias_multiplier(a, qp, kt.pos[j]);
      }
      break;
    }
    case BIAS_RELATIVE: {
      const float* tab = a.bias + h * a.sbias_h;
      const int32_t m = static_cast<int32_t>(a.bias_i0);
      if (!a.k_pos) {  // keys at consecutive positions: the row reads a contiguous run of the table
        const ToeplitzRun run(static_cast<int64_t>(kt.pos[0]) - qp, n, m);
        for (int64_t j = 0; j < run.lo; ++j) s[j] += tab[0];
        const float* t = tab + run.offset;
        for (int64_t j = run.lo; j < run.hi; ++j) s[j] += t[j];
        for (int64_t j = run.hi; j < n; ++j) s[j] += tab[2 * m];
        break;
      }
      for (int64_t j = 0; j < n; ++j) {
        int32_t rel = kt.pos[j] - qp;
        rel = rel < -m ? -m : (rel > m ? m : rel);
        s[j] += tab[rel + m];
      }
      break;
    }
    case BIAS_T5: {
      const float* tab = a.bias + h * a.sbias_h;
      for (int64_t j = 0; j < n; ++j) s[j] += tab[bias_index(a, qp, kt.pos[j])];
      break;
    }
    default:
      break;
  }
  if (a.mask_kind == MASK_FLOAT) {
    const float* m = static_cast<const float*>(a.mask) + b * a.sm_b + h * a.sm_h + i * a.sm_l + kt.j0 * a.sm_s;
    for (int64_t j = 0; j < n; ++j) {  // a −inf entry masks the key whatever its score (NaN too)
      const float mv = m[j * a.sm_s];
      s[j] = mv == NEG_INF ? NEG_INF : s[j] + mv;
    }
  }
  if (!interior) {
    for (int64_t j = 0; j < n; ++j) {
      const int64_t kp = kt.pos[j];
      bool keep = true;
      if (a.causal) keep = keep && kp <= qp;
      if (a.window_left >= 0) keep = keep && kp >= static_cast<int64_t>(qp) - a.window_left;
      if (a.window_right >= 0) keep = keep && kp <= static_cast<int64_t>(qp) + a.window_right;
      s[j] = keep ? s[j] : NEG_INF;
    }
  }
  if (a.mask_kind == MASK_BOOL) {
    const uint8_t* m = static_cast<const uint8_t*>(a.mask) + b * a.sm_b + h * a.sm_h + i * a.sm_l + kt.j0 * a.sm_s;
    for (int64_t j = 0; j < n; ++j) s[j] = m[j * a.sm_s] ? s[j] : NEG_INF;
  }
  for (int64_t j = n; j < BN; ++j) s[j] = NEG_INF;
}

// ---------------------------------------------------------------------------------------
// packing: K and V of every (batch, KV head) in fp32, K rotated
// ---------------------------------------------------------------------------------------

struct Packed {
  int64_t nkt, Dp, Dvp, Dvk;
  bool dot16;
  // fp32 operands
  Buffer kt;   // [B·Hkv][nkt][Dp][BN]  transposed key tiles (q·kᵀ)
  Buffer kr;   // [B·Hkv][S][Dp]        key rows (dS·K; with bf16 dots only for RotaryAngles' gradient)
  Buffer vr;   // [B·Hkv][S][Dvp]       value rows (p·v), forward only
  Buffer vt;   // [B·Hkv][nkt][Dvp][BN] transposed value tiles (dO·vᵀ), backward only
  // bf16 operands (a.bf16_dot), per key tile in pairs along the product's inner dim
  Bf16Buffer k16;   // [B·Hkv][nkt][Dp/2][BN][2]   q·kᵀ
  Bf16Buffer v16;   // [B·Hkv][nkt][BN/2][Dvp][2]  p·v, forward only
  Bf16Buffer kr16;  // [B·Hkv][nkt][BN/2][Dp][2]   dS·K, backward only
  Bf16Buffer vt16;  // [B·Hkv][nkt][Dvk/2][BN][2]  dO·vᵀ, backward only
  // forward: per [B·Hkv][nkt] key tile, whether its V held non-finite values (packed as 0)
  Array<uint8_t> v_bad;
  Packed(const AttnArgs& a, bool backward)
      : nkt((a.S + BN - 1) / BN), Dp(pad_head(a.D, a.bf16_dot)), Dvp(pad16(a.Dv)),
        Dvk(pad_head(a.Dv, a.bf16_dot)), dot16(a.bf16_dot),
        kt(dot16 ? 1 : a.B * a.Hkv * nkt * Dp * BN, true),
        kr(backward && (!dot16 || a.rope_kind == ROPE_ANGLES) ? a.B * a.Hkv * a.S * Dp : 1, true),
        vr(backward || dot16 ? 1 : a.B * a.Hkv * a.S * Dvp, true),
        vt(!backward || dot16 ? 1 : a.B * a.Hkv * nkt * Dvp * BN, true),
        k16(dot16 ? a.B * a.Hkv * nkt * Dp * BN : 1, true),
        v16(dot16 && !backward ? a.B * a.Hkv * nkt * Dvp * BN : 1, true),
        kr16(dot16 && backward ? a.B * a.Hkv * nkt * Dp * BN : 1, true),
        vt16(dot16 && backward ? a.B * a.Hkv * nkt * Dvk * BN : 1, true),
        v_bad(backward ? 1 : a.B * a.Hkv * nkt, true) {}
  Packed(const Packed&) = delete;
  Packed& operator=(const Packed&) = delete;
};

// A non-finite value in v_j acts as a NaN score of key j in the rows that see it. V's
// non-finite values are packed as 0 and their tiles flagged; the forward then marks the
// scores of exactly the rows that see those keys (poison_scores), where a plain product would
// also spread 0·NaN into rows whose key is masked.
inline bool zero_non_finite(float* x, int64_t n) {
  uint32_t any = 0;
  for (int64_t e = 0; e < n; ++e) {  // branch-free, so it vectorises: exponent all ones = inf or NaN
    const uint32_t bad = (f2u(x[e]) & 0x7f800000u) == 0x7f800000u;
    any |= bad;
    x[e] = bad ? 0.0f : x[e];
  }
  return any != 0;
}

// s[j] = NaN where the row sees key j (s[j] != −inf) and v_j holds a non-finite value (the
// original values, re-read: flagged tiles are rare); vrow: scratch of Dv floats.
template <DType DT>
void poison_scores(const AttnArgs& a, int64_t b, int64_t hk, const KeyTile& kt, float* s, float* vrow) {
  for (int64_t j = 0; j < kt.n; ++j) {
    if (s[j] == NEG_INF) continue;
    load_row<DT>(elem<DT>(a.v, b * a.sv_b + hk * a.sv_h + (kt.j0 + j) * a.sv_l), a.Dv, vrow);
    for (int64_t e = 0; e < a.Dv; ++e)
      if (!std::isfinite(vrow[e])) s[j] = __builtin_nanf("");
  }
}

template <DType DT>
struct PackCtx {
  const AttnArgs* a;
  Packed* pk;
  const SinCosTable* ktab;
  bool backward;
};

template <DType DT>
void pack_body(void* vctx, int64_t begin, int64_t end) {
  auto& c = *static_cast<PackCtx<DT>*>(vctx);
  const AttnArgs& a = *c.a;
  Packed& pk = *c.pk;
  const int64_t Dp = pk.Dp, Dvp = pk.Dvp, Dvk = pk.Dvk;
  // one fp32 tile in both layouts, then rounded to bf16 pairs in vector passes (bf16 dots)
  Buffer row(Dp > Dvk ? Dp : Dvk), KT(pk.dot16 ? Dp * BN : 1), KR(pk.dot16 ? BN * Dp : 1),
      VT(pk.dot16 ? Dvk * BN : 1), VR(pk.dot16 ? BN * Dvp : 1);
  for (int64_t task = begin; task < end; ++task) {
    // one task per (batch, KV head, key tile)
    const int64_t bh = task / pk.nkt, t = task % pk.nkt;
    const int64_t b = bh / a.Hkv, hk = bh % a.Hkv;
    const int64_t j0 = t * BN, n = a.S - j0 < BN ? a.S - j0 : BN;
    const int64_t tile = bh * pk.nkt + t;
    float* kt = pk.dot16 ? KT.p : pk.kt.p + tile * Dp * BN;
    if (pk.dot16) {
      memset(KT.p, 0, Dp * BN * sizeof(float));
      memset(VT.p, 0, Dvk * BN * sizeof(float));
    }
    for (int64_t j = 0; j < n; ++j) {
      const int64_t s = j0 + j;
      memset(row.p, 0, Dp * sizeof(float));
      load_row<DT>(elem<DT>(a.k, b * a.sk_b + hk * a.sk_h + s * a.sk_l), a.D, row.p);
      if (a.rope_kind != ROPE_NONE) {
        RowRotation rr(a, *c.ktab, b, hk, s, true);
        rotate(row.p, rr.cs, rr.sn, a.rotary_dim, a.interleaved);
      }
      if (c.backward && (!pk.dot16 || a.rope_kind == ROPE_ANGLES))
        memcpy(pk.kr.p + (bh * a.S + s) * Dp, row.p, Dp * sizeof(float));
      for (int64_t d = 0; d < a.D; ++d) kt[d * BN + j] = row.p[d];
      if (pk.dot16) memcpy(KR.p + j * Dp, row.p, Dp * sizeof(float));
      memset(row.p, 0, Dvk * sizeof(float));
      load_row<DT>(elem<DT>(a.v, b * a.sv_b + hk * a.sv_h + s * a.sv_l), a.Dv, row.p);
      if (!c.backward && zero_non_finite(row.p, a.Dv)) pk.v_bad.p[tile] = 1;
      if (pk.dot16) {
        for (int64_t e = 0; e < a.Dv; ++e) VT.p[e * BN + j] = row.p[e];
        memcpy(VR.p + j * Dvp, row.p, Dvp * sizeof(float));
      } else if (c.backward) {
        float* vt = pk.vt.p + tile * Dvp * BN;
        for (int64_t d = 0; d < a.Dv; ++d) vt[d * BN + j] = row.p[d];
      } else {
        memcpy(pk.vr.p + (bh * a.S + s) * Dvp, row.p, Dvp * sizeof(float));
      }
    }
#if defined(POSATTN_BF16_DOT)
    if (pk.dot16) {
      // rows past n are zero in the bf16 tiles (to_bf16_pairs zeroes them)
      to_bf16_pairs(KT.p, BN, Dp, Dp, BN, 1.0f, pk.k16.p + tile * Dp * BN);
      if (c.backward) {
        to_bf16_pairs(KR.p, Dp, n, BN, Dp, 1.0f, pk.kr16.p + tile * Dp * BN);
        to_bf16_pairs(VT.p, BN, Dvk, Dvk, BN, 1.0f, pk.vt16.p + tile * Dvk * BN);
      } else {
        to_bf16_pairs(VR.p, Dvp, n, BN, Dvp, 1.0f, pk.v16.p + tile * Dvp * BN);
      }
    }
#endif
  }
}

template <DType DT>
void pack(const AttnArgs& a, Packed& pk, const SinCosTable& ktab, bool backward) {
  PackCtx<DT> c{&a, &pk, &ktab, backward};
  a.parallel(a.B * a.Hkv * pk.nkt, &c, &pack_body<DT>);
}

inline void key_tile(const AttnArgs& a, int64_t b, int64_t t, KeyTile& kt) {
  kt.j0 = t * BN;
  kt.n = a.S - kt.j0 < BN ? a.S - kt.j0 : BN;
  kt.lo = INT32_MAX;
  kt.hi = INT32_MIN;
  for (int64_t j = 0; j < kt.n; ++j) {
    const int32_t p = k_position(a, b, kt.j0 + j);
    kt.pos[j] = p;
    kt.lo = p < kt.lo ? p : kt.lo;
    kt.hi = p > kt.hi ? p : kt.hi;
  }
}

// The key tiles a query tile can see. With offset positions the range is cut analytically
// (keys are sorted); with position tensors every tile is checked against its range.
inline void key_tile_range(const AttnArgs& a, int32_t q_lo, int32_t q_hi, int64_t nkt, int64_t& t0, int64_t& t1) {
  t0 = 0;
  t1 = nkt;
  if (a.k_pos) return;
  int64_t j_hi = a.S - 1, j_lo = 0;
  if (a.causal) j_hi = std::min<int64_t>(j_hi, static_cast<int64_t>(q_hi) - a.k_offset);
  if (a.window_right >= 0) j_hi = std::min<int64_t>(j_hi, static_cast<int64_t>(q_hi) + a.window_right - a.k_offset);
  if (a.window_left >= 0) j_lo = std::max<int64_t>(j_lo, static_cast<int64_t>(q_lo) - a.window_left - a.k_offset);
  if (j_hi < j_lo) { t1 = 0; return; }
  t0 = j_lo / BN;
  t1 = j_hi / BN + 1;
}

// xPos: the key tile scaled by 2^((c − kp_j)·log2ζ_t) for the query tile's centre c, as
// transposed [Dp][BN] (for q·kᵀ) and, in the backward, as rows [BN][Dp] (for dS·K).
inline void xpos_key_tile(const AttnArgs& a, const float* kt_in, const float* kr_in, const KeyTile& kt, int32_t centre,
                          int64_t Dp, float* kt_out, float* kr_out, float* factor /* [BN][Dp] */) {
  const float* log2_zeta = a.rope_table + a.rotary_dim / 2;
  for (int64_t j = 0; j < BN; ++j) {
    float* f = factor + j * Dp;
    for (int64_t d = 0; d < Dp; ++d) f[d] = 1.0f;
    if (j < kt.n) xpos_scale(f, static_cast<float>(centre - kt.pos[j]), log2_zeta, a.rotary_dim, a.interleaved);
  }
  for (int64_t d = 0; d < Dp; ++d)
    for (int64_t j = 0; j < BN; ++j) kt_out[d * BN + j] = kt_in[d * BN + j] * factor[j * Dp + d];
  if (kr_out)
    for (int64_t j = 0; j < kt.n; ++j)
      for (int64_t d = 0; d < Dp; ++d) kr_out[j * Dp + d] = kr_in[j * Dp + d] * factor[j * Dp + d];
}

// One query tile, rotated, xPos-decayed relative to its centre, scaled: Qs [BM][Dp].
template <DType DT>
int32_t load_query_tile(const AttnArgs& a, const SinCosTable& qtab, int64_t b, int64_t h, int64_t i0, int64_t m,
                        int64_t Dp, float* Qs, int32_t* qp, int32_t& q_lo, int32_t& q_hi, float scale) {
  q_lo = INT32_MAX;
  q_hi = INT32_MIN;
  for (int64_t i = 0; i < m; ++i) {
    qp[i] = q_position(a, b, i0 + i);
    q_lo = qp[i] < q_lo ? qp[i] : q_lo;
    q_hi = qp[i] > q_hi ? qp[i] : q_hi;
  }
  const int32_t centre = q_lo;
  for (int64_t i = 0; i < m; ++i) {
    float* row = Qs + i * Dp;
    memset(row, 0, Dp * sizeof(float));
    load_row<DT>(elem<DT>(a.q, b * a.sq_b + h * a.sq_h + (i0 + i) * a.sq_l), a.D, row);
    if (a.rope_kind != ROPE_NONE) {
      RowRotation rr(a, qtab, b, h, i0 + i, false);
      rotate(row, rr.cs, rr.sn, a.rotary_dim, a.interleaved);
      if (a.rope_kind == ROPE_XPOS)
        xpos_scale(row, static_cast<float>(qp[i] - centre), a.rope_table + a.rotary_dim / 2, a.rotary_dim,
                   a.interleaved);
    }
    if (scale != 1.0f)
      for (int64_t d = 0; d < a.D; ++d) row[d] *= scale;
  }
  return centre;
}

// ---------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------

// What both passes do differently per call.
struct PassKind {
  bool xpos;
  // no bias, float / bool mask or softcap: interior full tiles need no elementwise pass
  bool plain;
  // bf16 inputs multiplied as bf16 (a.bf16_dot): q rotated in fp32 and rounded to bf16 (as
  // the GPU kernels do), the scale applied to the fp32 scores (on plain interior tiles it
  // folds into the exponent: fold_scale). The backward rounds dS·scale to bf16 for dQ and
  // dK, and accumulates dK, dV transposed ([Dp][Sp], [Dvp][Sp]) so that every product's
  // left operand is a row-major tile and its right one a pair-interleaved tile.
  bool dot16;
  bool fold_scale;
  explicit PassKind(const AttnArgs& a)
      : xpos(a.rope_kind == ROPE_XPOS),
        plain(a.bias_kind == BIAS_NONE && a.mask_kind == MASK_NONE && a.softcap == 0.0f),
#if defined(POSATTN_BF16_DOT)
        dot16(a.dtype == DType::BF16 && a.bf16_dot),
#else
        dot16(false),
#endif
        fold_scale(dot16 && a.scale > 0.0f) {
  }
};

// Row i of a score tile made ready for the exponent: scaled (bf16 dots) and through steps 3–6
// where the tile needs them (elementwise). Returns the factor still to apply inside the
// exponent: the scale where it folds there (plain interior tiles of bf16 dots), else 1.
inline float ready_row(const AttnArgs& a, const PassKind& kind, bool elementwise, int64_t b, int64_t h, int64_t i,
                       int32_t qp, const KeyTile& kt, bool interior, float* s, float* th) {
  if (kind.fold_scale && !elementwise) return a.scale;
  if (kind.dot16) scale_row(s, BN, a.scale);
  if (elementwise) score_row(a, b, h, i, qp, kt, interior, s, th);
  return 1.0f;
}

#if !defined(POSATTN_BF16_DOT)
constexpr bool kAmx = false;
struct TileScope {
  explicit TileScope(bool) {}
};
#endif

template <DType DT>
struct FwdCtx {
  const AttnArgs* a;
  const Packed* pk;
  const SinCosTable* qtab;
  void* out;
  float* lse;
  int64_t nqt;
};

template <DType DT>
void forward_body(void* vctx, int64_t begin, int64_t end) {
  auto& c = *static_cast<FwdCtx<DT>*>(vctx);
  const AttnArgs& a = *c.a;
  const Packed& pk = *c.pk;
  const int64_t Dp = pk.Dp, Dvp = pk.Dvp, G = a.H / a.Hkv;
  const PassKind kind(a);
  const bool xpos = kind.xpos, plain = kind.plain, dot16 = kind.dot16;
  TileScope tiles(dot16 && kAmx);
  Buffer Qs(BM * Dp), S(BM * BN), acc(BM * Dvp), keep(BN), orow(Dvp);
  Bf16Buffer Q16(dot16 ? BM * Dp : 1, true), P16(dot16 ? BM * BN : 1, true);
  Buffer kx(xpos ? Dp * BN : 1), factor(xpos ? BN * Dp : 1);
  int32_t qp[BM];
  float m_i[BM], l_i[BM];
  KeyTile kt;
  for (int64_t task = begin; task < end; ++task) {
    // (batch, head) by (batch, head), so that consecutive tasks read the same K and V (they stay
    // in the caches); within one, the last query tiles (the most keys when causal) first, so
    // the smallest tasks come last, for load balance
    const int64_t bh = task / c.nqt, qt = c.nqt - 1 - task % c.nqt;
    const int64_t b = bh / a.H, h = bh % a.H, hk = h / G, bhk = b * a.Hkv + hk;
    const int64_t i0 = qt * BM, m = a.L - i0 < BM ? a.L - i0 : BM;
    int32_t q_lo, q_hi;
    const int32_t centre =
        load_query_tile<DT>(a, *c.qtab, b, h, i0, m, Dp, Qs.p, qp, q_lo, q_hi, dot16 ? 1.0f : a.scale);
#if defined(POSATTN_BF16_DOT)
    if (dot16) {
      to_bf16(Qs.p, m * Dp, Q16.p);
      // the rows past m of a partial tile are multiplied too (whole AMX tiles): keep them zero
      memset(Q16.p + m * Dp, 0, (BM - m) * Dp * sizeof(uint16_t));
      memset(P16.p + m * BN, 0, (BM - m) * BN * sizeof(uint16_t));
    }
#endif
    for (int64_t i = 0; i < m; ++i) { m_i[i] = NEG_INF; l_i[i] = 0.0f; }
    memset(acc.p, 0, BM * Dvp * sizeof(float));
    int64_t t0, t1;
    key_tile_range(a, q_lo, q_hi, pk.nkt, t0, t1);
    for (int64_t t = t0; t < t1; ++t) {
      key_tile(a, b, t, kt);
      if (!tile_visible(a, q_lo, q_hi, kt)) continue;
      const bool interior = tile_interior(a, q_lo, q_hi, kt);
      const bool elementwise = !plain || !interior || kt.n < BN;
#if defined(POSATTN_BF16_DOT)
      if (dot16) {
        gemm_bf16(m, BN, Dp, Q16.p, Dp, pk.k16.p + (bhk * pk.nkt + t) * Dp * BN, S.p, BN, false);
      } else
#endif
      {
        const float* kblock = pk.kt.p + (bhk * pk.nkt + t) * Dp * BN;
        if (xpos) {
          xpos_key_tile(a, kblock, nullptr, kt, centre, Dp, kx.p, nullptr, factor.p);
          kblock = kx.p;
        }
        gemm(m, BN, a.D, Qs.p, Dp, 1, kblock, BN, S.p, BN, false);
      }
      for (int64_t i = 0; i < m; ++i) {
        float* s = S.p + i * BN;
        // scale > 0 where it folds, so max(s)·mul is the max of the scaled row
        const float mul = ready_row(a, kind, elementwise, b, h, i0 + i, qp[i], kt, interior, s, nullptr);
        if (pk.v_bad.p[bhk * pk.nkt + t]) poison_scores<DT>(a, b, hk, kt, s, orow.p);
        const float m_new = nan_max(row_max(s) * mul, m_i[i]);
        if (m_new == NEG_INF) {  // nothing visible in this row yet
          for (int64_t j = 0; j < BN; ++j) s[j] = 0.0f;
          if (dot16) memset(P16.p + i * BN, 0, BN * sizeof(uint16_t));
          continue;
        }
        // the running max rarely moves after the first tiles: skip the rescale then
        const float alpha = m_new == m_i[i] ? 1.0f : exp_approx(m_i[i] - m_new);
#if defined(POSATTN_BF16_DOT)
        if (dot16 && !a.urpe && a.dropout_p == 0.0f) {  // straight to the bf16 operand of p·v
          l_i[i] = l_i[i] * alpha + row_exp_sum_bf16(s, mul, m_new, P16.p + i * BN);
          m_i[i] = m_new;
          if (alpha != 1.0f) scale_row(acc.p + i * Dvp, Dvp, alpha);
          continue;
        }
#endif
        const float sum = row_exp_sum(s, mul, m_new);
        l_i[i] = l_i[i] * alpha + sum;
        m_i[i] = m_new;
        if (alpha != 1.0f) scale_row(acc.p + i * Dvp, Dvp, alpha);
        if (a.urpe) {  // step 8: the gate multiplies p after the normaliser took it
          const float* u = a.urpe + h * a.surpe_h;
          for (int64_t j = 0; j < kt.n; ++j) s[j] *= u[urpe_index(a, qp[i], kt.pos[j])];
        }
        if (a.dropout_p > 0.0f) {  // step 9
          dropout_row(a.seed, a.drop_b0 * a.H + bh, a.drop_row0 + i0 + i, a.drop_key0 + kt.j0, kt.n, a.dropout_p,
                      keep.p);
          for (int64_t j = 0; j < kt.n; ++j) s[j] *= keep.p[j];
        }
      }
#if defined(POSATTN_BF16_DOT)
      if (dot16) {
        if (a.urpe || a.dropout_p > 0.0f) to_bf16(S.p, m * BN, P16.p);
        gemm_bf16(m, Dvp, BN, P16.p, BN, pk.v16.p + (bhk * pk.nkt + t) * Dvp * BN, acc.p, Dvp, true);
        continue;
      }
#endif
      gemm(m, Dvp, kt.n, S.p, BN, 1, pk.vr.p + (bhk * a.S + kt.j0) * Dvp, Dvp, acc.p, Dvp, true);
    }
    for (int64_t i = 0; i < m; ++i) {  // l = 0: the row saw no key; l = NaN: a NaN or +inf score
      const float inv = l_i[i] == 0.0f ? 0.0f : 1.0f / l_i[i];
      for (int64_t d = 0; d < a.Dv; ++d) orow.p[d] = acc.p[i * Dvp + d] * inv;
      store_row<DT>(orow.p, a.Dv, elem<DT>(c.out, a.out_s.at(b, h, i0 + i)));
      c.lse[a.lse_s.at(b, h, i0 + i)] = l_i[i] == 0.0f ? NEG_INF : m_i[i] + std::log(l_i[i]);
    }
  }
}

// What every problem of a call needs before its tiles: K and V packed (for the forward or the
// backward) and the rotary tables of its queries and keys.
struct Prepass {
  Owned<Packed> pk;
  Owned<SinCosTable> qtab, ktab;
  template <typename Problem>
  Prepass(const Problem* problems, int64_t n, bool backward) : pk(n), qtab(n), ktab(n) {
    for (int64_t s = 0; s < n; ++s) {
      pk.p[s] = new Packed(problems[s].a, backward);
      qtab.p[s] = new SinCosTable(problems[s].a, false);
      ktab.p[s] = new SinCosTable(problems[s].a, true);
    }
  }
};

template <DType DT>
void forward(const FwdProblem* problems, int64_t n) {
  const Prepass pre(problems, n, false);
  Packed* const* pk = pre.pk.p;
  Array<PackCtx<DT>> pc(n, true);
  Array<FwdCtx<DT>> fc(n, true);
  Regions packs(n, &pack_body<DT>), tiles(n, &forward_body<DT>);
  for (int64_t s = 0; s < n; ++s) {
    const AttnArgs& a = problems[s].a;
    pc.p[s] = PackCtx<DT>{&a, pk[s], pre.ktab.p[s], false};
    fc.p[s] = FwdCtx<DT>{&a, pk[s], pre.qtab.p[s], problems[s].out, problems[s].lse, (a.L + BM - 1) / BM};
    packs.add(s, &pc.p[s], a.B * a.Hkv * pk[s]->nkt);
    tiles.add(s, &fc.p[s], fc.p[s].nqt * a.B * a.H);
  }
  packs.run(problems[0].a.parallel);
  tiles.run(problems[0].a.parallel);
}

// ---------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------

template <DType DT>
struct BwdCtx {
  const AttnArgs* a;
  const BwdArgs* g;
  const Packed* pk;
  const SinCosTable* qtab;
  const SinCosTable* ktab;
  int64_t nqt;
};

// Rows i < m of an fp32 block [m][n] (row stride ld) transposed into bf16 [cols][BM]; the
// columns m .. BM and the rows n .. cols are zero.
inline void transpose_bf16(const float* x, int64_t ld, int64_t m, int64_t n, int64_t cols, uint16_t* y) {
  memset(y, 0, cols * BM * sizeof(uint16_t));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t d = 0; d < n; ++d) y[d * BM + i] = f32_to_bf16(x[i * ld + d]);
}

template <DType DT>
void backward_body(void* vctx, int64_t begin, int64_t end) {
  auto& c = *static_cast<BwdCtx<DT>*>(vctx);
  const AttnArgs& a = *c.a;
  const BwdArgs& g = *c.g;
  const Packed& pk = *c.pk;
  const int64_t Dp = pk.Dp, Dvp = pk.Dvp, Dvk = pk.Dvk, G = a.H / a.Hkv, C = g.chunks, Sp = pad_keys(a.S);
  const PassKind kind(a);
  const bool xpos = kind.xpos, plain = kind.plain, dot16 = kind.dot16;
  TileScope tiles(dot16 && kAmx);
  Buffer Qs(BM * Dp), dO(BM * Dvp), P(BM * BN), dP(BM * BN), A(BM * BN), dQ(BM * Dp), row(Dp > Dvp ? Dp : Dvp);
  Buffer TH(a.softcap != 0.0f ? BM * BN : 1), keep(BN), tmp(BN * Dp);
  Buffer kx(xpos ? Dp * BN : 1), krx(xpos ? BN * Dp : 1), factor(xpos ? BN * Dp : 1);
  Bf16Buffer Q16(dot16 ? BM * Dp : 1), QT16(dot16 ? Dp * BM : 1), dO16(dot16 ? BM * Dvk : 1),
      dOT16(dot16 ? Dvp * BM : 1), dS16(dot16 ? BM * BN : 1, true), Av16(dot16 ? BM * BN : 1),
      dSv16(dot16 ? BM * BN : 1);
  int32_t qp[BM];
  float lse[BM], delta[BM];
  KeyTile kt;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t bh = task / C, chunk = task % C;
    const int64_t b = bh / a.H, h = bh % a.H, hk = h / G, bhk = b * a.Hkv + hk;
    const int64_t part = bh * C + chunk;
    float* dk_part = g.dk_part + part * Sp * Dp;
    float* dv_part = g.dv_part + part * Sp * Dvp;
    float* dbias = g.dbias ? g.dbias + part * g.bias_T : nullptr;
    float* durpe = g.durpe ? g.durpe + part * (2 * a.urpe_m + 1) : nullptr;
    const float* utab = a.urpe ? a.urpe + h * a.surpe_h : nullptr;
    const int64_t qt_begin = chunk * c.nqt / C, qt_end = (chunk + 1) * c.nqt / C;
    for (int64_t qt = qt_begin; qt < qt_end; ++qt) {
      const int64_t i0 = qt * BM, m = a.L - i0 < BM ? a.L - i0 : BM;
      int32_t q_lo, q_hi;
      const int32_t centre =
          load_query_tile<DT>(a, *c.qtab, b, h, i0, m, Dp, Qs.p, qp, q_lo, q_hi, dot16 ? 1.0f : a.scale);
      for (int64_t i = 0; i < m; ++i) {
        const int64_t r = a.lse_s.at(b, h, i0 + i);
        float* d = dO.p + i * Dvp;
        memset(d, 0, Dvp * sizeof(float));
        load_row<DT>(elem<DT>(g.dout, b * g.sdo_b + h * g.sdo_h + (i0 + i) * g.sdo_l), a.Dv, d);
        load_row<DT>(elem<DT>(g.out, b * g.so_b + h * g.so_h + (i0 + i) * g.so_l), a.Dv, row.p);
        float dot = 0.0f;
        for (int64_t e = 0; e < a.Dv; ++e) dot += d[e] * row.p[e];
        delta[i] = dot - (g.dlse ? g.dlse[r] : 0.0f);
        lse[i] = g.lse[r];
      }
#if defined(POSATTN_BF16_DOT)
      if (dot16) {
        memset(Q16.p, 0, BM * Dp * sizeof(uint16_t));
        to_bf16(Qs.p, m * Dp, Q16.p);
        transpose_bf16(Qs.p, Dp, m, Dp, Dp, QT16.p);
        memset(dO16.p, 0, BM * Dvk * sizeof(uint16_t));
        for (int64_t i = 0; i < m; ++i) to_bf16(dO.p + i * Dvp, Dvp, dO16.p + i * Dvk);
        transpose_bf16(dO.p, Dvp, m, Dvp, Dvp, dOT16.p);
      }
#endif
      memset(dQ.p, 0, BM * Dp * sizeof(float));
      int64_t t0, t1;
      key_tile_range(a, q_lo, q_hi, pk.nkt, t0, t1);
      for (int64_t t = t0; t < t1; ++t) {
        key_tile(a, b, t, kt);
        if (!tile_visible(a, q_lo, q_hi, kt)) continue;
        const bool interior = tile_interior(a, q_lo, q_hi, kt);
        const bool elementwise = !plain || !interior || kt.n < BN;
        const int64_t tile = bhk * pk.nkt + t;
        const float* kblock = pk.kt.p + tile * Dp * BN;
        const float* krows = pk.kr.p + (bhk * a.S + kt.j0) * Dp;
#if defined(POSATTN_BF16_DOT)
        if (dot16) {
          gemm_bf16(m, BN, Dp, Q16.p, Dp, pk.k16.p + tile * Dp * BN, P.p, BN, false);
          gemm_bf16(m, BN, Dvk, dO16.p, Dvk, pk.vt16.p + tile * Dvk * BN, dP.p, BN, false);
        } else
#endif
        {
          if (xpos) {
            xpos_key_tile(a, kblock, krows, kt, centre, Dp, kx.p, krx.p, factor.p);
            kblock = kx.p;
            krows = krx.p;
          }
          gemm(m, BN, a.D, Qs.p, Dp, 1, kblock, BN, P.p, BN, false);
          gemm(m, BN, a.Dv, dO.p, Dvp, 1, pk.vt.p + tile * Dvp * BN, BN, dP.p, BN, false);
        }
        for (int64_t i = 0; i < m; ++i) {
          float* p = P.p + i * BN;
          float* dp = dP.p + i * BN;
          float* ap = A.p + i * BN;
          float* th = a.softcap != 0.0f ? TH.p + i * BN : nullptr;
          const float l = lse[i];
          if (l == NEG_INF) {  // a row that sees no key: no gradient
            for (int64_t j = 0; j < BN; ++j) { p[j] = 0.0f; ap[j] = 0.0f; dp[j] = 0.0f; }
            continue;
          }
          const float mul = ready_row(a, kind, elementwise, b, h, i0 + i, qp[i], kt, interior, p, th);
          row_exp_sum(p, mul, l);  // lse: no max or sum needed
          // ap: the probabilities that multiply V (gate, dropout); dp: ∂L/∂p
          for (int64_t j = 0; j < BN; ++j) ap[j] = p[j];
          if (a.dropout_p > 0.0f) {
            dropout_row(a.seed, a.drop_b0 * a.H + bh, a.drop_row0 + i0 + i, a.drop_key0 + kt.j0, kt.n, a.dropout_p,
                      keep.p);
            for (int64_t j = kt.n; j < BN; ++j) keep.p[j] = 0.0f;
          }
          if (utab) {
            for (int64_t j = 0; j < kt.n; ++j) {
              const int64_t u = urpe_index(a, qp[i], kt.pos[j]);
              const float kp = a.dropout_p > 0.0f ? keep.p[j] : 1.0f;
              if (durpe) durpe[u] += p[j] * kp * dp[j];
              ap[j] *= utab[u] * kp;
              dp[j] *= utab[u] * kp;
            }
          } else if (a.dropout_p > 0.0f) {
            for (int64_t j = 0; j < BN; ++j) { ap[j] *= keep.p[j]; dp[j] *= keep.p[j]; }
          }
          // dS = p ∘ (dp − δ); dp becomes dS (the bias's and the float mask's gradient)
          const float di = delta[i];
          for (int64_t j = 0; j < BN; ++j) dp[j] = p[j] * (dp[j] - di);
          for (int64_t j = kt.n; j < BN; ++j) dp[j] = 0.0f;
          if (dbias) {
            if (a.bias_kind == BIAS_ALIBI || a.bias_kind == BIAS_MANHATTAN) {
              float acc = 0.0f;
              for (int64_t j = 0; j < kt.n; ++j) acc += dp[j] * bias_multiplier(a, qp[i], kt.pos[j]);
              dbias[0] += acc;
            } else if (a.bias_kind == BIAS_RELATIVE && !a.k_pos) {
              const ToeplitzRun run(static_cast<int64_t>(kt.pos[0]) - qp[i], kt.n, a.bias_i0);
              float left = 0.0f, right = 0.0f;
              for (int64_t j = 0; j < run.lo; ++j) left += dp[j];
              float* d = dbias + run.offset;
              for (int64_t j = run.lo; j < run.hi; ++j) d[j] += dp[j];
              for (int64_t j = run.hi; j < kt.n; ++j) right += dp[j];
              dbias[0] += left;
              dbias[2 * a.bias_i0] += right;
            } else {
              for (int64_t j = 0; j < kt.n; ++j) dbias[bias_index(a, qp[i], kt.pos[j])] += dp[j];
            }
          }
          if (g.dmask) {
            float* dm = g.dmask + ((b * a.H + h) * a.L + i0 + i) * a.S + kt.j0;
            memcpy(dm, dp, kt.n * sizeof(float));
          }
          // the cap acts on the scaled score alone: only dQ / dK go through its tanh
          if (th)
            for (int64_t j = 0; j < kt.n; ++j) dp[j] *= 1.0f - th[j] * th[j];
        }
#if defined(POSATTN_BF16_DOT)
        if (dot16) {
          // dVᵀ += dOᵀ·A, dQ += (scale·dS)·K, dKᵀ += Qᵀ·(scale·dS)
          for (int64_t i = 0; i < m; ++i) {
            scale_row(dP.p + i * BN, BN, a.scale);
            to_bf16(dP.p + i * BN, BN, dS16.p + i * BN);
          }
          to_bf16_pairs(A.p, BN, m, BM, BN, 1.0f, Av16.p);
          to_bf16_pairs(dP.p, BN, m, BM, BN, 1.0f, dSv16.p);
          gemm_bf16(Dvp, BN, BM, dOT16.p, BM, Av16.p, dv_part + kt.j0, Sp, true);
          gemm_bf16(m, Dp, BN, dS16.p, BN, pk.kr16.p + tile * Dp * BN, dQ.p, Dp, true);
          gemm_bf16(Dp, BN, BM, QT16.p, BM, dSv16.p, dk_part + kt.j0, Sp, true);
          continue;
        }
#endif
        // dV += Aᵀ·dO, dQ += dS·K, dK += dSᵀ·Qs
        gemm(kt.n, Dvp, m, A.p, 1, BN, dO.p, Dvp, dv_part + kt.j0 * Dvp, Dvp, true);
        gemm(m, Dp, kt.n, dP.p, BN, 1, krows, Dp, dQ.p, Dp, true);
        if (xpos) {
          gemm(kt.n, Dp, m, dP.p, 1, BN, Qs.p, Dp, tmp.p, Dp, false);
          for (int64_t j = 0; j < kt.n; ++j) {
            float* dst = dk_part + (kt.j0 + j) * Dp;
            for (int64_t d = 0; d < Dp; ++d) dst[d] += tmp.p[j * Dp + d] * factor.p[j * Dp + d];
          }
        } else {
          gemm(kt.n, Dp, m, dP.p, 1, BN, Qs.p, Dp, dk_part + kt.j0 * Dp, Dp, true);
        }
      }
      // dq = Rᵀ (scale · dQ · xPos decay); explicit angles take −dy_a·y_b + dy_b·y_a
      for (int64_t i = 0; i < m; ++i) {
        float* dy = dQ.p + i * Dp;
        if (g.dq_ang) {
          // y, the rotated row, and dy, its gradient: one of Qs and dQ carries the scale
          angle_grad(dy, 1.0f, Qs.p + i * Dp, a.rotary_dim, a.interleaved,
                     g.dq_ang + g.dqa_s.at(b, h, i0 + i));
        }
        if (!dot16) scale_row(dy, Dp, a.scale);  // bf16 dots: dS carried the scale
        if (a.rope_kind != ROPE_NONE) {
          if (xpos)
            xpos_scale(dy, static_cast<float>(qp[i] - centre), a.rope_table + a.rotary_dim / 2, a.rotary_dim,
                       a.interleaved);
          RowRotation rr(a, *c.qtab, b, h, i0 + i, false);
          unrotate(dy, rr.cs, rr.sn, a.rotary_dim, a.interleaved);
        }
        store_row<DT>(dy, a.D, elem<DT>(g.dq, g.dq_s.at(b, h, i0 + i)));
      }
    }
  }
}

// The last pass: per key row, the partial dK / dV of every query head of the group and
// every chunk summed in a fixed order, then un-rotated.
template <DType DT>
void reduce_keys_body(void* vctx, int64_t begin, int64_t end) {
  auto& c = *static_cast<BwdCtx<DT>*>(vctx);
  const AttnArgs& a = *c.a;
  const BwdArgs& g = *c.g;
  const Packed& pk = *c.pk;
  const int64_t Dp = pk.Dp, Dvp = pk.Dvp, G = a.H / a.Hkv, C = g.chunks, Sp = pad_keys(a.S);
  Buffer dk(BN * Dp), dv(BN * Dvp);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t bhk = task / pk.nkt, t = task % pk.nkt;
    const int64_t b = bhk / a.Hkv, hk = bhk % a.Hkv;
    const int64_t j0 = t * BN, n = a.S - j0 < BN ? a.S - j0 : BN;
    memset(dk.p, 0, BN * Dp * sizeof(float));
    memset(dv.p, 0, BN * Dvp * sizeof(float));
    for (int64_t gi = 0; gi < G; ++gi) {
      const int64_t h = hk * G + gi;
      for (int64_t ch = 0; ch < C; ++ch) {
        const int64_t part = (b * a.H + h) * C + ch;
        const float* pk_part = g.dk_part + part * Sp * Dp;
        const float* pv_part = g.dv_part + part * Sp * Dvp;
        if (pk.dot16) {  // transposed: [Dp][Sp], [Dvp][Sp]
          for (int64_t d = 0; d < Dp; ++d)
            for (int64_t j = 0; j < n; ++j) dk.p[j * Dp + d] += pk_part[d * Sp + j0 + j];
          for (int64_t d = 0; d < Dvp; ++d)
            for (int64_t j = 0; j < n; ++j) dv.p[j * Dvp + d] += pv_part[d * Sp + j0 + j];
        } else {
          for (int64_t x = 0; x < n * Dp; ++x) dk.p[x] += pk_part[j0 * Dp + x];
          for (int64_t x = 0; x < n * Dvp; ++x) dv.p[x] += pv_part[j0 * Dvp + x];
        }
      }
    }
    for (int64_t j = 0; j < n; ++j) {
      const int64_t s = j0 + j;
      float* dkr = dk.p + j * Dp;
      if (a.rope_kind != ROPE_NONE) {
        if (g.dk_ang)
          angle_grad(dkr, 1.0f, pk.kr.p + (bhk * a.S + s) * Dp, a.rotary_dim, a.interleaved,
                     g.dk_ang + g.dka_s.at(b, hk, s));
        RowRotation rr(a, *c.ktab, b, hk, s, true);
        unrotate(dkr, rr.cs, rr.sn, a.rotary_dim, a.interleaved);
      }
      store_row<DT>(dkr, a.D, elem<DT>(g.dk, g.dk_s.at(b, hk, s)));
      store_row<DT>(dv.p + j * Dvp, a.Dv, elem<DT>(g.dv, g.dv_s.at(b, hk, s)));
    }
  }
}

template <DType DT>
void backward(const BwdProblem* problems, int64_t n) {
  const Prepass pre(problems, n, true);
  Packed* const* pk = pre.pk.p;
  Array<PackCtx<DT>> pc(n, true);
  Array<BwdCtx<DT>> bc(n, true);
  Regions packs(n, &pack_body<DT>), tiles(n, &backward_body<DT>), keys(n, &reduce_keys_body<DT>);
  for (int64_t s = 0; s < n; ++s) {
    const AttnArgs& a = problems[s].a;
    pc.p[s] = PackCtx<DT>{&a, pk[s], pre.ktab.p[s], true};
    bc.p[s] = BwdCtx<DT>{&a, &problems[s].g, pk[s], pre.qtab.p[s], pre.ktab.p[s], (a.L + BM - 1) / BM};
    packs.add(s, &pc.p[s], a.B * a.Hkv * pk[s]->nkt);
    tiles.add(s, &bc.p[s], a.B * a.H * problems[s].g.chunks);
    keys.add(s, &bc.p[s], a.B * a.Hkv * pk[s]->nkt);
  }
  packs.run(problems[0].a.parallel);
  tiles.run(problems[0].a.parallel);
  keys.run(problems[0].a.parallel);
}

// ---------------------------------------------------------------------------------------
// decoding over a KV cache: one task per (batch row, KV head, block of query rows, split of the
// key range). The rows of a block are the G query heads of the KV head times the L queries (so a
// KV row is read once for the whole group); K and V tiles are read from the cache as they come
// (no pre-pass: a decode step reads each cached row once). Each split writes its normalised
// partial output and lse; a last pass merges the splits in a fixed order.
// ---------------------------------------------------------------------------------------

// Element offset of logical row j (KV head hk) of batch row b in a cache with strides (sb, sh, ss).
inline int64_t cache_row(const DecodeArgs& d, int64_t b, int64_t hk, int64_t j, int64_t sb, int64_t sh, int64_t ss) {
  if (d.block_table) {
    const int64_t page = d.block_table[b * d.sbt_b + j / d.page_size];
    return page * sb + hk * sh + (j % d.page_size) * ss;
  }
  return (d.batch_idx ? d.batch_idx[b] : b) * sb + hk * sh + j * ss;
}

// The new rows written into the cache, keys rotated at their positions (one task per (b, hk)).
template <DType DT>
void append_body(void* vctx, int64_t begin, int64_t end) {
  const DecodeArgs& d = *static_cast<const DecodeArgs*>(vctx);
  const AttnArgs& a = d.a;
  Buffer row(pad16(a.D > a.Dv ? a.D : a.Dv));
  float cs[128], sn[128];
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / a.Hkv, hk = task % a.Hkv;
    for (int64_t l = 0; l < a.L; ++l) {
      const int64_t j = d.seqlens[b] + l;
      load_row<DT>(elem<DT>(d.k_new, b * d.skn_b + hk * d.skn_h + l * d.skn_l), a.D, row.p);
      if (a.rope_kind == ROPE_FREQ) {
        row_sincos(a, static_cast<int32_t>(j), nullptr, cs, sn);
        rotate(row.p, cs, sn, a.rotary_dim, a.interleaved);
      }
      store_row<DT>(row.p, a.D, elem<DT>(d.k_cache, cache_row(d, b, hk, j, d.skc_b, d.skc_h, d.skc_s)));
      load_row<DT>(elem<DT>(d.v_new, b * d.svn_b + hk * d.svn_h + l * d.svn_l), a.Dv, row.p);
      store_row<DT>(row.p, a.Dv, elem<DT>(d.v_cache, cache_row(d, b, hk, j, d.svc_b, d.svc_h, d.svc_s)));
    }
  }
}

// s[r·ld] = q_r · k for the m rows of Q [m][ldq] (zero past D) and one key row k in the cache's
// dtype, converted as it is read: the key stays in registers for the whole block of rows.
template <DType DT>
inline void key_row_scores(const void* krow, int64_t D, const float* Q, int64_t ldq, int64_t m, float* s, int64_t ld) {
#if defined(__AVX512F__)
  __m512 k[16];  // D ≤ 256
  const int64_t nv = (D + 15) / 16;
  for (int64_t c = 0; c < nv; ++c) {
    const int64_t left = D - c * 16;
    const __mmask16 mask = left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1);
    if constexpr (DT == DType::F32) {
      k[c] = _mm512_maskz_loadu_ps(mask, static_cast<const float*>(krow) + c * 16);
    } else {
      const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(krow) + c * 16);
      k[c] = DT == DType::BF16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                               : _mm512_cvtph_ps(h);
    }
  }
  for (int64_t r = 0; r < m; ++r) {
    const float* q = Q + r * ldq;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 1 < nv; c += 2) {
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + c * 16), k[c], a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(q + c * 16 + 16), k[c + 1], a1);
    }
    if (c < nv) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + c * 16), k[c], a0);
    s[r * ld] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
  }
#else
  float k[256];
  load_row<DT>(krow, D, k);
  for (int64_t r = 0; r < m; ++r) {  // 16 independent lanes (vectorised without reassociation), then summed
    const float* q = Q + r * ldq;
    float lanes[16] = {};
    int64_t e = 0;
    for (; e + 16 <= D; e += 16)
      for (int64_t l = 0; l < 16; ++l) lanes[l] += q[e + l] * k[e + l];
    for (; e < D; ++e) lanes[0] += q[e] * k[e];
    float sum = 0.0f;
    for (int64_t l = 0; l < 16; ++l) sum += lanes[l];
    s[r * ld] = sum;
  }
#endif
}


// Keys read ahead of the one being scored: the K and V rows of key j + DECODE_PREFETCH are
// requested while key j is used, so the loads of a row overlap the arithmetic of the rows before
// it (a decode step reads each row once: without this the loop waits on memory between rows).
constexpr int64_t DECODE_PREFETCH = 8;

// Requests the cache lines of one row of `bytes` bytes.
inline void prefetch_row(const void* row, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(static_cast<const char*>(row) + o);
}

#if defined(POSATTN_BF16_DOT)
// Qᵀ of the m rows of Q [m][ldq] (D a multiple of 16) as the B operand of K·Qᵀ: pairs
// [D/2][mpad][2] (the two bf16 of consecutive d of one query row adjacent), columns past m zero.
inline void q_pairs_bf16(const float* Q, int64_t ldq, int64_t m, int64_t D, int64_t mpad, uint16_t* out) {
  memset(out, 0, D * mpad * sizeof(uint16_t));
  alignas(64) uint16_t row[256];
  for (int64_t r = 0; r < m; ++r) {
    to_bf16(Q + r * ldq, D, row);
    for (int64_t i = 0; i < D / 2; ++i) memcpy(out + (i * mpad + r) * 2, row + 2 * i, 2 * sizeof(uint16_t));
  }
}

// V rows j0 .. j0 + BN of a bf16 cache as the B operand of p·v: pairs [BN/2][Dvp][2] (the two
// keys of a pair adjacent per column), columns past Dv zero. rows(j) is key j's row.
template <typename Rows>
inline void v_pairs_bf16(Rows rows, int64_t j0, int64_t Dv, int64_t Dvp, uint16_t* out) {
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37,
                                      5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24, 55, 23, 54, 22,
                                      53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
  for (int64_t j = 0; j < BN; j += 2) {
    const uint16_t* r0 = static_cast<const uint16_t*>(rows(j0 + j));
    const uint16_t* r1 = static_cast<const uint16_t*>(rows(j0 + j + 1));
    uint16_t* o = out + j * Dvp;
    for (int64_t c = 0; c < Dvp; c += 32) {  // 32 columns of both rows → 2 × 16 column pairs
      const int64_t left = Dv - c;
      const __mmask32 mask = left >= 32 ? ~__mmask32{0} : left <= 0 ? 0 : (__mmask32{1} << left) - 1;
      const __m512i a = _mm512_maskz_loadu_epi16(mask, r0 + c), b = _mm512_maskz_loadu_epi16(mask, r1 + c);
      _mm512_storeu_si512(o + 2 * c, _mm512_permutex2var_epi16(a, lo, b));
      if (c + 16 < Dvp) _mm512_storeu_si512(o + 2 * c + 32, _mm512_permutex2var_epi16(a, hi, b));
    }
  }
}
#endif

#if defined(POSATTN_BF16_DOT)
// S[r][j] = T[j][r] for the rows r < m and the keys j < BN of the scores in key-major layout
// T [BN][ldt] (ldt a multiple of 16): 16 × 16 blocks transposed in registers (two rounds of
// unpacks inside 128-bit lanes, two of lane shuffles), 64 shuffles a block where element
// moves take 256 loads and stores.
inline void transpose_scores(const float* T, int64_t ldt, int64_t m, float* S) {
  for (int64_t r0 = 0; r0 < m; r0 += 16) {
    const int64_t rows = m - r0 < 16 ? m - r0 : 16;
    for (int64_t j0 = 0; j0 < BN; j0 += 16) {
      __m512 x[16], y[16];
      for (int i = 0; i < 16; ++i) x[i] = _mm512_loadu_ps(T + (j0 + i) * ldt + r0);
      for (int i = 0; i < 16; i += 2) {  // lane L: [x_i, x_i+1] interleaved at 4L, 4L+1 | 4L+2, 4L+3
        y[i] = _mm512_unpacklo_ps(x[i], x[i + 1]);
        y[i + 1] = _mm512_unpackhi_ps(x[i], x[i + 1]);
      }
      for (int g = 0; g < 16; g += 4) {  // lane L of x[g + c]: column 4L + c of keys g .. g + 3
        const __m512d a0 = _mm512_castps_pd(y[g]), a1 = _mm512_castps_pd(y[g + 1]);
        const __m512d a2 = _mm512_castps_pd(y[g + 2]), a3 = _mm512_castps_pd(y[g + 3]);
        x[g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a0, a2));
        x[g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a0, a2));
        x[g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a1, a3));
        x[g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a1, a3));
      }
      for (int c = 0; c < 4; ++c) {  // the four key groups' lanes gathered: column 4L + c
        const __m512 e0 = _mm512_shuffle_f32x4(x[c], x[4 + c], _MM_SHUFFLE(2, 0, 2, 0));
        const __m512 o0 = _mm512_shuffle_f32x4(x[c], x[4 + c], _MM_SHUFFLE(3, 1, 3, 1));
        const __m512 e1 = _mm512_shuffle_f32x4(x[8 + c], x[12 + c], _MM_SHUFFLE(2, 0, 2, 0));
        const __m512 o1 = _mm512_shuffle_f32x4(x[8 + c], x[12 + c], _MM_SHUFFLE(3, 1, 3, 1));
        y[c] = _mm512_shuffle_f32x4(e0, e1, _MM_SHUFFLE(2, 0, 2, 0));
        y[4 + c] = _mm512_shuffle_f32x4(o0, o1, _MM_SHUFFLE(2, 0, 2, 0));
        y[8 + c] = _mm512_shuffle_f32x4(e0, e1, _MM_SHUFFLE(3, 1, 3, 1));
        y[12 + c] = _mm512_shuffle_f32x4(o0, o1, _MM_SHUFFLE(3, 1, 3, 1));
      }
      for (int64_t r = 0; r < rows; ++r) _mm512_storeu_ps(S + (r0 + r) * BN + j0, y[r]);
    }
  }
}
#endif

// Scratch memory that a thread keeps from one decode task to the next. A decode task is small
// (it reads each cached row once), and allocating its buffers (~250 KB) per task cost as much as
// the arithmetic at short contexts: the allocator gives the memory back on free, and the next
// task faults it in again. The contents are whatever the thread's last task left.
class ThreadScratch {
 public:
  ThreadScratch() = default;
  ThreadScratch(const ThreadScratch&) = delete;
  ThreadScratch& operator=(const ThreadScratch&) = delete;
  ~ThreadScratch() { free(p_); }
  template <typename T>
  T* get(int64_t n) {
    const int64_t bytes = (std::max<int64_t>(n, 1) * static_cast<int64_t>(sizeof(T)) + 63) / 64 * 64;
    if (bytes > bytes_) {
      free(p_);
      p_ = aligned_alloc(64, static_cast<size_t>(bytes));
      bytes_ = p_ ? bytes : 0;
      if (p_ == nullptr) throw std::bad_alloc();
    }
    return static_cast<T*>(p_);
  }

 private:
  void* p_ = nullptr;
  int64_t bytes_ = 0;
};

template <DType DT>
void decode_body(void* vctx, int64_t begin, int64_t end) {
  const DecodeArgs& d = *static_cast<const DecodeArgs*>(vctx);
  const AttnArgs& base = d.a;
  const int64_t G = base.H / base.Hkv, rows = G * base.L, RB = decode_row_blocks(base.H, base.Hkv, base.L);
  const int64_t Dp = pad16(base.D), Dvp = pad16(base.Dv), P = d.splits;
  const bool plain = base.bias_kind == BIAS_NONE && base.softcap == 0.0f;
  const int64_t k_bytes = base.D * static_cast<int64_t>(DT == DType::F32 ? 4 : 2);
  const int64_t v_bytes = base.Dv * static_cast<int64_t>(DT == DType::F32 ? 4 : 2);
  static thread_local ThreadScratch qs_mem, vb_mem, s_mem, acc_mem;
  float* const Qs = qs_mem.get<float>(BM * Dp);
  float* const Vb = vb_mem.get<float>(BN * Dvp);  // V rows in fp32; columns past Dv zeroed per task
  float* const S = s_mem.get<float>(BM * BN);
  float* const acc = acc_mem.get<float>(BM * Dvp);  // rows past the block's are never read
  float cs[128], sn[128], m_i[BM], l_i[BM];
  int32_t qp[BM];
  uint8_t bad[BN];
  KeyTile kt;
#if defined(POSATTN_BF16_DOT)
  // bf16 caches: a full interior tile (every row sees every key) multiplies p·v in bf16 with
  // fp32 sums (AMX or vdpbf16ps, gemm_bf16), V's rows paired straight from the cache; on AMX,
  // q·kᵀ too, as Sᵀ = K·Qᵀ with the key rows of the cache as the A operand (16 or 64 rows at a
  // time: a paged cache needs pages of a multiple of 16 slots) and q rounded to bf16, Sᵀ
  // transposed in registers. Other tiles
  // (the ragged end, masks, non-finite V handling) take the fp32 path.
  constexpr bool dot16 = DT == DType::BF16;
  const bool amx_scores = dot16 && kAmx && base.D % 32 == 0 && (!d.block_table || d.page_size % 16 == 0);
  // keys per K·Qᵀ product: 64 (four independent tile products) where 64 consecutive keys are
  // equally spaced rows (a contiguous cache, or pages of a multiple of 64 slots), else 16
  const int64_t key_group = !d.block_table || d.page_size % 64 == 0 ? 64 : 16;
  const int64_t rows_max = G * base.L < BM ? G * base.L : BM, mpad = pad16(rows_max);
  // (AMX multiplies whole 16-row tiles: the rows of P16 past the block's, and their products in
  // acc, hold stale values that nothing reads)
  static thread_local ThreadScratch t_mem, qt_mem, p16_mem, vp_mem;
  float* const T = t_mem.get<float>(amx_scores ? BN * mpad : 1);
  uint16_t* const Qt16 = qt_mem.get<uint16_t>(amx_scores ? Dp * mpad : 1);
  uint16_t* const P16 = p16_mem.get<uint16_t>(dot16 ? BM * BN : 1);
  uint16_t* const Vp16 = vp_mem.get<uint16_t>(dot16 ? BN * Dvp : 1);
  TileScope tiles(dot16 && kAmx);
#else
  constexpr bool dot16 = false;
#endif
  for (int64_t task = begin; task < end; ++task) {
    const int64_t split = task % P, rb = task / P % RB, bhk = task / P / RB;
    const int64_t b = bhk / base.Hkv, hk = bhk % base.Hkv;
    const auto k_row = [&](int64_t key) {
      return elem<DT>(d.k_cache, cache_row(d, b, hk, key, d.skc_b, d.skc_h, d.skc_s));
    };
    const auto v_row = [&](int64_t key) {
      return elem<DT>(d.v_cache, cache_row(d, b, hk, key, d.svc_b, d.svc_h, d.svc_s));
    };
    AttnArgs a = base;  // this batch row's keys and positions
    a.S = d.seqlens[b] + (d.k_new ? a.L : 0);
    a.q_offset = a.S - a.L;
    a.k_offset = 0;
    const int64_t r0 = rb * BM, m = rows - r0 < BM ? rows - r0 : BM;
    int32_t q_lo = INT32_MAX, q_hi = INT32_MIN;
    for (int64_t r = 0; r < m; ++r) {  // row r0 + r: head hk·G + (r0 + r) / L, query (r0 + r) % L
      const int64_t h = hk * G + (r0 + r) / a.L, i = (r0 + r) % a.L;
      float* row = Qs + r * Dp;
      memset(row, 0, Dp * sizeof(float));
      load_row<DT>(elem<DT>(a.q, b * a.sq_b + h * a.sq_h + i * a.sq_l), a.D, row);
      qp[r] = static_cast<int32_t>(a.q_offset + i);
      q_lo = qp[r] < q_lo ? qp[r] : q_lo;
      q_hi = qp[r] > q_hi ? qp[r] : q_hi;
      if (a.rope_kind == ROPE_FREQ) {
        row_sincos(a, qp[r], nullptr, cs, sn);
        rotate(row, cs, sn, a.rotary_dim, a.interleaved);
      }
      for (int64_t e = 0; e < a.D; ++e) row[e] *= a.scale;
      m_i[r] = NEG_INF;
      l_i[r] = 0.0f;
    }
#if defined(POSATTN_BF16_DOT)
    bool q_paired = false;  // Qt16 holds this block's Qᵀ (built at its first full interior tile)
#endif
    memset(acc, 0, m * Dvp * sizeof(float));
    if (a.Dv < Dvp)
      for (int64_t j = 0; j < BN; ++j) memset(Vb + j * Dvp + a.Dv, 0, (Dvp - a.Dv) * sizeof(float));
    // this split's share of the key tiles the block can see
    int64_t t0, t1;
    key_tile_range(a, q_lo, q_hi, (a.S + BN - 1) / BN, t0, t1);
    const int64_t nt = t1 > t0 ? t1 - t0 : 0, s0 = t0 + split * nt / P, s1 = t0 + (split + 1) * nt / P;
    for (int64_t t = s0; t < s1; ++t) {
      key_tile(a, b, t, kt);
      if (!tile_visible(a, q_lo, q_hi, kt)) continue;
      const bool interior = tile_interior(a, q_lo, q_hi, kt);
      const bool fast = dot16 && interior && kt.n == BN;
      bool any_bad = false;
#if defined(POSATTN_BF16_DOT)
      if (fast) {
        if (amx_scores) {
          if (!q_paired) q_pairs_bf16(Qs, Dp, m, a.D, mpad, Qt16);
          q_paired = true;
          for (int64_t g = 0; g < BN; g += key_group) {  // Sᵀ [key_group keys][mpad] per product
            for (int64_t j = g; j < g + key_group; ++j) {  // the next group's keys, this group's values
              if (kt.j0 + j + key_group < a.S) prefetch_row(k_row(kt.j0 + j + key_group), k_bytes);
              prefetch_row(v_row(kt.j0 + j), v_bytes);
            }
            gemm_bf16(key_group, mpad, a.D, static_cast<const uint16_t*>(k_row(kt.j0 + g)), d.skc_s, Qt16,
                      T + g * mpad, mpad, false);
          }
          transpose_scores(T, mpad, m, S);
        } else {
          for (int64_t j = 0; j < BN; ++j) {
            if (kt.j0 + j + DECODE_PREFETCH < a.S) prefetch_row(k_row(kt.j0 + j + DECODE_PREFETCH), k_bytes);
            prefetch_row(v_row(kt.j0 + j), v_bytes);
            key_row_scores<DT>(k_row(kt.j0 + j), a.D, Qs, Dp, m, S + j, BN);
          }
        }
        v_pairs_bf16(v_row, kt.j0, a.Dv, Dvp, Vp16);
      }
#endif
      for (int64_t j = 0; j < (fast ? 0 : kt.n); ++j) {  // the scores [rows][keys], then V's rows staged in fp32
        const int64_t key = kt.j0 + j;
        if (key + DECODE_PREFETCH < a.S) {
          prefetch_row(k_row(key + DECODE_PREFETCH), k_bytes);
          prefetch_row(v_row(key + DECODE_PREFETCH), v_bytes);
        }
        key_row_scores<DT>(k_row(key), a.D, Qs, Dp, m, S + j, BN);
        float* vr = Vb + j * Dvp;
        load_row<DT>(v_row(key), a.Dv, vr);
        // A non-finite v_j acts as a NaN score of key j in the rows that see it. Where a row may
        // not see every key of the tile, V's non-finite entries are zeroed and the scores of the
        // rows that see them marked; on an interior tile every row sees every key, so the value
        // reaches the accumulator, and a row whose accumulator is not finite ends as NaN below.
        bad[j] = !interior && zero_non_finite(vr, a.Dv);
        any_bad = any_bad || bad[j];
      }
      const bool elementwise = !plain || !interior || kt.n < BN;
      for (int64_t r = 0; r < m; ++r) {
        float* sr = S + r * BN;
        for (int64_t j = kt.n; j < BN; ++j) sr[j] = NEG_INF;
        const int64_t h = hk * G + (r0 + r) / a.L, i = (r0 + r) % a.L;
        if (elementwise) score_row(a, b, h, i, qp[r], kt, interior, sr, nullptr);
        if (any_bad)
          for (int64_t j = 0; j < kt.n; ++j)
            if (bad[j] && sr[j] != NEG_INF) sr[j] = __builtin_nanf("");
        const float m_new = nan_max(row_max(sr), m_i[r]);
        if (m_new == NEG_INF) {  // nothing visible in this row yet
          for (int64_t j = 0; j < BN; ++j) sr[j] = 0.0f;
#if defined(POSATTN_BF16_DOT)
          if (fast) memset(P16 + r * BN, 0, BN * sizeof(uint16_t));
#endif
          continue;
        }
        const float alpha = m_new == m_i[r] ? 1.0f : exp_approx(m_i[r] - m_new);
#if defined(POSATTN_BF16_DOT)
        if (fast) {  // straight to the bf16 operand of p·v
          l_i[r] = l_i[r] * alpha + row_exp_sum_bf16(sr, 1.0f, m_new, P16 + r * BN);
        } else
#endif
          l_i[r] = l_i[r] * alpha + row_exp_sum(sr, 1.0f, m_new);
        m_i[r] = m_new;
        if (alpha != 1.0f) scale_row(acc + r * Dvp, Dvp, alpha);
      }
#if defined(POSATTN_BF16_DOT)
      if (fast) {
        gemm_bf16(m, Dvp, BN, P16, BN, Vp16, acc, Dvp, true);
        continue;
      }
#endif
      gemm(m, Dvp, kt.n, S, BN, 1, Vb, Dvp, acc, Dvp, true);
    }
    for (int64_t r = 0; r < m; ++r) {
      const int64_t h = hk * G + (r0 + r) / a.L, i = (r0 + r) % a.L;
      const int64_t row = (b * a.H + h) * a.L + i, slot = row * P + split;
      const float inv = l_i[r] == 0.0f ? 0.0f : 1.0f / l_i[r];
      // one split: the row's output itself (what the merge of one part computes), else its part
      float* o = P == 1 ? acc + r * Dvp : d.part_out + slot * Dvp;
      // poison: NaN when the accumulator took a non-finite value (an interior tile's v); summed
      // in 16 lanes (one chain of dependent adds would cost more than the rest of a short step)
      float lanes[16] = {};
      const float* ar = acc + r * Dvp;
      int64_t e = 0;
      for (; e + 16 <= a.Dv; e += 16)
        for (int64_t l = 0; l < 16; ++l) {
          lanes[l] += ar[e + l] * 0.0f;
          o[e + l] = ar[e + l] * inv;
        }
      for (; e < a.Dv; ++e) {
        lanes[0] += ar[e] * 0.0f;
        o[e] = ar[e] * inv;
      }
      float poison = 0.0f;
      for (int64_t l = 0; l < 16; ++l) poison += lanes[l];
      if (poison != 0.0f || poison != poison)
        for (int64_t e = 0; e < a.Dv; ++e) o[e] = poison;
      const float lse = l_i[r] == 0.0f ? NEG_INF : m_i[r] + std::log(l_i[r]) + poison;
      if (P > 1) {
        d.part_lse[slot] = lse;
        continue;
      }
      store_row<DT>(o, a.Dv, elem<DT>(d.out, row * a.Dv));
      d.lse[row] = lse;
    }
  }
}

// The splits of each query row merged (MATH: the partial states' exact merge), in split order.
template <DType DT>
void merge_body(void* vctx, int64_t begin, int64_t end) {
  const DecodeArgs& d = *static_cast<const DecodeArgs*>(vctx);
  const AttnArgs& a = d.a;
  const int64_t P = d.splits, Dvp = pad16(a.Dv);
  Buffer o(Dvp);
  for (int64_t row = begin; row < end; ++row) {  // row = (b·H + h)·L + i
    const float* lse = d.part_lse + row * P;
    float M = NEG_INF;
    for (int64_t s = 0; s < P; ++s) M = nan_max(M, lse[s]);
    float total = NEG_INF;
    memset(o.p, 0, Dvp * sizeof(float));
    if (M != NEG_INF) {  // NaN stays NaN; −inf: the row saw no key (output 0)
      float sum = 0.0f;
      for (int64_t s = 0; s < P; ++s) sum += exp_approx(lse[s] - M);
      total = M + std::log(sum);
      for (int64_t s = 0; s < P; ++s) {
        if (lse[s] == NEG_INF) continue;
        const float w = exp_approx(lse[s] - total);
        const float* part = d.part_out + (row * P + s) * Dvp;
        for (int64_t e = 0; e < a.Dv; ++e) o.p[e] += w * part[e];
      }
    }
    store_row<DT>(o.p, a.Dv, elem<DT>(d.out, row * a.Dv));
    d.lse[row] = total;
  }
}

template <DType DT>
void decode(const DecodeArgs& d) {
  const AttnArgs& a = d.a;
  if (d.k_new) a.parallel(a.B * a.Hkv, const_cast<DecodeArgs*>(&d), &append_body<DT>);
  a.parallel(a.B * a.Hkv * decode_row_blocks(a.H, a.Hkv, a.L) * d.splits, const_cast<DecodeArgs*>(&d),
             &decode_body<DT>);
  if (d.splits > 1) a.parallel(a.B * a.H * a.L, const_cast<DecodeArgs*>(&d), &merge_body<DT>);
}

struct DropoutCtx {
  uint64_t seed;
  int64_t H, L, S;
  float p;
  bool* keep;
};

void dropout_mask_body(void* vctx, int64_t begin, int64_t end) {
  auto& c = *static_cast<DropoutCtx*>(vctx);
  Buffer k(BN);
  for (int64_t r = begin; r < end; ++r) {  // one row (b·H + h, i) per task
    const int64_t bh = r / c.L, i = r % c.L;
    for (int64_t j0 = 0; j0 < c.S; j0 += BN) {
      const int64_t n = c.S - j0 < BN ? c.S - j0 : BN;
      dropout_row(c.seed, bh, i, j0, n, c.p, k.p);
      for (int64_t j = 0; j < n; ++j) c.keep[r * c.S + j0 + j] = k.p[j] != 0.0f || c.p == 0.0f;
    }
  }
}

}  // namespace

void attention_forward(const FwdProblem* problems, int64_t n) {
  if (n <= 0) return;
  switch (problems[0].a.dtype) {
    case DType::F32: forward<DType::F32>(problems, n); break;
    case DType::BF16: forward<DType::BF16>(problems, n); break;
    case DType::F16: forward<DType::F16>(problems, n); break;
  }
}

void attention_backward(const BwdProblem* problems, int64_t n) {
  if (n <= 0) return;
  switch (problems[0].a.dtype) {
    case DType::F32: backward<DType::F32>(problems, n); break;
    case DType::BF16: backward<DType::BF16>(problems, n); break;
    case DType::F16: backward<DType::F16>(problems, n); break;
  }
}

void attention_decode(const DecodeArgs& d) {
  switch (d.a.dtype) {
    case DType::F32: decode<DType::F32>(d); break;
    case DType::BF16: decode<DType::BF16>(d); break;
    case DType::F16: decode<DType::F16>(d); break;
  }
}

void dropout_mask(uint64_t seed, int64_t B, int64_t H, int64_t L, int64_t S, float p, bool* keep, ParallelFor par) {
  DropoutCtx c{seed, H, L, S, p, keep};
  par(B * H * L, &c, &dropout_mask_body);
}
