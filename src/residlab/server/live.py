"""The Live Chat engine: a conversation's token ids -> one event per token, with readouts.

Every token's readout is taken at that token's own position: prompt tokens in the prefill
forward, each generated token when it is fed back as input. So the streamed projection of token
``t`` is exactly what an offline capture of the same ids gives (``resid_post`` of layer ``L`` at
position ``t``), and a generated token's event is sent one forward after it was chosen (the last
token gets that extra forward too).

One forward runs per :meth:`LiveGeneration.step`, under the server's model lock, with this
stream's hooks registered for that forward only: concurrent streams interleave token by token.

Steering adds ``coefficient x unit x norm_scale`` at ``resid_post`` of the trait's layer (as
``residlab steer`` does, in units of the layer's typical norm) at every position whose output
chooses a generated token: from the last prompt token on, so the first generated token is
steered too; ``steer_prompt`` steers every prompt position as well. Readouts see the steered
activation (what the next layer reads).

Key-value cache reuse: a finished conversation's cache is kept (a small LRU per server). A new
request with the same setup (model load, readout vectors, steering vectors, ``steer_prompt``) whose
templated ids share a prefix with a kept conversation resumes from it. Reuse stops where the
ids differ (an edited earlier message, a re-tokenised answer) and, when steering only the
generated part, at the first steered position (a fresh prefill would not steer those tokens
now that they are prompt). Any other setup, a new model, or eviction from the LRU: no reuse.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from residlab.arch import resolve_arch
from residlab.generation import stop_token_ids
from residlab.hooks import Add, Readout, intervene

__all__ = ["ConversationCache", "LiveGeneration", "LiveSetup", "Steer", "Trait", "common_prefix"]


@dataclass(frozen=True)
class Trait:
    """A trait vector read out (and maybe steered) live."""

    name: str
    layer: int
    unit: torch.Tensor  # (D,) float32, unit norm
    metadata: dict[str, Any]  # layer, method, position, source (for the stream's first event)


@dataclass(frozen=True)
class Steer:
    trait: Trait
    coefficient: float  # in units of the layer's typical norm
    norm_scale: float

    @property
    def vector(self) -> torch.Tensor:
        return self.trait.unit * (self.coefficient * self.norm_scale)  # (D,)


@dataclass(frozen=True)
class LiveSetup:
    """What the hooks do; equal setups can share a conversation's key-value cache."""

    traits: tuple[Trait, ...]
    steering: tuple[Steer, ...]
    steer_prompt: bool = False

    def readouts(self) -> tuple[list[Readout], list[tuple[int, int]]]:
        """One Readout per layer (all its traits at once) and, per trait, (readout, row)."""
        layers = sorted({t.layer for t in self.traits})
        where = [(layers.index(t.layer),
                  [u.name for u in self.traits if u.layer == t.layer].index(t.name))
                 for t in self.traits]
        readouts = [Readout(layer, torch.stack([t.unit for t in self.traits if t.layer == layer]))
                    for layer in layers]  # (K_L, D) each
        return readouts, where

    def adds(self, device: torch.device) -> list[Add]:
        positions = "all" if self.steer_prompt else "generated"
        return [Add(s.trait.layer, s.vector.to(device), site="resid_post", positions=positions)
                for s in self.steering if s.coefficient != 0]

    def key(self, model: Any, *, generation: int = 0) -> str:
        """Equal for setups whose caches are interchangeable: the same model load (the server's
        ``generation``, since an ``id()`` can be reused by the next model), hooks and vectors."""
        digest = hashlib.sha256(f"{generation}:{id(model)}:{self.steer_prompt}".encode())
        for trait in self.traits:
            digest.update(f"r:{trait.name}:{trait.layer}".encode())
            digest.update(trait.unit.float().cpu().numpy().tobytes())
        for steer in self.steering:
            if steer.coefficient != 0:
                digest.update(f"s:{steer.trait.layer}".encode())
                digest.update(steer.vector.float().cpu().numpy().tobytes())
        return digest.hexdigest()


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass
class _Kept:
    """A conversation's cache as kept between requests."""

    ids: list[int]
    cache: Any  # transformers Cache
    readouts: list[tuple[list[float], list[float]]]  # per token: (projections, cosines)
    valid: int  # leading tokens whose keys/values a fresh prefill would compute identically


