"""Dropout where the official code puts it, at the official rates."""

from __future__ import annotations

import torch

import vapt_kernels as vk
from conftest import randomize_prompts, tiny_vit


def block_input(batch=64, seed=0):
    return torch.randn(batch, 17, 24, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def prompts_of(model, index, x):
    """Block ``index``'s prompt rows for the block input ``x`` (a 4x4 grid after one class token)."""
    return model.vapt(index, x, model.blocks[index].norm1, 1, (4, 4), "torch")[1]


def test_conv_dropout_drops_whole_channels_per_sample():
    model = vk.apply_vapt(tiny_vit(), num_prompts=4, feature_projector=False, conv_dropout=0.3)
    randomize_prompts(model)
    for gen in model.vapt.generators:
        torch.nn.init.zeros_(gen.token_proj.bias)
    x = block_input()
    for index in (1, 2):
        model.eval()
        clean = prompts_of(model, index, x)
        model.train()
        dropped = prompts_of(model, index, x)
        ratio = dropped / clean  # (B, Np, d): 0 or 1 / (1 - p), the same for every prompt of a channel
        kept = ratio[:, 0, :] != 0
        assert torch.allclose(ratio, kept.unsqueeze(1).double() / 0.7, rtol=1e-12, atol=0)
        assert abs(1 - kept.double().mean().item() - 0.3) < 0.05


def test_projector_dropout_rate():
    model = vk.apply_vapt(tiny_vit(), num_prompts=4, activation="sigmoid", mlp_dropout=0.25, conv_dropout=0.0)
    randomize_prompts(model)
    seen = []
    model.vapt.projectors[0].fc2.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    model.train()
    prompts_of(model, 1, block_input())
    zeros = (seen[0] == 0).double().mean().item()  # sigmoid is never 0: zeros come from dropout
    assert abs(zeros - 0.25) < 0.03
    model.eval()
    prompts_of(model, 1, block_input())
    assert (seen[1] == 0).sum() == 0


def test_static_prompt_dropout_is_per_sample():
    model = vk.apply_vpt(tiny_vit(), num_prompts=8, prompt_dropout=0.4).train()
    p = model.vapt.static_prompt(0, batch=64)
    zeros = p == 0
    assert abs(zeros.double().mean().item() - 0.4) < 0.03
    assert not torch.equal(zeros[0], zeros[1])  # independent masks per sample, as after expand()
    model.eval()
    assert model.vapt.static_prompt(0, batch=64).shape[0] == 1
