// Modulated deformable convolution (DCNv2), CPU kernels (float32 and float64): deformable im2col + GEMM.
//
// Both passes walk each image in chunks of output pixels whose columns take ~4 MiB (column_chunk): the buffer
// stays in the cache between the sampling pass that writes it and the GEMM that reads it, and one small buffer is
// reused for every chunk and image (a whole image's columns, 53 MB at ResNet-101 stage 3 of bev_base, cost more in
// page faults and cache misses than in arithmetic: measured in docs/benchmarks.md).
//
// Forward, per chunk: the modulated columns col (C * K, chunk) = mask * bilinear(input) are built by a parallel
// pass over (deform group g, block of 64 output pixels); a task computes the sample geometry of all kernel points
// of its block once, into a small per-thread table, then walks the group's channels reading the table, so
// coordinates are never recomputed per channel; the reads of a block (its pixels' 3x3 neighbourhoods) stay in
// cache and each channel's rows of columns are written contiguously, by a branch-free loop the compiler
// vectorises. Then out[:, chunk] = weight @ col per conv group with ATen's GEMM (at::mm_out into the output, no
// temporary).
//
// Backward, per chunk, with one column buffer reused:
//   1. col = the forward columns again (recomputed, not stored: the op keeps no activations);
//   2. grad_weight += grad_out[:, chunk] @ col^T (at::addmm_, in place);
//   3. col = weight^T @ grad_out[:, chunk] (the gradient of the columns, written over the same buffer);
//   4. a parallel pass over (deform group, block of the group's channels) scatters col into grad_input (the
//      planes a task writes belong to its channels only, so no atomics and no per-thread copies) and reduces the
//      gradients of the mask and offsets over its channels. Tasks of one deform group are as many as the threads
//      need (ceil(threads / G)), so sample coordinates are computed once per (pixel, kernel point, group) and
//      task, i.e. at most that many times, never once per channel; the partial sums of the tasks of a group meet
//      in grad_offset / grad_mask with atomic adds (3 per sample and task, against 4 * C / G plain adds for the
//      scatter), and with plain stores when a group has one task.
// The backward allocates its five gradients and one column buffer (at most one image's columns) from the torch
// allocator, nothing else (plus each thread's scratch table of 64 * K samples on the heap, ~44 KiB at K = 9).
#include "dcn.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace bevdeform {

DcnShape dcn_check_shapes(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
                          const at::Tensor& weight, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t deform_groups) {
  TORCH_CHECK(input.dim() == 4, "modulated_deform_conv2d: input must be (N, C, H, W), got ", input.sizes());
  TORCH_CHECK(weight.dim() == 4, "modulated_deform_conv2d: weight must be (C_out, C / groups, kh, kw), got ",
              weight.sizes());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "modulated_deform_conv2d: stride, padding and dilation must have two entries (h, w)");
  TORCH_CHECK(groups >= 1 && deform_groups >= 1, "modulated_deform_conv2d: groups and deform_groups must be >= 1");
  DcnShape s;
  s.N = input.size(0);
  s.C = input.size(1);
  s.H = input.size(2);
  s.W = input.size(3);
  s.C_out = weight.size(0);
  s.kh = weight.size(2);
  s.kw = weight.size(3);
  s.stride_h = stride[0];
  s.stride_w = stride[1];
  s.pad_h = padding[0];
  s.pad_w = padding[1];
  s.dil_h = dilation[0];
  s.dil_w = dilation[1];
  s.groups = groups;
  s.deform_groups = deform_groups;
  TORCH_CHECK(s.stride_h >= 1 && s.stride_w >= 1 && s.dil_h >= 1 && s.dil_w >= 1 && s.pad_h >= 0 && s.pad_w >= 0,
              "modulated_deform_conv2d: stride and dilation must be >= 1 and padding >= 0");
  TORCH_CHECK(s.C % groups == 0 && s.C_out % groups == 0 && weight.size(1) == s.C / groups,
              "modulated_deform_conv2d: weight ", weight.sizes(), " does not fit input channels ", s.C, " and groups ",
              groups);
  TORCH_CHECK(s.C % deform_groups == 0, "modulated_deform_conv2d: deform_groups must divide the input channels");
  s.Ho = (s.H + 2 * s.pad_h - s.dil_h * (s.kh - 1) - 1) / s.stride_h + 1;
  s.Wo = (s.W + 2 * s.pad_w - s.dil_w * (s.kw - 1) - 1) / s.stride_w + 1;
  TORCH_CHECK(s.Ho >= 1 && s.Wo >= 1, "modulated_deform_conv2d: the output would be empty");
  TORCH_CHECK(offset.dim() == 4 && offset.size(0) == s.N && offset.size(1) == 2 * deform_groups * s.K() &&
                  offset.size(2) == s.Ho && offset.size(3) == s.Wo,
              "modulated_deform_conv2d: offset must be (N, 2 * deform_groups * kh * kw, Ho, Wo) = (", s.N, ", ",
              2 * deform_groups * s.K(), ", ", s.Ho, ", ", s.Wo, "), got ", offset.sizes());
  TORCH_CHECK(mask.dim() == 4 && mask.size(0) == s.N && mask.size(1) == deform_groups * s.K() &&
                  mask.size(2) == s.Ho && mask.size(3) == s.Wo,
              "modulated_deform_conv2d: mask must be (N, deform_groups * kh * kw, Ho, Wo) = (", s.N, ", ",
              deform_groups * s.K(), ", ", s.Ho, ", ", s.Wo, "), got ", mask.sizes());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.C_out, "modulated_deform_conv2d: bias must be (C_out,) = (",
                s.C_out, "), got ", bias->sizes());
  }
  return s;
}

