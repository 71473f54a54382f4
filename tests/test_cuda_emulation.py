"""The CUDA kernels of both ops (``csrc/cuda/prefix_attention_device.cuh``,
``csrc/cuda/norm_and_project_device.cuh``), run on the CPU through the host emulation of the CUDA
execution model (``csrc/emulation/cuda_host.h``): the same kernel text that nvcc compiles, built by
g++ with AddressSanitizer and UBSan into one small driver per op
(``csrc/emulation/<op>_driver.cpp``) that runs the launcher's launch sequence and exchanges
tensors with this file through binary files.

Each driver is built once per source hash into the temporary directory and reused. Tolerances:
fp32 at the op suite's 1e-5; fp16/bf16 as the op suite judges low precision, no worse than twice
the plain formulation computed in that dtype (both against float64 of the same rounded inputs).
The attention kernels round P and dS to the input dtype before their products, as the plain
formulation rounds its softmax and products, so the errors are of the same size; the
norm_and_project kernels compute in fp32 and round only their x-dtype outputs. Statistics that are
fp32 in both the kernels and the plain formulation's own arithmetic (lse, the LayerNorm row
statistics) are judged at fp32's tolerance whatever the input dtype.
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
from vapt_kernels.testing import max_rel_err

ROOT = Path(__file__).resolve().parents[1]
EMULATION = ROOT / "csrc" / "emulation"
CUDA = ROOT / "csrc" / "cuda"
# Driver name -> every file its build reads besides the driver source (for the cache key).
DRIVER_SOURCES = {
    "prefix_attention": [CUDA / "mma.cuh", CUDA / "prefix_attention_device.cuh", CUDA / "prefix_attention_launch.h"],
    "norm_and_project": [CUDA / "norm_and_project_device.cuh", CUDA / "norm_and_project_launch.h"],
}
COMMON_SOURCES = [EMULATION / "cuda_host.h", EMULATION / "driver_io.h", CUDA / "common.cuh"]
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


def _build_driver(name: str) -> Path:
    """The emulation driver ``csrc/emulation/<name>_driver.cpp``, built (once per source hash)."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not installed: the CUDA emulation tests build a host driver with it")
    source = EMULATION / f"{name}_driver.cpp"
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    digest = hashlib.sha256()
    for part in [*FLAGS, *includes, subprocess.run([gxx, "--version"], capture_output=True, text=True).stdout]:
        digest.update(part.encode())
    for path in [source, *COMMON_SOURCES, *DRIVER_SOURCES[name]]:
        digest.update(path.read_bytes())
    folder = Path(tempfile.gettempdir()) / f"vapt-cuda-emulation-{name}-{digest.hexdigest()[:16]}"
    driver = folder / "driver"
    if not driver.exists():
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f"driver.{os.getpid()}"
        result = subprocess.run(
            [gxx, *FLAGS, *includes, str(source), "-o", str(partial)], capture_output=True, text=True
        )
        assert result.returncode == 0, f"building the {name} emulation driver failed:\n{result.stderr[-6000:]}"
        partial.replace(driver)  # atomic: concurrent sessions never run a half-written binary
    return driver


@pytest.fixture(scope="module")
def attention_driver() -> Path:
    """The prefix attention driver (it also runs the emulator's self-test)."""
    return _build_driver("prefix_attention")


@pytest.fixture(scope="module")
def project_driver() -> Path:
    return _build_driver("norm_and_project")


