"""The two ops on every backend (``torch``, ``native``, ``triton``; ``reference`` is the oracle
itself) against their plain references (:mod:`vapt_kernels.ops.composite`), on every device of
this machine and in every dtype each backend's contract takes (:func:`library.input_dtypes`).

Oracles, strongest first:

* the plain references in float64 on the same input values: ~1e-10 where the backend takes
  float64, ~1e-5 (relative) for float32 inputs; every output and every gradient on its own;
* float64 ``gradcheck`` and ``gradgradcheck`` wherever the backend takes float64, and on every
  backend (Triton has no float64) a Hessian-vector product against the reference's;
* float16/bfloat16 against the float64 reference of the same inputs, no worse than twice the
  error of the plain reference computed in the same precision.

Every output is allocated NaN-poisoned (``poison_uninitialized``). One table of shapes per op,
one test body per property, each parametrised by ``(backend, device, dtype)``; a test body takes
either op's shapes. Triton runs on CPU tensors through its interpreter: its ViT-size cases are
marked ``slow`` there.
"""

from __future__ import annotations

import functools
import math
import os
import re
import shutil
import subprocess
import sys
from typing import Any, NamedTuple, Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

from conftest import DEVICES, assert_close_rel, kernel_cases, max_rel_err
from vapt_kernels import ops
from vapt_kernels.ops import composite, library

pytestmark = pytest.mark.usefixtures("poison_uninitialized")

BACKENDS = ("torch", "native", "triton")
EXACT = (torch.float64, torch.float32)
LOW = (torch.float16, torch.bfloat16)
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
# Backends that compute without grad mode on another path (the torch backend's attention: SDPA);
# the kernel backends run the same kernels either way.
OTHER_PATH_WITHOUT_GRAD = ("torch",)

Args = dict[str, Any]


@pytest.fixture
def single_thread():
    """One intra-op thread for tests of thousands of tiny calls (gradcheck): there, waking the
    other threads costs more than the work, milliseconds per call on a loaded machine. The
    kernels' threading is exercised by every other test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    # float64 draws, cast afterwards: every dtype sees the same values up to its rounding.
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


class Attention(NamedTuple):
    """A ``prefix_attention`` case: ``q, k, v (B, H, T, D)``, prefix keys/values ``(Bp, H, Np, D)``."""

    B: int
    T: int
    H: int
    D: int
    Np: int
    prefix: str = "batch"  # prefix batch: "batch" (B), "broadcast" (1), "expand" (1 expanded to B, stride 0)
    layout: str = "packed"  # "packed": views of one QKV / KV projection; "strided": transposes, last strides != 1
    scale_factor: float = 1.0  # softmax scale = scale_factor * D ** -0.5

    op = "prefix_attention"
    outputs = ("out",)
    vmapped = ("q", "k", "v")  # the prefix stays shared (static prompts)

    def inputs(self, dtype: torch.dtype, device: str, seed: int = 0, requires_grad: bool = True) -> Args:
        B, T, H, D, Np = self.B, self.T, self.H, self.D, self.Np
        Bp = B if self.prefix == "batch" else 1
        gen = torch.Generator().manual_seed(seed)

        def leaf(*shape: int) -> torch.Tensor:
            return _randn(gen, *shape).to(device, dtype).requires_grad_(requires_grad)

        if self.layout == "packed":  # timm's reshaped qkv projection; the prompts' K/V projection
            q, k, v = leaf(B, T, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
            kp, vp = leaf(Bp, Np, 2, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = leaf(B, T, H, D).transpose(1, 2)
            k = leaf(B, H, D, T).transpose(2, 3)
            v = leaf(B, H, T, 2 * D)[..., ::2]
            kp = leaf(Bp, H, D, Np).transpose(2, 3)
            vp = leaf(Bp, Np, H, D).transpose(1, 2)
        if self.prefix == "expand":
            kp, vp = kp.expand(B, -1, -1, -1), vp.expand(B, -1, -1, -1)
        scale = self.scale_factor * max(D, 1) ** -0.5  # D = 0 only in the contract tests
        return dict(q=q, k=k, v=v, k_prefix=kp, v_prefix=vp, scale=scale)


class Project(NamedTuple):
    """A ``norm_and_project`` case: ``x (B, P + N, d)``, ``mix (Np, N)`` or ``(Np, N, d)``; with
    ``tasks`` (one task index per image) and ``K`` tasks, the prompt parameters are stacked per task:
    ``mix (K, Np, N)`` or ``(K, Np, N, d)``, ``gen_weight``/``gen_bias (K, d)``."""

    B: int
    P: int
    N: int
    d: int
    Np: int
    mix: str = "shared"  # "shared" (Np, N) or "per-channel" (Np, N, d)
    affine: str = "affine"  # LayerNorm weights and biases: "affine" (trained), "frozen" (not trained), "none"
    tasks: Optional[tuple[int, ...]] = None  # each image's task index; None for the single-task op
    K: int = 0  # tasks (with ``tasks``); a task no image uses must get zero gradients

    op = "norm_and_project"
    outputs = ("h", "g")
    vmapped = ("x", "mix")  # the LayerNorm affines stay shared

    def inputs(self, dtype: torch.dtype, device: str, seed: int = 0, requires_grad: bool = True) -> Args:
        B, T, d, N, Np = self.B, self.P + self.N, self.d, self.N, self.Np
        gen = torch.Generator().manual_seed(seed)

        def leaf(t: torch.Tensor, train: bool = True) -> torch.Tensor:
            return t.to(device, dtype).requires_grad_(requires_grad and train)

        # Rows of scales 0.05 to 2.7 and non-zero means: in the small ones eps1 and eps_g both matter.
        # The means stay near the scales (a mean 37x the row's std left a float32 dx at d = 3 with
        # 1e-5 of error from rounding the mean alone, on every backend).
        row_scale = torch.exp(4 * torch.rand(B, T, 1, generator=gen, dtype=torch.float64) - 3)
        x = leaf((_randn(gen, B, T, d) + 2 * _randn(gen, B, T, 1)) * row_scale)
        per_task = () if self.tasks is None else (self.K,)
        affine: dict[str, Optional[torch.Tensor]] = {}
        for name, centre in (("norm1_weight", 1.0), ("norm1_bias", 0.0), ("gen_weight", 1.0), ("gen_bias", 0.0)):
            value = centre + 0.5 * _randn(gen, *(per_task if name.startswith("gen") else ()), d)
            affine[name] = None if self.affine == "none" else leaf(value, train=self.affine == "affine")
        # Mean 0.5: dgen_bias = sum_n mix[j, n] dg[j] (Np = 1: one such sum for all channels) is not
        # left to a cancelling float32 sum (a zero-mean draw gave sum_n mix = -0.05 beside
        # sum_n |mix| = 21.5, and every backend's float32 dgen_bias lost 4 to 13x its usual accuracy).
        # In the stats dtype (float32 for 16-bit x), as a model builds it from its parameters.
        mix = 0.5 + (_randn(gen, *per_task, Np, N, d) if self.mix == "per-channel" else _randn(gen, *per_task, Np, N))
        mix = mix.to(device, composite.stats_dtype(dtype)).requires_grad_(requires_grad)
        args = dict(
            x=x, norm1_weight=affine["norm1_weight"], norm1_bias=affine["norm1_bias"], eps1=1e-6,
            gen_weight=affine["gen_weight"], gen_bias=affine["gen_bias"], eps_g=1e-5, mix=mix, num_prefix=self.P,
        )  # fmt: skip
        if self.tasks is not None:
            args["task"] = torch.tensor(self.tasks, dtype=torch.int64, device=device)
        return args


Shape = Attention | Project


def call(shape: Shape, backend: str, args: Args) -> tuple[torch.Tensor, ...]:
    """The public op on ``backend``; its outputs as a tuple."""
    out = getattr(ops, shape.op)(**args, backend=backend)
    return out if isinstance(out, tuple) else (out,)


def oracle(shape: Shape, args: Args) -> tuple[torch.Tensor, ...]:
    """The plain reference (:mod:`.composite`); its outputs as a tuple."""
    out = getattr(composite, f"{shape.op}_reference")(**args)
    return out if isinstance(out, tuple) else (out,)


def trained(args: Args) -> list[str]:
    """The names of the inputs that require a gradient."""
    return [name for name, a in args.items() if isinstance(a, torch.Tensor) and a.requires_grad]


def fresh(args: Args, dtype: Optional[torch.dtype] = None, requires_grad: Optional[bool] = None) -> Args:
    """Detached copies (in ``dtype``) that require a gradient where the originals do (or as
    ``requires_grad`` says)."""

    def copy(a: torch.Tensor) -> torch.Tensor:
        if not a.is_floating_point():  # task indices
            return a
        grad = a.requires_grad if requires_grad is None else requires_grad
        return a.detach().to(dtype or a.dtype).requires_grad_(grad)

    return {name: copy(a) if isinstance(a, torch.Tensor) else a for name, a in args.items()}


def random_like(tensors, seed: int, dtype: Optional[torch.dtype] = None) -> list[torch.Tensor]:
    """Deterministic random tensors shaped like ``tensors`` (cotangents, directions), in their
    dtype or ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    return [_randn(gen, *t.shape).to(t.device, dtype or t.dtype) for t in tensors]


