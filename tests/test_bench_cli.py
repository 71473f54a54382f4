"""The benchmark on a tiny model: the table, a CSV row per provider and mode with ratios to the
floor, the n/a reasons (once per reason), the JSON summary, the memory probe, the charts drawn by
default; nothing written without ``--out``; the rounds of the interleaved timing; bad arguments
refused by argparse; the VAPT providers compute one model. The chart tests time nothing
(:func:`fake_measure`) or read CSVs written here, as do those of the results files: append-only
across versions and torn lines, atomic writes, and arguments that conflict refused before anything
is written."""

from __future__ import annotations

import csv
import errno
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tqdm import tqdm

from vapt_kernels import ops
from vapt_kernels.bench import cli, harness, plot

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
    # The charts are drawn by default (test_missing_matplotlib_is_one_line: without matplotlib).
    charts = ["throughput.png"] if importlib.util.find_spec("matplotlib") else []
    assert sorted(p.name for p in out_dir.iterdir()) == ["results.csv", "summary.json"] + charts
    assert f"results appended to {out_dir / 'results.csv'}" in out and str(out_dir / "summary.json") in out
    assert [line for line in out.splitlines() if line.startswith("chart written to")] == [
        f"chart written to {out_dir / name}" for name in charts
    ]

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
    (unavailable,) = [line for line in table if "vapt-triton" in line]
    assert unavailable.startswith("n/a  vapt-triton (train, infer): ") and "TRITON_INTERPRET=1" in unavailable

    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["sweep"] is None and summary["versions"]["torch"] == torch.__version__
    (run,) = summary["runs"]
    assert run["config"]["batch"] == 2 and run["config"]["providers"] == list(PROVIDERS)
    assert [(r["mode"], r["provider"], r["status"]) for r in run["rows"]] == [(r["mode"], r["provider"], r["status"]) for r in rows]


