"""VAPTConfig: the official defaults and clear errors for bad values."""

from __future__ import annotations

import pytest

from vapt_kernels import VAPTConfig


def test_defaults_are_the_official_ones():
    cfg = VAPTConfig()
    assert (cfg.num_prompts, cfg.kernel_size, cfg.padding, cfg.hidden_dim, cfg.activation) == (5, 2, 0, 8, "relu")
    assert cfg.shared_kernel and cfg.conv and cfg.feature_projector and cfg.share_projector
    assert not cfg.learnable_scale and cfg.vpt_depth == 1
    assert (cfg.prompt_dropout, cfg.conv_dropout, cfg.mlp_dropout) == (0.0, 0.1, 0.1)


@pytest.mark.parametrize(
    "field, value, error, message",
    [
        ("num_prompts", 0, ValueError, "num_prompts must be >= 1"),
        ("num_prompts", 2.5, TypeError, "must be an int"),
        ("kernel_size", True, TypeError, "must be an int"),
        ("padding", -1, ValueError, "padding must be >= 0"),
        ("activation", "tanh", ValueError, "relu, gelu, sigmoid, attention, identity"),
        ("conv", 1, TypeError, "must be a bool"),
        ("mlp_dropout", 1.0, ValueError, r"probability in \[0, 1\)"),
        ("prompt_dropout", -0.1, ValueError, "probability"),
    ],
)
def test_bad_values(field, value, error, message):
    with pytest.raises(error, match=message):
        VAPTConfig(**{field: value})


def test_replace_and_conv_grid():
    cfg = VAPTConfig().replace(kernel_size=3, padding=2)
    assert cfg.conv_grid((14, 10)) == (16, 12)
    assert cfg.replace(conv=False).conv_grid((14, 10)) == (14, 10)
    with pytest.raises(TypeError, match="valid fields: num_prompts"):
        cfg.replace(prompts=3)
