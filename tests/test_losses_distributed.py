"""Batch-level state across data-parallel ranks: 2 CPU processes (gloo) vs 1 process on the merged batch.

Each rank holds B pairs as rows ``[chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]``; the
merged batch of 2B pairs is laid out the same way (all chosen, then all rejected), rank 0's pairs
first. With equal micro-batches, DDP averages the ranks' gradients, so:

* α-DPO: the running statistics after one update (μ, σ of the GATHERED M) equal those of one
  process on the merged batch, hence so do z, the per-pair losses, the mean of the per-rank losses
  and the average of the per-rank weight gradients; a rank's hidden-state gradient is ``world``
  times the merged gradient of its rows (its loss is a mean over B pairs, the merged one over 2B).
  A NaN in one rank's inputs makes the gathered M non-finite: every rank raises, state unchanged.
* ε-DPO: ``update_beta`` averages s over every pair on every rank, so β after the update equals
  the one-process β on the merged batch (bitwise: the step sums and counts are integers).

The ranks run as two subprocesses of a script written to ``tmp_path`` (``cwd=tmp_path``, so the
repository's top-level ``kernels/`` folder never lands on ``sys.path``), rendezvous through a
``file://`` init method there, and save their results for this process to compare. Float64 inputs
and modules, so the comparisons are tight.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

import prefloss
from prefloss import reference

WORLD = 2
PAIRS_PER_RANK = 3
T, H, V = 7, 6, 19
HP_ALPHA = dict(beta=2.0, gamma_beta_ratio=0.4, alpha=0.5)
HP_EPS = dict(beta=0.5, epsilon=0.1, compare_dtype=None)

WORKER = textwrap.dedent(
    """
    import sys

    import torch
    import torch.distributed as dist

    import prefloss

    rank, world, init_file, data_file, out_file = int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:6]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    data = torch.load(data_file)
    result = {}
    for name, module in (
        ("alpha_dpo", prefloss.AlphaDPOLoss(**data["hp_alpha"]).double()),
        ("epsilon_dpo", prefloss.EpsilonDPOLoss(**data["hp_eps"]).double()),
    ):
        hidden = data["hidden"][rank].clone().requires_grad_()
        weight = data["weight"].clone().requires_grad_()
        out = module(
            hidden, weight, data["labels"][rank],
            ref_hidden=data["ref_hidden"][rank], ref_weight=data["ref_weight"],
        )
        out.loss.backward()
        steps = out.metrics.get("kl/p_epsilon_steps", 0) - out.metrics.get("kl/n_epsilon_steps", 0)
        if name == "epsilon_dpo":
            module.update_beta()
        result[name] = {
            "mean_steps": steps,
            "loss": out.loss.detach(),
            "grad_hidden": hidden.grad,
            "grad_weight": weight.grad,
            "state": {k: v.clone() for k, v in module.state_dict().items()},
        }
    # One NaN in rank 1's reference hidden states: both ranks see it in the gathered M and refuse.
    module = prefloss.AlphaDPOLoss(**data["hp_alpha"]).double()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    ref_hidden = data["ref_hidden"][rank].clone()
    if rank == 1:
        ref_hidden[0, -1, 0] = float("nan")  # local pair 0, chosen, last token (counted)
    try:
        module(
            data["hidden"][rank], data["weight"], data["labels"][rank],
            ref_hidden=ref_hidden, ref_weight=data["ref_weight"],
        )
        result["non_finite"] = "no error"
    except ValueError as e:
        result["non_finite"] = str(e)
    result["non_finite_state_kept"] = all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
    dist.barrier()
    dist.destroy_process_group()
    torch.save(result, out_file)
    """
)


def make_data():
    """Merged batch of WORLD·B pairs (all chosen rows, then all rejected) and each rank's slice."""
    g = torch.Generator().manual_seed(106)  # rank step means −1/3 and 1, merged 1/3
    pairs = WORLD * PAIRS_PER_RANK
    hidden = torch.randn(2 * pairs, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5 * 2
    ref_hidden = hidden + 0.3 * torch.randn(hidden.shape, generator=g, dtype=torch.float64)
    ref_weight = weight + 0.2 * torch.randn(weight.shape, generator=g, dtype=torch.float64) / H**0.5
    labels = torch.randint(0, V, (2 * pairs, T), generator=g)
    prompt = torch.randint(1, 4, (pairs,), generator=g).repeat(2)
    labels[torch.arange(T)[None] < prompt[:, None]] = -100
    labels[-1, -2:] = -100  # some right padding

    def rank_rows(r):
        chosen = torch.arange(r * PAIRS_PER_RANK, (r + 1) * PAIRS_PER_RANK)
        return torch.cat([chosen, chosen + pairs])

    rows = [rank_rows(r) for r in range(WORLD)]
    merged = dict(hidden=hidden, weight=weight, labels=labels, ref_hidden=ref_hidden, ref_weight=ref_weight)
    per_rank = dict(
        hidden=[hidden[i] for i in rows],
        labels=[labels[i] for i in rows],
        ref_hidden=[ref_hidden[i] for i in rows],
        weight=weight,
        ref_weight=ref_weight,
        hp_alpha=HP_ALPHA,
        hp_eps=HP_EPS,
    )
    return merged, per_rank, rows


def run_ranks(tmp_path, per_rank):
    data_file = tmp_path / "data.pt"
    torch.save(per_rank, data_file)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(r),
                str(WORLD),
                str(tmp_path / "rendezvous"),
                str(data_file),
                str(tmp_path / f"rank{r}.pt"),
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(WORLD)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=60)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{log}"
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def run_merged(merged):
    """One process, merged batch, same modules: the expected values."""
    result = {}
    for name, module in (
        ("alpha_dpo", prefloss.AlphaDPOLoss(**HP_ALPHA).double()),
        ("epsilon_dpo", prefloss.EpsilonDPOLoss(**HP_EPS).double()),
    ):
        hidden = merged["hidden"].clone().requires_grad_()
        weight = merged["weight"].clone().requires_grad_()
        out = module(
            hidden, weight, merged["labels"], ref_hidden=merged["ref_hidden"], ref_weight=merged["ref_weight"]
        )
        out.loss.backward()
        steps = None
        if name == "epsilon_dpo":
            steps = out.metrics["kl/p_epsilon_steps"] - out.metrics["kl/n_epsilon_steps"]
            module.update_beta()
        result[name] = {
            "loss": out.loss.detach(),
            "grad_hidden": hidden.grad,
            "grad_weight": weight.grad,
            "state": dict(module.state_dict()),
            "mean_steps": steps,
        }
    return result


