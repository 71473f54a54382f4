// ATen launcher of vapt::prefix_attention_fwd / vapt::prefix_attention_bwd on CUDA (schema:
// csrc/vapt.cpp; kernels: prefix_attention_device.cuh; grids and shared memory:
// prefix_attention_launch.h). Checks device and layout only (the op contract is checked in
// Python), allocates, and launches on the current stream:
//   forward:  fwd kernel -> out (B, T, H, D memory), lse
//   backward: dq kernel (also writes delta) -> dk/dv kernel -> per-image fp32 prefix partials,
//             summed over the batch here when the prefix is broadcast.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <tuple>

#include "../common.h"
#include "prefix_attention_device.cuh"
#include "prefix_attention_launch.h"

namespace vapt {
namespace attention {
namespace {

constexpr double kLog2eDouble = 1.4426950408889634;

template <typename S>
struct CudaType {
  using type = S;
};
template <>
struct CudaType<c10::Half> {
  using type = mma::half_t;
};
template <>
struct CudaType<c10::BFloat16> {
  using type = mma::bf16_t;
};

Tensor4 strided(const at::Tensor& t, bool broadcast_batch = false) {
  return Tensor4{t.data_ptr(), broadcast_batch ? 0 : t.stride(0), t.stride(1), t.stride(2)};
}

// 16-byte cp.async is legal for t when its base and every row start are 16-byte aligned.
bool rows_aligned16(const at::Tensor& t) {
  const int64_t vec = 16 / t.element_size();
  return aligned16(t.data_ptr()) && (t.size(0) == 1 || t.stride(0) % vec == 0) &&
         (t.size(1) == 1 || t.stride(1) % vec == 0) && (t.size(2) == 1 || t.stride(2) % vec == 0);
}

bool can_vectorize(std::initializer_list<const at::Tensor*> ts, int64_t D) {
  for (const at::Tensor* t : ts) {
    if (t->element_size() != 2 || D % 8 != 0 || !rows_aligned16(*t)) return false;
  }
  return true;
}

// Opts the kernel into `bytes` of dynamic shared memory (needed above 48 KiB) after checking that
// the device has that much per block.
template <typename Kernel>
void prepare_shared_memory(Kernel kernel, int bytes) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(static_cast<size_t>(bytes) <= prop->sharedMemPerBlockOptin, "prefix_attention: this kernel needs ", bytes,
              " bytes of shared memory per block but the device allows ", prop->sharedMemPerBlockOptin);
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  }
}

template <typename Kernel>
void launch(Kernel kernel, const Grid& g, const Params& p, cudaStream_t stream) {
  prepare_shared_memory(kernel, g.smem_bytes);
  const dim3 grid(static_cast<unsigned>(g.x), static_cast<unsigned>(g.y));
  kernel<<<grid, g.threads, g.smem_bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The kernels' own limits, after check_prefix_attention_inputs: head dims up to kMaxHeadDim, B*H
// blocks in grid x, at most 65535 tiles in grid y, 32-bit row indices, and the tensor cores of
// sm_80+ for float16/bfloat16.
void check_tiling(const char* op, const at::Tensor& q, const at::Tensor& k_prefix) {
  TORCH_CHECK(q.size(3) <= kMaxHeadDim, op, ": the kernels hold head dims up to ", kMaxHeadDim, ", got ", q.size(3));
  const int64_t rows = q.size(2) + k_prefix.size(2);
  TORCH_CHECK(q.size(0) * q.size(1) <= std::numeric_limits<int32_t>::max() && rows <= 65535LL * kWarps, op,
              ": the kernels' grid needs B*H < 2^31 and T + Np <= ", 65535LL * kWarps, ", got sizes ", q.sizes(),
              " and ", k_prefix.sizes());
  if (q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16) {
    const cudaDeviceProp* prop = at::cuda::getDeviceProperties(q.get_device());
    TORCH_CHECK(prop->major >= 8, op, ": the ", q.scalar_type(), " kernels use sm_80+ tensor cores, device is sm_",
                prop->major, prop->minor);
  }
}

Params base_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_prefix,
                   const at::Tensor& v_prefix, double scale) {
  const bool broadcast = k_prefix.size(0) == 1;
  Params p{};
  p.q = strided(q);
  p.k = strided(k);
  p.v = strided(v);
  p.kp = strided(k_prefix, broadcast);
  p.vp = strided(v_prefix, broadcast);
  p.heads = static_cast<int>(q.size(1));
  p.tokens = static_cast<int>(q.size(2));
  p.prompts = static_cast<int>(k_prefix.size(2));
  p.D = static_cast<int>(q.size(3));
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * kLog2eDouble);
  return p;
}

