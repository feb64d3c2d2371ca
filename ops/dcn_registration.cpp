// Registers the modulated deformable convolution (DCNv2) ops in the `bevdeform` namespace of the PyTorch dispatcher,
// as a fragment of the library that ops/msda_registration.cpp defines: the schemas, the CPU kernels and, when built
// with CUDA, the CUDA kernels. Fake kernels and autograd are registered from Python (bevdeform/dcn.py).
#include <torch/library.h>

#include "dcn.h"

TORCH_LIBRARY_FRAGMENT(bevdeform, m) {
  m.def(
      "modulated_deform_conv2d(Tensor input, Tensor offset, Tensor mask, Tensor weight, Tensor? bias, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, int deform_groups) -> Tensor");
  m.def(
      "modulated_deform_conv2d_backward(Tensor input, Tensor offset, Tensor mask, Tensor weight, Tensor? bias, "
      "Tensor grad_output, int[2] stride, int[2] padding, int[2] dilation, int groups, int deform_groups) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bevdeform, CPU, m) {
  m.impl("modulated_deform_conv2d", &bevdeform::modulated_deform_conv2d_forward_cpu);
  m.impl("modulated_deform_conv2d_backward", &bevdeform::modulated_deform_conv2d_backward_cpu);
}

#ifdef BEVDEFORM_WITH_CUDA
TORCH_LIBRARY_IMPL(bevdeform, CUDA, m) {
  m.impl("modulated_deform_conv2d", &bevdeform::modulated_deform_conv2d_forward_cuda);
  m.impl("modulated_deform_conv2d_backward", &bevdeform::modulated_deform_conv2d_backward_cuda);
}
#endif
