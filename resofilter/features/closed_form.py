"""The first optimizer step from a fresh state, in closed form.

For the first step the optimizer's state is known: Adam's bias-corrected moments are
m̂ = g and v̂ = g², so its update is lr·g/(|g|+eps) whatever the betas. Hence:

* ``sgd``   (torch.optim.SGD, coupled decay):     ΔW = −lr·(G + wd·W)
* ``adam``  (torch.optim.Adam, coupled L2 decay): g = G + wd·W,  ΔW = −lr·g/(|g| + eps)
* ``adamw`` (torch.optim.AdamW, decoupled decay): ΔW = −lr·(G/(|G| + eps) + wd·W)

With |G| ≫ eps Adam's update saturates at lr per element; the differences between samples
then come from elements with |G| ≲ eps and from the decay term.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from resofilter.errors import ConfigError
from resofilter.registry import register


@dataclass(frozen=True)
class StepConfig:
    name: str = "adamw"
    lr: float = 1e-5
    weight_decay: float = 0.01
    eps: float | None = 1e-8
    betas: tuple[float, float] | None = (0.9, 0.999)

    @classmethod
    def from_cfg(cls, cfg: object) -> StepConfig:
        get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
        betas = get("betas")
        return cls(name=get("name"), lr=float(get("lr")), weight_decay=float(get("weight_decay") or 0.0),
                   eps=None if get("eps") is None else float(get("eps")),
                   betas=None if betas is None else (float(betas[0]), float(betas[1])))

    def make_optimizer(self, params: object) -> torch.optim.Optimizer:
        """The literal torch optimizer this step stands for (used by the exact oracle)."""
        return step_optimizer(self.name).literal(params, self)


ClosedForm = Callable[[torch.Tensor, torch.Tensor, StepConfig], torch.Tensor]
Literal = Callable[[object, StepConfig], torch.optim.Optimizer]


@dataclass(frozen=True)
class StepOptimizer:
    """One kind of scored step: its first update in closed form and the torch optimizer it stands for."""

    name: str
    update: ClosedForm  # (grad (..., r, c), weight (r, c), step) → ΔW, which may be ``grad`` itself, overwritten
    literal: Literal  # (params, step) → the optimizer whose first step ``update`` equals
    needs_eps: bool


STEP_OPTIMIZERS: dict[str, StepOptimizer] = {}


def register_step_optimizer(name: str, literal: Literal, needs_eps: bool = True) -> Callable[[ClosedForm], ClosedForm]:
    """Register a closed-form first step under ``step.name=<name>`` (with the literal optimizer that
    the closed-vs-literal tests compare it against). The update may work in ``grad``'s storage and
    return it: :func:`one_step_update` hands it a copy unless its caller gives the gradient up."""
    def add(update: ClosedForm) -> ClosedForm:
        register(STEP_OPTIMIZERS, "step optimizer", name, StepOptimizer(name, update, literal, needs_eps))
        return update
    return add


def step_optimizer(name: str) -> StepOptimizer:
    if name not in STEP_OPTIMIZERS:
        raise ConfigError("step.name", f"unknown step optimizer {name!r}; expected {'|'.join(STEP_OPTIMIZERS)}")
    return STEP_OPTIMIZERS[name]


def _adam_kwargs(step: StepConfig) -> dict[str, object]:
    return dict(lr=step.lr, weight_decay=step.weight_decay, eps=step.eps, betas=step.betas or (0.9, 0.999))


@register_step_optimizer("sgd", lambda p, s: torch.optim.SGD(p, lr=s.lr, weight_decay=s.weight_decay),
                         needs_eps=False)
def _sgd(grad: torch.Tensor, weight: torch.Tensor, step: StepConfig) -> torch.Tensor:
    if step.weight_decay:  # −lr·(G + wd·W), in G's storage
        grad.add_(step.weight_decay * weight)
    return grad.mul_(-step.lr)


def _normalized(g: torch.Tensor, eps: float) -> torch.Tensor:
    """g / (|g| + eps) in g's storage: Adam's first update per unit of lr (m̂ = g, v̂ = g²)."""
    return g.div_(g.abs().add_(eps))


@register_step_optimizer("adam", lambda p, s: torch.optim.Adam(p, **_adam_kwargs(s)))
def _adam(grad: torch.Tensor, weight: torch.Tensor, step: StepConfig) -> torch.Tensor:
    if step.weight_decay:  # coupled L2: g = G + wd·W
        grad.add_(step.weight_decay * weight)
    return _normalized(grad, step.eps).mul_(-step.lr)


@register_step_optimizer("adamw", lambda p, s: torch.optim.AdamW(p, **_adam_kwargs(s)))
def _adamw(grad: torch.Tensor, weight: torch.Tensor, step: StepConfig) -> torch.Tensor:
    upd = _normalized(grad, step.eps)
    if step.weight_decay:  # decoupled: −lr·(G/(|G| + eps) + wd·W)
        upd.add_(step.weight_decay * weight)
    return upd.mul_(-step.lr)


def one_step_update(grad: torch.Tensor, weight: torch.Tensor, step: StepConfig,
                    inplace: bool = False) -> torch.Tensor:
    """ΔW of one fresh optimizer step. grad: (..., r, c); weight: (r, c), broadcast.

    ``inplace``: the caller gives ``grad`` up and ΔW is formed in its storage (the fast scorer's
    gradient blocks: no (B, r, c) temporary per operation); otherwise ``grad`` is left as it was.
    In place or not, every element is rounded by the same operations in the same order.
    """
    opt = step_optimizer(step.name)
    if opt.needs_eps and step.eps is None:
        raise ConfigError("step.eps", f"required for step.name={step.name}")
    return opt.update(grad if inplace else grad.clone(), weight, step)
