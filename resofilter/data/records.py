"""Loading SFT records from JSONL, JSON, parquet or a saved HF dataset.

Fields are mapped by config (``data.query_field`` …). Every record gets a stable
``sample_id``: the value of ``data.id_field`` when the data has one, else a hash of its
content plus its position in the file. The id travels through features, selection and
predictions, and ``Record.raw`` keeps the original row so a selected subset can be written
back in the input's own schema.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resofilter.errors import DataError

log = logging.getLogger(__name__)

FORMATS = ("auto", "jsonl", "json", "parquet", "hf_disk")


@dataclass(frozen=True)
class Record:
    """One SFT sample: ``query`` (+ optional ``input``) is the prompt, ``response`` the target."""

    sample_id: str
    query: str
    response: str
    input: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    source: str = field(default="", compare=False, repr=False)  # "file:line", for errors


def get_field(row: dict[str, Any], name: str) -> Any:
    """``row[name]``, where a dotted name (``meta.noise``) walks nested dicts. KeyError if absent."""
    value: Any = row
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(name)
        value = value[part]
    return value


# compressed text, read transparently: ending → opener (standard library only)
COMPRESSED = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma"}


def detect_format(path: Path) -> str:
    """By ending; a compression ending (``.jsonl.gz``) is looked through."""
    if path.is_dir():
        return "hf_disk"
    suffixes = path.suffixes[:-1] if path.suffix in COMPRESSED else path.suffixes
    suffix = suffixes[-1] if suffixes else ""
    return {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}.get(suffix, "jsonl")


def open_text(path: Path) -> Any:
    """A text handle on ``path``, decompressing ``.gz`` / ``.bz2`` / ``.xz``."""
    import importlib

    if path.suffix in COMPRESSED:
        return importlib.import_module(COMPRESSED[path.suffix]).open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_rows(path: str | Path, fmt: str = "auto") -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_or_position, row)``; line numbers are 1-based for JSONL."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, "file not found")
    if fmt not in FORMATS:
        raise DataError(path, None, f"unknown format {fmt!r}; expected one of {FORMATS}")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if path.is_dir() and fmt == "hf_disk" and not any((path / f).exists() for f in _HF_DISK_MARKERS):
        raise DataError(path, None, "is a directory but not a `datasets.save_to_disk` one (no dataset_info.json, "
                        "state.json or dataset_dict.json): point data.path at a file or a saved dataset")
    if fmt == "jsonl":
        with open_text(path) as f:
            for lineno, line in _lines(f, path):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(path, lineno, f"malformed JSON: {e.msg} (column {e.colno})") from None
                if not isinstance(row, dict):
                    raise DataError(path, lineno, f"expected a JSON object, got {type(row).__name__}")
                yield lineno, row
    elif fmt == "json":
        try:
            with open_text(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(path, e.lineno, f"malformed JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(data, list):
            raise DataError(path, None, "expected a JSON list of objects")
        for i, row in enumerate(data, start=1):
            if not isinstance(row, dict):
                raise DataError(path, None, f"item {i}: expected a JSON object")
            yield i, row
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield i, row
    else:  # hf_disk
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            raise DataError(path, None, f"a DatasetDict ({list(ds)}); point at one split")
        for i, row in enumerate(ds, start=1):
            yield i, dict(row)


_HF_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def _lines(f: Any, path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line); undecodable bytes or a corrupt archive become a DataError naming the file/line."""
    lineno = 0
    try:
        for lineno, line in enumerate(f, start=1):  # noqa: B007 - lineno is read in the except
            yield lineno, line
    except (UnicodeDecodeError, OSError, EOFError) as e:
        raise DataError(path, lineno + 1, f"cannot read: {e}") from None


def _text(row: dict[str, Any], name: str, path: Path, line: int, required: bool) -> str | None:
    try:
        value = get_field(row, name)
    except KeyError:
        if required:
            raise DataError(path, line, f"missing field {name!r} (has: {sorted(row)})") from None
        return None
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise DataError(path, line, f"field {name!r} must be a string, got {type(value).__name__}")
    return value


_INVISIBLE = {"\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad"}  # zero-width, BOM, soft hyphen


def visible(text: str) -> bool:
    """Any character left after removing Unicode whitespace and zero-width characters."""
    return any(not ch.isspace() and ch not in _INVISIBLE for ch in text)


def content_id(query: str, input_: str | None, response: str, position: int) -> str:
    digest = hashlib.sha1("\x1f".join([query, input_ or "", response]).encode()).hexdigest()
    return f"{digest[:12]}-{position}"


