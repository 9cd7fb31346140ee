// Build and runtime facts of the native core: what was compiled in, which
// CPU features and how many OpenMP threads are available, whether the CUDA
// side can talk to a driver.
#include <pybind11/pybind11.h>

#include <string>
#include <thread>

#include "bindings/bindings.h"

#ifdef TURBOTUNE_WITH_OPENMP
#include <omp.h>
#endif

#ifdef TURBOTUNE_WITH_CUDA
#include "cuda_api.h"
#endif

namespace py = pybind11;

namespace turbotune {
namespace {

py::dict cpu_features() {
  py::dict d;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  d["sse4_2"] = bool(__builtin_cpu_supports("sse4.2"));
  d["avx"] = bool(__builtin_cpu_supports("avx"));
  d["avx2"] = bool(__builtin_cpu_supports("avx2"));
  d["fma"] = bool(__builtin_cpu_supports("fma"));
  d["avx512f"] = bool(__builtin_cpu_supports("avx512f"));
  d["avx512bf16"] = bool(__builtin_cpu_supports("avx512bf16"));
#elif defined(__aarch64__)
  d["neon"] = true;
#endif
  return d;
}

int max_threads() {
#ifdef TURBOTUNE_WITH_OPENMP
  return omp_get_max_threads();
#else
  unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
#endif
}

// {"built": bool, "device_count": int, "error": str|None, "runtime_version": int}
py::dict cuda_status() {
  py::dict d;
#ifdef TURBOTUNE_WITH_CUDA
  d["built"] = true;
  int n;
  {
    py::gil_scoped_release nogil;
    n = cuda::device_count();
  }
  d["device_count"] = n < 0 ? 0 : n;
  d["error"] = n < 0 ? py::cast(std::string(cuda::error_string(-n)) + " (cudaError " + std::to_string(-n) + ")")
                     : py::none();
  d["runtime_version"] = cuda::runtime_version();
#else
  d["built"] = false;
  d["device_count"] = 0;
  d["error"] = py::none();
  d["runtime_version"] = 0;
#endif
  return d;
}

}  // namespace

void bind_core(py::module_& m) {
  m.attr("__build_type__") =
#ifdef NDEBUG
      "release";
#else
      "debug";
#endif
  m.attr("built_with_cuda") =
#ifdef TURBOTUNE_WITH_CUDA
      true;
#else
      false;
#endif
  m.attr("built_with_openmp") =
#ifdef TURBOTUNE_WITH_OPENMP
      true;
#else
      false;
#endif
  m.def("cpu_features", &cpu_features, "CPU SIMD features the running machine supports (dict name -> bool).");
  m.def("max_threads", &max_threads, "Threads the native CPU kernels use by default.");
  m.def("cuda_status", &cuda_status,
        "Probe the CUDA runtime: {'built', 'device_count', 'error', 'runtime_version'}. Never raises.");
}

}  // namespace turbotune
