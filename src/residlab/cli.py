"""The ``residlab`` command. Heavy imports happen inside commands so ``--help`` is instant.

Bad input (``ValueError`` / ``LookupError`` raised with a how-to-fix message) becomes one line
on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from residlab import handlers
from residlab.config import NoisingConfig, load_config, parse_override
from residlab.errors import UsageError

__all__ = ["main"]

log = logging.getLogger("residlab")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line, status 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """``--config`` plus one override flag per key (``--num_prompts`` or ``--num-prompts``)."""
    parser.add_argument("--config", help="YAML config (seed keys accepted as-is)")
    group = parser.add_argument_group("config overrides (YAML values; 0,2,4 is a list)")
    for name, field in NoisingConfig.model_fields.items():
        flags = sorted({f"--{name}", f"--{name.replace('_', '-')}"}, key=len)
        group.add_argument(*flags, dest=f"set_{name}", metavar="V", help=field.description)


def _overrides(args: argparse.Namespace) -> dict:
    return {key.removeprefix("set_"): parse_override(value)
            for key, value in vars(args).items()
            if key.startswith("set_") and value is not None}


def _noise_generate(args: argparse.Namespace) -> None:
    from residlab.noising.generate import run_generate

    overrides = _overrides(args)
    if args.resume:
        if overrides:
            raise UsageError("a resumed run keeps its own config; drop the override flags "
                             f"({', '.join(overrides)}) or start a new run")
        run = run_generate(resume=args.resume, cov_sqrt=args.cov_sqrt)
    else:
        run = run_generate(load_config(args.config, overrides), cov_sqrt=args.cov_sqrt)
    print(f"run: {run}")


def _noise_covariance(args: argparse.Namespace) -> None:
    from residlab.noising.covariance import run_covariance

    print(f"covariance: {run_covariance(load_config(args.config, _overrides(args)))}")


def _noise_eval(args: argparse.Namespace) -> None:
    from residlab.noising.eval import run_eval, summarize
    from residlab.noising.runs import RunDir
    from residlab.store import read_jsonl

    run = RunDir(Path(args.run_dir)).check()
    # Without --config, the run's own config.yaml (plus any override flags) is used.
    cfg = load_config(args.config or run.config_file, _overrides(args))
    path, skipped = run_eval(cfg, args.run_dir, score_eos=not args.no_score_eos)
    print(summarize(read_jsonl(path)))
    print(f"scores: {path}")
    if skipped:
        first = skipped[0]
        raise UsageError(f"skipped {len(skipped)} unreadable generation line(s) (first: "
                         f"{first.path}:{first.line}: {first.reason}); the rest were scored")


def _noise_viz(args: argparse.Namespace) -> None:
    from residlab.noising.viz import run_viz

    if args.config:
        load_config(args.config)  # checked for consistency with the other stages
    print(f"viewer: {run_viz(args.run_dir, top_n=args.top_n)}")


def _run_dir_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run_dir", "--run-dir", dest="run_dir", required=True,
                        help="a run directory made by 'residlab noise generate'")


def _experiment_flags(parser: argparse.ArgumentParser, *, model_flags: bool = True) -> None:
    parser.add_argument("--experiment", required=True, help="experiments/{name}/config.yaml")
    parser.add_argument("--prompt-set", "--prompt_set", dest="prompt_set", required=True,
                        help="datasets/inference/{name}.json (nested names allowed)")
    parser.add_argument("--model-variant", "--model_variant", dest="model_variant",
                        help="variant (default: the experiment's defaults.application)")
    parser.add_argument("--skip-existing", action="store_true", help="keep finished files")
    parser.add_argument("--no-server", action="store_true",
                        help="load the model locally (the only mode there is)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass")
    if model_flags:
        parser.add_argument("--load-in-8bit", action="store_true", help="bitsandbytes, CUDA")
        parser.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes, CUDA")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="residlab", description="Residual-stream experiments on chat models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    noise = commands.add_parser("noise", help="residual noising runner")
    stages = noise.add_subparsers(dest="stage", required=True, parser_class=_Parser)

    generate = stages.add_parser("generate", help="generate with noise added to a layer")
    _add_config_flags(generate)
    generate.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    generate.add_argument("--cov-sqrt", "--cov_sqrt", dest="cov_sqrt", metavar="NPY",
                          help="shape noise with this cov_sqrt.npy")
    generate.set_defaults(handler=_noise_generate)

    covariance = stages.add_parser("covariance", help="estimate the residual covariance")
    _add_config_flags(covariance)
    covariance.set_defaults(handler=_noise_covariance)

    evaluate = stages.add_parser("eval", help="score generations under a reference model")
    _add_config_flags(evaluate)
    _run_dir_flag(evaluate)
    evaluate.add_argument("--no-score-eos", "--no_score_eos", dest="no_score_eos",
                          action="store_true", help="leave the end-of-turn token unscored")
    evaluate.set_defaults(handler=_noise_eval)

    viz = stages.add_parser("viz", help="write RUN/viz.html to browse the worst generations")
    viz.add_argument("--config", help="the run's config (optional)")
    _run_dir_flag(viz)
    viz.add_argument("--top_n", "--top-n", dest="top_n", type=int, default=100,
                     help="worst examples kept per scale and ranking")
    viz.set_defaults(handler=_noise_viz)

    experiment = commands.add_parser("experiment", help="experiment folders")
    actions = experiment.add_subparsers(dest="action", required=True, parser_class=_Parser)
    init = actions.add_parser("init", help="write experiments/NAME/config.yaml")
    init.add_argument("name")
    init.set_defaults(handler=handlers.experiment_init)

    responses = commands.add_parser("responses", help="generate or import response JSONs")
    _experiment_flags(responses)
    responses.add_argument("--max-new-tokens", type=int, default=50)
    responses.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    responses.add_argument("--prefill", help="text appended after the generation prompt")
    responses.add_argument("--from-responses", metavar="JSON",
                           help="Mode B: a {prompt_id: response_text} file (tokenizer only)")
    responses.add_argument("--limit", type=int, help="first N prompts only")
    responses.add_argument("--output-suffix", help="write to responses/{prompt_set}_{suffix}")
    responses.add_argument("--steer", metavar="TRAIT:LAYER:COEF[,...]",
                           help="add coef x unit trait vector at the layer while generating")
    responses.set_defaults(handler=handlers.responses)

    capture = commands.add_parser("capture", help="capture raw activations by prefill")
    _experiment_flags(capture)
    capture.add_argument("--layers", help="e.g. 25,27,30 or 10-45:3 (default: all)")
    capture.add_argument("--capture-mlp", action="store_true", help="also mlp_contribution")
    capture.add_argument("--response-only", action="store_true", help="save response tokens only")
    capture.add_argument("--responses-from", metavar="VARIANT",
                         help="run this variant on another variant's tokens (model-diff)")
    capture.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16",
                         help="storage dtype")
    capture.set_defaults(handler=handlers.capture)

    extract = commands.add_parser("extract", help="extract trait vectors from contrastive data")
    extract.add_argument("--experiment", required=True)
    extract.add_argument("--traits", required=True, help="e.g. behavioral/refusal,emotion/optimism")
    extract.add_argument("--methods", default="mean_diff,probe,pca")
    extract.add_argument("--position", default="response[:5]",
                         help="response[:5], response, prompt[-1], all")
    extract.add_argument("--component", default="residual",
                         choices=["residual", "attn_contribution", "mlp_contribution"])
    extract.add_argument("--layers", help="e.g. 4-28:4 (default: all)")
    extract.add_argument("--model-variant", help="default: the experiment's defaults.extraction")
    extract.add_argument("--max-new-tokens", type=int, default=16)
    extract.add_argument("--test-fraction", type=float, default=0.2)
    extract.add_argument("--seed", type=int, default=0)
    extract.add_argument("--batch-size", type=int, default=16)
    extract.set_defaults(handler=handlers.extract)

    steer = commands.add_parser("steer", help="steering evaluation with a judge")
    steer.add_argument("--experiment", required=True)
    steer.add_argument("--trait", required=True)
    steer.add_argument("--layers", help="e.g. 8,12,16")
    steer.add_argument("--coefficients", default="", help="e.g. -8,4,8,16 (0 is the baseline)")
    steer.add_argument("--method", default="mean_diff")
    steer.add_argument("--position", default="response[:5]")
    steer.add_argument("--component", default="residual")
    steer.add_argument("--model-variant", help="the model that answers (default: application)")
    steer.add_argument("--extraction-variant", help="whose vectors (default: extraction)")
    steer.add_argument("--max-new-tokens", type=int, default=48)
    steer.add_argument("--batch-size", type=int, default=32)
    steer.add_argument("--judge-url", help="OpenAI-compatible endpoint, e.g. http://host/v1")
    steer.add_argument("--judge-model", help="endpoint model, or a local judge (default: "
                       "the embedded model)")
    steer.add_argument("--judge-key-env", default="OPENAI_API_KEY",
                       help="environment variable holding the endpoint key")
    steer.add_argument("--positions", choices=["all", "prompt", "generated"], default="all",
                       help="where the vector is added (default: every token)")
    steer.add_argument("--rescore", action="store_true", help="judge the saved answers again")
    steer.set_defaults(handler=handlers.steer)

    project = commands.add_parser("project", help="project captures onto trait vectors")
    project.add_argument("--experiment", required=True)
    project.add_argument("--prompt-set", "--prompt_set", dest="prompt_set", required=True)
    project.add_argument("--model-variant", help="whose captures (default: application)")
    project.add_argument("--layer", default="best", help="best, best+5, 16 (default: best)")
    project.add_argument("--method", help="default: auto")
    project.add_argument("--component", default="residual",
                         choices=["residual", "attn_contribution", "mlp_contribution"])
    project.add_argument("--position", help="vector position (default: auto)")
    project.add_argument("--extraction-variant", help="default: the experiment's extraction")
    project.add_argument("--traits", help="comma-separated (default: all extracted)")
    project.add_argument("--skip-existing", action="store_true")
    project.add_argument("--no-calibration", action="store_true",
                         help="do not embed massive-dims values")
    project.add_argument("--centered", action="store_true", help="subtract the vector baseline")
    project.add_argument("--clean-massive-dims", action="store_true",
                         help="also projections with the massive dims removed")
    project.set_defaults(handler=handlers.project)

    calibrate = commands.add_parser("calibrate", help="massive-dims calibration")
    calibrate.add_argument("--experiment", required=True)
    calibrate.add_argument("--model-variant")
    calibrate.add_argument("--prompt-set", default="calibration")
    calibrate.add_argument("--top-k", type=int, default=8)
    calibrate.add_argument("--batch-size", type=int, default=8)
    calibrate.set_defaults(handler=handlers.calibrate)
    return parser


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "datasets", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    handler: Callable[[argparse.Namespace], None] = args.handler
    try:
        handler(args)
    except (ValueError, LookupError, OSError) as error:  # bad input or environment
        print(f"residlab: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("residlab: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
