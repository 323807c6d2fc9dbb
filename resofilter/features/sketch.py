"""Per-sample gradient sketches from the scoring pass: ``P_out · G_b · P_inᵀ`` per matrix.

The fast scorer already holds, for every scored Linear, the layer inputs x (B, T, d_in)
and output gradients δ (B, T, d_out) whose products give sample b's weight gradient
``G_b = Σ_t δ_{b,t}ᵀ x_{b,t}``. A factorized random projection (as in LoGra) sketches it
without forming it::

    S_b = P_out · G_b · P_inᵀ = Σ_t (P_out δ_{b,t}) (P_in x_{b,t})ᵀ        (k_out × k_in)

with P_out (k_out × d_out) and P_in (k_in × d_in) Gaussian, entries N(0, 1/k), drawn from a
generator seeded by (sketch seed, matrix name): the same matrices in every run, rank and
resume. ``E[P ᵀP] = I`` for each factor, so ``E⟨S_a, S_b⟩ = ⟨G_a, G_b⟩``: inner products (and
so cosines) of sketches estimate those of the true per-sample gradients.

**Error (the documented bound).** With M = PᵀP = I + E for each factor,
``⟨S_a, S_b⟩ − ⟨G_a, G_b⟩ = tr(G_bᵀ E_out G_a) + tr(G_bᵀ G_a E_in) + tr(G_bᵀ E_out G_a E_in)``;
the three are uncorrelated; for Gaussian P, ``Var(tr(PᵀP C)) = (‖C‖²_F + tr(C²))/k ≤ 2‖C‖²_F/k``,
so the first two have variance at most ``2‖G_a‖²‖G_b‖²/k`` (k = k_out, k_in) and the cross
term at most ``4‖G_a‖²‖G_b‖²/(k_out k_in)``. The error relative to ‖G_a‖‖G_b‖ has
root-mean-square at most ``√(2/k_out + 2/k_in + 4/(k_out k_in))`` — :func:`rms_error_bound`;
0.52 at 16 × 16 for one pair's raw inner product (a bound: gradients of low rank and
aligned columns reach it, typical ones stay below).
``tests/test_sketch.py`` checks measured errors against brute-force per-sample gradients
at several k against this bound.

``of="update"`` sketches the one-step update ΔW_b instead of the gradient (for an Adam
step: the Adam-normalized gradient, sign-like — LESS's preconditioned gradient), built
from the same row blocks the update statistics use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from resofilter._io import stable_hash
from resofilter.errors import ConfigError, ResoFilterError

SKETCH_COLUMN = "sketch"  # a shard's list column; merged into sketches.npy
SKETCH_FILE = "sketches.npy"
KINDS = ("gradient", "update")


@dataclass(frozen=True)
class SketchSpec:
    """``score.sketch``: which matrices, what size, which seed, of what."""

    enabled: bool = False
    k_out: int = 16
    k_in: int = 16
    seed: int = 0
    of: str = "gradient"  # gradient | update (the one-step ΔW: Adam-normalized for adam/adamw)
    indices: Any = (-3, -2, -1)  # layers sketched (among the scored candidates); fixed, not the `layers` choice

    @classmethod
    def from_cfg(cls, c: Any) -> SketchSpec:
        if c is None:
            return cls()
        indices = c.get("indices", (-3, -2, -1))
        spec = cls(enabled=bool(c.get("enabled", False)), k_out=int(c.get("k_out", 16)), k_in=int(c.get("k_in", 16)),
                   seed=int(c.get("seed", 0)), of=str(c.get("of", "gradient")),
                   indices=indices if isinstance(indices, str) else tuple(indices))  # `all`, or plain ints
        spec.validate()
        return spec if spec.enabled else cls()  # off: its sizes mean nothing (nor change the features' identity)

    def validate(self) -> None:
        if self.of not in KINDS:
            raise ConfigError("score.sketch.of", f"expected one of {list(KINDS)}, got {self.of!r}")
        for key in ("k_out", "k_in"):
            if getattr(self, key) < 1:
                raise ConfigError(f"score.sketch.{key}", f"must be ≥ 1, got {getattr(self, key)}")

    def describe(self) -> dict[str, Any] | None:
        """Plain values of an enabled sketch (the features' sketch layout); ``None`` when off."""
        if not self.enabled:
            return None
        idx = self.indices if isinstance(self.indices, str) else [int(i) for i in self.indices]
        return {"k_out": self.k_out, "k_in": self.k_in, "seed": self.seed, "of": self.of, "indices": idx}


def rms_error_bound(k_out: int, k_in: int) -> float:
    """Upper bound on the RMS of (⟨S_a,S_b⟩ − ⟨G_a,G_b⟩) / (‖G_a‖‖G_b‖) for one matrix."""
    return math.sqrt(2.0 / k_out + 2.0 / k_in + 4.0 / (k_out * k_in))


def projection(name: str, k: int, d: int, seed: int, dtype: torch.dtype, device: Any = "cpu") -> torch.Tensor:
    """(k, d) Gaussian N(0, 1/k), a pure function of (seed, matrix name, side size)."""
    g = torch.Generator().manual_seed(int(stable_hash([seed, name, k, d]), 16) % (2**63 - 1))
    return (torch.randn(k, d, generator=g, dtype=torch.float64) / math.sqrt(k)).to(dtype=dtype, device=device)


class Projector:
    """The projections of every sketched matrix, and sketches from factors, blocks or whole matrices."""

    def __init__(self, spec: SketchSpec, shapes: dict[str, tuple[int, int]], dtype: torch.dtype,
                 device: Any = "cpu") -> None:
        """``device``: one for all, or ``{name: device}`` (a model split over devices: each matrix's own)."""
        self.spec = spec
        self.names = list(shapes)
        on = device if isinstance(device, dict) else dict.fromkeys(shapes, device)
        self.p_out = {n: projection(n + "/out", spec.k_out, s[0], spec.seed, dtype, on[n]) for n, s in shapes.items()}
        self.p_in = {n: projection(n + "/in", spec.k_in, s[1], spec.seed, dtype, on[n]) for n, s in shapes.items()}

    @property
    def dim(self) -> int:
        return len(self.names) * self.spec.k_out * self.spec.k_in

    def of_factors(self, name: str, delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(B, k_out·k_in) from δ (B, T, d_out) and x (B, T, d_in): Σ_t (P_out δ_t)(P_in x_t)ᵀ."""
        po, pi = self.p_out[name], self.p_in[name]
        a = delta.to(po.dtype) @ po.T  # (B, T, k_out)
        c = x.to(pi.dtype) @ pi.T  # (B, T, k_in)
        return torch.bmm(a.transpose(1, 2), c).flatten(1)

    def of_rows(self, name: str, r0: int, r1: int, block: torch.Tensor) -> torch.Tensor:
        """The part of P_out · M · P_inᵀ that rows r0:r1 of M (B, r, d_in) contribute, (B, k_out·k_in)."""
        po, pi = self.p_out[name][:, r0:r1], self.p_in[name]
        return (po @ (block.to(pi.dtype) @ pi.T)).flatten(1)  # (k_out, r) @ (B, r, k_in) → (B, k_out, k_in)

    def of_matrix(self, name: str, m: torch.Tensor) -> torch.Tensor:
        """(B, k_out·k_in) of whole matrices m (B, d_out, d_in) (the literal scorer's gradients)."""
        return self.of_rows(name, 0, m.shape[1], m)


def sketch_layout(spec: SketchSpec, projector: Projector) -> dict[str, Any]:
    """What a sketches file holds, for the manifest: column blocks in target order."""
    return {**(spec.describe() or {}), "targets": list(projector.names), "dim": projector.dim,
            "file": SKETCH_FILE}


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) cosines between the rows of a (N, D) and b (M, D); a zero row has cosine 0."""
    def unit(m: np.ndarray) -> np.ndarray:
        n = np.linalg.norm(m, axis=1, keepdims=True)
        return m / np.where(n > 0, n, 1.0)

    return unit(np.asarray(a, dtype=np.float64)) @ unit(np.asarray(b, dtype=np.float64)).T


class SketchMatrix:
    """Sketches keyed by sample id; travels in ``features.attrs`` without being copied."""

    def __init__(self, ids: Sequence[str], matrix: np.ndarray, layout: dict[str, Any]) -> None:
        if len(ids) != len(matrix):
            raise ConfigError("sketches", f"{len(ids)} ids for {len(matrix)} sketch rows")
        self.matrix, self.layout = matrix, layout
        self.row = {s: i for i, s in enumerate(ids)}

    def rows(self, sample_ids: Sequence[str]) -> np.ndarray:
        return self.matrix[[self.row[s] for s in sample_ids]]

    def __deepcopy__(self, memo: dict) -> SketchMatrix:  # pandas deep-copies attrs on every operation
        return self


def load_sketches(features_dir: str | Path) -> SketchMatrix:
    """The sketches of a finished features dir, keyed by its sample ids, with their layout and model.

    A features dir scored without sketches, or whose sketches file does not match the
    checksum in its manifest, is a named error.
    """
    import pandas as pd

    from resofilter._io import file_hash, read_json

    d = Path(features_dir)
    mpath = d / "manifest.json"
    if not mpath.exists():
        raise ResoFilterError(f"{d} holds no finished features (no manifest.json)")
    manifest = read_json(mpath)
    layout = manifest.get("sketch")
    if layout is None:
        raise ResoFilterError(f"the features in {d} have no gradient sketches: score them with "
                              "score.sketch.enabled=true")
    path = d / layout["file"]
    if not path.exists() or file_hash(path, length=64) != layout["sha256"]:
        raise ResoFilterError(f"{path} is missing or does not match the checksum in {mpath}: score again")
    ids = pd.read_parquet(d / "features.parquet", columns=["sample_id"])["sample_id"].tolist()
    layout = {**layout, "model": manifest.get("model"), "model_weights": manifest["description"]["model_weights"],
              "dir": str(d)}
    return SketchMatrix(ids, np.load(path, allow_pickle=False), layout)


COMPARABLE = ("k_out", "k_in", "seed", "of", "targets", "model_weights")  # the weights, wherever they were read


def check_comparable(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Sketches of two features dirs live in one space only with the same projections of the same model."""
    diff = [k for k in COMPARABLE if a.get(k) != b.get(k)]
    if diff:
        raise ResoFilterError(
            f"the sketches in {a.get('dir')} and {b.get('dir')} are not comparable: they differ in {diff} "
            f"({ {k: (a.get(k), b.get(k)) for k in diff} }); score both with the same model and score.sketch")
