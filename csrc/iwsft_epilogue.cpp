// Native CPU epilogue of the chunked iw-SFT loss (docs/design.md §3-§4, §9; docs/native.md).
//
// Two ops on one fp32 chunk of RAW logits r = h W^T + b (m, V), registered as
//   torch.ops.iwsft_native.chunk_forward(Tensor(a!) r, Tensor y, float scale, float? softcap,
//       float temperature, bool want_entropy)
//       -> (logp, lse, top1, rest, mz, entropy)          all (m,); entropy is (0,) if not asked
//   torch.ops.iwsft_native.softmax_grad_(Tensor(a!) buf, Tensor y, Tensor logp, Tensor coef,
//       Tensor? zcoef, Tensor rest, Tensor mz, float scale, float? softcap, float temperature)
//       -> Tensor(a!) G_r (in buf's memory)
// used by NativeTorchOps (iwsft_kernels/backends/native_cpu.py); they are the twins of
// TorchOps.chunk_forward / TorchOps.softmax_grad (iwsft_kernels/backends/torch_ops.py).
//
// The logit transform (iwsft_kernels/config.py LogitTransform) is applied on the fly, per
// entry, from the raw r: z = s*r; with a cap c: z = c*tanh(z/c); z = z/tau. Three code paths,
// chosen per call (templates; the identity path is the same loop as before transforms):
//   identity   z = r
//   linear     z = f*r, f = s/tau > 0: z - max z = f*(r - max r) (one rounding of the
//              difference, no fp32 max of z in it)
//   cap        z = C*tanh(x), x = s*r/c, C = c/tau, from ONE exp per entry: u = exp(-2|x|),
//              q = 1/(1+u), C*tanh|x| = C*(1-u)*q (u > 1/2) or C - 2C*u*q (u <= 1/2, one
//              rounding of the result), and in the gradient dz/dr = (s/tau)*sech^2(x),
//              sech^2(x) = 4*u*q^2 (never 1 - tanh^2, which is 0 in fp32 for |x| > ~9 while
//              the true value is ~4 exp(-2|x|), kept to fp32 relative accuracy down to
//              exp(-2|x|) ~ 1e-38, i.e. |x| ~ 43).
// All transforms are strictly increasing, so the row's arg-max entries are those of the raw r
// (found by a raw max sweep) and m = max z = z(max r). With a cap, m and t = z_y are computed
// in double (two tanh per row) and m is carried as fp32 mh + ml, so d_j = (z_j - mh) - ml has
// no shared fp32 error of the max (which would shift every d of a row alike: a systematic
// relative error of ~|m| x a few ulp in rest, hence in logp of peaked rows).
//
// chunk_forward, per row: sweep 1 reads the raw max; sweep 2 computes d_j = z_j - m and
//   e_j = exp(d_j), and sums e without one arg-max entry: rest = (sum of e over entries below
//   the raw max) + (number of entries at the raw max) - 1, so the full sum is 1 + rest and
//   1 + rest is never rounded. Then, with t = z_y:
//     logp = (t - m) - log1p(rest) clamped to <= 0 (exact to fp32 relative rounding as
//            p_y -> 1; log(sum) would quantise logp to multiples of 2^-24),
//     lse = m + log1p(rest),  top1 = (t == m) (fp32 z: saturated capped entries tie),
//     entropy = log1p(rest) - S1/(1 + rest) clamped to >= 0, S1 = sum_j e_j d_j (only when
//            want_entropy; the S1 reduction is compiled out otherwise).
//   The state for softmax_grad_ lives in the chunk itself (no second (m, V) buffer):
//     identity / linear: r <- e (in place), as before transforms;
//     cap: r <- u_j = exp(-2|x_j|) with the sign of r_j (-0.0 for a saturated negative
//       entry). Why u and not e, or the raw r: sech^2 cannot be had exactly from e or z (it
//       would be 1 - tanh^2 again, and z saturates at |x| >~ 9); keeping raw r (the other
//       exact option) makes softmax_grad_ redo the exp of u, while from the stored u it gets
//       z (hence e, one exp), and sech^2 = 4uq^2 with the very u, tanh and e of the forward
//       sweep (bitwise). Measured: the capped epilogue costs ~3.1x the identity one this way,
//       ~3.7x when recomputing from raw r (bench/bench_native_transforms.py).
// softmax_grad_, per row, with coef c, zcoef zc (0 when None), K = (c + zc)/(1 + rest):
//     G_z[j] = K * e_j off target; G_z[y] = c*expm1(logp) + zc*exp(logp) (the target entry
//     p_y - 1 is never formed by cancellation), and G_r = G_z * dz/dr, written into the chunk:
//     identity / linear: e <- (K*f) * e, then the target; cap: u_j <- (K*s/tau)*e_j*sech^2_j.
//   With zcoef None and identity the loop is the pre-transform one (one multiply per entry).
//
// Accuracy: everything is fp32 with the row sums accumulated in fp32 blocks of kBlock entries
// added in double. e_j carries ~|z_j - m| 2^-24 relative (its fp32 argument), sech^2 ~|2x|
// 2^-24; logp, lse and entropy are exact to that level also for peaked rows (1 - p_y down to
// 1e-12: relative errors <= ~2.5e-6 measured against a float64 oracle, tests/test_native.py).
// NaN in a row propagates to that row's outputs; -inf raw logits give e = 0
// (identity/linear) or z = -C (cap).
//
// Dtypes: the chunk is always fp32 (the chunk driver builds 16-bit logits into an fp32
// chunk), so bf16/fp16 inputs go through the same code. No temporaries beyond the chunk: the
// only allocations are the (m,) outputs of chunk_forward.
//
// Rows run in parallel with at::parallel_for (each row's result is independent of the thread
// count). The inner loops are written so that gcc vectorises them (-O3, -fno-trapping-math,
// OpenMP simd; the loader adds -mavx2 -mfma where the CPU has them): exp is a Cephes-style
// polynomial (max error ~2 ulp on [-87, 0]), tanh and sech^2 are branch-free from it.
//
// Built either on first use by iwsft_kernels/backends/native_cpu.py (a plain shared library
// loaded with torch.ops.load_library) or, with IWSFT_PYTHON_MODULE defined, as the Python
// extension module iwsft_kernels._C by setup.py (IWSFT_BUILD_NATIVE=1).

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


