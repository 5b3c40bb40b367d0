// Fused pieces of kernelized attention (python/posattn/kernelized.py, docs/math.md §6) for the
// CPU backend: the outer products that feed the FFTs and the contractions that follow
// them, each one pass over its operands with no broadcast temporaries. For one chunk of
// features [lo, hi) (F = hi − lo), the columns c = f·E1 + e, and rows n < N of every
// (batch, head):
//
//   kz_outer:      out[c, n]  = φ[n, lo+f] · w[n, e]   (e < E),   and with append_phi one more
//                  column per feature, out[f·E1 + E, n] = φ[n, lo+f] (the product with w's "1");
//                  out is [B, H, F·E1, n_pad], zero for N ≤ n < n_pad: the FFT's input as it is
//   kz_contract_f: out[n, e]  = Σ_f φ[n, lo+f] · x[f·E1 + e, n]      (e < E1)
//   kz_contract_e: out[n, f]  = Σ_e x[f·E1 + e, n] · w[n, e]  (+ x[f·E1 + E1−1, n] when w has E1 − 1 columns)
//
// x is [B, H, F·E1, ≥ N] (the inverse FFT's output, sliced; any strides but a contiguous last
// dim). Columns hold a sequence each, so every FFT runs over contiguous memory and nothing is
// padded, transposed or copied between the kernels and the FFTs. The forward is
// kz_outer(φk, v) → FFT → kz_contract_f(φq, ·); the backward uses all three (the gradients
// w.r.t. φq, φk and v), so the (F·(Dv+1), N) tensors exist once per chunk: the FFT's input
// and output. Rows are taken in blocks of kRows, whose [rows, E] operands stay in L1.
//
// And the positive-random-feature map (FAVOR+) around its one projection GEMM, x̃ = x·D^{-1/4}:
//
//   kz_prf:     φ[n, l] = exp(w_l·x̃_n − ‖x̃_n‖²/2 − stab) / √m, stab the row's max over l for
//               queries, the max over every row of the (batch, head) for keys
//   kz_prf_bwd: dx[n]   = D^{-1/4}·(Σ_l g[n, l]·w_l − x̃_n·Σ_l g[n, l]),  g = dφ ⊙ φ
//
// in float32 (float64 for float64 inputs); the GEMMs are ATen's, the rest one pass each.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace posattn {
namespace {

using at::Tensor;

void check_rows(const Tensor& t, const char* name, int64_t rank) {
  TORCH_CHECK(t.dim() == rank, name, " must have ", rank, " dims, got ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), name, " is on ", t.device(), "; the CPU kernels need CPU tensors");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              " must be float32 or float64, got ", t.scalar_type());
}

// [B, H, N, ·] viewed as rows: all dims but the last one folded
int64_t rows_of(const Tensor& t) { return t.numel() / std::max<int64_t>(t.size(-1), 1); }

constexpr int64_t kRows = 64;

// Strides of a [B, H, ·, ·] operand, (batch, head) folded into one index g = b·H + h.
struct Strided {
  int64_t sb, sh, sr, H;
  int64_t at(int64_t g) const { return (g / H) * sb + (g % H) * sh; }
};

Strided strided(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.size(1)}; }

// Rows [0, nb) of a block with row stride sr and E columns into dst[e·kRows + n]: the block's
// columns become contiguous, so the loops over rows vectorise.
template <typename T>
void transpose_rows(const T* src, int64_t sr, int64_t nb, int64_t E, T* dst) {
  for (int64_t n = 0; n < nb; ++n)
    for (int64_t e = 0; e < E; ++e) dst[e * kRows + n] = src[n * sr + e];
}

Tensor unit_last(const Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous(); }

Tensor kz_outer(const Tensor& phi_in, const Tensor& w_in, int64_t lo, int64_t hi, bool append_phi, int64_t n_pad) {
  check_rows(phi_in, "phi", 4);
  check_rows(w_in, "w", 4);
  TORCH_CHECK(phi_in.sizes().slice(0, 3) == w_in.sizes().slice(0, 3) && phi_in.scalar_type() == w_in.scalar_type(),
              "kz_outer: phi ", phi_in.sizes(), " and w ", w_in.sizes(), " must share [B, H, N] and dtype");
  TORCH_CHECK(0 <= lo && lo < hi && hi <= phi_in.size(3), "kz_outer: feature chunk [", lo, ", ", hi,
              ") is outside [0, ", phi_in.size(3), ")");
  TORCH_CHECK(n_pad >= phi_in.size(2), "kz_outer: n_pad=", n_pad, " is shorter than the ", phi_in.size(2), " rows");
  const Tensor phi = unit_last(phi_in), w = unit_last(w_in);
  const int64_t N = phi.size(2), E = w.size(3), F = hi - lo, E1 = E + (append_phi ? 1 : 0);
  // the blocks run to n_pad: the zero padding is written in the same pass, column by column
  const int64_t G = phi.size(0) * phi.size(1), C = F * E1, blocks = (n_pad + kRows - 1) / kRows;
  Tensor out = at::empty({phi.size(0), phi.size(1), C, n_pad}, phi.options());
  const Strided ps = strided(phi), ws = strided(w);
  AT_DISPATCH_FLOATING_TYPES(phi.scalar_type(), "kz_outer", [&] {
    const scalar_t* p = phi.data_ptr<scalar_t>();
    const scalar_t* x = w.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, G * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> wt(E * kRows), pf(kRows);  // the block of w transposed, one φ column
      for (int64_t t = begin; t < end; ++t) {
        const int64_t g = t / blocks, n0 = (t % blocks) * kRows, nend = std::min(kRows, n_pad - n0);
        const int64_t nb = std::clamp<int64_t>(N - n0, 0, nend);  // rows [nb, nend) are padding
        const scalar_t* pg = p + ps.at(g) + n0 * ps.sr + lo;
        const scalar_t* wg = x + ws.at(g) + n0 * ws.sr;
        scalar_t* og = o + g * C * n_pad + n0;
        if (nb < nend)
          for (int64_t c = 0; c < C; ++c) std::fill(og + c * n_pad + nb, og + c * n_pad + nend, scalar_t(0));
        transpose_rows(wg, ws.sr, nb, E, wt.data());
        for (int64_t f = 0; f < F && nb > 0; ++f) {
          for (int64_t n = 0; n < nb; ++n) pf[n] = pg[n * ps.sr + f];
          for (int64_t e = 0; e < E; ++e) {
            scalar_t* col = og + (f * E1 + e) * n_pad;
            const scalar_t* we = wt.data() + e * kRows;
            for (int64_t n = 0; n < nb; ++n) col[n] = pf[n] * we[n];
          }
          if (append_phi) std::copy(pf.begin(), pf.begin() + nb, og + (f * E1 + E) * n_pad);
        }
      }
    });
  });
  return out;
}

