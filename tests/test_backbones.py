"""The paper's backbone files (vapt_kernels.backbones.load_backbone), on small files the tests write
in exactly their formats from a small random timm ViT: Google's .npz (the inverse of timm's
reader, with the 21k head and the pre-logits layer), MAE's pretraining checkpoint (a ``model``
entry with the encoder and keys the encoder does not use) and MoCo v3's linear-probe checkpoint
(``state_dict``, ``module.`` prefixes, the probe head). Each loads into the model the paper
fine-tunes on it and computes what the model it came from computes; bad files are refused."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from vapt_kernels import train
from vapt_kernels.backbones import load_backbone

SHAPE = dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2, mlp_ratio=2.0)
NAME = "vit_base_patch16_224"


def source(**kwargs) -> torch.nn.Module:
    """The random ViT the files are written from (its own head: 7 classes)."""
    torch.manual_seed(0)
    model = timm.create_model(NAME, **{**SHAPE, "num_classes": 7, **kwargs}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # no parameter left at a constant initialisation
    return model


def write_google_npz(model, path) -> None:
    """``model`` as Google's ViT arrays (the inverse of timm's VisionTransformer.load_pretrained),
    with a 21k-style head and a pre-logits layer."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    d, heads = model.embed_dim, model.blocks[0].attn.num_heads
    arrays = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": np.random.default_rng(0).normal(size=(d, 11)).astype(np.float32),
        "head/bias": np.zeros(11, np.float32),
        "pre_logits/kernel": np.eye(d, dtype=np.float32),
        "pre_logits/bias": np.zeros(d, np.float32),
    }
    for i in range(len(model.blocks)):
        b, t = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        arrays[f"{b}LayerNorm_0/scale"], arrays[f"{b}LayerNorm_0/bias"] = sd[t + "norm1.weight"], sd[t + "norm1.bias"]
        arrays[f"{b}LayerNorm_2/scale"], arrays[f"{b}LayerNorm_2/bias"] = sd[t + "norm2.weight"], sd[t + "norm2.bias"]
        qkv_w, qkv_b = sd[t + "attn.qkv.weight"], sd[t + "attn.qkv.bias"]
        for j, name in enumerate(("query", "key", "value")):
            w = qkv_w[j * d : (j + 1) * d]  # (out, in)
            arrays[f"{b}MultiHeadDotProductAttention_1/{name}/kernel"] = w.T.reshape(d, heads, d // heads)
            arrays[f"{b}MultiHeadDotProductAttention_1/{name}/bias"] = qkv_b[j * d : (j + 1) * d].reshape(heads, -1)
        arrays[f"{b}MultiHeadDotProductAttention_1/out/kernel"] = sd[t + "attn.proj.weight"].T.reshape(heads, -1, d)
        arrays[f"{b}MultiHeadDotProductAttention_1/out/bias"] = sd[t + "attn.proj.bias"]
        arrays[f"{b}MlpBlock_3/Dense_0/kernel"] = sd[t + "mlp.fc1.weight"].T
        arrays[f"{b}MlpBlock_3/Dense_0/bias"] = sd[t + "mlp.fc1.bias"]
        arrays[f"{b}MlpBlock_3/Dense_1/kernel"] = sd[t + "mlp.fc2.weight"].T
        arrays[f"{b}MlpBlock_3/Dense_1/bias"] = sd[t + "mlp.fc2.bias"]
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def encoder_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(("head.", "fc_norm."))}


def assert_encoder_copied(loaded, model, but: tuple[str, ...] = ()) -> None:
    """Every encoder tensor of ``model`` (but those whose names start with ``but``) is in ``loaded``, bitwise."""
    state = loaded.state_dict()
    for name, value in encoder_state(model).items():
        if not (but and name.startswith(but)):
            assert torch.equal(state[name], value), name


