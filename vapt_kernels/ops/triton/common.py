"""What both Triton kernel files share: the interpreter flag, its bfloat16 rounding, the launch's
device guard."""

from __future__ import annotations

import contextlib

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


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Makes ``t``'s GPU the current one (Triton launches on the current device and stream)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
