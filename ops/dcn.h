// Modulated deformable convolution (DCNv2): declarations and the sample geometry shared by the CPU and CUDA kernels
// and the registration file (ops/dcn_registration.cpp).
//
// Contract (mmcv's modulated_deform_conv2d; bevdeform/dcn.py has the full statement):
//   input   (N, C, H, W)
//   offset  (N, 2 * G * K, Ho, Wo)   K = kh * kw, k = i * kw + j; channel g * 2K + 2k = dy, g * 2K + 2k + 1 = dx
//   mask    (N, G * K, Ho, Wo)       channel g * K + k
//   weight  (C_out, C / groups, kh, kw), bias (C_out,) or undefined
//   output  (N, C_out, Ho, Wo)
// Sample of (ho, wo, k, g): y = ho * stride_h - pad_h + i * dil_h + dy, x likewise (pixel centres on integers);
// bilinear with zero outside the map; it counts only when -1 < y < H and -1 < x < W (NaN / inf fail the test and
// contribute nothing, with zero gradient). Gradients are those of floor(y), floor(x): one-sided at integers.
// The Python side validates shapes, dtypes and devices and makes every tensor contiguous.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#ifdef __CUDACC__
#define BEVDEFORM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define BEVDEFORM_HOST_DEVICE inline
#endif

namespace bevdeform {

// Sizes of one call, checked once on the host.
struct DcnShape {
  int64_t N, C, H, W;      // input
  int64_t C_out, kh, kw;   // weight
  int64_t Ho, Wo;          // output
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t groups, deform_groups;
  int64_t K() const { return kh * kw; }
  int64_t L() const { return Ho * Wo; }
};

// Checks the tensors against each other (cheap TORCH_CHECKs: the Python wrapper has already raised ValueErrors
// naming the argument; these guard direct calls of torch.ops.bevdeform.*) and returns the sizes.
DcnShape dcn_check_shapes(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
                          const at::Tensor& weight, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t deform_groups);

// Bilinear footprint of one sample on an (H, W) plane: element index of each corner (y0, x0), (y0, x1), (y1, x0),
// (y1, x1) in the plane, -1 when that corner is off the map, and the bilinear weights (0 when off the map).
template <typename acc_t>
struct DcnSample {
  int64_t index[4];
  acc_t weight[4];
  acc_t fy, fx;  // y - floor(y), x - floor(x)
};

template <typename acc_t>
BEVDEFORM_HOST_DEVICE acc_t dcn_floor(acc_t v) {
#ifdef __CUDA_ARCH__
  return floor(v);
#else
  return std::floor(v);
#endif
}

// Fills s and returns true when the sample lies strictly inside (-1, H) x (-1, W); false otherwise, NaN and inf
// included. The test runs before any float -> int conversion, so NaN / inf / huge values never reach one, and
// every index it produces lies in [0, H * W).
template <typename acc_t>
BEVDEFORM_HOST_DEVICE bool dcn_locate(const acc_t y, const acc_t x, const int64_t H, const int64_t W,
                                      DcnSample<acc_t>& s) {
  if (!(y > acc_t(-1) && y < static_cast<acc_t>(H) && x > acc_t(-1) && x < static_cast<acc_t>(W))) return false;
  const acc_t y0f = dcn_floor(y);
  const acc_t x0f = dcn_floor(x);
  const int64_t y0 = static_cast<int64_t>(y0f);  // in [-1, H - 1]
  const int64_t x0 = static_cast<int64_t>(x0f);  // in [-1, W - 1]
  s.fy = y - y0f;
  s.fx = x - x0f;
  const acc_t wy[2] = {acc_t(1) - s.fy, s.fy};
  const acc_t wx[2] = {acc_t(1) - s.fx, s.fx};
  for (int dy = 0; dy < 2; ++dy) {
    for (int dx = 0; dx < 2; ++dx) {
      const int64_t yy = y0 + dy;
      const int64_t xx = x0 + dx;
      const int corner = dy * 2 + dx;
      // yy < H and xx < W are re-tested: float(H) may round up for H > 2^24 (float32 coordinates).
      if (yy >= 0 && yy < H && xx >= 0 && xx < W) {
        s.index[corner] = yy * W + xx;
        s.weight[corner] = wy[dy] * wx[dx];
      } else {
        s.index[corner] = -1;
        s.weight[corner] = acc_t(0);
      }
    }
  }
  return true;
}

at::Tensor modulated_deform_conv2d_forward_cpu(const at::Tensor& input, const at::Tensor& offset,
                                               const at::Tensor& mask, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                               int64_t deform_groups);

// Returns (grad_input, grad_offset, grad_mask, grad_weight, grad_bias); grad_bias is (C_out,) even without a bias.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> modulated_deform_conv2d_backward_cpu(
    const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& grad_output, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t deform_groups);

#ifdef BEVDEFORM_WITH_CUDA
at::Tensor modulated_deform_conv2d_forward_cuda(const at::Tensor& input, const at::Tensor& offset,
                                                const at::Tensor& mask, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                                int64_t deform_groups);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> modulated_deform_conv2d_backward_cuda(
    const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& grad_output, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t deform_groups);
#endif

}  // namespace bevdeform
