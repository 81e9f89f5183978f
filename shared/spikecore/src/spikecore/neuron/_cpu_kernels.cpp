// Fused multi-step LIF on the CPU (the equations of neuron/reference.py), built on first use by torch's C++ extension
// loader (see _cpu_cpp.py). One pass over x for the forward, one pass over x / grad_s for the backward.
//
// Layout: x, spikes, grad_s, grad_x are [T, N] contiguous. Two ways to walk it, chosen by T (measured on a
// 2-core AMD EPYC, 2^20 neurons):
// - tiles (forward always, backward for T >= 10): for a tile of contiguous neurons, each step's row is read
//   and written as one contiguous run, with the tile's state in small arrays (L1). Long runs keep the
//   prefetchers and DRAM pages effective when there are many rows (T = 16: 1.5-2x faster than vectors);
// - vectors (backward for T < 10): 32 neurons at a time through the whole time loop with the state in
//   registers. With few rows the runs matter less and the registers save the L1 traffic of the tile
//   arrays, which AVX-512 on Zen 4 is short of (T = 4: ~1.3x faster than tiles; even at T = 8 and 10).
// The backward recomputes H from x (nothing but x is saved) and then walks time in reverse. Every inner
// loop runs over neurons with no branches, so the compiler turns it into SIMD instructions.
//
// Arithmetic is float32 in the reference's operation order (no fast-math): fp32 spikes are bit-identical
// to lif_reference. The backward's rows (every surrogate's derivative, and the gradient row) are written
// with GCC/Clang vector types (vf below), which compile to AVX-512, AVX2 or NEON from the same code: left
// to the auto-vectoriser, the fp32 gradient row and some surrogates stayed scalar without AVX-512's masks
// (an AVX2 build was 4x slower on the backward). The sigmoid surrogate (the default; its exp and division
// were ~40% of the backward's time) also has a hand-written AVX-512 row, used where the CPU has it.
// Surrogate ids follow surrogate.py.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int L = 32;  // neurons per vector: two AVX-512 registers of floats (measured best of 16, 32, 64;
                       // also best for an AVX2 build: 16 was 1.25x slower at T = 4)
constexpr int kMaxBlock = 512;  // neurons per tile, at most (the per-tile arrays live on the stack)
constexpr int64_t kMinTilesT = 10;  // the backward walks tiles from this many steps on, vectors below

// Neurons per tile for T steps: shorter runs won at T <= 8 (128 against 512), longer ones at T = 16.
inline int block_size(int64_t T) { return T <= 8 ? 128 : kMaxBlock; }

template <typename scalar_t>
inline float to_f(scalar_t v) { return static_cast<float>(v); }

// float32 exp (Cephes expf polynomial, about 1 ulp), branch-free so that it vectorises.
inline float exp_poly(float x) {
  x = std::min(std::max(x, -87.f), 88.f);
  const float kf = x * 1.4426950408889634f + 12583039.f;  // 1.5 * 2^23 + 127: rounds x / ln2
  const float nf = kf - 12583039.f;
  const float r = x - nf * 0.693359375f - nf * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * (r * r) + r + 1.f;
  // kf's low mantissa bits hold 127 + n: shifted, they are the bits of 2^n
  return y * std::bit_cast<float>(std::bit_cast<uint32_t>(kf) << 23);
}

// The same in VW lanes with GCC/Clang vector types, which compile to AVX-512, AVX2/AVX or NEON alike: the
// portable vector path of the rows below (the compiler does not always vectorise the scalar loops, and
// never for every surrogate on every ISA).
#if defined(__AVX512F__)
constexpr int VW = 16;
#else
constexpr int VW = 8;  // two NEON registers, one AVX register
#endif
typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));
typedef float vf_u __attribute__((vector_size(VW * 4), aligned(4), may_alias));  // for loads and stores

inline __attribute__((always_inline)) vf splat(float x) { return vf{} + x; }
inline __attribute__((always_inline)) vf vmax(vf a, vf b) { return a > b ? a : b; }
inline __attribute__((always_inline)) vf vmin(vf a, vf b) { return a < b ? a : b; }
inline __attribute__((always_inline)) vf vabs(vf a) { return (vf)((vi)a & 0x7fffffff); }
inline __attribute__((always_inline)) vf vload(const float* p) { return *reinterpret_cast<const vf_u*>(p); }
inline __attribute__((always_inline)) void vstore(float* p, vf v) { *reinterpret_cast<vf_u*>(p) = v; }

