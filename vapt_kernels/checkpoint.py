"""Official-checkpoint import, trainable state dict save/load, parameter counts.

Every loader here is all or nothing: it validates every value before it copies any
(:func:`vapt_kernels.state_dicts.validate_then_copy`).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from .state_dicts import string_keys, validate_then_copy
from .timm import prompts_of

# The official supervised model's prompts are under enc.transformer., its MAE and MoCo v3 models'
# under enc. (module. where the file was saved from DDP).
_OFFICIAL_PREFIXES = ("module.", "enc.transformer.", "enc.")
_OFFICIAL_HEAD = {"head.last_layer.weight": "head.weight", "head.last_layer.bias": "head.bias"}


def official_key_map(model: nn.Module) -> dict[str, str]:
    """Official prompt key (without the ``enc.transformer.`` prefix) -> model parameter name."""
    vapt = prompts_of(model, "official_key_map")
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
    what :func:`vapt_kernels.official.forward` takes. The tensors are the parameters themselves."""
    params = dict(model.named_parameters())
    return {theirs: params[ours] for theirs, ours in official_key_map(model).items()}


def _strip(key: str) -> str:
    for prefix in _OFFICIAL_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def _self_supervised_layout(keys: list[str]) -> bool:
    """The official MAE / MoCo v3 models' layout: prompt keys under ``enc.`` without
    ``transformer.``, and ``deep_prompt_embeddings`` with a row for every block after the first."""
    return any(
        k.removeprefix("module.").startswith("enc.") and not k.removeprefix("module.").startswith("enc.transformer.")
        and _is_prompt_key(_strip(k))
        for k in keys
    )  # fmt: skip


def _is_prompt_key(key: str) -> bool:
    return key.startswith(("prompt_embeddings", "deep_prompt", "prompt_proj"))


