"""Composite PyTorch versions of the two VAPT ops (the ``torch`` backend), next to their plain
references (the op-level oracle for every backend).

Shapes: ``B`` batch, ``T = P + N`` tokens (``P`` prefix tokens, ``N`` patches), ``d`` channels,
``Np`` prompts, ``H`` heads of width ``D``.

The fast versions are ``torch.autograd.Function``s with hand-written backward passes: autograd's
own backward of ``M @ LN(x)`` broadcasts ``M`` over the batch and reduces afterwards, and
concatenating prompt keys in front of the token keys pushes CPU flash attention off its fast tile
sizes (197 keys -> 207 keys costs ~20% more, not ~5%). Here the token attention keeps its own
length and the prompt keys are merged in through the log-sum-exp.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------
# norm_and_project
# --------------------------------------------------------------------------------------------


def norm_and_project_reference(x, norm1_weight, norm1_bias, eps1, gen_weight, gen_bias, eps_g, mix, num_prefix):
    """Plain version of :func:`norm_and_project` (autograd does the backward)."""
    d = x.shape[-1]
    h = F.layer_norm(x, (d,), norm1_weight, norm1_bias, eps1)
    xn = F.layer_norm(x[:, num_prefix:], (d,), gen_weight, gen_bias, eps_g)
    if mix.dim() == 2:
        return h, torch.matmul(mix.to(xn.dtype), xn)
    return h, torch.einsum("jnc,bnc->bjc", mix.to(xn.dtype), xn)


def _pad_prefix(mix: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """``mix`` with zero columns for the prefix tokens: ``(Np, T)`` or ``(Np, T, d)``.

    Projecting all ``T`` rows through a zero-padded matrix avoids slicing ``x`` (a copy of the
    patch rows in forward and backward) at the price of ``P`` zero columns.
    """
    if num_prefix == 0:
        return mix
    pad = (num_prefix, 0) if mix.dim() == 2 else (0, 0, num_prefix, 0)
    return F.pad(mix, pad)


def _mix_rows(mix: torch.Tensor, xn: torch.Tensor) -> torch.Tensor:
    """``g[b] = mix @ xn[b]``: ``(Np, T) x (B, T, d)``, or per channel ``(Np, T, d) x (B, T, d)``."""
    if mix.dim() == 2:
        return torch.matmul(mix, xn)
    return torch.einsum("jtc,btc->bjc", mix, xn)


class _NormAndProject(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, eps1, wg, bg, eps_g, mix, num_prefix):
        d = x.shape[-1]
        mix_t = _pad_prefix(mix.to(x.dtype), num_prefix)
        h, mean1, rstd1 = torch.native_layer_norm(x, (d,), w1, b1, eps1)
        xn, mean_g, rstd_g = torch.native_layer_norm(x, (d,), wg, bg, eps_g)
        g = _mix_rows(mix_t, xn)
        ctx.save_for_backward(x, mean1, rstd1, mean_g, rstd_g, xn, mix_t, w1, b1, wg, bg)
        ctx.num_prefix = num_prefix
        ctx.mix_dtype = mix.dtype
        return h, g

    @staticmethod
    def backward(ctx, dh, dg):
        x, mean1, rstd1, mean_g, rstd_g, xn, mix_t, w1, b1, wg, bg = ctx.saved_tensors
        need_x, need_w1, need_b1, _, need_wg, need_bg, _, need_mix, _ = ctx.needs_input_grad
        d = x.shape[-1]
        dx = dw1 = db1 = dwg = dbg = dmix = None
        if need_mix:
            if mix_t.dim() == 2:
                dmix = torch.bmm(dg, xn.transpose(1, 2)).sum(0)  # (Np, T)
            else:
                dmix = torch.einsum("bjc,btc->jtc", dg, xn)
            dmix = dmix[:, ctx.num_prefix :].to(ctx.mix_dtype)
        if need_x or need_wg or need_bg:
            dxn = mix_t.transpose(0, 1) @ dg if mix_t.dim() == 2 else torch.einsum("jtc,bjc->btc", mix_t, dg)
            dx_g, dwg, dbg = torch.ops.aten.native_layer_norm_backward(
                dxn, x, (d,), mean_g, rstd_g, wg, bg, [need_x, need_wg, need_bg]
            )
        if need_x or need_w1 or need_b1:
            dx, dw1, db1 = torch.ops.aten.native_layer_norm_backward(
                dh, x, (d,), mean1, rstd1, w1, b1, [need_x, need_w1, need_b1]
            )
        if need_x:
            dx = dx + dx_g
        return dx, dw1, db1, None, dwg, dbg, None, dmix, None


def norm_and_project(
    x: torch.Tensor,
    norm1_weight: Optional[torch.Tensor],
    norm1_bias: Optional[torch.Tensor],
    eps1: float,
    gen_weight: Optional[torch.Tensor],
    gen_bias: Optional[torch.Tensor],
    eps_g: float,
    mix: torch.Tensor,
    num_prefix: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = LN_1(x)`` and ``g = mix @ LN_g(x[:, num_prefix:])``.

    Args:
        x: block input ``(B, T, d)``.
        norm1_weight, norm1_bias, eps1: the block's own LayerNorm (weight/bias may be None).
        gen_weight, gen_bias, eps_g: the prompt LayerNorm.
        mix: folded matrix ``(Np, N)``, or ``(Np, N, d)`` for per-channel kernels.
        num_prefix: prefix tokens ``P`` (excluded from the prompt projection).

    Returns:
        ``h (B, T, d)`` and ``g (B, Np, d)`` (no bias, no dropout mask).
    """
    return _NormAndProject.apply(x, norm1_weight, norm1_bias, eps1, gen_weight, gen_bias, eps_g, mix, num_prefix)


