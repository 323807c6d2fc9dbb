"""Noise AUROC of every signal, overall and per noise kind, with bootstrap intervals, on one model.

Scores the synthetic pool (and the benchmark's reference split, for the target scorer) into
the same features cache as ``resofilter run`` — a sweep of the same model reuses them — then
runs each row's selection (keep 50 %) and prints one markdown table: AUROC of the scorer
against all labelled noise and against each noise kind alone (that kind vs the clean samples),
each with its 95 % stratified bootstrap interval (``auroc_interval``: noisy and clean samples
resampled apart; ``--resamples``).

    python experiments/signal_auroc.py experiment=half_data_smollm2     # SmolLM2, the headline's scoring
    python experiments/signal_auroc.py experiment=tiny                  # the embedded 4-layer model
    python experiments/signal_auroc.py experiment=tiny model=tiny_llama_8l --out /tmp/auroc8l

Any Hydra override of the ``run`` config can follow (``score.sketch.k_out=32``, ``paths.cache_dir=…``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# (row label, the overrides that select its scorer); every row keeps 50 %
ROWS: list[tuple[str, list[str]]] = [
    ("ResoFilter (paper: mean \\|ΔW\\|, last 3 up_proj)", ["variant=reso50"]),
    ("loss", ["variant=loss50"]),
    ("answer_loss", ["variant=answer50"]),
    ("IFD (response ppl given the query / alone)", ["variant=ifd50", "score.ifd=true"]),
    ("tok_max", ["variant=tok_max50"]),
    ("tok_topk (k 4)", ["variant=tok_max50", "scorer=tok_topk"]),
    ("consensus (sketches)", ["variant=consensus50"]),
    ("target, mean (64 reference problems)", ["variant=target50"]),
    ("target, max", ["variant=target50", "scorer.reduce=max"]),
    ("answer_loss + ResoFilter (TOPSIS)", ["variant=answer_reso50"]),
    ("loss + ResoFilter (rank mean)", ["variant=loss_reso50"]),
    ("random", ["variant=random50"]),
]


def compose(overrides: list[str]) -> Any:
    from resofilter.cli import compose_config  # importing the CLI registers the config's resolvers

    return compose_config("run", overrides)


def row_diagnostics(overrides: list[str], out_dir: Path, n_resamples: int = 2000) -> dict[str, Any]:
    """Score (cached) and select with one row's scorer; the selected scorer's AUROC overall and per kind,
    each with its bootstrap interval (``auroc_ci``, ``auroc_by_kind_ci``)."""
    import pandas as pd

    from resofilter.selection.diagnostics import auroc_by_kind_interval, auroc_interval
    from resofilter.stages import specs
    from resofilter.stages.config_check import validate
    from resofilter.stages.run import score_pool, with_reference
    from resofilter.stages.select import kinds_of, noise_labels, run_selection

    cfg = compose(overrides)
    validate(cfg)
    run, inputs = specs.run_spec(cfg), specs.run_inputs(cfg)
    model_dir = inputs.model_dir()
    records, data_info = inputs.load()
    feat_dir, _ = score_pool(run.score, records, inputs.template, model_dir, data_info)
    spec = with_reference(run, inputs, model_dir, {})
    manifest = run_selection(spec, feat_dir, records, out_dir)
    if "diagnostics" not in manifest:
        raise SystemExit(f"{overrides}: the data have no noise labels (data.label_field); nothing to measure")
    y, kinds = noise_labels(spec, records), kinds_of(records, spec.kind_field)
    by_id = pd.read_parquet(out_dir / "selection.parquet").set_index("sample_id")["badness"]
    bad = by_id.loc[[r.sample_id for r in records]].to_numpy(dtype=float)
    d = {"model": model_dir, "features_dir": str(feat_dir), **manifest["diagnostics"],
         "auroc_ci": auroc_interval(bad, y, n_resamples)}
    if kinds is not None:
        d["auroc_by_kind_ci"] = auroc_by_kind_interval(bad, y, kinds, n_resamples)
    return d


# the synthetic benchmark's noise kinds: those a mean over the response should see first, then the subtle ones
KIND_ORDER = ["wrong_final", "corrupted_step", "truncated", "mismatched", "garbled", "easier", "near_duplicate"]


def markdown(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """The AUROC table; a value's bootstrap interval follows it where the row has one (``auroc_ci``,
    ``auroc_by_kind_ci``)."""
    found = list(rows[0][1].get("auroc_by_kind", {}))
    kinds = [k for k in KIND_ORDER if k in found] + sorted(k for k in found if k not in KIND_ORDER)
    lines = ["| scorer | all | " + " | ".join(kinds) + " |", "|---|---:|" + "---:|" * len(kinds)]

    def cell(v: float, ci: Any, digits: int) -> str:
        return f"{v:.{digits}f}" + ("" if ci is None else f" [{ci[0]:.2f}, {ci[1]:.2f}]")

    for label, d in rows:
        per, per_ci = d.get("auroc_by_kind", {}), d.get("auroc_by_kind_ci", {})
        lines.append(f"| {label} | **{cell(d['auroc'], d.get('auroc_ci'), 3)}** | "
                     + " | ".join(cell(per[k], per_ci.get(k), 2) for k in kinds) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the run config, e.g. model=tiny_llama_8l")
    ap.add_argument("--out", type=Path, default=None, help="where the selections go (default: a temporary dir)")
    ap.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples per AUROC interval")
    args = ap.parse_args(argv)
    from resofilter import progress
    from resofilter.cli import quiet_third_party

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for name in ("resofilter.stages.run", "resofilter.progress"):  # what is scored, and how far it got
        logging.getLogger(name).setLevel(logging.INFO)
    progress.configure("auto")
    quiet_third_party()
    out = args.out or Path(tempfile.mkdtemp(prefix="signal_auroc-"))
    results = []
    t0 = time.perf_counter()
    for i, (label, extra) in enumerate(ROWS):
        d = row_diagnostics([*args.overrides, *extra, "trainer.enable_progress_bar=false"], out / f"row{i:02d}",
                            args.resamples)
        results.append((label, d))
        print(f"{label}: AUROC {d['auroc']:.3f}", file=sys.stderr)
    (out / "auroc.json").write_text(json.dumps(dict(results), indent=1))
    print(f"model {results[0][1]['model']}, features {results[0][1]['features_dir']} "
          f"({time.perf_counter() - t0:.0f} s; selections in {out})\n")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
