// CUDA kernels of vapt::prefix_attention_fwd / vapt::prefix_attention_bwd (schema: csrc/vapt.cpp).
//
// Softmax attention of the token queries over the keys [k_prefix[b] ; k[b]] (DESIGN §2.1: prompts
// only act as a key/value prefix), flash-attention style: the (T, Np + T) score matrix never exists
// in memory and the concatenation is never built. Shapes (elements, any strides, unit last stride):
//   q, k, v            (B, H, T, D)     the block's own tokens
//   k_prefix, v_prefix (Bp, H, Np, D)   Bp == B, or Bp == 1 broadcast (batch stride forced to 0)
//   out, dq, dk, dv    (B, H, T, D)     allocated as (B, T, H, D) memory, so that the block's
//                                        o.transpose(1, 2).reshape(B, T, H * D) is free
//   lse, delta         (B, H, T)        fp32, contiguous
//   dk/dv_prefix       (Bp, H, Np, D)   contiguous; from fp32 per-batch partials (B, H, Np, D)
//                                        summed over the batch when the prefix is broadcast
//
// Design, chosen to be checkable by reading rather than to be the last word in speed:
// * One thread block of 4 warps per (b*h, tile). Every operand tile lives in shared memory: the
//   q/k/v/dout tiles in the input dtype (rows padded to the padded head dim DP in {32, 64, 128}
//   with zeros, so a padded row or column adds nothing to any product), and every accumulator
//   (scores S, dP, the output O, dq, dk, dv) in the accumulation dtype. Each product is one call
//   of block_gemm, C (+)= A * B on shared-memory tiles: WMMA 16x16x16 fragments with fp32
//   accumulators for fp16/bf16 (each warp owns whole 16x16 output tiles; the accumulator is
//   loaded from and stored back to shared memory, so no code depends on the unspecified
//   fragment-to-thread layout), and a plain SIMT loop for fp32. Everything elementwise
//   (online softmax, ds) is ordinary code on shared memory between __syncthreads().
// * Keys form one sequence [prefix (Np) ; tokens (T)] cut into tiles of BN; a tile may straddle
//   the boundary, each of its rows being read from the tensor it belongs to (key_row), so the
//   ViT-B case Np = 10, T = 197 takes 4 key tiles of 64, not 1 + 4.
// * Forward, per (query tile, b*h): iterate the key tiles in order (prefix keys first), online
//   softmax in the log2 domain (exp2 of scores pre-multiplied by scale*log2(e)), lse saved as a
//   natural log.
// * Backward, FA2-style, no atomics: delta = rowsum(dout * out); dk/dv per (key tile, b*h) looping
//   over all query tiles (prefix key rows write fp32 per-batch partials); dq per (query tile, b*h)
//   looping over all key tiles. p is recomputed from lse.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include "../common.h"
#include "common.cuh"

