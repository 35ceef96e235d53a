"""``residlab experiment init | responses | capture | project | calibrate``.

Each command's options are one model; its ``run`` loads what it needs, calls the stage, and
writes ``_command.yaml`` (the resolved options and where the model came from) next to the
outputs. (YAML, so that no ``*.json`` reader of a data folder mistakes it for a record.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from residlab.errors import UsageError
from residlab.executors import ExecutorOptions
from residlab.options import CommandOptions, StorageDType, option

__all__ = [
    "CalibrateOptions",
    "CaptureOptions",
    "ExperimentInitOptions",
    "ExtractVizOptions",
    "ProjectOptions",
    "ResponsesOptions",
    "record_command",
    "run_calibrate",
    "run_capture",
    "run_experiment_init",
    "run_extract_viz",
    "run_project",
    "run_responses",
]

Component = Literal["residual", "attn_contribution", "mlp_contribution"]


def record_command(folder: Path, command: str, options: CommandOptions, loaded=None, *,
                   file_name: str = "_command.yaml", **extra) -> None:
    """``folder/_command.yaml``: what made the files in ``folder``."""
    from residlab.provenance import command_record
    from residlab.store import write_yaml

    model = dict(loaded.provenance) if loaded is not None else None
    write_yaml(Path(folder) / file_name, command_record(command, options, model=model, **extra))


class ExperimentInitOptions(CommandOptions):
    name: str = option(..., "experiment folder name", positional=True)


class ExperimentOptions(CommandOptions):
    """What every experiment command shares."""

    experiment: str = option(..., "experiments/{name}/config.yaml")
    model_variant: str | None = option(None, "variant (default: the experiment's "
                                       "defaults.application)")


class PromptSetOptions(ExperimentOptions):
    prompt_set: str = option(..., "datasets/inference/{name}.json (nested names allowed)")
    skip_existing: bool = option(False, "keep finished files")
    no_server: bool = option(False, "responses: load the model here even when a model server "
                             "(RESIDLAB_SERVER, default http://127.0.0.1:8765) serves it")
    batch_size: int = Field(8, ge=1, description="prompts per forward pass")
    load_in_8bit: bool = option(False, "bitsandbytes 8-bit (CUDA only)")
    load_in_4bit: bool = option(False, "bitsandbytes 4-bit (CUDA only)")


class ResponsesOptions(PromptSetOptions, ExecutorOptions):
    max_new_tokens: int = Field(50, ge=1, description="tokens to generate (Mode A)")
    temperature: float = Field(0.0, ge=0, description="0 = greedy (Mode A)")
    generation_defaults: Literal["plain", "model"] = option(
        "plain", "plain: transformers' defaults; model: also the checkpoint's "
        "generation_config.json")
    prefill: str | None = option(None, "text appended after the generation prompt")
    from_responses: str | None = option(None, "Mode B: a {prompt_id: response_text} JSON file "
                                        "(tokenizer only)")
    limit: int | None = Field(None, ge=1, description="first N prompts only")
    output_suffix: str | None = option(None, "write to responses/{prompt_set}_{suffix}")
    steer: list[str] | None = option(None, "TRAIT:LAYER:COEF[,...]: add coef x unit trait "
                                     "vector at the layer while generating")


class CaptureOptions(PromptSetOptions, ExecutorOptions):
    layers: str | None = option(None, "e.g. 25,27,30 or 10-45:3 (default: all)")
    capture_mlp: bool = option(False, "also capture mlp_contribution")
    response_only: bool = option(False, "save response tokens only")
    responses_from: str | None = option(None, "run this variant on another variant's tokens "
                                        "(model diff)")
    dtype: StorageDType = option("bf16", "storage dtype of the saved activations")
    batch_size: int | None = Field(None, ge=1, description="prompts per forward pass "
                                   "(default: as many as the memory budget allows)")


class ProjectOptions(ExperimentOptions):
    prompt_set: str = option(..., "the captured prompt set")
    layer: str = option("best", "best, best+5, 16 or 12,16 (default: best)")
    method: str | None = option(None, "vector method (default: auto)")
    component: Component = option("residual", "activation component")
    position: str | None = option(None, "vector position (default: auto)")
    extraction_variant: str | None = option(None, "whose vectors (default: the experiment's "
                                            "defaults.extraction)")
    traits: list[str] | None = option(None, "comma-separated (default: all extracted)")
    skip_existing: bool = option(False, "keep finished files")
    no_calibration: bool = option(False, "do not embed massive-dims values")
    centered: bool = option(False, "subtract the vector's baseline")
    clean_massive_dims: bool = option(False, "also projections with the massive dims removed")
    output_suffix: str | None = option(None, "write to projections/{trait}/{prompt_set}_{suffix}"
                                       " (keeps projections made with other settings)")


class CalibrateOptions(ExperimentOptions):
    prompt_set: str = option("calibration", "prompt set to calibrate on")
    top_k: int = Field(8, ge=1, description="massive dims kept per layer")
    batch_size: int = Field(8, ge=1, description="prompts per forward pass")


class ExtractVizOptions(ExperimentOptions, ExecutorOptions):
    prompt_set: str | None = option(None, "the prompt set (for --attention / --logit-lens)")
    attention: bool = option(False, "per-head attention patterns (eager pass)")
    logit_lens: bool = option(False, "top-k next-token predictions after each layer")
    vectors: bool = option(False, "the tokens each trait vector pushes toward and away from")
    layers: str | None = option(None, "e.g. 3,5 or 10-45:3 (default: all)")
    top_k: int = Field(50, ge=1, description="tokens kept per position (or per vector)")
    limit: int | None = Field(None, ge=1, description="first N prompts only")
    skip_existing: bool = option(False, "keep files made with the same settings and tokens")
    format: Literal["safetensors", "json"] = option(
        "safetensors", "json: also write the seed's {id}_attention.json")
    traits: list[str] | None = option(None, "--vectors: comma-separated (default: all "
                                      "extracted)")
    extraction_variant: str | None = option(None, "--vectors: whose vectors (default: the "
                                            "experiment's defaults.extraction)")
    filter_common: bool = option(False, "--vectors: drop tokens that top every vector")


def run_extract_viz(options: ExtractVizOptions) -> None:
    from residlab.executors import make_executor
    from residlab.experiments import load_experiment, load_variant
    from residlab.inference.extract_viz import extract_viz
    from residlab.inference.vector_lens import vector_logit_lens

    per_token = options.attention or options.logit_lens
    if not (per_token or options.vectors):
        raise UsageError("nothing to extract: give --attention, --logit-lens and/or --vectors")
    if per_token and options.prompt_set is None:
        raise UsageError("--attention / --logit-lens read a prompt set's responses: give "
                         "--prompt-set")
    if options.prompt_set is not None and not per_token:
        raise UsageError("--prompt-set is read only with --attention or --logit-lens")
    experiment = load_experiment(options.experiment)
    if per_token:
        with make_executor(options.executor_settings()) as executor:
            loaded = load_variant(experiment, options.model_variant)
            result = extract_viz(
                experiment, options.prompt_set, variant=options.model_variant,
                attention=options.attention, logit_lens=options.logit_lens,
                layers=options.layers, top_k=options.top_k, limit=options.limit,
                skip_existing=options.skip_existing, json_attention=options.format == "json",
                loaded=loaded, executor=executor)
        record_command(result.out_dir, "extract-viz", options, loaded)
        print(f"extract-viz: {len(result.written)} written, {result.skipped} already complete, "
              f"in {result.out_dir}")
    if options.vectors:
        written = vector_logit_lens(experiment, traits=options.traits,
                                    variant=options.extraction_variant, top_k=options.top_k,
                                    filter_common=options.filter_common)
        for path in written:
            print(f"vector logit lens: {path}")


def run_experiment_init(options: ExperimentInitOptions) -> None:
    from residlab.experiments import init_experiment

    print(f"experiment config: {init_experiment(options.name)}")


def parse_steer_specs(specs: list[str] | None) -> list[tuple[str, int, float]]:
    """``["TRAIT:LAYER:COEF", ...]`` -> ``[(trait, layer, coefficient)]``."""
    out = []
    for part in specs or []:
        pieces = part.strip().rsplit(":", 2)
        try:
            out.append((pieces[0], int(pieces[1]), float(pieces[2])))
        except (IndexError, ValueError):
            raise UsageError(f"--steer {part!r}: use TRAIT:LAYER:COEF, e.g. "
                             "emotion/optimism:12:8") from None
    return out


def _server_for(options: ResponsesOptions, experiment, *, steered: bool):
    """Mode A's model server (:func:`residlab.client.find_server`), unless ``--no-server`` or
    what the server cannot do: steering (it takes token ids, not vectors), 8/4-bit loading;
    and not with ``--executor ray`` (the workers generate)."""
    if (options.no_server or steered or options.load_in_8bit or options.load_in_4bit
            or options.executor != "local"):
        return None
    try:
        from residlab.client import find_server
    except ModuleNotFoundError:  # without the 'server' extra (httpx) there is no client
        return None

    return find_server(experiment, options.model_variant)


def run_responses(options: ResponsesOptions) -> None:
    from residlab.executors import make_executor
    from residlab.experiments import load_experiment

    specs = parse_steer_specs(options.steer)
    if specs and options.from_responses:
        raise UsageError("--steer changes generation, but --from-responses imports texts that "
                         "were not generated here; drop one of them")
    if options.from_responses and options.executor != "local":
        raise UsageError("--from-responses only tokenizes texts (no model runs): drop "
                         "--executor ray")
    experiment = load_experiment(options.experiment)
    with make_executor(options.executor_settings()) as executor:
        written, made_by = _responses(options, experiment, specs, executor)
    if written:
        record_command(written[0].parent, "responses", options, made_by)
    folder = written[0].parent if written else "(nothing new to write)"
    print(f"responses: {len(written)} written to {folder}")


def _responses(options: ResponsesOptions, experiment, specs, executor):
    """``(files written, what generated them)``: a model server, this process's model (whose
    batches ``executor`` may hand to Ray workers), or nothing (Mode B)."""
    from residlab.experiments import load_variant
    from residlab.inference.responses import generate_responses

    loaded = remote = None
    if not options.from_responses:
        remote = _server_for(options, experiment, steered=bool(specs))
    if not options.from_responses and remote is None:
        loaded = load_variant(experiment, options.model_variant,
                              load_in_8bit=options.load_in_8bit, load_in_4bit=options.load_in_4bit)
    steering = []
    if specs:
        from residlab.traits.steer import resolve_steering

        steering = resolve_steering(experiment, loaded, specs)
    written = generate_responses(
        experiment, options.prompt_set, variant=options.model_variant,
        steering=steering, max_new_tokens=options.max_new_tokens,
        temperature=options.temperature, prefill=options.prefill,
        from_responses=options.from_responses, skip_existing=options.skip_existing,
        limit=options.limit, output_suffix=options.output_suffix,
        batch_size=options.batch_size, generation_defaults=options.generation_defaults,
        loaded=loaded, remote=remote, executor=executor, load_in_8bit=options.load_in_8bit,
        load_in_4bit=options.load_in_4bit)
    return written, loaded or remote


def run_capture(options: CaptureOptions) -> None:
    from residlab.executors import make_executor
    from residlab.experiments import load_experiment, load_variant
    from residlab.inference.capture import capture_prompt_set

    experiment = load_experiment(options.experiment)
    with make_executor(options.executor_settings()) as executor:
        loaded = load_variant(experiment, options.model_variant,
                              load_in_8bit=options.load_in_8bit,
                              load_in_4bit=options.load_in_4bit)
        result = capture_prompt_set(
            experiment, options.prompt_set, variant=options.model_variant,
            responses_from=options.responses_from, layers=options.layers,
            capture_mlp=options.capture_mlp, response_only=options.response_only,
            skip_existing=options.skip_existing, dtype=options.dtype,
            batch_size=options.batch_size, loaded=loaded, executor=executor)
    record_command(result.out_dir, "capture", options, loaded)
    print(f"captured: {len(result.written)} written, {result.skipped} already complete, "
          f"in {result.out_dir}")


def run_project(options: ProjectOptions) -> None:
    from residlab.experiments import load_experiment
    from residlab.inference.project import project_prompt_set

    written = project_prompt_set(
        load_experiment(options.experiment), options.prompt_set,
        variant=options.model_variant, traits=options.traits, layer=options.layer,
        method=options.method, component=options.component, position=options.position,
        extraction_variant=options.extraction_variant, skip_existing=options.skip_existing,
        calibration=not options.no_calibration, centered=options.centered,
        clean_massive_dims=options.clean_massive_dims, output_suffix=options.output_suffix)
    for folder in sorted({path.parent for path in written}):
        record_command(folder, "project", options)
    print(f"projections: {len(written)} written")


def run_calibrate(options: CalibrateOptions) -> None:
    from residlab.experiments import load_experiment, load_variant
    from residlab.inference.calibrate import run_calibration

    experiment = load_experiment(options.experiment)
    loaded = load_variant(experiment, options.model_variant)
    path = run_calibration(experiment, variant=options.model_variant,
                           prompt_set=options.prompt_set, top_k=options.top_k,
                           batch_size=options.batch_size, loaded=loaded)
    record_command(path.parent, "calibrate", options, loaded)
    print(f"calibration: {path}")

