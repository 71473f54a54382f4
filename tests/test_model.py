"""The fast backends against the literal official formulation (:mod:`vapt_kernels.official`): float64 for
``torch`` and ``native``, float32 for ``triton`` (its kernels take no float64)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import vapt_kernels as vk
from vapt_kernels import official
from conftest import (
    FLOAT64_BACKENDS,
    assert_backends_agree,
    assert_close_rel,
    forward_and_grads,
    images,
    kernel_cases,
    official_parameters,
    oracle_and_grads,
    randomize_prompts,
    tiny_vit,
)


CONFIGS = {
    "default": {},
    "one-prompt": dict(num_prompts=1),
    "kernel3-pad1": dict(kernel_size=3, padding=1),
    "kernel1": dict(kernel_size=1),
    "kernel3-pad2": dict(kernel_size=3, padding=2),
    "kernel4-whole-grid": dict(kernel_size=4),
    "per-channel-kernel": dict(shared_kernel=False, kernel_size=3),
    "no-conv": dict(conv=False),
    "no-projector": dict(feature_projector=False),
    "unshared-projector": dict(share_projector=False),
    "learnable-scale": dict(learnable_scale=True),
    "gelu": dict(activation="gelu"),
    "sigmoid": dict(activation="sigmoid"),
    "attention": dict(activation="attention"),
    "identity": dict(activation="identity"),
    "vpt-depth-2": dict(vpt_depth=2),
    "vpt-deep": dict(vpt_depth=3),
    "no-conv-unshared-scale": dict(conv=False, share_projector=False, learnable_scale=True, num_prompts=4),
}


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
@pytest.mark.parametrize("options", CONFIGS.values(), ids=CONFIGS.keys())
def test_fast_backend_matches_official_for_every_option(options, backend):
    model = vk.apply_vapt(tiny_vit(), vk.VAPTConfig(num_prompts=3).replace(**options), backend=backend)
    randomize_prompts(model)
    assert_backends_agree(model, images(model), backend)


MODELS = {
    "cls-token": dict(),
    "no-cls-avg": dict(class_token=False, global_pool="avg"),
    "registers-avg": dict(reg_tokens=2, global_pool="avg"),
    "registers-cls": dict(reg_tokens=3),
    "avgmax": dict(class_token=False, global_pool="avgmax"),
    "max": dict(global_pool="max"),
    "map": dict(global_pool="map"),
    "no-embed-class": dict(no_embed_class=True, reg_tokens=1),
    "layer-scale": dict(init_values=0.1),
    "qk-norm": dict(qk_norm=True),
    "no-qkv-bias": dict(qkv_bias=False),
    "pre-norm-fc-norm": dict(pre_norm=True, fc_norm=True),
    "non-square": dict(img_size=(32, 48)),
    "no-pos-embed": dict(pos_embed="none"),
}


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
@pytest.mark.parametrize("kwargs", MODELS.values(), ids=MODELS.keys())
def test_fast_backend_matches_official_on_timm_variants(kwargs, backend):
    model = vk.apply_vapt(tiny_vit(**kwargs), num_prompts=3, kernel_size=3, padding=1)
    randomize_prompts(model)
    assert_backends_agree(model, images(model), backend)


# Models that pool over their tokens, under every choice of what they pool: the official MAE model
# (average, fc_norm, class token) and register tokens with max pooling; vpt-deep's last block has
# a static prompt, whose rows are batch-free until they are appended.
POOLING_MODELS = {
    "mae-avg": dict(global_pool="avg", fc_norm=True),
    "registers-max": dict(reg_tokens=2, global_pool="max"),
}
POOLING_CONFIGS = {"vapt": dict(num_prompts=3), "vpt-deep": dict(num_prompts=2, vpt_depth=3, prompt_dropout=0.0)}


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
@pytest.mark.parametrize("pooled", vk.config.POOLED_TOKENS)
@pytest.mark.parametrize("kwargs", POOLING_MODELS.values(), ids=POOLING_MODELS.keys())
@pytest.mark.parametrize("options", POOLING_CONFIGS.values(), ids=POOLING_CONFIGS.keys())
def test_pooled_tokens_match_official(backend, pooled, kwargs, options):
    """Every choice of pooled tokens against the official formulation (the last block's prompt
    outputs kept in the sequence the pool reads): logits, input and trainable gradients."""
    model = vk.apply_vapt(tiny_vit(**kwargs), options, pooled_tokens=pooled, backend=backend)
    randomize_prompts(model)
    assert model.blocks[-1].appends_prompt_outputs == (pooled != "patches")
    assert not any(block.appends_prompt_outputs for block in model.blocks[:-1])
    assert_backends_agree(model, images(model), backend)


def test_pooled_prompt_outputs_matter_and_only_where_pooled():
    """The three choices give three different models where the pool averages tokens, and one and
    the same model where it reads the class token (whose last block then appends nothing)."""
    x = images(tiny_vit())
    logits = {}
    for kind, kwargs in {"avg": dict(global_pool="avg"), "token": {}}.items():
        for pooled in vk.config.POOLED_TOKENS:
            torch.manual_seed(0)  # one backbone per kind of pooling
            model = vk.apply_vapt(tiny_vit(**kwargs), num_prompts=3, pooled_tokens=pooled)
            randomize_prompts(model)
            logits[kind, pooled] = model(x)
            assert model.blocks[-1].appends_prompt_outputs == (kind == "avg" and pooled != "patches")
    avg = [logits["avg", p] for p in vk.config.POOLED_TOKENS]
    assert all((a - b).abs().max() > 1e-3 for i, a in enumerate(avg) for b in avg[i + 1 :])
    assert all(torch.equal(logits["token", p], logits["token", "patches"]) for p in vk.config.POOLED_TOKENS)


def test_reset_classifier_follows_the_new_pooling():
    model = vk.apply_vapt(tiny_vit(), num_prompts=3)
    randomize_prompts(model)
    assert not model.blocks[-1].appends_prompt_outputs
    model.reset_classifier(4, global_pool="avg")
    assert model.blocks[-1].appends_prompt_outputs and model.head.weight.requires_grad
    assert_backends_agree(model, images(model), "torch")
    model.reset_classifier(4, global_pool="token")
    assert not model.blocks[-1].appends_prompt_outputs


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
def test_pooled_prompt_outputs_with_dynamic_size_checkpointing_and_intermediates(backend):
    """An average-pooled model pooling its prompt outputs: other image sizes, gradient
    checkpointing, and forward_intermediates (every intermediate at the token count, the rows
    appended to the final features only, which forward_head turns into the model's logits)."""
    model = vk.apply_vapt(tiny_vit(global_pool="avg", dynamic_img_size=True), num_prompts=3, backend=backend)
    randomize_prompts(model)
    for size in [(32, 48), (48, 40)]:
        grid = (size[0] // 8, size[1] // 8)
        assert_backends_agree(model, images(model, size=size), backend, params=resampled_parameters(model, grid))
    x = images(model)
    expected = model(x)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    final, inter = model.forward_intermediates(x)
    assert len(inter) == 3 and all(t.shape == (2, 24, 4, 4) for t in inter) and final.shape == (2, 17 + 3, 24)
    torch.testing.assert_close(model.forward_head(final), expected, rtol=1e-12, atol=1e-12)
    out = model.forward_intermediates(x, output_dict=True, return_prefix_tokens=True)
    torch.testing.assert_close(model.forward_head(out["image_features"]), expected, rtol=1e-12, atol=1e-12)
    assert len(model.forward_intermediates(x, intermediates_only=True)) == 3


KERNEL_CONFIGS = {
    "default": {},
    "per-channel-kernel": dict(shared_kernel=False, kernel_size=3, padding=1),
    "vpt-deep": dict(vpt_depth=3),
    "prompt-pool": dict(pooled_tokens="prompts"),
}
KERNEL_MODELS = {"cls-token": {}, "registers-avg": dict(class_token=False, reg_tokens=2, global_pool="avg")}


@pytest.mark.parametrize("backend, device", kernel_cases())
@pytest.mark.parametrize("kwargs", KERNEL_MODELS.values(), ids=KERNEL_MODELS.keys())
@pytest.mark.parametrize("options", KERNEL_CONFIGS.values(), ids=KERNEL_CONFIGS.keys())
def test_kernel_backend_float32_matches_official(backend, device, kwargs, options):
    """float32 logits and gradients of a kernel backend against the official formulation in float64."""
    model = vk.apply_vapt(tiny_vit(**kwargs), vk.VAPTConfig(num_prompts=3).replace(**options))
    randomize_prompts(model)
    x = images(model)
    exact_out, exact_grads = oracle_and_grads(model, x)
    model.float().to(device)
    out, grads = forward_and_grads(model, x.float().to(device), backend)
    assert_close_rel(out.double().cpu(), exact_out, 1e-5, "logits")
    for name, exact in exact_grads.items():
        assert_close_rel(grads[name].double().cpu(), exact, 1e-5, f"grad of {name}")


def test_distilled_vit():
    from timm.models.deit import VisionTransformerDistilled

    model = VisionTransformerDistilled(
        img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2, num_classes=5
    ).double().eval()
    vk.apply_vapt(model, num_prompts=2)
    randomize_prompts(model)
    assert model.blocks[0].num_prefix_tokens == 2
    assert all(p.requires_grad for p in model.head_dist.parameters())
    assert_backends_agree(model, images(model), "torch")


@pytest.mark.parametrize("options", [{}, dict(shared_kernel=False, prompt_dropout=0.2, vpt_depth=2)])
def test_training_mode_with_dropout_matches_mask_for_mask(options):
    """Seeded training steps draw the same dropout masks in both backends (same RNG order)."""
    model = vk.apply_vapt(tiny_vit(), vk.VAPTConfig(num_prompts=3, conv_dropout=0.3, mlp_dropout=0.3, **options))
    randomize_prompts(model)
    model.train()
    assert_backends_agree(model, images(model, batch=3), "torch", seed=123)


def resampled_parameters(model, grid):
    """The official prompt parameters with every token projector resampled for the conv output
    grid of a ``grid`` input, by the package's documented rule for other image sizes (bicubic, as
    timm resamples position embeddings, scaled by the area ratio)."""
    params = dict(official_parameters(model))
    cfg = model.vapt.config
    built, new = cfg.conv_grid(model.patch_embed.grid_size), cfg.conv_grid(grid)
    for j in range(len(model.vapt.generators)):
        key = f"deep_prompt_downsample.{j}.linear.weight" if cfg.conv else f"deep_prompt_downsample.{j}.weight"
        w = params[key]
        w = F.interpolate(w.reshape(len(w), 1, *built), size=new, mode="bicubic", align_corners=False)
        params[key] = w.reshape(len(w), -1) * (built[0] * built[1]) / (new[0] * new[1])
    return params


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
@pytest.mark.parametrize("options", [{}, dict(shared_kernel=False, kernel_size=3, padding=1), dict(conv=False)])
def test_dynamic_image_size_takes_grid_from_input(backend, options):
    model = vk.apply_vapt(tiny_vit(dynamic_img_size=True), vk.VAPTConfig(num_prompts=3, **options), backend=backend)
    randomize_prompts(model)
    # The built grid (exact, no resampling), a non-square grid and a larger one (resampled projector).
    for size in [(32, 32), (32, 48), (48, 40)]:
        grid = (size[0] // 8, size[1] // 8)
        assert_backends_agree(model, images(model, size=size), backend, params=resampled_parameters(model, grid))


def test_dynamic_image_pad():
    model = vk.apply_vapt(tiny_vit(dynamic_img_size=True, dynamic_img_pad=True), num_prompts=2)
    randomize_prompts(model)
    assert_backends_agree(model, images(model, size=(30, 45)), "torch", params=resampled_parameters(model, (4, 6)))


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
def test_gradient_checkpointing_and_forward_intermediates(backend):
    model = vk.apply_vapt(tiny_vit(), num_prompts=3, backend=backend)
    randomize_prompts(model)
    x = images(model)
    expected = model(x)
    model.set_grad_checkpointing(True)
    assert_backends_agree(model, x, backend)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    final, inter = model.forward_intermediates(x)
    assert len(inter) == 3 and inter[0].shape == (2, 24, 4, 4)
    torch.testing.assert_close(model.forward_head(final), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.forward_head(model.forward_features(x)), expected, rtol=1e-12, atol=1e-12)


def test_prompt_path_gradcheck():
    """float64 gradcheck of logits with respect to every kind of prompt parameter."""
    model = vk.apply_vapt(
        tiny_vit(embed_dim=8, depth=2, img_size=24), vk.VAPTConfig(num_prompts=2, learnable_scale=True), backend="torch"
    )
    randomize_prompts(model)
    x = images(model, batch=1)
    names = ["vapt.prompt", "vapt.generators.0.kernel", "vapt.generators.0.token_proj.weight",
             "vapt.generators.0.norm.weight", "vapt.projectors.0.fc1.weight", "vapt.projectors.0.scale"]
    params = dict(model.named_parameters())

    def logits(*values):
        return torch.func.functional_call(model, dict(zip(names, values)), (x,))

    assert torch.autograd.gradcheck(logits, tuple(params[n].detach().clone().requires_grad_() for n in names))


def test_switching_backend_changes_no_parameter():
    model = vk.apply_vapt(tiny_vit(), num_prompts=3, backend="reference")
    before = copy.deepcopy(model.state_dict())
    vk.set_backend(model, "torch")
    vk.set_backend(model, "auto")
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {b.backend for b in model.blocks} == {"auto"}


def test_deepcopy_keeps_its_own_prompts():
    model = vk.apply_vapt(tiny_vit(dynamic_img_size=True), num_prompts=2)
    twin = copy.deepcopy(model)
    assert all(b.vapt_prompts is twin.vapt for b in twin.blocks)
    x = images(model, size=(32, 48))
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
def test_bfloat16_autocast_training_step(backend):
    """Under CPU bf16 autocast a fast backend trains and stays within twice the official
    formulation's distance from float32."""
    model = vk.apply_vapt(tiny_vit().float(), num_prompts=3, backend=backend)
    randomize_prompts(model)
    x = images(model).float()
    official_params = official_parameters(model)
    exact = official.forward(model, official_params, model.vapt.config, x).double()
    errors = {}
    for name in ("official", backend):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x) if name == backend else official.forward(model, official_params, model.vapt.config, x)
        out.float().square().sum().backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        model.zero_grad(set_to_none=True)
        errors[name] = (out.double() - exact).abs().max().item() / exact.abs().max().item()
    assert errors[backend] <= 2 * errors["official"], errors


@pytest.mark.slow
@pytest.mark.parametrize("backend, device", kernel_cases())
def test_kernel_backend_compiles_without_graph_breaks(backend, device):
    """``torch.compile(fullgraph=True)`` traces a VAPT model through the registered ops (their
    fakes) and computes what eager mode computes, backward included."""
    model = vk.apply_vapt(tiny_vit(global_pool="avg").float(), num_prompts=3, backend=backend).to(device)
    randomize_prompts(model)
    assert model.blocks[-1].appends_prompt_outputs  # the pooled prompt outputs are traced too
    x = images(model).float().to(device)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    eager_out, eager_grads = forward_and_grads(model, x, backend)
    out, grads = forward_and_grads(compiled, x, backend)
    assert_close_rel(out, eager_out, 1e-5, "logits")
    for name, g in eager_grads.items():
        assert_close_rel(grads[name], g, 1e-5, f"grad of {name}")
