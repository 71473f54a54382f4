"""Compile-time resource checks of the CUDA kernels (marker ``gpu_static``): no GPU needed.

* Every kernel the built extension carries, for every architecture it was built for
  (``cuobjdump --dump-resource-usage`` and ``-sass`` on ``vapt_kernels/_C*.so``): no local-memory
  traffic (register spills, or arrays the compiler could not keep in registers: ``STL``/``LDL``
  instructions, ``LOCAL`` bytes), at most 255 registers, a stack within :data:`MAX_STACK_BYTES`,
  static shared memory within the 48 KiB a block may declare statically.
* The launch geometry of ``norm_and_project`` at the largest supported shapes, read from the one
  place the launcher takes it from (``csrc/cuda/norm_and_project_launch.h``, compiled here into a
  tiny host program): block sizes, grid limits, and each kernel's static plus dynamic shared
  memory against the per-block limits of sm_80 and sm_90.

Skipped only when the extension was built without CUDA (``vapt_kernels/_build_info.json``).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from vapt_kernels.ops import native

pytestmark = pytest.mark.gpu_static

ROOT = Path(__file__).resolve().parents[1]
MAX_REGISTERS = 255  # the architectural limit of a thread
MAX_STACK_BYTES = 0  # no kernel calls a function that needs a frame or keeps an array on the stack
STATIC_SMEM_LIMIT = 48 * 1024  # what a block may declare with static __shared__ arrays
# Dynamic shared memory per block: without opting in (cudaFuncSetAttribute), and the opt-in maximum.
DEFAULT_DYNAMIC_SMEM_LIMIT = 48 * 1024
OPT_IN_SMEM_LIMIT = {"sm_80": 166912, "sm_90": 232448}


def _built_archs() -> list[str]:
    """The architectures the extension was built for, as cuobjdump names them (``sm_80``)."""
    info = native.build_info()
    if not info.get("cuda"):
        pytest.skip(f"the extension was built without CUDA (vapt_kernels/_build_info.json: {info or 'missing'})")
    arch_list = info.get("arch_list") or ""
    return sorted({"sm_" + a.split("+")[0].replace(".", "") for a in re.split(r"[;\s]+", arch_list) if a})


def _extension() -> Path:
    spec = importlib.util.find_spec("vapt_kernels._C")
    assert spec is not None and spec.origin, "the extension is marked as built with CUDA but is not installed"
    return Path(spec.origin)


def _cuobjdump() -> str:
    """cuobjdump of the toolkit setup.py built with (recorded in the build info), else the PATH's,
    else the copy Triton bundles."""
    candidates = []
    home = native.build_info().get("cuda_home")
    if home:
        candidates.append(Path(home) / "bin" / "cuobjdump")
    if shutil.which("cuobjdump"):
        candidates.append(Path(shutil.which("cuobjdump")))
    triton = importlib.util.find_spec("triton")
    if triton is not None and triton.origin:
        candidates.append(Path(triton.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    pytest.fail(f"no cuobjdump found (looked at {', '.join(map(str, candidates)) or 'nothing'})")


def _short_names(mangled: list[str]) -> dict[str, str]:
    """Readable kernel names (``norm_and_project_fwd_kernel<c10::Half, float, 8>``) through c++filt."""
    if not mangled or shutil.which("c++filt") is None:
        return {m: m for m in mangled}
    out = subprocess.run(["c++filt"], input="\n".join(mangled), capture_output=True, text=True, check=True).stdout
    names = {}
    for m, d in zip(mangled, out.splitlines()):
        d = d.removeprefix("void ").replace("(anonymous namespace)::", "").replace("vapt::", "")
        names[m] = d.split("(", 1)[0]
    return names


def _sections(dump: str, header: str) -> Iterator[tuple[str, str, list[str]]]:
    """(arch, function, lines) for each function of a cuobjdump listing: ``header`` matches the line
    that names a function (group 1), ``arch = sm_XX`` lines set the architecture of the functions
    after them, and a function's lines run to the next header."""
    arch = function = None
    lines: list[str] = []
    for line in dump.splitlines():
        if m := re.match(r"\s*arch = (sm_\d+)", line):
            arch = m.group(1)
        elif m := re.match(header, line):
            if function is not None:
                yield section_arch, function, lines
            section_arch, function, lines = arch, m.group(1), []
        elif function is not None:
            lines.append(line)
    if function is not None:
        yield section_arch, function, lines