namespace vapt {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / kWarpSize;
constexpr double kLog2e = 1.4426950408889634;  // log2(e): exp(x) == exp2(x * log2(e))
constexpr double kLn2 = 0.6931471805599453;     // ln(2):   log(x) == log2(x) * ln(2)

// Per input dtype: accumulation type, whether products run on tensor cores, row padding (in
// elements) of the input-dtype and accumulator shared tiles, and tile sizes. kBM/kBN are the
// query/key tiles of the forward and dq kernels; the dk/dv kernel uses kBN keys and kBMKv queries.
// WMMA needs row pitches that are multiples of 16 bytes (8 halves, 4 floats); the SIMT types pad
// by one element so that a column walk hits distinct banks.
template <typename T>
struct Elem;

template <>
struct Elem<__half> {
  using Acc = float;
  static constexpr bool kTensorCores = true;
  static constexpr int kPad = 8, kAccPad = 4, kBM = 64, kBN = 64, kBMKv = 32;
  static __device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_acc(float x) { return __float2half_rn(x); }
};

template <>
struct Elem<__nv_bfloat16> {
  using Acc = float;
  static constexpr bool kTensorCores = true;
  static constexpr int kPad = 8, kAccPad = 4, kBM = 64, kBN = 64, kBMKv = 32;
  static __device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_acc(float x) { return __float2bfloat16_rn(x); }
};

template <>
struct Elem<float> {
  using Acc = float;
  static constexpr bool kTensorCores = false;
  static constexpr int kPad = 1, kAccPad = 1, kBM = 32, kBN = 32, kBMKv = 32;
  static __device__ __forceinline__ float to_acc(float x) { return x; }
  static __device__ __forceinline__ float from_acc(float x) { return x; }
};

template <typename S>
struct CudaType {
  using type = S;
};
template <>
struct CudaType<c10::Half> {
  using type = __half;
};
template <>
struct CudaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

__host__ __device__ constexpr int cdiv(int a, int b) { return (a + b - 1) / b; }
constexpr int align128(size_t bytes) { return static_cast<int>((bytes + 127) / 128 * 128); }

// A (B, H, rows, D) tensor: base pointer and element strides of its first three dims.
struct Strided4 {
  void* ptr;
  int64_t sb, sh, st;
};

// Row 0 of the (rows, D) slab of image b, head h (int64 offsets: B*H*T*D exceeds 2^31 easily).
template <typename T>
__device__ __forceinline__ T* slab(const Strided4& t, int b, int h) {
  return static_cast<T*>(t.ptr) + b * t.sb + h * t.sh;
}

// Key j of the sequence [prefix ; tokens] of image b, head h: row j of the prefix slab (whose batch
// stride is 0 when it is broadcast) or row j - Np of the token slab.
template <typename T>
__device__ __forceinline__ const T* key_row(const Strided4& prefix, const Strided4& tokens, int b, int h, int j,
                                            int prompts) {
  return j < prompts ? slab<const T>(prefix, b, h) + j * prefix.st
                     : slab<const T>(tokens, b, h) + (j - prompts) * tokens.st;
}

// Copies columns [0, D) of rows [0, nrows) (row r starts at row(r)) into a (ROWS, DP) shared tile of
// pitch LD and writes zeros everywhere else in the tile. With `vec` (set by the host when D, the
// strides and the base pointers are multiples of 16 bytes) each thread moves 16 bytes at a time;
// a 16-byte chunk is then either wholly inside [0, D) or wholly outside.
template <typename T, int ROWS, int DP, int LD, typename RowPtr>
__device__ __forceinline__ void load_tile(T* dst, RowPtr row, int nrows, int D, bool vec) {
  if (vec) {
    constexpr int kVec = 16 / sizeof(T);
    constexpr int kChunks = DP / kVec;
    for (int i = threadIdx.x; i < ROWS * kChunks; i += kThreads) {
      const int r = i / kChunks, c = (i % kChunks) * kVec;
      uint4 u = make_uint4(0u, 0u, 0u, 0u);
      if (r < nrows && c < D) u = *reinterpret_cast<const uint4*>(row(r) + c);
      if constexpr ((LD * sizeof(T)) % 16 == 0) {
        *reinterpret_cast<uint4*>(dst + r * LD + c) = u;
      } else {
        const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
        for (int j = 0; j < kVec; ++j) dst[r * LD + c + j] = e[j];
      }
    }
  } else {
    const T zero = Elem<T>::from_acc(0);
    for (int i = threadIdx.x; i < ROWS * DP; i += kThreads) {
      const int r = i / DP, c = i % DP;
      dst[r * LD + c] = (r < nrows && c < D) ? row(r)[c] : zero;
    }
  }
}

// C (M x N, pitch ldc) (+)= A (M x K) * B (K x N), all in shared memory, on tensor cores.
// A(m, k) = A[m * lda + k] (row-major) or A[k * lda + m] (kACol: A is the transpose of a stored
// row-major tile); B(k, n) = B[k * ldb + n] or B[n * ldb + k] (kBCol). This is exactly WMMA's
// row_major / col_major meaning of ldm, so the 16x16 tile (tm, tk) of A starts at
// A + tm*16*lda + tk*16 (row-major) or A + tk*16*lda + tm*16 (col-major), likewise for B.
// Warp w computes the output tiles w, w + 4, ...; each is read from C (or zero), accumulated over
// K/16 fragment products and written back, so the caller only needs __syncthreads() around it.
// All tile starts are 32-byte aligned: buffers are 128-byte aligned, pitches are multiples of
// 16 bytes and tile offsets are multiples of 16 rows / 16 columns.
template <typename T, int M, int N, int K, bool kACol, bool kBCol, bool kAccumulate>
__device__ __forceinline__ void gemm_tensor_cores(const T* A, int lda, const T* B, int ldb, float* C, int ldc) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  using LayoutA = std::conditional_t<kACol, wmma::col_major, wmma::row_major>;
  using LayoutB = std::conditional_t<kBCol, wmma::col_major, wmma::row_major>;
  static_assert(M % 16 == 0 && N % 16 == 0 && K % 16 == 0, "WMMA tiles are 16x16x16");
  constexpr int TN = N / 16;
  const int warp = threadIdx.x / 32;
  for (int t = warp; t < (M / 16) * TN; t += kWarps) {
    const int tm = t / TN, tn = t % TN;
    float* c_tile = C + tm * 16 * ldc + tn * 16;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    if constexpr (kAccumulate) {
      wmma::load_matrix_sync(acc, c_tile, ldc, wmma::mem_row_major);
    } else {
      wmma::fill_fragment(acc, 0.0f);
    }
#pragma unroll
    for (int tk = 0; tk < K / 16; ++tk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LayoutA> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayoutB> b;
      wmma::load_matrix_sync(a, kACol ? A + tk * 16 * lda + tm * 16 : A + tm * 16 * lda + tk * 16, lda);
      wmma::load_matrix_sync(b, kBCol ? B + tn * 16 * ldb + tk * 16 : B + tk * 16 * ldb + tn * 16, ldb);
      wmma::mma_sync(acc, a, b, acc);
    }
    wmma::store_matrix_sync(c_tile, acc, ldc, wmma::mem_row_major);
  }
#else
  __trap();  // fp16/bf16 kernels need sm_80+ (the host checks the device before launching)
#endif
}

// Same contract as gemm_tensor_cores, SIMT: thread i computes the outputs i, i + 128, ... of the
// row-major M x N result (consecutive threads take consecutive columns of one row).
template <typename T, int M, int N, int K, bool kACol, bool kBCol, bool kAccumulate, typename Acc>
__device__ __forceinline__ void gemm_simt(const T* A, int lda, const T* B, int ldb, Acc* C, int ldc) {
  static_assert((M * N) % kThreads == 0, "each thread owns the same number of outputs");
  constexpr int kPer = M * N / kThreads;
  Acc acc[kPer];
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int i = threadIdx.x + j * kThreads, m = i / N, n = i % N;
    acc[j] = kAccumulate ? C[m * ldc + n] : Acc(0);
  }
