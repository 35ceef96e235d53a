"""How much a capture batch may hold, and handing freed memory back between batches.

The default capture batch is a memory budget divided by an estimate of what one prompt holds
during the forward (:func:`default_batch_size`); after each batch the freed heap goes back to
the system (:func:`release_memory`), so peak memory stays that of one batch however many
prompts a set has.
"""

from __future__ import annotations

import ctypes
import functools
import sys

import torch

from residlab.arch import Arch

__all__ = ["CPU_BATCH_TOKENS", "CPU_BUDGET", "MAX_BATCH", "default_batch_size",
           "release_memory"]

CPU_BUDGET = 256 * 2**20  # bytes a capture batch may hold on CPU
CPU_BATCH_TOKENS = 512  # tokens a batch on CPU: larger batches measured no faster, often slower
MAX_BATCH = 64


def _available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); ``None`` where it cannot be read."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _budget(device: torch.device) -> tuple[int, str]:
    """Bytes one capture batch may hold on ``device``, and where that number comes from."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2, f"half of the {free / 2**30:.1f} GiB free on {device}"
    available = _available_bytes()
    if available is not None and available // 4 < CPU_BUDGET:
        return available // 4, f"a quarter of the {available / 2**30:.1f} GiB available"
    return CPU_BUDGET, f"the {CPU_BUDGET >> 20} MiB CPU cap"


def _prompt_bytes(model, arch: Arch, tokens: int, captured: int) -> int:
    """Bytes one prompt of ``tokens`` tokens needs during the forward: ``captured`` (T, D)
    slices kept until written, plus the model's own activations (residual, MLP hidden and
    attention scores of one layer at a time, with slack)."""
    config = model.config
    width = arch.d_model
    hidden = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    element = torch.empty((), dtype=getattr(model, "dtype", torch.float32)).element_size()
    per_token = captured * width + 8 * width + 3 * (hidden or 4 * width) + heads * tokens
    return tokens * per_token * element


def default_batch_size(model, arch: Arch, *, tokens: int, captured: int,
                       limit: int = MAX_BATCH) -> tuple[int, str]:
    """The capture batch for prompts of at most ``tokens`` tokens capturing ``captured``
    (layer, component) pairs, and a sentence saying why.

    As many prompts as fit a memory budget (CUDA: half the free device memory; CPU: 256 MiB,
    or a quarter of available memory if less), at most ``limit`` and 64. On CPU also at most
    512 tokens a batch: on one or two cores, batches of 16 x 48 tokens ran as slowly as batch 1
    and 8 x 48 ~1.4x faster; at 250 tokens a prompt every batch size ran alike."""
    device = next(model.parameters()).device
    budget, source = _budget(device)
    need = _prompt_bytes(model, arch, tokens, captured)
    bounds = {f"memory: {budget / 2**20:.0f} MiB ({source}) / ~{need / 2**20:.1f} MiB a prompt "
              f"of up to {tokens} tokens with {captured} captured (layer, component) pairs":
              budget // need, f"{limit} prompts to capture": limit, "the cap": MAX_BATCH}
    if device.type != "cuda":
        bounds[f"{CPU_BATCH_TOKENS} tokens a batch on CPU"] = CPU_BATCH_TOKENS // tokens
    why, batch = min(bounds.items(), key=lambda item: item[1])
    return max(1, batch), f"bound by {why}"


def release_memory() -> None:
    """Hand the heap pages freed by a batch back to the system (glibc only).

    glibc keeps freed blocks of a few MiB in its heap, and batches of growing lengths do not
    fit in the holes of the shorter ones: over 80 prompts the peak crept up to ~50 MiB above
    that of 10 prompts (at HEAD, holding more, by GiBs), and a finished capture left ~1 GiB
    mapped with no tensor alive. Trimming costs 2-11 ms a batch of ~1 s on CPU."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl) or no libc found
        return None
