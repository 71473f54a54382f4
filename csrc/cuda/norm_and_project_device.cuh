// Device code of vapt::norm_and_project_fwd / _bwd (docs/design.md §1.4): the block's LayerNorm
// h = LN_1(x), the prompt projection g = mix @ LN_g(x[:, P:]), and their backward. The launcher
// (norm_and_project_kernel.cu) and the launch geometry (norm_and_project_launch.h) are separate.
//
// Shapes: x, h, dh, dx (B, T, d) with T = P + N (P prefix tokens, N patches); g, dg (B, Np, d);
// mix (Np, N) shared by all channels or (Np, N, d) per channel, float; weights/biases (d,) in x's
// dtype (nullptr = ones/zeros); mean, rstd1, rstd_g (B, T) float. Statistics and every accumulation
// are float whatever x's dtype (float, c10::Half, c10::BFloat16).
//
// Forward: rows_fwd_kernel (one warp per row) writes h and the row statistics; project_kernel then
// computes g, each block owning a tile of g and looping over all N patches, so g is reduced inside
// the block: no partials, no atomics, deterministic. It rebuilds LN_g(x) from x and the statistics
// while staging it, so LN_g(x) is never stored.
// Backward: project_kernel computes the gradient reaching LN_g(x), dxg = mix^T dg (B, N, d) float,
// once; rows_bwd_kernel turns it and dh into dx (both LayerNorm backward terms in one pass) and the
// weight/bias gradients (per-block column partials); project_kernel also computes dmix: per image
// for the shared mix (a sum over channels), summed over the batch for the per-channel mix.
//
// Many tasks (a per-image index task (B,) int64 in [0, K)): mix is stacked per task, (K, Np, N) or
// (K, Np, N, d), and gen_weight/gen_bias are (K, d); image b uses the slices of task[b], reached by
// offsetting pointers with task[b] (no per-image copy of mix). The TASKS instantiations of
// project_kernel and rows_bwd_kernel read these indices; the others are the single-task code
// (compiled as before the index existed: same registers). The per-task sums are
// deterministic without atomics: the per-channel dmix sums each task's images inside
// project_kernel in the order of a stable sort of task; the shared-mix dmix and dgen_weight/bias
// come from per-image partials that task_sum_kernel adds up in that same order.

#pragma once

#include <cstdint>

#include "common.cuh"
#include "norm_and_project_launch.h"

namespace vapt {
namespace {

// "Geometry f" before a kernel names the function of norm_and_project_launch.h (namespace
// vapt::norm_and_project) that sizes its launch.
using norm_and_project::kBwdTileRows;
using norm_and_project::kRowThreads;
using norm_and_project::kRowWarps;

// VEC consecutive elements, aligned so that one load/store instruction moves them all.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <int VEC, typename T>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

template <int VEC, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& pack) {
  *reinterpret_cast<Pack<T, VEC>*>(p) = pack;
}

// out[v] = p[c + v] as float, or `fill` when p == nullptr (a None parameter, a row that is not there).
template <int VEC, typename scalar_t>
__device__ __forceinline__ void load_param(const scalar_t* p, int64_t c, float fill, float (&out)[VEC]) {
  if (p == nullptr) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) out[v] = fill;
    return;
  }
  const Pack<scalar_t, VEC> pack = load_pack<VEC>(p + c);
#pragma unroll
  for (int v = 0; v < VEC; ++v) out[v] = static_cast<float>(pack.v[v]);
}

// ---------------------------------------------------------------------------------------------
// Forward rows: h = LN_1(x) and the statistics of both LayerNorms.
// ---------------------------------------------------------------------------------------------

