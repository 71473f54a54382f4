"""The kernel backends (``native``: compiled extension, ``triton``: Triton kernels, through the
interpreter on CPU) against the plain op references, on every device of the machine.

Oracles: the plain references in float64 (native CPU) and float32; float64 gradcheck where the
backend takes float64; low precision judged against a float32 reference, no worse than twice the
torch backend's error in the same precision. Every output is allocated NaN-poisoned.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from conftest import assert_close_rel, kernel_cases, max_rel_err, prefix_kv, project_inputs, qkv_views
from vapt_kernels import ops
from vapt_kernels.ops import composite as C
from vapt_kernels.ops import library

pytestmark = pytest.mark.usefixtures("poison_uninitialized")

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def kernel_ops(backend: str, device: str):
    """The ``torch.ops`` namespace of a kernel backend's four ops (registered on first use)."""
    ops._load(backend)
    return getattr(torch.ops, "vapt" if backend == "native" else "vapt_triton")


# --------------------------------------------------------------------------------------------
# prefix_attention
# --------------------------------------------------------------------------------------------

ATTENTION_SHAPES = [  # B, T, H, D, Np, prefix batch ("expand": batch stride 0)
    pytest.param(2, 197, 2, 64, 10, 2, id="vit-197-np10"),
    pytest.param(1, 17, 3, 48, 1, 1, id="np1-broadcast"),
    pytest.param(3, 50, 1, 80, 50, 1, id="np50-broadcast"),
    pytest.param(2, 9, 2, 33, 7, "expand", id="odd-dim-expanded"),
    pytest.param(2, 7, 1, 16, 3, 2, id="tiny"),
    pytest.param(1, 13, 2, 96, 4, 1, id="dim96"),
    pytest.param(1, 11, 1, 128, 5, 1, id="dim128"),
    pytest.param(1, 20, 1, 32, 256, 1, id="np256"),
]


def attention_case(B, T, H, D, Np, pb, dtype, device):
    qkv, (q, k, v) = qkv_views(B, T, H, D, dtype, device=device)
    kv, kp, vp = prefix_kv(1 if pb in (1, "expand") else pb, H, Np, D, dtype, device=device)
    if pb == "expand":
        kp, vp = kp.expand(B, -1, -1, -1), vp.expand(B, -1, -1, -1)
    return (qkv, kv), (q, k, v, kp, vp)


@pytest.mark.parametrize("backend, device, dtype", kernel_cases(dtypes=(torch.float64, torch.float32)))
@pytest.mark.parametrize("B, T, H, D, Np, pb", ATTENTION_SHAPES)
def test_prefix_attention_matches_reference(backend, device, dtype, B, T, H, D, Np, pb):
    leaves, args = attention_case(B, T, H, D, Np, pb, dtype, device)
    out = ops.prefix_attention(*args, D**-0.5, backend=backend)
    ref = C.prefix_attention_reference(*args, D**-0.5)
    assert out.stride(-1) == 1 and out.transpose(1, 2).is_contiguous(), "out is laid out as (B, T, H, D)"
    assert_close_rel(out, ref, TOL[dtype], "out")
    dout = torch.randn_like(ref)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_grads = torch.autograd.grad(ref, leaves, dout)
    for name, a, b in zip(("dqkv", "dkv_prefix"), grads, ref_grads):
        assert_close_rel(a, b, TOL[dtype], name)


@pytest.mark.parametrize("backend, device", kernel_cases())
def test_prefix_attention_lse(backend, device):
    _, (q, k, v, kp, vp) = attention_case(2, 23, 2, 16, 5, 1, torch.float32, device)
    out, lse = kernel_ops(backend, device).prefix_attention_fwd(q, k, v, kp, vp, 0.3)
    scores = torch.cat((kp.expand(2, -1, -1, -1), k), 2) @ q.transpose(-1, -2) * 0.3
    assert_close_rel(lse, scores.logsumexp(-2), 1e-5, "lse")


@pytest.mark.parametrize("backend, device, dtype", kernel_cases(dtypes=(torch.float64,)))
@pytest.mark.parametrize("pb", [3, 1])
def test_prefix_attention_gradcheck(backend, device, dtype, pb):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 6, 5, generator=gen, dtype=dtype).to(device).requires_grad_() for _ in range(3))
    kp, vp = (torch.randn(pb, 2, 3, 5, generator=gen, dtype=dtype).to(device).requires_grad_() for _ in range(2))
    assert torch.autograd.gradcheck(lambda *a: ops.prefix_attention(*a, 0.4, backend=backend), (q, k, v, kp, vp))


