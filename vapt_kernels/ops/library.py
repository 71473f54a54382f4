"""``torch.library`` wiring shared by the kernel backends (``triton`` and ``native``).

Each backend provides the four kernel ops of ``csrc/vapt.cpp`` in its own namespace
(``vapt_triton`` through ``torch.library.custom_op``, ``vapt`` through ``TORCH_LIBRARY``):

* ``norm_and_project_fwd(x, norm1_weight, norm1_bias, eps1, gen_weight, gen_bias, eps_g, mix,
  num_prefix) -> (h, g, mean, rstd1, rstd_g)`` and its ``_bwd``;
* ``prefix_attention_fwd(q, k, v, k_prefix, v_prefix, scale) -> (out, lse)`` and its ``_bwd``.

This module gives every namespace the same fake (meta) implementations, so ``torch.compile`` traces
the ops without running them, and the same autograd formulas (the forward op saves the row
statistics or the log-sum-exp; the backward op consumes them). :class:`KernelOps` is the Python
entry point of one backend: it brings its inputs into the layout and dtypes the kernels take
(contiguous ``x``, weights in ``x``'s dtype, ``mix`` in the statistics dtype, one dtype for the
attention inputs, unit last strides) and returns what :mod:`vapt_kernels.ops` promises.
"""

from __future__ import annotations

from typing import Optional

import torch

NORM_AND_PROJECT_FWD = "norm_and_project_fwd"
NORM_AND_PROJECT_BWD = "norm_and_project_bwd"
PREFIX_ATTENTION_FWD = "prefix_attention_fwd"
PREFIX_ATTENTION_BWD = "prefix_attention_bwd"
OP_NAMES = (NORM_AND_PROJECT_FWD, NORM_AND_PROJECT_BWD, PREFIX_ATTENTION_FWD, PREFIX_ATTENTION_BWD)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation and statistics dtype of the kernels: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _token_major(batch: int, heads: int, tokens: int, dim: int, like: torch.Tensor) -> torch.Tensor:
    """An empty ``(B, H, T, D)`` tensor laid out as ``(B, T, H, D)`` (attention output layout)."""
    return like.new_empty(batch, tokens, heads, dim).transpose(1, 2)


# --------------------------------------------------------------------------------------------
# fakes: output metadata only (shapes, dtypes, strides exactly as the kernels allocate them)
# --------------------------------------------------------------------------------------------


def _norm_and_project_fwd_fake(x, norm1_weight, norm1_bias, eps1, gen_weight, gen_bias, eps_g, mix, num_prefix):
    B, T, d = x.shape
    stats = stats_dtype(x.dtype)
    row_stats = [x.new_empty(B, T, dtype=stats) for _ in range(3)]
    return (x.new_empty(B, T, d), x.new_empty(B, mix.shape[0], d), *row_stats)


def _norm_and_project_bwd_fake(dh, dg, x, norm1_weight, gen_weight, gen_bias, mix, mean, rstd1, rstd_g, num_prefix):
    d = x.shape[-1]
    stats = stats_dtype(x.dtype)
    affine = [x.new_empty(d, dtype=stats) for _ in range(4)]
    return (torch.empty_like(x, memory_format=torch.contiguous_format), *affine, mix.new_empty(mix.shape, dtype=stats))


def _prefix_attention_fwd_fake(q, k, v, k_prefix, v_prefix, scale):
    B, H, T, D = q.shape
    return _token_major(B, H, T, D, q), q.new_empty(B, H, T, dtype=stats_dtype(q.dtype))


def _prefix_attention_bwd_fake(dout, q, k, v, k_prefix, v_prefix, out, lse, scale):
    B, H, T, D = q.shape
    Tk = k.shape[2]
    return (
        _token_major(B, H, T, D, q),
        _token_major(B, H, Tk, D, q),
        _token_major(B, H, Tk, D, q),
        k_prefix.new_empty(k_prefix.shape),
        v_prefix.new_empty(v_prefix.shape),
    )


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------


