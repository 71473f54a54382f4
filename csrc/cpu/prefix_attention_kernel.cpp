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
// * The row-wise softmax parts use GCC vector extensions compiled for AVX-512, AVX2 and baseline
//   x86-64 (target_clones, chosen at load time). at::vec::Vectorized is not used because an
//   extension is compiled without -mavx*: there at::vec falls back to scalar loops and a libm exp
//   per element, which costs more than the GEMMs at ViT shapes.
// * Everything is accumulated in at::opmath_type (float for bfloat16).
// * Work is split with at::parallel_for. With PyTorch's OpenMP backend (the Linux wheels) that is
//   inline code in ATen/ParallelOpenMP.h, so this file must be compiled with -fopenmp to run on
//   more than one thread; a build without it gets a compiler warning.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

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
// Row kernels of the softmax (64-byte vectors: one AVX-512 register, two AVX2 ones, ...)
// ---------------------------------------------------------------------------------------------

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && defined(__linux__)
#define VAPT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VAPT_CLONES
#endif
#define VAPT_INLINE inline __attribute__((always_inline))
// 64-byte vectors cross no call boundary (the helpers are always inlined into the clones), so
// GCC's warning that their ABI depends on AVX-512 does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

template <typename T>
struct Simd;

// exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2] (ln 2 split in a
// high part exact in n * hi and a low correction, Cody-Waite), exp(r) by its Taylor polynomial to
// the degree where the remainder r^(deg+1)/(deg+1)! is below half an ulp. 2^n is built in the
// exponent field. Below kLo the result is 0 (the true value is subnormal or 0); arguments are
// clamped to kHi, which keeps 2^n finite (the kernels only take arguments <= ~0).
template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(64)));
  typedef int32_t I __attribute__((vector_size(64)));
  static constexpr int kLanes = 16;
  static constexpr float kLo = -87.33654f, kHi = 88.f, kLog2e = 1.44269504f;
  static constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  static constexpr int kMantissa = 23, kBias = 127;
  // Adding then subtracting 1.5 * 2^23 rounds a float of magnitude < 2^22 to an integer.
  static constexpr float kRound = 12582912.f;
  static VAPT_INLINE V poly(V r) {
    return 1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r * (1.f / 720))))));
  }
};

template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(64)));
  typedef int64_t I __attribute__((vector_size(64)));
  static constexpr int kLanes = 8;
  static constexpr double kLo = -708.3964185322641, kHi = 709., kLog2e = 1.4426950408889634;
  static constexpr double kLn2Hi = 0.6931471803691238, kLn2Lo = 1.9082149292705877e-10;
  static constexpr int kMantissa = 52, kBias = 1023;
  static constexpr double kRound = 6755399441055744.0;  // 1.5 * 2^52
  static VAPT_INLINE V poly(V r) {
    V p = V{} + 1.0 / 479001600;  // 1/12!
    const double c[] = {1.0 / 39916800, 1.0 / 3628800, 1.0 / 362880, 1.0 / 40320, 1.0 / 5040, 1.0 / 720,
                        1.0 / 120,      1.0 / 24,      1.0 / 6,      0.5,         1.0,        1.0};
    for (double ci : c) {
      p = p * r + ci;
    }
    return p;
  }
};

template <typename T>
VAPT_INLINE typename Simd<T>::V vexp(typename Simd<T>::V x) {
  using S = Simd<T>;
  using V = typename S::V;
  using I = typename S::I;
  const auto under = x < S::kLo;
  x = x > S::kHi ? V{} + S::kHi : x;
  const V n = (x * S::kLog2e + S::kRound) - S::kRound;
  V r = x - n * S::kLn2Hi;
  r = r - n * S::kLn2Lo;
  const I e = (__builtin_convertvector(n, I) + S::kBias) << S::kMantissa;
  V two_n;
  __builtin_memcpy(&two_n, &e, sizeof(V));
  const V y = S::poly(r) * two_n;
  return under ? V{} : y;
}

