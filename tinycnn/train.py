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
from typing import Any, Dict, List, Optional

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from timm.utils import ModelEmaV3

from .config import Config, ConfigError, flatten
from .device import make_accelerator, out_of_memory_message
from .environment import environment_info
from .errors import TinycnnError
from .evaluation import evaluate
from .files import atomic_write, open_regular
from .formatting import hms
from .plan import RunPlan, Training, build_loaders, build_training, optimizer_implementation
from .progress import RunProgress
from .state import StateError, has_saved_state, load_state, save_state
from .storage import read_manifest
from .transfer import DevicePrefetcher, DeviceResidentLoader
from .weights import save_model

__all__ = ["train", "TrainingStopped", "OutOfDeviceMemory"]

CPU_ESTIMATE_STEPS = 20           # optimizer steps a CPU run times (after its first) before it estimates its length
CPU_ESTIMATE_NOTICE_S = 15 * 60   # a CPU run estimated to take longer says so (once)


class TrainingStopped(TinycnnError, RuntimeError):
    """The run stopped early (NaN loss, SIGTERM, Ctrl-C); resumable state and the best checkpoint are kept."""


class OutOfDeviceMemory(TinycnnError, RuntimeError):
    """The device ran out of memory; the message names the batch size to try."""


def train(cfg: Config, output: Path, *, resume: bool = False, accelerator: Optional[Accelerator] = None,
          progress: bool = True) -> Dict[str, Any]:
    """Train per `cfg` into `output`; returns a summary (best val accuracy, epochs, steps, history, ...)."""
    output = Path(output)
    accelerator = accelerator or make_accelerator(cfg, output)
    _seed_and_kernels(cfg, accelerator.device)
    manifest = read_manifest(cfg.data.root)
    loop = _Loop(cfg, output, accelerator, manifest, progress)   # data, model, optimizer, schedule, step
    try:
        loop.start(resume)
        with _StopSignals() as stop, loop.bar:
            while loop.state["step"] < loop.total_steps and loop.stop_reason is None:
                loop.train_epoch(stop)
                if loop.stop_reason is None:
                    loop.end_epoch()
            if loop.stop_reason is not None and not loop.stop_reason.startswith("loss is"):
                loop.save_resumable(loop.stop_reason)
    except torch.cuda.OutOfMemoryError:
        raise OutOfDeviceMemory(out_of_memory_message(cfg, accelerator)) from None
    finally:
        accelerator.end_training()
        loop.close()
    return loop.summary()


def _seed_and_kernels(cfg: Config, device: torch.device):
    set_seed(cfg.train.seed, device_specific=True)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cudnn pick the fastest kernels once
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