def vjp(fn, args: Args, cotangents=None, dtype: Optional[torch.dtype] = None):
    """``fn(args)``, the gradient of ``sum <cotangent, output>`` for every trained input (by name),
    and the cotangents: deterministic random ones (with values of ``dtype``) unless given."""
    names = trained(args)
    outs = fn(args)
    if cotangents is None:
        cotangents = [c.to(o.dtype) for c, o in zip(random_like(outs, 1, dtype), outs)]
    # Inputs an output does not depend on get zeros (the backends return zeros for them).
    grads = torch.autograd.grad(outs, [args[n] for n in names], cotangents, materialize_grads=True) if names else []
    return outs, dict(zip(names, grads)), cotangents


def exact_vjp(shape: Shape, args: Args, cotangents):
    """:func:`vjp` of the plain reference in float64 on the same input and cotangent values."""
    outs, grads, _ = vjp(lambda a: oracle(shape, a), fresh(args, torch.float64), [c.double() for c in cotangents])
    return outs, grads


class Expected(NamedTuple):
    cotangents: list  # in the inputs' dtype: what the backend's vjp takes
    outs: tuple  # float64 reference on the same values
    grads: dict
    plain_outs: Optional[tuple]  # plain reference computed in the inputs' dtype (16-bit dtypes only)
    plain_grads: Optional[dict]


def expected_values(shape: Shape, dtype: torch.dtype, device: str, seed: int = 0) -> Expected:
    """The expected values of ``shape.inputs(dtype, device, seed)``, computed once for all backends
    (:func:`grid` puts a shape's cases next to each other)."""
    return _expected_values(type(shape), shape, dtype, device, seed)


@functools.lru_cache(maxsize=8)
def _expected_values(_, shape: Shape, dtype: torch.dtype, device: str, seed: int) -> Expected:
    args = shape.inputs(dtype, device, seed)
    outs, grads, cotangents = vjp(lambda a: oracle(shape, a), fresh(args, torch.float64), dtype=dtype)
    cotangents = [c.to(dtype) for c in cotangents]
    plain_outs = plain_grads = None
    if dtype in LOW:
        plain_outs, plain_grads = plain_values(shape, args, cotangents)
    return Expected(cotangents, tuple(o.detach() for o in outs), grads, plain_outs, plain_grads)


def plain_values(shape: Shape, args: Args, cotangents: list) -> tuple[tuple, dict]:
    """The outputs and gradients of the plain formulation computed in the inputs' dtype."""
    plain_outs, plain_grads, _ = vjp(lambda a: oracle(shape, a), args, cotangents)
    return tuple(o.detach() for o in plain_outs), plain_grads


def skip_outside_contract(shape: Shape, args: Args, backend: str) -> None:
    """Skip a case the backend's contract refuses (e.g. a head dim above its limit); the contract
    tests below check the refusal itself."""
    if shape.op == "prefix_attention":
        tensors = [args[n] for n in ("q", "k", "v", "k_prefix", "v_prefix")]
        rules = library.prefix_attention_rules(*tensors, args["scale"], library.attention_dtype(*tensors), backend)
    else:
        names = ("x", "norm1_weight", "norm1_bias", "gen_weight", "gen_bias", "mix", "num_prefix")
        rules = library.norm_and_project_rules(*(args[n] for n in names), backend, args.get("task"))
    reason = library.violation(rules)
    if reason is not None:
        pytest.skip(f"outside the contract: {reason}")


# --------------------------------------------------------------------------------------------
# the tables
# --------------------------------------------------------------------------------------------

