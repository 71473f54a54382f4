"""The timm integration: ``apply_vapt``, ``apply_vpt``, ``set_backend``, the VAPT block, and what
the tools need to know about a timm ViT (:func:`prompts_of`, :func:`embed_tokens`).

``apply_vapt`` turns a timm ``VisionTransformer`` into a VAPT model in place: every block becomes a
:class:`VAPTBlock` (the same submodules under the same names), the prompt parameters live at
``model.vapt``, and the model's class becomes a subclass of its own (``VAPTVisionTransformer``
for a ``VisionTransformer``) whose ``train()`` keeps the frozen backbone in eval mode.

The patch grid of the images travels with each call: a pre-hook on ``patch_embed`` records it
for the calling thread (and for the block inputs that a checkpointed block recomputes from,
which autograd may do on another thread), so one model serves several threads with differently
shaped images at once.
"""

from __future__ import annotations

import threading
from typing import Mapping, NamedTuple, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch.utils.weak import WeakTensorKeyDictionary

from . import ops
from .config import VAPTConfig, as_config
from .modules import Grid, VAPTPrompts
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


def _check_supported(model: nn.Module, caller: str) -> None:
    """Raise a clear error for any model VAPT cannot run exactly, before anything is changed."""
    name = _model_name(model)
    if not isinstance(model, VisionTransformer):
        reason = _UNSUPPORTED_FAMILIES.get(type(model).__name__, "it is not a timm VisionTransformer")
        raise TypeError(f"{caller}: {name} is not supported: {reason}")
    if isinstance(model, VAPTModel) or any(isinstance(b, VAPTBlock) for b in model.blocks):
        raise ValueError(f"{caller}: {name} already has VAPT prompts; build a fresh model to change the config")
    for i, block in enumerate(model.blocks):
        if type(block) is not Block:
            raise TypeError(
                f"{caller}: {name} is not supported: block {i} is {type(block).__name__}, "
                "not timm's standard Block (pre-norm attention then MLP)"
            )
        if type(block.attn) is not Attention:
            raise TypeError(
                f"{caller}: {name} is not supported: block {i} attention is {type(block.attn).__name__}, "
                "not timm's standard Attention (rotary or relative-position terms cannot take prompt keys exactly)"
            )
        if not isinstance(block.norm1, nn.LayerNorm):
            raise TypeError(
                f"{caller}: {name} is not supported: block {i} norm1 is {type(block.norm1).__name__}; "
                "VAPT shares the row statistics of a LayerNorm"
            )
    if not isinstance(model.patch_drop, nn.Identity):
        raise ValueError(
            f"{caller}: {name} uses patch dropout (patch_drop_rate > 0), which removes patches from the "
            "grid the prompt convolution needs; build the model with patch_drop_rate=0"
        )
    if not hasattr(model.patch_embed, "dynamic_feat_size"):
        raise TypeError(
            f"{caller}: {name} is not supported: its patch_embed ({type(model.patch_embed).__name__}) "
            "does not report the patch grid of an image"
        )


def check_fits(model: nn.Module, config: VAPTConfig, caller: str) -> None:
    """Raise a clear error, naming ``caller``, where :func:`apply_vapt` could not give ``model``
    prompts of ``config``: an unsupported model, one that has prompts already, a ``vpt_depth``
    beyond its blocks, a convolution kernel larger than its padded patch grid."""
    _check_supported(model, caller)
    depth = len(model.blocks)
    if config.vpt_depth > depth:
        raise ValueError(f"{caller}: vpt_depth={config.vpt_depth} exceeds the model's {depth} blocks")
    grid = tuple(model.patch_embed.grid_size)
    if config.vpt_depth < depth and min(config.conv_grid(grid)) < 1:
        raise ValueError(
            f"{caller}: kernel_size={config.kernel_size} with padding={config.padding} does not fit the "
            f"model's {grid[0]}x{grid[1]} patch grid"
        )


