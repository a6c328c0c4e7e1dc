"""Grid search (step 4 of the course project's workflow): `run_grid(cfg, output)`.

Every combination of cfg.grid (lr x weight_decay x stage_channels x stage_repeats, in that product
order, the last varying fastest) is one `tinycnn.train.train` run of grid.epochs epochs with the same
seed, in OUTPUT/<name>, named like ``gs_007_lr=0.002_wd=1e-4_ch=64-128-256_rep=2-2-2`` (the 3-digit
index in product order). Runs go one after another on one device; a run whose metrics.jsonl already
holds all its epochs (with the same config) is skipped, an interrupted one resumes from its saved
state, so a stopped grid continues where it was. A run whose loss goes NaN is recorded as diverged and
the grid goes on.

After each run the table of results, sorted by best val accuracy, is written as OUTPUT/results.md,
OUTPUT/results.csv and OUTPUT/results.json, and each run's hparams and final metrics go to
OUTPUT/<name>/tb/hparams for TensorBoard's HParams view (`tensorboard --logdir OUTPUT`).
`load_results(OUTPUT)` reads a grid's results back (the tables, else the run folders); a run's settings
come from its config.yaml, never from its name.

Spreading: `part=(i, n)` runs the slice plan[i::n] (tables OUTPUT/results-part-<i>-of-<n>.*);
`launch_parts` starts one such process per GPU and `collect_results` merges every run's folder into
the full table.
"""
import csv
import dataclasses
import io
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import yaml

from .config import MAX_GRID_RUNS, Config, ConfigError, flatten, from_dict, read_yaml
from .formatting import count, dashed, number, percent
from .storage import read_manifest

__all__ = ["GridRun", "format_lr", "format_wd", "format_value", "short_name", "run_name", "is_run_folder", "grid_plan",
           "run_config", "parse_part", "select_part", "expected_steps", "read_metrics", "best_record", "run_status",
           "run_result", "sort_results", "results_markdown", "write_results", "load_results", "write_hparams",
           "results_meta", "run_grid", "collect_results", "child_argv", "launch_parts", "print_results",
           "RESULT_COLUMNS"]

RESULT_COLUMNS = ["rank", "index", "name", "lr", "weight_decay", "stage_channels", "stage_repeats", "num_parameters",
                  "val_accuracy", "val_loss", "best_epoch", "epochs", "final_train_loss", "status"]

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


def run_name(index: int, lr: float, weight_decay: float, stage_channels: Sequence[int],
             stage_repeats: Sequence[int]) -> str:
    """gs_<3-digit index>_lr=<lr>_wd=<wd>_ch=<c1-c2-..>_rep=<r1-r2-..>: written, never parsed back."""
    return (f"{short_name(index)}_lr={format_lr(lr)}_wd={format_wd(weight_decay)}"
            f"_ch={dashed(stage_channels)}_rep={dashed(stage_repeats)}")


def is_run_folder(path: Union[str, Path]) -> bool:
    """A grid run's folder: named gs_..., holding the run's metrics.jsonl."""
    path = Path(path)
    return path.name.startswith("gs_") and (path / "metrics.jsonl").is_file()


@dataclass(frozen=True)
class GridRun:
    index: int
    name: str
    lr: float
    weight_decay: float
    stage_channels: Tuple[int, ...]
    stage_repeats: Tuple[int, ...]


def _options(grid: Dict[str, Any], key: str, nested: bool) -> List[Any]:
    value = grid[key]
    if not isinstance(value, (list, tuple)):
        value = [value]
    if nested and value and all(isinstance(v, int) for v in value):  # one option written flat: [64, 128, 256]
        value = [value]
    if not value:
        raise ValueError(f"grid.{key} is empty: give at least one value")
    for v in value:
        if nested:
            if not isinstance(v, (list, tuple)) or not v or not all(isinstance(c, int) and c > 0 for c in v):
                raise ValueError(f"grid.{key} holds lists of positive integers (one per stage), got {v!r}")
        elif not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 or (key == "lr" and v <= 0):
            raise ValueError(f"grid.{key} holds {'positive' if key == 'lr' else 'non-negative'} numbers, got {v!r}")
    return [tuple(int(c) for c in v) for v in value] if nested else [float(v) for v in value]


