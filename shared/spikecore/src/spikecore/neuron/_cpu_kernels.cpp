// Fused multi-step LIF on the CPU (the equations of neuron/reference.py), built on first use by torch's C++ extension
// loader (see _cpu_cpp.py). One pass over x for the forward, one pass over x / grad_s for the backward.
//
// Layout: x, spikes, grad_s, grad_x are [T, N] contiguous. Both passes walk tiles: for a tile of contiguous
// neurons, each step's row is read and written as one contiguous run, with the tile's state in small arrays
// (L1). Long runs keep the prefetchers and DRAM pages effective; a tile's lanes are independent, so the
// out-of-order core overlaps the time-step chains of many vectors (the backward, a long chain per step, ran
// 1.2x slower walking 32 lanes at a time through all T steps on an AVX-512 build, 1.9x with 16 lanes on an
// AVX2 build; one thread, data in L2, T = 4, measured on a 2-core AMD EPYC).
// The backward recomputes H from x (nothing but x is saved) and then walks time in reverse, in one loop
// per step: each lane's surrogate derivative is computed where its gradient is, in registers. Every inner
// loop runs over neurons with no data-dependent branches.
//
// Arithmetic is float32 in the reference's operation order (no fast-math): fp32 spikes are bit-identical
// to lif_reference. Every row (the forward's, the backward's recompute, every surrogate's derivative, the
// gradient row, and the fp16/bf16 loads and stores) is written with GCC/Clang vector types (vf below),
// which compile to AVX-512, AVX2, SSE or NEON from the same code: left to the auto-vectoriser, the fp32
// gradient row, some surrogates and every 16-bit conversion stayed scalar without AVX-512's masks (an AVX2
// build was 4x slower on the backward, fp16 30x slower than fp32 everywhere). Intrinsics appear only as
// measured extras with a portable fallback beside them: F16C conversions, 16-bit loads and stores on x86,
// min / max, rcp + Newton, FMA in the sigmoid.
// Surrogate ids follow surrogate.py.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__AVX__) || defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace {

constexpr int kMaxBlock = 512;  // neurons per tile, at most (the per-tile arrays live on the stack)

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
#elif defined(__AVX__)
constexpr int VW = 8;
#else
constexpr int VW = 4;  // one NEON or SSE register (GCC splits wider generic vectors badly there: 10x slower)
#endif
typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));
typedef float vf_u __attribute__((vector_size(VW * 4), aligned(4), may_alias));  // for loads and stores

inline __attribute__((always_inline)) vf splat(float x) { return vf{} + x; }
// max / min: GCC keeps `a < b ? a : b` on vector types as a compare and a blend (3 uops on Intel for AVX2),
// so on x86 the min / max instructions, which compute exactly that (the second operand when unordered).
#if defined(__AVX512F__)
inline __attribute__((always_inline)) vf vmax(vf a, vf b) { return (vf)_mm512_max_ps((__m512)a, (__m512)b); }
inline __attribute__((always_inline)) vf vmin(vf a, vf b) { return (vf)_mm512_min_ps((__m512)a, (__m512)b); }
#elif defined(__AVX__)
inline __attribute__((always_inline)) vf vmax(vf a, vf b) { return (vf)_mm256_max_ps((__m256)a, (__m256)b); }
inline __attribute__((always_inline)) vf vmin(vf a, vf b) { return (vf)_mm256_min_ps((__m256)a, (__m256)b); }
#else
inline __attribute__((always_inline)) vf vmax(vf a, vf b) { return a > b ? a : b; }
inline __attribute__((always_inline)) vf vmin(vf a, vf b) { return a < b ? a : b; }
#endif
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

// Rows of x, spikes, grad s and grad x in their own dtype, VW lanes at a time, as float32. bfloat16 is the
// top half of a float32 (stores round to nearest even, NaN stays NaN, as c10::BFloat16 does); float16 goes
// through F16C where the CPU has it (every AVX2 CPU does) and otherwise through exact integer conversions
// (normals, subnormals, inf, NaN; round to nearest even), the code a NEON build runs. c10's scalar
// conversions, which the compiler left scalar, made the 16-bit rows 5-20x slower than float32 ones.
typedef uint32_t vu __attribute__((vector_size(VW * 4)));
typedef uint16_t vh __attribute__((vector_size(VW * 2)));
typedef uint16_t vh_u __attribute__((vector_size(VW * 2), aligned(2), may_alias));

