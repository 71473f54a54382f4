"""Saved tasks (``vk.save_pretrained`` / ``vk.from_pretrained``, ``MultiTaskVAPT.add_task`` from a
folder): the rebuilt model computes exactly what the saved one did, for every kind of VAPT model;
reading runs no code from the folder; every damaged or mismatched folder is refused naming the
file and the problem, before the backbone changes; a save never leaves a mixed or partial folder."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import warnings
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import vapt_kernels as vk
from conftest import assert_close_rel, images, randomize_prompts, tiny_vit
from vapt_kernels import files, pretrained

CONFIGS = {
    "vapt": dict(num_prompts=3),
    "per-channel-deep": dict(
        num_prompts=2, shared_kernel=False, share_projector=False, learnable_scale=True, vpt_depth=2, kernel_size=3,
        padding=1, activation="gelu", mlp_dropout=0.2,
    ),
    "no-conv-no-projector": dict(num_prompts=4, conv=False, feature_projector=False),
    "vpt-deep": None,
}  # fmt: skip


def _trained(config, classes: int = 7, seed: int = 1):
    """A VAPT model on :func:`tiny_vit`'s backbone (seed 0) with non-trivial prompts and head."""
    torch.manual_seed(0)
    model = tiny_vit(num_classes=classes)
    model = vk.apply_vpt(model, 3) if config is None else vk.apply_vapt(model, config)
    randomize_prompts(model, seed)
    with torch.no_grad():
        model.head.weight.normal_()
        model.head.bias.normal_()
    return model


def _backbone(**kwargs):
    torch.manual_seed(0)
    return tiny_vit(**kwargs)


def _backbone_of(model, **kwargs):
    """A plain backbone with ``model``'s frozen weights (its own head)."""
    backbone = _backbone(**kwargs)
    frozen = {k: v for k, v in model.state_dict().items() if not k.startswith(("vapt.", "head."))}
    assert not backbone.load_state_dict(frozen, strict=False).unexpected_keys
    return backbone


