"""The inference stages' shard jobs: responses (Mode A), the logit lens and attention patterns.

A shard is one batch of a local run (the same prompts in the same batch, so fp32 results are
the same bits on any executor); its result goes back to the driver, which writes the files
with the local run's own code (see :mod:`residlab.executors`). A worker loads the variant the
driver loaded, once, from :class:`VariantSource`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from residlab.arch import resolve_arch
from residlab.executors import ShardJob
from residlab.experiments import Experiment, load_variant
from residlab.generation import Generated, effective_generation_settings, generate_ids
from residlab.hooks import Intervention
from residlab.inference.attention import eager_attention, patterns_of_prompt
from residlab.inference.lens import Lens, LensReadout, lens_batch

__all__ = ["AttentionJob", "LensJob", "LocalModel", "ResponsesJob", "VariantJob",
           "VariantSource", "owned"]


@dataclass(frozen=True)
class VariantSource:
    """Where a worker gets its model: the experiment's variant, loaded as the driver's was."""

    experiment: Experiment
    variant: str
    load_in_8bit: bool = False
    load_in_4bit: bool = False

    def load(self):
        return load_variant(self.experiment, self.variant, load_in_8bit=self.load_in_8bit,
                            load_in_4bit=self.load_in_4bit)


class VariantJob(ShardJob):
    """A job whose workers load one experiment variant; ``loaded`` is the driver's model (used
    by the local executor, never sent to a worker)."""

    def __init__(self, source: VariantSource | None, *, loaded=None):
        self.source, self.loaded = source, loaded

    def model_key(self) -> Any:
        s = self.source
        return None if s is None else (str(s.experiment.path), s.experiment.variant(s.variant),
                                       s.load_in_8bit, s.load_in_4bit)

    def load(self):
        if self.source is None:
            raise RuntimeError("this job has no VariantSource: it runs on the local executor only")
        return self.source.load()


def owned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` without the rest of its storage: a pickled view would carry all of it."""
    return tensor.clone() if tensor.untyped_storage().nbytes() > tensor.nbytes else tensor


# --- responses (Mode A) ------------------------------------------------------------------------

class LocalModel:
    """A loaded model behind the calls Mode A makes; a model server's
    :class:`residlab.client.RemoteModel` offers the same ones."""

    def __init__(self, loaded):
        self.loaded, self.tokenizer, self.provenance = loaded, loaded.tokenizer, loaded.provenance

    def generation_settings(self, **gen: Any) -> dict[str, Any]:
        return effective_generation_settings(self.loaded.model, self.tokenizer, **gen)

    def generate_ids(self, prompts: list[list[int]], *,
                     interventions: Sequence[Intervention] = (), **gen: Any) -> list[Generated]:
        return generate_ids(self.loaded.model, self.tokenizer, prompts,
                            interventions=interventions, **gen)


class ResponsesJob(VariantJob):
    """Mode A on workers: a shard's payload is one batch of prompt ids (template + prefill),
    its result the batch's :class:`Generated` rows. ``model`` is the driver's
    :class:`LocalModel` or ``RemoteModel`` (a model server: local executor only)."""

    local_only = ("loaded", "model")

    def __init__(self, source: VariantSource | None, gen: dict[str, Any],
                 interventions: Sequence[Intervention] = (), *, model=None):
        super().__init__(source, loaded=getattr(model, "loaded", None))
        self.model, self.gen, self.interventions = model, gen, list(interventions)

    def setup(self) -> None:
        if self.model is None:
            super().setup()
            self.model = LocalModel(self.loaded)

    def compute(self, payload: list[list[int]]) -> list[Generated]:
        return self.model.generate_ids(payload, interventions=self.interventions, **self.gen)


# --- extract-viz -------------------------------------------------------------------------------

class _ArchJob(VariantJob):
    local_only = ("loaded", "arch")
    arch: Any = None

    def setup(self) -> None:
        super().setup()
        self.arch = self.arch or resolve_arch(self.loaded.model)


class LensJob(_ArchJob):
    """The logit lens on workers: a shard's payload is one lens batch of token id lists, its
    result one :class:`LensReadout` per row."""

    local_only = ("loaded", "arch", "lens")
    lens: Lens | None = None

    def __init__(self, source: VariantSource | None, layers: list[int], *, top_k: int,
                 pad: int, loaded=None):
        super().__init__(source, loaded=loaded)
        self.layers, self.top_k, self.pad = layers, top_k, pad

    def setup(self) -> None:
        super().setup()
        self.lens = self.lens or Lens(self.loaded.model, self.arch)

    def compute(self, payload: list[list[int]]) -> list[LensReadout]:
        return lens_batch(self.loaded.model, self.lens, payload, self.layers, top_k=self.top_k,
                          pad_id=self.pad)

    def pack(self, result: list[LensReadout]) -> list[LensReadout]:
        return [replace(r, top_ids=owned(r.top_ids), top_probs=owned(r.top_probs),
                        actual_ids=owned(r.actual_ids), actual_rank=owned(r.actual_rank),
                        actual_prob=owned(r.actual_prob)) for r in result]


class AttentionJob(_ArchJob):
    """Attention patterns on workers: a shard is one prompt's token ids, its result the
    ``(L, H, T, T)`` weights."""

    def __init__(self, source: VariantSource | None, layers: list[int], *, loaded=None):
        super().__init__(source, loaded=loaded)
        self.layers = layers

    def compute(self, payload: list[int]) -> torch.Tensor:
        with eager_attention(self.loaded.model):
            return patterns_of_prompt(self.loaded.model, self.arch, payload,
                                      self.layers)  # (L, H, T, T)

    def pack(self, result: torch.Tensor) -> torch.Tensor:
        """float16, the precision every attention file stores: half the bytes in the object
        store, and the same bits the driver's own conversion gives."""
        return result.to(torch.float16)  # (L, H, T, T)
