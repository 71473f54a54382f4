"""The two VAPT ops in plain PyTorch: the op-level references, and the ``torch`` backend.

Shapes: ``B`` batch, ``T = P + N`` tokens (``P`` prefix tokens, ``N`` patches), ``d`` channels,
``Np`` prompts, ``H`` heads of width ``D``. The contract of each op (what it takes, what it
returns) is :mod:`vapt_kernels.ops.library`'s; this module only computes.

* :func:`norm_and_project_reference` and :func:`prefix_attention_reference`: the plain
  formulations (autograd does their backward, twice if asked). They are the oracle of every
  backend's op tests, the ``reference`` backend, and the differentiable backward every backend
  falls back to when a gradient of a gradient is asked for.
* :func:`norm_and_project_fwd` / :func:`norm_and_project_bwd`: the ``torch`` backend's
  ``norm_and_project``, the composite twin of the kernel ops (same signature, outputs and saved
  statistics), so it shares their autograd wiring. Its hand-written backward exists because
  autograd's own backward of ``mix @ LN(x)`` broadcasts ``mix`` over the batch and reduces
  afterwards (2.4x slower on CPU at ViT-S shapes).
* :func:`prefix_attention`: the ``torch`` backend's attention (see its docstring).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation and row-statistics dtype of every implementation: float64 for float64
    inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _project(mix: torch.Tensor, xn: torch.Tensor) -> torch.Tensor:
    """``g[b] = mix @ xn[b]``: ``(Np, N) x (B, N, d)``, or per channel ``(Np, N, d) x (B, N, d)``."""
    if mix.dim() == 2:
        return torch.matmul(mix, xn)
    return torch.einsum("jnc,bnc->bjc", mix, xn)


# --------------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------------


def norm_and_project_reference(x, norm1_weight, norm1_bias, eps1, gen_weight, gen_bias, eps_g, mix, num_prefix):
    """``h = LN_1(x)`` and ``g = mix @ LN_g(x[:, num_prefix:])``, computed plainly."""
    d = x.shape[-1]
    h = F.layer_norm(x, (d,), norm1_weight, norm1_bias, eps1)
    xn = F.layer_norm(x[:, num_prefix:], (d,), gen_weight, gen_bias, eps_g)
    return h, _project(mix.to(xn.dtype), xn)


def prefix_attention_reference(q, k, v, k_prefix, v_prefix, scale):
    """Softmax attention of ``q`` over the concatenated keys/values, computed plainly."""
    B = q.shape[0]
    k_all = torch.cat((k_prefix.expand(B, -1, -1, -1), k), dim=2)
    v_all = torch.cat((v_prefix.expand(B, -1, -1, -1), v), dim=2)
    attn = torch.softmax(torch.matmul(q, k_all.transpose(-1, -2)) * scale, dim=-1)
    return torch.matmul(attn, v_all)


# --------------------------------------------------------------------------------------------
# torch backend
# --------------------------------------------------------------------------------------------


def _affine(t: Optional[torch.Tensor], fill: float, d: int, like: torch.Tensor) -> torch.Tensor:
    """A LayerNorm weight or bias in ``like``'s dtype; None (no affine) becomes ``fill``."""
    return torch.full((d,), fill, dtype=like.dtype, device=like.device) if t is None else t.to(like.dtype)


