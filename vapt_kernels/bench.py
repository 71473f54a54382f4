"""``vapt-bench``: throughput of VAPT against the frozen ViT and the official formulation.

Every provider is built in one process from the same backbone weights, fed the same images, and
timed interleaved (the order rotates every repetition) so that machine drift hits all alike.
Results go to stdout as a table, to ``<out>/results.csv`` (appended, one row per provider and
mode, with device, versions, git commit and the full config) and to ``<out>/summary.json``.

Providers:
    floor           frozen timm ViT, no prompts; training: forward + backward with the gradient
                    flowing to the token embeddings through every block, no weight gradients;
                    inference: the plain ViT.
    vpt-deep        static deep prompts, official formulation (extra tokens through every block).
    vapt-official   VAPT, official formulation (the ``reference`` backend).
    vapt-<backend>  VAPT on a fast backend (torch, triton, native); unavailable ones are reported
                    as ``n/a (reason)``.
    <name>+compile  with ``--compile``: ``torch.compile`` of the floor, of vapt-official and of the
                    last available fast backend (ratios stay relative to the eager floor).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the timed steps; on CPU the growth
of the peak resident set size during two steps, measured in a fresh subprocess per provider and
mode (Linux ``VmHWM`` after resetting it with ``/proc/self/clear_refs``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import ctypes
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import vapt_kernels as vk
from vapt_kernels.ops import available_backends

FAST_BACKENDS = ("torch", "triton", "native")
PROVIDERS = ("floor", "vpt-deep", "vapt-official") + tuple(f"vapt-{b}" for b in FAST_BACKENDS)
MODES = ("train", "infer")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SWEEPS = {"prompts": (1, 10, 50, 100), "batch": (1, 8, 32)}
CSV_FIELDS = [
    "timestamp", "git_commit", "device", "torch", "triton", "timm", "vapt_kernels", "model", "img_size",
    "batch", "prompts", "dtype", "steps", "warmup", "mode", "provider", "status", "reason", "median_ms",
    "p20_ms", "p80_ms", "img_per_s", "ratio_to_floor", "peak_mem_mb", "mem_method",
]


@dataclass
class BenchConfig:
    """What one benchmark run measures (see ``vapt-bench --help``)."""

    model: str
    batch: int
    prompts: int
    dtype: str
    device: str
    steps: int
    warmup: int
    img_size: Optional[int] = None
    providers: tuple = ()
    modes: tuple = MODES
    memory: bool = True
    compile: bool = False
    seed: int = 0


@dataclass
class Result:
    provider: str
    mode: str
    status: str = "ok"  # ok | n/a | error
    reason: str = ""
    times: list = field(default_factory=list)
    peak_mem_mb: Optional[float] = None

    def median_ms(self) -> Optional[float]:
        return 1e3 * statistics.median(self.times) if self.times else None

    def quantile_ms(self, q: float) -> Optional[float]:
        if len(self.times) < 2:
            return self.median_ms()
        return 1e3 * statistics.quantiles(self.times, n=100, method="inclusive")[int(q * 100) - 1]


class Unavailable(Exception):
    """A provider that cannot run here; the message says why."""


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------


def keep_freed_memory() -> None:
    """Ask glibc to keep freed blocks instead of unmapping them.

    With its defaults, every large activation is a fresh ``mmap`` and pays page faults on first
    touch, which adds milliseconds of noise per step that depends on allocation order. This
    applies equally to every provider in the process; it changes nothing on other platforms.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD: the largest value glibc accepts
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except OSError:
        pass


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    import timm

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    return {"torch": torch.__version__, "triton": triton_version, "timm": timm.__version__, "vapt_kernels": vk.__version__}


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# --------------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------------


def build_backbone(cfg: BenchConfig) -> torch.nn.Module:
    import timm

    kwargs = {"num_classes": 100}
    if cfg.img_size:
        kwargs["img_size"] = cfg.img_size
    torch.manual_seed(cfg.seed)
    return timm.create_model(cfg.model, pretrained=False, **kwargs).to(cfg.device).eval()


def _floor(base: torch.nn.Module) -> torch.nn.Module:
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    # The activation gradient must reach the token embeddings through every block.
    model.patch_embed.register_forward_hook(lambda module, args, out: out.requires_grad_(torch.is_grad_enabled()))
    return model


