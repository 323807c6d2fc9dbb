"""The one rule every plug-in registry keeps (scorers, step optimizers, extractors): a name is taken once."""

from __future__ import annotations

from typing import Any


def register(registry: dict[str, Any], kind: str, name: str, value: Any) -> None:
    """``registry[name] = value``; a name already taken is a ``ValueError`` naming the ``kind``."""
    if name in registry:
        raise ValueError(f"{kind} {name!r} is registered twice")
    registry[name] = value
