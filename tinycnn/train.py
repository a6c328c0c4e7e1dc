"""One training run under accelerate, readable top to bottom: `train(cfg, output)`.

shards -> loader (uint8, per rank) -> device prefetch -> TrainStep (GPUAugment, forward, loss, backward, optimizer)
-> after each epoch: evaluation on val, best.safetensors, last.safetensors + resumable state, metrics.jsonl.
Options of the config, all off by default: Mixup / CutMix after the augmentation (`mixup:`, soft targets); an
exponential moving average of the weights (`train.ema`: timm's ModelEmaV3, updated after every optimizer step and
evaluated beside the raw weights; best.safetensors keeps the better of the two, its metadata's extra.weights says
which ("raw" or "ema"); last.safetensors holds the raw weights and last_ema.safetensors the average; state/ keeps
the average for --resume); flip test-time augmentation at every evaluation (`train.tta: flip`, recorded as
"tta" in metrics.jsonl and in the weights' extra).
On the CPU, after its first CPU_ESTIMATE_STEPS optimizer steps, a run that will take longer than
CPU_ESTIMATE_NOTICE_S says so once, and names the recipe made for the CPU.
The resumable state (state/) is safetensors and JSON only, written and checked by tinycnn.state: a run folder
from someone else never runs code on --resume.
A run stops at the end of its steps, or early for one of two reasons decided in one place (`_stop_reason`):
a non-finite loss (the best checkpoint is kept) or a stop signal (SIGTERM, Ctrl-C, the launcher gone: state is
saved for --resume). Under several processes every rank takes that decision at the same step.
Machinery only: the output folder is claimed (and locked) by the caller, see tinycnn.runs.
"""
import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from timm.utils import ModelEmaV3, unwrap_model

from .config import Config, flatten
from .data import build_loader
from .device import make_accelerator, out_of_memory_message
from .environment import environment_info
from .evaluation import evaluate
from .plan import (RunPlan, build_augment, build_lr_lambda, build_mixup, build_model, build_optimizer,
                   optimizer_implementation)
from .progress import RunProgress
from .state import has_saved_state, load_state, save_state
from .step import TrainStep
from .storage import read_manifest
from .transfer import DevicePrefetcher, DeviceResidentLoader
from .weights import atomic_write, save_model

__all__ = ["train", "TrainingStopped"]

CPU_ESTIMATE_STEPS = 20           # optimizer steps a CPU run times (after its first) before it estimates its length
CPU_ESTIMATE_NOTICE_S = 15 * 60   # a CPU run estimated to take longer says so (once)


class TrainingStopped(RuntimeError):
    """The run stopped early (NaN loss, SIGTERM, Ctrl-C); resumable state and the best checkpoint are kept."""