void check_columns(const Tensor& x, const Tensor& rows, int64_t F, const char* op) {
  check_rows(x, "x", 4);
  TORCH_CHECK(F >= 1 && x.size(2) % F == 0 && x.sizes().slice(0, 2) == rows.sizes().slice(0, 2) &&
                  x.size(3) >= rows.size(2) && x.scalar_type() == rows.scalar_type(),
              op, ": x ", x.sizes(), " must be [B, H, F·E1, ≥ N] for F = ", F, " and [B, H, N, ·] = ", rows.sizes());
}

Tensor kz_contract_f(const Tensor& phi_in, const Tensor& x_in, int64_t lo, int64_t hi) {
  check_rows(phi_in, "phi", 4);
  TORCH_CHECK(0 <= lo && lo < hi && hi <= phi_in.size(3), "kz_contract_f: feature chunk [", lo, ", ", hi,
              ") is outside [0, ", phi_in.size(3), ")");
  const int64_t F = hi - lo;
  check_columns(x_in, phi_in, F, "kz_contract_f");
  const Tensor phi = unit_last(phi_in), x = unit_last(x_in);
  const int64_t N = phi.size(2), E1 = x.size(2) / F, G = phi.size(0) * phi.size(1), blocks = (N + kRows - 1) / kRows;
  Tensor out = at::empty({phi.size(0), phi.size(1), N, E1}, phi.options());
  const Strided ps = strided(phi), xs = strided(x);
  AT_DISPATCH_FLOATING_TYPES(phi.scalar_type(), "kz_contract_f", [&] {
    const scalar_t* p = phi.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, G * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> acc(E1 * kRows), pf(kRows);  // acc[e][n]: the sums, vectorised over rows
      for (int64_t t = begin; t < end; ++t) {
        const int64_t g = t / blocks, n0 = (t % blocks) * kRows, nb = std::min(kRows, N - n0);
        const scalar_t* pg = p + ps.at(g) + n0 * ps.sr + lo;
        const scalar_t* xg = xp + xs.at(g) + n0;
        std::fill(acc.begin(), acc.end(), scalar_t(0));
        for (int64_t f = 0; f < F; ++f) {
          for (int64_t n = 0; n < nb; ++n) pf[n] = pg[n * ps.sr + f];
          for (int64_t e = 0; e < E1; ++e) {
            const scalar_t* col = xg + (f * E1 + e) * xs.sr;
            scalar_t* a = acc.data() + e * kRows;
            for (int64_t n = 0; n < nb; ++n) a[n] += pf[n] * col[n];
          }
        }
        scalar_t* og = o + (g * N + n0) * E1;
        for (int64_t n = 0; n < nb; ++n)
          for (int64_t e = 0; e < E1; ++e) og[n * E1 + e] = acc[e * kRows + n];
      }
    });
  });
  return out;
}

