"""``vapt-train``: fine-tune a timm ViT with VAPT, VPT-deep or a linear head, on one CPU or many GPUs.

    vapt-train --data-dir DIR --model vit_base_patch16_224.augreg_in21k --pretrained --output runs/x
    torchrun --nproc-per-node 8 -m vapt_kernels.train ...   # DDP; add --fsdp for FSDP2

The recipe's defaults are the official VPT/VAPT code's (SGD, momentum 0.9, lr = lr_base * global
batch / 256, linear warm-up then cosine to 0, weight decay on all trainable parameters but the head
bias, cross-entropy). Every input is checked before anything is trained or written. A run is
deterministic given ``--seed``: the sampler's permutation is a function of seed and epoch, the RNG
states are saved in every checkpoint, so ``--resume`` reproduces the uninterrupted run (bitwise on
CPU in float32). See the README's "Fine-tune" section.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import io
import json
import math
import os
import random
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .checkpoint import count_parameters, load_trainable_state_dict, trainable_state_dict
from .config import VAPTConfig
from .files import OutputError, describe, write_atomic
from . import paper_data
from .backbones import load_backbone, load_weights_only
from .pretrained import write_pretrained
from .timm import apply_vapt, apply_vpt

METHODS = ("vapt", "vpt", "linear", "full")
CONFIG_FIELDS = [f for f in dataclasses.fields(VAPTConfig)]
VPT_FIELDS = ("num_prompts", "prompt_dropout", "pooled_tokens")  # the VAPTConfig fields apply_vpt takes
# Arguments that decide the numbers a run produces: --resume refuses a checkpoint whose run had
# other values (output folders, workers, logging and the like may change).
RECIPE_KEYS = (
    "dataset", "task", "train_split", "img_size", "crop_pct", "no_aug", "cache_data", "model", "model_kwargs",
    "pretrained", "pretrained_path", "num_classes", "method", "backend", "lr", "lr_base", "batch_size",
    "weight_decay", "momentum", "epochs", "warmup_epochs", "amp", "seed", "train_on_val", "skip_unreadable",
) + tuple(f.name for f in CONFIG_FIELDS)
# The official tuning protocol: learning rates per 256 images, weight decays, the final runs' seeds,
# and the learning rate at which its fast variant tunes the weight decay first.
OFFICIAL_LR_GRID = (50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05)
OFFICIAL_WD_GRID = (0.01, 0.001, 0.0001, 0.0)
OFFICIAL_SEEDS = (42, 44, 82, 100, 800)
FAST_SEARCH_LR = 5.0
SUMMARY_COLUMNS = (
    "epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr", "img_per_s", "peak_mem_mib", "epoch_s",
)
FINAL_TRAIN = ("train+val", "train")  # what the final runs of a tuning train on (--final-train)


class UsageError(Exception):
    """A bad input, found before anything was trained or written; the message says what to do."""


class NonFiniteLoss(Exception):
    """The run diverged: the training or evaluation loss, or a trainable parameter or momentum
    buffer, became NaN or Inf; raised with the epoch (and the step), before anything of that
    epoch is written."""


# ------------------------------------------------------------------------------------------------
# flag types: each checks one kind of value at the flag, so argparse names the flag and exits 2
# ------------------------------------------------------------------------------------------------


def _checked(text: str, convert: Callable[[str], Any], ok: Callable[[Any], bool], expected: str):
    try:
        value = convert(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _checked(text, int, lambda v: v >= 1, "a whole number >= 1")


def non_negative_int(text: str) -> int:
    return _checked(text, int, lambda v: v >= 0, "a whole number >= 0")


def seed_int(text: str) -> int:
    return _checked(text, int, lambda v: 0 <= v < 2**32, "a whole number from 0 to 2**32 - 1")


def positive_float(text: str) -> float:
    return _checked(text, float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def non_negative_float(text: str) -> float:
    return _checked(text, float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def momentum_float(text: str) -> float:
    return _checked(text, float, lambda v: 0 <= v < 1, "a number in [0, 1) (0.9 is the recipe's)")


def crop_fraction(text: str) -> float:
    return _checked(text, float, lambda v: 0 < v <= 1, "a fraction in (0, 1] (1.0 keeps the whole resized image)")


def _task(text: str) -> str:
    """``--task``: a known benchmark task, kept as its name (args.json and checkpoints hold plain values)."""
    try:
        return paper_data.parse_task(text).key
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def task_of(args: argparse.Namespace) -> Optional["paper_data.Task"]:
    return paper_data.parse_task(args.task) if getattr(args, "task", None) else None


def config_value(name: str, kind: type) -> Callable[[str], Any]:
    """The type of a ``VAPTConfig`` field's flag: the value converted, then checked by
    ``VAPTConfig`` itself (the one home of its ranges)."""

    def convert(text: str):
        value = _checked(text, kind, lambda v: True, {int: "a whole number", float: "a number"}.get(kind, "a value"))
        try:
            VAPTConfig(**{name: value})
        except (TypeError, ValueError) as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return value

    convert.__name__ = kind.__name__
    return convert


# ------------------------------------------------------------------------------------------------
# arguments
# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from timm.utils import ParseKwargs

    p = argparse.ArgumentParser(
        prog="vapt-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default=None, help="dataset root; for an image folder: DIR/{train,val,test}/{class}/")
    g.add_argument("--dataset", default="",
                   help="timm create_dataset name (torch/cifar100, hfds/...); empty = image folder")
    g.add_argument("--dataset-download", action="store_true", help="let torch/ datasets download")
    g.add_argument("--task", type=_task, default=None,
                   help="a benchmark task, vtab/<task> or fgvc/<data set>, under --data-dir in its shared layout "
                        "(see the README): its splits, class count and transforms")
    g.add_argument("--train-split", default="train")
    g.add_argument("--val-split", default="val")
    g.add_argument("--test-split", default=None, help="optional; scored with the best-on-val parameters at the end")
    g.add_argument("--img-size", type=positive_int, default=None, help="default: the model's")
    g.add_argument("--crop-pct", type=crop_fraction, default=None, help="eval resize/crop ratio; default: the model's")
    g.add_argument("--workers", type=non_negative_int, default=4, help="data loader processes per training process")
    g.add_argument("--no-aug", action="store_true", help="eval transforms for training too")
    g.add_argument("--cache-data", action="store_true",
                   help="decode and transform every split once and keep the tensors on the run's device (GPU memory on "
                        "a GPU; needs --no-aug)")
    g.add_argument("--skip-unreadable", action="store_true",
                   help="leave out images that cannot be decoded (counted in result.json) instead of stopping")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="vit_base_patch16_224")
    g.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, help="k=v ... for timm.create_model")
    g.add_argument("--pretrained", action="store_true", help="load the model's pretrained weights (timm/HF hub)")
    g.add_argument("--pretrained-path", default=None, help="local weights file loaded as the pretrained weights")
    g.add_argument("--num-classes", type=positive_int, default=None, help="default: the dataset's")

    g = p.add_argument_group("method")
    g.add_argument("--method", choices=METHODS, default="vapt",
                   help="vapt; vpt (VPT-deep, apply_vpt); linear (head only); full (every parameter)")
    g.add_argument("--backend", default="auto", help="vapt_kernels op backend")
    for f in CONFIG_FIELDS:
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            g.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"VAPTConfig.{f.name} (default {f.default})")
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            g.add_argument(flag, dest=f.name, type=config_value(f.name, kind), default=None,
                           help=f"VAPTConfig.{f.name} (default {f.default})")

    g = p.add_argument_group("recipe")
    g.add_argument("--epochs", type=positive_int, default=100)
    g.add_argument("--warmup-epochs", type=non_negative_float, default=10,
                   help="linear warm-up from 0, then cosine to 0")
    g.add_argument("--batch-size", type=positive_int, default=64, help="global batch, split over the processes")
    g.add_argument("--lr-base", type=positive_float, default=0.1, help="learning rate for a global batch of 256")
    g.add_argument("--lr", type=positive_float, default=None, help="absolute learning rate (overrides --lr-base)")
    g.add_argument("--weight-decay", type=non_negative_float, default=1e-4)
    g.add_argument("--momentum", type=momentum_float, default=0.9)
    g.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    g.add_argument("--seed", type=seed_int, default=42)
    g.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard per block, then the root); needs torchrun")
    g.add_argument("--train-on-val", action="store_true", help=argparse.SUPPRESS)  # train on train+val (tuning)

    g = p.add_argument_group("output and checkpoints")
    g.add_argument("--output", default=None, help="folder for args.json, summary.csv, last.pt, best.pt, result.json")
    g.add_argument("--checkpoint-every", type=non_negative_int, default=0,
                   help="also keep checkpoint-{epoch}.pt every N epochs")
    g.add_argument("--resume", default=None, help="continue from a checkpoint of this run")
    g.add_argument("--overwrite", action="store_true",
                   help="delete a non-empty --output folder (all of it) before the run writes there; without it "
                        "such a folder is refused unless --resume continues the run whose checkpoint it holds")
    g.add_argument("--eval-only", action="store_true", help="score --checkpoint on the val (or --test-split) split")
    g.add_argument("--checkpoint", default=None, help="checkpoint for --eval-only")
    g.add_argument("--plot", action="store_true", help="write the curves as PNG (needs matplotlib)")
    g.add_argument("--log-interval", type=positive_int, default=50, help="steps between progress updates (host syncs)")

    g = p.add_argument_group("tuning (VTAB protocol)")
    g.add_argument("--lr-grid", type=positive_float, nargs="+", default=None,
                   help="learning rates per 256 images (as --lr-base) to try")
    g.add_argument("--wd-grid", type=non_negative_float, nargs="+", default=None, help="weight decays to try")
    g.add_argument("--seeds", type=seed_int, nargs="+", default=None,
                   help="seeds of the final train+val runs (default: 42)")
    g.add_argument("--official-grid", action="store_true",
                   help="the official protocol's grid: --lr-grid " + " ".join(f"{v:g}" for v in OFFICIAL_LR_GRID)
                        + " --wd-grid " + " ".join(f"{v:g}" for v in OFFICIAL_WD_GRID) + " --seeds "
                        + " ".join(map(str, OFFICIAL_SEEDS)) + " (each unless given)")
    g.add_argument("--final-train", choices=FINAL_TRAIN, default=None,
                   help="what the final runs train on: train+val (their last epoch scored on test) or train (the "
                        "epoch best on val scored); default: the benchmark's protocol, train for fgvc/ tasks, "
                        "train+val otherwise")
    g.add_argument("--fast-search", action="store_true",
                   help=f"the official fast variant: every --wd-grid value at lr-base {FAST_SEARCH_LR:g} first, then "
                        "every --lr-grid value at the best weight decay (instead of every pair)")
    return p


def vapt_config(args: argparse.Namespace) -> Optional[VAPTConfig]:
    """The VAPTConfig of the flags (None for linear/full); vpt keeps VPT-deep's fixed fields."""
    given = {f.name: getattr(args, f.name) for f in CONFIG_FIELDS if getattr(args, f.name, None) is not None}
    if args.method in ("linear", "full"):
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise UsageError(f"--method {args.method} has no prompts; remove {flags}")
        return None
    if args.method == "vpt":
        extra = sorted(set(given) - set(VPT_FIELDS))
        if extra:
            flags = ", ".join("--" + e.replace("_", "-") for e in extra)
            raise UsageError(
                f"--method vpt takes --num-prompts, --prompt-dropout and --pooled-tokens only; remove {flags}"
            )
        return None
    try:
        return VAPTConfig(**given)
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None


