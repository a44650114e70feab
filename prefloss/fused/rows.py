"""Per-row reductions over a ``[C, V]`` chunk of logits, in PyTorch: the Triton kernels' contract.

`prefloss.kernels` implements these two functions as Triton kernels with the same signatures, and
`prefloss.fused.op`' row-chunk loop (the Triton backend) hands each chunk's logit rows to them. This
module states that contract in plain PyTorch; the kernel tests use it as the same-dtype baseline
next to the float64 oracle. (The ``"torch"`` backend tiles the vocabulary instead, see
`prefloss.fused.torch_backend`, and shares only `transform_logits`.) Everything here is fp32 whatever
the input dtype (float64 inputs stay float64).

The logit transform the models use, applied identically to policy and reference rows:

    z = softcap * tanh(((raw + bias) * logit_scale) / softcap)      (each step only when given)

Both functions may overwrite their ``logits`` / ``ref_logits`` arguments: they are the chunk's
scratch buffers. `check_fwd_args` / `check_bwd_args` check the shapes and strides the Triton
launchers take; the launchers and their custom ops (`prefloss.fused.custom_ops`) call them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class RowStats(NamedTuple):
    """Per-row outputs of `logprobs_fwd`, each ``[n]`` float32 (``None`` when not asked for)."""

    logp: torch.Tensor  # z[y] - lse(z)
    lse: torch.Tensor  # lse(z), saved for backward
    ref: torch.Tensor | None  # z_ref[y] - lse(z_ref)
    minus: torch.Tensor | None  # log-softmax of (1+eps) z - eps z_ref, at y
    plus: torch.Tensor | None  # log-softmax of (1-eps) z + eps z_ref, at y


def transform_logits(
    raw: torch.Tensor,
    bias: torch.Tensor | None,
    logit_scale: float | None,
    softcap: float | None,
) -> torch.Tensor:
    """``[n, V]`` raw GEMM rows -> fp32 transformed logits ``z`` (in place when ``raw`` is fp32)."""
    # fp32 math for fp32/bf16/fp16 inputs; float64 stays float64 (gradcheck, oracles)
    z = raw if raw.dtype in (torch.float32, torch.float64) else raw.float()
    if bias is not None:
        z.add_(bias.to(z.dtype))
    if logit_scale is not None:
        z.mul_(logit_scale)
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    return z


def _logprob_at(z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lse = torch.logsumexp(z, dim=1)
    return z.gather(1, labels[:, None]).squeeze(1) - lse, lse


def logprobs_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_logits: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    epsilon: float | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
) -> RowStats:
    """Log-probabilities of ``labels`` under the policy, reference and the two ε-mixtures.

    Args:
        logits: ``[n, V]`` raw policy rows ``h @ W.T`` (any float dtype; may be overwritten).
        labels: ``[n]`` int64, every entry in ``[0, V)`` (ignored rows were dropped before).
        bias: ``[V]`` policy LM-head bias or ``None``.
        ref_logits: ``[n, V]`` raw reference rows or ``None`` (may be overwritten).
        ref_bias: ``[V]`` reference bias or ``None``.
        epsilon: ε in (0, 1) to also return ``minus`` (under ``(1+ε) z − ε z_ref``) and ``plus``
            (under ``(1−ε) z + ε z_ref``); needs ``ref_logits``.
        logit_scale, softcap: the model's logit transform (module docstring).

    Returns:
        `RowStats` of ``[n]`` float32 tensors.
    """
    z = transform_logits(logits, bias, logit_scale, softcap)
    logp, lse = _logprob_at(z, labels)
    ref = minus = plus = None
    if ref_logits is not None:
        zr = transform_logits(ref_logits, ref_bias, logit_scale, softcap)
        ref, _ = _logprob_at(zr, labels)
        if epsilon is not None:
            mix = torch.mul(z, 1.0 + epsilon).sub_(zr, alpha=epsilon)
            minus, _ = _logprob_at(mix, labels)
            torch.mul(z, 1.0 - epsilon, out=mix).add_(zr, alpha=epsilon)
            plus, _ = _logprob_at(mix, labels)
    return RowStats(logp, lse, ref, minus, plus)


def logprobs_bwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Gradient of ``Σ_t grad[t] · logp[t]`` with respect to the raw rows, written into ``logits``.

    ``∂/∂raw[t] = grad[t] · (onehot(y_t) − softmax(z_t)) · dz/draw`` with
    ``dz/draw = logit_scale · (1 − (z/softcap)²)`` (each factor only when the transform is used).

    Args:
        logits: ``[n, V]`` raw policy rows, recomputed; overwritten with the gradient (its dtype).
        labels: ``[n]`` int64; a label outside ``[0, V)`` adds no one-hot term (the rows are a
            tile of columns and the label lies in another tile).
        lse: ``[n]`` float32 from `logprobs_fwd`.
        grad: ``[n]`` float32 upstream gradient of each row's log-prob.
        bias, logit_scale, softcap: as in `logprobs_fwd`.

    Returns:
        ``logits``, now holding ``∂/∂raw`` (the bias gradient is its column sum).
    """
    z = transform_logits(logits, bias, logit_scale, softcap)
    # softcap chain rule: d(c·tanh(u/c))/du = 1 − tanh²(u/c) = 1 − (z/c)², taken before z is reused
    chain = torch.div(z, softcap).square_().neg_().add_(1.0) if softcap is not None else None
    p = z.sub_(lse[:, None]).exp_()
    p.mul_(-grad[:, None])
    # A label outside [0, V) adds no one-hot term: the row's label lies in another vocabulary tile
    # (the triton backend's backward passes tiles of columns with labels shifted by the tile start).
    inside = (labels >= 0) & (labels < p.shape[1])
    column = labels.clamp(0, p.shape[1] - 1)[:, None]
    p.scatter_add_(1, column, torch.where(inside, grad, torch.zeros_like(grad)).to(p.dtype)[:, None])
    if chain is not None:
        p.mul_(chain)
    if logit_scale is not None:
        p.mul_(logit_scale)
    if p.data_ptr() != logits.data_ptr():
        logits.copy_(p)
    return logits