# --------------------------------------------------------------------------------------------
# prefix_attention
# --------------------------------------------------------------------------------------------


def prefix_attention_reference(q, k, v, k_prefix, v_prefix, scale):
    """Plain version of :func:`prefix_attention`: explicit concatenation, softmax and products."""
    B = q.shape[0]
    k_all = torch.cat((k_prefix.expand(B, -1, -1, -1), k), dim=2)
    v_all = torch.cat((v_prefix.expand(B, -1, -1, -1), v), dim=2)
    attn = torch.softmax(torch.matmul(q, k_all.transpose(-1, -2)) * scale, dim=-1)
    return torch.matmul(attn, v_all)


def _acc(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _sum_to(t: torch.Tensor, batch: int) -> torch.Tensor:
    """Reduce a ``(B, ...)`` gradient to batch 1 where the input was broadcast."""
    return t.sum(0, keepdim=True) if batch == 1 and t.shape[0] != 1 else t


class _PrefixAttentionCPU(torch.autograd.Function):
    """Flash attention over the token keys (CPU kernel) merged with the prompt keys via the LSE.

    Forward: ``o_t, lse_t`` over the ``T`` token keys, ``s_p = q k_p^T`` over the ``Np`` prompt
    keys, ``lse = logaddexp(lse_t, logsumexp(s_p))`` and ``o = o_t e^{lse_t - lse} + e^{s_p - lse} v_p``.
    Backward: the flash backward kernel, given the merged ``o`` and ``lse``, returns exactly the
    token-key part of ``dq, dk, dv`` (it forms ``P = e^{s - lse}`` and ``rowsum(dO * o)``); the
    prompt part is added with ``Np``-wide products.
    """

    @staticmethod
    def forward(ctx, q, k, v, kp, vp, scale):
        o_t, lse_t = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=None, scale=scale
        )
        s_p = torch.matmul(q, kp.transpose(-1, -2)).mul_(scale)  # (B, H, T, Np)
        lse = torch.empty_like(lse_t)  # keep the kernel's (B, T, H) memory layout
        acc = _acc(q)
        torch.logaddexp(lse_t, torch.logsumexp(s_p.to(acc), dim=-1), out=lse)
        p_p = torch.exp(s_p.to(acc) - lse.unsqueeze(-1))  # (B, H, T, Np) prompt probabilities
        o = torch.empty_like(o_t)
        torch.addcmul(torch.matmul(p_p.to(q.dtype), vp), o_t, torch.exp(lse_t - lse).unsqueeze(-1).to(o_t.dtype), out=o)
        ctx.save_for_backward(q, k, v, kp, vp, o, lse, p_p)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, kp, vp, o, lse, p_p = ctx.saved_tensors
        scale = ctx.scale
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, o, lse, 0.0, False, attn_mask=None, scale=scale
        )
        acc = p_p.dtype
        delta = (do.to(acc) * o.to(acc)).sum(-1, keepdim=True)  # rowsum(dO * O)
        dp = torch.matmul(do, vp.transpose(-1, -2)).to(acc)
        ds = (p_p * (dp - delta)).to(q.dtype)
        dq = dq.add_(torch.matmul(ds, kp), alpha=scale)
        dkp = _sum_to(torch.matmul(ds.transpose(-1, -2), q).mul_(scale), kp.shape[0])
        dvp = _sum_to(torch.matmul(p_p.to(do.dtype).transpose(-1, -2), do), vp.shape[0])
        return dq, dk, dv, dkp, dvp, None


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Softmax attention of ``q`` over the keys/values ``[k_prefix ; k]``, ``[v_prefix ; v]``.

    Args:
        q, k, v: ``(B, H, T, D)``, any strides with a unit last stride.
        k_prefix, v_prefix: ``(B or 1, H, Np, D)``; batch 1 is broadcast (static prompts).
        scale: softmax scale (``D ** -0.5`` in timm).

    Returns:
        ``(B, H, T, D)``.
    """
    if q.device.type == "cpu":
        return _PrefixAttentionCPU.apply(q, k, v, k_prefix, v_prefix, scale)
    B = q.shape[0]
    k_all = torch.cat((k_prefix.expand(B, -1, -1, -1), k), dim=2)
    v_all = torch.cat((v_prefix.expand(B, -1, -1, -1), v), dim=2)
    return F.scaled_dot_product_attention(q, k_all, v_all, scale=scale)
