"""Composite PyTorch versions of the two VAPT ops (the ``torch`` backend), next to their plain
references (the op-level oracle for every backend).

Shapes: ``B`` batch, ``T = P + N`` tokens (``P`` prefix tokens, ``N`` patches), ``d`` channels,
``Np`` prompts, ``H`` heads of width ``D``.

``norm_and_project`` is a ``torch.autograd.Function`` with a hand-written backward pass:
autograd's own backward of ``M @ LN(x)`` broadcasts ``M`` over the batch and reduces afterwards
(2.4x slower on CPU at ViT-S shapes), and slicing the patch rows copies them twice.
``prefix_attention`` is concatenation + fused SDPA (see its docstring for why).
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
        # Computed in the input's precision whatever the autocast state: under autocast the
        # matmul would otherwise return a lower-precision g whose gradient the backward (which
        # runs outside autocast) could not combine with the float32 mix.
        with torch.autocast(device_type=x.device.type, enabled=False):
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

    Concatenation + PyTorch's fused SDPA. Measured on CPU inside a ViT-S block (fwd + bwd), this
    beat merging a separate prompt attention into flash attention through the log-sum-exp by
    ~1.3 ms/block: the merge needs a dozen small per-head products and elementwise passes, while
    the copy into contiguous ``(B, H, Np + T, D)`` keys also speeds up the attention kernel.
    """
    B = q.shape[0]
    k_all = torch.cat((k_prefix.expand(B, -1, -1, -1), k), dim=2)
    v_all = torch.cat((v_prefix.expand(B, -1, -1, -1), v), dim=2)
    return F.scaled_dot_product_attention(q, k_all, v_all, scale=scale)
