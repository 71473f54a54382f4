// CUDA kernels of vapt::norm_and_project_fwd / _bwd (DESIGN §2.3): the block's own LayerNorm
// h = LN_1(x) and the prompt projection g = mix @ LN_g(x[:, P:]) from one read of x, and a backward
// pass that sums both LayerNorm backward terms into one dx.
//
// Shapes: x, h, dh, dx (B, T, d) with T = P + N (P prefix tokens, N patches); g, dg (B, Np, d);
// mix (Np, N) shared by all channels or (Np, N, d) per channel; weights/biases (d,) in x's dtype
// (None = ones/zeros); mean, rstd1, rstd_g (B, T). acc_t is the stats and accumulation dtype,
// float (at::opmath_type of float32, float16 and bfloat16, the dtypes these kernels take).
//
// Why this layout of work:
// * Both LayerNorms normalise the same rows, so one warp per row computes the mean/variance once
//   and emits both normalisations (h to global memory, LN_g(x) to a shared-memory row buffer).
// * g is a reduction over rows, so each block (a tile of rows of one image) reduces its rows into
//   a partial g and at::sum adds the tiles afterwards: no atomics, deterministic results.
// * Backward: warps compute the per-row sums of the two LayerNorm backward terms (and the dmix dot
//   products of the shared layout); then threads that own channels walk the tile's rows, write dx
//   and accumulate per-tile partial weight/bias gradients, which at::sum adds afterwards. The rows
//   the second phase rereads were just read by the same block, so they come from cache.
// * The per-channel dmix (Np, N, d) is a sum over the batch of an outer product per image; per-image
//   partials would be B times the size of mix, so a separate kernel loops over the batch instead.
// Loads and stores of x-sized tensors move 16 bytes per thread when d and the pointers allow it.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "../common.h"
#include "common.cuh"

namespace vapt {
namespace {

constexpr int kThreads = 256;  // threads per block of the two main kernels
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kMaxFwdTileRows = 32;
constexpr int64_t kFwdRowBufferBytes = 48 * 1024;  // the default dynamic shared-memory limit
constexpr int kBwdTileRows = 32;
constexpr int kPromptBlock = 4;  // prompts accumulated together per pass over a tile's rows
constexpr int64_t kMaxGridY = 65535;

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

// out[v] = p[c + v] as acc_t, or `fill` when the parameter is None (p == nullptr).
template <int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_param(const scalar_t* p, int64_t c, acc_t fill, acc_t (&out)[VEC]) {
  if (p == nullptr) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) out[v] = fill;
    return;
  }
  const Pack<scalar_t, VEC> pack = load_pack<VEC>(p + c);
#pragma unroll
  for (int v = 0; v < VEC; ++v) out[v] = static_cast<acc_t>(pack.v[v]);
}

__host__ __device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// mix[j, n(, c)] lives at mix[j * sj + n * sn + c * sc]: (Np, N) is (N, 1, 0), (Np, N, d) is
// (N * d, d, 1), so one code path serves both layouts.
struct MixStrides {
  int64_t sj, sn, sc;
};

// out[v] = sum_j mix[j, n(, c + v)] * dg_b[j, c + v]: the gradient reaching LN_g(x) at patch n.
// dg_b: (Np, d), the prompt gradient of one image.
template <int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void prompt_grad(const scalar_t* dg_b, const acc_t* mix, MixStrides ms, int64_t n,
                                            int64_t Np, int64_t d, int64_t c, acc_t (&out)[VEC]) {
#pragma unroll
  for (int v = 0; v < VEC; ++v) out[v] = acc_t(0);
  for (int64_t j = 0; j < Np; ++j) {
    const Pack<scalar_t, VEC> dgp = load_pack<VEC>(dg_b + j * d + c);
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      out[v] += mix[j * ms.sj + n * ms.sn + (c + v) * ms.sc] * static_cast<acc_t>(dgp.v[v]);
    }
  }
}

