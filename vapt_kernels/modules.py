"""The VAPT prompt modules: prompt generators, the feature projector and the prompt container.

Parameters keep the official parameterisation (docs/design.md §1.1) so that official checkpoints
load element for element; only their names say what they do. ``VAPTPrompts`` lives at
``model.vapt``, owns every prompt parameter, and computes each block's prompts when the block asks
(:meth:`VAPTPrompts.forward`); the blocks themselves are the timm integration's
(:mod:`vapt_kernels.timm`).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .config import VAPTConfig

Grid = tuple[int, int]


def _softmax_over_hidden(t: torch.Tensor) -> torch.Tensor:
    return torch.softmax(t, dim=-1)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


# Module-level functions, so that models pickle; "attention" is the official name of a softmax
# over the hidden dimension.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "sigmoid": torch.sigmoid,
    "attention": _softmax_over_hidden,
    "identity": _identity,
}


def project_features(
    g: torch.Tensor,
    fc1: Callable[[torch.Tensor], torch.Tensor],
    fc2: Callable[[torch.Tensor], torch.Tensor],
    scale: Optional[torch.Tensor],
    activation: str,
    dropout: float,
    training: bool,
) -> torch.Tensor:
    """The feature projector ``P = G + s * fc2(dropout(act(fc1(G))))`` on prompt rows ``G``.

    Args:
        g: the prompt rows ``(B, Np, d)``.
        fc1: the map ``d -> r`` (no bias): a :class:`FeatureProjector`'s ``fc1`` module, or a
            batched product with each image's own weights (:class:`vapt_kernels.MultiTaskVAPT`).
        fc2: the map ``r -> d``, likewise.
        scale: ``s``, broadcast against ``(B, Np, d)``; None for ``s = 1``.
        activation: one of :data:`ACTIVATIONS`.
        dropout: dropout on the activation output.
        training: apply the dropout.
    """
    a = ACTIVATIONS[activation](fc1(g))
    if dropout > 0.0:
        a = F.dropout(a, dropout, training)
    out = fc2(a)
    if scale is not None:
        out = out * scale
    return g + out


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
        self.dropout = dropout
        self.scale = nn.Parameter(torch.ones(1, **dd)) if learnable_scale else None

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return project_features(g, self.fc1, self.fc2, self.scale, self.activation, self.dropout, self.training)


def conv_out_grid(config: VAPTConfig, grid: Grid) -> Grid:
    """The prompt convolution's output grid on a ``grid`` of patches, refused when empty."""
    out = config.conv_grid(tuple(grid))
    if min(out) < 1:
        raise ValueError(
            f"a {grid[0]}x{grid[1]} patch grid is too small for a {config.kernel_size}x{config.kernel_size} "
            f"prompt convolution with padding {config.padding}; use a larger image or a smaller kernel_size"
        )
    return out


def resample_token_weight(weight: torch.Tensor, config: VAPTConfig, built_grid: Grid, grid: Grid) -> torch.Tensor:
    """Token-projector weights ``(..., Np, H'W')`` built for a ``built_grid`` of patches, for the
    conv output grid of a ``grid`` input.

    At the grid the model was built for this is ``weight`` itself (exact). Other grids (dynamic
    image size) resample it bicubically, as timm resamples position embeddings, and rescale it by
    the area ratio so a sum over positions keeps its magnitude.
    """
    built, out_grid = config.conv_grid(tuple(built_grid)), conv_out_grid(config, grid)
    if out_grid == built:
        return weight
    resized = F.interpolate(weight.reshape(-1, 1, *built), size=out_grid, mode="bicubic", align_corners=False)
    area = (built[0] * built[1]) / (out_grid[0] * out_grid[1])
    return resized.reshape(*weight.shape[:-1], -1) * area