def train(cfg: Config, output: Path, *, resume: bool = False, accelerator: Optional[Accelerator] = None,
          progress: bool = True, end_training: bool = True) -> Dict[str, Any]:
    """Train per `cfg` into `output`; returns a summary (best val accuracy, epochs, steps, history, ...).

    end_training=False keeps the process group for callers that train more runs (grid search).
    """
    t, d, output = cfg.train, cfg.data, Path(output)
    plan = RunPlan.from_config(cfg)
    accelerator = accelerator or make_accelerator(cfg, output)
    device, world = accelerator.device, accelerator.num_processes
    set_seed(t.seed, device_specific=True)
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cudnn pick the fastest kernels once
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # --- data: each rank reads its own shards (never accelerator.prepare'd: see tinycnn.data)
    manifest = read_manifest(d.root)
    num_classes = manifest["num_classes"]
    wnids = [c["wnid"] for c in manifest["classes"]]
    names = [c.get("name", c["wnid"]) for c in manifest["classes"]]
    common = dict(rank=accelerator.process_index, world_size=world, num_workers=d.num_workers, seed=t.seed,
                  skip_bad=d.skip_bad, cache_dir=d.cache_dir, cache_max_bytes=d.cache_max_bytes)
    train_loader = build_loader(d.root, d.train_split, batch_size=t.batch_size, train=True,
                                subset=plan.train_subset, shuffle_buffer=d.shuffle_buffer, **common)
    val_loader = build_loader(d.root, d.val_split, batch_size=t.batch_size, train=False, subset=plan.val_subset,
                              **common)
    loaders = [train_loader, val_loader]
    if d.device_resident:
        loaders.append(build_loader(d.root, d.train_split, batch_size=t.batch_size, train=False,
                                    subset=plan.train_subset, **common))
        batches = DeviceResidentLoader(loaders[-1], device, num_batches=len(train_loader), batch_size=t.batch_size,
                                       seed=t.seed)
    else:
        batches = DevicePrefetcher(train_loader, device)
    steps_per_epoch = len(train_loader) // t.grad_accum_steps
    if steps_per_epoch < 1:
        raise ValueError(f"the train split makes no optimizer step of train.batch_size={t.batch_size} x {world} "
                         f"processes x train.grad_accum_steps={t.grad_accum_steps}: lower train.batch_size")
    total_steps = t.max_steps or steps_per_epoch * t.epochs
    epochs = math.ceil(total_steps / steps_per_epoch)

    # --- model on its device, then the optimizer (fused constructors check where the parameters are)
    channels_last = t.channels_last is True or (t.channels_last == "auto" and device.type == "cuda")
    model = build_model(cfg, num_classes).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, t.optimizer, plan)
    model, optimizer = accelerator.prepare(model, optimizer)
    # stepped once per optimizer step, by us (accelerate's scheduler wrapper would step it per process)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, build_lr_lambda(t.scheduler, total_steps, steps_per_epoch))
    aug = build_augment(cfg, plan, unwrap_model(model), channels_last=channels_last).to(device)
    step = TrainStep(model, optimizer, augment=aug, label_smoothing=plan.label_smoothing, grad_clip=t.grad_clip,
                     compile=t.compile, accelerator=accelerator, mixup=build_mixup(cfg, plan, num_classes))
    raw_model = unwrap_model(model)
    # made after prepare (DDP has given every rank rank 0's weights) and after TrainStep (which takes accelerate's
    # autocast wrapper off the model's forward): a copy of the plain model, on its device, in eval mode
    ema = ModelEmaV3(raw_model, decay=t.ema_decay, use_warmup=t.ema_warmup) if t.ema else None

    # --- state: resume continues the same schedule and step count
    state = {"epoch": 0, "step": 0, "best_accuracy": -1.0, "best_epoch": None}
    state_dir = output / "state"
    if resume and has_saved_state(state_dir):
        state = load_state(state_dir, accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
                           ema=ema)
        state.pop("reason", None)
        if accelerator.is_main_process:  # epochs logged after the saved state are trained again: log them once
            _keep_metrics_until(output / "metrics.jsonl", state["epoch"])
        accelerator.print(f"resuming {output} at epoch {state['epoch']}, step {state['step']} of {total_steps}")
    elif resume:
        if accelerator.is_main_process:  # epochs logged before any state was committed are trained again
            _keep_metrics_until(output / "metrics.jsonl", 0)
        accelerator.print(f"--resume: no saved state in {state_dir} yet, starting from the beginning")
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        atomic_write(output / "config.yaml", lambda tmp: Path(tmp).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False)))
        info = environment_info(accelerator, optimizer=optimizer_implementation(optimizer),
                                compiled=step.compiled, augment_compiled=step.augment_compiled)
        atomic_write(output / "run.json", lambda tmp: Path(tmp).write_text(json.dumps(info, indent=1)))
    accelerator.init_trackers("tb", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                            for k, v in flatten(cfg).items()})

    def save_resumable(reason: str):
        save_state(state_dir, accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
                   progress={**state, "reason": reason}, ema=ema)

    def save_weights(name: str, extra: Dict[str, Any], weights: torch.nn.Module = model):
        if accelerator.is_main_process:
            save_model(weights, output / name, classes=wnids, class_names=names, extra=extra)

    def evaluate_weights(weights: torch.nn.Module) -> Dict[str, Any]:
        return evaluate(weights, val_loader, accelerator, num_classes, transform=aug.eval_transform, tta=t.tta)

    # a CPU step is synchronous anyway: agree on stopping every step there (SIGTERM is answered in one step);
    # on a GPU every log_every steps, where the loss is read anyway, so the hot loop never waits for the device
    agree_every = 1 if device.type == "cpu" and world > 1 else t.log_every
    history, stop_reason = [], None
    bar = RunProgress(total_steps, enabled=progress and accelerator.is_main_process, interval_s=t.progress_seconds)
    estimate = _CpuRunEstimate(accelerator, raw_model, num_classes, total_steps=total_steps, start_step=state["step"],
                               epochs=epochs - state["epoch"])
    try:
        with _StopSignals() as stop, bar:
            while state["step"] < total_steps and stop_reason is None:
                # ---- one epoch of optimizer steps
                epoch, t0 = state["epoch"], time.perf_counter()
                epoch_start = epoch * steps_per_epoch
                skip = (state["step"] - epoch_start) * t.grad_accum_steps  # a resumed epoch skips what it trained
                batches.set_epoch(epoch)
                model.train()
                bar.start_epoch(epoch, epochs, len(batches), done=skip)
                loss_sum = torch.zeros((), device=device)
                correct = torch.zeros((), dtype=torch.int64, device=device)
                micro_steps, seen = 0, 0
                for i, (images, labels) in enumerate(batches):
                    if i < skip:
                        continue
                    loss, logits = step(images, labels)
                    loss_sum += loss
                    correct += (logits.argmax(dim=1) == labels).sum()
                    micro_steps += 1
                    seen += images.shape[0]
                    if not accelerator.sync_gradients:
                        bar.advance(state["step"], new_step=False)
                        continue
                    scheduler.step()
                    state["step"] += 1
                    if ema is not None:  # the step count drives timm's warmup (and makes step 1 a plain copy)
                        ema.update(raw_model, step=state["step"])
                    estimate.after_step(state["step"])
                    info = None
                    if state["step"] % agree_every == 0 or state["step"] == total_steps or (world == 1 and stop.signal):
                        stop_reason = _stop_reason(accelerator, loss, stop, state["step"])
                        if stop_reason is not None:
                            break
                        if state["step"] % t.log_every == 0:
                            step_loss = loss.item()  # a host sync: only every log_every steps
                            accelerator.log({"train/loss_step": step_loss, "lr": scheduler.get_last_lr()[0]}, step=state["step"])
                            info = f"loss {step_loss:.3f}  {seen * world / (time.perf_counter() - t0):,.0f} img/s"
                    bar.advance(state["step"], info)
                    if state["step"] >= min(total_steps, epoch_start + steps_per_epoch):
                        break
                train_seconds = time.perf_counter() - t0
                bar.end_epoch()

                # ---- the end of the epoch: one stop decision, then evaluate and save
                train_loss = accelerator.reduce(loss_sum, reduction="mean").item() / max(micro_steps, 1)
                if stop_reason is None and not math.isfinite(train_loss):
                    stop_reason = f"loss is {train_loss} in epoch {epoch + 1}"
                stop_reason = stop_reason or _stop_reason(accelerator, None, stop, state["step"])
                if stop_reason is not None:
                    break
                counts = accelerator.reduce(torch.stack([correct, torch.tensor(seen, device=device)]), reduction="sum")
                record = {"epoch": epoch + 1, "step": state["step"], "train/loss": train_loss,
                          "train/loss_epoch": train_loss, "train/accuracy": counts[0].item() / max(counts[1].item(), 1),
                          "lr": scheduler.get_last_lr()[0], "images_per_sec": seen * world / max(train_seconds, 1e-9)}
                if world > 1:
                    # DDP syncs BatchNorm statistics from rank 0 only at the start of a forward: after the last
                    # step each rank holds its own. Evaluate (and save) rank 0's on every rank.
                    for buf in raw_model.buffers():
                        torch.distributed.broadcast(buf.data, src=0)
                    # the average's parameters follow identical weights on every rank, its BatchNorm statistics
                    # each rank's own: rank 0's, as for the model
                    for buf in ema.module.buffers() if ema is not None else ():
                        torch.distributed.broadcast(buf.data, src=0)
                last_epoch = state["step"] >= total_steps
                if (epoch + 1) % t.eval_every == 0 or last_epoch:
                    val = evaluate_weights(model)
                    record.update({"val/loss": val["loss"], "val/accuracy": val["accuracy"], "val/top5": val["top5"]})
                    candidates = [("raw", model, val)]
                    if ema is not None:
                        val_ema = evaluate_weights(ema.module)
                        record.update({"val_ema/loss": val_ema["loss"], "val_ema/accuracy": val_ema["accuracy"],
                                       "val_ema/top5": val_ema["top5"]})
                        candidates.append(("ema", ema.module, val_ema))
                    if t.tta is not None:
                        record["tta"] = t.tta
                    kind, weights, best = max(candidates, key=lambda c: c[2]["accuracy"])  # a tie: the raw weights
                    if best["accuracy"] > state["best_accuracy"]:
                        state["best_accuracy"], state["best_epoch"] = best["accuracy"], epoch + 1
                        save_weights("best.safetensors", {"epoch": epoch + 1, "step": state["step"],
                                                          "val_accuracy": best["accuracy"], "val_loss": best["loss"],
                                                          "val_split": d.val_split, "weights": kind, "tta": t.tta},
                                     weights)
                state["epoch"] = epoch + 1
                save_now = (epoch + 1) % t.save_every == 0 or last_epoch
                if save_now:
                    save_weights("last.safetensors", {"epoch": epoch + 1, "step": state["step"], "weights": "raw"})
                    if ema is not None:
                        save_weights("last_ema.safetensors", {"epoch": epoch + 1, "step": state["step"],
                                                              "weights": "ema"}, ema.module)
                # wall time of the whole epoch: training plus evaluation and checkpoints
                record["epoch_seconds"] = time.perf_counter() - t0
                # the epoch's line before the state that commits the epoch: a kill in between trains the epoch
                # again and the resume drops the line (_keep_metrics_until), so no epoch is ever missing
                _log_epoch(accelerator, output, record)
                history.append(record)
                if save_now:
                    save_resumable("epoch")
            if stop_reason is not None and not stop_reason.startswith("loss is"):
                save_resumable(stop_reason)
    except torch.cuda.OutOfMemoryError:
        raise RuntimeError(out_of_memory_message(cfg, accelerator)) from None
    finally:
        if end_training:
            accelerator.end_training()
        else:  # only close this run's trackers: accelerator.end_training would destroy the process group
            for tracker in accelerator.trackers:
                tracker.finish()
        for loader in loaders:
            loader.close()

    summary = {"output": str(output), "steps": state["step"], "total_steps": total_steps, "epochs": state["epoch"],
               "best_accuracy": state["best_accuracy"], "best_epoch": state["best_epoch"], "history": history,
               "stopped": stop_reason}
    if stop_reason is None:
        return summary
    if stop_reason.startswith("loss is"):
        raise TrainingStopped(f"{stop_reason}: stopping (lower train.optimizer.lr or set train.grad_clip=1.0). "
                              f"The best checkpoint so far is kept in {output}")
    raise TrainingStopped(f"{stop_reason} at step {state['step']}; resumable state saved in "
                          f"{output / 'state'} (continue with --resume --output {output})")


