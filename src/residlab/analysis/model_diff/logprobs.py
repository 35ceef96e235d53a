"""The behavioural diff: how much each response token's probability moved between two variants.

Variant B's response JSONs (``token_ids``, ``prompt_end``) are scored under both models, A and
B, on exactly those ids. Per response token it writes the log-prob under each, their
difference ``delta = logprob_b - logprob_a`` and ``kl = KL(P_b || P_a)`` of the two next-token
distributions that predicted the token. ``delta`` says how much more (or less) B would say
this very token; ``kl`` says how much B's whole prediction at that point moved, even where the
sampled token kept its probability. Per prompt, under
``experiments/{exp}/model_diff/{A}_vs_{B}/logprobs/{prompt_set}/{id}.json``:

``prompt_id, prompt_text, response_text, tokens, token_ids, logprob_a, logprob_b, delta, kl,
mean_delta, mean_kl, settings`` over the response tokens only (the positions of the per-token
projection deltas), so the clause and span tools read ``delta`` as they read projections.

Cost: prompts are batched (left-padded, position ids counting real tokens), each model's body
runs once per batch, and the LM heads run in float32 on the scored positions only, in chunks:
at most ``chunk x vocab`` logits per model are held, never ``(T, V)`` for a whole response.

One shared model: when B is A plus a LoRA adapter, pass the one PEFT model as ``loaded_b``
(``loaded_a`` may be the same object or left out) and ``switch=adapter_switch(model)``;
``switch("a")`` and ``switch("b")`` are context managers putting the model into A's state
(adapter disabled) or B's (adapter enabled). Any factory with that contract works.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal

import torch

from residlab.analysis.model_diff import diff_dir
from residlab.arch import resolve_arch
from residlab.errors import NotFound, UsageError
from residlab.experiments import Experiment, load_variant
from residlab.generation import padded_inputs
from residlab.inference.extract_viz import TokenText
from residlab.inference.raw import token_hash
from residlab.inference.responses import read_response
from residlab.progress import progress
from residlab.scoring import SOFTMAX_ROWS, float32_head
from residlab.store import write_json

__all__ = ["LogprobDiff", "Switch", "adapter_switch", "diff_logprobs", "logprobs_dir"]

log = logging.getLogger(__name__)
BATCH_TOKENS = 2048  # padded tokens per forward (batch x longest prompt)
HEAD_ROWS = 256  # scored positions per float32 LM-head matmul

Which = Literal["a", "b"]
Switch = Callable[[Which], AbstractContextManager]


def logprobs_dir(experiment: Experiment, variant_a: str, variant_b: str, prompt_set: str) -> Path:
    """``model_diff/{A}_vs_{B}/logprobs/{prompt_set}``."""
    return diff_dir(experiment, variant_a, variant_b) / "logprobs" / prompt_set


def adapter_switch(model) -> Switch:
    """A switch for one PEFT model: ``"a"`` runs with the adapter disabled (the base model),
    ``"b"`` with it enabled, so both variants share one copy of the weights."""
    if not callable(getattr(model, "disable_adapter", None)):
        raise UsageError("a shared-model diff needs a PEFT model (B = A + LoRA adapter); "
                         "load the two variants separately instead")

    @contextmanager
    def switch(which: Which) -> Iterator[None]:
        if which == "a":
            with model.disable_adapter():
                yield
        else:
            yield

    return switch


def _no_switch(which: Which) -> AbstractContextManager:
    return nullcontext()


# --- inputs ----------------------------------------------------------------------------------

def _records(experiment: Experiment, variant_b: str, prompt_set: str) -> list[dict]:
    """B's response JSONs, read and checked before any model is loaded."""
    source = experiment.responses_dir(variant_b, prompt_set)
    paths = sorted(source.glob("*.json"))
    if not paths:
        raise NotFound(f"no response JSONs in {source}; run 'residlab responses --experiment "
                       f"{experiment.name} --prompt-set {prompt_set} --model-variant "
                       f"{variant_b}' first")
    return [read_response(path) | {"id": path.stem, "path": path} for path in paths]


def _check_vocab(records: list[dict], loaded, variant: str) -> int:
    """The model's vocabulary size; refuses response ids beyond it (another tokenizer)."""
    vocab = loaded.model.get_input_embeddings().weight.shape[0]
    for record in records:
        ids = record["token_ids"]
        if max(ids) >= vocab or min(ids) < 0:
            raise UsageError(f"{record['path']}: token ids outside variant {variant!r}'s "
                             f"vocabulary of {vocab}; both variants must share B's tokenizer")
    return vocab


