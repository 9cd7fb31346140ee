// CPU attention forward / backward (see attention.h).
//
// Work is split into (sequence, group of heads) items, sorted by cost and
// shared by one OpenMP loop with dynamic scheduling, so long and short
// sequences balance. Heads are grouped so that packing reads whole token rows
// of (tokens, H, D) projections instead of short per-head chunks. Each item:
//   * packs its keys (and values) into fp32 panels: K^T (D x Lk) for the score
//     matmul (rows staged, then an 8 x 8 register transpose), V for P @ V, and
//     K, V^T for the backward. With a key padding mask only the attended keys
//     are packed ("compacted"), so masked keys cost nothing and need no -inf;
//     the original key index is kept for causal limits and dropout positions;
//   * walks the queries in blocks of BM rows. A block's scores against every
//     key (BM x Lk fp32, ~64 KB) stay in cache, so the softmax is exact (one
//     max, one exp per element, no online rescaling) and P @ V follows;
//   * the backward recomputes P = exp(S - lse) per block, dP = dO V^T,
//     dS = P (dP Z - delta) (Z: dropout multipliers), then dV += (P Z)^T dO,
//     dK += dS^T Q, dQ = dS K, accumulating dK/dV for the item in fp32.
// All five matmul shapes are one register-blocked kernel C (+)= A B with B a
// packed row-major panel and A read as scalars (plain or transposed).
//
// SIMD: the matmul kernel, the softmax rows, the transpose and the Philox
// generator are written once with GCC vector extensions (GCC >= 12 or clang:
// __builtin_shufflevector) and compiled three times through target attributes
// (AVX-512, AVX2+FMA, generic 16-wide vectors lowered to whatever the baseline
// ISA has); the variant is picked at run time. Philox has an AVX2 intrinsics
// version (also used by the AVX-512 variant). Packing and output conversion
// are plain C++.
//
// Dropout: Philox-4x32-10 exactly as turbotune's Triton kernels (tl.philox)
// and ops/attention.py's _philox4: position n = i * Lk + j of head bh uses
// word n % 4 of the block with counter (n / 4, bh, offset, 0), key (seed low,
// seed high); kept when (word >> 8) >= threshold. Blocks are generated for a
// whole query block at once (consecutive positions), four positions a block.
#include "cpu/attention.h"
#include "cpu/half.h"  // F32 / BF16 / F16 storage types, shared with the AdamW kernels
#include "cpu/simd.h"  // TT_INLINE, TT_X86, TT_TARGET_*: the SIMD variants, as the AdamW kernels

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#include <immintrin.h>
#endif

#ifdef TURBOTUNE_WITH_OPENMP
#include <omp.h>
#endif

namespace turbotune {
namespace cpu {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ------------------------------------------------------------------ vectors

template <int W>
struct Vec;
template <>
struct Vec<8> {
  typedef float F __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
};
template <>
struct Vec<16> {
  typedef float F __attribute__((vector_size(64)));
  typedef int32_t I __attribute__((vector_size(64)));
};

template <class V>
TT_INLINE V vload(const float* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}
template <class V>
TT_INLINE void vstore(float* p, V v) {
  __builtin_memcpy(p, &v, sizeof(V));
}
template <class V>
TT_INLINE V vset(float x) {
  return V{} + x;
}
// Horizontal max / sum by halving (log2(W) shuffle + op steps).
TT_INLINE float hmax8(Vec<8>::F v) {
  v = v > __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3) ? v : __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
  v = v > __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5) ? v : __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5);
  return v[0] > v[1] ? v[0] : v[1];
}
TT_INLINE float hsum8(Vec<8>::F v) {
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5);
  return v[0] + v[1];
}
template <int W>
TT_INLINE float hmax(typename Vec<W>::F v) {
  if constexpr (W == 8) {
    return hmax8(v);
  } else {
    const Vec<8>::F lo = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
    const Vec<8>::F hi = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    return hmax8(lo > hi ? lo : hi);
  }
}
template <int W>
TT_INLINE float hsum(typename Vec<W>::F v) {
  if constexpr (W == 8) {
    return hsum8(v);
  } else {
    return hsum8(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
  }
}
// Lane indices 0 .. W - 1.
template <int W>
TT_INLINE typename Vec<W>::I iota() {
  typename Vec<W>::I r{};
  for (int i = 0; i < W; ++i) r[i] = i;
  return r;
}

// 2^x, relative error ~2e-7; -inf (and anything below -127) gives +0, NaN stays NaN.
template <int W>
TT_INLINE typename Vec<W>::F vexp2(typename Vec<W>::F x) {
  using V = typename Vec<W>::F;
  using I = typename Vec<W>::I;
  const V lo = vset<V>(-127.f), hi = vset<V>(127.f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const V magic = vset<V>(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  const V r = (x + magic) - magic;
  const V f = x - r;  // [-0.5, 0.5]
  V p = vset<V>(1.535336188319500e-4f);
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const I n = __builtin_convertvector(r, I);
  const I e = (n + 127) << 23;  // n = -127 -> +0.0
  return p * __builtin_bit_cast(V, e);
}

// Natural log of positive x (Cephes logf: relative error ~1e-7); +inf and NaN pass through.
template <int W>
TT_INLINE typename Vec<W>::F vlog(typename Vec<W>::F x) {
  using V = typename Vec<W>::F;
  using I = typename Vec<W>::I;
  const I xi = __builtin_bit_cast(I, x);
  I e = ((xi >> 23) & 0xff) - 126;                                      // x = m * 2^e, m in [0.5, 1)
  V m = __builtin_bit_cast(V, (xi & 0x007fffff) | 0x3f000000);
  const auto small = m < vset<V>(0.707106781186547524f);
  e = small ? e - 1 : e;
  m = small ? m + m - 1.f : m - 1.f;
  const V z = m * m;
  V y = vset<V>(7.0376836292e-2f);
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const V ef = __builtin_convertvector(e, V);
  y += ef * -2.12194440e-4f;
  y += z * -0.5f;
  V r = m + y + ef * 0.693359375f;
  return x < vset<V>(std::numeric_limits<float>::infinity()) ? r : x;
}

// ------------------------------------------------------------------ Philox dropout

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;

struct Dropout {
  uint32_t k0 = 0, k1 = 0;  // seed low / high words
  uint32_t offset = 0;
  uint32_t threshold = 0;
  float keep_scale = 1.f;  // 1 / (1 - p)
};

// out[t] (t < 4 * nblk) = keep_scale or 0 for position 4 * blk0 + t of head bh:
// block blk0 + l yields positions 4 (blk0 + l) .. + 3 from its four words.
TT_INLINE void dropout_mult_body(const Dropout& d, uint32_t bh, uint32_t blk0, int64_t nblk, float* __restrict out) {
  const uint32_t thr = d.threshold;
  const float ks = d.keep_scale;
#pragma omp simd
  for (int64_t l = 0; l < nblk; ++l) {
    uint32_t c0 = blk0 + uint32_t(l), c1 = bh, c2 = d.offset, c3 = 0u;
    uint32_t a = d.k0, b = d.k1;
#pragma GCC unroll 10
    for (int r = 0; r < 10; ++r) {
      const uint64_t pb = uint64_t(c2) * kPhiloxRoundB;
      const uint64_t pa = uint64_t(c0) * kPhiloxRoundA;
      const uint32_t n0 = uint32_t(pb >> 32) ^ c1 ^ a;
      const uint32_t n2 = uint32_t(pa >> 32) ^ c3 ^ b;
      c1 = uint32_t(pb);
      c3 = uint32_t(pa);
      c0 = n0;
      c2 = n2;
      a += kPhiloxKeyA;
      b += kPhiloxKeyB;
    }
    out[4 * l + 0] = (c0 >> 8) >= thr ? ks : 0.f;
    out[4 * l + 1] = (c1 >> 8) >= thr ? ks : 0.f;
    out[4 * l + 2] = (c2 >> 8) >= thr ? ks : 0.f;
    out[4 * l + 3] = (c3 >> 8) >= thr ? ks : 0.f;
  }
}

#ifdef TT_X86
// The same generator on 8 blocks at a time with AVX2 integer ops: a 32 x 32 -> 64-bit product is
// two vpmuludq (even and odd lanes) and two blends, four positions of each block are transposed
// into position order. Used by the AVX2 and AVX-512 variants (AVX-512VL runs it as is).
TT_TARGET_AVX2 TT_INLINE void mulhilo8(__m256i x, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i pe = _mm256_mul_epu32(x, m);
  const __m256i po = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), m);
  lo = _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
}

TT_TARGET_AVX2 TT_INLINE void dropout_mult_avx2_body(const Dropout& d, uint32_t bh, uint32_t blk0, int64_t nblk,
                                                     float* __restrict out) {
  const __m256i ma = _mm256_set1_epi32(int(kPhiloxRoundA)), mb = _mm256_set1_epi32(int(kPhiloxRoundB));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i thr = _mm256_set1_epi32(int(d.threshold) - 1);  // (w >> 8) > thr - 1 <=> kept
  const __m256i ks = _mm256_castps_si256(_mm256_set1_ps(d.keep_scale));
  int64_t l = 0;
  for (; l + 8 <= nblk; l += 8) {
    __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(int(blk0 + uint32_t(l))), lane);
    __m256i c1 = _mm256_set1_epi32(int(bh)), c2 = _mm256_set1_epi32(int(d.offset)), c3 = _mm256_setzero_si256();
    uint32_t a = d.k0, b = d.k1;
    for (int r = 0; r < 10; ++r) {
      __m256i hb, lb, ha, la;
      mulhilo8(c2, mb, hb, lb);
      mulhilo8(c0, ma, ha, la);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hb, c1), _mm256_set1_epi32(int(a)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(ha, c3), _mm256_set1_epi32(int(b)));
      c1 = lb;
      c3 = la;
      a += kPhiloxKeyA;
      b += kPhiloxKeyB;
    }
    // keep multipliers per word, then a 4 x 8 transpose: block t's words go to out[4 t .. 4 t + 3]
    const __m256i m0 = _mm256_and_si256(_mm256_cmpgt_epi32(_mm256_srli_epi32(c0, 8), thr), ks);
    const __m256i m1 = _mm256_and_si256(_mm256_cmpgt_epi32(_mm256_srli_epi32(c1, 8), thr), ks);
    const __m256i m2 = _mm256_and_si256(_mm256_cmpgt_epi32(_mm256_srli_epi32(c2, 8), thr), ks);
    const __m256i m3 = _mm256_and_si256(_mm256_cmpgt_epi32(_mm256_srli_epi32(c3, 8), thr), ks);
    const __m256i t0 = _mm256_unpacklo_epi32(m0, m1), t1 = _mm256_unpacklo_epi32(m2, m3);
    const __m256i t2 = _mm256_unpackhi_epi32(m0, m1), t3 = _mm256_unpackhi_epi32(m2, m3);
    const __m256i u0 = _mm256_unpacklo_epi64(t0, t1), u1 = _mm256_unpackhi_epi64(t0, t1);
    const __m256i u2 = _mm256_unpacklo_epi64(t2, t3), u3 = _mm256_unpackhi_epi64(t2, t3);
    float* o = out + 4 * l;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 0), _mm256_permute2x128_si256(u0, u1, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 8), _mm256_permute2x128_si256(u2, u3, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16), _mm256_permute2x128_si256(u0, u1, 0x31));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 24), _mm256_permute2x128_si256(u2, u3, 0x31));
  }
  if (l < nblk) dropout_mult_body(d, bh, blk0 + uint32_t(l), nblk - l, out + 4 * l);
}
#endif

