"""Padding-free (packed) micro-batches for Hugging Face causal LMs.

A padded micro-batch holds ``N = 2B`` rows of ``T`` tokens, ``Σ_i n_i`` of them real. Packed, the
``N`` sequences lie end to end in one row of ``L = Σ_i n_i`` tokens (the flash-attention "varlen"
layout, `prefloss.fused.segments`):

* ``input_ids``    ``[1, L]``: the real tokens of rows ``0..N-1`` in row order (chosen 0..B-1, then
  rejected 0..B-1, as the losses take them);
* ``position_ids`` ``[1, L]``: ``0, 1, ..., n_i - 1`` for sequence ``i`` (restarting at each sequence);
* ``labels``       ``[1, L]``: the shifted labels of the real positions; the last position of every
  sequence is ``ignore_index`` (it would otherwise be scored with the next sequence's first token);
* ``cu_seqlens``   ``[N+1]`` int64: sequence ``i`` is positions ``cu_seqlens[i] : cu_seqlens[i+1]``.

The models run with ``attention_mask=None``, these ``position_ids`` and ``use_cache=False``: from
such position ids transformers (5.x) derives a block-causal mask for ``eager``, ``sdpa`` and
``flex_attention`` (each sequence attends only to its own earlier tokens), and ``flash_attention_2``
/ ``_3`` run their variable-length kernels. With ``eager`` and ``sdpa`` the mask is a dense
``[L, L]`` one, so packing removes padding from the MLPs, the norms and the loss but not from
attention: the attention time gain belongs to GPUs with variable-length attention.

A model that mixes tokens other than through attention (state-space and recurrent layers, short
convolutions), or whose attention is not built from ``position_ids`` (ALiBi from the attention mask),
would let one sequence see the previous one. `check_packing_support` refuses what is known by name
(vision-language models too: their position ids and image tokens are not verified packed), and
`check_packed_forward` compares, once per model, the packed forward of two sequences with each run
alone, so anything else that leaks is refused before training.
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from typing import Any, NamedTuple

import torch
from torch import nn

from prefloss.fused.segments import cu_seqlens_from_mask, pack_rows
from prefloss.hf.adapters import AdapterView
from prefloss.hf.heads import unwrap_model
from prefloss.hf.model import decoder_hidden_states

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "PackedBatch",
    "check_packed_forward",
    "check_packing",
    "check_packing_support",
    "pack_batch",
    "unpack_rows",
]

# Attention implementations that honour packed position ids with attention_mask=None (transformers 5.x):
# the first three through the block-causal mask transformers builds from them, flash attention through
# its variable-length kernels (cu_seqlens from the position ids).
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")
# Layer kinds (``config.layer_types``) that mix tokens through attention only.
_ATTENTION_LAYERS = {"full_attention", "sliding_attention", "chunked_attention", "attention"}
# Model types whose layers carry a state or a convolution across tokens (a packed sequence would see
# the previous one), or whose attention bias comes from the attention mask (ALiBi): refused by name.
STATEFUL_MODEL_TYPES = (
    "bamba",
    "falcon_h1",
    "falcon_mamba",
    "granitemoehybrid",
    "jamba",
    "lfm2",
    "lfm2_moe",
    "mamba",
    "mamba2",
    "minimax",
    "nemotron_h",
    "qwen3_next",
    "recurrent_gemma",
    "rwkv",
    "xlstm",
    "zamba",
    "zamba2",
)


class PackedBatch(NamedTuple):
    """A micro-batch of ``N`` sequences packed into one row of ``L`` tokens (module docstring)."""

    input_ids: torch.Tensor  # [1, L]
    position_ids: torch.Tensor  # [1, L], 0..n_i-1 per sequence
    labels: torch.Tensor  # [1, L], ignore_index at each sequence's last position
    cu_seqlens: torch.Tensor  # [N+1] int64


def pack_batch(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int = -100,
) -> PackedBatch:
    """Pack a padded micro-batch: ``N`` rows of ``T`` tokens → one row of ``L = Σ mask`` tokens.

    Sequence ``i`` is row ``i``'s real tokens (``attention_mask[i] == 1``, one contiguous run: right
    or left padding), at packed positions ``cu_seqlens[i] : cu_seqlens[i+1]`` with position ids
    ``0..n_i-1``. ``labels`` are prefloss's shifted ones (``labels[:, t]`` is predicted from position
    ``t``); on a padded row the label at the last real position and at padding is already
    ``ignore_index`` (nothing follows it), so the packed labels score exactly the padded ones.

    Args:
        input_ids: ``[N, T]`` int64.
        attention_mask: ``[N, T]`` 0/1, or ``None`` (no padding: every token real).
        labels: ``[N, T]`` int64 shifted labels.
        ignore_index: label of positions that are not scored.

    Returns:
        `PackedBatch` (``input_ids``, ``position_ids``, ``labels`` ``[1, L]``; ``cu_seqlens``
        ``[N+1]``), on ``input_ids``' device.

    Raises:
        ValueError: shapes differ, a row has no real token or real tokens with holes, or a label
            that packing would drop is not ``ignore_index`` (at padding, or at a row's last real
            position, where it would be scored with the next sequence's first token); named.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"`input_ids` must be [N, T], got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    for name, value in (("attention_mask", attention_mask), ("labels", labels)):
        if tuple(value.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"`{name}` must have `input_ids`' shape {tuple(input_ids.shape)}, got {tuple(value.shape)}"
            )
    cu_seqlens = cu_seqlens_from_mask(attention_mask)  # checks 0/1 and non-empty rows
    mask = attention_mask.bool()
    runs = (mask & ~torch.nn.functional.pad(mask[:, :-1], (1, 0), value=False)).sum(1)  # runs of 1s
    if bool((runs > 1).any()):
        row = int((runs > 1).nonzero()[0, 0])
        raise ValueError(
            f"`attention_mask` row {row} has padding between real tokens ({mask[row].int().tolist()}); "
            "expected one contiguous run of real tokens per row (right or left padding)"
        )
    # the last real position of each row, and padding: packing drops their labels
    last = torch.zeros_like(mask)
    last[torch.arange(mask.shape[0], device=mask.device), _last_real(mask)] = True
    dropped = (~mask | last) & (labels != ignore_index)
    if bool(dropped.any()):
        row, pos = (int(v) for v in dropped.nonzero()[0])
        where = "its last real position" if mask[row, pos] else "a padding position"
        raise ValueError(
            f"`labels` row {row} position {pos} ({where}) is {int(labels[row, pos])}, expected "
            f"ignore_index={ignore_index}: a packed batch drops that label (shifted labels predict token "
            "t + 1 from position t, so a row's last real position predicts nothing)"
        )
    cu_seqlens = cu_seqlens.to(input_ids.device)
    total = int(cu_seqlens[-1])
    starts = cu_seqlens[:-1].repeat_interleave(cu_seqlens[1:] - cu_seqlens[:-1], output_size=total)
    positions = (torch.arange(total, device=input_ids.device) - starts)[None]
    packed_labels = pack_rows(labels, mask)
    packed_labels[0, cu_seqlens[1:] - 1] = ignore_index  # already so (checked); kept explicit
    return PackedBatch(pack_rows(input_ids, mask), positions, packed_labels, cu_seqlens)


def _last_real(mask: torch.Tensor) -> torch.Tensor:
    """``[N]`` index of each row's last real position (``mask``: ``[N, T]`` bool, non-empty rows)."""
    t = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask, t, -1).amax(1)


