"""The Triton launchers of `prefloss.kernels` as ``torch.library`` custom ops, with fake implementations.

``prefloss::logprobs_fwd`` and ``prefloss::logprobs_bwd`` wrap `prefloss.kernels.logprobs.logprobs_fwd` /
`logprobs_bwd` (whose contract `prefloss.fused.rows` states in PyTorch). As custom ops they

- trace on ``meta`` tensors and under ``FakeTensorMode`` without a GPU: the fake implementation
  gives the outputs' shapes and dtypes, so the whole CUDA step of the ``"triton"`` backend runs on
  ``meta`` tensors (`prefloss.commands.plan` models it that way);
- are opaque, correctly described nodes for ``torch.compile`` (``logprobs_bwd`` declares that it
  overwrites ``logits``), so a compiled training step calls the same kernels as eager;
- still launch the kernels on real tensors: CUDA, or CPU under ``TRITON_INTERPRET=1``.

They live here, not in `prefloss.kernels`, because that package stays "Triton only, tensors in,
tensors out" (docs/conventions.md); registering the ops does not import Triton, so ``TRITON_INTERPRET`` can
still be decided after `prefloss` is imported. `prefloss.fused.triton_backend` calls the two Python
functions below, which have exactly the launchers' signatures.

``torch.library.custom_op`` (rather than ``triton_op``) keeps the launchers' autotuner and the
interpreter path as they are: Inductor calls the op, it does not re-generate the Triton launch.
"""

from __future__ import annotations

import torch

from prefloss.fused.rows import RowStats, check_bwd_args, check_fwd_args

__all__ = ["logprobs_bwd", "logprobs_fwd"]


def _kernels():
    from prefloss.kernels import logprobs

    return logprobs


def _float_or_none(value) -> float | None:
    # The ops' schemas take ``float?``: an int or a NumPy scalar is converted before the call.
    return None if value is None else float(value)


def _absent(like: torch.Tensor) -> torch.Tensor:
    # A custom op returns a fixed number of tensors: an output not asked for is an empty [0] tensor.
    return torch.empty(0, dtype=torch.float32, device=like.device)


@torch.library.custom_op("prefloss::logprobs_fwd", mutates_args=())
def _logprobs_fwd_op(
    logits: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    ref_logits: torch.Tensor | None,
    ref_bias: torch.Tensor | None,
    epsilon: float | None,
    logit_scale: float | None,
    softcap: float | None,
    block_v: int | None,
    num_warps: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    stats = _kernels().logprobs_fwd(
        logits,
        labels,
        bias=bias,
        ref_logits=ref_logits,
        ref_bias=ref_bias,
        epsilon=epsilon,
        logit_scale=logit_scale,
        softcap=softcap,
        block_v=block_v,
        num_warps=num_warps,
    )
    return tuple(x if x is not None else _absent(logits) for x in stats)


@_logprobs_fwd_op.register_fake
def _(logits, labels, bias, ref_logits, ref_bias, epsilon, logit_scale, softcap, block_v, num_warps):
    n = logits.shape[0]

    def out(wanted: bool) -> torch.Tensor:
        return logits.new_empty(n if wanted else 0, dtype=torch.float32)

    has_ref, has_eps = ref_logits is not None, epsilon is not None
    return out(True), out(True), out(has_ref), out(has_eps), out(has_eps)


@torch.library.custom_op("prefloss::logprobs_bwd", mutates_args=("logits",))
def _logprobs_bwd_op(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    bias: torch.Tensor | None,
    logit_scale: float | None,
    softcap: float | None,
    block_v: int | None,
    num_warps: int | None,
) -> None:
    _kernels().logprobs_bwd(
        logits,
        labels,
        lse,
        grad,
        bias=bias,
        logit_scale=logit_scale,
        softcap=softcap,
        block_v=block_v,
        num_warps=num_warps,
    )


@_logprobs_bwd_op.register_fake
def _(logits, labels, lse, grad, bias, logit_scale, softcap, block_v, num_warps):
    return None


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
    block_v: int | None = None,
    num_warps: int | None = None,
) -> RowStats:
    """`prefloss.kernels.logprobs.logprobs_fwd` through the ``prefloss::logprobs_fwd`` custom op.

    Same arguments and result (`RowStats` of ``[n]`` float32, ``None`` where not asked for), and the
    launcher's argument checks (`prefloss.fused.rows.check_fwd_args`), on ``meta`` tensors too.
    """
    check_fwd_args(logits, labels, ref_logits, epsilon)
    logp, lse, ref, minus, plus = _logprobs_fwd_op(
        logits,
        labels,
        bias,
        ref_logits,
        ref_bias,
        _float_or_none(epsilon),
        _float_or_none(logit_scale),
        _float_or_none(softcap),
        block_v,
        num_warps,
    )
    has_ref, has_eps = ref_logits is not None, epsilon is not None
    return RowStats(
        logp, lse, ref if has_ref else None, minus if has_eps else None, plus if has_eps else None
    )


def logprobs_bwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
    block_v: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """`prefloss.kernels.logprobs.logprobs_bwd` through the ``prefloss::logprobs_bwd`` custom op.

    Same arguments and checks (`prefloss.fused.rows.check_bwd_args`); overwrites ``logits`` with ``∂/∂raw``
    in place and returns it.
    """
    check_bwd_args(logits, labels, lse, grad)
    _logprobs_bwd_op(
        logits,
        labels,
        lse,
        grad,
        bias,
        _float_or_none(logit_scale),
        _float_or_none(softcap),
        block_v,
        num_warps,
    )
    return logits
