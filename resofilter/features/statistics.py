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
* ``q{p}``      = the p-quantile of |ΔW| (linear interpolation, as ``numpy.quantile``), exact: selected
  from |ΔW| held for a group of samples (:func:`held_quantiles`), or, for a matrix larger than
  the hold, found by :func:`block_quantiles` in a few more passes over the row blocks, so the
  elements of ΔW are never held whole (a 9216×2304 gemma-2 ``up_proj`` has 21 M per sample).
* ``count_above_{b}`` = #{|ΔW| > b} — the authors' commented-out threshold counts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

_TINY = torch.finfo(torch.float64).tiny

# Statistics that are functions of the float64 sums UpdateStatistics keeps (n, Σ|ΔW|, ΣΔW,
# ΣΔW², max/min |ΔW|, ⟨W,ΔW⟩, ‖W‖²), by name, with the sums each one reads. A new one is one
# decorated function here plus one conf/statistic/<name>.yaml; `score.statistics` and validation
# take their names from here. Only the sums the requested statistics read are accumulated: each
# is a pass over every per-sample ΔW block, so the paper's mean_abs alone costs one pass, not seven.
BASIC: dict[str, Callable[[UpdateStatistics], torch.Tensor]] = {}
SUMS = ("abs_sum", "sum", "sq_sum", "max_abs", "min_abs", "dot_w", "w_sq")
NEEDS: dict[str, frozenset[str]] = {  # the two statistics with columns of their own (not in BASIC)
    "quantiles": frozenset({"min_abs", "max_abs"}),  # the search starts from the range of |ΔW|
    "count_above": frozenset(),
}
# The columns of the statistics that write several, from score.quantiles and the absolute count_above bounds;
# any other statistic writes one column, its name.
COLUMNS: dict[str, Callable[[Sequence[float], Sequence[float]], list[str]]] = {
    "quantiles": lambda quantiles, bounds: [f"q{q:g}" for q in quantiles],
    "count_above": lambda quantiles, bounds: [f"count_above_{b:g}" for b in bounds],
}


def statistic_columns(statistics: Sequence[str], quantiles: Sequence[float] = (),
                      count_above: Sequence[float] = ()) -> list[str]:
    """The feature columns (per matrix) that scoring ``statistics`` writes, in order."""
    return [c for s in statistics for c in (COLUMNS[s](quantiles, count_above) if s in COLUMNS else [s])]


def statistic(name: str, needs: Sequence[str]) -> Callable[[Callable[[UpdateStatistics], torch.Tensor]],
                                                           Callable[[UpdateStatistics], torch.Tensor]]:
    """Register ``fn(UpdateStatistics) → (B,)`` as statistic ``name``, reading the sums ``needs`` (of ``SUMS``)."""
    unknown = set(needs) - set(SUMS)
    if unknown:
        raise ValueError(f"statistic {name!r} needs unknown sums {sorted(unknown)}; known: {SUMS}")

    def register(fn: Callable[[UpdateStatistics], torch.Tensor]) -> Callable[[UpdateStatistics], torch.Tensor]:
        if name in BASIC or name in NEEDS:
            raise ValueError(f"statistic {name!r} is registered twice")
        BASIC[name] = fn
        NEEDS[name] = frozenset(needs)
        return fn

    return register


@statistic("mean_abs", needs=("abs_sum",))
def mean_abs(m: UpdateStatistics) -> torch.Tensor:
    """Σ|ΔW| / n: the paper's statistic."""
    return m.abs_sum / m.n


@statistic("l2", needs=("sq_sum",))
def l2(m: UpdateStatistics) -> torch.Tensor:
    """√(Σ ΔW²) = ‖ΔW‖_F: DONOD's norm of delta."""
    return m.sq_sum.sqrt()


@statistic("max_abs", needs=("max_abs",))
def max_abs(m: UpdateStatistics) -> torch.Tensor:
    """max |ΔW|."""
    return m.max_abs.clone()


@statistic("std", needs=("sum", "sq_sum"))
def std(m: UpdateStatistics) -> torch.Tensor:
    """√(Σ ΔW²/n − (Σ ΔW/n)²): population standard deviation of the elements."""
    mean = m.sum / m.n
    return (m.sq_sum / m.n - mean * mean).clamp_min(0).sqrt()


