#!/usr/bin/env python
"""Learning-rate range test (step 3 of the workflow): train from scratch for a few hundred steps
while the lr grows log-spaced, and suggest the lr where the loss falls fastest.

    python recipes/lr_finder.py                                        # 1e-6 -> 1 over 100 steps
    python recipes/lr_finder.py --min_lr 1e-5 --max_lr 1e-1 --num_iters 200
    python recipes/lr_finder.py --config recipes/configs/original.yaml lr_finder.max_lr=0.1
    accelerate launch recipes/lr_finder.py ...                         # on a GPU (several: DDP)

Uses the model, optimizer (weight decay, betas), batch size, augmentation and label smoothing of the
config; the sweep stops when the smoothed loss diverges (above lr_finder.diverge_factor x its best)
or is not finite. Writes OUTPUT/lr_finder.csv (step, lr, loss, smoothed_loss), OUTPUT/lr_finder.json
(suggested_lr, points, ...) and OUTPUT/lr_finder.png (needs matplotlib: pip install "tinycnn[report]").
Nothing is saved of the model: it is a probe. The flags are the lr_finder.* keys; a dotted override
of the same key wins over the flag.
"""
import sys
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[1]
if (_CHECKOUT / "tinycnn" / "__init__.py").is_file():  # run from a checkout without installing
    sys.path.insert(0, str(_CHECKOUT))

from tinycnn.cli import (claim_output, config_from_args, ensure_data, recipe_parser,  # noqa: E402
                            relaunch_multi_cpu, release_output, run_main)

DEFAULT_CONFIG = str(Path(__file__).parent / "configs" / "lr_finder.yaml")


def main() -> int:
    parser = recipe_parser(__doc__, DEFAULT_CONFIG, output_default="checkpoints/lr_finder")
    parser.add_argument("--min_lr", "--min-lr", dest="min_lr", help="first lr of the sweep (lr_finder.min_lr, 1e-6)")
    parser.add_argument("--max_lr", "--max-lr", dest="max_lr", help="last lr of the sweep (lr_finder.max_lr, 1)")
    parser.add_argument("--num_iters", "--num-iters", dest="num_iters",
                        help="optimizer steps of the sweep (lr_finder.num_iters, 100)")
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")
    args = parser.parse_intermixed_args()
    relaunch_multi_cpu()
    flags = [f"lr_finder.{k}={getattr(args, k)}" for k in ("min_lr", "max_lr", "num_iters") if getattr(args, k)]
    cfg = config_from_args(args, flags)

    from rich.console import Console

    from tinycnn.device import make_accelerator
    from tinycnn.workflow.lr_finder import find_lr

    accelerator = make_accelerator(cfg.replace(["train.grad_accum_steps=1"]), log=False)
    ensure_data(cfg, accelerator)
    out, lock = claim_output(args.output, args, what="LR finder result", is_main=accelerator.is_main_process,
                             say=lambda m: Console(soft_wrap=True).print(m, highlight=False))
    try:
        result = find_lr(cfg, out, accelerator=accelerator, progress=not args.no_progress, plot=not args.no_plot)
    finally:
        if accelerator.is_main_process:
            release_output(out, lock)
    if accelerator.is_main_process:
        console = Console()
        how = f"stopped early: {result['stop_reason']}" if result["stopped_early"] else "no divergence"
        console.print(f"{result['num_points']} of {result['num_iters']} steps from {result['min_lr']:.1e} to "
                      f"{result['max_lr']:.1e} ({how})", highlight=False)
        if result["suggested_lr"] is None:
            console.print("[yellow]no suggestion: the smoothed loss never fell (widen the range or add steps)[/yellow]")
        else:
            console.print(f"suggested lr (steepest descent of the smoothed loss): [bold]{result['suggested_lr']:.2e}[/bold]",
                          highlight=False)
            console.print(f"  train with: train.optimizer.lr={result['suggested_lr']:.2g}", highlight=False)
        written = [out / "lr_finder.csv", out / "lr_finder.json", out / "lr_finder.png"]
        console.print("wrote " + ", ".join(str(p) for p in written if p.exists()), highlight=False)
    return 0


def cli():
    """The installed console script."""
    sys.exit(run_main(main))


if __name__ == "__main__":
    cli()
