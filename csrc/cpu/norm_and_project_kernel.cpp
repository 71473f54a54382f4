// CPU kernels of vapt::norm_and_project_fwd / _bwd (schema in ../vapt.cpp; docs/design.md §1.4).
//
// Shapes: x (B, T, d) with T = P + N (P prefix tokens, N patches); weights and biases (d,) or None
// (ones / zeros); mix (Np, N) shared or (Np, N, d) per channel, stats dtype.
//   forward:  h = LN_1(x) (B, T, d), g[b] = mix @ LN_g(x[b, P:]) (B, Np, d), both in x's dtype;
//             mean, rstd1, rstd_g (B, T) stats dtype (float32, float64 for float64 x).
//   backward: dx (B, T, d) in x's dtype = the sum of both LayerNorm backward terms;
//             dnorm1_weight, dnorm1_bias, dgen_weight, dgen_bias (d,) and dmix (mix's shape), stats.
// With a task index task (B,) int64 in [0, K): mix is stacked per task, (K, Np, N) or (K, Np, N, d),
// gen_weight/gen_bias are (K, d) (None: ones / zeros), and image b uses the slices of task[b] (a
// pointer offset, no per-image copy); dgen_weight, dgen_bias (K, d) and dmix (K, ...) hold in slice
// k the sums over the images of task k only (zeros for a task without images). norm1's affine and
// its gradients stay (d,). Without it everything runs as the case K = 1 with every image in task 0.
//
// Why one kernel: both LayerNorms normalise the same rows with the same mean and variance (only eps
// and the affine differ), so each row of x is read once, and the prompt projection is accumulated
// while the normalised row is still in cache instead of materialising LN_g(x).
//
// Work decomposition (kept the same as the CUDA twin's programs, so both can be read side by side):
// a work item is (image group, tile of rows). Per image it first normalises its rows into opmath
// tile buffers (normalize_row, writing h; in the backward ln1_terms, the LN_1 terms), then runs the
// products with mix as register-blocked micro-kernels over the tile (the CPU form of tl.dot:
// project_tile; prompt_grads_shared / _per_channel), then (backward) finishes dx row by row
// (dx_rows). Each item keeps partial sums of its own: the forward a partial g (Np x d per
// image) in a (B, tiles, Np, d) buffer, the backward partial weight/bias gradients in an
// (items, 4, d) buffer. The partials are summed after the parallel loop in a fixed order, and the
// tiling depends on the shapes (and the task index) only, so results do not depend on the thread
// count (no atomics).
// The images of a group all have one task, so an item reads one slice of mix and of the gen affine,
// and its dgen partials belong to that task: dnorm1 sums all items, dgen[k] the items of task k's
// groups, both in item order.
// An image group is one image for the shared mix, whose dmix then has per-image partials
// (B, Np, N), summed after into dmix[task[b]] in image order. For the per-channel mix it is every
// image of one task (the whole batch without a task index; with one, the images of each task
// present, in index order, found by a counting sort once per call): the tile's block of mix
// (Np x rows x d) and the block of dmix it accumulates stay in cache across the images instead of
// being streamed once per image, and dmix needs no per-image partials: an item owns its rows of
// its task's dmix slice, so it accumulates in place.
//
// All arithmetic is in at::opmath_type<scalar_t> (float for bfloat16), vectorised over channels
// with the vector types of simd.h: each work-item loop is compiled once per ISA variant (baseline,
// AVX2, AVX-512) and simd::with_isa runs the one this CPU takes. Rows of bfloat16 tensors are
// converted to opmath scratch rows on load and back on store.

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "parallel.h"
#include "simd.h"

// ATen's OpenMP parallel_for (parallel.h) is a header template: compiled without -fopenmp it runs
// serially.
#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#pragma message("norm_and_project_kernel.cpp: built without -fopenmp, at::parallel_for runs serially")
#endif

namespace vapt {
namespace {

using simd::for_chunks;
using simd::load;
using simd::splat;
using simd::store;

// ------------------------------------------------------------------------------------------------
// Rows in opmath
// ------------------------------------------------------------------------------------------------

// A row of a scalar_t tensor as opmath values: the row itself when the types agree, else a
// converted copy in `scratch`.
template <int kBytes, typename scalar_t, typename acc_t>
VAPT_ALWAYS_INLINE const acc_t* row_in(const scalar_t* row, acc_t* scratch, int64_t d) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return row;
  } else {
    simd::convert<kBytes>(row, scratch, d);
    return scratch;
  }
}

// Where to write an output row in opmath (the row itself when the types agree), and the
// conversion of that row into the output once written.
template <typename scalar_t, typename acc_t>
VAPT_ALWAYS_INLINE acc_t* row_out(scalar_t* row, acc_t* scratch) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return row;
  } else {
    return scratch;
  }
}

template <int kBytes, typename scalar_t, typename acc_t>
VAPT_ALWAYS_INLINE void row_out_commit(const acc_t* values, scalar_t* row, int64_t d) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    simd::convert<kBytes>(values, row, d);
  }
}

// ------------------------------------------------------------------------------------------------
// Problem size and work decomposition
// ------------------------------------------------------------------------------------------------

struct Problem {
  int64_t B, T, P, N, d, Np;
  int64_t K;  // tasks (1 without a task index)
  bool per_channel;
  int64_t mix_size() const { return Np * N * (per_channel ? d : 1); }  // one task's mix
};

// The images of each group (a group has one task). Without a task index group g is images
// [g * per, (g + 1) * per) of task 0; with one, the shared mix has one image per group (per = 1,
// group g = image g of task task[g]) and the per-channel mix one group per task present, its images
// order[bounds[g]:bounds[g + 1]] in index order.
struct ImageGroups {
  int64_t count;
  int64_t per;                       // images per group when bounds is null
  const int64_t* order = nullptr;    // (B,) images grouped by task, or null: 0, 1, ..., B - 1
  const int64_t* bounds = nullptr;   // (count + 1,) offsets into order, or null
  const int64_t* task = nullptr;     // (count,) the task of each group, or null: task 0
  int64_t begin(int64_t g) const { return bounds ? bounds[g] : g * per; }
  int64_t end(int64_t g) const { return bounds ? bounds[g + 1] : (g + 1) * per; }
  int64_t image(int64_t i) const { return order ? order[i] : i; }
  int64_t task_of(int64_t g) const { return task ? task[g] : 0; }
};

