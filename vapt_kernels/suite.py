"""``vapt-suite``: the paper's benchmarks in one command. Each task of a list is tuned and scored by
the protocol (``vapt-train``'s tuning on its ``--task``), one after the other; the paper's table
comes out at the end.

    vapt-suite --tasks vtab1k fgvc --data-dir ROOT --output runs/vit-b-sup --official-grid --fast-search \\
        --model vit_base_patch16_224 --pretrained-path ViT-B_16.npz
    torchrun --nproc-per-node 8 -m vapt_kernels.suite ...      # each run over 8 processes

Tasks: ``vtab1k`` (19), ``vtab1k-natural`` (7), ``vtab1k-specialized`` (4), ``vtab1k-structured``
(8), ``fgvc`` (5), or names (``vtab/cifar``, ``fgvc/cub``). Every other flag is ``vapt-train``'s and
applies to every task; the grid is the official protocol's unless ``--lr-grid``/``--wd-grid``/
``--seeds`` give one. Each task runs in ``OUTPUT/<suite>-<task>/`` (``vtab-cifar/``); the same
command again skips the finished tasks and resumes an interrupted one from its checkpoints (the
settings must be the same: they are kept in ``OUTPUT/suite.json``). More tasks can be added to a
suite folder later with the same settings. After each task ``results.csv`` holds a row per finished
task; at the end the table is printed and written as ``summary.md`` and ``summary.png`` (the PNG
needs matplotlib). Every task's flags and data are checked before the first run.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Optional

from . import paper_data, train
from .files import OutputError, describe, write_atomic

SUITES = {
    "vtab1k": [f"vtab/{name}" for name in paper_data.VTAB_TASKS],
    **{f"vtab1k-{group}": [f"vtab/{name}" for name, (g, _) in paper_data.VTAB_TASKS.items() if g == group]
       for group in ("natural", "specialized", "structured")},
    "fgvc": [f"fgvc/{name}" for name in paper_data.FGVC_TASKS],
}  # fmt: skip
ALL_TASKS = SUITES["vtab1k"] + SUITES["fgvc"]  # the paper's order
# vapt-train flags the suite sets for each task (value: the flag's default, which must stay).
PER_TASK = {
    "task": None, "dataset": "", "dataset_download": False, "train_split": "train", "val_split": "val",
    "test_split": None, "num_classes": None, "resume": None, "eval_only": False, "checkpoint": None,
    "skip_unreadable": False, "train_on_val": False,
}  # fmt: skip
# What makes two suites' numbers comparable: kept in suite.json, the same for every session.
SETTINGS = tuple(k for k in train.RECIPE_KEYS if k not in PER_TASK) + (
    "lr_grid", "wd_grid", "seeds", "official_grid", "fast_search", "final_train",
)
FORMAT = "vapt_kernels.suite/1"
# The columns of results.csv: one row per finished task.
CSV_FIELDS = (
    "task", "group", "method", "model", "search", "lr_base", "lr", "weight_decay", "final_train", "seeds",
    "seed_top1", "top1_mean", "top1_std", "tuned_params", "total_params", "tuned_percent", "wall_s", "img_per_s",
)  # fmt: skip


# ------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------


def task_row(task: paper_data.Task, result: dict) -> dict:
    """The ``results.csv`` row of a task from its tuning's ``result.json``."""
    counts = result["parameters"]
    tuned, frozen = counts["total"], counts["backbone"]
    finals = result["final"]
    return {
        "task": task.key, "group": task.group, "method": result["method"], "model": result["model"],
        "search": result["search"], "lr_base": result["best"]["lr_base"], "lr": result["best"]["lr"],
        "weight_decay": result["best"]["weight_decay"], "final_train": result["final_train"],
        "seeds": " ".join(str(f["seed"]) for f in finals),
        "seed_top1": " ".join(f"{f['test_top1']:.2f}" for f in finals),
        "top1_mean": round(result["test_top1_mean"], 4), "top1_std": round(result["test_top1_std"], 4),
        # as the official code's results table: tuned parameters over all of the model's
        "tuned_params": tuned, "total_params": tuned + frozen,
        "tuned_percent": round(100.0 * tuned / (tuned + frozen), 4),
        "wall_s": round(result["wall_s"], 1), "img_per_s": round(result["train_img_per_s"], 1),
    }  # fmt: skip


