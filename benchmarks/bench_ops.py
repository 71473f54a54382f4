"""Op-level benchmark: each backend of the two VAPT ops against the PyTorch it replaces.

    python benchmarks/bench_ops.py [--device cpu|cuda] [--size tiny|default] [--json PATH]
                                   [--budget SECONDS] [--triton-interpreter]

Every row times one forward + backward of one op. Gradients come from ``torch.autograd.grad``, so
nothing accumulates in ``.grad`` from one call to the next, and they are taken at the op's own
inputs: no row pays for gathering them into a bigger tensor.

* ``prefix_attention`` (token queries over [prompt keys; token keys], docs/design.md §1.2). Every
  row reads views of one packed qkv buffer ``(B, Np + T, 3, H, D)``, timm's layout with the prompt
  rows first: ``q``, ``k``, ``v`` are its token rows, the prompt keys/values its first ``Np`` rows.
    - "sdpa over pre-concatenated k/v": SDPA whose keys/values are the whole k/v slots of the
      buffer (a view: nothing is concatenated). The target: a backend within 1.10x of it.
    - "cat + sdpa": SDPA over ``torch.cat`` of prompt and token keys/values, the concatenation
      timed forward and backward. What a backend must beat (< 1x).
    - "backend <name>": ``ops.prefix_attention``. On CUDA the torch backend is cat + SDPA plus its
      NaN-row mask; on CPU it calls PyTorch's fused CPU attention directly (docs/design.md §2.1).
  The reference backend is left out: it materialises the probabilities; "cat + sdpa" is the
  unfused baseline that matters.
* ``norm_and_project`` (block LayerNorm of every token + the folded prompt projection, §1.3-1.4):
  each backend, the reference backend (unfused, differentiated by autograd) and a device copy of
  ``x``, the bandwidth ceiling. GB/s count the bytes the op must move (:func:`norm_and_project_bytes`).

Timing:

* CUDA: device time from CUDA events. ``triton.testing.do_bench_cudagraph`` captures the step in a
  CUDA graph (warm-up on a side stream, calls unrolled, median of 10 replays), so host launch cost
  between kernels does not count (nor is L2 flushed between calls: the default-size inputs, 60-80
  MB per op, exceed an H100's 50 MB L2). Where capture fails for a step, ``triton.testing.do_bench``
  (events around eager calls, L2 flushed before each) times it and the row says why. (Without
  Triton: ``torch.utils.benchmark.Timer``, whose synchronised blocks time the larger of host and
  device time.) Beside it the host time: wall time per eager call over bursts of calls with no
  synchronisation inside a burst. A row whose host time exceeds its device time is bound by its
  Python path and launches when run eagerly.
* CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` with torch's thread count. On CPU the
  device time is the host time; the host column repeats it.

SDPA's kernel is pinned with ``torch.nn.attention.sdpa_kernel`` for the whole run (flash for
16-bit CUDA inputs, memory-efficient for other CUDA inputs, PyTorch's fused CPU kernel, which SDPA
calls flash, on CPU; the next one that runs where the first refuses the inputs) and recorded.

Output: the backends that cannot run or are skipped (once each, with the reason), a table of every
row, the JSON (``--json``: rows and environment) as soon as measuring ends, then the summary last:
the target ratios, ``norm_and_project``'s share of the copy's bandwidth, and per op the backends
fastest first, the evidence for ``ops.AUTO_PREFERENCE``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

STARTED = time.perf_counter()  # --budget counts from here: the imports below take seconds

# Triton's interpreter must be on before Triton itself is imported: importing vapt_kernels imports
# timm, which imports Triton, whose own @triton.jit library functions (tl.cdiv, tl.max, ...) are
# then compiled ones that interpreted kernels cannot call. So the flag that asks for it is read
# here, before the imports below; parse_args checks it with the others.
if "--triton-interpreter" in sys.argv[1:]:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torch.utils.benchmark as torch_benchmark  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from vapt_kernels import ops  # noqa: E402
from vapt_kernels.environment import device_name, git_commit, library_versions  # noqa: E402

BACKENDS = ("torch", "triton", "native")  # the backends ops.AUTO_PREFERENCE orders
ATTENTION, NORM = "prefix_attention", "norm_and_project"
PRECAT, CAT, COPY = "sdpa over pre-concatenated k/v", "cat + sdpa", "copy of x (bandwidth ceiling)"

GRAPH_REP_MS = 20  # do_bench_cudagraph: calls per replay ~ this many ms of device time
EAGER_WARMUP_MS, EAGER_REP_MS = 10, 50  # do_bench, where capture fails
HOST_BURSTS, HOST_BURST_CALLS = 5, 10  # 10 calls queue a few hundred launches: the queue never fills
# Untimed calls first: on CUDA they compile the Triton kernels and create the caching allocator's
# blocks and the library handles; on CPU one call settles the allocator and the thread pool.
WARMUP_CALLS = {"cuda": 3, "cpu": 1}


@dataclass(frozen=True)
class Shapes:
    """A ViT block's token layout and the dtypes of the two ops' inputs."""

    batch: int
    heads: int
    head_dim: int
    grid: int  # patch grid side: N = grid ** 2 patch tokens
    prompts: int  # Np
    attn_dtype: torch.dtype
    x_dtype: torch.dtype  # the residual stream that norm_and_project reads
    prefix_tokens: int = 1  # the class token: T = 1 + N, left out of the prompt projection

    @property
    def tokens(self) -> int:
        return self.prefix_tokens + self.grid**2

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    def describe(self) -> str:
        return (
            f"B={self.batch}, T={self.tokens} ({self.grid}x{self.grid} patches + {self.prefix_tokens}), "
            f"d={self.width} ({self.heads} heads x {self.head_dim}), Np={self.prompts}, attention in "
            f"{str(self.attn_dtype).removeprefix('torch.')}, x in {str(self.x_dtype).removeprefix('torch.')}"
        )


def shapes_for(device: str, size: str) -> Shapes:
    if size == "tiny":
        # A dry run of this script: the smallest shapes every kernel takes (head dim 16 is the
        # smallest a Triton dot takes), attention in the dtype the default size uses on the device.
        return Shapes(2, 2, 16, 4, 4, torch.bfloat16 if device == "cuda" else torch.float32, torch.float32)
    if device == "cuda":
        # ViT-B/16 at 224 px, batch 128, 10 prompts (the model benchmark's and the README targets'):
        # attention in bfloat16, as under autocast; the residual stream stays float32 under autocast.
        return Shapes(128, 12, 64, 14, 10, torch.bfloat16, torch.float32)
    # ViT-S/16 at 224 px, batch 8, float32: seconds per row on a small CPU.
    return Shapes(8, 6, 64, 14, 10, torch.float32, torch.float32)


@dataclass
class Case:
    """One row to measure: ``step`` runs the op's forward and backward once."""

    op: str
    candidate: str
    step: Callable[[], object]
    bytes: Optional[int] = None  # bytes the op must move, for GB/s
    sdpa: str = "-"  # the SDPA kernel the step runs, where it runs one


