// CPU AdamW and multi-tensor clipping kernels (see adamw.h).
//
// Structure:
//   * storage types (fp32 / fp16 / bf16): cpu/half.h, branch-free conversions
//     so the per-element loop vectorises;
//   * one templated element loop per (param, state, master, amsgrad, stochastic
//     rounding, grad write-back) combination, compiled three times — AVX-512,
//     AVX2+FMA+F16C and generic x86-64 — through target attributes, picked once
//     at run time;
//   * the multi-tensor driver: every tensor is cut into fixed-size chunks and
//     all chunks of all tensors are shared by one OpenMP parallel region (each
//     thread streams the same number of elements), so many small tensors cost
//     one parallel region, not one each.
//
// The update follows torch.optim.AdamW (single-tensor path) operation by
// operation, in fp32, with fused multiply-adds exactly where ATen's CPU
// kernels use them (lerp and addcmul) and nowhere else (the file is compiled
// with -ffp-contract=off), so fp32 results match torch bit for bit or within
// an ulp:
//   g   = (grad * 1/scale) * (+-clip)                 (1/scale stored back when asked)
//   p   = p * (1 - lr * wd)
//   m   = fma(1 - b1, g - m, m)                       (lerp)
//   v   = fma((1 - b2) * g, g, v * b2)                (addcmul)
//   vm  = max(vmax, v)                                (amsgrad)
//   den = sqrt(v or vm) / sqrt(1 - b2^t) + eps
//   p   = p + (-lr / (1 - b1^t)) * m / den
#include "cpu/adamw.h"
#include "cpu/half.h"
#include "cpu/simd.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef TURBOTUNE_WITH_OPENMP
#include <omp.h>
#endif

