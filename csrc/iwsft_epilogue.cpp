// Native CPU epilogue of the chunked iw-SFT loss (docs/design.md §3-§4).
//
// Two ops on one fp32 logits chunk z (m, V), both in place, registered as
//   torch.ops.iwsft_native.chunk_forward(Tensor(a!) z, Tensor y) -> (Tensor logp, Tensor rest)
//   torch.ops.iwsft_native.softmax_grad_(Tensor(a!) e, Tensor y, Tensor logp, Tensor coef,
//                                        Tensor rest) -> Tensor(a!)
// They are the twins of TorchOps.chunk_forward / TorchOps.softmax_grad
// (iwsft_kernels/backends/torch_ops.py):
//   chunk_forward: per row, sweep 1 reads the row max and the target logit; sweep 2 writes
//     e = exp(z - max) in place and sums it *without one arg-max entry*: rest = sum of e
//     over the entries below the max, plus (number of entries equal to the max) - 1, so
//     that the full sum is 1 + rest and 1 + rest is never rounded. logp = (z_y - max) -
//     log1p(rest), clamped to <= 0: exact to fp32 relative rounding as p_y -> 1 (log(sum)
//     would quantise logp to multiples of 2^-24 and give exactly 0 for 1 - p_y < 6e-8).
//   softmax_grad_: per row, e <- (coef / (1 + rest)) * e, then e[y] = coef * expm1(logp):
//     the target entry p_y - 1 is never formed by cancellation.
//
// Dtypes: all arithmetic is fp32 and z is always fp32 here. 16-bit (bf16/fp16) inputs are
// covered too: the chunk driver builds the logits chunk in fp32 for every compute dtype
// (torch_ops.chunk_logits accumulates 16-bit GEMMs into an fp32 chunk), so the epilogue only
// ever sees that fp32 chunk. No temporaries beyond the chunk: the only allocations are the
// two (m,) outputs of chunk_forward.
//
// Rows run in parallel with at::parallel_for. The inner loops are written so that gcc
// vectorises them (-O3 -fopenmp-simd; the loader adds -mavx2 -mfma where the CPU has them):
// exp is a Cephes-style polynomial (max error ~2 ulp on [-87, 0]; z - max <= 0 always).
//
// Built either on first use by iwsft_kernels/backends/native_cpu.py (a plain shared library loaded with
// torch.ops.load_library) or, with IWSFT_PYTHON_MODULE defined, as the Python extension
// module iwsft_kernels._C by setup.py (IWSFT_BUILD_NATIVE=1).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <limits>
#include <tuple>

namespace {

// exp(x) for x <= 0 (NaN propagates; x < -87.33 gives 0, i.e. fp32 denormals are flushed,
// which changes a softmax sum by < 1e-38 relative). Branch-free so that loops vectorise.
inline float exp_nonpos(float x) {
  const float lo = -87.33f;
  float xc = x < lo ? lo : x;  // keeps NaN (comparison is false)
  // n = round(x * log2(e)) by the 1.5 * 2^23 trick (no rint needed for vectorisation)
  const float magic = 12582912.0f;
  float n = (xc * 1.44269504088896341f + magic) - magic;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float y = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  y = y * scale;
  return x < lo ? 0.0f : y;
}

constexpr int64_t kBlock = 512;

int64_t grain_rows(int64_t V) {
  // at least ~32k elements per task so that small-V chunks are not split into tiny pieces
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));
}

void check_chunk(const at::Tensor& z, const at::Tensor& y, const char* what) {
  TORCH_CHECK(z.device().is_cpu() && y.device().is_cpu(), what, ": CPU tensors only");
  TORCH_CHECK(z.scalar_type() == at::kFloat, what, ": the logits chunk must be float32, got ",
              z.scalar_type());
  TORCH_CHECK(z.dim() == 2 && z.is_contiguous(), what, ": the chunk must be a contiguous (m, V) "
              "tensor");
  TORCH_CHECK(y.scalar_type() == at::kLong && y.dim() == 1 && y.size(0) == z.size(0),
              what, ": y must be int64 of shape (m,)");
}

