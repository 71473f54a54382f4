"""Triton kernels of ``norm_and_project``: the block's LayerNorm and the folded prompt projection
from one read of the block input (DESIGN §2.3).

Shapes: ``B`` batch, ``T = P + N`` tokens (``P = num_prefix`` prefix tokens, ``N`` patches), ``d``
channels, ``Np`` prompts. ``mix`` is the folded ``(Np, N)`` matrix ("shared") or its per-channel
form ``(Np, N, d)``.

Forward, per program one tile of ``BLOCK_T`` rows of one image (grid ``(tiles, B)``): load the
rows once, compute their mean and variance once, write ``h = LN_1(x)`` and the row statistics.
With a shared mix the same program normalises again with the prompt LayerNorm (``xg = LN_g(x)``:
same statistics, its own eps and affine) and projects the tile's patch rows,
``mix[:, tile] @ xg[tile]``, into a ``(B, tiles, Np, d)`` float32 buffer of partial ``g`` that is
summed over the tiles afterwards. Per channel the tiles are sized for the LayerNorm alone and hold
a few rows, so such partials would be many times ``g`` (491 MB at ViT-B: B = 128, Np = 50, 8-row
tiles). There the first kernel only normalises, and a second one, launched after it on the same
stream, computes ``g[b, j, c] = sum_n mix[j, n, c] * LN_g(x)[b, P + n, c]`` directly: each
program owns an image, a block of prompts and a block of channels (grid
``(B, Np / BLOCK_J, d / BLOCK_C)``, images fastest so the programs that read one mix block run
together and share it through L2), rebuilds ``LN_g(x)`` from ``x`` and the statistics just
written, and accumulates over the patches in float32 registers. Each program owns its slice of
every output and partial buffer, so there are no atomics and the result does not depend on
scheduling.

Backward, same grid: recompute ``xhat`` from ``x`` and the saved statistics, form
``dxg = mix[:, tile]^T dg`` (the gradient reaching ``LN_g``'s output), add the two LayerNorm
backward terms into ``dx``, and write per-program partial sums of the four weight/bias gradients
(``(B * tiles, d)``), summed afterwards. A shared mix's gradient comes from the same pass, as
per-image partials ``(B, Np, N)`` of the tile's columns summed afterwards. Per channel those
partials would be ``(B, Np, N, d)`` (3.8 GB at ViT-B, B = 128, Np = 50), so a second kernel computes
``dmix[j, n, c] = sum_b dg[b, j, c] * LN_g(x)[b, P + n, c]`` directly: each program owns a block
of prompts, patches and channels (grid ``(d / BLOCK_C, N / BLOCK_N, Np / BLOCK_J)``), rebuilds
``LN_g(x)`` from ``x`` and the saved statistics, and accumulates over the images in float32
registers.

All arithmetic is float32 whatever the input dtype; every load is cast to float32 right away
(Triton's CPU interpreter mishandles bfloat16 arithmetic). The matrix products run on
``tl.dot`` with float32 operands and accumulation: in IEEE float32 for float32 inputs, in TF32 for
16-bit inputs (its rounding is finer than the inputs' own, and than the composite PyTorch path,
which rounds ``mix`` and ``LN_g(x)`` to the input dtype). The interpreter converts float32 to
bfloat16 by truncation (up to 2**-7 relative error; the GPU rounds to nearest), so there the
bfloat16 stores of ``h``, ``dx`` and the per-channel ``g`` are rounded first (``ROUND_BF16``).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .prefix_attention import INTERPRETED, round_to_bfloat16

# Largest BLOCK_T * BLOCK_D (and BLOCK_J * BLOCK_D) tile a program keeps in registers.
_TILE_ELEMENTS = 8192


@triton.jit
def _norm_and_project_fwd_kernel(
    x_ptr,  # (B, T, d) block input, contiguous
    w1_ptr,  # (d,) norm1 weight (read only when HAS_W1)
    b1_ptr,  # (d,) norm1 bias (read only when HAS_B1)
    wg_ptr,  # (d,) prompt LayerNorm weight (read only when HAS_WG and not PER_CHANNEL)
    bg_ptr,  # (d,) prompt LayerNorm bias (read only when HAS_BG and not PER_CHANNEL)
    mix_ptr,  # (Np, N) shared mix, float32, contiguous (not read when PER_CHANNEL)
    h_ptr,  # (B, T, d) output LN_1(x), x's dtype
    mean_ptr,  # (B, T) output row means, float32
    rstd1_ptr,  # (B, T) output 1 / sqrt(var + eps1), float32
    rstdg_ptr,  # (B, T) output 1 / sqrt(var + eps_g), float32
    gpart_ptr,  # (B, tiles, Np, d) output partial g of each row tile, float32 (not PER_CHANNEL)
    T,  # tokens per image
    N,  # patch tokens per image (mix columns)
    d,  # channels
    Np,  # prompts (mix rows)
    num_prefix,  # prefix tokens P (rows t < P have no mix column)
    eps1,  # norm1 epsilon
    eps_g,  # prompt LayerNorm epsilon
    HAS_W1: tl.constexpr,
    HAS_B1: tl.constexpr,
    HAS_WG: tl.constexpr,
    HAS_BG: tl.constexpr,
    PER_CHANNEL: tl.constexpr,  # mix is (Np, N, d): h and statistics only, g from the g kernel
    DOT_PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" for float32 x, "tf32" otherwise
    ROUND_BF16: tl.constexpr,  # interpreter with bfloat16 x: round stores to nearest (its conversion truncates)
    BLOCK_T: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # next power of two >= d
    BLOCK_J: tl.constexpr,  # prompts per step of the projection loop (shared mix)
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
    # Zero the padding columns so they drop out of the variance and of every later sum.
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / d
    rstd1 = tl.rsqrt(var + eps1)
    rstd_g = tl.rsqrt(var + eps_g)
    stat_offs = b * T + rows
    tl.store(mean_ptr + stat_offs, mean, mask=row_ok)
    tl.store(rstd1_ptr + stat_offs, rstd1, mask=row_ok)
    tl.store(rstdg_ptr + stat_offs, rstd_g, mask=row_ok)

    h = xc * rstd1[:, None]
    if HAS_W1:
        h = h * tl.load(w1_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_B1:
        h = h + tl.load(b1_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if ROUND_BF16:
        h = round_to_bfloat16(h)
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)

    if not PER_CHANNEL:
        xg = xc * rstd_g[:, None]
        if HAS_WG:
            xg = xg * tl.load(wg_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_BG:
            xg = xg + tl.load(bg_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        # Mix column of each row; prefix and padding rows load zero mix entries, and their xg rows
        # are zeroed: a zero mix entry times a NaN in a prefix row would still be NaN.
        n = rows - num_prefix
        n_ok = row_ok & (n >= 0)
        n = tl.where(n_ok, n, 0)
        xg = tl.where(n_ok[:, None], xg, 0.0)
        gpart_base = (b * tl.num_programs(0) + tile) * Np * d
        for j0 in range(0, Np, BLOCK_J):
            js = j0 + tl.arange(0, BLOCK_J)
            j_ok = js < Np
            m = tl.load(mix_ptr + js[:, None] * N + n[None, :], mask=j_ok[:, None] & n_ok[None, :], other=0.0)
            g = tl.dot(m, xg, input_precision=DOT_PRECISION)
            g_offs = gpart_base + js[:, None] * d + cols[None, :]
            tl.store(gpart_ptr + g_offs, g, mask=j_ok[:, None] & col_ok[None, :])


@triton.jit
def _norm_and_project_g_kernel(
    x_ptr,  # (B, T, d) block input, contiguous
    wg_ptr,  # (d,) prompt LayerNorm weight (read only when HAS_WG)
    bg_ptr,  # (d,) prompt LayerNorm bias (read only when HAS_BG)
    mix_ptr,  # (Np, N, d) per-channel mix, float32, contiguous
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
    ROUND_BF16: tl.constexpr,  # interpreter with bfloat16 x: round stores to nearest (its conversion truncates)
    BLOCK_C: tl.constexpr,  # channels per program
    BLOCK_N: tl.constexpr,  # patches per step of the loop over the patches
    BLOCK_J: tl.constexpr,  # prompts per program
):
    # int64: b * T * d overflows int32 for large batches.
    b = tl.program_id(0).to(tl.int64)
    js = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    j_ok = js < Np
    col_ok = cols < d
    if HAS_WG:
        wg = tl.load(wg_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_BG:
        bg = tl.load(bg_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    x_b = x_ptr + b * T * d
    stat_b = b * T
    # int64: j * N * d may exceed int32.
    mix_jc = mix_ptr + js.to(tl.int64)[:, None, None] * N * d + cols[None, None, :]

    # g[b, j, c] = sum_n mix[j, n, c] * xg[n, c], accumulated over the patches in a fixed order in
    # float32 registers and reduced over the patch axis once at the end.
    acc = tl.zeros((BLOCK_J, BLOCK_N, BLOCK_C), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        n_ok = ns < N
        x_mask = n_ok[:, None] & col_ok[None, :]
        rows = num_prefix + ns
        x = tl.load(x_b + rows[:, None] * d + cols[None, :], mask=x_mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + stat_b + rows, mask=n_ok, other=0.0)
        rstd_g = tl.load(rstdg_ptr + stat_b + rows, mask=n_ok, other=0.0)
        xg = (x - mean[:, None]) * rstd_g[:, None]
        if HAS_WG:
            xg = xg * wg[None, :]
        if HAS_BG:
            xg = xg + bg[None, :]
        # Padding patches and channels load zero mix entries, so contribute nothing.
        m = tl.load(mix_jc + (ns * d)[None, :, None], mask=j_ok[:, None, None] & x_mask[None, :, :], other=0.0)
        acc += m * xg[None, :, :]

    g = tl.sum(acc, axis=1)
    if ROUND_BF16:
        g = round_to_bfloat16(g)
    g_offs = b * Np * d + js[:, None] * d + cols[None, :]
    tl.store(g_ptr + g_offs, g.to(g_ptr.dtype.element_ty), mask=j_ok[:, None] & col_ok[None, :])


@triton.jit
def _norm_and_project_bwd_kernel(
    dh_ptr,  # (B, T, d) gradient of h, contiguous
    dg_ptr,  # (B, Np, d) gradient of g, contiguous
    x_ptr,  # (B, T, d) block input, contiguous
    w1_ptr,  # (d,) norm1 weight (read only when HAS_W1)
    wg_ptr,  # (d,) prompt LayerNorm weight (read only when HAS_WG)
    bg_ptr,  # (d,) prompt LayerNorm bias (read only when HAS_BG and not PER_CHANNEL)
    mix_ptr,  # (Np, N) shared or (Np, N, d) per-channel, float32, contiguous
    mean_ptr,  # (B, T) row means, float32
    rstd1_ptr,  # (B, T) 1 / sqrt(var + eps1), float32
    rstdg_ptr,  # (B, T) 1 / sqrt(var + eps_g), float32
    dx_ptr,  # (B, T, d) output gradient of x, x's dtype
    dw1_ptr,  # (B * tiles, d) output partial gradient of norm1 weight, float32
    db1_ptr,  # (B * tiles, d) output partial gradient of norm1 bias, float32
    dwg_ptr,  # (B * tiles, d) output partial gradient of the prompt LayerNorm weight, float32
    dbg_ptr,  # (B * tiles, d) output partial gradient of the prompt LayerNorm bias, float32
    dmix_ptr,  # (B, Np, N) output per-image partial gradient of a shared mix, float32 (not PER_CHANNEL)
    T,  # tokens per image
    N,  # patch tokens per image (mix columns)
    d,  # channels
    Np,  # prompts (mix rows)
    num_prefix,  # prefix tokens P (rows t < P have no mix column)
    HAS_W1: tl.constexpr,
    HAS_WG: tl.constexpr,
    HAS_BG: tl.constexpr,
    PER_CHANNEL: tl.constexpr,  # mix is (Np, N, d) instead of (Np, N)
    DOT_PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" for float32 x, "tf32" otherwise
    ROUND_BF16: tl.constexpr,  # interpreter with bfloat16 x: round stores to nearest (its conversion truncates)
    BLOCK_T: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # next power of two >= d
    BLOCK_J: tl.constexpr,  # prompts per step of the projection loop (shared mix)
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
    stat_offs = b * T + rows
    mean = tl.load(mean_ptr + stat_offs, mask=row_ok, other=0.0)
    # Padding rows get rstd 0, hence xhat 0 and no share in the weight gradients.
    rstd1 = tl.load(rstd1_ptr + stat_offs, mask=row_ok, other=0.0)
    rstd_g = tl.load(rstdg_ptr + stat_offs, mask=row_ok, other=0.0)
    xc = tl.where(mask, x - mean[:, None], 0.0)
    xhat1 = xc * rstd1[:, None]
    xhatg = xc * rstd_g[:, None]
    if HAS_WG:
        wg = tl.load(wg_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)

    # dxg[t] = sum_j mix[j, t - P] dg[j].
    n = rows - num_prefix
    n_ok = row_ok & (n >= 0)
    n = tl.where(n_ok, n, 0)
    dg_rows = dg_ptr + b * Np * d
    dxg = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    if PER_CHANNEL:
        mix_mask = n_ok[:, None] & col_ok[None, :]
        tile_offs = n[:, None] * d + cols[None, :]
        # Advanced by pointer increments: the offset j * N * d may exceed int32.
        mix_j = mix_ptr
        for j in range(0, Np):
            dgj = tl.load(dg_rows + j * d + cols, mask=col_ok, other=0.0).to(tl.float32)
            m = tl.load(mix_j + tile_offs, mask=mix_mask, other=0.0)
            dxg += m * dgj[None, :]
            mix_j += N * d
    else:
        # The mix-gradient of this tile's columns comes from the same dg rows:
        # dmix[j, n] = dg[j] . xg[n]. Two loops over the prompts, one product each: with both
        # products in one loop the compiler keeps dg in two register layouts and spills heavily
        # at d >= 512 (ptxas, sm_90).
        for j0 in range(0, Np, BLOCK_J):
            js = j0 + tl.arange(0, BLOCK_J)
            j_ok = js < Np
            dgc = tl.load(dg_rows + js[:, None] * d + cols[None, :], mask=j_ok[:, None] & col_ok[None, :], other=0.0)
            # mix[js, n] loaded transposed, (BLOCK_T, BLOCK_J).
            mix_t_mask = n_ok[:, None] & j_ok[None, :]
            m_t = tl.load(mix_ptr + js[None, :] * N + n[:, None], mask=mix_t_mask, other=0.0)
            dxg += tl.dot(m_t, dgc.to(tl.float32), input_precision=DOT_PRECISION)
        if HAS_WG:
            xg = xhatg * wg[None, :]
        else:
            xg = xhatg
        if HAS_BG:
            xg = xg + tl.load(bg_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        xg_t = tl.trans(xg)
        for j0 in range(0, Np, BLOCK_J):
            js = j0 + tl.arange(0, BLOCK_J)
            j_ok = js < Np
            dgc = tl.load(dg_rows + js[:, None] * d + cols[None, :], mask=j_ok[:, None] & col_ok[None, :], other=0.0)
            dm = tl.dot(dgc.to(tl.float32), xg_t, input_precision=DOT_PRECISION)
            dm_offs = b * Np * N + js[:, None] * N + n[None, :]
            tl.store(dmix_ptr + dm_offs, dm, mask=j_ok[:, None] & n_ok[None, :])

    # LayerNorm backward of each term: rstd * (dy - mean_c(dy) - xhat * mean_c(dy * xhat)).
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_W1:
        dy1 = dh * tl.load(w1_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    else:
        dy1 = dh
    if HAS_WG:
        dyg = dxg * wg[None, :]
    else:
        dyg = dxg
    c1 = tl.sum(dy1, axis=1) / d
    c2 = tl.sum(dy1 * xhat1, axis=1) / d
    cg1 = tl.sum(dyg, axis=1) / d
    cg2 = tl.sum(dyg * xhatg, axis=1) / d
    dx = rstd1[:, None] * (dy1 - c1[:, None] - xhat1 * c2[:, None])
    dx += rstd_g[:, None] * (dyg - cg1[:, None] - xhatg * cg2[:, None])
    if ROUND_BF16:
        dx = round_to_bfloat16(dx)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)

    part_offs = (b * tl.num_programs(0) + tile) * d + cols
    tl.store(dw1_ptr + part_offs, tl.sum(dh * xhat1, axis=0), mask=col_ok)
    tl.store(db1_ptr + part_offs, tl.sum(dh, axis=0), mask=col_ok)
    # Prefix rows have dxg = 0 but their own xhatg, possibly NaN: left out, as from the forward.
    tl.store(dwg_ptr + part_offs, tl.sum(tl.where(n_ok[:, None], dxg * xhatg, 0.0), axis=0), mask=col_ok)
    tl.store(dbg_ptr + part_offs, tl.sum(dxg, axis=0), mask=col_ok)


@triton.jit
def _norm_and_project_dmix_kernel(
    dg_ptr,  # (B, Np, d) gradient of g, contiguous
    x_ptr,  # (B, T, d) block input, contiguous
    wg_ptr,  # (d,) prompt LayerNorm weight (read only when HAS_WG)
    bg_ptr,  # (d,) prompt LayerNorm bias (read only when HAS_BG)
    mean_ptr,  # (B, T) row means, float32
    rstdg_ptr,  # (B, T) 1 / sqrt(var + eps_g), float32
    dmix_ptr,  # (Np, N, d) output gradient of the per-channel mix, float32
    B,  # images
    T,  # tokens per image
    N,  # patch tokens per image (mix columns)
    d,  # channels
    Np,  # prompts (mix rows)
    num_prefix,  # prefix tokens P (patch n is row P + n)
    HAS_WG: tl.constexpr,
    HAS_BG: tl.constexpr,
    BLOCK_C: tl.constexpr,  # channels per program
    BLOCK_N: tl.constexpr,  # patches per program
    BLOCK_J: tl.constexpr,  # prompts per program
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    js = tl.program_id(2) * BLOCK_J + tl.arange(0, BLOCK_J)
    col_ok = cols < d
    n_ok = ns < N
    j_ok = js < Np
    x_mask = n_ok[:, None] & col_ok[None, :]
    dg_mask = j_ok[:, None] & col_ok[None, :]
    rows = num_prefix + ns
    x_offs = rows[:, None] * d + cols[None, :]
    dg_offs = js[:, None] * d + cols[None, :]
    if HAS_WG:
        wg = tl.load(wg_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_BG:
        bg = tl.load(bg_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)

    # dmix[j, n, c] = sum_b dg[b, j, c] * xg[b, n, c], accumulated over the images in a fixed
    # order in float32 registers. Image pointers are advanced by increments: b * T * d may
    # exceed int32.
    acc = tl.zeros((BLOCK_J, BLOCK_N, BLOCK_C), dtype=tl.float32)
    x_b = x_ptr
    dg_b = dg_ptr
    mean_b = mean_ptr
    rstdg_b = rstdg_ptr
    for _ in range(0, B):
        x = tl.load(x_b + x_offs, mask=x_mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_b + rows, mask=n_ok, other=0.0)
        rstd_g = tl.load(rstdg_b + rows, mask=n_ok, other=0.0)
        xg = (x - mean[:, None]) * rstd_g[:, None]
        if HAS_WG:
            xg = xg * wg[None, :]
        if HAS_BG:
            xg = xg + bg[None, :]
        dgc = tl.load(dg_b + dg_offs, mask=dg_mask, other=0.0).to(tl.float32)
        acc += dgc[:, None, :] * xg[None, :, :]
        x_b += T * d
        dg_b += Np * d
        mean_b += T
        rstdg_b += T

    # int64: j * N * d may exceed int32.
    out_offs = js.to(tl.int64)[:, None, None] * N * d + (ns[:, None] * d + cols[None, :])[None, :, :]
    tl.store(dmix_ptr + out_offs, acc, mask=j_ok[:, None, None] & x_mask[None, :, :])


class _Config(NamedTuple):
    """Launch configuration shared by the forward and backward kernels."""

    block_t: int
    block_d: int
    block_j: int
    num_warps: int


def _config(T: int, d: int, Np: int, per_channel: bool, backward: bool) -> _Config:
    """Block sizes and warps of the forward or backward kernel for ``T`` rows of ``d`` channels and
    ``Np`` prompts.

    Rows per tile shrink as ``d`` grows so a tile stays near ``_TILE_ELEMENTS``, to avoid register
    spills (ptxas, sm_90). The shared layout's products need every ``tl.dot`` operand dimension to
    be at least 16, so its tiles have 16 rows or more. Per channel the forward kernel only
    normalises, so its tile is sized for the LayerNorm alone; the backward's loop body also holds a
    whole mix tile, so its tile is half as large.
    """
    block_d = max(16, triton.next_power_of_2(d))
    rows = triton.next_power_of_2(T)
    if not per_channel:
        block_t = max(16, min(rows, _TILE_ELEMENTS // block_d))
    elif backward:
        block_t = max(1, min(rows, _TILE_ELEMENTS // 2 // block_d))
    else:
        block_t = max(1, min(rows, _TILE_ELEMENTS // block_d))
    block_j = max(16, min(triton.next_power_of_2(Np), _TILE_ELEMENTS // block_d))
    tile = block_t * block_d
    num_warps = 4 if tile <= 2048 else 8 if tile <= 8192 else 16
    return _Config(block_t, block_d, block_j, num_warps)


class _PerChannelConfig(NamedTuple):
    """Launch configuration of the per-channel ``g`` and ``dmix`` kernels."""

    block_c: int
    block_n: int
    block_j: int
    num_warps: int


def _per_channel_config(N: int, d: int, Np: int) -> _PerChannelConfig:
    """Block sizes of the per-channel ``g`` and ``dmix`` kernels for ``N`` patches, ``d`` channels
    and ``Np`` prompts.

    A program accumulates a ``BLOCK_J x BLOCK_N x BLOCK_C`` float32 tile (at most 4096 elements,
    32 registers a thread at 4 warps); the ``g`` kernel loads a mix tile of the same size per
    step. Every prompt block re-reads the ``x`` tile and, in ``dmix``, every patch block the ``dg``
    tile, so ``BLOCK_J * BLOCK_N`` is fixed at 64 and split evenly (8 x 8) unless ``Np`` is small;
    64 channels give coalesced rows of ``x``, ``dg`` and ``mix``.
    """
    block_c = min(64, max(16, triton.next_power_of_2(d)))
    block_j = min(8, triton.next_power_of_2(Np))
    # At least 1: the g kernel also runs without patches (N == 0), to write zeros.
    block_n = min(64 // block_j, max(1, triton.next_power_of_2(N)))
    return _PerChannelConfig(block_c, block_n, block_j, 4)


def _dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision: full float32 for float32 inputs; TF32 (a finer rounding than the
    inputs' own 16-bit one) otherwise. Operands stay float32 in both cases: the interpreter
    miscomputes ``tl.dot`` on bfloat16 operands."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _round_bf16(dtype: torch.dtype) -> bool:
    """Whether stores in ``dtype`` must be rounded by hand: bfloat16 under the interpreter."""
    return INTERPRETED and dtype == torch.bfloat16


def _device_guard(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``x``'s GPU current for the launch (Triton launches on the current device)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``h = LN_1(x)`` and ``g = mix @ LN_g(x[:, num_prefix:])`` from one read of ``x``, and for a
    per-channel ``mix`` a second kernel that reads the patch rows again to project them (no buffer
    larger than ``g``).

    Args:
        x: block input ``(B, T, d)``, contiguous, float32/float16/bfloat16.
        norm1_weight: ``(d,)`` in x's dtype, or None for ones.
        norm1_bias: ``(d,)`` in x's dtype, or None for zeros.
        eps1: norm1 epsilon.
        gen_weight: ``(d,)`` prompt LayerNorm weight in x's dtype, or None for ones.
        gen_bias: ``(d,)`` prompt LayerNorm bias in x's dtype, or None for zeros.
        eps_g: prompt LayerNorm epsilon.
        mix: ``(Np, N)`` or per-channel ``(Np, N, d)``, float32, contiguous, ``N = T - num_prefix``.
        num_prefix: prefix tokens ``P``, left out of the projection.

    Returns:
        ``h (B, T, d)`` and ``g (B, Np, d)`` in x's dtype, and the float32 row statistics
        ``mean``, ``rstd1 = 1/sqrt(var + eps1)``, ``rstd_g = 1/sqrt(var + eps_g)``, each ``(B, T)``.
    """
    B, T, d = x.shape
    Np, N = mix.shape[:2]
    per_channel = mix.dim() == 3
    cfg = _config(T, d, Np, per_channel, backward=False)
    tiles = triton.cdiv(T, cfg.block_t)
    stats = dict(device=x.device, dtype=torch.float32)
    h = torch.empty_like(x)
    mean = torch.empty(B, T, **stats)
    rstd1 = torch.empty(B, T, **stats)
    rstd_g = torch.empty(B, T, **stats)
    # Shared mix: per-tile partials (B, tiles, Np, d) from the main kernel, summed below. Per
    # channel the tiles hold a few rows and such partials would be many times g, so a second
    # kernel, run after the main one on the same stream, writes g itself from the statistics.
    g = torch.empty(B, Np, d, dtype=x.dtype, device=x.device) if per_channel else None
    g_partial = None if per_channel else torch.empty(B, tiles, Np, d, **stats)
    with _device_guard(x):
        if x.numel() > 0:
            _norm_and_project_fwd_kernel[(tiles, B)](
                x, norm1_weight if norm1_weight is not None else x, norm1_bias if norm1_bias is not None else x,
                gen_weight if gen_weight is not None else x, gen_bias if gen_bias is not None else x,
                mix, h, mean, rstd1, rstd_g, g_partial if g_partial is not None else x,
                T, N, d, Np, num_prefix, eps1, eps_g,
                HAS_W1=norm1_weight is not None, HAS_B1=norm1_bias is not None,
                HAS_WG=gen_weight is not None, HAS_BG=gen_bias is not None,
                PER_CHANNEL=per_channel, DOT_PRECISION=_dot_precision(x.dtype), ROUND_BF16=_round_bf16(x.dtype),
                BLOCK_T=cfg.block_t, BLOCK_D=cfg.block_d, BLOCK_J=cfg.block_j, num_warps=cfg.num_warps,
            )
        # Also run without patches (N == 0), where it writes zeros.
        if per_channel and g.numel() > 0:
            pcfg = _per_channel_config(N, d, Np)
            grid = (B, triton.cdiv(Np, pcfg.block_j), triton.cdiv(d, pcfg.block_c))
            _norm_and_project_g_kernel[grid](
                x, gen_weight if gen_weight is not None else x, gen_bias if gen_bias is not None else x,
                mix, mean, rstd_g, g, T, N, d, Np, num_prefix,
                HAS_WG=gen_weight is not None, HAS_BG=gen_bias is not None, ROUND_BF16=_round_bf16(x.dtype),
                BLOCK_C=pcfg.block_c, BLOCK_N=pcfg.block_n, BLOCK_J=pcfg.block_j, num_warps=pcfg.num_warps,
            )
    if not per_channel:
        g = g_partial.sum(1).to(x.dtype)
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`norm_and_project_forward`: one pass over ``x``, and for a per-channel
    ``mix`` a second one that reduces ``dmix`` over the batch (no buffer that grows with ``B``).

    Args:
        dh: ``(B, T, d)`` gradient of ``h``, contiguous, x's dtype.
        dg: ``(B, Np, d)`` gradient of ``g``, contiguous, x's dtype.
        x: the forward's block input ``(B, T, d)``.
        norm1_weight: ``(d,)`` or None (ones).
        gen_weight: ``(d,)`` or None (ones).
        gen_bias: ``(d,)`` or None (zeros); needed to rebuild ``LN_g(x)`` for ``dmix``.
        mix: ``(Np, N)`` or ``(Np, N, d)``, float32, contiguous.
        mean: ``(B, T)`` float32 row means from the forward.
        rstd1: ``(B, T)`` float32 ``1/sqrt(var + eps1)`` from the forward.
        rstd_g: ``(B, T)`` float32 ``1/sqrt(var + eps_g)`` from the forward.
        num_prefix: prefix tokens ``P``.

    Returns:
        ``dx (B, T, d)`` in x's dtype; float32 ``dnorm1_weight``, ``dnorm1_bias``,
        ``dgen_weight``, ``dgen_bias`` (each ``(d,)``, computed even for None weights) and
        ``dmix`` (mix's shape).
    """
    B, T, d = x.shape
    Np, N = mix.shape[:2]
    per_channel = mix.dim() == 3
    cfg = _config(T, d, Np, per_channel, backward=True)
    tiles = triton.cdiv(T, cfg.block_t)
    stats = dict(device=x.device, dtype=torch.float32)
    dx = torch.empty_like(x)
    weight_partials = [torch.empty(B * tiles, d, **stats) for _ in range(4)]
    # Shared mix: per-image partials (B, Np, N) from the main kernel, summed below. Per channel
    # such partials would be (B, Np, N, d), so a second kernel reduces over the batch in registers
    # and writes dmix itself.
    dmix = torch.empty(mix.shape, **stats) if per_channel else torch.empty(B, Np, N, **stats)
    with _device_guard(x):
        if x.numel() > 0:
            _norm_and_project_bwd_kernel[(tiles, B)](
                dh, dg, x, norm1_weight if norm1_weight is not None else x,
                gen_weight if gen_weight is not None else x, gen_bias if gen_bias is not None else x,
                mix, mean, rstd1, rstd_g, dx, *weight_partials, dmix,
                T, N, d, Np, num_prefix,
                HAS_W1=norm1_weight is not None, HAS_WG=gen_weight is not None, HAS_BG=gen_bias is not None,
                PER_CHANNEL=per_channel, DOT_PRECISION=_dot_precision(x.dtype), ROUND_BF16=_round_bf16(x.dtype),
                BLOCK_T=cfg.block_t, BLOCK_D=cfg.block_d, BLOCK_J=cfg.block_j, num_warps=cfg.num_warps,
            )
        # Also run for B == 0, where it writes zeros.
        if per_channel and dmix.numel() > 0:
            pcfg = _per_channel_config(N, d, Np)
            grid = (triton.cdiv(d, pcfg.block_c), triton.cdiv(N, pcfg.block_n), triton.cdiv(Np, pcfg.block_j))
            _norm_and_project_dmix_kernel[grid](
                dg, x, gen_weight if gen_weight is not None else x, gen_bias if gen_bias is not None else x,
                mean, rstd_g, dmix, B, T, N, d, Np, num_prefix,
                HAS_WG=gen_weight is not None, HAS_BG=gen_bias is not None,
                BLOCK_C=pcfg.block_c, BLOCK_N=pcfg.block_n, BLOCK_J=pcfg.block_j, num_warps=pcfg.num_warps,
            )
    dnorm1_weight, dnorm1_bias, dgen_weight, dgen_bias = (p.sum(0) for p in weight_partials)
    return dx, dnorm1_weight, dnorm1_bias, dgen_weight, dgen_bias, dmix if per_channel else dmix.sum(0)
