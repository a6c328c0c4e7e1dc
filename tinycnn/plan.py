"""What a run does given its config, decided once: training, the LR finder, the checks and the grid all ask here.

`RunPlan.from_config(cfg)` settles the policy questions (the "overfit a small subset" check trains on a fixed
subset with no regularization: no augmentation or mixing, no weight decay, no label smoothing); the builders make the
model, the optimizer (timm's `create_optimizer_v2`: no weight decay on norms and biases) and the lr schedule
from a config the same way for every caller.
"""
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import timm
import torch
from timm.optim import create_optimizer_v2

from .augment import GPUAugment, MixupCutmix
from .config import Config, OptimizerConfig, SchedulerConfig, model_kwargs

__all__ = ["RunPlan", "build_model", "build_augment", "build_mixup", "model_description", "build_optimizer",
           "build_lr_lambda", "optimizer_implementation"]


@dataclass(frozen=True)
class RunPlan:
    """The data, augmentation and regularization a run uses."""
    train_subset: Optional[int]     # the first N train samples only (None: the whole split)
    val_subset: Optional[int]
    augment: bool
    weight_decay: float
    label_smoothing: float

    @classmethod
    def from_config(cls, cfg: Config) -> "RunPlan":
        t = cfg.train
        if t.overfit_small:  # the memorization check: can the model fit a small fixed subset at all?
            return cls(train_subset=t.overfit_small_size, val_subset=t.val_subset_size, augment=False,
                       weight_decay=0.0, label_smoothing=0.0)
        return cls(train_subset=None, val_subset=t.val_subset_size, augment=cfg.augment.enabled,
                   weight_decay=t.optimizer.weight_decay, label_smoothing=t.label_smoothing)


def build_model(cfg: Config, num_classes: int) -> torch.nn.Module:
    return timm.create_model(cfg.model, num_classes=num_classes, **model_kwargs(cfg))


def model_description(cfg: Config, model: torch.nn.Module) -> Dict[str, Any]:
    """What results tables and reports say about a model: its name, widths and depths (tinycnn), parameters."""
    return {"name": cfg.model, "stage_channels": list(getattr(model, "stage_channels", []) or []) or None,
            "stage_repeats": list(getattr(model, "stage_repeats", []) or []) or None,
            "num_parameters": sum(p.numel() for p in model.parameters())}


def build_augment(cfg: Config, plan: RunPlan, model: torch.nn.Module, **kwargs) -> GPUAugment:
    """The run's GPUAugment, normalizing with the model's own mean/std (its pretrained_cfg)."""
    return GPUAugment.for_model(model, {**dataclasses.asdict(cfg.augment), "enabled": plan.augment}, **kwargs)


def build_mixup(cfg: Config, plan: RunPlan, num_classes: int) -> Optional[MixupCutmix]:
    """The run's Mixup / CutMix (its soft targets carry the plan's label smoothing), or None: mixing is off
    unless an alpha is > 0, and off whenever the augmentation is (the overfit_small check included)."""
    m = cfg.mixup
    if not plan.augment or cfg.train.overfit_small or not (m.mixup_alpha > 0 or m.cutmix_alpha > 0):
        return None
    return MixupCutmix(num_classes, mixup_alpha=m.mixup_alpha, cutmix_alpha=m.cutmix_alpha, prob=m.prob,
                       switch_prob=m.switch_prob, mode=m.mode, label_smoothing=plan.label_smoothing)


def build_optimizer(model: torch.nn.Module, opt: OptimizerConfig, plan: RunPlan, *,
                    lr: Optional[float] = None) -> torch.optim.Optimizer:
    """timm's optimizer factory with the config's settings; fused kernels where the device has them.

    Build it after the model is on its device: fused constructors check where the parameters live.
    """
    device = next(model.parameters()).device
    kwargs = {}
    if opt.name in ("adam", "adamw"):
        kwargs["betas"] = tuple(opt.betas)
    if opt.name == "sgd":
        kwargs["nesterov"] = opt.nesterov and opt.momentum > 0
    if opt.name == "rmsprop":
        kwargs["alpha"] = 0.99  # torch's default (timm's registry defaults to 0.9)
    fused = opt.fused
    if fused == "auto":  # one kernel launch for all parameters instead of a loop (the course project's slow AdamW)
        fused = device.type in ("cuda", "mps") or (device.type == "cpu" and opt.name in ("adam", "adamw"))
    make = lambda **kw: create_optimizer_v2(  # noqa: E731
        model, opt.name, lr=opt.lr if lr is None else lr, weight_decay=plan.weight_decay, momentum=opt.momentum,
        **kwargs, **kw)
    if fused and opt.name in ("sgd", "adam", "adamw"):
        try:
            return make(fused=True)
        except (RuntimeError, TypeError, ValueError):  # an older torch without fused kernels for this device
            pass
    return make()


def optimizer_implementation(optimizer: torch.optim.Optimizer) -> str:
    """fused, foreach or for-loop: what `optimizer.step()` runs (recorded with the run)."""
    d = optimizer.defaults
    if d.get("fused"):
        return "fused"
    return "foreach" if d.get("foreach") is not False else "for-loop"


def build_lr_lambda(sched: SchedulerConfig, total_steps: int, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step s (0-based), for torch's LambdaLR."""
    if sched.name == "none":
        return lambda s: 1.0
    if sched.name == "cosine":
        warmup = int(round(sched.warmup_epochs * steps_per_epoch))
        floor = sched.min_lr_ratio

        def cosine(s):
            if s < warmup:
                return (s + 1) / warmup
            p = min(1.0, (s - warmup) / max(1, total_steps - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
        return cosine
    # one-cycle (torch's OneCycleLR shape): warm up from lr/25 to lr, anneal to lr/1e4, both cosine
    up = max(1, int(sched.pct_start * total_steps))

    def onecycle(s):
        if s < up:
            return 1 / 25 + (1 - 1 / 25) * 0.5 * (1 - math.cos(math.pi * s / up))
        p = min(1.0, (s - up) / max(1, total_steps - up))
        return 1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * p))
    return onecycle