// The storage behind an ImageGroups: the checked task index, and for the per-channel mix its
// counting sort. Without a task index it holds nothing.
struct TaskGroups {
  std::vector<int64_t> order, bounds, task;
  ImageGroups groups;

  TaskGroups(const TaskGroups&) = delete;  // groups points into the vectors
  TaskGroups(const char* op, const Problem& p, const std::optional<at::Tensor>& index) {
    if (!has_task_index(index)) {
      groups.count = p.per_channel ? 1 : p.B;
      groups.per = p.per_channel ? p.B : 1;
      return;
    }
    const int64_t* t = index->const_data_ptr<int64_t>();
    std::vector<int64_t> counts(p.K, 0);
    for (int64_t b = 0; b < p.B; ++b) {
      TORCH_CHECK(t[b] >= 0 && t[b] < p.K, op, ": task must be in [0, K = ", p.K, "), got task[", b,
                  "] = ", t[b]);
      ++counts[t[b]];
    }
    if (!p.per_channel) {
      groups.count = p.B;
      groups.per = 1;
      groups.task = t;
      return;
    }
    std::vector<int64_t> next(p.K);
    bounds.push_back(0);
    for (int64_t k = 0; k < p.K; ++k) {
      next[k] = bounds.back();
      if (counts[k] > 0) {
        task.push_back(k);
        bounds.push_back(bounds.back() + counts[k]);
      }
    }
    order.resize(p.B);
    for (int64_t b = 0; b < p.B; ++b) {
      order[next[t[b]]++] = b;
    }
    groups.count = static_cast<int64_t>(task.size());
    groups.per = 0;
    groups.order = order.data();
    groups.bounds = bounds.data();
    groups.task = task.data();
  }
};

// Work item i = (image group i / tiles, row tile i % tiles). Chosen from the shapes and the number
// of groups only, so the summation order (and the result) is the same on every machine and thread
// count.
struct Tiling {
  int64_t groups;
  int64_t rows_per_tile;
  int64_t tiles;  // per image group
  int64_t items() const { return groups * tiles; }
};

// Enough work items to balance a many-core machine. A tile has at least as many rows as the
// Np x d partial it writes (so the partials stay smaller than x) and at most kMaxRowsPerTile (so
// its opmath tile buffers, 4 x rows x d, stay in L2).
constexpr int64_t kTargetItems = 32;
constexpr int64_t kMinRowsPerTile = 8;
constexpr int64_t kMaxRowsPerTile = 32;

Tiling make_tiling(const Problem& p, const ImageGroups& ig) {
  Tiling t;
  t.groups = ig.count;
  const int64_t min_rows = std::clamp(p.Np, kMinRowsPerTile, kMaxRowsPerTile);
  const int64_t fewest = (p.T + kMaxRowsPerTile - 1) / kMaxRowsPerTile;
  const int64_t most = std::max(fewest, p.T / min_rows);
  const int64_t tiles = std::clamp((kTargetItems + t.groups - 1) / t.groups, fewest, most);
  t.rows_per_tile = (p.T + tiles - 1) / tiles;
  t.tiles = (p.T + t.rows_per_tile - 1) / t.rows_per_tile;
  return t;
}

// Rows [t_begin, t_end) of a tile; its patch rows are [p_begin, t_end) (token t is patch t - P).
struct TileRows {
  int64_t t_begin, t_end, p_begin;
  TileRows(const Problem& p, const Tiling& tl, int64_t tile)
      : t_begin(tile * tl.rows_per_tile),
        t_end(std::min(p.T, t_begin + tl.rows_per_tile)),
        p_begin(std::clamp(p.P, t_begin, t_end)) {}
};

// mix_t[r, j] = mix[j, n] for the tile's patch rows (r = t - p_begin, n = t - P), shared mix only:
// the small products below then read one contiguous row of mix coefficients per token.
template <typename acc_t>
void gather_mix_columns(const acc_t* mix, const Problem& p, const TileRows& rows, acc_t* mix_t) {
  for (int64_t t = rows.p_begin; t < rows.t_end; ++t) {
    for (int64_t j = 0; j < p.Np; ++j) {
      mix_t[(t - rows.p_begin) * p.Np + j] = mix[j * p.N + (t - p.P)];
    }
  }
}

// The small products over a tile run as register-blocked loops: kBlock output vectors stay in
// registers while the contraction index streams (a GEMM micro-kernel, the CPU form of tl.dot).
// kBlock independent accumulators also hide the FMA latency (4 cycles, 2 FMAs per cycle).
constexpr int64_t kBlock = 8;

// out[j, c] = sum_r mix_t[r, j] * xg[r, c] for j in [j0, j0 + J), over rows r in [0, rows).
template <int kBytes, int64_t J, typename acc_t>
VAPT_ALWAYS_INLINE void project_block(const acc_t* mix_t, const acc_t* xg, int64_t rows, int64_t Np,
                                      int64_t d, int64_t j0, acc_t* out) {
  using V = typename simd::Simd<acc_t, kBytes>::V;
  for_chunks<V>(d, [&](int64_t c, int64_t n) VAPT_INLINE_LAMBDA {
    V acc[J] = {};
    for (int64_t r = 0; r < rows; ++r) {
      const V xv = load<V>(xg + r * d + c, n);
      const acc_t* m = mix_t + r * Np + j0;
      for (int64_t jj = 0; jj < J; ++jj) {
        acc[jj] = m[jj] * xv + acc[jj];
      }
    }
    for (int64_t jj = 0; jj < J; ++jj) {
      store(out + (j0 + jj) * d + c, acc[jj], n);
    }
  });
}

// dxg[r, c] = sum_j mix_t[r, j] * dg[j, c] for r in [r0, r0 + R).
template <int kBytes, int64_t R, typename acc_t>
VAPT_ALWAYS_INLINE void back_project_block(const acc_t* mix_t, const acc_t* dg, int64_t Np, int64_t d,
                                           int64_t r0, acc_t* dxg) {
  using V = typename simd::Simd<acc_t, kBytes>::V;
  for_chunks<V>(d, [&](int64_t c, int64_t n) VAPT_INLINE_LAMBDA {
    V acc[R] = {};
    for (int64_t j = 0; j < Np; ++j) {
      const V dgv = load<V>(dg + j * d + c, n);
      for (int64_t rr = 0; rr < R; ++rr) {
        acc[rr] = mix_t[(r0 + rr) * Np + j] * dgv + acc[rr];
      }
    }
    for (int64_t rr = 0; rr < R; ++rr) {
      store(dxg + (r0 + rr) * d + c, acc[rr], n);
    }
  });
}

