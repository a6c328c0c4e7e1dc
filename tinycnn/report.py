"""An experiment report like the course project's, built from the outputs of the other recipes: `build_report`.

    build_report(["checkpoints/"], "report/")       # -> report/report.md + report/figures/*.png

Each input is a folder (or file) written by a recipe; `detect` tells which by the files it holds:

    kind          holds                                             written by
    shards        manifest.json                                     tinycnn-prepare
    checks        checks.json (+ augment_grid.png)                  recipes/checks.py
    lr_finder     lr_finder.json or lr_finder.csv                   recipes/lr_finder.py
    grid          results.json/.csv/.md or gs_###_* run folders     recipes/grid_search.py
    run           metrics.jsonl (+ config.yaml, run.json, *.safetensors)   recipes/train.py
    evaluation    a JSON file with accuracy and per_class           recipes/evaluate.py --json
A folder that is none of these is searched below (so the parent folder of all outputs works too).

Sections, as in the course report: Data, Model, Overfit run, LR finder, Grid search, Full training,
Final evaluation, Reproducibility. A section whose input is missing says so and names the recipe that
writes it. Nothing is trained or evaluated again: the report reads JSON/YAML/CSV files, and builds the
model once (timm, forward hooks on a (1, 3, 64, 64) input) for the layer table. Plots need matplotlib
(`pip install "tinycnn[report]"`) and use its Agg canvas without pyplot.
"""
import csv
import json
import math
import re
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import yaml

__all__ = ["ReportError", "SECTIONS", "KINDS", "Inputs", "detect", "collect", "load_run", "load_grid",
           "load_lr_finder", "hyperparameter_effects", "layer_table", "holdout_note", "class_extremes",
           "build_report", "REPORT_HINT"]

REPORT_HINT = 'pip install "tinycnn[report]"'
SECTIONS = ["Data", "Model", "Overfit run", "LR finder", "Grid search", "Full training", "Final evaluation",
            "Reproducibility"]
KINDS = ("shards", "checks", "lr_finder", "grid", "run", "evaluation")
HPARAMS = [("lr", "learning rate"), ("weight_decay", "weight decay"), ("stage_channels", "channels"),
           ("stage_repeats", "repeats per stage")]

FIGSIZE, DPI = (7, 4), 120
_GRID_RUN = re.compile(r"^gs_(\d{3})_lr=([^_]+)_wd=([^_]+)_ch=([\d-]+)_rep=([\d-]+)$")
_SKIP_DIRS = {"tb", "state", "logs", "figures", "__pycache__"}
_MAX_DEPTH = 4


class ReportError(RuntimeError):
    """The report cannot be built (an input path that does not exist, matplotlib missing)."""


# ============================================================================= finding the inputs

@dataclass
class Inputs:
    """What was found among the paths given, by kind (paths: folders, or JSON files for evaluations)."""
    shards: List[Path] = field(default_factory=list)
    checks: List[Path] = field(default_factory=list)
    lr_finder: List[Path] = field(default_factory=list)
    grid: List[Path] = field(default_factory=list)
    run: List[Path] = field(default_factory=list)
    evaluation: List[Path] = field(default_factory=list)
    unrecognized: List[Path] = field(default_factory=list)

    def add(self, kind: str, path: Path):
        items = getattr(self, kind)
        if all(p.resolve() != path.resolve() for p in items):
            items.append(path)

    def __len__(self):
        return sum(len(getattr(self, k)) for k in KINDS)


def _read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def is_evaluation(path: Union[str, Path]) -> bool:
    """A JSON file written by recipes/evaluate.py --json (accuracy and per_class at its top)."""
    path = Path(path)
    if path.suffix.lower() != ".json" or not path.is_file() or path.stat().st_size > 64 << 20:
        return False
    try:
        data = _read_json(path)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "accuracy" in data and isinstance(data.get("per_class"), list)


def _is_grid_run_dir(path: Path) -> bool:
    return path.is_dir() and _GRID_RUN.match(path.name) is not None and (path / "metrics.jsonl").is_file()


def detect(path: Union[str, Path]) -> List[Tuple[str, Path]]:
    """The (kind, path) items `path` itself is (see the module docstring); [] when it is none of them.

    A file is classified by its name (manifest.json, checks.json, lr_finder.json/.csv, results.json,
    metrics.jsonl, config.yaml: the folder holding it) or, for other JSON, by its content (evaluation).
    A folder can be several kinds (e.g. checks and an LR finder written to the same folder); evaluation
    JSON files directly inside it are items of their own."""
    path = Path(path)
    if path.is_file():
        name = path.name
        by_name = {"manifest.json": "shards", "checks.json": "checks", "lr_finder.json": "lr_finder",
                   "lr_finder.csv": "lr_finder", "results.json": "grid", "results.csv": "grid",
                   "metrics.jsonl": "run", "config.yaml": "run", "run.json": "run"}
        if name in by_name:
            return [(by_name[name], path.parent)]
        return [("evaluation", path)] if is_evaluation(path) else []
    if not path.is_dir():
        return []
    names = {p.name for p in path.iterdir()}
    found = []
    if "manifest.json" in names:
        found.append(("shards", path))
    if "checks.json" in names:
        found.append(("checks", path))
    if names & {"lr_finder.json", "lr_finder.csv"}:
        found.append(("lr_finder", path))
    grid_tables = names & {"results.json", "results.csv"} or any(n.startswith("results-part-") for n in names)
    if grid_tables or any(_is_grid_run_dir(path / n) for n in names if n.startswith("gs_")):
        found.append(("grid", path))
    if "metrics.jsonl" in names or ("config.yaml" in names and any(n.endswith(".safetensors") for n in names)):
        found.append(("run", path))
    for n in sorted(names):
        if n.endswith(".json") and n not in ("checks.json", "lr_finder.json", "results.json", "run.json",
                                             "manifest.json", "_info.json") and is_evaluation(path / n):
            found.append(("evaluation", path / n))
    return found


def collect(paths: Sequence[Union[str, Path]]) -> Inputs:
    """Every item under `paths`: each path is detected; a folder that is no kind of output folder itself
    is searched below (up to 4 levels; tb/, state/, logs/ and hidden folders are skipped)."""
    inputs = Inputs()

    def visit(p: Path, depth: int) -> bool:
        found = detect(p)
        for kind, item in found:
            inputs.add(kind, item)
        below = False
        if p.is_dir() and not any(k != "evaluation" for k, _ in found) and depth < _MAX_DEPTH:
            for c in sorted(p.iterdir()):
                if c.is_dir() and not c.name.startswith(".") and c.name not in _SKIP_DIRS:
                    below = visit(c, depth + 1) or below
        return bool(found) or below

    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            raise ReportError(f"{raw}: no such file or folder")
        if not visit(p, 0) and p not in inputs.unrecognized:
            inputs.unrecognized.append(p)
    return inputs


# ============================================================================= reading the inputs

def _read_yaml(path: Path) -> Optional[Dict[str, Any]]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def _read_metrics(run_dir: Path) -> List[Dict[str, Any]]:
    from .grid import read_metrics
    return read_metrics(run_dir)


def _checkpoint_meta(run_dir: Path) -> Tuple[Optional[Path], Optional[Dict[str, Any]]]:
    from .weights import WeightsError, read_metadata
    for name in ("best.safetensors", "last.safetensors"):
        path = run_dir / name
        if path.is_file():
            try:
                return path, read_metadata(path)
            except (WeightsError, OSError, ValueError):
                continue
    return None, None


def load_run(run_dir: Union[str, Path]) -> Dict[str, Any]:
    """A training run folder: config, per-epoch metrics, run.json, the checkpoint's metadata, and its kind
    ('overfit' when config.yaml has train.overfit_small: true, else 'full')."""
    run_dir = Path(run_dir)
    config = _read_yaml(run_dir / "config.yaml")
    info = None
    if (run_dir / "run.json").is_file():
        try:
            info = _read_json(run_dir / "run.json")
        except (OSError, ValueError):
            info = None
    checkpoint, meta = _checkpoint_meta(run_dir)
    overfit = bool(config and (config.get("train") or {}).get("overfit_small"))
    return {"name": run_dir.name, "path": run_dir, "config": config, "metrics": _read_metrics(run_dir),
            "info": info, "checkpoint": checkpoint, "meta": meta, "kind": "overfit" if overfit else "full"}


def _dashed_to_list(text: Any) -> Optional[List[int]]:
    if isinstance(text, (list, tuple)):
        return [int(v) for v in text]
    if text in (None, ""):
        return None
    return [int(v) for v in str(text).split("-")]


def _float_or_none(v: Any) -> Optional[float]:
    try:
        return None if v in (None, "") else float(v)
    except (TypeError, ValueError):
        return None


def _grid_rows_from_csv(path: Path) -> List[Dict[str, Any]]:
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            rows.append({"index": int(r["index"]), "name": r["name"], "lr": float(r["lr"]),
                         "weight_decay": float(r["weight_decay"]),
                         "stage_channels": _dashed_to_list(r["stage_channels"]),
                         "stage_repeats": _dashed_to_list(r["stage_repeats"]),
                         "num_parameters": int(r["num_parameters"]) if r.get("num_parameters") else None,
                         "val_accuracy": _float_or_none(r.get("val_accuracy")),
                         "val_loss": _float_or_none(r.get("val_loss")),
                         "best_epoch": int(r["best_epoch"]) if r.get("best_epoch") else None,
                         "epochs": int(r["epochs"]) if r.get("epochs") else None,
                         "final_train_loss": _float_or_none(r.get("final_train_loss")),
                         "status": r.get("status") or None})
    return rows