# ViT sizes: T = 1 + 196 (224 px, patch 16) or 1 + 576 (384 px: the native CPU kernels' second
# key block), head dims 64 (ViT-S, B, L), 80 (ViT-H/14) and 128 (the native CUDA kernels' largest);
# widths d = 384 (S), 768 (B), 1024 (L). Per channel, N is cut where the interpreter is too slow,
# never d.
ATTENTION_VIT = {
    "attn-vit-s-d64": Attention(2, 197, 2, 64, 10),
    "attn-vit-h-d80-np50": Attention(1, 197, 1, 80, 50, "broadcast"),
    "attn-vit-d128-np1": Attention(1, 197, 1, 128, 1, "broadcast"),
    "attn-vit-384px-d64": Attention(1, 577, 1, 64, 10, "broadcast"),
}
ATTENTION_SMALL = {
    "attn-np1-broadcast": Attention(1, 17, 3, 48, 1, "broadcast"),
    "attn-odd-dim-expanded": Attention(2, 9, 2, 33, 7, "expand", scale_factor=1.7),
    "attn-strided": Attention(2, 11, 3, 16, 4, "broadcast", "strided", scale_factor=0.6),
    "attn-strided-batch": Attention(2, 50, 1, 24, 10, "batch", "strided"),
    "attn-np50-d80": Attention(3, 50, 1, 80, 50, "broadcast"),
    "attn-d96": Attention(1, 13, 2, 96, 4, "broadcast"),
    "attn-d256": Attention(1, 9, 1, 256, 3),
    "attn-np256": Attention(1, 20, 1, 32, 256, "broadcast"),
}
ATTENTION_TINY = {  # gradcheck-sized
    "attn-tiny": Attention(2, 4, 1, 3, 2, scale_factor=1.3),
    "attn-tiny-strided": Attention(3, 3, 2, 2, 2, "broadcast", "strided"),
}
PROJECT_VIT = {
    "project-vit-s-d384": Project(2, 1, 196, 384, 10),
    "project-vit-s-d384-tasks": Project(4, 1, 196, 384, 10, tasks=(2, 0, 2, 1), K=4),
    "project-vit-b-d768": Project(2, 1, 196, 768, 10),
    "project-vit-l-d1024-np50": Project(1, 1, 196, 1024, 50),
    "project-vit-s-d384-per-channel": Project(2, 1, 48, 384, 10, "per-channel"),
    "project-vit-b-d768-per-channel": Project(2, 1, 24, 768, 10, "per-channel"),
    "project-vit-l-d1024-per-channel-frozen": Project(1, 4, 16, 1024, 12, "per-channel", "frozen"),
}
PROJECT_SMALL = {
    "project-no-prefix-np1": Project(1, 0, 35, 16, 1),
    "project-registers-np50-per-channel": Project(3, 4, 12, 8, 50, "per-channel"),
    "project-odd-dim-no-affine": Project(2, 2, 9, 33, 7, affine="none"),
    "project-odd-dim-no-affine-per-channel": Project(2, 2, 9, 33, 7, "per-channel", "none"),
    "project-d65-frozen": Project(2, 1, 49, 65, 10, affine="frozen"),
    "project-d65-frozen-per-channel": Project(2, 1, 49, 65, 10, "per-channel", "frozen"),
    "project-np256": Project(1, 1, 24, 40, 256),
    "project-np256-per-channel": Project(1, 1, 12, 20, 256, "per-channel"),
    # Many tasks: task 1 has no image (zero gradients), images of one task are not adjacent.
    "project-tasks": Project(5, 1, 49, 24, 10, tasks=(2, 0, 2, 2, 0), K=3),
    "project-tasks-per-channel": Project(5, 2, 12, 33, 3, "per-channel", tasks=(0, 2, 2, 0, 2), K=3),
    "project-tasks-one-image-each-no-affine": Project(3, 0, 7, 17, 17, affine="none", tasks=(1, 0, 2), K=3),
    "project-tasks-frozen-per-channel": Project(2, 1, 9, 8, 3, "per-channel", "frozen", tasks=(0, 0), K=1),
    "project-tasks-np1-d3": Project(4, 1, 5, 3, 1, tasks=(1, 1, 0, 1), K=2),
}
PROJECT_TINY = {
    "project-tiny": Project(2, 1, 4, 5, 3),
    "project-tiny-per-channel-no-affine": Project(2, 1, 4, 5, 3, "per-channel", "none"),
    "project-tiny-frozen": Project(1, 2, 3, 4, 2, affine="frozen"),
    "project-tiny-tasks": Project(3, 1, 4, 5, 2, tasks=(1, 0, 1), K=3),
    "project-tiny-tasks-per-channel": Project(3, 1, 3, 4, 2, "per-channel", tasks=(0, 2, 0), K=3),
}
VIT = {**ATTENTION_VIT, **PROJECT_VIT}
TINY = {**ATTENTION_TINY, **PROJECT_TINY}
SHAPES = {**VIT, **ATTENTION_SMALL, **PROJECT_SMALL, **TINY}


def grid(cases, shapes: dict[str, Shape]):
    """Every ``(backend, device[, dtype])`` case with every shape; ViT sizes under Triton's
    interpreter are ``slow``."""
    params = []
    for name, shape in shapes.items():
        for case in cases:
            backend, device = case.values[:2]
            marks = list(case.marks)
            if backend == "triton" and device == "cpu" and name in VIT:
                marks.append(pytest.mark.slow)
            params.append(pytest.param(*case.values, shape, marks=marks, id=f"{name}-{case.id}"))
    return params


def exact_cases():
    """``(backend, device, dtype)`` for every backend, device and float64/float32 taken there."""
    return kernel_cases(*BACKENDS, dtypes=EXACT)


# --------------------------------------------------------------------------------------------
# against the plain references
# --------------------------------------------------------------------------------------------


def assert_matches_reference(shape: Shape, backend: str, device: str, dtype: torch.dtype, seed: int = 0) -> None:
    """Every output (with and without grad mode) and every gradient against the float64 reference."""
    args = shape.inputs(dtype, device, seed)
    skip_outside_contract(shape, args, backend)
    expected = expected_values(shape, dtype, device, seed)
    outs, grads, _ = vjp(lambda a: call(shape, backend, a), args, expected.cotangents)
    tol = TOL[dtype]
    plain = functools.cache(lambda: plain_values(shape, args, expected.cotangents))

    def judge(value: torch.Tensor, exact: torch.Tensor, plain_value, what: str) -> None:
        """Within ``tol`` of the float64 answer, or within twice the error of the plain formulation
        computed in ``dtype`` (the rule of 16-bit dtypes), which only exceeds ``tol / 2`` where
        rounding alone spoils the answer: a residue of cancelling terms (see the strategies below)."""
        if max_rel_err(value.double(), exact) < tol:
            return
        plain_error = max_rel_err(plain_value().double(), exact)
        assert_close_rel(value.double(), exact, max(tol, 2 * plain_error),
                         f"{what} (the plain formulation in {dtype}: {plain_error:.2e} off)")  # fmt: skip

    for i, (name, out, exact) in enumerate(zip(shape.outputs, outs, expected.outs)):
        judge(out, exact, lambda i=i: plain()[0][i], f"{shape.op} {name}")
    if backend in OTHER_PATH_WITHOUT_GRAD:
        with torch.no_grad():
            for i, (name, out, exact) in enumerate(zip(shape.outputs, call(shape, backend, args), expected.outs)):
                judge(out, exact, lambda i=i: plain()[0][i], f"{shape.op} {name} (no grad mode)")
    assert grads.keys() == expected.grads.keys()
    for name, exact in expected.grads.items():
        judge(grads[name], exact, lambda name=name: plain()[1][name], f"{shape.op} d{name}")
    if backend in ops.KERNEL_BACKENDS and shape.op == "prefix_attention":
        out = outs[0]
        assert out.stride(-1) == 1 and out.transpose(1, 2).is_contiguous(), "out is laid out as (B, T, H, D)"


@pytest.mark.parametrize("backend, device, dtype, shape", grid(exact_cases(), SHAPES))
def test_matches_reference(backend, device, dtype, shape):
    assert_matches_reference(shape, backend, device, dtype)


# A broadcast prefix's key gradient is a sum over all B * T query rows that can cancel: with a
# single head, prompt and channel it is one number, the residue of terms up to ~800 times larger
# (measured on drawn cases), and float32 rounding alone then exceeds 1e-5 of it on every backend,
# the plain formulation included. From 8 channels the largest element of the gradient, which the
# relative error is measured against, is rarely such a residue: with one query and one prompt
# (two keys) every score gradient is the difference of two products, and every element of dq, dk
# and dk_prefix a multiple of it (drawn once: dk_prefix 1.44e-5 off on torch and the plain
# formulation, 2.44e-5 on native; dq 8.7e-6 on the plain formulation, 1.35e-5 on native).
# assert_matches_reference holds such draws to twice the plain formulation's own error. float64
# takes every head dim.
def attention_shapes_strategy(dtype: torch.dtype):
    min_D = 1 if dtype == torch.float64 else 8
    return st.builds(
        Attention,
        B=st.integers(1, 3), T=st.integers(1, 40), H=st.integers(1, 3), D=st.integers(min_D, 40), Np=st.integers(1, 12),
        prefix=st.sampled_from(["batch", "broadcast", "expand"]), layout=st.sampled_from(["packed", "strided"]),
        scale_factor=st.floats(0.25, 2.0),
    )  # fmt: skip


