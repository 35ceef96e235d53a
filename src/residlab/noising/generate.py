"""Generate with fixed random vectors added to one layer's residual stream, sweeping norms.

Every (noise vector, scale, prompt) combination is one row; rows are packed into batches
with one vector per row (see :mod:`residlab.noising.runs`), so a sweep costs about as many
forward passes as its number of rows divided by the batch size.

    python -m residlab.noising.generate --config configs/example.yaml
"""

from __future__ import annotations

import logging
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from residlab.arch import Arch, resolve_arch
from residlab.config import NoisingConfig
from residlab.errors import UsageError
from residlab.executors import Executor, Shard
from residlab.executors.local import LocalExecutor
from residlab.generation import (
    check_context,
    effective_generation_settings,
    generate_ids,
)
from residlab.hooks import Add
from residlab.models import LoadedModel, load_model
from residlab.noising.jobs import NoisingJob
from residlab.noising.noise import (
    EstimateKey,
    find_cov_sqrt,
    load_cov_sqrt,
    model_identity,
    noise_vectors,
    read_estimate,
)
from residlab.noising.runs import RunDir, WorkRow, plan_shards
from residlab.progress import progress
from residlab.prompts import ChatPrompt, iter_conversations, prepare_prompts
from residlab.store import publish_dir, read_jsonl, staging_dir, write_jsonl, write_npy, write_yaml

__all__ = ["SweepJob", "generate_shard", "load_run_prompts", "run_generate"]

log = logging.getLogger(__name__)


def load_run_prompts(cfg: NoisingConfig, tokenizer) -> list[ChatPrompt]:
    """The config's prompts, templated and filtered; an error that says why if none are left
    (an empty source and a too-strict length filter need different fixes)."""
    seen = 0

    def counted():
        nonlocal seen
        for item in iter_conversations(
                dataset_name=cfg.dataset_name, dataset_path=cfg.dataset_path,
                dataset_split=cfg.dataset_split, shuffle=cfg.shuffle, seed=cfg.seed):
            seen += 1
            yield item

    prompts = prepare_prompts(tokenizer, counted(), num_prompts=cfg.num_prompts,
                              max_prompt_len=cfg.max_prompt_len, system_prompt=cfg.system_prompt)
    if prompts:
        return prompts
    source = cfg.dataset_path or cfg.dataset_name or "the built-in prompts"
    if seen == 0:
        raise UsageError(f"no prompts: {source} holds no conversations; point dataset_path at "
                         "a file with one {\"conversation\": [...]} per line")
    raise UsageError(
        f"no prompts left: none of the {seen} conversations in {source} has a user turn that "
        f"fits max_prompt_len={cfg.max_prompt_len} tokens; raise max_prompt_len or use "
        "shorter prompts")


def _shaping(cfg: NoisingConfig, loaded: LoadedModel, arch: Arch, cov_sqrt: str | None):
    """``(cov_sqrt matrix or None, description for config.yaml, resolved path or None)``.

    Without an explicit file only an estimate made for this model, layer and site is used.
    """
    if not cfg.shape_noise:
        return None, {"shaped": False, "reason": "shape_noise: false"}, None
    want = EstimateKey(model_identity(loaded.provenance),
                       arch.normalize_layer(cfg.layer_index), cfg.site)
    path = find_cov_sqrt(cfg.output_dir, cov_sqrt or cfg.cov_sqrt_path, want=want)
    if path is None:
        reason = f"no covariance estimate under {cfg.output_dir}"
        log.warning("%s: the noise is NOT shaped; run 'residlab noise covariance' with this "
                    "config first, or set shape_noise: false", reason)
        return None, {"shaped": False, "reason": reason}, None
    path = path.absolute()
    matrix = load_cov_sqrt(path, arch.d_model)
    return matrix, {"shaped": True, "cov_sqrt": str(path), "estimate": read_estimate(path)}, path


