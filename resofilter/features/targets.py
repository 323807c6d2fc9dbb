"""Finding the weight matrices to score: ``<decoder layer i>.<module pattern>``."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from resofilter.errors import ConfigError


def resolve_indices(indices: Any, n_layers: int, key: str) -> list[int]:
    """Layer indices (``all`` or ints, negative from the end) as sorted non-negative ints."""
    if isinstance(indices, str):
        if indices != "all":
            raise ConfigError(key, f"expected `all` or a list of layer indices, got {indices!r}")
        return list(range(n_layers))
    if isinstance(indices, int):
        indices = [indices]
    if not isinstance(indices, Sequence) or not indices:  # a ListConfig is a Sequence
        raise ConfigError(key, f"expected `all` or a non-empty list of layer indices, got {indices!r}")
    out = []
    for i in indices:
        if not isinstance(i, int) or not -n_layers <= i < n_layers:
            raise ConfigError(key, f"layer index {i!r} out of range for a {n_layers}-layer model")
        out.append(i % n_layers)
    return sorted(set(out))


@dataclass(frozen=True)
class Target:
    name: str  # full HF module name, e.g. "model.layers.25.mlp.up_proj"
    layer: int
    module: torch.nn.Linear


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """(prefix, layers) of the decoder stack: the ModuleList of ``config.num_hidden_layers`` blocks."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and name.endswith("layers") and (n is None or len(mod) == n):
            return name, mod
    raise ConfigError("model", "cannot find the decoder layers (a ModuleList named *.layers)")


def find_targets(model: torch.nn.Module, patterns: Sequence[str], indices: Any,
                 key: str = "score.candidates") -> list[Target]:
    """Linear modules matching ``patterns`` (fnmatch within a layer) in the chosen layers, in order."""
    prefix, layers = decoder_layers(model)
    idx = resolve_indices(indices, len(layers), f"{key}.indices")
    targets: list[Target] = []
    for pattern in patterns:
        hits = 0
        for i in idx:
            for sub, mod in layers[i].named_modules():
                if sub and fnmatch.fnmatchcase(sub, pattern):
                    if not isinstance(mod, torch.nn.Linear):
                        kind = type(mod).__name__
                        raise ConfigError(f"{key}.modules", f"{prefix}.{i}.{sub} is a {kind}, not a Linear")
                    targets.append(Target(f"{prefix}.{i}.{sub}", i, mod))
                    hits += 1
        if not hits:
            example = sorted({s for s, m in layers[0].named_modules() if isinstance(m, torch.nn.Linear)})
            raise ConfigError(f"{key}.modules", f"pattern {pattern!r} matches no Linear module; a layer has {example}")
    targets.sort(key=lambda t: (t.layer, t.name))
    return targets
