"""The paper's benchmark data (vapt_kernels.paper_data, vapt-train --task), on small benchmarks the
tests write in exactly the shared layouts: VTAB-1k's split lists and FGVC's JSON split files.
Counts, labels, splits and the FGVC label map are read as written; every kind of bad data is
refused naming the file and the line, before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from vapt_kernels import paper_data, train

TINY = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=16", "patch_size=4", "embed_dim=32",
        "depth=2", "num_heads=2", "--workers", "0", "--num-prompts", "4"]  # fmt: skip


def _image(path: Path, value: int, size=(20, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value % 256, 40, 200)).save(path)


def write_vtab(root: Path, task: str = "dtd", per_split=None) -> dict[str, list[tuple[str, int]]]:
    """A VTAB-1k task folder: images/<i>.png and the four split lists (train800val200 = train800 +
    val200), labels cycling over the first 5 classes."""
    per_split = per_split or {"train800": 10, "val200": 5, "test": 6}
    folder, lists, n = root / task, {}, 0
    for split, count in per_split.items():
        lists[split] = []
        for _ in range(count):
            name = f"images/{n:04d}.png"
            _image(folder / name, n)
            lists[split].append((name, n % 5))
            n += 1
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for split, rows in lists.items():
        (folder / f"{split}.txt").write_text("".join(f"{name} {label}\n" for name, label in rows))
    return lists


def write_fgvc(root: Path) -> None:
    """CUB in the VPT split-file layout; labels are CUB's 1-based ids, class 200 only in test."""
    folder = root / "CUB_200_2011"
    splits = {"train": {"001.a/1.png": 1, "005.b/2.png": 5, "001.a/3.png": 1},
              "val": {"005.b/4.png": 5},
              "test": {"001.a/5.png": 1, "200.z/6.png": 200, "005.b/7.png": 5}}  # fmt: skip
    for split, data in splits.items():
        for i, name in enumerate(data):
            _image(folder / "images" / name, i)
        (folder / f"{split}.json").write_text(json.dumps(data))


def test_vtab_splits_read_as_written(tmp_path):
    lists = write_vtab(tmp_path)
    task = paper_data.parse_task("vtab/dtd")
    assert task.num_classes == 47 and task.group == "natural"
    for split, name in [("train", "train800"), ("val", "val200"), ("trainval", "train800val200"), ("test", "test")]:
        ds = paper_data.open_split(task, tmp_path, split)
        assert [(p.relative_to(tmp_path / "dtd").as_posix(), y) for p, y in ds.samples] == lists[name]
        assert len(ds.classes) == 47
    to_tensor = paper_data.task_transform(task, True, 16, (0.5,) * 3, (0.5,) * 3)
    x, y = paper_data.open_split(task, tmp_path, "test", to_tensor)[0]
    assert x.shape == (3, 16, 16) and y == lists["test"][0][1]  # the whole 20x12 image resized, no crop


def test_fgvc_labels_are_mapped_over_all_three_files(tmp_path):
    """Sorted labels 1, 5, 200 become 0, 1, 2 in every split, though 200 appears in test only."""
    write_fgvc(tmp_path)
    task = paper_data.parse_task("fgvc/cub")
    labels = {s: [y for _, y in paper_data.open_split(task, tmp_path, s).samples] for s in ("train", "val", "test")}
    assert labels == {"train": [0, 1, 0], "val": [1], "test": [0, 2, 1]}
    assert paper_data.open_split(task, tmp_path, "train").samples[0][0] == tmp_path / "CUB_200_2011/images/001.a/1.png"


def _damage_line(path: Path, line: str) -> None:
    rows = path.read_text().splitlines()
    rows[2] = line
    path.write_text("\n".join(rows) + "\n")


BAD_VTAB = {
    "a missing split file": (lambda f: (f / "val200.txt").unlink(), "val200.txt is missing"),
    "a malformed line": (lambda f: _damage_line(f / "train800.txt", "images/0002.png"), "train800.txt:3: expected"),
    "a label that is not a number": (
        lambda f: _damage_line(f / "train800.txt", "images/0002.png two"), "train800.txt:3: expected"
    ),
    "a label outside the classes": (
        lambda f: _damage_line(f / "train800.txt", "images/0002.png 47"), "train800.txt:3: label 47 is outside"
    ),
    "an absent image": (lambda f: (f / "images/0003.png").unlink(), "train800.txt:4: "),
    "an empty list": (lambda f: (f / "test.txt").write_text(""), "test.txt lists no images"),
    "an image that cannot be decoded": (
        lambda f: (f / "images/0011.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated"),
        "1 listed image(s) of vtab/dtd's split 'val' cannot be decoded: ",
    ),
}


@pytest.mark.parametrize("case", BAD_VTAB)
def test_bad_vtab_data_is_refused_naming_file_and_line(tmp_path, capsys, case):
    damage, why = BAD_VTAB[case]
    write_vtab(tmp_path / "data")
    damage(tmp_path / "data" / "dtd")
    code = train.main(["--task", "vtab/dtd", "--data-dir", str(tmp_path / "data"), *TINY, "--epochs", "1",
                       "--test-split", "test", "--output", str(tmp_path / "out")])  # fmt: skip
    assert code == 2 and not (tmp_path / "out").exists()
    error = capsys.readouterr().err
    assert why in error
    if "decoded" in case:  # the list and line, the image, PIL's reason
        assert "val200.txt:2: " in error and "images/0011.png (OSError: " in error


def test_bad_fgvc_data_and_flags_are_refused(tmp_path, capsys):
    write_fgvc(tmp_path / "data")
    (tmp_path / "data/CUB_200_2011/val.json").write_text("[1, 2]")
    common = ["--data-dir", str(tmp_path / "data"), *TINY, "--epochs", "1", "--output", str(tmp_path / "out")]
    assert train.main(["--task", "fgvc/cub", *common]) == 2
    assert "val.json: expected a JSON object" in capsys.readouterr().err
    assert train.main(["--task", "vtab/nosuch", *common]) == 2
    assert "unknown task 'vtab/nosuch'" in capsys.readouterr().err
    assert train.main(["--task", "fgvc/cub", "--dataset", "torch/cifar10", *common]) == 2
    assert "drop --dataset" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_vapt_train_runs_a_vtab_task(tmp_path):
    """train800 -> val200 with the test split scored: the task's 47 classes, every test image once."""
    write_vtab(tmp_path / "data")
    out = tmp_path / "out"
    assert train.main(["--task", "vtab/dtd", "--data-dir", str(tmp_path / "data"), *TINY, "--epochs", "1",
                       "--batch-size", "5", "--test-split", "test", "--cache-data", "--no-aug",
                       "--output", str(out)]) == 0  # fmt: skip
    result = json.loads((out / "result.json").read_text())
    assert result["test"]["count"] == 6
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["model"]["head.weight"].shape == (47, 32) and best["args"]["task"] == "vtab/dtd"