def _stop_reason(accelerator: Accelerator, loss: Optional[torch.Tensor], stop: "_StopSignals", step: int) -> Optional[str]:
    """The one stop decision, taken by every rank at the same step: a non-finite loss or a stop signal on any rank."""
    device = accelerator.device
    flags = torch.stack([(~torch.isfinite(loss)).float() if loss is not None else torch.zeros((), device=device),
                         torch.tensor(float(stop.signal is not None), device=device)])
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, reduction="sum")
    nonfinite, signalled = (flags > 0).tolist()
    if nonfinite:
        return f"loss is {loss.item()} at step {step}"
    if signalled:
        return stop.signal or "a stop signal on another process"
    return None


class _StopSignals:
    """SIGTERM and Ctrl-C (and SIGHUP) set a flag that the loop checks; the run then saves state and stops."""

    def __init__(self):
        self.signal: Optional[str] = None
        self._old = {}

    def _handler(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __enter__(self) -> "_StopSignals":
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


MAX_METRICS_BYTES = 64 << 20  # one short JSON line per epoch: far below this when tinycnn wrote it


def _keep_metrics_until(path: Path, epoch: int):
    """Drop the metrics.jsonl records after `epoch` (and a line torn by a kill): a resumed run logs them again.

    The run folder may come from someone else: the file is read capped and never through a link."""
    def keep(line: str) -> bool:
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            return False
        return isinstance(record, dict) and isinstance(record.get("epoch", 0), int) and record.get("epoch", 0) <= epoch

    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise ValueError(f"{path} is not a regular file: a tinycnn run never writes one like it; "
                         "start a new run or --resume from a good copy")
    if path.is_file():
        with open(path, "rb") as f:
            raw = f.read(MAX_METRICS_BYTES + 1)
        if len(raw) > MAX_METRICS_BYTES:
            raise ValueError(f"{path} is larger than {MAX_METRICS_BYTES >> 20} MiB: not a tinycnn metrics file")
        lines = [line for line in raw.decode("utf-8", errors="replace").splitlines() if line.strip()]
        kept = [line for line in lines if keep(line)]
        if len(kept) != len(lines):
            atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)))


