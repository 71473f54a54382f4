"""The native CPU kernels (``csrc/cpu``) called as raw ops, ``torch.ops.vapt.*``: behaviour the op
tests do not pin down.

* A NaN stays where it belongs: in a prefix row of ``x`` it reaches neither ``g`` nor the gradients
  that only the patch rows feed, nor the other rows; in a query row it makes that output row NaN.
* Batch 0 runs forward and backward.
* Every SIMD variant computes the same thing: the baseline variant (the one a CPU without AVX2
  runs), forced in a subprocess with ``ATEN_CPU_CAPABILITY=default``, and on an AVX-512 CPU the
  AVX2 one, against the variant this process runs, and all of them against the plain references
  of :mod:`vapt_kernels.ops.composite`.

Every tensor the kernels allocate uninitialised is filled with NaN first, so an output element a
kernel leaves unwritten shows up.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import vapt_kernels
from vapt_kernels.ops import composite as C

native = pytest.importorskip("vapt_kernels.ops.native")
if native.LOAD_ERROR is not None:
    pytest.skip(native.LOAD_ERROR, allow_module_level=True)

OPS = torch.ops.vapt
# Tolerances against the float64 references, and between two SIMD variants: those round float32
# sums differently (the baseline variant has no FMA, each variant its own lane count), and a
# bfloat16 output may then land one bfloat16 ulp (2^-8 relative) away.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
VARIANT_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def poison_uninitialized():
    deterministic = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.utils.deterministic.fill_uninitialized_memory = fill
    torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (1e-6 floor), in float64; NaN when either side has a NaN."""
    a, b = a.double(), b.double()
    if a.isnan().any() or b.isnan().any():
        return float("nan")
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-6) if b.numel() else 0.0


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> None:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    err = rel_err(a, b)
    assert err < tol, f"{what}: relative error {err:.3e} (tolerance {tol:.0e})"


def randn(*shape, dtype, gen):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def project_args(B, P, N, d, Np, per_channel, dtype, seed=0):
    """norm_and_project_fwd arguments, mix in the stats dtype (as ops.native passes it)."""
    gen = torch.Generator().manual_seed(seed)
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    x = randn(B, P + N, d, dtype=dtype, gen=gen)
    w1, b1, wg, bg = (randn(d, dtype=dtype, gen=gen) for _ in range(4))
    mix = randn(*((Np, N, d) if per_channel else (Np, N)), dtype=stats, gen=gen)
    return [x, w1, b1, 1e-6, wg, bg, 1e-5, mix, P]


