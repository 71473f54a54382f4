"""The two VAPT ops in plain PyTorch: the op-level references, and the ``torch`` backend.

Shapes: ``B`` batch, ``T = P + N`` tokens (``P`` prefix tokens, ``N`` patches), ``d`` channels,
``Np`` prompts, ``H`` heads of width ``D``. The contract of each op (what it takes, what it
returns) is :mod:`vapt_kernels.ops.library`'s; this module only computes.

* :func:`norm_and_project_reference` and :func:`prefix_attention_reference`: the plain
  formulations (autograd does their backward, twice if asked): the oracle of every backend's op
  tests and the ``reference`` backend.
* :func:`norm_and_project_fwd` / :func:`norm_and_project_bwd`: the ``torch`` backend's
  ``norm_and_project``, the composite twin of the kernel ops (same signature, outputs and saved
  statistics), so it shares their autograd rule. Its hand-written backward exists because
  autograd's own backward of ``mix @ LN(x)`` broadcasts ``mix`` over the batch and reduces
  afterwards (2.4x slower on CPU at ViT-S shapes).
* :func:`prefix_attention_fwd` / :func:`prefix_attention_bwd`: the ``torch`` backend's attention
  on CPU tensors, the same kind of twin, on PyTorch's fused CPU attention; :func:`prefix_attention`:
  the ``torch`` backend's attention on GPU tensors (concatenation + SDPA).
* The backward of a backward (``create_graph=True``, ``torch.func``) of every backend:
  :func:`norm_and_project_bwd` with ``recompute_eps_g`` and :func:`prefix_attention_bwd` with
  ``differentiable``, written with differentiable operations only.

Many tasks (``task`` given): the prompt parameters are stacked per task and image ``b`` uses
``task[b]``'s. The reference runs the single-task formulation once per task and keeps each image's
own; the ``torch`` backend gathers each image's shared mix (``(B, Np, T)``, small next to ``x``)
and, per channel, loops over the tasks instead of gathering ``(B, Np, T, d)``. Its per-task
gradient sums (:func:`_sum_by_task`) are deterministic.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation and row-statistics dtype of every implementation: float64 for float64
    inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _autocast_off(device_type: str):
    """A context in which autocast is off on ``device_type``: autocast's own when it is on, none
    when it is off already (entering one costs tens of microseconds per call)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _project(mix: torch.Tensor, xn: torch.Tensor) -> torch.Tensor:
    """``g[b] = mix @ xn[b]``: ``(Np, N) x (B, N, d)``, or per channel ``(Np, N, d) x (B, N, d)``."""
    if mix.dim() == 2:
        return torch.matmul(mix, xn)
    return torch.einsum("jnc,bnc->bjc", mix, xn)


# --------------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------------


def norm_and_project_reference(
    x, norm1_weight, norm1_bias, eps1, gen_weight, gen_bias, eps_g, mix, num_prefix, task=None
):
    """``h = LN_1(x)`` and ``g = mix @ LN_g(x[:, num_prefix:])``, computed plainly; with ``task``,
    once per task with that task's parameters, each image keeping its own task's ``g``."""
    d = x.shape[-1]
    h = F.layer_norm(x, (d,), norm1_weight, norm1_bias, eps1)
    if task is None:
        xn = F.layer_norm(x[:, num_prefix:], (d,), gen_weight, gen_bias, eps_g)
        return h, _project(mix.to(xn.dtype), xn)
    g = None
    for t in range(mix.shape[0]):
        weight = None if gen_weight is None else gen_weight[t]
        bias = None if gen_bias is None else gen_bias[t]
        _, g_t = norm_and_project_reference(x, None, None, eps1, weight, bias, eps_g, mix[t], num_prefix)
        g = g_t if g is None else torch.where((task == t)[:, None, None], g_t, g)
    return h, g


