// Device code of vapt::prefix_attention_fwd / _bwd (launcher: prefix_attention_kernel.cu; geometry:
// prefix_attention_launch.h). Also compiled by g++ under VAPT_CUDA_EMULATION
// (csrc/emulation/cuda_host.h), which is how CI runs it.
//
// Softmax attention of the token queries over the keys [k_prefix[b] ; k[b]] without building the
// concatenation or the (T, Np + T) score matrix. Shapes (elements, any strides, unit last stride):
//   q, k, v, dout      (B, H, T, D)
//   k_prefix, v_prefix (Bp, H, Np, D)   Bp == B, or 1 broadcast (batch stride 0)
//   out, dq, dk, dv    (B, H, T, D)
//   lse, delta         (B, H, T) fp32, contiguous: natural-log log-sum-exp; rowsum(dout * out)
//   dkp/dvp_part       (B, H, Np, D) fp32, contiguous: per-image prefix gradients (the launcher
//                      sums them over the batch when the prefix is broadcast)
//
// fp16/bf16, FlashAttention-2's structure (tiles in prefix_attention_launch.h):
// * Every warp owns 16 rows; the scores S, the probabilities P, dS and the accumulators O, dQ, dK,
//   dV never leave registers: a product's fp32 accumulators are, after rounding, the A operand of
//   the next product (mma.cuh). Shared memory holds only input tiles, read with ldmatrix.
// * Key/value (or query/dout) tiles are double-buffered with cp.async: tile j + 1 is fetched while
//   tile j is multiplied, and one __syncthreads per tile both publishes tile j and frees the buffer
//   the next fetch overwrites.
// * Keys are walked as prefix tiles first, then token tiles; a tile never mixes the two, so a
//   row's address is one base plus a stride. Rows past a tensor's end and columns past D are
//   zero-filled in shared memory and masked out of the softmax.
// * Online softmax in the log2 domain (scores pre-multiplied by scale * log2(e)); each lane holds
//   two rows (g, g + 8) of a warp's 16, whose max is reduced over the lane's quad by two shuffles.
//   A NaN score is never the max (fmaxf), and poisons its row's sum and output: a NaN query row
//   gives a NaN output row, the other rows are unaffected.
// * Backward without atomics, deterministic: the dq kernel (per query tile) computes delta and
//   dQ, walking the key tiles; the dk/dv kernel (per key tile, run after it) walks the query tiles
//   with the keys as the rows of S^T = K Q^T, so dK and dV accumulate in the registers of the warp
//   owning those keys. P and dS are recomputed in both (2 extra products, instead of an atomic
//   fp32 dQ accumulation whose summation order changes from run to run).
//
// fp32: a plain SIMT path, one warp per query row (forward, dq) or key row (dk/dv), the row in
// registers (D <= 128: 4 columns per lane), dot products reduced over the warp.

#pragma once

#include <cmath>
#include <cstdint>

#include "common.cuh"
#include "mma.cuh"
#include "prefix_attention_launch.h"