// ------------------------------------------------------------------ matmul kernel

// C[M x ncols] (+)= A[M x K] B[K x ncols]; B row-major (ldb), C row-major (ldc), A(r, k) =
// a[r * lda + k] or, transposed, a[k * lda + r]. N is a multiple of the vector width and B / C
// are padded to it. Optional per-row limits (the tile takes the widest over its rows): row_ncol
// = columns needed, row_kbeg / row_kend = range of k where A is non-zero.
struct Gemm {
  int64_t M = 0, N = 0, K = 0;
  const float* a = nullptr;
  int64_t lda = 0;
  bool trans_a = false;
  const float* b = nullptr;
  int64_t ldb = 0;
  float* c = nullptr;
  int64_t ldc = 0;
  bool accumulate = false;
  const int32_t* row_ncol = nullptr;
  const int32_t* row_kbeg = nullptr;
  const int32_t* row_kend = nullptr;
};

template <int W_, int MR_, int NV_>
struct Cfg {
  static constexpr int W = W_;
  static constexpr int MR = MR_;
  static constexpr int NV = NV_;
  using V = typename Vec<W>::F;
};
using CfgAvx512 = Cfg<16, 8, 2>;
using CfgAvx2 = Cfg<8, 6, 2>;
using CfgGeneric = Cfg<16, 2, 1>;

template <class C, bool kTrans, bool kAcc, int MR, int NV>
TT_INLINE void micro(int64_t k0, int64_t k1, const float* __restrict a, int64_t lda, const float* __restrict b,
                     int64_t ldb, float* __restrict c, int64_t ldc) {
  using V = typename C::V;
  constexpr int W = C::W;
  V acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[r][v] = kAcc ? vload<V>(c + r * ldc + v * W) : V{};
  }
  for (int64_t k = k0; k < k1; ++k) {
    V bv[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) bv[v] = vload<V>(b + k * ldb + v * W);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const float av = kTrans ? a[k * lda + r] : a[r * lda + k];
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) vstore(c + r * ldc + v * W, acc[r][v]);
  }
}

template <class C, bool kTrans, bool kAcc, int NV, int MR = C::MR>
TT_INLINE void micro_rows(int mr, int64_t k0, int64_t k1, const float* a, int64_t lda, const float* b, int64_t ldb,
                          float* c, int64_t ldc) {
  if constexpr (MR == 1) {
    micro<C, kTrans, kAcc, 1, NV>(k0, k1, a, lda, b, ldb, c, ldc);
  } else {
    if (mr == MR)
      micro<C, kTrans, kAcc, MR, NV>(k0, k1, a, lda, b, ldb, c, ldc);
    else
      micro_rows<C, kTrans, kAcc, NV, MR - 1>(mr, k0, k1, a, lda, b, ldb, c, ldc);
  }
}

template <class C, bool kTrans, bool kAcc, int NV = C::NV>
TT_INLINE void micro_tile(int mr, int nv, int64_t k0, int64_t k1, const float* a, int64_t lda, const float* b,
                          int64_t ldb, float* c, int64_t ldc) {
  if constexpr (NV == 1) {
    micro_rows<C, kTrans, kAcc, 1>(mr, k0, k1, a, lda, b, ldb, c, ldc);
  } else {
    if (nv == NV)
      micro_rows<C, kTrans, kAcc, NV>(mr, k0, k1, a, lda, b, ldb, c, ldc);
    else
      micro_tile<C, kTrans, kAcc, NV - 1>(mr, nv, k0, k1, a, lda, b, ldb, c, ldc);
  }
}