def test_without_out_nothing_is_written(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.chdir(tmp_path)
    assert cli.main([*TINY, "--steps", "1", "--providers", "floor", "vapt-torch", "--modes", "infer"]) == 0
    out = capsys.readouterr().out
    assert list(tmp_path.iterdir()) == [] and "results.csv" not in out and "chart" not in out
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
    cmd = [sys.executable, "-m", "vapt_kernels.bench", *TINY, "--batch", "3", "--steps", "2", "--modes", "infer",
           "--tasks", "3", "--providers", "floor", "vapt-torch", "--no-plot", "--out", str(out_dir)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True, cwd=tmp_path).stdout
    rows = list(csv.DictReader((out_dir / "results.csv").open()))
    expected = ["floor", "vapt-torch", "vapt-torch-mixed", "vapt-torch-loop"]
    assert [r["provider"] for r in rows] == expected
    assert all(r["status"] == "ok" and r["tasks"] == "3" and float(r["peak_mem_mb"]) >= 0 for r in rows)
    assert all(r["registered"] == "3" for r in rows)
    assert "| 3 tasks |" in out
    assert re.search(r"infer vapt-torch-mixed: \d\.\d{3}x vapt-torch loop \d+\.\d\dx slower", out), out


def test_registered_tasks_sit_idle_in_the_mixed_providers_model():
    """--registered R: the mixed provider's model holds R tasks, the batch the first K; the loop's
    models one task each."""
    cfg = harness.BenchConfig.for_device("cpu", model="vit_tiny_patch16_224", img_size=32, batch=3, tasks=3,
                                         registered=7, providers=("vapt-torch",))
    models = harness.build_providers(cfg, harness.build_backbone(cfg))
    mixed, loop = models["vapt-torch-mixed"], models["vapt-torch-loop"]
    assert len(mixed.models[0].tasks) == 7 and [len(m.tasks) for m in loop.models] == [1, 1, 1]
    assert mixed.task.tolist() == [0, 1, 2]


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


# --------------------------------------------------------------------------------------------
# Charts and the n/a lines, without timing anything
# --------------------------------------------------------------------------------------------

# Why fake_measure reports a backend's providers n/a.
FAKE_REASONS = {"triton": "no Triton here", "native": "extension not built"}
FAKE = ["--device", "cpu", "--model", "vit_tiny_patch16_224", "--no-memory", "--tasks", "2",
        "--providers", "floor", "vapt-torch", "vapt-triton", "vapt-native"]


def fake_measure(cfg: harness.BenchConfig, progress: bool = True) -> list[harness.Result]:
    """Stands in for :func:`harness.measure`: five made-up step times per provider and mode, the
    backends of :data:`FAKE_REASONS` n/a."""
    results = []
    for mode in cfg.modes:
        for k, name in enumerate(harness.provider_names(cfg)):
            result = harness.Result(name, mode)
            reason = FAKE_REASONS.get(harness.PROVIDER_TABLE[name].backend)
            if reason:
                result.status, result.reason = "n/a", reason
            else:
                result.times = [(1 + k / 10) * (1 + i / 20) * cfg.batch / 1e3 for i in range(5)]
            results.append(result)
    return results


@pytest.fixture
def fake_bench(monkeypatch, tmp_path):
    monkeypatch.setattr(harness, "measure", fake_measure)
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize(
    "extra, charts",
    [
        ([], ["throughput.png"]),
        (["--plot"], ["throughput.png"]),
        (["--no-plot"], []),
        (["--sweep", "prompts"], ["sweep_prompts.png", "throughput.png"]),
    ],
)
def test_charts_are_drawn_by_default(extra, charts, tmp_path, capsys, fake_bench):
    pytest.importorskip("matplotlib")
    out_dir = tmp_path / "results"
    assert cli.main([*FAKE, "--out", str(out_dir), *extra]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(["results.csv", "summary.json"] + charts)
    assert sorted(line for line in out.splitlines() if line.startswith("chart")) == [
        f"chart written to {out_dir / name}" for name in charts
    ]
    for name in charts:
        assert (out_dir / name).read_bytes().startswith(b"\x89PNG")


def test_missing_matplotlib_is_one_line(tmp_path, capsys, monkeypatch, fake_bench):
    """Without matplotlib the run writes its results, says in one line how to get the charts and
    succeeds; ``python -m vapt_kernels.bench.plot`` says the same and fails."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    out_dir = tmp_path / "results"
    assert cli.main([*FAKE, "--out", str(out_dir)]) == 0
    captured = capsys.readouterr()
    assert sorted(p.name for p in out_dir.iterdir()) == ["results.csv", "summary.json"]
    assert "chart" not in captured.out
    (line,) = captured.err.splitlines()
    assert line.startswith("charts not drawn: matplotlib cannot be imported")
    assert "pip install 'vapt_kernels[plot]'" in line
    assert f"python -m vapt_kernels.bench.plot {out_dir / 'results.csv'} --run " in line
    assert plot.main([str(out_dir / "results.csv")]) == 1
    assert "pip install 'vapt_kernels[plot]'" in capsys.readouterr().err


def test_nothing_measured_draws_nothing(tmp_path, capsys, fake_bench):
    pytest.importorskip("matplotlib")
    out_dir = tmp_path / "results"
    assert cli.main([*FAKE, "--providers", "vapt-triton", "--out", str(out_dir)]) == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["results.csv", "summary.json"]
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("charts not drawn: ") and "no measured rows" in line


def test_unavailable_reasons_are_printed_once(monkeypatch):
    """One line per reason, naming the providers and modes; an error stays per provider and mode."""
    cfg = harness.BenchConfig.for_device("cpu", providers=("floor", "vapt-torch", "vapt-triton", "vapt-native"), tasks=2)
    results = fake_measure(cfg)
    failed = next(r for r in results if (r.mode, r.provider) == ("train", "vapt-torch-loop"))
    failed.status, failed.reason, failed.times = "error", "RuntimeError: out of memory", []
    table = cli.format_table(harness.result_rows(cfg, results, harness.row_environment("cpu"))).splitlines()
    assert [line for line in table if line.startswith("n/a")] == [
        "n/a  vapt-triton, vapt-triton-mixed, vapt-triton-loop (train, infer): no Triton here",
        "n/a  vapt-native, vapt-native-mixed, vapt-native-loop (train, infer): extension not built",
    ]
    (error,) = [line for line in table if "error" in line]
    assert error.split() == ["train", "vapt-torch-loop", "error", "(RuntimeError:", "out", "of", "memory)"]
    measured = [line.split()[:2] for line in table[2:] if line.split()[0] in harness.MODES and "error" not in line]
    assert measured == [[m, p] for m in harness.MODES for p in ("floor", "vapt-torch", "vapt-torch-mixed", "vapt-torch-loop")
                        if (m, p) != ("train", "vapt-torch-loop")]


def test_spread_maps_the_time_quantiles():
    """images/s falls with the step time, the ratio to the floor rises with it."""
    row = {"batch": "8", "median_ms": "100", "p20_ms": "80", "p80_ms": "125", "img_per_s": "80", "ratio_to_floor": "2.0"}
    assert plot.spread(row, "img_per_s") == pytest.approx((64, 80, 100))
    assert plot.spread(row, "ratio_to_floor") == pytest.approx((1.6, 2.0, 2.5))
    assert plot.spread(row | {"ratio_to_floor": ""}, "ratio_to_floor") is None
    assert plot.spread(row | {"p20_ms": "", "p80_ms": ""}, "img_per_s") == (80, 80, 80)


# Fifteen providers: --tasks K and --compile with every provider picked.
MANY = [*harness.PROVIDERS, *(f"vapt-{b}-{k}" for b in harness.FAST_BACKENDS for k in harness.MULTI_TASK_KINDS),
        "floor+compile", "vapt-official+compile", "vapt-native+compile"]


def write_results(path, timestamp: str, points: list[tuple[int, int]], sweep: str = "") -> None:
    """Append a made-up run of the :data:`MANY` providers at ``(batch, prompts)`` points to the CSV."""
    rows = []
    for batch, prompts in points:
        for mode in harness.MODES:
            for k, provider in enumerate(MANY):
                median = 10.0 * batch * (1 + k / 20)
                row = {name: "" for name in harness.CSV_FIELDS} | {
                    "timestamp": timestamp, "model": "vit_tiny_patch16_224", "batch": batch, "prompts": prompts,
                    "tasks": 3, "dtype": "fp32", "device": "cpu", "mode": mode, "provider": provider, "sweep": sweep,
                    "status": "ok", "median_ms": median, "p20_ms": 0.9 * median, "p80_ms": 1.2 * median,
                    "img_per_s": 1e3 * batch / median, "ratio_to_floor": 1 + k / 20,
                }
                if "triton" in provider:
                    row |= {"status": "n/a", "reason": "no Triton here", "median_ms": "", "p20_ms": "", "p80_ms": "",
                            "img_per_s": "", "ratio_to_floor": ""}
                rows.append(row)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=harness.CSV_FIELDS)
        if f.tell() == 0:
            writer.writeheader()
        writer.writerows(rows)


def test_charts_of_fifteen_providers(tmp_path, capsys):
    """``python -m vapt_kernels.bench.plot`` on a CSV of two runs: the last one (a sweep) by
    default, another with --run and --out."""
    pytest.importorskip("matplotlib")
    assert len(set(MANY)) == 15
    path = tmp_path / "results.csv"
    write_results(path, "2026-01-01T00:00:00", [(8, 10)])
    write_results(path, "2026-01-02T00:00:00", [(8, n) for n in (1, 10, 50, 100)], sweep="prompts")
    assert plot.main([str(path)]) == 0
    assert plot.main([str(path), "--run", "2026-01-01T00:00:00", "--out", str(tmp_path / "first")]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"chart written to {tmp_path / name}" for name in ("throughput.png", "sweep_prompts.png", "first/throughput.png")
    ]
    for name in ("throughput.png", "sweep_prompts.png", "first/throughput.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
    assert plot.main([str(path), "--run", "1999-01-01T00:00:00"]) == 1
    assert "no rows of a run at 1999-01-01T00:00:00" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Results files: append-only, atomic; conflicting arguments refused before anything is written
# --------------------------------------------------------------------------------------------

# A CSV of an older version's columns, then one of this version's whose last row was cut short.
OLDER_CSV = b"timestamp,provider,median_ms\r\n2020-01-01T00:00:00,floor,1.0\r\n2020-01-02T00:00:00,floor,1.0,extra\r\n"


def torn_csv(end: str = "") -> bytes:
    """This version's header, a row, and the start of a row (ended by ``end``)."""
    row = ",".join(["2020-01-01T00:00:00", "abc"] + [""] * (len(harness.CSV_FIELDS) - 2))
    return (",".join(harness.CSV_FIELDS) + "\r\n" + row + "\r\n" + row[:30] + end).encode()


def bench_files(out_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out_dir.iterdir())}


@pytest.mark.parametrize("earlier", [OLDER_CSV, torn_csv(), torn_csv("\r\n")],
                         ids=["other-columns", "torn-last-line", "short-last-line"])
def test_results_csv_is_append_only(earlier, tmp_path, capsys, fake_bench):
    """A results.csv that cannot take rows (other columns, a torn last line) is left byte for byte;
    the rows go to results-1.csv, and on the next run too; the output, summary.json and the charts
    name that file. A results.csv of this version's columns gets the rows appended after its own."""
    pytest.importorskip("matplotlib")
    out_dir = tmp_path / "results"
    out_dir.mkdir()
    (out_dir / "results.csv").write_bytes(earlier)
    for run in range(2):
        assert cli.main([*FAKE, "--out", str(out_dir)]) == 0
        out = capsys.readouterr().out
        assert (out_dir / "results.csv").read_bytes() == earlier
        assert f"{out_dir / 'results.csv'} " in out and ": left as it is" in out
        assert f"results appended to {out_dir / 'results-1.csv'}" in out
        rows = list(csv.DictReader((out_dir / "results-1.csv").open(newline="")))
        summary = json.loads((out_dir / "summary.json").read_text())
        assert list(rows[0]) == harness.CSV_FIELDS and len(rows) == (run + 1) * len(summary["runs"][0]["rows"])
        assert summary["results_csv"] == str(out_dir / "results-1.csv")
        assert rows[-1]["timestamp"] == summary["timestamp"]
        assert f"chart written to {out_dir / 'throughput.png'}" in out
    assert sorted(p.name for p in out_dir.iterdir()) == ["results-1.csv", "results.csv", "summary.json", "throughput.png"]
    before = (out_dir / "results-1.csv").read_bytes()
    cli.append_csv(out_dir / "results-1.csv", [rows[0]])
    assert (out_dir / "results-1.csv").read_bytes().startswith(before)


@pytest.mark.parametrize("failing", ["results.csv", "summary.json"])
def test_failed_writes_leave_the_files_as_they_were(failing, tmp_path, capsys, monkeypatch, fake_bench):
    """A full disk while a file is written: that file keeps its bytes, no temporary file is left,
    and the run ends with one line naming the file and the cause, exit status 1."""
    out_dir = tmp_path / "results"
    assert cli.main([*FAKE, "--no-plot", "--out", str(out_dir)]) == 0
    before = bench_files(out_dir)
    fsync = os.fsync

    def full_disk(fd):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(out_dir / f".{failing}.")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    capsys.readouterr()
    assert cli.main([*FAKE, "--no-plot", "--out", str(out_dir)]) == 1
    after = bench_files(out_dir)
    assert sorted(after) == sorted(before) and after[failing] == before[failing]
    assert capsys.readouterr().err == f"vapt-bench: cannot write {out_dir / failing}: [Errno 28] No space left on device\n"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch", "2", "--tasks", "4"], "--tasks 4 needs at least 4 images per batch"),
        (["--tasks", "16"], "--tasks 16 needs at least 16 images per batch (one task per image, in turn), but the default batch on cpu is 8"),
        (["--sweep", "batch", "--tasks", "4"], "--sweep batch runs batch 1, under --tasks 4"),
        (["--tasks", "2", "--providers", "floor"], "--tasks 2 adds the -mixed and -loop providers"),
        (["--registered", "8"], "--registered and --sweep registered size the mixed-batch providers"),
        (["--sweep", "registered"], "--registered and --sweep registered size the mixed-batch providers"),
        (["--tasks", "4", "--registered", "3"], "--registered 3 is fewer than the --tasks 4 of the batch"),
        (["--tasks", "4", "--sweep", "registered", "--registered", "8"], "--sweep registered runs registered 4, 64"),
        (["--img-size", "40"], "--img-size 40 is not a multiple of vit_tiny_patch16_224's patch size 16x16; use 32 or 48"),
        (["--img-size", "16"], "--img-size 16 gives vit_tiny_patch16_224 a patch grid smaller than VAPT's 2x2"),
        (["--model", "nonexistent"], "--model nonexistent: timm has no model of that name"),
        (["--model", "resnet18"], "--model resnet18 has no patch embedding"),
        (["--model", "resnet18", "--img-size", "32"], "--model resnet18 cannot be built at --img-size 32"),
        (["--prompts", "1.5"], "argument --prompts: expected a whole number, got '1.5'"),
        (["--sweep", "prompts", "--prompts", "5"], "--sweep prompts runs prompts 1, 10, 50, 100 in turn, so --prompts 5"),
        (["--sweep", "batch", "--batch", "4"], "--sweep batch runs batch 1, 8, 32 in turn, so --batch 4 would be ignored"),
        (["--out", "results/summary.json"], "is a file; give a folder"),
        (["--out", "results/summary.json/more"], "is a file, not a folder"),
        (["--out", "locked/results"], "cannot write in"),
        (["--out", "taken"], "taken/summary.json is a folder; move it away"),
    ],
)
def test_conflicting_arguments_are_refused_before_anything_is_written(argv, message, tmp_path, capsys, monkeypatch, fake_bench):
    """Each refused like argparse's own errors, naming the flag: exit status 2, nothing measured or written."""
    (tmp_path / "taken" / "summary.json").mkdir(parents=True)
    (tmp_path / "locked").mkdir()
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "summary.json").write_text("{}")
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path).name != "locked" and access(path, mode))
    monkeypatch.setattr(harness, "measure", lambda cfg, progress=True: pytest.fail("measured"))
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    base = ["--device", "cpu", "--model", "vit_tiny_patch16_224", "--providers", "floor", "vapt-torch", "--no-memory"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*base, *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "vapt-bench: error: " in err and message in err, err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_charts_that_cannot_be_written_do_not_fail_the_run(tmp_path, capsys, fake_bench):
    pytest.importorskip("matplotlib")
    out_dir = tmp_path / "results"
    (out_dir / "throughput.png").mkdir(parents=True)
    assert cli.main([*FAKE, "--out", str(out_dir)]) == 0
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"charts not drawn: cannot write {out_dir / 'throughput.png'}: [Errno 21] Is a directory")


def test_result_rows_name_the_commit_and_say_when_the_code_is_not_it(tmp_path, tmp_path_factory):
    """``git_commit`` (each row's ``git_commit``): the checkout's short commit; ``-dirty`` when a
    tracked file of the package or of ``csrc/`` differs from it, whatever else differs (results
    files) or is untracked; ``unknown`` outside a checkout."""
    from vapt_kernels.environment import git_commit

    def git(*args):
        subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "pkg").mkdir()
    (tmp_path / "csrc").mkdir()
    for name in ("pkg/ops.py", "csrc/op.cpp", "results.csv"):
        (tmp_path / name).write_text("0\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "first")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True,
                            text=True, check=True).stdout.strip()
    package = tmp_path / "pkg"
    (tmp_path / "results.csv").write_text("1\n")
    (package / "new.py").write_text("untracked\n")
    assert git_commit(package) == commit
    for name in ("pkg/ops.py", "csrc/op.cpp"):
        (tmp_path / name).write_text("1\n")
        assert git_commit(package) == f"{commit}-dirty", name
        git("checkout", "--", name)
    assert git_commit(tmp_path_factory.mktemp("not_a_checkout")) == "unknown"
