"""The whole model-diff workflow in one call, with one copy of the weights when it can.

When variant B is variant A plus a LoRA adapter (same model, dtype and device in the
experiment config), the base weights are loaded once and wrapped by peft once: A runs with the
adapter disabled (``disable_adapter()``), B with it enabled. Both read the same response JSONs
(B's), so their tokens are identical by construction. Unrelated variants are loaded one each.

:func:`run_diff` then does, skipping what exists: B's responses (if missing), the captures of
A and B on B's tokens, the projections of both on the same trait vectors, the aggregate
comparison, the per-token diff and the log-prob diff. The log-prob diff reads the final hidden
states of the captures' own forwards (both bodies run once per prompt in the whole run); only
prompts whose captures were kept from before are scored with forwards of their own.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from residlab.analysis.model_diff import diff_dir
from residlab.errors import UsageError
from residlab.experiments import Experiment, Variant, load_experiment, load_variant, with_lora
from residlab.models import LoadedModel
from residlab.store import write_json

if TYPE_CHECKING:
    from residlab.analysis.model_diff.logprobs import LogprobDiff

__all__ = ["DiffRun", "VariantPair", "adapter_side", "load_pair", "run_diff"]

log = logging.getLogger(__name__)
Which = Literal["a", "b"]
FUSED_HIDDEN_BYTES = 1 << 30  # response hidden states kept across the two captures, at most


def adapter_side(a: Variant, b: Variant) -> Which | None:
    """Which variant is the other plus a LoRA adapter (``None``: they share no weights).

    Everything that decides the base weights and how they run must match: model, dtype,
    device and ``trust_remote_code``; exactly one of the two has an adapter."""
    same_base = (a.model, a.dtype, a.device, a.trust_remote_code) == (
        b.model, b.dtype, b.device, b.trust_remote_code)
    if not same_base or bool(a.lora) == bool(b.lora):
        return None
    return "b" if b.lora else "a"


@dataclasses.dataclass
class VariantPair:
    """Variants A and B of an experiment, loaded on first use.

    With shared weights (:func:`adapter_side`) one PEFT model serves both: :meth:`switch`
    turns the adapter off for the plain side and on for the adapter side, and yields a view
    of the model whose provenance is that variant's (the plain side records no adapter).
    Otherwise each variant is loaded on its own and :meth:`switch` picks one."""

    experiment: Experiment
    names: tuple[str, str]
    adapter: Which | None  # the side that carries the LoRA adapter when weights are shared
    _views: dict[str, LoadedModel] = dataclasses.field(default_factory=dict)

    @property
    def same_weights(self) -> bool:
        return self.adapter is not None

    @property
    def loaded(self) -> LoadedModel:
        """The shared PEFT model (adapter side's view); with unrelated variants, B's model."""
        return self.view(self.adapter or "b")

    def load(self) -> None:
        """Load both sides now (one model, or one each)."""
        self.view("a")
        self.view("b")

    def name(self, which: Which) -> str:
        return self.names[0] if which == "a" else self.names[1]

    @contextmanager
    def switch(self, which: Which) -> Iterator[LoadedModel]:
        """Run ``which`` inside the block: the view to hand to capture, scoring, generation."""
        view = self.view(which)
        if self.same_weights and which != self.adapter:
            with view.model.disable_adapter():  # plain base weights, bit for bit
                yield view
        else:
            yield view

    def view(self, which: Which) -> LoadedModel:
        """``which``'s model, loaded on first use; run it inside :meth:`switch` only."""
        if which not in self._views:
            if self.same_weights:
                self._views.update(self._load_shared())
            else:
                self._views[which] = load_variant(self.experiment, self.name(which))
        return self._views[which]

    def _load_shared(self) -> dict[str, LoadedModel]:
        """One base model wrapped by peft once; the plain side gets a view of it that carries
        its own provenance (no adapter) and name."""
        from residlab.models import load_model

        plain: Which = "a" if self.adapter == "b" else "b"
        _, spec = self.experiment.variant(self.name(self.adapter))
        base = load_model(spec.model, dtype=spec.dtype, device=spec.device,
                          trust_remote_code=spec.trust_remote_code)
        plain_provenance = {**base.provenance, "variant": self.name(plain)}
        plain_name = base.name
        tuned = with_lora(base, spec.lora)
        tuned.provenance["variant"] = self.name(self.adapter)
        log.info("model diff: one copy of %s for both variants (%s without the adapter, %s "
                 "with it)", plain_name, self.name(plain), self.name(self.adapter))
        view = dataclasses.replace(tuned, provenance=plain_provenance, name=plain_name)
        return {self.adapter: tuned, plain: view}


def load_pair(experiment: Experiment, variant_a: str, variant_b: str) -> VariantPair:
    """The pair of variants to diff; nothing is loaded until a side is first switched to."""
    name_a, spec_a = experiment.variant(variant_a)
    name_b, spec_b = experiment.variant(variant_b)
    if name_a == name_b:
        raise UsageError(f"--variant-a and --variant-b are both {name_a!r}; name two "
                         "different variants of the experiment")
    return VariantPair(experiment, (name_a, name_b), adapter_side(spec_a, spec_b))


# --- the workflow ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DiffRun:
    """What one :func:`run_diff` did."""

    out_dir: Path  # model_diff/{A}_vs_{B}
    same_weights: bool  # one PEFT model served both variants
    written: dict[str, int]  # files written per stage (0 everywhere on a rerun)
    results: Path  # compare's results.json (diff vectors only when there are no trait vectors)
    per_token: list[Path]  # per-token diff files written by this run (aggregate.json included)
    logprobs: list[Path]  # log-prob diff files written by this run
    seconds: dict[str, float]  # wall time per stage

    def __str__(self) -> str:
        stages = ", ".join(f"{name} {self.written.get(name, 0)} in {sec:.1f} s"
                           for name, sec in self.seconds.items())
        weights = "one shared model" if self.same_weights else "two models"
        return f"model diff in {self.out_dir} ({weights}): {stages}"


class _Stages:
    """Times each stage, logs it, and keeps what it wrote."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.written: dict[str, int] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[dict[str, int]]:
        count = {"written": 0}
        start = time.perf_counter()
        log.info("diff run: %s ...", name)
        yield count
        self.seconds[name] = time.perf_counter() - start
        self.written[name] = count["written"]
        log.info("diff run: %s done in %.1f s (%d file(s) written)", name, self.seconds[name],
                 count["written"])


def _missing_responses(experiment: Experiment, variant: str, prompt_set: str) -> int:
    """How many prompts of the set have no response JSON of ``variant`` yet."""
    from residlab.inference.prompt_sets import load_prompt_set

    folder = experiment.responses_dir(variant, prompt_set)
    have = {path.stem for path in folder.glob("*.json")} if folder.is_dir() else set()
    return sum(item.id not in have for item in load_prompt_set(prompt_set))


def _capture_request(experiment: Experiment, variant: str, prompt_set: str, component: str,
                     layers: str | None) -> dict[str, Any]:
    """What to ask capture for: ``component`` at ``layers``, or, when the folder already holds
    that component (with others, other layers, another dtype), exactly what it holds, so
    ``skip_existing`` keeps those files rather than capturing them again."""
    asked: dict[str, Any] = {"components": [component], "layers": layers}
    path = experiment.raw_dir(variant, prompt_set) / "_provenance.json"
    try:
        held = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return asked
    if (component not in (held.get("components") or []) or not held.get("layers")
            or not isinstance(held.get("dtype"), str)):
        return asked
    if layers is not None and layers != ",".join(map(str, held["layers"])):
        return asked
    return {"components": held["components"], "layers": ",".join(map(str, held["layers"])),
            "dtype": held["dtype"], "response_only": bool(held.get("response_only"))}


class _Plan(NamedTuple):
    """What one run asks for, settled before any work."""

    prompt_set: str
    component: str
    requests: dict[str, dict[str, Any]]  # variant side ("a" / "b") -> capture arguments
    extraction: str  # whose trait vectors
    groups: dict[tuple[str, str, int], list[str]]  # (method, position, layer) -> traits

    def settings(self, layer: int | None) -> dict[str, Any]:
        """What decides the analysis outputs (the rerun check compares these)."""
        groups = [[*key, traits] for key, traits in sorted(self.groups.items())]
        return json.loads(json.dumps({"component": self.component, "extraction": self.extraction,
                                      "vectors": groups, "layer": layer}))


def _vector_groups(experiment: Experiment, traits: Sequence[str], extraction: str, *,
                   layer: int | None, method: str | None, position: str | None,
                   component: str, captured: list[int], n_layers: int,
                   steer_variant: str) -> dict[tuple[str, str, int], list[str]]:
    """One vector per trait, chosen once for both variants (so both are projected on the
    same vector), grouped by ``(method, position, layer asked)``: one projection call each."""
    from residlab.traits.select import select_vectors

    groups: dict[tuple[str, str, int], list[str]] = {}
    for trait in traits:
        choice = select_vectors(experiment, trait, variant=extraction,
                                layer="best" if layer is None else layer, method=method,
                                position=position, component=component,
                                available_layers=captured, steer_variant=steer_variant,
                                n_layers=n_layers)[0]
        vector = choice.vector
        log.info("diff run: %s: %s layer %d (%s)", trait, vector.method, vector.layer,
                 choice.reason)
        asked = vector.layer if layer is None else choice.requested_layer
        groups.setdefault((vector.method, vector.position, asked), []).append(trait)
    return groups


def _plan(pair: VariantPair, prompt_set: str, *, traits: Sequence[str] | None,
          method: str | None, position: str | None, layer: int | None, component: str,
          layers: str | None) -> _Plan:
    """Capture requests and trait vectors, checked before anything is written."""
    from residlab.arch import resolve_arch
    from residlab.inference.capture import parse_layers
    from residlab.inference.project import traits_with_vectors

    experiment = pair.experiment
    n_layers = resolve_arch(pair.loaded.model).n_layers
    requests = {side: _capture_request(experiment, pair.name(side), prompt_set, component,
                                       layers) for side in ("a", "b")}
    captured = sorted(set.intersection(*(set(parse_layers(r["layers"], n_layers))
                                         for r in requests.values())))
    extraction, _ = experiment.variant(None, role="extraction")
    traits = list(traits) if traits else traits_with_vectors(experiment, extraction)
    if not traits:
        log.warning("diff run: no trait vectors for variant %s: only captures and the log-prob "
                    "diff are made (extract vectors for the comparison)", extraction)
    groups = _vector_groups(experiment, traits, extraction, layer=layer, method=method,
                            position=position, component=component, captured=captured,
                            n_layers=n_layers, steer_variant=pair.names[0])
    return _Plan(prompt_set, component, requests, extraction, groups)


def _responses(pair: VariantPair, prompt_set: str, max_new_tokens: int) -> int:
    """B's responses, generated only when some prompt of the set has none (existing files of
    the same settings are kept)."""
    from residlab.inference.responses import generate_responses

    name_b = pair.name("b")
    missing = _missing_responses(pair.experiment, name_b, prompt_set)
    if not missing:
        return 0
    log.info("diff run: %d prompt(s) have no response of %s yet", missing, name_b)
    with pair.switch("b") as loaded:
        return len(generate_responses(pair.experiment, prompt_set, variant=name_b,
                                      max_new_tokens=max_new_tokens, skip_existing=True,
                                      loaded=loaded))


def _captures(pair: VariantPair, plan: _Plan, scores: LogprobDiff | None) -> int:
    """A and B on B's tokens, one after the other on the same batches (same records, same
    order); files that already hold what is asked are kept. ``scores`` collects each side's
    final hidden states from these forwards for the log-prob diff."""
    from residlab.inference.capture import capture_prompt_set

    written = 0
    for side in ("a", "b"):
        with pair.switch(side) as loaded:
            result = capture_prompt_set(
                pair.experiment, plan.prompt_set, variant=pair.name(side),
                responses_from=pair.name("b"), loaded=loaded, skip_existing=True,
                final_hidden=scores.collector(side) if scores is not None else None,
                **plan.requests[side])
        written += len(result.written)
    return written


def _projections(pair: VariantPair, plan: _Plan) -> int:
    """Both variants on the same vectors, one call per vector group and variant."""
    from residlab.inference.project import project_prompt_set

    written = 0
    for (method, position, layer), traits in plan.groups.items():
        for name in pair.names:
            written += len(project_prompt_set(
                pair.experiment, plan.prompt_set, variant=name, traits=traits, layer=str(layer),
                method=method, component=plan.component, position=position,
                extraction_variant=plan.extraction, skip_existing=True, calibration=False))
    return written


def _stamp_path(pair: VariantPair, prompt_set: str) -> Path:
    """``model_diff/{A}_vs_{B}/{prompt_set}/_run_diff.json``: what the last run analysed."""
    return diff_dir(pair.experiment, *pair.names) / prompt_set / "_run_diff.json"


def _standing(stamp: Path, settings: dict[str, Any], root: Path) -> dict[str, list[Path]] | None:
    """The last run's analysis outputs when they still stand: same settings, and every file
    still there and not changed since (the caller also checks that no input was rewritten)."""
    try:
        recorded = json.loads(stamp.read_text("utf-8"))
        outputs = {key: [root / p for p in paths] for key, paths in recorded["outputs"].items()}
        made = stamp.stat().st_mtime
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if recorded.get("settings") != settings:
        return None
    files = [path for paths in outputs.values() for path in paths]
    if not all(path.is_file() and path.stat().st_mtime <= made for path in files):
        return None
    return outputs


def _analyses(pair: VariantPair, plan: _Plan, stages: _Stages, *, layer: int | None,
              method: str | None, position: str | None, inputs_changed: bool,
              ) -> tuple[Path, list[Path]]:
    """compare and per-token diff, unless the last run made them from the same inputs."""
    traits = sorted(t for group in plan.groups.values() for t in group)
    stamp = _stamp_path(pair, plan.prompt_set)
    settings = {**plan.settings(layer), "method": method, "position": position}
    kept = None if inputs_changed else _standing(stamp, settings, pair.experiment.path)
    if kept is not None:
        log.info("diff run: compare and per-token diff are up to date (%s)", stamp)
        return kept["compare"][0], []
    from residlab.analysis.model_diff.compare import compare_variants
    from residlab.analysis.model_diff.per_token import per_token_diff

    with stages.stage("compare") as count:
        results = compare_variants(pair.experiment, *pair.names, plan.prompt_set,
                                   traits=traits or None,
                                   component=plan.component, method=method, position=position,
                                   vector_variant=plan.extraction)
        count["written"] = 1
    with stages.stage("per-token") as count:
        per_token = [path for (_, _, asked), group in plan.groups.items() for trait in group
                     for path in per_token_diff(pair.experiment, *pair.names, plan.prompt_set,
                                                trait=trait, layer=asked)]
        count["written"] = len(per_token)
    root = pair.experiment.path
    write_json(stamp, {"settings": settings, "outputs": {
        "compare": [str(results.relative_to(root))],
        "per_token": [str(p.relative_to(root)) for p in per_token]}})
    return results, per_token


def _logprob_diff(pair: VariantPair, prompt_set: str) -> LogprobDiff:
    """The log-prob diff through the pair's switch: one model when the weights are shared."""
    from residlab.analysis.model_diff.logprobs import LogprobDiff

    if pair.adapter == "b":  # one object for both sides: one float32 head
        sides = {"loaded_b": pair.loaded}
    else:
        sides = {"loaded_a": pair.view("a"), "loaded_b": pair.view("b")}
    switch = pair.switch if pair.same_weights else None
    return LogprobDiff(pair.experiment, *pair.names, prompt_set, skip_existing=True,
                       switch=switch, **sides)


