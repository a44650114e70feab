"""The torch backend's per-tile arithmetic, written once and fused by ``torch.compile`` on CPU.

Two functions of a ``[C, V_t]`` logit tile (already transformed: bias, ``logit_scale``, softcap):

- `log_sum_exps` — per-row ``lse = max + log Σ exp(x − max)`` of the policy tile, the reference
  tile and the two ε-mixtures ``(1+ε) z − ε z_ref`` and ``(1−ε) z + ε z_ref``, returned in
  float64 (each tile's sum of exponentials is accumulated in the tile's dtype; the fold across
  tiles is float64, in `prefloss.fused.torch_backend`).
- `neg_softmax_times_` — in place, ``z ← −g · exp(z − lse)``, the ``−g·softmax`` part of
  ``∂logits = g·(onehot − softmax)``.
- `log_sum_exps_and_exp_` — the frozen-head forward's step: `log_sum_exps`, and in place
  ``z ← exp(z − s) · (1 − (z/c)²)`` with ``s`` the rows' running maximum, the tile the forward
  multiplies by the weight tile to accumulate ``Σ_v softmax_v · dz_v/draw_v · W_v``
  (`prefloss.fused.torch_backend`); the policy's exponentials serve both.

Tiles are float32 (float64 for float64 inputs): the backend's logit transform upcasts bf16/fp16 GEMM
output before anything else.

Eagerly each line is a pass over the tile. Compiled (Inductor's C++ backend), the ``K`` variants
of a tile (policy, reference, mixtures) are one ``[C, K, V_t]`` expression (`_stacked`), so every
reduction runs in one loop over the rows: each row's maximum and sum of exponentials are taken
while the row is in the L1 cache, and nothing of tile size is written. The sum of exponentials is
accumulated in float32 (the op's errors against float64 are set by the fp32 logits either way); the
ε-DPO forward takes four exponentials per element, the backward one. Why this shape, with the
measurements: docs/performance.md.

When to compile is `mode()`'s decision, from ``PREFLOSS_COMPILE``:
``auto`` (default) compiles on CPU when a call's work (counted rows × vocabulary) is at least
`COMPILE_MIN_ELEMENTS` — below that the one-off compilation (seconds) costs more than it saves;
``always`` / ``1`` compiles on CPU whatever the size; ``never`` / ``0`` never compiles.
Other devices run eagerly (the Triton backend is the fused path on GPUs). If compiling fails
(typically: no C++ compiler), the first failure warns once and everything runs eagerly from then on;
the numbers are the same up to rounding.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

COMPILE_MIN_ELEMENTS = 1 << 24  # counted rows × vocabulary: e.g. 512 tokens at V = 32768
_MODES = {"auto": "auto", "always": "always", "1": "always", "never": "never", "0": "never"}


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _stacked(z: torch.Tensor, z_ref: torch.Tensor | None, epsilon: torch.Tensor | None) -> torch.Tensor:
    """The ``K`` tiles whose rows are summed, as one ``[C, K, V_t]`` expression: ``z``, then
    ``z_ref`` and with ``epsilon`` ``z + a·(z_ref − z)`` for ``a = −ε, +ε`` (``(1+ε) z − ε z_ref``
    and ``(1−ε) z + ε z_ref``). ``z_ref`` itself is taken as it is, not re-formed as ``z + 1·(z_ref − z)``.

    Compiled, nothing of this size is written: every reduction over it runs in one loop over the
    rows (Inductor's outer-loop fusion), each row's ``K`` variants formed from ``z`` and ``z_ref``
    while the row is in the L1 cache (written as ``K`` separate log-sum-exps, Inductor makes one loop
    over the whole tile per reduction).
    """
    if z_ref is None:
        return z[:, None, :]
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    weights = [zero, zero] + ([] if epsilon is None else [-epsilon.to(z.dtype), epsilon.to(z.dtype)])
    a = torch.stack(weights)[None, :, None]
    is_ref = (torch.arange(len(weights), device=z.device) == 1)[None, :, None]  # stream 1: z_ref as given
    return torch.where(is_ref, z_ref[:, None, :], z[:, None, :] + a * (z_ref - z)[:, None, :])


def _row_lses(x: torch.Tensor) -> torch.Tensor:
    """``[C, K]`` float64 ``max + log Σ_v exp(x[:, k, v] − max)`` of a ``[C, K, V_t]`` tile.

    The tile's sum is accumulated in the tile's dtype (rows at most
    `prefloss.fused.torch_backend.VOCAB_TILE` wide, summed over 16 vector lanes); the result, and every
    fold across tiles, in float64.
    """
    top = x.amax(-1, keepdim=True)
    return top.squeeze(-1).double() + torch.exp(x - top).sum(-1).double().log()


def log_sum_exps(
    z: torch.Tensor, z_ref: torch.Tensor | None, epsilon: torch.Tensor | None
) -> list[torch.Tensor]:
    """Row log-sum-exps of one tile: ``[lse(z)]``, ``+ [lse(z_ref)]`` with a reference,
    ``+ [lse((1+ε) z − ε z_ref), lse((1−ε) z + ε z_ref)]`` with ``epsilon`` (a 0-d tensor).

    Args:
        z, z_ref: ``[C, V_t]`` policy and reference logit tiles, float32 or float64.
        epsilon: 0-d tensor, or ``None`` for no mixtures (then ``z_ref`` may be ``None``).
    Returns:
        a list of ``[C]`` float64 tensors, in the order above.
    """
    dtype = _compute_dtype(z)
    z_ref = None if z_ref is None else z_ref.to(dtype)
    return list(_row_lses(_stacked(z.to(dtype), z_ref, epsilon)).unbind(1))


def neg_softmax_times_(z: torch.Tensor, lse: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """In place ``z[r, v] ← −g[r] · exp(z[r, v] − lse[r])``; returns ``z``.

    Args:
        z: ``[C, V_t]`` logit tile (overwritten; its dtype is kept).
        lse: ``[C]`` each row's log-sum-exp over the whole vocabulary.
        g: ``[C]`` upstream gradient of each row's log-prob.
    """
    dtype = _compute_dtype(z)
    p = torch.exp(z.to(dtype) - lse.to(dtype)[:, None])
    z.copy_(p * -g.to(dtype)[:, None])
    return z


def log_sum_exps_and_exp_(
    z: torch.Tensor,
    z_ref: torch.Tensor | None,
    epsilon: torch.Tensor | None,
    shift: torch.Tensor,
    softcap: torch.Tensor | None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The frozen-head forward's tile step: `log_sum_exps`, and in place
    ``z[r, v] ← exp(z[r, v] − s[r]) · (1 − (z[r, v]/c)²)`` with ``s = max(shift, max_v z)``.

    The policy's exponentials are computed once, for its log-sum-exp and for the tile that the
    caller multiplies by the weight tile (``Σ_v exp(z_v − s)·χ_v·W_v``).

    Args:
        z, z_ref, epsilon: as `log_sum_exps`; ``z`` is overwritten.
        shift: ``[C]`` float64 running maximum of the rows so far (``−inf`` before the first tile).
        softcap: 0-d tensor ``c`` (the chain factor ``χ = 1 − (z/c)²``), or ``None`` (``χ = 1``).
    Returns:
        ``(lses, s)``: the list of `log_sum_exps`, and the new ``[C]`` float64 shift ``s``.
    """
    dtype = _compute_dtype(z)
    x = z.to(dtype)
    new_shift = torch.maximum(shift, x.amax(1).double()).to(dtype)
    e = torch.exp(x - new_shift[:, None])
    out = [new_shift.double() + e.sum(1).double().log()]
    if z_ref is not None:
        out.extend(_row_lses(_stacked(x, z_ref.to(dtype), epsilon)[:, 1:]).unbind(1))
    if softcap is not None:
        e = e * (1.0 - (x / softcap.to(dtype)).square())
    z.copy_(e)
    return out, new_shift.double()


def mode() -> str:
    """``"auto"``, ``"always"`` or ``"never"``, from ``PREFLOSS_COMPILE`` (read at every call).

    Raises:
        ValueError: ``PREFLOSS_COMPILE`` holds anything else.
    """
    raw = os.environ.get("PREFLOSS_COMPILE", "auto").strip().lower()
    if raw not in _MODES:
        given = os.environ["PREFLOSS_COMPILE"]
        raise ValueError(f"PREFLOSS_COMPILE must be one of auto, always, 1, never, 0; got {given!r}.")
    return _MODES[raw]


class _Fused:
    """One tile function, run compiled or eagerly; compiled lazily, once (dynamic shapes)."""

    failed: str | None = None  # class-wide: after one compile failure, nothing is compiled again

    def __init__(self, fn: Callable):
        self.eager = fn
        self._compiled: Callable | None = None

    def compiled(self, *args):
        if _Fused.failed is not None:
            return self.eager(*args)
        if self._compiled is None:
            self._compiled = torch.compile(self.eager, dynamic=True)
        try:
            return self._compiled(*args)
        except Exception as exc:  # noqa: BLE001 - any compiler failure falls back; eager re-raises real errors
            first_line = (str(exc).strip().splitlines() or [""])[0]
            _Fused.failed = f"{type(exc).__name__}: {first_line}"
            warnings.warn(
                f"prefloss: torch.compile of the torch backend's tile arithmetic failed ({_Fused.failed}); "
                "running it eagerly from now on (same results, slower). Set PREFLOSS_COMPILE=never to "
                "skip the attempt.",
                RuntimeWarning,
                stacklevel=3,
            )
            return self.eager(*args)


_LOG_SUM_EXPS = _Fused(log_sum_exps)
_NEG_SOFTMAX_TIMES = _Fused(neg_softmax_times_)
_LOG_SUM_EXPS_AND_EXP = _Fused(log_sum_exps_and_exp_)


def used_compiled() -> bool:
    """Whether this process has run the compiled tile functions (and compiling has not failed)."""
    return _Fused.failed is None and any(
        f._compiled is not None for f in (_LOG_SUM_EXPS, _NEG_SOFTMAX_TIMES, _LOG_SUM_EXPS_AND_EXP)
    )


def should_compile(elements: int, device: torch.device) -> bool:
    """Whether a call doing ``elements`` (counted rows × vocabulary) of tile work on ``device`` runs
    the compiled functions (see the module docstring)."""
    if device.type != "cpu" or _Fused.failed is not None:
        return False
    chosen = mode()
    return chosen == "always" or (chosen == "auto" and elements >= COMPILE_MIN_ELEMENTS)


class _EagerTiles:
    """The two functions for eager runs, over preallocated scratch (no per-tile allocation: on CPU a
    fresh ``[C, V_t]`` temporary per line costs more than the arithmetic).

    The log-sum-exp of each tile comes from one ``log_softmax`` pass into scratch, read off at the
    row's maximum: ``lse = max(x) − max(log_softmax(x))`` (``max(log_softmax(x)) = −log Σ exp(x −
    max x)`` exactly, so this is the textbook formula with the sum as PyTorch's kernel forms it).
    """

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device, epsilon):
        self.scratch = torch.empty(shape, dtype=_compute_dtype(torch.empty((), dtype=dtype)), device=device)
        self.mix = torch.empty_like(self.scratch) if epsilon is not None else None
        self.epsilon = epsilon

    def _row_lse(self, x: torch.Tensor) -> torch.Tensor:
        log_probs = torch.ops.aten._log_softmax.out(x, 1, False, out=scratch_view(self.scratch, *x.shape))
        return x.amax(1).double() - log_probs.amax(1).double()

    def log_sum_exps(self, z: torch.Tensor, z_ref: torch.Tensor | None) -> list[torch.Tensor]:
        out = [self._row_lse(z)]
        if z_ref is not None:
            out.append(self._row_lse(z_ref))
            if self.epsilon is not None:  # (1+ε) z − ε z_ref = lerp(z, z_ref, −ε), and with +ε
                for weight in (-self.epsilon, self.epsilon):
                    mixed = torch.lerp(z, z_ref, weight, out=scratch_view(self.mix, *z.shape))
                    out.append(self._row_lse(mixed))
        return out


