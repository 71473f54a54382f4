// CPU kernels of vapt::prefix_attention_fwd / vapt::prefix_attention_bwd (schema: csrc/vapt.cpp).
//
// Softmax attention of the token queries over the key/value sequence [prefix ; tokens]:
//   q, k, v              (B, H, T, D)   any strides, unit last stride (views of a packed QKV)
//   k_prefix, v_prefix   (Bp, H, Np, D) Bp = B or 1 (broadcast; a batch stride of 0 also works)
//   out                  (B, H, T, D)   laid out as (B, T, H, D), input dtype
//   lse                  (B, H, T)      float32 (float64 for float64 inputs), natural log
//   backward: dq, dk, dv like out; dk_prefix, dv_prefix with k_prefix's shape, contiguous.
//
// Why it looks the way it does:
// * Flash-attention tiling, as in ATen's CPU flash attention: a work item owns a block of query
//   rows, computes its scores against a block of keys with one GEMM, does the softmax on the rows
//   of that block and multiplies by the values with a second GEMM. The prefix never meets the
//   tokens in memory: the first key block is [prefix ; first token block], its scores are written
//   by two GEMMs into adjacent columns of one scores buffer, and its values are applied by two
//   GEMMs into the same accumulator. Later token blocks (T > kBlockK) update a running max and
//   sum (online softmax) and rescale the accumulator.
// * Backward (FA2 without atomics) runs one (b, h) per work item: it owns every query and key of
//   that head, so dq, dk and dv are accumulated by GEMMs straight into their outputs (float and
//   double) or into float scratch (bfloat16). The prefix gradients of batch b go to a per-batch
//   partial (B, H, Np, D) that is summed over the batch afterwards when the prefix is broadcast,
//   so the result does not depend on the thread count.
// * GEMMs go to the BLAS that PyTorch itself calls (Fortran sgemm_/dgemm_, MKL in the x86 wheels,
//   exported by libtorch_cpu): at::native::cpublas::gemm is not exported from libtorch_cpu, so an
//   extension cannot call it. Where no BLAS symbol is found, the products go through at::addmm_
//   (same result, microseconds more per call). The row strides of q/k/v are the BLAS leading
//   dimensions, so the packed-QKV views are read in place.
// * The row-wise softmax parts (max, exp and sum, the softmax gradient) and the bfloat16
//   conversions use the vector types of simd.h: the loop over a thread's work items is compiled
//   once per ISA variant (baseline, AVX2, AVX-512) and simd::with_isa runs the one this CPU takes.
//   A libm exp per element would cost more than the GEMMs at ViT shapes.
// * Everything is accumulated in at::opmath_type (float for bfloat16).
// * Work is split with at::parallel_for. With PyTorch's OpenMP backend (the Linux wheels) that is
//   inline code in ATen/ParallelOpenMP.h, so this file must be compiled with -fopenmp to run on
//   more than one thread; a build without it gets a compiler warning.

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include "../common.h"
#include "simd.h"

#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#warning "prefix_attention_kernel.cpp compiled without -fopenmp: its at::parallel_for loops run on one thread"
#endif

