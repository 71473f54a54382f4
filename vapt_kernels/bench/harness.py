"""The measurement harness of ``vapt-bench``: providers, steps, interleaved timing, peak memory, rows.

Every provider is built in one process from the same backbone weights (the VAPT providers also
share one set of prompt parameters) and fed the same images.

Providers:
    floor           frozen timm ViT, no prompts; training: forward + backward with the gradient
                    flowing to the token embeddings through every block, no weight gradients;
                    inference: the plain ViT.
    vpt-deep        VPT-deep (static prompts in every block) in the official formulation.
    vapt-official   VAPT in the official formulation: :func:`vapt_kernels.official.forward` on the
                    VAPT model's backbone and prompt parameters (prompts as real tokens).
    vapt-<backend>  the VAPT model on a fast backend (torch, triton, native); one that cannot run
                    on the device is reported as ``n/a (reason)``.
    <name>+compile  with ``compile``: ``torch.compile`` of the floor, of vapt-official and of the
                    last available fast backend (ratios stay relative to the eager floor).
    vapt-<backend>-mixed, vapt-<backend>-loop
                    with ``tasks = K > 1``, for each fast backend: a :class:`vapt_kernels.MultiTaskVAPT`
                    of ``K`` tasks on one batch whose images cycle through the tasks; ``mixed``
                    runs it as one batch; ``loop`` runs each task on its own images through a
                    one-task model (a :class:`vapt_kernels.MultiTaskVAPT` holding that task alone,
                    on the same backbone: a call gathers only its own task, as peft's adapter
                    switching does for LoRA) and puts the rows back in order.
                    Next to ``vapt-<backend>`` on the same batch, they show what mixing costs.

Each name stands for a :class:`Provider` (:data:`PROVIDER_TABLE`): its kind, backend and whether it is
compiled are looked up there, never read off the name.

What is measured per provider and mode: ``train``, one training step (forward, cross-entropy,
backward, gradients cleared; only prompts and head are trainable); ``infer``, one forward without
gradients; both under autocast for bf16/fp16.

Timing: the providers take turns, in an order that rotates every round, so that drift of the
machine hits all alike. A round gives each provider a few steps: first the untimed warm-up steps,
one per round, then one timed step (which sizes the later rounds), then up to
:data:`ROUND_STEPS` timed steps per round until ``steps`` are timed. On CPU a round is
``torch.utils.benchmark.Timer.blocked_autorange`` (it adds one untimed call per round, and on steps
too short to time alone times blocks of steps and reports their mean per step); on CUDA
``triton.testing.do_bench`` (events, L2 flushed before every step; seven untimed calls per round),
or the Timer, which synchronises the GPU, where Triton is not installed. The timings of all rounds
are pooled into a median and 20/80 quantiles.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over one step after one to settle; on CPU
the growth of the peak resident set size during two steps, in a fresh interpreter per provider and
mode (Linux ``VmHWM`` after resetting it through ``/proc/self/clear_refs``; not for ``+compile``).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import datetime
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.benchmark as torch_benchmark
from tqdm import tqdm

from vapt_kernels import official, ops
from vapt_kernels.checkpoint import official_parameters, trainable_state_dict
from vapt_kernels.config import VAPTConfig
from vapt_kernels.environment import device_name, git_commit, library_versions
from vapt_kernels.multitask import MultiTaskVAPT
from vapt_kernels.timm import apply_vapt, apply_vpt, set_backend

FAST_BACKENDS = ("torch", "triton", "native")
MODES = ("train", "infer")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE_DEFAULTS = {
    "cpu": {"model": "vit_small_patch16_224", "batch": 8, "dtype": "fp32", "steps": 15},
    "cuda": {"model": "vit_base_patch16_224", "batch": 128, "dtype": "bf16", "steps": 30},
}
# Timed steps per provider and round after the first. Short rounds interleave finely; each round
# costs the timer's untimed calls (one for the CPU Timer, seven for do_bench).
ROUND_STEPS = {"cpu": 3, "cuda": 10}
NUM_CLASSES = 100
CSV_FIELDS = [
    "timestamp", "git_commit", "device", "torch", "triton", "timm", "vapt_kernels", "model", "img_size",
    "global_pool", "batch", "prompts", "tasks", "registered", "dtype", "steps", "warmup", "mode", "provider", "status",
    "reason",
    "median_ms", "p20_ms", "p80_ms", "img_per_s", "ratio_to_floor", "peak_mem_mb", "mem_method",
    "seed", "sweep", "samples", "timing",
]


@dataclass(frozen=True)
class Provider:
    """What a provider name stands for.

    Args:
        name: the name in the table, the command line and the result rows.
        kind: ``floor`` (the frozen ViT), ``vpt-deep`` and ``official`` (the official formulation
            of VPT-deep and of VAPT), ``fast`` (the VAPT model on ``backend``), ``mixed`` and
            ``loop`` (a :class:`vapt_kernels.MultiTaskVAPT` on ``backend``, see :class:`MixedBatch`).
        backend: the fast backend of the ``fast``, ``mixed`` and ``loop`` kinds, else None.
        compiled: ``torch.compile`` of the eager provider of the same kind and backend.
    """

    name: str
    kind: str
    backend: Optional[str] = None
    compiled: bool = False


MULTI_TASK_KINDS = ("mixed", "loop")
COMPILED_KINDS = ("floor", "official", "fast")


def _provider_table() -> dict[str, Provider]:
    eager = [Provider("floor", "floor"), Provider("vpt-deep", "vpt-deep"), Provider("vapt-official", "official")]
    eager += [Provider(f"vapt-{b}", "fast", b) for b in FAST_BACKENDS]
    eager += [Provider(f"vapt-{b}-{kind}", kind, b) for b in FAST_BACKENDS for kind in MULTI_TASK_KINDS]
    compiled = [replace(p, name=f"{p.name}+compile", compiled=True) for p in eager if p.kind in COMPILED_KINDS]
    return {p.name: p for p in eager + compiled}


# Every provider a run can have, by name.
PROVIDER_TABLE = _provider_table()
# The providers one picks (``--providers``); the others follow from ``tasks`` and ``compile``.
PROVIDERS = tuple(p.name for p in PROVIDER_TABLE.values() if p.kind not in MULTI_TASK_KINDS and not p.compiled)


def provider_name(kind: str, backend: Optional[str] = None, compiled: bool = False) -> str:
    """The name of the provider of ``kind`` (on ``backend``, compiled or not)."""
    for p in PROVIDER_TABLE.values():
        if (p.kind, p.backend, p.compiled) == (kind, backend, compiled):
            return p.name
    raise KeyError(f"no provider of kind {kind!r}, backend {backend!r}, compiled {compiled}")


@dataclass(frozen=True)
class BenchConfig:
    """What one benchmark run measures.

    Args:
        model: timm model name.
        batch: images per step.
        prompts: prompts per block.
        dtype: ``fp32``, or autocast ``bf16`` / ``fp16``.
        device: ``cpu`` or ``cuda``.
        steps: timed steps per provider and mode.
        warmup: untimed steps per provider and mode before them.
        img_size: image size (None: the model's).
        global_pool: timm's pooling of the model (None: the model's); ``avg`` pools the tokens as
            the official MAE model does, so the VAPT providers pool their last block's prompt
            outputs too (``VAPTConfig.pooled_tokens``).
        providers: names from :data:`PROVIDERS` (a memory probe: any one of :data:`PROVIDER_TABLE`).
        modes: names from :data:`MODES`.
        memory: also measure peak memory.
        compile: add ``torch.compile`` providers.
        seed: seed of the backbone, prompt and input initialisation.
        tasks: ``K``; above 1, add the mixed-batch and loop providers of every fast backend.
        registered: tasks registered in the mixed-batch providers' model, ``K`` of them in the
            batch and the rest idle (None: ``K``): what a forward costs as tasks are added.
    """

    model: str
    batch: int
    prompts: int
    dtype: str
    device: str
    steps: int
    warmup: int = 2
    img_size: Optional[int] = None
    global_pool: Optional[str] = None
    providers: tuple[str, ...] = PROVIDERS
    modes: tuple[str, ...] = MODES
    memory: bool = True
    compile: bool = False
    seed: int = 0
    tasks: int = 1
    registered: Optional[int] = None

    @classmethod
    def for_device(cls, device: str, **overrides) -> "BenchConfig":
        """The defaults of ``device`` (:data:`DEVICE_DEFAULTS`, 10 prompts) with ``overrides``;
        overrides that are None keep the default."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return cls(**{"prompts": 10, "device": device, **DEVICE_DEFAULTS[device], **given})


