// Registers the MSDA op in the `bevdeform` namespace of the PyTorch dispatcher: the schemas, the CPU kernels and,
// when built with CUDA, the CUDA kernels. Fake (meta) kernels and autograd are registered from Python
// (bevdeform/msda.py), so torch.compile and torch.export see the op as one opaque node.
#include <torch/library.h>

#include "msda.h"

TORCH_LIBRARY(bevdeform, m) {
  m.def(
      "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, Tensor sampling_locations, "
      "Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, Tensor grad_output) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bevdeform, CPU, m) {
  m.impl("ms_deform_attn", &bevdeform::ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &bevdeform::ms_deform_attn_backward_cpu);
}

#ifdef BEVDEFORM_WITH_CUDA
TORCH_LIBRARY_IMPL(bevdeform, CUDA, m) {
  m.impl("ms_deform_attn", &bevdeform::ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &bevdeform::ms_deform_attn_backward_cuda);
}
#endif
