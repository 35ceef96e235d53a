"""Batched, left-padded generation under interventions.

Shared by every stage that generates text (noising sweeps, responses, steering): it takes
token ids rather than strings, so callers control templating and nothing is re-tokenised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from residlab.arch import Arch
from residlab.hooks import Intervention, intervene

__all__ = ["Generated", "generate_ids", "left_pad", "padded_inputs", "stop_token_ids"]


@dataclass(frozen=True)
class Generated:
    """One row's new tokens (cut after the first stop token, which is kept)."""

    token_ids: list[int]
    finish_reason: str  # "stop" (a stop token was generated) or "length"


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device):
    """``(input_ids, attention_mask)``, both ``(B, max_len)``, pads on the left."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, width - len(row):] = 1
    return input_ids.to(device), attention_mask.to(device)


def padded_inputs(rows: Sequence[Sequence[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Model inputs for one prefill forward over left-padded rows.

    Position ids count real tokens only (as ``generate`` does), so models with absolute
    position embeddings (GPT-2) see each row exactly as if it were alone.
    """
    input_ids, attention_mask = left_pad(rows, pad_id, device)  # (B, T)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, T)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "position_ids": position_ids}


def stop_token_ids(model, tokenizer) -> list[int]:
    """End-of-turn ids: the generation config's eos ids plus the tokenizer's eos."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    ids = [i for i in ids + [tokenizer.eos_token_id] if i is not None]
    return sorted(set(ids))


def _pad_id(tokenizer, stops: list[int]) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return stops[0] if stops else 0


def generate_ids(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    interventions: Sequence[Intervention] = (),
    arch: Arch | None = None,
) -> list[Generated]:
    """Generate for a batch of prompt id lists with ``interventions`` applied."""
    from transformers import GenerationConfig

    stops = stop_token_ids(model, tokenizer)
    pad_id = _pad_id(tokenizer, stops)
    device = next(model.parameters()).device
    input_ids, attention_mask = left_pad(prompts, pad_id, device)  # (B, P)
    sampling = {"temperature": temperature, "top_p": top_p, "top_k": 0} if do_sample else {}
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample,
                              pad_token_id=pad_id, eos_token_id=stops or None, **sampling)
    with torch.inference_mode(), intervene(model, interventions, arch=arch):
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                generation_config=config)  # (B, P + new)
    new_tokens = output[:, input_ids.shape[1]:].tolist()
    return [_cut(row, set(stops)) for row in new_tokens]


def _cut(row: list[int], stops: set[int]) -> Generated:
    for position, token in enumerate(row):
        if token in stops:
            return Generated(row[: position + 1], "stop")
    return Generated(row, "length")
