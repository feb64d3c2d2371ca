// CUDA kernels of multi-scale deformable attention (MSDA): forward and backward. The contract is in msda.h and
// shared/design/msda-op.md; this file only implements it (registration lives in msda_registration.cpp).
//
// Design, and why (the mmcv / Deformable-DETR kernels give one thread per channel and redo the sample's geometry
// in every thread; their backward reduces through shared memory with two barriers per sample):
//   - One thread GROUP of G lanes per (b, q, m). Lane `lane` owns the channel vectors vec = lane, lane + G, ...,
//     each of V consecutive channels, and reads a bilinear corner's V channels with one aligned load (16 bytes at
//     the widest: V = 4 for float, 8 for half / bfloat16, 2 for double). A sample's pixel coordinates, corner
//     offsets and bilinear weights are therefore computed once per channel vector, not once per channel.
//   - G = next power of two >= D / V, capped at 32, so a group is G consecutive lanes of one warp and the backward
//     reduces grad_loc / grad_weight with __shfl_xor_sync over the group's own lanes (no shared memory, no
//     barriers). Several groups share a block of 256 threads; a grid-stride loop covers B * Q * M groups.
//   - Coordinates, bilinear weights and every sum are in at::opmath_type<scalar_t>: float for float / half /
//     bfloat16, double for double. For half / bfloat16 grad_value is accumulated in a zero-initialised float
//     buffer (float atomics are native; 16-bit ones are CAS loops before sm_90) and cast at the end.
//   - Sampling follows grid_sample(bilinear, zeros, align_corners=False) and the CPU kernel (msda_cpu.cpp):
//     samples with pixel < -1 or >= size are skipped before any float -> int conversion (pixel == -1 keeps
//     grid_sample's one-sided gradient); a non-finite pixel coordinate reads nothing and turns its (b, q, m)
//     output, its grad_loc and its grad_weight into NaN.
//   - Every offset into value / grad_value / output / locations / weights is int64: B * S * M * D and
//     B * Q * M * L * P pass 2^31 at encoder scale.
#include "msda.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <type_traits>

namespace bevdeform {
namespace {

constexpr int kThreadsPerBlock = 256;  // a multiple of 32, so no group (G <= 32, power of two) straddles a warp
constexpr int kWarpSize = 32;
constexpr int kMaxLog2GroupSize = 5;   // G <= 32: a group lives inside one warp
// Blocks beyond this are folded into the grid-stride loop (gridDim.x itself allows 2^31 - 1).
constexpr int64_t kMaxBlocks = int64_t(1) << 20;
// Per-level (start, H, W) live in dynamic shared memory: 24 bytes a level keeps 1024 levels under 48 KiB.
constexpr int64_t kMaxLevels = 1024;

// ------------------------------------------------------------------------------------------------------------
// Device helpers
// ------------------------------------------------------------------------------------------------------------

// V elements read or written as one aligned access. The elements are moved as raw bits (uint4 / uint2 / uint /
// ushort): a struct of at::Half assigned element by element is stored with V 2-byte stores, a uint4 with one
// 16-byte store. 16-bit types are widened / narrowed element by element through c10's scalar conversions, so
// nothing here needs half2 / bfloat162 arithmetic that differs between sm_80, sm_87 and sm_90.
template <typename scalar_t, int V>
struct alignas(sizeof(scalar_t) * V) Pack {
  scalar_t elem[V];
};

template <int kBytes>
struct RawBits;
template <>
struct RawBits<16> {
  using type = uint4;
};
template <>
struct RawBits<8> {
  using type = uint2;
};
template <>
struct RawBits<4> {
  using type = unsigned int;
};
template <>
struct RawBits<2> {
  using type = unsigned short;
};

// Loads V consecutive elements at ptr (aligned to V * sizeof(scalar_t): checked on the host) and widens them.
// Only used on data the kernel never writes (value, grad_output), hence the read-only path (__ldg).
template <typename scalar_t, int V, typename acc_t>
__device__ __forceinline__ void load_pack(const scalar_t* ptr, acc_t (&out)[V]) {
  using Raw = typename RawBits<sizeof(Pack<scalar_t, V>)>::type;
  const Raw raw = __ldg(reinterpret_cast<const Raw*>(ptr));
  Pack<scalar_t, V> pack;
  memcpy(&pack, &raw, sizeof(Raw));  // a register move once compiled
#pragma unroll
  for (int i = 0; i < V; ++i) {
    out[i] = static_cast<acc_t>(pack.elem[i]);
  }
}

// Narrows V accumulators and stores them at ptr (aligned like load_pack) with one access.
template <typename scalar_t, int V, typename acc_t>
__device__ __forceinline__ void store_pack(scalar_t* ptr, const acc_t (&in)[V]) {
  using Raw = typename RawBits<sizeof(Pack<scalar_t, V>)>::type;
  Pack<scalar_t, V> pack;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    pack.elem[i] = static_cast<scalar_t>(in[i]);
  }
  Raw raw;
  memcpy(&raw, &pack, sizeof(Raw));
  // A plain `*ptr = raw` comes out of the compiler as V scalar stores; the store intrinsic keeps one access.
  __stwb(reinterpret_cast<Raw*>(ptr), raw);
}

// Quiet NaN from its bit pattern (std::numeric_limits in device code would need --expt-relaxed-constexpr).
template <typename acc_t>
__device__ __forceinline__ acc_t quiet_nan();
template <>
__device__ __forceinline__ float quiet_nan<float>() {
  return __int_as_float(0x7fc00000);
}
template <>
__device__ __forceinline__ double quiet_nan<double>() {
  return __longlong_as_double(0x7ff8000000000000LL);
}

// ptr[i] += scale * g[i] for i < V, atomically per element. sm_90 has native float2 / float4 atomic adds (one
// instruction instead of V); they need ptr + j 16-byte aligned (V % 4 == 0) or ptr 8-byte aligned (V == 2). Both
// hold: the element offset into the buffer is a multiple of V (D % V == 0, channel c a multiple of V) and the
// buffer's base is 16-byte aligned (a fresh allocation, asserted on the host).
template <int V, typename acc_t>
__device__ __forceinline__ void atomic_add_scaled(acc_t* ptr, const acc_t (&g)[V], const acc_t scale) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (std::is_same<acc_t, float>::value && V % 4 == 0) {
#pragma unroll
    for (int j = 0; j < V; j += 4) {
      atomicAdd(reinterpret_cast<float4*>(ptr + j),
                make_float4(scale * g[j], scale * g[j + 1], scale * g[j + 2], scale * g[j + 3]));
    }
  } else if constexpr (std::is_same<acc_t, float>::value && V == 2) {
    atomicAdd(reinterpret_cast<float2*>(ptr), make_float2(scale * g[0], scale * g[1]));
  } else
#endif
  {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      atomicAdd(ptr + i, scale * g[i]);
    }
  }
}