# A LayerNorm gradient over very few channels is ill-conditioned (dx is what is left of dy after
# its mean and its xhat component are taken out; d = 2 leaves nothing): below 8 channels float32
# rounding alone can exceed 1e-5 of it on every backend. float64 takes them from 3.
@st.composite
def project_shapes_strategy(draw, dtype: torch.dtype):
    """Single-task cases and, as often, cases of 1 to 3 tasks with a task drawn per image."""
    min_d = 3 if dtype == torch.float64 else 8
    B, K = draw(st.integers(1, 3)), draw(st.integers(0, 3))  # K = 0: the single-task op
    tasks = tuple(draw(st.lists(st.integers(0, K - 1), min_size=B, max_size=B))) if K else None
    return Project(
        B, draw(st.integers(0, 3)), draw(st.integers(1, 30)), draw(st.integers(min_d, 48)), draw(st.integers(1, 12)),
        draw(st.sampled_from(["shared", "per-channel"])), draw(st.sampled_from(["affine", "frozen", "none"])),
        tasks=tasks, K=K,
    )  # fmt: skip


# Examples per (backend, device, dtype): Triton's interpreter is slow.
EXAMPLES = {"torch": 30, "native": 30, "triton": 10}


@pytest.mark.parametrize("backend, device, dtype", exact_cases())
def test_random_shapes(backend, device, dtype):
    """:func:`assert_matches_reference` on random shapes of either op."""

    shapes = st.one_of(attention_shapes_strategy(dtype), project_shapes_strategy(dtype))

    @settings(max_examples=EXAMPLES[backend], deadline=None)
    @given(shape=shapes, seed=st.integers(0, 2**16))
    def check(shape, seed):
        assert_matches_reference(shape, backend, device, dtype, seed)

    check()


