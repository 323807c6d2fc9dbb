"""Scorers: one number per sample of a scored pool; each says which end is "bad".

Every scorer satisfies :class:`Scorer`. ``scores(pool)`` returns the raw score (its own units)
of every row of a :class:`ScoredPool` (the features, the scored model's depth and the gradient
sketches, all read from the features' artifact); ``badness()`` orients it so that higher =
worse, which is what selection drops first. A selection computes its scorer once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd

from resofilter.errors import ConfigError
from resofilter.features.sketch import check_comparable, cosine_rows, load_sketches
from resofilter.features.targets import resolve_indices
from resofilter.registry import register

_COLUMN = re.compile(r"^(?P<prefix>.*\.)(?P<layer>\d+)\.(?P<module>[^/]+(?:\.[^/]+)*)/(?P<stat>.+)$")


@dataclass(frozen=True)
class ScoredPool:
    """What a scorer reads: the features (one row per sample), the depth of the model that scored
    them and their gradient sketches (``None`` when scored without), as the artifact records them."""

    features: pd.DataFrame
    n_layers: int
    sketches: Any = None  # a SketchMatrix keyed by sample id (any row order reads the right rows)

    def __len__(self) -> int:
        return len(self.features)


@runtime_checkable
class Scorer(Protocol):
    name: str
    bad_end: str  # "high": large scores are bad (dropped first by drop_high)

    def scores(self, pool: ScoredPool) -> np.ndarray: ...


def oriented(scores: np.ndarray, bad_end: str) -> np.ndarray:
    """Raw scores as badness (higher = worse)."""
    s = np.asarray(scores, dtype=np.float64)
    return s if bad_end == "high" else -s


def badness(scorer: Scorer, pool: ScoredPool) -> np.ndarray:
    return oriented(scorer.scores(pool), scorer.bad_end)


def weight_columns(features: pd.DataFrame) -> list[tuple[str, int, str, str]]:
    """Parse ``<prefix>.<layer>.<module>/<stat>`` columns → (column, layer, module, stat)."""
    out = []
    for c in features.columns:
        m = _COLUMN.match(c)
        if m and ".layers." in c:
            out.append((c, int(m["layer"]), m["module"], m["stat"]))
    return out


def _matching_columns(parsed: list[tuple[str, int, str, str]], modules: Sequence[str], layers: list[int],
                      statistic: str) -> list[str]:
    return [c for c, layer, mod, stat in parsed if layer in layers and mod in modules and stat == statistic]


def layer_columns(features: pd.DataFrame, modules: Sequence[str], indices: Any, statistic: str,
                  n_layers: int) -> list[str]:
    """The feature columns of ``statistic`` for ``modules`` in the chosen layers; error lists what exists."""
    layers = resolve_indices(indices, n_layers, "layers.indices")
    parsed = weight_columns(features)
    cols = _matching_columns(parsed, modules, layers, statistic)
    want = len(layers) * len(modules)
    if len(cols) != want:
        have_stats = sorted({s for *_, s in parsed})
        have = sorted({(layer, mod) for _, layer, mod, _ in parsed})
        raise ConfigError(
            "layers/statistic",
            f"features lack {statistic!r} for modules {list(modules)} in layers {layers} "
            f"(found {len(cols)} of {want} columns); available statistics {have_stats}, "
            f"layer/modules {have[:12]}{' …' if len(have) > 12 else ''}")
    return cols


def has_layer_columns(features: pd.DataFrame, modules: Sequence[str], indices: Any, statistic: str,
                      n_layers: int) -> bool:
    """Whether :func:`layer_columns` finds every column (a layer set outside the model's depth has none)."""
    try:
        layers = resolve_indices(indices, n_layers, "layers.indices")
    except ConfigError:  # e.g. first3 on a 2-layer model
        return False
    return len(_matching_columns(weight_columns(features), modules, layers, statistic)) == len(layers) * len(modules)


@dataclass
class ResoFilterScorer:
    """The paper's score: ``statistic`` of ΔW aggregated (mean) over the layer set."""

    modules: Sequence[str]
    indices: Any
    statistic: str
    n_layers: int
    aggregate: str = "mean"
    bad_end: str = "high"
    name: str = "resofilter"

    def scores(self, pool: ScoredPool) -> np.ndarray:
        cols = layer_columns(pool.features, self.modules, self.indices, self.statistic, self.n_layers)
        x = pool.features[cols].to_numpy(dtype=np.float64)
        return {"mean": x.mean, "sum": x.sum, "max": x.max}[self.aggregate](axis=1)


@dataclass
class ColumnScorer:
    """A per-sample column of the features file: loss, ppl, n_tokens (length), ifd, token-level losses.

    A missing value (``answer_loss`` of a response with no answer span) ranks at the bad end:
    a response without the expected final answer is the suspect one.
    """

    name: str
    column: str
    bad_end: str = "high"

    def scores(self, pool: ScoredPool) -> np.ndarray:
        features = pool.features
        if self.column not in features.columns:
            hint = {"ifd": " (score with score.ifd=true)",
                    "answer_loss": " (score with data.answer_pattern set)"}.get(self.column, "")
            raise ConfigError("scorer", f"features have no column {self.column!r}{hint}")
        x = features[self.column].to_numpy(dtype=np.float64)
        missing = np.isnan(x)
        if missing.any():
            finite = x[~missing]
            lo, hi = (finite.min(), finite.max()) if len(finite) else (0.0, 0.0)
            x = np.where(missing, hi + 1.0 if self.bad_end == "high" else lo - 1.0, x)
        return x


def sketches_of(pool: ScoredPool, who: str) -> np.ndarray:
    """The gradient sketches of the pool's rows, in row order."""
    if pool.sketches is None:
        raise ConfigError("scorer", f"{who} needs gradient sketches and these features have none: score with "
                          "score.sketch.enabled=true")
    return pool.sketches.rows(pool.features["sample_id"].tolist())


@dataclass
class ConsensusScorer:
    """Cosine of each sample's gradient sketch to the pool's mean sketch: low agreement is bad.

    With ``score.sketch.of=update`` the sketches are of the one-step update, for Adam the
    Adam-normalized gradient.
    """

    name: str = "consensus"
    bad_end: str = "low"

    def scores(self, pool: ScoredPool) -> np.ndarray:
        s = sketches_of(pool, self.name)
        return cosine_rows(s, s.mean(axis=0, keepdims=True))[:, 0]


@dataclass
class TargetScorer:
    """LESS-style: the mean (or max) cosine of a sample's sketch to those of a trusted reference set.

    ``reference_dir``: a finished features dir of the reference records, scored by the same
    model with the same sketch projections (checked). Low similarity is bad.
    """

    reference_dir: str
    reduce: str = "mean"
    name: str = "target"
    bad_end: str = "low"

    def scores(self, pool: ScoredPool) -> np.ndarray:
        if self.reduce not in ("mean", "max"):
            raise ConfigError("scorer.reduce", f"expected mean|max, got {self.reduce!r}")
        rows = sketches_of(pool, self.name)
        ref = load_sketches(self.reference_dir)
        check_comparable(pool.sketches.layout, ref.layout)
        cos = cosine_rows(rows, ref.matrix)
        return cos.mean(axis=1) if self.reduce == "mean" else cos.max(axis=1)


@dataclass
class RandomScorer:
    seed: int = 0
    name: str = "random"
    bad_end: str = "high"

    def scores(self, pool: ScoredPool) -> np.ndarray:
        return np.random.default_rng(self.seed).random(len(pool))


def rank_percentiles(x: np.ndarray) -> np.ndarray:
    """Average-rank percentiles in (0, 1]; ties share their mean rank."""
    from scipy.stats import rankdata

    return rankdata(x, method="average") / len(x)


@dataclass
class CombinedScorer:
    """Several indicators, each oriented so high = bad, combined into one badness score.

    ``rank_mean``: Σ wᵢ·percentile_rank(xᵢ) / Σ wᵢ.
    ``topsis``: columns vector-normalised and weighted; the score is the relative closeness
    to the worst point, d⁺/(d⁺ + d⁻) with d⁺ the distance to the best (lowest) point and d⁻
    to the worst (highest) — 1 at the worst corner, 0 at the best.
    """

    indicators: Sequence[tuple[Scorer, float]]
    method: str = "topsis"
    name: str = "combined"
    bad_end: str = "high"

    def scores(self, pool: ScoredPool) -> np.ndarray:
        cols = np.stack([badness(s, pool) for s, _ in self.indicators], axis=1)  # (N, k)
        w = np.array([wt for _, wt in self.indicators], dtype=np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ConfigError("scorer.indicators", "weights must be ≥ 0 with a positive sum")
        w = w / w.sum()
        if self.method == "rank_mean":
            return np.stack([rank_percentiles(c) for c in cols.T], axis=1) @ w
        if self.method == "topsis":
            shifted = cols - cols.min(axis=0)  # badness may be negative (bad_end=low); TOPSIS wants ≥ 0
            norm = np.linalg.norm(shifted, axis=0)
            v = shifted / np.where(norm > 0, norm, 1.0) * w
            best, worst = v.min(axis=0), v.max(axis=0)
            d_best = np.linalg.norm(v - best, axis=1)
            d_worst = np.linalg.norm(v - worst, axis=1)
            denom = d_best + d_worst
            return np.where(denom > 0, d_best / np.where(denom > 0, denom, 1.0), 0.5)
        raise ConfigError("scorer.method", f"unknown method {self.method!r}; expected topsis|rank_mean")


BASELINE_COLUMNS = {"loss": "loss", "ppl": "ppl", "length": "n_tokens", "ifd": "ifd",
                    "tok_max": "tok_max", "tok_topk": "tok_topk_mean", "answer_loss": "answer_loss"}


@dataclass(frozen=True)
class ScorerContext:
    """What a scorer is built with besides its own ``scorer=`` config: the ``layers`` and ``statistic``
    choices, the scored model's depth (from the features' manifest) and the run's seed."""

    layers: Any  # the layers config: modules, indices, [aggregate]
    statistic: str
    n_layers: int
    seed: int = 0


ScorerBuilder = Callable[[Any, ScorerContext], Scorer]
SCORERS: dict[str, ScorerBuilder] = {}  # scorer.name → builder; conf/scorer/<name>.yaml selects it
# What a scorer reads that `score` writes only when asked, by scorer.name: "ifd" (score.ifd: the response's loss
# without its prompt), "sketches" (score.sketch.enabled), "answer_pattern" (data.answer_pattern: the answer_loss
# column), "reference" (scorer.reference: another set's features). The start-up check reads these declarations
# (stages/config_check.py: check_scorer_needs), so a run that would stop after scoring for a missing column is
# refused before it starts.
# "weights": the statistic of ΔW over the `layers` group's matrices (score.candidates × score.statistics).
NEEDS = ("ifd", "sketches", "answer_pattern", "reference", "weights")
SCORER_NEEDS: dict[str, frozenset[str]] = {}


def register_scorer(*names: str, needs: tuple[str, ...] = ()) -> Callable[[ScorerBuilder], ScorerBuilder]:
    """Register a builder ``(scorer config, context) → Scorer`` under ``scorer.name`` = each of ``names``,
    declaring what it reads beyond the default features (``needs``, of :data:`NEEDS`). Adding a scorer: one
    builder here (or a class) and its ``conf/scorer/<name>.yaml``."""
    unknown = set(needs) - set(NEEDS)
    if unknown:
        raise ValueError(f"scorer needs {sorted(unknown)} unknown; declare some of {NEEDS}")

    def add(builder: ScorerBuilder) -> ScorerBuilder:
        for name in names:
            register(SCORERS, "scorer", name, builder)
            SCORER_NEEDS[name] = frozenset(needs)
        return builder
    return add


def weight_columns_needed(scorer_cfg: Any, layers_cfg: Any, statistic: str,
                          key: str | None = None) -> list[tuple[str, str, list[str], Any, str]]:
    """The statistic-over-layers columns a ``scorer=`` config reads, as (config key of the layers, of the
    statistic, modules, layer indices, statistic): the ``layers``/``statistic`` groups for a scorer declaring
    ``weights``, and a combined scorer's statistic indicators (its nested scorers' too)."""
    out = []
    name = scorer_cfg.get("name")
    if "weights" in SCORER_NEEDS.get(name, ()):
        out.append((key or "layers", key or "statistic.name", list(layers_cfg["modules"]), layers_cfg["indices"],
                    statistic))
    if name == "combined":
        for i, ind in enumerate(scorer_cfg.get("indicators") or []):
            if "statistic" in ind:
                out.append((f"scorer.indicators[{i}]", f"scorer.indicators[{i}]",
                            list(ind.get("modules", layers_cfg["modules"])), ind["indices"], ind["statistic"]))
            elif ind.get("scorer"):
                out += weight_columns_needed(ind["scorer"], layers_cfg, statistic, f"scorer.indicators[{i}].scorer")
    return out


def scorer_needs(scorer_cfg: Any) -> frozenset[str]:
    """What a ``scorer=`` config needs, by the declarations — a combined scorer's indicators' included (a
    ``_target_`` class declares nothing here: its needs are its own to check)."""
    name = scorer_cfg.get("name")
    needs = set(SCORER_NEEDS.get(name, ()))
    if name == "combined":
        for ind in scorer_cfg.get("indicators") or []:
            if ind.get("baseline"):
                needs |= SCORER_NEEDS.get(ind["baseline"], frozenset())
            elif ind.get("scorer"):
                needs |= scorer_needs(ind["scorer"])
    return frozenset(needs)


@register_scorer("resofilter", needs=("weights",))
def _resofilter(c: Any, ctx: ScorerContext) -> Scorer:
    layers = ctx.layers
    return ResoFilterScorer(list(layers["modules"]), layers["indices"], ctx.statistic, ctx.n_layers,
                            layers.get("aggregate", "mean"), c.get("bad_end", "high"))


def _column(c: Any, ctx: ScorerContext) -> Scorer:
    return ColumnScorer(c["name"], BASELINE_COLUMNS[c["name"]], c.get("bad_end", "high"))


_COLUMN_NEEDS = {"ifd": ("ifd",), "answer_loss": ("answer_pattern",)}  # the columns `score` writes only when asked
for _name in BASELINE_COLUMNS:
    register_scorer(_name, needs=_COLUMN_NEEDS.get(_name, ()))(_column)


@register_scorer("random")
def _random(c: Any, ctx: ScorerContext) -> Scorer:
    return RandomScorer(int(c.get("seed", ctx.seed)))


@register_scorer("consensus", needs=("sketches",))
def _consensus(c: Any, ctx: ScorerContext) -> Scorer:
    return ConsensusScorer(bad_end=c.get("bad_end", "low"))


@register_scorer("target", needs=("sketches", "reference"))
def _target(c: Any, ctx: ScorerContext) -> Scorer:
    ref = (c.get("reference") or {}).get("features_dir")
    if not ref:
        raise ConfigError("scorer.reference.features_dir",
                          "scorer=target needs the reference set's features: a `resofilter score` dir of the "
                          "reference records scored by the same model (`resofilter run` scores "
                          "scorer.reference.path, or the benchmark's reference split, itself)")
    return TargetScorer(str(ref), c.get("reduce", "mean"), bad_end=c.get("bad_end", "low"))


@register_scorer("combined")
def _combined(c: Any, ctx: ScorerContext) -> Scorer:
    parts: list[tuple[Scorer, float]] = []
    for i, ind in enumerate(c["indicators"]):
        if "statistic" in ind:
            sub: Scorer = ResoFilterScorer(list(ind.get("modules", ctx.layers["modules"])), ind["indices"],
                                           ind["statistic"], ctx.n_layers, "mean", ind.get("bad_end", "high"),
                                           name=f"{ind['statistic']}@{list(ind['indices'])}")
        elif ind.get("baseline") in BASELINE_COLUMNS:
            sub = ColumnScorer(ind["baseline"], BASELINE_COLUMNS[ind["baseline"]], ind.get("bad_end", "high"))
        elif "scorer" in ind:  # any scorer config (consensus, target, a user's _target_ class)
            sub = build_scorer(ind["scorer"], ctx.layers, ctx.statistic, ctx.n_layers, ctx.seed)
        else:
            raise ConfigError(f"scorer.indicators[{i}]", "needs `statistic` + `indices`, `baseline` or `scorer`")
        parts.append((sub, float(ind.get("weight", 1.0))))
    return CombinedScorer(parts, c.get("method", "topsis"), bad_end=c.get("bad_end", "high"))


def build_scorer(scorer_cfg: Any, layers_cfg: Any, statistic: str, n_layers: int, seed: int = 0) -> Scorer:
    """A scorer from the ``scorer=`` config (plus the ``layers``/``statistic`` groups).

    The registered scorers go by ``name`` (:data:`SCORERS`); any other is a class named by
    ``_target_`` and built from the config's other keys, which must satisfy :class:`Scorer`
    (``name``, ``bad_end``, ``scores(pool)``: a :class:`ScoredPool` with the features, the scored
    model's depth and the sketches).
    """
    if "_target_" in scorer_cfg:
        from hydra.utils import instantiate

        try:
            scorer = instantiate(scorer_cfg)
        except Exception as e:  # noqa: BLE001 - hydra wraps import and argument errors alike
            raise ConfigError("scorer", f"cannot build {scorer_cfg['_target_']!r}: {e}") from None
        if not isinstance(scorer, Scorer):
            raise ConfigError("scorer._target_",
                              f"{type(scorer).__name__} lacks name/bad_end/scores (the Scorer protocol)")
        return scorer
    name = scorer_cfg["name"]
    if name not in SCORERS:
        raise ConfigError("scorer.name", f"unknown scorer {name!r}; expected one of {sorted(SCORERS)}")
    return SCORERS[name](scorer_cfg, ScorerContext(layers_cfg, statistic, n_layers, seed))
