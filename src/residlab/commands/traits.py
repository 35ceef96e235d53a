"""``residlab extract | steer``: trait vectors and their steering evaluation."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from residlab.commands.inference import Component, record_command
from residlab.errors import UsageError
from residlab.executors import ExecutorOptions
from residlab.options import CommandOptions, option

__all__ = ["ExtractOptions", "SteerOptions", "run_extract", "run_steer"]

Method = Literal["mean_diff", "probe", "pca"]


class ExtractOptions(CommandOptions):
    experiment: str = option(..., "experiments/{name}/config.yaml")
    traits: list[str] = option(..., "e.g. behavioral/refusal,emotion/optimism")
    methods: list[Method] = option(["mean_diff", "probe", "pca"], "fitting methods")
    position: str = option("response[:5]", "response[:5], response, prompt[-1], all")
    component: Component = option("residual", "activation component")
    layers: str | None = option(None, "e.g. 4-28:4 (default: all)")
    model_variant: str | None = option(None, "default: the experiment's defaults.extraction")
    max_new_tokens: int = Field(16, ge=1, description="continuation length per line")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="held-out share of the pairs")
    seed: int = option(0, "seed of the train/test split")
    batch_size: int = Field(16, ge=1, description="lines per forward pass")


class SteerOptions(ExecutorOptions):
    experiment: str = option(..., "experiments/{name}/config.yaml")
    trait: str = option(..., "e.g. emotion/optimism")
    layers: list[int] = option([], "e.g. 8,12,16 (negative counts from the end)")
    coefficients: list[float] = option([], "e.g. -8,4,8,16 (0 is the baseline)")
    method: Method = option("mean_diff", "vector method")
    position: str = option("response[:5]", "vector position")
    component: Component = option("residual", "vector component")
    model_variant: str | None = option(None, "the model that answers (default: application)")
    extraction_variant: str | None = option(None, "whose vectors (default: extraction)")
    max_new_tokens: int = Field(48, ge=1, description="answer length")
    batch_size: int = Field(32, ge=1, description="answers per forward pass")
    judge_url: str | None = option(None, "OpenAI-compatible endpoint, e.g. http://host/v1")
    judge_model: str | None = option(None, "endpoint model, or a local judge (default: the "
                                     "embedded model)")
    judge_key_env: str = option("OPENAI_API_KEY", "environment variable with the endpoint key")
    positions: Literal["all", "prompt", "generated"] = option(
        "all", "where the vector is added")
    rescore: bool = option(False, "judge the saved answers again")


def run_extract(options: ExtractOptions) -> None:
    from residlab.experiments import load_experiment, load_variant
    from residlab.traits.extract import extract_trait, summary

    experiment = load_experiment(options.experiment)
    loaded = load_variant(experiment, options.model_variant, role="extraction")
    for trait in options.traits:
        result = extract_trait(
            experiment, trait, variant=options.model_variant, methods=options.methods,
            position=options.position, component=options.component, layers=options.layers,
            max_new_tokens=options.max_new_tokens, test_fraction=options.test_fraction,
            seed=options.seed, batch_size=options.batch_size, loaded=loaded)
        record_command(result.folder, "extract", options, loaded,
                       generation=greedy_settings(loaded, options.max_new_tokens))
        print(summary(result))
        print(f"vectors: {result.folder / 'vectors'}")


def greedy_settings(loaded, max_new_tokens: int) -> dict:
    """The effective settings of the greedy generation these commands run."""
    from residlab.generation import effective_generation_settings

    return effective_generation_settings(loaded.model, loaded.tokenizer,
                                         max_new_tokens=max_new_tokens)


def make_judge(options: SteerOptions):
    from residlab.traits.judge import EndpointJudge, LocalJudge

    if options.judge_url:
        if not options.judge_model:
            raise UsageError("--judge-url needs --judge-model (the endpoint's model name)")
        return EndpointJudge(options.judge_url, options.judge_model, options.judge_key_env)
    from residlab.models import load_model

    return LocalJudge(load_model(options.judge_model or "default", dtype="fp32"))


def run_steer(options: SteerOptions) -> None:
    from residlab.executors import make_executor
    from residlab.experiments import load_experiment, load_variant
    from residlab.traits.steer import format_summary, load_results, run_steering, summarize

    if not options.rescore and (not options.layers or not options.coefficients):
        raise UsageError("give --layers (e.g. 8,12) and --coefficients (e.g. 4,8,16)")
    experiment = load_experiment(options.experiment)
    judge = make_judge(options)
    settings = None if options.rescore else options.executor_settings()  # judging only
    with make_executor(settings) as executor:
        loaded = None if options.rescore else load_variant(experiment, options.model_variant)
        path = run_steering(
            experiment, options.trait, layers=options.layers,
            coefficients=options.coefficients, judge=judge, variant=options.model_variant,
            vector_variant=options.extraction_variant, method=options.method,
            position=options.position, component=options.component,
            max_new_tokens=options.max_new_tokens, batch_size=options.batch_size,
            positions=options.positions, rescore=options.rescore, loaded=loaded,
            executor=executor)
    generation = greedy_settings(loaded, options.max_new_tokens) if loaded else None
    record_command(path.parent, "steer", options, loaded, judge=judge.name,
                   generation=generation)
    variant = experiment.variant(options.model_variant)[0]
    print(format_summary(summarize(load_results(experiment, options.trait, variant))))
    print(f"results: {path}")
