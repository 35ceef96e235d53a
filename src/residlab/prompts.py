"""Prompt sources in the lmsys-chat-1m schema and chat formatting.

A source yields ``(original_index, conversation)`` where a conversation is a list of
``{"role", "content"}`` messages. We keep the first user turn (as the seed does), optionally
behind a system message, apply the model's chat template with ``add_generation_prompt=True``,
drop prompts longer than ``max_prompt_len`` tokens and stop after ``num_prompts``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from residlab.errors import UsageError
from residlab.store import BadLine, parse_jsonl

__all__ = [
    "BUILTIN",
    "ChatPrompt",
    "builtin_conversations",
    "chat_messages",
    "iter_conversations",
    "prepare_prompts",
    "template_ids",
]

BUILTIN = "builtin"


@dataclass(frozen=True)
class ChatPrompt:
    """One templated prompt ready for generation."""

    index: int  # position in the source dataset
    messages: list[dict[str, str]]
    prompt_text: str
    token_ids: list[int]

    def to_json(self) -> dict[str, Any]:
        return {"prompt_index": self.index, "messages": self.messages,
                "prompt_text": self.prompt_text, "prompt_token_ids": self.token_ids}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> ChatPrompt:
        return cls(record["prompt_index"], record["messages"], record["prompt_text"],
                   record["prompt_token_ids"])


def _jsonl(path: Path, data: bytes) -> Iterator[tuple[int, list]]:
    """Conversations of a JSONL file, indexed by line (lines split on "\n" only)."""
    for item in parse_jsonl(data, path):
        if isinstance(item, BadLine):
            raise UsageError(f"{path}:{item.line}: not valid JSON ({item.reason}); fix or "
                             "remove that line")
        line_no, record = item
        yield line_no - 1, _conversation(record, f"{path}:{line_no}")


def _conversation(record: Any, where: str) -> list:
    conversation = record.get("conversation") if isinstance(record, dict) else None
    if not isinstance(conversation, list):
        raise UsageError(f"{where}: expected a 'conversation' list of {{role, content}} messages")
    return conversation


def builtin_conversations() -> Iterator[tuple[int, list]]:
    """The prompt set shipped with residlab (about 200 varied user prompts)."""
    data = resources.files("residlab").joinpath("data/builtin_prompts.jsonl").read_bytes()
    yield from _jsonl(Path("builtin_prompts.jsonl"), data)


def _local(path: Path) -> Iterator[tuple[int, list]]:
    if not path.is_file():
        raise UsageError(f"dataset_path {str(path)!r} not found; give a .jsonl or .parquet file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            column = pq.read_table(path, columns=["conversation"]).column("conversation")
        except (KeyError, OSError, ValueError) as error:
            raise UsageError(f"{path}: cannot read a 'conversation' column ({error})") from None
        for index, conversation in enumerate(column.to_pylist()):
            yield index, _conversation({"conversation": conversation}, f"{path} row {index}")
        return
    if path.suffix not in (".jsonl", ".json"):
        raise UsageError(f"dataset_path {str(path)!r}: use a .jsonl or .parquet file")
    yield from _jsonl(path, path.read_bytes())


def _hub(name: str, split: str, shuffle: bool, seed: int) -> Iterator[tuple[int, list]]:
    """Stream a hub dataset so only the rows we use are downloaded."""
    import datasets

    try:
        stream = datasets.load_dataset(name, split=split, streaming=True)
        stream = stream.map(lambda row, index: {"_index": index}, with_indices=True)
        if shuffle:
            stream = stream.shuffle(seed=seed, buffer_size=10_000)
        for row in stream:
            yield row["_index"], _conversation(row, f"{name} row {row['_index']}")
    except datasets.exceptions.DatasetNotFoundError:
        raise UsageError(
            f"dataset {name!r} not found or not accessible; log in with access, set "
            "dataset_path to a local file, or drop dataset_name for the built-in prompts"
        ) from None
    except (OSError, ConnectionError) as error:
        raise UsageError(
            f"cannot reach dataset {name!r} ({' '.join(str(error).split())[:120]}); point "
            "dataset_path at a local .parquet/.jsonl copy, or drop dataset_name to use the "
            "built-in prompts"
        ) from None


def iter_conversations(
    *, dataset_name: str | None = None, dataset_path: str | None = None,
    dataset_split: str = "train", shuffle: bool = False, seed: int = 0,
) -> Iterator[tuple[int, list]]:
    """Conversations from a local file, a hub dataset, or the built-in set (in that order).

    Indices are positions in the source, kept through ``shuffle``.
    """
    if dataset_path:
        source = _local(Path(dataset_path).expanduser())
    elif dataset_name and dataset_name != BUILTIN:
        return _hub(dataset_name, dataset_split, shuffle, seed)
    else:
        source = builtin_conversations()
    if shuffle:
        import random

        rows = list(source)
        random.Random(seed).shuffle(rows)
        return iter(rows)
    return source


def chat_messages(conversation: list, system_prompt: str | None = None) -> list[dict] | None:
    """First user turn (behind a system message if any), or None when there is none."""
    system = system_prompt
    for message in conversation:
        if not isinstance(message, dict):
            return None
        if message.get("role") == "system" and system is None:
            system = message.get("content")
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            first = [{"role": "user", "content": message["content"]}]
            return ([{"role": "system", "content": system}] if system else []) + first
    return None


def template_ids(tokenizer, messages: list[dict]) -> tuple[str, list[int]]:
    """Chat-templated prompt text and its token ids (the template adds special tokens)."""
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("this tokenizer has no chat template; use a chat/instruct model")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text, list(ids)


def prepare_prompts(
    tokenizer, conversations: Iterable[tuple[int, list]], *, num_prompts: int,
    max_prompt_len: int, system_prompt: str | None = None,
) -> list[ChatPrompt]:
    """The first ``num_prompts`` conversations that fit in ``max_prompt_len`` tokens."""
    prompts: list[ChatPrompt] = []
    for index, conversation in conversations:
        messages = chat_messages(conversation, system_prompt)
        if messages is None:
            continue
        text, ids = template_ids(tokenizer, messages)
        if len(ids) > max_prompt_len:
            continue
        prompts.append(ChatPrompt(index, messages, text, ids))
        if len(prompts) == num_prompts:
            break
    return prompts