// dmix_rows[j, r] = sum_c dg[j, c] * xg[r, c] for j in [j0, j0 + J), r in [r0, r0 + R)
// (dmix_rows has row stride N). J x R independent accumulators hide the FMA latency.
template <int kBytes, int64_t J, int64_t R, typename acc_t>
VAPT_ALWAYS_INLINE void mix_grad_block(const acc_t* dg, const acc_t* xg, int64_t d, int64_t N, int64_t j0,
                                       int64_t r0, acc_t* dmix_rows) {
  using V = typename simd::Simd<acc_t, kBytes>::V;
  V acc[J][R] = {};
  // Lanes past d load as zero from dg, so the products there are zero.
  for_chunks<V>(d, [&](int64_t c, int64_t n) VAPT_INLINE_LAMBDA {
    V dgv[J];
    for (int64_t jj = 0; jj < J; ++jj) {
      dgv[jj] = load<V>(dg + (j0 + jj) * d + c, n);
    }
    for (int64_t rr = 0; rr < R; ++rr) {
      const V xv = load<V>(xg + (r0 + rr) * d + c, n);
      for (int64_t jj = 0; jj < J; ++jj) {
        acc[jj][rr] = dgv[jj] * xv + acc[jj][rr];
      }
    }
  });
  for (int64_t jj = 0; jj < J; ++jj) {
    for (int64_t rr = 0; rr < R; ++rr) {
      dmix_rows[(j0 + jj) * N + r0 + rr] = simd::reduce_add(acc[jj][rr]);
    }
  }
}

// mix_grad_block over all prompts, two at a time.
template <int kBytes, int64_t R, typename acc_t>
VAPT_ALWAYS_INLINE void mix_grad_rows(const acc_t* dg, const acc_t* xg, int64_t Np, int64_t d, int64_t N,
                                      int64_t r0, acc_t* dmix_rows) {
  int64_t j0 = 0;
  for (; j0 + 2 <= Np; j0 += 2) {
    mix_grad_block<kBytes, 2, R>(dg, xg, d, N, j0, r0, dmix_rows);
  }
  if (j0 < Np) {
    mix_grad_block<kBytes, 1, R>(dg, xg, d, N, j0, r0, dmix_rows);
  }
}

// ------------------------------------------------------------------------------------------------
// What the forward and backward work items share
// ------------------------------------------------------------------------------------------------

// The slices of mix and of the gen affine (K, d) that the images of task k use.
template <typename acc_t>
struct TaskSlices {
  const acc_t* mix;      // (Np, N) or (Np, N, d)
  const acc_t *wg, *bg;  // (d,)
  TaskSlices(const acc_t* mix_all, const acc_t* wg_all, const acc_t* bg_all, const Problem& p, int64_t k)
      : mix(mix_all + k * p.mix_size()), wg(wg_all + k * p.d), bg(bg_all + k * p.d) {}
};

// Work item `item`: its image group and row tile, the tile's rows, and the slices of the group's
// task (args: FwdArgs or BwdArgs). For the shared mix it also gathers the tile's mix coefficients
// into mix_t (gather_mix_columns).
template <typename acc_t>
struct WorkItem {
  int64_t group, tile, task;
  TileRows rows;
  TaskSlices<acc_t> slices;
  template <typename Args>
  WorkItem(const Args& a, const Problem& p, const ImageGroups& ig, const Tiling& tl, int64_t item, acc_t* mix_t)
      : group(item / tl.tiles), tile(item % tl.tiles), task(ig.task_of(group)), rows(p, tl, tile),
        slices(a.mix, a.wg, a.bg, p, task) {
    if (!p.per_channel) {
      gather_mix_columns(slices.mix, p, rows, mix_t);
    }
  }
};

// Calls f(std::integral_constant<int64_t, I>{}, i0) for the blocks [i0, i0 + I) that cover [0, n):
// blocks of kBlock, then of kBlock / 2, then single ones (the register blocking of the products).
template <typename F>
VAPT_ALWAYS_INLINE void for_register_blocks(int64_t n, const F& f) {
  int64_t i0 = 0;
  for (; i0 + kBlock <= n; i0 += kBlock) {
    f(std::integral_constant<int64_t, kBlock>{}, i0);
  }
  for (; i0 + kBlock / 2 <= n; i0 += kBlock / 2) {
    f(std::integral_constant<int64_t, kBlock / 2>{}, i0);
  }
  for (; i0 < n; ++i0) {
    f(std::integral_constant<int64_t, 1>{}, i0);
  }
}

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------

template <typename scalar_t>
struct FwdArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;                                // (B, T, d)
  const acc_t *w1, *b1;                             // (d,), None already made ones / zeros
  const acc_t *wg, *bg;                             // (K, d), None already made ones / zeros
  acc_t eps1, eps_g;
  const acc_t* mix;                                 // (K, Np, N) or (K, Np, N, d)
  scalar_t* h;                                      // (B, T, d)
  acc_t *mean, *rstd1, *rstd_g;                     // (B, T)
  acc_t* g_partial;                                 // (B, tiles, Np, d)
};

// Per-thread scratch of the forward work items, in opmath elements (parallel.h).
template <typename acc_t>
struct FwdScratch {
  using Element = acc_t;
  acc_t *x_buf, *xc, *out_buf;  // an input row, the centred row, an output row (d each)
  acc_t* xg_tile;               // the tile's LN_g rows (R x d)
  acc_t* mix_t;                 // the tile's mix coefficients (R x Np)
  int64_t size;
  FwdScratch(Carver<acc_t> c, const Problem& p, const Tiling& tl)
      : x_buf(c.take(p.d)), xc(c.take(p.d)), out_buf(c.take(p.d)), xg_tile(c.take(tl.rows_per_tile * p.d)),
        mix_t(c.take(tl.rows_per_tile * p.Np)), size(c.used()) {}
};

