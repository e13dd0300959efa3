#pragma once
#include <pybind11/pybind11.h>
void bind_model(pybind11::module_ & m);
void bind_attn(pybind11::module_ & m);