def _log_epoch(accelerator: Accelerator, output: Path, record: Dict[str, Any]):
    """metrics.jsonl (one JSON object per epoch), the trackers, and one printed line."""
    if accelerator.is_main_process:
        # O_NOFOLLOW: a metrics.jsonl planted as a link in someone else's run folder is never written through
        fd = os.open(output / "metrics.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "a") as f:
            f.write(json.dumps(record) + "\n")
    accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "epoch"},
                    step=record["step"])
    val = f" val loss {record['val/loss']:.4f} acc {record['val/accuracy']:.2%}" if "val/accuracy" in record else ""
    if "val_ema/accuracy" in record:
        val += f" (ema loss {record['val_ema/loss']:.4f} acc {record['val_ema/accuracy']:.2%})"
    if record.get("tta"):
        val += f" [tta {record['tta']}]"
    accelerator.print(f"epoch {record['epoch']}: train loss {record['train/loss']:.4f}{val} lr {record['lr']:.2e} "
                      f"{record['images_per_sec']:.0f} img/s, {record['epoch_seconds']:.1f} s")


class _CpuRunEstimate:
    """On the CPU, once: after CPU_ESTIMATE_STEPS optimizer steps (timed from the end of the first, which pays for
    allocations and the loader starting), what the run (from its start or its resumption: `epochs` of
    `total_steps - start_step` steps) will take at that pace, when that is longer than CPU_ESTIMATE_NOTICE_S: a
    GPU-sized recipe started on a laptop says so in a minute, not after an hour. Evaluations and checkpoints
    within the timed steps are counted as they come. Printed by the main process only; nothing on other devices."""

    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, num_classes: int, *, total_steps: int,
                 start_step: int, epochs: int):
        self.accelerator, self.model, self.num_classes = accelerator, model, num_classes
        self.total_steps, self.start_step, self.epochs = total_steps, start_step, epochs
        self.active = accelerator.device.type == "cpu" and total_steps - start_step > CPU_ESTIMATE_STEPS
        self.first: Optional[int] = None
        self.t0 = 0.0

    def after_step(self, step: int):
        if not self.active:
            return
        now = time.perf_counter()
        if self.first is None:
            self.first, self.t0 = step, now
            return
        if step - self.first < CPU_ESTIMATE_STEPS:
            return
        self.active = False
        seconds_per_step = (now - self.t0) / (step - self.first)
        seconds = seconds_per_step * (self.total_steps - self.start_step)
        if seconds > CPU_ESTIMATE_NOTICE_S:
            self.accelerator.print(self.message(seconds, seconds_per_step))

    def message(self, seconds: float, seconds_per_step: float) -> str:
        import timm

        which = "this run" if self.start_step == 0 else "the rest of this run"
        size = sum(p.numel() for p in self.model.parameters())
        # recipes/configs/cpu.yaml's model, for this run's classes: counted on the meta device, its initialization
        # kept off the run's random number generators (the run goes on drawing from them)
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            small = timm.create_model("tinycnn", stage_channels=[16, 32, 64], stage_repeats=[1, 1, 1],
                                      num_classes=self.num_classes)
        small_size = sum(p.numel() for p in small.parameters())
        text = (f"on the CPU {which} takes about {_hms(seconds)} ({self.epochs} epochs, {seconds_per_step:.2f} s a "
                f"step, a model of {size:,} parameters)")
        if size > 2 * small_size:
            return (f"{text}; recipes/configs/cpu.yaml trains a {small_size / 1000:.0f}k-parameter model made for "
                    f"the CPU in a fraction of that (--config recipes/configs/cpu.yaml)")
        return f"{text}; fewer train.epochs (or a train.max_steps) make it shorter"


def _hms(seconds: float) -> str:
    """4431.2 -> '1:13:51'."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
