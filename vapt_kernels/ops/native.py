"""Native backend: loads the compiled extension ``vapt_kernels._C`` (``csrc/``), whose
``TORCH_LIBRARY(vapt)`` defines the four kernel ops with C++ kernels for CPU tensors and, when built
with a CUDA toolkit, CUDA kernels for GPU tensors. Their contract, fakes, vmap rules and autograd
come from :mod:`vapt_kernels.ops.library`, shared with the other backends.

Loading is defensive: when the extension is missing (a ``VAPT_SKIP_EXTENSION=1`` install, a build
without a compiler) or fails to load (built against another torch), the package and its other
backends keep working and :data:`LOAD_ERROR` says why.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from pathlib import Path
from typing import Optional

import torch

from . import library

NAMESPACE = "vapt"
# Written by setup.py next to the extension and installed with it (see build_info).
BUILD_INFO = Path(__file__).resolve().parent.parent / "_build_info.json"
_log = logging.getLogger(__name__)


def _load() -> Optional[str]:
    """Load the extension's shared library; None on success, else the reason it is unusable."""
    spec = importlib.util.find_spec("vapt_kernels._C")
    if spec is None or spec.origin is None:
        return (
            "the compiled extension vapt_kernels._C is not installed (pure-Python install or a failed build); "
            "reinstall with `pip install --no-build-isolation .` and torch already installed"
        )
    try:
        torch.ops.load_library(spec.origin)
    except (OSError, RuntimeError) as error:
        return (
            f"the compiled extension {spec.origin} failed to load ({error}); it was probably built against "
            f"another torch than {torch.__version__}: rebuild it"
        )
    missing = [name for name in library.OP_NAMES if not hasattr(getattr(torch.ops, NAMESPACE), name)]
    if missing:
        return f"the compiled extension {spec.origin} lacks the ops {', '.join(missing)}: rebuild it"
    return None


def build_info() -> dict:
    """How the extension was built, as ``setup.py`` recorded it in :data:`BUILD_INFO`: once the
    extension is built, ``"built": True``, the binary's file name (``binary``) and SHA-256
    (``sha256``) and the configuration (``cuda``, ``cuda_home``, ``arch_list``, ``torch``, ...);
    ``{"built": False, "reason": ...}`` when the installation was built without the extension or
    its last build failed; ``{}`` when there is no record. A record without ``built`` is from an
    older ``setup.py``, which wrote the configuration alone."""
    try:
        return json.loads(BUILD_INFO.read_text())
    except (OSError, ValueError):
        return {}


def build_info_mismatch(binary: Path) -> Optional[str]:
    """Why the record of :func:`build_info` does not describe ``binary`` (the extension file found),
    or None when it does, or has no hash to tell (a record of an older ``setup.py``)."""
    info = build_info()
    if not info:
        return f"there is no build record ({BUILD_INFO} is missing)"
    if info.get("built") is False:
        return (
            "the last build recorded did not produce it (the record says the extension was not built), so it "
            "is left from an earlier build: delete it or rebuild the extension"
        )
    recorded = info.get("sha256")
    if recorded is not None and recorded != hashlib.sha256(binary.read_bytes()).hexdigest():
        return "its SHA-256 is not the recorded one, so the record describes another build: rebuild the extension"
    return None


def has_device_kernels(device_type: str) -> bool:
    """Whether the loaded extension registered kernels for ``device_type`` (``"cpu"``, ``"cuda"``)."""
    if LOAD_ERROR is not None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{name}", key) for name in library.OP_NAMES
    )


LOAD_ERROR: Optional[str] = _load()
if LOAD_ERROR is None:
    library.register_kernel_ops(NAMESPACE, "native")
else:
    _log.info("vapt_kernels native backend unavailable: %s", LOAD_ERROR)
