"""Turn a timm VisionTransformer into a VAPT model in place: ``apply_vapt``, ``apply_vpt``, ``set_backend``."""

from __future__ import annotations

import functools
from typing import Optional

import torch.nn as nn
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from .config import VAPTConfig
from .modules import VAPTBlock, VAPTPrompts
from .ops import resolve_backend

# Model families that are not VisionTransformer subclasses, and why VAPT cannot be exact there.
_UNSUPPORTED_FAMILIES = {
    "Beit": "its attention adds a relative-position bias, which prompt keys would need a position for",
    "Eva": "its attention applies rotary position embeddings to queries and keys",
    "SwinTransformer": "it attends within shifted windows, with no global token sequence for prompts",
    "SwinTransformerV2": "it attends within shifted windows, with no global token sequence for prompts",
    "VisionTransformerRelPos": "its attention adds a relative-position bias",
    "Vitamin": "its stem and blocks are not timm's standard ViT Block/Attention",
}


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture")
    return f"{type(model).__name__} ({arch})" if arch else type(model).__name__


def _check_supported(model: nn.Module) -> None:
    """Raise a clear error for any model VAPT cannot run exactly, before anything is changed."""
    name = _model_name(model)
    if not isinstance(model, VisionTransformer):
        reason = _UNSUPPORTED_FAMILIES.get(type(model).__name__, "it is not a timm VisionTransformer")
        raise TypeError(f"apply_vapt: {name} is not supported: {reason}")
    if getattr(model, "vapt", None) is not None or any(isinstance(b, VAPTBlock) for b in model.blocks):
        raise ValueError(f"apply_vapt: {name} already has VAPT prompts; build a fresh model to change the config")
    for i, block in enumerate(model.blocks):
        if type(block) is not Block:
            raise TypeError(
                f"apply_vapt: {name} is not supported: block {i} is {type(block).__name__}, "
                "not timm's standard Block (pre-norm attention then MLP)"
            )
        if type(block.attn) is not Attention:
            raise TypeError(
                f"apply_vapt: {name} is not supported: block {i} attention is {type(block.attn).__name__}, "
                "not timm's standard Attention (rotary or relative-position terms cannot take prompt keys exactly)"
            )
        if not isinstance(block.norm1, nn.LayerNorm):
            raise TypeError(
                f"apply_vapt: {name} is not supported: block {i} norm1 is {type(block.norm1).__name__}; "
                "VAPT shares the row statistics of a LayerNorm"
            )
    if not isinstance(model.patch_drop, nn.Identity):
        raise ValueError(
            f"apply_vapt: {name} uses patch dropout (patch_drop_rate > 0), which removes patches from the "
            "grid the prompt convolution needs; build the model with patch_drop_rate=0"
        )
    if not hasattr(model.patch_embed, "dynamic_feat_size"):
        raise TypeError(
            f"apply_vapt: {name} is not supported: its patch_embed ({type(model.patch_embed).__name__}) "
            "does not report the patch grid of an image"
        )


def _classifier_modules(model: nn.Module) -> list[nn.Module]:
    heads = model.get_classifier()
    heads = list(heads) if isinstance(heads, (tuple, list)) else [heads]
    drop = getattr(model, "head_drop", None)
    return heads + ([drop] if drop is not None else [])


def _vapt_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """``train()`` of a VAPT model: prompts and head follow ``mode``, the backbone stays in eval."""
    nn.Module.train(self, mode)
    if mode:
        trainable = {id(m) for top in [self.vapt, *_classifier_modules(self)] for m in top.modules()}
        for m in self.modules():
            if id(m) not in trainable and m is not self:
                m.training = False
    return self


def apply_vapt(
    model: VisionTransformer,
    config: Optional[VAPTConfig] = None,
    *,
    backend: str = "auto",
    **overrides,
) -> VisionTransformer:
    """Give a timm ViT VAPT prompts, in place, and freeze its backbone.

    Every block is replaced by a :class:`~vapt_kernels.modules.VAPTBlock` (same submodules, same
    state-dict keys); all prompt parameters live at ``model.vapt``. Only the prompts and the
    classifier head stay trainable, and ``model.train()`` keeps the backbone in eval mode, as the
    official code does.

    Args:
        model: a timm ``VisionTransformer`` built from the standard ``Block``/``Attention``.
        config: the VAPT options; defaults to ``VAPTConfig()`` (the official defaults).
        backend: ``"auto"``, ``"torch"`` or ``"reference"`` (see :mod:`vapt_kernels.ops`).
        **overrides: ``VAPTConfig`` fields that replace those of ``config``.

    Returns:
        The same model object.

    Raises:
        TypeError / ValueError: unsupported model, bad option, or a config that does not fit the
            model (checked before the model is touched).
    """
    config = (config or VAPTConfig()).replace(**overrides)
    _check_supported(model)
    backend = resolve_backend(backend)
    depth = len(model.blocks)
    if config.vpt_depth > depth:
        raise ValueError(f"apply_vapt: vpt_depth={config.vpt_depth} exceeds the model's {depth} blocks")
    grid = tuple(model.patch_embed.grid_size)
    if config.vpt_depth < depth and min(config.conv_grid(grid)) < 1:
        raise ValueError(
            f"apply_vapt: kernel_size={config.kernel_size} with padding={config.padding} does not fit the "
            f"model's {grid[0]}x{grid[1]} patch grid"
        )
    ref = next(model.parameters())
    dim = model.embed_dim
    vapt = VAPTPrompts(
        config, dim, depth, grid, tuple(model.patch_embed.patch_size), device=ref.device, dtype=ref.dtype
    )

    for p in model.parameters():
        p.requires_grad_(False)
    for head in _classifier_modules(model):
        for p in head.parameters():
            p.requires_grad_(True)
    model.vapt = vapt
    model.patch_embed.register_forward_pre_hook(vapt.record_grid)
    for i, block in enumerate(list(model.blocks)):
        model.blocks[i] = VAPTBlock(block, i, vapt, model.num_prefix_tokens, backend)
    model.train = functools.partial(_vapt_train, model)  # a partial, unlike a bound method, pickles
    model.train(model.training)
    return model


def apply_vpt(
    model: VisionTransformer, num_prompts: int = 10, *, prompt_dropout: float = 0.0, backend: str = "auto"
) -> VisionTransformer:
    """VPT-deep: static learnable prompts in every block (``vpt_depth`` = depth, no projector)."""
    _check_supported(model)
    config = VAPTConfig(
        num_prompts=num_prompts,
        vpt_depth=len(model.blocks),
        feature_projector=False,
        prompt_dropout=prompt_dropout,
    )
    return apply_vapt(model, config, backend=backend)


def set_backend(model: VisionTransformer, backend: str) -> VisionTransformer:
    """Switch the op backend of every VAPT block; parameters are untouched."""
    blocks = [b for b in model.modules() if isinstance(b, VAPTBlock)]
    if not blocks:
        raise ValueError("set_backend: the model has no VAPT blocks; call vapt_kernels.apply_vapt first")
    backend = resolve_backend(backend)
    for block in blocks:
        block.backend = backend
    return model
