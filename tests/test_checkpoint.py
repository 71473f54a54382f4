"""Official checkpoint import, trainable state dict round trip, parameter counts."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch

import vapt_kernels as vk
from conftest import assert_close_rel, images, randomize_prompts, tiny_vit
from vapt_kernels import official, ops
from vapt_kernels.checkpoint import official_key_map

PREFIX = "enc.transformer."
FLOAT64_BACKENDS = ["reference", "torch"] + (["native"] if ops.unavailable_reason("native", "cpu") is None else [])


def official_state_dict(model, prefix=PREFIX, head=True, seed=0):
    """Random tensors under the official names and shapes (docs/design.md §1.1) for the model's config."""
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


def self_supervised_state_dict(model, seed=0, module=False):
    """The official MAE / MoCo v3 models' layout of :func:`official_state_dict`: prompt keys under
    ``enc.`` (``module.enc.`` from DDP), backbone keys beside them, and ``deep_prompt_embeddings``
    with a row for every block after the first."""
    sd = official_state_dict(model, prefix="enc.", seed=seed)
    cfg, d = model.vapt.config, model.embed_dim
    rows = torch.randn(len(model.blocks) - 1, cfg.num_prompts, d, generator=torch.Generator().manual_seed(seed + 1),
                       dtype=torch.float64)  # fmt: skip
    sd["enc.deep_prompt_embeddings"] = rows
    sd["enc.blocks.0.attn.qkv.weight"] = sd.pop("enc.encoder.layer.0.attn.query.weight")
    return {("module." if module else "") + k: v for k, v in sd.items()}


@pytest.mark.parametrize("module", [False, True])
@pytest.mark.parametrize("vpt_depth", [1, 2])
def test_mae_and_moco_layout_loads_the_used_deep_prompt_rows(vpt_depth, module):
    """The MAE / MoCo v3 layout loads (all rows present, the first vpt_depth - 1 used), and the
    model computes the official formulation on those rows; the supervised layout with the same
    rows is refused, since there every row is used."""
    model = vk.apply_vapt(tiny_vit(), vk.VAPTConfig(num_prompts=3, vpt_depth=vpt_depth))
    sd = self_supervised_state_dict(model, module=module)
    key = ("module." if module else "") + "enc.deep_prompt_embeddings"
    mapping = vk.load_official_checkpoint(model, sd)
    assert (key in mapping) == (vpt_depth > 1)
    if vpt_depth > 1:
        assert torch.equal(model.vapt.deep_prompts.detach(), sd[key][: vpt_depth - 1])
    params = {_strip_official(k): v for k, v in sd.items() if _strip_official(k) in official_key_map(model)}
    params["deep_prompt_embeddings"] = sd[key][: vpt_depth - 1]
    x = images(model)
    assert_close_rel(model(x), official.forward(model, params, model.vapt.config, x), 1e-12, "logits")
    supervised = {k.replace("enc.", "enc.transformer."): v for k, v in sd.items()}
    with pytest.raises(ValueError, match="deep_prompt_embeddings"):
        vk.load_official_checkpoint(vk.apply_vapt(tiny_vit(), vk.VAPTConfig(num_prompts=3, vpt_depth=vpt_depth)),
                                    supervised)  # fmt: skip


def test_mae_and_moco_layout_with_other_deep_rows_is_refused():
    model = vk.apply_vapt(tiny_vit(), vk.VAPTConfig(num_prompts=3, vpt_depth=2))
    before = snapshot(model)
    sd = self_supervised_state_dict(model)
    sd["enc.deep_prompt_embeddings"] = sd["enc.deep_prompt_embeddings"][:1]
    with pytest.raises(ValueError, match=r"after the first, \(L-1, Np, d\) = \(2, 3, 24\), got \(1, 3, 24\)"):
        vk.load_official_checkpoint(model, sd)
    assert_bit_identical(model, before)


def _strip_official(key: str) -> str:
    for prefix in ("module.", "enc.transformer.", "enc."):
        key = key.removeprefix(prefix)
    return key


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


@pytest.mark.parametrize("options", [dict(vpt_depth=2), dict(shared_kernel=False, share_projector=False), dict(conv=False)])
def test_loaded_checkpoint_gives_the_official_forward(options):
    """After loading, every fast backend computes what the official formulation computes with
    the checkpoint's tensors themselves (the oracle reads them by their official names)."""
    model = vk.apply_vapt(tiny_vit(), vk.VAPTConfig(num_prompts=3, **options))
    sd = official_state_dict(model)
    vk.load_official_checkpoint(model, sd)
    official_params = {k.removeprefix(PREFIX): v for k, v in sd.items() if k.startswith(PREFIX) and "encoder." not in k}
    x = images(model)
    expected = official.forward(model, official_params, model.vapt.config, x)
    for backend in FLOAT64_BACKENDS:
        vk.set_backend(model, backend)
        torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-12, msg=backend)


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


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(model, before: dict[str, torch.Tensor]) -> None:
    """Every entry of ``model.state_dict()`` has the bits it had in ``before``."""
    after = model.state_dict()
    assert after.keys() == before.keys()
    bits = lambda t: t.detach().contiguous().view(torch.uint8)  # noqa: E731
    for k, v in after.items():
        assert v.dtype == before[k].dtype and torch.equal(bits(v), bits(before[k])), f"{k} changed"