def csv_text(rows: list[dict]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def means(rows: list[dict]) -> dict[str, tuple[float, int, int]]:
    """Each summary column's mean top-1 over the tasks of ``rows`` it averages, with how many of its
    tasks were there and how many it has: ``{key: (mean, present, of)}``, only where one is there."""
    top1 = {row["task"]: float(row["top1_mean"]) for row in rows}
    found = {}
    for key, _, names in paper_data.MEANS:
        suite = "fgvc" if key == "fgvc" else "vtab"
        values = [top1[f"{suite}/{name}"] for name in names if f"{suite}/{name}" in top1]
        if values:
            found[key] = (sum(values) / len(values), len(values), len(names))
    return found


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _render(header: list[str], body: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = [header, ["---"] * len(header), *body]
        return "\n".join("| " + " | ".join(cells) + " |" for cells in lines) + "\n"
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = [header, ["-" * w for w in widths], *body]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(cells, widths)).rstrip() for cells in lines) + "\n"


def tables(rows: list[dict], label: str, markdown: bool = False) -> str:
    """The per-task table and the paper's summary (this suite's row next to the published ones), as
    aligned text or Markdown. A mean over part of its tasks says how many, as ``72.10 (2/7)``."""
    tasks = [[row["task"], row["group"], f"{float(row['lr_base']):g}", f"{float(row['weight_decay']):g}",
              row["final_train"], f"{float(row['top1_mean']):.2f} +- {float(row['top1_std']):.2f}",
              str(len(row["seeds"].split())), f"{float(row['tuned_percent']):.2f}",
              _duration(float(row["wall_s"])), f"{float(row['img_per_s']):.0f}"] for row in rows]  # fmt: skip
    per_task = _render(["task", "group", "lr_base", "wd", "final on", "test top-1", "seeds", "tuned %", "time",
                        "train img/s"], tasks, markdown)  # fmt: skip
    found = means(rows)
    ours = [label]
    for key, _, _ in paper_data.MEANS:
        if key not in found:
            ours.append("-")
            continue
        mean, present, of = found[key]
        ours.append(f"{mean:.2f}" + ("" if present == of else f" ({present}/{of})"))
    shares = [float(row["tuned_percent"]) for row in rows]
    ours.append(f"{sum(shares) / len(shares):.2f}" if shares else "-")
    body = [ours] + [
        [f"{p.method} (paper)", *(f"{getattr(p, key):.2f}" for key, _, _ in paper_data.MEANS),
         "-" if p.tuned_percent is None else f"{p.tuned_percent:.2f}"]
        for p in paper_data.PAPER_ROWS
    ]  # fmt: skip
    summary = _render(["", *(heading for _, heading, _ in paper_data.MEANS), "tuned / total %"], body, markdown)
    note = f"paper rows: {paper_data.PAPER_SOURCE}.\n"
    if markdown:
        return f"## Per task\n\n{per_task}\n## Summary\n\n{summary}\n{note}"
    return f"{per_task}\n{summary}\n{note}"


