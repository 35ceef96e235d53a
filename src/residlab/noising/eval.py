"""Score every generation of a noising run under a reference model, token by token.

With the generator's tokenizer the generated ids are scored exactly as generated. With a
different tokenizer the conversation is rebuilt with the reference's chat template and the
assistant span is found by character offsets. Output: ``RUN/eval_logprobs.jsonl``, one record
per generation; a rerun scores only what is missing.

    python -m residlab.noising.eval --config configs/example.yaml --run_dir RUN
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from residlab.arch import resolve_arch
from residlab.config import NoisingConfig
from residlab.errors import UsageError
from residlab.models import LoadedModel, load_model, load_tokenizer
from residlab.noising.runs import RunDir
from residlab.scoring import ScoreRow, score_rows
from residlab.store import write_jsonl

__all__ = ["EVAL_FILE", "Skipped", "main", "read_generations", "run_eval", "summarize"]

log = logging.getLogger(__name__)
EVAL_FILE = "eval_logprobs.jsonl"
CHECKPOINT_SECONDS = 30.0


@dataclass(frozen=True)
class Skipped:
    """A generations line that could not be read."""

    path: Path
    line: int
    reason: str


def record_key(record: dict[str, Any]) -> tuple:
    return (record["noise_id"], float(record["noise_scale"]), record["prompt_index"])


def read_generations(run: RunDir) -> tuple[list[dict], list[Skipped]]:
    """All generation records of a run; malformed or truncated lines are skipped, not fatal."""
    needed = ("noise_id", "noise_scale", "prompt_index", "messages", "assistant_text",
              "prompt_token_ids", "response_token_ids")
    records, skipped = [], []
    for path in run.gens_files():
        for line_no, line in enumerate(path.read_text("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                skipped.append(Skipped(path, line_no, f"malformed JSON ({error.msg})"))
                continue
            missing = [key for key in needed if key not in record]
            if missing:
                skipped.append(Skipped(path, line_no, f"missing {', '.join(missing)}"))
                continue
            records.append(record)
    return records, skipped


def _same_tokenizer(reference, generator) -> bool:
    return reference.get_vocab() == generator.get_vocab()


def _exact_row(record: dict, stops: set[int], score_eos: bool) -> tuple[ScoreRow, list[int]]:
    prompt, response = record["prompt_token_ids"], list(record["response_token_ids"])
    if not score_eos and response and response[-1] in stops:
        response = response[:-1]
    ids = prompt + response
    return ScoreRow(ids, len(prompt), len(ids)), response


def _retokenized_row(record: dict, tokenizer, score_eos: bool) -> tuple[ScoreRow, list[int]]:
    """Rebuild the chat with the reference's template; score the assistant span by offsets."""
    messages = record["messages"]
    answer = record["assistant_text"]
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": answer}], tokenize=False)
    answer = answer if answer in full else answer.strip()  # some templates trim content
    begin = full.rfind(answer) if answer else len(prompt_text)
    if begin < 0:
        raise UsageError("assistant text not found in the reference chat template")
    end = begin + len(answer)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    inside = [i for i, (a, b) in enumerate(offsets) if b > begin and a < end]
    after = [i for i, (a, _) in enumerate(offsets) if a >= end] + [len(ids)]
    first = inside[0] if inside else after[0]
    last = inside[-1] + 1 if inside else first
    ended = record.get("finish_reason") == "stop"
    if score_eos and ended and last < len(ids) and ids[last] in tokenizer.all_special_ids:
        last += 1
    first = max(first, 1)
    return ScoreRow(ids, first, last), ids[first:last]


def _score_batch(ref: LoadedModel, arch, batch: list[dict], score_eos: bool,
                 exact: bool) -> list[dict]:
    stops = set(ref.tokenizer.all_special_ids)
    rows, scored_ids = [], []
    for record in batch:
        row, ids = (_exact_row(record, stops, score_eos) if exact
                    else _retokenized_row(record, ref.tokenizer, score_eos))
        rows.append(row)
        scored_ids.append(ids)
    values = score_rows(ref.model, arch, rows, pad_id=ref.tokenizer.pad_token_id or 0)
    out = []
    for record, ids, logprobs in zip(batch, scored_ids, values, strict=True):
        total = float(sum(logprobs))
        out.append({
            "noise_id": record["noise_id"], "noise_scale": record["noise_scale"],
            "prompt_index": record["prompt_index"], "total_logprob": total,
            "mean_logprob": total / len(logprobs) if logprobs else 0.0,
            "n_tokens": len(logprobs), "per_token_logprobs": logprobs,
            "tokens": [ref.tokenizer.decode([token]) for token in ids],
            "assistant_text": record["assistant_text"], "messages": record["messages"],
            "finish_reason": record.get("finish_reason"),
            "reference_model": ref.name, "scoring": "exact_ids" if exact else "retokenized",
        })
    return out


def _existing(path: Path, reference: str) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text("utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # rewritten whole below; a bad line is simply scored again
    others = {r.get("reference_model") for r in records} - {reference}
    if others:
        raise UsageError(f"{path} was scored with {sorted(others)[0]!r}, not {reference!r}; "
                         "move that file away to score with another reference model")
    return records


def run_eval(
    cfg: NoisingConfig, run_dir: str | Path, *, score_eos: bool = True,
    loaded: LoadedModel | None = None, batch_size: int | None = None,
) -> tuple[Path, list[Skipped]]:
    """Score the run's generations; returns the output path and the skipped lines."""
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
    out_path = run.path / EVAL_FILE
    done = _existing(out_path, ref.name)
    seen = {record_key(r) for r in done}
    todo = [r for r in records if record_key(r) not in seen]
    todo.sort(key=lambda r: len(r["prompt_token_ids"]) + len(r["response_token_ids"]))
    arch = resolve_arch(ref.model, cfg.layers_path)
    size = batch_size or cfg.batch_size
    last_write = time.monotonic()
    for start in tqdm(range(0, len(todo), size), desc="scoring", unit="batch", disable=None):
        done += _score_batch(ref, arch, todo[start:start + size], score_eos, exact)
        if time.monotonic() - last_write > CHECKPOINT_SECONDS:
            write_jsonl(out_path, done)
            last_write = time.monotonic()
    done.sort(key=lambda r: (r["noise_id"], r["noise_scale"], r["prompt_index"]))
    write_jsonl(out_path, done)
    return out_path, skipped


def summarize(records: list[dict], worst: int = 5) -> str:
    """Per-scale mean / median / 5th percentile of mean log-prob, and the worst vectors."""
    import numpy as np

    from residlab.noising.stats import vector_drops

    by_scale: dict[float, list[float]] = {}
    for record in records:
        by_scale.setdefault(float(record["noise_scale"]), []).append(record["mean_logprob"])
    lines = [f"{'scale':>10} {'n':>6} {'mean':>9} {'median':>9} {'p5':>9}   (mean log-prob/token)"]
    for scale in sorted(by_scale):
        values = np.array(by_scale[scale])
        lines.append(f"{scale:>10g} {len(values):>6d} {values.mean():>9.3f} "
                     f"{np.median(values):>9.3f} {np.percentile(values, 5):>9.3f}")
    drops = vector_drops(records)
    if drops:
        lines.append(f"worst noise vectors (drop in mean log-prob at scale "
                     f"{drops[0]['scale']:g} vs {drops[0]['baseline']:g}):")
        lines += [f"  noise {d['noise_id']:04d}: {d['drop']:+.3f}" for d in drops[:worst]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from residlab.cli import main as cli_main

    return cli_main(["noise", "eval", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
