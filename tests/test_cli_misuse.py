"""``vapt-train`` driven as a hostile user would: every numeric flag given NaN, Inf, a negative, a
zero, a fraction or a huge value, and flags that contradict each other. The rule: exit status 2,
the flag named in the error, and the output folder exactly as it was: missing if it was missing,
byte for byte the same if it holds an earlier run (even with --overwrite, which deletes that run
only once every check has passed)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from test_train import ROOT, TINY, error_message, load, tree_digest, vapt_train
from test_train import digits  # noqa: F401 (a fixture, shared)
from vapt_kernels import train

POSITIVE_FLOAT = ["nan", "inf", "-inf", "-1", "0"]
NON_NEGATIVE_FLOAT = ["nan", "inf", "-1e-4"]
POSITIVE_INT = ["nan", "inf", "-1", "0", "1.5"]
NON_NEGATIVE_INT = ["nan", "-1", "1.5"]
SEED = ["nan", "-1", str(2**64)]
PROBABILITY = ["nan", "inf", "-0.1", "1"]
# Every flag that takes a number, with values it must refuse.
BAD_VALUES = {
    "--lr": POSITIVE_FLOAT, "--lr-base": POSITIVE_FLOAT, "--lr-grid": POSITIVE_FLOAT,
    "--weight-decay": NON_NEGATIVE_FLOAT, "--warmup-epochs": NON_NEGATIVE_FLOAT, "--wd-grid": NON_NEGATIVE_FLOAT,
    "--momentum": ["nan", "inf", "-1", "1", "2"], "--crop-pct": ["nan", "inf", "0", "-1", "1.5"],
    "--epochs": POSITIVE_INT, "--batch-size": POSITIVE_INT, "--img-size": POSITIVE_INT,
    "--num-classes": POSITIVE_INT, "--log-interval": POSITIVE_INT,
    "--workers": NON_NEGATIVE_INT, "--checkpoint-every": NON_NEGATIVE_INT,
    "--seed": SEED, "--seeds": SEED,
    "--num-prompts": ["nan", "-1", "0"], "--kernel-size": ["nan", "-1", "0"], "--hidden-dim": ["nan", "-1", "0"],
    "--vpt-depth": ["nan", "-1", "0"], "--padding": ["nan", "-1"],
    "--prompt-dropout": PROBABILITY, "--conv-dropout": PROBABILITY, "--mlp-dropout": PROBABILITY,
}
CASES = [(flag, value) for flag, values in BAD_VALUES.items() for value in values]


def test_every_numeric_flag_is_probed():
    """A new numeric flag must join BAD_VALUES (and get a check at the flag)."""
    parser = train.build_parser()
    named = {"--task"}  # a checked name, not a number (tests/test_paper_data.py gives it bad ones)
    numeric = {a.option_strings[0] for a in parser._actions
               if a.option_strings and a.type is not None and a.type.__name__ != "str"} - named
    assert numeric == set(BAD_VALUES)


@pytest.fixture(scope="module")
def earlier_run(digits, tmp_path_factory):  # noqa: F811
    """A finished one-epoch run: the folder a careless second run would write into."""
    out = tmp_path_factory.mktemp("earlier") / "run"
    vapt_train("--data-dir", digits / "small", *TINY, "--no-aug", "--cache-data", "--epochs", 1, "--batch-size", 16,
               "--output", out)
    return out


def _refused_untouched(capsys, out, flag: str, *argv) -> str:
    """Run vapt-train with ``argv``: exit status 2, ``flag`` named, ``out`` unchanged."""
    before = tree_digest(out)
    capsys.readouterr()
    assert vapt_train(*argv, "--output", out, check=False) == 2
    err = error_message(capsys.readouterr().err)
    assert f"{flag} " in err or f"{flag}:" in err, err
    assert "Traceback" not in err, err
    assert tree_digest(out) == before, "a refused run changed the output folder"
    return err


@pytest.mark.parametrize("flag,value", CASES, ids=[f"{f}={v}" for f, v in CASES])
def test_bad_number_is_refused_at_its_flag(digits, earlier_run, tmp_path, capsys, flag, value):  # noqa: F811
    common = ["--data-dir", digits / "small", *TINY, "--no-aug", "--epochs", 1, "--batch-size", 16]
    err = _refused_untouched(capsys, tmp_path / "new", flag, *common, flag, value)
    assert "expected" in err or "must be" in err, err  # the accepted range
    _refused_untouched(capsys, earlier_run, flag, *common, "--overwrite", flag, value)


def test_contradicting_flags_are_refused(digits, earlier_run, tmp_path, capsys):  # noqa: F811
    """What one flag alone cannot tell: found before the first write, the earlier run kept."""
    common = ["--data-dir", digits / "small", *TINY, "--no-aug", "--epochs", 1, "--batch-size", 16]
    tuning = [*common, "--test-split", "test"]
    cases = [
        ("--lr-base", [*common[:-1], 512, "--lr-base", 1e308], "not a finite number"),
        ("--lr", [*tuning, "--lr", 0.1, "--lr-grid", 0.8], "drop --lr"),
        ("--lr-grid", [*tuning, "--lr-grid", 0.8, 0.8], "0.8 more than once"),
        ("--wd-grid", [*tuning, "--wd-grid", 0, 0.0], "0 more than once"),
        ("--seeds", [*tuning, "--wd-grid", 0, "--seeds", 1, 1], "1 more than once"),
        ("--kernel-size", [*common, "--kernel-size", 5], "does not fit"),
        ("--batch-size", [*common[:-1], 10**6], "fewer than one --batch-size"),
        ("--overwrite", [*common, "--overwrite", "--resume", earlier_run / "last.pt"], "would delete"),
    ]
    for flag, argv, why in cases:
        for out in (tmp_path / "new", earlier_run):
            if flag == "--overwrite" and out != earlier_run:
                continue
            extra = [] if flag == "--overwrite" else ["--overwrite"] * (out == earlier_run)
            err = _refused_untouched(capsys, out, flag, *argv, *extra)
            assert why in err, (flag, err)
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    err = _refused_untouched(capsys, a_file, "--output", *common)
    assert "is a file" in err
    capsys.readouterr()
    assert vapt_train("--eval-only", "--checkpoint", earlier_run / "last.pt", "--overwrite", check=False) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_an_earlier_run_is_refused_without_resume_or_overwrite(digits, earlier_run, capsys):  # noqa: F811
    err = _refused_untouched(capsys, earlier_run, "--output", "--data-dir", digits / "small", *TINY, "--no-aug",
                             "--epochs", 1, "--batch-size", 16)
    assert "--resume" in err and "--overwrite" in err


def test_a_diverging_learning_rate_fails_without_nonfinite_files(digits, tmp_path, capsys):  # noqa: F811
    """--lr 1e30 is finite, so it is taken, and diverges: status 3, no result.json, nothing
    non-finite written."""
    out = tmp_path / "huge-lr"
    capsys.readouterr()
    assert vapt_train("--data-dir", digits / "small", *TINY, "--no-aug", "--cache-data", "--epochs", 2,
                      "--batch-size", 16, "--lr", 1e30, "--log-interval", 1, "--output", out, check=False) == 3
    assert "NaN/Inf" in capsys.readouterr().err
    assert not (out / "result.json").exists()
    for path in out.glob("*.pt"):
        assert all(torch.isfinite(v).all() for v in load(path)["model"].values()), path


def test_the_command_line_exits_2_naming_the_flag(tmp_path):
    """The installed entry point (python -m vapt_kernels.train), not only train.main."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "o"
    done = subprocess.run([sys.executable, "-m", "vapt_kernels.train", "--lr", "nan", "--output", str(out)],
                          env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "argument --lr: expected a finite number > 0, got 'nan'" in done.stderr
    assert not out.exists()
