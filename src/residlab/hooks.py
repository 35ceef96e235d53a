"""The interventions engine: every feature that reads or changes activations goes through here.

An intervention names a site ``(layer, site)`` resolved through :mod:`residlab.arch` and the
token positions it applies to. :func:`intervene` registers PyTorch hooks for a list of them and
always removes them when its ``with`` block ends, also on exceptions::

    with intervene(model, [Add(6, vectors), Capture(6, "resid_post")]) as handle:
        model.generate(...)

Positions are classified per forward call from the 2-D attention mask that the model body
receives (pad = mask 0) and from how many tokens are already in the KV cache, never from
indices inside the current chunk: the first cache-less forward is the prompt, every later
chunk under ``generate`` is generated tokens. Pad positions are never modified or selected.
Hooks return new tensors and leave the model's own outputs untouched.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from residlab.arch import Arch, resolve_arch
from residlab.errors import NotFound, UsageError

__all__ = [
    "POSITIONS",
    "Add",
    "Capture",
    "Intervention",
    "InterventionHandle",
    "Positions",
    "apply_interventions",
    "intervene",
]

Positions = Literal["all", "prompt", "generated"]
POSITIONS: tuple[str, ...] = get_args(Positions)


@dataclass
class Add:
    """Add ``vectors`` at a site: shape ``(d_model,)`` for every row or ``(batch, d_model)``
    so each batch row carries its own direction and scale."""

    layer: int
    vectors: torch.Tensor
    site: str = "resid_pre"
    positions: Positions = "all"


@dataclass
class Capture:
    """Record the activation at a site, one chunk per forward call.

    ``chunks[i]`` is ``(batch, chunk_len, d_model)`` and ``masks[i]`` ``(batch, chunk_len)``
    marks the positions that are real tokens and selected by ``positions``.
    """

    layer: int
    site: str = "resid_post"
    positions: Positions = "all"
    device: str | torch.device | None = None  # move chunks here (e.g. "cpu"); None keeps them
    chunks: list[torch.Tensor] = field(default_factory=list, init=False, repr=False)
    masks: list[torch.Tensor] = field(default_factory=list, init=False, repr=False)

    def values(self) -> torch.Tensor:
        """All chunks joined along time: ``(batch, total_len, d_model)``."""
        if not self.chunks:
            raise NotFound("nothing was captured: run a forward pass inside intervene()")
        return torch.cat(self.chunks, dim=1)

    def mask(self) -> torch.Tensor:
        """``(batch, total_len)`` bool: real, selected positions of :meth:`values`."""
        return torch.cat(self.masks, dim=1)

    def selected(self) -> torch.Tensor:
        """Selected positions of every row stacked: ``(n_selected, d_model)``."""
        return self.values()[self.mask()]

    def clear(self) -> None:
        self.chunks.clear()
        self.masks.clear()


Intervention = Add | Capture


class _ForwardState:
    """Which positions of the current forward chunk are real, prompt or generated."""

    def __init__(self) -> None:
        self.valid: torch.Tensor | None = None  # (B, T) bool, False on pads
        self.absolute: torch.Tensor | None = None  # (T,) position of each chunk token
        self.prompt_len = 0

    def update(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs["inputs_embeds"]
        batch, length = tokens.shape[:2]
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            past = mask.shape[1] - length
            valid = mask[:, past:].bool()
        else:
            cache = kwargs.get("past_key_values")
            past = cache.get_seq_length() if cache is not None else 0
            valid = torch.ones(batch, length, dtype=torch.bool, device=tokens.device)
        if past == 0:
            self.prompt_len = length
        self.valid = valid  # (B, T)
        self.absolute = torch.arange(past, past + length, device=valid.device)  # (T,)

    def select(self, positions: str, device: torch.device) -> torch.Tensor:
        """``(B, T)`` bool mask of the positions an intervention applies to."""
        if self.valid is None or self.absolute is None:
            raise RuntimeError("intervention hook ran before the model body's forward")
        if positions == "all":
            chosen = self.valid
        elif positions == "prompt":
            chosen = self.valid & (self.absolute < self.prompt_len)[None, :]
        else:
            chosen = self.valid & (self.absolute >= self.prompt_len)[None, :]
        return chosen.to(device, non_blocking=True)


def _split(output: Any) -> tuple[torch.Tensor, Any]:
    """Hidden states and a function to put a replacement back (tuple or tensor outputs)."""
    if isinstance(output, torch.Tensor):
        return output, lambda new: new
    return output[0], lambda new: (new, *output[1:])


def _add_rows(hidden: torch.Tensor, add: Add, chosen: torch.Tensor) -> torch.Tensor:
    vectors = add.vectors.to(hidden.device, hidden.dtype)
    rows = vectors.expand(hidden.shape[0], -1) if vectors.dim() == 1 else vectors  # (B, D)
    if rows.shape[0] != hidden.shape[0]:
        raise UsageError(
            f"Add at layer {add.layer} has {rows.shape[0]} vectors but the batch has "
            f"{hidden.shape[0]} rows; give one vector per row or a single (d_model,) vector"
        )
    shifted = hidden + rows[:, None, :]  # (B, T, D)
    return torch.where(chosen[:, :, None], shifted, hidden)


def _transform(state: _ForwardState, intervention: Intervention):
    """The function a hook applies to a site's activation ``(B, T, D)``."""

    def apply(hidden: torch.Tensor) -> torch.Tensor:
        chosen = state.select(intervention.positions, hidden.device)  # (B, T)
        if isinstance(intervention, Add):
            return _add_rows(hidden, intervention, chosen)
        stored = hidden.detach()
        if intervention.device is not None:
            stored = stored.to(intervention.device)
            chosen = chosen.to(intervention.device)
        intervention.chunks.append(stored)
        intervention.masks.append(chosen)
        return hidden

    return apply


