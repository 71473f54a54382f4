"""Charts of one ``vapt-bench`` run, read back from its ``results.csv``:
``python -m vapt_kernels.bench.plot results.csv [--run TIMESTAMP] [--out DIR]``; ``vapt-bench --out
DIR`` calls it on the run it just appended unless given ``--no-plot``. Needs matplotlib
(``pip install 'vapt_kernels[plot]'``).

* ``throughput.png``: one row per provider, named on the y axis, with one horizontal bar per mode:
  images/s on the left, time relative to the eager floor on the right (for a sweep, at its last
  point). The whiskers span the 20-80% spread of the step times (:func:`spread`), the numbers are
  the medians.
* ``sweep_<parameter>.png`` for a ``--sweep`` run: one panel per mode, the ratio to the floor of
  every provider over the swept parameter (log axis), its 20-80% spread as a shaded band.

Providers that were not measured (status ``n/a`` or ``error``) are named under the charts.
"""

from __future__ import annotations

import argparse
import csv
import shlex
import sys
import textwrap
from pathlib import Path
from typing import Optional

# The quantity a chart shows -> its axis label.
LABELS = {"img_per_s": "images / s (higher is better)", "ratio_to_floor": "time / eager floor (lower is better)"}
LINE_STYLES = ("-", "--", ":")  # with the 10 colours of matplotlib's default cycle: 30 providers apart


class NothingToDraw(ValueError):
    """The CSV has no measured row of the run asked for."""


def install_hint(csv_path: Path, run: Optional[str] = None) -> str:
    """How to get the charts of ``run`` in ``csv_path`` where matplotlib is missing."""
    command = f"python -m vapt_kernels.bench.plot {shlex.quote(str(csv_path))}"
    return f"pip install 'vapt_kernels[plot]', then {command}" + (f" --run {run}" if run else "")


def spread(row: dict, key: str) -> Optional[tuple[float, float, float]]:
    """``(low, value, high)`` of ``key`` (``img_per_s`` or ``ratio_to_floor``) in a result row:
    its median and its values at the 20% and 80% quantiles of the step time (``p20_ms``,
    ``p80_ms``); None where the row has no such value (a ratio without a measured floor).

    Both are monotonic in the step time ``t``, so the step time's quantiles map onto theirs:
    images/s is ``batch / t``, which falls as ``t`` grows, so its 20-80% interval is
    ``batch / p80_ms`` to ``batch / p20_ms``; the ratio is ``t`` over the floor's median, which
    rises with ``t``, so its interval is ``ratio * p20_ms / median_ms`` to
    ``ratio * p80_ms / median_ms``. (Exact where a quantile is one timing; the harness
    interpolates between two timings, in time.) That is the spread of the provider's own step
    times; the floor's shows on the floor's bar. Rows without quantiles have an empty interval.
    """
    if not row.get(key):
        return None
    value = float(row[key])
    if not (row.get("p20_ms") and row.get("p80_ms") and row.get("median_ms")):
        return value, value, value
    median, p20, p80 = float(row["median_ms"]), float(row["p20_ms"]), float(row["p80_ms"])
    if key == "img_per_s":
        return 1e3 * int(row["batch"]) / p80, value, 1e3 * int(row["batch"]) / p20
    return value * p20 / median, value, value * p80 / median


def _title(row: dict, width: float, skip: str = "") -> str:
    """The configuration of a run (without the swept parameter ``skip``), wrapped to leave the top
    right corner of a figure ``width`` inches wide to the legend."""
    parts = [row["model"] + (f" at {row['img_size']} px" if row.get("img_size") else "")
             + (f", {row['global_pool']} pooling" if row.get("global_pool") else "")]
    parts += [f"{k} {row[k]}" for k in ("batch", "prompts") if k != skip]
    if int(row.get("tasks") or 1) > 1:  # older CSVs have no tasks column
        registered = int(row.get("registered") or row["tasks"])
        idle = registered > int(row["tasks"]) and skip != "registered"
        parts.append(f"{row['tasks']} tasks" + (f" of {registered} registered" if idle else ""))
    parts += [row["dtype"], row["device"], f"run {row['timestamp']}"]
    title = ", ".join(parts) + (f" (commit {row['git_commit']})" if row.get("git_commit") else "")
    return textwrap.fill(title, int(14 * (width - 2.6)))  # 9-point text: 15 to 16 characters an inch


