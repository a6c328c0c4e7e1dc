"""The course project's checks before training (step 1 of its workflow): `run_checks(cfg, output)`.

  - split sizes and class distribution (min / mean / max images per class, from the manifest);
  - the shape of a loader batch against the manifest's input_shape (`check_batch_shape`, a clear error if off);
  - baselines on the val split: the majority train class predicted for every image, and seeded uniform
    random predictions (next to the expected 1 / num_classes);
  - the loss of the untrained model on one batch against ln(num_classes) (5.30 for 200 classes; the
    default model with its kaiming init lands within ~0.1 of it, a 2-stage toy model within ~0.25);
  - one backward pass gives a non-zero gradient for every parameter;
  - a PNG of the same images before and after augmentation (`save_augment_grid`).

Every number goes to OUTPUT/checks.json (read by the report); recipes/checks.py prints them as tables.
"""
import json
import math
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..augment import GPUAugment
from ..config import Config
from ..errors import TinycnnError
from ..data import build_loader
from ..formatting import percent
from ..storage import read_manifest

__all__ = ["CheckError", "split_stats", "split_labels", "check_batch_shape", "baselines", "initial_loss",
           "gradient_check", "save_augment_grid", "grid_size", "run_checks", "print_checks", "LOSS_TOLERANCE"]

#: how far the untrained model's loss may be from ln(num_classes) before it is flagged
LOSS_TOLERANCE = 0.5


class CheckError(TinycnnError, RuntimeError):
    """A check that makes the rest meaningless failed (e.g. batches of the wrong shape)."""


# ----------------------------------------------------------------------------- data