template <typename T>
VAPT_INLINE typename Simd<T>::V vload(const T* p) {
  typename Simd<T>::V v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

// The first n < kLanes values of p, the other lanes set to fill.
template <typename T>
VAPT_INLINE typename Simd<T>::V vload_tail(const T* p, int64_t n, T fill) {
  typename Simd<T>::V v = typename Simd<T>::V{} + fill;
  __builtin_memcpy(&v, p, n * sizeof(T));
  return v;
}

template <typename T>
VAPT_INLINE void vstore(T* p, const typename Simd<T>::V& v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

template <typename T>
VAPT_INLINE T hsum(const typename Simd<T>::V& v) {
  T s = 0;
  for (int j = 0; j < Simd<T>::kLanes; ++j) {
    s += v[j];
  }
  return s;
}

template <typename T>
VAPT_INLINE T row_max_impl(const T* x, int64_t n) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::kLanes;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  V m = V{} + kNegInf;
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    const V v = vload(x + i);
    m = v > m ? v : m;
  }
  if (i < n) {
    const V v = vload_tail(x + i, n - i, kNegInf);
    m = v > m ? v : m;
  }
  T r = m[0];
  for (int j = 1; j < L; ++j) {
    r = m[j] > r ? m[j] : r;
  }
  return r;
}

// x <- exp(x - m) in place; returns the sum of the new values.
template <typename T>
VAPT_INLINE T exp_sum_impl(T* x, int64_t n, T m) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::kLanes;
  V acc = V{};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    const V p = vexp<T>(vload(x + i) - m);
    vstore(x + i, p);
    acc += p;
  }
  if (i < n) {
    // Padding lanes hold -inf, whose exp is 0.
    const V p = vexp<T>(vload_tail(x + i, n - i, -std::numeric_limits<T>::infinity()) - m);
    __builtin_memcpy(x + i, &p, (n - i) * sizeof(T));
    acc += p;
  }
  return hsum<T>(acc);
}

// Softmax backward of one row: s <- p = exp(s - lse), dp <- ds = p * (dp - delta).
template <typename T>
VAPT_INLINE void softmax_grad_impl(T* s, T* dp, int64_t n, T lse, T delta) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::kLanes;
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    const V p = vexp<T>(vload(s + i) - lse);
    vstore(s + i, p);
    vstore(dp + i, p * (vload(dp + i) - delta));
  }
  if (i < n) {
    const V p = vexp<T>(vload_tail(s + i, n - i, T(0)) - lse);
    const V ds = p * (vload_tail(dp + i, n - i, T(0)) - delta);
    __builtin_memcpy(s + i, &p, (n - i) * sizeof(T));
    __builtin_memcpy(dp + i, &ds, (n - i) * sizeof(T));
  }
}

template <typename T>
VAPT_INLINE T dot_impl(const T* a, const T* b, int64_t n) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::kLanes;
  V acc = V{};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    acc += vload(a + i) * vload(b + i);
  }
  if (i < n) {
    acc += vload_tail(a + i, n - i, T(0)) * vload_tail(b + i, n - i, T(0));
  }
  return hsum<T>(acc);
}

template <typename T>
VAPT_INLINE void scale_row_impl(T* x, int64_t n, T c) {
  for (int64_t i = 0; i < n; ++i) {
    x[i] *= c;
  }
}

// One compiled copy per ISA of each row kernel, for float and double.
#define VAPT_ROW_KERNELS(T)                                                                       \
  VAPT_CLONES T row_max(const T* x, int64_t n) { return row_max_impl<T>(x, n); }                \
  VAPT_CLONES T exp_sum(T* x, int64_t n, T m) { return exp_sum_impl<T>(x, n, m); }              \
  VAPT_CLONES void softmax_grad(T* s, T* dp, int64_t n, T lse, T delta) {                       \
    softmax_grad_impl<T>(s, dp, n, lse, delta);                                                  \
  }                                                                                             \
  VAPT_CLONES T dot(const T* a, const T* b, int64_t n) { return dot_impl<T>(a, b, n); }         \
  VAPT_CLONES void scale_row(T* x, int64_t n, T c) { scale_row_impl<T>(x, n, c); }
