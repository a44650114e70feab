"""One-command GPU validation of prefloss (``scripts/gpu_check.sh``). NEVER RUN ON A GPU YET.

On a bare H100/H200 machine with this checkout and a CUDA build of PyTorch (the image's own
``python3``; nothing is downloaded when the machine has no network), in under 8 minutes. The same
script, unchanged, on an AMD Instinct machine (MI300X, MI325X, MI250X) with a ROCm build of PyTorch
and the Triton it pins: it calls no ``nvidia-smi`` or other vendor tool, only ``torch.cuda`` (which
a ROCm build serves through HIP), pytest and ``prefloss``; the GPU's name picks the model to compare
with (`gpu_key`), and the JSON records ``torch.version.hip``. Never run on ROCm either; there it
would be the first run of the kernels and of the ``out_dtype`` GEMMs (``tests/test_ops_custom.py``)
on an AMD GPU. Steps:

1. install: this checkout (``pip install --no-deps --no-build-isolation -e .``) and, when missing,
   liger-kernel (from ``wheels/`` beside the checkout if present, else from the index);
2. tests on the GPU: ``tests/test_ops_custom.py`` (custom ops, the vocabulary-tiled backward with
   ``out_dtype`` GEMMs vs float64, torch.compile) and ``tests/test_plan.py``;
3. ``prefloss check --quick --no-compile`` (kernel cases vs the float64 reference, on CUDA);
4. ``prefloss bench`` at Llama-3-8B shapes (2 pairs × 2048 positions = 8192 tokens, H=4096,
   V=128256, bf16): the four ``prefloss-triton`` losses, ``liger/dpo`` and the ``floor``;
5. the measured time and peak memory of each prefloss case against `prefloss.commands.plan`'s model at the
   bench's counted tokens, on the GPU it finds.

Everything goes into one JSON (``--json``, default ``$OUT/gpu_check.json`` or
``./gpu_check.json``), written even when a step fails; the exit code is 0 only if every step passed.
``--dry-run`` checks this script's logic on a CPU: tiny shapes, Triton's interpreter, the torch
backend's cases in place of the triton ones (its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 480.0  # the whole run, 8 minutes
LLAMA3_8B = {"batch": 2, "seq_len": 2048, "hidden": 4096, "vocab": 128256, "dtype": "bfloat16"}
DRY = {"batch": 2, "seq_len": 64, "hidden": 32, "vocab": 512, "dtype": "bfloat16"}
LOSSES = ("alpha_dpo", "epsilon_dpo", "dpo", "simpo")


class Runner:
    """Runs each step with a timeout cut to what is left of the budget, and records it."""

    def __init__(self, budget_s: float, env: dict, log_dir: Path):
        self.start = time.monotonic()
        self.budget_s = budget_s
        self.env = env
        self.log_dir = log_dir
        self.steps: dict[str, dict] = {}

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def run(self, name: str, cmd: list[str], timeout_s: float, min_s: float = 10.0) -> dict:
        limit = min(timeout_s, self.left())
        if limit < min_s:
            rec = {
                "status": "skipped",
                "why": f"{self.left():.0f} s left of the {self.budget_s:.0f} s budget",
            }
            self.steps[name] = rec
            return rec
        t0 = time.monotonic()
        print(f"[gpu_check] {name}: {shlex.join(cmd)} (timeout {limit:.0f} s)", flush=True)
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=limit, check=False
            )
            rc, out, err = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc = None
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        (self.log_dir / f"{name}.log").write_text(f"$ {shlex.join(cmd)}\n{out}\n--- stderr ---\n{err}")
        rec = {
            "status": "passed" if rc == 0 else ("timeout" if rc is None else "failed"),
            "returncode": rc,
            "seconds": round(time.monotonic() - t0, 1),
            "command": shlex.join(cmd),
            "output_tail": (out + err)[-3000:],
        }
        self.steps[name] = rec
        print(f"[gpu_check] {name}: {rec['status']} in {rec['seconds']} s", flush=True)
        return rec


def _machine(py: str, env: dict) -> dict:
    code = (
        "import json, torch, triton; c = torch.cuda.is_available();"
        "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda,"
        "'hip': getattr(torch.version, 'hip', None),"
        "'triton': triton.__version__,"
        "'cuda_available': c, 'gpu': torch.cuda.get_device_name() if c else None,"
        "'gpu_memory_gib': torch.cuda.get_device_properties(0).total_memory / 2**30 if c else None}))"
    )
    proc = subprocess.run([py, "-c", code], env=env, capture_output=True, text=True, check=False)
    info = json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stderr[-2000:]}
    info.update(python=platform.python_version(), host=platform.node(), executable=py)
    return info


def gpu_key(name: str | None) -> str | None:
    """`prefloss.commands.plan.GPUS` key for a device name (``None`` if it is none of them).

    ROCm names the device as AMD does (``"AMD Instinct MI300X"``); an MI250X's two GCDs are two
    devices, each the model's ``mi250x``.
    """
    low = (name or "").lower()
    for key in ("h200", "h100", "a100", "mi325x", "mi300x", "mi250x"):
        if key in low:
            return key
    return None


def _install(runner: Runner, py: str, dry_run: bool) -> bool:
    """Install the checkout (and liger-kernel when missing); whether liger-kernel can be imported."""
    pip = [py, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet"]
    if dry_run:  # the checkout is installed already where the dry run is tried
        runner.steps["install"] = {"status": "skipped", "why": "dry run"}
    else:
        runner.run("install", [*pip, "-e", "."], 60, min_s=5)
    has_liger = (
        subprocess.run([py, "-c", "import liger_kernel"], env=runner.env, capture_output=True).returncode == 0
    )
    if has_liger or dry_run:
        runner.steps["install_liger"] = {"status": "skipped", "why": "present" if has_liger else "dry run"}
        return has_liger
    wheels = ROOT / "wheels"
    source = ["--no-index", "--find-links", str(wheels)] if wheels.is_dir() else []
    rec = runner.run("install_liger", [*pip, *source, "liger-kernel"], 60, min_s=5)
    if rec["status"] != "passed":
        # Not a failure of prefloss: the bench runs without the liger/dpo case and says so.
        rec["status"] = "skipped"
        rec["why"] = "liger-kernel could not be installed (no network and no ./wheels/): liger/dpo not run"
        return False
    return True


def _compare(bench: dict, plan_gpu: str | None, dry_run: bool) -> dict:
    """Measured (bench) against modelled (plan) for each prefloss case, and the floor."""
    from prefloss.commands.plan import plan_step

    rows = bench.get("results", bench if isinstance(bench, list) else [])
    out = {"gpu_model": plan_gpu, "cases": []}
    floor = next((r for r in rows if r.get("case") == "floor" and r.get("status") == "ok"), None)
    method = "prefloss-torch" if dry_run else "prefloss-triton"
    for r in rows:
        if r.get("method") != method:
            continue
        entry = {"case": r.get("case"), "status": r.get("status"), "counted_tokens": r.get("counted_tokens")}
        if r.get("status") == "ok" and plan_gpu is not None:
            shape = r["shape"]
            tokens = int(r["counted_tokens"]) // 2 * 2
            plan = plan_step(
                r["loss"],
                tokens=tokens,
                hidden=shape["hidden"],
                vocab=shape["vocab"],
                dtype=shape.get("dtype", "bfloat16"),
                gpu=plan_gpu,
            )
            measured_s = r["time_s"]["median"]
            entry.update(
                measured_ms=measured_s * 1e3,
                modelled_ms=plan.step_time_s * 1e3,
                measured_over_model=measured_s / plan.step_time_s,
                measured_effective_tflops=plan.floor_flops / measured_s / 1e12,
                modelled_effective_tflops=plan.effective_tflops,
                measured_peak_mib=r["peak_mib"]["median"],
                modelled_peak_mib=plan.peak_bytes / 2**20,
                floor_ratio_measured=(r.get("interleaved_floor") or {}).get("ratio_median"),
                floor_ratio_modelled=plan.step_time_s / plan.floor_time_s,
            )
        out["cases"].append(entry)
    if floor is not None:
        out["floor_measured_ms"] = floor["time_s"]["median"] * 1e3
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_json = Path(os.environ.get("OUT", ".")) / "gpu_check.json"
    p.add_argument("--json", type=Path, default=default_json, help=f"output (default {default_json})")
    p.add_argument("--dry-run", action="store_true", help="check the logic on CPU: tiny shapes, interpreter")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help="whole-run budget (default 480)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per bench case (default 5)")
    args = p.parse_args(argv)

    py = sys.executable
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("PYTHONUNBUFFERED", "1")
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
    log_dir = args.json.parent / "gpu_check_logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    runner = Runner(args.budget_s, env, log_dir)
    report: dict = {
        "what": "prefloss GPU check: tests, check, bench at Llama-3-8B shapes vs prefloss plan (a MODEL)",
        "dry_run": args.dry_run,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    machine = _machine(py, env)
    report["machine"] = machine
    if not args.dry_run and not machine.get("cuda_available"):
        report["error"] = (
            "no GPU visible to this python's torch: run with a CUDA or ROCm build of PyTorch "
            "(PYTHON=/path/to/python3 scripts/gpu_check.sh), or --dry-run on a CPU"
        )
        args.json.write_text(json.dumps(report, indent=1))
        print(f"[gpu_check] {report['error']}", file=sys.stderr)
        return 2

    has_liger = _install(runner, py, args.dry_run)
    # The compile report (tests/test_kernels_compile.py) needs no GPU and runs in CI: not here.
    tests = ["tests/test_ops_custom.py", "tests/test_plan.py"]
    # torch.compile of the whole step (cold Inductor cache: minutes) is left to CI's CPU run.
    tests += ["-k", "not compiled_step"]
    if args.dry_run:
        tests = ["tests/test_plan.py", "-k", "cli"]
    runner.run("tests", [py, "-m", "pytest", *tests, "-q", "-p", "no:cacheprovider"], 120)
    check_json = log_dir / "check.json"
    check_cmd = [
        py,
        "-m",
        "prefloss.commands.cli",
        "check",
        "--quick",
        "--no-compile",
        "--json",
        str(check_json),
    ]
    if args.dry_run:
        check_cmd += ["--cases", "odd-V", "--dtypes", "fp32"]
    runner.run("check", check_cmd, 90)

    shape = DRY if args.dry_run else LLAMA3_8B
    bench_json = log_dir / "bench.json"
    cases = (
        "prefloss-torch/dpo,prefloss-torch/epsilon_dpo,floor"
        if args.dry_run
        else ("prefloss-triton/*,liger/dpo,floor" if has_liger else "prefloss-triton/*,floor")
    )
    bench_cmd = [
        py, "-m", "prefloss.commands.cli", "bench",
        "--batch", str(shape["batch"]), "--seq-len", str(shape["seq_len"]),
        "--hidden", str(shape["hidden"]), "--vocab", str(shape["vocab"]), "--dtype", shape["dtype"],
        "--cases", cases, "--repeats", str(args.repeats), "--json", str(bench_json), "--no-progress",
        "--device", "cpu" if args.dry_run else "cuda",
    ]  # fmt: skip
    runner.run("bench", bench_cmd, 270, min_s=60)
    report["bench_shape"] = shape
    for name, path in (("check", check_json), ("bench", bench_json)):
        if path.exists():
            try:
                report[f"{name}_results"] = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                report[f"{name}_results"] = {"error": f"unreadable JSON: {exc}"}
    if isinstance(report.get("bench_results"), (dict, list)):
        plan_gpu = "h100" if args.dry_run else gpu_key(machine.get("gpu"))
        try:
            report["model_vs_measured"] = _compare(report["bench_results"], plan_gpu, args.dry_run)
        except Exception as exc:  # the report must still be written
            report["model_vs_measured"] = {"error": f"{type(exc).__name__}: {exc}"}
    report["steps"] = runner.steps
    report["seconds"] = round(time.monotonic() - runner.start, 1)
    ok = all(s["status"] in ("passed", "skipped") for s in runner.steps.values()) and not any(
        s["status"] == "skipped" and "budget" in s.get("why", "") for s in runner.steps.values()
    )
    report["passed"] = ok
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1, default=str))
    for entry in (report.get("model_vs_measured") or {}).get("cases", []):
        if "measured_ms" in entry:
            print(
                f"[gpu_check] {entry['case']}: measured {entry['measured_ms']:.1f} ms, "
                f"MODEL {entry['modelled_ms']:.1f} ms; peak {entry['measured_peak_mib']:.0f} MiB measured, "
                f"{entry['modelled_peak_mib']:.0f} MiB MODEL"
            )
    print(f"[gpu_check] {'passed' if ok else 'FAILED'} in {report['seconds']} s; wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
