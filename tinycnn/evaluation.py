"""Evaluate a saved checkpoint on a split of prepared shards (used by recipes/evaluate.py and the report)."""
from pathlib import Path
from typing import Any, Dict, Optional, Union

from accelerate import Accelerator

from .augment import EvalTransform
from .data import build_loader, read_manifest
from .train import evaluate
from .weights import WeightsError, load_model, read_metadata

__all__ = ["evaluate_checkpoint"]


def evaluate_checkpoint(checkpoint: Union[str, Path], data: Union[str, Path], split: str, *,
                        accelerator: Optional[Accelerator] = None, batch_size: int = 256,
                        num_workers: Optional[int] = None) -> Dict[str, Any]:
    """Top-1/top-5/loss/per-class accuracy of `checkpoint` on `split`, the same with 1 or N processes."""
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
    results = evaluate(model, loader, accelerator, len(wnids), transform=transform)
    counts = manifest["splits"][split]["class_counts"]
    results["per_class"] = [
        {"index": i, "wnid": c["wnid"], "name": c.get("name", c["wnid"]), "accuracy": acc, "num_samples": counts[i]}
        for i, (c, acc) in enumerate(zip(manifest["classes"], results.pop("per_class_accuracy")))]
    results.update({"checkpoint": str(checkpoint), "data": str(data), "split": split,
                    "test_from_holdout": manifest.get("holdout_per_class", 0) > 0 and split == "test"})
    return results