# ------------------------------------------------------------------------------------------------
# distributed
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(args: argparse.Namespace) -> Dist:
    """Reads torchrun's environment; one process without it. ``--fsdp`` needs torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.fsdp and "RANK" not in os.environ:
        raise UsageError(
            "--fsdp shards the model over processes: launch with torchrun --nproc-per-node N -m vapt_kernels.train"
        )
    if world == 1 and not dist.is_initialized():
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return Dist(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)


def _all_reduce(t: torch.Tensor, d: Dist, op=None) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------


def check_folder_splits(args: argparse.Namespace, splits: list[str]) -> None:
    """An image-folder dataset needs DATA_DIR/<split>/ for every split; say what is there if not.
    A benchmark task (``--task``) has its split files checked line by line instead."""
    task = task_of(args)
    if task is not None:
        if args.dataset:
            raise UsageError(f"--task {task.key} reads its own layout under --data-dir: drop --dataset")
        if not args.data_dir:
            raise UsageError(f"--task {task.key} needs --data-dir ROOT, the folder that holds its data")
        if args.skip_unreadable:
            raise UsageError(f"--skip-unreadable applies to image folders; --task {task.key} lists its images: "
                             "fix or remove the damaged ones")  # fmt: skip
        for split in splits:
            try:
                samples = paper_data.listed_images(task, Path(args.data_dir), split)
            except paper_data.DataError as error:
                raise UsageError(f"--data-dir {args.data_dir}: {error}") from None
            # A listed image that cannot be decoded would stop the run mid-epoch: found here first.
            bad = dict(undecodable_images(tuple(str(path) for _, path, _ in samples)))
            if bad:
                listed = [f"{where}: {path} ({bad[str(path)]})" for where, path, _ in samples if str(path) in bad]
                shown = "; ".join(listed[:5]) + (" ..." if len(listed) > 5 else "")
                raise UsageError(f"--data-dir {args.data_dir}: {len(bad)} listed image(s) of {task.key}'s split "
                                 f"'{split}' cannot be decoded: {shown}; replace them, or remove their lines")
        return
    if args.dataset:
        return
    if not args.data_dir:
        raise UsageError(
            "--data-dir is needed: an image folder with DIR/{train,val}/<class>/ images, or a --dataset root"
        )
    root = Path(args.data_dir)
    if not root.is_dir():
        expected = ", ".join(s + "/" for s in splits)
        raise UsageError(f"--data-dir {root}: no such folder; expected a folder with {expected} sub-folders")
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    for split in splits:
        if not (root / split).is_dir():
            raise UsageError(
                f"--data-dir {root} has no '{split}/' split folder (expected {', '.join(s + '/' for s in splits)}; "
                f"found: {', '.join(found) or 'no sub-folders'}); choose --train-split/--val-split/--test-split "
                f"from what is there, or write the folder with scripts/digits_to_folder.py"
            )
    # The class of an image is its folder, found as timm's image-folder reader finds it; every split
    # is read with the train split's classes, so an image of a class without training images would
    # be dropped from the scores without a word: refused here, naming the classes.
    from timm.data.readers.reader_image_folder import find_images_and_targets

    def classes_with_images(split: str) -> set[str]:
        _, found_classes = find_images_and_targets(str(root / split))
        return set(found_classes)

    trained = classes_with_images(splits[0])
    if not trained:
        raise UsageError(f"--data-dir {root}: split '{splits[0]}/' holds no images in class folders")
    for split in splits[1:]:
        extra = sorted(classes_with_images(split) - trained)
        if extra:
            raise UsageError(
                f"--data-dir {root}: split '{split}/' has images of classes that '{splits[0]}/' has no images of: "
                f"{', '.join(extra)}; every class must have training images (add them, or remove those classes)"
            )
    # timm's dataset replaces an image it cannot decode by the next one, with a log line only: the
    # scores would count a neighbour twice. Every image is decoded here first.
    for split in splits:
        bad = unreadable_images(str(root / split))
        if bad and not args.skip_unreadable:
            shown = "; ".join(f"{path} ({why})" for path, why in bad[:5]) + (" ..." if len(bad) > 5 else "")
            raise UsageError(
                f"--data-dir {root}: {len(bad)} image(s) of split '{split}/' cannot be decoded: {shown}; replace or "
                "remove them, or pass --skip-unreadable to leave them out (counted in result.json)"
            )
        if len(bad) == len(find_images_and_targets(str(root / split))[0]):
            raise UsageError(f"--data-dir {root}: no image of split '{split}/' can be decoded ({bad[0][1]}, ...)")


@functools.lru_cache(maxsize=None)
def undecodable_images(paths: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """:func:`vapt_kernels.paper_data.undecodable`, cached: the tuning protocol checks the same
    splits once per run."""
    return tuple(paper_data.undecodable(list(paths)))


def unreadable_images(folder: str) -> tuple[tuple[str, str], ...]:
    """Every image of an image-folder split that PIL cannot decode, as ``(path, why)``, in the
    order timm's reader lists them."""
    from timm.data.readers.reader_image_folder import find_images_and_targets

    return undecodable_images(tuple(path for path, _ in find_images_and_targets(folder)[0]))


