// The GEMM choice behind the CPU backend, measured (bench/cpu_gemm.py builds this with
// torch.utils.cpp_extension): posattn's own AVX-512 micro-kernel (csrc/attention_kernel.h)
// against oneDNN's batch-reduce GEMM as ATen exposes it (at::native::cpublas::brgemm) and
// torch's BLAS matmul (at::mm), on the tile shapes the attention kernels multiply.
#include <torch/extension.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <immintrin.h>
#include <new>
#include <vector>

#include "attention.h"

namespace posattn {
namespace avx512 {
#include "attention_kernel.h"
}  // namespace avx512
}  // namespace posattn

namespace {

template <class F>
double gflops(int64_t M, int64_t N, int64_t K, int reps, F&& f) {
  f(0);  // warm-up (and oneDNN's kernel generation)
  std::vector<double> t;
  for (int rep = 0; rep < 7; ++rep) {
    auto start = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; ++r) f(r);
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(t.begin(), t.end());
  return 2.0 * M * N * K * reps / t[t.size() / 2] / 1e9;
}

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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("run", &run); }