#pragma unroll 4
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int i = threadIdx.x + j * kThreads, m = i / N, n = i % N;
      const Acc a = kACol ? A[k * lda + m] : A[m * lda + k];
      const Acc b = kBCol ? B[n * ldb + k] : B[k * ldb + n];
      acc[j] += a * b;
    }
  }
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int i = threadIdx.x + j * kThreads, m = i / N, n = i % N;
    C[m * ldc + n] = acc[j];
  }
}

template <typename T, int M, int N, int K, bool kACol, bool kBCol, bool kAccumulate, typename Acc>
__device__ __forceinline__ void block_gemm(const T* A, int lda, const T* B, int ldb, Acc* C, int ldc) {
  if constexpr (Elem<T>::kTensorCores) {
    gemm_tensor_cores<T, M, N, K, kACol, kBCol, kAccumulate>(A, lda, B, ldb, C, ldc);
  } else {
    gemm_simt<T, M, N, K, kACol, kBCol, kAccumulate>(A, lda, B, ldb, C, ldc);
  }
}

struct FwdParams {
  Strided4 q, k, v, kp, vp, out;  // kp/vp: sb == 0 when the prefix is broadcast
  void* lse;                      // (B, H, tokens) Acc
  int heads, tokens, prompts, D;
  double scale;
  bool vec;  // 16-byte loads allowed for q, k, v, kp, vp
};

struct BwdParams {
  Strided4 q, k, v, kp, vp, dout, dq, dk, dv;
  const void* lse;    // (B, H, tokens) Acc
  const void* delta;  // (B, H, tokens) Acc
  void* dkp_part;     // (B, H, prompts, D) Acc, per-batch dk_prefix
  void* dvp_part;     // (B, H, prompts, D) Acc, per-batch dv_prefix
  int heads, tokens, prompts, D;
  double scale;
  bool vec;  // 16-byte loads allowed for q, k, v, kp, vp, dout
};

// Shared-memory carve-up of the forward kernel, in bytes (each buffer 128-byte aligned).
template <typename T, int DP>
struct FwdSmem {
  using E = Elem<T>;
  using Acc = typename E::Acc;
  static constexpr int BM = E::kBM, BN = E::kBN;
  static constexpr int LDT = DP + E::kPad;     // q, k, v tiles
  static constexpr int LDP = BN + E::kPad;     // P (BM x BN), input dtype
  static constexpr int LDS = BN + E::kAccPad;  // S (BM x BN)
  static constexpr int LDO = DP + E::kAccPad;  // O (BM x DP)
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + align128(sizeof(T) * BM * LDT);
  static constexpr int kV = kK + align128(sizeof(T) * BN * LDT);
  static constexpr int kS = kV + align128(sizeof(T) * BN * LDT);
  static constexpr int kP = kS + align128(sizeof(Acc) * BM * LDS);
  static constexpr int kO = kP + align128(sizeof(T) * BM * LDP);
  static constexpr int kBytes = kO + align128(sizeof(Acc) * BM * LDO);
};