namespace turbotune {
namespace cpu {
namespace {

constexpr int64_t kChunk = 32768;            // elements per parallel work item
constexpr int64_t kSerialBelow = 1 << 16;    // total elements below which one thread does it all

// ------------------------------------------------------------------ AdamW element loop

struct Coef {
  float unscale;   // 1 / grad_scale (1 without GradScaler); the unscaled grad is what write_grad stores
  float gmul;      // +-clip coefficient (negative when maximizing; +-1 without clipping)
  float decay;     // 1 - lr * wd
  float w1;        // 1 - beta1
  float beta2;
  float w2;        // 1 - beta2
  float bc2_sqrt;  // sqrt(1 - beta2^t)
  float eps;
  float neg_step;  // -lr / (1 - beta1^t)
  uint32_t seed;   // sr::tensor_seed, stochastic rounding only
};

struct Slice {
  void* p;
  void* g;
  void* m;
  void* v;
  void* vmax;
  float* master;
  int64_t begin;
  int64_t len;
  Coef c;
};

template <typename P, typename S, bool kMaster, bool kAms, bool kSR, bool kWG>
TT_INLINE void adamw_body(const Slice& s) {
  using PT = typename P::T;
  using ST = typename S::T;
  PT* __restrict p = static_cast<PT*>(s.p) + s.begin;
  PT* __restrict g = static_cast<PT*>(s.g) + s.begin;
  ST* __restrict m = static_cast<ST*>(s.m) + s.begin;
  ST* __restrict v = static_cast<ST*>(s.v) + s.begin;
  ST* __restrict vmax = kAms ? static_cast<ST*>(s.vmax) + s.begin : nullptr;
  float* __restrict master = kMaster ? s.master + s.begin : nullptr;
  const Coef c = s.c;
  const uint32_t base = uint32_t(s.begin);
  const int64_t n = s.len;
  for (int64_t i = 0; i < n; ++i) {
    const float unscaled = P::load(g[i]) * c.unscale;  // x * 1 is exact: no bit changes without a scaler
    if (kWG) g[i] = P::store(unscaled);
    const float grad = unscaled * c.gmul;
    float param = kMaster ? master[i] : P::load(p[i]);
    param = param * c.decay;
    float mi = S::load(m[i]);
    mi = __builtin_fmaf(c.w1, grad - mi, mi);
    float vi = S::load(v[i]) * c.beta2;
    vi = __builtin_fmaf(c.w2 * grad, grad, vi);
    const ST m_st = S::store(mi);
    const ST v_st = S::store(vi);
    m[i] = m_st;
    v[i] = v_st;
    float vhat = S::load(v_st);
    if (kAms) {
      const float vm = S::load(vmax[i]);
      vhat = (vm > vhat || vm != vm) ? vm : vhat;  // NaN in either propagates, as torch.maximum
      vmax[i] = S::store(vhat);
    }
    const float denom = std::sqrt(vhat) / c.bc2_sqrt + c.eps;
    param = param + c.neg_step * S::load(m_st) / denom;
    if (kMaster) {
      master[i] = param;
      p[i] = P::store(param);
    } else if (kSR) {
      p[i] = sr::round_bf16_stochastic(f2u(param), sr::element_bits(c.seed, base + uint32_t(i)));
    } else {
      p[i] = P::store(param);
    }
  }
}

using SliceFn = void (*)(const Slice&);

template <typename P, typename S, bool kMaster, bool kAms, bool kSR, bool kWG>
void adamw_generic(const Slice& s) {
  adamw_body<P, S, kMaster, kAms, kSR, kWG>(s);
}
#ifdef TT_X86
template <typename P, typename S, bool kMaster, bool kAms, bool kSR, bool kWG>
TT_TARGET_AVX2 void adamw_avx2(const Slice& s) {
  adamw_body<P, S, kMaster, kAms, kSR, kWG>(s);
}
template <typename P, typename S, bool kMaster, bool kAms, bool kSR, bool kWG>
TT_TARGET_AVX512 void adamw_avx512(const Slice& s) {
  adamw_body<P, S, kMaster, kAms, kSR, kWG>(s);
}
#endif

enum class Isa { kGeneric, kAvx2, kAvx512 };

// TURBOTUNE_CPU_SIMD=generic|avx2|avx512 caps the variant (tests, bug reports).
Isa detect_isa() {
  Isa cap = Isa::kAvx512;
  if (const char* env = std::getenv("TURBOTUNE_CPU_SIMD")) {
    const std::string v(env);
    if (v == "generic") cap = Isa::kGeneric;
    else if (v == "avx2") cap = Isa::kAvx2;
  }
  Isa best = Isa::kGeneric;
#ifdef TT_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    best = Isa::kAvx512;
  else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    best = Isa::kAvx2;
#endif
  return static_cast<int>(best) < static_cast<int>(cap) ? best : cap;
}

Isa isa() {
  static const Isa v = detect_isa();
  return v;
}

template <typename P, typename S, bool kMaster, bool kAms, bool kSR, bool kWG>
SliceFn pick_isa() {
#ifdef TT_X86
  switch (isa()) {
    case Isa::kAvx512:
      return &adamw_avx512<P, S, kMaster, kAms, kSR, kWG>;
    case Isa::kAvx2:
      return &adamw_avx2<P, S, kMaster, kAms, kSR, kWG>;
    default:
      break;
  }
#endif
  return &adamw_generic<P, S, kMaster, kAms, kSR, kWG>;
}

template <typename P, typename S, bool kMaster, bool kSR>
SliceFn pick_ams(bool ams, bool wg) {
  if (ams) return wg ? pick_isa<P, S, kMaster, true, kSR, true>() : pick_isa<P, S, kMaster, true, kSR, false>();
  return wg ? pick_isa<P, S, kMaster, false, kSR, true>() : pick_isa<P, S, kMaster, false, kSR, false>();
}

template <typename P, typename S, bool kMaster>
SliceFn pick_flags(bool ams, bool sr, bool wg) {
  if (sr) {
    if constexpr (std::is_same<P, BF16>::value && !kMaster) {
      return pick_ams<P, S, false, true>(ams, wg);
    } else {
      throw std::invalid_argument("stochastic_rounding needs bf16 params without master weights");
    }
  }
  return pick_ams<P, S, kMaster, false>(ams, wg);
}

template <typename P, typename S>
SliceFn pick_master(bool master, bool ams, bool sr, bool wg) {
  if (master) {
    if constexpr (std::is_same<P, F32>::value) {
      throw std::invalid_argument("master weights are only kept for fp16/bf16 params");
    } else {
      return pick_flags<P, S, true>(ams, sr, wg);
    }
  }
  return pick_flags<P, S, false>(ams, sr, wg);
}

template <typename P>
SliceFn pick_state(DType state, bool master, bool ams, bool sr, bool wg) {
  switch (state) {
    case kFloat32:
      return pick_master<P, F32>(master, ams, sr, wg);
    case kBFloat16:
      return pick_master<P, BF16>(master, ams, sr, wg);
    default:
      throw std::invalid_argument("state dtype must be float32 or bfloat16, got code " + std::to_string(state));
  }
}

SliceFn pick(DType param, DType state, bool master, bool ams, bool sr, bool wg) {
  switch (param) {
    case kFloat32:
      return pick_state<F32>(state, master, ams, sr, wg);
    case kFloat16:
      return pick_state<F16>(state, master, ams, sr, wg);
    case kBFloat16:
      return pick_state<BF16>(state, master, ams, sr, wg);
    default:
      throw std::invalid_argument("param dtype must be float32, float16 or bfloat16, got code " +
                                  std::to_string(param));
  }
}

// ------------------------------------------------------------------ multi-tensor driver

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t len;
};

std::vector<Chunk> make_chunks(int64_t n, const int64_t* numel, int64_t* total_out) {
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (int64_t t = 0; t < n; ++t) {
    if (numel[t] < 0) throw std::invalid_argument("negative numel for tensor " + std::to_string(t));
    total += numel[t];
    for (int64_t b = 0; b < numel[t]; b += kChunk) chunks.push_back({t, b, std::min(kChunk, numel[t] - b)});
  }
  *total_out = total;
  return chunks;
}

// Work split between the OpenMP threads. Default ("balanced"): each thread takes
// the chunks whose first element falls in its 1/T of all elements, so every
// thread streams the same number of bytes (within one chunk). "chunks" (the
// split before issue 8): each thread takes 1/T of the chunks; a mix of big and
// tiny tensors then gives one thread more bytes (8.9% above the mean on the
// MiniLM parameter mix). TURBOTUNE_CPU_SCHEDULE=chunks selects the old split,
// read at every call, for benchmarks and bug reports.
bool chunk_count_schedule() {
  const char* env = std::getenv("TURBOTUNE_CPU_SCHEDULE");
  return env != nullptr && std::strcmp(env, "chunks") == 0;
}

template <typename F>
void parallel_chunks(const std::vector<Chunk>& chunks, int64_t total, F&& f) {
  const int64_t nc = static_cast<int64_t>(chunks.size());
#ifdef TURBOTUNE_WITH_OPENMP
  if (total >= kSerialBelow && nc > 1) {
    if (chunk_count_schedule()) {
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < nc; ++i) f(chunks[i]);
      return;
    }
    std::vector<int64_t> start(nc + 1, 0);  // element offset of each chunk in the concatenated tensors
    for (int64_t i = 0; i < nc; ++i) start[i + 1] = start[i] + chunks[i].len;
#pragma omp parallel
    {
      const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
      const auto first_at_or_after = [&](int64_t e) {
        return std::lower_bound(start.begin(), start.begin() + nc, e) - start.begin();
      };
      const int64_t lo = first_at_or_after(total * t / nt);
      const int64_t hi = t == nt - 1 ? nc : first_at_or_after(total * (t + 1) / nt);
      for (int64_t i = lo; i < hi; ++i) f(chunks[i]);
    }
    return;
  }
#endif
  (void)total;
  for (int64_t i = 0; i < nc; ++i) f(chunks[i]);
}

size_t elem_size(DType d) { return d == kFloat32 ? 4 : 2; }

}  // namespace

