"""All-or-nothing loading of parameter values from a state dict: what the checkpoint loaders
(:mod:`vapt_kernels.checkpoint`) and :meth:`vapt_kernels.MultiTaskVAPT.add_task` share.

A loader finds the problems with the keys itself (:func:`string_keys` collects the non-string
ones), decides which parameter takes which value, and hands both to :func:`validate_then_copy`,
which checks every value and then copies all of them, or raises one error that lists every
problem and copies nothing.
"""

from __future__ import annotations

import warnings
from typing import Mapping

import torch
import torch.nn as nn

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def string_keys(caller: str, state_dict: Mapping[str, torch.Tensor], problems: list[str]) -> list[str]:
    """The keys of ``state_dict`` that are strings; a problem is added for every other key."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"{caller}: state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}"
        )
    keys = []
    for key in state_dict:
        if isinstance(key, str):
            keys.append(key)
        else:
            problems.append(f"{key!r}: keys must be parameter names (str), not {type(key).__name__}")
    return keys


def plain_values(state_dict: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """Whether every ``state_dict[key]`` (``key`` in ``shapes``) is a dense tensor of a real
    floating dtype and the shape ``shapes[key]``, not on the meta device, all on one device: what
    :func:`validate_then_copy` asks of a value besides finiteness, as a quick test (the check
    itself names what is wrong)."""
    devices = set()
    for key, shape in shapes.items():
        value = state_dict.get(key)
        if (
            not isinstance(value, torch.Tensor) or value.layout != torch.strided or value.is_meta
            or value.dtype not in _FLOAT_DTYPES or tuple(value.shape) != shape
        ):  # fmt: skip
            return False
        devices.add(value.device)
    return len(devices) <= 1


def _loadable(value: object, param: nn.Parameter | None) -> torch.Tensor | str:
    """``value`` converted to the dtype and device of ``param``, or what is wrong with it (a str).

    The value must be a dense tensor of a real floating dtype, with finite values, and stay finite in
    ``param``'s dtype. With ``param`` None it is only checked and returned as it is. Shapes are the
    caller's business.
    """
    if not isinstance(value, torch.Tensor):
        kind = type(value).__qualname__
        if type(value).__module__ != "builtins":
            kind = f"{type(value).__module__}.{kind}"
        fix = "torch.from_numpy(value)" if type(value).__module__ == "numpy" else "torch.tensor(value)"
        return f"a {kind}, not a torch.Tensor; convert it with {fix}"
    if value.layout != torch.strided:
        return f"a {value.layout} tensor; pass a dense one (value.to_dense())"
    if value.is_meta:
        return (
            "on the meta device, so it holds no values; load the file with real tensors "
            "(torch.load(path, map_location='cpu'))"
        )
    if value.dtype not in _FLOAT_DTYPES:
        if value.is_complex():
            why = "parameters are real and a copy would drop the imaginary part; pass value.real if that is meant"
        else:
            why = (
                "parameters hold real floating values (float16, bfloat16, float32 or float64); check that this key "
                "holds the tensor you meant, or convert it with value.float()"
            )
        return f"dtype {value.dtype}: {why}"
    with torch.no_grad():
        finite = torch.isfinite(value)
        if not bool(finite.all()):
            nan = int(torch.isnan(value).sum())
            inf = value.numel() - int(finite.sum()) - nan
            counts = " and ".join(f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "Inf")) if n)
            return (
                f"holds {counts} of {value.numel()} values (a diverged run or a damaged file?); "
                "load an earlier checkpoint"
            )
        if param is None:
            return value
        converted = value.to(device=param.device, dtype=param.dtype)
        if not bool(torch.isfinite(converted).all()):
            return (
                f"values up to {value.abs().max().item():.3g} overflow {param.dtype}, the model's dtype; load it "
                "into a model of a wider dtype"
            )
    return converted


def validate_then_copy(
    caller: str,
    state_dict: Mapping[str, torch.Tensor],
    targets: Mapping[str, nn.Parameter],
    key_problems: list[str],
    hint: str,
    noun: str,
    check_only: Mapping[str, nn.Parameter | None] | None = None,
    warning: str | None = None,
) -> None:
    """Copy ``state_dict[key]`` into ``targets[key]`` for every key, or nothing at all.

    Every value of ``targets`` and ``check_only`` is checked first: of the parameter's shape (not
    checked where ``check_only`` gives None), a ``torch.Tensor``, dense, not on the meta device, of
    a real floating dtype, finite (also once converted to the parameter's dtype). If anything
    is wrong, or ``key_problems`` (missing, unexpected, repeated keys) is not empty, one error lists
    every problem and nothing is changed. Otherwise ``warning`` is issued (before the copy, so that
    warnings turned into errors also leave the model unchanged) and the values are copied,
    converted to each parameter's dtype and device.

    Args:
        caller: the public function, named in the messages.
        state_dict: the values, by key as the caller's user spelled them.
        targets: key of ``state_dict`` -> the parameter that takes its value.
        key_problems: problems with the keys found by the caller, one sentence each.
        hint: what to check when keys or shapes do not match; added to the error when there are key
            problems or a shape differs.
        noun: what the shape messages call the state dict's side (``checkpoint (1, 4, 24) vs model ...``).
        check_only: keys whose values must be valid but are not copied -> the parameter whose
            shape they must have, or None.
        warning: issued once everything is valid, just before the copy.

    Raises:
        ValueError: listing every problem, each with its key; nothing is changed then.
    """
    check_only = check_only or {}
    problems, values = list(key_problems), {}
    structural = bool(key_problems)
    for key, param in [*targets.items(), *check_only.items()]:
        value = state_dict[key]
        if isinstance(value, torch.Tensor) and param is not None and value.shape != param.shape:
            problems.append(f"{key}: {noun} {tuple(value.shape)} vs model {tuple(param.shape)}")
            structural = True
            continue
        result = _loadable(value, param)
        if isinstance(result, str):
            problems.append(f"{key}: {result}")
        elif key in targets:
            values[key] = result
    if problems:
        raise ValueError(
            f"{caller}: nothing was loaded, because of these problems with the state dict:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + (f"\n{hint}" if structural else "")
        )
    if warning is not None:
        warnings.warn(f"{caller}: {warning}", stacklevel=3)
    with torch.no_grad():
        for key, param in targets.items():
            param.copy_(values[key])
