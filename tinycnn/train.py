"""One training run under accelerate, readable top to bottom: `train(cfg, output)`.

shards -> loader (uint8, per rank) -> device prefetch -> GPUAugment on the device -> model -> optimizer,
with evaluation on the val split after each epoch, the best checkpoint by val accuracy, metrics.jsonl,
TensorBoard through accelerate's tracker, resumable state, and a clean stop on SIGTERM / Ctrl-C / NaN.
Used by recipes/train.py, recipes/grid_search.py and the checks; machinery only, no argument parsing.
"""
import json
import math
import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Optional

import timm
import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed

from .augment import GPUAugment, eval_transform
from .config import flatten
from .data import DevicePrefetcher, DeviceResidentLoader, build_loader, read_manifest
from .weights import atomic_write, save_model, unwrap_model

__all__ = ["make_accelerator", "build_model", "build_optimizer", "build_lr_lambda", "evaluate", "train",
           "TrainingStopped", "RunLogger"]


class TrainingStopped(RuntimeError):
    """The run stopped early (NaN loss, SIGTERM, Ctrl-C); resumable state and the best checkpoint are kept."""


def resolve_device(name: str) -> str:
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind = name.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is cuda but no CUDA device is visible (use train.device=auto or cpu)")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RuntimeError("train.device is mps but MPS is not available (use train.device=auto or cpu)")
    return name


def make_accelerator(cfg: Dict[str, Any], output: Optional[Path] = None, log: bool = True) -> Accelerator:
    t = cfg["train"]
    device = resolve_device(t["device"])
    mp = t["mixed_precision"]
    if mp == "auto":
        mp = "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "no"
    trackers = None
    if log and output is not None:
        try:
            import tensorboard  # noqa: F401
            trackers = "tensorboard"
        except ImportError:
            pass
    return Accelerator(cpu=device == "cpu", mixed_precision=mp, gradient_accumulation_steps=t["grad_accum_steps"],
                       log_with=trackers, project_dir=str(output) if output else None)


def build_model(cfg: Dict[str, Any], num_classes: int) -> torch.nn.Module:
    return timm.create_model(cfg["model"], num_classes=num_classes, stage_channels=cfg["stage_channels"],
                             stage_repeats=cfg["stage_repeats"], drop_rate=cfg["drop_rate"])


def build_optimizer(model: torch.nn.Module, opt: Dict[str, Any], device: torch.device) -> torch.optim.Optimizer:
    # no weight decay on BatchNorm and biases (timm's convention)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": opt["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    name, fused = opt["name"], opt["fused"]
    if fused == "auto":  # fused Adam/AdamW/SGD kernels: one launch for all parameters instead of a loop
        fused = device.type in ("cuda", "mps") or (device.type == "cpu" and name in ("adam", "adamw"))
    if fused and name in ("sgd", "adam", "adamw"):
        try:
            return _make_optimizer(name, [dict(g) for g in groups], opt, fused=True)
        except (RuntimeError, TypeError, ValueError):  # an older torch without fused kernels for this device
            pass
    return _make_optimizer(name, groups, opt)


def _make_optimizer(name, groups, opt, **kw) -> torch.optim.Optimizer:
    lr = opt["lr"]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=opt["momentum"], nesterov=opt["nesterov"] and opt["momentum"] > 0, **kw)
    if name == "adam":
        # the original project's Adam adds weight decay to the gradient (L2); AdamW decouples it
        return torch.optim.Adam(groups, lr=lr, betas=tuple(opt["betas"]), **kw)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(opt["betas"]), **kw)
    return torch.optim.RMSprop(groups, lr=lr, momentum=opt["momentum"])


def build_lr_lambda(sched: Dict[str, Any], total_steps: int, steps_per_epoch: int):
    """Multiplier of the base lr at optimizer step s (0-based)."""
    name = str(sched["name"]).lower()
    if name == "none":
        return lambda s: 1.0
    if name == "cosine":
        warmup = int(round(sched["warmup_epochs"] * steps_per_epoch))
        floor = sched["min_lr_ratio"]

        def cosine(s):
            if s < warmup:
                return (s + 1) / warmup
            p = min(1.0, (s - warmup) / max(1, total_steps - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
        return cosine
    # one-cycle (torch's OneCycleLR shape): warm up from lr/25 to lr, anneal to lr/1e4, both cosine
    up = max(1, int(sched["pct_start"] * total_steps))

    def onecycle(s):
        if s < up:
            return 1 / 25 + (1 - 1 / 25) * 0.5 * (1 - math.cos(math.pi * s / up))
        p = min(1.0, (s - up) / max(1, total_steps - up))
        return 1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * p))
    return onecycle