template <class C, bool kTrans, bool kAcc>
TT_INLINE void gemm_body(const Gemm& g) {
  constexpr int W = C::W, MR = C::MR, NV = C::NV;
  for (int64_t r0 = 0; r0 < g.M; r0 += MR) {
    const int mr = int(std::min<int64_t>(MR, g.M - r0));
    int64_t ncol = g.N, k0 = 0, k1 = g.K;
    if (g.row_ncol) {
      int64_t n = 0;
      for (int r = 0; r < mr; ++r) n = std::max<int64_t>(n, g.row_ncol[r0 + r]);
      ncol = std::min(g.N, (n + W - 1) / W * W);
    }
    if (g.row_kbeg) {
      int64_t kb = g.K;
      for (int r = 0; r < mr; ++r) kb = std::min<int64_t>(kb, g.row_kbeg[r0 + r]);
      k0 = std::max<int64_t>(kb, 0);
    }
    if (g.row_kend) {
      int64_t ke = 0;
      for (int r = 0; r < mr; ++r) ke = std::max<int64_t>(ke, g.row_kend[r0 + r]);
      k1 = std::min(g.K, ke);
    }
    const float* a = kTrans ? g.a + r0 : g.a + r0 * g.lda;
    float* c = g.c + r0 * g.ldc;
    if (k1 <= k0 && kAcc) continue;  // nothing to add
    for (int64_t j0 = 0; j0 < ncol; j0 += NV * W) {
      const int nv = int(std::min<int64_t>(NV, (ncol - j0) / W));
      micro_tile<C, kTrans, kAcc>(mr, nv, k0, std::max(k0, k1), a, g.lda, g.b + j0, g.ldb, c + j0, g.ldc);
    }
  }
}

template <class C>
TT_INLINE void gemm_dispatch(const Gemm& g) {
  if (g.trans_a) {
    if (g.accumulate)
      gemm_body<C, true, true>(g);
    else
      gemm_body<C, true, false>(g);
  } else {
    if (g.accumulate)
      gemm_body<C, false, true>(g);
    else
      gemm_body<C, false, false>(g);
  }
}

// ------------------------------------------------------------------ softmax rows

struct RowStat {
  float max;
  float sum;
};

// The dropout multipliers of one row at the compacted keys [0, lkn). Without compaction they are
// read in place (past n they belong to the next row or to the buffer's zeroed slack: finite, and
// multiplied by p = 0); with it they are gathered into tmp, zeros past n.
TT_INLINE const float* row_mult(const float* mult, const int32_t* kidx, int64_t n, int64_t lkn, float* tmp) {
  if (!mult || !kidx) return mult;
  for (int64_t j = 0; j < n; ++j) tmp[j] = mult[kidx[j]];
  for (int64_t j = n; j < lkn; ++j) tmp[j] = 0.f;
  return tmp;
}

// Forward row: s[0..n) holds the raw scores q.k of the visible keys. Writes
// p = exp(scale * (s - max)) (times the dropout multiplier when mult is set)
// over [0, lkn) (zeros past n) and returns the row max (raw units) and the sum
// of the undropped p. n == 0: zeros, {-inf, 0}.
template <class C>
TT_INLINE RowStat fwd_row_body(float* __restrict s, int64_t n, int64_t lkn, float c, const float* mult,
                               const int32_t* kidx, float* __restrict tmp) {
  using V = typename C::V;
  using I = typename Vec<C::W>::I;
  constexpr int W = C::W;
  if (n <= 0) {
    for (int64_t j = 0; j < lkn; j += W) vstore(s + j, V{});
    return {kNegInf, 0.f};
  }
  const I lane = iota<W>();
  const V ninf = vset<V>(kNegInf);
  V vm = ninf;
  for (int64_t j = 0; j < lkn; j += W) {
    const V x = vload<V>(s + j);
    const V xm = (lane + int32_t(j)) < int32_t(n) ? x : ninf;
    vm = xm > vm ? xm : vm;
  }
  const float mx = hmax<W>(vm);
  const float off = mx * c;
  const float* z = row_mult(mult, kidx, n, lkn, tmp);
  V vs = V{};
  for (int64_t j = 0; j < lkn; j += W) {
    const V x = vload<V>(s + j);
    const V e = vexp2<W>(x * c - off);
    const V p = (lane + int32_t(j)) < int32_t(n) ? e : V{};
    vs += p;
    vstore(s + j, z ? p * vload<V>(z + j) : p);
  }
  return {mx, hsum<W>(vs)};
}

// Per row of a block: lse = max * scale + log(sum) (natural log; -inf when sum is 0: no key) and
// inv = 1 / sum (0 when no key). max / sum are the raw-unit row max and the sum fwd_row returned.
// A NaN sum (inf / NaN in the inputs) gives a NaN lse and inv, so the backward propagates NaN too.
template <class C>
TT_INLINE void row_stats_body(const float* __restrict mx, const float* __restrict sum, int64_t m, float scale,
                              float* __restrict lse, float* __restrict inv) {
  using V = typename C::V;
  constexpr int W = C::W;
  const V zero{}, ninf = vset<V>(kNegInf), one = vset<V>(1.f);
  const V nan = vset<V>(std::numeric_limits<float>::quiet_NaN());
  for (int64_t r = 0; r < m; r += W) {  // the arrays hold a multiple of W entries
    const V sm = vload<V>(sum + r);
    const auto any = sm > zero;
    const auto bad = sm != sm;
    const V safe = any ? sm : one;
    vstore(lse + r, any ? vload<V>(mx + r) * scale + vlog<W>(safe) : (bad ? nan : ninf));
    vstore(inv + r, any ? one / safe : (bad ? nan : zero));
  }
}

// Backward row: s = raw scores, dp = dO . v over [0, n). Writes P = exp(scale * s - lse) into s,
// dS = P * (dP * Z - delta) into dp and P * Z into pz (when dropout), zeros past n up to lkn.
template <class C>
TT_INLINE void bwd_row_body(float* __restrict s, float* __restrict dp, float* __restrict pz, int64_t n, int64_t lkn,
                            float c, float lse2, float delta, const float* mult, const int32_t* kidx,
                            float* __restrict tmp) {
  using V = typename C::V;
  using I = typename Vec<C::W>::I;
  constexpr int W = C::W;
  if (n <= 0) {
    for (int64_t j = 0; j < lkn; j += W) {
      vstore(s + j, V{});
      vstore(dp + j, V{});
      if (pz) vstore(pz + j, V{});
    }
    return;
  }
  const I lane = iota<W>();
  const float* z = row_mult(mult, kidx, n, lkn, tmp);
  for (int64_t j = 0; j < lkn; j += W) {
    const V e = vexp2<W>(vload<V>(s + j) * c - lse2);
    const auto valid = (lane + int32_t(j)) < int32_t(n);
    const V p = valid ? e : V{};
    vstore(s + j, p);
    V d = vload<V>(dp + j);
    if (z) {
      const V zz = vload<V>(z + j);
      vstore(pz + j, p * zz);
      d = d * zz;
    }
    // Past n, dP is not computed (may hold anything): select, do not multiply by p = 0.
    vstore(dp + j, valid ? p * (d - delta) : V{});
  }
}

// ------------------------------------------------------------------ panel transpose

// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols: 8 x 8 blocks through registers
// (unpack / shuffle / lane swap), scalar edges.
TT_INLINE void transpose8x8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  using V8 = Vec<8>::F;
  const V8 r0 = vload<V8>(src), r1 = vload<V8>(src + lds), r2 = vload<V8>(src + 2 * lds),
           r3 = vload<V8>(src + 3 * lds), r4 = vload<V8>(src + 4 * lds), r5 = vload<V8>(src + 5 * lds),
           r6 = vload<V8>(src + 6 * lds), r7 = vload<V8>(src + 7 * lds);
  const V8 t0 = __builtin_shufflevector(r0, r1, 0, 8, 1, 9, 4, 12, 5, 13);
  const V8 t1 = __builtin_shufflevector(r0, r1, 2, 10, 3, 11, 6, 14, 7, 15);
  const V8 t2 = __builtin_shufflevector(r2, r3, 0, 8, 1, 9, 4, 12, 5, 13);
  const V8 t3 = __builtin_shufflevector(r2, r3, 2, 10, 3, 11, 6, 14, 7, 15);
  const V8 t4 = __builtin_shufflevector(r4, r5, 0, 8, 1, 9, 4, 12, 5, 13);
  const V8 t5 = __builtin_shufflevector(r4, r5, 2, 10, 3, 11, 6, 14, 7, 15);
  const V8 t6 = __builtin_shufflevector(r6, r7, 0, 8, 1, 9, 4, 12, 5, 13);
  const V8 t7 = __builtin_shufflevector(r6, r7, 2, 10, 3, 11, 6, 14, 7, 15);
  const V8 u0 = __builtin_shufflevector(t0, t2, 0, 1, 8, 9, 4, 5, 12, 13);
  const V8 u1 = __builtin_shufflevector(t0, t2, 2, 3, 10, 11, 6, 7, 14, 15);
  const V8 u2 = __builtin_shufflevector(t1, t3, 0, 1, 8, 9, 4, 5, 12, 13);
  const V8 u3 = __builtin_shufflevector(t1, t3, 2, 3, 10, 11, 6, 7, 14, 15);
  const V8 u4 = __builtin_shufflevector(t4, t6, 0, 1, 8, 9, 4, 5, 12, 13);
  const V8 u5 = __builtin_shufflevector(t4, t6, 2, 3, 10, 11, 6, 7, 14, 15);
  const V8 u6 = __builtin_shufflevector(t5, t7, 0, 1, 8, 9, 4, 5, 12, 13);
  const V8 u7 = __builtin_shufflevector(t5, t7, 2, 3, 10, 11, 6, 7, 14, 15);
  vstore(dst, __builtin_shufflevector(u0, u4, 0, 1, 2, 3, 8, 9, 10, 11));
  vstore(dst + ldd, __builtin_shufflevector(u1, u5, 0, 1, 2, 3, 8, 9, 10, 11));
  vstore(dst + 2 * ldd, __builtin_shufflevector(u2, u6, 0, 1, 2, 3, 8, 9, 10, 11));
  vstore(dst + 3 * ldd, __builtin_shufflevector(u3, u7, 0, 1, 2, 3, 8, 9, 10, 11));
  vstore(dst + 4 * ldd, __builtin_shufflevector(u0, u4, 4, 5, 6, 7, 12, 13, 14, 15));
  vstore(dst + 5 * ldd, __builtin_shufflevector(u1, u5, 4, 5, 6, 7, 12, 13, 14, 15));
  vstore(dst + 6 * ldd, __builtin_shufflevector(u2, u6, 4, 5, 6, 7, 12, 13, 14, 15));
  vstore(dst + 7 * ldd, __builtin_shufflevector(u3, u7, 4, 5, 6, 7, 12, 13, 14, 15));
}

TT_INLINE void transpose_body(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
  const int64_t r8 = rows / 8 * 8, c8 = cols / 8 * 8;
  for (int64_t r = 0; r < r8; r += 8) {
    for (int64_t c = 0; c < c8; c += 8) transpose8x8(src + r * lds + c, lds, dst + c * ldd + r, ldd);
    for (int64_t c = c8; c < cols; ++c)
      for (int64_t i = r; i < r + 8; ++i) dst[c * ldd + i] = src[i * lds + c];
  }
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t i = r8; i < rows; ++i) dst[c * ldd + i] = src[i * lds + c];
}

// ------------------------------------------------------------------ ISA variants

struct IsaOps {
  const char* name;
  int W;
  int MR;
  void (*gemm)(const Gemm&);
  RowStat (*fwd_row)(float*, int64_t, int64_t, float, const float*, const int32_t*, float*);
  void (*bwd_row)(float*, float*, float*, int64_t, int64_t, float, float, float, const float*, const int32_t*, float*);
  void (*dropout_mult)(const Dropout&, uint32_t, uint32_t, int64_t, float*);
  void (*transpose)(const float*, int64_t, int64_t, int64_t, float*, int64_t);
  void (*row_stats)(const float*, const float*, int64_t, float, float*, float*);
};

#define TT_DEFINE_ISA(NAME, ATTR, CFG, DROPOUT)                                                                 \
  ATTR void gemm_##NAME(const Gemm& g) { gemm_dispatch<CFG>(g); }                                               \
  ATTR RowStat fwd_row_##NAME(float* s, int64_t n, int64_t lkn, float c, const float* m, const int32_t* ki,   \
                              float* t) {                                                                      \
    return fwd_row_body<CFG>(s, n, lkn, c, m, ki, t);                                                          \
  }                                                                                                            \
  ATTR void bwd_row_##NAME(float* s, float* dp, float* pz, int64_t n, int64_t lkn, float c, float lse2,         \
                           float delta, const float* m, const int32_t* ki, float* t) {                         \
    bwd_row_body<CFG>(s, dp, pz, n, lkn, c, lse2, delta, m, ki, t);                                            \
  }                                                                                                            \
  ATTR void dropout_mult_##NAME(const Dropout& d, uint32_t bh, uint32_t blk0, int64_t nblk, float* out) {      \
    DROPOUT(d, bh, blk0, nblk, out);                                                                           \
  }                                                                                                            \
  ATTR void transpose_##NAME(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd) { \
    transpose_body(src, lds, rows, cols, dst, ldd);                                                             \
  }                                                                                                            \
  ATTR void row_stats_##NAME(const float* mx, const float* sum, int64_t m, float scale, float* lse, float* inv) { \
    row_stats_body<CFG>(mx, sum, m, scale, lse, inv);                                                          \
  }                                                                                                            \
  const IsaOps kOps_##NAME = {#NAME,           CFG::W,          CFG::MR,             &gemm_##NAME,              \
                              &fwd_row_##NAME, &bwd_row_##NAME, &dropout_mult_##NAME, &transpose_##NAME,        \
                              &row_stats_##NAME};

#define TT_NO_ATTR
TT_DEFINE_ISA(generic, TT_NO_ATTR, CfgGeneric, dropout_mult_body)
#ifdef TT_X86
TT_DEFINE_ISA(avx2, TT_TARGET_AVX2, CfgAvx2, dropout_mult_avx2_body)
TT_DEFINE_ISA(avx512, TT_TARGET_AVX512, CfgAvx512, dropout_mult_avx2_body)
#endif

int isa_rank(const std::string& s) {
  if (s == "generic") return 0;
  if (s == "avx2") return 1;
  if (s == "avx512") return 2;
  return -1;
}

const IsaOps& pick_ops(const char* simd) {
  // The best variant this CPU runs, capped by TURBOTUNE_CPU_SIMD (shared with the AdamW kernels).
  int best = isa_rank(simd_variant());
  const std::string req = simd ? std::string(simd) : std::string("auto");
  if (req != "auto") {
    const int r = isa_rank(req);
    if (r < 0) throw std::invalid_argument("simd must be 'auto', 'generic', 'avx2' or 'avx512', got '" + req + "'");
    best = std::min(best, r);
  }
#ifdef TT_X86
  if (best >= 2) return kOps_avx512;
  if (best == 1) return kOps_avx2;
#endif
  return kOps_generic;
}

// ------------------------------------------------------------------ scratch memory

// Per-thread buffers, grown as needed and kept between calls (OpenMP threads persist), so a
// call allocates nothing once warm. Released after a call that needed more than kKeepBytes.
constexpr size_t kKeepBytes = size_t(32) << 20;

struct Scratch {
  float* f = nullptr;
  size_t cap = 0;  // floats
  std::vector<int32_t> i32;
  ~Scratch() { std::free(f); }
  float* floats(size_t n) {
    if (n > cap) {
      std::free(f);
      f = nullptr;
      cap = 0;
      const size_t want = (n + n / 4 + 64 + 15) / 16 * 16;
      f = static_cast<float*>(std::aligned_alloc(64, want * sizeof(float)));
      if (!f) throw std::bad_alloc();
      cap = want;
    }
    return f;
  }
  void trim() {
    if (cap * sizeof(float) > kKeepBytes) {
      std::free(f);
      f = nullptr;
      cap = 0;
    }
    if (i32.capacity() * sizeof(int32_t) > kKeepBytes) std::vector<int32_t>().swap(i32);
  }
};

Scratch& scratch() {
  static thread_local Scratch s;
  return s;
}

// Bump allocator over one scratch block of `cap` floats: 64-byte aligned slices.
constexpr size_t kCarveSlack = 16 * 24;  // alignment padding of up to 24 slices