inline __attribute__((always_inline)) vu splat_u(uint32_t x) { return vu{} + x; }
// 16-bit lanes <-> 32-bit lanes. GCC splits the generic conversion into halves on x86 (5 instructions for
// one AVX-512 load, a mask and a 256-bit pack for an AVX2 store), so there the zero-extending load and the
// narrowing store are spelled out; bits holds values below 2^16.
inline __attribute__((always_inline)) vu load_bits16(const void* p) {
#if defined(__AVX512F__)
  return (vu)_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__AVX2__)
  return (vu)_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  return __builtin_convertvector(*reinterpret_cast<const vh_u*>(p), vu);
#endif
}
inline __attribute__((always_inline)) void store_bits16(void* p, vu bits) {
#if defined(__AVX512F__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16((__m512i)bits));
#elif defined(__AVX2__)
  const __m256i b = (__m256i)bits;
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
#else
  *reinterpret_cast<vh_u*>(p) = __builtin_convertvector(bits, vh);
#endif
}

// float16 bits (zero-extended) -> float32, exact.
inline __attribute__((always_inline)) vf half_bits_to_float(vu h) {
  const vu sign = (h & 0x8000u) << 16;
  vu o = (h & 0x7fffu) << 13;  // exponent and mantissa in float32 position
  const vu e = o & 0x0f800000u;
  o += (127u - 15u) << 23;  // rebias the exponent
  o = (vi)e == 0x0f800000 ? o + ((128u - 16u) << 23) : o;  // inf / NaN: exponent all ones
  const vf sub = (vf)(o + (1u << 23)) - 6.103515625e-05f;  // zero / subnormal: renormalise (2^-14)
  o = (vi)e == 0 ? (vu)sub : o;
  return (vf)(o | sign);
}

// float32 -> float16 bits, round to nearest even (overflow to inf, NaN to a quiet NaN).
inline __attribute__((always_inline)) vu float_to_half_bits(vf f) {
  vu x = (vu)f;
  const vu sign = x & 0x80000000u;
  x ^= sign;
  const vi xi = (vi)x;  // non-negative now: signed compares are exact
  const vu big = xi > 0x7f800000 ? splat_u(0x7e00u) : splat_u(0x7c00u);
  // Subnormal results: adding 0.5f lets the FPU round the mantissa into place.
  const vu sub = (vu)((vf)x + 0.5f) - (126u << 23);
  const vu odd = (x >> 13) & 1u;
  const vu normal = (x + ((15u - 127u) << 23) + 0xfffu + odd) >> 13;
  const vu o = xi >= int32_t(143u << 23) ? big : (xi < int32_t(113u << 23) ? sub : normal);
  return o | (sign >> 16);
}

