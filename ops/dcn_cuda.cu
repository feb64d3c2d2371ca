// CUDA kernels of the modulated deformable convolution (DCNv2): deformable im2col + cuBLAS GEMM, forward and
// backward. The contract is in dcn.h and bevdeform/dcn.py; registration lives in dcn_registration.cpp.
//
// Design:
//   - One thread per sample (deform group g, kernel point k, output pixel l) of one image. It computes the sample's
//     pixel coordinates, corner indices and bilinear weights once (dcn_locate, shared with the CPU kernel) and walks
//     the C / G channels of its group, so nothing is recomputed per channel. Consecutive threads hold consecutive
//     output pixels, so the column writes (row c * K + k, column l) and the offset / mask reads are coalesced.
//   - Coordinates, bilinear weights and every sum are in at::opmath_type<scalar_t>: float for float / half /
//     bfloat16, double for double. For half / bfloat16 grad_input is accumulated in a zero-initialised float buffer
//     (float atomics are native; 16-bit ones are compare-and-swap loops before sm_90) and cast at the end; so is
//     grad_weight across images.
//   - The GEMMs are ATen's (cuBLAS): out = W @ col and grad_col = W^T @ grad_out per conv group, written with
//     at::mm_out into the output / the column buffer; one column buffer of one image is reused for every image.
//   - The sample test -1 < y < H, -1 < x < W runs before any float -> int conversion, so NaN, inf and huge offsets
//     never produce an index; every index is int64 (N * C * H * W, C * K * L pass 2^31 at large shapes).
//   - grad_offset and grad_mask have one owner thread per element (no atomics, no memset); grad_input gets 4 float
//     atomics per channel and sample, so it is not bitwise deterministic run to run.
#include "dcn.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace bevdeform {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // beyond this the grid-stride loop takes over

// Sizes a kernel needs, as plain int64 fields (DcnShape's member functions are host-only).
struct Geometry {
  int64_t C, H, W, kh, kw, Ho, Wo, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, G;
};

Geometry geometry_of(const DcnShape& s) {
  return Geometry{s.C,        s.H,        s.W,     s.kh,    s.kw,    s.Ho,    s.Wo,
                  s.stride_h, s.stride_w, s.pad_h, s.pad_w, s.dil_h, s.dil_w, s.deform_groups};
}

// Sample (g, k, l) of one image: its pixel coordinates from the regular grid plus the offsets (mmcv's layout:
// offset channel g * 2K + 2k = dy, + 1 = dx; mask channel g * K + k), located on the (H, W) map.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ bool locate_sample(const Geometry& geo, const scalar_t* __restrict__ offset_n,
                                              const scalar_t* __restrict__ mask_n, const int64_t g, const int64_t k,
                                              const int64_t l, DcnSample<acc_t>& sample, acc_t& mask) {
  const int64_t K = geo.kh * geo.kw;
  const int64_t L = geo.Ho * geo.Wo;
  const int64_t i = k / geo.kw;
  const int64_t j = k - i * geo.kw;
  const int64_t ho = l / geo.Wo;
  const int64_t wo = l - ho * geo.Wo;
  const acc_t dy = static_cast<acc_t>(offset_n[(g * 2 * K + 2 * k) * L + l]);
  const acc_t dx = static_cast<acc_t>(offset_n[(g * 2 * K + 2 * k + 1) * L + l]);
  mask = static_cast<acc_t>(mask_n[(g * K + k) * L + l]);
  const acc_t y = static_cast<acc_t>(ho * geo.stride_h - geo.pad_h + i * geo.dil_h) + dy;
  const acc_t x = static_cast<acc_t>(wo * geo.stride_w - geo.pad_w + j * geo.dil_w) + dx;
  return dcn_locate<acc_t>(y, x, geo.H, geo.W, sample);
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t corner_value(const scalar_t* __restrict__ plane, const int64_t index) {
  return index >= 0 ? static_cast<acc_t>(plane[index]) : acc_t(0);
}

// col (C * K, L) of one image: row c * K + k = mask * bilinear(input[c]) at sample (g(c), k, l).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    dcn_im2col_kernel(const scalar_t* __restrict__ input_n,   // (C, H, W)
                      const scalar_t* __restrict__ offset_n,  // (G * 2K, L)
                      const scalar_t* __restrict__ mask_n,    // (G * K, L)
                      scalar_t* __restrict__ col,             // (C * K, L)
                      const Geometry geo) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = geo.kh * geo.kw;
  const int64_t L = geo.Ho * geo.Wo;
  const int64_t HW = geo.H * geo.W;
  const int64_t Cg = geo.C / geo.G;
  const int64_t total = geo.G * K * L;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    // idx = (g * K + k) * L + l
    const int64_t l = idx % L;
    const int64_t k = (idx / L) % K;
    const int64_t g = idx / (K * L);
    DcnSample<acc_t> sample;
    acc_t mask;
    const bool valid = locate_sample<scalar_t, acc_t>(geo, offset_n, mask_n, g, k, l, sample, mask);
    for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
      acc_t value = acc_t(0);
      if (valid) {
        const scalar_t* plane = input_n + c * HW;
        value = sample.weight[0] * corner_value<scalar_t, acc_t>(plane, sample.index[0]) +
                sample.weight[1] * corner_value<scalar_t, acc_t>(plane, sample.index[1]) +
                sample.weight[2] * corner_value<scalar_t, acc_t>(plane, sample.index[2]) +
                sample.weight[3] * corner_value<scalar_t, acc_t>(plane, sample.index[3]);
      }
      col[(c * K + k) * L + l] = static_cast<scalar_t>(mask * value);  // off-map: mask * 0, as the CPU kernel
    }
  }
}

