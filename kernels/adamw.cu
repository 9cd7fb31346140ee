// Fused multi-tensor AdamW and gradient clipping (CUDA). Host API in cuda_api.h.
//
// One launch updates up to MaxTensors tensors / kMaxBlocks chunks; each block
// owns one 64K-element chunk, each thread kVec consecutive elements per
// iteration with 16-byte loads when every pointer of the tensor is 16-byte
// aligned (a scalar loop handles the rest). Math is fp32 whatever the storage
// dtype; bias corrections come from the per-tensor device step counter, and the
// GradScaler scale / found_inf flag are read on the device, so the host never
// waits for the GPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <type_traits>

#include "cpu/adamw.h"  // sr::*: the stochastic-rounding bits, one definition for CPU and CUDA
#include "cuda_api.h"
#include "multi_tensor.cuh"

namespace turbotune {
namespace cuda {
namespace {

using mt::kVec;
using mt::TensorListMeta;

struct DF32 {
  using T = float;
  static __device__ __forceinline__ float load(T x) { return x; }
  static __device__ __forceinline__ T store(float x) { return x; }
};
struct DF16 {
  using T = __half;
  static __device__ __forceinline__ float load(T x) { return __half2float(x); }
  static __device__ __forceinline__ T store(float x) { return __float2half_rn(x); }
};
struct DBF16 {
  using T = __nv_bfloat16;
  static __device__ __forceinline__ float load(T x) { return __bfloat162float(x); }
  static __device__ __forceinline__ T store(float x) { return __float2bfloat16_rn(x); }
};

// Stochastic rounding fp32 -> bf16 with the shared definition (same bits as the CPU kernel).
__device__ __forceinline__ __nv_bfloat16 bf16_stochastic(float f, uint32_t rnd) {
  return __ushort_as_bfloat16(sr::round_bf16_stochastic(__float_as_uint(f), rnd));
}

// max that keeps a NaN from either side, as torch.maximum and the CPU kernel (fmaxf drops it).
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

struct AdamWScalars {
  float lr, beta1, beta2, eps, weight_decay;
  double beta1_d, beta2_d, lr_d, wd_d;
  bool amsgrad, maximize;
  const float* grad_scale;
  const float* found_inf;
  const float* clip_coef;
  uint64_t seed;
};

// DEPTH: 0 param, 1 grad, 2 exp_avg, 3 exp_avg_sq, 4 max_exp_avg_sq, 5 master
constexpr int kAdamDepth = 6;

template <typename P, typename S, bool kMaster, bool kSR>
__global__ void __launch_bounds__(mt::kThreads) adamw_kernel(TensorListMeta<kAdamDepth> meta, AdamWScalars sc) {
  if (sc.found_inf != nullptr && *sc.found_inf != 0.f) return;  // GradScaler: skip this step
  using PT = typename P::T;
  using ST = typename S::T;
  const int slot = meta.block_to_tensor[blockIdx.x];
  const int64_t chunk = meta.block_to_chunk[blockIdx.x];
  const int64_t numel = meta.numel[slot];
  const int64_t begin = chunk * mt::kChunk;
  const int64_t len = min(mt::kChunk, numel - begin);

  PT* p = static_cast<PT*>(meta.addr[0][slot]) + begin;
  PT* g = static_cast<PT*>(meta.addr[1][slot]) + begin;
  ST* m = static_cast<ST*>(meta.addr[2][slot]) + begin;
  ST* v = static_cast<ST*>(meta.addr[3][slot]) + begin;
  ST* vmax = sc.amsgrad ? static_cast<ST*>(meta.addr[4][slot]) + begin : nullptr;
  float* master = kMaster ? static_cast<float*>(meta.addr[5][slot]) + begin : nullptr;

  // per-tensor coefficients (as torch: bias corrections in double)
  const double step = static_cast<double>(*meta.step[slot]);
  const double bc1 = 1.0 - pow(sc.beta1_d, step);
  const double bc2 = 1.0 - pow(sc.beta2_d, step);
  const bool write_grad = sc.grad_scale != nullptr;  // torch's fused AdamW stores the unscaled grad
  const float unscale = write_grad ? 1.0f / *sc.grad_scale : 1.0f;
  float gmul = sc.clip_coef != nullptr ? *sc.clip_coef : 1.0f;
  if (sc.maximize) gmul = -gmul;
  const float decay = static_cast<float>(1.0 - sc.lr_d * sc.wd_d);
  const float w1 = static_cast<float>(1.0 - sc.beta1_d);
  const float beta2 = sc.beta2;
  const float w2 = static_cast<float>(1.0 - sc.beta2_d);
  const float bc2_sqrt = static_cast<float>(sqrt(bc2));
  const float neg_step = static_cast<float>(-(sc.lr_d / bc1));
  const float eps = sc.eps;
  const uint32_t tseed = sr::tensor_seed(sc.seed, static_cast<uint64_t>(meta.tensor_index[slot]));

  // grad: already unscaled (and written back when write_grad)
  auto update = [&](float param, float grad, float mi, float vi, float vm, float& po, float& mo, float& vo,
                    float& vmo) {
    grad = __fmul_rn(grad, gmul);
    param *= decay;
    mi = fmaf(w1, grad - mi, mi);
    vi = fmaf(w2 * grad, grad, vi * beta2);
    mo = S::load(S::store(mi));
    vo = S::load(S::store(vi));
    float vhat = vo;
    if (sc.amsgrad) {
      vhat = nan_max(vm, vhat);
      vmo = vhat;
    }
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vhat), bc2_sqrt), eps);
    po = __fadd_rn(param, __fdiv_rn(__fmul_rn(neg_step, mo), denom));
  };
  auto write_param = [&](int64_t i, float po) {
    if constexpr (kMaster) {
      master[i] = po;
      p[i] = P::store(po);
    } else if constexpr (kSR) {
      static_assert(std::is_same<P, DBF16>::value, "stochastic rounding is for bf16 params");
      p[i] = bf16_stochastic(po, sr::element_bits(tseed, static_cast<uint32_t>(begin + i)));
    } else {
      p[i] = P::store(po);
    }
  };

