"""Who computes a long job's shards: this process (``local``) or Ray actors (``ray``).

A long job (a noising sweep, an eval, a covariance estimate, a capture) is cut into independent
shards. A :class:`ShardJob` says *what* a shard computes (and how a worker gets its model); an
executor says *who* computes which shard. The driver keeps the bookkeeping: it chooses the
missing shards, hands them out, and writes each finished shard with the same atomic write a
local run uses, so ``--resume`` / ``--skip-existing`` work across executors.

Only the driver writes. Workers return a shard's result through Ray's object store and the
driver writes it, because
- one writer makes "nothing written twice" hold by construction: a shard given to a second
  worker after the first one died cannot race a late write of the first;
- outputs need not be on storage every node shares (only the model and inputs must be
  reachable from the workers, and the inputs travel with the job);
- the bytes on disk come from the very code a local run uses, so the files are identical.
The price is that results cross the object store: negligible for noising and eval shards
(JSON records), large for captures of big models (see the README's capacity plan).

Local runs never import Ray; :func:`make_executor` imports it only for ``executor: ray``.
"""

from __future__ import annotations

from typing import Any

from residlab.executors.base import (
    EXECUTOR_KEYS,
    Executor,
    ExecutorOptions,
    ExecutorSettings,
    Shard,
    ShardJob,
)

__all__ = [
    "EXECUTOR_KEYS",
    "Executor",
    "ExecutorOptions",
    "ExecutorSettings",
    "Shard",
    "ShardJob",
    "make_executor",
]


def make_executor(settings: ExecutorSettings | None = None, **hooks: Any) -> Executor:
    """The executor ``settings`` ask for; a Ray one is connected and checked here, before any
    work, so bad input (no Ray, unreachable cluster, too many GPUs) writes nothing."""
    settings = settings or ExecutorSettings()
    if settings.executor == "local":
        from residlab.executors.local import LocalExecutor

        return LocalExecutor()
    from residlab.executors.ray_executor import RayExecutor

    return RayExecutor(settings, **hooks)
