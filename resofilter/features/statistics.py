"""Statistics of a one-step weight update ΔW, accumulated over row blocks in float64.

The across-sample spread of these statistics is tiny (~1e-5 relative for AdamW's
saturated update), below float32 summation error over millions of elements, so every sum
here accumulates in float64 (the elements themselves may be fp32: their rounding, ~6e-8
relative and unbiased, averages out over the matrix). ΔW arrives in row blocks ``(B, r, d_in)`` so a 9216×2304 matrix
never has to be materialised for a whole batch at once.

Statistics (``n`` = number of elements of W, sums over all of them):

* ``mean_abs``  = Σ|ΔW| / n — the paper's statistic.
* ``l2``        = √(Σ ΔW²) = ‖ΔW‖_F — DONOD's "norm of delta".
* ``max_abs``   = max |ΔW|.
* ``std``       = √(Σ ΔW²/n − (Σ ΔW/n)²) — population standard deviation of the elements.
* ``don``       = ‖W+ΔW‖_F − ‖W‖_F — DONOD's "delta of norm", computed stably as
  (2⟨W,ΔW⟩ + ‖ΔW‖²) / (‖W+ΔW‖_F + ‖W‖_F).
* ``cos_to_weight`` = ⟨W,ΔW⟩ / (‖W‖_F ‖ΔW‖_F) — does the step grow (>0) or shrink W.
* ``q{p}``      = the p-quantile of |ΔW| (linear interpolation, as ``numpy.quantile``).
* ``count_above_{b}`` = #{|ΔW| > b} — the authors' commented-out threshold counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

BASIC = ("mean_abs", "l2", "max_abs", "std", "don", "cos_to_weight")


def quantile_linear(x: torch.Tensor, q: float) -> torch.Tensor:
    """``numpy.quantile(x, q, axis=-1)`` (linear) via ``kthvalue``: no size limit. x: (B, n)."""
    n = x.shape[-1]
    pos = q * (n - 1)
    lo, hi = int(pos // 1), min(int(pos // 1) + 1, n - 1)
    v_lo = torch.kthvalue(x, lo + 1, dim=-1).values
    v_hi = torch.kthvalue(x, hi + 1, dim=-1).values if hi != lo else v_lo
    return v_lo + (v_hi - v_lo) * (pos - lo)


class UpdateStatistics:
    """Accumulates the statistics of B samples' updates ΔW of one weight matrix W.

    Call :meth:`update` with consecutive row blocks of ΔW (B, r, d_in) and the same rows of
    W (r, d_in); then :meth:`result` gives ``{name: (B,) float64}``.
    """

    def __init__(self, batch: int, shape: tuple[int, int], statistics: Sequence[str],
                 quantiles: Sequence[float] = (), count_above: Sequence[float] = ()) -> None:
        self.stats = list(statistics)
        self.quantiles = list(quantiles) if "quantiles" in self.stats else []
        self.bounds = list(count_above) if "count_above" in self.stats else []
        self.n = shape[0] * shape[1]
        f64 = dict(dtype=torch.float64)
        self.abs_sum = torch.zeros(batch, **f64)
        self.sum = torch.zeros(batch, **f64)
        self.sq_sum = torch.zeros(batch, **f64)
        self.max_abs = torch.zeros(batch, **f64)
        self.dot_w = torch.zeros(batch, **f64)
        self.w_sq = torch.zeros((), **f64)
        self.counts = torch.zeros(batch, len(self.bounds), **f64)
        self.abs_blocks: list[torch.Tensor] = []
        self.rows_seen = 0

    def update(self, dw: torch.Tensor, w: torch.Tensor) -> None:
        """Add a row block: dw (B, r, d_in) and w (r, d_in), fp32 or float64; sums run in float64."""
        f64 = torch.float64
        a = dw.abs()
        self.abs_sum += a.sum(dim=(1, 2), dtype=f64)
        self.sum += dw.sum(dim=(1, 2), dtype=f64)
        self.sq_sum += (dw * dw).sum(dim=(1, 2), dtype=f64)
        self.max_abs = torch.maximum(self.max_abs, a.amax(dim=(1, 2)).to(f64))
        self.dot_w += (dw * w).sum(dim=(1, 2), dtype=f64)
        self.w_sq += (w * w).sum(dtype=f64)
        for j, b in enumerate(self.bounds):
            self.counts[:, j] += (a > b).sum(dim=(1, 2)).to(f64)
        if self.quantiles:
            self.abs_blocks.append(a.flatten(1))
        self.rows_seen += dw.shape[1]

    def result(self) -> dict[str, torch.Tensor]:
        n = self.n
        out: dict[str, torch.Tensor] = {}
        l2 = self.sq_sum.sqrt()
        w_norm = self.w_sq.sqrt()
        for s in self.stats:
            if s == "mean_abs":
                out[s] = self.abs_sum / n
            elif s == "l2":
                out[s] = l2
            elif s == "max_abs":
                out[s] = self.max_abs.clone()
            elif s == "std":
                mean = self.sum / n
                out[s] = (self.sq_sum / n - mean * mean).clamp_min(0).sqrt()
            elif s == "don":
                num = 2 * self.dot_w + self.sq_sum
                new_norm = (self.w_sq + num).clamp_min(0).sqrt()
                out[s] = num / (new_norm + w_norm).clamp_min(torch.finfo(torch.float64).tiny)
            elif s == "cos_to_weight":
                out[s] = self.dot_w / (l2 * w_norm).clamp_min(torch.finfo(torch.float64).tiny)
            elif s == "quantiles":
                flat = torch.cat(self.abs_blocks, dim=1).to(torch.float64)  # (B, n)
                for q in self.quantiles:
                    out[f"q{q:g}"] = quantile_linear(flat, q)
            elif s == "count_above":
                for j, b in enumerate(self.bounds):
                    out[f"count_above_{b:g}"] = self.counts[:, j].clone()
            else:
                raise ValueError(f"unknown statistic {s!r}")
        return out
