// 16-bit float storage types shared by the CPU core, the CUDA kernels and the
// framework glue. They are plain bit containers with the same layout as
// Eigen::half / Eigen::bfloat16 / __half / __nv_bfloat16, so callers can
// reinterpret their buffers; all arithmetic happens in float.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FX_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FX_HOST_DEVICE inline
#endif

namespace fused_xent {

struct bfloat16_t {
  uint16_t bits;
};
struct float16_t {
  uint16_t bits;
};

// Accumulation type: half types and float accumulate in float, double in double.
template <typename T> struct AccumulatorOf {
  using type = float;
};
template <> struct AccumulatorOf<double> {
  using type = double;
};
template <typename T> using Acc = typename AccumulatorOf<T>::type;

// Functions live in an unnamed namespace: the CPU kernels are compiled once per
// instruction set, and each copy must keep its own (a shared inline copy built
// for AVX2 could otherwise be picked by the linker for the baseline kernels).
namespace {

FX_HOST_DEVICE float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

FX_HOST_DEVICE uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

FX_HOST_DEVICE float to_float(bfloat16_t v) { return bits_to_float(static_cast<uint32_t>(v.bits) << 16); }

// Round to nearest even, keeping NaN a (quiet) NaN.
FX_HOST_DEVICE bfloat16_t to_bfloat16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bfloat16_t{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bfloat16_t{static_cast<uint16_t>(u >> 16)};
}

FX_HOST_DEVICE float to_float(float16_t v) {
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  uint32_t exponent = (v.bits >> 10) & 0x1fu;
  uint32_t mantissa = v.bits & 0x3ffu;
  if (exponent == 0x1fu) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));  // inf, NaN
  if (exponent == 0) {
    if (mantissa == 0) return bits_to_float(sign);
    // Subnormal: value = mantissa * 2^-24, exact in float.
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// Round to nearest even, with overflow to infinity and gradual underflow.
FX_HOST_DEVICE float16_t to_float16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs_bits = u & 0x7fffffffu;
  if (abs_bits >= 0x7f800000u)  // inf or NaN
    return float16_t{static_cast<uint16_t>(sign | 0x7c00u | (abs_bits > 0x7f800000u ? 0x200u : 0u))};
  if (abs_bits >= 0x477ff000u) return float16_t{static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to inf
  if (abs_bits < 0x38800000u) {  // below the smallest normal half: 2^-14
    // Adding 0.5 (2^-1) aligns the half subnormal grid (2^-24) with float's ulp there,
    // so the float addition itself rounds to nearest even.
    const float shifted = bits_to_float(abs_bits) + 0.5f;
    return float16_t{static_cast<uint16_t>(sign | (float_to_bits(shifted) - 0x3f000000u))};
  }
  uint32_t rounded = abs_bits + 0x0fffu + ((abs_bits >> 13) & 1u);
  rounded -= (112u << 23);
  return float16_t{static_cast<uint16_t>(sign | (rounded >> 13))};
}

// Uniform load/store helpers used by the templated kernels.
FX_HOST_DEVICE float load_acc(bfloat16_t v) { return to_float(v); }
FX_HOST_DEVICE float load_acc(float16_t v) { return to_float(v); }
FX_HOST_DEVICE float load_acc(float v) { return v; }
FX_HOST_DEVICE double load_acc(double v) { return v; }

template <typename T> FX_HOST_DEVICE T store_as(Acc<T> v);
template <> FX_HOST_DEVICE bfloat16_t store_as<bfloat16_t>(float v) { return to_bfloat16(v); }
template <> FX_HOST_DEVICE float16_t store_as<float16_t>(float v) { return to_float16(v); }
template <> FX_HOST_DEVICE float store_as<float>(float v) { return v; }
template <> FX_HOST_DEVICE double store_as<double>(double v) { return v; }

}  // namespace
}  // namespace fused_xent