def _run(driver: Path, args: list[str], tmp_path: Path, seed: int = 0) -> None:
    env = {**os.environ, "VAPT_EMU_SEED": str(seed), "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=1"}
    result = subprocess.run([str(driver), *args], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, f"driver {args[0]} failed ({result.returncode}):\n{result.stderr[-6000:]}"


def _unpack(raw: bytes, layout: list[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor]:
    """The tensors of ``layout`` ((shape, float32 or int32) each), one after the other in ``raw``;
    floats come back as float64."""
    outs, offset = [], 0
    for shape, dtype in layout:
        size = math.prod(shape) * 4
        if size == 0:  # frombuffer refuses an empty buffer
            t = torch.empty(shape, dtype=dtype)
        else:
            t = torch.frombuffer(bytearray(raw[offset : offset + size]), dtype=dtype).view(shape)
        outs.append(t.double() if dtype == torch.float32 else t)
        offset += size
    assert offset == len(raw), "the driver wrote more or less than expected"
    return outs


# --------------------------------------------------------------------------------------------
# the emulator itself
# --------------------------------------------------------------------------------------------


def test_emulator_against_plain_math(attention_driver, tmp_path):
    """One mma.m16n8k16 from fragments built with the PTX ISA's layout formulas, the kernels'
    ldmatrix paths (plain and transposed) feeding mma, four shuffles and a block barrier, each
    against what it must compute. The inputs are small multiples of 1/4, so every product is exact
    in fp32 and the comparison is exact."""
    out = tmp_path / "selftest.bin"
    _run(attention_driver, ["selftest", str(out)], tmp_path)
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


class AttentionCase(NamedTuple):
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


ATTENTION_CASES = [
    # tails everywhere: T and Np not multiples of 16; several head dims, both prefix kinds
    AttentionCase(torch.float16, 2, 2, 37, 5, 64, False),
    AttentionCase(torch.bfloat16, 2, 1, 21, 3, 80, True),
    AttentionCase(torch.float16, 1, 1, 70, 40, 80, True),  # 2 query tiles, 2 prefix key tiles of 32
    AttentionCase(torch.bfloat16, 1, 2, 19, 2, 64, False),
    AttentionCase(torch.bfloat16, 2, 1, 13, 1, 36, False),  # D % 8 != 0: plain loads instead of cp.async
    AttentionCase(torch.float16, 1, 1, 17, 70, 128, True),  # 2 prefix tiles in the dk/dv kernel too
    AttentionCase(torch.float16, 1, 1, 9, 4, 24, True),  # padded head dim 32
    AttentionCase(torch.float32, 2, 2, 23, 4, 64, True),
    AttentionCase(torch.float32, 2, 1, 11, 3, 80, False),
]


def _attention_inputs(case: AttentionCase, generator: torch.Generator) -> dict[str, torch.Tensor]:
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


def _emulate_attention(
    driver: Path, tmp_path: Path, case: AttentionCase, args: dict, dout: torch.Tensor | None, seed: int = 0
):
    """(out, lse) and, with dout, (dq, dk, dv, dk_prefix, dv_prefix) from the emulated kernels."""
    B, H, T, Np, D = case.B, case.H, case.T, case.Np, case.D
    Bp = args["k_prefix"].shape[0]
    header = struct.pack("<8if", DTYPE_CODE[case.dtype], B, H, T, Np, D, Bp, dout is not None, D**-0.5)
    tensors = [args[n] for n in ("q", "k", "v", "k_prefix", "v_prefix")] + ([dout] if dout is not None else [])
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(header + b"".join(t.float().contiguous().numpy().tobytes() for t in tensors))
    _run(driver, ["attention", str(src), str(dst)], tmp_path, seed)
    shapes = [(B, H, T, D), (B, H, T)]
    if dout is not None:
        shapes += [(B, H, T, D)] * 3 + [(Bp, H, Np, D)] * 2
    return _unpack(dst.read_bytes(), [(shape, torch.float32) for shape in shapes])


def _expected_attention(args: dict, dout: torch.Tensor, dtype: torch.dtype):
    """Outputs and gradients of the plain formulation with the inputs in ``dtype``, and its lse."""
    leaves = {n: t.detach().to(dtype).requires_grad_() for n, t in args.items()}
    scale = args["q"].shape[-1] ** -0.5
    out = composite.prefix_attention_reference(**leaves, scale=scale)
    grads = torch.autograd.grad(out, list(leaves.values()), dout.to(dtype))
    B = args["q"].shape[0]
    k_all = torch.cat((leaves["k_prefix"].expand(B, -1, -1, -1), leaves["k"]), dim=2)
    lse = torch.logsumexp(leaves["q"].double() @ k_all.double().transpose(-1, -2) * scale, dim=-1)
    return [out.detach(), lse.detach(), *grads]


ATTENTION_NAMES = ["out", "lse", "dq", "dk", "dv", "dk_prefix", "dv_prefix"]


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=str)
def test_prefix_attention(attention_driver, tmp_path, case):
    """Forward and backward of the emulated kernels against float64 of the same input values."""
    generator = torch.Generator().manual_seed(sum(map(ord, str(case))))
    args = _attention_inputs(case, generator)
    dout = torch.randn(case.B, case.H, case.T, case.D, generator=generator, dtype=torch.float64).to(case.dtype)
    got = _emulate_attention(attention_driver, tmp_path, case, args, dout)
    exact = _expected_attention(args, dout, torch.float64)
    errors = {name: max_rel_err(g, e) for name, g, e in zip(ATTENTION_NAMES, got, exact)}
    if case.dtype == torch.float32:
        worse = {name: err for name, err in errors.items() if not err < FP32_TOL}
    else:
        plain = _expected_attention(args, dout, case.dtype)
        plain_errors = {name: max_rel_err(p.double(), e) for name, p, e in zip(ATTENTION_NAMES, plain, exact)}
        # lse is fp32 in both the kernel and the plain formulation's own arithmetic: judge it at fp32.
        plain_errors["lse"] = FP32_TOL / 2
        worse = {n: (errors[n], plain_errors[n]) for n in ATTENTION_NAMES if not errors[n] <= 2 * plain_errors[n]}
    print(f"{case}: max relative errors {errors}")
    assert not worse, f"{case}: (error, bound/2) {worse}"


def test_schedule_independence(attention_driver, tmp_path):
    """Another order of the threads between barriers gives bit-identical results: no result
    depends on a race the barriers leave open."""
    case = AttentionCase(torch.float16, 1, 1, 45, 7, 64, True)
    generator = torch.Generator().manual_seed(7)
    args = _attention_inputs(case, generator)
    dout = torch.randn(1, 1, 45, 64, generator=generator, dtype=torch.float64).to(case.dtype)
    first = _emulate_attention(attention_driver, tmp_path, case, args, dout, seed=1)
    second = _emulate_attention(attention_driver, tmp_path, case, args, dout, seed=2)
    for name, a, b in zip(ATTENTION_NAMES, first, second):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["float16", "float32"])