inline __attribute__((always_inline)) vf load_row(const float* p) { return vload(p); }
inline __attribute__((always_inline)) void store_row(float* p, vf v) { vstore(p, v); }
inline __attribute__((always_inline)) vf load_row(const at::BFloat16* p) { return (vf)(load_bits16(p) << 16); }
inline __attribute__((always_inline)) void store_row(at::BFloat16* p, vf v) {
  const vu u = (vu)v;
  const vu rounded = u + 0x7fffu + ((u >> 16) & 1u);  // round to nearest even: the top 16 bits
#if defined(__AVX512F__)
  store_bits16(p, v != v ? splat_u(0x7fc0u) : rounded >> 16);  // one masked shift
#else
  // A NaN lane set to all ones stays a NaN (0xffff) whatever the rounding carried into: an OR, not a blend.
  const vu bits = rounded | (vu)(v != v);
#if defined(__AVX2__)
  // The top halves by one byte shuffle and one lane permute, no shift and no pack (AVX2 bf16 backward: 10%).
  const __m256i top = _mm256_shuffle_epi8(
      (__m256i)bits, _mm256_setr_epi8(2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1, 2, 3, 6, 7,
                                      10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(_mm256_permute4x64_epi64(top, 0x08)));
#else
  store_bits16(p, bits >> 16);
#endif
#endif
}
inline __attribute__((always_inline)) vf load_row(const at::Half* p) {
#if defined(__F16C__) && defined(__AVX512F__) && !defined(SPIKECORE_PORTABLE_F16)
  return (vf)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__F16C__) && !defined(SPIKECORE_PORTABLE_F16)
  return (vf)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  return half_bits_to_float(load_bits16(p));
#endif
}
inline __attribute__((always_inline)) void store_row(at::Half* p, vf v) {
#if defined(__F16C__) && defined(__AVX512F__) && !defined(SPIKECORE_PORTABLE_F16)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT));
#elif defined(__F16C__) && !defined(SPIKECORE_PORTABLE_F16)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT));
#else
  store_bits16(p, float_to_half_bits(v));
#endif
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
// V is float or vf: the same expression, one lane or VW.
template <bool DECAY, typename V>
inline __attribute__((always_inline)) V charge(V v, V x, V tau, float vr) {
  if constexpr (DECAY) return v + (x - (v - vr)) / tau;
  else return (v - (v - vr) / tau) + x;
}

// The same for a shared tau that is a power of two, by its reciprocal: x / tau and x * (1 / tau) are then the
// same real number (1 / tau is exact), so the same float, and a multiply takes the divider off the row (AMD
// Zen 3, AVX2, in cache: forward 7-9% faster; no change on an Intel Xeon).
// The product is kept out of the compiler's reach: GCC contracts a * b + c into an FMA by default, which
// rounds a product in the subnormal range differently from the division. Only where the register constraint
// is known (x86, arm64); elsewhere the rows keep the division.
#if defined(__x86_64__) || defined(__aarch64__)
constexpr bool kPow2Multiply = true;
inline __attribute__((always_inline)) vf unfused(vf a) {
#if defined(__x86_64__)
  __asm__("" : "+x"(a));
#else
  __asm__("" : "+w"(a));
#endif
  return a;
}
#else
constexpr bool kPow2Multiply = false;
inline __attribute__((always_inline)) vf unfused(vf a) { return a; }
#endif
template <bool DECAY>
inline __attribute__((always_inline)) vf charge_pow2(vf v, vf x, float inv_tau, float vr) {
  if constexpr (DECAY) return v + unfused((x - (v - vr)) * inv_tau);
  else return (v - unfused((v - vr) * inv_tau)) + x;
}

// V after the step: the reset value if it fired, else H.
template <bool SOFT>
inline float after_spike(float h, float vth, float vr) {
  const bool spike = (h - vth) >= 0.f;
  if constexpr (SOFT) return spike ? h - vth : h;
  else return spike ? vr : h;
}

template <bool SOFT>
inline __attribute__((always_inline)) vf after_spike(vf h, float vth, float vr) {
  if constexpr (SOFT) return (h - vth) >= 0.f ? h - vth : h;
  else return (h - vth) >= 0.f ? splat(vr) : h;
}

inline __attribute__((always_inline)) vf spike_of(vf h, float vth) {
  return (h - vth) >= 0.f ? splat(1.f) : splat(0.f);
}

// A row of spikes (1 where H - V_th >= 0, else 0) in the output dtype: the bits of 1 in a 16-bit type
// directly, with no float conversion (the bf16 forward ran 1.5x faster on an AVX2 build, 1.3x on AVX-512).
inline __attribute__((always_inline)) void store_spikes(float* p, vf h, float vth) { vstore(p, spike_of(h, vth)); }
inline __attribute__((always_inline)) void store_spikes(at::BFloat16* p, vf h, float vth) {
  store_bits16(p, (vu)((vi)((h - vth) >= 0.f) & 0x3f80));
}
inline __attribute__((always_inline)) void store_spikes(at::Half* p, vf h, float vth) {
  store_bits16(p, (vu)((vi)((h - vth) >= 0.f) & 0x3c00));
}

struct Params {
  int64_t T, N;
  const float* tau_arr;  // per-neuron tau (PLIF) or nullptr for the shared `tau`
  float tau, vth, vr;
  bool soft, decay_input, detach;
  float alpha;
  bool tau_pow2;  // no tau_arr, and tau a power of two with a normal reciprocal: charge_pow2 is exact
};

inline bool exact_reciprocal(float tau) {
  int e;
  return kPow2Multiply && tau > 0.f && std::isfinite(tau) && std::frexp(tau, &e) == 0.5f &&
         std::isnormal(1.f / tau);
}

// Calls use(l, H) for each vector of a row's lanes [l, l + VW), H by charge_pow2 or by charge.
template <bool DECAY, typename scalar_t, typename F>
inline __attribute__((always_inline)) void charge_rows(const Params& p, const float* v, const scalar_t* xr,
                                                       const float* tau, int n, F&& use) {
  const float vr = p.vr, inv_tau = 1.f / p.tau;
  int l = 0;
  if (p.tau_pow2) {
    for (; l + VW <= n; l += VW) use(l, charge_pow2<DECAY>(vload(v + l), load_row(xr + l), inv_tau, vr));
  } else {
    for (; l + VW <= n; l += VW) use(l, charge<DECAY>(vload(v + l), load_row(xr + l), vload(tau + l), vr));
  }
}

// The membrane before the first step, and the gradient after the last, where the caller passes none.
alignas(64) constexpr float kZeroRow[kMaxBlock] = {};

// Lanes [j0, j0 + n): tau, the leak's 1 - 1 / tau and H's derivative in X (1 / tau with decay_input, else
// 1). Per tile for a per-neuron tau; once per thread for a shared one (the rows are then constants: a tile's
// setup was ~15% of the T = 4 backward).
template <bool DECAY>
inline void fill_lanes(const Params& p, int64_t j0, int n, float* tau, float* decay, float* inv_tdiv) {
  for (int l = 0; l < n; ++l) {
    const float t = p.tau_arr ? p.tau_arr[j0 + l] : p.tau;
    tau[l] = t;
    decay[l] = 1.f - 1.f / t;
    inv_tdiv[l] = DECAY ? 1.f / t : 1.f;
  }
}

// One tile: neurons [j0, j0 + n), all T steps.
template <typename scalar_t, bool SOFT, bool DECAY>
void forward_block(const Params& p, const scalar_t* __restrict__ x, const float* __restrict__ v_init,
                   scalar_t* __restrict__ s, float* __restrict__ v_final, float* __restrict__ v_seq,
                   const float* __restrict__ tau, int64_t j0, int n) {
  // Locals, not p's fields: a store through s could otherwise alias them and stop vectorisation.
  const float vth = p.vth, vr = p.vr;
  const int64_t T = p.T, N = p.N;
  alignas(64) float v[kMaxBlock];
  for (int64_t t = 0; t < T; ++t) {
    const scalar_t* __restrict__ xr = x + t * N + j0;
    scalar_t* __restrict__ sr = s + t * N + j0;
    // The first step reads v_init (or zeros) and the last writes v_final, in place: no copies per tile.
    const float* vin = t > 0 ? v : v_init ? v_init + j0 : kZeroRow;
    float* vout = t == T - 1 ? v_final + j0 : v;
    charge_rows<DECAY>(p, vin, xr, tau, n, [&](int l, vf h) __attribute__((always_inline)) {
      store_spikes(sr + l, h, vth);
      vstore(vout + l, after_spike<SOFT>(h, vth, vr));
    });
    for (int l = n / VW * VW; l < n; ++l) {
      const float h = charge<DECAY>(vin[l], to_f(xr[l]), tau[l], vr);
      sr[l] = scalar_t((h - vth) >= 0.f ? 1.f : 0.f);
      vout[l] = after_spike<SOFT>(h, vth, vr);
    }
    if (v_seq) {
      for (int l = 0; l < n; ++l) v_seq[t * N + j0 + l] = vout[l];
    }
  }
}

// sigma'(z) = a s (1 - s), s = sigmoid(a z), in VW lanes: a e / (1 + e)^2 with e = exp(-|a z|) (the
// derivative is even, and e <= 1 cannot overflow). The default surrogate, and its exp and division were ~40%
// of the backward's time, so a cheaper exp than exp_poly: exp(-y) = 2^(k/VW) e^r, k = round(-VW y / ln 2),
// 2^(j/VW) from a VW-entry table (one variable shuffle: vpermps on AVX2 and AVX-512, tbl on NEON; the table
// holds its bits minus j << (23 - log2 VW), so that adding k << (23 - log2 VW) also puts floor(k / VW) into
// the exponent), e^r by a short polynomial (|r| <= ln2 / (2 VW): for 8 lanes a cubic fitted on that
// interval, relative error 2.6e-8, in Estrin's form, a shorter dependency chain than Horner's; Taylor's
// cubic for 16 lanes, error < 1e-8), and on AVX-512 the reciprocal by rcp and one Newton step instead of a
// division. Within a few ulp of float64 over the whole range (tested). Compilers without a variable vector
// shuffle (Clang) use exp_poly and a division.
#if defined(__GNUC__) && !defined(__clang__) && !defined(SPIKECORE_PORTABLE_SIGMOID)
#define SPIKECORE_TABLE_SIGMOID 1

// Bits of 2^(j/16) (float32, rounded to nearest) minus j << 19, j = 0..15; the even entries are the bits of
// 2^(i/8) minus i << 20, the table of 8 lanes.
alignas(64) constexpr uint32_t kExp2Sixteenths[16] = {
    0x3f800000, 0x3f7daac3, 0x3f7b95c2, 0x3f79c3d3, 0x3f7837f0, 0x3f76f532, 0x3f75fed7, 0x3f75583f,
    0x3f7504f3, 0x3f7508a4, 0x3f75672a, 0x3f76248c, 0x3f7744fd, 0x3f78ccdf, 0x3f7ac0c7, 0x3f7d257d};

constexpr int kLogVW = VW == 16 ? 4 : VW == 8 ? 3 : 2;

template <int... J>
struct Exp2Table {
  alignas(64) static constexpr uint32_t bits[sizeof...(J)] = {kExp2Sixteenths[J * (16 / sizeof...(J))]...};
};
template <int... J>
constexpr Exp2Table<J...> make_table(std::integer_sequence<int, J...>) { return {}; }
using Exp2TableVW = decltype(make_table(std::make_integer_sequence<int, VW>{}));

inline __attribute__((always_inline)) vf exp2_table() {
  return *reinterpret_cast<const vf*>(Exp2TableVW::bits);
}

// a * b + c, fused where the CPU has FMA (the sigmoid only: the forward's arithmetic stays unfused).
inline __attribute__((always_inline)) vf vfma(vf a, vf b, vf c) {
#if defined(__AVX512F__)
  return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__)
  return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}