def write_mae(model, path) -> None:
    """MAE's pretraining checkpoint: the encoder (its final norm too) under ``model``, with keys the
    encoder does not use (the mask token, a decoder layer), and the training state beside it."""
    state = encoder_state(model)
    state["mask_token"] = torch.zeros(1, 1, 16)
    state["decoder_embed.weight"] = torch.randn(16, model.embed_dim)
    torch.save({"model": state, "epoch": 1599, "args": {"model": "mae_vit_base_patch16"}}, path)


def write_moco(model, path) -> None:
    """MoCo v3's linear-probe checkpoint: ``state_dict`` with ``module.`` keys and the probe head."""
    state = {f"module.{k}": v for k, v in encoder_state(model).items()}
    state["module.head.weight"] = torch.randn(1000, model.embed_dim)
    state["module.head.bias"] = torch.zeros(1000)
    optimizer = {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}
    torch.save({"epoch": 90, "arch": "vit_base", "state_dict": state, "best_acc1": 76.7, "optimizer": optimizer}, path)


def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def same_logits(loaded, reference) -> None:
    """``loaded``'s logits equal ``reference``'s once both have the same (new) head."""
    with torch.no_grad():
        reference.reset_classifier(loaded.num_classes)
        reference.head.load_state_dict(loaded.head.state_dict())
        if not isinstance(loaded.fc_norm, torch.nn.Identity):
            reference.fc_norm.load_state_dict(loaded.fc_norm.state_dict())
        torch.testing.assert_close(loaded(images()), reference(images()), rtol=1e-6, atol=1e-6)


def test_google_npz_loads_into_the_supervised_model(tmp_path):
    model = source()
    path = tmp_path / "imagenet21k_ViT-B_16.weights"  # recognised by content, not by name
    write_google_npz(model, path)
    loaded, report = load_backbone(path, NAME, num_classes=5, **SHAPE)
    assert report.format == "google-npz" and loaded.global_pool == "token" and loaded.head.out_features == 5
    assert {"head/kernel", "head/bias", "pre_logits/kernel", "pre_logits/bias"} == set(report.ignored)
    assert all("pretraining task" in why for why in report.ignored.values())
    assert_encoder_copied(loaded, model)
    same_logits(loaded, model)


def test_mae_checkpoint_loads_into_the_average_pooled_model(tmp_path):
    model = source()
    path = tmp_path / "mae_pretrain_vit_base.bin"
    write_mae(model, path)
    loaded, report = load_backbone(path, NAME, num_classes=5, **SHAPE)
    assert report.format == "mae" and loaded.global_pool == "avg"
    assert isinstance(loaded.fc_norm, torch.nn.LayerNorm) and isinstance(loaded.norm, torch.nn.Identity)
    assert torch.equal(loaded.fc_norm.weight, torch.ones(24)), "fc_norm starts fresh, as MAE's fine-tuning has it"
    assert set(report.ignored) == {"mask_token", "decoder_embed.weight", "norm.weight", "norm.bias"}
    assert "fc_norm" in report.ignored["norm.weight"] and "encoder" in report.ignored["mask_token"]
    assert_encoder_copied(loaded, model, but=("norm.",))
    reference = timm.create_model(NAME, **SHAPE, num_classes=7, global_pool="avg", fc_norm=True).eval()
    reference.load_state_dict({k: v for k, v in encoder_state(model).items() if not k.startswith("norm.")},
                              strict=False)  # fmt: skip
    same_logits(loaded, reference)


def test_moco_v3_checkpoint_loads_into_the_class_token_model(tmp_path):
    model = source()
    path = tmp_path / "linear-vit-b-300ep.pth.tar"
    write_moco(model, path)
    loaded, report = load_backbone(path, NAME, num_classes=5, **SHAPE)
    assert report.format == "moco-v3" and loaded.global_pool == "token"
    assert set(report.ignored) == {"module.head.weight", "module.head.bias"}
    assert "module.blocks.0.attn.qkv.weight" in report.loaded
    assert_encoder_copied(loaded, model)
    same_logits(loaded, model)


