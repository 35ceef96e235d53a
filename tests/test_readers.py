"""One JSONL / line reader for every file: lines end at "\\n" only.

JSON written with ``ensure_ascii=False`` (and by orjson) keeps U+2028, U+2029 and U+0085 raw
inside strings; ``str.splitlines()`` cuts records there, which made such a record malformed
on every read.
"""

from __future__ import annotations

import json

import orjson
import pytest
import torch

from residlab.config import NoisingConfig
from residlab.noising.eval import EVAL_FILE, run_eval
from residlab.noising.generate import run_generate
from residlab.noising.runs import RunDir
from residlab.noising.viz import run_viz
from residlab.prompts import iter_conversations
from residlab.store import (
    BadLine,
    append_jsonl,
    drop_torn_tail,
    read_jsonl,
    read_jsonl_tolerant,
    read_lines,
)
from residlab.traits.data import load_trait

SEPARATORS = ["\u2028", "\u2029", "\x85"]


def test_separators_stay_inside_records(tmp_path):
    records = [{"text": f"a{ch}b", "n": i} for i, ch in enumerate(SEPARATORS)]
    by_json = tmp_path / "a.jsonl"
    by_json.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                       encoding="utf-8")
    by_orjson = tmp_path / "b.jsonl"
    by_orjson.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    for path in (by_json, by_orjson):
        assert all(ch.encode() in path.read_bytes() for ch in SEPARATORS)  # written raw
        assert read_jsonl(path) == records
        assert read_jsonl_tolerant(path) == ([(1, records[0]), (2, records[1]),
                                              (3, records[2])], [])


def test_tolerant_reader_reports_bad_lines(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_bytes(b'{"a": 1}\r\n\n{"a": 2\n{"a": "\xff"}\n{"a": 3}\n{"a": 4, "b')
    records, bad = read_jsonl_tolerant(path)
    assert records == [(1, {"a": 1}), (5, {"a": 3})]
    assert [(b.line, b.reason.split(" (")[0]) for b in bad] == [
        (3, "malformed JSON"), (4, "not UTF-8"), (6, "truncated last line")]
    assert all(isinstance(b, BadLine) and b.path == path for b in bad)
    with pytest.raises(ValueError, match="g.jsonl:3: malformed JSON"):
        read_jsonl(path)


def test_append_log_and_torn_tail(tmp_path):
    path = tmp_path / "log.jsonl"
    append_jsonl(path, [{"k": 1, "t": "x\u2028y"}, {"k": 2}])
    with path.open("ab") as handle:
        handle.write(b'{"k": 3, "t": "cut sh')  # a kill in the middle of a write
    drop_torn_tail(path)
    append_jsonl(path, [{"k": 4}])
    assert read_jsonl(path) == [{"k": 1, "t": "x\u2028y"}, {"k": 2}, {"k": 4}]


def test_line_files_and_prompt_files(tmp_path, monkeypatch):
    pairs = [(f"positive {i}{ch}still the same line", f"negative {i}")
             for i, ch in enumerate(SEPARATORS * 2)]
    folder = tmp_path / "datasets" / "traits" / "test" / "separators"
    folder.mkdir(parents=True)
    (folder / "positive.txt").write_text("\r\n".join(p for p, _ in pairs) + "\r\n", "utf-8")
    (folder / "negative.txt").write_text("\n".join(n for _, n in pairs), "utf-8")
    monkeypatch.chdir(tmp_path)
    trait = load_trait("test/separators")
    assert trait.positive == [p for p, _ in pairs] and trait.negative == [n for _, n in pairs]
    assert read_lines(folder / "positive.txt") == [p for p, _ in pairs]

    dataset = tmp_path / "prompts.jsonl"
    conversations = [[{"role": "user", "content": f"question{ch}continued"}] for ch in SEPARATORS]
    dataset.write_text("".join(json.dumps({"conversation": c}, ensure_ascii=False) + "\n"
                               for c in conversations), "utf-8")
    assert list(iter_conversations(dataset_path=str(dataset))) == list(enumerate(conversations))


def test_separators_round_trip_generate_eval_viz(tmp_path, tiny_llama, tiny_llama_dir):
    """Prompts and generations holding each separator go through every stage intact."""
    prompts = [f"Tell me{ch}about tides." for ch in SEPARATORS]
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text("".join(json.dumps({"conversation": [{"role": "user", "content": p}]},
                                          ensure_ascii=False) + "\n" for p in prompts), "utf-8")
    cfg = NoisingConfig(model_name=str(tiny_llama_dir), dtype="fp32", device="cpu",
                        dataset_path=str(dataset), num_prompts=3, batch_size=8,
                        max_new_tokens=4, layer_index=1, noise_norms=[0.0, 2.0],
                        num_noise_vectors=1, seed=0, output_dir=str(tmp_path / "out"))
    run_dir = run_generate(cfg, loaded=tiny_llama)
    tokenizer = tiny_llama.tokenizer
    (gens,) = RunDir(run_dir).gens_files()
    planted = {}
    lines = [json.loads(x) for x in gens.read_bytes().split(b"\n") if x]
    for record, ch in zip(lines, SEPARATORS * 2, strict=True):  # a generation holding each
        text = f"fox{ch}dog"
        record["assistant_text"] = text
        record["response_token_ids"] = tokenizer(text, add_special_tokens=False)["input_ids"]
        planted[record["noise_scale"], record["prompt_index"]] = record
    gens.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines), "utf-8")

    out, skipped = run_eval(cfg, run_dir, loaded=tiny_llama)
    assert skipped == []
    scored = read_jsonl(out)
    assert len(scored) == 6
    for record in scored:
        source = planted[record["noise_scale"], record["prompt_index"]]
        assert record["assistant_text"] == source["assistant_text"]
        assert record["n_tokens"] == len(source["response_token_ids"])
        assert record["messages"][0]["content"] in prompts
        ids = source["prompt_token_ids"] + source["response_token_ids"]
        with torch.no_grad():  # oracle: one plain forward
            logits = tiny_llama.model(torch.tensor([ids])).logits[0].float()  # (T, V)
        start = len(source["prompt_token_ids"])
        expected = [torch.log_softmax(logits[t - 1], -1)[ids[t]].item()
                    for t in range(start, len(ids))]
        assert record["per_token_logprobs"] == pytest.approx(expected, abs=1e-4)
    before = out.read_bytes()
    assert run_eval(cfg, run_dir, loaded=tiny_llama)[1] == []  # a rerun reads it all back
    assert out.read_bytes() == before

    page = run_viz(run_dir, top_n=10).read_text("utf-8")
    assert not any(ch in page for ch in SEPARATORS[:2])  # escaped inside the script block
    start = page.index('type="application/json">') + len('type="application/json">')
    payload = json.loads(page[start:page.index("</script>", start)])
    assert {m["content"] for ex in payload["examples"] for m in ex["messages"]} == set(prompts)
    by_key = {(r["noise_id"], r["noise_scale"], r["prompt_index"]): r for r in scored}
    for ex in payload["examples"]:  # the generations' scores reach the page unchanged
        record = by_key[ex["noise_id"], ex["noise_scale"], ex["prompt_index"]]
        assert ex["per_token_logprobs"] == record["per_token_logprobs"]
        assert ex["tokens"] == record["tokens"]
    assert payload["n_records"] == len(read_jsonl(run_dir / EVAL_FILE)) == 6
