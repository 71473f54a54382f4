"""The pretrained backbones of the paper, from the files their projects publish:
:func:`load_backbone` recognises a file by its contents, builds the timm ViT the paper fine-tunes
on it, and reports what it loaded and what it left out.

========================  =====================================  =================================
format                    file (as the official instructions     the model built
                          name it) and what is in it
========================  =====================================  =================================
``google-npz``            ``imagenet21k_ViT-B_16.npz``: Google's  class token, final norm (the
                          JAX arrays (``Transformer/encoder       supervised ViT-B/16)
                          block_0/...``), with the 21k-class
                          head and the pre-logits layer
``mae``                   ``mae_pretrain_vit_base.pth``: a        average pooling, then a fresh
                          ``model`` entry, the encoder under      ``fc_norm`` (MAE's fine-tuning
                          timm's names (the final norm too)       model; the encoder's final norm
                                                                  is not used)
``moco-v3``               ``linear-vit-b-300ep.pth.tar``: a       class token, final norm
                          ``state_dict`` entry, ``module.``
                          before every key, the linear-probe
                          head
``timm``                  any other timm state dict (plain, or    the model as named, its own
                          under ``model`` / ``state_dict``),      pooling
                          e.g. ``vapt-train --method full``'s
                          ``model.pth``
========================  =====================================  =================================

The head of a pretraining task (the 21k-class head, the pre-logits layer, MoCo's linear probe) is
never loaded: the paper fine-tunes a new one. Pickled files are read with ``weights_only=True``,
``.npz`` files without pickle, safetensors as they are: no code from a file runs.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn as nn

FORMATS = ("google-npz", "mae", "moco-v3", "timm")
# What the paper's model for each format is, as timm keyword arguments.
_MODEL_KWARGS = {
    "google-npz": {"global_pool": "token", "class_token": True},
    "mae": {"global_pool": "avg", "fc_norm": True, "class_token": True},
    "moco-v3": {"global_pool": "token", "class_token": True},
    "timm": {},
}
_PRETRAINING_HEAD = "the head of the pretraining task; the paper fine-tunes a new one"


@dataclasses.dataclass(frozen=True)
class BackboneReport:
    """What :func:`load_backbone` did with a file.

    Attributes:
        path: the file.
        format: what it was recognised as (one of :data:`FORMATS`).
        model_kwargs: the timm keyword arguments the format chose (pooling, final norm).
        loaded: the file's keys whose tensors are in the model (as spelled in the file).
        ignored: the file's other keys -> why they were left out.
    """

    path: Path
    format: str
    model_kwargs: dict[str, Any]
    loaded: tuple[str, ...]
    ignored: dict[str, str]

    def __str__(self) -> str:
        lines = [f"{self.path}: {self.format} weights, {len(self.loaded)} tensors loaded"]
        reasons: dict[str, list[str]] = {}
        for key, why in self.ignored.items():
            reasons.setdefault(why, []).append(key)
        for why, keys in reasons.items():
            shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
            lines.append(f"  left out {shown}: {why}")
        return "\n".join(lines)


def load_backbone(
    path: Union[str, "os.PathLike[str]"], model: str = "vit_base_patch16_224", *, num_classes: int = 0, **model_kwargs
) -> tuple[nn.Module, BackboneReport]:
    """Build the timm model ``model`` as the paper fine-tunes it on the weights in ``path``.

    Args:
        path: a weights file in one of :data:`FORMATS`, recognised by its contents (not its name).
        model: the timm model name the file's tensors must fit (ViT-B/16 for the paper's files).
        num_classes: the new head's classes (0: no head).
        **model_kwargs: more timm keyword arguments (``img_size``, ...); those the format chooses
            (its pooling, ``fc_norm``) may be given only with the format's values.

    Returns:
        The model (float32, on the CPU, eval mode) and a :class:`BackboneReport`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a file that cannot be read (truncated, pickled objects other than tensors,
            another format), whose tensors do not fit ``model`` (naming the keys: missing,
            mis-shaped), or ``model_kwargs`` that contradict the format's model. Nothing is built
            then.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_backbone: {path}: no such file")
    kind, content = _read(path)
    fmt, state = _recognise(path, kind, content)
    chosen = _MODEL_KWARGS[fmt]
    clash = {k: v for k, v in model_kwargs.items() if k in chosen and chosen[k] != v}
    if clash:
        given = ", ".join(f"{k}={v!r}" for k, v in clash.items())
        wanted = ", ".join(f"{k}={chosen[k]!r}" for k in clash)
        raise ValueError(f"load_backbone: {path} holds {fmt} weights, whose model has {wanted}; drop {given}")
    import timm

    kwargs = {**model_kwargs, **chosen, "num_classes": num_classes}
    built = timm.create_model(model, pretrained=False, **kwargs).float().eval()
    if fmt == "google-npz":
        loaded, ignored = _load_npz(path, content, built)
    else:
        loaded, ignored = _load_state_dict(path, fmt, state, built)
    return built, BackboneReport(path, fmt, chosen, tuple(loaded), ignored)


