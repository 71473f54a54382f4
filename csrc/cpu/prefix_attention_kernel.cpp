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
//   sum (online softmax) and rescale the accumulator (fwd_query_block, fwd_key_block).
// * Backward (FA2 without atomics) runs one (b, h) per work item (bwd_head, then bwd_query_block
//   and bwd_key_block): it owns every query and key of that head, so dq, dk and dv are accumulated
//   by GEMMs straight into their outputs (float and double) or into float scratch (bfloat16). The
//   prefix gradients of batch b go to a per-batch partial (B, H, Np, D) that is summed over the
//   batch afterwards when the prefix is broadcast, so the result does not depend on the thread
//   count.
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
// * Work is split with at::parallel_for (parallel_items, parallel.h). With PyTorch's OpenMP backend
//   (the Linux wheels) that is inline code in ATen/ParallelOpenMP.h, so this file must be compiled
//   with -fopenmp to run on more than one thread; a build without it gets a compiler warning.

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
#include "parallel.h"
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

// Keys [n0, n0 + nk) of the tokens, after the np prefix keys (np = Np in the first key block, else
// 0): the columns [0, width) of a scores row, the prefix first.
struct KeyBlock {
  int64_t n0, nk, np, width;
};

// The query and key blocks of a head: n_qblocks blocks of BQ query rows (the last one shorter) and
// n_kblocks blocks of BK token keys; W = Np + BK is the row stride of the scores buffers.
struct Blocking {
  int64_t T, Np, n_qblocks, BQ, BK, n_kblocks, W;
  Blocking(int64_t T_, int64_t Np_, int64_t query_blocks)
      : T(T_), Np(Np_), n_qblocks(query_blocks), BQ(div_up(T_, query_blocks)), BK(std::min(T_, kBlockK)),
        n_kblocks(div_up(T_, BK)), W(Np_ + BK) {}
  int64_t rows(int64_t m0) const { return std::min(BQ, T - m0); }  // of the query block at row m0
  KeyBlock key_block(int64_t kb) const {
    const int64_t n0 = kb * BK, nk = std::min(BK, T - n0), np = kb == 0 ? Np : 0;
    return {n0, nk, np, np + nk};
  }
};

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

// A (batch, H, rows, D) input: its data and strides.
template <typename scalar_t>
struct Operand {
  const scalar_t* data;
  Strides s;
  explicit Operand(const Tensor& t) : data(t.const_data_ptr<scalar_t>()), s(strides_of(t)) {}
  const scalar_t* row(int64_t b, int64_t h, int64_t r) const { return data + b * s.sb + h * s.sh + r * s.sr; }
};