def attention_args(B, T, H, D, Np, prefix_batch, dtype, seed=0):
    """prefix_attention_fwd arguments: q, k, v strided views of one packed QKV, as in timm."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = randn(B, T, 3, H, D, dtype=dtype, gen=gen).permute(2, 0, 3, 1, 4).unbind(0)
    kp, vp = randn(2, prefix_batch, H, Np, D, dtype=dtype, gen=gen).unbind(0)
    return [q, k, v, kp, vp, D**-0.5]


def project_reference(args, grads):
    """The reference's (h, g) and its gradients of x, norm1 weight/bias, gen weight/bias, mix."""
    leaves = [a.detach().double().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    h, g = C.norm_and_project_reference(*leaves)
    tensors = [a for a in leaves if isinstance(a, torch.Tensor)]
    return (h, g), torch.autograd.grad((h, g), tensors, [t.double() for t in grads])


def attention_reference(args, dout):
    leaves = [a.detach().double().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    out = C.prefix_attention_reference(*leaves)
    return out, torch.autograd.grad(out, leaves[:5], dout.double())


def run_project(args, dh, dg):
    """Raw forward then backward: ((h, g, mean, rstd1, rstd_g), (dx, dw1, db1, dwg, dbg, dmix))."""
    x, w1, b1, eps1, wg, bg, eps_g, mix, P = args
    fwd = OPS.norm_and_project_fwd(*args)
    _, _, mean, rstd1, rstd_g = fwd
    return fwd, OPS.norm_and_project_bwd(dh, dg, x, w1, wg, bg, mix, mean, rstd1, rstd_g, P)


def run_attention(args, dout):
    """Raw forward then backward: ((out, lse), (dq, dk, dv, dk_prefix, dv_prefix))."""
    out, lse = OPS.prefix_attention_fwd(*args)
    return (out, lse), OPS.prefix_attention_bwd(dout, *args[:5], out, lse, args[5])


# --------------------------------------------------------------------------------------------
# NaN containment
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("per_channel", [False, True], ids=["shared", "per-channel"])
def test_nan_in_a_prefix_row_stays_in_its_row(dtype, per_channel):
    B, P, N, d, Np = 2, 2, 40, 24, 5
    args = project_args(B, P, N, d, Np, per_channel, dtype)
    args[0][0, 1, 3] = float("nan")  # prefix token 1 of image 0
    gen = torch.Generator().manual_seed(1)
    dh, dg = randn(B, P + N, d, dtype=dtype, gen=gen), randn(B, Np, d, dtype=dtype, gen=gen)

    (h, g, *_), (dx, _dw1, _db1, dwg, dbg, dmix) = run_project(args, dh, dg)
    (h_ref, g_ref), (dx_ref, _, _, dwg_ref, dbg_ref, dmix_ref) = project_reference(args, (dh, dg))

    other = torch.ones(B, P + N, dtype=torch.bool)
    other[0, 1] = False
    assert h[0, 1].isnan().all(), "the NaN row's own h is NaN"
    for name, a, b in [("g", g, g_ref), ("dgen_weight", dwg, dwg_ref), ("dgen_bias", dbg, dbg_ref),
                       ("dmix", dmix, dmix_ref), ("h of the other rows", h[other], h_ref[other]),
                       ("dx of the other rows", dx[other], dx_ref[other])]:
        assert a.isfinite().all(), f"{name} has a NaN or inf"
        assert_close(a, b, TOL[dtype], name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nan_query_row_gives_a_nan_output_row(dtype):
    B, T, H, D, Np = 2, 37, 2, 16, 4
    args = attention_args(B, T, H, D, Np, 1, dtype)
    args[0][1, 0, 5, 7] = float("nan")  # image 1, head 0, query 5

    out, lse = OPS.prefix_attention_fwd(*args)
    ref = C.prefix_attention_reference(*[a.double() if isinstance(a, torch.Tensor) else a for a in args])

    assert out[1, 0, 5].isnan().all()
    other = torch.ones(B, H, T, dtype=torch.bool)
    other[1, 0, 5] = False
    assert out[other].isfinite().all() and lse[other].isfinite().all()
    assert_close(out[other], ref[other], TOL[dtype], "the other output rows")


# --------------------------------------------------------------------------------------------
# batch 0
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_channel", [False, True], ids=["shared", "per-channel"])
def test_norm_and_project_batch_zero(per_channel):
    P, N, d, Np = 1, 9, 8, 3
    args = project_args(0, P, N, d, Np, per_channel, torch.float32)
    (h, g, mean, rstd1, rstd_g), grads = run_project(args, torch.randn(0, P + N, d), torch.randn(0, Np, d))
    assert h.shape == (0, P + N, d) and g.shape == (0, Np, d)
    assert mean.shape == rstd1.shape == rstd_g.shape == (0, P + N)
    dx, *weight_grads, dmix = grads
    assert dx.shape == (0, P + N, d)
    for name, grad in zip(("dnorm1_weight", "dnorm1_bias", "dgen_weight", "dgen_bias"), weight_grads):
        assert torch.equal(grad, torch.zeros(d)), name
    assert torch.equal(dmix, torch.zeros_like(args[7]))


@pytest.mark.parametrize("prefix_batch", [1, 0], ids=["broadcast-prefix", "batched-prefix"])
def test_prefix_attention_batch_zero(prefix_batch):
    T, H, D, Np = 11, 2, 16, 3
    args = attention_args(0, T, H, D, Np, prefix_batch, torch.float32)
    (out, lse), (dq, dk, dv, dkp, dvp) = run_attention(args, torch.randn(0, H, T, D))
    assert out.shape == dq.shape == dk.shape == dv.shape == (0, H, T, D) and lse.shape == (0, H, T)
    assert torch.equal(dkp, torch.zeros(prefix_batch, H, Np, D))
    assert torch.equal(dvp, torch.zeros(prefix_batch, H, Np, D))


# --------------------------------------------------------------------------------------------
# SIMD variants
# --------------------------------------------------------------------------------------------

SHAPES = {  # B, T, P, d, Np, H, D
    "vit": (2, 197, 1, 384, 10, 6, 64),
    "odd": (2, 23, 2, 33, 7, 3, 33),
}
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


def variant_outputs(shape: str, dtype_name: str, per_channel: bool) -> dict[str, torch.Tensor]:
    """Every output of both ops, forward and backward, on fixed inputs (run in this process)."""
    B, T, P, d, Np, H, D = SHAPES[shape]
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(2)
    project = project_args(B, P, T - P, d, Np, per_channel, dtype)
    fwd, bwd = run_project(project, randn(B, T, d, dtype=dtype, gen=gen), randn(B, Np, d, dtype=dtype, gen=gen))
    names = ["h", "g", "mean", "rstd1", "rstd_g", "dx", "dnorm1_weight", "dnorm1_bias", "dgen_weight", "dgen_bias",
             "dmix"]
    outputs = dict(zip(names, [*fwd, *bwd]))
    attention = attention_args(B, T, H, D, Np, 1, dtype)
    fwd, bwd = run_attention(attention, randn(B, H, T, D, dtype=dtype, gen=gen))
    outputs.update(zip(["out", "lse", "dq", "dk", "dv", "dk_prefix", "dv_prefix"], [*fwd, *bwd]))
    return outputs


CASES = [(shape, dtype_name) for shape in SHAPES for dtype_name in DTYPES]  # per-channel mix on "odd"

_SUBPROCESS = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import test_native_cpu as t
assert torch.backends.cpu.get_cpu_capability() == sys.argv[2], torch.backends.cpu.get_cpu_capability()
torch.save({case: t.variant_outputs(*case, case[0] == "odd") for case in t.CASES}, sys.argv[3])
"""


@functools.lru_cache(maxsize=None)
def outputs_under_capability(capability: str) -> dict:
    """variant_outputs of every case in one subprocess whose ATen CPU capability (and so SIMD
    variant) is forced."""
    package_root = str(Path(vapt_kernels.__file__).resolve().parent.parent)
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability.lower())
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "outputs.pt")
        subprocess.run([sys.executable, "-c", _SUBPROCESS, str(Path(__file__).parent), capability, path], env=env,
                       check=True)
        return torch.load(path)


def other_variants() -> list[str]:
    """Capabilities to compare with this process's: the baseline, and AVX2 under AVX-512."""
    here = torch.backends.cpu.get_cpu_capability()
    return [c for c in ("DEFAULT", "AVX2") if c != here and not (c == "AVX2" and here != "AVX512")]


@pytest.mark.parametrize("capability", other_variants())
@pytest.mark.parametrize("shape, dtype_name", CASES)
def test_simd_variants_agree(capability, shape, dtype_name):
    """The other variant against this process's, and (float32/float64) both against the float64
    references."""
    dtype, per_channel = DTYPES[dtype_name], shape == "odd"
    ours = variant_outputs(shape, dtype_name, per_channel)
    theirs = outputs_under_capability(capability)[(shape, dtype_name)]
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].isfinite().all(), name
        assert_close(theirs[name], ours[name], VARIANT_TOL[dtype], f"{name} ({capability} vs this CPU)")
    if dtype == torch.bfloat16:
        return
    B, T, P, d, Np, H, D = SHAPES[shape]
    gen = torch.Generator().manual_seed(2)
    grads = (randn(B, T, d, dtype=dtype, gen=gen), randn(B, Np, d, dtype=dtype, gen=gen))
    (h, g), (dx, dw1, db1, dwg, dbg, dmix) = project_reference(project_args(B, P, T - P, d, Np, per_channel, dtype),
                                                               grads)
    out, (dq, dk, dv, dkp, dvp) = attention_reference(attention_args(B, T, H, D, Np, 1, dtype),
                                                      randn(B, H, T, D, dtype=dtype, gen=gen))
    references = dict(h=h, g=g, dx=dx, dnorm1_weight=dw1, dnorm1_bias=db1, dgen_weight=dwg, dgen_bias=dbg, dmix=dmix,
                      out=out, dq=dq, dk=dk, dv=dv, dk_prefix=dkp, dv_prefix=dvp)
    for name, ref in references.items():
        for who, outputs in (("this CPU", ours), (capability, theirs)):
            assert_close(outputs[name], ref, TOL[dtype], f"{name} ({who} vs reference)")
