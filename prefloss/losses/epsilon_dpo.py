"""ε-DPO (Lee et al., 2025, https://arxiv.org/abs/2502.13177): per-pair KL-penalty control by logit mixing.

For each pair, the policy's chosen-minus-rejected log-ratio of sequence SUMS is evaluated under
three logit rows (`prefloss.fused_logprobs` gives them in one pass)::

    ℓ⁻ under (1+ε) f − ε f_ref   (the policy trained with β⁻ = β/(1+ε))
    ℓ  under f
    ℓ⁺ under (1−ε) f + ε f_ref   (the policy trained with β⁺ = β/(1−ε))
    s = +1 if ℓ⁻ > ℓ > ℓ⁺,  −1 if ℓ⁺ > ℓ > ℓ⁻,  else 0      (strict; no gradient)
    β_i = β / (1 + ε·s_i);   ℓ_i = −log σ(β_i·[(π_w − ρ_w) − (π_l − ρ_l)])

and once per optimizer step ``β ← β / (1 + ε·mean(s))`` over every pair of that step on every
rank (`EpsilonDPOLoss.update_beta`). ε = 0 makes every s = 0: plain DPO.

The comparison: the authors' runs compared bf16 sums (transformers ≥ 4.45 stopped upcasting
logits), so most pairs tie (s = 0) early in training; ``compare_dtype=torch.bfloat16`` (default)
rounds the three sums and their differences to bf16 to reproduce that, ``compare_dtype=None``
compares the fp32 sums exactly. Deliberate differences (docs/losses.md): β is a buffer (saved in
``state_dict``), updated only in training mode; label smoothing works (the authors' sign bug is
not reproduced); the step mean is exact over all pairs even when micro-batches are uneven.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from prefloss.fused.op import check_number
from prefloss.losses.base import PairLoss, PairValues
from prefloss.losses.common import check_beta
from prefloss.losses.distributed import all_reduce_sum
from prefloss.losses.dpo import dpo_loss


class EpsilonDPOLosses(NamedTuple):
    """Per-pair outputs of `epsilon_dpo_loss`, each ``[B]``."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    steps: torch.Tensor  # s ∈ {−1, 0, +1}, int64
    betas: torch.Tensor  # β_i, fp32 (float64 for float64 inputs)


def _check_epsilon(epsilon) -> float:
    return check_number("epsilon", epsilon, gt=0, lt=1, tensors=True)


def epsilon_steps(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    minus_chosen: torch.Tensor,
    minus_rejected: torch.Tensor,
    plus_chosen: torch.Tensor,
    plus_rejected: torch.Tensor,
    *,
    compare_dtype: torch.dtype | None = torch.bfloat16,
) -> torch.Tensor:
    """The step direction ``s [B]`` (int64) from strict monotonicity of ℓ⁻, ℓ, ℓ⁺ (module docstring).

    With ``compare_dtype``, every sum and every difference is rounded to that dtype first.
    """

    def log_ratio(chosen, rejected):
        if compare_dtype is None:
            return chosen.detach() - rejected.detach()
        return chosen.detach().to(compare_dtype) - rejected.detach().to(compare_dtype)

    ell = log_ratio(policy_chosen, policy_rejected)
    ell_minus = log_ratio(minus_chosen, minus_rejected)
    ell_plus = log_ratio(plus_chosen, plus_rejected)
    up = (ell_minus > ell) & (ell > ell_plus)
    down = (ell_plus > ell) & (ell > ell_minus)
    return up.long() - down.long()


def epsilon_dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    minus_chosen: torch.Tensor,
    minus_rejected: torch.Tensor,
    plus_chosen: torch.Tensor,
    plus_rejected: torch.Tensor,
    *,
    beta: float | torch.Tensor,
    epsilon: float,
    compare_dtype: torch.dtype | None = torch.bfloat16,
    label_smoothing: float = 0.0,
) -> EpsilonDPOLosses:
    """Per-pair ε-DPO loss on sequence log-prob SUMS, each argument ``[B]``.

    ``minus_*`` are the sums under ``(1+ε) f − ε f_ref``, ``plus_*`` under ``(1−ε) f + ε f_ref``.
    Returns `EpsilonDPOLosses` with rewards ``β_i·(π − ρ)``.
    """
    steps = epsilon_steps(
        policy_chosen,
        policy_rejected,
        minus_chosen,
        minus_rejected,
        plus_chosen,
        plus_rejected,
        compare_dtype=compare_dtype,
    )
    # fp32, or float64 for float64 inputs (the oracle path must not round β_i to fp32)
    dtype = torch.promote_types(policy_chosen.dtype, torch.float32)
    beta_t = torch.as_tensor(beta, dtype=dtype, device=policy_chosen.device)
    betas = beta_t / (1.0 + epsilon * steps.to(dtype))
    out = dpo_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=betas, label_smoothing=label_smoothing
    )
    return EpsilonDPOLosses(out.losses, out.chosen_rewards, out.rejected_rewards, steps, betas.detach())