@dataclass
class Row:
    op: str
    candidate: str
    device_ms: Optional[float] = None
    host_ms: Optional[float] = None
    method: str = ""
    sdpa: str = "-"
    gb_per_s: Optional[float] = None
    note: str = ""  # why graph capture failed, or the error that stopped the row


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


# --------------------------------------------------------------------------------------------
# the cases
# --------------------------------------------------------------------------------------------


def pin_sdpa(device: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor):
    """The SDPA kernel the run pins: the first of the preferred order that runs forward and
    backward on the benchmark's own inputs. Returns it, its name as recorded, and a note when the
    first choice refused the inputs (its error), else ''."""
    if device == "cuda":
        half = q.dtype in (torch.float16, torch.bfloat16)
        first = SDPBackend.FLASH_ATTENTION if half else SDPBackend.EFFICIENT_ATTENTION
        rest = (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH)
        order = [first] + [b for b in rest if b != first]
    else:
        order = [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]  # CPU: flash is PyTorch's fused CPU kernel
    refused = ""
    for backend in order:
        try:
            with sdpa_kernel(backend):
                torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), (q, k, v), dout)
        except RuntimeError as e:
            refused = refused or f"{order[0].name} refused these inputs ({first_line(e)})"
            continue
        return backend, f"{backend.name.lower()} ({device})", refused
    names = ", ".join(b.name for b in order)
    raise RuntimeError(
        f"none of SDPA's {names} kernels runs these {device} inputs ({refused}); "
        "check the PyTorch install: python -m torch.utils.collect_env"
    )