// Row `row` of x: its statistics, h = LN_1(x) and, for a patch row, LN_g(x) into xg (with the
// task's affine wg, bg).
template <int kBytes, typename scalar_t>
VAPT_ALWAYS_INLINE void normalize_row(const FwdArgs<scalar_t>& a, int64_t row, int64_t d, bool patch,
                                      const at::opmath_type<scalar_t>* wg, const at::opmath_type<scalar_t>* bg,
                                      at::opmath_type<scalar_t>* xg, const FwdScratch<at::opmath_type<scalar_t>>& s) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = typename simd::Simd<acc_t, kBytes>::V;
  const acc_t* xr = row_in<kBytes>(a.x + row * d, s.x_buf, d);

  // Two-pass statistics over the cached row: the mean, then the biased variance of the centred
  // values (no cancellation, unlike E[x^2] - E[x]^2).
  V sum{};
  for_chunks<V>(d, [&](int64_t c, int64_t n) VAPT_INLINE_LAMBDA { sum += load<V>(xr + c, n); });
  const acc_t mu = simd::reduce_add(sum) / d;
  V sq{};
  for_chunks<V>(d, [&](int64_t c, int64_t n) VAPT_INLINE_LAMBDA {
    const V v = load<V>(xr + c, n) - mu;
    store(s.xc + c, v, n);
    sq += simd::first_lanes(v * v, n);
  });
  const acc_t var = simd::reduce_add(sq) / d;
  const acc_t r1 = acc_t(1) / std::sqrt(var + a.eps1);
  const acc_t rg = acc_t(1) / std::sqrt(var + a.eps_g);
  a.mean[row] = mu;
  a.rstd1[row] = r1;
  a.rstd_g[row] = rg;

  scalar_t* h_row = a.h + row * d;
  acc_t* hr = row_out(h_row, s.out_buf);
  for_chunks<V>(d, [&](int64_t c, int64_t n) VAPT_INLINE_LAMBDA {
    const V v = load<V>(s.xc + c, n);
    store(hr + c, v * r1 * load<V>(a.w1 + c, n) + load<V>(a.b1 + c, n), n);
    if (patch) {
      store(xg + c, v * rg * load<V>(wg + c, n) + load<V>(bg + c, n), n);
    }
  });
  row_out_commit<kBytes>(hr, h_row, d);
}

// One image's partial g over a tile, g_part (Np, d): g_part[j, :] = sum over the tile's patch rows
// of mix[j, n(, :)] * LN_g(x)[row, :], from the tile's LN_g rows xg_tile. A tile of prefix rows only
// writes zeros.
template <int kBytes, typename acc_t>
VAPT_ALWAYS_INLINE void project_tile(const Problem& p, const TileRows& rows, const acc_t* mix, const acc_t* mix_t,
                                     const acc_t* xg_tile, acc_t* g_part) {
  using V = typename simd::Simd<acc_t, kBytes>::V;
  const int64_t d = p.d, Np = p.Np, N = p.N;
  const int64_t patch_rows = rows.t_end - rows.p_begin;
  if (!p.per_channel) {
    for_register_blocks(Np, [&](auto J, int64_t j0) VAPT_INLINE_LAMBDA {
      project_block<kBytes, decltype(J)::value>(mix_t, xg_tile, patch_rows, Np, d, j0, g_part);
    });
  } else {
    // Per channel the coefficients differ per lane: one accumulator per prompt, the tile's block
    // of mix streamed (and reused from cache by the next image of the group).
    for_chunks<V>(d, [&](int64_t c, int64_t n) VAPT_INLINE_LAMBDA {
      for (int64_t j = 0; j < Np; ++j) {
        const acc_t* mj = mix + (j * N + (rows.p_begin - p.P)) * d + c;
        V acc{};
        for (int64_t r = 0; r < patch_rows; ++r) {
          acc = load<V>(mj + r * d, n) * load<V>(xg_tile + r * d + c, n) + acc;
        }
        store(g_part + j * d + c, acc, n);
      }
    });
  }
}

// Work item `item` of the forward pass: per image of its group, normalise the tile's rows, then
// project them.
template <int kBytes, typename scalar_t>
VAPT_ALWAYS_INLINE void norm_and_project_fwd_item(const FwdArgs<scalar_t>& a, const Problem& p, const ImageGroups& ig,
                                                  const Tiling& tl, int64_t item,
                                                  const FwdScratch<at::opmath_type<scalar_t>>& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const WorkItem<acc_t> w(a, p, ig, tl, item, s.mix_t);
  for (int64_t i = ig.begin(w.group); i < ig.end(w.group); ++i) {
    const int64_t b = ig.image(i);
    for (int64_t t = w.rows.t_begin; t < w.rows.t_end; ++t) {
      acc_t* xg = s.xg_tile + (t - w.rows.p_begin) * p.d;  // only written for patch rows
      normalize_row<kBytes>(a, b * p.T + t, p.d, t >= p.P, w.slices.wg, w.slices.bg, xg, s);
    }
    acc_t* g_part = a.g_partial + (b * tl.tiles + w.tile) * p.Np * p.d;
    project_tile<kBytes>(p, w.rows, w.slices.mix, s.mix_t, s.xg_tile, g_part);
  }
}

// One opmath row (reduce_g_row's scratch).
template <typename acc_t>
struct RowScratch {
  using Element = acc_t;
  acc_t* row;
  int64_t size;
  RowScratch(Carver<acc_t> c, int64_t d) : row(c.take(d)), size(c.used()) {}
};

// g[b, j, :] = sum over tiles of g_partial[b, tile, j, :], in tile order, for the row bj = (b, j).
template <int kBytes, typename scalar_t>
VAPT_ALWAYS_INLINE void reduce_g_row(const at::opmath_type<scalar_t>* g_partial, scalar_t* g, const Problem& p,
                                     const Tiling& tl, int64_t bj, const RowScratch<at::opmath_type<scalar_t>>& s) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = typename simd::Simd<acc_t, kBytes>::V;
  const int64_t d = p.d, Np = p.Np;
  const int64_t b = bj / Np, j = bj % Np;
  scalar_t* g_row = g + bj * d;
  acc_t* out = row_out(g_row, s.row);
  for_chunks<V>(d, [&](int64_t c, int64_t n) VAPT_INLINE_LAMBDA {
    V acc{};
    for (int64_t tile = 0; tile < tl.tiles; ++tile) {
      acc += load<V>(g_partial + ((b * tl.tiles + tile) * Np + j) * d + c, n);
    }
    store(out + c, acc, n);
  });
  row_out_commit<kBytes>(out, g_row, d);
}