def load_records(
    path: str | Path,
    query_field: str = "query",
    response_field: str = "response",
    input_field: str | None = None,
    id_field: str | None = None,
    format: str = "auto",
    max_samples: int | None = None,
) -> list[Record]:
    """Read, validate and map every row of ``path`` into a :class:`Record`.

    Raises :class:`DataError` naming the file and line for malformed JSON, missing or
    non-string fields, empty responses or queries, duplicate ids and empty files.
    """
    path = Path(path)
    return records_from_rows(iter_rows(path, format), path, query_field, response_field, input_field, id_field,
                             max_samples)


def hf_rows(name: str, config: str | None, split: str, revision: str | None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows of a ``datasets.load_dataset`` split: a hub name (from the local cache when offline,
    ``HF_DATASETS_OFFLINE=1``) or a local dataset directory / loading script."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split, revision=revision)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds (connection, missing split, script errors)
        raise DataError(name, None, f"datasets.load_dataset({name!r}, {config!r}, split={split!r}, "
                        f"revision={revision!r}) failed: {type(e).__name__}: {e}") from None
    for i, row in enumerate(ds, start=1):
        yield i, dict(row)


def load_hf_records(name: str, config: str | None, split: str, revision: str | None, query_field: str = "query",
                    response_field: str = "response", input_field: str | None = None, id_field: str | None = None,
                    max_samples: int | None = None) -> list[Record]:
    """:func:`load_records` for ``data.hf_name``: errors name ``<name>[<split>]:<row>``."""
    where = Path(f"{name}[{split}]")
    return records_from_rows(hf_rows(name, config, split, revision), where, query_field, response_field,
                             input_field, id_field, max_samples)


def records_from_rows(rows: Iterable[tuple[int, dict[str, Any]]], path: Path, query_field: str,
                      response_field: str, input_field: str | None, id_field: str | None,
                      max_samples: int | None) -> list[Record]:
    """Validate and map ``(line, row)`` pairs into records; ``path`` names them in errors."""
    records: list[Record] = []
    seen: dict[str, int] = {}
    for line, row in rows:
        query = _text(row, query_field, path, line, required=True)
        response = _text(row, response_field, path, line, required=True)
        input_ = _text(row, input_field, path, line, required=False) if input_field else None
        assert query is not None and response is not None
        if not visible(response):
            raise DataError(path, line, f"empty response in field {response_field!r} (nothing but whitespace "
                            "or zero-width characters)")
        if not visible(query):
            raise DataError(path, line, f"empty query in field {query_field!r}")
        if id_field:
            try:
                raw_id = get_field(row, id_field)
            except KeyError:
                raise DataError(path, line, f"missing id field {id_field!r}") from None
            if not isinstance(raw_id, (str, int)) or isinstance(raw_id, bool):
                raise DataError(path, line, f"id field {id_field!r} must be a string or int")
            sample_id = str(raw_id)
        else:
            sample_id = content_id(query, input_, response, len(records))
        if sample_id in seen:
            raise DataError(
                path, line, f"duplicate sample id {sample_id!r} (first seen at line {seen[sample_id]})"
            )
        seen[sample_id] = line
        records.append(Record(sample_id, query, response, input_, row, f"{path}:{line}"))
        if max_samples is not None and len(records) >= max_samples:
            break
    if not records:
        raise DataError(path, None, "no records (empty file)")
    log.info("loaded %d records from %s", len(records), path)
    return records


def normalize_query(text: str) -> str:
    """Lower-case, collapse whitespace, drop punctuation: the key of ``dedup=normalized``."""
    kept = "".join(ch for ch in text.lower() if ch.isalnum() or ch.isspace())
    return " ".join(kept.split())


def dedup_records(records: list[Record], mode: str | None) -> tuple[list[Record], int]:
    """Keep the first record of each query (``exact`` or ``normalized``); return (kept, removed).

    The authors' code deduplicates by query text; order is preserved.
    """
    if mode in (None, "none", False):
        return records, 0
    if mode not in ("exact", "normalized"):
        from resofilter.errors import ConfigError

        raise ConfigError("dedup", f"unknown dedup mode {mode!r}; expected none|exact|normalized")
    key = (lambda r: r.query) if mode == "exact" else (lambda r: normalize_query(r.query))
    seen: set[str] = set()
    kept = []
    for r in records:
        k = key(r)
        if k in seen:
            continue
        seen.add(k)
        kept.append(r)
    return kept, len(records) - len(kept)


def record_hashes(records: list[Record]) -> dict[str, str]:
    """sample_id → a hash of the record's text (query, input, response): what ``select`` checks
    a features file against, so features are never applied to other records under the same ids."""
    from resofilter._io import stable_hash

    return {r.sample_id: stable_hash([r.sample_id, r.query, r.input, r.response]) for r in records}