// Geometry rows_fwd_geometry: warp w of block k normalises row k * kRowWarps + w of the flattened
// (B * T, d) x. Lane l handles the packs starting at l * VEC, (l + 32) * VEC, ... The row
// is read three times (sum, centred squares, output); the second and third reads hit the cache.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kRowThreads) rows_fwd_kernel(
    const scalar_t* __restrict__ x,   // (B * T, d)
    const scalar_t* __restrict__ w1,  // (d,) or nullptr
    const scalar_t* __restrict__ b1,  // (d,) or nullptr
    scalar_t* __restrict__ h,         // (B * T, d)
    float* __restrict__ mean,         // (B * T,)
    float* __restrict__ rstd1,        // (B * T,)
    float* __restrict__ rstd_g,       // (B * T,)
    int64_t rows, int64_t d, float eps1, float eps_g) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (row >= rows) return;  // whole warps leave together, so warp_sum below sees full warps
  const scalar_t* x_row = x + row * d;
  const float inv_d = 1.0f / static_cast<float>(d);

  float sum = 0.0f;
  for (int64_t c = lane * VEC; c < d; c += kWarpSize * VEC) {
    const Pack<scalar_t, VEC> xp = load_pack<VEC>(x_row + c);
#pragma unroll
    for (int v = 0; v < VEC; ++v) sum += static_cast<float>(xp.v[v]);
  }
  const float mu = warp_sum(sum) * inv_d;
  // Biased variance from centred values (two passes: no cancellation for rows far from zero).
  float sq = 0.0f;
  for (int64_t c = lane * VEC; c < d; c += kWarpSize * VEC) {
    const Pack<scalar_t, VEC> xp = load_pack<VEC>(x_row + c);
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const float xc = static_cast<float>(xp.v[v]) - mu;
      sq += xc * xc;
    }
  }
  const float var = warp_sum(sq) * inv_d;
  const float rs1 = rsqrtf(var + eps1);
  for (int64_t c = lane * VEC; c < d; c += kWarpSize * VEC) {
    float w1v[VEC], b1v[VEC];
    load_param<VEC>(w1, c, 1.0f, w1v);
    load_param<VEC>(b1, c, 0.0f, b1v);
    const Pack<scalar_t, VEC> xp = load_pack<VEC>(x_row + c);
    Pack<scalar_t, VEC> hp;
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      hp.v[v] = static_cast<scalar_t>((static_cast<float>(xp.v[v]) - mu) * rs1 * w1v[v] + b1v[v]);
    }
    store_pack<VEC>(h + row * d + c, hp);
  }
  if (lane == 0) {
    mean[row] = mu;
    rstd1[row] = rs1;
    rstd_g[row] = rsqrtf(var + eps_g);
  }
}

// ---------------------------------------------------------------------------------------------
// project_kernel: out[z, m, c] = sum_k A[z, m, k(, c)] * Bop[z, k, c] on register tiles.
// ---------------------------------------------------------------------------------------------

// A[z, m, k, c] = a[z * z_stride + m * m_stride + k * k_stride + c * c_stride]: mix (float, the same
// for every z) or dg (x's dtype). With TASKS and z_index: a[z_index[z] * z_stride + ...] (the mix of
// task[b] for image z = b).
template <typename a_t>
struct StridedOperand {
  const a_t* a;
  int64_t z_stride, m_stride, k_stride, c_stride;
  const int64_t* z_index = nullptr;  // (Z,) or nullptr: z itself

  template <bool TASKS>
  __device__ __forceinline__ float load(int64_t z, int64_t m, int64_t k, int64_t c) const {
    if constexpr (TASKS) {
      if (z_index != nullptr) z = z_index[z];
    }
    return static_cast<float>(a[z * z_stride + m * m_stride + k * k_stride + c * c_stride]);
  }
};

// Bop[z, k, c] = element (r, ch) of a (rows, d) matrix in x's dtype (x or dg), with
// r = z * z_stride + i * row_stride + row0 and (i, ch) = (k, c), or (c, k) when channels_along_k
// (the sum runs over channels: the shared-mix dmix). With mean != nullptr the element is taken from
// LN_g of its row, rebuilt from the saved statistics. With TASKS and task: w and b are (K, d) and the
// row of image z (or k, image_along_k: the per-channel dmix sums over images) uses their row
// task[image].
template <typename scalar_t>
struct RowOperand {
  const scalar_t* rows;
  int64_t z_stride, row_stride, row0, d;
  bool channels_along_k = false;
  const float* mean = nullptr;  // (rows,) or nullptr: the rows as they are
  const float* rstd = nullptr;  // (rows,), with mean
  const scalar_t* w = nullptr;  // (d,), (K, d) with task, or nullptr, with mean
  const scalar_t* b = nullptr;  // (d,), (K, d) with task, or nullptr, with mean
  const int64_t* task = nullptr;  // (images,) or nullptr: one affine row for all
  bool image_along_k = false;

