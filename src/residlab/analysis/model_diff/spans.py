"""The highest-delta spans of a prompt set: clauses, sliding windows or whole responses,
ranked by |delta|, +, - or z-score, from projection deltas or from the log-prob deltas of
``residlab diff logprobs``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from residlab.analysis.model_diff import diff_dir
from residlab.analysis.model_diff.per_token import (
    PromptDelta,
    _check_variants,
    _experiment,
    _quote,
    _read,
    _traits,
    id_sort_key,
    load_deltas,
    split_clauses,
)
from residlab.errors import NotFound, UsageError
from residlab.experiments import Experiment

__all__ = ["format_spans", "rank_spans", "span_ranges", "span_summary", "top_spans"]

Mode = Literal["clause", "window", "prompt"]
Sort = Literal["abs", "pos", "neg", "z"]
Source = Literal["projection", "logprobs"]


def _logprob_items(experiment: Experiment, variant_a: str, variant_b: str,
                   prompt_set: str) -> list[PromptDelta]:
    """The log-prob deltas written by ``residlab diff logprobs``."""
    folder = diff_dir(experiment, variant_a, variant_b) / "logprobs" / prompt_set
    paths = sorted(folder.glob("*.json"), key=lambda p: id_sort_key(p.stem))
    if not paths:
        raise NotFound(f"no log-prob diffs in {folder}; run 'residlab diff logprobs "
                       f"--experiment {experiment.name} --variant-a {variant_a} --variant-b "
                       f"{variant_b} --prompt-set {prompt_set}'")
    items = []
    for path in paths:
        record = _read(path)
        delta, tokens = record.get("delta"), record.get("tokens")
        if not isinstance(delta, list) or not isinstance(tokens, list) or (
                len(delta) != len(tokens)):
            raise UsageError(f"{path}: needs 'delta' and 'tokens' lists of equal length; run "
                             "'residlab diff logprobs' again")
        items.append(PromptDelta(str(record.get("prompt_id", path.stem)), tokens,
                                 np.asarray(delta, dtype=np.float64),
                                 record.get("prompt_text"), record.get("response_text")))
    return [item for item in items if item.tokens]


def span_ranges(n: int, tokens: list[str], mode: str, window: int) -> list[tuple[int, int]]:
    """``[start, end)`` token ranges of one response: its clauses, every ``window``-token
    window, or the whole response (``mode`` "prompt")."""
    if mode == "clause":
        return split_clauses(tokens)
    if mode == "window":
        return [(i, min(i + window, n)) for i in range(max(n - window, 0) + 1)]
    return [(0, n)]


def span_summary(item: PromptDelta, start: int, end: int, context: int) -> dict[str, Any]:
    """One span's text, range and delta statistics, with ``context`` tokens either side."""
    values = item.delta[start:end]
    return {"prompt_id": item.prompt_id, "text": "".join(item.tokens[start:end]),
            "token_range": [start, end], "n_tokens": end - start,
            "mean_delta": float(values.mean()), "max_delta": float(values.max()),
            "min_delta": float(values.min()),
            "context_before": "".join(item.tokens[max(start - context, 0):start]),
            "context_after": "".join(item.tokens[end:end + context])}


_KEYS = {"abs": lambda s: -abs(s["mean_delta"]), "pos": lambda s: -s["mean_delta"],
         "neg": lambda s: s["mean_delta"], "z": lambda s: -abs(s["z"])}


def rank_spans(spans: list[dict], sort: str, top: int) -> list[dict]:
    """Best first by ``sort``; a span overlapping a better one of its prompt is skipped
    (sliding windows would otherwise repeat one peak)."""
    chosen: list[dict] = []
    taken: dict[str, list[tuple[int, int]]] = {}
    for span in sorted(spans, key=_KEYS[sort]):
        start, end = span["token_range"]
        held = taken.setdefault(span["prompt_id"], [])
        if any(start < e and s < end for s, e in held):
            continue
        held.append((start, end))
        chosen.append(span)
        if len(chosen) == top:
            break
    return chosen


def _span_items(experiment, variant_a, variant_b, prompt_set, trait, layer, source,
                variant_a_prompt_set) -> list[PromptDelta]:
    if source == "logprobs":
        return _logprob_items(experiment, variant_a, variant_b, prompt_set)
    sets = (variant_a_prompt_set or prompt_set, prompt_set)
    traits = _traits(experiment, variant_a, variant_b, sets, trait)
    if len(traits) > 1:
        raise UsageError(f"spans of projections need one trait; pass --trait (one of "
                         f"{', '.join(traits)})")
    return load_deltas(experiment, variant_a, variant_b, prompt_set, trait=traits[0],
                       layer=layer, variant_a_prompt_set=variant_a_prompt_set).items


def top_spans(experiment: Experiment | str, variant_a: str, variant_b: str, prompt_set: str,
              *, trait: str | None = None, layer: int | None = None, mode: Mode = "clause",
              window: int = 8, sort: Sort = "abs", top: int = 20,
              source: Source = "projection", variant_a_prompt_set: str | None = None,
              context: int = 8) -> list[dict[str, Any]]:
    """The ``top`` spans of the whole set with the largest deltas: clauses, sliding windows of
    ``window`` tokens, or whole responses (``mode``), ranked by ``|mean|`` (``abs``), mean
    (``pos``), -mean (``neg``) or ``|z|`` with ``z = (span mean - set mean) / set std`` over
    all the set's tokens. Each span carries ``context`` tokens of text on either side.
    ``source="logprobs"`` ranks the log-prob deltas of ``residlab diff logprobs``."""
    choices = {"mode": (mode, Mode), "sort": (sort, Sort), "source": (source, Source)}
    for name, (value, allowed) in choices.items():
        if value not in allowed.__args__:
            raise UsageError(f"--{name} {value!r}: use one of {', '.join(allowed.__args__)}")
    if window < 1 or top < 1 or context < 0:
        raise UsageError("--window and --top must be at least 1 and --context at least 0")
    experiment = _experiment(experiment)
    _check_variants(experiment, variant_a, variant_b)
    items = _span_items(experiment, variant_a, variant_b, prompt_set, trait, layer, source,
                        variant_a_prompt_set)
    if not items:
        raise UsageError(f"no prompt of {prompt_set} has response tokens to rank")
    values = np.concatenate([item.delta for item in items])  # (N,) every token of the set
    mean, std = float(values.mean()), float(values.std())
    spans = []
    for item in items:
        for start, end in span_ranges(item.delta.size, item.tokens, mode, window):
            span = span_summary(item, start, end, context)
            span["z"] = (span["mean_delta"] - mean) / std if std > 0 else 0.0
            spans.append(span)
    return rank_spans(spans, sort, top)


def format_spans(spans: Sequence[dict[str, Any]]) -> str:
    """One line per span: mean delta, z, prompt, token range, the span in its context."""
    lines = []
    for span in spans:
        start, end = span["token_range"]
        shown = f"{span['context_before']}[[{span['text']}]]{span['context_after']}"
        lines.append(f"{span['mean_delta']:+.4f} (z {span['z']:+.2f})  prompt "
                     f"{span['prompt_id']} tokens {start}-{end}  {_quote(shown, 160)}")
    return "\n".join(lines)