// n / d for d in [1, 4]. AVX-512: rcp14 and one Newton step (~2 ulp), four uops for the divider's one, chosen
// on an AMD Zen 4, which splits a 512-bit division in two. Elsewhere a division: on an Intel Xeon the AVX2
// build's backward ran 7% faster with it than with rcp and Newton (the AVX-512 build 3%).
inline __attribute__((always_inline)) vf divide(vf n, vf d) {
#if defined(__AVX512F__)
  const vf r = (vf)_mm512_rcp14_ps((__m512)d);
  return n * (r * (2.f - d * r));
#else
  return n / d;
#endif
}

inline __attribute__((always_inline)) vf sigmoid_grad(vf z, float a, vf table) {
  const vf magic = splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf y = vmin(vabs(z * a), splat(86.f));  // e >= exp(-86): stays normal
  const vf kf = vfma(y, splat(float(-VW / 0.6931471805599453)), magic);
  const vf kn = kf - magic;
  // u = y + k ln2 / VW = -r, in two parts (Cody-Waite: k * hi is exact).
  vf u = vfma(kn, splat(0.693359375f / VW), y);
  u = vfma(kn, splat(-2.12194440e-4f / VW), u);
  vf q;  // e^-u
  if constexpr (VW == 8) {  // 1 - u + c2 u^2 + c3 u^3, minimax (relative error) on |u| <= ln2 / 16
    q = vfma(vfma(splat(-0.1666685789823532f), u, splat(0.500064492225647f)), u * u, 1.f - u);
  } else {  // Taylor: 1 - u + u^2/2 - u^3/6 (+ u^4/24 - u^5/120 for 4 lanes)
    if constexpr (VW == 4) q = vfma(vfma(splat(-1.f / 120.f), u, splat(1.f / 24.f)), u, splat(-1.f / 6.f));
    else q = splat(-1.f / 6.f);
    q = vfma(q, u, splat(0.5f));
    q = vfma(q, u, splat(-1.f));
    q = vfma(q, u, splat(1.f));
  }
  const vi ki = (vi)kf;  // low bits: k (two's complement); low log2(VW): j = k mod VW
  const vf scale = (vf)((vu)__builtin_shuffle(table, ki) + ((vu)ki << (23 - kLogVW)));
  const vf e = scale * q;
  const vf d = vfma(scale, q, splat(1.f));  // 1 + e, one rounding
  return divide(e * a, d * d);
}
#endif

