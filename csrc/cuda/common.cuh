// Helpers shared by the CUDA kernel files (cuda/*.cu): warp reductions and the alignment test of
// 16-byte vector loads.

#pragma once

#include <cstdint>

// The block's dynamic shared memory as an array of `type` (one spelling for the device and the host emulation).
#define VAPT_EXTERN_SHARED(type, name) extern __shared__ __align__(16) unsigned char name##_bytes[]; type* name = reinterpret_cast<type*>(name##_bytes)

namespace vapt {
namespace {

constexpr int kWarpSize = 32;

// Sum over the 32 lanes; every lane gets the total. All lanes of the warp must call it.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Maximum over the 32 lanes, as warp_sum.
template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const T other = __shfl_xor_sync(0xffffffffu, v, offset);
    v = other > v ? other : v;
  }
  return v;
}

// Whether p may be read and written 16 bytes at a time (nullptr, an absent parameter, passes).
inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

}  // namespace
}  // namespace vapt
