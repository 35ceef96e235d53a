"""Batched, left-padded generation under interventions.

Shared by every stage that generates text (noising sweeps, responses, steering): it takes
token ids rather than strings, so callers control templating and nothing is re-tokenised.

Generation settings are ours: transformers fills every field left unset in the config passed
to ``generate`` from the checkpoint's ``generation_config.json`` (repetition penalties, n-gram
bans, ``min_p``, cache and prefill settings, ...). With ``generation_defaults="plain"`` nothing
from the checkpoint leaks in except its end-of-turn ids; ``"model"`` starts from the checkpoint's
settings on purpose. :func:`effective_generation_settings` says exactly what is used.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch

from residlab.arch import Arch, unwrap_model
from residlab.errors import UsageError
from residlab.hooks import Intervention, intervene

if TYPE_CHECKING:
    from transformers import GenerationConfig

__all__ = [
    "GENERATION_DEFAULTS",
    "GenerationDefaults",
    "Generated",
    "check_context",
    "context_length",
    "effective_generation_settings",
    "generate_ids",
    "left_pad",
    "padded_inputs",
    "stop_token_ids",
]

GenerationDefaults = Literal["plain", "model"]
GENERATION_DEFAULTS: tuple[str, ...] = get_args(GenerationDefaults)


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


def _generation_config(
    model,
    tokenizer,
    *,
    max_new_tokens: int,
    do_sample: bool | None,
    temperature: float | None,
    top_p: float | None,
    generation_defaults: str,
) -> GenerationConfig:
    """The one ``GenerationConfig`` that :func:`generate_ids` runs with.

    ``None`` means "not asked": transformers' plain default under ``"plain"``, the checkpoint's
    value under ``"model"``. Stop ids always include the checkpoint's eos ids (on purpose).
    """
    from transformers import GenerationConfig

    if generation_defaults not in GENERATION_DEFAULTS:
        raise UsageError(f"unknown generation_defaults {generation_defaults!r}; choose one of "
                         f"{', '.join(GENERATION_DEFAULTS)}")
    stops = stop_token_ids(model, tokenizer)
    if generation_defaults == "plain":
        config = GenerationConfig()
        sampling = bool(do_sample)
    else:
        config = copy.deepcopy(unwrap_model(model).generation_config)
        sampling = bool(config.do_sample) if do_sample is None else do_sample
    ours: dict[str, Any] = {"max_new_tokens": max_new_tokens, "max_length": None,
                            "do_sample": sampling, "pad_token_id": _pad_id(tokenizer, stops),
                            "eos_token_id": stops or None}
    if sampling:
        asked = {"temperature": temperature, "top_p": top_p}
        ours.update({key: value for key, value in asked.items() if value is not None})
        if generation_defaults == "plain":
            ours["top_k"] = 0  # sample from the whole (top-p) distribution, not the top 50
    config.update(**ours)  # validates; warnings only about what we set
    return config


def _settings(config: GenerationConfig, generation_defaults: str) -> dict[str, Any]:
    """Every field of ``config`` that is set (``None`` = transformers' global default)."""
    full = json.loads(config.to_json_string(use_diff=False, ignore_metadata=True))
    return {"generation_defaults": generation_defaults,
            **{key: value for key, value in sorted(full.items()) if value is not None}}


def effective_generation_settings(
    model,
    tokenizer,
    *,
    max_new_tokens: int,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    generation_defaults: GenerationDefaults = "plain",
) -> dict[str, Any]:
    """The generation settings :func:`generate_ids` uses for these arguments, as a JSON-able
    dict for provenance: every field that is set, plus ``generation_defaults``. Fields absent
    from it take transformers' global defaults."""
    config = _generation_config(
        model, tokenizer, max_new_tokens=max_new_tokens, do_sample=do_sample,
        temperature=temperature, top_p=top_p, generation_defaults=generation_defaults)
    return _settings(config, generation_defaults)


@contextmanager
def _checkpoint_defaults_replaced(model, config: GenerationConfig) -> Iterator[None]:
    """Make ``config`` the model's own generation config while ``generate`` runs.

    ``generate`` fills every unset field of the config it is given from
    ``model.generation_config``; pointing that at the very same config makes the fill a no-op,
    so nothing the checkpoint sets can leak in. Not thread-safe (neither are hooks).
    """
    lm = unwrap_model(model)
    saved = lm.generation_config
    lm.generation_config = config
    try:
        yield
    finally:
        lm.generation_config = saved


def generate_ids(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    interventions: Sequence[Intervention] = (),
    arch: Arch | None = None,
    generation_defaults: GenerationDefaults = "plain",
) -> list[Generated]:
    """Generate for a batch of prompt id lists with ``interventions`` applied.

    Greedy unless ``do_sample``. Under ``generation_defaults="plain"`` (the default) only these
    arguments and the checkpoint's stop ids shape the decoding; under ``"model"`` the
    checkpoint's ``generation_config.json`` applies, overridden by the arguments given.
    """
    config = _generation_config(
        model, tokenizer, max_new_tokens=max_new_tokens, do_sample=do_sample,
        temperature=temperature, top_p=top_p, generation_defaults=generation_defaults)
    stops = list(config.eos_token_id or [])
    device = next(model.parameters()).device
    check_context(model, max(len(p) for p in prompts), max_new_tokens)
    input_ids, attention_mask = left_pad(prompts, config.pad_token_id, device)  # (B, P)
    with (torch.inference_mode(), _checkpoint_defaults_replaced(model, config),
          intervene(model, interventions, arch=arch, prompt_mask=attention_mask)):
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                generation_config=config)  # (B, P + new)
    new_tokens = output[:, input_ids.shape[1]:].tolist()
    return [_cut(row, set(stops)) for row in new_tokens]


def context_length(model) -> int | None:
    """The model's position limit (``max_position_embeddings`` / ``n_positions``), if any."""
    config = unwrap_model(model).config
    config = getattr(config, "text_config", None) or config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context(model, prompt_len: int, max_new_tokens: int) -> None:
    """Refuse a generation that cannot fit the model's context (it would fail or run on
    positions the model never saw), before any work is done."""
    limit = context_length(model)
    if limit is not None and prompt_len + max_new_tokens > limit:
        raise UsageError(
            f"max_new_tokens={max_new_tokens} after a prompt of {prompt_len} tokens exceeds "
            f"the model's context of {limit} tokens; use max_new_tokens <= "
            f"{max(limit - prompt_len, 0)} or shorter prompts")


def _cut(row: list[int], stops: set[int]) -> Generated:
    for position, token in enumerate(row):
        if token in stops:
            return Generated(row[: position + 1], "stop")
    return Generated(row, "length")
