"""Grid search (step 4 of the course project's workflow) as an Optuna study: `run_grid(cfg, output)`.

The points are cfg.grid's combinations (lr x weight_decay x stage_channels x stage_repeats, in that product
order, the last varying fastest), all with the same seed and grid.epochs epochs. Optuna's GridSampler tries
every one of them (the default); TPE (sampler="tpe", n_trials=N) searches the same ranges instead (lr and
weight decay between the grid's smallest and largest values, on a log scale when positive; widths and depths
among the grid's options). With grid.seeds (say [1, 2, 3]) every point is trained once per seed (train.seed set
to each; the seed is one more dimension of GridSampler's space) and the tables rank the points by the mean of
their runs' best val accuracy, shown as mean ± sample standard deviation over the seeds that finished (n); TPE
refuses grid.seeds (it would tune the seed). A pruner ("median": optuna's MedianPruner) stops trials whose
per-epoch val accuracy falls behind: the worker reads the trial's metrics.jsonl as it grows and reports each epoch.

Each trial is an ordinary run folder OUTPUT/<name>, named like ``gs_007_lr=0.002_wd=1e-4_ch=64-128-256_rep=2-2-2``
(the 3-digit index of the point in product order; for TPE, the trial number; with grid.seeds a ``_seed=<seed>``
suffix), trained by the train recipe in a child process (`python -m tinycnn.recipes.train`, its log in
OUTPUT/logs/<name>.log). A folder whose metrics.jsonl already holds every epoch (with the same config) is not
trained again, a stopped one resumes from its saved state (train --resume). A run whose loss goes NaN is recorded
as diverged (a FAIL trial with user attribute status=diverged) and the study goes on.

The study lives in a storage: SQLite in OUTPUT/study.db by default, any database URL, or a journal file
(optuna's JournalStorage: a path without "://", for a filesystem shared by several machines). Any number of
workers, on one machine or several, run the same command against the same storage and pull trials until the
study is done. With a database (SQLite included) every running trial records a heartbeat: the trial of a
worker that died (even SIGKILL) is failed after the grace period and queued again
(RetryHeartbeatStaleTrialCallback), and the next worker resumes its run folder. Optuna's journal storage has
no heartbeat: there such a trial waits for the command to be run again after that worker is gone.

A run's val accuracy is that of its best epoch; with train.ema the better of the raw and the EMA weights' (as
best.safetensors keeps), its row's `weights` says which, and `tta` whether flip TTA scored it.
After each trial the table of results, sorted by best val accuracy, is written as OUTPUT/results.md,
OUTPUT/results.csv and OUTPUT/results.json, and the run's hparams and final metrics go to
OUTPUT/<name>/tb/hparams for TensorBoard's HParams view (`tensorboard --logdir OUTPUT`).
`load_results(OUTPUT)` reads a search's results back (the tables, else the study and the run folders); a run's
settings come from its config.yaml or from the trial's checked params, never from its name.

Optuna is an optional extra (`pip install "tinycnn[sweep]"`), imported only here, when a study is opened.
"""
import csv
import dataclasses
import io
import itertools
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import yaml

from ..config import MAX_GRID_RUNS, Config, ConfigError, flatten, from_dict, read_yaml
from ..errors import TinycnnError
from ..formatting import count, dashed, number, percent
from ..storage import read_manifest

__all__ = ["GridRun", "format_lr", "format_wd", "format_value", "format_spread", "short_name", "run_label",
           "run_name", "is_run_folder", "grid_plan", "run_config", "expected_steps", "read_metrics", "val_figures",
           "best_val", "best_record", "run_status", "run_result", "sort_results", "aggregate_seeds", "has_seeds",
           "evaluation_note", "results_markdown", "write_results", "load_results", "write_hparams", "results_meta",
           "search_space", "check_sampler", "import_optuna", "make_storage", "default_storage", "open_study",
           "study_results", "run_grid", "worker_argv", "launch_workers", "print_results", "RESULT_COLUMNS",
           "SEED_COLUMNS", "EVAL_COLUMNS", "SAMPLERS", "PRUNERS", "STUDY_FILE", "SWEEP_EXTRA", "SearchError"]

RESULT_COLUMNS = ["rank", "index", "name", "lr", "weight_decay", "stage_channels", "stage_repeats", "num_parameters",
                  "val_accuracy", "val_loss", "best_epoch", "epochs", "final_train_loss", "status"]
# results.csv's columns after RESULT_COLUMNS, only when a grid has seeds: `row` is "mean" (a point, over its seeds:
# val_accuracy and val_loss are means, n the seeds that finished of `seeds` planned) or "run" (one seed's run)
SEED_COLUMNS = ["row", "seed", "n", "seeds", "val_accuracy_sd", "val_loss_sd"]
# ... and only when a run evaluated EMA weights or used TTA: which weights gave val_accuracy ("raw" or "ema"),
# whether EMA weights were evaluated (train.ema), and the TTA of the evaluations (train.tta)
EVAL_COLUMNS = ["weights", "ema", "tta"]

# keys that do not change a run's result: a finished run stays finished when only these differ
_IGNORED_KEYS = ("data.source", "data.download", "data.num_workers", "data.device_resident", "train.device",
                 "train.log_every", "train.compile", "train.channels_last", "run_name")
_IGNORED_SECTIONS = ("grid.", "lr_finder.")


# ----------------------------------------------------------------------------- naming and planning

def _exp(x: float) -> str:
    mantissa, exponent = f"{x:.12e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def format_lr(x: float) -> str:
    """0.002 -> '0.002', 1e-05 -> '1e-5' (Python's shortest %g, with a short exponent)."""
    s = f"{float(x):g}"
    return _exp(float(x)) if "e" in s else s


def format_wd(x: float) -> str:
    """The shorter of the decimal and the exponent form: 1e-4 -> '1e-4', 5e-5 -> '5e-5', 0 -> '0', 0.05 -> '0.05'."""
    x = float(x)
    if x == 0:
        return "0"
    dec = f"{x:.12f}".rstrip("0").rstrip(".")
    exp = _exp(x)
    return dec if len(dec) <= len(exp) and float(dec) == x else exp


def short_name(index: int) -> str:
    """gs_<3-digit index>: the start of a run's name, enough to tell runs apart where the settings are shown."""
    return f"gs_{index:03d}"


def run_label(index: int, seed: Optional[int] = None) -> str:
    """short_name, with `_seed=<seed>` for one seed's run of a grid with seeds."""
    return short_name(index) + ("" if seed is None else f"_seed={seed}")


def run_name(index: int, lr: float, weight_decay: float, stage_channels: Sequence[int],
             stage_repeats: Sequence[int], seed: Optional[int] = None) -> str:
    """gs_<3-digit index>_lr=<lr>_wd=<wd>_ch=<c1-c2-..>_rep=<r1-r2-..>[_seed=<seed>]: written, never parsed back.
    Without `seed` (a grid without grid.seeds) the name of the run, with it the name of that seed's run; the
    name without it also names the point in the tables."""
    return (f"{short_name(index)}_lr={format_lr(lr)}_wd={format_wd(weight_decay)}"
            f"_ch={dashed(stage_channels)}_rep={dashed(stage_repeats)}" + ("" if seed is None else f"_seed={seed}"))


def is_run_folder(path: Union[str, Path]) -> bool:
    """A grid run's folder: named gs_..., holding the run's metrics.jsonl."""
    path = Path(path)
    return path.name.startswith("gs_") and (path / "metrics.jsonl").is_file()


@dataclass(frozen=True)
class GridRun:
    index: int                   # the point's index in product order (every seed's run of a point shares it)
    name: str
    lr: float
    weight_decay: float
    stage_channels: Tuple[int, ...]
    stage_repeats: Tuple[int, ...]
    seed: Optional[int] = None   # grid.seeds' seed of this run; None: the config's train.seed (no grid.seeds)


def _options(grid: Dict[str, Any], key: str, nested: bool) -> List[Any]:
    value = grid[key]
    if not isinstance(value, (list, tuple)):
        value = [value]
    if nested and value and all(isinstance(v, int) for v in value):  # one option written flat: [64, 128, 256]
        value = [value]
    if not value:
        raise ConfigError(f"grid.{key} is empty: give at least one value")
    for v in value:
        if nested:
            if not isinstance(v, (list, tuple)) or not v or not all(isinstance(c, int) and c > 0 for c in v):
                raise ConfigError(f"grid.{key} holds lists of positive integers (one per stage), got {v!r}")
        elif not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 or (key == "lr" and v <= 0):
            raise ConfigError(f"grid.{key} holds {'positive' if key == 'lr' else 'non-negative'} numbers, got {v!r}")
    return [tuple(int(c) for c in v) for v in value] if nested else [float(v) for v in value]


