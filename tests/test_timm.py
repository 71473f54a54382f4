"""apply_vapt on timm models: what it changes, what it refuses, and how training mode behaves."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.models.vision_transformer import Block, ResPostBlock

import vapt_kernels as vk
from conftest import assert_backends_agree, images, randomize_prompts, tiny_vit
from vapt_kernels import ops


def test_apply_keeps_backbone_keys_and_freezes_it():
    model = tiny_vit()
    keys = set(model.state_dict())
    vk.apply_vapt(model, num_prompts=4)
    new_keys = set(model.state_dict())
    assert keys <= new_keys and all(k.startswith("vapt.") for k in new_keys - keys)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in new_keys if n.startswith(("vapt.", "head."))}
    assert all(isinstance(b, Block) and isinstance(b, vk.timm.VAPTBlock) for b in model.blocks)


def test_train_mode_keeps_backbone_in_eval():
    model = vk.apply_vapt(tiny_vit(drop_rate=0.1, pos_drop_rate=0.1), num_prompts=2)
    model.train()
    assert model.training and model.vapt.training and model.head.training and model.head_drop.training
    assert not model.pos_drop.training and not model.blocks[0].training and not model.norm.training
    assert all(m.training for m in model.vapt.modules())
    model.eval()
    assert not any(m.training for m in model.modules())


def test_official_initialisation():
    model = vk.apply_vapt(tiny_vit(embed_dim=24), num_prompts=3, vpt_depth=2)
    bound = (6.0 / (3 * 8 * 8 + 24)) ** 0.5
    for p in (model.vapt.prompt, model.vapt.deep_prompts):
        assert p.abs().max() <= bound and p.abs().max() > 0.5 * bound
    gen = model.vapt.generators[0]
    assert torch.count_nonzero(gen.token_proj.weight) == 0 and torch.count_nonzero(gen.token_proj.bias) == 0
    assert gen.kernel.shape == (1, 1, 2, 2) and gen.kernel.abs().sum() > 0
    assert torch.equal(gen.norm.weight, torch.ones(24)) and gen.norm.eps == 1e-5
    assert model.vapt.projectors[0].fc1.weight.shape == (8, 24)
    assert model.vapt.projectors[0].scale is None


def test_overrides_and_apply_vpt():
    model = vk.apply_vapt(tiny_vit(), vk.VAPTConfig(num_prompts=3), num_prompts=7, activation="gelu")
    assert model.vapt.config.num_prompts == 7 and model.vapt.config.activation == "gelu"
    vpt = vk.apply_vpt(tiny_vit(), num_prompts=4)
    assert vpt.vapt.config.vpt_depth == 3 and len(vpt.vapt.generators) == 0 and len(vpt.vapt.projectors) == 0
    assert vpt.vapt.deep_prompts.shape == (2, 4, 24)


def test_static_prompts_are_batch_free():
    model = vk.apply_vpt(tiny_vit(), num_prompts=4)
    assert model.vapt.static_prompt(1, batch=8).shape == (1, 4, 24)
    model.train()
    assert model.vapt.static_prompt(1, batch=8).shape == (1, 4, 24)  # no prompt dropout configured
    drop = vk.apply_vpt(tiny_vit(), num_prompts=4, prompt_dropout=0.5).train()
    assert drop.vapt.static_prompt(1, batch=8).shape == (8, 4, 24)


def test_a_real_timm_model_runs():
    model = timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=64)
    vk.apply_vapt(model, vk.VAPTConfig(num_prompts=10))
    model.train()
    out = model(torch.randn(2, 3, 64, 64))
    out.sum().backward()
    assert out.shape == (2, 3)
    assert model.vapt.generators[0].token_proj.weight.grad is not None
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize(
    "name, message",
    [
        ("beit_base_patch16_224", "relative-position"),
        ("eva02_tiny_patch14_224", "rotary"),
        ("swin_tiny_patch4_window7_224", "windows"),
        ("resnet18", "not a timm VisionTransformer"),
    ],
)
def test_unsupported_models_are_refused_untouched(name, message):
    model = timm.create_model(name, pretrained=False, num_classes=2)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match=message):
        vk.apply_vapt(model)
    assert not hasattr(model, "vapt")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_unsupported_block_and_patch_dropout():
    with pytest.raises(TypeError, match="ResPostBlock"):
        vk.apply_vapt(tiny_vit(block_fn=ResPostBlock))
    model = tiny_vit(patch_drop_rate=0.5)
    with pytest.raises(ValueError, match="patch dropout"):
        vk.apply_vapt(model)
    assert all(p.requires_grad for p in model.parameters())


def test_bad_configs_fail_before_changes():
    model = tiny_vit()
    with pytest.raises(ValueError, match="vpt_depth=4 exceeds"):
        vk.apply_vapt(model, vpt_depth=4)
    with pytest.raises(ValueError, match="does not fit"):
        vk.apply_vapt(model, kernel_size=6)
    with pytest.raises(TypeError, match="unknown VAPTConfig field"):
        vk.apply_vapt(model, num_prompt=3)
    with pytest.raises(ValueError, match="unknown VAPT backend"):
        vk.apply_vapt(model, backend="cuda")
    assert not hasattr(model, "vapt") and all(p.requires_grad for p in model.parameters())
    vk.apply_vapt(model)
    with pytest.raises(ValueError, match="already has VAPT prompts"):
        vk.apply_vapt(model)


def test_set_backend_errors():
    with pytest.raises(ValueError, match="no VAPT blocks"):
        vk.set_backend(tiny_vit(), "torch")
    model = vk.apply_vapt(tiny_vit())
    with pytest.raises(ValueError, match="unknown VAPT backend"):
        vk.set_backend(model, "fastest")
    assert {b.backend for b in model.blocks} == {"auto"}


def test_masks_and_raw_tokens_are_refused():
    model = vk.apply_vapt(tiny_vit(), num_prompts=2)
    tokens = torch.randn(1, 17, 24, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="attn_mask"):
        model.blocks[0](tokens, attn_mask=torch.ones(17, 17, dtype=torch.bool))
    with pytest.raises(ValueError, match="patch tokens"):
        model.blocks[1](torch.randn(1, 1 + 15, 24, dtype=torch.float64))


def test_too_small_dynamic_grid_is_explained():
    model = vk.apply_vapt(tiny_vit(dynamic_img_size=True), kernel_size=3)
    with pytest.raises(ValueError, match="too small"):
        model(images(model, size=(8, 32)))


def test_auto_backend_is_chosen_per_device():
    model = vk.apply_vapt(tiny_vit(), backend="auto")
    randomize_prompts(model)
    assert {b.backend for b in model.blocks} == {"auto"}
    assert vk.available_backends()["torch"] is None
    expected = "native" if vk.available_backends()["native"] is None else "torch"
    assert ops.auto_backend("cpu") == expected
    assert_backends_agree(model, images(model), "auto")