// grid (B*H, cdiv(T, BM)). Warp w owns the query rows w, w + 4, ... of the tile for the softmax
// statistics (running max m and sum l, kept in registers, identical in all lanes).
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) prefix_attention_fwd_kernel(const FwdParams p) {
  using L = FwdSmem<T, DP>;
  using E = Elem<T>;
  using Acc = typename E::Acc;
  constexpr int BM = L::BM, BN = L::BN, kRows = BM / kWarps;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem + L::kQ);
  T* sK = reinterpret_cast<T*>(smem + L::kK);
  T* sV = reinterpret_cast<T*>(smem + L::kV);
  Acc* sS = reinterpret_cast<Acc*>(smem + L::kS);
  T* sP = reinterpret_cast<T*>(smem + L::kP);
  Acc* sO = reinterpret_cast<Acc*>(smem + L::kO);

  const int bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads;
  const int q0 = blockIdx.y * BM, mv = min(BM, p.tokens - q0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Acc scale_log2 = static_cast<Acc>(p.scale * kLog2e);

  const T* q_rows = slab<const T>(p.q, b, h) + q0 * p.q.st;
  load_tile<T, BM, DP, L::LDT>(sQ, [&](int r) { return q_rows + r * p.q.st; }, mv, p.D, p.vec);
  for (int i = threadIdx.x; i < BM * L::LDO; i += kThreads) sO[i] = Acc(0);
  Acc m_run[kRows], l_run[kRows];  // log2-domain running max and running sum of row warp + j*4
#pragma unroll
  for (int j = 0; j < kRows; ++j) {
    m_run[j] = -INFINITY;
    l_run[j] = Acc(0);
  }

  const int n_keys = p.prompts + p.tokens;
  for (int j0 = 0; j0 < n_keys; j0 += BN) {
    const int nv = min(BN, n_keys - j0);  // valid keys in this tile, >= 1
    load_tile<T, BN, DP, L::LDT>(
        sK, [&](int r) { return key_row<T>(p.kp, p.k, b, h, j0 + r, p.prompts); }, nv, p.D, p.vec);
    load_tile<T, BN, DP, L::LDT>(
        sV, [&](int r) { return key_row<T>(p.vp, p.v, b, h, j0 + r, p.prompts); }, nv, p.D, p.vec);
    __syncthreads();

    // S = Q K^T: B(k=d, n=key) = K[key][d], i.e. K read column-major.
    block_gemm<T, BM, BN, DP, false, true, false>(sQ, L::LDT, sK, L::LDT, sS, L::LDS);
    __syncthreads();

    // Online softmax of the tile, one warp per row; columns >= nv are padding keys (p = 0).
#pragma unroll
    for (int j = 0; j < kRows; ++j) {
      const int r = warp + j * kWarps;
      Acc tile_max = -INFINITY;
      for (int c = lane; c < BN; c += 32) {
        if (c < nv) {
          const Acc x = sS[r * L::LDS + c] * scale_log2;
          tile_max = x > tile_max ? x : tile_max;
        }
      }
      tile_max = warp_max(tile_max);
      const Acc m_new = tile_max > m_run[j] ? tile_max : m_run[j];  // finite: nv >= 1 keys
      const Acc alpha = exp2f(m_run[j] - m_new);                    // 0 on the first tile
      Acc sum = Acc(0);
      for (int c = lane; c < BN; c += 32) {
        const Acc pv = c < nv ? exp2f(sS[r * L::LDS + c] * scale_log2 - m_new) : Acc(0);
        sP[r * L::LDP + c] = E::from_acc(pv);
        sum += pv;
      }
      l_run[j] = l_run[j] * alpha + warp_sum(sum);
      m_run[j] = m_new;
      for (int c = lane; c < DP; c += 32) sO[r * L::LDO + c] *= alpha;
    }
    __syncthreads();

    // O += P V: B(k=key, n=d) = V[key][d], row-major.
    block_gemm<T, BM, DP, BN, false, false, true>(sP, L::LDP, sV, L::LDT, sO, L::LDO);
    __syncthreads();
  }

  Acc* lse = static_cast<Acc*>(p.lse) + static_cast<int64_t>(bh) * p.tokens + q0;
#pragma unroll
  for (int j = 0; j < kRows; ++j) {
    const int r = warp + j * kWarps;
    if (r < mv) {
      const Acc inv_l = Acc(1) / l_run[j];  // l >= 1: the max key contributes exp2(0)
      T* o = slab<T>(p.out, b, h) + (q0 + r) * p.out.st;
      for (int c = lane; c < p.D; c += 32) o[c] = E::from_acc(sO[r * L::LDO + c] * inv_l);
      if (lane == 0) lse[r] = (m_run[j] + log2f(l_run[j])) * static_cast<Acc>(kLn2);
    }
  }
}

// delta[b, h, t] = sum_d dout * out, one warp per row. grid cdiv(B*H*T, 4).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    prefix_attention_delta_kernel(const Strided4 out, const Strided4 dout, typename Elem<T>::Acc* delta, int heads,
                                  int tokens, int D, int64_t rows) {
  using E = Elem<T>;
  using Acc = typename E::Acc;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const int bh = static_cast<int>(row / tokens), t = static_cast<int>(row % tokens);
  const int b = bh / heads, h = bh % heads;
  const T* o = slab<const T>(out, b, h) + t * out.st;
  const T* g = slab<const T>(dout, b, h) + t * dout.st;
  Acc sum = Acc(0);
  for (int c = lane; c < D; c += 32) sum += E::to_acc(o[c]) * E::to_acc(g[c]);
  sum = warp_sum(sum);
  if (lane == 0) delta[row] = sum;
}

// Shared-memory carve-up of the dk/dv kernel: BN keys, BM queries per inner step.
template <typename T, int DP>
struct DkdvSmem {
  using E = Elem<T>;
  using Acc = typename E::Acc;
  static constexpr int BM = E::kBMKv, BN = E::kBN;
  static constexpr int LDT = DP + E::kPad;     // k, v (BN x DP); q, dout (BM x DP)
  static constexpr int LDP = BN + E::kPad;     // P, dS (BM x BN), input dtype
  static constexpr int LDS = BN + E::kAccPad;  // S, dP (BM x BN)
  static constexpr int LDO = DP + E::kAccPad;  // dK, dV accumulators (BN x DP)
  static constexpr int kK = 0;
  static constexpr int kV = kK + align128(sizeof(T) * BN * LDT);
  static constexpr int kQ = kV + align128(sizeof(T) * BN * LDT);
  static constexpr int kdO = kQ + align128(sizeof(T) * BM * LDT);
  static constexpr int kS = kdO + align128(sizeof(T) * BM * LDT);
  static constexpr int kdP = kS + align128(sizeof(Acc) * BM * LDS);
  static constexpr int kP = kdP + align128(sizeof(Acc) * BM * LDS);
  static constexpr int kdS = kP + align128(sizeof(T) * BM * LDP);
  static constexpr int kdK = kdS + align128(sizeof(T) * BM * LDP);
  static constexpr int kdV = kdK + align128(sizeof(Acc) * BN * LDO);
  static constexpr int kLse = kdV + align128(sizeof(Acc) * BN * LDO);
  static constexpr int kDelta = kLse + align128(sizeof(Acc) * BM);
  static constexpr int kBytes = kDelta + align128(sizeof(Acc) * BM);
};