def build_providers(cfg: BenchConfig, base: torch.nn.Module) -> dict[str, object]:
    """Provider name -> model, or -> an ``Unavailable`` saying why it cannot run."""
    models: dict[str, object] = {}
    vapt = None
    reasons = available_backends()
    for name in cfg.providers:
        try:
            if name == "floor":
                models[name] = _floor(base)
            elif name == "vpt-deep":
                models[name] = vk.apply_vpt(copy.deepcopy(base), num_prompts=cfg.prompts, backend="reference")
            else:
                backend = "reference" if name == "vapt-official" else name.removeprefix("vapt-")
                reason = reasons.get(backend, f"backend {backend!r} is not part of this build")
                if reason:
                    raise Unavailable(reason)
                if vapt is None:  # one set of prompt parameters, copied to every VAPT provider
                    vapt = vk.apply_vapt(copy.deepcopy(base), vk.VAPTConfig(num_prompts=cfg.prompts))
                model = copy.deepcopy(vapt)
                vk.set_backend(model, backend)
                models[name] = model
        except Unavailable as err:
            models[name] = err
    if cfg.compile:
        fast = [n for n in cfg.providers if n.startswith("vapt-") and n != "vapt-official" and not isinstance(models.get(n), Exception)]
        for name in ["floor", "vapt-official"] + fast[-1:]:
            if isinstance(models.get(name), torch.nn.Module):
                models[f"{name}+compile"] = torch.compile(copy.deepcopy(models[name]))
    return models


def make_step(model: torch.nn.Module, mode: str, x: torch.Tensor, y: torch.Tensor, cfg: BenchConfig) -> Callable[[], None]:
    """One training step (forward, loss, backward, gradients cleared) or one inference forward."""
    if cfg.dtype == "fp32":
        autocast = contextlib.nullcontext()
    else:
        autocast = torch.autocast(device_type=x.device.type, dtype=DTYPES[cfg.dtype])
    params = [p for p in model.parameters() if p.requires_grad]

    def train_step() -> None:
        with autocast:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        for p in params:
            p.grad = None

    def infer_step() -> None:
        with torch.no_grad(), autocast:
            model(x)

    return train_step if mode == "train" else infer_step


