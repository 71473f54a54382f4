// ATen launcher of the CUDA kernels of vapt::norm_and_project_fwd / _bwd (DESIGN §2.3); the kernels
// and what they compute are in norm_and_project_kernels.cuh, the launch geometry in
// norm_and_project_launch.h.
//
// Memory beyond the outputs: the forward none (g is reduced inside project_kernel); the backward
// dxg (B, N, d) float (the prompt gradient reaching LN_g(x), computed once), the column partials
// (B * ceil(T / 32) * groups, 4, d) float and, for the shared mix, the per-image dmix (B, Np, N)
// float, summed by at::sum in a fixed order: no atomics, deterministic.
// Many tasks (task given): the forward needs nothing more (project_kernel reaches mix[task[b]] and
// the gen affine row task[b] through the index). The backward groups the images by task once (a
// stable at::sort of task and at::searchsorted of the task boundaries, on the device: no host
// sync) and sums the per-task gradients in that order: dmix per channel inside project_kernel, the
// shared-mix dmix and dgen_weight/bias by task_sum_kernel from the per-image partials (the latter
// from the column partials above). Without task, none of this runs.
// Loads and stores of x-sized tensors in the row kernels move 16 bytes per thread when d and the
// pointers allow it.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "../common.h"
#include "norm_and_project_kernels.cuh"
#include "norm_and_project_launch.h"