namespace vapt {
namespace attention {

constexpr float kLog2e = 1.4426950408889634f;  // exp(x) == exp2(x * log2(e))
constexpr float kLn2 = 0.6931471805599453f;    // log(x) == log2(x) * ln(2)

// A (B, H, rows, D) tensor: base pointer and element strides of its first three dims.
struct Tensor4 {
  void* ptr;
  int64_t sb, sh, st;
};

struct Params {
  Tensor4 q, k, v, kp, vp;  // kp/vp: sb == 0 when the prefix is broadcast
  Tensor4 out;              // forward
  Tensor4 dout, dq, dk, dv;  // backward
  float* lse;                // (B*H, T)
  float* delta;              // (B*H, T), written by the dq kernel, read by the dk/dv kernel
  float* dkp_part;           // (B*H, Np, D)
  float* dvp_part;           // (B*H, Np, D)
  int heads, tokens, prompts, D;
  float scale, scale_log2;  // scale_log2 = scale * log2(e), rounded once on the host
  bool vec;                 // 16-byte cp.async: D % 8 == 0 and every row start 16-byte aligned
};

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

// Row 0 of the (rows, D) slab of image b, head h (int64 offsets: B*H*T*D exceeds 2^31 easily).
template <typename T>
__device__ __forceinline__ T* slab(const Tensor4& t, int b, int h) {
  return static_cast<T*>(t.ptr) + b * t.sb + h * t.sh;
}

// `count` rows from `ptr`, `stride` elements apart.
template <typename T>
struct Rows {
  const T* ptr;
  int64_t stride;
  int count;
};

// Key tile j (of `tile` keys) of [prefix ; tokens] for image b, head h.
template <typename T>
__device__ __forceinline__ Rows<T> key_tile(const Tensor4& prefix, const Tensor4& tokens, const Params& p, int b,
                                            int h, int j, int tile) {
  const int prefix_tiles = static_cast<int>(cdiv(p.prompts, tile));
  if (j < prefix_tiles) {
    const int r0 = j * tile;
    return {slab<const T>(prefix, b, h) + r0 * prefix.st, prefix.st, imin(tile, p.prompts - r0)};
  }
  const int r0 = (j - prefix_tiles) * tile;
  return {slab<const T>(tokens, b, h) + r0 * tokens.st, tokens.st, imin(tile, p.tokens - r0)};
}

template <typename T>
__device__ __forceinline__ Rows<T> query_tile(const Tensor4& t, const Params& p, int b, int h, int r0, int tile) {
  return {slab<const T>(t, b, h) + r0 * t.st, t.st, imin(tile, p.tokens - r0)};
}

// ------------------------------------------------------------------------------------------------
// fp16/bf16: tiles and fragments
// ------------------------------------------------------------------------------------------------

// src rows [0, count) x columns [0, D) -> the ROWS x DP tile dst (pitch row_pitch(DP)), zeros
// elsewhere. With `vec` by cp.async (the caller commits and waits), else by plain loads and stores;
// either way the tile is complete for every thread after the caller's wait and __syncthreads.
template <typename T, int ROWS, int DP>
__device__ __forceinline__ void load_tile(T* dst, const Rows<T>& src, int D, bool vec) {
  constexpr int P = row_pitch(DP);
  static_assert(sizeof(T) == 2, "8 elements per 16-byte chunk");
  if (vec) {
    constexpr int kChunks = DP / 8;
    for (int i = threadIdx.x; i < ROWS * kChunks; i += kThreads) {
      const int r = i / kChunks, c = i % kChunks * 8;
      const bool valid = r < src.count && c < D;
      mma::cp_async_16(dst + r * P + c, valid ? src.ptr + r * src.stride + c : src.ptr, valid);
    }
  } else {
    for (int i = threadIdx.x; i < ROWS * DP; i += kThreads) {
      const int r = i / DP, c = i % DP;
      dst[r * P + c] = r < src.count && c < D ? src.ptr[r * src.stride + c] : mma::from_float<T>(0.0f);
    }
  }
}

// A fragment of the 16 x 16 block at (row0, col0) of a row-major tile: lane l gives row l % 16,
// columns (l / 16) * 8 (the four 8x8 matrices of ldmatrix are the four A registers).
template <int P, typename T>
__device__ __forceinline__ void a_frag(uint32_t (&a)[4], const T* tile, int row0, int col0) {
  const int lane = threadIdx.x % 32;
  mma::ldmatrix_x4<false>(a, tile + (row0 + lane % 16) * P + col0 + lane / 16 * 8);
}

// B fragments of two n-tiles where B(k, n) = tile[n][k] (tile rows are B's columns: K in Q K^T):
// n in [n0, n0 + 16), k in [k0, k0 + 16). Registers {0, 1}: n-tile n0, {2, 3}: n-tile n0 + 8.
template <int P, typename T>
__device__ __forceinline__ void b_frag_rows(uint32_t (&b)[4], const T* tile, int n0, int k0) {
  const int lane = threadIdx.x % 32;
  mma::ldmatrix_x4<false>(b, tile + (n0 + lane / 16 * 8 + lane % 8) * P + k0 + (lane / 8) % 2 * 8);
}

// B fragments of two n-tiles where B(k, n) = tile[k][n] (tile rows are B's rows: V in P V), read
// transposed by ldmatrix; same register order as b_frag_rows.
template <int P, typename T>
__device__ __forceinline__ void b_frag_cols(uint32_t (&b)[4], const T* tile, int k0, int n0) {
  const int lane = threadIdx.x % 32;
  mma::ldmatrix_x4<true>(b, tile + (k0 + lane % 16) * P + n0 + lane / 16 * 8);
}

// acc[2n], acc[2n + 1] += a * (the two n-tiles of b).
template <typename T>
__device__ __forceinline__ void mma_pair(float (&lo)[4], float (&hi)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[4]) {
  const uint32_t b_lo[2] = {b[0], b[1]}, b_hi[2] = {b[2], b[3]};
  mma::mma_16816<T>(lo, a, b_lo);
  mma::mma_16816<T>(hi, a, b_hi);
}

// The two products of a backward step, side by side: s = A1 B1^T and d = A2 B2^T for the warp's 16
// rows (row0..) of the shared tiles A1, A2 (row pitch P, KD * 16 padded columns) against the
// NT * 8 rows of B1, B2, each 16 x NT*8, accumulated in registers (both start at zero).
template <typename T, int P, int KD, int NT>
__device__ __forceinline__ void paired_products(float (&s)[NT][4], float (&d)[NT][4], const T* a1, const T* a2,
                                                const T* b1, const T* b2, int row0) {
#pragma unroll
  for (int kd = 0; kd < KD; ++kd) {
    uint32_t fa1[4], fa2[4];
    a_frag<P>(fa1, a1, row0, kd * 16);
    a_frag<P>(fa2, a2, row0, kd * 16);
#pragma unroll
    for (int n = 0; n < NT / 2; ++n) {
      uint32_t fb1[4], fb2[4];
      b_frag_rows<P>(fb1, b1, n * 16, kd * 16);
      b_frag_rows<P>(fb2, b2, n * 16, kd * 16);
      mma_pair<T>(s[2 * n], s[2 * n + 1], fa1, fb1);
      mma_pair<T>(d[2 * n], d[2 * n + 1], fa2, fb2);
    }
  }
}

// The A fragment (16 rows x 16 columns kk*16..) of the next product from the accumulators of
// n-tiles 2kk and 2kk + 1, rounded to T.
template <typename T>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
  a[0] = mma::pack2<T>(lo[0], lo[1]);
  a[1] = mma::pack2<T>(lo[2], lo[3]);
  a[2] = mma::pack2<T>(hi[0], hi[1]);
  a[3] = mma::pack2<T>(hi[2], hi[3]);
}

// Double buffering over the key tiles (forward, dq): start the copy of key and value tile j + 1,
// if there is one, into buffer (j + 1) % 2 of sK and sV (kBN x P each), and commit the copy group
// (empty after the last tile, so that the wait count stays the same).
template <typename T, int DP>
__device__ __forceinline__ void prefetch_key_tile(T* sK, T* sV, const Params& p, int b, int h, int j, int n_tiles) {
  constexpr int P = row_pitch(DP);
  if (j + 1 < n_tiles) {
    const int next = (j + 1) % 2;
    load_tile<T, kBN, DP>(sK + next * kBN * P, key_tile<T>(p.kp, p.k, p, b, h, j + 1, kBN), p.D, p.vec);
    load_tile<T, kBN, DP>(sV + next * kBN * P, key_tile<T>(p.vp, p.v, p, b, h, j + 1, kBN), p.D, p.vec);
  }
  mma::cp_async_commit();
}

// The second product of an attention step (O += P V, dQ += dS K, dV += P^T dO, dK += dS^T Q):
// acc (16 x NA * 8) += A B for the warp's 16 rows, A (16 x NS * 8) the accumulators `a` of the
// first product rounded to T, B the first NS * 8 rows of the shared tile `tile` (row pitch P),
// transposed by ldmatrix.
template <typename T, int P, int NS, int NA>
__device__ __forceinline__ void product_from_registers(float (&acc)[NA][4], const float (&a)[NS][4], const T* tile) {
#pragma unroll
  for (int kk = 0; kk < NS / 2; ++kk) {
    uint32_t fa[4];
    acc_to_a<T>(fa, a[2 * kk], a[2 * kk + 1]);
#pragma unroll
    for (int n = 0; n < NA / 2; ++n) {
      uint32_t fb[4];
      b_frag_cols<P>(fb, tile, kk * 16, n * 16);
      mma_pair<T>(acc[2 * n], acc[2 * n + 1], fa, fb);
    }
  }
}

// Sum (max) over the 4 lanes of a quad, which hold the columns of the same two rows.
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

// ------------------------------------------------------------------------------------------------
// fp16/bf16 forward
// ------------------------------------------------------------------------------------------------

// grid (B*H, cdiv(T, kBM)), kThreads threads, fwd_smem_bytes(DP) bytes. Warp w owns query rows
// q0 + 16w ...; its lane holds rows g = lane / 4 and g + 8 of them, columns 2(lane % 4) + {0, 1}
// of every 8-column n-tile.
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) prefix_attention_fwd_kernel(const Params p) {
  constexpr int P = row_pitch(DP), KD = DP / 16, ND = DP / 8, NK = kBN / 8;
  VAPT_EXTERN_SHARED(T, smem);
  T* sQ = smem;                // kBM x P
  T* sK = sQ + kBM * P;        // 2 buffers of kBN x P
  T* sV = sK + 2 * kBN * P;    // 2 buffers of kBN x P
  const int bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads, q0 = blockIdx.y * kBM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int n_tiles = static_cast<int>(key_tiles(p.prompts, p.tokens, kBN));

  load_tile<T, kBM, DP>(sQ, query_tile<T>(p.q, p, b, h, q0, kBM), p.D, p.vec);
  load_tile<T, kBN, DP>(sK, key_tile<T>(p.kp, p.k, p, b, h, 0, kBN), p.D, p.vec);
  load_tile<T, kBN, DP>(sV, key_tile<T>(p.vp, p.v, p, b, h, 0, kBN), p.D, p.vec);
  mma::cp_async_commit();

  uint32_t qf[KD][4];    // the warp's 16 x DP queries as A fragments, loaded once
  float o[ND][4] = {};   // unnormalised output, 16 x DP
  float m[2] = {-INFINITY, -INFINITY};  // running max of rows g, g + 8 (log2 domain)
  float l[2] = {0.0f, 0.0f};            // this lane's part of their running sums

  for (int j = 0; j < n_tiles; ++j) {
    mma::cp_async_wait<0>();
    __syncthreads();  // tile j is in buffer j % 2 for all; all are done with buffer (j + 1) % 2
    if (j == 0) {
#pragma unroll
      for (int kd = 0; kd < KD; ++kd) a_frag<P>(qf[kd], sQ, warp * 16, kd * 16);
    }
    prefetch_key_tile<T, DP>(sK, sV, p, b, h, j, n_tiles);
    const T* k_tile = sK + j % 2 * kBN * P;
    const T* v_tile = sV + j % 2 * kBN * P;
    const int nv = key_tile<T>(p.kp, p.k, p, b, h, j, kBN).count;  // valid keys, >= 1

    // S = Q K^T: 16 x kBN.
    float s[NK][4] = {};
#pragma unroll
    for (int kd = 0; kd < KD; ++kd) {
#pragma unroll
      for (int n = 0; n < NK / 2; ++n) {
        uint32_t kb[4];
        b_frag_rows<P>(kb, k_tile, n * 16, kd * 16);
        mma_pair<T>(s[2 * n], s[2 * n + 1], qf[kd], kb);
      }
    }

    // Online softmax: rescale the running sums and O by exp2(old max - new max).
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int n = 0; n < NK; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int col = n * 8 + 2 * t + i % 2;
        s[n][i] = col < nv ? s[n][i] * p.scale_log2 : -INFINITY;
        mx[i / 2] = fmaxf(mx[i / 2], s[n][i]);
      }
    }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = quad_max(mx[r]);
      alpha[r] = exp2f(m[r] - mx[r]);  // 0 on the first tile
      m[r] = mx[r];
      l[r] *= alpha[r];
    }
