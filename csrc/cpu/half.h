// fp16 / bf16 <-> fp32 conversions of the CPU kernels (AdamW, clipping, attention).
//
// Host C++ only (kernels/*.cu use the CUDA intrinsics instead; the
// stochastic-rounding bits they share with the CPU live in cpu/adamw.h, sr::).
// Branch-free, so loops over them vectorise; every function is always inlined,
// so it compiles into each SIMD variant (target attribute) that calls it.
//
// Each storage type S has S::T (the stored type), S::load (T -> float, exact)
// and S::store (float -> T, round to nearest even, overflow to inf, NaN stays
// a quiet NaN). Both conversions are exact bit manipulations plus at most one
// float add or one float multiply, so -ffp-contract settings cannot change
// their results: every kernel file rounds the same way.
#pragma once

#include <cstdint>

#include "cpu/simd.h"  // TT_INLINE

namespace turbotune {
namespace cpu {

TT_INLINE uint32_t f2u(float f) { return __builtin_bit_cast(uint32_t, f); }
TT_INLINE float u2f(uint32_t u) { return __builtin_bit_cast(float, u); }

struct F32 {
  using T = float;
  static TT_INLINE float load(T x) { return x; }
  static TT_INLINE T store(float x) { return x; }
};

struct BF16 {
  using T = uint16_t;
  static TT_INLINE float load(T x) { return u2f(uint32_t(x) << 16); }
  // Round to nearest even; NaN stays a (quiet) NaN.
  static TT_INLINE T store(float f) {
    uint32_t u = f2u(f);
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = (u >> 16) | 0x40u;
    return T((u & 0x7FFFFFFFu) > 0x7F800000u ? nan : r);
  }
};

struct F16 {
  using T = uint16_t;
  // Branch-free half -> float (exact for normals, subnormals, inf and NaN).
  static TT_INLINE float load(T h) {
    uint32_t sign = (uint32_t(h) & 0x8000u) << 16;
    uint32_t em = uint32_t(h) & 0x7FFFu;
    float mag = u2f(em << 13) * 0x1p112f;  // rebias exponent (also scales subnormals)
    uint32_t bits = f2u(mag);
    bits = em >= 0x7C00u ? (bits | 0x7F800000u) : bits;  // inf / NaN
    return u2f(bits | sign);
  }
  // float -> half, round to nearest even, overflow to inf, NaN to quiet NaN.
  static TT_INLINE T store(float f) {
    uint32_t u = f2u(f);
    uint32_t sign = (u >> 16) & 0x8000u;
    u &= 0x7FFFFFFFu;
    // normal range
    uint32_t mant_odd = (u >> 13) & 1u;
    uint32_t normal = (u + (uint32_t(15 - 127) << 23) + 0xFFFu + mant_odd) >> 13;
    // subnormal range: let the FPU round by adding a magic number
    const uint32_t denorm_magic = uint32_t((127 - 15) + (23 - 10) + 1) << 23;
    uint32_t sub = f2u(u2f(u) + u2f(denorm_magic)) - denorm_magic;
    uint32_t out = u < (113u << 23) ? sub : normal;
    out = u >= (143u << 23) ? (u > 0x7F800000u ? 0x7E00u : 0x7C00u) : out;
    return T(out | sign);
  }
};

}  // namespace cpu
}  // namespace turbotune