// Grid (tiles, B), kThreads threads; dynamic shared memory tile_rows * d * sizeof(acc_t).
// Phase 1: warp w normalises rows w, w + kWarps, ... of the tile. Phase 2: thread k owns channels
// k, k + kThreads, ... and reduces the tile's patch rows into g_part for every prompt.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads) norm_and_project_fwd_kernel(
    const scalar_t* __restrict__ x,   // (B, T, d)
    const scalar_t* __restrict__ w1,  // (d,) or nullptr
    const scalar_t* __restrict__ b1,  // (d,) or nullptr
    const scalar_t* __restrict__ wg,  // (d,) or nullptr
    const scalar_t* __restrict__ bg,  // (d,) or nullptr
    const acc_t* __restrict__ mix,    // (Np, N) or (Np, N, d), addressed through ms
    MixStrides ms,
    scalar_t* __restrict__ h,        // (B, T, d)
    acc_t* __restrict__ mean,        // (B, T)
    acc_t* __restrict__ rstd1,       // (B, T)
    acc_t* __restrict__ rstd_g,      // (B, T)
    acc_t* __restrict__ g_part,      // (B, tiles, Np, d): this block writes [b, tile]
    int64_t T, int64_t d, int64_t P, int64_t Np, int tile_rows, acc_t eps1, acc_t eps_g) {
  // xs: (tile_rows, d). Row r holds x[b, t0 + r] after pass 1 and LN_g of it after pass 3.
  extern __shared__ __align__(32) unsigned char fwd_smem[];
  acc_t* xs = reinterpret_cast<acc_t*>(fwd_smem);

  const int64_t b = blockIdx.y;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * tile_rows;
  const int rows = static_cast<int>(imin(tile_rows, T - t0));
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const acc_t inv_d = acc_t(1) / static_cast<acc_t>(d);

  for (int r = warp; r < rows; r += kWarps) {
    const int64_t row = b * T + t0 + r;
    const scalar_t* x_row = x + row * d;
    acc_t* xs_row = xs + static_cast<int64_t>(r) * d;
    // Lane l handles the packs starting at l * VEC, (l + 32) * VEC, ...; it alone reads back what
    // it wrote into xs_row, so the three passes need no synchronisation. Shared memory is accessed
    // in packs too (VEC * sizeof(acc_t) bytes; d % VEC == 0 keeps every row's packs aligned).
    acc_t sum = 0;
    for (int64_t c = lane * VEC; c < d; c += kWarpSize * VEC) {
      const Pack<scalar_t, VEC> xp = load_pack<VEC>(x_row + c);
      Pack<acc_t, VEC> xa;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        xa.v[v] = static_cast<acc_t>(xp.v[v]);
        sum += xa.v[v];
      }
      store_pack<VEC>(xs_row + c, xa);
    }
    const acc_t mu = warp_sum(sum) * inv_d;
    // Biased variance from centred values (two passes: no cancellation for rows far from zero).
    acc_t sq = 0;
    for (int64_t c = lane * VEC; c < d; c += kWarpSize * VEC) {
      const Pack<acc_t, VEC> xa = load_pack<VEC>(xs_row + c);
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const acc_t xc = xa.v[v] - mu;
        sq += xc * xc;
      }
    }
    const acc_t var = warp_sum(sq) * inv_d;
    const acc_t rs1 = rsqrtf(var + eps1);
    const acc_t rsg = rsqrtf(var + eps_g);
    for (int64_t c = lane * VEC; c < d; c += kWarpSize * VEC) {
      acc_t w1v[VEC], b1v[VEC], wgv[VEC], bgv[VEC];
      load_param<VEC>(w1, c, acc_t(1), w1v);
      load_param<VEC>(b1, c, acc_t(0), b1v);
      load_param<VEC>(wg, c, acc_t(1), wgv);
      load_param<VEC>(bg, c, acc_t(0), bgv);
      Pack<acc_t, VEC> xa = load_pack<VEC>(xs_row + c);
      Pack<scalar_t, VEC> hp;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const acc_t xc = xa.v[v] - mu;
        hp.v[v] = static_cast<scalar_t>(xc * rs1 * w1v[v] + b1v[v]);
        xa.v[v] = xc * rsg * wgv[v] + bgv[v];
      }
      store_pack<VEC>(h + row * d + c, hp);
      store_pack<VEC>(xs_row + c, xa);
    }
    if (lane == 0) {
      mean[row] = mu;
      rstd1[row] = rs1;
      rstd_g[row] = rsg;
    }
  }
  __syncthreads();

  // g_part[b, tile, j, c] = sum over the tile's patch rows r (t = t0 + r >= P, patch n = t - P)
  // of mix[j, n(, c)] * xs[r, c]. Rows r < r_lo are prefix tokens; a tile of prefix rows only
  // writes zeros.
  const int r_lo = static_cast<int>(imax(0, imin(rows, P - t0)));
  acc_t* g_tile = g_part + (b * gridDim.x + blockIdx.x) * Np * d;
  for (int64_t c = threadIdx.x; c < d; c += kThreads) {
    for (int64_t j0 = 0; j0 < Np; j0 += kPromptBlock) {
      acc_t acc[kPromptBlock];
#pragma unroll
      for (int jj = 0; jj < kPromptBlock; ++jj) acc[jj] = acc_t(0);
      for (int r = r_lo; r < rows; ++r) {
        const acc_t xv = xs[static_cast<int64_t>(r) * d + c];
        const int64_t n = t0 + r - P;
#pragma unroll
        for (int jj = 0; jj < kPromptBlock; ++jj) {
          // Prompts past Np (last block) reread prompt Np - 1; their sums are not stored.
          const int64_t j = imin(j0 + jj, Np - 1);
          acc[jj] += mix[j * ms.sj + n * ms.sn + c * ms.sc] * xv;
        }
      }
#pragma unroll
      for (int jj = 0; jj < kPromptBlock; ++jj) {
        if (j0 + jj < Np) g_tile[(j0 + jj) * d + c] = acc[jj];
      }
    }
  }
}

