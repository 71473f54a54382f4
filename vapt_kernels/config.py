"""VAPTConfig: every option of the official VAPT code, validated once, with clear errors."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Union

ACTIVATIONS = ("relu", "gelu", "sigmoid", "attention", "identity")
POOLED_TOKENS = ("prompts+patches", "patches", "prompts")


@dataclass(frozen=True)
class VAPTConfig:
    """Options of Visual Adaptive Prompt Tuning; defaults are the official code's defaults.

    Args:
        num_prompts: prompt tokens per block (official ``NUM_TOKENS``).
        kernel_size: side of the channel-wise convolution kernel (``KERNEL``).
        padding: zero padding of that convolution (``PADDING``).
        hidden_dim: hidden width ``r`` of the feature projector (``HIDDEN_DIM``).
        activation: projector non-linearity: relu, gelu, sigmoid, attention (softmax over the
            hidden dim) or identity (``ACTIVATION``).
        shared_kernel: one ``K x K`` kernel for all channels (official ``CHANNELWISE=True``);
            False gives one kernel per channel.
        conv: use the convolution; False maps the ``H*W`` grid straight to the prompts with a
            zero-initialised Linear (``CONV``).
        feature_projector: apply ``P = G + s * W2 act(W1 G)`` (``FEAT_PROJECTOR``).
        share_projector: one feature projector for all blocks (``SHARE_PROJECTOR``).
        learnable_scale: learn ``s`` (initialised to 1) instead of fixing it to 1 (``LEARNABLE_SCALE``).
        vpt_depth: blocks ``0 .. vpt_depth-1`` get static prompts, the rest adaptive ones
            (``VPT_DEPTH``); ``vpt_depth == depth`` is VPT-deep.
        prompt_dropout: dropout on the static prompts (``DROPOUT``).
        conv_dropout: ``Dropout2d`` rate on the convolution output (fixed to 0.1 officially).
        mlp_dropout: dropout on the projector activation (``DROPOUT_MLP``).
        pooled_tokens: what a model that pools by average (or max) over its tokens pools, besides
            never the prefix tokens: the last block's prompt outputs together with the patch
            tokens (``"prompts+patches"``, the official MAE model's default ``VIT_POOL_TYPE =
            "original"``), the patch tokens only (``"patches"``, official ``img_pool``) or the
            prompt outputs only (``"prompts"``, official ``prompt_pool``). Only then does the last
            block compute its prompt rows' outputs; a class-token (or attention-pooled) model
            never reads them, whatever this says.
    """

    num_prompts: int = 5
    kernel_size: int = 2
    padding: int = 0
    hidden_dim: int = 8
    activation: str = "relu"
    shared_kernel: bool = True
    conv: bool = True
    feature_projector: bool = True
    share_projector: bool = True
    learnable_scale: bool = False
    vpt_depth: int = 1
    prompt_dropout: float = 0.0
    conv_dropout: float = 0.1
    mlp_dropout: float = 0.1
    pooled_tokens: str = "prompts+patches"

    def __post_init__(self) -> None:
        for name in ("num_prompts", "kernel_size", "hidden_dim", "vpt_depth"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("padding", self.padding, minimum=0)
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"VAPTConfig.activation={self.activation!r} is not supported; "
                f"choose one of {', '.join(ACTIVATIONS)}"
            )
        if self.pooled_tokens not in POOLED_TOKENS:
            raise ValueError(
                f"VAPTConfig.pooled_tokens={self.pooled_tokens!r} is not supported; choose one of "
                f"{', '.join(POOLED_TOKENS)}"
            )
        for name in ("shared_kernel", "conv", "feature_projector", "share_projector", "learnable_scale"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"VAPTConfig.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("prompt_dropout", "conv_dropout", "mlp_dropout"):
            p = getattr(self, name)
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
                raise ValueError(f"VAPTConfig.{name} must be a probability in [0, 1), got {p!r}")

    def replace(self, **overrides) -> "VAPTConfig":
        """A copy with some fields changed; unknown names raise a TypeError listing the valid ones."""
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            valid = ", ".join(f.name for f in dataclasses.fields(self))
            raise TypeError(f"unknown VAPTConfig field(s) {', '.join(unknown)}; valid fields: {valid}")
        return dataclasses.replace(self, **overrides)

    def conv_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        """Output grid ``(H', W')`` of the convolution on a ``(H, W)`` patch grid."""
        if not self.conv:
            return grid
        return tuple(g + 2 * self.padding - self.kernel_size + 1 for g in grid)


def as_config(config: Union[VAPTConfig, Mapping[str, object], None], caller: str) -> VAPTConfig:
    """``config`` as a ``VAPTConfig``: itself, the official defaults for None, or a mapping of
    field names to values (validated like keyword arguments).

    Raises:
        TypeError: any other type, or a mapping with unknown fields (naming the valid ones).
    """
    if config is None:
        return VAPTConfig()
    if isinstance(config, VAPTConfig):
        return config
    if isinstance(config, Mapping):
        return VAPTConfig().replace(**config)
    raise TypeError(
        f"{caller}: config must be a VAPTConfig, a mapping of its fields (e.g. {{'num_prompts': 10}}) or None, "
        f"got {type(config).__name__} {config!r}; for a field alone, pass it as a keyword: num_prompts=10"
    )


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"VAPTConfig.{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"VAPTConfig.{name} must be >= {minimum}, got {value}")