def fold_mix(
    token_weight: torch.Tensor, kernel: Optional[torch.Tensor], config: VAPTConfig, built_grid: Grid, grid: Grid
) -> torch.Tensor:
    """The folded projection ``M = W_tok @ C(kernel)`` of one generator, or of ``K`` stacked ones.

    Args:
        token_weight: token-projector weight ``(Np, H'W')``, or ``(K, Np, H'W')`` for ``K`` tasks.
        kernel: conv kernel ``(C, 1, k, k)`` (``C`` 1 for a shared kernel, else ``d``), or
            ``(K, C, 1, k, k)``; None without the convolution.
        config: the VAPT options (kernel size, padding).
        built_grid: the patch grid the token projector was built for.
        grid: the patch grid ``(H, W)`` of the input.

    Returns:
        ``(Np, N)`` for a shared kernel or no convolution, ``(Np, N, d)`` per channel, ``N = H * W``,
        with a leading ``K`` for stacked inputs. A cross-correlation followed by a linear map over
        positions is the full correlation of the linear map's weight with the flipped kernel, so
        ``M`` is built directly: pad ``W_tok`` on its ``(H', W')`` grid, take its ``k x k`` patches
        and weight them by the kernel taps. Nothing ever convolves an identity.
    """
    w_tok = resample_token_weight(token_weight, config, built_grid, grid)
    if kernel is None:
        return w_tok
    lead, num_prompts, k = w_tok.shape[:-2], w_tok.shape[-2], config.kernel_size
    edge = k - 1 - config.padding  # negative: the padding crops instead
    padded = F.pad(w_tok.reshape(-1, 1, *conv_out_grid(config, grid)), (edge,) * 4)
    patches = F.unfold(padded, k)  # (K * Np, k * k, H * W)
    if patches.shape[-1] != grid[0] * grid[1]:
        raise AssertionError(f"folded matrix has {patches.shape[-1]} columns, expected {grid[0] * grid[1]}")
    patches = patches.reshape(*lead, num_prompts, k * k, -1)
    taps = kernel.flip(-1, -2).reshape(*kernel.shape[:-3], k * k)  # (..., C, k * k)
    if kernel.shape[-4] == 1:
        return torch.matmul(taps.unsqueeze(-2), patches).squeeze(-2)  # (..., Np, N)
    return torch.matmul(taps.unsqueeze(-3), patches).transpose(-1, -2)  # (..., Np, N, d)


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
        """Token-projector weight ``(Np, H'W')`` for the conv output grid of a ``grid`` input (see
        :func:`resample_token_weight`)."""
        return resample_token_weight(self.token_proj.weight, self.config, self.grid, grid)

    def mix_matrix(self, grid: Grid) -> torch.Tensor:
        """The folded projection ``M = W_tok @ C(kernel)`` (docs/design.md §1.3): ``(Np, N)`` for a
        shared kernel or no convolution, ``(Np, N, d)`` per channel, ``N = H * W`` (see
        :func:`fold_mix`)."""
        return fold_mix(self.token_proj.weight, self.kernel, self.config, self.grid, grid)

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
        d = like.shape[-1]
        noise = like.new_empty(batch, d, 1, 1).bernoulli_(keep).div_(keep)
        return noise.reshape(batch, 1, d)


class VAPTPrompts(nn.Module):
    """Every prompt parameter of a VAPT model (``model.vapt``), in the official parameterisation.

    Block ``l < vpt_depth`` reads a static prompt (``prompt`` for block 0, ``deep_prompts[l-1]``
    after); block ``l >= vpt_depth`` builds an adaptive one with ``generators[l - vpt_depth]``
    and ``projectors[0]`` (shared) or ``projectors[l - vpt_depth]``. The blocks ask for their
    prompts through :meth:`forward`, so the prompt parameters are only ever read inside this
    module's forward (which is what module-level wrappers such as FSDP2's hook into).

    Args:
        config: the VAPT options.
        dim: channels ``d`` of the ViT.
        depth: number of blocks ``L``.
        grid: the patch grid ``(H, W)`` the token projectors are built for.
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

        Without dropout the prompt is the same for every image (docs/design.md §1.5): it stays
        batch-free and its keys/values are computed once. The official code drops out the prompt
        after expanding it over the batch, so dropout makes it per-sample.
        """
        p = self.prompt if index == 0 else self.deep_prompts[index - 1].unsqueeze(0)
        if self.training and self.config.prompt_dropout > 0.0:
            return F.dropout(p.expand(batch, -1, -1), self.config.prompt_dropout, True)
        # A copy, not the parameter: a wrapper that frees the parameters after forward (FSDP2)
        # must not free the block's prompt rows with them.
        return p.clone()

    def project(self, index: int, g: torch.Tensor) -> torch.Tensor:
        """Feature projector of adaptive block ``index`` on ``G (B, Np, d)``."""
        if not len(self.projectors):
            return g
        j = 0 if self.config.share_projector else index - self.config.vpt_depth
        return self.projectors[j](g)

    def forward(
        self, index: int, x: torch.Tensor, norm1: nn.LayerNorm, num_prefix: int, grid: Grid, backend: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``index``'s ``h = norm1(x)`` and its prompt rows.

        Args:
            index: the block's position ``l``.
            x: the block input ``(B, T, d)``, ``T = num_prefix + H * W``.
            norm1: the block's own LayerNorm (an adaptive prompt shares its row statistics).
            num_prefix: prefix tokens (class, register, distillation) before the patches.
            grid: the patch grid ``(H, W)`` of the images ``x`` comes from.
            backend: op backend (see :mod:`vapt_kernels.ops`).

        Returns:
            ``h (B, T, d)`` and the prompt rows ``(B or 1, Np, d)``.
        """
        if self.is_static(index):
            return norm1(x), self.static_prompt(index, x.shape[0])
        gen = self.generator(index)
        h, g = ops.norm_and_project(
            x,
            norm1.weight,
            norm1.bias,
            norm1.eps,
            gen.norm.weight,
            gen.norm.bias,
            gen.norm.eps,
            gen.mix_matrix(grid),
            num_prefix,
            backend=backend,
        )
        mask = gen.channel_mask(x.shape[0], g)
        if mask is not None:
            g = g * mask
        g = g + gen.token_proj.bias.unsqueeze(-1)
        return h, self.project(index, g)

    def extra_repr(self) -> str:
        return f"{self.config}"