namespace vapt {
namespace {

template <typename scalar_t>
const scalar_t* optional_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<scalar_t>() : nullptr;
}

dim3 grid_of(const nap::Geometry& g) {
  return dim3(static_cast<unsigned int>(g.grid_x), static_cast<unsigned int>(g.grid_y),
              static_cast<unsigned int>(g.grid_z));
}

// The kernels' own limit: CUDA's grid dimensions.
void check_launchable(const nap::Geometry& g, const char* op, const char* kernel) {
  TORCH_CHECK(nap::launchable(g), op, ": these shapes need a grid of (", g.grid_x, ", ", g.grid_y, ", ", g.grid_z,
              ") blocks for ", kernel, ", over CUDA's limits (", nap::kMaxGridX, ", ", nap::kMaxGridYZ, ", ",
              nap::kMaxGridYZ, ")");
}

// out[z, m, c] = sum_k A[z, m, k(, c)] * Bop[z, k, c] for z < Z, m < M, c < C, k < K, on `Tile`;
// TASKS reads the operands' task indices and, with `segments` > 1, the per-task sums of `seg`.
template <typename Tile, bool TASKS, typename a_t, typename scalar_t, typename out_t>
void launch_project(const char* op, StridedOperand<a_t> A, RowOperand<scalar_t> Bop, out_t* out, int64_t oz,
                    int64_t om, int64_t Z, int64_t M, int64_t K, int64_t C, KSegments seg = {},
                    int64_t segments = 1) {
  TORCH_INTERNAL_ASSERT(A.z_stride == 0 || Tile::BZ == 1, op, ": project_kernel stages A once per block of z");
  const nap::Geometry g = nap::project_geometry<Tile>(Z, M, C, segments);
  check_launchable(g, op, "project_kernel");
  project_kernel<Tile, TASKS, a_t, scalar_t, out_t><<<grid_of(g), g.threads, g.dynamic_smem,
                                                      at::cuda::getCurrentCUDAStream()>>>(A, Bop, seg, out, oz, om, Z,
                                                                                          M, K, C);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// mix as the A operand: (Np, N) as A[j, n] = mix[j * N + n], (Np, N, d) as A[j, n, c] = mix[(j * N +
// n) * d + c], the same for every image; with `task`, mix is (K, Np, N(, d)) and image z reads the
// slice task[z]. `transpose` swaps the roles of j and n (A[n, j(, c)], the backward).
StridedOperand<float> mix_operand(const at::Tensor& mix, const int64_t* task, bool transpose) {
  const int64_t t = task != nullptr ? 1 : 0;
  const int64_t N = mix.size(t + 1);
  const bool shared = mix.dim() == t + 2;
  const int64_t sj = shared ? N : N * mix.size(t + 2), sn = shared ? 1 : mix.size(t + 2), sc = shared ? 0 : 1;
  return {.a = mix.data_ptr<float>(), .z_stride = task != nullptr ? mix[0].numel() : 0,
          .m_stride = transpose ? sn : sj, .k_stride = transpose ? sj : sn, .c_stride = sc, .z_index = task};
}

// The prompt projection g[b] = mix @ LN_g(x[b, P:]), or the prompt gradient dxg[b] = mix^T dg[b]
// (`transpose`): out (B, M, d) from Z = B images, M output rows, K summed rows that `Bop` reads.
// With `task`, image b takes mix[task[b]].
template <typename scalar_t, typename out_t>
void launch_mix(const char* op, const at::Tensor& mix, const int64_t* task, bool transpose, RowOperand<scalar_t> Bop,
                out_t* out, int64_t B, int64_t M, int64_t K, int64_t d) {
  const StridedOperand<float> A = mix_operand(mix, task, transpose);
  const bool shared = mix.dim() == (task != nullptr ? 3 : 2);
  if (task == nullptr) {
    if (shared) {
      launch_project<nap::SharedMixTile, false>(op, A, Bop, out, M * d, d, B, M, K, d);
    } else {
      launch_project<nap::ChannelMixTile, false>(op, A, Bop, out, M * d, d, B, M, K, d);
    }
  } else if (shared) {
    launch_project<nap::SharedMixTile, true>(op, A, Bop, out, M * d, d, B, M, K, d);
  } else {
    launch_project<nap::ChannelMixTaskTile, true>(op, A, Bop, out, M * d, d, B, M, K, d);
  }
}

// out (tasks, L) = per-task sums of per-image partials (task_sum_kernel): image b's are the S rows
// part[b * S ...] of `stride` floats, its first L read.
void launch_task_sum(const char* op, const float* part, int64_t S, int64_t stride, const at::Tensor& order,
                     const at::Tensor& bounds, at::Tensor& out, int64_t L) {
  const nap::Geometry g = nap::task_sum_geometry(out.size(0), L);
  check_launchable(g, op, "task_sum_kernel");
  task_sum_kernel<<<grid_of(g), g.threads, g.dynamic_smem, at::cuda::getCurrentCUDAStream()>>>(
      part, order.data_ptr<int64_t>(), bounds.data_ptr<int64_t>(), out.data_ptr<float>(), S, stride, L);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The task index, when given: int64 (B,) contiguous on x's device (values in [0, K) are the caller's
// promise: checking them would sync). Then mix must be (K, Np, N(, d)) and gen_weight/gen_bias
// (K, d) in x's dtype, contiguous. Returns task's data (nullptr without task) and the mix of one
// task, for the single-task checks of the other inputs.
std::pair<const int64_t*, at::Tensor> check_task(const char* op, const at::Tensor& x,
                                                 const std::optional<at::Tensor>& task, const at::Tensor& mix,
                                                 const std::optional<at::Tensor>& gen_weight,
                                                 const std::optional<at::Tensor>& gen_bias) {
  if (!task.has_value() || !task->defined()) return {nullptr, mix};
  check_rank(op, "x", x, x.device(), 3);
  check_tensor(op, "task", *task, x.device(), at::kLong, {x.size(0)}, Layout::kContiguous);
  TORCH_CHECK((mix.dim() == 3 || mix.dim() == 4) && mix.size(0) >= 1, op,
              ": with task, mix must be (K, Np, N) or (K, Np, N, d) with K >= 1, got shape ", mix.sizes());
  check_layout(op, "mix", mix, Layout::kContiguous);
  const int64_t K = mix.size(0), d = x.size(2);
  for (const auto& [name, w] : {std::pair{"gen_weight", &gen_weight}, {"gen_bias", &gen_bias}}) {
    if (w->has_value() && (*w)->defined()) {
      check_tensor(op, name, **w, x.device(), x.scalar_type(), {K, d}, Layout::kContiguous);
    }
  }
  return {task->data_ptr<int64_t>(), mix[0]};
}

// The images grouped by task: order (B,) the stable sort's permutation, bounds (K + 1,) where task
// s's images order[bounds[s] : bounds[s + 1]] begin and end. On the device, without a host sync.
std::pair<at::Tensor, at::Tensor> group_by_task(const at::Tensor& task, int64_t K) {
  const auto [sorted, order] = at::sort(task, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  return {order, at::searchsorted(sorted, at::arange(K + 1, task.options()))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_and_project_fwd_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& norm1_weight, const std::optional<at::Tensor>& norm1_bias,
    double eps1, const std::optional<at::Tensor>& gen_weight, const std::optional<at::Tensor>& gen_bias,
    double eps_g, const at::Tensor& mix, int64_t num_prefix, const std::optional<at::Tensor>& task) {
  constexpr const char* op = "vapt::norm_and_project_fwd (CUDA)";
  kernel_device(op, "x", x, at::kCUDA);
  const int64_t* task_ptr;
  at::Tensor task_mix;
  std::tie(task_ptr, task_mix) = check_task(op, x, task, mix, gen_weight, gen_bias);
  if (task_ptr == nullptr) {
    check_norm_and_project_inputs(op, at::kCUDA, x, mix, num_prefix,
                                  {{"norm1_weight", &norm1_weight}, {"norm1_bias", &norm1_bias},
                                   {"gen_weight", &gen_weight}, {"gen_bias", &gen_bias}});
  } else {
    check_norm_and_project_inputs(op, at::kCUDA, x, task_mix, num_prefix,
                                  {{"norm1_weight", &norm1_weight}, {"norm1_bias", &norm1_bias}});
  }
  const int64_t B = x.size(0), T = x.size(1), d = x.size(2), Np = task_mix.size(0), P = num_prefix, N = T - P;
  const at::ScalarType stats = stats_dtype(x);

  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor h = at::empty_like(x);
  at::Tensor mean = at::empty({B, T}, x.options().dtype(stats));
  at::Tensor rstd1 = at::empty({B, T}, x.options().dtype(stats));
  at::Tensor rstd_g = at::empty({B, T}, x.options().dtype(stats));
  if (B == 0 || T == 0) {
    return {h, at::zeros({B, Np, d}, x.options()), mean, rstd1, rstd_g};
  }
  at::Tensor g = at::empty({B, Np, d}, x.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  VAPT_DISPATCH_CUDA_TYPES(x.scalar_type(), "norm_and_project_fwd_cuda", [&] {
    const scalar_t* w1 = optional_ptr<scalar_t>(norm1_weight);
    const scalar_t* b1 = optional_ptr<scalar_t>(norm1_bias);
    const scalar_t* wg = optional_ptr<scalar_t>(gen_weight);
    const scalar_t* bg = optional_ptr<scalar_t>(gen_bias);
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec = d % kVec == 0 && aligned16(x.data_ptr()) && aligned16(h.data_ptr()) && aligned16(w1) &&
                     aligned16(b1);
    const nap::Geometry rg = nap::rows_fwd_geometry(B, T);
    check_launchable(rg, op, "rows_fwd_kernel");
    const auto rows_kernel = vec ? rows_fwd_kernel<scalar_t, kVec> : rows_fwd_kernel<scalar_t, 1>;
    rows_kernel<<<grid_of(rg), rg.threads, rg.dynamic_smem, stream>>>(
        x.data_ptr<scalar_t>(), w1, b1, h.data_ptr<scalar_t>(), mean.data_ptr<float>(), rstd1.data_ptr<float>(),
        rstd_g.data_ptr<float>(), B * T, d, static_cast<float>(eps1), static_cast<float>(eps_g));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // g[b, j, c] = sum_n mix[j, n(, c)] * LN_g(x)[b, P + n, c]: summed rows P + n of image b (the
    // mix and gen affine row of task[b] with task).
    const RowOperand<scalar_t> xg{.rows = x.data_ptr<scalar_t>(), .z_stride = T, .row_stride = 1, .row0 = P,
                                  .d = d, .mean = mean.data_ptr<float>(), .rstd = rstd_g.data_ptr<float>(),
                                  .w = wg, .b = bg, .task = task_ptr};
    launch_mix(op, mix, task_ptr, /*transpose=*/false, xg, g.data_ptr<scalar_t>(), B, Np, N, d);
  });
  return {h, g, mean, rstd1, rstd_g};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_and_project_bwd_cuda(
    const at::Tensor& dh, const at::Tensor& dg, const at::Tensor& x, const std::optional<at::Tensor>& norm1_weight,
    const std::optional<at::Tensor>& gen_weight, const std::optional<at::Tensor>& gen_bias, const at::Tensor& mix,
    const at::Tensor& mean, const at::Tensor& rstd1, const at::Tensor& rstd_g, int64_t num_prefix,
    const std::optional<at::Tensor>& task) {
  constexpr const char* op = "vapt::norm_and_project_bwd (CUDA)";
  kernel_device(op, "x", x, at::kCUDA);
  const int64_t* task_ptr;
  at::Tensor task_mix;
  std::tie(task_ptr, task_mix) = check_task(op, x, task, mix, gen_weight, gen_bias);
  if (task_ptr == nullptr) {
    check_norm_and_project_inputs(
        op, at::kCUDA, x, mix, num_prefix,
        {{"norm1_weight", &norm1_weight}, {"gen_weight", &gen_weight}, {"gen_bias", &gen_bias}});
  } else {
    check_norm_and_project_inputs(op, at::kCUDA, x, task_mix, num_prefix, {{"norm1_weight", &norm1_weight}});
  }
  check_norm_and_project_grads(op, x, task_mix, dh, dg, mean, rstd1, rstd_g);
  const int64_t B = x.size(0), T = x.size(1), d = x.size(2), Np = task_mix.size(0), P = num_prefix, N = T - P;
  const at::ScalarType stats = stats_dtype(x);
  const int64_t K = task_ptr != nullptr ? mix.size(0) : 1;  // tasks
  const std::vector<int64_t> gen_shape = task_ptr != nullptr ? std::vector<int64_t>{K, d} : std::vector<int64_t>{d};

  c10::cuda::CUDAGuard guard(x.device());
  const at::TensorOptions stats_opts = x.options().dtype(stats);
  at::Tensor dx = at::empty_like(x);
  if (B == 0 || T == 0) {
    return {dx, at::zeros({d}, stats_opts), at::zeros({d}, stats_opts), at::zeros(gen_shape, stats_opts),
            at::zeros(gen_shape, stats_opts), at::zeros(mix.sizes(), stats_opts)};
  }
  const bool shared_mix = task_mix.dim() == 2;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor dxg = at::empty({B, N, d}, stats_opts);
  // Shared layout: per-image partials (B, Np, N), summed below. Per channel: dmix itself.
  at::Tensor dmix_out = shared_mix ? at::empty({B, Np, N}, stats_opts) : at::empty(mix.sizes(), stats_opts);
  at::Tensor col_part;
  at::Tensor order, bounds;  // the images grouped by task (many tasks only)
  if (task_ptr != nullptr) std::tie(order, bounds) = group_by_task(*task, K);

  VAPT_DISPATCH_CUDA_TYPES(x.scalar_type(), "norm_and_project_bwd_cuda", [&] {
    const scalar_t* w1 = optional_ptr<scalar_t>(norm1_weight);
    const scalar_t* wg = optional_ptr<scalar_t>(gen_weight);
    const scalar_t* bg = optional_ptr<scalar_t>(gen_bias);
    // dxg[b, n, c] = sum_j mix[j, n(, c)] * dg[b, j, c]: summed rows j of dg[b], as they are.
    const RowOperand<scalar_t> dg_rows{.rows = dg.data_ptr<scalar_t>(), .z_stride = Np, .row_stride = 1, .row0 = 0,
                                       .d = d};
    launch_mix(op, mix, task_ptr, /*transpose=*/true, dg_rows, dxg.data_ptr<float>(), B, N, Np, d);

    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec = d % kVec == 0 && aligned16(dh.data_ptr()) && aligned16(x.data_ptr()) &&
                     aligned16(dx.data_ptr()) && aligned16(w1) && aligned16(wg);
    const int v = vec ? kVec : 1;
    const int groups = nap::bwd_row_groups(d, v);
    col_part = at::empty({nap::bwd_column_slots(B, T, d, v), 4, d}, stats_opts);
    const nap::Geometry rg = nap::rows_bwd_geometry(B, T);
    check_launchable(rg, op, "rows_bwd_kernel");
    const auto rows_kernel =
        task_ptr == nullptr ? (vec ? rows_bwd_kernel<scalar_t, kVec, false> : rows_bwd_kernel<scalar_t, 1, false>)
                            : (vec ? rows_bwd_kernel<scalar_t, kVec, true> : rows_bwd_kernel<scalar_t, 1, true>);
    rows_kernel<<<grid_of(rg), rg.threads, rg.dynamic_smem, stream>>>(
        dh.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), w1, wg, task_ptr, dxg.data_ptr<float>(),
        mean.data_ptr<float>(), rstd1.data_ptr<float>(), rstd_g.data_ptr<float>(), dx.data_ptr<scalar_t>(),
        col_part.data_ptr<float>(), T, d, P, groups);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    if (shared_mix) {
      // dmix_out[b, j, n] = sum_c dg[b, j, c] * LN_g(x)[b, P + n, c]: z = b, m = j, summed k = c, and
      // the output's c = n.
      const StridedOperand<scalar_t> dg_b{.a = dg.data_ptr<scalar_t>(), .z_stride = Np * d, .m_stride = d,
                                          .k_stride = 1, .c_stride = 0};
      const RowOperand<scalar_t> xg{.rows = x.data_ptr<scalar_t>(), .z_stride = T, .row_stride = 1, .row0 = P,
                                    .d = d, .channels_along_k = true, .mean = mean.data_ptr<float>(),
                                    .rstd = rstd_g.data_ptr<float>(), .w = wg, .b = bg, .task = task_ptr};
      if (task_ptr == nullptr) {
        launch_project<nap::SharedMixTile, false>(op, dg_b, xg, dmix_out.data_ptr<float>(), Np * N, N, B, Np, d, N);
      } else {
        launch_project<nap::SharedMixTile, true>(op, dg_b, xg, dmix_out.data_ptr<float>(), Np * N, N, B, Np, d, N);
      }
    } else {
      // dmix[j, n, c] = sum_b dg[b, j, c] * LN_g(x)[b, P + n, c]: z = n, m = j, summed k = b (with
      // task: dmix[s] sums task s's images, in `order`, each with its gen affine row).
      const StridedOperand<scalar_t> dg_by_prompt{.a = dg.data_ptr<scalar_t>(), .z_stride = 0, .m_stride = d,
                                                  .k_stride = Np * d, .c_stride = 1};
      const RowOperand<scalar_t> xg{.rows = x.data_ptr<scalar_t>(), .z_stride = 1, .row_stride = T, .row0 = P,
                                    .d = d, .mean = mean.data_ptr<float>(), .rstd = rstd_g.data_ptr<float>(),
                                    .w = wg, .b = bg, .task = task_ptr, .image_along_k = true};
      if (task_ptr == nullptr) {
        launch_project<nap::ChannelMixTile, false>(op, dg_by_prompt, xg, dmix_out.data_ptr<float>(), d, N * d, N, Np,
                                                   B, d);
      } else {
        const KSegments seg{.order = order.data_ptr<int64_t>(), .bounds = bounds.data_ptr<int64_t>(),
                            .out_stride = Np * N * d};
        launch_project<nap::ChannelMixTile, true>(op, dg_by_prompt, xg, dmix_out.data_ptr<float>(), d, N * d, N, Np,
                                                  B, d, seg, K);
      }
    }
  });
  // One fresh tensor per gradient (outputs must not alias one buffer): sums over the slots.
  at::Tensor dnorm1_weight = at::sum(col_part.select(1, 0), {0});
  at::Tensor dnorm1_bias = at::sum(col_part.select(1, 1), {0});
  if (task_ptr == nullptr) {
    at::Tensor dgen_weight = at::sum(col_part.select(1, 2), {0});
    at::Tensor dgen_bias = at::sum(col_part.select(1, 3), {0});
    at::Tensor dmix = shared_mix ? at::sum(dmix_out, {0}) : dmix_out;
    return {dx, dnorm1_weight, dnorm1_bias, dgen_weight, dgen_bias, dmix};
  }
  // Per task: image b's column partials are its S consecutive slots of col_part (slots, 4, d).
  const int64_t S = col_part.size(0) / B;
  at::Tensor dgen_weight = at::empty({K, d}, stats_opts);
  at::Tensor dgen_bias = at::empty({K, d}, stats_opts);
  launch_task_sum(op, col_part.data_ptr<float>() + 2 * d, S, 4 * d, order, bounds, dgen_weight, d);
  launch_task_sum(op, col_part.data_ptr<float>() + 3 * d, S, 4 * d, order, bounds, dgen_bias, d);
  at::Tensor dmix = dmix_out;
  if (shared_mix) {
    dmix = at::empty(mix.sizes(), stats_opts);
    launch_task_sum(op, dmix_out.data_ptr<float>(), 1, Np * N, order, bounds, dmix, Np * N);
  }
  return {dx, dnorm1_weight, dnorm1_bias, dgen_weight, dgen_bias, dmix};
}

}  // namespace
}  // namespace vapt

TORCH_LIBRARY_IMPL(vapt, CUDA, m) {
  m.impl("norm_and_project_fwd", &vapt::norm_and_project_fwd_cuda);
  m.impl("norm_and_project_bwd", &vapt::norm_and_project_bwd_cuda);
}
