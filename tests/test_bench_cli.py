"""`prefloss bench` on tiny shapes: every registered case through the runner in this process (the
gate passed, well-formed timed rows), a few cases end to end through the CLI in fresh processes
(JSON, table, plots, exit status, ``--floor-parts``); its correctness gate: the float64 pieces,
prefloss passing it over seeds, injected errors failing it; ``--seeds`` (the gate alone over seeds);
the ``torch-lce`` cases (PyTorch's ``F.linear_cross_entropy``) under the same gate;
``--max-tokens`` (its search, on synthetic and on measured peak curves, its GPU MODEL, a tiny run
end to end)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch

from prefloss import benchmark as bench
from prefloss import reference
from prefloss.benchmark import QUICK
from prefloss.benchmark.authors import authors_loss
from prefloss.benchmark.cases import CASES, HYPERPARAMS, LOSS_NAMES, select_cases
from prefloss.benchmark.gate import worst_part
from prefloss.benchmark.inputs import DTYPES, Shape, counted_tokens, make_inputs
from prefloss.benchmark.machine import describe
from prefloss.benchmark.oracle import ground_truth
from prefloss.benchmark.report import plot_title
from prefloss.benchmark.worker import check_step
from prefloss.commands.cli import main
from prefloss.testing import ERROR_MARGIN


def _truth(shape: Shape, seed: int, names=LOSS_NAMES):
    x = make_inputs(shape, seed=seed)
    return ground_truth({n: HYPERPARAMS[n] for n in names}, *x[:3], ref_hidden=x[3], ref_weight=x[4])


def _check(case_name: str, shape: Shape, seed: int, truth, case=None) -> dict:
    """The bench worker's check of one case, in this process, on fresh inputs."""
    case = case or CASES[case_name]
    x = make_inputs(shape, seed=seed)
    return check_step(case, case.build(x), x, truth)