@pytest.mark.parametrize("backend, device, dtype, shape", grid(kernel_cases(*BACKENDS, dtypes=LOW), VIT))
def test_low_precision(backend, device, dtype, shape):
    """Every output and gradient in float16/bfloat16, against the float64 reference of the same
    input values, no worse than twice the plain reference computed in that precision."""
    args = shape.inputs(dtype, device)
    expected = expected_values(shape, dtype, device)
    outs, grads, _ = vjp(lambda a: call(shape, backend, a), args, expected.cotangents)

    def errors(value: torch.Tensor, plain: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
        return max_rel_err(value.double(), exact), max_rel_err(plain.double(), exact)

    measured = {}
    for name, out, plain, exact in zip(shape.outputs, outs, expected.plain_outs, expected.outs):
        measured[name] = errors(out, plain, exact)
    if backend in OTHER_PATH_WITHOUT_GRAD:
        with torch.no_grad():
            for name, out, plain, exact in zip(shape.outputs, call(shape, backend, args), expected.plain_outs, expected.outs):
                measured[f"{name} (no grad mode)"] = errors(out, plain, exact)
    for name, exact in expected.grads.items():
        measured[f"d{name}"] = errors(grads[name], expected.plain_grads[name], exact)
    worse = {name: errors for name, errors in measured.items() if not errors[0] <= 2 * errors[1]}
    assert not worse, f"{shape.op} {dtype}: (error, plain reference's error) {worse}"


# --------------------------------------------------------------------------------------------
# first and second derivatives
# --------------------------------------------------------------------------------------------


def differentiable(shape: Shape, backend: str, dtype: torch.dtype, device: str):
    """The op as a function of its trained inputs, and those inputs as leaves with their strides."""
    args = shape.inputs(dtype, device)
    names = trained(args)

    def fn(*tensors):
        return call(shape, backend, {**args, **dict(zip(names, tensors))})

    return fn, [args[n].detach().requires_grad_() for n in names]


FLOAT64_CASES = kernel_cases(*BACKENDS, dtypes=(torch.float64,))


@pytest.mark.parametrize("backend, device, dtype, shape", grid(FLOAT64_CASES, TINY))
def test_gradcheck(backend, device, dtype, shape, single_thread):
    """float64 gradcheck of every output, together and each alone (the others then send no
    gradient)."""
    fn, leaves = differentiable(shape, backend, dtype, device)
    assert torch.autograd.gradcheck(fn, leaves)
    if len(shape.outputs) > 1:
        for i, name in enumerate(shape.outputs):
            assert torch.autograd.gradcheck(lambda *t, i=i: fn(*t)[i], leaves), f"{name} alone"


@pytest.mark.parametrize(
    "backend, device, dtype, shape", grid(FLOAT64_CASES, TINY)
)
def test_gradgradcheck(backend, device, dtype, shape, single_thread):
    fn, leaves = differentiable(shape, backend, dtype, device)
    assert torch.autograd.gradgradcheck(fn, leaves)


@pytest.mark.parametrize(
    "backend, device, dtype, shape", grid(exact_cases(), TINY)
)
def test_second_order(backend, device, dtype, shape):
    """First-order gradients taken with ``create_graph`` and a Hessian-vector product through
    them, against the reference's in float64 (Triton's only second-order check: no float64)."""

    def hvp(fn, args, cotangents=None, directions=None):
        names = trained(args)
        outs = fn(args)
        cotangents = random_like(outs, 1) if cotangents is None else cotangents
        grads = torch.autograd.grad(outs, [args[n] for n in names], cotangents, create_graph=True)
        directions = random_like(grads, 2) if directions is None else directions
        inner = sum((g * u).sum() for g, u in zip(grads, directions))
        second = torch.autograd.grad(inner, [args[n] for n in names], allow_unused=True, materialize_grads=True)
        return dict(zip(names, grads)), dict(zip(names, second)), cotangents, directions

    args = shape.inputs(dtype, device)
    grads, second, cotangents, directions = hvp(lambda a: call(shape, backend, a), args)
    cotangents, directions = [c.double() for c in cotangents], [u.double() for u in directions]
    exact_grads, exact_second, _, _ = hvp(lambda a: oracle(shape, a), fresh(args, torch.float64), cotangents, directions)
    tol = TOL[dtype]
    for name in exact_grads:
        assert_close_rel(grads[name].double(), exact_grads[name], tol, f"{shape.op} d{name}")
        assert_close_rel(second[name].double(), exact_second[name], tol, f"{shape.op} Hessian-vector product {name}")


ONE_OUTPUT_SHAPES = {
    **PROJECT_TINY,
    "project-tasks-per-channel": PROJECT_SMALL["project-tasks-per-channel"],
    "project-registers-np50-per-channel": PROJECT_SMALL["project-registers-np50-per-channel"],
    "project-d65-frozen": PROJECT_SMALL["project-d65-frozen"],
}


@pytest.mark.parametrize("output", [0, 1], ids=["h-alone", "g-alone"])
@pytest.mark.parametrize("backend, device, dtype, shape", grid(exact_cases(), ONE_OUTPUT_SHAPES))
def test_gradients_of_one_output(backend, device, dtype, shape, output):
    """The backward kernels when only one of ``norm_and_project``'s outputs gets a gradient."""
    args = shape.inputs(dtype, device)
    skip_outside_contract(shape, args, backend)
    _, grads, cotangents = vjp(lambda a: call(shape, backend, a)[output : output + 1], args)
    _, exact_grads, _ = vjp(
        lambda a: oracle(shape, a)[output : output + 1], fresh(args, torch.float64), [c.double() for c in cotangents]
    )
    for name, exact in exact_grads.items():
        assert_close_rel(grads[name].double(), exact, TOL[dtype], f"d{name} from {shape.outputs[output]} alone")


FUNCTORCH_SHAPES = {
    "attn-odd-dim-expanded": ATTENTION_SMALL["attn-odd-dim-expanded"],
    "attn-strided": ATTENTION_SMALL["attn-strided"],
    "project-odd-dim-no-affine": PROJECT_SMALL["project-odd-dim-no-affine"],
    "project-registers-np50-per-channel": PROJECT_SMALL["project-registers-np50-per-channel"],
    "project-tiny-frozen": PROJECT_TINY["project-tiny-frozen"],
    "project-tasks": PROJECT_SMALL["project-tasks"],
}


@pytest.mark.parametrize(
    "backend, device, dtype, shape", grid(exact_cases(), FUNCTORCH_SHAPES)
)
def test_func_grad_equals_autograd(backend, device, dtype, shape):
    args = shape.inputs(dtype, device)
    names = trained(args)
    _, grads, cotangents = vjp(lambda a: call(shape, backend, a), args)

    def loss(*tensors):
        outs = call(shape, backend, {**args, **dict(zip(names, tensors))})
        return sum((o * c).sum() for o, c in zip(outs, cotangents))

    func_grads = torch.func.grad(loss, argnums=tuple(range(len(names))))(*(args[n].detach() for n in names))
    for name, g in zip(names, func_grads):
        assert_close_rel(g.double(), grads[name].double(), TOL[dtype], f"torch.func.grad d{name}")


@pytest.mark.parametrize("backend, device, dtype, shape", grid(exact_cases(), FUNCTORCH_SHAPES))
def test_vmap_equals_loop(backend, device, dtype, shape):
    """``torch.func.vmap`` over an extra leading dim of the inputs in ``shape.vmapped`` (the others
    shared) equals a loop over it."""
    slices = [shape.inputs(dtype, device, seed, requires_grad=False) for seed in range(3)]
    shared = slices[0]
    stacked = [torch.stack([s[n] for s in slices]) for n in shape.vmapped]

    def fn(*tensors):
        return call(shape, backend, {**shared, **dict(zip(shape.vmapped, tensors))})

    outs = torch.func.vmap(fn)(*stacked)
    loop = [fn(*(s[n] for n in shape.vmapped)) for s in slices]
    for name, out, parts in zip(shape.outputs, outs, zip(*loop)):
        assert_close_rel(out, torch.stack(parts), TOL[dtype], f"vmap {name}")


# --------------------------------------------------------------------------------------------
# behaviours the API docs state
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mix", ["shared", "per-channel"])
@pytest.mark.parametrize("backend, device, dtype", exact_cases())
def test_nan_in_prefix_rows_does_not_reach_the_prompts(backend, device, dtype, mix):
    """The prompts depend on the patch tokens only: a NaN in a prefix row of x (rows < num_prefix)
    reaches neither g nor the gradients of the prompt path (dmix, dgen_weight, dgen_bias), nor
    the patch rows of h and dx."""
    shape = Project(2, 3, 10, 24, 5, mix)
    args = shape.inputs(dtype, device)
    with torch.no_grad():
        args["x"][0, 1] = math.nan
        args["x"][1, 2, 5] = math.nan
    (h, g), grads, cotangents = vjp(lambda a: call(shape, backend, a), args)
    (exact_h, exact_g), exact_grads = exact_vjp(shape, args, cotangents)
    P, tol = shape.P, TOL[dtype]
    assert_close_rel(g.double(), exact_g, tol, "g")
    assert_close_rel(h[:, P:].double(), exact_h[:, P:], tol, "patch rows of h")
    assert_close_rel(grads["x"][:, P:].double(), exact_grads["x"][:, P:], tol, "patch rows of dx")
    for name in ("mix", "gen_weight", "gen_bias"):
        assert_close_rel(grads[name].double(), exact_grads[name], tol, f"d{name}")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no-grad"])
@pytest.mark.parametrize("num_prompts", [3, 7], ids=["12-keys", "16-keys"])
@pytest.mark.parametrize("backend, device, dtype", kernel_cases(*BACKENDS, dtypes=EXACT + LOW))
def test_nan_query_row(backend, device, dtype, grad, value, num_prompts):
    """A query row holding a NaN or an infinity gives a NaN output row (the plain formulation's
    answer) and leaves the other rows as they are (16-bit ones: finite), with and without
    gradients. (PyTorch's fused CPU attention, the torch backend's, returns an infinite bfloat16
    row finite over 16 keys.)"""
    shape = Attention(2, 9, 2, 16, num_prompts, "broadcast")
    args = shape.inputs(dtype, device, requires_grad=False)
    args["q"][1, 0, 4, 2] = value
    args = fresh(args, requires_grad=grad)
    (out,) = call(shape, backend, args)
    (exact,) = oracle(shape, fresh(args, torch.float64))
    assert out[1, 0, 4].isnan().all(), "the output row of the query holding a NaN or an infinity"
    others = torch.ones(out.shape[:3], dtype=torch.bool, device=out.device)
    others[1, 0, 4] = False
    if dtype in LOW:  # their accuracy is the suite's to check
        assert out[others].isfinite().all(), "the other rows"
    else:
        assert_close_rel(out[others].double(), exact[others], TOL[dtype], "the other rows")


def test_sdpa_formulation_keeps_the_autocast_dtype():
    """The ``torch`` backend's GPU formulation (concatenation + SDPA, run here on CPU tensors):
    under autocast its output has SDPA's dtype, even for float32 inputs, and a NaN query row still
    gives a NaN output row."""
    shape = Attention(2, 9, 2, 16, 3, "broadcast")
    args = shape.inputs(torch.float32, "cpu", requires_grad=False)
    args["q"][1, 0, 4, 2] = math.nan
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = composite.prefix_attention(**args)
    assert out.dtype == torch.bfloat16
    assert out[1, 0, 4].isnan().all() and out.isnan().sum() == out.shape[-1]


EMPTY_BATCH = {
    "attn": Attention(0, 7, 2, 16, 3, "broadcast"),
    "project-shared": Project(0, 1, 6, 8, 3),
    "project-per-channel": Project(0, 1, 6, 8, 3, "per-channel"),
    "project-tasks": Project(0, 1, 6, 8, 3, K=2, tasks=()),
    "project-tasks-per-channel": Project(0, 1, 6, 8, 3, "per-channel", K=2, tasks=()),
}


@pytest.mark.parametrize("backend, device, dtype, shape", grid(exact_cases(), EMPTY_BATCH))
def test_empty_batch(backend, device, dtype, shape):
    """Batch 0 runs forward and backward: empty outputs, zero weight and prefix gradients."""
    args = shape.inputs(dtype, device)
    outs, grads, cotangents = vjp(lambda a: call(shape, backend, a), args)
    exact_outs, exact_grads = exact_vjp(shape, args, cotangents)
    for name, out, exact in zip(shape.outputs, outs, exact_outs):
        assert out.shape == exact.shape and out.dtype == dtype, f"{name}: {out.dtype} {tuple(out.shape)}"
    for name, exact in exact_grads.items():
        g = grads[name]
        assert g.shape == exact.shape and torch.equal(g.double(), exact), f"d{name}: {g}"


# --------------------------------------------------------------------------------------------
# the contract
# --------------------------------------------------------------------------------------------


QKV = ("q", "k", "v", "k_prefix", "v_prefix")


class Context(NamedTuple):
    """What a contract case's inputs and words depend on."""

    backend: str
    device: str
    other_device: str  # another device type of this machine
    taken: str  # the dtypes the backend takes on the device, as the contract names them
    refused: torch.dtype  # one it refuses (an integer one where it takes every floating dtype)
    limit: Optional[int]  # its head-dim limit on the device
    head_dim: int  # a head dim it refuses: above the limit, else 0


def _context(backend: str, device: str) -> Context:
    taken = library.input_dtypes(backend, device)
    refused = next((d for d in (torch.float16, torch.float64, torch.bfloat16) if d not in taken), torch.int32)
    limit = library.MAX_HEAD_DIM.get(backend, {}).get(device)
    names = ", ".join(str(d).removeprefix("torch.") for d in taken) or "no"
    other = "cuda" if device == "cpu" else "cpu"
    return Context(backend, device, other, names, refused, limit, 0 if limit is None else limit + 1)


def _prefix(size: tuple, c: Context) -> Args:
    return dict(k_prefix=torch.randn(size, device=c.device), v_prefix=torch.randn(size, device=c.device))


def _mix(t: torch.Tensor, c: Context) -> Args:
    return dict(mix=t.to(c.device))


ATTENTION_OK, PROJECT_OK = Attention(2, 5, 2, 8, 3, "broadcast"), Project(2, 1, 5, 8, 3)
TASKS_OK = Project(2, 1, 5, 8, 3, tasks=(1, 0), K=2)
PREFIX_WORDS = "k_prefix must be (B or 1, H, Np >= 1, D) = (2 or 1, 2, Np, 8), got "
DTYPE_WORDS = (
    "backend '{backend}' takes {taken} inputs on {device}, got {refused_name}; "
    "convert the model, or use backend='auto' or 'torch'"
)
MIX_WORDS = (
    "mix must be a floating (Np, N) or per-channel (Np, N, d) tensor with Np >= 1, "
    "N = T - num_prefix = 5 and d = 8, got "
)
# Each rule of the contract broken once: case -> (valid inputs, the entries that break the rule
# (from the valid ones and the context), the error, the contract's words, with the context's fields).
CONTRACT = {
    "attn-rank": (
        ATTENTION_OK, lambda a, c: dict(q=a["q"][0]), ValueError, "every input must be 4-D, got q (2, 5, 8)",
    ),
    "attn-qkv-shapes": (
        ATTENTION_OK, lambda a, c: dict(v=a["v"][:, :, :4]), ValueError,
        "q, k, v must share one (B, H, T, D) shape, got (2, 2, 5, 8), (2, 2, 5, 8), (2, 2, 4, 8)",
    ),
    "attn-prefix-lengths": (
        ATTENTION_OK, lambda a, c: dict(v_prefix=a["v_prefix"][:, :, :2]), ValueError,
        "k_prefix and v_prefix must share one shape, got (1, 2, 3, 8) and (1, 2, 2, 8)",
    ),
    "attn-prefix-batch": (
        ATTENTION_OK, lambda a, c: _prefix((3, 2, 3, 8), c), ValueError, PREFIX_WORDS + "(3, 2, 3, 8)",
    ),
    "attn-prefix-heads": (
        ATTENTION_OK, lambda a, c: _prefix((1, 1, 3, 8), c), ValueError, PREFIX_WORDS + "(1, 1, 3, 8)",
    ),
    "attn-no-prefix": (
        ATTENTION_OK, lambda a, c: _prefix((1, 2, 0, 8), c), ValueError, PREFIX_WORDS + "(1, 2, 0, 8)",
    ),
    "attn-dtype": (ATTENTION_OK, lambda a, c: {n: a[n].to(c.refused) for n in QKV}, TypeError, DTYPE_WORDS),
    "attn-head-dim": (
        ATTENTION_OK,
        lambda a, c: ATTENTION_OK._replace(D=c.head_dim).inputs(torch.float32, c.device, requires_grad=False),
        ValueError, "backend '{backend}' takes head dims 1 to {limit_name} on {device}, got {head_dim}",
    ),
    "attn-scale": (ATTENTION_OK, lambda a, c: dict(scale=math.nan), ValueError, "scale must be finite, got nan"),
    "attn-device": (
        ATTENTION_OK, lambda a, c: dict(k_prefix=a["k_prefix"].to(c.other_device)), ValueError,
        "k_prefix must be on {input_device} like the input",
    ),
    "project-rank": (PROJECT_OK, lambda a, c: dict(x=a["x"][0]), ValueError, "x must be (B, T, d), got shape (6, 8)"),
    "project-dtype": (PROJECT_OK, lambda a, c: dict(x=a["x"].to(c.refused)), TypeError, DTYPE_WORDS),
    "project-no-channels": (
        PROJECT_OK,
        lambda a, c: dict(x=a["x"][..., :0], norm1_weight=None, norm1_bias=None, gen_weight=None, gen_bias=None),
        ValueError, "x must have at least one channel, got shape (2, 6, 0)",
    ),
    "project-num-prefix-T": (
        PROJECT_OK, lambda a, c: dict(num_prefix=6), ValueError,
        "num_prefix must be in [0, T) = [0, 6) so that patch tokens remain, got 6",
    ),
    "project-num-prefix-negative": (
        PROJECT_OK, lambda a, c: dict(num_prefix=-1), ValueError,
        "num_prefix must be in [0, T) = [0, 6) so that patch tokens remain, got -1",
    ),
    "project-affine-shape": (
        PROJECT_OK, lambda a, c: dict(norm1_weight=torch.ones(9, device=c.device)), ValueError,
        "norm1_weight must be a floating (d,) = (8,) tensor, got torch.float32 (9,)",
    ),
    "project-affine-dtype": (
        PROJECT_OK, lambda a, c: dict(gen_bias=torch.zeros(8, dtype=torch.int32, device=c.device)), ValueError,
        "gen_bias must be a floating (d,) = (8,) tensor, got torch.int32 (8,)",
    ),
    "project-mix-columns": (
        PROJECT_OK, lambda a, c: _mix(torch.randn(3, 6), c), ValueError, MIX_WORDS + "torch.float32 (3, 6)",
    ),
    "project-mix-channels": (
        PROJECT_OK, lambda a, c: _mix(torch.randn(3, 5, 7), c), ValueError, MIX_WORDS + "torch.float32 (3, 5, 7)",
    ),
    "project-mix-no-prompts": (
        PROJECT_OK, lambda a, c: _mix(torch.randn(0, 5), c), ValueError, MIX_WORDS + "torch.float32 (0, 5)",
    ),
    "project-mix-rank": (PROJECT_OK, lambda a, c: _mix(torch.randn(5), c), ValueError, MIX_WORDS + "torch.float32 (5,)"),
    "project-mix-dtype": (
        PROJECT_OK, lambda a, c: _mix(torch.ones(3, 5, dtype=torch.int64), c), ValueError,
        MIX_WORDS + "torch.int64 (3, 5)",
    ),
    "project-device": (
        PROJECT_OK, lambda a, c: dict(gen_weight=a["gen_weight"].to(c.other_device)), ValueError,
        "gen_weight must be on {input_device} like the input",
    ),
    "project-task-length": (
        TASKS_OK, lambda a, c: dict(task=torch.zeros(3, dtype=torch.int64, device=c.device)), ValueError,
        "task must be an int64 (B,) = (2,) tensor of task indices, got torch.int64 (3,)",
    ),
    "project-task-dtype": (
        TASKS_OK, lambda a, c: dict(task=a["task"].int()), ValueError,
        "task must be an int64 (B,) = (2,) tensor of task indices, got torch.int32 (2,)",
    ),
    "project-task-mix-not-stacked": (
        TASKS_OK, lambda a, c: _mix(torch.randn(3, 5), c), ValueError,
        "with task, mix must be stacked per task, (K, Np, N) or (K, Np, N, d), got (3, 5)",
    ),
    "project-task-mix-columns": (
        TASKS_OK, lambda a, c: _mix(torch.randn(2, 3, 6), c), ValueError,
        "mix must be a floating (K, Np, N) or per-channel (K, Np, N, d) tensor with Np >= 1, N = T - num_prefix = 5 "
        "and d = 8, got torch.float32 (2, 3, 6)",
    ),
    "project-task-affine-not-stacked": (
        TASKS_OK, lambda a, c: dict(gen_weight=torch.ones(8, device=c.device)), ValueError,
        "gen_weight must be a floating (K, d) = (2, 8) tensor, got torch.float32 (8,)",
    ),
    "project-task-affine-tasks": (
        TASKS_OK, lambda a, c: dict(gen_bias=torch.zeros(3, 8, device=c.device)), ValueError,
        "gen_bias must be a floating (K, d) = (2, 8) tensor, got torch.float32 (3, 8)",
    ),
    "project-task-device": (
        TASKS_OK, lambda a, c: dict(task=a["task"].to(c.other_device)), ValueError,
        "task must be on {input_device} like the input",
    ),
}  # fmt: skip


def _contract_params():
    """Every case of :data:`CONTRACT` on every backend (``reference`` included) and device; the
    device cases need a second device type."""
    params = []
    for case in CONTRACT:
        needs = [pytest.mark.skip(reason="needs a second device type")] if case.endswith("device") else []
        for p in kernel_cases("reference", *BACKENDS):
            marks = [*p.marks, *(needs if len(DEVICES) < 2 else [])]
            params.append(pytest.param(*p.values, case, marks=marks, id=f"{case}-{p.id}"))
    return params


def _message_text(error: Optional[BaseException]) -> str:
    """An error's message and those of the errors it was raised from (torch.compile wraps)."""
    texts = []
    while error is not None:
        texts.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(texts)


@pytest.mark.parametrize("backend, device, case", _contract_params())
def test_contract_refuses(backend, device, case):
    """Each rule refuses with its words on every backend: eagerly, under
    ``torch.compile(fullgraph=True)``, and in the fake of a kernel backend's forward op."""
    shape, breaks, error, words = CONTRACT[case]
    c = _context(backend, device)
    valid = shape.inputs(torch.float32, device, requires_grad=False)
    args = {**valid, **breaks(valid, c)}
    fields = dict(
        c._asdict(), refused_name=str(c.refused).removeprefix("torch."), limit_name=c.limit or "any",
        input_device=args["q" if shape.op == "prefix_attention" else "x"].device,
    )  # fmt: skip
    message = f"{shape.op}: {words.format(**fields)}"
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        call(shape, backend, args)

    tensors = {n: a for n, a in args.items() if isinstance(a, torch.Tensor)}
    torch._dynamo.reset()
    compiled = torch.compile(lambda *t: call(shape, backend, {**args, **dict(zip(tensors, t))}), fullgraph=True)
    with pytest.raises(Exception) as raised:
        compiled(*tensors.values())
    assert message in _message_text(raised.value), _message_text(raised.value)

    if backend in ops.KERNEL_BACKENDS:
        ops._load(backend)
        forward = getattr(library.KERNELS[backend], f"{shape.op}_fwd")
        with FakeTensorMode() as mode, pytest.raises(error, match=f"^{re.escape(message)}$"):
            forward(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args.values()))


