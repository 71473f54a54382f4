"""``vapt-check`` (``python -m vapt_kernels.check``): what this installation can run, and whether it
computes right.

Prints the versions, the compiled extension's build configuration, the devices, which backend can
run on which device (or why not), then a quick self-test: every kernel backend that says it can run
on a device present here runs both public ops, forward and backward, in every dtype its contract
takes there, on small awkward shapes, against the plain references in float64. Last, which backend
``auto`` picks per device and dtype. Exits 1 when a backend that says it can run fails its
self-test; a backend that cannot run here is reported with its reason and is no failure.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from vapt_kernels import ops
from vapt_kernels.environment import describe, devices, versions
from vapt_kernels.ops import composite, library, native
from vapt_kernels.testing import max_rel_err, poisoned_allocations

SELF_TESTED = ("torch", "native", "triton")  # `reference` is the composite path itself
# Input dtype -> the largest relative error (max |a - b| / max |b|) of any output or gradient.
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 3e-2}
PROJECT_SHAPE = dict(B=2, P=1, N=15, d=48, Np=5)  # N not a power of two; one prefix token
PROJECT_TASKS = (2, 0, 2)  # the many-task case: each image's task, of 3 (task 1 has no image)
ATTENTION_SHAPE = dict(B=2, H=2, T=10, D=24, Np=5)  # T = 1 + 9 patches
PROJECT_NAMES = ("h", "g", "dx", "dnorm1_weight", "dnorm1_bias", "dgen_weight", "dgen_bias", "dmix")
ATTENTION_NAMES = ("out", "dq", "dk", "dv", "dk_prefix", "dv_prefix")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def availability(backend: str, device: torch.device) -> str:
    reason = ops.unavailable_reason(backend, device.type)
    if reason is not None:
        return f"unavailable: {reason}"
    dtypes = library.input_dtypes(backend, device.type)
    limit = library.MAX_HEAD_DIM.get(backend, {}).get(device.type)
    return f"available ({', '.join(map(_name, dtypes))}" + (f"; head dims up to {limit})" if limit else ")")


def print_report(devs: list[torch.device]) -> None:
    print("versions")
    for key, value in versions():
        print(f"  {key:<13} {value}")

    print("\ncompiled extension vapt_kernels._C")
    origin = None
    if native.LOAD_ERROR is not None:
        print(f"  load error: {native.LOAD_ERROR}")
    else:
        kernels = [t for t in ("cpu", "cuda") if native.has_device_kernels(t)]
        origin = importlib.util.find_spec("vapt_kernels._C").origin
        print(f"  loaded from {origin}")
        print(f"  kernels for {', '.join(kernels) or 'no device'} tensors")
    info = native.build_info()
    if info.get("built") is False:
        print(f"  not built: {info.get('reason')}")
    elif info:
        for key, value in info.items():
            if key not in ("built", "sha256"):  # the hash is checked below, not shown
                print(f"  {key:<18} {', '.join(map(str, value)) if isinstance(value, list) else value}")
    else:
        print(
            f"  no build information: {native.BUILD_INFO} is missing (setup.py writes it when it builds or skips "
            "the extension, so this installation was made otherwise or its build was interrupted); "
            "reinstall with `pip install --no-build-isolation .`"
        )
    mismatch = native.build_info_mismatch(Path(origin)) if origin is not None and info else None
    if mismatch is not None:
        print(f"  WARNING the extension loaded above is not the recorded build: {mismatch}")

    print("\ndevices")
    for device in devs:
        print(f"  {str(device):<7} {describe(device)}")
    if not torch.cuda.is_available():
        print(f"  {'cuda':<7} no CUDA device visible to PyTorch")

    print("\nbackends")
    for backend in ops.BACKENDS:
        if backend == "auto":
            continue
        for device in {d.type: d for d in devs}.values():
            print(f"  {backend:<10} {device.type:<5} {availability(backend, device)}")


def print_auto_table(devs: list[torch.device], failed: set[tuple[str, str, torch.dtype]]) -> None:
    print("\nauto picks (ops.auto_backend; prefix_attention with head dim 64)")
    print("  " + f"{'op':<18}{'device':<8}" + "".join(f"{_name(dt):<11}" for dt in library.FLOATING))
    for op in ops.AUTO_PREFERENCE:
        for device in devs:
            picks = []
            for dtype in library.FLOATING:
                try:
                    pick = ops.auto_backend(device, dtype, op=op)
                except Exception as error:  # e.g. a CUDA context a failed kernel left broken
                    picks.append(type(error).__name__)
                    continue
                picks.append(pick + ("*" if (pick, str(device), dtype) in failed else ""))
            print("  " + f"{op:<18}{str(device):<8}" + "".join(f"{p:<11}" for p in picks))
    if failed:
        print("  * failed its self-test above")


# --------------------------------------------------------------------------------------------
# self-test
# --------------------------------------------------------------------------------------------


def _project_cases(gen: torch.Generator) -> list[tuple[list[torch.Tensor], Callable]]:
    """``norm_and_project`` leaves (float64, CPU) and how to make the op's arguments from them: a
    shared ``(Np, N)`` and a per-channel ``(Np, N, d)`` mix, and a batch of 3 tasks (mix
    ``(K, Np, N)`` and prompt LayerNorm affines ``(K, d)`` stacked, a task index per image)."""
    B, P, N, d, Np = PROJECT_SHAPE.values()
    K, Bt = max(PROJECT_TASKS) + 1, len(PROJECT_TASKS)

    def args(x, w1, b1, wg, bg, mix):
        return (x, w1, b1, 1e-6, wg, bg, 1e-5, mix, P)

    def task_args(x, w1, b1, wg, bg, mix):
        return (*args(x, w1, b1, wg, bg, mix), torch.tensor(PROJECT_TASKS, device=x.device))

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    cases = [([randn(B, P + N, d), *(randn(d) for _ in range(4)), randn(Np, N, *extra)], args) for extra in ((), (d,))]
    tasks = [randn(Bt, P + N, d), randn(d), randn(d), randn(K, d), randn(K, d), randn(K, Np, N)]
    return cases + [(tasks, task_args)]


def _norm_and_project(*args, backend: str):
    """``ops.norm_and_project`` on the arguments of :func:`_project_cases` (the task index last)."""
    return ops.norm_and_project(*args[:9], backend=backend, task=args[9] if len(args) > 9 else None)


def _attention_cases(gen: torch.Generator) -> list[tuple[list[torch.Tensor], Callable]]:
    """``prefix_attention`` leaves and arguments: q, k, v as timm's strided views of one QKV tensor,
    prompt keys/values of batch 1 (broadcast, static prompts) and of batch B (adaptive prompts)."""
    B, H, T, D, Np = ATTENTION_SHAPE.values()

    def args(qkv, kv):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        k_prefix, v_prefix = kv.permute(2, 0, 3, 1, 4).unbind(0)
        return (q, k, v, k_prefix, v_prefix, D**-0.5)

    qkv = torch.randn(B, T, 3, H, D, generator=gen, dtype=torch.float64)
    return [([qkv, torch.randn(pb, Np, 2, H, D, generator=gen, dtype=torch.float64)], args) for pb in (1, B)]


def _outputs_and_grads(fn: Callable, leaves: list[torch.Tensor], make_args: Callable, douts) -> list[torch.Tensor]:
    """``fn``'s outputs, then the gradient (for ``douts``) of every tensor argument."""
    args = make_args(*leaves)
    outs = fn(*args)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]  # not task indices
    return outs + list(torch.autograd.grad(outs, inputs, douts(outs)))


