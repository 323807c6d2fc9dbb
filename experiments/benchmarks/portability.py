"""Which numeric settings change the embedded base build, and which one makes it portable (issue 22).

Another machine is simulated on this one: torch's ATen kernels are forced onto another CPU code path
(``ATEN_CPU_CAPABILITY``), oneMKL onto another instruction set (``MKL_CBWR``), oneDNN capped
(``ONEDNN_MAX_CPU_ISA``), and the thread count changed (``OMP_NUM_THREADS``). Each variant builds a
short embedded base model (``resofilter prepare``, its own empty cache, ``--steps`` base-training steps)
in a fresh process; the weights are then compared with the first variant of the same group:

* ``native``: the settings as shipped (nothing forced), then the simulated machines;
* ``portable``: ``ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE`` (ATen's baseline kernels, MKL's
  SSE2-compatible path: code that does not depend on the CPU), under the same simulated machines.

Prints per variant: the build time, the max |Δw| against its group's reference, whether the weights
are bit-identical to it and their SHA-256 (compare the portable one across real machines); then the
portable build's time over the native one's (measured side by side in this run: run it alone).

    python experiments/benchmarks/portability.py                 # 60 steps a build, 8 builds (~8 min alone)
    python experiments/benchmarks/portability.py --steps 200 --keep /tmp/port
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PORTABLE = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}
# (name, environment): the first of each group is its reference
GROUPS: dict[str, list[tuple[str, dict[str, str]]]] = {
    "native": [
        ("as shipped, 2 threads", {}),
        ("1 thread", {"OMP_NUM_THREADS": "1"}),
        ("ATen avx2", {"ATEN_CPU_CAPABILITY": "avx2"}),
        ("MKL avx2", {"MKL_CBWR": "AVX2"}),
        ("oneDNN ≤ AVX2", {"ONEDNN_MAX_CPU_ISA": "AVX2"}),
    ],
    "portable": [
        ("portable, 2 threads", PORTABLE),
        ("portable, 1 thread", {**PORTABLE, "OMP_NUM_THREADS": "1"}),
        ("portable, oneDNN ≤ AVX2", {**PORTABLE, "ONEDNN_MAX_CPU_ISA": "AVX2"}),
    ],
}
CLEARED = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def build(steps: int, cache: Path, env_extra: dict[str, str], overrides: list[str]) -> tuple[Path, float, dict]:
    """One short embedded build in a fresh process under ``env_extra``; its dir, wall time, environment."""
    env = {k: v for k, v in os.environ.items() if k not in CLEARED} | env_extra
    cmd = [sys.executable, "-m", "resofilter", "prepare", "experiment=tiny",  # the embedded tier (not the default)
           f"model.embedded.base_training.steps={steps}", f"paths.cache_dir={cache}",
           f"output_dir={cache / 'prepare'}", "progress.bars=false",
           "model.embedded.base_training.progress_bar=false", "model.embedded.eval.max_samples=50", *overrides]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"build failed under {env_extra}:\n{p.stderr[-3000:]}")
    model = Path(json.loads((cache / "prepare" / "prepare.json").read_text())["model"])
    return model, seconds, json.loads((model / "build.json").read_text())["environment"]


def weights(model: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(model / "model.safetensors")


def compare(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def digest(w: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(w):
        h.update(k.encode())
        h.update(w[k].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="base-training steps per build (default 60)")
    ap.add_argument("--keep", type=Path, default=None, help="keep the builds here (default: a temp dir)")
    ap.add_argument("--groups", default="native,portable", help="comma-separated: native, portable")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every build (e.g. model=tiny_llama_8l)")
    args = ap.parse_args(argv)
    root = args.keep or Path(tempfile.mkdtemp(prefix="portability-"))
    out = ["| group | variant | build s | max \\|Δw\\| vs the group's first | identical | weights sha256 | "
           "CPU capability (torch) |", "|---|---|---|---|---|---|---|"]
    times: dict[str, float] = {}
    for group in args.groups.split(","):
        ref = None
        for i, (name, env) in enumerate(GROUPS[group]):
            model, seconds, envrec = build(args.steps, root / f"{group}-{i}", env, args.overrides)
            w = weights(model)
            ref = ref if ref is not None else w
            diff = compare(w, ref)
            times.setdefault(group, seconds)
            out.append(f"| {group} | {name} | {seconds:.1f} | {diff:.3g} | {'yes' if diff == 0 else 'no'} | "
                       f"{digest(w)} | {envrec['torch_cpu_capability']} |")
            sys.stdout.write(out[-1] + "\n")
            sys.stdout.flush()
    text = "\n".join(out) + "\n"
    if {"native", "portable"} <= set(times):
        text += (f"\nportable / native build time (first variant of each, 2 threads, side by side in this run): "
                 f"{times['portable'] / times['native']:.2f}\n")
    sys.stdout.write("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
