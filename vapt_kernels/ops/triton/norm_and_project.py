"""Triton kernels of ``norm_and_project``: the block's LayerNorm and the folded prompt projection
(DESIGN §2.3).

Shapes: ``B`` batch, ``T = P + N`` tokens (``P = num_prefix`` prefix tokens, ``N`` patches), ``d``
channels, ``Np`` prompts. ``mix`` is the folded ``(Np, N)`` matrix ("shared") or its per-channel
form ``(Np, N, d)``.

Forward, two kernels on one stream:

* ``_norm_and_project_fwd_kernel``, one program per tile of a few whole rows of one image (grid
  ``(tiles, B)``): the row mean and variance, ``h = LN_1(x)`` and the row statistics.
* the projection ``g[b] = mix @ LN_g(x[b, P:])``, with ``LN_g(x)`` rebuilt from ``x`` and the
  statistics just written. Each program owns an image, a block of prompts and a block of channels
  (grid ``(B, Np / BLOCK_J, d / BLOCK_C)``) and loops over the patches, accumulating its block of
  ``g`` in float32 registers: ``_norm_and_project_g_shared_kernel`` with ``tl.dot`` over patch
  tiles, ``_norm_and_project_g_kernel`` per channel as ``sum_n mix[j, n, c] * LN_g(x)[n, c]``.
  No partial sums leave a program, so the only buffer is ``g`` itself.

Backward, two kernels on one stream:

* the mix gradient. Shared mix, ``_norm_and_project_dmix_shared_kernel`` (grid
  ``(B, N / BLOCK_N, Np / BLOCK_J)``, a loop over channel blocks): per image
  ``a[b, j, n] = sum_c dg[b, j, c] w_g[c] xhat_g[b, n, c]`` and the row sums
  ``u[b, j] = dg[b, j] . w_g``, ``v[b, j] = dg[b, j] . b_g``; then
  ``dmix = sum_b (a[b] + v[b, :, None])`` (``LN_g(x) = xhat_g w_g + b_g``). ``a`` and ``u`` are
  also the two row sums the LayerNorm backward of ``LN_g`` needs (below), so the ``dx`` kernel
  never has to hold a whole row. Per channel, ``_norm_and_project_dmix_kernel`` (grid
  ``(d / BLOCK_C, N / BLOCK_N, Np / BLOCK_J)``) sums ``dg[b, j, c] * LN_g(x)[b, P + n, c]`` over
  the images in registers.
* ``dx`` and per-program partial sums of the four weight/bias gradients (``(B * tiles, d)``, each
  over 32 rows or more, summed afterwards). The LayerNorm backward of each term is
  ``rstd * (dy - mean_c(dy) - xhat * mean_c(dy * xhat))`` with ``dy_1 = dh w_1`` and
  ``dy_g = dxg w_g``, ``dxg[n] = sum_j mix[j, n] dg[j]`` the gradient reaching ``LN_g``'s output.
  Shared mix, ``_norm_and_project_bwd_shared_kernel``: a tile of rows and a loop over channel
  blocks, twice: the first pass sums ``dy_1`` and ``dy_1 xhat_1`` over the row, the ``LN_g`` row
  sums come from the first kernel (``sum_c dy_g = sum_j mix[j, n] u[j]``,
  ``sum_c dy_g xhat_g = sum_j mix[j, n] a[j, n]``), and the second pass forms ``dxg`` with
  ``tl.dot`` and writes ``dx``. Per channel ``dxg`` has no such shortcut and every element of
  ``mix`` is read once per image anyway, so ``_norm_and_project_bwd_per_channel_kernel`` works on
  tiles of a few whole rows and sums ``dxg`` prompt by prompt.

Many tasks (a per-image index ``task (B,)``, values in ``[0, K)``): ``mix`` is stacked per task,
``(K, Np, N)`` or ``(K, Np, N, d)``, and the prompt LayerNorm's affines are ``(K, d)``. Every
per-image program above reaches its image's slices by a pointer offset of ``task[b]`` (the
constexpr ``HAS_TASK``; without it the kernels compile to the one-task code). The per-task
gradients are sums over a task's images in a fixed order: the backward sorts the images by task
once (stably, so each task keeps batch order), the per-channel mix kernel gets a task axis and loops
over its task's images, and ``_norm_and_project_task_sum_kernel`` (grid ``(K, C / BLOCK_C)``) sums
the per-image partials of the shared mix (``a``, ``v``) and of the prompt LayerNorm's weight and
bias per task. Without ``task`` none of this runs.

Each program owns its slice of every output and partial buffer: no atomics, and the results do not
depend on scheduling. Block sizes are chosen by :func:`launch_config` alone, for the launchers and
for the offline compilation gate (``tests/test_gpu_static_triton.py``), which checks every
configuration for sm_80 and sm_90: no register spills and shared memory within a block's limit at
ViT widths up to ``d = 2048``.

All arithmetic is float32 whatever the input dtype; every load is cast to float32 right away
(Triton's CPU interpreter mishandles bfloat16 arithmetic), and every ``tl.dot`` runs in IEEE float32
(``input_precision="ieee"``, on FMA units) whatever the input dtype: TF32 would round its float32
operands (``LN_g(x)``, ``mix``, ``dg``) to 10-bit mantissas, about 2**-11 relative error per
product, where the op promises float32 products. The interpreter converts float32 to bfloat16 by truncation (up
to 2**-7 relative error; the GPU rounds to nearest), so there the bfloat16 stores of ``h``, ``g``
and ``dx`` are rounded first (``ROUND_BF16``).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl

from .prefix_attention import INTERPRETED, round_to_bfloat16

# Shape arguments that are not specialised on (divisible by 16, equal to 1): one compiled kernel
# serves every token, prompt and row-tile count. ``d`` is specialised: its divisibility lets rows be
# loaded in 16-byte vectors.
_SHAPE_ARGS = ["B", "T", "N", "Np", "num_prefix", "R"]


def _jit(fn):
    """``triton.jit`` that does not specialise on the shape arguments of ``_SHAPE_ARGS``."""
    return triton.jit(fn, do_not_specialize=[a for a in _SHAPE_ARGS if a in fn.__code__.co_varnames])


@_jit
def _norm_and_project_fwd_kernel(
    x_ptr,  # (B, T, d) block input, contiguous
    w1_ptr,  # (d,) norm1 weight (read only when HAS_W1)
    b1_ptr,  # (d,) norm1 bias (read only when HAS_B1)
    h_ptr,  # (B, T, d) output LN_1(x), x's dtype
    mean_ptr,  # (B, T) output row means, float32
    rstd1_ptr,  # (B, T) output 1 / sqrt(var + eps1), float32
    rstdg_ptr,  # (B, T) output 1 / sqrt(var + eps_g), float32
    T,  # tokens per image
    d,  # channels
    eps1,  # norm1 epsilon
    eps_g,  # prompt LayerNorm epsilon
    HAS_W1: tl.constexpr,
    HAS_B1: tl.constexpr,
    ROUND_BF16: tl.constexpr,  # interpreter with bfloat16 x: round stores to nearest (its conversion truncates)
    BLOCK_T: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # next power of two >= d: whole rows, so mean and variance take one read
):
    tile = tl.program_id(0)
    # int64: b * T * d overflows int32 for large batches.
    b = tl.program_id(1).to(tl.int64)
    rows = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < T
    col_ok = cols < d
    mask = row_ok[:, None] & col_ok[None, :]
    offs = b * T * d + rows[:, None] * d + cols[None, :]

    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
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
    if ROUND_BF16:
        h = round_to_bfloat16(h)
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _channel_vector(
    ptr,  # (d,) LayerNorm weight or bias (read only when PRESENT)
    cols,  # (BLOCK_C,) channel indices
    d,  # channels
    PRESENT: tl.constexpr,  # False: the LayerNorm has no such parameter
    ABSENT: tl.constexpr,  # its value when absent: 1.0 for a weight, 0.0 for a bias
):
    """A LayerNorm weight or bias on a block of channels, float32, zero on padding channels."""
    col_ok = cols < d
    if PRESENT:
        v = tl.load(ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        v = tl.where(col_ok, ABSENT, 0.0)
    return v


@triton.jit
def _row_statistics(
    mean_ptr,  # (B, T) row means, float32
    rstd1_ptr,  # (B, T) 1 / sqrt(var + eps1), float32
    rstdg_ptr,  # (B, T) 1 / sqrt(var + eps_g), float32
    b,  # image (int64)
    rows,  # (BLOCK_T,) token indices
    row_ok,  # (BLOCK_T,) rows < T
    T,  # tokens per image
):
    """The forward's statistics of a tile of rows. Padding rows get rstd 0, hence xhat 0 and no
    share in the weight gradients."""
    offs = b * T + rows
    mean = tl.load(mean_ptr + offs, mask=row_ok, other=0.0)
    rstd1 = tl.load(rstd1_ptr + offs, mask=row_ok, other=0.0)
    rstd_g = tl.load(rstdg_ptr + offs, mask=row_ok, other=0.0)
    return mean, rstd1, rstd_g


@triton.jit
def _mix_columns(rows, row_ok, num_prefix):
    """Each row's mix column ``n = t - P`` and whether it has one; prefix and padding rows get
    column 0 and ``False``, so that their mix loads are masked to zero."""
    n = rows - num_prefix
    n_ok = row_ok & (n >= 0)
    return tl.where(n_ok, n, 0), n_ok


@triton.jit
def _patch_rows_lng(
    x_b,  # pointer to row 0 of this image's (T, d) input
    mean_b,  # pointer to this image's (T,) row means
    rstdg_b,  # pointer to this image's (T,) 1 / sqrt(var + eps_g)
    wg,  # (BLOCK_C,) float32 prompt LayerNorm weight of the channel block
    bg,  # (BLOCK_C,) float32 prompt LayerNorm bias of the channel block
    ns,  # (BLOCK_N,) patch indices
    cols,  # (BLOCK_C,) channel indices
    N,  # patches
    d,  # channels
    num_prefix,  # prefix tokens P (patch n is row P + n)
):
    """``LN_g(x)`` of a ``(BLOCK_N, BLOCK_C)`` tile of patch rows, float32, rebuilt from ``x`` and
    the forward's statistics; padding rows and channels are zero."""
    n_ok = ns < N
    mask = n_ok[:, None] & (cols < d)[None, :]
    rows = num_prefix + ns
    x = tl.load(x_b + rows[:, None] * d + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_b + rows, mask=n_ok, other=0.0)
    rstd_g = tl.load(rstdg_b + rows, mask=n_ok, other=0.0)
    xg = (x - mean[:, None]) * rstd_g[:, None] * wg[None, :] + bg[None, :]
    return tl.where(mask, xg, 0.0)