def _grid_rows_from_folders(grid_dir: Path) -> List[Dict[str, Any]]:
    rows = []
    for d in sorted(grid_dir.iterdir()):
        m = _GRID_RUN.match(d.name)
        if not (m and d.is_dir()):
            continue
        records = _read_metrics(d)
        evals = [r for r in records if r.get("val/accuracy") is not None]
        best = max(evals, key=lambda r: r["val/accuracy"]) if evals else None
        rows.append({"index": int(m[1]), "name": d.name, "lr": float(m[2]), "weight_decay": float(m[3]),
                     "stage_channels": _dashed_to_list(m[4]), "stage_repeats": _dashed_to_list(m[5]),
                     "num_parameters": None, "val_accuracy": best["val/accuracy"] if best else None,
                     "val_loss": best.get("val/loss") if best else None, "best_epoch": best["epoch"] if best else None,
                     "epochs": records[-1]["epoch"] if records else 0,
                     "final_train_loss": records[-1].get("train/loss") if records else None,
                     "status": "diverged" if (d / "grid_failed.json").is_file() else
                               ("finished" if best else "incomplete")})
    return rows


def load_grid(grid_dir: Union[str, Path]) -> Dict[str, Any]:
    """A grid search folder: its sorted rows (results.json, else the results-part-* tables, else results.csv,
    else the gs_* run folders) with each run's per-epoch metrics, and the base settings when recorded."""
    from .grid import sort_results

    grid_dir = Path(grid_dir)
    meta, rows, source = {}, None, None
    if (grid_dir / "results.json").is_file():
        meta = _read_json(grid_dir / "results.json")
        rows, source = meta.get("results") or [], "results.json"
    else:
        parts = sorted(grid_dir.glob("results-part-*.json"))
        if parts:
            rows, source = [], ", ".join(p.name for p in parts)
            for p in parts:
                part = _read_json(p)
                meta = meta or part
                rows += part.get("results") or []
        elif (grid_dir / "results.csv").is_file():
            rows, source = _grid_rows_from_csv(grid_dir / "results.csv"), "results.csv"
    if not rows:
        rows, source = _grid_rows_from_folders(grid_dir), "the gs_* run folders"
    rows = sort_results(rows)
    for r in rows:
        r["metrics"] = _read_metrics(grid_dir / r["name"])
    return {"name": grid_dir.name, "path": grid_dir, "rows": rows, "base": meta.get("base"),
            "grid": meta.get("grid"), "runs_planned": meta.get("runs_planned"), "source": source,
            "run_info": next((_read_json(grid_dir / r["name"] / "run.json") for r in rows
                              if (grid_dir / r["name"] / "run.json").is_file()), None)}


def load_lr_finder(folder: Union[str, Path]) -> Dict[str, Any]:
    """lr_finder.json, or the points of lr_finder.csv with the suggestion recomputed from them."""
    from .lr_finder import suggest_lr

    folder = Path(folder)
    if (folder / "lr_finder.json").is_file():
        result = _read_json(folder / "lr_finder.json")
        result["source"] = "lr_finder.json"
    else:
        points = []
        with open(folder / "lr_finder.csv", newline="") as f:
            for r in csv.DictReader(f):
                points.append({"step": int(r["step"]), "lr": float(r["lr"]), "loss": _float_or_none(r["loss"]),
                               "smoothed_loss": _float_or_none(r["smoothed_loss"])})
        lrs = [p["lr"] for p in points]
        result = {"points": points, "num_points": len(points),
                  "suggested_lr": suggest_lr(lrs, [p["smoothed_loss"] if p["smoothed_loss"] is not None
                                                   else float("nan") for p in points]),
                  "min_lr": min(lrs) if lrs else None, "max_lr": max(lrs) if lrs else None,
                  "source": "lr_finder.csv (the suggestion recomputed from its smoothed loss)"}
    result["name"], result["path"] = folder.name, folder
    return result


# ============================================================================= pure helpers

def _value_label(key: str, value: Any) -> str:
    from .grid import format_lr, format_wd
    if key == "lr":
        return format_lr(value)
    if key == "weight_decay":
        return format_wd(value)
    return "-".join(str(int(v)) for v in value)


def hyperparameter_effects(rows: Sequence[Dict[str, Any]]) -> Dict[str, List[Dict[str, Any]]]:
    """Per hyperparameter (lr, weight_decay, stage_channels, stage_repeats), per value: the runs with that
    value, how many have a val accuracy, their mean and best val accuracy (None when none has one).
    Values in ascending order; runs without a result (diverged, missing) count in `runs` only."""
    out = {}
    for key, _ in HPARAMS:
        groups: Dict[Any, List[Optional[float]]] = {}
        for r in rows:
            value = r.get(key)
            if value is None:
                continue
            k = tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else float(value)
            groups.setdefault(k, []).append(r.get("val_accuracy"))
        entries = []
        for k in sorted(groups):
            accs = [a for a in groups[k] if a is not None]
            entries.append({"value": list(k) if isinstance(k, tuple) else k, "label": _value_label(key, k),
                            "runs": len(groups[k]), "with_result": len(accs),
                            "mean_val_accuracy": sum(accs) / len(accs) if accs else None,
                            "best_val_accuracy": max(accs) if accs else None})
        out[key] = entries
    return out


def class_extremes(per_class: Sequence[Dict[str, Any]], k: int = 5) -> Tuple[List[Dict], List[Dict]]:
    """(the k most accurate classes, best first; the k least accurate, worst first), of the classes with an
    accuracy. Ties: the lower class index first. With fewer than 2k classes the two lists overlap."""
    scored = [c for c in per_class if c.get("accuracy") is not None]
    most = sorted(scored, key=lambda c: (-c["accuracy"], c["index"]))[:k]
    least = sorted(scored, key=lambda c: (c["accuracy"], c["index"]))[:k]
    return most, least


def holdout_note(evaluation: Dict[str, Any], manifest: Optional[Dict[str, Any]] = None) -> str:
    """Whether the evaluation's figure is an honest test figure, in words. The manifest's holdout_per_class
    decides when known (> 0: the official validation images are the test split and checkpoints were chosen
    on images held out of train; 0: validation doubled as test); else the evaluation's test_from_holdout."""
    split = evaluation.get("split", "?")
    holdout = manifest.get("holdout_per_class") if manifest else None
    known = holdout is not None
    if not known:
        holdout = 1 if evaluation.get("test_from_holdout") else (0 if split == "test" else None)
    where = "" if known else " (from the evaluation JSON's test_from_holdout; the shards' manifest.json was not found)"
    if holdout is None:
        return (f"**Split `{split}`, scheme unknown**: the shards' manifest.json was not found, so it is not "
                f"known whether these images also chose the checkpoint; pass the shards folder to the report.")
    per_class = f"{holdout} images per class" if known else "images"
    if holdout > 0 and split == "test":
        return (f"**Test from a held-out split**{where}: `test` is the official validation images, used neither "
                f"for training nor for choosing the checkpoint, which was chosen on `val` ({per_class} held out "
                f"of the official train split). This is an honest test figure.")
    if holdout > 0:
        return (f"**Not a test figure**{where}: split `{split}` is the part that chose the checkpoint ({per_class} "
                f"held out of train), so this accuracy is optimistic. The honest figure is "
                f"`python recipes/evaluate.py --split test`.")
    return (f"**Validation doubled as test**{where}: the shards were prepared with `--holdout 0` (the course "
            f"project's scheme), so `val` is the official validation images and the same images chose the best "
            f"checkpoint and give this figure; it is optimistic, not a held-out test result. For an honest "
            f"test split prepare the shards with the default holdout (`tinycnn-prepare ... --holdout 50`).")


def _describe(module) -> str:
    import torch.nn as nn
    if isinstance(module, nn.Conv2d):
        k = "x".join(map(str, module.kernel_size))
        return f"{module.in_channels}->{module.out_channels}, {k}, stride {module.stride[0]}, pad {module.padding[0]}"
    if isinstance(module, nn.BatchNorm2d):
        return f"{module.num_features}"
    if isinstance(module, nn.Linear):
        return f"{module.in_features}->{module.out_features}"
    if isinstance(module, nn.MaxPool2d):
        return f"kernel {module.kernel_size}"
    if isinstance(module, nn.Dropout):
        return f"p={module.p}"
    text = module.extra_repr()
    return text if len(text) <= 40 else text[:37] + "..."