class EpsilonDPOLoss(PairLoss):
    """ε-DPO from hidden states of the policy and the reference (both are needed: it mixes logits):
    ``loss_fn(hidden, weight, labels, ref_hidden=..., ref_weight=...)`` (`PairLoss.forward`), with
    ``ref_hidden [2B, T, H_ref]``, ``ref_weight [V, H_ref]`` required (no precomputed ``ref_logps``).

    Args:
        beta: initial β > 0 (default 0.01, the published configs).
        epsilon: ε in (0, 1) (default 0.01).
        compare_dtype: dtype of the step comparison: ``torch.bfloat16`` (default, as the published
            runs) or ``None`` for an exact fp32 comparison.
        options: ``label_smoothing``, ``chunk_size``, ``backend``, as `PairLoss` takes them.

    Buffers: ``beta`` (fp32), and the step accumulators ``step_sum``, ``step_count`` (fp64) of
    the pairs seen in training mode since the last `update_beta`. A pair with a non-finite log-prob
    (NaN/inf in the hidden states) gets a NaN loss and is not counted in the step mean; ``meta``
    inputs with real buffers (shape tracing) leave the accumulators unchanged.
    """

    name = "epsilon_dpo"
    hyperparameters = ("beta", "epsilon")
    takes_ref_logps = False

    def __init__(
        self,
        beta: float = 0.01,
        epsilon: float = 0.01,
        *,
        compare_dtype: torch.dtype | None = torch.bfloat16,
        **options,
    ):
        super().__init__(**options)
        beta = check_beta(beta)
        if compare_dtype is not None and not (
            isinstance(compare_dtype, torch.dtype) and compare_dtype.is_floating_point
        ):
            raise TypeError(f"`compare_dtype` must be a floating torch.dtype or None, got {compare_dtype!r}.")
        self.epsilon = _check_epsilon(epsilon)
        self.compare_dtype = compare_dtype
        self.register_buffer("beta", torch.tensor(beta, dtype=torch.float32))
        self.register_buffer("step_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("step_count", torch.zeros((), dtype=torch.float64))

    def pair_losses(self, p: PairValues) -> tuple[EpsilonDPOLosses, dict[str, torch.Tensor]]:
        out = epsilon_dpo_loss(
            *p,
            beta=self.beta,
            epsilon=self.epsilon,
            compare_dtype=self.compare_dtype,
            label_smoothing=self.label_smoothing,
        )
        tracing = p.policy_chosen.device.type == "meta" and self.step_sum.device.type != "meta"
        if self.training and not tracing:
            with torch.no_grad():
                # A pair with a non-finite log-prob has a NaN loss and s = 0 (NaN compares false):
                # it is left out of β's step mean (no host sync). Meta inputs (shape tracing) with
                # real buffers leave the state unchanged.
                finite = torch.stack([torch.isfinite(x) for x in p]).all(0)
                self.step_sum += (out.steps * finite).sum().to(self.step_sum.dtype)
                self.step_count += finite.sum().to(self.step_count.dtype)
        steps = out.steps.float()
        metrics = {
            "kl/p_epsilon_steps": (steps > 0).float().mean(),
            "kl/n_epsilon_steps": (steps < 0).float().mean(),
            "kl/beta": self.beta.detach().clone(),
        }
        return out, metrics

    @torch.no_grad()
    def update_beta(self) -> dict[str, torch.Tensor]:
        """The global update ``β ← β / (1 + ε·mean(s))``, once per optimizer step.

        ``mean(s)`` is over every pair seen in training mode since the last call, on every rank
        (an all-reduce when torch.distributed is initialised, so call it on all ranks). With no
        pair seen, β is unchanged. Resets the accumulators.

        Returns:
            ``{"kl/beta": β before the update, "kl/avg_steps": mean(s)}`` (0-dim tensors).
        """
        total = all_reduce_sum(torch.stack([self.step_sum, self.step_count]))
        mean_steps = torch.where(total[1] > 0, total[0] / total[1].clamp(min=1), torch.zeros_like(total[0]))
        before = self.beta.detach().clone()
        self.beta.div_((1.0 + self.epsilon * mean_steps).to(self.beta.dtype))
        self.step_sum.zero_()
        self.step_count.zero_()
        return {"kl/beta": before, "kl/avg_steps": mean_steps.float()}
