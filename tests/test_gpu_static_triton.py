"""Static GPU gate for the Triton kernels, without a GPU: every kernel is compiled offline for sm_90
and sm_80 exactly as its launcher configures it, and the compiled code is checked for what only shows
on a GPU otherwise: shared memory over the per-block limit (the launch fails), register spills
(local-memory traffic in the inner loops) and TF32 products in kernels that promise float32 ones.

How the launches are obtained: a child process (``TRITON_INTERPRET`` unset, so ``@triton.jit``
gives compilable kernels; ``conftest.py`` sets it on CPU-only machines) replaces every kernel of the
two kernel files by a recorder and calls the real launchers on ``meta`` tensors over the shapes
below. Each recorded launch (arguments, constexprs, ``num_warps``, ``num_stages``, exactly as each
kernel file's ``launch_config`` chose them) is specialised with Triton's own argument binder for each
target and compiled once per distinct specialisation (many shapes share one). Shared memory comes
from the compiled metadata; registers, stack and local memory from the cubin's resource usage
(Triton's bundled ``cuobjdump``); TF32 from the PTX.

Shapes: channels ``d`` of ViT-S/B/L/H/g/G and 2048, head dims 64/80/128, ``Np`` in 1/10/50/200, a
14 x 14 patch grid behind one class token, shared and per-channel mix, one task or three (a per-image
task index), static (broadcast) and adaptive prefixes, with LayerNorm affines (timm's default).
Dtypes: every input dtype the Triton contract takes on CUDA (``KERNEL_DTYPES``). The ops bring every
mixed-dtype call to one dtype before the kernels (weights to ``x``'s dtype, ``mix`` to float32;
attention inputs to the autocast dtype, so float32 activations under bfloat16 autocast reach the
attention kernels as bfloat16 and ``norm_and_project`` as float32), so these launches are the ones
mixed calls make.

Runs in ``make test`` (marker ``gpu_static``); skips when Triton, its NVIDIA backend tools or the
offline-compilation API of this Triton version are missing. Verified with Triton 3.8 (all pass) and
3.6 (the lent GPU machine's; its ptxas 12.8 still finds 4-32 byte spills in eight sm_80
prefix_attention configurations: fp32 forward and dq, 16-bit forward at head dims 80/128). Run this file as a script to print the
per-kernel summary: ``python tests/test_gpu_static_triton.py``.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import pytest

pytestmark = pytest.mark.gpu_static

# (name, compute capability, largest shared memory a block may opt in to, in bytes).
TARGETS = (("sm_90", 90, 232448), ("sm_80", 80, 166912))
CHANNELS = (384, 768, 1024, 1280, 1408, 1664, 2048)
HEAD_DIMS = (64, 80, 128)
PROMPTS = (1, 10, 50, 200)
PATCHES, PREFIX, BATCH = 196, 1, 2
# Tasks of the many-task norm_and_project launches (per-image task index).
TASKS = 3
KERNEL_MODULES = ("vapt_kernels.ops.triton.norm_and_project", "vapt_kernels.ops.triton.prefix_attention")


# --------------------------------------------------------------------------------------------
# child process: record the launches, compile them
# --------------------------------------------------------------------------------------------


def _record_launches() -> tuple[list[tuple], list[dict]]:
    """``(module, kernel, args, kwargs)`` of every launch the launchers make over the gate's shapes,
    and the scratch memory of every launcher call (see :func:`_call`)."""
    import importlib

    import triton

    records, scratch = [], []

    class Recorder:
        def __init__(self, module: str, kernel):
            self.module, self.kernel = module, kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: records.append((self.module, self.kernel, args, kwargs))

    modules = {name: importlib.import_module(name) for name in KERNEL_MODULES}
    kernels = {
        (module, attr): value
        for module in modules.values()
        for attr, value in vars(module).items()
        if isinstance(value, triton.runtime.JITFunction) and attr.endswith("_kernel")
    }
    for (module, attr), kernel in kernels.items():
        setattr(module, attr, Recorder(module.__name__, kernel))
    try:
        nap, pa = modules.values()
        call = functools.partial(_call, records, scratch)
        _launch_norm_and_project(nap, call)
        _launch_prefix_attention(pa, call)
    finally:
        for (module, attr), kernel in kernels.items():
            setattr(module, attr, kernel)
    return records, scratch


def _call(records: list, scratch: list, launcher, budget: int, *args):
    """``launcher(*args)``, noting the bytes of the tensors its kernels got that are neither its
    inputs nor its outputs (scratch buffers), next to the ``budget`` the op allows."""
    first = len(records)
    outputs = launcher(*args)
    known = [t for t in (*args, *outputs) if hasattr(t, "shape")]
    buffers = {
        id(a): a
        for _, _, kernel_args, _ in records[first:]
        for a in kernel_args
        if hasattr(a, "shape") and not any(a is t for t in known)
    }
    used = sum(t.numel() * t.element_size() for t in buffers.values())
    shapes = [tuple(t.shape) for t in buffers.values()]
    call = dict(launcher=launcher.__name__, shape=tuple(args[0].shape), bytes=used, budget=budget, buffers=shapes)
    scratch.append(call)
    return outputs


def _launch_norm_and_project(nap, call) -> None:
    """``norm_and_project``'s forward and backward launchers on ``meta`` tensors of every gate shape."""
    import torch

    from vapt_kernels.ops import library

    meta = dict(device="meta")
    T = PREFIX + PATCHES
    f32 = dict(device="meta", dtype=torch.float32)
    task = torch.empty(BATCH, dtype=torch.int64, **meta)
    for dtype in library.KERNEL_DTYPES["triton"]["cuda"]:
        for d in CHANNELS:
            x = torch.empty(BATCH, T, d, dtype=dtype, **meta)
            w = torch.empty(d, dtype=dtype, **meta)
            wk = torch.empty(TASKS, d, dtype=dtype, **meta)
            for Np in PROMPTS:
                # One task (task None), then TASKS tasks with per-task mix and prompt LayerNorm.
                for lead, wg, tasks in (((), w, None), ((TASKS,), wk, task)):
                    for mix_shape in ((*lead, Np, PATCHES), (*lead, Np, PATCHES, d)):
                        mix = torch.empty(mix_shape, **f32)
                        # Forward: g's own size in float32 at most (no buffer that grows with row tiles).
                        budget = 4 * BATCH * Np * d
                        _, _, mean, rstd1, rstd_g = call(
                            nap.norm_and_project_forward, budget, x, w, w, 1e-6, wg, wg, 1e-6, mix, PREFIX, tasks
                        )
                        dg = torch.empty(BATCH, Np, d, dtype=dtype, **meta)
                        # Backward: per-image prompt-by-patch and prompt-by-channel float32 buffers,
                        # the four weight gradients' float32 partials over blocks of 32 rows or more
                        # and, with tasks, the int64 images sorted by task and each task's start.
                        budget = 4 * BATCH * Np * (PATCHES + d + 2) + 16 * BATCH * -(-T // 32) * d
                        if tasks is not None:
                            budget += 8 * (BATCH + TASKS + 1)
                        call(nap.norm_and_project_backward, budget, x, dg, x, w, wg, wg, mix, mean, rstd1, rstd_g,
                             PREFIX, tasks)  # fmt: skip


def _launch_prefix_attention(pa, call) -> None:
    """``prefix_attention``'s forward and backward launchers on ``meta`` tensors of every gate shape."""
    import torch

    from vapt_kernels.ops import library

    meta = dict(device="meta")
    T = PREFIX + PATCHES
    for dtype in library.KERNEL_DTYPES["triton"]["cuda"]:
        for D in HEAD_DIMS:
            for d in CHANNELS:
                H = max(1, d // D)
                # q, k, v as timm's Attention makes them: views of one (B, T, 3, H, D) projection.
                qkv = torch.empty(BATCH, T, 3, H, D, dtype=dtype, **meta).permute(2, 0, 3, 1, 4)
                q, k, v = qkv.unbind(0)
                for Np in PROMPTS:
                    for Bp in (1, BATCH):
                        kp = torch.empty(Bp, H, Np, D, dtype=dtype, **meta)
                        out, lse = call(pa.prefix_attention_forward, 0, q, k, v, kp, kp, D**-0.5)
                        dout = torch.empty(BATCH, T, H, D, dtype=dtype, **meta).transpose(1, 2)
                        # delta (B, H, T) and, for a broadcast prefix, float32 per-image prefix gradients.
                        budget = 4 * BATCH * H * (T + 2 * Np * D)
                        call(pa.prefix_attention_backward, budget, dout, q, k, v, kp, kp, out, lse, D**-0.5)


def _compile_one(job: tuple) -> dict:
    """Compile one specialised kernel for one target and read its resources."""
    module_name, kernel_name, signature, constexprs, attrs, options, arch, shape = job
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(module_name), kernel_name)
    start = time.perf_counter()
    compiled = triton.compile(
        ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32), options=options
    )
    seconds = time.perf_counter() - start
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [os.path.join(tools, "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    resources = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage))
    return dict(
        kernel=kernel_name,
        arch=arch,
        shape=shape,
        constexprs=constexprs,
        num_warps=options["num_warps"],
        num_stages=options["num_stages"],
        shared=compiled.metadata.shared,
        regs=int(resources["REG"]),
        stack=int(resources["STACK"]),
        local=int(resources["LOCAL"]),
        tf32=bool(re.search(r"\btf32\b", compiled.asm["ptx"])),
        seconds=seconds,
    )


def _promises_fp32_products(kernel_name: str, signature: dict) -> bool:
    """``norm_and_project`` computes in float32 whatever its inputs; ``prefix_attention``'s
    products are float32 for float32 inputs (16-bit inputs use 16-bit tensor-core products)."""
    if not kernel_name.startswith("_prefix_attention"):
        return True
    return signature["q_ptr"] == "*fp32"


def _child_main() -> dict:
    """Record, specialise, deduplicate and compile; returns every result and the gate's timing."""
    import concurrent.futures
    import multiprocessing

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    start = time.perf_counter()
    records, scratch = _record_launches()
    jobs, seen, binders, promise = [], set(), {}, {}
    for _, arch, _ in TARGETS:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        for module_name, kernel, args, kwargs in records:
            if (kernel, arch) not in binders:
                binders[kernel, arch] = create_function_from_signature(kernel.signature, kernel.params, backend)
            try:
                bound, specialization, options = binders[kernel, arch](*args, **kwargs)
                key = (kernel.__name__, arch, str(specialization), str(options))
                if key in seen:
                    continue
                seen.add(key)
                opts, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
            except (TypeError, ValueError) as e:
                return dict(skip=f"Triton {triton.__version__} binds launch arguments differently: {e!r}")
            constexprs = {kernel.arg_names[p[0]] if isinstance(p, tuple) else p: v for p, v in constexprs.items()}
            shape = {
                name: tuple(a.shape) if hasattr(a, "shape") else a
                for name, a in zip(kernel.arg_names, args)
                if name in ("x_ptr", "q_ptr", "mix_ptr", "kp_ptr")
            }
            shape["dtype"] = signature.get("x_ptr", signature.get("q_ptr"))
            promise[len(jobs)] = _promises_fp32_products(kernel.__name__, signature)
            jobs.append((module_name, kernel.__name__, signature, constexprs, attrs, opts.__dict__, arch, shape))
    workers = max(1, min(2, os.cpu_count() or 1))
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        results = list(pool.map(_compile_one, jobs))
    for i, result in enumerate(results):
        result["promises_fp32"] = promise[i]
    return dict(
        triton=triton.__version__,
        launches=len(records),
        results=results,
        scratch=scratch,
        seconds=time.perf_counter() - start,
    )


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------


def _skip_reason() -> str | None:
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource, make_backend  # noqa: F401
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
    except ImportError as e:
        return f"Triton's offline compilation API is not available: {e}"
    if not hasattr(JITFunction, "_pack_args"):
        return f"Triton {triton.__version__} has no JITFunction._pack_args to specialise launches offline"
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for tool in ("ptxas", "cuobjdump"):
        if not os.access(os.path.join(tools, tool), os.X_OK):
            return f"Triton's bundled {tool} is missing from {tools}"
    return None


@functools.cache
def _gate() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--json", out.name], env=env, capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise RuntimeError(f"the offline compilation failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
        with open(out.name) as f:
            return json.load(f)


@pytest.fixture(scope="module")
def gate() -> dict:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    result = _gate()
    if "skip" in result:
        pytest.skip(result["skip"])
    return result


def _describe(r: dict) -> str:
    blocks = {k: v for k, v in r["constexprs"].items() if k.startswith("BLOCK") or k == "PER_CHANNEL"}
    return (
        f"{r['kernel']} sm_{r['arch']} {r['shape']} warps={r['num_warps']} stages={r['num_stages']} {blocks}: "
        f"shared={r['shared']} regs={r['regs']} stack={r['stack']} local={r['local']} tf32={r['tf32']}"
    )


def _of(gate: dict, arch: int) -> list[dict]:
    return [r for r in gate["results"] if r["arch"] == arch]


@pytest.mark.parametrize("target", TARGETS, ids=[t[0] for t in TARGETS])
def test_shared_memory_fits_a_block(gate, target):
    _, arch, limit = target
    over = [_describe(r) for r in _of(gate, arch) if r["shared"] > limit]
    assert not over, f"{len(over)} configurations need more than {limit} bytes of shared memory:\n" + "\n".join(over)


@pytest.mark.parametrize("target", TARGETS, ids=[t[0] for t in TARGETS])
def test_no_register_spills(gate, target):
    _, arch, _ = target
    spilling = [_describe(r) for r in _of(gate, arch) if r["stack"] or r["local"]]
    assert not spilling, f"{len(spilling)} configurations spill registers (stack/local memory):\n" + "\n".join(spilling)


@pytest.mark.parametrize("target", TARGETS, ids=[t[0] for t in TARGETS])
def test_no_tf32_where_float32_products_are_promised(gate, target):
    _, arch, _ = target
    tf32 = [_describe(r) for r in _of(gate, arch) if r["promises_fp32"] and r["tf32"]]
    assert not tf32, f"{len(tf32)} configurations promise float32 products and use TF32:\n" + "\n".join(tf32)


def test_scratch_memory_within_budget(gate):
    over = [f"{s['launcher']} {s['shape']}: {s['bytes']} > {s['budget']} bytes in {s['buffers']}"
            for s in gate["scratch"] if s["bytes"] > s["budget"]]  # fmt: skip
    assert not over, f"{len(over)} calls use more scratch memory than their budget:\n" + "\n".join(over)


def test_every_kernel_is_compiled_for_every_target(gate):
    import importlib

    names = set()
    for module in KERNEL_MODULES:
        names |= {name for name in vars(importlib.import_module(module)) if name.endswith("_kernel")}
    for _, arch, _ in TARGETS:
        assert {r["kernel"] for r in _of(gate, arch)} == names


def summary(gate: dict) -> str:
    """Worst shared memory, registers and stack per kernel and target, and the gate's totals."""
    lines = [f"triton {gate['triton']}: {gate['launches']} launches, {len(gate['results'])} compilations, "
             f"{gate['seconds']:.0f} s"]
    for name in sorted({r["kernel"] for r in gate["results"]}):
        for label, arch, limit in TARGETS:
            rs = [r for r in gate["results"] if r["kernel"] == name and r["arch"] == arch]
            lines.append(
                f"{name:40s} {label} configs={len(rs):3d} max shared={max(r['shared'] for r in rs):6d}/{limit} "
                f"max regs={max(r['regs'] for r in rs):3d} max stack={max(r['stack'] for r in rs):5d} "
                f"spilling={sum(bool(r['stack'] or r['local']) for r in rs)} "
                f"tf32 where fp32 promised={sum(r['tf32'] and r['promises_fp32'] for r in rs)}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    if "--json" in sys.argv:
        result = _child_main()
        with open(sys.argv[sys.argv.index("--json") + 1], "w") as f:
            json.dump(result, f)
    else:
        result = _gate()
        print(result.get("skip") or summary(result))