def test_nan_query_row(attention_driver, tmp_path, dtype):
    """A query row holding a NaN gives a NaN output row; the other rows stay finite and right."""
    case = AttentionCase(dtype, 1, 1, 20, 3, 64, True)
    args = _attention_inputs(case, torch.Generator().manual_seed(3))
    args["q"][0, 0, 4, 2] = math.nan
    out = _emulate_attention(attention_driver, tmp_path, case, args, None)[0]
    assert out[0, 0, 4].isnan().all()
    others = torch.ones(20, dtype=torch.bool)
    others[4] = False
    exact = _expected_attention(
        {n: t.double() for n, t in args.items()}, torch.zeros(1, 1, 20, 64, dtype=torch.float64), torch.float64
    )[0]
    tol = FP32_TOL if dtype == torch.float32 else 2 ** -8  # one fp16 rounding of P and of out, with margin
    assert max_rel_err(out[0, 0, others], exact[0, 0, others]) < tol


# --------------------------------------------------------------------------------------------
# norm_and_project
# --------------------------------------------------------------------------------------------

AFFINE = ("norm1_weight", "norm1_bias", "gen_weight", "gen_bias")
EPS1, EPS_G = 1e-6, 0.05  # far apart, so that a mix-up of rstd1 and rstd_g shows


class ProjectCase(NamedTuple):
    dtype: torch.dtype
    B: int
    T: int
    P: int  # num_prefix
    d: int
    Np: int
    per_channel: bool  # mix (Np, N, d), else (Np, N)
    affine: tuple[str, ...]  # the affine parameters given (the others are None)
    K: int = 0  # tasks: 0 for task None, else mix (K, ...), gen affines (K, d) and a task index (B,)

    def __str__(self) -> str:
        name = str(self.dtype).removeprefix("torch.")
        mix = "per-channel" if self.per_channel else "shared"
        affine = "+".join(a.replace("norm1_", "n").replace("gen_", "g") for a in self.affine) or "no-affine"
        tasks = f"-K{self.K}" if self.K else ""
        return f"{name}-B{self.B}-T{self.T}-P{self.P}-d{self.d}-Np{self.Np}-{mix}-{affine}{tasks}"


