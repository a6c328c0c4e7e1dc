"""Evaluation: a model on an exactly-once loader (`evaluate`, used after each training epoch), and a saved
checkpoint on a split of prepared shards (`evaluate_checkpoint`, used by recipes/evaluate.py and the report).

`tta="flip"` scores the mean of the logits of each image and its mirror image (tinycnn.augment.tta_flip_logits);
the results then say so (`"tta": "flip"`; null without).
"""
import math
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from timm.utils import unwrap_model

from .augment import EvalTransform, eval_transform, tta_flip_logits
from .data import build_loader
from .storage import read_manifest
from .transfer import DevicePrefetcher
from .weights import WeightsError, load_model, read_metadata

__all__ = ["evaluate", "evaluate_checkpoint", "TTA_MODES"]

TTA_MODES = ("flip",)  # test-time augmentations `evaluate(tta=...)` runs (None: none)


def _check_tta(tta: Optional[str]) -> Optional[str]:
    if tta is not None and tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {', '.join(TTA_MODES)} or None, got {tta!r}")
    return tta


@torch.no_grad()
def evaluate(model, loader, accelerator: Accelerator, num_classes: int, transform=eval_transform,
             tta: Optional[str] = None) -> Dict[str, Any]:
    """Top-1, top-5, mean loss and per-class accuracy over every sample of `loader`, summed over all processes.

    `loader` must be exactly-once (build_loader(train=False)): each rank reads its own part, the sums are
    all-reduced, so N processes give the numbers of one (no padding duplicates as with gather_for_metrics).
    tta: None, or "flip" (the mean logits of each image and its mirror image).
    """
    tta = _check_tta(tta)
    model = unwrap_model(model)
    was_training = model.training
    model.eval()
    device = accelerator.device
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    loss_sum = torch.zeros((), dtype=acc_dtype, device=device)
    correct = torch.zeros(num_classes, dtype=acc_dtype, device=device)
    top5 = torch.zeros((), dtype=acc_dtype, device=device)
    count = torch.zeros(num_classes, dtype=acc_dtype, device=device)
    for images, labels in DevicePrefetcher(loader, device):
        with accelerator.autocast():
            x = transform(images)
            logits = tta_flip_logits(model, x) if tta == "flip" else model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").to(acc_dtype)
        k = min(5, num_classes)
        topk = logits.topk(k, dim=1).indices
        hit1 = (topk[:, 0] == labels).to(acc_dtype)
        correct.index_add_(0, labels, hit1)
        top5 += (topk == labels[:, None]).any(dim=1).to(acc_dtype).sum()
        count.index_add_(0, labels, torch.ones_like(hit1))
    stats = accelerator.reduce(torch.cat([loss_sum[None], top5[None], correct, count]), reduction="sum")
    loss_sum, top5, correct, count = stats[0], stats[1], stats[2:2 + num_classes], stats[2 + num_classes:]
    n = count.sum().item()
    model.train(was_training)
    per_class = torch.where(count > 0, correct / count.clamp(min=1), torch.full_like(count, float("nan")))
    return {
        "accuracy": correct.sum().item() / max(n, 1),
        "top5": top5.item() / max(n, 1),
        "loss": loss_sum.item() / max(n, 1),
        "num_samples": int(n),
        "per_class_accuracy": [None if math.isnan(v) else v for v in per_class.tolist()],
        "tta": tta,
    }



def evaluate_checkpoint(checkpoint: Union[str, Path], data: Union[str, Path], split: str, *,
                        accelerator: Optional[Accelerator] = None, batch_size: int = 256,
                        num_workers: Optional[int] = None, tta: Optional[str] = None) -> Dict[str, Any]:
    """Top-1/top-5/loss/per-class accuracy of `checkpoint` on `split`, the same with 1 or N processes;
    tta="flip": of the mean logits of each image and its mirror image."""
    tta = _check_tta(tta)
    accelerator = accelerator or Accelerator()
    manifest = read_manifest(data)
    meta = read_metadata(checkpoint)
    wnids = [c["wnid"] for c in manifest["classes"]]
    if meta["num_classes"] != len(wnids) or (meta.get("classes") and meta["classes"] != wnids):
        raise WeightsError(f"{checkpoint} was trained on {meta['num_classes']} classes "
                           f"{'(' + ', '.join(meta['classes'][:3]) + ', ...)' if meta.get('classes') else ''} "
                           f"but {data} holds {len(wnids)} ({', '.join(wnids[:3])}, ...): "
                           "evaluate on the data the model was trained for")
    model = load_model(checkpoint, device=accelerator.device)
    loader = build_loader(data, split, batch_size=batch_size, train=False, num_workers=num_workers,
                          rank=accelerator.process_index, world_size=accelerator.num_processes)
    transform = EvalTransform(mean=meta["mean"], std=meta["std"]).to(accelerator.device)
    results = evaluate(model, loader, accelerator, len(wnids), transform=transform, tta=tta)
    counts = manifest["splits"][split]["class_counts"]
    results["per_class"] = [
        {"index": i, "wnid": c["wnid"], "name": c.get("name", c["wnid"]), "accuracy": acc, "num_samples": counts[i]}
        for i, (c, acc) in enumerate(zip(manifest["classes"], results.pop("per_class_accuracy")))]
    results.update({"checkpoint": str(checkpoint), "data": str(data), "split": split,
                    "test_from_holdout": manifest.get("holdout_per_class", 0) > 0 and split == "test"})
    return results
