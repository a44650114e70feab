"""The ``torch-lce/<loss>`` cases: DPO, SimPO and α-DPO on PyTorch's own chunked cross-entropy.

torch 2.13's ``torch.nn.functional.linear_cross_entropy(input, linear_weight, target, ...)`` with
``options=torch.nn.LinearCrossEntropyOptions()`` (its default chunking and accumulation policy)
computes ``cross_entropy(input @ linear_weightᵀ, target)`` in row chunks, never holding the whole
``[N, V]`` logits; with ``reduction="none"`` it returns each position's ``−log p(target)``, 0 at
``ignore_index``. A plain-PyTorch user gets the per-token log-probs of the policy and (under
``no_grad``) of the reference from two calls, and builds the loss on them
(`prefloss.benchmark.authors.loss_from_token_logps`: DPO on sums, SimPO and α-DPO on per-token
means). ε-DPO needs the log-probs of two logit mixtures ``(1 ± ε)·f ∓ ε·f_ref``, which this op
cannot give: no case.

As a user calls it: every position of ``hidden [2B, T, H]`` flattened to ``[2B·T, H]`` (prompt and
padding included; they are ignored through ``ignore_index=-100``), the labels flattened alike.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from prefloss.benchmark.inputs import Inputs

LOSSES = ("dpo", "simpo", "alpha_dpo")


def token_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[2B, T]`` per-token ``log p(labels)`` under ``hidden [2B, T, H] @ weight [V, H]ᵀ``, 0 where
    ``labels == -100``: minus ``F.linear_cross_entropy(..., reduction="none")`` with the default
    `torch.nn.LinearCrossEntropyOptions`."""
    nll = F.linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        labels.reshape(-1),
        reduction="none",
        ignore_index=-100,
        options=torch.nn.LinearCrossEntropyOptions(),
    )
    return -nll.view(labels.shape)


def torch_lce_step(loss: str, hp: dict[str, float]) -> Callable[[Inputs], Callable[[], torch.Tensor]]:
    """Builder of the ``torch-lce/<loss>`` case's step (forward + backward, the loss returned).

    Args:
        loss: one of `LOSSES`.
        hp: the loss's hyperparameters (``beta``, and ``gamma_beta_ratio`` / ``alpha`` where used).
    """
    from prefloss.benchmark.authors import loss_from_token_logps

    if loss not in LOSSES:
        raise ValueError(f"`loss` must be one of {LOSSES} (ε-DPO's mixtures are out of reach), got {loss!r}.")

    def build(x: Inputs) -> Callable[[], torch.Tensor]:
        maskf = (x.labels != -100).to(torch.float32)

        def step() -> torch.Tensor:
            policy = token_logps(x.hidden, x.weight, x.labels)
            ref = None
            if loss != "simpo":
                with torch.no_grad():
                    ref = token_logps(x.ref_hidden, x.ref_weight, x.labels)
            value = loss_from_token_logps(loss, policy, ref, maskf, **hp)
            value.backward()
            return value

        return step

    return build