#pragma unroll
    for (int n = 0; n < NK; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        s[n][i] = exp2f(s[n][i] - m[i / 2]);
        l[i / 2] += s[n][i];
      }
    }
#pragma unroll
    for (int n = 0; n < ND; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) o[n][i] *= alpha[i / 2];
    }

    // O += P V: P (16 x kBN) from the S registers, V (kBN x DP).
    product_from_registers<T, P>(o, s, v_tile);
  }

  T* out = slab<T>(p.out, b, h);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] = quad_sum(l[r]);
    const int row = q0 + warp * 16 + g + 8 * r;
    if (row >= p.tokens) continue;
    const float inv_l = 1.0f / l[r];  // l >= 1: the max key contributes exp2(0)
#pragma unroll
    for (int n = 0; n < ND; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = n * 8 + 2 * t + e;
        if (c < p.D) out[row * p.out.st + c] = mma::from_float<T>(o[n][2 * r + e] * inv_l);
      }
    }
    if (t == 0) p.lse[static_cast<int64_t>(bh) * p.tokens + row] = (m[r] + log2f(l[r])) * kLn2;
  }
}

// ------------------------------------------------------------------------------------------------
// fp16/bf16 backward
// ------------------------------------------------------------------------------------------------

// grid (B*H, cdiv(T, kBM)), kThreads threads, dq_smem_bytes(DP) bytes; rows as the forward.
// delta = rowsum(dout * out) (also written out for the dk/dv kernel), then over the key tiles:
// P = exp2(S * scale * log2(e) - lse * log2(e)), dP = dO V^T, dS = P (dP - delta), dQ += dS K.
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) prefix_attention_dq_kernel(const Params p) {
  constexpr int P = row_pitch(DP), KD = DP / 16, ND = DP / 8, NK = kBN / 8;
  VAPT_EXTERN_SHARED(T, smem);
  T* sQ = smem;               // kBM x P
  T* sdO = sQ + kBM * P;      // kBM x P
  T* sK = sdO + kBM * P;      // 2 buffers of kBN x P
  T* sV = sK + 2 * kBN * P;   // 2 buffers of kBN x P
  const int bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads, q0 = blockIdx.y * kBM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int n_tiles = static_cast<int>(key_tiles(p.prompts, p.tokens, kBN));
  const int64_t stats = static_cast<int64_t>(bh) * p.tokens;

  load_tile<T, kBM, DP>(sQ, query_tile<T>(p.q, p, b, h, q0, kBM), p.D, p.vec);
  load_tile<T, kBM, DP>(sdO, query_tile<T>(p.dout, p, b, h, q0, kBM), p.D, p.vec);
  load_tile<T, kBN, DP>(sK, key_tile<T>(p.kp, p.k, p, b, h, 0, kBN), p.D, p.vec);
  load_tile<T, kBN, DP>(sV, key_tile<T>(p.vp, p.v, p, b, h, 0, kBN), p.D, p.vec);
  mma::cp_async_commit();

  // delta of the warp's 16 rows while the first tiles load: one warp-wide dot product per row.
  float delta[2] = {0.0f, 0.0f}, lse2[2];
  const T* out = slab<const T>(p.out, b, h);
  const T* dout = slab<const T>(p.dout, b, h);
  for (int r = 0; r < 16; ++r) {
    const int row = q0 + warp * 16 + r;
    float acc = 0.0f;
    if (row < p.tokens) {
      for (int c = lane; c < p.D; c += 32) {
        acc += mma::to_float(out[row * p.out.st + c]) * mma::to_float(dout[row * p.dout.st + c]);
      }
    }
    acc = warp_sum(acc);
    if (r == g) delta[0] = acc;
    if (r == g + 8) delta[1] = acc;
    if (lane == 0 && row < p.tokens) p.delta[stats + row] = acc;
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = q0 + warp * 16 + g + 8 * r;
    lse2[r] = row < p.tokens ? p.lse[stats + row] * kLog2e : 0.0f;
  }

  float dq[ND][4] = {};
  for (int j = 0; j < n_tiles; ++j) {
    mma::cp_async_wait<0>();
    __syncthreads();  // as in the forward
    prefetch_key_tile<T, DP>(sK, sV, p, b, h, j, n_tiles);
    const T* k_tile = sK + j % 2 * kBN * P;
    const T* v_tile = sV + j % 2 * kBN * P;
    const int nv = key_tile<T>(p.kp, p.k, p, b, h, j, kBN).count;

    // S = Q K^T and dP = dO V^T: 16 x kBN each.
    float s[NK][4] = {}, dp[NK][4] = {};
    paired_products<T, P, KD>(s, dp, sQ, sdO, k_tile, v_tile, warp * 16);
    // dS into the S registers; padding keys get P = 0.
#pragma unroll
    for (int n = 0; n < NK; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int col = n * 8 + 2 * t + i % 2;
        const float pr = col < nv ? exp2f(s[n][i] * p.scale_log2 - lse2[i / 2]) : 0.0f;
        s[n][i] = pr * (dp[n][i] - delta[i / 2]);
      }
    }
    // dQ += dS K: dS (16 x kBN) in the S registers, K (kBN x DP).
    product_from_registers<T, P>(dq, s, k_tile);
  }

  T* dq_out = slab<T>(p.dq, b, h);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = q0 + warp * 16 + g + 8 * r;
    if (row >= p.tokens) continue;
