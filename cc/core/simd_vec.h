// Fixed-width float vectors (GCC/Clang vector extensions) for the translation
// unit's target: the CPU kernels are compiled once per target (baseline,
// AVX2+FMA+F16C, AVX-512) with FX_LANES set accordingly, and picked at run time.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "core/half_types.h"

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#ifndef FX_LANES
#define FX_LANES 4
#endif
#ifndef FX_TARGET_NS
#define FX_TARGET_NS baseline
#endif

namespace fused_xent {
namespace simd {
namespace FX_TARGET_NS {

constexpr int kLanes = FX_LANES;
typedef float vfloat __attribute__((vector_size(4 * FX_LANES)));
typedef int32_t vint __attribute__((vector_size(4 * FX_LANES)));
typedef uint32_t vuint __attribute__((vector_size(4 * FX_LANES)));
typedef uint16_t vhalf_bits __attribute__((vector_size(2 * FX_LANES)));

#define FX_ALWAYS_INLINE inline __attribute__((always_inline))

FX_ALWAYS_INLINE vfloat splat(float x) { return vfloat{} + x; }

FX_ALWAYS_INLINE vfloat select(vint mask, vfloat a, vfloat b) {
  return reinterpret_cast<vfloat>((mask & reinterpret_cast<vint>(a)) | (~mask & reinterpret_cast<vint>(b)));
}

// --- loads and stores, converting 16-bit types to and from float -------------
FX_ALWAYS_INLINE vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
FX_ALWAYS_INLINE void store(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }

#if FX_LANES == 16 && defined(__AVX512F__)
// 16 bfloat16 as floats. The masked forms, as GCC 12 warns of the plain ones'
// undefined sources once inlined.
FX_ALWAYS_INLINE vfloat widen_bfloat16(__m256i bits) {
  return reinterpret_cast<vfloat>(
      _mm512_maskz_slli_epi32(0xffff, _mm512_maskz_cvtepu16_epi32(0xffff, bits), 16));
}
#endif

FX_ALWAYS_INLINE vfloat load(const bfloat16_t* p) {
#if FX_LANES == 16 && defined(__AVX512F__)
  // Spelled out: GCC 12 widens the generic 16 lanes in two halves.
  return widen_bfloat16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif FX_LANES == 8 && defined(__AVX2__)
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return reinterpret_cast<vfloat>(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
#else
  vhalf_bits bits;
  std::memcpy(&bits, p, sizeof bits);
  return reinterpret_cast<vfloat>(__builtin_convertvector(bits, vuint) << 16);
#endif
}

// The low 16 bits of each lane (all lanes are below 2^16).
FX_ALWAYS_INLINE vhalf_bits narrow_to_16_bits(vuint u) {
#if FX_LANES == 8 && defined(__AVX2__)
  const __m256i x = reinterpret_cast<__m256i>(u);
  return reinterpret_cast<vhalf_bits>(
      _mm_packus_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1)));
#else
  return __builtin_convertvector(u, vhalf_bits);
#endif
}

// The float's bits rounded to nearest even at bit 16: the bfloat16 is the top half.
FX_ALWAYS_INLINE vuint round_to_bfloat16_top(vuint u) { return u + 0x7fffu + ((u >> 16) & 1u); }

// float -> bfloat16 bits in the low half of each lane, rounding to nearest
// even; NaN stays a NaN (its quiet bit set, so cutting the low bits cannot
// turn it into infinity).
FX_ALWAYS_INLINE vuint bfloat16_bits_in_lanes(vfloat v) {
  const vuint u = reinterpret_cast<vuint>(v);
  const vuint quieted = u | 0x400000u;
  const vint is_nan = v != v;
  return reinterpret_cast<vuint>(select(is_nan, reinterpret_cast<vfloat>(quieted),
                                        reinterpret_cast<vfloat>(round_to_bfloat16_top(u)))) >>
         16;
}
FX_ALWAYS_INLINE vhalf_bits to_bits(vfloat v, const bfloat16_t*) {
  return narrow_to_16_bits(bfloat16_bits_in_lanes(v));
}
// The same for values whose NaNs are narrow: their low 16 bits clear, as in
// NaNs that come from bfloat16 values or from invalid operations (the default
// NaN). Rounding cannot carry out of such a NaN's low half: no NaN test needed.
FX_ALWAYS_INLINE vuint bfloat16_bits_in_lanes_narrow_nans(vfloat v) {
  return round_to_bfloat16_top(reinterpret_cast<vuint>(v)) >> 16;
}

FX_ALWAYS_INLINE vfloat load(const float16_t* p) {
#if FX_LANES == 16 && defined(__AVX512F__)
  // The masked form: GCC 12 warns of the plain one's undefined source once inlined.
  return reinterpret_cast<vfloat>(
      _mm512_maskz_cvtph_ps(0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#elif FX_LANES == 8 && defined(__F16C__)
  return reinterpret_cast<vfloat>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  vfloat v;
  for (int i = 0; i < kLanes; ++i) v[i] = to_float(p[i]);
  return v;
#endif
}
// float -> float16 bits, rounding to nearest even.
FX_ALWAYS_INLINE vhalf_bits to_bits(vfloat v, const float16_t*) {
#if FX_LANES == 16 && defined(__AVX512F__)
  return reinterpret_cast<vhalf_bits>(
      _mm512_cvtps_ph(reinterpret_cast<__m512>(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif FX_LANES == 8 && defined(__F16C__)
  return reinterpret_cast<vhalf_bits>(
      _mm256_cvtps_ph(reinterpret_cast<__m256>(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  vhalf_bits bits;
  for (int i = 0; i < kLanes; ++i) bits[i] = to_float16(v[i]).bits;
  return bits;
#endif
}

template <typename Half> FX_ALWAYS_INLINE void store(Half* p, vfloat v) {
  const vhalf_bits bits = to_bits(v, p);
  std::memcpy(p, &bits, sizeof bits);
}

// Non-temporal store of a whole vector to an address aligned to its size:
// the gradient of a tensor larger than the caches is not read back soon, and
// skipping the read-for-ownership saves a third of the backward's traffic.
constexpr bool kHaveStreamingStores =
#if defined(__SSE2__)
    true;
#else
    false;
#endif
FX_ALWAYS_INLINE void store_stream(float* p, vfloat v) {
#if FX_LANES == 16 && defined(__AVX512F__)
  _mm512_stream_ps(p, reinterpret_cast<__m512>(v));
#elif FX_LANES == 8 && defined(__AVX__)
  _mm256_stream_ps(p, reinterpret_cast<__m256>(v));
#elif FX_LANES == 4 && defined(__SSE2__)
  _mm_stream_ps(p, reinterpret_cast<__m128>(v));
#else
  store(p, v);
#endif
}
template <typename Half> FX_ALWAYS_INLINE void store_stream(Half* p, vfloat v) {
  const vhalf_bits bits = to_bits(v, p);
#if FX_LANES == 16 && defined(__AVX__)
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<__m256i>(bits));
#elif FX_LANES == 8 && defined(__SSE2__)
  _mm_stream_si128(reinterpret_cast<__m128i*>(p), reinterpret_cast<__m128i>(bits));
#elif FX_LANES == 4 && defined(__SSE2__)
  long long word;
  std::memcpy(&word, &bits, sizeof word);
  _mm_stream_si64(reinterpret_cast<long long*>(p), word);
#else
  std::memcpy(p, &bits, sizeof bits);
#endif
}
// --- bfloat16, two vectors at a time ----------------------------------------------
// With AVX2 or AVX-512BW, 2 * kLanes bfloat16 become two float vectors by one
// unpack each (the 16 bits land in the top half of each lane) and go back by
// one pack, where one vector at a time takes a widening load and a shift, and
// a shift and a narrowing (two micro-ops, or an extract and a pack). The
// unpack splits every group of 8 elements (a 128-bit lane) 4/4 between the two
// vectors; the pack undoes exactly that, and pair_slot says where element e
// went. Element-wise code need not care; other targets keep the order. The
// stores take vectors whose NaNs are narrow (see above).
#if (FX_LANES == 8 && defined(__AVX2__)) || (FX_LANES == 16 && defined(__AVX512BW__))
constexpr bool kPairsReorder = true;
#else
constexpr bool kPairsReorder = false;
#endif

FX_ALWAYS_INLINE void load_pair(const bfloat16_t* p, vfloat* first, vfloat* second) {
#if FX_LANES == 16 && defined(__AVX512BW__)
  const __m512i bits = _mm512_loadu_si512(p);
  *first = reinterpret_cast<vfloat>(_mm512_unpacklo_epi16(_mm512_setzero_si512(), bits));
  *second = reinterpret_cast<vfloat>(_mm512_unpackhi_epi16(_mm512_setzero_si512(), bits));
#elif FX_LANES == 8 && defined(__AVX2__)
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  *first = reinterpret_cast<vfloat>(_mm256_unpacklo_epi16(_mm256_setzero_si256(), bits));
  *second = reinterpret_cast<vfloat>(_mm256_unpackhi_epi16(_mm256_setzero_si256(), bits));
#else
  *first = load(p);
  *second = load(p + kLanes);
#endif
}

// Where element e (0 <= e < 2 * kLanes) of a pair is: vector e' / kLanes, lane e' % kLanes.
FX_ALWAYS_INLINE int pair_slot(int e) {
  if (!kPairsReorder) return e;
  const int group = e / 8, within = e % 8;
  return (within / 4) * kLanes + group * 4 + within % 4;
}

#if FX_LANES == 16 && defined(__AVX512BW__)
FX_ALWAYS_INLINE __m512i pack_pair(vfloat first, vfloat second) {
  return _mm512_packus_epi32(reinterpret_cast<__m512i>(bfloat16_bits_in_lanes_narrow_nans(first)),
                             reinterpret_cast<__m512i>(bfloat16_bits_in_lanes_narrow_nans(second)));
}
#elif FX_LANES == 8 && defined(__AVX2__)
FX_ALWAYS_INLINE __m256i pack_pair(vfloat first, vfloat second) {
  return _mm256_packus_epi32(reinterpret_cast<__m256i>(bfloat16_bits_in_lanes_narrow_nans(first)),
                             reinterpret_cast<__m256i>(bfloat16_bits_in_lanes_narrow_nans(second)));
}
#endif

// Stores a pair as 2 * kLanes bfloat16; with kStream, streaming, to p aligned
// to 2 * kLanes elements.
template <bool kStream> FX_ALWAYS_INLINE void store_pair(bfloat16_t* p, vfloat first, vfloat second) {
#if FX_LANES == 16 && defined(__AVX512BW__)
  const __m512i bits = pack_pair(first, second);
  if (kStream) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(p), bits);
  } else {
    _mm512_storeu_si512(p, bits);
  }
#elif FX_LANES == 8 && defined(__AVX2__)
  const __m256i bits = pack_pair(first, second);
  if (kStream) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), bits);
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bits);
  }
#else
  if (kStream) {
    store_stream(p, first);
    store_stream(p + kLanes, second);
  } else {
    store(p, first);
    store(p + kLanes, second);
  }
#endif
}

// x[index[i] % kLanes] in lane i. GCC's generic shuffle does not exist in
// Clang, whose __builtin_shufflevector takes constant indices only.
#if defined(__GNUC__) && !defined(__clang__)
FX_ALWAYS_INLINE vfloat permute(vfloat x, vint index) { return __builtin_shuffle(x, index); }
FX_ALWAYS_INLINE vint permute(vint x, vint index) { return __builtin_shuffle(x, index); }
#else
FX_ALWAYS_INLINE vfloat permute(vfloat x, vint index) {
#if FX_LANES == 16 && defined(__AVX512F__)
  return reinterpret_cast<vfloat>(
      _mm512_permutexvar_ps(reinterpret_cast<__m512i>(index), reinterpret_cast<__m512>(x)));
#elif FX_LANES == 8 && defined(__AVX2__)
  return reinterpret_cast<vfloat>(
      _mm256_permutevar8x32_ps(reinterpret_cast<__m256>(x), reinterpret_cast<__m256i>(index)));
#else
  vfloat r;
  for (int i = 0; i < kLanes; ++i) r[i] = x[index[i] & (kLanes - 1)];
  return r;
#endif
}
FX_ALWAYS_INLINE vint permute(vint x, vint index) {
  return reinterpret_cast<vint>(permute(reinterpret_cast<vfloat>(x), index));
}
#endif

// Orders streaming stores before anything the caller does next.
FX_ALWAYS_INLINE void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// 0, 1, ..., kLanes - 1.
template <int... I> FX_ALWAYS_INLINE vint lane_numbers(std::integer_sequence<int, I...>) {
  return vint{I...};
}
FX_ALWAYS_INLINE vint lane_numbers() { return lane_numbers(std::make_integer_sequence<int, kLanes>()); }

// v with lane `lane` set to x. A compare and a blend: v[lane] = x with a
// variable lane goes through memory, and the next read of v waits for it.
FX_ALWAYS_INLINE vfloat with_lane(vfloat v, int64_t lane, float x) {
  return select(lane_numbers() == static_cast<int32_t>(lane), splat(x), v);
}

// The first n < kLanes elements, the rest set to `pad`. Masked loads and
// stores where the target has them: a copy through the stack would make the
// next full-width read wait for the narrower writes.
#if FX_LANES == 16 && defined(__AVX512BW__)
FX_ALWAYS_INLINE __mmask16 first_lanes(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }
FX_ALWAYS_INLINE vfloat load_partial(const float* p, int64_t n, float pad) {
  return reinterpret_cast<vfloat>(_mm512_mask_loadu_ps(_mm512_set1_ps(pad), first_lanes(n), p));
}
FX_ALWAYS_INLINE void store_partial(float* p, int64_t n, vfloat v) {
  _mm512_mask_storeu_ps(p, first_lanes(n), reinterpret_cast<__m512>(v));
}
template <typename Half> FX_ALWAYS_INLINE vfloat load_partial(const Half* p, int64_t n, float pad) {
  const __m256i bits = _mm512_castsi512_si256(_mm512_maskz_loadu_epi16(first_lanes(n), p));
  vfloat v;
  if constexpr (std::is_same<Half, bfloat16_t>::value) {
    v = widen_bfloat16(bits);
  } else {
    v = reinterpret_cast<vfloat>(_mm512_maskz_cvtph_ps(0xffff, bits));
  }
  return select(lane_numbers() < static_cast<int32_t>(n), v, splat(pad));
}
template <typename Half> FX_ALWAYS_INLINE void store_partial(Half* p, int64_t n, vfloat v) {
  const vhalf_bits bits = to_bits(v, p);
  _mm512_mask_storeu_epi16(p, first_lanes(n), _mm512_zextsi256_si512(reinterpret_cast<__m256i>(bits)));
}
#else
#if FX_LANES == 8 && defined(__AVX2__)
FX_ALWAYS_INLINE vfloat load_partial(const float* p, int64_t n, float pad) {
  const vint in = lane_numbers() < static_cast<int32_t>(n);
  const vfloat v = reinterpret_cast<vfloat>(_mm256_maskload_ps(p, reinterpret_cast<__m256i>(in)));
  return select(in, v, splat(pad));
}
FX_ALWAYS_INLINE void store_partial(float* p, int64_t n, vfloat v) {
  const vint in = lane_numbers() < static_cast<int32_t>(n);
  _mm256_maskstore_ps(p, reinterpret_cast<__m256i>(in), reinterpret_cast<__m256>(v));
}
#endif
template <typename T> FX_ALWAYS_INLINE vfloat load_partial(const T* p, int64_t n, float pad) {
  T tmp[kLanes];
  std::memcpy(tmp, p, n * sizeof(T));
  vfloat v = load(tmp);
  for (int i = static_cast<int>(n); i < kLanes; ++i) v[i] = pad;
  return v;
}
template <typename T> FX_ALWAYS_INLINE void store_partial(T* p, int64_t n, vfloat v) {
  T tmp[kLanes];
  store(tmp, v);
  std::memcpy(p, tmp, n * sizeof(T));
}
#endif

// --- math ------------------------------------------------------------------------
// max(lo, x) lane-wise, returning x where x is NaN: one instruction on x86
// (maxps returns its second operand when either is NaN).
FX_ALWAYS_INLINE vfloat max_or_nan(vfloat lo, vfloat x) {
#if FX_LANES == 16 && defined(__AVX512F__)
  return reinterpret_cast<vfloat>(_mm512_max_ps(reinterpret_cast<__m512>(lo), reinterpret_cast<__m512>(x)));
#elif FX_LANES == 8 && defined(__AVX__)
  return reinterpret_cast<vfloat>(_mm256_max_ps(reinterpret_cast<__m256>(lo), reinterpret_cast<__m256>(x)));
#elif FX_LANES == 4 && defined(__SSE2__)
  return reinterpret_cast<vfloat>(_mm_max_ps(reinterpret_cast<__m128>(lo), reinterpret_cast<__m128>(x)));
#else
  return select(x < lo, lo, x);
#endif
}

// exp(x) for x in [-88, 88.3], before any handling of the range's ends:
// x = n ln2 + r with |r| <= ln(2)/2 (Cody-Waite, ln 2 in two parts), then
// exp(r) = 1 + r + r^2 q(r) with q of degree 3 fitted for relative error
// (1.1e-7 in exact arithmetic, 2.1e-7 measured in float), times
// 2^n. Adding 1.5 * 2^23 + 127 rounds x / ln 2 to n and leaves n + 127, the
// biased exponent of 2^n, in the low bits: one shift makes 2^n. At x = -88,
// n = -127 sets the exponent field to 0: the result flushes to 0.
FX_ALWAYS_INLINE vfloat exp_in_range(vfloat x) {
  const float shift = 12582912.0f + 127.0f;
  const vfloat shifted = x * 1.44269504088896341f + shift;
  const vfloat n = shifted - shift;
  vfloat r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  const vfloat r2 = r * r;  // Estrin's scheme: a shorter dependency chain than Horner's
  const vfloat p =
      r2 * (r2 * (r * 8.31251219e-3f + 4.18900885e-2f) + (r * 1.66671142e-1f + 4.99992311e-1f)) + (r + 1.0f);
  return p * reinterpret_cast<vfloat>(reinterpret_cast<vint>(shifted) << 23);
}

// 1 / x for positive normal x to about an ulp: the hardware estimate (14 bits on AVX-512,
// 12 on AVX) and one Newton step, cheaper than a division; elsewhere a division.
FX_ALWAYS_INLINE vfloat reciprocal(vfloat x) {
#if FX_LANES == 16 && defined(__AVX512F__)
  const vfloat y = reinterpret_cast<vfloat>(_mm512_rcp14_ps(reinterpret_cast<__m512>(x)));
#elif FX_LANES == 8 && defined(__AVX__)
  const vfloat y = reinterpret_cast<vfloat>(_mm256_rcp_ps(reinterpret_cast<__m256>(x)));
#else
  return 1.0f / x;
#endif
#if (FX_LANES == 16 && defined(__AVX512F__)) || (FX_LANES == 8 && defined(__AVX__))
  return y * (2.0f - x * y);
#endif
}

// exp(x) and 1 - exp(x) for x <= 0 (the softcap's e = exp(-2|z| / cap)): exp_in_range's
// reduction and polynomial without its leading 1, s = exp(r) - 1, so that where n = 0
// (|x| <= ln(2) / 2) 1 - exp(x) = -s keeps its relative accuracy; below, 1 - 2^n >= 1/2
// and nothing cancels. 0 and 1 below -88; NaN stays NaN.
struct ExpAndComplement {
  vfloat exp;
  vfloat one_minus_exp;
};
FX_ALWAYS_INLINE ExpAndComplement exp_and_complement(vfloat x) {
  x = max_or_nan(splat(-88.0f), x);
  const float shift = 12582912.0f + 127.0f;
  const vfloat shifted = x * 1.44269504088896341f + shift;
  const vfloat n = shifted - shift;
  vfloat r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  const vfloat r2 = r * r;
  const vfloat s =
      r2 * (r2 * (r * 8.31251219e-3f + 4.18900885e-2f) + (r * 1.66671142e-1f + 4.99992311e-1f)) + r;
  const vfloat scale = reinterpret_cast<vfloat>(reinterpret_cast<vint>(shifted) << 23);
  return ExpAndComplement{scale + scale * s, (1.0f - scale) - scale * s};
}

// exp(x) to about 2 ulp: 0 below -88, +inf above 88.72, NaN for NaN.
FX_ALWAYS_INLINE vfloat exp(vfloat x) {
  const vfloat clamped = select(x > 88.3f, splat(88.3f), select(x < -88.0f, splat(-88.0f), x));
  vfloat result = exp_in_range(clamped);
  result = select(x > 88.72f, splat(__builtin_inff()), result);
  return select(x != x, x, result);
}

// exp(x) for the kernels' arguments, which are at most a few units above 0
// (z - max, z - lse, z - a running max): no upper clamp (the result is wrong
// above 88.3, which callers rule out), and NaN propagates through the arithmetic.
FX_ALWAYS_INLINE vfloat exp_bounded(vfloat x) { return exp_in_range(max_or_nan(splat(-88.0f), x)); }

// Lane-wise max whose NaN handling is unspecified: callers detect NaN elsewhere.
FX_ALWAYS_INLINE vfloat max_fast(vfloat a, vfloat b) { return max_or_nan(a, b); }

// log(x) for positive normal x (the kernels take it of a sum of exponentials,
// which is >= 1): x = 2^e m with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(u),
// u = (m - 1) / (m + 1), |u| <= 0.172, by its odd series to u^9. NaN stays NaN.
FX_ALWAYS_INLINE vfloat log_positive(vfloat x) {
  const vint bits = reinterpret_cast<vint>(x);
  vint e = ((bits >> 23) & 0xff) - 127;
  vfloat m = reinterpret_cast<vfloat>((bits & 0x7fffff) | 0x3f800000);
  const vint big = m > 1.41421356f;
  m = select(big, m * 0.5f, m);
  e -= big;  // big is -1 where true
  const vfloat u = (m - 1.0f) / (m + 1.0f);
  const vfloat u2 = u * u;
  vfloat series = splat(1.0f / 9);
  series = series * u2 + 1.0f / 7;
  series = series * u2 + 1.0f / 5;
  series = series * u2 + 1.0f / 3;
  series = series * u2 + 1.0f;
  const vfloat ef = __builtin_convertvector(e, vfloat);
  const vfloat result = ef * 0.693359375f + ((2.0f * u) * series - ef * 2.12194440e-4f);
  return select(x != x, x, result);
}

// log(1 + x) for x >= 0 (a row's exponentials beyond its max's own 1): the log
// of y = 1 + x, corrected by the part of x that rounding y lost, so a tiny x
// keeps its relative accuracy. NaN stays NaN.
FX_ALWAYS_INLINE vfloat log1p_positive(vfloat x) {
  const vfloat y = 1.0f + x;
  return log_positive(y) + (x - (y - 1.0f)) / y;
}

// exp(x) - 1 for |x| <= 0.75 (the kernels use it where p = exp(x) > 1/2): its
// Taylor series to x^9 (truncation below 2e-8 relative), so a tiny x keeps
// its relative accuracy.
FX_ALWAYS_INLINE vfloat expm1_near_zero(vfloat x) {
  vfloat s = splat(1.0f / 362880);
  s = s * x + 1.0f / 40320;
  s = s * x + 1.0f / 5040;
  s = s * x + 1.0f / 720;
  s = s * x + 1.0f / 120;
  s = s * x + 1.0f / 24;
  s = s * x + 1.0f / 6;
  s = s * x + 0.5f;
  s = s * x + 1.0f;
  return s * x;
}

FX_ALWAYS_INLINE bool any_lane(vint mask) {
#if FX_LANES == 16 && defined(__AVX512F__)
  const __m512i m = reinterpret_cast<__m512i>(mask);
  return _mm512_test_epi32_mask(m, m) != 0;
#elif FX_LANES == 8 && defined(__AVX__)
  return _mm256_movemask_ps(reinterpret_cast<__m256>(mask)) != 0;
#elif FX_LANES == 4 && defined(__SSE2__)
  return _mm_movemask_ps(reinterpret_cast<__m128>(mask)) != 0;
#else
  int32_t any = 0;
  for (int i = 0; i < kLanes; ++i) any |= mask[i];
  return any != 0;
#endif
}

// Lane-wise max that keeps NaN once seen.
FX_ALWAYS_INLINE vfloat nan_sticky_max(vfloat running, vfloat x) {
  return select((x > running) | (x != x), x, running);
}

FX_ALWAYS_INLINE float reduce_add(vfloat v) {
  float sum = 0.0f;
  for (int i = 0; i < kLanes; ++i) sum += v[i];
  return sum;
}

FX_ALWAYS_INLINE float reduce_nan_sticky_max(vfloat v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = (v[i] > m || v[i] != v[i]) ? v[i] : m;
  return m;
}

}  // namespace FX_TARGET_NS
}  // namespace simd
}  // namespace fused_xent
