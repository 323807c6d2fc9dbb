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

from dataclasses import dataclass

import torch

from resofilter.errors import ConfigError


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
        if self.name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, weight_decay=self.weight_decay)
        kw = dict(lr=self.lr, weight_decay=self.weight_decay, eps=self.eps, betas=self.betas or (0.9, 0.999))
        if self.name == "adam":
            return torch.optim.Adam(params, **kw)
        if self.name == "adamw":
            return torch.optim.AdamW(params, **kw)
        raise ConfigError("step.name", f"unknown step optimizer {self.name!r}; expected sgd|adam|adamw")


def one_step_update(grad: torch.Tensor, weight: torch.Tensor, step: StepConfig) -> torch.Tensor:
    """ΔW of one fresh optimizer step. grad: (..., r, c); weight: (r, c), broadcast."""
    lr, wd = step.lr, step.weight_decay
    if step.name == "sgd":
        return -lr * (grad + wd * weight) if wd else -lr * grad
    if step.eps is None:
        raise ConfigError("step.eps", f"required for step.name={step.name}")
    if step.name == "adam":
        g = grad + wd * weight if wd else grad
        return -lr * (g / (g.abs() + step.eps))
    if step.name == "adamw":
        upd = grad / (grad.abs() + step.eps)
        return -lr * (upd + wd * weight) if wd else -lr * upd
    raise ConfigError("step.name", f"unknown step optimizer {step.name!r}; expected sgd|adam|adamw")