def with_prefix(prefix: torch.Tensor, tokens: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """``[prefix; tokens]`` along the token axis: ``(B, H, Np + T, D)`` from a ``(B or 1, H, Np, D)``
    prefix (batch 1 is broadcast) and ``(B, H, T, D)`` token keys or values; followed by ``pad``
    rows of zeros when asked."""
    B, H, _, D = tokens.shape
    parts = [prefix.expand(B, -1, -1, -1), tokens]
    if pad:
        parts.append(tokens.new_zeros(()).expand(B, H, pad, D))
    return torch.cat(parts, dim=2)


def prefix_attention_reference(q, k, v, k_prefix, v_prefix, scale):
    """Softmax attention of ``q`` over the concatenated keys/values, computed plainly."""
    attn = torch.softmax(torch.matmul(q, with_prefix(k_prefix, k).transpose(-1, -2)) * scale, dim=-1)
    return torch.matmul(attn, with_prefix(v_prefix, v))


# --------------------------------------------------------------------------------------------
# torch backend
# --------------------------------------------------------------------------------------------


def _affine(t: Optional[torch.Tensor], fill: float, d: int, like: torch.Tensor) -> torch.Tensor:
    """A LayerNorm weight or bias in ``like``'s dtype; None (no affine) becomes ``fill``."""
    return torch.full((d,), fill, dtype=like.dtype, device=like.device) if t is None else t.to(like.dtype)


def _pad_prefix(mix: torch.Tensor, num_prefix: int, stacked: bool = False) -> torch.Tensor:
    """``mix`` with zero columns for the prefix tokens: ``(Np, T)`` or ``(Np, T, d)``, with a
    leading task dimension when ``stacked``.

    Projecting all ``T`` rows through a zero-padded matrix reads ``x`` as it lies in memory (a
    slice of the patch rows would be copied, forward and backward) at the price of ``P`` zero
    columns; the rows those columns meet are zeroed too (:func:`_patch_rows_only`).
    """
    if num_prefix == 0:
        return mix
    per_channel = mix.dim() == (4 if stacked else 3)
    return F.pad(mix, (0, 0, num_prefix, 0) if per_channel else (num_prefix, 0))


def _patch_rows_only(t: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """``t (B, T, d)`` with its prefix rows zeroed, in place: the prompts depend on the patch tokens
    only, and a NaN in a prefix token would otherwise reach them through ``0 * NaN``."""
    t[:, :num_prefix] = 0
    return t


def _sum_by_task(per_image: torch.Tensor, task: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """``out[t] = sum of per_image[b] over the images b of task t``, ``(K, ...)``: one masked sum
    per task, in image order (deterministic, unlike an ``index_add_`` on CUDA; a NaN of one task
    stays out of the others)."""
    mask_shape = (-1,) + (1,) * (per_image.dim() - 1)
    return torch.stack([torch.where((task == t).view(mask_shape), per_image, 0).sum(0) for t in range(num_tasks)])


def _per_image_affine(t: Optional[torch.Tensor], fill: float, task: torch.Tensor, d: int, like: torch.Tensor):
    """Each image's LayerNorm weight or bias ``(B, 1, d)`` from the stacked ``(K, d)`` ones."""
    if t is None:
        return torch.full((1, 1, d), fill, dtype=like.dtype, device=like.device)
    return t.to(like.dtype)[task].unsqueeze(1)


def _project_per_task(mix_t: torch.Tensor, xn: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
    """``g[b] = mix_t[task[b]] @ xn[b]`` for a stacked ``(K, Np, T)`` or ``(K, Np, T, d)`` mix."""
    if mix_t.dim() == 3:
        return torch.bmm(mix_t[task], xn)
    g = None
    for t in range(mix_t.shape[0]):
        g_t = torch.einsum("jtc,btc->bjc", mix_t[t], xn)
        g = g_t if g is None else torch.where((task == t)[:, None, None], g_t, g)
    return g


def norm_and_project_fwd(
    x, norm1_weight, norm1_bias, eps1, gen_weight, gen_bias, eps_g, mix, num_prefix, task=None
):
    """Composite ``norm_and_project_fwd``: ``(h, g, mean, rstd1, rstd_g)`` as the kernels return
    them (``h``, ``g`` in x's dtype; row statistics ``(B, T)`` in the stats dtype)."""
    B, T, d = x.shape
    # Computed in the stats precision whatever the autocast state (the backward, which runs
    # outside autocast, must meet the same dtypes).
    with _autocast_off(x.device.type):
        xs = x.to(stats_dtype(x.dtype))
        w1, b1 = _affine(norm1_weight, 1.0, d, xs), _affine(norm1_bias, 0.0, d, xs)
        h, mean, rstd1 = torch.native_layer_norm(xs, (d,), w1, b1, eps1)
        mix_t = _pad_prefix(mix.to(xs.dtype), num_prefix, stacked=task is not None)
        if task is None:
            wg, bg = _affine(gen_weight, 1.0, d, xs), _affine(gen_bias, 0.0, d, xs)
            xg, _, rstd_g = torch.native_layer_norm(xs, (d,), wg, bg, eps_g)
            g = _project(mix_t, _patch_rows_only(xg, num_prefix))
        else:
            xhat, _, rstd_g = torch.native_layer_norm(xs, (d,), None, None, eps_g)
            wg, bg = _per_image_affine(gen_weight, 1.0, task, d, xs), _per_image_affine(gen_bias, 0.0, task, d, xs)
            g = _project_per_task(mix_t, _patch_rows_only(torch.addcmul(bg, xhat, wg), num_prefix), task)
    return h.to(x.dtype), g.to(x.dtype), mean.view(B, T), rstd1.view(B, T), rstd_g.view(B, T)


def norm_and_project_bwd(
    dh, dg, x, norm1_weight, gen_weight, gen_bias, mix, mean, rstd1, rstd_g, num_prefix, task=None, *,
    recompute_eps_g=None,
):
    """Composite ``norm_and_project_bwd``: ``(dx, dnorm1_weight, dnorm1_bias, dgen_weight,
    dgen_bias, dmix)``, dx in x's dtype and the rest in the stats dtype, as the kernels return
    them.

    ``LN_g(x)`` is rebuilt from the saved statistics; with ``recompute_eps_g`` it is recomputed
    from ``x`` instead, so that every output is a differentiable function of the inputs (the saved
    statistics carry no gradient; aten's LayerNorm backward has its own derivative): the backward
    of a backward, for every backend.
    """
    d = x.shape[-1]
    P = num_prefix
    xs = x.to(stats_dtype(x.dtype))
    w1 = _affine(norm1_weight, 1.0, d, xs)
    mean, rstd1, rstd_g = mean.unsqueeze(-1), rstd1.unsqueeze(-1), rstd_g.unsqueeze(-1)
    if recompute_eps_g is None:
        xhat = torch.addcmul(-mean * rstd_g, xs, rstd_g)  # (x - mean) * rstd_g in one pass
    else:
        xhat = F.layer_norm(xs, (d,), None, None, recompute_eps_g)
    xhat = _patch_rows_only(xhat, P)  # LN_g(x) = xhat * wg + bg, never materialised
    mix_t = _pad_prefix(mix.to(xs.dtype), P, stacked=task is not None)
    dgs = dg.to(xs.dtype)
    if task is None:
        wg, bg = _affine(gen_weight, 1.0, d, xs), _affine(gen_bias, 0.0, d, xs)
        dxg, dwg, dbg, dmix = _prompt_grads(dgs, xhat, mix_t, wg, bg)
        dx_g = torch.ops.aten.native_layer_norm_backward(dxg, xs, (d,), mean, rstd_g, wg, bg, [True, False, False])[0]
    else:
        dxg, dwg, dbg, dmix = _prompt_grads_per_task(dgs, xhat, mix_t, gen_weight, gen_bias, task)
        # Each image's own LN_g weight applied to its gradient, then LN_g's backward without one.
        dyg = dxg * _per_image_affine(gen_weight, 1.0, task, d, xs)
        dx_g = torch.ops.aten.native_layer_norm_backward(dyg, xs, (d,), mean, rstd_g, None, None, [True, False, False])
        dx_g = dx_g[0]
    dx, dw1, db1 = torch.ops.aten.native_layer_norm_backward(
        dh.to(xs.dtype), xs, (d,), mean, rstd1, w1, torch.zeros_like(w1), [True, True, True]
    )
    per_channel = mix.dim() == (3 if task is None else 4)
    dmix = dmix[..., P:, :] if per_channel else dmix[..., P:]  # without the padded prefix columns
    return dx.add_(dx_g).to(x.dtype), dw1, db1, dwg, dbg, dmix


def _prompt_grads(dgs, xhat, mix_t, wg, bg):
    """Single task: ``(dxg, dgen_weight, dgen_bias, dmix)`` with ``dxg`` the gradient reaching
    ``LN_g(x)`` (before its affine) and ``dmix`` over all ``T`` columns.

    With ``y = mix @ xhat`` ``(B, Np, d)`` the affine gradients are small contractions:
    ``dgen_weight = sum dg * y``, ``dgen_bias = sum_j (sum_t mix[j, t]) sum_b dg[b, j]``."""
    if mix_t.dim() == 2:
        y = torch.matmul(mix_t, xhat)
        dmix = torch.bmm(dgs * wg, xhat.transpose(1, 2)).sum(0) + (dgs @ bg).sum(0).unsqueeze(1)
        dxg = torch.matmul(mix_t.t(), dgs)  # (B, T, d); the prefix rows are zero
        dbg = (mix_t.sum(1, keepdim=True) * dgs.sum(0)).sum(0)
    else:
        y = torch.einsum("jtc,btc->bjc", mix_t, xhat)
        dmix = torch.einsum("bjc,btc->jtc", dgs, xhat) * wg + (dgs.sum(0) * bg).unsqueeze(1)
        dxg = torch.einsum("jtc,bjc->btc", mix_t, dgs)
        dbg = (mix_t.sum(1) * dgs.sum(0)).sum(0)
    dwg = (dgs * y).sum((0, 1))
    return dxg, dwg, dbg, dmix


def _prompt_grads_per_task(dgs, xhat, mix_t, gen_weight, gen_bias, task):
    """:func:`_prompt_grads` with the prompt parameters stacked over ``K`` tasks: per-image terms
    summed over each task's own images."""
    K, d = mix_t.shape[0], xhat.shape[-1]
    wg, bg = _per_image_affine(gen_weight, 1.0, task, d, xhat), _per_image_affine(gen_bias, 0.0, task, d, xhat)
    if mix_t.dim() == 3:
        mix_b = mix_t[task]  # (B, Np, T)
        y = torch.bmm(mix_b, xhat)
        dmix_b = torch.bmm(dgs * wg, xhat.transpose(1, 2)) + (dgs * bg).sum(-1, keepdim=True)
        dxg = torch.bmm(mix_b.transpose(1, 2), dgs)
        dbg_b = (mix_b.sum(2, keepdim=True) * dgs).sum(1)
        dmix = _sum_by_task(dmix_b, task, K)
    else:
        y = _project_per_task(mix_t, xhat, task)
        dxg, dbg_b, dmix = None, None, []
        for t in range(K):
            mine = (task == t)[:, None, None]
            dg_t = torch.where(mine, dgs, 0)
            wg_t = 1.0 if gen_weight is None else gen_weight[t].to(xhat.dtype)
            bg_t = 0.0 if gen_bias is None else gen_bias[t].to(xhat.dtype)
            dmix.append(torch.einsum("bjc,btc->jtc", dg_t, xhat) * wg_t + (dg_t.sum(0) * bg_t).unsqueeze(1))
            dxg_t = torch.einsum("jtc,bjc->btc", mix_t[t], dg_t)
            dbg_t = (mix_t[t].sum(1) * dg_t).sum(1)
            dxg = dxg_t if dxg is None else dxg + dxg_t
            dbg_b = dbg_t if dbg_b is None else dbg_b + dbg_t
        dmix = torch.stack(dmix)
    dwg = _sum_by_task((dgs * y).sum(1), task, K)
    return dxg, dwg, _sum_by_task(dbg_b, task, K), dmix


def _prefix_grads(dk_all, dv_all, k_prefix, num_tokens):
    """Split ``(B, H, Np + T [+ padding], D)`` key and value gradients into ``(dk, dv, dk_prefix,
    dv_prefix)``; the gradient of a broadcast prefix is summed over the batch."""
    Np = k_prefix.shape[2]
    dk_prefix, dv_prefix = dk_all[:, :, :Np], dv_all[:, :, :Np]
    if k_prefix.shape[0] != dk_all.shape[0]:
        dk_prefix, dv_prefix = dk_prefix.sum(0, keepdim=True), dv_prefix.sum(0, keepdim=True)
    tokens = slice(Np, Np + num_tokens)
    return dk_all[:, :, tokens], dv_all[:, :, tokens], dk_prefix, dv_prefix


def _query_row_nans(q: torch.Tensor) -> torch.Tensor:
    """``(B, H, T, 1)``: NaN where a query row holds a NaN or an infinity, 0 elsewhere, for SDPA on
    GPU tensors (which returns no log-sum-exp to read this from). Added to its output it makes
    those rows NaN, the plain formulation's answer, and leaves the others as they are. ``amax``
    propagates NaN and reads the rows as they lie (an ``isnan`` of a strided ``q`` is ten times
    slower)."""
    return q.detach().amax(-1, keepdim=True) * 0


def _cpu_attention_dtype(dtype: torch.dtype) -> torch.dtype:
    """What PyTorch's fused CPU attention computes in for ``dtype`` inputs: float16 in float32 (CPUs
    have no float16 arithmetic; the fused kernel would round its probabilities to float16), every
    other dtype as it is."""
    return torch.float32 if dtype == torch.float16 else dtype


# PyTorch's fused CPU attention runs each score row's passes (scale, max, exp and sum) in vectors
# (16 floats with AVX-512, 8 with AVX2) and the row's remaining scores one at a time, a scalar exp
# each. Keys padded to a multiple of 16 with masked-out zero keys leave no remainder: at ViT-S
# shapes (fp32, 2 threads, median of 50 alternating calls) its forward takes 6.0 ms over 207 keys
# and 5.0 ms over 208 with one masked, its backward 12.7 and 11.0 ms.
_KEY_MULTIPLE = 16


def _fused_cpu_keys(k, v, k_prefix, v_prefix, dtype):
    """``(keys, values, mask)`` for PyTorch's fused CPU attention, in ``dtype``: ``[prefix;
    tokens]`` padded with zero rows to a multiple of :data:`_KEY_MULTIPLE` keys, and the additive
    ``(1, 1, 1, keys)`` mask that gives the padding no weight (0, then -inf; None without padding).
    A padded key's score is ``q . 0 - inf = -inf`` for every finite query row."""
    num_keys = k_prefix.shape[2] + k.shape[2]
    pad = -num_keys % _KEY_MULTIPLE
    keys, values = with_prefix(k_prefix, k, pad).to(dtype), with_prefix(v_prefix, v, pad).to(dtype)
    if not pad:
        return keys, values, None
    mask = F.pad(torch.zeros(1, 1, 1, num_keys, dtype=dtype, device=k.device), (0, pad), value=float("-inf"))
    return keys, values, mask


def prefix_attention_fwd(q, k, v, k_prefix, v_prefix, scale):
    """The ``torch`` backend's ``prefix_attention_fwd`` on CPU tensors: ``(out (B, H, T, D), lse
    (B, H, T))`` as the kernels return them (``lse`` in the stats dtype), from PyTorch's fused CPU
    attention (the kernel ``F.scaled_dot_product_attention`` runs on CPU) over the concatenated
    keys and values (:func:`_fused_cpu_keys`). Its backward (:func:`prefix_attention_bwd`)
    consumes ``lse``, so the ``(T, Np + T)`` probabilities are never stored."""
    c = _cpu_attention_dtype(q.dtype)
    keys, values, mask = _fused_cpu_keys(k, v, k_prefix, v_prefix, c)
    with _autocast_off(q.device.type):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.to(c), keys, values, attn_mask=mask, scale=scale
        )
    # A query row holding a NaN or an infinity, or whose scores overflow, has a NaN or infinite
    # log-sum-exp, where the kernel's output row may be finite (zeros for an infinite row in
    # bfloat16). Adding lse * 0 (0, or NaN for such a row) gives the row the plain formulation's
    # NaN and leaves the others as they are; it reads (B, H, T) floats, not q.
    return out.to(q.dtype).add_(lse.unsqueeze(-1) * 0), lse


def prefix_attention_bwd(dout, q, k, v, k_prefix, v_prefix, out, lse, scale, *, differentiable=False):
    """Gradients ``(dq, dk, dv, dk_prefix, dv_prefix)`` of ``prefix_attention``; prefix gradients
    are summed over the batch when the prefix is broadcast.

    By default the ``torch`` backend's ``prefix_attention_bwd`` on CPU tensors: PyTorch's fused
    CPU attention backward from ``out`` and ``lse``, over the keys and values its forward took.
    With ``differentiable``, the formulas written out with the probabilities recomputed from the
    inputs (``out`` and ``lse`` unused), so that the gradients are differentiable functions of the
    inputs: the backward of a backward, for every backend and device.
    """
    T = k.shape[2]
    if not differentiable:
        c = _cpu_attention_dtype(q.dtype)
        keys, values, mask = _fused_cpu_keys(k, v, k_prefix, v_prefix, c)
        with _autocast_off(q.device.type):
            dq, dk_all, dv_all = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                dout.to(c), q.to(c), keys, values, out.to(c), lse, 0.0, False, attn_mask=mask, scale=scale
            )
        return tuple(grad.to(q.dtype) for grad in (dq, *_prefix_grads(dk_all, dv_all, k_prefix, T)))
    k_all, v_all = with_prefix(k_prefix, k), with_prefix(v_prefix, v)
    probs = torch.softmax(torch.matmul(q, k_all.transpose(-1, -2)) * scale, dim=-1)
    dv_all = torch.matmul(probs.transpose(-1, -2), dout)
    dprobs = torch.matmul(dout, v_all.transpose(-1, -2))
    dscores = probs * (dprobs - (dprobs * probs).sum(-1, keepdim=True)) * scale
    dq = torch.matmul(dscores, k_all)
    dk_all = torch.matmul(dscores.transpose(-1, -2), q)
    return (dq, *_prefix_grads(dk_all, dv_all, k_prefix, T))


def prefix_attention(q, k, v, k_prefix, v_prefix, scale):
    """The ``torch`` backend's ``prefix_attention`` on GPU tensors: concatenation + SDPA.

    SDPA's fused GPU kernels (flash or memory-efficient attention) never materialise the
    ``(T, Np + T)`` scores, forward or backward; their backward cannot be differentiated again
    (PyTorch says so when asked), except in float64, where SDPA runs its plain math. (On CPU
    tensors the backend runs :func:`prefix_attention_fwd` / :func:`prefix_attention_bwd` under the
    ops' autograd rule, whose backward of a backward uses the differentiable formulas.) A query row
    holding a NaN gets a NaN output row, as on every backend.
    """
    out = F.scaled_dot_product_attention(q, with_prefix(k_prefix, k), with_prefix(v_prefix, v), scale=scale)
    # Not in place: SDPA saved out. In out's dtype: under autocast SDPA computes in the autocast
    # dtype while q may be float32, and the addend must not promote the output.
    return out + _query_row_nans(q).to(out.dtype)