Tensor kz_contract_e(const Tensor& x_in, const Tensor& w_in, int64_t F) {
  check_rows(w_in, "w", 4);
  check_columns(x_in, w_in, F, "kz_contract_e");
  const int64_t E1 = x_in.size(2) / F, Ew = w_in.size(3);
  TORCH_CHECK(Ew == E1 || Ew == E1 - 1, "kz_contract_e: w ", w_in.sizes(), " must have E1 = ", E1,
              " or E1 − 1 columns for x ", x_in.sizes());
  const Tensor x = unit_last(x_in), w = unit_last(w_in);
  const int64_t N = w.size(2), G = w.size(0) * w.size(1), blocks = (N + kRows - 1) / kRows;
  const bool implicit_one = Ew == E1 - 1;
  Tensor out = at::empty({w.size(0), w.size(1), N, F}, w.options());
  const Strided xs = strided(x), ws = strided(w);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kz_contract_e", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, G * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> wt(Ew * kRows), acc(kRows);  // wt[e][n]: the block of w, transposed
      for (int64_t t = begin; t < end; ++t) {
        const int64_t g = t / blocks, n0 = (t % blocks) * kRows, nb = std::min(kRows, N - n0);
        const scalar_t* wg = wp + ws.at(g) + n0 * ws.sr;
        transpose_rows(wg, ws.sr, nb, Ew, wt.data());
        const scalar_t* xg = xp + xs.at(g) + n0;
        scalar_t* og = o + (g * N + n0) * F;
        for (int64_t f = 0; f < F; ++f) {
          const scalar_t* xf = xg + f * E1 * xs.sr;
          if (implicit_one)
            std::copy(xf + Ew * xs.sr, xf + Ew * xs.sr + nb, acc.begin());
          else
            std::fill(acc.begin(), acc.end(), scalar_t(0));
          for (int64_t e = 0; e < Ew; ++e) {
            const scalar_t* col = xf + e * xs.sr;
            const scalar_t* we = wt.data() + e * kRows;
            for (int64_t n = 0; n < nb; ++n) acc[n] += col[n] * we[n];
          }
          for (int64_t n = 0; n < nb; ++n) og[n * F + f] = acc[n];
        }
      }
    });
  });
  return out;
}

at::ScalarType compute_type(const Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_prf(const Tensor& x, const Tensor& w, const char* op) {
  TORCH_CHECK(x.dim() == 4 && x.is_floating_point() && x.device().is_cpu(), op, ": x must be a CPU float tensor [B, H, N, D], got ",
              x.sizes(), " ", x.scalar_type(), " on ", x.device());
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(3) && w.size(0) >= 1 && w.is_floating_point() && w.device().is_cpu(), op,
              ": the projection must be a CPU float tensor [m, ", x.size(3), "], got ", w.sizes());
}

