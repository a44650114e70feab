"""The fused log-prob op: autograd Function, public `fused_logprobs` / `sequence_logprobs`.

Computes, per counted token ``t`` (``labels[t] != ignore_index``), from the logit rows
``f = h W^T + b`` (and ``f_ref`` of the reference model), after the model's logit transform
(``logit_scale`` multiply, then ``softcap·tanh(·/softcap)``)::

    policy[t] = log_softmax(f_t)[y_t]                                    (differentiable)
    ref[t]    = log_softmax(f_ref_t)[y_t]                                (no grad)
    minus[t]  = log_softmax((1+ε) f_t − ε f_ref_t)[y_t]   policy at β/(1+ε)   (no grad)
    plus[t]   = log_softmax((1−ε) f_t + ε f_ref_t)[y_t]   policy at β/(1−ε)   (no grad)

without ever holding the ``[N, V]`` logits: ignored rows are dropped first, then counted rows are
processed ``chunk_size`` at a time. Two loops, one per backend:

- ``"torch"`` (`prefloss.fused.torch_backend`): each chunk × each vocabulary tile, online log-sum-exp;
  peak extra memory O(C·V_tile).
- ``"triton"``: one reused ``[C, V]`` buffer per model, GEMMs in torch (cuBLAS), the row
  reductions and the in-place backward in the kernels of `prefloss.kernels` (whose contract
  `prefloss.fused.rows` states in PyTorch); peak extra memory O(C·V).

Two backward paths, chosen inside the autograd Function from ``ctx.needs_input_grad`` and the grad
mode of the call (matmul work per step in units of one ``N·H·V`` GEMM):

- trainable head (``∂weight`` or ``∂bias`` wanted): only ``lse`` (4 bytes a token) is saved;
  backward recomputes the policy logits. Forward 1 (+1 with a reference), backward recompute 1 +
  ``∂h`` 1 + ``∂W`` 1.
- frozen head (only ``∂hidden`` wanted: LoRA, a frozen LM head): ``∂logp_t/∂h_t =
  J_t = Σ_v (onehot(y_t) − softmax(z_t))_v · dz_v/draw_v · W_v`` does not depend on the upstream
  gradient, so the forward forms it over the tiles it already holds (1 GEMM) and saves ``J``
  (``[n, H]`` in ``hidden``'s dtype, the size of ``∂hidden``) instead of ``hidden``; backward is
  ``∂h_t = g_t · J_t``, exact for any ``g``, no GEMM. Forward 2 (+1 with a reference), backward 0:
  3 with a reference, the floor of the math (policy, reference, ``∂h``).
- no gradient at all (``torch.no_grad``, reference scoring, ``hidden`` not requiring grad): the
  forward alone, no ``J``.
Compacting the counted rows costs one host synchronisation per call (its size is data-dependent).
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

from prefloss.fused import torch_backend, triton_backend
from prefloss.fused.chunks import CountedRows, HeadInputs
from prefloss.fused.segments import check_cu_seqlens, segment_ids, segment_sum

BACKENDS = ("auto", "torch", "triton")
# Triton backend: elements of one [C, V] row-chunk buffer (GPU GEMMs want tall chunks).
_TRITON_CHUNK_ELEMENTS = 1 << 26
# Torch backend: rows per chunk; each GEMM is [C, H] x [H, VOCAB_TILE] (prefloss.fused.torch_backend).
_TORCH_CHUNK_ROWS = 2048


class TokenLogProbs(NamedTuple):
    """Per-token outputs of `fused_logprobs`, each ``[..., T]`` float32, 0 at ignored tokens.

    ``ref``/``minus``/``plus`` are ``None`` when not asked for; ``mask`` is the bool counted mask.
    """

    policy: torch.Tensor
    ref: torch.Tensor | None
    minus: torch.Tensor | None
    plus: torch.Tensor | None
    mask: torch.Tensor


class SequenceLogProbs(NamedTuple):
    """Per-row sums of `TokenLogProbs` over the last axis, ``[...]`` float32, and token counts.

    ``length`` is the number of counted tokens per row (int64). A row with no counted token has
    sum 0 and length 0; its `mean` is 0 (not NaN).
    """

    policy: torch.Tensor
    ref: torch.Tensor | None
    minus: torch.Tensor | None
    plus: torch.Tensor | None
    length: torch.Tensor

    def mean(self) -> SequenceLogProbs:
        """Length-normalised view: every value divided by ``max(length, 1)``."""
        denom = self.length.clamp(min=1).to(torch.float32)

        def div(x):
            return None if x is None else x / denom

        return SequenceLogProbs(div(self.policy), div(self.ref), div(self.minus), div(self.plus), self.length)


@dataclass(frozen=True)
class _Options:
    """Non-tensor options of the autograd Function, travelling as one frozen object."""

    epsilon: float | None
    logit_scale: float | None
    softcap: float | None
    chunk_size: int
    backend: str  # "torch" | "triton"
    # torch.is_grad_enabled() at the call: inside forward grad mode is always off, and
    # ctx.needs_input_grad reflects only the inputs' requires_grad (True under no_grad too).
    grad_enabled: bool = True


def _accumulate_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs; float64 inputs stay float64 (gradcheck, oracles)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


_BACKENDS = {"torch": torch_backend, "triton": triton_backend}


def frozen_head(needs_input_grad, grad_enabled: bool) -> bool:
    """Whether the frozen-head path runs: ``∂hidden`` is wanted and neither ``∂weight`` nor
    ``∂bias`` is (LoRA, a frozen LM head). ``needs_input_grad`` starts with hidden, weight, bias."""
    need_h, need_w, need_b = needs_input_grad[:3]
    return grad_enabled and need_h and not need_w and not need_b


class _FusedLogProbs(torch.autograd.Function):
    """``hidden``/``ref_hidden`` are the full ``[N, H]`` inputs, ``labels`` the ``[n]`` counted
    labels, and ``rows`` (`CountedRows`) says which rows of ``hidden`` they belong to.

    Two backward paths, chosen in ``forward`` from ``ctx.needs_input_grad``:

    - trainable head (``∂weight`` or ``∂bias`` wanted): save ``hidden`` and ``lse``; backward
      recomputes the logits (1 GEMM) and forms ``∂h`` and ``∂W`` (2 GEMMs).
    - frozen head (only ``∂hidden`` wanted): forward also forms ``J_t = ∂logp_t/∂h_t`` (``[n, H]``,
      1 GEMM) and saves only ``J``; backward is ``∂h_t = g_t·J_t``, no GEMM. Exact for any
      upstream gradient ``g``: ``J`` does not depend on it.
    """

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, labels, rows: CountedRows, ref_hidden, ref_weight, ref_bias, opts: _Options
    ):
        acc = _accumulate_dtype(hidden)
        backend = _BACKENDS[opts.backend]
        frozen = frozen_head(ctx.needs_input_grad, opts.grad_enabled)
        inputs = HeadInputs(hidden, weight, bias, labels, rows, ref_hidden, ref_weight, ref_bias)
        logp, lse, ref, minus, plus, jac = backend.forward(inputs, opts, acc, jacobian=frozen)
        ctx.opts, ctx.rows, ctx.frozen = opts, rows, frozen
        if frozen:
            # hidden itself is not saved: J replaces it (same size when every row counts).
            ctx.hidden_like = (hidden.shape, hidden.dtype, hidden.device)
            ctx.save_for_backward(jac)
        else:
            ctx.save_for_backward(hidden, weight, bias, labels, lse)
        extras = [x if x is not None else logp.new_empty(0) for x in (ref, minus, plus)]
        ctx.mark_non_differentiable(*extras)
        return (logp, *extras)

    @staticmethod
    def backward(ctx, grad_logp, *_unused):
        # autograd runs a backward with grad mode on only under create_graph=True
        if torch.is_grad_enabled():
            raise RuntimeError(_FIRST_ORDER_ONLY)
        if ctx.frozen:
            (jac,) = ctx.saved_tensors
            grad = grad_logp.to(_accumulate_dtype(jac)).contiguous()
            return _scale_rows(jac, grad, ctx.rows, ctx.hidden_like, ctx.opts.chunk_size), *(None,) * 8
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        acc = _accumulate_dtype(hidden)
        grad = grad_logp.to(acc).contiguous()
        need = ctx.needs_input_grad[:3]
        backend = _BACKENDS[ctx.opts.backend]
        inputs = HeadInputs(hidden, weight, bias, labels, ctx.rows)
        grad_h, grad_w, grad_b = backend.backward(inputs, lse, grad, ctx.opts, need, acc)
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


_FIRST_ORDER_ONLY = (
    "prefloss's fused log-probs (`fused_logprobs`, `sequence_logprobs` and the losses) support "
    "first-order gradients only: their backward is not differentiable, so a backward with "
    "`create_graph=True` (double backward: gradient penalties, Hessian-vector products) is refused. "
    "Call `backward()` / `torch.autograd.grad` without `create_graph=True`."
)


def _scale_rows(jac, grad, rows: CountedRows, hidden_like, chunk_size: int) -> torch.Tensor:
    """The frozen head's ``∂hidden [N, H]``: counted row ``t`` is ``grad[t]·jac[t]`` (the product in
    fp32, rounded once to hidden's dtype), ignored rows 0. Chunked: no ``[n, H]`` fp32 temporary."""
    shape, dtype, device = hidden_like
    out = (
        torch.empty(shape, dtype=dtype, device=device)
        if rows.index is None
        else torch.zeros(shape, dtype=dtype, device=device)
    )
    for r0, r1 in rows.chunks(max(1, chunk_size)):
        rows.put_(out, r0, r1, jac[r0:r1] * grad[r0:r1, None])
    return out