inline __attribute__((always_inline)) vf exp_poly(vf x) {  // exp_poly's arithmetic, lane by lane
  x = vmin(vmax(x, splat(-87.f)), splat(88.f));
  const vf kf = x * 1.4426950408889634f + 12583039.f;
  const vf nf = kf - 12583039.f;
  const vf r = x - nf * 0.693359375f - nf * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const vf y = p * (r * r) + r + 1.f;
  return y * (vf)((vi)kf << 23);
}

template <int SID>
inline float surrogate(float z, float a) {
  if constexpr (SID == 0) {  // sigmoid: a s (1 - s) = a e / (1 + e)^2, e = exp(-|a z|): no 1 - s cancellation
    const float e = exp_poly(-std::fabs(a * z));
    const float d = 1.f + e;
    return a * e / (d * d);
  } else if constexpr (SID == 1) {  // atan
    const float w = 1.5707963267948966f * a * z;
    return (0.5f * a) / (1.f + w * w);
  } else if constexpr (SID == 2) {  // piecewise_quadratic
    return std::max(0.f, a - a * a * std::fabs(z));
  } else if constexpr (SID == 3) {  // piecewise_exp
    return (0.5f * a) * exp_poly(-a * std::fabs(z));
  } else if constexpr (SID == 4) {  // soft_sign
    const float d = 1.f / a + std::fabs(z);
    return 1.f / (2.f * a * d * d);
  } else if constexpr (SID == 5) {  // super_spike
    const float d = 1.f + std::fabs(z);
    return a / (d * d);
  } else if constexpr (SID == 6) {  // erf
    const float w = a * z;
    return (a * 0.5641895835477563f) * exp_poly(-(w * w));
  } else {  // rect
    return std::fabs(z) < 0.5f * a ? 1.f / a : 0.f;
  }
}

// surrogate<SID> in VW lanes, the same arithmetic.
template <int SID>
inline __attribute__((always_inline)) vf surrogate(vf z, float a) {
  if constexpr (SID == 0) {
    const vf e = exp_poly(-vabs(z * a));
    const vf d = 1.f + e;
    return a * e / (d * d);
  } else if constexpr (SID == 1) {
    const vf w = (1.5707963267948966f * a) * z;
    return (0.5f * a) / (1.f + w * w);
  } else if constexpr (SID == 2) {
    return vmax(splat(0.f), a - (a * a) * vabs(z));
  } else if constexpr (SID == 3) {
    return (0.5f * a) * exp_poly(-a * vabs(z));
  } else if constexpr (SID == 4) {
    const vf d = 1.f / a + vabs(z);
    return 1.f / ((2.f * a) * d * d);
  } else if constexpr (SID == 5) {
    const vf d = 1.f + vabs(z);
    return a / (d * d);
  } else if constexpr (SID == 6) {
    const vf w = a * z;
    return (a * 0.5641895835477563f) * exp_poly(-(w * w));
  } else {
    return vabs(z) < 0.5f * a ? splat(1.f / a) : splat(0.f);
  }
}

// H from the previous V and x, in the reference's order (exact division: fp32 spikes stay bit-identical).
template <bool DECAY>
inline float charge(float v, float x, float tau, float vr) {
  if constexpr (DECAY) return v + (x - (v - vr)) / tau;
  else return (v - (v - vr) / tau) + x;
}

// V after the step: the reset value if it fired, else H.
template <bool SOFT>
inline float after_spike(float h, float vth, float vr) {
  const bool spike = (h - vth) >= 0.f;
  if constexpr (SOFT) return spike ? h - vth : h;
  else return spike ? vr : h;
}

struct Params {
  int64_t T, N;
  const float* tau_arr;  // per-neuron tau (PLIF) or nullptr for the shared `tau`
  float tau, vth, vr;
  bool soft, decay_input, detach;
  float alpha;
};

// Lanes [j0, j0 + n) of one vector: tau per lane.
inline void load_tau(const Params& p, int64_t j0, int n, float* tau) {
  for (int l = 0; l < n; ++l) tau[l] = p.tau_arr ? p.tau_arr[j0 + l] : p.tau;
}