std::tuple<at::Tensor, at::Tensor> prefix_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, const at::Tensor& k_prefix,
                                                              const at::Tensor& v_prefix, double scale) {
  constexpr const char* op = "vapt::prefix_attention_fwd (CUDA)";
  check_prefix_attention_inputs(op, at::kCUDA, q, k, v, k_prefix, v_prefix);
  check_tiling(op, q, k_prefix);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Np = k_prefix.size(2);
  at::Tensor out = empty_token_major(q);
  at::Tensor lse = at::empty({B, H, T}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) {
    // No query, or D == 0 (all scores 0: lse = log(Np + T)).
    lse.fill_(std::log(static_cast<double>(Np + T)));
    return {out, lse};
  }
  Params p = base_params(q, k, v, k_prefix, v_prefix, scale);
  p.out = strided(out);
  p.lse = lse.data_ptr<float>();
  p.vec = can_vectorize({&q, &k, &v, &k_prefix, &v_prefix}, D);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  VAPT_DISPATCH_CUDA_TYPES(q.scalar_type(), "prefix_attention_fwd_cuda", [&] {
    using T_ = typename CudaType<scalar_t>::type;
    if constexpr (sizeof(T_) == 4) {
      launch(prefix_attention_fwd_fp32_kernel, fp32_rows_grid(B * H, T), p, stream);
    } else {
      with_padded_head_dim(D, [&](auto dp) {
        launch(prefix_attention_fwd_kernel<T_, decltype(dp)::value>, fwd_grid(B * H, T, D), p, stream);
      });
    }
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
  const c10::cuda::CUDAGuard guard(q.device());

  at::Tensor dq = empty_token_major(q), dk = empty_token_major(q), dv = empty_token_major(q);
  if (dq.numel() == 0) {
    // No query or no channel: every gradient is empty or zero.
    return {dq, dk, dv, at::zeros(k_prefix.sizes(), q.options()), at::zeros(k_prefix.sizes(), q.options())};
  }
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor delta = at::empty({B, H, T}, q.options().dtype(at::kFloat));
  at::Tensor dkp_part = at::empty({B, H, Np, D}, q.options().dtype(at::kFloat));
  at::Tensor dvp_part = at::empty({B, H, Np, D}, q.options().dtype(at::kFloat));

  Params p = base_params(q, k, v, k_prefix, v_prefix, scale);
  p.out = strided(out);
  p.dout = strided(dout);
  p.dq = strided(dq);
  p.dk = strided(dk);
  p.dv = strided(dv);
  p.lse = const_cast<float*>(lse.data_ptr<float>());  // read only by the backward kernels
  p.delta = delta.data_ptr<float>();
  p.dkp_part = dkp_part.data_ptr<float>();
  p.dvp_part = dvp_part.data_ptr<float>();
  p.vec = can_vectorize({&q, &k, &v, &k_prefix, &v_prefix, &dout}, D);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  VAPT_DISPATCH_CUDA_TYPES(q.scalar_type(), "prefix_attention_bwd_cuda", [&] {
    using T_ = typename CudaType<scalar_t>::type;
    if constexpr (sizeof(T_) == 4) {
      launch(prefix_attention_dq_fp32_kernel, fp32_rows_grid(B * H, T), p, stream);
      launch(prefix_attention_dkdv_fp32_kernel, fp32_rows_grid(B * H, Np + T), p, stream);
    } else {
      with_padded_head_dim(D, [&](auto dp) {
        constexpr int DP = decltype(dp)::value;
        launch(prefix_attention_dq_kernel<T_, DP>, dq_grid(B * H, T, D), p, stream);
        launch(prefix_attention_dkdv_kernel<T_, DP>, dkdv_grid(B * H, Np, T, D), p, stream);
      });
    }
  });

  // Per-image fp32 partials -> k_prefix's shape and dtype (batch sum when the prefix is broadcast).
  const auto finish = [&](const at::Tensor& part) {
    return (k_prefix.size(0) == 1 ? part.sum(0, /*keepdim=*/true) : part).to(q.scalar_type()).contiguous();
  };
  return {dq, dk, dv, finish(dkp_part), finish(dvp_part)};
}

}  // namespace
}  // namespace attention

TORCH_LIBRARY_IMPL(vapt, CUDA, m) {
  m.impl("prefix_attention_fwd", &attention::prefix_attention_fwd_cuda);
  m.impl("prefix_attention_bwd", &attention::prefix_attention_bwd_cuda);
}

}  // namespace vapt