VAPT_ROW_KERNELS(float)
VAPT_ROW_KERNELS(double)
#undef VAPT_ROW_KERNELS

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
template <typename scalar_t, typename acc_t>
const acc_t* as_acc(const scalar_t* src, int64_t ld, int64_t rows, int64_t D, acc_t* scratch, int64_t& ld_out) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    ld_out = ld;
    return src;
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t d = 0; d < D; ++d) {
        scratch[r * D + d] = static_cast<acc_t>(src[r * ld + d]);
      }
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

template <typename acc_t, typename scalar_t>
void store_rows(const acc_t* src, int64_t ld_src, int64_t rows, int64_t D, scalar_t* dst, int64_t ld_dst) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t d = 0; d < D; ++d) {
      dst[r * ld_dst + d] = static_cast<scalar_t>(src[r * ld_src + d]);
    }
  }
}

// Strides of a (batch, H, rows, D) operand in elements: batch (0 when broadcast), head, row.
struct Layout {
  int64_t sb, sh, sr;
};

// A BLAS leading dimension must be >= D. Rows closer than D apart only occur in views with
// overlapping rows (a stride-0 expand over the rows); those are copied.
Tensor rows_for_blas(const Tensor& t) {
  const int64_t rows = t.size(2), D = t.size(3);
  return rows > 1 && t.stride(2) < D ? t.contiguous() : t;
}