// One tile: neurons [j0, j0 + n), all T steps.
template <typename scalar_t, bool SOFT, bool DECAY>
void forward_block(const Params& p, const scalar_t* __restrict__ x, const float* __restrict__ v_init,
                   scalar_t* __restrict__ s, float* __restrict__ v_final, float* __restrict__ v_seq, int64_t j0,
                   int n) {
  // Locals, not p's fields: a store through s could otherwise alias them and stop vectorisation.
  const float vth = p.vth, vr = p.vr;
  const int64_t T = p.T, N = p.N;
  alignas(64) float v[kMaxBlock], tau[kMaxBlock], spk[kMaxBlock];
  load_tau(p, j0, n, tau);
  for (int l = 0; l < n; ++l) v[l] = v_init ? v_init[j0 + l] : 0.f;
  for (int64_t t = 0; t < T; ++t) {
    const scalar_t* __restrict__ xr = x + t * N + j0;
    scalar_t* __restrict__ sr = s + t * N + j0;
    if constexpr (std::is_same_v<scalar_t, float>) {
#pragma omp simd
      for (int l = 0; l < n; ++l) {
        const float h = charge<DECAY>(v[l], xr[l], tau[l], vr);
        sr[l] = (h - vth) >= 0.f ? 1.f : 0.f;
        v[l] = after_spike<SOFT>(h, vth, vr);
      }
    } else {  // 16-bit types: the conversions vectorise in a loop of their own
#pragma omp simd
      for (int l = 0; l < n; ++l) {
        const float h = charge<DECAY>(v[l], to_f(xr[l]), tau[l], vr);
        spk[l] = (h - vth) >= 0.f ? 1.f : 0.f;
        v[l] = after_spike<SOFT>(h, vth, vr);
      }
      for (int l = 0; l < n; ++l) sr[l] = scalar_t(spk[l]);
    }
    if (v_seq) {
      for (int l = 0; l < n; ++l) v_seq[t * N + j0 + l] = v[l];
    }
  }
  for (int l = 0; l < n; ++l) v_final[j0 + l] = v[l];
}

#if defined(__AVX512F__)
// sigma'(z) = a s (1 - s), s = sigmoid(a z), for 16 lanes: a e / (1 + e)^2 with e = exp(-|a z|) (the
// derivative is even, and e <= 1 cannot overflow). exp(-y) = 2^(k/16) e^r with k = round(-16 y / ln 2):
// 2^(j/16) from a 16-entry table (one permute; the table holds its bits minus j << 19 so that adding
// k << 19 also puts floor(k/16) into the exponent), e^r by a cubic (|r| <= ln2/32, error 1e-8), the
// reciprocal by rcp14 and one Newton step. About 20 instructions against ~26 for the scalar code
// vectorised by the compiler (division included); within a few ulp of float64 (tested).

// Bits of 2^(j/16) (float32, rounded to nearest) minus j << 19, j = 0..15.
alignas(64) constexpr uint32_t kExp2Sixteenths[16] = {
    0x3f800000, 0x3f7daac3, 0x3f7b95c2, 0x3f79c3d3, 0x3f7837f0, 0x3f76f532, 0x3f75fed7, 0x3f75583f,
    0x3f7504f3, 0x3f7508a4, 0x3f75672a, 0x3f76248c, 0x3f7744fd, 0x3f78ccdf, 0x3f7ac0c7, 0x3f7d257d};

inline __attribute__((always_inline)) __m512 sigmoid_grad16(__m512 z, const __m512 table, float a) {
  const __m512 magic = _mm512_set1_ps(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  __m512 y = _mm512_abs_ps(_mm512_mul_ps(z, _mm512_set1_ps(a)));
  y = _mm512_min_ps(y, _mm512_set1_ps(86.f));  // e >= exp(-86): stays normal
  const __m512 kf = _mm512_fmadd_ps(y, _mm512_set1_ps(-23.083120654223414f), magic);  // -16 / ln 2
  const __m512 kn = _mm512_sub_ps(kf, magic);
  // u = y + k ln2/16 = -r, in two parts (Cody-Waite: k * hi is exact).
  __m512 u = _mm512_fmadd_ps(kn, _mm512_set1_ps(0.693359375f / 16.f), y);
  u = _mm512_fmadd_ps(kn, _mm512_set1_ps(-2.12194440e-4f / 16.f), u);
  // e^r = e^-u = 1 - u + u^2/2 - u^3/6
  __m512 q = _mm512_fmadd_ps(u, _mm512_set1_ps(-1.f / 6.f), _mm512_set1_ps(0.5f));
  q = _mm512_fmadd_ps(q, u, _mm512_set1_ps(-1.f));
  q = _mm512_fmadd_ps(q, u, _mm512_set1_ps(1.f));
  const __m512i ki = _mm512_castps_si512(kf);  // low bits: k (two's complement); low 4: j = k mod 16
  const __m512i scale = _mm512_add_epi32(_mm512_castps_si512(_mm512_permutexvar_ps(ki, table)),
                                         _mm512_slli_epi32(ki, 19));
  const __m512 e = _mm512_mul_ps(_mm512_castsi512_ps(scale), q);
  const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.f), e);
  const __m512 d2 = _mm512_mul_ps(d, d);
  __m512 rc = _mm512_rcp14_ps(d2);
  rc = _mm512_mul_ps(rc, _mm512_fnmadd_ps(d2, rc, _mm512_set1_ps(2.f)));
  return _mm512_mul_ps(_mm512_mul_ps(e, _mm512_set1_ps(a)), rc);
}

