// Multi-scale deformable attention: declarations shared by the CPU and CUDA kernels and the registration file.
//
// Contract (Deformable DETR / mmcv / BEVFormer):
//   value               (B, S, M, D)        S = sum_l H_l * W_l, levels flattened row-major
//   spatial_shapes      (L, 2)   int64      (H_l, W_l)
//   level_start_index   (L,)     int64      offset of each level in S
//   sampling_locations  (B, Q, M, L, P, 2)  normalised (x, y), x first; pixel = x * W - 0.5 (grid_sample,
//                                           align_corners=False, zero padding)
//   attention_weights   (B, Q, M, L, P)
//   output              (B, Q, M * D)
// A non-finite location makes its (b, q, m) output NaN (as the grid_sample reference does); a finite location
// with pixel x < -1 or x >= W (likewise y) contributes nothing and gets zero gradient. At exactly x == -1 the
// sample's value is 0 (corner x0 = -1 is outside, corner x1 = 0 has weight 0) but, as in grid_sample, its
// gradient is the one-sided one of x0 = floor(x): d/dx = v(y, 0) weighted, not 0. Coordinates and accumulation are float32 (float64 for
// double). The Python side validates shapes, dtypes and devices and makes every tensor contiguous.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace bevdeform {

// The (H, W) a kernel uses for a level: the given one when the level is a block of S rows (start >= 0, H, W > 0,
// start + H * W <= S), else (0, 0), which every location misses (no read, no write, zero gradient). The Python side
// refuses inconsistent tables before any kernel runs, except while torch.compile traces or a CUDA graph captures
// (reading them would sync); this keeps a wrong table there from reading or writing outside value / grad_value.
#if defined(__CUDACC__)
__host__ __device__
#endif
inline void level_extent_within(int64_t start, int64_t S, int64_t& H, int64_t& W) {
  if (start < 0 || H <= 0 || W <= 0 || H > S || W > S || start + H * W > S) {
    H = 0;
    W = 0;
  }
}

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights);

// Returns (grad_value, grad_sampling_locations, grad_attention_weights), shaped like the inputs.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights, const at::Tensor& grad_output);

#ifdef BEVDEFORM_WITH_CUDA
at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights, const at::Tensor& grad_output);
#endif

}  // namespace bevdeform
