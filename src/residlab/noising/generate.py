"""Generate with fixed random vectors added to one layer's residual stream, sweeping norms.

Every (noise vector, scale, prompt) combination is one row; rows are packed into batches
with one vector per row (see :mod:`residlab.noising.runs`), so a sweep costs about as many
forward passes as its number of rows divided by the batch size.

    python -m residlab.noising.generate --config configs/example.yaml
"""

from __future__ import annotations

import logging
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from residlab.arch import Arch, resolve_arch
from residlab.config import NoisingConfig
from residlab.errors import UsageError
from residlab.generation import generate_ids
from residlab.hooks import Add
from residlab.models import LoadedModel, load_model
from residlab.noising.noise import find_cov_sqrt, load_cov_sqrt, noise_vectors
from residlab.noising.runs import RunDir, WorkRow, plan_shards
from residlab.prompts import ChatPrompt, iter_conversations, prepare_prompts
from residlab.store import new_timestamped_dir, read_jsonl, write_jsonl, write_npy, write_yaml

__all__ = ["generate_shard", "load_run_prompts", "main", "run_generate"]

log = logging.getLogger(__name__)


def load_run_prompts(cfg: NoisingConfig, tokenizer) -> list[ChatPrompt]:
    """The config's prompts, templated and filtered; an error if none are left."""
    conversations = iter_conversations(
        dataset_name=cfg.dataset_name, dataset_path=cfg.dataset_path,
        dataset_split=cfg.dataset_split, shuffle=cfg.shuffle, seed=cfg.seed)
    prompts = prepare_prompts(tokenizer, conversations, num_prompts=cfg.num_prompts,
                              max_prompt_len=cfg.max_prompt_len, system_prompt=cfg.system_prompt)
    if not prompts:
        raise UsageError(
            f"no prompts left after filtering to max_prompt_len={cfg.max_prompt_len} tokens; "
            "raise max_prompt_len or use a dataset with shorter user turns")
    return prompts


def _shaping(cfg: NoisingConfig, d_model: int, cov_sqrt: str | None):
    """``(cov_sqrt matrix or None, description for config.yaml)``."""
    if not cfg.shape_noise:
        return None, {"shaped": False, "reason": "shape_noise: false"}
    path = find_cov_sqrt(cfg.output_dir, cov_sqrt or cfg.cov_sqrt_path)
    if path is None:
        return None, {"shaped": False, "reason": f"no cov_sqrt.npy under {cfg.output_dir}"}
    return load_cov_sqrt(path, d_model), {"shaped": True, "cov_sqrt": str(path)}


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
        max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample,
        temperature=cfg.temperature, top_p=cfg.top_p, interventions=[add], arch=arch)
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


def _start(cfg: NoisingConfig, loaded: LoadedModel, arch: Arch, cov_sqrt: str | None):
    """Check everything, then create the run directory (so bad input writes nothing)."""
    prompts = load_run_prompts(cfg, loaded.tokenizer)
    matrix, shaping = _shaping(cfg, arch.d_model, cov_sqrt)
    noises = noise_vectors(cfg.seed, cfg.num_noise_vectors, arch.d_model, matrix)  # (V, D)
    run = RunDir(new_timestamped_dir(cfg.output_dir))
    write_jsonl(run.prompts_file, [prompt.to_json() for prompt in prompts])
    for noise_id, vector in enumerate(noises):
        write_npy(run.noise_file(noise_id), vector)
    # config.yaml last: its presence marks a run that can be resumed.
    write_yaml(run.config_file, {**cfg.model_dump(), "noise_shaping": shaping,
                                 "provenance": {**loaded.provenance, "seed": cfg.seed}})
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
) -> Path:
    """Run (or resume) a noising sweep; returns the run directory."""
    run = RunDir(Path(resume)).check() if resume else None
    if run is not None:
        cfg = run.read_config()[0]
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
        todo = []  # finished earlier
    else:
        for shard in tqdm(todo, desc="noising shards", unit="shard", disable=None):
            if cfg.do_sample:
                torch.manual_seed(cfg.seed * 1_000_003 + shard)
            write_jsonl(run.shard_file(shard),
                        generate_shard(loaded, arch, cfg, prompts, noises, shards[shard]))
        _assemble(run, len(shards), cfg)
    return run.path


def main(argv: list[str] | None = None) -> int:
    from residlab.cli import main as cli_main

    return cli_main(["noise", "generate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