// Copies the per-level table into shared memory, laid out level_info[3 * l + {0, 1, 2}] = (start, H, W).
// Every thread of the block reaches the barrier: it comes before the grid-stride loop, where nobody has exited.
// A level that is not a block of the S value rows gets (H, W) = (0, 0) (`level_extent_within`): never touched.
__device__ __forceinline__ void load_level_info(const int64_t* __restrict__ spatial_shapes,
                                                const int64_t* __restrict__ level_start_index, const int L,
                                                const int64_t S, int64_t* level_info) {
  for (int l = threadIdx.x; l < L; l += blockDim.x) {
    const int64_t start = level_start_index[l];  // level_start_index (L,)
    int64_t H = spatial_shapes[2 * l];           // spatial_shapes (L, 2) row-major: [l][0] = H
    int64_t W = spatial_shapes[2 * l + 1];       // [l][1] = W
    level_extent_within(start, S, H, W);
    level_info[3 * l + 0] = start;
    level_info[3 * l + 1] = H;
    level_info[3 * l + 2] = W;
  }
  __syncthreads();
}

enum class SampleKind { kOnMap, kOffMap, kNonFinite };

// Bilinear footprint of one sample on one level.
template <typename acc_t>
struct Footprint {
  int64_t s00;  // index along S of corner (y0, x0); outside the level (even negative) when that corner is off the map
  acc_t wx0, wx1, wy0, wy1;         // bilinear weights of the left / right columns and top / bottom rows
  bool x0_in, x1_in, y0_in, y1_in;  // whether column x0 / x1 and row y0 / y1 lie on the map
};

