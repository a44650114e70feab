"""α-DPO (Wu et al., 2024, https://arxiv.org/abs/2410.10148): SimPO with an adaptive, standardised margin.

On length-normalised sequence log-probs π̄ (policy) and ρ̄ (reference), per pair::

    Δθ = π̄_w − π̄_l,   M = Δθ − (ρ̄_w − ρ̄_l)
    z  = (M − μ) / σ                       (0 where σ is 0 or undefined)
    ℓ  = −log σ(β·Δθ − sg[β·(r + α·z)])     r = gamma_beta_ratio

μ, σ are running statistics of M (``normalization="ema"``, the authors' code: an EMA with
momentum 0.9 from zero of each gathered batch's mean and unbiased std, updated before use, over
all data-parallel ranks) or the current gathered batch's (``"batch"``). α = 0 gives SimPO.
Deliberate differences from the authors' code (docs/losses.md): the statistics are buffers (saved in
``state_dict``), updated only in training mode; z = 0 where σ is 0 or undefined (the authors'
code gives NaN when policy == reference); a gathered batch of one pair leaves σ unchanged.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from prefloss.fused.op import check_number
from prefloss.losses.base import PairLoss, PairValues
from prefloss.losses.common import check_beta, check_gamma_beta_ratio, sigmoid_loss
from prefloss.losses.distributed import gather_values

NORMALIZATIONS = ("ema", "batch")


class AlphaDPOLosses(NamedTuple):
    """Per-pair outputs of `alpha_dpo_loss`, each ``[B]``."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margin: torch.Tensor  # r + α·z, in units of 1/β (the authors' "RATIO/ref_logratios")


