"""Triton kernels of ``norm_and_project``: the block's LayerNorm ``h = LN_1(x)`` and the folded
prompt projection ``g = mix @ LN_g(x[:, P:])`` (docs/design.md §1.3-1.4; the kernels' design: §2.2).

Shapes: ``B`` images, ``T = P + N`` tokens (``P = num_prefix`` prefix tokens, then ``N`` patches;
patch ``n`` is row ``P + n``), ``d`` channels, ``Np`` prompts, ``K`` tasks. ``mix`` is the folded
``(Np, N)`` matrix ("shared") or its per-channel form ``(Np, N, d)``; with a task index ``task (B,)``
it is stacked per task, ``(K, Np, N)`` or ``(K, Np, N, d)``, and so are the prompt LayerNorm's
affines, ``(K, d)``: each per-image program offsets its pointers to the slices of task ``task[b]``.

Kernels, ``_norm_and_project_<name>_kernel`` (block sizes: :func:`launch_config`):

* ``fwd``: tiles of whole rows of an image: ``h`` and the row statistics. Then ``g_shared`` (with
  ``tl.dot``) or ``g`` (per channel): an image, a block of prompts and one of channels each, summing
  ``g`` over all patches in float32 registers, with ``LN_g(x)`` rebuilt from ``x`` and the statistics.
* Shared mix backward: ``dmix_shared`` gives per image ``a[b, j, n] = sum_c dg[b, j, c] w_g[c]
  xhat_g[b, P + n, c]``, ``u[b, j] = dg[b, j] . w_g`` and ``v[b, j] = dg[b, j] . b_g``, so ``dmix =
  sum_b a[b] + v[b, :, None]``; then ``bwd_shared`` forms ``dx`` and the weight partials, taking
  ``LN_g``'s row sums from ``a`` and ``u`` (``sum_c dy_g = sum_j mix[j, n] u[j]``, ``sum_c dy_g
  xhat_g = sum_j mix[j, n] a[j, n]``).
* Per-channel mix backward: ``bwd_per_channel`` (``dx`` and the weight partials over tiles of whole
  rows), then ``dmix``, summed over the images (of each task) in registers.
* ``task_sum``: per-task sums of per-image partials.

Kernel arguments, by name: ``x``, ``dh``, ``h``, ``dx``: ``(B, T, d)``; ``dg``, ``g``: ``(B, Np, d)``;
``w1``, ``b1``: norm1's weight and bias, ``wg``, ``bg``: the prompt LayerNorm's, each read only when
its ``HAS_`` flag is set; ``mix``, ``dmix``: float32; ``task``: ``(B,)`` int64; ``order`` ``(B,)`` and
``starts`` ``(K + 1,)``, int64: task ``t``'s images are ``order[starts[t]:starts[t + 1]]``, in batch
order; ``mean``, ``rstd1 = 1/sqrt(var + eps1)``, ``rstdg = 1/sqrt(var + eps_g)``: ``(B, T)`` float32;
``dw1``, ``db1``, ``dwg``, ``dbg``: ``(B * tiles, d)`` float32 per-program weight-gradient partials.
Every tensor is contiguous; stores are in the tensor's dtype. ``HAS_TASK``: image ``b`` uses its
task's slices; ``ROUND_BF16``: the interpreter with bfloat16 ``x``, whose conversion truncates, so
stores are rounded to nearest first. ``BLOCK_T``, ``BLOCK_C``, ``BLOCK_N``, ``BLOCK_J``: rows,
channels, patches and prompts per program or loop step (at least 16 where ``tl.dot`` takes them);
``BLOCK_D``: the next power of two ``>= d`` (whole rows).

Arithmetic is float32 whatever the input dtype (every load is cast right away) and every ``tl.dot``
is IEEE float32 (``input_precision="ieee"``).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .common import INTERPRETED, device_guard, round_to_bfloat16

# Shape arguments that are not specialised on (divisible by 16, equal to 1): one compiled kernel
# serves every token, prompt and row-tile count. ``d`` is specialised: its divisibility lets rows be
# loaded in 16-byte vectors.
_SHAPE_ARGS = ["B", "T", "N", "Np", "num_prefix", "R"]


def _jit(fn):
    """``triton.jit`` that does not specialise on the shape arguments of ``_SHAPE_ARGS``."""
    return triton.jit(fn, do_not_specialize=[a for a in _SHAPE_ARGS if a in fn.__code__.co_varnames])


# --------------------------------------------------------------------------------------------
# Tile helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _row_tile(b, tile, T, d, BLOCK_T: tl.constexpr):
    """Tile ``tile`` of ``BLOCK_T`` rows of image ``b`` (int64): the row indices, which are valid, and
    the rows' offsets in a ``(B, T, d)`` tensor."""
    rows = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    return rows, rows < T, b * T * d + rows[:, None] * d


@triton.jit
def _channel_block(row_ok, row_offs, cols, d):
    """The channels ``cols`` of a tile of rows: which are valid, the tile's mask and its offsets."""
    col_ok = cols < d
    return col_ok, row_ok[:, None] & col_ok[None, :], row_offs + cols[None, :]


