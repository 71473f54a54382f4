"""Triton backend: the four kernel ops as opaque ``torch.library.custom_op``s in the ``vapt_triton``
namespace, each launching the Triton kernels of its op's file (``norm_and_project.py``,
``prefix_attention.py``: kernels and launchers; ``common.py``: what both share). Their contract,
fakes, vmap rules and autograd come from :mod:`vapt_kernels.ops.library`, shared with the other
backends. The kernels' design: docs/design.md §2.2.

Importing this package imports Triton; :mod:`vapt_kernels.ops` does so only when the backend is
first used. On CPU tensors the kernels run only under Triton's interpreter (``TRITON_INTERPRET=1``
set before this import), which is for tests.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import library
from .norm_and_project import norm_and_project_backward, norm_and_project_forward
from .prefix_attention import prefix_attention_backward, prefix_attention_forward

NAMESPACE = "vapt_triton"


@torch.library.custom_op(f"{NAMESPACE}::{library.NORM_AND_PROJECT_FWD}", mutates_args=())
def norm_and_project_fwd(
    x: Tensor,
    norm1_weight: Optional[Tensor],
    norm1_bias: Optional[Tensor],
    eps1: float,
    gen_weight: Optional[Tensor],
    gen_bias: Optional[Tensor],
    eps_g: float,
    mix: Tensor,
    num_prefix: int,
    task: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return norm_and_project_forward(
        x, norm1_weight, norm1_bias, eps1, gen_weight, gen_bias, eps_g, mix, num_prefix, task
    )


@torch.library.custom_op(f"{NAMESPACE}::{library.NORM_AND_PROJECT_BWD}", mutates_args=())
def norm_and_project_bwd(
    dh: Tensor,
    dg: Tensor,
    x: Tensor,
    norm1_weight: Optional[Tensor],
    gen_weight: Optional[Tensor],
    gen_bias: Optional[Tensor],
    mix: Tensor,
    mean: Tensor,
    rstd1: Tensor,
    rstd_g: Tensor,
    num_prefix: int,
    task: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return norm_and_project_backward(
        dh, dg, x, norm1_weight, gen_weight, gen_bias, mix, mean, rstd1, rstd_g, num_prefix, task
    )


@torch.library.custom_op(f"{NAMESPACE}::{library.PREFIX_ATTENTION_FWD}", mutates_args=())
def prefix_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, k_prefix: Tensor, v_prefix: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    return prefix_attention_forward(q, k, v, k_prefix, v_prefix, scale)


@torch.library.custom_op(f"{NAMESPACE}::{library.PREFIX_ATTENTION_BWD}", mutates_args=())
def prefix_attention_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_prefix: Tensor,
    v_prefix: Tensor,
    out: Tensor,
    lse: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return prefix_attention_backward(dout, q, k, v, k_prefix, v_prefix, out, lse, scale)


library.register_kernel_ops(NAMESPACE, "triton")
