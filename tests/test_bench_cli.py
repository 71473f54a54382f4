"""The benchmark on a tiny model: the table, a CSV row per provider and mode with ratios to the
floor, the n/a reasons, the JSON summary, the memory probe; nothing written without ``--out``; the
rounds of the interleaved timing; the CSV across versions; bad arguments refused by argparse; the
VAPT providers compute one model."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from tqdm import tqdm

from vapt_kernels import ops
from vapt_kernels.bench import cli, harness

TINY = ["--device", "cpu", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--batch", "2", "--warmup", "1"]
PROVIDERS = ("floor", "vapt-official", "vapt-torch", "vapt-native", "vapt-triton")


@pytest.fixture
def one_thread(monkeypatch):
    """One torch thread here and in the subprocesses: on a busy 2-core machine, steps of a tiny
    model with two threads can take a hundred times as long while the threads wait for each other."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_results_go_to_out(tmp_path, one_thread):
    out_dir = tmp_path / "results"
    cmd = [sys.executable, "-m", "vapt_kernels.bench", *TINY, "--steps", "3", "--no-memory",
           "--providers", *PROVIDERS, "--out", str(out_dir)]
    # Without the interpreter the Triton backend cannot run on CPU: its rows say why.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True, env=env, cwd=tmp_path).stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]
    assert sorted(p.name for p in out_dir.iterdir()) == ["results.csv", "summary.json"]
    assert f"results appended to {out_dir / 'results.csv'}" in out and str(out_dir / "summary.json") in out

    rows = list(csv.DictReader((out_dir / "results.csv").open()))
    assert [(r["mode"], r["provider"]) for r in rows] == [(m, p) for m in harness.MODES for p in PROVIDERS]
    runnable = {"floor", "vapt-official", "vapt-torch"} | ({"vapt-native"} if ops.unavailable_reason("native", "cpu") is None else set())
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["provider"] for r in ok} == runnable and len(ok) == 2 * len(runnable)
    for r in rows:
        if r["provider"] == "vapt-triton":
            assert r["status"] == "n/a" and "TRITON_INTERPRET=1" in r["reason"] and not r["median_ms"]
    floor = {r["mode"]: float(r["median_ms"]) for r in ok if r["provider"] == "floor"}
    for r in ok:
        median = float(r["median_ms"])
        assert 0 < float(r["p20_ms"]) <= median <= float(r["p80_ms"])
        assert int(r["samples"]) >= 2  # one per timing round at least
        assert float(r["img_per_s"]) == pytest.approx(2e3 / median, rel=1e-2)
        assert float(r["ratio_to_floor"]) == pytest.approx(median / floor[r["mode"]], rel=1e-2)
        assert r["device"] and r["torch"] == torch.__version__ and r["timing"] == "torch.utils.benchmark"
        assert r["peak_mem_mb"] == "" and r["model"] == "vit_tiny_patch16_224" and r["steps"] == "3"
    assert {float(r["ratio_to_floor"]) for r in ok if r["provider"] == "floor"} == {1.0}

    table = out.splitlines()
    assert table[1].split() == ["mode", "provider", "median", "ms", "p20-p80", "ms", "img/s", "x", "floor", "peak", "MiB"]
    assert sum(line.split()[:2] in (["train", "floor"], ["infer", "floor"]) and "1.000" in line for line in table) == 2
    assert sum(line.startswith(f"{m}  vapt-triton") and " n/a (" in line for line in table for m in harness.MODES) == 2

    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["sweep"] is None and summary["versions"]["torch"] == torch.__version__
    (run,) = summary["runs"]
    assert run["config"]["batch"] == 2 and run["config"]["providers"] == list(PROVIDERS)
    assert [(r["mode"], r["provider"], r["status"]) for r in run["rows"]] == [(r["mode"], r["provider"], r["status"]) for r in rows]


