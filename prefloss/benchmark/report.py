"""The terminal table, the JSON document and the PNG plots of a benchmark run."""

from __future__ import annotations

import json
import os
import textwrap

from prefloss.benchmark.machine import one_line

COLORS = {
    "authors": "C0",
    "liger": "C1",
    "trl": "C4",
    "torch-lce": "C5",
    "prefloss-torch": "C2",
    "prefloss-triton": "C3",
    "floor": "k",
}
VARIABLE_AXES = (("seq_len", "sequence length T"), ("vocab", "vocabulary V"), ("batch", "pairs per batch B"))


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _status(r: dict) -> str:
    if r["status"] == "ok":
        return "ok"
    if r["status"] == "wrong":
        return "WRONG (not timed)"
    return r["status"].upper() if r["status"] != "skipped" else "skipped"


def table(document: dict) -> str:
    """Plain-text table, one block per shape."""
    lines = [f"machine: {one_line(document['machine'])}"]
    load = document["machine"].get("load_average_1_5_15min")
    if load:
        lines.append(f"load average at the start (1/5/15 min): {load} - other processes share these cores")
    cfg = document["config"]
    lines.append(
        f"step: forward+backward, {cfg['repeats']} timed repeats after 1 checked warm-up; "
        f"peak = {document['memory_method']}"
    )
    width = 2 + max([len("prefloss-triton/*")] + [len(r["case"]) for r in document["results"]])
    head = f"{'case':<{width}}{'status':<19}{'median s':>10}{'p10-p90 s':>17}{'cpu s':>8}"
    head += f"{'x floor':>9}{'x best':>8}{'peak MiB':>10}{'-grads':>8}{'mem x best':>11}"
    current = None
    for r in document["results"]:
        s = r["shape"]
        key = (s["batch"], s["seq_len"], s["hidden"], s["vocab"], s["dtype"])
        if key != current:
            current = key
            lines.append("")
            lines.append(
                f"B={s['batch']} T={s['seq_len']} H={s['hidden']} V={s['vocab']} {s['dtype']} "
                f"({r['counted_tokens']} counted tokens of {2 * s['batch'] * s['seq_len']})"
            )
            lines.append(head)
            lines.append("-" * len(head))
        if r["status"] == "skipped" and r["method"] == "prefloss-triton" and r.get("loss") != "alpha_dpo":
            continue  # one line for the skipped Triton cases is enough
        name = (
            "prefloss-triton/*"
            if r["status"] == "skipped" and r["method"] == "prefloss-triton"
            else r["case"]
        )
        if r["status"] != "ok":
            why = r.get("error") or (r.get("check") or {}).get("detail", "")
            lines.append(f"{name:<{width}}{_status(r):<19}  {why[:90]}")
            continue
        t = r["time_s"]
        ratios = r.get("ratios", {})
        spread = f"{t['p10']:.3f}-{t['p90']:.3f}"
        peak = r["peak_mib"]["max"]
        cpu = r.get("cpu_time_s")
        cpu_text = f"{cpu['median']:.2f}" if cpu else "-"
        status = "ok" + (f", {r['tile_arithmetic']}" if r.get("tile_arithmetic") else "")
        lines.append(
            f"{name:<{width}}{status:<19}{t['median']:>10.3f}{spread:>17}{cpu_text:>8}"
            f"{_fmt_ratio(ratios.get('time_to_floor')):>9}{_fmt_ratio(ratios.get('time_to_best_other')):>8}"
            f"{peak:>10.1f}{r.get('peak_beyond_grads_mib', peak):>8.1f}"
            f"{_fmt_ratio(ratios.get('memory_to_best_other')):>11}"
        )
    lines.append("")
    lines.append(
        "x floor: time / the 4 GEMMs over counted tokens (frozen-head cases: / the 3 of floor-frozen, "
        "no ∂W); for prefloss cases the median of step/floor "
        "ratios timed alternately in the case's own process, for the others median / median of separate "
        "processes. x best: / the fastest (memory: smallest) "
        "other method for the same loss. compiled/eager: how prefloss-torch's tile arithmetic ran "
        "(torch.compile, PREFLOSS_COMPILE). cpu s: process CPU time of the step (both threads), median. "
        "Peak MiB includes the gradients dh and dW themselves; -grads: peak minus their size."
    )
    parts = [r for r in document["results"] if r["status"] == "ok" and r.get("floor_parts")]
    if parts:
        lines += ["", *floor_parts_table(parts)]
    return "\n".join(lines)