def attention_cases(s: Shapes, device: str, backends: list[str]) -> tuple[list[Case], SDPBackend, str, str]:
    """prefix_attention rows; also the pinned SDPA kernel, its recorded name and a note (pin_sdpa)."""
    B, H, D, T, Np = s.batch, s.heads, s.head_dim, s.tokens, s.prompts
    packed = torch.randn(B, Np + T, 3, H, D, device=device, dtype=s.attn_dtype)
    q_all, k_all, v_all = packed.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, Np + T, D), as timm's Attention

    def leaf(t: torch.Tensor) -> torch.Tensor:  # a leaf view: same memory, same strides
        return t.detach().requires_grad_()

    q, k, v = leaf(q_all[:, :, Np:]), leaf(k_all[:, :, Np:]), leaf(v_all[:, :, Np:])
    k_prefix, v_prefix = leaf(k_all[:, :, :Np]), leaf(v_all[:, :, :Np])  # per image (adaptive prompts)
    k_cat, v_cat = leaf(k_all), leaf(v_all)
    dout = torch.randn(B, H, T, D, device=device, dtype=s.attn_dtype)
    scale = D**-0.5
    pinned, sdpa_name, sdpa_note = pin_sdpa(device, q, k_cat, v_cat, dout)

    split = (q, k, v, k_prefix, v_prefix)

    def precat() -> tuple[torch.Tensor, ...]:
        out = F.scaled_dot_product_attention(q, k_cat, v_cat, scale=scale)
        return torch.autograd.grad(out, (q, k_cat, v_cat), dout)

    def cat() -> tuple[torch.Tensor, ...]:
        out = F.scaled_dot_product_attention(q, torch.cat((k_prefix, k), 2), torch.cat((v_prefix, v), 2), scale=scale)
        return torch.autograd.grad(out, split, dout)

    def backend_step(backend: str) -> Callable[[], tuple[torch.Tensor, ...]]:
        def step():
            out = ops.prefix_attention(q, k, v, k_prefix, v_prefix, scale, backend=backend)
            return torch.autograd.grad(out, split, dout)

        return step

    cases = [Case(ATTENTION, PRECAT, precat, sdpa=sdpa_name), Case(ATTENTION, CAT, cat, sdpa=sdpa_name)]
    for backend in backends:
        sdpa = "-"
        if backend == "torch":
            sdpa = sdpa_name if device == "cuda" else "flash_attention (cpu, called directly)"
        cases.append(Case(ATTENTION, f"backend {backend}", backend_step(backend), sdpa=sdpa))
    return cases, pinned, sdpa_name, sdpa_note


def norm_and_project_bytes(s: Shapes) -> int:
    """The bytes ``norm_and_project`` must move, forward + backward, at least.

    Forward: reads x (B, T, d), writes h (B, T, d) and g (B, Np, d). Backward: reads dh and x again
    (the saved row statistics alone do not give the normalised rows), writes dx, reads dg. The
    (Np, N) matrix mix is read in each pass and its gradient written; the four d-vectors (both
    LayerNorms' weight and bias) are read in each pass and the prompt LayerNorm's two gradients
    written. So 5 x-sized tensors, 2 g-sized, 3 mix-sized, 10 vectors. Not counted: the per-row
    statistics the forward saves for the backward (16 bytes a row, an op could recompute them) and
    any second read of x a kernel chooses (the GPU forward's projection pass, docs/design.md §1.4).
    """
    e = torch.empty((), dtype=s.x_dtype).element_size()
    x = s.batch * s.tokens * s.width
    g = s.batch * s.prompts * s.width
    mix = s.prompts * s.grid**2
    return e * (5 * x + 2 * g + 3 * mix + 10 * s.width)