def load_official_checkpoint(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Load the prompts (and the head, where it fits) of an official VAPT checkpoint; all or nothing.

    Accepts the official key names with or without the ``module.`` and ``enc.transformer.``
    prefixes (the supervised model's layout), or under ``enc.`` (the official MAE and MoCo v3
    models' layout, recognised from the keys: their ``deep_prompt_embeddings`` holds a row for
    each of the ``L - 1`` blocks after the first, of which the first ``vpt_depth - 1`` are used:
    those are loaded, the others only checked for their shape); backbone keys are ignored.
    Every prompt parameter of the model must be present once,
    with the official shape, as a dense tensor of a real floating dtype with finite values; no
    official prompt key may be left without a place. The values are converted to the parameters'
    dtype and device. The head (``head.last_layer.weight`` and ``.bias``) is loaded as a unit: both
    keys present with the shapes of the model's ``head.weight`` and ``head.bias``, or neither is
    loaded and a ``UserWarning`` says why (a different number of classes, a missing key, a model
    without a head); its values must be valid either way.

    Args:
        model: a model prepared by :func:`vapt_kernels.apply_vapt`.
        state_dict: the official checkpoint's state dict (official ``model`` entry).

    Returns:
        Each official key that was loaded (as spelled in ``state_dict``) -> the model parameter
        that now holds it.

    Raises:
        TypeError: if ``state_dict`` is not a mapping.
        ValueError: listing every missing, unexpected, repeated (the same official key spelled
            with and without a prefix), mis-shaped or invalid (not a tensor, sparse, meta, complex,
            integer, bool, NaN/Inf) entry; nothing is changed then.
    """
    caller = "load_official_checkpoint"
    expected = official_key_map(model)
    params = dict(model.named_parameters())
    problems: list[str] = []
    spellings: dict[str, list[str]] = {}
    keys = string_keys(caller, state_dict, problems)
    for key in keys:
        spellings.setdefault(_strip(key), []).append(key)
    if _self_supervised_layout(keys) and len(spellings.get("deep_prompt_embeddings", ())) == 1:
        state_dict, spellings = _used_deep_prompt_rows(model, state_dict, spellings, problems)
    if any(k.startswith("prompt_proj") for k in spellings):
        problems.append(
            "prompt_proj.*: the checkpoint has a prompt projection (official PROJECT > -1), which this package does "
            "not implement"
        )
    prompt_keys = {k for k in spellings if _is_prompt_key(k) and not k.startswith("prompt_proj")}
    missing = sorted(set(expected) - prompt_keys)
    unexpected = sorted(spellings[k][0] for k in prompt_keys - set(expected))
    repeated = {
        k: sorted(v) for k, v in spellings.items() if len(v) > 1 and (k in prompt_keys or k in _OFFICIAL_HEAD)
    }
    if missing:
        problems.append(f"missing prompt keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"prompt keys with no place in this model: {', '.join(unexpected)}")
    check_only: dict[str, nn.Parameter | None] = {}
    for k, keys in sorted(repeated.items()):
        problems.append(f"{k} is given {len(keys)} times, as {', '.join(map(repr, keys))}; keep one of them")
        check_only.update({key: params[expected[k]] if k in expected else None for key in keys})
    loads = {spellings[k][0]: expected[k] for k in sorted(expected) if k in spellings and k not in repeated}

    head = {t: spellings[t][0] for t in _OFFICIAL_HEAD if t in spellings and t not in repeated}
    reasons = []
    if head:
        reasons = [f"{theirs} is missing" for theirs in _OFFICIAL_HEAD if theirs not in spellings]
        absent = [ours for ours in _OFFICIAL_HEAD.values() if ours not in params]
        if absent:
            reasons.append(f"the model has no {' or '.join(absent)} (built with num_classes=0?)")
        for theirs, key in head.items():
            value, ours = state_dict[key], _OFFICIAL_HEAD[theirs]
            if isinstance(value, torch.Tensor) and ours in params and value.shape != params[ours].shape:
                reasons.append(
                    f"{key} has shape {tuple(value.shape)} but the model's {ours} has {tuple(params[ours].shape)} "
                    "(a different number of classes?)"
                )
    if head and not reasons and not any(k in repeated for k in _OFFICIAL_HEAD):
        loads.update({key: _OFFICIAL_HEAD[theirs] for theirs, key in head.items()})
    else:
        check_only.update({key: None for key in head.values()})
    warning = None
    if reasons:
        warning = (
            f"{'; '.join(reasons)}. The head is loaded as a unit (weight and bias together), so the head was not "
            "loaded and the model keeps its own; the prompts were loaded. To load the head too, give both keys with "
            "the shapes of a model with the checkpoint's number of classes."
        )
    hint = (
        "Where keys are missing or have no place, or shapes differ, the checkpoint was trained with another VAPT "
        f"config than the model's ({model.vapt.config}): check num_prompts, vpt_depth, conv, shared_kernel, "
        "share_projector, learnable_scale and the image size the checkpoint was trained at. An official MAE or "
        "MoCo v3 checkpoint (one deep prompt row per block) is recognised by its keys' 'enc.' prefix: keep it."
    )
    targets = {key: params[ours] for key, ours in loads.items()}
    validate_then_copy(caller, state_dict, targets, problems, hint, "checkpoint", check_only, warning)
    return loads


def _used_deep_prompt_rows(model: nn.Module, state_dict, spellings: dict, problems: list[str]):
    """The MAE / MoCo v3 layout's ``deep_prompt_embeddings`` ``(L - 1, Np, d)`` cut to the rows
    the configuration uses, ``(vpt_depth - 1, Np, d)``, or left out where it uses none; a value of
    another shape is a problem (and is then left for the shape check to name too)."""
    key = spellings["deep_prompt_embeddings"][0]
    value, cfg = state_dict[key], model.vapt.config
    rows = (len(model.blocks) - 1, cfg.num_prompts, model.embed_dim)
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != rows:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        problems.append(
            f"{key}: the official MAE and MoCo v3 models hold one row per block after the first, (L-1, Np, d) = "
            f"{rows}, got {shape}"
        )
        return state_dict, spellings
    state_dict = dict(state_dict)
    if cfg.vpt_depth > 1:
        state_dict[key] = value[: cfg.vpt_depth - 1]
    else:
        spellings = {k: v for k, v in spellings.items() if k != "deep_prompt_embeddings"}
    return state_dict, spellings


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every trainable parameter (prompts and head), keyed by parameter name."""
    prompts_of(model, "trainable_state_dict")
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load what :func:`trainable_state_dict` saved; all or nothing.

    Names must match the model's trainable parameters exactly (no prefixes) and shapes must be
    equal; every value must be a dense tensor of a real floating dtype with finite values. The
    values are converted to the parameters' dtype and device.

    Args:
        model: a model prepared by :func:`vapt_kernels.apply_vapt`, with the config and backbone
            the state dict was saved from.
        state_dict: parameter name -> tensor, as :func:`trainable_state_dict` returns.

    Raises:
        TypeError: if ``state_dict`` is not a mapping.
        ValueError: listing every missing, unexpected, mis-shaped or invalid (not a tensor, sparse,
            meta, complex, integer, bool, NaN/Inf) entry; nothing is changed then.
    """
    caller = "load_trainable_state_dict"
    prompts_of(model, caller)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    problems: list[str] = []
    keys = string_keys(caller, state_dict, problems)
    missing = sorted(set(params) - set(keys))
    unexpected = sorted(set(keys) - set(params))
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    if missing:
        problems.append(f"missing: {', '.join(missing)}")
    if set(unexpected) - frozen:
        problems.append(f"unexpected: {', '.join(k for k in unexpected if k not in frozen)}")
    if set(unexpected) & frozen:
        problems.append(
            "frozen parameters, which this loader does not load (pass what trainable_state_dict saves): "
            f"{', '.join(k for k in unexpected if k in frozen)}"
        )
    hint = (
        "Where names are missing or unexpected, or shapes differ, the state dict was saved from a model with another "
        f"VAPT config or backbone than this one ({model.vapt.config}); apply_vapt with the config it was saved "
        "from. Names are the model's parameter names exactly, without prefixes such as 'module.'."
    )
    given = set(keys)
    targets = {name: p for name, p in params.items() if name in given}
    validate_then_copy(caller, state_dict, targets, problems, hint, "saved")


def count_parameters(model: nn.Module) -> dict[str, float]:
    """Trainable prompt and head parameters, their total, the frozen backbone, and the percentage."""
    prompts_of(model, "count_parameters")
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