  const bool vec_ok = mt::aligned16(p) && mt::aligned16(g) && mt::aligned16(m) && mt::aligned16(v) &&
                      (!sc.amsgrad || mt::aligned16(vmax)) && (!kMaster || mt::aligned16(master));
  int64_t done = 0;
  if (vec_ok) {
    const int64_t nvec = len / kVec;
    for (int64_t k = threadIdx.x; k < nvec; k += blockDim.x) {
      const int64_t i0 = k * kVec;
      PT pr[kVec], gr[kVec];
      ST mr[kVec], vr[kVec], vmr[kVec];
      float mw[kVec];
      mt::load_vec(gr, g + i0);
      mt::load_vec(mr, m + i0);
      mt::load_vec(vr, v + i0);
      if (sc.amsgrad) mt::load_vec(vmr, vmax + i0);
      if (kMaster) {
        mt::load_vec(mw, master + i0);
      } else {
        mt::load_vec(pr, p + i0);
      }
      float po[kVec], gu[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) gu[j] = __fmul_rn(P::load(gr[j]), unscale);
      if (write_grad) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) gr[j] = P::store(gu[j]);
        mt::store_vec(g + i0, gr);
      }
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        float mo, vo, vmo = 0.f;
        const float param = kMaster ? mw[j] : P::load(pr[j]);
        update(param, gu[j], S::load(mr[j]), S::load(vr[j]), sc.amsgrad ? S::load(vmr[j]) : 0.f, po[j], mo, vo,
               vmo);
        mr[j] = S::store(mo);
        vr[j] = S::store(vo);
        if (sc.amsgrad) vmr[j] = S::store(vmo);
      }
      mt::store_vec(m + i0, mr);
      mt::store_vec(v + i0, vr);
      if (sc.amsgrad) mt::store_vec(vmax + i0, vmr);
      if constexpr (kMaster) {
        mt::store_vec(master + i0, po);
#pragma unroll
        for (int j = 0; j < kVec; ++j) pr[j] = P::store(po[j]);
        mt::store_vec(p + i0, pr);
      } else if constexpr (kSR) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) write_param(i0 + j, po[j]);
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) pr[j] = P::store(po[j]);
        mt::store_vec(p + i0, pr);
      }
    }
    done = nvec * kVec;
  }
  for (int64_t i = done + threadIdx.x; i < len; i += blockDim.x) {
    float po, mo, vo, vmo = 0.f;
    const float param = kMaster ? master[i] : P::load(p[i]);
    const float gu = __fmul_rn(P::load(g[i]), unscale);
    if (write_grad) g[i] = P::store(gu);
    update(param, gu, S::load(m[i]), S::load(v[i]), sc.amsgrad ? S::load(vmax[i]) : 0.f, po, mo, vo, vmo);
    m[i] = S::store(mo);
    v[i] = S::store(vo);
    if (sc.amsgrad) vmax[i] = S::store(vmo);
    write_param(i, po);
  }
}

