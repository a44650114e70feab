"""PEFT (LoRA) policies: the reference is the same model with its adapters disabled, not a copy.

A LoRA policy is ``base + adapters``; its reference (the initial policy) is ``base`` alone, which the
policy's own weights already hold. `AdaptersDisabled` is that reference as a read-only view: its
``forward`` runs the PEFT model inside ``disable_adapter()`` (in eval mode), and its output head is the
head the model uses without adapters -- the base head, or, when ``lm_head`` is in
``modules_to_save``, the saved module's original. Nothing is copied, so a LoRA run holds one set of
base weights instead of two, and ε-DPO (which needs the reference's logits every step) works.
`AdapterView` is the same view with a named adapter active instead (TRL's ``"ref"`` adapter, for
`prefloss.trl`).

The view registers no sub-modules: moving or freezing it cannot touch the policy.
"""

from __future__ import annotations

import contextlib
from typing import Any

from torch import nn

__all__ = ["AdapterView", "AdaptersDisabled", "is_peft_model", "check_peft_head"]


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` (possibly wrapped by DDP / DeepSpeed) is a ``peft.PeftModel``."""
    from prefloss.hf.heads import unwrap_model

    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(unwrap_model(model), PeftModel)


def _saved_module_wrapper() -> type | None:
    try:
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:  # pragma: no cover - peft not installed
        return None
    return ModulesToSaveWrapper


def check_peft_head(model: nn.Module) -> None:
    """Refuse adapters on the output head: the fused op reads ``W`` itself, so ``W + BA`` would be lost.

    Raises:
        ValueError: the output embedding is a LoRA (or other tuner) layer.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    from prefloss.hf.heads import unwrap_model

    head = unwrap_model(model).get_output_embeddings()
    if isinstance(head, BaseTunerLayer):
        raise ValueError(
            f"the output head is a PEFT {type(head).__name__} layer (lm_head in target_modules): prefloss's "
            "fused op reads the head weight directly and would ignore the adapter. Leave lm_head out of "
            "target_modules, or train it fully with modules_to_save=['lm_head']"
        )


class AdapterView(nn.Module):
    """A PEFT policy run under another adapter setting: a read-only view of the same model.

    Args:
        model: a ``peft.PeftModel`` (the policy, unwrapped).
        adapter_name: ``None``: all adapters disabled (`AdaptersDisabled`); a name: that adapter
            active instead of the policy's (TRL's ``"ref"`` adapter).

    Calling it runs ``model(...)`` in eval mode with the adapters set so (inside
    ``model.disable_adapter()``, or with ``adapter_name`` set active); the policy's mode and active
    adapter are restored after. ``get_decoder()`` is the policy's decoder, ``get_output_embeddings()``
    the head used under that setting: without adapters the base head (or, with ``lm_head`` in
    ``modules_to_save``, the saved module's original), under ``adapter_name`` that adapter's own saved
    copy when it has one. ``head_owner_tree()`` is the policy, where `prefloss.hf.engines` finds the
    FSDP2 unit holding that head.
    """

    def __init__(self, model: nn.Module, adapter_name: str | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "_peft", model)  # not a sub-module: no shared registration
        object.__setattr__(self, "_adapter_name", adapter_name)

    @property
    def config(self) -> Any:
        return self._peft.config

    def get_base_model(self) -> nn.Module:
        return self._peft.get_base_model()

    def get_decoder(self) -> nn.Module:
        return self._peft.get_decoder()

    def get_output_embeddings(self) -> nn.Module:
        head = self._peft.get_output_embeddings()
        saved = getattr(head, "modules_to_save", None)
        if self._adapter_name is not None and saved is not None and self._adapter_name in saved:
            return saved[self._adapter_name]
        wrapper = _saved_module_wrapper()
        if wrapper is not None and isinstance(head, wrapper):
            return head.original_module
        return head

    def head_owner_tree(self) -> nn.Module:
        """The module tree that holds the head (`prefloss.hf.engines` looks for its FSDP2 unit there)."""
        return self._peft

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        peft = self._peft
        with contextlib.ExitStack() as restore:  # unwound last-in first-out: adapter, then mode
            restore.callback(peft.train, peft.training)
            peft.eval()
            if self._adapter_name is None:
                restore.enter_context(peft.disable_adapter())
            else:
                restore.callback(peft.set_adapter, peft.active_adapter)
                peft.set_adapter(self._adapter_name)
            return peft(*args, **kwargs)

    def extra_repr(self) -> str:
        name = type(self._peft.get_base_model()).__name__
        if self._adapter_name is None:
            return f"adapters of {name} disabled"
        return f"adapters of {name}: {self._adapter_name!r} active"


class AdaptersDisabled(AdapterView):
    """The reference of a PEFT policy: the same model with its adapters disabled (`AdapterView` with
    no adapter name).

    Args:
        model: a ``peft.PeftModel`` (the policy, unwrapped).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, None)