@pytest.mark.parametrize("name", LOSS_NAMES, ids=list(LOSS_NAMES))
def test_oracle_and_authors_match_reference(name):
    """The token-chunked oracle and the authors-style code (run in float64) equal
    `prefloss.reference.preference_loss` and its autograd gradients, odd shapes and chunking."""
    x = make_inputs(Shape(batch=2, seq_len=48, hidden=16, vocab=301), seed=3)
    d = [t.detach().double() for t in x]
    h, w = d[0].clone().requires_grad_(), d[1].clone().requires_grad_()
    ref = reference.preference_loss(
        name, h, w, x.labels, ref_hidden=d[3], ref_weight=d[4], **HYPERPARAMS[name]
    )
    ref_gh, ref_gw = torch.autograd.grad(ref, (h, w))

    truth = ground_truth({name: HYPERPARAMS[name]}, *x[:3], ref_hidden=x[3], ref_weight=x[4], chunk_tokens=37)
    exp = truth.losses[name]
    torch.testing.assert_close(exp["loss"].value, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(exp["grad_hidden"].value, ref_gh, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(exp["grad_weight"].value, ref_gw, rtol=1e-9, atol=1e-14)
    tok = reference.token_logprobs(d[0], d[1], x.labels, ref_hidden=d[3], ref_weight=d[4])
    torch.testing.assert_close(truth.tokens["policy"].value, tok.policy, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(truth.sums["ref"].value, tok.ref.sum(-1), rtol=1e-12, atol=1e-12)
    for part in (*exp.values(), *truth.tokens.values(), *truth.sums.values()):
        assert (part.bound > 0).all() and part.bound.shape in ((), part.value.shape)

    h2, w2 = d[0].clone().requires_grad_(), d[1].clone().requires_grad_()
    ours = authors_loss(name, h2, w2, x.labels, ref_hidden=d[3], ref_weight=d[4], **HYPERPARAMS[name])
    gh, gw = torch.autograd.grad(ours, (h2, w2))
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-9, atol=1e-14)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every test here runs torch on one thread, and on as many as before after it: the shapes are
    tiny, and on a loaded 2-core machine a 2-thread barrier per tiny GEMM costs more than the GEMM
    (three seeds of the prefloss gate: 9.8 s on 2 threads, 1.5 s on one, measured under load). The
    CLI tests pass ``--threads 1`` to their processes for the same reason."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


GATE_SHAPES = {
    "B2-T40-H16-V203": Shape(batch=2, seq_len=40, hidden=16, vocab=203),
    "B3-T24-H8-V97": Shape(batch=3, seq_len=24, hidden=8, vocab=97),
}


@pytest.mark.parametrize("shape", list(GATE_SHAPES.values()), ids=list(GATE_SHAPES))
def test_gate_passes_prefloss_over_seeds(shape):
    """prefloss (torch backend) passes the bench's gate for every loss and seeds 0–9: loss,
    gradients, the op's tokens and per-row sums.

    The bounds follow each loss's conditioning: α-DPO's first step divides by 0.1·std of the
    batch's margins and may amplify fp32 rounding a thousandfold, so a bound taken from one
    realisation of plain PyTorch's loss error failed correct code on another machine.
    """
    failed = []
    for seed in range(10):
        truth = _truth(shape, seed)
        for name in LOSS_NAMES:
            result = _check(f"prefloss-torch/{name}", shape, seed, truth)
            assert {"loss", "grad_hidden", "grad_weight", "policy tokens", "policy sums"} <= set(result)
            if not result["passed"]:
                failed.append(f"{name} seed {seed}: {result['detail']}")
    assert not failed, "\n".join(failed)


@pytest.mark.slow
@pytest.mark.parametrize("seq_len", [int(t) for t in QUICK["seq_len"].split(",")], ids=lambda t: f"T{t}")
def test_gate_passes_prefloss_at_quick_shapes(seq_len):
    """``prefloss bench --quick``'s shapes and seed, the gate only (no timing): every loss passes."""
    shape = Shape(
        batch=int(QUICK["batch"]), seq_len=seq_len, hidden=int(QUICK["hidden"]), vocab=int(QUICK["vocab"])
    )
    truth = _truth(shape, 0)
    for name in LOSS_NAMES:
        result = _check(f"prefloss-torch/{name}", shape, 0, truth)
        assert result["passed"], (name, result["detail"])


@pytest.mark.parametrize("shape", list(GATE_SHAPES.values()), ids=list(GATE_SHAPES))
def test_gate_passes_trl_dpo_over_seeds(shape):
    """TRL 1.16's chunked-head DPO step (``trl/dpo``) passes the same gate as prefloss, seeds 0–4."""
    pytest.importorskip("trl")
    for seed in range(5):
        result = _check("trl/dpo", shape, seed, _truth(shape, seed, ("dpo",)))
        assert {"loss", "grad_hidden", "grad_weight"} <= set(result)
        assert result["passed"], (seed, result["detail"])


@pytest.mark.parametrize("shape", list(GATE_SHAPES.values()), ids=list(GATE_SHAPES))
def test_gate_passes_torch_linear_cross_entropy_over_seeds(shape):
    """``torch-lce/<loss>``: DPO, SimPO and α-DPO on torch's ``F.linear_cross_entropy`` (default
    options) pass the same gate as prefloss, seeds 0–4; a wrong loss name is refused."""
    from prefloss.benchmark.torch_lce_case import LOSSES as LCE_LOSSES
    from prefloss.benchmark.torch_lce_case import torch_lce_step

    assert LCE_LOSSES == ("dpo", "simpo", "alpha_dpo")
    for seed in range(5):
        truth = _truth(shape, seed, LCE_LOSSES)
        for name in LCE_LOSSES:
            result = _check(f"torch-lce/{name}", shape, seed, truth)
            assert {"loss", "grad_hidden", "grad_weight"} <= set(result)
            assert result["passed"], (name, seed, result["detail"])
    with pytest.raises(ValueError, match="`loss` must be one of .* got 'epsilon_dpo'"):
        torch_lce_step("epsilon_dpo", HYPERPARAMS["epsilon_dpo"])


@pytest.mark.parametrize("name", ["epsilon_dpo", "dpo"], ids=["epsilon_dpo", "dpo"])
def test_frozen_head_cases_pass_the_gate_against_their_floor(name):
    """``prefloss-torch-frozen/<loss>``: the head takes no gradient, ∂hidden and the loss pass the
    gate (seeds 0–2), and the case is timed against ``floor-frozen``, 3 GEMMs of n·H·V (no ∂W)."""
    shape = GATE_SHAPES["B2-T40-H16-V203"]
    case = CASES[f"prefloss-torch-frozen/{name}"]
    assert case.frozen_head and case.method == "prefloss-torch" and case.floor == "floor-frozen"
    for seed in range(3):
        x = make_inputs(shape, seed=seed)
        result = check_step(case, case.build(x), x, _truth(shape, seed, (name,)))
        assert result["passed"], (seed, result["detail"])
        assert "grad_weight" not in result and x.weight.grad is None

    x = make_inputs(shape)
    n, h, v = counted_tokens(shape), shape.hidden, shape.vocab
    for floor_name, gemms in (("floor", 4), ("floor-frozen", 3)):
        floor = CASES[floor_name].build(x)
        with torch.profiler.profile(record_shapes=True) as prof:
            floor()
        mm = [e for e in prof.events() if e.name == "aten::mm"]
        assert len(mm) == gemms and all(
            math.prod(e.input_shapes[0]) * e.input_shapes[1][1] == n * h * v for e in mm
        )


def test_gate_rejects_injected_errors():
    """The self-test case (labels off by one) fails; so does one token's log-prob off by 10× the
    fp32 error (``10·error_scale``: plain PyTorch's max token error, at least one rounding),
    although the loss and its gradients barely move."""
    shape = GATE_SHAPES["B2-T40-H16-V203"]
    truth = _truth(shape, 0, ("dpo",))
    wrong = _check("selftest/wrong_dpo", shape, 0, truth)
    assert not wrong["passed"]
    assert not wrong["loss"]["passed"] and not wrong["policy tokens"]["passed"]

    case = CASES["prefloss-torch/dpo"]
    fp32_error = float(truth.tokens["policy"].bound) / ERROR_MARGIN
    row, pos = 1, 30  # a counted token (the prompt is T/8, row 1 pads T/32)

    def perturbed(x):
        tok = case.tokens(x)
        assert tok.mask[row, pos]
        policy = tok.policy.clone()
        policy[row, pos] += 10 * fp32_error
        return tok._replace(policy=policy)

    result = _check("", shape, 0, truth, case=dataclasses.replace(case, tokens=perturbed))
    assert not result["policy tokens"]["passed"], result["policy tokens"]
    assert result["policy tokens"]["worst_index"] == [row, pos]
    assert result["loss"]["passed"] and result["ref tokens"]["passed"]
    clean = _check("prefloss-torch/dpo", shape, 0, truth)
    assert clean["passed"], clean["detail"]


def test_inputs_prompt_and_padding():
    shape = Shape(batch=2, seq_len=64, hidden=8, vocab=50)
    x = make_inputs(shape)
    counted = (x.labels != -100).sum(-1).tolist()
    assert counted == [56, 54, 52, 50]  # T - T/8 prompt - (i mod 8)·T/32 padding
    assert sum(counted) == counted_tokens(shape)


def test_unknown_case_lists_valid_names(capsys):
    assert main(["bench", "--cases", "nope/dpo"]) == 2
    err = capsys.readouterr().err
    assert "unknown case 'nope/dpo'" in err and "prefloss-torch/epsilon_dpo" in err and "liger/dpo" in err


SIZES = "expected a comma-separated list of integers >= 1 like 512,1024"
SEEDS = "expected seeds as A-B (A <= B) or A,B,..., each in [0, 4294967295], at most 1000"


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--seq-len", "12,x"], f"argument --seq-len: {SIZES}, got '12,x'"),
        (["--seq-len", ","], f"argument --seq-len: {SIZES}, got ','"),
        (["--batch", "0"], f"argument --batch: {SIZES}, got '0'"),
        (["--hidden", "16,-3"], f"argument --hidden: {SIZES}, got '16,-3'"),
        (["--vocab", "0"], f"argument --vocab: {SIZES}, got '0'"),
        (["--repeats", "0"], "argument --repeats: expected an integer >= 1, got '0'"),
        (["--repeats", "2.5"], "argument --repeats: expected an integer >= 1, got '2.5'"),
        (["--seed", "-1"], "argument --seed: expected an integer in [0, 4294967295], got '-1'"),
        (["--mem-limit-gib", "-1"], "argument --mem-limit-gib: expected a finite number >= 0, got '-1'"),
        (["--mem-limit-gib", "nan"], "argument --mem-limit-gib: expected a finite number >= 0, got 'nan'"),
        (["--timeout", "0"], "argument --timeout: expected a finite number > 0, got '0'"),
        (["--timeout", "inf"], "argument --timeout: expected a finite number > 0, got 'inf'"),
        (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
        (["--device", "gpu"], "argument --device: expected auto, cpu, cuda or cuda:N, got 'gpu'"),
        (["--device", "cuda:x"], "argument --device: expected auto, cpu, cuda or cuda:N, got 'cuda:x'"),
        (["--seeds", "3-1"], f"argument --seeds: {SEEDS}, got '3-1'"),
        (["--seeds", "-1"], f"argument --seeds: {SEEDS}, got '-1'"),
        (["--seeds", "0-1000"], f"argument --seeds: {SEEDS}, got '0-1000'"),
        (["--seeds", "1,x"], f"argument --seeds: {SEEDS}, got '1,x'"),
        (["--seeds", "0-4294967296"], f"argument --seeds: {SEEDS}, got '0-4294967296'"),
        (["--seed", "1", "--seeds", "0-2"], "argument --seeds: not allowed with argument --seed"),
        (["--threads", "0"], "argument --threads: expected an integer >= 1, got '0'"),
    ],
)
def test_bad_arguments_exit_at_parse_time(capsys, argv, fragment):
    """Every number (and the dtype and device) is checked by the parser: exit 2 before any case runs."""
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *argv])
    assert exit_info.value.code == 2
    assert fragment in capsys.readouterr().err