@statistic("don", needs=("dot_w", "sq_sum", "w_sq"))
def don(m: UpdateStatistics) -> torch.Tensor:
    """‖W+ΔW‖_F − ‖W‖_F (DONOD's delta of norm), stably: (2⟨W,ΔW⟩ + ‖ΔW‖²) / (‖W+ΔW‖_F + ‖W‖_F)."""
    num = 2 * m.dot_w + m.sq_sum
    new_norm = (m.w_sq + num).clamp_min(0).sqrt()
    return num / (new_norm + m.w_sq.sqrt()).clamp_min(_TINY)


@statistic("cos_to_weight", needs=("dot_w", "sq_sum", "w_sq"))
def cos_to_weight(m: UpdateStatistics) -> torch.Tensor:
    """⟨W,ΔW⟩ / (‖W‖_F ‖ΔW‖_F): does the step grow (>0) or shrink W."""
    return m.dot_w / (m.sq_sum.sqrt() * m.w_sq.sqrt()).clamp_min(_TINY)


def held_quantiles(held: torch.Tensor, quantiles: Sequence[float]) -> dict[str, torch.Tensor]:
    """Exact linear quantiles (as ``numpy.quantile``) of each row of ``held`` (B, n), which this reorders.

    Every order statistic the quantiles interpolate is selected in one partition of each row
    (numpy's introselect with all ranks at once, rows split over ``torch.get_num_threads()``
    threads) instead of two ``kthvalue`` calls per quantile; off the CPU, ``kthvalue``. The
    order statistics are elements of ``held`` and the interpolation runs in float64, so the
    result is the same to the bit whichever way the ranks are found.
    """
    n = held.shape[-1]
    ranks = quantile_ranks(quantiles, n)
    if held.device.type == "cpu":
        arr = held.numpy()
        rows = np.array_split(np.arange(arr.shape[0]), min(arr.shape[0], max(1, torch.get_num_threads())))

        def select(idx: np.ndarray) -> None:
            for i in idx:
                arr[i].partition(ranks)  # in place: numpy releases the GIL, so the threads overlap

        with ThreadPoolExecutor(len(rows)) as pool:
            list(pool.map(select, rows))
        at = {r: torch.from_numpy(arr[:, r].astype(np.float64)) for r in ranks}
    else:
        at = {r: torch.kthvalue(held, r + 1, dim=-1).values.to(torch.float64) for r in ranks}
    return interpolate(quantiles, n, at)


