// CPU kernels of turbotune's fused AdamW and multi-tensor gradient clipping.
//
// Host C++ only: no torch, no Python. Tensors arrive as raw pointers + element
// counts; every tensor is contiguous. Math is fp32 whatever the storage dtype.
#pragma once

#include <cstddef>
#include <cstdint>

namespace turbotune {
namespace cpu {

// Storage dtypes understood by the kernels (same codes as the CUDA side).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// One AdamW launch: n tensors of one (param dtype, state dtype) combination.
// Arrays have n entries. max_exp_avg_sq is null unless amsgrad; master is null
// unless the params are 16-bit with fp32 master weights (then the master copy
// is the value that is updated and the param receives its rounded copy).
struct AdamWTensorList {
  int64_t n = 0;
  void* const* params = nullptr;        // param dtype
  const void* const* grads = nullptr;   // param dtype
  void* const* exp_avg = nullptr;       // state dtype
  void* const* exp_avg_sq = nullptr;    // state dtype
  void* const* max_exp_avg_sq = nullptr;  // state dtype, or null
  float* const* master = nullptr;       // fp32, or null
  const int64_t* numel = nullptr;
  const double* step = nullptr;         // step count after this update (>= 1), per tensor
};

struct AdamWHyper {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;
  bool amsgrad = false;
  bool maximize = false;
  // Gradients are multiplied by this (1 / GradScaler scale; 1 without scaler).
  double grad_multiplier = 1.0;
  // bf16 params without master weights: round the new value stochastically.
  bool stochastic_rounding = false;
  uint64_t seed = 0;
};

// Applies one AdamW step to every tensor of the list. Throws std::invalid_argument
// on an unsupported dtype combination.
void adamw_step(const AdamWTensorList& t, DType param_dtype, DType state_dtype, const AdamWHyper& h);

// Sum of squares of all elements of n tensors of one dtype, accumulated in fp64
// (per-chunk partial sums are fp32).
double sum_of_squares(int64_t n, const void* const* ptrs, const int64_t* numel, DType dtype);

// Multiplies every element of n tensors of one dtype by factor (fp32 math).
void scale_inplace(int64_t n, void* const* ptrs, const int64_t* numel, DType dtype, float factor);

// Name of the SIMD variant the kernels dispatch to on this CPU ("avx512", "avx2", "generic").
const char* simd_variant();

}  // namespace cpu
}  // namespace turbotune