inline __attribute__((always_inline)) void sigmoid_row_avx512(const float* h, float vth, float a, float* sg,
                                                              int n) {
  const __m512 table = _mm512_castsi512_ps(_mm512_load_si512(kExp2Sixteenths));
  const __m512 th = _mm512_set1_ps(vth);
  int l = 0;
  for (; l + 16 <= n; l += 16) {
    _mm512_storeu_ps(sg + l, sigmoid_grad16(_mm512_sub_ps(_mm512_loadu_ps(h + l), th), table, a));
  }
  if (l < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - l)) - 1);
    const __m512 z = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, h + l), th);
    _mm512_mask_storeu_ps(sg + l, m, sigmoid_grad16(z, table, a));
  }
}
#endif

// sigma'(H - V_th) for the lanes of one step.
template <int SID>
inline __attribute__((always_inline)) void surrogate_row(const float* h, float vth, float a, float* sg, int n) {
  int l = 0;
  for (; l + VW <= n; l += VW) vstore(sg + l, surrogate<SID>(vload(h + l) - vth, a));
  for (; l < n; ++l) sg[l] = surrogate<SID>(h[l] - vth, a);
}

inline __attribute__((always_inline)) void surrogate_row(int sid, const float* h, float vth, float a, float* sg, int n) {
  switch (sid) {
#if defined(__AVX512F__) && !defined(SPIKECORE_PORTABLE_SIGMOID)
    case 0: sigmoid_row_avx512(h, vth, a, sg, n); break;
#else
    case 0: surrogate_row<0>(h, vth, a, sg, n); break;
#endif
    case 1: surrogate_row<1>(h, vth, a, sg, n); break;
    case 2: surrogate_row<2>(h, vth, a, sg, n); break;
    case 3: surrogate_row<3>(h, vth, a, sg, n); break;
    case 4: surrogate_row<4>(h, vth, a, sg, n); break;
    case 5: surrogate_row<5>(h, vth, a, sg, n); break;
    case 6: surrogate_row<6>(h, vth, a, sg, n); break;
    default: surrogate_row<7>(h, vth, a, sg, n); break;
  }
}