def make_transform(args: argparse.Namespace, model: nn.Module, training: bool):
    from timm.data import create_transform, resolve_data_config

    task = task_of(args)
    if task is not None:  # the benchmark's own transforms, the backbone's normalisation
        cfg = resolve_data_config({}, model=model)
        built = getattr(getattr(model, "patch_embed", None), "img_size", None)
        size = args.img_size or (built[-1] if built else cfg["input_size"][-1])
        return paper_data.task_transform(task, training and not args.no_aug, size, cfg["mean"], cfg["std"])
    overrides: dict[str, Any] = {}
    if args.img_size:
        overrides["input_size"] = (3, args.img_size, args.img_size)
    elif hasattr(model, "patch_embed") and getattr(model.patch_embed, "img_size", None):
        overrides["input_size"] = (3, *model.patch_embed.img_size)
    if args.crop_pct is not None:
        overrides["crop_pct"] = args.crop_pct
    cfg = resolve_data_config(overrides, model=model)
    return create_transform(**cfg, is_training=training and not args.no_aug)


class CachedSplit(torch.utils.data.Dataset):
    """A split decoded and transformed once (``--cache-data``), kept as two tensors on the run's
    device, images ``(n, 3, h, w)`` and labels ``(n,)``: on a GPU the images never cross the bus
    again and a batch is one gather (``__getitems__``, which the DataLoader calls with a batch's
    indices), so the run is bound by the model, not the loader."""

    def __init__(self, dataset, device: torch.device):
        xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
        self.images = torch.stack(xs).to(device)
        self.labels = torch.as_tensor(ys).to(device)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        at = torch.as_tensor(indices, device=self.labels.device)
        return [self.images[at], self.labels[at]]


class _Indexed(torch.utils.data.Dataset):
    """``base[indices[i]]`` with a validity flag: the padded tail of an evaluation shard counts 0.
    Batches come from ``__getitems__`` (one gather from a :class:`CachedSplit`)."""

    def __init__(self, base, indices: list[int], valid: int):
        self.base, self.indices, self.valid = base, indices, valid

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        x, y = self.base[self.indices[i]]
        return x, y, int(i < self.valid)

    def __getitems__(self, positions: list[int]) -> list[torch.Tensor]:
        if not isinstance(self.base, CachedSplit):
            return torch.utils.data.default_collate([self[i] for i in positions])
        x, y = self.base.__getitems__([self.indices[i] for i in positions])
        return [x, y, torch.as_tensor([int(i < self.valid) for i in positions], device=y.device)]


def _loader_options(ds, args, d: Dist) -> dict:
    """A cached split is read in the main process (its tensors may live on the GPU) and batched by
    its own ``__getitems__``; any other split is decoded by ``--workers`` processes."""
    if isinstance(ds, CachedSplit) or isinstance(getattr(ds, "base", None), CachedSplit):
        return {"num_workers": 0, "collate_fn": _as_batch}
    return {"num_workers": args.workers, "pin_memory": d.device.type == "cuda",
            "collate_fn": _as_batch if isinstance(ds, _Indexed) else None}  # fmt: skip


def _as_batch(batch):
    return batch  # already collated by the dataset's __getitems__


def create_split(args: argparse.Namespace, split: str, transform, class_map=None):
    from timm.data import create_dataset

    task = task_of(args)
    if task is not None:
        return paper_data.open_split(task, Path(args.data_dir), split, transform)
    kwargs = {}
    if class_map is not None and not args.dataset:
        kwargs["class_map"] = class_map
    ds = create_dataset(
        args.dataset, root=args.data_dir, split=split, download=args.dataset_download, transform=transform,
        is_training=False, batch_size=1, **kwargs,
    )
    if args.skip_unreadable and not args.dataset and not args.task:
        bad = {path for path, _ in unreadable_images(str(Path(args.data_dir) / split))}
        ds.reader.samples = [sample for sample in ds.reader.samples if sample[0] not in bad]
    return ds


def class_to_idx(ds) -> Optional[dict]:
    reader = getattr(ds, "reader", None)
    if reader is not None and getattr(reader, "class_to_idx", None):
        return dict(reader.class_to_idx)
    if getattr(ds, "class_to_idx", None):
        return dict(ds.class_to_idx)
    if getattr(ds, "classes", None):
        return {c: i for i, c in enumerate(ds.classes)}
    return None


def load_data(args: argparse.Namespace, model: nn.Module, want_test: bool, device: torch.device) -> dict[str, Any]:
    """The train, val (and test) datasets with their transforms, classes checked; with
    ``--cache-data`` each one a :class:`CachedSplit` on ``device``."""
    train_tf, eval_tf = make_transform(args, model, True), make_transform(args, model, False)
    train = create_split(args, args.train_split, train_tf)
    classes = class_to_idx(train)
    out = {"train": train, "classes": classes}
    for key, split in (("val", args.val_split), ("test", args.test_split if want_test else None)):
        if split is None:
            continue
        out[key] = create_split(args, split, eval_tf, class_map=classes)
    if args.train_on_val:
        val_for_training = create_split(args, args.val_split, train_tf, class_map=classes)
        out["train"] = torch.utils.data.ConcatDataset([train, val_for_training])
    if args.cache_data:
        for key in ("train", "val", "test"):
            if key in out:
                out[key] = CachedSplit(out[key], device)
    for key in ("train", "val", "test"):
        if key in out and len(out[key]) == 0:
            raise UsageError(f"the {key} split is empty")
    return out


def train_loader(ds, args, d: Dist, per_rank: int):
    from torch.utils.data.distributed import DistributedSampler

    # The permutation depends on seed and epoch only (set_epoch), so every world size and a resumed
    # run see the same global batches; drop_last keeps every global batch full and equal.
    sampler = DistributedSampler(ds, num_replicas=d.world, rank=d.rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=per_rank, sampler=sampler, drop_last=True, **_loader_options(ds, args, d)
    )  # workers restart each epoch, seeded from the main RNG: a resumed run draws the same augmentations
    return loader, sampler


