"""The stages: each reads a composed config (and the previous stage's manifest), calls the
library and writes its outputs with a manifest last — a directory without its manifest is
unfinished. The library packages (data, models, features, selection, training, evaluation,
reporting) never import from here (``tests/test_layering.py``).

Each stage's request is a frozen spec built from the config in one place: ``ScoreSpec`` (with
``ScoreSettings`` and ``PrecisionCheckSpec``), ``SelectSpec``, ``FinetuneSpec``, ``EvalSpec``.

score
    in: records; a ``ScoreSpec`` and the ``FeaturesIdentity`` built by
    :func:`~resofilter.stages.score.prepare_scoring` (no weights loaded).
    out: ``features.parquet`` (sample_id, loss, ppl, n_tokens, truncated, record_hash,
    [loss_alone, ifd], ``<module>/<statistic>``), then ``manifest.json``: ``key`` and
    ``description`` (the model's content fingerprint, the spec's identity fields —
    :mod:`resofilter.identity`: every field unless declared runtime —, samples hash,
    targets), ``model`` (where the weights were read), ``structure`` (depth, layer prefix,
    targets with shapes, dtype, model type),
    ``records`` (count, content hash, ids skipped by tokenization), data, tokenization,
    config, precision check, timing, world size.
select
    in: the features and their manifest (depth and records come from there), the records;
    a ``SelectSpec`` (scorer, layers, statistic, keep ratio, direction, dedup, diagnostics).
    out: ``subset.jsonl`` (the input's schema), ``selection.parquet``, ``diagnostics.json``,
    plots, then ``manifest.json``: scorer, layers, statistic, selection, the features' path,
    hash and model, depth, scored columns, counts, diagnostics.
finetune
    in: records (a subset); a ``FinetuneSpec`` (recipe, optimizer/schedule/trainer/logger
    ``_target_`` configs, template, tokenization).
    out: ``checkpoint/`` (HF ``save_pretrained``), ``logs/``, then ``finetune.json``:
    checkpoint, base model, mode, records, tokenization, steps, speed.
evaluate
    in: a checkpoint (and the template its ``finetune.json`` recorded); an ``EvalSpec`` per set.
    out: per eval set ``predictions.jsonl``, then ``metrics.json``: set, path, world size,
    accuracy with its Wilson 95 % interval, n, extraction failures.
run
    all four in one directory, then ``resolved_config.json`` and ``results.json``: variant,
    setting (the resolved config minus seeds, which ``table`` groups by), Hydra choices,
    per-stage summaries, accuracies.

``embedded`` builds the embedded default (synthetic benchmark + base model), ``context``
resolves a config into concrete paths, ``config_check`` validates a config without loading
weights (every ``_target_`` bound to its signature).
"""