def compare(op: str, backend: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict[str, float]:
    """Max relative error of every output and gradient of ``ops.<op>(backend=backend)`` on
    ``device`` in ``dtype``, against the plain reference in float64 on CPU from the same (rounded)
    inputs and output gradients. Raises what the backend raises."""
    gen = torch.Generator().manual_seed(seed)
    if op == "norm_and_project":
        cases, names = _project_cases(gen), PROJECT_NAMES
        public, reference = _norm_and_project, composite.norm_and_project_reference
    else:
        cases, names = _attention_cases(gen), ATTENTION_NAMES
        public, reference = ops.prefix_attention, composite.prefix_attention_reference
    errors: dict[str, float] = {}
    for i, (leaves, make_args) in enumerate(cases):
        rounded = [t.to(dtype) for t in leaves]
        douts = []  # output gradients: drawn once (in the reference's run), rounded like the inputs

        def draw(outs):
            douts.extend(torch.randn(o.shape, generator=gen, dtype=torch.float64).to(dtype) for o in outs)
            return [d.double() for d in douts]

        exact = _outputs_and_grads(reference, [t.double().requires_grad_() for t in rounded], make_args, draw)
        with poisoned_allocations():
            got = _outputs_and_grads(
                lambda *a: public(*a, backend=backend),
                [t.to(device).requires_grad_() for t in rounded],
                make_args,
                lambda outs: [d.to(device) for d in douts],
            )
        for name, a, b in zip(names, got, exact):
            key = name if len(cases) == 1 else f"{name}[{i}]"
            if a.shape != b.shape or a.dtype != dtype:
                raise AssertionError(f"{key} is {_name(a.dtype)} {tuple(a.shape)}, expected {_name(dtype)} {tuple(b.shape)}")
            errors[key] = max_rel_err(a.detach().cpu().double(), b)
    return errors


def self_test(devs: list[torch.device]) -> set[tuple[str, str, torch.dtype]]:
    """Run :func:`compare` for every available kernel backend, device, dtype and op; print one
    line each; return the failed ``(backend, device, dtype)``."""
    B, P, N, d, Np = PROJECT_SHAPE.values()
    Ba, H, T, D, Npa = ATTENTION_SHAPE.values()
    print(
        "\nself-test: each public op with backend=<name>, forward and backward, against the plain references\n"
        "(ops.composite) run in float64 on CPU on the same inputs and output gradients rounded to the dtype;\n"
        "error = max |a - b| / max |b| over every output and every input gradient; fresh allocations are\n"
        "filled with NaN first, so unwritten outputs fail\n"
        f"  norm_and_project  B={B}, {P} prefix + {N} patch tokens, d={d}, Np={Np}; mix (Np, N) [0] and per channel "
        f"(Np, N, d) [1]; images of tasks {PROJECT_TASKS}, mix (3, Np, N) [2]: {', '.join(PROJECT_NAMES)}\n"
        f"  prefix_attention  B={Ba}, H={H}, T={T}, D={D}, Np={Npa}, q/k/v strided views of one qkv tensor; prefix "
        f"batch 1 (broadcast) [0] and {Ba} [1]: {', '.join(ATTENTION_NAMES)}\n"
        "  tolerance         " + ", ".join(f"{_name(dt)} {tol:.0e}" for dt, tol in TOLERANCES.items())
    )
    failed = set()
    start, count = time.perf_counter(), 0
    for device in devs:
        for backend in SELF_TESTED:
            if ops.unavailable_reason(backend, device.type) is not None:
                continue
            for dtype in library.input_dtypes(backend, device.type):
                for op in ("norm_and_project", "prefix_attention"):
                    count += 1
                    label = f"  {backend:<7} {str(device):<7} {_name(dtype):<9} {op:<17}"
                    try:
                        errors = compare(op, backend, device, dtype)  # ends with copies to CPU: synchronised
                    except Exception as error:  # a crashing backend is a failed check; the others still run
                        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
                        print(f"{label} FAIL  {type(error).__name__}: {message[:300]}", flush=True)
                        failed.add((backend, str(device), dtype))
                        continue
                    tol = TOLERANCES[dtype]
                    bad = [f"{k} {e:.1e}" for k, e in errors.items() if not e <= tol]  # NaN fails too
                    worst = max(errors, key=lambda k: errors[k])
                    if bad:
                        print(f"{label} FAIL  max rel err > {tol:.0e} in {', '.join(bad)}", flush=True)
                        failed.add((backend, str(device), dtype))
                    else:
                        print(f"{label} ok    max rel err {errors[worst]:.1e} ({worst})", flush=True)
    seconds = time.perf_counter() - start
    print(f"  {count} checks, {len(failed)} backend/device/dtype failed, {seconds:.1f} s")
    return failed


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vapt-check", description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument(
        "--quick", "--no-selftest", dest="selftest", action="store_false",
        help="print the report only, without the numerical self-test",
    )
    p.add_argument("--device", help="restrict to one device: cpu, cuda (every CUDA device) or cuda:N")
    args = p.parse_args(argv)
    devs = devices()
    if args.device is not None:
        chosen = [d for d in devs if args.device in (d.type, str(d))]
        if not chosen:
            p.error(f"--device {args.device}: not present here; present: {', '.join(map(str, devs))}")
        devs = chosen
    args.devices = devs
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    print_report(args.devices)
    failed = self_test(args.devices) if args.selftest else set()
    print_auto_table(args.devices, failed)
    if failed:
        names = sorted({f"{b} on {dev}" for b, dev, _ in failed})
        print(f"\nFAILED: {', '.join(names)}; a backend that fails here should not be used (set backend='torch')")
        return 1
    print("\nall available backends passed" if args.selftest else "\nself-test skipped (--quick)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