def test_a_timm_state_dict_keeps_its_model(tmp_path):
    """Any other state dict (vapt-train --method full's model.pth): the model as named, its head
    kept where it fits."""
    model = source(global_pool="avg")
    torch.save(model.state_dict(), tmp_path / "model.pth")
    loaded, report = load_backbone(tmp_path / "model.pth", NAME, num_classes=7, global_pool="avg", **SHAPE)
    assert report.format == "timm" and not report.ignored
    torch.testing.assert_close(loaded(images()), model(images()), rtol=0, atol=0)


@pytest.mark.parametrize("writer", [write_google_npz, write_mae, write_moco])
def test_another_width_is_refused_naming_the_keys(tmp_path, writer):
    path = tmp_path / "weights"
    writer(source(embed_dim=32), path)
    with pytest.raises(ValueError, match=r"does not fit .*(file|missing)") as error:
        load_backbone(path, NAME, num_classes=5, **SHAPE)
    assert "patch_embed.proj.weight" in str(error.value) or "embedding/kernel" in str(error.value)


def test_bad_files_are_refused(tmp_path):
    path = tmp_path / "weights"
    write_moco(source(), path)
    truncated = tmp_path / "truncated"
    truncated.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ValueError, match="truncated"):
        load_backbone(truncated, NAME, **SHAPE)
    write_google_npz(source(), tmp_path / "arrays")
    (tmp_path / "cut.npz").write_bytes((tmp_path / "arrays").read_bytes()[:-100])
    with pytest.raises(ValueError, match="load_backbone: .*cut.npz"):
        load_backbone(tmp_path / "cut.npz", NAME, **SHAPE)
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match="does not fit .*missing: cls_token"):
        load_backbone(tmp_path / "resnet.pth", NAME, **SHAPE)
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(ValueError, match="load_backbone: .*empty"):
        load_backbone(tmp_path / "empty", NAME, **SHAPE)
    with pytest.raises(FileNotFoundError):
        load_backbone(tmp_path / "missing", NAME, **SHAPE)


class _CreatesAFile:
    def __init__(self, path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_a_crafted_pickle_runs_no_code(tmp_path):
    marker = tmp_path / "created-by-the-file"
    torch.save({"model": {"cls_token": _CreatesAFile(marker)}}, tmp_path / "crafted.pth")
    with pytest.raises(ValueError, match="could run code"):
        load_backbone(tmp_path / "crafted.pth", NAME, **SHAPE)
    assert not marker.exists()


def test_options_that_contradict_the_format_are_refused(tmp_path):
    write_mae(source(), tmp_path / "mae.pth")
    with pytest.raises(ValueError, match="mae weights, whose model has global_pool='avg'; drop global_pool='token'"):
        load_backbone(tmp_path / "mae.pth", NAME, global_pool="token", **SHAPE)


def test_vapt_train_builds_the_formats_model(tmp_path, capsys):
    """vapt-train --pretrained-path goes through the same reader: an MAE file gives the
    average-pooled model, and the report is printed."""
    write_mae(source(), tmp_path / "mae.pth")
    kwargs = [f"{k}={v}" for k, v in SHAPE.items()]
    args = train.build_parser().parse_args(["--model", NAME, "--model-kwargs", *kwargs,
                                            "--pretrained-path", str(tmp_path / "mae.pth")])  # fmt: skip
    model = train.create_model(args, num_classes=10)
    assert model.global_pool == "avg" and isinstance(model.fc_norm, torch.nn.LayerNorm)
    assert "mae weights" in capsys.readouterr().out
    write_mae(source(embed_dim=32), tmp_path / "wide.pth")
    args.pretrained_path = str(tmp_path / "wide.pth")
    with pytest.raises(train.UsageError, match=r"--pretrained-path .*wide.pth \(mae weights\) does not fit"):
        train.create_model(args, num_classes=10)