def split_stats(manifest: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Per split: images, shards, grayscale images and the min / mean / max images per class."""
    out = {}
    for name, info in manifest["splits"].items():
        counts = info.get("class_counts")
        row = {"num_samples": int(info["num_samples"]), "num_shards": len(info.get("shards", [])),
               "grayscale": info.get("grayscale")}
        if counts:
            present = [c for c in counts if c > 0]
            row.update({"classes_present": len(present), "min_per_class": min(counts),
                        "mean_per_class": sum(counts) / len(counts), "max_per_class": max(counts),
                        "class_counts": list(counts)})
        out[name] = row
    return out


def split_labels(root: Union[str, Path], manifest: Dict[str, Any], split: str) -> torch.Tensor:
    """The labels of `split`: from the manifest's class_counts (no decoding), else read from the shards.

    Only their multiset matters to the baselines below, so the counts are enough."""
    if split not in manifest["splits"]:
        raise KeyError(f"{root} has no split {split!r} (it has {sorted(manifest['splits'])})")
    counts = manifest["splits"][split].get("class_counts")
    if counts:
        return torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts, dtype=torch.int64))
    loader = build_loader(root, split, batch_size=256, train=False, num_workers=0)
    return torch.cat([y for _, y in loader]) if len(loader) else torch.empty(0, dtype=torch.int64)


def check_batch_shape(batch: Tuple[torch.Tensor, torch.Tensor], manifest: Dict[str, Any]) -> Dict[str, Any]:
    """A loader batch (uint8 images (B, *input_shape), int64 labels (B,) in [0, num_classes)) against the manifest.

    Returns the shapes; raises CheckError naming what differs."""
    images, labels = batch
    expected = [int(v) for v in manifest.get("input_shape", (3, 64, 64))]
    num_classes = int(manifest["num_classes"])
    got = list(images.shape)
    problems = []
    if images.dim() != 1 + len(expected) or got[1:] != expected:
        problems.append(f"images of shape {tuple(got)}, expected (B, {', '.join(map(str, expected))}) "
                        f"from the manifest's input_shape {expected}")
    if images.dtype != torch.uint8:
        problems.append(f"images of dtype {images.dtype}, expected torch.uint8 (augmentation converts on the device)")
    if labels.dim() != 1 or labels.shape[0] != got[0]:
        problems.append(f"labels of shape {tuple(labels.shape)}, expected ({got[0]},) (one per image)")
    elif labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        problems.append(f"labels in [{int(labels.min())}, {int(labels.max())}], expected [0, {num_classes - 1}]")
    if problems:
        raise CheckError("batch check failed: " + "; ".join(problems)
                         + " (re-run tinycnn-prepare, or check data.root points at the right folder)")
    return {"batch_shape": got, "labels_shape": list(labels.shape), "dtype": str(images.dtype).replace("torch.", ""),
            "input_shape": expected, "ok": True}


def baselines(manifest: Dict[str, Any], train_labels: torch.Tensor, val_labels: torch.Tensor,
              seed: int = 0) -> Dict[str, Any]:
    """Top-1 on val of (a) the most frequent train class for every image, (b) seeded uniform random guesses."""
    num_classes = int(manifest["num_classes"])
    n = int(val_labels.numel())
    train_counts = torch.bincount(train_labels, minlength=num_classes)
    majority = int(torch.argmax(train_counts))  # ties: the lowest index
    g = torch.Generator().manual_seed(int(seed))
    guesses = torch.randint(num_classes, (n,), generator=g)
    classes = manifest.get("classes") or []
    return {
        "majority_class": {
            "class": majority,
            "wnid": classes[majority]["wnid"] if majority < len(classes) else None,
            "train_count": int(train_counts[majority]),
            "tied_classes": int((train_counts == train_counts[majority]).sum()),
            "accuracy": float((val_labels == majority).double().mean()) if n else None,
        },
        "uniform_random": {
            "accuracy": float((guesses == val_labels).double().mean()) if n else None,
            "expected": 1.0 / num_classes,
            "seed": int(seed),
        },
        "num_val_samples": n,
    }


# ----------------------------------------------------------------------------- model

def initial_loss(logits: torch.Tensor, labels: torch.Tensor, tolerance: float = LOSS_TOLERANCE) -> Dict[str, Any]:
    """Cross-entropy of `logits` vs ln(num_classes), the loss of a uniform prediction."""
    num_classes = logits.shape[1]
    observed = float(F.cross_entropy(logits.detach().float(), labels))
    expected = math.log(num_classes)
    return {"observed": observed, "expected": expected, "difference": observed - expected, "tolerance": tolerance,
            "ok": math.isfinite(observed) and abs(observed - expected) <= tolerance}


def gradient_check(model: torch.nn.Module) -> Dict[str, Any]:
    """After a backward pass: which parameters got no gradient or an all-zero one."""
    zero, norms = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None or not bool(p.grad.detach().abs().sum() > 0):
            zero.append(name)
        if p.grad is not None:
            norms.append(p.grad.detach().float().norm())
    finite = bool(torch.stack(norms).isfinite().all()) if norms else False
    total = float(torch.stack(norms).norm()) if norms else 0.0
    return {"all_nonzero": not zero, "num_params_with_zero_grad": len(zero), "params_with_zero_grad": zero,
            "num_param_tensors": sum(1 for p in model.parameters() if p.requires_grad),
            "grad_norm": total, "all_finite": finite, "ok": not zero and finite}


# ----------------------------------------------------------------------------- augmentation grid

def grid_size(num_images: int, nrow: int = 8, image_hw: Sequence[int] = (64, 64), padding: int = 2) -> Tuple[int, int]:
    """(width, height) in pixels of the PNG `save_augment_grid` writes for `num_images` images."""
    nrow = min(nrow, num_images)
    rows = 2 * math.ceil(num_images / nrow)
    h, w = image_hw
    return nrow * (w + padding) + padding, rows * (h + padding) + padding


def save_augment_grid(images_uint8: torch.Tensor, aug: GPUAugment, path: Union[str, Path], nrow: int = 8,
                      generator: Optional[torch.Generator] = None) -> Path:
    """A PNG of `images_uint8` (B, 3, H, W) and the same images through `aug`, row by row:
    a row of originals, below it the row of their augmented versions, and so on.

    The augmented images are denormalized with the instance's mean/std for display."""
    from torchvision.utils import make_grid, save_image

    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
        raise ValueError(f"expected uint8 images (B, 3, H, W), got {images_uint8.dtype} {tuple(images_uint8.shape)}")
    nrow = max(1, min(int(nrow), images_uint8.shape[0]))
    with torch.no_grad():
        augmented = aug(images_uint8, generator=generator).float()
        if aug.normalize:
            augmented = augmented * aug.std.to(augmented) + aug.mean.to(augmented)
    originals = images_uint8.float().div(255)
    augmented = augmented.clamp(0, 1).to(originals.device)
    rows = []
    for start in range(0, originals.shape[0], nrow):
        for block in (originals, augmented):
            chunk = block[start:start + nrow]
            if chunk.shape[0] < nrow:  # a short last row: pad with black so pairs stay one above the other
                chunk = torch.cat([chunk, chunk.new_zeros((nrow - chunk.shape[0], *chunk.shape[1:]))])
            rows.append(chunk)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(torch.cat(rows).cpu(), nrow=nrow, padding=2), str(path))
    return path


# ----------------------------------------------------------------------------- all of it

