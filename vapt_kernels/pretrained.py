"""A trained task saved as a folder with no pickle in it: :func:`save_pretrained` writes it,
:func:`from_pretrained` rebuilds the VAPT model on a backbone from it, and
:meth:`vapt_kernels.MultiTaskVAPT.add_task` adds it as a task (through :func:`read_pretrained`).

The folder (peft's convention: the configuration beside the weights)::

    vapt_config.json          {"format": "vapt_kernels.pretrained/1", "vapt": {VAPTConfig fields},
                               "backbone": {architecture, depth, embed_dim, num_heads, patch_size,
                               grid, num_prefix_tokens, global_pool}, "num_classes": C,
                               "dtype": "float32", "vapt_kernels_version": "...", "metadata": {...}}
    vapt_model.safetensors    the trainable parameters (prompts ``vapt.*`` and the head ``head.*``),
                               named as :func:`vapt_kernels.trainable_state_dict` names them

Reading runs no code from the folder: the configuration is strict JSON checked field by field,
the weights are safetensors. Loading is all or nothing, like every loader of the package.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from ._version import __version__
from .config import VAPTConfig
from .files import replace_folder
from .modules import VAPTPrompts
from .ops import resolve_backend
from .state_dicts import string_keys, validate_then_copy
from .timm import apply_vapt, backbone_signature, check_fits, prompts_of

FORMAT = "vapt_kernels.pretrained/1"
CONFIG_FILE = "vapt_config.json"
WEIGHTS_FILE = "vapt_model.safetensors"
# The backbone fields prompts depend on (compared exactly); "architecture" only tells backbones of
# one shape apart (a difference is warned about).
SHAPE_FIELDS = ("depth", "embed_dim", "num_heads", "patch_size", "grid", "num_prefix_tokens", "global_pool")
_MAX_CONFIG_BYTES = 1 << 20
_DTYPES = {str(t).removeprefix("torch."): t for t in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}

PathLike = Union[str, "os.PathLike[str]"]


@dataclasses.dataclass(frozen=True)
class SavedTask:
    """What a saved folder holds, checked: its VAPT configuration, the backbone it was trained
    on (:func:`vapt_kernels.timm.backbone_signature`), the head's class count, the parameter
    values (CPU tensors, by parameter name) and the user's metadata."""

    path: Path
    config: VAPTConfig
    backbone: dict[str, Any]
    num_classes: int
    state: dict[str, torch.Tensor]
    metadata: dict[str, Any]


# ------------------------------------------------------------------------------------------------
# saving
# ------------------------------------------------------------------------------------------------


def save_pretrained(
    model: nn.Module, directory: PathLike, *, metadata: Optional[Mapping[str, Any]] = None, overwrite: bool = False
) -> Path:
    """Save a VAPT model's trainable parameters (prompts and head) and everything needed to
    rebuild it as a folder: ``vapt_config.json`` and ``vapt_model.safetensors``.

    The folder is written in one step (a temporary folder renamed into place): ``directory`` is
    the old folder or the whole new one, never a mix. The frozen backbone is not saved; load the
    folder onto the same backbone with :func:`from_pretrained`, or add it to a
    :class:`~vapt_kernels.MultiTaskVAPT` with ``add_task(name, directory)``.

    Args:
        model: a model prepared by :func:`vapt_kernels.apply_vapt` or :func:`vapt_kernels.apply_vpt`.
        directory: the folder to write; missing parent folders are created.
        metadata: anything else to keep with the task (class names, scores): a mapping of strings
            to JSON values (no NaN or Inf), stored in ``vapt_config.json`` and returned by
            :func:`read_pretrained`.
        overwrite: replace an existing folder saved by this function. Any other existing path
            is never replaced.

    Returns:
        ``directory`` as a ``Path``.

    Raises:
        ValueError: the model has no VAPT prompts or holds NaN/Inf values; ``metadata`` is not
            JSON; ``directory`` exists (without ``overwrite``, or holding something else than a
            saved task). Nothing is written then.
        vapt_kernels.files.OutputError: the folder could not be written (the cause named);
            ``directory`` is as it was.
    """
    caller = "save_pretrained"
    prompts_of(model, caller)
    state = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    return write_pretrained(model, state, directory, metadata=metadata, overwrite=overwrite, caller=caller)