def floor_parts_table(rows: list[dict]) -> list[str]:
    """``--floor-parts``: each prefloss case against its floor, timed alternately in the case's
    process, and the step split into its parts under ``torch.profiler``."""

    def ratio(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    width = 2 + max(len(r["case"]) for r in rows)
    shape_width = 2 + max(len(_shape_label(r["shape"])) for r in rows)
    head = (
        f"{'case':<{width}}{'shape':<{shape_width}}{'floor':<14}{'x cpu':>8}{'min/min':>9}{'x wall':>8}"
        f"{'profiled':>10}{'GEMMs':>8}{'tile':>8}{'other':>8}"
    )
    lines = ["step against its floor, by part (--floor-parts):", head, "-" * len(head)]
    for r in rows:
        pairs, split = r["interleaved_floor"], r["floor_parts"]
        p = split["parts_to_floor"]
        lines.append(
            f"{r['case']:<{width}}{_shape_label(r['shape']):<{shape_width}}{r['floor_case']:<14}"
            f"{ratio(pairs.get('cpu_ratio_median')):>8}{ratio(pairs.get('cpu_min_ratio')):>9}"
            f"{ratio(pairs['ratio_median']):>8}{ratio(split['step_to_floor']):>10}{ratio(p['gemm']):>8}"
            f"{ratio(p['tile_arithmetic']):>8}{ratio(p['other']):>8}"
        )
    threads = sorted({r["floor_parts"]["threads"] for r in rows})
    lines += [
        "",
        "x cpu / x wall: median of the per-pair ratios step / floor, by process CPU time / wall time, the "
        "two timed alternately in the case's process; min/min: fastest step's CPU time over fastest "
        "floor's. profiled: the same number of pairs under torch.profiler (self CPU time, its overhead "
        "included), the step split into its GEMMs (aten::mm/addmm), its compiled tile arithmetic "
        "(Inductor graphs; eager tile arithmetic counts as other) and the rest, each over the floor's "
        f"total in the same pair; medians. torch threads: {', '.join(str(t) for t in threads)}.",
    ]
    return lines


def _shape_label(shape: dict) -> str:
    return f"B={shape['batch']} T={shape['seq_len']} H={shape['hidden']} V={shape['vocab']}"


def write_json(document: dict, path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w") as f:
        json.dump(document, f, indent=2)


def _draw(ax, metric: str, method: str, pts: list) -> None:
    xs = [p[0] for p in pts]
    if metric == "peak_mib":
        ax.plot(xs, [p[1][metric]["max"] for p in pts], marker="o", label=method, color=COLORS.get(method))
        return
    ys = [p[1][metric]["median"] for p in pts]
    lo = [p[1][metric]["median"] - p[1][metric]["p10"] for p in pts]
    hi = [p[1][metric]["p90"] - p[1][metric]["median"] for p in pts]
    ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=method, color=COLORS.get(method))


def plot_title(what: str, machine: dict, panels: int) -> str:
    """``what`` and the whole machine line (versions included), wrapped to the figure's width."""
    return "\n".join(textwrap.wrap(f"{what} - {one_line(machine)}", width=40 * panels))


def write_plots(document: dict, directory: str) -> list[str]:
    """Memory and time against each swept axis (T, V or B), one panel per loss; returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    ok = [r for r in document["results"] if r["status"] == "ok" and r["method"] != "selftest"]
    written = []
    for axis, axis_label in VARIABLE_AXES:
        groups: dict[tuple, list[dict]] = {}
        for r in ok:
            fixed = tuple((k, v) for k, v in sorted(r["shape"].items()) if k != axis)
            groups.setdefault(fixed, []).append(r)
        for fixed, rows in groups.items():
            if len({r["shape"][axis] for r in rows}) < 2:
                continue
            suffix = "_".join(f"{k}{v}" for k, v in fixed if k != "dtype")
            for metric, ylabel, fname in (
                ("peak_mib", "peak extra memory of the step (MiB)", "memory"),
                ("time_s", "forward+backward time, median (s)", "time"),
            ):
                losses = sorted({r["loss"] for r in rows if r["loss"]})
                fig, axes = plt.subplots(1, len(losses), figsize=(4.2 * len(losses), 3.6), squeeze=False)
                for ax, loss in zip(axes[0], losses, strict=True):
                    cases = sorted({r["case"] for r in rows if r["loss"] == loss or r["method"] == "floor"})
                    for case in cases:
                        if metric == "peak_mib" and case.startswith("floor"):
                            continue  # the floor writes into preallocated buffers: no step memory
                        method = case.split("/")[0]
                        pts = sorted(
                            ((r["shape"][axis], r) for r in rows if r["case"] == case), key=lambda p: p[0]
                        )
                        _draw(ax, metric, method, pts)
                    ax.set_xscale("log", base=2)
                    ax.set_yscale("log")
                    ax.set_title(loss)
                    ax.set_xlabel(axis_label)
                    ax.grid(True, which="both", alpha=0.3)
                    ax.legend(fontsize=7)
                axes[0][0].set_ylabel(ylabel)
                fig.suptitle(
                    plot_title(f"{fname} vs {axis} ({suffix})", document["machine"], len(losses)), fontsize=8
                )
                fig.tight_layout()
                path = os.path.join(directory, f"{fname}_vs_{axis}_{suffix}.png")
                fig.savefig(path, dpi=110)
                plt.close(fig)
                written.append(path)
    return written