def _seeds(grid: Dict[str, Any]) -> List[Optional[int]]:
    """grid.seeds, or [None] (one run per point, with train.seed) when there are none."""
    seeds = grid.get("seeds") or []
    if not isinstance(seeds, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                       for v in seeds):
        raise ConfigError(f"grid.seeds holds non-negative integers (train.seed of each run), got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"grid.seeds must not repeat a seed, got {list(seeds)}")
    return list(seeds) or [None]


def has_seeds(rows: Sequence[Dict[str, Any]]) -> bool:
    """Whether result rows come from a grid with grid.seeds (its runs record their seed)."""
    return any(r.get("seed") is not None for r in rows)


def grid_plan(cfg: Config) -> List[GridRun]:
    """Every combination of cfg.grid, in product order (lr, weight_decay, stage_channels, stage_repeats), each
    once per seed of grid.seeds (the seed varying fastest) when it has any."""
    g = dataclasses.asdict(cfg.grid)
    epochs = g.get("epochs")
    if not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"grid.epochs must be a positive integer, got {epochs!r}")
    lrs, wds = _options(g, "lr", False), _options(g, "weight_decay", False)
    chs, reps = _options(g, "stage_channels", True), _options(g, "stage_repeats", True)
    seeds = _seeds(g)
    runs = len(lrs) * len(wds) * len(chs) * len(reps) * len(seeds)
    if runs > MAX_GRID_RUNS:
        raise ConfigError(f"grid: {runs:,} runs (combinations x seeds); at most {MAX_GRID_RUNS:,} in one grid search")
    plan = []
    for i, (lr, wd, ch, rep) in enumerate(itertools.product(lrs, wds, chs, reps)):
        if len(ch) != len(rep):
            raise ConfigError(f"grid: stage_channels {list(ch)} and stage_repeats {list(rep)} have different "
                             "numbers of stages; every combination needs one repeat per stage")
        plan += [GridRun(i, run_name(i, lr, wd, ch, rep, seed), lr, wd, ch, rep, seed) for seed in seeds]
    if len({r.name for r in plan}) != len(plan):
        raise ConfigError("grid: two combinations get the same run name (duplicate values in grid.*?)")
    return plan


def run_config(cfg: Config, run: GridRun) -> Config:
    """cfg with the run's lr, weight decay, widths and depths, grid.epochs epochs, its seed (when grid.seeds
    gives it one) and its name."""
    return cfg.replace([f"train.optimizer.lr={run.lr!r}", f"train.optimizer.weight_decay={run.weight_decay!r}",
                        f"stage_channels={list(run.stage_channels)}", f"stage_repeats={list(run.stage_repeats)}",
                        f"train.epochs={cfg.grid.epochs}", f"run_name={run.name}"]
                       + ([] if run.seed is None else [f"train.seed={run.seed}"]))



# ----------------------------------------------------------------------------- run state and results

def expected_steps(run_cfg: Config, manifest: Dict[str, Any], world_size: int = 1) -> Tuple[int, int]:
    """(epochs, optimizer steps) that train() runs for run_cfg (the same arithmetic as train())."""
    from ..plan import RunPlan

    t, subset = run_cfg.train, RunPlan.from_config(run_cfg).train_subset
    n = manifest["splits"][run_cfg.data.train_split]["num_samples"]
    if subset is not None:
        n = min(n, subset)
    steps_per_epoch = n // (t.batch_size * world_size) // t.grad_accum_steps
    if steps_per_epoch < 1:
        raise ConfigError(f"{n} training samples make no optimizer step of batch {t.batch_size} x "
                         f"{world_size} processes x {t.grad_accum_steps} accumulation steps")
    total = t.max_steps or steps_per_epoch * t.epochs
    return math.ceil(total / steps_per_epoch), total


