"""Ray executor speed on the embedded model, measured side by side in one run.

The same noising sweep (16 shards of 4 rows) three ways, one torch thread per worker:
1. 2 Ray workers vs 1 Ray worker: goal >= 1.7x (this machine has 2 cores).
2. 1 Ray worker vs the local executor (also one thread): goal >= 0.9x (Ray's overhead:
   scheduling, pickling shards and results through the object store).

What is timed, identically on every side: one ``run_generate`` call of the sweep into a new
folder, from the call to its return: checking the prompts, writing the run's first files,
every shard computed and written, and the final per-vector files. Not timed, on every side:
starting processes, importing torch and the first, dequantising load of the model (the local
executor's process has them; Ray's workers get them from a short warm-up sweep on the same
executor). Timed on the Ray side only, because a real Ray run pays it on top of a local
one: each worker loading the model for the new job (from the dequantised cache, ~0.5 s, in
parallel on 2 workers; skipped when the job names the same model as the worker's previous
job, see ``ShardJob.model_key``). Each configuration runs ``ROUNDS`` times, the rounds
interleaved (local, 1, 2, local, 1, 2, ...) so a slow spell of the machine hits all three,
and the fastest round of each is compared. Every run's generations are checked to be the
local run's, byte for byte. Per configuration the breakdown says where the time went: the
driver before the first shard is handed out, the shards, and after the last one is written.

    python benchmarks/bench_ray.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from residlab.config import NoisingConfig
from residlab.executors import ExecutorSettings, make_executor
from residlab.executors.local import LocalExecutor
from residlab.models import load_model
from residlab.noising.generate import run_generate
from residlab.noising.runs import RunDir

ROUNDS = 2


def sweep(root: Path, name: str, **changes) -> NoisingConfig:
    # 4 prompts x (1 shared zero row + 3 norms x 5 vectors) = 64 rows = 16 shards of 4
    settings = dict(model_name="default", dtype="fp32", device="cpu", num_prompts=4,
                    max_prompt_len=64, batch_size=4, max_new_tokens=24, layer_index=10,
                    noise_norms=[0.0, 4.0, 8.0, 16.0], num_noise_vectors=5, seed=0,
                    shape_noise=False, output_dir=str(root / name))
    return NoisingConfig(**{**settings, **changes})


def warm_up(root: Path, name: str, loaded, executor) -> None:
    """A short sweep (4 shards, 1 new token): every worker starts and imports torch."""
    run_generate(sweep(root, name, num_noise_vectors=1, max_new_tokens=1), loaded=loaded,
                 executor=executor)


def gens(run: Path) -> list[bytes]:
    return [path.read_bytes() for path in RunDir(run).gens_files()]


class Clock:
    """When the first shard was handed out and the last one written (the executor's events;
    the local executor has none, so its shards are timed through the write)."""

    def __init__(self):
        self.first: float | None = None
        self.last: float | None = None

    def __call__(self, event: str, *_) -> None:
        now = time.perf_counter()
        if event == "dispatch" and self.first is None:
            self.first = now
        if event == "done":
            self.last = now


def timed(root: Path, name: str, loaded, executor) -> tuple[float, float, float, Path]:
    """``(total, before the first shard, after the last shard)`` seconds and the run."""
    clock = Clock()
    if executor.remote:
        executor.on_event = clock
    start = time.perf_counter()
    run = run_generate(sweep(root, name), loaded=loaded, executor=executor)
    end = time.perf_counter()
    first = clock.first if clock.first is not None else start
    last = clock.last if clock.last is not None else end
    return end - start, first - start, end - last, run


def measure(root: Path, name: str, loaded) -> tuple[float, float, float, Path]:
    """One timed sweep on ``name`` (local, or that many Ray workers, warmed up first)."""
    if name == "local":
        return timed(root, name, loaded, LocalExecutor())
    with make_executor(ExecutorSettings(executor="ray", workers=int(name))) as executor:
        warm_up(root, f"warm-{name}", loaded, executor)
        return timed(root, name, loaded, executor)


def main() -> None:
    import ray

    torch.set_num_threads(1)
    loaded = load_model("default", dtype="fp32", device="cpu")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    best: dict[str, tuple[float, float, float]] = {}
    reference = None
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(ROUNDS):
            for name in ("local", "1", "2"):
                root = Path(tmp) / f"round{round_}"
                total, before, after, run = measure(root, name, loaded)
                reference = reference or gens(run)
                assert gens(run) == reference, f"{name} differs from the local run"
                if name not in best or total < best[name][0]:
                    best[name] = (total, before, after)
    ray.shutdown()
    print(f"[ray] sweep: 16 shards of 4 rows, 24 new tokens, embedded model fp32, "
          f"1 thread/worker; fastest of {ROUNDS} interleaved rounds")
    labels = {"local": "local executor ", "1": "1 Ray worker   ", "2": "2 Ray workers  "}
    for name, label in labels.items():
        total, before, after = best[name]
        split = "" if name == "local" else (f"   (driver before the first shard {before:.2f} s,"
                                            f" after the last {after:.2f} s)")
        print(f"[ray] {label}: {total:7.2f} s{split}")
    print(f"[ray] 2 vs 1 worker  : {best['1'][0] / best['2'][0]:.2f}x (goal >= 1.7x)")
    print(f"[ray] 1 worker vs local: {best['local'][0] / best['1'][0]:.2f}x (goal >= 0.9x)")
    print("[ray] generations identical to the local run: yes")


if __name__ == "__main__":
    main()
