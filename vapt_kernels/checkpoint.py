"""Official-checkpoint import, trainable state dict save/load, parameter counts."""

from __future__ import annotations

import warnings
from typing import Mapping

import torch
import torch.nn as nn

from .modules import VAPTPrompts

_OFFICIAL_PREFIXES = ("module.", "enc.transformer.")
_OFFICIAL_HEAD = {"head.last_layer.weight": "head.weight", "head.last_layer.bias": "head.bias"}


def _prompts_of(model: nn.Module, caller: str) -> VAPTPrompts:
    vapt = getattr(model, "vapt", None)
    if not isinstance(vapt, VAPTPrompts):
        raise ValueError(f"{caller}: the model has no VAPT prompts; call vapt_kernels.apply_vapt first")
    return vapt


def official_key_map(model: nn.Module) -> dict[str, str]:
    """Official prompt key (without the ``enc.transformer.`` prefix) -> model parameter name."""
    vapt = _prompts_of(model, "official_key_map")
    cfg = vapt.config
    keys = {"prompt_embeddings": "vapt.prompt"}
    if vapt.deep_prompts is not None:
        keys["deep_prompt_embeddings"] = "vapt.deep_prompts"
    for j, gen in enumerate(vapt.generators):
        ours = f"vapt.generators.{j}"
        keys[f"deep_prompt_norm.{j}.weight"] = f"{ours}.norm.weight"
        keys[f"deep_prompt_norm.{j}.bias"] = f"{ours}.norm.bias"
        theirs = f"deep_prompt_downsample.{j}"
        if gen.kernel is not None:
            keys[f"{theirs}.conv.kernel"] = f"{ours}.kernel"
            theirs += ".linear"
        keys[f"{theirs}.weight"] = f"{ours}.token_proj.weight"
        keys[f"{theirs}.bias"] = f"{ours}.token_proj.bias"
    for j, projector in enumerate(vapt.projectors):
        theirs = "deep_prompt_embeddings_mlp" if cfg.share_projector else f"deep_prompt_embeddings_mlp.{j}"
        keys[f"{theirs}.block.0.weight"] = f"vapt.projectors.{j}.fc1.weight"
        keys[f"{theirs}.block.2.weight"] = f"vapt.projectors.{j}.fc2.weight"
        if projector.scale is not None:
            keys[f"{theirs}.scale"] = f"vapt.projectors.{j}.scale"
    return keys


def official_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's prompt parameters under their official names (no ``enc.transformer.`` prefix):
    what :func:`vapt_kernels.reference.forward` takes. The tensors are the parameters themselves."""
    params = dict(model.named_parameters())
    return {theirs: params[ours] for theirs, ours in official_key_map(model).items()}


def _strip(key: str) -> str:
    for prefix in _OFFICIAL_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def _is_prompt_key(key: str) -> bool:
    return key.startswith(("prompt_embeddings", "deep_prompt", "prompt_proj"))


def load_official_checkpoint(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Load the prompts (and the head, where it fits) of an official VAPT checkpoint.

    Accepts the official key names with or without the ``enc.transformer.`` prefix; backbone keys
    are ignored. Every prompt parameter of the model must be present with the official shape, and
    no official prompt key may be left without a place; otherwise a ``ValueError`` names the keys
    and nothing is changed. The head (``head.last_layer.*``) is loaded when its shapes fit and
    skipped with a warning otherwise.

    Returns:
        Each official key that was loaded (as spelled in ``state_dict``) -> the model parameter
        that now holds it.
    """
    expected = official_key_map(model)
    given = {_strip(k): k for k in state_dict}
    if "prompt_proj.weight" in given:
        raise ValueError(
            "load_official_checkpoint: the checkpoint has prompt_proj.* (official PROJECT > -1), a prompt "
            "projection this package does not implement"
        )
    prompt_keys = {k for k in given if _is_prompt_key(k)}
    missing = sorted(set(expected) - prompt_keys)
    unexpected = sorted(prompt_keys - set(expected))
    params = dict(model.named_parameters())
    wrong = [
        f"{k}: checkpoint {tuple(state_dict[given[k]].shape)} vs model {tuple(params[expected[k]].shape)}"
        for k in sorted(set(expected) & prompt_keys)
        if tuple(state_dict[given[k]].shape) != tuple(params[expected[k]].shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing prompt keys: {', '.join(missing)}")
        if unexpected:
            parts.append(f"prompt keys with no place in this model: {', '.join(unexpected)}")
        if wrong:
            parts.append(f"shape mismatches: {'; '.join(wrong)}")
        raise ValueError(
            "load_official_checkpoint: the checkpoint does not match the model's VAPT config "
            f"({model.vapt.config}): " + " | ".join(parts)
            + ". Check num_prompts, vpt_depth, conv, shared_kernel, share_projector, learnable_scale and the "
            "image size the checkpoint was trained at."
        )
    loads = {given[k]: expected[k] for k in sorted(expected)}
    for theirs, ours in _OFFICIAL_HEAD.items():
        if theirs not in given or ours not in params:
            continue
        src, dst = state_dict[given[theirs]], params[ours]
        if tuple(src.shape) == tuple(dst.shape):
            loads[given[theirs]] = ours
        else:
            warnings.warn(
                f"load_official_checkpoint: {theirs} has shape {tuple(src.shape)} but the model's {ours} has "
                f"{tuple(dst.shape)} (a different number of classes?); the head was not loaded",
                stacklevel=2,
            )
    with torch.no_grad():
        for theirs, ours in loads.items():
            params[ours].copy_(state_dict[theirs])
    return loads


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every trainable parameter (prompts and head), keyed by parameter name."""
    _prompts_of(model, "trainable_state_dict")
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load what :func:`trainable_state_dict` saved; names and shapes must match exactly.

    Raises:
        ValueError: naming missing, unexpected or mis-shaped entries; nothing is changed then.
    """
    _prompts_of(model, "load_trainable_state_dict")
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(params))
    wrong = [
        f"{k}: saved {tuple(state_dict[k].shape)} vs model {tuple(params[k].shape)}"
        for k in sorted(set(params) & set(state_dict))
        if tuple(state_dict[k].shape) != tuple(params[k].shape)
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            "load_trainable_state_dict: the state dict does not fit the model's trainable parameters: "
            f"missing {missing or 'none'}; unexpected {unexpected or 'none'}; shape mismatches {wrong or 'none'}"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state_dict[name])


def count_parameters(model: nn.Module) -> dict[str, float]:
    """Trainable prompt and head parameters, their total, the frozen backbone, and the percentage."""
    _prompts_of(model, "count_parameters")
    prompt = sum(p.numel() for p in model.vapt.parameters() if p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    backbone = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return {
        "prompt": prompt,
        "head": trainable - prompt,
        "total": trainable,
        "backbone": backbone,
        "percent": 100.0 * trainable / max(backbone, 1),
    }