// grid_sample(bilinear, zeros, align_corners=False): pixel = loc * size - 0.5, corners floor(pixel) and
// floor(pixel) + 1, off-map corners read as 0. Returns kOnMap and fills fp only when -1 <= x < W and -1 <= y < H.
// x == -1 exactly touches column 0 with weight 0 but has grid_sample's one-sided gradient there (as the CPU kernel
// in msda_cpu.cpp and tests/test_msda.py's pixel -1 case expect); x == W touches nothing.
// The test is written so that NaN fails it, and it runs before any float -> int conversion, so NaN, +-inf and
// huge values never reach one. Non-finite is judged on the pixel coordinate, like the CPU kernel: a finite location
// whose loc * size overflows counts as non-finite too (only reachable in float32 with |loc| > 3.4e38 / size).
template <typename acc_t>
__device__ __forceinline__ SampleKind locate_sample(const acc_t loc_x, const acc_t loc_y, const int64_t level_start,
                                                   const int64_t H, const int64_t W, Footprint<acc_t>& fp) {
  const acc_t w_f = static_cast<acc_t>(W);
  const acc_t h_f = static_cast<acc_t>(H);
  const acc_t x = loc_x * w_f - acc_t(0.5);
  const acc_t y = loc_y * h_f - acc_t(0.5);
  if (!(x >= acc_t(-1) && x < w_f && y >= acc_t(-1) && y < h_f)) {
    // Finite but off the map contributes nothing; NaN / inf poisons the (b, q, m) output.
    return (isfinite(x) && isfinite(y)) ? SampleKind::kOffMap : SampleKind::kNonFinite;
  }
  const acc_t x0_f = floor(x);
  const acc_t y0_f = floor(y);
  // Here -1 <= x0_f < W and -1 <= y0_f < H: integers well inside int64, so the conversions are exact.
  const int64_t x0 = static_cast<int64_t>(x0_f);
  const int64_t y0 = static_cast<int64_t>(y0_f);
  fp.wx1 = x - x0_f;
  fp.wx0 = acc_t(1) - fp.wx1;
  fp.wy1 = y - y0_f;
  fp.wy0 = acc_t(1) - fp.wy1;
  // x0 >= -1, so x1 = x0 + 1 >= 0. x0 < W holds too unless float(W) rounded up (W > 2^24); testing it costs one
  // compare and keeps a read off the map impossible whatever the shape.
  fp.x0_in = x0 >= 0 && x0 < W;
  fp.x1_in = x0 + 1 < W;
  fp.y0_in = y0 >= 0 && y0 < H;
  fp.y1_in = y0 + 1 < H;
  // A level is an (H, W) row-major block of S starting at level_start: s = start + y * W + x.
  fp.s00 = level_start + y0 * W + x0;
  return SampleKind::kOnMap;
}

// ------------------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------------------

