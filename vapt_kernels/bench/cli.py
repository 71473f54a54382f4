"""``vapt-bench`` (also ``python -m vapt_kernels.bench``): time VAPT against the frozen ViT and the
official formulation, print the table, and with ``--out`` append the rows to ``results.csv``, write
``summary.json`` and draw the run's charts there (:mod:`vapt_kernels.bench.plot`; not with
``--no-plot``, and without matplotlib only a line that says how to get them). What is measured and
how: :mod:`vapt_kernels.bench.harness`."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

import torch

from . import harness, plot

SWEEPS = {"prompts": (1, 10, 50, 100), "batch": (1, 8, 32)}


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The command line, with the per-device defaults filled in."""
    cpu, cuda = harness.DEVICE_DEFAULTS["cpu"], harness.DEVICE_DEFAULTS["cuda"]
    p = argparse.ArgumentParser(
        prog="vapt-bench",
        description="Time one training step and one inference forward of VAPT against the frozen ViT "
        "(the floor) and the official formulation, all providers interleaved in one process.",
        epilog="Without --out nothing is written: the table is only printed. With --out the charts are drawn "
        "too, unless --no-plot.",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", help=f"timm model name (default: {cpu['model']} on CPU, {cuda['model']} on CUDA)")
    p.add_argument("--img-size", type=_positive, help="image size (default: the model's)")
    p.add_argument("--batch", type=_positive, help=f"batch size (default: {cpu['batch']} on CPU, {cuda['batch']} on CUDA)")
    p.add_argument("--prompts", type=_positive, default=10, help="prompts per block (default: 10)")
    p.add_argument("--dtype", choices=list(harness.DTYPES),
                   help=f"fp32, or autocast bf16/fp16 (default: {cpu['dtype']} on CPU, {cuda['dtype']} on CUDA)")
    p.add_argument("--steps", type=_positive,
                   help=f"timed steps per provider (default: {cpu['steps']} on CPU, {cuda['steps']} on CUDA)")
    p.add_argument("--warmup", type=_non_negative, default=2, help="untimed steps per provider first (default: 2)")
    p.add_argument("--providers", nargs="+", choices=harness.PROVIDERS, default=list(harness.PROVIDERS),
                   metavar="PROVIDER", help=f"any of {', '.join(harness.PROVIDERS)} (default: all)")
    p.add_argument("--modes", nargs="+", choices=harness.MODES, default=list(harness.MODES),
                   help="train, infer or both (default: both)")
    p.add_argument("--tasks", type=_positive, default=1,
                   help="K > 1: add vapt-<backend>-mixed (one batch mixing K tasks, vapt_kernels.MultiTaskVAPT) and "
                   "vapt-<backend>-loop (one call per task on its images) for every fast backend (default: 1)")
    p.add_argument("--sweep", choices=list(SWEEPS),
                   help="repeat over prompt counts (1, 10, 50, 100) or batch sizes (1, 8, 32)")
    p.add_argument("--compile", action="store_true",
                   help="also torch.compile the floor, vapt-official and the last available fast backend")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--out", type=Path,
                   help="folder to append results.csv to and write summary.json and the PNG charts in; "
                   "without it nothing is written")
    p.add_argument("--plot", action=argparse.BooleanOptionalAction,
                   help="draw the PNG charts of the run into --out: the default there (needs matplotlib: "
                   "pip install 'vapt_kernels[plot]'); --no-plot skips them")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to PyTorch here")
    if args.plot and args.out is None:
        p.error("--plot draws into the --out folder; give --out DIR (with it the charts are drawn by default)")
    if args.plot is None:
        args.plot = args.out is not None
    args.providers = tuple(dict.fromkeys(args.providers))
    args.modes = tuple(dict.fromkeys(args.modes))
    return args


def format_table(rows: list[dict]) -> str:
    """The human-readable table: one line per measured provider and mode; after it, one line per
    provider and mode that failed, with its error, and one line per reason that providers are
    unavailable (status ``n/a``), naming them and the modes:
    ``n/a  vapt-triton, vapt-triton-mixed (train, infer): <reason>``."""
    header = ["mode", "provider", "median ms", "p20-p80 ms", "img/s", "x floor", "peak MiB"]
    cells = [
        [
            r["mode"], r["provider"], f"{r['median_ms']:.1f}", f"{r['p20_ms']:.1f}-{r['p80_ms']:.1f}",
            f"{r['img_per_s']:.1f}", "" if r["ratio_to_floor"] == "" else f"{r['ratio_to_floor']:.3f}",
            "" if r["peak_mem_mb"] == "" else f"{r['peak_mem_mb']:.0f}",
        ]
        for r in rows
        if r["status"] == "ok"
    ]
    failed = [r for r in rows if r["status"] not in ("ok", "n/a")]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(header)]
    widths[1] = max([widths[1]] + [len(r["provider"]) for r in failed])
    line = lambda cs: "  ".join(c.ljust(w) for c, w in zip(cs, widths)).rstrip()  # noqa: E731
    out = [line(header), line(["-" * w for w in widths])] + [line(c) for c in cells]
    out += [line([r["mode"], r["provider"]]) + f"  {r['status']} ({r['reason']})" for r in failed]
    unavailable: dict[str, tuple[dict[str, None], dict[str, None]]] = {}  # reason -> providers, modes
    for r in rows:
        if r["status"] == "n/a":
            providers, modes = unavailable.setdefault(r["reason"], ({}, {}))
            providers[r["provider"]] = modes[r["mode"]] = None
    out += [f"n/a  {', '.join(providers)} ({', '.join(modes)}): {reason}" for reason, (providers, modes) in unavailable.items()]
    return "\n".join(out)


