// SIMD helpers of the CPU kernels (cpu/*.cpp): vector types, loads and stores, exp, bfloat16 rows,
// and the choice of the ISA variant each hot kernel runs.
//
// GCC/Clang vector extensions compiled per function, not at::vec::Vectorized nor a file compiled
// for AVX2 (why: docs/design.md §2.2):
// * A vector extension type (T __attribute__((vector_size(N)))) compiles to whatever the function
//   it is used in targets. Each hot kernel is an always-inlined template over the vector width in
//   bytes, and with_isa() runs it inside one of three function templates carrying
//   __attribute__((target(...))): run_baseline (16-byte vectors: SSE2 on x86-64, NEON on AArch64),
//   run_avx2 (AVX2 + FMA, 32 bytes) and run_avx512 (64 bytes). Only code inlined into those is
//   compiled for their ISA, and only they run it: a function the compiler keeps out of line has the
//   baseline target of its own definition. So every lambda in a kernel body is marked
//   VAPT_INLINE_LAMBDA and every helper VAPT_ALWAYS_INLINE (code left out of line would still be
//   correct, only slower).
// * The variant follows at::get_cpu_capability() (the function behind Python's
//   torch.backends.cpu.get_cpu_capability()), asked once per process: C++ and Python agree, a CPU
//   without AVX2 runs the baseline variant, ATEN_CPU_CAPABILITY=default|avx2|avx512 forces one (the
//   value is trusted, as ATen trusts it for its own kernels), and AVX-512 runs wherever ATen runs
//   its own AVX-512 kernels.
// * a * b + c on vectors is contracted into an FMA where the target has one (GCC and Clang contract
//   within an expression by default), so the baseline variant rounds some sums differently.
// Other architectures build the baseline variant only.

#pragma once

#include <ATen/Version.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define VAPT_SIMD_X86 1
#else
#define VAPT_SIMD_X86 0
#endif

#define VAPT_ALWAYS_INLINE inline __attribute__((always_inline))
// Written after a lambda's parameter list: [&](int64_t c) VAPT_INLINE_LAMBDA { ... }.
#define VAPT_INLINE_LAMBDA __attribute__((always_inline))

namespace vapt::simd {

// ------------------------------------------------------------------------------------------------
// ISA variants
// ------------------------------------------------------------------------------------------------

enum class Isa { kBaseline, kAvx2, kAvx512 };

// The variant this process runs, from ATen's CPU capability string ("AVX512", "AVX2", "DEFAULT",
// "NO AVX", ...), computed on the first call.
inline Isa cpu_isa() {
  static const Isa isa = [] {
#if VAPT_SIMD_X86
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512") {
      return Isa::kAvx512;
    }
    if (capability == "AVX2") {
      return Isa::kAvx2;
    }
#endif
    return Isa::kBaseline;
  }();
  return isa;
}

// The vector width of a variant, passed to the kernel lambda: decltype(isa)::kBytes.
template <int kBytes_>
struct Width {
  static constexpr int kBytes = kBytes_;
};

template <typename F>
void run_baseline(const F& f) {
  f(Width<16>{});
}

#if VAPT_SIMD_X86
// The feature sets ATen's AVX2 and AVX512 capabilities guarantee.
template <typename F>
__attribute__((target("avx2,fma"))) void run_avx2(const F& f) {
  f(Width<32>{});
}

template <typename F>
__attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512dq"))) void run_avx512(const F& f) {
  f(Width<64>{});
}
#endif

// Calls f(Width<kBytes>{}) inside the function compiled for this process's ISA variant. f is a
// lambda marked VAPT_INLINE_LAMBDA whose body calls always-inlined kernel templates. Call it inside
// at::parallel_for's lambda, not around it: the worker lambda is a function of its own, compiled
// for the baseline.
template <typename F>
void with_isa(const F& f) {
#if VAPT_SIMD_X86
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return run_avx512(f);
    case Isa::kAvx2:
      return run_avx2(f);
    case Isa::kBaseline:
      break;
  }
#endif
  run_baseline(f);
}

