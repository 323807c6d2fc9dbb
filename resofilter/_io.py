"""Atomic file output, hashing and run manifests.

Every file a stage produces is written to a temporary name in the same directory and
renamed into place, so an interrupted run never leaves a half-written output behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike[str]) -> None:
    """Give a file 0666 (a directory 0777) minus the umask, as ``open``/``mkdir`` would.

    ``tempfile`` creates private files (0600) and dirs (0700); outputs renamed from them
    must be as readable as any other file the user writes (shared clusters read results).
    """
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~_umask())


def temporary_dir(final: str | os.PathLike[str]) -> Path:
    """A fresh hidden directory beside ``final`` (``.<name>.XXXX``) to be renamed onto it when complete."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    follow_umask(tmp)
    return tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        follow_umask(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_jsonl_atomic(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> int:
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n")
            n += 1
    return n


def write_parquet_atomic(path: str | os.PathLike[str], frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def write_npy_atomic(path: str | os.PathLike[str], array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_jsonl(path: str | os.PathLike[str]) -> list[Any]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def stable_hash(obj: Any, length: int = 16) -> str:
    """SHA-256 of a canonical JSON rendering of ``obj`` (dict order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:length]


def file_hash(path: str | os.PathLike[str], length: int = 16) -> str:
    """SHA-256 of a file's bytes (or of every file under a directory, by relative path)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        if path.is_dir():
            h.update(str(p.relative_to(path)).encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:length]


def git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
            timeout=5,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def environment_info() -> dict[str, Any]:
    """Versions and machine facts for a manifest."""
    from resofilter.environment import package_version

    versions = {pkg: package_version(pkg) for pkg in ("resofilter", "torch", "transformers", "peft",
                                                       "pytorch-lightning", "hydra-core")}
    return {
        "versions": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_revision": git_revision(),
        "created_unix": time.time(),
    }


LOCK_FILE = ".resofilter.lock"


@contextlib.contextmanager
def output_lock(out_dir: str | os.PathLike[str], stage: str, wait: bool = False) -> Iterator[None]:
    """One writer per output directory: an exclusive ``flock`` on ``<out>/.resofilter.lock``.

    The file holds the holder (pid, host, stage, since). ``wait=False``: a second process gets
    a :class:`ResoFilterError` naming the holder at once; ``wait=True`` (a shared cache): it
    waits for the holder to finish, then carries on (and finds its work done). The lock goes
    with the process, so a killed holder never leaves a stale lock behind.
    """
    import fcntl
    import logging
    import socket

    from resofilter.errors import ResoFilterError

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    f = open(out_dir / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the stage
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown holder"
            if not wait:
                raise ResoFilterError(f"{out_dir} is being written by another resofilter process ({holder}); "
                                      "wait for it to finish or use another output_dir") from None
            logging.getLogger(__name__).info("waiting for %s, which holds %s", holder, out_dir)
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "stage": stage,
                            "since": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        f.flush()
        yield
    finally:
        f.close()  # releases the lock


def remove_orphans(directory: str | os.PathLike[str], patterns: Iterable[str]) -> list[Path]:
    """Delete the temporaries a killed run left (``.name.XXXX.tmp`` files, ``.name.XXXX`` dirs).

    Call it only while holding the directory (its lock, or as its only writer).
    """
    import shutil

    removed = []
    for pattern in patterns:
        for p in Path(directory).glob(pattern):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            removed.append(p)
    return removed


# files of a model directory whose bytes are the model (weights, adapters, architecture)
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
MODEL_FILE_NAMES = ("config.json", "adapter_config.json")


def model_fingerprint(model: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None) -> str:
    """A content hash of a model: SHA-256 over its config and weight files (name + bytes), so a checkpoint
    overwritten at the same path with new values of the same shapes gets a new fingerprint.

    Computed once per file state: the digest is cached under ``<cache_dir>/fingerprints/`` keyed by the
    directory's absolute path, with each file's size and mtime; a file whose size or mtime changed is
    hashed again (``cache_dir=None``: hashed every time). A snapshot of the Hugging Face cache is named by
    its commit (``hub:<id>@<commit>``, ``models/hub.py``: the hub's files of one commit do not change); a
    name that is no local directory is its own fingerprint (``name:<id>``: runs resolve hub ids to snapshots
    before this is asked).
    """
    from resofilter.models.hub import hub_identity

    path = Path(model)
    if not path.is_dir():
        return f"name:{model}"
    if (hub := hub_identity(path)) is not None:
        return hub
    files = sorted(p for p in path.iterdir() if p.is_file() and (p.suffix in MODEL_FILE_SUFFIXES or
                                                                   p.name in MODEL_FILE_NAMES))
    state = [[p.name, (st := p.stat()).st_size, st.st_mtime_ns] for p in files]
    memo = None if cache_dir is None else Path(cache_dir) / "fingerprints" / f"{stable_hash(str(path.resolve()))}.json"
    if memo is not None and memo.exists():
        known = read_json(memo)
        if known.get("files") == state:
            return known["sha256"]
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    digest = h.hexdigest()
    if memo is not None:
        write_json_atomic(memo, {"model": str(path.resolve()), "files": state, "sha256": digest})
    return digest
