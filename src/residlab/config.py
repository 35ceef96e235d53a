"""Typed configs. Seed YAML files work as they are; unknown keys are errors with a suggestion."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, field_validator, model_validator

from residlab.errors import UsageError
from residlab.executors import EXECUTOR_KEYS, ExecutorOptions
from residlab.options import DType, validate
from residlab.options import explain as explain
from residlab.textfiles import read_user_text

__all__ = ["RUN_EXTRAS", "NoisingConfig", "explain", "load_config"]

# Sections a run adds to its config.yaml; ignored when that file is used as a config again.
RUN_EXTRAS = ("provenance", "noise_shaping", "estimate")


class NoisingConfig(ExecutorOptions):
    """Everything the noising runner needs; field names are the YAML keys (and flags).

    The executor keys (``executor``, ``workers``, ...; see :mod:`residlab.executors`) say how
    shards run, never what they compute: they are left out of a run's ``config.yaml``
    (:meth:`run_record`), so a run started on one executor resumes on any other.
    """

    # --- the seed's keys ---
    model_name: str = Field("default", description="hub id, local directory, or 'default'")
    reference_model_name: str | None = Field(None, description="scorer; defaults to model_name")
    dtype: DType = Field("bf16", description="bf16|bfloat16, fp16|float16|half, "
                         "fp32|float32|float, or auto (the checkpoint's dtype)")
    dataset_name: str | None = Field(
        None, description="hub dataset in the lmsys-chat-1m schema; None/'builtin': built-in"
    )
    num_prompts: int = Field(1000, ge=1)
    max_prompt_len: int = Field(256, ge=1, description="drop prompts longer than this (tokens)")
    batch_size: int = Field(8, ge=1, description="rows per forward pass")
    max_new_tokens: int = Field(128, ge=1)
    layer_index: int = Field(6, description="block whose residual stream gets the vector")
    noise_norms: list[float] | None = Field(None, description="norm sweep; else [noise_norm]")
    noise_norm: float | None = None
    num_noise_vectors: int = Field(8, ge=1)
    seed: int = 0
    output_dir: str = "noising/outputs"
    # --- additions ---
    dataset_split: str = "train"
    dataset_path: str | None = Field(None, description="local .parquet / .jsonl, same schema")
    shuffle: bool = False
    system_prompt: str | None = None
    site: Literal["resid_pre", "resid_post", "attn_out", "mlp_out"] = "resid_pre"
    positions: Literal["all", "prompt", "generated"] = "all"
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    generation_defaults: Literal["plain", "model"] = Field(
        "plain", description="plain: transformers' defaults; model: also the checkpoint's "
        "generation_config.json (repetition_penalty, ...)")
    shape_noise: bool = True
    cov_sqrt_path: str | None = None
    cov_batches: int = Field(10, ge=1)
    cov_exclude_first: bool = False
    device: str = "auto"
    trust_remote_code: bool = False
    layers_path: str | None = None

    @field_validator("noise_norms")
    @classmethod
    def _norms_ok(cls, norms: list[float] | None) -> list[float] | None:
        for norm in norms or []:
            if not math.isfinite(norm) or norm < 0:
                raise UsageError(f"noise norm {norm} must be a finite number >= 0")
        return norms

    @field_validator("noise_norm")
    @classmethod
    def _norm_ok(cls, norm: float | None) -> float | None:
        return None if norm is None else cls._norms_ok([norm])[0]

    @model_validator(mode="after")
    def _sweep_given(self) -> NoisingConfig:
        if not self.noise_norms and self.noise_norm is None:
            raise UsageError("set noise_norms (a list of scales) or noise_norm")
        return self

    @property
    def scales(self) -> list[float]:
        """The norm sweep: ``noise_norms`` or ``[noise_norm]``."""
        return list(self.noise_norms) if self.noise_norms else [float(self.noise_norm)]

    @property
    def reference_model(self) -> str:
        return self.reference_model_name or self.model_name

    def run_record(self) -> dict[str, Any]:
        """The keys written into a run's ``config.yaml``: everything but the executor's."""
        return self.model_dump(exclude=set(EXECUTOR_KEYS))


def load_config(
    path: str | Path | None, overrides: dict[str, Any] | None = None,
    model: type[BaseModel] = NoisingConfig,
):
    """Read YAML at ``path`` (may be None), apply ``overrides``, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"config file {str(path)!r} not found; pass --config path/to.yaml")
        try:
            loaded = yaml.safe_load(read_user_text(path, "config file"))
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            line = f" at line {mark.line + 1}" if mark else ""
            raise UsageError(f"config file {str(path)!r} is not valid YAML{line}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise UsageError(f"config file {str(path)!r} must be a mapping of keys to values")
        data = {key: value for key, value in (loaded or {}).items() if key not in RUN_EXTRAS}
    overrides = {key: value for key, value in (overrides or {}).items() if value is not None}
    if "noise_norm" in overrides and data.get("noise_norms") and "noise_norms" not in overrides:
        raise UsageError(
            f"--noise_norm is given but {str(path)!r} sets noise_norms, which would win; "
            "give the sweep as --noise_norms 4 (one value is a list of one)")
    data.update(overrides)
    return validate(model, data, what="config key")
