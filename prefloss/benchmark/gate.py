"""``prefloss bench --seeds``: the correctness gate alone (no timing), over several input seeds.

The gate is the one a timed run applies to every case before timing it
(`prefloss.benchmark.worker.check_step` against `prefloss.benchmark.oracle.ground_truth`). Here it
runs in this process: per shape and seed, the float64 reference once, then each case on fresh
inputs. Per (shape, seed, case) the record keeps the largest ``max_abs_err / bound`` over everything
judged (loss, gradients, the op's tokens and per-row sums); a case passes when that is ≤ 1. The
summary keeps, per shape and case, the worst seed.
"""

from __future__ import annotations

import sys
import traceback

from prefloss.benchmark.cases import HYPERPARAMS, Case
from prefloss.benchmark.inputs import Shape, counted_tokens, make_inputs


def worst_part(check: dict) -> tuple[str | None, float | None]:
    """``(quantity, max_abs_err / bound)`` of the quantity of ``check`` (a `check_step` record)
    closest to its bound, or ``(None, None)`` when nothing was judged."""
    parts = {k: v for k, v in check.items() if isinstance(v, dict) and "bound" in v}
    if not parts:
        return None, None
    ratios = {k: v["max_abs_err"] / max(v["bound"], 1e-300) for k, v in parts.items()}
    worst = max(ratios, key=ratios.get)
    return worst, ratios[worst]


def _check_case(case: Case, shape: Shape, seed: int, device: str, truth) -> dict:
    from prefloss.benchmark.protocol import is_oom
    from prefloss.benchmark.worker import check_step

    try:
        x = make_inputs(shape, seed=seed, device=device)
        check = check_step(case, case.build(x), x, truth)
    except Exception as exc:  # reported; the other cases and seeds still run
        status = "oom" if is_oom(exc) else "error"
        out = {"status": status, "error": f"{type(exc).__name__}: {exc}"[:2000]}
        if status == "error":
            out["traceback"] = traceback.format_exc()[-4000:]
        return out
    worst, ratio = worst_part(check)
    return {"status": "ok" if check["passed"] else "wrong", "worst": worst, "ratio": ratio, "check": check}


def run(cases: list[Case], shapes: list[Shape], seeds: list[int], device: str, progress: bool) -> list[dict]:
    """One record per (shape, seed, case), in that order: ``status`` (``ok``, ``wrong``, ``error`` or
    ``oom``), ``worst`` and ``ratio`` (see `worst_part`) and the full ``check``."""
    from tqdm import tqdm

    from prefloss.benchmark.oracle import GroundTruth, ground_truth
    from prefloss.benchmark.worker import _to_cpu

    losses = sorted({c.loss for c in cases})
    bar = tqdm(
        total=len(shapes) * len(seeds) * len(cases),
        disable=not progress,
        unit="check",
        dynamic_ncols=True,
        file=sys.stderr,
    )
    records = []
    for shape in shapes:
        for seed in seeds:
            bar.set_description(f"{shape.label()} seed {seed}")
            x = make_inputs(shape, seed=seed, device=device)
            truth = ground_truth(
                {n: HYPERPARAMS[n] for n in losses},
                x.hidden,
                x.weight,
                x.labels,
                ref_hidden=x.ref_hidden,
                ref_weight=x.ref_weight,
            )
            truth = GroundTruth.from_state(_to_cpu(truth.to_state()))  # judged on CPU, as in a timed run
            del x
            for case in cases:
                result = _check_case(case, shape, seed, device, truth)
                records.append(
                    {
                        "shape": shape.to_dict(),
                        "counted_tokens": counted_tokens(shape),
                        "seed": seed,
                        "case": case.name,
                        "loss": case.loss,
                        **result,
                    }
                )
                bar.update(1)
            del truth
    bar.close()
    return records


def summary(records: list[dict]) -> list[dict]:
    """Per shape and case, in the records' order: the seeds checked, those that failed (wrong, error
    or OOM), and the worst ``ratio`` over the seeds with its seed and quantity."""
    rows: dict[tuple, dict] = {}
    for r in records:
        key = (tuple(sorted(r["shape"].items())), r["case"])
        row = rows.setdefault(
            key,
            {
                "shape": r["shape"],
                "counted_tokens": r["counted_tokens"],
                "case": r["case"],
                "seeds": [],
                "failed_seeds": [],
                "ratio": None,
                "seed": None,
                "worst": None,
                "errors": [],
            },
        )
        row["seeds"].append(r["seed"])
        if r["status"] != "ok":
            row["failed_seeds"].append(r["seed"])
        if r.get("error"):
            row["errors"].append(f"seed {r['seed']}: {r['status'].upper()} {r['error']}")
        if r.get("ratio") is not None and (row["ratio"] is None or r["ratio"] > row["ratio"]):
            row.update(ratio=r["ratio"], seed=r["seed"], worst=r["worst"])
    return list(rows.values())


def table(document: dict) -> str:
    """Plain-text table, one block per shape: per case, the worst error ÷ bound over the seeds."""
    from prefloss.benchmark.machine import one_line

    seeds = document["config"]["seeds"]
    lines = [
        f"machine: {one_line(document['machine'])}",
        f"correctness gate only (no timing), {len(seeds)} input seeds ({_seed_text(seeds)}): per case, "
        "the worst max_abs_err / bound over everything judged and every seed; a case passes at <= 1",
    ]
    rows = document["summary"]
    width = 2 + max(len("case"), *(len(r["case"]) for r in rows))
    head = f"{'case':<{width}}{'status':<22}{'worst err/bound':>16}{'seed':>12}  quantity"
    current = None
    for r in rows:
        s = r["shape"]
        if s != current:
            current = s
            lines += [
                "",
                f"B={s['batch']} T={s['seq_len']} H={s['hidden']} V={s['vocab']} {s['dtype']} "
                f"({r['counted_tokens']} counted tokens of {2 * s['batch'] * s['seq_len']})",
                head,
                "-" * len(head),
            ]
        n_failed = len(r["failed_seeds"])
        status = "ok" if not n_failed else f"FAILED {n_failed} of {len(r['seeds'])} seeds"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        seed = "-" if r["seed"] is None else str(r["seed"])
        lines.append(f"{r['case']:<{width}}{status:<22}{ratio:>16}{seed:>12}  {r['worst'] or '-'}")
        lines += [f"{'':<{width}}{e[:110]}" for e in r["errors"][:3]]
    checks = document["records"]
    passed = sum(c["status"] == "ok" for c in checks)
    lines += ["", f"{passed} of {len(checks)} checks (case x shape x seed) passed"]
    return "\n".join(lines)


def _seed_text(seeds: list[int]) -> str:
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ",".join(str(s) for s in seeds)