Layout layout_of(const Tensor& t) {
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
  const Layout lq = layout_of(q), lk = layout_of(k), lv = layout_of(v);
  const Layout lkp = layout_of(k_prefix), lvp = layout_of(v_prefix);
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

    for (int64_t item = begin; item < end; ++item) {
      const int64_t qb = item % n_qblocks, bh = item / n_qblocks, b = bh / H, h = bh % H;
      const int64_t m0 = qb * BQ, rows = std::min(BQ, T - m0);
      int64_t ldq;
      const acc_t* Q = as_acc(q_data + b * lq.sb + h * lq.sh + m0 * lq.sr, lq.sr, rows, D, q_conv, ldq);

      for (int64_t kb = 0; kb < n_kblocks; ++kb) {
        const int64_t n0 = kb * BK, nk = std::min(BK, T - n0);
        const int64_t np = kb == 0 ? Np : 0;  // the prefix keys lead the first key block
        const int64_t width = np + nk;
        int64_t ldkp = D, ldvp = D, ldk, ldv;
        const acc_t* Kp = nullptr;
        const acc_t* Vp = nullptr;
        if (np > 0) {
          Kp = as_acc(kp_data + b * lkp.sb + h * lkp.sh, lkp.sr, np, D, k_conv, ldkp);
          Vp = as_acc(vp_data + b * lvp.sb + h * lvp.sh, lvp.sr, np, D, v_conv, ldvp);
        }
        const acc_t* K = as_acc(k_data + b * lk.sb + h * lk.sh + n0 * lk.sr, lk.sr, nk, D, k_conv + np * D, ldk);
        const acc_t* V = as_acc(v_data + b * lv.sb + h * lv.sh + n0 * lv.sr, lv.sr, nk, D, v_conv + np * D, ldv);

        // Scaled scores of the block: columns [0, np) prefix, [np, width) tokens.
        if (np > 0) {
          prefix_scores(rows, np, D, alpha, Q, ldq, Kp, ldkp, St, S, W);
        }
        gemm_rm<acc_t>(false, true, rows, nk, D, alpha, Q, ldq, K, ldk, 0, S + np, W);

        for (int64_t r = 0; r < rows; ++r) {
          acc_t* s = S + r * W;
          const acc_t block_max = row_max(s, width);
          if (kb == 0) {
            row_m[r] = block_max;
            row_l[r] = exp_sum(s, width, block_max);
          } else {
            // Online softmax: rescale the sum and the accumulator to the new running max.
            const acc_t m_new = std::max(row_m[r], block_max);
            const acc_t correction = std::exp(row_m[r] - m_new);
            row_l[r] = row_l[r] * correction + exp_sum(s, width, m_new);
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
        const acc_t inv = acc_t(1) / row_l[r];
        for (int64_t d = 0; d < D; ++d) {
          o[r * ld_out + d] = static_cast<scalar_t>(acc[r * D + d] * inv);
        }
        l[r] = row_m[r] + std::log(row_l[r]);
      }
    }
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
  const Layout lq = layout_of(q), lk = layout_of(k), lv = layout_of(v), ldo = layout_of(dout), lo = layout_of(out);
  const Layout lkp = layout_of(k_prefix), lvp = layout_of(v_prefix);
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

    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      int64_t ldq, ldk, ldv, lddo, ldkp = D, ldvp = D;
      const acc_t* Q = as_acc(q_data + b * lq.sb + h * lq.sh, lq.sr, T, D, q_conv, ldq);
      const acc_t* K = as_acc(k_data + b * lk.sb + h * lk.sh, lk.sr, T, D, k_conv, ldk);
      const acc_t* V = as_acc(v_data + b * lv.sb + h * lv.sh, lv.sr, T, D, v_conv, ldv);
      const acc_t* dO = as_acc(do_data + b * ldo.sb + h * ldo.sh, ldo.sr, T, D, do_conv, lddo);
      const acc_t* Kp = nullptr;
      const acc_t* Vp = nullptr;
      acc_t* dKp = nullptr;
      acc_t* dVp = nullptr;
      if (Np > 0) {
        Kp = as_acc(kp_data + b * lkp.sb + h * lkp.sh, lkp.sr, Np, D, kp_conv, ldkp);
        Vp = as_acc(vp_data + b * lvp.sb + h * lvp.sh, lvp.sr, Np, D, vp_conv, ldvp);
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
        const acc_t* Ob = as_acc(o_data + b * lo.sb + h * lo.sh + m0 * lo.sr, lo.sr, rows, D, o_conv, ldob);
        for (int64_t r = 0; r < rows; ++r) {
          delta[r] = dot(dOb + r * lddo, Ob + r * ldob, D);
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
            softmax_grad(P + r * W, dS + r * W, width, lse_b[r * lse_st], delta[r]);
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
          store_rows(dq_acc, D, rows, D, dq_data + (b * T + m0) * ld_grad + h * D, ld_grad);
        }
      }
      if constexpr (!kSameType) {
        store_rows(dk_acc, D, T, D, dk_data + b * T * ld_grad + h * D, ld_grad);
        store_rows(dv_acc, D, T, D, dv_data + b * T * ld_grad + h * D, ld_grad);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Checks and entry points
// ---------------------------------------------------------------------------------------------

void check_operand(const Tensor& t, const char* name, const Tensor& q) {
  TORCH_CHECK(t.device().is_cpu(), "prefix_attention (CPU): ", name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "prefix_attention (CPU): ", name, " has dtype ", t.scalar_type(),
              " but q has ", q.scalar_type(), "; all operands must share q's dtype");
  TORCH_CHECK(t.dim() == 4, "prefix_attention (CPU): ", name, " must be 4-D (batch, heads, rows, head_dim), got ",
              t.dim(), "-D");
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, "prefix_attention (CPU): ", name,
              " must have a unit last stride, got strides ", t.strides());
}

// Checks q, k, v (B, H, T, D) and the prefix (Bp, H, Np, D); returns the prefix batch Bp.
int64_t check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& k_prefix,
                     const Tensor& v_prefix) {
  TORCH_CHECK(q.scalar_type() == at::kDouble || q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "prefix_attention (CPU): dtype ", q.scalar_type(), " is not supported (float64, float32, bfloat16)");
  check_operand(q, "q", q);
  check_operand(k, "k", q);
  check_operand(v, "v", q);
  check_operand(k_prefix, "k_prefix", q);
  check_operand(v_prefix, "v_prefix", q);
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), "prefix_attention (CPU): q, k, v must have the "
              "same shape (B, H, T, D), got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(v_prefix.sizes() == k_prefix.sizes(), "prefix_attention (CPU): k_prefix and v_prefix must have the "
              "same shape (Bp, H, Np, D), got ", k_prefix.sizes(), " and ", v_prefix.sizes());
  const int64_t B = q.size(0), Bp = k_prefix.size(0);
  TORCH_CHECK(Bp == B || Bp == 1, "prefix_attention (CPU): the prefix batch must be 1 (broadcast) or q's batch ", B,
              ", got ", Bp);
  TORCH_CHECK(k_prefix.size(1) == q.size(1), "prefix_attention (CPU): the prefix has ", k_prefix.size(1),
              " heads but q has ", q.size(1));
  TORCH_CHECK(k_prefix.size(3) == q.size(3), "prefix_attention (CPU): the prefix head dim ", k_prefix.size(3),
              " differs from q's ", q.size(3));
  TORCH_CHECK(q.size(3) > 0, "prefix_attention (CPU): the head dim must be at least 1");
  return Bp;
}

