#!/usr/bin/env python
"""tinycnn against small timm models, trained with the same recipe on the same shards: the table in RESULTS.md.

    python benchmarks/compare_models.py --data shards/tiny-imagenet --config recipes/configs/cpu.yaml \
        --epochs 3 tinycnn:stage_channels=[16,32,64],stage_repeats=[1,1,1] tinycnn resnet10t mobilenetv3_small_100

For each model: parameters, train-step images/s (tinycnn.step.TrainStep with GPUAugment on real uint8
batches, batch 64 and 128, best of a few rounds, all models in this one run), then a training run
(tinycnn.train.train, the config's recipe for --epochs) and its best val top-1, val top-5 and wall
time. Prints a Markdown table and writes the rows to --json. A model is a timm name, with tinycnn
widths/depths after a colon.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import timm  # noqa: E402

import tinycnn  # noqa: E402,F401  (registers the models)
from tinycnn.config import load_config, parse_value  # noqa: E402
from tinycnn.data import build_loader  # noqa: E402
from tinycnn.plan import build_training  # noqa: E402
from tinycnn.train import train  # noqa: E402


def parse_model(spec: str):
    """'tinycnn:stage_channels=[16,32,64],stage_repeats=[1,1,1]' -> ('tinycnn', {...})."""
    name, _, args = spec.partition(":")
    kwargs = {}
    for item in filter(None, args.replace("],", "];").split(";")):
        key, _, value = item.partition("=")
        kwargs[key] = parse_value(value)
    return name, kwargs


def create(name: str, kwargs, num_classes: int) -> torch.nn.Module:
    return timm.create_model(name, num_classes=num_classes, **kwargs)


def macs_per_image(model: torch.nn.Module) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model.eval()(torch.randn(1, 3, 64, 64))
    return counter.get_total_flops() / 2


def model_config(cfg, name: str, kwargs):
    """cfg with `name` as its model: the config's widths/depths would apply to every tinycnn name, so null means the
    named variant's own, then the spec's key=values."""
    overrides = [f"model={name}", "stage_channels=null", "stage_repeats=null"]
    return cfg.replace(overrides + [f"{k}={json.dumps(v)}" for k, v in kwargs.items()])


def train_step_rate(cfg, num_classes: int, images, labels, batch: int, seconds: float = 6.0) -> float:
    """Images/s of the train step training builds (tinycnn.plan.build_training: augment -> forward -> loss ->
    backward -> optimizer), best of 3."""
    step = build_training(cfg, num_classes, device="cpu").step
    x, y = images[:batch], labels[:batch]
    step(x, y)  # warm-up
    best = 0.0
    for _ in range(3):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 3:
            step(x, y)
            n += 1
        best = max(best, n * batch / (time.perf_counter() - t0))
    return best


def train_run(name: str, kwargs, config: str, data: Path, out: Path, epochs: int):
    """tinycnn.train.train with `name` as the model; returns (summary, wall seconds)."""
    run_cfg = model_config(load_config(config, [f"data.root={data}", f"train.epochs={epochs}"]), name, kwargs)
    t0 = time.perf_counter()
    summary = train(run_cfg, out, progress=False)
    return summary, time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="timm names, tinycnn ones with :key=value,... widths/depths")
    parser.add_argument("--data", required=True, help="a tinycnn-prepare output folder")
    parser.add_argument("--config", default=str(REPO / "recipes" / "configs" / "cpu.yaml"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default="checkpoints/compare", help="run folders go here")
    parser.add_argument("--json", help="write the rows here too")
    parser.add_argument("--no-train", action="store_true", help="parameters and images/s only")
    args = parser.parse_args()

    cfg = load_config(args.config, [f"data.root={args.data}"])
    loader = build_loader(args.data, "train", batch_size=128, train=False, num_workers=0)
    images, labels = next(iter(loader))
    num_classes = len(json.loads((Path(args.data) / "manifest.json").read_text())["classes"])
    rows = []
    for spec in args.models:
        name, kwargs = parse_model(spec)
        model = create(name, kwargs, num_classes)
        spec_cfg = model_config(cfg, name, kwargs)
        row = {"model": spec, "params": sum(p.numel() for p in model.parameters()), "macs": macs_per_image(model),
               "img_s_b64": train_step_rate(spec_cfg, num_classes, images, labels, 64),
               "img_s_b128": train_step_rate(spec_cfg, num_classes, images, labels, 128)}
        if not args.no_train:
            summary, wall = train_run(name, kwargs, args.config, Path(args.data), Path(args.out) / spec.replace(":", "_"),
                                      args.epochs)
            best = max(summary["history"], key=lambda h: h.get("val/accuracy", -1))
            row.update(top1=best.get("val/accuracy"), top5=best.get("val/top5"), epochs=args.epochs, wall_s=wall,
                       run_img_s=best.get("images_per_sec"))
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| model | parameters | multiply-adds / image | train step img/s (B=64 / 128) | val top-1 (top-5) | wall |"
          "\n|---|---|---|---|---|---|")
    for r in rows:
        top1 = f"{r['top1']:.1%} ({r['top5']:.1%})" if r.get("top1") is not None else "-"
        wall = f"{r['wall_s'] / 60:.1f} min" if "wall_s" in r else "-"
        print(f"| {r['model']} | {r['params']:,} | {r['macs'] / 1e6:.1f} M | {r['img_s_b64']:.0f} / {r['img_s_b128']:.0f} "
              f"| {top1} | {wall} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
