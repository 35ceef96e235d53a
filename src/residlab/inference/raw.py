"""Raw activation files: one safetensors file per prompt, written atomically.

Tensor names are ``{part}.layer{L}.{component}`` with part ``prompt`` / ``response`` and
component ``residual`` / ``attn_contribution`` / ``mlp_contribution``, each
``[n_tokens, d_model]``. Token metadata (text, tokens, token ids, prompt_end, a hash of all the
token ids, the model's layer count) sits in the header under ``residlab``. :func:`contents`
says what a file holds from its header alone (the tensors present are the truth, not what the
run asked for). :func:`load_raw` returns the seed's nested structure and also reads
seed-format ``.pt`` files (with ``weights_only=True`` only).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from residlab.errors import NotFound
from residlab.store import atomic_path

__all__ = ["FORMAT", "Contents", "contents", "is_complete", "load_raw", "read_parts",
           "save_raw", "tensor_name", "token_hash"]

FORMAT = "residlab.raw/1"
PARTS = ("prompt", "response")
DTYPE_NAMES = {"BF16": "bf16", "F16": "fp16", "F32": "fp32",  # safetensors -> ours
               "torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}


def tensor_name(part: str, layer: int, component: str) -> str:
    return f"{part}.layer{layer}.{component}"


def save_raw(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write tensors + metadata to ``path`` via a temp file and rename."""
    from safetensors.torch import save_file

    header = {"residlab": json.dumps({"format": FORMAT, **meta}, ensure_ascii=False)}
    with atomic_path(path) as temp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(temp), metadata=header)


def token_hash(token_ids: Sequence[int]) -> str:
    """sha256 of a token id list: tells whether a capture was made over these very tokens."""
    return hashlib.sha256(json.dumps(list(token_ids), separators=(",", ":")).encode()).hexdigest()


def _complete_header(path: Path) -> dict | None:
    """The parsed header when it parses and the file size matches the tensors it declares."""
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        return header if path.stat().st_size == 8 + length + max(ends, default=0) else None
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None


def is_complete(path: Path) -> bool:
    """True when the file's header parses and its size matches the tensors it declares."""
    return _complete_header(path) is not None


@dataclass(frozen=True)
class Contents:
    """What one capture file holds: tensor names and dtypes from the header, token facts from
    its metadata (``None`` where an older file does not say)."""

    names: frozenset[str]
    dtypes: frozenset[str]  # "bf16" / "fp16" / "fp32"
    prompt_end: int | None
    token_sha: str | None  # token_hash of prompt + response ids
    n_layers: int | None  # the model's layer count
    family: str | None

    def _split(self) -> list[tuple[str, int, str]]:
        out = []
        for name in self.names:
            part, layer, component = name.split(".")
            out.append((part, int(layer.removeprefix("layer")), component))
        return out

    @property
    def parts(self) -> list[str]:
        return sorted({part for part, _, _ in self._split()})

    @property
    def pairs(self) -> frozenset[tuple[int, str]]:
        """Every (layer, component) held in at least one part."""
        return frozenset((layer, component) for _, layer, component in self._split())

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.pairs})

    @property
    def components(self) -> list[str]:
        return sorted({component for _, component in self.pairs})

    @property
    def response_only(self) -> bool:
        return "prompt" not in self.parts


def _meta_token_sha(meta: dict) -> str | None:
    if meta.get("token_ids_sha256"):
        return meta["token_ids_sha256"]
    parts = meta.get("parts", {})
    if "prompt" in parts and "response" in parts:  # older files: both id lists are there
        return token_hash(parts["prompt"]["token_ids"] + parts["response"]["token_ids"])
    return None


def contents(path: Path) -> Contents | None:
    """What ``path`` holds (header only for safetensors); ``None`` if missing or truncated."""
    if path.suffix == ".pt":
        return _pt_contents(path) if path.is_file() else None
    header = _complete_header(path)
    if header is None:
        return None
    try:
        meta = json.loads((header.get("__metadata__") or {}).get("residlab", "{}"))
    except json.JSONDecodeError:
        meta = {}
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    return Contents(frozenset(tensors), frozenset(DTYPE_NAMES.get(v["dtype"], v["dtype"])
                                                  for v in tensors.values()),
                    meta.get("prompt_end"), _meta_token_sha(meta), meta.get("n_layers"),
                    meta.get("family"))


def _pt_contents(path: Path) -> Contents:
    raw = load_raw(path)
    names, dtypes = set(), set()
    for part in PARTS:
        for layer, comps in raw.get(part, {}).get("activations", {}).items():
            for component, tensor in comps.items():
                names.add(tensor_name(part, layer, component))
                dtypes.add(DTYPE_NAMES.get(str(tensor.dtype), str(tensor.dtype)))
    prompt_ids = raw.get("prompt", {}).get("token_ids")
    response_ids = raw.get("response", {}).get("token_ids")
    sha = token_hash(prompt_ids + response_ids) if prompt_ids is not None and (
        response_ids is not None) else None
    return Contents(frozenset(names), frozenset(dtypes),
                    len(prompt_ids) if prompt_ids is not None else None, sha, None, None)


def _corrupt(path: Path, why: str) -> ValueError:
    return ValueError(f"{path} is corrupted or truncated ({why}); rerun capture with "
                      "--skip-existing to redo it")


def _load_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    if not is_complete(path):
        raise _corrupt(path, "size does not match its header")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {})["residlab"])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises its own error types
        raise _corrupt(path, " ".join(str(error).split())[:120]) from None
    out: dict[str, Any] = {}
    for part in PARTS:
        if part not in meta.get("parts", {}):
            continue
        info = meta["parts"][part]
        activations: dict[int, dict[str, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            prefix, layer, component = name.split(".")
            if prefix == part:
                activations.setdefault(int(layer.removeprefix("layer")), {})[component] = tensor
        out[part] = {**info, "activations": dict(sorted(activations.items()))}
    out["metadata"] = {k: v for k, v in meta.items() if k != "parts"}
    return out


def read_parts(path: Path, layer: int, component: str) -> tuple[str, dict[str, torch.Tensor]]:
    """The metadata (unparsed JSON) and only the ``{part: [n, d]}`` tensors of one
    (layer, component): projection reads what it needs instead of the whole file."""
    from safetensors import safe_open

    if path.suffix == ".pt":
        raw = load_raw(path)
        return json.dumps(raw.get("metadata", {})), {
            part: raw[part]["activations"][layer][component]
            for part in PARTS if part in raw and layer in raw[part]["activations"]}
    try:  # safe_open itself rejects files whose size does not match their header
        with safe_open(str(path), framework="pt") as handle:
            meta = (handle.metadata() or {})["residlab"]
            names = set(handle.keys())  # noqa: SIM118
            tensors = {part: handle.get_tensor(tensor_name(part, layer, component))
                       for part in PARTS if tensor_name(part, layer, component) in names}
    except Exception as error:  # safetensors raises its own error types
        raise _corrupt(path, " ".join(str(error).split())[:120]) from None
    return meta, tensors


def load_raw(path: str | Path) -> dict[str, Any]:
    """``{'prompt': {'text', 'tokens', 'token_ids', 'activations': {layer: {component:
    Tensor[n, d]}}}, 'response': {...}, 'metadata': {...}}`` from a capture file."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"{path} not found; run 'residlab capture' first")
    if path.suffix == ".pt":
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many types for bad files
            raise _corrupt(path, " ".join(str(error).split())[:120]) from None
    return _load_safetensors(path)
