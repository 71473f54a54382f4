"""``vapt-bench`` (also ``python -m vapt_kernels.bench``): time VAPT against the frozen ViT and the
official formulation, print the table, and with ``--out`` append the rows to ``results.csv`` (or the
file that :func:`results_file` picks next to it), write ``summary.json`` and draw the run's charts
there (:mod:`vapt_kernels.bench.plot`; not with ``--no-plot``, and without matplotlib only a line
that says how to get them). What is measured and how: :mod:`vapt_kernels.bench.harness`.

Results files are append-only: the bytes of earlier rows are never changed, and every write goes
through a temporary file in the same folder that replaces the file only once it is complete
(:func:`write_atomic`), so a failed write (a full disk included) leaves the previous files as they
were. A file that cannot be read or written ends the run with ``vapt-bench: cannot write PATH:
CAUSE`` and exit status 1. Bad arguments are refused before anything is measured or written (exit
status 2)."""

from __future__ import annotations

import argparse
import copy
import csv
import io
import itertools
import json
import math
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

import torch

from vapt_kernels.config import VAPTConfig
from vapt_kernels.files import OutputError, describe, write_atomic
from vapt_kernels.timm import apply_vapt, apply_vpt

from . import harness, plot

SWEEPS = {"prompts": (1, 10, 50, 100), "batch": (1, 8, 32), "registered": (4, 64, 1024, 4096)}