at::ScalarType stats_type(const Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// (B, H, T, D) view of a new (B, T, H, D) tensor.
Tensor empty_bthd(const Tensor& q) {
  return at::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options()).transpose(1, 2);
}

std::tuple<Tensor, Tensor> prefix_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                                const Tensor& k_prefix, const Tensor& v_prefix, double scale) {
  check_inputs(q, k, v, k_prefix, v_prefix);
  Tensor out = empty_bthd(q);
  Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(stats_type(q)));
  if (out.numel() == 0) {
    return {out, lse};
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "prefix_attention_fwd", [&] {
    prefix_attention_fwd_kernel<scalar_t>(rows_for_blas(q), rows_for_blas(k), rows_for_blas(v),
                                          rows_for_blas(k_prefix), rows_for_blas(v_prefix), scale, out, lse);
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> prefix_attention_bwd(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& k_prefix,
    const Tensor& v_prefix, const Tensor& out, const Tensor& lse, double scale) {
  const int64_t Bp = check_inputs(q, k, v, k_prefix, v_prefix);
  check_operand(dout, "dout", q);
  check_operand(out, "out", q);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), "prefix_attention_bwd (CPU): dout and out must "
              "have q's shape ", q.sizes(), ", got ", dout.sizes(), " and ", out.sizes());
  TORCH_CHECK(lse.device().is_cpu(), "prefix_attention_bwd (CPU): lse must be a CPU tensor, got one on ", lse.device());
  TORCH_CHECK(lse.scalar_type() == stats_type(q), "prefix_attention_bwd (CPU): lse must be ", stats_type(q),
              " for ", q.scalar_type(), " inputs, got ", lse.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              "prefix_attention_bwd (CPU): lse must have shape (B, H, T) = (", q.size(0), ", ", q.size(1), ", ",
              q.size(2), "), got ", lse.sizes());

  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Np = k_prefix.size(2);
  Tensor dq = empty_bthd(q), dk = empty_bthd(q), dv = empty_bthd(q);
  if (dq.numel() == 0) {
    // No query: the prefix receives no gradient.
    return {dq, dk, dv, at::zeros(k_prefix.sizes(), q.options()), at::zeros(k_prefix.sizes(), q.options())};
  }
  const auto acc_type = stats_type(q);
  // Per-batch prefix gradients in the accumulation type; with a prefix of batch B in that type they
  // are the outputs themselves.
  const bool direct = Bp == B && acc_type == q.scalar_type();
  Tensor dkp_partial = at::empty({B, H, Np, D}, q.options().dtype(acc_type));
  Tensor dvp_partial = at::empty({B, H, Np, D}, q.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "prefix_attention_bwd", [&] {
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
  m.impl("prefix_attention_fwd", &prefix_attention_fwd);
  m.impl("prefix_attention_bwd", &prefix_attention_bwd);
}
