"""Peak memory of scoring one batch on a gemma-2-shaped ``up_proj`` (9216×2304), in its own process.

Prints JSON: the RSS growth (MB) of one FastScorer statistics call over the RSS before it,
for the statistics named on the command line
(``<statistics> <chunk_elements> <quantiles> <batch>``). Run it with
``MALLOC_MMAP_THRESHOLD_=65536`` so that freed blocks go back to the OS and RSS follows
the live tensors rather than what glibc keeps cached. Used by tests/test_paper_scale.py.
"""

from __future__ import annotations

import json
import resource
import sys
import time

import torch

from resofilter.features.closed_form import StepConfig
from resofilter.features.fast import FastScorer
from resofilter.features.targets import Target


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    stats = sys.argv[1].split(",")
    chunk = int(sys.argv[2])
    quantiles = [float(q) for q in sys.argv[3].split(",")]
    B, T, d_out, d_in = int(sys.argv[4]), 8, 9216, 2304
    torch.manual_seed(0)
    lin = torch.nn.Linear(d_in, d_out, bias=False)
    model = torch.nn.Sequential(lin)
    scorer = FastScorer(model, [Target("layers.0.mlp.up_proj", 0, lin)], StepConfig("adamw"), stats,
                        quantiles=quantiles, count_above=[1e-6], chunk_elements=chunk, logits_chunk_elements=0)
    delta = torch.randn(B, T, d_out) * 1e-3
    x = torch.randn(B, T, d_in)
    before = rss_mb()
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    t0 = time.perf_counter()
    out = scorer._statistics(scorer.targets[0], delta, x)
    elapsed = time.perf_counter() - t0
    print(json.dumps({"growth_mb": hwm_mb() - before, "rss_before_mb": before, "seconds": elapsed,
                      "keys": sorted(out)}))


if __name__ == "__main__":
    main()