// ------------------------------------------------------------------ public API

void adamw_step(const AdamWTensorList& t, DType param_dtype, DType state_dtype, const AdamWHyper& h) {
  const bool master = t.master != nullptr;
  if (h.amsgrad && t.max_exp_avg_sq == nullptr) throw std::invalid_argument("amsgrad needs max_exp_avg_sq pointers");
  SliceFn fn = pick(param_dtype, state_dtype, master, h.amsgrad, h.stochastic_rounding, h.write_grad);
  if (t.n == 0) return;

  // Per-tensor coefficients, computed in double exactly as torch does in Python.
  std::vector<Coef> coef(static_cast<size_t>(t.n));
  std::vector<float> new_step(static_cast<size_t>(t.n));
  for (int64_t i = 0; i < t.n; ++i) {
    new_step[i] = *t.step[i] + 1.0f;  // fp32 increment, as torch's _foreach_add_(state_steps, 1)
    const double step = new_step[i];
    if (!(step >= 1.0)) throw std::invalid_argument("step must be >= 0 before the update for tensor " + std::to_string(i));
    const double bc1 = 1.0 - std::pow(h.beta1, step);
    const double bc2 = 1.0 - std::pow(h.beta2, step);
    Coef& c = coef[i];
    c.unscale = static_cast<float>(h.grad_unscale);
    c.gmul = static_cast<float>(h.maximize ? -h.grad_multiplier : h.grad_multiplier);
    c.decay = static_cast<float>(1.0 - h.lr * h.weight_decay);
    c.w1 = static_cast<float>(1.0 - h.beta1);
    c.beta2 = static_cast<float>(h.beta2);
    c.w2 = static_cast<float>(1.0 - h.beta2);
    c.bc2_sqrt = static_cast<float>(std::sqrt(bc2));
    c.eps = static_cast<float>(h.eps);
    c.neg_step = static_cast<float>(-(h.lr / bc1));
    c.seed = sr::tensor_seed(h.seed, static_cast<uint64_t>(i));
  }
  int64_t total = 0;
  std::vector<Chunk> chunks = make_chunks(t.n, t.numel, &total);
  for (int64_t i = 0; i < t.n; ++i) *t.step[i] = new_step[i];
  parallel_chunks(chunks, total, [&](const Chunk& ch) {
    const int64_t i = ch.tensor;
    Slice s{t.params[i],
            t.grads[i],
            t.exp_avg[i],
            t.exp_avg_sq[i],
            h.amsgrad ? t.max_exp_avg_sq[i] : nullptr,
            master ? t.master[i] : nullptr,
            ch.begin,
            ch.len,
            coef[i]};
    fn(s);
  });
}

