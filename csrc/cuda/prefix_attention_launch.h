// Launch geometry and dynamic shared memory of the prefix attention kernels
// (prefix_attention_device.cuh), as plain C++: no CUDA header, so the ATen launcher, the host
// emulation's driver and static checks all compute the same numbers.
//
// Tiles (elements; T tokens, Np prefix keys, D head dim, DP = padded_head_dim(D)):
// * forward and dq kernels: a block of 4 warps owns kBM = 64 query rows (16 per warp) and walks
//   the key tiles of kBN = 32 keys: first the prefix tiles, then the token tiles;
// * dk/dv kernel: a block owns one key tile of kKvBN = 64 keys (16 per warp) and walks the query
//   tiles of kKvBM = 32 queries;
// * fp32 kernels: one warp per query row (forward, dq) or per key row (dk/dv), 4 per block.
// Shared-memory rows are DP + 8 elements long: 16 bytes of padding shift consecutive rows by four
// banks, so the eight 16-byte rows an ldmatrix phase reads fall in distinct banks.

#pragma once

#include <cstdint>
#include <type_traits>

namespace vapt {
namespace attention {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kBM = 64;    // queries per block (forward, dq)
constexpr int kBN = 32;    // keys per tile (forward, dq)
constexpr int kKvBN = 64;  // keys per block (dk/dv)
constexpr int kKvBM = 32;  // queries per tile (dk/dv)
constexpr int kMaxHeadDim = 128;

constexpr int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The head dims the fp16/bf16 kernels are compiled for: D is zero-padded up to the next one.
constexpr int padded_head_dim(int64_t D) { return D <= 32 ? 32 : D <= 64 ? 64 : D <= 80 ? 80 : 128; }
constexpr int row_pitch(int DP) { return DP + 8; }

// Key tiles of `tile` keys: the prefix ones, then the token ones (a tile never mixes the two).
constexpr int64_t key_tiles(int64_t prompts, int64_t tokens, int tile) {
  return cdiv(prompts, tile) + cdiv(tokens, tile);
}

// Bytes of dynamic shared memory, for 16-bit inputs.
// forward: Q (kBM rows) + two K and two V buffers (kBN rows each).
constexpr int fwd_smem_bytes(int DP) { return 2 * row_pitch(DP) * (kBM + 4 * kBN); }
// dq: Q and dO (kBM rows each) + two K and two V buffers.
constexpr int dq_smem_bytes(int DP) { return 2 * row_pitch(DP) * (2 * kBM + 4 * kBN); }
// dk/dv: K and V (kKvBN rows each) + two Q and two dO buffers (kKvBM rows each), then two buffers
// of the kKvBM lse and delta values (fp32).
constexpr int dkdv_smem_bytes(int DP) { return 2 * row_pitch(DP) * (2 * kKvBN + 4 * kKvBM) + 2 * 2 * kKvBM * 4; }

struct Grid {
  int64_t x, y;  // x: B*H (b*h), y: tiles
  int threads;
  int smem_bytes;
};

// Every kernel's grid x is B*H; a grid's y is at most 65535.
inline Grid fwd_grid(int64_t bh, int64_t tokens, int64_t D) {
  return {bh, cdiv(tokens, kBM), kThreads, fwd_smem_bytes(padded_head_dim(D))};
}
inline Grid dq_grid(int64_t bh, int64_t tokens, int64_t D) {
  return {bh, cdiv(tokens, kBM), kThreads, dq_smem_bytes(padded_head_dim(D))};
}
inline Grid dkdv_grid(int64_t bh, int64_t prompts, int64_t tokens, int64_t D) {
  return {bh, key_tiles(prompts, tokens, kKvBN), kThreads, dkdv_smem_bytes(padded_head_dim(D))};
}
// fp32: one warp per row, no dynamic shared memory.
inline Grid fp32_rows_grid(int64_t bh, int64_t rows) { return {bh, cdiv(rows, kWarps), kThreads, 0}; }

// Calls f(std::integral_constant<int, DP>) for DP = padded_head_dim(D).
template <typename F>
void with_padded_head_dim(int64_t D, F&& f) {
  switch (padded_head_dim(D)) {
    case 32:
      f(std::integral_constant<int, 32>{});
      break;
    case 64:
      f(std::integral_constant<int, 64>{});
      break;
    case 80:
      f(std::integral_constant<int, 80>{});
      break;
    default:
      f(std::integral_constant<int, 128>{});
      break;
  }
}

}  // namespace attention
}  // namespace vapt