# Tiles: rows_fwd 8 rows a block; rows_bwd 32 rows a block, 256 threads on packs of 16 bytes when d
# allows it (d % 4 fp32, d % 8 fp16/bf16), else of one element; project_kernel (Z, M, C, K) tiles
# SharedMixTile (1, 32, 128, 16) and ChannelMixTile (8, 16, 32, 8). Forward g: Z = B, M = Np,
# K = N, C = d; dxg: Z = B, M = N, K = Np, C = d; shared dmix: Z = B, M = Np, K = d, C = N;
# per-channel dmix: Z = N, M = Np, K = B, C = d.
PROJECT_CASES = [
    # 16-byte packs; 2 backward row tiles; N = 36 > BM for dxg; 3 K steps of the forward g
    ProjectCase(torch.float32, 3, 37, 1, 40, 5, False, AFFINE),
    # d = 300 over 10 channel tiles of 32; Np = 10 > BK = 8 (dxg); N = 8 < BZ (per-channel dmix)
    ProjectCase(torch.float32, 2, 13, 5, 300, 10, True, AFFINE),
    ProjectCase(torch.float32, 2, 21, 0, 7, 3, True, ()),  # one-element packs, 256 / 7 row groups
    # d = 130: 2 channel tiles of 128, 9 K steps of the shared dmix; Np = 34 > BM = 32
    ProjectCase(torch.float16, 3, 38, 5, 130, 34, False, AFFINE),
    ProjectCase(torch.float16, 2, 19, 1, 40, 5, True, ("norm1_weight", "gen_weight")),  # 16-byte packs
    # d = 300 > 256 threads of one-element packs: one row group, two packs a thread
    ProjectCase(torch.bfloat16, 2, 23, 1, 300, 4, False, ()),
    # 16-byte packs of 3 per row, 85 row groups; Np = 20 > BM = 16; B = 3 < BZ (forward g)
    ProjectCase(torch.bfloat16, 3, 17, 0, 24, 20, True, AFFINE),
    ProjectCase(torch.bfloat16, 1, 9, 1, 7, 1, False, ("norm1_bias", "gen_bias")),
    # B = 9: two z tiles of 8 (forward g, dxg), the second with one image; one-element packs
    ProjectCase(torch.float32, 9, 12, 1, 130, 3, True, AFFINE),
    # 3 backward row tiles; Np = 40: 2 M tiles (forward g, shared dmix), 3 K steps (dxg)
    ProjectCase(torch.float16, 2, 70, 1, 72, 40, False, ("gen_weight", "gen_bias")),
    ProjectCase(torch.bfloat16, 1, 40, 5, 264, 7, False, AFFINE),  # 33 packs of 16 bytes a row
    ProjectCase(torch.float32, 2, 6, 1, 1, 2, False, AFFINE),  # d = 1: x == mean, the normalised x is 0
]


def _task_index(B: int, K: int) -> torch.Tensor:
    """(B,) int64: all 0 for K = 1; for K = 3, task 2 every fourth image and 0 otherwise, so that
    task 1 has no image, the tasks interleave, and a task with more than 8 images (B >= 12) spans
    two k steps of the per-channel dmix."""
    b = torch.arange(B)
    return torch.where(b % 4 == 3, K - 1, 0) if K > 1 else torch.zeros(B, dtype=torch.int64)


def _project_inputs(case: ProjectCase, generator: torch.Generator) -> dict[str, torch.Tensor | None]:
    """What the op hands the launcher: x in its dtype; affine parameters, float32 as a model keeps
    them under autocast, cast to x's dtype (``library.norm_and_project`` does); mix in float32 (the
    stats dtype), whatever x's dtype. With tasks: the gen affines (K, d), mix (K, ...) and task."""
    B, T, d, N = case.B, case.T, case.d, case.T - case.P
    tasks = (case.K,) if case.K else ()

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    args = {"x": (randn(B, T, d) * 1.5 + randn(B, T, 1)).to(case.dtype)}  # rows far from zero mean
    for name in AFFINE:
        shape = (*tasks, d) if name.startswith("gen_") else (d,)
        value = 1 + 0.5 * randn(*shape) if name.endswith("weight") else 0.3 * randn(*shape)
        args[name] = value.float().to(case.dtype) if name in case.affine else None
    mix_shape = (*tasks, case.Np, N, d) if case.per_channel else (*tasks, case.Np, N)
    args["mix"] = (randn(*mix_shape) * N**-0.5).float()
    args["task"] = _task_index(B, case.K) if case.K else None
    return args