@pytest.mark.parametrize("backend, device, dtype", kernel_cases(dtypes=(torch.float16, torch.bfloat16)))
def test_prefix_attention_low_precision(backend, device, dtype):
    """No worse than twice the torch backend in the same precision, both against float32."""
    leaves, args = attention_case(2, 197, 2, 64, 10, 1, torch.float32, device)
    exact = C.prefix_attention_reference(*args, 0.125)
    dout = torch.randn_like(exact)
    exact_grads = torch.autograd.grad(exact, leaves, dout)

    def errors(which: str) -> list[float]:
        low = [t.detach().to(dtype).requires_grad_() for t in leaves]
        qkv, kv = low
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        kp, vp = kv.permute(2, 0, 3, 1, 4).unbind(0)
        out = ops.prefix_attention(q, k, v, kp, vp, 0.125, backend=which)
        grads = torch.autograd.grad(out, low, dout.to(dtype))
        return [max_rel_err(a.float(), b) for a, b in zip((out, *grads), (exact, *exact_grads))]

    errs, plain = errors(backend), errors("torch")
    assert all(e <= 2 * p for e, p in zip(errs, plain)), (errs, plain)


# --------------------------------------------------------------------------------------------
# norm_and_project
# --------------------------------------------------------------------------------------------

PROJECT_SHAPES = [  # B, P, N, d, Np
    pytest.param(2, 1, 196, 24, 10, id="vit-196-np10"),
    pytest.param(1, 0, 35, 16, 1, id="no-prefix-np1"),
    pytest.param(3, 4, 12, 8, 50, id="registers-np50"),
    pytest.param(2, 2, 9, 33, 7, id="odd-dim"),
]


@pytest.mark.parametrize("backend, device, dtype", kernel_cases(dtypes=(torch.float64, torch.float32)))
@pytest.mark.parametrize("per_channel", [False, True], ids=["shared", "per-channel"])
@pytest.mark.parametrize("B, P, N, d, Np", PROJECT_SHAPES)
def test_norm_and_project_matches_reference(backend, device, dtype, per_channel, B, P, N, d, Np):
    args = project_inputs(B, P, N, d, Np, per_channel, dtype, device=device)
    out = ops.norm_and_project(*args, backend=backend)
    ref = C.norm_and_project_reference(*args)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    douts = [torch.randn_like(o) for o in ref]
    grads = torch.autograd.grad(out, tensors, douts)
    ref_grads = torch.autograd.grad(ref, tensors, douts)
    for name, a, b in zip(("h", "g"), out, ref):
        assert_close_rel(a, b, TOL[dtype], name)
    for name, a, b in zip(("x", "w1", "b1", "wg", "bg", "mix"), grads, ref_grads):
        assert_close_rel(a, b, TOL[dtype], f"d{name}")


@pytest.mark.parametrize("backend, device, dtype", kernel_cases(dtypes=(torch.float64,)))
@pytest.mark.parametrize("per_channel", [False, True], ids=["shared", "per-channel"])
def test_norm_and_project_gradcheck(backend, device, dtype, per_channel):
    args = project_inputs(2, 1, 6, 5, 3, per_channel, dtype, device=device)

    def fn(x, w1, b1, wg, bg, mix):
        return ops.norm_and_project(x, w1, b1, 1e-6, wg, bg, 1e-5, mix, 1, backend=backend)

    assert torch.autograd.gradcheck(fn, tuple(a for a in args if isinstance(a, torch.Tensor)))


@pytest.mark.parametrize("backend, device", kernel_cases())
def test_norm_and_project_without_affine(backend, device):
    x = torch.randn(2, 10, 8, device=device, requires_grad=True)
    mix = torch.randn(3, 9, device=device, requires_grad=True)
    args = [x, None, None, 1e-6, None, None, 1e-5, mix, 1]
    out, ref = ops.norm_and_project(*args, backend=backend), C.norm_and_project_reference(*args)
    dg = torch.randn_like(ref[1])
    grads = torch.autograd.grad(out[1], (x, mix), dg)
    ref_grads = torch.autograd.grad(ref[1], (x, mix), dg)
    for a, b in zip([*out, *grads], [*ref, *ref_grads]):
        assert_close_rel(a, b, 1e-5)