struct Carve {
  float* base;
  size_t cap;
  size_t used = 0;
  float* take(size_t n) {
    float* p = base + used;
    used += (n + 15) / 16 * 16;
    if (used > cap) throw std::logic_error("attention: scratch layout overflow (internal error)");
    return p;
  }
};

// ------------------------------------------------------------------ work items

// One work item: sequence b, heads h0 .. h0 + nh - 1. Heads are grouped so that packing reads
// whole rows: packed projections are (tokens, heads, D), so the rows of one head are short
// chunks spread over memory, which the hardware prefetchers serve poorly; a group reads the
// chunks of all its heads side by side.
struct Item {
  int64_t b, h0, nh;
  int64_t q0, k0;  // first row of the sequence in q / k (varlen: cu offsets; dense: 0)
  int64_t lq, lk;
  double cost;
};

struct Ctx {
  const AttnProblem* p;
  const IsaOps* ops;
  AttnView q, k, v, out, lse, dout, dq, dk, dv;
  float c;  // scale * log2(e): exp(scale * s) = exp2(c * s)
  bool dropout;
  Dropout drop;
};

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Leading dimension of a panel row of n floats: a multiple of the vector width, and not a multiple
// of 512 bytes (walking down a column would keep hitting the same few cache sets).
int64_t lead_dim(int64_t n, int W) {
  int64_t ld = round_up(std::max<int64_t>(n, 1), W);
  if (ld >= 128 && ld % 128 == 0) ld += 16;
  return ld;
}

// Query rows per block: the block's score rows (and the dropout multipliers) stay around 64 KB.
int64_t block_rows(int64_t lks, int MR) {
  int64_t bm = (16384 / std::max<int64_t>(lks, 1)) / MR * MR;
  return std::clamp<int64_t>(bm, MR, 64 / MR * MR);
}

// Scratch floats per head of an item (the panels that exist once per head), forward / backward.
int64_t head_floats(int64_t D, int64_t lk, int64_t lq, int W, int MR, bool backward) {
  const int64_t ldd = lead_dim(D, W), lks = lead_dim(lk, W);
  const int64_t bm = std::min(block_rows(lks, MR), std::max<int64_t>(lq, 1));
  return backward ? 2 * D * lks + 3 * lk * ldd + 3 * bm * ldd + bm : D * lks + 2 * lk * ldd + 2 * bm * ldd + bm;
}

template <class S>
TT_INLINE const typename S::T* elem_ptr(const AttnView& t, int64_t b, int64_t h, int64_t row) {
  return static_cast<const typename S::T*>(t.ptr) + b * t.sb + h * t.sh + row * t.sr;
}

template <class S>
TT_INLINE typename S::T* elem_ptr_mut(const AttnView& t, int64_t b, int64_t h, int64_t row) {
  return static_cast<typename S::T*>(t.ptr) + b * t.sb + h * t.sh + row * t.sr;
}

// dst[0..D) = row converted to fp32, zeros up to ld.
template <class S>
TT_INLINE void load_row(const typename S::T* src, int64_t sd, int64_t D, float* __restrict dst, int64_t ld) {
  if (sd == 1) {
    for (int64_t d = 0; d < D; ++d) dst[d] = S::load(src[d]);
  } else {
    for (int64_t d = 0; d < D; ++d) dst[d] = S::load(src[d * sd]);
  }
  for (int64_t d = D; d < ld; ++d) dst[d] = 0.f;
}

// sum(a[i] * b[i]) for i < n, n a multiple of 8 (eight partial sums: vectorised).
TT_INLINE float dot8(const float* __restrict a, const float* __restrict b, int64_t n) {
  using V8 = Vec<8>::F;
  V8 acc{};
  for (int64_t i = 0; i < n; i += 8) acc += vload<V8>(a + i) * vload<V8>(b + i);
  return hsum8(acc);
}

template <class S>
TT_INLINE void store_row(typename S::T* dst, int64_t sd, int64_t D, const float* __restrict src, float mul) {
  if (sd == 1) {
    for (int64_t d = 0; d < D; ++d) dst[d] = S::store(src[d] * mul);
  } else {
    for (int64_t d = 0; d < D; ++d) dst[d * sd] = S::store(src[d] * mul);
  }
}

template <class S>
TT_INLINE void store_zero_row(typename S::T* dst, int64_t sd, int64_t D) {
  for (int64_t d = 0; d < D; ++d) dst[d * sd] = S::store(0.f);
}

// Attended keys of an item: fills kidx with their original indices (or leaves it empty when
// every key is attended) and returns their count.
int64_t key_index(const Ctx& cx, const Item& it, std::vector<int32_t>& kidx) {
  kidx.clear();
  const AttnProblem& p = *cx.p;
  if (!p.key_mask) return it.lk;
  const uint8_t* m = p.key_mask + it.b * p.mask_sb;
  int64_t n = 0;
  for (int64_t j = 0; j < it.lk; ++j) n += m[j * p.mask_sk] != 0;
  if (n == it.lk) return n;
  kidx.reserve(size_t(it.lk));
  for (int64_t j = 0; j < it.lk; ++j)
    if (m[j * p.mask_sk] != 0) kidx.push_back(int32_t(j));
  return n;
}

// Number of compacted keys visible to query i (causal: original key index <= i + lk - lq).
TT_INLINE int32_t visible(const Ctx& cx, const Item& it, const int32_t* kidx, int64_t lkc, int64_t i) {
  if (!cx.p->causal) return int32_t(lkc);
  const int64_t lim = i + it.lk - it.lq;  // last visible original key
  if (lim < 0) return 0;
  if (!kidx) return int32_t(std::min(lkc, lim + 1));
  return int32_t(std::upper_bound(kidx, kidx + lkc, int32_t(std::min<int64_t>(lim, it.lk))) - kidx);
}

// Dropout multipliers of head h for the positions of query rows [i0, i0 + m); returns the first
// position covered (the row of query i starts at mult + i * lk - first). The W floats past the
// generated ones are zeroed: rows read up to a vector past their end.
int64_t block_mult(const Ctx& cx, const Item& it, int64_t h, int64_t i0, int64_t m, float* mult) {
  const int64_t blk0 = (i0 * it.lk) >> 2;
  const int64_t nblk = ((i0 + m) * it.lk - blk0 * 4 + 3) / 4;
  const uint32_t bh = uint32_t(it.b * cx.p->heads + h);
  cx.ops->dropout_mult(cx.drop, bh, uint32_t(blk0), nblk, mult);
  for (int w = 0; w < cx.ops->W; ++w) mult[4 * nblk + w] = 0.f;
  return blk0 * 4;
}

size_t mult_floats(const Ctx& cx, const Item& it, int64_t bm) {
  return cx.dropout ? size_t(bm * it.lk + 8 + cx.ops->W) : 0;
}

