"""The literal official VAPT formulation: the model-level oracle every fast path is tested against.

It works on tensors and parameters only: a timm ``VisionTransformer`` whose weights it uses as they
are, and the prompt parameters under their official names (docs/design.md §1.1, without the
``enc.transformer.`` prefix). Prompts are built exactly as the official code builds them (LayerNorm
of the patch tokens, the grid reshaped to ``(B, d, H, W)``, a grouped convolution with the
expanded kernel, ``Dropout2d``, the token projector over grid positions, the feature projector),
inserted as real tokens right after the prefix tokens, and the whole timm block runs on
``[prefix, prompts, patches]``; the prompt outputs are dropped, except the last block's where the
model pools by average (or max) over its tokens: the official MAE model keeps them in the sequence
it pools (``config.pooled_tokens``: with the patches, ``"prompts+patches"``, its default; alone,
``"prompts"``; or dropped, ``"patches"``). Nothing here is fused or folded, and nothing here comes
from the modules it checks.

At another patch grid than the one the token projector was trained for, the official code has no
answer; pass token-projector weights of the new grid's size (see
:meth:`vapt_kernels.modules.PromptGenerator.token_weight` for the package's resampling rule).
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer

from .config import VAPTConfig

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "sigmoid": torch.sigmoid,
    "attention": lambda t: torch.softmax(t, dim=-1),  # the official name of a softmax over r
    "identity": lambda t: t,
}


def prompt_tokens(
    params: Mapping[str, torch.Tensor],
    config: VAPTConfig,
    index: int,
    patches: torch.Tensor,
    grid: tuple[int, int],
    training: bool = False,
) -> torch.Tensor:
    """Prompt tokens ``(B, Np, d)`` of block ``index``, as the official code computes them.

    Args:
        params: official prompt parameters by official name (no ``enc.transformer.`` prefix).
        config: the VAPT options the parameters belong to.
        index: block index ``l``.
        patches: the block input's patch tokens ``(B, N, d)``, ``N = H * W``.
        grid: the patch grid ``(H, W)``.
        training: apply the prompt dropouts (the backbone is never in training mode).
    """
    B, N, d = patches.shape
    if index < config.vpt_depth:
        p = params["prompt_embeddings"] if index == 0 else params["deep_prompt_embeddings"][index - 1 : index]
        return F.dropout(p.expand(B, -1, -1), config.prompt_dropout, training)
    j = index - config.vpt_depth
    xn = F.layer_norm(patches, (d,), params[f"deep_prompt_norm.{j}.weight"], params[f"deep_prompt_norm.{j}.bias"], 1e-5)
    image = xn.transpose(1, 2).reshape(B, d, *grid)
    if config.conv:
        kernel = params[f"deep_prompt_downsample.{j}.conv.kernel"]
        kernel = kernel.expand(d, 1, config.kernel_size, config.kernel_size)
        y = F.conv2d(image, kernel, groups=d, padding=config.padding)  # (B, d, H', W')
        y = F.dropout2d(y, config.conv_dropout, training)
        linear = f"deep_prompt_downsample.{j}.linear"
    else:
        y = image
        linear = f"deep_prompt_downsample.{j}"
    g = F.linear(y.flatten(2), params[f"{linear}.weight"], params[f"{linear}.bias"]).transpose(1, 2)
    if not config.feature_projector:
        return g
    mlp = "deep_prompt_embeddings_mlp" if config.share_projector else f"deep_prompt_embeddings_mlp.{j}"
    a = _ACTIVATIONS[config.activation](F.linear(g, params[f"{mlp}.block.0.weight"]))
    out = F.linear(F.dropout(a, config.mlp_dropout, training), params[f"{mlp}.block.2.weight"])
    if config.learnable_scale:
        out = out * params[f"{mlp}.scale"]
    return g + out


def forward(
    backbone: VisionTransformer,
    params: Mapping[str, torch.Tensor],
    config: VAPTConfig,
    images: torch.Tensor,
    training: bool = False,
) -> torch.Tensor:
    """Logits of the official VAPT model: ``backbone``'s weights with ``params``' prompts.

    Args:
        backbone: a timm ``VisionTransformer``; its embedding, blocks (run through timm's own
            ``Block.forward``), final norm and head are used as they are, in their current mode.
        params: official prompt parameters by official name (see :func:`prompt_tokens`).
        config: the VAPT options.
        images: ``(B, 3, H_img, W_img)``.
        training: apply the prompt dropouts.
    """
    grid = tuple(backbone.patch_embed.dynamic_feat_size(images.shape[-2:]))
    x = backbone.norm_pre(backbone.patch_drop(backbone._pos_embed(backbone.patch_embed(images))))
    P = backbone.num_prefix_tokens
    last = len(backbone.blocks) - 1
    pooled = config.pooled_tokens != "patches" and backbone.attn_pool is None and backbone.global_pool in (
        "avg", "max", "avgmax"
    )  # fmt: skip
    for index, block in enumerate(backbone.blocks):
        p = prompt_tokens(params, config, index, x[:, P:], grid, training).to(x.dtype)
        out = Block.forward(block, torch.cat((x[:, :P], p, x[:, P:]), dim=1))
        if index == last and pooled:
            # The sequence the official MAE model pools: [prefix, prompt outputs(, patches)].
            kept = out if config.pooled_tokens == "prompts+patches" else out[:, : P + p.shape[1]]
            return backbone.forward_head(backbone.norm(kept))
        x = torch.cat((out[:, :P], out[:, P + p.shape[1] :]), dim=1)
    return backbone.forward_head(backbone.norm(x))