# --- input checks -------------------------------------------------------------------------------


def _check_tensor(name: str, x, *, floating: bool = True) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}.")
    if floating and not x.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point tensor, got dtype {x.dtype}.")


def check_number(name: str, value, *, gt=None, ge=None, lt=None, tensors: bool = False) -> float:
    """``value`` as a finite Python float within the bounds, else an error naming ``name``.

    The one check of every numeric option of the op and the losses: ``TypeError`` for what is not a
    real number (``bool``, strings, ``None``; tensors unless ``tensors``: a 1-element tensor is then
    read with ``float()``), ``ValueError`` for NaN, ±inf or a value out of range. Bounds: ``gt`` /
    ``ge`` (lower, open / closed), ``lt`` (upper, open).
    """
    if isinstance(value, torch.Tensor):
        if not tensors:
            raise TypeError(f"`{name}` must be a Python float, got a tensor (pass float(x)).")
        if value.numel() != 1 or value.is_complex():
            raise TypeError(f"`{name}` must be a real number, got a tensor of shape {tuple(value.shape)}.")
        v = float(value)
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__} {value!r}.")
    else:
        v = float(value)
    low = f"({gt}" if gt is not None else f"[{ge}" if ge is not None else None
    if low is not None and lt is not None:
        expected = f"in {low}, {lt})"
    elif gt is not None:
        expected = f"a finite number > {gt}"
    elif ge is not None:
        expected = f"a finite number >= {ge}"
    elif lt is not None:
        expected = f"a finite number < {lt}"
    else:
        expected = "a finite number"
    if (
        not math.isfinite(v)
        or (gt is not None and not v > gt)
        or (ge is not None and not v >= ge)
        or (lt is not None and not v < lt)
    ):
        raise ValueError(f"`{name}` must be {expected}, got {value!r}.")
    return v