def write_pretrained(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    directory: PathLike,
    *,
    metadata: Optional[Mapping[str, Any]] = None,
    overwrite: bool = False,
    caller: str = "save_pretrained",
) -> Path:
    """:func:`save_pretrained` with the values given: ``state`` (named as the model's trainable
    parameters, e.g. the best epoch's, gathered from a sharded model) in place of the model's own."""
    config = prompts_of(model, caller).config
    directory = Path(directory)
    problems = [f"{name}: holds NaN or Inf values" for name, t in state.items() if not bool(torch.isfinite(t).all())]
    if problems:
        raise ValueError(
            f"{caller}: nothing was written to {directory}, because the parameters are not finite (a diverged "
            "run?):\n" + "\n".join(f"  - {p}" for p in problems)
        )
    try:
        metadata_json = json.loads(json.dumps(dict(metadata or {}), allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{caller}: metadata must map strings to JSON values (str, numbers, bool, None, lists, dicts; no NaN or "
            f"Inf): {error}"
        ) from None
    if not all(isinstance(k, str) for k in dict(metadata or {})):
        raise ValueError(f"{caller}: metadata keys must be strings")
    _check_replaceable(directory, overwrite, caller)
    description = {
        "format": FORMAT,
        "vapt": dataclasses.asdict(config),
        "backbone": backbone_signature(model),
        "num_classes": int(model.num_classes),
        "dtype": str(next(iter(state.values())).dtype).removeprefix("torch.") if state else "float32",
        "vapt_kernels_version": __version__,
        "metadata": metadata_json,
    }
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state.items()}
    text = json.dumps(description, indent=2, allow_nan=False) + "\n"

    def fill(folder: Path) -> None:  # a fresh folder, flushed to disk and renamed into place whole
        from safetensors.torch import save

        (folder / WEIGHTS_FILE).write_bytes(save(tensors, metadata={"format": "pt"}))
        (folder / CONFIG_FILE).write_text(text, encoding="utf-8")

    replace_folder(directory, fill)
    return directory


def _check_replaceable(directory: Path, overwrite: bool, caller: str) -> None:
    if not os.path.lexists(directory):
        return
    if not directory.is_dir() or directory.is_symlink():
        raise ValueError(f"{caller}: {directory} exists and is not a folder; choose another path")
    entries = sorted(p.name for p in directory.iterdir())
    if not entries:
        return
    if not overwrite:
        raise ValueError(f"{caller}: {directory} exists; pass overwrite=True to replace a saved task, or another path")
    others = [name for name in entries if name not in (CONFIG_FILE, WEIGHTS_FILE)]
    if CONFIG_FILE not in entries or others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise ValueError(
            f"{caller}: {directory} is not a folder saved by save_pretrained"
            + (f" (it holds {shown})" if others else f" (no {CONFIG_FILE})")
            + "; it is never replaced: choose another path"
        )


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------


def read_pretrained(directory: PathLike, caller: str = "read_pretrained") -> SavedTask:
    """The checked content of a folder written by :func:`save_pretrained`.

    Raises:
        FileNotFoundError: no such folder, or a file of it missing.
        ValueError: a file that is not what this package writes (naming the file and what is
            wrong with it): JSON that does not parse or has NaN/Inf, another format version, a
            missing or mistyped field, an invalid VAPT configuration, weights that are not a
            safetensors file. Nothing of the folder is used then.
    """
    directory = Path(directory)
    if not directory.is_dir():
        what = "is not a folder" if directory.exists() else "does not exist"
        raise FileNotFoundError(
            f"{caller}: {directory} {what}; pass the folder save_pretrained (or vapt-train, as "
            "<output>/pretrained) wrote"
        )
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{caller}: {path} is missing; {directory} is not a complete saved task")
    config, backbone, num_classes, metadata = _read_description(config_path, caller)
    state = _read_weights(weights_path, caller)
    return SavedTask(directory, config, backbone, num_classes, state, metadata)


def _read_description(path: Path, caller: str) -> tuple[VAPTConfig, dict, int, dict]:
    def bad(why: str) -> ValueError:
        return ValueError(f"{caller}: {path}: {why}")

    if path.stat().st_size > _MAX_CONFIG_BYTES:
        raise bad(f"{path.stat().st_size} bytes, more than a saved task's configuration ever holds")

    def no_constants(name: str):
        raise bad(f"holds {name}, which is not JSON")

    try:
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=no_constants)
    except UnicodeDecodeError as error:
        raise bad(f"not UTF-8 text ({error})") from None
    except json.JSONDecodeError as error:
        raise bad(f"not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise bad(f"expected a JSON object, got {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise bad(
            f"format {data.get('format')!r}, expected {FORMAT!r} (written by another version of vapt_kernels, or "
            "not by save_pretrained)"
        )
    expected = {"format", "vapt", "backbone", "num_classes", "dtype", "vapt_kernels_version", "metadata"}
    if set(data) != expected:
        parts = []
        if expected - set(data):
            parts.append(f"missing {', '.join(sorted(expected - set(data)))}")
        if set(data) - expected:
            parts.append(f"unexpected {', '.join(sorted(set(data) - expected))}")
        raise bad("; ".join(parts))
    if not isinstance(data["vapt"], dict):
        raise bad("'vapt' must be an object of VAPTConfig fields")
    try:
        config = VAPTConfig().replace(**data["vapt"])
    except (TypeError, ValueError) as error:
        raise bad(f"'vapt': {error}") from None
    backbone = data["backbone"]
    fields = {
        "architecture": (str, type(None)), "depth": int, "embed_dim": int, "num_heads": int, "patch_size": list,
        "grid": list, "num_prefix_tokens": int, "global_pool": str,
    }  # fmt: skip
    if not isinstance(backbone, dict) or set(backbone) != set(fields):
        raise bad(f"'backbone' must be an object with the fields {', '.join(fields)}")
    for name, kind in fields.items():
        value = backbone[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise bad(f"'backbone.{name}' is {value!r}")
        if kind is list and not (len(value) == 2 and all(type(v) is int and v > 0 for v in value)):
            raise bad(f"'backbone.{name}' must be two positive integers, got {value!r}")
        if kind is int and value < 0:
            raise bad(f"'backbone.{name}' must not be negative, got {value}")
    classes = data["num_classes"]
    if type(classes) is not int or classes < 0:
        raise bad(f"'num_classes' must be a non-negative integer, got {classes!r}")
    if data["dtype"] not in _DTYPES:
        raise bad(f"'dtype' must be one of {', '.join(_DTYPES)}, got {data['dtype']!r}")
    if not isinstance(data["metadata"], dict):
        raise bad("'metadata' must be an object")
    return config, backbone, classes, data["metadata"]


def _read_weights(path: Path, caller: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ValueError(f"{caller}: {path}: not a safetensors file, or a damaged one ({error})") from None


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------


def backbone_differences(saved: Mapping[str, Any], model: nn.Module) -> list[str]:
    """The backbone fields prompts depend on in which ``model`` differs from the one they were
    saved from, each as ``"field: saved X, model Y"``."""
    here = backbone_signature(model)
    return [f"{f}: saved {saved[f]}, model {here[f]}" for f in SHAPE_FIELDS if saved[f] != here[f]]


def warn_if_other_architecture(saved: SavedTask, model: nn.Module, caller: str) -> None:
    """A backbone of the same shapes but another timm architecture name may compute other
    features: a warning, since the name is only as reliable as the model's pretrained config."""
    theirs, ours = saved.backbone["architecture"], backbone_signature(model)["architecture"]
    if theirs and ours and theirs != ours:
        warnings.warn(
            f"{caller}: {saved.path} was trained on {theirs}, the backbone is {ours}; the prompts fit its shapes, but "
            "they were trained for the other backbone's features",
            stacklevel=3,
        )


def from_pretrained(backbone: nn.Module, directory: PathLike, *, backend: str = "auto") -> nn.Module:
    """Rebuild a saved VAPT model on ``backbone``: its VAPT configuration applied, its prompts and
    head loaded. All or nothing: everything is checked before ``backbone`` is touched.

    Args:
        backbone: a plain timm ``VisionTransformer`` of the shapes the task was trained on
            (depth, width, heads, patch size, image size, prefix tokens, pooling), with the
            frozen weights it was trained with. Its head is replaced by one of the saved class
            count where the counts differ.
        directory: a folder written by :func:`save_pretrained` (or by ``vapt-train``, as
            ``<output>/pretrained``).
        backend: the op backend, as for :func:`vapt_kernels.apply_vapt`.

    Returns:
        ``backbone``, now the VAPT model (changed in place, as :func:`vapt_kernels.apply_vapt` does).

    Raises:
        FileNotFoundError / ValueError: see :func:`read_pretrained`; also a backbone of other
            shapes (naming each field that differs) or weights that do not fit the configuration
            (naming each key). Nothing is changed then.
        TypeError: a model :func:`vapt_kernels.apply_vapt` does not support.

    Warns:
        UserWarning: the backbone's timm architecture name differs from the saved one.
    """
    caller = "from_pretrained"
    saved = read_pretrained(directory, caller)
    check_fits(backbone, saved.config, caller)
    differences = backbone_differences(saved.backbone, backbone)
    if differences:
        raise ValueError(
            f"{caller}: {saved.path} was trained on a backbone of other shapes: {'; '.join(differences)}. Build the "
            "backbone it was trained on (the same timm model and image size)"
        )
    ref = next(backbone.parameters())
    expected = _expected_parameters(backbone, saved, ref)
    problems: list[str] = []
    keys = string_keys(caller, saved.state, problems)
    missing, unexpected = sorted(set(expected) - set(keys)), sorted(set(keys) - set(expected))
    if missing:
        problems.append(f"missing: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected: {', '.join(unexpected)}")
    hint = (
        f"{saved.path / WEIGHTS_FILE} does not hold the parameters {saved.path / CONFIG_FILE} describes "
        f"({saved.config}, {saved.num_classes} classes): the two files do not belong together"
    )
    present = {k: p for k, p in expected.items() if k in saved.state}
    validate_then_copy(caller, saved.state, {}, problems, hint, "saved", check_only=present)
    warn_if_other_architecture(saved, backbone, caller)
    resolve_backend(backend)
    if backbone.num_classes != saved.num_classes:
        backbone.reset_classifier(saved.num_classes)
    model = apply_vapt(backbone, saved.config, backend=backend)
    targets = {name: p for name, p in model.named_parameters() if p.requires_grad}
    validate_then_copy(caller, saved.state, targets, [], hint, "saved")
    return model


def _expected_parameters(backbone: nn.Module, saved: SavedTask, ref: torch.Tensor) -> dict[str, nn.Parameter]:
    """The trainable parameters :func:`from_pretrained` would give ``backbone``, built aside (the
    prompts, and the head with the saved class count) in the backbone's dtype, so that the saved
    values are checked against their shapes and dtype before the backbone is touched."""
    # A shallow copy whose submodule table is its own: resetting its classifier leaves the backbone's.
    probe = copy.copy(backbone)
    probe.__dict__["_modules"] = dict(backbone._modules)
    if probe.num_classes != saved.num_classes:
        probe.reset_classifier(saved.num_classes)
    sig = saved.backbone
    prompts = VAPTPrompts(
        saved.config, sig["embed_dim"], sig["depth"], tuple(sig["grid"]), tuple(sig["patch_size"]), dtype=ref.dtype
    )
    expected = {f"vapt.{name}": p for name, p in prompts.named_parameters()}
    heads = probe.get_classifier()
    heads = list(heads) if isinstance(heads, (tuple, list)) else [heads]
    owned = {id(p) for head in heads for p in head.parameters()}
    expected.update({name: p for name, p in probe.named_parameters() if id(p) in owned})
    return expected