def test_without_out_nothing_is_written(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.chdir(tmp_path)
    assert cli.main([*TINY, "--steps", "1", "--providers", "floor", "vapt-torch", "--modes", "infer"]) == 0
    out = capsys.readouterr().out
    assert list(tmp_path.iterdir()) == [] and "results.csv" not in out
    lines = [line.split() for line in out.splitlines()]
    measured = [line for line in lines if line[:1] == ["infer"]]
    assert [line[1] for line in measured] == ["floor", "vapt-torch"]
    # the last column is the peak RSS growth measured in a subprocess
    assert all(len(line) == 7 and float(line[-1]) > 0 for line in measured)


def test_rounds_rotate_and_pool_the_timings(monkeypatch):
    """Warm-up rounds, a round of one timed step, then rounds of up to ROUND_STEPS; the order
    rotates every round; a provider that fails is reported and leaves the rotation. do_bench is
    faked with Triton 3.6's signature: one step takes 1 ms."""
    testing = pytest.importorskip("triton.testing")
    calls = []

    def do_bench(fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, return_mode="mean"):
        assert warmup == 0 and quantiles is None and return_mode == "all"
        for _ in range(max(1, int(rep / 1.0))):
            fn()
        return [1.0] * max(1, int(rep / 1.0))

    def step(name):
        def run():
            calls.append(name)
            if name == "c" and len([c for c in calls if c == "c"]) == 3:
                raise RuntimeError("out of memory")
        return run

    monkeypatch.setattr(testing, "do_bench", do_bench)
    monkeypatch.setattr(harness, "timing_method", lambda device: "triton.testing.do_bench")
    cfg = harness.BenchConfig.for_device("cuda", steps=23, warmup=1)
    assert harness.round_plan(cfg) == [0, 1, 10, 10, 2]
    results = {name: harness.Result(name, "train") for name in "abc"}
    harness.time_interleaved({name: step(name) for name in "abc"}, results, cfg, tqdm(disable=True))
    rounds = ["abc", "bca", "c" + "a" * 10 + "b" * 10, "b" * 10 + "a" * 10, "aabb"]  # c fails on its third step
    assert "".join(calls) == "".join(rounds)
    assert [len(results[name].times) for name in "ab"] == [23, 23] and results["a"].quantile_ms(0.5) == 1.0
    assert results["c"].status == "error" and results["c"].reason == "RuntimeError: out of memory"


def test_csv_keeps_appending_and_takes_in_older_files(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("timestamp,provider,median_ms\n2020-01-01T00:00:00,floor,1.0\n")
    row = {name: "" for name in harness.CSV_FIELDS} | {"timestamp": "t", "provider": "vapt-torch", "samples": 3}
    cli.append_csv(path, [row])
    cli.append_csv(path, [row])
    rows = list(csv.DictReader(path.open()))
    old = ["timestamp", "provider", "median_ms"]
    assert list(rows[0]) == old + [name for name in harness.CSV_FIELDS if name not in old]
    assert [(r["provider"], r["median_ms"], r["samples"]) for r in rows] == [("floor", "1.0", ""), ("vapt-torch", "", "3"), ("vapt-torch", "", "3")]


@pytest.mark.parametrize(
    "argv",
    [
        ["--providers", "floor,vapt-torch"],
        ["--providers", "vapt-fast"],
        ["--providers"],
        ["--modes", "training"],
        ["--dtype", "fp8"],
        ["--batch", "0"],
        ["--steps", "two"],
        ["--warmup", "-1"],
        ["--sweep", "heads"],
        ["--device", "tpu"],
        ["--plot"],
    ],
)
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(argv)
    assert exit_info.value.code == 2 and "vapt-bench: error:" in capsys.readouterr().err


def test_providers_compute_one_model(one_thread):
    """All VAPT providers (the official formulation too) are the same model: same outputs."""
    cfg = harness.BenchConfig.for_device("cpu", model="vit_tiny_patch16_224", img_size=32, batch=2,
                                         providers=("vapt-official", "vapt-torch", "vapt-native"))
    base = harness.build_backbone(cfg)
    models = harness.build_providers(cfg, base)
    x, _ = harness.inputs(cfg, base)
    outputs = {}
    for name, model in models.items():
        if isinstance(model, harness.Unavailable):
            continue
        torch.manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:  # the prompts start at zero: make them count
                    p.normal_()
            outputs[name] = model.eval()(x)
    assert {"vapt-official", "vapt-torch"} <= set(outputs)
    for name, out in outputs.items():
        torch.testing.assert_close(out, outputs["vapt-official"], rtol=1e-4, atol=1e-4, msg=name)


def test_tasks_add_the_mixed_and_loop_providers(tmp_path, one_thread):
    out_dir = tmp_path / "results"
    cmd = [sys.executable, "-m", "vapt_kernels.bench", *TINY, "--steps", "2", "--modes", "infer", "--tasks", "3",
           "--providers", "floor", "vapt-torch", "--out", str(out_dir)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True, cwd=tmp_path).stdout
    rows = list(csv.DictReader((out_dir / "results.csv").open()))
    expected = ["floor", "vapt-torch", "vapt-torch-mixed", "vapt-torch-loop"]
    assert [r["provider"] for r in rows] == expected
    assert all(r["status"] == "ok" and r["tasks"] == "3" and float(r["peak_mem_mb"]) >= 0 for r in rows)
    assert "| 3 tasks |" in out
    assert re.search(r"infer vapt-torch-mixed: \d\.\d{3}x vapt-torch loop \d+\.\d\dx slower", out), out


def test_mixed_and_loop_providers_compute_the_single_task_model():
    """With every task holding the single-task provider's parameters, the mixed batch and the loop
    over tasks give its logits, row for row."""
    cfg = harness.BenchConfig.for_device("cpu", model="vit_tiny_patch16_224", img_size=32, batch=5, tasks=3,
                                         providers=("vapt-torch",))
    base = harness.build_backbone(cfg)
    models = harness.build_providers(cfg, base)
    assert list(models) == ["vapt-torch", "vapt-torch-mixed", "vapt-torch-loop"]
    x, _ = harness.inputs(cfg, base)
    with torch.no_grad():
        single = models["vapt-torch"].eval()(x)
        for name in ("vapt-torch-mixed", "vapt-torch-loop"):
            torch.testing.assert_close(models[name].eval()(x), single, rtol=1e-5, atol=1e-5, msg=name)
