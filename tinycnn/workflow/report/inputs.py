"""Finding the recipes' outputs among the paths given, loading them, and resolving the data paths they name."""
import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import yaml

from .. import grid

__all__ = ["ReportError", "KINDS", "Inputs", "is_evaluation", "detect", "collect", "load_run", "load_grid",
           "load_lr_finder", "layer_table", "Loaded"]

KINDS = ("shards", "checks", "lr_finder", "grid", "run", "evaluation")
_SKIP_DIRS = {"tb", "state", "logs", "figures", "__pycache__"}
_MAX_DEPTH = 4


class ReportError(RuntimeError):
    """The report cannot be built (an input path that does not exist, matplotlib missing)."""


# ============================================================================= finding

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


MAX_JSON_BYTES = 64 << 20  # run.json, results.json: a few KiB when tinycnn writes them


def _read_json(path: Path) -> Any:
    """JSON from a folder someone else may have written: at most MAX_JSON_BYTES (ValueError beyond)."""
    with open(path, "rb") as f:
        raw = f.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise ValueError(f"{path} is larger than {MAX_JSON_BYTES >> 20} MiB")
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply") from None


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


_BY_NAME = {"manifest.json": "shards", "checks.json": "checks", "lr_finder.json": "lr_finder",
            "lr_finder.csv": "lr_finder", "results.json": "grid", "results.csv": "grid",
            "metrics.jsonl": "run", "config.yaml": "run", "run.json": "run"}
_NOT_EVALUATIONS = {"checks.json", "lr_finder.json", "results.json", "run.json", "manifest.json", "_info.json"}


def detect(path: Union[str, Path]) -> List[Tuple[str, Path]]:
    """The (kind, path) items `path` itself is (see the package docstring); [] when it is none of them.

    A file is classified by its name (manifest.json, checks.json, lr_finder.json/.csv, results.json,
    metrics.jsonl, config.yaml: the folder holding it) or, for other JSON, by its content (evaluation).
    A folder can be several kinds (e.g. checks and an LR finder written to the same folder); evaluation
    JSON files directly inside it are items of their own."""
    path = Path(path)
    if path.is_file():
        if path.name in _BY_NAME:
            return [(_BY_NAME[path.name], path.parent)]
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
    grid_tables = names & {"results.json", "results.csv"}
    if grid_tables or any(grid.is_run_folder(path / n) for n in names):
        found.append(("grid", path))
    if "metrics.jsonl" in names or ("config.yaml" in names and any(n.endswith(".safetensors") for n in names)):
        found.append(("run", path))
    for n in sorted(names):
        if n.endswith(".json") and n not in _NOT_EVALUATIONS and is_evaluation(path / n):
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


# ============================================================================= loading

def _read_yaml(path: Path) -> Optional[Dict[str, Any]]:
    """A run's config.yaml, read as the recipes read configs (size-capped, no aliases); None if unreadable."""
    from ...config import ConfigError, read_yaml
    try:
        return read_yaml(path)
    except ConfigError:
        return None


def checkpoint_metadata(path: Union[str, Path, None]) -> Optional[Dict[str, Any]]:
    """The metadata of a tinycnn safetensors file, None when there is no such readable file."""
    from ...weights import WeightsError, read_metadata
    if not path or not Path(path).is_file():
        return None
    try:
        return read_metadata(path)
    except (WeightsError, OSError, ValueError):
        return None


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
    checkpoint, meta = next(((p, m) for p in (run_dir / "best.safetensors", run_dir / "last.safetensors")
                             if (m := checkpoint_metadata(p)) is not None), (None, None))
    overfit = bool(config and (config.get("train") or {}).get("overfit_small"))
    return {"name": run_dir.name, "path": run_dir, "config": config, "metrics": grid.read_metrics(run_dir),
            "info": info, "checkpoint": checkpoint, "meta": meta, "kind": "overfit" if overfit else "full"}


