// Host-side helpers shared by the kernel files (cpu/*.cpp, cuda/*.cu): the dtypes each device's
// kernels are compiled for, the statistics dtype, the attention output layout, and the checks of
// device and layout.
//
// The op contract (which dtypes a backend takes on a device, head-dim limits, shape rules) is
// checked once in Python, next to the fake implementations, before any kernel runs. The kernels
// only check what protects memory and layout: devices, ranks, matching sizes, strides, the
// statistics dtype, and the limits of their own tiling.

#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/ArrayRef.h>

#include <array>
#include <initializer_list>
#include <optional>
#include <utility>
#include <vector>

// The dtypes the kernels are compiled for, per device (vapt_kernels.ops.KERNEL_DTYPES["native"]).
#define VAPT_DISPATCH_CPU_TYPES(TYPE, NAME, ...)                                                  \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kDouble, __VA_ARGS__)                       \
                                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                    \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
#define VAPT_DISPATCH_CUDA_TYPES(TYPE, NAME, ...)                                                 \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                        \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                     \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace vapt {

// Dtype of the row statistics, the log-sum-exp and the accumulators: float64 for float64 inputs,
// else float32.
inline at::ScalarType stats_dtype(const at::Tensor& t) {
  return at::toOpMathType(t.scalar_type());
}

// A (B, H, T, D) tensor laid out in memory as (B, T, H, D), like `like`: the attention output and
// gradients, so that merging the heads back (transpose(1, 2).reshape(B, T, H * D)) is free.
inline at::Tensor empty_token_major(const at::Tensor& like) {
  return at::empty({like.size(0), like.size(2), like.size(1), like.size(3)}, like.options()).transpose(1, 2);
}

// How a kernel addresses a tensor's elements.
enum class Layout {
  kContiguous,      // from one base pointer, row-major
  kUnitLastStride,  // through per-dimension strides, consecutive in the last dimension
  kStrided,         // through per-dimension strides
};

// Messages read "<op>: <name> must ..., got ...".
inline void check_device(const char* op, const char* name, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, ", got a tensor on ", t.device());
}

inline void check_layout(const char* op, const char* name, const at::Tensor& t, Layout layout) {
  if (layout == Layout::kContiguous) {
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.strides());
  } else if (layout == Layout::kUnitLastStride) {
    TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", name,
                " must have a unit last stride, got strides ", t.strides());
  }
}

// t is on `device`, holds `dtype`, has exactly `shape` and can be read with `layout`.
inline void check_tensor(const char* op, const char* name, const at::Tensor& t, const at::Device& device,
                         at::ScalarType dtype, at::IntArrayRef shape, Layout layout) {
  check_device(op, name, t, device);
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  check_layout(op, name, t, layout);
}

// t is on `device` and has `rank` dimensions, so that its sizes can be read.
inline void check_rank(const char* op, const char* name, const at::Tensor& t, const at::Device& device,
                       int64_t rank) {
  check_device(op, name, t, device);
  TORCH_CHECK(t.dim() == rank, op, ": ", name, " must have ", rank, " dimensions, got shape ", t.sizes());
}

// The device of the kernel's inputs: `first`'s, which must be of the kernel's type.
inline at::Device kernel_device(const char* op, const char* name, const at::Tensor& first, at::DeviceType type) {
  TORCH_CHECK(first.device().type() == type, op, ": ", name, " must be a ", type, " tensor, got a tensor on ",
              first.device());
  return first.device();
}

// ------------------------------------------------------------------------------------------------
// Per op (both devices)
// ------------------------------------------------------------------------------------------------

// The affine parameters a kernel is given, by name (a None parameter counts as ones / zeros).
using NamedAffine = std::initializer_list<std::pair<const char*, const std::optional<at::Tensor>*>>;

// Each given parameter of `affine` is in x's dtype, has `shape` and is contiguous.
inline void check_affine(const char* op, NamedAffine affine, const at::Tensor& x, const at::Device& device,
                         at::IntArrayRef shape) {
  for (const auto& [name, w] : affine) {
    if (w->has_value() && (*w)->defined()) {
      check_tensor(op, name, **w, device, x.scalar_type(), shape, Layout::kContiguous);
    }
  }
}