def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def run_checks(cfg: Config, output: Union[str, Path], *, accelerator=None, num_images: int = 16,
               nrow: int = 8, loss_tolerance: float = LOSS_TOLERANCE) -> Dict[str, Any]:
    """Run every check of the module docstring on cfg's data and model; write OUTPUT/checks.json and
    OUTPUT/augment_grid.png (main process only). Returns the results; `results['passed']` is False when
    a check is flagged (initial loss off, zero gradients)."""
    from accelerate.utils import set_seed

    from ..device import make_accelerator
    from ..plan import RunPlan, build_augment, build_model, model_description

    output = Path(output)
    accelerator = accelerator or make_accelerator(cfg, log=False)
    device = accelerator.device
    t, d = cfg.train, cfg.data
    plan = RunPlan.from_config(cfg)
    root = d.root
    manifest = read_manifest(root)
    num_classes = int(manifest["num_classes"])
    set_seed(t.seed)

    results: Dict[str, Any] = {"data": str(root), "num_classes": num_classes, "device": str(device)}
    results["splits"] = split_stats(manifest)

    # one training batch, as training reads it (one process: a check needs no more)
    loader = build_loader(root, d.train_split, batch_size=t.batch_size, train=True, num_workers=0, seed=t.seed,
                          subset=plan.train_subset, shuffle_buffer=d.shuffle_buffer, skip_bad=d.skip_bad)
    batch = next(iter(loader))
    loader.close()
    shape = check_batch_shape(batch, manifest)
    results["batch_shape"], results["input_shape"] = shape["batch_shape"], shape["input_shape"]
    results["batch"] = shape

    results["baselines"] = baselines(manifest, split_labels(root, manifest, d.train_split),
                                     split_labels(root, manifest, d.val_split), seed=t.seed)

    # the untrained model on that batch, augmented as in training: loss, then one backward
    model = build_model(cfg, num_classes).to(device).train()
    results["model"] = model_description(cfg, model)
    results["num_parameters"] = results["model"]["num_parameters"]
    aug = build_augment(cfg, plan, model).to(device)
    images, labels = batch[0].to(device), batch[1].to(device)
    g = torch.Generator(device=device).manual_seed(int(t.seed))
    logits = model(aug(images, generator=g))
    results["initial_loss"] = initial_loss(logits, labels, loss_tolerance)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(logits.float(), labels).backward()
    results["gradients"] = gradient_check(model)

    grid_path = output / "augment_grid.png"
    n = min(num_images, images.shape[0])
    results["augment_grid"] = str(grid_path)
    results["augment_grid_images"] = n
    results["augment"] = aug.to_config()

    base = results["baselines"]
    il, gr = results["initial_loss"], results["gradients"]
    results["checks"] = [
        {"name": "batch shape", "ok": True,
         "detail": f"{tuple(shape['batch_shape'])} {shape['dtype']} matches input_shape {shape['input_shape']}"},
        {"name": "initial loss", "ok": il["ok"],
         "detail": f"{il['observed']:.3f} vs ln({num_classes}) = {il['expected']:.3f} (tolerance {loss_tolerance})"},
        {"name": "gradients", "ok": gr["ok"],
         "detail": (f"all {gr['num_param_tensors']} parameter tensors non-zero, norm {gr['grad_norm']:.3g}" if gr["ok"]
                    else f"{gr['num_params_with_zero_grad']} without gradient: {', '.join(gr['params_with_zero_grad'][:5])}"
                    + ("" if gr["all_finite"] else "; non-finite gradients"))},
        {"name": "baselines", "ok": True,
         "detail": f"majority class {base['majority_class']['accuracy']:.2%}, uniform random "
                   f"{base['uniform_random']['accuracy']:.2%} (expected {base['uniform_random']['expected']:.2%})"},
    ]
    results["passed"] = all(c["ok"] for c in results["checks"])

    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        g = torch.Generator(device=device).manual_seed(int(t.seed) + 1)
        save_augment_grid(batch[0][:n].to(device), aug, grid_path, nrow=nrow, generator=g)
        from ..environment import environment_info
        results["environment"] = environment_info(accelerator)
        (output / "checks.json").write_text(json.dumps(_jsonable(results), indent=1))
    accelerator.wait_for_everyone()
    return results


def print_checks(results: Dict[str, Any], console=None):
    """The results of run_checks as rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"splits of {results['data']} ({results['num_classes']} classes)")
    for col in ("split", "images", "shards", "grayscale", "classes", "min/class", "mean/class", "max/class"):
        table.add_column(col, justify="right")
    for name, s in results["splits"].items():
        table.add_row(name, str(s["num_samples"]), str(s["num_shards"]), str(s.get("grayscale", "-")),
                      str(s.get("classes_present", "-")), str(s.get("min_per_class", "-")),
                      f"{s['mean_per_class']:.1f}" if "mean_per_class" in s else "-", str(s.get("max_per_class", "-")))
    console.print(table)

    b = results["baselines"]
    table = Table(title=f"baselines on val ({b['num_val_samples']} images)")
    for col in ("baseline", "top-1", "note"):
        table.add_column(col)
    m, u = b["majority_class"], b["uniform_random"]
    table.add_row("majority class", percent(m["accuracy"]),
                  f"class {m['class']} ({m['wnid']}), {m['train_count']} train images"
                  + (f", tied with {m['tied_classes'] - 1} other classes" if m["tied_classes"] > 1 else ""))
    table.add_row("uniform random", percent(u["accuracy"]), f"expected {u['expected']:.2%} (seed {u['seed']})")
    console.print(table)

    table = Table(title=f"checks ({results['model']['name']}, channels {results['model']['stage_channels']}, "
                        f"repeats {results['model']['stage_repeats']}, {results['num_parameters']:,} parameters)")
    for col in ("check", "result", "detail"):
        table.add_column(col)
    for c in results["checks"]:
        table.add_row(c["name"], "[green]ok[/green]" if c["ok"] else "[bold red]FLAGGED[/bold red]", c["detail"])
    console.print(table)
    console.print(f"augmentation grid (rows: originals, then augmented): {results['augment_grid']}", highlight=False)