def format_task_ratios(rows: list[dict]) -> str:
    """For every ``vapt-<backend>-mixed`` provider: its time over the single-task provider's on the
    same batch, and the loop's over it; empty without them."""
    median = {(r["mode"], r["provider"]): r["median_ms"] for r in rows if r["status"] == "ok"}
    lines = []
    for (mode, provider), mixed in median.items():
        backend = harness.PROVIDER_TABLE[provider].backend
        if harness.PROVIDER_TABLE[provider].kind == "mixed":
            single, loop = harness.provider_name("fast", backend), harness.provider_name("loop", backend)
            parts = [f"{mode} {provider}:"]
            if (mode, single) in median:
                parts.append(f"{mixed / median[mode, single]:.3f}x {single}")
            if (mode, loop) in median:
                parts.append(f"loop {median[mode, loop] / mixed:.2f}x slower")
            lines.append(" ".join(parts))
    return "\n".join(lines)


def append_csv(path: Path, rows: list[dict]) -> None:
    """Append ``rows`` to the CSV at ``path``; a file with other columns (an older version's) is
    rewritten first under the union of its columns and :data:`harness.CSV_FIELDS`."""
    fields = list(harness.CSV_FIELDS)
    old: list[dict] = []
    mode = "a" if path.exists() else "w"
    if mode == "a":
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            if header != fields:
                fields = header + [name for name in fields if name not in header]
                old, mode = list(reader), "w"
    with path.open(mode, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if mode == "w":
            writer.writeheader()
        writer.writerows(old + rows)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    harness.keep_freed_memory()
    base = harness.BenchConfig.for_device(
        args.device, model=args.model, batch=args.batch, prompts=args.prompts, dtype=args.dtype, steps=args.steps,
        warmup=args.warmup, img_size=args.img_size, providers=args.providers, modes=args.modes,
        memory=not args.no_memory, compile=args.compile, tasks=args.tasks,
    )
    env = harness.row_environment(args.device)
    configs = [replace(base, **{args.sweep: value}) for value in SWEEPS[args.sweep]] if args.sweep else [base]
    out = args.out.resolve() if args.out else None
    summary = {
        "timestamp": env["timestamp"], "git_commit": env["git_commit"], "device": env["device"], "timing": env["timing"],
        "versions": {k: env[k] for k in ("torch", "triton", "timm", "vapt_kernels")}, "sweep": args.sweep, "runs": [],
    }
    for cfg in configs:
        tasks = f" | {cfg.tasks} tasks" if cfg.tasks > 1 else ""
        print(f"{cfg.model} | batch {cfg.batch} | {cfg.prompts} prompts{tasks} | {cfg.dtype} | {env['device']} | "
              f"{cfg.steps} timed steps after {cfg.warmup} warm-up, interleaved ({env['timing']})", flush=True)
        rows = harness.result_rows(cfg, harness.measure(cfg), env, args.sweep)
        ratios = format_task_ratios(rows)
        print(format_table(rows) + ("\n" + ratios if ratios else "") + "\n", flush=True)
        summary["runs"].append({"config": asdict(cfg), "rows": rows})
        if out:  # after every configuration, so that an interrupted sweep keeps what it measured
            out.mkdir(parents=True, exist_ok=True)
            append_csv(out / "results.csv", rows)
            (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if out is None:
        return 0
    print(f"results appended to {out / 'results.csv'}\nsummary written to {out / 'summary.json'}")
    if args.plot:
        draw_charts(out / "results.csv", env["timestamp"])
    return 0


def draw_charts(csv_path: Path, run: str) -> None:
    """Draw the charts of ``run`` next to ``csv_path`` and name them, or say in one line on stderr
    why none were drawn and how to get them; never fails the benchmark."""
    try:
        paths = plot.draw(csv_path, run=run)
    except ImportError as err:
        print(f"charts not drawn: matplotlib cannot be imported ({err}); {plot.install_hint(csv_path, run)}",
              file=sys.stderr)
        return
    except plot.NothingToDraw as err:
        print(f"charts not drawn: {err}", file=sys.stderr)
        return
    for path in paths:
        print(f"chart written to {path}")