# A key in the middle of the copy order of each loader: a key-by-key copy has already overwritten
# the parameters before it when it reaches this one.
OFFICIAL_MIDDLE = f"{PREFIX}deep_prompt_embeddings_mlp.block.0.weight"
TRAINABLE_MIDDLE = "vapt.generators.1.kernel"


def _nan(t):
    t = t.clone()
    t.view(-1)[1] = float("nan")
    return t


def _inf(t):
    t = t.clone()
    t.view(-1)[-1] = -float("inf")
    return t


BAD_VALUES = {
    "numpy": lambda t: t.numpy(),
    "list": lambda t: t.tolist(),
    "sparse": lambda t: t.to_sparse(),
    "meta": lambda t: t.to("meta"),
    "nan": _nan,
    "inf": _inf,
    "complex": lambda t: t.to(torch.complex128),
    "int": lambda t: (t * 10).round().long(),
    "bool": lambda t: t > 0,
    "wrong-shape": lambda t: t.flatten(),
}


def valid_state_dicts(loader: str):
    """A model and a state dict for ``loader`` that loads into it and changes every parameter."""
    model = vk.apply_vapt(tiny_vit(), num_prompts=3)
    if loader == "official":
        return model, official_state_dict(model), OFFICIAL_MIDDLE
    source = vk.apply_vapt(tiny_vit(), num_prompts=3)
    randomize_prompts(source, seed=3)
    return model, vk.trainable_state_dict(source), TRAINABLE_MIDDLE


def load(loader: str, model, sd):
    if loader == "official":
        return vk.load_official_checkpoint(model, sd)
    return vk.load_trainable_state_dict(model, sd)


@pytest.mark.parametrize("loader", ["official", "trainable"])
@pytest.mark.parametrize("bad", list(BAD_VALUES))
def test_bad_value_in_the_middle_is_named_and_changes_nothing(loader, bad):
    model, sd, middle = valid_state_dicts(loader)
    keys = list(sd)
    assert 0 < keys.index(middle) < len(keys) - 1
    sd[middle] = BAD_VALUES[bad](sd[middle])
    before = snapshot(model)
    with pytest.raises(ValueError) as err:
        load(loader, model, sd)
    assert middle in str(err.value)
    assert_bit_identical(model, before)


@pytest.mark.parametrize("spelling", ["bare", "module."])
def test_official_key_given_twice_is_an_error_naming_both(spelling):
    model = vk.apply_vapt(tiny_vit(), num_prompts=3)
    sd = official_state_dict(model)
    other = OFFICIAL_MIDDLE.removeprefix(PREFIX) if spelling == "bare" else "module." + OFFICIAL_MIDDLE
    keys = list(sd)
    at = keys.index(OFFICIAL_MIDDLE) + 1
    sd = dict([*sd.items()][:at] + [(other, torch.zeros_like(sd[OFFICIAL_MIDDLE]))] + [*sd.items()][at:])
    before = snapshot(model)
    with pytest.raises(ValueError, match="given 2 times") as err:
        vk.load_official_checkpoint(model, sd)
    assert OFFICIAL_MIDDLE in str(err.value) and f"'{other}'" in str(err.value)
    assert_bit_identical(model, before)


def test_every_problem_is_listed_in_one_error():
    model = vk.apply_vapt(tiny_vit(), num_prompts=3)
    sd = official_state_dict(model)
    del sd[f"{PREFIX}deep_prompt_norm.1.bias"]
    sd[f"{PREFIX}prompt_embeddings"] = torch.zeros(1, 4, 24)
    sd[OFFICIAL_MIDDLE] = _nan(sd[OFFICIAL_MIDDLE])
    sd[f"{PREFIX}deep_prompt_norm.0.weight"] = sd[f"{PREFIX}deep_prompt_norm.0.weight"].numpy()
    sd["deep_prompt_norm.0.bias"] = sd[f"{PREFIX}deep_prompt_norm.0.bias"]
    sd[f"{PREFIX}deep_prompt_downsample.0.conv.kernel"] = sd[f"{PREFIX}deep_prompt_downsample.0.conv.kernel"].int()
    sd["head.last_layer.bias"] = sd["head.last_layer.bias"].to(torch.complex64)
    before = snapshot(model)
    with pytest.raises(ValueError) as err:
        vk.load_official_checkpoint(model, sd)
    text = str(err.value)
    for fragment in [
        "missing prompt keys: deep_prompt_norm.1.bias",
        "prompt_embeddings: checkpoint (1, 4, 24) vs model (1, 3, 24)",
        f"{OFFICIAL_MIDDLE}: holds 1 NaN",
        f"{PREFIX}deep_prompt_norm.0.weight: a numpy.ndarray",
        "'deep_prompt_norm.0.bias', 'enc.transformer.deep_prompt_norm.0.bias'",
        f"{PREFIX}deep_prompt_downsample.0.conv.kernel: dtype torch.int32",
        "head.last_layer.bias: dtype torch.complex64",
    ]:
        assert fragment in text
    assert_bit_identical(model, before)