// Fortran BLAS entry points (LP64, as PyTorch declares them). Weak: a PyTorch build that exports no
// BLAS leaves them null and the kernels use at::addmm_ instead.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace vapt {
namespace {

using at::Tensor;

// ---------------------------------------------------------------------------------------------
// GEMM on row-major matrices
// ---------------------------------------------------------------------------------------------

// C (M x N) = alpha * op(A) * op(B) + beta * C, all row-major with leading dimensions lda, ldb,
// ldc; op(A) is M x K, op(B) is K x N. A row-major matrix is its transpose in column-major order,
// so this is the column-major product C^T = op(B)^T op(A)^T with the operands swapped and the
// transpose flags unchanged. beta == 0 never reads C. M, N, K >= 1.
template <typename acc_t>
void gemm_rm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, acc_t alpha, const acc_t* A,
             int64_t lda, const acc_t* B, int64_t ldb, acc_t beta, acc_t* C, int64_t ldc) {
  const char ta = trans_b ? 'T' : 'N';
  const char tb = trans_a ? 'T' : 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  if constexpr (std::is_same_v<acc_t, float>) {
    if (sgemm_ != nullptr) {
      sgemm_(&ta, &tb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
      return;
    }
  } else {
    if (dgemm_ != nullptr) {
      dgemm_(&ta, &tb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
      return;
    }
  }
  // No BLAS symbol exported: the same product through ATen (more overhead per call).
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  Tensor a = at::from_blob(const_cast<acc_t*>(A), {trans_a ? K : M, trans_a ? M : K}, {lda, 1}, options);
  Tensor b = at::from_blob(const_cast<acc_t*>(B), {trans_b ? N : K, trans_b ? K : N}, {ldb, 1}, options);
  Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, options);
  c.addmm_(trans_a ? a.t() : a, trans_b ? b.t() : b, beta, alpha);
}

// ---------------------------------------------------------------------------------------------
// Row kernels of the softmax (kBytes-wide vectors, compiled into each ISA variant)
// ---------------------------------------------------------------------------------------------

template <int kBytes, typename T>
VAPT_ALWAYS_INLINE T row_max(const T* x, int64_t n) {
  using V = typename simd::Simd<T, kBytes>::V;
  constexpr int64_t L = simd::kLanes<V>;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  V m = simd::splat<V>(kNegInf);
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    m = simd::max(simd::load<V>(x + i), m);
  }
  if (i < n) {
    m = simd::max(simd::load<V>(x + i, n - i, kNegInf), m);
  }
  return simd::reduce_max(m);
}

// x <- exp(x - m) in place; returns the sum of the new values.
template <int kBytes, typename T>
VAPT_ALWAYS_INLINE T exp_sum(T* x, int64_t n, T m) {
  using V = typename simd::Simd<T, kBytes>::V;
  constexpr int64_t L = simd::kLanes<V>;
  V acc{};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    const V p = simd::exp(simd::load<V>(x + i) - m);
    simd::store(x + i, p);
    acc += p;
  }
  if (i < n) {
    // Padding lanes hold -inf, whose exp is 0.
    const V p = simd::exp(simd::load<V>(x + i, n - i, -std::numeric_limits<T>::infinity()) - m);
    simd::store(x + i, p, n - i);
    acc += p;
  }
  return simd::reduce_add(acc);
}

// Softmax backward of one row: s <- p = exp(s - lse), dp <- ds = p * (dp - delta).
template <int kBytes, typename T>
VAPT_ALWAYS_INLINE void softmax_grad(T* s, T* dp, int64_t n, T lse, T delta) {
  using V = typename simd::Simd<T, kBytes>::V;
  simd::for_chunks<V>(n, [&](int64_t i, int64_t len) VAPT_INLINE_LAMBDA {
    const V p = simd::exp(simd::load<V>(s + i, len) - lse);
    simd::store(s + i, p, len);
    simd::store(dp + i, p * (simd::load<V>(dp + i, len) - delta), len);
  });
}

template <int kBytes, typename T>
VAPT_ALWAYS_INLINE T dot(const T* a, const T* b, int64_t n) {
  using V = typename simd::Simd<T, kBytes>::V;
  V acc{};
  simd::for_chunks<V>(n, [&](int64_t i, int64_t len) VAPT_INLINE_LAMBDA {
    acc += simd::load<V>(a + i, len) * simd::load<V>(b + i, len);
  });
  return simd::reduce_add(acc);
}

template <typename T>
VAPT_ALWAYS_INLINE void scale_row(T* x, int64_t n, T c) {
  for (int64_t i = 0; i < n; ++i) {
    x[i] *= c;
  }
}