template <typename scalar_t>
void norm_and_project_fwd_kernel(const FwdArgs<scalar_t>& a, scalar_t* g, const Problem& p,
                                 const ImageGroups& ig, const Tiling& tl) {
  using acc_t = at::opmath_type<scalar_t>;
  parallel_items(
      tl.items(), [&] { return VectorScratch<FwdScratch<acc_t>>(p, tl); },
      [&](auto isa, int64_t item, const FwdScratch<acc_t>& s) VAPT_INLINE_LAMBDA {
        norm_and_project_fwd_item<decltype(isa)::kBytes>(a, p, ig, tl, item, s);
      });
  parallel_items(
      p.B * p.Np, [&] { return VectorScratch<RowScratch<acc_t>>(p.d); },
      [&](auto isa, int64_t bj, const RowScratch<acc_t>& s) VAPT_INLINE_LAMBDA {
        reduce_g_row<decltype(isa)::kBytes>(a.g_partial, g, p, tl, bj, s);
      });
}

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------

template <typename scalar_t>
struct BwdArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t *dh, *x;                           // (B, T, d)
  const acc_t* dg;                                  // (B, Np, d), already in opmath
  const acc_t* w1;                                  // (d,)
  const acc_t *wg, *bg;                             // (K, d)
  const acc_t* mix;                                 // (K, Np, N) or (K, Np, N, d)
  const acc_t *mean, *rstd1, *rstd_g;               // (B, T)
  scalar_t* dx;                                     // (B, T, d)
  acc_t* w_partial;                                 // (items, 4, d): dw1, db1, dwg, dbg
  acc_t* dmix_partial;                              // (B, Np, N) shared, dmix (K, Np, N, d) per channel
};

// Per-thread scratch of the backward work items, in opmath elements (parallel.h). Tile buffers are
// R x d, their row r is the tile's row t_begin + r (xg and dxg: its patch row r).
template <typename acc_t>
struct BwdScratch {
  using Element = acc_t;
  acc_t *x_buf, *dh_buf, *out_buf;  // x and dh rows in opmath, an output row (d each)
  acc_t *xc_tile, *xg_tile;         // the centred rows; LN_g(x) of the patch rows
  acc_t *dxg_tile, *dy_tile;        // the gradient reaching LN_g(x); rstd1 * dh * w1
  acc_t* mix_t;                     // the tile's mix coefficients (R x Np)
  acc_t *s1, *s2;                   // per row: the LN_1 sums of dh * w1 and dh * w1 * xc (R)
  int64_t size;
  BwdScratch(Carver<acc_t> c, const Problem& p, const Tiling& tl)
      : x_buf(c.take(p.d)), dh_buf(c.take(p.d)), out_buf(c.take(p.d)), xc_tile(c.take(tl.rows_per_tile * p.d)),
        xg_tile(c.take(tl.rows_per_tile * p.d)), dxg_tile(c.take(tl.rows_per_tile * p.d)),
        dy_tile(c.take(tl.rows_per_tile * p.d)), mix_t(c.take(tl.rows_per_tile * p.Np)),
        s1(c.take(tl.rows_per_tile)), s2(c.take(tl.rows_per_tile)), size(c.used()) {}
};

// Rows of the tile, for image b (prefix rows first, then patch rows, as in x): centre them, the
// LN_1 term's sums s1, s2 and the weight/bias gradients into wgrads (dw1, db1: its rows 0, 1), LN_g(x)
// of the patch rows (with the task's affine wg, bg). Lanes past d load as zero, so dy is zero there
// and the sums need no mask.
template <int kBytes, typename scalar_t>
VAPT_ALWAYS_INLINE void ln1_terms(const BwdArgs<scalar_t>& a, const Problem& p, const TileRows& rows, int64_t b,
                                  const at::opmath_type<scalar_t>* wg, const at::opmath_type<scalar_t>* bg,
                                  at::opmath_type<scalar_t>* wgrads,
                                  const BwdScratch<at::opmath_type<scalar_t>>& s) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = typename simd::Simd<acc_t, kBytes>::V;
  const int64_t d = p.d, prefix_rows = rows.p_begin - rows.t_begin;
  acc_t* dw1 = wgrads;
  acc_t* db1 = wgrads + d;
  for (int64_t t = rows.t_begin; t < rows.t_end; ++t) {
    const int64_t r = t - rows.t_begin, row = b * p.T + t;
    const acc_t* xr = row_in<kBytes>(a.x + row * d, s.x_buf, d);
    const acc_t* dhr = row_in<kBytes>(a.dh + row * d, s.dh_buf, d);
    const acc_t mu = a.mean[row], r1 = a.rstd1[row], rg = a.rstd_g[row];
    acc_t* xc = s.xc_tile + r * d;
    acc_t* xg = s.xg_tile + (r - prefix_rows) * d;  // only written for patch rows
    acc_t* dy = s.dy_tile + r * d;
    const bool patch = t >= p.P;
    V s1v{}, s2v{};
    for_chunks<V>(d, [&](int64_t c, int64_t n) VAPT_INLINE_LAMBDA {
      const V v = load<V>(xr + c, n) - mu;
      store(xc + c, v, n);
      const V dhv = load<V>(dhr + c, n);
      const V dyv = dhv * load<V>(a.w1 + c, n);
      s1v += dyv;
      s2v += dyv * v;
      store(dy + c, dyv * r1, n);
      store(dw1 + c, dhv * (v * r1) + load<V>(dw1 + c, n), n);
      store(db1 + c, dhv + load<V>(db1 + c, n), n);
      if (patch) {
        store(xg + c, v * rg * load<V>(wg + c, n) + load<V>(bg + c, n), n);
      }
    });
    s.s1[r] = simd::reduce_add(s1v);
    s.s2[r] = simd::reduce_add(s2v);
  }
}

