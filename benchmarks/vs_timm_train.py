#!/usr/bin/env python
"""tinycnn's recipe against timm's own train.py with matching flags: wall time and top-1 over seeds.

    python benchmarks/vs_timm_train.py --data shards/sample --timm-scripts timm-scripts --seeds 1 2 3 \
        --out checkpoints/vs_timm

--timm-scripts is a folder holding timm's train.py (from timm's repository; it is not in timm's package).
For every seed both sides train the same model on the same shards for the same epochs, one process at a time:

  tinycnn  recipes/train.py --config CONFIG (default cpu.yaml) plus timm-like.yaml's augment:, mixup: and
           train.ema/ema_warmup/tta/label_smoothing as overrides (train.ema_decay from --ema-decay)
  timm     train.py --device-modules tinycnn --model tinycnn with the flags that CONFIG and those pieces
           translate to (timm_flags below; --extra-timm-args adds more)

The wall time of a run is that of its training process, from start to exit (data opening, every epoch's
training and val evaluation, checkpoint writes). Beside it: the CPU seconds of the process and its loader
workers, and the training seconds of the run's fastest epoch (tinycnn: metrics.jsonl; timm: its log's mean step
time times the steps), which show how much of a wall-time difference other load on the machine made. Then each
side's best weights are evaluated on --split (`test`: the official validation images) by the same code,
recipes/evaluate.py, without and with flip TTA: tinycnn's best.safetensors (the better of the raw and EMA
weights by val top-1), and timm's model_best.pth.tar (with --model-ema timm ranks epochs by the EMA's val top-1
and keeps its EMA weights: those are evaluated), written as a tinycnn .safetensors first.

What the flags cannot match:
  - the crop: tinycnn pads by augment.crop_padding and crops (a shift, no zoom); timm has only
    RandomResizedCrop: --scale S 1 --ratio 1 1 with S = (size - 2 * padding)^2 / size^2 (56-64 px squares
    resized to 64 for padding 4), a shift of up to 2 * padding plus a zoom of up to size / (size - 2 * padding);
  - TrivialAugmentWide: timm has none; the closest is its RandAugment with one op per image, always applied,
    a magnitude uniform in [0, 10] and the "increasing" ops (rand-m10-n1-p1.0-mstd101-inc1): its op set adds
    Invert and SolarizeAdd and lacks Identity, and its ranges at magnitude 10 are the standard TrivialAugment's
    (rotate 30 degrees, shear 0.3, translate 45%, posterize to 4-0 bits), not the Wide ones (135, 0.99, 50%,
    8-2 bits);
  - where the augmentation runs: timm per image with PIL in its loader workers (the CPU), tinycnn batched on
    the training device after decoding;
  - the warmup: both per step from 0 (--sched-on-updates --warmup-prefix --warmup-lr 0); tinycnn's is one
    step ahead, so that no step trains at lr 0 (tests/test_config.py);
  - steps: timm's WebDataset loader keeps the last partial batch (71 steps an epoch on the sample), tinycnn
    drops it (70);
  - checkpoint choice: tinycnn keeps the better of raw and EMA weights, timm the EMA's best epoch.
Run folders go to OUT/tinycnn-sSEED and OUT/timm-sSEED; a folder with a finished run and its evaluations is read,
not trained again (an unfinished one is trained again from scratch: a resumed run's wall time is not one process's).
Prints a Markdown table (mean ± sample standard deviation over seeds) and writes the rows to OUT/vs_timm.json.
"""
import argparse
import csv
import json
import os
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TIMM_LIKE = REPO / "recipes" / "configs" / "timm-like.yaml"
TIMM_TRIVIALAUGMENT = "rand-m10-n1-p1.0-mstd101-inc1"  # see the module docstring


def timm_like_overrides(ema_decay: float) -> list:
    """timm-like.yaml's recipe pieces as config overrides, so that CONFIG keeps its model, batch and epochs."""
    pieces = yaml.safe_load(TIMM_LIKE.read_text())
    overrides = [f"augment.{k}={v}" for k, v in pieces["augment"].items()]
    overrides += [f"mixup.{k}={v}" for k, v in pieces["mixup"].items()]
    overrides += [f"train.{k}={str(pieces['train'][k]).lower()}" for k in ("ema", "ema_warmup", "tta")]
    overrides += [f"train.label_smoothing={pieces['train']['label_smoothing']}", f"train.ema_decay={ema_decay}"]
    return overrides