@dataclass
class Result:
    """One provider in one mode: its status and its per-step times in seconds."""

    provider: str
    mode: str
    status: str = "ok"  # ok | n/a | error
    reason: str = ""
    times: list[float] = field(default_factory=list)
    peak_mem_mb: Optional[float] = None

    def quantile_ms(self, q: float) -> Optional[float]:
        """The ``q`` quantile (0.2, 0.5 or 0.8, ...) of the step time in ms, or None untimed."""
        if len(self.times) < 2:
            return 1e3 * self.times[0] if self.times else None
        return 1e3 * statistics.quantiles(self.times, n=10, method="inclusive")[round(q * 10) - 1]


class Unavailable(Exception):
    """A provider that cannot run here; the message says why."""


# --------------------------------------------------------------------------------------------
# Providers and steps
# --------------------------------------------------------------------------------------------


class OfficialFormulation(nn.Module):
    """A VAPT model run in the official formulation (:func:`vapt_kernels.official.forward`).

    Its parameters are the VAPT model's, and ``train()`` / ``eval()`` reach the model (whose own
    ``train()`` keeps the frozen backbone in eval mode); the prompt dropouts follow the prompts'
    training flag, as in the model.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        # Official name -> the model's parameter objects; looked up once, not per step.
        self.official_params = official_parameters(model)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        vapt = self.model.vapt
        return official.forward(self.model, self.official_params, vapt.config, images, training=vapt.training)


def build_backbone(cfg: BenchConfig) -> nn.Module:
    """The frozen-to-be timm ViT every provider copies, seeded, on ``cfg.device``, in eval mode."""
    import timm

    kwargs = {"num_classes": NUM_CLASSES}
    if cfg.img_size:
        kwargs["img_size"] = cfg.img_size
    if cfg.global_pool:
        kwargs["global_pool"] = cfg.global_pool
    torch.manual_seed(cfg.seed)
    return timm.create_model(cfg.model, pretrained=False, **kwargs).to(cfg.device).eval()


def _floor(base: nn.Module) -> nn.Module:
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    # The activation gradient must reach the token embeddings through every block.
    model.patch_embed.register_forward_hook(lambda module, args, out: out.requires_grad_(torch.is_grad_enabled()))
    return model


class MixedBatch(nn.Module):
    """The images of a batch cycling through ``K`` tasks (image ``i`` belongs to task ``i % K``),
    run either as one mixed batch through a :class:`vapt_kernels.MultiTaskVAPT` of the ``K`` tasks,
    or (``loop``) one task at a time through one-task models on the same backbone, the logits put
    back in batch order.

    Args:
        models: one model of all ``K`` tasks, or (``loop``) ``K`` models of one task each.
        batch: images per step.
    """

    def __init__(self, models: list[MultiTaskVAPT], batch: int, tasks: int) -> None:
        super().__init__()
        self.models, self.loop = nn.ModuleList(models), len(models) == tasks > 1
        self.register_buffer("task", torch.arange(batch) % tasks, persistent=False)
        self.groups = [torch.arange(t, batch, tasks) for t in range(tasks)]  # each task's images
        self.order = torch.argsort(torch.cat(self.groups))  # batch position -> row of the loop's output

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.loop:
            return self.models[0](images, self.task)
        device = images.device
        parts = [mt(images[g.to(device)], torch.zeros(len(g), dtype=torch.long, device=device))
                 for mt, g in zip(self.models, self.groups)]
        return torch.cat(parts)[self.order.to(device)]


def provider_names(cfg: BenchConfig) -> tuple[str, ...]:
    """``cfg.providers`` and, with ``cfg.tasks > 1``, the ``-mixed`` and ``-loop`` providers of each
    fast backend among them."""
    names = list(cfg.providers)
    if cfg.tasks > 1:
        fast = [PROVIDER_TABLE[n] for n in cfg.providers if PROVIDER_TABLE[n].kind == "fast"]
        names += [provider_name(kind, p.backend) for p in fast for kind in MULTI_TASK_KINDS]
    return tuple(names)


def build_providers(cfg: BenchConfig, base: nn.Module) -> dict[str, Union[nn.Module, Unavailable]]:
    """Provider name (:func:`provider_names`) -> model, or -> an :class:`Unavailable` saying why it
    cannot run on the device."""
    device_type = torch.device(cfg.device).type
    models: dict[str, Union[nn.Module, Unavailable]] = {}
    vapt: Optional[nn.Module] = None
    many: dict[str, nn.Module] = {}  # backend -> the VAPT model its -mixed and -loop providers share

    def shared_vapt() -> nn.Module:
        """One set of prompt parameters, copied to every VAPT provider."""
        nonlocal vapt
        if vapt is None:
            vapt = apply_vapt(copy.deepcopy(base), VAPTConfig(num_prompts=cfg.prompts))
        return vapt

    for name in provider_names(cfg):
        provider = PROVIDER_TABLE[name]
        backend = provider.backend
        if provider.kind == "floor":
            models[name] = _floor(base)
        elif provider.kind == "vpt-deep":
            models[name] = OfficialFormulation(apply_vpt(copy.deepcopy(base), num_prompts=cfg.prompts))
        elif provider.kind == "official":
            models[name] = OfficialFormulation(copy.deepcopy(shared_vapt()))
        elif reason := ops.unavailable_reason(backend, device_type):
            models[name] = Unavailable(reason)
        elif provider.kind == "fast":
            models[name] = set_backend(copy.deepcopy(shared_vapt()), backend)
        else:  # mixed, loop: K tasks (equal values) on one copy of the backbone per backend
            if backend not in many:
                many[backend] = set_backend(copy.deepcopy(shared_vapt()), backend)
            groups = [range(cfg.tasks)] if provider.kind == "mixed" else [[t] for t in range(cfg.tasks)]
            task_models = []
            state = trainable_state_dict(shared_vapt())
            for group in groups:
                mt = MultiTaskVAPT(many[backend])
                for t in group:
                    mt.add_task(f"task{t}", state)
                if provider.kind == "mixed":
                    for t in range(cfg.tasks, cfg.registered or cfg.tasks):
                        mt.add_task(f"idle{t}", state)
                task_models.append(mt)
            models[name] = MixedBatch(task_models, cfg.batch, cfg.tasks)
    if cfg.compile:
        fast = [
            n for n in cfg.providers if PROVIDER_TABLE[n].kind == "fast" and isinstance(models[n], nn.Module)
        ]
        for name in ["floor", "vapt-official"] + fast[-1:]:
            if isinstance(models.get(name), nn.Module):
                p = PROVIDER_TABLE[name]
                models[provider_name(p.kind, p.backend, compiled=True)] = torch.compile(copy.deepcopy(models[name]))
    return models


def inputs(cfg: BenchConfig, base: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The images ``(B, 3, H, W)`` and labels ``(B,)`` every provider is fed."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    x = torch.randn(cfg.batch, 3, *base.patch_embed.img_size, generator=gen).to(cfg.device)
    y = torch.randint(0, NUM_CLASSES, (cfg.batch,), generator=gen).to(cfg.device)
    return x, y


def make_step(model: nn.Module, mode: str, images: torch.Tensor, labels: torch.Tensor, dtype: str) -> Callable[[], None]:
    """Put ``model`` in ``mode`` and return one step of it: for ``train`` forward, cross-entropy,
    backward and the gradients cleared; for ``infer`` a forward without gradients."""
    model.train(mode == "train")
    if dtype == "fp32":
        autocast = contextlib.nullcontext()
    else:
        autocast = torch.autocast(device_type=images.device.type, dtype=DTYPES[dtype])
    params = [p for p in model.parameters() if p.requires_grad]

    def train_step() -> None:
        with autocast:
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        for p in params:
            p.grad = None

    def infer_step() -> None:
        with torch.no_grad(), autocast:
            model(images)

    return train_step if mode == "train" else infer_step


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def timing_method(device: str) -> str:
    """The timer a device gets: ``triton.testing.do_bench`` on CUDA where Triton is installed,
    else ``torch.utils.benchmark``."""
    if torch.device(device).type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton.testing.do_bench"
    return "torch.utils.benchmark"


def round_plan(cfg: BenchConfig) -> list[int]:
    """Timed steps per provider in each round: 0 for a warm-up round (one untimed step), then 1,
    then :data:`ROUND_STEPS` at most per round until ``cfg.steps``."""
    per_round = ROUND_STEPS[torch.device(cfg.device).type]
    rest = cfg.steps - 1
    return [0] * cfg.warmup + [1] + [min(per_round, rest - i) for i in range(0, rest, per_round)]


def _sampler(step: Callable[[], None], method: str) -> Callable[[int, float], list[float]]:
    """``(n, estimate)`` -> the seconds per step of about ``n`` timed steps, given an ``estimate``
    of one step's seconds (0.0 before any; ``n = 1`` needs none)."""
    if method == "triton.testing.do_bench":
        from triton.testing import do_bench

        # do_bench times int(rep / its own estimate) calls; rep in ms.
        return lambda n, estimate: [
            ms / 1e3 for ms in do_bench(step, warmup=0, rep=(n + 0.5) * estimate * 1e3, return_mode="all")
        ]
    # num_threads: the Timer's default is one thread.
    timer = torch_benchmark.Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads())
    # blocked_autorange times blocks until min_run_time has passed: about n blocks of one step each
    # (a step too short to time alone gets blocks of several).
    return lambda n, estimate: timer.blocked_autorange(min_run_time=(n - 0.5) * estimate).times


