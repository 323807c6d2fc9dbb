"""Identities derived from a spec's fields: every field is in the key unless it is marked as not
changing the result.

A cache or resume key listed by hand holds a new setting only if someone remembers to add it. Here the
key is the spec itself: :func:`identity_of` walks a frozen dataclass (nested ones included) and keeps
every field except those declared with :func:`runtime_field` — how the work is cut up or shown (batch
and chunk sizes, shard size, progress bars), the checks run on the result, the resolved config kept for
the record. A new field is therefore in the key by default; leaving it out is a decision written next
to its declaration.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

IDENTITY = "identity"


def runtime_field(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING) -> Any:
    """A spec field that does not change the result (left out of :func:`identity_of`)."""
    kw: dict[str, Any] = {"metadata": {IDENTITY: False}}
    if default is not dataclasses.MISSING:
        kw["default"] = default
    if default_factory is not dataclasses.MISSING:
        kw["default_factory"] = default_factory
    return dataclasses.field(**kw)


def identity_fields(spec: Any) -> list[dataclasses.Field]:
    """The fields of dataclass ``spec`` that are part of its identity."""
    return [f for f in dataclasses.fields(spec) if f.metadata.get(IDENTITY, True)]


def identity_of(value: Any) -> Any:
    """``value`` in plain JSON values, dataclasses reduced to their identity fields (recursively)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: identity_of(getattr(value, f.name)) for f in identity_fields(value)}
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, dict):
        return {str(k): identity_of(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [identity_of(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"{type(value).__name__} value {value!r} has no plain identity; give the spec plain fields")
