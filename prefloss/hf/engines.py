"""The LM head under the distributed engines: DDP, FSDP2 and DeepSpeed ZeRO-3.

The fused op reads the output head's weight ``W [V, H]`` directly, outside the head module's own
``forward``. A sharding engine keeps ``W`` whole only inside that forward (and the matching
backward); everywhere else it holds a shard (FSDP2: a ``DTensor``; ZeRO-3: a ``[0]`` placeholder).
This module is the one place that knows each engine's mechanism. Its interface:

    with gathered_heads(policy, ref) as heads:        # W whole for the fused forward
        hidden = heads.release_after_backward(hidden)
        out = loss_fn(hidden, heads.policy.weight, labels, ref_weight=heads.ref.weight, ...)
        loss = heads.gather_before_backward(out.loss)  # W whole again for the fused backward

* forward: each sharded head is gathered once (not per chunk) for the whole fused op, and released
  when the block ends; a head the engine already holds whole is used as it is;
* backward: an identity node on the loss gathers the policy head before the fused op's backward
  runs; an identity node on the hidden states releases it after (autograd runs the weight's
  gradient accumulation, where the engine's own reduction hook fires, before it: accumulation
  nodes come first in the ready queue). The gradient goes to the engine's own parameter (FSDP2: the
  unsharded parameter, reduce-scattered by FSDP's post-backward; ZeRO-3: the partitioned parameter,
  reduced by ZeRO's gradient hook), so it is reduced exactly like every other parameter's.

Mechanisms, all public API of the engines:

* DDP / one process / ZeRO-1/2: nothing to do (`WholeHead`).
* FSDP2 (``fully_shard``): ``unshard()`` / ``reshard()`` of the FSDP unit that owns the head (the
  head's own unit, or the nearest wrapped ancestor, e.g. the root). When that unit is the root, the
  backward leaves it unsharded: FSDP's own pre-backward of the root would gather it again at once,
  and its post-backward reshards it (`FSDP2Head`).
* DeepSpeed ZeRO-3: ``deepspeed.zero.GatheredParameters`` around the fused forward and around the
  fused backward (`DeepSpeedHead`).
* FSDP1 (``FullyShardedDataParallel``): refused with a clear error (its flat parameters expose no
  per-parameter gather); use FSDP2.

Hidden states must come from the engine-wrapped forward as an *output* (see
`prefloss.hf.model.decoder_hidden_states`), so that the engine's pre-backward hooks run before the
backward of whatever produced them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from prefloss.hf.heads import OutputHead, output_head, unwrap_model

__all__ = [
    "DeepSpeedHead",
    "FSDP2Head",
    "GatheredHeads",
    "HeadAccess",
    "WholeHead",
    "engine_name",
    "gathered_heads",
    "head_access",
    "prepare_reference",
]


class HeadAccess:
    """How one engine makes a model's output head whole for the fused op.

    Subclasses set ``engine`` (a name for messages) and implement `is_gathered`, `gather`,
    `release`. ``keep_after_backward`` says whether the backward leaves the head gathered because
    the engine itself gathers it next and releases it at the end of the backward.
    """

    engine = "none"
    keep_after_backward = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def is_gathered(self) -> bool:
        raise NotImplementedError

    def gather(self) -> None:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    def head(self) -> OutputHead:
        """The `OutputHead` as it is now (whole only while gathered)."""
        return output_head(self.model)


class WholeHead(HeadAccess):
    """DDP, one process, ZeRO-1/2: the head is always whole."""

    engine = "ddp/none"

    def is_gathered(self) -> bool:
        return True

    def gather(self) -> None:
        pass

    def release(self) -> None:
        pass


class FSDP2Head(HeadAccess):
    """FSDP2: ``unshard()``/``reshard()`` of the unit that owns the head.

    Args:
        model: the (unwrapped) causal LM.
        unit: the ``FSDPModule`` whose parameter group holds the head's weight.
        is_root: ``unit`` is the outermost FSDP unit (FSDP's root pre-backward gathers it anyway).
    """

    engine = "FSDP2"

    def __init__(self, model: nn.Module, unit: nn.Module, is_root: bool) -> None:
        super().__init__(model)
        self.unit = unit
        self.keep_after_backward = is_root

    def _weight(self) -> torch.Tensor:
        return unwrap_model(self.model).get_output_embeddings().weight

    def is_gathered(self) -> bool:
        from torch.distributed.tensor import DTensor

        return not isinstance(self._weight(), DTensor)

    def gather(self) -> None:
        self.unit.unshard()
        if not self.is_gathered():
            raise RuntimeError(
                f"FSDP2: unshard() of unit {type(self.unit).__name__} left the output head's weight a "
                "DTensor; the head must be managed by that unit (wrap lm_head in its own fully_shard "
                "unit, or leave it to the root)"
            )

    def release(self) -> None:
        self.unit.reshard()


class DeepSpeedHead(HeadAccess):
    """DeepSpeed ZeRO-3: ``deepspeed.zero.GatheredParameters`` over the head's weight (and bias)."""

    engine = "DeepSpeed ZeRO-3"

    def __init__(self, model: nn.Module, params: list[torch.Tensor]) -> None:
        super().__init__(model)
        self.params = params
        self._context: Any = None

    def is_gathered(self) -> bool:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        return all(p.ds_status != ZeroParamStatus.NOT_AVAILABLE for p in self.params)

    def gather(self) -> None:
        import deepspeed

        self._context = deepspeed.zero.GatheredParameters(self.params, modifier_rank=None)
        self._context.__enter__()

    def release(self) -> None:
        context, self._context = self._context, None
        if context is not None:
            context.__exit__(None, None, None)


def _is_fsdp1(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(module, FullyShardedDataParallel)


def _fsdp2_owner(model: nn.Module, head: nn.Module) -> tuple[nn.Module, bool] | None:
    """The nearest ``fully_shard`` unit at or above ``head`` in ``model`` (and whether it is the
    outermost unit), or ``None`` when nothing above the head is sharded."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return None
    head_name = next((name for name, m in model.named_modules() if m is head), None)
    if head_name is None:
        return None
    units = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, FSDPModule) and (name == "" or head_name == name or head_name.startswith(name + "."))
    ]
    if not units:
        return None
    units.sort(key=lambda item: len(item[0]))
    outermost = next((m for name, m in model.named_modules() if isinstance(m, FSDPModule)), None)
    owner = units[-1][1]
    return owner, owner is outermost


def head_access(model: nn.Module) -> HeadAccess:
    """The `HeadAccess` for ``model``'s output head under whatever engine holds it.

    Args:
        model: a causal LM, possibly wrapped (DDP, a DeepSpeed engine, accelerate), possibly
            ``fully_shard``-ed (FSDP2) or partitioned by ZeRO-3.

    Raises:
        ValueError: the model is wrapped by FSDP1, or has no output head.
    """
    outer = model
    inner = unwrap_model(model)
    for m in (outer, inner, *inner.modules()):
        if _is_fsdp1(m):
            raise ValueError(
                "FSDP (version 1, FullyShardedDataParallel) is not supported by prefloss: its flat "
                "parameters give the output head no per-parameter gather. Use FSDP2: "
                "`torch.distributed.fsdp.fully_shard`, or `fsdp_version: 2` in the accelerate config "
                "(`fsdp_config={'fsdp_version': 2}` in TrainingArguments)"
            )
    get = getattr(inner, "get_output_embeddings", None)
    head_module = get() if callable(get) else None
    if head_module is None:
        output_head(inner)  # raises the descriptive error
    weight = getattr(head_module, "weight", None)
    if hasattr(weight, "ds_id"):
        params = [weight]
        bias = getattr(head_module, "bias", None)
        if bias is not None and hasattr(bias, "ds_id"):
            params.append(bias)
        return DeepSpeedHead(inner, params)
    # A view of another model (e.g. a PEFT policy with adapters disabled) names the tree holding its head.
    tree = inner.head_owner_tree() if callable(getattr(inner, "head_owner_tree", None)) else inner
    owner = _fsdp2_owner(tree, head_module)
    if owner is not None:
        return FSDP2Head(inner, *owner)
    return WholeHead(inner)


def engine_name(model: nn.Module) -> str:
    """``"DeepSpeed ZeRO-3"``, ``"FSDP2"`` or ``"ddp/none"``: who holds ``model``'s output head."""
    return head_access(model).engine


class _OnBackward(torch.autograd.Function):
    """Identity on ``x``; when autograd reaches it in the backward, ``callback()`` runs first."""

    @staticmethod
    def forward(ctx, callback: Callable[[], None], x: torch.Tensor) -> torch.Tensor:
        ctx.callback = callback
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        ctx.callback()
        return None, grad


class GatheredHeads:
    """The whole output heads of the policy (and reference) inside `gathered_heads`.

    Attributes:
        policy: `OutputHead` of the policy, its weight whole (the engine's live parameter).
        ref: `OutputHead` of the reference, or ``None``.
        engine: the engine's name, for messages.
        gathers: how many times this object gathered a sharded head (forward and backward).
    """

    def __init__(self, policy: HeadAccess, ref: HeadAccess | None) -> None:
        self._policy_access, self._ref_access = policy, ref
        self.engine = policy.engine
        self.policy: OutputHead | None = None
        self.ref: OutputHead | None = None
        self.gathers = 0
        self._held_for_backward = False

    def _enter(self) -> list[HeadAccess]:
        gathered = []
        for access in (self._policy_access, self._ref_access):
            if access is not None and not access.is_gathered():
                access.gather()
                gathered.append(access)
                self.gathers += 1
        self.policy = self._policy_access.head()
        self.ref = self._ref_access.head() if self._ref_access is not None else None
        return gathered

    def gather_before_backward(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` unchanged; its backward gathers the policy head first (no-op without grad)."""
        if not loss.requires_grad:
            return loss
        return _OnBackward.apply(self._gather_for_backward, loss)

    def release_after_backward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` unchanged; the backward releases the policy head once the fused op is done."""
        if not hidden.requires_grad:
            return hidden
        return _OnBackward.apply(self._release_after_backward, hidden)

    def _gather_for_backward(self) -> None:
        access = self._policy_access
        if not access.is_gathered():
            access.gather()
            self.gathers += 1
            self._held_for_backward = not access.keep_after_backward

    def _release_after_backward(self) -> None:
        if self._held_for_backward:
            self._held_for_backward = False
            self._policy_access.release()


@contextmanager
def gathered_heads(policy: nn.Module, ref: nn.Module | None = None) -> Iterator[GatheredHeads]:
    """Gather the output heads of ``policy`` (and ``ref``) for one call of a fused op or loss.

    Args:
        policy: the trained model (any engine: see the module docstring).
        ref: the reference model, or ``None``.

    Yields:
        `GatheredHeads`; read ``.policy.weight`` / ``.ref.weight`` inside the block, and wrap the
        hidden states and the loss with `GatheredHeads.release_after_backward` /
        `GatheredHeads.gather_before_backward` when the loss will be back-propagated.
    """
    heads = GatheredHeads(head_access(policy), head_access(ref) if ref is not None else None)
    gathered = heads._enter()
    try:
        yield heads
    finally:
        for access in reversed(gathered):
            access.release()


# --------------------------------------------------------------------------------------------------
# The reference model, prepared by the policy's engine


def _deepspeed_reference_config(config: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """An inference config for the reference from the policy's DeepSpeed config: same ZeRO stage 3
    and precision, no optimizer or scheduler, ``"auto"`` values resolved (as TRL does)."""
    import copy

    cfg = copy.deepcopy(config)
    for key in ("optimizer", "scheduler", "train_batch_size", "gradient_clipping"):
        cfg.pop(key, None)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if cfg.get(key, "auto") == "auto":
            cfg[key] = 1
    zero = cfg.setdefault("zero_optimization", {})
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    defaults = {
        "reduce_bucket_size": (hidden or 1024) ** 2,
        "stage3_param_persistence_threshold": 10 * (hidden or 1024),
        "stage3_prefetch_bucket_size": int(0.9 * (hidden or 1024) ** 2),
    }
    for key, value in defaults.items():
        if zero.get(key) == "auto":
            zero[key] = value
    for key in ("bf16", "fp16"):
        section = cfg.get(key)
        if isinstance(section, dict) and section.get("enabled") == "auto":
            section["enabled"] = False
    return cfg


def _fsdp2_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from torch.distributed.fsdp import FSDPModule

    return [(name, m) for name, m in model.named_modules() if isinstance(m, FSDPModule)]


def _fsdp2_mixed_precision(unit: nn.Module) -> Any:
    # FSDP2 has no public getter for a unit's MixedPrecisionPolicy; its state holds it.
    state = unit._get_fsdp_state()
    return state._mp_policy


def prepare_reference(
    ref: nn.Module,
    policy: nn.Module,
    *,
    deepspeed_config: dict[str, Any] | None = None,
    mp_policy: Any = None,
) -> nn.Module:
    """Prepare the frozen reference model the way ``policy``'s engine holds the policy.

    * DeepSpeed ZeRO-3 (``policy`` is a ``DeepSpeedEngine`` or ``deepspeed_config`` is given with
      stage 3): ``deepspeed.initialize`` on ``ref`` with the policy's config minus optimizer and
      scheduler -- sharded, computing in the policy's bf16/fp16 when the config says so.
    * FSDP2 (``policy`` has ``fully_shard`` units): ``fully_shard`` on the same-named modules of
      ``ref``, inner units first, with each policy unit's ``MixedPrecisionPolicy`` (or ``mp_policy``)
      and ``reshard_after_forward=True`` (the reference never runs a backward).
    * Otherwise (DDP, one process): ``ref`` as it is, moved to the policy's device.

    In every case ``ref`` is put in eval mode with ``requires_grad=False``. Policy and reference then
    compute in the same dtype, so a reference equal to the policy gives equal log-probs.

    Args:
        ref: the reference model (unwrapped, unsharded; e.g. a copy of the initial policy).
        policy: the policy as the engine holds it.
        deepspeed_config: the policy's DeepSpeed config dict (default: ``policy.config`` when
            ``policy`` is a ``DeepSpeedEngine``).
        mp_policy: FSDP2 mixed precision for every reference unit (default: the policy unit's).

    Returns:
        The reference to pass to `prefloss.hf.step.preference_loss` (a DeepSpeed engine under ZeRO-3).

    Raises:
        ValueError: FSDP1, or a ZeRO stage-3 policy without a config to copy.
    """
    ref = unwrap_model(ref)
    ref.eval().requires_grad_(False)
    access = head_access(policy)
    stage = None
    if deepspeed_config is None and isinstance(getattr(policy, "config", None), dict):
        if hasattr(policy, "zero_optimization_stage"):  # a DeepSpeedEngine
            deepspeed_config = policy.config
    if deepspeed_config is not None:
        stage = deepspeed_config.get("zero_optimization", {}).get("stage")
    if isinstance(access, DeepSpeedHead) or stage == 3:
        if deepspeed_config is None:
            raise ValueError(
                "DeepSpeed ZeRO-3: the reference must be sharded like the policy, but no DeepSpeed "
                "config was found; pass deepspeed_config=<the policy's config dict>"
            )
        import deepspeed

        engine, *_ = deepspeed.initialize(
            model=ref, config=_deepspeed_reference_config(deepspeed_config, ref)
        )
        engine.eval()
        return engine
    if isinstance(access, FSDP2Head):
        from torch.distributed.fsdp import fully_shard

        inner_policy = unwrap_model(policy)
        units = _fsdp2_units(inner_policy)
        ref_modules = dict(ref.named_modules())
        missing = [name for name, _ in units if name not in ref_modules]
        if missing:
            raise ValueError(
                f"FSDP2: the reference has no modules named {missing} (the policy's fully_shard units); "
                "expected a reference of the policy's architecture"
            )
        for name, unit in sorted(units, key=lambda item: -len(item[0].split("."))):
            if name == "":
                continue
            fully_shard(
                ref_modules[name],
                mp_policy=mp_policy if mp_policy is not None else _fsdp2_mixed_precision(unit),
                reshard_after_forward=True,
            )
        root = dict(units).get("")
        if root is None:
            raise ValueError("FSDP2: expected the policy's root module to be a fully_shard unit")
        fully_shard(
            ref,
            mp_policy=mp_policy if mp_policy is not None else _fsdp2_mixed_precision(root),
            reshard_after_forward=True,
        )
        return ref
    device = next(unwrap_model(policy).parameters()).device
    return ref.to(device)
