"""Raw activation files: one safetensors file per prompt, written atomically.

Tensor names are ``{part}.layer{L}.{component}`` with part ``prompt`` / ``response`` and
component ``residual`` / ``attn_contribution`` / ``mlp_contribution``, each
``[n_tokens, d_model]``. Token metadata (text, tokens, token ids, prompt_end) sits in the
header under ``residlab``. :func:`load_raw` returns the seed's nested structure and also reads
seed-format ``.pt`` files (with ``weights_only=True`` only).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch

from residlab.errors import NotFound
from residlab.store import atomic_path

__all__ = ["FORMAT", "is_complete", "load_raw", "read_parts", "save_raw", "tensor_name"]

FORMAT = "residlab.raw/1"
PARTS = ("prompt", "response")


def tensor_name(part: str, layer: int, component: str) -> str:
    return f"{part}.layer{layer}.{component}"


def save_raw(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write tensors + metadata to ``path`` via a temp file and rename."""
    from safetensors.torch import save_file

    header = {"residlab": json.dumps({"format": FORMAT, **meta}, ensure_ascii=False)}
    with atomic_path(path) as temp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(temp), metadata=header)


def is_complete(path: Path) -> bool:
    """True when the file's header parses and its size matches the tensors it declares."""
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        return path.stat().st_size == 8 + length + max(ends, default=0)
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return False


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
