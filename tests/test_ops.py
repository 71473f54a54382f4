"""The composite ops against their plain references: float64, gradcheck, awkward shapes, low precision."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_close_rel, max_rel_err, prefix_kv, project_inputs, qkv_views
from vapt_kernels import ops
from vapt_kernels.ops import composite as C


ATTENTION_SHAPES = [  # B, T, H, D, Np, prefix batch
    (2, 197, 2, 64, 10, 2),
    (1, 17, 3, 48, 1, 1),
    (3, 50, 1, 80, 50, 1),
    (2, 9, 2, 33, 7, 2),
]


@pytest.mark.parametrize("B, T, H, D, Np, pb", ATTENTION_SHAPES)
def test_prefix_attention_float64(B, T, H, D, Np, pb):
    qkv, (q, k, v) = qkv_views(B, T, H, D, torch.float64)
    _, kp, vp = prefix_kv(pb, H, Np, D, torch.float64)
    out = C.prefix_attention(q, k, v, kp, vp, D**-0.5)
    ref = C.prefix_attention_reference(q, k, v, kp, vp, D**-0.5)
    assert_close_rel(out, ref, 1e-12, "out")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (qkv, kp, vp), dout)
    ref_grads = torch.autograd.grad(ref, (qkv, kp, vp), dout)
    for name, a, b in zip(("dqkv", "dk_prefix", "dv_prefix"), grads, ref_grads):
        assert_close_rel(a, b, 1e-12, name)


@pytest.mark.parametrize("pb", [3, 1])
def test_prefix_attention_gradcheck(pb):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 6, 5, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    kp, vp = (t.detach().requires_grad_() for t in prefix_kv(pb, 2, 3, 5, torch.float64)[1:])
    assert torch.autograd.gradcheck(lambda *a: C.prefix_attention(*a, 0.4), (q, k, v, kp, vp))


def test_prefix_attention_non_contiguous_inputs():
    q = torch.randn(2, 11, 3, 16, dtype=torch.float64).transpose(1, 2)
    k = torch.randn(2, 3, 16, 11, dtype=torch.float64).transpose(2, 3)
    v = torch.randn(2, 3, 11, 32, dtype=torch.float64)[..., ::2]
    kp = torch.randn(1, 3, 16, 4, dtype=torch.float64).transpose(2, 3)
    vp = torch.randn(1, 3, 4, 16, dtype=torch.float64)
    assert_close_rel(C.prefix_attention(q, k, v, kp, vp, 0.25), C.prefix_attention_reference(q, k, v, kp, vp, 0.25), 1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefix_attention_low_precision(dtype):
    """fp32 within 1e-5; bf16 no worse than twice the plain PyTorch path in bf16 (both vs fp32)."""
    qkv, (q, k, v) = qkv_views(2, 197, 2, 64, torch.float32)
    _, kp, vp = prefix_kv(2, 2, 10, 64, torch.float32)
    exact = C.prefix_attention_reference(*(t.double() for t in (q, k, v, kp, vp)), 0.125)
    low = [t.detach().to(dtype) for t in (q, k, v, kp, vp)]
    err = max_rel_err(C.prefix_attention(*low, 0.125).double(), exact)
    if dtype == torch.float32:
        assert err < 1e-5
    else:
        assert err <= 2 * max_rel_err(C.prefix_attention_reference(*low, 0.125).double(), exact)


PROJECT_SHAPES = [(2, 1, 196, 24, 10), (1, 0, 35, 16, 1), (3, 4, 12, 8, 50), (2, 2, 9, 33, 7)]


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("B, P, N, d, Np", PROJECT_SHAPES)
def test_norm_and_project_float64(B, P, N, d, Np, per_channel):
    args = project_inputs(B, P, N, d, Np, per_channel, torch.float64)
    out = ops.norm_and_project(*args, backend="torch")
    ref = C.norm_and_project_reference(*args)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    douts = [torch.randn_like(o) for o in out]
    grads = torch.autograd.grad(out, tensors, douts)
    ref_grads = torch.autograd.grad(ref, tensors, douts)
    for name, a, b in zip(("h", "g"), out, ref):
        assert_close_rel(a, b, 1e-12, name)
    for name, a, b in zip(("x", "w1", "b1", "wg", "bg", "mix"), grads, ref_grads):
        assert_close_rel(a, b, 1e-12, f"d{name}")


@pytest.mark.parametrize("per_channel", [False, True])
def test_norm_and_project_gradcheck(per_channel):
    args = project_inputs(2, 1, 6, 5, 3, per_channel, torch.float64)

    def fn(x, w1, b1, wg, bg, mix):
        return ops.norm_and_project(x, w1, b1, 1e-6, wg, bg, 1e-5, mix, 1, backend="torch")

    assert torch.autograd.gradcheck(fn, tuple(a for a in args if isinstance(a, torch.Tensor)))


def test_norm_and_project_without_affine_and_frozen_norm():
    x = torch.randn(2, 10, 8, dtype=torch.float64, requires_grad=True)
    mix = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    args = [x, None, None, 1e-6, None, None, 1e-5, mix, 1]
    for a, b in zip(ops.norm_and_project(*args, backend="torch"), C.norm_and_project_reference(*args)):
        assert_close_rel(a, b, 1e-12)
    dg = torch.randn(2, 3, 8, dtype=torch.float64)
    g = torch.autograd.grad(ops.norm_and_project(*args, backend="torch")[1], (x, mix), dg)
    g_ref = torch.autograd.grad(C.norm_and_project_reference(*args)[1], (x, mix), dg)
    for a, b in zip(g, g_ref):
        assert_close_rel(a, b, 1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_and_project_low_precision(dtype):
    args = project_inputs(2, 1, 196, 64, 10, False, torch.float32)
    exact = C.norm_and_project_reference(*[a.detach().double() if isinstance(a, torch.Tensor) else a for a in args])
    low = [a.detach().to(dtype) if isinstance(a, torch.Tensor) else a for a in args]
    errs = [max_rel_err(o.double(), e) for o, e in zip(ops.norm_and_project(*low, backend="torch"), exact)]
    if dtype == torch.float32:
        assert max(errs) < 1e-5
    else:
        plain = [max_rel_err(o.double(), e) for o, e in zip(C.norm_and_project_reference(*low), exact)]
        assert all(e <= 2 * p for e, p in zip(errs, plain)), (errs, plain)


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 3), T=st.integers(1, 40), H=st.integers(1, 3), D=st.integers(1, 24),
    Np=st.integers(1, 12), broadcast=st.booleans(), seed=st.integers(0, 2**16),
)
def test_prefix_attention_random_shapes(B, T, H, D, Np, broadcast, seed):
    qkv, (q, k, v) = qkv_views(B, T, H, D, torch.float64, seed)
    _, kp, vp = prefix_kv(1 if broadcast else B, H, Np, D, torch.float64, seed + 1)
    out = C.prefix_attention(q, k, v, kp, vp, D**-0.5)
    ref = C.prefix_attention_reference(q, k, v, kp, vp, D**-0.5)
    assert_close_rel(out, ref, 1e-12, "out")
    grads = torch.autograd.grad(out.square().sum(), (qkv, kp, vp))
    ref_grads = torch.autograd.grad(ref.square().sum(), (qkv, kp, vp))
    for a, b in zip(grads, ref_grads):
        assert_close_rel(a, b, 1e-12, "grad")


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 3), P=st.integers(0, 3), N=st.integers(1, 30), d=st.integers(2, 20),
    Np=st.integers(1, 12), per_channel=st.booleans(), seed=st.integers(0, 2**16),
)
def test_norm_and_project_random_shapes(B, P, N, d, Np, per_channel, seed):
    args = project_inputs(B, P, N, d, Np, per_channel, torch.float64, seed)
    out, ref = ops.norm_and_project(*args, backend="torch"), C.norm_and_project_reference(*args)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    grads = torch.autograd.grad(out[0].square().sum() + out[1].square().sum(), tensors)
    ref_grads = torch.autograd.grad(ref[0].square().sum() + ref[1].square().sum(), tensors)
    for a, b in zip([*out, *grads], [*ref, *ref_grads]):
        assert_close_rel(a, b, 1e-10)