def _fusable(scores: LogprobDiff) -> bool:
    """Whether both sides' response hidden states fit the budget for keeping them until
    both captures are done (they live on the CPU, in the model's dtype)."""
    import torch

    loaded = scores.pair[1]
    width = loaded.model.get_input_embeddings().weight.shape[1]
    size = torch.finfo(loaded.dtype).bits // 8 if loaded.dtype.is_floating_point else 4
    tokens = sum(len(r["token_ids"]) - r["prompt_end"] for r in scores.todo)
    return 2 * tokens * width * size <= FUSED_HIDDEN_BYTES


def run_diff(
    experiment: Experiment | str, variant_a: str, variant_b: str, prompt_set: str, *,
    traits: Sequence[str] | None = None, method: str | None = None,
    position: str | None = None, layer: int | None = None, component: str = "residual",
    layers: str | None = None, max_new_tokens: int = 50,
) -> DiffRun:
    """The whole model-diff workflow, skipping what exists; see the module docstring.

    ``method``/``position`` pick the vectors (default: the best one per trait); ``layer`` is
    the per-token diff's layer (default: the chosen vector's). ``component`` is what is
    captured and compared; ``layers`` which layers are captured (default: all, or what the
    capture folders already hold). ``max_new_tokens`` applies when B's responses are made."""
    if isinstance(experiment, str):
        experiment = load_experiment(experiment)
    pair = load_pair(experiment, variant_a, variant_b)
    stages = _Stages()
    with stages.stage("load"):
        pair.load()
    plan = _plan(pair, prompt_set, traits=traits, method=method, position=position,
                 layer=layer, component=component, layers=layers)
    with stages.stage("responses") as count:
        count["written"] = _responses(pair, prompt_set, max_new_tokens)
    scores = _logprob_diff(pair, prompt_set)
    fused = scores if scores.todo and _fusable(scores) else None
    with stages.stage("capture") as count:
        count["written"] = _captures(pair, plan, fused)
    with stages.stage("project") as count:
        count["written"] = _projections(pair, plan)
    changed = any(stages.written.values())
    results, per_token = _analyses(pair, plan, stages, layer=layer, method=method,
                                   position=position, inputs_changed=changed)
    with stages.stage("logprobs") as count:
        scores.finish_collected()  # what the captures' forwards already computed
        logprobs = scores.run()  # the rest (prompts whose captures were kept)
        count["written"] = len(logprobs)
    run = DiffRun(diff_dir(experiment, *pair.names), pair.same_weights, stages.written, results,
                  per_token, logprobs, stages.seconds)
    log.info("%s", run)
    return run