@pytest.mark.parametrize("backend, device, dtype", kernel_cases(dtypes=(torch.float16, torch.bfloat16)))
def test_norm_and_project_low_precision(backend, device, dtype):
    """No worse than twice the torch backend in the same precision, both against float32."""
    args = project_inputs(2, 1, 196, 64, 10, False, torch.float32, device=device)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    exact = C.norm_and_project_reference(*args)
    douts = [torch.randn_like(o) for o in exact]
    exact_grads = torch.autograd.grad(exact, tensors, douts)

    def errors(which: str) -> list[float]:
        low = [a.detach().to(dtype).requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
        low[7] = args[7].detach().clone().requires_grad_()  # the folded matrix stays float32, as in a model
        out = ops.norm_and_project(*low, backend=which)
        low_tensors = [a for a in low if isinstance(a, torch.Tensor)]
        grads = torch.autograd.grad(out, low_tensors, [d.to(dtype) for d in douts])
        return [max_rel_err(a.float(), b) for a, b in zip((*out, *grads), (*exact, *exact_grads))]

    errs, plain = errors(backend), errors("reference")
    assert all(e <= 2 * p for e, p in zip(errs, plain)), (errs, plain)


# --------------------------------------------------------------------------------------------
# registration, availability, errors
# --------------------------------------------------------------------------------------------


def _opcheck_samples(device):
    x, w1, b1, eps1, wg, bg, eps_g, mix, P = project_inputs(2, 1, 9, 8, 3, False, torch.float32, device=device)
    per_channel_mix = torch.randn(3, 9, 8, device=device, requires_grad=True)
    nap = [(x, w1, b1, eps1, wg, bg, eps_g, mix, P), (x, None, None, eps1, wg, bg, eps_g, per_channel_mix, P)]
    _, (q, k, v, kp, vp) = attention_case(2, 11, 2, 16, 3, 1, torch.float32, device)
    pa = [(q, k, v, kp, vp, 0.25)]
    return nap, pa


@pytest.mark.parametrize("backend, device", kernel_cases())
def test_opcheck(backend, device):
    namespace = kernel_ops(backend, device)
    nap, pa = _opcheck_samples(device)
    backward_checks = ("test_schema", "test_faketensor")  # the backward ops have no autograd of their own
    nap = [tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args) for args in nap]
    pa = [tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args) for args in pa]
    for args in nap:
        torch.library.opcheck(namespace.norm_and_project_fwd.default, args)
        h, g, mean, rstd1, rstd_g = namespace.norm_and_project_fwd(*args)
        x, w1, _, _, wg, bg, _, mix, P = args
        grads = (torch.randn_like(h), torch.randn_like(g))
        bwd_args = (*grads, x.detach(), w1, wg, bg, mix.detach(), mean, rstd1, rstd_g, P)
        torch.library.opcheck(namespace.norm_and_project_bwd.default, bwd_args, test_utils=backward_checks)
    for args in pa:
        torch.library.opcheck(namespace.prefix_attention_fwd.default, args)
        out, lse = namespace.prefix_attention_fwd(*args)
        bwd_args = (torch.randn_like(out), *(a.detach() for a in args[:5]), out, lse, args[5])
        torch.library.opcheck(namespace.prefix_attention_bwd.default, bwd_args, test_utils=backward_checks)


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


@pytest.mark.parametrize("backend, device", kernel_cases())
def test_unsupported_dtype_is_refused(backend, device):
    bad = [d for d in (torch.float64, torch.float16) if d not in library.input_dtypes(backend, device)]
    assert bad, "every kernel backend lacks float64 or float16 somewhere"
    x = torch.randn(1, 5, 2, 8, device=device, dtype=bad[0])
    with pytest.raises(TypeError, match=f"backend '{backend}' takes"):
        ops.prefix_attention(x, x, x, x, x, 0.5, backend=backend)


def test_missing_extension_is_explained(monkeypatch):
    from vapt_kernels.ops import native

    monkeypatch.setattr(native.importlib.util, "find_spec", lambda name: None)
    assert "not installed" in native._load()


def test_stats_dtype():
    assert library.stats_dtype(torch.bfloat16) == torch.float32
    assert library.stats_dtype(torch.float64) == torch.float64
