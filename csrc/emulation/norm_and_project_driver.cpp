// Host driver that runs the CUDA norm_and_project kernels (csrc/cuda/norm_and_project_device.cuh)
// under the host emulation (cuda_host.h), for tests/test_cuda_emulation.py:
//
//   driver norm_and_project IN OUT
//     IN:  int32 {dtype (0 fp32, 1 fp16, 2 bf16), B, T, d, Np, P (num_prefix), per_channel (mix is
//          (Np, N, d), else (Np, N)), affine (bits 0..3: norm1_weight, norm1_bias, gen_weight,
//          gen_bias given, else None), backward, tasks (0: task None; K >= 1: a task index and
//          the per-task mix and gen affines)}, float32 eps1, eps_g, then float32 x (B, T, d), the
//          given affine parameters (d,) in that order ((K, d) for the gen ones with tasks), mix
//          ((K,) + the shape above with tasks), with tasks the task index (B,) (whole values),
//          and with backward dh (B, T, d), dg (B, Np, d).
//     OUT: float32 h, g, mean, rstd1, rstd_g, int32 vec (whether rows_fwd_kernel ran on 16-byte
//          packs), and with backward float32 dx, dnorm1_weight, dnorm1_bias, dgen_weight,
//          dgen_bias ((K, d) with tasks), dmix, int32 vec (rows_bwd_kernel's).
//
// The tensors are what the launcher (csrc/cuda/norm_and_project_kernel.cu) gets from the op (see
// vapt_kernels.ops.library.norm_and_project): x, dh, dg and the affine parameters in x's dtype, mix
// in float32, all contiguous; the backward reads the statistics the forward wrote. Outputs and
// scratch buffers start as NaN, so an element a kernel forgets to write fails the test. The launch
// sequence, the operands and the choice of the 16-byte path are the launcher's; the sums it does
// with at::sum after the kernels and the grouping of the images by task (at::sort, at::searchsorted)
// are done here in plain C++ (marked below).

#include "cuda_host.h"
#include "driver_io.h"

#include "../cuda/norm_and_project_device.cuh"

#include <algorithm>
#include <cstdio>
#include <numeric>
#include <string>
#include <vector>

