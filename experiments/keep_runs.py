"""Keep a sweep's finished members between sessions: copy each member's small files into
``experiments/runs/`` (layout as under ``multirun/``), never overwriting a member kept before.

Kept per member (one whose ``results.json`` exists, i.e. finished): ``results.json``,
``resolved_config.json``, ``.hydra/*.yaml``, ``eval/metrics.json``, ``eval/predictions.jsonl``
(the per-problem correctness ``resofilter table`` pairs runs by) and ``select/diagnostics.json`` —
not the weights, subsets or reports.

    python experiments/keep_runs.py multirun/smollm2/s2 experiments/runs/smollm2/s2
    python experiments/keep_runs.py multirun/budget_tiny/a experiments/runs/budget_tiny/a --reduce

``--reduce`` keeps of each prediction only ``sample_id``, ``extracted``, ``gold`` and ``correct``
(the generations are left out: for 2,000-problem evaluations). Each file is written under a temporary
name and renamed, ``results.json`` last: a member is kept only when all its files are.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from resofilter._io import write_text_atomic

log = logging.getLogger("keep_runs")
SMALL = ("resolved_config.json", "eval/metrics.json", "select/diagnostics.json")
PREDICTION_FIELDS = ("sample_id", "extracted", "gold", "correct")


def keep_member(member: Path, out: Path, reduce: bool) -> None:
    files = [*SMALL, *(str(p.relative_to(member)) for p in sorted((member / ".hydra").glob("*.yaml")))]
    for rel in files:
        if (member / rel).exists():
            write_text_atomic(out / rel, (member / rel).read_text())
    preds = member / "eval" / "predictions.jsonl"
    if preds.exists():
        text = preds.read_text()
        if reduce:
            text = "".join(json.dumps({k: r[k] for k in PREDICTION_FIELDS if k in r}) + "\n"
                           for r in map(json.loads, text.splitlines()) if r)
        write_text_atomic(out / "eval" / "predictions.jsonl", text)
    write_text_atomic(out / "results.json", (member / "results.json").read_text())  # last: the member is kept


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", type=Path, help="a multirun sweep directory (members 0, 1, … under it)")
    ap.add_argument("dest", type=Path, help="where to keep them, e.g. experiments/runs/<name>/<sweep>")
    ap.add_argument("--reduce", action="store_true", help="keep only id, answers and correctness of predictions")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.sweep.is_dir():
        log.error("%s: no such sweep directory", args.sweep)
        return 2
    kept = skipped = 0
    for member in sorted((p for p in args.sweep.iterdir() if p.is_dir()), key=lambda p: (len(p.name), p.name)):
        if not (member / "results.json").exists():
            continue
        out = args.dest / member.name
        if (out / "results.json").exists():
            skipped += 1  # kept before: its first .hydra/ and files stay
            continue
        if out.exists():
            shutil.rmtree(out)  # an earlier copy interrupted before its results.json
        keep_member(member, out, args.reduce)
        kept += 1
    log.info("kept %d members of %s in %s (%d kept before)", kept, args.sweep, args.dest, skipped)
    return 0


if __name__ == "__main__":
    sys.exit(main())