def load_grid(grid_dir: Union[str, Path]) -> Dict[str, Any]:
    """A grid search folder: its sorted rows (tinycnn.workflow.grid.load_results: the tables, else the run folders
    with the states of their trials in study.db) with each run's per-epoch metrics, its points (mean ± sd over the
    seeds, for a grid with grid.seeds; else None), the base settings and the study (name, sampler, pruner) when
    recorded, and the run.json of its first run.

    Each row says which weights its val accuracy is of (`weights`: "raw" or "ema"), whether EMA weights were
    evaluated (`ema`) and the TTA (`tta`); tables written before they said so ranked the raw weights, and
    `ema` and `tta` are then read from the run's metrics."""
    grid_dir = Path(grid_dir)
    results = grid.load_results(grid_dir)
    rows = results["results"]
    for r in rows:
        r["metrics"] = grid.read_metrics(grid_dir / r["name"])
        if "weights" not in r:
            r["weights"] = "raw" if r.get("val_accuracy") is not None else None
        if "ema" not in r or "tta" not in r:  # results.csv without the columns, results.json of an older grid
            r["ema"] = r.get("ema") or any(m.get("val_ema/accuracy") is not None for m in r["metrics"])
            r["tta"] = r.get("tta") or next((m["tta"] for m in r["metrics"] if isinstance(m.get("tta"), str)), None)
    run_info = next((_read_json(grid_dir / r["name"] / "run.json") for r in rows
                     if (grid_dir / r["name"] / "run.json").is_file()), None)
    return {"name": grid_dir.name, "path": grid_dir, "rows": rows, "points": results.get("points"),
            "base": results.get("base"),
            "grid": results.get("grid"), "runs_planned": results.get("runs_planned"), "source": results["source"],
            "study": results.get("study"), "run_info": run_info}


def load_lr_finder(folder: Union[str, Path]) -> Dict[str, Any]:
    """lr_finder.json, or the points of lr_finder.csv with the suggestion recomputed from them."""
    from ..lr_finder import suggest_lr

    folder = Path(folder)
    if (folder / "lr_finder.json").is_file():
        result = _read_json(folder / "lr_finder.json")
        result["source"] = "lr_finder.json"
    else:
        def number(text):
            return float(text) if text not in (None, "") else None

        with open(folder / "lr_finder.csv", newline="") as f:
            points = [{"step": int(r["step"]), "lr": float(r["lr"]), "loss": number(r["loss"]),
                       "smoothed_loss": number(r["smoothed_loss"])} for r in csv.DictReader(f)]
        lrs = [p["lr"] for p in points]
        smoothed = [float("nan") if p["smoothed_loss"] is None else p["smoothed_loss"] for p in points]
        result = {"points": points, "num_points": len(points), "suggested_lr": suggest_lr(lrs, smoothed),
                  "min_lr": min(lrs) if lrs else None, "max_lr": max(lrs) if lrs else None,
                  "source": "lr_finder.csv (the suggestion recomputed from its smoothed loss)"}
    result["name"], result["path"] = folder.name, folder
    return result


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

    from ... import model as _registers  # noqa: F401  (the tinycnn timm models)

    kwargs = {"num_classes": int(arch["num_classes"]), "stage_channels": list(arch["stage_channels"]),
              "stage_repeats": list(arch["stage_repeats"])}
    if arch.get("in_chans"):
        kwargs["in_chans"] = int(arch["in_chans"])
    model = timm.create_model(arch.get("model") or "tinycnn", **kwargs).eval()
    layers, hooks = [], []

    def row(name, module, output_shape):
        return {"name": name, "type": type(module).__name__, "detail": _describe(module),
                "output_shape": output_shape, "parameters": sum(p.numel() for p in module.parameters())}

    def hook(name):
        def fn(module, inputs, output):
            layers.append(row(name, module, list(output.shape) if isinstance(output, torch.Tensor) else None))
        return fn

    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    hooks = [m.register_forward_hook(hook(n)) for n, m in leaves if not isinstance(m, torch.nn.Identity)]
    with torch.no_grad():
        out = model(torch.zeros(*input_size))
    for h in hooks:
        h.remove()
    # a leaf that never ran (none in tinycnn) still holds parameters: list it so the sum is the total
    seen = {r["name"] for r in layers}
    layers += [row(n, m, None) for n, m in leaves if n not in seen and any(True for _ in m.parameters())]
    return {"layers": layers, "total_parameters": sum(p.numel() for p in model.parameters()),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "input_shape": list(input_size), "output_shape": list(out.shape), "arch": kwargs,
            "model": arch.get("model") or "tinycnn"}


# ============================================================================= everything loaded