  template <bool TASKS>
  __device__ __forceinline__ float load(int64_t z, int64_t k, int64_t c) const {
    const int64_t r = z * z_stride + (channels_along_k ? c : k) * row_stride + row0;
    int64_t ch = channels_along_k ? k : c;
    const float v = static_cast<float>(rows[r * d + ch]);
    if (mean == nullptr) return v;
    if constexpr (TASKS) {
      if (task != nullptr) ch += task[image_along_k ? k : z] * d;  // the affine row of the image's task
    }
    const float wv = w == nullptr ? 1.0f : static_cast<float>(w[ch]);
    const float bv = b == nullptr ? 0.0f : static_cast<float>(b[ch]);
    return (v - mean[r]) * rstd[r] * wv + bv;
  }
};

// The per-task sums over k of project_kernel (TASKS only; order == nullptr: none): block x =
// s * z_blocks + zb, z_blocks = ceil(Z / BZ), computes z block zb of task s's output, out + s *
// out_stride, summing k over the images order[bounds[s]], ..., order[bounds[s + 1] - 1] only (each
// task's images in ascending index order: a stable sort of task). A task without images gets zeros.
struct KSegments {
  const int64_t* order = nullptr;   // (K_sum,): the summed k grouped by task
  const int64_t* bounds = nullptr;  // (tasks + 1,): task s owns order[bounds[s] : bounds[s + 1]]
  int64_t out_stride = 0;
};

