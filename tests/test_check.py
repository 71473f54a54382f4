"""``vapt-check``: the report names every backend with its availability, the self-test passes here,
a broken or crashing backend makes it exit 1 and says which, an unavailable one does not."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vapt_kernels import check, environment, ops
from vapt_kernels.ops import library, native

CONCRETE = [b for b in ops.BACKENDS if b != "auto"]


def run_check(capsys, *argv: str) -> tuple[int, str]:
    code = check.main(list(argv))
    return code, capsys.readouterr().out


def self_test_lines(out: str, backend: str) -> list[str]:
    return [line for line in out.splitlines() if line.split()[:1] == [backend] and (" ok    " in line or " FAIL  " in line)]


def test_report_lists_versions_backends_and_auto(capsys):
    code, out = run_check(capsys, "--quick")
    assert code == 0 and "self-test skipped" in out and " ok " not in out
    for name in ("python", "torch", "triton", "timm", "vapt_kernels", torch.__version__, "compiled extension"):
        assert name in out
    assert f"capability {torch.backends.cpu.get_cpu_capability()}" in out
    for backend in CONCRETE:
        reason = ops.unavailable_reason(backend, "cpu")
        expected = f"available ({', '.join(check._name(d) for d in library.input_dtypes(backend, 'cpu'))}"
        assert f"{backend:<10} cpu   " + (expected if reason is None else f"unavailable: {reason}") in out
    for op in ops.AUTO_PREFERENCE:
        auto_row = f"  {op:<18}cpu     " + "".join(f"{ops.auto_backend('cpu', dt, op=op):<11}" for dt in library.FLOATING)
        assert auto_row in out.splitlines()


def test_wrong_values_fail_and_say_where(capsys, monkeypatch):
    torch_kernels = library.KERNELS["torch"]

    def wrong_fwd(*args):
        h, g, *stats = torch_kernels.norm_and_project_fwd(*args)
        return (h, g * 1.1, *stats)

    monkeypatch.setitem(library.KERNELS, "torch", torch_kernels._replace(norm_and_project_fwd=wrong_fwd))
    monkeypatch.setattr(check, "SELF_TESTED", ("torch",))
    code, out = run_check(capsys, "--device", "cpu")
    assert code == 1
    lines = self_test_lines(out, "torch")
    failed = [line for line in lines if "FAIL" in line]
    assert len(failed) == 4 and all("norm_and_project" in line and "g[0]" in line for line in failed), lines
    assert all(" ok " in line for line in lines if "prefix_attention" in line)
    assert "FAILED: torch on cpu" in out and "* failed its self-test above" in out


def test_unwritten_output_fails(capsys, monkeypatch):
    """Fresh allocations are NaN during the self-test: a kernel that leaves its output unwritten fails."""
    torch_kernels = library.KERNELS["torch"]

    def unwritten_fwd(*args):
        h, g, *stats = torch_kernels.norm_and_project_fwd(*args)
        return (torch.empty_like(h), g, *stats)

    monkeypatch.setitem(library.KERNELS, "torch", torch_kernels._replace(norm_and_project_fwd=unwritten_fwd))
    monkeypatch.setattr(check, "SELF_TESTED", ("torch",))
    code, out = run_check(capsys, "--device", "cpu")
    assert code == 1 and "h[0] nan" in out


@pytest.mark.skipif(ops.unavailable_reason("native", "cpu") is not None, reason="no native CPU kernels here")
def test_crashing_backend_fails_and_the_others_still_run(capsys, monkeypatch):
    def crash(*args):
        raise RuntimeError("boom from a broken kernel")

    kernels = library.KERNELS["native"]._replace(prefix_attention_bwd=crash)
    monkeypatch.setitem(library.KERNELS, "native", kernels)
    monkeypatch.setattr(check, "SELF_TESTED", ("torch", "native"))
    code, out = run_check(capsys, "--device", "cpu")
    assert code == 1
    native_lines = self_test_lines(out, "native")
    assert all(
        ("FAIL  RuntimeError: boom from a broken kernel" in line) == ("prefix_attention" in line) for line in native_lines
    ), native_lines
    assert all(" ok " in line for line in self_test_lines(out, "torch"))
    assert "FAILED: native on cpu" in out


def test_unavailable_backend_is_reported_not_failed(capsys, monkeypatch):
    monkeypatch.setattr(native, "LOAD_ERROR", "pretend the extension failed to load")
    monkeypatch.setattr(check, "SELF_TESTED", ("torch", "native"))
    code, out = run_check(capsys, "--device", "cpu")
    assert code == 0, out
    assert "native     cpu   unavailable: pretend the extension failed to load" in out
    assert "load error: pretend the extension failed to load" in out
    assert self_test_lines(out, "native") == [] and len(self_test_lines(out, "torch")) == 8
    assert "  cpu     torch      torch      torch      torch" in out


def extension_report(capsys, monkeypatch, tmp_path, record) -> str:
    """The report's ``compiled extension`` section with ``record`` as the build record (None: no file)."""
    path = tmp_path / "_build_info.json"
    if record is not None:
        path.write_text(json.dumps(record))
    monkeypatch.setattr(native, "BUILD_INFO", path)
    check.print_report([torch.device("cpu")])
    out = capsys.readouterr().out
    return out[out.index("compiled extension") : out.index("\ndevices")]