std::tuple<at::Tensor, at::Tensor> chunk_forward(at::Tensor z, const at::Tensor& y_in) {
  check_chunk(z, y_in, "iwsft_native::chunk_forward");
  const at::Tensor y = y_in.contiguous();
  const int64_t m = z.size(0), V = z.size(1);
  at::Tensor logp = at::empty({m}, z.options());
  at::Tensor rowrest = at::empty({m}, z.options());
  float* zp = z.data_ptr<float>();
  const int64_t* yp = y.data_ptr<int64_t>();
  float* lp = logp.data_ptr<float>();
  float* sp = rowrest.data_ptr<float>();
  at::parallel_for(0, m, grain_rows(V), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* row = zp + r * V;
      const int64_t t = yp[r];
      TORCH_CHECK(t >= 0 && t < V, "iwsft_native::chunk_forward: target ", t,
                  " out of range [0, ", V, ")");
      const float zt = row[t];
      // sweep 1: row max (NaN-aware: a NaN anywhere makes the row's result NaN below)
      float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
      for (int64_t j = 0; j < V; ++j) mx = row[j] > mx ? row[j] : mx;
      // sweep 2: e = exp(z - max) in place, and the sum of the entries below the max (those
      // equal to the max are counted instead, each is exactly 1): fp32 vector partial sums
      // over blocks of kBlock entries, blocks added in double (the rounding error of a plain
      // running fp32 sum over V = 152k terms reaches ~1e-5 relative; this stays ~1e-7)
      double total = 0.0;
      int64_t at_max = 0;
      for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
        const int64_t j1 = std::min<int64_t>(V, j0 + kBlock);
        float bs = 0.0f;
        int32_t bc = 0;
#pragma omp simd reduction(+ : bs, bc)
        for (int64_t j = j0; j < j1; ++j) {
          const float zj = row[j];
          const float e = exp_nonpos(zj - mx);
          const bool top = zj == mx;  // false for NaN: a NaN entry's e (NaN) is summed
          row[j] = e;
          bs += top ? 0.0f : e;
          bc += top ? 1 : 0;
        }
        total += bs;
        at_max += bc;
      }
      // one arg-max entry is left out of the sum (it is the 1 in 1 + rest)
      const float rest = static_cast<float>(total + static_cast<double>(at_max - 1));
      const float l = (zt - mx) - std::log1p(rest);
      lp[r] = std::min(l, 0.0f);  // keeps NaN (std::min returns its first argument)
      sp[r] = rest;
    }
  });
  return std::make_tuple(logp, rowrest);
}

at::Tensor softmax_grad_(at::Tensor e, const at::Tensor& y_in, const at::Tensor& logp_in,
                         const at::Tensor& coef_in, const at::Tensor& rest_in) {
  check_chunk(e, y_in, "iwsft_native::softmax_grad_");
  const int64_t m = e.size(0), V = e.size(1);
  auto vec = [m](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && t.dim() == 1 && t.size(0) == m,
                "iwsft_native::softmax_grad_: ", name, " must be a CPU tensor of shape (", m, ",)");
    return t.to(at::kFloat).contiguous();
  };
  const at::Tensor y = y_in.contiguous();
  const at::Tensor logp = vec(logp_in, "logp"), coef = vec(coef_in, "coef"),
                   rest = vec(rest_in, "rest");
  float* ep = e.data_ptr<float>();
  const int64_t* yp = y.data_ptr<int64_t>();
  const float* lp = logp.data_ptr<float>();
  const float* cp = coef.data_ptr<float>();
  const float* sp = rest.data_ptr<float>();
  at::parallel_for(0, m, grain_rows(V), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* row = ep + r * V;
      const float c = cp[r];
      const float k = c / (1.0f + sp[r]);
#pragma omp simd
      for (int64_t j = 0; j < V; ++j) row[j] *= k;
      const int64_t t = yp[r];
      TORCH_CHECK(t >= 0 && t < V, "iwsft_native::softmax_grad_: target ", t,
                  " out of range [0, ", V, ")");
      row[t] = c * std::expm1(lp[r]);
    }
  });
  return e;
}

}  // namespace

TORCH_LIBRARY(iwsft_native, lib) {
  lib.def("chunk_forward(Tensor(a!) z, Tensor y) -> (Tensor, Tensor)");
  lib.def("softmax_grad_(Tensor(a!) e, Tensor y, Tensor logp, Tensor coef, Tensor rest) "
          "-> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(iwsft_native, CPU, lib) {
  lib.impl("chunk_forward", &chunk_forward);
  lib.impl("softmax_grad_", &softmax_grad_);
}

#ifdef IWSFT_PYTHON_MODULE
// Built by setup.py as the importable module iwsft_kernels._C: importing it runs the
// registrations above; the module itself has no attributes.
#include <Python.h>
static struct PyModuleDef iwsft_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&iwsft_c_module); }
#endif
