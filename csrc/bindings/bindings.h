// Each area of the native core exposes one bind_<area>() that adds its
// functions to the _C module. module.cpp calls them in order.
#pragma once

#include <pybind11/pybind11.h>

namespace turbotune {

void bind_attention(pybind11::module_& m);
void bind_core(pybind11::module_& m);
void bind_optim(pybind11::module_& m);
void bind_tokenizer(pybind11::module_& m);

}  // namespace turbotune
