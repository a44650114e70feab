"""``prefloss check`` end to end, in a subprocess (as a user runs it).

The subprocess runs with cwd=tmp_path, not the repository root, so the top-level ``kernels/`` folder is
not on sys.path, and without TRITON_INTERPRET: `prefloss check` must set it itself on a CPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from prefloss.commands import check
from prefloss.commands.check import QUICK_CASES, QUICK_DTYPES
from prefloss.commands.cli import main


def _check(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-m", "prefloss.commands.cli", "check", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_check_quick_passes_and_writes_json(tmp_path):
    # one CUDA and one AMD target (CI's time): tests/test_kernels_compile.py covers all four
    proc = _check(tmp_path, "--quick", "--targets", "90,gfx942", "--json", "out.json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((tmp_path / "out.json").read_text())
    assert data["passed"] is True
    assert data["correctness"] and all(r["passed"] for r in data["correctness"])
    assert {(r["case"], r["dtype"]) for r in data["correctness"]} == {
        (c, d) for c in QUICK_CASES for d in QUICK_DTYPES
    }
    ref_eps = {r["quantity"] for r in data["correctness"] if r["case"] == "ref-eps"}
    assert {"policy", "ref", "minus", "plus", "d hidden", "d weight"} <= ref_eps
    assert {"policy sums", "ref sums", "minus sums", "plus sums"} <= ref_eps
    assert data["compile"] and all(r["ok"] for r in data["compile"])
    assert {r["target"] for r in data["compile"]} == {90, "gfx942"}
    amd = [r for r in data["compile"] if r["target"] == "gfx942"]
    assert all(r["vgprs"] > 0 and r["vgpr_spills"] == r["scratch_bytes"] == 0 for r in amd)
    assert "max abs err" in proc.stdout and "spill" in proc.stdout
    assert "compile report (sm_90, gfx942; no GPU needed)" in proc.stdout and "occupancy" in proc.stdout


def test_check_detects_injected_error(tmp_path):
    """The harness must fail when the kernels' outputs are off by more than the tolerance."""
    args = ["--cases", "odd-V", "--dtypes", "fp32", "--no-compile", "--json", "out.json"]
    proc = _check(tmp_path, *args, "--inject-error", "0.01")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    data = json.loads((tmp_path / "out.json").read_text())
    assert data["passed"] is False and not any(r["passed"] for r in data["correctness"])
    assert "FAIL" in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cases", "no-such-case"], "--cases"),
        (["--dtypes", "fp8"], "--dtypes"),
        (["--json", "missing/out.json"], "does not exist"),
    ],
    ids=["case", "dtype", "json-dir"],
)
def test_check_rejects_bad_arguments(tmp_path, monkeypatch, capsys, args, message):
    """Argument errors are reported (exit 2) before anything runs; checked in-process for speed."""
    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    check.add_arguments(parser)
    assert check.run(parser.parse_args(args)) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--targets", "sm90"],
            "argument --targets: expected a comma-separated list of integers >= 50 like 80,90 "
            "and/or AMD targets among gfx942,gfx90a, got 'sm90'",
        ),
        (
            ["--targets", "-5"],
            "argument --targets: expected a comma-separated list of integers >= 50 like 80,90 "
            "and/or AMD targets among gfx942,gfx90a, got '-5'",
        ),
        (["--targets", "80,8"], "argument --targets: expected a comma-separated list of integers >= 50"),
        (["--targets", "gfx1100"], "argument --targets: expected a comma-separated list of integers >= 50"),
        (["--targets", ","], "argument --targets: expected a comma-separated list of integers >= 50"),
        (["--inject-error", "-1"], "argument --inject-error: expected a finite number >= 0, got '-1'"),
        (["--inject-error", "nan"], "argument --inject-error: expected a finite number >= 0, got 'nan'"),
        (["--inject-error", "inf"], "argument --inject-error: expected a finite number >= 0, got 'inf'"),
        (["--seed", "-1"], "argument --seed: expected an integer in [0, 4294967295], got '-1'"),
        (["--seed", "1.5"], "argument --seed: expected an integer in [0, 4294967295], got '1.5'"),
        (["--seed", str(2**32)], "argument --seed: expected an integer in [0, 4294967295]"),
    ],
    ids=[
        "targets-name",
        "targets-negative",
        "targets-too-low",
        "targets-unknown-amd",
        "targets-empty",
        "inject-negative",
        "inject-nan",
        "inject-inf",
        "seed-negative",
        "seed-float",
        "seed-too-big",
    ],
)
def test_check_rejects_bad_numbers_at_parse_time(capsys, args, message):
    """Every number is checked by the parser: `prefloss check` exits 2 before any check runs."""
    with pytest.raises(SystemExit) as exit_info:
        main(["check", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_check_number_defaults_and_good_values():
    parser = argparse.ArgumentParser()
    check.add_arguments(parser)
    args = parser.parse_args([])
    assert (args.targets, args.seed, args.inject_error) == ([80, 90, "gfx942", "gfx90a"], 0, 0.0)
    args = parser.parse_args(["--targets", "90", "--seed", "7", "--inject-error", "0.5"])
    assert (args.targets, args.seed, args.inject_error) == ([90], 7, 0.5)
    assert parser.parse_args(["--targets", "gfx90a,80"]).targets == ["gfx90a", 80]
