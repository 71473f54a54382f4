"""Charts of one ``vapt-bench`` run, read back from its ``results.csv``:
``python -m vapt_kernels.bench.plot results.csv [--run TIMESTAMP] [--out DIR]`` (``vapt-bench
--plot`` calls it on the run it just appended). Needs matplotlib (``pip install 'vapt_kernels[plot]'``).

* ``throughput.png``: images/s and time relative to the floor per provider, one bar per mode (for a
  sweep, at its last point);
* ``sweep_<parameter>.png`` for a ``--sweep`` run: the ratio to the floor over the swept parameter.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Optional


def draw(csv_path: Path, run: Optional[str] = None, out_dir: Optional[Path] = None) -> list[Path]:
    """Draw the charts of run ``run`` (its timestamp; default: the file's last run) into
    ``out_dir`` (default: the CSV's folder); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    run = run or rows[-1]["timestamp"]
    ok = [r for r in rows if r["timestamp"] == run and r["status"] == "ok"]
    if not ok:
        raise ValueError(f"{csv_path} has no measured rows of a run at {run}")
    out_dir = out_dir or Path(csv_path).parent
    sweep = ok[0]["sweep"]
    written = []
    last = [r for r in ok if all(r[k] == ok[-1][k] for k in ("batch", "prompts"))]  # a sweep's last point
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "img_per_s", "images / s"), (axes[1], "ratio_to_floor", "time / floor")):
        for i, mode in enumerate(dict.fromkeys(r["mode"] for r in last)):
            sel = [r for r in last if r["mode"] == mode]
            ax.bar([j + 0.4 * i for j in range(len(sel))], [float(r[key]) for r in sel], width=0.4, label=mode)
            ax.set_xticks([j + 0.2 for j in range(len(sel))], [r["provider"] for r in sel], rotation=20)
        ax.set_ylabel(label)
        ax.legend()
    r0 = last[0]
    tasks = f", {r0['tasks']} tasks" if int(r0.get("tasks") or 1) > 1 else ""  # older CSVs have no tasks column
    fig.suptitle(
        f"{r0['model']}, batch {r0['batch']}, {r0['prompts']} prompts{tasks}, {r0['dtype']}, {r0['device']}", fontsize=9
    )
    fig.tight_layout()
    written.append(out_dir / "throughput.png")
    fig.savefig(written[-1], dpi=120)
    if sweep:
        fig, ax = plt.subplots(figsize=(6, 4))
        for mode, provider in dict.fromkeys((r["mode"], r["provider"]) for r in ok):
            points = sorted((int(r[sweep]), float(r["ratio_to_floor"])) for r in ok if (r["mode"], r["provider"]) == (mode, provider))
            ax.plot(*zip(*points), marker="o", label=f"{provider} ({mode})")
        ax.set_xlabel(sweep)
        ax.set_ylabel("time / floor")
        ax.set_xscale("log")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out_dir / f"sweep_{sweep}.png")
        fig.savefig(written[-1], dpi=120)
    plt.close("all")
    return written


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vapt_kernels.bench.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("csv", type=Path, help="a results.csv written by vapt-bench --out")
    p.add_argument("--run", help="the run's timestamp (default: the last run in the file)")
    p.add_argument("--out", type=Path, help="folder for the PNG files (default: the CSV's folder)")
    args = p.parse_args(argv)
    for path in draw(args.csv, args.run, args.out):
        print(f"chart written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