namespace {

using namespace vapt;
using norm_and_project::bwd_column_slots;
using norm_and_project::bwd_row_groups;
using norm_and_project::ChannelMixTaskTile;
using norm_and_project::ChannelMixTile;
using norm_and_project::Geometry;
using norm_and_project::launchable;
using norm_and_project::project_geometry;
using norm_and_project::rows_bwd_geometry;
using norm_and_project::rows_fwd_geometry;
using norm_and_project::SharedMixTile;
using norm_and_project::task_sum_geometry;
using vapt_emu::io::as_floats;
using vapt_emu::io::nan_filled;
using vapt_emu::io::read_floats;
using vapt_emu::io::to;
using vapt_emu::io::write_floats;
using vapt_emu::io::write_ints;

struct Header {
  int32_t dtype, B, T, d, Np, P, per_channel, affine, backward, tasks;
  float eps1, eps_g;
};

dim3 grid_of(const Geometry& g) {
  return dim3(static_cast<unsigned>(g.grid_x), static_cast<unsigned>(g.grid_y), static_cast<unsigned>(g.grid_z));
}

void check_launchable(const Geometry& g) {
  if (!launchable(g)) vapt_emu::fail("driver: a grid over CUDA's limits (the launcher refuses these shapes)");
}

// The launcher's launch_project.
template <typename Tile, bool TASKS, typename a_t, typename scalar_t, typename out_t>
void launch_project(StridedOperand<a_t> A, RowOperand<scalar_t> Bop, out_t* out, int64_t oz, int64_t om, int64_t Z,
                    int64_t M, int64_t K, int64_t C, KSegments seg = {}, int64_t segments = 1) {
  if (A.z_stride != 0 && Tile::BZ != 1) vapt_emu::fail("driver: project_kernel stages A once per block of z");
  const Geometry g = project_geometry<Tile>(Z, M, C, segments);
  check_launchable(g);
  vapt_emu_launch(project_kernel<Tile, TASKS, a_t, scalar_t, out_t>, grid_of(g), dim3(g.threads), g.dynamic_smem, A,
                  Bop, seg, out, oz, om, Z, M, K, C);
}

// The launcher's mix_operand: mix (Np, N) or (Np, N, d) as A[j, n(, c)], or A[n, j(, c)] with
// `transpose`; with `task`, mix is stacked per task and image z reads the slice task[z].
StridedOperand<float> mix_operand(const float* mix, const int64_t* task, bool shared, int64_t Np, int64_t N, int64_t d,
                                  bool transpose) {
  const int64_t sj = shared ? N : N * d, sn = shared ? 1 : d, sc = shared ? 0 : 1;
  const int64_t per_task = task != nullptr ? Np * N * (shared ? 1 : d) : 0;
  return {mix, per_task, transpose ? sn : sj, transpose ? sj : sn, sc, task};
}

// The launcher's launch_mix.
template <typename scalar_t, typename out_t>
void launch_mix(const float* mix, const int64_t* task, bool shared, int64_t Np, int64_t N, bool transpose,
                RowOperand<scalar_t> Bop, out_t* out, int64_t B, int64_t M, int64_t K, int64_t d) {
  const StridedOperand<float> A = mix_operand(mix, task, shared, Np, N, d, transpose);
  if (task == nullptr) {
    if (shared) {
      launch_project<SharedMixTile, false>(A, Bop, out, M * d, d, B, M, K, d);
    } else {
      launch_project<ChannelMixTile, false>(A, Bop, out, M * d, d, B, M, K, d);
    }
  } else if (shared) {
    launch_project<SharedMixTile, true>(A, Bop, out, M * d, d, B, M, K, d);
  } else {
    launch_project<ChannelMixTaskTile, true>(A, Bop, out, M * d, d, B, M, K, d);
  }
}

// The launcher's launch_task_sum: out (tasks, L).
void launch_task_sum(const float* part, int64_t S, int64_t stride, const std::vector<int64_t>& order,
                     const std::vector<int64_t>& bounds, std::vector<float>& out, int64_t L) {
  const Geometry g = task_sum_geometry(static_cast<int64_t>(bounds.size()) - 1, L);
  check_launchable(g);
  vapt_emu_launch(task_sum_kernel, grid_of(g), dim3(g.threads), g.dynamic_smem, part, order.data(), bounds.data(),
                  out.data(), S, stride, L);
}

// The launcher's group_by_task (at::sort(stable) and at::searchsorted, in plain C++): order (B,)
// the images by task, ascending within a task, and bounds (K + 1,).
void group_by_task(const std::vector<int64_t>& task, int64_t K, std::vector<int64_t>& order,
                   std::vector<int64_t>& bounds) {
  order.resize(task.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return task[a] < task[b]; });
  bounds.assign(K + 1, 0);
  for (int64_t s = 0; s <= K; ++s) {
    bounds[s] = std::count_if(task.begin(), task.end(), [&](int64_t t) { return t < s; });
  }
}