// Grid: 1-D, kThreadsPerBlock threads, dynamic shared memory 3 * L * sizeof(int64_t). Group = (b, q, m).
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreadsPerBlock)
    ms_deform_attn_forward_kernel(const scalar_t* __restrict__ value,               // (B, S, M, D)
                                  const int64_t* __restrict__ spatial_shapes,       // (L, 2): (H, W)
                                  const int64_t* __restrict__ level_start_index,    // (L,)
                                  const scalar_t* __restrict__ sampling_locations,  // (B, Q, M, L, P, 2): (x, y)
                                  const scalar_t* __restrict__ attention_weights,   // (B, Q, M, L, P)
                                  scalar_t* __restrict__ output,                    // (B, Q, M * D)
                                  const int64_t num_groups,                         // B * Q * M
                                  const int64_t Q, const int64_t S, const int M, const int D, const int L,
                                  const int P, const int log2_group_size) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ int64_t level_info[];
  load_level_info(spatial_shapes, level_start_index, L, S, level_info);

  const int group_size = 1 << log2_group_size;
  const int lane = threadIdx.x & (group_size - 1);
  const int64_t groups_per_block = blockDim.x >> log2_group_size;
  const int num_vecs = D / V;            // D % V == 0 (host)
  const int64_t md = int64_t(M) * D;     // stride of s in value: (S, M, D) slab of one batch
  const int lp = L * P;                  // fits int (host)

  for (int64_t group = blockIdx.x * groups_per_block + (threadIdx.x >> log2_group_size); group < num_groups;
       group += int64_t(gridDim.x) * groups_per_block) {
    // group = (b * Q + q) * M + m
    const int64_t m = group % M;
    const int64_t b = group / (Q * M);
    // value[b, s, m, c] = value[((b * S + s) * M + m) * D + c]; value_bm is (b, s = 0, m, c = 0), s stride md.
    const scalar_t* value_bm = value + (b * S * M + m) * D;
    // sampling_locations[b, q, m, l, p, xy] = [(group * L * P + l * P + p) * 2 + xy]
    const scalar_t* loc_g = sampling_locations + group * lp * 2;
    // attention_weights[b, q, m, l, p] = [group * L * P + l * P + p]
    const scalar_t* weight_g = attention_weights + group * lp;
    // output[b, q, m * D + c] = [((b * Q + q) * M + m) * D + c] = [group * D + c]
    scalar_t* out_g = output + group * D;

    // Lanes with lane >= num_vecs (G rounded D / V up) have nothing to do; the forward has no shuffles.
    for (int vec = lane; vec < num_vecs; vec += group_size) {
      const int c = vec * V;  // first channel of this lane's vector
      acc_t acc[V];
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] = acc_t(0);
      bool non_finite = false;

      for (int l = 0; l < L; ++l) {
        const int64_t level_start = level_info[3 * l + 0];
        const int64_t H = level_info[3 * l + 1];
        const int64_t W = level_info[3 * l + 2];
        for (int p = 0; p < P; ++p) {
          const int sample = l * P + p;  // (l, p) flattened, the trailing layout of locations and weights
          const acc_t loc_x = static_cast<acc_t>(loc_g[2 * sample]);
          const acc_t loc_y = static_cast<acc_t>(loc_g[2 * sample + 1]);
          Footprint<acc_t> fp;
          const SampleKind kind = locate_sample(loc_x, loc_y, level_start, H, W, fp);
          if (kind != SampleKind::kOnMap) {
            non_finite |= kind == SampleKind::kNonFinite;
            continue;
          }
          const acc_t weight = static_cast<acc_t>(weight_g[sample]);
          // Corners k = 0..3 are (y0, x0), (y0, x1), (y1, x0), (y1, x1): S index s00, s00 + 1, s00 + W,
          // s00 + W + 1, at element offset s * md + c in value_bm. Only dereferenced when the corner is on the map
          // (s00 may be outside the level, even negative); off-map corners read as 0 and are skipped.
          const bool corner_in[4] = {fp.y0_in && fp.x0_in, fp.y0_in && fp.x1_in, fp.y1_in && fp.x0_in,
                                     fp.y1_in && fp.x1_in};
          const acc_t bw[4] = {fp.wy0 * fp.wx0, fp.wy0 * fp.wx1, fp.wy1 * fp.wx0, fp.wy1 * fp.wx1};
          const int64_t off00 = fp.s00 * md + c;
          const int64_t corner_off[4] = {off00, off00 + md, off00 + W * md, off00 + (W + 1) * md};
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            if (!corner_in[k]) continue;
            acc_t v[V];
            load_pack<scalar_t, V>(value_bm + corner_off[k], v);
            const acc_t cw = weight * bw[k];
#pragma unroll
            for (int i = 0; i < V; ++i) acc[i] += cw * v[i];
          }
        }
      }
      if (non_finite) {
        // What the grid_sample reference gives: a NaN location makes every channel of (b, q, m) NaN.
#pragma unroll
        for (int i = 0; i < V; ++i) acc[i] = quiet_nan<acc_t>();
      }
      store_pack<scalar_t, V>(out_g + c, acc);
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------------------

