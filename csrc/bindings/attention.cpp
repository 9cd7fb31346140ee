// Python bindings of the CPU attention kernels (csrc/cpu/attention.h).
//
// Tensors cross as (data pointer, batch stride, head stride, row stride, dim
// stride) tuples of Python ints; the Python launcher
// (turbotune.ops._attention_native_cpu) checks shapes, dtypes and devices and
// allocates the outputs. The C++ side re-checks cu_seqlens before reading any
// tensor, so no value makes it read out of bounds. The GIL is released while
// the kernels run.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>

#include "bindings/bindings.h"
#include "cpu/attention.h"

namespace py = pybind11;

namespace turbotune {
namespace {

using View = std::tuple<uintptr_t, int64_t, int64_t, int64_t, int64_t>;  // ptr, sb, sh, sr, sd

cpu::AttnView to_view(const View& t) {
  cpu::AttnView v;
  v.ptr = reinterpret_cast<void*>(std::get<0>(t));
  v.sb = std::get<1>(t);
  v.sh = std::get<2>(t);
  v.sr = std::get<3>(t);
  v.sd = std::get<4>(t);
  return v;
}

struct ProblemArgs {
  cpu::AttnProblem p;
  std::string simd;
};

ProblemArgs problem(int dtype, int64_t batch, int64_t heads, int64_t head_dim, int64_t seqlen_q, int64_t seqlen_k,
                    uintptr_t cu_q, uintptr_t cu_k, int64_t total_q, int64_t total_k, uintptr_t key_mask,
                    int64_t mask_sb, int64_t mask_sk, bool causal, double scale, double dropout_p,
                    uint32_t dropout_threshold, uint64_t seed, uint32_t offset, int num_threads,
                    const std::string& simd) {
  if (dtype < 0 || dtype > 2)
    throw std::invalid_argument("attention: dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16), got " +
                                std::to_string(dtype));
  if ((cu_q == 0) != (cu_k == 0))
    throw std::invalid_argument("attention: cu_seqlens_q and cu_seqlens_k must both be given or both be 0");
  ProblemArgs a;
  cpu::AttnProblem& p = a.p;
  p.dtype = static_cast<cpu::DType>(dtype);
  p.batch = batch;
  p.heads = heads;
  p.head_dim = head_dim;
  p.seqlen_q = seqlen_q;
  p.seqlen_k = seqlen_k;
  p.cu_q = reinterpret_cast<const int32_t*>(cu_q);
  p.cu_k = reinterpret_cast<const int32_t*>(cu_k);
  p.total_q = total_q;
  p.total_k = total_k;
  p.key_mask = reinterpret_cast<const uint8_t*>(key_mask);
  p.mask_sb = mask_sb;
  p.mask_sk = mask_sk;
  p.causal = causal;
  p.scale = scale;
  p.dropout_p = dropout_p;
  p.dropout_threshold = dropout_threshold;
  p.seed = seed;
  p.offset = offset;
  p.num_threads = num_threads;
  a.simd = simd;
  return a;
}

void forward_cpu(int dtype, int64_t batch, int64_t heads, int64_t head_dim, int64_t seqlen_q, int64_t seqlen_k,
                 uintptr_t cu_q, uintptr_t cu_k, int64_t total_q, int64_t total_k, uintptr_t key_mask,
                 int64_t mask_sb, int64_t mask_sk, bool causal, double scale, double dropout_p,
                 uint32_t dropout_threshold, uint64_t seed, uint32_t offset, int num_threads,
                 const std::string& simd, const View& q, const View& k, const View& v, const View& out,
                 const View& lse) {
  ProblemArgs a = problem(dtype, batch, heads, head_dim, seqlen_q, seqlen_k, cu_q, cu_k, total_q, total_k, key_mask,
                          mask_sb, mask_sk, causal, scale, dropout_p, dropout_threshold, seed, offset, num_threads,
                          simd);
  a.p.simd = a.simd.c_str();
  py::gil_scoped_release nogil;
  cpu::attention_forward(a.p, to_view(q), to_view(k), to_view(v), to_view(out), to_view(lse));
}

void backward_cpu(int dtype, int64_t batch, int64_t heads, int64_t head_dim, int64_t seqlen_q, int64_t seqlen_k,
                  uintptr_t cu_q, uintptr_t cu_k, int64_t total_q, int64_t total_k, uintptr_t key_mask,
                  int64_t mask_sb, int64_t mask_sk, bool causal, double scale, double dropout_p,
                  uint32_t dropout_threshold, uint64_t seed, uint32_t offset, int num_threads,
                  const std::string& simd, const View& dout, const View& q, const View& k, const View& v,
                  const View& out, const View& lse, const View& dq, const View& dk, const View& dv) {
  ProblemArgs a = problem(dtype, batch, heads, head_dim, seqlen_q, seqlen_k, cu_q, cu_k, total_q, total_k, key_mask,
                          mask_sb, mask_sk, causal, scale, dropout_p, dropout_threshold, seed, offset, num_threads,
                          simd);
  a.p.simd = a.simd.c_str();
  py::gil_scoped_release nogil;
  cpu::attention_backward(a.p, to_view(dout), to_view(q), to_view(k), to_view(v), to_view(out), to_view(lse),
                          to_view(dq), to_view(dk), to_view(dv));
}

void dropout_mask_cpu(uintptr_t mask, int64_t bh0, int64_t n_heads, int64_t seqlen_q, int64_t seqlen_k,
                      uint32_t threshold, uint64_t seed, uint32_t offset, const std::string& simd) {
  py::gil_scoped_release nogil;
  cpu::attention_dropout_mask(reinterpret_cast<uint8_t*>(mask), bh0, n_heads, seqlen_q, seqlen_k, threshold, seed,
                              offset, simd.c_str());
}

}  // namespace

void bind_attention(py::module_& m) {
  auto common = [](auto&&... extra) {
    return std::make_tuple(py::arg("dtype"), py::arg("batch"), py::arg("heads"), py::arg("head_dim"),
                           py::arg("seqlen_q"), py::arg("seqlen_k"), py::arg("cu_seqlens_q"),
                           py::arg("cu_seqlens_k"), py::arg("total_q"), py::arg("total_k"), py::arg("key_mask"),
                           py::arg("mask_stride_b"), py::arg("mask_stride_k"), py::arg("causal"), py::arg("scale"),
                           py::arg("dropout_p"), py::arg("dropout_threshold"), py::arg("seed"), py::arg("offset"),
                           py::arg("num_threads"), py::arg("simd"), extra...);
  };
  std::apply(
      [&](auto&&... args) {
        m.def("attention_forward_cpu", &forward_cpu, args...,
              "CPU attention forward: out and lse (fp32) from q, k, v given as (ptr, sb, sh, sr, sd) views "
              "(see turbotune.ops._attention_native_cpu).");
      },
      common(py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse")));
  std::apply(
      [&](auto&&... args) {
        m.def("attention_backward_cpu", &backward_cpu, args...,
              "CPU attention backward: dq, dk, dv from dout, q, k, v, out, lse (dropout mask regenerated).");
      },
      common(py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
             py::arg("dq"), py::arg("dk"), py::arg("dv")));
  m.def("attention_dropout_mask_cpu", &dropout_mask_cpu, py::arg("mask"), py::arg("bh0"), py::arg("n_heads"),
        py::arg("seqlen_q"), py::arg("seqlen_k"), py::arg("threshold"), py::arg("seed"), py::arg("offset"),
        py::arg("simd"), "Keep mask (uint8, (n_heads, Lq, Lk) contiguous) of the CPU attention kernels' dropout.");
  m.def(
      "attention_cpu_simd", [](const std::string& simd) { return std::string(cpu::attention_simd_variant(simd.c_str())); },
      py::arg("simd") = "auto", "SIMD variant the CPU attention kernels use for the request ('auto' = best).");
}

}  // namespace turbotune