template <typename P, typename S, bool kMaster, bool kSR>
cudaError_t launch_adamw(const AdamWArgs& a, cudaStream_t stream) {
  AdamWScalars sc;
  sc.lr = static_cast<float>(a.lr);
  sc.beta1 = static_cast<float>(a.beta1);
  sc.beta2 = static_cast<float>(a.beta2);
  sc.eps = static_cast<float>(a.eps);
  sc.weight_decay = static_cast<float>(a.weight_decay);
  sc.beta1_d = a.beta1;
  sc.beta2_d = a.beta2;
  sc.lr_d = a.lr;
  sc.wd_d = a.weight_decay;
  sc.amsgrad = a.amsgrad;
  sc.maximize = a.maximize;
  sc.grad_scale = a.grad_scale;
  sc.found_inf = a.found_inf;
  sc.clip_coef = a.clip_coef;
  sc.seed = a.seed;
  auto fill = [&](TensorListMeta<kAdamDepth>& meta, int slot, int64_t t) {
    meta.addr[0][slot] = a.params[t];
    meta.addr[1][slot] = a.grads[t];
    meta.addr[2][slot] = a.exp_avg[t];
    meta.addr[3][slot] = a.exp_avg_sq[t];
    meta.addr[4][slot] = a.amsgrad ? a.max_exp_avg_sq[t] : nullptr;
    meta.addr[5][slot] = kMaster ? a.master[t] : nullptr;
    meta.step[slot] = a.step[t];
  };
  auto launch = [&](const TensorListMeta<kAdamDepth>& meta, int nblocks) {
    adamw_kernel<P, S, kMaster, kSR><<<nblocks, mt::kThreads, 0, stream>>>(meta, sc);
    return cudaGetLastError();
  };
  return mt::multi_tensor_apply<kAdamDepth>(a.n, a.numel, fill, launch);
}

template <typename P, typename S>
cudaError_t dispatch_flags(const AdamWArgs& a, cudaStream_t s) {
  const bool master = a.master != nullptr;
  if constexpr (std::is_same<P, DF32>::value) {
    if (master || a.stochastic_rounding) return cudaErrorInvalidValue;
    return launch_adamw<P, S, false, false>(a, s);
  } else if constexpr (std::is_same<P, DF16>::value) {
    if (a.stochastic_rounding) return cudaErrorInvalidValue;
    return master ? launch_adamw<P, S, true, false>(a, s) : launch_adamw<P, S, false, false>(a, s);
  } else {
    if (master) return a.stochastic_rounding ? cudaErrorInvalidValue : launch_adamw<P, S, true, false>(a, s);
    return a.stochastic_rounding ? launch_adamw<P, S, false, true>(a, s) : launch_adamw<P, S, false, false>(a, s);
  }
}

template <typename P>
cudaError_t dispatch_state(const AdamWArgs& a, cudaStream_t s) {
  switch (a.state_dtype) {
    case 0:
      return dispatch_flags<P, DF32>(a, s);
    case 2:
      return dispatch_flags<P, DBF16>(a, s);
    default:
      return cudaErrorInvalidValue;
  }
}

// ------------------------------------------------------------------ clipping

template <typename D>
__global__ void __launch_bounds__(mt::kThreads) sumsq_kernel(TensorListMeta<1> meta, float* partials) {
  using T = typename D::T;
  const int slot = meta.block_to_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * mt::kChunk;
  const int64_t len = min(mt::kChunk, meta.numel[slot] - begin);
  const T* x = static_cast<const T*>(meta.addr[0][slot]) + begin;
  float acc = 0.f;
  int64_t done = 0;
  if (mt::aligned16(x)) {
    const int64_t nvec = len / kVec;
    for (int64_t k = threadIdx.x; k < nvec; k += blockDim.x) {
      T r[kVec];
      mt::load_vec(r, x + k * kVec);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float f = D::load(r[j]);
        acc = fmaf(f, f, acc);
      }
    }
    done = nvec * kVec;
  }
  for (int64_t i = done + threadIdx.x; i < len; i += blockDim.x) {
    const float f = D::load(x[i]);
    acc = fmaf(f, f, acc);
  }
  __shared__ float red[mt::kThreads];
  red[threadIdx.x] = acc;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) partials[meta.first_block + blockIdx.x] = red[0];
}

// The coefficient is computed as torch.nn.utils.clip_grad_norm_ does, in fp32:
// clamp(reciprocal(total + 1e-6) * max_norm, max=1) (torch's float / tensor is reciprocal * float).
__global__ void clip_coef_kernel(const float* partials, int64_t len, float max_norm, const float* grad_scale,
                                 float* total_norm, float* coef) {
  __shared__ double red[1024];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < len; i += blockDim.x) acc += static_cast<double>(partials[i]);
  red[threadIdx.x] = acc;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const double scale = grad_scale != nullptr ? static_cast<double>(*grad_scale) : 1.0;
    const float total = static_cast<float>(sqrt(red[0]) / scale);  // norm of the unscaled grads
    const float c = __fmul_rn(__frcp_rn(__fadd_rn(total, 1e-6f)), max_norm);
    *total_norm = total;
    *coef = c >= 1.0f ? 1.0f : c;  // NaN propagates, as in torch
  }
}

