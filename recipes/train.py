#!/usr/bin/env python
"""Train a model on prepared Tiny ImageNet shards.

    accelerate launch recipes/train.py                                   # the recommended recipe
    accelerate launch recipes/train.py --config recipes/configs/original.yaml --max_epochs 20
    accelerate launch --num_processes 2 --cpu recipes/train.py --data shards/x train.epochs=3
    accelerate launch --cpu --num_machines 2 --num_processes 4 --machine_rank 0 --main_process_ip HOST0 \
        --main_process_port 29500 recipes/train.py ...                 # on each machine, its own rank
    accelerate launch recipes/train.py model=resnet10t                   # any timm model
    python recipes/train.py --resume --output checkpoints/recommended   # continue a stopped run

Writes a run folder (default checkpoints/<run-name>; a folder that holds an earlier run is never written into:
this run then goes to checkpoints/<run-name>-2, -3, ... and says so): best.safetensors (best val accuracy; with
train.ema=true the better of the raw and the averaged weights, its metadata's extra.weights says which),
last.safetensors (and last_ema.safetensors with train.ema), config.yaml, run.json, metrics.jsonl, state/
(resumable), tb/ (TensorBoard). The folder is
locked while the run writes: a second run into it stops at once. SIGTERM or Ctrl-C (to this process or to its
launcher) saves resumable state; `--resume --output RUN` continues from the run's own saved config. A job that
torchrun restarts (`--max-restarts`) continues its own folder from its saved state by itself.
With no data prepared in the default folder it downloads the official zip first (unless --no-download).
"""
import sys
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[1]
if (_CHECKOUT / "tinycnn" / "__init__.py").is_file():  # run from a checkout without installing
    sys.path.insert(0, str(_CHECKOUT))

from tinycnn.cli import (claim_output, config_from_args, ensure_data, recipe_parser,  # noqa: E402
                            relaunch_multi_cpu, release_output, run_main)

DEFAULT_CONFIG = str(Path(__file__).parent / "configs" / "recommended.yaml")


def main() -> int:
    parser = recipe_parser(__doc__, DEFAULT_CONFIG, output_default="checkpoints/<run-name>", resumable=True)
    args = parser.parse_intermixed_args()
    relaunch_multi_cpu()
    if args.output == parser.get_default("output"):
        args.output = None
    cfg = config_from_args(args)

    from accelerate import PartialState
    from rich.console import Console

    from tinycnn.device import make_accelerator, resolve_device

    state = PartialState(cpu=resolve_device(cfg.train.device) == "cpu")
    console = Console()
    say = console.print if state.is_main_process else (lambda *a, **k: None)
    ensure_data(cfg, state)
    output, lock = claim_output(args.output or str(Path("checkpoints") / cfg.run_name), args,
                                is_main=state.is_main_process, say=lambda m: say(m, highlight=False, soft_wrap=True))
    try:
        from tinycnn.train import train

        accelerator = make_accelerator(cfg, output)
        say(f"run folder: {output}", highlight=False, soft_wrap=True)
        summary = train(cfg, output, resume=args.resume, accelerator=accelerator, progress=not args.no_progress)
    except BaseException:
        if state.is_main_process:
            release_output(output, lock)
        raise
    if state.is_main_process:
        if not args.no_progress:
            _print_history(console, cfg.run_name, summary)
        console.print(f"best val accuracy {summary['best_accuracy']:.2%} (epoch {summary['best_epoch']}"
                      f"{_best_weights(output, cfg)}) in {summary['epochs']} epochs, {summary['steps']} steps: "
                      f"{output / 'best.safetensors'}", highlight=False, soft_wrap=True)
    return 0


def _best_weights(output, cfg) -> str:
    """', EMA weights' / ', raw weights' when the run kept an average (best.safetensors' metadata says which)."""
    if not cfg.train.ema or not (output / "best.safetensors").is_file():
        return ""
    from tinycnn.weights import read_metadata

    kind = read_metadata(output / "best.safetensors").get("extra", {}).get("weights")
    return {"ema": ", EMA weights", "raw": ", raw weights"}.get(kind, "")


def _print_history(console, name, summary):
    from rich.table import Table

    ema = any("val_ema/accuracy" in r for r in summary["history"])
    table = Table(title=f"{name}: {summary['epochs']} epochs, {summary['steps']} steps")
    for col in ("epoch", "train loss", "val loss", "val acc", *(("ema acc",) if ema else ()), "lr", "img/s", "epoch s"):
        table.add_column(col, justify="right")
    for r in summary["history"]:
        table.add_row(str(r["epoch"]), f"{r['train/loss']:.4f}", f"{r.get('val/loss', float('nan')):.4f}",
                      f"{r.get('val/accuracy', float('nan')):.2%}",
                      *((f"{r.get('val_ema/accuracy', float('nan')):.2%}",) if ema else ()),
                      f"{r['lr']:.2e}", f"{r['images_per_sec']:.0f}", f"{r['epoch_seconds']:.1f}")
    console.print(table)


def cli():
    """The installed console script."""
    sys.exit(run_main(main))


if __name__ == "__main__":
    cli()
