"""What every noising job's worker shares: its model, loaded as the run's config says, and the
model's architecture (see :class:`residlab.executors.ShardJob`)."""

from __future__ import annotations

from typing import Any

from residlab.arch import resolve_arch
from residlab.config import NoisingConfig
from residlab.executors import ShardJob
from residlab.models import LoadedModel, load_model

__all__ = ["NoisingJob"]


class NoisingJob(ShardJob):
    """A shard job of the noising runner: ``cfg`` says dtype, device and layers path;
    :meth:`model_name` says which model (the generator, or the reference for eval)."""

    local_only = ("loaded", "arch")
    cfg: NoisingConfig
    arch: Any = None

    def model_name(self) -> str:
        return self.cfg.model_name

    def model_key(self) -> tuple:
        cfg = self.cfg
        return (self.model_name(), cfg.dtype, cfg.device, cfg.trust_remote_code)

    def load(self) -> LoadedModel:
        cfg = self.cfg
        return load_model(self.model_name(), dtype=cfg.dtype, device=cfg.device,
                          trust_remote_code=cfg.trust_remote_code)

    def setup(self) -> None:
        super().setup()
        if self.arch is None:
            self.arch = resolve_arch(self.loaded.model, self.cfg.layers_path)
