// Thin wrappers of the sm_80 instructions the attention kernels are built from: the tensor-core
// product mma.m16n8k16 (fp32 accumulators, fp16/bf16 operands), ldmatrix, and cp.async. On the
// device each is one inline-PTX instruction; under VAPT_CUDA_EMULATION each calls the host
// emulation (csrc/emulation/cuda_host.h), which implements the PTX ISA's documented semantics.
//
// Fragment layouts of mma.m16n8k16 (PTX ISA), with g = lane / 4 and t = lane % 4:
//   A (16x16, row-major), 4 registers of 2 elements: {a0,a1} = A[g][2t, 2t+1], {a2,a3} = A[g+8][2t..],
//     {a4,a5} = A[g][2t+8..], {a6,a7} = A[g+8][2t+8..]
//   B (16x8, "col": k-pairs per register), 2 registers: {b0,b1} = B[2t, 2t+1][g], {b2,b3} = B[2t+8..][g]
//   C, D (16x8 fp32), 4 registers: c0,c1 = C[g][2t, 2t+1], c2,c3 = C[g+8][2t, 2t+1]
// So the accumulators of two neighbouring n-tiles (16 x 16) are, after conversion, exactly the A
// registers of the next product over those 16 columns: attention keeps P and dS in registers.

#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#ifdef VAPT_CUDA_EMULATION
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace vapt {
namespace mma {

// to_float: a T (float, half_t, bf16_t) as float; from_float<T>: a float rounded to T, to nearest
// even.
#ifdef VAPT_CUDA_EMULATION
using half_t = c10::Half;
using bf16_t = c10::BFloat16;

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return static_cast<float>(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  return T(x);
}
#else
using half_t = __half;
using bf16_t = __nv_bfloat16;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(half_t x) { return __half2float(x); }
__device__ __forceinline__ float to_float(bf16_t x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ half_t from_float<half_t>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ bf16_t from_float<bf16_t>(float x) { return __float2bfloat16_rn(x); }
#endif

// Two fp32 values rounded to T and packed into one register, `lo` in the low 16 bits.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const T l = from_float<T>(lo), h = from_float<T>(hi);
  uint16_t lb, hb;
  memcpy(&lb, &l, 2);
  memcpy(&hb, &h, 2);
  return static_cast<uint32_t>(lb) | (static_cast<uint32_t>(hb) << 16);
}

// d += a * b on one 16x8x16 tile (fragments as in the header comment).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef VAPT_CUDA_EMULATION
  vapt_emu::mma_m16n8k16<T>(d, a, b, d);
#else
  if constexpr (std::is_same_v<T, half_t>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

// Four 8x8 matrices of 16-bit elements from shared memory: lane l gives `row`, the address of row
// l % 8 of matrix l / 8; register i gets matrix i's elements (row l / 4, columns 2(l % 4) and
// 2(l % 4) + 1), or with kTrans those of its transpose.
template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#ifdef VAPT_CUDA_EMULATION
  vapt_emu::ldmatrix_x4(r, row, kTrans);
#else
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  }
#endif
}

// 16 bytes global -> shared without going through registers; with `valid` false nothing is read
// and the 16 bytes are zeroed (src-size 0). Both addresses 16-byte aligned.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
#ifdef VAPT_CUDA_EMULATION
  vapt_emu::cp_async_16(smem, gmem, valid ? 16 : 0);
#else
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(gmem), "r"(valid ? 16 : 0));
#endif
}

// Closes the group of cp.async issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#ifdef VAPT_CUDA_EMULATION
  vapt_emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most kPending of this thread's committed groups are still in flight (other
// threads' copies are visible only after a barrier).
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#ifdef VAPT_CUDA_EMULATION
  vapt_emu::cp_async_wait(kPending);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

}  // namespace mma
}  // namespace vapt
