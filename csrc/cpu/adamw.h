// CPU kernels of turbotune's fused AdamW and multi-tensor gradient clipping,
// and the stochastic-rounding bits shared with the CUDA kernels.
//
// Host C++ only: no torch, no Python. Tensors arrive as raw pointers + element
// counts and are walked as flat arrays in memory order: any dense layout
// (contiguous, channels_last, ...) works as long as the tensors updated together
// (param, grad, moments, master copy) share it; the Python side ensures that.
// Math is fp32 whatever the storage dtype.
// The `sr` section below is also compiled by nvcc (kernels/adamw.cu includes
// this header): it is the one definition of the random bits of stochastic
// rounding, so the CPU and CUDA kernels round identically for the same seed.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define TT_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define TT_HOST_DEVICE inline __attribute__((always_inline))
#else
#define TT_HOST_DEVICE inline
#endif

namespace turbotune {

// ------------------------------------------------------------------ stochastic rounding (CPU and CUDA)
//
// A bf16 param without master copy is written as round_bf16_stochastic(bits of
// the new fp32 value, element_bits(tensor_seed(seed, t), i)) for element i of
// tensor t of one launch list, with `seed` drawn once per step on the host.
// 32-bit integer operations only, so the CPU loop vectorises.
namespace sr {

// lowbias32 (Chris Wellons): a counter-based 32-bit mixer.
TT_HOST_DEVICE uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// Per-tensor key: the step's 64-bit seed and the tensor's index in the launch list.
TT_HOST_DEVICE uint32_t tensor_seed(uint64_t seed, uint64_t tensor_index) {
  const uint64_t s = seed * 0x9E3779B97F4A7C15ull + tensor_index * 0xBF58476D1CE4E5B9ull;
  return hash32(static_cast<uint32_t>(s ^ (s >> 32)));
}

// Random bits of element `index`: its position in the tensor's memory, mod 2^32
// (the flat index of a contiguous tensor; the storage offset of a channels_last one).
TT_HOST_DEVICE uint32_t element_bits(uint32_t tensor_key, uint32_t index) { return hash32(index ^ tensor_key); }

// fp32 bits -> bf16 bits, rounded up with probability (discarded fraction):
// the low 16 random bits are added below the kept mantissa, then truncated.
// Unbiased: E[result] = x. Inf stays inf; NaN stays a (quiet) NaN.
TT_HOST_DEVICE uint16_t round_bf16_stochastic(uint32_t fbits, uint32_t random) {
  const uint32_t r = (fbits + (random & 0xFFFFu)) >> 16;
  const uint32_t nan = (fbits >> 16) | 0x40u;
  return static_cast<uint16_t>((fbits & 0x7FFFFFFFu) > 0x7F800000u ? nan : r);
}

}  // namespace sr

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
  void* const* grads = nullptr;         // param dtype; written only when AdamWHyper::write_grad
  void* const* exp_avg = nullptr;       // state dtype
  void* const* exp_avg_sq = nullptr;    // state dtype
  void* const* max_exp_avg_sq = nullptr;  // state dtype, or null
  float* const* master = nullptr;       // fp32, or null
  const int64_t* numel = nullptr;
  float* const* step = nullptr;         // fp32 step counters (torch's state["step"]), incremented here
};

struct AdamWHyper {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;
  bool amsgrad = false;
  bool maximize = false;
  // Each gradient is first multiplied by grad_unscale (1 / GradScaler scale; 1
  // without scaler), then by grad_multiplier (the clip coefficient; 1 without
  // clipping) for the update. A multiplier of 1 changes no bit.
  double grad_unscale = 1.0;
  double grad_multiplier = 1.0;
  // Store the unscaled gradient (grad * grad_unscale) back into grads, as
  // torch's fused AdamW does under a GradScaler.
  bool write_grad = false;
  // bf16 params without master weights: round the new value stochastically.
  bool stochastic_rounding = false;
  uint64_t seed = 0;
};

// Applies one AdamW step to every tensor of the list: adds 1 to each step
// counter (fp32, as torch) and updates with the new count; tensors with numel 0
// are skipped (their pointers may be null; their counters still advance).
// Throws std::invalid_argument on an unsupported dtype combination or a
// negative counter, before anything is written.
void adamw_step(const AdamWTensorList& t, DType param_dtype, DType state_dtype, const AdamWHyper& h);

// Sum of squares of all elements of n tensors of one dtype, accumulated in fp64
// (per-chunk partial sums are fp32, combined in a fixed order). Tensors with
// numel 0 are skipped (their pointers may be null).
double sum_of_squares(int64_t n, const void* const* ptrs, const int64_t* numel, DType dtype);

// Multiplies every element of n tensors of one dtype by factor (fp32 math).
void scale_inplace(int64_t n, void* const* ptrs, const int64_t* numel, DType dtype, float factor);

// Name of the SIMD variant the kernels dispatch to on this CPU ("avx512", "avx2", "generic").
const char* simd_variant();

}  // namespace cpu
}  // namespace turbotune