namespace {

constexpr int64_t kPixelBlock = 64;  // output pixels whose geometry a task tabulates at once

// Geometry of the samples (g, k, l) of one deform group g, all kernel points k and a block of output pixels l:
// entry e = k * kPixelBlock + (l - l_begin). Structure of arrays (corner c of entry e at c * entries + e): the
// channel loops below read unit-stride rows of indices and weights. A sample outside (-1, H) x (-1, W) (NaN and
// inf included) has valid 0, indices -1 and weights 0; an off-map corner of a valid sample has index -1 and
// weight 0. A per-thread scratch of K * 64 entries (~44 KiB at K = 9, float32), reused.
template <typename scalar_t>
struct GeometryTable {
  explicit GeometryTable(int64_t K)
      : entries(K * kPixelBlock), index(4 * entries), weight(4 * entries), fy(entries), fx(entries), mask(entries),
        valid(entries), gather(4 * entries) {}
  int64_t entries;
  std::vector<int64_t> index;    // (4, entries): y * W + x of the corner in its plane, or -1
  std::vector<scalar_t> weight;  // (4, entries): bilinear weight of the corner, 0 for an off-map corner
  std::vector<scalar_t> fy, fx;  // y - floor(y), x - floor(x) (0 for an invalid sample)
  std::vector<scalar_t> mask;
  std::vector<char> valid;
  // (4, entries): the corner clamped into the plane (the reference's gather index), read with weight 0 where the
  // corner is off the map; 32-bit so that the sampling loop vectorises (the callers check H * W < 2^31)
  std::vector<int32_t> gather;
};

// offset_n is (G * 2K, L), mask_n (G * K, L) of one image.
template <typename scalar_t>
void tabulate(const DcnShape& s, const scalar_t* offset_n, const scalar_t* mask_n, int64_t g, int64_t l_begin,
              int64_t l_end, GeometryTable<scalar_t>& table) {
  const int64_t K = s.K();
  const int64_t L = s.L();
  const int64_t E = table.entries;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t i = k / s.kw;
    const int64_t j = k % s.kw;
    // offset channel g * 2K + 2k is dy, + 1 is dx (mmcv's layout); mask channel g * K + k
    const scalar_t* dy = offset_n + (g * 2 * K + 2 * k) * L;
    const scalar_t* dx = dy + L;
    const scalar_t* m = mask_n + (g * K + k) * L;
    for (int64_t l = l_begin; l < l_end; ++l) {
      const int64_t e = k * kPixelBlock + (l - l_begin);
      const int64_t ho = l / s.Wo;
      const int64_t wo = l % s.Wo;
      const scalar_t y = static_cast<scalar_t>(ho * s.stride_h - s.pad_h + i * s.dil_h) + dy[l];
      const scalar_t x = static_cast<scalar_t>(wo * s.stride_w - s.pad_w + j * s.dil_w) + dx[l];
      DcnSample<scalar_t> sample;
      const bool valid = dcn_locate<scalar_t>(y, x, s.H, s.W, sample);
      table.valid[e] = valid;
      table.mask[e] = m[l];
      table.fy[e] = valid ? sample.fy : scalar_t(0);
      table.fx[e] = valid ? sample.fx : scalar_t(0);
      for (int corner = 0; corner < 4; ++corner) {
        table.index[corner * E + e] = valid ? sample.index[corner] : -1;
        table.weight[corner * E + e] = valid ? sample.weight[corner] : scalar_t(0);
      }
      // the reference's clamped corners (y0 + dy, x0 + dx clamped to the map; an invalid sample reads (0, 0))
      const int64_t y0 = valid ? static_cast<int64_t>(std::floor(y)) : 0;
      const int64_t x0 = valid ? static_cast<int64_t>(std::floor(x)) : 0;
      for (int corner = 0; corner < 4; ++corner) {
        const int64_t yy = std::min<int64_t>(std::max<int64_t>(y0 + corner / 2, 0), s.H - 1);
        const int64_t xx = std::min<int64_t>(std::max<int64_t>(x0 + corner % 2, 0), s.W - 1);
        table.gather[corner * E + e] = static_cast<int32_t>(yy * s.W + xx);
      }
    }
  }
}

