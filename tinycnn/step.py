"""The one train step: augment on the device -> (mix) -> autocast forward -> loss -> backward -> clip -> optimizer step.

Training, the LR finder, the checks and the benchmarks all run :class:`TrainStep`, so the benchmarks time
what training runs.  Nothing in a step waits for the device: the loss and logits come back detached and
still on the device, and the caller decides when to read them (a ``.item()`` is a host sync)::

    step = TrainStep(model, optimizer, augment=GPUAugment().to("cuda"), label_smoothing=0.1,
                     mixed_precision="bf16", compile=True)
    for images, labels in DevicePrefetcher(loader, "cuda"):     # uint8 batches already on the device
        loss, logits = step(images, labels)

Under accelerate pass ``accelerator=`` (model and optimizer already prepared): the step then uses
``accelerator.accumulate`` / ``backward`` / ``clip_grad_norm_`` (gradient accumulation, fp16 loss scaling,
DDP's no_sync).  Without one it is plain torch, with a GradScaler for fp16.

With ``mixup=`` (a :class:`tinycnn.augment.MixupCutmix`) the augmented batch is mixed after the (compiled)
augmentation, outside it, and the loss is the mixup's soft-target cross-entropy; the logits returned are still
those of the mixed batch, and callers keep scoring them against the hard labels.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = ["TrainStep", "autocast_dtype", "can_compile"]

_AUTOCAST_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(mixed_precision: str) -> Optional[torch.dtype]:
    """"no" -> None, "bf16" -> torch.bfloat16, "fp16" -> torch.float16."""
    if mixed_precision not in _AUTOCAST_DTYPES:
        raise ValueError(f"mixed_precision must be one of {list(_AUTOCAST_DTYPES)}, got {mixed_precision!r}")
    return _AUTOCAST_DTYPES[mixed_precision]


def can_compile(device: Union[str, torch.device]) -> bool:
    """Where torch.compile's default backend (inductor) makes fast code: CUDA with triton.  On the CPU
    inductor works but compiling takes ~40 s and the result is no faster for this model."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    from torch.utils._triton import has_triton
    return has_triton()


class TrainStep:
    """augment on the device -> autocast forward -> loss -> backward -> clip -> optimizer step.

    Args:
        model: the model, on its device (and channels_last if wanted); prepared by ``accelerator`` if given.
        optimizer: its optimizer (prepared by ``accelerator`` if given).
        augment: a :class:`tinycnn.augment.GPUAugment` applied to the uint8 batch on the device; None means
            the images are already the model's input (normalized float), as in the benchmarks' step alone.
        label_smoothing: cross-entropy label smoothing (with ``mixup`` the smoothing of its soft targets is used).
        mixup: a :class:`tinycnn.augment.MixupCutmix` run on the augmented batch (timm's Mixup / CutMix), whose
            soft-target loss replaces the cross-entropy; None = no mixing.
        grad_clip: clip the gradients' global L2 norm to this (None or 0 = no clipping).
        mixed_precision: "no", "bf16" or "fp16" autocast; None = the accelerator's setting (else "no").
            The augmentation emits the autocast dtype directly (no separate cast before the first conv).
        compile: ``torch.compile`` the model (and the augmentation, see ``compile_augment``).
        compile_augment: compile ``augment.apply`` (a chain of ~100 small kernels that compiles to a few,
            with no graph breaks); "auto" = when ``compile`` is on, or on CUDA with triton where compiling
            is cheap and pays off.  ``augment.sample`` stays eager: it draws from the RNG.
        compile_options: keyword arguments for ``torch.compile`` (e.g. ``{"backend": "aot_eager"}``).
        accelerator: an ``accelerate.Accelerator`` that prepared model and optimizer.

    Batch sizes may change between calls (a last partial batch): a compiled step recompiles once with a
    dynamic batch dimension, then serves every size.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, augment=None,
                 label_smoothing: float = 0.0, grad_clip: Optional[float] = None,
                 mixed_precision: Optional[str] = None, compile: bool = False,
                 compile_augment: Union[bool, str] = "auto", compile_options: Optional[Dict[str, Any]] = None,
                 accelerator=None, mixup=None):
        if accelerator is not None:
            if mixed_precision is not None and mixed_precision != accelerator.mixed_precision:
                raise ValueError(f"mixed_precision={mixed_precision!r} but the accelerator was made with "
                                 f"{accelerator.mixed_precision!r}: leave mixed_precision unset to use its setting")
            mixed_precision = accelerator.mixed_precision
            self.device = accelerator.device
        else:
            self.device = next(model.parameters()).device
        self.mixed_precision = mixed_precision or "no"
        self.dtype = autocast_dtype(self.mixed_precision)
        self.model, self.optimizer, self.accelerator = model, optimizer, accelerator
        self.augment, self.mixup = augment, mixup
        self.label_smoothing = float(label_smoothing)
        self.grad_clip = float(grad_clip) if grad_clip else None
        # accelerate scales fp16 losses itself; plain torch needs a GradScaler
        self.scaler = (torch.amp.GradScaler(self.device.type)
                       if self.dtype is torch.float16 and accelerator is None else None)

        options = dict(compile_options or {})
        if compile_augment == "auto":
            compile_augment = bool(compile) or can_compile(self.device)
        self.compiled = bool(compile)
        self.augment_compiled = bool(compile_augment) and augment is not None and augment.enabled
        self.forward = torch.compile(model, **options) if compile else model
        if augment is None:
            self._apply = None
        else:
            self._apply = torch.compile(augment.apply, **options) if self.augment_compiled else augment.apply

    def model_input(self, images: torch.Tensor) -> torch.Tensor:
        """The model's input for a batch: augmented (in the autocast dtype) when there is an augmentation."""
        if self.augment is None:
            return images
        # image_size: random erasing's noise is drawn here, eagerly, so the (compiled) apply is a function of params
        params = self.augment.sample(images.shape[0], device=images.device, image_size=images.shape[-2:])
        return self._apply(images, params, out_dtype=self.dtype)

    def _loss(self, x: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        targets = None
        if self.mixup is not None:  # outside the compiled augmentation: timm draws on the host
            # it mixes in place: never the caller's own batch (no augmentation: the images are the input)
            x, targets = self.mixup(x if self.augment is not None else x.clone(), labels)
        # torch.autocast, not accelerator.autocast(): one global autocast state for dynamo to guard on
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            logits = self.forward(x)
            if targets is None:
                loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
            else:
                loss = self.mixup.loss(logits.float(), targets)
        return loss, logits

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """One step on a batch already on the device; returns (loss, logits), detached, without a host sync."""
        if self.accelerator is not None:
            return self._accelerated(images, labels)
        loss, logits = self._loss(self.model_input(images), labels)
        if self.scaler is None:
            loss.backward()
        else:
            self.scaler.scale(loss).backward()
        if self.grad_clip:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), logits.detach()

    def _accelerated(self, images: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        acc = self.accelerator
        with acc.accumulate(self.model):
            loss, logits = self._loss(self.model_input(images), labels)
            acc.backward(loss)
            if self.grad_clip and acc.sync_gradients:
                acc.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.optimizer.step()                  # prepared optimizer: a no-op between accumulation steps
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), logits.detach()
