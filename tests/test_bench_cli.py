"""Smoke test of the benchmark CLI: one step of a tiny model writes a table, a CSV row per
provider and mode, and a JSON summary."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from vapt_kernels import bench, ops

PROVIDERS = ("floor", "vapt-official", "vapt-torch", "vapt-native", "vapt-triton")


def test_vapt_bench_one_step(tmp_path):
    cmd = [
        sys.executable, "-m", "vapt_kernels.bench", "--model", "vit_tiny_patch16_224", "--img-size", "32",
        "--batch", "2", "--steps", "1", "--warmup", "1", "--providers", ",".join(PROVIDERS), "--out", str(tmp_path),
    ]
    # Without the interpreter the Triton backend cannot run on CPU: its rows say why.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True, env=env).stdout
    assert "x floor" in out and "vapt-torch" in out
    assert "infer  vapt-triton" in out and "n/a (" in out and "TRITON_INTERPRET=1" in out
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [(r["mode"], r["provider"]) for r in rows] == [(m, p) for m in ("train", "infer") for p in PROVIDERS]
    runnable = {"floor", "vapt-official", "vapt-torch"} | ({"vapt-native"} if ops.unavailable_reason("native", "cpu") is None else set())
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["provider"] for r in ok} == runnable and len(ok) == 2 * len(runnable)
    assert all(float(r["median_ms"]) > 0 and float(r["img_per_s"]) > 0 for r in ok)
    assert all(float(r["ratio_to_floor"]) == 1.0 for r in ok if r["provider"] == "floor")
    assert all(r["peak_mem_mb"] != "" and r["torch"] and r["device"] for r in ok)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["batch"] == 2 and len(summary["rows"]) == 10


def test_bad_arguments_are_explained():
    with pytest.raises(SystemExit):
        bench.parse_args(["--providers", "floor,vapt-fast"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--modes", "training"])