#pragma unroll
    for (int n = 0; n < ND; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = n * 8 + 2 * t + e;
        if (c < p.D) dq_out[row * p.dq.st + c] = mma::from_float<T>(dq[n][2 * r + e] * p.scale);
      }
    }
  }
}

// grid (B*H, key_tiles(Np, T, kKvBN)), kThreads threads, dkdv_smem_bytes(DP) bytes, after the dq
// kernel (which wrote delta). Block y owns one key tile; warp w owns its keys 16w ... as the rows
// of S^T = K Q^T and dP^T = V dO^T (16 keys x kKvBM queries per query tile), so that
// dV += P^T dO and dK += dS^T Q accumulate in its registers. Prefix keys write fp32 partials.
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) prefix_attention_dkdv_kernel(const Params p) {
  constexpr int P = row_pitch(DP), KD = DP / 16, ND = DP / 8, NQ = kKvBM / 8;
  VAPT_EXTERN_SHARED(T, smem);
  T* sK = smem;                       // kKvBN x P
  T* sV = sK + kKvBN * P;             // kKvBN x P
  T* sQ = sV + kKvBN * P;             // 2 buffers of kKvBM x P
  T* sdO = sQ + 2 * kKvBM * P;        // 2 buffers of kKvBM x P
  float* sLse = reinterpret_cast<float*>(sdO + 2 * kKvBM * P);  // 2 buffers of kKvBM, log2 domain
  float* sDelta = sLse + 2 * kKvBM;                             // 2 buffers of kKvBM
  const int bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads, jt = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t stats = static_cast<int64_t>(bh) * p.tokens;
  const int n_q = static_cast<int>(cdiv(p.tokens, kKvBM));

  const int nv = key_tile<T>(p.kp, p.k, p, b, h, jt, kKvBN).count;
  load_tile<T, kKvBN, DP>(sK, key_tile<T>(p.kp, p.k, p, b, h, jt, kKvBN), p.D, p.vec);
  load_tile<T, kKvBN, DP>(sV, key_tile<T>(p.vp, p.v, p, b, h, jt, kKvBN), p.D, p.vec);
  const auto load_queries = [&](int i, int buf) {
    const int r0 = i * kKvBM;
    load_tile<T, kKvBM, DP>(sQ + buf * kKvBM * P, query_tile<T>(p.q, p, b, h, r0, kKvBM), p.D, p.vec);
    load_tile<T, kKvBM, DP>(sdO + buf * kKvBM * P, query_tile<T>(p.dout, p, b, h, r0, kKvBM), p.D, p.vec);
    for (int r = threadIdx.x; r < kKvBM; r += kThreads) {
      const bool valid = r0 + r < p.tokens;
      sLse[buf * kKvBM + r] = valid ? p.lse[stats + r0 + r] * kLog2e : 0.0f;
      sDelta[buf * kKvBM + r] = valid ? p.delta[stats + r0 + r] : 0.0f;
    }
  };
  load_queries(0, 0);
  mma::cp_async_commit();

  // Warps whose 16 keys are all padding (a short prefix tile) skip the products.
  const bool active = warp * 16 < nv;
  float dk[ND][4] = {}, dv[ND][4] = {};
  for (int i = 0; i < n_q; ++i) {
    mma::cp_async_wait<0>();
    __syncthreads();  // query tile i is in buffer i % 2 for all; all are done with the other one
    if (i + 1 < n_q) load_queries(i + 1, (i + 1) % 2);
    mma::cp_async_commit();
    if (!active) continue;
    const int buf = i % 2, mv = imin(kKvBM, p.tokens - i * kKvBM);
    const T* q_tile = sQ + buf * kKvBM * P;
    const T* do_tile = sdO + buf * kKvBM * P;
    const float* lse2 = sLse + buf * kKvBM;
    const float* delta = sDelta + buf * kKvBM;

    // S^T = K Q^T and dP^T = V dO^T: 16 keys x kKvBM queries.
    float s[NQ][4] = {}, dp[NQ][4] = {};
    paired_products<T, P, KD>(s, dp, sK, sV, q_tile, do_tile, warp * 16);
    // P^T into s, dS^T into dp; the statistics belong to the columns (queries). Padding queries
    // get P = 0 so that they add nothing to dV and dK.
#pragma unroll
    for (int n = 0; n < NQ; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = n * 8 + 2 * t + e % 2;
        const float pr = col < mv ? exp2f(s[n][e] * p.scale_log2 - lse2[col]) : 0.0f;
        s[n][e] = pr;
        dp[n][e] = pr * (dp[n][e] - delta[col]);
      }
    }
    // dV += P^T dO and dK += dS^T Q: P^T and dS^T (16 x kKvBM) in the s and dp registers, dO and
    // Q (kKvBM x DP).
    product_from_registers<T, P>(dv, s, do_tile);
    product_from_registers<T, P>(dk, dp, q_tile);
  }

  const int prefix_tiles = static_cast<int>(cdiv(p.prompts, kKvBN));
  const bool prefix = jt < prefix_tiles;
  const int r0 = (prefix ? jt : jt - prefix_tiles) * kKvBN;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = warp * 16 + g + 8 * r;
    if (key >= nv) continue;
