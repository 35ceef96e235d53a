"""Ray executor speed on the embedded model, measured side by side in one run.

The same noising sweep (16 shards) three ways, one torch thread per worker:
1. 2 Ray workers vs 1 Ray worker: goal >= 1.7x (this machine has 2 cores).
2. 1 Ray worker vs the local executor (also one thread): goal >= 0.9x (Ray's overhead:
   scheduling, pickling shards and results through the object store, the worker's own model
   load, which the local run does not pay because the driver's model is reused).
Every run's generations are checked to be the local run's, byte for byte.

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


def sweep(root: Path, name: str) -> NoisingConfig:
    # 4 prompts x (1 shared zero row + 3 norms x 5 vectors) = 64 rows = 16 shards of 4
    return NoisingConfig(model_name="default", dtype="fp32", device="cpu", num_prompts=4,
                         max_prompt_len=64, batch_size=4, max_new_tokens=24, layer_index=10,
                         noise_norms=[0.0, 4.0, 8.0, 16.0], num_noise_vectors=5, seed=0,
                         shape_noise=False, output_dir=str(root / name))


def gens(run: Path) -> list[bytes]:
    return [path.read_bytes() for path in RunDir(run).gens_files()]


def timed(root: Path, name: str, loaded, executor) -> tuple[float, Path]:
    start = time.perf_counter()
    run = run_generate(sweep(root, name), loaded=loaded, executor=executor)
    return time.perf_counter() - start, run


def main() -> None:
    import ray

    torch.set_num_threads(1)
    loaded = load_model("default", dtype="fp32", device="cpu")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        local_s, local_run = timed(root, "local", loaded, LocalExecutor())
        seconds = {}
        for workers in (1, 2):
            with make_executor(ExecutorSettings(executor="ray", workers=workers)) as executor:
                timed(root, f"warm{workers}", loaded, executor)  # start workers, import torch
                seconds[workers], run = timed(root, f"ray{workers}", loaded, executor)
            assert gens(run) == gens(local_run), f"{workers} Ray worker(s) differ from local"
    ray.shutdown()
    print("[ray] sweep: 16 shards of 4 rows, 24 new tokens, embedded model fp32, 1 thread/worker")
    print(f"[ray] local executor : {local_s:7.2f} s")
    print(f"[ray] 1 Ray worker   : {seconds[1]:7.2f} s   (workers warm, model load included)")
    print(f"[ray] 2 Ray workers  : {seconds[2]:7.2f} s")
    print(f"[ray] 2 vs 1 worker  : {seconds[1] / seconds[2]:.2f}x (goal >= 1.7x)")
    print(f"[ray] 1 worker vs local: {local_s / seconds[1]:.2f}x (goal >= 0.9x)")
    print("[ray] generations identical to the local run: yes")


if __name__ == "__main__":
    main()