// ------------------------------------------------------------------------------------------------
// Vector types
// ------------------------------------------------------------------------------------------------

// kBytes / sizeof(T) lanes of T (float or double), and the unsigned integers of the same width.
template <typename T, int kBytes>
struct Simd {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "float or double lanes");
  typedef T V __attribute__((vector_size(kBytes)));
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  typedef Bits U __attribute__((vector_size(kBytes)));
  // bfloat16 bit patterns, one per float lane (float vectors only).
  typedef uint16_t B16 __attribute__((vector_size(kBytes / sizeof(T) * 2)));
};

template <typename V>
using Elem = std::remove_cv_t<std::remove_reference_t<decltype(std::declval<V>()[0])>>;

template <typename V>
constexpr int64_t kLanes = sizeof(V) / sizeof(Elem<V>);

template <typename To, typename From>
VAPT_ALWAYS_INLINE To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From));
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

template <typename V>
VAPT_ALWAYS_INLINE V splat(Elem<V> x) {
  return V{} + x;
}

template <typename V>
VAPT_ALWAYS_INLINE V load(const Elem<V>* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

// The first n <= kLanes values at p; the other lanes hold `fill`.
template <typename V>
VAPT_ALWAYS_INLINE V load(const Elem<V>* p, int64_t n, Elem<V> fill = 0) {
  if (n == kLanes<V>) {
    return load<V>(p);
  }
  V v = splat<V>(fill);
  std::memcpy(&v, p, n * sizeof(Elem<V>));
  return v;
}

template <typename V>
VAPT_ALWAYS_INLINE void store(Elem<V>* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// Stores the first n <= kLanes lanes.
template <typename V>
VAPT_ALWAYS_INLINE void store(Elem<V>* p, const V& v, int64_t n) {
  std::memcpy(p, &v, (n == kLanes<V> ? kLanes<V> : n) * sizeof(Elem<V>));
}

// v with the lanes at and past n set to zero (for sums whose terms are not zero on padding).
template <typename V>
VAPT_ALWAYS_INLINE V first_lanes(const V& v, int64_t n) {
  if (n == kLanes<V>) {
    return v;
  }
  V out{};
  std::memcpy(&out, &v, n * sizeof(Elem<V>));
  return out;
}

template <typename V>
VAPT_ALWAYS_INLINE V max(const V& a, const V& b) {
  return a > b ? a : b;
}

template <typename V>
VAPT_ALWAYS_INLINE Elem<V> reduce_add(const V& v) {
  Elem<V> s = v[0];
  for (int64_t i = 1; i < kLanes<V>; ++i) {
    s += v[i];
  }
  return s;
}

template <typename V>
VAPT_ALWAYS_INLINE Elem<V> reduce_max(const V& v) {
  Elem<V> m = v[0];
  for (int64_t i = 1; i < kLanes<V>; ++i) {
    m = v[i] > m ? v[i] : m;
  }
  return m;
}

// Calls f(c, n) over [0, d) one vector of kLanes at a time; only the last chunk may be partial
// (n < kLanes). f must be marked VAPT_INLINE_LAMBDA.
template <typename V, typename F>
VAPT_ALWAYS_INLINE void for_chunks(int64_t d, const F& f) {
  int64_t c = 0;
  for (; c + kLanes<V> <= d; c += kLanes<V>) {
    f(c, kLanes<V>);
  }
  if (c < d) {
    f(c, d - c);
  }
}

// ------------------------------------------------------------------------------------------------
// exp
// ------------------------------------------------------------------------------------------------

// exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2] (ln 2 split in a high
// part exact in n * hi and a low correction, Cody-Waite), exp(r) by its Taylor polynomial to the
// degree where the remainder r^(deg+1)/(deg+1)! is below half an ulp. n is rounded by adding and
// subtracting kRound = 1.5 * 2^mantissa, which leaves n in the low bits of the sum; 2^n is built
// from them in the exponent field (no float-to-int conversion, which AVX2 lacks for doubles).
// Below kLo the result is 0 (the true value is subnormal or 0); arguments are clamped to kHi,
// which keeps 2^n finite. NaN stays NaN.
template <typename T>
struct ExpConstants;

template <>
struct ExpConstants<float> {
  static constexpr float kLo = -87.33654f, kHi = 88.f, kLog2e = 1.44269504f;
  static constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  static constexpr float kRound = 12582912.f;  // 1.5 * 2^23
  static constexpr uint32_t kMantissa = 23, kBias = 127;
  template <typename V>
  static VAPT_ALWAYS_INLINE V poly(const V& r) {
    return 1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r * (1.f / 720))))));
  }
};