def unpack_rows(packed: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_rows`: ``[1, L, ...]`` → ``[N, T, ...]``, zeros at padding (no gradient kept
    for padding). ``attention_mask``: the ``[N, T]`` 0/1 mask the batch was packed with."""
    mask = attention_mask.bool()
    out = packed.new_zeros((*mask.shape, *packed.shape[2:]))
    out[mask] = packed[0]
    return out


def check_packing_support(model: nn.Module, model_inputs: dict[str, Any] | None = None) -> None:
    """Refuse, by name, a model that cannot run a packed batch correctly.

    Refused: model inputs beyond the tokens (a vision-language model's ``pixel_values``, ...), a
    model whose config has a vision tower (``vision_config``: multimodal position ids and image
    tokens, not verified packed), an attention implementation outside `ATTENTION_IMPLEMENTATIONS`,
    layers that mix tokens other than through attention (`STATEFUL_MODEL_TYPES`, or
    ``config.layer_types`` with a non-attention kind), and a forward without ``position_ids``.

    Raises:
        ValueError: naming the model class, its ``model_type`` and what cannot be packed.
    """
    inner = unwrap_model(model)
    base = inner.get_base_model() if callable(getattr(inner, "get_base_model", None)) else inner
    config = base.config
    model_type = getattr(config, "model_type", "?")
    name = f"{type(base).__name__} (model_type {model_type!r})"

    def refuse(why: str, fix: str) -> None:
        raise ValueError(f"padding_free=True cannot run {name}: {why}. {fix}")

    if model_inputs:
        refuse(
            f"the batch has model inputs beyond the tokens ({sorted(model_inputs)}), which are not packed",
            "Set padding_free=False",
        )
    if getattr(config, "vision_config", None) is not None:
        refuse(
            "it is a vision-language model; its multimodal position ids and image tokens are not verified "
            "in a packed batch",
            "Set padding_free=False",
        )
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    implementation = getattr(text, "_attn_implementation", None) or getattr(
        config, "_attn_implementation", None
    )
    if implementation is not None and implementation not in ATTENTION_IMPLEMENTATIONS:
        refuse(
            f"its attention implementation {implementation!r} is not known to honour packed position_ids "
            "without an attention mask",
            f"Load it with attn_implementation one of {list(ATTENTION_IMPLEMENTATIONS)}, or set "
            "padding_free=False",
        )
    kinds = set(getattr(text, "layer_types", None) or ()) - _ATTENTION_LAYERS
    stateful = {model_type, getattr(text, "model_type", None)} & set(STATEFUL_MODEL_TYPES)
    if stateful or kinds:
        what = f" (layer types {sorted(kinds)})" if kinds else ""
        refuse(
            f"its layers mix tokens other than through attention{what}, so a packed sequence would see "
            "the previous one",
            "Set padding_free=False",
        )
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if params and "position_ids" not in params:
        refuse("its forward takes no position_ids", "Set padding_free=False")


# models whose packed forward `check_packed_forward` has compared (weakly held)
_CHECKED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


@torch.no_grad()
def check_packed_forward(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *, tokens: int = 16
) -> float:
    """Check that ``model`` keeps packed sequences apart: two sequences packed in one row give the
    hidden states each gives alone (up to rounding). Once per model; later calls return 0.0.

    The sequences are the first ``tokens`` real tokens of the batch's first row and of its middle row
    (a pair's chosen and rejected response). In eval mode, without gradients.

    Returns:
        The max abs difference of the packed and the separate last hidden states.

    Raises:
        ValueError: the difference exceeds ``1e-4·max(1, max|h|)`` for fp32/fp64 hidden states (a
            correct fp32 forward differs by ~1e-7) or ``0.1·max(1, max|h|)`` for 16-bit ones (a
            coarse check there: the static refusals of `check_packing_support` cover the known
            cases), naming the model, its model_type and attention implementation.
    """
    inner = unwrap_model(model)
    if inner in _CHECKED:
        return 0.0
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    rows = [input_ids[i][mask[i]][:tokens] for i in (0, input_ids.shape[0] // 2)]  # one row: itself twice
    was_training = inner.training
    inner.eval()
    try:
        alone = [decoder_hidden_states(inner, r[None], None)[0] for r in rows]
        ids = torch.cat(rows)[None]
        positions = torch.cat([torch.arange(len(r), device=ids.device) for r in rows])[None]
        packed = decoder_hidden_states(inner, ids, None, position_ids=positions)[0]
    finally:
        inner.train(was_training)
    expected = torch.cat(alone)
    err = float((packed.float() - expected.float()).abs().max())
    full = expected.dtype in (torch.float32, torch.float64)
    allowed = (1e-4 if full else 0.1) * max(1.0, float(expected.float().abs().max()))
    if not err <= allowed:
        config = getattr(inner, "config", None)
        raise ValueError(
            f"padding_free=True cannot run {type(inner).__name__} (model_type "
            f"{getattr(config, 'model_type', '?')!r}, attn_implementation "
            f"{getattr(config, '_attn_implementation', None)!r}): two sequences packed in one row with "
            f"restarting position_ids give hidden states {err:.3g} away from each sequence run alone "
            f"(allowed {allowed:.3g}), so a packed sequence sees the previous one. Set padding_free=False"
        )
    _CHECKED.add(inner)
    implementation = getattr(getattr(inner, "config", None), "_attn_implementation", None)
    if implementation in ("eager", "sdpa"):
        warnings.warn(
            f"padding_free=True with attn_implementation={implementation!r}: transformers builds a dense "
            "[L, L] block-causal mask over the L packed tokens, so attention does L² work instead of the "
            "padded batch's N·T² (on CPU a step of 8 pairs of ~500 tokens took 2.1x the padded one); "
            "packing saves time with flash_attention_2/3 or flex_attention",
            stacklevel=2,
        )
    return err


def check_packing(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *models: nn.Module | None,
    model_inputs: dict[str, Any] | None = None,
) -> None:
    """`check_packing_support` for each model, then `check_packed_forward` on this batch (once per
    model). ``None`` models are skipped, and so is a PEFT policy's reference view (`AdapterView`: the
    policy itself under other adapters, checked as the policy)."""
    checked = [m for m in models if m is not None and not isinstance(m, AdapterView)]
    for model in checked:
        check_packing_support(model, model_inputs)
    for model in checked:
        check_packed_forward(model, input_ids, attention_mask)