def _zeros_if_none(grad: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad.contiguous()


def _autograd_rules(namespace: str):
    """``(setup_context, backward)`` pairs for the two forward ops of ``namespace``."""
    ops = getattr(torch.ops, namespace)

    def nap_setup(ctx, inputs, output):
        x, w1, _b1, _eps1, wg, bg, _eps_g, mix, num_prefix = inputs
        _h, _g, mean, rstd1, rstd_g = output
        ctx.save_for_backward(x, w1, wg, bg, mix, mean, rstd1, rstd_g)
        ctx.num_prefix = num_prefix
        ctx.mark_non_differentiable(mean, rstd1, rstd_g)

    def nap_backward(ctx, dh, dg, _dmean, _drstd1, _drstd_g):
        x, w1, wg, bg, mix, mean, rstd1, rstd_g = ctx.saved_tensors
        dh = _zeros_if_none(dh, x)
        dg = _zeros_if_none(dg, x.new_empty(x.shape[0], mix.shape[0], x.shape[-1]))
        dx, dw1, db1, dwg, dbg, dmix = ops.norm_and_project_bwd(
            dh, dg, x, w1, wg, bg, mix, mean, rstd1, rstd_g, ctx.num_prefix
        )
        need = ctx.needs_input_grad
        return (
            dx if need[0] else None,
            dw1.to(x.dtype) if need[1] else None,
            db1.to(x.dtype) if need[2] else None,
            None,
            dwg.to(x.dtype) if need[4] else None,
            dbg.to(x.dtype) if need[5] else None,
            None,
            dmix.to(mix.dtype) if need[7] else None,
            None,
        )

    def pa_setup(ctx, inputs, output):
        q, k, v, k_prefix, v_prefix, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, k_prefix, v_prefix, out, lse)
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)

    def pa_backward(ctx, dout, _dlse):
        q, k, v, k_prefix, v_prefix, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        elif dout.stride(-1) != 1:
            dout = dout.contiguous()
        dq, dk, dv, dkp, dvp = ops.prefix_attention_bwd(dout, q, k, v, k_prefix, v_prefix, out, lse, ctx.scale)
        return dq, dk, dv, dkp, dvp, None

    return (nap_setup, nap_backward), (pa_setup, pa_backward)


def register_fakes_and_autograd(namespace: str) -> None:
    """Register the fakes and autograd rules for the four ops of ``namespace`` (once per process)."""
    qualified = {name: f"{namespace}::{name}" for name in OP_NAMES}
    torch.library.register_fake(qualified[NORM_AND_PROJECT_FWD], _norm_and_project_fwd_fake)
    torch.library.register_fake(qualified[NORM_AND_PROJECT_BWD], _norm_and_project_bwd_fake)
    torch.library.register_fake(qualified[PREFIX_ATTENTION_FWD], _prefix_attention_fwd_fake)
    torch.library.register_fake(qualified[PREFIX_ATTENTION_BWD], _prefix_attention_bwd_fake)
    (nap_setup, nap_backward), (pa_setup, pa_backward) = _autograd_rules(namespace)
    torch.library.register_autograd(qualified[NORM_AND_PROJECT_FWD], nap_backward, setup_context=nap_setup)
    torch.library.register_autograd(qualified[PREFIX_ATTENTION_FWD], pa_backward, setup_context=pa_setup)


# --------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _attention_dtype(tensors: tuple[torch.Tensor, ...]) -> torch.dtype:
    """One dtype for all attention inputs: the autocast dtype when autocast is on (as SDPA would
    run), else the promotion of the inputs' dtypes (qk-norm may return float32 next to bfloat16)."""
    device_type = tensors[0].device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


class KernelOps:
    """The two VAPT ops of one kernel backend (ops registered in ``namespace``).

    Args:
        namespace: ``torch.ops`` namespace holding the four kernel ops.
        name: backend name for error messages.
        dtypes: input dtypes the kernels take, per device type (``"cpu"``, ``"cuda"``).
    """

    def __init__(self, namespace: str, name: str, dtypes: dict[str, tuple[torch.dtype, ...]]):
        self.name = name
        self.dtypes = dtypes
        self._ops = getattr(torch.ops, namespace)

    def _check_dtype(self, op: str, t: torch.Tensor, dtype: torch.dtype) -> None:
        allowed = self.dtypes.get(t.device.type, ())
        if dtype not in allowed:
            names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
            raise TypeError(
                f"{op}: backend {self.name!r} takes {names} inputs on {t.device.type}, got "
                f"{str(dtype).removeprefix('torch.')}; convert the model or use backend='torch'"
            )

    def norm_and_project(self, x, norm1_weight, norm1_bias, eps1, gen_weight, gen_bias, eps_g, mix, num_prefix):
        """See :func:`vapt_kernels.ops.composite.norm_and_project`."""
        self._check_dtype("norm_and_project", x, x.dtype)

        def cast(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.to(x.dtype)

        h, g, _, _, _ = self._ops.norm_and_project_fwd(
            x.contiguous(),
            cast(norm1_weight),
            cast(norm1_bias),
            float(eps1),
            cast(gen_weight),
            cast(gen_bias),
            float(eps_g),
            mix.to(stats_dtype(x.dtype)).contiguous(),
            int(num_prefix),
        )
        return h, g

    def prefix_attention(self, q, k, v, k_prefix, v_prefix, scale):
        """See :func:`vapt_kernels.ops.composite.prefix_attention`; the output is laid out as
        ``(B, T, H, D)`` so that merging the heads back is free."""
        tensors = (q, k, v, k_prefix, v_prefix)
        dtype = _attention_dtype(tensors)
        self._check_dtype("prefix_attention", q, dtype)
        q, k, v, k_prefix, v_prefix = (_unit_last_stride(t.to(dtype)) for t in tensors)
        out, _ = self._ops.prefix_attention_fwd(q, k, v, k_prefix, v_prefix, float(scale))
        return out