template <typename scalar_t>
inline scalar_t corner_value(const scalar_t* plane, int64_t index) {
  return index >= 0 ? plane[index] : scalar_t(0);
}

// Channels the backward's scatter walks together: the geometry of a sample (4 indices, 4 weights, mask, fy, fx)
// is loaded once per batch of channels and its three partial sums stay in registers.
constexpr int64_t kChannelBatch = 8;

// Row c * K + k of the columns, one channel plane and one kernel point k, pixels t in [0, count) of a block whose
// table entries start at e0. Branch-free (clamped corners with weight 0), so the compiler vectorises the gathers.
template <typename scalar_t>
inline void sample_row(const GeometryTable<scalar_t>& table, int64_t e0, int64_t count, const scalar_t* plane,
                       scalar_t* row) {
  const int64_t E = table.entries;
  const int32_t* ga = table.gather.data() + e0;
  const int32_t* gb = ga + E;
  const int32_t* gc = gb + E;
  const int32_t* gd = gc + E;
  const scalar_t* wa = table.weight.data() + e0;
  const scalar_t* wb = wa + E;
  const scalar_t* wc = wb + E;
  const scalar_t* wd = wc + E;
  const scalar_t* masks = table.mask.data() + e0;
#pragma omp simd
  for (int64_t t = 0; t < count; ++t) {
    row[t] = masks[t] * (wa[t] * plane[ga[t]] + wb[t] * plane[gb[t]] + wc[t] * plane[gc[t]] + wd[t] * plane[gd[t]]);
  }
}

// The columns of output pixels [l_lo, l_hi) of one image: col (C * K, l_hi - l_lo), row c * K + k = mask *
// bilinear(input[c]) at the samples of (g(c), k). Tasks are (deform group, block of 64 output pixels): the 9 (K)
// kernel points of a pixel block read one small neighbourhood of each input plane, so a task's reads stay in cache
// while it walks the channels.
template <typename scalar_t>
void im2col(const DcnShape& s, const scalar_t* input_n, const scalar_t* offset_n, const scalar_t* mask_n,
            int64_t l_lo, int64_t l_hi, scalar_t* col) {
  const int64_t K = s.K();
  const int64_t ld = l_hi - l_lo;  // row length of col
  const int64_t HW = s.H * s.W;
  const int64_t Cg = s.C / s.deform_groups;
  const int64_t blocks = (ld + kPixelBlock - 1) / kPixelBlock;
  at::parallel_for(0, s.deform_groups * blocks, 1, [&](int64_t begin, int64_t end) {
    GeometryTable<scalar_t> table(K);
    for (int64_t task = begin; task < end; ++task) {
      // task = g * blocks + block
      const int64_t block = task % blocks;
      const int64_t g = task / blocks;
      const int64_t l_begin = l_lo + block * kPixelBlock;
      const int64_t l_end = std::min(l_hi, l_begin + kPixelBlock);
      const int64_t count = l_end - l_begin;
      tabulate(s, offset_n, mask_n, g, l_begin, l_end, table);
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        for (int64_t k = 0; k < K; ++k) {
          sample_row<scalar_t>(table, k * kPixelBlock, count, input_n + c * HW,
                               col + (c * K + k) * ld + (l_begin - l_lo));
        }
      }
    }
  });
}