Tensor kz_prf(const Tensor& x, const Tensor& w, bool is_query) {
  check_prf(x, w, "kz_prf");
  const auto ct = compute_type(x);
  const int64_t B = x.size(0), H = x.size(1), N = x.size(2), D = x.size(3), m = w.size(0);
  const Tensor xs = (x.to(ct) * std::pow(double(D), -0.25)).contiguous();
  Tensor phi = at::matmul(xs, w.to(ct).t()).contiguous();  // [B, H, N, m]: w_l·x̃
  Tensor stab = at::empty({B * H, N}, xs.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "kz_prf", [&] {
    scalar_t* p = phi.data_ptr<scalar_t>();
    const scalar_t* xr = xs.data_ptr<scalar_t>();
    scalar_t* st = stab.data_ptr<scalar_t>();
    const scalar_t inv_sqrt_m = scalar_t(1) / std::sqrt(scalar_t(m));
    at::parallel_for(0, B * H * N, 64, [&](int64_t begin, int64_t end) {  // logits and each row's max
      for (int64_t r = begin; r < end; ++r) {
        scalar_t half_sq = 0;
        for (int64_t d = 0; d < D; ++d) half_sq += xr[r * D + d] * xr[r * D + d];
        half_sq *= scalar_t(0.5);
        scalar_t mx = -std::numeric_limits<scalar_t>::infinity();
        for (int64_t l = 0; l < m; ++l) mx = std::max(mx, p[r * m + l] -= half_sq);
        st[r] = mx;
      }
    });
    if (!is_query) {  // keys: one stabiliser per (batch, head) (a per-key one would not cancel)
      const Tensor gmax = std::get<0>(stab.max(1, true));
      stab.copy_(gmax.expand_as(stab));
    }
    at::parallel_for(0, B * H * N, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        for (int64_t l = 0; l < m; ++l) p[r * m + l] = std::exp(p[r * m + l] - st[r]) * inv_sqrt_m;
    });
  });
  return phi;
}

Tensor kz_prf_bwd(const Tensor& dphi_in, const Tensor& phi_in, const Tensor& x, const Tensor& w) {
  check_prf(x, w, "kz_prf_bwd");
  const auto ct = compute_type(x);
  const int64_t D = x.size(3), m = w.size(0);
  TORCH_CHECK(phi_in.scalar_type() == ct && dphi_in.scalar_type() == ct && phi_in.sizes() == dphi_in.sizes() &&
                  phi_in.dim() == 4 && phi_in.sizes().slice(0, 3) == x.sizes().slice(0, 3) && phi_in.size(3) == m,
              "kz_prf_bwd: dphi ", dphi_in.sizes(), " and phi ", phi_in.sizes(), " must be [B, H, N, ", m, "] in ", ct);
  const Tensor dphi = dphi_in.contiguous(), phi = phi_in.contiguous();
  const double scale = std::pow(double(D), -0.25);
  Tensor g = at::empty_like(phi);
  Tensor gsum = at::empty(phi.sizes().slice(0, 3), phi.options());
  const int64_t rows = rows_of(phi);
  AT_DISPATCH_FLOATING_TYPES(ct, "kz_prf_bwd", [&] {
    const scalar_t* dp = dphi.data_ptr<scalar_t>();
    const scalar_t* pp = phi.data_ptr<scalar_t>();
    scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* sp = gsum.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t s = 0;
        for (int64_t l = 0; l < m; ++l) s += gp[r * m + l] = dp[r * m + l] * pp[r * m + l];
        sp[r] = s;
      }
    });
  });
  Tensor dx = at::matmul(g, w.to(ct)).contiguous();  // [B, H, N, D]: Σ_l g_l·w_l
  const Tensor xc = x.to(ct).contiguous();
  AT_DISPATCH_FLOATING_TYPES(ct, "kz_prf_bwd_x", [&] {
    scalar_t* o = dx.data_ptr<scalar_t>();
    const scalar_t* xr = xc.data_ptr<scalar_t>();
    const scalar_t* sp = gsum.data_ptr<scalar_t>();
    const scalar_t s1 = scalar_t(scale), s2 = scalar_t(scale * scale);
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        for (int64_t d = 0; d < D; ++d) o[r * D + d] = s1 * o[r * D + d] - s2 * xr[r * D + d] * sp[r];
    });
  });
  return dx.to(x.scalar_type());
}

}  // namespace
}  // namespace posattn

TORCH_LIBRARY_FRAGMENT(posattn, m) {
  m.def("kz_outer(Tensor phi, Tensor w, int lo, int hi, bool append_phi, int n_pad) -> Tensor");
  m.def("kz_contract_f(Tensor phi, Tensor x, int lo, int hi) -> Tensor");
  m.def("kz_contract_e(Tensor x, Tensor w, int F) -> Tensor");
  m.def("kz_prf(Tensor x, Tensor w, bool is_query) -> Tensor");
  m.def("kz_prf_bwd(Tensor dphi, Tensor phi, Tensor x, Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(posattn, CPU, m) {
  m.impl("kz_outer", &posattn::kz_outer);
  m.impl("kz_contract_f", &posattn::kz_contract_f);
  m.impl("kz_contract_e", &posattn::kz_contract_e);
  m.impl("kz_prf", &posattn::kz_prf);
  m.impl("kz_prf_bwd", &posattn::kz_prf_bwd);
}