// Same grid as the forward. grad_value_acc is zero-initialised (float for half / bfloat16: a separate buffer).
// grad_sampling_locations and grad_attention_weights are written, not accumulated: every (b, q, m, l, p) belongs
// to exactly one group, and lane 0 of the group writes it (also when the sample is off the map: zeros).
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreadsPerBlock) ms_deform_attn_backward_kernel(
    const scalar_t* __restrict__ value,               // (B, S, M, D)
    const int64_t* __restrict__ spatial_shapes,       // (L, 2): (H, W)
    const int64_t* __restrict__ level_start_index,    // (L,)
    const scalar_t* __restrict__ sampling_locations,  // (B, Q, M, L, P, 2): (x, y)
    const scalar_t* __restrict__ attention_weights,   // (B, Q, M, L, P)
    const scalar_t* __restrict__ grad_output,         // (B, Q, M * D)
    at::opmath_type<scalar_t>* __restrict__ grad_value_acc,  // (B, S, M, D), atomics
    scalar_t* __restrict__ grad_sampling_locations,   // (B, Q, M, L, P, 2)
    scalar_t* __restrict__ grad_attention_weights,    // (B, Q, M, L, P)
    const int64_t num_groups,                         // B * Q * M
    const int64_t Q, const int64_t S, const int M, const int D, const int L, const int P,
    const int log2_group_size) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ int64_t level_info[];
  load_level_info(spatial_shapes, level_start_index, L, S, level_info);

  const int group_size = 1 << log2_group_size;
  const int lane = threadIdx.x & (group_size - 1);
  const int64_t groups_per_block = blockDim.x >> log2_group_size;
  const int num_vecs = D / V;         // D % V == 0 (host)
  const int64_t md = int64_t(M) * D;  // stride of s in value / grad_value
  const int lp = L * P;               // fits int (host)
  // The group's G lanes inside the warp: G consecutive lanes starting at a multiple of G (blockDim.x is a
  // multiple of 32, so warp lane = threadIdx.x % 32 and groups never straddle warps).
  const int warp_lane = threadIdx.x & (kWarpSize - 1);
  const unsigned group_mask =
      group_size == kWarpSize ? 0xffffffffu : ((1u << group_size) - 1u) << (warp_lane & ~(group_size - 1));

  // Every lane of a group has the same `group`, so a group enters and leaves this loop as a whole: lanes of a
  // group that has run past num_groups never owe a shuffle to a lane still inside (the masks name only the group).
  for (int64_t group = blockIdx.x * groups_per_block + (threadIdx.x >> log2_group_size); group < num_groups;
       group += int64_t(gridDim.x) * groups_per_block) {
    // group = (b * Q + q) * M + m
    const int64_t m = group % M;
    const int64_t b = group / (Q * M);
    // value / grad_value [b, s, m, c] = [((b * S + s) * M + m) * D + c]; *_bm is (b, s = 0, m, c = 0).
    const scalar_t* value_bm = value + (b * S * M + m) * D;
    acc_t* grad_value_bm = grad_value_acc + (b * S * M + m) * D;
    // sampling_locations / its grad [b, q, m, l, p, xy] = [(group * L * P + l * P + p) * 2 + xy]
    const scalar_t* loc_g = sampling_locations + group * lp * 2;
    scalar_t* grad_loc_g = grad_sampling_locations + group * lp * 2;
    // attention_weights / its grad [b, q, m, l, p] = [group * L * P + l * P + p]
    const scalar_t* weight_g = attention_weights + group * lp;
    scalar_t* grad_weight_g = grad_attention_weights + group * lp;
    // grad_output[b, q, m * D + c] = [group * D + c]
    const scalar_t* grad_out_g = grad_output + group * D;

    // The lane's first channel vector of grad_output stays in registers across samples (D / V <= G is the usual
    // case: then it is the only one).
    acc_t grad_out_first[V];
    if (lane < num_vecs) {
      load_pack<scalar_t, V>(grad_out_g + lane * V, grad_out_first);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) grad_out_first[i] = acc_t(0);
    }

    for (int l = 0; l < L; ++l) {
      const int64_t level_start = level_info[3 * l + 0];
      const int64_t H = level_info[3 * l + 1];
      const int64_t W = level_info[3 * l + 2];
      for (int p = 0; p < P; ++p) {
        const int sample = l * P + p;  // (l, p) flattened, the trailing layout of locations and weights
        const acc_t loc_x = static_cast<acc_t>(loc_g[2 * sample]);
        const acc_t loc_y = static_cast<acc_t>(loc_g[2 * sample + 1]);
        Footprint<acc_t> fp;
        // Identical inputs and instructions in every lane of the group: `kind` is uniform over the group, which is
        // what lets the shuffles below sit inside the kOnMap branch.
        const SampleKind kind = locate_sample(loc_x, loc_y, level_start, H, W, fp);

        acc_t weight = acc_t(0);
        acc_t sum_weight = acc_t(0);  // sum_c g[c] * bilinear[c]               -> grad_weight
        acc_t sum_x = acc_t(0);       // sum_c g[c] * d bilinear[c] / d x_pix    -> grad_loc_x / (weight * W)
        acc_t sum_y = acc_t(0);       // sum_c g[c] * d bilinear[c] / d y_pix    -> grad_loc_y / (weight * H)
        if (kind == SampleKind::kOnMap) {
          weight = static_cast<acc_t>(weight_g[sample]);
          // Corners k = 0..3 are (y0, x0), (y0, x1), (y1, x0), (y1, x1): S index s00, s00 + 1, s00 + W, s00 + W + 1.
          // With dot_k = sum_c g[c] * v_k[c] (v_k = 0 off the map, so those corners are skipped):
          //   out         = sum_k bw_k * v_k   -> grad_weight += bw_k * dot_k
          //   d / d x_pix = sum_k dx_k * v_k   with dx = (-wy0, +wy0, -wy1, +wy1), since wx1 = x - x0, wx0 = 1 - wx1
          //   d / d y_pix = sum_k dy_k * v_k   with dy = (-wx0, -wx1, +wx0, +wx1)
          //   d / d v_k   = weight * bw_k      -> scattered into grad_value
          const bool corner_in[4] = {fp.y0_in && fp.x0_in, fp.y0_in && fp.x1_in, fp.y1_in && fp.x0_in,
                                     fp.y1_in && fp.x1_in};
          const acc_t bw[4] = {fp.wy0 * fp.wx0, fp.wy0 * fp.wx1, fp.wy1 * fp.wx0, fp.wy1 * fp.wx1};
          const acc_t dx[4] = {-fp.wy0, fp.wy0, -fp.wy1, fp.wy1};
          const acc_t dy[4] = {-fp.wx0, -fp.wx1, fp.wx0, fp.wx1};

          for (int vec = lane; vec < num_vecs; vec += group_size) {
            const int c = vec * V;  // first channel of this vector
            acc_t g[V];
            if (vec == lane) {
#pragma unroll
              for (int i = 0; i < V; ++i) g[i] = grad_out_first[i];
            } else {
              load_pack<scalar_t, V>(grad_out_g + c, g);
            }
            // Element offsets of the corners in value_bm / grad_value_bm: s * md + c. Only dereferenced when the
            // corner is on the map (s00 may be outside the level, even negative).
            const int64_t off00 = fp.s00 * md + c;
            const int64_t corner_off[4] = {off00, off00 + md, off00 + W * md, off00 + (W + 1) * md};
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              if (!corner_in[k]) continue;
              acc_t v[V];
              load_pack<scalar_t, V>(value_bm + corner_off[k], v);
              acc_t dot = acc_t(0);
#pragma unroll
              for (int i = 0; i < V; ++i) dot += g[i] * v[i];
              sum_weight += bw[k] * dot;
              sum_x += dx[k] * dot;
              sum_y += dy[k] * dot;
              atomic_add_scaled<V>(grad_value_bm + corner_off[k], g, weight * bw[k]);
            }
          }
          // Butterfly over the group's lanes: lane ^ offset stays inside the group for offset < G, and after
          // log2(G) steps every lane holds the group total. Lanes without channels add zeros.
          for (int offset = group_size >> 1; offset > 0; offset >>= 1) {
            sum_weight += __shfl_xor_sync(group_mask, sum_weight, offset);
            sum_x += __shfl_xor_sync(group_mask, sum_x, offset);
            sum_y += __shfl_xor_sync(group_mask, sum_y, offset);
          }
        }

        if (lane == 0) {
          acc_t grad_weight = sum_weight;
          // pixel = loc * size - 0.5, so d pixel / d loc = size.
          acc_t grad_x = weight * static_cast<acc_t>(W) * sum_x;
          acc_t grad_y = weight * static_cast<acc_t>(H) * sum_y;
          if (kind == SampleKind::kNonFinite) {
            grad_weight = grad_x = grad_y = quiet_nan<acc_t>();
          } else if (kind == SampleKind::kOffMap) {
            grad_weight = grad_x = grad_y = acc_t(0);
          }
          grad_weight_g[sample] = static_cast<scalar_t>(grad_weight);
          grad_loc_g[2 * sample] = static_cast<scalar_t>(grad_x);
          grad_loc_g[2 * sample + 1] = static_cast<scalar_t>(grad_y);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------------------

void check_tensor(const at::Tensor& t, const char* name, const at::Device& device, const at::ScalarType dtype) {
  TORCH_CHECK(t.device() == device, "ms_deform_attn (CUDA): ", name, " is on ", t.device(),
              ", expected the device of value, ", device);
  TORCH_CHECK(t.scalar_type() == dtype, "ms_deform_attn (CUDA): ", name, " has dtype ", t.scalar_type(),
              ", expected ", dtype);
  TORCH_CHECK(t.is_contiguous(), "ms_deform_attn (CUDA): ", name,
              " must be contiguous (the Python wrapper makes it so)");
}

// Sizes shared by forward and backward; checks shapes (cheap, no device sync: the values of spatial_shapes and
// level_start_index are trusted, the Python side validates them).
struct Problem {
  int64_t B, S, M, D, Q, L, P;
};

Problem check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                     const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  TORCH_CHECK(value.is_cuda(), "ms_deform_attn (CUDA): value must be a CUDA tensor, got ", value.device());
  const at::Device device = value.device();
  check_tensor(value, "value", device, value.scalar_type());
  check_tensor(spatial_shapes, "spatial_shapes", device, at::kLong);
  check_tensor(level_start_index, "level_start_index", device, at::kLong);
  check_tensor(sampling_locations, "sampling_locations", device, value.scalar_type());
  check_tensor(attention_weights, "attention_weights", device, value.scalar_type());
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn (CUDA): value must be (B, S, M, D), got ", value.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "ms_deform_attn (CUDA): sampling_locations must be (B, Q, M, L, P, 2), got ", sampling_locations.sizes());
  Problem pr;
  pr.B = value.size(0);
  pr.S = value.size(1);
  pr.M = value.size(2);
  pr.D = value.size(3);
  pr.Q = sampling_locations.size(1);
  pr.L = sampling_locations.size(3);
  pr.P = sampling_locations.size(4);
  TORCH_CHECK(sampling_locations.size(0) == pr.B && sampling_locations.size(2) == pr.M,
              "ms_deform_attn (CUDA): sampling_locations ", sampling_locations.sizes(),
              " does not match value (B, S, M, D) = ", value.sizes());
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
              "ms_deform_attn (CUDA): attention_weights must be (B, Q, M, L, P) = ",
              sampling_locations.sizes().slice(0, 5), ", got ", attention_weights.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == pr.L && spatial_shapes.size(1) == 2,
              "ms_deform_attn (CUDA): spatial_shapes must be (L, 2) with L = ", pr.L, ", got ", spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == pr.L,
              "ms_deform_attn (CUDA): level_start_index must be (L,) with L = ", pr.L, ", got ",
              level_start_index.sizes());
  TORCH_CHECK(pr.L <= kMaxLevels, "ms_deform_attn (CUDA): at most ", kMaxLevels, " levels, got ", pr.L);
  // The kernels keep M, D and 2 * L * P in int; products with B, Q, S are int64.
  TORCH_CHECK(pr.M <= std::numeric_limits<int>::max() && pr.D <= std::numeric_limits<int>::max() &&
                  pr.P <= std::numeric_limits<int>::max() / 2 &&
                  pr.L * pr.P <= std::numeric_limits<int>::max() / 2,
              "ms_deform_attn (CUDA): M, D or L * P too large for the kernel");
  return pr;
}