namespace {

// Four concurrent read streams (the chunk's four quarters), each with 16 fp32
// accumulators: one core then reads ~30 GB/s instead of ~18 GB/s with a single
// sequential stream (the hardware prefetcher tracks several streams; measured on
// Zen 3), and no add chain limits the loop. The lanes and the pairwise sum are
// fixed in the source, so the result is the same for every SIMD variant and
// thread count.
template <typename D>
TT_INLINE float sumsq_body(const typename D::T* __restrict x, int64_t n) {
  constexpr int kLanes = 16;
  constexpr int kStreams = 4;
  float a0[kLanes] = {}, a1[kLanes] = {}, a2[kLanes] = {}, a3[kLanes] = {};
  const int64_t q = (n / (kStreams * kLanes)) * kLanes;  // elements per stream
  const typename D::T* __restrict x0 = x;
  const typename D::T* __restrict x1 = x + q;
  const typename D::T* __restrict x2 = x + 2 * q;
  const typename D::T* __restrict x3 = x + 3 * q;
  for (int64_t i = 0; i < q; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float f0 = D::load(x0[i + j]), f1 = D::load(x1[i + j]);
      const float f2 = D::load(x2[i + j]), f3 = D::load(x3[i + j]);
      a0[j] += f0 * f0;
      a1[j] += f1 * f1;
      a2[j] += f2 * f2;
      a3[j] += f3 * f3;
    }
  }
  for (int64_t i = kStreams * q, j = 0; i < n; ++i, ++j) {  // tail: fewer than 64 elements
    const float f = D::load(x[i]);
    a0[j % kLanes] += f * f;
  }
  for (int j = 0; j < kLanes; ++j) a0[j] = (a0[j] + a1[j]) + (a2[j] + a3[j]);
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) a0[j] += a0[j + w];
  return a0[0];
}

