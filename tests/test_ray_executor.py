"""The long jobs on Ray (2 CPU workers, tiny models) give the local run's files, byte for byte;
a worker killed mid-job loses and duplicates nothing; a Ray run resumes locally; bad input is
one line. One Ray session serves the whole module and is shut down at its end."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from residlab.cli import main
from residlab.config import NoisingConfig
from residlab.errors import UsageError
from residlab.executors import ExecutorSettings, make_executor
from residlab.executors.local import LocalExecutor
from residlab.executors.ray_executor import ShardLost
from residlab.experiments import load_experiment
from residlab.inference.capture import capture_prompt_set
from residlab.inference.responses import generate_responses
from residlab.noising import generate as noising_generate
from residlab.noising.covariance import fit_covariance
from residlab.noising.eval import run_eval
from residlab.noising.generate import load_run_prompts, run_generate

ray = pytest.importorskip("ray")
TWO = ExecutorSettings(executor="ray", workers=2)  # 1 CPU each, so 1 torch thread each


@pytest.fixture(autouse=True)
def one_thread():
    """The local references run with a worker's one torch thread: fp32 reductions (the
    scorer's log-softmax) may round differently with another thread count, on any executor."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, object_store_memory=100 * 2**20, include_dashboard=False,
             log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def workers(ray_session):
    """Two workers kept for the whole module (starting one costs seconds on 2 cores)."""
    with make_executor(TWO) as executor:
        yield executor


@pytest.fixture
def executor(workers):
    workers.on_event, workers.deaths = None, 0
    yield workers
    workers.on_event = None


def _config(tmp_path, model_dir, name: str, **changes) -> NoisingConfig:
    base = dict(model_name=str(model_dir), dtype="fp32", device="cpu", num_prompts=4,
                max_prompt_len=64, batch_size=2, max_new_tokens=5, layer_index=1,
                noise_norms=[0.0, 4.0], num_noise_vectors=2, seed=5,
                output_dir=str(tmp_path / name))
    return NoisingConfig(**{**base, **changes})


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_same_run(remote: Path, local: Path) -> None:
    """Every file byte for byte; config.yaml too, once the output folder's name is swapped
    (and it holds no executor key: a run resumes on any executor)."""
    theirs, ours = _files(remote), _files(local)
    assert sorted(theirs) == sorted(ours) and len(ours) > 5
    assert not (remote / "shards").exists()
    theirs["config.yaml"] = theirs["config.yaml"].replace(b"/ray", b"/local")
    for name in ours:  # config.yaml, prompts, noises, gens
        assert theirs[name] == ours[name], name
    assert "executor" not in yaml.safe_load(ours["config.yaml"])


def test_sweep_and_eval_on_two_workers_equal_local(executor, tmp_path, tiny_llama,
                                                   tiny_llama_dir):
    local = run_generate(_config(tmp_path, tiny_llama_dir, "local"), loaded=tiny_llama)
    remote = run_generate(_config(tmp_path, tiny_llama_dir, "ray"), loaded=tiny_llama,
                          executor=executor)
    local_eval, _ = run_eval(_config(tmp_path, tiny_llama_dir, "local"), local,
                             loaded=tiny_llama)
    remote_eval, _ = run_eval(_config(tmp_path, tiny_llama_dir, "ray"), remote,
                              loaded=tiny_llama, executor=executor)
    _assert_same_run(remote, local)
    assert remote_eval.read_bytes() == local_eval.read_bytes()
    assert len(remote_eval.read_text().splitlines()) == 2 * 2 * 4


def test_covariance_batches_on_two_workers_merge_to_the_local_bits(executor, tmp_path,
                                                                   tiny_llama, tiny_llama_dir):
    cfg = _config(tmp_path, tiny_llama_dir, "cov", num_prompts=6, cov_batches=3)
    prompts = load_run_prompts(cfg, tiny_llama.tokenizer)
    local = fit_covariance(tiny_llama, cfg, prompts)
    remote = fit_covariance(tiny_llama, cfg, prompts, executor=executor)
    assert remote.count == local.count > 6
    assert np.array_equal(remote.cov, local.cov) and np.array_equal(remote.mean, local.mean)
    # Oracle for the local side: numpy over the same activations is what test_noising_run
    # checks; here the merge order must not change a single bit.


def test_killed_worker_loses_and_duplicates_nothing(executor, tmp_path, tiny_llama,
                                                    tiny_llama_dir, monkeypatch):
    cfg = dict(do_sample=True, temperature=0.9)  # a rerun shard must draw the same tokens
    local = run_generate(_config(tmp_path, tiny_llama_dir, "local", **cfg), loaded=tiny_llama)
    writes: list[str] = []
    real_write = noising_generate.write_jsonl

    def counted(path, records):
        writes.append(Path(path).name)
        real_write(path, records)

    def kill_at_first_dispatch_of_shard_1(event, shard, worker):
        if event == "dispatch" and shard.key == 1 and not executor.deaths:
            ray.kill(executor.worker(worker))

    monkeypatch.setattr(noising_generate, "write_jsonl", counted)
    executor.on_event = kill_at_first_dispatch_of_shard_1
    remote = run_generate(_config(tmp_path, tiny_llama_dir, "ray", **cfg), loaded=tiny_llama,
                          executor=executor)
    assert executor.deaths == 1
    shard_writes = [name for name in writes if name.startswith("shard_")]
    assert sorted(shard_writes) == sorted(set(shard_writes)) and len(shard_writes) == 8
    _assert_same_run(remote, local)