@triton.jit
def _load_f32(ptr, offs, mask):
    """A masked tile, zero outside ``mask``, as float32."""
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store(ptr, offs, x, mask, ROUND_BF16: tl.constexpr):
    """Stores float32 ``x`` in ``ptr``'s dtype, rounded to nearest first with ``ROUND_BF16``."""
    if ROUND_BF16:
        x = round_to_bfloat16(x)
    tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _channel_vector(ptr, cols, d, PRESENT: tl.constexpr, ABSENT: tl.constexpr):
    """A LayerNorm weight or bias on the channels ``cols``, float32, zero on padding channels; the
    constant ``ABSENT`` (1.0 for a weight, 0.0 for a bias) where the LayerNorm has none."""
    col_ok = cols < d
    if PRESENT:
        v = tl.load(ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        v = tl.where(col_ok, ABSENT, 0.0)
    return v


@triton.jit
def _prompt_affine(wg_ptr, bg_ptr, cols, d, HAS_WG: tl.constexpr, HAS_BG: tl.constexpr):
    """The prompt LayerNorm's weight and bias on the channels ``cols`` (see :func:`_channel_vector`)."""
    return _channel_vector(wg_ptr, cols, d, HAS_WG, 1.0), _channel_vector(bg_ptr, cols, d, HAS_BG, 0.0)


@triton.jit
def _task_slices(task_ptr, b, mix_ptr, Np, mix_row, wg_ptr, bg_ptr, d, HAS_TASK: tl.constexpr):
    """With ``HAS_TASK``, the stacked per-task ``mix`` (rows of ``mix_row`` elements) and prompt
    LayerNorm affines moved to image ``b``'s task's slices; without, the pointers as they are."""
    if HAS_TASK:
        t = tl.load(task_ptr + b)
        mix_ptr += t * Np * mix_row
        wg_ptr += t * d
        bg_ptr += t * d
    return mix_ptr, wg_ptr, bg_ptr


@triton.jit
def _row_statistics(mean_ptr, rstd1_ptr, rstdg_ptr, b, rows, row_ok, T):
    """The forward's statistics of rows ``rows`` of image ``b``. Padding rows get rstd 0, hence xhat 0
    and no share in the weight gradients."""
    offs = b * T + rows
    mean = tl.load(mean_ptr + offs, mask=row_ok, other=0.0)
    rstd1 = tl.load(rstd1_ptr + offs, mask=row_ok, other=0.0)
    rstd_g = tl.load(rstdg_ptr + offs, mask=row_ok, other=0.0)
    return mean, rstd1, rstd_g


@triton.jit
def _centered_rows(x_ptr, offs, mask, mean):
    """``x - mean`` of a tile of rows, float32, zero outside ``mask``."""
    return tl.where(mask, _load_f32(x_ptr, offs, mask) - mean[:, None], 0.0)


@triton.jit
def _mix_columns(rows, row_ok, num_prefix):
    """Each row's mix column ``n = t - P`` and whether it has one; prefix and padding rows get
    column 0 and ``False``, so that their mix loads are masked to zero."""
    n = rows - num_prefix
    n_ok = row_ok & (n >= 0)
    return tl.where(n_ok, n, 0), n_ok


@triton.jit
def _patch_rows_lng(x_b, mean_b, rstdg_b, wg, bg, ns, cols, N, d, num_prefix):
    """``LN_g(x)`` of the patches ``ns`` on the channels ``cols``, float32, rebuilt from one image's
    ``x``, ``mean`` and ``rstdg`` (pointers to its row 0) and the float32 affine ``wg``, ``bg`` of the
    channels; padding rows and channels are zero."""
    n_ok = ns < N
    mask = n_ok[:, None] & (cols < d)[None, :]
    rows = num_prefix + ns
    x = _load_f32(x_b, rows[:, None] * d + cols[None, :], mask)
    mean = tl.load(mean_b + rows, mask=n_ok, other=0.0)
    rstd_g = tl.load(rstdg_b + rows, mask=n_ok, other=0.0)
    xg = (x - mean[:, None]) * rstd_g[:, None] * wg[None, :] + bg[None, :]
    return tl.where(mask, xg, 0.0)


@triton.jit
def _image_lng(x_ptr, mean_ptr, rstdg_ptr, b, T, wg, bg, ns, cols, N, d, num_prefix):
    """:func:`_patch_rows_lng` of image ``b`` (int64: ``b * T * d`` overflows int32 for large batches)."""
    return _patch_rows_lng(x_ptr + b * T * d, mean_ptr + b * T, rstdg_ptr + b * T, wg, bg, ns, cols, N, d, num_prefix)


@triton.jit
def _prompt_tile(dg_b, js, cols, Np, d):
    """``dg[b, js, cols]`` of one image (``dg_b``: its row 0), zero outside the valid prompts and
    channels, in ``dg``'s dtype."""
    mask = (js < Np)[:, None] & (cols < d)[None, :]
    return tl.load(dg_b + js[:, None] * d + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _layernorm_dx(dy1, xhat1, rstd1, c1, c2, dyg, xhatg, rstd_g, cg1, cg2):
    """``dx`` through both LayerNorms, ``rstd * (dy - mean_c(dy) - xhat * mean_c(dy * xhat))`` per
    term, given the row means ``c1 = mean_c(dy_1)``, ``c2 = mean_c(dy_1 xhat_1)`` and ``cg1``, ``cg2``."""
    dx = rstd1[:, None] * (dy1 - c1[:, None] - xhat1 * c2[:, None])
    dx += rstd_g[:, None] * (dyg - cg1[:, None] - xhatg * cg2[:, None])
    return dx


@triton.jit
def _gen_affine_grads(dxg, xhatg, n_ok):
    """The prompt LayerNorm's weight and bias gradients of a tile, summed over its rows. Prefix rows
    have ``dxg = 0`` but their own ``xhat_g``, possibly NaN: left out, as from the forward."""
    return tl.sum(tl.where(n_ok[:, None], dxg * xhatg, 0.0), axis=0), tl.sum(dxg, axis=0)


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


@_jit
def _norm_and_project_fwd_kernel(
    x_ptr, w1_ptr, b1_ptr, h_ptr, mean_ptr, rstd1_ptr, rstdg_ptr, T, d, eps1, eps_g,
    HAS_W1: tl.constexpr, HAS_B1: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """``h`` and the row statistics of one tile of whole rows of one image (grid ``(tiles, B)``)."""
    # int64: b * T * d overflows int32 for large batches.
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    rows, row_ok, row_offs = _row_tile(b, tl.program_id(0), T, d, BLOCK_T)
    col_ok, mask, offs = _channel_block(row_ok, row_offs, cols, d)

    x = _load_f32(x_ptr, offs, mask)
    mean = tl.sum(x, axis=1) / d
    # Zero the padding columns so they drop out of the variance.
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / d
    rstd1 = tl.rsqrt(var + eps1)
    stat_offs = b * T + rows
    tl.store(mean_ptr + stat_offs, mean, mask=row_ok)
    tl.store(rstd1_ptr + stat_offs, rstd1, mask=row_ok)
    tl.store(rstdg_ptr + stat_offs, tl.rsqrt(var + eps_g), mask=row_ok)

    h = xc * rstd1[:, None]
    if HAS_W1:
        h = h * tl.load(w1_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_B1:
        h = h + tl.load(b1_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    _store(h_ptr, offs, h, mask, ROUND_BF16)


@_jit
def _norm_and_project_g_shared_kernel(
    x_ptr, wg_ptr, bg_ptr, mix_ptr, task_ptr, mean_ptr, rstdg_ptr, g_ptr, T, N, d, Np, num_prefix,
    HAS_WG: tl.constexpr, HAS_BG: tl.constexpr, HAS_TASK: tl.constexpr, ROUND_BF16: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
):  # fmt: skip
    """``g[b, js, cols]`` for a shared mix (grid ``(B, Np / BLOCK_J, d / BLOCK_C)``)."""
    b = tl.program_id(0).to(tl.int64)
    mix_ptr, wg_ptr, bg_ptr = _task_slices(task_ptr, b, mix_ptr, Np, N, wg_ptr, bg_ptr, d, HAS_TASK)
    js = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    j_ok = js < Np
    col_ok = cols < d
    wg, bg = _prompt_affine(wg_ptr, bg_ptr, cols, d, HAS_WG, HAS_BG)

    # The sum over patch tiles of mix[js, tile] @ LN_g(x)[tile, cols], in a fixed order.
    acc = tl.zeros((BLOCK_J, BLOCK_C), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        xg = _image_lng(x_ptr, mean_ptr, rstdg_ptr, b, T, wg, bg, ns, cols, N, d, num_prefix)
        m = tl.load(mix_ptr + js[:, None] * N + ns[None, :], mask=j_ok[:, None] & (ns < N)[None, :], other=0.0)
        acc = tl.dot(m, xg, acc, input_precision="ieee")

    g_offs = b * Np * d + js[:, None] * d + cols[None, :]
    _store(g_ptr, g_offs, acc, j_ok[:, None] & col_ok[None, :], ROUND_BF16)


@_jit
def _norm_and_project_g_kernel(
    x_ptr, wg_ptr, bg_ptr, mix_ptr, task_ptr, mean_ptr, rstdg_ptr, g_ptr, T, N, d, Np, num_prefix,
    HAS_WG: tl.constexpr, HAS_BG: tl.constexpr, HAS_TASK: tl.constexpr, ROUND_BF16: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
):  # fmt: skip
    """``g[b, js, cols]`` for a per-channel mix (grid ``(B, Np / BLOCK_J, d / BLOCK_C)``)."""
    b = tl.program_id(0).to(tl.int64)
    mix_ptr, wg_ptr, bg_ptr = _task_slices(task_ptr, b, mix_ptr, Np, N * d, wg_ptr, bg_ptr, d, HAS_TASK)
    js = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    j_ok = js < Np
    col_ok = cols < d
    wg, bg = _prompt_affine(wg_ptr, bg_ptr, cols, d, HAS_WG, HAS_BG)
    # int64: j * N * d may exceed int32.
    mix_jc = mix_ptr + js.to(tl.int64)[:, None, None] * N * d + cols[None, None, :]

    # g[b, j, c] = sum_n mix[j, n, c] * LN_g(x)[n, c], accumulated over the patches in a fixed order
    # and reduced over the patch axis once at the end.
    acc = tl.zeros((BLOCK_J, BLOCK_N, BLOCK_C), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        xg = _image_lng(x_ptr, mean_ptr, rstdg_ptr, b, T, wg, bg, ns, cols, N, d, num_prefix)
        m_mask = j_ok[:, None, None] & (ns < N)[None, :, None] & col_ok[None, None, :]
        m = tl.load(mix_jc + (ns * d)[None, :, None], mask=m_mask, other=0.0)
        acc += m * xg[None, :, :]

    g_offs = b * Np * d + js[:, None] * d + cols[None, :]
    _store(g_ptr, g_offs, tl.sum(acc, axis=1), j_ok[:, None] & col_ok[None, :], ROUND_BF16)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


@_jit
def _norm_and_project_dmix_shared_kernel(
    dg_ptr, x_ptr, wg_ptr, bg_ptr, task_ptr, mean_ptr, rstdg_ptr, a_ptr, u_ptr, v_ptr, T, N, d, Np, num_prefix,
    HAS_WG: tl.constexpr, HAS_BG: tl.constexpr, HAS_TASK: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
):  # fmt: skip
    """``a[b, js, ns]``, ``u[b, js]`` and ``v[b, js]`` (float32) of a shared mix (grid ``(B, N /
    BLOCK_N, Np / BLOCK_J)``), looping over the channels."""
    b = tl.program_id(0).to(tl.int64)
    if HAS_TASK:
        t = tl.load(task_ptr + b)
        wg_ptr += t * d
        bg_ptr += t * d
    pid_n = tl.program_id(1)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    js = tl.program_id(2) * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = js < Np
    # xhat_g: LN_g without its affine, which goes onto dg instead.
    ones = tl.full((BLOCK_C,), 1.0, tl.float32)
    zeros = tl.zeros((BLOCK_C,), tl.float32)

    a = tl.zeros((BLOCK_J, BLOCK_N), dtype=tl.float32)
    u = tl.zeros((BLOCK_J,), dtype=tl.float32)
    v = tl.zeros((BLOCK_J,), dtype=tl.float32)
    for c0 in range(0, d, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        dgc = _prompt_tile(dg_ptr + b * Np * d, js, cols, Np, d).to(tl.float32)
        dgw = dgc * _channel_vector(wg_ptr, cols, d, HAS_WG, 1.0)[None, :]
        xhat = _image_lng(x_ptr, mean_ptr, rstdg_ptr, b, T, ones, zeros, ns, cols, N, d, num_prefix)
        a = tl.dot(dgw, tl.trans(xhat), a, input_precision="ieee")
        u += tl.sum(dgw, axis=1)
        v += tl.sum(dgc * _channel_vector(bg_ptr, cols, d, HAS_BG, 0.0)[None, :], axis=1)

    a_offs = b * Np * N + js[:, None] * N + ns[None, :]
    tl.store(a_ptr + a_offs, a, mask=j_ok[:, None] & (ns < N)[None, :])
    # Every patch block computes u and v; the first one stores them.
    first = j_ok & (pid_n == 0)
    tl.store(u_ptr + b * Np + js, u, mask=first)
    tl.store(v_ptr + b * Np + js, v, mask=first)


@_jit
def _norm_and_project_bwd_shared_kernel(
    dh_ptr, dg_ptr, x_ptr, w1_ptr, wg_ptr, mix_ptr, task_ptr, a_ptr, u_ptr, mean_ptr, rstd1_ptr, rstdg_ptr,
    dx_ptr, dw1_ptr, db1_ptr, dwg_ptr, dbg_ptr, T, N, d, Np, num_prefix,
    HAS_W1: tl.constexpr, HAS_WG: tl.constexpr, HAS_TASK: tl.constexpr, ROUND_BF16: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr,
):  # fmt: skip
    """``dx`` and the weight partials of one tile of ``BLOCK_T`` rows of one image, for a shared mix
    (grid ``(tiles, B)``), looping over the channels twice. ``a``, ``u``: from the dmix kernel."""
    tile = tl.program_id(0)
    # int64: b * T * d overflows int32 for large batches.
    b = tl.program_id(1).to(tl.int64)
    mix_ptr, wg_ptr, _ = _task_slices(task_ptr, b, mix_ptr, Np, N, wg_ptr, wg_ptr, d, HAS_TASK)  # no bias here
    rows, row_ok, row_offs = _row_tile(b, tile, T, d, BLOCK_T)
    mean, rstd1, rstd_g = _row_statistics(mean_ptr, rstd1_ptr, rstdg_ptr, b, rows, row_ok, T)
    n, n_ok = _mix_columns(rows, row_ok, num_prefix)
    part_offs = (b * tl.num_programs(0) + tile) * d

    # Pass 1: the row sums of dy_1 and dy_1 xhat_1, and norm1's weight and bias gradients.
    c1 = tl.zeros((BLOCK_T,), dtype=tl.float32)
    c2 = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for c0 in range(0, d, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok, mask, offs = _channel_block(row_ok, row_offs, cols, d)
        xhat1 = _centered_rows(x_ptr, offs, mask, mean) * rstd1[:, None]
        dh = _load_f32(dh_ptr, offs, mask)
        dy1 = dh * _channel_vector(w1_ptr, cols, d, HAS_W1, 1.0)[None, :]
        c1 += tl.sum(dy1, axis=1)
        c2 += tl.sum(dy1 * xhat1, axis=1)
        tl.store(dw1_ptr + part_offs + cols, tl.sum(dh * xhat1, axis=0), mask=col_ok)
        tl.store(db1_ptr + part_offs + cols, tl.sum(dh, axis=0), mask=col_ok)
    c1 = c1 / d
    c2 = c2 / d

    # The row sums of LN_g's backward without dxg (zero on prefix and padding rows).
    cg1 = tl.zeros((BLOCK_T,), dtype=tl.float32)
    cg2 = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for j0 in range(0, Np, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        j_ok = js < Np
        mt_mask = n_ok[:, None] & j_ok[None, :]
        # mix[js, n] and a[b, js, n] loaded transposed, (BLOCK_T, BLOCK_J).
        m_t = tl.load(mix_ptr + js[None, :] * N + n[:, None], mask=mt_mask, other=0.0)
        a_t = tl.load(a_ptr + b * Np * N + js[None, :] * N + n[:, None], mask=mt_mask, other=0.0)
        uj = tl.load(u_ptr + b * Np + js, mask=j_ok, other=0.0)
        cg1 += tl.sum(m_t * uj[None, :], axis=1)
        cg2 += tl.sum(m_t * a_t, axis=1)
    cg1 = cg1 / d
    cg2 = cg2 / d

    # Pass 2: dxg = mix[:, n]^T dg on each channel block, then dx and LN_g's weight and bias gradients.
    for c0 in range(0, d, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok, mask, offs = _channel_block(row_ok, row_offs, cols, d)
        dxg = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
        for j0 in range(0, Np, BLOCK_J):
            js = j0 + tl.arange(0, BLOCK_J)
            m_t = tl.load(mix_ptr + js[None, :] * N + n[:, None], mask=n_ok[:, None] & (js < Np)[None, :], other=0.0)
            dgc = _prompt_tile(dg_ptr + b * Np * d, js, cols, Np, d)
            dxg = tl.dot(m_t, dgc.to(tl.float32), dxg, input_precision="ieee")
        xc = _centered_rows(x_ptr, offs, mask, mean)
        xhat1 = xc * rstd1[:, None]
        xhatg = xc * rstd_g[:, None]
        dy1 = _load_f32(dh_ptr, offs, mask) * _channel_vector(w1_ptr, cols, d, HAS_W1, 1.0)[None, :]
        dyg = dxg * _channel_vector(wg_ptr, cols, d, HAS_WG, 1.0)[None, :]
        _store(dx_ptr, offs, _layernorm_dx(dy1, xhat1, rstd1, c1, c2, dyg, xhatg, rstd_g, cg1, cg2), mask, ROUND_BF16)
        dwg, dbg = _gen_affine_grads(dxg, xhatg, n_ok)
        tl.store(dwg_ptr + part_offs + cols, dwg, mask=col_ok)
        tl.store(dbg_ptr + part_offs + cols, dbg, mask=col_ok)


@triton.jit
def _bwd_per_channel_tile(dh_ptr, dg_b, x_ptr, mix_ptr, mean_ptr, rstd1_ptr, rstdg_ptr, dx_ptr, w1, wg,
                          dw1, db1, dwg, dbg, b, tile, cols, T, N, d, Np, num_prefix,
                          ROUND_BF16: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """``dx`` of one tile of whole rows of image ``b`` for a per-channel mix (``mix_ptr``: its task's
    slice; ``dg_b``: the image's ``(Np, d)`` gradient of ``g``; ``w1``, ``wg``: float32 weights on the
    channels ``cols``), and the float32 weight-gradient sums ``dw1``, ``db1``, ``dwg``, ``dbg`` with
    this tile's added."""
    rows, row_ok, row_offs = _row_tile(b, tile, T, d, BLOCK_T)
    col_ok, mask, offs = _channel_block(row_ok, row_offs, cols, d)
    mean, rstd1, rstd_g = _row_statistics(mean_ptr, rstd1_ptr, rstdg_ptr, b, rows, row_ok, T)
    xc = _centered_rows(x_ptr, offs, mask, mean)
    xhat1 = xc * rstd1[:, None]
    xhatg = xc * rstd_g[:, None]

    # dxg[t, c] = sum_j mix[j, t - P, c] dg[j, c], prompt by prompt; prefix and padding rows load
    # zero mix entries.
    n, n_ok = _mix_columns(rows, row_ok, num_prefix)
    mix_mask = n_ok[:, None] & col_ok[None, :]
    tile_offs = n[:, None] * d + cols[None, :]
    dxg = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    # Advanced by pointer increments: the offset j * N * d may exceed int32.
    mix_j = mix_ptr
    for j in range(0, Np):
        dgj = tl.load(dg_b + j * d + cols, mask=col_ok, other=0.0).to(tl.float32)
        m = tl.load(mix_j + tile_offs, mask=mix_mask, other=0.0)
        dxg += m * dgj[None, :]
        mix_j += N * d

    dh = _load_f32(dh_ptr, offs, mask)
    dy1 = dh * w1[None, :]
    dyg = dxg * wg[None, :]
    c1 = tl.sum(dy1, axis=1) / d
    c2 = tl.sum(dy1 * xhat1, axis=1) / d
    cg1 = tl.sum(dyg, axis=1) / d
    cg2 = tl.sum(dyg * xhatg, axis=1) / d
    _store(dx_ptr, offs, _layernorm_dx(dy1, xhat1, rstd1, c1, c2, dyg, xhatg, rstd_g, cg1, cg2), mask, ROUND_BF16)

    dw1 += tl.sum(dh * xhat1, axis=0)
    db1 += tl.sum(dh, axis=0)
    tile_dwg, tile_dbg = _gen_affine_grads(dxg, xhatg, n_ok)
    return dw1, db1, dwg + tile_dwg, dbg + tile_dbg


@_jit
def _norm_and_project_bwd_per_channel_kernel(
    dh_ptr, dg_ptr, x_ptr, w1_ptr, wg_ptr, mix_ptr, task_ptr, mean_ptr, rstd1_ptr, rstdg_ptr,
    dx_ptr, dw1_ptr, db1_ptr, dwg_ptr, dbg_ptr, T, N, d, Np, num_prefix,
    HAS_W1: tl.constexpr, HAS_WG: tl.constexpr, HAS_TASK: tl.constexpr, ROUND_BF16: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, TILES: tl.constexpr,
):  # fmt: skip
    """``dx`` and the weight partials of one chunk of ``TILES`` tiles of whole rows of one image, for
    a per-channel mix (grid ``(chunks, B)``; the partials are ``(B * chunks, d)``)."""
    chunk = tl.program_id(0)
    # int64: b * T * d overflows int32 for large batches.
    b = tl.program_id(1).to(tl.int64)
    mix_ptr, wg_ptr, _ = _task_slices(task_ptr, b, mix_ptr, Np, N * d, wg_ptr, wg_ptr, d, HAS_TASK)  # no bias here
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < d
    w1 = _channel_vector(w1_ptr, cols, d, HAS_W1, 1.0)
    wg = _channel_vector(wg_ptr, cols, d, HAS_WG, 1.0)
    # The chunk's weight gradients, summed over its tiles in registers: partials of TILES * BLOCK_T
    # rows, not of one small tile.
    dw1 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    db1 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dwg = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbg = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for tile in range(chunk * TILES, chunk * TILES + TILES):
        dw1, db1, dwg, dbg = _bwd_per_channel_tile(
            dh_ptr, dg_ptr + b * Np * d, x_ptr, mix_ptr, mean_ptr, rstd1_ptr, rstdg_ptr, dx_ptr, w1, wg,
            dw1, db1, dwg, dbg, b, tile, cols, T, N, d, Np, num_prefix, ROUND_BF16, BLOCK_T, BLOCK_D,
        )  # fmt: skip
    part_offs = (b * tl.num_programs(0) + chunk) * d + cols
    tl.store(dw1_ptr + part_offs, dw1, mask=col_ok)
    tl.store(db1_ptr + part_offs, db1, mask=col_ok)
    tl.store(dwg_ptr + part_offs, dwg, mask=col_ok)
    tl.store(dbg_ptr + part_offs, dbg, mask=col_ok)


@_jit
def _norm_and_project_dmix_kernel(
    dg_ptr, x_ptr, wg_ptr, bg_ptr, order_ptr, starts_ptr, mean_ptr, rstdg_ptr, dmix_ptr, B, T, N, d, Np, num_prefix,
    HAS_WG: tl.constexpr, HAS_BG: tl.constexpr, HAS_TASK: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
):  # fmt: skip
    """``dmix[js, ns, cols]`` of a per-channel mix, summed over the images (grid ``(d / BLOCK_C,
    N / BLOCK_N, Np / BLOCK_J)``); with ``HAS_TASK`` axis 0 is (task, channel block) and the sum runs
    over the task's images."""
    if HAS_TASK:
        c_blocks = tl.cdiv(d, BLOCK_C)
        t = tl.program_id(0) // c_blocks
        cols = (tl.program_id(0) % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
        wg_ptr += t * d
        bg_ptr += t * d
        # int64: t * Np * N * d may exceed int32.
        dmix_ptr += t.to(tl.int64) * Np * N * d
    else:
        cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    js = tl.program_id(2) * BLOCK_J + tl.arange(0, BLOCK_J)
    col_ok = cols < d
    j_ok = js < Np
    wg, bg = _prompt_affine(wg_ptr, bg_ptr, cols, d, HAS_WG, HAS_BG)

    # dmix[j, n, c] = sum_b dg[b, j, c] * LN_g(x)[b, n, c], accumulated in a fixed order: batch order,
    # or task t's images in the stable order.
    acc = tl.zeros((BLOCK_J, BLOCK_N, BLOCK_C), dtype=tl.float32)
    if HAS_TASK:
        for i in range(tl.load(starts_ptr + t), tl.load(starts_ptr + t + 1)):
            b = tl.load(order_ptr + i)
            xg = _image_lng(x_ptr, mean_ptr, rstdg_ptr, b, T, wg, bg, ns, cols, N, d, num_prefix)
            acc += _prompt_tile(dg_ptr + b * Np * d, js, cols, Np, d).to(tl.float32)[:, None, :] * xg[None, :, :]
    else:
        # Image pointers are advanced by increments: b * T * d may exceed int32.
        x_b = x_ptr
        dg_b = dg_ptr
        mean_b = mean_ptr
        rstdg_b = rstdg_ptr
        for _ in range(0, B):
            xg = _patch_rows_lng(x_b, mean_b, rstdg_b, wg, bg, ns, cols, N, d, num_prefix)
            acc += _prompt_tile(dg_b, js, cols, Np, d).to(tl.float32)[:, None, :] * xg[None, :, :]
            x_b += T * d
            dg_b += Np * d
            mean_b += T
            rstdg_b += T

    # int64: j * N * d may exceed int32.
    out_offs = js.to(tl.int64)[:, None, None] * N * d + (ns[:, None] * d + cols[None, :])[None, :, :]
    out_mask = j_ok[:, None, None] & (ns < N)[None, :, None] & col_ok[None, None, :]
    tl.store(dmix_ptr + out_offs, acc, mask=out_mask)


@_jit
def _norm_and_project_task_sum_kernel(
    src_ptr, order_ptr, starts_ptr, out_ptr, R, C, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """``out[t] = sum`` over task ``t``'s images ``b`` and rows ``r < R`` of ``src[b, r]`` (float32,
    ``(B, R, C)`` in, ``(K, C)`` out; grid ``(K, C / BLOCK_C)``), each task's images in the stable
    order and each image's rows in turn: deterministic, where ``index_add_`` on CUDA adds with
    atomics. A task without images gets zeros."""
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i in range(tl.load(starts_ptr + t), tl.load(starts_ptr + t + 1)):
        # int64: b * R * C may exceed int32.
        src_b = src_ptr + tl.load(order_ptr + i) * R * C
        for r in range(0, R):
            acc += tl.load(src_b + r * C + cols, mask=col_ok, other=0.0)
    tl.store(out_ptr + t.to(tl.int64) * C + cols, acc, mask=col_ok)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

# Largest tile of whole rows (BLOCK_T * BLOCK_D float32 elements) a LayerNorm program keeps per
# register tensor: 16 registers a thread at 8 warps, so the handful of live tiles fit without spills.
_ROW_TILE = 4096


def launch_config(kernel: str, T: int, N: int, d: int, Np: int) -> dict:
    """Block sizes, warps and pipeline stages of ``_norm_and_project_<kernel>_kernel`` for ``T``
    tokens, ``N`` patches, ``d`` channels and ``Np`` prompts, as keyword arguments of its launch: the
    one place they are chosen (the launchers and, through them, the offline compilation gate
    ``tests/test_gpu_static_triton.py`` call it).

    Whole-row kernels (``fwd``, ``bwd_per_channel``) shrink their rows per program as ``d`` grows so
    a tile stays within ``_ROW_TILE`` elements, and add warps past it (``d > 4096``). The others tile
    the channels and keep ``tl.dot`` operands at least 16 wide (its minimum); their float32
    accumulators hold at most 4096 elements.
    """
    if kernel in ("fwd", "bwd_per_channel"):
        block_d = max(16, triton.next_power_of_2(d))
        block_t = max(1, min(triton.next_power_of_2(T), _ROW_TILE // block_d))
        num_warps = max(4, min(16, block_t * block_d // 512))
        cfg = dict(BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps, num_stages=1)
        if kernel == "bwd_per_channel":
            # Each program sums its weight gradients over 32 rows or more, so their partials stay as
            # small as bwd_shared's.
            cfg["TILES"] = max(1, 32 // block_t)
        return cfg
    # tl.dot on float32 runs on FMA units, each thread holding its share of both operands for the
    # whole reduction width: the widths below are the largest without spills (ptxas, sm_80/90).
    if kernel == "g_shared":  # (BLOCK_J, BLOCK_N) @ (BLOCK_N, BLOCK_C)
        block_j = max(16, min(32, triton.next_power_of_2(Np)))
        return dict(BLOCK_C=64, BLOCK_N=16, BLOCK_J=block_j, num_warps=4, num_stages=2)
    if kernel == "dmix_shared":  # (BLOCK_J, BLOCK_C) @ (BLOCK_C, BLOCK_N)
        block_j = max(16, min(32, triton.next_power_of_2(Np)))
        return dict(BLOCK_C=32, BLOCK_N=32, BLOCK_J=block_j, num_warps=4, num_stages=2)
    if kernel == "bwd_shared":  # (BLOCK_T, BLOCK_J) @ (BLOCK_J, BLOCK_C), next to x, dh and dxg tiles
        return dict(BLOCK_T=32, BLOCK_C=64, BLOCK_J=16, num_warps=8, num_stages=2)
    if kernel in ("g", "dmix"):
        # A BLOCK_J x BLOCK_N x BLOCK_C accumulator (and, in g, a mix tile of that size), 16
        # elements a thread at 8 warps (4 warps spill at Np = 1 with Triton 3.6's ptxas). Every
        # prompt block re-reads the x tile and, in dmix, every patch block the dg tile, so
        # BLOCK_J * BLOCK_N is fixed at 64 and split evenly (8 x 8) unless Np is small.
        block_j = min(8, triton.next_power_of_2(Np))
        block_n = min(64 // block_j, triton.next_power_of_2(N))
        return dict(BLOCK_C=64, BLOCK_N=block_n, BLOCK_J=block_j, num_warps=8, num_stages=2)
    if kernel == "task_sum":  # one 16-byte load a thread per partial row
        return dict(BLOCK_C=512, num_warps=4, num_stages=1)
    raise ValueError(f"unknown norm_and_project kernel {kernel!r}")


def _round_bf16(dtype: torch.dtype) -> bool:
    """Whether stores in ``dtype`` must be rounded by hand: bfloat16 under the interpreter."""
    return INTERPRETED and dtype == torch.bfloat16


def _given(t: Optional[torch.Tensor], placeholder: torch.Tensor) -> torch.Tensor:
    """``t``, or for an absent optional input a placeholder the kernels never read (its flag is off)."""
    return placeholder if t is None else t


def norm_and_project_forward(
    x: torch.Tensor,
    norm1_weight: Optional[torch.Tensor],
    norm1_bias: Optional[torch.Tensor],
    eps1: float,
    gen_weight: Optional[torch.Tensor],
    gen_bias: Optional[torch.Tensor],
    eps_g: float,
    mix: torch.Tensor,
    num_prefix: int,
    task: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``h = LN_1(x)`` and ``g = mix @ LN_g(x[:, num_prefix:])``: one kernel normalises, a second one
    reads the patch rows again and projects them (no buffer but the outputs). With ``task``, image
    ``b`` is projected with its task's slices ``mix[task[b]]``, ``gen_weight[task[b]]`` and
    ``gen_bias[task[b]]``.

    Args:
        x: block input ``(B, T, d)``, contiguous, float32/float16/bfloat16.
        norm1_weight, norm1_bias: ``(d,)`` in x's dtype, or None (ones, zeros).
        eps1: norm1 epsilon.
        gen_weight, gen_bias: the prompt LayerNorm's ``(d,)`` in x's dtype, ``(K, d)`` with ``task``,
            or None (ones, zeros).
        eps_g: prompt LayerNorm epsilon.
        mix: ``(Np, N)`` or per-channel ``(Np, N, d)``, float32, contiguous, ``N = T - num_prefix``;
            with ``task`` stacked per task, ``(K, Np, N)`` or ``(K, Np, N, d)``.
        num_prefix: prefix tokens ``P``, left out of the projection.
        task: ``(B,)`` int64 task of each image, values in ``[0, K)``, contiguous, or None (one task).

    Returns:
        ``h (B, T, d)`` and ``g (B, Np, d)`` in x's dtype, and the float32 row statistics
        ``mean``, ``rstd1 = 1/sqrt(var + eps1)``, ``rstd_g = 1/sqrt(var + eps_g)``, each ``(B, T)``.
    """
    B, T, d = x.shape
    lead = int(task is not None)
    Np, N = mix.shape[lead : lead + 2]
    per_channel = mix.dim() == 3 + lead
    stats = dict(device=x.device, dtype=torch.float32)
    h = torch.empty_like(x)
    mean = torch.empty(B, T, **stats)
    rstd1 = torch.empty(B, T, **stats)
    rstd_g = torch.empty(B, T, **stats)
    g = torch.empty(B, Np, d, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return h, g, mean, rstd1, rstd_g
    with device_guard(x):
        cfg = launch_config("fwd", T, N, d, Np)
        _norm_and_project_fwd_kernel[(triton.cdiv(T, cfg["BLOCK_T"]), B)](
            x, _given(norm1_weight, x), _given(norm1_bias, x), h, mean, rstd1, rstd_g, T, d, eps1, eps_g,
            HAS_W1=norm1_weight is not None, HAS_B1=norm1_bias is not None, ROUND_BF16=_round_bf16(x.dtype), **cfg,
        )  # fmt: skip
        kernel = _norm_and_project_g_kernel if per_channel else _norm_and_project_g_shared_kernel
        cfg = launch_config("g" if per_channel else "g_shared", T, N, d, Np)
        kernel[(B, triton.cdiv(Np, cfg["BLOCK_J"]), triton.cdiv(d, cfg["BLOCK_C"]))](
            x, _given(gen_weight, x), _given(gen_bias, x), mix, _given(task, x), mean, rstd_g, g, T, N, d, Np,
            num_prefix, HAS_WG=gen_weight is not None, HAS_BG=gen_bias is not None, HAS_TASK=task is not None,
            ROUND_BF16=_round_bf16(x.dtype), **cfg,
        )  # fmt: skip
    return h, g, mean, rstd1, rstd_g


class _TaskGroups(NamedTuple):
    """The images grouped by task: ``order[starts[t]:starts[t + 1]]`` are task ``t``'s images, in
    batch order (a stable sort)."""

    order: torch.Tensor  # (B,) int64
    starts: torch.Tensor  # (K + 1,) int64
    count: int  # K


def _group_by_task(task: torch.Tensor, count: int) -> _TaskGroups:
    order = torch.argsort(task, stable=True)
    # Each task's first place in the sorted tasks by searchsorted, not bincount, whose CUDA version
    # waits for the GPU to size its output.
    starts = torch.searchsorted(task[order], torch.arange(count + 1, device=task.device))
    return _TaskGroups(order, starts, count)


def _sum_images(partials: torch.Tensor, rows: int, groups: Optional[_TaskGroups]) -> torch.Tensor:
    """The sum of float32 per-image partials, ``(B * rows, *shape)`` contiguous, over the images and
    their rows: ``shape``, or with ``groups`` one sum per task, ``(K, *shape)``, by
    ``_norm_and_project_task_sum_kernel``."""
    if groups is None:
        return partials.sum(0)
    out = torch.empty(groups.count, *partials.shape[1:], device=partials.device, dtype=torch.float32)
    C = math.prod(partials.shape[1:])
    cfg = launch_config("task_sum", 0, 0, C, 0)
    _norm_and_project_task_sum_kernel[(groups.count, triton.cdiv(C, cfg["BLOCK_C"]))](
        partials, groups.order, groups.starts, out, rows, C, **cfg
    )
    return out


def _dx_and_weight_partials(x: torch.Tensor, rows_per_program: int) -> tuple[torch.Tensor, list, int]:
    """``dx``, the four float32 weight-gradient partials ``(B * programs, d)`` of a dx kernel whose
    programs each own ``rows_per_program`` rows of an image, and its programs per image."""
    B, T, d = x.shape
    programs = triton.cdiv(T, rows_per_program)
    partials = [torch.empty(B * programs, d, device=x.device, dtype=torch.float32) for _ in range(4)]
    return torch.empty_like(x), partials, programs


def _backward_per_channel(dh, dg, x, norm1_weight, gen_weight, gen_bias, mix, mean, rstd1, rstd_g, num_prefix, task,
                          groups):  # fmt: skip
    """``dx``, the weight partials, their programs per image and ``dmix``, for a per-channel mix:
    ``dx`` sums ``dxg`` prompt by prompt over tiles of whole rows, then ``dmix`` is summed over the
    images (of each task) in registers."""
    B, T, d = x.shape
    Np, N = mix.shape[-3:-1]
    flags = dict(HAS_WG=gen_weight is not None, HAS_TASK=task is not None)
    cfg = launch_config("bwd_per_channel", T, N, d, Np)
    dx, partials, programs = _dx_and_weight_partials(x, cfg["BLOCK_T"] * cfg["TILES"])
    if x.numel() > 0:
        _norm_and_project_bwd_per_channel_kernel[(programs, B)](
            dh, dg, x, _given(norm1_weight, x), _given(gen_weight, x), mix, _given(task, x), mean, rstd1, rstd_g,
            dx, *partials, T, N, d, Np, num_prefix,
            HAS_W1=norm1_weight is not None, ROUND_BF16=_round_bf16(x.dtype), **flags, **cfg,
        )  # fmt: skip
    # Also run for B == 0, where it writes zeros.
    dmix = torch.empty(mix.shape, device=x.device, dtype=torch.float32)
    cfg = launch_config("dmix", T, N, d, Np)
    # Tasks on axis 0, whose size limit is 2**31 - 1 (65535 on the others).
    c_blocks = triton.cdiv(d, cfg["BLOCK_C"]) * (1 if groups is None else groups.count)
    order, starts = (x, x) if groups is None else (groups.order, groups.starts)
    _norm_and_project_dmix_kernel[(c_blocks, triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(Np, cfg["BLOCK_J"]))](
        dg, x, _given(gen_weight, x), _given(gen_bias, x), order, starts, mean, rstd_g, dmix, B, T, N, d, Np,
        num_prefix, HAS_BG=gen_bias is not None, **flags, **cfg,
    )  # fmt: skip
    return dx, partials, programs, dmix


def _backward_shared(dh, dg, x, norm1_weight, gen_weight, gen_bias, mix, mean, rstd1, rstd_g, num_prefix, task,
                     groups):  # fmt: skip
    """``dx``, the weight partials, their programs per image and ``dmix``, for a shared mix: the
    per-image ``a (B, Np, N)``, ``u`` and ``v (B, Np)`` (module docstring) first, then ``dx`` over
    tiles of rows, and ``dmix`` summed from ``a`` and ``v``."""
    B, T, d = x.shape
    Np, N = mix.shape[-2:]
    flags = dict(HAS_WG=gen_weight is not None, HAS_TASK=task is not None)
    cfg = launch_config("bwd_shared", T, N, d, Np)
    dx, partials, programs = _dx_and_weight_partials(x, cfg["BLOCK_T"])
    a = torch.empty(B, Np, N, device=x.device, dtype=torch.float32)
    u = torch.empty(B, Np, device=x.device, dtype=torch.float32)
    v = torch.empty(B, Np, device=x.device, dtype=torch.float32)
    if x.numel() > 0:
        mcfg = launch_config("dmix_shared", T, N, d, Np)
        _norm_and_project_dmix_shared_kernel[(B, triton.cdiv(N, mcfg["BLOCK_N"]), triton.cdiv(Np, mcfg["BLOCK_J"]))](
            dg, x, _given(gen_weight, x), _given(gen_bias, x), _given(task, x), mean, rstd_g, a, u, v,
            T, N, d, Np, num_prefix, HAS_BG=gen_bias is not None, **flags, **mcfg,
        )  # fmt: skip
        _norm_and_project_bwd_shared_kernel[(programs, B)](
            dh, dg, x, _given(norm1_weight, x), _given(gen_weight, x), mix, _given(task, x), a, u, mean, rstd1, rstd_g,
            dx, *partials, T, N, d, Np, num_prefix,
            HAS_W1=norm1_weight is not None, ROUND_BF16=_round_bf16(x.dtype), **flags, **cfg,
        )  # fmt: skip
    dmix = _sum_images(a, 1, groups)
    dmix += _sum_images(v, 1, groups)[..., None]
    return dx, partials, programs, dmix


def norm_and_project_backward(
    dh: torch.Tensor,
    dg: torch.Tensor,
    x: torch.Tensor,
    norm1_weight: Optional[torch.Tensor],
    gen_weight: Optional[torch.Tensor],
    gen_bias: Optional[torch.Tensor],
    mix: torch.Tensor,
    mean: torch.Tensor,
    rstd1: torch.Tensor,
    rstd_g: torch.Tensor,
    num_prefix: int,
    task: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`norm_and_project_forward`: one pass over ``x`` for ``dx`` and the weight
    gradients, and a mix-gradient kernel. With ``task`` the images are grouped by task once and every
    per-task gradient is summed over its task's images in that order, never with atomics; without,
    no sort, no extra buffer or launch.

    Args:
        dh: ``(B, T, d)`` gradient of ``h``, contiguous, x's dtype.
        dg: ``(B, Np, d)`` gradient of ``g``, contiguous, x's dtype.
        x: the forward's block input ``(B, T, d)``.
        norm1_weight: ``(d,)`` or None (ones).
        gen_weight: ``(d,)``, ``(K, d)`` with ``task``, or None (ones).
        gen_bias: ``(d,)``, ``(K, d)`` with ``task``, or None (zeros); needed for ``dmix``.
        mix: ``(Np, N)`` or ``(Np, N, d)``, float32, contiguous; ``(K, Np, N)`` or ``(K, Np, N, d)``
            with ``task``.
        mean, rstd1, rstd_g: ``(B, T)`` float32 row statistics from the forward.
        num_prefix: prefix tokens ``P``.
        task: ``(B,)`` int64 task of each image, values in ``[0, K)``, contiguous, or None (one task).

    Returns:
        ``dx (B, T, d)`` in x's dtype; float32 ``dnorm1_weight``, ``dnorm1_bias`` (each ``(d,)``),
        ``dgen_weight``, ``dgen_bias`` (each ``(d,)``, ``(K, d)`` with ``task``; computed even for
        None weights) and ``dmix`` (mix's shape; a task without images gets zeros).
    """
    per_channel = mix.dim() == (3 if task is None else 4)
    groups = None if task is None else _group_by_task(task, mix.shape[0])
    backward = _backward_per_channel if per_channel else _backward_shared
    with device_guard(x):
        dx, partials, programs, dmix = backward(
            dh, dg, x, norm1_weight, gen_weight, gen_bias, mix, mean, rstd1, rstd_g, num_prefix, task, groups
        )
        dnorm1_weight, dnorm1_bias = (p.sum(0) for p in partials[:2])
        dgen_weight, dgen_bias = (_sum_images(p, programs, groups) for p in partials[2:])
    return dx, dnorm1_weight, dnorm1_bias, dgen_weight, dgen_bias, dmix