def test_report_says_why_the_extension_was_not_built(capsys, monkeypatch, tmp_path):
    reason = "VAPT_SKIP_EXTENSION was set when this package was built"
    out = extension_report(capsys, monkeypatch, tmp_path, {"built": False, "reason": reason})
    assert f"  not built: {reason}\n" in out and "no build information" not in out
    # An extension that loads nevertheless was left by an earlier build (editable or in-place installs).
    assert ("WARNING the extension loaded above is not the recorded build" in out) == (native.LOAD_ERROR is None)


def test_report_without_a_record_says_what_to_do(capsys, monkeypatch, tmp_path):
    out = extension_report(capsys, monkeypatch, tmp_path, None)
    assert f"  no build information: {tmp_path / '_build_info.json'} is missing" in out
    assert "`pip install --no-build-isolation .`" in out


@pytest.mark.skipif(native.LOAD_ERROR is not None, reason="the extension does not load here")
def test_report_checks_the_record_against_the_loaded_binary(capsys, monkeypatch, tmp_path):
    binary = Path(importlib.util.find_spec("vapt_kernels._C").origin)
    digest = hashlib.sha256(binary.read_bytes()).hexdigest()
    record = {"built": True, "binary": binary.name, "sha256": digest, "cuda": False, "sources": ["a.cpp", "b.cpp"]}
    out = extension_report(capsys, monkeypatch, tmp_path, record)
    assert f"  binary             {binary.name}\n  cuda               False\n  sources            a.cpp, b.cpp\n" in out
    assert "WARNING" not in out and digest not in out and "  built " not in out
    out = extension_report(capsys, monkeypatch, tmp_path, dict(record, sha256="0" * 64))
    assert "WARNING the extension loaded above is not the recorded build: its SHA-256 is not the recorded one" in out


def test_unknown_device_is_refused():
    with pytest.raises(SystemExit):
        check.parse_args(["--device", "cuda:99"])


def test_command_passes_for_every_available_backend():
    """The real command, in a subprocess: every available backend passes on every device here (on
    CPU, Triton through its interpreter: ``conftest`` switches it on when there is no GPU)."""
    cmd = [sys.executable, "-m", "vapt_kernels.check"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "all available backends passed" in out and "FAIL" not in out and "auto picks" in out
    for backend in check.SELF_TESTED:
        expected = sum(
            2 * len(library.input_dtypes(backend, device.type))
            for device in environment.devices()
            if ops.unavailable_reason(backend, device.type) is None
        )
        lines = self_test_lines(out, backend)
        assert len(lines) == expected and all(" ok    max rel err " in line for line in lines), lines