// grid (B*H, cdiv(Np + T, BN)): one key tile of [prefix ; tokens] per block, looping
// over every query tile. dv = P^T dout, dk = scale * dS^T q with P = exp(scale*S - lse) and
// dS = P * (dP - delta), dP = dout V^T.
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) prefix_attention_dkdv_kernel(const BwdParams p) {
  using L = DkdvSmem<T, DP>;
  using E = Elem<T>;
  using Acc = typename E::Acc;
  constexpr int BM = L::BM, BN = L::BN;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem + L::kK);
  T* sV = reinterpret_cast<T*>(smem + L::kV);
  T* sQ = reinterpret_cast<T*>(smem + L::kQ);
  T* sdO = reinterpret_cast<T*>(smem + L::kdO);
  Acc* sS = reinterpret_cast<Acc*>(smem + L::kS);
  Acc* sdP = reinterpret_cast<Acc*>(smem + L::kdP);
  T* sP = reinterpret_cast<T*>(smem + L::kP);
  T* sdS = reinterpret_cast<T*>(smem + L::kdS);
  Acc* sdK = reinterpret_cast<Acc*>(smem + L::kdK);
  Acc* sdV = reinterpret_cast<Acc*>(smem + L::kdV);
  Acc* sLse = reinterpret_cast<Acc*>(smem + L::kLse);
  Acc* sDelta = reinterpret_cast<Acc*>(smem + L::kDelta);

  const int bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads;
  const int j0 = blockIdx.y * BN, nv = min(BN, p.prompts + p.tokens - j0);
  const Acc scale_log2 = static_cast<Acc>(p.scale * kLog2e);
  const Acc* lse = static_cast<const Acc*>(p.lse) + static_cast<int64_t>(bh) * p.tokens;
  const Acc* delta = static_cast<const Acc*>(p.delta) + static_cast<int64_t>(bh) * p.tokens;

  load_tile<T, BN, DP, L::LDT>(
      sK, [&](int r) { return key_row<T>(p.kp, p.k, b, h, j0 + r, p.prompts); }, nv, p.D, p.vec);
  load_tile<T, BN, DP, L::LDT>(
      sV, [&](int r) { return key_row<T>(p.vp, p.v, b, h, j0 + r, p.prompts); }, nv, p.D, p.vec);
  for (int i = threadIdx.x; i < BN * L::LDO; i += kThreads) {
    sdK[i] = Acc(0);
    sdV[i] = Acc(0);
  }

  for (int q0 = 0; q0 < p.tokens; q0 += BM) {
    const int mv = min(BM, p.tokens - q0);
    const T* q_rows = slab<const T>(p.q, b, h) + q0 * p.q.st;
    const T* do_rows = slab<const T>(p.dout, b, h) + q0 * p.dout.st;
    load_tile<T, BM, DP, L::LDT>(sQ, [&](int r) { return q_rows + r * p.q.st; }, mv, p.D, p.vec);
    load_tile<T, BM, DP, L::LDT>(sdO, [&](int r) { return do_rows + r * p.dout.st; }, mv, p.D, p.vec);
    for (int r = threadIdx.x; r < BM; r += kThreads) {
      sLse[r] = r < mv ? lse[q0 + r] * static_cast<Acc>(kLog2e) : Acc(0);  // log2 domain
      sDelta[r] = r < mv ? delta[q0 + r] : Acc(0);
    }
    __syncthreads();

    // S = Q K^T and dP = dO V^T (K, V read column-major).
    block_gemm<T, BM, BN, DP, false, true, false>(sQ, L::LDT, sK, L::LDT, sS, L::LDS);
    block_gemm<T, BM, BN, DP, false, true, false>(sdO, L::LDT, sV, L::LDT, sdP, L::LDS);
    __syncthreads();

    for (int i = threadIdx.x; i < BM * BN; i += kThreads) {
      const int m = i / BN, n = i % BN;
      Acc pv = Acc(0), ds = Acc(0);
      if (m < mv && n < nv) {
        pv = exp2f(sS[m * L::LDS + n] * scale_log2 - sLse[m]);
        ds = pv * (sdP[m * L::LDS + n] - sDelta[m]);
      }
      sP[m * L::LDP + n] = E::from_acc(pv);
      sdS[m * L::LDP + n] = E::from_acc(ds);
    }
    __syncthreads();

    // dV += P^T dO and dK += dS^T Q: A(m=key, k=query) = P[query][key], i.e. P read column-major.
    block_gemm<T, BN, DP, BM, true, false, true>(sP, L::LDP, sdO, L::LDT, sdV, L::LDO);
    block_gemm<T, BN, DP, BM, true, false, true>(sdS, L::LDP, sQ, L::LDT, sdK, L::LDO);
    __syncthreads();
  }

  const Acc scale = static_cast<Acc>(p.scale);
  for (int i = threadIdx.x; i < BN * DP; i += kThreads) {
    const int n = i / DP, c = i % DP;
    if (n >= nv || c >= p.D) continue;
    const Acc dk = sdK[n * L::LDO + c] * scale, dv = sdV[n * L::LDO + c];
    const int j = j0 + n;
    if (j < p.prompts) {
      const int64_t o = (static_cast<int64_t>(bh) * p.prompts + j) * p.D + c;
      static_cast<Acc*>(p.dkp_part)[o] = dk;
      static_cast<Acc*>(p.dvp_part)[o] = dv;
    } else {
      slab<T>(p.dk, b, h)[(j - p.prompts) * p.dk.st + c] = E::from_acc(dk);
      slab<T>(p.dv, b, h)[(j - p.prompts) * p.dv.st + c] = E::from_acc(dv);
    }
  }
}

