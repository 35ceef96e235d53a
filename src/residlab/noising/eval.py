"""Score every generation of a noising run under a reference model, token by token.

With the generator's tokenizer the generated ids are scored exactly as generated. With a
different tokenizer the conversation is rebuilt with the reference's chat template and the
assistant span is cut out of it exactly where the template places the assistant text.
Output: ``RUN/eval_logprobs.jsonl``, one record per generation, each carrying the settings it
was scored with; a rerun scores what is missing or was scored with other settings.

While scoring, finished batches are appended to ``RUN/eval_logprobs.partial.jsonl`` (a kill
loses at most one batch); at the end the final file is written atomically and the partial
file removed.

    python -m residlab.noising.eval --config configs/example.yaml --run_dir RUN
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

from residlab.arch import resolve_arch
from residlab.config import NoisingConfig
from residlab.errors import UsageError
from residlab.executors import Executor, Shard
from residlab.executors.local import LocalExecutor
from residlab.models import LoadedModel, load_model, load_tokenizer
from residlab.noising.jobs import NoisingJob
from residlab.noising.runs import RunDir
from residlab.progress import progress
from residlab.scoring import ScoreRow, score_rows
from residlab.store import (
    BadLine,
    append_jsonl,
    drop_torn_tail,
    read_jsonl_tolerant,
    write_jsonl,
)

__all__ = ["EVAL_FILE", "PARTIAL_FILE", "EvalJob", "Skipped", "read_generations", "run_eval",
           "scoring_settings", "summarize"]

log = logging.getLogger(__name__)
EVAL_FILE = "eval_logprobs.jsonl"
PARTIAL_FILE = "eval_logprobs.partial.jsonl"
Skipped = BadLine  # a generations line that could not be read: (path, line, reason)
KEY_FIELDS = ("noise_id", "noise_scale", "prompt_index")
# Stands in for the assistant text to find where the reference template puts it.
SLOT = "90210573164822"  # digits: unchanged by case, trim or escape filters


class Unscorable(Exception):
    """The reference template does not keep this answer's text as it is."""


def record_key(record: dict[str, Any]) -> tuple:
    return (record["noise_id"], float(record["noise_scale"]), record["prompt_index"])


def read_generations(run: RunDir) -> tuple[list[dict], list[Skipped]]:
    """All generation records of a run; malformed or truncated lines are skipped, not fatal."""
    needed = (*KEY_FIELDS, "messages", "assistant_text", "prompt_token_ids",
              "response_token_ids")
    records, skipped = [], []
    for path in run.gens_files():
        rows, bad = read_jsonl_tolerant(path)
        skipped += bad
        for line_no, record in rows:
            if not isinstance(record, dict):
                skipped.append(Skipped(path, line_no, "not a JSON object"))
                continue
            missing = [key for key in needed if key not in record]
            if missing:
                skipped.append(Skipped(path, line_no, f"missing {', '.join(missing)}"))
                continue
            records.append(record)
    return records, skipped


def _same_tokenizer(reference, generator) -> bool:
    return reference.get_vocab() == generator.get_vocab()


def scoring_settings(ref: LoadedModel, *, exact: bool, score_eos: bool) -> dict[str, Any]:
    """What a score depends on besides the generation; stored per record, checked on resume."""
    prov = ref.provenance or {}
    digest = prov.get("sha256") or prov.get("config_sha256") or prov.get("revision")
    identity = f"{prov.get('model', ref.name)}@{digest}" if digest else prov.get("model", ref.name)
    return {"reference": identity, "dtype": str(ref.dtype).removeprefix("torch."),
            "scoring": "exact_ids" if exact else "retokenized", "score_eos": score_eos,
            "lm_head": "float32"}


def _exact_row(record: dict, stops: set[int], score_eos: bool) -> tuple[ScoreRow, list[int]]:
    prompt, response = record["prompt_token_ids"], list(record["response_token_ids"])
    if not score_eos and response and response[-1] in stops:
        response = response[:-1]
    ids = prompt + response
    return ScoreRow(ids, len(prompt), len(ids)), response


