"""vapt-suite end to end on two tiny VTAB-1k tasks and one FGVC data set written in the shared
layouts, with a tiny ViT: the table's means come from the per-task rows, an interrupted suite
resumed gives the results of one run straight, a second run skips the finished tasks, and bad
input is refused before anything is written."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_paper_data import _image, write_vtab
from test_train import ROOT, tree_digest
from vapt_kernels import suite, train

TINY = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=16", "patch_size=4", "embed_dim=32",
        "depth=2", "num_heads=2", "--workers", "0", "--num-prompts", "4", "--epochs", "2", "--warmup-epochs", "1",
        "--batch-size", "6", "--lr-grid", "1", "4", "--wd-grid", "0", "--seeds", "1", "2", "--no-aug",
        "--cache-data"]  # fmt: skip
TASKS = ["--tasks", "vtab/eurosat", "vtab/dtd", "fgvc/dogs"]  # run in the paper's order: dtd, eurosat, dogs
TIMING = ("wall_s", "img_per_s")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """dtd and eurosat in the VTAB-1k layout, Stanford Dogs in the FGVC one (label names, Images/)."""
    root = tmp_path_factory.mktemp("benchmarks")
    write_vtab(root, "dtd", {"train800": 12, "val200": 6, "test": 8})
    write_vtab(root, "eurosat", {"train800": 12, "val200": 6, "test": 8})
    folder, n = root / "Stanford-dogs", 0
    for split, count in (("train", 12), ("val", 6), ("test", 8)):
        listed = {}
        for _ in range(count):
            name = f"n{n % 4:03d}-breed/{n}.jpg"
            _image(folder / "Images" / name, 30 * n)
            listed[name] = f"n{n % 4:03d}"
            n += 1
        (folder / f"{split}.json").write_text(json.dumps(listed))
    return root


def vapt_suite(*argv) -> int:
    return suite.main([str(a) for a in argv])


def rows_of(out: Path, timing: bool = True) -> list[dict]:
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return rows if timing else [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


class Interrupt(Exception):
    pass


def interrupt_at(monkeypatch, call: int) -> None:
    """Stop the process at the ``call``-th epoch end, before that epoch's checkpoint is written."""
    real, calls = train.save_epoch, []

    def save_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise Interrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "save_epoch", save_epoch)


