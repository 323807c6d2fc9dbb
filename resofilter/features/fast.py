"""Fast per-sample scoring: one batched forward, a truncated backward, closed-form step.

For a padded batch whose loss is the **sum of per-sample mean losses**, the gradient of
sample b's loss w.r.t. a Linear weight is ``G_b = Σ_t δ_{b,t}ᵀ x_{b,t}`` where x is the
layer's input and δ the gradient w.r.t. its output: no sample's loss depends on another's
tokens, so padding and batch composition cannot leak between samples. Hooks capture x
and the outputs; ``torch.autograd.grad`` returns δ. The backward starts at the scored
modules' outputs: a scored output that no other scored module feeds is made a fresh leaf,
so everything computed before it (the layers below, the lowest scored layer's attention
when up_proj is scored) runs without a graph and keeps no activations; and no weight
gradient is ever formed for the whole batch — only per-sample blocks of rows.

The (B, T, V) logits are never built whole either (``logits_chunk_elements``): the decoder
returns the final hidden states h, the output head and the loss run on slices of positions
whose gradient w.r.t. h is taken at once, and that ∂loss/∂h is pushed back through the
decoder in one call. With gemma-2's 256k vocabulary the whole fp32 logits, their
log-softmax and its gradient would be ~40 GB for a batch of 16 × 768 tokens.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge

from resofilter.data.tokenize import IGNORE_INDEX
from resofilter.errors import ResoFilterError
from resofilter.features.closed_form import StepConfig, one_step_update
from resofilter.features.sketch import Projector, SketchSpec
from resofilter.features.statistics import UpdateStatistics
from resofilter.features.targets import Target, decoder_layers, resolve_indices


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Response-token cross-entropy (B, T−1) in fp32+ (0 at prompt and padding positions)."""
    shift_logits = logits[:, :-1]
    if shift_logits.dtype not in (torch.float32, torch.float64):
        shift_logits = shift_logits.float()
    return torch.nn.functional.cross_entropy(
        shift_logits.transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none")


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean response-token cross-entropy per sample (B,) in fp32+, and token counts (B,)."""
    tok = token_losses(logits, labels)
    n = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)  # (B,)
    return tok.sum(dim=1) / n.clamp_min(1), n


@dataclass
class BatchScores:
    """Everything one scoring pass gives for a batch.

    ``stats``: ``{target: {statistic: (B,)}}``; ``losses``/``n_tokens`` (B,); ``token_losses``
    (B, T−1) (0 off the response); ``sketch`` (B, D) when sketches are on.
    """

    stats: dict[str, dict[str, torch.Tensor]]
    losses: torch.Tensor
    n_tokens: torch.Tensor
    token_losses: torch.Tensor
    sketch: torch.Tensor | None = None


class ChunkedHeadLoss:
    """Per-sample mean losses and ∂(Σ losses)/∂h from the final hidden states, a slice of positions at a time.

    The head is the model's output embedding plus gemma-2's final logit soft-capping, as
    in ``Gemma2ForCausalLM.forward``; :meth:`FastScorer.check_head` compares it once
    against the model's own logits, so an architecture with another head fails loudly.
    """

    def __init__(self, model: torch.nn.Module, chunk_elements: int) -> None:
        self.head = model.get_output_embeddings()
        self.cap = getattr(model.config, "final_logit_softcapping", None)
        self.vocab = self.head.weight.shape[0]
        self.chunk_elements = chunk_elements

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.head(h)
        if self.cap:
            logits = torch.tanh(logits / self.cap) * self.cap
        return logits

    def __call__(self, h: torch.Tensor, labels: torch.Tensor, grad: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(losses (B,), token counts (B,), ∂Σlosses/∂h (B, T, d), token losses (B, T−1)) for ``h`` (B, T, d).

        ``grad=False``: no gradient (the third item is ``None``).
        """
        B, T, _ = h.shape
        shift_labels = labels[:, 1:].to(h.device)  # a model split over devices: h is the last one's
        n = (shift_labels != IGNORE_INDEX).sum(dim=1)
        loss_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
        weight = 1.0 / n.clamp_min(1).to(loss_dtype)  # d(mean over sample b)/d(token loss)
        dh = torch.zeros_like(h) if grad else None
        tok = h.new_zeros(B, max(T - 1, 0), dtype=loss_dtype)  # the logits below are cast to this dtype too
        span = max(1, self.chunk_elements // max(1, B * self.vocab))
        for t0 in range(0, T - 1, span):
            t1 = min(T - 1, t0 + span)
            lab = shift_labels[:, t0:t1]
            if not bool((lab != IGNORE_INDEX).any()):
                continue  # prompt or padding only: no loss, no gradient
            hc = h[:, t0:t1].detach().requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                logits = self.logits(hc)  # (B, span, V): the only logits that exist at any time
                if logits.dtype not in (torch.float32, torch.float64):
                    logits = logits.float()
                part = torch.nn.functional.cross_entropy(logits.transpose(1, 2), lab.to(logits.device),
                                                         ignore_index=IGNORE_INDEX, reduction="none")  # (B, span)
                del logits  # the graph keeps the log-probabilities, not these: one (B, span, V) fewer at the peak
                if dh is not None:
                    (dh[:, t0:t1],) = torch.autograd.grad((part.sum(dim=1) * weight.to(part.device)).sum(), hc)
            tok[:, t0:t1] = part.detach()
        return tok.sum(dim=1) * weight, n, dh, tok


@torch.no_grad()
def response_losses(model: torch.nn.Module, batch: dict[str, Any],
                    head_loss: ChunkedHeadLoss | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean response-token losses (B,) and token counts, no gradient.

    With ``head_loss`` the logits exist a slice of positions at a time (as in scoring);
    without, the model's own forward builds them whole.
    """
    device = input_device(model)
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    labels = batch["labels"].to(device)
    if head_loss is None:
        return per_sample_loss(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, labels)
    h = model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    losses, n, _, _ = head_loss(h, labels, grad=False)
    return losses, n


def input_device(model: torch.nn.Module) -> torch.device:
    """Where the token ids go: the input embeddings' device (the first of a model split over devices)."""
    return model.get_input_embeddings().weight.device


def split_devices(model: torch.nn.Module) -> set[str]:
    """The devices a model was placed over with a ``device_map`` (empty: not placed so)."""
    return {str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}


@contextlib.contextmanager
def recomputed_layers(model: torch.nn.Module, lowest: int) -> Iterator[None]:
    """Decoder layers from ``lowest`` up keep no activations in the forward: the backward recomputes
    each layer's (``torch.utils.checkpoint``, non-reentrant), so the graph holds one layer's at a time
    instead of every scored layer's. The recomputation repeats the same kernels on the same inputs:
    the gradients are the same to the last bit (tested)."""
    from torch.utils.checkpoint import checkpoint

    _, layers = decoder_layers(model)
    originals = []
    for layer in list(layers)[lowest:]:
        forward = layer.forward  # the class's, or a wrapper set on the instance (accelerate's device hooks)
        originals.append((layer, forward, "forward" in vars(layer)))

        def checkpointed(*args: Any, _forward: Any = forward, **kwargs: Any) -> Any:
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        layer.forward = checkpointed
    try:
        yield
    finally:
        for layer, forward, own in originals:
            if own:
                layer.forward = forward
            else:
                del layer.forward  # the instance attribute: the class's forward again


class FastScorer:
    """Scores a batch: ``{target name: {statistic: (B,)}}`` plus per-sample loss and token counts."""

    def __init__(self, model: torch.nn.Module, targets: Sequence[Target], step: StepConfig,
                 statistics: Sequence[str], quantiles: Sequence[float] = (),
                 count_above: Sequence[float] = (), chunk_elements: int = 1 << 21,
                 logits_chunk_elements: int = 1 << 24, sketch: SketchSpec | None = None,
                 recompute: bool = False, quantile_hold_elements: int = 1 << 25) -> None:
        self.model = model
        self.targets = list(targets)
        self.step = step
        self.statistics = list(statistics)
        self.quantiles = list(quantiles)
        self.count_above = list(count_above)
        self.chunk_elements = chunk_elements
        self.quantile_hold_elements = quantile_hold_elements
        self.recompute = recompute
        self.lowest = min(t.layer for t in self.targets)
        for p in model.parameters():
            p.requires_grad_(False)
        # Per-sample gradients and updates are formed in fp32 (float64 for a float64 model),
        # whatever dtype the model runs in; the statistics accumulate them in float64.
        self.work = torch.float64 if self.targets[0].module.weight.dtype == torch.float64 else torch.float32
        self.weights = {t.name: t.module.weight.detach().to(self.work) for t in self.targets}
        # 0: the model's own forward and whole logits; >0: the head runs on slices of positions
        self.head_loss = ChunkedHeadLoss(model, logits_chunk_elements) if logits_chunk_elements > 0 else None
        self._head_checked = False
        self.sketch_spec = sketch if sketch is not None and sketch.enabled else None
        self.projector = None
        if self.sketch_spec is not None:
            n_layers = len(decoder_layers(model)[1])
            chosen = set(resolve_sketch_layers(self.sketch_spec, n_layers))
            shapes = {t.name: tuple(t.module.weight.shape) for t in self.targets if t.layer in chosen}
            if not shapes:
                raise ResoFilterError(f"score.sketch.indices {self.sketch_spec.indices} selects none of the scored "
                                      f"layers {sorted({t.layer for t in self.targets})} (score.candidates)")
            self.projector = Projector(self.sketch_spec, shapes, self.work,
                                       {n: self.weights[n].device for n in shapes})

    def check_head(self, batch: dict[str, Any], positions: int = 8) -> None:
        """Once: the chunked head's logits of the first sample's last positions equal the model's own."""
        mask = batch["attention_mask"][:1].bool()[0]
        ids = batch["input_ids"][:1, mask].to(input_device(self.model))
        with torch.no_grad():
            ref = self.model(input_ids=ids, use_cache=False, logits_to_keep=positions).logits
            h = self.model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
            got = self.head_loss.logits(h[:, -ref.shape[1]:]).to(ref.device)
        tol = 1e-4 if h.dtype in (torch.float32, torch.float64) else 2e-2
        if got.shape != ref.shape or not torch.allclose(got, ref, rtol=tol, atol=tol * float(ref.abs().max())):
            raise ResoFilterError(
                f"{type(self.model).__name__}'s logits are not output_embeddings(hidden) (+ gemma-2 soft-capping), "
                "so the loss cannot be computed a slice at a time; set score.logits_chunk_elements=0")
        self._head_checked = True

    def _activations(
        self, batch: dict[str, Any]
    ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor, torch.Tensor]:
        """One forward + truncated backward: ``{target: (δ, x)}`` (padding zeroed), losses, token counts,
        token losses."""
        model = self.model
        device = input_device(model)
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        labels = batch["labels"].to(device)
        inputs: dict[str, torch.Tensor] = {}
        edges: dict[str, GradientEdge] = {}

        def make_pre_hook(name: str):  # noqa: ANN202
            def pre_hook(module: Any, args: tuple) -> tuple | None:
                x = args[0]
                if name not in inputs:  # the first forward's; a recomputation repeats the same values
                    inputs[name] = x.detach()
                if x.requires_grad:
                    return None
                # no scored module upstream reaches this input: the backward stops here, so nothing
                # computed before it (the layers below, this layer's attention) keeps a graph. The leaf
                # is the captured input's own storage: it costs no memory
                return (x.detach().requires_grad_(True), *args[1:])

            return pre_hook

        def make_hook(name: str):  # noqa: ANN202
            def hook(module: Any, args: tuple, out: torch.Tensor) -> None:
                # the backward needs the output's place in the graph, not its values: holding the edge
                # lets a recomputed layer's output go (one (B, T, d_out) tensor per target)
                edges.setdefault(name, get_gradient_edge(out))

            return hook

        handles = [h for t in self.targets for h in (t.module.register_forward_pre_hook(make_pre_hook(t.name)),
                                                      t.module.register_forward_hook(make_hook(t.name)))]
        try:
            recompute = recomputed_layers(model, self.lowest) if self.recompute else contextlib.nullcontext()
            with torch.enable_grad(), recompute:
                # positions count real tokens only, so left and right padding see the same sequence
                pos = (mask.cumsum(-1) - 1).clamp_min(0)
                kw = dict(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
                if self.head_loss is None:
                    logits = model(**kw).logits
                    tok = token_losses(logits, labels)
                    n_tok = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)
                    losses = tok.sum(dim=1) / n_tok.clamp_min(1)
                    del logits
                    # Sum of per-sample means: ∂/∂(sample b's activations) is exactly ∂loss_b.
                    deltas = torch.autograd.grad(losses.sum(), [edges[t.name] for t in self.targets])
                else:
                    h = model.get_decoder()(**kw).last_hidden_state
                    losses, n_tok, dh, tok = self.head_loss(h, labels)
                    deltas = torch.autograd.grad(h, [edges[t.name] for t in self.targets], grad_outputs=dh)
                    del h, dh
        finally:
            for hd in handles:
                hd.remove()
        edges.clear()
        if not bool(torch.isfinite(losses).all()):
            raise ResoFilterError(
                f"non-finite loss for samples {batch.get('sample_ids')}: the model overflows on them "
                "(gemma-2 in float64 with padding does: use score.batch_size=1 or float32)")
        pad = ~mask.unsqueeze(-1).bool()  # (B, T, 1): padded positions contribute nothing
        # fill, not multiply: a padded row may hold inf/nan that must not leak (nan·0 = nan). In place:
        # the graph is freed, so these buffers (fresh gradients, hooked inputs) belong to us alone.
        acts = {t.name: (d.masked_fill_(pad.to(d.device), 0), inputs.pop(t.name).masked_fill_(pad.to(d.device), 0))
                for t, d in zip(self.targets, deltas, strict=True)}
        return acts, losses.detach(), n_tok, tok.detach()

    def __call__(self, batch: dict[str, Any]) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor, torch.Tensor]:
        out = self.score_batch(batch)
        return out.stats, out.losses, out.n_tokens

    def score_batch(self, batch: dict[str, Any]) -> BatchScores:
        """Statistics, losses, token losses and (if on) sketches of a batch, from one pass."""
        if self.head_loss is not None and not self._head_checked:
            self.check_head(batch)
        acts, losses, n_tok, tok = self._activations(batch)
        proj = self.projector
        sketches: dict[str, torch.Tensor] = {}
        stats = {}
        for t in self.targets:
            delta, x = acts.pop(t.name)
            sketched = proj is not None and t.name in proj.p_out
            if sketched and self.sketch_spec.of == "gradient":
                sketches[t.name] = proj.of_factors(t.name, delta, x)
            parts: list[torch.Tensor] | None = [] if sketched and self.sketch_spec.of == "update" else None
            stats[t.name] = self._statistics(t, delta, x, parts)
            if parts is not None:
                sketches[t.name] = torch.cat(parts)
        sketch = torch.cat([sketches[n].to(losses.device) for n in proj.names], dim=1) if proj is not None else None
        return BatchScores(stats, losses, n_tok, tok, sketch)

    def per_sample_grads(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Full per-sample weight gradients ``{target: (B, d_out, d_in)}`` (tests and analysis)."""
        acts, _, _, _ = self._activations(batch)
        return {name: torch.cat([g for _, _, g in self._grad_blocks(d, x)], dim=1) for name, (d, x) in acts.items()}

    def _grad_blocks(self, delta: torch.Tensor, x: torch.Tensor, reuse: bool = False
                     ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Per-sample gradient rows ``(r0, r1, G[:, r0:r1])`` with G_b = Σ_t δ_{b,t}ᵀ x_{b,t}.

        ``reuse``: every block is written into one buffer, overwritten by the next (the caller is done
        with a block when it asks for the next): no allocation, and no page faults, per block.
        """
        B, _, d_out = delta.shape
        d_in = x.shape[-1]
        delta_t = delta.to(self.work).transpose(1, 2)  # (B, d_out, T)
        x = x.to(self.work)  # (B, T, d_in)
        rows = chunk_rows(d_out, d_in, B, self.chunk_elements)
        buffer = torch.empty(B * rows * d_in, dtype=self.work, device=x.device) if reuse else None
        for r0 in range(0, d_out, rows):
            r1 = min(d_out, r0 + rows)
            out = buffer[:B * (r1 - r0) * d_in].view(B, r1 - r0, d_in) if reuse else None
            yield r0, r1, torch.bmm(delta_t[:, r0:r1], x, out=out)  # (B, r, d_in)

    def _group_size(self, batch: int, n: int) -> int:
        """Samples whose |ΔW| of one matrix are held together for exact quantiles (``quantile_hold_elements``),
        the whole batch when quantiles are not scored (G_b is per sample: groups cost no extra work)."""
        if "quantiles" not in self.statistics or n > self.quantile_hold_elements:
            return batch  # quantiles, if any, by block_quantiles' passes over the whole batch
        return max(1, min(batch, self.quantile_hold_elements // n))

    def _statistics(self, target: Target, delta: torch.Tensor, x: torch.Tensor,
                    sketch_parts: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Stats of ΔW_b for every sample, built in row blocks of per-sample gradients.

        ``sketch_parts``: receives the sketch of ΔW_b of every sample (B, D), in groups of samples.
        """
        w = self.weights[target.name]  # (d_out, d_in) in the work dtype
        B = delta.shape[0]
        group = self._group_size(B, w.numel())
        results = []
        for s0 in range(0, B, group):
            d, xs = delta[s0:s0 + group], x[s0:s0 + group]
            acc = UpdateStatistics(d.shape[0], tuple(w.shape), self.statistics, self.quantiles, self.count_above,
                                   hold_elements=self.quantile_hold_elements)

            def updates(d: torch.Tensor = d, xs: torch.Tensor = xs) -> Iterator[tuple[int, int, torch.Tensor]]:
                for r0, r1, g in self._grad_blocks(d, xs, reuse=True):
                    yield r0, r1, one_step_update(g, w[r0:r1], self.step, inplace=True)  # (b, r, d_in)

            parts = []
            for r0, r1, dw in updates():
                if sketch_parts is not None:
                    parts.append(self.projector.of_rows(target.name, r0, r1, dw))
                acc.update(dw, w[r0:r1])
            if parts:
                sketch_parts.append(torch.stack(parts).sum(dim=0))
            # quantiles not held take more passes over the same blocks, recomputed: ΔW is never held whole
            results.append(acc.result(blocks=lambda u=updates: (dw for *_, dw in u()),
                                      gather_elements=self.chunk_elements))
        return {k: torch.cat([r[k] for r in results]) for k in results[0]}


def chunk_rows(d_out: int, d_in: int, batch: int, chunk_elements: int) -> int:
    """Rows per block so that batch × rows × d_in ≤ chunk_elements (at least one row)."""
    return max(1, min(d_out, chunk_elements // max(1, batch * d_in)))


def ppl(loss: torch.Tensor) -> torch.Tensor:
    return torch.exp(loss.clamp(max=math.log(torch.finfo(torch.float64).max)))


def resolve_sketch_layers(spec: SketchSpec, n_layers: int) -> list[int]:
    return resolve_indices(spec.indices, n_layers, "score.sketch.indices")