# ------------------------------------------------------------------------------------------------
# reading and recognising
# ------------------------------------------------------------------------------------------------


def _file_kind(path: Path) -> str:
    """How a weights file is stored: ``"npz"`` (a zip of ``.npy`` arrays), ``"safetensors"`` (a
    length, then a JSON header) or ``"torch"`` (anything else: ``torch.save``'s zip or pickle)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        return "npz" if names and all(name.endswith(".npy") for name in names) else "torch"
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path):
        return "safetensors"
    return "torch"


def load_weights_only(path: Path) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, so a file that
    holds other objects is refused before any of its code could run.

    Raises:
        ValueError: saying why the file was not read (without its path: the caller names it).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        # torch's message: a preamble, the offending object's line, a pointer to its documentation
        reason = lines[-2] if len(lines) >= 3 else " ".join(lines)
        raise ValueError(
            f"it holds objects other than tensors and plain containers ({reason}); it is not read, since unpickling "
            "them could run code from the file"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as error:
        raise ValueError(
            f"it cannot be read ({type(error).__name__}: {error}); truncated or another format?"
        ) from None


def _read(path: Path) -> tuple[str, Any]:
    """``("npz", {name: array})``, ``("safetensors", {name: tensor})`` or ``("torch", object)``."""
    import numpy as np

    def bad(why: str) -> ValueError:
        return ValueError(f"load_backbone: {path}: {why}")

    kind = _file_kind(path)
    if kind == "npz":
        try:
            with np.load(path, allow_pickle=False) as arrays:
                return "npz", {name: arrays[name] for name in arrays.files}
        except (ValueError, OSError, zipfile.BadZipFile) as error:
            raise bad(f"an .npz archive that cannot be read ({error})") from None
    if kind == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return "safetensors", load_file(path)
        except (SafetensorError, OSError, ValueError) as error:
            raise bad(f"a damaged safetensors file ({error})") from None
    try:
        return "torch", load_weights_only(path)
    except ValueError as error:
        raise bad(str(error)) from None


def _recognise(path: Path, kind: str, content: Any) -> tuple[str, dict]:
    """The format of what :func:`_read` read from ``path``, and its state dict (for the npz: its
    arrays)."""
    if kind == "npz":
        if "embedding/kernel" in content and "Transformer/encoderblock_0/LayerNorm_0/scale" in content:
            return "google-npz", content
        raise ValueError(
            f"load_backbone: {path}: an .npz without Google's ViT arrays (embedding/kernel, "
            "Transformer/encoderblock_0/...)"
        )
    if isinstance(content, Mapping) and {"model", "args", "epoch", "rng"} <= set(content):
        raise ValueError(
            f"load_backbone: {path}: a vapt-train checkpoint, which holds the trainable parameters only (prompts and "
            "head), not backbone weights; continue its run with vapt-train --resume, evaluate it with --eval-only "
            "--checkpoint, or pass backbone weights (a timm state dict, an .npz, or the model.pth of a --method full "
            "run)"
        )
    entry = None
    if isinstance(content, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(content.get(key), Mapping):
                entry = key
                break
    state = content[entry] if entry else content
    if not isinstance(state, Mapping) or not state or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(
            f"load_backbone: {path}: not a state dict (a mapping of names to tensors, plain or under 'model' or "
            "'state_dict')"
        )
    keys = list(state)
    if entry == "state_dict" and all(k.startswith("module.") for k in keys) and "module.blocks.0.norm1.weight" in state:
        return "moco-v3", state
    if entry == "model" and "blocks.0.norm1.weight" in state and "norm.weight" in state and not any(
        k.startswith("head.") for k in keys
    ):
        return "mae", state
    return "timm", state


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------


def _backbone_keys(model: nn.Module, fresh: tuple[str, ...]) -> dict[str, torch.Size]:
    """The model's state-dict entries a backbone file must provide: all but the classifier and
    the modules the format starts fresh."""
    head = {id(p) for p in model.get_classifier().parameters()}
    skip = {name for name, p in model.named_parameters() if id(p) in head}
    return {
        k: v.shape for k, v in model.state_dict().items() if k not in skip and not k.startswith(fresh)
    }


def _load_state_dict(path: Path, fmt: str, state: Mapping[str, torch.Tensor], model: nn.Module):
    from timm.models.vision_transformer import checkpoint_filter_fn

    spelled = {k.removeprefix("module.") if fmt == "moco-v3" else k: k for k in state}
    renamed = {ours: state[theirs] for ours, theirs in spelled.items()}
    fresh = ("fc_norm.",) if fmt == "mae" else ()
    expected = _backbone_keys(model, fresh)
    ignored: dict[str, str] = {}
    for ours, theirs in spelled.items():
        if ours in expected:
            continue
        if fmt != "timm" and ours.startswith(("head.", "pre_logits.")):
            ignored[theirs] = _PRETRAINING_HEAD
        elif fmt == "mae" and ours.startswith("norm."):
            ignored[theirs] = "MAE's fine-tuning pools by average, then normalises with a fresh fc_norm"
        elif ours.startswith(("head.", "head_dist.")) and fmt == "timm":
            continue  # a timm file's own head: loaded below where it fits the model's
        else:
            ignored[theirs] = "not part of the ViT encoder (a decoder, a mask token, a projector, ...)"
    # timm's own conversions of the family's files (position embeddings resampled to the grid).
    converted = checkpoint_filter_fn({k: v for k, v in renamed.items() if k in expected or k.startswith("head")}, model)
    problems = [f"missing: {k}" for k in expected if k not in converted]
    problems += [
        f"{k}: file {tuple(converted[k].shape)} vs model {tuple(shape)}"
        for k, shape in expected.items()
        if k in converted and converted[k].shape != shape
    ]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ValueError(
            f"load_backbone: {path} ({fmt} weights) does not fit {_name(model)}: {shown}. Pass the model the file "
            "was saved from (model=..., img_size=...)"
        )
    load = {k: converted[k] for k in expected}
    if fmt == "timm":  # a head of the model's shape is this model's own (a fine-tuned one): kept
        own = {k: v for k, v in converted.items() if k.startswith(("head.", "head_dist."))}
        fits = own and all(k in model.state_dict() and model.state_dict()[k].shape == v.shape for k, v in own.items())
        for k in own:
            if fits:
                load[k] = own[k]
            else:
                ignored[spelled.get(k, k)] = "a head of another class count than the model's"
    model.load_state_dict(load, strict=False)
    loaded = [theirs for ours, theirs in spelled.items() if ours in load]
    return loaded, ignored


def _npz_layout(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The arrays Google's ViT .npz must hold for ``model`` and their shapes (timm's reader,
    ``VisionTransformer.load_pretrained``, maps them)."""
    d, depth = model.embed_dim, len(model.blocks)
    heads = model.blocks[0].attn.num_heads
    hidden = model.blocks[0].mlp.fc1.out_features
    p = model.patch_embed.patch_size
    layout = {
        "embedding/kernel": (*p, model.patch_embed.proj.in_channels, d),
        "embedding/bias": (d,),
        "Transformer/encoder_norm/scale": (d,),
        "Transformer/encoder_norm/bias": (d,),
    }
    if model.cls_token is not None:
        layout["cls"] = (1, 1, d)
    for i in range(depth):
        b = f"Transformer/encoderblock_{i}/"
        for norm in ("LayerNorm_0", "LayerNorm_2"):
            layout[f"{b}{norm}/scale"] = layout[f"{b}{norm}/bias"] = (d,)
        for name in ("query", "key", "value"):
            layout[f"{b}MultiHeadDotProductAttention_1/{name}/kernel"] = (d, heads, d // heads)
            layout[f"{b}MultiHeadDotProductAttention_1/{name}/bias"] = (heads, d // heads)
        layout[f"{b}MultiHeadDotProductAttention_1/out/kernel"] = (heads, d // heads, d)
        layout[f"{b}MultiHeadDotProductAttention_1/out/bias"] = (d,)
        layout[f"{b}MlpBlock_3/Dense_0/kernel"] = (d, hidden)
        layout[f"{b}MlpBlock_3/Dense_0/bias"] = (hidden,)
        layout[f"{b}MlpBlock_3/Dense_1/kernel"] = (hidden, d)
        layout[f"{b}MlpBlock_3/Dense_1/bias"] = (d,)
    return layout


def _load_npz(path: Path, arrays: Mapping[str, Any], model: nn.Module):
    layout = _npz_layout(model)
    pos = "Transformer/posembed_input/pos_embedding"
    problems = [f"missing: {k}" for k in [*layout, pos] if k not in arrays]
    problems += [
        f"{k}: file {tuple(arrays[k].shape)} vs model {shape}"
        for k, shape in layout.items()
        if k in arrays and tuple(arrays[k].shape) != shape
    ]
    extra_blocks = f"Transformer/encoderblock_{len(model.blocks)}/LayerNorm_0/scale"
    if extra_blocks in arrays:
        problems.append(f"the file has more than the model's {len(model.blocks)} blocks ({extra_blocks})")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ValueError(
            f"load_backbone: {path} (google-npz weights) does not fit {_name(model)}: {shown}. Pass the model the "
            "file was saved from (model=..., img_size=...)"
        )
    model.load_pretrained(str(path))  # timm's reader (it resamples the position embedding to the grid)
    if "head/bias" in arrays and arrays["head/bias"].shape[-1] == model.num_classes:
        model.reset_classifier(model.num_classes)  # timm's reader took a head of that class count: not wanted here
    ignored = {}
    for key in arrays:
        if key.startswith(("head/", "pre_logits/")):
            ignored[key] = _PRETRAINING_HEAD
        elif key not in layout and key != pos:
            ignored[key] = "not read by timm's reader of Google's ViT arrays"
    return [k for k in arrays if k not in ignored], ignored


def _name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__