// Whether norm_and_project's optional task index is given (a defined tensor).
inline bool has_task_index(const std::optional<at::Tensor>& task) {
  return task.has_value() && task->defined();
}

// norm_and_project_fwd/_bwd: x (B, T, d) contiguous; norm1_affine and gen_affine (None, or (d,) in
// x's dtype, contiguous); mix (Np, N) or (Np, N, d) in the stats dtype, contiguous,
// N = T - num_prefix. With a task index (has_task_index), task is (B,) int64 contiguous, mix is
// stacked per task, (K, Np, N) or (K, Np, N, d) with K >= 1, and gen_affine is (K, d); the values of
// task are not read here (the CPU kernel checks them, the CUDA one cannot without a host sync).
// Returns the mix of one task, (Np, N) or (Np, N, d) (mix itself without a task index), whose
// sizes the kernels read.
inline at::Tensor check_norm_and_project_inputs(const char* op, at::DeviceType type, const at::Tensor& x,
                                                const at::Tensor& mix, int64_t num_prefix,
                                                const std::optional<at::Tensor>& task, NamedAffine norm1_affine,
                                                NamedAffine gen_affine) {
  const at::Device device = kernel_device(op, "x", x, type);
  check_rank(op, "x", x, device, 3);
  const int64_t T = x.size(1), d = x.size(2);
  const bool tasks = has_task_index(task);
  at::Tensor mix_task = mix;
  if (tasks) {
    check_tensor(op, "task", *task, device, at::kLong, {x.size(0)}, Layout::kContiguous);
    check_device(op, "mix", mix, device);
    TORCH_CHECK((mix.dim() == 3 || mix.dim() == 4) && mix.size(0) >= 1, op,
                ": with task, mix must be (K, Np, N) or (K, Np, N, d) with K >= 1, got shape ", mix.sizes());
    check_layout(op, "mix", mix, Layout::kContiguous);
    check_affine(op, gen_affine, x, device, {mix.size(0), d});
    mix_task = mix.select(0, 0);
  }
  check_layout(op, "x", x, Layout::kContiguous);
  check_affine(op, norm1_affine, x, device, {d});
  if (!tasks) {
    check_affine(op, gen_affine, x, device, {d});
  }
  TORCH_CHECK(num_prefix >= 0 && num_prefix <= T, op, ": num_prefix must be in [0, T = ", T, "], got ",
              num_prefix);
  check_device(op, "mix", mix_task, device);
  TORCH_CHECK(mix_task.dim() == 2 || mix_task.dim() == 3, op, ": mix must be (Np, N) or (Np, N, d), got shape ",
              mix_task.sizes());
  const int64_t Np = mix_task.size(0), N = T - num_prefix;
  const std::vector<int64_t> shape =
      mix_task.dim() == 2 ? std::vector<int64_t>{Np, N} : std::vector<int64_t>{Np, N, d};
  check_tensor(op, "mix", mix_task, device, stats_dtype(x), shape, Layout::kContiguous);
  return mix_task;
}

// The shape of the gen affine parameters and their gradients: (d,), or (K, d) with a task index
// (mix (K, ...)).
inline std::vector<int64_t> gen_affine_shape(const at::Tensor& x, const at::Tensor& mix, bool tasks) {
  return tasks ? std::vector<int64_t>{mix.size(0), x.size(2)} : std::vector<int64_t>{x.size(2)};
}

// norm_and_project_bwd's other inputs: dh like x, dg (B, Np, d) in x's dtype, contiguous; mean,
// rstd1, rstd_g (B, T) in the stats dtype, contiguous. mix: one task's, as
// check_norm_and_project_inputs returns it.
inline void check_norm_and_project_grads(const char* op, const at::Tensor& x, const at::Tensor& mix,
                                         const at::Tensor& dh, const at::Tensor& dg, const at::Tensor& mean,
                                         const at::Tensor& rstd1, const at::Tensor& rstd_g) {
  const int64_t B = x.size(0), T = x.size(1), d = x.size(2);
  check_tensor(op, "dh", dh, x.device(), x.scalar_type(), x.sizes(), Layout::kContiguous);
  check_tensor(op, "dg", dg, x.device(), x.scalar_type(), {B, mix.size(0), d}, Layout::kContiguous);
  for (const auto& [name, t] : {std::pair{"mean", &mean}, {"rstd1", &rstd1}, {"rstd_g", &rstd_g}}) {
    check_tensor(op, name, *t, x.device(), stats_dtype(x), {B, T}, Layout::kContiguous);
  }
}