def _model_identity(loaded, *, adapter: bool) -> dict[str, str]:
    """What made one side's numbers: the model's name (its adapter only when enabled)."""
    name, lora = loaded.name, loaded.provenance.get("lora")
    if lora and not adapter:
        name = name.removesuffix(f"+lora:{lora}")
    return {"model": name, "dtype": str(loaded.dtype).removeprefix("torch.")}


def _batches(records: list[dict], batch_tokens: int) -> list[list[dict]]:
    """Records sorted by length, grouped so a batch holds at most ``batch_tokens`` padded."""
    batches: list[list[dict]] = []
    for record in sorted(records, key=lambda r: len(r["token_ids"])):
        width = len(record["token_ids"])
        if batches and (len(batches[-1]) + 1) * width <= batch_tokens:
            batches[-1].append(record)
        else:
            batches.append([record])
    return batches


# --- scoring ---------------------------------------------------------------------------------

def _predictors(batch: list[dict], width: int) -> tuple[list[int], list[int], list[int]]:
    """``(row, position, target)`` of every response token: hidden position ``p`` (in the
    left-padded batch) predicts token ``p + 1``."""
    rows, positions, targets = [], [], []
    for b, record in enumerate(batch):
        ids, end = record["token_ids"], record["prompt_end"]
        offset = width - len(ids)  # left pads
        rows += [b] * (len(ids) - end)
        positions += range(offset + end - 1, offset + len(ids) - 1)
        targets += ids[end:]
    return rows, positions, targets


def _hidden(loaded, arch, inputs: dict[str, torch.Tensor],
            picked: tuple[Sequence[int], Sequence[int]]) -> torch.Tensor:
    """``(N, D)`` final-normed hidden states at the picked ``(row, position)`` pairs."""
    device = loaded.device
    inputs = {key: value.to(device) for key, value in inputs.items()}
    hidden = arch.body(**inputs, use_cache=False).last_hidden_state  # (B, T, D)
    index = [torch.tensor(i, dtype=torch.long, device=device) for i in picked]
    return hidden[index[0], index[1]]  # (N, D)


def _compare(heads, hidden_a: torch.Tensor, hidden_b: torch.Tensor, targets: torch.Tensor,
             switch: Switch) -> torch.Tensor:
    """``(3, N)`` float32: log p_a(target), log p_b(target), KL(P_b || P_a) per position.

    Each head runs on ``HEAD_ROWS`` positions at a time; the log-softmaxes and the KL sum run
    on ``SOFTMAX_ROWS`` of those, so at most a few ``(rows, V)`` float32 blocks exist at once.
    """
    out = torch.empty(3, targets.shape[0], dtype=torch.float32, device=targets.device)
    for start in range(0, targets.shape[0], HEAD_ROWS):
        with switch("a"):
            logits_a = heads[0](hidden_a[start:start + HEAD_ROWS])  # (c, V) float32
        with switch("b"):
            logits_b = heads[1](hidden_b[start:start + HEAD_ROWS]).to(logits_a.device)
        if logits_a.shape != logits_b.shape:
            raise UsageError(f"the variants predict over {logits_a.shape[-1]} and "
                             f"{logits_b.shape[-1]} tokens; a log-prob diff needs one vocabulary")
        for row in range(0, logits_a.shape[0], SOFTMAX_ROWS):
            first = start + row
            log_a = torch.log_softmax(logits_a[row:row + SOFTMAX_ROWS], dim=-1)  # (s, V)
            log_b = torch.log_softmax(logits_b[row:row + SOFTMAX_ROWS], dim=-1)  # (s, V)
            span = slice(first, first + log_a.shape[0])
            wanted = targets[span, None]  # (s, 1)
            out[0, span] = log_a.gather(1, wanted)[:, 0]
            out[1, span] = log_b.gather(1, wanted)[:, 0]
            out[2, span] = (log_b.exp() * (log_b - log_a)).sum(dim=-1)  # (s,)
    return out