def test_argument_defaults_and_good_values():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args([])
    assert (args.seq_len, args.repeats, args.seed, args.mem_limit_gib, args.timeout) == (
        None,
        None,
        0,
        16.0,
        1800.0,
    )
    argv = [
        "--seq-len",
        "24,40",
        "--batch",
        "2",
        "--mem-limit-gib",
        "0",
        "--timeout",
        "5",
        "--device",
        "cuda:1",
    ]
    args = parser.parse_args(argv)
    assert (args.seq_len, args.batch, args.mem_limit_gib, args.timeout, args.device) == (
        [24, 40],
        [2],
        0.0,
        5.0,
        "cuda:1",
    )
    assert set(bench.DTYPE_NAMES) == set(DTYPES)


def test_seeds_threads_and_floor_parts_arguments():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args([])
    assert (args.seeds, args.threads, args.floor_parts) == (None, None, False)
    assert parser.parse_args(["--seeds", "0-3"]).seeds == [0, 1, 2, 3]
    assert parser.parse_args(["--seeds", "7,2,7"]).seeds == [7, 2]
    assert parser.parse_args(["--seeds", "4294967295"]).seeds == [4294967295]
    args = parser.parse_args(["--floor-parts", "--threads", "1"])
    assert (args.floor_parts, args.threads) == (True, 1)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--seeds", "0-1", "--plot", "plots"], "gate only, no timing: no `--plot`"),
        (["--seeds", "0", "--floor-parts"], "no `--floor-parts`"),
        (["--seeds", "0", "--cases", "floor"], "`--seeds`: the selected cases have no loss to check"),
    ],
    ids=["plot", "floor-parts", "no-loss"],
)
def test_seeds_refuses_what_needs_timing(capsys, argv, fragment):
    assert main(["bench", "--device", "cpu", *argv]) == 2
    assert fragment in capsys.readouterr().err