#pragma unroll
    for (int n = 0; n < ND; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = n * 8 + 2 * t + e;
        if (c >= p.D) continue;
        const float dk_value = dk[n][2 * r + e] * p.scale, dv_value = dv[n][2 * r + e];
        if (prefix) {
          const int64_t o = (static_cast<int64_t>(bh) * p.prompts + r0 + key) * p.D + c;
          p.dkp_part[o] = dk_value;
          p.dvp_part[o] = dv_value;
        } else {
          slab<T>(p.dk, b, h)[(r0 + key) * p.dk.st + c] = mma::from_float<T>(dk_value);
          slab<T>(p.dv, b, h)[(r0 + key) * p.dv.st + c] = mma::from_float<T>(dv_value);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// fp32: one warp per row
// ------------------------------------------------------------------------------------------------

constexpr int kPerLane = kMaxHeadDim / 32;  // row elements per lane: columns lane + 32 i

// Row `row` of a (rows, D) slab into registers (zeros past D).
__device__ __forceinline__ void load_row(float (&x)[kPerLane], const float* row, int D) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) x[i] = lane + 32 * i < D ? row[lane + 32 * i] : 0.0f;
}

__device__ __forceinline__ float dot(const float (&x)[kPerLane], const float* row, int D) {
  const int lane = threadIdx.x % 32;
  float acc = 0.0f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) acc += lane + 32 * i < D ? x[i] * row[lane + 32 * i] : 0.0f;
  return warp_sum(acc);
}