// Geometry project_geometry<Tile>(Z, M, C): block (bz, bm, bc) owns
// out[bz*BZ : +BZ, bm*BM : +BM, bc*BC : +BC] (Z, M, C) and loops over all K, so each output is summed
// by one thread in a fixed order. Per step of BK values of k, the block stages A (BK, BM, BC or 1)
// and Bop (BK, BZ, BC) in shared memory (zeros outside the shapes, so partial tiles need no
// branches in the product), then thread (tz, tm, tc) accumulates its TZ x TM x TC sub-tile:
// acc[iz][im][ic] += A[z0, tm*TM + im, k(, tc*TC + ic)] * Bop[tz*TZ + iz, k, tc*TC + ic].
// out[z, m, c] lives at out[z * oz + m * om + c]. A is staged once per block, for z0: it may depend
// on z (z_stride != 0, or a z_index) only when BZ == 1 (the launcher checks). TASKS: the operands'
// task indices and the per-task segments `seg` are read (the many-task op); otherwise they are ignored.
template <typename Tile, bool TASKS, typename a_t, typename scalar_t, typename out_t>
__global__ void __launch_bounds__(Tile::threads) project_kernel(StridedOperand<a_t> A, RowOperand<scalar_t> Bop,
                                                                KSegments seg, out_t* __restrict__ out, int64_t oz,
                                                                int64_t om, int64_t Z, int64_t M, int64_t K,
                                                                int64_t C) {
  constexpr int BZ = Tile::BZ, BM = Tile::BM, BC = Tile::BC, TZ = Tile::TZ, TM = Tile::TM, TC = Tile::TC;
  constexpr int BK = Tile::BK, AC = Tile::A_PER_CHANNEL ? BC : 1;
  __shared__ __align__(16) float a_s[BK][BM][AC];
  __shared__ __align__(16) float b_s[BK][BZ][BC];

  unsigned int zb = blockIdx.x;
  int64_t k_begin = 0, k_end = K;
  if constexpr (TASKS) {
    if (seg.order != nullptr) {
      const unsigned int z_blocks = static_cast<unsigned int>((Z + BZ - 1) / BZ);
      const unsigned int s = blockIdx.x / z_blocks;
      zb = blockIdx.x % z_blocks;
      k_begin = seg.bounds[s];
      k_end = seg.bounds[s + 1];
      out += s * seg.out_stride;
    }
  }
  const int64_t z0 = static_cast<int64_t>(zb) * BZ;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM;
  const int64_t c0 = static_cast<int64_t>(blockIdx.z) * BC;
  const int tc = threadIdx.x % (BC / TC);
  const int tm = threadIdx.x / (BC / TC) % (BM / TM);
  const int tz = threadIdx.x / (BC / TC) / (BM / TM);

  float acc[TZ][TM][TC];
#pragma unroll
  for (int iz = 0; iz < TZ; ++iz)
#pragma unroll
    for (int im = 0; im < TM; ++im)
#pragma unroll
      for (int ic = 0; ic < TC; ++ic) acc[iz][im][ic] = 0.0f;

  // k_of(kk): the kk-th summed k (through the task grouping when there is one).
  const auto k_of = [&](int64_t kk) -> int64_t {
    if constexpr (TASKS) {
      if (seg.order != nullptr) return seg.order[kk];
    }
    return kk;
  };
  for (int64_t k0 = k_begin; k0 < k_end; k0 += BK) {
    // Staging: consecutive threads take consecutive c (coalesced rows of x, dg and the per-channel
    // mix when c is the channel; for the shared-mix dmix, c is the patch and the rows come from L1).
    for (int i = threadIdx.x; i < BK * BM * AC; i += Tile::threads) {
      const int c = i % AC, m = i / AC % BM, k = i / AC / BM;
      const bool inside = k0 + k < k_end && m0 + m < M && c0 + c < C;
      a_s[k][m][c] = inside ? A.template load<TASKS>(z0, m0 + m, k_of(k0 + k), c0 + c) : 0.0f;
    }
    for (int i = threadIdx.x; i < BK * BZ * BC; i += Tile::threads) {
      const int c = i % BC, z = i / BC % BZ, k = i / BC / BZ;
      const bool inside = k0 + k < k_end && z0 + z < Z && c0 + c < C;
      b_s[k][z][c] = inside ? Bop.template load<TASKS>(z0 + z, k_of(k0 + k), c0 + c) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      // a[im][ic]: A's value for row tm*TM + im (and channel tc*TC + ic when A has channels).
      float a[TM][Tile::A_PER_CHANNEL ? TC : 1];
#pragma unroll
      for (int im = 0; im < TM; ++im) {
        if constexpr (Tile::A_PER_CHANNEL) {
          const Pack<float, TC> ap = load_pack<TC>(&a_s[k][tm * TM + im][tc * TC]);
#pragma unroll
          for (int ic = 0; ic < TC; ++ic) a[im][ic] = ap.v[ic];
        } else {
          a[im][0] = a_s[k][tm * TM + im][0];
        }
      }
#pragma unroll
      for (int iz = 0; iz < TZ; ++iz) {
        const Pack<float, TC> bp = load_pack<TC>(&b_s[k][tz * TZ + iz][tc * TC]);
#pragma unroll
        for (int im = 0; im < TM; ++im)
#pragma unroll
          for (int ic = 0; ic < TC; ++ic) {
            acc[iz][im][ic] = fmaf(a[im][Tile::A_PER_CHANNEL ? ic : 0], bp.v[ic], acc[iz][im][ic]);
          }
      }
    }
    __syncthreads();  // the next step overwrites the staged tiles
  }

#pragma unroll
  for (int iz = 0; iz < TZ; ++iz)
#pragma unroll
    for (int im = 0; im < TM; ++im)
#pragma unroll
      for (int ic = 0; ic < TC; ++ic) {
        const int64_t z = z0 + tz * TZ + iz, m = m0 + tm * TM + im, c = c0 + tc * TC + ic;
        if (z < Z && m < M && c < C) out[z * oz + m * om + c] = static_cast<out_t>(acc[iz][im][ic]);
      }
}

// ---------------------------------------------------------------------------------------------
// Backward rows: dx and column partials of the affine gradients.
// ---------------------------------------------------------------------------------------------

