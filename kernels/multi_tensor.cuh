// Multi-tensor apply: process many tensors in few kernel launches.
//
// The host cuts every tensor into chunks of kChunk elements and packs, per
// launch, the tensors' addresses and a block -> (tensor, chunk) map into a
// kernel argument (TensorListMeta, under the 4 KB parameter limit). Each CUDA
// block processes one chunk. When the table of tensors or of blocks is full,
// the launch is issued and packing resumes (a tensor cut by a launch keeps its
// remaining chunks for the next one).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace turbotune {
namespace cuda {
namespace mt {

constexpr int64_t kChunk = 65536;  // elements per block
constexpr int kThreads = 512;
constexpr int kVec = 8;            // elements per thread per iteration (16-byte loads for 16-bit types)
constexpr int kMaxBlocks = 320;

// Max tensors per launch for a given number of pointer lists (DEPTH), chosen so
// that TensorListMeta stays under the classic 4 KB kernel-parameter limit.
template <int DEPTH>
struct MaxTensors {
  static constexpr int value = DEPTH <= 1 ? 64 : (DEPTH <= 2 ? 48 : (DEPTH <= 4 ? 32 : 24));
};

template <int DEPTH>
struct TensorListMeta {
  static constexpr int kMaxTensors = MaxTensors<DEPTH>::value;
  void* addr[DEPTH][kMaxTensors];
  int64_t numel[kMaxTensors];
  const float* step[kMaxTensors];  // per-tensor device scalar (AdamW) or unused
  int32_t tensor_index[kMaxTensors];  // index of the tensor in the caller's full list
  unsigned char block_to_tensor[kMaxBlocks];
  int32_t block_to_chunk[kMaxBlocks];
  int64_t first_block;  // global index (over all launches) of this launch's block 0
};
static_assert(sizeof(TensorListMeta<1>) <= 3900 && sizeof(TensorListMeta<2>) <= 3900 &&
                  sizeof(TensorListMeta<4>) <= 3900 && sizeof(TensorListMeta<6>) <= 3900,
              "launch metadata must fit the 4 KB kernel parameter space (with the scalars)");

// 16-byte aligned, kVec-element fast path is allowed for this pointer?
__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Load / store kVec consecutive elements with 16-byte transactions.
template <typename T>
__device__ __forceinline__ void load_vec(T (&dst)[kVec], const T* src) {
  static_assert((sizeof(T) * kVec) % 16 == 0, "vector width must be a multiple of 16 bytes");
#pragma unroll
  for (int j = 0; j < kVec; j += 16 / sizeof(T))
    *reinterpret_cast<uint4*>(&dst[j]) = *reinterpret_cast<const uint4*>(&src[j]);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* dst, const T (&src)[kVec]) {
#pragma unroll
  for (int j = 0; j < kVec; j += 16 / sizeof(T))
    *reinterpret_cast<uint4*>(&dst[j]) = *reinterpret_cast<const uint4*>(&src[j]);
}

// Pack tensors into launches. `add_tensor(meta, slot, t)` fills addr / numel /
// step of slot for tensor t; `launch(meta, nblocks)` issues one kernel.
template <int DEPTH, typename FillFn, typename LaunchFn>
cudaError_t multi_tensor_apply(int64_t n, const int64_t* numel, FillFn&& fill, LaunchFn&& launch) {
  TensorListMeta<DEPTH> meta;
  int ntensors = 0;
  int nblocks = 0;
  int64_t global_block = 0;
  meta.first_block = 0;
  for (int64_t t = 0; t < n; ++t) {
    if (numel[t] == 0) continue;
    fill(meta, ntensors, t);
    meta.numel[ntensors] = numel[t];
    meta.tensor_index[ntensors] = static_cast<int32_t>(t);
    ++ntensors;
    const int64_t chunks = (numel[t] + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_to_tensor[nblocks] = static_cast<unsigned char>(ntensors - 1);
      meta.block_to_chunk[nblocks] = static_cast<int32_t>(c);
      ++nblocks;
      const bool blocks_full = nblocks == kMaxBlocks;
      const bool tensors_full = ntensors == TensorListMeta<DEPTH>::kMaxTensors;
      const bool last_chunk = c == chunks - 1;
      if (blocks_full || (tensors_full && last_chunk) || (t == n - 1 && last_chunk)) {
        cudaError_t err = launch(meta, nblocks);
        if (err != cudaSuccess) return err;
        global_block += nblocks;
        meta.first_block = global_block;
        nblocks = 0;
        if (last_chunk) {
          ntensors = 0;
        } else {  // the current tensor continues in the next launch, in slot 0
#pragma unroll
          for (int d = 0; d < DEPTH; ++d) meta.addr[d][0] = meta.addr[d][ntensors - 1];
          meta.numel[0] = meta.numel[ntensors - 1];
          meta.step[0] = meta.step[ntensors - 1];
          meta.tensor_index[0] = meta.tensor_index[ntensors - 1];
          ntensors = 1;
        }
      }
    }
  }
  if (nblocks > 0) {  // trailing empty tensors after the last non-empty one
    cudaError_t err = launch(meta, nblocks);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace mt
}  // namespace cuda
}  // namespace turbotune