def layer_table(arch: Dict[str, Any], input_size: Sequence[int] = (1, 3, 64, 64)) -> Dict[str, Any]:
    """Build the model of `arch` ({model, stage_channels, stage_repeats, num_classes, in_chans}) with timm and
    run one (1, 3, 64, 64) input through it with forward hooks on every leaf module (Identity left out).

    Returns {layers: [{name, type, detail, output_shape, parameters}], total_parameters (the model's
    parameter count), trainable_parameters, input_shape, output_shape}."""
    import timm
    import torch

    from . import model as _registers  # noqa: F401  (the tinycnn timm models)

    kwargs = {"num_classes": int(arch["num_classes"]), "stage_channels": list(arch["stage_channels"]),
              "stage_repeats": list(arch["stage_repeats"])}
    if arch.get("in_chans"):
        kwargs["in_chans"] = int(arch["in_chans"])
    model = timm.create_model(arch.get("model") or "tinycnn", **kwargs).eval()
    layers, hooks = [], []

    def hook(name):
        def fn(module, inputs, output):
            shape = list(output.shape) if isinstance(output, torch.Tensor) else None
            layers.append({"name": name, "type": type(module).__name__, "detail": _describe(module),
                           "output_shape": shape, "parameters": sum(p.numel() for p in module.parameters())})
        return fn

    for name, module in model.named_modules():
        if not list(module.children()) and not isinstance(module, torch.nn.Identity):
            hooks.append(module.register_forward_hook(hook(name)))
    with torch.no_grad():
        out = model(torch.zeros(*input_size))
    for h in hooks:
        h.remove()
    # a leaf that never ran (none in tinycnn) still holds parameters: list it so the sum is the total
    seen = {row["name"] for row in layers}
    for name, module in model.named_modules():
        if not list(module.children()) and name not in seen and any(True for _ in module.parameters()):
            layers.append({"name": name, "type": type(module).__name__, "detail": _describe(module),
                           "output_shape": None, "parameters": sum(p.numel() for p in module.parameters())})
    return {"layers": layers, "total_parameters": sum(p.numel() for p in model.parameters()),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "input_shape": list(input_size), "output_shape": list(out.shape), "arch": kwargs,
            "model": arch.get("model") or "tinycnn"}


# ============================================================================= the report's context

