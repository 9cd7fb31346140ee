// Runtime probe of the CUDA side of the extension. Kept tiny: it is what
// `turbotune info` and the backend layer use to tell "built with CUDA" from
// "built with CUDA and a usable driver".
#include <cuda_runtime.h>

#include "cuda_api.h"

namespace turbotune {
namespace cuda {

int device_count() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later probes start clean
    return -static_cast<int>(err);
  }
  return n;
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

int runtime_version() {
  int v = 0;
  return cudaRuntimeGetVersion(&v) == cudaSuccess ? v : 0;
}

}  // namespace cuda
}  // namespace turbotune
