"""Logit lens: what each layer's residual stream would predict if the model stopped there.

A layer's block output (``resid_post``) goes through the model's own final norm and
unembedding, with the family's final-logit soft-cap (Gemma2/3), in float32 whatever the model's
dtype, so the last layer reproduces the model's logits. The "embed" row is the input to block 0
(embedding, scaled as the model scales it). For every position ``i`` but the last, the next token
is the stored ``token_ids[i + 1]``: never a re-encoded string.

    from residlab.inference import logit_lens
    lens = logit_lens(loaded, token_ids, layers=[10, 20], top_k=10)
    lens.top_ids[2, 5]   # the 10 most likely next tokens at position 5 after block 20
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from residlab.arch import Arch, resolve_arch
from residlab.errors import UsageError
from residlab.generation import padded_inputs
from residlab.hooks import Capture, intervene

__all__ = ["EMBED", "Lens", "LensReadout", "logit_lens"]

EMBED = "embed"
VOCAB_CHUNK = 16384  # unembedding rows cast to float32 at a time
TOKEN_CHUNK = 256  # positions whose full logits are held at once


@dataclass(frozen=True)
class LensReadout:
    """One prompt's lens. Rows follow ``layers`` ("embed" first when asked); columns are the
    positions ``0..T-2`` (each predicting the token after it)."""

    layers: list[int | str]
    top_ids: torch.Tensor  # (L, T-1, k) int64, most likely first
    top_probs: torch.Tensor  # (L, T-1, k) float32
    actual_ids: torch.Tensor  # (T-1,) int64: token_ids[1:]
    actual_rank: torch.Tensor  # (L, T-1) int64, 1 = the most likely token
    actual_prob: torch.Tensor  # (L, T-1) float32


class Lens:
    """The final norm and unembedding of one model, applied in float32.

    The norm is copied once in float32 (norm modules are small; LayerNorm would refuse float32
    input against bf16 weights). The unembedding is cast a block of rows at a time, so a large
    vocabulary never needs a second full-size float32 copy.
    """

    def __init__(self, model: nn.Module, arch: Arch | None = None):
        self.arch = arch or resolve_arch(model)
        if self.arch.final_norm is None or self.arch.unembed is None:
            raise UsageError(
                f"the logit lens needs the final norm and unembedding of family "
                f"{self.arch.family!r}, which residlab does not know; add it to "
                "residlab.arch.LAYOUTS")
        self.norm = copy.deepcopy(self.arch.final_norm).to(torch.float32)
        weight = getattr(self.arch.unembed, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise UsageError(f"the unembedding of {self.arch.family!r} has no plain weight "
                             "matrix (quantized?); the logit lens needs one")
        self.weight = weight  # (V, D)
        bias = getattr(self.arch.unembed, "bias", None)
        self.bias = bias.float() if isinstance(bias, torch.Tensor) else None  # (V,)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` residual states -> ``(N, V)`` float32 logits, soft-capped."""
        normed = self.norm(hidden.to(self.weight.device, torch.float32))  # (N, D)
        if self.weight.dtype == torch.float32:
            logits = normed @ self.weight.T  # (N, V)
        else:  # cast a block of rows at a time: never a second full-size copy
            logits = torch.cat([normed @ self.weight[start:start + VOCAB_CHUNK].float().T
                                for start in range(0, self.weight.shape[0], VOCAB_CHUNK)],
                               dim=1)  # (N, V)
        if self.bias is not None:
            logits += self.bias
        cap = self.arch.logit_softcap
        return torch.tanh(logits / cap) * cap if cap else logits

    def readout(self, hidden: torch.Tensor, actual: torch.Tensor, top_k: int):
        """``hidden`` ``(N, D)`` and the actual next ids ``(N,)`` -> top ids / probs ``(N, k)``,
        actual rank and probability ``(N,)``."""
        ids, probs, ranks, actual_probs = [], [], [], []
        actual = actual.to(self.weight.device)
        for start in range(0, hidden.shape[0], TOKEN_CHUNK):
            chunk = slice(start, start + TOKEN_CHUNK)
            log_probs = torch.log_softmax(self.logits(hidden[chunk]), dim=-1)  # (n, V)
            top = log_probs.topk(min(top_k, log_probs.shape[-1]), dim=-1)
            own = log_probs.gather(1, actual[chunk, None])  # (n, 1)
            ids.append(top.indices)
            probs.append(top.values.exp())
            # Counted in int32: summing the (n, V) comparison as the default int64 costs
            # about twice as long, as much as the log-softmax itself.
            ranks.append((log_probs > own).sum(dim=1, dtype=torch.int32).long() + 1)
            actual_probs.append(own[:, 0].exp())
        return (torch.cat(ids).cpu(), torch.cat(probs).cpu(), torch.cat(ranks).cpu(),
                torch.cat(actual_probs).cpu())