// Neurons [j0, j0 + n), n <= W, all T steps in reverse; hs: scratch of T x W floats. W = L (a vector: with
// n == L known at compile time the state arrays live in registers) or kMaxBlock (a tile).
template <typename scalar_t, bool SOFT, bool DECAY, int W>
void backward_block(const Params& p, int sid, const scalar_t* __restrict__ x, const scalar_t* __restrict__ gs,
                    const float* __restrict__ grad_v, const float* __restrict__ v_init, scalar_t* __restrict__ gx,
                    float* __restrict__ gv_out, float* __restrict__ gtau_out, float* __restrict__ hs, int64_t j0,
                    int n) {
  // Locals, not p's fields: a store could otherwise alias them and stop vectorisation.
  const float vth = p.vth, vr = p.vr, alpha = p.alpha;
  const int64_t T = p.T, N = p.N;
  // gH = (gS + gV * (cm * (V_reset - H) + ca)) * sg + gV * keep covers the four reset/detach cases.
  const float cm = (!SOFT && !p.detach) ? 1.f : 0.f;
  const float ca = (SOFT && !p.detach) ? -vth : 0.f;
  alignas(64) float v[W], tau[W], carry[W], decay[W], inv_tdiv[W],
      gtau[W], sg[W], gh[W];
  load_tau(p, j0, n, tau);
  for (int l = 0; l < n; ++l) {
    v[l] = v_init ? v_init[j0 + l] : 0.f;
    carry[l] = grad_v ? grad_v[j0 + l] : 0.f;
    decay[l] = 1.f - 1.f / tau[l];
    inv_tdiv[l] = DECAY ? 1.f / tau[l] : 1.f;
    gtau[l] = 0.f;
  }
  // Recompute H for every step (the forward's arithmetic).
  for (int64_t t = 0; t < T; ++t) {
    const scalar_t* __restrict__ xr = x + t * N + j0;
    float* __restrict__ hr = hs + t * W;
#pragma omp simd
    for (int l = 0; l < n; ++l) {
      const float h = charge<DECAY>(v[l], to_f(xr[l]), tau[l], vr);
      hr[l] = h;
      v[l] = after_spike<SOFT>(h, vth, vr);
    }
  }
  for (int64_t t = T - 1; t >= 0; --t) {
    const float* __restrict__ hr = hs + t * W;
    const scalar_t* __restrict__ gr = gs + t * N + j0;
    scalar_t* __restrict__ gxr = gx + t * N + j0;
    surrogate_row(sid, hr, vth, alpha, sg, n);
    if constexpr (std::is_same_v<scalar_t, float>) {
      // In vector types: GCC leaves this loop scalar (a branch on the spike) without AVX-512's masks.
      int l = 0;
      for (; l + VW <= n; l += VW) {
        const vf gv = vload(carry + l), h = vload(hr + l);
        vf keep = splat(1.f);
        if constexpr (!SOFT) keep = (h - vth) < 0.f ? keep : splat(0.f);
        const vf g = (vload(gr + l) + gv * (cm * (vr - h) + ca)) * vload(sg + l) + gv * keep;
        vstore(carry + l, g * vload(decay + l));
        vstore(gh + l, g);
        vstore(gxr + l, g * vload(inv_tdiv + l));
      }
      for (; l < n; ++l) {
        const float gv = carry[l];
        const float keep = (SOFT || (hr[l] - vth) < 0.f) ? 1.f : 0.f;
        const float g = (gr[l] + gv * (cm * (vr - hr[l]) + ca)) * sg[l] + gv * keep;
        carry[l] = g * decay[l];
        gh[l] = g;
        gxr[l] = g * inv_tdiv[l];
      }
    } else {
#pragma omp simd
      for (int l = 0; l < n; ++l) {
        const float gv = carry[l];
        const float keep = (SOFT || (hr[l] - vth) < 0.f) ? 1.f : 0.f;
        const float g = (to_f(gr[l]) + gv * (cm * (vr - hr[l]) + ca)) * sg[l] + gv * keep;
        carry[l] = g * decay[l];
        gh[l] = g;
      }
      for (int l = 0; l < n; ++l) gxr[l] = scalar_t(gh[l] * inv_tdiv[l]);
    }
    if (gtau_out) {
      // dH/dtau = -(X - (V_prev - V_reset)) / tau^2 (decay_input) or (V_prev - V_reset) / tau^2.
      const scalar_t* xr = x + t * N + j0;
      for (int l = 0; l < n; ++l) {
        const float vp = t > 0 ? after_spike<SOFT>(hs[(t - 1) * W + l], vth, vr)
                               : (v_init ? v_init[j0 + l] : 0.f);
        const float t2 = tau[l] * tau[l];
        const float dh = DECAY ? -(to_f(xr[l]) - (vp - vr)) / t2 : (vp - vr) / t2;
        gtau[l] += gh[l] * dh;
      }
    }
  }
  for (int l = 0; l < n; ++l) gv_out[j0 + l] = carry[l];
  if (gtau_out) {
    for (int l = 0; l < n; ++l) gtau_out[j0 + l] = gtau[l];
  }
}

// Calls f(std::bool_constant<SOFT>, std::bool_constant<DECAY>) for the runtime flags.
template <typename F>
void dispatch_flags(bool soft, bool decay_input, F&& f) {
  if (soft && decay_input) f(std::true_type{}, std::true_type{});
  else if (soft) f(std::true_type{}, std::false_type{});
  else if (decay_input) f(std::false_type{}, std::true_type{});
  else f(std::false_type{}, std::false_type{});
}

Params make_params(const torch::Tensor& x, const c10::optional<torch::Tensor>& tau_t, double tau, double v_th,
                   double v_reset, bool soft, bool decay_input, bool detach, double alpha) {
  return Params{x.size(0), x.size(1), tau_t ? tau_t->data_ptr<float>() : nullptr, float(tau), float(v_th),
                float(v_reset), soft, decay_input, detach, float(alpha)};
}

// Tiles or vectors per parallel task: at least 8192 neurons, so that small layers stay on one thread.
inline int64_t grain(int block) { return std::max<int64_t>(1, 8192 / block); }

