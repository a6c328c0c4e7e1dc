"""Learning-rate range test (step 3 of the course project's workflow): `find_lr(cfg, output)`.

The model trains from scratch for `num_iters` optimizer steps on augmented train batches while the
learning rate grows log-spaced from `min_lr` to `max_lr`. Each step logs (lr, loss, smoothed loss), the
smoothing being a bias-corrected exponential moving average (`smooth` = its beta). The sweep stops
early when the smoothed loss diverges (above `diverge_factor` x its best so far) or the loss is not
finite. The suggestion is the lr where the smoothed loss falls fastest: the most negative
d loss / d log10(lr), ignoring the first few points (their slope is mostly noise and warm-up).

A probe only: the model and optimizer are thrown away. Settings come from cfg['lr_finder']
(min_lr, max_lr, num_iters, smooth, diverge_factor); the model, optimizer (its weight decay, betas,
momentum), batch size, augmentation and label smoothing from the rest of cfg, as training uses them.
Writes OUTPUT/lr_finder.csv, OUTPUT/lr_finder.json and OUTPUT/lr_finder.png (main process only).
"""
import csv
import json
import math
import sys
from contextlib import closing
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from ..config import Config
from ..plan import model_description
from ..progress import RunProgress
from ..storage import read_manifest
from ..transfer import DevicePrefetcher

__all__ = ["lr_sweep", "smooth_losses", "suggest_lr", "stop_check", "find_lr", "write_results", "plot_lr_finder"]

REPORT_HINT = 'pip install "tinycnn[report]"'


def lr_sweep(min_lr: float, max_lr: float, num_iters: int) -> List[float]:
    """`num_iters` learning rates, log-spaced from min_lr to max_lr (both included)."""
    if num_iters < 2:
        raise ValueError(f"num_iters must be >= 2, got {num_iters}")
    ratio = math.log(max_lr / min_lr)
    return [min_lr * math.exp(ratio * i / (num_iters - 1)) for i in range(num_iters)]


def smooth_losses(losses: Sequence[float], beta: float = 0.98) -> List[float]:
    """Bias-corrected exponential moving average (the first value is the first loss)."""
    out, avg = [], 0.0
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (i + 1)) if beta > 0 else loss)
    return out