// Grid (tiles, B), kThreads threads, tiles of kBwdTileRows rows.
// Phase 1 (warp per row): coef[k][r] = mean over channels of dy1, dy1 * xhat1, dyg, dyg * xhatg,
// with dy1 = dh * w1, dyg = dxg * wg; for the shared mix layout also dmix_part[b, j, n] =
// sum_c dg[b, j, c] * xg[c] for the row's patch n. Phase 2 (thread per pack of VEC channels):
// dx = rstd1 (dy1 - coef0 - xhat1 coef1) + rstd_g (dyg - coef2 - xhatg coef3) for every row, and
// partial sums of dh * xhat1, dh, dxg * xhatg, dxg into col_part[b, slot, 0..3, :].
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads) norm_and_project_bwd_kernel(
    const scalar_t* __restrict__ dh,  // (B, T, d)
    const scalar_t* __restrict__ dg,  // (B, Np, d)
    const scalar_t* __restrict__ x,   // (B, T, d)
    const scalar_t* __restrict__ w1,  // (d,) or nullptr
    const scalar_t* __restrict__ wg,  // (d,) or nullptr
    const scalar_t* __restrict__ bg,  // (d,) or nullptr
    const acc_t* __restrict__ mix,    // (Np, N) or (Np, N, d), addressed through ms
    MixStrides ms,
    const acc_t* __restrict__ mean,    // (B, T)
    const acc_t* __restrict__ rstd1,   // (B, T)
    const acc_t* __restrict__ rstd_g,  // (B, T)
    scalar_t* __restrict__ dx,         // (B, T, d)
    acc_t* __restrict__ col_part,      // (B, tiles * groups, 4, d): this block writes [b, tile * groups + gi]
    acc_t* __restrict__ dmix_part,     // (B, Np, N), written when shared_mix
    bool shared_mix, int64_t T, int64_t d, int64_t P, int64_t Np, int groups) {
  __shared__ acc_t coef[4][kBwdTileRows];

  const int64_t b = blockIdx.y;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kBwdTileRows;
  const int rows = static_cast<int>(imin(kBwdTileRows, T - t0));
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const acc_t inv_d = acc_t(1) / static_cast<acc_t>(d);
  const int64_t N = T - P;
  const scalar_t* dg_b = dg + b * Np * d;

  for (int r = warp; r < rows; r += kWarps) {
    const int64_t t = t0 + r;
    const int64_t row = b * T + t;
    const bool patch = t >= P;  // prefix rows get no gradient from g: dxg = 0
    const int64_t n = t - P;
    const acc_t mu = mean[row];
    const acc_t rs1 = rstd1[row];
    const acc_t rsg = rstd_g[row];
    acc_t s[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    for (int64_t c = lane * VEC; c < d; c += kWarpSize * VEC) {
      const Pack<scalar_t, VEC> xp = load_pack<VEC>(x + row * d + c);
      const Pack<scalar_t, VEC> dhp = load_pack<VEC>(dh + row * d + c);
      acc_t w1v[VEC], wgv[VEC], dxg[VEC];
      load_param<VEC>(w1, c, acc_t(1), w1v);
      load_param<VEC>(wg, c, acc_t(1), wgv);
      if (patch) {
        prompt_grad<VEC>(dg_b, mix, ms, n, Np, d, c, dxg);
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) dxg[v] = acc_t(0);
      }
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const acc_t xc = static_cast<acc_t>(xp.v[v]) - mu;
        const acc_t dy1 = static_cast<acc_t>(dhp.v[v]) * w1v[v];
        const acc_t dyg = dxg[v] * wgv[v];
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

    // dmix_part[b, j, n] = sum_c dg[b, j, c] * xg[c], xg = LN_g(x) of this row (with affine).
    if (shared_mix && patch) {
      for (int64_t j0 = 0; j0 < Np; j0 += kPromptBlock) {
        acc_t dot[kPromptBlock];
#pragma unroll
        for (int jj = 0; jj < kPromptBlock; ++jj) dot[jj] = acc_t(0);
        for (int64_t c = lane * VEC; c < d; c += kWarpSize * VEC) {
          const Pack<scalar_t, VEC> xp = load_pack<VEC>(x + row * d + c);
          acc_t wgv[VEC], bgv[VEC], xg[VEC];
          load_param<VEC>(wg, c, acc_t(1), wgv);
          load_param<VEC>(bg, c, acc_t(0), bgv);
#pragma unroll
          for (int v = 0; v < VEC; ++v) xg[v] = (static_cast<acc_t>(xp.v[v]) - mu) * rsg * wgv[v] + bgv[v];
#pragma unroll
          for (int jj = 0; jj < kPromptBlock; ++jj) {
            const int64_t j = imin(j0 + jj, Np - 1);  // past Np: reread Np - 1, not stored
            const Pack<scalar_t, VEC> dgp = load_pack<VEC>(dg_b + j * d + c);
#pragma unroll
            for (int v = 0; v < VEC; ++v) dot[jj] += static_cast<acc_t>(dgp.v[v]) * xg[v];
          }
        }
#pragma unroll
        for (int jj = 0; jj < kPromptBlock; ++jj) dot[jj] = warp_sum(dot[jj]);
        if (lane == 0) {
#pragma unroll
          for (int jj = 0; jj < kPromptBlock; ++jj) {
            if (j0 + jj < Np) dmix_part[(b * Np + j0 + jj) * N + n] = dot[jj];
          }
        }
      }
    }
  }
  __syncthreads();

  // Phase 2: thread k owns the pack of channels q0 = k % pack_lanes (and q0 + pack_lanes, ... when
  // d has more packs than the block has threads) for the rows gi, gi + groups, ... of the tile,
  // gi = k / pack_lanes: narrow rows are split over `groups` row groups so that all threads work.
  // Each (tile, group) has its own slot of col_part.
  const int64_t packs = d / VEC;
  const int pack_lanes = static_cast<int>(imin(packs, kThreads));
  const int gi = static_cast<int>(threadIdx.x) / pack_lanes;
  if (gi >= groups) return;
  acc_t* col_slot = col_part + ((b * gridDim.x + blockIdx.x) * groups + gi) * 4 * d;
  for (int64_t q = static_cast<int>(threadIdx.x) % pack_lanes; q < packs; q += pack_lanes) {
    const int64_t c = q * VEC;
    acc_t w1v[VEC], wgv[VEC];
    load_param<VEC>(w1, c, acc_t(1), w1v);
    load_param<VEC>(wg, c, acc_t(1), wgv);
    Pack<acc_t, VEC> dw1, db1, dwg, dbg;
#pragma unroll
    for (int v = 0; v < VEC; ++v) dw1.v[v] = db1.v[v] = dwg.v[v] = dbg.v[v] = acc_t(0);
    for (int r = gi; r < rows; r += groups) {
      const int64_t t = t0 + r;
      const int64_t row = b * T + t;
      const acc_t mu = mean[row];
      const acc_t rs1 = rstd1[row];
      const acc_t rsg = rstd_g[row];
      const Pack<scalar_t, VEC> xp = load_pack<VEC>(x + row * d + c);
      const Pack<scalar_t, VEC> dhp = load_pack<VEC>(dh + row * d + c);
      acc_t dxg[VEC];
      if (t >= P) {
        prompt_grad<VEC>(dg_b, mix, ms, t - P, Np, d, c, dxg);
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) dxg[v] = acc_t(0);
      }
      Pack<scalar_t, VEC> dxp;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const acc_t xc = static_cast<acc_t>(xp.v[v]) - mu;
        const acc_t xh1 = xc * rs1;
        const acc_t xhg = xc * rsg;
        const acc_t dhv = static_cast<acc_t>(dhp.v[v]);
        const acc_t dy1 = dhv * w1v[v];
        const acc_t dyg = dxg[v] * wgv[v];
        dxp.v[v] = static_cast<scalar_t>(rs1 * (dy1 - coef[0][r] - xh1 * coef[1][r]) +
                                         rsg * (dyg - coef[2][r] - xhg * coef[3][r]));
        dw1.v[v] += dhv * xh1;
        db1.v[v] += dhv;
        dwg.v[v] += dxg[v] * xhg;
        dbg.v[v] += dxg[v];
      }
      store_pack<VEC>(dx + row * d + c, dxp);
    }
    store_pack<VEC>(col_slot + 0 * d + c, dw1);
    store_pack<VEC>(col_slot + 1 * d + c, db1);
    store_pack<VEC>(col_slot + 2 * d + c, dwg);
    store_pack<VEC>(col_slot + 3 * d + c, dbg);
  }
}

