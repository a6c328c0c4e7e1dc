#!/usr/bin/env python
"""Grid search (step 4 of the workflow) as an Optuna study: lr x weight_decay x stage_channels x stage_repeats
from the config's `grid` section, each point trained for grid.epochs epochs with the same seed.

    python recipes/grid_search.py                                   # 3 x 2 x 2 x 3 = 36 trials of 3 epochs
    python recipes/grid_search.py grid.lr=[0.001,0.003] grid.epochs=5 --output checkpoints/gs2
    python recipes/grid_search.py --gpus 0,1,2,3                    # 4 workers, one per GPU
    python recipes/grid_search.py --workers 2                       # 2 workers on the CPU
    python recipes/grid_search.py --sampler tpe --n-trials 20 --pruner median   # TPE over the grid's ranges
    python recipes/grid_search.py grid.seeds=[1,2,3]                # each point 3 times: mean ± sd over seeds
    python recipes/grid_search.py --storage postgresql://user@db/tinycnn        # on every machine: workers
    python recipes/grid_search.py --storage /shared/gs/journal.log              # ... or a journal file
    optuna-dashboard sqlite:///checkpoints/grid_search/study.db                 # watch the study

The default sampler, grid, tries every point (optuna's GridSampler); --sampler tpe searches the same ranges
for --n-trials trials (lr and weight decay between the grid's smallest and largest values, widths and depths
among its options); --pruner median stops trials whose val accuracy after an epoch falls behind the others'
(optuna's MedianPruner). The study is stored in OUTPUT/study.db (SQLite) unless --storage gives a database URL
(anything with "://") or the path of a journal file (for a filesystem shared by several machines). Any number
of workers, on this machine (--gpus, --workers) or others (the same command, the same --storage), take trials
until the study is done. With a database a worker that dies, even killed, leaves its trial to another worker
after --grace-period seconds; a journal file has no heartbeat: such a trial is taken again when the command is
run again. A trial that ran before is never trained again.

Each trial trains OUTPUT/gs_<index>_lr=.._wd=.._ch=..-..-.._rep=..-..-.. (a train.py run folder: metrics.jsonl,
best.safetensors, tb/) in a train.py process of its own (log: OUTPUT/logs/<name>.log). With grid.seeds every
point trains once per seed (train.seed; the folder name ends in _seed=<seed>) and the tables rank the points by
the mean best val accuracy over their seeds, shown as mean ± sample standard deviation (n: seeds finished);
--sampler tpe refuses grid.seeds. With train.ema a run's val accuracy is the better of its raw and EMA weights'
(column weights), as best.safetensors keeps. Re-running the same command continues the study: stopped runs resume
from their saved state. After every trial the table sorted by best val accuracy is written to OUTPUT/results.md,
OUTPUT/results.csv and OUTPUT/results.json, and the run's hparams and metrics to its tb/ folder for TensorBoard's
HParams view (tensorboard --logdir OUTPUT). A run whose loss goes NaN is marked diverged and the study goes on.
Ctrl-C or SIGTERM stops the running trial (it saves its state) and the worker. A run folder holding a run with
another config (or a study of another config) is an error unless --overwrite. Needs optuna: pip install
"tinycnn[sweep]".
"""
import sys
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[1]
if (_CHECKOUT / "tinycnn" / "__init__.py").is_file():  # run from a checkout without installing
    sys.path.insert(0, str(_CHECKOUT))

from tinycnn.cli import config_from_args, ensure_data, recipe_parser, relaunch_multi_cpu, run_main  # noqa: E402

DEFAULT_CONFIG = str(Path(__file__).parent / "configs" / "grid_search.yaml")