template <class S>
void forward_item(const Ctx& cx, const Item& it, Scratch& sc) {
  const AttnProblem& p = *cx.p;
  const IsaOps& ops = *cx.ops;
  const int W = ops.W;
  const int64_t D = p.head_dim, b = it.b, G = it.nh;
  const int64_t lkc = key_index(cx, it, sc.i32);
  const int32_t* kidx = sc.i32.empty() ? nullptr : sc.i32.data();
  auto lse_at = [&](int64_t h, int64_t row) {
    return static_cast<float*>(cx.lse.ptr) + b * cx.lse.sb + h * cx.lse.sh + row * cx.lse.sr;
  };
  if (lkc == 0) {  // no key: zeros and -inf
    for (int64_t i = 0; i < it.lq; ++i)
      for (int64_t g = 0; g < G; ++g) {
        store_zero_row<S>(elem_ptr_mut<S>(cx.out, b, it.h0 + g, it.q0 + i), cx.out.sd, D);
        *lse_at(it.h0 + g, it.q0 + i) = kNegInf;
      }
    return;
  }
  const int64_t Dn = round_up(D, W), ldd = lead_dim(D, W);
  const int64_t lkn = round_up(lkc, W), lks = lead_dim(lkc, W);
  const int64_t bm = std::min(block_rows(lks, ops.MR), std::max<int64_t>(it.lq, 1));
  const size_t mult_n = mult_floats(cx, it, bm);
  const size_t need = size_t(G * (D * lks + 2 * lkc * ldd + 2 * bm * ldd + bm + 16) + bm * lks + lks + 4 * bm + 64) +
                      mult_n + kCarveSlack;
  Carve cv{sc.floats(need), need};
  float* KT = cv.take(size_t(G * D * lks));   // head g: KT + g * D * lks, (D x lks)
  float* Kst = cv.take(size_t(G * lkc * ldd));  // head g: K rows (lkc x ldd), transposed into KT
  float* Vp = cv.take(size_t(G * lkc * ldd));  // head g: (lkc x ldd)
  float* Qb = cv.take(size_t(G * bm * ldd));   // head g: (bm x ldd)
  float* Ob = cv.take(size_t(G * bm * ldd));
  const int64_t bms = round_up(bm, 16);  // row_stats works in whole vectors
  float* inv_sum = cv.take(size_t(G * bms));
  float* row_max = cv.take(size_t(bms));
  float* row_sum = cv.take(size_t(bms));
  float* row_lse = cv.take(size_t(bms));
  float* Sb = cv.take(size_t(bm * lks));
  float* tmp = cv.take(size_t(lks));
  float* mult = cx.dropout ? cv.take(mult_n) : nullptr;
  int32_t* ncnt = reinterpret_cast<int32_t*>(cv.take(size_t(bm)));

  // Pack K^T and V of every head, one token row (all heads) at a time.
  for (int64_t jc = 0; jc < lkc; ++jc) {
    const int64_t j = kidx ? kidx[jc] : jc;
    for (int64_t g = 0; g < G; ++g) {
      load_row<S>(elem_ptr<S>(cx.k, b, it.h0 + g, it.k0 + j), cx.k.sd, D, Kst + (g * lkc + jc) * ldd, ldd);
      load_row<S>(elem_ptr<S>(cx.v, b, it.h0 + g, it.k0 + j), cx.v.sd, D, Vp + (g * lkc + jc) * ldd, ldd);
    }
  }
  for (int64_t g = 0; g < G; ++g) ops.transpose(Kst + g * lkc * ldd, ldd, lkc, D, KT + g * D * lks, lks);
  for (int64_t dd = 0; dd < G * D; ++dd)
    for (int64_t jc = lkc; jc < lks; ++jc) KT[dd * lks + jc] = 0.f;

  const bool causal = p.causal;
  for (int64_t i0 = 0; i0 < it.lq; i0 += bm) {
    const int64_t m = std::min(bm, it.lq - i0);
    for (int64_t r = 0; r < m; ++r) {
      ncnt[r] = visible(cx, it, kidx, lkc, i0 + r);
      for (int64_t g = 0; g < G; ++g)
        load_row<S>(elem_ptr<S>(cx.q, b, it.h0 + g, it.q0 + i0 + r), cx.q.sd, D, Qb + (g * bm + r) * ldd, ldd);
    }
    for (int64_t g = 0; g < G; ++g) {
      const int64_t h = it.h0 + g;
      Gemm gs;
      gs.M = m, gs.N = lkn, gs.K = D, gs.a = Qb + g * bm * ldd, gs.lda = ldd, gs.b = KT + g * D * lks, gs.ldb = lks;
      gs.c = Sb, gs.ldc = lks, gs.row_ncol = causal ? ncnt : nullptr;
      ops.gemm(gs);
      int64_t first = 0;
      if (mult) first = block_mult(cx, it, h, i0, m, mult);
      for (int64_t r = 0; r < m; ++r) {
        const int64_t i = i0 + r;
        const float* mrow = mult ? mult + (i * it.lk - first) : nullptr;
        const RowStat st = ops.fwd_row(Sb + r * lks, ncnt[r], lkn, cx.c, mrow, kidx, tmp);
        row_max[r] = st.max;
        row_sum[r] = st.sum;
      }
      for (int64_t r = m; r < round_up(m, W); ++r) row_max[r] = row_sum[r] = 0.f;
      ops.row_stats(row_max, row_sum, m, float(p.scale), row_lse, inv_sum + g * bms);
      for (int64_t r = 0; r < m; ++r) *lse_at(h, it.q0 + i0 + r) = row_lse[r];
      Gemm go;
      go.M = m, go.N = Dn, go.K = lkc, go.a = Sb, go.lda = lks, go.b = Vp + g * lkc * ldd, go.ldb = ldd;
      go.c = Ob + g * bm * ldd, go.ldc = ldd, go.row_kend = causal ? ncnt : nullptr;
      ops.gemm(go);
    }
    for (int64_t r = 0; r < m; ++r)
      for (int64_t g = 0; g < G; ++g)
        store_row<S>(elem_ptr_mut<S>(cx.out, b, it.h0 + g, it.q0 + i0 + r), cx.out.sd, D, Ob + (g * bm + r) * ldd,
                     inv_sum[g * bms + r]);
  }
}

