"""The data of the paper's benchmarks, without TensorFlow: the 19 VTAB-1k tasks and the 5 FGVC
data sets, in the layouts the community shares, as datasets that ``vapt-train`` loads like an
image folder.

VTAB-1k: ``ROOT/<task>/`` holds ``train800.txt``, ``val200.txt``, ``train800val200.txt`` and
``test.txt``, each line ``<image path relative to the task folder> <integer label>``.

FGVC (the split files of the original VPT code): ``ROOT/<folder>/{train,val,test}.json``, each a
JSON object mapping an image path (relative to the data set's image folder) to a label; labels are
mapped to contiguous ids in sorted order over all three files, so a class missing from one split
does not shift the ids.

Every line is checked when a task is opened (:func:`listed_images`): a missing split file, a
malformed line, a label outside the task's classes or an image listed but absent is an error
naming the file and the line, before anything is trained; ``vapt-train`` also decodes every listed
image first (:func:`undecodable`).

The paper's published results (:data:`PAPER_ROWS`, with their source) and the means its table
reports (:data:`MEANS`) are here too, for ``vapt-suite``'s table.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, Optional

import torch

# task -> (group, classes)
VTAB_TASKS = {
    "caltech101": ("natural", 102), "cifar": ("natural", 100), "dtd": ("natural", 47),
    "oxford_flowers102": ("natural", 102), "oxford_iiit_pet": ("natural", 37), "svhn": ("natural", 10),
    "sun397": ("natural", 397),
    "patch_camelyon": ("specialized", 2), "eurosat": ("specialized", 10), "resisc45": ("specialized", 45),
    "diabetic_retinopathy": ("specialized", 5),
    "clevr_count": ("structured", 8), "clevr_dist": ("structured", 6), "dmlab": ("structured", 6),
    "kitti": ("structured", 4), "dsprites_loc": ("structured", 16), "dsprites_ori": ("structured", 16),
    "smallnorb_azi": ("structured", 18), "smallnorb_ele": ("structured", 9),
}  # fmt: skip
# vapt-train's split names -> the VTAB-1k split files.
VTAB_SPLITS = {"train": "train800.txt", "val": "val200.txt", "trainval": "train800val200.txt", "test": "test.txt"}
# task -> (folder under ROOT, image folder under it, classes)
FGVC_TASKS = {
    "cub": ("CUB_200_2011", "images", 200),
    "nabirds": ("nabirds", "images", 555),
    "flowers": ("OxfordFlower", "", 102),
    "dogs": ("Stanford-dogs", "Images", 120),
    "cars": ("Stanford-cars", "", 196),
}
FGVC_SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """Benchmark data that is not what its layout says: the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Task:
    """A benchmark task: ``vtab/<name>`` or ``fgvc/<name>``."""

    suite: str
    name: str

    @property
    def key(self) -> str:
        return f"{self.suite}/{self.name}"

    @property
    def group(self) -> str:
        return VTAB_TASKS[self.name][0] if self.suite == "vtab" else "fgvc"

    @property
    def num_classes(self) -> int:
        return VTAB_TASKS[self.name][1] if self.suite == "vtab" else FGVC_TASKS[self.name][2]

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(VTAB_SPLITS) if self.suite == "vtab" else FGVC_SPLITS

    def folder(self, root: Path) -> Path:
        return Path(root) / (self.name if self.suite == "vtab" else FGVC_TASKS[self.name][0])


def parse_task(text: str) -> Task:
    """``vtab/<task>`` or ``fgvc/<data set>``, checked against the known names."""
    suite, _, name = text.partition("/")
    known = {"vtab": VTAB_TASKS, "fgvc": FGVC_TASKS}
    if suite not in known or name not in known[suite]:
        names = ", ".join(f"vtab/{n}" for n in VTAB_TASKS) + ", " + ", ".join(f"fgvc/{n}" for n in FGVC_TASKS)
        raise ValueError(f"unknown task {text!r}; the tasks are: {names}")
    return Task(suite, name)


class ListDataset(torch.utils.data.Dataset):
    """Images and integer labels from a checked list, decoded as RGB and transformed; as timm's
    datasets, ``classes`` names the labels (here their ids) for the class map vapt-train reads."""

    def __init__(self, samples: list[tuple[Path, int]], num_classes: int, transform: Optional[Callable] = None):
        self.samples, self.transform = samples, transform
        self.classes = [str(c) for c in range(num_classes)]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as image:
            image = image.convert("RGB")
        return (self.transform(image) if self.transform is not None else image), label


def task_transform(task: Task, training: bool, size: int, mean, std) -> Callable:
    """The benchmark's own transform at ``size`` (224 in the paper), normalised by ``mean`` and
    ``std`` (the backbone's, ImageNet's where its config names none). VTAB-1k: a resize of the
    whole image to ``size x size`` (bicubic), no augmentation, as the shared list loaders do. FGVC:
    the original VPT code's, the shorter side resized to ``size * 8 / 7`` (256 at 224), then a
    random crop and a horizontal flip for training, a centre crop otherwise."""
    from torchvision import transforms as T

    tail = [T.ToTensor(), T.Normalize(mean, std)]
    if task.suite == "vtab":
        return T.Compose([T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC), *tail])
    resize = T.Resize(round(size * 8 / 7))
    if training:
        return T.Compose([resize, T.RandomCrop(size), T.RandomHorizontalFlip(0.5), *tail])
    return T.Compose([resize, T.CenterCrop(size), *tail])


def open_split(task: Task, root: Path, split: str, transform: Optional[Callable] = None) -> ListDataset:
    """The ``split`` of ``task`` under ``root`` as a dataset, every line checked
    (:func:`listed_images`)."""
    samples = listed_images(task, root, split)
    return ListDataset([(path, label) for _, path, label in samples], task.num_classes, transform)