class Loaded:
    """The inputs loaded (a file that cannot be read becomes a warning), the shards' manifests (given, or
    found at the data paths the outputs recorded), and what the sections ask of them."""

    def __init__(self, inputs: Inputs):
        self.inputs = inputs
        self.warnings: List[str] = []
        self._layer_tables: Dict[Tuple, Optional[Dict[str, Any]]] = {}
        self.manifests = [(p, m) for p in inputs.shards
                          if (m := self._try(_read_json, p / "manifest.json")) is not None]
        self.checks = [(p, c) for p in inputs.checks if (c := self._try(_read_json, p / "checks.json")) is not None]
        self.lr_finders = [r for p in inputs.lr_finder if (r := self._try(load_lr_finder, p)) is not None]
        self.grids = [g for p in inputs.grid if (g := self._try(load_grid, p)) is not None]
        self.runs = [r for p in inputs.run if (r := self._try(load_run, p)) is not None]
        names = [r["name"] for r in self.runs]
        for r in self.runs:  # two folders of the same name: tell them apart by their parent
            if names.count(r["name"]) > 1:
                r["name"] = f"{r['path'].parent.name}/{r['path'].name}"
        self.evaluations = []
        for p in inputs.evaluation:
            e = self._try(_read_json, p)
            if e is not None:
                e["_path"], e["_name"] = p, p.stem
                self.evaluations.append(e)
        self.discovered = set()  # resolved paths of the manifests found at the data paths the outputs name
        self._discover_manifests()

    def _try(self, load, path: Path):
        try:
            return load(path)
        except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as e:
            self.warnings.append(f"could not read {path}: {e}")
            return None

    @property
    def overfit_runs(self) -> List[Dict[str, Any]]:
        return [r for r in self.runs if r["kind"] == "overfit"]

    @property
    def full_runs(self) -> List[Dict[str, Any]]:
        return [r for r in self.runs if r["kind"] == "full"]

    # --- the shards' manifest: given, or found where the outputs say their data was
    def _data_paths(self) -> List[Tuple[str, Optional[str]]]:
        """(data root, the folder it is relative to when known) of every output that recorded one."""
        hints = []
        for r in self.runs:
            root = ((r["config"] or {}).get("data") or {}).get("root")
            if root:
                hints.append((str(root), (r["info"] or {}).get("cwd")))
        hints += [(c["data"], None) for _, c in self.checks if c.get("data")]
        hints += [(e["data"], None) for e in self.evaluations if e.get("data")]
        hints += [(g["base"]["data"], (g["run_info"] or {}).get("cwd")) for g in self.grids
                  if (g["base"] or {}).get("data")]
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
        for root, cwd in self._data_paths():
            p = self._resolve(root, cwd)
            if p is not None and p.resolve() not in known:
                m = self._try(_read_json, p / "manifest.json")
                if m is not None:
                    self.manifests.append((p, m))
                    known.add(p.resolve())
                    self.discovered.add(p.resolve())

    def manifest(self, hint: Optional[str] = None) -> Tuple[Optional[Path], Optional[Dict[str, Any]]]:
        """The manifest an input refers to: a given shards folder first (the one at `hint` if several),
        else the one found at `hint`, else the first found."""
        explicit = [(p, m) for p, m in self.manifests if p.resolve() not in self.discovered]
        pool = explicit or self.manifests
        h = self._resolve(hint, None) if hint else None
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
            return {"model": meta.get("architecture") or cfg.get("model") or "tinycnn",
                    "num_classes": meta["num_classes"], "stage_channels": meta["stage_channels"],
                    "stage_repeats": meta["stage_repeats"], "in_chans": meta.get("in_chans", 3)}
        if cfg.get("stage_channels"):
            _, m = self.manifest((cfg.get("data") or {}).get("root"))
            n = int(m["num_classes"]) if m else self.num_classes()
            if n:
                return {"model": cfg.get("model") or "tinycnn", "num_classes": n,
                        "stage_channels": cfg["stage_channels"], "stage_repeats": cfg["stage_repeats"]}
        return None

    def layers(self, arch: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
        """The layer table of `arch` (built once per architecture); None, with a warning, for a model timm lacks."""
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

    # --- runs
    def evaluated_run(self, evaluation: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """The run folder among the inputs whose checkpoint the evaluation evaluated."""
        ckpt = evaluation.get("checkpoint")
        if not ckpt:
            return None
        file, folder = Path(ckpt).name, Path(ckpt).parent.name
        for r in self.runs:  # the same file, else the same folder name holding a file of that name
            p = r["path"] / file
            if Path(ckpt).is_file() and p.is_file() and p.resolve() == Path(ckpt).resolve():
                return r
        for r in self.runs:
            if r["path"].name == folder and (r["path"] / file).is_file():
                return r
        return None

    def main_run(self) -> Optional[Dict[str, Any]]:
        """The run the report is about: the evaluated one, else the first full training run, else any run."""
        for e in self.evaluations:
            r = self.evaluated_run(e)
            if r is not None:
                return r
        return (self.full_runs or self.runs or [None])[0]