// Every check of norm_and_project_fwd's inputs (the op's arguments). Returns the mix of one task
// (check_norm_and_project_inputs).
inline at::Tensor check_norm_and_project_fwd(const char* op, at::DeviceType type, const at::Tensor& x,
                                             const std::optional<at::Tensor>& norm1_weight,
                                             const std::optional<at::Tensor>& norm1_bias,
                                             const std::optional<at::Tensor>& gen_weight,
                                             const std::optional<at::Tensor>& gen_bias, const at::Tensor& mix,
                                             int64_t num_prefix, const std::optional<at::Tensor>& task) {
  return check_norm_and_project_inputs(op, type, x, mix, num_prefix, task,
                                       {{"norm1_weight", &norm1_weight}, {"norm1_bias", &norm1_bias}},
                                       {{"gen_weight", &gen_weight}, {"gen_bias", &gen_bias}});
}

// Every check of norm_and_project_bwd's inputs (the op's arguments). Returns the mix of one task.
inline at::Tensor check_norm_and_project_bwd(const char* op, at::DeviceType type, const at::Tensor& dh,
                                             const at::Tensor& dg, const at::Tensor& x,
                                             const std::optional<at::Tensor>& norm1_weight,
                                             const std::optional<at::Tensor>& gen_weight,
                                             const std::optional<at::Tensor>& gen_bias, const at::Tensor& mix,
                                             const at::Tensor& mean, const at::Tensor& rstd1, const at::Tensor& rstd_g,
                                             int64_t num_prefix, const std::optional<at::Tensor>& task) {
  const at::Tensor mix_task =
      check_norm_and_project_inputs(op, type, x, mix, num_prefix, task, {{"norm1_weight", &norm1_weight}},
                                    {{"gen_weight", &gen_weight}, {"gen_bias", &gen_bias}});
  check_norm_and_project_grads(op, x, mix_task, dh, dg, mean, rstd1, rstd_g);
  return mix_task;
}

// prefix_attention_fwd/_bwd: q, k, v (B, H, T, D) and k_prefix, v_prefix (1 or B, H, Np, D), all in
// q's dtype with a unit last stride. Returns q's device.
inline at::Device check_prefix_attention_inputs(const char* op, at::DeviceType type, const at::Tensor& q,
                                                const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_prefix,
                                                const at::Tensor& v_prefix) {
  const at::Device device = kernel_device(op, "q", q, type);
  check_rank(op, "q", q, device, 4);
  check_layout(op, "q", q, Layout::kUnitLastStride);
  check_tensor(op, "k", k, device, q.scalar_type(), q.sizes(), Layout::kUnitLastStride);
  check_tensor(op, "v", v, device, q.scalar_type(), q.sizes(), Layout::kUnitLastStride);
  check_rank(op, "k_prefix", k_prefix, device, 4);
  const int64_t B = q.size(0), Bp = k_prefix.size(0) == 1 ? 1 : B;
  const std::array<int64_t, 4> prefix_shape{Bp, q.size(1), k_prefix.size(2), q.size(3)};
  check_tensor(op, "k_prefix", k_prefix, device, q.scalar_type(), prefix_shape, Layout::kUnitLastStride);
  check_tensor(op, "v_prefix", v_prefix, device, q.scalar_type(), prefix_shape, Layout::kUnitLastStride);
  return device;
}

// prefix_attention_bwd's other inputs: dout and out like q, lse (B, H, T) in the stats dtype.
inline void check_prefix_attention_grads(const char* op, const at::Tensor& q, const at::Tensor& dout,
                                         const at::Tensor& out, const at::Tensor& lse) {
  check_tensor(op, "dout", dout, q.device(), q.scalar_type(), q.sizes(), Layout::kUnitLastStride);
  check_tensor(op, "out", out, q.device(), q.scalar_type(), q.sizes(), Layout::kUnitLastStride);
  check_tensor(op, "lse", lse, q.device(), stats_dtype(q), {q.size(0), q.size(1), q.size(2)}, Layout::kStrided);
}

}  // namespace vapt