def main() -> int:
    parser = recipe_parser(__doc__, DEFAULT_CONFIG, output_default="checkpoints/grid_search")
    parser.set_defaults(resume=False)
    parser.add_argument("--sampler", choices=("grid", "tpe"), default="grid",
                        help="grid: every point of the grid (default); tpe: TPE over the grid's ranges")
    parser.add_argument("--n-trials", "--n_trials", type=int, dest="n_trials",
                        help="trials of the whole study (needed by --sampler tpe)")
    parser.add_argument("--pruner", choices=("none", "median"), default="none",
                        help="median: stop trials whose val accuracy falls behind after an epoch (MedianPruner)")
    parser.add_argument("--storage", metavar="URL",
                        help="the study's storage: a database URL (sqlite:///..., postgresql://...) or the path of a "
                             "journal file (default: sqlite:///OUTPUT/study.db)")
    parser.add_argument("--study-name", "--study_name", dest="study_name",
                        help="the study's name in the storage (default: grid_search, grid_search_tpe)")
    parser.add_argument("--gpus", help="comma-separated GPU ids: one worker per GPU (CUDA_VISIBLE_DEVICES)")
    parser.add_argument("--workers", type=int, help="N workers on the CPU")
    parser.add_argument("--heartbeat-interval", "--heartbeat_interval", type=int, default=60, dest="heartbeat_interval",
                        help="seconds between a running trial's heartbeats in a database (default: %(default)s)")
    parser.add_argument("--grace-period", "--grace_period", type=int, default=None, dest="grace_period",
                        help="seconds without a heartbeat after which another worker takes the trial over "
                             "(default: twice the heartbeat interval)")
    parser.add_argument("--top", type=int, default=None, help="print only the N best runs (points, with grid.seeds)")
    args = parser.parse_intermixed_args()
    relaunch_multi_cpu()
    cfg = config_from_args(args)

    from tinycnn.config import ConfigError
    from tinycnn.workflow import grid

    grid.import_optuna()  # one line without it, before anything
    for flag, value in (("--heartbeat-interval", args.heartbeat_interval), ("--grace-period", args.grace_period),
                        ("--workers", args.workers), ("--n-trials", args.n_trials), ("--top", args.top)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} takes a positive whole number, got {value}")
    if args.gpus and args.workers:
        raise ConfigError("use one of --gpus and --workers")
    grid.grid_plan(cfg)  # errors in the grid before anything starts
    grid.check_sampler(cfg, args.sampler)

    from rich.console import Console

    from tinycnn.runs import RunFolderError, folder_kind, mark_folder

    console = Console()
    output = Path(args.output)
    kind = folder_kind(output)
    if kind not in (None, "grid"):
        raise RunFolderError(f"{output} holds a tinycnn {kind} output, not a grid search: choose another --output")
    ensure_data(cfg)  # once, before any worker starts
    output.mkdir(parents=True, exist_ok=True)
    mark_folder(output, "grid")  # a folder that holds anything else stays unmarked
    search = dict(sampler=args.sampler, n_trials=args.n_trials, pruner=args.pruner, storage=args.storage,
                  study_name=args.study_name)
    title = f"{'grid search' if args.sampler == 'grid' else args.sampler.upper() + ' search'}"
    if args.gpus or args.workers:
        gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None
        if args.gpus and not gpus:
            raise ConfigError(f"--gpus takes comma-separated GPU ids, got {args.gpus!r}")
        # the storage and the study made once, before the workers start together
        store = grid.make_storage(args.storage or grid.default_storage(output), heartbeat_interval=None)
        name = args.study_name or grid.default_study_name(args.sampler)
        study = grid.open_study(store, name, cfg, sampler=args.sampler, pruner=args.pruner, overwrite=args.overwrite)
        argv = [a for a in sys.argv[1:] if a != "--overwrite"]  # done here: the workers join the new study
        codes = grid.launch_workers(Path(__file__).resolve(), argv, output, gpus=gpus, workers=args.workers or 1,
                                    console=console)
        from tinycnn.storage import read_manifest

        results = grid.study_results(study, cfg, output, sampler=args.sampler,
                                     num_classes=read_manifest(cfg.data.root)["num_classes"])
        _print(grid, console, results, output, title, args.top)
        if any(codes):
            raise grid.SearchError(f"{sum(1 for c in codes if c)} of {len(codes)} workers failed (see {output / 'logs'}); "
                               "run the same command again to continue the study")
        return 0
    results = grid.run_grid(cfg, output, progress=not args.no_progress, console=console, overwrite=args.overwrite,
                            heartbeat_interval=args.heartbeat_interval, grace_period=args.grace_period, **search)
    _print(grid, console, results, output, title, args.top)
    return 0


def _print(grid, console, results, output, title, top):
    if grid.has_seeds(results):
        points = len({r["index"] for r in results})
        title = f"{title}: {points} points x {len(results) // max(points, 1)} seeds, by mean best val accuracy"
    else:
        title = f"{title}: {len(results)} runs, by best val accuracy"
    grid.print_results(results, console, title=title, top=top)
    console.print(f"tables: {output / 'results.md'}, {output / 'results.csv'}, {output / 'results.json'}; "
                  f"study: {output / 'study.db'} unless --storage", highlight=False, soft_wrap=True)


def cli():
    """The installed console script."""
    sys.exit(run_main(main))


if __name__ == "__main__":
    cli()
