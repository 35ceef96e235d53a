"""The noising sweep and its eval on Ray (2 CPU workers) with the embedded SmolLM2-135M: the
same files as the local executor, a worker killed mid-run loses nothing, a Ray run resumes
locally (slow; one Ray session for the module, shut down at its end)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from residlab.config import NoisingConfig
from residlab.executors import ExecutorSettings, make_executor
from residlab.executors.local import LocalExecutor
from residlab.noising.eval import run_eval
from residlab.noising.generate import run_generate

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def executor():
    ray.init(num_cpus=2, object_store_memory=100 * 2**20, include_dashboard=False,
             log_to_driver=False)
    with make_executor(ExecutorSettings(executor="ray", workers=2)) as workers:
        yield workers
    ray.shutdown()


@pytest.fixture(autouse=True)
def one_thread():
    """Local references with a worker's single torch thread (fp32 reductions round by it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(tmp_path: Path, name: str) -> NoisingConfig:
    return NoisingConfig(model_name="default", dtype="fp32", device="cpu", num_prompts=3,
                         max_prompt_len=64, batch_size=3, max_new_tokens=8, layer_index=10,
                         noise_norms=[0.0, 8.0], num_noise_vectors=3, seed=2,
                         shape_noise=False, output_dir=str(tmp_path / name))


def _files(folder: Path) -> dict[str, bytes]:
    files = {str(p.relative_to(folder)): p.read_bytes()
             for p in sorted(folder.rglob("*")) if p.is_file()}
    files["config.yaml"] = files["config.yaml"].replace(b"/ray", b"/local")
    return files


def test_embedded_sweep_kill_resume_and_eval_equal_local(executor, tmp_path, embedded):
    local = run_generate(_config(tmp_path, "local"), loaded=embedded)
    local_eval, _ = run_eval(_config(tmp_path, "local"), local, loaded=embedded)
    events = []

    def kill_once_then_stop(event, shard, worker):
        events.append(event)
        if event == "dispatch" and events.count("dispatch") == 3:
            ray.kill(executor.worker(worker))  # a worker dies holding a shard
        if events.count("done") == 3:
            raise KeyboardInterrupt  # the driver stops with shards still to do

    executor.on_event = kill_once_then_stop
    with pytest.raises(KeyboardInterrupt):
        run_generate(_config(tmp_path, "ray"), loaded=embedded, executor=executor)
    executor.on_event = None
    assert executor.deaths == 1
    (remote,) = (tmp_path / "ray").iterdir()
    run_generate(resume=remote, loaded=embedded, executor=LocalExecutor())
    sweep = {k: v for k, v in _files(local).items() if k != "eval_logprobs.jsonl"}
    assert _files(remote) == sweep and len(sweep) > 5
    assert "executor" not in yaml.safe_load((remote / "config.yaml").read_text())
    remote_eval, _ = run_eval(_config(tmp_path, "ray"), remote, loaded=embedded,
                              executor=executor)
    assert remote_eval.read_bytes() == local_eval.read_bytes()