constexpr int kIdentity = 0, kLinear = 1, kCap = 2;

// The transform's fp32 constants (from the double parameters of the op).
struct Xf {
  int kind;
  float f;   // linear: s/tau (z = f*r); cap: s/tau (dz/dr = f*sech^2)
  float k2;  // cap: -2*s/c   (u = exp(k2*|r|) = exp(-2|x|))
  float C;   // cap: c/tau    (z = C*tanh(x))
};

Xf make_xf(double scale, c10::optional<double> softcap, double temperature, const char* what) {
  TORCH_CHECK(std::isfinite(scale) && scale > 0 && std::isfinite(temperature) &&
                  temperature > 0,
              what, ": scale and temperature must be finite and > 0, got ", scale, ", ",
              temperature);
  Xf x{kIdentity, 1.0f, 0.0f, 0.0f};
  x.f = static_cast<float>(scale / temperature);
  if (softcap.has_value()) {
    const double c = *softcap;
    TORCH_CHECK(std::isfinite(c) && c > 0, what, ": softcap must be finite and > 0, got ", c);
    x.kind = kCap;
    x.k2 = static_cast<float>(-2.0 * scale / c);
    x.C = static_cast<float>(c / temperature);
  } else if (scale != 1.0 || temperature != 1.0) {
    x.kind = kLinear;
  }
  return x;
}

// Capped z, from u = exp(-2|x|) (x = s r / c = -k2/2 * r): q = 1/(1+u) and
// C tanh|x| = C (1-u) q = C - 2C u q: the first form near x = 0 (u > 1/2), the second beyond,
// where its error is ~1 rounding of the result instead of ~4 (it rounds only the small
// correction 2C u q): both within ~1e-7 C of the truth. Branch-free.
inline float cap_u(float r, float k2) {
  const float a = r < 0.0f ? -r : r;  // |r| (NaN stays NaN)
  return exp_nonpos(k2 * a);          // r = +-inf: k2*inf = -inf -> 0
}

