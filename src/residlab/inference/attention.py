"""Attention patterns per head, from an eager pass.

SDPA and flash attention never materialise the weights, so the pass that reads them switches
the model to eager attention for its own duration (:func:`eager_attention`) and restores the
implementation afterwards, also on error. Weights are taken from each selected block's attention
module through the interventions engine (:class:`residlab.hooks.AttentionPattern`): one pattern
per query head, so grouped-query models report their true number of heads.

Memory is bounded for long prompts: one prompt at a time, and the selected layers in groups
small enough that their ``(H, T, T)`` float32 weights fit a budget; each group is one forward.

    from residlab.inference import attention_patterns
    weights = attention_patterns(loaded, token_ids, layers=[3, 5])   # (2, H, T, T)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from residlab.arch import Arch, resolve_arch, unwrap_model
from residlab.errors import UsageError
from residlab.hooks import AttentionPattern, intervene

__all__ = ["ATTENTION_BUDGET", "attention_patterns", "eager_attention", "layer_groups",
           "n_attention_heads"]

log = logging.getLogger(__name__)
ATTENTION_BUDGET = 512 * 2**20  # bytes of float32 weights one forward may hold


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Run the block with the model on eager attention, then put its implementation back."""
    lm = unwrap_model(model)
    config = lm.config
    before = getattr(config, "_attn_implementation", None)
    if before == "eager":
        yield
        return
    can_switch = getattr(lm, "_can_set_attn_implementation", lambda: False)
    if not hasattr(lm, "set_attn_implementation") or not can_switch():
        raise UsageError(
            f"{type(lm).__name__} runs {before!r} attention, which gives no weights, and cannot "
            "be switched to eager at run time; load it with attn_implementation='eager'")
    lm.set_attn_implementation("eager")
    try:
        yield
    finally:
        lm.set_attn_implementation(before)


def n_attention_heads(arch: Arch, model: nn.Module) -> int:
    """The model's query-head count, from its (text) config."""
    config = getattr(unwrap_model(model).config, "text_config", None) or \
        unwrap_model(model).config
    for key in ("num_attention_heads", "n_head", "num_heads"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    raise UsageError(f"cannot find the number of attention heads of {arch.family!r}")


def layer_groups(layers: Sequence[int], *, heads: int, tokens: int,
                 budget: int = ATTENTION_BUDGET) -> list[list[int]]:
    """``layers`` split so one group's ``(H, T, T)`` float32 weights fit ``budget``."""
    per_layer = heads * tokens * tokens * 4
    size = max(1, budget // per_layer)
    return [list(layers[i:i + size]) for i in range(0, len(layers), size)]


def patterns_of_prompt(model: nn.Module, arch: Arch, token_ids: Sequence[int],
                       layers: Sequence[int], *, dtype: torch.dtype = torch.float32,
                       budget: int = ATTENTION_BUDGET) -> torch.Tensor:
    """``(len(layers), H, T, T)`` weights of one prompt on CPU in ``dtype``; the model must
    already run eager attention (see :func:`eager_attention`)."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(token_ids)], device=device)  # (1, T)
    groups = layer_groups(layers, heads=n_attention_heads(arch, model), tokens=len(token_ids),
                          budget=budget)
    out = []
    for group in groups:
        patterns = [AttentionPattern(layer, device="cpu", dtype=dtype) for layer in group]
        with torch.inference_mode(), intervene(model, patterns, arch=arch):
            arch.body(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        out.extend(p.chunks[0][0] for p in patterns)  # (H, T, T) each
    return torch.stack(out)  # (L, H, T, T)


def attention_patterns(loaded, token_ids: Sequence[int], *, layers: Sequence[int] | None = None,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-head attention weights of one prompt: ``(len(layers), H, T, T)`` on CPU, rows summing
    to 1, zero above the diagonal (``loaded``: a loaded model, or a bare causal LM; ``layers``
    default to all, negative counting from the end). The dashboard calls this on demand."""
    model = loaded if isinstance(loaded, nn.Module) else loaded.model
    arch = resolve_arch(model)
    if not token_ids:
        raise UsageError("attention patterns need at least one token")
    chosen = sorted({arch.normalize_layer(layer) for layer in layers}) if layers is not None \
        else list(range(arch.n_layers))
    with eager_attention(model):
        return patterns_of_prompt(model, arch, token_ids, chosen, dtype=dtype)
