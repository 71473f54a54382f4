"""The VAPT modules: prompt generators, the feature projector, the prompt container and the block.

Parameters keep the official parameterisation (DESIGN §1) so that official checkpoints load
element for element; only their names say what they do. ``VAPTPrompts`` lives at ``model.vapt``
and owns every prompt parameter; each ``VAPTBlock`` replaces a timm ``Block`` in place, keeps its
submodules under the same names (backbone state-dict keys do not change) and asks the container
for its prompts.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from . import ops, reference
from .config import VAPTConfig

Grid = tuple[int, int]


def _activation(name: str):
    # "attention" is the official name for a softmax over the hidden dimension.
    return {
        "relu": F.relu,
        "gelu": F.gelu,
        "sigmoid": torch.sigmoid,
        "attention": lambda t: torch.softmax(t, dim=-1),
        "identity": lambda t: t,
    }[name]


class FeatureProjector(nn.Module):
    """``P = G + s * fc2(dropout(act(fc1(G))))`` on prompt rows ``G (B, Np, d)``; no biases.

    Args:
        dim: channels ``d``.
        hidden_dim: bottleneck width ``r``.
        activation: one of ``config.ACTIVATIONS``.
        dropout: dropout on the activation output (training only).
        learnable_scale: learn ``s`` (initialised to 1); otherwise ``s = 1``.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        activation: str,
        dropout: float,
        learnable_scale: bool,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(dim, hidden_dim, bias=False, **dd)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=False, **dd)
        self.activation = activation
        self.act = _activation(activation)
        self.dropout = dropout
        self.scale = nn.Parameter(torch.ones(1, **dd)) if learnable_scale else None

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        a = self.act(self.fc1(g))
        if self.dropout > 0.0:
            a = F.dropout(a, self.dropout, self.training)
        out = self.fc2(a)
        if self.scale is not None:
            out = out * self.scale
        return g + out