__device__ __forceinline__ const float* key_row(const Tensor4& prefix, const Tensor4& tokens, const Params& p, int b,
                                                int h, int j) {
  return j < p.prompts ? slab<const float>(prefix, b, h) + j * prefix.st
                       : slab<const float>(tokens, b, h) + (j - p.prompts) * tokens.st;
}

__device__ __forceinline__ void store_row(float* row, const float (&x)[kPerLane], float factor, int D) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    if (lane + 32 * i < D) row[lane + 32 * i] = x[i] * factor;
  }
}

// grid (B*H, cdiv(T, kWarps)): warp w of block y owns query row 4y + w; online softmax over all
// Np + T keys, one key at a time.
__global__ void __launch_bounds__(kThreads) prefix_attention_fwd_fp32_kernel(const Params p) {
  const int bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads;
  const int row = blockIdx.y * kWarps + threadIdx.x / 32;
  if (row >= p.tokens) return;  // whole warps only
  const int lane = threadIdx.x % 32;
  float q[kPerLane], o[kPerLane] = {};
  load_row(q, slab<const float>(p.q, b, h) + row * p.q.st, p.D);
  float m = -INFINITY, l = 0.0f;
  for (int j = 0; j < p.prompts + p.tokens; ++j) {
    const float s = dot(q, key_row(p.kp, p.k, p, b, h, j), p.D) * p.scale_log2;
    const float m_new = fmaxf(m, s);
    const float alpha = exp2f(m - m_new), e = exp2f(s - m_new);
    const float* v = key_row(p.vp, p.v, p, b, h, j);
    l = l * alpha + e;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) o[i] = o[i] * alpha + (lane + 32 * i < p.D ? e * v[lane + 32 * i] : 0.0f);
    m = m_new;
  }
  store_row(slab<float>(p.out, b, h) + row * p.out.st, o, 1.0f / l, p.D);
  if (lane == 0) p.lse[static_cast<int64_t>(bh) * p.tokens + row] = (m + log2f(l)) * kLn2;
}