def test_a_shard_lost_more_than_max_retries_stops_the_job(executor, tmp_path, tiny_llama,
                                                          tiny_llama_dir):
    def kill_every_dispatch_of_shard_1(event, shard, worker):
        if event == "dispatch" and shard.key == 1:
            ray.kill(executor.worker(worker))

    executor.on_event = kill_every_dispatch_of_shard_1
    with pytest.raises(ShardLost, match="shard 1 was lost with its worker 3 time"):
        run_generate(_config(tmp_path, tiny_llama_dir, "ray"), loaded=tiny_llama,
                     executor=executor)
    assert executor.deaths == 3  # max_retries 2: the first try and two retries


def test_interrupted_on_ray_resumes_locally_to_the_same_files(executor, tmp_path, tiny_llama,
                                                              tiny_llama_dir):
    local = run_generate(_config(tmp_path, tiny_llama_dir, "local"), loaded=tiny_llama)
    done = []

    def stop_after_two(event, shard, worker):
        if event == "done":
            done.append(shard.key)
            if len(done) == 2:
                raise KeyboardInterrupt

    executor.on_event = stop_after_two
    with pytest.raises(KeyboardInterrupt):
        run_generate(_config(tmp_path, tiny_llama_dir, "ray"), loaded=tiny_llama,
                     executor=executor)
    (run_dir,) = (tmp_path / "ray").iterdir()
    assert len(list((run_dir / "shards").glob("shard_*.jsonl"))) == 2
    assert not executor._actors  # the workers were stopped with the run
    run_generate(resume=run_dir, loaded=tiny_llama, executor=LocalExecutor())
    _assert_same_run(run_dir, local)


def test_capture_on_two_workers_equals_local(executor, tmp_path, monkeypatch, tiny_llama_dir):
    monkeypatch.setenv("RESIDLAB_EXPERIMENTS_DIR", str(tmp_path / "experiments"))
    variant = {"model": str(tiny_llama_dir), "dtype": "fp32", "device": "cpu"}
    (tmp_path / "experiments" / "exp").mkdir(parents=True)
    (tmp_path / "experiments" / "exp" / "config.yaml").write_text(
        yaml.safe_dump({"model_variants": {"base": variant}}))
    experiment = load_experiment("exp")
    generate_responses(experiment, "baseline", max_new_tokens=4, batch_size=5)
    local = capture_prompt_set(experiment, "baseline", dtype="fp32", batch_size=2)
    ours = {p.name: p.read_bytes() for p in local.written}
    shutil.rmtree(local.out_dir)
    remote = capture_prompt_set(experiment, "baseline", dtype="fp32", batch_size=2,
                                executor=executor)
    assert [p.name for p in remote.written] == list(ours) and len(ours) == 5
    assert {p.name: p.read_bytes() for p in remote.written} == ours


# --- bad input: one line, exit 2, before any work -------------------------------------------

def test_ray_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(UsageError, match=r"pip install 'residlab\[ray\]'"):
        make_executor(ExecutorSettings(executor="ray"))


def test_unreachable_address_fails_fast(monkeypatch):
    with pytest.raises(UsageError, match="cannot reach the Ray cluster at '127.0.0.1:9'"):
        make_executor(ExecutorSettings(executor="ray", ray_address="127.0.0.1:9"))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
    with pytest.raises(UsageError, match="cannot reach"):
        make_executor(ExecutorSettings(executor="ray"))


def test_more_gpus_or_workers_than_the_cluster_has(ray_session):
    with pytest.raises(UsageError, match="the Ray cluster has 0 GPU"):
        make_executor(ExecutorSettings(executor="ray", gpus_per_worker=1))
    with pytest.raises(UsageError, match="use --workers 2 or less"):
        make_executor(ExecutorSettings(executor="ray", workers=3))


def test_cli_bad_executor_inputs_are_one_line(tmp_path, tiny_llama_dir, capsys, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(
        {"model_name": str(tiny_llama_dir), "noise_norm": 1.0, "output_dir": str(tmp_path)}))
    cases = [(["--workers", "0"], "workers"),
             (["--executor", "rya"], "executor"),
             (["--executor", "ray", "--ray-address", "127.0.0.1:9"], "cannot reach")]
    for extra, match in cases:
        assert main(["noise", "generate", "--config", str(config), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err, err
    monkeypatch.setitem(sys.modules, "ray", None)
    assert main(["noise", "covariance", "--config", str(config), "--executor", "ray"]) == 2
    assert "pip install 'residlab[ray]'" in capsys.readouterr().err
    assert not list(tmp_path.glob("*/"))  # nothing written


def test_resume_takes_executor_flags_but_no_other_key(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    assert main(["noise", "generate", "--resume", str(run), "--workers", "0"]) == 2
    assert "workers" in capsys.readouterr().err
    assert main(["noise", "generate", "--resume", str(run), "--seed", "3"]) == 2
    assert "keeps its own config; drop seed" in capsys.readouterr().err
    # Executor flags are accepted with --resume (the run folder is then checked).
    assert main(["noise", "generate", "--resume", str(run), "--executor", "local"]) == 2
    assert "not a noising run directory" in capsys.readouterr().err


def test_local_runs_never_import_ray():
    import subprocess

    code = ("import sys, residlab.commands.noise, residlab.commands.inference, "
            "residlab.noising.generate, residlab.noising.eval, residlab.noising.covariance, "
            "residlab.inference.capture; from residlab.executors import make_executor; "
            "make_executor().close(); print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
