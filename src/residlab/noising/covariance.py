"""Estimate the residual-stream covariance where noise is injected, for noise shaping.

Prompt-only inputs are run through the model in ``cov_batches`` batches of ``batch_size``;
the activation at the injection site is captured through the interventions engine and fed,
without pad positions, into a streaming float64 fitter. Results go to
``<output_dir>/cov/<timestamp>/{cov.npy, cov_sqrt.npy, config.yaml}``.

    python -m residlab.noising.covariance --config configs/example.yaml
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from residlab.arch import resolve_arch
from residlab.config import NoisingConfig
from residlab.errors import UsageError
from residlab.generation import padded_inputs
from residlab.hooks import Capture, intervene
from residlab.models import LoadedModel, load_model
from residlab.store import write_npy, write_yaml

__all__ = ["Covariance", "CovarianceFitter", "main", "psd_sqrt", "run_covariance"]


@dataclass(frozen=True)
class Covariance:
    """A finished estimate: mean ``(D,)``, covariance ``(D, D)`` (ddof=1), sample count."""

    mean: np.ndarray
    cov: np.ndarray
    count: int


class CovarianceFitter:
    """Running mean and co-moment in float64, merged batch by batch (Chan et al.)."""

    def __init__(self, dim: int):
        self.count = 0
        self.mean = np.zeros(dim)  # (D,)
        self.comoment = np.zeros((dim, dim))  # (D, D): sum of outer products of deviations

    def update(self, x: np.ndarray | torch.Tensor) -> None:
        """Add samples ``x``: ``(N, D)``."""
        x = np.asarray(x.float().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
        n = x.shape[0]
        if n == 0:
            return
        batch_mean = x.mean(axis=0)  # (D,)
        centered = x - batch_mean  # (N, D)
        delta = batch_mean - self.mean  # (D,)
        total = self.count + n
        self.comoment += centered.T @ centered + np.outer(delta, delta) * (self.count * n / total)
        self.mean += delta * (n / total)
        self.count = total

    def result(self) -> Covariance:
        if self.count < 2:
            raise UsageError("fewer than 2 activation vectors seen; use more prompts or batches")
        return Covariance(self.mean.copy(), self.comoment / (self.count - 1), self.count)


def psd_sqrt(cov: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root via ``eigh``, negative eigenvalues clamped to 0."""
    symmetric = (cov + cov.T) / 2
    values, vectors = np.linalg.eigh(symmetric)
    roots = np.sqrt(np.clip(values, 0.0, None))
    return (vectors * roots) @ vectors.T  # (D, D)


def fit_covariance(
    loaded: LoadedModel, cfg: NoisingConfig, prompts: list, *, progress: bool = True
) -> Covariance:
    """Stream the site's activations over ``cov_batches`` batches of prompt-only inputs."""
    arch = resolve_arch(loaded.model, cfg.layers_path)
    fitter = CovarianceFitter(arch.d_model)
    batches = [prompts[i:i + cfg.batch_size] for i in range(0, len(prompts), cfg.batch_size)]
    pad = loaded.tokenizer.pad_token_id or 0
    for batch in tqdm(batches[: cfg.cov_batches], desc="covariance batches", disable=not progress):
        inputs = padded_inputs([p.token_ids for p in batch], pad, loaded.device)
        capture = Capture(cfg.layer_index, cfg.site, positions="all")
        with torch.inference_mode(), intervene(loaded.model, [capture], arch=arch):
            loaded.model(**inputs)
        keep = capture.mask()  # (B, T) real tokens
        if cfg.cov_exclude_first:
            first = keep.int().argmax(dim=1)  # first real token of each row
            keep = keep.clone()
            keep[torch.arange(keep.shape[0]), first] = False
        fitter.update(capture.values()[keep])  # (N, D)
    return fitter.result()


def _save(cfg: NoisingConfig, loaded: LoadedModel, estimate: Covariance) -> Path:
    """Write everything into a staging dir, then rename it to ``cov/<timestamp>``."""
    parent = Path(cfg.output_dir) / "cov"
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=".staging-"))
    try:
        return _publish(staging, cfg, loaded, estimate)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, cfg: NoisingConfig, loaded: LoadedModel, estimate: Covariance):
    write_npy(staging / "cov.npy", estimate.cov)
    write_npy(staging / "cov_sqrt.npy", psd_sqrt(estimate.cov))
    write_npy(staging / "mean.npy", estimate.mean)
    write_yaml(staging / "config.yaml", {
        **cfg.model_dump(), "provenance": {**loaded.provenance, "seed": cfg.seed},
        "estimate": {"layer_index": cfg.layer_index, "site": cfg.site, "tokens": estimate.count},
    })
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        target = staging.parent / (stamp if attempt == 0 else f"{stamp}-{attempt}")
        try:
            os.rename(staging, target)
            return target
        except OSError:
            continue
    raise RuntimeError(f"cannot name the covariance directory under {staging.parent}")


def run_covariance(cfg: NoisingConfig, *, loaded: LoadedModel | None = None) -> Path:
    """Estimate and save ``cov.npy`` / ``cov_sqrt.npy``; returns their directory."""
    from residlab.noising.generate import load_run_prompts

    loaded = loaded or load_model(cfg.model_name, dtype=cfg.dtype, device=cfg.device,
                                  trust_remote_code=cfg.trust_remote_code)
    resolve_arch(loaded.model, cfg.layers_path).normalize_layer(cfg.layer_index)
    needed = cfg.cov_batches * cfg.batch_size
    prompts = load_run_prompts(cfg.model_copy(update={"num_prompts": needed}), loaded.tokenizer)
    return _save(cfg, loaded, fit_covariance(loaded, cfg, prompts))


def main(argv: list[str] | None = None) -> int:
    from residlab.cli import main as cli_main

    return cli_main(["noise", "covariance", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