// Per-channel dmix[j, n, c] = sum_b dg[b, j, c] * xg[b, P + n, c]. Grid (N, channel blocks);
// each thread owns one pack of VEC channels of one patch n and loops over the batch, kPromptBlock
// prompts at a time. No partials: the batch sum stays in registers.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads) dmix_per_channel_kernel(
    const scalar_t* __restrict__ dg,  // (B, Np, d)
    const scalar_t* __restrict__ x,   // (B, T, d)
    const scalar_t* __restrict__ wg,  // (d,) or nullptr
    const scalar_t* __restrict__ bg,  // (d,) or nullptr
    const acc_t* __restrict__ mean,    // (B, T)
    const acc_t* __restrict__ rstd_g,  // (B, T)
    acc_t* __restrict__ dmix,          // (Np, N, d)
    int64_t B, int64_t T, int64_t d, int64_t P, int64_t Np) {
  const int64_t n = blockIdx.x;
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  if (c >= d) return;
  const int64_t N = T - P;
  acc_t wgv[VEC], bgv[VEC];
  load_param<VEC>(wg, c, acc_t(1), wgv);
  load_param<VEC>(bg, c, acc_t(0), bgv);
  for (int64_t j0 = 0; j0 < Np; j0 += kPromptBlock) {
    Pack<acc_t, VEC> acc[kPromptBlock];
#pragma unroll
    for (int jj = 0; jj < kPromptBlock; ++jj) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[jj].v[v] = acc_t(0);
    }
    for (int64_t b = 0; b < B; ++b) {
      const int64_t row = b * T + P + n;
      const acc_t mu = mean[row];
      const acc_t rsg = rstd_g[row];
      const Pack<scalar_t, VEC> xp = load_pack<VEC>(x + row * d + c);
      acc_t xg[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) xg[v] = (static_cast<acc_t>(xp.v[v]) - mu) * rsg * wgv[v] + bgv[v];
#pragma unroll
      for (int jj = 0; jj < kPromptBlock; ++jj) {
        const int64_t j = imin(j0 + jj, Np - 1);  // past Np: reread Np - 1, not stored
        const Pack<scalar_t, VEC> dgp = load_pack<VEC>(dg + (b * Np + j) * d + c);
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[jj].v[v] += static_cast<acc_t>(dgp.v[v]) * xg[v];
      }
    }
#pragma unroll
    for (int jj = 0; jj < kPromptBlock; ++jj) {
      if (j0 + jj < Np) store_pack<VEC>(dmix + ((j0 + jj) * N + n) * d + c, acc[jj]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: checks, allocation, launches.
// ---------------------------------------------------------------------------------------------

template <typename scalar_t>
const scalar_t* optional_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<scalar_t>() : nullptr;
}

// The MixStrides of a contiguous mix.
MixStrides mix_strides(const at::Tensor& mix) {
  const int64_t N = mix.size(1);
  return mix.dim() == 2 ? MixStrides{N, 1, 0} : MixStrides{N * mix.size(2), mix.size(2), 1};
}

// The kernels' own limits: the batch is grid y, and a tile's rows fit the shared-memory row buffer.
void check_tiling(const at::Tensor& x, const char* op) {
  const int64_t d = x.size(2), max_d = kFwdRowBufferBytes / static_cast<int64_t>(sizeof(float));
  TORCH_CHECK(d >= 1 && d <= max_d, op, ": the kernels' ", kFwdRowBufferBytes, "-byte row buffer holds 1 to ",
              max_d, " channels, got d = ", d);
  TORCH_CHECK(x.size(0) <= kMaxGridY, op, ": batch size ", x.size(0), " exceeds the kernel's limit of ", kMaxGridY);
}

template <typename scalar_t, int VEC>
void launch_fwd(const at::Tensor& x, const scalar_t* w1, const scalar_t* b1, const scalar_t* wg,
                const scalar_t* bg, const at::Tensor& mix, MixStrides ms, at::Tensor& h, at::Tensor& mean,
                at::Tensor& rstd1, at::Tensor& rstd_g, at::Tensor& g_part, int tile_rows, double eps1,
                double eps_g, int64_t num_prefix) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), T = x.size(1), d = x.size(2), Np = mix.size(0);
  const dim3 grid(static_cast<unsigned int>(g_part.size(1)), static_cast<unsigned int>(B));
  const size_t smem = static_cast<size_t>(tile_rows) * d * sizeof(acc_t);
  norm_and_project_fwd_kernel<scalar_t, acc_t, VEC><<<grid, kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
      x.data_ptr<scalar_t>(), w1, b1, wg, bg, mix.data_ptr<acc_t>(), ms, h.data_ptr<scalar_t>(),
      mean.data_ptr<acc_t>(), rstd1.data_ptr<acc_t>(), rstd_g.data_ptr<acc_t>(), g_part.data_ptr<acc_t>(), T, d,
      num_prefix, Np, tile_rows, static_cast<acc_t>(eps1), static_cast<acc_t>(eps_g));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_and_project_fwd_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& norm1_weight, const std::optional<at::Tensor>& norm1_bias,
    double eps1, const std::optional<at::Tensor>& gen_weight, const std::optional<at::Tensor>& gen_bias,
    double eps_g, const at::Tensor& mix, int64_t num_prefix) {
  constexpr const char* op = "vapt::norm_and_project_fwd (CUDA)";
  check_norm_and_project_inputs(op, at::kCUDA, x, mix, num_prefix,
                                {{"norm1_weight", &norm1_weight}, {"norm1_bias", &norm1_bias},
                                 {"gen_weight", &gen_weight}, {"gen_bias", &gen_bias}});
  check_tiling(x, op);
  const MixStrides ms = mix_strides(mix);

  const int64_t B = x.size(0), T = x.size(1), d = x.size(2), Np = mix.size(0);
  const at::ScalarType stats = stats_dtype(x);
  const int64_t row_bytes = d * static_cast<int64_t>(c10::elementSize(stats));

  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor h = at::empty_like(x);
  at::Tensor mean = at::empty({B, T}, x.options().dtype(stats));
  at::Tensor rstd1 = at::empty({B, T}, x.options().dtype(stats));
  at::Tensor rstd_g = at::empty({B, T}, x.options().dtype(stats));
  if (B == 0 || T == 0) {
    return {h, at::zeros({B, Np, d}, x.options()), mean, rstd1, rstd_g};
  }

  // As many rows per tile as the 48 KiB row buffer holds (at most kMaxFwdTileRows, at most T).
  const int tile_rows = static_cast<int>(imin(imin(kMaxFwdTileRows, kFwdRowBufferBytes / row_bytes), T));
  const int64_t tiles = (T + tile_rows - 1) / tile_rows;
  at::Tensor g_part = at::empty({B, tiles, Np, d}, x.options().dtype(stats));

  VAPT_DISPATCH_CUDA_TYPES(x.scalar_type(), "norm_and_project_fwd_cuda", [&] {
    const scalar_t* w1 = optional_ptr<scalar_t>(norm1_weight);
    const scalar_t* b1 = optional_ptr<scalar_t>(norm1_bias);
    const scalar_t* wg = optional_ptr<scalar_t>(gen_weight);
    const scalar_t* bg = optional_ptr<scalar_t>(gen_bias);
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec = d % kVec == 0 && aligned16(x.data_ptr()) && aligned16(h.data_ptr()) && aligned16(w1) &&
                     aligned16(b1) && aligned16(wg) && aligned16(bg);
    if (vec) {
      launch_fwd<scalar_t, kVec>(x, w1, b1, wg, bg, mix, ms, h, mean, rstd1, rstd_g, g_part, tile_rows, eps1,
                                 eps_g, num_prefix);
    } else {
      launch_fwd<scalar_t, 1>(x, w1, b1, wg, bg, mix, ms, h, mean, rstd1, rstd_g, g_part, tile_rows, eps1,
                              eps_g, num_prefix);
    }
  });
  at::Tensor g = at::sum(g_part, {1}).to(x.scalar_type());
  return {h, g, mean, rstd1, rstd_g};
}

