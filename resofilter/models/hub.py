"""Hub models by revision: a hub id resolves to the local snapshot of one commit, and that commit is its identity.

A model named by its hub id (``google/gemma-2-2b``) is resolved, before anything loads it, to the snapshot
directory the Hugging Face cache keeps for one commit (``…/models--google--gemma-2-2b/snapshots/<commit>``):
``model.revision`` (a commit, tag or branch; null: ``main``) picks it. Cached files are used first, without
the network — the only way under ``HF_HUB_OFFLINE=1`` —, else the snapshot is downloaded. Everything after
reads that directory, and :func:`hub_identity` names it ``hub:<id>@<commit>``: the features and fine-tunes
cached for one commit are not reused for another when the hub's files change.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from resofilter.errors import ResoFilterError

# the files a causal LM and its tokenizer load from (a snapshot also holds .bin/.h5/.onnx copies nobody reads)
MODEL_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})/?$")


def is_hub_id(name: str) -> bool:
    """``org/name`` that is no existing local path and no relative one (``./x``, ``../x``): a hub repository id."""
    return (bool(re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", name)) and not name.startswith(("./", "../"))
            and not Path(name).exists())


def resolve_hub_model(repo_id: str, revision: str | None, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The local snapshot directory of ``repo_id`` at ``revision`` (null: ``main``), from the cache when it holds
    it, else downloaded (an error naming the model when offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise ResoFilterError(f"{repo_id}@{revision or 'main'} is not in the Hugging Face cache and HF_HUB_OFFLINE is "
                              "set: download it where the hub is reachable (`huggingface-cli download "
                              f"{repo_id}{' --revision ' + revision if revision else ''}`), or point "
                              "model.name_or_path at a local directory")
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=MODEL_PATTERNS))
    except Exception as e:  # noqa: BLE001 - network, auth, unknown revision: one message naming the model
        raise ResoFilterError(f"cannot fetch {repo_id}@{revision or 'main'} from the hub: {type(e).__name__}: {e}"
                              ) from None


def hub_identity(path: str | os.PathLike[str]) -> str | None:
    """``hub:<org>/<name>@<commit>`` for a snapshot directory of the Hugging Face cache, else ``None``."""
    m = _SNAPSHOT.search(Path(path).resolve().as_posix())
    return f"hub:{m['org']}/{m['name']}@{m['commit']}" if m else None
