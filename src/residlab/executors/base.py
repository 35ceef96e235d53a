"""The executor interface: settings, shards, jobs (see :mod:`residlab.executors`)."""


from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import Field

from residlab.options import CommandOptions, option

__all__ = [
    "EXECUTOR_KEYS",
    "Executor",
    "ExecutorOptions",
    "ExecutorSettings",
    "Shard",
    "ShardJob",
]

EXECUTOR_KEYS = ("executor", "workers", "gpus_per_worker", "cpus_per_worker", "ray_address",
                 "max_retries")


@dataclass(frozen=True)
class ExecutorSettings:
    """How to run a job's shards (never what they compute)."""

    executor: Literal["local", "ray"] = "local"
    workers: int | None = None  # None: as many as the cluster's resources fit
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_worker: float = 1.0
    ray_address: str | None = None  # None: RAY_ADDRESS, else a local Ray
    max_retries: int = 2


class ExecutorOptions(CommandOptions):
    """The executor's keys, shared by every command that runs shards (config keys and flags)."""

    executor: Literal["local", "ray"] = option(
        "local", "local: this process; ray: Ray actors (pip install 'residlab[ray]')")
    workers: int | None = Field(None, ge=1, description="Ray workers (default: as many as "
                                "the cluster's CPUs / GPUs fit)")
    gpus_per_worker: float | None = Field(None, ge=0, description="GPUs per Ray worker "
                                          "(default: 1 when the cluster has GPUs, else 0)")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per Ray worker (also its "
                                   "torch threads)")
    ray_address: str | None = option(None, "Ray cluster to join (default: RAY_ADDRESS, else "
                                     "start a local Ray)")
    max_retries: int = Field(2, ge=0, description="Ray: times a shard is retried on another "
                             "worker after its worker died")

    def executor_settings(self) -> ExecutorSettings:
        return ExecutorSettings(**{key: getattr(self, key) for key in EXECUTOR_KEYS})


@dataclass(frozen=True)
class Shard:
    """One unit of work: ``key`` names it (its file, its place in the output), ``payload`` is
    what the worker needs besides the job, ``size`` is what the progress bar counts."""

    key: int
    payload: Any
    size: int = 1


class ShardJob:
    """What every shard of one job shares, and how one shard is computed.

    A job is pickled to each Ray worker, which calls :meth:`setup` once (load the model) and
    then :meth:`compute` per shard. Attributes named in ``local_only`` (the driver's loaded
    model) are not sent: a worker loads its own with :meth:`load`.
    """

    local_only: tuple[str, ...] = ("loaded",)
    loaded: Any = None

    def load(self) -> Any:
        """Load this job's model in a worker (a ``LoadedModel``)."""
        raise NotImplementedError

    def model_key(self) -> Any:
        """What :meth:`load` loads, as a value to compare: a worker whose previous job had an
        equal key (not ``None``) hands that model to this job instead of loading it again."""
        return None

    def setup(self) -> None:
        if self.loaded is None:
            self.loaded = self.load()

    def compute(self, payload: Any) -> Any:
        raise NotImplementedError

    def pack(self, result: Any) -> Any:
        """The result as it may leave a worker (e.g. tensors that own their memory)."""
        return result

    def __getstate__(self) -> dict[str, Any]:
        return {key: (None if key in self.local_only else value)
                for key, value in self.__dict__.items()}


class Executor(Protocol):
    remote: bool  # False: shards run in this process, results are not packed

    def run(self, job: ShardJob, shards: Sequence[Shard],
            on_done: Callable[[Shard, Any], None], *, bar: Any = None) -> None:
        """Compute every shard; call ``on_done(shard, result)`` in the driver once per shard
        (in any order), then ``bar.update(shard.size)``."""
        ...

    def close(self) -> None:
        ...

    def __enter__(self) -> Executor:
        ...

    def __exit__(self, *exc: Any) -> None:
        ...