def _render(tokenizer, messages: list[dict], model: str) -> str:
    """The reference template's text of ``messages``; a rejected role is a UsageError."""
    from jinja2.exceptions import TemplateError

    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"reference model {model!r} has no chat template; score with a chat "
                         "model (reference_model_name) or with the generator itself")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except TemplateError as error:
        why = " ".join(str(error).split())
        role = _rejected_role(tokenizer, messages)
        if role is None:
            raise UsageError(f"reference model {model!r}: its chat template rejects this "
                             f"conversation ({why}); choose another reference model") from None
        raise UsageError(f"reference model {model!r}: its chat template rejects the {role!r} "
                         f"role ({why}); drop the {role} message (system_prompt) or choose "
                         "another reference model") from None


def _rejected_role(tokenizer, messages: list[dict]) -> str | None:
    """The role whose messages, left out, make the template render (None: no single one)."""
    from jinja2.exceptions import TemplateError

    for role in dict.fromkeys(m["role"] for m in messages if m["role"] != "user"):
        try:
            tokenizer.apply_chat_template([m for m in messages if m["role"] != role],
                                          tokenize=False)
        except TemplateError:
            continue
        return role
    return None


def _template_parts(tokenizer, messages: list[dict], answer: str,
                    model: str) -> tuple[str, str, str]:
    """(text before the answer, the answer as placed, text after) in the reference rendering.

    The template is rendered once with a placeholder answer: what surrounds the placeholder
    is the template's own text, so the answer is never looked for inside it (a short answer
    such as "\\n" or "end" also occurs in the template's closing tokens).
    """
    slotted = _render(tokenizer, [*messages, {"role": "assistant", "content": SLOT}], model)
    full = _render(tokenizer, [*messages, {"role": "assistant", "content": answer}], model)
    if slotted.count(SLOT) != 1:
        raise Unscorable("the reference chat template does not place the answer verbatim")
    head, tail = slotted.split(SLOT)
    placed = full[len(head):len(full) - len(tail)]
    bracketed = (full.startswith(head) and full.endswith(tail)
                 and len(full) >= len(head) + len(tail))
    trimmed = placed in answer and placed.strip() == answer.strip()  # templates may trim
    if not bracketed or not (placed == answer or trimmed):
        raise Unscorable("the reference chat template rewrites this answer")
    return head, placed, tail


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _retokenized_row(record: dict, tokenizer, score_eos: bool, *,
                     model: str = "reference") -> tuple[ScoreRow, list[int]]:
    """The reference template's conversation as ids; the scored span is the answer's tokens
    (plus the template's end token when the generation stopped and ``score_eos``)."""
    head, placed, tail = _template_parts(tokenizer, record["messages"],
                                         record["assistant_text"], model)
    head_ids, joint = _encode(tokenizer, head), _encode(tokenizer, head + placed)
    if joint[:len(head_ids)] == head_ids:
        answer_ids = joint[len(head_ids):]
    else:  # a token spans the boundary: tokenise as generation does, prompt then answer
        answer_ids = _encode(tokenizer, placed)
    ids = head_ids + answer_ids
    end_id = _encode(tokenizer, tail)[:1]
    stopped = score_eos and record.get("finish_reason") == "stop"
    if stopped and end_id and end_id[0] in tokenizer.all_special_ids:
        ids += end_id
    first = max(len(head_ids), 1)
    return ScoreRow(ids, first, len(ids)), ids[first:]