def _generation_options(cfg: NoisingConfig) -> dict:
    """What the config asks of generation (one place, for generating and for provenance)."""
    sampling = {"temperature": cfg.temperature, "top_p": cfg.top_p} if cfg.do_sample else {}
    return {"max_new_tokens": cfg.max_new_tokens, "do_sample": cfg.do_sample,
            "generation_defaults": cfg.generation_defaults, **sampling}


def _generation_settings(loaded: LoadedModel, cfg: NoisingConfig) -> dict:
    """The effective generation settings, written into the run's provenance."""
    return effective_generation_settings(loaded.model, loaded.tokenizer,
                                         **_generation_options(cfg))


def generate_shard(
    loaded: LoadedModel, arch: Arch, cfg: NoisingConfig, prompts: list[ChatPrompt],
    noises: np.ndarray, rows: list[WorkRow],
) -> list[dict]:
    """Generate one shard: each row gets ``scale * noise`` at the configured site."""
    scales = cfg.scales
    vectors = torch.stack([
        torch.from_numpy(noises[row.noise_id]) * scales[row.scale] for row in rows
    ]).to(torch.float32)  # (B, D)
    add = Add(cfg.layer_index, vectors, site=cfg.site, positions=cfg.positions)
    outputs = generate_ids(
        loaded.model, loaded.tokenizer, [prompts[row.prompt].token_ids for row in rows],
        interventions=[add], arch=arch, **_generation_options(cfg))
    stops = set(loaded.tokenizer.all_special_ids)
    records = []
    for row, out in zip(rows, outputs, strict=True):
        prompt = prompts[row.prompt]
        text_ids = [token for token in out.token_ids if token not in stops]
        records += [{
            "noise_id": noise_id,
            "noise_scale": scales[row.scale],
            "prompt_index": prompt.index,
            "messages": prompt.messages,
            "prompt_text": prompt.prompt_text,
            "assistant_text": loaded.tokenizer.decode(text_ids),
            "prompt_token_ids": prompt.token_ids,
            "response_token_ids": out.token_ids,
            "finish_reason": out.finish_reason,
        } for noise_id in (row.noise_id, *row.shared_with)]
    return records


class SweepJob(NoisingJob):
    """A sweep's shards: a shard's payload is ``(shard index, rows)``; every worker holds the
    prompts and the noise bank. Sampling is seeded per shard index, so a shard draws the same
    tokens whichever worker computes it."""


    def __init__(self, cfg: NoisingConfig, prompts: list[ChatPrompt], noises: np.ndarray, *,
                 loaded: LoadedModel | None = None, arch: Arch | None = None):
        self.cfg, self.prompts, self.noises = cfg, prompts, noises
        self.loaded, self.arch = loaded, arch

    def compute(self, payload: tuple[int, list[WorkRow]]) -> list[dict]:
        index, rows = payload
        if self.cfg.do_sample:
            torch.manual_seed(self.cfg.seed * 1_000_003 + index)
        return generate_shard(self.loaded, self.arch, self.cfg, self.prompts, self.noises, rows)


def _start(cfg: NoisingConfig, loaded: LoadedModel, arch: Arch, cov_sqrt: str | None):
    """Check everything, then create the run directory (so bad input writes nothing)."""
    prompts = load_run_prompts(cfg, loaded.tokenizer)
    check_context(loaded.model, max(len(p.token_ids) for p in prompts), cfg.max_new_tokens)
    matrix, shaping, path = _shaping(cfg, loaded, arch, cov_sqrt)
    noises = noise_vectors(cfg.seed, cfg.num_noise_vectors, arch.d_model, matrix)  # (V, D)
    staging = RunDir(staging_dir(cfg.output_dir))
    try:
        write_jsonl(staging.prompts_file, [prompt.to_json() for prompt in prompts])
        for noise_id, vector in enumerate(noises):
            write_npy(staging.noise_file(noise_id), vector)
        # The resolved file, so this config used again shapes with it after newer estimates.
        resolved = {"cov_sqrt_path": str(path)} if path is not None else {}
        provenance = {**loaded.provenance, "seed": cfg.seed,
                      "generation": _generation_settings(loaded, cfg)}
        write_yaml(staging.config_file, {**cfg.run_record(), **resolved,
                                         "noise_shaping": shaping, "provenance": provenance})
        # The run directory appears whole (config.yaml included) or not at all.
        run = RunDir(publish_dir(staging.path, cfg.output_dir))
    except BaseException:  # a full disk: leave nothing behind (a kill: the next start cleans)
        shutil.rmtree(staging.path, ignore_errors=True)
        raise
    log.info("noise shaping: %s", shaping.get("cov_sqrt") or shaping["reason"])
    return run, prompts, noises


