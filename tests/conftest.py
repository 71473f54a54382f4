"""Shared helpers: tiny timm ViTs, deterministic non-trivial prompts, backends per device and
dtype, NaN-poisoned allocations, error reporting."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # The Triton kernels run on CPU tensors only through the interpreter, which must be switched on
    # before they are imported; on a GPU machine they run compiled on CUDA tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from timm.models.vision_transformer import VisionTransformer  # noqa: E402

import vapt_kernels as vk  # noqa: E402
from vapt_kernels import official, ops  # noqa: E402
from vapt_kernels.testing import max_rel_err, poisoned_allocations  # noqa: E402
from vapt_kernels.checkpoint import official_parameters  # noqa: E402
from vapt_kernels.ops import library  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
KERNEL_BACKENDS = ("native", "triton")


def kernel_cases(*backends: str, dtypes: tuple[torch.dtype, ...] = ()):
    """``(backend, device)`` parameters for ``backends`` (default: the kernel backends) on every
    device of this machine, or ``(backend, device, dtype)`` for each of ``dtypes`` that the
    backend's contract takes there (:func:`library.input_dtypes`); a backend that cannot run here
    is skipped with the reason (``test_ops`` asserts that CI runs the CPU ones)."""
    cases = []
    for backend in backends or KERNEL_BACKENDS:
        for device in DEVICES:
            reason = ops.unavailable_reason(backend, device)
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            if not dtypes:
                cases.append(pytest.param(backend, device, marks=marks, id=f"{backend}-{device}"))
            for dtype in dtypes:
                if dtype in library.input_dtypes(backend, device):
                    name = str(dtype).removeprefix("torch.")
                    cases.append(pytest.param(backend, device, dtype, marks=marks, id=f"{backend}-{device}-{name}"))
    return cases


# Fast backends that run float64 on CPU tensors: the composite path and, when built, the native
# C++ kernels; the oracle comparisons at 1e-10 run over these.
FLOAT64_BACKENDS = [pytest.param("torch", id="torch")] + [
    pytest.param(*p.values[:1], marks=p.marks, id=p.values[0]) for p in kernel_cases("native") if p.values[1] == "cpu"
]

@pytest.fixture
def poison_uninitialized():
    """Every tensor allocated uninitialised is NaN for the test's duration (the self-test's
    :func:`vapt_kernels.testing.poisoned_allocations`)."""
    with poisoned_allocations():
        yield


def tiny_vit(**kwargs) -> VisionTransformer:
    """A 3-block ViT on a 4x4 patch grid (32x32 images, patch 8), float64, in eval mode."""
    args = dict(img_size=32, patch_size=8, embed_dim=24, depth=3, num_heads=2, num_classes=5, mlp_ratio=2.0)
    args.update(kwargs)
    return VisionTransformer(**args).double().eval()


def randomize_prompts(model, seed: int = 0) -> None:
    """Give every prompt parameter non-trivial values (the official init zeroes the token
    projector, which would hide most of the prompt path from a comparison)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.vapt.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)


def images(model, batch: int = 2, size=None, seed: int = 1) -> torch.Tensor:
    size = size or model.patch_embed.img_size
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *size, generator=gen, dtype=torch.float64)


def assert_close_rel(a: torch.Tensor, b: torch.Tensor, tol: float, what: str = "") -> None:
    """Relative check that says where the worst mismatch is."""
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    err = max_rel_err(a, b)
    if not err < tol:
        idx = (a - b).abs().argmax().item()
        pos = torch.unravel_index(torch.tensor(idx), a.shape)
        raise AssertionError(
            f"{what}: relative error {err:.3e} >= {tol:.1e}; worst at {tuple(int(i) for i in pos)}: "
            f"{a.flatten()[idx].item()!r} vs {b.flatten()[idx].item()!r}"
        )


def forward_and_grads(model, x: torch.Tensor, backend: str):
    """Logits, input gradient and the gradient of every trainable parameter under ``backend``."""
    vk.set_backend(model, backend)
    x = x.clone().requires_grad_()
    out = model(x)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out * weights).sum(), [x, *params])
    module = getattr(model, "_orig_mod", model)  # names without torch.compile's wrapper prefix
    names = ["input"] + [n for n, p in module.named_parameters() if p.requires_grad]
    return out.detach(), dict(zip(names, grads))


def oracle_and_grads(model, x: torch.Tensor, params=None):
    """Logits and gradients (as :func:`forward_and_grads`) of the literal official formulation
    (:func:`vapt_kernels.official.forward`) with the model's backbone and prompt parameters, or
    with ``params`` (official names) in their place."""
    x = x.clone().requires_grad_()
    module = getattr(model, "_orig_mod", model)
    official_params = official_parameters(module) if params is None else params
    out = official.forward(module, official_params, module.vapt.config, x, training=module.vapt.training)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    tensors = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out * weights).sum(), [x, *tensors], allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip([x, *tensors], grads)]
    return out.detach(), dict(zip(["input", *names], grads))


def assert_backends_agree(model, x: torch.Tensor, backend: str, tol: float = 1e-10, seed=None, params=None) -> None:
    """``backend`` against the official formulation (the oracle; with ``params`` in place of the
    model's prompt parameters): logits, input gradient and every trainable gradient. With
    ``seed``, both draw the same dropout masks."""
    if seed is not None:
        torch.manual_seed(seed)
    oracle_out, oracle_grads = oracle_and_grads(model, x, params)
    if seed is not None:
        torch.manual_seed(seed)
    out, grads = forward_and_grads(model, x, backend)
    assert_close_rel(out, oracle_out, tol, "logits")
    assert grads.keys() == oracle_grads.keys()
    for name in oracle_grads:
        assert_close_rel(grads[name], oracle_grads[name], tol, f"grad of {name}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