// The prompt terms of the tile's patch rows for one image (dg (Np, d)), shared mix:
// dxg[r, c] = sum_j mix[j, n] * dg[j, c], and the image's dmix partial (Np, N) dmix[j, n] +=
// sum_c dg[j, c] * LN_g(x)[r, c], with n the patch of row r.
template <int kBytes, typename acc_t>
VAPT_ALWAYS_INLINE void prompt_grads_shared(const Problem& p, const TileRows& rows, const acc_t* dg, acc_t* dmix,
                                            const BwdScratch<acc_t>& s) {
  const int64_t Np = p.Np, d = p.d, N = p.N, patch_rows = rows.t_end - rows.p_begin;
  acc_t* dmix_rows = dmix + (rows.p_begin - p.P);
  for_register_blocks(patch_rows, [&](auto R, int64_t r0) VAPT_INLINE_LAMBDA {
    back_project_block<kBytes, decltype(R)::value>(s.mix_t, dg, Np, d, r0, s.dxg_tile);
  });
  int64_t r0 = 0;
  for (; r0 + 4 <= patch_rows; r0 += 4) {
    mix_grad_rows<kBytes, 4>(dg, s.xg_tile, Np, d, N, r0, dmix_rows);
  }
  for (; r0 < patch_rows; ++r0) {
    mix_grad_rows<kBytes, 1>(dg, s.xg_tile, Np, d, N, r0, dmix_rows);
  }
}

// The same per channel, where both are elementwise in c: dxg[r, c] = sum_j mix[j, n, c] * dg[j, c]
// and dmix[j, n, c] += dg[j, c] * LN_g(x)[r, c]. dmix[:, n, :] of the task's slice belongs to this
// work item, which sees every image of the task, so it accumulates in place.
template <int kBytes, typename acc_t>
VAPT_ALWAYS_INLINE void prompt_grads_per_channel(const Problem& p, const TileRows& rows, const acc_t* mix,
                                                 const acc_t* dg, acc_t* dmix, const BwdScratch<acc_t>& s) {
  using V = typename simd::Simd<acc_t, kBytes>::V;
  const int64_t Np = p.Np, d = p.d, N = p.N, patch_rows = rows.t_end - rows.p_begin;
  for (int64_t r = 0; r < patch_rows; ++r) {
    const int64_t n_idx = rows.p_begin - p.P + r;
    for_chunks<V>(d, [&](int64_t c, int64_t n) VAPT_INLINE_LAMBDA {
      const V xgv = load<V>(s.xg_tile + r * d + c, n);
      V acc{};
      for (int64_t j = 0; j < Np; ++j) {
        const V dgv = load<V>(dg + j * d + c, n);
        const int64_t off = (j * N + n_idx) * d + c;
        acc = load<V>(mix + off, n) * dgv + acc;
        store(dmix + off, dgv * xgv + load<V>(dmix + off, n), n);
      }
      store(s.dxg_tile + r * d + c, acc, n);
    });
  }
}

// dx of the tile's rows for image b, and the gen weight/bias gradients into wgrads (dwg, dbg: its
// rows 2, 3). Each LayerNorm term is rstd * (dy - mean(dy) - xhat * mean(dy * xhat)) with
// xhat = xc * rstd, i.e. rstd * dy - rstd * s / d - xc * rstd^3 * s' / d where s = sum(dy),
// s' = sum(dy * xc); both terms are summed here (dy of LN_g: dxg * wg, on patch rows only).
template <int kBytes, typename scalar_t>
VAPT_ALWAYS_INLINE void dx_rows(const BwdArgs<scalar_t>& a, const Problem& p, const TileRows& rows, int64_t b,
                                const at::opmath_type<scalar_t>* wg, at::opmath_type<scalar_t>* wgrads,
                                const BwdScratch<at::opmath_type<scalar_t>>& s) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = typename simd::Simd<acc_t, kBytes>::V;
  const int64_t d = p.d, prefix_rows = rows.p_begin - rows.t_begin;
  acc_t* dwg = wgrads + 2 * d;
  acc_t* dbg = wgrads + 3 * d;
  const acc_t inv_d = acc_t(1) / d;
  for (int64_t t = rows.t_begin; t < rows.t_end; ++t) {
    const int64_t r = t - rows.t_begin, row = b * p.T + t;
    const acc_t r1 = a.rstd1[row], rg = a.rstd_g[row];
    const acc_t* xc = s.xc_tile + r * d;
    const acc_t* dy = s.dy_tile + r * d;
    const acc_t* dxg = s.dxg_tile + (r - prefix_rows) * d;
    const bool patch = t >= p.P;
    V sg1{}, sg2{};
    if (patch) {
      for_chunks<V>(d, [&](int64_t c, int64_t n) VAPT_INLINE_LAMBDA {
        const V v = load<V>(xc + c, n);
        const V dxgv = load<V>(dxg + c, n);
        const V dyg = dxgv * load<V>(wg + c, n);
        sg1 += dyg;
        sg2 += dyg * v;
        store(dwg + c, dxgv * (v * rg) + load<V>(dwg + c, n), n);
        store(dbg + c, dxgv + load<V>(dbg + c, n), n);
      });
    }
    const acc_t shift = -(r1 * s.s1[r] + rg * simd::reduce_add(sg1)) * inv_d;
    const acc_t slope = -(r1 * r1 * r1 * s.s2[r] + rg * rg * rg * simd::reduce_add(sg2)) * inv_d;
    scalar_t* dx_row = a.dx + row * d;
    acc_t* out = row_out(dx_row, s.out_buf);
    for_chunks<V>(d, [&](int64_t c, int64_t n) VAPT_INLINE_LAMBDA {
      V v = load<V>(xc + c, n) * slope + shift + load<V>(dy + c, n);
      if (patch) {
        v = load<V>(dxg + c, n) * rg * load<V>(wg + c, n) + v;
      }
      store(out + c, v, n);
    });
    row_out_commit<kBytes>(out, dx_row, d);
  }
}

// Work item `item` of the backward pass: per image of its group, the LN_1 terms of the tile's rows,
// the prompt terms of its patch rows, then dx. The item's weight/bias partials are
// w_partial[item] (4, d); its dmix is the image's partial (shared mix) or the task's slice of dmix
// (per channel).
template <int kBytes, typename scalar_t>
VAPT_ALWAYS_INLINE void norm_and_project_bwd_item(const BwdArgs<scalar_t>& a, const Problem& p, const ImageGroups& ig,
                                                  const Tiling& tl, int64_t item,
                                                  const BwdScratch<at::opmath_type<scalar_t>>& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const WorkItem<acc_t> w(a, p, ig, tl, item, s.mix_t);
  acc_t* wgrads = a.w_partial + item * 4 * p.d;
  std::fill_n(wgrads, 4 * p.d, acc_t(0));
  acc_t* dmix = a.dmix_partial + (p.per_channel ? w.task : w.group) * p.mix_size();
  for (int64_t i = ig.begin(w.group); i < ig.end(w.group); ++i) {
    const int64_t b = ig.image(i);
    const acc_t* dg = a.dg + b * p.Np * p.d;
    ln1_terms<kBytes>(a, p, w.rows, b, w.slices.wg, w.slices.bg, wgrads, s);
    if (!p.per_channel) {
      prompt_grads_shared<kBytes>(p, w.rows, dg, dmix, s);
    } else {
      prompt_grads_per_channel<kBytes>(p, w.rows, w.slices.mix, dg, dmix, s);
    }
    dx_rows<kBytes>(a, p, w.rows, b, w.slices.wg, wgrads, s);
  }
}

