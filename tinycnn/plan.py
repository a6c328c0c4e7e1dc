"""The one run builder: what a run trains, built from its config in one place.

Training, the LR finder, the checks, the benchmarks and the model comparison all build here, so they run the same
thing. `RunPlan.from_config(cfg)` settles the policy questions (the "overfit a small subset" check trains on a fixed
subset with no regularization: no augmentation or mixing, no weight decay, no label smoothing). `build_loaders` makes
a run's train and val loaders; `build_training` makes the model (on its device, channels_last where the config says),
the optimizer (timm's `create_optimizer_v2`: no weight decay on norms and biases), the lr schedule, the device
augmentation, Mixup / CutMix and the TrainStep, prepared by accelerate when an accelerator is given.
"""
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, Union

import timm
import torch
from timm.optim import create_optimizer_v2
from timm.utils import unwrap_model

from .augment import GPUAugment, MixupCutmix
from .config import Config, OptimizerConfig, SchedulerConfig, model_kwargs
from .data import ShardLoader, build_loader
from .step import TrainStep

__all__ = ["RunPlan", "Training", "build_training", "build_loaders", "build_model", "build_augment", "build_mixup",
           "model_description", "build_optimizer", "build_lr_lambda", "optimizer_implementation"]


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
    """Multiplier of the base lr at optimizer step s (0-based), for torch's LambdaLR.

    cosine is timm's CosineLRScheduler (per step, warmup as a prefix) with its warmup one step earlier, so that no
    step trains at lr 0 (tests/test_config.py compares the two); one-cycle is torch's OneCycleLR shape."""
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


def build_loaders(cfg: Config, plan: RunPlan, *, rank: int = 0, world_size: int = 1, val: bool = True,
                  train_once: bool = False) -> Tuple[ShardLoader, Optional[ShardLoader]]:
    """The run's train loader (shuffled, this rank's shards) and val loader (exactly once; None when not `val`).

    train_once: the train split read exactly once, unshuffled, instead (what a device-resident copy keeps)."""
    d, t = cfg.data, cfg.train
    common = dict(rank=rank, world_size=world_size, num_workers=d.num_workers, seed=t.seed, skip_bad=d.skip_bad,
                  cache_dir=d.cache_dir, cache_max_bytes=d.cache_max_bytes)
    if train_once:
        train = build_loader(d.root, d.train_split, batch_size=t.batch_size, train=False, subset=plan.train_subset,
                             **common)
    else:
        train = build_loader(d.root, d.train_split, batch_size=t.batch_size, train=True, subset=plan.train_subset,
                             shuffle_buffer=d.shuffle_buffer, **common)
    if not val:
        return train, None
    try:
        return train, build_loader(d.root, d.val_split, batch_size=t.batch_size, train=False,
                                   subset=plan.val_subset, **common)
    except BaseException:
        train.close()
        raise


@dataclass
class Training:
    """What a training loop steps, from `build_training`."""
    plan: RunPlan
    model: torch.nn.Module              # prepared by the accelerator when there is one (DDP under several processes)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR  # stepped once per optimizer step, by the loop
    augment: GPUAugment
    mixup: Optional[MixupCutmix]
    step: TrainStep
    channels_last: bool

    @property
    def raw_model(self) -> torch.nn.Module:
        """The plain model (what is saved, evaluated and averaged)."""
        return unwrap_model(self.model)


def build_training(cfg: Config, num_classes: int, *, accelerator=None, device: Union[str, torch.device, None] = None,
                   total_steps: int = 1, steps_per_epoch: int = 1, lr: Optional[float] = None,
                   augment: bool = True, compile_augment: Union[bool, str] = "auto") -> Training:
    """The model, optimizer, lr schedule, augmentation, mixing and train step of `cfg`, on the accelerator's device
    (prepared by it) or on `device` with plain torch (the config's mixed precision; "auto" = bf16 on CUDA).

    lr: the optimizer's starting lr instead of the config's (the LR finder); augment=False: the step takes
    normalized float batches (a benchmark of the step alone)."""
    from .device import resolve_mixed_precision

    t = cfg.train
    plan = RunPlan.from_config(cfg)
    device = accelerator.device if accelerator is not None else torch.device(device or "cpu")
    channels_last = t.channels_last is True or (t.channels_last == "auto" and device.type == "cuda")
    model = build_model(cfg, num_classes).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    # after the model is on its device: fused optimizer constructors check where the parameters are
    optimizer = build_optimizer(model, t.optimizer, plan, lr=lr)
    if accelerator is not None:
        model, optimizer = accelerator.prepare(model, optimizer)
    # stepped by the loop once per optimizer step (accelerate's scheduler wrapper would step it per process)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, build_lr_lambda(t.scheduler, total_steps, steps_per_epoch))
    aug = build_augment(cfg, plan, unwrap_model(model), channels_last=channels_last).to(device)
    mixup = build_mixup(cfg, plan, num_classes)
    mixed_precision = None if accelerator is not None else resolve_mixed_precision(t.mixed_precision, device)
    step = TrainStep(model, optimizer, augment=aug if augment else None, label_smoothing=plan.label_smoothing,
                     grad_clip=t.grad_clip, mixed_precision=mixed_precision, compile=t.compile,
                     compile_augment=compile_augment, accelerator=accelerator, mixup=mixup)
    return Training(plan, model, optimizer, scheduler, aug, mixup, step, channels_last)