def draw(rows: list[dict], label: str, path: Path) -> None:
    """The summary as a bar chart: each mean of this suite next to the published rows'."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure list

    found = means(rows)
    keys = [key for key, _, _ in paper_data.MEANS]
    series = [(label, [found[k][0] if k in found else math.nan for k in keys])]
    series += [(f"{p.method} (paper)", [getattr(p, k) for k in keys]) for p in paper_data.PAPER_ROWS]
    fig = Figure(figsize=(9, 5))
    ax = fig.subplots()
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series):
        ax.bar([x + (i - (len(series) - 1) / 2) * width for x in range(len(keys))], values, width, label=name)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([heading + ("" if k not in found or found[k][1] == found[k][2] else
                                   f"\n({found[k][1]} of {found[k][2]} tasks)")
                        for (k, heading, _) in paper_data.MEANS])  # fmt: skip
    ax.set_ylabel("test top-1 (%)")
    ax.set_ylim(0, 100)
    ax.set_title("paper rows: ViT-B/16, supervised ImageNet-21k", fontsize=9)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100))


# ------------------------------------------------------------------------------------------------
# the runner
# ------------------------------------------------------------------------------------------------


def parse_tasks(names: list[str]) -> list[paper_data.Task]:
    """The tasks named (suites expanded), each once, in the paper's order."""
    wanted = set()
    for name in names:
        if name in SUITES:
            wanted.update(SUITES[name])
        else:
            try:
                wanted.add(paper_data.parse_task(name).key)
            except ValueError as error:
                raise train.UsageError(f"--tasks: {error}; or a suite: {', '.join(SUITES)}") from None
    return [paper_data.parse_task(key) for key in ALL_TASKS if key in wanted]


def build_parser() -> argparse.ArgumentParser:
    p = train.build_parser()
    p.prog, p.description = "vapt-suite", __doc__
    g = p.add_argument_group("suite")
    g.add_argument("--tasks", nargs="+", required=True, metavar="TASK",
                   help=f"suites ({', '.join(SUITES)}) or tasks (vtab/<task>, fgvc/<data set>)")
    return p


def check_flags(args: argparse.Namespace) -> None:
    """The suite sets each task's splits, class count and folders: those flags are refused."""
    for name, default in PER_TASK.items():
        if getattr(args, name) != default:
            why = ("the same command continues the suite in --output" if name == "resume" else
                   "the suite sets it for each task by the protocol")  # fmt: skip
            raise train.UsageError(f"--{name.replace('_', '-')}: {why}; remove it")
    if not args.data_dir:
        raise train.UsageError("--data-dir ROOT is needed: the folder holding the tasks' data (see the README)")
    if not args.output:
        raise train.UsageError("--output DIR is needed: the suite's folder (a folder per task, results.csv, ...)")


def settings(args: argparse.Namespace) -> dict:
    return json.loads(json.dumps({k: getattr(args, k) for k in SETTINGS}, default=str))


def check_suite_folder(args: argparse.Namespace) -> bool:
    """Whether ``--output`` continues a suite of the same settings (True), or is new, empty or to be
    deleted with ``--overwrite`` (False). Writes nothing.

    Raises:
        UsageError: the folder holds something else, or a suite of other settings.
    """
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise train.UsageError(f"--output {out} is a file; choose a folder for the suite")
    if not out.is_dir() or not any(out.iterdir()) or args.overwrite:
        return False
    record = out / "suite.json"
    if not record.is_file():
        raise train.UsageError(
            f"--output {out} holds files but no suite.json: not a suite's folder; choose another, or add --overwrite "
            "to delete it first"
        )
    try:
        saved = json.loads(record.read_text(encoding="utf-8"))
        there = saved["settings"]
        if saved.get("format") != FORMAT or not isinstance(there, dict):
            raise ValueError(f"format {saved.get('format')!r}, expected {FORMAT!r}")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise train.UsageError(f"{record}: not a readable suite record ({error}); choose another --output") from None
    listed = train.setting_differences(there, settings(args), SETTINGS)
    if listed:
        raise train.UsageError(
            f"--output {out} holds a suite run with other settings ({listed}); continue it with the same flags, "
            "choose another --output, or add --overwrite to delete it first"
        )
    return True


def task_folder(out: Path, task: paper_data.Task) -> Path:
    return out / f"{task.suite}-{task.name}"


def task_args(args: argparse.Namespace, task: paper_data.Task, continuing: bool) -> argparse.Namespace:
    """``vapt-train``'s arguments for one task: its splits, its folder (continued if it is there)."""
    out = task_folder(Path(args.output), task)
    sub = argparse.Namespace(**{**vars(args), "task": task.key, "test_split": "test", "output": str(out)})
    if not (args.lr_grid or args.wd_grid or args.seeds):
        sub.official_grid = True
    if continuing and out.is_dir():
        sub.resume = str(out)
    del sub.tasks
    return sub


