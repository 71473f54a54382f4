// Launch geometry of the norm_and_project CUDA kernels (norm_and_project_device.cuh): tile sizes,
// block sizes, grids and dynamic shared memory as functions of the shapes. Plain C++ without CUDA
// headers, so that the launcher (norm_and_project_kernel.cu) and the static gate
// (tests/test_gpu_static_cuda.py, through a host program built with g++) read the same numbers.
//
// Shapes: B images of T = P + N rows of d channels, Np prompts.

#pragma once

#include <cstdint>

namespace vapt {
namespace norm_and_project {

constexpr int kWarpThreads = 32;
constexpr int64_t kMaxGridX = 2147483647;  // CUDA's grid limits
constexpr int64_t kMaxGridYZ = 65535;

inline constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One kernel launch: grid, threads per block and dynamic shared-memory bytes. No kernel of this op
// uses dynamic shared memory (every buffer is a static array of a fixed tile), so the launcher never
// opts in to more than the default 48 KiB.
struct Geometry {
  int64_t grid_x, grid_y, grid_z;
  int threads;
  int64_t dynamic_smem;
};

// ---------------------------------------------------------------------------------------------
// Row kernels: the LayerNorms (forward) and their backward, over the B * T rows of x.
// ---------------------------------------------------------------------------------------------

constexpr int kRowThreads = 256;
constexpr int kRowWarps = kRowThreads / kWarpThreads;
constexpr int kBwdTileRows = 32;  // rows of one backward block

// Forward: one warp per row.
inline constexpr Geometry rows_fwd_geometry(int64_t B, int64_t T) {
  return {ceil_div(B * T, kRowWarps), 1, 1, kRowThreads, 0};
}

// Backward phase 2 gives each thread a pack of `vec` channels; when d has fewer packs than the
// block has threads, the rows of a tile are split over this many row groups so that all work.
inline constexpr int bwd_row_groups(int64_t d, int vec) {
  return static_cast<int>(kRowThreads / (d / vec < kRowThreads ? d / vec : kRowThreads));
}

// Backward: block (b, k) owns rows k * kBwdTileRows ... of image b.
inline constexpr Geometry rows_bwd_geometry(int64_t B, int64_t T) {
  return {B, ceil_div(T, kBwdTileRows), 1, kRowThreads, 0};
}

// Slots of the backward's per-block column partials (weight and bias gradients): one per
// (block, row group).
inline constexpr int64_t bwd_column_slots(int64_t B, int64_t T, int64_t d, int vec) {
  return B * rows_bwd_geometry(B, T).grid_y * bwd_row_groups(d, vec);
}

// ---------------------------------------------------------------------------------------------
// project_kernel: out[z, m, c] = sum_k A[m, k(, c)] * Bop[z, k, c] (the prompt projection, the
// prompt gradient reaching LN_g(x), and the mix gradients).
// ---------------------------------------------------------------------------------------------

// A block computes a BZ x BM x BC tile of out; thread (tz, tm, tc) a TZ x TM x TC sub-tile, in
// registers; k is staged through shared memory BK steps at a time. The 32 lanes of a warp always
// differ in tc only, so that their shared-memory reads are broadcasts or consecutive words.
template <int BZ_, int BM_, int BC_, int TZ_, int TM_, int TC_, int BK_, bool A_PER_CHANNEL_>
struct ProjectTile {
  static constexpr int BZ = BZ_, BM = BM_, BC = BC_, TZ = TZ_, TM = TM_, TC = TC_, BK = BK_;
  static constexpr bool A_PER_CHANNEL = A_PER_CHANNEL_;  // A has a channel index (else shared by all)
  static constexpr int threads = (BZ / TZ) * (BM / TM) * (BC / TC);
  static_assert(BZ % TZ == 0 && BM % TM == 0 && BC % TC == 0, "thread tiles divide the block tile");
  static_assert(BC / TC == kWarpThreads, "a warp spans the channel axis of the block tile");
  // Static shared memory of the staged operands: A (BK, BM, BC or 1) and Bop (BK, BZ, BC) in float.
  static constexpr int64_t smem_bytes = 4 * BK * (BM * (A_PER_CHANNEL ? BC : 1) + BZ * BC);
};

// Shared mix (Np, N): A is one matrix for all channels, so a thread reuses each A value over TC
// channels and each operand value over TM rows: 16 multiply-adds per 4 + 4 shared-memory words.
using SharedMixTile = ProjectTile<1, 32, 128, 1, 4, 4, 16, false>;
// Per-channel mix (Np, N, d): nothing is shared across channels, so a thread holds one channel and
// reuses values over z instead: TZ x TM = 16 multiply-adds per 4 + 4 words.
using ChannelMixTile = ProjectTile<8, 16, 32, 4, 4, 1, 8, true>;
// Per-channel mix of many tasks, where A (mix[task[b]]) depends on the image z: one image a block
// (A is staged once per block), so a thread reuses values over TM rows only: 4 multiply-adds per
// 4 + 1 words.
using ChannelMixTaskTile = ProjectTile<1, 32, 32, 1, 4, 1, 8, true>;

// `segments` > 1: the per-task sums (KSegments), one copy of the (Z, M, C) grid per task along x.
template <typename Tile>
inline constexpr Geometry project_geometry(int64_t Z, int64_t M, int64_t C, int64_t segments = 1) {
  return {segments * ceil_div(Z, Tile::BZ), ceil_div(M, Tile::BM), ceil_div(C, Tile::BC), Tile::threads, 0};
}

// ---------------------------------------------------------------------------------------------
// task_sum_kernel (many tasks): (tasks, L) per-task sums of per-image partials, a thread per output.
// ---------------------------------------------------------------------------------------------

inline constexpr Geometry task_sum_geometry(int64_t tasks, int64_t L) {
  return {ceil_div(L, kRowThreads), tasks, 1, kRowThreads, 0};
}

// Whether CUDA can launch `g` (the launcher refuses shapes that break this).
inline constexpr bool launchable(const Geometry& g) {
  return g.grid_x <= kMaxGridX && g.grid_y <= kMaxGridYZ && g.grid_z <= kMaxGridYZ;
}

}  // namespace norm_and_project
}  // namespace vapt