def test_seeds_runs_the_gate_over_seeds(tmp_path, capsys):
    """``--seeds``: every (case, seed) checked in this process, nothing timed; per case, the worst
    error / bound over the seeds; a wrong case fails on every seed and makes the exit status 1."""
    out = tmp_path / "gate.json"
    argv = ["bench", "--seeds", "0-1", "--seq-len", "24", "--batch", "2", "--hidden", "16", "--vocab", "203"]
    argv += ["--cases", "prefloss-torch/dpo,floor,selftest/wrong_dpo", "--no-progress", "--json", str(out)]
    assert main(argv) == 1
    text = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["config"]["seeds"] == [0, 1]
    assert doc["config"]["cases"] == ["prefloss-torch/dpo", "selftest/wrong_dpo"]
    records = doc["records"]
    assert [(r["case"], r["seed"]) for r in records] == [
        ("prefloss-torch/dpo", 0),
        ("selftest/wrong_dpo", 0),
        ("prefloss-torch/dpo", 1),
        ("selftest/wrong_dpo", 1),
    ]
    assert all("time_s" not in r for r in records)
    shape = Shape(batch=2, seq_len=24, hidden=16, vocab=203)
    for r in records:
        expected = _check(r["case"], shape, r["seed"], _truth(shape, r["seed"], ("dpo",)))
        assert r["status"] == ("ok" if expected["passed"] else "wrong")
        worst, ratio = worst_part(expected)
        assert r["worst"] == worst and r["ratio"] == pytest.approx(ratio, rel=1e-6)
    good, wrong = doc["summary"]
    assert good["case"] == "prefloss-torch/dpo" and good["failed_seeds"] == [] and good["ratio"] <= 1
    assert good["ratio"] == max(r["ratio"] for r in records if r["case"] == good["case"])
    assert wrong["failed_seeds"] == [0, 1] and wrong["ratio"] > 1
    assert "FAILED 2 of 2 seeds" in text and "2 of 4 checks (case x shape x seed) passed" in text


