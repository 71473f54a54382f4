"""Each op's contract, written once, and the ``torch.library`` / autograd wiring every backend shares.

**Contract.** :func:`norm_and_project_rules` and :func:`prefix_attention_rules` state every
shape, dtype, device and size rule of the two ops, per backend: the dtypes each backend's kernels
take on each device (:data:`KERNEL_DTYPES`) and their head-dim limits (:data:`MAX_HEAD_DIM`).
The same rules run in the public ops before any kernel (eager, and while ``torch.compile`` or
``torch.export`` traces them), in the fakes of the kernel ops, in ``auto``'s choice of backend (the first one whose
contract accepts the inputs) and in the tests, so every path refuses bad input with the same words.
The kernel files only check device and memory layout.

**Kernel ops.** A kernel backend implements four functions with the schema of ``csrc/vapt.cpp``:

* ``norm_and_project_fwd(x, norm1_weight, norm1_bias, eps1, gen_weight, gen_bias, eps_g, mix,
  num_prefix, task=None) -> (h, g, mean, rstd1, rstd_g)`` and ``norm_and_project_bwd(dh, dg, x,
  norm1_weight, gen_weight, gen_bias, mix, mean, rstd1, rstd_g, num_prefix, task=None) -> (dx,
  dnorm1_weight, dnorm1_bias, dgen_weight, dgen_bias, dmix)``; with ``task`` the prompt parameters
  are stacked per task and their gradients summed per task (:func:`norm_and_project_rules`);
* ``prefix_attention_fwd(q, k, v, k_prefix, v_prefix, scale) -> (out, lse)`` and
  ``prefix_attention_bwd(dout, q, k, v, k_prefix, v_prefix, out, lse, scale) -> (dq, dk, dv,
  dk_prefix, dv_prefix)``.

``native`` registers them in C++ (``torch.ops.vapt``), ``triton`` as ``custom_op``s
(``torch.ops.vapt_triton``); :func:`register_kernel_ops` gives such a namespace its fakes and vmap
rules. The ``torch`` backend provides the ``norm_and_project`` pair in composite PyTorch
(:mod:`.composite`). :func:`norm_and_project` and :func:`prefix_attention` run a backend's kernels
under one autograd rule each (``torch.autograd.Function`` with ``setup_context``, so ``torch.func``
transforms work): the forward saves the row statistics or the log-sum-exp and the backward kernel
consumes them; when the backward is itself recorded (a gradient of a gradient, ``torch.func``),
it is computed with the differentiable composite formulas instead.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Iterator, NamedTuple, Optional

import torch

from . import composite
from .composite import stats_dtype

NORM_AND_PROJECT_FWD = "norm_and_project_fwd"
NORM_AND_PROJECT_BWD = "norm_and_project_bwd"
PREFIX_ATTENTION_FWD = "prefix_attention_fwd"
PREFIX_ATTENTION_BWD = "prefix_attention_bwd"
OP_NAMES = (NORM_AND_PROJECT_FWD, NORM_AND_PROJECT_BWD, PREFIX_ATTENTION_FWD, PREFIX_ATTENTION_BWD)

# --------------------------------------------------------------------------------------------
# contract
# --------------------------------------------------------------------------------------------

FLOATING = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_HALVES = (torch.float32, torch.float16, torch.bfloat16)
# Kernel backend -> device type -> the input dtypes its kernels take. `reference` and `torch`
# take every floating dtype on every device.
KERNEL_DTYPES: dict[str, dict[str, tuple[torch.dtype, ...]]] = {
    "native": {"cpu": (torch.float64, torch.float32, torch.bfloat16), "cuda": _HALVES},
    "triton": {"cuda": _HALVES, "cpu": _HALVES},
}
# Kernel backend -> device type -> the largest attention head dim its kernels take (none: any).
MAX_HEAD_DIM: dict[str, dict[str, int]] = {"native": {"cuda": 128}, "triton": {"cuda": 256, "cpu": 256}}

Rule = tuple[type, bool, Callable[[], str]]


def input_dtypes(backend: str, device_type: str) -> tuple[torch.dtype, ...]:
    """The input dtypes ``backend`` takes on ``device_type`` tensors."""
    if backend in KERNEL_DTYPES:
        return KERNEL_DTYPES[backend].get(device_type, ())
    return FLOATING


def _names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def _dtype_rule(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> Rule:
    allowed = input_dtypes(backend, device.type)
    return (
        TypeError,
        dtype in allowed,
        lambda: (
            f"{op}: backend {backend!r} takes {_names(allowed) or 'no'} inputs on {device.type}, got "
            f"{str(dtype).removeprefix('torch.')}; convert the model, or use backend='auto' or 'torch'"
        ),
    )


def _same_device_rule(op: str, named: dict[str, Optional[torch.Tensor]], device: torch.device) -> Rule:
    elsewhere = [name for name, t in named.items() if t is not None and t.device != device]
    return ValueError, not elsewhere, lambda: f"{op}: {', '.join(elsewhere)} must be on {device} like the input"


def norm_and_project_rules(
    x, norm1_weight, norm1_bias, gen_weight, gen_bias, mix, num_prefix, backend: str, task=None
) -> Iterator[Rule]:
    """The contract of ``norm_and_project`` on ``backend``, rule by rule: ``(error type,
    whether it holds, message)``. A rule is only produced once the rules before it held, so later
    ones may index shapes the earlier ones checked.

    With ``task`` (many tasks, one backbone) the prompt parameters are stacked over ``K`` tasks:
    ``mix (K, Np, N)`` or ``(K, Np, N, d)``, ``gen_weight``/``gen_bias (K, d)``, and ``task`` is the
    int64 ``(B,)`` index of each image's task. Its values must lie in ``[0, K)``: a data rule, which
    :func:`check_task_range` checks (the rules here only compare sizes)."""
    op = "norm_and_project"
    yield ValueError, x.dim() == 3, lambda: f"{op}: x must be (B, T, d), got shape {tuple(x.shape)}"
    yield _dtype_rule(op, backend, x.device, x.dtype)
    B, T, d = x.shape
    yield ValueError, d >= 1, lambda: f"{op}: x must have at least one channel, got shape {tuple(x.shape)}"
    yield (
        ValueError,
        0 <= num_prefix < T,
        lambda: f"{op}: num_prefix must be in [0, T) = [0, {T}) so that patch tokens remain, got {num_prefix}",
    )
    stacked = task is not None
    if stacked:
        yield (
            ValueError,
            task.dim() == 1 and task.shape[0] == B and task.dtype == torch.int64,
            lambda: f"{op}: task must be an int64 (B,) = ({B},) tensor of task indices, got {task.dtype} {tuple(task.shape)}",
        )
        yield (
            ValueError,
            mix.dim() in (3, 4) and mix.shape[0] >= 1,
            lambda: f"{op}: with task, mix must be stacked per task, (K, Np, N) or (K, Np, N, d), got {tuple(mix.shape)}",
        )
    K = mix.shape[0] if stacked else None
    task_shape = (K, d) if stacked else (d,)
    affine = {"norm1_weight": norm1_weight, "norm1_bias": norm1_bias, "gen_weight": gen_weight, "gen_bias": gen_bias}
    for name, t in affine.items():
        if t is not None:
            shape = task_shape if name.startswith("gen") else (d,)
            what = "(K, d)" if len(shape) == 2 else "(d,)"
            yield (
                ValueError,
                t.shape == shape and t.dtype in FLOATING,
                lambda name=name, t=t, shape=shape, what=what: (
                    f"{op}: {name} must be a floating {what} = {shape} tensor, got {t.dtype} {tuple(t.shape)}"
                ),
            )
    N = T - num_prefix
    per_task = tuple(mix.shape[1:]) if stacked else tuple(mix.shape)
    lead = "(K, " if stacked else "("
    yield (
        ValueError,
        mix.dtype in FLOATING and len(per_task) in (2, 3) and per_task[0] >= 1 and per_task[1:] in ((N,), (N, d)),
        lambda: (
            f"{op}: mix must be a floating {lead}Np, N) or per-channel {lead}Np, N, d) tensor with Np >= 1, "
            f"N = T - num_prefix = {N} and d = {d}, got {mix.dtype} {tuple(mix.shape)}"
        ),
    )
    yield _same_device_rule(op, {**affine, "mix": mix, "task": task}, x.device)


def check_task_range(task: torch.Tensor, num_tasks: int, what: str = "norm_and_project: task") -> None:
    """Raise an IndexError unless every value of ``task`` lies in ``[0, num_tasks)``. A data rule:
    on CPU tensors in eager mode it reads the values; on GPU tensors (where reading them would stall
    the host once per block) and while ``torch.compile`` or ``torch.export`` traces it, it is an
    asynchronous assertion on the device, which raises a RuntimeError with the same words."""
    message = f"{what} indices must lie in [0, {num_tasks}), one per image"
    if torch.compiler.is_compiling() or task.device.type != "cpu":
        torch._assert_async(((task >= 0) & (task < num_tasks)).all(), message)
        return
    if task.numel():
        low, high = int(task.min()), int(task.max())
        if low < 0 or high >= num_tasks:
            raise IndexError(f"{message}; got values from {low} to {high}")


def prefix_attention_rules(q, k, v, k_prefix, v_prefix, scale, dtype: torch.dtype, backend: str) -> Iterator[Rule]:
    """The contract of ``prefix_attention`` on ``backend`` for inputs computed in ``dtype`` (see
    :func:`attention_dtype`), rule by rule as in :func:`norm_and_project_rules`."""
    op = "prefix_attention"
    named = {"q": q, "k": k, "v": v, "k_prefix": k_prefix, "v_prefix": v_prefix}
    not_4d = [f"{name} {tuple(t.shape)}" for name, t in named.items() if t.dim() != 4]
    yield ValueError, not not_4d, lambda: f"{op}: every input must be 4-D, got {', '.join(not_4d)}"
    B, H, T, D = q.shape
    yield (
        ValueError,
        k.shape == q.shape and v.shape == q.shape,
        lambda: f"{op}: q, k, v must share one (B, H, T, D) shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}",
    )
    yield (
        ValueError,
        k_prefix.shape == v_prefix.shape,
        lambda: f"{op}: k_prefix and v_prefix must share one shape, got {tuple(k_prefix.shape)} and {tuple(v_prefix.shape)}",
    )
    Bp, Hp, Np, Dp = k_prefix.shape
    yield (
        ValueError,
        Bp in (1, B) and Hp == H and Np >= 1 and Dp == D,
        lambda: (
            f"{op}: k_prefix must be (B or 1, H, Np >= 1, D) = ({B} or 1, {H}, Np, {D}), got {tuple(k_prefix.shape)}"
        ),
    )
    yield _same_device_rule(op, named, q.device)
    yield _dtype_rule(op, backend, q.device, dtype)
    limit = MAX_HEAD_DIM.get(backend, {}).get(q.device.type)
    yield (
        ValueError,
        D >= 1 and (limit is None or D <= limit),
        lambda: f"{op}: backend {backend!r} takes head dims 1 to {limit or 'any'} on {q.device.type}, got {D}",
    )
    yield ValueError, math.isfinite(scale), lambda: f"{op}: scale must be finite, got {scale}"


def check(rules: Iterator[Rule]) -> None:
    """Raise the first broken rule's error. Under ``torch.compile`` a rule on symbolic sizes
    becomes a guard: the rules only ever compare sizes, never data."""
    for error, holds, message in rules:
        if not holds:
            raise error(message())


def violation(rules: Iterator[Rule]) -> Optional[str]:
    """The message of the first broken rule, or None when the contract accepts the inputs."""
    for _, holds, message in rules:
        if not holds:
            return message()
    return None


def attention_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The one dtype the attention inputs are computed in: the autocast dtype when autocast is on
    (as SDPA would run), else the promotion of their dtypes (qk-norm may return float32 next to
    bfloat16)."""
    device_type = tensors[0].device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


