"""The two VAPT ops and backend dispatch.

* ``norm_and_project``: the block's LayerNorm of every token and the folded prompt projection
  ``mix @ LN_g(patches)`` from one input (docs/design.md §1.3-1.4).
* ``prefix_attention``: token queries over prompt keys/values prepended to the token ones
  (docs/design.md §1.2).

What each op takes on each backend is its contract (:mod:`.library`), checked before any kernel
runs. Backends:

* ``reference``: the plain unfused formulations (:mod:`.composite`, autograd does the backward).
* ``torch``: composite PyTorch (:mod:`.composite`) with a hand-written ``norm_and_project``
  backward; takes every floating dtype on every device.
* ``triton``: fused Triton kernels (:mod:`.triton`) on CUDA tensors; on CPU tensors only under
  Triton's interpreter (``TRITON_INTERPRET=1`` set before the kernels are first imported), which
  is for tests.
* ``native``: the compiled extension (:mod:`.native`, ``csrc/``): C++ kernels for CPU tensors, CUDA
  kernels for GPU tensors when it was built with a CUDA toolkit.
* ``auto``: per call, the first backend of :data:`AUTO_PREFERENCE` for the op and the tensors'
  device that can run here and whose contract accepts the inputs (dtype, head dim, ...); ``torch`` accepts
  every floating input, so ``auto`` fails only on inputs no backend takes.

An explicitly requested backend is checked twice: when it is set on a model
(:func:`resolve_backend`: can it run on this machine at all?) and on every call (can it run on
these tensors?), each time with an error that says what to do.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Optional

import torch

from . import composite, library

BACKENDS = ("auto", "reference", "torch", "triton", "native")
KERNEL_BACKENDS = ("native", "triton")

# Op -> device type -> concrete backends `auto` tries, fastest first. CPU: measured (README,
# Benchmark). CUDA: an expectation until a GPU has measured every candidate per op
# (benchmarks/gpu_check.sh): attention goes to the torch backend, which there is PyTorch's flash
# SDPA over the concatenated keys (a FlashAttention-2-class kernel), and norm_and_project to Triton.
AUTO_PREFERENCE = {
    "norm_and_project": {"cuda": ("triton", "native", "torch"), "cpu": ("native", "torch")},
    "prefix_attention": {"cuda": ("torch",), "cpu": ("native", "torch")},
}


def _triton_interpreted() -> bool:
    """Whether the Triton kernels run in Triton's interpreter: fixed when they are first imported
    (``@triton.jit`` reads ``TRITON_INTERPRET`` then), so a later change of the variable does not
    count. Triton's own ``@triton.jit`` functions (``tl.cdiv``, ...), which the kernels call, are
    fixed when Triton is imported (timm imports it), and kernels interpreted while those are compiled
    fail. Before either import the variable decides."""
    if "triton" in library.KERNELS:  # the backend has imported its kernels and registered them
        from .triton import common

        return common.INTERPRETED
    triton = sys.modules.get("triton")
    if triton is not None and hasattr(triton, "language"):
        return not isinstance(triton.language.standard.cdiv, triton.runtime.JITFunction)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_reason(device_type: Optional[str] = None) -> Optional[str]:
    """Why the Triton backend cannot run (on ``device_type``, or on this machine at all), or None."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed: pip install 'vapt_kernels[triton]' (needs a CUDA GPU)"
    if device_type not in (None, "cpu", "cuda"):
        return f"the Triton backend runs on CUDA tensors, not {device_type}"
    on_cpu = (
        "on CPU tensors it needs Triton's interpreter: set TRITON_INTERPRET=1 before the Triton backend is "
        "first used (slow; for tests), or use backend='torch' or 'native'"
    )
    if _triton_interpreted() or (device_type == "cuda" or (device_type is None and torch.cuda.is_available())):
        return None
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return (
            "TRITON_INTERPRET=1 was set after Triton had been imported for the GPU; set it before "
            "importing vapt_kernels, timm or triton"
        )
    return ("the Triton backend runs on CUDA tensors; " if device_type == "cpu" else "no CUDA device; ") + on_cpu


def _native_reason(device_type: Optional[str] = None) -> Optional[str]:
    """Why the native backend cannot run (on ``device_type``, or at all), or None."""
    from . import native

    if native.LOAD_ERROR is not None:
        return native.LOAD_ERROR
    if device_type is not None and not native.has_device_kernels(device_type):
        if device_type == "cuda":
            return (
                "the compiled extension was built without CUDA kernels (no CUDA toolkit at build time); "
                "rebuild it with one, e.g. `FORCE_CUDA=1 pip install --no-build-isolation .`"
            )
        return f"the compiled extension has no kernels for {device_type} tensors"
    return None


@torch.compiler.assume_constant_result  # torch.compile asks once, while tracing
def unavailable_reason(backend: str, device_type: Optional[str] = None) -> Optional[str]:
    """Why ``backend`` cannot run on ``device_type`` tensors (or on this machine at all), or None."""
    if backend == "triton":
        return _triton_reason(device_type)
    if backend == "native":
        return _native_reason(device_type)
    return None


def available_backends() -> dict[str, Optional[str]]:
    """Each concrete backend mapped to None when it can run on this machine, or to the reason it
    cannot (``triton`` needs a CUDA GPU or the interpreter; ``native`` the compiled extension)."""
    return {name: unavailable_reason(name) for name in BACKENDS if name != "auto"}