class ConversationCache:
    """A few conversations' key-value caches, least recently used evicted first."""

    def __init__(self, max_entries: int = 4) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], _Kept] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, setup_key: str, ids: Sequence[int]) -> tuple[_Kept | None, int]:
        """Remove and return the kept conversation sharing the longest prefix with ``ids``
        (cropped to it, at least one token left to run) and that prefix's length."""
        with self._lock:
            scored = [(min(common_prefix(kept.ids, ids), kept.valid, len(ids) - 1), key)
                      for key, kept in self._entries.items() if key[0] == setup_key]
            reuse, key = max(scored, default=(0, None))
            if key is None or reuse <= 0:
                return None, 0
            kept = self._entries.pop(key)
        if not getattr(kept.cache, "is_croppable", True):
            return None, 0
        extra = kept.cache.get_seq_length() - reuse
        if extra > 0:
            kept.cache.crop(-extra)  # transformers 5: a negative count removes that many
        return kept, reuse

    def put(self, setup_key: str, kept: _Kept) -> None:
        key = (setup_key, hashlib.sha256(str(kept.ids).encode()).hexdigest())
        with self._lock:
            self._entries[key] = kept
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class IncrementalDecoder:
    """Text of each new token, so that multi-byte characters split over tokens come out whole
    (a token that ends inside a character gives "" and the next one carries it)."""

    def __init__(self, tokenizer, ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids = list(ids)
        self.prefix = max(len(self.ids) - 6, 0)  # context so leading spaces decode correctly
        self.read = len(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix:self.read], skip_special_tokens=False)
        text = decode(self.ids[self.prefix:], skip_special_tokens=False)
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]