@torch.no_grad()
def evaluate(model, loader, accelerator: Accelerator, num_classes: int, transform=eval_transform) -> Dict[str, Any]:
    """Top-1, top-5, mean loss and per-class accuracy over every sample of `loader`, summed over all processes.

    `loader` must be exactly-once (build_loader(train=False)): each rank reads its own part, the sums are
    all-reduced, so N processes give the numbers of one (no padding duplicates as with gather_for_metrics).
    """
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
            logits = model(transform(images))
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
    }


class RunLogger:
    """metrics.jsonl (one JSON object per epoch) plus the accelerate tracker, main process only."""

    def __init__(self, accelerator: Accelerator, output: Path):
        self.accelerator, self.path = accelerator, output / "metrics.jsonl"

    def epoch(self, record: Dict[str, Any]):
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "epoch"}
        self.accelerator.log(scalars, step=record["step"])

    def step(self, values: Dict[str, float], step: int):
        self.accelerator.log(values, step=step)


@contextmanager
def _stop_signals():
    """SIGTERM and Ctrl-C set a flag that the loop checks after each step (saving state before it stops)."""
    flag = {"signal": None}

    def handler(signum, frame):
        flag["signal"] = signal.Signals(signum).name

    old = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            old[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
    try:
        yield flag
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _save_yaml(path: Path, data: Dict[str, Any]):
    atomic_write(path, lambda tmp: Path(tmp).write_text(yaml.safe_dump(data, sort_keys=False)))


def train(cfg: Dict[str, Any], output: Path, *, resume: bool = False, accelerator: Optional[Accelerator] = None,
          progress: bool = True, end_training: bool = True) -> Dict[str, Any]:
    """Train per `cfg` into `output`; returns a summary (best val accuracy, epochs, steps, ...).

    end_training=False keeps the process group for callers that train more runs (grid search).
    """
    t, output = cfg["train"], Path(output)
    output.mkdir(parents=True, exist_ok=True)
    accelerator = accelerator or make_accelerator(cfg, output)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    set_seed(t["seed"], device_specific=True)
    if t["deterministic"]:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # --- data: each rank reads its own shards (never accelerator.prepare'd: see tinycnn.data)
    d = cfg["data"]
    root = Path(d["root"])
    manifest = read_manifest(root)
    num_classes = manifest["num_classes"]
    wnids = [c["wnid"] for c in manifest["classes"]]
    names = [c.get("name", c["wnid"]) for c in manifest["classes"]]
    common = dict(rank=rank, world_size=world, num_workers=d["num_workers"], seed=t["seed"], skip_bad=d["skip_bad"])
    train_subset = t["overfit_small_size"] if t["overfit_small"] else None
    train_loader = build_loader(root, d["train_split"], batch_size=t["batch_size"], train=True, subset=train_subset,
                                shuffle_buffer=d["shuffle_buffer"], **common)
    val_loader = build_loader(root, d["val_split"], batch_size=t["batch_size"], train=False,
                              subset=t["val_subset_size"], **common)
    if d["device_resident"]:
        once = build_loader(root, d["train_split"], batch_size=t["batch_size"], train=False, subset=train_subset, **common)
        batches = DeviceResidentLoader(once, device, num_batches=len(train_loader), batch_size=t["batch_size"],
                                       seed=t["seed"])
    else:
        batches = DevicePrefetcher(train_loader, device)
    steps_per_epoch = len(train_loader) // t["grad_accum_steps"]
    total_steps = t["max_steps"] or steps_per_epoch * t["epochs"]
    epochs = math.ceil(total_steps / steps_per_epoch)

    # --- model, augmentation, optimizer, schedule
    model = build_model(cfg, num_classes)
    channels_last = t["channels_last"] == "auto" and device.type == "cuda" or t["channels_last"] is True
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    aug_cfg = dict(cfg["augment"])
    if t["overfit_small"]:
        aug_cfg["enabled"] = False
    aug = GPUAugment.from_config(aug_cfg, channels_last=channels_last).to(device)
    # the memorization check runs without regularization: no augmentation, no weight decay, no smoothing
    opt_cfg = dict(t["optimizer"], weight_decay=0.0) if t["overfit_small"] else t["optimizer"]
    optimizer = build_optimizer(model, opt_cfg, device)
    model, optimizer = accelerator.prepare(model, optimizer)
    # stepped once per optimizer step, by us (accelerate's scheduler wrapper would step it per process)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, build_lr_lambda(t["scheduler"], total_steps, steps_per_epoch))
    accelerator.register_for_checkpointing(scheduler)
    forward = torch.compile(model) if t["compile"] else model
    # GPUAugment is ~100 small kernels: compiling apply() fuses them (sample() stays eager: it draws the RNG)
    augment = torch.compile(aug.apply) if t["compile"] and aug.enabled else aug.apply
    label_smoothing = 0.0 if t["overfit_small"] else t["label_smoothing"]

    # --- state: resume continues the same schedule and step count
    state = {"epoch": 0, "step": 0, "best_accuracy": -1.0, "best_epoch": None}
    state_dir = output / "state"
    if resume and (state_dir / "progress.json").is_file():
        accelerator.load_state(str(state_dir))
        state = json.loads((state_dir / "progress.json").read_text())
        accelerator.print(f"resuming {output} at epoch {state['epoch']}, step {state['step']}")
    elif resume:
        accelerator.print(f"--resume: no saved state in {state_dir}, starting from scratch")
    if accelerator.is_main_process:
        _save_yaml(output / "config.yaml", cfg)
        info = environment_info(accelerator)
        (output / "run.json").write_text(json.dumps(info, indent=1))
        if not resume and (output / "metrics.jsonl").exists():
            (output / "metrics.jsonl").unlink()
    accelerator.init_trackers("tb", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                            for k, v in flatten(cfg).items()})
    logger = RunLogger(accelerator, output)

    def save_state(reason: str):
        accelerator.save_state(str(state_dir))
        if accelerator.is_main_process:
            atomic_write(state_dir / "progress.json", lambda tmp: Path(tmp).write_text(json.dumps({**state, "reason": reason})))
        accelerator.wait_for_everyone()

    def save_weights(name: str, extra: Dict[str, Any]):
        if accelerator.is_main_process:
            save_model(model, output / name, classes=wnids, class_names=names, extra=extra)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                   disable=not (progress and accelerator.is_main_process))
    history = []
    summary_stop = None
    with _stop_signals() as stop, bar:
        while state["step"] < total_steps and summary_stop is None:
            epoch = state["epoch"]
            batches.set_epoch(epoch)
            model.train()
            # a resumed epoch skips the batches it already trained on (the loader is deterministic per epoch)
            skip = (state["step"] - epoch * steps_per_epoch) * t["grad_accum_steps"]
            task = bar.add_task(f"epoch {epoch + 1}/{epochs}", total=len(batches), info="")
            loss_sum = torch.zeros((), device=device)
            correct_sum = torch.zeros((), dtype=torch.int64, device=device)
            loss_count, seen, t0 = 0, 0, time.perf_counter()
            for i, (images, labels) in enumerate(batches):
                if i < skip:
                    bar.advance(task)
                    continue
                with accelerator.accumulate(model):
                    x = augment(images, aug.sample(images.shape[0], device=device))
                    with accelerator.autocast():
                        logits = forward(x)
                        loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
                    accelerator.backward(loss)
                    if t["grad_clip"] and accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), t["grad_clip"])
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach()
                correct_sum += (logits.detach().argmax(dim=1) == labels).sum()
                loss_count += 1
                seen += images.shape[0]
                if accelerator.sync_gradients:
                    scheduler.step()
                    state["step"] += 1
                    at_log = state["step"] % t["log_every"] == 0 or state["step"] == total_steps
                    if at_log:  # a device sync, so only every log_every steps
                        # every rank takes part at the same steps, so all ranks agree to stop together
                        flags = accelerator.reduce(torch.stack([
                            (~torch.isfinite(loss.detach())).float(),
                            torch.tensor(float(stop["signal"] is not None), device=device)]), reduction="sum")
                        nonfinite, stopping = (flags > 0).tolist()
                        if nonfinite:
                            summary_stop = f"loss is {loss.item()} at step {state['step']}"
                            break
                        step_loss = loss.item()
                        logger.step({"train/loss": step_loss, "lr": scheduler.get_last_lr()[0]}, state["step"])
                        rate = seen * world / max(time.perf_counter() - t0, 1e-9)
                        bar.update(task, info=f"loss {step_loss:.3f}  {rate:,.0f} img/s")
                        if stopping:
                            stop["signal"] = stop["signal"] or "a stop signal on another process"
                            bar.advance(task)
                            break
                    elif world == 1 and stop["signal"]:
                        bar.advance(task)
                        break
                bar.advance(task)
                if state["step"] >= total_steps:
                    break
            train_time = time.perf_counter() - t0
            bar.remove_task(task)
            train_loss = accelerator.reduce(loss_sum, reduction="mean").item() / max(loss_count, 1)
            if summary_stop is None and not math.isfinite(train_loss):
                summary_stop = f"loss is {train_loss} in epoch {epoch + 1}"
            if summary_stop is not None:
                break
            if world > 1:  # agree on stopping at the epoch end too
                stopping = torch.tensor(float(stop["signal"] is not None), device=device)
                if accelerator.reduce(stopping, reduction="sum").item() > 0:
                    stop["signal"] = stop["signal"] or "a stop signal on another process"
            if stop["signal"]:
                save_state(stop["signal"])
                summary_stop = f"stopped by {stop['signal']} at step {state['step']}"
                break
            epoch_done = state["step"] >= (epoch + 1) * steps_per_epoch or state["step"] >= total_steps
            counts = accelerator.reduce(torch.stack([correct_sum, torch.tensor(seen, device=device)]), reduction="sum")
            record = {"epoch": epoch + 1, "step": state["step"], "train/loss": train_loss,
                      "train/loss_epoch": train_loss, "train/accuracy": counts[0].item() / max(counts[1].item(), 1),
                      "lr": scheduler.get_last_lr()[0],
                      "images_per_sec": seen * world / max(train_time, 1e-9)}
            if world > 1:
                # DDP syncs BatchNorm statistics from rank 0 only at the start of a forward: after the last
                # step each rank holds its own. Evaluate (and save) rank 0's on every rank.
                for buf in unwrap_model(model).buffers():
                    torch.distributed.broadcast(buf.data, src=0)
            if epoch_done and ((epoch + 1) % t["eval_every"] == 0 or state["step"] >= total_steps):
                val = evaluate(model, val_loader, accelerator, num_classes, transform=aug.eval_transform)
                record.update({"val/loss": val["loss"], "val/accuracy": val["accuracy"], "val/top5": val["top5"]})
                if val["accuracy"] > state["best_accuracy"]:
                    state["best_accuracy"], state["best_epoch"] = val["accuracy"], epoch + 1
                    save_weights("best.safetensors", {"epoch": epoch + 1, "step": state["step"],
                                                      "val_accuracy": val["accuracy"], "val_loss": val["loss"],
                                                      "val_split": d["val_split"]})
            logger.epoch(record)
            history.append(record)
            state["epoch"] = epoch + 1
            save_weights("last.safetensors", {"epoch": epoch + 1, "step": state["step"]})
            save_state("epoch")
            accelerator.print(_epoch_line(record))
    if end_training:
        accelerator.end_training()
    else:  # only close this run's trackers: accelerator.end_training would destroy the process group
        for tracker in accelerator.trackers:
            tracker.finish()
    summary = {"output": str(output), "steps": state["step"], "total_steps": total_steps, "epochs": state["epoch"],
               "best_accuracy": state["best_accuracy"], "best_epoch": state["best_epoch"], "history": history,
               "stopped": summary_stop}
    if summary_stop is not None:
        if summary_stop.startswith("loss is"):
            raise TrainingStopped(f"{summary_stop}: stopping (lower the lr or enable grad_clip). "
                                  f"The best checkpoint so far is kept in {output}")
        raise TrainingStopped(f"{summary_stop}; resumable state saved in {output / 'state'} "
                              f"(run again with --resume to continue)")
    return summary


def environment_info(accelerator: Optional[Accelerator] = None) -> Dict[str, Any]:
    """What a report needs to reproduce a run: the command, package versions, hardware."""
    import platform
    import sys
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("tinycnn", "torch", "torchvision", "timm", "accelerate", "webdataset", "safetensors"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    hardware = {"platform": platform.platform(), "python": platform.python_version(), "cpu": platform.processor(),
                "cpu_count": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            hardware["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        hardware["gpu"] = torch.cuda.get_device_name(0)
        hardware["gpu_count"] = torch.cuda.device_count()
    info = {"command": [os.path.basename(sys.executable), *sys.argv], "cwd": os.getcwd(), "versions": versions,
            "hardware": hardware, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if accelerator is not None:
        info.update(num_processes=accelerator.num_processes, device=str(accelerator.device),
                    mixed_precision=accelerator.mixed_precision)
    return info


def _epoch_line(r: Dict[str, Any]) -> str:
    val = f" val loss {r['val/loss']:.4f} acc {r['val/accuracy']:.2%}" if "val/accuracy" in r else ""
    return f"epoch {r['epoch']}: train loss {r['train/loss']:.4f}{val} lr {r['lr']:.2e} {r['images_per_sec']:.0f} img/s"