def norm_cases(s: Shapes, device: str, backends: list[str]) -> list[Case]:
    """norm_and_project rows: the device copy of x first (the bandwidth ceiling), then each backend,
    then the reference backend (the unfused baseline)."""
    B, T, d, Np, N = s.batch, s.tokens, s.width, s.prompts, s.grid**2
    kw = dict(device=device, dtype=s.x_dtype)
    x = torch.randn(B, T, d, **kw, requires_grad=True)
    norm1_weight, norm1_bias = torch.ones(d, **kw), torch.zeros(d, **kw)  # frozen backbone: no gradient
    gen_weight = torch.ones(d, **kw, requires_grad=True)  # the prompt LayerNorm: trained
    gen_bias = torch.zeros(d, **kw, requires_grad=True)
    mix = (torch.randn(Np, N, **kw) * N**-0.5).requires_grad_()  # folded matrix, one kernel for all channels
    dh, dg = torch.randn_like(x), torch.randn(B, Np, d, **kw)
    inputs = (x, gen_weight, gen_bias, mix)
    moved = norm_and_project_bytes(s)

    def step_of(backend: str) -> Callable[[], object]:
        def step():
            h, g = ops.norm_and_project(
                x, norm1_weight, norm1_bias, 1e-6, gen_weight, gen_bias, 1e-6, mix, s.prefix_tokens,
                backend=backend,
            )
            return torch.autograd.grad((h, g), inputs, (dh, dg))

        return step

    x_data, y = x.detach(), torch.empty_like(x, requires_grad=False)
    cases = [Case(NORM, COPY, lambda: y.copy_(x_data), bytes=2 * x.numel() * x.element_size())]
    cases += [Case(NORM, f"backend {b}", step_of(b), bytes=moved) for b in backends]
    return cases + [Case(NORM, "backend reference (unfused)", step_of("reference"), bytes=moved)]


# --------------------------------------------------------------------------------------------
# measurement, one function per kind
# --------------------------------------------------------------------------------------------


def cuda_device_ms(step: Callable[[], object]) -> tuple[float, str, str]:
    """Device ms of one call, the method, and why graph capture failed ('' when it did not)."""
    try:
        from triton.testing import do_bench, do_bench_cudagraph
    except ImportError:
        return cpu_ms(step, 0.2), "Timer.blocked_autorange (no Triton: synchronised blocks)", ""
    torch.cuda.synchronize()
    try:
        return do_bench_cudagraph(step, rep=GRAPH_REP_MS, return_mode="median"), "cuda graph + events", ""
    except Exception as e:  # a step that synchronises or allocates outside the graph's pool
        torch.cuda.synchronize()
        note = f"graph capture failed ({first_line(e)}); timed eagerly"
        ms = do_bench(step, warmup=EAGER_WARMUP_MS, rep=EAGER_REP_MS, return_mode="median")
        return ms, "eager + events", note


def cuda_host_ms(step: Callable[[], object]) -> float:
    """Host ms of one eager call: median over bursts of calls that are never waited for inside a
    burst (the GPU runs behind), each burst started on an idle GPU."""
    per_call = []
    for _ in range(HOST_BURSTS):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(HOST_BURST_CALLS):
            step()
        per_call.append((time.perf_counter() - start) / HOST_BURST_CALLS)
    torch.cuda.synchronize()
    return statistics.median(per_call) * 1e3


def cpu_ms(step: Callable[[], object], min_run_time: float) -> float:
    """Median ms of one call, from blocks of calls (host time, which is the device time on CPU)."""
    timer = torch_benchmark.Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def measure_case(case: Case, device: str, min_run_time: float) -> Row:
    row = Row(case.op, case.candidate, sdpa=case.sdpa)
    try:
        for _ in range(WARMUP_CALLS[device]):
            case.step()
        if device == "cuda":
            row.device_ms, row.method, row.note = cuda_device_ms(case.step)
            row.host_ms = cuda_host_ms(case.step)
        else:
            row.device_ms = row.host_ms = cpu_ms(case.step, min_run_time)
            row.method = "Timer.blocked_autorange"
    except Exception as e:  # one failing candidate must not cost the others their rows
        row.note = f"failed: {first_line(e)}"
    if row.device_ms is not None and case.bytes is not None:
        row.gb_per_s = case.bytes / (row.device_ms * 1e-3) / 1e9
    return row