def test_trainable_state_dict_lists_missing_unexpected_and_bad_values():
    model = vk.apply_vapt(tiny_vit(), num_prompts=3)
    sd = vk.trainable_state_dict(model)
    del sd["vapt.prompt"]
    sd["vapt.extra"] = torch.zeros(3)
    sd[TRAINABLE_MIDDLE] = _inf(sd[TRAINABLE_MIDDLE])
    before = snapshot(model)
    with pytest.raises(ValueError) as err:
        vk.load_trainable_state_dict(model, sd)
    text = str(err.value)
    assert "missing: vapt.prompt" in text and "unexpected: vapt.extra" in text
    assert f"{TRAINABLE_MIDDLE}: holds 1 Inf" in text
    assert_bit_identical(model, before)


@pytest.mark.parametrize("case", ["misshaped-weight", "lone-weight", "lone-bias", "model-without-head"])
def test_official_head_is_loaded_as_a_unit_or_not_at_all(case):
    model = vk.apply_vapt(tiny_vit(num_classes=0 if case == "model-without-head" else 5), num_prompts=3)
    sd = official_state_dict(model, head=False)
    weight, bias = torch.ones(5, 24), torch.ones(5)
    named = {
        "misshaped-weight": ({"head.last_layer.weight": torch.ones(9, 24), "head.last_layer.bias": bias}, "(9, 24)"),
        "lone-weight": ({"head.last_layer.weight": weight}, "head.last_layer.bias is missing"),
        "lone-bias": ({"head.last_layer.bias": bias}, "head.last_layer.weight is missing"),
        "model-without-head": ({"head.last_layer.weight": weight, "head.last_layer.bias": bias}, "no head.weight"),
    }
    head, reason = named[case]
    sd.update(head)
    before = snapshot(model)
    with pytest.warns(UserWarning, match="head was not loaded") as record:
        mapping = vk.load_official_checkpoint(model, sd)
    assert len(record) == 1 and reason in str(record[0].message)
    assert not any(k.startswith("head.") for k in mapping)
    after = model.state_dict()
    for k in ("head.weight", "head.bias"):
        assert (k in after) == (k in before) and (k not in after or torch.equal(after[k], before[k])), k
    assert torch.equal(model.vapt.prompt.detach(), sd[f"{PREFIX}prompt_embeddings"])


def test_official_head_that_fits_is_loaded_whole_without_warning():
    model = vk.apply_vapt(tiny_vit(), num_prompts=3)
    sd = official_state_dict(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mapping = vk.load_official_checkpoint(model, sd)
    assert mapping["head.last_layer.weight"] == "head.weight" and mapping["head.last_layer.bias"] == "head.bias"
    assert torch.equal(model.head.weight.detach(), sd["head.last_layer.weight"])
    assert torch.equal(model.head.bias.detach(), sd["head.last_layer.bias"])


@pytest.mark.parametrize("shape", [(5, 24), (9, 24)])
def test_official_head_with_bad_values_is_an_error_not_a_warning(shape):
    model = vk.apply_vapt(tiny_vit(), num_prompts=3)
    sd = official_state_dict(model)
    sd["head.last_layer.weight"] = _nan(torch.ones(shape))
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="head.last_layer.weight: holds 1 NaN"):
            vk.load_official_checkpoint(model, sd)
    assert_bit_identical(model, before)


@pytest.mark.parametrize("loader", ["official", "trainable"])
def test_float32_state_dict_loads_into_a_float64_model(loader):
    model, sd, _ = valid_state_dicts(loader)
    sd = {k: v.float() for k, v in sd.items()}
    mapping = load(loader, model, sd)
    params = dict(model.named_parameters())
    for theirs, ours in (mapping or {k: k for k in sd}).items():
        assert params[ours].dtype == torch.float64 and torch.equal(params[ours].detach(), sd[theirs].double()), ours


@pytest.mark.parametrize("loader", ["official", "trainable"])
def test_state_dict_that_is_not_a_mapping_is_refused(loader):
    model, sd, _ = valid_state_dicts(loader)
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        load(loader, model, list(sd.values()))


def test_value_that_overflows_the_model_dtype_is_refused():
    model = vk.apply_vapt(tiny_vit().float(), num_prompts=3)
    sd = official_state_dict(model)
    sd[OFFICIAL_MIDDLE] = sd[OFFICIAL_MIDDLE].clone()
    sd[OFFICIAL_MIDDLE][0, 0] = 1e300
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"{OFFICIAL_MIDDLE}: .*overflow.*float32"):
        vk.load_official_checkpoint(model, sd)
    assert_bit_identical(model, before)


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