def _not_measured(rows: list[dict]) -> str:
    """The providers of ``rows`` that have no measurement, by status, wrapped to fit under a chart."""
    by_status: dict[str, dict[str, None]] = {}
    for r in rows:
        if r["status"] != "ok":
            by_status.setdefault(r["status"], {})[r["provider"]] = None
    text = "; ".join(f"{status}: {', '.join(names)}" for status, names in by_status.items())
    return textwrap.fill(f"not measured ({text}; reasons in results.csv)", 160) if text else ""


def _number(key: str, value: float) -> str:
    if key == "ratio_to_floor":
        return f"{value:.2f}"
    return f"{value:.1f}" if value < 100 else f"{value:,.0f}"


def _throughput(rows: list[dict], missing: str):
    """``throughput.png``: a panel per quantity, providers on the shared y axis, a bar per mode."""
    from matplotlib.figure import Figure

    providers = list(dict.fromkeys(r["provider"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    by_key = {(r["mode"], r["provider"]): r for r in rows}
    keys = ["img_per_s"] + (["ratio_to_floor"] if any(r["ratio_to_floor"] for r in rows) else [])
    # About 0.2 inch per bar: room for a provider name and a number beside each bar.
    size = (1.5 + 5.25 * len(keys), 1.4 + (0.1 + 0.2 * len(modes)) * len(providers))
    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(1, len(keys), sharey=True, squeeze=False)[0]
    height = 0.8 / len(modes)
    for ax, key in zip(axes, keys):
        for j, mode in enumerate(modes):
            ys, values, below, above = [], [], [], []
            for i, provider in enumerate(providers):
                row = by_key.get((mode, provider))
                interval = spread(row, key) if row else None
                if interval:
                    low, value, high = interval
                    ys.append(i + (j - (len(modes) - 1) / 2) * height)
                    values.append(value)
                    below.append(max(value - low, 0.0))
                    above.append(max(high - value, 0.0))
            ax.barh(ys, values, height=0.9 * height, xerr=[below, above], color=f"C{j}", label=mode,
                    error_kw={"elinewidth": 0.9, "capsize": 2, "ecolor": "0.2"})
            for y, value, up in zip(ys, values, above):
                ax.text(value + up, y, f" {_number(key, value)}", va="center", fontsize=7)
        if key == "ratio_to_floor":
            ax.axvline(1.0, color="0.4", linestyle="--", linewidth=0.8)
        ax.set_xlabel(LABELS[key])
        ax.margins(x=0.1)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="y", length=0)
    axes[0].set_yticks(range(len(providers)), providers)
    axes[0].set_ylim(len(providers) - 0.5, -0.5)  # the first provider on top
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside upper right", ncols=len(modes), fontsize=8,
               title="mode (whiskers: 20-80% of the step times)", title_fontsize=8)
    fig.suptitle(_title(rows[0], fig.get_figwidth()), fontsize=9, x=0.02, ha="left")
    if missing:
        fig.supxlabel(missing, fontsize=7, x=0.02, ha="left")
    return fig


def _sweep(rows: list[dict], sweep: str, missing: str):
    """``sweep_<sweep>.png``: a panel per mode, a line per provider over the swept values."""
    from matplotlib.figure import Figure

    providers = list(dict.fromkeys(r["provider"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    key = "ratio_to_floor" if any(r["ratio_to_floor"] for r in rows) else "img_per_s"
    points = sorted({int(r[sweep]) for r in rows})
    fig = Figure(figsize=(2.5 + 4.5 * len(modes), 4.8), layout="constrained")
    axes = fig.subplots(1, len(modes), sharey=True, squeeze=False)[0]
    for ax, mode in zip(axes, modes):
        for k, provider in enumerate(providers):
            curve = sorted(
                (int(r[sweep]), interval) for r in rows
                if (r["mode"], r["provider"]) == (mode, provider) and (interval := spread(r, key))
            )
            if not curve:
                continue
            xs = [x for x, _ in curve]
            low, values, high = zip(*(interval for _, interval in curve))
            style = {"color": f"C{k % 10}", "linestyle": LINE_STYLES[k // 10 % len(LINE_STYLES)]}
            ax.plot(xs, values, marker="o", markersize=3, label=provider, **style)
            ax.fill_between(xs, low, high, color=style["color"], alpha=0.15, linewidth=0)
        if key == "ratio_to_floor":
            ax.axhline(1.0, color="0.4", linestyle="--", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xticks(points, [str(p) for p in points])
        ax.set_xticks([], minor=True)
        ax.set_xlabel(sweep)
        ax.set_title(mode, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(LABELS[key])
    handles = {}
    for ax in axes:
        handles.update(zip(*reversed(ax.get_legend_handles_labels())))
    fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=8,
               title="provider (band: 20-80%)", title_fontsize=8)
    fig.suptitle(_title(rows[0], fig.get_figwidth(), skip=sweep), fontsize=9, x=0.02, ha="left")
    if missing:
        fig.supxlabel(missing, fontsize=7, x=0.02, ha="left")
    return fig


def draw(csv_path: Path, run: Optional[str] = None, out_dir: Optional[Path] = None) -> list[Path]:
    """Draw the charts of run ``run`` (its timestamp; default: the file's last run) into
    ``out_dir`` (default: the CSV's folder); returns the files written.

    Raises:
        ImportError: matplotlib cannot be imported (:func:`install_hint` says what to do).
        NothingToDraw: the CSV has no measured row of that run.
    """
    import matplotlib  # noqa: F401  (raises the ImportError before anything is read)

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise NothingToDraw(f"{csv_path} has no result rows; run vapt-bench --out {Path(csv_path).parent} first")
    run = run or rows[-1]["timestamp"]
    of_run = [r for r in rows if r["timestamp"] == run]
    ok = [r for r in of_run if r["status"] == "ok"]
    if not ok:
        what = "no rows" if not of_run else "no measured rows (every provider n/a or failed)"
        raise NothingToDraw(f"{csv_path} has {what} of a run at {run}; pick another run with --run TIMESTAMP")
    out_dir = Path(out_dir or Path(csv_path).parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    missing = _not_measured(of_run)
    swept = ("batch", "prompts", "registered")
    last = [r for r in ok if all(r.get(k) == ok[-1].get(k) for k in swept)]  # a sweep's last point
    figures = {"throughput.png": _throughput(last, missing)}
    sweep = ok[0]["sweep"]
    if sweep:
        figures[f"sweep_{sweep}.png"] = _sweep(ok, sweep, missing)
    written = []
    for name, fig in figures.items():
        written.append(out_dir / name)
        fig.savefig(written[-1], dpi=120)
    return written


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vapt_kernels.bench.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("csv", type=Path, help="a results.csv written by vapt-bench --out")
    p.add_argument("--run", help="the run's timestamp (default: the last run in the file)")
    p.add_argument("--out", type=Path, help="folder for the PNG files (default: the CSV's folder)")
    args = p.parse_args(argv)
    if not args.csv.is_file():
        p.error(f"{args.csv} is not a file; give the results.csv that vapt-bench --out DIR wrote")
    try:
        paths = draw(args.csv, args.run, args.out)
    except ImportError as err:
        print(f"no charts: matplotlib cannot be imported ({err}); {install_hint(args.csv, args.run)}", file=sys.stderr)
        return 1
    except NothingToDraw as err:
        print(f"no charts: {err}", file=sys.stderr)
        return 1
    for path in paths:
        print(f"chart written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
