"""Write scikit-learn's digits (1,797 8x8 grey images, shipped inside the scikit-learn wheel) as an
image folder that ``vapt-train --data-dir`` reads: ``OUT/{train,val,test}/{class}/{index}.png``.

The split is stratified and fixed by ``--seed``; pixel values 0..16 are scaled to 0..255.
``--classes 0-4`` keeps some digits only (the transfer example of the README uses 0-4 and 5-9).

    python scripts/digits_to_folder.py OUT [--classes 0-9] [--val 0.2] [--test 0.2] [--seed 0] [--per-class N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def parse_classes(text: str) -> list[int]:
    """``"0-4"`` or ``"1,3,5"`` -> sorted digit list."""
    if "-" in text:
        lo, hi = (int(t) for t in text.split("-", 1))
        digits = list(range(lo, hi + 1))
    else:
        digits = [int(t) for t in text.split(",") if t]
    if not digits or any(not 0 <= d <= 9 for d in digits):
        raise SystemExit(f"--classes {text!r}: give digits 0..9 as a range (0-4) or a list (1,3,5)")
    return sorted(set(digits))


def write_digits(
    out: Path, classes: list[int], val: float, test: float, seed: int, per_class: int | None = None
) -> dict[str, int]:
    """Write the folder; returns the number of images per split."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0, "test": 0}
    for label in classes:
        idx = np.flatnonzero(digits.target == label)
        rng.shuffle(idx)
        idx = idx[:per_class]
        n_test = int(round(test * len(idx)))
        n_val = int(round(val * len(idx)))
        parts = {"test": idx[:n_test], "val": idx[n_test : n_test + n_val], "train": idx[n_test + n_val :]}
        for split, members in parts.items():
            if len(members) == 0:
                continue
            folder = out / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in members:
                Image.fromarray(images[i], mode="L").save(folder / f"{i:04d}.png")
            counts[split] += len(members)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to create (must not hold a train/ folder yet)")
    parser.add_argument("--classes", default="0-9", help="digits to keep: a range 0-4 or a list 1,3,5")
    parser.add_argument("--val", type=float, default=0.2, help="fraction of each class for val/")
    parser.add_argument("--test", type=float, default=0.2, help="fraction of each class for test/")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-class", type=int, default=None,
                        help="keep at most N images of each digit (small test sets)")
    args = parser.parse_args(argv)
    if (args.out / "train").exists():
        raise SystemExit(f"{args.out / 'train'} exists already; choose a new folder")
    counts = write_digits(args.out, parse_classes(args.classes), args.val, args.test, args.seed, args.per_class)
    print(f"wrote {counts} images to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