def _score_batch(pair, arch, heads, batch: list[dict], switch: Switch) -> list[torch.Tensor]:
    """Per record, ``(3, n_response)`` float32 on CPU: log-prob under A, under B, KL."""
    # Pads are masked out and their position ids clamped, so any valid id (0) serves.
    inputs = padded_inputs([r["token_ids"] for r in batch], pad_id=0, device="cpu")
    rows, positions, targets = _predictors(batch, inputs["input_ids"].shape[1])
    hidden = []
    with torch.inference_mode():
        for loaded, which, model_arch in zip(pair, ("a", "b"), arch, strict=True):
            with switch(which):
                hidden.append(_hidden(loaded, model_arch, inputs, (rows, positions)))
        target = torch.tensor(targets, dtype=torch.long, device=hidden[0].device)  # (N,)
        values = _compare(heads, hidden[0], hidden[1], target, switch)  # (3, N)
    counts = [len(r["token_ids"]) - r["prompt_end"] for r in batch]
    return list(values.cpu().split(counts, dim=1))


# --- output ----------------------------------------------------------------------------------

def _document(record: dict, values: torch.Tensor, text: TokenText,
              settings: dict[str, Any]) -> dict[str, Any]:
    """The per-prompt JSON over response tokens (means are ``None`` for an empty response)."""
    ids = record["token_ids"][record["prompt_end"]:]
    logprob_a, logprob_b, kl = values.tolist()
    delta = (values[1] - values[0]).tolist()
    return {"prompt_id": record["id"], "prompt_text": record.get("prompt"),
            "response_text": record.get("response"), "tokens": text.many(ids),
            "token_ids": ids, "logprob_a": logprob_a, "logprob_b": logprob_b, "delta": delta,
            "kl": kl, "mean_delta": sum(delta) / len(ids) if ids else None,
            "mean_kl": sum(kl) / len(ids) if ids else None, "settings": settings}


def _settings(record: dict, identities: tuple[dict, dict]) -> dict[str, Any]:
    return {"kind": "logprobs", "token_ids_sha256": token_hash(record["token_ids"]),
            "prompt_end": record["prompt_end"], "model_a": identities[0],
            "model_b": identities[1]}


def _kept(path: Path, settings: dict[str, Any]) -> bool:
    """Whether ``path`` was made from these tokens by these models."""
    try:
        return json.loads(path.read_bytes()).get("settings") == settings
    except (OSError, ValueError, AttributeError):
        return False


def _models(experiment: Experiment, names: tuple[str, str], loaded_a, loaded_b,
            switch: Switch | None) -> tuple[Any, Any]:
    """Both sides' models: given, shared through ``switch``, or loaded from the variants."""
    if switch is not None:
        loaded_a, loaded_b = loaded_a or loaded_b, loaded_b or loaded_a
        if loaded_b is None:
            raise UsageError("a switch toggles one shared model: pass it as loaded_b")
    return (loaded_a or load_variant(experiment, names[0]),
            loaded_b or load_variant(experiment, names[1]))