inline float cap_abs_z(float u, float C, float& q) {
  q = 1.0f / (1.0f + u);
  return u > 0.5f ? (C * (1.0f - u)) * q : C - ((2.0f * C) * u) * q;
}

// The sign bit of a float (also of -0.0: a saturated negative entry stores u = -0.0).
inline bool sign_bit(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof(b));
  return (b >> 31) != 0;
}

// The same z in double (per-row scalars only): x = -k2/2 * |r| as in cap_z, C * tanh(x).
inline double cap_z_double(float r, const Xf& xf) {
  const double a = std::fabs(static_cast<double>(r));
  const double zt = static_cast<double>(xf.C) * std::tanh(-0.5 * static_cast<double>(xf.k2) * a);
  return r < 0.0f ? -zt : zt;
}

// One row of chunk_forward. K: the transform path; ENT: also the S1 reduction (entropy).
template <int K, bool ENT>
inline void forward_row(float* row, int64_t V, int64_t t, const Xf& xf, float* logp,
                        float* lse, bool* top1, float* rest_out, double* mz, float* ent) {
  // sweep 1: raw row max (NaN-aware: a NaN anywhere makes the row's result NaN below)
  float rmax = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : rmax)
  for (int64_t j = 0; j < V; ++j) rmax = row[j] > rmax ? row[j] : rmax;
  const float rt = row[t];
  float m, tm, ml = 0.0f;  // m = max z (+ ml: the rounding of m, cap only); tm = t - m
  bool is_top;
  if constexpr (K == kIdentity) {
    m = rmax;
    tm = rt - rmax;
    is_top = rt == rmax;
  } else if constexpr (K == kLinear) {
    m = xf.f * rmax;
    tm = xf.f * (rt - rmax);
    is_top = rt == rmax;
  } else {
    // the row's max and target logit in double from the same fp32 constants (one tanh each
    // per row): m = mh + ml exactly to ~1e-16, so the per-entry d = (z - mh) - ml carries no
    // shared error of the max (an fp32 m would shift every d of the row alike: a systematic
    // relative error ~|m| 2^-24 x a few ulp of tanh in rest, hence in logp of peaked rows)
    const double md = cap_z_double(rmax, xf), td = cap_z_double(rt, xf);
    m = static_cast<float>(md);
    ml = static_cast<float>(md - static_cast<double>(m));
    tm = static_cast<float>(td - md);
    is_top = static_cast<float>(td) == m;  // z_y == m in fp32 (saturated entries tie, as z
                                           // itself does in fp32)
  }
  const float f = xf.f, k2 = xf.k2, C = xf.C;
  // sweep 2: d = z - m, e = exp(d) (in place unless capped), the sum of the entries below the
  // raw max (those at it are counted instead; each is exactly 1): fp32 vector partial sums
  // over blocks of kBlock entries, blocks added in double (a plain running fp32 sum over
  // V = 152k terms reaches ~1e-5 relative; this stays ~1e-7). Same for S1.
  double total = 0.0, s1 = 0.0;
  int64_t at_max = 0;
  for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
    const int64_t j1 = std::min<int64_t>(V, j0 + kBlock);
    float bs = 0.0f, b1 = 0.0f;
    int32_t bc = 0;
#pragma omp simd reduction(+ : bs, bc, b1)
    for (int64_t j = j0; j < j1; ++j) {
      const float rj = row[j];
      float d;
      if constexpr (K == kIdentity) {
        d = rj - rmax;
      } else if constexpr (K == kLinear) {
        d = f * (rj - rmax);
      } else {
        float q;
        const float u = cap_u(rj, k2);
        const float za = cap_abs_z(u, C, q);
        d = ((rj < 0.0f ? -za : za) - m) - ml;
        row[j] = rj < 0.0f ? -u : u;  // the state: u signed like r (-0.0 when saturated)
      }
      const float e = exp_nonpos(d);
      const bool top = rj == rmax;  // false for NaN: a NaN entry's e (NaN) is summed
      if constexpr (K != kCap) row[j] = e;
      bs += top ? 0.0f : e;
      bc += top ? 1 : 0;
      if constexpr (ENT) b1 += (e > 0.0f && !top) ? e * d : 0.0f;  // (e = 0 at d = -inf)
    }
    total += bs;
    at_max += bc;
    if constexpr (ENT) s1 += b1;
  }
  // one arg-max entry is left out of the sum (it is the 1 in 1 + rest)
  const float rest = static_cast<float>(total + static_cast<double>(at_max - 1));
  const float l1p = std::log1p(rest);
  *logp = std::min(tm - l1p, 0.0f);  // keeps NaN (std::min returns its first argument)
  *lse = m + l1p;
  *top1 = is_top;
  *rest_out = rest;
  *mz = static_cast<double>(m) + static_cast<double>(ml);
  if constexpr (ENT) {
    const float h = l1p - static_cast<float>(s1) / (1.0f + rest);
    *ent = std::max(h, 0.0f);  // keeps NaN
  }
}