// Widest V (a power of two, 16 bytes at most) with D % V == 0 and every pointer aligned to V * sizeof(scalar_t).
// Offsets are ((...) * D + c) with c a multiple of V, so base alignment is all that is needed.
template <typename scalar_t>
int pick_vector_width(const int64_t D, std::initializer_list<const void*> pointers) {
  for (int vec = 16 / static_cast<int>(sizeof(scalar_t)); vec > 1; vec /= 2) {
    if (D % vec != 0) continue;
    const uintptr_t bytes = static_cast<uintptr_t>(vec) * sizeof(scalar_t);
    bool aligned = true;
    for (const void* ptr : pointers) aligned = aligned && reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
    if (aligned) return vec;
  }
  return 1;
}

// log2 of G = next power of two >= num_vecs, capped at 32 (then lanes loop over channel vectors).
int log2_group_size_for(const int64_t num_vecs) {
  int log2_g = 0;
  while (log2_g < kMaxLog2GroupSize && (int64_t(1) << log2_g) < num_vecs) ++log2_g;
  return log2_g;
}

unsigned grid_blocks(const int64_t num_groups, const int log2_group_size) {
  const int64_t groups_per_block = kThreadsPerBlock >> log2_group_size;
  const int64_t blocks = (num_groups + groups_per_block - 1) / groups_per_block;
  return static_cast<unsigned>(std::min(blocks, kMaxBlocks));
}