def test_explicit_only_cases_need_their_name():
    assert "selftest/wrong_dpo" not in [c.name for c in select_cases(None)]
    assert "selftest/wrong_dpo" not in [c.name for c in select_cases(["*"])]
    assert [c.name for c in select_cases(["selftest/wrong_dpo"])] == ["selftest/wrong_dpo"]


def test_plot_title_keeps_every_version():
    """Plot titles wrap the machine line rather than cutting it: the last version must survive."""
    machine = describe("cpu")
    title = plot_title("time vs seq_len (batch2_hidden512_vocab32000)", machine, panels=4)
    for package, version in machine["versions"].items():
        if package != "prefloss_source_sha256":
            assert f"{package} {version}" in title.replace("\n", " "), (package, title)
    assert max(len(line) for line in title.splitlines()) <= 160


def _assert_well_formed(r: dict, repeats: int) -> None:
    """A bench row: the self-test case wrong and not timed, Triton skipped without a GPU, every
    other case checked (passed) and timed, with its ratios."""
    if r["method"] == "selftest":
        assert r["status"] == "wrong", r
        assert not r["check"]["passed"] and "time_s" not in r and "peak_mib" not in r
        assert not r["check"]["loss"]["passed"] and not r["check"]["policy tokens"]["passed"]
        return
    if r["method"] == "prefloss-triton" and not torch.cuda.is_available():
        assert r["status"] == "skipped" and "no GPU" in r["error"], r
        return
    assert r["status"] == "ok", r
    assert r["check"]["passed"], r["check"]
    if r["loss"] is not None:
        assert {"loss", "grad_hidden"} <= set(r["check"]), r["check"]
    assert r["time_s"]["median"] > 0 and r["time_s"]["n"] == repeats
    assert r["peak_mib"]["max"] >= 0 and len(r["peak_mib"]["samples"]) == repeats
    if r["method"].startswith("prefloss"):  # timed alternately with the floor in-process
        pairs = r["interleaved_floor"]
        assert len(pairs["ratios"]) == repeats and pairs["floor_s"]["median"] > 0
        assert r["ratios"]["time_to_floor"] == pairs["ratio_median"]
        assert r["ratios"]["time_to_floor_method"] == "interleaved"
        assert r["tile_arithmetic"] in ("eager", "compiled")
    elif r["method"] != "floor":
        assert r["ratios"]["time_to_floor_method"] == "separate"
    if r["method"] != "floor":
        assert r["ratios"]["time_to_floor"] > 0
        assert r["ratios"]["time_to_best_other"] > 0
        assert "memory_to_best_other" in r["ratios"]


def test_every_case_passes_the_gate_and_is_timed():
    """Every registered case (the explicit-only self-test too) through the bench's own runner in
    this process (`runner.run(in_process=True)`: the float64 reference once, then each case's
    worker function) at one tiny shape: each passes the gate and yields a well-formed timed row
    with its ratios; the self-test case is reported WRONG and not timed; Triton is skipped without
    a GPU. This is what catches a broken peer or prefloss case; the CLI test below runs a few of
    them end to end in their own processes."""
    from prefloss.benchmark.runner import Config, run

    cases = list(CASES.values())
    assert [c.name for c in cases if c.explicit_only] == ["selftest/wrong_dpo"]
    shape = Shape(batch=2, seq_len=24, hidden=16, vocab=203)
    config = Config(cases, [shape], repeats=2, seed=0, device="cpu", mem_limit_gib=None, timeout_s=60)
    rows = run(config, progress=False, in_process=True)
    assert [r["case"] for r in rows] == list(CASES)
    for r in rows:
        _assert_well_formed(r, repeats=2)


# One case of each kind: the floor, prefloss-torch, the frozen-head case whose name is the longest
# (the table's column), the authors' code, a peer, the self-test and a Triton case (skipped on CPU);
# the CLI adds the frozen case's floor, floor-frozen.
CLI_CASES = (
    "floor",
    "prefloss-torch/dpo",
    "prefloss-torch-frozen/epsilon_dpo",
    "authors/epsilon_dpo",
    "liger/dpo",
    "selftest/wrong_dpo",
    "prefloss-triton/dpo",
)


