#include "bindings.h"
void bind_model(pybind11::module_ &) {}
