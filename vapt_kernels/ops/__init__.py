"""The two VAPT ops and backend dispatch.

* ``norm_and_project``: the block's LayerNorm of every token and the folded prompt projection
  ``mix @ LN_g(patches)`` from one input (DESIGN §2.2-2.3).
* ``prefix_attention``: token queries over prompt keys/values prepended to the token ones
  (DESIGN §2.1).

Backends: a block on ``reference`` runs the literal official formulation (see
:mod:`vapt_kernels.reference`) and never calls these ops; at op level ``reference`` names the plain
unfused versions (the oracle of the op tests). ``torch`` is the composite path; ``auto`` picks the
best backend available for the device.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import composite

BACKENDS = ("auto", "reference", "torch")

# Concrete backend -> op implementation. At op level `reference` is the plain, unfused version.
_NORM_AND_PROJECT = {"reference": composite.norm_and_project_reference, "torch": composite.norm_and_project}
_PREFIX_ATTENTION = {"reference": composite.prefix_attention_reference, "torch": composite.prefix_attention}


def available_backends() -> dict[str, Optional[str]]:
    """Each concrete backend mapped to None when it can run here, or to the reason it cannot."""
    return {"reference": None, "torch": None}


def resolve_backend(backend: str) -> str:
    """Validate a backend name and turn ``auto`` into the concrete backend it stands for.

    Raises:
        ValueError: unknown name. RuntimeError: a known backend that cannot run here.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown VAPT backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "torch"
    reason = available_backends()[backend]
    if reason is not None:
        raise RuntimeError(f"VAPT backend {backend!r} is not available: {reason}")
    return backend


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
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`vapt_kernels.ops.composite.norm_and_project` for shapes; ``backend`` selects the kernel."""
    return _NORM_AND_PROJECT[backend](x, norm1_weight, norm1_bias, eps1, gen_weight, gen_bias, eps_g, mix, num_prefix)


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    scale: float,
    backend: str = "torch",
) -> torch.Tensor:
    """See :func:`vapt_kernels.ops.composite.prefix_attention` for shapes; ``backend`` selects the kernel."""
    return _PREFIX_ATTENTION[backend](q, k, v, k_prefix, v_prefix, scale)