def read_metrics(run_dir: Union[str, Path]) -> List[Dict[str, Any]]:
    """The epoch records of run_dir/metrics.jsonl (the last one of each epoch; a torn last line is ignored)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    by_epoch: Dict[int, Dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and "epoch" in r:
            by_epoch[int(r["epoch"])] = r
    return [by_epoch[e] for e in sorted(by_epoch)]


def _number(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def val_figures(record: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """An epoch record's val figures as train() chose its best weights: the raw weights' (val/*), or the EMA
    weights' (val_ema/*, with train.ema) when those are more accurate (a tie: the raw ones). Returns {accuracy,
    loss, top5, weights: "raw"|"ema", ema: whether EMA weights were evaluated, tta: the record's "tta" (None
    without)}; None for an epoch without an evaluation."""
    raw, ema = _number(record.get("val/accuracy")), _number(record.get("val_ema/accuracy"))
    if raw is None and ema is None:
        return None
    prefix = "val_ema" if ema is not None and (raw is None or ema > raw) else "val"
    tta = record.get("tta")
    return {"accuracy": ema if prefix == "val_ema" else raw, "loss": _number(record.get(f"{prefix}/loss")),
            "top5": _number(record.get(f"{prefix}/top5")), "weights": "ema" if prefix == "val_ema" else "raw",
            "ema": ema is not None, "tta": tta if isinstance(tta, str) else None}


def best_val(records: Sequence[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """val_figures of the epoch with the best val accuracy (the first of equals), with its `epoch`; None when no
    epoch was evaluated."""
    best = best_record(records)
    return {**val_figures(best), "epoch": best.get("epoch")} if best else None


def best_record(records: Sequence[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The epoch record with the best val accuracy (of its raw or, with train.ema, its EMA weights: val_figures;
    the first of equals), None when no epoch was evaluated."""
    evals = [(r, f) for r in records if (f := val_figures(r)) is not None]
    return max(evals, key=lambda rf: rf[1]["accuracy"])[0] if evals else None


def _comparable(cfg: Union[Config, Dict[str, Any]]) -> Dict[str, Any]:
    flat = flatten(cfg)
    out = {k: v for k, v in flat.items() if k not in _IGNORED_KEYS and not k.startswith(_IGNORED_SECTIONS)}
    out["data.root"] = str(Path(str(flat.get("data.root"))).resolve())
    return out


def _same_config(run_dir: Path, run_cfg: Config) -> bool:
    try:
        saved = read_yaml(run_dir / "config.yaml")  # bounded: a run folder may come from anyone
    except (OSError, ConfigError):
        return False
    return isinstance(saved, dict) and _comparable(saved) == _comparable(run_cfg)


def run_status(run_dir: Union[str, Path], run_cfg: Config, manifest: Dict[str, Any],
               world_size: int = 1) -> str:
    """'finished' (metrics.jsonl holds every epoch), 'diverged' (a NaN loss stopped it), 'partial'
    (resumable state saved), 'changed' (its folder holds another config) or 'new'."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        return "new"
    if not _same_config(run_dir, run_cfg):
        return "changed"
    if (run_dir / "grid_failed.json").is_file():
        return "diverged"
    epochs, total = expected_steps(run_cfg, manifest, world_size)
    records = read_metrics(run_dir)
    if ({r["epoch"] for r in records} >= set(range(1, epochs + 1)) and records and records[-1].get("step", 0) >= total
            and "val/accuracy" in records[-1]):
        return "finished"
    if (run_dir / "state" / "progress.json").is_file():
        return "partial"
    return "new"


def run_result(run: GridRun, run_dir: Union[str, Path], status: str, num_parameters: Optional[int] = None,
               error: Optional[str] = None) -> Dict[str, Any]:
    """One row of the table: the run's settings and its best val accuracy (with that epoch's val loss; with
    train.ema of the better weights, `weights` says which; `tta` the TTA it was measured with)."""
    records = read_metrics(run_dir)
    best = best_val(records)
    if error is None and status == "diverged":
        try:
            error = json.loads((Path(run_dir) / "grid_failed.json").read_text()).get("error")
        except (OSError, json.JSONDecodeError):
            pass
    return {
        "index": run.index, "name": run.name, "lr": run.lr, "weight_decay": run.weight_decay,
        "stage_channels": list(run.stage_channels), "stage_repeats": list(run.stage_repeats),
        "seed": run.seed, "num_parameters": num_parameters,
        "val_accuracy": best["accuracy"] if best else None,
        "val_loss": best["loss"] if best else None,
        "val_top5": best["top5"] if best else None,
        "best_epoch": best["epoch"] if best else None,
        "weights": best["weights"] if best else None,
        "ema": any(r.get("val_ema/accuracy") is not None for r in records),
        "tta": best["tta"] if best else next((r["tta"] for r in records if r.get("tta")), None),
        "epochs": records[-1]["epoch"] if records else 0,
        "steps": records[-1].get("step") if records else 0,
        "final_train_loss": records[-1].get("train/loss") if records else None,
        "status": status, "error": error, "output": str(run_dir),
    }


def sort_results(results: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Best val accuracy first; equal accuracy: lower val loss first; runs without a result last; then by index
    (and seed). Adds `rank` (1-based). Also ranks aggregate_seeds' points (by their means)."""
    def key(r):
        acc, loss, seed = r.get("val_accuracy"), r.get("val_loss"), r.get("seed")
        return (acc is None, -(acc or 0.0), loss if loss is not None else math.inf, r["index"],
                seed if isinstance(seed, int) else -1)
    out = [dict(r) for r in sorted(results, key=key)]
    for rank, r in enumerate(out, 1):
        r["rank"] = rank
    return out


def _mean_sd(values: Sequence[float]) -> Tuple[Optional[float], Optional[float]]:
    """(mean, sample standard deviation): (None, None) without values, sd None with one (it is undefined)."""
    if not values:
        return None, None
    mean = math.fsum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _joined_status(statuses: Sequence[Optional[str]]) -> str:
    """'finished' when every run is; else the count of each status, e.g. '2 finished, 1 diverged'."""
    counts: Dict[str, int] = {}
    for status in statuses:
        counts[status or "missing"] = counts.get(status or "missing", 0) + 1
    if set(counts) == {"finished"}:
        return "finished"
    return ", ".join(f"{n} {status}" for status, n in counts.items())


def aggregate_seeds(results: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per grid point (the runs of its seeds, grouped by index), ranked by mean best val accuracy: the
    point's settings; `val_accuracy`, `val_loss`, `val_top5`, `final_train_loss`: means over the seeds whose run
    finished with a val accuracy, `val_accuracy_sd`, `val_loss_sd`: their sample standard deviations (None below
    2 seeds); `n` those seeds, `seeds` the point's runs, `seeds_done` their seeds; `status` 'finished' or the
    count of each status; `weights` "raw", "ema" or "ema 2, raw 1" (per seed, the better weights of train.ema);
    `runs` the names of its runs. `name` is the point's run name without a seed; `row` is "mean"."""
    groups: Dict[int, List[Dict[str, Any]]] = {}
    for r in results:
        groups.setdefault(r["index"], []).append(r)
    points = []
    for index, rows in groups.items():
        rows = sorted(rows, key=lambda r: r.get("seed") if isinstance(r.get("seed"), int) else -1)
        done = [r for r in rows if r.get("status") == "finished" and r.get("val_accuracy") is not None]
        first = rows[0]
        acc, acc_sd = _mean_sd([r["val_accuracy"] for r in done])
        loss, loss_sd = _mean_sd([r["val_loss"] for r in done if r.get("val_loss") is not None])
        weights = [r.get("weights") for r in done if r.get("weights")]
        weights_label = (weights[0] if len(set(weights)) == 1 else
                         ", ".join(f"{w} {weights.count(w)}" for w in sorted(set(weights))) if weights else None)
        ttas = {r.get("tta") for r in rows if r.get("tta")}
        points.append({
            "row": "mean", "index": index,
            "name": run_name(index, first["lr"], first["weight_decay"], first["stage_channels"],
                             first["stage_repeats"]),
            "lr": first["lr"], "weight_decay": first["weight_decay"], "stage_channels": first["stage_channels"],
            "stage_repeats": first["stage_repeats"], "num_parameters": first.get("num_parameters"), "seed": None,
            "val_accuracy": acc, "val_accuracy_sd": acc_sd, "val_loss": loss, "val_loss_sd": loss_sd,
            "val_top5": _mean_sd([r["val_top5"] for r in done if r.get("val_top5") is not None])[0],
            "final_train_loss": _mean_sd([r["final_train_loss"] for r in done
                                          if r.get("final_train_loss") is not None])[0],
            "best_epoch": None, "epochs": max((r.get("epochs") or 0 for r in rows), default=0),
            "n": len(done), "seeds": len(rows), "seeds_done": [r.get("seed") for r in done],
            "status": _joined_status([r.get("status") for r in rows]), "weights": weights_label,
            "ema": any(r.get("ema") for r in rows), "tta": ", ".join(sorted(ttas)) if ttas else None,
            "runs": [r["name"] for r in rows]})
    return sort_results(points)


def format_spread(row: Dict[str, Any], key: str = "val_accuracy") -> str:
    """A point's mean ± sample sd over its seeds, with n: '41.20 ± 1.30% (n=3)' (accuracy, sd in percentage
    points), '1.2345 ± 0.0100 (n=3)' (loss); '(n=2 of 3)' while seeds are missing; no ± below 2 seeds."""
    mean, sd = row.get(key), row.get(f"{key}_sd")
    n, planned = row.get("n") or 0, row.get("seeds") or 0
    count_text = f"(n={n})" if n == planned else f"(n={n} of {planned})"
    if mean is None:
        return f"- {count_text}"
    if key == "val_accuracy":
        text = f"{percent(mean)}" if sd is None else f"{100 * mean:.2f} ± {100 * sd:.2f}%"
    else:
        text = number(mean) if sd is None else f"{number(mean)} ± {number(sd)}"
    return f"{text} {count_text}"


def format_value(key: str, value: Any) -> str:
    """A value of a result row as tables show it: lr and weight decay as in run names, widths and depths
    dashed, accuracy in percent, losses to 4 decimals, parameters with thousands separators."""
    if value is None:
        return "-"
    if key == "lr":
        return format_lr(value)
    if key == "weight_decay":
        return format_wd(value)
    if key in ("stage_channels", "stage_repeats"):
        return dashed(value)
    if key in ("val_accuracy", "val_top5"):
        return percent(value)
    if key in ("val_loss", "final_train_loss"):
        return number(value)
    if key == "num_parameters":
        return count(value)
    if key == "weights":  # "ema", "raw", or a point's "ema 2, raw 1"
        return str(value).replace("ema", "EMA")
    return str(value)


def _point_cell(row: Dict[str, Any], key: str) -> str:
    """A cell of a points table: mean ± sd (n) for accuracy and loss, else format_value."""
    return format_spread(row, key) if key in ("val_accuracy", "val_loss") else format_value(key, row.get(key))


_MD_COLUMNS = [("rank", "#"), ("name", "run"), ("lr", "lr"), ("weight_decay", "weight decay"),
               ("stage_channels", "channels"), ("stage_repeats", "repeats"), ("num_parameters", "parameters"),
               ("val_accuracy", "val accuracy"), ("val_loss", "val loss"), ("best_epoch", "best epoch"),
               ("status", "status")]
_MD_POINT_COLUMNS = [("rank", "#"), ("name", "point"), ("lr", "lr"), ("weight_decay", "weight decay"),
                     ("stage_channels", "channels"), ("stage_repeats", "repeats"), ("num_parameters", "parameters"),
                     ("val_accuracy", "val accuracy, mean ± sd (n)"), ("val_loss", "val loss, mean ± sd (n)"),
                     ("status", "status")]
_RIGHT = {"rank", "seed", "lr", "weight_decay", "num_parameters", "val_accuracy", "val_loss", "best_epoch"}


def _with_weights(columns: List[Tuple[str, str]], rows: Sequence[Dict[str, Any]]) -> List[Tuple[str, str]]:
    """The columns, with `weights` after the val loss when a run evaluated EMA weights (train.ema)."""
    if not any(r.get("ema") for r in rows):
        return list(columns)
    at = [k for k, _ in columns].index("val_loss") + 1
    return [*columns[:at], ("weights", "weights"), *columns[at:]]


def _markdown_table(rows: Sequence[Dict[str, Any]], columns: Sequence[Tuple[str, str]], cell) -> List[str]:
    lines = ["| " + " | ".join(h for _, h in columns) + " |",
             "|" + "|".join("---:" if k in _RIGHT else "---" for k, _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(cell(r, k).replace("|", "\\|") for k, _ in columns) + " |")
    return lines


def evaluation_note(rows: Sequence[Dict[str, Any]]) -> Optional[str]:
    """What the accuracies are of: the better of raw and EMA weights (train.ema), measured with flip TTA."""
    notes = []
    if any(r.get("ema") for r in rows):
        notes.append("with train.ema each run's val accuracy is the better of its raw and its EMA weights' "
                     "(column weights), as best.safetensors keeps")
    ttas = sorted({r["tta"] for r in rows if r.get("tta")})
    if ttas:
        notes.append(f"measured with {', '.join(ttas)} TTA (train.tta)")
    return ("Val accuracy: " + "; ".join(notes) + ".") if notes else None


def results_markdown(results: Sequence[Dict[str, Any]], title: Optional[str] = None) -> str:
    """A Markdown table of (sorted) results; for a grid with seeds the table of its points (mean ± sd over the
    seeds, n), ranked by the mean, then the table of every run."""
    lines = [f"# {title}", ""] if title else []
    runs_columns = _with_weights(_MD_COLUMNS, results)
    if has_seeds(results):
        points = aggregate_seeds(results)
        lines += ["Points ranked by mean best val accuracy over their seeds (mean ± sample standard deviation; n: "
                  "the seeds whose run finished).", ""]
        lines += _markdown_table(points, _with_weights(_MD_POINT_COLUMNS, results), _point_cell)
        lines += ["", "## Every run", ""]
        at = [k for k, _ in runs_columns].index("name") + 1
        runs_columns = [*runs_columns[:at], ("seed", "seed"), *runs_columns[at:]]
    lines += _markdown_table(results, runs_columns, lambda r, k: format_value(k, r.get(k)))
    note = evaluation_note(results)
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"




def write_results(results: Sequence[Dict[str, Any]], output: Union[str, Path], stem: str = "results",
                  meta: Optional[Dict[str, Any]] = None) -> Dict[str, Path]:
    """OUTPUT/<stem>.md, .csv and .json of the results, sorted by best val accuracy. Each file is replaced
    atomically: several workers write them, a reader sees one whole table."""
    from ..files import atomic_write

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    rows = sort_results(results)
    meta = dict(meta or {})
    title = meta.pop("title", None)
    done = sum(r["val_accuracy"] is not None for r in rows)
    md = results_markdown(rows, title)
    seeded = has_seeds(rows)
    md += (f"\n{done} of {len(rows)} runs have a val accuracy; "
           + ("points ranked by their mean, runs " if seeded else "") + "sorted by best val accuracy (the epoch's val "
           "loss beside it).\n")
    paths = {"md": output / f"{stem}.md", "csv": output / f"{stem}.csv", "json": output / f"{stem}.json"}
    points = aggregate_seeds(rows) if seeded else []
    columns = (RESULT_COLUMNS + (SEED_COLUMNS if seeded else [])
               + (EVAL_COLUMNS if any(r.get("ema") or r.get("tta") for r in rows) else []))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(columns)
    for r in [*points, *({**r, "row": "run"} for r in rows)]:  # with seeds: the points first, then every run
        w.writerow(["" if r.get(k) is None else dashed(r[k]) if k in ("stage_channels", "stage_repeats") else r[k]
                    for k in columns])
    best = (points if seeded else rows)[:1]
    table = {**meta, "num_runs": len(rows), "results": rows,
             "best": best[0] if best and best[0]["val_accuracy"] is not None else None}
    if seeded:  # `best` is then the best point (its runs: `runs`)
        table.update(num_points=len(points), points=points)
    table = json.dumps(table, indent=1)
    for key, text in (("md", md), ("csv", buf.getvalue()), ("json", table)):
        atomic_write(paths[key], lambda tmp, text=text: Path(tmp).write_text(text))
    return paths


def load_results(output: Union[str, Path]) -> Dict[str, Any]:
    """The results of the search in OUTPUT, as it left them: results.json, else results.csv, else each gs_* run
    folder read with `run_result` (with its trial's state when OUTPUT/study.db can be read).

    Returns results.json's fields (title, grid, base, runs_planned, study, ... when recorded) with `results`:
    the rows of the runs sorted by best val accuracy, `points`: for a grid with seeds its points (aggregate_seeds,
    ranked by the mean), else None, and `source`: where they were read from. Tables written before grids had
    seeds read the same."""
    output = Path(output)
    if (output / "results.json").is_file():
        data = json.loads((output / "results.json").read_text())
        out = {**data, "results": sort_results(data.get("results") or []), "source": "results.json"}
    elif (output / "results.csv").is_file():
        out = {"results": sort_results(_read_csv(output / "results.csv")), "source": "results.csv"}
    else:
        trials = _study_trials(output / STUDY_FILE)
        source = "the gs_* run folders" + (f" and {STUDY_FILE}" if trials else "")
        out = {"results": sort_results(_results_from_folders(output, trials)), "source": source}
    out["points"] = aggregate_seeds(out["results"]) if has_seeds(out["results"]) else None
    return out


def _read_csv(path: Path) -> List[Dict[str, Any]]:
    """The run rows of results.csv (a grid with seeds also holds its points' rows: left out, recomputed)."""
    def num(text: str, kind=float):
        return kind(text) if text not in (None, "") else None

    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if r.get("row") == "mean":
                continue
            row = {"index": int(r["index"]), "name": r["name"], "lr": float(r["lr"]),
                   "weight_decay": float(r["weight_decay"]),
                   "stage_channels": [int(v) for v in r["stage_channels"].split("-")],
                   "stage_repeats": [int(v) for v in r["stage_repeats"].split("-")],
                   "num_parameters": num(r.get("num_parameters"), int),
                   "val_accuracy": num(r.get("val_accuracy")), "val_loss": num(r.get("val_loss")),
                   "best_epoch": num(r.get("best_epoch"), int), "epochs": num(r.get("epochs"), int),
                   "final_train_loss": num(r.get("final_train_loss")), "status": r.get("status") or None,
                   "seed": num(r.get("seed"), int)}
            if "weights" in r:  # EVAL_COLUMNS: written when a run evaluated EMA weights or used TTA
                row.update(weights=r["weights"] or None, ema=r.get("ema") == "True", tta=r.get("tta") or None)
            rows.append(row)
    return rows




def _results_from_folders(output: Path, trials: Optional[Dict[str, Dict[str, Any]]] = None) -> List[Dict[str, Any]]:
    """A row for every gs_* folder whose config.yaml places it in its grid (the plan of the grid it records), or,
    for a point TPE chose, whose trial in the study (`trials`, by run name) gives the index its name starts with.
    The trial's state, when known, is the row's status."""
    trials = trials or {}
    rows = []
    for run_dir in sorted(p for p in output.iterdir() if is_run_folder(p)):
        try:
            saved = from_dict(read_yaml(run_dir / "config.yaml"))
            run = next((r for r in grid_plan(saved) if r.name == run_dir.name), None)
            index = trials.get(run_dir.name, {}).get("index")
            if run is None and isinstance(index, int) and not isinstance(index, bool) and index >= 0:
                opt = saved.train.optimizer
                run = GridRun(index, run_name(index, opt.lr, opt.weight_decay, saved.stage_channels, saved.stage_repeats),
                              opt.lr, opt.weight_decay, tuple(saved.stage_channels), tuple(saved.stage_repeats))
                run = run if run.name == run_dir.name else None
        except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
            run = None
        if run is None:
            continue  # not a run of a grid (or one renamed): nothing says what it tried
        diverged = (run_dir / "grid_failed.json").is_file()
        status = "diverged" if diverged else "finished" if best_record(read_metrics(run_dir)) else "incomplete"
        trial = trials.get(run_dir.name)
        rows.append(run_result(run, run_dir, trial["status"] if trial else status, error=trial and trial["error"]))
    return rows


def _study_trials(path: Path) -> Dict[str, Dict[str, Any]]:
    """{run name: {"status", "error", "index"}} of the trials in the SQLite study file `path`, opened read-only;
    {} without the file, without optuna, or when it cannot be read (it may come from anyone: its values are
    only compared and shown, never run)."""
    if not path.is_file():
        return {}
    try:
        optuna = import_optuna()
        storage = optuna.storages.RDBStorage(f"sqlite:///file:{path.resolve()}?mode=ro&uri=true",
                                             skip_compatibility_check=True, skip_table_creation=True)
        out: Dict[str, Dict[str, Any]] = {}
        for summary in storage.get_all_studies():
            if _STUDY_ATTR not in summary.user_attrs:
                continue
            trials = storage.get_all_trials(storage.get_study_id_from_name(summary.study_name), deepcopy=False)
            for name, ts in _by_run(trials).items():
                status, error = _trial_status(ts)
                out[name] = {"status": status, "error": error, "index": ts[-1].user_attrs.get("index")}
        return out
    except Exception:  # noqa: BLE001 - the run folders alone still make the table
        return {}


def write_hparams(result: Dict[str, Any], run_dir: Union[str, Path], domains: Optional[Dict[str, list]] = None,
                  epochs: Optional[int] = None) -> Optional[Path]:
    """The run's hparams and final metrics for TensorBoard's HParams view, in run_dir/tb/hparams.

    (train() already logs the whole flattened config through accelerate's tracker, but with no metrics, so
    the HParams view could not compare runs.) Returns None without tensorboard or without a result."""
    if result.get("val_accuracy") is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams
    except ImportError:
        return None
    hp = {"lr": float(result["lr"]), "weight_decay": float(result["weight_decay"]),
          "stage_channels": dashed(result["stage_channels"]), "stage_repeats": dashed(result["stage_repeats"])}
    if epochs is not None:
        hp["epochs"] = int(epochs)
    if result.get("seed") is not None:
        hp["seed"] = int(result["seed"])
    metrics = {"hparam/val_accuracy": float(result["val_accuracy"])}
    for key, tag in (("val_loss", "hparam/val_loss"), ("final_train_loss", "hparam/train_loss"),
                     ("val_top5", "hparam/val_top5")):
        if result.get(key) is not None:
            metrics[tag] = float(result[key])
    domains = {k: v for k, v in (domains or {}).items() if k in hp}
    tb = Path(run_dir) / "tb"
    if tb.is_symlink() or (tb.exists() and not tb.is_dir()):
        return None  # not a folder the run wrote: nothing is written (or removed) through it
    path = tb / "hparams"
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)  # one HParams record per run, also when a grid is re-run
    exp, ssi, sei = hparams(hp, metrics, hparam_domain_discrete=domains or None)
    with SummaryWriter(log_dir=str(path)) as w:
        for summary in (exp, ssi, sei):
            w.file_writer.add_summary(summary)
        for tag, value in metrics.items():
            w.add_scalar(tag, value)
    return path


def _domains(plan: Sequence[GridRun]) -> Dict[str, list]:
    def uniq(values):
        return sorted(set(values), key=lambda v: (str(type(v)), v))
    return {"lr": uniq(r.lr for r in plan), "weight_decay": uniq(r.weight_decay for r in plan),
            "stage_channels": uniq(dashed(r.stage_channels) for r in plan),
            "stage_repeats": uniq(dashed(r.stage_repeats) for r in plan)}


_PARAMS_CACHE: Dict[Tuple[Any, ...], Optional[int]] = {}


def _num_parameters(cfg: Config, run: GridRun, num_classes: int) -> Optional[int]:
    from ..plan import build_model
    key = (cfg.model, run.stage_channels, run.stage_repeats, num_classes)
    if key not in _PARAMS_CACHE:
        try:
            model = build_model(run_config(cfg, run), num_classes)
            _PARAMS_CACHE[key] = sum(p.numel() for p in model.parameters())
        except Exception:  # noqa: BLE001 - the table can do without it
            _PARAMS_CACHE[key] = None
    return _PARAMS_CACHE[key]



# ----------------------------------------------------------------------------- the study

SAMPLERS = ("grid", "tpe")
PRUNERS = ("none", "median")
STUDY_FILE = "study.db"
SWEEP_EXTRA = 'pip install "tinycnn[sweep]"'
MAX_RETRY = 3            # a trial whose worker keeps dying is queued again at most this often in a row
_STUDY_ATTR = "tinycnn"  # the study's user attribute: what it searches, checked by every worker that joins
_REPLACES_OURS = "the grid search trains afresh only in run folders tinycnn wrote"


def import_optuna():
    """optuna (quiet: the workers say what happens), or a one-line ConfigError saying how to install it."""
    try:
        import optuna
    except ImportError:
        raise ConfigError(f"the grid search runs an Optuna study: {SWEEP_EXTRA}") from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna


def default_storage(output: Union[str, Path]) -> str:
    """SQLite in OUTPUT/study.db (an embedded database: nothing to run)."""
    return f"sqlite:///{(Path(output) / STUDY_FILE).resolve()}"


def shown_storage(url: str) -> str:
    """A storage URL as tables and messages show it: without a password."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", str(url))


def _retry_callback(max_retry: Optional[int] = MAX_RETRY):
    optuna = import_optuna()
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)  # optuna >= 4.9
    retry = retry or optuna.storages.RetryFailedTrialCallback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental
        return retry(max_retry=max_retry)


def make_storage(url: str, *, heartbeat_interval: Optional[int] = 60, grace_period: Optional[int] = None):
    """The Optuna storage of `url`: a database URL (anything with "://", SQLite included), with heartbeats every
    heartbeat_interval seconds and the retry of trials stale for grace_period (default 2 x interval); else the
    path of a journal file (optuna's JournalStorage, which has no heartbeat)."""
    optuna = import_optuna()
    url = str(url)
    try:
        if "://" not in url:
            try:
                from optuna.storages.journal import JournalFileBackend as Backend  # optuna >= 4.0
            except ImportError:
                from optuna.storages import JournalFileStorage as Backend
            Path(url).parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(Backend(url))
        kwargs: Dict[str, Any] = {}
        if url.startswith("sqlite"):  # several workers write one file: wait for its lock rather than fail
            kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
        if heartbeat_interval:
            new = hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback")
            kwargs.update(heartbeat_interval=int(heartbeat_interval), grace_period=grace_period)
            kwargs["heartbeat_stale_trial_callback" if new else "failed_trial_callback"] = _retry_callback()
        for attempt in range(5):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return optuna.storages.RDBStorage(url, **kwargs)
            except Exception as e:  # noqa: BLE001 - workers that start together create the tables together
                if attempt == 4 or type(e).__name__ not in ("IntegrityError", "OperationalError"):
                    raise
                time.sleep(0.5 * (attempt + 1))
    except (ImportError, OSError, ValueError, optuna.exceptions.OptunaError) as e:
        raise ConfigError(f"--storage {shown_storage(url)}: {e}".splitlines()[0]) from None
    except Exception as e:  # noqa: BLE001 - SQLAlchemy's errors (a malformed URL, a database that refuses)
        if type(e).__module__.startswith("sqlalchemy"):
            raise ConfigError(f"--storage {shown_storage(url)}: {e}".splitlines()[0]) from None
        raise


def search_space(plan: Sequence[GridRun]) -> Dict[str, list]:
    """The grid's values per parameter (widths and depths dashed, as Optuna stores only numbers and strings);
    with grid.seeds also `seed`, one more dimension of the grid."""
    def uniq(values):
        return list(dict.fromkeys(values))
    space = {"lr": uniq(r.lr for r in plan), "weight_decay": uniq(r.weight_decay for r in plan),
             "stage_channels": uniq(dashed(r.stage_channels) for r in plan),
             "stage_repeats": uniq(dashed(r.stage_repeats) for r in plan)}
    if any(r.seed is not None for r in plan):
        space["seed"] = uniq(r.seed for r in plan)
    return space


def check_sampler(cfg: Config, sampler: str):
    """grid.seeds needs the grid sampler: TPE would treat the seed as a parameter to tune."""
    if sampler != "grid" and cfg.grid.seeds:
        raise ConfigError(f"--sampler {sampler} samples one run per trial and would tune the seed: use the default "
                          "--sampler grid with grid.seeds, or leave grid.seeds empty")


def _suggest(trial, space: Dict[str, list], sampler: str) -> Dict[str, Any]:
    if sampler == "grid":
        return {k: trial.suggest_categorical(k, v) for k, v in space.items()}
    lrs, wds = space["lr"], space["weight_decay"]
    return {"lr": trial.suggest_float("lr", min(lrs), max(lrs), log=True),
            "weight_decay": trial.suggest_float("weight_decay", min(wds), max(wds), log=min(wds) > 0),
            "stage_channels": trial.suggest_categorical("stage_channels", space["stage_channels"]),
            "stage_repeats": trial.suggest_categorical("stage_repeats", space["stage_repeats"])}


def trial_run(params: Dict[str, Any], plan: Sequence[GridRun], sampler: str, index: Any) -> GridRun:
    """The run of a trial's params, checked against the grid first: they may come from a storage someone else
    wrote. A grid trial must be a point of the plan; a TPE trial must lie within the grid's ranges and options
    (its index: the trial's number)."""
    shown = repr(params)[:200]
    try:
        lr, wd = float(params["lr"]), float(params["weight_decay"])
        ch, rep = str(params["stage_channels"]), str(params["stage_repeats"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"trial params {shown} are not lr, weight_decay, stage_channels and stage_repeats") from None
    if sampler == "grid":
        seed = params.get("seed")  # with grid.seeds only; compared, never converted
        for run in plan:
            if ((run.lr, run.weight_decay, dashed(run.stage_channels), dashed(run.stage_repeats)) == (lr, wd, ch, rep)
                    and type(seed) is type(run.seed) and seed == run.seed):
                return run
        raise ConfigError(f"trial params {shown} are not a point of this grid")
    space = search_space(plan)
    if (isinstance(index, bool) or not isinstance(index, int) or index < 0
            or not all(math.isfinite(x) and min(space[k]) <= x <= max(space[k])
                       for k, x in (("lr", lr), ("weight_decay", wd)))
            or ch not in space["stage_channels"] or rep not in space["stage_repeats"]):
        raise ConfigError(f"trial params {shown} (index {index!r}) lie outside this grid's ranges")
    channels = next(r.stage_channels for r in plan if dashed(r.stage_channels) == ch)
    repeats = next(r.stage_repeats for r in plan if dashed(r.stage_repeats) == rep)
    return GridRun(index, run_name(index, lr, wd, channels, repeats), lr, wd, channels, repeats)


def _study_record(cfg: Config, sampler: str) -> Dict[str, Any]:
    """What a study searches, as its user attribute records it (data.root left out: workers on other machines
    may read the same shards from another path)."""
    config = {k: v for k, v in _comparable(cfg).items() if k != "data.root"}
    searched = dataclasses.asdict(cfg.grid)
    if not searched["seeds"]:  # as recorded before grids had seeds: those studies are joined as they were
        del searched["seeds"]
    return json.loads(json.dumps({"sampler": sampler, "grid": searched, "config": config}))


def default_study_name(sampler: str) -> str:
    return "grid_search" if sampler == "grid" else f"grid_search_{sampler}"


def open_study(storage, study_name: str, cfg: Config, *, sampler: str = "grid", pruner: str = "none",
               overwrite: bool = False):
    """The study `study_name` in `storage`, created or joined. A study of another config (or sampler) is an error;
    overwrite=True deletes it first when tinycnn made it. A study tinycnn did not make is never touched."""
    optuna = import_optuna()
    check_sampler(cfg, sampler)
    space = search_space(grid_plan(cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # GridSampler: the same seed in every worker, so that a grid_id names the same point everywhere
        chosen = (optuna.samplers.GridSampler(space, seed=0) if sampler == "grid"
                  else optuna.samplers.TPESampler(constant_liar=True))
    chosen_pruner = optuna.pruners.MedianPruner() if pruner == "median" else optuna.pruners.NopPruner()
    record = _study_record(cfg, sampler)
    shown = f"study {study_name!r} in {shown_storage(getattr(storage, 'url', None) or 'the journal file')}"
    for attempt in range(2):
        study = optuna.create_study(study_name=study_name, storage=storage, sampler=chosen, pruner=chosen_pruner,
                                    direction="maximize", load_if_exists=True)
        saved = study.user_attrs.get(_STUDY_ATTR)
        if saved is None and not study.trials and study.direction == optuna.study.StudyDirection.MAXIMIZE:
            study.set_user_attr(_STUDY_ATTR, record)
            return study
        if saved == record:
            return study
        if saved is None:
            raise ConfigError(f"{shown} was not made by tinycnn's grid search: choose another --study-name or "
                              "--storage")
        if not overwrite or attempt:
            raise ConfigError(f"{shown} searches another config or sampler: choose another --output, --study-name "
                              "or --storage, or pass --overwrite to start the study again")
        optuna.delete_study(study_name=study_name, storage=storage)
    raise AssertionError("unreachable")


def _is_done(t) -> bool:
    """A trial that needs no more work: complete, pruned, or diverged."""
    state = t.state.name
    return state in ("COMPLETE", "PRUNED") or (state == "FAIL" and t.user_attrs.get("status") == "diverged")


def _by_run(trials) -> Dict[str, list]:
    out: Dict[str, list] = {}
    for t in trials:
        name = t.user_attrs.get("run")
        if isinstance(name, str):
            out.setdefault(name, []).append(t)
    return out


def _trial_status(trials) -> Tuple[str, Optional[str]]:
    """(status, error) of a run from its trials: finished, diverged, pruned, running, waiting, failed or missing."""
    states = {t.state.name: t for t in trials}
    diverged = [t for t in trials if t.state.name == "FAIL" and t.user_attrs.get("status") == "diverged"]
    if "COMPLETE" in states:
        return "finished", None
    if diverged:
        return "diverged", str(diverged[-1].user_attrs.get("error") or "")[:500] or None
    for state, status in (("PRUNED", "pruned"), ("RUNNING", "running"), ("WAITING", "waiting"), ("FAIL", "failed")):
        if state in states:
            return status, None
    return "missing", None


def study_results(study, cfg: Config, output: Union[str, Path], *, sampler: str = "grid",
                  num_classes: Optional[int] = None) -> List[Dict[str, Any]]:
    """A row per point of the study (every point of the grid; for TPE every point tried), its status from its
    trials, its numbers from its run folder; sorted by best val accuracy."""
    output, plan = Path(output), grid_plan(cfg)
    by_run = _by_run(study.get_trials(deepcopy=False))
    if sampler == "grid":
        runs = plan
    else:
        runs = []
        for name, ts in sorted(by_run.items()):
            try:
                run = trial_run(ts[-1].params, plan, sampler, ts[-1].user_attrs.get("index"))
            except ConfigError:
                continue
            if run.name == name:
                runs.append(run)
    rows = []
    for run in runs:
        status, error = _trial_status(by_run.get(run.name, []))
        params = _num_parameters(cfg, run, num_classes) if num_classes else None
        rows.append(run_result(run, output / run.name, status, params, error))
    return sort_results(rows)


def results_meta(cfg: Config, plan: Sequence[GridRun], *, sampler: str = "grid", n_trials: Optional[int] = None,
                 study_name: Optional[str] = None, storage: Optional[str] = None,
                 pruner: str = "none") -> Dict[str, Any]:
    """What the results tables record besides the rows: title, the grid, the base settings, runs planned, the study."""
    t = cfg.train
    return {"title": "Grid search" if sampler == "grid" else f"Search of the grid's ranges ({sampler.upper()})",
            "grid": dataclasses.asdict(cfg.grid),
            "base": {"model": cfg.model, "optimizer": t.optimizer.name, "batch_size": t.batch_size,
                     "epochs": cfg.grid.epochs, "max_steps": t.max_steps, "seed": t.seed,
                     "seeds": list(cfg.grid.seeds) or None, "ema": t.ema, "tta": t.tta,
                     "scheduler": t.scheduler.name, "data": cfg.data.root},
            "runs_planned": len(plan) if sampler == "grid" else n_trials,
            "study": {"name": study_name, "storage": shown_storage(storage) if storage else None, "sampler": sampler,
                      "pruner": pruner}}


# ----------------------------------------------------------------------------- a worker

class SearchError(TinycnnError, RuntimeError):
    """A trial's training process failed (its own one-line message and log are named)."""


class _Diverged(Exception):
    """The trial's loss went NaN: a FAIL trial with user attribute status=diverged; the study goes on."""


def _train_command() -> List[str]:
    """The train recipe: the installed module, else the checkout's script."""
    import importlib.util

    if importlib.util.find_spec("tinycnn.recipes") is not None:
        return [sys.executable, "-m", "tinycnn.recipes.train"]
    return [sys.executable, str(Path(__file__).resolve().parents[2] / "recipes" / "train.py")]


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _last_message(log: Path, start: int) -> str:
    """The child's one-line error (`error: ...` / `stopped: ...`, as run_main prints it) from its log after
    `start`, else its last line."""
    try:
        with open(log, "rb") as f:
            f.seek(max(start, f.seek(0, os.SEEK_END) - 16384))
            lines = [_ANSI.sub("", ln).strip() for ln in f.read().decode("utf-8", "replace").splitlines()]
    except OSError:
        return ""
    lines = [ln for ln in lines if ln]
    said = [ln for ln in lines if ln.startswith(("error:", "stopped:"))]
    return (said or lines or [""])[-1][:500]


def _stop_child(proc: subprocess.Popen, timeout: float = 300):
    """SIGTERM (the child saves resumable state and exits), SIGKILL when it does not within `timeout`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_for_folder(run_dir: Path, poll_s: float, say):
    """The run folder's lock: taken at once, or after another worker's run there ends."""
    from ..runs import RunFolderError, RunLock

    told = False
    while True:
        try:
            return RunLock(run_dir).acquire()
        except RunFolderError as e:
            if "is in use by" not in str(e):
                raise
            if not told:
                say(f"  {run_dir.name} is being trained elsewhere: waiting for it")
                told = True
            time.sleep(poll_s)


class _Worker:
    """Pulls trials of one study until it is done; each trial's run is a child process of the train recipe."""

    def __init__(self, cfg, output, plan, manifest, *, sampler, n_trials, pruning, overwrite, progress, say,
                 poll_s):
        self.cfg, self.output, self.plan, self.manifest = cfg, output, plan, manifest
        self.sampler, self.n_trials, self.pruning = sampler, n_trials, pruning
        self.overwrite, self.progress, self.say, self.poll_s = overwrite, progress, say, poll_s
        self.space, self.domains = search_space(plan), _domains(plan)
        self.trial_number: Optional[int] = None
        self.run: Optional[GridRun] = None
        self.reported: set = set()

    # -- what is left
    def pending(self, study) -> str:
        """'run' (a trial to take now), 'wait' (only trials running elsewhere), 'done', or 'stuck' (points whose
        trials failed: a new start of the command queues them again)."""
        trials = study.get_trials(deepcopy=False)
        waiting = any(t.state.name == "WAITING" for t in trials)
        running = [t for t in trials if t.state.name == "RUNNING"]
        done = [t for t in trials if _is_done(t)]
        if self.sampler == "grid":
            names = {r.name for r in self.plan}
            todo = names - {t.user_attrs.get("run") for t in done}
            if not todo:
                return "done"
            if waiting:
                return "run"
            # the points GridSampler still hands out: none of their trials finished (FAIL included) or running
            taken = {t.user_attrs.get("run") for t in trials if t.state.is_finished() or t.state.name == "RUNNING"}
            unnamed = sum("run" not in t.user_attrs for t in running)  # asked a moment ago, point not yet known
            if len(names - taken) - unnamed > 0:
                return "run"
            return "wait" if running else "stuck"
        if len(done) >= self.n_trials:
            return "done"
        if waiting or len(done) + len(running) < self.n_trials:
            return "run"
        return "wait"

    def requeue_failed(self, study):
        """Queue again each point whose last trial failed (not diverged) and that nothing runs or waits for."""
        retry = _retry_callback(None)  # a new start of the command: as often as it is started
        for name, ts in _by_run(study.get_trials(deepcopy=False)).items():
            if any(_is_done(t) or t.state.name in ("RUNNING", "WAITING") for t in ts):
                continue
            last = ts[-1]
            if last.state.name == "FAIL":
                retry(study, last)

    # -- one trial
    def objective(self, trial) -> float:
        import optuna

        self.trial_number, self.run, self.reported = trial.number, None, set()
        params = _suggest(trial, self.space, self.sampler)
        run = trial_run(params, self.plan, self.sampler, trial.user_attrs.get("index", trial.number))
        self.run = run
        trial.set_user_attr("index", run.index)
        trial.set_user_attr("run", run.name)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        status, error = self.train(trial, run)
        trial.set_user_attr("status", status)
        if status == "pruned":
            raise optuna.TrialPruned(f"{run.name}: pruned at epoch {max(self.reported, default=0)}")
        if status == "diverged":
            trial.set_user_attr("error", error)
            raise _Diverged(error)
        result = run_result(run, self.output / run.name, status)
        if result["val_accuracy"] is None:
            raise SearchError(f"{run.name} finished without a val accuracy in its metrics.jsonl")
        return float(result["val_accuracy"])

    def report(self, trial, run_dir: Path) -> bool:
        """Report each new epoch's val accuracy (with train.ema, of the better weights); True when the pruner
        says stop."""
        for r in read_metrics(run_dir):
            epoch, acc = r.get("epoch"), (val_figures(r) or {}).get("accuracy")
            if isinstance(epoch, int) and isinstance(acc, (int, float)) and epoch not in self.reported:
                trial.report(float(acc), epoch)
                self.reported.add(epoch)
        return bool(self.pruning and self.reported and trial.should_prune())

    def train(self, trial, run: GridRun) -> Tuple[str, Optional[str]]:
        from ..runs import RunFolderError, clear_folder, ensure_replaceable, mark_folder

        run_cfg, run_dir = run_config(self.cfg, run), self.output / run.name
        while True:
            # a folder that is not ours is refused before anything (even a lock file) is written into it
            if run_status(run_dir, run_cfg, self.manifest) in ("new", "changed"):
                ensure_replaceable(run_dir, "run", hint=_REPLACES_OURS)
            lock = _wait_for_folder(run_dir, self.poll_s, self.say)
            try:
                status = run_status(run_dir, run_cfg, self.manifest)  # under the lock: what another worker left
                if status == "changed" and not self.overwrite:
                    raise RunFolderError(f"{run_dir} holds a run with another config: choose another --output, or "
                                         "pass --overwrite to train it again")
                if status in ("new", "changed"):  # a fresh start: nothing of an earlier attempt stays to mix in
                    ensure_replaceable(run_dir, "run", hint=_REPLACES_OURS)
                    clear_folder(run_dir)
                    mark_folder(run_dir, "run")
            finally:
                lock.release()
            head = f"[trial {trial.number}] {run.name}"
            if status == "finished":
                self.report(trial, run_dir)
                self.say(f"{head}: finished before, not trained again")
                return "finished", None
            if status == "diverged":
                self.say(f"{head}: diverged before")
                return "diverged", _failed_error(run_dir)
            if status == "partial" and self._pruned_elsewhere(trial, run.name):
                return "pruned", None
            self.say(head + (" (resuming its saved state)" if status == "partial" else ""))
            outcome = self._child(trial, run_cfg, run_dir, resume=status == "partial")
            if outcome != "in use":
                return outcome

    def _pruned_elsewhere(self, trial, name: str) -> bool:
        return any(t.number != trial.number and t.state.name == "PRUNED" and t.user_attrs.get("run") == name
                   for t in trial.study.get_trials(deepcopy=False))

    def _child(self, trial, run_cfg: Config, run_dir: Path, *, resume: bool):
        """Train the run in a child process; returns ("finished"|"pruned"|"diverged", error) or "in use"."""
        log = self.output / "logs" / f"{run_dir.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [*_train_command(), "--output", str(run_dir)] + ([] if self.progress else ["--no-progress"])
        with tempfile.TemporaryDirectory(prefix="tinycnn-trial-") as tmp:
            if resume:  # the run's own saved config; a data command is run only when given again now
                cmd.append("--resume")
                if str(run_cfg.data.root).startswith("pipe:"):
                    cmd.append(f"data.root={run_cfg.data.root}")
            else:
                config = Path(tmp) / "config.yaml"
                config.write_text(yaml.safe_dump(run_cfg.to_dict(), sort_keys=False))
                cmd += ["--config", str(config), "--overwrite"]
            with open(log, "a") as f:
                f.write(f"== trial {trial.number}: {' '.join(cmd)}\n")
                f.flush()
                start = f.tell()
                proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env={**os.environ, "COLUMNS": "160"})
                try:
                    while True:
                        try:
                            code = proc.wait(timeout=self.poll_s)
                        except subprocess.TimeoutExpired:
                            code = None
                        if self.report(trial, run_dir) and code is None:
                            _stop_child(proc)  # the child saves its state: the run stays resumable
                            return "pruned", None
                        if code is not None:
                            break
                except BaseException:  # Ctrl-C, SIGTERM, an error here: the child saves its state and stops
                    _stop_child(proc)
                    raise
        if code == 0:
            return "finished", None
        message = _last_message(log, start)
        if "is in use by" in message:  # another worker's run claimed the folder first: wait for it, look again
            return "in use"
        if message.startswith("stopped: loss is"):
            error = message[len("stopped: "):]
            (run_dir / "grid_failed.json").write_text(json.dumps({"error": error}))
            return "diverged", error
        raise SearchError(f"{run_dir.name}: training failed (exit {code}): {message or 'no message'} (log: {log})")

    # -- after a trial
    def after_trial(self, study):
        if self.run is None:
            return
        run, run_dir = self.run, self.output / self.run.name
        trials = [t for t in study.get_trials(deepcopy=False) if t.number == self.trial_number]
        status, error = _trial_status(trials)
        result = run_result(run, run_dir, status, error=error)
        if status == "finished":
            write_hparams(result, run_dir, self.domains, epochs=self.cfg.grid.epochs)
            self.say(f"  best val accuracy {result['val_accuracy']:.2%} (epoch {result['best_epoch']}), "
                     f"val loss {result['val_loss']:.4f}")
        elif status == "diverged":
            self.say(f"  diverged: {error}")
        elif status == "pruned":
            self.say(f"  pruned after epoch {result['epochs']} (val accuracy behind the other trials')")
        self.trial_number, self.run = None, None


def _failed_error(run_dir: Path) -> Optional[str]:
    try:
        error = json.loads((run_dir / "grid_failed.json").read_text(errors="replace")[:4096]).get("error")
    except (OSError, ValueError, AttributeError):
        return None
    return str(error)[:500] if error is not None else None


class _StopSignals:
    """SIGTERM (and SIGHUP) end the worker as Ctrl-C does: the first raises KeyboardInterrupt, later ones are
    ignored while the running child saves its state."""

    def __init__(self):
        self.name: Optional[str] = None
        self._old: Dict[int, Any] = {}

    def _handler(self, signum, frame):
        if self.name is None:
            self.name = signal.Signals(signum).name
            raise KeyboardInterrupt

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGHUP):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def run_grid(cfg: Config, output: Union[str, Path], *, sampler: str = "grid", n_trials: Optional[int] = None,
             pruner: str = "none", storage: Optional[str] = None, study_name: Optional[str] = None,
             heartbeat_interval: Optional[int] = 60, grace_period: Optional[int] = None, progress: bool = True,
             console=None, overwrite: bool = False, poll_s: float = 2.0) -> List[Dict[str, Any]]:
    """Be one worker of the study of cfg.grid (storage: default SQLite in OUTPUT/study.db): take trials until the
    study is done, each trained into OUTPUT/<name> by a child process. Returns the study's sorted results and
    writes the tables after every trial.

    Running it again continues the study: finished runs are never trained again, stopped ones resume. A run folder
    that holds a run with another config is an error before anything trains (overwrite=True trains it again; and
    starts a study of another config again); a run folder that tinycnn did not write is never emptied
    (tinycnn.runs.ensure_replaceable). Ctrl-C or SIGTERM stops the running child (it saves its state), queues
    its trial again, and raises TrainingStopped saying how to continue."""
    from ..runs import RunFolderError, ensure_replaceable
    from ..train import TrainingStopped

    optuna = import_optuna()
    if sampler not in SAMPLERS:
        raise ConfigError(f"--sampler takes one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if pruner not in PRUNERS:
        raise ConfigError(f"--pruner takes one of {', '.join(PRUNERS)}, got {pruner!r}")
    if sampler != "grid" and not (isinstance(n_trials, int) and n_trials > 0):
        raise ConfigError(f"--sampler {sampler} searches until N trials are done: give --n-trials N")
    check_sampler(cfg, sampler)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("the grid search trains each trial in a process of its own: start it with python "
                          "(--gpus / --workers for several at once), not a distributed launcher")
    output = Path(output)
    plan = grid_plan(cfg)
    manifest = read_manifest(cfg.data.root)

    def say(msg: str):
        if console is None:
            print(msg, flush=True)
        else:  # one line per message, as printed: no wrapping, no markup in run names
            console.print(msg, soft_wrap=True, markup=False, highlight=False)

    if sampler == "grid":  # the refusals the grid allows before anything trains
        statuses = {r.name: run_status(output / r.name, run_config(cfg, r), manifest) for r in plan}
        changed = [name for name, status in statuses.items() if status == "changed"]
        if changed and not overwrite:
            raise RunFolderError(f"{output / changed[0]} holds a run with another config ({len(changed)} such run "
                                 "folders): choose another --output, or pass --overwrite to train them again")
        for name, status in statuses.items():  # a run folder trained afresh is emptied first: only if it is ours
            if status in ("new", "changed"):
                ensure_replaceable(output / name, "run", hint=_REPLACES_OURS)
    output.mkdir(parents=True, exist_ok=True)
    url = str(storage or default_storage(output))
    study_name = study_name or default_study_name(sampler)
    store = make_storage(url, heartbeat_interval=heartbeat_interval, grace_period=grace_period)
    study = open_study(store, study_name, cfg, sampler=sampler, pruner=pruner, overwrite=overwrite)
    heartbeat = bool(getattr(store, "heartbeat_interval", None))
    worker = _Worker(cfg, output, plan, manifest, sampler=sampler, n_trials=n_trials, pruning=pruner != "none",
                     overwrite=overwrite, progress=progress, say=say, poll_s=poll_s)
    meta = results_meta(cfg, plan, sampler=sampler, n_trials=n_trials, study_name=study_name, storage=url,
                        pruner=pruner)
    num_classes = manifest["num_classes"]
    if sampler == "grid":
        worker.requeue_failed(study)
    say(f"{'grid search' if sampler == 'grid' else sampler.upper() + ' search'}: "
        f"{len(plan) if sampler == 'grid' else n_trials} trials of {cfg.grid.epochs} epochs into {output}; "
        f"study {study_name!r} in {shown_storage(url)}")
    stop = _StopSignals()
    with stop:
        try:
            while True:
                if heartbeat:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        optuna.storages.fail_stale_trials(study)  # a dead worker's trial: failed, queued again
                state = worker.pending(study)
                if state in ("done", "stuck"):
                    break
                if state == "wait":
                    if not heartbeat:
                        say("the other trials are running in other workers (a journal storage has no heartbeat: "
                            "a worker that died leaves its trial running until the command is run again)")
                        break
                    time.sleep(poll_s)
                    continue
                study.optimize(worker.objective, n_trials=1, catch=(_Diverged,))
                worker.after_trial(study)
                write_results(study_results(study, cfg, output, sampler=sampler, num_classes=num_classes), output,
                              meta=meta)
        except KeyboardInterrupt:
            name = worker.run.name if worker.run else None
            if worker.trial_number is not None:  # its trial is FAIL now: queue it again, its folder resumes
                for t in study.get_trials(deepcopy=False):
                    if t.number == worker.trial_number and t.state.name == "FAIL":
                        _retry_callback(None)(study, t)
            raise TrainingStopped(f"{stop.name or 'Ctrl-C'}" + (f": {name} saved its state" if name else "")
                                  + f"; run the same command again to continue the study ({output})") from None
    results = study_results(study, cfg, output, sampler=sampler, num_classes=num_classes)
    write_results(results, output, meta=meta)
    if state == "stuck":
        failed = [r["name"] for r in results if r["status"] == "failed"]
        say(f"{len(failed)} trials failed (see {output / 'logs'}): run the same command again to retry them")
    return results


# ----------------------------------------------------------------------------- several workers on one machine

def worker_argv(argv: Sequence[str]) -> List[str]:
    """`argv` without --gpus and --workers (and their values): the arguments of one worker."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--gpus", "--workers"):
            skip = True
            continue
        if a.startswith(("--gpus=", "--workers=")):
            continue
        out.append(a)
    return out


def launch_workers(script: Union[str, Path], argv: Sequence[str], output: Union[str, Path], *,
                   gpus: Optional[Sequence[str]] = None, workers: int = 1, console=None) -> List[int]:
    """Start `script argv --no-progress` once per GPU (CUDA_VISIBLE_DEVICES=gpus[i]) or `workers` times on the
    CPU (with an equal share of the cores each), all at once, logs in OUTPUT/logs/worker-<i>.log; they share the
    study. Returns their exit codes. Ctrl-C / SIGTERM stops them (their runs save their state)."""
    say = console.print if console is not None else print
    logs = Path(output) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    n = len(gpus) if gpus else workers
    procs = []
    try:
        for i in range(n):
            cmd = [sys.executable, str(script), *worker_argv(argv), "--no-progress"]
            env = {**os.environ, "COLUMNS": "160"}  # rich wraps a log file's lines at 80 otherwise
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = str(gpus[i])
            elif "OMP_NUM_THREADS" not in os.environ:  # n trainers on the CPU: a share of the cores each
                env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
            log = logs / f"worker-{i}.log"
            f = open(log, "w")
            procs.append((subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT), f, log))
            say(f"worker {i}" + (f" on GPU {gpus[i]}" if gpus else "") + f": log {log}")
        codes = []
        for i, (p, f, log) in enumerate(procs):
            codes.append(p.wait())
            f.close()
            say(f"worker {i} " + ("done" if codes[-1] == 0 else f"failed (exit {codes[-1]}), see {log}"))
        return codes
    except BaseException:
        for p, f, _ in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p, f, _ in procs:
            try:
                p.wait(timeout=330)
            except subprocess.TimeoutExpired:
                p.kill()
            f.close()
        raise


def print_results(results: Sequence[Dict[str, Any]], console=None, title: str = "grid search", top: Optional[int] = None):
    """The sorted results as a rich table; for a grid with seeds its points, mean ± sd (n) over the seeds, ranked
    by the mean (`top`: the best N rows)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    results = list(results)
    seeded = has_seeds(results)
    rows = (aggregate_seeds(results) if seeded else results)[:top]
    # the run name repeats the other columns: on a narrow console only its gs_<index> prefix
    full = console.width >= 150
    columns = [("rank", "#"), ("name", "point" if seeded else "run"), ("lr", "lr"), ("weight_decay", "wd"),
               ("stage_channels", "channels"), ("stage_repeats", "repeats"),
               ("val_accuracy", "val acc, mean ± sd (n)" if seeded else "val acc"),
               ("val_loss", "val loss, mean ± sd (n)" if seeded else "val loss")]
    columns += [] if seeded else [("best_epoch", "epoch")]
    columns = _with_weights(columns, results)
    if not all(r.get("status") == "finished" for r in rows):
        columns.append(("status", "status"))
    table = Table(title=title)
    for key, head in columns:
        table.add_column(head, justify="right" if key not in ("name", "stage_channels", "stage_repeats", "status",
                                                              "weights") else "left", overflow="fold")
    for r in rows:
        style = None if r.get("status") == "finished" else "dim"
        table.add_row(*((r["name"] if full else short_name(r["index"])) if k == "name"
                        else _point_cell(r, k) if seeded else format_value(k, r.get(k)) for k, _ in columns),
                      style=style)
    console.print(table)
    note = evaluation_note(results)
    if note:
        console.print(note, highlight=False, soft_wrap=True)