// float32, float16 and bfloat16 only (AT_DISPATCH_FLOATING_TYPES would also build float64, never used).
template <typename F>
void dispatch_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_CHECK(false, "spikecore's CPU LIF takes float32, float16 or bfloat16, got ", dtype);
  }
}

}  // namespace

void lif_fwd(torch::Tensor x, c10::optional<torch::Tensor> v_init, c10::optional<torch::Tensor> tau_t, double tau, double v_th,
             double v_reset, bool soft, bool decay_input, torch::Tensor spikes, torch::Tensor v_final,
             c10::optional<torch::Tensor> v_seq) {
  const Params p = make_params(x, tau_t, tau, v_th, v_reset, soft, decay_input, false, 0.0);
  float* vs = v_seq ? v_seq->data_ptr<float>() : nullptr;
  const float* v0 = v_init ? v_init->data_ptr<float>() : nullptr;  // None: zeros
  float* vf = v_final.data_ptr<float>();
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* sp = spikes.data_ptr<scalar_t>();
    dispatch_flags(soft, decay_input, [&](auto soft_c, auto decay_c) {
      constexpr bool SOFT = decltype(soft_c)::value, DECAY = decltype(decay_c)::value;
      const int block = block_size(p.T);
      at::parallel_for(0, (p.N + block - 1) / block, grain(block), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t j0 = b * block;
          const int n = int(std::min<int64_t>(block, p.N - j0));
          forward_block<scalar_t, SOFT, DECAY>(p, xp, v0, sp, vf, vs, j0, n);
        }
      });
    });
  });
}

void lif_bwd(torch::Tensor grad_s, c10::optional<torch::Tensor> grad_v, torch::Tensor x,
             c10::optional<torch::Tensor> v_init,
             c10::optional<torch::Tensor> tau_t, double tau, double v_th, double v_reset, bool soft,
             bool decay_input, bool detach, int64_t surrogate_id, double alpha, torch::Tensor grad_x,
             torch::Tensor grad_v_init, c10::optional<torch::Tensor> grad_tau) {
  TORCH_CHECK(surrogate_id >= 0 && surrogate_id < 8, "unknown surrogate id ", surrogate_id);
  const Params p = make_params(x, tau_t, tau, v_th, v_reset, soft, decay_input, detach, alpha);
  const int sid = int(surrogate_id);
  float* gtau = grad_tau ? grad_tau->data_ptr<float>() : nullptr;
  const float* gv = grad_v ? grad_v->data_ptr<float>() : nullptr;  // None: zeros
  const float* v0 = v_init ? v_init->data_ptr<float>() : nullptr;
  float* gvo = grad_v_init.data_ptr<float>();
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = grad_s.data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    dispatch_flags(soft, decay_input, [&](auto soft_c, auto decay_c) {
      constexpr bool SOFT = decltype(soft_c)::value, DECAY = decltype(decay_c)::value;
      if (p.T >= kMinTilesT) {
        const int block = block_size(p.T);
        at::parallel_for(0, (p.N + block - 1) / block, grain(block), [&](int64_t b0, int64_t b1) {
          std::vector<float> hs(p.T * kMaxBlock);  // H of one tile for every step, in L1/L2
          for (int64_t b = b0; b < b1; ++b) {
            const int64_t j0 = b * block;
            const int n = int(std::min<int64_t>(block, p.N - j0));
            backward_block<scalar_t, SOFT, DECAY, kMaxBlock>(p, sid, xp, gp, gv, v0, gxp, gvo, gtau, hs.data(), j0, n);
          }
        });
        return;
      }
      at::parallel_for(0, (p.N + L - 1) / L, grain(L), [&](int64_t b0, int64_t b1) {
        std::vector<float> hs(p.T * L);  // H of one vector for every step: T * 128 bytes, in L1
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t j0 = b * L;
          const int n = int(std::min<int64_t>(L, p.N - j0));
          if (n == L) {
            backward_block<scalar_t, SOFT, DECAY, L>(p, sid, xp, gp, gv, v0, gxp, gvo, gtau, hs.data(), j0, L);
          } else {
            backward_block<scalar_t, SOFT, DECAY, L>(p, sid, xp, gp, gv, v0, gxp, gvo, gtau, hs.data(), j0, n);
          }
        }
      });
    });
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lif_fwd", &lif_fwd, "fused multi-step LIF forward (CPU)");
  m.def("lif_bwd", &lif_bwd, "fused multi-step LIF backward (CPU)");
}
