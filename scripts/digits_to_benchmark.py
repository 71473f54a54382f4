"""Write a small benchmark in the paper's layouts from scikit-learn's digits (1,797 8x8 grey
images, shipped inside the scikit-learn wheel), for ``vapt-suite``: four tasks in VTAB-1k's layout
and one in FGVC's, each a different view of the digits, in the folders of real tasks (the suite
knows the tasks by name; these are stand-ins, not the benchmarks):

    svhn           (natural, 10 classes)      the digits as they are
    eurosat        (specialized, 10 classes)  turned a quarter
    clevr_count    (structured, 8 classes)    digits 0-7, mirrored left to right
    smallnorb_ele  (structured, 9 classes)    digits 1-9 (labels 0-8), inverted (white ground)
    Stanford-dogs  (FGVC, 120 classes)        the digits, labelled by name ("seven"), upside down

VTAB-1k: ``ROOT/<task>/{train800,val200,train800val200,test}.txt`` with ``images/<index>.png``
(800 train and 200 val images drawn per task, the rest for test). FGVC:
``ROOT/Stanford-dogs/{train,val,test}.json`` with ``Images/<name>/<index>.png`` (60/10/30 %).
Pixel values 0..16 are scaled to 0..255.

    python scripts/digits_to_benchmark.py ROOT [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# folder -> (digits kept, label of a digit, view of an 8x8 image)
VTAB_VIEWS = {
    "svhn": (range(10), lambda d: d, lambda a: a),
    "eurosat": (range(10), lambda d: d, lambda a: np.rot90(a)),
    "clevr_count": (range(8), lambda d: d, lambda a: a[:, ::-1]),
    "smallnorb_ele": (range(1, 10), lambda d: d - 1, lambda a: 255 - a),
}


def write_benchmark(root: Path, seed: int) -> dict[str, dict[str, int]]:
    """Write the five tasks; returns the number of images per task and split."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    rng = np.random.default_rng(seed)
    counts = {}
    for task, (kept, label, view) in VTAB_VIEWS.items():
        folder = root / task
        (folder / "images").mkdir(parents=True)
        chosen = rng.permutation(np.flatnonzero(np.isin(digits.target, list(kept))))
        splits = {"train800": chosen[:800], "val200": chosen[800:1000], "test": chosen[1000:]}
        lines = {}
        for split, members in splits.items():
            lines[split] = []
            for i in members:
                Image.fromarray(np.ascontiguousarray(view(images[i])), mode="L").save(folder / f"images/{i:04d}.png")
                lines[split].append(f"images/{i:04d}.png {label(int(digits.target[i]))}\n")
        lines["train800val200"] = lines["train800"] + lines["val200"]
        for split, listed in lines.items():
            (folder / f"{split}.txt").write_text("".join(listed))
        counts[task] = {split: len(listed) for split, listed in lines.items()}
    folder = root / "Stanford-dogs"
    chosen = rng.permutation(len(images))
    cut = [int(0.6 * len(chosen)), int(0.7 * len(chosen))]
    counts["Stanford-dogs"] = {}
    for split, members in zip(("train", "val", "test"), np.split(chosen, cut)):
        listed = {}
        for i in members:
            name = NAMES[digits.target[i]]
            (folder / "Images" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(images[i][::-1]), mode="L").save(folder / "Images" / name / f"{i:04d}.png")
            listed[f"{name}/{i:04d}.png"] = name
        (folder / f"{split}.json").write_text(json.dumps(listed, indent=0))
        counts["Stanford-dogs"][split] = len(listed)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="folder to create (must not exist yet)")
    parser.add_argument("--seed", type=int, default=0, help="draws the splits")
    args = parser.parse_args(argv)
    if args.root.exists():
        raise SystemExit(f"{args.root} exists already; choose a new folder")
    for task, counts in write_benchmark(args.root, args.seed).items():
        print(f"{args.root / task}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