template <>
struct ExpConstants<double> {
  static constexpr double kLo = -708.3964185322641, kHi = 709., kLog2e = 1.4426950408889634;
  static constexpr double kLn2Hi = 0.6931471803691238, kLn2Lo = 1.9082149292705877e-10;
  static constexpr double kRound = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr uint64_t kMantissa = 52, kBias = 1023;
  template <typename V>
  static VAPT_ALWAYS_INLINE V poly(const V& r) {
    constexpr double c[] = {1.0 / 479001600, 1.0 / 39916800, 1.0 / 3628800, 1.0 / 362880, 1.0 / 40320,
                            1.0 / 5040,      1.0 / 720,      1.0 / 120,      1.0 / 24,     1.0 / 6,
                            0.5,             1.0,            1.0};  // 1/12! ... 1/0!
    V p = splat<V>(c[0]);
    for (int i = 1; i < 13; ++i) {
      p = p * r + c[i];
    }
    return p;
  }
};

template <typename V>
VAPT_ALWAYS_INLINE V exp(V x) {
  using T = Elem<V>;
  using C = ExpConstants<T>;
  using U = typename Simd<T, sizeof(V)>::U;
  const auto under = x < C::kLo;
  x = x > C::kHi ? splat<V>(C::kHi) : x;
  const V shifted = x * C::kLog2e + C::kRound;
  const V n = shifted - C::kRound;
  V r = x - n * C::kLn2Hi;
  r = r - n * C::kLn2Lo;
  const U n_bits = bit_cast<U>(shifted) - bit_cast<U>(splat<V>(C::kRound));
  const V two_n = bit_cast<V>((n_bits + C::kBias) << C::kMantissa);
  const V y = C::poly(r) * two_n;
  return under ? V{} : y;
}

// ------------------------------------------------------------------------------------------------
// bfloat16 rows
// ------------------------------------------------------------------------------------------------

// dst[i] = float(src[i]) for i < n: a bfloat16 is the high half of a float.
template <int kBytes>
VAPT_ALWAYS_INLINE void convert(const c10::BFloat16* src, float* dst, int64_t n) {
  using S = Simd<float, kBytes>;
  using U = typename S::U;
  using B16 = typename S::B16;
  constexpr int64_t L = kLanes<typename S::V>;
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    B16 h;
    std::memcpy(&h, src + i, sizeof(h));
    const U u = __builtin_convertvector(h, U) << 16;
    std::memcpy(dst + i, &u, sizeof(u));
  }
  for (; i < n; ++i) {
    dst[i] = static_cast<float>(src[i]);
  }
}

// dst[i] = bfloat16(src[i]) for i < n, rounded to nearest even with NaN kept, exactly as
// c10::BFloat16's constructor.
template <int kBytes>
VAPT_ALWAYS_INLINE void convert(const float* src, c10::BFloat16* dst, int64_t n) {
  using S = Simd<float, kBytes>;
  using V = typename S::V;
  using U = typename S::U;
  using B16 = typename S::B16;
  constexpr int64_t L = kLanes<V>;
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    const V f = load<V>(src + i);
    const U u = bit_cast<U>(f);
    U rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    rounded = f != f ? U{} + 0x7FC0u : rounded;
    const B16 h = __builtin_convertvector(rounded, B16);
    std::memcpy(dst + i, &h, sizeof(h));
  }
  for (; i < n; ++i) {
    dst[i] = static_cast<c10::BFloat16>(src[i]);
  }
}

}  // namespace vapt::simd