def _check_positive(name: str, value) -> float | None:
    return None if value is None else check_number(name, value, gt=0)


def check_chunk_size(chunk_size) -> int | None:
    """``None`` (the backend's default) or a positive int, else an error naming `chunk_size`."""
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive int or None, got {chunk_size!r}.")
    return int(chunk_size)


def check_backend(backend) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}.")
    return backend


def check_ignore_index(ignore_index) -> int:
    """The label value of tokens that do not count: a Python int (``bool`` and tensors refused)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(
            f"`ignore_index` must be an int (the label of tokens that do not count, e.g. -100), "
            f"got {type(ignore_index).__name__} {ignore_index!r}."
        )
    return int(ignore_index)


try:  # torch built without distributed has no DTensor
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover
    _DTensor = None

_GATHER_HINT = (
    "Inside a training step use `prefloss.hf.preference_loss(loss_fn, model, input_ids, attention_mask, "
    "labels, ref_model=...)`, which gathers the output heads for the fused forward and backward; in a "
    "hand-written loop gather them with `with prefloss.hf.gathered_heads(model, ref_model) as heads:` and "
    "pass `heads.policy.weight` / `heads.ref.weight`, wrapping the hidden states and the loss with "
    "`heads.release_after_backward` / `heads.gather_before_backward` for the backward (see "
    "`prefloss.hf.engines`)."
)


def check_not_sharded(name: str, t) -> None:
    """Refuse a head parameter that a sharding engine holds only in part (the op needs it whole).

    * DeepSpeed ZeRO-3: a partitioned parameter (attribute ``ds_id``) outside a gather is a ``[0]``
      placeholder (``ds_status`` NOT_AVAILABLE, ``ds_shape`` the whole shape);
    * FSDP2 / tensor parallelism: a ``torch.distributed.tensor.DTensor`` (FSDP2's sharded parameter
      outside the unit's forward; with a bf16 ``MixedPrecisionPolicy`` also still in fp32).
    """
    if t is None:
        return
    if hasattr(t, "ds_id"):
        status = getattr(t, "ds_status", None)
        whole = tuple(getattr(t, "ds_shape", t.shape))
        if getattr(status, "name", None) == "NOT_AVAILABLE" or tuple(t.shape) != whole:
            raise ValueError(
                f"`{name}` is a DeepSpeed ZeRO-3 partitioned parameter (ds_id {t.ds_id}, whole shape "
                f"{whole}, held here as shape {tuple(t.shape)}): the fused op needs the whole tensor. "
                + _GATHER_HINT
            )
    if _DTensor is not None and isinstance(t, _DTensor):
        raise ValueError(
            f"`{name}` is a torch.distributed.tensor.DTensor (placements {tuple(t.placements)}, local "
            f"shape {tuple(t.to_local().shape)} of {tuple(t.shape)}; an FSDP2 or tensor-parallel "
            "parameter): the fused op needs a plain tensor holding the whole weight. " + _GATHER_HINT
        )


def _check_head(prefix: str, hidden, weight, bias, lead_shape, device) -> None:
    _check_tensor(f"{prefix}hidden", hidden)
    _check_tensor(f"{prefix}weight", weight)
    check_not_sharded(f"{prefix}weight", weight)
    check_not_sharded(f"{prefix}bias", bias)
    if weight.dim() != 2:
        raise ValueError(f"`{prefix}weight` must be [V, H], got shape {tuple(weight.shape)}.")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"`{prefix}hidden` last dim must equal `{prefix}weight`.shape[1] = {weight.shape[1]} (H), "
            f"got `{prefix}hidden` shape {tuple(hidden.shape)}."
        )
    if tuple(hidden.shape[:-1]) != tuple(lead_shape):
        raise ValueError(
            f"`labels` shape must equal `{prefix}hidden`.shape[:-1] = {tuple(hidden.shape[:-1])}, "
            f"got {tuple(lead_shape)}."
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(
            f"`{prefix}hidden` and `{prefix}weight` must have the same dtype, "
            f"got {hidden.dtype} and {weight.dtype}."
        )
    for name, t in ((f"{prefix}hidden", hidden), (f"{prefix}weight", weight), (f"{prefix}bias", bias)):
        if t is not None and t.device != device:
            raise ValueError(
                f"all tensors must be on one device: `labels` is on {device}, `{name}` on {t.device}."
            )
    if bias is not None:
        _check_tensor(f"{prefix}bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"`{prefix}bias` must be [V] = [{weight.shape[0]}], got shape {tuple(bias.shape)}."
            )


def _resolve_backend(backend: str, device: torch.device) -> str:
    check_backend(backend)
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    # meta tensors only trace (the kernels are custom ops with fake implementations)
    if (
        backend == "triton"
        and device.type not in ("cuda", "meta")
        and os.environ.get("TRITON_INTERPRET") != "1"
    ):
        raise ValueError(
            f"`backend='triton'` needs CUDA tensors, or TRITON_INTERPRET=1 set before prefloss.kernels is "
            f"imported to run Triton's interpreter on CPU; got tensors on {device}."
        )
    return backend


def default_chunk_size(vocab: int, backend: str) -> int:
    """Rows per chunk: 2048 for the torch backend (``[C, 2048]`` tiles); for Triton, ``[C, V]``
    buffers of about 64M elements (C = 512 at V = 128k), a multiple of 16."""
    if backend == "torch":
        return _TORCH_CHUNK_ROWS
    return max(16, (_TRITON_CHUNK_ELEMENTS // max(vocab, 1)) // 16 * 16)


def fused_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    epsilon: float | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> TokenLogProbs:
    """Per-token log-probs of ``labels`` under the policy (and reference, and ε-mixtures), fused.

    Equivalent to ``log_softmax(T(hidden @ weight.T + bias), -1).gather(-1, labels)`` (and the same
    for the reference and the mixtures ``(1+ε) f − ε f_ref``, ``(1−ε) f + ε f_ref``) computed in
    fp32, with ``T`` the logit transform (``× logit_scale``, then ``softcap·tanh(·/softcap)``), but
    without allocating the ``[..., T, V]`` logits.

    Args:
        hidden: ``[..., T, H]`` policy last hidden states (fp32/bf16/fp16).
        weight: ``[V, H]`` policy LM-head weight, same dtype as ``hidden``.
        labels: ``[..., T]`` integer token ids; ``labels[..., t]`` is predicted from
            ``hidden[..., t]`` (the caller shifts). ``ignore_index`` marks tokens that do not count.
        bias: ``[V]`` LM-head bias or ``None``.
        ref_hidden, ref_weight, ref_bias: the reference model's ``[..., T, H_ref]``, ``[V, H_ref]``,
            ``[V]``; give both hidden and weight, or neither.
        epsilon: ε in (0, 1): also return ``minus`` / ``plus`` (needs the reference).
        logit_scale: multiply logits by this (Cohere ``logit_scale``; Granite ``1/logits_scaling``).
        softcap: Gemma-2 ``final_logit_softcapping`` ``c``: logits become ``c·tanh(z/c)``.
        ignore_index: label value of tokens that do not count (default -100).
        chunk_size: counted rows per chunk (default: 2048 for the torch backend, which also tiles
            the vocabulary; about 64M logits per ``[C, V]`` chunk for Triton).
        backend: ``"torch"``, ``"triton"`` or ``"auto"`` (Triton on CUDA tensors, torch otherwise).

    Returns:
        `TokenLogProbs` of ``[..., T]`` float32 tensors (float64 for float64 inputs), 0 at ignored
        tokens. ``policy`` is differentiable w.r.t. ``hidden``, ``weight`` and ``bias``; the others
        carry no gradient.

    Non-finite values in counted rows of ``hidden`` propagate (NaN log-probs at those tokens, so a
    NaN loss), no check is made on the hot path; ignored rows never enter any computation.
    Gradients are first order only: a backward with ``create_graph=True`` raises ``RuntimeError``.

    Raises:
        TypeError, ValueError: a bad argument (named in the message), including a ``weight`` /
            ``ref_weight`` that a sharding engine holds only in part (a DeepSpeed ZeRO-3 partitioned
            parameter, an FSDP2 ``DTensor``): gather it first (`prefloss.hf.gathered_heads`).
    """
    _check_tensor("labels", labels, floating=False)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"`labels` must be an integer tensor (int64), got dtype {labels.dtype}.")
    device = labels.device
    _check_head("", hidden, weight, bias, labels.shape, device)
    has_ref = ref_hidden is not None or ref_weight is not None
    if has_ref:
        if ref_hidden is None or ref_weight is None:
            given, missing = (
                ("ref_hidden", "ref_weight") if ref_weight is None else ("ref_weight", "ref_hidden")
            )
            raise ValueError(
                f"`{given}` was given without `{missing}`: pass both for the reference model, or neither."
            )
        _check_head("ref_", ref_hidden, ref_weight, ref_bias, labels.shape, device)
        if ref_weight.shape[0] != weight.shape[0]:
            raise ValueError(
                f"`ref_weight` must have the policy's vocabulary size V = {weight.shape[0]}, "
                f"got {ref_weight.shape[0]}."
            )
    elif ref_bias is not None:
        raise ValueError("`ref_bias` was given without `ref_hidden` / `ref_weight`.")
    if epsilon is not None:
        epsilon = check_number("epsilon", epsilon, gt=0, lt=1)
        if not has_ref:
            raise ValueError("`epsilon` needs the reference model: pass `ref_hidden` and `ref_weight`.")
    logit_scale = _check_positive("logit_scale", logit_scale)
    softcap = _check_positive("softcap", softcap)
    ignore_index = check_ignore_index(ignore_index)
    vocab = weight.shape[0]
    resolved = _resolve_backend(backend, hidden.device)
    chunk_size = check_chunk_size(chunk_size)
    if chunk_size is None:
        chunk_size = default_chunk_size(vocab, resolved)

    flat_labels = labels.reshape(-1).long()
    mask = flat_labels != ignore_index
    if device.type == "meta":  # shapes without values (`prefloss.commands.plan` runs the step so): all count
        idx = torch.arange(flat_labels.numel(), device=device)
    else:
        idx = mask.nonzero().squeeze(1)  # the one host sync: the counted-row count sets GEMM shapes
    counted = flat_labels.index_select(0, idx)
    bad = (counted < 0) | (counted >= vocab)
    if device.type != "meta" and bool(bad.any()):
        first = int(counted[bad.nonzero()[0, 0]])
        raise ValueError(
            f"`labels` must be in [0, {vocab}) (V) or equal `ignore_index` = {ignore_index}, got {first}."
        )
    all_counted = idx.numel() == flat_labels.numel()
    rows = CountedRows(None if all_counted else idx, idx.numel())
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    ref2d = ref_hidden.reshape(-1, ref_hidden.shape[-1]) if has_ref else None
    opts = _Options(epsilon, logit_scale, softcap, chunk_size, resolved, torch.is_grad_enabled())
    logp, ref, minus, plus = _FusedLogProbs.apply(
        hidden2d, weight, bias, counted, rows, ref2d, ref_weight, ref_bias, opts
    )

    def scatter(values):
        if values is None or (values.numel() == 0 and idx.numel() != 0):
            return None
        if all_counted:
            return values.reshape(labels.shape)
        full = torch.zeros(flat_labels.numel(), dtype=values.dtype, device=device)
        return full.index_copy(0, idx, values).reshape(labels.shape)

    out_ref = scatter(ref) if has_ref else None
    out_minus = scatter(minus) if epsilon is not None else None
    out_plus = scatter(plus) if epsilon is not None else None
    return TokenLogProbs(scatter(logp), out_ref, out_minus, out_plus, mask.reshape(labels.shape))


def sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    **kwargs,
) -> SequenceLogProbs:
    """Per-sequence sums of `fused_logprobs` over the token axis, plus counted-token lengths.

    Same keyword arguments as `fused_logprobs` (``bias``, the reference, ``epsilon``, the logit
    transform, ``ignore_index``, ``chunk_size``, ``backend``), and two layouts:

    - padded (``cu_seqlens=None``): one sequence per row. ``hidden [..., T, H]``, ``labels
      [..., T]`` → ``[...]`` float32 sums ``Σ_t logp[..., t]`` and ``length [...]`` int64.
    - packed (padding-free, ``cu_seqlens [S+1]`` int64): ``S`` sequences laid end to end on one
      token axis, sequence ``i`` at positions ``cu_seqlens[i] : cu_seqlens[i+1]`` (see
      `prefloss.fused.segments`). ``hidden [1, L, H]``, ``labels [1, L]`` (and ``ref_hidden
      [1, L, H_ref]``) → ``[S]`` sums ``Σ_{cu[i] <= t < cu[i+1]} logp[t]`` and ``length [S]``:
      the padded call's values on the same ``S`` sequences (up to the order of the fp32
      summation). The op runs once on the ``L`` tokens (its per-token output is ``[L]``, no
      padding and no ``[S, max_len]`` buffer); the sums are a segment reduction
      (`prefloss.fused.segments.segment_sum`), whose backward hands each token its sequence's
      upstream gradient, so the fused backward is the same.

    The last-label rule (packed): ``labels[0, t]`` is scored from ``hidden[0, t]`` (the caller
    shifts), so at each sequence's last position ``t = cu_seqlens[i+1] − 1`` a shifted label would be
    the next sequence's first token. That label must be ``ignore_index`` (`prefloss.hf.packing`
    sets it); anything else raises ``ValueError`` naming the sequence and the position.

    ``.mean()`` gives the length-normalised values (0 for a sequence with no counted token).

    Raises:
        TypeError, ValueError: as `fused_logprobs`, and for a bad ``cu_seqlens``
            (`prefloss.fused.segments.check_cu_seqlens`), a packed ``labels`` that is not
            ``[1, L]``, or a counted label at a sequence's last position.
    """
    if cu_seqlens is None:
        tok = fused_logprobs(hidden, weight, labels, **kwargs)

        def total(x):
            return None if x is None else x.sum(-1)

        return SequenceLogProbs(
            total(tok.policy), total(tok.ref), total(tok.minus), total(tok.plus), tok.mask.sum(-1)
        )
    cu = _check_packed_labels(labels, cu_seqlens, check_ignore_index(kwargs.get("ignore_index", -100)))
    tok = fused_logprobs(hidden, weight, labels, **kwargs)

    ids = segment_ids(cu, labels.shape[1], check=False)  # one [L] index for the five sums

    def total(x):
        return None if x is None else segment_sum(x[0], cu, ids=ids)

    return SequenceLogProbs(
        total(tok.policy), total(tok.ref), total(tok.minus), total(tok.plus), total(tok.mask)
    )


def _check_packed_labels(labels, cu_seqlens, ignore_index: int) -> torch.Tensor:
    """A packed call's ``labels [1, L]`` and ``cu_seqlens [S+1]`` (moved to ``labels``' device), with
    the last-label rule: ``labels[0, cu_seqlens[i+1] − 1] == ignore_index`` for every sequence."""
    _check_tensor("labels", labels, floating=False)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"`labels` must be an integer tensor (int64), got dtype {labels.dtype}.")
    if labels.dim() != 2 or labels.shape[0] != 1:
        raise ValueError(
            f"`labels` must be [1, L] with `cu_seqlens` (a packed batch: one row of L tokens), "
            f"got shape {tuple(labels.shape)}."
        )
    check_cu_seqlens(cu_seqlens, labels.shape[1])
    cu = cu_seqlens.to(labels.device)
    if labels.device.type == "meta":
        return cu
    last = cu[1:] - 1
    leaking = (labels[0].index_select(0, last) != ignore_index).nonzero()
    if leaking.numel():
        i = int(leaking[0, 0])
        pos = int(last[i])
        raise ValueError(
            f"`labels`[0, {pos}] = {int(labels[0, pos])} is counted, but position {pos} is the last "
            f"token of sequence {i} in `cu_seqlens` (cu_seqlens[{i + 1}] - 1): its shifted label would "
            f"be the next sequence's first token. In a packed batch each sequence's last label must be "
            f"`ignore_index` = {ignore_index} ({leaking.shape[0]} of {last.shape[0]} sequences break "
            "this; `prefloss.hf.packing.pack_batch` sets them)."
        )
    return cu