class LogprobDiff:
    """One log-prob diff, set up and checked before any forward: B's records, both sides'
    models and float32 heads, the files still to make (``todo``) and how each is written.

    :meth:`run` scores ``todo`` with its own forwards; :meth:`collector` and
    :meth:`finish_collected` score it from the final hidden states of forwards another stage
    runs anyway (``diff run``'s captures), so the bodies are not run a second time."""

    def __init__(self, experiment: Experiment, variant_a: str, variant_b: str, prompt_set: str,
                 *, loaded_a=None, loaded_b=None, skip_existing: bool = False,
                 switch: Switch | None = None) -> None:
        self.names = (experiment.variant(variant_a)[0], experiment.variant(variant_b)[0])
        self.records = _records(experiment, self.names[1], prompt_set)
        self.pair = _models(experiment, self.names, loaded_a, loaded_b, switch)
        self.switch = switch or _no_switch
        shared = switch is not None and self.pair[0] is self.pair[1]  # A = B, adapter off
        vocabs = [_check_vocab(self.records, loaded, name)
                  for loaded, name in zip(self.pair, self.names, strict=True)]
        if vocabs[0] != vocabs[1]:
            raise UsageError(f"variants {self.names[0]!r} and {self.names[1]!r} have "
                             f"vocabularies of {vocabs[0]} and {vocabs[1]} tokens; a log-prob "
                             "diff needs one")
        self.arch = tuple(resolve_arch(loaded.model) for loaded in self.pair)
        self.heads = ((float32_head(self.arch[0]),) * 2 if self.pair[0] is self.pair[1]
                      else tuple(map(float32_head, self.arch)))
        self.identities = (_model_identity(self.pair[0], adapter=not shared),
                           _model_identity(self.pair[1], adapter=True))
        self.out_dir = logprobs_dir(experiment, *self.names, prompt_set)
        self.todo = [r for r in self.records if not (skip_existing and _kept(
            self.out_dir / f"{r['id']}.json", _settings(r, self.identities)))]
        if len(self.todo) < len(self.records):
            log.info("logprobs: keeping %d file(s) made from the same tokens by the same models",
                     len(self.records) - len(self.todo))
        self.text = TokenText(self.pair[1].tokenizer)
        self.written: list[Path] = []
        self._collected: dict[Which, dict[str, torch.Tensor]] = {"a": {}, "b": {}}

    def _write(self, record: dict, values: torch.Tensor) -> None:
        path = self.out_dir / f"{record['id']}.json"
        write_json(path, _document(record, values, self.text,
                                   _settings(record, self.identities)), compact=True)
        self.written.append(path)

    def run(self, batch_tokens: int = BATCH_TOKENS) -> list[Path]:
        """Score what is still to do with forwards of both bodies; every file written."""
        if batch_tokens < 1:
            raise UsageError(f"batch_tokens {batch_tokens}: use a positive number")
        done = len(self.records) - len(self.todo)
        bar = progress(total=len(self.records), desc="logprobs", unit="prompts", initial=done)
        for batch in _batches(self.todo, batch_tokens):
            scored = _score_batch(self.pair, self.arch, self.heads, batch, self.switch)
            for record, values in zip(batch, scored, strict=True):
                self._write(record, values)
            bar.update(len(batch))
        bar.close()
        self.todo = []
        return sorted(self.written)

    def collector(self, which: Which) -> Callable[[Sequence[dict], torch.Tensor], None]:
        """A callback for ``capture_records(final_hidden=...)`` run on ``which``'s model over
        B's token ids: keeps, per record still to do, its ``(n_response, D)`` final hidden
        states (on the CPU) at the positions that predict the response tokens."""
        wanted = {record["id"]: record for record in self.todo}
        kept = self._collected[which]

        def collect(records: Sequence[dict], hidden: torch.Tensor) -> None:  # (B, T, D)
            for row, record in enumerate(records):
                own = wanted.get(record["id"])
                if own is None or own["token_ids"] != record["token_ids"]:
                    continue
                _, positions, _ = _predictors([own], hidden.shape[1])
                kept[own["id"]] = hidden[row, positions].cpu()  # (n_response, D)

        return collect

    def finish_collected(self) -> list[Path]:
        """Score and write every record both sides' hidden states were collected for, through
        the same heads and the same float32 comparison as :meth:`run`."""
        both = [r for r in self.todo if r["id"] in self._collected["a"]
                and r["id"] in self._collected["b"]]
        device = self.pair[0].device
        with torch.inference_mode():
            for record in both:
                hidden = [self._collected[w].pop(record["id"]).to(device) for w in ("a", "b")]
                targets = torch.tensor(record["token_ids"][record["prompt_end"]:],
                                       dtype=torch.long, device=device)  # (n_response,)
                self._write(record, _compare(self.heads, *hidden, targets, self.switch).cpu())
        scored = {record["id"] for record in both}
        self.todo = [r for r in self.todo if r["id"] not in scored]
        self._collected = {"a": {}, "b": {}}
        return sorted(self.written)


def diff_logprobs(experiment: Experiment, variant_a: str, variant_b: str, prompt_set: str, *,
                  loaded_a=None, loaded_b=None, skip_existing: bool = False,
                  switch: Switch | None = None,
                  batch_tokens: int = BATCH_TOKENS) -> list[Path]:
    """Score B's responses under A and B; write one JSON per prompt; return the files written.

    ``loaded_a`` / ``loaded_b``: the variants' loaded models (loaded from the experiment when
    not given). ``switch``: see the module docstring (one shared PEFT model for both sides).
    ``skip_existing`` keeps a file made from the same token ids by the same two models.
    ``batch_tokens`` bounds one forward's padded tokens (memory; results do not depend on it).
    """
    if batch_tokens < 1:
        raise UsageError(f"batch_tokens {batch_tokens}: use a positive number")
    return LogprobDiff(experiment, variant_a, variant_b, prompt_set, loaded_a=loaded_a,
                       loaded_b=loaded_b, skip_existing=skip_existing,
                       switch=switch).run(batch_tokens)