def timm_flags(cfg, num_classes: int) -> list:
    """timm train.py's flags for a resolved tinycnn config (the model, the data pipeline and the optimization)."""
    train, aug, mix, opt, sched = cfg.train, cfg.augment, cfg.mixup, cfg.train.optimizer, cfg.train.scheduler
    if aug.policy not in (None, "trivialaugment") or sched.name != "cosine" or opt.name != "adamw":
        raise SystemExit("vs_timm_train.py translates policy trivialaugment, adamw and cosine only")
    if train.device != "cpu" and train.mixed_precision not in ("no", None):
        raise SystemExit("vs_timm_train.py compares fp32 runs: set train.mixed_precision=no")
    if not float(sched.warmup_epochs).is_integer() or sched.warmup_epochs >= train.epochs:
        raise SystemExit("timm's train.py takes whole warmup epochs, fewer than train.epochs")
    warmup = int(sched.warmup_epochs)
    size = 64
    min_scale = (size - 2 * aug.crop_padding) ** 2 / size ** 2
    model_kwargs = [f"{k}=[{','.join(str(c) for c in getattr(cfg, k))}]" for k in ("stage_channels", "stage_repeats")
                    if getattr(cfg, k) is not None]
    flags = ["--model", cfg.model, "--num-classes", str(num_classes), *(["--model-kwargs", *model_kwargs]
                                                                         if model_kwargs else []),
             "-b", str(train.batch_size), "--epochs", str(train.epochs - warmup),  # --warmup-prefix adds the warmup
             "--opt", "adamw", "--lr", str(opt.lr), "--weight-decay", str(opt.weight_decay),
             "--sched", "cosine", "--sched-on-updates", "--warmup-epochs", str(warmup),
             "--warmup-prefix", "--warmup-lr", "0", "--min-lr", str(opt.lr * sched.min_lr_ratio),
             "--smoothing", str(train.label_smoothing),
             "--scale", f"{min_scale:.4f}", "1", "--ratio", "1", "1", "--hflip", str(aug.flip_p),
             "--workers", str(cfg.data.num_workers), "--device", train.device]
    if aug.policy == "trivialaugment":
        flags += ["--aa", TIMM_TRIVIALAUGMENT]
    elif any((aug.brightness, aug.contrast, aug.saturation)):
        flags += ["--color-jitter", str(max(aug.brightness, aug.contrast, aug.saturation))]
    else:
        flags += ["--color-jitter", "0"]
    if aug.erase_p:
        flags += ["--reprob", str(aug.erase_p), "--remode", aug.erase_mode, "--recount", str(aug.erase_count)]
    if mix.mixup_alpha or mix.cutmix_alpha:
        flags += ["--mixup", str(mix.mixup_alpha), "--cutmix", str(mix.cutmix_alpha), "--mixup-prob", str(mix.prob),
                  "--mixup-switch-prob", str(mix.switch_prob), "--mixup-mode", mix.mode]
    if train.ema:
        flags += ["--model-ema", "--model-ema-decay", str(train.ema_decay),
                  *(["--model-ema-warmup"] if train.ema_warmup else [])]
    if train.grad_clip:
        flags += ["--clip-grad", str(train.grad_clip)]
    return flags


def timed(command: list, log: Path) -> dict:
    """Run `command` to its end with its output in `log`: the seconds from its start to its exit, and the CPU
    seconds (user + system) of it and its loader workers, which other load on the machine inflates less."""
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    with open(log, "w") as out:
        subprocess.run(command, check=True, stdout=out, stderr=subprocess.STDOUT)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall_s": wall, "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "load_avg_1min_at_end": os.getloadavg()[0]}


