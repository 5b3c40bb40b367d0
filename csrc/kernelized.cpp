// Fused pieces of kernelized attention (python/posattn/kernelized.py, MATH.md §1) for the
// CPU backend: the outer products that feed the FFTs and the contractions that follow
// them, each one pass over its operands with no broadcast temporaries. For one chunk of
// features [lo, hi) (F = hi − lo) and rows n of every (batch, head):
//
//   kz_outer:      out[n, f, e] = φ[n, lo+f] · w[n, e]   (e < E),   and with append_phi
//                  one more column out[n, f, E] = φ[n, lo+f] (the product with w's "1")
//   kz_contract_f: out[n, e]    = Σ_f φ[n, lo+f] · x[n, f, e]        (e < E1)
//   kz_contract_e: out[n, f]    = Σ_e x[n, f, e] · w[n, e]  (+ x[n, f, E1−1] when w has E1 − 1 entries)
//
// The forward is kz_outer(φk, v) → FFT → kz_contract_f(φq, ·); the backward uses all three
// (the gradients w.r.t. φq, φk and v), so the (N, F·(Dv+1)) tensors exist once per chunk:
// the FFT's input and output.
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

Tensor kz_outer(const Tensor& phi_in, const Tensor& w_in, int64_t lo, int64_t hi, bool append_phi) {
  check_rows(phi_in, "phi", 4);
  check_rows(w_in, "w", 4);
  TORCH_CHECK(phi_in.sizes().slice(0, 3) == w_in.sizes().slice(0, 3) && phi_in.scalar_type() == w_in.scalar_type(),
              "kz_outer: phi ", phi_in.sizes(), " and w ", w_in.sizes(), " must share [B, H, N] and dtype");
  TORCH_CHECK(0 <= lo && lo < hi && hi <= phi_in.size(3), "kz_outer: feature chunk [", lo, ", ", hi,
              ") is outside [0, ", phi_in.size(3), ")");
  const Tensor phi = phi_in.contiguous(), w = w_in.contiguous();
  const int64_t m = phi.size(3), E = w.size(3), F = hi - lo, rows = rows_of(phi), E1 = E + (append_phi ? 1 : 0);
  Tensor out = at::empty({phi.size(0), phi.size(1), phi.size(2), F * E1}, phi.options());
  AT_DISPATCH_FLOATING_TYPES(phi.scalar_type(), "kz_outer", [&] {
    const scalar_t* p = phi.data_ptr<scalar_t>();
    const scalar_t* x = w.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* pr = p + r * m + lo;
        const scalar_t* wr = x + r * E;
        scalar_t* orow = o + r * F * E1;
        for (int64_t f = 0; f < F; ++f) {
          scalar_t* of = orow + f * E1;
          for (int64_t e = 0; e < E; ++e) of[e] = pr[f] * wr[e];
          if (append_phi) of[E] = pr[f];
        }
      }
    });
  });
  return out;
}

Tensor kz_contract_f(const Tensor& phi_in, const Tensor& x_in, int64_t lo, int64_t hi) {
  check_rows(phi_in, "phi", 4);
  check_rows(x_in, "x", 4);
  TORCH_CHECK(0 <= lo && lo < hi && hi <= phi_in.size(3), "kz_contract_f: feature chunk [", lo, ", ", hi,
              ") is outside [0, ", phi_in.size(3), ")");
  const int64_t F = hi - lo;
  TORCH_CHECK(phi_in.sizes().slice(0, 3) == x_in.sizes().slice(0, 3) && x_in.size(3) % F == 0 &&
                  phi_in.scalar_type() == x_in.scalar_type(),
              "kz_contract_f: x ", x_in.sizes(), " must be [B, H, N, F·E1] for phi ", phi_in.sizes(), " and F = ", F);
  const Tensor phi = phi_in.contiguous(), x = x_in.contiguous();
  const int64_t m = phi.size(3), E1 = x.size(3) / F, rows = rows_of(phi);
  Tensor out = at::empty({phi.size(0), phi.size(1), phi.size(2), E1}, phi.options());
  AT_DISPATCH_FLOATING_TYPES(phi.scalar_type(), "kz_contract_f", [&] {
    const scalar_t* p = phi.data_ptr<scalar_t>();
    const scalar_t* xs = x.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* pr = p + r * m + lo;
        const scalar_t* xr = xs + r * F * E1;
        scalar_t* orow = o + r * E1;
        for (int64_t e = 0; e < E1; ++e) orow[e] = 0;
        for (int64_t f = 0; f < F; ++f) {
          const scalar_t* xf = xr + f * E1;
          for (int64_t e = 0; e < E1; ++e) orow[e] += pr[f] * xf[e];
        }
      }
    });
  });
  return out;
}

Tensor kz_contract_e(const Tensor& x_in, const Tensor& w_in, int64_t F) {
  check_rows(x_in, "x", 4);
  check_rows(w_in, "w", 4);
  TORCH_CHECK(F >= 1 && x_in.size(3) % F == 0, "kz_contract_e: x ", x_in.sizes(), " is not [B, H, N, F·E1] for F = ",
              F);
  const int64_t E1 = x_in.size(3) / F, Ew = w_in.size(3);
  TORCH_CHECK(x_in.sizes().slice(0, 3) == w_in.sizes().slice(0, 3) && (Ew == E1 || Ew == E1 - 1) &&
                  x_in.scalar_type() == w_in.scalar_type(),
              "kz_contract_e: w ", w_in.sizes(), " must be [B, H, N, E1] or [B, H, N, E1 − 1] for x ", x_in.sizes());
  const Tensor x = x_in.contiguous(), w = w_in.contiguous();
  const int64_t rows = rows_of(x);
  const bool implicit_one = Ew == E1 - 1;
  Tensor out = at::empty({x.size(0), x.size(1), x.size(2), F}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kz_contract_e", [&] {
    const scalar_t* xs = x.data_ptr<scalar_t>();
    const scalar_t* ws = w.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* wr = ws + r * Ew;
        for (int64_t f = 0; f < F; ++f) {
          const scalar_t* xf = xs + (r * F + f) * E1;
          scalar_t acc = implicit_one ? xf[E1 - 1] : scalar_t(0);
          for (int64_t e = 0; e < Ew; ++e) acc += xf[e] * wr[e];
          o[r * F + f] = acc;
        }
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace posattn

TORCH_LIBRARY_FRAGMENT(posattn, m) {
  m.def("kz_outer(Tensor phi, Tensor w, int lo, int hi, bool append_phi) -> Tensor");
  m.def("kz_contract_f(Tensor phi, Tensor x, int lo, int hi) -> Tensor");
  m.def("kz_contract_e(Tensor x, Tensor w, int F) -> Tensor");
}

TORCH_LIBRARY_IMPL(posattn, CPU, m) {
  m.impl("kz_outer", &posattn::kz_outer);
  m.impl("kz_contract_f", &posattn::kz_contract_f);
  m.impl("kz_contract_e", &posattn::kz_contract_e);
}
