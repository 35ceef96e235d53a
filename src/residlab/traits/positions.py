"""Position specs: which tokens of an example are pooled into one activation vector.

``response[:5]`` (first five response tokens), ``response`` (all of them), ``prompt[-1]``
(the prompt's last token), ``all`` (every token), or any Python slice / index on ``prompt``
or ``response``. Pooling is the mean over the selected tokens.
"""

from __future__ import annotations

import re

import torch

from residlab.errors import UsageError

__all__ = ["parse_position", "pool", "position_slug"]

_SPEC = re.compile(r"^(prompt|response|all)(?:\[(-?\d*)(?::(-?\d*))?\])?$")


def parse_position(spec: str) -> tuple[str, slice]:
    match = _SPEC.match(spec.replace(" ", ""))
    if not match:
        raise UsageError(f"position {spec!r} not understood; use e.g. response[:5], response, "
                         "prompt[-1] or all")
    part, start, stop = match.groups()
    if "[" not in spec:
        return part, slice(None)
    if stop is None and ":" not in spec:  # a single index
        index = int(start)
        return part, slice(index, index + 1 if index != -1 else None)
    return part, slice(int(start) if start else None, int(stop) if stop else None)


def position_slug(spec: str) -> str:
    """A folder name for a position spec: ``response[:5]`` -> ``response[:5]`` made safe."""
    return spec.replace(" ", "").replace("[", "_").replace("]", "").replace(":", "_")


def pool(prompt: torch.Tensor, response: torch.Tensor, spec: str) -> torch.Tensor:
    """Mean of the selected rows of ``prompt`` ``(n_p, ...)`` / ``response`` ``(n_r, ...)``."""
    part, selection = parse_position(spec)
    tokens = {"prompt": prompt, "response": response,
              "all": torch.cat([prompt, response])}[part][selection]
    if tokens.shape[0] == 0:
        raise UsageError(f"position {spec!r} selects no token of this example")
    return tokens.float().mean(dim=0)
