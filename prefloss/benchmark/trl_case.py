"""The ``trl/dpo`` case: the DPO loss step of TRL 1.16's ``DPOTrainer``, on the bench's inputs.

TRL 1.16 trains DPO through a fused LM head (``trl.trainer.utils.add_fused_lm_head``): per-token
log-probs of the policy and the reference from ``trl.kernels.ChunkedLogProbFunction`` (vocabulary
tiles of 32768 columns over row chunks of 4096, logits never whole, the backward recomputing each
tile), summed per row, then ``−log σ(β·((π_w − ρ_w) − (π_l − ρ_l)))`` averaged over pairs. This case
calls that function the way the fused head does, with what ``DPOTrainer`` asks of it every step:
the policy also returns entropy, mean logit and top-1 flags (TRL's metrics), the reference only
log-probs. Where Triton runs (CUDA, XPU) only counted rows are projected; elsewhere, as on this
CPU, TRL scores every position and masks afterwards -- the bench reproduces that choice with TRL's
own test (``_use_triton``), since it is what a TRL user's step costs.

The bench's labels are already shifted (``labels[:, t]`` is predicted from ``hidden[:, t]``), i.e.
TRL's ``shift_labels`` path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from prefloss.benchmark.inputs import Inputs

# What DPOTrainer 1.16 requests from the policy's fused head (trl/trainer/dpo_trainer.py).
POLICY_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")


def _row_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, outputs: tuple[str, ...]):
    """``[2B]`` per-row log-prob sums from TRL's chunked function, as its fused LM head calls it."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.kernels.chunked_logprob import _use_triton
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    mask = labels != -100
    compact = _use_triton(hidden.device)
    if compact:
        rows, targets = hidden[mask], labels[mask]
    else:
        rows, targets = hidden.reshape(-1, hidden.shape[-1]), labels.clamp(min=0).reshape(-1)
    log_probs = ChunkedLogProbFunction.apply(
        rows, weight, None, targets, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, outputs
    )[0]
    if compact:
        per_token = log_probs.new_zeros(mask.shape).masked_scatter(mask, log_probs)
    else:
        per_token = log_probs.view(mask.shape).masked_fill(~mask, 0)
    return per_token.sum(-1)


def trl_dpo_step(beta: float) -> Callable[[Inputs], Callable[[], torch.Tensor]]:
    """Builder of the ``trl/dpo`` case's step (forward + backward, the loss returned)."""

    def build(x: Inputs) -> Callable[[], torch.Tensor]:
        import trl  # noqa: F401  (fails here, reported as the case's error, when TRL is missing)

        def step() -> torch.Tensor:
            policy = _row_logps(x.hidden, x.weight, x.labels, POLICY_OUTPUTS)
            with torch.no_grad():
                ref = _row_logps(x.ref_hidden, x.ref_weight, x.labels, ("log_probs",))
            pc, pr = policy.chunk(2)
            rc, rr = ref.chunk(2)
            loss = -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()
            loss.backward()
            return loss

        return step

    return build