def grid_plan(cfg: Config) -> List[GridRun]:
    """Every combination of cfg.grid, in product order (lr, weight_decay, stage_channels, stage_repeats)."""
    g = dataclasses.asdict(cfg.grid)
    epochs = g.get("epochs")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"grid.epochs must be a positive integer, got {epochs!r}")
    lrs, wds = _options(g, "lr", False), _options(g, "weight_decay", False)
    chs, reps = _options(g, "stage_channels", True), _options(g, "stage_repeats", True)
    if len(lrs) * len(wds) * len(chs) * len(reps) > MAX_GRID_RUNS:
        raise ValueError(f"grid: {len(lrs) * len(wds) * len(chs) * len(reps):,} combinations; at most "
                         f"{MAX_GRID_RUNS:,} in one grid search")
    plan = []
    for i, (lr, wd, ch, rep) in enumerate(itertools.product(lrs, wds, chs, reps)):
        if len(ch) != len(rep):
            raise ValueError(f"grid: stage_channels {list(ch)} and stage_repeats {list(rep)} have different "
                             "numbers of stages; every combination needs one repeat per stage")
        plan.append(GridRun(i, run_name(i, lr, wd, ch, rep), lr, wd, ch, rep))
    if len({r.name for r in plan}) != len(plan):
        raise ValueError("grid: two combinations get the same run name (duplicate values in grid.*?)")
    return plan


def run_config(cfg: Config, run: GridRun) -> Config:
    """cfg with the run's lr, weight decay, widths and depths, grid.epochs epochs, and its name."""
    return cfg.replace([f"train.optimizer.lr={run.lr!r}", f"train.optimizer.weight_decay={run.weight_decay!r}",
                        f"stage_channels={list(run.stage_channels)}", f"stage_repeats={list(run.stage_repeats)}",
                        f"train.epochs={cfg.grid.epochs}", f"run_name={run.name}"])