// sigma'(z) in VW lanes: the table sigmoid where it is built, surrogate<SID> otherwise.
template <int SID>
inline __attribute__((always_inline)) vf surrogate_vec(vf z, float a) {
#if defined(SPIKECORE_TABLE_SIGMOID)
  if constexpr (SID == 0) return sigmoid_grad(z, a, exp2_table());
#endif
  return surrogate<SID>(z, a);
}

// One tile: neurons [j0, j0 + n), n <= kMaxBlock, all T steps in reverse; hs: scratch of T x kMaxBlock + VW
// floats.
template <typename scalar_t, bool SOFT, bool DECAY, int SID>
void backward_block(const Params& p, const scalar_t* __restrict__ x, const scalar_t* __restrict__ gs,
                    const float* __restrict__ grad_v, const float* __restrict__ v_init, scalar_t* __restrict__ gx,
                    float* __restrict__ gv_out, float* __restrict__ gtau_out, float* __restrict__ hs,
                    const float* __restrict__ shared_lanes, int64_t j0, int n) {
  constexpr int W = kMaxBlock;
  // Locals, not p's fields: a store could otherwise alias them and stop vectorisation.
  const float vth = p.vth, vr = p.vr, alpha = p.alpha;
  const int64_t T = p.T, N = p.N;
  alignas(64) float v[W], carry[W], gtau[W], gh[W], lanes[3][W];
  const float* __restrict__ tau = shared_lanes;
  const float* __restrict__ decay = shared_lanes + W;
  const float* __restrict__ inv_tdiv = shared_lanes + 2 * W;
  if (p.tau_arr) {
    fill_lanes<DECAY>(p, j0, n, lanes[0], lanes[1], lanes[2]);
    tau = lanes[0], decay = lanes[1], inv_tdiv = lanes[2];
  }
  if (gtau_out) std::fill(gtau, gtau + n, 0.f);
  // Recompute H for every step (the forward's arithmetic); the first step reads v_init or zeros in place.
  for (int64_t t = 0; t < T; ++t) {
    const scalar_t* __restrict__ xr = x + t * N + j0;
    float* __restrict__ hr = hs + t * W;
    const float* vin = t > 0 ? v : v_init ? v_init + j0 : kZeroRow;
    charge_rows<DECAY>(p, vin, xr, tau, n, [&](int l, vf h) __attribute__((always_inline)) {
      vstore(hr + l, h);
      vstore(v + l, after_spike<SOFT>(h, vth, vr));
    });
    for (int l = n / VW * VW; l < n; ++l) {
      const float h = charge<DECAY>(vin[l], to_f(xr[l]), tau[l], vr);
      hr[l] = h;
      v[l] = after_spike<SOFT>(h, vth, vr);
    }
  }
  // gH of VW lanes from H, gS and the carried gV: gH = (gS + gV dV/dS) sg + gV dV/dH, where V = H - S V_th
  // (soft reset) or H (1 - S) + S V_reset (hard); dV/dS is -V_th or V_reset - H, and 0 with the reset
  // detached; dV/dH is 1 (soft) or 1 - S (hard).
  auto grad_h = [&](auto detach_c, vf h, vf g_s, vf g_v, vf sg) __attribute__((always_inline)) {
    constexpr bool DETACH = decltype(detach_c)::value;
    const vf z = h - vth;
    vf through_s = g_s;
    if constexpr (!DETACH) through_s = SOFT ? g_s - g_v * vth : g_s + g_v * (vr - h);
    const vf through_h = SOFT ? g_v : (z < 0.f ? g_v : splat(0.f));
    return through_s * sg + through_h;
  };
  // The reverse walk, compiled once per reset-detach choice: with the reset detached the gradient through S
  // is gS alone (5-10% faster backward than one body for both).
  auto reverse = [&](auto detach_c) __attribute__((always_inline)) {
    for (int64_t t = T - 1; t >= 0; --t) {
      const float* __restrict__ hr = hs + t * W;
      const scalar_t* __restrict__ gr = gs + t * N + j0;
      scalar_t* __restrict__ gxr = gx + t * N + j0;
      // The last step reads grad_v (or zeros) in place and the first writes grad v_init (if asked for).
      const float* cin = t < T - 1 ? carry : grad_v ? grad_v + j0 : kZeroRow;
      float* cout = t > 0 || !gv_out ? carry : gv_out + j0;
      int l = 0;
      // Software-pipelined: each iteration computes the next vector's surrogate derivative (a long chain of
      // dependent operations, the sigmoid's above all) while it finishes this one, so that the out-of-order
      // core need not hold a whole chain per vector in flight (AMD Zen 3, AVX2: fp32 backward 3% faster,
      // bf16 7%). hs has VW floats of zeros past its last row for the read ahead of the last vector.
      vf sg = surrogate_vec<SID>(vload(hr) - vth, alpha);
      for (; l + VW <= n; l += VW) {
        const vf sg_next = surrogate_vec<SID>(vload(hr + l + VW) - vth, alpha);
        const vf g = grad_h(detach_c, vload(hr + l), load_row(gr + l), vload(cin + l), sg);
        sg = sg_next;
        vstore(cout + l, g * vload(decay + l));
        if (gtau_out) vstore(gh + l, g);
        store_row(gxr + l, g * vload(inv_tdiv + l));
      }
      if (l < n) {  // the tail through padded vectors: the same arithmetic as every other lane
        alignas(64) float h_pad[VW] = {}, gs_pad[VW] = {}, gv_pad[VW] = {};
        for (int i = 0; i < n - l; ++i) {
          h_pad[i] = hr[l + i];
          gs_pad[i] = to_f(gr[l + i]);
          gv_pad[i] = cin[l + i];
        }
        const vf h = vload(h_pad);
        const vf g = grad_h(detach_c, h, vload(gs_pad), vload(gv_pad), surrogate_vec<SID>(h - vth, alpha));
        for (int i = 0; i < n - l; ++i) {
          cout[l + i] = g[i] * decay[l + i];
          gh[l + i] = g[i];
          gxr[l + i] = scalar_t(g[i] * inv_tdiv[l + i]);
        }
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
  };
  if (p.detach) reverse(std::true_type{});
  else reverse(std::false_type{});
  if (gtau_out) {
    for (int l = 0; l < n; ++l) gtau_out[j0 + l] = gtau[l];
  }
}

// Ask Linux for transparent huge pages (2 MiB) under an output of 32 MiB or more, before the kernel first
// touches it. glibc maps every allocation that large afresh (its mmap threshold stops growing at 32 MiB), and
// the kernel then faults it in 4 KiB at a time: ~1.5 us a page on a VM, 10 ms for the 64 MiB of one T = 16
// output against ~2 ms with huge pages. The advice covers the 2 MiB-aligned interior of our own outputs only
// (the allocator is untouched); it does nothing where THP is off ("never"), and SPIKECORE_CPU_HUGEPAGES=0
// turns it off.
inline void advise_huge_pages(const torch::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const size_t bytes = t.numel() * t.element_size();
  if (bytes < (size_t(32) << 20)) return;
  const char* env = std::getenv("SPIKECORE_CPU_HUGEPAGES");
  if (env && std::strcmp(env, "0") == 0) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(t.data_ptr()) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(t.data_ptr()) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // a hint: errors ignored
#else
  (void)t;
#endif
}

// Calls f(std::integral_constant<int, SID>) for the surrogate id (ids follow surrogate.py).
template <typename F>
void dispatch_surrogate(int sid, F&& f) {
  switch (sid) {
    case 0: f(std::integral_constant<int, 0>{}); break;
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    default: f(std::integral_constant<int, 7>{}); break;
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
  // T >= 1: the first step reads v_init and the last writes v_final (and the reverse for the gradients).
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1, "spikecore's CPU LIF takes x of shape [T, N] with T >= 1");
  return Params{x.size(0), x.size(1), tau_t ? tau_t->data_ptr<float>() : nullptr, float(tau), float(v_th),
                float(v_reset), soft, decay_input, detach, float(alpha),
                !tau_t && exact_reciprocal(float(tau))};
}

// Tiles per parallel task: at least 8192 neurons, so that small layers stay on one thread.
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
  advise_huge_pages(spikes);
  if (v_seq) advise_huge_pages(*v_seq);
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* sp = spikes.data_ptr<scalar_t>();
    dispatch_flags(soft, decay_input, [&](auto soft_c, auto decay_c) {
      constexpr bool SOFT = decltype(soft_c)::value, DECAY = decltype(decay_c)::value;
      const int block = block_size(p.T);
      at::parallel_for(0, (p.N + block - 1) / block, grain(block), [&](int64_t b0, int64_t b1) {
        alignas(64) float shared_tau[kMaxBlock];
        std::fill(shared_tau, shared_tau + kMaxBlock, p.tau);
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t j0 = b * block;
          const int n = int(std::min<int64_t>(block, p.N - j0));
          const float* tau = p.tau_arr ? p.tau_arr + j0 : shared_tau;
          forward_block<scalar_t, SOFT, DECAY>(p, xp, v0, sp, vf, vs, tau, j0, n);
        }
      });
    });
  });
}