def inputs(cfg: BenchConfig, base: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    size = base.patch_embed.img_size
    x = torch.randn(cfg.batch, 3, *size, generator=gen).to(cfg.device)
    y = torch.randint(0, 100, (cfg.batch,), generator=gen).to(cfg.device)
    return x, y


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def _timed(step: Callable[[], None], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


class Progress:
    """One status line on stderr: what runs now and how much is left."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self.live = sys.stderr.isatty()
        self.last_mode = None

    def tick(self, text: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self.live:
            sys.stderr.write(f"\r\033[K[{self.done}/{self.total}] {text}")
        elif text.split()[0] != self.last_mode:  # a log, not a terminal: one line per mode
            self.last_mode = text.split()[0]
            sys.stderr.write(f"[{self.done}/{self.total}] {self.last_mode} ...\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.live:
            sys.stderr.write("\r\033[K")


def run_mode(
    cfg: BenchConfig, models: dict, mode: str, x: torch.Tensor, y: torch.Tensor, progress: Progress
) -> list[Result]:
    results = {name: Result(name, mode) for name in models}
    steps = {}
    for name, model in models.items():
        if isinstance(model, Exception):
            results[name].status, results[name].reason = "n/a", str(model)
            continue
        model.train(mode == "train")
        steps[name] = make_step(model, mode, x, y, cfg)
    runnable = list(steps)
    for rep in range(cfg.warmup + cfg.steps):
        order = runnable[rep % max(len(runnable), 1) :] + runnable[: rep % max(len(runnable), 1)]
        for name in order:
            if results[name].status != "ok":
                continue
            progress.tick(f"{mode} {'warm-up' if rep < cfg.warmup else 'step'} {name}")
            try:
                elapsed = _timed(steps[name], cfg.device)
            except Exception as err:  # a failing provider must not take the others down
                results[name].status, results[name].reason = "error", f"{type(err).__name__}: {err}"
                continue
            if rep >= cfg.warmup:
                results[name].times.append(elapsed)
    return list(results.values())


def measure_cpu_memory(cfg: BenchConfig, provider: str, mode: str) -> Optional[float]:
    """Peak RSS growth (MiB) of two steps of one provider, in a fresh interpreter."""
    probe = dict(asdict(cfg), providers=[provider], modes=[mode])
    try:
        out = subprocess.run(
            [sys.executable, "-m", "vapt_kernels.bench", "--memory-probe", json.dumps(probe)],
            capture_output=True, text=True, timeout=600,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
    except (subprocess.SubprocessError, ValueError, IndexError, KeyError, OSError):
        return None


def _status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise KeyError(field_name)


def memory_probe(probe: dict) -> None:
    """Child side of :func:`measure_cpu_memory`: prints ``{"peak_mb": ...}``."""
    import gc

    cfg = BenchConfig(**{**probe, "providers": tuple(probe["providers"]), "modes": tuple(probe["modes"])})
    keep_freed_memory()
    base = build_backbone(cfg)
    models = build_providers(cfg, base)
    (name,) = cfg.providers
    model = models[name]
    if isinstance(model, Exception):
        print(json.dumps({"peak_mb": None}))
        return
    x, y = inputs(cfg, base)
    model.train(cfg.modes[0] == "train")
    step = make_step(model, cfg.modes[0], x, y, cfg)
    del base, models
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    before = _status_kib("VmRSS")
    for _ in range(2):
        step()
    print(json.dumps({"peak_mb": (_status_kib("VmHWM") - before) / 1024}))


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def result_rows(cfg: BenchConfig, results: list[Result], meta: dict) -> list[dict]:
    floor = {r.mode: r.median_ms() for r in results if r.provider == "floor" and r.status == "ok"}
    rows = []
    for r in results:
        med = r.median_ms()
        rows.append({
            **meta,
            "model": cfg.model, "img_size": cfg.img_size or "", "batch": cfg.batch, "prompts": cfg.prompts,
            "dtype": cfg.dtype, "steps": cfg.steps, "warmup": cfg.warmup, "mode": r.mode, "provider": r.provider,
            "status": r.status, "reason": r.reason,
            "median_ms": _round(med), "p20_ms": _round(r.quantile_ms(0.2)), "p80_ms": _round(r.quantile_ms(0.8)),
            "img_per_s": _round(cfg.batch / med * 1e3) if med else "",
            "ratio_to_floor": _round(med / floor[r.mode], 4) if med and floor.get(r.mode) else "",
            "peak_mem_mb": _round(r.peak_mem_mb), "mem_method": meta["mem_method"] if r.peak_mem_mb is not None else "",
        })
    return rows


def _round(v, nd=2):
    return "" if v is None else round(v, nd)


def format_table(rows: list[dict]) -> str:
    """The human-readable table: one line per provider and mode; unavailable ones say why."""
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
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(header)]
    widths[1] = max([widths[1]] + [len(r["provider"]) for r in rows])
    line = lambda cs: "  ".join(c.ljust(w) for c, w in zip(cs, widths)).rstrip()  # noqa: E731
    out = [line(header), line(["-" * w for w in widths])] + [line(c) for c in cells]
    out += [
        line([r["mode"], r["provider"]]) + f"  {r['status']} ({r['reason']})" for r in rows if r["status"] != "ok"
    ]
    return "\n".join(out)


def write_results(rows: list[dict], out_dir: Path, summary: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.csv"
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def plot(runs: list[dict], out_dir: Path) -> list[Path]:
    """PNG charts: img/s and ratio to the floor per provider; a line chart for a prompt sweep."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib: pip install 'vapt_kernels[plot]'", file=sys.stderr)
        return []
    written = []
    last = runs[-1]
    ok = [r for r in last["rows"] if r["status"] == "ok"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "img_per_s", "images / s"), (axes[1], "ratio_to_floor", "time / floor")):
        for i, mode in enumerate(MODES):
            sel = [r for r in ok if r["mode"] == mode]
            ax.bar([j + 0.4 * i for j in range(len(sel))], [r[key] for r in sel], width=0.4, label=mode)
            ax.set_xticks([j + 0.2 for j in range(len(sel))], [r["provider"] for r in sel], rotation=20)
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"{last['config']['model']}, batch {last['config']['batch']}, {last['device']}")
    fig.tight_layout()
    written.append(out_dir / "throughput.png")
    fig.savefig(written[-1], dpi=120)
    if len(runs) > 1:
        sweep = runs[0]["sweep"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for mode in MODES:
            for provider in sorted({r["provider"] for run in runs for r in run["rows"] if r["status"] == "ok" and r["mode"] == mode}):
                pts = [(run["config"][sweep], r["ratio_to_floor"]) for run in runs for r in run["rows"]
                       if r["provider"] == provider and r["mode"] == mode and r["status"] == "ok"]
                ax.plot(*zip(*sorted(pts)), marker="o", label=f"{provider} ({mode})")
        ax.set_xlabel(sweep)
        ax.set_ylabel("time / floor")
        ax.set_xscale("log")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out_dir / f"sweep_{sweep}.png")
        fig.savefig(written[-1], dpi=120)
    return written


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="vapt-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--model", help="timm model name (default: vit_small_patch16_224 on CPU, vit_base_patch16_224 on CUDA)")
    p.add_argument("--img-size", type=int, help="image size (default: the model's)")
    p.add_argument("--batch", type=int, help="batch size (default: 8 on CPU, 128 on CUDA)")
    p.add_argument("--prompts", type=int, default=10, help="prompts per block (default: 10)")
    p.add_argument("--dtype", choices=list(DTYPES), help="fp32, or autocast bf16/fp16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--steps", type=int, help="timed steps per provider (default: 15 on CPU, 30 on CUDA)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per provider first (default: 2)")
    p.add_argument("--providers", help=f"comma-separated subset of {', '.join(PROVIDERS)} (default: all)")
    p.add_argument("--modes", default="train,infer", help="train, infer or both (default: train,infer)")
    p.add_argument("--sweep", choices=list(SWEEPS), help="repeat over prompts (1,10,50,100) or batch sizes")
    p.add_argument("--compile", action="store_true", help="also torch.compile the floor, the official and the fastest VAPT path")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--out", default="benchmarks/results", help="folder for results.csv, summary.json, plots")
    p.add_argument("--plot", action="store_true", help="write PNG charts (needs matplotlib)")
    p.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_probe:
        return args
    on_cuda = args.device.startswith("cuda")
    if on_cuda and not cuda:
        p.error("--device cuda: no CUDA device is visible to PyTorch here")
    args.model = args.model or ("vit_base_patch16_224" if on_cuda else "vit_small_patch16_224")
    args.batch = args.batch or (128 if on_cuda else 8)
    args.dtype = args.dtype or ("bf16" if on_cuda else "fp32")
    args.steps = args.steps or (30 if on_cuda else 15)
    providers = tuple(args.providers.split(",")) if args.providers else PROVIDERS
    unknown = [n for n in providers if n not in PROVIDERS]
    if unknown:
        p.error(f"unknown provider(s) {', '.join(unknown)}; choose from {', '.join(PROVIDERS)}")
    modes = tuple(args.modes.split(","))
    if not set(modes) <= set(MODES) or not modes:
        p.error(f"--modes takes train, infer or train,infer; got {args.modes!r}")
    if min(args.batch, args.prompts, args.steps) < 1 or args.warmup < 0:
        p.error("--batch, --prompts and --steps must be positive and --warmup non-negative")
    args.providers, args.modes = providers, modes
    return args