def _integer(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def _positive(text: str) -> int:
    return _integer(text, 1)


def _non_negative(text: str) -> int:
    return _integer(text, 0)


def _check_tasks(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--tasks K > 1`` needs a fast backend among the providers (it adds their ``-mixed`` and
    ``-loop`` providers) and at least ``K`` images in every batch (image ``i`` belongs to task
    ``i % K``, :class:`harness.MixedBatch`)."""
    if args.tasks == 1:
        if args.registered is not None or args.sweep == "registered":
            p.error("--registered and --sweep registered size the mixed-batch providers, which --tasks K > 1 adds; "
                    "give --tasks")
        return
    if args.registered is not None and args.registered < args.tasks:
        p.error(f"--registered {args.registered} is fewer than the --tasks {args.tasks} of the batch; give "
                f"--registered {args.tasks} or more")

    if not any(harness.PROVIDER_TABLE[n].kind == "fast" for n in args.providers):
        fast = ", ".join(n for n in harness.PROVIDERS if harness.PROVIDER_TABLE[n].kind == "fast")
        p.error(f"--tasks {args.tasks} adds the -mixed and -loop providers of the fast backends in --providers, "
                f"and none is picked; add one of {fast}, or drop --tasks")
    if args.sweep == "batch":
        p.error(f"--sweep batch runs batch {min(SWEEPS['batch'])}, under --tasks {args.tasks} (every batch needs "
                "an image per task); sweep without --tasks, or give --batch with --tasks")
    batch = args.batch or harness.DEVICE_DEFAULTS[args.device]["batch"]
    if batch < args.tasks:
        flag = "--batch is" if args.batch else f"the default batch on {args.device} is"
        p.error(f"--tasks {args.tasks} needs at least {args.tasks} images per batch (one task per image, in turn), "
                f"but {flag} {batch}; give --batch {args.tasks} or more, or fewer --tasks")


def _check_model(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--model`` must be a timm ViT with a patch embedding that builds at ``--img-size``, a
    multiple of its patch size (timm drops the pixels past the last whole patch), and the VAPT and
    VPT-deep providers picked must fit it (:func:`vapt_kernels.timm.apply_vapt`'s checks). Checked on
    the ``meta`` device: no weights are allocated."""
    import timm

    name, size = args.model, args.img_size
    at = f" at --img-size {size}" if size else ""
    if not timm.is_model(name):
        p.error(f"--model {name}: timm has no model of that name; list the ViTs with "
                f"python -c \"import timm; print(timm.list_models('vit_*'))\"")
    kwargs = {"num_classes": harness.NUM_CLASSES} | ({"img_size": size} if size else {})
    kwargs |= {"global_pool": args.global_pool} if args.global_pool else {}
    with torch.device("meta"):
        try:
            model = timm.create_model(name, pretrained=False, **kwargs)
        except Exception as err:  # timm's model classes raise what they like on options they cannot take
            p.error(f"--model {name} cannot be built{at} ({type(err).__name__}: {err}); "
                    "pick a timm VisionTransformer, e.g. vit_small_patch16_224")
        embed = getattr(model, "patch_embed", None)
        if embed is None or not hasattr(embed, "patch_size"):
            p.error(f"--model {name} has no patch embedding (patch_embed): vapt-bench times timm "
                    "VisionTransformers, e.g. vit_small_patch16_224")
        kinds = {harness.PROVIDER_TABLE[n].kind for n in args.providers}
        vapt = bool(kinds & {"official", "fast"})
        config = VAPTConfig(num_prompts=args.prompts or 10)
        if size:
            step = math.lcm(*embed.patch_size)
            # The VAPT providers need a patch grid at least as wide as the convolution kernel.
            least = max(step, config.kernel_size * max(embed.patch_size)) if vapt else step
            if size % step or size < least:
                lower = size // step * step
                sizes = ([f"{lower}"] if lower >= least else []) + [f"{max(lower + step, -(-least // step) * step)}"]
                why = (f"is not a multiple of {name}'s patch size {'x'.join(map(str, embed.patch_size))}" if size % step
                       else f"gives {name} a patch grid smaller than VAPT's {config.kernel_size}x{config.kernel_size} "
                       "convolution kernel")
                p.error(f"--img-size {size} {why}; use {' or '.join(sizes)}")
        try:
            if vapt:
                apply_vapt(copy.deepcopy(model), config)
            if "vpt-deep" in kinds:
                apply_vpt(copy.deepcopy(model), num_prompts=config.num_prompts)
        except (TypeError, ValueError) as err:
            p.error(f"--model {name}{at} does not take prompts: {err}")


def _check_out(p: argparse.ArgumentParser, out: Path) -> None:
    """``--out`` must be a folder, or missing under a folder, that this user can write in, and must
    not hold a folder named ``summary.json``."""
    if out.exists() and not out.is_dir():
        p.error(f"--out {out} is a file; give a folder (it is created if missing)")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        p.error(f"--out {out}: {existing} is a file, not a folder; give a folder (it is created if missing)")
    if not os.access(existing, os.W_OK | os.X_OK):
        p.error(f"--out {out}: cannot write in {existing} (permission denied); give a folder you can write to")
    if (out / "summary.json").is_dir():
        p.error(f"--out {out}: {out / 'summary.json'} is a folder; move it away or give another --out")


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
    p.add_argument("--global-pool", choices=["token", "avg"],
                   help="the model's pooling (default: the model's); avg pools the tokens as the official MAE "
                        "model does, and VAPT then pools its last block's prompt outputs too")
    p.add_argument("--batch", type=_positive, help=f"batch size (default: {cpu['batch']} on CPU, {cuda['batch']} on CUDA)")
    p.add_argument("--prompts", type=_positive, help="prompts per block (default: 10)")
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
    p.add_argument("--registered", type=_positive, default=None,
                   help="R >= K: tasks registered in the -mixed providers' model, K in the batch and R - K idle "
                   "(default: K)")
    p.add_argument("--sweep", choices=list(SWEEPS),
                   help="repeat over prompt counts (1, 10, 50, 100), batch sizes (1, 8, 32) or registered tasks (K, 64, "
                   "1024, 4096 with --tasks K)")
    p.add_argument("--compile", action="store_true",
                   help="also torch.compile the floor, vapt-official and the last available fast backend")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--out", type=Path,
                   help="folder to append results.csv to (one of other columns or with a torn last line is left "
                   "as it is and the rows go to results-1.csv, results-2.csv, ...) and write summary.json and the "
                   "PNG charts in; without it nothing is written")
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
    if args.sweep and getattr(args, args.sweep) is not None:
        p.error(f"--sweep {args.sweep} runs {args.sweep} {', '.join(map(str, SWEEPS[args.sweep]))} in turn, "
                f"so --{args.sweep} {getattr(args, args.sweep)} would be ignored; drop one of them")
    args.model = args.model or harness.DEVICE_DEFAULTS[args.device]["model"]
    _check_tasks(p, args)
    _check_model(p, args)
    if args.out is not None:
        args.out = args.out.resolve()
        _check_out(p, args.out)
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


def _unfit_for_rows(path: Path) -> Optional[str]:
    """Why the file at ``path`` cannot take more rows (None: it can, or it is missing or empty). It
    can when it is UTF-8 CSV whose header is :data:`harness.CSV_FIELDS` and whose last line ends
    with a line break and has one field per column."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        return "is a folder"
    except OSError as err:
        raise OutputError(f"cannot read {path}: {describe(err)}") from err
    if not data:
        return None
    try:
        text = data.decode("utf-8")
        records = [r for r in csv.reader(io.StringIO(text, newline=""), strict=True) if r]
    except (UnicodeDecodeError, csv.Error) as err:
        return f"is not a CSV file this version can read ({err})"
    if not records or records[0] != harness.CSV_FIELDS:
        return "has other columns than this version writes"
    if not text.endswith("\n"):
        return "ends in an incomplete line (no line break)"
    if len(records[-1]) != len(harness.CSV_FIELDS):
        return f"ends in an incomplete line ({len(records[-1])} fields, not {len(harness.CSV_FIELDS)})"
    return None


def results_file(path: Path) -> tuple[Path, list[str]]:
    """The file that takes the rows meant for ``path`` (``DIR/results.csv``), and a note per file
    passed over.

    The rule: the first of ``results.csv``, ``results-1.csv``, ``results-2.csv``, ... (in ``path``'s
    folder) that is missing, empty, or a CSV of this version's columns (:data:`harness.CSV_FIELDS`)
    whose last line is complete. A file of other columns (an older version's, or not vapt-bench's)
    or with a torn last line (a write cut short) is left as it is, so a later run keeps appending
    to the same numbered file."""
    notes = []
    for n in itertools.count():  # ends at the latest at the first missing name
        candidate = path if n == 0 else path.with_name(f"{path.stem}-{n}{path.suffix}")
        why = _unfit_for_rows(candidate)
        if why is None:
            return candidate, notes
        notes.append(f"{candidate} {why}: left as it is")


def append_csv(path: Path, rows: list[dict]) -> tuple[Path, list[str]]:
    """Append ``rows`` to the file :func:`results_file` picks for ``path`` (with the header where it
    is new), without touching its earlier bytes: the old content and the rows replace the file in
    one step (:func:`write_atomic`). Returns the file and the notes of :func:`results_file`.

    Raises:
        OutputError: a file could not be read or written; every file is as it was.
    """
    target, notes = results_file(path)
    try:
        old = target.read_bytes()
    except FileNotFoundError:
        old = b""
    except OSError as err:
        raise OutputError(f"cannot read {target}: {describe(err)}") from err
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=harness.CSV_FIELDS)
    if not old:
        writer.writeheader()
    writer.writerows(rows)
    write_atomic(target, lambda f: f.write(old + text.getvalue().encode("utf-8")))
    return target, notes


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    harness.keep_freed_memory()
    base = harness.BenchConfig.for_device(
        args.device, model=args.model, batch=args.batch, prompts=args.prompts, dtype=args.dtype, steps=args.steps,
        warmup=args.warmup, img_size=args.img_size, global_pool=args.global_pool, providers=args.providers,
        modes=args.modes,
        memory=not args.no_memory, compile=args.compile, tasks=args.tasks, registered=args.registered,
    )
    env = harness.row_environment(args.device)
    values = SWEEPS.get(args.sweep, ())
    if args.sweep == "registered":  # from the K tasks of the batch alone
        values = sorted({args.tasks, *(v for v in values if v > args.tasks)})
    configs = [replace(base, **{args.sweep: value}) for value in values] if args.sweep else [base]
    out = args.out
    summary = {
        "timestamp": env["timestamp"], "git_commit": env["git_commit"], "device": env["device"], "timing": env["timing"],
        "versions": {k: env[k] for k in ("torch", "triton", "timm", "vapt_kernels")}, "sweep": args.sweep,
        "results_csv": None, "runs": [],
    }
    written: dict[Path, None] = {}  # the CSV files that got rows, in order
    notes: dict[str, None] = {}
    for cfg in configs:
        tasks = f" | {cfg.tasks} tasks" if cfg.tasks > 1 else ""
        if (cfg.registered or cfg.tasks) > cfg.tasks:
            tasks += f" of {cfg.registered} registered"
        print(f"{cfg.model} | batch {cfg.batch} | {cfg.prompts} prompts{tasks} | {cfg.dtype} | {env['device']} | "
              f"{cfg.steps} timed steps after {cfg.warmup} warm-up, interleaved ({env['timing']})", flush=True)
        rows = harness.result_rows(cfg, harness.measure(cfg), env, args.sweep)
        ratios = format_task_ratios(rows)
        print(format_table(rows) + ("\n" + ratios if ratios else "") + "\n", flush=True)
        summary["runs"].append({"config": asdict(cfg), "rows": rows})
        if out:  # after every configuration, so that an interrupted sweep keeps what it measured
            try:
                write_results(out, rows, summary, written, notes)
            except OutputError as err:
                print(f"vapt-bench: {err}", file=sys.stderr)
                return 1
    if out is None:
        return 0
    print("\n".join([*notes, *(f"results appended to {path}" for path in written),
                     f"summary written to {out / 'summary.json'}"]))
    if args.plot:
        draw_charts(list(written)[-1], env["timestamp"])
    return 0


def write_results(out: Path, rows: list[dict], summary: dict, written: dict[Path, None], notes: dict[str, None]) -> None:
    """Append ``rows`` to ``out``'s results file (:func:`append_csv`) and write ``summary`` naming
    it to ``out/summary.json`` (:func:`write_atomic`); adds the file to ``written`` and the notes
    of the files passed over to ``notes``.

    Raises:
        OutputError: a file could not be created, read or written; every file is as it was.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot write {out}: {describe(err)}") from err
    path, passed_over = append_csv(out / "results.csv", rows)
    written[path] = None
    notes.update(dict.fromkeys(passed_over))
    summary["results_csv"] = str(path)
    write_atomic(out / "summary.json", lambda f: f.write((json.dumps(summary, indent=2) + "\n").encode("utf-8")))


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
    except OSError as err:
        where = f" {err.filename}" if err.filename else ""
        print(f"charts not drawn: cannot write{where}: {describe(err)}; draw them elsewhere with "
              f"python -m vapt_kernels.bench.plot {csv_path} --run {run} --out DIR", file=sys.stderr)
        return
    for path in paths:
        print(f"chart written to {path}")