# --------------------------------------------------------------------------------------------
# layouts the kernels of every backend take and give
# --------------------------------------------------------------------------------------------


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last stride is 1 (what the attention kernels index), else a contiguous
    copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def empty_token_major(like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of ``like``'s ``(B, H, T, D)`` shape, dtype and device, laid out in
    memory as ``(B, T, H, D)``: the attention kernels' output layout, so merging the heads back
    (``out.transpose(1, 2).reshape(B, T, H * D)``) is free (``csrc/``'s ``empty_token_major``)."""
    B, H, T, D = like.shape
    return like.new_empty(B, T, H, D).transpose(1, 2)


# --------------------------------------------------------------------------------------------
# kernel ops of the backends
# --------------------------------------------------------------------------------------------


class Kernels(NamedTuple):
    """The kernel functions of one backend."""

    norm_and_project_fwd: Callable
    norm_and_project_bwd: Callable
    prefix_attention_fwd: Callable
    prefix_attention_bwd: Callable


KERNELS: dict[str, Kernels] = {
    # The composite twins; its prefix_attention pair is for CPU tensors (PyTorch's fused CPU
    # attention), GPU tensors take composite.prefix_attention outside this rule.
    "torch": Kernels(
        composite.norm_and_project_fwd,
        composite.norm_and_project_bwd,
        composite.prefix_attention_fwd,
        composite.prefix_attention_bwd,
    ),
}


def _fakes(backend: str) -> dict[str, Callable]:
    """Fake (meta) implementations of the four kernel ops of ``backend``: the contract, then the
    output metadata exactly as the kernels allocate it."""

    def norm_and_project_fwd(
        x, norm1_weight, norm1_bias, eps1, gen_weight, gen_bias, eps_g, mix, num_prefix, task=None
    ):
        check(norm_and_project_rules(x, norm1_weight, norm1_bias, gen_weight, gen_bias, mix, num_prefix, backend, task))
        B, T, d = x.shape
        num_prompts = mix.shape[0 if task is None else 1]
        row_stats = [x.new_empty(B, T, dtype=stats_dtype(x.dtype)) for _ in range(3)]
        return (x.new_empty(B, T, d), x.new_empty(B, num_prompts, d), *row_stats)

    def norm_and_project_bwd(
        dh, dg, x, norm1_weight, gen_weight, gen_bias, mix, mean, rstd1, rstd_g, num_prefix, task=None
    ):
        check(norm_and_project_rules(x, norm1_weight, None, gen_weight, gen_bias, mix, num_prefix, backend, task))
        d, stats = x.shape[-1], stats_dtype(x.dtype)
        gen_shape = (d,) if task is None else (mix.shape[0], d)
        norm1 = [x.new_empty(d, dtype=stats) for _ in range(2)]
        gen = [x.new_empty(gen_shape, dtype=stats) for _ in range(2)]
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        return (dx, *norm1, *gen, mix.new_empty(mix.shape, dtype=stats))

    def prefix_attention_fwd(q, k, v, k_prefix, v_prefix, scale):
        check(prefix_attention_rules(q, k, v, k_prefix, v_prefix, scale, q.dtype, backend))
        return empty_token_major(q), q.new_empty(q.shape[:3], dtype=stats_dtype(q.dtype))

    def prefix_attention_bwd(dout, q, k, v, k_prefix, v_prefix, out, lse, scale):
        check(prefix_attention_rules(q, k, v, k_prefix, v_prefix, scale, q.dtype, backend))
        grads = [empty_token_major(q) for _ in range(3)]
        return (*grads, k_prefix.new_empty(k_prefix.shape), v_prefix.new_empty(v_prefix.shape))

    return {
        NORM_AND_PROJECT_FWD: norm_and_project_fwd,
        NORM_AND_PROJECT_BWD: norm_and_project_bwd,
        PREFIX_ATTENTION_FWD: prefix_attention_fwd,
        PREFIX_ATTENTION_BWD: prefix_attention_bwd,
    }


def _vmap_by_loop(op: Callable) -> Callable:
    """A vmap rule that runs ``op`` once per slice of the vmapped dimension and stacks the
    results: always right (per-slice weight gradients stay per slice), and vmap over a VAPT model
    is not a hot path."""

    def rule(info, in_dims, *args):
        results = []
        for i in range(info.batch_size):
            sliced = [a if dim is None else a.select(dim, i) for a, dim in zip(args, in_dims)]
            results.append(op(*sliced))
        outputs = tuple(torch.stack(parts) for parts in zip(*results))
        return outputs, (0,) * len(outputs)

    return rule


def register_kernel_ops(namespace: str, backend: str) -> None:
    """Give the four kernel ops of ``torch.ops.<namespace>`` their fakes and vmap rules, and make
    them ``backend``'s kernels (once per process)."""
    ops = getattr(torch.ops, namespace)
    for name, fake in _fakes(backend).items():
        torch.library.register_fake(f"{namespace}::{name}", fake)
        torch.library.register_vmap(f"{namespace}::{name}", _vmap_by_loop(getattr(ops, name)))
    KERNELS[backend] = Kernels(*(getattr(ops, name) for name in OP_NAMES))


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------


def _differentiable_backward() -> bool:
    """Whether the backward being run is itself recorded (``create_graph=True``, ``torch.func``
    transforms): then it must be differentiable, and every backend computes it with the
    composite formulas of :mod:`.composite` instead of its backward kernel, which has no
    derivative. Compiled graphs never take this branch (their backward is traced without)."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


class _NormAndProject(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(backend, x, norm1_weight, norm1_bias, eps1, gen_weight, gen_bias, eps_g, mix, num_prefix, task):
        fwd = KERNELS[backend].norm_and_project_fwd
        return fwd(x, norm1_weight, norm1_bias, eps1, gen_weight, gen_bias, eps_g, mix, num_prefix, task)

    @staticmethod
    def setup_context(ctx, inputs, output):
        backend, x, w1, b1, eps1, wg, bg, eps_g, mix, num_prefix, task = inputs
        _h, _g, mean, rstd1, rstd_g = output
        ctx.save_for_backward(x, w1, wg, bg, mix, mean, rstd1, rstd_g, task)
        ctx.backend, ctx.eps_g, ctx.num_prefix = backend, eps_g, num_prefix
        ctx.mark_non_differentiable(mean, rstd1, rstd_g)

    @staticmethod
    def backward(ctx, dh, dg, _dmean, _drstd1, _drstd_g):
        x, w1, wg, bg, mix, mean, rstd1, rstd_g, task = ctx.saved_tensors
        need = ctx.needs_input_grad
        num_prompts = mix.shape[0 if task is None else 1]
        dh = torch.zeros_like(x) if dh is None else dh.contiguous()
        dg = x.new_zeros(x.shape[0], num_prompts, x.shape[-1]) if dg is None else dg.contiguous()
        if _differentiable_backward():
            bwd = functools.partial(composite.norm_and_project_bwd, recompute_eps_g=ctx.eps_g)
        else:
            bwd = KERNELS[ctx.backend].norm_and_project_bwd
        dx, dw1, db1, dwg, dbg, dmix = bwd(dh, dg, x, w1, wg, bg, mix, mean, rstd1, rstd_g, ctx.num_prefix, task)
        return (
            None,
            dx if need[1] else None,
            dw1.to(x.dtype) if need[2] else None,
            db1.to(x.dtype) if need[3] else None,
            None,
            dwg.to(x.dtype) if need[5] else None,
            dbg.to(x.dtype) if need[6] else None,
            None,
            dmix.to(mix.dtype) if need[8] else None,
            None,
            None,
        )


class _PrefixAttention(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(backend, q, k, v, k_prefix, v_prefix, scale):
        return KERNELS[backend].prefix_attention_fwd(q, k, v, k_prefix, v_prefix, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        backend, q, k, v, k_prefix, v_prefix, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, k_prefix, v_prefix, out, lse)
        ctx.backend, ctx.scale = backend, scale
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, k_prefix, v_prefix, out, lse = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else unit_last_stride(dout)
        if _differentiable_backward():
            grads = composite.prefix_attention_bwd(
                dout, q, k, v, k_prefix, v_prefix, out, lse, ctx.scale, differentiable=True
            )
        else:
            grads = KERNELS[ctx.backend].prefix_attention_bwd(dout, q, k, v, k_prefix, v_prefix, out, lse, ctx.scale)
        return None, *grads, None


# --------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------


def norm_and_project(
    backend, x, norm1_weight, norm1_bias, eps1, gen_weight, gen_bias, eps_g, mix, num_prefix, task=None
):
    """``backend``'s ``norm_and_project`` on inputs the contract accepted: brings them into the
    layout and dtypes the kernels take (contiguous ``x``, weights and ``task``, weights in ``x``'s
    dtype, ``mix`` in the stats dtype) and returns ``(h, g)``."""

    def cast(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.to(x.dtype).contiguous()

    h, g, _, _, _ = _NormAndProject.apply(
        backend,
        x.contiguous(),
        cast(norm1_weight),
        cast(norm1_bias),
        float(eps1),
        cast(gen_weight),
        cast(gen_bias),
        float(eps_g),
        mix.to(stats_dtype(x.dtype)).contiguous(),
        int(num_prefix),
        None if task is None else task.contiguous(),
    )
    return h, g


def prefix_attention(backend, dtype, q, k, v, k_prefix, v_prefix, scale):
    """``backend``'s ``prefix_attention`` on inputs the contract accepted, computed in ``dtype``
    with unit last strides; the output is laid out as ``(B, T, H, D)`` so merging the heads back
    is free."""
    q, k, v, k_prefix, v_prefix = (unit_last_stride(t.to(dtype)) for t in (q, k, v, k_prefix, v_prefix))
    out, _ = _PrefixAttention.apply(backend, q, k, v, k_prefix, v_prefix, float(scale))
    return out