// Launches the backward kernels; returns col_part (B, tiles * groups, 4, d), whose slot count
// depends on the pack width VEC. dmix_out: (B, Np, N) partials (shared mix) or dmix (per channel).
template <typename scalar_t, int VEC>
at::Tensor launch_bwd(const at::Tensor& dh, const at::Tensor& dg, const at::Tensor& x, const scalar_t* w1,
                      const scalar_t* wg, const scalar_t* bg, const at::Tensor& mix, MixStrides ms,
                      const at::Tensor& mean, const at::Tensor& rstd1, const at::Tensor& rstd_g, at::Tensor& dx,
                      at::Tensor& dmix_out, int64_t num_prefix) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), T = x.size(1), d = x.size(2), Np = mix.size(0), N = T - num_prefix;
  const bool shared_mix = mix.dim() == 2;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t packs = d / VEC;
  // Row groups of phase 2 (see the kernel): as many as fit when d has fewer packs than kThreads.
  const int groups = static_cast<int>(kThreads / imin(packs, kThreads));
  const int64_t tiles = (T + kBwdTileRows - 1) / kBwdTileRows;
  at::Tensor col_part = at::empty({B, tiles * groups, 4, d}, x.options().dtype(at::toOpMathType(x.scalar_type())));
  const dim3 grid(static_cast<unsigned int>(tiles), static_cast<unsigned int>(B));
  norm_and_project_bwd_kernel<scalar_t, acc_t, VEC><<<grid, kThreads, 0, stream>>>(
      dh.data_ptr<scalar_t>(), dg.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), w1, wg, bg, mix.data_ptr<acc_t>(), ms,
      mean.data_ptr<acc_t>(), rstd1.data_ptr<acc_t>(), rstd_g.data_ptr<acc_t>(), dx.data_ptr<scalar_t>(),
      col_part.data_ptr<acc_t>(), shared_mix ? dmix_out.data_ptr<acc_t>() : nullptr, shared_mix, T, d, num_prefix,
      Np, groups);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!shared_mix && Np > 0 && N > 0) {
    // One thread per pack of VEC channels of one patch; blocks of at most kThreads threads cover d.
    const int threads = static_cast<int>(imin(kThreads, (packs + kWarpSize - 1) / kWarpSize * kWarpSize));
    const dim3 dmix_grid(static_cast<unsigned int>(N), static_cast<unsigned int>((packs + threads - 1) / threads));
    dmix_per_channel_kernel<scalar_t, acc_t, VEC><<<dmix_grid, threads, 0, stream>>>(
        dg.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), wg, bg, mean.data_ptr<acc_t>(), rstd_g.data_ptr<acc_t>(),
        dmix_out.data_ptr<acc_t>(), B, T, d, num_prefix, Np);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return col_part;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_and_project_bwd_cuda(
    const at::Tensor& dh, const at::Tensor& dg, const at::Tensor& x, const std::optional<at::Tensor>& norm1_weight,
    const std::optional<at::Tensor>& gen_weight, const std::optional<at::Tensor>& gen_bias, const at::Tensor& mix,
    const at::Tensor& mean, const at::Tensor& rstd1, const at::Tensor& rstd_g, int64_t num_prefix) {
  constexpr const char* op = "vapt::norm_and_project_bwd (CUDA)";
  check_norm_and_project_inputs(op, at::kCUDA, x, mix, num_prefix,
                                {{"norm1_weight", &norm1_weight}, {"gen_weight", &gen_weight}, {"gen_bias", &gen_bias}});
  check_norm_and_project_grads(op, x, mix, dh, dg, mean, rstd1, rstd_g);
  check_tiling(x, op);
  const MixStrides ms = mix_strides(mix);
  const int64_t B = x.size(0), T = x.size(1), d = x.size(2), Np = mix.size(0);
  const at::ScalarType stats = stats_dtype(x);

  c10::cuda::CUDAGuard guard(x.device());
  const at::TensorOptions stats_opts = x.options().dtype(stats);
  at::Tensor dx = at::empty_like(x);
  if (B == 0 || T == 0) {
    return {dx, at::zeros({d}, stats_opts), at::zeros({d}, stats_opts), at::zeros({d}, stats_opts),
            at::zeros({d}, stats_opts), at::zeros(mix.sizes(), stats_opts)};
  }

  const bool shared_mix = mix.dim() == 2;
  // Shared layout: per-image partials (B, Np, N), summed below. Per channel: dmix itself, every
  // element written by dmix_per_channel_kernel.
  at::Tensor dmix_out = shared_mix ? at::empty({B, Np, mix.size(1)}, stats_opts) : at::empty(mix.sizes(), stats_opts);

  at::Tensor col_part;
  VAPT_DISPATCH_CUDA_TYPES(x.scalar_type(), "norm_and_project_bwd_cuda", [&] {
    const scalar_t* w1 = optional_ptr<scalar_t>(norm1_weight);
    const scalar_t* wg = optional_ptr<scalar_t>(gen_weight);
    const scalar_t* bg = optional_ptr<scalar_t>(gen_bias);
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec = d % kVec == 0 && aligned16(dh.data_ptr()) && aligned16(dg.data_ptr()) &&
                     aligned16(x.data_ptr()) && aligned16(dx.data_ptr()) && aligned16(w1) && aligned16(wg) &&
                     aligned16(bg);
    if (vec) {
      col_part = launch_bwd<scalar_t, kVec>(dh, dg, x, w1, wg, bg, mix, ms, mean, rstd1, rstd_g, dx, dmix_out,
                                            num_prefix);
    } else {
      col_part = launch_bwd<scalar_t, 1>(dh, dg, x, w1, wg, bg, mix, ms, mean, rstd1, rstd_g, dx, dmix_out,
                                         num_prefix);
    }
  });
  // One fresh tensor per gradient (outputs must not alias one buffer): sums over (B, slots).
  at::Tensor dnorm1_weight = at::sum(col_part.select(2, 0), {0, 1});
  at::Tensor dnorm1_bias = at::sum(col_part.select(2, 1), {0, 1});
  at::Tensor dgen_weight = at::sum(col_part.select(2, 2), {0, 1});
  at::Tensor dgen_bias = at::sum(col_part.select(2, 3), {0, 1});
  at::Tensor dmix = shared_mix ? at::sum(dmix_out, {0}) : dmix_out;
  return {dx, dnorm1_weight, dnorm1_bias, dgen_weight, dgen_bias, dmix};
}

}  // namespace
}  // namespace vapt

TORCH_LIBRARY_IMPL(vapt, CUDA, m) {
  m.impl("norm_and_project_fwd", &vapt::norm_and_project_fwd_cuda);
  m.impl("norm_and_project_bwd", &vapt::norm_and_project_bwd_cuda);
}