// Rows [r0, r0 + rows) of x at image b, head h as a (rows x D) matrix in the accumulation type: the
// operand itself when its dtype is the accumulation type (ld = its row stride), else a converted
// copy in scratch (ld = D).
template <int kBytes, typename scalar_t, typename acc_t>
VAPT_ALWAYS_INLINE const acc_t* as_acc(const Operand<scalar_t>& x, int64_t b, int64_t h, int64_t r0, int64_t rows,
                                       int64_t D, acc_t* scratch, int64_t& ld_out) {
  const scalar_t* src = x.row(b, h, r0);
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    ld_out = x.s.sr;
    return src;
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      simd::convert<kBytes>(src + r * x.s.sr, scratch + r * D, D);
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

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

// The forward scratch of a thread's range of work items (query blocks), in the accumulation type
// (parallel.h). Buffers of the bfloat16 conversions (`convert`) are empty for float and double.
template <typename acc_t>
struct FwdScratch {
  using Element = acc_t;
  acc_t* S;             // scores of the query block against a key block (BQ x W)
  acc_t* St;            // transposed prefix scores (Np x BQ)
  acc_t* acc;           // the output accumulator (BQ x D)
  acc_t *row_m, *row_l;  // running max and sum of each row (BQ)
  acc_t* q_conv;        // the query block (BQ x D)
  acc_t *k_conv, *v_conv;  // one key block's keys and values, prefix first (W x D each)
  int64_t size;
  FwdScratch(Carver<acc_t> c, const Blocking& bl, int64_t D, bool convert)
      : S(c.take(bl.BQ * bl.W)), St(c.take(bl.Np * bl.BQ)), acc(c.take(bl.BQ * D)), row_m(c.take(bl.BQ)),
        row_l(c.take(bl.BQ)), q_conv(c.take(convert ? bl.BQ * D : 0)), k_conv(c.take(convert ? bl.W * D : 0)),
        v_conv(c.take(convert ? bl.W * D : 0)), size(c.used()) {}
};

// What the forward work items read and write.
template <typename scalar_t>
struct FwdArgs {
  using acc_t = at::opmath_type<scalar_t>;
  Operand<scalar_t> q, k, v, kp, vp;
  scalar_t* out;  // (B, T, H, D) in memory
  acc_t* lse;     // (B, H, T), contiguous
  int64_t H, D;
  acc_t alpha;  // the scale
};

// Key block kb of the query block Q (rows x D, ld ldq) of image b, head h: its scaled scores, the
// online softmax (a running max and sum per row, the accumulator rescaled to a new max), and
// acc (+)= P V.
template <int kBytes, typename scalar_t>
VAPT_ALWAYS_INLINE void fwd_key_block(const FwdArgs<scalar_t>& a, const Blocking& bl, int64_t b, int64_t h,
                                      int64_t kb, const at::opmath_type<scalar_t>* Q, int64_t ldq, int64_t rows,
                                      const FwdScratch<at::opmath_type<scalar_t>>& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = a.D, W = bl.W;
  const KeyBlock key = bl.key_block(kb);  // the prefix keys lead the first key block
  int64_t ldkp = D, ldvp = D, ldk, ldv;
  const acc_t* Kp = nullptr;
  const acc_t* Vp = nullptr;
  if (key.np > 0) {
    Kp = as_acc<kBytes>(a.kp, b, h, 0, key.np, D, s.k_conv, ldkp);
    Vp = as_acc<kBytes>(a.vp, b, h, 0, key.np, D, s.v_conv, ldvp);
  }
  const acc_t* K = as_acc<kBytes>(a.k, b, h, key.n0, key.nk, D, s.k_conv + key.np * D, ldk);
  const acc_t* V = as_acc<kBytes>(a.v, b, h, key.n0, key.nk, D, s.v_conv + key.np * D, ldv);

  // Scaled scores of the block: columns [0, np) prefix, [np, width) tokens.
  if (key.np > 0) {
    prefix_scores(rows, key.np, D, a.alpha, Q, ldq, Kp, ldkp, s.St, s.S, W);
  }
  gemm_rm<acc_t>(false, true, rows, key.nk, D, a.alpha, Q, ldq, K, ldk, 0, s.S + key.np, W);

  for (int64_t r = 0; r < rows; ++r) {
    acc_t* row = s.S + r * W;
    const acc_t block_max = row_max<kBytes>(row, key.width);
    if (kb == 0) {
      s.row_m[r] = block_max;
      s.row_l[r] = exp_sum<kBytes>(row, key.width, block_max);
    } else {
      // Online softmax: rescale the sum and the accumulator to the new running max.
      const acc_t m_new = std::max(s.row_m[r], block_max);
      const acc_t correction = std::exp(s.row_m[r] - m_new);
      s.row_l[r] = s.row_l[r] * correction + exp_sum<kBytes>(row, key.width, m_new);
      s.row_m[r] = m_new;
      scale_row(s.acc + r * D, D, correction);
    }
  }

  // acc (+)= P V; the first product of the first block initialises acc.
  if (key.np > 0) {
    gemm_rm<acc_t>(false, false, rows, D, key.np, 1, s.S, W, Vp, ldvp, 0, s.acc, D);
  }
  gemm_rm<acc_t>(false, false, rows, D, key.nk, 1, s.S + key.np, W, V, ldv, (kb == 0 && key.np == 0) ? 0 : 1,
                 s.acc, D);
}

// Work item `item` of the forward pass: query block qb of (b, h), over all key blocks, then its
// out rows and lse.
template <int kBytes, typename scalar_t>
VAPT_ALWAYS_INLINE void fwd_query_block(const FwdArgs<scalar_t>& a, const Blocking& bl, int64_t item,
                                        const FwdScratch<at::opmath_type<scalar_t>>& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = a.D, T = bl.T, ld_out = a.H * D;
  const int64_t qb = item % bl.n_qblocks, bh = item / bl.n_qblocks, b = bh / a.H, h = bh % a.H;
  const int64_t m0 = qb * bl.BQ, rows = bl.rows(m0);
  int64_t ldq;
  const acc_t* Q = as_acc<kBytes>(a.q, b, h, m0, rows, D, s.q_conv, ldq);
  for (int64_t kb = 0; kb < bl.n_kblocks; ++kb) {
    fwd_key_block<kBytes>(a, bl, b, h, kb, Q, ldq, rows, s);
  }
  scalar_t* o = a.out + (b * T + m0) * ld_out + h * D;
  acc_t* l = a.lse + bh * T + m0;
  for (int64_t r = 0; r < rows; ++r) {
    store_scaled_row<kBytes>(s.acc + r * D, acc_t(1) / s.row_l[r], o + r * ld_out, D);
    l[r] = s.row_m[r] + std::log(s.row_l[r]);
  }
}

template <typename scalar_t>
void prefix_attention_fwd_kernel(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& k_prefix,
                                 const Tensor& v_prefix, double scale, const Tensor& out, const Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  const Blocking bl(T, k_prefix.size(2), forward_query_blocks(T, B * H));
  const FwdArgs<scalar_t> a{.q = Operand<scalar_t>(q), .k = Operand<scalar_t>(k), .v = Operand<scalar_t>(v),
                            .kp = Operand<scalar_t>(k_prefix), .vp = Operand<scalar_t>(v_prefix),
                            .out = out.data_ptr<scalar_t>(), .lse = lse.data_ptr<acc_t>(),
                            .H = H, .D = D, .alpha = static_cast<acc_t>(scale)};
  constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;

  parallel_items(
      B * H * bl.n_qblocks, [&] { return TensorScratch<FwdScratch<acc_t>>(q, bl, D, kConvert); },
      [&](auto isa, int64_t item, const FwdScratch<acc_t>& s) VAPT_INLINE_LAMBDA {
        fwd_query_block<decltype(isa)::kBytes>(a, bl, item, s);
      });
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// The backward scratch of a thread's range of work items (heads), in the accumulation type
// (parallel.h). Buffers of the bfloat16 conversions (`convert`) are empty for float and double.
template <typename acc_t>
struct BwdScratch {
  using Element = acc_t;
  acc_t *P, *dS;  // probabilities and dscores of one (query block, key block) (BQ x W each)
  acc_t* St;      // transposed prefix scores (Np x BQ)
  acc_t* delta;   // dout . out of the query block's rows (BQ)
  acc_t *q_conv, *k_conv, *v_conv, *do_conv;  // the head's q, k, v, dout (T x D each)
  acc_t *kp_conv, *vp_conv;                   // the head's prefix (Np x D each)
  acc_t* o_conv;                              // one query block of out (BQ x D)
  acc_t* dq_acc;                              // the query block's dq accumulator (BQ x D)
  acc_t *dk_acc, *dv_acc;                     // the head's dk, dv accumulators (T x D each)
  int64_t size;
  BwdScratch(Carver<acc_t> c, const Blocking& bl, int64_t D, bool convert)
      : P(c.take(bl.BQ * bl.W)), dS(c.take(bl.BQ * bl.W)), St(c.take(bl.Np * bl.BQ)), delta(c.take(bl.BQ)),
        q_conv(c.take(convert ? bl.T * D : 0)), k_conv(c.take(convert ? bl.T * D : 0)),
        v_conv(c.take(convert ? bl.T * D : 0)), do_conv(c.take(convert ? bl.T * D : 0)),
        kp_conv(c.take(convert ? bl.Np * D : 0)), vp_conv(c.take(convert ? bl.Np * D : 0)),
        o_conv(c.take(convert ? bl.BQ * D : 0)), dq_acc(c.take(convert ? bl.BQ * D : 0)),
        dk_acc(c.take(convert ? bl.T * D : 0)), dv_acc(c.take(convert ? bl.T * D : 0)), size(c.used()) {}
};

// What the backward work items read and write.
template <typename scalar_t>
struct BwdArgs {
  using acc_t = at::opmath_type<scalar_t>;
  Operand<scalar_t> q, k, v, kp, vp, dout, out;
  const acc_t* lse;  // (B, H, T), strides lse_sb, lse_sh, lse_st
  int64_t lse_sb, lse_sh, lse_st;
  scalar_t *dq, *dk, *dv;  // (B, T, H, D) in memory
  acc_t *dkp, *dvp;        // (B, H, Np, D) per-image prefix partials, contiguous (null when Np == 0)
  int64_t H, D;
  acc_t alpha;  // the scale
};

// One head's operands in the accumulation type (matrix, leading dimension) and where its dk, dv
// and prefix gradients accumulate.
template <typename acc_t>
struct BwdHead {
  const acc_t *Q, *K, *V, *dO;  // (T x D)
  int64_t ldq, ldk, ldv, lddo;
  const acc_t *Kp = nullptr, *Vp = nullptr;  // (Np x D)
  int64_t ldkp, ldvp;
  acc_t *dK, *dV;  // (T x D), ld lddk: the outputs themselves when the dtype allows it, else scratch
  int64_t lddk;
  acc_t *dKp = nullptr, *dVp = nullptr;  // (Np x D), ld D: this (b, h)'s prefix partials
};

// The operands and gradient targets of image b, head h.
template <int kBytes, typename scalar_t>
VAPT_ALWAYS_INLINE BwdHead<at::opmath_type<scalar_t>> bwd_head_operands(
    const BwdArgs<scalar_t>& a, const Blocking& bl, int64_t b, int64_t h,
    const BwdScratch<at::opmath_type<scalar_t>>& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = bl.T, Np = bl.Np, D = a.D, bh = b * a.H + h, ld_grad = a.H * D;
  BwdHead<acc_t> hd;
  hd.Q = as_acc<kBytes>(a.q, b, h, 0, T, D, s.q_conv, hd.ldq);
  hd.K = as_acc<kBytes>(a.k, b, h, 0, T, D, s.k_conv, hd.ldk);
  hd.V = as_acc<kBytes>(a.v, b, h, 0, T, D, s.v_conv, hd.ldv);
  hd.dO = as_acc<kBytes>(a.dout, b, h, 0, T, D, s.do_conv, hd.lddo);
  hd.ldkp = hd.ldvp = D;
  if (Np > 0) {
    hd.Kp = as_acc<kBytes>(a.kp, b, h, 0, Np, D, s.kp_conv, hd.ldkp);
    hd.Vp = as_acc<kBytes>(a.vp, b, h, 0, Np, D, s.vp_conv, hd.ldvp);
    hd.dKp = a.dkp + bh * Np * D;
    hd.dVp = a.dvp + bh * Np * D;
  }
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    hd.dK = a.dk + b * T * ld_grad + h * D;
    hd.dV = a.dv + b * T * ld_grad + h * D;
    hd.lddk = ld_grad;
  } else {
    hd.dK = s.dk_acc;
    hd.dV = s.dv_acc;
    hd.lddk = D;
  }
  return hd;
}

// One query block of a head: rows [m0, m0 + rows) of Q (Qb, ld ldq), of dout (dOb), their lse
// (stride lse_st) and delta, and their dq (dQ, ld lddq). beta_kv: 0 for the first query block,
// which initialises dk and dv.
template <typename acc_t>
struct BwdQueryBlock {
  int64_t m0, rows;
  const acc_t *Qb, *dOb, *lse;
  acc_t* dQ;
  int64_t lddq;
  acc_t beta_kv;
};

// Key block kb of one query block: P and dS of the block (the softmax gradient from the recomputed
// scores and dP = dout V^T), then dv, dk (+)= P^T dout, scale dS^T Q and dq (+)= scale dS K.
template <int kBytes, typename scalar_t>
VAPT_ALWAYS_INLINE void bwd_key_block(const BwdArgs<scalar_t>& a, const Blocking& bl, int64_t kb,
                                      const BwdHead<at::opmath_type<scalar_t>>& hd,
                                      const BwdQueryBlock<at::opmath_type<scalar_t>>& qb,
                                      const BwdScratch<at::opmath_type<scalar_t>>& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = a.D, W = bl.W, rows = qb.rows;
  const acc_t alpha = a.alpha;
  const KeyBlock key = bl.key_block(kb);
  const int64_t np = key.np, nk = key.nk;
  const acc_t* Kb = hd.K + key.n0 * hd.ldk;
  const acc_t* Vb = hd.V + key.n0 * hd.ldv;

  // Scaled scores and dP = dout V^T of the block: columns [0, np) prefix, [np, width) tokens.
  if (np > 0) {
    prefix_scores<acc_t>(rows, np, D, alpha, qb.Qb, hd.ldq, hd.Kp, hd.ldkp, s.St, s.P, W);
    prefix_scores<acc_t>(rows, np, D, 1, qb.dOb, hd.lddo, hd.Vp, hd.ldvp, s.St, s.dS, W);
  }
  gemm_rm<acc_t>(false, true, rows, nk, D, alpha, qb.Qb, hd.ldq, Kb, hd.ldk, 0, s.P + np, W);
  gemm_rm<acc_t>(false, true, rows, nk, D, 1, qb.dOb, hd.lddo, Vb, hd.ldv, 0, s.dS + np, W);
  for (int64_t r = 0; r < rows; ++r) {
    softmax_grad<kBytes>(s.P + r * W, s.dS + r * W, key.width, qb.lse[r * a.lse_st], s.delta[r]);
  }

  // dv_j (+)= sum_i p_ij dout_i ; dk_j (+)= scale sum_i ds_ij q_i
  if (np > 0) {
    gemm_rm<acc_t>(true, false, np, D, rows, 1, s.P, W, qb.dOb, hd.lddo, qb.beta_kv, hd.dVp, D);
    gemm_rm<acc_t>(true, false, np, D, rows, alpha, s.dS, W, qb.Qb, hd.ldq, qb.beta_kv, hd.dKp, D);
  }
  gemm_rm<acc_t>(true, false, nk, D, rows, 1, s.P + np, W, qb.dOb, hd.lddo, qb.beta_kv, hd.dV + key.n0 * hd.lddk,
                 hd.lddk);
  gemm_rm<acc_t>(true, false, nk, D, rows, alpha, s.dS + np, W, qb.Qb, hd.ldq, qb.beta_kv, hd.dK + key.n0 * hd.lddk,
                 hd.lddk);
  // dq_i (+)= scale sum_j ds_ij k_j; the first product initialises dq.
  if (np > 0) {
    gemm_rm<acc_t>(false, false, rows, D, np, alpha, s.dS, W, hd.Kp, hd.ldkp, 0, qb.dQ, qb.lddq);
  }
  gemm_rm<acc_t>(false, false, rows, D, nk, alpha, s.dS + np, W, Kb, hd.ldk, (kb == 0 && np == 0) ? 0 : 1, qb.dQ,
                 qb.lddq);
}

// Query block qb of image b, head h: delta = rowsum(dout * out) of its rows, every key block, then
// its dq rows (from float scratch for bfloat16).
template <int kBytes, typename scalar_t>
VAPT_ALWAYS_INLINE void bwd_query_block(const BwdArgs<scalar_t>& a, const Blocking& bl, int64_t b, int64_t h,
                                        int64_t qb, const BwdHead<at::opmath_type<scalar_t>>& hd,
                                        const BwdScratch<at::opmath_type<scalar_t>>& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = a.D, T = bl.T, ld_grad = a.H * D;
  BwdQueryBlock<acc_t> block;
  block.m0 = qb * bl.BQ;
  block.rows = bl.rows(block.m0);
  block.Qb = hd.Q + block.m0 * hd.ldq;
  block.dOb = hd.dO + block.m0 * hd.lddo;
  block.lse = a.lse + b * a.lse_sb + h * a.lse_sh + block.m0 * a.lse_st;
  block.beta_kv = qb == 0 ? 0 : 1;  // the first query block initialises dk, dv

  // delta_i = dout_i . out_i
  int64_t ldob;
  const acc_t* Ob = as_acc<kBytes>(a.out, b, h, block.m0, block.rows, D, s.o_conv, ldob);
  for (int64_t r = 0; r < block.rows; ++r) {
    s.delta[r] = dot<kBytes>(block.dOb + r * hd.lddo, Ob + r * ldob, D);
  }

  scalar_t* dq_rows = a.dq + (b * T + block.m0) * ld_grad + h * D;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    block.dQ = dq_rows;
    block.lddq = ld_grad;
  } else {
    block.dQ = s.dq_acc;
    block.lddq = D;
  }
  for (int64_t kb = 0; kb < bl.n_kblocks; ++kb) {
    bwd_key_block<kBytes>(a, bl, kb, hd, block, s);
  }
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    store_rows<kBytes>(s.dq_acc, D, block.rows, D, dq_rows, ld_grad);
  }
}

