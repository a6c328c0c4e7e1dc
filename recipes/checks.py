#!/usr/bin/env python
"""The course project's checks before training (step 1 of its workflow), printed as tables.

    python recipes/checks.py                                          # the default model on shards/tiny-imagenet
    python recipes/checks.py --data shards/x --output checkpoints/checks-x stage_channels=[32,64,128]
    python recipes/checks.py --config recipes/configs/original.yaml  # the checks for another recipe's model

Checks: split sizes and images per class (from the manifest); one loader batch against the manifest's
input_shape; majority-class and uniform-random top-1 on val; the untrained model's loss on one batch vs
ln(num_classes); non-zero gradients for every parameter after one backward; a PNG of images before and
after augmentation. Writes OUTPUT/checks.json (every number) and OUTPUT/augment_grid.png.
Exits 0 when every check passes, 1 when one is flagged, 2 on an error (e.g. batches of the wrong shape).
"""
import sys
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[1]
if (_CHECKOUT / "tinycnn" / "__init__.py").is_file():  # run from a checkout without installing
    sys.path.insert(0, str(_CHECKOUT))

from tinycnn.cli import (claim_output, config_from_args, ensure_data, recipe_parser,  # noqa: E402
                            relaunch_multi_cpu, release_output, run_main)

DEFAULT_CONFIG = str(Path(__file__).parent / "configs" / "checks.yaml")


def main() -> int:
    parser = recipe_parser(__doc__, DEFAULT_CONFIG, output_default="checkpoints/checks")
    parser.add_argument("--num_images", "--num-images", type=int, default=16, dest="num_images",
                        help="images in the augmentation grid (default: 16)")
    parser.add_argument("--nrow", type=int, default=8, help="images per row of the augmentation grid (default: 8)")
    parser.add_argument("--loss_tolerance", "--loss-tolerance", type=float, default=None, dest="loss_tolerance",
                        help="flag the initial loss when it is further than this from ln(num_classes) (default: 0.5)")
    args = parser.parse_intermixed_args()
    relaunch_multi_cpu()
    cfg = config_from_args(args)

    from rich.console import Console

    from tinycnn.workflow.checks import LOSS_TOLERANCE, print_checks, run_checks
    from tinycnn.device import make_accelerator

    accelerator = make_accelerator(cfg, log=False)
    ensure_data(cfg, accelerator)
    tolerance = LOSS_TOLERANCE if args.loss_tolerance is None else args.loss_tolerance
    out, lock = claim_output(args.output, args, what="set of checks", is_main=accelerator.is_main_process,
                             say=lambda m: Console(soft_wrap=True).print(m, highlight=False))
    try:
        results = run_checks(cfg, out, accelerator=accelerator, num_images=args.num_images, nrow=args.nrow,
                             loss_tolerance=tolerance)
    finally:
        if accelerator.is_main_process:
            release_output(out, lock)
    if accelerator.is_main_process:
        console = Console()
        print_checks(results, console)
        verdict = "[green]all checks passed[/green]" if results["passed"] else "[bold red]some checks are flagged[/bold red]"
        console.print(f"{verdict}: {out / 'checks.json'}", highlight=False)
    return 0 if results["passed"] else 1


def cli():
    """The installed console script."""
    sys.exit(run_main(main))


if __name__ == "__main__":
    cli()