// Geometry rows_bwd_geometry: block (b, k) owns rows t0 = k * kBwdTileRows ... of image b (the
// image is a grid index rather than a division of a flattened row index: a 64-bit division is a
// long subroutine call on the GPU).
// Phase 1 (warp per row): coef[0..3][r] = mean over channels of dy1, dy1 * xhat1, dyg, dyg * xhatg,
// with dy1 = dh * w1, dyg = dxg * wg (dxg = 0 on prefix rows).
// Phase 2 (thread per pack of VEC channels): dx = rstd1 (dy1 - coef0 - xhat1 coef1)
// + rstd_g (dyg - coef2 - xhatg coef3) for every row, and sums of dh * xhat1, dh, dxg * xhatg, dxg
// over the block's rows into col_part[slot, 0..3, :] (added over slots on the host: deterministic).
// TASKS (many tasks): wg is (K, d) and image b uses its row task[b]; the single-task instantiation
// does not read task.
// __launch_bounds__ with a minimum of one block per SM: with the block size alone, ptxas 13 allots
// some variants 48 registers and spills.
template <typename scalar_t, int VEC, bool TASKS>
__global__ void __launch_bounds__(kRowThreads, 1) rows_bwd_kernel(
    const scalar_t* __restrict__ dh,  // (B, T, d)
    const scalar_t* __restrict__ x,   // (B, T, d)
    const scalar_t* __restrict__ w1,  // (d,) or nullptr
    const scalar_t* __restrict__ wg,  // (d,), (K, d) with task, or nullptr
    const int64_t* __restrict__ task, // (B,), read with TASKS only
    const float* __restrict__ dxg,    // (B, N, d): mix^T dg, the gradient reaching LN_g(x)
    const float* __restrict__ mean,   // (B, T)
    const float* __restrict__ rstd1,  // (B, T)
    const float* __restrict__ rstd_g, // (B, T)
    scalar_t* __restrict__ dx,        // (B, T, d)
    float* __restrict__ col_part,     // (B * tiles * groups, 4, d): this block writes its `groups` slots
    int64_t T, int64_t d, int64_t P, int groups) {
  __shared__ float coef[4][kBwdTileRows];

  const int64_t b = blockIdx.x;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * kBwdTileRows;
  const int rows = static_cast<int>(T - t0 < kBwdTileRows ? T - t0 : kBwdTileRows);
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const float inv_d = 1.0f / static_cast<float>(d);
  const int64_t N = T - P;
  if constexpr (TASKS) {
    if (wg != nullptr) wg += task[b] * d;  // the gen weight row of the image's task
  }

  for (int r = warp; r < rows; r += kRowWarps) {
    const int64_t row = b * T + t0 + r, n = t0 + r - P;  // n < 0: a prefix row
    const float* dxg_row = n >= 0 ? dxg + (b * N + n) * d : nullptr;
    const float mu = mean[row], rs1 = rstd1[row], rsg = rstd_g[row];
    float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t c = lane * VEC; c < d; c += kWarpSize * VEC) {
      const Pack<scalar_t, VEC> xp = load_pack<VEC>(x + row * d + c);
      const Pack<scalar_t, VEC> dhp = load_pack<VEC>(dh + row * d + c);
      float w1v[VEC], wgv[VEC], dxgv[VEC];
      load_param<VEC>(w1, c, 1.0f, w1v);
      load_param<VEC>(wg, c, 1.0f, wgv);
      load_param<VEC>(dxg_row, c, 0.0f, dxgv);
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const float xc = static_cast<float>(xp.v[v]) - mu;
        const float dy1 = static_cast<float>(dhp.v[v]) * w1v[v];
        const float dyg = dxgv[v] * wgv[v];
        s[0] += dy1;
        s[1] += dy1 * xc * rs1;
        s[2] += dyg;
        s[3] += dyg * xc * rsg;
      }
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) s[k] = warp_sum(s[k]);
    if (lane == 0) {
#pragma unroll
      for (int k = 0; k < 4; ++k) coef[k][r] = s[k] * inv_d;
    }
  }
  __syncthreads();

  // Phase 2: thread k owns the pack of channels q0 = k % pack_lanes (and q0 + pack_lanes, ... when
  // d has more packs than the block has threads) for the rows gi, gi + groups, ... of the tile,
  // gi = k / pack_lanes.
  const int64_t packs = d / VEC;
  const int pack_lanes = static_cast<int>(packs < kRowThreads ? packs : kRowThreads);
  const int gi = static_cast<int>(threadIdx.x) / pack_lanes;
  if (gi >= groups) return;
  float* col_slot = col_part + ((b * gridDim.y + blockIdx.y) * groups + gi) * 4 * d;
  for (int64_t q = static_cast<int>(threadIdx.x) % pack_lanes; q < packs; q += pack_lanes) {
    const int64_t c = q * VEC;
    float w1v[VEC], wgv[VEC];
    load_param<VEC>(w1, c, 1.0f, w1v);
    load_param<VEC>(wg, c, 1.0f, wgv);
    Pack<float, VEC> dw1, db1, dwg, dbg;
#pragma unroll
    for (int v = 0; v < VEC; ++v) dw1.v[v] = db1.v[v] = dwg.v[v] = dbg.v[v] = 0.0f;
    for (int r = gi; r < rows; r += groups) {
      const int64_t row = b * T + t0 + r, n = t0 + r - P;
      const float mu = mean[row], rs1 = rstd1[row], rsg = rstd_g[row];
      const Pack<scalar_t, VEC> xp = load_pack<VEC>(x + row * d + c);
      const Pack<scalar_t, VEC> dhp = load_pack<VEC>(dh + row * d + c);
      float dxgv[VEC];
      load_param<VEC>(n >= 0 ? dxg + (b * N + n) * d : nullptr, c, 0.0f, dxgv);
      Pack<scalar_t, VEC> dxp;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const float xc = static_cast<float>(xp.v[v]) - mu;
        const float xh1 = xc * rs1;
        const float xhg = xc * rsg;
        const float dhv = static_cast<float>(dhp.v[v]);
        const float dy1 = dhv * w1v[v];
        const float dyg = dxgv[v] * wgv[v];
        dxp.v[v] = static_cast<scalar_t>(rs1 * (dy1 - coef[0][r] - xh1 * coef[1][r]) +
                                         rsg * (dyg - coef[2][r] - xhg * coef[3][r]));
        dw1.v[v] += dhv * xh1;
        db1.v[v] += dhv;
        dwg.v[v] += dxgv[v] * xhg;
        dbg.v[v] += dxgv[v];
      }
      store_pack<VEC>(dx + row * d + c, dxp);
    }
    store_pack<VEC>(col_slot + 0 * d + c, dw1);
    store_pack<VEC>(col_slot + 1 * d + c, db1);
    store_pack<VEC>(col_slot + 2 * d + c, dwg);
    store_pack<VEC>(col_slot + 3 * d + c, dbg);
  }
}