@pytest.mark.parametrize("bad", [-1, 2])
@pytest.mark.parametrize("backend, device", kernel_cases("reference", *BACKENDS))
def test_task_indices_out_of_range_are_refused(backend, device, bad):
    """A task index outside ``[0, K)`` is an IndexError before any kernel runs (a data rule: the
    values are read); while compiling, a runtime assertion of the graph with the same words."""
    args = TASKS_OK.inputs(torch.float32, device, requires_grad=False)
    args["task"] = torch.tensor([0, bad], device=device)
    words = "norm_and_project: task indices must lie in [0, 2), one per image"
    with pytest.raises(IndexError, match=re.escape(f"{words}; got values from {min(0, bad)} to {max(0, bad)}")):
        call(TASKS_OK, backend, args)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, task: call(TASKS_OK, backend, {**args, "x": x, "task": task}), fullgraph=True)
    with pytest.raises(RuntimeError) as raised:
        compiled(args["x"], args["task"])
    assert words in _message_text(raised.value)


def _auto_expectation(op: str, device: str, dtype: torch.dtype, head_dim: Optional[int]) -> str:
    """``auto``'s pick, worked out from the contract's tables: the first backend of the op's
    preference on the device that can run here, takes ``dtype`` and (for attention) ``head_dim``;
    else torch."""
    for backend in ops.AUTO_PREFERENCE[op].get(device, ()):
        limit = library.MAX_HEAD_DIM.get(backend, {}).get(device)
        fits = head_dim is None or limit is None or head_dim <= limit
        if ops.unavailable_reason(backend, device) is None and dtype in library.input_dtypes(backend, device) and fits:
            return backend
    return "torch"