template <int K, bool ENT>
void forward_rows(float* zp, const int64_t* yp, int64_t V, const Xf& xf, int64_t r0, int64_t r1,
                  float* lp, float* lsep, bool* tp, float* sp, double* mp, float* hp) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t t = yp[r];
    TORCH_CHECK(t >= 0 && t < V, "iwsft_native::chunk_forward: target ", t,
                " out of range [0, ", V, ")");
    forward_row<K, ENT>(zp + r * V, V, t, xf, lp + r, lsep + r, tp + r, sp + r, mp + r,
                        ENT ? hp + r : nullptr);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
chunk_forward(at::Tensor z, const at::Tensor& y_in, double scale, c10::optional<double> softcap,
              double temperature, bool want_entropy) {
  check_chunk(z, y_in, "iwsft_native::chunk_forward");
  const Xf xf = make_xf(scale, softcap, temperature, "iwsft_native::chunk_forward");
  const at::Tensor y = y_in.contiguous();
  const int64_t m = z.size(0), V = z.size(1);
  TORCH_CHECK(V > 0 || m == 0, "iwsft_native::chunk_forward: empty vocabulary");
  at::Tensor logp = at::empty({m}, z.options());
  at::Tensor lse = at::empty({m}, z.options());
  at::Tensor top1 = at::empty({m}, z.options().dtype(at::kBool));
  at::Tensor rowrest = at::empty({m}, z.options());
  at::Tensor mz = at::empty({m}, z.options().dtype(at::kDouble));
  at::Tensor ent = at::empty({want_entropy ? m : 0}, z.options());
  float* zp = z.data_ptr<float>();
  const int64_t* yp = y.data_ptr<int64_t>();
  float* lp = logp.data_ptr<float>();
  float* lsep = lse.data_ptr<float>();
  bool* tp = top1.data_ptr<bool>();
  float* sp = rowrest.data_ptr<float>();
  double* mp = mz.data_ptr<double>();
  float* hp = want_entropy ? ent.data_ptr<float>() : nullptr;
  at::parallel_for(0, m, grain_rows(V), [&](int64_t r0, int64_t r1) {
#define IWSFT_FWD(K)                                                          \
  (want_entropy ? forward_rows<K, true>(zp, yp, V, xf, r0, r1, lp, lsep, tp, sp, mp, hp) \
                : forward_rows<K, false>(zp, yp, V, xf, r0, r1, lp, lsep, tp, sp, mp, hp))
    if (xf.kind == kIdentity) {
      IWSFT_FWD(kIdentity);
    } else if (xf.kind == kLinear) {
      IWSFT_FWD(kLinear);
    } else {
      IWSFT_FWD(kCap);
    }
#undef IWSFT_FWD
  });
  return std::make_tuple(logp, lse, top1, rowrest, mz, ent);
}