def _register(module: nn.Module, site: str, apply) -> RemovableHandle:
    if site == "resid_pre":

        def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (apply(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": apply(kwargs["hidden_states"])}

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def post_hook(mod: nn.Module, args: tuple, output: Any) -> Any:
        hidden, rebuild = _split(output)
        return rebuild(apply(hidden))

    return module.register_forward_hook(post_hook)


class InterventionHandle:
    """Registered hooks of one :func:`apply_interventions` call; ``remove()`` undoes them."""

    def __init__(self, handles: list[RemovableHandle], interventions: Sequence[Intervention]):
        self._handles = handles
        self.interventions = list(interventions)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _check(arch: Arch, intervention: Intervention) -> None:
    if intervention.positions not in POSITIONS:
        raise UsageError(
            f"unknown positions {intervention.positions!r}; choose one of {', '.join(POSITIONS)}"
        )
    if isinstance(intervention, Add):
        vectors = intervention.vectors
        if vectors.dim() not in (1, 2) or vectors.shape[-1] != arch.d_model:
            raise UsageError(
                f"Add vectors have shape {tuple(vectors.shape)}; expected ({arch.d_model},) or "
                f"(batch, {arch.d_model}) for this model's hidden size"
            )
        if not torch.isfinite(vectors).all():
            raise UsageError("Add vectors contain NaN or infinite values")


def apply_interventions(
    model: nn.Module, interventions: Sequence[Intervention], *, arch: Arch | None = None
) -> InterventionHandle:
    """Register hooks for ``interventions`` (in order) and return a handle to remove them.

    Prefer :func:`intervene`, which removes them for you.
    """
    if not interventions:
        return InterventionHandle([], [])
    arch = arch or resolve_arch(model)
    for intervention in interventions:
        _check(arch, intervention)
    state = _ForwardState()
    handles = [arch.body.register_forward_pre_hook(
        lambda mod, args, kwargs: state.update(mod, args, kwargs), with_kwargs=True
    )]
    try:
        for intervention in interventions:
            module = arch.site_module(intervention.layer, intervention.site)
            handles.append(_register(module, intervention.site, _transform(state, intervention)))
    except BaseException:
        InterventionHandle(handles, interventions).remove()
        raise
    return InterventionHandle(handles, interventions)


@contextmanager
def intervene(
    model: nn.Module, interventions: Sequence[Intervention], *, arch: Arch | None = None
) -> Iterator[InterventionHandle]:
    """Apply ``interventions`` inside a ``with`` block; hooks are removed on exit or error."""
    handle = apply_interventions(model, interventions, arch=arch)
    try:
        yield handle
    finally:
        handle.remove()