def listed_images(task: Task, root: Path, split: str) -> list[tuple[str, Path, int]]:
    """Every image of ``task``'s ``split`` under ``root`` as ``(where it is listed, path, label)``,
    every line checked.

    Raises:
        DataError: the task folder or split file is missing; a line is malformed, has a label
            outside the task's classes, or names an image that is not there (file and line named).
    """
    folder = task.folder(root)
    if not folder.is_dir():
        raise DataError(f"{task.key}: no folder {folder}; the {task.suite} layout is described in the README")
    if split not in task.splits:
        raise DataError(f"{task.key} has the splits {', '.join(task.splits)}, not {split!r}")
    if task.suite == "vtab":
        samples = _vtab_samples(task, folder, split)
    else:
        samples = _fgvc_samples(task, folder)[split]
    missing = [(where, path) for where, path, _ in samples if not path.is_file()]
    if missing:
        shown = "; ".join(f"{where}: {path}" for where, path in missing[:5])
        raise DataError(f"{task.key}: {len(missing)} listed image(s) are not there: {shown}")
    return samples


def undecodable(paths: list[str]) -> list[tuple[str, str]]:
    """The images of ``paths`` that PIL cannot decode, as ``(path, why)``, in their order. JPEGs
    are decoded at 1/8 scale (the whole compressed stream is still read, so a truncated file
    fails), on a thread per core (PIL decodes without the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    def problem(path: str) -> Optional[str]:
        try:
            with Image.open(path) as image:
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
                image.load()
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... for a bad file
            return f"{type(error).__name__}: {error}"
        return None

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        found = list(pool.map(problem, paths))
    return [(path, why) for path, why in zip(paths, found) if why is not None]


def _vtab_samples(task: Task, folder: Path, split: str) -> list[tuple[str, Path, int]]:
    path = folder / VTAB_SPLITS[split]
    if not path.is_file():
        raise DataError(f"{task.key}: the split file {path} is missing")
    samples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataError(f"{where}: expected '<image path> <integer label>', got {line!r}")
        label = int(parts[1])
        if not 0 <= label < task.num_classes:
            raise DataError(f"{where}: label {label} is outside {task.key}'s {task.num_classes} classes (0 to "
                            f"{task.num_classes - 1})")  # fmt: skip
        samples.append((where, folder / parts[0], label))
    if not samples:
        raise DataError(f"{task.key}: the split file {path} lists no images")
    return samples


def _fgvc_samples(task: Task, folder: Path) -> dict[str, list[tuple[str, Path, int]]]:
    """Every split of an FGVC task, the labels mapped to ids in sorted order over all three."""
    images = folder / FGVC_TASKS[task.name][1]
    raw = {}
    for split in FGVC_SPLITS:
        path = folder / f"{split}.json"
        if not path.is_file():
            raise DataError(f"{task.key}: the split file {path} is missing")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DataError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(data, dict) or not data:
            raise DataError(f"{path}: expected a JSON object mapping image paths to labels")
        for image, label in data.items():
            if isinstance(label, bool) or not isinstance(label, (int, str)):
                raise DataError(f"{path}: the label of {image!r} is {label!r}, not an integer or a name")
        raw[split] = (path, data)
    labels = sorted({label for _, data in raw.values() for label in data.values()}, key=lambda v: (str(type(v)), v))
    if len(labels) > task.num_classes:
        raise DataError(
            f"{task.key}: the split files hold {len(labels)} labels, more than the {task.num_classes} classes of "
            f"{task.key}"
        )
    ids = {label: i for i, label in enumerate(labels)}
    return {
        split: [(f"{path}: {image}", images / image, ids[label]) for image, label in data.items()]
        for split, (path, data) in raw.items()
    }


# ------------------------------------------------------------------------------------------------
# the paper's published results
# ------------------------------------------------------------------------------------------------

# The means of the paper's table: (key, heading, the tasks averaged). Its VTAB mean is over the 19
# tasks, not over the three group means: with the published group means, (7 x 81.43 + 4 x 85.13 +
# 8 x 59.34) / 19 = 72.91, the VTAB mean it reports.
MEANS = (
    ("natural", "Natural", [t for t, (g, _) in VTAB_TASKS.items() if g == "natural"]),
    ("specialized", "Specialized", [t for t, (g, _) in VTAB_TASKS.items() if g == "specialized"]),
    ("structured", "Structured", [t for t, (g, _) in VTAB_TASKS.items() if g == "structured"]),
    ("vtab", "VTAB mean", list(VTAB_TASKS)),
    ("fgvc", "FGVC mean", list(FGVC_TASKS)),
)
PAPER_SOURCE = (
    "the official VAPT repository's poster (github.com/Minhchuyentoancbn/VAPT, docs/poster.png): ViT-B/16 "
    "pretrained supervised on ImageNet-21k; top-1 %, tuned parameters as % of the total"
)


@dataclasses.dataclass(frozen=True)
class PublishedRow:
    """A row of the paper's table: group means of top-1 (%) and the tuned share of the parameters."""

    method: str
    natural: float
    specialized: float
    structured: float
    vtab: float
    fgvc: float
    tuned_percent: Optional[float]


PAPER_ROWS = (
    PublishedRow("VAPT", natural=81.43, specialized=85.13, structured=59.34, vtab=72.91, fgvc=89.58, tuned_percent=0.36),
    PublishedRow("Full fine-tuning", natural=75.88, specialized=83.36, structured=47.64, vtab=65.57, fgvc=88.54,
                 tuned_percent=100.0),
    PublishedRow("VPT-deep", natural=78.48, specialized=82.43, structured=54.98, vtab=69.43, fgvc=89.11,
                 tuned_percent=None),
)  # fmt: skip
