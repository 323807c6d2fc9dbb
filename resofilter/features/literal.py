"""The literal oracle (``score.mode=literal``): the authors' literal per-sample procedure.

For every sample: restore the original weights, build a fresh ``torch.optim`` optimizer
over all parameters, one forward/backward on that sample alone (prompt masked), one
``.step()``, and diff the chosen weights: ΔW = W_after − W_before.

It runs in ``score.literal_dtype`` (float64 by default). In float32 the rounding of
W_after − W_before (≈1e-5 steps on weights of ≈1e-2) adds noise larger than the
across-sample spread of the statistic, so an fp32 literal loop ranks samples largely by
rounding noise; ``literal_dtype=float32`` reproduces the authors' procedure, noise included.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from resofilter.data.tokenize import IGNORE_INDEX
from resofilter.errors import ResoFilterError
from resofilter.features.closed_form import StepConfig
from resofilter.features.fast import BatchScores, resolve_sketch_layers, token_losses
from resofilter.features.sketch import Projector, SketchSpec
from resofilter.features.statistics import UpdateStatistics
from resofilter.features.targets import Target, decoder_layers


class LiteralScorer:
    """Same interface and output as :class:`~resofilter.features.fast.FastScorer`."""

    def __init__(self, model: torch.nn.Module, targets: Sequence[Target], step: StepConfig,
                 statistics: Sequence[str], quantiles: Sequence[float] = (),
                 count_above: Sequence[float] = (), dtype: torch.dtype = torch.float64,
                 sketch: SketchSpec | None = None) -> None:
        self.model = copy.deepcopy(model).to(dtype)
        self.model.eval()  # no dropout: the step must be a function of the sample alone
        for p in self.model.parameters():
            p.requires_grad_(True)
        modules = dict(self.model.named_modules())
        self.target_names = [t.name for t in targets]
        self.weights = {n: modules[n].weight for n in self.target_names}
        self.params = [p for p in self.model.parameters()]
        self.saved = [p.detach().clone() for p in self.params]
        self.step = step
        self.statistics, self.quantiles, self.count_above = list(statistics), list(quantiles), list(count_above)
        self.sketch_spec = sketch if sketch is not None and sketch.enabled else None
        self.projector = None
        if self.sketch_spec is not None:  # the same projections as the fast scorer's (seeded by matrix name)
            chosen = set(resolve_sketch_layers(self.sketch_spec, len(decoder_layers(self.model)[1])))
            shapes = {t.name: tuple(self.weights[t.name].shape) for t in targets if t.layer in chosen}
            self.projector = Projector(self.sketch_spec, shapes, dtype)

    def _restore(self) -> None:
        with torch.no_grad():
            for p, s in zip(self.params, self.saved, strict=True):
                p.copy_(s)

    def __call__(self, batch: dict[str, Any]) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor, torch.Tensor]:
        out = self.score_batch(batch)
        return out.stats, out.losses, out.n_tokens

    def score_batch(self, batch: dict[str, Any]) -> BatchScores:
        """As :meth:`FastScorer.score_batch`, one sample and one real optimizer step at a time."""
        B, T = batch["input_ids"].shape
        per_target: dict[str, list[dict[str, torch.Tensor]]] = {n: [] for n in self.target_names}
        losses, counts = [], []
        tok_all = torch.zeros(B, max(T - 1, 0), dtype=torch.float64)
        sketches: list[torch.Tensor] = []
        device = self.saved[0].device
        for b in range(B):
            keep = batch["attention_mask"][b].bool()  # the sample alone, no padding
            ids = batch["input_ids"][b][keep].unsqueeze(0).to(device)
            labels = batch["labels"][b][keep].unsqueeze(0).to(device)
            self._restore()
            before = {n: w.detach().clone() for n, w in self.weights.items()}
            opt = self.step.make_optimizer(self.params)  # fresh state every sample
            opt.zero_grad(set_to_none=True)
            with torch.enable_grad():  # callers (Lightning predict) may run under no_grad
                logits = self.model(input_ids=ids, use_cache=False).logits
                tok = token_losses(logits, labels)
                n = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)
                loss = tok.sum(dim=1) / n.clamp_min(1)
                loss.sum().backward()
            tok_all[b, :tok.shape[1]] = tok.detach()[0].to(torch.float64)  # right padding: the same positions
            if not bool(torch.isfinite(loss).all()):
                raise ResoFilterError(f"non-finite loss for sample {batch['sample_ids'][b]!r}: "
                                      "the model overflows on it; nothing was written for its shard")
            grads = ({n: self.weights[n].grad.detach().clone() for n in self.projector.names}
                     if self.projector is not None and self.sketch_spec.of == "gradient" else None)
            opt.step()
            if self.projector is not None:
                mats = grads if grads is not None else {n: self.weights[n].detach() - before[n]
                                                        for n in self.projector.names}
                sketches.append(torch.cat([self.projector.of_matrix(n, mats[n].unsqueeze(0))
                                           for n in self.projector.names], dim=1))
            for name, w in self.weights.items():
                dw = (w.detach() - before[name]).unsqueeze(0)  # (1, d_out, d_in)
                acc = UpdateStatistics(1, tuple(w.shape), self.statistics, self.quantiles, self.count_above)
                acc.update(dw, before[name])
                per_target[name].append(acc.result(blocks=lambda dw=dw: [dw]))
            losses.append(loss.detach().to(torch.float64))
            counts.append(n)
        self._restore()
        result = {name: {k: torch.cat([r[k] for r in rows]) for k in rows[0]} for name, rows in per_target.items()}
        return BatchScores(result, torch.cat(losses), torch.cat(counts), tok_all,
                           torch.cat(sketches) if sketches else None)