def _assemble(run: RunDir, n_shards: int, cfg: NoisingConfig) -> None:
    """Write one gens file per noise vector from the shard files, then drop the shards."""
    by_noise: dict[int, list[dict]] = defaultdict(list)
    for shard in range(n_shards):
        for record in read_jsonl(run.shard_file(shard)):
            by_noise[record["noise_id"]].append(record)
    order = {scale: i for i, scale in enumerate(cfg.scales)}
    for noise_id in range(cfg.num_noise_vectors):
        records = sorted(by_noise[noise_id],
                         key=lambda r: (order[r["noise_scale"]], r["prompt_index"]))
        write_jsonl(run.gens_file(noise_id), records)
    shutil.rmtree(run.path / "shards", ignore_errors=True)


def run_generate(
    cfg: NoisingConfig | None = None, *, resume: str | Path | None = None,
    cov_sqrt: str | None = None, loaded: LoadedModel | None = None,
    executor: Executor | None = None,
) -> Path:
    """Run (or resume) a noising sweep; returns the run directory.

    ``executor`` computes the missing shards (default: this process); whoever computes them,
    this process writes each one as it arrives, so a run resumes on any executor."""
    run = RunDir(Path(resume)).check() if resume else None
    if run is not None:
        cfg = run.read_config()[0]
        if cov_sqrt:
            log.warning("--cov-sqrt %s is ignored when resuming: the run keeps the noise bank "
                        "saved in %s", cov_sqrt, run.path / "noises")
    assert cfg is not None, "pass a config or a run to resume"
    loaded = loaded or load_model(cfg.model_name, dtype=cfg.dtype, device=cfg.device,
                                  trust_remote_code=cfg.trust_remote_code)
    arch = resolve_arch(loaded.model, cfg.layers_path)
    arch.normalize_layer(cfg.layer_index)
    if run is None:
        run, prompts, noises = _start(cfg, loaded, arch, cov_sqrt)
    else:
        prompts, noises = run.read_prompts(), run.read_noises(cfg.num_noise_vectors)
    shards = plan_shards(prompts, cfg.num_noise_vectors, cfg.scales, cfg.batch_size,
                         share_zero=not cfg.do_sample)
    todo = [i for i in range(len(shards)) if not run.shard_file(i).is_file()]
    if run.gens_files() and not (run.path / "shards").exists():
        return run.path  # finished earlier
    total = sum(len(rows) for rows in shards)
    done = total - sum(len(shards[i]) for i in todo)
    work = [Shard(i, (i, shards[i]), len(shards[i])) for i in todo]

    def write(shard: Shard, records: list[dict]) -> None:
        write_jsonl(run.shard_file(shard.key), records)

    job = SweepJob(cfg, prompts, noises, loaded=loaded, arch=arch)
    with progress(total=total, desc="noising", unit="generations", initial=done) as bar:
        (executor or LocalExecutor()).run(job, work, write, bar=bar)
    _assemble(run, len(shards), cfg)
    return run.path


if __name__ == "__main__":
    from residlab.cli import run_module

    raise SystemExit(run_module("noise", "generate"))