def _captures(layers: Sequence[int], embed: bool) -> list[tuple[int | str, Capture]]:
    rows: list[tuple[int | str, Capture]] = [(EMBED, Capture(0, "resid_pre"))] if embed else []
    return rows + [(layer, Capture(layer, "resid_post")) for layer in layers]


def lens_batch(model: nn.Module, lens: Lens, rows: Sequence[Sequence[int]], layers: Sequence[int],
               *, top_k: int, pad_id: int, embed: bool = True) -> list[LensReadout]:
    """One prefill forward over ``rows`` (left-padded, counted positions), then the lens of
    every row; pads are stripped, so a row reads the same in any batch."""
    captures = _captures(layers, embed)
    inputs = padded_inputs(rows, pad_id, lens.weight.device)
    with torch.inference_mode(), intervene(model, [c for _, c in captures], arch=lens.arch,
                                           prompt_mask=inputs["attention_mask"]):
        lens.arch.body(**inputs, use_cache=False)
    width = inputs["input_ids"].shape[1]
    out = []
    with torch.inference_mode():
        for row, ids in enumerate(rows):
            start = width - len(ids)
            actual = torch.tensor(ids[1:], dtype=torch.long)  # (T-1,)
            hidden = torch.stack([c.chunks[0][row, start:-1] for _, c in captures])  # (L, T-1, D)
            flat = hidden.reshape(-1, hidden.shape[-1])  # (L*(T-1), D)
            top_ids, top_probs, ranks, probs = lens.readout(
                flat, actual.repeat(len(captures)), top_k)
            shape = (len(captures), len(ids) - 1)
            out.append(LensReadout([name for name, _ in captures],
                                   top_ids.reshape(*shape, -1), top_probs.reshape(*shape, -1),
                                   actual, ranks.reshape(shape), probs.reshape(shape)))
    return out


def logit_lens(loaded, token_ids: Sequence[int], *, layers: Sequence[int] | None = None,
               top_k: int = 50, embed: bool = True) -> LensReadout:
    """The lens of one prompt (``loaded``: a loaded model, or a bare causal LM): top-k next-token
    predictions after each layer in ``layers`` (default: all; negative counts from the end) and
    the actual next token's rank and probability. The dashboard calls this on demand."""
    model = loaded if isinstance(loaded, nn.Module) else loaded.model
    lens = Lens(model)
    if len(token_ids) < 2:
        raise UsageError("the logit lens needs at least 2 tokens (it predicts each next one)")
    if top_k < 1:
        raise UsageError(f"top_k {top_k}: use a positive number")
    chosen = sorted({lens.arch.normalize_layer(layer) for layer in layers}) if layers is not None \
        else list(range(lens.arch.n_layers))
    tokenizer = getattr(loaded, "tokenizer", None)
    pad = (tokenizer.pad_token_id if tokenizer is not None else None) or 0
    return lens_batch(model, lens, [list(token_ids)], chosen, top_k=top_k, pad_id=pad,
                      embed=embed)[0]