def _scored(record: dict, ids: list[int], logprobs: list[float], ref: LoadedModel,
            settings: dict, unscored: str | None = None) -> dict:
    """The output record. No scored token means no score: mean and total are null (0.0
    would read as the best possible score)."""
    total = float(sum(logprobs)) if logprobs else None
    out = {
        "noise_id": record["noise_id"], "noise_scale": record["noise_scale"],
        "prompt_index": record["prompt_index"], "total_logprob": total,
        "mean_logprob": total / len(logprobs) if logprobs else None,
        "n_tokens": len(logprobs), "per_token_logprobs": logprobs,
        "tokens": [ref.tokenizer.decode([token]) for token in ids],
        "assistant_text": record["assistant_text"], "messages": record["messages"],
        "finish_reason": record.get("finish_reason"),
        "reference_model": ref.provenance.get("model", ref.name),  # the real id, not "default"
        "scoring": settings["scoring"], "settings": settings,
    }
    if unscored:
        out["unscored"] = unscored
    return out


def _score_batch(ref: LoadedModel, arch, batch: list[dict], settings: dict) -> list[dict]:
    stops = set(ref.tokenizer.all_special_ids)
    rows, kept, out = [], [], []
    for record in batch:
        try:
            row, ids = (_exact_row(record, stops, settings["score_eos"])
                        if settings["scoring"] == "exact_ids" else
                        _retokenized_row(record, ref.tokenizer, settings["score_eos"],
                                         model=ref.name))
        except Unscorable as why:
            log.warning("noise %s, scale %g, prompt %s: %s; not scored", *record_key(record),
                        why)
            out.append(_scored(record, [], [], ref, settings, unscored=str(why)))
            continue
        rows.append(row)
        kept.append((record, ids))
    values = (score_rows(ref.model, arch, rows, pad_id=ref.tokenizer.pad_token_id or 0)
              if rows else [])
    for (record, ids), logprobs in zip(kept, values, strict=True):
        out.append(_scored(record, ids, logprobs, ref, settings))
    return out


class EvalJob(NoisingJob):
    """Scoring batches: a shard's payload is a batch of generation records; every worker
    scores with the same reference model and settings."""


    def __init__(self, cfg: NoisingConfig, reference: str, settings: dict, *,
                 loaded: LoadedModel | None = None, arch=None):
        self.cfg, self.reference, self.settings = cfg, reference, settings
        self.loaded, self.arch = loaded, arch

    def model_name(self) -> str:
        return self.reference

    def compute(self, payload: list[dict]) -> list[dict]:
        return _score_batch(self.loaded, self.arch, payload, self.settings)


def _why_stale(record: dict, settings: dict) -> str:
    old = record.get("settings")
    if not isinstance(old, dict):
        return "no scoring settings recorded"
    return ", ".join(f"{key} {old.get(key)!r} -> {value!r}"
                     for key, value in settings.items() if old.get(key) != value)


def _previous(paths: list[Path], settings: dict) -> tuple[dict[tuple, dict], bool]:
    """Records already scored with ``settings``, by key (later files win), and whether the
    files held anything else (lines to drop, records to rescore) so the output is rewritten."""
    found: dict[tuple, dict] = {}
    dirty = False
    for path in paths:
        if not path.is_file():
            continue
        rows, bad = read_jsonl_tolerant(path)
        for item in bad:  # a torn last line of the partial file is expected after a kill
            log.info("%s:%d: %s; that record is scored again", item.path, item.line, item.reason)
        dirty |= bool(bad)
        for _, record in rows:
            if isinstance(record, dict) and all(key in record for key in KEY_FIELDS):
                found[record_key(record)] = record
    why = Counter(_why_stale(r, settings) for r in found.values() if r.get("settings") != settings)
    if why:
        log.warning("rescoring %d record(s) scored with other settings: %s", why.total(),
                    "; ".join(f"{n} with {reason}" for reason, n in why.most_common()))
    fresh = {key: r for key, r in found.items() if r.get("settings") == settings}
    return fresh, dirty or bool(why)