def quantile_ranks(quantiles: Sequence[float], n: int) -> list[int]:
    """The 0-based order statistics the linear quantiles of n values interpolate."""
    pos = [q * (n - 1) for q in quantiles]
    return sorted({int(p // 1) for p in pos} | {min(int(p // 1) + 1, n - 1) for p in pos})


def interpolate(quantiles: Sequence[float], n: int, at: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{column: (B,)}``: each quantile between the order statistics ``at[rank]`` (float64), as ``numpy.quantile``."""
    out = {}
    for col, q in zip(COLUMNS["quantiles"](quantiles, ()), quantiles, strict=True):
        p = q * (n - 1)
        r0 = int(p // 1)
        v0, v1 = at[r0], at[min(r0 + 1, n - 1)]
        out[col] = v0 + (v1 - v0) * (p - r0)
    return out


def _rows_to_f64(per_row: torch.Tensor) -> torch.Tensor:
    """(B, r) per-row partial sums → (B,) summed in float64."""
    return per_row.sum(dim=-1, dtype=torch.float64)


class UpdateStatistics:
    """Accumulates the statistics of B samples' updates ΔW of one weight matrix W.

    Call :meth:`update` with consecutive row blocks of ΔW (B, r, d_in) and the same rows of
    W (r, d_in); then :meth:`result` gives ``{name: (B,) float64}``.

    One read of a block serves every requested sum: each row's partial sum (over d_in
    elements, in the block's dtype) is formed by one reduction kernel and the rows are summed
    in float64 — the rounding of a row of ≤ 10⁴ fp32 elements (~1e-7 relative, unbiased) is far
    below the across-sample spread, and float64 accumulation over the rows keeps the total's
    error at that level whatever the matrix size. |ΔW| is written once, into the held buffer
    when quantiles are held, and serves Σ|ΔW|, max, min and the counts (on the CPU through
    numpy's vectorised comparisons). Only the sums the requested statistics read are formed.
    """

    def __init__(self, batch: int, shape: tuple[int, int], statistics: Sequence[str],
                 quantiles: Sequence[float] = (), count_above: Sequence[float] = (),
                 hold_elements: int = 1 << 21) -> None:
        self.stats = list(statistics)
        unknown = [st for st in self.stats if st not in NEEDS]
        if unknown:
            raise ValueError(f"unknown statistic {unknown[0]!r}")
        self.needs = frozenset().union(*(NEEDS[st] for st in self.stats))  # the sums to accumulate
        self.quantiles = list(quantiles) if "quantiles" in self.stats else []
        # quantiles: when the batch's |ΔW| fits in ``hold_elements`` it is kept and selected in one
        # go (one pass); otherwise block_quantiles finds them in more passes over the blocks
        self.hold = bool(self.quantiles) and batch * shape[0] * shape[1] <= hold_elements
        self.held: torch.Tensor | None = None  # (B, n) |ΔW|, allocated by the first block
        self.bounds = list(count_above) if "count_above" in self.stats else []
        self.n = shape[0] * shape[1]
        self.shape = shape
        f64 = dict(dtype=torch.float64)
        self.abs_sum = torch.zeros(batch, **f64)
        self.sum = torch.zeros(batch, **f64)
        self.sq_sum = torch.zeros(batch, **f64)
        self.max_abs = torch.zeros(batch, **f64)
        self.min_abs = torch.full((batch,), float("inf"), **f64)
        self.dot_w = torch.zeros(batch, **f64)
        self.w_sq = torch.zeros((), **f64)
        self.counts = torch.zeros(batch, len(self.bounds), **f64)
        self.rows_seen = 0
        self._scratch: torch.Tensor | None = None
        self._mask: np.ndarray | None = None

    def _abs(self, dw: torch.Tensor) -> torch.Tensor:
        """|ΔW| of the block, written into the held buffer (quantiles held) or a reused scratch buffer."""
        B, r, d = dw.shape
        if self.hold:
            if self.held is None:
                self.held = torch.empty(B, self.n, dtype=dw.dtype, device=dw.device)
            out = self.held[:, self.rows_seen * d:(self.rows_seen + r) * d].view(B, r, d)
        else:
            if self._scratch is None or self._scratch.numel() < dw.numel() or self._scratch.dtype != dw.dtype:
                self._scratch = torch.empty(dw.numel(), dtype=dw.dtype, device=dw.device)
            out = self._scratch[:dw.numel()].view(B, r, d)
        return torch.abs(dw, out=out)

    def _count(self, a: torch.Tensor) -> None:
        """#{|ΔW| > b} per sample for every bound (numpy's comparisons on the CPU: ~5× torch's ``(a > b).sum``)."""
        B = a.shape[0]
        if a.device.type != "cpu":
            for j, b in enumerate(self.bounds):
                self.counts[:, j] += (a > b).sum(dim=(1, 2)).to(torch.float64)
            return
        arr = a.numpy().reshape(B, -1)
        if self._mask is None or self._mask.size < arr.size:
            self._mask = np.empty(arr.size, dtype=bool)
        mask = self._mask[:arr.size].reshape(arr.shape)
        for j, b in enumerate(self.bounds):
            np.greater(arr, arr.dtype.type(b), out=mask)  # the bound in |ΔW|'s dtype, as torch's `a > b` compares
            self.counts[:, j] += torch.from_numpy(np.count_nonzero(mask, axis=1).astype(np.float64))

    def update(self, dw: torch.Tensor, w: torch.Tensor) -> None:
        """Add a row block: dw (B, r, d_in) and w (r, d_in), fp32 or float64; sums run in float64."""
        f64, need = torch.float64, self.needs
        if "sum" in need:
            self.sum += _rows_to_f64(dw.sum(dim=-1))
        if "sq_sum" in need:  # ‖row‖² per row: one reduction, no (B, r, d_in) product
            self.sq_sum += _rows_to_f64(torch.linalg.vector_norm(dw, 2, dim=-1).to(f64).square())
        if "dot_w" in need:  # ⟨ΔW_row, W_row⟩ per row: a batched matrix-vector product
            self.dot_w += _rows_to_f64(torch.einsum("brd,rd->br", dw, w))
        if "w_sq" in need:
            self.w_sq += torch.linalg.vector_norm(w, 2, dim=-1).to(f64).square().sum()
        if need & {"abs_sum", "max_abs", "min_abs"} or self.bounds or self.hold:
            a = self._abs(dw)
            if "abs_sum" in need:
                self.abs_sum += _rows_to_f64(a.sum(dim=-1))
            if "max_abs" in need:
                self.max_abs = torch.maximum(self.max_abs, a.amax(dim=(1, 2)).to(f64))
            if "min_abs" in need:
                self.min_abs = torch.minimum(self.min_abs, a.amin(dim=(1, 2)).to(f64))
            if self.bounds:
                self._count(a)
        self.rows_seen += dw.shape[1]

    def result(self, blocks: Callable[[], Iterable[torch.Tensor]] | None = None,
               bins: int = 1024, gather_elements: int = 1 << 22) -> dict[str, torch.Tensor]:
        """``{name: (B,) float64}``. Quantiles not held need ``blocks``: a function that yields the same
        ΔW row blocks (B, r, d_in) again, once per extra pass (see :func:`block_quantiles`)."""
        out: dict[str, torch.Tensor] = {}
        for s in self.stats:
            if s in BASIC:
                out[s] = BASIC[s](self)
            elif s == "quantiles" and self.hold:
                out.update(held_quantiles(self.held, self.quantiles))
                self.held = None
            elif s == "quantiles":
                if blocks is None:
                    raise ValueError("statistic `quantiles` needs the row blocks again: result(blocks=…)")
                out.update(block_quantiles(blocks, self.quantiles, self.n, self.min_abs, self.max_abs,
                                           bins, gather_elements))
            else:  # count_above (the constructor refused any name NEEDS does not know)
                for j, col in enumerate(COLUMNS["count_above"]((), self.bounds)):
                    out[col] = self.counts[:, j].clone()
        return out


def block_quantiles(blocks: Callable[[], Iterable[torch.Tensor]], quantiles: Sequence[float], n: int,
                    min_abs: torch.Tensor, max_abs: torch.Tensor, bins: int = 4096,
                    gather_elements: int = 1 << 22, max_passes: int = 64) -> dict[str, torch.Tensor]:
    """Exact quantiles of |ΔW| per sample (as ``numpy.quantile``, linear) without holding ΔW whole.

    ``blocks()`` yields the row blocks of ΔW (B, r, d_in) afresh on every call; ``min_abs`` and
    ``max_abs`` (B,) bound |ΔW|. A quantile at p = q·(n−1) interpolates the order statistics
    ⌊p⌋ and ⌊p⌋+1 (0-based ranks). Each rank is located by histogram refinement: an interval
    (lo, hi] that holds it is cut into ``bins`` bins, one pass over the blocks counts the
    elements per bin, and the interval shrinks to the bin where the cumulative count passes the
    rank, plus one bin either side so that the rounding of the bin arithmetic cannot lose it
    (every pass recounts #(|ΔW| ≤ lo) and #(|ΔW| ≤ hi) by plain comparison, so this is
    checked, not assumed). An interval holding ≤ ``gather_elements`` / (B·ranks) elements is
    gathered in the next pass and the exact value picked; one whose elements are all equal
    (ties, e.g. AdamW's saturated steps) ends at once. Ranks whose intervals coincide share
    one histogram. Memory: a few copies of one block; time: one pass per refinement, about
    log(range/gap)/log(bins/3) + 1 passes.
    """
    f64 = torch.float64
    B = min_abs.shape[0]
    ranks = quantile_ranks(quantiles, n)
    R = len(ranks)
    k = torch.tensor(ranks, dtype=torch.long).expand(B, R)  # (B, R) wanted ranks
    lo = torch.nextafter(min_abs, torch.tensor(-float("inf"), dtype=f64)).unsqueeze(1).expand(B, R).clone()
    hi = max_abs.unsqueeze(1).expand(B, R).clone()  # (lo, hi] holds every element
    value = torch.full((B, R), float("nan"), dtype=f64)
    done = torch.zeros(B, R, dtype=torch.bool)
    inside = torch.full((B, R), n, dtype=torch.long)  # #(lo < |ΔW| ≤ hi), estimated from the last pass
    cap = max(1, gather_elements // (B * R))
    offsets = (torch.arange(B) * (bins + 1)).unsqueeze(1)  # (B, 1): one bincount for all samples
    for _ in range(max_passes):
        if bool(done.all()):
            break
        gather = inside <= cap
        width = (hi - lo) / bins
        below = torch.zeros(B, R, dtype=torch.long)
        upto = torch.zeros(B, R, dtype=torch.long)
        hist = torch.zeros(B, R, bins, dtype=torch.long)
        in_min = torch.full((B, R), float("inf"), dtype=f64)
        in_max = torch.full((B, R), -float("inf"), dtype=f64)
        gathered: dict[tuple[int, int], list[torch.Tensor]] = {}
        leader = list(range(R))  # ranks whose intervals coincide (all, in the first pass) share the work
        for r in range(R):
            for j in range(r):
                if leader[j] == j and torch.equal(lo[:, j], lo[:, r]) and torch.equal(hi[:, j], hi[:, r]):
                    leader[r] = j
                    break
        active = [r for r in range(R) if leader[r] == r and not bool(done[:, r].all())]
        for block in blocks():
            a = block.abs().flatten(1).to(f64)  # (B, m)
            for r in active:
                lo_r, hi_r = lo[:, r:r + 1], hi[:, r:r + 1]
                le_lo, le_hi = a <= lo_r, a <= hi_r
                inb = le_hi & ~le_lo  # (B, m)
                below[:, r] += le_lo.sum(1)
                upto[:, r] += le_hi.sum(1)
                idx = (a - lo_r).div_(width[:, r:r + 1]).ceil_().sub_(1).clamp_(0, bins - 1).long()
                idx.masked_fill_(~inb, bins).add_(offsets)  # outside → the spare bin
                hist[:, r] += torch.bincount(idx.flatten(), minlength=B * (bins + 1)).view(B, bins + 1)[:, :bins]
                in_min[:, r] = torch.minimum(in_min[:, r], torch.where(inb, a, float("inf")).amin(1))
                in_max[:, r] = torch.maximum(in_max[:, r], torch.where(inb, a, -float("inf")).amax(1))
                for b in range(B):
                    if gather[b, r] and not done[b, r]:
                        gathered.setdefault((b, r), []).append(a[b][inb[b]])
        for r in range(R):
            j = leader[r]
            if j != r:
                below[:, r], upto[:, r], hist[:, r] = below[:, j], upto[:, j], hist[:, j]
                in_min[:, r], in_max[:, r] = in_min[:, j], in_max[:, j]
                for b in range(B):
                    if (b, j) in gathered:
                        gathered[(b, r)] = gathered[(b, j)]
        if not bool(((below <= k) & (k < upto))[~done].all()):
            raise RuntimeError("quantile search lost its rank: blocks() must yield the same ΔW on every call")
        flat = (in_min == in_max) & ~done  # every element of the interval is one value: the wanted one
        value = torch.where(flat, in_min, value)
        for b, r in (gather & ~flat & ~done).nonzero().tolist():
            if (b, r) not in gathered:  # its leader was not gathering: refine once more
                gather[b, r] = False
                continue
            value[b, r] = torch.kthvalue(torch.cat(gathered[(b, r)]), int(k[b, r] - below[b, r]) + 1).values
        finished = flat | (gather & ~done)
        cum = below.unsqueeze(-1) + hist.cumsum(-1)  # cum[..., j] ≈ #(|ΔW| ≤ upper edge of bin j)
        j = torch.searchsorted(cum, (k + 1).unsqueeze(-1)).squeeze(-1).clamp(max=bins - 1)  # the rank's bin
        new_lo = torch.where(j >= 1, lo + (j - 1) * width, lo)  # bins j−1 … j+1
        new_hi = torch.where(j + 2 < bins, lo + (j + 2) * width, hi)
        up = cum.gather(-1, (j + 1).clamp(max=bins - 1).unsqueeze(-1)).squeeze(-1)
        down = torch.where(j >= 2, cum.gather(-1, (j - 2).clamp(min=0).unsqueeze(-1)).squeeze(-1), below)
        todo = ~done & ~finished
        lo, hi = torch.where(todo, torch.maximum(new_lo, lo), lo), torch.where(todo, torch.minimum(new_hi, hi), hi)
        inside = torch.where(todo, up - down, inside)
        done |= finished
    else:
        raise RuntimeError(f"quantile search did not converge in {max_passes} passes")
    return interpolate(quantiles, n, {rk: value[:, i] for i, rk in enumerate(ranks)})
