"""The interventions engine: every feature that reads or changes activations goes through here.

An intervention names a site ``(layer, site)`` resolved through :mod:`residlab.arch` and the
token positions it applies to. :func:`intervene` registers PyTorch hooks for a list of them and
always removes them when its ``with`` block ends, also on exceptions::

    with intervene(model, [Add(6, vectors), Capture(6, "resid_post")]) as handle:
        model.generate(...)

``Readout(layer, units)`` projects the activation on ``(K, d_model)`` unit vectors inside the
hook and keeps only ``(B, T, K)`` floats (live per-token trait scores).

Positions are never taken from indices inside the current forward chunk (they shift under the
KV cache). The caller hands over the padded prompt layout, ``prompt_mask`` ``(B, P)``; each
chunk's absolute positions come from how many tokens precede it (the 2-D attention mask's
length, else the cache length), so absolute ``t < P`` is prompt (a real token where
``prompt_mask[:, t]``) and ``t >= P`` generated. This holds under chunked prefill,
``use_cache=False`` re-runs and bodies that receive 4-D or per-layer-type masks (Gemma3
multimodal). Without ``prompt_mask`` pads come from a 2-D mask at the body (no mask: no pads)
and the first forward starting at position 0 is the prompt; where that cannot be told, the
hooks raise instead of guessing. Pad positions are never modified or selected. Hooks return
new tensors and leave the model's own outputs untouched.
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
    "AttentionPattern",
    "Capture",
    "Intervention",
    "InterventionHandle",
    "Positions",
    "Readout",
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


@dataclass
class AttentionPattern:
    """Record the attention weights of block ``layer``, one ``(B, H, T, S)`` chunk per forward
    (one pattern per query head, GQA included; ``S`` counts the keys, cached ones too).

    Only an implementation that computes the weights returns them (eager); SDPA and flash
    attention return ``None`` and the hook raises rather than record nothing. Chunks are moved
    to ``device`` and cast to ``dtype`` as they arrive, so one layer's weights at a time are
    held at full precision on the model's device.
    """

    layer: int
    device: str | torch.device | None = None
    dtype: torch.dtype | None = None
    positions: Positions = "all"  # the weights of every query row are kept
    chunks: list[torch.Tensor] = field(default_factory=list, init=False, repr=False)

    def clear(self) -> None:
        self.chunks.clear()


@dataclass
class Readout:
    """Projections of a site's activation on ``units`` ``(K, d_model)``, computed in the hook.

    Only ``K`` floats per token are kept, so a live readout never moves ``(T, d_model)``
    activations off the device. Per forward: ``projections[i]`` ``(B, T, K)`` is ``h . u_k``
    and ``cosines[i]`` ``(B, T, K)`` is ``h . u_k / |h|``, both in float32 whatever the model
    dtype (as :func:`residlab.inference.project.project_many` computes them offline; pass unit
    vectors to get ``h . v / |v|``); ``masks[i]`` ``(B, T)`` marks real, selected positions.
    """

    layer: int
    units: torch.Tensor
    site: str = "resid_post"
    positions: Positions = "all"
    device: str | torch.device | None = None  # move the (B, T, K) results here; None keeps them
    projections: list[torch.Tensor] = field(default_factory=list, init=False, repr=False)
    cosines: list[torch.Tensor] = field(default_factory=list, init=False, repr=False)
    masks: list[torch.Tensor] = field(default_factory=list, init=False, repr=False)

    def read(self, hidden: torch.Tensor, chosen: torch.Tensor) -> None:
        """Record the readouts of one chunk ``(B, T, D)``."""
        h = hidden.detach().float()  # (B, T, D)
        units = self.units.to(h.device, torch.float32)  # (K, D)
        proj = h @ units.T  # (B, T, K)
        norms = torch.linalg.vector_norm(h, dim=-1, keepdim=True)  # (B, T, 1)
        cosine = proj / norms.clamp(min=1e-12)  # (B, T, K)
        if self.device is not None:
            proj, cosine, chosen = (t.to(self.device) for t in (proj, cosine, chosen))
        self.projections.append(proj)
        self.cosines.append(cosine)
        self.masks.append(chosen)

    def clear(self) -> None:
        self.projections.clear()
        self.cosines.clear()
        self.masks.clear()


Intervention = Add | Capture | AttentionPattern | Readout


class _ForwardState:
    """Which positions of the current forward chunk are real, prompt or generated."""

    def __init__(self, prompt_mask: torch.Tensor | None = None) -> None:
        self.valid: torch.Tensor | None = None  # (B, T) bool, False on pads
        self.absolute: torch.Tensor | None = None  # (T,) position of each chunk token
        self.prompt_len: int | None = None
        self.layout: torch.Tensor | None = None  # (B, P + 1): prompt_mask, then True (generated)
        self.unknown_pads = ""  # why pads cannot be told (no prompt_mask)
        self.unknown_prompt = "no forward has started at position 0"  # same for prompt length
        self.started = False
        self._chosen: dict[str, torch.Tensor] = {}  # per forward: positions -> (B, T) bool
        if prompt_mask is not None:
            if prompt_mask.dim() != 2:
                raise UsageError(f"prompt_mask has shape {tuple(prompt_mask.shape)}; pass the "
                                 "(batch, prompt_len) 0/1 attention mask of the padded prompts")
            mask = prompt_mask.bool()
            self.layout = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            self.prompt_len = mask.shape[1]

    def update(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs["inputs_embeds"]
        batch, length = tokens.shape[:2]
        mask, cache = kwargs.get("attention_mask"), kwargs.get("past_key_values")
        flat = isinstance(mask, torch.Tensor) and mask.dim() == 2
        # Tokens before this chunk: int, or a 0-d device tensor for static caches (no sync).
        past = mask.shape[1] - length if flat else (
            cache.get_seq_length() if cache is not None else 0)
        self._chosen = {}
        if isinstance(past, int):
            self.absolute = torch.arange(past, past + length, device=tokens.device)  # (T,)
        else:
            self.absolute = torch.arange(length, device=tokens.device) + past  # (T,)
        if self.layout is not None:
            self.valid = self._from_layout(batch, past, length, tokens.device)
        else:
            self.valid = self._guess_pads(mask, batch, length, tokens.device)
            self._guess_prompt(past, length, fresh=cache is not None or not self.started)
        self.started = True

    def _from_layout(self, batch: int, past: int | torch.Tensor, length: int,
                     device: torch.device) -> torch.Tensor:
        """``(B, T)`` real positions of the chunk; views of the layout where possible."""
        layout, prompt_len = self.layout, self.prompt_len
        assert layout is not None and prompt_len is not None and self.absolute is not None
        if layout.shape[0] != batch:
            raise UsageError(f"prompt_mask has {layout.shape[0]} rows but the model ran "
                             f"{batch}; pass the attention mask of the batch being run")
        if layout.device != device:
            layout = self.layout = layout.to(device)
        if isinstance(past, int) and past + length <= prompt_len:
            return layout[:, past:past + length]  # inside the prompt
        if isinstance(past, int) and past >= prompt_len:
            return layout[:, prompt_len:].expand(-1, length)  # generated tokens only
        return layout[:, self.absolute.clamp(max=prompt_len)]

    def _guess_pads(self, mask: Any, batch: int, length: int, device) -> torch.Tensor | None:
        """Without a prompt layout: a 2-D mask says where pads are, no mask means none."""
        if mask is None:
            return torch.ones(batch, length, dtype=torch.bool, device=device)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            return mask[:, mask.shape[1] - length:].bool()  # (B, T)
        kind = "a dict of" if isinstance(mask, dict) else f"a {mask.dim()}-D"
        self.unknown_pads = f"the model body received {kind} attention mask"
        return None

    def _guess_prompt(self, past: int | torch.Tensor, length: int, *, fresh: bool) -> None:
        """Without a prompt layout: the forward that starts a sequence is the prompt, later
        single-token forwards are generated; anything else is ambiguous."""
        if not isinstance(past, int):
            self._unknown_prompt("the KV cache is a static cache")
        elif past == 0 and fresh:
            self.prompt_len, self.unknown_prompt = length, ""
        elif past == 0:
            self._unknown_prompt("several cache-less forwards started at position 0 "
                                 "(use_cache=False re-runs, or separate batches)")
        elif length > 1:
            self._unknown_prompt("a forward continued the sequence with several tokens "
                                 "(chunked prefill?)")

    def _unknown_prompt(self, reason: str) -> None:
        self.prompt_len, self.unknown_prompt = None, reason

    def select(self, positions: str, device: torch.device) -> torch.Tensor:
        """``(B, T)`` bool mask of the positions an intervention applies to (computed once
        per forward, shared by every hook)."""
        chosen = self._chosen.get(positions)
        if chosen is None:
            chosen = self._chosen[positions] = self._choose(positions)
        return chosen.to(device, non_blocking=True)

    def _choose(self, positions: str) -> torch.Tensor:
        if self.absolute is None:
            raise RuntimeError("intervention hook ran before the model body's forward")
        if self.valid is None:
            raise RuntimeError(f"cannot tell pads from real tokens: {self.unknown_pads}; pass "
                               "prompt_mask=<attention mask of the prompts> to intervene()")
        if positions == "all":
            return self.valid
        if self.prompt_len is None:
            raise RuntimeError(
                f"cannot tell prompt from generated positions: {self.unknown_prompt}; pass "
                "prompt_mask=<attention mask of the prompts> to intervene()")
        if positions == "prompt":
            return self.valid & (self.absolute < self.prompt_len)[None, :]  # (B, T)
        return self.valid & (self.absolute >= self.prompt_len)[None, :]


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
        if isinstance(intervention, Readout):
            intervention.read(hidden, chosen)
            return hidden
        stored = hidden.detach()
        if intervention.device is not None:
            stored = stored.to(intervention.device)
            chosen = chosen.to(intervention.device)
        intervention.chunks.append(stored)
        intervention.masks.append(chosen)
        return hidden

    return apply


def _pattern_hook(intervention: AttentionPattern, module: nn.Module):
    def post_hook(mod: nn.Module, args: tuple, output: Any) -> Any:
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise UsageError(
                f"{type(mod).__name__} (layer {intervention.layer}) returned no attention "
                "weights: its implementation does not compute them; run it with "
                "attn_implementation='eager' (residlab.inference.attention.eager_attention)"
            )
        intervention.chunks.append(weights.detach().to(intervention.device or weights.device,
                                                       intervention.dtype or weights.dtype))
        return output

    return module.register_forward_hook(post_hook)


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
    if isinstance(intervention, Readout):
        units = intervention.units
        if units.dim() != 2 or units.shape[1] != arch.d_model:
            raise UsageError(
                f"Readout units have shape {tuple(units.shape)}; expected (K, {arch.d_model}): "
                "one vector per row, of this model's hidden size"
            )


def apply_interventions(
    model: nn.Module,
    interventions: Sequence[Intervention],
    *,
    arch: Arch | None = None,
    prompt_mask: torch.Tensor | None = None,
) -> InterventionHandle:
    """Register hooks for ``interventions`` (in order) and return a handle to remove them.

    ``prompt_mask`` ``(B, P)`` is the 0/1 attention mask of the left-padded prompt batch: with
    it, pads and prompt/generated positions are known whatever the body receives. Prefer
    :func:`intervene`, which removes the hooks for you.
    """
    if not interventions:
        return InterventionHandle([], [])
    arch = arch or resolve_arch(model)
    for intervention in interventions:
        _check(arch, intervention)
    state = _ForwardState(prompt_mask)
    handles = [arch.body.register_forward_pre_hook(
        lambda mod, args, kwargs: state.update(mod, args, kwargs), with_kwargs=True
    )]
    try:
        for intervention in interventions:
            if isinstance(intervention, AttentionPattern):
                module = arch.attention_module(intervention.layer)
                handles.append(_pattern_hook(intervention, module))
                continue
            module = arch.site_module(intervention.layer, intervention.site)
            handles.append(_register(module, intervention.site, _transform(state, intervention)))
    except BaseException:
        InterventionHandle(handles, interventions).remove()
        raise
    return InterventionHandle(handles, interventions)


@contextmanager
def intervene(
    model: nn.Module,
    interventions: Sequence[Intervention],
    *,
    arch: Arch | None = None,
    prompt_mask: torch.Tensor | None = None,
) -> Iterator[InterventionHandle]:
    """Apply ``interventions`` inside a ``with`` block; hooks are removed on exit or error.

    Pass ``prompt_mask`` (the prompts' ``(B, P)`` attention mask) whenever you have it; see
    :func:`apply_interventions`.
    """
    handle = apply_interventions(model, interventions, arch=arch, prompt_mask=prompt_mask)
    try:
        yield handle
    finally:
        handle.remove()