// Work item bh = (b, h) of the backward pass: the head's operands, every query block, then its dk
// and dv rows (from float scratch for bfloat16).
template <int kBytes, typename scalar_t>
VAPT_ALWAYS_INLINE void bwd_head(const BwdArgs<scalar_t>& a, const Blocking& bl, int64_t bh,
                                 const BwdScratch<at::opmath_type<scalar_t>>& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t b = bh / a.H, h = bh % a.H, D = a.D, T = bl.T, ld_grad = a.H * D;
  const BwdHead<acc_t> hd = bwd_head_operands<kBytes>(a, bl, b, h, s);
  for (int64_t qb = 0; qb < bl.n_qblocks; ++qb) {
    bwd_query_block<kBytes>(a, bl, b, h, qb, hd, s);
  }
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    store_rows<kBytes>(s.dk_acc, D, T, D, a.dk + b * T * ld_grad + h * D, ld_grad);
    store_rows<kBytes>(s.dv_acc, D, T, D, a.dv + b * T * ld_grad + h * D, ld_grad);
  }
}

template <typename scalar_t>
void prefix_attention_bwd_kernel(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                 const Tensor& k_prefix, const Tensor& v_prefix, const Tensor& out,
                                 const Tensor& lse, double scale, const Tensor& dq, const Tensor& dk,
                                 const Tensor& dv, const Tensor& dkp_partial, const Tensor& dvp_partial) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Np = k_prefix.size(2);
  const Blocking bl(T, Np, div_up(T, kBlockQBwd));
  const BwdArgs<scalar_t> a{.q = Operand<scalar_t>(q), .k = Operand<scalar_t>(k), .v = Operand<scalar_t>(v),
                            .kp = Operand<scalar_t>(k_prefix), .vp = Operand<scalar_t>(v_prefix),
                            .dout = Operand<scalar_t>(dout), .out = Operand<scalar_t>(out),
                            .lse = lse.const_data_ptr<acc_t>(),
                            .lse_sb = lse.stride(0), .lse_sh = lse.stride(1), .lse_st = lse.stride(2),
                            .dq = dq.data_ptr<scalar_t>(), .dk = dk.data_ptr<scalar_t>(), .dv = dv.data_ptr<scalar_t>(),
                            .dkp = Np > 0 ? dkp_partial.data_ptr<acc_t>() : nullptr,
                            .dvp = Np > 0 ? dvp_partial.data_ptr<acc_t>() : nullptr,
                            .H = H, .D = D, .alpha = static_cast<acc_t>(scale)};
  constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;

  parallel_items(
      B * H, [&] { return TensorScratch<BwdScratch<acc_t>>(q, bl, D, kConvert); },
      [&](auto isa, int64_t bh, const BwdScratch<acc_t>& s) VAPT_INLINE_LAMBDA {
        bwd_head<decltype(isa)::kBytes>(a, bl, bh, s);
      });
}

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> prefix_attention_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                                    const Tensor& k_prefix, const Tensor& v_prefix, double scale) {
  check_prefix_attention_inputs("vapt::prefix_attention_fwd (CPU)", at::kCPU, q, k, v, k_prefix, v_prefix);
  Tensor out = empty_token_major(q);
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
  Tensor dq = empty_token_major(q), dk = empty_token_major(q), dv = empty_token_major(q);
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