void lif_bwd(torch::Tensor grad_s, c10::optional<torch::Tensor> grad_v, torch::Tensor x,
             c10::optional<torch::Tensor> v_init,
             c10::optional<torch::Tensor> tau_t, double tau, double v_th, double v_reset, bool soft,
             bool decay_input, bool detach, int64_t surrogate_id, double alpha, torch::Tensor grad_x,
             c10::optional<torch::Tensor> grad_v_init, c10::optional<torch::Tensor> grad_tau) {
  TORCH_CHECK(surrogate_id >= 0 && surrogate_id < 8, "unknown surrogate id ", surrogate_id);
  const Params p = make_params(x, tau_t, tau, v_th, v_reset, soft, decay_input, detach, alpha);
  const int sid = int(surrogate_id);
  float* gtau = grad_tau ? grad_tau->data_ptr<float>() : nullptr;
  const float* gv = grad_v ? grad_v->data_ptr<float>() : nullptr;  // None: zeros
  const float* v0 = v_init ? v_init->data_ptr<float>() : nullptr;
  float* gvo = grad_v_init ? grad_v_init->data_ptr<float>() : nullptr;
  advise_huge_pages(grad_x);
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = grad_s.data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    dispatch_flags(soft, decay_input, [&](auto soft_c, auto decay_c) {
      constexpr bool SOFT = decltype(soft_c)::value, DECAY = decltype(decay_c)::value;
      dispatch_surrogate(sid, [&](auto sid_c) {
        constexpr int SID = decltype(sid_c)::value;
        const int block = block_size(p.T);
        at::parallel_for(0, (p.N + block - 1) / block, grain(block), [&](int64_t b0, int64_t b1) {
          std::vector<float> hs(p.T * kMaxBlock + VW);  // H of one tile for every step, in L1/L2
          alignas(64) float shared_lanes[3 * kMaxBlock];  // a shared tau's rows (fill_lanes)
          if (!p.tau_arr) {
            fill_lanes<DECAY>(p, 0, kMaxBlock, shared_lanes, shared_lanes + kMaxBlock,
                              shared_lanes + 2 * kMaxBlock);
          }
          for (int64_t b = b0; b < b1; ++b) {
            const int64_t j0 = b * block;
            const int n = int(std::min<int64_t>(block, p.N - j0));
            backward_block<scalar_t, SOFT, DECAY, SID>(p, xp, gp, gv, v0, gxp, gvo, gtau, hs.data(),
                                                       shared_lanes, j0, n);
          }
        });
      });
    });
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lif_fwd", &lif_fwd, "fused multi-step LIF forward (CPU)");
  m.def("lif_bwd", &lif_bwd, "fused multi-step LIF backward (CPU)");
}