// dst[i] = src[i] * c in dst's dtype, i < n (src is scratch: it may be scaled in place).
template <int kBytes, typename acc_t, typename scalar_t>
VAPT_ALWAYS_INLINE void store_scaled_row(acc_t* src, acc_t c, scalar_t* dst, int64_t n) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    for (int64_t i = 0; i < n; ++i) {
      dst[i] = src[i] * c;
    }
  } else {
    scale_row(src, n, c);
    simd::convert<kBytes>(src, dst, n);
  }
}

// ---------------------------------------------------------------------------------------------
// Operands
// ---------------------------------------------------------------------------------------------

// Query and key blocking. A scores row holds at most Np + kBlockK keys (the first key block also
// holds the prefix). Large query blocks make large GEMMs and few of the small prefix products
// (at ViT-S shapes one block of 197 rows beat 64-row blocks by 5-8% in the forward pass); the
// forward pass splits T into more (equal) blocks only to give every thread several work items.
// The backward pass runs whole heads, its query blocks only bound the scratch size.
constexpr int64_t kMaxBlockQ = 256;
constexpr int64_t kMinBlockQ = 32;
constexpr int64_t kBlockQBwd = 256;
constexpr int64_t kBlockK = 512;

int64_t div_up(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Number of forward query blocks: as few as possible, but >= 4 work items per thread while the
// blocks keep >= kMinBlockQ rows.
int64_t forward_query_blocks(int64_t T, int64_t heads) {
  int64_t n = div_up(T, kMaxBlockQ);
  const int64_t wanted = 4 * static_cast<int64_t>(at::get_num_threads());
  while (heads * n < wanted && div_up(T, n + 1) >= kMinBlockQ) {
    ++n;
  }
  return n;
}

// A (rows x D) matrix of an operand in the accumulation type: the operand itself when its dtype is
// the accumulation type (ld = its row stride), else a converted copy in scratch (ld = D).
template <int kBytes, typename scalar_t, typename acc_t>
VAPT_ALWAYS_INLINE const acc_t* as_acc(const scalar_t* src, int64_t ld, int64_t rows, int64_t D, acc_t* scratch,
                                       int64_t& ld_out) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    ld_out = ld;
    return src;
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      simd::convert<kBytes>(src + r * ld, scratch + r * D, D);
    }
    ld_out = D;
    return scratch;
  }
}

// Scores of the rows against the np prefix keys, alpha * Q Kp^T, into columns [0, np) of S (ld
// ldS). MKL reads a strided Q (the packed-QKV view) slowly when the product is only np wide, so
// the transposed product Kp Q^T (Q now the large operand, which the BLAS packs) goes to the
// scratch St (np x rows) and is transposed into place.
template <typename acc_t>
void prefix_scores(int64_t rows, int64_t np, int64_t D, acc_t alpha, const acc_t* Q, int64_t ldq, const acc_t* Kp,
                   int64_t ldkp, acc_t* St, acc_t* S, int64_t ldS) {
  gemm_rm<acc_t>(false, true, np, rows, D, alpha, Kp, ldkp, Q, ldq, 0, St, rows);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < np; ++j) {
      S[r * ldS + j] = St[j * rows + r];
    }
  }
}

// dst (rows x D, ld_dst) = src (rows x D, ld_src) in dst's dtype.
template <int kBytes, typename acc_t, typename scalar_t>
VAPT_ALWAYS_INLINE void store_rows(const acc_t* src, int64_t ld_src, int64_t rows, int64_t D, scalar_t* dst,
                                   int64_t ld_dst) {
  for (int64_t r = 0; r < rows; ++r) {
    simd::convert<kBytes>(src + r * ld_src, dst + r * ld_dst, D);
  }
}

// Strides of a (batch, H, rows, D) operand in elements: batch (0 when broadcast), head, row.
struct Strides {
  int64_t sb, sh, sr;
};