template <typename D>
__global__ void __launch_bounds__(mt::kThreads) scale_kernel(TensorListMeta<1> meta, const float* coef_ptr) {
  using T = typename D::T;
  const float coef = *coef_ptr;
  if (coef == 1.0f) return;  // nothing to clip: multiplying by 1 would change no bit
  const int slot = meta.block_to_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * mt::kChunk;
  const int64_t len = min(mt::kChunk, meta.numel[slot] - begin);
  T* x = static_cast<T*>(meta.addr[0][slot]) + begin;
  int64_t done = 0;
  if (mt::aligned16(x)) {
    const int64_t nvec = len / kVec;
    for (int64_t k = threadIdx.x; k < nvec; k += blockDim.x) {
      T r[kVec];
      mt::load_vec(r, x + k * kVec);
#pragma unroll
      for (int j = 0; j < kVec; ++j) r[j] = D::store(D::load(r[j]) * coef);
      mt::store_vec(x + k * kVec, r);
    }
    done = nvec * kVec;
  }
  for (int64_t i = done + threadIdx.x; i < len; i += blockDim.x) x[i] = D::store(D::load(x[i]) * coef);
}

template <typename D>
cudaError_t launch_sumsq(int64_t n, const void* const* ptrs, const int64_t* numel, float* partials, cudaStream_t s) {
  auto fill = [&](TensorListMeta<1>& meta, int slot, int64_t t) {
    meta.addr[0][slot] = const_cast<void*>(ptrs[t]);
    meta.step[slot] = nullptr;
  };
  auto launch = [&](const TensorListMeta<1>& meta, int nblocks) {
    sumsq_kernel<D><<<nblocks, mt::kThreads, 0, s>>>(meta, partials);
    return cudaGetLastError();
  };
  return mt::multi_tensor_apply<1>(n, numel, fill, launch);
}

template <typename D>
cudaError_t launch_scale(int64_t n, void* const* ptrs, const int64_t* numel, const float* coef, cudaStream_t s) {
  auto fill = [&](TensorListMeta<1>& meta, int slot, int64_t t) {
    meta.addr[0][slot] = ptrs[t];
    meta.step[slot] = nullptr;
  };
  auto launch = [&](const TensorListMeta<1>& meta, int nblocks) {
    scale_kernel<D><<<nblocks, mt::kThreads, 0, s>>>(meta, coef);
    return cudaGetLastError();
  };
  return mt::multi_tensor_apply<1>(n, numel, fill, launch);
}

}  // namespace

int adamw_step(const AdamWArgs& a, uintptr_t stream) {
  if (a.n == 0) return 0;
  if (a.amsgrad && a.max_exp_avg_sq == nullptr) return cudaErrorInvalidValue;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  cudaError_t err;
  switch (a.param_dtype) {
    case 0:
      err = dispatch_state<DF32>(a, s);
      break;
    case 1:
      err = dispatch_state<DF16>(a, s);
      break;
    case 2:
      err = dispatch_state<DBF16>(a, s);
      break;
    default:
      err = cudaErrorInvalidValue;
  }
  return static_cast<int>(err);
}

int64_t multi_tensor_chunk_size() { return mt::kChunk; }

int sum_squares_partials(int64_t n, const void* const* ptrs, const int64_t* numel, int dtype, float* partials,
                         uintptr_t stream) {
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0:
      return static_cast<int>(launch_sumsq<DF32>(n, ptrs, numel, partials, s));
    case 1:
      return static_cast<int>(launch_sumsq<DF16>(n, ptrs, numel, partials, s));
    case 2:
      return static_cast<int>(launch_sumsq<DBF16>(n, ptrs, numel, partials, s));
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

int clip_coefficient(const float* partials, int64_t len, float max_norm, const float* grad_scale,
                     float* total_norm, float* coef, uintptr_t stream) {
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  clip_coef_kernel<<<1, 1024, 0, s>>>(partials, len, max_norm, grad_scale, total_norm, coef);
  return static_cast<int>(cudaGetLastError());
}

int scale_by(int64_t n, void* const* ptrs, const int64_t* numel, int dtype, const float* coef, uintptr_t stream) {
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0:
      return static_cast<int>(launch_scale<DF32>(n, ptrs, numel, coef, s));
    case 1:
      return static_cast<int>(launch_scale<DF16>(n, ptrs, numel, coef, s));
    case 2:
      return static_cast<int>(launch_scale<DBF16>(n, ptrs, numel, coef, s));
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace cuda
}  // namespace turbotune
