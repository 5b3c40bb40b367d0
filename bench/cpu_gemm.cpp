// The GEMM choice behind the CPU backend, measured (bench/cpu_gemm.py builds this with
// torch.utils.cpp_extension): posattn's own kernels (csrc/attention_kernel.h: the fp32
// AVX-512 micro-kernel, the bf16 AVX-512-BF16 micro-kernel and the AMX tile kernel) against
// oneDNN's batch-reduce GEMM as ATen exposes it (at::native::cpublas::brgemm) and torch's
// BLAS matmul (at::mm), on the tile shapes the attention kernels multiply; and the two peaks
// those are measured against: an FMA loop and an AMX tile loop with no memory traffic.
#include <torch/extension.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <immintrin.h>
#include <functional>
#include <new>
#include <sys/syscall.h>
#include <unistd.h>
#include <vector>

#include "attention.h"

namespace posattn {
namespace avx512 {
#define POSATTN_NO_AMX 1
#include "attention_kernel.h"
#undef POSATTN_NO_AMX
#undef POSATTN_BF16_DOT
}  // namespace avx512
namespace amx {
#include "attention_kernel.h"
}  // namespace amx
bool amx::request_tiles() {
  constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}
}  // namespace posattn

namespace {

double seconds_median(int reps, const std::function<void(int)>& f) {
  f(0);  // warm-up (and oneDNN's kernel generation)
  std::vector<double> t;
  for (int rep = 0; rep < 7; ++rep) {
    auto start = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; ++r) f(r);
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

double gflops(int64_t M, int64_t N, int64_t K, int reps, const std::function<void(int)>& f) {
  return 2.0 * M * N * K * reps / seconds_median(reps, f) / 1e9;
}

// fp32: {own AVX-512, oneDNN brgemm, at::mm}
std::vector<double> run(int64_t M, int64_t N, int64_t K, int reps) {
  std::vector<float> A(M * K, 0.5f), B(K * N, 0.25f), C(M * N);
  const double own = gflops(M, N, K, reps, [&](int r) {
    posattn::avx512::gemm(M, N, K, A.data(), K, 1, B.data(), N, C.data(), N, r & 1);
  });
  const double brgemm = gflops(M, N, K, reps, [&](int r) {
    at::native::cpublas::brgemm(M, N, K, K, N, N, r & 1, A.data(), B.data(), C.data());
  });
  auto a = torch::full({M, K}, 0.5f), b = torch::full({K, N}, 0.25f), c = torch::empty({M, N});
  const double mm = gflops(M, N, K, reps, [&](int) { at::mm_out(c, a, b); });
  return {own, brgemm, mm};
}

// bf16 operands, fp32 sums (A row-major, B pair-interleaved): {own AVX-512-BF16, own AMX (0
// without AMX), oneDNN brgemm}. M, N multiples of 16, K of 32.
std::vector<double> run_bf16(int64_t M, int64_t N, int64_t K, int reps, bool amx) {
  std::vector<uint16_t> A(M * K, 0x3f00), B(K * N, 0x3e80);  // 0.5, 0.25
  std::vector<float> C(M * N);
  const double own = gflops(M, N, K, reps, [&](int r) {
    posattn::avx512::gemm_bf16(M, N, K, A.data(), K, B.data(), C.data(), N, r & 1);
  });
  double tiles = 0.0;
  if (amx && posattn::amx::request_tiles()) {
    posattn::amx::TileScope scope(true);
    tiles = gflops(M, N, K, reps, [&](int r) {
      posattn::amx::gemm_bf16(M, N, K, A.data(), K, B.data(), C.data(), N, r & 1);
    });
  }
  const auto* a16 = reinterpret_cast<const at::BFloat16*>(A.data());
  const auto* b16 = reinterpret_cast<const at::BFloat16*>(B.data());
  const double brgemm = gflops(M, N, K, reps, [&](int r) {
    at::native::cpublas::brgemm(M, N, K, K, N, N, r & 1, a16, b16, C.data(), true);
  });
  at::native::cpublas::brgemm_release(true);
  return {own, tiles, brgemm};
}

// One core's fp32 FMA peak: 24 independent chains of 512-bit FMAs (enough to fill two pipes
// of 4-cycle latency), GFLOP/s.
double peak_fma() {
  constexpr int64_t iters = 4000000;
  double s = seconds_median(1, [&](int) {
    __m512 c[24];
    for (auto& x : c) x = _mm512_set1_ps(1.0f);
    const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
    for (int64_t i = 0; i < iters; ++i)
#pragma GCC unroll 24
      for (auto& x : c) x = _mm512_fmadd_ps(x, a, b);
    __m512 t = c[0];
    for (int j = 1; j < 24; ++j) t = _mm512_add_ps(t, c[j]);
    volatile float sink = _mm512_reduce_add_ps(t);
    (void)sink;
  });
  return 2.0 * 16 * 24 * iters / s / 1e9;
}

// One core's AMX bf16 peak: tdpbf16ps on 4 accumulator tiles from resident operands, GFLOP/s.
double peak_amx() {
  constexpr int64_t iters = 400000;
  if (!posattn::amx::request_tiles()) return 0.0;
  std::vector<uint16_t> A(16 * 32, 0x3f00), B(16 * 32, 0x3e80);
  std::vector<float> C(16 * 16);
  posattn::amx::TileScope scope(true);
  double s = seconds_median(1, [&](int) {
    _tile_loadd(4, A.data(), 64);
    _tile_loadd(5, A.data(), 64);
    _tile_loadd(6, B.data(), 64);
    _tile_loadd(7, B.data(), 64);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t i = 0; i < iters; ++i) {
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, C.data(), 64);
  });
  return 2.0 * 16 * 16 * 32 * 4 * iters / s / 1e9;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("run", &run);
  m.def("run_bf16", &run_bf16);
  m.def("peak_fma", &peak_fma);
  m.def("peak_amx", &peak_amx);
  m.def("request_tiles", &posattn::amx::request_tiles);
}