def test_auto_picks_by_the_contract():
    assert ops.auto_backend("cpu", torch.float16) == "torch", "native CPU kernels take no float16"
    native_cpu = ops.unavailable_reason("native", "cpu") is None
    assert ops.auto_backend("cpu", torch.float64) == ("native" if native_cpu else "torch")
    for device in DEVICES:
        for dtype in library.FLOATING:
            for head_dim in (8, 64, 128, 200, 300):
                assert ops.auto_backend(device, dtype, head_dim) == _auto_expectation(
                    "prefix_attention", device, dtype, head_dim
                ), (device, dtype, head_dim)
            assert ops.auto_backend(device, dtype, op="norm_and_project") == _auto_expectation(
                "norm_and_project", device, dtype, None
            ), (device, dtype)


def test_auto_on_cuda_sends_attention_to_sdpa_until_measured():
    """The CUDA preference is the README's stated expectation: attention on PyTorch's flash SDPA
    (the torch backend there), norm_and_project on Triton first."""
    assert ops.AUTO_PREFERENCE["prefix_attention"]["cuda"] == ("torch",)
    assert ops.AUTO_PREFERENCE["norm_and_project"]["cuda"][0] == "triton"
    message = "unknown VAPT op 'attention'; choose one of norm_and_project, prefix_attention"
    with pytest.raises(ValueError, match=message):
        ops.auto_backend("cpu", op="attention")


