"""The layout of a noising run directory and how a run is planned into shards.

```
<output_dir>/<timestamp>/
  config.yaml                      resolved config + provenance (usable again as --config);
                                   cov_sqrt_path is the file the noise was shaped with
  prompts.jsonl                    the templated prompts of this run, in order
  noises/noise_XXXX.npy            unit vectors (covariance-shaped when shaping is on)
  shards/shard_XXXXX.jsonl         finished work units while the run is in progress
  generations/gens_noise_XXXX.jsonl  every generation, per noise vector (written at the end)
```

Work is a list of rows ``(prompt, noise vector, scale)``; a shard is ``batch_size``
consecutive rows, so all scales and vectors of a prompt share a batch and need no padding
between them. Under greedy decoding a zero-norm row is the same generation for every vector,
so it is computed once and recorded for all of them. Shards are independent: any worker can
compute any shard, and a run resumes by computing the shards whose files are missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from residlab.config import RUN_EXTRAS, NoisingConfig, load_config
from residlab.errors import UsageError
from residlab.prompts import ChatPrompt
from residlab.store import read_jsonl

__all__ = ["RunDir", "WorkRow", "plan_shards"]


@dataclass(frozen=True)
class WorkRow:
    """One generation to make: indices into the run's prompts, noise bank and scales."""

    prompt: int
    noise_id: int
    scale: int
    shared_with: tuple[int, ...] = ()  # other noise ids whose generation this row also is


def plan_shards(
    prompts: list[ChatPrompt], n_vectors: int, scales: list[float], batch_size: int,
    *, share_zero: bool,
) -> list[list[WorkRow]]:
    """All rows, grouped by prompt (longest prompts first), cut into ``batch_size`` shards.

    With ``share_zero`` (greedy decoding), each prompt's zero-norm rows collapse into one.
    """
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i].token_ids), i))
    rows = []
    for p in order:
        for s, scale in enumerate(scales):
            if share_zero and scale == 0:
                rows.append(WorkRow(p, 0, s, tuple(range(1, n_vectors))))
            else:
                rows += [WorkRow(p, v, s) for v in range(n_vectors)]
    return [rows[start:start + batch_size] for start in range(0, len(rows), batch_size)]


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def prompts_file(self) -> Path:
        return self.path / "prompts.jsonl"

    def noise_file(self, noise_id: int) -> Path:
        return self.path / "noises" / f"noise_{noise_id:04d}.npy"

    def shard_file(self, shard: int) -> Path:
        return self.path / "shards" / f"shard_{shard:05d}.jsonl"

    def gens_file(self, noise_id: int) -> Path:
        return self.path / "generations" / f"gens_noise_{noise_id:04d}.jsonl"

    def gens_files(self) -> list[Path]:
        return sorted((self.path / "generations").glob("gens_noise_*.jsonl"))

    def check(self) -> RunDir:
        """Raise unless this looks like a noising run directory."""
        if not self.path.is_dir():
            raise UsageError(f"run directory {str(self.path)!r} does not exist")
        if self.prompts_file.is_file() and not self.config_file.is_file():
            raise UsageError(
                f"{str(self.path)!r} is a run that was stopped before it wrote config.yaml, "
                "so it cannot be resumed; delete the folder and start the run again")
        if not self.config_file.is_file() or not self.prompts_file.is_file():
            raise UsageError(
                f"{str(self.path)!r} is not a noising run directory (no config.yaml / "
                "prompts.jsonl); give a directory made by 'residlab noise generate'"
            )
        return self

    def read_config(self) -> tuple[NoisingConfig, dict[str, Any]]:
        """The run's resolved config and the rest of config.yaml (provenance, shaping)."""
        data = yaml.safe_load(self.config_file.read_text())
        extras = {key: data[key] for key in RUN_EXTRAS if key in data}
        return load_config(self.config_file), extras

    def read_prompts(self) -> list[ChatPrompt]:
        return [ChatPrompt.from_json(record) for record in read_jsonl(self.prompts_file)]

    def read_noises(self, count: int) -> np.ndarray:
        """``(count, d_model)`` float64 noise bank saved with the run."""
        missing = [i for i in range(count) if not self.noise_file(i).is_file()]
        if missing:
            raise UsageError(f"{self.path}: noise files missing for ids {missing[:5]}; "
                             "this run cannot be resumed, start a new one")
        return np.stack([np.load(self.noise_file(i), allow_pickle=False) for i in range(count)])