def _tree(path: Path) -> dict[str, str]:
    """Every file under ``path`` (hidden ones included) -> the hash of its bytes."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(path.rglob("*"))
    }


def _untouched(backbone) -> bool:
    return not hasattr(backbone, "vapt") and type(backbone).__name__ == "VisionTransformer"


@pytest.mark.parametrize("name", CONFIGS)
def test_round_trip_is_exact(tmp_path, name):
    """Saved and rebuilt on a backbone with another class count (its head replaced): equal
    parameters and bitwise equal logits, in eval and with the saved dropout rates."""
    model = _trained(CONFIGS[name])
    vk.save_pretrained(model, tmp_path / "task", metadata={"classes": list("abcdefg")})
    assert sorted(os.listdir(tmp_path / "task")) == ["vapt_config.json", "vapt_model.safetensors"]
    rebuilt = vk.from_pretrained(_backbone_of(model, num_classes=1000), tmp_path / "task")
    assert rebuilt.vapt.config == model.vapt.config and rebuilt.head.out_features == 7
    for (a, p), (b, q) in zip(model.named_parameters(), rebuilt.named_parameters()):
        assert a == b and torch.equal(p, q) and p.requires_grad == q.requires_grad, a
    x = images(model)
    assert torch.equal(model.eval()(x), rebuilt.eval()(x))
    assert pretrained.read_pretrained(tmp_path / "task").metadata == {"classes": list("abcdefg")}


def test_saved_format(tmp_path):
    """The configuration is plain JSON naming the format, the config, the backbone's shapes and
    the class count; the weights are the trainable state dict, in safetensors."""
    model = _trained(CONFIGS["vapt"])
    vk.save_pretrained(model, tmp_path / "task")
    description = json.loads((tmp_path / "task" / "vapt_config.json").read_text())
    assert description["format"] == "vapt_kernels.pretrained/1"
    assert description["vapt"] == vk.VAPTConfig(num_prompts=3).__dict__
    assert description["backbone"] == {
        "architecture": None, "depth": 3, "embed_dim": 24, "num_heads": 2, "patch_size": [8, 8], "grid": [4, 4],
        "num_prefix_tokens": 1, "global_pool": "token",
    }  # fmt: skip
    assert description["num_classes"] == 7 and description["dtype"] == "float64"
    weights = load_file(tmp_path / "task" / "vapt_model.safetensors")
    expected = vk.trainable_state_dict(model)
    assert set(weights) == set(expected) and all(torch.equal(weights[k], expected[k]) for k in expected)


def test_a_timm_model_round_trips_and_another_architecture_warns(tmp_path):
    """A timm-built backbone records its architecture; one of the same shapes under another name
    loads, with a warning."""
    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2, num_classes=3)
    model = vk.apply_vapt(timm.create_model("vit_tiny_patch16_224", **kw), num_prompts=2)
    vk.save_pretrained(model, tmp_path / "task")
    assert json.loads((tmp_path / "task" / "vapt_config.json").read_text())["backbone"]["architecture"] == (
        "vit_tiny_patch16_224"
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vk.from_pretrained(timm.create_model("vit_tiny_patch16_224", **kw), tmp_path / "task")
    with pytest.warns(UserWarning, match="trained on vit_tiny_patch16_224, the backbone is vit_small_patch16_224"):
        vk.from_pretrained(timm.create_model("vit_small_patch16_224", **kw), tmp_path / "task")


@pytest.mark.parametrize(
    "kwargs, named",
    [
        (dict(embed_dim=32), "embed_dim: saved 24, model 32"),
        (dict(depth=4), "depth: saved 3, model 4"),
        (dict(img_size=48), "grid: saved [4, 4], model [6, 6]"),
        (dict(num_heads=4), "num_heads: saved 2, model 4"),
        (dict(reg_tokens=2), "num_prefix_tokens: saved 1, model 3"),
        (dict(global_pool="avg"), "global_pool: saved 'token', model 'avg'"),
    ],
)
def test_a_backbone_of_other_shapes_is_refused(tmp_path, kwargs, named):
    vk.save_pretrained(_trained(CONFIGS["vapt"]), tmp_path / "task")
    backbone = _backbone(**kwargs)
    before = copy.deepcopy(backbone.state_dict())
    with pytest.raises(ValueError, match="trained on a backbone of other shapes") as error:
        vk.from_pretrained(backbone, tmp_path / "task")
    assert named.replace("'", "") in str(error.value).replace("'", "")
    assert _untouched(backbone) and all(torch.equal(v, backbone.state_dict()[k]) for k, v in before.items())


def _saved(tmp_path) -> Path:
    folder = tmp_path / "task"
    vk.save_pretrained(_trained(CONFIGS["vapt"]), folder)
    return folder


def _edit_config(folder: Path, edit) -> None:
    path = folder / "vapt_config.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


DAMAGED_CONFIGS = {
    "not JSON": (lambda f: (f / "vapt_config.json").write_text("{'format': 1"), "not valid JSON"),
    "not UTF-8": (lambda f: (f / "vapt_config.json").write_bytes(b"\xff\xfe{}"), "not UTF-8"),
    "NaN": (lambda f: (f / "vapt_config.json").write_text('{"format": NaN}'), "holds NaN, which is not JSON"),
    "a list": (lambda f: (f / "vapt_config.json").write_text("[]"), "expected a JSON object"),
    "another format": (lambda f: _edit_config(f, lambda d: d.update(format="vapt_kernels.pretrained/2")), "format"),
    "a missing field": (lambda f: _edit_config(f, lambda d: d.pop("backbone")), "missing backbone"),
    "an unknown field": (lambda f: _edit_config(f, lambda d: d.update(extra=1)), "unexpected extra"),
    "an unknown option": (lambda f: _edit_config(f, lambda d: d["vapt"].update(rank=2)), "unknown VAPTConfig field"),
    "a bad option": (lambda f: _edit_config(f, lambda d: d["vapt"].update(num_prompts=0)), "num_prompts must be >= 1"),
    "a bool depth": (lambda f: _edit_config(f, lambda d: d["backbone"].update(depth=True)), "backbone.depth"),
    "a bad grid": (lambda f: _edit_config(f, lambda d: d["backbone"].update(grid=[4])), "two positive integers"),
    "negative classes": (lambda f: _edit_config(f, lambda d: d.update(num_classes=-1)), "num_classes"),
    "another dtype": (lambda f: _edit_config(f, lambda d: d.update(dtype="int8")), "'dtype' must be one of"),
    "too large": (lambda f: (f / "vapt_config.json").write_text(" " * (1 << 20) + "{}"), "more than"),
}


@pytest.mark.parametrize("case", DAMAGED_CONFIGS)
def test_a_damaged_configuration_is_refused(tmp_path, case):
    damage, why = DAMAGED_CONFIGS[case]
    folder = _saved(tmp_path)
    damage(folder)
    backbone = _backbone()
    with pytest.raises(ValueError) as error:
        vk.from_pretrained(backbone, folder)
    assert str(folder / "vapt_config.json") in str(error.value) and why in str(error.value), str(error.value)
    assert _untouched(backbone)


def _edit_weights(folder: Path, edit) -> None:
    path = folder / "vapt_model.safetensors"
    weights = load_file(path)
    edit(weights)
    save_file(weights, path)


DAMAGED_WEIGHTS = {
    "garbage": (lambda f: (f / "vapt_model.safetensors").write_bytes(b"\x00" * 64), "not a safetensors file"),
    "truncated": (
        lambda f: (f / "vapt_model.safetensors").write_bytes((f / "vapt_model.safetensors").read_bytes()[:300]),
        "not a safetensors file",
    ),
    "empty": (lambda f: (f / "vapt_model.safetensors").write_bytes(b""), "not a safetensors file"),
    "a missing key": (lambda f: _edit_weights(f, lambda w: w.pop("vapt.prompt")), "missing: vapt.prompt"),
    "an extra key": (lambda f: _edit_weights(f, lambda w: w.update(extra=torch.zeros(1))), "unexpected: extra"),
    "another shape": (
        lambda f: _edit_weights(f, lambda w: w.update({"vapt.prompt": torch.zeros(1, 5, 24, dtype=torch.float64)})),
        "vapt.prompt: saved (1, 5, 24) vs model (1, 3, 24)",
    ),
    "another head": (
        lambda f: _edit_weights(f, lambda w: w.update({"head.bias": torch.zeros(9, dtype=torch.float64)})),
        "head.bias: saved (9,) vs model (7,)",
    ),
    "NaN": (lambda f: _edit_weights(f, lambda w: w["vapt.prompt"].fill_(float("nan"))), "vapt.prompt: holds 72 NaN"),
    "integers": (
        lambda f: _edit_weights(f, lambda w: w.update({"head.bias": torch.zeros(7, dtype=torch.int64)})),
        "head.bias: dtype torch.int64",
    ),
}


@pytest.mark.parametrize("case", DAMAGED_WEIGHTS)
def test_damaged_weights_are_refused(tmp_path, case):
    damage, why = DAMAGED_WEIGHTS[case]
    folder = _saved(tmp_path)
    damage(folder)
    backbone = _backbone(num_classes=1000)
    with pytest.raises(ValueError) as error:
        vk.from_pretrained(backbone, folder)
    assert why in str(error.value), str(error.value)
    assert _untouched(backbone) and backbone.head.out_features == 1000


class _CreatesAFile:
    """Unpickling it opens (creates) ``path``: the stand-in for code run from a crafted file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_a_pickle_in_place_of_the_weights_runs_no_code(tmp_path):
    """A pickle (torch.save) with a payload, renamed to the weights file: refused as not
    safetensors, and the payload never ran."""
    folder = _saved(tmp_path)
    marker = tmp_path / "created-by-the-weights"
    with open(folder / "vapt_model.safetensors", "wb") as f:
        pickle.dump({"vapt.prompt": _CreatesAFile(marker)}, f)
    with pytest.raises(ValueError, match="not a safetensors file"):
        vk.from_pretrained(_backbone(), folder)
    torch.save({"vapt.prompt": _CreatesAFile(marker)}, folder / "vapt_model.safetensors")
    with pytest.raises(ValueError, match="not a safetensors file"):
        vk.MultiTaskVAPT(_trained(CONFIGS["vapt"])).add_task("t", folder)
    assert not marker.exists(), "reading the folder ran code from it"


