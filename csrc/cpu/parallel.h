// The parallel loop of the CPU kernels (cpu/*.cpp) over their work items, and each thread's
// scratch.
//
// parallel_items runs the items with at::parallel_for and, inside each thread's range, in the ISA
// variant of this CPU (simd::with_isa must be called inside the worker lambda, not around it: the
// worker is a function of its own, compiled for the baseline).
//
// A thread's scratch is one allocation carved into consecutive buffers. A kernel lays it out once,
// as a struct of buffer pointers (a Layout) whose constructor takes them from a Carver in order and
// ends with `size(c.used())`. Built over a null base the same struct only counts, so the size of
// the allocation and the offsets of the buffers come from one list and cannot drift apart.

#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <vector>

#include "simd.h"

namespace vapt {

template <typename T>
class Carver {
 public:
  explicit Carver(T* base) : base_(base) {}

  // The next n elements (null when only counting).
  T* take(int64_t n) {
    T* buffer = base_ == nullptr ? nullptr : base_ + used_;
    used_ += n;
    return buffer;
  }

  int64_t used() const { return used_; }

 private:
  T* base_;
  int64_t used_ = 0;
};

// A thread's scratch in a std::vector (zero-filled), laid out by Layout(Carver, args...).
template <typename Layout>
struct VectorScratch {
  using T = typename Layout::Element;
  std::vector<T> storage;
  Layout layout;
  template <typename... Args>
  explicit VectorScratch(const Args&... args)
      : storage(Layout(Carver<T>(nullptr), args...).size), layout(Carver<T>(storage.data()), args...) {}
  VectorScratch(const VectorScratch&) = delete;  // layout points into storage
};

// The same in an uninitialised CPU tensor (ATen's allocator, 64-byte aligned) on `like`'s device.
template <typename Layout>
struct TensorScratch {
  using T = typename Layout::Element;
  at::Tensor storage;
  Layout layout;
  template <typename... Args>
  explicit TensorScratch(const at::Tensor& like, const Args&... args)
      : storage(at::empty({Layout(Carver<T>(nullptr), args...).size},
                          like.options().dtype(c10::CppTypeToScalarType<T>::value))),
        layout(Carver<T>(storage.data_ptr<T>()), args...) {}
  TensorScratch(const TensorScratch&) = delete;
};

// Runs work items [0, n) in parallel (grain 1): each thread's range gets its own scratch from
// make_scratch() (a VectorScratch or TensorScratch), then run(isa, item, layout) for each of its
// items inside the ISA variant of this CPU, where decltype(isa)::kBytes is the vector width. run
// is a lambda marked VAPT_INLINE_LAMBDA that calls always-inlined kernel templates (simd.h).
template <typename MakeScratch, typename Run>
void parallel_items(int64_t n, const MakeScratch& make_scratch, const Run& run) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    const auto scratch = make_scratch();
    simd::with_isa([&](auto isa) VAPT_INLINE_LAMBDA {
      // A copy local to the ISA variant's function: its buffer pointers stay in registers (the
      // kernels' stores, memcpy-based, may alias anything reached through a pointer).
      const auto layout = scratch.layout;
      for (int64_t item = begin; item < end; ++item) {
        run(isa, item, layout);
      }
    });
  });
}

}  // namespace vapt