def scratch_view(buf: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous ``[rows, cols]`` view at the start of ``buf``'s storage (``rows·cols ≤ buf.numel()``)."""
    return buf.view(-1)[: rows * cols].view(rows, cols)


def _eager_neg_softmax_times_(z: torch.Tensor, lse: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return z.sub_(lse[:, None]).exp_().mul_(-g[:, None])


def log_sum_exps_for(
    elements: int, tile: tuple[int, int], dtype: torch.dtype, device: torch.device, epsilon: float | None
) -> Callable:
    """``log_sum_exps(z, z_ref) -> list`` for one forward call of the torch backend: compiled (see
    `should_compile`) or eager over scratch for tiles up to ``tile`` (``[C, V_t]``) of ``dtype``, with
    the mixtures at ``epsilon`` (``None``: no mixtures). The same quantities as `log_sum_exps`
    either way (eagerly, the mixtures are formed in the tile's dtype).
    """
    if should_compile(elements, device):
        eps = None if epsilon is None else torch.tensor(epsilon, dtype=torch.float64, device=device)

        def fused_log_sum_exps(z, z_ref):
            return _LOG_SUM_EXPS.compiled(z, z_ref, eps)

        return fused_log_sum_exps
    return _EagerTiles(tile, dtype, device, epsilon).log_sum_exps


def neg_softmax_times_for(elements: int, device: torch.device) -> Callable:
    """``neg_softmax_times_(z, lse, g) -> z`` for one backward call: compiled (see `should_compile`)
    or eager in the tile's dtype; in place either way, so it needs no scratch."""
    return _NEG_SOFTMAX_TIMES.compiled if should_compile(elements, device) else _eager_neg_softmax_times_


class _EagerExp:
    """`log_sum_exps_and_exp_` eagerly: the tile's log-sum-exps from `_EagerTiles`, then the
    exponentials in place, the chain factor in preallocated scratch."""

    def __init__(self, shape, dtype, device, epsilon, softcap):
        self.tiles = _EagerTiles(shape, dtype, device, epsilon)
        self.softcap = softcap

    def __call__(self, z, z_ref, shift):
        out = self.tiles.log_sum_exps(z, z_ref)
        new_shift = torch.maximum(shift, z.amax(1).double())
        chain = None
        if self.softcap is not None:  # taken before z is overwritten
            chain = torch.div(z, self.softcap, out=scratch_view(self.tiles.scratch, *z.shape))
            chain.square_().neg_().add_(1.0)
        z.sub_(new_shift.to(z.dtype)[:, None]).exp_()
        if chain is not None:
            z.mul_(chain)
        return out, new_shift.to(z.dtype).double()


def log_sum_exps_and_exp_for(
    elements: int,
    tile: tuple[int, int],
    dtype: torch.dtype,
    device: torch.device,
    epsilon: float | None,
    softcap: float | None,
) -> Callable:
    """``(z, z_ref, shift) -> (lses, shift)`` (`log_sum_exps_and_exp_`) for one frozen-head forward
    call: compiled (see `should_compile`) or eager over scratch for tiles up to ``tile``."""
    if should_compile(elements, device):

        def scalar(value):
            return None if value is None else torch.tensor(value, dtype=torch.float64, device=device)

        eps, cap = scalar(epsilon), scalar(softcap)

        def fused(z, z_ref, shift):
            return _LOG_SUM_EXPS_AND_EXP.compiled(z, z_ref, eps, shift, cap)

        return fused
    return _EagerExp(tile, dtype, device, epsilon, softcap)