@_jit
def _norm_and_project_g_shared_kernel(
    x_ptr,  # (B, T, d) block input, contiguous
    wg_ptr,  # (d,) prompt LayerNorm weight, (K, d) with HAS_TASK (read only when HAS_WG)
    bg_ptr,  # (d,) prompt LayerNorm bias, (K, d) with HAS_TASK (read only when HAS_BG)
    mix_ptr,  # (Np, N) shared mix, (K, Np, N) with HAS_TASK, float32, contiguous
    task_ptr,  # (B,) int64 task of each image (read only when HAS_TASK)
    mean_ptr,  # (B, T) row means, float32
    rstdg_ptr,  # (B, T) 1 / sqrt(var + eps_g), float32
    g_ptr,  # (B, Np, d) output projection, x's dtype
    T,  # tokens per image
    N,  # patch tokens per image (mix columns)
    d,  # channels
    Np,  # prompts (mix rows)
    num_prefix,  # prefix tokens P (patch n is row P + n)
    HAS_WG: tl.constexpr,
    HAS_BG: tl.constexpr,
    HAS_TASK: tl.constexpr,  # per-task mix and affines, image b using slice task[b]
    ROUND_BF16: tl.constexpr,  # interpreter with bfloat16 x: round stores to nearest (its conversion truncates)
    BLOCK_C: tl.constexpr,  # channels per program
    BLOCK_N: tl.constexpr,  # patches per step of the loop over the patches
    BLOCK_J: tl.constexpr,  # prompts per program (>= 16, a tl.dot dimension)
):
    # int64: b * T * d overflows int32 for large batches.
    b = tl.program_id(0).to(tl.int64)
    if HAS_TASK:
        t = tl.load(task_ptr + b)
        mix_ptr += t * Np * N
        wg_ptr += t * d
        bg_ptr += t * d
    js = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    j_ok = js < Np
    col_ok = cols < d
    wg = _channel_vector(wg_ptr, cols, d, HAS_WG, 1.0)
    bg = _channel_vector(bg_ptr, cols, d, HAS_BG, 0.0)

    # g[b, js, cols] = sum over patch tiles of mix[js, tile] @ LN_g(x)[tile, cols], in float32
    # registers, in a fixed order.
    acc = tl.zeros((BLOCK_J, BLOCK_C), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        xg = _patch_rows_lng(x_ptr + b * T * d, mean_ptr + b * T, rstdg_ptr + b * T, wg, bg, ns, cols, N, d,
                             num_prefix)  # fmt: skip
        m = tl.load(mix_ptr + js[:, None] * N + ns[None, :], mask=j_ok[:, None] & (ns < N)[None, :], other=0.0)
        acc = tl.dot(m, xg, acc, input_precision="ieee")

    if ROUND_BF16:
        acc = round_to_bfloat16(acc)
    g_offs = b * Np * d + js[:, None] * d + cols[None, :]
    tl.store(g_ptr + g_offs, acc.to(g_ptr.dtype.element_ty), mask=j_ok[:, None] & col_ok[None, :])


@_jit
def _norm_and_project_g_kernel(
    x_ptr,  # (B, T, d) block input, contiguous
    wg_ptr,  # (d,) prompt LayerNorm weight, (K, d) with HAS_TASK (read only when HAS_WG)
    bg_ptr,  # (d,) prompt LayerNorm bias, (K, d) with HAS_TASK (read only when HAS_BG)
    mix_ptr,  # (Np, N, d) per-channel mix, (K, Np, N, d) with HAS_TASK, float32, contiguous
    task_ptr,  # (B,) int64 task of each image (read only when HAS_TASK)
    mean_ptr,  # (B, T) row means, float32
    rstdg_ptr,  # (B, T) 1 / sqrt(var + eps_g), float32
    g_ptr,  # (B, Np, d) output projection, x's dtype
    T,  # tokens per image
    N,  # patch tokens per image (mix columns)
    d,  # channels
    Np,  # prompts (mix rows)
    num_prefix,  # prefix tokens P (patch n is row P + n)
    HAS_WG: tl.constexpr,
    HAS_BG: tl.constexpr,
    HAS_TASK: tl.constexpr,  # per-task mix and affines, image b using slice task[b]
    ROUND_BF16: tl.constexpr,  # interpreter with bfloat16 x: round stores to nearest (its conversion truncates)
    BLOCK_C: tl.constexpr,  # channels per program
    BLOCK_N: tl.constexpr,  # patches per step of the loop over the patches
    BLOCK_J: tl.constexpr,  # prompts per program
):
    # int64: b * T * d overflows int32 for large batches.
    b = tl.program_id(0).to(tl.int64)
    if HAS_TASK:
        t = tl.load(task_ptr + b)
        mix_ptr += t * Np * N * d
        wg_ptr += t * d
        bg_ptr += t * d
    js = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    j_ok = js < Np
    col_ok = cols < d
    wg = _channel_vector(wg_ptr, cols, d, HAS_WG, 1.0)
    bg = _channel_vector(bg_ptr, cols, d, HAS_BG, 0.0)
    # int64: j * N * d may exceed int32.
    mix_jc = mix_ptr + js.to(tl.int64)[:, None, None] * N * d + cols[None, None, :]

    # g[b, j, c] = sum_n mix[j, n, c] * LN_g(x)[n, c], accumulated over the patches in a fixed order
    # in float32 registers and reduced over the patch axis once at the end.
    acc = tl.zeros((BLOCK_J, BLOCK_N, BLOCK_C), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        xg = _patch_rows_lng(x_ptr + b * T * d, mean_ptr + b * T, rstdg_ptr + b * T, wg, bg, ns, cols, N, d,
                             num_prefix)  # fmt: skip
        m_mask = j_ok[:, None, None] & (ns < N)[None, :, None] & col_ok[None, None, :]
        m = tl.load(mix_jc + (ns * d)[None, :, None], mask=m_mask, other=0.0)
        acc += m * xg[None, :, :]

    g = tl.sum(acc, axis=1)
    if ROUND_BF16:
        g = round_to_bfloat16(g)
    g_offs = b * Np * d + js[:, None] * d + cols[None, :]
    tl.store(g_ptr + g_offs, g.to(g_ptr.dtype.element_ty), mask=j_ok[:, None] & col_ok[None, :])


@_jit
def _norm_and_project_dmix_shared_kernel(
    dg_ptr,  # (B, Np, d) gradient of g, contiguous
    x_ptr,  # (B, T, d) block input, contiguous
    wg_ptr,  # (d,) prompt LayerNorm weight, (K, d) with HAS_TASK (read only when HAS_WG)
    bg_ptr,  # (d,) prompt LayerNorm bias, (K, d) with HAS_TASK (read only when HAS_BG)
    task_ptr,  # (B,) int64 task of each image (read only when HAS_TASK)
    mean_ptr,  # (B, T) row means, float32
    rstdg_ptr,  # (B, T) 1 / sqrt(var + eps_g), float32
    a_ptr,  # (B, Np, N) output a[b, j, n] = sum_c dg[b, j, c] w_g[c] xhat_g[b, P + n, c], float32
    u_ptr,  # (B, Np) output u[b, j] = dg[b, j] . w_g, float32
    v_ptr,  # (B, Np) output v[b, j] = dg[b, j] . b_g, float32
    T,  # tokens per image
    N,  # patch tokens per image (mix columns)
    d,  # channels
    Np,  # prompts (mix rows)
    num_prefix,  # prefix tokens P (patch n is row P + n)
    HAS_WG: tl.constexpr,
    HAS_BG: tl.constexpr,
    HAS_TASK: tl.constexpr,  # per-task affines, image b using slice task[b]
    BLOCK_C: tl.constexpr,  # channels per step of the loop over the channels
    BLOCK_N: tl.constexpr,  # patches per program (>= 16, a tl.dot dimension)
    BLOCK_J: tl.constexpr,  # prompts per program (>= 16, a tl.dot dimension)
):
    # int64: b * T * d overflows int32 for large batches.
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
        dg_mask = j_ok[:, None] & (cols < d)[None, :]
        dgc = tl.load(dg_ptr + b * Np * d + js[:, None] * d + cols[None, :], mask=dg_mask, other=0.0)
        dgc = dgc.to(tl.float32)
        dgw = dgc * _channel_vector(wg_ptr, cols, d, HAS_WG, 1.0)[None, :]
        xhat = _patch_rows_lng(x_ptr + b * T * d, mean_ptr + b * T, rstdg_ptr + b * T, ones, zeros, ns, cols, N, d,
                               num_prefix)  # fmt: skip
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
    dh_ptr,  # (B, T, d) gradient of h, contiguous
    dg_ptr,  # (B, Np, d) gradient of g, contiguous
    x_ptr,  # (B, T, d) block input, contiguous
    w1_ptr,  # (d,) norm1 weight (read only when HAS_W1)
    wg_ptr,  # (d,) prompt LayerNorm weight, (K, d) with HAS_TASK (read only when HAS_WG)
    mix_ptr,  # (Np, N) shared mix, (K, Np, N) with HAS_TASK, float32, contiguous
    task_ptr,  # (B,) int64 task of each image (read only when HAS_TASK)
    a_ptr,  # (B, Np, N) sum_c dg[b, j, c] w_g[c] xhat_g[b, P + n, c], float32, from the dmix kernel
    u_ptr,  # (B, Np) dg[b, j] . w_g, float32, from the dmix kernel
    mean_ptr,  # (B, T) row means, float32
    rstd1_ptr,  # (B, T) 1 / sqrt(var + eps1), float32
    rstdg_ptr,  # (B, T) 1 / sqrt(var + eps_g), float32
    dx_ptr,  # (B, T, d) output gradient of x, x's dtype
    dw1_ptr,  # (B * tiles, d) output partial gradient of norm1 weight, float32
    db1_ptr,  # (B * tiles, d) output partial gradient of norm1 bias, float32
    dwg_ptr,  # (B * tiles, d) output partial gradient of the prompt LayerNorm weight, float32
    dbg_ptr,  # (B * tiles, d) output partial gradient of the prompt LayerNorm bias, float32
    T,  # tokens per image
    N,  # patch tokens per image (mix columns)
    d,  # channels
    Np,  # prompts (mix rows)
    num_prefix,  # prefix tokens P (rows t < P have no mix column)
    HAS_W1: tl.constexpr,
    HAS_WG: tl.constexpr,
    HAS_TASK: tl.constexpr,  # per-task mix and weight, image b using slice task[b]
    ROUND_BF16: tl.constexpr,  # interpreter with bfloat16 x: round stores to nearest (its conversion truncates)
    BLOCK_T: tl.constexpr,  # rows per program (>= 16, a tl.dot dimension)
    BLOCK_C: tl.constexpr,  # channels per step of the loops over the channels
    BLOCK_J: tl.constexpr,  # prompts per step of the loops over the prompts (>= 16, a tl.dot dimension)
):
    tile = tl.program_id(0)
    # int64: b * T * d overflows int32 for large batches.
    b = tl.program_id(1).to(tl.int64)
    if HAS_TASK:
        t = tl.load(task_ptr + b)
        mix_ptr += t * Np * N
        wg_ptr += t * d
    rows = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    mean, rstd1, rstd_g = _row_statistics(mean_ptr, rstd1_ptr, rstdg_ptr, b, rows, row_ok, T)
    n, n_ok = _mix_columns(rows, row_ok, num_prefix)
    row_offs = b * T * d + rows[:, None] * d
    part_offs = (b * tl.num_programs(0) + tile) * d

    # Pass 1: the row sums of dy_1 and dy_1 xhat_1, and norm1's weight and bias gradients.
    c1 = tl.zeros((BLOCK_T,), dtype=tl.float32)
    c2 = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for c0 in range(0, d, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < d
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + row_offs + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        xhat1 = tl.where(mask, x - mean[:, None], 0.0) * rstd1[:, None]
        dh = tl.load(dh_ptr + row_offs + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy1 = dh * _channel_vector(w1_ptr, cols, d, HAS_W1, 1.0)[None, :]
        c1 += tl.sum(dy1, axis=1)
        c2 += tl.sum(dy1 * xhat1, axis=1)
        tl.store(dw1_ptr + part_offs + cols, tl.sum(dh * xhat1, axis=0), mask=col_ok)
        tl.store(db1_ptr + part_offs + cols, tl.sum(dh, axis=0), mask=col_ok)
    c1 = c1 / d
    c2 = c2 / d

    # The row sums of LN_g's backward without dxg: sum_c dy_g = sum_j mix[j, n] u[j] and
    # sum_c dy_g xhat_g = sum_j mix[j, n] a[j, n]; zero on prefix and padding rows.
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

    # Pass 2: dxg = mix[:, n]^T dg on each channel block, then dx and LN_g's weight and bias
    # gradients.
    for c0 in range(0, d, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < d
        dxg = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
        for j0 in range(0, Np, BLOCK_J):
            js = j0 + tl.arange(0, BLOCK_J)
            j_ok = js < Np
            m_t = tl.load(mix_ptr + js[None, :] * N + n[:, None], mask=n_ok[:, None] & j_ok[None, :], other=0.0)
            dg_mask = j_ok[:, None] & col_ok[None, :]
            dgc = tl.load(dg_ptr + b * Np * d + js[:, None] * d + cols[None, :], mask=dg_mask, other=0.0)
            dxg = tl.dot(m_t, dgc.to(tl.float32), dxg, input_precision="ieee")
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + row_offs + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        xc = tl.where(mask, x - mean[:, None], 0.0)
        xhat1 = xc * rstd1[:, None]
        xhatg = xc * rstd_g[:, None]
        dh = tl.load(dh_ptr + row_offs + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy1 = dh * _channel_vector(w1_ptr, cols, d, HAS_W1, 1.0)[None, :]
        dyg = dxg * _channel_vector(wg_ptr, cols, d, HAS_WG, 1.0)[None, :]
        dx = rstd1[:, None] * (dy1 - c1[:, None] - xhat1 * c2[:, None])
        dx += rstd_g[:, None] * (dyg - cg1[:, None] - xhatg * cg2[:, None])
        if ROUND_BF16:
            dx = round_to_bfloat16(dx)
        tl.store(dx_ptr + row_offs + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        # Prefix rows have dxg = 0 but their own xhat_g, possibly NaN: left out, as from the forward.
        tl.store(dwg_ptr + part_offs + cols, tl.sum(tl.where(n_ok[:, None], dxg * xhatg, 0.0), axis=0), mask=col_ok)
        tl.store(dbg_ptr + part_offs + cols, tl.sum(dxg, axis=0), mask=col_ok)


@_jit
def _norm_and_project_bwd_per_channel_kernel(
    dh_ptr,  # (B, T, d) gradient of h, contiguous
    dg_ptr,  # (B, Np, d) gradient of g, contiguous
    x_ptr,  # (B, T, d) block input, contiguous
    w1_ptr,  # (d,) norm1 weight (read only when HAS_W1)
    wg_ptr,  # (d,) prompt LayerNorm weight, (K, d) with HAS_TASK (read only when HAS_WG)
    mix_ptr,  # (Np, N, d) per-channel mix, (K, Np, N, d) with HAS_TASK, float32, contiguous
    task_ptr,  # (B,) int64 task of each image (read only when HAS_TASK)
    mean_ptr,  # (B, T) row means, float32
    rstd1_ptr,  # (B, T) 1 / sqrt(var + eps1), float32
    rstdg_ptr,  # (B, T) 1 / sqrt(var + eps_g), float32
    dx_ptr,  # (B, T, d) output gradient of x, x's dtype
    dw1_ptr,  # (B * chunks, d) output partial gradient of norm1 weight, float32
    db1_ptr,  # (B * chunks, d) output partial gradient of norm1 bias, float32
    dwg_ptr,  # (B * chunks, d) output partial gradient of the prompt LayerNorm weight, float32
    dbg_ptr,  # (B * chunks, d) output partial gradient of the prompt LayerNorm bias, float32
    T,  # tokens per image
    N,  # patch tokens per image (mix columns)
    d,  # channels
    Np,  # prompts (mix rows)
    num_prefix,  # prefix tokens P (rows t < P have no mix column)
    HAS_W1: tl.constexpr,
    HAS_WG: tl.constexpr,
    HAS_TASK: tl.constexpr,  # per-task mix and weight, image b using slice task[b]
    ROUND_BF16: tl.constexpr,  # interpreter with bfloat16 x: round stores to nearest (its conversion truncates)
    BLOCK_T: tl.constexpr,  # rows per tile
    BLOCK_D: tl.constexpr,  # next power of two >= d: whole rows, so each row sum is taken in registers
    TILES: tl.constexpr,  # tiles per program (a chunk of TILES * BLOCK_T rows)
):
    chunk = tl.program_id(0)
    # int64: b * T * d overflows int32 for large batches.
    b = tl.program_id(1).to(tl.int64)
    if HAS_TASK:
        t = tl.load(task_ptr + b)
        mix_ptr += t * Np * N * d
        wg_ptr += t * d
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < d
    w1 = _channel_vector(w1_ptr, cols, d, HAS_W1, 1.0)
    wg = _channel_vector(wg_ptr, cols, d, HAS_WG, 1.0)
    dg_rows = dg_ptr + b * Np * d
    # The weight gradients of the chunk, summed over its tiles in registers: partials of
    # TILES * BLOCK_T rows, not of one small tile.
    dw1 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    db1 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dwg = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbg = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for tile in range(chunk * TILES, chunk * TILES + TILES):
        dw1, db1, dwg, dbg = _bwd_per_channel_tile(
            dh_ptr, dg_rows, x_ptr, mix_ptr, mean_ptr, rstd1_ptr, rstdg_ptr, dx_ptr, w1, wg, dw1, db1, dwg, dbg,
            b, tile, cols, T, N, d, Np, num_prefix, ROUND_BF16, BLOCK_T, BLOCK_D,
        )  # fmt: skip
    part_offs = (b * tl.num_programs(0) + chunk) * d + cols
    tl.store(dw1_ptr + part_offs, dw1, mask=col_ok)
    tl.store(db1_ptr + part_offs, db1, mask=col_ok)
    tl.store(dwg_ptr + part_offs, dwg, mask=col_ok)
    tl.store(dbg_ptr + part_offs, dbg, mask=col_ok)


@triton.jit
def _bwd_per_channel_tile(
    dh_ptr,  # (B, T, d) gradient of h, contiguous
    dg_rows,  # pointer to this image's (Np, d) gradient of g
    x_ptr,  # (B, T, d) block input, contiguous
    mix_ptr,  # (Np, N, d) per-channel mix, float32, contiguous
    mean_ptr,  # (B, T) row means, float32
    rstd1_ptr,  # (B, T) 1 / sqrt(var + eps1), float32
    rstdg_ptr,  # (B, T) 1 / sqrt(var + eps_g), float32
    dx_ptr,  # (B, T, d) output gradient of x, x's dtype
    w1,  # (BLOCK_D,) float32 norm1 weight
    wg,  # (BLOCK_D,) float32 prompt LayerNorm weight
    dw1, db1, dwg, dbg,  # (BLOCK_D,) float32 weight-gradient sums, returned with this tile's added
    b,  # image (int64)
    tile,  # row tile
    cols,  # (BLOCK_D,) channel indices
    T,  # tokens per image
    N,  # patch tokens per image (mix columns)
    d,  # channels
    Np,  # prompts (mix rows)
    num_prefix,  # prefix tokens P (rows t < P have no mix column)
    ROUND_BF16: tl.constexpr,  # interpreter with bfloat16 x: round stores to nearest (its conversion truncates)
    BLOCK_T: tl.constexpr,  # rows per tile
    BLOCK_D: tl.constexpr,  # next power of two >= d
):
    """``dx`` of one tile of whole rows (a per-channel mix), and its weight gradients added to the sums."""
    rows = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    col_ok = cols < d
    mask = row_ok[:, None] & col_ok[None, :]
    offs = b * T * d + rows[:, None] * d + cols[None, :]

    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean, rstd1, rstd_g = _row_statistics(mean_ptr, rstd1_ptr, rstdg_ptr, b, rows, row_ok, T)
    xc = tl.where(mask, x - mean[:, None], 0.0)
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
        dgj = tl.load(dg_rows + j * d + cols, mask=col_ok, other=0.0).to(tl.float32)
        m = tl.load(mix_j + tile_offs, mask=mix_mask, other=0.0)
        dxg += m * dgj[None, :]
        mix_j += N * d

    # LayerNorm backward of each term: rstd * (dy - mean_c(dy) - xhat * mean_c(dy * xhat)).
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy1 = dh * w1[None, :]
    dyg = dxg * wg[None, :]
    c1 = tl.sum(dy1, axis=1) / d
    c2 = tl.sum(dy1 * xhat1, axis=1) / d
    cg1 = tl.sum(dyg, axis=1) / d
    cg2 = tl.sum(dyg * xhatg, axis=1) / d
    dx = rstd1[:, None] * (dy1 - c1[:, None] - xhat1 * c2[:, None])
    dx += rstd_g[:, None] * (dyg - cg1[:, None] - xhatg * cg2[:, None])
    if ROUND_BF16:
        dx = round_to_bfloat16(dx)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)

    dw1 += tl.sum(dh * xhat1, axis=0)
    db1 += tl.sum(dh, axis=0)
    # Prefix rows have dxg = 0 but their own xhat_g, possibly NaN: left out, as from the forward.
    dwg += tl.sum(tl.where(n_ok[:, None], dxg * xhatg, 0.0), axis=0)
    dbg += tl.sum(dxg, axis=0)
    return dw1, db1, dwg, dbg


@_jit
def _norm_and_project_dmix_kernel(
    dg_ptr,  # (B, Np, d) gradient of g, contiguous
    x_ptr,  # (B, T, d) block input, contiguous
    wg_ptr,  # (d,) prompt LayerNorm weight, (K, d) with HAS_TASK (read only when HAS_WG)
    bg_ptr,  # (d,) prompt LayerNorm bias, (K, d) with HAS_TASK (read only when HAS_BG)
    order_ptr,  # (B,) int64 images sorted by task, stably (read only when HAS_TASK)
    starts_ptr,  # (K + 1,) int64: task t's images are order[starts[t]:starts[t + 1]] (read only when HAS_TASK)
    mean_ptr,  # (B, T) row means, float32
    rstdg_ptr,  # (B, T) 1 / sqrt(var + eps_g), float32
    dmix_ptr,  # (Np, N, d) output gradient of the per-channel mix, (K, Np, N, d) with HAS_TASK, float32
    B,  # images
    T,  # tokens per image
    N,  # patch tokens per image (mix columns)
    d,  # channels
    Np,  # prompts (mix rows)
    num_prefix,  # prefix tokens P (patch n is row P + n)
    HAS_WG: tl.constexpr,
    HAS_BG: tl.constexpr,
    HAS_TASK: tl.constexpr,  # per-task affines and dmix: grid axis 0 is (task, channel block)
    BLOCK_C: tl.constexpr,  # channels per program
    BLOCK_N: tl.constexpr,  # patches per program
    BLOCK_J: tl.constexpr,  # prompts per program
):
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
    dg_mask = j_ok[:, None] & col_ok[None, :]
    dg_offs = js[:, None] * d + cols[None, :]
    wg = _channel_vector(wg_ptr, cols, d, HAS_WG, 1.0)
    bg = _channel_vector(bg_ptr, cols, d, HAS_BG, 0.0)

    # dmix[j, n, c] = sum_b dg[b, j, c] * LN_g(x)[b, n, c] over the images (of task t), accumulated
    # in a fixed order in float32 registers: batch order, or task t's images in the stable order.
    acc = tl.zeros((BLOCK_J, BLOCK_N, BLOCK_C), dtype=tl.float32)
    if HAS_TASK:
        for i in range(tl.load(starts_ptr + t), tl.load(starts_ptr + t + 1)):
            b = tl.load(order_ptr + i)
            xg = _patch_rows_lng(x_ptr + b * T * d, mean_ptr + b * T, rstdg_ptr + b * T, wg, bg, ns, cols, N, d,
                                 num_prefix)  # fmt: skip
            dgc = tl.load(dg_ptr + b * Np * d + dg_offs, mask=dg_mask, other=0.0).to(tl.float32)
            acc += dgc[:, None, :] * xg[None, :, :]
    else:
        # Image pointers are advanced by increments: b * T * d may exceed int32.
        x_b = x_ptr
        dg_b = dg_ptr
        mean_b = mean_ptr
        rstdg_b = rstdg_ptr
        for _ in range(0, B):
            xg = _patch_rows_lng(x_b, mean_b, rstdg_b, wg, bg, ns, cols, N, d, num_prefix)
            dgc = tl.load(dg_b + dg_offs, mask=dg_mask, other=0.0).to(tl.float32)
            acc += dgc[:, None, :] * xg[None, :, :]
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
    src_ptr,  # (B, R, C) per-image partial sums, float32, contiguous
    order_ptr,  # (B,) int64 images sorted by task, stably
    starts_ptr,  # (K + 1,) int64: task t's images are order[starts[t]:starts[t + 1]]
    out_ptr,  # (K, C) output: out[t] = sum over task t's images b and r < R of src[b, r], float32
    R,  # partial rows per image
    C,  # columns
    BLOCK_C: tl.constexpr,  # columns per program
):
    """Per-task sums of per-image partials, each task's images in the stable order and each image's
    rows in turn: deterministic, where ``index_add_`` on CUDA adds with atomics. A task without
    images gets zeros."""
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


# Largest tile of whole rows (BLOCK_T * BLOCK_D float32 elements) a LayerNorm program keeps per
# register tensor: 16 registers a thread at 8 warps, so the handful of live tiles fit without spills.
_ROW_TILE = 4096


def launch_config(kernel: str, T: int, N: int, d: int, Np: int) -> dict:
    """Block sizes, warps and pipeline stages of one kernel of this file, as keyword arguments of its
    launch: the one place they are chosen (the launchers and the offline compilation gate call it).

    Whole-row kernels (``fwd``, ``bwd_per_channel``) shrink their rows per program as ``d`` grows so
    a tile stays within ``_ROW_TILE`` elements, and add warps past it (``d > 4096``). The others tile
    the channels and keep ``tl.dot`` operands at least 16 wide (its minimum); their float32
    accumulators hold at most 4096 elements.

    Args:
        kernel: ``fwd``, ``g_shared``, ``g``, ``dmix_shared``, ``bwd_shared``, ``bwd_per_channel``,
            ``dmix`` or ``task_sum`` (the kernel ``_norm_and_project_<kernel>_kernel``).
        T, N, d, Np: tokens, patches, channels and prompts.
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


def _device_guard(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``x``'s GPU current for the launch (Triton launches on the current device)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _task_sums(src: torch.Tensor, R: int, C: int, order: torch.Tensor, starts: torch.Tensor, K: int) -> torch.Tensor:
    """``(K, C)`` per-task sums of float32 per-image partials, ``src`` holding ``(B, R, C)`` elements
    contiguously, over each task's images (``order``, ``starts``: see
    :func:`norm_and_project_backward`) and their ``R`` rows."""
    out = torch.empty(K, C, device=src.device, dtype=torch.float32)
    cfg = launch_config("task_sum", 0, 0, C, 0)
    _norm_and_project_task_sum_kernel[(K, triton.cdiv(C, cfg["BLOCK_C"]))](src, order, starts, out, R, C, **cfg)
    return out


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
    ``gen_bias[task[b]]``, reached by pointer offsets in the kernel.

    Args:
        x: block input ``(B, T, d)``, contiguous, float32/float16/bfloat16.
        norm1_weight: ``(d,)`` in x's dtype, or None for ones.
        norm1_bias: ``(d,)`` in x's dtype, or None for zeros.
        eps1: norm1 epsilon.
        gen_weight: ``(d,)`` prompt LayerNorm weight in x's dtype, ``(K, d)`` with ``task``, or None
            for ones.
        gen_bias: ``(d,)`` prompt LayerNorm bias in x's dtype, ``(K, d)`` with ``task``, or None for
            zeros.
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
    with _device_guard(x):
        cfg = launch_config("fwd", T, N, d, Np)
        _norm_and_project_fwd_kernel[(triton.cdiv(T, cfg["BLOCK_T"]), B)](
            x, norm1_weight if norm1_weight is not None else x, norm1_bias if norm1_bias is not None else x,
            h, mean, rstd1, rstd_g, T, d, eps1, eps_g,
            HAS_W1=norm1_weight is not None, HAS_B1=norm1_bias is not None, ROUND_BF16=_round_bf16(x.dtype), **cfg,
        )  # fmt: skip
        kernel = _norm_and_project_g_kernel if per_channel else _norm_and_project_g_shared_kernel
        cfg = launch_config("g" if per_channel else "g_shared", T, N, d, Np)
        kernel[(B, triton.cdiv(Np, cfg["BLOCK_J"]), triton.cdiv(d, cfg["BLOCK_C"]))](
            x, gen_weight if gen_weight is not None else x, gen_bias if gen_bias is not None else x,
            mix, task if task is not None else x, mean, rstd_g, g, T, N, d, Np, num_prefix,
            HAS_WG=gen_weight is not None, HAS_BG=gen_bias is not None, HAS_TASK=task is not None,
            ROUND_BF16=_round_bf16(x.dtype), **cfg,
        )  # fmt: skip
    return h, g, mean, rstd1, rstd_g


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
    gradients, and a mix-gradient kernel (for a shared mix it runs first: its per-image sums also
    give the ``dx`` kernel its ``LN_g`` row sums). Buffers besides the outputs: weight partials
    ``(B * tiles, d)`` over 32 rows or more each and, for a shared mix, the ``(B, Np, N)``
    per-image mix partials.

    With ``task``, the images are grouped by task once (a stable sort: ``order[starts[t]:
    starts[t + 1]]`` are task ``t``'s images in batch order) and every per-task gradient is summed
    over its task's images in that order, never with atomics: the per-channel mix kernel gets a
    task axis, and the per-image partials of the shared mix and of the prompt LayerNorm's weight
    and bias are summed per task by ``_norm_and_project_task_sum_kernel``. Without ``task`` none of
    this runs: no sort, no extra buffer or launch.

    Args:
        dh: ``(B, T, d)`` gradient of ``h``, contiguous, x's dtype.
        dg: ``(B, Np, d)`` gradient of ``g``, contiguous, x's dtype.
        x: the forward's block input ``(B, T, d)``.
        norm1_weight: ``(d,)`` or None (ones).
        gen_weight: ``(d,)``, ``(K, d)`` with ``task``, or None (ones).
        gen_bias: ``(d,)``, ``(K, d)`` with ``task``, or None (zeros); needed for ``dmix``.
        mix: ``(Np, N)`` or ``(Np, N, d)``, float32, contiguous; ``(K, Np, N)`` or ``(K, Np, N, d)``
            with ``task``.
        mean: ``(B, T)`` float32 row means from the forward.
        rstd1: ``(B, T)`` float32 ``1/sqrt(var + eps1)`` from the forward.
        rstd_g: ``(B, T)`` float32 ``1/sqrt(var + eps_g)`` from the forward.
        num_prefix: prefix tokens ``P``.
        task: ``(B,)`` int64 task of each image, values in ``[0, K)``, contiguous, or None (one task).

    Returns:
        ``dx (B, T, d)`` in x's dtype; float32 ``dnorm1_weight``, ``dnorm1_bias`` (each ``(d,)``),
        ``dgen_weight``, ``dgen_bias`` (each ``(d,)``, ``(K, d)`` with ``task``; computed even for
        None weights) and ``dmix`` (mix's shape; a task without images gets zeros).
    """
    B, T, d = x.shape
    has_task = task is not None
    lead = int(has_task)
    Np, N = mix.shape[lead : lead + 2]
    per_channel = mix.dim() == 3 + lead
    stats = dict(device=x.device, dtype=torch.float32)
    cfg = launch_config("bwd_per_channel" if per_channel else "bwd_shared", T, N, d, Np)
    # Row chunks of one program (the weight partials' rows per image).
    tiles = triton.cdiv(T, cfg["BLOCK_T"] * cfg.get("TILES", 1))
    dx = torch.empty_like(x)
    weight_partials = [torch.empty(B * tiles, d, **stats) for _ in range(4)]
    w1 = norm1_weight if norm1_weight is not None else x
    wg = gen_weight if gen_weight is not None else x
    bg = gen_bias if gen_bias is not None else x
    flags = dict(HAS_WG=gen_weight is not None, HAS_TASK=has_task)
    if has_task:
        K = mix.shape[0]
        # Each task's first place in the sorted tasks by searchsorted, not bincount, whose CUDA
        # version waits for the GPU to size its output.
        order = torch.argsort(task, stable=True)
        starts = torch.searchsorted(task[order], torch.arange(K + 1, device=x.device))
    else:
        # Placeholders for the kernels' task arguments, unread without HAS_TASK.
        order = starts = task = x
    with _device_guard(x):
        if per_channel:
            if x.numel() > 0:
                _norm_and_project_bwd_per_channel_kernel[(tiles, B)](
                    dh, dg, x, w1, wg, mix, task, mean, rstd1, rstd_g, dx, *weight_partials, T, N, d, Np, num_prefix,
                    HAS_W1=norm1_weight is not None, ROUND_BF16=_round_bf16(x.dtype), **flags, **cfg,
                )  # fmt: skip
            # Also run for B == 0, where it writes zeros.
            dmix = torch.empty(mix.shape, **stats)
            mcfg = launch_config("dmix", T, N, d, Np)
            # Tasks on axis 0, whose size limit is 2**31 - 1 (65535 on the others).
            c_blocks = triton.cdiv(d, mcfg["BLOCK_C"])
            grid = (c_blocks * (K if has_task else 1), triton.cdiv(N, mcfg["BLOCK_N"]),
                    triton.cdiv(Np, mcfg["BLOCK_J"]))  # fmt: skip
            _norm_and_project_dmix_kernel[grid](
                dg, x, wg, bg, order, starts, mean, rstd_g, dmix, B, T, N, d, Np, num_prefix,
                HAS_BG=gen_bias is not None, **flags, **mcfg,
            )  # fmt: skip
        else:
            # a (B, Np, N) and u, v (B, Np): see the module docstring.
            a = torch.empty(B, Np, N, **stats)
            u = torch.empty(B, Np, **stats)
            v = torch.empty(B, Np, **stats)
            if x.numel() > 0:
                mcfg = launch_config("dmix_shared", T, N, d, Np)
                grid = (B, triton.cdiv(N, mcfg["BLOCK_N"]), triton.cdiv(Np, mcfg["BLOCK_J"]))
                _norm_and_project_dmix_shared_kernel[grid](
                    dg, x, wg, bg, task, mean, rstd_g, a, u, v, T, N, d, Np, num_prefix,
                    HAS_BG=gen_bias is not None, **flags, **mcfg,
                )  # fmt: skip
                _norm_and_project_bwd_shared_kernel[(tiles, B)](
                    dh, dg, x, w1, wg, mix, task, a, u, mean, rstd1, rstd_g, dx, *weight_partials,
                    T, N, d, Np, num_prefix,
                    HAS_W1=norm1_weight is not None, ROUND_BF16=_round_bf16(x.dtype), **flags, **cfg,
                )  # fmt: skip
            if has_task:
                dmix = _task_sums(a, 1, Np * N, order, starts, K).view(K, Np, N)
                dmix += _task_sums(v, 1, Np, order, starts, K)[:, :, None]
            else:
                dmix = a.sum(0) + v.sum(0)[:, None]
        dnorm1_weight, dnorm1_bias = (p.sum(0) for p in weight_partials[:2])
        if has_task:
            dgen_weight, dgen_bias = (_task_sums(p, tiles, d, order, starts, K) for p in weight_partials[2:])
        else:
            dgen_weight, dgen_bias = (p.sum(0) for p in weight_partials[2:])
    return dx, dnorm1_weight, dnorm1_bias, dgen_weight, dgen_bias, dmix
