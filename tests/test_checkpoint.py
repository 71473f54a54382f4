"""Official checkpoint import, trainable state dict round trip, parameter counts."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import vapt_kernels as vk
from conftest import images, tiny_vit

PREFIX = "enc.transformer."


def official_state_dict(model, prefix=PREFIX, head=True, seed=0):
    """Random tensors under the official names and shapes (DESIGN §1) for the model's config."""
    cfg, d = model.vapt.config, model.embed_dim
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    h, w = model.vapt.generators[0].conv_grid if model.vapt.generators else (0, 0)
    sd = {f"{prefix}prompt_embeddings": rand(1, cfg.num_prompts, d)}
    if cfg.vpt_depth > 1:
        sd[f"{prefix}deep_prompt_embeddings"] = rand(cfg.vpt_depth - 1, cfg.num_prompts, d)
    for j in range(len(model.blocks) - cfg.vpt_depth):
        sd[f"{prefix}deep_prompt_norm.{j}.weight"] = rand(d)
        sd[f"{prefix}deep_prompt_norm.{j}.bias"] = rand(d)
        down = f"{prefix}deep_prompt_downsample.{j}"
        if cfg.conv:
            sd[f"{down}.conv.kernel"] = rand(1 if cfg.shared_kernel else d, 1, cfg.kernel_size, cfg.kernel_size)
            down += ".linear"
        sd[f"{down}.weight"] = rand(cfg.num_prompts, h * w)
        sd[f"{down}.bias"] = rand(cfg.num_prompts)
    mlps = [""] if cfg.share_projector else [f".{j}" for j in range(len(model.blocks) - cfg.vpt_depth)]
    for m in mlps if cfg.feature_projector else []:
        sd[f"{prefix}deep_prompt_embeddings_mlp{m}.block.0.weight"] = rand(cfg.hidden_dim, d)
        sd[f"{prefix}deep_prompt_embeddings_mlp{m}.block.2.weight"] = rand(d, cfg.hidden_dim)
        if cfg.learnable_scale:
            sd[f"{prefix}deep_prompt_embeddings_mlp{m}.scale"] = rand(1)
    sd[f"{prefix}encoder.layer.0.attn.query.weight"] = rand(d, d)  # backbone: ignored
    if head:
        sd["head.last_layer.weight"] = rand(model.num_classes, d)
        sd["head.last_layer.bias"] = rand(model.num_classes)
    return sd


@pytest.mark.parametrize(
    "options",
    [dict(), dict(vpt_depth=2, learnable_scale=True), dict(share_projector=False, shared_kernel=False), dict(conv=False)],
)
@pytest.mark.parametrize("prefix", [PREFIX, ""])
def test_official_checkpoint_round_trip(options, prefix):
    model = vk.apply_vapt(tiny_vit(), vk.VAPTConfig(num_prompts=3, **options))
    sd = official_state_dict(model, prefix=prefix)
    mapping = vk.load_official_checkpoint(model, sd)
    params = dict(model.named_parameters())
    assert set(mapping) == {k for k in sd if "encoder.layer" not in k}
    for theirs, ours in mapping.items():
        # Same number of elements, same values in the same order: gradients compare elementwise.
        assert params[ours].numel() == sd[theirs].numel()
        assert torch.equal(params[ours].detach().flatten(), sd[theirs].flatten()), theirs
    assert mapping["head.last_layer.weight"] == "head.weight"


def test_checkpoint_mismatches_are_named_and_change_nothing():
    model = vk.apply_vapt(tiny_vit(), num_prompts=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = official_state_dict(model)
    broken = dict(sd)
    del broken[f"{PREFIX}deep_prompt_norm.1.bias"]
    broken[f"{PREFIX}deep_prompt_norm.7.weight"] = torch.zeros(24)
    broken[f"{PREFIX}prompt_embeddings"] = torch.zeros(1, 4, 24)
    with pytest.raises(ValueError) as err:
        vk.load_official_checkpoint(model, broken)
    text = str(err.value)
    assert "missing prompt keys: deep_prompt_norm.1.bias" in text
    assert "deep_prompt_norm.7.weight" in text and "prompt_embeddings: checkpoint (1, 4, 24)" in text
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_checkpoint_head_of_other_size_is_skipped_with_warning():
    model = vk.apply_vapt(tiny_vit(), num_prompts=3)
    sd = official_state_dict(model)
    sd["head.last_layer.weight"] = torch.zeros(9, 24)
    sd["head.last_layer.bias"] = torch.zeros(9)
    with pytest.warns(UserWarning, match="head was not loaded"):
        mapping = vk.load_official_checkpoint(model, sd)
    assert "head.last_layer.weight" not in mapping and "prompt_embeddings" not in mapping
    assert f"{PREFIX}prompt_embeddings" in mapping


def test_checkpoint_needs_a_vapt_model_and_refuses_prompt_projection():
    with pytest.raises(ValueError, match="apply_vapt first"):
        vk.load_official_checkpoint(tiny_vit(), {})
    model = vk.apply_vapt(tiny_vit(), num_prompts=3)
    sd = official_state_dict(model)
    sd[f"{PREFIX}prompt_proj.weight"] = torch.zeros(24, 24)
    with pytest.raises(ValueError, match="PROJECT"):
        vk.load_official_checkpoint(model, sd)


def test_loaded_checkpoint_gives_the_official_forward():
    """After loading, the fast path computes what the official formulation computes."""
    model = vk.apply_vapt(tiny_vit(), vk.VAPTConfig(num_prompts=3, vpt_depth=2))
    vk.load_official_checkpoint(model, official_state_dict(model))
    x = images(model)
    vk.set_backend(model, "reference")
    expected = model(x)
    vk.set_backend(model, "torch")
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


def test_trainable_state_dict_round_trip():
    backbone = tiny_vit()
    model = vk.apply_vapt(copy.deepcopy(backbone), num_prompts=3, learnable_scale=True)
    vk.load_official_checkpoint(model, official_state_dict(model))
    buffer = io.BytesIO()
    torch.save(vk.trainable_state_dict(model), buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()))
    assert set(saved) == {n for n, p in model.named_parameters() if p.requires_grad}
    fresh = vk.apply_vapt(backbone, num_prompts=3, learnable_scale=True)
    vk.load_trainable_state_dict(fresh, saved)
    x = images(model)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_trainable_state_dict_mismatch():
    model = vk.apply_vapt(tiny_vit(), num_prompts=3)
    other = vk.trainable_state_dict(vk.apply_vapt(tiny_vit(), num_prompts=4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="vapt.prompt: saved"):
        vk.load_trainable_state_dict(model, other)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_count_parameters():
    model = vk.apply_vapt(tiny_vit(), num_prompts=3)
    counts = vk.count_parameters(model)
    d, n = 24, 3
    # static prompt + 2 adaptive blocks (LN, 2x2 kernel, 3x3 -> 3 projector) + shared projector (8x24 twice)
    prompt = n * d + 2 * (2 * d + 4 + n * 9 + n) + 2 * 8 * d
    assert counts["prompt"] == prompt
    assert counts["head"] == 5 * d + 5
    assert counts["total"] == prompt + 5 * d + 5
    assert counts["backbone"] == sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert counts["percent"] == pytest.approx(100 * counts["total"] / counts["backbone"])
