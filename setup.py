"""Build script for the compiled extension ``vapt_kernels._C`` (metadata lives in pyproject.toml).

* The CPU kernels (``csrc/cpu``) are always built; the CUDA kernels (``csrc/cuda``) too when a CUDA
  toolkit is found or ``FORCE_CUDA=1`` (no GPU is needed to build them).
* ``VAPT_SKIP_EXTENSION=1``: pure-Python install (the ``reference``, ``torch`` and ``triton``
  backends still work).
* ``TORCH_CUDA_ARCH_LIST`` (default ``"8.0;9.0"``) and ``MAX_JOBS`` are honoured.
* The toolkit is looked for in ``CUDA_HOME``/``CUDA_PATH``, next to the ``nvcc`` on the PATH (through
  links and wrapper scripts) and in ``/usr/local/cuda``. Headers that a trimmed toolkit lacks but
  PyTorch's headers include (``cusparse.h``, ``cublas_v2.h``, ...) are taken from the ``nvidia/*``
  wheels that a CUDA build of torch installs into site-packages.

The configuration is printed before anything is compiled. The build records it in
``vapt_kernels/_build_info.json`` next to the extension, wherever the extension goes (the build
folder that becomes the wheel, and the source tree for ``--inplace`` and editable installs), once the
extension is built; a pure-Python install records there why it was not built instead. Read by
:func:`vapt_kernels.ops.native.build_info`, ``vapt-check`` and the tests.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import site
import sysconfig
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PACKAGE = "vapt_kernels"
EXTENSION = f"{PACKAGE}._C"
BUILD_INFO = "_build_info.json"  # in the package folder, next to the extension
# Configuration entries that do not change what is compiled (see extension_modules).
NOT_IN_BINARY = ("max_jobs",)


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _toolkit_root(path: Path) -> Path | None:
    """``path`` if it holds a CUDA toolkit (``bin/nvcc`` and ``include/cuda_runtime.h``)."""
    path = path.resolve()
    if (path / "bin" / "nvcc").is_file() and (path / "include" / "cuda_runtime.h").is_file():
        return path
    return None


def _nvcc_targets(nvcc: Path) -> list[Path]:
    """Toolkit roots an ``nvcc`` on the PATH points to: through links, and through a wrapper script
    that ``exec``s the real compiler (how some machines put a versioned toolkit on the PATH)."""
    real = nvcc.resolve()
    roots = [real.parent.parent]
    try:
        text = real.read_text(errors="ignore") if real.stat().st_size < 4096 else ""
    except OSError:
        text = ""
    for match in re.finditer(r"(/\S+)/bin/nvcc\b", text):
        roots.append(Path(match.group(1)))
    return roots


def find_cuda_home() -> Path | None:
    """The CUDA toolkit to build with, or None."""
    candidates = [Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += _nvcc_targets(Path(nvcc))
    candidates.append(Path("/usr/local/cuda"))
    for candidate in candidates:
        root = _toolkit_root(candidate)
        if root is not None:
            return root
    return None


def find_missing_cuda_headers(cuda_home: Path) -> list[str]:
    """Include folders of the ``nvidia/*`` wheels for the headers ``cuda_home`` lacks."""
    needed = [h for h in ("cusparse.h", "cublas_v2.h", "cusolverDn.h") if not (cuda_home / "include" / h).exists()]
    if not needed:
        return []
    roots = list(dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"], site.getusersitepackages()]))
    folders = []
    for root in roots:
        for header in needed:
            for found in glob.glob(os.path.join(root, "nvidia", "*", "include", header)):
                folder = os.path.dirname(found)
                if folder not in folders:
                    folders.append(folder)
    return folders


def read_build_info(folder: str | Path) -> dict:
    """The record in ``folder/_build_info.json``, or ``{}``."""
    try:
        return json.loads((Path(folder) / BUILD_INFO).read_text())
    except (OSError, ValueError):
        return {}


def write_build_info(folder: str | Path, record: dict | None) -> None:
    """Write ``record`` to ``folder/_build_info.json``; None removes the file."""
    path = Path(folder) / BUILD_INFO
    if record is None:
        path.unlink(missing_ok=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")


def recording_build_py(reason: str):
    """``build_py`` for a pure-Python install: records ``{"built": False, "reason": reason}`` in the
    package it builds (the build folder, or the source tree for an editable install, where
    ``build_py`` copies nothing), so that the installation says why it has no extension."""

    class BuildPyWithoutExtension(build_py):
        def run(self) -> None:
            super().run()
            if self.editable_mode:
                folder = self.get_package_dir(PACKAGE)
            else:
                folder = os.path.join(self.build_lib, *PACKAGE.split("."))
            write_build_info(folder, {"built": False, "reason": reason})

    return BuildPyWithoutExtension


def recording_build_ext(base: type, config: dict):
    """``base`` (a ``build_ext`` command) that records ``config`` next to the extension once it is
    built: ``{"built": True, "binary": <file name>, "sha256": <its hash>, **config}``, in the build
    folder (so the wheel carries it) and, with ``--inplace`` or an editable install, in the source
    tree too. The old record is removed before compiling; a failed build leaves
    ``{"built": False, "reason": ...}`` instead. When the configuration differs from the one recorded
    in the build folder, the extension is rebuilt even though its sources are older than the binary
    (setuptools would otherwise keep a binary of the old configuration)."""

    class BuildExtRecordingInfo(base):
        def run(self) -> None:
            binary = Path(self.build_lib, self.get_ext_filename(EXTENSION))
            folders = [binary.parent]
            if self.inplace:  # read before the base class's run, which resets it while compiling
                folders.append(Path(self.get_finalized_command("build_py").get_package_dir(PACKAGE)))
            previous = read_build_info(binary.parent)
            same = previous.get("built") is True and all(
                previous.get(key) == value for key, value in config.items() if key not in NOT_IN_BINARY
            )
            if not same:
                self.force = True
            for folder in folders:
                write_build_info(folder, None)
            try:
                super().run()
            except Exception as error:
                message = " ".join(str(error).split())
                reason = (
                    f"the last build of the extension failed ({type(error).__name__}: {message}); an extension "
                    "binary left here is from an earlier build: fix the error (the build log says more) and rebuild"
                )
                for folder in folders:
                    write_build_info(folder, {"built": False, "reason": reason})
                raise
            digest = hashlib.sha256(binary.read_bytes()).hexdigest()
            record = {"built": True, "binary": binary.name, "sha256": digest, **config}
            for folder in folders:
                write_build_info(folder, record)

    return BuildExtRecordingInfo


def extension_modules() -> tuple[list, dict]:
    """The extension to build (empty when skipped) and the ``cmdclass`` that builds it and records
    how (or why not: a pure-Python install)."""
    if _flag("VAPT_SKIP_EXTENSION"):
        print("vapt_kernels build: VAPT_SKIP_EXTENSION set, pure-Python install", flush=True)
        reason = (
            "VAPT_SKIP_EXTENSION was set when this package was built (a pure-Python install; the reference, "
            "torch and triton backends work without it); to build it, reinstall without VAPT_SKIP_EXTENSION"
        )
        return [], {"build_py": recording_build_py(reason)}

    cuda_home = find_cuda_home()
    force_cuda = _flag("FORCE_CUDA")
    if cuda_home is not None:
        os.environ["CUDA_HOME"] = str(cuda_home)  # before torch.utils.cpp_extension reads it
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as error:
        # pip's isolated build environment has no torch; building against another torch than the
        # one the package will run with would break the extension's ABI anyway.
        print(
            "vapt_kernels build: WARNING torch is not importable here, pure-Python install; to build the "
            "extension, install torch first and run pip with --no-build-isolation",
            flush=True,
        )
        reason = (
            f"torch was not importable when this package was built ({error}), as in pip's isolated build "
            "environment; to build it, install torch first, then reinstall with "
            "`pip install --no-build-isolation .`"
        )
        return [], {"build_py": recording_build_py(reason)}

    with_cuda = cuda_home is not None or force_cuda
    if force_cuda and cuda_home is None:
        raise RuntimeError(
            "FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to the toolkit root "
            "(the folder holding bin/nvcc and include/cuda_runtime.h)"
        )
    if with_cuda and torch.version.cuda is None:
        print(
            "vapt_kernels build: WARNING a CUDA toolkit is present but torch is a CPU build; "
            "building the CPU kernels only",
            flush=True,
        )
        with_cuda = False

    sources = ["csrc/vapt.cpp", *sorted(glob.glob("csrc/cpu/*.cpp", root_dir=ROOT))]
    include_dirs: list[str] = []
    # The C++ standard is BuildExtension's (the one torch's headers need). OpenMP: ATen's
    # at::parallel_for is a header template that runs serially unless the extension has it too.
    # -Wno-psabi: the CPU kernels' AVX2/AVX-512 vector types never cross a call boundary (see
    # csrc/cpu/simd.h), so GCC's notes that their calling convention depends on the ISA are noise.
    cxx_flags = ["-O3", "-fopenmp", "-Wno-psabi"]
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu", root_dir=ROOT))
        include_dirs += find_missing_cuda_headers(cuda_home)
        cxx_flags.append("-DVAPT_WITH_CUDA")
        nvcc_flags.append("-DVAPT_WITH_CUDA")

    config = {
        "cuda": with_cuda,
        "cuda_home": str(cuda_home) if with_cuda else None,
        "arch_list": os.environ["TORCH_CUDA_ARCH_LIST"] if with_cuda else None,
        "extra_include_dirs": list(include_dirs),  # a copy: the extension classes append torch's folders to it
        "max_jobs": os.environ.get("MAX_JOBS"),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "sources": sources,
    }
    print("vapt_kernels build configuration:", flush=True)
    for key, value in config.items():
        print(f"  {key:<20} {value}", flush=True)
    if cuda_home is None and not force_cuda:
        print(
            "vapt_kernels build: WARNING no CUDA toolkit found (set CUDA_HOME, or FORCE_CUDA=1 with one); "
            "building the CPU kernels only",
            flush=True,
        )

    kind = CUDAExtension if with_cuda else CppExtension
    extra = {"cxx": cxx_flags, "nvcc": nvcc_flags} if with_cuda else {"cxx": cxx_flags}
    module = kind(
        "vapt_kernels._C", sources, include_dirs=include_dirs, extra_compile_args=extra, extra_link_args=["-fopenmp"]
    )
    # BuildExtension compiles with ninja (in parallel, MAX_JOBS) when it is installed.
    return [module], {"build_ext": recording_build_ext(BuildExtension, config)}


if __name__ == "__main__":  # how pip (setuptools.build_meta) and `python setup.py` run it; tests import it
    ext_modules, cmdclass = extension_modules()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