def run(cfg: BenchConfig, out_dir: Path, sweep: Optional[str] = None, show_progress: bool = True) -> dict:
    """Benchmark one configuration; returns its summary (rows included) after writing results."""
    library_versions = versions()
    meta = {
        "timestamp": _dt.datetime.now().isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "device": device_name(cfg.device),
        **library_versions,
        "mem_method": "cuda max_memory_allocated" if cfg.device.startswith("cuda") else "cpu peak RSS growth, subprocess",
    }
    base = build_backbone(cfg)
    models = build_providers(cfg, base)
    x, y = inputs(cfg, base)
    runnable = sum(not isinstance(m, Exception) for m in models.values())
    progress = Progress(len(cfg.modes) * runnable * (cfg.warmup + cfg.steps), show_progress)
    results = []
    for mode in cfg.modes:
        results += run_mode(cfg, models, mode, x, y, progress)
    progress.close()
    if cfg.memory:
        for r in results:
            if r.status != "ok":
                continue
            if cfg.device.startswith("cuda"):
                r.peak_mem_mb = cuda_peak_memory(models[r.provider], r.mode, x, y, cfg)
            elif "+compile" not in r.provider:
                r.peak_mem_mb = measure_cpu_memory(cfg, r.provider, r.mode)
    rows = result_rows(cfg, results, meta)
    summary = {"device": meta["device"], "versions": library_versions, "git_commit": meta["git_commit"],
               "config": asdict(cfg), "sweep": sweep, "rows": rows}
    write_results(rows, out_dir, summary)
    return summary


def cuda_peak_memory(model, mode, x, y, cfg) -> float:
    """Peak CUDA memory (MiB) of one step of one provider, after one step to settle."""
    model.train(mode == "train")
    step = make_step(model, mode, x, y, cfg)
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_probe:
        memory_probe(json.loads(args.memory_probe))
        return 0
    keep_freed_memory()
    out_dir = Path(args.out)
    base_cfg = BenchConfig(
        model=args.model, batch=args.batch, prompts=args.prompts, dtype=args.dtype, device=args.device,
        steps=args.steps, warmup=args.warmup, img_size=args.img_size, providers=args.providers,
        modes=args.modes, memory=not args.no_memory, compile=args.compile,
    )
    values = SWEEPS[args.sweep] if args.sweep else [None]
    runs = []
    for value in values:
        cfg = base_cfg if value is None else BenchConfig(**{**asdict(base_cfg), args.sweep: value})
        print(f"{cfg.model} | batch {cfg.batch} | {cfg.prompts} prompts | {cfg.dtype} | {device_name(cfg.device)} | "
              f"{cfg.steps} timed steps after {cfg.warmup} warm-up, interleaved", flush=True)
        summary = run(cfg, out_dir, sweep=args.sweep)
        print(format_table(summary["rows"]) + "\n", flush=True)
        runs.append(summary)
    if args.plot:
        for path in plot(runs, out_dir):
            print(f"wrote {path}")
    print(f"results appended to {out_dir / 'results.csv'}; summary in {out_dir / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