def _emulate_project(driver: Path, tmp_path: Path, case: ProjectCase, args: dict, dh, dg, seed: int = 0):
    """(h, g, mean, rstd1, rstd_g, dx, dnorm1_weight, dnorm1_bias, dgen_weight, dgen_bias, dmix)
    from the emulated kernels, and whether the forward and backward row kernels took 16-byte packs."""
    B, T, d, Np = case.B, case.T, case.d, case.Np
    given = sum(1 << i for i, name in enumerate(AFFINE) if args[name] is not None)
    header = struct.pack(
        "<10i2f", DTYPE_CODE[case.dtype], B, T, d, Np, case.P, case.per_channel, given, True, case.K, EPS1, EPS_G
    )
    task = [args["task"]] if case.K else []
    tensors = [args["x"], *(args[n] for n in AFFINE if args[n] is not None), args["mix"], *task, dh, dg]
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(header + b"".join(t.float().contiguous().numpy().tobytes() for t in tensors))
    _run(driver, ["norm_and_project", str(src), str(dst)], tmp_path, seed)
    f32, i32 = torch.float32, torch.int32
    layout = [((B, T, d), f32), ((B, Np, d), f32)] + [((B, T), f32)] * 3 + [((1,), i32)]
    gen = (case.K, d) if case.K else (d,)
    layout += [((B, T, d), f32)] + [((d,), f32)] * 2 + [(gen, f32)] * 2 + [(tuple(args["mix"].shape), f32), ((1,), i32)]
    *fwd, vec_fwd, dx, dw1, db1, dwg, dbg, dmix, vec_bwd = _unpack(dst.read_bytes(), layout)
    return [*fwd, dx, dw1, db1, dwg, dbg, dmix], bool(vec_fwd), bool(vec_bwd)


def _expected_project(args: dict, dh: torch.Tensor, dg: torch.Tensor, num_prefix: int, dtype: torch.dtype):
    """(h, g, dx, dnorm1_weight, dnorm1_bias, dgen_weight, dgen_bias, dmix) of the plain
    formulation with every input in ``dtype``. An absent affine parameter is its identity (ones,
    zeros): the same function, and the gradient the kernels return for it."""
    d = args["x"].shape[-1]
    affine = {n: args[n] if args[n] is not None else torch.ones(d) if n.endswith("weight") else torch.zeros(d)
              for n in AFFINE}
    leaves = {n: t.to(dtype).requires_grad_() for n, t in {"x": args["x"], **affine, "mix": args["mix"]}.items()}
    h, g = composite.norm_and_project_reference(
        leaves["x"], leaves["norm1_weight"], leaves["norm1_bias"], EPS1, leaves["gen_weight"], leaves["gen_bias"],
        EPS_G, leaves["mix"], num_prefix,
    )
    grads = torch.autograd.grad((h, g), list(leaves.values()), (dh.to(dtype), dg.to(dtype)))
    return [h.detach(), g.detach(), *grads]


def _row_stats(x: torch.Tensor) -> list[torch.Tensor]:
    """mean, rstd1, rstd_g (B, T) in float64."""
    x = x.double()
    var = x.var(-1, unbiased=False)
    return [x.mean(-1), (var + EPS1).rsqrt(), (var + EPS_G).rsqrt()]


PROJECT_NAMES = [
    "h", "g", "mean", "rstd1", "rstd_g", "dx", "dnorm1_weight", "dnorm1_bias", "dgen_weight", "dgen_bias", "dmix"
]
STATS = ("mean", "rstd1", "rstd_g")