def time_interleaved(steps: dict[str, Callable[[], None]], results: dict[str, Result], cfg: BenchConfig, bar: tqdm) -> None:
    """Run ``round_plan(cfg)`` over ``steps``, the order rotating every round; appends the times
    to ``results[name].times``. A step that raises marks its provider ``error`` and leaves the
    rotation; the others go on."""
    samplers = {name: _sampler(step, timing_method(cfg.device)) for name, step in steps.items()}
    for r, n in enumerate(round_plan(cfg)):
        live = [name for name in steps if results[name].status == "ok"]
        shift = r % max(len(live), 1)
        for name in live[shift:] + live[:shift]:
            bar.set_postfix_str(f"{results[name].mode} {name}", refresh=False)
            result = results[name]
            try:
                if n == 0:
                    steps[name]()
                else:
                    estimate = statistics.median(result.times) if result.times else 0.0
                    result.times += samplers[name](n, estimate)
            except Exception as err:  # a failing provider must not take the others down
                result.status, result.reason = "error", f"{type(err).__name__}: {err}"
            bar.update()


def measure(cfg: BenchConfig, progress: bool = True) -> list[Result]:
    """Time every provider of ``cfg`` in every mode, then measure peak memory (``cfg.memory``).

    Args:
        cfg: what to measure.
        progress: show a progress bar on stderr when it is a terminal.

    Returns:
        One :class:`Result` per provider and mode, modes outer, in ``cfg`` order.
    """
    base = build_backbone(cfg)
    models = build_providers(cfg, base)
    x, y = inputs(cfg, base)
    runnable = [name for name, model in models.items() if isinstance(model, nn.Module)]
    total = len(cfg.modes) * len(round_plan(cfg)) * len(runnable)
    results = []
    with tqdm(total=total, unit="round", desc="vapt-bench", leave=False, disable=None if progress else True) as bar:
        for mode in cfg.modes:
            by_name = {name: Result(name, mode) for name in models}
            for name, model in models.items():
                if isinstance(model, Unavailable):
                    by_name[name].status, by_name[name].reason = "n/a", str(model)
            steps = {name: make_step(models[name], mode, x, y, cfg.dtype) for name in runnable}
            time_interleaved(steps, by_name, cfg, bar)
            results += by_name.values()
    if cfg.memory:
        measured = [r for r in results if r.status == "ok"]
        if torch.device(cfg.device).type == "cuda":
            for r in measured:
                r.peak_mem_mb = cuda_peak_memory(make_step(models[r.provider], r.mode, x, y, cfg.dtype))
        else:
            measured = [r for r in measured if not PROVIDER_TABLE[r.provider].compiled]
            with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
                peaks = pool.map(lambda r: cpu_peak_memory(cfg, r.provider, r.mode), measured)
                for r, peak in zip(measured, peaks):
                    r.peak_mem_mb = peak
    return results