def backbone_signature(model: VisionTransformer) -> dict[str, object]:
    """What prompts trained on ``model`` depend on, as plain JSON values: the shapes (``depth``,
    ``embed_dim``, ``num_heads``, ``patch_size``, the ``grid`` the token projectors are built for,
    ``num_prefix_tokens``), the ``global_pool`` the head reads, and timm's ``architecture``
    name where the model has one (None otherwise), to tell backbones of one shape apart."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return {
        "architecture": cfg.get("architecture"),
        "depth": len(model.blocks),
        "embed_dim": int(model.embed_dim),
        "num_heads": int(model.blocks[0].attn.num_heads),
        "patch_size": [int(p) for p in model.patch_embed.patch_size],
        "grid": [int(g) for g in model.patch_embed.grid_size],
        "num_prefix_tokens": int(model.num_prefix_tokens),
        "global_pool": str(model.global_pool),
    }


def pools_prompt_outputs(model: VisionTransformer, config: VAPTConfig) -> bool:
    """Whether ``model``'s pool reads the last block's prompt outputs: it averages (or takes the
    max) over its tokens (timm ``global_pool`` avg, max or avgmax, no attention pool) and
    ``config.pooled_tokens`` names them. Class-token and attention-pooled models never do."""
    return (
        config.pooled_tokens != "patches"
        and getattr(model, "attn_pool", None) is None
        and model.global_pool in ("avg", "max", "avgmax")
    )


def prompts_of(model: nn.Module, caller: str) -> VAPTPrompts:
    """The prompts of a VAPT model (``model.vapt``).

    Raises:
        ValueError: the model has none (naming ``caller``, the public function that asked).
    """
    vapt = getattr(model, "vapt", None)
    if not isinstance(vapt, VAPTPrompts):
        raise ValueError(f"{caller}: the model has no VAPT prompts; call vapt_kernels.apply_vapt first")
    return vapt


def embed_tokens(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """The token sequence ``(B, T, d)`` that the first block of a timm ``VisionTransformer`` takes:
    the patch embedding, the position embedding with the prefix (class, register, distillation)
    tokens, patch dropout and the pre-norm, as timm's ``forward_features`` computes it before its
    blocks. A VAPT model's ``patch_embed`` also records the images' patch grid here (dynamic image
    size)."""
    return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))


def _classifier_modules(model: nn.Module) -> list[nn.Module]:
    heads = model.get_classifier()
    heads = list(heads) if isinstance(heads, (tuple, list)) else [heads]
    drop = getattr(model, "head_drop", None)
    return heads + ([drop] if drop is not None else [])


# ------------------------------------------------------------------------------------------------
# the patch grid of the current call
# ------------------------------------------------------------------------------------------------

# The grid of the images most recently embedded by this thread (threading.local, unlike a module
# attribute, is per thread; torch.compile traces it).
_CALL = threading.local()
# Block input -> the grid it was computed from, for gradient checkpointing: a checkpointed block is
# run again in the backward pass with the same input tensor, possibly on an autograd thread.
_GRID_OF_INPUT = WeakTensorKeyDictionary()


def _record_grid(patch_embed: nn.Module, args: tuple) -> None:
    """Forward pre-hook on ``patch_embed``: the patch grid of the incoming images, for this thread."""
    _CALL.grid = tuple(patch_embed.dynamic_feat_size(args[0].shape[-2:]))


def _fixed_grid(patch_embed: nn.Module) -> Optional[Grid]:
    """The patch grid of every input when the model takes one image size only, else None."""
    if getattr(patch_embed, "strict_img_size", False) and patch_embed.img_size is not None:
        return tuple(patch_embed.grid_size)
    return None


# ------------------------------------------------------------------------------------------------
# the block
# ------------------------------------------------------------------------------------------------


class PromptProjections(NamedTuple):
    """What a block's attention takes from prompt rows ``p (R, Np, d)``
    (:meth:`VAPTBlock.prompt_projections`): their keys and values ``(R, H, Np, D)``; when the
    block pools its prompt outputs, their queries ``(R, H, Np, D)`` and ``norm1(p)``, else None."""

    keys: torch.Tensor
    values: torch.Tensor
    queries: Optional[torch.Tensor] = None
    normed: Optional[torch.Tensor] = None


class VAPTBlock(Block):
    """A timm ``Block`` with VAPT prompts entering its attention as a key/value prefix.

    The block adopts the submodules of the block it replaces under the same names, so backbone
    weights and their state-dict keys are untouched, and ``isinstance(block, Block)`` still holds.
    For every real token the output equals the official formulation (prompts inserted as tokens
    after the prefix tokens, the whole block run, prompt outputs dropped; docs/design.md §1.2).

    Args:
        block: the timm block to take over.
        index: its position ``l`` in ``model.blocks``.
        prompts: the model's ``VAPTPrompts`` (referenced, not registered as a submodule).
        num_prefix_tokens: class/register/distillation tokens before the patches.
        fixed_grid: the patch grid of every input when the model takes one image size only.
        backend: op backend (see :mod:`vapt_kernels.ops`).
    """

    def __init__(
        self,
        block: Block,
        index: int,
        prompts: VAPTPrompts,
        num_prefix_tokens: int,
        fixed_grid: Optional[Grid],
        backend: str,
    ):
        nn.Module.__init__(self)
        for name, child in block.named_children():
            self.add_module(name, child)
        self.training = block.training
        self.vapt_index = index
        self.num_prefix_tokens = num_prefix_tokens
        self.fixed_grid = fixed_grid
        self.backend = backend
        object.__setattr__(self, "vapt_prompts", prompts)  # shared, owned by model.vapt
        # The last block of a model that pools its prompt outputs (:func:`pools_prompt_outputs`)
        # also computes its Np prompt rows and appends them to its output: (B, T + Np, d).
        self.appends_prompt_outputs = False

    def extra_repr(self) -> str:
        appends = ", appends_prompt_outputs=True" if self.appends_prompt_outputs else ""
        return f"index={self.vapt_index}, backend={self.backend!r}{appends}"

    def forward(
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError(
                "VAPT blocks do not take attn_mask or is_causal: the official method attends over all "
                "tokens and prompts; call the model without a mask"
            )
        grid = self.patch_grid(x)
        h, p = self.vapt_prompts(self.vapt_index, x, self.norm1, self.num_prefix_tokens, grid, self.backend)
        return self.forward_prompted(x, h, p)

    def forward_prompted(
        self,
        x: torch.Tensor,
        h: torch.Tensor,
        p: torch.Tensor,
        prompt_index: Optional[torch.Tensor] = None,
        projections: Optional["PromptProjections"] = None,
    ) -> torch.Tensor:
        """The block on ``x`` given ``h = norm1(x)`` and the prompt rows ``p``: ``(B or 1, Np, d)``,
        or ``(K, Np, d)`` with ``prompt_index (B,)`` naming each image's row (per-task static
        prompts, whose keys and values are then computed once per task). ``projections``: what
        :meth:`prompt_projections` gives for ``p``, when the caller kept it (a served task's
        static prompts).

        Returns ``(B, T, d)``; with :attr:`appends_prompt_outputs`, ``(B, T + Np, d)``: the
        prompt rows' outputs after the tokens, as the official block computes them (their queries
        over the same keys, the residual, the MLP), for the pool to read (docs/design.md §1.6)."""
        projections = projections or self.prompt_projections(p)
        if not self.appends_prompt_outputs:
            x = x + self.drop_path1(self.ls1(self._attention(h, projections, prompt_index)))
            return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        a, a_p = self._attention(h, projections, prompt_index)
        rows = p[prompt_index] if prompt_index is not None else p.expand(x.shape[0], -1, -1)
        # The rest of the block is token-wise: tokens and prompt rows go through it as one sequence.
        x = torch.cat((x, rows), dim=1) + self.drop_path1(self.ls1(torch.cat((a, a_p), dim=1)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        stash = getattr(_CALL, "prompt_outputs", None)
        if stash is not None:  # forward_intermediates: the tokens alone, the rows on the side
            stash.append(x[:, -rows.shape[1] :])
            return x[:, : -rows.shape[1]]
        return x

    def patch_grid(self, x: torch.Tensor) -> Grid:
        """The patch grid ``(H, W)`` of the images the block input ``x`` was computed from, checked
        against its token count: the model's one grid when it takes one image size, else the grid
        that ``patch_embed`` recorded for this thread (or for ``x`` itself, when a checkpointed
        block recomputes)."""
        if self.fixed_grid is not None:
            grid = self.fixed_grid
        elif torch.compiler.is_compiling():
            grid = getattr(_CALL, "grid", None)
        else:
            grid = _GRID_OF_INPUT.get(x) or getattr(_CALL, "grid", None)
            if grid is not None:
                _GRID_OF_INPUT[x] = grid
        num_patches = x.shape[1] - self.num_prefix_tokens
        if grid is None or grid[0] * grid[1] != num_patches:
            raise ValueError(
                f"VAPT block {self.vapt_index} got {num_patches} patch tokens but no image of that many patches "
                f"was embedded by this thread (last grid: {grid}); VAPT needs the patch grid, so call the model "
                "on images, not its blocks on raw tokens"
            )
        return grid

    def prompt_projections(self, p: torch.Tensor) -> "PromptProjections":
        """What the block's attention takes from the prompt rows ``p (R, Np, d)``: their keys and
        values ``(R, H, Np, D)`` (the K/V rows of the block's own QKV projection of ``norm1(p)``),
        and, when the block pools its prompt outputs, their queries and ``norm1(p)``. They depend
        on the rows and the frozen block alone: a served task's are computed once."""
        attn = self.attn
        heads, head_dim = attn.num_heads, attn.head_dim
        queries = self.appends_prompt_outputs
        h_p = self.norm1(p)
        skip = 0 if queries else heads * head_dim
        weight = attn.qkv.weight[skip:]
        bias = attn.qkv.bias[skip:] if attn.qkv.bias is not None else None
        qkv_p = F.linear(h_p, weight, bias).reshape(*p.shape[:2], 3 if queries else 2, heads, head_dim)
        qkv_p = qkv_p.permute(2, 0, 3, 1, 4)
        k_p, v_p = attn.k_norm(qkv_p[-2]), qkv_p[-1]
        if not queries:
            return PromptProjections(k_p, v_p)
        return PromptProjections(k_p, v_p, attn.q_norm(qkv_p[0]), h_p)

    def _attention(self, h: torch.Tensor, prompt: "PromptProjections", prompt_index: Optional[torch.Tensor]):
        """timm ``Attention.forward`` on ``h`` with the prompt keys/values (each image's row
        ``prompt_index[b]`` when given) as a prefix; when the block pools its prompt outputs,
        also the attention output of the prompt rows themselves, ``(B, Np, d)``, as a pair."""
        attn = self.attn
        B, T, _ = h.shape
        heads, head_dim = attn.num_heads, attn.head_dim
        qkv = attn.qkv(h).reshape(B, T, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        k_p, v_p = prompt.keys, prompt.values
        if prompt_index is not None:
            k_p, v_p = k_p[prompt_index], v_p[prompt_index]
        o = ops.prefix_attention(q, k, v, k_p, v_p, attn.scale, backend=self.backend)
        out = self._attention_output(o, h)
        if prompt.queries is None:
            return out
        # The Np prompt queries over the same keys, [k_p ; k]: few rows, so one composite
        # attention serves every backend (autograd gives its backward).
        q_p, h_p = prompt.queries, prompt.normed
        if prompt_index is not None:
            q_p, h_p = q_p[prompt_index], h_p[prompt_index]
        k_p, v_p, q_p = (t.expand(B, -1, -1, -1) for t in (k_p, v_p, q_p))
        o_p = F.scaled_dot_product_attention(q_p, torch.cat((k_p, k), 2), torch.cat((v_p, v), 2), scale=attn.scale)
        return out, self._attention_output(o_p, h_p.expand(B, -1, -1))

    def _attention_output(self, o: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """timm ``Attention.forward`` after the softmax: heads merged, its optional norm and gate
        (on ``h``, the rows' input), the output projection. ``o``: ``(B, H, rows, D)``."""
        attn = self.attn
        B, heads, rows, head_dim = o.shape
        o = o.transpose(1, 2).reshape(B, rows, heads * head_dim)
        norm = getattr(attn, "norm", None)  # timm's optional scale_norm
        if norm is not None:
            o = norm(o)
        gate = getattr(attn, "gate", None)  # timm's optional gated attention
        if gate is not None:
            o = o * gate(h).sigmoid()
        return attn.proj_drop(attn.proj(o))


# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------


class VAPTModel:
    """What a VAPT model adds to its timm class (mixed in first by :func:`apply_vapt`).

    A class, not an instance attribute: ``model.train = ...`` on the instance would make a
    reference cycle (the model holding a function holding the model), which only the cyclic garbage
    collector frees.
    """

    def train(self, mode: bool = True):
        """Prompts and head follow ``mode``; the frozen backbone stays in eval mode."""
        nn.Module.train(self, mode)
        if mode:
            trainable = {id(m) for top in [self.vapt, *_classifier_modules(self)] for m in top.modules()}
            for m in self.modules():
                if id(m) not in trainable and m is not self:
                    m.training = False
        return self

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        """timm's pooling, over the tokens ``config.pooled_tokens`` names: where the last block
        appended its prompt outputs, the average (or max) runs over them and the patch tokens,
        or over them alone (``"prompts"``)."""
        if self.blocks[-1].appends_prompt_outputs and self.vapt.config.pooled_tokens == "prompts":
            x = torch.cat((x[:, : self.num_prefix_tokens], x[:, -self.vapt.config.num_prompts :]), dim=1)
        return super().pool(x, pool_type)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """timm's, then whether the last block appends its prompt outputs follows the new pooling."""
        super().reset_classifier(num_classes, global_pool)
        self.blocks[-1].appends_prompt_outputs = pools_prompt_outputs(self, self.vapt.config)

    def forward_intermediates(self, x: torch.Tensor, *args, **kwargs):
        """timm's, with every intermediate of the token sequence's shape: the last block's prompt
        outputs are kept aside and appended to the final features only (which the pool reads)."""
        if not self.blocks[-1].appends_prompt_outputs:
            return super().forward_intermediates(x, *args, **kwargs)
        _CALL.prompt_outputs = []
        try:
            out = super().forward_intermediates(x, *args, **kwargs)
            rows = _CALL.prompt_outputs
        finally:
            del _CALL.prompt_outputs
        if not rows:  # stop_early before the last block, or intermediates only
            return out
        if isinstance(out, dict):
            if "image_features" in out:
                out["image_features"] = torch.cat((out["image_features"], self.norm(rows[-1])), dim=1)
            return out
        if isinstance(out, tuple):
            final, intermediates = out
            return torch.cat((final, self.norm(rows[-1])), dim=1), intermediates
        return out

    def __reduce_ex__(self, protocol):
        # Pickle (and deepcopy) as the timm class, rebuilt into its VAPT class on load: the VAPT
        # class is made at run time and cannot be found by name.
        return _unpickle_vapt_model, (type(self)._vapt_base,), self.__getstate__()


_VAPT_CLASSES: dict[type, type] = {}


def _vapt_class(base: type) -> type:
    """The VAPT class of a timm model class (one per class, made on first use)."""
    cls = _VAPT_CLASSES.get(base)
    if cls is None:
        cls = type(f"VAPT{base.__name__}", (VAPTModel, base), {"_vapt_base": base, "__module__": __name__})
        _VAPT_CLASSES[base] = cls
    return cls


def _unpickle_vapt_model(base: type) -> nn.Module:
    cls = _vapt_class(base)
    return cls.__new__(cls)


def apply_vapt(
    model: VisionTransformer,
    config: Union[VAPTConfig, Mapping[str, object], None] = None,
    *,
    backend: str = "auto",
    **overrides,
) -> VisionTransformer:
    """Give a timm ViT VAPT prompts, in place, and freeze its backbone.

    Every block is replaced by a :class:`VAPTBlock` (same submodules, same state-dict keys); all
    prompt parameters live at ``model.vapt``. Only the prompts and the classifier head stay
    trainable, and ``model.train()`` keeps the backbone in eval mode, as the official code does.
    The model's class becomes ``VAPT<its class>``, a subclass of its own.

    Args:
        model: a timm ``VisionTransformer`` built from the standard ``Block``/``Attention``.
        config: the VAPT options: a ``VAPTConfig``, a mapping of its fields, or None for the
            official defaults.
        backend: ``"auto"``, ``"reference"``, ``"torch"``, ``"triton"`` or ``"native"`` (see
            :mod:`vapt_kernels.ops`).
        **overrides: ``VAPTConfig`` fields that replace those of ``config``.

    Returns:
        The same model object.

    Raises:
        TypeError / ValueError: unsupported model, bad option, or a config that does not fit the
            model (checked before the model is touched).
    """
    config = as_config(config, "apply_vapt").replace(**overrides)
    check_fits(model, config, "apply_vapt")
    backend = resolve_backend(backend)
    depth = len(model.blocks)
    grid = tuple(model.patch_embed.grid_size)
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
    fixed_grid = _fixed_grid(model.patch_embed)
    if fixed_grid is None:
        model.patch_embed.register_forward_pre_hook(_record_grid)
    for i, block in enumerate(list(model.blocks)):
        model.blocks[i] = VAPTBlock(block, i, vapt, model.num_prefix_tokens, fixed_grid, backend)
    model.blocks[-1].appends_prompt_outputs = pools_prompt_outputs(model, config)
    model.__class__ = _vapt_class(type(model))
    model.train(model.training)
    return model


def apply_vpt(
    model: VisionTransformer,
    num_prompts: int = 10,
    *,
    prompt_dropout: float = 0.0,
    pooled_tokens: str = "prompts+patches",
    backend: str = "auto",
) -> VisionTransformer:
    """VPT-deep: static learnable prompts in every block (``vpt_depth`` = depth, no projector).
    ``pooled_tokens`` as in :class:`VAPTConfig` (for models that pool by average)."""
    _check_supported(model, "apply_vpt")
    config = VAPTConfig(
        num_prompts=num_prompts,
        vpt_depth=len(model.blocks),
        feature_projector=False,
        prompt_dropout=prompt_dropout,
        pooled_tokens=pooled_tokens,
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