def eval_loader(ds, args, d: Dist, per_rank: int):
    # Every rank gets ceil(N / world) samples (the same number of steps, as FSDP needs); the padded
    # tail repeats sample 0 and is flagged invalid, so the sums count each sample exactly once.
    n = len(ds)
    mine = list(range(d.rank, n, d.world))
    size = -(-n // d.world)
    shard = _Indexed(ds, mine + [0] * (size - len(mine)), len(mine))
    return torch.utils.data.DataLoader(shard, batch_size=per_rank, shuffle=False, **_loader_options(shard, args, d))


# ------------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------------


def create_model(args: argparse.Namespace, num_classes: int, weights: bool = True) -> nn.Module:
    """The timm model; ``weights=False`` builds it without loading pretrained weights (for its data
    config). ``--pretrained-path`` goes through :func:`vapt_kernels.backbones.load_backbone`, which
    recognises the paper's files and builds the model the paper fine-tunes on each."""
    import timm

    kwargs = dict(args.model_kwargs)
    if args.img_size and "img_size" not in kwargs:
        kwargs["img_size"] = args.img_size
    if args.pretrained_path:
        _check_pretrained_path(Path(args.pretrained_path))
    if ":" not in args.model and not timm.is_model(args.model.split(".")[0]):
        raise UsageError(f"--model {args.model}: timm has no such model (timm.list_models('vit_*') lists the ViTs)")
    try:
        if args.pretrained_path and weights:
            model, report = load_backbone(args.pretrained_path, args.model, num_classes=num_classes, **kwargs)
            if os.environ.get("RANK", "0") == "0":
                print(report, flush=True)
        else:
            pretrained = args.pretrained and weights
            model = timm.create_model(args.model, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except TypeError as error:
        if "unexpected keyword argument" in str(error):
            raise UsageError(f"--model-kwargs: {args.model} does not take {str(error).split('argument')[-1].strip()} "
                             f"({error}); use the model class's constructor arguments") from None
        raise
    except ValueError as error:
        if args.pretrained_path and str(error).startswith("load_backbone: "):
            raise UsageError(f"--pretrained-path {str(error).removeprefix('load_backbone: ')}") from None
        raise
    except Exception as error:
        if args.pretrained and weights:
            raise UsageError(
                f"--pretrained: could not get {args.model}'s weights ({type(error).__name__}: {error}); offline, "
                f"download them elsewhere and pass the file with --pretrained-path FILE"
            ) from None
        raise
    return model.float()


def _check_pretrained_path(path: Path) -> None:
    """``--pretrained-path`` names a weights file, not a folder (a saved task); what the file
    holds, :func:`vapt_kernels.backbones.load_backbone` checks as it reads it (once)."""
    from .pretrained import CONFIG_FILE

    flag = f"--pretrained-path {path}"
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        raise UsageError(
            f"{flag}: a saved VAPT task (prompts and head), not backbone weights; load it onto its backbone with "
            "vapt_kernels.from_pretrained, or pass the backbone's weights here"
        )
    if not path.is_file():
        raise UsageError(f"{flag}: no such file")


def _read_weights_only(path: Path, flag: str) -> Any:
    """:func:`vapt_kernels.backbones.load_weights_only`, a refusal naming ``flag`` and the file."""
    what = "a vapt-train checkpoint" if flag.startswith(("--resume", "--checkpoint")) else "a weights file"
    try:
        return load_weights_only(path)
    except ValueError as error:
        raise UsageError(f"{flag}: not {what}: {error}") from None


def prepare(model: nn.Module, args: argparse.Namespace, config: Optional[VAPTConfig]) -> nn.Module:
    """The model set up for ``--method``; an option that does not fit the model (apply_vapt's
    TypeError/ValueError, raised before the model is changed) is a :class:`UsageError` naming the
    flags it involves."""
    try:
        if args.method == "vapt":
            return apply_vapt(model, config, backend=args.backend)
        if args.method == "vpt":
            kw = {k: getattr(args, k) for k in VPT_FIELDS if getattr(args, k) is not None}
            return apply_vpt(model, backend=args.backend, **kw)
    except (TypeError, ValueError) as error:
        names = [f.name for f in CONFIG_FIELDS if f.name in str(error)] + ["backend"] * ("backend" in str(error))
        given = {n: getattr(config, n, None) if getattr(args, n, None) is None else getattr(args, n) for n in names}
        flags = ", ".join(f"--{n.replace('_', '-')} {v}" for n, v in given.items()) or f"--method {args.method}"
        raise UsageError(f"{error} (set by {flags}); change them, or the model (--model, --model-kwargs)") from None
    if args.method == "linear":
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.get_classifier().parameters():
            p.requires_grad_(True)
    return model


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain CPU tensor of a (possibly FSDP2-sharded DTensor) value; a collective under FSDP."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().cpu().clone()


def model_state(model: nn.Module, args) -> dict[str, torch.Tensor]:
    if args.method == "full":
        return {k: _full(v) for k, v in model.state_dict().items()}
    if hasattr(model, "vapt") and not any(hasattr(p, "full_tensor") for p in model.parameters()):
        return {k: v.cpu() for k, v in trainable_state_dict(model).items()}  # vk.trainable_state_dict
    return {n: _full(p) for n, p in trainable(model).items()}


def _local(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` (full) in the layout of ``like``: a shard of it where ``like`` is a DTensor."""
    value = value.to(like.device, like.dtype)
    if hasattr(like, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value, like.device_mesh, like.placements)
    return value


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], args) -> None:
    params = trainable(model)
    sharded = any(hasattr(p, "device_mesh") for p in params.values())
    if args.method == "full":
        model.load_state_dict(state, strict=True)
    elif hasattr(model, "vapt") and not sharded:
        load_trainable_state_dict(model, state)  # vk.load_trainable_state_dict: all or nothing
    else:
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or unexpected:
            raise UsageError(f"checkpoint does not fit the model: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(_local(state[n], p))


def check_classes(state: dict[str, torch.Tensor], model: nn.Module, path: str) -> None:
    """The checkpoint's head must have the model's class count."""
    head = model.get_classifier()
    names = [n for n, p in model.named_parameters() if any(p is q for q in head.parameters())]
    for n in names:
        if n in state and tuple(state[n].shape) != tuple(dict(model.named_parameters())[n].shape):
            raise UsageError(
                f"{path}: its head {n} has shape {tuple(state[n].shape)} ({state[n].shape[0]} classes), the model "
                f"{tuple(dict(model.named_parameters())[n].shape)}; pass --num-classes {state[n].shape[0]} or the "
                f"dataset it was trained on"
            )


# ------------------------------------------------------------------------------------------------
# recipe
# ------------------------------------------------------------------------------------------------


def learning_rate(args: argparse.Namespace) -> float:
    return args.lr if args.lr is not None else args.lr_base * args.batch_size / 256


def make_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    head_bias = {id(p) for n, p in model.get_classifier().named_parameters() if n.endswith("bias")}
    decay = [p for p in trainable(model).values() if id(p) not in head_bias]
    no_decay = [p for p in trainable(model).values() if id(p) in head_bias]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.SGD(groups, lr=learning_rate(args), momentum=args.momentum)
    optimizer.param_names = {id(p): n for n, p in trainable(model).items()}  # FSDP2 swaps module parameters
    return optimizer


def make_scheduler(optimizer, args, steps_per_epoch: int):
    """Per step: linear from 0 over the warm-up, then cosine to 0 at the last step."""
    total = max(1, args.epochs * steps_per_epoch)
    warm = min(total, int(round(args.warmup_epochs * steps_per_epoch)))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_state(optimizer, model: nn.Module) -> dict:
    """Momentum buffers by parameter name, gathered (world-size independent), and the hyper-parameters."""
    names = optimizer.param_names
    state = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                state[names[id(p)]] = _full(buf)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return {"momentum_buffer": state, "param_groups": groups}


def load_optimizer_state(optimizer, model: nn.Module, saved: dict) -> None:
    params = {n: p for group in optimizer.param_groups for p in group["params"] for n in [optimizer.param_names[id(p)]]}
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
        group.update(saved_group)
    for name, buf in saved["momentum_buffer"].items():
        optimizer.state[params[name]]["momentum_buffer"] = _local(buf, params[name]).clone()


def rng_state() -> dict:
    """Every generator's state as tensors and plain containers, which ``torch.load(...,
    weights_only=True)`` reads without unpickling objects: NumPy's Mersenne Twister key as an
    int64 tensor (its other fields are numbers), Python's as the tuple of ints it is."""
    kind, key, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"kind": str(kind), "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode()))


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save through :func:`write_atomic`: never a truncated file."""
    write_atomic(path, lambda f: torch.save(obj, f))


def _all_finite(tensors: dict) -> bool:
    """No NaN or Inf in the floating-point tensors among ``tensors``' values."""
    values = tensors.values() if isinstance(tensors, dict) else ()
    return all(bool(torch.isfinite(t).all()) for t in values if torch.is_tensor(t) and t.is_floating_point())


def _json_text(obj: Any) -> str:
    """Strict JSON (``allow_nan=False``): a NaN or Inf number becomes null."""

    def finite(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(x) for x in v]
        return v

    return json.dumps(finite(obj), indent=2, allow_nan=False) + "\n"


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ------------------------------------------------------------------------------------------------
# one training run
# ------------------------------------------------------------------------------------------------


def evaluate(model: nn.Module, loader, d: Dist, amp: Optional[torch.dtype]) -> dict[str, float]:
    """Loss, top-1 and top-5 (in %) over the whole split, each sample counted once over all ranks."""
    was = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=d.device)  # loss, top1, top5, count
    with torch.no_grad(), torch.autocast(d.device.type, dtype=amp, enabled=amp is not None):
        for x, y, valid in loader:
            x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
            valid = valid.to(d.device, non_blocking=True).double()
            logits = model(x).float()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit = top == y[:, None]
            sums += torch.stack([
                (F.cross_entropy(logits, y, reduction="none").double() * valid).sum(),
                (hit[:, 0].double() * valid).sum(), (hit.any(1).double() * valid).sum(), valid.sum(),
            ])
    _all_reduce(sums, d)
    if hasattr(model, "reshard"):  # FSDP2 keeps the root's parameters gathered after a forward
        model.reshard()
    model.train(was)
    loss, top1, top5, n = sums.tolist()
    return {"loss": loss / max(n, 1), "top1": 100 * top1 / max(n, 1), "top5": 100 * top5 / max(n, 1), "count": int(n)}


def _amp_dtype(args) -> Optional[torch.dtype]:
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]


def wrap(model: nn.Module, args, d: Dist) -> nn.Module:
    if d.world == 1:
        return model
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


@dataclasses.dataclass
class CheckedRun:
    """A run whose inputs are all checked (:func:`check_args`, :func:`build_run`); nothing is
    written yet.

    Args:
        args: the run's arguments.
        resume: the checkpoint ``--resume`` continues from, or None.
        data: the datasets (:func:`load_data`).
        model: the model, prepared for the method, on the run's device.
        counts: its parameter counts (:func:`_count`).
        per_rank: images per step in each process.
        amp: the autocast dtype, or None.
    """

    args: argparse.Namespace
    resume: Optional[dict]
    data: dict[str, Any]
    model: nn.Module
    counts: dict
    per_rank: int
    amp: Optional[torch.dtype]

    @property
    def want_test(self) -> bool:
        return self.args.test_split is not None


@dataclasses.dataclass
class Trainer:
    """What trains a :class:`CheckedRun` (:func:`make_trainer`): the model as the processes run it
    (DDP, FSDP2 or itself), the loaders, the optimizer, the schedule and the loss scaler."""

    wrapped: nn.Module
    loader: torch.utils.data.DataLoader
    sampler: Any
    val_loader: torch.utils.data.DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler


@dataclasses.dataclass
class Progress:
    """Where a run stands: one summary row per finished epoch, the best epoch on val so far (its
    top-1, number and trainable state) and the last finished epoch (0 before the first)."""

    rows: list[dict] = dataclasses.field(default_factory=list)
    best: dict = dataclasses.field(default_factory=lambda: {"top1": -1.0, "epoch": 0, "state": None})
    epoch: int = 0


def check_args(args: argparse.Namespace, d: Dist) -> Optional[dict]:
    """Check the flags, the split folders and a ``--resume`` checkpoint's settings against the
    flags; returns that checkpoint (or None). Builds no model, writes nothing.

    Raises:
        UsageError: the first problem found.
    """
    vapt_config(args)
    lr = learning_rate(args)
    if not 0 < lr < math.inf:
        raise UsageError(
            f"--lr-base {args.lr_base:g} x --batch-size {args.batch_size} / 256 gives the learning rate {lr:g}, which "
            "is not a finite number > 0; pass a smaller --lr-base (or an absolute --lr)"
        )
    if args.batch_size % d.world:
        raise UsageError(f"--batch-size {args.batch_size} (global) is not divisible by the {d.world} processes")
    if args.cache_data and not args.no_aug:
        raise UsageError(
            "--cache-data keeps one transformed copy of every image: add --no-aug "
            "(random augmentation needs decoding each epoch)"
        )
    if not args.output and not args.eval_only:
        raise UsageError(
            "--output DIR is needed: the run writes args.json, summary.csv, last.pt, best.pt and result.json there"
        )
    if args.output:
        check_output(args)
    check_folder_splits(args, [s for s in (args.train_split, args.val_split, args.test_split) if s])
    resume = _load_checkpoint(args.resume, "--resume") if args.resume else None
    if resume is not None:
        listed = setting_differences(resume["args"], vars(args), RECIPE_KEYS)
        if listed:
            raise UsageError(
                f"--resume {args.resume}: that run had other settings: {listed}; "
                "resume with the same flags (or start a new run)"
            )
        if not _all_finite(resume["model"]):
            raise UsageError(
                f"--resume {args.resume}: its parameters hold NaN/Inf values; resume from an earlier checkpoint"
            )
    return resume


def setting_differences(there: dict, here: dict, keys) -> str:
    """The settings among ``keys`` whose values differ between what a file recorded (``there``)
    and this command's (``here``), as ``--flag X there, Y here; ...``; "" when none does."""
    differ = [k for k in keys if there.get(k) != here.get(k)]
    return "; ".join(f"--{k.replace('_', '-')} {there.get(k)!r} there, {here.get(k)!r} here" for k in differ)


def check_output(args: argparse.Namespace) -> None:
    """``--output`` may be missing or empty; a folder that holds files is taken only to continue
    the run whose ``--resume`` checkpoint lies in it, or with ``--overwrite`` (which deletes it
    whole in :func:`create_output`). Reads the folder, writes nothing.

    Raises:
        UsageError: the output folder would mix this run's files with another run's.
    """
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {out} is a file, not a folder; choose a folder for the run's files")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    inside = bool(args.resume) and out.resolve() in Path(args.resume).resolve().parents
    if args.overwrite and inside:
        raise UsageError(
            f"--overwrite would delete --output {out} with the --resume checkpoint {args.resume} in it; drop "
            "--overwrite to continue that run there, or choose another --output"
        )
    if held and not args.overwrite and not inside:
        shown = ", ".join(held[:6]) + (", ..." if len(held) > 6 else "")
        resume = f"continue its run with --resume {out / 'last.pt'}, " if "last.pt" in held else ""
        raise UsageError(
            f"--output {out} already holds files ({shown}); choose a new folder, {resume}or add --overwrite to delete "
            "the folder and its files first"
        )


def build_run(
    args: argparse.Namespace, d: Dist, resume: Optional[dict], data: Optional[dict] = None
) -> CheckedRun:
    """The model and the data of a run whose flags :func:`check_args` accepted, checked against
    each other (class count, a resumed checkpoint's head, enough training images); writes nothing.

    Args:
        args: the run's arguments.
        d: the processes.
        resume: what :func:`check_args` returned.
        data: the datasets, if already loaded (:func:`load_data`); else they are loaded here.

    Raises:
        UsageError: the first problem found.
    """
    torch.manual_seed(args.seed)  # the same initial prompts and head in every process
    probe = create_model(args, num_classes=args.num_classes or 1, weights=False)
    if data is None:
        data = load_data(args, probe, args.test_split is not None, d.device)
    num_classes = args.num_classes or (len(data["classes"]) if data["classes"] else None)
    if num_classes is None:
        raise UsageError(f"--dataset {args.dataset}: cannot tell its class count; pass --num-classes")
    if data["classes"] and num_classes < len(data["classes"]):
        raise UsageError(f"--num-classes {num_classes} is less than the dataset's {len(data['classes'])} classes")
    torch.manual_seed(args.seed)
    model = prepare(create_model(args, num_classes), args, vapt_config(args)).to(d.device)
    if resume is not None:
        check_classes(resume["model"], model, args.resume)
    counts = _count(model)
    if len(data["train"]) < args.batch_size:
        raise UsageError(
            f"the train split has {len(data['train'])} images, fewer than one --batch-size {args.batch_size}"
        )
    return CheckedRun(args, resume, data, model, counts, args.batch_size // d.world, _amp_dtype(args))


def create_output(run: CheckedRun, d: Dist) -> Path:
    """The output folder with the run's ``args.json`` (the main process writes them): the run's
    first write, once every input is checked. With ``--overwrite`` the folder is first deleted
    whole (:func:`clear_folder`)."""
    out = Path(run.args.output)
    if d.main:
        if run.args.overwrite and out.is_dir():
            clear_folder(out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(f"cannot create the output folder {out}: {describe(error)}") from None
        write_text_atomic(out / "args.json", json.dumps(vars(run.args), indent=2, default=str) + "\n")
    return out


def clear_folder(out: Path) -> None:
    """Delete ``out`` and everything in it: renamed aside first, so the folder is never a mix of
    the old run's files and the new one's, then removed."""
    aside = out.with_name(f".{out.name}.overwritten-{os.getpid()}")
    try:
        os.rename(out, aside)
        shutil.rmtree(aside)
    except OSError as error:
        where = error.filename or out
        raise OutputError(f"--overwrite: cannot delete {where}: {describe(error)}") from None


def make_trainer(run: CheckedRun, d: Dist) -> Trainer:
    """Seed this process's random streams (dropout masks and augmentation differ per process), wrap
    the model for the processes and build the loaders, the optimizer, the schedule and the scaler."""
    args = run.args
    torch.manual_seed(args.seed + d.rank)
    np.random.seed((args.seed + d.rank) % 2**32)
    random.seed(args.seed + d.rank)
    wrapped = wrap(run.model, args, d)
    loader, sampler = train_loader(run.data["train"], args, d, run.per_rank)
    val_loader = eval_loader(run.data["val"], args, d, run.per_rank)
    optimizer = make_optimizer(run.model, args)
    scheduler = make_scheduler(optimizer, args, len(loader))
    scaler = torch.amp.GradScaler(d.device.type, enabled=args.amp == "fp16")
    return Trainer(wrapped, loader, sampler, val_loader, optimizer, scheduler, scaler)


def restore(run: CheckedRun, trainer: Trainer, d: Dist) -> Progress:
    """A fresh :class:`Progress`, or the resumed checkpoint's: its parameters, optimizer, schedule,
    scaler and this process's random state are loaded back."""
    if run.resume is None:
        return Progress()
    resume, args = run.resume, run.args
    load_model_state(run.model, resume["model"], args)
    load_optimizer_state(trainer.optimizer, run.model, resume["optimizer"])
    trainer.scheduler.load_state_dict(resume["scheduler"])
    if resume.get("scaler"):
        trainer.scaler.load_state_dict(resume["scaler"])
    rng = resume["rng"]
    set_rng_state(rng[d.rank] if d.rank < len(rng) else rng[0])
    return Progress(list(resume["summary"]), dict(resume["best"]), resume["epoch"])


def train_epochs(run: CheckedRun, trainer: Trainer, progress: Progress, out: Path, d: Dist, quiet: bool) -> None:
    """Train the epochs after ``progress.epoch``; after each, evaluate on val, update ``progress``
    and save the checkpoints and the summary (:func:`save_epoch`)."""
    args, model = run.args, run.model
    trainer.wrapped.train()
    for epoch in range(progress.epoch + 1, args.epochs + 1):
        trainer.sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        if d.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d.device)
        train_loss, lr = _train_epoch(
            trainer.wrapped, trainer.loader, trainer.optimizer, trainer.scheduler, trainer.scaler, run.amp, d, epoch,
            args, quiet,
        )
        if d.device.type == "cuda":
            torch.cuda.synchronize(d.device)
        seconds = time.perf_counter() - t0
        metrics = evaluate(trainer.wrapped, trainer.val_loader, d, run.amp)
        _check_eval_loss(metrics, f"the val loss at epoch {epoch}")
        row = {
            "epoch": epoch, "train_loss": train_loss, "eval_loss": metrics["loss"], "eval_top1": metrics["top1"],
            "eval_top5": metrics["top5"], "lr": lr,
            "img_per_s": len(trainer.loader) * args.batch_size / seconds, "peak_mem_mib": peak_memory_mib(d.device),
        }
        progress.rows.append(row)
        progress.epoch = epoch
        improved = metrics["top1"] > progress.best["top1"]
        if improved:
            progress.best = {"top1": metrics["top1"], "epoch": epoch, "state": model_state(model, args)}
        row["epoch_s"] = time.perf_counter() - t0  # training, evaluation and the best state, not the files
        save_epoch(run, trainer, progress, improved, out, d)
        if d.main and not quiet:
            print(
                f"epoch {epoch}/{args.epochs}  train_loss {train_loss:.4f}  eval_loss {metrics['loss']:.4f}  "
                f"top1 {metrics['top1']:.2f}  top5 {metrics['top5']:.2f}  lr {row['lr']:.4g}  "
                f"{row['img_per_s']:.1f} img/s  peak {row['peak_mem_mib']:.0f} MiB", flush=True,
            )


def save_epoch(run: CheckedRun, trainer: Trainer, progress: Progress, improved: bool, out: Path, d: Dist) -> None:
    """The checkpoint of the epoch just finished as ``last.pt`` (also ``best.pt`` when it
    ``improved`` on val, ``checkpoint-<epoch>.pt`` every ``--checkpoint-every`` epochs) and the
    summary so far. Every process takes part in gathering the state; the main one writes."""
    args, model, epoch = run.args, run.model, progress.epoch
    ckpt = {
        "model": model_state(model, args), "optimizer": optimizer_state(trainer.optimizer, model),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict() if trainer.scaler.is_enabled() else None,
        "epoch": epoch, "rng": _gather_rng(d),
        "config": dataclasses.asdict(model.vapt.config) if hasattr(model, "vapt") else None,
        "args": vars(args), "summary": progress.rows, "best": progress.best,
    }
    if not (_all_finite(ckpt["model"]) and _all_finite(ckpt["optimizer"]["momentum_buffer"])):
        raise NonFiniteLoss(
            f"the trainable parameters or their momentum hold NaN/Inf values after epoch {epoch}; nothing of this "
            "epoch is written, the last checkpoint (last.pt of the previous epoch) is untouched. Lower --lr, or use "
            "--amp bf16/none instead of fp16"
        )
    if d.main:
        save_atomic(ckpt, out / "last.pt")
        if improved:
            save_atomic(ckpt, out / "best.pt")
        if args.checkpoint_every and epoch % args.checkpoint_every == 0:
            save_atomic(ckpt, out / f"checkpoint-{epoch}.pt")
        _write_summary(out / "summary.csv", progress.rows)


def final_result(run: CheckedRun, trainer: Trainer, progress: Progress, d: Dist) -> dict:
    """What ``result.json`` holds: the parameter counts, the best epoch on val, the last epoch's
    row and, with a test split, the test scores of the last and of the best-on-val parameters
    (which are loaded back for it)."""
    args, rows, best = run.args, progress.rows, progress.best
    images = len(trainer.loader) * args.batch_size  # trained per epoch
    result = {
        "method": args.method, "model": args.model, "parameters": run.counts, "epochs": args.epochs,
        "best_epoch": best["epoch"], "best_val_top1": best["top1"], "final": rows[-1] if rows else None,
        # the epochs' time (over every session of a resumed run) and the training throughput over them
        "wall_s": sum(r.get("epoch_s", 0.0) for r in rows), "train_images": images * len(rows),
        "train_s": sum(images / r["img_per_s"] for r in rows),
    }
    if args.skip_unreadable and not args.dataset and not args.task:
        splits = [s for s in (args.train_split, args.val_split, args.test_split) if s]
        result["skipped_unreadable"] = {
            split: [path for path, _ in unreadable_images(str(Path(args.data_dir) / split))] for split in splits
        }
    if run.want_test:
        test_loader = eval_loader(run.data["test"], args, d, run.per_rank)
        result["test_last"] = evaluate(trainer.wrapped, test_loader, d, run.amp)
        _check_eval_loss(result["test_last"], "the test loss of the last epoch")
        if args.train_on_val or best["epoch"] == rows[-1]["epoch"]:
            result["test"] = result["test_last"]  # (train+val: val cannot choose an epoch)
        else:
            load_model_state(run.model, best["state"], args)
            result["test"] = evaluate(trainer.wrapped, test_loader, d, run.amp)
            _check_eval_loss(result["test"], f"the test loss of the best epoch ({best['epoch']})")
    return result


def _check_eval_loss(metrics: dict, what: str) -> None:
    if not math.isfinite(metrics["loss"]):
        raise NonFiniteLoss(
            f"{what} is NaN/Inf: the run diverged; the checkpoints already written are kept and no result.json is "
            "written. Lower --lr, or use --amp bf16/none instead of fp16"
        )


def write_result(run: CheckedRun, progress: Progress, result: dict, out: Path, d: Dist) -> None:
    """``result.json``, the deliverable and, with ``--plot``, the curves; the main process writes
    them. The deliverable holds the best-on-val parameters: for the prompt methods the folder
    ``pretrained/`` (:func:`vapt_kernels.save_pretrained`'s, with the class names and scores as
    metadata), for a full fine-tune the timm weights ``model.pth`` (for ``--pretrained-path``)."""
    if not d.main:
        return
    write_text_atomic(out / "result.json", _json_text(result))
    if run.args.method == "full":
        save_atomic(progress.best["state"], out / "model.pth")
    elif hasattr(run.model, "vapt"):
        classes = run.data.get("classes")
        metadata = {
            "classes": sorted(classes, key=classes.get) if classes else None,
            "model": run.args.model, "method": run.args.method, "data_dir": str(run.args.data_dir),
            "best_epoch": result["best_epoch"], "best_val_top1": result["best_val_top1"],
            "test_top1": result["test"]["top1"] if "test" in result else None,
        }  # fmt: skip
        try:
            write_pretrained(run.model, progress.best["state"], out / "pretrained", metadata=metadata, overwrite=True,
                             caller="vapt-train")
        except ValueError as error:  # out/pretrained is something else than an earlier run's folder
            raise OutputError(str(error)) from None
    if run.args.plot:
        plot_summary(progress.rows, out / "curves.png")


def run(
    args: argparse.Namespace, d: Dist, data: Optional[dict] = None, quiet: bool = False,
    before_write: Optional[Callable[[], None]] = None,
) -> dict:
    """Train (or evaluate) once as ``args`` says; returns what result.json holds.

    Every input is checked (:func:`check_args`, :func:`build_run`) before the first file is
    written (:func:`create_output`); ``before_write`` is called in between (tuning clears its
    folder there).
    """
    resume = check_args(args, d)
    checked = build_run(args, d, resume, data)
    if before_write is not None:
        before_write()
    out = create_output(checked, d)
    trainer = make_trainer(checked, d)
    progress = restore(checked, trainer, d)
    train_epochs(checked, trainer, progress, out, d, quiet)
    result = final_result(checked, trainer, progress, d)
    write_result(checked, progress, result, out, d)
    return result


def _count(model: nn.Module) -> dict:
    if hasattr(model, "vapt"):
        return {k: int(v) if k != "percent" else float(v) for k, v in count_parameters(model).items()}
    total = sum(p.numel() for p in trainable(model).values())
    head = sum(p.numel() for p in model.get_classifier().parameters() if p.requires_grad)
    backbone = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    # percent: trainable parameters per frozen one, as count_parameters; 100 when nothing is frozen (full)
    percent = 100.0 * total / backbone if backbone else 100.0
    return {"prompt": 0, "head": head, "total": total, "backbone": backbone, "percent": percent}


def _gather_rng(d: Dist) -> list:
    state = rng_state()
    if d.world == 1:
        return [state]
    states = [None] * d.world
    dist.all_gather_object(states, state)
    return states


def _train_epoch(model, loader, optimizer, scheduler, scaler, amp, d: Dist, epoch: int, args, quiet: bool):
    """One epoch; returns the mean training loss and the learning rate of its last step."""
    from tqdm import tqdm

    show = d.main and not quiet and sys.stderr.isatty()
    bar = tqdm(total=len(loader), desc=f"epoch {epoch}", disable=not show, leave=False)
    loss_sum = torch.zeros((), device=d.device)
    first_bad = torch.full((), -1, dtype=torch.long, device=d.device)
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(loader):
        x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
        with torch.autocast(d.device.type, dtype=amp, enabled=amp is not None):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        loss = loss.detach()
        loss_sum += loss
        # Recorded on the device, read every --log-interval steps: no host sync per step.
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step + 1, first_bad)
        if (step + 1) % args.log_interval == 0 or step + 1 == len(loader):
            _check_finite(first_bad, d, epoch)
            if show:
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.3g}",
                                img_s=f"{(step + 1) * args.batch_size / (time.perf_counter() - t0):.1f}")
        bar.update(1)
    bar.close()
    total = _all_reduce(loss_sum.clone(), d)
    return total.item() / (len(loader) * d.world), lr


def _check_finite(first_bad: torch.Tensor, d: Dist, epoch: int) -> None:
    bad = first_bad.clone()
    bad[bad < 0] = 2**62
    _all_reduce(bad, d, dist.ReduceOp.MIN if d.world > 1 else None)
    if bad.item() < 2**62:
        raise NonFiniteLoss(
            f"the training loss became NaN/Inf at epoch {epoch}, step {bad.item()} (steps counted from 1); "
            "the last checkpoint written (last.pt of the previous epoch) is untouched. Lower --lr, or use "
            "--amp bf16/none instead of fp16"
        )


def _write_summary(path: Path, rows: list[dict]) -> None:
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=SUMMARY_COLUMNS)
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(path, text.getvalue())


def plot_summary(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install matplotlib); no curves written", file=sys.stderr)
        return
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    axes[0].plot(epochs, [r["train_loss"] for r in rows], label="train")
    axes[0].plot(epochs, [r["eval_loss"] for r in rows], label="val")
    axes[0].set_title("loss")
    axes[0].legend()
    axes[1].plot(epochs, [r["eval_top1"] for r in rows], label="top-1")
    axes[1].plot(epochs, [r["eval_top5"] for r in rows], label="top-5")
    axes[1].set_title("val accuracy (%)")
    axes[1].legend()
    axes[2].plot(epochs, [r["lr"] for r in rows])
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("epoch")
    fig.tight_layout()
    try:
        write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)


def _load_checkpoint(path: str, flag: str) -> dict:
    """A ``vapt-train`` checkpoint, read with ``weights_only=True``: tensors and plain containers
    only, so a file that holds other objects is refused before any of its code could run."""
    if not Path(path).is_file():
        raise UsageError(f"{flag} {path}: no such file")
    not_ours = f"{flag} {path}: not a vapt-train checkpoint (a last.pt, best.pt or checkpoint-N.pt of this tool)"
    ckpt = _read_weights_only(Path(path), f"{flag} {path}")
    if not isinstance(ckpt, dict) or not {"model", "args", "epoch", "rng"} <= set(ckpt):
        raise UsageError(f"{not_ours}: expected a dict with model, args, epoch and rng")
    return ckpt


# ------------------------------------------------------------------------------------------------
# evaluation only, tuning
# ------------------------------------------------------------------------------------------------


MODEL_KEYS = (
    "model", "model_kwargs", "pretrained", "pretrained_path", "method", "backend", "img_size", "crop_pct",
) + tuple(f.name for f in CONFIG_FIELDS)


def eval_only(args: argparse.Namespace, d: Dist) -> dict:
    if not args.checkpoint:
        raise UsageError("--eval-only needs --checkpoint PATH (a last.pt, best.pt or checkpoint-N.pt)")
    if args.overwrite:
        raise UsageError("--eval-only writes no files: drop --overwrite")
    ckpt = _load_checkpoint(args.checkpoint, "--checkpoint")
    for k in MODEL_KEYS:  # the model is rebuilt as it was trained
        setattr(args, k, ckpt["args"].get(k))
    split = args.test_split or args.val_split
    check_folder_splits(args, [args.train_split, split])
    torch.manual_seed(0)
    probe = create_model(args, num_classes=1, weights=False)
    eval_tf = make_transform(args, probe, False)
    train = create_split(args, args.train_split, eval_tf)
    ds = create_split(args, split, eval_tf, class_map=class_to_idx(train))
    classes = class_to_idx(train)
    num_classes = args.num_classes or ckpt["args"].get("num_classes") or (len(classes) if classes else None)
    if num_classes is None:
        raise UsageError("cannot tell the class count; pass --num-classes")
    # Seeded as in training: without pretrained weights the frozen backbone is the seed's random one.
    torch.manual_seed(ckpt["args"].get("seed", 0))
    model = prepare(create_model(args, num_classes), args, vapt_config(args)).to(d.device)
    check_classes(ckpt["model"], model, args.checkpoint)
    load_model_state(model, ckpt["model"], args)
    per_rank = max(1, args.batch_size // d.world)
    metrics = evaluate(model, eval_loader(ds, args, d, per_rank), d, _amp_dtype(args))
    if d.main:
        print(f"{args.checkpoint} on '{split}' ({metrics['count']} images): top1 {metrics['top1']:.2f}  "
              f"top5 {metrics['top5']:.2f}  loss {metrics['loss']:.4f}")
    return metrics


def tuning_requested(args: argparse.Namespace) -> bool:
    return bool(args.lr_grid or args.wd_grid or args.official_grid or args.fast_search or args.final_train)


def tuning_grid(args: argparse.Namespace) -> tuple[list[float], list[float], list[int]]:
    """The learning rates (per 256 images, as ``--lr-base`` and the official grids are), weight
    decays and final seeds that tuning runs: the flags'; where a flag gives none, the official
    protocol's with ``--official-grid``, else the run's own rate and weight decay and seed 42."""
    official = args.official_grid
    lrs = args.lr_grid or (list(OFFICIAL_LR_GRID) if official else [learning_rate(args) * 256 / args.batch_size])
    wds = args.wd_grid or (list(OFFICIAL_WD_GRID) if official else [args.weight_decay])
    seeds = args.seeds or (list(OFFICIAL_SEEDS) if official else [42])
    return lrs, wds, seeds


def final_train(args: argparse.Namespace) -> str:
    """What the final runs of a tuning train on: ``--final-train``, else the benchmark's protocol.
    The official code trains them on train+val for VTAB and on the train split for FGVC (VPT's
    ``train.py``, which the VAPT code keeps: its ``get_loaders`` takes train+val for VTAB data sets
    only), where val then picks the epoch scored on test (the README's "Benchmarks")."""
    if args.final_train:
        return args.final_train
    task = task_of(args)
    return "train" if task is not None and task.suite == "fgvc" else "train+val"


def check_tuning(args: argparse.Namespace) -> bool:
    """Check a tuning's flags, output folder and data before anything runs; returns whether it
    continues the tuning already in ``--output`` (``--resume`` given that folder). Writes nothing.

    Raises:
        UsageError: the first problem found.
    """
    if not args.test_split:
        raise UsageError("tuning scores the final runs on a test split: pass --test-split (never used for the choice)")
    if not args.output:
        raise UsageError("--output DIR is needed for tuning")
    if args.lr is not None and args.lr_grid:
        raise UsageError(
            "--lr-grid gives the learning rates to try: drop --lr (or drop --lr-grid to tune --wd-grid at --lr)"
        )
    lrs, wds, seeds = tuning_grid(args)
    # Each run has its own folder, named by its values as printed (%g) or its seed.
    for flag, values in (("--lr-grid", [f"{v:g}" for v in lrs]), ("--wd-grid", [f"{v:g}" for v in wds]),
                         ("--seeds", [str(v) for v in seeds])):
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            raise UsageError(f"{flag} gives {', '.join(twice)} more than once; give each value once")
    # Checked here, not only in the final runs, which come after the whole grid has trained.
    vapt_config(args)
    lr_checks = [argparse.Namespace(**{**vars(args), "lr": None, "lr_base": lr}) for lr in lrs]
    for sub in lr_checks:
        if not 0 < learning_rate(sub) < math.inf:
            raise UsageError(f"--lr-grid {sub.lr_base:g} x --batch-size {args.batch_size} / 256 is not a finite "
                             "learning rate > 0; give smaller rates")  # fmt: skip
    continuing = bool(args.resume)
    if continuing:
        if Path(args.resume).resolve() != Path(args.output).resolve():
            raise UsageError(
                f"--resume {args.resume}: a tuning continues in its own folder: pass --resume {args.output} (its "
                "--output), or resume one run in its grid-*/ or final-seed*/ folder without the tuning flags"
            )
        if args.overwrite:
            raise UsageError("--overwrite deletes --output, --resume continues the tuning in it: give one of them")
    else:
        check_output(args)
    check_folder_splits(args, [args.train_split, args.val_split, args.test_split])
    return continuing


def run_or_reuse(sub: argparse.Namespace, d: Dist, continuing: bool, before_write=None) -> dict:
    """One run of a tuning. When the tuning continues, a run whose folder holds its ``result.json``
    is taken as it is (after checking that its settings are ``sub``'s), one that holds ``last.pt``
    resumes from it, and one that wrote only its ``args.json`` starts again."""
    out = Path(sub.output)
    if continuing and out.is_dir():
        if (out / "result.json").is_file():
            def recipe(values: dict) -> dict:  # as args.json holds them
                return json.loads(json.dumps({k: values.get(k) for k in RECIPE_KEYS}, default=str))

            try:
                saved = json.loads((out / "args.json").read_text(encoding="utf-8"))
                result = json.loads((out / "result.json").read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                raise UsageError(f"{out}: cannot read the finished run's args.json/result.json ({error}); delete "
                                 "the folder to run it again") from None  # fmt: skip
            listed = setting_differences(recipe(saved), recipe(vars(sub)), RECIPE_KEYS)
            if listed:
                raise UsageError(f"{out} holds a run with other settings ({listed}); continue with the same flags, "
                                 "or delete that folder")  # fmt: skip
            return result
        if (out / "last.pt").is_file():
            sub.resume = str(out / "last.pt")
        elif {p.name for p in out.iterdir()} <= {"args.json"}:
            sub.overwrite = True  # stopped before its first epoch ended
    return run(sub, d, quiet=True, before_write=before_write)


def tune(args: argparse.Namespace, d: Dist) -> dict:
    """The tuning protocol: every (lr, wd) trained on train, scored on val (a run that diverges is
    left out of the choice); the best retrained with each seed on train+val (its last epoch scored
    on test) or on train (the epoch best on val scored on test), as :func:`final_train` says; mean
    and std of test top-1. With ``--resume`` set to ``--output``, finished runs are kept and an
    interrupted one resumes."""
    continuing = check_tuning(args)
    lrs, wds, seeds = tuning_grid(args)
    out = Path(args.output)
    pending = {"clear": args.overwrite and out.is_dir()}

    def clear_once() -> None:
        """With --overwrite, the tuning folder is deleted once, after the first run's checks."""
        if pending.pop("clear", False) and d.main:
            clear_folder(out)

    grid: list[dict] = []
    runs: list[dict] = []

    def score(lr: float, wd: float) -> dict:
        """The grid run at (lr, wd): trained on train, its best val top-1; each pair runs once."""
        for g in grid:
            if (g["lr_base"], g["weight_decay"]) == (lr, wd):
                return g
        sub = argparse.Namespace(**{**vars(args), "lr": None, "lr_base": lr, "weight_decay": wd, "resume": None,
                                    "test_split": None, "output": str(out / f"grid-lr{lr:g}-wd{wd:g}")})
        entry = {"lr_base": lr, "lr": learning_rate(sub), "weight_decay": wd, "val_top1": None}
        try:
            r = run_or_reuse(sub, d, continuing, before_write=clear_once)
        except NonFiniteLoss as error:
            entry["diverged"] = str(error).split(":")[0]
            if d.main:
                print(f"grid lr_base {lr:g} (lr {entry['lr']:.4g}) wd {wd:g}: diverged, left out of the choice",
                      flush=True)  # fmt: skip
        else:
            entry["val_top1"] = r["best_val_top1"]
            runs.append(r)
            if d.main:
                print(f"grid lr_base {lr:g} (lr {entry['lr']:.4g}) wd {wd:g}: val top1 {r['best_val_top1']:.2f}",
                      flush=True)  # fmt: skip
        grid.append(entry)
        return entry

    if args.fast_search:  # the weight decay at lr-base 5 first (ties: the grid order), then the rate at it
        first = [score(FAST_SEARCH_LR, wd) for wd in wds]
        finite = [g for g in first if g["val_top1"] is not None] or first
        wd_best = max(finite, key=lambda g: g["val_top1"] or 0.0)["weight_decay"]
        candidates = [score(lr, wd_best) for lr in lrs]
    else:
        candidates = [score(lr, wd) for lr in lrs for wd in wds]
    candidates = [g for g in candidates if g["val_top1"] is not None]
    if not candidates:
        raise NonFiniteLoss("every grid run diverged: give smaller learning rates (--lr-grid)")
    # Ties go to the smaller learning rate (as the official tuning does), then the grid order.
    best = max(candidates, key=lambda g: (g["val_top1"], -g["lr_base"]))
    on = final_train(args)
    finals = []
    for seed in seeds:
        sub = argparse.Namespace(**{**vars(args), "lr": None, "lr_base": best["lr_base"], "resume": None,
                                    "weight_decay": best["weight_decay"], "seed": seed,
                                    "train_on_val": on == "train+val", "output": str(out / f"final-seed{seed}")})
        r = run_or_reuse(sub, d, continuing)
        runs.append(r)
        # train+val leaves no held-out split to choose an epoch by: the test score is the last epoch's.
        scored = r["test_last"] if on == "train+val" else r["test"]
        finals.append({"seed": seed, "test_top1": scored["top1"], "test_top5": scored["top5"],
                       "test_top1_last": r["test_last"]["top1"], "best_val_epoch": r["best_epoch"]})
    tops = np.array([f["test_top1"] for f in finals])
    result = {
        "task": args.task, "method": args.method, "model": args.model,
        "search": "fast" if args.fast_search else "full", "final_train": on,
        "final_epoch": "last" if on == "train+val" else "best on val",
        "grid": grid, "best": best, "final": finals, "test_top1_mean": float(tops.mean()),
        "test_top1_std": float(tops.std(ddof=1)) if len(tops) > 1 else 0.0,
        "parameters": runs[-1]["parameters"],
        # every run's epochs, grid and final, over every session that worked on them
        "wall_s": sum(r.get("wall_s", 0.0) for r in runs),
        "train_img_per_s": sum(r.get("train_images", 0) for r in runs) / max(sum(r.get("train_s", 0.0) for r in runs),
                                                                            1e-9),
    }
    if d.main:
        print("\n  lr_base   lr        wd        val top1")
        for g in grid:
            mark = "  <- best" if g is best else ""
            shown = "diverged" if g["val_top1"] is None else f"{g['val_top1']:.2f}"
            print(f"  {g['lr_base']:<9g} {g['lr']:<9.4g} {g['weight_decay']:<9g} {shown}{mark}")
        epoch = "last epoch" if on == "train+val" else "epoch best on val"
        print(f"\n  seed   test top1   test top5  (trained on {on}, {epoch})")
        for f in finals:
            print(f"  {f['seed']:<6} {f['test_top1']:<11.2f} {f['test_top5']:.2f}")
        mean, std = result["test_top1_mean"], result["test_top1_std"]
        print(f"\n  test top1 {mean:.2f} +- {std:.2f} over {len(finals)} seed(s)")
        write_text_atomic(out / "result.json", _json_text(result))
    return result


# ------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------


def run_command(prog: str, parser: argparse.ArgumentParser, argv: Optional[list[str]], body) -> int:
    """A command's exit status: ``body(args, d)``'s after parsing ``argv`` and joining the
    processes; a bad input is reported (by the main process) with status 2, a diverged run with 3,
    an output that cannot be written with 1."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse: --help (0) or a bad flag, already reported (2)
        return stop.code if isinstance(stop.code, int) else 2
    d = None
    try:
        d = setup_distributed(args)
        return body(args, d)
    except (UsageError, NonFiniteLoss) as error:
        if d is None or d.main:
            print(f"{prog}: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, UsageError) else 3
    except OutputError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: Optional[list[str]] = None) -> int:
    def body(args: argparse.Namespace, d: Dist) -> int:
        if args.eval_only:
            eval_only(args, d)
        elif tuning_requested(args):
            tune(args, d)
        else:
            run(args, d)
        return 0

    return run_command("vapt-train", build_parser(), argv, body)


if __name__ == "__main__":
    sys.exit(main())
