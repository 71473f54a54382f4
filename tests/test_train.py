"""vapt-train on scikit-learn's digits: it learns, resumes exactly, trains the same under torchrun
(DDP and FSDP2, two CPU processes) as in one process, tunes by the VTAB protocol, and refuses bad
input before anything is written. A tiny ViT (16x16 images, 4x4 patches, width 32, 2 blocks)."""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn", reason="the digits data set ships with scikit-learn (the test extra)")

from vapt_kernels import files, train  # noqa: E402
from vapt_kernels.pretrained import read_pretrained  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=16", "patch_size=4", "embed_dim=32",
        "depth=2", "num_heads=2", "--crop-pct", "1.0", "--workers", "0", "--num-prompts", "4"]


def _digits_module():
    spec = importlib.util.spec_from_file_location("digits_to_folder", ROOT / "scripts" / "digits_to_folder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """All of digits (train/val/test, 60/20/20) and a small copy (12 images per digit)."""
    module = _digits_module()
    root = tmp_path_factory.mktemp("digits")
    module.write_digits(root / "full", list(range(10)), 0.2, 0.2, seed=0)
    module.write_digits(root / "small", list(range(10)), 0.25, 0.25, seed=0, per_class=12)
    module.write_digits(root / "low", list(range(5)), 0.25, 0.25, seed=0, per_class=12)
    return root


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: bitwise comparisons need the same reduction order; and CI shares its cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def vapt_train(*argv, check: bool = True) -> int:
    code = train.main([str(a) for a in argv])
    assert not check or code == 0
    return code


def load(path):
    """A checkpoint as vapt-train reads it: tensors and plain containers only."""
    return torch.load(path, map_location="cpu", weights_only=True)


def tree_digest(folder: Path) -> str:
    """One hash of a folder's tree: every path under it (relative), and each file's bytes; "" if
    the folder does not exist."""
    if not folder.exists():
        return ""
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        h.update(str(path.relative_to(folder)).encode() + b"\0")
        if path.is_file():
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def test_digits_learns(digits, tmp_path):
    """Prompts and head of a random tiny ViT, 4 epochs over 1,079 digits: far above 10% chance."""
    out = tmp_path / "run"
    vapt_train("--data-dir", digits / "full", *TINY, "--no-aug", "--cache-data", "--epochs", 4, "--warmup-epochs", 1,
               "--batch-size", 32, "--lr", 0.3, "--test-split", "test", "--output", out)
    assert {p.name for p in out.iterdir()} == {"args.json", "summary.csv", "last.pt", "best.pt", "result.json",
                                               "pretrained"}
    rows = (out / "summary.csv").read_text().splitlines()
    assert rows[0] == ",".join(train.SUMMARY_COLUMNS) and len(rows) == 5
    result = json.loads((out / "result.json").read_text())
    assert result["best_val_top1"] > 40 and result["test"]["top1"] > 40 and result["test"]["count"] == 359
    ckpt = load(out / "last.pt")
    assert set(ckpt["model"]) == {n for n, p in _tiny_vapt().named_parameters() if p.requires_grad}
    assert ckpt["epoch"] == 4 and ckpt["config"]["num_prompts"] == 4 and ckpt["args"]["lr"] == 0.3
    assert {"optimizer", "scheduler", "rng"} <= set(ckpt)
    # The deliverable: the best epoch's prompts and head as a saved task, with the classes and scores.
    saved = read_pretrained(out / "pretrained")
    best = load(out / "best.pt")
    assert saved.config.__dict__ == best["config"] and saved.num_classes == 10
    assert set(saved.state) == set(best["model"])
    assert all(torch.equal(saved.state[k], best["model"][k]) for k in saved.state)
    assert saved.metadata["classes"] == [str(i) for i in range(10)]
    assert saved.metadata["best_epoch"] == result["best_epoch"] and saved.metadata["test_top1"] == result["test"]["top1"]


def _tiny_vapt():
    import timm

    import vapt_kernels as vk

    model = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                              num_classes=10)
    return vk.apply_vapt(model, num_prompts=4)


def test_resume_is_exact(digits, tmp_path, capsys):
    """With augmentation (in a loader worker) and dropout on: 3 epochs straight, and epoch 1's
    checkpoint resumed for epochs 2-3, end bitwise equal (parameters, momentum, schedule, summary);
    --eval-only reads it."""
    common = ["--data-dir", digits / "small", *TINY, "--workers", 1, "--epochs", 3, "--warmup-epochs", 1,
              "--batch-size", 16,
              "--lr", 0.1, "--conv-dropout", 0.1, "--mlp-dropout", 0.1, "--prompt-dropout", 0.1]
    vapt_train(*common, "--checkpoint-every", 1, "--output", tmp_path / "straight")
    assert (tmp_path / "straight" / "checkpoint-1.pt").exists() and (tmp_path / "straight" / "checkpoint-3.pt").exists()
    vapt_train(*common, "--resume", tmp_path / "straight" / "checkpoint-1.pt", "--output", tmp_path / "resumed")
    a, b = load(tmp_path / "straight" / "last.pt"), load(tmp_path / "resumed" / "last.pt")
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for name, buf in a["optimizer"]["momentum_buffer"].items():
        assert torch.equal(buf, b["optimizer"]["momentum_buffer"][name]), name
    timing = ("img_per_s", "peak_mem_mib", "epoch_s")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert a["scheduler"] == b["scheduler"] and strip(a["summary"]) == strip(b["summary"])
    assert [r["epoch"] for r in b["summary"]] == [1, 2, 3]
    assert not list((tmp_path / "straight").glob(".*tmp*")), "a temporary checkpoint file was left behind"

    capsys.readouterr()
    vapt_train("--data-dir", digits / "small", "--eval-only", "--checkpoint", tmp_path / "resumed" / "last.pt",
               "--workers", 0)
    printed = capsys.readouterr().out
    top1 = b["summary"][-1]["eval_top1"]
    assert f"top1 {top1:.2f}" in printed, printed


def _torchrun(*argv, tmp_path) -> None:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "vapt_kernels.train", *[str(a) for a in argv]]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "fsdp-resume"])
def test_torchrun_two_processes_train_like_one(digits, tmp_path, mode):
    """No dropout, no augmentation: two gloo processes (global batch 16 = 2 x 8) end with the
    trainable parameters of one process on batch 16, to float32 rounding. ``fsdp-resume``: the two
    FSDP2 processes take over the one-process run after its first epoch (sharded momentum)."""
    common = ["--data-dir", digits / "small", *TINY, "--no-aug", "--epochs", 2, "--warmup-epochs", 1,
              "--batch-size", 16, "--lr", 0.1, "--conv-dropout", 0, "--mlp-dropout", 0, "--vpt-depth", 1]
    vapt_train(*common, "--checkpoint-every", 1, "--output", tmp_path / "one")
    extra = {"ddp": [], "fsdp": ["--fsdp"], "fsdp-resume": ["--fsdp", "--resume", tmp_path / "one" / "checkpoint-1.pt"]}
    _torchrun(*common, *extra[mode], "--output", tmp_path / "two", tmp_path=tmp_path)
    one, two = load(tmp_path / "one" / "last.pt"), load(tmp_path / "two" / "last.pt")
    assert set(one["model"]) == set(two["model"])
    worst = 0.0
    for name, value in one["model"].items():
        diff = (value - two["model"][name]).abs().max().item() / max(value.abs().max().item(), 1e-12)
        worst = max(worst, diff)
    print(f"{mode}: largest relative difference of a trainable tensor {worst:.3g}")
    assert worst < 1e-4, f"largest relative difference {worst:.3g}"
    # Evaluation counts each of the 30 validation images once, on both ranks together.
    for r1, r2 in zip(one["summary"], two["summary"]):
        assert abs(r1["eval_top1"] - r2["eval_top1"]) < 1e-6 and abs(r1["train_loss"] - r2["train_loss"]) < 1e-4


def test_tuning_protocol(digits, tmp_path, capsys):
    """Grid on train, scored on val; best retrained on train+val per seed; test mean and std."""
    out = tmp_path / "tune"
    vapt_train("--data-dir", digits / "small", *TINY, "--no-aug", "--cache-data", "--epochs", 1, "--warmup-epochs", 0,
               "--batch-size", 16, "--lr-grid", 0.8, 3.2, "--wd-grid", 0.0, "--seeds", 1, 2,
               "--test-split", "test", "--output", out)
    result = json.loads((out / "result.json").read_text())
    # Grid rates are per 256 images: 0.8 and 3.2 at a global batch of 16 are 0.05 and 0.2.
    assert [(g["lr"], g["weight_decay"]) for g in result["grid"]] == [(0.05, 0.0), (0.2, 0.0)]
    assert result["best"] == max(result["grid"], key=lambda g: (g["val_top1"], -g["lr"]))
    assert [f["seed"] for f in result["final"]] == [1, 2]
    tops = torch.tensor([f["test_top1"] for f in result["final"]], dtype=torch.float64)
    assert result["test_top1_mean"] == pytest.approx(tops.mean().item())
    assert result["test_top1_std"] == pytest.approx(tops.std().item())
    for grid_run in out.glob("grid-*"):  # the choice never saw the test split
        assert "test" not in json.loads((grid_run / "result.json").read_text())
    final = load(out / "final-seed1" / "last.pt")
    assert final["args"]["train_on_val"] and final["args"]["lr_base"] == result["best"]["lr_base"]
    assert "test top1" in capsys.readouterr().out


def test_a_diverged_grid_run_is_left_out_and_a_tuning_continues(digits, tmp_path, capsys):
    """A grid run that diverges is recorded and left out of the choice (the tuning goes on);
    --resume OUTPUT continues a tuning: its finished runs are kept, not run again."""
    out = tmp_path / "tune"
    argv = ["--data-dir", digits / "small", *TINY, "--no-aug", "--cache-data", "--epochs", 1, "--warmup-epochs", 0,
            "--batch-size", 16, "--lr-grid", 0.8, 1e7, "--wd-grid", 0.0, "--seeds", 1, "--test-split", "test",
            "--output", out]  # fmt: skip
    vapt_train(*argv)
    result = json.loads((out / "result.json").read_text())
    assert [g["val_top1"] is None for g in result["grid"]] == [False, True] and result["grid"][1]["diverged"]
    assert result["best"]["lr_base"] == 0.8 and "diverged, left out of the choice" in capsys.readouterr().out
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")}
    (out / "result.json").unlink()
    vapt_train(*argv, "--resume", out)
    assert json.loads((out / "result.json").read_text())["final"] == result["final"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")} == before  # nothing trained again
    assert train.main([str(a) for a in argv] + ["--resume", str(out / "grid-lr0.8-wd0")]) == 2
    assert "a tuning continues in its own folder: pass --resume" in capsys.readouterr().err


def test_fast_search_tunes_the_weight_decay_first(digits, tmp_path):
    """The official fast variant: every weight decay at lr-base 5, then every rate at the best
    weight decay; the pair (5, best wd) runs once. Three grid runs, not four."""
    out = tmp_path / "tune"
    vapt_train("--data-dir", digits / "small", *TINY, "--no-aug", "--cache-data", "--epochs", 1, "--warmup-epochs", 0,
               "--batch-size", 16, "--lr-grid", 5, 0.8, "--wd-grid", 0.01, 0.0, "--fast-search", "--seeds", 1,
               "--test-split", "test", "--output", out)  # fmt: skip
    result = json.loads((out / "result.json").read_text())
    pairs = [(g["lr_base"], g["weight_decay"]) for g in result["grid"]]
    first = max(result["grid"][:2], key=lambda g: g["val_top1"])["weight_decay"]
    assert result["search"] == "fast" and pairs == [(5.0, 0.01), (5.0, 0.0), (0.8, first)]
    second = [g for g in result["grid"] if g["weight_decay"] == first]
    assert result["best"] == max(second, key=lambda g: (g["val_top1"], -g["lr_base"]))
    assert sorted(p.name for p in out.glob("grid-*")) == sorted(f"grid-lr{lr:g}-wd{wd:g}" for lr, wd in pairs)


def test_official_grid_is_the_official_protocols():
    """--official-grid fills in the official lr and wd grids and seeds, each unless given."""
    parse = train.build_parser().parse_args
    lrs, wds, seeds = train.tuning_grid(parse(["--official-grid", "--wd-grid", "0"]))
    assert lrs == [50, 25, 10, 5, 2.5, 1, 0.5, 0.25, 0.1, 0.05] and wds == [0.0] and seeds == [42, 44, 82, 100, 800]
    assert train.tuning_grid(parse(["--lr-grid", "1", "--batch-size", "64"])) == ([1.0], [1e-4], [42])


# ------------------------------------------------------------------------------------------------
# bad input: a clear error, before anything is trained or written
# ------------------------------------------------------------------------------------------------


def _refused(capsys, out: Path, *argv) -> str:
    capsys.readouterr()
    assert vapt_train(*argv, "--output", out, check=False) == 2
    assert not out.exists(), "a refused run wrote files"
    return capsys.readouterr().err


def error_message(err: str) -> str:
    """The error in vapt-train's stderr, without the usage text argparse prints before it."""
    assert "vapt-train: error: " in err, err
    return err.split("vapt-train: error: ", 1)[1]


def test_bad_data_folder_and_split(digits, tmp_path, capsys):
    err = _refused(capsys, tmp_path / "o", "--data-dir", tmp_path / "nowhere", *TINY)
    assert "no such folder" in err and "train/" in err
    err = _refused(capsys, tmp_path / "o", "--data-dir", digits / "small", *TINY, "--val-split", "validation")
    assert "no 'validation/' split folder" in err and "found: test, train, val" in err
    image = next((digits / "small" / "train" / "0").iterdir())
    odd = tmp_path / "odd"
    for split, label in (("train", "0"), ("val", "0"), ("val", "7")):
        (odd / split / label).mkdir(parents=True)
        shutil.copy(image, odd / split / label)
    err = _refused(capsys, tmp_path / "o", "--data-dir", odd, *TINY)
    assert "split 'val/' has images of classes that 'train/' has no images of: 7" in err
    # An empty train/7/ folder: timm's reader would drop val's class-7 images from the scores.
    (odd / "train" / "7").mkdir()
    err = _refused(capsys, tmp_path / "o", "--data-dir", odd, *TINY)
    assert "split 'val/' has images of classes that 'train/' has no images of: 7" in err
    empty = tmp_path / "empty"
    for split in ("train", "val"):
        (empty / split / "0").mkdir(parents=True)
    err = _refused(capsys, tmp_path / "o", "--data-dir", empty, *TINY)
    assert "split 'train/' holds no images in class folders" in err


def test_bad_model_kwargs_fsdp_and_pretrained(digits, tmp_path, capsys, monkeypatch):
    err = _refused(capsys, tmp_path / "o", "--data-dir", digits / "small", *TINY,
                   "--model-kwargs", "img_size=16", "bogus=1")
    assert "--model-kwargs" in err and "bogus" in err
    err = _refused(capsys, tmp_path / "o", "--data-dir", digits / "small", *TINY, "--fsdp")
    assert "--fsdp" in err and "torchrun" in err
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = _refused(capsys, tmp_path / "o", "--data-dir", digits / "small", "--model", "vit_tiny_patch16_224",
                   "--pretrained", "--workers", "0")
    assert "--pretrained-path" in err


def test_bad_resume_and_class_count(digits, tmp_path, capsys):
    first = tmp_path / "first"
    vapt_train("--data-dir", digits / "small", *TINY, "--no-aug", "--cache-data", "--epochs", 1, "--batch-size", 16,
               "--output", first)
    err = _refused(capsys, tmp_path / "o", "--data-dir", digits / "small", *TINY[:-1], "3", "--no-aug", "--cache-data",
                   "--epochs", 1, "--batch-size", 16, "--resume", first / "last.pt")
    assert "--num-prompts 4 there, 3 here" in err
    # A 10-class checkpoint scored on a 5-class folder.
    capsys.readouterr()
    assert vapt_train("--data-dir", digits / "low", "--eval-only", "--checkpoint", first / "last.pt",
                      "--workers", 0, check=False) == 2
    err = capsys.readouterr().err
    assert "10 classes" in err and "--num-classes 10" in err


# Each case: flags, then the flag the error must name. Before the checks at the flags, these
# trained (NaN, negative decay, momentum 2), were ignored (--crop-pct 0, --img-size 0) or failed
# with a traceback after args.json was written (--momentum -1, --log-interval 0, --workers -1).
BAD_FLAGS = [
    (["--lr", "nan"], "--lr"), (["--lr", "-1"], "--lr"), (["--lr-base", "inf"], "--lr-base"),
    (["--weight-decay", "-1e-4"], "--weight-decay"), (["--crop-pct", "0"], "--crop-pct"),
    (["--momentum", "-1"], "--momentum"), (["--momentum", "2"], "--momentum"), (["--momentum", "nan"], "--momentum"),
    (["--log-interval", "0"], "--log-interval"), (["--workers", "-1"], "--workers"),
    (["--warmup-epochs", "nan"], "--warmup-epochs"), (["--img-size", "0"], "--img-size"),
    (["--num-classes", "0"], "--num-classes"), (["--seed", str(2**64)], "--seed"),
    (["--checkpoint-every", "-1"], "--checkpoint-every"), (["--epochs", "0"], "--epochs"),
    (["--num-prompts", "0"], "--num-prompts"), (["--conv-dropout", "nan"], "--conv-dropout"),
    (["--lr-grid", "0.1", "inf"], "--lr-grid"), (["--wd-grid", "-1"], "--wd-grid"),
    (["--lr-base", "1e308", "--batch-size", "512"], "--lr-base"), (["--kernel-size", "100"], "--kernel-size"),
]


def test_bad_flag_values_are_refused_before_anything_is_written(digits, tmp_path, capsys):
    """Every numeric flag is checked where it is parsed (finite, in range) or, for what depends on
    other flags, before the first write: exit status 2, the flag named with the accepted range."""
    for flags, named in BAD_FLAGS:
        err = error_message(_refused(capsys, tmp_path / "o", "--data-dir", digits / "small", *TINY, "--no-aug",
                                     "--epochs", 1, "--batch-size", 16, *flags))
        assert f"{named} " in err or f"{named}:" in err, (flags, err)
        assert any(why in err for why in ("expected", "must be", "not a finite number", "does not fit")), (flags, err)


def test_existing_output_is_kept_unless_resumed_or_overwritten(digits, tmp_path, capsys):
    """A second run into a folder that holds a run is refused untouched (also when --overwrite is
    given and a later check refuses); --resume continues it there; --overwrite replaces it whole
    (no stale checkpoint-N.pt); a tuning folder likewise, its per-run folders included."""
    out = tmp_path / "run"
    common = ["--data-dir", digits / "small", *TINY, "--no-aug", "--cache-data", "--batch-size", 16]
    vapt_train(*common, "--epochs", 2, "--checkpoint-every", 1, "--output", out)
    before = tree_digest(out)
    capsys.readouterr()
    assert vapt_train(*common, "--epochs", 1, "--output", out, check=False) == 2
    err = capsys.readouterr().err
    assert f"--output {out} already holds files" in err and "--resume" in err and "--overwrite" in err, err
    bogus = ["--model-kwargs", "img_size=16", "patch_size=4", "embed_dim=32", "depth=2", "num_heads=2", "bogus=1"]
    assert vapt_train(*common, *bogus, "--epochs", 1, "--overwrite", "--output", out, check=False) == 2
    assert vapt_train(*common, "--epochs", 2, "--overwrite", "--resume", out / "checkpoint-1.pt", "--output", out,
                      check=False) == 2
    assert "--overwrite would delete" in capsys.readouterr().err
    assert tree_digest(out) == before, "a refused run changed the earlier run's folder"

    vapt_train(*common, "--epochs", 2, "--checkpoint-every", 1, "--resume", out / "checkpoint-1.pt", "--output", out)
    assert load(out / "last.pt")["epoch"] == 2

    vapt_train(*common, "--epochs", 1, "--overwrite", "--output", out)
    assert {p.name for p in out.iterdir()} == {"args.json", "summary.csv", "last.pt", "best.pt", "result.json",
                                               "pretrained"}
    assert not list(tmp_path.glob(".*")), "the deleted folder was left behind"

    tuned = tmp_path / "tune"
    (tuned / "grid-lr0.8-wd0").mkdir(parents=True)
    (tuned / "grid-lr0.8-wd0" / "last.pt").write_bytes(b"an earlier tuning run")
    (tuned / "notes.txt").write_text("kept unless --overwrite")
    before = tree_digest(tuned)
    tuning = [*common, "--epochs", 1, "--lr-grid", 0.8, "--wd-grid", 0, "--seeds", 1, "--test-split", "test",
              "--output", tuned]
    assert vapt_train(*tuning, check=False) == 2
    assert tree_digest(tuned) == before
    vapt_train(*tuning, "--overwrite")
    assert sorted(p.name for p in tuned.iterdir()) == ["final-seed1", "grid-lr0.8-wd0", "result.json"]
    assert load(tuned / "grid-lr0.8-wd0" / "last.pt")["epoch"] == 1


class _DiskFull:
    """A file that takes ``room`` bytes, then fails as a full disk does: on the write that passes
    the limit, or on the flush after writes made through its descriptor (as PIL's PNG writer does)."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        if self.f.tell() + data.nbytes > self.room:
            self.f.write(data[: max(0, self.room - self.f.tell())])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()
        if os.fstat(self.f.fileno()).st_size > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


@pytest.fixture(scope="module")
def full_run(digits, tmp_path_factory):
    """Two epochs of --method full (model.pth; curves.png with matplotlib), a checkpoint each."""
    out = tmp_path_factory.mktemp("full") / "run"
    plot = ["--plot"] if importlib.util.find_spec("matplotlib") else []
    argv = ["--data-dir", digits / "low", *TINY[:-2], "--method", "full", "--no-aug", "--cache-data", "--epochs", 2,
            "--batch-size", 8, "--checkpoint-every", 1, *plot]
    vapt_train(*argv, "--output", out)
    return out, argv


@pytest.mark.parametrize("name", ["args.json", "last.pt", "summary.csv", "result.json", "model.pth", "curves.png"])
def test_a_failed_write_keeps_the_previous_file(full_run, tmp_path, capsys, monkeypatch, name):
    """The disk fills while ``name`` is written (by the run that resumes epoch 2 in the same
    folder): exit status 1, the path and the cause named, no traceback, the previous ``name`` as it
    was and no temporary file left."""
    base, argv = full_run
    if name == "curves.png" and "--plot" not in argv:
        pytest.skip("--plot needs matplotlib (the plot extra)")
    out = tmp_path / "run"
    shutil.copytree(base, out)
    previous = (out / name).read_bytes()
    real_open = open

    def open_on_a_full_disk(path, *args, **kwargs):
        f = real_open(path, *args, **kwargs)
        return _DiskFull(f, 100) if Path(path).name.startswith(f".{name}.") else f

    monkeypatch.setattr(files, "open", open_on_a_full_disk, raising=False)
    capsys.readouterr()
    assert vapt_train(*argv, "--resume", out / "checkpoint-1.pt", "--output", out, check=False) == 1
    err = capsys.readouterr().err
    assert f"cannot write {out / name}: [Errno 28] No space left on device" in err and "Traceback" not in err, err
    assert (out / name).read_bytes() == previous
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name], "a temporary file was left behind"


class _CreatesAFile:
    """Unpickling it opens (creates) ``path``: the stand-in for code run from a crafted file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_checkpoints_are_read_without_unpickling_objects(digits, tmp_path, capsys):
    first = tmp_path / "first"
    vapt_train("--data-dir", digits / "small", *TINY, "--no-aug", "--cache-data", "--epochs", 1, "--batch-size", 16,
               "--output", first)
    good = load(first / "last.pt")  # a checkpoint of this tool reads with weights_only=True
    assert {"model", "args", "epoch", "rng"} <= set(good)
    marker = tmp_path / "created-by-the-checkpoint"
    crafted = tmp_path / "crafted.pt"
    torch.save({**good, "summary": _CreatesAFile(marker)}, crafted)
    truncated, empty = tmp_path / "truncated.pt", tmp_path / "empty.pt"
    truncated.write_bytes((first / "last.pt").read_bytes()[:200])
    empty.write_bytes(b"")
    for path, why in ((crafted, "could run code"), (truncated, "cannot be read"), (empty, "cannot be read")):
        err = _refused(capsys, tmp_path / "o", "--data-dir", digits / "small", *TINY, "--no-aug", "--epochs", 2,
                       "--batch-size", 16, "--resume", path)
        assert f"--resume {path}: not a vapt-train checkpoint" in err and why in err, err
        capsys.readouterr()
        assert vapt_train("--data-dir", digits / "small", "--eval-only", "--checkpoint", path, "--workers", 0,
                          check=False) == 2
        err = capsys.readouterr().err
        assert f"--checkpoint {path}: not a vapt-train checkpoint" in err and why in err, err
    assert not marker.exists(), "reading the crafted checkpoint ran its code"


def test_unreadable_images_are_refused_or_skipped_and_counted(digits, tmp_path, capsys):
    """timm's dataset replaces an image it cannot decode by the next one (a log line only), so a
    damaged test image used to be scored as its neighbour, counted twice. Refused now, naming the
    file, before anything is written; --skip-unreadable leaves such images out and lists them."""
    data = tmp_path / "data"
    shutil.copytree(digits / "small", data)
    truncated = sorted((data / "train" / "3").iterdir())[0]
    truncated.write_bytes(truncated.read_bytes()[:40])
    empty = sorted((data / "val" / "1").iterdir())[0]
    empty.write_bytes(b"")
    text = sorted((data / "test" / "7").iterdir())[0]
    text.write_text("not an image")
    common = ["--data-dir", data, *TINY, "--no-aug", "--epochs", 1, "--batch-size", 16, "--test-split", "test"]
    err = _refused(capsys, tmp_path / "o", *common)
    assert "1 image(s) of split 'train/' cannot be decoded" in err and str(truncated) in err, err
    assert "--skip-unreadable" in err
    vapt_train(*common, "--skip-unreadable", "--output", tmp_path / "o")
    result = json.loads((tmp_path / "o" / "result.json").read_text())
    assert result["skipped_unreadable"] == {"train": [str(truncated)], "val": [str(empty)], "test": [str(text)]}
    counted = len(list((data / "test").rglob("*.png"))) - 1
    assert result["test"]["count"] == counted


def test_pretrained_path_takes_backbone_weights_only(digits, tmp_path, capsys):
    """--pretrained-path used to accept a vapt-train checkpoint (or any state dict) and train on a
    backbone left at its random initialisation, since timm loads without the head non-strictly.
    Refused now: a checkpoint, a saved task folder, weights of another model, a crafted pickle (its
    code never runs)."""
    first = tmp_path / "first"
    vapt_train("--data-dir", digits / "small", *TINY, "--no-aug", "--cache-data", "--epochs", 1, "--batch-size", 16,
               "--output", first)
    marker = tmp_path / "created-by-the-weights"
    crafted, other = tmp_path / "crafted.pth", tmp_path / "other.pth"
    torch.save({"pos_embed": _CreatesAFile(marker)}, crafted)
    torch.save({"fc.weight": torch.zeros(2, 2), "blocks.0.norm1.weight": torch.ones(32)}, other)
    cases = {
        first / "last.pt": "a vapt-train checkpoint, which holds the trainable parameters only",
        first / "pretrained": "a saved VAPT task (prompts and head), not backbone weights",
        other: "(timm weights) does not fit vit_tiny_patch16_224: missing: cls_token",
        crafted: "could run code",
        tmp_path / "missing.pth": "no such file",
    }
    for path, why in cases.items():
        err = _refused(capsys, tmp_path / "o", "--data-dir", digits / "small", *TINY, "--epochs", 1,
                       "--pretrained-path", path)
        assert f"--pretrained-path {path}" in err and why in err, err
    assert not marker.exists(), "reading the crafted weights ran their code"


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(digits, tmp_path, capsys, monkeypatch):
    """Logits turned NaN from epoch 2's third step: exit code 3, the step named, epoch 1's
    checkpoint left as it was."""
    prepare = train.prepare
    calls = {"n": 0}

    def poisoned(model, args, config):
        model = prepare(model, args, config)

        def hook(module, inputs, output):
            if module.training:
                calls["n"] += 1
                if calls["n"] > steps + 2:
                    snapshot.setdefault("last.pt", (out / "last.pt").read_bytes())  # epoch 1's, as written
                    return output * float("nan")
            return output

        model.register_forward_hook(hook)
        return model

    snapshot = {}
    monkeypatch.setattr(train, "prepare", poisoned)
    out = tmp_path / "nan"
    args = ["--data-dir", digits / "small", *TINY, "--no-aug", "--cache-data", "--epochs", 3, "--batch-size", 8,
            "--log-interval", 1, "--output", out]
    steps = sum(1 for _ in (digits / "small" / "train").rglob("*.png")) // 8  # training steps per epoch
    assert vapt_train(*args, check=False) == 3
    err = capsys.readouterr().err
    assert "epoch 2, step 3" in err and "untouched" in err
    assert (out / "last.pt").read_bytes() == snapshot["last.pt"]
    last = load(out / "last.pt")
    assert last["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["model"].values())
    assert len((out / "summary.csv").read_text().splitlines()) == 2


@pytest.mark.parametrize("where", ["val", "test", "momentum"])
def test_divergence_after_the_training_loss_stops_before_writing(digits, tmp_path, capsys, monkeypatch, where):
    """A finite training loss but a NaN val loss at epoch 2, a NaN test loss at the end, or a
    NaN momentum buffer after epoch 2's training: exit status 3, the cause named; last.pt is
    epoch 1's (the last finite one), no result.json is written, and every checkpoint is finite."""
    evaluate, train_epoch = train.evaluate, train._train_epoch
    calls = {"evaluate": 0}

    def poisoned_evaluate(*args, **kwargs):
        metrics = evaluate(*args, **kwargs)
        calls["evaluate"] += 1
        if (where, calls["evaluate"]) in (("val", 2), ("test", 3)):
            metrics["loss"] = float("nan")
        return metrics

    def poisoned_epoch(model, loader, optimizer, scheduler, scaler, amp, d, epoch, *rest):
        result = train_epoch(model, loader, optimizer, scheduler, scaler, amp, d, epoch, *rest)
        if where == "momentum" and epoch == 2:
            next(iter(optimizer.state.values()))["momentum_buffer"].fill_(float("nan"))
        return result

    monkeypatch.setattr(train, "evaluate", poisoned_evaluate)
    monkeypatch.setattr(train, "_train_epoch", poisoned_epoch)
    out = tmp_path / where
    capsys.readouterr()
    assert vapt_train("--data-dir", digits / "small", *TINY, "--no-aug", "--cache-data", "--epochs", 2,
                      "--batch-size", 16, "--test-split", "test", "--output", out, check=False) == 3
    err = capsys.readouterr().err
    named = {"val": "the val loss at epoch 2 is NaN/Inf", "test": "the test loss of the last epoch is NaN/Inf",
             "momentum": "momentum hold NaN/Inf values after epoch 2"}[where]
    assert named in err and "Traceback" not in err, err
    assert not (out / "result.json").exists()
    assert load(out / "last.pt")["epoch"] == (2 if where == "test" else 1)
    for path in out.glob("*.pt"):
        ckpt = load(path)
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values()), path
        assert all(torch.isfinite(v).all() for v in ckpt["optimizer"]["momentum_buffer"].values()), path


def test_result_json_is_strict_json():
    """result.json never holds NaN or Inf, which strict JSON readers refuse: such a number is null."""
    text = train._json_text({"a": float("nan"), "b": [1.5, float("inf")], "c": {"d": -float("inf")}})
    assert json.loads(text) == {"a": None, "b": [1.5, None], "c": {"d": None}}


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_runs(digits, tmp_path, amp):
    """Autocast (and the gradient scaler for fp16) through a training epoch and its evaluation;
    with matplotlib installed (the plot extra), --plot draws the curves."""
    out = tmp_path / amp
    plot = ["--plot"] if importlib.util.find_spec("matplotlib") else []
    vapt_train("--data-dir", digits / "small", *TINY, "--no-aug", "--cache-data", "--epochs", 1, "--batch-size", 16,
               "--amp", amp, *plot, "--output", out)
    assert (out / "curves.png").is_file() == bool(plot)
    ckpt = load(out / "last.pt")
    assert (ckpt["scaler"] is not None) == (amp == "fp16")
    assert all(torch.isfinite(v).all() and v.dtype == torch.float32 for v in ckpt["model"].values())


def test_every_vapt_config_field_is_a_flag():
    """The method flags come from the VAPTConfig dataclass, so they cannot drift from it."""
    import dataclasses

    import vapt_kernels as vk

    parser = train.build_parser()
    flags = {a for action in parser._actions for a in action.option_strings}
    for field in dataclasses.fields(vk.VAPTConfig):
        assert "--" + field.name.replace("_", "-") in flags, field.name
    args = parser.parse_args(["--num-prompts", "7", "--no-shared-kernel", "--activation", "gelu", "--mlp-dropout", "0"])
    expected = vk.VAPTConfig(num_prompts=7, shared_kernel=False, activation="gelu", mlp_dropout=0.0)
    assert train.vapt_config(args) == expected


def test_full_training_weights_load_as_pretrained(digits, tmp_path):
    """--method full writes model.pth (timm weights); --pretrained-path loads it as the backbone of
    the next run, with a new head for that run's classes (the transfer example's path)."""
    vapt_train("--data-dir", digits / "low", *TINY[:-2], "--method", "full", "--no-aug", "--cache-data",
               "--epochs", 1, "--batch-size", 8, "--output", tmp_path / "pre")
    weights = torch.load(tmp_path / "pre" / "model.pth", weights_only=True)
    vapt_train("--data-dir", digits / "small", *TINY, "--pretrained-path", tmp_path / "pre" / "model.pth",
               "--no-aug", "--cache-data", "--epochs", 1, "--batch-size", 16, "--output", tmp_path / "tuned")
    args = train.build_parser().parse_args([*map(str, TINY), "--pretrained-path", str(tmp_path / "pre" / "model.pth")])
    model = train.create_model(args, num_classes=10)
    for name, value in model.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(value, weights[name]), name
    assert load(tmp_path / "tuned" / "last.pt")["model"]["head.weight"].shape == (10, 32)