// grid (B*H, cdiv(T, kWarps)): delta and dq of one query row per warp.
__global__ void __launch_bounds__(kThreads) prefix_attention_dq_fp32_kernel(const Params p) {
  const int bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads;
  const int row = blockIdx.y * kWarps + threadIdx.x / 32;
  if (row >= p.tokens) return;
  const int64_t stat = static_cast<int64_t>(bh) * p.tokens + row;
  float q[kPerLane], dout[kPerLane], dq[kPerLane] = {};
  load_row(q, slab<const float>(p.q, b, h) + row * p.q.st, p.D);
  load_row(dout, slab<const float>(p.dout, b, h) + row * p.dout.st, p.D);
  const float delta = dot(dout, slab<const float>(p.out, b, h) + row * p.out.st, p.D);
  if (threadIdx.x % 32 == 0) p.delta[stat] = delta;
  const float lse2 = p.lse[stat] * kLog2e;
  for (int j = 0; j < p.prompts + p.tokens; ++j) {
    const float* k = key_row(p.kp, p.k, p, b, h, j);
    const float pr = exp2f(dot(q, k, p.D) * p.scale_log2 - lse2);
    const float ds = pr * (dot(dout, key_row(p.vp, p.v, p, b, h, j), p.D) - delta);
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) dq[i] += lane + 32 * i < p.D ? ds * k[lane + 32 * i] : 0.0f;
  }
  store_row(slab<float>(p.dq, b, h) + row * p.dq.st, dq, p.scale, p.D);
}

