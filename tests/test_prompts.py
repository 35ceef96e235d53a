"""Prompt sources and chat formatting."""

from __future__ import annotations

import json

import pytest

from residlab.prompts import (
    builtin_conversations,
    chat_messages,
    iter_conversations,
    prepare_prompts,
)

CONVERSATIONS = [
    [{"role": "user", "content": "first question"}, {"role": "assistant", "content": "a"},
     {"role": "user", "content": "second question"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}],
    [{"role": "assistant", "content": "no user turn at all"}],
    [{"role": "user", "content": "word " * 400}],
    [{"role": "user", "content": "short one"}],
]


def _write_jsonl(path):
    path.write_text("".join(json.dumps({"conversation": c}) + "\n" for c in CONVERSATIONS))
    return path


def test_first_user_turn_and_system_message():
    assert chat_messages(CONVERSATIONS[0]) == [{"role": "user", "content": "first question"}]
    assert chat_messages(CONVERSATIONS[1]) == [{"role": "system", "content": "be brief"},
                                               {"role": "user", "content": "hello there"}]
    assert chat_messages(CONVERSATIONS[0], "sys")[0] == {"role": "system", "content": "sys"}
    assert chat_messages(CONVERSATIONS[2]) is None


def test_builtin_set_is_varied_and_filtered(tiny_tokenizer):
    rows = list(builtin_conversations())
    assert 200 <= len(rows) <= 210
    prompts = prepare_prompts(tiny_tokenizer, iter(rows), num_prompts=1000, max_prompt_len=256)
    assert 0 < len(prompts) < len(rows)  # the very long ones are dropped
    assert all(len(p.token_ids) <= 256 for p in prompts)
    assert [p.index for p in prompts] == sorted(p.index for p in prompts)


def test_local_jsonl_and_parquet_keep_original_indices(tmp_path, tiny_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = _write_jsonl(tmp_path / "c.jsonl")
    pq.write_table(pa.table({"conversation": CONVERSATIONS}), tmp_path / "c.parquet")
    for path in (jsonl, tmp_path / "c.parquet"):
        prompts = prepare_prompts(tiny_tokenizer, iter_conversations(dataset_path=str(path)),
                                  num_prompts=10, max_prompt_len=64)
        assert [p.index for p in prompts] == [0, 1, 4]
        assert prompts[0].prompt_text.endswith("<|im_start|>assistant\n")
        assert tiny_tokenizer.decode(prompts[1].token_ids) == prompts[1].prompt_text
    shuffled = list(iter_conversations(dataset_path=str(jsonl), shuffle=True, seed=3))
    assert sorted(i for i, _ in shuffled) == [0, 1, 2, 3, 4]
    assert dict(shuffled)[1] == CONVERSATIONS[1]


def test_datasets_library_path_streams_with_indices(tmp_path, tiny_tokenizer):
    """The hub code path (datasets, streaming) run on a local folder of the same schema."""
    folder = tmp_path / "dataset"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl")
    rows = list(iter_conversations(dataset_name=str(folder), dataset_split="train"))
    assert [i for i, _ in rows] == [0, 1, 2, 3, 4]
    shuffled = list(iter_conversations(dataset_name=str(folder), shuffle=True, seed=1))
    assert sorted(i for i, _ in shuffled) == [0, 1, 2, 3, 4]
    prompts = prepare_prompts(tiny_tokenizer, iter(rows), num_prompts=2, max_prompt_len=64)
    assert [p.index for p in prompts] == [0, 1]


def test_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        list(iter_conversations(dataset_path=str(tmp_path / "missing.jsonl")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversation": []}\n{"nope": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        list(iter_conversations(dataset_path=str(bad)))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="jsonl or .parquet"):
        list(iter_conversations(dataset_path=str(tmp_path / "x.csv")))