at::Tensor softmax_grad_(at::Tensor e, const at::Tensor& y_in, const at::Tensor& logp_in,
                         const at::Tensor& coef_in, const c10::optional<at::Tensor>& zcoef_in,
                         const at::Tensor& rest_in, const at::Tensor& mz_in, double scale,
                         c10::optional<double> softcap, double temperature) {
  check_chunk(e, y_in, "iwsft_native::softmax_grad_");
  const Xf xf = make_xf(scale, softcap, temperature, "iwsft_native::softmax_grad_");
  const int64_t m = e.size(0), V = e.size(1);
  auto vec = [m](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && t.dim() == 1 && t.size(0) == m,
                "iwsft_native::softmax_grad_: ", name, " must be a CPU tensor of shape (", m, ",)");
    return t.to(at::kFloat).contiguous();
  };
  const at::Tensor y = y_in.contiguous();
  const at::Tensor logp = vec(logp_in, "logp"), coef = vec(coef_in, "coef"),
                   rest = vec(rest_in, "rest");
  const bool has_z = zcoef_in.has_value() && zcoef_in->defined();
  const at::Tensor zcoef = has_z ? vec(*zcoef_in, "zcoef") : at::Tensor();
  at::Tensor mz;
  if (xf.kind == kCap) {
    TORCH_CHECK(mz_in.device().is_cpu() && mz_in.dim() == 1 && mz_in.size(0) == m,
                "iwsft_native::softmax_grad_: mz must be a CPU tensor of shape (", m, ",)");
    mz = mz_in.to(at::kDouble).contiguous();
  }
  float* ep = e.data_ptr<float>();
  const int64_t* yp = y.data_ptr<int64_t>();
  const float* lp = logp.data_ptr<float>();
  const float* cp = coef.data_ptr<float>();
  const float* zp = has_z ? zcoef.data_ptr<float>() : nullptr;
  const float* sp = rest.data_ptr<float>();
  const double* mp = xf.kind == kCap ? mz.data_ptr<double>() : nullptr;
  at::parallel_for(0, m, grain_rows(V), [&](int64_t r0, int64_t r1) {
    // copies local to the task: the compiler then knows the stores to the chunk do not
    // change them (it reloads a by-reference capture every iteration)
    const float f = xf.f, C = xf.C;
    for (int64_t r = r0; r < r1; ++r) {
      float* row = ep + r * V;
      const int64_t t = yp[r];
      TORCH_CHECK(t >= 0 && t < V, "iwsft_native::softmax_grad_: target ", t,
                  " out of range [0, ", V, ")");
      const float c = cp[r];
      // G_z at the target: coef*(p_y - 1) + zcoef*p_y, from the exact logp
      float gt = c * std::expm1(lp[r]);
      float k;  // G_z off target = k * e
      if (has_z) {
        const float zc = zp[r];
        gt += zc * std::exp(lp[r]);
        k = (c + zc) / (1.0f + sp[r]);
      } else {
        k = c / (1.0f + sp[r]);
      }
      if (xf.kind != kCap) {  // buf holds e: G_r = f * G_z (f = 1 exactly for identity)
        if (xf.kind == kLinear) k *= f, gt *= f;
#pragma omp simd
        for (int64_t j = 0; j < V; ++j) row[j] *= k;
        row[t] = gt;
      } else {  // buf holds the signed u of each entry: z, e and sech^2 from it
        const float mh = static_cast<float>(mp[r]);
        const float ml = static_cast<float>(mp[r] - static_cast<double>(mh));
        const float kf = k * f;
        float qt;
        const float ut = std::fabs(row[t]);
        cap_abs_z(ut, C, qt);
        const float s2t = (4.0f * ut) * (qt * qt);  // sech^2 at the target
#pragma omp simd
        for (int64_t j = 0; j < V; ++j) {
          const float sj = row[j];
          const float u = sj < 0.0f ? -sj : sj;
          float q;
          const float za = cap_abs_z(u, C, q);
          const float ej = exp_nonpos(((sign_bit(sj) ? -za : za) - mh) - ml);
          row[j] = (kf * ej) * ((4.0f * u) * (q * q));
        }
        row[t] = (gt * f) * s2t;
      }
    }
  });
  return e;
}

}  // namespace

TORCH_LIBRARY(iwsft_native, lib) {
  lib.def("chunk_forward(Tensor(a!) r, Tensor y, float scale, float? softcap, float temperature, "
          "bool want_entropy) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  lib.def("softmax_grad_(Tensor(a!) buf, Tensor y, Tensor logp, Tensor coef, Tensor? zcoef, "
          "Tensor rest, Tensor mz, float scale, float? softcap, float temperature) "
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
