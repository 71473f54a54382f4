"""Shared helpers: tiny timm ViTs, deterministic non-trivial prompts, error reporting."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import vapt_kernels as vk


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


def max_rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-6) -> float:
    """max |a - b| / max(max |b|, floor).

    The floor only matters for quantities that are exactly zero in exact arithmetic (for example
    the gradient of a bias that a LayerNorm removes): there both sides are rounding noise
    (~1e-19), and the error is judged against ``floor`` instead of against zero.
    """
    return (a - b).abs().max().item() / max(b.abs().max().item(), floor)


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
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out * weights).sum(), [x, *params])
    names = ["input"] + [n for n, p in model.named_parameters() if p.requires_grad]
    return out.detach(), dict(zip(names, grads))


def assert_backends_agree(model, x: torch.Tensor, backend: str, tol: float = 1e-10, seed=None) -> None:
    """``backend`` against ``reference``: logits, input gradient and every trainable gradient."""
    if seed is not None:
        torch.manual_seed(seed)
    ref_out, ref_grads = forward_and_grads(model, x, "reference")
    if seed is not None:
        torch.manual_seed(seed)
    out, grads = forward_and_grads(model, x, backend)
    assert_close_rel(out, ref_out, tol, "logits")
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert_close_rel(grads[name], ref_grads[name], tol, f"grad of {name}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
