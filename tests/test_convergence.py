"""Convergence: a tiny VAPT ViT trained with SGD on every backend follows the official
formulation's trajectory step for step.

The same seed, the same images and labels, the same dropout masks (the fast paths draw them in the
official order); after every step the losses are compared, and after the last step every trainable
parameter. float32 must agree tightly; under bfloat16 autocast each backend must stay within twice
the torch backend's deviation from the float32 trajectory of the official formulation.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

import vapt_kernels as vk
from conftest import kernel_cases, official_parameters, randomize_prompts, tiny_vit
from vapt_kernels import official

STEPS = 20
BACKENDS = [pytest.param("torch", "cpu", id="torch-cpu")] + kernel_cases()


def _model():
    torch.manual_seed(0)
    model = vk.apply_vapt(
        tiny_vit(embed_dim=32, num_heads=2).float(),
        vk.VAPTConfig(num_prompts=4, kernel_size=3, padding=1, conv_dropout=0.2, mlp_dropout=0.2, vpt_depth=2),
    )
    randomize_prompts(model)
    return model


def _batches(device: str):
    """Two fixed batches of four images, alternated: a set the prompts and head can fit."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 5, (2, 4), generator=gen).to(device)
    return [(x[i % 2], y[i % 2]) for i in range(STEPS)]


@functools.lru_cache(maxsize=None)
def train(backend: Optional[str], device: str, dtype: torch.dtype = torch.float32):
    """Losses per step and the trainable parameters after ``STEPS`` SGD steps; ``backend`` None
    trains the official formulation (:func:`vapt_kernels.official.forward`)."""
    model = _model().to(device).train()
    if backend is not None:
        vk.set_backend(model, backend)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    official_params = official_parameters(model)
    autocast = torch.autocast(device, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    torch.manual_seed(2)  # the dropout masks
    losses = []
    for x, y in _batches(device):
        with autocast:
            if backend is not None:
                logits = model(x)
            else:
                logits = official.forward(model, official_params, model.vapt.config, x, True)
            loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64), {n: p.detach().double().cpu() for n, p in model.named_parameters() if p.requires_grad}


def _deviation(run, target) -> float:
    """Largest relative deviation of a run from a target run: losses and final parameters."""
    losses, params = run
    target_losses, target_params = target
    devs = [((losses - target_losses).abs() / target_losses.abs()).max().item()]
    devs += [(params[n] - p).abs().max().item() / p.abs().max().item() for n, p in target_params.items()]
    return max(devs)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_float32_training_follows_the_official_formulation(backend, device):
    official = train(None, device)
    losses, params = train(backend, device)
    assert official[0][-1] < 0.8 * official[0][0], "the tiny model should learn something"
    for step, (a, b) in enumerate(zip(losses, official[0])):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: loss {a!r} vs official {b!r}"
    for name, p in official[1].items():
        err = (params[name] - p).abs().max().item() / p.abs().max().item()
        assert err < 1e-5, f"{name} after {STEPS} steps: relative error {err:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("backend, device", [p for p in BACKENDS if p.values[0] != "torch"])
def test_bfloat16_autocast_training_stays_as_close_as_the_torch_backend(backend, device):
    """bf16 autocast keeps the residual stream in float32 and runs the attention in bfloat16:
    each backend's deviation from the float32 official run is judged against the torch
    backend's (a kernel backend may round differently, not worse than twice as much)."""
    target = train(None, device)
    allowed = 2 * _deviation(train("torch", device, torch.bfloat16), target)
    deviation = _deviation(train(backend, device, torch.bfloat16), target)
    assert deviation <= allowed, f"{backend}: deviation {deviation:.3e} > twice the torch backend's ({allowed:.3e})"
