#!/usr/bin/env python
"""Train a tinycnn model on prepared Tiny ImageNet shards.

    accelerate launch recipes/train.py                                   # the recommended recipe
    accelerate launch recipes/train.py --config recipes/configs/original.yaml --max_epochs 20
    accelerate launch --num_processes 2 --cpu recipes/train.py --data shards/x train.epochs=3
    python recipes/train.py ... --resume                                 # continue a stopped run

Writes checkpoints/<run-name>/: best.safetensors (best val accuracy), last.safetensors, config.yaml,
metrics.jsonl, state/ (resumable), tb/ (TensorBoard). With no data prepared it prepares it first
(downloading the official zip unless --no-download).
"""
import sys
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[1]
if (_CHECKOUT / "tinycnn" / "__init__.py").is_file():  # run from a checkout without installing
    sys.path.insert(0, str(_CHECKOUT))

from tinycnn.cli import config_from_args, recipe_parser, ensure_data, relaunch_multi_cpu, run_main  # noqa: E402

DEFAULT_CONFIG = str(Path(__file__).parent / "configs" / "recommended.yaml")


def main() -> int:
    parser = recipe_parser(__doc__, DEFAULT_CONFIG)
    parser.add_argument("--output", help="run folder (default: checkpoints/<run-name>)")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --output")
    args = parser.parse_intermixed_args()
    relaunch_multi_cpu()
    cfg = config_from_args(args)

    from rich.console import Console
    from rich.table import Table

    from tinycnn.train import make_accelerator, train

    output = Path(args.output or Path("checkpoints") / cfg["run_name"])
    accelerator = make_accelerator(cfg, output)
    ensure_data(cfg, accelerator)
    summary = train(cfg, output, resume=args.resume, accelerator=accelerator)
    if accelerator.is_main_process:
        table = Table(title=f"{cfg['run_name']}: {summary['epochs']} epochs, {summary['steps']} steps")
        for col in ("epoch", "train loss", "val loss", "val acc", "lr", "img/s"):
            table.add_column(col, justify="right")
        for r in summary["history"]:
            table.add_row(str(r["epoch"]), f"{r['train/loss']:.4f}", f"{r.get('val/loss', float('nan')):.4f}",
                          f"{r.get('val/accuracy', float('nan')):.2%}", f"{r['lr']:.2e}", f"{r['images_per_sec']:.0f}")
        Console().print(table)
        Console().print(f"best val accuracy {summary['best_accuracy']:.2%} (epoch {summary['best_epoch']}): "
                        f"{output / 'best.safetensors'}")
    return 0


def cli():
    """The installed console script."""
    sys.exit(run_main(main))


if __name__ == "__main__":
    cli()
