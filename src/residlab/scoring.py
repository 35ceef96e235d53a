"""Per-token log-probabilities of given token ids under a model, cheaply.

The model body runs once over a left-padded batch; the LM head is applied only to the
positions that predict scored tokens, and the float32 log-softmax runs over chunks of those
positions, so memory stays at ``chunk x vocab`` instead of ``batch x seq x vocab``.

The LM head itself runs in float32 (hidden rows and unembedding upcast, then the family's
soft-cap): a bf16 head rounds logits of size ~20 to steps of 0.125, which moves a token's
log-prob by up to ~0.06 nat, more than the effects a noising sweep looks for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from residlab.arch import Arch
from residlab.errors import UsageError
from residlab.generation import padded_inputs

__all__ = ["ScoreRow", "float32_head", "score_rows"]


@dataclass(frozen=True)
class ScoreRow:
    """Token ids of a whole sequence and the half-open span ``[start, end)`` to score."""

    token_ids: Sequence[int]
    start: int
    end: int


SOFTMAX_ROWS = 16  # a (16, vocab) float32 block stays in cache: ~3x faster than big blocks


def float32_head(arch: Arch) -> Callable[[torch.Tensor], torch.Tensor]:
    """``(N, D) -> (N, V)`` float32 logits, soft-capped as the family's LM head does.

    A 16-bit unembedding is upcast once per call (exact: every bf16/fp16 value is a float32
    value), so the matmul accumulates and rounds in float32; a float32 model pays nothing.
    Heads that are not a plain floating-point ``nn.Linear`` (quantised, adapter-wrapped) run
    as they are and only their output is upcast.
    """
    unembed = arch.unembed
    if not (isinstance(unembed, nn.Linear) and unembed.weight.dtype.is_floating_point):
        return lambda hidden: arch.logits(hidden).float()
    weight = unembed.weight.float()  # (V, D)
    bias = None if unembed.bias is None else unembed.bias.float()  # (V,)
    cap = arch.logit_softcap

    def head(hidden: torch.Tensor) -> torch.Tensor:
        logits = nn.functional.linear(hidden.float(), weight, bias)  # (N, V) float32
        return torch.tanh(logits / cap) * cap if cap else logits

    return head


def _log_probs(arch: Arch, hidden: torch.Tensor, targets: torch.Tensor, chunk: int):
    """``(N,)`` float32 log p(target | hidden) for hidden ``(N, D)``.

    The float32 LM head runs on ``chunk`` rows at a time (large matmuls are efficient); the
    log-softmax runs on small row blocks of that, which stay in cache.
    """
    head = float32_head(arch)
    out = torch.empty(targets.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, targets.shape[0], chunk):
        logits = head(hidden[start:start + chunk])  # (c, V) float32
        for row in range(0, logits.shape[0], SOFTMAX_ROWS):
            block = torch.log_softmax(logits[row:row + SOFTMAX_ROWS], dim=-1)  # (s, V)
            first = start + row
            wanted = targets[first:first + block.shape[0], None]  # (s, 1)
            out[first:first + block.shape[0]] = block.gather(1, wanted)[:, 0]
    return out


def score_rows(
    model, arch: Arch, rows: Sequence[ScoreRow], *, pad_id: int, chunk: int = 256
) -> list[list[float]]:
    """Log-probs of ``token_ids[start:end]`` for each row, one batch forward in all."""
    for row in rows:
        if not 1 <= row.start <= row.end <= len(row.token_ids):
            raise UsageError(f"bad score span [{row.start}, {row.end}) for "
                             f"{len(row.token_ids)} tokens; the first token cannot be scored")
    device = next(model.parameters()).device
    inputs = padded_inputs([row.token_ids for row in rows], pad_id, device)
    width = inputs["input_ids"].shape[1]
    # Hidden position p predicts token p + 1: gather the predictors of every scored token.
    batch_index, position, targets = [], [], []
    for b, row in enumerate(rows):
        offset = width - len(row.token_ids)  # left pads
        batch_index += [b] * (row.end - row.start)
        position += range(offset + row.start - 1, offset + row.end - 1)
        targets += row.token_ids[row.start:row.end]
    with torch.inference_mode():
        hidden = arch.body(**inputs).last_hidden_state  # (B, T, D), final norm applied
        picked = hidden[torch.tensor(batch_index, dtype=torch.long, device=device),
                        torch.tensor(position, dtype=torch.long, device=device)]  # (N, D)
        target = torch.tensor(targets, dtype=torch.long, device=device)  # (N,)
        values = _log_probs(arch, picked, target, chunk).tolist()
    out, cursor = [], 0
    for row in rows:
        out.append(values[cursor:cursor + row.end - row.start])
        cursor += row.end - row.start
    return out
