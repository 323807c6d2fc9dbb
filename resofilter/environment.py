"""What the numbers of a build or a run depend on besides the code and the config: package versions,
the CPU code path torch's kernels take, and the thread count.

float32 kernels differ by instruction set (oneMKL and ATen pick code paths by CPU capability), so the
same commit builds a slightly different embedded base model on another machine, and fine-tuned
accuracies follow it (experiments/README.md). Every ``build.json`` and ``results.json`` records this, and
``resofilter table`` warns when the runs it merges differ in it.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any

# the packages that can change numbers (kernels, tokenization, schedules, sampling of data order)
PACKAGES = ("torch", "transformers", "tokenizers", "pytorch-lightning", "numpy", "peft", "safetensors", "scipy")
# what `table` compares between runs (the machine's name and the Python patch level are recorded, not compared)
COMPARED = ("packages", "torch_cpu_capability", "torch_threads", "machine", "cpu")


def cpu_model() -> str | None:
    """The CPU's model name (``/proc/cpuinfo``; oneMKL takes other code paths on other vendors' CPUs of the
    same instruction set), None where it cannot be read."""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name``, None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """This process's numeric environment, JSON-ready."""
    import torch

    return {
        "packages": {name: package_version(name) for name in PACKAGES},
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_CBWR", "ATEN_CPU_CAPABILITY", "MKL_NUM_THREADS",
                                           "ONEDNN_MAX_CPU_ISA")
                if k in os.environ},
    }


# the variables that force a code path on float32 kernels
_NUMERIC_ENV = ("MKL_CBWR", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")


def numeric_identity() -> dict[str, Any]:
    """What, besides the code and the config, decides the bits a float32 computation of this process gives
    and is the same in every process of one run: the packages that compute, the CPU (oneMKL takes
    vendor-specific paths), torch's CPU capability (ATen's vector kernels) and the variables that force those
    paths. Part of the key of what a long float32 computation caches (the embedded base model), so a build
    made under one is never reused under another.

    The thread count is not in it, though on Intel it changes a build too (1 thread vs 2: another model;
    experiments/README.md, "Portable numerics"): Lightning's DDP launcher lowers the workers' thread count, and
    every rank must resolve the build rank 0 made. ``build.json`` records the threads a build was made on."""
    env = environment()
    return {"machine": env["machine"], "cpu": env["cpu"], "torch_cpu_capability": env["torch_cpu_capability"],
            "env": {k: v for k, v in env["env"].items() if k in _NUMERIC_ENV}, "packages": env["packages"]}


def differences(environments: list[dict[str, Any] | None]) -> dict[str, list[Any]]:
    """The compared fields (``packages.<name>`` one by one) that take more than one value across
    ``environments`` (``None``: a record from before environments were recorded, skipped)."""
    seen: dict[str, set[str]] = {}
    for env in environments:
        for k, v in _compared(env).items():
            seen.setdefault(k, set()).add(v)
    return {k: sorted(v) for k, v in seen.items() if len(v) > 1}


def _compared(env: dict[str, Any] | None) -> dict[str, str]:
    """The compared fields of one environment, ``packages.<name>`` one by one, as text ({} for None)."""
    if not env:
        return {}
    flat = {f"packages.{k}": v for k, v in (env.get("packages") or {}).items()}
    flat.update({k: env.get(k) for k in COMPARED if k != "packages"})
    return {k: str(v) for k, v in flat.items()}


def environment_label(env: dict[str, Any] | None, keys: list[str]) -> str:
    """One environment by its values of ``keys`` (the fields :func:`differences` found to differ), e.g.
    "AVX2 · AMD EPYC"; "unrecorded" for a record from before environments were recorded."""
    if not env:
        return "unrecorded"
    flat = _compared(env)
    return " · ".join(flat.get(k, "None") for k in keys)