def evaluate(weights: Path, out: Path, args) -> dict:
    """top-1 on args.split without and with flip TTA, by recipes/evaluate.py (the same code for both sides)."""
    results = {}
    for tta in ("none", "flip"):
        path = out / f"{args.split}-{tta}.json"
        if not path.is_file():
            subprocess.run([sys.executable, str(REPO / "recipes" / "evaluate.py"), "--checkpoint", str(weights),
                            "--data", args.data, "--split", args.split, "--device", "cpu", "--json", str(path),
                            "--overwrite", *(["--tta", "flip"] if tta == "flip" else [])],
                           check=True, stdout=subprocess.DEVNULL)
        results[tta] = json.loads(path.read_text())["accuracy"]
    return results


def fresh(out: Path, marker: str):
    """A run folder without a finished run (no wall.json) is trained again from scratch: deleted when it is empty or
    holds `marker` (train.py's config.yaml, timm's args.yaml), refused when it holds anything else."""
    if not out.is_dir() or (out / "wall.json").is_file():
        return
    if any(out.iterdir()) and not (out / marker).is_file():
        raise SystemExit(f"vs_timm_train.py: error: {out} holds files this script did not write: choose another --out")
    shutil.rmtree(out)


def run_tinycnn(seed: int, cfg, overrides: list, args) -> dict:
    out = Path(args.out) / f"tinycnn-s{seed}"
    fresh(out, "config.yaml")
    if not out.exists():
        command = [sys.executable, str(REPO / "recipes" / "train.py"), "--config", args.config, "--data", args.data,
                   "--output", str(out), "--no-progress", "--no-download", f"train.seed={seed}", *overrides]
        log = Path(args.out) / f"tinycnn-s{seed}.log"
        (out / "wall.json").write_text(json.dumps({**timed(command, log), "command": shlex.join(command)}))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    best_val = max(max(m.get("val/accuracy", 0.0), m.get("val_ema/accuracy", 0.0)) for m in metrics)
    test = evaluate(out / "best.safetensors", out, args)
    steps = [m["step"] - previous["step"] for previous, m in zip([{"step": 0}] + metrics, metrics)]
    fastest = min(n * cfg.train.batch_size / m["images_per_sec"] for n, m in zip(steps, metrics))
    return {"side": "tinycnn", "seed": seed, "epochs": len(metrics), "val": best_val, "test": test["none"],
            "fastest_epoch_train_s": fastest,
            "test_flip": test["flip"], **json.loads((out / "wall.json").read_text())}


def timm_weights(run: Path, cfg, data: str) -> Path:
    """timm's model_best.pth.tar (its EMA weights when it kept them) as a tinycnn .safetensors, for evaluate.py."""
    weights = run / "best.safetensors"
    if weights.is_file():
        return weights
    import argparse as _argparse

    import timm
    import torch

    import tinycnn  # noqa: F401  registers the model with timm
    from tinycnn.storage import read_manifest
    from tinycnn.weights import save_model

    with torch.serialization.safe_globals([_argparse.Namespace]):  # timm stores its argparse namespace
        checkpoint = torch.load(run / "model_best.pth.tar", map_location="cpu", weights_only=True)
    kind = "ema" if "state_dict_ema" in checkpoint else "raw"
    classes = read_manifest(data)["classes"]
    model_kwargs = {k: getattr(cfg, k) for k in ("stage_channels", "stage_repeats") if getattr(cfg, k) is not None}
    model = timm.create_model(cfg.model, num_classes=len(classes), **model_kwargs)
    model.load_state_dict(checkpoint["state_dict_ema" if kind == "ema" else "state_dict"])
    save_model(model, weights, classes=[c["wnid"] for c in classes], class_names=[c.get("name") or c["wnid"]
                                                                                  for c in classes],
               extra={"source": "timm train.py model_best.pth.tar", "weights": kind, "epoch": checkpoint.get("epoch")})
    return weights


# timm's log line for a train step: "Train: EPOCH [ STEP/STEPS (..%)]  ...  Time: LAST s, LAST/s  (MEAN s, MEAN/s)"
TIMM_TRAIN_LINE = re.compile(r"Train: (\d+) \[\s*(\d+)/\d+ .*?Time: [\d.]+s,\s*[\d.]+/s\s+\(([\d.]+)s,")


def timm_epoch_train_seconds(log: Path) -> dict:
    """Each epoch's training seconds from timm's log: its last logged step's mean step time times the steps."""
    seconds = {}
    for match in TIMM_TRAIN_LINE.finditer(log.read_text()):
        epoch, step, mean = int(match[1]), int(match[2]), float(match[3])
        seconds[epoch] = (step + 1) * mean
    return seconds


