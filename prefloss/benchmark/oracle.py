"""The float64 ground truth for the benchmark's correctness gate, token-chunked.

`prefloss.reference.preference_loss` materialises float64 logits for all ``2B·T`` positions (and,
for ε-DPO, the two mixtures), which does not fit in memory at the sweep's larger shapes. This module
composes the same float64 pieces of `prefloss.reference` chunk by chunk instead:

1. per-token values from `prefloss.reference.token_logprobs` (float64, full-vocabulary softmax) on
   chunks of counted tokens (each token's value depends only on its own row of logits);
2. the loss from masked per-sequence sums with the per-pair loss functions of `prefloss.reference`
   (exactly as `preference_loss` composes them), differentiated w.r.t. the sequence values;
3. a second chunked pass through `token_logprobs` with autograd, back-propagating each token's
   upstream gradient to ``hidden`` and ``weight`` in float64.

``tests/test_bench_cli.py`` checks that this equals `preference_loss` and its autograd gradients.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from prefloss import reference

NORMALISED = {"alpha_dpo": True, "simpo": True, "dpo": False, "epsilon_dpo": False}


class Expected(NamedTuple):
    loss: torch.Tensor  # 0-dim float64
    grad_hidden: torch.Tensor  # [2B, T, H] float64
    grad_weight: torch.Tensor  # [V, H] float64


def _loss_from_sequences(name, seq, length, hp, momentum=0.9):
    """Mirror of `prefloss.reference.preference_loss` on per-sequence sums ``seq[kind] [2B]``."""
    b = length.shape[0] // 2

    def split(x):
        s = x / length.clamp(min=1) if NORMALISED[name] else x
        return s[:b], s[b:]

    pc, pr = split(seq["policy"])
    if name == "simpo":
        losses = reference.simpo_losses(pc, pr, **hp)
    elif name == "dpo":
        rc, rr = split(seq["ref"])
        losses = reference.dpo_losses(pc, pr, rc, rr, **hp)
    elif name == "alpha_dpo":
        rc, rr = split(seq["ref"])
        gap = ((pc - pr) - (rc - rr)).detach()
        mean = (1 - momentum) * float(gap.mean())
        std = (1 - momentum) * float(gap.std()) if gap.numel() > 1 else 0.0
        if not math.isfinite(std):
            std = 0.0
        losses = reference.alpha_dpo_losses(pc, pr, rc, rr, mean=mean, std=std, **hp)
    elif name == "epsilon_dpo":
        rc, rr = split(seq["ref"])
        mc, mr = split(seq["minus"])
        qc, qr = split(seq["plus"])
        steps = reference.epsilon_steps(pc.detach(), pr.detach(), mc, mr, qc, qr)
        losses = reference.epsilon_dpo_losses(pc, pr, rc, rr, steps, **hp)
    else:
        raise ValueError(f"unknown loss {name!r}")
    return losses.mean()


def expected_values(
    losses: dict[str, dict[str, float]],
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    ignore_index: int = -100,
    chunk_tokens: int = 512,
) -> dict[str, Expected]:
    """Float64 loss and gradients for each ``{name: hyperparameters}`` in ``losses``."""
    rows, seq_len, h = hidden.shape
    flat_h = hidden.detach().reshape(-1, h)
    flat_hr = ref_hidden.detach().reshape(-1, h)
    flat_y = labels.reshape(-1)
    idx = (flat_y != ignore_index).nonzero().squeeze(1)
    row_of = idx // seq_len
    length = torch.zeros(rows, dtype=torch.float64, device=hidden.device)
    length.index_add_(0, row_of, torch.ones_like(row_of, dtype=torch.float64))
    epsilons = {hp["epsilon"] for n, hp in losses.items() if n == "epsilon_dpo"}
    eps = epsilons.pop() if epsilons else None

    # Pass 1: per-token float64 values, summed per sequence.
    kinds = ("policy", "ref", "minus", "plus")
    seq = {k: torch.zeros(rows, dtype=torch.float64, device=hidden.device) for k in kinds}
    with torch.no_grad():
        for start in range(0, idx.numel(), chunk_tokens):
            sel = idx[start : start + chunk_tokens]
            tok = reference.token_logprobs(
                flat_h[sel], weight, flat_y[sel], ref_hidden=flat_hr[sel], ref_weight=ref_weight, epsilon=eps
            )
            for k in kinds:
                v = getattr(tok, k)
                if v is not None:
                    seq[k].index_add_(0, row_of[start : start + chunk_tokens], v)

    # Loss and its gradient w.r.t. the policy's per-sequence sums.
    token_grads, values = {}, {}
    for name, hp in losses.items():
        leaf = seq["policy"].clone().requires_grad_()
        loss = _loss_from_sequences(name, {**seq, "policy": leaf}, length, hp)
        (g_seq,) = torch.autograd.grad(loss, leaf)
        token_grads[name] = g_seq[row_of]
        values[name] = loss.detach()

    # Pass 2: back-propagate each token's upstream gradient through float64 full-vocabulary rows.
    w64 = weight.detach().double().requires_grad_()
    g_h = {n: torch.zeros(rows * seq_len, h, dtype=torch.float64, device=hidden.device) for n in losses}
    g_w = {n: torch.zeros_like(w64) for n in losses}
    for start in range(0, idx.numel(), chunk_tokens):
        sel = idx[start : start + chunk_tokens]
        h64 = flat_h[sel].double().requires_grad_()
        policy = reference.token_logprobs(h64, w64, flat_y[sel]).policy
        names = list(losses)
        for i, name in enumerate(names):
            gh, gw = torch.autograd.grad(
                policy,
                (h64, w64),
                grad_outputs=token_grads[name][start : start + chunk_tokens],
                retain_graph=i + 1 < len(names),
            )
            g_h[name][sel] += gh
            g_w[name] += gw
    return {n: Expected(values[n], g_h[n].reshape(rows, seq_len, h), g_w[n]) for n in losses}