def _project_grads(case: ProjectCase, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    dh = torch.randn(case.B, case.T, case.d, generator=generator, dtype=torch.float64).to(case.dtype)
    dg = torch.randn(case.B, case.Np, case.d, generator=generator, dtype=torch.float64).to(case.dtype)
    return dh, dg


def _assert_matches_float64(case, args, dh, dg, got, expected) -> None:
    """The emulated outputs ``got`` (:data:`PROJECT_NAMES`) against ``expected(..., torch.float64)``:
    float32 within :data:`FP32_TOL`, 16-bit no worse than twice ``expected`` run in that dtype (the
    plain formulation's own error)."""
    exact_h, exact_g, *exact_grads = expected(args, dh, dg, case.P, torch.float64)
    exact = [exact_h, exact_g, *_row_stats(args["x"]), *exact_grads]
    errors = {name: max_rel_err(g, e) for name, g, e in zip(PROJECT_NAMES, got, exact)}
    if case.dtype == torch.float32:
        worse = {name: err for name, err in errors.items() if not err < FP32_TOL}
    else:
        plain_h, plain_g, *plain_grads = expected(args, dh, dg, case.P, case.dtype)
        plain = dict(zip(["h", "g", "dx", *PROJECT_NAMES[6:]], [plain_h, plain_g, *plain_grads]))
        plain_errors = {name: max_rel_err(p.double(), exact[PROJECT_NAMES.index(name)]) for name, p in plain.items()}
        # The row statistics are fp32 in the kernels and in the plain formulation's own arithmetic.
        plain_errors.update({name: FP32_TOL / 2 for name in STATS})
        worse = {n: (errors[n], plain_errors[n]) for n in PROJECT_NAMES if not errors[n] <= 2 * plain_errors[n]}
    print(f"{case}: max relative errors {errors}")
    assert not worse, f"{case}: (error, bound/2) {worse}"


@pytest.mark.parametrize("case", PROJECT_CASES, ids=str)
def test_norm_and_project(project_driver, tmp_path, case):
    """Forward (h, g, the saved row statistics) and backward (dx, the affine gradients, dmix) of the
    emulated kernels against float64 of the same input values."""
    generator = torch.Generator().manual_seed(sum(map(ord, str(case))))
    args = _project_inputs(case, generator)
    dh, dg = _project_grads(case, generator)
    got, vec_fwd, vec_bwd = _emulate_project(project_driver, tmp_path, case, args, dh, dg)
    packs = case.d % (16 // case.dtype.itemsize) == 0
    assert (vec_fwd, vec_bwd) == (packs, packs), "the launcher's choice of 16-byte packs"

    _assert_matches_float64(case, args, dh, dg, got, _expected_project)


@pytest.mark.parametrize(
    "case",
    [
        ProjectCase(torch.float16, 2, 35, 1, 40, 6, False, AFFINE),
        ProjectCase(torch.float16, 6, 20, 1, 40, 6, False, AFFINE, 3),
        ProjectCase(torch.float16, 6, 20, 1, 40, 6, True, AFFINE, 3),
    ],
    ids=["one-task", "tasks-shared", "tasks-per-channel"],
)
def test_norm_and_project_schedule_independence(project_driver, tmp_path, case):
    """Another order of the threads between barriers gives bit-identical results (per task too)."""
    generator = torch.Generator().manual_seed(11)
    args = _project_inputs(case, generator)
    dh, dg = _project_grads(case, generator)
    first = _emulate_project(project_driver, tmp_path, case, args, dh, dg, seed=1)[0]
    second = _emulate_project(project_driver, tmp_path, case, args, dh, dg, seed=2)[0]
    for name, a, b in zip(PROJECT_NAMES, first, second):
        assert torch.equal(a, b), name


# --------------------------------------------------------------------------------------------
# norm_and_project with many tasks (a per-image task index)
# --------------------------------------------------------------------------------------------

# The cases: K = 1, and K = 3 with task 1 unused (_task_index); B = 0, 1, 5 (and 12: a task of
# 9 images over two k steps of the per-channel dmix); shared and per channel; P = 0 and > 0; Np,
# N, d off the tiles; with and without the affine parameters. The per-channel forward g and dxg run
# on ChannelMixTaskTile (one image a block); the per-channel dmix sums each task's images inside
# project_kernel; the shared dmix and the gen affine gradients go through task_sum_kernel.
PROJECT_TASK_CASES = [
    ProjectCase(torch.float32, 5, 8, 1, 33, 3, False, AFFINE, 3),  # N = 7, d = 33: one-element packs
    ProjectCase(torch.float32, 5, 54, 5, 24, 17, True, AFFINE, 3),  # N = 49; Np = 17 > BM = 16 and 32
    ProjectCase(torch.float32, 1, 1, 0, 1, 1, True, AFFINE, 1),  # N = d = Np = 1, P = 0
    ProjectCase(torch.float32, 1, 197, 1, 24, 3, False, ("gen_weight", "gen_bias"), 3),  # N = 196, tasks 1, 2 empty
    ProjectCase(torch.float32, 12, 9, 2, 40, 10, True, AFFINE, 3),  # 16-byte packs; Np = 10 > BK = 8
    ProjectCase(torch.float32, 5, 21, 0, 7, 3, False, (), 1),  # no affine, P = 0
    ProjectCase(torch.float32, 0, 8, 1, 24, 3, False, AFFINE, 3),  # B = 0: empty outputs, zero gradients
    ProjectCase(torch.float32, 0, 8, 1, 24, 3, True, AFFINE, 1),
    ProjectCase(torch.float16, 5, 18, 1, 40, 17, True, ("norm1_weight", "gen_weight"), 3),
    ProjectCase(torch.float16, 5, 50, 1, 130, 34, False, AFFINE, 3),  # 2 channel tiles; Np = 34 > BM = 32
    ProjectCase(torch.bfloat16, 5, 12, 5, 24, 3, True, AFFINE, 3),
    ProjectCase(torch.bfloat16, 5, 50, 1, 72, 7, False, ("norm1_bias", "gen_bias"), 1),
    ProjectCase(torch.float32, 5, 10, 1, 384, 1, True, AFFINE, 3),  # d = 384: 12 channel tiles; Np = 1
    ProjectCase(torch.bfloat16, 5, 197, 1, 24, 3, True, AFFINE, 3),  # N = 196: 7 M tiles of dxg
]


def _expected_project_tasks(args: dict, dh: torch.Tensor, dg: torch.Tensor, num_prefix: int, dtype: torch.dtype):
    """(h, g, dx, dnorm1_weight, dnorm1_bias, dgen_weight, dgen_bias, dmix) of the many-task op as a
    loop over tasks through the single-task formulation, with every input in ``dtype`` (absent affine
    parameters as their identity, as in :func:`_expected_project`)."""
    x, mix, task = args["x"], args["mix"], args["task"]
    (B, T, d), K = x.shape, mix.shape[0]
    shapes = {"norm1_weight": (d,), "norm1_bias": (d,), "gen_weight": (K, d), "gen_bias": (K, d)}
    affine = {n: args[n] if args[n] is not None else (torch.ones if n.endswith("weight") else torch.zeros)(shapes[n])
              for n in AFFINE}
    leaves = {n: t.to(dtype).requires_grad_() for n, t in {"x": x, **affine, "mix": mix}.items()}
    x, w1, b1, gw, gb, mix = leaves.values()
    h = torch.nn.functional.layer_norm(x, (d,), w1, b1, EPS1)
    g = x.new_zeros(B, mix.shape[1], d)
    for t in range(K):
        sel = task == t
        xn = torch.nn.functional.layer_norm(x[sel, num_prefix:], (d,), gw[t], gb[t], EPS_G)
        g[sel] = mix[t] @ xn if mix.dim() == 3 else torch.einsum("jnc,bnc->bjc", mix[t], xn)
    grads = torch.autograd.grad((h, g), list(leaves.values()), (dh.to(dtype), dg.to(dtype)))
    return [h.detach(), g.detach(), *grads]


@pytest.mark.parametrize("case", PROJECT_TASK_CASES, ids=str)
def test_norm_and_project_tasks(project_driver, tmp_path, case):
    """The many-task path of the emulated kernels against the many-task formulation in float64; a task without
    images gets exact zeros."""
    generator = torch.Generator().manual_seed(sum(map(ord, str(case))))
    args = _project_inputs(case, generator)
    dh, dg = _project_grads(case, generator)
    got, _, _ = _emulate_project(project_driver, tmp_path, case, args, dh, dg)
    named = dict(zip(PROJECT_NAMES, got))
    if case.B == 0:
        for name, t in named.items():
            assert t.numel() == 0 or not t.any(), f"{name}: not zero for an empty batch"
        return
    unused = [t for t in range(case.K) if not (args["task"] == t).any()]
    for name in ("dgen_weight", "dgen_bias", "dmix"):
        assert not named[name][unused].any(), f"{name}: not exactly zero for the tasks {unused} without images"

    _assert_matches_float64(case, args, dh, dg, got, _expected_project_tasks)