template <typename D>
TT_INLINE void scale_body(typename D::T* __restrict x, int64_t n, float factor) {
  for (int64_t i = 0; i < n; ++i) x[i] = D::store(D::load(x[i]) * factor);
}

template <typename D>
float sumsq_generic(const void* x, int64_t n) { return sumsq_body<D>(static_cast<const typename D::T*>(x), n); }
template <typename D>
void scale_generic(void* x, int64_t n, float f) { scale_body<D>(static_cast<typename D::T*>(x), n, f); }
#ifdef TT_X86
template <typename D>
TT_TARGET_AVX2 float sumsq_avx2(const void* x, int64_t n) { return sumsq_body<D>(static_cast<const typename D::T*>(x), n); }
template <typename D>
TT_TARGET_AVX2 void scale_avx2(void* x, int64_t n, float f) { scale_body<D>(static_cast<typename D::T*>(x), n, f); }
template <typename D>
TT_TARGET_AVX512 float sumsq_avx512(const void* x, int64_t n) { return sumsq_body<D>(static_cast<const typename D::T*>(x), n); }
template <typename D>
TT_TARGET_AVX512 void scale_avx512(void* x, int64_t n, float f) { scale_body<D>(static_cast<typename D::T*>(x), n, f); }
#endif

using SumFn = float (*)(const void*, int64_t);
using ScaleFn = void (*)(void*, int64_t, float);

template <typename D>
void pick_norm_fns(SumFn* sum, ScaleFn* scale) {
  *sum = &sumsq_generic<D>;
  *scale = &scale_generic<D>;
#ifdef TT_X86
  if (isa() == Isa::kAvx512) {
    *sum = &sumsq_avx512<D>;
    *scale = &scale_avx512<D>;
  } else if (isa() == Isa::kAvx2) {
    *sum = &sumsq_avx2<D>;
    *scale = &scale_avx2<D>;
  }
#endif
}

void norm_fns(DType d, SumFn* sum, ScaleFn* scale) {
  switch (d) {
    case kFloat32:
      return pick_norm_fns<F32>(sum, scale);
    case kFloat16:
      return pick_norm_fns<F16>(sum, scale);
    case kBFloat16:
      return pick_norm_fns<BF16>(sum, scale);
    default:
      throw std::invalid_argument("dtype must be float32, float16 or bfloat16, got code " + std::to_string(d));
  }
}

}  // namespace

double sum_of_squares(int64_t n, const void* const* ptrs, const int64_t* numel, DType dtype) {
  SumFn sum;
  ScaleFn scale;
  norm_fns(dtype, &sum, &scale);
  int64_t total = 0;
  std::vector<Chunk> chunks = make_chunks(n, numel, &total);
  std::vector<double> partial(chunks.size());
  const size_t es = elem_size(dtype);
  parallel_chunks(chunks, total, [&](const Chunk& ch) {
    const char* base = static_cast<const char*>(ptrs[ch.tensor]) + ch.begin * es;
    partial[&ch - chunks.data()] = sum(base, ch.len);
  });
  double acc = 0.0;  // fixed order: the result does not depend on the thread count
  for (double p : partial) acc += p;
  return acc;
}

void scale_inplace(int64_t n, void* const* ptrs, const int64_t* numel, DType dtype, float factor) {
  SumFn sum;
  ScaleFn scale;
  norm_fns(dtype, &sum, &scale);
  int64_t total = 0;
  std::vector<Chunk> chunks = make_chunks(n, numel, &total);
  const size_t es = elem_size(dtype);
  parallel_chunks(chunks, total, [&](const Chunk& ch) {
    scale(static_cast<char*>(ptrs[ch.tensor]) + ch.begin * es, ch.len, factor);
  });
}

const char* simd_variant() {
  switch (isa()) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "generic";
  }
}

}  // namespace cpu
}  // namespace turbotune