// A BLAS leading dimension must be >= D. Rows closer than D apart only occur in views with
// overlapping rows (a stride-0 expand over the rows); those are copied.
Tensor rows_for_blas(const Tensor& t) {
  const int64_t rows = t.size(2), D = t.size(3);
  return rows > 1 && t.stride(2) < D ? t.contiguous() : t;
}

Strides strides_of(const Tensor& t) {
  const int64_t rows = t.size(2), D = t.size(3);
  return {t.size(0) == 1 ? 0 : t.stride(0), t.stride(1), rows > 1 ? t.stride(2) : D};
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

template <typename scalar_t>
void prefix_attention_fwd_kernel(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& k_prefix,
                                 const Tensor& v_prefix, double scale, const Tensor& out, const Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Np = k_prefix.size(2);
  const Strides lq = strides_of(q), lk = strides_of(k), lv = strides_of(v);
  const Strides lkp = strides_of(k_prefix), lvp = strides_of(v_prefix);
  const int64_t ld_out = H * D;  // out is (B, T, H, D) in memory

  const int64_t n_qblocks = forward_query_blocks(T, B * H);
  const int64_t BQ = div_up(T, n_qblocks);
  const int64_t BK = std::min(T, kBlockK);
  const int64_t n_kblocks = div_up(T, BK);
  const int64_t W = Np + BK;  // row stride of the scores buffer
  const acc_t alpha = static_cast<acc_t>(scale);

  const scalar_t* q_data = q.const_data_ptr<scalar_t>();
  const scalar_t* k_data = k.const_data_ptr<scalar_t>();
  const scalar_t* v_data = v.const_data_ptr<scalar_t>();
  const scalar_t* kp_data = k_prefix.const_data_ptr<scalar_t>();
  const scalar_t* vp_data = v_prefix.const_data_ptr<scalar_t>();
  scalar_t* out_data = out.data_ptr<scalar_t>();
  acc_t* lse_data = lse.data_ptr<acc_t>();

  at::parallel_for(0, B * H * n_qblocks, 1, [&](int64_t begin, int64_t end) {
    // Scratch of this thread's range: scores (and transposed prefix scores), output accumulator,
    // running max and sum, and for bfloat16 float copies of the query block and of one key
    // block's keys and values.
    const int64_t conv = kSameType ? 0 : (BQ + 2 * W) * D;
    Tensor buf = at::empty({BQ * W + Np * BQ + BQ * D + 2 * BQ + conv},
                           q.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    acc_t* S = buf.data_ptr<acc_t>();
    acc_t* St = S + BQ * W;
    acc_t* acc = St + Np * BQ;
    acc_t* row_m = acc + BQ * D;
    acc_t* row_l = row_m + BQ;
    acc_t* q_conv = row_l + BQ;
    acc_t* k_conv = q_conv + BQ * D;
    acc_t* v_conv = k_conv + W * D;

    simd::with_isa([&](auto isa) VAPT_INLINE_LAMBDA {
      constexpr int kBytes = decltype(isa)::kBytes;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t qb = item % n_qblocks, bh = item / n_qblocks, b = bh / H, h = bh % H;
        const int64_t m0 = qb * BQ, rows = std::min(BQ, T - m0);
        int64_t ldq;
        const acc_t* Q = as_acc<kBytes>(q_data + b * lq.sb + h * lq.sh + m0 * lq.sr, lq.sr, rows, D, q_conv, ldq);

        for (int64_t kb = 0; kb < n_kblocks; ++kb) {
          const int64_t n0 = kb * BK, nk = std::min(BK, T - n0);
          const int64_t np = kb == 0 ? Np : 0;  // the prefix keys lead the first key block
          const int64_t width = np + nk;
          int64_t ldkp = D, ldvp = D, ldk, ldv;
          const acc_t* Kp = nullptr;
          const acc_t* Vp = nullptr;
          if (np > 0) {
            Kp = as_acc<kBytes>(kp_data + b * lkp.sb + h * lkp.sh, lkp.sr, np, D, k_conv, ldkp);
            Vp = as_acc<kBytes>(vp_data + b * lvp.sb + h * lvp.sh, lvp.sr, np, D, v_conv, ldvp);
          }
          const acc_t* K =
              as_acc<kBytes>(k_data + b * lk.sb + h * lk.sh + n0 * lk.sr, lk.sr, nk, D, k_conv + np * D, ldk);
          const acc_t* V =
              as_acc<kBytes>(v_data + b * lv.sb + h * lv.sh + n0 * lv.sr, lv.sr, nk, D, v_conv + np * D, ldv);

          // Scaled scores of the block: columns [0, np) prefix, [np, width) tokens.
          if (np > 0) {
            prefix_scores(rows, np, D, alpha, Q, ldq, Kp, ldkp, St, S, W);
          }
          gemm_rm<acc_t>(false, true, rows, nk, D, alpha, Q, ldq, K, ldk, 0, S + np, W);

          for (int64_t r = 0; r < rows; ++r) {
            acc_t* s = S + r * W;
            const acc_t block_max = row_max<kBytes>(s, width);
            if (kb == 0) {
              row_m[r] = block_max;
              row_l[r] = exp_sum<kBytes>(s, width, block_max);
            } else {
              // Online softmax: rescale the sum and the accumulator to the new running max.
              const acc_t m_new = std::max(row_m[r], block_max);
              const acc_t correction = std::exp(row_m[r] - m_new);
              row_l[r] = row_l[r] * correction + exp_sum<kBytes>(s, width, m_new);
              row_m[r] = m_new;
              scale_row(acc + r * D, D, correction);
            }
          }

          // acc (+)= P V; the first product of the first block initialises acc.
          if (np > 0) {
            gemm_rm<acc_t>(false, false, rows, D, np, 1, S, W, Vp, ldvp, 0, acc, D);
          }
          gemm_rm<acc_t>(false, false, rows, D, nk, 1, S + np, W, V, ldv, (kb == 0 && np == 0) ? 0 : 1, acc, D);
        }

        scalar_t* o = out_data + (b * T + m0) * ld_out + h * D;
        acc_t* l = lse_data + bh * T + m0;
        for (int64_t r = 0; r < rows; ++r) {
          store_scaled_row<kBytes>(acc + r * D, acc_t(1) / row_l[r], o + r * ld_out, D);
          l[r] = row_m[r] + std::log(row_l[r]);
        }
      }
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

template <typename scalar_t>
void prefix_attention_bwd_kernel(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                 const Tensor& k_prefix, const Tensor& v_prefix, const Tensor& out,
                                 const Tensor& lse, double scale, const Tensor& dq, const Tensor& dk,
                                 const Tensor& dv, const Tensor& dkp_partial, const Tensor& dvp_partial) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Np = k_prefix.size(2);
  const Strides lq = strides_of(q), lk = strides_of(k), lv = strides_of(v);
  const Strides ldo = strides_of(dout), lo = strides_of(out);
  const Strides lkp = strides_of(k_prefix), lvp = strides_of(v_prefix);
  const int64_t ld_grad = H * D;  // dq, dk, dv are (B, T, H, D) in memory
  const int64_t lse_sb = lse.stride(0), lse_sh = lse.stride(1), lse_st = lse.stride(2);

  const int64_t n_qblocks = div_up(T, kBlockQBwd);
  const int64_t BQ = div_up(T, n_qblocks);
  const int64_t BK = std::min(T, kBlockK);
  const int64_t n_kblocks = div_up(T, BK);
  const int64_t W = Np + BK;
  const acc_t alpha = static_cast<acc_t>(scale);

  const scalar_t* q_data = q.const_data_ptr<scalar_t>();
  const scalar_t* k_data = k.const_data_ptr<scalar_t>();
  const scalar_t* v_data = v.const_data_ptr<scalar_t>();
  const scalar_t* kp_data = k_prefix.const_data_ptr<scalar_t>();
  const scalar_t* vp_data = v_prefix.const_data_ptr<scalar_t>();
  const scalar_t* do_data = dout.const_data_ptr<scalar_t>();
  const scalar_t* o_data = out.const_data_ptr<scalar_t>();
  const acc_t* lse_data = lse.const_data_ptr<acc_t>();
  scalar_t* dq_data = dq.data_ptr<scalar_t>();
  scalar_t* dk_data = dk.data_ptr<scalar_t>();
  scalar_t* dv_data = dv.data_ptr<scalar_t>();
  acc_t* dkp_data = Np > 0 ? dkp_partial.data_ptr<acc_t>() : nullptr;
  acc_t* dvp_data = Np > 0 ? dvp_partial.data_ptr<acc_t>() : nullptr;

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    // Scratch of this thread's range: probabilities / dscores of one (query block, key block),
    // transposed prefix scores, delta of the query block; for bfloat16 float copies of the head's
    // q, k, v, dout and prefix and of one block of out, and float accumulators of dq (block) and
    // dk, dv (head).
    const int64_t conv = kSameType ? 0 : (6 * T + 2 * Np + 2 * BQ) * D;
    Tensor buf = at::empty({2 * BQ * W + Np * BQ + BQ + conv},
                           q.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    acc_t* P = buf.data_ptr<acc_t>();
    acc_t* dS = P + BQ * W;
    acc_t* St = dS + BQ * W;
    acc_t* delta = St + Np * BQ;
    acc_t* q_conv = delta + BQ;
    acc_t* k_conv = q_conv + T * D;
    acc_t* v_conv = k_conv + T * D;
    acc_t* do_conv = v_conv + T * D;
    acc_t* kp_conv = do_conv + T * D;
    acc_t* vp_conv = kp_conv + Np * D;
    acc_t* o_conv = vp_conv + Np * D;
    acc_t* dq_acc = o_conv + BQ * D;
    acc_t* dk_acc = dq_acc + BQ * D;
    acc_t* dv_acc = dk_acc + T * D;

    simd::with_isa([&](auto isa) VAPT_INLINE_LAMBDA {
      constexpr int kBytes = decltype(isa)::kBytes;
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        int64_t ldq, ldk, ldv, lddo, ldkp = D, ldvp = D;
        const acc_t* Q = as_acc<kBytes>(q_data + b * lq.sb + h * lq.sh, lq.sr, T, D, q_conv, ldq);
        const acc_t* K = as_acc<kBytes>(k_data + b * lk.sb + h * lk.sh, lk.sr, T, D, k_conv, ldk);
        const acc_t* V = as_acc<kBytes>(v_data + b * lv.sb + h * lv.sh, lv.sr, T, D, v_conv, ldv);
        const acc_t* dO = as_acc<kBytes>(do_data + b * ldo.sb + h * ldo.sh, ldo.sr, T, D, do_conv, lddo);
        const acc_t* Kp = nullptr;
        const acc_t* Vp = nullptr;
        acc_t* dKp = nullptr;
        acc_t* dVp = nullptr;
        if (Np > 0) {
          Kp = as_acc<kBytes>(kp_data + b * lkp.sb + h * lkp.sh, lkp.sr, Np, D, kp_conv, ldkp);
          Vp = as_acc<kBytes>(vp_data + b * lvp.sb + h * lvp.sh, lvp.sr, Np, D, vp_conv, ldvp);
          dKp = dkp_data + bh * Np * D;
          dVp = dvp_data + bh * Np * D;
        }
        // dk and dv of the head: accumulated in place when the dtype allows it.
        acc_t* dK;
        acc_t* dV;
        int64_t lddk;
        if constexpr (kSameType) {
          dK = dk_data + b * T * ld_grad + h * D;
          dV = dv_data + b * T * ld_grad + h * D;
          lddk = ld_grad;
        } else {
          dK = dk_acc;
          dV = dv_acc;
          lddk = D;
        }

        for (int64_t qb = 0; qb < n_qblocks; ++qb) {
          const int64_t m0 = qb * BQ, rows = std::min(BQ, T - m0);
          const acc_t* Qb = Q + m0 * ldq;
          const acc_t* dOb = dO + m0 * lddo;
          const acc_t beta_kv = qb == 0 ? 0 : 1;  // the first query block initialises dk, dv
          const acc_t* lse_b = lse_data + b * lse_sb + h * lse_sh + m0 * lse_st;

          // delta_i = dout_i . out_i
          int64_t ldob;
          const acc_t* Ob = as_acc<kBytes>(o_data + b * lo.sb + h * lo.sh + m0 * lo.sr, lo.sr, rows, D, o_conv, ldob);
          for (int64_t r = 0; r < rows; ++r) {
            delta[r] = dot<kBytes>(dOb + r * lddo, Ob + r * ldob, D);
          }

          acc_t* dQ;
          int64_t lddq;
          if constexpr (kSameType) {
            dQ = dq_data + (b * T + m0) * ld_grad + h * D;
            lddq = ld_grad;
          } else {
            dQ = dq_acc;
            lddq = D;
          }

          for (int64_t kb = 0; kb < n_kblocks; ++kb) {
            const int64_t n0 = kb * BK, nk = std::min(BK, T - n0);
            const int64_t np = kb == 0 ? Np : 0;
            const int64_t width = np + nk;
            const acc_t* Kb = K + n0 * ldk;
            const acc_t* Vb = V + n0 * ldv;

            // Scaled scores and dP = dout V^T of the block: columns [0, np) prefix, [np, width) tokens.
            if (np > 0) {
              prefix_scores<acc_t>(rows, np, D, alpha, Qb, ldq, Kp, ldkp, St, P, W);
              prefix_scores<acc_t>(rows, np, D, 1, dOb, lddo, Vp, ldvp, St, dS, W);
            }
            gemm_rm<acc_t>(false, true, rows, nk, D, alpha, Qb, ldq, Kb, ldk, 0, P + np, W);
            gemm_rm<acc_t>(false, true, rows, nk, D, 1, dOb, lddo, Vb, ldv, 0, dS + np, W);
            for (int64_t r = 0; r < rows; ++r) {
              softmax_grad<kBytes>(P + r * W, dS + r * W, width, lse_b[r * lse_st], delta[r]);
            }

            // dv_j (+)= sum_i p_ij dout_i ; dk_j (+)= scale sum_i ds_ij q_i
            if (np > 0) {
              gemm_rm<acc_t>(true, false, np, D, rows, 1, P, W, dOb, lddo, beta_kv, dVp, D);
              gemm_rm<acc_t>(true, false, np, D, rows, alpha, dS, W, Qb, ldq, beta_kv, dKp, D);
            }
            gemm_rm<acc_t>(true, false, nk, D, rows, 1, P + np, W, dOb, lddo, beta_kv, dV + n0 * lddk, lddk);
            gemm_rm<acc_t>(true, false, nk, D, rows, alpha, dS + np, W, Qb, ldq, beta_kv, dK + n0 * lddk, lddk);
            // dq_i (+)= scale sum_j ds_ij k_j; the first product initialises dq.
            if (np > 0) {
              gemm_rm<acc_t>(false, false, rows, D, np, alpha, dS, W, Kp, ldkp, 0, dQ, lddq);
            }
            gemm_rm<acc_t>(false, false, rows, D, nk, alpha, dS + np, W, Kb, ldk, (kb == 0 && np == 0) ? 0 : 1, dQ,
                           lddq);
          }
          if constexpr (!kSameType) {
            store_rows<kBytes>(dq_acc, D, rows, D, dq_data + (b * T + m0) * ld_grad + h * D, ld_grad);
          }
        }
        if constexpr (!kSameType) {
          store_rows<kBytes>(dk_acc, D, T, D, dk_data + b * T * ld_grad + h * D, ld_grad);
          store_rows<kBytes>(dv_acc, D, T, D, dv_data + b * T * ld_grad + h * D, ld_grad);
        }
      }
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> prefix_attention_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                                    const Tensor& k_prefix, const Tensor& v_prefix, double scale) {
  check_prefix_attention_inputs("vapt::prefix_attention_fwd (CPU)", at::kCPU, q, k, v, k_prefix, v_prefix);
  Tensor out = empty_bthd(q);
  Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(stats_dtype(q)));
  if (out.numel() == 0) {
    // No query, or D == 0 (all scores 0: lse = log(Np + T)).
    lse.fill_(std::log(static_cast<double>(k_prefix.size(2) + q.size(2))));
    return {out, lse};
  }
  VAPT_DISPATCH_CPU_TYPES(q.scalar_type(), "prefix_attention_fwd_cpu", [&] {
    prefix_attention_fwd_kernel<scalar_t>(rows_for_blas(q), rows_for_blas(k), rows_for_blas(v),
                                          rows_for_blas(k_prefix), rows_for_blas(v_prefix), scale, out, lse);
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> prefix_attention_bwd_cpu(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& k_prefix,
    const Tensor& v_prefix, const Tensor& out, const Tensor& lse, double scale) {
  constexpr const char* op = "vapt::prefix_attention_bwd (CPU)";
  check_prefix_attention_inputs(op, at::kCPU, q, k, v, k_prefix, v_prefix);
  check_prefix_attention_grads(op, q, dout, out, lse);

  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Bp = k_prefix.size(0), Np = k_prefix.size(2);
  Tensor dq = empty_bthd(q), dk = empty_bthd(q), dv = empty_bthd(q);
  if (dq.numel() == 0) {
    // No query or no channel: the prefix receives no gradient.
    return {dq, dk, dv, at::zeros(k_prefix.sizes(), q.options()), at::zeros(k_prefix.sizes(), q.options())};
  }
  const auto acc_type = stats_dtype(q);
  // Per-batch prefix gradients in the accumulation type; with a prefix of batch B in that type they
  // are the outputs themselves.
  const bool direct = Bp == B && acc_type == q.scalar_type();
  Tensor dkp_partial = at::empty({B, H, Np, D}, q.options().dtype(acc_type));
  Tensor dvp_partial = at::empty({B, H, Np, D}, q.options().dtype(acc_type));
  VAPT_DISPATCH_CPU_TYPES(q.scalar_type(), "prefix_attention_bwd_cpu", [&] {
    prefix_attention_bwd_kernel<scalar_t>(rows_for_blas(dout), rows_for_blas(q), rows_for_blas(k), rows_for_blas(v),
                                          rows_for_blas(k_prefix), rows_for_blas(v_prefix), rows_for_blas(out), lse,
                                          scale, dq, dk, dv, dkp_partial, dvp_partial);
  });
  if (direct) {
    return {dq, dk, dv, dkp_partial, dvp_partial};
  }
  // Broadcast prefix: the sum of the per-batch partials, in a fixed order.
  if (Bp != B) {
    dkp_partial = dkp_partial.sum(0, /*keepdim=*/true);
    dvp_partial = dvp_partial.sum(0, /*keepdim=*/true);
  }
  return {dq, dk, dv, dkp_partial.to(q.scalar_type()), dvp_partial.to(q.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(vapt, CPU, m) {
  m.impl("prefix_attention_fwd", &prefix_attention_fwd_cpu);
  m.impl("prefix_attention_bwd", &prefix_attention_bwd_cpu);
}

}  // namespace vapt
