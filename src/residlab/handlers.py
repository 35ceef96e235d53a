"""Handlers of the experiment, capture and trait commands (``residlab responses`` ...).

Kept apart from :mod:`residlab.cli`, which builds the parser; each handler imports what it
needs when it runs, so ``residlab --help`` stays instant.
"""

from __future__ import annotations

import argparse

from residlab.errors import UsageError


def experiment_init(args: argparse.Namespace) -> None:
    from residlab.experiments import init_experiment

    print(f"experiment config: {init_experiment(args.name)}")


def require_positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{name} must be at least 1, not {value}")


def numbers(flag: str, text: str | None) -> list[float]:
    """``-8,4,16`` -> [-8.0, 4.0, 16.0]; an empty value is an empty list."""
    try:
        return [float(part) for part in (text or "").split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: give comma-separated numbers, e.g. -8,4,16") from None


def responses(args: argparse.Namespace) -> None:
    from residlab.experiments import load_experiment, load_variant
    from residlab.inference.responses import generate_responses

    require_positive("--max-new-tokens", args.max_new_tokens)
    require_positive("--limit", args.limit)
    require_positive("--batch-size", args.batch_size)
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, not {args.temperature}")
    experiment = load_experiment(args.experiment)
    loaded = None
    if not args.from_responses and (args.load_in_8bit or args.load_in_4bit):
        loaded = load_variant(experiment, args.model_variant, load_in_8bit=args.load_in_8bit,
                              load_in_4bit=args.load_in_4bit)
    interventions = []
    specs = steer_specs(args.steer)
    if specs:
        from residlab.traits.steer import steering_interventions

        if loaded is None:
            loaded = load_variant(experiment, args.model_variant)
        interventions = steering_interventions(experiment, loaded, specs)
    written = generate_responses(
        experiment, args.prompt_set, variant=args.model_variant, interventions=interventions,
        tags=[f"steer:{t}:{layer}:{c:g}" for t, layer, c in specs],
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, prefill=args.prefill,
        from_responses=args.from_responses, skip_existing=args.skip_existing, limit=args.limit,
        output_suffix=args.output_suffix, batch_size=args.batch_size, loaded=loaded)
    folder = written[0].parent if written else "(nothing new to write)"
    print(f"responses: {len(written)} written to {folder}")


def capture(args: argparse.Namespace) -> None:
    from residlab.experiments import load_experiment
    from residlab.inference.capture import capture_prompt_set

    require_positive("--batch-size", args.batch_size)
    result = capture_prompt_set(
        load_experiment(args.experiment), args.prompt_set, variant=args.model_variant,
        responses_from=args.responses_from, layers=args.layers, capture_mlp=args.capture_mlp,
        response_only=args.response_only, skip_existing=args.skip_existing, dtype=args.dtype,
        batch_size=args.batch_size, load_in_8bit=args.load_in_8bit,
        load_in_4bit=args.load_in_4bit)
    print(f"captured: {len(result.written)} written, {result.skipped} already complete, "
          f"in {result.out_dir}")


def steer_specs(text: str | None):
    """``TRAIT:LAYER:COEF[,...]`` -> [(trait, layer, coefficient)]."""
    specs = []
    for part in (text or "").split(","):
        if not part.strip():
            continue
        pieces = part.strip().rsplit(":", 2)
        try:
            specs.append((pieces[0], int(pieces[1]), float(pieces[2])))
        except (IndexError, ValueError):
            raise UsageError(f"--steer {part!r}: use TRAIT:LAYER:COEF, e.g. "
                             "emotion/optimism:12:8") from None
    return specs


def extract(args: argparse.Namespace) -> None:
    from residlab.experiments import load_experiment
    from residlab.traits.extract import extract_trait, summary

    experiment = load_experiment(args.experiment)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for trait in [t.strip() for t in args.traits.split(",") if t.strip()]:
        result = extract_trait(experiment, trait, variant=args.model_variant, methods=methods,
                               position=args.position, component=args.component,
                               layers=args.layers, max_new_tokens=args.max_new_tokens,
                               test_fraction=args.test_fraction, seed=args.seed,
                               batch_size=args.batch_size)
        print(summary(result))
        print(f"vectors: {result.folder / 'vectors'}")


def make_judge(args: argparse.Namespace):
    from residlab.traits.judge import EndpointJudge, LocalJudge

    if args.judge_url:
        if not args.judge_model:
            raise UsageError("--judge-url needs --judge-model")
        return EndpointJudge(args.judge_url, args.judge_model, args.judge_key_env)
    from residlab.models import load_model

    return LocalJudge(load_model(args.judge_model or "default", dtype="fp32"))


def steer(args: argparse.Namespace) -> None:
    from residlab.experiments import load_experiment
    from residlab.traits.steer import format_summary, load_results, run_steering, summarize

    experiment = load_experiment(args.experiment)
    layers = [int(x) for x in numbers("--layers", args.layers)]
    coefficients = numbers("--coefficients", args.coefficients)
    if not args.rescore and (not layers or not coefficients):
        raise UsageError("give --layers (e.g. 8,12) and --coefficients (e.g. 4,8,16)")
    require_positive("--batch-size", args.batch_size)
    path = run_steering(
        experiment, args.trait, layers=layers, coefficients=coefficients,
        judge=make_judge(args), variant=args.model_variant,
        vector_variant=args.extraction_variant, method=args.method, position=args.position,
        component=args.component, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, positions=args.positions, rescore=args.rescore)
    variant = experiment.variant(args.model_variant)[0]
    print(format_summary(summarize(load_results(experiment, args.trait, variant))))
    print(f"results: {path}")


def project(args: argparse.Namespace) -> None:
    from residlab.experiments import load_experiment
    from residlab.inference.project import project_prompt_set

    traits = [t.strip() for t in args.traits.split(",")] if args.traits else None
    written = project_prompt_set(
        load_experiment(args.experiment), args.prompt_set, variant=args.model_variant,
        traits=traits, layer=args.layer, method=args.method, component=args.component,
        position=args.position, extraction_variant=args.extraction_variant,
        skip_existing=args.skip_existing, calibration=not args.no_calibration,
        centered=args.centered, clean_massive_dims=args.clean_massive_dims)
    print(f"projections: {len(written)} written")


def calibrate(args: argparse.Namespace) -> None:
    from residlab.experiments import load_experiment
    from residlab.inference.calibrate import run_calibration

    path = run_calibration(load_experiment(args.experiment), variant=args.model_variant,
                           prompt_set=args.prompt_set, top_k=args.top_k,
                           batch_size=args.batch_size)
    print(f"calibration: {path}")