// Shared-memory carve-up of the dq kernel: BM queries, BN keys per inner step.
template <typename T, int DP>
struct DqSmem {
  using E = Elem<T>;
  using Acc = typename E::Acc;
  static constexpr int BM = E::kBM, BN = E::kBN;
  static constexpr int LDT = DP + E::kPad;     // q, dout (BM x DP); k, v (BN x DP)
  static constexpr int LDP = BN + E::kPad;     // dS (BM x BN), input dtype
  static constexpr int LDS = BN + E::kAccPad;  // S, dP (BM x BN)
  static constexpr int LDO = DP + E::kAccPad;  // dQ accumulator (BM x DP)
  static constexpr int kQ = 0;
  static constexpr int kdO = kQ + align128(sizeof(T) * BM * LDT);
  static constexpr int kK = kdO + align128(sizeof(T) * BM * LDT);
  static constexpr int kV = kK + align128(sizeof(T) * BN * LDT);
  static constexpr int kS = kV + align128(sizeof(T) * BN * LDT);
  static constexpr int kdP = kS + align128(sizeof(Acc) * BM * LDS);
  static constexpr int kdS = kdP + align128(sizeof(Acc) * BM * LDS);
  static constexpr int kdQ = kdS + align128(sizeof(T) * BM * LDP);
  static constexpr int kLse = kdQ + align128(sizeof(Acc) * BM * LDO);
  static constexpr int kDelta = kLse + align128(sizeof(Acc) * BM);
  static constexpr int kBytes = kDelta + align128(sizeof(Acc) * BM);
};

// grid (B*H, cdiv(T, BM)): dq = scale * sum over the key tiles of [prefix ; tokens] of dS K.
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) prefix_attention_dq_kernel(const BwdParams p) {
  using L = DqSmem<T, DP>;
  using E = Elem<T>;
  using Acc = typename E::Acc;
  constexpr int BM = L::BM, BN = L::BN;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem + L::kQ);
  T* sdO = reinterpret_cast<T*>(smem + L::kdO);
  T* sK = reinterpret_cast<T*>(smem + L::kK);
  T* sV = reinterpret_cast<T*>(smem + L::kV);
  Acc* sS = reinterpret_cast<Acc*>(smem + L::kS);
  Acc* sdP = reinterpret_cast<Acc*>(smem + L::kdP);
  T* sdS = reinterpret_cast<T*>(smem + L::kdS);
  Acc* sdQ = reinterpret_cast<Acc*>(smem + L::kdQ);
  Acc* sLse = reinterpret_cast<Acc*>(smem + L::kLse);
  Acc* sDelta = reinterpret_cast<Acc*>(smem + L::kDelta);

  const int bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads;
  const int q0 = blockIdx.y * BM, mv = min(BM, p.tokens - q0);
  const Acc scale_log2 = static_cast<Acc>(p.scale * kLog2e);
  const Acc* lse = static_cast<const Acc*>(p.lse) + static_cast<int64_t>(bh) * p.tokens + q0;
  const Acc* delta = static_cast<const Acc*>(p.delta) + static_cast<int64_t>(bh) * p.tokens + q0;

  const T* q_rows = slab<const T>(p.q, b, h) + q0 * p.q.st;
  const T* do_rows = slab<const T>(p.dout, b, h) + q0 * p.dout.st;
  load_tile<T, BM, DP, L::LDT>(sQ, [&](int r) { return q_rows + r * p.q.st; }, mv, p.D, p.vec);
  load_tile<T, BM, DP, L::LDT>(sdO, [&](int r) { return do_rows + r * p.dout.st; }, mv, p.D, p.vec);
  for (int r = threadIdx.x; r < BM; r += kThreads) {
    sLse[r] = r < mv ? lse[r] * static_cast<Acc>(kLog2e) : Acc(0);  // log2 domain
    sDelta[r] = r < mv ? delta[r] : Acc(0);
  }
  for (int i = threadIdx.x; i < BM * L::LDO; i += kThreads) sdQ[i] = Acc(0);

  const int n_keys = p.prompts + p.tokens;
  for (int j0 = 0; j0 < n_keys; j0 += BN) {
    const int nv = min(BN, n_keys - j0);  // valid keys in this tile, >= 1
    load_tile<T, BN, DP, L::LDT>(
        sK, [&](int r) { return key_row<T>(p.kp, p.k, b, h, j0 + r, p.prompts); }, nv, p.D, p.vec);
    load_tile<T, BN, DP, L::LDT>(
        sV, [&](int r) { return key_row<T>(p.vp, p.v, b, h, j0 + r, p.prompts); }, nv, p.D, p.vec);
    __syncthreads();

    block_gemm<T, BM, BN, DP, false, true, false>(sQ, L::LDT, sK, L::LDT, sS, L::LDS);
    block_gemm<T, BM, BN, DP, false, true, false>(sdO, L::LDT, sV, L::LDT, sdP, L::LDS);
    __syncthreads();

    for (int i = threadIdx.x; i < BM * BN; i += kThreads) {
      const int m = i / BN, n = i % BN;
      Acc ds = Acc(0);
      if (m < mv && n < nv) {
        const Acc pv = exp2f(sS[m * L::LDS + n] * scale_log2 - sLse[m]);
        ds = pv * (sdP[m * L::LDS + n] - sDelta[m]);
      }
      sdS[m * L::LDP + n] = E::from_acc(ds);
    }
    __syncthreads();

    // dQ += dS K: B(k=key, n=d) = K[key][d], row-major.
    block_gemm<T, BM, DP, BN, false, false, true>(sdS, L::LDP, sK, L::LDT, sdQ, L::LDO);
    __syncthreads();
  }

  const Acc scale = static_cast<Acc>(p.scale);
  for (int i = threadIdx.x; i < BM * DP; i += kThreads) {
    const int r = i / DP, c = i % DP;
    if (r < mv && c < p.D) slab<T>(p.dq, b, h)[(q0 + r) * p.dq.st + c] = E::from_acc(sdQ[r * L::LDO + c] * scale);
  }
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------

