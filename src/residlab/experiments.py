"""Experiments: a folder with model variants and everything computed with them.

```
experiments/{exp}/
  config.yaml                                   model_variants + defaults
  inference/{variant}/responses/{prompt_set}/{id}.json
  inference/{variant}/raw/residual/{prompt_set}/{id}.safetensors  (+ _provenance.json)
```

The experiments root is ``./experiments`` unless ``RESIDLAB_EXPERIMENTS_DIR`` says otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from residlab.config import explain
from residlab.errors import NotFound, UsageError
from residlab.options import DType
from residlab.store import write_text
from residlab.textfiles import read_user_text

__all__ = [
    "Experiment",
    "ExperimentConfig",
    "Variant",
    "experiments_root",
    "init_experiment",
    "load_experiment",
    "load_variant",
    "with_lora",
]


class Variant(BaseModel):
    """One way of running a model: weights, optional LoRA adapter, dtype."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field("default", description="hub id, local directory, or 'default'")
    lora: str | None = Field(None, description="PEFT adapter (hub id or directory) on top")
    dtype: DType = Field("bf16", description="bf16, fp16, fp32 (any common spelling) or auto")
    device: str = "auto"
    trust_remote_code: bool = False


class Defaults(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    application: str | None = None  # variant for responses / capture / projection
    extraction: str | None = None  # variant whose vectors are extracted


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model_variants: dict[str, Variant]
    defaults: Defaults = Defaults()


STARTER = """\
# residlab experiment. Variants name the models you compare; a LoRA variant loads its adapter
# on top of its base model (e.g. {model: default, lora: path/to/adapter}).
model_variants:
  base:
    model: default        # the embedded SmolLM2-135M-Instruct; or a hub id / local directory
    dtype: bf16
  instruct:
    model: default
    dtype: fp32
defaults:
  application: instruct   # responses, capture and projection use this variant by default
  extraction: base        # trait vectors are extracted with this one
"""


def experiments_root() -> Path:
    return Path(os.environ.get("RESIDLAB_EXPERIMENTS_DIR", "experiments"))


@dataclass(frozen=True)
class Experiment:
    name: str
    path: Path
    config: ExperimentConfig

    def variant(self, name: str | None, role: str = "application") -> tuple[str, Variant]:
        """``name`` or the default for ``role``; an error lists the variants that exist."""
        chosen = name or getattr(self.config.defaults, role)
        if chosen is None:
            chosen = next(iter(self.config.model_variants))
        if chosen not in self.config.model_variants:
            known = ", ".join(self.config.model_variants)
            raise NotFound(f"experiment {self.name!r} has no model variant {chosen!r}; "
                              f"variants: {known}")
        return chosen, self.config.model_variants[chosen]

    def inference_dir(self, variant: str) -> Path:
        return self.path / "inference" / variant

    def responses_dir(self, variant: str, prompt_set: str) -> Path:
        return self.inference_dir(variant) / "responses" / prompt_set

    def raw_dir(self, variant: str, prompt_set: str) -> Path:
        return self.inference_dir(variant) / "raw" / "residual" / prompt_set


def load_experiment(name: str, root: str | Path | None = None) -> Experiment:
    root = Path(root) if root is not None else experiments_root()
    path = root / name / "config.yaml"
    if not path.is_file():
        known = sorted(p.parent.name for p in root.glob("*/config.yaml")) if root.is_dir() else []
        listing = ", ".join(known) if known else "none"
        raise NotFound(f"experiment {name!r} not found under {root}/ (experiments: "
                          f"{listing}); create one with 'residlab experiment init {name}'")
    try:
        data = yaml.safe_load(read_user_text(path, "experiment config")) or {}
    except yaml.YAMLError:
        raise UsageError(f"{path} is not valid YAML") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} must be a mapping with model_variants and defaults")
    try:
        config = ExperimentConfig(**data)
    except ValidationError as error:
        raise UsageError(f"{path}: {explain(error, ExperimentConfig)}") from None
    return Experiment(name, root / name, config)


def init_experiment(name: str, root: str | Path | None = None) -> Path:
    """Write a starter ``config.yaml`` using the embedded model (never overwrites)."""
    if not name or "/" in name or name.startswith("."):
        raise UsageError(f"experiment name {name!r} must be a plain folder name")
    root = Path(root) if root is not None else experiments_root()
    path = root / name / "config.yaml"
    if path.exists():
        raise UsageError(f"{path} already exists; edit it or pick another name")
    write_text(path, STARTER)
    return path


def load_variant(
    experiment: Experiment, name: str | None = None, *, role: str = "application",
    load_in_8bit: bool = False, load_in_4bit: bool = False,
):
    """Load a variant's model (and LoRA adapter) -> ``LoadedModel`` named after the variant."""
    from residlab.models import load_model

    variant_name, variant = experiment.variant(name, role)
    loaded = load_model(variant.model, dtype=variant.dtype, device=variant.device,
                        trust_remote_code=variant.trust_remote_code,
                        load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit)
    if variant.lora:
        loaded = with_lora(loaded, variant.lora)
    loaded.provenance["variant"] = variant_name
    return loaded


def with_lora(loaded, adapter: str):
    """``loaded`` with the PEFT adapter ``adapter`` on top (its model replaced in place)."""
    try:
        from peft import PeftModel
    except ImportError:
        raise UsageError("LoRA variants need peft: pip install 'residlab[lora]'") from None
    try:
        model = PeftModel.from_pretrained(loaded.model, adapter)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot load LoRA adapter {adapter!r}: "
                         f"{' '.join(str(error).split())[:200]}") from None
    model.eval()
    loaded.model = model
    loaded.provenance["lora"] = adapter
    loaded.name = f"{loaded.name}+lora:{adapter}"
    return loaded
