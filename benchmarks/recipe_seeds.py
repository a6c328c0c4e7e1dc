#!/usr/bin/env python
"""Recipe variants over seeds: mean and spread of top-1, so a change within seed noise is not called a win.

    python benchmarks/recipe_seeds.py --data shards/sample --config recipes/configs/cpu.yaml --seeds 1 2 3 \
        --out checkpoints/seeds base= ema="train.ema=true train.ema_decay=0.99"

Each VARIANT is NAME=OVERRIDES (space-separated config overrides; empty for the config as it is). Every variant
trains once per seed with recipes/train.py (its own process, the same config and epochs), then its
best.safetensors is evaluated on --split (the official validation images: `test`) without and with flip TTA
(recipes/evaluate.py). Run folders go to OUT/NAME-sSEED; a folder that already holds a finished run and its
evaluations is read, not trained again. Prints a Markdown table (mean ± sample standard deviation over seeds)
and writes the rows to OUT/seeds.json.
"""
import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_variant(name, overrides, seed, args) -> dict:
    out = Path(args.out) / f"{name}-s{seed}"
    evals = {tta: out / f"{args.split}-{tta}.json" for tta in ("none", "flip")}
    if not all(p.is_file() for p in evals.values()):
        train = [sys.executable, str(REPO / "recipes" / "train.py"), "--config", args.config, "--data", args.data,
                 "--output", str(out), "--no-progress", f"train.seed={seed}", *overrides]
        if (out / "state").is_dir():
            train += ["--resume"]
        subprocess.run(train, check=True)
        for tta, path in evals.items():
            subprocess.run([sys.executable, str(REPO / "recipes" / "evaluate.py"), "--checkpoint",
                            str(out / "best.safetensors"), "--data", args.data, "--split", args.split,
                            "--json", str(path), "--overwrite", *(["--tta", "flip"] if tta == "flip" else [])],
                           check=True, stdout=subprocess.DEVNULL)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    best_val = max(max(m.get("val/accuracy", 0.0), m.get("val_ema/accuracy", 0.0)) for m in metrics)
    return {"variant": name, "seed": seed, "epochs": len(metrics), "val": best_val,
            "test": json.loads(evals["none"].read_text())["accuracy"],
            "test_flip": json.loads(evals["flip"].read_text())["accuracy"],
            "wall_s": sum(m["epoch_seconds"] for m in metrics)}


def spread(values) -> str:
    mean = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.1f} ± {100 * sd:.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+", metavar="NAME=OVERRIDES")
    parser.add_argument("--data", required=True, help="a tinycnn-prepare output folder")
    parser.add_argument("--config", default=str(REPO / "recipes" / "configs" / "cpu.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--split", default="test", help="the split the best checkpoint is evaluated on")
    parser.add_argument("--out", default="checkpoints/seeds", help="run folders go here")
    args = parser.parse_args()
    variants = []
    for spec in args.variants:
        name, sep, overrides = spec.partition("=")
        if not sep or not name:
            parser.error(f"a variant is NAME=OVERRIDES (overrides may be empty), got {spec!r}")
        variants.append((name, shlex.split(overrides)))
    rows = [run_variant(name, overrides, seed, args) for name, overrides in variants for seed in args.seeds]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "seeds.json").write_text(json.dumps(rows, indent=1))
    print(f"\n| variant | best val top-1 | {args.split} top-1 | {args.split} top-1, flip TTA | wall per run |")
    print("|---|---|---|---|---|")
    for name, _ in variants:
        mine = [r for r in rows if r["variant"] == name]
        print(f"| {name} | {spread([r['val'] for r in mine])} | {spread([r['test'] for r in mine])} | "
              f"{spread([r['test_flip'] for r in mine])} | {statistics.mean(r['wall_s'] for r in mine) / 60:.1f} min |")


if __name__ == "__main__":
    main()
