"""Estimate the residual-stream covariance where noise is injected, for noise shaping.

Prompt-only inputs are run through the model in ``cov_batches`` batches of ``batch_size``;
the activation at the injection site is captured through the interventions engine and fed,
without pad positions, into a streaming float64 fitter. Results go to
``<output_dir>/cov/<timestamp>/{cov.npy, cov_sqrt.npy, mean.npy, estimate.json, config.yaml}``;
``estimate.json`` says which model, layer and site the estimate describes, so generation only
shapes noise with an estimate made for its own model, layer and site.

    python -m residlab.noising.covariance --config configs/example.yaml
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from residlab.arch import resolve_arch
from residlab.config import NoisingConfig
from residlab.errors import UsageError
from residlab.executors import Executor, Shard
from residlab.executors.local import LocalExecutor
from residlab.generation import padded_inputs
from residlab.hooks import Capture, intervene
from residlab.models import LoadedModel, load_model
from residlab.noising.jobs import NoisingJob
from residlab.noising.noise import ESTIMATE_FILE, model_identity
from residlab.progress import progress as progress_bar
from residlab.store import write_json, write_npy, write_yaml

__all__ = ["Covariance", "CovarianceFitter", "CovarianceJob", "psd_sqrt", "run_covariance"]


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
        if x.shape[0] == 0:
            return
        batch = CovarianceFitter(x.shape[1])
        batch.count = x.shape[0]
        batch.mean = x.mean(axis=0)  # (D,)
        centered = x - batch.mean  # (N, D)
        batch.comoment = centered.T @ centered  # (D, D)
        self.merge(batch)

    def merge(self, other: CovarianceFitter) -> None:
        """Add another fitter's samples (Chan et al.'s pairwise update).

        Merging the same per-batch fitters in the same order gives the same bits whoever
        computed them, so workers return one fitter per batch and the driver merges them in
        batch order: a Ray estimate equals the local one exactly."""
        n = other.count
        if n == 0:
            return
        delta = other.mean - self.mean  # (D,)
        total = self.count + n
        self.comoment += other.comoment + np.outer(delta, delta) * (self.count * n / total)
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


class CovarianceJob(NoisingJob):
    """Covariance batches: a shard's payload is a batch of prompt token ids; its result is
    that batch's own :class:`CovarianceFitter` (float64 count, mean, co-moment)."""


    def __init__(self, cfg: NoisingConfig, *, loaded: LoadedModel | None = None, arch=None):
        self.cfg, self.loaded, self.arch = cfg, loaded, arch

    def compute(self, payload: list[list[int]]) -> CovarianceFitter:
        cfg, loaded = self.cfg, self.loaded
        inputs = padded_inputs(payload, loaded.tokenizer.pad_token_id or 0, loaded.device)
        capture = Capture(cfg.layer_index, cfg.site, positions="all")
        with torch.inference_mode(), intervene(loaded.model, [capture], arch=self.arch,
                                               prompt_mask=inputs["attention_mask"]):
            loaded.model(**inputs)
        keep = capture.mask()  # (B, T) real tokens
        if cfg.cov_exclude_first:
            first = keep.int().argmax(dim=1)  # first real token of each row
            keep = keep.clone()
            keep[torch.arange(keep.shape[0]), first] = False
        fitter = CovarianceFitter(self.arch.d_model)
        fitter.update(capture.values()[keep])  # (N, D)
        return fitter


def fit_covariance(
    loaded: LoadedModel, cfg: NoisingConfig, prompts: list, *,
    executor: Executor | None = None,
) -> Covariance:
    """Stream the site's activations over ``cov_batches`` batches of prompt-only inputs;
    ``executor`` computes the batches (default: this process), merged here in batch order."""
    arch = resolve_arch(loaded.model, cfg.layers_path)
    fitter = CovarianceFitter(arch.d_model)
    batches = [prompts[i:i + cfg.batch_size] for i in range(0, len(prompts), cfg.batch_size)]
    batches = batches[: cfg.cov_batches]
    work = [Shard(i, [p.token_ids for p in batch], len(batch)) for i, batch in enumerate(batches)]
    waiting: dict[int, CovarianceFitter] = {}  # finished out of order, not merged yet
    next_key = 0

    def merge_in_order(shard: Shard, batch: CovarianceFitter) -> None:
        nonlocal next_key
        waiting[shard.key] = batch
        while next_key in waiting:
            fitter.merge(waiting.pop(next_key))
            next_key += 1

    job = CovarianceJob(cfg, loaded=loaded, arch=arch)
    with progress_bar(total=sum(map(len, batches)), desc="covariance", unit="prompts") as bar:
        (executor or LocalExecutor()).run(job, work, merge_in_order, bar=bar)
    assert not waiting, "every batch is merged"
    return fitter.result()


def _save(cfg: NoisingConfig, loaded: LoadedModel, estimate: Covariance, layer: int) -> Path:
    """Write everything into a staging dir, then rename it to ``cov/<timestamp>``."""
    parent = Path(cfg.output_dir) / "cov"
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=".staging-"))
    try:
        return _publish(staging, cfg, loaded, estimate, layer)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _estimate_record(
    cfg: NoisingConfig, loaded: LoadedModel, estimate: Covariance, layer: int,
) -> dict:
    """What ``estimate.json`` holds: what the estimate describes (model, normalised layer,
    site, which tokens) so that generation can refuse an estimate made for something else."""
    return {
        "model": model_identity(loaded.provenance),
        "layer_index": layer,
        "site": cfg.site,
        "positions": "prompt",  # every real prompt token of prompt-only inputs
        "cov_exclude_first": cfg.cov_exclude_first,
        "d_model": int(estimate.mean.shape[0]),
        "tokens": estimate.count,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "layers_path": cfg.layers_path,
    }


def _publish(
    staging: Path, cfg: NoisingConfig, loaded: LoadedModel, estimate: Covariance, layer: int,
) -> Path:
    record = _estimate_record(cfg, loaded, estimate, layer)
    write_npy(staging / "cov.npy", estimate.cov)
    write_npy(staging / "cov_sqrt.npy", psd_sqrt(estimate.cov))
    write_npy(staging / "mean.npy", estimate.mean)
    write_json(staging / ESTIMATE_FILE, record)
    write_yaml(staging / "config.yaml", {
        **cfg.run_record(), "provenance": {**loaded.provenance, "seed": cfg.seed},
        "estimate": record,
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


def run_covariance(cfg: NoisingConfig, *, loaded: LoadedModel | None = None,
                   executor: Executor | None = None) -> Path:
    """Estimate and save ``cov.npy`` / ``cov_sqrt.npy``; returns their directory."""
    from residlab.noising.generate import load_run_prompts

    loaded = loaded or load_model(cfg.model_name, dtype=cfg.dtype, device=cfg.device,
                                  trust_remote_code=cfg.trust_remote_code)
    layer = resolve_arch(loaded.model, cfg.layers_path).normalize_layer(cfg.layer_index)
    needed = cfg.cov_batches * cfg.batch_size
    prompts = load_run_prompts(cfg.model_copy(update={"num_prompts": needed}), loaded.tokenizer)
    estimate = fit_covariance(loaded, cfg, prompts, executor=executor)
    return _save(cfg, loaded, estimate, layer)


if __name__ == "__main__":
    from residlab.cli import run_module

    raise SystemExit(run_module("noise", "covariance"))