def test_suite_runs_resumes_and_skips(data, tmp_path, monkeypatch, capsys):
    straight = tmp_path / "straight"
    assert vapt_suite(*TASKS, "--data-dir", data, *TINY, "--output", straight) == 0
    printed = capsys.readouterr().out
    rows = rows_of(straight)
    assert [r["task"] for r in rows] == ["vtab/dtd", "vtab/eurosat", "fgvc/dogs"]
    assert [r["final_train"] for r in rows] == ["train+val", "train+val", "train"]  # FGVC: the VPT protocol
    for row in rows:
        tuned = json.loads((straight / row["task"].replace("/", "-") / "result.json").read_text())
        seeds = [f["test_top1"] for f in tuned["final"]]
        assert row["seed_top1"] == " ".join(f"{t:.2f}" for t in seeds) and row["seeds"] == "1 2"
        assert float(row["top1_mean"]) == pytest.approx(sum(seeds) / 2, abs=1e-4)
        assert int(row["tuned_params"]) == tuned["parameters"]["total"]
        assert int(row["total_params"]) == tuned["parameters"]["total"] + tuned["parameters"]["backbone"]
        # VTAB: trained on train+val, the last epoch scored; FGVC: on train, the epoch best on val scored.
        scored = "test_last" if row["final_train"] == "train+val" else "test"
        for f in tuned["final"]:
            run = json.loads((straight / row["task"].replace("/", "-") / f"final-seed{f['seed']}" / "result.json").read_text())
            assert f["test_top1"] == run[scored]["top1"]
    # The means from the rows: a group's over its tasks, VTAB's over its tasks (not the groups).
    top1 = {r["task"]: float(r["top1_mean"]) for r in rows}
    means = suite.means(rows)
    assert means["natural"] == (top1["vtab/dtd"], 1, 7) and means["specialized"] == (top1["vtab/eurosat"], 1, 4)
    assert means["vtab"] == ((top1["vtab/dtd"] + top1["vtab/eurosat"]) / 2, 2, 19) and "structured" not in means
    assert means["fgvc"] == (top1["fgvc/dogs"], 1, 5)
    assert f"{means['vtab'][0]:.2f} (2/19)" in printed and "72.91" in printed and "VAPT (paper)" in printed
    summary = (straight / "summary.md").read_text()
    assert "| VAPT (paper) | 81.43 | 85.13 | 59.34 | 72.91 | 89.58 | 0.36 |" in summary
    assert (straight / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Interrupted twice: in the second task's second grid run before its first checkpoint (the run
    # starts again), then after that run's first epoch (it resumes from last.pt).
    resumed = tmp_path / "resumed"
    per_task = 2 * 2 + 2 * 2  # two grid runs and two final runs of two epochs
    interrupt_at(monkeypatch, per_task + 3)
    with pytest.raises(Interrupt):
        vapt_suite(*TASKS, "--data-dir", data, *TINY, "--output", resumed)
    assert sorted(p.name for p in (resumed / "vtab-eurosat" / "grid-lr4-wd0").iterdir()) == ["args.json"]
    interrupt_at(monkeypatch, 2)
    with pytest.raises(Interrupt):
        vapt_suite(*TASKS, "--data-dir", data, *TINY, "--output", resumed)
    assert (resumed / "vtab-eurosat" / "grid-lr4-wd0" / "last.pt").is_file()
    monkeypatch.undo()
    capsys.readouterr()
    assert vapt_suite(*TASKS, "--data-dir", data, *TINY, "--output", resumed) == 0
    assert "vtab/dtd: finished earlier, skipped" in capsys.readouterr().out
    assert rows_of(resumed, timing=False) == rows_of(straight, timing=False)

    # Once more: every task skipped, nothing run, the same table.
    before = rows_of(resumed)
    interrupt_at(monkeypatch, 1)  # a run would stop here
    assert vapt_suite(*TASKS, "--data-dir", data, *TINY, "--output", resumed) == 0
    assert capsys.readouterr().out.count("finished earlier, skipped") == 3
    assert rows_of(resumed) == before


def test_bad_suite_input_is_refused_before_anything_is_written(data, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--data-dir", data, *TINY, "--output", out]
    cases = [
        (["--tasks", "vtab/nosuch", *common], "unknown task 'vtab/nosuch'"),
        (["--tasks", "vtab1k-specialized", *common], "vtab/patch_camelyon: no folder"),  # a task without data
        (["--tasks", "vtab/dtd", "--test-split", "val", *common], "--test-split: the suite sets it"),
        (["--tasks", "vtab/dtd", "--resume", out, *common], "--resume: the same command continues"),
        (["--tasks", "vtab/dtd", "--num-classes", "3", *common], "--num-classes: the suite sets it"),
        (["--tasks", "vtab/dtd", "fgvc/cub", *common], "fgvc/cub: no folder"),  # the second task, found first
    ]
    for argv, why in cases:
        assert vapt_suite(*argv) == 2, why
        assert why in capsys.readouterr().err
        assert not out.exists()

    out.mkdir()
    (out / "notes.txt").write_text("not a suite")
    assert vapt_suite("--tasks", "vtab/dtd", *common) == 2
    assert "no suite.json: not a suite's folder" in capsys.readouterr().err
    (out / "notes.txt").unlink()

    # A suite of other settings is refused, the folder unchanged; --overwrite starts it over.
    assert vapt_suite("--tasks", "vtab/dtd", *common) == 0
    before = tree_digest(out)
    assert vapt_suite("--tasks", "vtab/dtd", *common, "--lr-grid", "2") == 2
    assert "other settings (--lr-grid [1.0, 4.0] there, [2.0] here)" in capsys.readouterr().err
    assert tree_digest(out) == before
    assert vapt_suite("--tasks", "vtab/dtd", *common, "--lr-grid", "2", "--overwrite") == 0
    assert [r["lr_base"] for r in rows_of(out)] == ["2.0"]


def test_suite_under_torchrun(data, tmp_path):
    """Two gloo processes run the suite as one command: each task's runs over both processes, the
    files written once; the same command again skips the finished task."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "vapt_kernels.suite", "--tasks", "vtab/dtd", "--data-dir", str(data), *TINY,
            "--output", str(tmp_path / "out")]  # fmt: skip
    for _ in range(2):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert done.stdout.count("vtab/dtd: finished earlier, skipped") == 1  # printed by the main process only
    assert [r["task"] for r in rows_of(tmp_path / "out")] == ["vtab/dtd"]
    tuned = json.loads((tmp_path / "out" / "vtab-dtd" / "final-seed1" / "args.json").read_text())
    assert tuned["batch_size"] == 6 and tuned["train_on_val"]
