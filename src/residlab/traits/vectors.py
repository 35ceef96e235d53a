"""Stored trait vectors.

```
experiments/{exp}/extraction/{trait}/{variant}/
  completions.json                                  the generated continuations, both sides
  activations/{position}/{component}.safetensors    pooled activations (positive / negative)
  vectors/{position}/{component}/{method}/layer{L}.safetensors   tensor "vector" (d,) + stats
  vectors/{position}/{component}/{method}/metadata.json          stats of every layer
```
``{position}`` is the position spec made folder-safe (``response[:5]`` -> ``response__5``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from residlab.errors import UsageError
from residlab.experiments import Experiment
from residlab.store import atomic_path
from residlab.traits.positions import position_slug

__all__ = ["StoredVector", "TraitVector", "extraction_dir", "find_vectors", "load_vector",
           "save_vector"]


@dataclass(frozen=True)
class TraitVector:
    trait: str
    variant: str
    position: str
    component: str
    method: str
    layer: int
    vector: torch.Tensor  # (d,) float32
    stats: dict[str, Any]

    @property
    def unit(self) -> torch.Tensor:
        return self.vector / self.vector.norm().clamp(min=1e-12)

    def source(self) -> dict[str, Any]:
        return {"trait": self.trait, "variant": self.variant, "layer": self.layer,
                "method": self.method, "position": self.position, "component": self.component}


def extraction_dir(experiment: Experiment, trait: str, variant: str) -> Path:
    return experiment.path / "extraction" / trait / variant


def _method_dir(experiment: Experiment, trait: str, variant: str, position: str,
                component: str, method: str) -> Path:
    return (extraction_dir(experiment, trait, variant) / "vectors" / position_slug(position)
            / component / method)


def save_vector(experiment: Experiment, vector: TraitVector) -> Path:
    from safetensors.torch import save_file

    folder = _method_dir(experiment, vector.trait, vector.variant, vector.position,
                         vector.component, vector.method)
    path = folder / f"layer{vector.layer}.safetensors"
    meta = {"residlab": json.dumps({**vector.source(), **vector.stats})}
    with atomic_path(path) as temp:
        save_file({"vector": vector.vector.float().contiguous()}, str(temp), metadata=meta)
    return path


class StoredVector(NamedTuple):
    """A stored vector's identity and held-out stats, read from its header only."""

    position: str
    method: str
    layer: int
    path: Path
    effect_size: float


def find_vectors(experiment: Experiment, trait: str, variant: str, *, position: str | None,
                 component: str, method: str | None) -> list[StoredVector]:
    """Stored vectors matching the filters (headers only: no tensor is read)."""
    root = extraction_dir(experiment, trait, variant) / "vectors"
    found = []
    for path in sorted(root.glob(f"*/{component}/*/layer*.safetensors")):
        slug, method_name = path.parents[2].name, path.parent.name
        if position is not None and slug != position_slug(position):
            continue
        if method is not None and method_name != method:
            continue
        meta = json.loads(json.loads(_header(path))["__metadata__"]["residlab"])
        found.append(StoredVector(meta["position"], method_name, int(meta["layer"]), path,
                                  float(meta.get("effect_size", float("-inf")))))
    return found


def _header(path: Path) -> bytes:
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        return handle.read(length)


def load_vector(path: Path, d_model: int | None = None) -> TraitVector:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["residlab"])
        vector = handle.get_tensor("vector").float()
    if d_model is not None and vector.shape != (d_model,):
        raise UsageError(f"vector {path} has size {tuple(vector.shape)} but the model's hidden "
                         f"size is {d_model}; extract it with this model")
    keys = ("trait", "variant", "position", "component", "method", "layer")
    return TraitVector(*(meta[k] for k in keys), vector,
                       {k: v for k, v in meta.items() if k not in keys})
