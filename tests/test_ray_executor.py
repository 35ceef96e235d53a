"""The long jobs on Ray (2 CPU workers, tiny models) give the local run's files, byte for byte;
a worker killed mid-job loses and duplicates nothing; a Ray run resumes locally; bad input is
one line. One Ray session serves the whole module and is shut down at its end."""

from __future__ import annotations

import json
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
from residlab.executors import ExecutorSettings, Shard, ShardJob, make_executor
from residlab.executors.local import LocalExecutor
from residlab.executors.ray_executor import ShardLost, _Worker
from residlab.experiments import load_experiment, load_variant
from residlab.inference import responses
from residlab.inference.capture import capture_prompt_set
from residlab.inference.extract_viz import extract_viz
from residlab.inference.jobs import VariantSource
from residlab.inference.responses import generate_responses
from residlab.noising import generate as noising_generate
from residlab.noising.covariance import fit_covariance
from residlab.noising.eval import run_eval
from residlab.noising.generate import load_run_prompts, run_generate
from residlab.traits import steer
from residlab.traits.steer import SteerRow

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


@pytest.fixture
def tiny_experiment(tmp_path, monkeypatch, tiny_llama_dir):
    """An experiment whose variant ``base`` is the tiny Llama in fp32 on CPU."""
    monkeypatch.setenv("RESIDLAB_EXPERIMENTS_DIR", str(tmp_path / "experiments"))
    variant = {"model": str(tiny_llama_dir), "dtype": "fp32", "device": "cpu"}
    (tmp_path / "experiments" / "exp").mkdir(parents=True)
    (tmp_path / "experiments" / "exp" / "config.yaml").write_text(
        yaml.safe_dump({"model_variants": {"base": variant}}))
    return load_experiment("exp")


def test_capture_on_two_workers_equals_local(executor, tiny_experiment):
    experiment = tiny_experiment
    generate_responses(experiment, "baseline", max_new_tokens=4, batch_size=5)
    local = capture_prompt_set(experiment, "baseline", dtype="fp32", batch_size=2)
    ours = {p.name: p.read_bytes() for p in local.written}
    shutil.rmtree(local.out_dir)
    remote = capture_prompt_set(experiment, "baseline", dtype="fp32", batch_size=2,
                                executor=executor)
    assert [p.name for p in remote.written] == list(ours) and len(ours) == 5
    assert {p.name: p.read_bytes() for p in remote.written} == ours


def _outputs(folder: Path) -> dict[str, object]:
    """Each file's bytes; a safetensors file as its tensors' bytes and its metadata (whose
    order in the header follows a hash map's, so it varies from one write to the next)."""
    from safetensors import safe_open

    out: dict[str, object] = {}
    for name, data in _files(folder).items():
        if name.endswith(".safetensors"):
            with safe_open(str(folder / name), framework="pt") as handle:
                data = (handle.metadata(), {key: handle.get_tensor(key).numpy().tobytes()
                                            for key in handle.keys()})  # noqa: SIM118
        out[name] = data
    return out


def _responses(folder: Path) -> dict[str, dict]:
    """Each response JSON parsed, less its date."""
    out = {}
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text("utf-8"))
        assert record.pop("capture_date")
        out[path.name] = record
    return out


def test_responses_and_extract_viz_on_two_workers_equal_local(executor, tiny_experiment):
    experiment, base = tiny_experiment, load_variant(tiny_experiment, "base")
    args = dict(max_new_tokens=5, batch_size=2, loaded=base)
    local = generate_responses(experiment, "baseline", output_suffix="a", **args)
    remote = generate_responses(experiment, "baseline", output_suffix="b", executor=executor,
                                **args)
    assert [p.name for p in remote] == [p.name for p in local] and len(local) == 5
    ours = _responses(local[0].parent)
    assert _responses(remote[0].parent) == ours
    assert any(r["token_ids"][r["prompt_end"]:] for r in ours.values())  # it generated
    viz = dict(attention=True, logit_lens=True, top_k=3, json_attention=True, loaded=base)
    mine = extract_viz(experiment, "baseline_a", **viz)
    expected = _outputs(mine.out_dir)
    shutil.rmtree(mine.out_dir)
    theirs = extract_viz(experiment, "baseline_a", executor=executor, **viz)
    assert [p.name for p in theirs.written] == [p.name for p in mine.written]
    assert _outputs(theirs.out_dir) == expected and len(expected) == 3 * 5


def test_steering_answers_on_two_workers_equal_local(executor, tiny_experiment):
    base = load_variant(tiny_experiment, "base")
    d = base.model.config.hidden_size
    units = {layer: torch.nn.functional.normalize(torch.randn(d, generator=torch.Generator()
                                                              .manual_seed(layer)), dim=0)
             for layer in (0, 1)}
    questions = ["How are you?", "What is rain?", "Name a color."]
    rows = [SteerRow(q, layer, coef) for layer, coef in ((None, 0.0), (0, 40.0), (1, -40.0))
            for q in questions]
    args = dict(max_new_tokens=6, batch_size=4, positions="all")
    local = steer._answer(base, rows, units, **args)
    remote = steer._answer(base, rows, units, executor=executor,
                           source=VariantSource(tiny_experiment, "base"), **args)
    assert remote == local and len(local) == 9
    assert local[6:] != local[:3]  # steering changes answers: the vectors reached the workers