def test_missing_folder_or_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vk.from_pretrained(_backbone(), tmp_path / "nothing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        vk.from_pretrained(_backbone(), tmp_path / "file")
    folder = _saved(tmp_path)
    (folder / "vapt_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="vapt_model.safetensors is missing"):
        vk.from_pretrained(_backbone(), folder)


def test_a_vapt_model_or_another_config_is_refused_before_anything_changes(tmp_path):
    folder = _saved(tmp_path)
    model = _trained(CONFIGS["vapt"])
    with pytest.raises(ValueError, match="from_pretrained: .* already has VAPT prompts"):
        vk.from_pretrained(model, folder)
    _edit_config(folder, lambda d: d["vapt"].update(kernel_size=6))
    backbone = _backbone()
    with pytest.raises(ValueError, match="from_pretrained: kernel_size=6 with padding=0 does not fit"):
        vk.from_pretrained(backbone, folder)
    assert _untouched(backbone)
    with pytest.raises(TypeError, match="from_pretrained: .* not supported"):
        vk.from_pretrained(torch.nn.Linear(2, 2), _saved(tmp_path / "b"))


# ------------------------------------------------------------------------------------------------
# saving
# ------------------------------------------------------------------------------------------------


def test_save_refuses_before_writing(tmp_path):
    """No prompts, NaN parameters, metadata that is not JSON, an existing folder without
    overwrite, anything but a saved task with it: refused, and nothing on disk changes."""
    model = _trained(CONFIGS["vapt"])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    (tmp_path / "a-file").write_text("mine")
    vk.save_pretrained(model, tmp_path / "task")
    before = _tree(tmp_path)
    with pytest.raises(ValueError, match="no VAPT prompts"):
        vk.save_pretrained(_backbone(), tmp_path / "new")
    with pytest.raises(ValueError, match="metadata must map strings to JSON values"):
        vk.save_pretrained(model, tmp_path / "new", metadata={"loss": float("nan")})
    with pytest.raises(ValueError, match="metadata must map strings to JSON values"):
        vk.save_pretrained(model, tmp_path / "new", metadata={"path": tmp_path})
    with pytest.raises(ValueError, match="exists; pass overwrite=True"):
        vk.save_pretrained(model, tmp_path / "task")
    with pytest.raises(ValueError, match="not a folder saved by save_pretrained .*notes.txt.* never replaced"):
        vk.save_pretrained(model, tmp_path / "other", overwrite=True)
    with pytest.raises(ValueError, match="exists and is not a folder"):
        vk.save_pretrained(model, tmp_path / "a-file", overwrite=True)
    diverged = _trained(CONFIGS["vapt"])
    with torch.no_grad():
        diverged.vapt.prompt[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="vapt.prompt: holds NaN or Inf"):
        vk.save_pretrained(diverged, tmp_path / "task", overwrite=True)
    assert _tree(tmp_path) == before


def test_overwrite_replaces_the_whole_folder(tmp_path):
    folder = tmp_path / "task"
    vk.save_pretrained(_trained(CONFIGS["vapt"]), folder)
    vk.save_pretrained(_trained(CONFIGS["vpt-deep"], classes=2), folder, overwrite=True)
    saved = pretrained.read_pretrained(folder)
    assert saved.config.vpt_depth == 3 and saved.num_classes == 2
    assert sorted(os.listdir(tmp_path)) == ["task"], "a temporary folder was left behind"


def test_a_failed_save_keeps_the_previous_folder(tmp_path, monkeypatch):
    """The disk fills while the weights are written: OutputError naming the folder and the
    cause, the previous folder as it was, no temporary folder left."""
    folder = tmp_path / "task"
    vk.save_pretrained(_trained(CONFIGS["vapt"]), folder)
    before = _tree(tmp_path)
    real_fsync = os.fsync

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(files.OutputError, match=r"cannot write .*No space left on device"):
        vk.save_pretrained(_trained(CONFIGS["vapt"], seed=2), folder, overwrite=True)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert _tree(tmp_path) == before


# ------------------------------------------------------------------------------------------------
# MultiTaskVAPT
# ------------------------------------------------------------------------------------------------


def test_multitask_adds_a_saved_folder(tmp_path):
    """A folder adds the same task as its state dict; a folder of another configuration (dropout
    rates included, which a state dict cannot show) or backbone is refused naming the field."""
    config = dict(num_prompts=3, conv_dropout=0.0, mlp_dropout=0.0)
    model = _trained(config)
    vk.save_pretrained(model, tmp_path / "a")
    mt = vk.MultiTaskVAPT(_trained(config, seed=5))  # the same backbone, other prompts
    mt.add_task("from-folder", tmp_path / "a")
    mt.add_task("from-state", vk.trainable_state_dict(model))
    x = images(model, batch=2)
    mt.eval()
    # Equal parameters, so equal up to the rounding of another memory alignment of the task's slice.
    assert_close_rel(mt(x, ["from-folder"] * 2), mt(x, ["from-state"] * 2), 1e-13, "folder vs state dict")
    assert_close_rel(mt(x, ["from-folder"] * 2), model.eval()(x), 1e-13, "folder vs its model")

    vk.save_pretrained(_trained(dict(num_prompts=3, conv_dropout=0.0, mlp_dropout=0.1)), tmp_path / "b")
    with pytest.raises(ValueError, match="mlp_dropout: saved 0.1, model 0.0"):
        mt.add_task("other-dropout", tmp_path / "b")
    torch.manual_seed(0)
    wide = vk.apply_vapt(tiny_vit(embed_dim=32), config)
    vk.save_pretrained(wide, tmp_path / "c")
    with pytest.raises(ValueError, match="embed_dim: saved 32, model 24"):
        mt.add_task("other-backbone", tmp_path / "c")
    assert mt.tasks == ["from-folder", "from-state"]