def standardize(gap: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(gap − mean) / std``, 0 where ``std`` is 0, negative or not finite (no host sync)."""
    ok = torch.isfinite(std) & (std > 0)
    safe = torch.where(ok, std, torch.ones_like(std))
    return torch.where(ok, (gap - mean) / safe, torch.zeros_like(gap))


def alpha_dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    gamma_beta_ratio: float,
    alpha: float,
    mean: torch.Tensor | float,
    std: torch.Tensor | float,
    label_smoothing: float = 0.0,
) -> AlphaDPOLosses:
    """Per-pair α-DPO loss, given the statistics μ = ``mean``, σ = ``std`` to standardise M with.

    Args:
        policy_chosen, policy_rejected: ``[B]`` length-normalised policy log-probs (differentiable).
        ref_chosen, ref_rejected: ``[B]`` length-normalised reference log-probs.
        beta, gamma_beta_ratio, alpha: β, r, α of the module docstring.
        mean, std: μ, σ (already updated with this batch when training).

    Returns:
        `AlphaDPOLosses`; rewards ``β·((1−α)·π̄ + α·ρ̄)`` as the authors log them.
    """
    delta = policy_chosen - policy_rejected
    gap = (delta - (ref_chosen - ref_rejected)).detach()
    mean_t = torch.as_tensor(mean, dtype=gap.dtype, device=gap.device)
    std_t = torch.as_tensor(std, dtype=gap.dtype, device=gap.device)
    margin = (gamma_beta_ratio + alpha * standardize(gap, mean_t, std_t)).detach()
    losses = sigmoid_loss(beta * (delta - margin), label_smoothing)
    chosen_rewards = (beta * ((1 - alpha) * policy_chosen + alpha * ref_chosen)).detach()
    rejected_rewards = (beta * ((1 - alpha) * policy_rejected + alpha * ref_rejected)).detach()
    return AlphaDPOLosses(losses, chosen_rewards, rejected_rewards, margin)


def _non_finite_message(gathered: torch.Tensor, sequences) -> str:
    """Which of this rank's pairs and which log-probs make the batch's M non-finite."""
    bad = int((~torch.isfinite(gathered)).sum())
    names = ("policy chosen", "policy rejected", "reference chosen", "reference rejected")
    local = [
        f"pair {i}: {', '.join(n for n, x in zip(names, sequences, strict=True) if not torch.isfinite(x[i]))}"
        for i in range(sequences[0].shape[0])
        if not all(bool(torch.isfinite(x[i])) for x in sequences)
    ]
    where = f" On this rank: {'; '.join(local[:8])}." if local else " (on another rank's pairs)."
    return (
        f"AlphaDPOLoss: the batch's margin statistics are non-finite: M = (π̄_w − π̄_l) − (ρ̄_w − ρ̄_l) is "
        f"NaN or inf for {bad} of {gathered.numel()} gathered pairs, from non-finite policy or reference "
        f"log-probs (non-finite `hidden`, `weight`, `ref_hidden`, `ref_weight` or `ref_logps`).{where} "
        "Refused so that `running_mean` / `running_std` stay finite: the state is unchanged."
    )


class AlphaDPOLoss(PairLoss):
    """α-DPO from hidden states, with its running statistics as buffers: ``loss_fn(hidden, weight,
    labels, ref_hidden=..., ref_weight=...)`` (`PairLoss.forward`), the reference also as precomputed
    per-row sums ``ref_logps [2B]`` (normalised by each row's counted-token count).

    Args:
        beta: β > 0 (default 2.5; the published Llama-3-8B-Instruct config).
        gamma_beta_ratio: r (default 0.6).
        alpha: α ≥ 0 (default 0.2).
        momentum: EMA momentum of the statistics (default 0.9).
        normalization: ``"ema"`` (default, the authors') or ``"batch"`` (plain per-batch z-score).
        options: ``label_smoothing``, ``chunk_size``, ``backend``, as `PairLoss` takes them.

    Buffers: ``running_mean``, ``running_std`` (fp32, start at 0), ``num_updates`` (int64).

    Checked where the statistics are taken (training mode, or ``normalization="batch"``): a
    non-finite M in the gathered batch (NaN/inf policy or reference log-probs, e.g. a NaN in
    ``ref_hidden``) raises ``ValueError`` and leaves the buffers unchanged, rather than making them
    NaN for good (α-DPO would then silently be SimPO). This costs one host synchronisation per call.
    In eval mode with ``"ema"`` a non-finite input gives a NaN loss. On ``meta`` inputs with real
    buffers (shape tracing) the buffers are not updated.
    """

    name = "alpha_dpo"
    hyperparameters = ("beta", "gamma_beta_ratio", "alpha")
    length_normalised = True

    def __init__(
        self,
        beta: float = 2.5,
        gamma_beta_ratio: float = 0.6,
        alpha: float = 0.2,
        *,
        momentum: float = 0.9,
        normalization: str = "ema",
        **options,
    ):
        super().__init__(**options)
        self.beta = check_beta(beta)
        self.gamma_beta_ratio = check_gamma_beta_ratio(gamma_beta_ratio)
        self.alpha = check_number("alpha", alpha, ge=0, tensors=True)
        self.momentum = check_number("momentum", momentum, ge=0, lt=1, tensors=True)
        if not isinstance(normalization, str) or normalization not in NORMALIZATIONS:
            raise ValueError(f"`normalization` must be one of {NORMALIZATIONS}, got {normalization!r}.")
        self.normalization = normalization
        self.register_buffer("running_mean", torch.zeros((), dtype=torch.float32))
        self.register_buffer("running_std", torch.zeros((), dtype=torch.float32))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def _statistics(self, gap: torch.Tensor, sequences) -> tuple[torch.Tensor, torch.Tensor]:
        """μ, σ to standardise this batch's M with (updating the EMA first when training).

        ``sequences``: this rank's (π̄_w, π̄_l, ρ̄_w, ρ̄_l), to name the culprit of a non-finite M.
        """
        if self.normalization == "ema" and not self.training:
            return self.running_mean.clone(), self.running_std.clone()
        # float64 inputs keep float64 statistics (fp32 otherwise); buffers round to their own dtype.
        gathered = gather_values(gap.to(torch.promote_types(gap.dtype, torch.float32)))
        tracing = gathered.device.type == "meta"
        # One host sync per call (the statistics path only; SimPO, DPO and ε-DPO have none here):
        # a NaN/inf M would make the batch's μ and σ, and so the EMA, NaN for good. Every rank sees
        # the same gathered values, so every rank raises.
        if not tracing and not bool(torch.isfinite(gathered).all()):
            raise ValueError(_non_finite_message(gathered, sequences))
        batch_mean = gathered.mean()
        # A single gathered pair has no std: NaN here leaves the EMA's σ untouched and gives z = 0.
        batch_std = gathered.std() if gathered.numel() > 1 else torch.full_like(batch_mean, float("nan"))
        if self.normalization == "batch":
            return batch_mean, batch_std
        m = self.momentum
        if tracing and self.running_mean.device.type != "meta":
            # meta inputs, real buffers (shape tracing, e.g. `prefloss plan`): the values the update
            # would give, the state itself unchanged (a trace has no values to store).
            mean = self.running_mean.to(gathered.device) * m + (1 - m) * batch_mean
            std = self.running_std.to(gathered.device)
            if gathered.numel() > 1:
                std = std * m + (1 - m) * batch_std
            return mean.to(self.running_mean.dtype), std.to(self.running_std.dtype)
        self.running_mean.mul_(m).add_((1 - m) * batch_mean.to(self.running_mean.device))
        if gathered.numel() > 1:
            self.running_std.mul_(m).add_((1 - m) * batch_std.to(self.running_std.device))
        self.num_updates += 1
        return self.running_mean.clone(), self.running_std.clone()

    def pair_losses(self, p: PairValues) -> tuple[AlphaDPOLosses, dict[str, torch.Tensor]]:
        pc, pr, rc, rr = p.policy_chosen, p.policy_rejected, p.ref_chosen, p.ref_rejected
        gap = ((pc - pr) - (rc - rr)).detach()
        mean, std = self._statistics(gap, (pc, pr, rc, rr))
        out = alpha_dpo_loss(
            pc,
            pr,
            rc,
            rr,
            beta=self.beta,
            gamma_beta_ratio=self.gamma_beta_ratio,
            alpha=self.alpha,
            mean=mean,
            std=std,
            label_smoothing=self.label_smoothing,
        )
        margin = out.margin.float()
        metrics = {
            "logps/ref_chosen": rc.detach().mean(),
            "logps/ref_rejected": rr.detach().mean(),
            "RATIO/ref_logratios": margin.mean(),
            "RATIO/MIN_ref_logratios": margin.min(),
            "RATIO/MAX_ref_logratios": margin.max(),
            "RATIO/var_ref_logratios": margin.var() if margin.numel() > 1 else torch.zeros_like(margin[0]),
            "alpha/running_mean": mean.float(),
            "alpha/running_std": std.float(),
        }
        return out, metrics