def finished_rows(out: Path) -> list[dict]:
    """The ``results.csv`` rows of the tasks finished in the suite folder ``out``, in the paper's order."""
    rows = []
    for key in ALL_TASKS:
        task = paper_data.parse_task(key)
        path = task_folder(out, task) / "result.json"
        if path.is_file():
            rows.append(task_row(task, json.loads(path.read_text(encoding="utf-8"))))
    return rows


def label(args: argparse.Namespace) -> str:
    """This suite's row in the table: the method, the model and the weights file it started from."""
    weights = f", {Path(args.pretrained_path).name}" if args.pretrained_path else ""
    return f"{args.method} ({args.model}{weights}; this suite)"


def write_tables(out: Path, args: argparse.Namespace, final: bool) -> list[dict]:
    """``results.csv`` (and at the end ``summary.md`` and ``summary.png``) from the finished tasks."""
    rows = finished_rows(out)
    write_atomic(out / "results.csv", lambda f: f.write(csv_text(rows).encode()))
    if final and rows:
        text = tables(rows, label(args), markdown=True)
        write_atomic(out / "summary.md", lambda f: f.write(text.encode()))
        try:
            draw(rows, label(args), out / "summary.png")
        except ImportError as error:
            print(f"summary.png not drawn: matplotlib cannot be imported ({error}); pip install matplotlib and run "
                  "the same command again (finished tasks are skipped)", file=sys.stderr)  # fmt: skip
    return rows


def run_suite(args: argparse.Namespace, d: train.Dist) -> int:
    """Check every task, then tune the unfinished ones in order; returns the exit status (3 when a
    task diverged: the others still ran)."""
    tasks = parse_tasks(args.tasks)
    check_flags(args)
    continuing = check_suite_folder(args)
    out = Path(args.output)
    subs = {task.key: task_args(args, task, continuing) for task in tasks}
    pending = [task for task in tasks if not (continuing and (task_folder(out, task) / "result.json").is_file())]
    for task in pending:  # before anything is written: a bad 19th task is found now, not after 18
        try:
            train.check_tuning(subs[task.key])
        except train.UsageError as error:
            raise (error if task.key in str(error) else train.UsageError(f"{task.key}: {error}")) from None
    if d.main:
        if args.overwrite and out.is_dir():
            train.clear_folder(out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(f"cannot create the suite folder {out}: {describe(error)}") from None
        record = {"format": FORMAT, "settings": settings(args)}
        train.write_text_atomic(out / "suite.json", json.dumps(record, indent=2) + "\n")
    diverged = {}
    for number, task in enumerate(tasks, start=1):
        if task not in pending:
            if d.main:
                print(f"[{number}/{len(tasks)}] {task.key}: finished earlier, skipped", flush=True)
            continue
        if d.main:
            print(f"[{number}/{len(tasks)}] {task.key}", flush=True)
        try:
            result = train.tune(subs[task.key], d)
        except train.NonFiniteLoss as error:
            diverged[task.key] = str(error)
            if d.main:
                print(f"{task.key}: {error}; the next tasks still run", file=sys.stderr, flush=True)
            continue
        if d.main:
            print(f"[{number}/{len(tasks)}] {task.key}: test top-1 {result['test_top1_mean']:.2f} +- "
                  f"{result['test_top1_std']:.2f}", flush=True)  # fmt: skip
            write_tables(out, args, final=False)
    if d.main:
        rows = write_tables(out, args, final=True)
        print()
        print(tables(rows, label(args)), end="")
        for key, error in diverged.items():
            print(f"vapt-suite: {key} diverged ({error}); not in the table", file=sys.stderr)
    return 3 if diverged else 0


def main(argv: Optional[list[str]] = None) -> int:
    return train.run_command("vapt-suite", build_parser(), argv, run_suite)


if __name__ == "__main__":
    sys.exit(main())