template <typename scalar_t>
void run(const Header& hd, FILE* in, FILE* out_file) {
  const int64_t B = hd.B, T = hd.T, d = hd.d, Np = hd.Np, P = hd.P, N = T - P;
  const bool shared_mix = !hd.per_channel, tasks = hd.tasks > 0;
  const int64_t K = tasks ? hd.tasks : 1;
  const size_t n_x = static_cast<size_t>(B * T * d), n_g = static_cast<size_t>(B * Np * d);
  const size_t n_mix = static_cast<size_t>(K * (shared_mix ? Np * N : Np * N * d));

  const std::vector<scalar_t> x = to<scalar_t>(read_floats(in, n_x));
  std::vector<scalar_t> affine[4];  // norm1_weight, norm1_bias, gen_weight, gen_bias; empty = None
  const scalar_t* params[4];
  for (int i = 0; i < 4; ++i) {
    if (hd.affine >> i & 1) affine[i] = to<scalar_t>(read_floats(in, i >= 2 ? K * d : d));
    params[i] = affine[i].empty() ? nullptr : affine[i].data();
  }
  const scalar_t *w1 = params[0], *b1 = params[1], *wg = params[2], *bg = params[3];
  const std::vector<float> mix = read_floats(in, n_mix);
  std::vector<int64_t> task;
  if (tasks) {
    for (float t : read_floats(in, B)) task.push_back(static_cast<int64_t>(t));
  }
  const int64_t* task_ptr = tasks ? task.data() : nullptr;
  constexpr int kVec = 16 / sizeof(scalar_t);

  if (B == 0) {  // the launcher's early returns: empty h, g, statistics and dx, zero gradients
    write_ints(out_file, {0});
    if (!hd.backward) return;
    for (int i = 0; i < 4; ++i) write_floats(out_file, std::vector<float>(i >= 2 ? K * d : d, 0.0f));
    write_floats(out_file, std::vector<float>(n_mix, 0.0f));
    write_ints(out_file, {0});
    return;
  }

  // ---- forward (norm_and_project_fwd_cuda) ----
  std::vector<scalar_t> h = nan_filled<scalar_t>(n_x), g = nan_filled<scalar_t>(n_g);
  std::vector<float> mean = nan_filled<float>(B * T), rstd1 = nan_filled<float>(B * T);
  std::vector<float> rstd_g = nan_filled<float>(B * T);
  const bool vec_fwd = d % kVec == 0 && aligned16(x.data()) && aligned16(h.data()) && aligned16(w1) && aligned16(b1);
  const Geometry rg = rows_fwd_geometry(B, T);
  check_launchable(rg);
  const auto rows_fwd = vec_fwd ? rows_fwd_kernel<scalar_t, kVec> : rows_fwd_kernel<scalar_t, 1>;
  vapt_emu_launch(rows_fwd, grid_of(rg), dim3(rg.threads), rg.dynamic_smem, x.data(), w1, b1, h.data(), mean.data(),
                  rstd1.data(), rstd_g.data(), B * T, d, hd.eps1, hd.eps_g);
  const RowOperand<scalar_t> xg{x.data(), T, 1, P, d, false, mean.data(), rstd_g.data(), wg, bg, task_ptr};
  launch_mix(mix.data(), task_ptr, shared_mix, Np, N, /*transpose=*/false, xg, g.data(), B, Np, N, d);
  for (const std::vector<float>& t : {as_floats(h), as_floats(g), mean, rstd1, rstd_g}) write_floats(out_file, t);
  write_ints(out_file, {vec_fwd ? 1 : 0});
  if (!hd.backward) return;

  // ---- backward (norm_and_project_bwd_cuda) ----
  const std::vector<scalar_t> dh = to<scalar_t>(read_floats(in, n_x)), dg = to<scalar_t>(read_floats(in, n_g));
  std::vector<scalar_t> dx = nan_filled<scalar_t>(n_x);
  std::vector<float> dxg = nan_filled<float>(B * N * d);
  // Shared layout: per-image partials (B, Np, N). Per channel: dmix itself.
  std::vector<float> dmix_out = nan_filled<float>(shared_mix ? B * Np * N : n_mix);
  std::vector<int64_t> order, bounds;
  if (tasks) group_by_task(task, K, order, bounds);

  const RowOperand<scalar_t> dg_rows{dg.data(), Np, 1, 0, d};
  launch_mix(mix.data(), task_ptr, shared_mix, Np, N, /*transpose=*/true, dg_rows, dxg.data(), B, N, Np, d);

  const bool vec_bwd = d % kVec == 0 && aligned16(dh.data()) && aligned16(x.data()) && aligned16(dx.data()) &&
                       aligned16(w1) && aligned16(wg);
  const int v = vec_bwd ? kVec : 1;
  const int groups = bwd_row_groups(d, v);
  const int64_t slots = bwd_column_slots(B, T, d, v);
  std::vector<float> col_part = nan_filled<float>(slots * 4 * d);
  const Geometry bg_geom = rows_bwd_geometry(B, T);
  check_launchable(bg_geom);
  const auto rows_bwd =
      !tasks ? (vec_bwd ? rows_bwd_kernel<scalar_t, kVec, false> : rows_bwd_kernel<scalar_t, 1, false>)
             : (vec_bwd ? rows_bwd_kernel<scalar_t, kVec, true> : rows_bwd_kernel<scalar_t, 1, true>);
  vapt_emu_launch(rows_bwd, grid_of(bg_geom), dim3(bg_geom.threads), bg_geom.dynamic_smem, dh.data(), x.data(), w1,
                  wg, task_ptr, dxg.data(), mean.data(), rstd1.data(), rstd_g.data(), dx.data(), col_part.data(), T, d,
                  P, groups);

  if (shared_mix) {
    const StridedOperand<scalar_t> dg_b{dg.data(), Np * d, d, 1, 0};
    const RowOperand<scalar_t> xg_k{x.data(), T, 1, P, d, true, mean.data(), rstd_g.data(), wg, bg, task_ptr};
    if (tasks) {
      launch_project<SharedMixTile, true>(dg_b, xg_k, dmix_out.data(), Np * N, N, B, Np, d, N);
    } else {
      launch_project<SharedMixTile, false>(dg_b, xg_k, dmix_out.data(), Np * N, N, B, Np, d, N);
    }
  } else {
    const StridedOperand<scalar_t> dg_by_prompt{dg.data(), 0, d, Np * d, 1};
    const RowOperand<scalar_t> xg_n{x.data(), 1, T, P, d, false, mean.data(), rstd_g.data(), wg, bg, task_ptr, true};
    if (tasks) {
      const KSegments seg{order.data(), bounds.data(), Np * N * d};
      launch_project<ChannelMixTile, true>(dg_by_prompt, xg_n, dmix_out.data(), d, N * d, N, Np, B, d, seg, K);
    } else {
      launch_project<ChannelMixTile, false>(dg_by_prompt, xg_n, dmix_out.data(), d, N * d, N, Np, B, d);
    }
  }

  // The launcher's at::sum calls, in plain C++: the affine gradients are col_part (slots, 4, d)
  // summed over the slots; the shared-mix dmix is dmix_out (B, Np, N) summed over the images. With
  // tasks, the gen ones and the shared-mix dmix come from task_sum_kernel instead.
  std::vector<std::vector<float>> affine_grads(4, std::vector<float>(d, 0.0f));
  for (int64_t s = 0; s < slots; ++s)
    for (int k = 0; k < 4; ++k)
      for (int64_t c = 0; c < d; ++c) affine_grads[k][c] += col_part[(s * 4 + k) * d + c];
  std::vector<float> dmix = dmix_out;
  if (tasks) {
    for (int k = 2; k < 4; ++k) {
      affine_grads[k] = nan_filled<float>(K * d);
      launch_task_sum(col_part.data() + k * d, slots / B, 4 * d, order, bounds, affine_grads[k], d);
    }
    if (shared_mix) {
      dmix = nan_filled<float>(n_mix);
      launch_task_sum(dmix_out.data(), 1, Np * N, order, bounds, dmix, Np * N);
    }
  } else if (shared_mix) {
    dmix.assign(n_mix, 0.0f);
    for (int64_t b = 0; b < B; ++b)
      for (size_t i = 0; i < n_mix; ++i) dmix[i] += dmix_out[b * n_mix + i];
  }

  write_floats(out_file, as_floats(dx));
  for (const std::vector<float>& t : affine_grads) write_floats(out_file, t);
  write_floats(out_file, dmix);
  write_ints(out_file, {vec_bwd ? 1 : 0});
}

}  // namespace

int main(int argc, char** argv) {
  return vapt_emu::io::driver_main<Header>(argc, argv, "norm_and_project", "norm_and_project IN OUT",
                                           [](auto zero, const Header& hd, FILE* in, FILE* out) {
                                             run<decltype(zero)>(hd, in, out);
                                           });
}