// grad_col (C * K, L) of one image -> grad_input_n (C, H, W) (atomics into zeros, acc_t), grad_offset_n (G * 2K, L)
// and grad_mask_n (G * K, L) (one writer each).
template <typename scalar_t, typename grad_input_t>
__global__ void __launch_bounds__(kThreads)
    dcn_col2im_coord_kernel(const scalar_t* __restrict__ input_n, const scalar_t* __restrict__ offset_n,
                            const scalar_t* __restrict__ mask_n, const scalar_t* __restrict__ grad_col,
                            grad_input_t* __restrict__ grad_input_n, scalar_t* __restrict__ grad_offset_n,
                            scalar_t* __restrict__ grad_mask_n, const Geometry geo) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = geo.kh * geo.kw;
  const int64_t L = geo.Ho * geo.Wo;
  const int64_t HW = geo.H * geo.W;
  const int64_t Cg = geo.C / geo.G;
  const int64_t total = geo.G * K * L;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t l = idx % L;
    const int64_t k = (idx / L) % K;
    const int64_t g = idx / (K * L);
    DcnSample<acc_t> sample;
    acc_t mask;
    const bool valid = locate_sample<scalar_t, acc_t>(geo, offset_n, mask_n, g, k, l, sample, mask);
    acc_t sum_mask = acc_t(0), sum_y = acc_t(0), sum_x = acc_t(0);
    if (valid) {
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        const scalar_t* plane = input_n + c * HW;
        const acc_t gc = static_cast<acc_t>(grad_col[(c * K + k) * L + l]);
        const acc_t v00 = corner_value<scalar_t, acc_t>(plane, sample.index[0]);
        const acc_t v01 = corner_value<scalar_t, acc_t>(plane, sample.index[1]);
        const acc_t v10 = corner_value<scalar_t, acc_t>(plane, sample.index[2]);
        const acc_t v11 = corner_value<scalar_t, acc_t>(plane, sample.index[3]);
        sum_mask += gc * (sample.weight[0] * v00 + sample.weight[1] * v01 + sample.weight[2] * v10 +
                          sample.weight[3] * v11);
        // d bilinear / dy and / dx with off-map corners reading 0 (one-sided at integer positions)
        sum_y += gc * ((acc_t(1) - sample.fx) * (v10 - v00) + sample.fx * (v11 - v01));
        sum_x += gc * ((acc_t(1) - sample.fy) * (v01 - v00) + sample.fy * (v11 - v10));
        const acc_t gm = gc * mask;
        grad_input_t* grad_plane = grad_input_n + c * HW;
#pragma unroll
        for (int corner = 0; corner < 4; ++corner) {
          if (sample.index[corner] >= 0) atomicAdd(grad_plane + sample.index[corner], gm * sample.weight[corner]);
        }
      }
    }
    // Off-map and non-finite samples: zero gradients (their value is 0 whatever the offset and mask).
    grad_mask_n[(g * K + k) * L + l] = static_cast<scalar_t>(sum_mask);
    grad_offset_n[(g * 2 * K + 2 * k) * L + l] = static_cast<scalar_t>(valid ? mask * sum_y : acc_t(0));
    grad_offset_n[(g * 2 * K + 2 * k + 1) * L + l] = static_cast<scalar_t>(valid ? mask * sum_x : acc_t(0));
  }
}