def close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14, msg=lambda m: f"{what}: {m}")


def test_two_ranks_match_one_process_on_merged_batch(tmp_path):
    merged, per_rank, rows = make_data()
    tok = reference.token_logprobs(
        merged["hidden"],
        merged["weight"],
        merged["labels"],
        ref_hidden=merged["ref_hidden"],
        ref_weight=merged["ref_weight"],
        epsilon=HP_EPS["epsilon"],
    )
    pol, minus, plus = (
        (x.sum(-1)[: len(x) // 2] - x.sum(-1)[len(x) // 2 :]) for x in (tok.policy, tok.minus, tok.plus)
    )
    assert float(torch.cat([minus - pol, pol - plus]).abs().min()) > 1e-6, "ε-DPO near-tie in the test data"
    ranks = run_ranks(tmp_path, per_rank)
    one = run_merged(merged)

    for name in ("alpha_dpo", "epsilon_dpo"):
        exp = one[name]
        loss = torch.stack([r[name]["loss"] for r in ranks]).mean()
        close(loss, exp["loss"], f"{name} mean of rank losses")
        grad_w = torch.stack([r[name]["grad_weight"] for r in ranks]).mean(0)
        close(grad_w, exp["grad_weight"], f"{name} DDP-averaged weight gradient")
        for r, idx in enumerate(rows):
            close(
                ranks[r][name]["grad_hidden"] / WORLD, exp["grad_hidden"][idx], f"{name} rank {r} hidden grad"
            )

    alpha = one["alpha_dpo"]["state"]
    assert float(alpha["running_std"]) > 0 and int(alpha["num_updates"]) == 1
    for r in ranks:
        state = r["alpha_dpo"]["state"]
        close(state["running_mean"], alpha["running_mean"], "α-DPO running mean")
        close(state["running_std"], alpha["running_std"], "α-DPO running std")
        assert int(state["num_updates"]) == 1

    eps = one["epsilon_dpo"]
    assert float(eps["mean_steps"]) != 0.0, "test data should give a non-zero mean step"
    # A rank-local update would give each rank its own β: the data must tell the two apart.
    assert float(ranks[0]["epsilon_dpo"]["mean_steps"]) != float(ranks[1]["epsilon_dpo"]["mean_steps"])
    assert float(eps["state"]["beta"]) != HP_EPS["beta"]
    for r in ranks:
        assert torch.equal(r["epsilon_dpo"]["state"]["beta"], eps["state"]["beta"])
        assert float(r["epsilon_dpo"]["state"]["step_count"]) == 0.0

    # a NaN on one rank: every rank refuses (the gathered M is the same), states unchanged
    for r in ranks:
        assert "margin statistics are non-finite" in r["non_finite"], r["non_finite"]
        assert f"1 of {WORLD * PAIRS_PER_RANK} gathered pairs" in r["non_finite"]
        assert r["non_finite_state_kept"]
    assert "On this rank: pair 0: reference chosen" in ranks[1]["non_finite"]
    assert "(on another rank's pairs)" in ranks[0]["non_finite"]