def test_bench_cli_end_to_end(tmp_path):
    """The CLI end to end, a few cases of each kind (`CLI_CASES`), each in its own fresh process,
    at the two shapes the plots need, with ``--floor-parts --threads 1``: the JSON, the table, the
    plots; exit status 1 for the deliberately wrong case (reported, not timed); Triton skipped on
    CPU; each prefloss case also gets its CPU-time ratios to the floor (alternating pairs) and its
    step split into GEMMs, tile arithmetic and the rest, in a second table.

    Runs in a subprocess with cwd=tmp_path, so the repository's top-level ``kernels/`` folder is
    never importable as a bare ``kernels``.
    """
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "prefloss.commands.cli", "bench", "--seq-len", "24,40", "--batch", "2"]
    cmd += ["--hidden", "16", "--vocab", "203", "--repeats", "2", "--no-progress", "--json", str(out)]
    cmd += ["--plot", str(tmp_path / "plots"), "--cases", ",".join(CLI_CASES), "--device", "cpu"]
    cmd += ["--floor-parts", "--threads", "1"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # 1: the self-test case is wrong
    doc = json.loads(out.read_text())
    assert doc["machine"]["versions"]["torch"] == torch.__version__
    assert doc["machine"]["cpu"]
    assert doc["config"]["threads"] == 1 and doc["config"]["floor_parts"] is True
    assert doc["config"]["cases"] == [*CLI_CASES, "floor-frozen"]
    rows = doc["results"]
    assert [(r["shape"]["seq_len"], r["case"]) for r in rows] == [
        (t, c) for t in (24, 40) for c in doc["config"]["cases"]
    ]
    for r in rows:
        _assert_well_formed(r, repeats=2)
        if r["method"] == "prefloss-torch":
            assert r["tile_arithmetic"] == "eager"  # 40 rows x 203 columns: far below the threshold
            pairs, split = r["interleaved_floor"], r["floor_parts"]
            assert (
                len(pairs["cpu_ratios"]) == 2 and pairs["cpu_ratio_median"] > 0 and pairs["cpu_min_ratio"] > 0
            )
            assert split["threads"] == 1 and len(split["pairs"]) == 2
            assert set(split["parts_to_floor"]) == {"gemm", "tile_arithmetic", "other"}
            assert split["parts_to_floor"]["gemm"] > 0 and split["step_to_floor"] > 0
        else:
            assert "floor_parts" not in r
    assert "WRONG (not timed)" in proc.stdout
    assert "step against its floor, by part (--floor-parts):" in proc.stdout
    assert "torch threads: 1." in proc.stdout
    lines = proc.stdout.splitlines()
    status_column = next(line for line in lines if line.startswith("case ")).index("status")
    for name in ("prefloss-torch/dpo", "prefloss-torch-frozen/epsilon_dpo"):  # the longest name
        row = next(line for line in lines if line.startswith(name + " "))
        assert row[status_column:].startswith("ok, eager"), row
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "memory_vs_seq_len_batch2_hidden16_vocab203.png",
        "time_vs_seq_len_batch2_hidden16_vocab203.png",
    ]


SEARCH_PEAKS = {
    "affine": lambda t: 10e6 + 3000.0 * t,
    "fixed-heavy": lambda t: 200e6 + 500.0 * t,
    "step at 3000": lambda t: 50e6 + (200e6 if t > 3000 else 0) + 1000.0 * t,
    "oom above 700": lambda t: None if t > 700 else 1.0,
    "start too big": lambda t: 1e6 * t,
}


@pytest.mark.parametrize("name", list(SEARCH_PEAKS), ids=list(SEARCH_PEAKS))
def test_max_tokens_search_brackets_the_limit(name):
    """`max_tokens.search` over T (multiples of 32): the T it reports fits, the T it saw exceed does
    not, and the two are within the resolution; the true limit, found by scanning every multiple of
    32, lies between them. An affine peak is probed at most 1.05x past its limit and 4x its T in all."""
    from prefloss.benchmark.max_tokens import QUANTUM, search

    peak_at, budget = SEARCH_PEAKS[name], 256e6
    found = search(peak_at, budget, resolution=1 / 16)
    fits = lambda t: peak_at(t) is not None and peak_at(t) <= budget
    true = max(t for t in range(QUANTUM, 200_000, QUANTUM) if fits(t))
    assert found.fits <= true < found.exceeds
    assert found.fits == 0 or fits(found.fits)
    assert not fits(found.exceeds) and found.exceeds - found.fits <= max(QUANTUM, found.fits / 16)
    assert [t for t, _ in found.probes] == list(dict.fromkeys(t for t, _ in found.probes))  # none twice
    if name == "affine":
        assert max(t for t, _ in found.probes) <= 1.05 * true
        assert sum(t for t, _ in found.probes) <= 4 * true
    capped = search(lambda t: 1.0, budget, cap=5000)
    assert capped.capped and capped.fits == 4992
    with pytest.raises(ValueError, match="`budget` must be a positive number of bytes, got 0"):
        search(peak_at, 0)


