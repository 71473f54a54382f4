// ATen launcher of the CUDA kernels of vapt::norm_and_project_fwd / _bwd (docs/design.md §1.4); the
// kernels and what they compute are in norm_and_project_device.cuh, the launch geometry in
// norm_and_project_launch.h. The backward launches launch_prompt_grad (dxg), launch_rows_bwd (dx
// and the column partials), launch_mix_grad (dmix), then sums the partials (sum_partials, or
// sum_partials_per_task with a task index).
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
#include "norm_and_project_device.cuh"
#include "norm_and_project_launch.h"

namespace vapt {
namespace {

using norm_and_project::bwd_column_slots;
using norm_and_project::bwd_row_groups;
using norm_and_project::ChannelMixTaskTile;
using norm_and_project::ChannelMixTile;
using norm_and_project::Geometry;
using norm_and_project::project_geometry;
using norm_and_project::rows_bwd_geometry;
using norm_and_project::rows_fwd_geometry;
using norm_and_project::SharedMixTile;
using norm_and_project::task_sum_geometry;

template <typename scalar_t>
const scalar_t* optional_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<scalar_t>() : nullptr;
}

dim3 grid_of(const Geometry& g) {
  return dim3(static_cast<unsigned int>(g.grid_x), static_cast<unsigned int>(g.grid_y),
              static_cast<unsigned int>(g.grid_z));
}

// The kernels' own limit: CUDA's grid dimensions.
void check_launchable(const Geometry& g, const char* op, const char* kernel) {
  TORCH_CHECK(norm_and_project::launchable(g), op, ": these shapes need a grid of (", g.grid_x, ", ", g.grid_y,
              ", ", g.grid_z, ") blocks for ", kernel, ", over CUDA's limits (", norm_and_project::kMaxGridX, ", ",
              norm_and_project::kMaxGridYZ, ", ", norm_and_project::kMaxGridYZ, ")");
}

// out[z, m, c] = sum_k A[z, m, k(, c)] * Bop[z, k, c] for z < Z, m < M, c < C, k < K, on `Tile`;
// TASKS reads the operands' task indices and, with `segments` > 1, the per-task sums of `seg`.
template <typename Tile, bool TASKS, typename a_t, typename scalar_t, typename out_t>
void launch_project(const char* op, StridedOperand<a_t> A, RowOperand<scalar_t> Bop, out_t* out, int64_t oz,
                    int64_t om, int64_t Z, int64_t M, int64_t K, int64_t C, KSegments seg = {},
                    int64_t segments = 1) {
  TORCH_INTERNAL_ASSERT(A.z_stride == 0 || Tile::BZ == 1, op, ": project_kernel stages A once per block of z");
  const Geometry g = project_geometry<Tile>(Z, M, C, segments);
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
      launch_project<SharedMixTile, false>(op, A, Bop, out, M * d, d, B, M, K, d);
    } else {
      launch_project<ChannelMixTile, false>(op, A, Bop, out, M * d, d, B, M, K, d);
    }
  } else if (shared) {
    launch_project<SharedMixTile, true>(op, A, Bop, out, M * d, d, B, M, K, d);
  } else {
    launch_project<ChannelMixTaskTile, true>(op, A, Bop, out, M * d, d, B, M, K, d);
  }
}

