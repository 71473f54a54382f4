"""``benchmarks/gpu_check.sh --dry``: the GPU check's every step, run on the CPU at tiny sizes,
completes within its limits and leaves in ``$OUT`` what a lent machine can return (at most 8
files, 16 MiB each, 64 MiB together, at most 2 folders down, names of letters, digits, ``.``,
``_`` and ``-``), the key table printed last."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = ["build", "check", "op tests", "more tests", "op bench", "model bench", "tasks triton", "tasks native"]
TOTAL_LIMIT = 600


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "TOTAL_LIMIT": str(TOTAL_LIMIT)}
    env.pop("TRITON_INTERPRET", None)  # the script's pytest runs set it themselves (tests/conftest.py)
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=TOTAL_LIMIT + 60
    )
    return proc, out


def step_table(summary: str) -> dict[str, tuple[str, int, int]]:
    """Step name -> (status, seconds, limit), from the key table's first lines."""
    steps = {}
    for line in summary.splitlines():
        for name in STEPS:
            match = re.match(rf"{re.escape(name)}\s+(.+?)\s+(\d+)\s+(\d+)$", line)
            if match:
                steps[name] = (match[1], int(match[2]), int(match[3]))
    return steps


def test_every_step_completes_within_its_limit(dry_run):
    proc, out = dry_run
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    steps = step_table(summary)
    assert list(steps) == STEPS, summary
    for name, (status, seconds, limit) in steps.items():
        assert status == "ok" and seconds <= limit, (name, status, seconds, limit)
    total = int(re.search(r"^total (\d+) s of (\d+)$", summary, re.M)[1])
    assert total <= TOTAL_LIMIT


def test_out_holds_what_a_lent_machine_returns(dry_run):
    _, out = dry_run
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    assert {p.name for p in files} == {
        "summary.txt", "logs.tar.gz", "ops.json", "model.csv", "model.json", "tasks.csv"
    } | ({"model.png"} if any(p.name == "model.png" for p in files) else set())
    assert sum(p.stat().st_size for p in files) <= 64 * 2**20
    for p in files:
        rel = p.relative_to(out)
        assert p.stat().st_size <= 16 * 2**20 and len(rel.parts) <= 3, rel
        assert all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in rel.parts), rel
    with tarfile.open(out / "logs.tar.gz") as tar:
        logs = {Path(name).name for name in tar.getnames()}
    assert {"build.log", "check.log", "op_tests.log", "more_tests.log", "op_bench.log", "model_bench.log",
            "tasks_triton.log", "tasks_native.log"} <= logs


def test_tables_are_printed_the_key_table_last(dry_run):
    proc, out = dry_run
    summary = (out / "summary.txt").read_text()
    assert proc.stdout.rstrip().endswith(summary.rstrip())
    for section in ("-- check", "-- tests", "-- op benchmark", "-- model benchmark", "-- many tasks"):
        assert section in summary
    assert re.search(r"^auto picks", summary, re.M), "vapt-check's table of auto's picks"
    assert re.search(r"^\d+ passed", summary, re.M) or " passed" in summary, "pytest's verdicts"
    assert re.search(r"^norm_and_project \w+: [\d.]+ ms", summary, re.M), "the op benchmark's summary"
    assert re.search(r"^train\s+floor\s", summary, re.M) and re.search(r"^infer\s+vapt-native\s", summary, re.M)
    assert re.search(r"^train vapt-native-mixed: [\d.]+x vapt-native", summary, re.M), "the many-task ratios"