@pytest.mark.parametrize("dtype", library.FLOATING, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape", [ATTENTION_OK, Attention(1, 5, 1, 300, 2), PROJECT_OK], ids=["attn", "attn-d300", "project"]
)
def test_auto_runs_every_floating_input(shape, device, dtype):
    """``auto`` never fails on a floating input the torch backend takes, and runs it as the backend
    its contract picks."""
    args = shape.inputs(dtype, device)
    head_dim = args["q"].shape[-1] if shape.op == "prefix_attention" else None
    expected = _auto_expectation(shape.op, device, dtype, head_dim)
    outs = call(shape, "auto", args)
    picked = call(shape, expected, args)
    for name, out, want in zip(shape.outputs, outs, picked):
        assert torch.equal(out, want), f"{name}: auto did not run as {expected}"


# --------------------------------------------------------------------------------------------
# the kernel ops of the kernel backends
# --------------------------------------------------------------------------------------------


def kernel_ops(backend: str):
    """The ``torch.ops`` namespace of a kernel backend's four ops (registered on first use)."""
    ops._load(backend)
    return getattr(torch.ops, "vapt" if backend == "native" else "vapt_triton")


def _kernel_inputs(shape: Shape, device: str) -> tuple:
    """``shape``'s float32 inputs as the public op hands them to the forward kernel op (no
    gradient: the kernel ops have no autograd of their own, the public op's Function has it)."""
    a = shape.inputs(torch.float32, device, requires_grad=False)
    if shape.op == "norm_and_project":
        return tuple(a[n].contiguous() if isinstance(a[n], torch.Tensor) else a[n] for n in a)
    return tuple(a.values())


OPCHECK_SHAPES = {
    "project-shared": Project(2, 1, 9, 8, 3),
    "project-per-channel-no-affine": Project(2, 1, 9, 8, 3, "per-channel", "none"),
    "project-tasks": Project(3, 1, 9, 8, 3, tasks=(1, 0, 1), K=2),
    "project-tasks-per-channel": Project(3, 1, 9, 8, 3, "per-channel", tasks=(1, 0, 1), K=2),
    "attn-broadcast": Attention(2, 11, 2, 16, 3, "broadcast"),
    "attn-expand": Attention(2, 11, 2, 16, 3, "expand"),
}


@pytest.mark.parametrize("backend, device", kernel_cases())
@pytest.mark.parametrize("shape", OPCHECK_SHAPES.values(), ids=OPCHECK_SHAPES.keys())
def test_opcheck(backend, device, shape):
    namespace = kernel_ops(backend)
    forward = getattr(namespace, f"{shape.op}_fwd").default
    backward = getattr(namespace, f"{shape.op}_bwd").default
    args = _kernel_inputs(shape, device)
    torch.library.opcheck(forward, args)
    outs = forward(*args)
    if shape.op == "norm_and_project":
        x, w1, _, _, wg, bg, _, mix, P, *task = args
        h, g, mean, rstd1, rstd_g = outs
        bwd_args = (*random_like((h, g), 1), x, w1, wg, bg, mix, mean, rstd1, rstd_g, P, *task)
    else:
        out, lse = outs
        bwd_args = (*random_like((out,), 1), *args[:5], out, lse, args[5])
    torch.library.opcheck(backward, bwd_args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend, device", kernel_cases())
@pytest.mark.parametrize(
    "shape", [Attention(2, 23, 2, 16, 5, "expand"), Attention(1, 70, 1, 80, 50)], ids=["expand", "np50"]
)
def test_lse_is_logsumexp(backend, device, shape):
    q, k, v, kp, vp, scale = _kernel_inputs(shape, device)
    _, lse = kernel_ops(backend).prefix_attention_fwd(q, k, v, kp, vp, scale)
    keys = torch.cat((kp.expand(shape.B, -1, -1, -1), k), 2).double()
    assert_close_rel(lse.double(), (q.double() @ keys.transpose(-1, -2) * scale).logsumexp(-1), 1e-6, "lse")


# --------------------------------------------------------------------------------------------
# availability and build
# --------------------------------------------------------------------------------------------


def test_kernel_backends_run_in_ci():
    """CI must not silently skip the kernel tests: the native CPU kernels are built by `make test`
    (with their CUDA twins wherever a toolkit is on the PATH, which proves they compile and link),
    the Triton kernels run through the interpreter."""
    from vapt_kernels.ops import native

    if not os.environ.get("CI"):
        pytest.skip("only asserted in CI")
    assert ops.unavailable_reason("native", "cpu") is None
    assert ops.unavailable_reason("triton", "cpu") is None
    if shutil.which("nvcc"):
        assert native.build_info().get("cuda") is True, native.build_info()


def test_extension_has_cuda_kernels_when_built_with_cuda():
    from vapt_kernels.ops import native

    if native.LOAD_ERROR is not None:
        pytest.skip(native.LOAD_ERROR)
    info = native.build_info()
    assert native.has_device_kernels("cpu")
    assert native.has_device_kernels("cuda") == bool(info.get("cuda")), info


def _lower_simd_variants() -> list[str]:
    """The CPU capabilities below this CPU's whose SIMD variants the native kernels also carry:
    the baseline (what a CPU without AVX2 runs) and, under AVX-512, AVX2."""
    here = torch.backends.cpu.get_cpu_capability()
    lower = {"AVX512": ["AVX2", "DEFAULT"], "AVX2": ["DEFAULT"]}.get(here, [])
    return lower if ops.unavailable_reason("native", "cpu") is None else []


@pytest.mark.slow
@pytest.mark.parametrize("capability", _lower_simd_variants())
def test_native_cpu_simd_variant_passes_the_op_suite(capability):
    """The native CPU kernels pick their SIMD variant from the CPU capability ATen reports
    (``torch.backends.cpu.get_cpu_capability()``, overridden by ``ATEN_CPU_CAPABILITY``): this
    machine's variant runs the suite above; the lower ones run the suite's native CPU cases of
    every output and gradient against the references, in a process forced to them."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability.lower())
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
         "native-cpu and (test_matches_reference or test_low_precision or test_empty_batch or nan)"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout.splitlines()[-1], run.stdout[-500:]


def test_missing_extension_is_explained(monkeypatch):
    from vapt_kernels.ops import native

    monkeypatch.setattr(native.importlib.util, "find_spec", lambda name: None)
    assert "not installed" in native._load()


def test_stats_dtype():
    assert library.stats_dtype(torch.bfloat16) == torch.float32
    assert library.stats_dtype(torch.float64) == torch.float64
