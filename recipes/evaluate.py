#!/usr/bin/env python
"""Evaluate a checkpoint on a split of prepared shards: top-1, top-5, loss, per-class accuracy.

    python recipes/evaluate.py --checkpoint checkpoints/recommended/best.safetensors --data shards/tiny-imagenet --split test
    accelerate launch --num_processes 2 --cpu recipes/evaluate.py --checkpoint ... --split val --json val.json
    python recipes/evaluate.py --checkpoint ... --tta flip      # mean logits of each image and its mirror image

Each process reads its own part of the split and the sums are all-reduced: every sample is counted
exactly once, so 1 and N processes give the same numbers. The results (and --json) say whether test-time
augmentation was used ("tta": "flip" or null).
"""
import argparse
import json
import sys
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[1]
if (_CHECKOUT / "tinycnn" / "__init__.py").is_file():  # run from a checkout without installing
    sys.path.insert(0, str(_CHECKOUT))

from tinycnn.cli import relaunch_multi_cpu, run_main  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a .safetensors file written by tinycnn (best.safetensors), or a folder "
                                                               "written by tinycnn-export")
    parser.add_argument("--data", default="shards/tiny-imagenet", help="a tinycnn-prepare output folder")
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=256, dest="batch_size")
    parser.add_argument("--num_workers", "--num-workers", type=int, default=None, dest="num_workers",
                        help="decoding processes per rank (default: the usable cores minus one per process)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--json", help="also write the results to this JSON file (an existing one is not replaced "
                                       "unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    parser.add_argument("--top", type=int, default=5, help="show the N most and least accurate classes")
    parser.add_argument("--tta", choices=["flip"], default=None,
                        help="test-time augmentation: flip scores the mean logits of each image and its mirror image")
    args = parser.parse_args()
    relaunch_multi_cpu()

    from rich.console import Console
    from rich.table import Table

    from tinycnn.config import load_config
    from tinycnn.device import make_accelerator
    from tinycnn.evaluation import evaluate_checkpoint
    from tinycnn.runs import RunFolderError

    if args.json and Path(args.json).exists() and not args.overwrite:  # before the evaluation, not after it
        raise RunFolderError(f"{args.json} exists: pass --overwrite to replace it, or choose another --json path")
    cfg = load_config(None, [f"train.device={args.device}", f"train.mixed_precision={args.mixed_precision}"],
                      check_model=False)
    accelerator = make_accelerator(cfg, log=False)
    results = evaluate_checkpoint(args.checkpoint, args.data, args.split, accelerator=accelerator,
                                  batch_size=args.batch_size, num_workers=args.num_workers, tta=args.tta)
    if accelerator.is_main_process:
        from tinycnn.weights import read_metadata

        console = Console()
        tta = f" (tta {args.tta})" if args.tta else ""
        console.print(f"{args.checkpoint} on {args.data} [{args.split}], {results['num_samples']} images{tta}: "
                      f"top-1 {results['accuracy']:.2%}  top-5 {results['top5']:.2%}  loss {results['loss']:.4f}",
                      highlight=False, markup=False, soft_wrap=True)
        trained_with = read_metadata(args.checkpoint).get("extra", {}).get("tta")
        if trained_with == "flip" and args.tta != "flip":  # the run's own val accuracy used it
            console.print(f"note: the val accuracy in this checkpoint's metadata was measured with --tta "
                          f"{trained_with}", highlight=False, markup=False, soft_wrap=True)
        ranked = sorted(results["per_class"], key=lambda c: -1 if c["accuracy"] is None else c["accuracy"])
        table = Table(title="per-class accuracy (least and most accurate)")
        for col in ("class", "wnid", "name", "accuracy", "images"):
            table.add_column(col)
        shown = ranked[:args.top] + ranked[-args.top:] if len(ranked) > 2 * args.top else ranked
        for c in shown:
            acc = "-" if c["accuracy"] is None else f"{c['accuracy']:.2%}"
            table.add_row(str(c["index"]), c["wnid"], c["name"][:40], acc, str(c["num_samples"]))
        console.print(table)
        if args.json:
            from tinycnn.files import atomic_write

            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1)))
    return 0


def cli():
    """The installed console script."""
    sys.exit(run_main(main))


if __name__ == "__main__":
    cli()
