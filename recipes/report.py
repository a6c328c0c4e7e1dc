#!/usr/bin/env python
"""An experiment report like the course project's, from the outputs of the other recipes: OUTPUT/report.md
with its figures in OUTPUT/figures/ (PNG). Nothing is trained or evaluated again.

    python recipes/report.py checkpoints/                          # every output below checkpoints/
    python recipes/report.py shards/tiny-imagenet checkpoints/checks checkpoints/overfit \\
        checkpoints/lr_finder checkpoints/grid_search checkpoints/original checkpoints/recommended \\
        checkpoints/test.json --output report/

Each DIR is recognized by the files it holds: a shards folder (manifest.json, from tinycnn-prepare),
checks (checks.json, augment_grid.png: recipes/checks.py), an LR finder (lr_finder.json/.csv:
recipes/lr_finder.py), a grid search (results.json and gs_* runs: recipes/grid_search.py), a training
run (metrics.jsonl, config.yaml, run.json, best.safetensors: recipes/train.py; an overfit run when its
config has train.overfit_small: true) or an evaluation JSON (recipes/evaluate.py --json FILE). A folder
that is none of these is searched below. Without a shards folder, the report looks for the manifest at
the data path the runs recorded.

Sections: Data, Model (layer table, initial loss, baselines), Overfit run, LR finder, Grid search,
Full training (every non-overfit run, compared), Final evaluation, Reproducibility. A section whose input
is missing says which recipe writes it. Needs matplotlib: pip install "tinycnn[report]".
"""
import argparse
import sys
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[1]
if (_CHECKOUT / "tinycnn" / "__init__.py").is_file():  # run from a checkout without installing
    sys.path.insert(0, str(_CHECKOUT))

from tinycnn.cli import claim_output, release_output, run_main  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="DIR",
                        help="output folders of the recipes (or files: manifest.json, an evaluation JSON)")
    parser.add_argument("--output", default="report",
                        help="folder for report.md and figures/ (default: report). A folder holding an earlier "
                             "report is left alone: this one goes to the next free name (report-2, ...)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the report already in --output (only a folder tinycnn wrote as a report)")
    parser.add_argument("--title", default="Experiment report", help="the report's title")
    parser.add_argument("--top", type=int, default=5, help="most and least accurate classes listed (default: 5)")
    args = parser.parse_args()

    from rich.console import Console

    from tinycnn.workflow.report import write_report

    console = Console()
    output, lock = claim_output(args.output, args, what="report",
                                say=lambda m: console.print(m, highlight=False, soft_wrap=True))
    try:
        report = write_report(args.inputs, output, title=args.title, top=args.top,
                              command=["python", "recipes/report.py", *sys.argv[1:]])
    finally:
        release_output(output, lock)
    for section in report.sections:
        state = "[yellow]input missing[/yellow]" if section.missing else "[green]ok[/green]"
        console.print(f"  {section.title:<18} {state}", highlight=False)
    console.print(f"wrote {report.path} and {len(report.figures)} figures in {output / 'figures'}",
                  highlight=False)
    return 0


def cli():
    """The installed console script."""
    sys.exit(run_main(main))


if __name__ == "__main__":
    cli()
