#!/usr/bin/env python
"""Grid search (step 4 of the workflow): lr x weight_decay x stage_channels x stage_repeats from the
config's `grid` section, each combination trained for grid.epochs epochs with the same seed.

    python recipes/grid_search.py                                   # 3 x 2 x 2 x 3 = 36 runs of 3 epochs
    python recipes/grid_search.py grid.lr=[0.001,0.003] grid.epochs=5 --output checkpoints/gs2
    python recipes/grid_search.py --gpus 0,1,2,3                    # one process per GPU, runs i::4 each
    python recipes/grid_search.py --part 1/4                        # one slice (e.g. one cluster job) ...
    python recipes/grid_search.py --merge                           # ... and the table of every slice

Each run goes to OUTPUT/gs_<index>_lr=.._wd=.._ch=..-..-.._rep=..-..-.. (a train.py run folder: metrics.jsonl,
best.safetensors, tb/). Runs go one after another; re-running the same command skips the finished runs
and resumes an interrupted one. After every run the table sorted by best val accuracy is written to
OUTPUT/results.md, OUTPUT/results.csv and OUTPUT/results.json (per part: results-part-<i>-of-<N>.*),
and each run's hparams and metrics to its tb/ folder for TensorBoard's HParams view
(tensorboard --logdir OUTPUT). A run whose loss goes NaN is marked diverged and the grid goes on.
OUTPUT is locked while a grid (not a --part of one) trains into it: a second grid there stops at once. A run
folder holding a run with another config is an error unless --overwrite (train it again).
"""
import os
import sys
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[1]
if (_CHECKOUT / "tinycnn" / "__init__.py").is_file():  # run from a checkout without installing
    sys.path.insert(0, str(_CHECKOUT))

from tinycnn.recipe import config_from_args, ensure_data, recipe_parser, relaunch_multi_cpu, run_main  # noqa: E402

DEFAULT_CONFIG = str(Path(__file__).parent / "configs" / "grid_search.yaml")


def main() -> int:
    parser = recipe_parser(__doc__, DEFAULT_CONFIG, output_default="checkpoints/grid_search")
    parser.set_defaults(resume=False)
    parser.add_argument("--gpus", help="comma-separated GPU ids: one process per GPU (CUDA_VISIBLE_DEVICES), "
                                       "each running a part of the grid, then one merged table")
    parser.add_argument("--part", help="i/N: run only runs i, i+N, i+2N, ... (0 <= i < N)")
    parser.add_argument("--merge", action="store_true", help="train nothing: write the table of every run in OUTPUT")
    parser.add_argument("--top", type=int, default=None, help="print only the N best runs")
    args = parser.parse_intermixed_args()
    relaunch_multi_cpu()
    cfg = config_from_args(args)

    from rich.console import Console

    from tinycnn import grid

    console = Console()
    output = Path(args.output)
    plan = grid.grid_plan(cfg)  # errors in the grid before anything starts
    part = grid.parse_part(args.part) if args.part else None
    if sum(bool(x) for x in (args.gpus, args.part, args.merge)) > 1:
        raise ValueError("use one of --gpus, --part and --merge")

    from tinycnn.runs import RunLock, mark_folder

    # the grid as a whole is locked by the process that owns it (parts lock each run folder they train)
    is_main = int(os.environ.get("RANK", "0")) == 0
    lock = RunLock(output).acquire() if part is None and is_main else None
    if lock is not None:
        mark_folder(output, "grid")  # a folder that holds anything else stays unmarked
    if args.gpus or args.merge:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("--gpus and --merge start no distributed run: use python, not accelerate launch")
        ensure_data(cfg)  # once, before the parts start
        if args.gpus:
            gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
            if not gpus:
                raise ValueError(f"--gpus takes comma-separated GPU ids, got {args.gpus!r}")
            codes = grid.launch_parts(Path(__file__).resolve(), sys.argv[1:], gpus, output, console=console)
        results = grid.collect_results(cfg, output, plan)
        grid.write_results(results, output, "results", grid.results_meta(cfg, plan))
        grid.print_results(results, console, title=f"grid search: {len(plan)} runs, by best val accuracy", top=args.top)
        console.print(f"tables: {output / 'results.md'}, {output / 'results.csv'}, {output / 'results.json'}",
                      highlight=False)
        if args.gpus and any(codes):
            raise RuntimeError(f"{sum(1 for c in codes if c)} of {len(codes)} parts failed (see {output / 'logs'}); "
                               "run the same command again to continue the grid")
        return 0

    from tinycnn.device import make_accelerator

    accelerator = make_accelerator(cfg, log=False)
    ensure_data(cfg, accelerator)
    results = grid.run_grid(cfg, output, part=part, progress=not args.no_progress, console=console,
                            overwrite=args.overwrite)
    if accelerator.is_main_process:
        stem = f"results-part-{part[0]}-of-{part[1]}" if part else "results"
        grid.print_results(results, console, title=f"grid search{f' part {args.part}' if part else ''}: "
                                                   f"{len(results)} runs, by best val accuracy", top=args.top)
        console.print(f"tables: {output / (stem + '.md')}, {output / (stem + '.csv')}, {output / (stem + '.json')}",
                      highlight=False)
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        accelerator.state.destroy_process_group()
    if lock is not None:
        lock.release()
    return 0


def cli():
    """The installed console script."""
    sys.exit(run_main(main))


if __name__ == "__main__":
    cli()