def measure(
    cases: list[Case], device: str, budget: Optional[float], min_run_time: float
) -> tuple[list[Row], list[str]]:
    """Rows of the cases measured in order, and the cases left unmeasured once ``budget`` seconds
    (from the script's start) were spent. Progress goes to stderr, so that a run cut short shows
    how far it came."""
    rows, unmeasured = [], []
    for i, case in enumerate(cases, 1):
        if budget is not None and time.perf_counter() - STARTED > budget:
            unmeasured.append(f"{case.op} / {case.candidate}")
            continue
        row = measure_case(case, device, min_run_time)
        rows.append(row)
        result = f"{row.device_ms:.4f} ms" if row.device_ms is not None else row.note
        elapsed = time.perf_counter() - STARTED
        print(f"[{i}/{len(cases)}, {elapsed:.1f} s] {case.op} / {case.candidate}: {result}", file=sys.stderr)
    return rows, unmeasured


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def gb_per_s(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def table(rows: list[Row]) -> list[str]:
    def ms(v: Optional[float]) -> str:
        return "-" if v is None else f"{v:.4f}"

    header = f"{'op':<17} {'candidate':<34} {'device ms':>10} {'host ms':>9} {'GB/s':>8}  {'method':<24} sdpa"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.op:<17} {r.candidate:<34} {ms(r.device_ms):>10} {ms(r.host_ms):>9} "
            f"{gb_per_s(r.gb_per_s):>8}  {r.method:<24} {r.sdpa}" + (f"  [{r.note}]" if r.note else "")
        )
    return lines