Strided4 strided(const at::Tensor& t, bool broadcast_batch = false) {
  return Strided4{t.data_ptr(), broadcast_batch ? 0 : t.stride(0), t.stride(1), t.stride(2)};
}

// 16-byte vector loads are legal for t when its base and every row start are 16-byte aligned.
bool rows_aligned16(const at::Tensor& t) {
  const int64_t vec = 16 / t.element_size();
  return aligned16(t.data_ptr()) && (t.size(0) == 1 || t.stride(0) % vec == 0) &&
         (t.size(1) == 1 || t.stride(1) % vec == 0) && (t.size(2) == 1 || t.stride(2) % vec == 0);
}

bool can_vectorize(std::initializer_list<const at::Tensor*> ts, int64_t D, int64_t element_size) {
  if (D % (16 / element_size) != 0) return false;
  for (const at::Tensor* t : ts) {
    if (!rows_aligned16(*t)) return false;
  }
  return true;
}

// Opts the kernel into `bytes` of dynamic shared memory (needed above 48 KiB) after checking the
// device has that much per block.
template <typename Kernel>
void prepare_shared_memory(Kernel kernel, int bytes) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(static_cast<size_t>(bytes) <= prop->sharedMemPerBlockOptin, "prefix_attention: this kernel needs ", bytes,
              " bytes of shared memory per block but the device allows ", prop->sharedMemPerBlockOptin);
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  }
}

// Calls f(std::integral_constant<int, DP>) with DP the padded head dim: 32, 64 or 128.
template <typename F>
void with_padded_head_dim(int64_t D, F&& f) {
  if (D <= 32) {
    f(std::integral_constant<int, 32>{});
  } else if (D <= 64) {
    f(std::integral_constant<int, 64>{});
  } else {
    f(std::integral_constant<int, 128>{});
  }
}

// The kernels' own limits, after check_prefix_attention_inputs: a padded head dim of at most 128,
// B*H blocks in grid x, query tiles (of at least 16 rows) in grid y, 32-bit key indices j < Np + T,
// and the tensor cores of sm_80+ for float16/bfloat16.
void check_tiling(const char* op, const at::Tensor& q, const at::Tensor& k_prefix) {
  TORCH_CHECK(q.size(3) <= 128, op, ": the kernels' tiles hold head dims up to 128, got ", q.size(3));
  constexpr int64_t kMaxRows = 65535 * 16;
  TORCH_CHECK(q.size(0) * q.size(1) <= std::numeric_limits<int32_t>::max() && q.size(2) <= kMaxRows &&
                  k_prefix.size(2) <= kMaxRows,
              op, ": the kernels' grid needs B*H < 2^31 and T, Np <= ", kMaxRows, ", got sizes ", q.sizes(), " and ",
              k_prefix.sizes());
  if (q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16) {
    const cudaDeviceProp* prop = at::cuda::getDeviceProperties(q.get_device());
    TORCH_CHECK(prop->major >= 8, op, ": the ", q.scalar_type(), " kernels use sm_80+ tensor cores, device is sm_",
                prop->major, prop->minor);
  }
}