def run_eval(
    cfg: NoisingConfig, run_dir: str | Path, *, score_eos: bool = True,
    loaded: LoadedModel | None = None, batch_size: int | None = None,
    executor: Executor | None = None,
) -> tuple[Path, list[Skipped]]:
    """Score the run's generations; returns the output path and the skipped lines.

    ``executor`` scores the batches (default: this process); this process appends each
    finished batch to the partial file, in whatever order batches finish (the final file is
    sorted, so it does not depend on that order)."""
    run = RunDir(Path(run_dir)).check()
    records, skipped = read_generations(run)
    for item in skipped:
        log.warning("%s:%d: %s; skipped", item.path, item.line, item.reason)
    if not records:
        raise UsageError(f"{run.path} has no generations to score; run 'residlab noise "
                         "generate' first (or --resume it)")
    run_cfg = run.read_config()[0]
    reference = cfg.reference_model_name or run_cfg.reference_model
    ref = loaded or load_model(reference, dtype=cfg.dtype, device=cfg.device,
                               trust_remote_code=cfg.trust_remote_code)
    exact = _same_tokenizer(ref.tokenizer, load_tokenizer(run_cfg.model_name))
    log.info("scoring with %s (%s)", reference, "exact generated ids" if exact else
             "re-tokenised with the reference chat template")
    settings = scoring_settings(ref, exact=exact, score_eos=score_eos)
    out_path, partial = run.path / EVAL_FILE, run.path / PARTIAL_FILE
    done, dirty = _previous([out_path, partial], settings)
    todo = [r for r in records if record_key(r) not in done]
    todo.sort(key=lambda r: len(r["prompt_token_ids"]) + len(r["response_token_ids"]))
    arch = resolve_arch(ref.model, cfg.layers_path)
    size = batch_size or cfg.batch_size
    drop_torn_tail(partial)
    batches = [todo[start:start + size] for start in range(0, len(todo), size)]
    work = [Shard(i, batch, len(batch)) for i, batch in enumerate(batches)]

    def write(shard: Shard, scored: list[dict]) -> None:
        append_jsonl(partial, scored)
        done.update((record_key(r), r) for r in scored)

    job = EvalJob(cfg, reference, settings, loaded=ref, arch=arch)
    with progress(total=len(done) + len(todo), desc="scoring", unit="generations",
                  initial=len(done)) as bar:
        (executor or LocalExecutor()).run(job, work, write, bar=bar)
    if todo or dirty or partial.exists() or not out_path.is_file():
        write_jsonl(out_path, sorted(done.values(), key=record_key))
    partial.unlink(missing_ok=True)
    return out_path, skipped


def summarize(records: list[dict], worst: int = 5) -> str:
    """Per-scale mean / median / 5th percentile of mean log-prob, the worst vectors, and
    how many generations have no score (nothing to score, or not scorable)."""
    from residlab.noising.stats import scale_quantiles, vector_drops

    lines = [f"{'scale':>10} {'n':>6} {'mean':>9} {'median':>9} {'p5':>9}   (mean log-prob/token)"]
    for row in scale_quantiles(records):
        lines.append(f"{row['scale']:>10g} {row['n']:>6d} {row['mean']:>9.3f} "
                     f"{row['q'][2]:>9.3f} {row['q'][0]:>9.3f}")
    drops = vector_drops(records)
    if drops:
        lines.append(f"worst noise vectors (drop in mean log-prob at scale "
                     f"{drops[0]['scale']:g} vs {drops[0]['baseline']:g}):")
        lines += [f"  noise {d['noise_id']:04d}: {d['drop']:+.3f}" for d in drops[:worst]]
    unscored = [r for r in records if r.get("unscored")]
    empty = [r for r in records if not r.get("unscored") and r.get("mean_logprob") is None]
    if empty:
        lines.append(f"{len(empty)} generation(s) with no token to score (empty response): "
                     "no score, left out above")
    if unscored:
        first = unscored[0]
        lines.append(f"{len(unscored)} generation(s) not scored: {first['unscored']} (first: "
                     f"noise {first['noise_id']}, scale {first['noise_scale']:g}, prompt "
                     f"{first['prompt_index']}); left out above")
    return "\n".join(lines)


if __name__ == "__main__":
    from residlab.cli import run_module

    raise SystemExit(run_module("noise", "eval"))
