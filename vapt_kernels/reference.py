"""The literal official VAPT formulation: the oracle every fast path is tested against.

Prompts are built exactly as the official code builds them (LayerNorm of the patch tokens, the
grid reshaped to ``(B, d, H, W)``, a grouped convolution with the expanded kernel, ``Dropout2d``,
the token projector over grid positions, the feature projector) and inserted as real tokens right
after the prefix tokens; the whole timm block runs on ``[prefix, prompts, patches]`` and the prompt
outputs are dropped. Nothing here is fused or folded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block

if TYPE_CHECKING:
    from .modules import VAPTBlock, VAPTPrompts


def prompt_tokens(vapt: "VAPTPrompts", index: int, x: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Prompt tokens ``(B, Np, d)`` of block ``index`` for the block input ``x (B, T, d)``."""
    B = x.shape[0]
    if vapt.is_static(index):
        p = vapt.prompt if index == 0 else vapt.deep_prompts[index - 1].unsqueeze(0)
        return F.dropout(p.expand(B, -1, -1), vapt.config.prompt_dropout, vapt.training)
    gen = vapt.generator(index)
    patches = gen.norm(x[:, num_prefix:])  # (B, N, d)
    grid = vapt.grid_for(patches.shape[1])
    weight = gen.token_weight(grid)
    if gen.kernel is None:
        g = F.linear(patches.transpose(1, 2), weight, gen.token_proj.bias)  # (B, d, Np)
    else:
        d = patches.shape[-1]
        image = patches.transpose(1, 2).reshape(B, d, *grid)
        kernel = gen.kernel.expand(d, 1, gen.kernel_size, gen.kernel_size)
        y = F.conv2d(image, kernel, groups=d, padding=gen.padding)  # (B, d, H', W')
        y = F.dropout2d(y, gen.conv_dropout, gen.training)
        g = F.linear(y.reshape(B, d, -1), weight, gen.token_proj.bias)  # (B, d, Np)
    return vapt.project(index, g.transpose(1, 2))


def block_forward(block: "VAPTBlock", x: torch.Tensor) -> torch.Tensor:
    """The official block: prompts as tokens after the prefix, whole timm block, prompts dropped."""
    P = block.num_prefix_tokens
    p = prompt_tokens(block.vapt_prompts, block.vapt_index, x, P)
    out = Block.forward(block, torch.cat((x[:, :P], p.to(x.dtype), x[:, P:]), dim=1))
    return torch.cat((out[:, :P], out[:, P + p.shape[1] :]), dim=1)
