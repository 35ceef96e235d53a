"""``residlab diff compare | per-token | layers | spans | logprobs | run``: two variants of a
model on identical tokens (e.g. the base model and its LoRA fine-tune)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from residlab.commands.inference import Component, record_command
from residlab.options import CommandOptions, option

__all__ = ["DiffCompareOptions", "DiffLayersOptions", "DiffLogprobsOptions", "DiffPerTokenOptions",
           "DiffRunOptions", "DiffSpansOptions", "run_compare", "run_diff_command",
           "run_layers", "run_logprobs", "run_per_token", "run_spans"]


class DiffOptions(CommandOptions):
    """What every diff command shares: the experiment, the two variants, the prompt set."""

    experiment: str = option(..., "experiments/{name}/config.yaml")
    variant_a: str = option(..., "the reference variant (e.g. the base model)")
    variant_b: str = option(..., "the variant compared with it (e.g. the LoRA)")
    prompt_set: str = option(..., "the prompt set both variants ran on B's tokens")


class DiffCompareOptions(DiffOptions):
    traits: list[str] | None = option(None, "comma-separated (default: every trait with vectors)")
    component: Component = option("residual", "activation component (when vectors exist for "
                                  "several)")
    use_best_vector: bool = option(False, "the best vector per layer (the default unless "
                                   "--method is given)")
    method: str | None = option(None, "vector method at every layer (with --position)")
    position: str | None = option(None, "vector position (with --method)")
    vector_experiment: str | None = option(None, "read vectors from this experiment")
    vector_variant: str | None = option(None, "whose vectors (default: defaults.extraction)")
    layers: list[int] | None = option(None, "compare only these layers, e.g. 10,15,20 "
                                      "(default: every captured layer)")


class DiffPerTokenOptions(DiffOptions):
    trait: str = option("all", "a trait, or all")
    layer: int | None = option(None, "the projections' layer (default: the one projected)")
    top_pct: float = Field(5.0, gt=0, le=100, description="share of clauses listed as top")
    variant_a_prompt_set: str | None = option(None, "read A's projections from this set")


class DiffLayersOptions(DiffOptions):
    trait: str = option(..., "the trait")
    layers: list[int] = option(..., "e.g. 10,15,20 (projected at each)")
    variant_a_prompt_set: str | None = option(None, "read A's projections from this set")


class DiffSpansOptions(DiffOptions):
    trait: str | None = option(None, "the trait (projection source)")
    layer: int | None = option(None, "the projections' layer")
    mode: Literal["clause", "window", "prompt"] = option("clause", "span kind")
    window: int = Field(8, ge=1, description="tokens per sliding window (--mode window)")
    sort: Literal["abs", "pos", "neg", "z"] = option("abs", "rank by |delta|, +, - or z-score")
    top: int = Field(20, ge=1, description="spans to print")
    source: Literal["projection", "logprobs"] = option("projection", "projection deltas or "
                                                       "log-prob deltas (diff logprobs)")
    context: int = Field(8, ge=0, description="tokens of context shown on each side")
    variant_a_prompt_set: str | None = option(None, "read A's projections from this set")


class DiffLogprobsOptions(DiffOptions):
    skip_existing: bool = option(False, "keep files made with the same models and tokens")


class DiffRunOptions(DiffOptions):
    traits: list[str] | None = option(None, "comma-separated (default: every trait with vectors)")
    method: str | None = option(None, "vector method (default: the best vector per layer)")
    position: str | None = option(None, "vector position (with --method)")
    layer: int | None = option(None, "the layer for per-token deltas (default: best)")
    component: Component = option("residual", "activation component")
    layers: str | None = option(None, "layers to capture, e.g. 10-20:2 (default: all)")
    max_new_tokens: int = Field(50, ge=1, description="B's responses, when missing")


def _experiment(options: DiffOptions):
    from residlab.experiments import load_experiment

    return load_experiment(options.experiment)


def run_compare(options: DiffCompareOptions) -> None:
    from residlab.analysis.model_diff.compare import compare_variants
    from residlab.errors import UsageError

    if options.use_best_vector and options.method is not None:
        raise UsageError("--use-best-vector picks the method itself: drop it or --method")
    if options.position is not None and options.method is None:
        raise UsageError("--position needs --method (or neither, for the best vector)")

    path = compare_variants(
        _experiment(options), options.variant_a, options.variant_b, options.prompt_set,
        traits=options.traits, component=options.component, method=options.method,
        position=options.position, vector_experiment=options.vector_experiment,
        vector_variant=options.vector_variant, layers=options.layers)
    record_command(path.parent, "diff compare", options)
    print(f"model diff: {path}")


def run_per_token(options: DiffPerTokenOptions) -> None:
    from residlab.analysis.model_diff.per_token import format_top_clauses, per_token_diff

    written = per_token_diff(
        _experiment(options), options.variant_a, options.variant_b, options.prompt_set,
        trait=options.trait, layer=options.layer, top_pct=options.top_pct,
        variant_a_prompt_set=options.variant_a_prompt_set)
    print(format_top_clauses(written))
    print(f"per-token diff: {len(written)} files written")


def run_layers(options: DiffLayersOptions) -> None:
    from residlab.analysis.model_diff.layers import layer_sensitivity

    path = layer_sensitivity(_experiment(options), options.variant_a, options.variant_b,
                             options.prompt_set, trait=options.trait, layers=options.layers,
                             variant_a_prompt_set=options.variant_a_prompt_set)
    print(f"layer sensitivity: {path}")


def run_spans(options: DiffSpansOptions) -> None:
    from residlab.analysis.model_diff.spans import format_spans, top_spans

    spans = top_spans(_experiment(options), options.variant_a, options.variant_b,
                      options.prompt_set, trait=options.trait, layer=options.layer,
                      mode=options.mode, window=options.window, sort=options.sort,
                      top=options.top, source=options.source, context=options.context,
                      variant_a_prompt_set=options.variant_a_prompt_set)
    print(format_spans(spans))


def run_logprobs(options: DiffLogprobsOptions) -> None:
    from residlab.analysis.model_diff.logprobs import diff_logprobs

    written = diff_logprobs(_experiment(options), options.variant_a, options.variant_b,
                            options.prompt_set, skip_existing=options.skip_existing)
    print(f"log-prob diff: {len(written)} files written")


def run_diff_command(options: DiffRunOptions) -> None:
    from residlab.analysis.model_diff.run import run_diff

    result = run_diff(_experiment(options), options.variant_a, options.variant_b,
                      options.prompt_set, traits=options.traits, method=options.method,
                      position=options.position, layer=options.layer,
                      component=options.component, layers=options.layers,
                      max_new_tokens=options.max_new_tokens)
    print(result)