class PromptGenerator(nn.Module):
    """The per-block half of an adaptive prompt: LayerNorm, channel-wise conv, token projector.

    ``G = token_proj(Dropout2d(conv(LN(X_patches))))`` is computed by the fast paths as
    ``mask * (M @ LN(X_patches)) + bias`` with the folded matrix ``M`` of :meth:`mix_matrix`.

    Args:
        dim: channels ``d``.
        num_prompts: ``Np``.
        grid: the patch grid ``(H, W)`` the token projector is built for.
        config: the VAPT options (kernel, padding, conv, shared kernel, conv dropout).
    """

    def __init__(self, dim: int, num_prompts: int, grid: Grid, config: VAPTConfig, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.config = config
        self.grid = tuple(grid)
        self.conv_grid = config.conv_grid(self.grid)
        self.kernel_size = config.kernel_size
        self.padding = config.padding
        self.conv_dropout = config.conv_dropout if config.conv else 0.0
        self.norm = nn.LayerNorm(dim, eps=1e-5, **dd)
        if config.conv:
            channels = 1 if config.shared_kernel else dim
            self.kernel = nn.Parameter(torch.randn(channels, 1, self.kernel_size, self.kernel_size, **dd))
        else:
            self.register_parameter("kernel", None)
        self.token_proj = nn.Linear(self.conv_grid[0] * self.conv_grid[1], num_prompts, **dd)
        nn.init.zeros_(self.token_proj.weight)
        nn.init.zeros_(self.token_proj.bias)

    @property
    def per_channel(self) -> bool:
        return self.kernel is not None and self.kernel.shape[0] > 1

    def token_weight(self, grid: Grid) -> torch.Tensor:
        """Token-projector weight ``(Np, H'W')`` for the conv output grid of a ``grid`` input.

        At the grid the model was built for this is the parameter itself (exact). Other grids
        (dynamic image size) resample it bicubically, as timm resamples position embeddings, and
        rescale it by the area ratio so a sum over positions keeps its magnitude.
        """
        weight = self.token_proj.weight
        out_grid = self._conv_out_grid(grid)
        if out_grid == self.conv_grid:
            return weight
        resized = F.interpolate(
            weight.reshape(weight.shape[0], 1, *self.conv_grid), size=out_grid, mode="bicubic", align_corners=False
        )
        area = (self.conv_grid[0] * self.conv_grid[1]) / (out_grid[0] * out_grid[1])
        return resized.reshape(weight.shape[0], -1) * area

    def _conv_out_grid(self, grid: Grid) -> Grid:
        out = self.config.conv_grid(tuple(grid))
        if min(out) < 1:
            raise ValueError(
                f"a {grid[0]}x{grid[1]} patch grid is too small for a {self.kernel_size}x{self.kernel_size} "
                f"prompt convolution with padding {self.padding}; use a larger image or a smaller kernel_size"
            )
        return out

    def mix_matrix(self, grid: Grid) -> torch.Tensor:
        """The folded projection ``M = W_tok @ C(kernel)`` (DESIGN §2.2).

        Returns ``(Np, N)`` for a shared kernel or no convolution, ``(Np, N, d)`` per channel,
        with ``N = H * W``. A cross-correlation followed by a linear map over positions is the
        full correlation of the linear map's weight with the flipped kernel, so ``M`` is built
        directly: pad ``W_tok`` on its ``(H', W')`` grid, take its ``K x K`` patches and weight
        them by the kernel taps. Nothing ever convolves an identity.
        """
        w_tok = self.token_weight(grid)
        if self.kernel is None:
            return w_tok
        num_prompts, k = w_tok.shape[0], self.kernel_size
        edge = k - 1 - self.padding  # negative: the padding crops instead
        padded = F.pad(w_tok.reshape(num_prompts, 1, *self._conv_out_grid(grid)), (edge,) * 4)
        patches = F.unfold(padded, k)  # (Np, K*K, H*W)
        if patches.shape[-1] != grid[0] * grid[1]:
            raise AssertionError(f"folded matrix has {patches.shape[-1]} columns, expected {grid[0] * grid[1]}")
        taps = self.kernel.flip(-1, -2).reshape(self.kernel.shape[0], k * k)  # (1 or d, K*K)
        if not self.per_channel:
            return torch.matmul(taps[0], patches)  # (Np, N)
        return torch.matmul(taps, patches).transpose(1, 2)  # (Np, N, d)

    def channel_mask(self, batch: int, like: torch.Tensor) -> Optional[torch.Tensor]:
        """``Dropout2d`` on the conv output as a ``(B, 1, d)`` scaled keep-mask, or None.

        Dropout2d keeps or drops a whole channel of one sample, so it commutes with the
        (channel-independent) token projector. The mask is drawn exactly as ``F.dropout2d``
        draws it (one Bernoulli per sample and channel, in that order), so a seeded run
        matches the official formulation mask for mask.
        """
        if not self.training or self.conv_dropout == 0.0:
            return None
        keep = 1.0 - self.conv_dropout
        noise = like.new_empty(batch, like.shape[-1], 1, 1).bernoulli_(keep).div_(keep)
        return noise.reshape(batch, 1, -1)


class VAPTPrompts(nn.Module):
    """Every prompt parameter of a VAPT model (``model.vapt``), in the official parameterisation.

    Block ``l < vpt_depth`` reads a static prompt (``prompt`` for block 0, ``deep_prompts[l-1]``
    after); block ``l >= vpt_depth`` builds an adaptive one with ``generators[l - vpt_depth]``
    and ``projectors[0]`` (shared) or ``projectors[l - vpt_depth]``.

    Args:
        config: the VAPT options.
        dim: channels ``d`` of the ViT.
        depth: number of blocks ``L``.
        grid: the model's patch grid ``(H, W)``.
        patch_size: the patch size (for the official static-prompt initialisation).
    """

    def __init__(
        self,
        config: VAPTConfig,
        dim: int,
        depth: int,
        grid: Grid,
        patch_size: tuple[int, int],
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.config = config
        self.depth = depth
        self.grid = tuple(grid)  # updated from every input image by `record_grid`
        np_, vpt_depth = config.num_prompts, config.vpt_depth
        # Official init: uniform(-v, v), v = sqrt(6 / (3 * patch_area + d)).
        bound = math.sqrt(6.0 / (3 * patch_size[0] * patch_size[1] + dim))
        self.prompt = nn.Parameter(torch.empty(1, np_, dim, **dd).uniform_(-bound, bound))
        if vpt_depth > 1:
            self.deep_prompts = nn.Parameter(torch.empty(vpt_depth - 1, np_, dim, **dd).uniform_(-bound, bound))
        else:
            self.register_parameter("deep_prompts", None)
        adaptive = depth - vpt_depth
        self.generators = nn.ModuleList(PromptGenerator(dim, np_, grid, config, **dd) for _ in range(adaptive))
        num_projectors = 0
        if config.feature_projector and adaptive:
            num_projectors = 1 if config.share_projector else adaptive
        self.projectors = nn.ModuleList(
            FeatureProjector(dim, config.hidden_dim, config.activation, config.mlp_dropout, config.learnable_scale, **dd)
            for _ in range(num_projectors)
        )

    def is_static(self, index: int) -> bool:
        return index < self.config.vpt_depth

    def generator(self, index: int) -> PromptGenerator:
        return self.generators[index - self.config.vpt_depth]

    def static_prompt(self, index: int, batch: int) -> torch.Tensor:
        """Static prompt of block ``index``: ``(1, Np, d)``, or ``(B, Np, d)`` under prompt dropout.

        Without dropout the prompt is the same for every image (DESIGN §2.4): it stays batch-free
        and its keys/values are computed once. The official code drops out the prompt after
        expanding it over the batch, so dropout makes it per-sample.
        """
        p = self.prompt if index == 0 else self.deep_prompts[index - 1].unsqueeze(0)
        if self.training and self.config.prompt_dropout > 0.0:
            p = F.dropout(p.expand(batch, -1, -1), self.config.prompt_dropout, True)
        return p

    def project(self, index: int, g: torch.Tensor) -> torch.Tensor:
        """Feature projector of adaptive block ``index`` on ``G (B, Np, d)``."""
        if not len(self.projectors):
            return g
        j = 0 if self.config.share_projector else index - self.config.vpt_depth
        return self.projectors[j](g)

    def record_grid(self, patch_embed: nn.Module, args: tuple) -> None:
        """Forward pre-hook on ``patch_embed``: remember the patch grid of the incoming images."""
        height, width = args[0].shape[-2:]
        self.grid = tuple(patch_embed.dynamic_feat_size((height, width)))

    def grid_for(self, num_patches: int) -> Grid:
        """The patch grid of the current input, checked against its token count."""
        h, w = self.grid
        if h * w == num_patches:
            return self.grid
        side = math.isqrt(num_patches)
        if side * side == num_patches:
            return side, side
        raise ValueError(
            f"a VAPT block got {num_patches} patch tokens, which is neither the {h}x{w} grid of the last "
            f"image seen by patch_embed nor a square grid; call the model on images, not on raw tokens"
        )

    def extra_repr(self) -> str:
        return f"{self.config}"


class VAPTBlock(Block):
    """A timm ``Block`` with VAPT prompts entering its attention as a key/value prefix.

    The block adopts the submodules of the block it replaces under the same names, so backbone
    weights and their state-dict keys are untouched, and ``isinstance(block, Block)`` still holds.
    For every real token the output equals the official formulation (prompts inserted as tokens
    after the prefix tokens, the whole block run, prompt outputs dropped; DESIGN §2.1).

    Args:
        block: the timm block to take over.
        index: its position ``l`` in ``model.blocks``.
        prompts: the model's ``VAPTPrompts`` (referenced, not registered as a submodule).
        num_prefix_tokens: class/register/distillation tokens before the patches.
        backend: op backend (see :func:`vapt_kernels.ops.resolve_backend`).
    """

    def __init__(self, block: Block, index: int, prompts: VAPTPrompts, num_prefix_tokens: int, backend: str):
        nn.Module.__init__(self)
        for name, child in block.named_children():
            self.add_module(name, child)
        self.training = block.training
        self.vapt_index = index
        self.num_prefix_tokens = num_prefix_tokens
        self.backend = backend
        object.__setattr__(self, "vapt_prompts", prompts)  # shared, owned by model.vapt

    def extra_repr(self) -> str:
        return f"index={self.vapt_index}, backend={self.backend!r}"

    def forward(
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError(
                "VAPT blocks do not take attn_mask or is_causal: the official method attends over all "
                "tokens and prompts; call the model without a mask"
            )
        if self.backend == "reference":
            return reference.block_forward(self, x)
        h, p = self._norm_and_prompt(x)
        x = x + self.drop_path1(self.ls1(self._attention(h, p)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x

    def _norm_and_prompt(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``h = norm1(x)`` (B, T, d) and this block's prompt rows ``p`` (B or 1, Np, d)."""
        vapt, index = self.vapt_prompts, self.vapt_index
        if vapt.is_static(index):
            return self.norm1(x), vapt.static_prompt(index, x.shape[0])
        gen = vapt.generator(index)
        n1 = self.norm1
        h, g = ops.norm_and_project(
            x,
            n1.weight,
            n1.bias,
            n1.eps,
            gen.norm.weight,
            gen.norm.bias,
            gen.norm.eps,
            gen.mix_matrix(vapt.grid_for(x.shape[1] - self.num_prefix_tokens)),
            self.num_prefix_tokens,
            backend=self.backend,
        )
        mask = gen.channel_mask(x.shape[0], g)
        if mask is not None:
            g = g * mask
        g = g + gen.token_proj.bias.unsqueeze(-1)
        return h, vapt.project(index, g)

    def _attention(self, h: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """timm ``Attention.forward`` on ``h`` with the prompt keys/values of ``p`` as a prefix."""
        attn = self.attn
        B, T, _ = h.shape
        heads, head_dim = attn.num_heads, attn.head_dim
        attn_dim = heads * head_dim
        qkv = attn.qkv(h).reshape(B, T, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        # Prompt rows only need keys and values: the K/V rows of the block's own QKV projection.
        kv_weight = attn.qkv.weight[attn_dim:]
        kv_bias = attn.qkv.bias[attn_dim:] if attn.qkv.bias is not None else None
        kv_p = F.linear(self.norm1(p), kv_weight, kv_bias)
        kv_p = kv_p.reshape(p.shape[0], p.shape[1], 2, heads, head_dim).permute(2, 0, 3, 1, 4)
        k_p, v_p = kv_p.unbind(0)
        k_p = attn.k_norm(k_p)
        o = ops.prefix_attention(q, k, v, k_p, v_p, attn.scale, backend=self.backend)
        o = o.transpose(1, 2).reshape(B, T, attn_dim)
        norm = getattr(attn, "norm", None)  # timm's optional scale_norm
        if norm is not None:
            o = norm(o)
        gate = getattr(attn, "gate", None)  # timm's optional gated attention
        if gate is not None:
            o = o * gate(h).sigmoid()
        return attn.proj_drop(attn.proj(o))
