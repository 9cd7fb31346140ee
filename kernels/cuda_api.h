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
