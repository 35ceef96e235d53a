"""``residlab noise generate|covariance|eval|viz``: the residual noising runner.

These commands read the seed's YAML config (``--config``); every config key is also a flag
that overrides the file (``--num_prompts 4``), merged by :meth:`NoiseOptions.from_flags`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pydantic import Field, PrivateAttr

from residlab.config import NoisingConfig, load_config
from residlab.errors import UsageError
from residlab.executors import EXECUTOR_KEYS, ExecutorOptions, ExecutorSettings
from residlab.options import CommandOptions, flag_values, option, validate

__all__ = [
    "NoiseCovarianceOptions",
    "NoiseEvalOptions",
    "NoiseGenerateOptions",
    "NoiseVizOptions",
    "run_covariance_command",
    "run_eval_command",
    "run_generate_command",
    "run_viz_command",
]


class NoiseOptions(CommandOptions):
    """Options of a noising command: its own flags plus the resolved config (``settings``)."""

    settings_model = NoisingConfig

    config: str | None = option(None, "YAML config (the seed's keys are accepted as they are)")
    settings: NoisingConfig | None = option(None, cli=False)
    # A resumed run keeps its config, but may run on another executor than it started on.
    _execution: ExecutorSettings | None = PrivateAttr(None)

    def executor_settings(self) -> ExecutorSettings:
        """How to run the shards: the config's executor keys, or a resumed run's flags."""
        if self.settings is not None:
            return self.settings.executor_settings()
        return self._execution or ExecutorSettings()

    @classmethod
    def _config_file(cls, own: dict) -> str | None:
        return own.get("config")

    @classmethod
    def from_flags(cls, namespace: argparse.Namespace):
        own = flag_values(cls, namespace)
        overrides = flag_values(NoisingConfig, namespace)
        if own.get("resume"):
            execution = {key: overrides.pop(key) for key in EXECUTOR_KEYS if key in overrides}
            if overrides or own.get("config"):
                named = ", ".join(["config"] * bool(own.get("config")) + list(overrides))
                raise UsageError(f"a resumed run keeps its own config; drop {named} or start "
                                 "a new run")
            options = validate(cls, own)
            options._execution = validate(ExecutorOptions, execution).executor_settings()
            return options
        settings = load_config(cls._config_file(own), overrides)
        return validate(cls, {**own, "settings": settings})


class NoiseGenerateOptions(NoiseOptions):
    resume: str | None = option(None, "continue an interrupted run (RUN_DIR)")
    cov_sqrt: str | None = option(None, "shape the noise with this cov_sqrt.npy (wins over "
                                  "cov_sqrt_path and the estimates under output_dir)")


class NoiseCovarianceOptions(NoiseOptions):
    pass


class NoiseEvalOptions(NoiseOptions):
    run_dir: str = option(..., "a run directory made by 'residlab noise generate'")
    no_score_eos: bool = option(False, "leave the end-of-turn token unscored")

    @classmethod
    def _config_file(cls, own: dict) -> str | None:
        """Without --config, the run's own config.yaml (plus any override flags)."""
        if own.get("config") or not own.get("run_dir"):
            return own.get("config")
        from residlab.noising.runs import RunDir

        return str(RunDir(Path(own["run_dir"])).check().config_file)


class NoiseVizOptions(CommandOptions):
    config: str | None = option(None, "the run's config (optional; checked when given)")
    run_dir: str = option(..., "a run directory made by 'residlab noise generate'")
    top_n: int = Field(100, ge=1, description="worst examples kept per scale and ranking")


def record_command(folder: Path, command: str, options: CommandOptions, **extra) -> None:
    from residlab.commands.inference import record_command as record

    record(folder, command, options, **extra)


def run_generate_command(options: NoiseGenerateOptions) -> None:
    from residlab.executors import make_executor
    from residlab.noising.generate import run_generate

    with make_executor(options.executor_settings()) as executor:
        run = run_generate(options.settings, resume=options.resume, cov_sqrt=options.cov_sqrt,
                           executor=executor)
    print(f"run: {run}")


def run_covariance_command(options: NoiseCovarianceOptions) -> None:
    from residlab.executors import make_executor
    from residlab.noising.covariance import run_covariance

    with make_executor(options.executor_settings()) as executor:
        path = run_covariance(options.settings, executor=executor)
    print(f"covariance: {path}")


def run_eval_command(options: NoiseEvalOptions) -> None:
    from residlab.executors import make_executor
    from residlab.noising.eval import run_eval, summarize
    from residlab.store import read_jsonl

    with make_executor(options.executor_settings()) as executor:
        path, skipped = run_eval(options.settings, options.run_dir,
                                 score_eos=not options.no_score_eos, executor=executor)
    record_command(path.parent, "noise eval", options, file_name="eval_command.yaml")
    print(summarize(read_jsonl(path)))
    print(f"scores: {path}")
    if skipped:
        first = skipped[0]
        raise UsageError(f"skipped {len(skipped)} unreadable generation line(s) (first: "
                         f"{first.path}:{first.line}: {first.reason}); the rest were scored")


def run_viz_command(options: NoiseVizOptions) -> None:
    from residlab.noising.viz import run_viz

    if options.config:
        load_config(options.config)  # checked for consistency with the other stages
    page = run_viz(options.run_dir, top_n=options.top_n)
    record_command(page.parent, "noise viz", options, file_name="viz_command.yaml")
    print(f"viewer: {page}")
