"""What both Triton kernel files share: the interpreter flag, its bfloat16 rounding, its loop bounds
under Triton 3.6, the launch's device guard."""

from __future__ import annotations

import contextlib
import operator
import re

import torch
import triton
import triton.language as tl


@triton.jit
def round_to_bfloat16(x):
    """float32 ``x`` rounded to the nearest bfloat16 (ties to even), still as float32. The
    interpreter converts float32 to bfloat16 by truncation (the GPU rounds to nearest); converting
    a value rounded here is exact, so interpreted stores round as compiled ones do."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    return tl.where(x == x, bits.to(tl.float32, bitcast=True), x)  # NaN kept as it is


# Whether the kernels run in Triton's interpreter: with TRITON_INTERPRET=1 set before this import,
# @triton.jit returns interpreter functions instead of JITFunctions. Fixed from here on.
INTERPRETED = not isinstance(round_to_bfloat16, triton.runtime.JITFunction)


def _interpreter_index_fix() -> None:
    """Lets runtime values bound loops in Triton 3.6's interpreter under NumPy 2.4.

    The interpreter holds every scalar of a kernel (a runtime argument, ``program_id``, the
    ``tl.load`` of one address) as a one-element 1-D array, and during a launch gives its tensors
    ``__index__`` as ``int()`` of that array. NumPy 2.4 no longer converts arrays of more than zero
    dimensions with ``int()`` ("only 0-dimensional arrays can be converted to Python scalars"), so
    every loop over a runtime bound (``for n0 in range(0, N, BLOCK_N)``) stops the kernel. Triton
    3.7's interpreter takes the one element instead; for older versions, each launch's patching of
    the tensor class (``triton.runtime.interpreter._patch_lang_tensor``, whose scope undoes it after
    the launch) is followed here by an ``__index__`` that does the same. Compiled kernels never use
    this attribute; the interpreter's own code is left as it is when it lacks that function."""
    from triton.runtime import interpreter

    patch_lang_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_lang_tensor is None or getattr(patch_lang_tensor, "indexes_one_element", False):
        return

    def patch_with_index(tensor, scope):
        patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: operator.index(self.handle.data.item()))

    patch_with_index.indexes_one_element = True
    interpreter._patch_lang_tensor = patch_with_index


_TRITON_VERSION = tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", triton.__version__).groups())
if INTERPRETED and _TRITON_VERSION < (3, 7):
    _interpreter_index_fix()


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Makes ``t``'s GPU the current one (Triton launches on the current device and stream)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