template <typename scalar_t>
inline void accumulate(scalar_t* target, scalar_t value, bool shared) {
  if (shared) {
#pragma omp atomic
    *target += value;
  } else {
    *target += value;
  }
}

// The backward of sample_row for channels [c0, c0 + CB) and kernel point k: scatters grad_rows[cb] (the
// gradient of the columns) into grad_planes[cb] and adds the channels' parts of the mask and offset gradients to
// sum_mask / sum_y / sum_x (entries e0 + t; the sums of invalid samples are never read).
// col = mask * (w00 v00 + w01 v01 + w10 v10 + w11 v11), w00 = (1 - fy)(1 - fx), w01 = (1 - fy) fx, ...
template <typename scalar_t, int CB>
inline void scatter_rows(const GeometryTable<scalar_t>& table, int64_t e0, int64_t count,
                         const scalar_t* const* planes, const scalar_t* const* grad_rows,
                         scalar_t* const* grad_planes, scalar_t* sum_mask, scalar_t* sum_y, scalar_t* sum_x) {
  const int64_t E = table.entries;
  const int64_t* i00 = table.index.data() + e0;
  const scalar_t* w00 = table.weight.data() + e0;
  for (int64_t t = 0; t < count; ++t) {
    const int64_t e = e0 + t;
    if (!table.valid[e]) continue;
    const int64_t a = i00[t], b = i00[t + E], c = i00[t + 2 * E], d = i00[t + 3 * E];
    const scalar_t wa = w00[t], wb = w00[t + E], wc = w00[t + 2 * E], wd = w00[t + 3 * E];
    const scalar_t fy = table.fy[e], fx = table.fx[e], m = table.mask[e];
    scalar_t s_mask = scalar_t(0), s_y = scalar_t(0), s_x = scalar_t(0);
    for (int cb = 0; cb < CB; ++cb) {
      const scalar_t* plane = planes[cb];
      const scalar_t gc = grad_rows[cb][t];
      const scalar_t v00 = corner_value(plane, a);
      const scalar_t v01 = corner_value(plane, b);
      const scalar_t v10 = corner_value(plane, c);
      const scalar_t v11 = corner_value(plane, d);
      s_mask += gc * (wa * v00 + wb * v01 + wc * v10 + wd * v11);
      s_y += gc * ((scalar_t(1) - fx) * (v10 - v00) + fx * (v11 - v01));
      s_x += gc * ((scalar_t(1) - fy) * (v01 - v00) + fy * (v11 - v10));
      const scalar_t gm = gc * m;
      scalar_t* grad_plane = grad_planes[cb];
      if (a >= 0) grad_plane[a] += gm * wa;
      if (b >= 0) grad_plane[b] += gm * wb;
      if (c >= 0) grad_plane[c] += gm * wc;
      if (d >= 0) grad_plane[d] += gm * wd;
    }
    sum_mask[e] += s_mask;
    sum_y[e] += s_y;
    sum_x[e] += s_x;
  }
}

