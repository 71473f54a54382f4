"""The two VAPT ops and backend dispatch.

* ``norm_and_project``: the block's LayerNorm of every token and the folded prompt projection
  ``mix @ LN_g(patches)`` from one input (DESIGN §2.2-2.3).
* ``prefix_attention``: token queries over prompt keys/values prepended to the token ones
  (DESIGN §2.1).

Backends:

* ``reference``: a block runs the literal official formulation (:mod:`vapt_kernels.reference`) and
  never calls these ops; at op level it names the plain unfused versions (the op tests' oracle).
* ``torch``: composite PyTorch (:mod:`.composite`), runs anywhere.
* ``triton``: fused Triton kernels (:mod:`.triton`) on CUDA tensors; on CPU tensors only under
  Triton's interpreter (``TRITON_INTERPRET=1`` set before the first use), which is for tests.
* ``native``: the compiled extension (:mod:`.native`, ``csrc/``): C++ kernels for CPU tensors, CUDA
  kernels for GPU tensors when it was built with a CUDA toolkit.
* ``auto``: chosen per call from the tensors' device, among the backends that can run there, in the
  order of :data:`AUTO_PREFERENCE` (decided by the benchmarks, see the README). Never fails.

An explicitly requested backend is checked twice: when it is set on a model
(:func:`resolve_backend`: is it installed at all?) and when a tensor reaches it (can it run on that
device and dtype?), each time with an error that says what to do.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable, NamedTuple, Optional

import torch

from . import composite

BACKENDS = ("auto", "reference", "torch", "triton", "native")

# Device type -> concrete backends `auto` tries, fastest first (by the benchmarks in the README).
AUTO_PREFERENCE = {"cuda": ("triton", "native", "torch"), "cpu": ("native", "torch")}

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# Kernel backend -> device type -> the input dtypes its kernels take.
KERNEL_DTYPES = {
    "triton": {"cuda": _FLOATS, "cpu": _FLOATS},
    "native": {"cpu": (torch.float64, torch.float32, torch.bfloat16), "cuda": _FLOATS},
}


class _Impl(NamedTuple):
    norm_and_project: Callable
    prefix_attention: Callable


_COMPOSITE = {
    "reference": _Impl(composite.norm_and_project_reference, composite.prefix_attention_reference),
    "torch": _Impl(composite.norm_and_project, composite.prefix_attention),
}
# (backend, device type) -> implementation, or the error message saying why it cannot run there.
_RESOLVED: dict[tuple[str, str], _Impl | str] = {}


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_reason(device_type: Optional[str] = None) -> Optional[str]:
    """Why the Triton backend cannot run (on ``device_type``, or on this machine at all), or None."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed: pip install 'vapt_kernels[triton]' (needs a CUDA GPU)"
    on_cpu = (
        "on CPU tensors it needs Triton's interpreter: set TRITON_INTERPRET=1 before importing vapt_kernels "
        "(slow; for tests), or use backend='torch' or 'native'"
    )
    if device_type == "cpu" and not _triton_interpreting():
        return "the Triton backend runs on CUDA tensors; " + on_cpu
    if device_type is None and not torch.cuda.is_available() and not _triton_interpreting():
        return "no CUDA device; " + on_cpu
    if device_type not in (None, "cpu", "cuda"):
        return f"the Triton backend runs on CUDA tensors, not {device_type}"
    return None


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
    return native.cpu_unsupported_reason() if device_type == "cpu" else None


def _reason(backend: str, device_type: Optional[str] = None) -> Optional[str]:
    if backend == "triton":
        return _triton_reason(device_type)
    if backend == "native":
        return _native_reason(device_type)
    return None


def available_backends() -> dict[str, Optional[str]]:
    """Each concrete backend mapped to None when it can run on this machine, or to the reason it
    cannot (``triton`` needs a CUDA GPU or the interpreter; ``native`` the compiled extension)."""
    return {name: _reason(name) for name in BACKENDS if name != "auto"}


def resolve_backend(backend: str) -> str:
    """Validate a backend name for a model; explicit backends must be able to run on this machine.

    ``auto`` stays ``auto``: it is resolved per call, from the device of the tensors.

    Raises:
        ValueError: unknown name. RuntimeError: a known backend that cannot run here.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown VAPT backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        reason = _reason(backend)
        if reason is not None:
            raise RuntimeError(f"VAPT backend {backend!r} is not available: {reason}")
    return backend


def backend_for(backend: str, device_type: str) -> str:
    """The concrete backend that ``backend`` runs as on ``device_type`` tensors."""
    if backend != "auto":
        return backend
    for candidate in AUTO_PREFERENCE.get(device_type, ("torch",)):
        if _reason(candidate, device_type) is None:
            return candidate
    return "torch"


def _implementation(backend: str, device_type: str) -> _Impl:
    key = (backend, device_type)
    impl = _RESOLVED.get(key)
    if impl is None:
        impl = _resolve(backend, device_type)
        _RESOLVED[key] = impl
    if isinstance(impl, str):
        raise RuntimeError(impl)
    return impl


def _resolve(backend: str, device_type: str) -> _Impl | str:
    concrete = backend_for(backend, device_type)
    if concrete in _COMPOSITE:
        return _COMPOSITE[concrete]
    reason = _reason(concrete, device_type)
    if reason is not None:
        return f"VAPT backend {concrete!r} cannot run on {device_type} tensors: {reason}"
    if concrete == "triton":
        from .triton import OPS
    else:
        from .native import OPS
    return _Impl(OPS.norm_and_project, OPS.prefix_attention)


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
    impl = _implementation(backend, x.device.type)
    return impl.norm_and_project(x, norm1_weight, norm1_bias, eps1, gen_weight, gen_bias, eps_g, mix, num_prefix)


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
    impl = _implementation(backend, q.device.type)
    return impl.prefix_attention(q, k, v, k_prefix, v_prefix, scale)