# Step peaks (MiB) that `prefloss bench --max-tokens` measured at its default shape on 2026-12-07
# (docs/history/bench-max-tokens-2026-12-07.md), T: MiB. A chunked case's buffers fill up to
# T ~ 2000, then fade against ∂hidden's slope (flat, even falling, then affine).
MEASURED_PEAKS = {
    "prefloss-torch/dpo": "256:10.4 512:20.8 1632:49.0 2304:49.3 18432:34.5 77184:59.5 83424:62.9 "
    "85536:64.1 94752:68.9 147456:97.2",
    "prefloss-torch-frozen/dpo": "256:10.6 512:21.4 1568:50.0 2144:50.3 17152:41.1 47360:55.4 64192:63.1 "
    "65824:63.9 69824:66.1 137216:128.5",
    "torch-lce/dpo": "256:1.2 512:1.3 4096:3.9 32768:26.5 58880:48.6 65280:52.1 67584:69.5 82400:77.4",
}


@pytest.mark.parametrize("name", list(MEASURED_PEAKS), ids=list(MEASURED_PEAKS))
def test_max_tokens_search_aims_near_the_limit_on_measured_peaks(name):
    """On the measured peak curves (linear between the measured points, 64 MiB budget), the search
    brackets the limit, never probes more than 1.15x past it and probes at most 4.5x the limit's T
    in all (a probe's cost grows with T): the earlier rule, growing up to 8x on a line bent by chunk
    buffers, probed 1.2–2.1x past the limit and 4.7–6.2x in all."""
    from prefloss.benchmark.max_tokens import QUANTUM, search

    points = [(0, 0.0)] + [
        (int(t), float(m)) for t, m in (p.split(":") for p in MEASURED_PEAKS[name].split())
    ]
    segments = list(zip(points, points[1:], strict=False))

    def peak_at(t):  # the segment holding t; past the last point, the last segment extended
        (t0, p0), (t1, p1) = next((s for s in segments if t <= s[1][0]), segments[-1])
        return (p0 + (p1 - p0) * (t - t0) / (t1 - t0)) * 2**20

    budget = 64 * 2**20
    found = search(peak_at, budget)
    true = max(t for t in range(QUANTUM, 200_000, QUANTUM) if peak_at(t) <= budget)
    probed = [t for t, _ in found.probes]
    assert found.fits <= true < found.exceeds and found.exceeds - found.fits <= found.fits / 16
    assert max(probed) <= 1.15 * true, probed
    assert sum(probed) <= 4.5 * true, probed
    assert len(probed) <= 12, probed


def test_max_tokens_gpu_model_agrees_with_plan_step():
    """The GPU MODEL's figure (`plan_max_tokens`, extrapolated past ``direct_limit``) on a tiny
    head: `prefloss plan` itself puts the reported tokens within the budget and 1024 more over it;
    the budgets leave out the stated model states (18 B per parameter over 8 GPUs; 2 B for LoRA)."""
    from prefloss.benchmark.max_tokens import model_states_gib, plan_max_tokens
    from prefloss.commands.plan import plan_step

    tiny = {"name": "tiny", "params": 1e6, "hidden": 16, "vocab": 64}
    peak = lambda n: plan_step("dpo", tokens=n, hidden=16, vocab=64, dtype="bfloat16").peak_bytes
    budget_gib = (peak(8192) + 20_000 * 16 * 2) / 1024**3  # about 20k tokens past 8192
    row = plan_max_tokens("dpo", frozen_head=False, budget_gib=budget_gib, model=tiny, direct_limit=4096)
    assert row["MODEL"] and row["affine"] and row["method"].startswith("extrapolated")
    n = row["max_tokens"]
    assert n % 1024 == 0 and n > 8192
    assert peak(n) <= budget_gib * 1024**3 < peak(n + 1024)
    assert model_states_gib(8.03e9, frozen_head=False) == pytest.approx(18 * 8.03e9 / 8 / 1024**3)
    assert model_states_gib(8.03e9, frozen_head=True) == pytest.approx(2 * 8.03e9 / 1024**3)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--max-tokens", "--seq-len", "64"], "`--max-tokens` takes no `--seq-len` (T is what it searches)"),
        (["--max-tokens", "--quick"], "`--max-tokens` takes no `--quick` (it times nothing)"),
        (["--max-tokens", "--vocab", "64,128"], "`--vocab` takes one value, got [64, 128]"),
        (["--mem-budget-gib", "1"], "`--mem-budget-gib` goes with `--max-tokens`"),
        (["--jobs", "2"], "`--jobs` goes with `--max-tokens`"),
        (["--max-tokens", "--cases", "floor"], "`--max-tokens`: the selected cases have no loss step"),
    ],
    ids=["seq-len", "quick", "two-vocabs", "budget-alone", "jobs-alone", "no-loss"],
)
def test_max_tokens_refuses_what_it_cannot_use(capsys, argv, fragment):
    assert main(["bench", "--device", "cpu", *argv]) == 2
    assert fragment in capsys.readouterr().err