def _check_rows(name: str, rows: torch.Tensor, labels: torch.Tensor) -> None:
    if rows.dim() != 2 or rows.stride(1) != 1:
        raise ValueError(
            f"`{name}` must be a [n, V] tensor with unit stride along V, got shape {tuple(rows.shape)} "
            f"and strides {tuple(rows.stride())}."
        )
    if labels.shape != rows.shape[:1]:
        raise ValueError(f"`labels` must have shape [{rows.shape[0]}], got {tuple(labels.shape)}.")


def check_fwd_args(
    logits: torch.Tensor, labels: torch.Tensor, ref_logits: torch.Tensor | None, epsilon: float | None
) -> None:
    """The arguments of the Triton `logprobs_fwd`: ``[n, V]`` rows with unit stride along V, ``[n]``
    labels, ``ref_logits`` of the same shape, ``epsilon`` only with ``ref_logits``.

    Shapes and strides only (no host sync). Called by the launcher and by the custom op's wrapper
    (`prefloss.fused.custom_ops`), whose fake implementation never reaches the launcher.

    Raises:
        ValueError: naming the argument, what was expected and what came.
    """
    _check_rows("logits", logits, labels)
    if epsilon is not None and ref_logits is None:
        raise ValueError("`epsilon` needs `ref_logits` (the ε-mixtures combine policy and reference rows).")
    if ref_logits is not None:
        if ref_logits.shape != logits.shape:
            raise ValueError(
                f"`ref_logits` must have the shape of `logits` {tuple(logits.shape)}, "
                f"got {tuple(ref_logits.shape)}."
            )
        _check_rows("ref_logits", ref_logits, labels)


def check_bwd_args(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor) -> None:
    """The arguments of the Triton `logprobs_bwd`: ``[n, V]`` rows with unit stride along V, ``[n]``
    labels, ``lse`` and ``grad``. Shapes and strides only, as `check_fwd_args`.

    Raises:
        ValueError: naming the argument, what was expected and what came.
    """
    _check_rows("logits", logits, labels)
    n = logits.shape[0]
    if lse.shape != (n,) or grad.shape != (n,):
        raise ValueError(
            f"`lse` and `grad` must have shape [{n}], got {tuple(lse.shape)} and {tuple(grad.shape)}."
        )
