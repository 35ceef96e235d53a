"""Where things live inside each supported model family.

Every feature that touches activations asks this module where a site is, so adding a new
architecture means adding one row to ``LAYOUTS`` (or passing ``layers_path`` by hand).

Sites, for block ``L``:

- ``resid_pre``  the residual stream entering block L (the block's input);
- ``resid_post`` the residual stream leaving block L (the block's output);
- ``attn_out``   the attention sub-layer's contribution that is added to the residual;
- ``mlp_out``    the MLP sub-layer's contribution that is added to the residual.

For post-norm families (Gemma2/3, OLMo2) the contribution is the output of the norm applied
*after* the sub-layer, so ``attn_out + mlp_out == resid_post - resid_pre`` holds everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

from residlab.errors import UsageError

__all__ = ["SITES", "Arch", "Layout", "LAYOUTS", "Site", "normalize_layer", "resolve_arch",
           "unwrap_model"]

Site = Literal["resid_pre", "resid_post", "attn_out", "mlp_out"]
SITES: tuple[str, ...] = get_args(Site)


@dataclass(frozen=True)
class Layout:
    """Attribute paths for one family, relative to the causal-LM module."""

    body: str  # module that receives input_ids / attention_mask (holds the blocks)
    blocks: str  # ModuleList of transformer blocks, relative to body
    final_norm: str  # relative to body
    attn: str | None  # relative to a block: module whose output is the attention contribution
    mlp: str | None  # relative to a block: module whose output is the MLP contribution
    attention: str | None = "self_attn"  # relative to a block: returns (output, weights)


_PRE_NORM = Layout("model", "layers", "norm", "self_attn", "mlp")
_POST_NORM = Layout(
    "model", "layers", "norm", "post_attention_layernorm", "post_feedforward_layernorm"
)

LAYOUTS: dict[str, Layout] = {
    "llama": _PRE_NORM,
    "mistral": _PRE_NORM,
    "qwen2": _PRE_NORM,
    "qwen3": _PRE_NORM,
    "gemma": _PRE_NORM,
    "phi3": _PRE_NORM,
    "olmo": _PRE_NORM,
    "gemma2": _POST_NORM,
    "gemma3_text": _POST_NORM,
    "olmo2": _POST_NORM,
    "gemma3": Layout(
        "model.language_model", "layers", "norm", "post_attention_layernorm",
        "post_feedforward_layernorm",
    ),
    "gpt2": Layout("transformer", "h", "ln_f", "attn", "mlp", "attn"),
    "gpt_neox": Layout("gpt_neox", "layers", "final_layer_norm", "attention", "mlp",
                       "attention"),
}


def normalize_layer(layer: int, n_layers: int, family: str = "transformer") -> int:
    """The one place a layer request becomes an index in ``[0, n_layers)``: ``-1`` is the last
    layer; out of range is an error that says the valid range (never a silent snap)."""
    if not -n_layers <= layer < n_layers:
        raise UsageError(
            f"layer {layer} is out of range for this {family} model with {n_layers} layers; "
            f"use 0..{n_layers - 1} (or -{n_layers}..-1 counting from the end)"
        )
    return layer % n_layers


def _get(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the causal LM inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


@dataclass(frozen=True)
class Arch:
    """Resolved locations inside one loaded model."""

    family: str
    body: nn.Module
    blocks: nn.ModuleList
    final_norm: nn.Module | None
    unembed: nn.Module | None
    attn_name: str | None
    mlp_name: str | None
    d_model: int
    logit_softcap: float | None = None  # Gemma2/3 squash final logits with tanh
    attention_name: str | None = None  # relative to a block: the attention module itself

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from final-normed hidden states ``(..., D) -> (..., V)``, as the LM head does."""
        if self.unembed is None:
            raise UsageError(f"no unembedding found for family {self.family!r}")
        logits = self.unembed(hidden)
        if self.logit_softcap:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def normalize_layer(self, layer: int) -> int:
        """Map a possibly negative layer index into ``[0, n_layers)`` or raise."""
        return normalize_layer(layer, self.n_layers, self.family)

    def site_module(self, layer: int, site: str) -> nn.Module:
        """Module whose input (resid_pre) or output (other sites) is the site's activation."""
        if site not in SITES:
            raise UsageError(f"unknown site {site!r}; choose one of {', '.join(SITES)}")
        block = self.blocks[self.normalize_layer(layer)]
        if site in ("resid_pre", "resid_post"):
            return block
        name = self.attn_name if site == "attn_out" else self.mlp_name
        if name is None:
            raise UsageError(
                f"site {site!r} is not known for family {self.family!r} (layers given by hand); "
                "use resid_pre or resid_post"
            )
        return _get(block, name)

    def attention_module(self, layer: int) -> nn.Module:
        """The attention module of block ``layer``: it returns ``(output, weights)``, where
        weights exist only under an implementation that computes them (eager)."""
        block = self.blocks[self.normalize_layer(layer)]
        try:
            return _get(block, self.attention_name or "")
        except AttributeError:
            raise UsageError(
                f"cannot find the attention module of {type(block).__name__} in family "
                f"{self.family!r} (looked for {self.attention_name!r}); add it to "
                "residlab.arch.LAYOUTS"
            ) from None


def _text_config(model: nn.Module):
    return getattr(model.config, "text_config", None) or model.config


def _hidden_size(model: nn.Module) -> int:
    config = _text_config(model)
    for key in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    raise UsageError(f"cannot find the hidden size in the config of {type(model).__name__}")


def resolve_arch(model: nn.Module, layers_path: str | None = None) -> Arch:
    """Find blocks, norms and unembedding of ``model``.

    ``layers_path`` (e.g. ``"model.layers"``) overrides the family table for models it does
    not know; then only the ``resid_pre`` / ``resid_post`` sites are available.
    """
    lm = unwrap_model(model)
    family = getattr(lm.config, "model_type", type(lm).__name__)
    unembed = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if layers_path is not None:
        body_path, _, blocks_name = layers_path.rpartition(".")
        try:
            body = _get(lm, body_path) if body_path else lm
            blocks = getattr(body, blocks_name)
        except AttributeError:
            raise UsageError(
                f"layers_path {layers_path!r} does not exist in {type(lm).__name__}; "
                "print(model) to see its module names"
            ) from None
        if not isinstance(blocks, nn.ModuleList):
            raise UsageError(f"layers_path {layers_path!r} is not a ModuleList of blocks")
        return Arch(family, body, blocks, None, unembed, None, None, _hidden_size(lm))
    layout = LAYOUTS.get(family)
    if layout is None:
        raise UsageError(
            f"unsupported model family {family!r} ({type(lm).__name__}); pass the dotted path "
            "of its block list by hand, e.g. layers_path: model.layers"
        )
    body = _get(lm, layout.body)
    return Arch(
        family=family,
        body=body,
        blocks=_get(body, layout.blocks),
        final_norm=_get(body, layout.final_norm),
        unembed=unembed,
        attn_name=layout.attn,
        mlp_name=layout.mlp,
        d_model=_hidden_size(lm),
        logit_softcap=getattr(_text_config(lm), "final_logit_softcapping", None),
        attention_name=layout.attention,
    )