// Calls launch(std::integral_constant<int, V>) for the runtime width; widths over 16 bytes are not instantiated.
template <typename scalar_t, typename Launch>
void dispatch_vector_width(const int vec, const Launch& launch) {
  constexpr int kMaxVec = 16 / static_cast<int>(sizeof(scalar_t));
  if constexpr (kMaxVec >= 8) {
    if (vec == 8) return launch(std::integral_constant<int, 8>());
  }
  if constexpr (kMaxVec >= 4) {
    if (vec == 4) return launch(std::integral_constant<int, 4>());
  }
  if constexpr (kMaxVec >= 2) {
    if (vec == 2) return launch(std::integral_constant<int, 2>());
  }
  TORCH_INTERNAL_ASSERT(vec == 1, "ms_deform_attn (CUDA): unexpected vector width ", vec);
  launch(std::integral_constant<int, 1>());
}

}  // namespace

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights) {
  const Problem pr = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const c10::cuda::OptionalCUDAGuard device_guard(value.device());

  // Every element is written by the kernel (NaN, zero or the sum), so no memset.
  at::Tensor output = at::empty({pr.B, pr.Q, pr.M * pr.D}, value.options());
  if (output.numel() == 0) return output;

  const int64_t num_groups = pr.B * pr.Q * pr.M;
  const size_t shared_bytes = static_cast<size_t>(3 * pr.L) * sizeof(int64_t);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    const int vec = pick_vector_width<scalar_t>(pr.D, {value.data_ptr(), output.data_ptr()});
    const int log2_g = log2_group_size_for(pr.D / vec);
    const unsigned blocks = grid_blocks(num_groups, log2_g);
    dispatch_vector_width<scalar_t>(vec, [&](auto vec_constant) {
      constexpr int V = decltype(vec_constant)::value;
      ms_deform_attn_forward_kernel<scalar_t, V><<<blocks, kThreadsPerBlock, shared_bytes, stream>>>(
          value.const_data_ptr<scalar_t>(), spatial_shapes.const_data_ptr<int64_t>(),
          level_start_index.const_data_ptr<int64_t>(), sampling_locations.const_data_ptr<scalar_t>(),
          attention_weights.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), num_groups, pr.Q,
          pr.S, static_cast<int>(pr.M), static_cast<int>(pr.D), static_cast<int>(pr.L), static_cast<int>(pr.P),
          log2_g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights, const at::Tensor& grad_output) {
  const Problem pr = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_tensor(grad_output, "grad_output", value.device(), value.scalar_type());
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == pr.B && grad_output.size(1) == pr.Q &&
                  grad_output.size(2) == pr.M * pr.D,
              "ms_deform_attn (CUDA): grad_output must be (B, Q, M * D) = (", pr.B, ", ", pr.Q, ", ", pr.M * pr.D,
              "), got ", grad_output.sizes());
  const c10::cuda::OptionalCUDAGuard device_guard(value.device());

  // Written in full by the kernel (one owner per (b, q, m, l, p)), so no memset.
  at::Tensor grad_sampling_locations = at::empty(sampling_locations.sizes(), sampling_locations.options());
  at::Tensor grad_attention_weights = at::empty(attention_weights.sizes(), attention_weights.options());
  at::Tensor grad_value;

  const int64_t num_groups = pr.B * pr.Q * pr.M;
  const size_t shared_bytes = static_cast<size_t>(3 * pr.L) * sizeof(int64_t);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // float / double: atomics go straight into grad_value; half / bfloat16: into a float buffer, cast below.
    at::Tensor grad_value_acc =
        at::zeros(value.sizes(), value.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    // No sample at all (B, Q, M, L or P is 0): grad_value stays zero and the other two grads are empty.
    if (grad_sampling_locations.numel() > 0) {
      // The float4 / float2 atomics need the accumulator aligned to 16 bytes; a fresh allocation always is.
      TORCH_INTERNAL_ASSERT(reinterpret_cast<uintptr_t>(grad_value_acc.data_ptr()) % 16 == 0);
      const int vec = pick_vector_width<scalar_t>(pr.D, {value.data_ptr(), grad_output.data_ptr()});
      const int log2_g = log2_group_size_for(pr.D / vec);
      const unsigned blocks = grid_blocks(num_groups, log2_g);
      dispatch_vector_width<scalar_t>(vec, [&](auto vec_constant) {
        constexpr int V = decltype(vec_constant)::value;
        ms_deform_attn_backward_kernel<scalar_t, V><<<blocks, kThreadsPerBlock, shared_bytes, stream>>>(
            value.const_data_ptr<scalar_t>(), spatial_shapes.const_data_ptr<int64_t>(),
            level_start_index.const_data_ptr<int64_t>(), sampling_locations.const_data_ptr<scalar_t>(),
            attention_weights.const_data_ptr<scalar_t>(), grad_output.const_data_ptr<scalar_t>(),
            grad_value_acc.mutable_data_ptr<acc_t>(), grad_sampling_locations.mutable_data_ptr<scalar_t>(),
            grad_attention_weights.mutable_data_ptr<scalar_t>(), num_groups, pr.Q, pr.S, static_cast<int>(pr.M),
            static_cast<int>(pr.D), static_cast<int>(pr.L), static_cast<int>(pr.P), log2_g);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    grad_value = std::is_same<acc_t, scalar_t>::value ? grad_value_acc : grad_value_acc.to(value.scalar_type());
  });
  return std::make_tuple(grad_value, grad_sampling_locations, grad_attention_weights);
}

}  // namespace bevdeform