def run_timm(seed: int, cfg, num_classes: int, args) -> dict:
    out = Path(args.out) / f"timm-s{seed}"
    fresh(out, "args.yaml")
    if not out.exists():
        command = [sys.executable, str(Path(args.timm_scripts) / "train.py"), "--device-modules", "tinycnn",
                   "--dataset", "wds/tiny", "--data-dir", args.data, "--train-split", "train", "--val-split", "val",
                   *timm_flags(cfg, num_classes), "--seed", str(seed), "--output", str(args.out),
                   "--experiment", out.name, *shlex.split(args.extra_timm_args)]
        log = Path(args.out) / f"timm-s{seed}.log"
        (out / "wall.json").write_text(json.dumps({**timed(command, log), "command": shlex.join(command)}))
    with open(out / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    test = evaluate(timm_weights(out, cfg, args.data), out, args)
    return {"side": "timm", "seed": seed, "epochs": len(summary),
            "val": max(float(r["eval_top1"]) for r in summary) / 100,  # timm logs percent
            "test": test["none"], "test_flip": test["flip"],
            "fastest_epoch_train_s": min(timm_epoch_train_seconds(Path(args.out) / f"timm-s{seed}.log").values()),
            **json.loads((out / "wall.json").read_text())}


def spread(values, scale: float = 100, digits: int = 1) -> str:
    mean = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * mean:.{digits}f} ± {scale * sd:.{digits}f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a tinycnn-prepare output folder")
    parser.add_argument("--timm-scripts", required=True, help="a folder holding timm's train.py")
    parser.add_argument("--config", default=str(REPO / "recipes" / "configs" / "cpu.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--ema-decay", type=float, default=0.99,
                        help="both sides' EMA decay (timm-like.yaml's 0.999 averages over more steps than a short "
                             "run has)")
    parser.add_argument("--split", default="test", help="the split the best weights are evaluated on")
    parser.add_argument("--extra-timm-args", default="", help="more flags for timm's train.py, one shell-quoted string")
    parser.add_argument("--out", default="checkpoints/vs_timm", help="run folders go here")
    args = parser.parse_args()
    if not (Path(args.timm_scripts) / "train.py").is_file():
        parser.exit(2, f"vs_timm_train.py: error: no train.py in --timm-scripts {args.timm_scripts}: copy timm's "
                       f"train.py from its repository (github.com/huggingface/pytorch-image-models) into a folder\n")
    if not (Path(args.data) / "manifest.json").is_file():
        parser.exit(2, f"vs_timm_train.py: error: no manifest.json in --data {args.data}: run tinycnn-prepare first\n")

    from tinycnn.config import load_config
    from tinycnn.storage import read_manifest

    overrides = timm_like_overrides(args.ema_decay)
    cfg = load_config(args.config, overrides)
    num_classes = len(read_manifest(args.data)["classes"])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:  # alternating sides, so that a slower stretch of the machine hits both
        rows.append(run_tinycnn(seed, cfg, overrides, args))
        rows.append(run_timm(seed, cfg, num_classes, args))
        print(json.dumps(rows[-2:]), flush=True)
    (Path(args.out) / "vs_timm.json").write_text(json.dumps({
        "rows": rows, "tinycnn_overrides": overrides, "timm_flags": timm_flags(cfg, num_classes)}, indent=1))
    print(f"\n| side | best val top-1 | {args.split} top-1 | {args.split} top-1, flip TTA | wall per run (s) | "
          f"CPU per run (s) | fastest epoch's training (s) |")
    print("|---|---|---|---|---|---|---|")
    for side in ("tinycnn", "timm"):
        mine = [r for r in rows if r["side"] == side]
        print(f"| {side} | {spread([r['val'] for r in mine])} | {spread([r['test'] for r in mine])} | "
              f"{spread([r['test_flip'] for r in mine])} | {spread([r['wall_s'] for r in mine], 1, 0)} | "
              f"{spread([r['cpu_s'] for r in mine], 1, 0)} | "
              f"{spread([r['fastest_epoch_train_s'] for r in mine], 1, 1)} |")


if __name__ == "__main__":
    main()