// The weight/bias gradients from the items' partials w_partial (items, 4, d), each summed in item
// order: out[0], out[1] (dnorm1) (d,) over all items; out[2], out[3] (dgen) (K, d), slice k over
// the items of task k's groups. out is zero on entry.
template <int kBytes, typename acc_t>
VAPT_ALWAYS_INLINE void reduce_weight_grads(const acc_t* w_partial, const ImageGroups& ig, const Tiling& tl,
                                            int64_t d, acc_t* const out[4]) {
  using V = typename simd::Simd<acc_t, kBytes>::V;
  const int64_t items = tl.items();
  for (int64_t k = 0; k < 4; ++k) {
    if (k < 2 || ig.task == nullptr) {
      for_chunks<V>(d, [&](int64_t c, int64_t n) VAPT_INLINE_LAMBDA {
        V acc{};
        for (int64_t item = 0; item < items; ++item) {
          acc += load<V>(w_partial + (item * 4 + k) * d + c, n);
        }
        store(out[k] + c, acc, n);
      });
    } else {
      for (int64_t item = 0; item < items; ++item) {
        acc_t* o = out[k] + ig.task_of(item / tl.tiles) * d;
        const acc_t* w = w_partial + (item * 4 + k) * d;
        for_chunks<V>(d, [&](int64_t c, int64_t n) VAPT_INLINE_LAMBDA {
          store(o + c, load<V>(o + c, n) + load<V>(w + c, n), n);
        });
      }
    }
  }
}

// The shared mix's dmix (K, Np, N), zero on entry, from the per-image partials (B, Np, N):
// dmix[task[b]] += the partial of image b (group b), in image order.
template <typename acc_t>
void reduce_dmix_partials(const acc_t* dmix_partial, const Problem& p, const ImageGroups& ig, acc_t* dmix) {
  const int64_t size = p.Np * p.N;
  for (int64_t b = 0; b < p.B; ++b) {
    acc_t* dmix_task = dmix + ig.task_of(b) * size;
    for (int64_t i = 0; i < size; ++i) {
      dmix_task[i] += dmix_partial[b * size + i];
    }
  }
}

// Runs the work items, then sums their partials: weight_grads[4] ((d,) for norm1, (K, d) for
// gen) and, for the shared mix, dmix (K, Np, N) (the per-channel dmix was accumulated in place).
template <typename scalar_t>
void norm_and_project_bwd_kernel(const BwdArgs<scalar_t>& a, const Problem& p, const ImageGroups& ig,
                                 const Tiling& tl, at::opmath_type<scalar_t>* const weight_grads[4],
                                 at::opmath_type<scalar_t>* dmix) {
  using acc_t = at::opmath_type<scalar_t>;
  parallel_items(
      tl.items(), [&] { return VectorScratch<BwdScratch<acc_t>>(p, tl); },
      [&](auto isa, int64_t item, const BwdScratch<acc_t>& s) VAPT_INLINE_LAMBDA {
        norm_and_project_bwd_item<decltype(isa)::kBytes>(a, p, ig, tl, item, s);
      });
  simd::with_isa([&](auto isa) VAPT_INLINE_LAMBDA {
    reduce_weight_grads<decltype(isa)::kBytes>(a.w_partial, ig, tl, p.d, weight_grads);
  });
  if (!p.per_channel) {
    reduce_dmix_partials(a.dmix_partial, p, ig, dmix);
  }
}

// ------------------------------------------------------------------------------------------------
// Entry points
// ------------------------------------------------------------------------------------------------

// A weight or bias as a contiguous opmath tensor of `shape` ((d,), or (K, d) per task); None
// becomes `fill` (ones or zeros).
at::Tensor affine_or(const std::optional<at::Tensor>& w, double fill, const at::Tensor& x, at::IntArrayRef shape) {
  if (w.has_value()) {
    return w->to(stats_dtype(x));
  }
  return at::full(shape, fill, x.options().dtype(stats_dtype(x)));
}

// gen_weight and gen_bias as opmath tensors (affine_or) of their shape, (d,) or (K, d).
std::pair<at::Tensor, at::Tensor> gen_affine_or(const std::optional<at::Tensor>& gen_weight,
                                                const std::optional<at::Tensor>& gen_bias, const at::Tensor& x,
                                                const at::Tensor& mix, const std::optional<at::Tensor>& task) {
  const std::vector<int64_t> shape = gen_affine_shape(x, mix, has_task_index(task));
  return {affine_or(gen_weight, 1.0, x, shape), affine_or(gen_bias, 0.0, x, shape)};
}

// mix: the op's; mix_task: one task's, (Np, N) or (Np, N, d).
Problem make_problem(const at::Tensor& x, const at::Tensor& mix, const at::Tensor& mix_task, int64_t num_prefix,
                     const std::optional<at::Tensor>& task) {
  const int64_t K = has_task_index(task) ? mix.size(0) : 1;
  return Problem{x.size(0), x.size(1), num_prefix, x.size(1) - num_prefix, x.size(2), mix_task.size(0), K,
                 mix_task.dim() == 3};
}