def summary(rows: list[Row], device: str, unmeasured: list[str], sdpa_note: str) -> list[str]:
    timed = {(r.op, r.candidate): r for r in rows if r.device_ms is not None}

    def goal(text: str, met: bool) -> str:  # the targets are set for CUDA (README, GPU)
        return f"(target {text}: {'met' if met else 'missed'})" if device == "cuda" else f"(target on CUDA {text})"

    lines = []
    target, cat = timed.get((ATTENTION, PRECAT)), timed.get((ATTENTION, CAT))
    if target and cat:
        ratio = cat.device_ms / target.device_ms
        lines.append(f"prefix_attention cat + sdpa: {ratio:.3f}x sdpa over pre-concatenated k/v")
    for b in BACKENDS:
        r = timed.get((ATTENTION, f"backend {b}"))
        if r is None:
            continue
        parts = [f"prefix_attention {b}: {r.device_ms:.4f} ms"]
        if target:
            ratio = r.device_ms / target.device_ms
            parts.append(f"{ratio:.3f}x sdpa over pre-concatenated k/v {goal('<= 1.10', ratio <= 1.10)}")
        if cat:
            ratio = r.device_ms / cat.device_ms
            parts.append(f"{ratio:.3f}x cat + sdpa {goal('< 1', ratio < 1)}")
        lines.append(", ".join(parts))
    copy = timed.get((NORM, COPY))
    if copy:
        lines.append(f"device copy of x: {gb_per_s(copy.gb_per_s)} GB/s")
    for b in (*BACKENDS, "reference (unfused)"):
        r = timed.get((NORM, f"backend {b}"))
        if r is None:
            continue
        line = f"norm_and_project {b}: {r.device_ms:.4f} ms, {gb_per_s(r.gb_per_s)} GB/s"
        if copy:
            share = r.gb_per_s / copy.gb_per_s
            line += f" = {share:.0%} of the copy's {goal('>= 70%', share >= 0.7)}"
        lines.append(line)
    for op in (ATTENTION, NORM):
        ranked = sorted((timed[op, f"backend {b}"].device_ms, b) for b in BACKENDS if (op, f"backend {b}") in timed)
        if ranked:
            order = ", ".join(f"{b} ({ms:.4f} ms)" for ms, b in ranked)
            auto = ", ".join(ops.AUTO_PREFERENCE[op].get(device, ())) or "none"
            lines.append(f"{op} on {device}, fastest first: {order}; ops.AUTO_PREFERENCE has: {auto}")
    if device == "cuda":
        bound = [f"{r.op} / {r.candidate}" for r in timed.values() if r.host_ms is not None and r.host_ms > r.device_ms]
        if bound:
            lines.append("host time exceeds device time (eagerly, Python and launches bound these): " + "; ".join(bound))
    if sdpa_note:
        lines.append(f"sdpa: {sdpa_note}")
    lines += [f"note: {r.op} / {r.candidate}: {r.note}" for r in rows if r.note]
    if unmeasured:
        lines.append("not measured (budget spent): " + "; ".join(unmeasured))
    return lines


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], allow_abbrev=False)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=("tiny", "default"), default="default")
    parser.add_argument("--json", type=Path, help="write rows and environment here when measuring ends")
    parser.add_argument("--budget", type=float, help="seconds; once spent, no new row is measured (soft)")
    parser.add_argument(
        "--triton-interpreter",
        action="store_true",
        help="on CPU, also time the triton backend, in Triton's interpreter (slow; sets TRITON_INTERPRET=1)",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: PyTorch sees no CUDA device (torch.cuda.is_available() is False); use --device cpu")
    if args.budget is not None and not args.budget > 0:
        parser.error(f"--budget must be a positive number of seconds, got {args.budget}")
    if args.json is not None and not args.json.parent.is_dir():
        parser.error(f"--json: folder {args.json.parent} does not exist; create it or choose another path")
    if args.triton_interpreter and args.device != "cpu":
        parser.error("--triton-interpreter is for --device cpu; on CUDA the triton backend runs compiled")
    if args.device == "cuda" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("TRITON_INTERPRET=1 would run the triton backend interpreted on CUDA tensors; unset it")
    return args


def backends_for(device: str, triton_interpreter: bool) -> tuple[list[str], dict[str, str]]:
    """The backends to time, and each left out mapped to why."""
    left_out = {}
    for b in BACKENDS:
        reason = ops.unavailable_reason(b, device)
        if b == "triton" and device == "cpu" and not triton_interpreter:
            reason = "skipped: on CPU it runs only in Triton's interpreter, which is slow; pass --triton-interpreter"
        elif reason is not None:
            reason = f"unavailable: {reason}"
        if reason is not None:
            left_out[b] = reason
    return [b for b in BACKENDS if b not in left_out], left_out


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    device, s = args.device, shapes_for(args.device, args.size)
    backends, left_out = backends_for(device, args.triton_interpreter)
    torch.manual_seed(0)
    attention, pinned, sdpa_name, sdpa_note = attention_cases(s, device, backends)
    cases = attention + norm_cases(s, device, backends)
    environment = {
        **library_versions(),
        "git_commit": git_commit(),
        "device": device_name(device),
        "size": args.size,
        "shapes": s.describe(),
        "sdpa_backend": sdpa_name,
        "sdpa_note": sdpa_note,
        "left_out": left_out,
    }
    print(f"device: {environment['device']}; torch {environment['torch']}, triton {environment['triton']}")
    print(f"shapes: {environment['shapes']}; sdpa pinned: {sdpa_name}")
    if device == "cpu":
        print("on CPU the device time is host time (Timer.blocked_autorange); the host column repeats it")
    for b, reason in left_out.items():
        print(f"backend {b}: {reason}")
    with sdpa_kernel(pinned):
        rows, unmeasured = measure(cases, device, args.budget, 0.02 if args.size == "tiny" else 0.2)
    if args.json is not None:
        report = {"environment": environment, "rows": [asdict(r) for r in rows], "not_measured": unmeasured}
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"rows and environment written to {args.json}")
    print("\n".join(table(rows)))
    print("\nsummary")
    print("\n".join(summary(rows, device, unmeasured, sdpa_note)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