// out (tasks, L) = per-task sums of per-image partials (task_sum_kernel): image b's are the S rows
// part[b * S ...] of `stride` floats, its first L read.
void launch_task_sum(const char* op, const float* part, int64_t S, int64_t stride, const at::Tensor& order,
                     const at::Tensor& bounds, at::Tensor& out, int64_t L) {
  const Geometry g = task_sum_geometry(out.size(0), L);
  check_launchable(g, op, "task_sum_kernel");
  task_sum_kernel<<<grid_of(g), g.threads, g.dynamic_smem, at::cuda::getCurrentCUDAStream()>>>(
      part, order.data_ptr<int64_t>(), bounds.data_ptr<int64_t>(), out.data_ptr<float>(), S, stride, L);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The images grouped by task: order (B,) the stable sort's permutation, bounds (K + 1,) where task
// s's images order[bounds[s] : bounds[s + 1]] begin and end. On the device, without a host sync.
std::pair<at::Tensor, at::Tensor> group_by_task(const at::Tensor& task, int64_t K) {
  const auto [sorted, order] = at::sort(task, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  return {order, at::searchsorted(sorted, at::arange(K + 1, task.options()))};
}

// The task index's data, or nullptr without one.
const int64_t* task_data(const std::optional<at::Tensor>& task) {
  return has_task_index(task) ? task->data_ptr<int64_t>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_and_project_fwd_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& norm1_weight, const std::optional<at::Tensor>& norm1_bias,
    double eps1, const std::optional<at::Tensor>& gen_weight, const std::optional<at::Tensor>& gen_bias,
    double eps_g, const at::Tensor& mix, int64_t num_prefix, const std::optional<at::Tensor>& task) {
  constexpr const char* op = "vapt::norm_and_project_fwd (CUDA)";
  const at::Tensor mix_task = check_norm_and_project_fwd(op, at::kCUDA, x, norm1_weight, norm1_bias, gen_weight,
                                                          gen_bias, mix, num_prefix, task);
  const int64_t* task_ptr = task_data(task);
  const int64_t B = x.size(0), T = x.size(1), d = x.size(2), Np = mix_task.size(0), P = num_prefix, N = T - P;
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
    const Geometry rg = rows_fwd_geometry(B, T);
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

// What the backward's kernels read: the inputs, their sizes, the task index and, with one, the
// images grouped by task (group_by_task).
struct BwdInputs {
  const at::Tensor &dh, &dg, &x, &mix, &mean, &rstd1, &rstd_g;
  const std::optional<at::Tensor> &norm1_weight, &gen_weight, &gen_bias;
  int64_t B, T, d, Np, P, N, K;
  bool shared_mix;
  const int64_t* task;  // (B,) or nullptr
  at::Tensor order, bounds;  // with task only
};

// dxg[b, n, c] = sum_j mix[j, n(, c)] * dg[b, j, c], the gradient reaching LN_g(x) (B, N, d) float:
// summed rows j of dg[b], as they are.
template <typename scalar_t>
void launch_prompt_grad(const char* op, const BwdInputs& in, at::Tensor& dxg) {
  const RowOperand<scalar_t> dg_rows{.rows = in.dg.data_ptr<scalar_t>(), .z_stride = in.Np, .row_stride = 1,
                                     .row0 = 0, .d = in.d};
  launch_mix(op, in.mix, in.task, /*transpose=*/true, dg_rows, dxg.data_ptr<float>(), in.B, in.N, in.Np, in.d);
}

// dx (both LayerNorm terms) and the column partials (slots, 4, d) of dnorm1_weight, dnorm1_bias,
// dgen_weight, dgen_bias (rows_bwd_kernel); returns the column partials.
template <typename scalar_t>
at::Tensor launch_rows_bwd(const char* op, const BwdInputs& in, const at::Tensor& dxg, at::Tensor& dx) {
  const scalar_t* w1 = optional_ptr<scalar_t>(in.norm1_weight);
  const scalar_t* wg = optional_ptr<scalar_t>(in.gen_weight);
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool vec = in.d % kVec == 0 && aligned16(in.dh.data_ptr()) && aligned16(in.x.data_ptr()) &&
                   aligned16(dx.data_ptr()) && aligned16(w1) && aligned16(wg);
  const int v = vec ? kVec : 1;
  const int groups = bwd_row_groups(in.d, v);
  at::Tensor col_part = at::empty({bwd_column_slots(in.B, in.T, in.d, v), 4, in.d}, dxg.options());  // float
  const Geometry rg = rows_bwd_geometry(in.B, in.T);
  check_launchable(rg, op, "rows_bwd_kernel");
  const auto rows_kernel =
      in.task == nullptr ? (vec ? rows_bwd_kernel<scalar_t, kVec, false> : rows_bwd_kernel<scalar_t, 1, false>)
                         : (vec ? rows_bwd_kernel<scalar_t, kVec, true> : rows_bwd_kernel<scalar_t, 1, true>);
  rows_kernel<<<grid_of(rg), rg.threads, rg.dynamic_smem, at::cuda::getCurrentCUDAStream()>>>(
      in.dh.data_ptr<scalar_t>(), in.x.data_ptr<scalar_t>(), w1, wg, in.task, dxg.data_ptr<float>(),
      in.mean.data_ptr<float>(), in.rstd1.data_ptr<float>(), in.rstd_g.data_ptr<float>(), dx.data_ptr<scalar_t>(),
      col_part.data_ptr<float>(), in.T, in.d, in.P, groups);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return col_part;
}

// The mix gradient, into dmix_out: for the shared mix the per-image partials (B, Np, N),
// dmix_out[b, j, n] = sum_c dg[b, j, c] * LN_g(x)[b, P + n, c] (z = b, m = j, summed k = c, and the
// output's c = n); per channel dmix itself, dmix[j, n, c] = sum_b dg[b, j, c] * LN_g(x)[b, P + n, c]
// (z = n, m = j, summed k = b; with task: dmix[s] sums task s's images, in `order`, each with its
// gen affine row).
template <typename scalar_t>
void launch_mix_grad(const char* op, const BwdInputs& in, at::Tensor& dmix_out) {
  const scalar_t* wg = optional_ptr<scalar_t>(in.gen_weight);
  const scalar_t* bg = optional_ptr<scalar_t>(in.gen_bias);
  const int64_t B = in.B, T = in.T, d = in.d, Np = in.Np, P = in.P, N = in.N;
  float* out = dmix_out.data_ptr<float>();
  if (in.shared_mix) {
    const StridedOperand<scalar_t> dg_b{.a = in.dg.data_ptr<scalar_t>(), .z_stride = Np * d, .m_stride = d,
                                        .k_stride = 1, .c_stride = 0};
    const RowOperand<scalar_t> xg{.rows = in.x.data_ptr<scalar_t>(), .z_stride = T, .row_stride = 1, .row0 = P,
                                  .d = d, .channels_along_k = true, .mean = in.mean.data_ptr<float>(),
                                  .rstd = in.rstd_g.data_ptr<float>(), .w = wg, .b = bg, .task = in.task};
    if (in.task == nullptr) {
      launch_project<SharedMixTile, false>(op, dg_b, xg, out, Np * N, N, B, Np, d, N);
    } else {
      launch_project<SharedMixTile, true>(op, dg_b, xg, out, Np * N, N, B, Np, d, N);
    }
    return;
  }
  const StridedOperand<scalar_t> dg_by_prompt{.a = in.dg.data_ptr<scalar_t>(), .z_stride = 0, .m_stride = d,
                                              .k_stride = Np * d, .c_stride = 1};
  const RowOperand<scalar_t> xg{.rows = in.x.data_ptr<scalar_t>(), .z_stride = 1, .row_stride = T, .row0 = P,
                                .d = d, .mean = in.mean.data_ptr<float>(), .rstd = in.rstd_g.data_ptr<float>(),
                                .w = wg, .b = bg, .task = in.task, .image_along_k = true};
  if (in.task == nullptr) {
    launch_project<ChannelMixTile, false>(op, dg_by_prompt, xg, out, d, N * d, N, Np, B, d);
  } else {
    const KSegments seg{.order = in.order.data_ptr<int64_t>(), .bounds = in.bounds.data_ptr<int64_t>(),
                        .out_stride = Np * N * d};
    launch_project<ChannelMixTile, true>(op, dg_by_prompt, xg, out, d, N * d, N, Np, B, d, seg, in.K);
  }
}

using BwdOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The backward's outputs from the kernels' partials, one fresh tensor per gradient (outputs must
// not alias one buffer). Without task: the weight/bias gradients are the column partials summed
// over the slots, the shared-mix dmix the per-image partials summed over the images (at::sum, a
// fixed order); the per-channel dmix is dmix_out itself.
BwdOutputs sum_partials(const at::Tensor& dx, const at::Tensor& col_part, const at::Tensor& dmix_out,
                        bool shared_mix) {
  at::Tensor dnorm1_weight = at::sum(col_part.select(1, 0), {0});
  at::Tensor dnorm1_bias = at::sum(col_part.select(1, 1), {0});
  at::Tensor dgen_weight = at::sum(col_part.select(1, 2), {0});
  at::Tensor dgen_bias = at::sum(col_part.select(1, 3), {0});
  at::Tensor dmix = shared_mix ? at::sum(dmix_out, {0}) : dmix_out;
  return {dx, dnorm1_weight, dnorm1_bias, dgen_weight, dgen_bias, dmix};
}

// The same with task: dnorm1 as above; dgen_weight, dgen_bias (K, d) and the shared-mix dmix
// (K, Np, N) are the per-task sums of the per-image partials (task_sum_kernel: image b's column
// partials are its S consecutive slots of col_part (slots, 4, d)); the per-channel dmix was summed
// per task by project_kernel.
BwdOutputs sum_partials_per_task(const char* op, const BwdInputs& in, const at::Tensor& dx, const at::Tensor& col_part,
                                 const at::Tensor& dmix_out) {
  at::Tensor dnorm1_weight = at::sum(col_part.select(1, 0), {0});
  at::Tensor dnorm1_bias = at::sum(col_part.select(1, 1), {0});
  const int64_t S = col_part.size(0) / in.B, d = in.d;
  at::Tensor dgen_weight = at::empty({in.K, d}, col_part.options());
  at::Tensor dgen_bias = at::empty({in.K, d}, col_part.options());
  launch_task_sum(op, col_part.data_ptr<float>() + 2 * d, S, 4 * d, in.order, in.bounds, dgen_weight, d);
  launch_task_sum(op, col_part.data_ptr<float>() + 3 * d, S, 4 * d, in.order, in.bounds, dgen_bias, d);
  at::Tensor dmix = dmix_out;
  if (in.shared_mix) {
    const int64_t size = in.Np * in.N;
    dmix = at::empty(in.mix.sizes(), col_part.options());
    launch_task_sum(op, dmix_out.data_ptr<float>(), 1, size, in.order, in.bounds, dmix, size);
  }
  return {dx, dnorm1_weight, dnorm1_bias, dgen_weight, dgen_bias, dmix};
}

BwdOutputs norm_and_project_bwd_cuda(const at::Tensor& dh, const at::Tensor& dg, const at::Tensor& x,
                                     const std::optional<at::Tensor>& norm1_weight,
                                     const std::optional<at::Tensor>& gen_weight,
                                     const std::optional<at::Tensor>& gen_bias, const at::Tensor& mix,
                                     const at::Tensor& mean, const at::Tensor& rstd1, const at::Tensor& rstd_g,
                                     int64_t num_prefix, const std::optional<at::Tensor>& task) {
  constexpr const char* op = "vapt::norm_and_project_bwd (CUDA)";
  const at::Tensor mix_task = check_norm_and_project_bwd(op, at::kCUDA, dh, dg, x, norm1_weight, gen_weight,
                                                          gen_bias, mix, mean, rstd1, rstd_g, num_prefix, task);
  const int64_t* task_ptr = task_data(task);
  const int64_t B = x.size(0), T = x.size(1), d = x.size(2);
  BwdInputs in{.dh = dh, .dg = dg, .x = x, .mix = mix, .mean = mean, .rstd1 = rstd1, .rstd_g = rstd_g,
               .norm1_weight = norm1_weight, .gen_weight = gen_weight, .gen_bias = gen_bias,
               .B = B, .T = T, .d = d, .Np = mix_task.size(0), .P = num_prefix, .N = T - num_prefix,
               .K = task_ptr != nullptr ? mix.size(0) : 1, .shared_mix = mix_task.dim() == 2, .task = task_ptr};

  c10::cuda::CUDAGuard guard(x.device());
  const at::TensorOptions stats_opts = x.options().dtype(stats_dtype(x));
  at::Tensor dx = at::empty_like(x);
  if (B == 0 || T == 0) {
    const std::vector<int64_t> gen_shape = gen_affine_shape(x, mix, task_ptr != nullptr);
    return {dx, at::zeros({d}, stats_opts), at::zeros({d}, stats_opts), at::zeros(gen_shape, stats_opts),
            at::zeros(gen_shape, stats_opts), at::zeros(mix.sizes(), stats_opts)};
  }
  at::Tensor dxg = at::empty({B, in.N, d}, stats_opts);
  // Shared layout: per-image partials (B, Np, N), summed after. Per channel: dmix itself.
  at::Tensor dmix_out = in.shared_mix ? at::empty({B, in.Np, in.N}, stats_opts) : at::empty(mix.sizes(), stats_opts);
  at::Tensor col_part;
  if (task_ptr != nullptr) std::tie(in.order, in.bounds) = group_by_task(*task, in.K);

  VAPT_DISPATCH_CUDA_TYPES(x.scalar_type(), "norm_and_project_bwd_cuda", [&] {
    launch_prompt_grad<scalar_t>(op, in, dxg);
    col_part = launch_rows_bwd<scalar_t>(op, in, dxg, dx);
    launch_mix_grad<scalar_t>(op, in, dmix_out);
  });
  return task_ptr == nullptr ? sum_partials(dx, col_part, dmix_out, in.shared_mix)
                             : sum_partials_per_task(op, in, dx, col_part, dmix_out);
}

}  // namespace
}  // namespace vapt

TORCH_LIBRARY_IMPL(vapt, CUDA, m) {
  m.impl("norm_and_project_fwd", &vapt::norm_and_project_fwd_cuda);
  m.impl("norm_and_project_bwd", &vapt::norm_and_project_bwd_cuda);
}