// grid (B*H, cdiv(Np + T, kWarps)), after the dq kernel: dk and dv of one key row per warp.
__global__ void __launch_bounds__(kThreads) prefix_attention_dkdv_fp32_kernel(const Params p) {
  const int bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads;
  const int j = blockIdx.y * kWarps + threadIdx.x / 32;
  if (j >= p.prompts + p.tokens) return;
  const int lane = threadIdx.x % 32;
  const int64_t stats = static_cast<int64_t>(bh) * p.tokens;
  float k[kPerLane], v[kPerLane], dk[kPerLane] = {}, dv[kPerLane] = {};
  load_row(k, key_row(p.kp, p.k, p, b, h, j), p.D);
  load_row(v, key_row(p.vp, p.v, p, b, h, j), p.D);
  for (int i = 0; i < p.tokens; ++i) {
    const float* q = slab<const float>(p.q, b, h) + i * p.q.st;
    const float* dout = slab<const float>(p.dout, b, h) + i * p.dout.st;
    const float pr = exp2f(dot(k, q, p.D) * p.scale_log2 - p.lse[stats + i] * kLog2e);
    const float ds = pr * (dot(v, dout, p.D) - p.delta[stats + i]);
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) {
      if (lane + 32 * c < p.D) {
        dv[c] += pr * dout[lane + 32 * c];
        dk[c] += ds * q[lane + 32 * c];
      }
    }
  }
  if (j < p.prompts) {
    const int64_t o = (static_cast<int64_t>(bh) * p.prompts + j) * p.D;
    store_row(p.dkp_part + o, dk, p.scale, p.D);
    store_row(p.dvp_part + o, dv, 1.0f, p.D);
  } else {
    store_row(slab<float>(p.dk, b, h) + (j - p.prompts) * p.dk.st, dk, p.scale, p.D);
    store_row(slab<float>(p.dv, b, h) + (j - p.prompts) * p.dv.st, dv, 1.0f, p.D);
  }
}

}  // namespace attention
}  // namespace vapt
