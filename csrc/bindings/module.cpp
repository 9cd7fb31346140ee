#include "bindings/bindings.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "turbotune native core (host C++; CUDA kernels when built with TURBOTUNE_CUDA)";
  turbotune::bind_core(m);
  turbotune::bind_attention(m);
  turbotune::bind_optim(m);
  turbotune::bind_tokenizer(m);
}