@dataclass
class LiveGeneration:
    """One stream: prefill the prompt (reusing a kept cache), then one token per step."""

    loaded: Any
    setup: LiveSetup
    prompt_ids: list[int]
    max_tokens: int
    lock: threading.Lock
    temperature: float = 0.0
    seed: int | None = None
    store: ConversationCache | None = None
    first_event: int = 0  # prompt tokens before this index are not sent again
    generation: int = 0  # the server's model load this runs on (kept caches are per load)
    generated: list[int] = field(default_factory=list)
    finished: bool = False
    reused: int = 0  # prompt tokens whose cache was reused

    def __post_init__(self) -> None:
        model = self.loaded.model
        self.device = next(model.parameters()).device
        self.arch = resolve_arch(model)
        self.stops = set(stop_token_ids(model, self.loaded.tokenizer))
        self.special = set(self.loaded.tokenizer.all_special_ids)
        self.key = self.setup.key(model, generation=self.generation)
        self.readouts, self.where = self.setup.readouts()
        self.adds = self.setup.adds(self.device)
        self.fed: list[int] = []  # token ids whose keys/values are in the cache
        self.values: list[tuple[list[float], list[float]]] = []  # per fed token
        self.cache: Any = None
        self.pending: int | None = None  # chosen, not yet fed
        self.generator = None
        if self.temperature > 0:
            self.generator = torch.Generator(self.device)
            self.generator.manual_seed(self.seed if self.seed is not None
                                       else torch.seed() % 2**63)
        steer_from = 0 if self.setup.steer_prompt else len(self.prompt_ids) - 1
        self.prompt_mask = torch.ones(1, steer_from, dtype=torch.long, device=self.device)
        self.decoder = IncrementalDecoder(self.loaded.tokenizer,
                                          self.prompt_ids[:self.first_event])

    def prefill(self) -> list[dict[str, Any]]:
        """Run the prompt (after any reused prefix); events of prompt tokens from
        ``first_event`` on. The first generated token is chosen here."""
        from transformers import DynamicCache

        kept, self.reused = (self.store.take(self.key, self.prompt_ids) if self.store
                             else (None, 0))
        if kept is None:
            self.cache = DynamicCache(config=self.loaded.model.config)
        else:
            self.cache, self.fed, self.values = kept.cache, kept.ids[:self.reused], \
                kept.readouts[:self.reused]
        logits = self._forward(self.prompt_ids[self.reused:])
        self.pending = self._choose(logits)
        return [self._event(i, True) for i in range(self.first_event, len(self.prompt_ids))]

    def step(self) -> dict[str, Any]:
        """Feed the pending token: its readouts make its event; choose the next one."""
        assert self.pending is not None and not self.finished
        token = self.pending
        self.generated.append(token)
        logits = self._forward([token])
        if token in self.stops or len(self.generated) >= self.max_tokens:
            self.finished, self.pending = True, None
            self._keep()
        else:
            self.pending = self._choose(logits)
        return self._event(len(self.fed) - 1, False)

    def close(self) -> None:
        """Drop the cache (a stream that ended early keeps nothing)."""
        self.cache, self.values, self.pending = None, [], None

    @torch.inference_mode()
    def _forward(self, ids: list[int]) -> torch.Tensor:
        """One forward of ``ids`` after the cached tokens; readouts appended; last logits."""
        past = len(self.fed)
        inputs = torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, T)
        mask = torch.ones(1, past + len(ids), dtype=torch.long, device=self.device)
        for readout in self.readouts:
            readout.clear()
        with self.lock, intervene(self.loaded.model, [*self.adds, *self.readouts],
                                  arch=self.arch, prompt_mask=self.prompt_mask):
            out = self.loaded.model(input_ids=inputs, attention_mask=mask,
                                    past_key_values=self.cache, use_cache=True,
                                    logits_to_keep=1)
        self.cache = out.past_key_values
        self.fed += ids
        self.values += self._readout_values(len(ids))
        return out.logits[0, -1].float()  # (V,)

    def _readout_values(self, n: int) -> list[tuple[list[float], list[float]]]:
        """Per token of the last forward: each trait's (projection, cosine), in trait order."""
        if not self.readouts:
            return [([], [])] * n
        proj = torch.cat([r.projections[0][0] for r in self.readouts], dim=-1)  # (T, K)
        cos = torch.cat([r.cosines[0][0] for r in self.readouts], dim=-1)  # (T, K)
        offsets = [0]
        for readout in self.readouts:
            offsets.append(offsets[-1] + readout.units.shape[0])
        order = [offsets[group] + row for group, row in self.where]
        both = torch.stack([proj[:, order], cos[:, order]], dim=1).cpu().tolist()  # (T, 2, K)
        return [(p, c) for p, c in both]

    def _choose(self, logits: torch.Tensor) -> int:
        if self.generator is None:
            return int(logits.argmax())
        probs = torch.softmax(logits / self.temperature, dim=-1)  # (V,)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def _keep(self) -> None:
        if self.store is None:
            return
        valid = len(self.fed) if self.setup.steer_prompt or not self.adds else \
            self.prompt_mask.shape[1]
        self.store.put(self.key, _Kept(list(self.fed), self.cache, list(self.values), valid))
        self.cache = None

    def _event(self, index: int, is_prompt: bool) -> dict[str, Any]:
        token_id = self.fed[index]
        proj, cos = self.values[index]
        names = [t.name for t in self.setup.traits]
        return {"token": self.decoder.push(token_id), "token_id": token_id,
                "token_index": index, "is_prompt": is_prompt,
                "is_special": token_id in self.special,
                "trait_scores": dict(zip(names, cos, strict=True)),
                "trait_projections": dict(zip(names, proj, strict=True))}

    def full_response(self) -> str:
        return self.loaded.tokenizer.decode(self.generated, skip_special_tokens=True)