@pytest.fixture(scope="session")
def resources() -> dict[str, dict[str, dict[str, int]]]:
    """arch -> kernel -> REG, STACK, SHARED, LOCAL (bytes) and STL/LDL (local-memory instructions)."""
    archs = _built_archs()
    tool, so = _cuobjdump(), str(_extension())
    usage = subprocess.run([tool, "--dump-resource-usage", so], capture_output=True, text=True, check=True).stdout
    table: dict[str, dict[str, dict[str, int]]] = defaultdict(dict)
    for arch, function, lines in _sections(usage, r"\s*Function (\S+):"):
        if counts := next((line for line in lines if "REG:" in line), None):
            fields = dict(re.findall(r"(\w+):(\d+)", counts))
            table[arch][function] = {k: int(fields.get(k, 0)) for k in ("REG", "STACK", "SHARED", "LOCAL")}
            table[arch][function].update(STL=0, LDL=0)
    sass = subprocess.run([tool, "-sass", so], capture_output=True, text=True, check=True).stdout
    for arch, function, lines in _sections(sass, r"\s*Function : (\S+)"):
        for line in lines:
            if m := re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?(STL|LDL)\b", line):
                entry = table[arch].setdefault(function, dict(REG=0, STACK=0, SHARED=0, LOCAL=0, STL=0, LDL=0))
                entry[m.group(1)] += 1
    names = _short_names(sorted({f for kernels in table.values() for f in kernels}))
    missing = [a for a in archs if not table.get(a)]
    assert not missing, f"{so} carries no kernels for {missing} (built for {archs}, found {sorted(table)})"
    return {a: {names[f]: r for f, r in table[a].items()} for a in archs}