# --------------------------------------------------------------------------------------------
# Peak memory
# --------------------------------------------------------------------------------------------


def cuda_peak_memory(step: Callable[[], None]) -> float:
    """Peak CUDA memory (MiB) allocated during one step, after one step to settle."""
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def cpu_peak_memory(cfg: BenchConfig, provider: str, mode: str) -> Optional[float]:
    """Peak RSS growth (MiB) over two steps of one provider, in a fresh interpreter; None if the
    probe failed (e.g. no ``/proc``)."""
    tasks = cfg.tasks if PROVIDER_TABLE[provider].kind in MULTI_TASK_KINDS else 1
    probe = json.dumps(asdict(replace(cfg, providers=(provider,), modes=(mode,), tasks=tasks)))
    code = "import sys; from vapt_kernels.bench.harness import memory_probe; memory_probe(sys.argv[1])"
    try:
        out = subprocess.run([sys.executable, "-c", code, probe], capture_output=True, text=True, timeout=600)
        return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
    except (subprocess.SubprocessError, ValueError, IndexError, KeyError, OSError):
        return None


def _status_kib(name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise KeyError(name)


def memory_probe(probe: str) -> None:
    """Child side of :func:`cpu_peak_memory`: prints ``{"peak_mb": ...}`` for the one provider and
    mode of the JSON config ``probe``."""
    fields = json.loads(probe)
    cfg = BenchConfig(**{**fields, "providers": tuple(fields["providers"]), "modes": tuple(fields["modes"])})
    keep_freed_memory()
    base = build_backbone(cfg)
    model = build_providers(cfg, base)[cfg.providers[0]]
    x, y = inputs(cfg, base)
    step = make_step(model, cfg.modes[0], x, y, cfg.dtype)
    del base
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    before = _status_kib("VmRSS")
    for _ in range(2):
        step()
    print(json.dumps({"peak_mb": (_status_kib("VmHWM") - before) / 1024}))


# --------------------------------------------------------------------------------------------
# Environment and result rows
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


def row_environment(device: str) -> dict[str, str]:
    """What every row of one invocation shares: timestamp, commit, device name, versions, timer
    (:mod:`vapt_kernels.environment`)."""
    return {
        "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "device": device_name(device),
        **library_versions(),
        "timing": timing_method(device),
    }


def _round(v: Optional[float], nd: int = 2) -> Union[float, str]:
    return "" if v is None else round(v, nd)


def result_rows(cfg: BenchConfig, results: list[Result], env: dict[str, str], sweep: Optional[str] = None) -> list[dict]:
    """One row (:data:`CSV_FIELDS`) per result: ``env``, the config, the median and 20/80
    quantiles in ms, images/s, the ratio to the eager floor of the same mode, peak memory."""
    floor = {r.mode: r.quantile_ms(0.5) for r in results if r.provider == "floor" and r.status == "ok"}
    cuda = torch.device(cfg.device).type == "cuda"
    mem_method = "cuda max_memory_allocated" if cuda else "cpu peak RSS growth, subprocess"
    rows = []
    for r in results:
        med = r.quantile_ms(0.5)
        rows.append({
            **env,
            "model": cfg.model, "img_size": cfg.img_size or "", "global_pool": cfg.global_pool or "",
            "batch": cfg.batch, "prompts": cfg.prompts,
            "tasks": cfg.tasks, "registered": cfg.registered or cfg.tasks,
            "dtype": cfg.dtype, "steps": cfg.steps, "warmup": cfg.warmup, "seed": cfg.seed, "sweep": sweep or "",
            "mode": r.mode, "provider": r.provider, "status": r.status, "reason": r.reason,
            "median_ms": _round(med), "p20_ms": _round(r.quantile_ms(0.2)), "p80_ms": _round(r.quantile_ms(0.8)),
            "samples": len(r.times),
            "img_per_s": _round(cfg.batch / med * 1e3) if med else "",
            "ratio_to_floor": _round(med / floor[r.mode], 4) if med and floor.get(r.mode) else "",
            "peak_mem_mb": _round(r.peak_mem_mb), "mem_method": mem_method if r.peak_mem_mb is not None else "",
        })
    return rows
