// Multi-scale deformable attention, CPU kernels (float32 and float64).
//
// Forward: parallel over (b, q); each task computes all heads of its query. Backward: parallel over
// (b, m, l): the rows of grad_value a task writes (batch b, head m, level l) are disjoint from every other
// task's, so grad_value is accumulated without atomics and without per-thread copies; grad_loc and grad_weight
// of (b, q, m, l, p) belong to exactly one task too. The backward allocates only the three gradients it returns.
//
// Every sample's corner offsets and bilinear weights are computed once and applied to all D channels in a
// contiguous inner loop that the compiler vectorises (value rows are D-contiguous).
#include "msda.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

namespace bevdeform {
namespace {

// One bilinear sample of one level: the element offsets of the four corners' value rows (head 0; the caller adds
// m * D) and their bilinear weights. Corners outside the map get weight 0 and the caller points them at a row
// of zeros (reads) or a scratch row (writes), so the channel loop is branch-free.
template <typename acc_t>
struct Corners {
  int64_t offset[4];  // element offsets into value for (y0,x0), (y0,x1), (y1,x0), (y1,x1); -1 when outside
  acc_t weight[4];    // bilinear weights of the same corners (0 when outside)
  acc_t fx, fy;       // fractional parts: x - x0, y - y0
};

enum class SampleKind { kSkip, kNonFinite, kInside };

// Pixel coordinates follow grid_sample(align_corners=False): x = loc_x * W - 0.5.
// A sample with x < -1 or x >= W (likewise y with H) touches no pixel. Comparisons are written so that NaN
// fails the "inside" test; the caller distinguishes non-finite coordinates, which poison the output as the
// grid_sample reference does.
template <typename acc_t>
inline SampleKind locate(acc_t loc_x, acc_t loc_y, int64_t H, int64_t W, int64_t row_base, int64_t row_stride,
                         Corners<acc_t>& c) {
  const acc_t x = loc_x * static_cast<acc_t>(W) - acc_t(0.5);
  const acc_t y = loc_y * static_cast<acc_t>(H) - acc_t(0.5);
  if (!std::isfinite(x) || !std::isfinite(y)) return SampleKind::kNonFinite;
  // x == -1 touches pixel 0 with weight 0 but has a (one-sided) gradient, as in grid_sample; x == W touches none.
  if (!(x >= acc_t(-1) && x < static_cast<acc_t>(W) && y >= acc_t(-1) && y < static_cast<acc_t>(H))) {
    return SampleKind::kSkip;
  }
  const acc_t x0f = std::floor(x);
  const acc_t y0f = std::floor(y);
  const int64_t x0 = static_cast<int64_t>(x0f);
  const int64_t y0 = static_cast<int64_t>(y0f);
  c.fx = x - x0f;
  c.fy = y - y0f;
  const acc_t wx[2] = {acc_t(1) - c.fx, c.fx};
  const acc_t wy[2] = {acc_t(1) - c.fy, c.fy};
  for (int dy = 0; dy < 2; ++dy) {
    for (int dx = 0; dx < 2; ++dx) {
      const int64_t yy = y0 + dy;
      const int64_t xx = x0 + dx;
      const int k = dy * 2 + dx;
      if (yy >= 0 && yy < H && xx >= 0 && xx < W) {
        // value row (b, level_start + yy * W + xx, m) -> element offset
        c.offset[k] = (row_base + yy * W + xx) * row_stride;
        c.weight[k] = wy[dy] * wx[dx];
      } else {
        c.offset[k] = -1;
        c.weight[k] = acc_t(0);
      }
    }
  }
  return SampleKind::kInside;
}

template <typename scalar_t>
void forward_kernel(const scalar_t* value, const int64_t* shapes, const int64_t* starts, const scalar_t* loc,
                    const scalar_t* attn, scalar_t* out, int64_t B, int64_t S, int64_t M, int64_t D, int64_t L,
                    int64_t Q, int64_t P) {
  using acc_t = scalar_t;  // float accumulates in float, double in double (coordinates likewise)
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(1, M * L * P));
  at::parallel_for(0, B * Q, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(D);
    const std::vector<scalar_t> zeros(D, scalar_t(0));
    for (int64_t bq = begin; bq < end; ++bq) {
      const int64_t b = bq / Q;
      for (int64_t m = 0; m < M; ++m) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        bool poisoned = false;
        // (B, Q, M, L, P) -> flat index of (b, q, m, 0, 0)
        const int64_t sample0 = (bq * M + m) * L * P;
        for (int64_t l = 0; l < L; ++l) {
          int64_t H = shapes[2 * l];
          int64_t W = shapes[2 * l + 1];
          level_extent_within(starts[l], S, H, W);
          // value (B, S, M, D): row (b, s, m) starts at ((b * S + s) * M + m) * D; with row_stride = M * D the
          // offset of (b, s, m) is (b * S + s) * M * D + m * D.
          const int64_t row_base = b * S + starts[l];
          for (int64_t p = 0; p < P; ++p) {
            const int64_t i = sample0 + l * P + p;
            Corners<acc_t> c;
            const SampleKind kind = locate<acc_t>(loc[2 * i], loc[2 * i + 1], H, W, row_base, M * D, c);
            if (kind == SampleKind::kNonFinite) {
              poisoned = true;
              continue;
            }
            if (kind == SampleKind::kSkip) continue;
            const acc_t w = attn[i];
            const scalar_t* v[4];
            acc_t cw[4];
            for (int k = 0; k < 4; ++k) {
              v[k] = c.offset[k] >= 0 ? value + c.offset[k] + m * D : zeros.data();
              cw[k] = w * c.weight[k];
            }
            acc_t* __restrict__ a = acc.data();
            const scalar_t* __restrict__ v0 = v[0];
            const scalar_t* __restrict__ v1 = v[1];
            const scalar_t* __restrict__ v2 = v[2];
            const scalar_t* __restrict__ v3 = v[3];
#pragma omp simd
            for (int64_t ch = 0; ch < D; ++ch) {
              a[ch] += cw[0] * v0[ch] + cw[1] * v1[ch] + cw[2] * v2[ch] + cw[3] * v3[ch];
            }
          }
        }
        // out (B, Q, M*D): (b, q, m, :) starts at (bq * M + m) * D
        scalar_t* o = out + (bq * M + m) * D;
        const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
        for (int64_t ch = 0; ch < D; ++ch) o[ch] = poisoned ? nan : acc[ch];
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const scalar_t* value, const int64_t* shapes, const int64_t* starts, const scalar_t* loc,
                     const scalar_t* attn, const scalar_t* grad_out, scalar_t* grad_value, scalar_t* grad_loc,
                     scalar_t* grad_attn, int64_t B, int64_t S, int64_t M, int64_t D, int64_t L, int64_t Q,
                     int64_t P) {
  using acc_t = scalar_t;
  // Tasks are (b, m, l); each task walks every query. Parallel granularity is one task.
  at::parallel_for(0, B * M * L, 1, [&](int64_t begin, int64_t end) {
    const std::vector<scalar_t> zeros(D, scalar_t(0));
    std::vector<scalar_t> scratch(D);  // write target of out-of-map corners (weight 0: harmless)
    const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
    for (int64_t task = begin; task < end; ++task) {
      // task = (b * M + m) * L + l
      const int64_t l = task % L;
      const int64_t m = (task / L) % M;
      const int64_t b = task / (L * M);
      int64_t H = shapes[2 * l];
      int64_t W = shapes[2 * l + 1];
      level_extent_within(starts[l], S, H, W);
      const int64_t row_base = b * S + starts[l];
      for (int64_t q = 0; q < Q; ++q) {
        // grad_out (B, Q, M*D): (b, q, m, :) at ((b * Q + q) * M + m) * D
        const scalar_t* __restrict__ g = grad_out + ((b * Q + q) * M + m) * D;
        for (int64_t p = 0; p < P; ++p) {
          // (B, Q, M, L, P) flat index of (b, q, m, l, p)
          const int64_t i = (((b * Q + q) * M + m) * L + l) * P + p;
          Corners<acc_t> c;
          const SampleKind kind = locate<acc_t>(loc[2 * i], loc[2 * i + 1], H, W, row_base, M * D, c);
          if (kind != SampleKind::kInside) {
            const acc_t fill = kind == SampleKind::kNonFinite ? nan : acc_t(0);
            grad_attn[i] = fill;
            grad_loc[2 * i] = fill;
            grad_loc[2 * i + 1] = fill;
            continue;
          }
          const acc_t w = attn[i];
          const scalar_t* v[4];
          scalar_t* gv[4];
          acc_t cw[4];
          for (int k = 0; k < 4; ++k) {
            const bool inside = c.offset[k] >= 0;
            v[k] = inside ? value + c.offset[k] + m * D : zeros.data();
            gv[k] = inside ? grad_value + c.offset[k] + m * D : scratch.data();
            cw[k] = w * c.weight[k];
          }
          const acc_t fx = c.fx, fy = c.fy;
          const acc_t b0 = c.weight[0], b1 = c.weight[1], b2 = c.weight[2], b3 = c.weight[3];
          const acc_t s0 = cw[0], s1 = cw[1], s2 = cw[2], s3 = cw[3];
          acc_t dot_w = 0, dot_x = 0, dot_y = 0;
          const scalar_t* __restrict__ v00 = v[0];
          const scalar_t* __restrict__ v01 = v[1];
          const scalar_t* __restrict__ v10 = v[2];
          const scalar_t* __restrict__ v11 = v[3];
          // In-map corners are distinct value rows (D-element ranges that do not overlap); out-of-map corners all
          // point at the same scratch row with weight 0. So no write in one channel iteration touches another
          // channel's data, and the loop is safe to vectorise.
          scalar_t* g00 = gv[0];
          scalar_t* g01 = gv[1];
          scalar_t* g10 = gv[2];
          scalar_t* g11 = gv[3];
#pragma omp simd reduction(+ : dot_w, dot_x, dot_y)
          for (int64_t ch = 0; ch < D; ++ch) {
            const acc_t gc = g[ch];
            const acc_t a = v00[ch], bb = v01[ch], cc = v10[ch], dd = v11[ch];
            dot_w += gc * (b0 * a + b1 * bb + b2 * cc + b3 * dd);
            // d(bilinear)/dx and /dy in pixels, out-of-map corners read as 0 (one-sided at integer positions)
            dot_x += gc * ((acc_t(1) - fy) * (bb - a) + fy * (dd - cc));
            dot_y += gc * ((acc_t(1) - fx) * (cc - a) + fx * (dd - bb));
            g00[ch] += s0 * gc;
            g01[ch] += s1 * gc;
            g10[ch] += s2 * gc;
            g11[ch] += s3 * gc;
          }
          grad_attn[i] = dot_w;
          // pixel x = loc_x * W - 0.5, so d/dloc_x = W * d/dx
          grad_loc[2 * i] = w * dot_x * static_cast<acc_t>(W);
          grad_loc[2 * i + 1] = w * dot_y * static_cast<acc_t>(H);
        }
      }
    }
  });
}

struct Dims {
  int64_t B, S, M, D, L, Q, P;
};

Dims dims_of(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& sampling_locations) {
  TORCH_CHECK(value.dim() == 4, "value must be (B, S, M, D)");
  TORCH_CHECK(sampling_locations.dim() == 6, "sampling_locations must be (B, Q, M, L, P, 2)");
  return Dims{value.size(0),          value.size(1), value.size(2), value.size(3), spatial_shapes.size(0),
              sampling_locations.size(1), sampling_locations.size(4)};
}

void check_cpu_inputs(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    TORCH_CHECK(t->device().is_cpu(), "bevdeform::ms_deform_attn CPU kernel got a tensor on ", t->device());
    TORCH_CHECK(t->is_contiguous(), "bevdeform::ms_deform_attn CPU kernel needs contiguous tensors");
  }
}

}  // namespace

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  check_cpu_inputs({&value, &spatial_shapes, &level_start_index, &sampling_locations, &attention_weights});
  const Dims d = dims_of(value, spatial_shapes, sampling_locations);
  at::Tensor out = at::empty({d.B, d.Q, d.M * d.D}, value.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    forward_kernel<scalar_t>(value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
                             level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<scalar_t>(),
                             attention_weights.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), d.B, d.S, d.M, d.D,
                             d.L, d.Q, d.P);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights, const at::Tensor& grad_output) {
  check_cpu_inputs(
      {&value, &spatial_shapes, &level_start_index, &sampling_locations, &attention_weights, &grad_output});
  const Dims d = dims_of(value, spatial_shapes, sampling_locations);
  // grad_value is scattered into: it must start at zero. The other two are written element by element.
  at::Tensor grad_value = at::zeros_like(value);
  at::Tensor grad_loc = at::empty_like(sampling_locations);
  at::Tensor grad_attn = at::empty_like(attention_weights);
  if (grad_attn.numel() == 0) return {grad_value, grad_loc, grad_attn};
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    backward_kernel<scalar_t>(value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
                              level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<scalar_t>(),
                              attention_weights.data_ptr<scalar_t>(), grad_output.data_ptr<scalar_t>(),
                              grad_value.data_ptr<scalar_t>(), grad_loc.data_ptr<scalar_t>(),
                              grad_attn.data_ptr<scalar_t>(), d.B, d.S, d.M, d.D, d.L, d.Q, d.P);
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace bevdeform