unsigned blocks_for(const int64_t total) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, kMaxBlocks)));
}

void check_cuda(const at::Tensor& t, const char* name, const at::Tensor& input) {
  TORCH_CHECK(t.device() == input.device(), "modulated_deform_conv2d (CUDA): ", name, " is on ", t.device(),
              ", expected the device of input, ", input.device());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), "modulated_deform_conv2d (CUDA): ", name, " has dtype ",
              t.scalar_type(), ", expected ", input.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "modulated_deform_conv2d (CUDA): ", name,
              " must be contiguous (the Python wrapper makes it so)");
}

DcnShape check_all(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                   at::IntArrayRef dilation, int64_t groups, int64_t deform_groups) {
  TORCH_CHECK(input.is_cuda(), "modulated_deform_conv2d (CUDA): input must be a CUDA tensor, got ", input.device());
  check_cuda(input, "input", input);
  check_cuda(offset, "offset", input);
  check_cuda(mask, "mask", input);
  check_cuda(weight, "weight", input);
  if (bias.has_value() && bias->defined()) check_cuda(*bias, "bias", input);
  return dcn_check_shapes(input, offset, mask, weight, bias, stride, padding, dilation, groups, deform_groups);
}

}  // namespace

at::Tensor modulated_deform_conv2d_forward_cuda(const at::Tensor& input, const at::Tensor& offset,
                                                const at::Tensor& mask, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                                int64_t deform_groups) {
  const DcnShape s = check_all(input, offset, mask, weight, bias, stride, padding, dilation, groups, deform_groups);
  const c10::cuda::OptionalCUDAGuard device_guard(input.device());
  const int64_t K = s.K();
  const int64_t L = s.L();
  const int64_t Cg_conv = s.C / groups;
  const int64_t Co_conv = s.C_out / groups;
  at::Tensor output = at::empty({s.N, s.C_out, s.Ho, s.Wo}, input.options());
  if (s.N == 0 || s.C_out == 0) return output;
  at::Tensor col = at::empty({s.C * K, L}, input.options());
  const at::Tensor weight_g = weight.view({groups, Co_conv, Cg_conv * K});  // (groups, C_out / groups, C / groups * K)
  const at::Tensor col_g = col.view({groups, Cg_conv * K, L});               // (groups, C / groups * K, L)
  const Geometry geo = geometry_of(s);
  const int64_t samples = s.deform_groups * K * L;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "modulated_deform_conv2d_cuda", [&] {
    for (int64_t n = 0; n < s.N; ++n) {
      dcn_im2col_kernel<scalar_t><<<blocks_for(samples), kThreads, 0, stream>>>(
          input.const_data_ptr<scalar_t>() + n * s.C * s.H * s.W,
          offset.const_data_ptr<scalar_t>() + n * 2 * s.deform_groups * K * L,
          mask.const_data_ptr<scalar_t>() + n * s.deform_groups * K * L, col.mutable_data_ptr<scalar_t>(), geo);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::Tensor out_g = output[n].view({groups, Co_conv, L});  // (C_out, Ho, Wo) -> (groups, C_out / groups, L)
      for (int64_t grp = 0; grp < groups; ++grp) {
        at::Tensor out_slice = out_g[grp];
        at::mm_out(out_slice, weight_g[grp], col_g[grp]);
      }
    }
  });
  if (bias.has_value() && bias->defined()) output.add_(bias->view({1, s.C_out, 1, 1}));
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> modulated_deform_conv2d_backward_cuda(
    const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& grad_output, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t deform_groups) {
  const DcnShape s = check_all(input, offset, mask, weight, bias, stride, padding, dilation, groups, deform_groups);
  check_cuda(grad_output, "grad_output", input);
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == s.N && grad_output.size(1) == s.C_out &&
                  grad_output.size(2) == s.Ho && grad_output.size(3) == s.Wo,
              "modulated_deform_conv2d_backward (CUDA): grad_output must be (N, C_out, Ho, Wo) = (", s.N, ", ",
              s.C_out, ", ", s.Ho, ", ", s.Wo, "), got ", grad_output.sizes());
  const c10::cuda::OptionalCUDAGuard device_guard(input.device());
  const int64_t K = s.K();
  const int64_t L = s.L();
  const int64_t Cg_conv = s.C / groups;
  const int64_t Co_conv = s.C_out / groups;
  // Written in full by the kernel (one owner per element), so no memset.
  at::Tensor grad_offset = at::empty_like(offset);
  at::Tensor grad_mask = at::empty_like(mask);
  at::Tensor grad_input, grad_weight, grad_bias;
  const Geometry geo = geometry_of(s);
  const int64_t samples = s.deform_groups * K * L;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "modulated_deform_conv2d_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        constexpr bool kWide = std::is_same<acc_t, scalar_t>::value;  // float / double: accumulate in place
        const auto acc_options = input.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
        at::Tensor grad_input_acc = at::zeros(input.sizes(), acc_options);
        at::Tensor grad_weight_acc = at::zeros(weight.sizes(), acc_options);
        grad_bias = grad_output.sum({0, 2, 3}, /*keepdim=*/false, c10::CppTypeToScalarType<acc_t>::value);
        if (s.N > 0 && s.C_out > 0) {
          at::Tensor col = at::empty({s.C * K, L}, input.options());
          const at::Tensor weight_g = weight.view({groups, Co_conv, Cg_conv * K});
          at::Tensor grad_weight_g = grad_weight_acc.view({groups, Co_conv, Cg_conv * K});
          const at::Tensor col_g = col.view({groups, Cg_conv * K, L});
          for (int64_t n = 0; n < s.N; ++n) {
            const scalar_t* input_n = input.const_data_ptr<scalar_t>() + n * s.C * s.H * s.W;
            const scalar_t* offset_n = offset.const_data_ptr<scalar_t>() + n * 2 * s.deform_groups * K * L;
            const scalar_t* mask_n = mask.const_data_ptr<scalar_t>() + n * s.deform_groups * K * L;
            dcn_im2col_kernel<scalar_t><<<blocks_for(samples), kThreads, 0, stream>>>(
                input_n, offset_n, mask_n, col.mutable_data_ptr<scalar_t>(), geo);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
            const at::Tensor grad_out_g = grad_output[n].view({groups, Co_conv, L});  // (groups, C_out / groups, L)
            if constexpr (kWide) {
              for (int64_t grp = 0; grp < groups; ++grp) {
                grad_weight_g[grp].addmm_(grad_out_g[grp], col_g[grp].t());
              }
            } else {
              // In float: a half GEMM would round each image's sum over L pixels to 16 bits (and overflow past
              // 65504) before it reached the float accumulator. One cast of the columns and gradients per image.
              const at::Tensor col_acc_g = col_g.to(acc_options.dtype());          // (groups, Cg * K, L)
              const at::Tensor grad_out_acc_g = grad_out_g.to(acc_options.dtype());  // (groups, C_out / groups, L)
              for (int64_t grp = 0; grp < groups; ++grp) {
                grad_weight_g[grp].addmm_(grad_out_acc_g[grp], col_acc_g[grp].t());
              }
            }
            for (int64_t grp = 0; grp < groups; ++grp) {
              at::Tensor col_slice = col_g[grp];
              at::mm_out(col_slice, weight_g[grp].t(), grad_out_g[grp]);
            }
            dcn_col2im_coord_kernel<scalar_t, acc_t><<<blocks_for(samples), kThreads, 0, stream>>>(
                input_n, offset_n, mask_n, col.const_data_ptr<scalar_t>(),
                grad_input_acc.mutable_data_ptr<acc_t>() + n * s.C * s.H * s.W,
                grad_offset.mutable_data_ptr<scalar_t>() + n * 2 * s.deform_groups * K * L,
                grad_mask.mutable_data_ptr<scalar_t>() + n * s.deform_groups * K * L, geo);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
        }
        if (s.N > 0 && s.C_out == 0) {  // no kernel ran: the samples get zero gradients
          grad_offset.zero_();
          grad_mask.zero_();
        }
        grad_input = kWide ? grad_input_acc : grad_input_acc.to(input.scalar_type());
        grad_weight = kWide ? grad_weight_acc : grad_weight_acc.to(weight.scalar_type());
        grad_bias = grad_bias.to(weight.scalar_type());
      });
  return std::make_tuple(grad_input, grad_offset, grad_mask, grad_weight, grad_bias);
}

}  // namespace bevdeform
