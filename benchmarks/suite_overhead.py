"""What ``vapt-suite`` adds over ``vapt-train``: one task tuned by each, as the commands a user
runs (a process each, startup included), in alternating rounds on the same data and flags; the
suite also checks its folder, writes suite.json, results.csv, summary.md and summary.png.

    python benchmarks/suite_overhead.py [--rounds 3] [--epochs 10] [--work DIR]

The task is scikit-learn's digits written as a VTAB-1k task (scripts/digits_to_benchmark.py's
``svhn``): 800 training images, 200 for val, 797 for test, 16x16, a tiny ViT; a grid of two rates
and one final run. Prints each round's seconds and the median ratio suite / train.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--work", type=Path, default=None, help="folder for the data and the runs (default: temporary)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="suite-overhead-"))
    data = work / "benchmark"
    if not data.exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "digits_to_benchmark.py"), str(data)], check=True)
    flags = ["--data-dir", str(data), "--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=16",
             "patch_size=4", "embed_dim=64", "depth=4", "num_heads=4", "--workers", "0", "--no-aug", "--cache-data",
             "--num-prompts", "5", "--epochs", str(args.epochs), "--warmup-epochs", "1", "--batch-size", "32",
             "--lr-grid", "1.6", "6.4", "--wd-grid", "0", "--seeds", "1"]  # fmt: skip
    commands = {
        "vapt-train": [sys.executable, "-m", "vapt_kernels.train", "--task", "vtab/svhn", "--test-split", "test"],
        "vapt-suite": [sys.executable, "-m", "vapt_kernels.suite", "--tasks", "vtab/svhn"],
    }
    seconds: dict[str, list[float]] = {name: [] for name in commands}
    for round_ in range(args.rounds):
        for name, command in commands.items():
            out = work / f"{name}-{round_}"
            t0 = time.perf_counter()
            subprocess.run([*command, *flags, "--output", str(out)], check=True, stdout=subprocess.DEVNULL)
            seconds[name].append(time.perf_counter() - t0)
        print(f"round {round_ + 1}: " + ", ".join(f"{name} {s[-1]:.1f} s" for name, s in seconds.items()), flush=True)
    ratios = [s / t for s, t in zip(seconds["vapt-suite"], seconds["vapt-train"])]
    print(f"median vapt-train {statistics.median(seconds['vapt-train']):.1f} s, vapt-suite "
          f"{statistics.median(seconds['vapt-suite']):.1f} s; ratio per round {', '.join(f'{r:.3f}' for r in ratios)}, "
          f"median {statistics.median(ratios):.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