def _pad_prefix(mix: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """``mix`` with zero columns for the prefix tokens: ``(Np, T)`` or ``(Np, T, d)``.

    Projecting all ``T`` rows through a zero-padded matrix reads ``x`` as it lies in memory (a
    slice of the patch rows would be copied, forward and backward) at the price of ``P`` zero
    columns; the rows those columns meet are zeroed too (:func:`_patch_rows_only`).
    """
    if num_prefix == 0:
        return mix
    pad = (num_prefix, 0) if mix.dim() == 2 else (0, 0, num_prefix, 0)
    return F.pad(mix, pad)


def _patch_rows_only(t: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """``t (B, T, d)`` with its prefix rows zeroed, in place: the prompts depend on the patch tokens
    only, and a NaN in a prefix token would otherwise reach them through ``0 * NaN``."""
    t[:, :num_prefix] = 0
    return t


def norm_and_project_fwd(x, norm1_weight, norm1_bias, eps1, gen_weight, gen_bias, eps_g, mix, num_prefix):
    """Composite ``norm_and_project_fwd``: ``(h, g, mean, rstd1, rstd_g)`` as the kernels return
    them (``h``, ``g`` in x's dtype; row statistics ``(B, T)`` in the stats dtype)."""
    B, T, d = x.shape
    # Computed in the stats precision whatever the autocast state (the backward, which runs
    # outside autocast, must meet the same dtypes).
    with torch.autocast(device_type=x.device.type, enabled=False):
        xs = x.to(stats_dtype(x.dtype))
        w1, b1 = _affine(norm1_weight, 1.0, d, xs), _affine(norm1_bias, 0.0, d, xs)
        h, mean, rstd1 = torch.native_layer_norm(xs, (d,), w1, b1, eps1)
        wg, bg = _affine(gen_weight, 1.0, d, xs), _affine(gen_bias, 0.0, d, xs)
        xg, _, rstd_g = torch.native_layer_norm(xs, (d,), wg, bg, eps_g)
        g = _project(_pad_prefix(mix.to(xs.dtype), num_prefix), _patch_rows_only(xg, num_prefix))
    return h.to(x.dtype), g.to(x.dtype), mean.view(B, T), rstd1.view(B, T), rstd_g.view(B, T)


def norm_and_project_bwd(
    dh, dg, x, norm1_weight, gen_weight, gen_bias, mix, mean, rstd1, rstd_g, num_prefix, *, recompute_eps_g=None
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
    w1, wg, bg = _affine(norm1_weight, 1.0, d, xs), _affine(gen_weight, 1.0, d, xs), _affine(gen_bias, 0.0, d, xs)
    mean, rstd1, rstd_g = mean.unsqueeze(-1), rstd1.unsqueeze(-1), rstd_g.unsqueeze(-1)
    if recompute_eps_g is None:
        xhat = torch.addcmul(-mean * rstd_g, xs, rstd_g)  # (x - mean) * rstd_g in one pass
    else:
        xhat = F.layer_norm(xs, (d,), None, None, recompute_eps_g)
    xhat = _patch_rows_only(xhat, P)  # LN_g(x) = xhat * wg + bg, never materialised
    mix_t = _pad_prefix(mix.to(xs.dtype), P)
    dgs = dg.to(xs.dtype)
    # With y = mix @ xhat (B, Np, d), the affine gradients are small contractions:
    # dgen_weight = sum dg * y, dgen_bias = sum_j (sum_t mix[j, t]) sum_b dg[b, j].
    if mix.dim() == 2:
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
    dx_g = torch.ops.aten.native_layer_norm_backward(dxg, xs, (d,), mean, rstd_g, wg, bg, [True, False, False])[0]
    dx, dw1, db1 = torch.ops.aten.native_layer_norm_backward(
        dh.to(xs.dtype), xs, (d,), mean, rstd1, w1, torch.zeros_like(w1), [True, True, True]
    )
    return dx.add_(dx_g).to(x.dtype), dw1, db1, dwg, dbg, dmix[:, P:]


def prefix_attention_bwd(dout, q, k, v, k_prefix, v_prefix, scale):
    """Gradients ``(dq, dk, dv, dk_prefix, dv_prefix)`` of :func:`prefix_attention_reference`,
    written out with the probabilities recomputed from the inputs, so that they are differentiable
    functions of the inputs (the backward of a backward, for every backend). Prefix gradients are
    summed over the batch when the prefix is broadcast."""
    B, Np = q.shape[0], k_prefix.shape[2]
    k_all = torch.cat((k_prefix.expand(B, -1, -1, -1), k), dim=2)
    v_all = torch.cat((v_prefix.expand(B, -1, -1, -1), v), dim=2)
    probs = torch.softmax(torch.matmul(q, k_all.transpose(-1, -2)) * scale, dim=-1)
    dv_all = torch.matmul(probs.transpose(-1, -2), dout)
    dprobs = torch.matmul(dout, v_all.transpose(-1, -2))
    dscores = probs * (dprobs - (dprobs * probs).sum(-1, keepdim=True)) * scale
    dq = torch.matmul(dscores, k_all)
    dk_all = torch.matmul(dscores.transpose(-1, -2), q)
    dk_prefix, dv_prefix = dk_all[:, :, :Np], dv_all[:, :, :Np]
    if k_prefix.shape[0] != B:
        dk_prefix, dv_prefix = dk_prefix.sum(0, keepdim=True), dv_prefix.sum(0, keepdim=True)
    return dq, dk_all[:, :, Np:], dv_all[:, :, Np:], dk_prefix, dv_prefix


def prefix_attention(q, k, v, k_prefix, v_prefix, scale):
    """The ``torch`` backend's ``prefix_attention``.

    Concatenation + SDPA, except for CPU tensors that need a gradient: there it is the plain
    formulation (:func:`prefix_attention_reference`), whose forward and backward together beat
    concatenation + SDPA at ViT shapes (21.7 vs 24.0 ms at ViT-S, batch 8: SDPA's CPU backward is
    the slow part) and which can be differentiated twice. On CUDA, SDPA's fused kernels (flash or
    memory-efficient attention) never materialise the (T, Np + T) scores, forward or backward; their
    backward cannot be differentiated again (PyTorch says so when asked), except in float64, where
    SDPA runs its plain math. A query row holding a NaN gets a NaN output row (SDPA's CPU kernel
    returns zeros for it), as on every backend.
    """
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, k_prefix, v_prefix))
    if grad and q.device.type == "cpu":
        return prefix_attention_reference(q, k, v, k_prefix, v_prefix, scale)
    B = q.shape[0]
    k_all = torch.cat((k_prefix.expand(B, -1, -1, -1), k), dim=2)
    v_all = torch.cat((v_prefix.expand(B, -1, -1, -1), v), dim=2)
    out = F.scaled_dot_product_attention(q, k_all, v_all, scale=scale)
    return torch.where(q.isnan().any(-1, keepdim=True), torch.nan, out)