def parse_part(text: str) -> Tuple[int, int]:
    """'i/N' (0 <= i < N) -> (i, N)."""
    try:
        i, n = (int(v) for v in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--part takes i/N with 0 <= i < N (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--part takes i/N with 0 <= i < N (e.g. 0/4), got {text!r}")
    return i, n


def select_part(plan: Sequence[GridRun], part: Optional[Tuple[int, int]]) -> List[GridRun]:
    """The runs of part (i, N): plan[i::N] (all of them for None)."""
    if part is None:
        return list(plan)
    i, n = part
    return list(plan[i::n])


# ----------------------------------------------------------------------------- run state and results

def expected_steps(run_cfg: Config, manifest: Dict[str, Any], world_size: int = 1) -> Tuple[int, int]:
    """(epochs, optimizer steps) that train() runs for run_cfg (the same arithmetic as train())."""
    from .plan import RunPlan

    t, subset = run_cfg.train, RunPlan.from_config(run_cfg).train_subset
    n = manifest["splits"][run_cfg.data.train_split]["num_samples"]
    if subset is not None:
        n = min(n, subset)
    steps_per_epoch = n // (t.batch_size * world_size) // t.grad_accum_steps
    if steps_per_epoch < 1:
        raise ValueError(f"{n} training samples make no optimizer step of batch {t.batch_size} x "
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


def best_record(records: Sequence[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The epoch record with the best val accuracy (the first of equals), None when no epoch was evaluated."""
    evals = [r for r in records if r.get("val/accuracy") is not None]
    return max(evals, key=lambda r: r["val/accuracy"]) if evals else None


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
    """One row of the table: the run's settings and its best val accuracy (with that epoch's val loss)."""
    records = read_metrics(run_dir)
    best = best_record(records)
    if error is None and status == "diverged":
        try:
            error = json.loads((Path(run_dir) / "grid_failed.json").read_text()).get("error")
        except (OSError, json.JSONDecodeError):
            pass
    return {
        "index": run.index, "name": run.name, "lr": run.lr, "weight_decay": run.weight_decay,
        "stage_channels": list(run.stage_channels), "stage_repeats": list(run.stage_repeats),
        "num_parameters": num_parameters,
        "val_accuracy": best["val/accuracy"] if best else None,
        "val_loss": best.get("val/loss") if best else None,
        "val_top5": best.get("val/top5") if best else None,
        "best_epoch": best["epoch"] if best else None,
        "epochs": records[-1]["epoch"] if records else 0,
        "steps": records[-1].get("step") if records else 0,
        "final_train_loss": records[-1].get("train/loss") if records else None,
        "status": status, "error": error, "output": str(run_dir),
    }


def sort_results(results: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Best val accuracy first; equal accuracy: lower val loss first; runs without a result last; then by index.
    Adds `rank` (1-based)."""
    def key(r):
        acc, loss = r.get("val_accuracy"), r.get("val_loss")
        return (acc is None, -(acc or 0.0), loss if loss is not None else math.inf, r["index"])
    out = [dict(r) for r in sorted(results, key=key)]
    for rank, r in enumerate(out, 1):
        r["rank"] = rank
    return out


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
    return str(value)


_MD_COLUMNS = [("rank", "#"), ("name", "run"), ("lr", "lr"), ("weight_decay", "weight decay"),
               ("stage_channels", "channels"), ("stage_repeats", "repeats"), ("num_parameters", "parameters"),
               ("val_accuracy", "val accuracy"), ("val_loss", "val loss"), ("best_epoch", "best epoch"),
               ("status", "status")]


def results_markdown(results: Sequence[Dict[str, Any]], title: Optional[str] = None) -> str:
    """A Markdown table of (sorted) results."""
    right = {"rank", "lr", "weight_decay", "num_parameters", "val_accuracy", "val_loss", "best_epoch"}
    lines = [f"# {title}", ""] if title else []
    lines.append("| " + " | ".join(h for _, h in _MD_COLUMNS) + " |")
    lines.append("|" + "|".join("---:" if k in right else "---" for k, _ in _MD_COLUMNS) + "|")
    for r in results:
        lines.append("| " + " | ".join(format_value(k, r.get(k)).replace("|", "\\|") for k, _ in _MD_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write_results(results: Sequence[Dict[str, Any]], output: Union[str, Path], stem: str = "results",
                  meta: Optional[Dict[str, Any]] = None) -> Dict[str, Path]:
    """OUTPUT/<stem>.md, .csv and .json of the results, sorted by best val accuracy."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    rows = sort_results(results)
    meta = dict(meta or {})
    title = meta.pop("title", None)
    done = sum(r["val_accuracy"] is not None for r in rows)
    md = results_markdown(rows, title)
    md += f"\n{done} of {len(rows)} runs have a val accuracy; sorted by best val accuracy (the epoch's val loss beside it).\n"
    paths = {"md": output / f"{stem}.md", "csv": output / f"{stem}.csv", "json": output / f"{stem}.json"}
    paths["md"].write_text(md)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(RESULT_COLUMNS)
    for r in rows:
        w.writerow(["" if r.get(k) is None else dashed(r[k]) if k in ("stage_channels", "stage_repeats") else r[k]
                    for k in RESULT_COLUMNS])
    paths["csv"].write_text(buf.getvalue())
    paths["json"].write_text(json.dumps({**meta, "num_runs": len(rows), "results": rows,
                                         "best": rows[0] if rows and rows[0]["val_accuracy"] is not None else None},
                                        indent=1))
    return paths


def load_results(output: Union[str, Path]) -> Dict[str, Any]:
    """The results of the grid search in OUTPUT, as it left them: results.json, else the parts' tables
    (results-part-*.json) merged, else results.csv, else each gs_* run folder read with `run_result`.

    Returns results.json's fields (title, grid, base, runs_planned, ... when recorded) with `results`:
    the rows sorted by best val accuracy, and `source`: the files they were read from."""
    output = Path(output)
    if (output / "results.json").is_file():
        data = json.loads((output / "results.json").read_text())
        return {**data, "results": sort_results(data.get("results") or []), "source": "results.json"}
    parts = sorted(output.glob("results-part-*.json"))
    if parts:
        tables = [json.loads(p.read_text()) for p in parts]
        rows = [r for t in tables for r in t.get("results") or []]
        return {**tables[0], "results": sort_results(rows), "source": ", ".join(p.name for p in parts)}
    if (output / "results.csv").is_file():
        return {"results": sort_results(_read_csv(output / "results.csv")), "source": "results.csv"}
    return {"results": sort_results(_results_from_folders(output)), "source": "the gs_* run folders"}


def _read_csv(path: Path) -> List[Dict[str, Any]]:
    def num(text: str, kind=float):
        return kind(text) if text not in (None, "") else None

    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            rows.append({"index": int(r["index"]), "name": r["name"], "lr": float(r["lr"]),
                         "weight_decay": float(r["weight_decay"]),
                         "stage_channels": [int(v) for v in r["stage_channels"].split("-")],
                         "stage_repeats": [int(v) for v in r["stage_repeats"].split("-")],
                         "num_parameters": num(r.get("num_parameters"), int),
                         "val_accuracy": num(r.get("val_accuracy")), "val_loss": num(r.get("val_loss")),
                         "best_epoch": num(r.get("best_epoch"), int), "epochs": num(r.get("epochs"), int),
                         "final_train_loss": num(r.get("final_train_loss")), "status": r.get("status") or None})
    return rows


def _results_from_folders(output: Path) -> List[Dict[str, Any]]:
    """A row for every gs_* folder whose config.yaml places it in its grid (the plan of the grid it records)."""
    rows = []
    for run_dir in sorted(p for p in output.iterdir() if is_run_folder(p)):
        try:
            saved = from_dict(read_yaml(run_dir / "config.yaml"))
            run = next(r for r in grid_plan(saved) if r.name == run_dir.name)
        except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError, StopIteration):
            continue  # not a run of a grid (or one renamed): nothing says what it tried
        diverged = (run_dir / "grid_failed.json").is_file()
        status = "diverged" if diverged else "finished" if best_record(read_metrics(run_dir)) else "incomplete"
        rows.append(run_result(run, run_dir, status))
    return rows


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
    from .plan import build_model
    key = (cfg.model, run.stage_channels, run.stage_repeats, num_classes)
    if key not in _PARAMS_CACHE:
        try:
            model = build_model(run_config(cfg, run), num_classes)
            _PARAMS_CACHE[key] = sum(p.numel() for p in model.parameters())
        except Exception:  # noqa: BLE001 - the table can do without it
            _PARAMS_CACHE[key] = None
    return _PARAMS_CACHE[key]


# ----------------------------------------------------------------------------- running

def results_meta(cfg: Config, plan: Sequence[GridRun],
                 part: Optional[Tuple[int, int]] = None) -> Dict[str, Any]:
    """What the results tables record besides the rows: title, the grid, the base settings, runs planned."""
    title = "Grid search" + (f" (part {part[0]} of {part[1]})" if part else "")
    t = cfg.train
    return {"title": title, "grid": dataclasses.asdict(cfg.grid), "part": list(part) if part else None,
            "base": {"model": cfg.model, "optimizer": t.optimizer.name, "batch_size": t.batch_size,
                     "epochs": cfg.grid.epochs, "max_steps": t.max_steps, "seed": t.seed,
                     "scheduler": t.scheduler.name, "data": cfg.data.root},
            "runs_planned": len(plan)}


def collect_results(cfg: Config, output: Union[str, Path], plan: Optional[Sequence[GridRun]] = None,
                    world_size: int = 1) -> List[Dict[str, Any]]:
    """Results of `plan` (default: the whole grid) read from their folders in OUTPUT (the merge of parts)."""
    output = Path(output)
    plan = grid_plan(cfg) if plan is None else plan
    manifest = read_manifest(cfg.data.root)
    results = []
    for run in plan:
        run_cfg = run_config(cfg, run)
        status = run_status(output / run.name, run_cfg, manifest, world_size)
        status = {"new": "missing", "partial": "incomplete", "changed": "other config"}.get(status, status)
        results.append(run_result(run, output / run.name, status,
                                  _num_parameters(cfg, run, manifest["num_classes"])))
    return sort_results(results)


_REPLACES_OURS = "the grid search trains afresh only in run folders tinycnn wrote"


def run_grid(cfg: Config, output: Union[str, Path], *, part: Optional[Tuple[int, int]] = None,
             progress: bool = True, console=None, overwrite: bool = False,
             make_accelerator: Optional[Callable[..., Any]] = None) -> List[Dict[str, Any]]:
    """Train every run of the grid (or of `part`) one after another into OUTPUT/<name>; returns the sorted
    results of those runs and writes the tables (OUTPUT/results.* or OUTPUT/results-part-<i>-of-<n>.*).

    Re-running continues the grid: finished runs are skipped, stopped ones resumed. A run folder that holds
    a run with another config is an error before anything trains (overwrite=True trains it again); a run folder
    that tinycnn did not write is never emptied (tinycnn.runs.ensure_replaceable). Each run folder is locked
    while it trains (tinycnn.runs), so two processes never train the same run."""
    from .device import make_accelerator as default_make_accelerator
    from .runs import RunFolderError, RunLock, clear_folder, ensure_replaceable, mark_folder
    from .train import TrainingStopped, train

    make_accelerator = make_accelerator or default_make_accelerator
    output = Path(output)
    plan = grid_plan(cfg)
    mine = select_part(plan, part)
    base = make_accelerator(cfg, log=False)
    world, main = base.num_processes, base.is_main_process
    manifest = read_manifest(cfg.data.root)
    num_classes = manifest["num_classes"]
    domains = _domains(plan)
    stem = f"results-part-{part[0]}-of-{part[1]}" if part else "results"
    meta = results_meta(cfg, plan, part)
    def say(msg: str):
        if not main:
            return
        if console is None:
            print(msg, flush=True)
        else:  # one line per message, as printed: no wrapping, no markup in run names
            console.print(msg, soft_wrap=True, markup=False, highlight=False)
    if main:
        output.mkdir(parents=True, exist_ok=True)
    statuses = {r.name: run_status(output / r.name, run_config(cfg, r), manifest, world) for r in mine}
    changed = [name for name, status in statuses.items() if status == "changed"]
    if changed and not overwrite:
        raise RunFolderError(f"{output / changed[0]} holds a run with another config ({len(changed)} such run "
                             "folders): choose another --output, or pass --overwrite to train them again")
    for name, status in statuses.items():  # a run folder trained afresh is emptied first: only if it is ours
        if status in ("new", "changed"):
            ensure_replaceable(output / name, "run", hint=_REPLACES_OURS)
    say(f"grid search: {len(plan)} runs of {cfg.grid.epochs} epochs"
        + (f", part {part[0]}/{part[1]}: {len(mine)} of them" if part else "") + f", into {output}")

    results: List[Dict[str, Any]] = []
    for k, run in enumerate(mine, 1):
        run_cfg, run_dir = run_config(cfg, run), output / run.name
        base.wait_for_everyone()  # every process decides on the same files
        status = run_status(run_dir, run_cfg, manifest, world)
        params = _num_parameters(cfg, run, num_classes)
        if status in ("finished", "diverged"):
            say(f"[{k}/{len(mine)}] {run.name}: {status} before, skipped")
            results.append(run_result(run, run_dir, status, params))
            continue
        if status == "changed":
            say(f"[{k}/{len(mine)}] {run.name}: its folder holds another config, training it again (--overwrite)")
        else:
            say(f"[{k}/{len(mine)}] {run.name}" + (" (resuming)" if status == "partial" else ""))
        lock = RunLock(run_dir).acquire() if main else None
        if main:
            try:
                if status in ("new", "changed"):  # a fresh start: nothing of an earlier attempt stays to mix in
                    ensure_replaceable(run_dir, "run", hint=_REPLACES_OURS)  # again, under the lock
                    clear_folder(run_dir)
                mark_folder(run_dir, "run")
            except BaseException:
                lock.release()
                raise
        accelerator = make_accelerator(run_cfg, run_dir)
        error = None
        try:
            train(run_cfg, run_dir, resume=status == "partial", accelerator=accelerator, progress=progress,
                  end_training=False)
            status = "finished"
        except TrainingStopped as e:
            if not str(e).startswith("loss is"):
                raise  # a stop signal: the grid stops too (re-run to continue)
            status, error = "diverged", str(e)
            if main:
                (run_dir / "grid_failed.json").write_text(json.dumps({"error": error}))
            say(f"  diverged: {error}")
        finally:
            accelerator.free_memory()
            del accelerator
            if lock is not None:
                lock.release()
        result = run_result(run, run_dir, status, params, error)
        results.append(result)
        if main:
            write_hparams(result, run_dir, domains, epochs=cfg.grid.epochs)
            write_results(results, output, stem, meta)
            if result["val_accuracy"] is not None:
                say(f"  best val accuracy {result['val_accuracy']:.2%} (epoch {result['best_epoch']}), "
                    f"val loss {result['val_loss']:.4f}")
    base.wait_for_everyone()
    if main:
        write_results(results, output, stem, meta)
    return sort_results(results)


# ----------------------------------------------------------------------------- several GPUs

def child_argv(argv: Sequence[str]) -> List[str]:
    """`argv` without --gpus (and its value) and --part: the arguments a part process gets."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--gpus", "--part"):
            skip = True
            continue
        if a.startswith(("--gpus=", "--part=")):
            continue
        out.append(a)
    return out


def launch_parts(script: Union[str, Path], argv: Sequence[str], gpus: Sequence[str], output: Union[str, Path],
                 console=None) -> List[int]:
    """Run `script argv --part i/N --no-progress` once per GPU, with CUDA_VISIBLE_DEVICES=gpus[i], all at
    once; logs in OUTPUT/logs/part-<i>-of-<N>.log. Returns the exit codes (in part order)."""
    say = console.print if console is not None else print
    logs = Path(output) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    n = len(gpus)
    procs = []
    try:
        for i, gpu in enumerate(gpus):
            cmd = [sys.executable, str(script), *child_argv(argv), "--part", f"{i}/{n}", "--no-progress"]
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
            env["COLUMNS"] = "160"  # rich wraps a log file's lines at 80 otherwise
            log = logs / f"part-{i}-of-{n}.log"
            f = open(log, "w")
            procs.append((subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT), f, log))
            say(f"part {i}/{n} on GPU {gpu}: log {log}")
        codes = []
        for i, (p, f, log) in enumerate(procs):
            codes.append(p.wait())
            f.close()
            say(f"part {i}/{n} " + ("done" if codes[-1] == 0 else f"failed (exit {codes[-1]}), see {log}"))
        return codes
    except BaseException:
        for p, f, _ in procs:  # Ctrl-C / SIGTERM: stop the parts (they save resumable state)
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p, f, _ in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
            f.close()
        raise


def print_results(results: Sequence[Dict[str, Any]], console=None, title: str = "grid search", top: Optional[int] = None):
    """The sorted results as a rich table."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    results = list(results)[:top]
    # the run name repeats the other columns: on a narrow console only its gs_<index> prefix
    full = console.width >= 150
    columns = [("rank", "#"), ("name", "run"), ("lr", "lr"), ("weight_decay", "wd"), ("stage_channels", "channels"),
               ("stage_repeats", "repeats"), ("val_accuracy", "val acc"), ("val_loss", "val loss"),
               ("best_epoch", "epoch")]
    if not all(r.get("status") == "finished" for r in results):
        columns.append(("status", "status"))
    table = Table(title=title)
    for key, head in columns:
        table.add_column(head, justify="right" if key not in ("name", "stage_channels", "stage_repeats", "status")
                         else "left", overflow="fold")
    for r in results:
        style = None if r.get("status") == "finished" else "dim"
        table.add_row(*((r["name"] if full else short_name(r["index"])) if k == "name" else format_value(k, r.get(k))
                        for k, _ in columns), style=style)
    console.print(table)
