"""What the self-check (``vapt-check``), the benchmark and the test suite share to judge a result:
the relative error against an exact answer, and allocations poisoned with NaN so that an output a
kernel leaves partly unwritten cannot pass a comparison."""

from __future__ import annotations

import contextlib
import warnings

import torch


def max_rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-6) -> float:
    """``max |a - b| / max(max |b|, floor)``, with ``b`` the exact answer.

    The floor only matters for quantities that are exactly zero in exact arithmetic (for example
    the gradient of a bias that a LayerNorm removes): there both sides are rounding noise
    (~1e-19), and the error is judged against ``floor`` instead of against zero.
    """
    if a.numel() == 0:
        return 0.0
    return (a.detach().to(b.device, b.dtype) - b).abs().max().item() / max(b.abs().max().item(), floor)


@contextlib.contextmanager
def poisoned_allocations():
    """Fresh allocations (``torch.empty``, ``at::empty``) filled with NaN, so an output a kernel
    leaves partly unwritten fails the comparison."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    fill = torch.utils.deterministic.fill_uninitialized_memory
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deterministic mode warns about nondeterministic ops; harmless here
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = True
        try:
            yield
        finally:
            torch.utils.deterministic.fill_uninitialized_memory = fill
            torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