// grad_col (C * K, l_hi - l_lo), the gradient of the columns of output pixels [l_lo, l_hi) -> grad_input_n
// (C, H, W) (scattered, +=), grad_offset_n (G * 2K, L) and grad_mask_n (G * K, L) (+= at those pixels; all three
// zero-initialised by the caller).
template <typename scalar_t>
void col2im_and_coordinates(const DcnShape& s, const scalar_t* input_n, const scalar_t* offset_n,
                            const scalar_t* mask_n, int64_t l_lo, int64_t l_hi, const scalar_t* grad_col,
                            scalar_t* grad_input_n, scalar_t* grad_offset_n, scalar_t* grad_mask_n) {
  const int64_t K = s.K();
  const int64_t L = s.L();
  const int64_t ld = l_hi - l_lo;  // row length of grad_col
  const int64_t HW = s.H * s.W;
  const int64_t G = s.deform_groups;
  const int64_t Cg = s.C / G;
  const int64_t threads = at::get_num_threads();
  const int64_t blocks_per_group = std::max<int64_t>(1, std::min<int64_t>(Cg, (threads + G - 1) / G));
  const int64_t channels_per_block = (Cg + blocks_per_group - 1) / blocks_per_group;
  const bool shared = blocks_per_group > 1;
  at::parallel_for(0, G * blocks_per_group, 1, [&](int64_t begin, int64_t end) {
    GeometryTable<scalar_t> table(K);
    // partial sums over this task's channels, per (k, pixel of the block)
    std::vector<scalar_t> sum_mask(K * kPixelBlock), sum_y(K * kPixelBlock), sum_x(K * kPixelBlock);
    const scalar_t* planes[kChannelBatch];
    const scalar_t* grad_rows[kChannelBatch];
    scalar_t* grad_planes[kChannelBatch];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / blocks_per_group;
      const int64_t c_begin = g * Cg + (task % blocks_per_group) * channels_per_block;
      const int64_t c_end = std::min((g + 1) * Cg, c_begin + channels_per_block);
      if (c_begin >= c_end) continue;
      for (int64_t l_begin = l_lo; l_begin < l_hi; l_begin += kPixelBlock) {
        const int64_t l_end = std::min(l_hi, l_begin + kPixelBlock);
        const int64_t count = l_end - l_begin;
        tabulate(s, offset_n, mask_n, g, l_begin, l_end, table);
        std::fill(sum_mask.begin(), sum_mask.end(), scalar_t(0));
        std::fill(sum_y.begin(), sum_y.end(), scalar_t(0));
        std::fill(sum_x.begin(), sum_x.end(), scalar_t(0));
        for (int64_t c0 = c_begin; c0 < c_end; c0 += kChannelBatch) {
          const int64_t batch = std::min<int64_t>(kChannelBatch, c_end - c0);
          for (int64_t k = 0; k < K; ++k) {
            for (int64_t cb = 0; cb < batch; ++cb) {
              planes[cb] = input_n + (c0 + cb) * HW;
              grad_planes[cb] = grad_input_n + (c0 + cb) * HW;
              grad_rows[cb] = grad_col + ((c0 + cb) * K + k) * ld + (l_begin - l_lo);
            }
            const int64_t e0 = k * kPixelBlock;
            if (batch == kChannelBatch) {
              scatter_rows<scalar_t, kChannelBatch>(table, e0, count, planes, grad_rows, grad_planes,
                                                    sum_mask.data(), sum_y.data(), sum_x.data());
            } else {
              for (int64_t cb = 0; cb < batch; ++cb) {
                scatter_rows<scalar_t, 1>(table, e0, count, planes + cb, grad_rows + cb, grad_planes + cb,
                                          sum_mask.data(), sum_y.data(), sum_x.data());
              }
            }
          }
        }
        for (int64_t k = 0; k < K; ++k) {
          scalar_t* grad_dy = grad_offset_n + (g * 2 * K + 2 * k) * L;
          scalar_t* grad_dx = grad_dy + L;
          scalar_t* grad_m = grad_mask_n + (g * K + k) * L;
          for (int64_t t = 0; t < count; ++t) {
            const int64_t e = k * kPixelBlock + t;
            if (!table.valid[e]) continue;  // off-map and non-finite samples keep their zero gradients
            const int64_t l = l_begin + t;
            accumulate(grad_m + l, sum_mask[e], shared);
            accumulate(grad_dy + l, table.mask[e] * sum_y[e], shared);
            accumulate(grad_dx + l, table.mask[e] * sum_x[e], shared);
          }
        }
      }
    }
  });
}

// Output pixels per column chunk: the columns of one chunk (C * K rows) take about kChunkBytes, so they stay in
// the cache between the sampling pass that writes them and the GEMM that reads them (and the buffer is reused,
// not page-faulted in per image); at least two pixel blocks per thread, so the sampling pass has tasks for all.
constexpr int64_t kChunkBytes = int64_t(1) << 22;

int64_t column_chunk(const DcnShape& s, int64_t element_size) {
  const int64_t rows = s.C * s.K();
  int64_t chunk = (kChunkBytes / element_size / std::max<int64_t>(rows, 1)) / kPixelBlock * kPixelBlock;
  chunk = std::max<int64_t>(chunk, 2 * kPixelBlock * at::get_num_threads());
  return std::min<int64_t>(chunk, s.L());
}

