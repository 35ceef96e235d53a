"""Model diff: two variants of a model (e.g. base vs LoRA) on identical tokens.

Everything lands under ``experiments/{exp}/model_diff/{A}_vs_{B}/`` (:func:`diff_dir`).
"""

from __future__ import annotations

from pathlib import Path

from residlab.experiments import Experiment

__all__ = ["diff_dir"]


def diff_dir(experiment: Experiment, variant_a: str, variant_b: str) -> Path:
    """``experiments/{exp}/model_diff/{A}_vs_{B}``."""
    return experiment.path / "model_diff" / f"{variant_a}_vs_{variant_b}"