def suggest_lr(lrs: Sequence[float], losses: Sequence[float], skip_start: Optional[int] = None,
               skip_end: int = 0) -> Optional[float]:
    """The lr at the steepest descent of `losses` (most negative d loss / d log10 lr), or None.

    The slope is torch.gradient's (central differences, one-sided at the ends) over the finite points.
    skip_start: points ignored at the start (default: a tenth of them, 1 to 10); skip_end: at the end.
    Returns None when fewer than 3 points are left or the loss never falls."""
    pts = [(math.log10(lr), loss) for lr, loss in zip(lrs, losses)
           if loss is not None and math.isfinite(loss) and lr > 0]
    if skip_start is None:
        skip_start = max(1, min(10, len(pts) // 10))
    pts = pts[skip_start:len(pts) - skip_end]
    if len(pts) < 3:
        return None
    x = torch.tensor([p[0] for p in pts], dtype=torch.float64)
    y = torch.tensor([p[1] for p in pts], dtype=torch.float64)
    if not bool((x.diff() > 0).all()):
        raise ValueError("suggest_lr needs strictly increasing learning rates")
    # numpy.gradient's scheme on non-uniform spacing: second order inside, first order at the ends
    slopes = torch.gradient(y, spacing=(x,))[0]
    best = int(slopes.argmin())
    if not slopes[best] < 0:
        return None
    return 10 ** float(x[best])


def stop_check(loss: float, smoothed: float, best: float, diverge_factor: float, lr: float) -> Optional[str]:
    """Why the sweep stops after this step (None: go on): a non-finite loss, or a smoothed loss above
    diverge_factor x the best smoothed loss so far (`best` includes this step)."""
    if not math.isfinite(loss) or not math.isfinite(smoothed):
        return f"loss is {loss} at lr {lr:.3g}"
    if smoothed > diverge_factor * best:
        return f"smoothed loss {smoothed:.3f} > {diverge_factor:g} x best {best:.3f} at lr {lr:.3g}"
    return None


def _finite(v: float) -> Optional[float]:
    return v if v is not None and math.isfinite(v) else None


def find_lr(cfg: Config, output: Optional[Union[str, Path]] = None, *, accelerator=None,
            progress: bool = True, plot: bool = True) -> Dict[str, Any]:
    """Run the range test of the module docstring; write the csv/json/png into `output` when given.

    Returns {suggested_lr, min_lr, max_lr, num_iters, stopped_early, stop_reason, points: [{step, lr,
    loss, smoothed_loss}], ...}. Under several processes every process trains its part of each batch
    (DDP), the loss is averaged over them, and only the main process writes."""
    from accelerate.utils import set_seed

    from ..device import make_accelerator
    from ..plan import RunPlan, build_loaders, build_training

    s, t = cfg.lr_finder, cfg.train
    if accelerator is None:
        accelerator = make_accelerator(cfg.replace(["train.grad_accum_steps=1"]), log=False)
    device, world = accelerator.device, accelerator.num_processes
    set_seed(t.seed, device_specific=True)

    manifest = read_manifest(cfg.data.root)
    plan = RunPlan.from_config(cfg)
    loader, _ = build_loaders(cfg, plan, rank=accelerator.process_index, world_size=world, val=False)
    # training's model, optimizer, augmentation and step (channels_last, compile, mixing as configured): the sweep
    # measures the loss training would see at each lr; its own lr replaces the schedule's at every step
    run = build_training(cfg, manifest["num_classes"], accelerator=accelerator, lr=s.min_lr)
    model, optimizer, step_fn = run.model, run.optimizer, run.step
    lrs = lr_sweep(s.min_lr, s.max_lr, s.num_iters)

    def batches():  # as many epochs of the loader as the sweep needs
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            yield from DevicePrefetcher(loader, device)
            epoch += 1

    bar = RunProgress(len(lrs), enabled=progress and accelerator.is_main_process, interval_s=t.progress_seconds)
    points: List[Dict[str, Any]] = []
    best = float("inf")
    stop_reason = None
    step, micro, loss_sum = 0, 0, torch.zeros((), device=device)
    stream = batches()
    with bar, closing(stream):  # closing: the loader's worker processes stop with the sweep
        bar.start("lr finder", len(lrs))
        for images, labels in stream:
            for group in optimizer.param_groups:
                group["lr"] = lrs[step]
            loss, _ = step_fn(images, labels)
            loss_sum += loss.float()
            micro += 1
            if not accelerator.sync_gradients:
                continue
            value = accelerator.reduce(loss_sum / micro, reduction="mean").item()
            loss_sum, micro = torch.zeros((), device=device), 0
            losses = [p["loss"] for p in points] + [value]
            smoothed = smooth_losses(losses, s.smooth)[-1] if math.isfinite(value) else float("nan")
            points.append({"step": step, "lr": lrs[step], "loss": value, "smoothed_loss": smoothed})
            step += 1
            bar.advance(step, f"lr {lrs[step - 1]:.2e} loss {value:.3f}")
            if math.isfinite(smoothed):
                best = min(best, smoothed)
            stop_reason = stop_check(value, smoothed, best, s.diverge_factor, lrs[step - 1])
            if stop_reason is not None or step >= len(lrs):
                break
    loader.close()

    xs = [p["lr"] for p in points]
    ys = [p["smoothed_loss"] for p in points]
    suggested = suggest_lr(xs, ys)
    finite = [(p["smoothed_loss"], p["lr"]) for p in points if math.isfinite(p["smoothed_loss"])]
    result = {
        "suggested_lr": suggested,
        "min_lr": s.min_lr, "max_lr": s.max_lr, "num_iters": s.num_iters,
        "smooth": s.smooth, "diverge_factor": s.diverge_factor,
        "stopped_early": stop_reason is not None, "stop_reason": stop_reason,
        "num_points": len(points),
        "min_loss_lr": min(finite)[1] if finite else None,
        "best_smoothed_loss": min(finite)[0] if finite else None,
        "optimizer": t.optimizer.name, "weight_decay": plan.weight_decay,
        "batch_size": t.batch_size * world * accelerator.gradient_accumulation_steps,
        "model": model_description(cfg, run.raw_model),
        "points": [{k: (_finite(v) if isinstance(v, float) and k != "lr" else v) for k, v in p.items()} for p in points],
    }
    # the probe's model and optimizer are not kept
    accelerator.free_memory()
    del model, optimizer, step_fn, run
    if output is not None and accelerator.is_main_process:
        write_results(result, output, plot=plot)
    accelerator.wait_for_everyone()
    return result


def write_results(result: Dict[str, Any], output: Union[str, Path], plot: bool = True) -> Dict[str, Optional[Path]]:
    """OUTPUT/lr_finder.csv (step, lr, loss, smoothed_loss), OUTPUT/lr_finder.json, OUTPUT/lr_finder.png."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    with open(output / "lr_finder.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "lr", "loss", "smoothed_loss"])
        for p in result["points"]:
            w.writerow([p["step"], repr(p["lr"]), "" if p["loss"] is None else repr(p["loss"]),
                        "" if p["smoothed_loss"] is None else repr(p["smoothed_loss"])])
    from ..environment import environment_info
    (output / "lr_finder.json").write_text(json.dumps({**result, "environment": environment_info()}, indent=1))
    png = plot_lr_finder(result, output / "lr_finder.png") if plot else None
    return {"csv": output / "lr_finder.csv", "json": output / "lr_finder.json", "png": png}


def plot_lr_finder(result: Dict[str, Any], path: Union[str, Path]) -> Optional[Path]:
    """Loss and smoothed loss vs lr (log x), the suggestion marked. None (and a one-line warning on
    stderr) without matplotlib."""
    try:
        from matplotlib.figure import Figure  # no pyplot: leaves the user's backend alone
    except ImportError:
        print(f"warning: matplotlib is not installed, skipping the plot {path} ({REPORT_HINT})", file=sys.stderr)
        return None
    pts = [p for p in result["points"] if p["loss"] is not None]
    fig = Figure(figsize=(7, 4.5), dpi=110)
    ax = fig.subplots()
    if pts:
        ax.plot([p["lr"] for p in pts], [p["loss"] for p in pts], color="0.75", lw=1, label="loss")
        sm = [p for p in pts if p["smoothed_loss"] is not None]
        ax.plot([p["lr"] for p in sm], [p["smoothed_loss"] for p in sm], color="C0", lw=2, label="smoothed loss")
        ys = [p["smoothed_loss"] for p in sm] or [p["loss"] for p in pts]
        lo = min(ys)
        ref = max(ys[:max(1, len(ys) // 2)])  # the flat start; the diverging end runs off the top
        span = max(ref - lo, 0.02 * abs(ref) + 1e-3)
        ax.set_ylim(lo - 0.25 * span, ref + 1.5 * span)
    lr = result.get("suggested_lr")
    if lr is not None:
        ax.axvline(lr, color="C3", ls="--", lw=1.5, label=f"suggested lr {lr:.2e} (steepest descent)")
    ax.set_xscale("log")
    last = pts[-1]["lr"] if pts and result.get("stopped_early") else result["max_lr"]
    ax.set_xlim(result["min_lr"], min(result["max_lr"], last * 2))
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    m = result.get("model", {})
    stop = ", stopped early (diverged)" if result.get("stopped_early") else ""
    ax.set_title(f"LR range test: {result.get('optimizer', '')}, batch {result.get('batch_size', '?')}, "
                 f"channels {m.get('stage_channels', '?')}, {result.get('num_points', len(pts))} steps{stop}",
                 fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path