// ---------------------------------------------------------------------------------------------
// Per-task sums of per-image partials (many tasks).
// ---------------------------------------------------------------------------------------------

// Geometry task_sum_geometry(tasks, L): thread i of block (x, s) writes out[s, i] (tasks, L) for
// i = x * kRowThreads + threadIdx.x < L: the sum over task s's images b = order[bounds[s]], ...,
// order[bounds[s + 1] - 1] (ascending b) of that image's partials part[(b * S + q) * stride + i],
// q < S, added up first (the S column-partial slots of an image; S = 1 for the per-image dmix).
// One thread per output in a fixed order: deterministic; a task without images gets zeros.
__global__ void __launch_bounds__(kRowThreads) task_sum_kernel(
    const float* __restrict__ part,     // (B * S, stride): rows b * S ... b * S + S - 1 are image b's
    const int64_t* __restrict__ order,  // (B,): the images grouped by task
    const int64_t* __restrict__ bounds, // (tasks + 1,): task s owns order[bounds[s] : bounds[s + 1]]
    float* __restrict__ out,            // (tasks, L)
    int64_t S, int64_t stride, int64_t L) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowThreads + threadIdx.x;
  const int64_t s = blockIdx.y;
  if (i >= L) return;
  float total = 0.0f;
  for (int64_t j = bounds[s]; j < bounds[s + 1]; ++j) {
    const float* image = part + order[j] * S * stride + i;
    float sum = 0.0f;
    for (int64_t q = 0; q < S; ++q) sum += image[q * stride];
    total += sum;
  }
  out[s * L + i] = total;
}

}  // namespace
}  // namespace vapt
