"""The build record ``vapt_kernels/_build_info.json`` travels with the extension: setup.py's
``build_ext`` writes it next to the built extension (in the build folder, which becomes the wheel,
and in the source tree too for ``--inplace`` and editable installs) once the build finished, its
``build_py`` records why a pure-Python install has no extension, and nothing is written into the
source tree when setup.py is configured. A one-function C++ file stands in for the extension, built
by torch's ``BuildExtension`` as the real one is, in a scratch project under ``tmp_path``."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from setuptools import Distribution, Extension

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"cuda": False, "cuda_home": None, "arch_list": None, "max_jobs": "2", "torch": "x", "sources": ["ok.cpp"]}


@pytest.fixture(scope="module")
def setup_py():
    """setup.py as a module: importing it configures and builds nothing (only running it does)."""
    spec = importlib.util.spec_from_file_location("vapt_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A scratch project: the package in ``src/vapt_kernels``, the stand-in extension source ``ok.cpp``."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "src" / "vapt_kernels").mkdir(parents=True)
    (tmp_path / "src" / "vapt_kernels" / "__init__.py").write_text("")
    (tmp_path / "ok.cpp").write_text("int vapt_build_info_test() { return 1; }\n")
    (tmp_path / "broken.cpp").write_text("int vapt_build_info_test() { return }\n")
    return tmp_path


def distribution(setup_py, cmdclass: dict, source: str = "ok.cpp") -> Distribution:
    return Distribution(
        {
            "name": "vapt_kernels",
            "script_name": "setup.py",
            "packages": [setup_py.PACKAGE],
            "package_dir": {setup_py.PACKAGE: "src/vapt_kernels"},
            "ext_modules": [Extension(setup_py.EXTENSION, [source], language="c++")],
            "cmdclass": cmdclass,
        }
    )


def build_ext(setup_py, config: dict = CONFIG, source: str = "ok.cpp", inplace: bool = False, ninja: bool = True):
    from torch.utils.cpp_extension import BuildExtension

    base = BuildExtension.with_options(use_ninja=ninja)
    dist = distribution(setup_py, {"build_ext": setup_py.recording_build_ext(base, config)}, source)
    cmd = dist.get_command_obj("build_ext")
    cmd.build_lib, cmd.build_temp, cmd.inplace = "lib", "temp", inplace
    dist.run_command("build_ext")


def record(folder: Path) -> dict:
    return json.loads((folder / "_build_info.json").read_text())


def binary(folder: Path) -> Path:
    (path,) = folder.glob("_C*.so")
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_record_lands_next_to_the_extension_in_the_build_folder(setup_py, project):
    """What ``pip install .`` packs into the wheel: the build folder's package, record included."""
    build_ext(setup_py)
    built = project / "lib" / "vapt_kernels"
    so = binary(built)
    assert record(built) == {"built": True, "binary": so.name, "sha256": sha256(so), **CONFIG}
    assert not (project / "src" / "vapt_kernels" / "_build_info.json").exists()


def test_inplace_build_records_in_the_source_tree_too(setup_py, project):
    """``python setup.py build_ext --inplace`` and editable installs copy the extension into the source tree."""
    build_ext(setup_py, inplace=True)
    source = project / "src" / "vapt_kernels"
    assert record(source) == record(project / "lib" / "vapt_kernels")
    assert record(source)["sha256"] == sha256(binary(source))


def test_another_configuration_rebuilds_the_binary(setup_py, project):
    """Without ninja (``pip install --no-build-isolation`` does not install it), setuptools keeps a
    binary newer than its sources: only when the configuration is the recorded one, else the binary
    would be of another torch, say, and the record would describe a build that did not happen. (With
    ninja, ``BuildExtension`` always hands the build to ninja, which tracks commands and headers.)"""
    build_ext(setup_py, ninja=False)
    so = binary(project / "lib" / "vapt_kernels")
    so.write_bytes(b"stands for the binary of the first build")
    build_ext(setup_py, config=dict(CONFIG, max_jobs="16"), ninja=False)  # not compiled in: kept
    assert so.read_bytes() == b"stands for the binary of the first build"
    assert record(so.parent)["sha256"] == sha256(so) and record(so.parent)["max_jobs"] == "16"
    build_ext(setup_py, config=dict(CONFIG, torch="y"), ninja=False)
    assert so.read_bytes() != b"stands for the binary of the first build"
    assert record(so.parent) == {"built": True, "binary": so.name, "sha256": sha256(so), **CONFIG, "torch": "y"}


def test_failed_build_does_not_claim_a_build(setup_py, project):
    build_ext(setup_py, inplace=True)
    with pytest.raises(Exception):
        build_ext(setup_py, source="broken.cpp", inplace=True)
    for folder in (project / "lib" / "vapt_kernels", project / "src" / "vapt_kernels"):
        info = record(folder)
        assert info["built"] is False and "the last build of the extension failed" in info["reason"], info


@pytest.mark.parametrize("editable", [False, True])
def test_pure_python_install_records_why(setup_py, project, editable):
    """``build_py`` records the reason in the build folder, or in the source tree for an editable
    install (where it copies nothing)."""
    dist = distribution(setup_py, {"build_py": setup_py.recording_build_py("the reason")})
    cmd = dist.get_command_obj("build_py")
    cmd.build_lib, cmd.editable_mode = "lib", editable
    dist.run_command("build_py")
    folder = project / ("src" if editable else "lib") / "vapt_kernels"
    assert record(folder) == {"built": False, "reason": "the reason"}
    assert (project / "lib" / "vapt_kernels" / "__init__.py").exists() != editable


def _source_tree_record() -> tuple:
    path = ROOT / "vapt_kernels" / "_build_info.json"
    return (path.stat().st_mtime_ns, path.read_bytes()) if path.exists() else None


@pytest.mark.parametrize("case", ["built", "VAPT_SKIP_EXTENSION", "no torch"])
def test_configuring_writes_nothing_and_records_the_reason(setup_py, project, monkeypatch, case):
    for name in ("CUDA_HOME", "TORCH_CUDA_ARCH_LIST", "VAPT_SKIP_EXTENSION"):
        monkeypatch.delenv(name, raising=False)  # restored afterwards: extension_modules sets some
    if case == "VAPT_SKIP_EXTENSION":
        monkeypatch.setenv("VAPT_SKIP_EXTENSION", "1")
    if case == "no torch":
        monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    before = _source_tree_record()
    modules, cmdclass = setup_py.extension_modules()
    assert _source_tree_record() == before
    if case == "built":
        assert [m.name for m in modules] == [setup_py.EXTENSION] and list(cmdclass) == ["build_ext"]
        return
    assert modules == [] and list(cmdclass) == ["build_py"]
    dist = distribution(setup_py, cmdclass)
    dist.get_command_obj("build_py").build_lib = "lib"
    dist.run_command("build_py")
    reason = record(project / "lib" / "vapt_kernels")["reason"]
    assert ("VAPT_SKIP_EXTENSION was set" if case == "VAPT_SKIP_EXTENSION" else "torch was not importable") in reason