// The work decomposition of a call: its image groups (whose construction checks the task values)
// and its tiling.
struct Decomposition {
  TaskGroups task_groups;
  const ImageGroups& ig = task_groups.groups;
  Tiling tl;
  Decomposition(const char* op, const Problem& p, const std::optional<at::Tensor>& task)
      : task_groups(op, p, task), tl(make_tiling(p, task_groups.groups)) {}
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_and_project_fwd_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& norm1_weight,
    const std::optional<at::Tensor>& norm1_bias, double eps1,
    const std::optional<at::Tensor>& gen_weight, const std::optional<at::Tensor>& gen_bias,
    double eps_g, const at::Tensor& mix, int64_t num_prefix, const std::optional<at::Tensor>& task) {
  constexpr const char* op = "vapt::norm_and_project_fwd (CPU)";
  const at::Tensor mix_task = check_norm_and_project_fwd(op, at::kCPU, x, norm1_weight, norm1_bias, gen_weight,
                                                          gen_bias, mix, num_prefix, task);
  const Problem p = make_problem(x, mix, mix_task, num_prefix, task);
  const auto stats_opts = x.options().dtype(stats_dtype(x));
  at::Tensor h = at::empty_like(x);
  at::Tensor g = at::empty({p.B, p.Np, p.d}, x.options());
  at::Tensor mean = at::empty({p.B, p.T}, stats_opts);
  at::Tensor rstd1 = at::empty({p.B, p.T}, stats_opts);
  at::Tensor rstd_g = at::empty({p.B, p.T}, stats_opts);
  if (p.B == 0 || p.T == 0) {
    return {h, g.zero_(), mean, rstd1, rstd_g};
  }

  const Decomposition work(op, p, task);
  const at::Tensor w1 = affine_or(norm1_weight, 1.0, x, {p.d}), b1 = affine_or(norm1_bias, 0.0, x, {p.d});
  const auto [wg, bg] = gen_affine_or(gen_weight, gen_bias, x, mix, task);
  at::Tensor g_partial = at::empty({p.B, work.tl.tiles, p.Np, p.d}, stats_opts);

  VAPT_DISPATCH_CPU_TYPES(x.scalar_type(), "norm_and_project_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const FwdArgs<scalar_t> a{
        .x = x.const_data_ptr<scalar_t>(),
        .w1 = w1.const_data_ptr<acc_t>(), .b1 = b1.const_data_ptr<acc_t>(),
        .wg = wg.const_data_ptr<acc_t>(), .bg = bg.const_data_ptr<acc_t>(),
        .eps1 = static_cast<acc_t>(eps1), .eps_g = static_cast<acc_t>(eps_g),
        .mix = mix.const_data_ptr<acc_t>(),
        .h = h.mutable_data_ptr<scalar_t>(),
        .mean = mean.mutable_data_ptr<acc_t>(), .rstd1 = rstd1.mutable_data_ptr<acc_t>(),
        .rstd_g = rstd_g.mutable_data_ptr<acc_t>(),
        .g_partial = g_partial.mutable_data_ptr<acc_t>()};
    norm_and_project_fwd_kernel<scalar_t>(a, g.mutable_data_ptr<scalar_t>(), p, work.ig, work.tl);
  });
  return {h, g, mean, rstd1, rstd_g};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
norm_and_project_bwd_cpu(const at::Tensor& dh, const at::Tensor& dg, const at::Tensor& x,
                         const std::optional<at::Tensor>& norm1_weight,
                         const std::optional<at::Tensor>& gen_weight,
                         const std::optional<at::Tensor>& gen_bias, const at::Tensor& mix,
                         const at::Tensor& mean, const at::Tensor& rstd1,
                         const at::Tensor& rstd_g, int64_t num_prefix,
                         const std::optional<at::Tensor>& task) {
  constexpr const char* op = "vapt::norm_and_project_bwd (CPU)";
  const at::Tensor mix_task = check_norm_and_project_bwd(op, at::kCPU, dh, dg, x, norm1_weight, gen_weight, gen_bias,
                                                          mix, mean, rstd1, rstd_g, num_prefix, task);
  const Problem p = make_problem(x, mix, mix_task, num_prefix, task);
  const auto stats_opts = x.options().dtype(stats_dtype(x));
  const std::vector<int64_t> gen_shape = gen_affine_shape(x, mix, has_task_index(task));
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw1 = at::zeros({p.d}, stats_opts), db1 = at::zeros({p.d}, stats_opts);
  at::Tensor dwg = at::zeros(gen_shape, stats_opts), dbg = at::zeros(gen_shape, stats_opts);
  at::Tensor dmix = at::zeros(mix.sizes(), stats_opts);
  if (p.B == 0 || p.T == 0) {
    return {dx, dw1, db1, dwg, dbg, dmix};
  }

  const Decomposition work(op, p, task);
  const at::Tensor w1 = affine_or(norm1_weight, 1.0, x, {p.d});
  const auto [wg, bg] = gen_affine_or(gen_weight, gen_bias, x, mix, task);
  const at::Tensor dg_acc = dg.to(stats_dtype(x));  // small (B, Np, d); converted once, not per row
  at::Tensor w_partial = at::empty({work.tl.items(), 4, p.d}, stats_opts);
  // Per-image dmix partials for the shared mix; the per-channel mix accumulates into dmix itself.
  at::Tensor dmix_partial = p.per_channel ? dmix : at::zeros({p.B, p.Np, p.N}, stats_opts);

  VAPT_DISPATCH_CPU_TYPES(x.scalar_type(), "norm_and_project_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BwdArgs<scalar_t> a{
        .dh = dh.const_data_ptr<scalar_t>(), .x = x.const_data_ptr<scalar_t>(),
        .dg = dg_acc.const_data_ptr<acc_t>(),
        .w1 = w1.const_data_ptr<acc_t>(),
        .wg = wg.const_data_ptr<acc_t>(), .bg = bg.const_data_ptr<acc_t>(),
        .mix = mix.const_data_ptr<acc_t>(),
        .mean = mean.const_data_ptr<acc_t>(), .rstd1 = rstd1.const_data_ptr<acc_t>(),
        .rstd_g = rstd_g.const_data_ptr<acc_t>(),
        .dx = dx.mutable_data_ptr<scalar_t>(),
        .w_partial = w_partial.mutable_data_ptr<acc_t>(),
        .dmix_partial = dmix_partial.mutable_data_ptr<acc_t>()};
    acc_t* const weight_grads[4] = {dw1.mutable_data_ptr<acc_t>(), db1.mutable_data_ptr<acc_t>(),
                                    dwg.mutable_data_ptr<acc_t>(), dbg.mutable_data_ptr<acc_t>()};
    norm_and_project_bwd_kernel<scalar_t>(a, p, work.ig, work.tl, weight_grads, dmix.mutable_data_ptr<acc_t>());
  });
  return {dx, dw1, db1, dwg, dbg, dmix};
}

}  // namespace

TORCH_LIBRARY_IMPL(vapt, CPU, m) {
  m.impl("norm_and_project_fwd", &norm_and_project_fwd_cpu);
  m.impl("norm_and_project_bwd", &norm_and_project_bwd_cpu);
}

}  // namespace vapt