def _worst_by_kernel(kernels: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """The largest value of each resource over a kernel template's instantiations."""
    worst: dict[str, dict[str, int]] = {}
    for name, r in kernels.items():
        w = worst.setdefault(name.split("<", 1)[0], dict.fromkeys(r, 0))
        for k, v in r.items():
            w[k] = max(w[k], v)
    return worst


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_kernel_fits_without_spills(resources, arch):
    """No spills or local arrays, registers <= 255, stack within its bound, static shared memory
    within 48 KiB, for every kernel of the extension (whatever kernels it carries)."""
    if arch not in resources:
        pytest.skip(f"the extension was not built for {arch}")
    kernels = resources[arch]
    print(f"\n{arch}: worst over each kernel's instantiations ({len(kernels)} kernels)")
    for name, w in sorted(_worst_by_kernel(kernels).items()):
        print(f"  {name:<40} " + " ".join(f"{k}:{v}" for k, v in w.items()))
    bad = [
        f"{name}: {r}"
        for name, r in sorted(kernels.items())
        if r["STL"] or r["LDL"] or r["LOCAL"] or r["REG"] > MAX_REGISTERS or r["STACK"] > MAX_STACK_BYTES
        or r["SHARED"] > STATIC_SMEM_LIMIT
    ]
    assert not bad, f"{arch}: kernels over their resource bounds:\n" + "\n".join(bad)


# The launches of norm_and_project at the shapes the gate covers, printed by the launcher's own
# geometry functions: "kernel threads grid_x grid_y grid_z dynamic_smem" per line. The largest
# supported shapes: d up to 2048 (and odd widths), Np up to 200, ViT-B and larger token counts,
# batches up to 1024, up to 1000 tasks; the geometry does not depend on the dtype (float, half and
# bfloat16 alike).
LAUNCH_PROGRAM = r"""
#include <cstdio>
#include <initializer_list>

#include "norm_and_project_launch.h"
using namespace vapt::norm_and_project;

static void show(const char* kernel, const Geometry& g) {
  std::printf("%s %d %lld %lld %lld %lld\n", kernel, g.threads, (long long)g.grid_x, (long long)g.grid_y,
              (long long)g.grid_z, (long long)g.dynamic_smem);
}

int main() {
  for (long long B : {1LL, 128LL, 1024LL})
    for (long long N : {196LL, 1024LL, 4096LL})
      for (long long P : {0LL, 1LL, 5LL})
        for (long long d : {1LL, 7LL, 768LL, 2047LL, 2048LL})
          for (long long Np : {1LL, 10LL, 200LL}) {
            const long long T = P + N;
            show("rows_fwd_kernel", rows_fwd_geometry(B, T));
            show("rows_bwd_kernel", rows_bwd_geometry(B, T));
            // forward g (Z = B, M = Np), backward dxg (Z = B, M = N), shared-mix dmix per image
            // (Z = B, M = Np, C = N), per-channel dmix (Z = N, M = Np)
            show("project_kernel", project_geometry<SharedMixTile>(B, Np, d));
            show("project_kernel", project_geometry<SharedMixTile>(B, N, d));
            show("project_kernel", project_geometry<SharedMixTile>(B, Np, N));
            show("project_kernel", project_geometry<ChannelMixTile>(B, Np, d));
            show("project_kernel", project_geometry<ChannelMixTile>(B, N, d));
            show("project_kernel", project_geometry<ChannelMixTile>(N, Np, d));
            // many tasks: per-channel forward g and dxg one image a block, the per-channel dmix
            // once per task, the per-task sums of the shared-mix dmix and the gen affine gradients
            for (long long K : {1LL, 1000LL}) {
              show("project_kernel", project_geometry<ChannelMixTaskTile>(B, Np, d));
              show("project_kernel", project_geometry<ChannelMixTaskTile>(B, N, d));
              show("project_kernel", project_geometry<ChannelMixTile>(N, Np, d, K));
              show("task_sum_kernel", task_sum_geometry(K, Np * N));
              show("task_sum_kernel", task_sum_geometry(K, d));
            }
          }
  return 0;
}
"""


@pytest.fixture(scope="session")
def launches(tmp_path_factory) -> list[tuple[str, int, int, int, int, int]]:
    """The launches LAUNCH_PROGRAM prints, compiled once per session with the host C++ compiler."""
    _built_archs()
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.fail("no host C++ compiler (g++) to build the launch-geometry program")
    folder = tmp_path_factory.mktemp("launch_geometry")
    source, binary = folder / "launch.cpp", folder / "launch"
    source.write_text(LAUNCH_PROGRAM)
    subprocess.run(
        [cxx, "-std=c++17", "-Wall", "-Werror", "-I", str(ROOT / "csrc" / "cuda"), str(source), "-o", str(binary)],
        check=True, capture_output=True, text=True,
    )
    out = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    return [(k, *map(int, rest)) for k, *rest in (line.split() for line in out.splitlines())]


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_norm_and_project_launches_fit_the_device(resources, launches, arch):
    """Every launch of norm_and_project at the covered shapes: a block of at most 1024 threads, a
    grid within CUDA's limits, and the kernel's static shared memory (the largest over its
    instantiations) plus the dynamic bytes within the per-block limit (48 KiB: the launcher does
    not opt in to more, which also keeps within the opt-in limits of sm_80 and sm_90)."""
    if arch not in resources:
        pytest.skip(f"the extension was not built for {arch}")
    static = {name: w["SHARED"] for name, w in _worst_by_kernel(resources[arch]).items()}
    limit = min(DEFAULT_DYNAMIC_SMEM_LIMIT, OPT_IN_SMEM_LIMIT[arch])
    worst: dict[str, tuple[int, int]] = {}
    bad = []
    for kernel, threads, gx, gy, gz, dynamic in launches:
        assert kernel in static, f"{kernel} is launched but not in the extension ({sorted(static)})"
        smem = static[kernel] + dynamic
        worst[kernel] = max(worst.get(kernel, (0, 0)), (smem, threads))
        if not (0 < threads <= 1024 and gx <= 2**31 - 1 and gy <= 65535 and gz <= 65535 and smem <= limit):
            bad.append(f"{kernel}: {threads} threads, grid ({gx}, {gy}, {gz}), {smem} bytes of shared memory")
    print(f"\n{arch}: worst shared memory per block (static + dynamic) and threads, limit {limit} bytes")
    for kernel, (smem, threads) in sorted(worst.items()):
        print(f"  {kernel:<40} smem:{smem} threads:{threads}")
    assert not bad, f"{arch}: launches over the limits:\n" + "\n".join(bad[:20])
