"""The default executor: every shard in this process, one after another, in order."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from residlab.executors.base import Shard, ShardJob

__all__ = ["LocalExecutor"]


class LocalExecutor:
    """Runs shards in order with the driver's own model: exactly the loop a local run had."""

    remote = False

    def run(self, job: ShardJob, shards: Sequence[Shard],
            on_done: Callable[[Shard, Any], None], *, bar: Any = None) -> None:
        if not shards:
            return
        job.setup()
        for shard in shards:
            on_done(shard, job.compute(shard.payload))
            if bar is not None:
                bar.update(shard.size)

    def close(self) -> None:
        return None

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
