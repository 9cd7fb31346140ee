// Python bindings of the fused AdamW and multi-tensor clipping kernels.
//
// Tensors cross as data pointers (Python ints) plus element counts; the Python
// side (turbotune.optim) checks devices, dtypes and contiguity before calling.
// The GIL is released around every kernel call.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings/bindings.h"
#include "cpu/adamw.h"

#ifdef TURBOTUNE_WITH_CUDA
#include "cuda_api.h"
#endif

namespace py = pybind11;

namespace turbotune {
namespace {

using Ptrs = std::vector<uintptr_t>;

// A pointer list of n entries (or none, when allow_empty). A null pointer is an
// error unless its tensor has no elements (numel[i] == 0): the kernels skip those.
std::vector<void*> to_ptrs(const Ptrs& v, size_t n, const char* name, const std::vector<int64_t>* numel,
                           bool allow_empty = false) {
  if (allow_empty && v.empty()) return {};
  if (v.size() != n)
    throw std::invalid_argument(std::string(name) + ": expected " + std::to_string(n) + " pointers, got " +
                                std::to_string(v.size()));
  std::vector<void*> out(n);
  for (size_t i = 0; i < n; ++i) {
    const bool empty = numel != nullptr && (*numel)[i] == 0;
    if (v[i] == 0 && !empty)
      throw std::invalid_argument(std::string(name) + "[" + std::to_string(i) + "] is a null pointer");
    out[i] = reinterpret_cast<void*>(v[i]);
  }
  return out;
}

void check_numel(const std::vector<int64_t>& numel, size_t n) {
  if (numel.size() != n)
    throw std::invalid_argument("numel: expected " + std::to_string(n) + " entries, got " +
                                std::to_string(numel.size()));
  for (size_t i = 0; i < n; ++i)
    if (numel[i] < 0) throw std::invalid_argument("numel[" + std::to_string(i) + "] is negative");
}

cpu::DType to_dtype(int code, const char* name) {
  if (code < 0 || code > 2)
    throw std::invalid_argument(std::string(name) + ": dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16), got " +
                                std::to_string(code));
  return static_cast<cpu::DType>(code);
}

// The per-tensor lists of one AdamW step, checked once for both devices.
struct AdamWLists {
  std::vector<void*> params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq;
  std::vector<float*> master;  // empty without master weights
};

AdamWLists adamw_lists(const Ptrs& params, const Ptrs& grads, const Ptrs& exp_avg, const Ptrs& exp_avg_sq,
                       const Ptrs& max_exp_avg_sq, const Ptrs& master, const std::vector<int64_t>& numel,
                       bool amsgrad) {
  const size_t n = params.size();
  check_numel(numel, n);
  AdamWLists l;
  l.params = to_ptrs(params, n, "params", &numel);
  l.grads = to_ptrs(grads, n, "grads", &numel);
  l.exp_avg = to_ptrs(exp_avg, n, "exp_avg", &numel);
  l.exp_avg_sq = to_ptrs(exp_avg_sq, n, "exp_avg_sq", &numel);
  l.max_exp_avg_sq = to_ptrs(max_exp_avg_sq, n, "max_exp_avg_sq", &numel, true);
  for (void* w : to_ptrs(master, n, "master", &numel, true)) l.master.push_back(static_cast<float*>(w));
  if (amsgrad && l.max_exp_avg_sq.empty()) throw std::invalid_argument("max_exp_avg_sq: required when amsgrad=True");
  return l;
}

// One multi-tensor list (clipping kernels) with its element counts.
std::vector<void*> tensor_list(const Ptrs& ptrs, const std::vector<int64_t>& numel) {
  check_numel(numel, ptrs.size());
  return to_ptrs(ptrs, ptrs.size(), "tensors", &numel);
}

void adamw_cpu(const Ptrs& params, const Ptrs& grads, const Ptrs& exp_avg, const Ptrs& exp_avg_sq,
               const Ptrs& max_exp_avg_sq, const Ptrs& master, const std::vector<int64_t>& numel,
               const Ptrs& step, int param_dtype, int state_dtype, double lr, double beta1,
               double beta2, double eps, double weight_decay, bool amsgrad, bool maximize, double grad_unscale,
               double grad_multiplier, bool write_grad, bool stochastic_rounding, uint64_t seed) {
  const size_t n = params.size();
  auto l = adamw_lists(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, master, numel, amsgrad);
  std::vector<float*> steps;
  for (void* s : to_ptrs(step, n, "step", nullptr)) steps.push_back(static_cast<float*>(s));
  cpu::AdamWTensorList t;
  t.n = static_cast<int64_t>(n);
  t.params = l.params.data();
  t.grads = l.grads.data();
  t.exp_avg = l.exp_avg.data();
  t.exp_avg_sq = l.exp_avg_sq.data();
  t.max_exp_avg_sq = amsgrad ? l.max_exp_avg_sq.data() : nullptr;
  t.master = l.master.empty() ? nullptr : l.master.data();
  t.numel = numel.data();
  t.step = steps.data();
  cpu::AdamWHyper h;
  h.lr = lr;
  h.beta1 = beta1;
  h.beta2 = beta2;
  h.eps = eps;
  h.weight_decay = weight_decay;
  h.amsgrad = amsgrad;
  h.maximize = maximize;
  h.grad_unscale = grad_unscale;
  h.grad_multiplier = grad_multiplier;
  h.write_grad = write_grad;
  h.stochastic_rounding = stochastic_rounding;
  h.seed = seed;
  const cpu::DType pd = to_dtype(param_dtype, "param_dtype");
  const cpu::DType sd = to_dtype(state_dtype, "state_dtype");
  py::gil_scoped_release nogil;
  cpu::adamw_step(t, pd, sd, h);
}

double sum_squares_cpu(const Ptrs& ptrs, const std::vector<int64_t>& numel, int dtype) {
  auto p = tensor_list(ptrs, numel);
  const cpu::DType d = to_dtype(dtype, "dtype");
  py::gil_scoped_release nogil;
  return cpu::sum_of_squares(static_cast<int64_t>(p.size()), p.data(), numel.data(), d);
}

void scale_cpu(const Ptrs& ptrs, const std::vector<int64_t>& numel, int dtype, double factor) {
  auto p = tensor_list(ptrs, numel);
  const cpu::DType d = to_dtype(dtype, "dtype");
  py::gil_scoped_release nogil;
  cpu::scale_inplace(static_cast<int64_t>(p.size()), p.data(), numel.data(), d, static_cast<float>(factor));
}

#ifdef TURBOTUNE_WITH_CUDA
void check_cuda(int err, const char* what) {
  if (err != 0)
    throw std::runtime_error(std::string("turbotune CUDA ") + what + " failed: " + cuda::error_string(err) +
                             " (cudaError " + std::to_string(err) + ")");
}

void adamw_cuda(const Ptrs& params, const Ptrs& grads, const Ptrs& exp_avg, const Ptrs& exp_avg_sq,
                const Ptrs& max_exp_avg_sq, const Ptrs& master, const std::vector<int64_t>& numel,
                const Ptrs& step, int param_dtype, int state_dtype, double lr, double beta1, double beta2,
                double eps, double weight_decay, bool amsgrad, bool maximize, uintptr_t grad_scale,
                uintptr_t found_inf, uintptr_t clip_coef, bool stochastic_rounding, uint64_t seed,
                uintptr_t stream) {
  const size_t n = params.size();
  auto l = adamw_lists(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, master, numel, amsgrad);
  auto s = to_ptrs(step, n, "step", nullptr);
  to_dtype(param_dtype, "param_dtype");
  to_dtype(state_dtype, "state_dtype");
  std::vector<const float*> sf(n);
  for (size_t i = 0; i < n; ++i) sf[i] = static_cast<const float*>(s[i]);
  cuda::AdamWArgs a{};
  a.n = static_cast<int64_t>(n);
  a.params = l.params.data();
  a.grads = l.grads.data();
  a.exp_avg = l.exp_avg.data();
  a.exp_avg_sq = l.exp_avg_sq.data();
  a.max_exp_avg_sq = amsgrad ? l.max_exp_avg_sq.data() : nullptr;
  a.master = l.master.empty() ? nullptr : l.master.data();
  a.numel = numel.data();
  a.step = sf.data();
  a.param_dtype = param_dtype;
  a.state_dtype = state_dtype;
  a.lr = lr;
  a.beta1 = beta1;
  a.beta2 = beta2;
  a.eps = eps;
  a.weight_decay = weight_decay;
  a.amsgrad = amsgrad;
  a.maximize = maximize;
  a.grad_scale = reinterpret_cast<const float*>(grad_scale);
  a.found_inf = reinterpret_cast<const float*>(found_inf);
  a.clip_coef = reinterpret_cast<const float*>(clip_coef);
  a.stochastic_rounding = stochastic_rounding;
  a.seed = seed;
  int err;
  {
    py::gil_scoped_release nogil;
    err = cuda::adamw_step(a, stream);
  }
  check_cuda(err, "adamw_step");
}

void sum_squares_partials_cuda(const Ptrs& ptrs, const std::vector<int64_t>& numel, int dtype, uintptr_t partials,
                               uintptr_t stream) {
  auto p = tensor_list(ptrs, numel);
  to_dtype(dtype, "dtype");
  std::vector<const void*> cp(p.begin(), p.end());
  int err;
  {
    py::gil_scoped_release nogil;
    err = cuda::sum_squares_partials(static_cast<int64_t>(p.size()), cp.data(), numel.data(), dtype,
                                     reinterpret_cast<float*>(partials), stream);
  }
  check_cuda(err, "sum_squares_partials");
}

void clip_coefficient_cuda(uintptr_t partials, int64_t len, double max_norm, uintptr_t grad_scale,
                           uintptr_t total_norm, uintptr_t coef, uintptr_t stream) {
  int err;
  {
    py::gil_scoped_release nogil;
    err = cuda::clip_coefficient(reinterpret_cast<const float*>(partials), len, static_cast<float>(max_norm),
                                 reinterpret_cast<const float*>(grad_scale), reinterpret_cast<float*>(total_norm),
                                 reinterpret_cast<float*>(coef), stream);
  }
  check_cuda(err, "clip_coefficient");
}

void scale_by_cuda(const Ptrs& ptrs, const std::vector<int64_t>& numel, int dtype, uintptr_t coef,
                   uintptr_t stream) {
  auto p = tensor_list(ptrs, numel);
  to_dtype(dtype, "dtype");
  int err;
  {
    py::gil_scoped_release nogil;
    err = cuda::scale_by(static_cast<int64_t>(p.size()), p.data(), numel.data(), dtype,
                         reinterpret_cast<const float*>(coef), stream);
  }
  check_cuda(err, "scale_by");
}
#endif

}  // namespace

void bind_optim(py::module_& m) {
  m.def("adamw_cpu", &adamw_cpu, py::arg("params"), py::arg("grads"), py::arg("exp_avg"), py::arg("exp_avg_sq"),
        py::arg("max_exp_avg_sq"), py::arg("master"), py::arg("numel"), py::arg("step"), py::arg("param_dtype"),
        py::arg("state_dtype"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("amsgrad"), py::arg("maximize"), py::arg("grad_unscale"),
        py::arg("grad_multiplier"), py::arg("write_grad"), py::arg("stochastic_rounding"), py::arg("seed"),
        "One fused AdamW step over CPU tensors given as data pointers (see turbotune.optim); step: pointers\n"
        "to the fp32 step counters, incremented by the call. Each grad is\n"
        "multiplied by grad_unscale (stored back when write_grad) and then by grad_multiplier (clip coefficient).");
  m.def("sum_squares_cpu", &sum_squares_cpu, py::arg("tensors"), py::arg("numel"), py::arg("dtype"),
        "Sum of squares of all elements of the tensors (fp64 result).");
  m.def("scale_cpu", &scale_cpu, py::arg("tensors"), py::arg("numel"), py::arg("dtype"), py::arg("factor"),
        "Multiply every element of the tensors by factor, in place.");
  m.def("adamw_cpu_simd", &cpu::simd_variant, "SIMD variant the CPU AdamW kernels use on this machine.");
#ifdef TURBOTUNE_WITH_CUDA
  m.def("adamw_cuda", &adamw_cuda, py::arg("params"), py::arg("grads"), py::arg("exp_avg"), py::arg("exp_avg_sq"),
        py::arg("max_exp_avg_sq"), py::arg("master"), py::arg("numel"), py::arg("step"), py::arg("param_dtype"),
        py::arg("state_dtype"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("amsgrad"), py::arg("maximize"), py::arg("grad_scale"),
        py::arg("found_inf"), py::arg("clip_coef"), py::arg("stochastic_rounding"), py::arg("seed"),
        py::arg("stream"),
        "One fused multi-tensor AdamW step on the given CUDA stream (no host synchronisation). With grad_scale\n"
        "(device fp32 scalar) the unscaled grads are written back; clip_coef (device fp32 scalar) multiplies them\n"
        "in the update only. 0 = none for either pointer.");
  m.def("multi_tensor_chunk_size", &cuda::multi_tensor_chunk_size);
  m.def("sum_squares_partials_cuda", &sum_squares_partials_cuda, py::arg("tensors"), py::arg("numel"),
        py::arg("dtype"), py::arg("partials"), py::arg("stream"));
  m.def("clip_coefficient_cuda", &clip_coefficient_cuda, py::arg("partials"), py::arg("len"), py::arg("max_norm"),
        py::arg("grad_scale"), py::arg("total_norm"), py::arg("coef"), py::arg("stream"));
  m.def("scale_by_cuda", &scale_by_cuda, py::arg("tensors"), py::arg("numel"), py::arg("dtype"), py::arg("coef"),
        py::arg("stream"));
#endif
}

}  // namespace turbotune