template <class S>
void backward_item(const Ctx& cx, const Item& it, Scratch& sc) {
  const AttnProblem& p = *cx.p;
  const IsaOps& ops = *cx.ops;
  const int W = ops.W;
  const int64_t D = p.head_dim, b = it.b, G = it.nh;
  const float scale = float(p.scale);
  const int64_t lkc = key_index(cx, it, sc.i32);
  const int32_t* kidx = sc.i32.empty() ? nullptr : sc.i32.data();
  const int64_t Dn = round_up(D, W), ldd = lead_dim(D, W);
  const int64_t lkn = round_up(std::max<int64_t>(lkc, 1), W), lks = lead_dim(lkc, W);
  const int64_t bm = std::min(block_rows(lks, ops.MR), std::max<int64_t>(it.lq, 1));
  const size_t mult_n = mult_floats(cx, it, bm);
  const size_t need = size_t(G * (2 * D * lks + 3 * lkc * ldd + 3 * bm * ldd + 2 * bm) + bm * ldd + ldd +
                             3 * bm * lks + lks + bm + lkc) +
                      mult_n + kCarveSlack;
  Carve cv{sc.floats(need), need};
  float* KT = cv.take(size_t(G * D * lks));  // per head: (D x lks)
  float* VT = cv.take(size_t(G * D * lks));
  float* Kp = cv.take(size_t(G * lkc * ldd));  // per head: (lkc x ldd)
  float* dKa = cv.take(size_t(G * lkc * ldd));
  float* dVa = cv.take(size_t(G * lkc * ldd));
  float* Qb = cv.take(size_t(G * bm * ldd));  // per head: (bm x ldd)
  float* dOb = cv.take(size_t(G * bm * ldd));
  float* lse2 = cv.take(size_t(G * bm));
  float* delta = cv.take(size_t(G * bm));
  float* dQb = cv.take(size_t(bm * ldd));
  float* rowbuf = cv.take(size_t(ldd));
  float* Sb = cv.take(size_t(bm * lks));
  float* dPb = cv.take(size_t(bm * lks));
  float* Zb = cx.dropout ? cv.take(size_t(bm * lks)) : nullptr;
  float* tmp = cv.take(size_t(lks));
  float* mult = cx.dropout ? cv.take(mult_n) : nullptr;
  int32_t* ncnt = reinterpret_cast<int32_t*>(cv.take(size_t(bm)));
  int32_t* rcnt = reinterpret_cast<int32_t*>(cv.take(size_t(bm)));
  int32_t* kbeg = reinterpret_cast<int32_t*>(cv.take(size_t(lkc)));

  // K rows into Kp, V rows staged in dKa (zeroed below), both transposed into KT / VT.
  for (int64_t jc = 0; jc < lkc; ++jc) {
    const int64_t j = kidx ? kidx[jc] : jc;
    for (int64_t g = 0; g < G; ++g) {
      load_row<S>(elem_ptr<S>(cx.k, b, it.h0 + g, it.k0 + j), cx.k.sd, D, Kp + (g * lkc + jc) * ldd, ldd);
      load_row<S>(elem_ptr<S>(cx.v, b, it.h0 + g, it.k0 + j), cx.v.sd, D, dKa + (g * lkc + jc) * ldd, ldd);
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    ops.transpose(Kp + g * lkc * ldd, ldd, lkc, D, KT + g * D * lks, lks);
    ops.transpose(dKa + g * lkc * ldd, ldd, lkc, D, VT + g * D * lks, lks);
  }
  for (int64_t dd = 0; dd < G * D; ++dd)
    for (int64_t jc = lkc; jc < lks; ++jc) KT[dd * lks + jc] = VT[dd * lks + jc] = 0.f;
  std::memset(dKa, 0, sizeof(float) * size_t(G * lkc * ldd));
  std::memset(dVa, 0, sizeof(float) * size_t(G * lkc * ldd));

  const bool causal = p.causal;
  for (int64_t i0 = 0; i0 < it.lq; i0 += bm) {
    const int64_t m = std::min(bm, it.lq - i0);
    for (int64_t r = 0; r < m; ++r) {
      const int64_t row = it.q0 + i0 + r;
      ncnt[r] = lkc == 0 ? 0 : visible(cx, it, kidx, lkc, i0 + r);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = it.h0 + g;
        const float l = static_cast<const float*>(cx.lse.ptr)[b * cx.lse.sb + h * cx.lse.sh + row * cx.lse.sr];
        // A row the forward found empty (lse = -inf) gets no gradient; a NaN lse (inf / NaN in the
        // inputs) flows into the gradients as NaN, as in the reference.
        lse2[g * bm + r] = l * kLog2e;
        float* q_r = Qb + (g * bm + r) * ldd;
        float* do_r = dOb + (g * bm + r) * ldd;
        load_row<S>(elem_ptr<S>(cx.q, b, h, row), cx.q.sd, D, q_r, ldd);
        load_row<S>(elem_ptr<S>(cx.dout, b, h, row), cx.dout.sd, D, do_r, ldd);
        load_row<S>(elem_ptr<S>(cx.out, b, h, row), cx.out.sd, D, rowbuf, ldd);
        delta[g * bm + r] = dot8(do_r, rowbuf, ldd);
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      const int64_t h = it.h0 + g;
      float* q_g = Qb + g * bm * ldd;
      float* do_g = dOb + g * bm * ldd;
      if (lkc > 0) {
        for (int64_t r = 0; r < m; ++r) rcnt[r] = lse2[g * bm + r] == kNegInf ? 0 : ncnt[r];
        Gemm gs;
        gs.M = m, gs.N = lkn, gs.K = D, gs.a = q_g, gs.lda = ldd, gs.b = KT + g * D * lks, gs.ldb = lks;
        gs.c = Sb, gs.ldc = lks, gs.row_ncol = causal ? rcnt : nullptr;
        ops.gemm(gs);
        Gemm gp = gs;
        gp.a = do_g, gp.b = VT + g * D * lks, gp.c = dPb;
        ops.gemm(gp);
        int64_t first = 0;
        if (mult) first = block_mult(cx, it, h, i0, m, mult);
        for (int64_t r = 0; r < m; ++r) {
          const int64_t i = i0 + r;
          const float* mrow = mult ? mult + (i * it.lk - first) : nullptr;
          ops.bwd_row(Sb + r * lks, dPb + r * lks, Zb ? Zb + r * lks : nullptr, rcnt[r], lkn, cx.c,
                      lse2[g * bm + r], delta[g * bm + r], mrow, kidx, tmp);
        }
        // dV += (P Z)^T dO and dK += dS^T Q over the block's queries; with causal masking, key jc
        // gets contributions only from the rows that see it (rows r >= kbeg[jc]).
        if (causal) {
          int64_t r = 0;
          for (int64_t jc = 0; jc < lkc; ++jc) {
            while (r < m && rcnt[r] <= jc) ++r;
            kbeg[jc] = int32_t(r);
          }
        }
        Gemm gv;
        gv.M = lkc, gv.N = Dn, gv.K = m, gv.a = Zb ? Zb : Sb, gv.lda = lks, gv.trans_a = true, gv.b = do_g;
        gv.ldb = ldd, gv.c = dVa + g * lkc * ldd, gv.ldc = ldd, gv.accumulate = true;
        gv.row_kbeg = causal ? kbeg : nullptr;
        ops.gemm(gv);
        Gemm gk = gv;
        gk.a = dPb, gk.b = q_g, gk.c = dKa + g * lkc * ldd;
        ops.gemm(gk);
        Gemm gq;
        gq.M = m, gq.N = Dn, gq.K = lkc, gq.a = dPb, gq.lda = lks, gq.b = Kp + g * lkc * ldd, gq.ldb = ldd;
        gq.c = dQb, gq.ldc = ldd, gq.row_kend = causal ? rcnt : nullptr;
        ops.gemm(gq);
      }
      for (int64_t r = 0; r < m; ++r) {
        auto* dst = elem_ptr_mut<S>(cx.dq, b, h, it.q0 + i0 + r);
        if (lkc > 0)
          store_row<S>(dst, cx.dq.sd, D, dQb + r * ldd, scale);
        else
          store_zero_row<S>(dst, cx.dq.sd, D);
      }
    }
  }
  // dK, dV rows of every key of the sequence (zeros for masked keys); compacted key jc holds
  // original key kidx[jc], or j itself when every key is attended.
  int64_t jc = 0;
  for (int64_t j = 0; j < it.lk; ++j) {
    const bool present = jc < lkc && (kidx ? kidx[jc] == j : true);
    for (int64_t g = 0; g < G; ++g) {
      auto* dk_row = elem_ptr_mut<S>(cx.dk, b, it.h0 + g, it.k0 + j);
      auto* dv_row = elem_ptr_mut<S>(cx.dv, b, it.h0 + g, it.k0 + j);
      if (present) {
        store_row<S>(dk_row, cx.dk.sd, D, dKa + (g * lkc + jc) * ldd, scale);
        store_row<S>(dv_row, cx.dv.sd, D, dVa + (g * lkc + jc) * ldd, 1.f);
      } else {
        store_zero_row<S>(dk_row, cx.dk.sd, D);
        store_zero_row<S>(dv_row, cx.dv.sd, D);
      }
    }
    if (present) ++jc;
  }
}

// ------------------------------------------------------------------ driver

void check(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("attention: " + msg);
}

// Scratch floats a group of heads may use: its panels stay in a core's L2.
constexpr int64_t kGroupFloats = 80 * 1024;

std::vector<Item> make_items(const AttnProblem& p, const IsaOps& ops, bool backward) {
  check(p.dtype == kFloat32 || p.dtype == kFloat16 || p.dtype == kBFloat16,
        "dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16), got " + std::to_string(int(p.dtype)));
  check(p.batch >= 0 && p.heads >= 0, "batch and heads must be >= 0");
  check(p.head_dim >= 1, "head_dim must be >= 1, got " + std::to_string(p.head_dim));
  check(p.dropout_p >= 0.0 && p.dropout_p < 1.0, "dropout_p must be in [0, 1)");
  check(p.dropout_threshold <= (1u << 24), "dropout threshold must be <= 2^24");
  check(std::isfinite(p.scale), "scale must be finite");
  check(!(p.cu_q && p.key_mask), "a key mask is only supported for dense inputs");
  constexpr int64_t kMaxLen = std::numeric_limits<int32_t>::max();
  std::vector<int64_t> lq(size_t(p.batch)), lk(size_t(p.batch)), q0(size_t(p.batch), 0), k0(size_t(p.batch), 0);
  if (p.cu_q) {
    check(p.cu_k != nullptr, "cu_seqlens_k is missing");
    check(p.total_q >= 0 && p.total_k >= 0, "total rows must be >= 0");
    for (int i = 0; i < 2; ++i) {
      const int32_t* cu = i == 0 ? p.cu_q : p.cu_k;
      const int64_t total = i == 0 ? p.total_q : p.total_k;
      const std::string name = i == 0 ? "cu_seqlens_q" : "cu_seqlens_k";
      check(cu[0] == 0, name + "[0] must be 0, got " + std::to_string(cu[0]));
      for (int64_t s = 0; s < p.batch; ++s)
        check(cu[s + 1] >= cu[s], name + " must be non-decreasing (entry " + std::to_string(s + 1) + ")");
      check(cu[p.batch] == total,
            name + "[-1] = " + std::to_string(cu[p.batch]) + " must equal the number of rows " + std::to_string(total));
    }
    for (int64_t s = 0; s < p.batch; ++s) {
      q0[size_t(s)] = p.cu_q[s], lq[size_t(s)] = p.cu_q[s + 1] - p.cu_q[s];
      k0[size_t(s)] = p.cu_k[s], lk[size_t(s)] = p.cu_k[s + 1] - p.cu_k[s];
    }
  } else {
    check(p.seqlen_q >= 0 && p.seqlen_k >= 0 && p.seqlen_q <= kMaxLen && p.seqlen_k <= kMaxLen,
          "seqlen_q and seqlen_k must be in [0, 2^31)");
    std::fill(lq.begin(), lq.end(), p.seqlen_q);
    std::fill(lk.begin(), lk.end(), p.seqlen_k);
  }
  // Group heads while a group's panels fit kGroupFloats, but keep >= 4 items per thread.
  const int64_t threads = std::max(1, p.num_threads);
  const int64_t by_parallelism = std::max<int64_t>(1, p.batch * p.heads / (4 * threads));
  std::vector<Item> items;
  items.reserve(size_t(p.batch * p.heads));
  const double dcost = double(p.head_dim) + 8.0;
  for (int64_t s = 0; s < p.batch; ++s) {
    const size_t i = size_t(s);
    // Forward: an item with no query rows writes nothing. Backward: it still zeroes dK / dV.
    if (p.heads == 0 || (lq[i] == 0 && (!backward || lk[i] == 0))) continue;
    const int64_t per_head = head_floats(p.head_dim, lk[i], lq[i], ops.W, ops.MR, backward);
    const int64_t gmax = std::clamp<int64_t>(kGroupFloats / std::max<int64_t>(per_head, 1), 1,
                                             std::min(p.heads, by_parallelism));
    const int64_t ngroups = (p.heads + gmax - 1) / gmax;
    const double head_cost = double(lq[i]) * double(lk[i]) * dcost + double(lq[i] + lk[i]) * double(p.head_dim);
    for (int64_t gidx = 0; gidx < ngroups; ++gidx) {
      const int64_t h0 = p.heads * gidx / ngroups, h1 = p.heads * (gidx + 1) / ngroups;
      items.push_back({s, h0, h1 - h0, q0[i], k0[i], lq[i], lk[i], head_cost * double(h1 - h0)});
    }
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
  return items;
}

Ctx make_ctx(const AttnProblem& p, const IsaOps& ops) {
  Ctx cx{};
  cx.p = &p;
  cx.ops = &ops;
  cx.c = float(p.scale * 1.4426950408889634);
  cx.dropout = p.dropout_p > 0.0;
  cx.drop.k0 = uint32_t(p.seed & 0xFFFFFFFFu);
  cx.drop.k1 = uint32_t(p.seed >> 32);
  cx.drop.offset = p.offset;
  cx.drop.threshold = p.dropout_threshold;
  cx.drop.keep_scale = float(1.0 / (1.0 - p.dropout_p));
  return cx;
}

using ItemFn = void (*)(const Ctx&, const Item&, Scratch&);

void run_items(const Ctx& cx, const std::vector<Item>& items, ItemFn fn) {
  const int64_t n = int64_t(items.size());
  if (n == 0) return;
  double total = 0.0;
  for (const Item& it : items) total += it.cost;
  int threads = std::max(1, cx.p->num_threads);
  if (total < 2e5) threads = 1;  // a few microseconds of work: a parallel region costs more
  threads = int(std::min<int64_t>(threads, n));
  std::exception_ptr err = nullptr;
#ifdef TURBOTUNE_WITH_OPENMP
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    {
      Scratch& sc = scratch();
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < n; ++i) {
        try {
          fn(cx, items[size_t(i)], sc);
        } catch (...) {
#pragma omp critical(turbotune_attention_error)
          if (!err) err = std::current_exception();
        }
      }
      sc.trim();
    }
    if (err) std::rethrow_exception(err);
    return;
  }
#endif
  Scratch& sc = scratch();
  for (int64_t i = 0; i < n; ++i) fn(cx, items[size_t(i)], sc);
  sc.trim();
}

