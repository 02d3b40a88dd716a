// C entry points for the kernels, so that a step compiled ahead of time (core/backends/aot_step.py) calls them from
// its C++ wrapper directly: without them AOTInductor's proxy executor boxes every call's arguments into IValues and
// dispatches it by name. The name is the one inductor derives from the op's (`aoti_torch_cpu_<op name>`,
// `custom_ops_to_c_shims` in core/kernels/__init__.py); the process makes the library's symbols global before it
// loads such a step.
#pragma once

#include <torch/csrc/inductor/aoti_torch/utils.h>

#include <utility>

namespace recipes_scaffold {

inline const at::Tensor& tensor_of(AtenTensorHandle handle) {
  return *torch::aot_inductor::tensor_handle_to_tensor_pointer(handle);
}

template <typename Kernel, typename... Arguments>
AOTITorchError shim_call(AtenTensorHandle* result, Kernel kernel, Arguments&&... arguments) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE(
      { *result = torch::aot_inductor::new_tensor_handle(kernel(std::forward<Arguments>(arguments)...)); });
}

}  // namespace recipes_scaffold
