// Host-side C API of the CUDA kernels in kernels/*.cu.
//
// This header includes no CUDA headers, so host C++ (csrc/bindings) can call
// the kernels without nvcc. Pointers are raw device pointers, streams are
// cudaStream_t passed as uintptr_t. Every function returns a cudaError_t as an
// int (0 = success); turbotune_cuda_error_string() turns it into text.
#pragma once

#include <cstddef>
#include <cstdint>

namespace turbotune {
namespace cuda {

// Number of usable devices, or a negative CUDA error code (e.g. -35 when the
// driver is missing or too old).
int device_count();
// Human-readable text of a CUDA error code (positive).
const char* error_string(int code);
// Version of the CUDA runtime linked into the extension (e.g. 13000).
int runtime_version();

}  // namespace cuda
}  // namespace turbotune

// ---------------------------------------------------------------------------
// Fused AdamW and multi-tensor gradient clipping (kernels/adamw.cu).
//
// dtype codes: 0 = float32, 1 = float16, 2 = bfloat16. Every pointer array has
// n entries and lives in HOST memory (the kernels receive them through launch
// metadata); the pointers in it are device pointers to dense tensors,
// walked in memory order (tensors updated together share one layout).
// Nothing here synchronises the host with the device.
namespace turbotune {
namespace cuda {

struct AdamWArgs {
  int64_t n;
  void* const* params;          // param dtype
  void* const* grads;           // param dtype; the unscaled grads are written back when grad_scale is set
  void* const* exp_avg;         // state dtype
  void* const* exp_avg_sq;      // state dtype
  void* const* max_exp_avg_sq;  // state dtype; null array unless amsgrad
  float* const* master;         // fp32 master weights; null array unless master weights
  const int64_t* numel;
  const float* const* step;     // device fp32 scalars: step count after this update
  int param_dtype;
  int state_dtype;
  double lr, beta1, beta2, eps, weight_decay;
  bool amsgrad, maximize;
  const float* grad_scale;  // device fp32 scalar (GradScaler scale) or null. When set, every grad is
                            // divided by it and the unscaled grad is stored back (as torch's fused AdamW)
  const float* found_inf;   // device fp32 scalar; != 0 skips the whole update; or null
  const float* clip_coef;   // device fp32 scalar multiplying the (unscaled) grads in the update only, or null
  bool stochastic_rounding;
  uint64_t seed;
};

// One AdamW step over all tensors, in as few launches as the metadata allows.
// Tensors with numel 0 are skipped (their pointers may be null).
int adamw_step(const AdamWArgs& a, uintptr_t stream);

// Elements per block-chunk of the multi-tensor kernels; the clipping
// workspace needs one float per chunk: sum over tensors of ceil(numel / chunk).
int64_t multi_tensor_chunk_size();

// Multi-tensor gradient clipping in three launches, no host synchronisation:
// 1. sum_squares_partials: one fp32 partial sum of squares per chunk, written
//    to partials[0 .. sum over tensors of ceil(numel / chunk)) (call once per
//    dtype group, each with its own slice of one workspace); tensors with numel
//    0 are skipped;
// 2. clip_coefficient: reduces partials[0..len) in a fixed order (deterministic),
//    writes total = sqrt(sum) / *grad_scale (grad_scale: device fp32 scalar, or
//    null for 1) to *total_norm and min(1, max_norm / (total + 1e-6)) to *coef
//    (both device fp32);
// 3. scale_by: multiplies every element by *coef (fp32 math).
int sum_squares_partials(int64_t n, const void* const* ptrs, const int64_t* numel, int dtype, float* partials,
                         uintptr_t stream);
int clip_coefficient(const float* partials, int64_t len, float max_norm, const float* grad_scale,
                     float* total_norm, float* coef, uintptr_t stream);
int scale_by(int64_t n, void* const* ptrs, const int64_t* numel, int dtype, const float* coef, uintptr_t stream);

}  // namespace cuda
}  // namespace turbotune