std::tuple<at::Tensor, at::Tensor> prefix_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, const at::Tensor& k_prefix,
                                                              const at::Tensor& v_prefix, double scale) {
  constexpr const char* op = "vapt::prefix_attention_fwd (CUDA)";
  check_prefix_attention_inputs(op, at::kCUDA, q, k, v, k_prefix, v_prefix);
  check_tiling(op, q, k_prefix);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Np = k_prefix.size(2);
  at::Tensor out = empty_bthd(q);
  at::Tensor lse = at::empty({B, H, T}, q.options().dtype(stats_dtype(q)));
  if (out.numel() == 0) {
    // No query, or D == 0 (all scores 0: lse = log(Np + T)).
    lse.fill_(std::log(static_cast<double>(Np + T)));
    return {out, lse};
  }

  const bool broadcast = k_prefix.size(0) == 1;
  FwdParams p{};
  p.q = strided(q);
  p.k = strided(k);
  p.v = strided(v);
  p.kp = strided(k_prefix, broadcast);
  p.vp = strided(v_prefix, broadcast);
  p.out = strided(out);
  p.lse = lse.data_ptr();
  p.heads = static_cast<int>(H);
  p.tokens = static_cast<int>(T);
  p.prompts = static_cast<int>(Np);
  p.D = static_cast<int>(D);
  p.scale = scale;
  p.vec = can_vectorize({&q, &k, &v, &k_prefix, &v_prefix}, D, q.element_size());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  VAPT_DISPATCH_CUDA_TYPES(q.scalar_type(), "prefix_attention_fwd_cuda", [&] {
    using T_ = typename CudaType<scalar_t>::type;
    with_padded_head_dim(D, [&](auto dp) {
      constexpr int DP = decltype(dp)::value;
      using L = FwdSmem<T_, DP>;
      auto kernel = prefix_attention_fwd_kernel<T_, DP>;
      prepare_shared_memory(kernel, L::kBytes);
      const dim3 grid(static_cast<unsigned>(B * H), static_cast<unsigned>(cdiv(p.tokens, L::BM)));
      kernel<<<grid, kThreads, L::kBytes, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_attention_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_prefix,
    const at::Tensor& v_prefix, const at::Tensor& out, const at::Tensor& lse_in, double scale) {
  constexpr const char* op = "vapt::prefix_attention_bwd (CUDA)";
  check_prefix_attention_inputs(op, at::kCUDA, q, k, v, k_prefix, v_prefix);
  check_prefix_attention_grads(op, q, dout, out, lse_in);
  check_tiling(op, q, k_prefix);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Np = k_prefix.size(2);
  const at::ScalarType stats = stats_dtype(q);
  const c10::cuda::CUDAGuard guard(q.device());

  at::Tensor dq = empty_bthd(q), dk = empty_bthd(q), dv = empty_bthd(q);
  if (dq.numel() == 0) {
    // No query or no channel: every gradient is empty or zero.
    return {dq, dk, dv, at::zeros(k_prefix.sizes(), q.options()), at::zeros(k_prefix.sizes(), q.options())};
  }
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor delta = at::empty({B, H, T}, q.options().dtype(stats));
  at::Tensor dkp_part = at::empty({B, H, Np, D}, q.options().dtype(stats));
  at::Tensor dvp_part = at::empty({B, H, Np, D}, q.options().dtype(stats));

  const bool broadcast = k_prefix.size(0) == 1;
  BwdParams p{};
  p.q = strided(q);
  p.k = strided(k);
  p.v = strided(v);
  p.kp = strided(k_prefix, broadcast);
  p.vp = strided(v_prefix, broadcast);
  p.dout = strided(dout);
  p.dq = strided(dq);
  p.dk = strided(dk);
  p.dv = strided(dv);
  p.lse = lse.data_ptr();
  p.delta = delta.data_ptr();
  p.dkp_part = dkp_part.data_ptr();
  p.dvp_part = dvp_part.data_ptr();
  p.heads = static_cast<int>(H);
  p.tokens = static_cast<int>(T);
  p.prompts = static_cast<int>(Np);
  p.D = static_cast<int>(D);
  p.scale = scale;
  p.vec = can_vectorize({&q, &k, &v, &k_prefix, &v_prefix, &dout}, D, q.element_size());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  VAPT_DISPATCH_CUDA_TYPES(q.scalar_type(), "prefix_attention_bwd_cuda", [&] {
    using T_ = typename CudaType<scalar_t>::type;
    using Acc = typename Elem<T_>::Acc;
    const int64_t rows = B * H * T;
    prefix_attention_delta_kernel<T_><<<static_cast<unsigned>((rows + kWarps - 1) / kWarps), kThreads, 0, stream>>>(
        strided(out), p.dout, static_cast<Acc*>(delta.data_ptr()), p.heads, p.tokens, p.D, rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    with_padded_head_dim(D, [&](auto dp) {
      constexpr int DP = decltype(dp)::value;
      using LKV = DkdvSmem<T_, DP>;
      auto dkdv = prefix_attention_dkdv_kernel<T_, DP>;
      prepare_shared_memory(dkdv, LKV::kBytes);
      const dim3 grid_kv(static_cast<unsigned>(B * H), static_cast<unsigned>(cdiv(p.prompts + p.tokens, LKV::BN)));
      dkdv<<<grid_kv, kThreads, LKV::kBytes, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();

      using LQ = DqSmem<T_, DP>;
      auto dqk = prefix_attention_dq_kernel<T_, DP>;
      prepare_shared_memory(dqk, LQ::kBytes);
      const dim3 grid_q(static_cast<unsigned>(B * H), static_cast<unsigned>(cdiv(p.tokens, LQ::BM)));
      dqk<<<grid_q, kThreads, LQ::kBytes, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });

  // Per-batch fp32 partials -> k_prefix's shape and dtype (batch sum when the prefix is broadcast).
  const auto finish = [&](const at::Tensor& part) {
    return (broadcast ? part.sum(0, /*keepdim=*/true) : part).to(q.scalar_type()).contiguous();
  };
  return {dq, dk, dv, finish(dkp_part), finish(dvp_part)};
}

}  // namespace

TORCH_LIBRARY_IMPL(vapt, CUDA, m) {
  m.impl("prefix_attention_fwd", &prefix_attention_fwd_cuda);
  m.impl("prefix_attention_bwd", &prefix_attention_bwd_cuda);
}

}  // namespace vapt
