"""The CUDA prefix attention kernels (``csrc/cuda/prefix_attention_kernels.cuh``), run on the CPU
through the host emulation of the CUDA execution model (``csrc/emulation/cuda_host.h``): the
same kernel text that nvcc compiles, built by g++ with AddressSanitizer and UBSan into a small
driver (``csrc/emulation/prefix_attention_driver.cpp``) that exchanges tensors with this file
through binary files.

The driver is built once per source hash into the temporary directory and reused. Tolerances:
fp32 at the op suite's 1e-5; fp16/bf16 as the op suite judges low precision, no worse than twice
the plain formulation computed in that dtype (both against float64 of the same rounded inputs):
the kernels round P and dS to the input dtype before their products, as the plain formulation
rounds its softmax and products, so the errors are of the same size.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from torch.utils import cpp_extension

from vapt_kernels.ops import composite

ROOT = Path(__file__).resolve().parents[1]
DRIVER_SOURCE = ROOT / "csrc" / "emulation" / "prefix_attention_driver.cpp"
SOURCES = [
    DRIVER_SOURCE,
    ROOT / "csrc" / "emulation" / "cuda_host.h",
    ROOT / "csrc" / "cuda" / "common.cuh",
    ROOT / "csrc" / "cuda" / "mma.cuh",
    ROOT / "csrc" / "cuda" / "prefix_attention_kernels.cuh",
    ROOT / "csrc" / "cuda" / "prefix_attention_launch.h",
]
FLAGS = [
    "-std=c++17",
    "-O1",
    "-g",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Wno-unknown-pragmas",  # the kernels' #pragma unroll is nvcc's
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=undefined",
    "-DVAPT_CUDA_EMULATION",
]
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# float32 against float64, as tests/test_ops.py's TOL.
FP32_TOL = 1e-5


def _build_driver() -> Path:
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not installed: the CUDA emulation tests build a host driver with it")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    digest = hashlib.sha256()
    for part in [*FLAGS, *includes, subprocess.run([gxx, "--version"], capture_output=True, text=True).stdout]:
        digest.update(part.encode())
    for source in SOURCES:
        digest.update(source.read_bytes())
    folder = Path(tempfile.gettempdir()) / f"vapt-cuda-emulation-{digest.hexdigest()[:16]}"
    driver = folder / "driver"
    if not driver.exists():
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f"driver.{os.getpid()}"
        result = subprocess.run(
            [gxx, *FLAGS, *includes, str(DRIVER_SOURCE), "-o", str(partial)], capture_output=True, text=True
        )
        assert result.returncode == 0, f"building the emulation driver failed:\n{result.stderr[-6000:]}"
        partial.replace(driver)  # atomic: concurrent sessions never run a half-written binary
    return driver


@pytest.fixture(scope="module")
def driver() -> Path:
    return _build_driver()


def _run(driver: Path, args: list[str], tmp_path: Path, seed: int = 0) -> None:
    env = {**os.environ, "VAPT_EMU_SEED": str(seed), "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=1"}
    result = subprocess.run([str(driver), *args], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, f"driver {args[0]} failed ({result.returncode}):\n{result.stderr[-6000:]}"


# --------------------------------------------------------------------------------------------
# the emulator itself
# --------------------------------------------------------------------------------------------


def test_emulator_against_plain_math(driver, tmp_path):
    """One mma.m16n8k16 from fragments built with the PTX ISA's layout formulas, the kernels'
    ldmatrix paths (plain and transposed) feeding mma, four shuffles and a block barrier, each
    against what it must compute. The inputs are small multiples of 1/4, so every product is exact
    in fp32 and the comparison is exact."""
    out = tmp_path / "selftest.bin"
    _run(driver, ["selftest", str(out)], tmp_path)
    raw = out.read_bytes()
    floats = torch.frombuffer(bytearray(raw[: (128 + 512) * 4]), dtype=torch.float32).double()
    ints = torch.frombuffer(bytearray(raw[(128 + 512) * 4 :]), dtype=torch.int32).reshape(64, 5)

    i = torch.arange(16).view(-1, 1)
    a = (((i * 7 + torch.arange(16) * 3) % 11) - 5).double() / 4
    b = (((i * 5 + torch.arange(16) * 2) % 9) - 4).double() / 4
    c = (i - torch.arange(8)).double() / 8
    assert torch.equal(floats[:128].view(16, 8), a @ b[:, :8] + c), "mma.m16n8k16: D = A B + C"
    assert torch.equal(floats[128:384].view(16, 16), a @ b), "ldmatrix.trans B fragments"
    assert torch.equal(floats[384:].view(16, 16), a @ b), "ldmatrix B fragments from B^T"

    thread = torch.arange(64)
    lane, base = thread % 32, thread // 32 * 32
    value = lambda t: 3 * t + 1  # noqa: E731
    assert torch.equal(ints[:, 0], value(base + (lane ^ 5))), "__shfl_xor_sync"
    assert torch.equal(ints[:, 1], value(base + (7 * lane) % 32)), "__shfl_sync"
    assert torch.equal(ints[:, 2], value(torch.where(lane + 3 < 32, thread + 3, thread))), "__shfl_down_sync"
    assert torch.equal(ints[:, 3], value(torch.where(lane >= 2, thread - 2, thread))), "__shfl_up_sync"
    assert torch.equal(ints[:, 4], value((thread + 1) % 64)), "__syncthreads"


# --------------------------------------------------------------------------------------------
# prefix attention
# --------------------------------------------------------------------------------------------


class Case(NamedTuple):
    dtype: torch.dtype
    B: int
    H: int
    T: int
    Np: int
    D: int
    broadcast: bool

    def __str__(self) -> str:
        prefix = "broadcast" if self.broadcast else "per-sample"
        name = str(self.dtype).removeprefix("torch.")
        return f"{name}-B{self.B}-H{self.H}-T{self.T}-Np{self.Np}-D{self.D}-{prefix}"


CASES = [
    # tails everywhere: T and Np not multiples of 16; several head dims, both prefix kinds
    Case(torch.float16, 2, 2, 37, 5, 64, False),
    Case(torch.bfloat16, 2, 1, 21, 3, 80, True),
    Case(torch.float16, 1, 1, 70, 40, 80, True),  # 2 query tiles, 2 prefix key tiles of 32
    Case(torch.bfloat16, 1, 2, 19, 2, 64, False),
    Case(torch.bfloat16, 2, 1, 13, 1, 36, False),  # D % 8 != 0: plain loads instead of cp.async
    Case(torch.float16, 1, 1, 17, 70, 128, True),  # 2 prefix tiles in the dk/dv kernel too
    Case(torch.float16, 1, 1, 9, 4, 24, True),  # padded head dim 32
    Case(torch.float32, 2, 2, 23, 4, 64, True),
    Case(torch.float32, 2, 1, 11, 3, 80, False),
]


def _inputs(case: Case, generator: torch.Generator) -> dict[str, torch.Tensor]:
    B, H, T, Np, D = case.B, case.H, case.T, case.Np, case.D
    Bp = 1 if case.broadcast else B

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(case.dtype)

    return {
        "q": randn(B, H, T, D),
        "k": randn(B, H, T, D),
        "v": randn(B, H, T, D),
        "k_prefix": randn(Bp, H, Np, D),
        "v_prefix": randn(Bp, H, Np, D),
    }


def _emulate(driver: Path, tmp_path: Path, case: Case, args: dict, dout: torch.Tensor | None, seed: int = 0):
    """(out, lse) and, with dout, (dq, dk, dv, dk_prefix, dv_prefix) from the emulated kernels."""
    B, H, T, Np, D = case.B, case.H, case.T, case.Np, case.D
    Bp = args["k_prefix"].shape[0]
    header = struct.pack("<8if", DTYPE_CODE[case.dtype], B, H, T, Np, D, Bp, dout is not None, D**-0.5)
    tensors = [args[n] for n in ("q", "k", "v", "k_prefix", "v_prefix")] + ([dout] if dout is not None else [])
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(header + b"".join(t.float().contiguous().numpy().tobytes() for t in tensors))
    _run(driver, ["attention", str(src), str(dst)], tmp_path, seed)
    flat = torch.frombuffer(bytearray(dst.read_bytes()), dtype=torch.float32).double()
    shapes = [(B, H, T, D), (B, H, T)]
    if dout is not None:
        shapes += [(B, H, T, D)] * 3 + [(Bp, H, Np, D)] * 2
    outs, offset = [], 0
    for shape in shapes:
        n = math.prod(shape)
        outs.append(flat[offset : offset + n].view(shape))
        offset += n
    assert offset == flat.numel()
    return outs


def _reference(args: dict, dout: torch.Tensor, dtype: torch.dtype):
    """Outputs and gradients of the plain formulation with the inputs in ``dtype``, and its lse."""
    leaves = {n: t.detach().to(dtype).requires_grad_() for n, t in args.items()}
    scale = args["q"].shape[-1] ** -0.5
    out = composite.prefix_attention_reference(**leaves, scale=scale)
    grads = torch.autograd.grad(out, list(leaves.values()), dout.to(dtype))
    B = args["q"].shape[0]
    k_all = torch.cat((leaves["k_prefix"].expand(B, -1, -1, -1), leaves["k"]), dim=2)
    lse = torch.logsumexp(leaves["q"].double() @ k_all.double().transpose(-1, -2) * scale, dim=-1)
    return [out.detach(), lse.detach(), *grads]


def _max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


NAMES = ["out", "lse", "dq", "dk", "dv", "dk_prefix", "dv_prefix"]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_prefix_attention(driver, tmp_path, case):
    """Forward and backward of the emulated kernels against float64 of the same input values."""
    generator = torch.Generator().manual_seed(sum(map(ord, str(case))))
    args = _inputs(case, generator)
    dout = torch.randn(case.B, case.H, case.T, case.D, generator=generator, dtype=torch.float64).to(case.dtype)
    got = _emulate(driver, tmp_path, case, args, dout)
    exact = _reference(args, dout, torch.float64)
    errors = {name: _max_rel_err(g, e) for name, g, e in zip(NAMES, got, exact)}
    if case.dtype == torch.float32:
        worse = {name: err for name, err in errors.items() if not err < FP32_TOL}
    else:
        plain = _reference(args, dout, case.dtype)
        plain_errors = {name: _max_rel_err(p.double(), e) for name, p, e in zip(NAMES, plain, exact)}
        # lse is fp32 in both the kernel and the reference's own arithmetic: judge it at fp32.
        plain_errors["lse"] = FP32_TOL / 2
        worse = {n: (errors[n], plain_errors[n]) for n in NAMES if not errors[n] <= 2 * plain_errors[n]}
    print(f"{case}: max relative errors {errors}")
    assert not worse, f"{case}: (error, bound/2) {worse}"


def test_schedule_independence(driver, tmp_path):
    """Another order of the threads between barriers gives bit-identical results: no result
    depends on a race the barriers leave open."""
    case = Case(torch.float16, 1, 1, 45, 7, 64, True)
    generator = torch.Generator().manual_seed(7)
    args = _inputs(case, generator)
    dout = torch.randn(1, 1, 45, 64, generator=generator, dtype=torch.float64).to(case.dtype)
    first = _emulate(driver, tmp_path, case, args, dout, seed=1)
    second = _emulate(driver, tmp_path, case, args, dout, seed=2)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["float16", "float32"])
def test_nan_query_row(driver, tmp_path, dtype):
    """A query row holding a NaN gives a NaN output row; the other rows stay finite and right."""
    case = Case(dtype, 1, 1, 20, 3, 64, True)
    args = _inputs(case, torch.Generator().manual_seed(3))
    args["q"][0, 0, 4, 2] = math.nan
    out = _emulate(driver, tmp_path, case, args, None)[0]
    assert out[0, 0, 4].isnan().all()
    others = torch.ones(20, dtype=torch.bool)
    others[4] = False
    ref = _reference({n: t.double() for n, t in args.items()}, torch.zeros(1, 1, 20, 64, dtype=torch.float64),
                     torch.float64)[0]
    tol = FP32_TOL if dtype == torch.float32 else 2 ** -8  # one fp16 rounding of P and of out, with margin
    assert _max_rel_err(out[0, 0, others], ref[0, 0, others]) < tol