// The sampling loop indexes a channel plane with 32-bit integers.
void check_plane_size(const DcnShape& s) {
  TORCH_CHECK(s.H * s.W < (int64_t(1) << 31), "modulated_deform_conv2d (CPU): an input plane of ", s.H, " x ", s.W,
              " pixels is too large for the CPU kernel (H * W must be < 2^31)");
}

void check_cpu(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    TORCH_CHECK(t->device().is_cpu(), "bevdeform::modulated_deform_conv2d CPU kernel got a tensor on ", t->device());
    TORCH_CHECK(t->is_contiguous(), "bevdeform::modulated_deform_conv2d CPU kernel needs contiguous tensors");
    TORCH_CHECK(t->scalar_type() == tensors.begin()[0]->scalar_type(),
                "bevdeform::modulated_deform_conv2d CPU kernel needs one dtype for all tensors");
  }
}

}  // namespace

at::Tensor modulated_deform_conv2d_forward_cpu(const at::Tensor& input, const at::Tensor& offset,
                                               const at::Tensor& mask, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                               int64_t deform_groups) {
  const bool has_bias = bias.has_value() && bias->defined();
  check_cpu({&input, &offset, &mask, &weight});
  if (has_bias) check_cpu({&input, &*bias});
  const DcnShape s =
      dcn_check_shapes(input, offset, mask, weight, bias, stride, padding, dilation, groups, deform_groups);
  check_plane_size(s);
  const int64_t K = s.K();
  const int64_t L = s.L();
  const int64_t Cg_conv = s.C / groups;          // input channels per conv group
  const int64_t Co_conv = s.C_out / groups;      // output channels per conv group
  at::Tensor output = at::empty({s.N, s.C_out, s.Ho, s.Wo}, input.options());
  if (s.N == 0 || s.C_out == 0) return output;
  const int64_t chunk = column_chunk(s, input.element_size());
  at::Tensor col = at::empty({s.C * K * chunk}, input.options());  // the columns of one chunk of output pixels
  // weight (C_out, C / groups, kh, kw) -> (groups, C_out / groups, C / groups * K)
  const at::Tensor weight_g = weight.view({groups, Co_conv, Cg_conv * K});
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "modulated_deform_conv2d_forward_cpu", [&] {
    for (int64_t n = 0; n < s.N; ++n) {
      // output[n] (C_out, Ho, Wo) -> (groups, C_out / groups, L)
      at::Tensor out_g = output[n].view({groups, Co_conv, L});
      for (int64_t l_lo = 0; l_lo < L; l_lo += chunk) {
        const int64_t l_hi = std::min(L, l_lo + chunk);
        im2col<scalar_t>(s, input.data_ptr<scalar_t>() + n * s.C * s.H * s.W,
                         offset.data_ptr<scalar_t>() + n * 2 * s.deform_groups * K * L,
                         mask.data_ptr<scalar_t>() + n * s.deform_groups * K * L, l_lo, l_hi, col.data_ptr<scalar_t>());
        // col (C * K * (l_hi - l_lo)) -> (groups, C / groups * K, l_hi - l_lo): rows c * K + k, c within the group
        const at::Tensor col_g = col.narrow(0, 0, s.C * K * (l_hi - l_lo)).view({groups, Cg_conv * K, l_hi - l_lo});
        for (int64_t grp = 0; grp < groups; ++grp) {
          at::Tensor out_slice = out_g[grp].narrow(1, l_lo, l_hi - l_lo);  // row stride L: GEMM writes in place
          at::mm_out(out_slice, weight_g[grp], col_g[grp]);
        }
      }
    }
  });
  if (has_bias) output.add_(bias->view({1, s.C_out, 1, 1}));
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> modulated_deform_conv2d_backward_cpu(
    const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& grad_output, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t deform_groups) {
  check_cpu({&input, &offset, &mask, &weight, &grad_output});
  const DcnShape s =
      dcn_check_shapes(input, offset, mask, weight, bias, stride, padding, dilation, groups, deform_groups);
  check_plane_size(s);
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == s.N && grad_output.size(1) == s.C_out &&
                  grad_output.size(2) == s.Ho && grad_output.size(3) == s.Wo,
              "modulated_deform_conv2d_backward: grad_output must be (N, C_out, Ho, Wo) = (", s.N, ", ", s.C_out, ", ",
              s.Ho, ", ", s.Wo, "), got ", grad_output.sizes());
  const int64_t K = s.K();
  const int64_t L = s.L();
  const int64_t Cg_conv = s.C / groups;
  const int64_t Co_conv = s.C_out / groups;
  // Scatter / partial-sum targets start at zero; grad_bias is written element by element.
  at::Tensor grad_input = at::zeros_like(input);
  at::Tensor grad_offset = at::zeros_like(offset);
  at::Tensor grad_mask = at::zeros_like(mask);
  at::Tensor grad_weight = at::zeros_like(weight);
  at::Tensor grad_bias = at::empty({s.C_out}, weight.options());
  if (s.N == 0 || s.C_out == 0) return {grad_input, grad_offset, grad_mask, grad_weight, grad_bias.zero_()};
  const int64_t chunk = column_chunk(s, input.element_size());
  at::Tensor col = at::empty({s.C * K * chunk}, input.options());  // the columns of one chunk, then their gradient
  const at::Tensor weight_g = weight.view({groups, Co_conv, Cg_conv * K});  // (groups, C_out / groups, C / groups * K)
  at::Tensor grad_weight_g = grad_weight.view({groups, Co_conv, Cg_conv * K});
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "modulated_deform_conv2d_backward_cpu", [&] {
    // grad_bias[o] = sum over n, l of grad_output[n, o, l]; one owner per o.
    const scalar_t* go = grad_output.data_ptr<scalar_t>();
    scalar_t* gb = grad_bias.data_ptr<scalar_t>();
    at::parallel_for(0, s.C_out, 1, [&](int64_t begin, int64_t end) {
      for (int64_t o = begin; o < end; ++o) {
        scalar_t total = scalar_t(0);
        for (int64_t n = 0; n < s.N; ++n) {
          const scalar_t* row = go + (n * s.C_out + o) * L;
          for (int64_t l = 0; l < L; ++l) total += row[l];
        }
        gb[o] = total;
      }
    });
    for (int64_t n = 0; n < s.N; ++n) {
      const scalar_t* input_n = input.data_ptr<scalar_t>() + n * s.C * s.H * s.W;
      const scalar_t* offset_n = offset.data_ptr<scalar_t>() + n * 2 * s.deform_groups * K * L;
      const scalar_t* mask_n = mask.data_ptr<scalar_t>() + n * s.deform_groups * K * L;
      // grad_output[n] (C_out, Ho, Wo) -> (groups, C_out / groups, L)
      const at::Tensor grad_out_g = grad_output[n].view({groups, Co_conv, L});
      for (int64_t l_lo = 0; l_lo < L; l_lo += chunk) {
        const int64_t l_hi = std::min(L, l_lo + chunk);
        im2col<scalar_t>(s, input_n, offset_n, mask_n, l_lo, l_hi, col.data_ptr<scalar_t>());
        // col (C * K * (l_hi - l_lo)) -> (groups, C / groups * K, l_hi - l_lo)
        const at::Tensor col_g = col.narrow(0, 0, s.C * K * (l_hi - l_lo)).view({groups, Cg_conv * K, l_hi - l_lo});
        for (int64_t grp = 0; grp < groups; ++grp) {
          grad_weight_g[grp].addmm_(grad_out_g[grp].narrow(1, l_lo, l_hi - l_lo), col_g[grp].t());
        }
        for (int64_t grp = 0; grp < groups; ++grp) {
          at::Tensor col_slice = col_g[grp];
          at::mm_out(col_slice, weight_g[grp].t(), grad_out_g[grp].narrow(1, l_lo, l_hi - l_lo));
        }
        col2im_and_coordinates<scalar_t>(s, input_n, offset_n, mask_n, l_lo, l_hi, col.data_ptr<scalar_t>(),
                                         grad_input.data_ptr<scalar_t>() + n * s.C * s.H * s.W,
                                         grad_offset.data_ptr<scalar_t>() + n * 2 * s.deform_groups * K * L,
                                         grad_mask.data_ptr<scalar_t>() + n * s.deform_groups * K * L);
      }
    }
  });
  return {grad_input, grad_offset, grad_mask, grad_weight, grad_bias};
}

}  // namespace bevdeform