def resolve_backend(backend: str) -> str:
    """Validate a backend name for a model; explicit backends must be able to run on this machine.

    ``auto`` stays ``auto``: it is resolved per call, from the tensors.

    Raises:
        ValueError: unknown name. RuntimeError: a known backend that cannot run here.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown VAPT backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        reason = unavailable_reason(backend)
        if reason is not None:
            raise RuntimeError(f"VAPT backend {backend!r} is not available: {reason}")
    return backend


def _load(backend: str) -> None:
    """Import a kernel backend's module, which registers its kernel ops (once)."""
    if backend not in library.KERNELS:
        importlib.import_module(f".{backend}", __name__)


def _auto(op: str, device_type: str, rules) -> str:
    """``auto``'s pick for ``op``: the first preferred backend that can run on ``device_type`` and
    whose contract accepts the inputs (``rules(candidate)``); else ``torch``."""
    for candidate in AUTO_PREFERENCE[op].get(device_type, ()):
        if unavailable_reason(candidate, device_type) is None and library.violation(rules(candidate)) is None:
            return candidate
    return "torch"


def _select(op: str, backend: str, device_type: str, rules) -> str:
    """The concrete backend to run ``op``: ``backend`` itself after checking that it can run on
    these inputs (raising what it cannot), or ``auto``'s pick."""
    if backend == "auto":
        backend = _auto(op, device_type, rules)
    elif backend not in BACKENDS:
        raise ValueError(f"unknown VAPT backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    reason = unavailable_reason(backend, device_type)
    if reason is not None:
        raise RuntimeError(f"VAPT backend {backend!r} cannot run on {device_type} tensors: {reason}")
    library.check(rules(backend))
    return backend


def auto_backend(
    device: str | torch.device, dtype: torch.dtype = torch.float32, head_dim: int = 64, op: str = "prefix_attention"
) -> str:
    """The backend ``auto`` runs ``op`` as on ``device`` inputs of ``dtype`` (``prefix_attention``
    with ``head_dim``; ``norm_and_project`` on a ViT-sized input, whose rules have no head dim)."""
    if op not in AUTO_PREFERENCE:
        raise ValueError(f"unknown VAPT op {op!r}; choose one of {', '.join(AUTO_PREFERENCE)}")
    device = torch.device(device)
    if op == "prefix_attention":
        q = torch.zeros(1, 1, 2, head_dim, device=device, dtype=dtype)

        def rules(candidate: str):
            return library.prefix_attention_rules(q, q, q, q, q, 1.0, dtype, candidate)

    else:
        x = torch.zeros(1, 2, 8, device=device, dtype=dtype)
        mix = torch.zeros(1, 1, device=device, dtype=dtype)

        def rules(candidate: str):
            return library.norm_and_project_rules(x, None, None, None, None, mix, 1, candidate)

    return _auto(op, device.type, rules)


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
    task: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = LN_1(x)`` and ``g = mix @ LN_g(x[:, num_prefix:])``.

    Args:
        x: block input ``(B, T, d)``.
        norm1_weight, norm1_bias, eps1: the block's own LayerNorm (weight/bias may be None).
        gen_weight, gen_bias, eps_g: the prompt LayerNorm, ``(d,)``.
        mix: folded matrix ``(Np, N)``, or ``(Np, N, d)`` for per-channel kernels, ``N = T - P``.
        num_prefix: prefix tokens ``P`` (excluded from the prompt projection: the prompts depend
            on the patch tokens only).
        backend: see the module docstring.
        task: many tasks on one backbone: the int64 ``(B,)`` task index of each image, in
            ``[0, K)``. The prompt parameters are then stacked per task: ``mix (K, Np, N)`` or
            ``(K, Np, N, d)``, ``gen_weight``/``gen_bias (K, d)``, and image ``b`` is projected with
            task ``task[b]``'s (the kernels index them; nothing per image is copied). Their
            gradients are summed over each task's own images.

    Returns:
        ``h (B, T, d)`` and ``g (B, Np, d)`` in x's dtype (no bias, no dropout mask).
    """

    def rules(candidate: str):
        return library.norm_and_project_rules(
            x, norm1_weight, norm1_bias, gen_weight, gen_bias, mix, num_prefix, candidate, task
        )

    chosen = _select("norm_and_project", backend, x.device.type, rules)
    if task is not None:
        library.check_task_range(task, mix.shape[0])
    args = (x, norm1_weight, norm1_bias, eps1, gen_weight, gen_bias, eps_g, mix, num_prefix, task)
    if chosen == "reference":
        return composite.norm_and_project_reference(*args)
    _load(chosen)
    return library.norm_and_project(chosen, *args)


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    scale: float,
    backend: str = "torch",
) -> torch.Tensor:
    """Softmax attention of ``q`` over the keys/values ``[k_prefix ; k]``, ``[v_prefix ; v]``.

    Args:
        q, k, v: ``(B, H, T, D)``, any strides.
        k_prefix, v_prefix: ``(B or 1, H, Np, D)``; batch 1 is broadcast (static prompts).
        scale: softmax scale (``D ** -0.5`` in timm).
        backend: see the module docstring.

    Returns:
        ``(B, H, T, D)``. A query row holding a NaN gives a NaN output row on every backend (the
        plain formulation's answer); the other rows are unaffected.
    """
    dtype = library.attention_dtype(q, k, v, k_prefix, v_prefix)

    def rules(candidate: str):
        return library.prefix_attention_rules(q, k, v, k_prefix, v_prefix, scale, dtype, candidate)

    chosen = _select("prefix_attention", backend, q.device.type, rules)
    if chosen == "reference":
        return composite.prefix_attention_reference(q, k, v, k_prefix, v_prefix, scale)
    if chosen == "torch" and q.device.type != "cpu":
        return composite.prefix_attention(q, k, v, k_prefix, v_prefix, scale)
    _load(chosen)
    return library.prefix_attention(chosen, dtype, q, k, v, k_prefix, v_prefix, scale)
