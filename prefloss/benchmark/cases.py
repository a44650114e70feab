"""The benchmark's cases: every way of computing a preference loss's forward + backward.

A case builds, from the shared `Inputs`, a ``step()`` that runs forward and backward once
(gradients land in ``inputs.hidden.grad`` / ``inputs.weight.grad``) and returns the loss. Cases
built on `prefloss.fused_logprobs` also give ``tokens(inputs)``, the op's per-token outputs for the
loss, which the correctness gate judges too.

Methods:
- ``prefloss-torch`` / ``prefloss-triton``: ``prefloss.<Loss>(..., backend=...)`` (Triton only on a GPU).
- ``authors``: full logits of policy and reference (`prefloss.benchmark.authors`).
- ``liger``: Liger-Kernel's chunked fused-linear DPO / SimPO, eager (``compiled=False``).
- ``trl``: TRL 1.16 ``DPOTrainer``'s DPO step through its chunked LM head (`prefloss.benchmark.trl_case`).
- ``torch-lce``: DPO, SimPO and α-DPO on torch 2.13's ``F.linear_cross_entropy`` with its default
  options, the losses in plain PyTorch (`prefloss.benchmark.torch_lce_case`).
- ``floor``: the four GEMMs of ``N_counted·H·V`` any exact method needs; no loss.
- ``prefloss-torch-frozen/<loss>`` (method ``prefloss-torch``): the same loss with the LM head frozen
  (``weight.requires_grad = False``, as under LoRA): only ``∂hidden``; judged and timed against
  ``floor-frozen``, the three GEMMs (no ``∂W``) a frozen head needs.
- ``selftest``: a deliberately wrong DPO (labels off by one position) proving that the
  correctness gate rejects a wrong case; only run when named explicitly.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

import torch

from prefloss.benchmark.inputs import Inputs
from prefloss.benchmark.torch_lce_case import LOSSES as TORCH_LCE_LOSSES
from prefloss.benchmark.torch_lce_case import torch_lce_step
from prefloss.benchmark.trl_case import trl_dpo_step
from prefloss.fused.op import TokenLogProbs
from prefloss.losses import LOSSES

LOSS_NAMES = tuple(LOSSES)

# The loss modules' defaults (the published configs); the float64 reference uses the same.
HYPERPARAMS: dict[str, dict[str, float]] = {name: dict(cls.defaults) for name, cls in LOSSES.items()}

Step = Callable[[], "torch.Tensor | None"]
Tokens = Callable[[Inputs], TokenLogProbs]


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    loss: str | None  # None: not a loss (the floor)
    build: Callable[[Inputs], Step]
    needs_gpu: bool = False
    explicit_only: bool = False  # not part of the default selection
    note: str = ""
    tokens: Tokens | None = None  # the op's per-token outputs, for cases built on it
    frozen_head: bool = False  # the LM head takes no gradient (only ∂hidden is judged)
    floor: str = "floor"  # the floor case this one is timed against


def _prefloss_step(loss: str, backend: str, frozen_head: bool = False) -> Callable[[Inputs], Step]:
    def build(x: Inputs) -> Step:
        import prefloss

        if frozen_head:
            x.weight.requires_grad_(False)

        cls = LOSSES[loss]
        kwargs = dict(HYPERPARAMS[loss], backend=backend)
        if loss == "epsilon_dpo":
            kwargs["compare_dtype"] = None  # exact comparison, as the float64 reference
        module = cls(**kwargs)
        del prefloss
        ref = {"ref_hidden": x.ref_hidden, "ref_weight": x.ref_weight} if cls.needs_reference else {}

        def step():
            out = module(x.hidden, x.weight, x.labels, **ref)
            out.loss.backward()
            return out.loss

        return step

    return build


def _prefloss_tokens(loss: str, backend: str, shift: int = 0) -> Tokens:
    """`prefloss.fused_logprobs` with what ``loss`` reads (labels rolled by ``shift`` positions)."""

    def tokens(x: Inputs):
        import prefloss

        labels = torch.roll(x.labels, shifts=shift, dims=1) if shift else x.labels
        ref = {} if loss == "simpo" else {"ref_hidden": x.ref_hidden, "ref_weight": x.ref_weight}
        eps = HYPERPARAMS[loss]["epsilon"] if loss == "epsilon_dpo" else None
        with torch.no_grad():
            return prefloss.fused_logprobs(
                x.hidden.detach(), x.weight.detach(), labels, **ref, epsilon=eps, backend=backend
            )

    return tokens


def _authors_step(loss: str) -> Callable[[Inputs], Step]:
    def build(x: Inputs) -> Step:
        from prefloss.benchmark.authors import authors_loss

        def step():
            value = authors_loss(
                loss,
                x.hidden,
                x.weight,
                x.labels,
                ref_hidden=x.ref_hidden,
                ref_weight=x.ref_weight,
                **HYPERPARAMS[loss],
            )
            value.backward()
            return value

        return step

    return build


def _liger_step(loss: str) -> Callable[[Inputs], Step]:
    def build(x: Inputs) -> Step:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss, LigerFusedLinearSimPOLoss

        hp = HYPERPARAMS[loss]
        if loss == "dpo":
            # Sums of log-probs (average_log_prob=False), no NLL term: the standard DPO we compute.
            module = LigerFusedLinearDPOLoss(
                beta=hp["beta"], compiled=False, average_log_prob=False, compute_nll_loss=False
            )

            def forward():
                return module(x.weight, x.hidden, x.labels, ref_input=x.ref_hidden, ref_weight=x.ref_weight)
        else:
            # Liger's SimPO margin is an absolute γ (our β·gamma_beta_ratio); it length-normalises
            # by default and adds an NLL term unless told not to.
            module = LigerFusedLinearSimPOLoss(
                beta=hp["beta"],
                gamma=hp["beta"] * hp["gamma_beta_ratio"],
                compiled=False,
                compute_nll_loss=False,
            )

            def forward():
                return module(x.weight, x.hidden, x.labels)

        def step():
            value = forward()[0]
            value.backward()
            return value

        return step

    return build


def _floor_step(x: Inputs, frozen_head: bool = False) -> Step:
    """Policy forward, reference forward, ∂h = G·W, ∂W = Gᵀ·h (not with ``frozen_head``) over
    counted tokens, into fixed buffers."""
    h = x.hidden.detach().reshape(-1, x.hidden.shape[-1])
    hr = x.ref_hidden.reshape(-1, h.shape[1])
    keep = (x.labels.reshape(-1) != -100).nonzero().squeeze(1)
    h, hr = h[keep].contiguous(), hr[keep].contiguous()
    w, wr = x.weight.detach(), x.ref_weight
    n, v = h.shape[0], w.shape[0]
    logits = torch.empty(n, v, dtype=h.dtype, device=h.device)
    ref_logits = torch.empty_like(logits)
    grad_logits = torch.randn(n, v, dtype=h.dtype, device=h.device) * 1e-3
    grad_h = torch.empty_like(h)
    grad_w = torch.empty_like(w)

    def step():
        torch.mm(h, w.T, out=logits)
        torch.mm(hr, wr.T, out=ref_logits)
        torch.mm(grad_logits, w, out=grad_h)
        if not frozen_head:
            torch.mm(grad_logits.T, h, out=grad_w)
        return None

    return step


def _wrong_step(x: Inputs) -> Step:
    """prefloss DPO scored on labels shifted by one position: a plausible, wrong alignment."""
    import prefloss

    module = prefloss.DPOLoss(**HYPERPARAMS["dpo"], backend="torch")
    shifted = torch.roll(x.labels, shifts=1, dims=1)

    def step():
        out = module(x.hidden, x.weight, shifted, ref_hidden=x.ref_hidden, ref_weight=x.ref_weight)
        out.loss.backward()
        return out.loss

    return step


def _registry() -> dict[str, Case]:
    cases: list[Case] = []
    for loss in LOSS_NAMES:
        for backend in ("torch", "triton"):
            cases.append(
                Case(
                    f"prefloss-{backend}/{loss}",
                    f"prefloss-{backend}",
                    loss,
                    _prefloss_step(loss, backend),
                    needs_gpu=backend == "triton",
                    tokens=_prefloss_tokens(loss, backend),
                )
            )
        cases.append(Case(f"authors/{loss}", "authors", loss, _authors_step(loss)))
    for loss in ("epsilon_dpo", "dpo"):
        cases.append(
            Case(
                f"prefloss-torch-frozen/{loss}",
                "prefloss-torch",
                loss,
                _prefloss_step(loss, "torch", frozen_head=True),
                tokens=_prefloss_tokens(loss, "torch"),
                frozen_head=True,
                floor="floor-frozen",
                note="frozen head",
            )
        )
    for loss in ("dpo", "simpo"):
        cases.append(Case(f"liger/{loss}", "liger", loss, _liger_step(loss), note="compiled=False"))
    cases.append(
        Case("trl/dpo", "trl", "dpo", trl_dpo_step(HYPERPARAMS["dpo"]["beta"]), note="TRL 1.16 chunked head")
    )
    for loss in TORCH_LCE_LOSSES:
        cases.append(
            Case(
                f"torch-lce/{loss}",
                "torch-lce",
                loss,
                torch_lce_step(loss, HYPERPARAMS[loss]),
                note="F.linear_cross_entropy, default options",
            )
        )
    cases.append(Case("floor", "floor", None, _floor_step, note="4 GEMMs of N_counted·H·V"))
    cases.append(
        Case(
            "floor-frozen",
            "floor",
            None,
            lambda x: _floor_step(x, frozen_head=True),
            note="3 GEMMs of N_counted·H·V (frozen head)",
        )
    )
    cases.append(
        Case(
            "selftest/wrong_dpo",
            "selftest",
            "dpo",
            _wrong_step,
            explicit_only=True,
            tokens=_prefloss_tokens("dpo", "torch", shift=1),
        )
    )
    return {c.name: c for c in cases}


CASES: dict[str, Case] = _registry()


def select_cases(patterns: list[str] | None) -> list[Case]:
    """Cases whose names match any of the ``fnmatch`` patterns (default: all but explicit-only ones).

    Raises:
        ValueError: a pattern matches no case; the message lists the valid names.
    """
    if not patterns:
        return [c for c in CASES.values() if not c.explicit_only]
    chosen: list[Case] = []
    for pat in patterns:
        hits = [c for name, c in CASES.items() if fnmatch.fnmatchcase(name, pat)]
        if not any(ch in pat for ch in "*?["):
            hits = [c for c in hits if c.name == pat]
        if not hits:
            raise ValueError(
                f"unknown case {pat!r}; valid cases: {', '.join(CASES)} (globs such as '*/dpo' work)."
            )
        for c in hits:
            if c.explicit_only and pat != c.name:
                continue
            if c not in chosen:
                chosen.append(c)
    return chosen