class _Loop:
    """One run's loaders, training objects and counters, and what it does per epoch."""

    def __init__(self, cfg: Config, output: Path, accelerator: Accelerator, manifest: Dict[str, Any], progress: bool):
        t, d = cfg.train, cfg.data
        self.cfg, self.output, self.accelerator = cfg, output, accelerator
        self.device, self.world = accelerator.device, accelerator.num_processes
        self.num_classes = manifest["num_classes"]
        self.wnids = [c["wnid"] for c in manifest["classes"]]
        self.names = [c.get("name", c["wnid"]) for c in manifest["classes"]]

        # --- data: each rank reads its own shards (never accelerator.prepare'd: see tinycnn.data)
        plan = RunPlan.from_config(cfg)
        rank = dict(rank=accelerator.process_index, world_size=self.world)
        self.train_loader, self.val_loader = build_loaders(cfg, plan, **rank)
        self.loaders = [self.train_loader, self.val_loader]
        if d.device_resident:  # the first epoch streams, later ones are served from device memory
            self.loaders.append(build_loaders(cfg, plan, **rank, train_once=True)[0])
            self.batches = DeviceResidentLoader(self.loaders[-1], self.device, num_batches=len(self.train_loader),
                                                batch_size=t.batch_size, seed=t.seed)
        else:
            self.batches = DevicePrefetcher(self.train_loader, self.device)
        self.steps_per_epoch = len(self.train_loader) // t.grad_accum_steps
        if self.steps_per_epoch < 1:
            raise ConfigError(f"the train split makes no optimizer step of train.batch_size={t.batch_size} x "
                             f"{self.world} processes x train.grad_accum_steps={t.grad_accum_steps}: lower "
                             "train.batch_size")
        self.total_steps = t.max_steps or self.steps_per_epoch * t.epochs
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)

        # --- what trains: model (prepared), optimizer, schedule, augmentation, mixing, step
        self.run: Training = build_training(cfg, self.num_classes, accelerator=accelerator,
                                            total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch)
        # made after prepare, so DDP has given every rank rank 0's weights: a copy of the plain model, in eval mode
        self.ema = (ModelEmaV3(self.run.raw_model, decay=t.ema_decay, use_warmup=t.ema_warmup) if t.ema else None)
        self.state = {"epoch": 0, "step": 0, "best_accuracy": -1.0, "best_epoch": None}
        self.history: List[Dict[str, Any]] = []
        self.stop_reason: Optional[str] = None
        self.record: Dict[str, Any] = {}
        self.bar = RunProgress(self.total_steps, enabled=progress and accelerator.is_main_process,
                               interval_s=t.progress_seconds)
        # a CPU step is synchronous anyway: agree on stopping every step there (SIGTERM is answered in one step);
        # on a GPU every log_every steps, where the loss is read anyway, so the hot loop never waits for the device
        self.agree_every = 1 if self.device.type == "cpu" and self.world > 1 else t.log_every

    # ------------------------------------------------------------------ start: fresh or resumed
    def start(self, resume: bool):
        """Load the saved state on --resume (the same schedule and step count go on), write config and run.json."""
        acc, output, run = self.accelerator, self.output, self.run
        state_dir = output / "state"
        if resume and has_saved_state(state_dir):
            self.state = load_state(state_dir, accelerator=acc, model=run.model, optimizer=run.optimizer,
                                    scheduler=run.scheduler, ema=self.ema)
            self.state.pop("reason", None)
            if acc.is_main_process:  # epochs logged after the saved state are trained again: log them once
                _keep_metrics_until(output / "metrics.jsonl", self.state["epoch"])
            acc.print(f"resuming {output} at epoch {self.state['epoch']}, step {self.state['step']} of "
                      f"{self.total_steps}")
        elif resume:
            if acc.is_main_process:  # epochs logged before any state was committed are trained again
                _keep_metrics_until(output / "metrics.jsonl", 0)
            acc.print(f"--resume: no saved state in {state_dir} yet, starting from the beginning")
        if acc.is_main_process:
            output.mkdir(parents=True, exist_ok=True)
            atomic_write(output / "config.yaml",
                         lambda tmp: Path(tmp).write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)))
            info = environment_info(acc, optimizer=optimizer_implementation(run.optimizer),
                                    compiled=run.step.compiled, augment_compiled=run.step.augment_compiled)
            atomic_write(output / "run.json", lambda tmp: Path(tmp).write_text(json.dumps(info, indent=1)))
        acc.init_trackers("tb", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                        for k, v in flatten(self.cfg).items()})
        self.estimate = _CpuRunEstimate(acc, run.raw_model, self.num_classes, total_steps=self.total_steps,
                                        start_step=self.state["step"], epochs=self.epochs - self.state["epoch"])

    # ------------------------------------------------------------------ one epoch of optimizer steps
    def train_epoch(self, stop: "_StopSignals"):
        """Train until the epoch's last optimizer step (or a stop); sets self.record, or self.stop_reason."""
        t, acc, run, state = self.cfg.train, self.accelerator, self.run, self.state
        epoch, t0 = state["epoch"], time.perf_counter()
        epoch_start = epoch * self.steps_per_epoch
        skip = (state["step"] - epoch_start) * t.grad_accum_steps  # a resumed epoch skips what it trained
        self.batches.set_epoch(epoch)
        run.model.train()
        self.bar.start_epoch(epoch, self.epochs, len(self.batches), done=skip)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        micro_steps, seen = 0, 0
        for i, (images, labels) in enumerate(self.batches):
            if i < skip:
                continue
            loss, logits = run.step(images, labels)
            loss_sum += loss
            correct += (logits.argmax(dim=1) == labels).sum()
            micro_steps += 1
            seen += images.shape[0]
            if not acc.sync_gradients:
                self.bar.advance(state["step"], new_step=False)
                continue
            run.scheduler.step()
            state["step"] += 1
            if self.ema is not None:  # the step count drives timm's warmup (and makes step 1 a plain copy)
                self.ema.update(run.raw_model, step=state["step"])
            self.estimate.after_step(state["step"])
            info = None
            if (state["step"] % self.agree_every == 0 or state["step"] == self.total_steps
                    or (self.world == 1 and stop.signal)):
                self.stop_reason = _stop_reason(acc, loss, stop, state["step"])
                if self.stop_reason is not None:
                    break
                if state["step"] % t.log_every == 0:
                    step_loss = loss.item()  # a host sync: only every log_every steps
                    acc.log({"train/loss_step": step_loss, "lr": run.scheduler.get_last_lr()[0]}, step=state["step"])
                    info = f"loss {step_loss:.3f}  {seen * self.world / (time.perf_counter() - t0):,.0f} img/s"
            self.bar.advance(state["step"], info)
            if state["step"] >= min(self.total_steps, epoch_start + self.steps_per_epoch):
                break
            if t.save_every_steps and state["step"] % t.save_every_steps == 0:
                # within the epoch: a kill loses at most save_every_steps steps; the resumed epoch skips the
                # batches trained before the save, and its train loss and accuracy cover the steps after it
                self.save_resumable("steps")
        train_seconds = time.perf_counter() - t0
        self.bar.end_epoch()

        # one stop decision at the end of the epoch, on every rank
        train_loss = acc.reduce(loss_sum, reduction="mean").item() / max(micro_steps, 1)
        if self.stop_reason is None and not math.isfinite(train_loss):
            self.stop_reason = f"loss is {train_loss} in epoch {epoch + 1}"
        self.stop_reason = self.stop_reason or _stop_reason(acc, None, stop, state["step"])
        if self.stop_reason is not None:
            return
        counts = acc.reduce(torch.stack([correct, torch.tensor(seen, device=self.device)]), reduction="sum")
        self.record = {"epoch": epoch + 1, "step": state["step"], "train/loss": train_loss,
                       "train/loss_epoch": train_loss, "train/accuracy": counts[0].item() / max(counts[1].item(), 1),
                       "lr": run.scheduler.get_last_lr()[0],
                       "images_per_sec": seen * self.world / max(train_seconds, 1e-9)}
        self.epoch_t0 = t0

    # ------------------------------------------------------------------ the end of an epoch: evaluate and save
    def end_epoch(self):
        t, state, record, ema = self.cfg.train, self.state, self.record, self.ema
        epoch = record["epoch"]
        if self.world > 1:
            # DDP syncs BatchNorm statistics from rank 0 only at the start of a forward: after the last step each
            # rank holds its own. Evaluate (and save) rank 0's on every rank; the average's too (its parameters
            # follow identical weights on every rank, its BatchNorm statistics each rank's own)
            for buf in [*self.run.raw_model.buffers(), *(ema.module.buffers() if ema is not None else ())]:
                torch.distributed.broadcast(buf.data, src=0)
        last_epoch = state["step"] >= self.total_steps
        if epoch % t.eval_every == 0 or last_epoch:
            val = self.evaluate(self.run.model)
            record.update({"val/loss": val["loss"], "val/accuracy": val["accuracy"], "val/top5": val["top5"]})
            candidates = [("raw", self.run.model, val)]
            if ema is not None:
                val_ema = self.evaluate(ema.module)
                record.update({"val_ema/loss": val_ema["loss"], "val_ema/accuracy": val_ema["accuracy"],
                               "val_ema/top5": val_ema["top5"]})
                candidates.append(("ema", ema.module, val_ema))
            if t.tta is not None:
                record["tta"] = t.tta
            kind, weights, best = max(candidates, key=lambda c: c[2]["accuracy"])  # a tie: the raw weights
            if best["accuracy"] > state["best_accuracy"]:
                state["best_accuracy"], state["best_epoch"] = best["accuracy"], epoch
                self.save_weights("best.safetensors", {"epoch": epoch, "step": state["step"],
                                                       "val_accuracy": best["accuracy"], "val_loss": best["loss"],
                                                       "val_split": self.cfg.data.val_split, "weights": kind,
                                                       "tta": t.tta}, weights)
        state["epoch"] = epoch
        save_now = epoch % t.save_every == 0 or last_epoch
        if save_now:
            self.save_weights("last.safetensors", {"epoch": epoch, "step": state["step"], "weights": "raw"})
            if ema is not None:
                self.save_weights("last_ema.safetensors", {"epoch": epoch, "step": state["step"], "weights": "ema"},
                                  ema.module)
        record["epoch_seconds"] = time.perf_counter() - self.epoch_t0  # the whole epoch: training, evaluation, checkpoints
        # the epoch's line before the state that commits the epoch: a kill in between trains the epoch again and
        # the resume drops the line (_keep_metrics_until), so no epoch is ever missing or logged twice
        _log_epoch(self.accelerator, self.output, record)
        self.history.append(record)
        if save_now:
            self.save_resumable("epoch")

    def evaluate(self, weights: torch.nn.Module) -> Dict[str, Any]:
        return evaluate(weights, self.val_loader, self.accelerator, self.num_classes,
                        transform=self.run.augment.eval_transform, tta=self.cfg.train.tta)

    def save_weights(self, name: str, extra: Dict[str, Any], weights: Optional[torch.nn.Module] = None):
        if self.accelerator.is_main_process:
            save_model(weights if weights is not None else self.run.model, self.output / name, classes=self.wnids,
                       class_names=self.names, extra=extra)

    def save_resumable(self, reason: str):
        run = self.run
        save_state(self.output / "state", accelerator=self.accelerator, model=run.model, optimizer=run.optimizer,
                   scheduler=run.scheduler, progress={**self.state, "reason": reason}, ema=self.ema)

    def close(self):
        for loader in self.loaders:
            if loader is not None:
                loader.close()

    def summary(self) -> Dict[str, Any]:
        """The run's summary; raises TrainingStopped when it stopped early."""
        state, reason, output = self.state, self.stop_reason, self.output
        summary = {"output": str(output), "steps": state["step"], "total_steps": self.total_steps,
                   "epochs": state["epoch"], "best_accuracy": state["best_accuracy"],
                   "best_epoch": state["best_epoch"], "history": self.history, "stopped": reason}
        if reason is None:
            return summary
        if reason.startswith("loss is"):
            raise TrainingStopped(f"{reason}: stopping (lower train.optimizer.lr or set train.grad_clip=1.0). "
                                  f"The best checkpoint so far is kept in {output}")
        raise TrainingStopped(f"{reason} at step {state['step']}; resumable state saved in {output / 'state'} "
                              f"(continue with --resume --output {output})")


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
        raise StateError(f"{path} is not a regular file: a tinycnn run never writes one like it; "
                         "start a new run or --resume from a good copy")
    if path.is_file():
        with open(path, "rb") as f:
            raw = f.read(MAX_METRICS_BYTES + 1)
        if len(raw) > MAX_METRICS_BYTES:
            raise StateError(f"{path} is larger than {MAX_METRICS_BYTES >> 20} MiB: not a tinycnn metrics file")
        lines = [line for line in raw.decode("utf-8", errors="replace").splitlines() if line.strip()]
        kept = [line for line in lines if keep(line)]
        if len(kept) != len(lines):
            atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)))


def _log_epoch(accelerator: Accelerator, output: Path, record: Dict[str, Any]):
    """metrics.jsonl (one JSON object per epoch), the trackers, and one printed line."""
    if accelerator.is_main_process:
        # a metrics.jsonl planted as a link (or a FIFO) in someone else's run folder is never written through
        fd = open_regular(output / "metrics.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
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
        text = (f"on the CPU {which} takes about {hms(seconds)} ({self.epochs} epochs, {seconds_per_step:.2f} s a "
                f"step, a model of {size:,} parameters)")
        if size > 2 * small_size:
            return (f"{text}; recipes/configs/cpu.yaml trains a {small_size / 1000:.0f}k-parameter model made for "
                    f"the CPU in a fraction of that (--config recipes/configs/cpu.yaml)")
        return f"{text}; fewer train.epochs (or a train.max_steps) make it shorter"