class _Context:
    """The loaded inputs, the output folders, and small caches shared by the sections."""

    def __init__(self, inputs: Inputs, output: Path, top: int = 5):
        self.inputs, self.output, self.top = inputs, output, top
        self.figures = output / "figures"
        self.warnings: List[str] = []
        self.figure_files: List[Path] = []
        self._layer_tables: Dict[Tuple, Optional[Dict[str, Any]]] = {}
        self.manifests = []  # (path, manifest), explicit first, then discovered
        self.discovered = set()  # resolved paths of the manifests found at the data paths the outputs name
        for p in inputs.shards:
            m = self._try(lambda: _read_json(p / "manifest.json"), f"{p / 'manifest.json'}")
            if m is not None:
                self.manifests.append((p, m))
        self.checks = [(p, c) for p in inputs.checks
                       if (c := self._try(lambda: _read_json(p / "checks.json"), f"{p / 'checks.json'}")) is not None]
        self.lr_finders = [r for p in inputs.lr_finder if (r := self._try(lambda: load_lr_finder(p), str(p))) is not None]
        self.grids = [g for p in inputs.grid if (g := self._try(lambda: load_grid(p), str(p))) is not None]
        runs = [r for p in inputs.run if (r := self._try(lambda: load_run(p), str(p))) is not None]
        names = [r["name"] for r in runs]
        for r in runs:  # two folders of the same name: tell them apart by their parent
            if names.count(r["name"]) > 1:
                r["name"] = f"{r['path'].parent.name}/{r['path'].name}"
        self.runs = runs
        self.evaluations = []
        for p in inputs.evaluation:
            e = self._try(lambda: _read_json(p), str(p))
            if e is not None:
                e["_path"], e["_name"] = p, p.stem
                self.evaluations.append(e)
        self._discover_manifests()

    def _try(self, fn, what: str):
        try:
            return fn()
        except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as e:
            self.warnings.append(f"could not read {what}: {e}")
            return None

    @property
    def overfit_runs(self):
        return [r for r in self.runs if r["kind"] == "overfit"]

    @property
    def full_runs(self):
        return [r for r in self.runs if r["kind"] == "full"]

    # --- the shards' manifest: given, or found where the outputs say their data was
    def _data_hints(self) -> List[Tuple[str, Optional[str]]]:
        hints = []
        for r in self.runs:
            root = ((r["config"] or {}).get("data") or {}).get("root")
            if root:
                hints.append((str(root), ((r["info"] or {}).get("cwd"))))
        hints += [(c["data"], None) for _, c in self.checks if c.get("data")]
        hints += [(e["data"], None) for e in self.evaluations if e.get("data")]
        for g in self.grids:
            if (g["base"] or {}).get("data"):
                hints.append((g["base"]["data"], (g["run_info"] or {}).get("cwd")))
        return hints

    @staticmethod
    def _resolve(root: str, cwd: Optional[str]) -> Optional[Path]:
        p = Path(root).expanduser()
        for cand in ([p] if p.is_absolute() else [Path(cwd) / p] if cwd else []) + [p]:
            if (cand / "manifest.json").is_file():
                return cand
        return None

    def _discover_manifests(self):
        known = {p.resolve() for p, _ in self.manifests}
        for root, cwd in self._data_hints():
            p = self._resolve(root, cwd)
            if p is not None and p.resolve() not in known:
                m = self._try(lambda: _read_json(p / "manifest.json"), str(p / "manifest.json"))
                if m is not None:
                    self.manifests.append((p, m))
                    known.add(p.resolve())
                    self.discovered.add(p.resolve())

    def manifest(self, hint: Optional[str] = None) -> Tuple[Optional[Path], Optional[Dict[str, Any]]]:
        """The manifest an input refers to: a given shards folder first (the one at `hint` if several),
        else the one found at `hint`, else the first found."""
        explicit = [(p, m) for p, m in self.manifests if p.resolve() not in self.discovered]
        pool = explicit or self.manifests
        if hint:
            h = self._resolve(hint, None)
            for p, m in pool:
                if h is not None and p.resolve() == h.resolve():
                    return p, m
        return pool[0] if pool else (None, None)

    # --- models
    def num_classes(self) -> Optional[int]:
        for _, m in self.manifests:
            return int(m["num_classes"])
        for _, c in self.checks:
            return int(c["num_classes"])
        for e in self.evaluations:
            return len(e["per_class"])
        return None

    def run_arch(self, run: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """The architecture of a run: its checkpoint's metadata, else config.yaml (+ the classes from the data)."""
        meta, cfg = run.get("meta"), run.get("config") or {}
        if meta:
            return {"model": meta.get("architecture") or cfg.get("model") or "tinycnn", "num_classes": meta["num_classes"],
                    "stage_channels": meta["stage_channels"], "stage_repeats": meta["stage_repeats"],
                    "in_chans": meta.get("in_chans", 3)}
        if cfg.get("stage_channels"):
            _, m = self.manifest((cfg.get("data") or {}).get("root"))
            n = int(m["num_classes"]) if m else self.num_classes()
            if n:
                return {"model": cfg.get("model") or "tinycnn", "num_classes": n,
                        "stage_channels": cfg["stage_channels"], "stage_repeats": cfg["stage_repeats"]}
        return None

    def layers(self, arch: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
        if arch is None:
            return None
        key = (arch.get("model"), tuple(arch["stage_channels"]), tuple(arch["stage_repeats"]), arch["num_classes"],
               arch.get("in_chans", 3))
        if key not in self._layer_tables:
            try:
                self._layer_tables[key] = layer_table(arch)
            except Exception as e:  # noqa: BLE001 - an unknown model name: the section says so
                self.warnings.append(f"could not build the model {dict(arch)}: {e}")
                self._layer_tables[key] = None
        return self._layer_tables[key]

    def evaluated_run(self, evaluation: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        ckpt = evaluation.get("checkpoint")
        if not ckpt:
            return None
        target = Path(ckpt).name, Path(ckpt).parent.name
        for r in self.runs:  # same folder (by resolved path, else by the last two path parts)
            p = r["path"] / target[0]
            if Path(ckpt).is_file() and p.is_file() and p.resolve() == Path(ckpt).resolve():
                return r
        for r in self.runs:
            if r["path"].name == target[1] and (r["path"] / target[0]).is_file():
                return r
        return None

    def main_run(self) -> Optional[Dict[str, Any]]:
        """The run the report is about: the evaluated one, else the first full training run, else any run."""
        for e in self.evaluations:
            r = self.evaluated_run(e)
            if r is not None:
                return r
        return (self.full_runs or self.runs or [None])[0]

    # --- figures
    def save(self, fig, name: str, alt: str) -> str:
        """Save `fig` as figures/<name>.png (unique) and return the Markdown image line."""
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "figure"
        path, i = self.figures / f"{stem}.png", 2
        while path in self.figure_files:
            path, i = self.figures / f"{stem}_{i}.png", i + 1
        fig.savefig(path, dpi=DPI)
        self.figure_files.append(path)
        return f"![{alt}](figures/{path.name})"

    def copy_figure(self, src: Path, name: str, alt: str) -> str:
        path = self.figures / f"{name}.png"
        i = 2
        while path in self.figure_files:
            path, i = self.figures / f"{name}_{i}.png", i + 1
        shutil.copyfile(src, path)
        self.figure_files.append(path)
        return f"![{alt}](figures/{path.name})"


# ============================================================================= plotting and Markdown helpers

def _matplotlib():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        raise ReportError(f"the report draws its figures with matplotlib, which is not installed: {REPORT_HINT}") from None


def _figure(ncols: int = 1, size: Tuple[float, float] = FIGSIZE, nrows: int = 1, **kw):
    """A Figure on the Agg canvas (no pyplot: the user's backend is left alone) and its axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes.ravel().tolist()


def _percent_axis(ax, axis: str = "y"):
    from matplotlib.ticker import PercentFormatter
    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(PercentFormatter(1.0, decimals=0))


def _epoch_axis(ax, last_epoch: Optional[int] = None, from_zero: bool = False):
    """Whole epochs on the x axis; up to 20 epochs every one is a tick (a single epoch too)."""
    from matplotlib.ticker import MaxNLocator
    if last_epoch and last_epoch <= 20:
        first = 0 if from_zero else 1
        ax.set_xticks(range(first, last_epoch + 1))
        ax.set_xlim(first - (0.1 if from_zero else 0.3), last_epoch + 0.3)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")


def _pct(v: Optional[float], digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}%}"


def _num(v: Optional[float], fmt: str = ".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _sci(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3g}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> List[str]:
    def cell(v):
        return str(v).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---:" if i in right else "---" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return lines + [""]


def missing(what: str, command: str) -> List[str]:
    """The note of a section (or part of one) whose input was not given: what, and the command that writes it."""
    return [f"> **missing:** {what}: run `{command}` and pass its output to the report.", ""]


def _short_name(name: str, width: int = 16) -> str:
    first = name.split(",")[0].strip()
    return first if len(first) <= width else first[:width - 1] + "."


def _dashed(v) -> str:
    return "-" if v is None else "-".join(str(int(x)) for x in v)


def _short(v: Any) -> Any:
    """Floats to 3 significant digits, also inside lists (for one-line settings)."""
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(str(_short(x)) for x in v) + "]"
    return v


def _params(n: Optional[int]) -> str:
    return "-" if n is None else f"{n:,}"


# ============================================================================= sections

def section_data(ctx: _Context) -> List[str]:
    from .checks import split_stats

    out = ["## 1. Data", ""]
    path, manifest = ctx.manifest()
    checks = ctx.checks[0][1] if ctx.checks else None
    if manifest is None and checks is None:
        return out + missing("no shards folder (manifest.json, written by tinycnn-prepare) and no checks.json",
                             "python recipes/checks.py --data SHARDS --output checkpoints/checks")
    if manifest is not None:
        src = manifest.get("source") or {}
        holdout = manifest.get("holdout_per_class")
        scheme = (f"`val` = {holdout} images per class held out of the official train split (chooses checkpoints), "
                  f"`test` = the official validation images (reported once)" if holdout else
                  "`val` = the official validation images (the course project's scheme, `--holdout 0`: no separate test split)")
        out += [f"Shards: `{path}`, prepared from the {src.get('kind', '?')} `{src.get('path', '?')}` "
                f"(format {manifest.get('format')} v{manifest.get('format_version')}, tinycnn "
                f"{manifest.get('tinycnn_version', '?')}, seed {manifest.get('seed')}). "
                f"{manifest['num_classes']} classes, input shape {tuple(manifest.get('input_shape', []))}. "
                f"Splits: `train` = the official train images{' minus the held-out ones' if holdout else ''}; {scheme}.",
                ""]
        if manifest.get("skipped"):
            out += [f"{len(manifest['skipped'])} source images were skipped as unreadable "
                    f"(listed in manifest.json; e.g. {manifest['skipped'][0].get('file')}).", ""]
        stats = split_stats(manifest)
    else:
        out += ["Split statistics from checks.json (the shards' manifest.json was not among the inputs; "
                "pass the shards folder for its source and split scheme).", ""]
        stats = checks["splits"]
    rows, gray_total, total = [], 0, 0
    for name, s in stats.items():
        gray = s.get("grayscale")
        gray_total += gray or 0
        total += s["num_samples"]
        gray_cell = "-" if gray is None else f"{gray:,} ({gray / max(s['num_samples'], 1):.1%})"
        rows.append([name, f"{s['num_samples']:,}", gray_cell,
                     s.get("num_shards", "-"), s.get("classes_present", "-"), s.get("min_per_class", "-"),
                     _num(s.get("mean_per_class"), ".1f"), s.get("max_per_class", "-")])
    out += _table(["split", "images", "grayscale", "shards", "classes", "min/class", "mean/class", "max/class"],
                  rows, right=range(1, 8))
    out += [f"Grayscale: {gray_total:,} of {total:,} images ({gray_total / max(total, 1):.1%}) have one channel; the "
            "loader decodes them to 3 identical channels.", ""]
    names = [c.get("name", c["wnid"]) for c in manifest["classes"]] if manifest else None
    if any(s.get("class_counts") for s in stats.values()):
        out += [_plot_class_distribution(ctx, stats, names), ""]

    out += ["### Augmentation", ""]
    if checks is None:
        out += missing("no augmentation grid, no batch check (no checks.json)", "python recipes/checks.py")
        return out
    cpath = ctx.checks[0][0]
    grid_png = cpath / "augment_grid.png"
    aug = checks.get("augment") or {}
    if grid_png.is_file():
        out += [ctx.copy_figure(grid_png, "augment_grid", "the same images before and after augmentation"), "",
                f"{checks.get('augment_grid_images', '?')} training images; each row of originals is followed by the "
                "row of the same images after the training augmentation (GPUAugment, denormalized for display).", ""]
    else:
        out += missing(f"{grid_png} (the augmentation grid)", "python recipes/checks.py")
    if aug:
        out += ["Augmentation settings: " + ", ".join(f"{k} {_short(v)}" for k, v in aug.items()) + ".", ""]
    out += ["### A batch", ""]
    batch = checks.get("batch") or {}
    shape, expected = checks.get("batch_shape"), checks.get("input_shape")
    if shape:
        ok = list(shape[1:]) == list(expected or [])
        out += [f"A training batch has shape {tuple(shape)} ({batch.get('dtype', 'uint8')}, labels "
                f"{tuple(batch.get('labels_shape', [shape[0]]))}) against the manifest's input_shape "
                f"{tuple(expected or [])}: **{'matches' if ok else 'DIFFERS'}** (B = train.batch_size; the loader "
                "yields uint8 and the augmentation converts to float on the device).", ""]
    return out


def _plot_class_distribution(ctx: _Context, stats: Dict[str, Dict[str, Any]], names: Optional[List[str]]) -> str:
    splits = [(n, s["class_counts"]) for n, s in stats.items() if s.get("class_counts")]
    num = max(len(c) for _, c in splits)
    wide = num > 40
    fig, (ax,) = _figure(size=(9 if num > 20 else 7, 4))
    width = 0.8 / len(splits)
    for i, (name, counts) in enumerate(splits):
        label = f"{name} ({sum(counts):,} images)"
        if wide:  # hundreds of bars side by side alias into stripes: one filled outline per split
            ax.stairs(counts, [j - 0.5 for j in range(len(counts) + 1)], fill=True, alpha=0.55, color=f"C{i}",
                      label=label)
            ax.stairs(counts, [j - 0.5 for j in range(len(counts) + 1)], color=f"C{i}", lw=1.2)
        else:
            xs = [j + (i - (len(splits) - 1) / 2) * width for j in range(len(counts))]
            ax.bar(xs, counts, width=width * 0.95, label=label, color=f"C{i}", linewidth=0)
    ax.set_ylabel("images per class")
    ax.set_title(f"Images per class and split ({num} classes)")
    if names and num <= 20:
        ax.set_xticks(range(num))
        ax.set_xticklabels([_short_name(n) for n in names[:num]], rotation=35, ha="right", fontsize=8)
        ax.set_xlabel("class")
    else:
        ax.set_xlabel("class index")
        ax.set_xlim(-0.5 if wide else -1, num - (0.5 if wide else 0))
    ax.legend(loc="upper right", fontsize=8, ncols=len(splits), framealpha=0.9)
    top = max(max(c) for _, c in splits)
    ax.set_ylim(0, top * 1.18)
    ax.grid(True, axis="y", alpha=0.3)
    return ctx.save(fig, "class_distribution", "images per class and split")


def section_model(ctx: _Context) -> List[str]:
    out = ["## 2. Model", ""]
    run = ctx.main_run()
    arch, source = None, None
    if run is not None:
        arch = ctx.run_arch(run)
        source = (f"the checkpoint `{run['checkpoint']}`" if run.get("meta") else f"`{run['path'] / 'config.yaml'}`")
    if arch is None and ctx.checks:
        cpath, c = ctx.checks[0]
        m = c.get("model") or {}
        if m.get("stage_channels"):
            arch = {"model": m.get("name"), "stage_channels": m["stage_channels"], "stage_repeats": m["stage_repeats"],
                    "num_classes": c["num_classes"]}
            source = f"`{cpath / 'checks.json'}`"
    table = ctx.layers(arch)
    if table is None:
        out += missing("no model to describe (no run folder with config.yaml or a checkpoint, no checks.json)",
                       "python recipes/train.py")
    else:
        a = table["arch"]
        out += [f"`{table['model']}` with stage_channels {a['stage_channels']}, stage_repeats {a['stage_repeats']}, "
                f"{a['num_classes']} classes (from {source}), built with timm; output shapes from forward hooks on a "
                f"{tuple(table['input_shape'])} input (shapes without the batch dimension: channels x height x width).",
                ""]
        rows = []
        for i, layer in enumerate(table["layers"], 1):
            shape = " x ".join(map(str, layer["output_shape"][1:])) if layer["output_shape"] else "-"
            rows.append([i, f"`{layer['name']}`", layer["type"], layer["detail"], shape, _params(layer["parameters"])])
        total = table["total_parameters"]
        rows.append(["", "**total**", "", "", " x ".join(map(str, table["output_shape"][1:])), f"**{total:,}**"])
        out += _table(["#", "layer", "type", "settings", "output shape", "parameters"], rows, right=(0, 5))
        out += [f"Total parameters: **{total:,}** ({table['trainable_parameters']:,} trainable; the sum of the "
                "table's rows).", ""]
        others = _other_architectures(ctx, table)
        if others:
            out += ["Other models among the inputs:", ""]
            out += _table(["runs", "stage_channels", "stage_repeats", "parameters"], others, right=(3,))

    out += ["### Checks before training", ""]
    if not ctx.checks:
        return out + missing("no initial-loss check and no baselines (no checks.json)", "python recipes/checks.py")
    cpath, c = ctx.checks[0]
    cm = c.get("model") or {}
    if table is not None and cm.get("stage_channels") and (
            list(cm["stage_channels"]) != list(table["arch"]["stage_channels"])
            or list(cm["stage_repeats"]) != list(table["arch"]["stage_repeats"])):
        out += [f"(The checks ran on stage_channels {cm['stage_channels']}, stage_repeats {cm['stage_repeats']}, "
                "not on the model above.)", ""]
    il = c.get("initial_loss") or {}
    n = c.get("num_classes")
    if il:
        out += [f"**Initial loss**: the untrained model's cross-entropy on one augmented training batch is "
                f"**{_num(il.get('observed'), '.3f')}**, against ln({n}) = {_num(il.get('expected'), '.3f')} for a "
                f"uniform prediction (difference {_num(il.get('difference'), '+.3f')}, tolerance "
                f"{il.get('tolerance')}): **{'ok' if il.get('ok') else 'FLAGGED'}**.", ""]
    gr = c.get("gradients") or {}
    if gr:
        out += ["**Gradients** after one backward pass: "
                + (f"all {gr.get('num_param_tensors')} parameter tensors get a non-zero gradient (norm "
                   f"{_sci(gr.get('grad_norm'))})" if gr.get("ok") else
                   f"{gr.get('num_params_with_zero_grad')} without gradient "
                   f"({', '.join(gr.get('params_with_zero_grad', [])[:5])})") + ".", ""]
    b = c.get("baselines") or {}
    if b:
        mc, ur = b.get("majority_class") or {}, b.get("uniform_random") or {}
        out += [f"**Baselines** on `val` ({b.get('num_val_samples', '?')} images): what a model must beat.", ""]
        out += _table(["baseline", "top-1 accuracy", "note"], [
            ["majority class", _pct(mc.get("accuracy")),
             f"class {mc.get('class')} ({mc.get('wnid')}), {mc.get('train_count')} train images"
             + (f", tied with {mc['tied_classes'] - 1} other classes" if (mc.get("tied_classes") or 1) > 1 else "")],
            ["uniform random", _pct(ur.get("accuracy")),
             f"seed {ur.get('seed')}; expected 1/{n} = {_pct(ur.get('expected'))}"],
        ], right=(1,))
    return out


def _other_architectures(ctx: _Context, shown: Dict[str, Any]) -> List[List[Any]]:
    seen: Dict[Tuple, List[str]] = {}
    archs = {}
    for r in ctx.runs:
        a = ctx.run_arch(r)
        if a is None:
            continue
        key = (tuple(a["stage_channels"]), tuple(a["stage_repeats"]), a["num_classes"])
        seen.setdefault(key, []).append(r["name"])
        archs[key] = a
    mine = (tuple(shown["arch"]["stage_channels"]), tuple(shown["arch"]["stage_repeats"]), shown["arch"]["num_classes"])
    rows = []
    for key, names in seen.items():
        if key == mine:
            continue
        t = ctx.layers(archs[key])
        rows.append([", ".join(names), list(key[0]), list(key[1]), _params(t["total_parameters"] if t else None)])
    return rows


def _curves(records: List[Dict[str, Any]], key: str) -> Tuple[List[int], List[float]]:
    pts = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _settings(cfg: Optional[Dict[str, Any]]) -> str:
    """The training settings of a config in one line, as train.py applies them (an overfit run trains
    without augmentation, weight decay and label smoothing whatever the config says)."""
    if not cfg:
        return "(no config.yaml)"
    t = cfg.get("train") or {}
    o, s = t.get("optimizer") or {}, t.get("scheduler") or {}
    overfit = bool(t.get("overfit_small"))
    smoothing = 0.0 if overfit else t.get("label_smoothing")
    decay = 0.0 if overfit else o.get("weight_decay")
    augment = not overfit and (cfg.get("augment") or {}).get("enabled", True)
    d = cfg.get("data") or {}
    splits = (f", trained on split `{d.get('train_split')}`, validated on `{d.get('val_split')}`"
              if (d.get("train_split", "train"), d.get("val_split", "val")) != ("train", "val") else "")
    return (f"{o.get('name')} lr {_sci(o.get('lr'))}, weight decay {_sci(decay)}, scheduler "
            f"{s.get('name')}, batch {t.get('batch_size')}, label smoothing {smoothing}, "
            f"augmentation {'on' if augment else 'off'}{splits}")


def section_overfit(ctx: _Context) -> List[str]:
    out = ["## 3. Overfit run", ""]
    runs = ctx.overfit_runs
    if not runs:
        return out + missing("no overfit run (a run folder whose config.yaml has train.overfit_small: true)",
                             "python recipes/train.py --config recipes/configs/overfit.yaml --output checkpoints/overfit")
    for run in runs:
        t = (run["config"] or {}).get("train") or {}
        rec = run["metrics"]
        if len(runs) > 1:
            out += [f"### {run['name']}", ""]
        out += [f"`{run['path']}`: a fixed subset of {t.get('overfit_small_size', '?')} training images "
                f"(train.overfit_small), {_settings(run['config'])}; val on {t.get('val_subset_size') or 'all'} "
                "images.", ""]
        if not rec:
            out += missing(f"no metrics.jsonl in {run['path']}",
                           "python recipes/train.py --config recipes/configs/overfit.yaml")
            continue
        out += [_plot_overfit(ctx, run), ""]
        evals = [r for r in rec if r.get("val/accuracy") is not None]
        best = max(evals, key=lambda r: r["val/accuracy"]) if evals else None
        first, last = rec[0]["train/loss"], rec[-1]["train/loss"]
        out += [f"Train loss {first:.4f} after epoch 1 -> **{last:.4f}** after epoch {rec[-1]['epoch']} "
                f"({(last - first) / first:+.0%}); "
                + (f"best val accuracy **{_pct(best['val/accuracy'])}** (epoch {best['epoch']}), val loss "
                   f"{_num(rec[-1].get('val/loss'))} at the end. " if best else "no val evaluation. ")
                + "A model that can learn drives the train loss towards 0 on so few images while the val loss "
                  "stops falling or rises, and the train accuracy approaches 100%.", ""]
    return out


def _plot_val_accuracy(ax, rec: List[Dict[str, Any]]):
    """Val top-1 (its best in the legend) and top-5 per epoch, on a 0-100% axis."""
    x, y = _curves(rec, "val/accuracy")
    best = max(range(len(y)), key=lambda k: y[k]) if y else None
    ax.plot(x, y, "s-", color="C1", label="val top-1" + (f" (best {y[best]:.1%}, epoch {x[best]})" if y else ""))
    x5, y5 = _curves(rec, "val/top5")
    if y5:
        ax.plot(x5, y5, "^:", color="C2", label="val top-5")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    _percent_axis(ax)


def _plot_overfit(ctx: _Context, run: Dict[str, Any]) -> str:
    rec = run["metrics"]
    fig, (ax1, ax2) = _figure(2, size=(10, 3.8))
    x, y = _curves(rec, "train/loss")
    ax1.plot(x, y, "o-", color="C0", label="train loss (subset)")
    x, y = _curves(rec, "val/loss")
    ax1.plot(x, y, "s--", color="C1", label="val loss")
    ax1.set_ylabel("cross-entropy loss")
    ax1.set_title("Loss")
    _plot_val_accuracy(ax2, rec)
    x, y = _curves(rec, "train/accuracy")
    if y:  # runs from before train.py logged it have none
        ax2.plot(x, y, "o-", color="C0", label="train top-1 (subset)")
    ax2.set_title("Accuracy" if y else "Val accuracy (this run logged no train accuracy)")
    last = rec[-1]["epoch"]
    _epoch_axis(ax1, last)
    _epoch_axis(ax2, last)
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Overfit run {run['name']}")
    return ctx.save(fig, f"overfit_{run['name']}", f"overfit run {run['name']}: loss and accuracy per epoch")


def section_lr_finder(ctx: _Context) -> List[str]:
    out = ["## 4. LR finder", ""]
    if not ctx.lr_finders:
        return out + missing("no LR finder output (lr_finder.json / lr_finder.csv)",
                             "python recipes/lr_finder.py --output checkpoints/lr_finder")
    for r in ctx.lr_finders:
        if len(ctx.lr_finders) > 1:
            out += [f"### {r['name']}", ""]
        m = r.get("model") or {}
        out += [f"`{r['path']}` ({r['source']}): the model trained from scratch for {r.get('num_points', '?')} of "
                f"{r.get('num_iters', '?')} steps while the lr grows log-spaced from {_sci(r.get('min_lr'))} to "
                f"{_sci(r.get('max_lr'))}"
                + (f"; {r.get('optimizer')}, weight decay {_sci(r.get('weight_decay'))}, batch {r.get('batch_size')}, "
                   f"stage_channels {m.get('stage_channels')}, stage_repeats {m.get('stage_repeats')}"
                   if r.get("optimizer") else "") + ".", ""]
        if not r.get("points"):
            out += ["The sweep holds no points.", ""]
            continue
        out += [_plot_lr(ctx, r), ""]
        sug = r.get("suggested_lr")
        rows = [["suggested lr (steepest descent of the smoothed loss)",
                 f"**{_sci(sug)}**" if sug else "none (the loss never fell)"],
                ["lr at the lowest smoothed loss", _sci(r.get("min_loss_lr"))],
                ["lowest smoothed loss", _num(r.get("best_smoothed_loss"))],
                ["stopped early", f"yes: {r.get('stop_reason')}" if r.get("stopped_early") else "no"]]
        out += _table(["", "value"], rows, right=(1,))
        if sug:
            out += [f"Train with `train.optimizer.lr={sug:.2g}` or a little below (the steepest descent, not the "
                    "minimum, is the usual pick).", ""]
    return out


def _plot_lr(ctx: _Context, r: Dict[str, Any]) -> str:
    pts = [p for p in r["points"] if p.get("loss") is not None]
    fig, (ax,) = _figure()
    ax.plot([p["lr"] for p in pts], [p["loss"] for p in pts], color="0.7", lw=1, label="loss per step")
    sm = [p for p in pts if p.get("smoothed_loss") is not None]
    ax.plot([p["lr"] for p in sm], [p["smoothed_loss"] for p in sm], color="C0", lw=2, label="smoothed loss")
    if sm:  # the flat start and the minimum in view; the diverging end may run off the top
        ys = [p["smoothed_loss"] for p in sm]
        lo, ref = min(ys), max(ys[:max(1, len(ys) // 2)])
        span = max(ref - lo, 0.02 * abs(ref) + 1e-3)
        ax.set_ylim(lo - 0.3 * span, ref + 1.5 * span)
    sug = r.get("suggested_lr")
    if sug:
        ax.axvline(sug, color="C3", ls="--", lw=1.5, label=f"suggested lr {sug:.2e}")
        near = min(sm or pts, key=lambda p: abs(math.log(p["lr"] / sug)))
        ax.plot([near["lr"]], [near.get("smoothed_loss") or near["loss"]], "o", color="C3", ms=7)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss (cross-entropy)")
    what = ", ".join(v for v in (r.get("optimizer"), f"batch {r['batch_size']}" if r.get("batch_size") else None) if v)
    ax.set_title(f"LR range test ({r['name']})" + (f": {what}" if what else ""))
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return ctx.save(fig, f"lr_finder_{r['name']}", f"LR finder {r['name']}: loss vs learning rate")


def section_grid(ctx: _Context) -> List[str]:
    out = ["## 5. Grid search", ""]
    if not ctx.grids:
        return out + missing("no grid search folder (results.json or gs_* run folders)",
                             "python recipes/grid_search.py --output checkpoints/grid_search")
    for g in ctx.grids:
        if len(ctx.grids) > 1:
            out += [f"### {g['name']}", ""]
        rows = g["rows"]
        base = g.get("base") or {}
        planned = g.get("runs_planned")
        out += [f"`{g['path']}` (from {g['source']}): {len(rows)} runs"
                + (f" of {planned} planned" if planned and planned != len(rows) else "")
                + (f", {base.get('epochs')} epoch{'s' if base.get('epochs') != 1 else ''} each, "
                   f"{base.get('optimizer')} with scheduler {base.get('scheduler')}, "
                   f"batch {base.get('batch_size')}, seed {base.get('seed')}" if base else "")
                + "; sorted by best val accuracy (the epoch's val loss beside it).", ""]
        if not rows:
            out += ["No runs.", ""]
            continue
        table = []
        for r in rows:
            table.append([r.get("rank"), f"`{r['name'].split('_lr=')[0]}`", _value_label("lr", r["lr"]),
                          _value_label("weight_decay", r["weight_decay"]), _dashed(r["stage_channels"]),
                          _dashed(r["stage_repeats"]), _params(r.get("num_parameters")), _pct(r.get("val_accuracy")),
                          _num(r.get("val_loss")), r.get("best_epoch") or "-", r.get("status") or "-"])
        out += _table(["#", "run", "lr", "weight decay", "channels", "repeats", "parameters", "best val acc",
                       "val loss", "epoch", "status"], table, right=(0, 2, 3, 6, 7, 8, 9))
        best = rows[0] if rows[0].get("val_accuracy") is not None else None
        if best:
            out += [f"Best: **{best['name']}** with {_pct(best['val_accuracy'])} val accuracy "
                    f"(`train.optimizer.lr={_value_label('lr', best['lr'])} "
                    f"train.optimizer.weight_decay={_value_label('weight_decay', best['weight_decay'])} "
                    f"stage_channels=[{','.join(map(str, best['stage_channels']))}] "
                    f"stage_repeats=[{','.join(map(str, best['stage_repeats']))}]`).", ""]
        if any(r["metrics"] for r in rows):
            out += [_plot_grid_curves(ctx, g), ""]
        effects = hyperparameter_effects(rows)
        out += ["### Effect of each hyperparameter" if len(ctx.grids) == 1 else "#### Effect of each hyperparameter", "",
                "Mean best val accuracy of the runs with each value (the other hyperparameters vary over the grid).", ""]
        if any(e["mean_val_accuracy"] is not None for es in effects.values() for e in es):
            out += [_plot_effects(ctx, g, effects), ""]
        trows = []
        for key, label in HPARAMS:
            for e in effects[key]:
                trows.append([label, e["label"], e["runs"] if e["with_result"] == e["runs"] else
                              f"{e['with_result']} of {e['runs']}", _pct(e["mean_val_accuracy"]),
                              _pct(e["best_val_accuracy"])])
        out += _table(["hyperparameter", "value", "runs", "mean best val acc", "best val acc"], trows, right=(2, 3, 4))
    return out


def _run_label(r: Dict[str, Any]) -> str:
    return (f"lr {_value_label('lr', r['lr'])}, wd {_value_label('weight_decay', r['weight_decay'])}, "
            f"ch {_dashed(r['stage_channels'])}, rep {_dashed(r['stage_repeats'])}")


def _plot_grid_curves(ctx: _Context, g: Dict[str, Any]) -> str:
    rows = [r for r in g["rows"] if r["metrics"]]
    labelled = 8  # the best runs get a colour and a legend entry, the rest are grey
    fig, (ax,) = _figure(size=(9, 4.5))
    grey_done = False
    for i, r in reversed(list(enumerate(rows))):
        x, y = _curves(r["metrics"], "val/accuracy")
        if not x:
            continue
        if i < labelled:
            ax.plot(x, y, "o-", color=f"C{i % 10}", lw=1.8, ms=5, label=f"#{r['rank']} {_run_label(r)}", zorder=3)
        else:
            ax.plot(x, y, "o-", color="0.75", lw=1, ms=3, zorder=1,
                    label=None if grey_done else f"other runs ({len(rows) - labelled})")
            grey_done = True
    ax.set_ylabel("val accuracy")
    _percent_axis(ax)
    _epoch_axis(ax, max(r["metrics"][-1]["epoch"] for r in rows))
    ax.set_title(f"Grid search {g['name']}: val accuracy per epoch ({len(rows)} runs)")
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], fontsize=7.5, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return ctx.save(fig, f"grid_{g['name']}_curves", "val accuracy per epoch of every grid run")


def _plot_effects(ctx: _Context, g: Dict[str, Any], effects: Dict[str, List[Dict[str, Any]]]) -> str:
    fig, axes = _figure(len(HPARAMS), size=(11, 3.6), sharey=True)
    for ax, (key, label) in zip(axes, HPARAMS):
        es = effects[key]
        xs = list(range(len(es)))
        means = [e["mean_val_accuracy"] or 0.0 for e in es]
        bars = ax.bar(xs, means, color=[f"C{i}" for i in range(len(es))], width=0.6)
        for b, e in zip(bars, es):
            if e["mean_val_accuracy"] is not None:
                ax.annotate(f"{e['mean_val_accuracy']:.1%}", (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center", va="bottom", fontsize=7.5, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(xs)
        ax.set_xticklabels([e["label"] for e in es], fontsize=8, rotation=20 if len(es) > 3 else 0)
        ax.set_xlim(-0.7, max(len(es), 2) - 0.3)
        ax.set_title(label, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("mean best val accuracy")
    _percent_axis(axes[0])
    top = max((e["mean_val_accuracy"] or 0 for es in effects.values() for e in es), default=0)
    axes[0].set_ylim(0, max(top * 1.2, 0.01))
    fig.suptitle(f"Grid search {g['name']}: mean best val accuracy per hyperparameter value")
    return ctx.save(fig, f"grid_{g['name']}_effects", "mean best val accuracy per value of each hyperparameter")


def _lr_schedule(run: Dict[str, Any]) -> Optional[Tuple[List[float], List[float]]]:
    """The per-step lr of a run, recomputed from its config (the same lambda as train.py) and its steps per
    epoch (from metrics.jsonl): (epoch positions, lrs). None when it cannot be recomputed."""
    from .train import build_lr_lambda

    cfg, rec = run["config"] or {}, run["metrics"]
    t = cfg.get("train") or {}
    try:
        steps = [r["step"] for r in rec]
        diffs = [b - a for a, b in zip([0] + steps, steps)]
        per_epoch = max(set(diffs[:-1] or diffs), key=(diffs[:-1] or diffs).count)
        total = t.get("max_steps") or per_epoch * int(t["epochs"])
        fn = build_lr_lambda(t["scheduler"], total, per_epoch)
        base = float(t["optimizer"]["lr"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    if per_epoch <= 0 or total <= 0:
        return None
    # LambdaLR: after s optimizer steps the lr is base * fn(s) (the value train.py logs at an epoch's end)
    n = min(total + 1, 2000)
    idx = sorted({round(i * total / max(n - 1, 1)) for i in range(n)})
    return [s / per_epoch for s in idx], [base * fn(s) for s in idx]


def _full_run_summary(ctx: _Context, run: Dict[str, Any]) -> List[Any]:
    rec = run["metrics"]
    evals = [r for r in rec if r.get("val/accuracy") is not None]
    best = max(evals, key=lambda r: r["val/accuracy"]) if evals else None
    t = (run["config"] or {}).get("train") or {}
    o, s = t.get("optimizer") or {}, t.get("scheduler") or {}
    table = ctx.layers(ctx.run_arch(run))
    speed = [r["images_per_sec"] for r in rec if r.get("images_per_sec")]
    return [f"`{run['name']}`", _params(table["total_parameters"] if table else None),
            f"{o.get('name', '-')} {_sci(o.get('lr'))}", _sci(o.get("weight_decay")), s.get("name", "-"),
            t.get("batch_size", "-"), t.get("label_smoothing", "-"), rec[-1]["epoch"] if rec else 0,
            f"**{_pct(best['val/accuracy'])}** (epoch {best['epoch']})" if best else "-",
            _num(rec[-1].get("val/loss")) if rec else "-", f"{sum(speed) / len(speed):,.0f}" if speed else "-"]


def section_full_training(ctx: _Context) -> List[str]:
    out = ["## 6. Full training", ""]
    runs = ctx.full_runs
    if not runs:
        return out + missing("no training run (a run folder with metrics.jsonl, not an overfit run)",
                             "python recipes/train.py --output checkpoints/recommended")
    out += _table(["run", "parameters", "optimizer lr", "weight decay", "scheduler", "batch", "label smoothing",
                   "epochs", "best val acc", "final val loss", "img/s"],
                  [_full_run_summary(ctx, r) for r in runs], right=(1, 5, 6, 7, 8, 9, 10))
    for run in runs:
        out += [f"### {run['name']}", "", f"`{run['path']}`: {_settings(run['config'])}.", ""]
        if not run["metrics"]:
            out += missing(f"no metrics.jsonl in {run['path']}", "python recipes/train.py")
            continue
        out += [_plot_training(ctx, run), ""]
        meta = run.get("meta") or {}
        extra = meta.get("extra") or {}
        if run.get("checkpoint") and extra.get("val_accuracy") is not None:
            out += [f"Best checkpoint `{run['checkpoint'].name}`: epoch {extra.get('epoch')}, val accuracy "
                    f"{_pct(extra['val_accuracy'])} on split `{extra.get('val_split', 'val')}`.", ""]
    if len(runs) > 1:
        out += ["### Comparison", "", _plot_comparison(ctx, runs), ""]
    return out


def _plot_training(ctx: _Context, run: Dict[str, Any]) -> str:
    rec = run["metrics"]
    fig, (ax1, ax2, ax3) = _figure(3, size=(12, 3.8))
    x, y = _curves(rec, "train/loss")
    ax1.plot(x, y, "o-", color="C0", label="train loss (epoch mean)")
    x, y = _curves(rec, "val/loss")
    ax1.plot(x, y, "s--", color="C1", label="val loss")
    ax1.set_ylabel("cross-entropy loss")
    ax1.set_title("Loss")
    _plot_val_accuracy(ax2, rec)
    ax2.set_title("Val accuracy")
    sched = _lr_schedule(run)
    if sched:
        ax3.plot(sched[0], sched[1], color="C4", lw=1.5, label="lr per step (from the config)")
    x, y = _curves(rec, "lr")
    ax3.plot(x, y, "o", color="C4", ms=5, label="lr logged at epoch end")
    ax3.set_yscale("log")
    ax3.set_ylabel("learning rate (log scale)")
    ax3.set_title("LR schedule")
    for ax in (ax1, ax2, ax3):
        _epoch_axis(ax, rec[-1]["epoch"], from_zero=ax is ax3)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Training run {run['name']}")
    return ctx.save(fig, f"train_{run['name']}", f"training run {run['name']}: loss, val accuracy, lr per epoch")


def _plot_comparison(ctx: _Context, runs: List[Dict[str, Any]]) -> str:
    fig, (ax1, ax2) = _figure(2, size=(11, 4))
    for i, run in enumerate(runs):
        c = f"C{i % 10}"
        x, y = _curves(run["metrics"], "train/loss")
        ax1.plot(x, y, "o-", color=c, label=f"{run['name']} train")
        x, y = _curves(run["metrics"], "val/loss")
        ax1.plot(x, y, "s--", color=c, alpha=0.8, label=f"{run['name']} val")
        x, y = _curves(run["metrics"], "val/accuracy")
        ax2.plot(x, y, "s-", color=c, label=run["name"])
    ax1.set_ylabel("cross-entropy loss")
    ax1.set_title("Loss (solid: train, dashed: val)")
    ax2.set_ylabel("val accuracy")
    _percent_axis(ax2)
    ax2.set_title("Val accuracy")
    last = max((r["metrics"][-1]["epoch"] for r in runs if r["metrics"]), default=None)
    for ax in (ax1, ax2):
        _epoch_axis(ax, last)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{len(runs)} training runs compared")
    return ctx.save(fig, "train_comparison", "the training runs compared")


def section_evaluation(ctx: _Context) -> List[str]:
    out = ["## 7. Final evaluation", ""]
    if not ctx.evaluations:
        return out + missing("no evaluation JSON",
                             "python recipes/evaluate.py --checkpoint checkpoints/recommended/best.safetensors "
                             "--split test --json checkpoints/test.json")
    rows = []
    for e in ctx.evaluations:
        rows.append([f"`{e['_name']}`", f"`{e.get('split')}`", f"{e.get('num_samples', 0):,}",
                     f"**{_pct(e.get('accuracy'))}**", _pct(e.get("top5")), _num(e.get("loss")),
                     f"`{e.get('checkpoint', '-')}`"])
    out += _table(["evaluation", "split", "images", "top-1", "top-5", "loss", "checkpoint"], rows, right=(2, 3, 4, 5))
    for e in ctx.evaluations:
        if len(ctx.evaluations) > 1:
            out += [f"### {e['_name']}", ""]
        _, manifest = ctx.manifest(e.get("data"))
        out += [holdout_note(e, manifest), ""]
        run = ctx.evaluated_run(e)
        meta = (run or {}).get("meta") or _checkpoint_file_meta(e.get("checkpoint"))
        extra = (meta or {}).get("extra") or {}
        if extra.get("val_accuracy") is not None:
            origin = f"run `{run['name']}`" if run else f"`{e.get('checkpoint')}`"
            out += [f"The checkpoint comes from {origin} (epoch {extra.get('epoch')}), chosen with "
                    f"{_pct(extra['val_accuracy'])} on `{extra.get('val_split', 'val')}`.", ""]
            if extra.get("val_split") == e.get("split"):
                out += [f"> **caution:** the checkpoint was chosen on `{e.get('split')}`, the split evaluated here: "
                        "this accuracy is a validation figure, not a test result.", ""]
        most, least = class_extremes(e["per_class"], ctx.top)
        if not most:
            continue
        out += [f"Most and least accurate classes on `{e.get('split')}` ({len(e['per_class'])} classes):", ""]
        both = [["most", i + 1, c["index"], c["wnid"], c["name"], _pct(c["accuracy"], 1), c.get("num_samples", "-")]
                for i, c in enumerate(most)]
        both += [["least", i + 1, c["index"], c["wnid"], c["name"], _pct(c["accuracy"], 1), c.get("num_samples", "-")]
                 for i, c in enumerate(least)]
        out += _table(["", "rank", "class", "wnid", "name", "accuracy", "images"], both, right=(1, 2, 5, 6))
        out += [_plot_classes(ctx, e), ""]
    return out


def _checkpoint_file_meta(path: Optional[str]) -> Optional[Dict[str, Any]]:
    from .weights import WeightsError, read_metadata
    if not path or not Path(path).is_file():
        return None
    try:
        return read_metadata(path)
    except (WeightsError, OSError, ValueError):
        return None


def _plot_classes(ctx: _Context, e: Dict[str, Any]) -> str:
    scored = sorted((c for c in e["per_class"] if c.get("accuracy") is not None),
                    key=lambda c: (c["accuracy"], c["index"]))
    k = 10
    shown = scored if len(scored) <= 2 * k else scored[:k] + scored[-k:]
    fig, (ax,) = _figure(size=(7, max(3.0, 0.26 * len(shown) + 1.2)))
    ys = list(range(len(shown)))
    colors = ["C3" if c["accuracy"] < e["accuracy"] else "C2" for c in shown]
    ax.barh(ys, [c["accuracy"] for c in shown], color=colors, height=0.7)
    ax.set_yticks(ys)
    ax.set_yticklabels([f"{_short_name(c['name'], 24)} ({c['index']})" for c in shown], fontsize=8)
    ax.axvline(e["accuracy"], color="0.3", ls="--", lw=1, label=f"overall top-1 {e['accuracy']:.1%}")
    if len(shown) < len(scored):
        ax.axhline(k - 0.5, color="0.5", lw=0.8, ls=":")
    ax.set_xlim(0, 1)
    _percent_axis(ax, "x")
    ax.set_xlabel(f"top-1 accuracy on the {e.get('split')} split ({e.get('num_samples', 0):,} images)")
    what = "every class" if len(shown) == len(scored) else f"the {k} least and {k} most accurate of {len(scored)} classes"
    ax.set_title(f"Per-class accuracy, {what}", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return ctx.save(fig, f"eval_{e['_name']}_classes", f"per-class accuracy of {e['_name']}")


def section_reproducibility(ctx: _Context, command: Optional[Sequence[str]]) -> List[str]:
    out = ["## 8. Reproducibility", ""]
    runs = ctx.full_runs + ctx.overfit_runs
    # (name, run.json, seed) of every training run, and of one run per grid search
    infos = [(r["name"], r["info"], (((r.get("config") or {}).get("train") or {}).get("seed", "-")))
             for r in runs if r.get("info")]
    for g in ctx.grids:
        if g.get("run_info"):
            infos.append((f"grid search {g['name']} (its first run)", g["run_info"],
                          (g.get("base") or {}).get("seed", "-")))
    for path, c in ctx.checks:
        if c.get("environment"):
            infos.append((f"checks {Path(path).name}", c["environment"], "-"))
    for r in ctx.lr_finders:
        if r.get("environment"):
            infos.append((f"LR finder {r['name']}", r["environment"], "-"))
    main = ctx.main_run()
    if not runs and not infos:
        out += missing("no training run folder (config.yaml, run.json)", "python recipes/train.py")
    if infos:
        out += ["### Commands", ""]
        for name, info, _ in infos:
            cmd = info.get("command")
            text = shlex.join(cmd) if isinstance(cmd, list) else str(cmd)
            out += [f"- {name} (started {info.get('started', '?')}, in `{info.get('cwd', '?')}`):", "",
                    f"  ```bash\n  {text}\n  ```", ""]
    without = [r["name"] for r in runs if not r.get("info")]
    if without:
        out += missing(f"no run.json in {', '.join(without)} (written by train.py since runs record their "
                       "command, versions and hardware)", "python recipes/train.py")
    if infos:
        out += ["### Seeds, devices", ""]
        rows = []
        for name, info, seed in infos:
            rows.append([name, seed, info.get("device", "-"), info.get("num_processes", "-"),
                         info.get("mixed_precision", "-")])
        out += _table(["run", "seed", "device", "processes", "mixed precision"], rows, right=(1, 3))
        out += ["### Package versions", ""]
        out += _versions_table(infos)
        out += ["### Hardware", ""]
        hw_sets = {json.dumps(info.get("hardware") or {}, sort_keys=True): name for name, info, _ in infos}
        for hw_json, name in hw_sets.items():
            hw = json.loads(hw_json)
            label = "all runs" if len(hw_sets) == 1 else name
            out += [f"- {label}: " + ", ".join(f"{k} {v}" for k, v in hw.items()), ""]
    if main is not None and main.get("config"):
        out += [f"### Configuration of `{main['name']}`", "",
                f"`{main['path'] / 'config.yaml'}` (the resolved config the run trained with; "
                f"`python recipes/train.py --config {main['path'] / 'config.yaml'}` repeats it):", "",
                "```yaml", yaml.safe_dump(main["config"], sort_keys=False).rstrip(), "```", ""]
        others = [r for r in runs if r is not main and r.get("config")]
        for r in others:
            out += [f"<details><summary>config.yaml of <code>{r['name']}</code></summary>", "", "```yaml",
                    yaml.safe_dump(r["config"], sort_keys=False).rstrip(), "```", "", "</details>", ""]
    out += ["### This report", ""]
    if command:
        out += ["```bash", shlex.join(command), "```", ""]
    out += [f"Written {time.strftime('%Y-%m-%d %H:%M:%S %z')} by tinycnn {_version()}; its figures are in "
            "`figures/`.", ""]
    return out


def _versions_table(infos) -> List[str]:
    packages: List[str] = []
    for _, info, _ in infos:
        for k in (info.get("versions") or {}):
            if k not in packages:
                packages.append(k)
    columns = {}
    for name, info, _ in infos:
        key = json.dumps(info.get("versions") or {}, sort_keys=True)
        columns.setdefault(key, []).append(name)
    heads = ["package"] + (["version (all runs)"] if len(columns) == 1 else [", ".join(v) for v in columns.values()])
    rows = []
    for p in packages:
        rows.append([p] + [json.loads(k).get(p) or "-" for k in columns])
    return _table(heads, rows)


def _version() -> str:
    from . import __version__
    return __version__


# ============================================================================= the whole report

def _header(ctx: _Context, title: str) -> List[str]:
    out = [f"# {title}", "", f"Built from {len(ctx.inputs)} outputs of the tinycnn recipes, without re-running them.", ""]
    rows = []
    labels = {"shards": "shards", "checks": "checks", "lr_finder": "LR finder", "grid": "grid search",
              "run": "training run", "evaluation": "evaluation"}
    for kind in KINDS:
        for p in getattr(ctx.inputs, kind):
            extra = ""
            if kind == "run":
                r = next((r for r in ctx.runs if r["path"] == p), None)
                extra = f" ({'overfit' if r and r['kind'] == 'overfit' else 'full training'})" if r else ""
            rows.append([labels[kind] + extra, f"`{p}`"])
    for p, _ in ctx.manifests:
        if p.resolve() in ctx.discovered:
            rows.append(["shards (found at a run's data path)", f"`{p}`"])
    if rows:
        out += _table(["input", "path"], rows)
    for p in ctx.inputs.unrecognized:
        out += [f"> not recognized (no output of a tinycnn recipe in it): `{p}`", ""]
    for w in ctx.warnings:
        out += [f"> warning: {w}", ""]
    out += ["Contents: " + " · ".join(f"[{i}. {s}](#{i}-{s.lower().replace(' ', '-')})"
                                      for i, s in enumerate(SECTIONS, 1)), ""]
    return out


def build_report(paths: Sequence[Union[str, Path]], output: Union[str, Path], *, title: str = "Experiment report",
                 top: int = 5, command: Optional[Sequence[str]] = None) -> Path:
    """Write OUTPUT/report.md and OUTPUT/figures/*.png from the recipe outputs under `paths`; returns the
    report's path. `top`: classes listed among the most and the least accurate. `command`: shown under
    Reproducibility (recipes/report.py passes its own)."""
    _matplotlib()
    output = Path(output)
    inputs = collect(paths)
    figures = output / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    for old in figures.glob("*.png"):  # figures of an earlier report into the same folder
        old.unlink()
    ctx = _Context(inputs, output, top=top)
    body = []
    for section in (section_data, section_model, section_overfit, section_lr_finder, section_grid,
                    section_full_training, section_evaluation):
        body += section(ctx)
    body += section_reproducibility(ctx, command)
    lines = _header(ctx, title) + body  # the header lists the warnings met while writing the sections
    path = output / "report.md"
    tmp = output / "report.md.tmp"
    tmp.write_text("\n".join(lines).rstrip() + "\n")
    tmp.replace(path)
    return path


def report_summary(path: Union[str, Path]) -> Dict[str, Any]:
    """The sections of a written report, each with whether it notes a missing input, and its figures."""
    text = Path(path).read_text()
    sections = {}
    parts = re.split(r"^## ", text, flags=re.M)[1:]
    for part in parts:
        head = part.splitlines()[0]
        name = re.sub(r"^\d+\.\s*", "", head).strip()
        sections[name] = "**missing:**" in part
    figures = re.findall(r"!\[[^\]]*\]\((figures/[^)]+)\)", text)
    return {"sections": sections, "figures": figures}