def test_max_tokens_parallel_plan(monkeypatch):
    """``--jobs``: one case process per core on CPU (``cores // jobs`` torch threads each unless
    given), never more than the cases; one on a GPU unless asked."""
    import os

    from prefloss.benchmark.max_tokens import parallel_plan

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)))
    assert parallel_plan("cpu", 8, None, None) == (4, 1)
    assert parallel_plan("cpu", 8, 2, None) == (2, 2)
    assert parallel_plan("cpu", 8, 2, 3) == (2, 3)
    assert parallel_plan("cpu", 3, None, None) == (3, 1)
    assert parallel_plan("cpu", 8, 1, None) == (1, None)
    assert parallel_plan("cuda", 8, None, None) == (1, None)
    assert parallel_plan("cuda", 8, 2, None) == (2, None)


def test_max_tokens_cli_tiny(tmp_path):
    """``--max-tokens`` end to end on a tiny head (authors-style ε-DPO and DPO, 10 MiB, two case
    processes at once): the largest T reported fits the budget in its own probe, the first T over
    it does not, within the resolution; the peak there holds at least the policy's full logits and
    their log-softmax (2·N·V floats); the rows come in the order asked; the JSON records the
    machine, the table and the plot are written."""
    out = tmp_path / "max.json"
    cmd = [sys.executable, "-m", "prefloss.commands.cli", "bench", "--max-tokens", "--mem-budget-gib", "0.01"]
    cmd += ["--batch", "1", "--hidden", "16", "--vocab", "203", "--cases", "authors/epsilon_dpo,authors/dpo"]
    cmd += ["--no-progress", "--json", str(out), "--plot", str(tmp_path), "--device", "cpu", "--threads", "1"]
    cmd += ["--no-gpu-model", "--jobs", "2"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    with open("/proc/cpuinfo") as f:  # the CPU's family and model, recorded with the results
        fields = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    cpu_id = doc["machine"]["cpu_id"]
    assert (cpu_id["family"], cpu_id["model"]) == (fields.get("cpu family"), fields.get("model"))
    if cpu_id["family"]:
        assert f"(family {cpu_id['family']}, model {cpu_id['model']})" in doc["machine"]["cpu"]
    assert [r["case"] for r in doc["results"]] == ["authors/epsilon_dpo", "authors/dpo"]
    assert (doc["config"]["jobs"], doc["config"]["threads"]) == (2, 1)
    assert "2 case process(es) at once, 1 torch thread(s) each" in proc.stdout
    budget_mib = 0.01 * 1024
    for row in doc["results"]:
        peaks = {p["seq_len"]: p["peak_mib"] for p in row["probes"]}
        t, over = row["max_seq_len"], row["first_over_seq_len"]
        assert row["status"] == "ok" and row["max_tokens"] == 2 * t and t % 32 == 0, row
        assert peaks[t] <= budget_mib and (peaks[over] is None or peaks[over] > budget_mib)
        assert over - t <= max(32, t / 16)
        assert peaks[t] * 1024**2 >= 2 * (2 * t) * 203 * 4
    eps, dpo = doc["results"]
    assert eps["max_seq_len"] < dpo["max_seq_len"]  # ε-DPO also forms the two logit mixtures
    assert "largest tokens per step within 0.01 GiB" in proc.stdout and "authors/dpo" in proc.stdout
    assert (tmp_path / "max_tokens.png").stat().st_size > 0
