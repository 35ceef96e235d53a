"""The commands of ``residlab``: each is an options model plus a function that runs it.

Modules here import only pydantic at import time; each ``run`` imports the heavy stages it
needs, so ``residlab --help`` stays instant. To add a command, write its options model and its
``run`` function in one of these modules and list it in :data:`COMMANDS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from residlab.commands import dashboard, diff, inference, noise, serve, traits
from residlab.options import CommandOptions

__all__ = ["COMMANDS", "Command"]


@dataclass(frozen=True)
class Command:
    """``residlab <path...>``: parsed into ``options`` and handed to ``run``."""

    path: tuple[str, ...]
    help: str
    options: type[CommandOptions]
    run: Callable[..., None]


COMMANDS: list[Command] = [
    Command(("noise", "generate"), "generate with noise added to a layer",
            noise.NoiseGenerateOptions, noise.run_generate_command),
    Command(("noise", "covariance"), "estimate the residual covariance for noise shaping",
            noise.NoiseCovarianceOptions, noise.run_covariance_command),
    Command(("noise", "eval"), "score generations under a reference model",
            noise.NoiseEvalOptions, noise.run_eval_command),
    Command(("noise", "viz"), "write RUN/viz.html to browse the worst generations",
            noise.NoiseVizOptions, noise.run_viz_command),
    Command(("experiment", "init"), "write experiments/NAME/config.yaml",
            inference.ExperimentInitOptions, inference.run_experiment_init),
    Command(("responses",), "generate (Mode A) or import (Mode B) response JSONs",
            inference.ResponsesOptions, inference.run_responses),
    Command(("capture",), "capture raw activations by prefill",
            inference.CaptureOptions, inference.run_capture),
    Command(("project",), "project captures onto trait vectors",
            inference.ProjectOptions, inference.run_project),
    Command(("extract-viz",), "logit lens and attention per token, or of trait vectors",
            inference.ExtractVizOptions, inference.run_extract_viz),
    Command(("calibrate",), "massive-dims calibration",
            inference.CalibrateOptions, inference.run_calibrate),
    Command(("extract",), "extract trait vectors from contrastive data",
            traits.ExtractOptions, traits.run_extract),
    Command(("steer",), "steering evaluation with a judge",
            traits.SteerOptions, traits.run_steer),
    Command(("serve",), "serve a model over HTTP: model API and Live Chat",
            serve.ServeOptions, serve.run_serve),
    Command(("diff", "compare"), "effect sizes and cosines of two variants on the same tokens",
            diff.DiffCompareOptions, diff.run_compare),
    Command(("diff", "per-token"), "per-token and per-clause projection deltas (B - A)",
            diff.DiffPerTokenOptions, diff.run_per_token),
    Command(("diff", "layers"), "per-token deltas at several layers and their correlations",
            diff.DiffLayersOptions, diff.run_layers),
    Command(("diff", "spans"), "the highest-delta spans across a prompt set",
            diff.DiffSpansOptions, diff.run_spans),
    Command(("diff", "logprobs"), "per-token log-prob and KL differences of the two variants",
            diff.DiffLogprobsOptions, diff.run_logprobs),
    Command(("diff", "run"), "the whole model-diff workflow with one model load",
            diff.DiffRunOptions, diff.run_diff_command),
    Command(("dashboard", "export"), "the dashboard of an experiment as a folder that opens "
            "from file://", dashboard.DashboardExportOptions, dashboard.run_export),
]