def test_killed_worker_mid_responses_loses_and_duplicates_nothing(executor, tiny_experiment,
                                                                  monkeypatch):
    experiment, base = tiny_experiment, load_variant(tiny_experiment, "base")
    args = dict(max_new_tokens=5, batch_size=2, loaded=base)
    local = generate_responses(experiment, "baseline", output_suffix="a", **args)
    writes: list[str] = []
    real_write = responses.write_json

    def counted(path, record, **kwargs):
        writes.append(Path(path).name)
        real_write(path, record, **kwargs)

    def kill_at_first_dispatch_of_shard_1(event, shard, worker):
        if event == "dispatch" and shard.key == 1 and not executor.deaths:
            ray.kill(executor.worker(worker))

    monkeypatch.setattr(responses, "write_json", counted)
    executor.on_event = kill_at_first_dispatch_of_shard_1
    remote = generate_responses(experiment, "baseline", output_suffix="b", executor=executor,
                                **args)
    assert executor.deaths == 1
    assert sorted(writes) == sorted(set(writes)) == sorted(p.name for p in local)
    assert _responses(remote[0].parent) == _responses(local[0].parent)


def test_extract_viz_interrupted_on_ray_resumes_locally(executor, tiny_experiment):
    experiment, base = tiny_experiment, load_variant(tiny_experiment, "base")
    generate_responses(experiment, "baseline", max_new_tokens=5, batch_size=5, loaded=base)
    viz = dict(attention=True, logit_lens=True, top_k=3, loaded=base)
    whole = extract_viz(experiment, "baseline", **viz)
    expected = _outputs(whole.out_dir)
    shutil.rmtree(whole.out_dir)
    done = []

    def stop_after_two_attention_files(event, shard, worker):
        if event == "done" and isinstance(shard.payload[0], int):
            done.append(shard.key)
            if len(done) == 2:
                raise KeyboardInterrupt

    executor.on_event = stop_after_two_attention_files
    with pytest.raises(KeyboardInterrupt):
        extract_viz(experiment, "baseline", executor=executor, **viz)
    assert len(list(whole.out_dir.glob("*_attention.safetensors"))) == 2
    resumed = extract_viz(experiment, "baseline", skip_existing=True, **viz)
    assert resumed.skipped == 5 + 2 and len(resumed.written) == 3
    assert _outputs(whole.out_dir) == expected and len(expected) == 2 * 5


class _Counted(ShardJob):
    """A job whose model is the number of its load, named by ``key``."""

    loads: list[str] = []

    def __init__(self, key: str | None):
        self.key = key

    def model_key(self) -> str | None:
        return self.key

    def load(self) -> int:
        self.loads.append(self.key)
        return len(self.loads)

    def compute(self, payload: int) -> int:
        return self.loaded


def test_a_worker_keeps_its_model_for_a_job_that_loads_the_same(ray_session):
    worker = _Worker(1)
    assert worker.compute([ray.put(_Counted("a"))], 0) == 1
    assert worker.compute([ray.put(_Counted("a"))], 0) == 1  # not loaded again
    assert worker.compute([ray.put(_Counted("b"))], 0) == 2
    worker.compute([ray.put(_Counted(None))], 0)  # no key: always loaded
    worker.compute([ray.put(_Counted(None))], 0)
    assert _Counted.loads == ["a", "b", None, None]


def test_a_worker_gets_its_next_shard_before_the_last_one_is_written(executor):
    events: list[tuple[str, int]] = []
    executor.on_event = lambda event, shard, worker: events.append((event, shard.key))
    shards = [Shard(key, key) for key in range(4)]
    this_module = sys.modules[__name__]
    ray.cloudpickle.register_pickle_by_value(this_module)  # workers cannot import tests
    try:
        executor.run(_Counted(None), shards,
                     lambda shard, _: events.append(("write", shard.key)))
    finally:
        ray.cloudpickle.unregister_pickle_by_value(this_module)
    assert events[:2] == [("dispatch", 0), ("dispatch", 1)]
    assert events[2] == ("dispatch", 2) and events[3][0] == "write"  # writing is off the path
    assert sorted(key for event, key in events if event == "write") == [0, 1, 2, 3]


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


def test_inference_and_steer_commands_take_the_executor_flags(tiny_experiment, tmp_path,
                                                               capsys):
    texts = tmp_path / "texts.json"
    texts.write_text("{}")
    cases = [(["responses", "--prompt-set", "baseline", "--from-responses", str(texts),
               "--executor", "ray"], "--from-responses only tokenizes texts"),
             (["responses", "--prompt-set", "baseline", "--workers", "0"], "workers"),
             (["extract-viz", "--prompt-set", "baseline", "--logit-lens", "--executor", "ray",
               "--ray-address", "127.0.0.1:9"], "cannot reach"),
             (["steer", "--trait", "t", "--layers", "1", "--coefficients", "4",
               "--cpus-per-worker", "0"], "--cpus-per-worker")]
    for command, match in cases:
        assert main([command[0], "--experiment", "exp", *command[1:]]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err, err
    assert not (tiny_experiment.path / "inference").exists()  # nothing written


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