template <template <class> class Fn>
ItemFn by_dtype(DType d) {
  switch (d) {
    case kFloat16:
      return &Fn<F16>::run;
    case kBFloat16:
      return &Fn<BF16>::run;
    default:
      return &Fn<F32>::run;
  }
}

template <class S>
struct FwdFn {
  static void run(const Ctx& cx, const Item& it, Scratch& sc) { forward_item<S>(cx, it, sc); }
};
template <class S>
struct BwdFn {
  static void run(const Ctx& cx, const Item& it, Scratch& sc) { backward_item<S>(cx, it, sc); }
};

}  // namespace

void attention_forward(const AttnProblem& p, const AttnView& q, const AttnView& k, const AttnView& v,
                       const AttnView& out, const AttnView& lse) {
  const IsaOps& ops = pick_ops(p.simd);
  std::vector<Item> items = make_items(p, ops, false);
  if (items.empty()) return;
  Ctx cx = make_ctx(p, ops);
  cx.q = q, cx.k = k, cx.v = v, cx.out = out, cx.lse = lse;
  run_items(cx, items, by_dtype<FwdFn>(p.dtype));
}

void attention_backward(const AttnProblem& p, const AttnView& dout, const AttnView& q, const AttnView& k,
                        const AttnView& v, const AttnView& out, const AttnView& lse, const AttnView& dq,
                        const AttnView& dk, const AttnView& dv) {
  const IsaOps& ops = pick_ops(p.simd);
  std::vector<Item> items = make_items(p, ops, true);
  if (items.empty()) return;
  Ctx cx = make_ctx(p, ops);
  cx.q = q, cx.k = k, cx.v = v, cx.out = out, cx.lse = lse, cx.dout = dout, cx.dq = dq, cx.dk = dk, cx.dv = dv;
  run_items(cx, items, by_dtype<BwdFn>(p.dtype));
}

void attention_dropout_mask(uint8_t* mask, int64_t bh0, int64_t n_heads, int64_t seqlen_q, int64_t seqlen_k,
                            uint32_t threshold, uint64_t seed, uint32_t offset, const char* simd) {
  check(n_heads >= 0 && seqlen_q >= 0 && seqlen_k >= 0 && bh0 >= 0, "sizes must be >= 0");
  check(threshold <= (1u << 24), "dropout threshold must be <= 2^24");
  const int64_t n = seqlen_q * seqlen_k;
  if (n == 0 || n_heads == 0) return;
  check(mask != nullptr, "mask is a null pointer");
  const IsaOps& ops = pick_ops(simd);
  Dropout d;
  d.k0 = uint32_t(seed & 0xFFFFFFFFu), d.k1 = uint32_t(seed >> 32), d.offset = offset, d.threshold = threshold;
  d.keep_scale = 1.f;
  constexpr int64_t kBlocks = 4096;
  std::vector<float> buf(size_t(kBlocks * 4));
  for (int64_t hh = 0; hh < n_heads; ++hh) {
    uint8_t* out = mask + hh * n;
    for (int64_t pos = 0; pos < n; pos += kBlocks * 4) {
      const int64_t cnt = std::min(kBlocks * 4, n - pos);
      ops.dropout_mult(d, uint32_t(bh0 + hh), uint32_t(pos >> 2), (cnt + 3) / 4, buf.data());
      for (int64_t t = 0; t < cnt; ++t) out[pos + t] = buf[size_t(t)] != 0.f;
    }
  }
}

const char* attention_simd_variant(const char* simd) { return pick_ops(simd).name; }

}  // namespace cpu
}  // namespace turbotune
