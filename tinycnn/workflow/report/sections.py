"""The report's eight sections, as in the course report. Each fills a `Section` (its Markdown lines and the
inputs it lacks) from the loaded inputs; a missing input is a note naming the recipe that writes it."""
import json
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from .. import grid
from ...formatting import count, number, percent, sci
from .figures import (Figures, plot_class_distribution, plot_classes, plot_comparison, plot_effects, plot_grid_curves,
                      plot_lr_finder, plot_overfit, plot_training)
from .inputs import KINDS, Loaded, checkpoint_metadata

__all__ = ["SECTIONS", "HPARAMS", "Section", "hyperparameter_effects", "class_extremes", "holdout_note",
           "markdown_table", "header", "weights_and_tta"]

SECTIONS = ["Data", "Model", "Overfit run", "LR finder", "Grid search", "Full training", "Final evaluation",
            "Reproducibility"]
HPARAMS = [("lr", "learning rate"), ("weight_decay", "weight decay"), ("stage_channels", "channels"),
           ("stage_repeats", "repeats per stage")]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> List[str]:
    """A Markdown table (the columns in `right` right-aligned) and a blank line."""
    def cell(v):
        return str(v).replace("|", "\\|").replace("\n", " ")
    return ["| " + " | ".join(headers) + " |",
            "|" + "|".join("---:" if i in right else "---" for i in range(len(headers))) + "|",
            *("| " + " | ".join(cell(v) for v in row) + " |" for row in rows), ""]


@dataclass
class Section:
    """One section of the report: its Markdown lines below the heading, and the inputs it had to do without."""
    number: int
    title: str
    lines: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)

    def add(self, *lines: str):
        self.lines.extend(lines)

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()):
        self.add(*markdown_table(headers, rows, right))

    def missing_input(self, what: str, command: str):
        """Note an input that was not given: what, and the command that writes it."""
        self.missing.append(what)
        self.add(f"> **missing:** {what}: run `{command}` and pass its output to the report.", "")

    def markdown(self) -> List[str]:
        return [f"## {self.number}. {self.title}", "", *self.lines]


# ============================================================================= what the sections compute

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
            entries.append({"value": list(k) if isinstance(k, tuple) else k, "label": grid.format_value(key, k),
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


def weights_and_tta(weights: Optional[str], tta: Optional[str], short: bool = False) -> str:
    """What an accuracy was measured on: 'raw weights, no TTA', 'EMA weights, flip TTA' (short: 'raw, no TTA',
    'EMA, flip TTA'); weights None: not known (no checkpoint metadata)."""
    names = {"raw": "raw", "ema": "EMA"}
    if weights in names or not weights:
        w = names.get(weights, "?") + ("" if short else " weights")
    else:  # a point over seeds: each seed's better weights, e.g. "ema 1, raw 1"
        per_seed = str(weights).replace("ema", "EMA")
        w = per_seed if short else f"weights per seed {per_seed}"
    return f"{w}, {f'{tta} TTA' if tta else 'no TTA'}"


def _checkpoint_weights(extra: Dict[str, Any]) -> str:
    """A tinycnn checkpoint's weights: its metadata's extra.weights; "raw" for one saved before train.ema was."""
    return extra.get("weights") or "raw"


def _short(v: Any) -> Any:
    """Floats to 3 significant digits, also inside lists (for one-line settings)."""
    if isinstance(v, float):
        return sci(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(str(_short(x)) for x in v) + "]"
    return v


def _settings(cfg: Optional[Dict[str, Any]]) -> str:
    """The training settings of a config in one line, as train.py applies them (RunPlan: an overfit run
    trains without augmentation, weight decay and label smoothing whatever the config says)."""
    from ...config import ConfigError, from_dict
    from ...plan import RunPlan

    if not cfg:
        return "(no config.yaml)"
    try:
        run = from_dict(cfg)
    except ConfigError as e:
        return f"(config.yaml not readable: {e})"
    t, plan, d = run.train, RunPlan.from_config(run), run.data
    splits = (f", trained on split `{d.train_split}`, validated on `{d.val_split}`"
              if (d.train_split, d.val_split) != ("train", "val") else "")
    return (f"{t.optimizer.name} lr {sci(t.optimizer.lr)}, weight decay {sci(plan.weight_decay)}, scheduler "
            f"{t.scheduler.name}, batch {t.batch_size}, label smoothing {plan.label_smoothing}, "
            f"augmentation {'on' if plan.augment else 'off'}{splits}")


# ============================================================================= 1. Data

def section_data(ctx: Loaded, figs: Figures, s: Section):
    from ..checks import split_stats

    path, manifest = ctx.manifest()
    checks = ctx.checks[0][1] if ctx.checks else None
    if manifest is None and checks is None:
        return s.missing_input("no shards folder (manifest.json, written by tinycnn-prepare) and no checks.json",
                               "python recipes/checks.py --data SHARDS --output checkpoints/checks")
    if manifest is not None:
        src = manifest.get("source") or {}
        holdout = manifest.get("holdout_per_class")
        scheme = (f"`val` = {holdout} images per class held out of the official train split (chooses checkpoints), "
                  f"`test` = the official validation images (reported once)" if holdout else
                  "`val` = the official validation images (the course project's scheme, `--holdout 0`: no separate test split)")
        s.add(f"Shards: `{path}`, prepared from the {src.get('kind', '?')} `{src.get('path', '?')}` "
              f"(format {manifest.get('format')} v{manifest.get('format_version')}, tinycnn "
              f"{manifest.get('tinycnn_version', '?')}, seed {manifest.get('seed')}). "
              f"{manifest['num_classes']} classes, input shape {tuple(manifest.get('input_shape', []))}. "
              f"Splits: `train` = the official train images{' minus the held-out ones' if holdout else ''}; {scheme}.",
              "")
        if manifest.get("skipped"):
            s.add(f"{len(manifest['skipped'])} source images were skipped as unreadable "
                  f"(listed in manifest.json; e.g. {manifest['skipped'][0].get('file')}).", "")
        stats = split_stats(manifest)
    else:
        s.add("Split statistics from checks.json (the shards' manifest.json was not among the inputs; "
              "pass the shards folder for its source and split scheme).", "")
        stats = checks["splits"]
    rows, gray_total, total = [], 0, 0
    for name, st in stats.items():
        gray = st.get("grayscale")
        gray_total += gray or 0
        total += st["num_samples"]
        gray_cell = "-" if gray is None else f"{gray:,} ({gray / max(st['num_samples'], 1):.1%})"
        rows.append([name, count(st["num_samples"]), gray_cell, st.get("num_shards", "-"),
                     st.get("classes_present", "-"), st.get("min_per_class", "-"),
                     number(st.get("mean_per_class"), ".1f"), st.get("max_per_class", "-")])
    s.table(["split", "images", "grayscale", "shards", "classes", "min/class", "mean/class", "max/class"],
            rows, right=range(1, 8))
    s.add(f"Grayscale: {gray_total:,} of {total:,} images ({gray_total / max(total, 1):.1%}) have one channel; the "
          "loader decodes them to 3 identical channels.", "")
    names = [c.get("name", c["wnid"]) for c in manifest["classes"]] if manifest else None
    if any(st.get("class_counts") for st in stats.values()):
        s.add(plot_class_distribution(figs, stats, names), "")

    s.add("### Augmentation", "")
    if checks is None:
        return s.missing_input("no augmentation grid, no batch check (no checks.json)", "python recipes/checks.py")
    grid_png = ctx.checks[0][0] / "augment_grid.png"
    aug = checks.get("augment") or {}
    if grid_png.is_file():
        s.add(figs.copy(grid_png, "augment_grid", "the same images before and after augmentation"), "",
              f"{checks.get('augment_grid_images', '?')} training images; each row of originals is followed by the "
              "row of the same images after the training augmentation (GPUAugment, denormalized for display).", "")
    else:
        s.missing_input(f"{grid_png} (the augmentation grid)", "python recipes/checks.py")
    if aug:
        s.add("Augmentation settings: " + ", ".join(f"{k} {_short(v)}" for k, v in aug.items()) + ".", "")
    s.add("### A batch", "")
    batch = checks.get("batch") or {}
    shape, expected = checks.get("batch_shape"), checks.get("input_shape")
    if shape:
        ok = list(shape[1:]) == list(expected or [])
        s.add(f"A training batch has shape {tuple(shape)} ({batch.get('dtype', 'uint8')}, labels "
              f"{tuple(batch.get('labels_shape', [shape[0]]))}) against the manifest's input_shape "
              f"{tuple(expected or [])}: **{'matches' if ok else 'DIFFERS'}** (B = train.batch_size; the loader "
              "yields uint8 and the augmentation converts to float on the device).", "")


# ============================================================================= 2. Model

def section_model(ctx: Loaded, figs: Figures, s: Section):
    run = ctx.main_run()
    arch, source = None, None
    if run is not None:
        arch = ctx.run_arch(run)
        source = f"the checkpoint `{run['checkpoint']}`" if run.get("meta") else f"`{run['path'] / 'config.yaml'}`"
    if arch is None and ctx.checks:
        cpath, c = ctx.checks[0]
        m = c.get("model") or {}
        if m.get("stage_channels"):
            arch = {"model": m.get("name"), "stage_channels": m["stage_channels"], "stage_repeats": m["stage_repeats"],
                    "num_classes": c["num_classes"]}
            source = f"`{cpath / 'checks.json'}`"
    table = ctx.layers(arch)
    if table is None:
        s.missing_input("no model to describe (no run folder with config.yaml or a checkpoint, no checks.json)",
                        "python recipes/train.py")
    else:
        a = table["arch"]
        s.add(f"`{table['model']}` with stage_channels {a['stage_channels']}, stage_repeats {a['stage_repeats']}, "
              f"{a['num_classes']} classes (from {source}), built with timm; output shapes from forward hooks on a "
              f"{tuple(table['input_shape'])} input (shapes without the batch dimension: channels x height x width).",
              "")
        rows = []
        for i, layer in enumerate(table["layers"], 1):
            shape = " x ".join(map(str, layer["output_shape"][1:])) if layer["output_shape"] else "-"
            rows.append([i, f"`{layer['name']}`", layer["type"], layer["detail"], shape, count(layer["parameters"])])
        total = table["total_parameters"]
        rows.append(["", "**total**", "", "", " x ".join(map(str, table["output_shape"][1:])), f"**{total:,}**"])
        s.table(["#", "layer", "type", "settings", "output shape", "parameters"], rows, right=(0, 5))
        s.add(f"Total parameters: **{total:,}** ({table['trainable_parameters']:,} trainable; the sum of the "
              "table's rows).", "")
        others = _other_architectures(ctx, table)
        if others:
            s.add("Other models among the inputs:", "")
            s.table(["runs", "stage_channels", "stage_repeats", "parameters"], others, right=(3,))

    s.add("### Checks before training", "")
    if not ctx.checks:
        return s.missing_input("no initial-loss check and no baselines (no checks.json)", "python recipes/checks.py")
    _, c = ctx.checks[0]
    cm = c.get("model") or {}
    if table is not None and cm.get("stage_channels") and (
            list(cm["stage_channels"]) != list(table["arch"]["stage_channels"])
            or list(cm["stage_repeats"]) != list(table["arch"]["stage_repeats"])):
        s.add(f"(The checks ran on stage_channels {cm['stage_channels']}, stage_repeats {cm['stage_repeats']}, "
              "not on the model above.)", "")
    il = c.get("initial_loss") or {}
    n = c.get("num_classes")
    if il:
        s.add(f"**Initial loss**: the untrained model's cross-entropy on one augmented training batch is "
              f"**{number(il.get('observed'), '.3f')}**, against ln({n}) = {number(il.get('expected'), '.3f')} for a "
              f"uniform prediction (difference {number(il.get('difference'), '+.3f')}, tolerance "
              f"{il.get('tolerance')}): **{'ok' if il.get('ok') else 'FLAGGED'}**.", "")
    gr = c.get("gradients") or {}
    if gr:
        s.add("**Gradients** after one backward pass: "
              + (f"all {gr.get('num_param_tensors')} parameter tensors get a non-zero gradient (norm "
                 f"{sci(gr.get('grad_norm'))})" if gr.get("ok") else
                 f"{gr.get('num_params_with_zero_grad')} without gradient "
                 f"({', '.join(gr.get('params_with_zero_grad', [])[:5])})") + ".", "")
    b = c.get("baselines") or {}
    if b:
        mc, ur = b.get("majority_class") or {}, b.get("uniform_random") or {}
        s.add(f"**Baselines** on `val` ({b.get('num_val_samples', '?')} images): what a model must beat.", "")
        s.table(["baseline", "top-1 accuracy", "note"], [
            ["majority class", percent(mc.get("accuracy")),
             f"class {mc.get('class')} ({mc.get('wnid')}), {mc.get('train_count')} train images"
             + (f", tied with {mc['tied_classes'] - 1} other classes" if (mc.get("tied_classes") or 1) > 1 else "")],
            ["uniform random", percent(ur.get("accuracy")),
             f"seed {ur.get('seed')}; expected 1/{n} = {percent(ur.get('expected'))}"],
        ], right=(1,))


def _other_architectures(ctx: Loaded, shown: Dict[str, Any]) -> List[List[Any]]:
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
        if key != mine:
            t = ctx.layers(archs[key])
            rows.append([", ".join(names), list(key[0]), list(key[1]), count(t["total_parameters"] if t else None)])
    return rows


# ============================================================================= 3. Overfit run

def section_overfit(ctx: Loaded, figs: Figures, s: Section):
    runs = ctx.overfit_runs
    if not runs:
        return s.missing_input("no overfit run (a run folder whose config.yaml has train.overfit_small: true)",
                               "python recipes/train.py --config recipes/configs/overfit.yaml "
                               "--output checkpoints/overfit")
    for run in runs:
        t = (run["config"] or {}).get("train") or {}
        rec = run["metrics"]
        if len(runs) > 1:
            s.add(f"### {run['name']}", "")
        s.add(f"`{run['path']}`: a fixed subset of {t.get('overfit_small_size', '?')} training images "
              f"(train.overfit_small), {_settings(run['config'])}; val on {t.get('val_subset_size') or 'all'} "
              "images.", "")
        if not rec:
            s.missing_input(f"no metrics.jsonl in {run['path']}",
                            "python recipes/train.py --config recipes/configs/overfit.yaml")
            continue
        s.add(plot_overfit(figs, run), "")
        best = grid.best_val(rec)
        first, last = rec[0]["train/loss"], rec[-1]["train/loss"]
        s.add(f"Train loss {first:.4f} after epoch 1 -> **{last:.4f}** after epoch {rec[-1]['epoch']} "
              f"({(last - first) / first:+.0%}); "
              + (f"best val accuracy **{percent(best['accuracy'])}** (epoch {best['epoch']}), "
                 f"{weights_and_tta(best['weights'], best['tta'])}; val loss "
                 f"{number(rec[-1].get('val/loss'))} at the end. " if best else "no val evaluation. ")
              + "A model that can learn drives the train loss towards 0 on so few images while the val loss "
                "stops falling or rises, and the train accuracy approaches 100%.", "")


# ============================================================================= 4. LR finder

def section_lr_finder(ctx: Loaded, figs: Figures, s: Section):
    if not ctx.lr_finders:
        return s.missing_input("no LR finder output (lr_finder.json / lr_finder.csv)",
                               "python recipes/lr_finder.py --output checkpoints/lr_finder")
    for r in ctx.lr_finders:
        if len(ctx.lr_finders) > 1:
            s.add(f"### {r['name']}", "")
        m = r.get("model") or {}
        s.add(f"`{r['path']}` ({r['source']}): the model trained from scratch for {r.get('num_points', '?')} of "
              f"{r.get('num_iters', '?')} steps while the lr grows log-spaced from {sci(r.get('min_lr'))} to "
              f"{sci(r.get('max_lr'))}"
              + (f"; {r.get('optimizer')}, weight decay {sci(r.get('weight_decay'))}, batch {r.get('batch_size')}, "
                 f"stage_channels {m.get('stage_channels')}, stage_repeats {m.get('stage_repeats')}"
                 if r.get("optimizer") else "") + ".", "")
        if not r.get("points"):
            s.add("The sweep holds no points.", "")
            continue
        s.add(plot_lr_finder(figs, r), "")
        sug = r.get("suggested_lr")
        s.table(["", "value"], [
            ["suggested lr (steepest descent of the smoothed loss)", f"**{sci(sug)}**" if sug else "none (the loss never fell)"],
            ["lr at the lowest smoothed loss", sci(r.get("min_loss_lr"))],
            ["lowest smoothed loss", number(r.get("best_smoothed_loss"))],
            ["stopped early", f"yes: {r.get('stop_reason')}" if r.get("stopped_early") else "no"]], right=(1,))
        if sug:
            s.add(f"Train with `train.optimizer.lr={sug:.2g}` or a little below (the steepest descent, not the "
                  "minimum, is the usual pick).", "")


# ============================================================================= 5. Grid search

def section_grid(ctx: Loaded, figs: Figures, s: Section):
    if not ctx.grids:
        return s.missing_input("no grid search folder (results.json or gs_* run folders)",
                               "python recipes/grid_search.py --output checkpoints/grid_search")
    v = grid.format_value
    for g in ctx.grids:
        if len(ctx.grids) > 1:
            s.add(f"### {g['name']}", "")
        rows, points = g["rows"], g.get("points")
        base = g.get("base") or {}
        planned = g.get("runs_planned")
        seeds = sorted({r["seed"] for r in rows if r.get("seed") is not None})
        seeds_text = (f"seeds {', '.join(map(str, seeds))} (each point once per seed)" if seeds
                      else f"seed {base.get('seed')}")
        s.add(f"`{g['path']}` (from {g['source']}): {len(rows)} runs"
              + (f" of {planned} planned" if planned and planned != len(rows) else "")
              + (f" ({len(points)} points x {len(seeds)} seeds)" if points else "")
              + (f", {base.get('epochs')} epoch{'s' if base.get('epochs') != 1 else ''} each, "
                 f"{base.get('optimizer')} with scheduler {base.get('scheduler')}, "
                 f"batch {base.get('batch_size')}, {seeds_text}" if base else (f", {seeds_text}" if seeds else ""))
              + ("; points ranked by the mean of their seeds' best val accuracy (mean ± sample standard deviation, "
                 "n: the seeds whose run finished), then every run" if points else
                 "; sorted by best val accuracy (the epoch's val loss beside it)") + ".", "")
        if not rows:
            s.add("No runs.", "")
            continue
        note = grid.evaluation_note(rows)
        s.add(note or "Val accuracy of the raw weights (no train.ema), without TTA.", "")
        if points:
            s.table(["#", "point", "lr", "weight decay", "channels", "repeats", "parameters",
                     "best val acc, mean ± sd (n)", "val loss, mean ± sd (n)", "weights, TTA", "status"],
                    [[p.get("rank"), f"`{grid.short_name(p['index'])}`", v("lr", p["lr"]),
                      v("weight_decay", p["weight_decay"]), v("stage_channels", p["stage_channels"]),
                      v("stage_repeats", p["stage_repeats"]), v("num_parameters", p.get("num_parameters")),
                      grid.format_spread(p), grid.format_spread(p, "val_loss"),
                      weights_and_tta(p.get("weights"), p.get("tta"), short=True) if p.get("n") else "-",
                      v("status", p.get("status"))] for p in points],
                    right=(0, 2, 3, 6, 7, 8))
            s.add("#### Every run" if len(ctx.grids) > 1 else "### Every run", "")
        s.table(["#", "run", *(["seed"] if seeds else []), "lr", "weight decay", "channels", "repeats", "parameters",
                 "best val acc", "val loss", "epoch", "weights, TTA", "status"],
                [[r.get("rank"), f"`{grid.run_label(r['index'], r.get('seed'))}`",
                  *([v("seed", r.get("seed"))] if seeds else []), v("lr", r["lr"]),
                  v("weight_decay", r["weight_decay"]), v("stage_channels", r["stage_channels"]),
                  v("stage_repeats", r["stage_repeats"]), v("num_parameters", r.get("num_parameters")),
                  v("val_accuracy", r.get("val_accuracy")), v("val_loss", r.get("val_loss")),
                  v("best_epoch", r.get("best_epoch")),
                  weights_and_tta(r.get("weights"), r.get("tta"), short=True) if r.get("val_accuracy") is not None
                  else "-", v("status", r.get("status"))] for r in rows],
                right=[0, *(i + bool(seeds) for i in (2, 3, 6, 7, 8, 9)), *([2] if seeds else [])])
        best_point = points[0] if points and points[0].get("val_accuracy") is not None else None
        best = best_point or (rows[0] if rows[0].get("val_accuracy") is not None else None)
        if best:
            how = weights_and_tta(best.get("weights"), best.get("tta"))
            figure = (f"a mean best val accuracy of {grid.format_spread(best)} over its seeds ({how})" if best_point
                      else f"{percent(best['val_accuracy'])} val accuracy ({how})")
            s.add(f"Best: **{best['name']}** with {figure}: "
                  f"`train.optimizer.lr={v('lr', best['lr'])} "
                  f"train.optimizer.weight_decay={v('weight_decay', best['weight_decay'])} "
                  f"stage_channels=[{','.join(map(str, best['stage_channels']))}] "
                  f"stage_repeats=[{','.join(map(str, best['stage_repeats']))}]`.", "")
        if any(r["metrics"] for r in rows):
            s.add(plot_grid_curves(figs, g), "")
        effects = hyperparameter_effects(rows)
        s.add("### Effect of each hyperparameter" if len(ctx.grids) == 1 else "#### Effect of each hyperparameter", "",
              "Mean best val accuracy of the runs with each value (the other hyperparameters vary over the grid"
              + ("; each seed's run counts once" if seeds else "") + ").", "")
        if any(e["mean_val_accuracy"] is not None for es in effects.values() for e in es):
            s.add(plot_effects(figs, g, effects, HPARAMS), "")
        s.table(["hyperparameter", "value", "runs", "mean best val acc", "best val acc"],
                [[label, e["label"], e["runs"] if e["with_result"] == e["runs"] else f"{e['with_result']} of {e['runs']}",
                  percent(e["mean_val_accuracy"]), percent(e["best_val_accuracy"])]
                 for key, label in HPARAMS for e in effects[key]], right=(2, 3, 4))


# ============================================================================= 6. Full training

def _full_run_summary(ctx: Loaded, run: Dict[str, Any]) -> List[Any]:
    rec = run["metrics"]
    best = grid.best_val(rec)
    t = (run["config"] or {}).get("train") or {}
    o, sched = t.get("optimizer") or {}, t.get("scheduler") or {}
    table = ctx.layers(ctx.run_arch(run))
    speed = [r["images_per_sec"] for r in rec if r.get("images_per_sec")]
    return [f"`{run['name']}`", count(table["total_parameters"] if table else None),
            f"{o.get('name', '-')} {sci(o.get('lr'))}", sci(o.get("weight_decay")), sched.get("name", "-"),
            t.get("batch_size", "-"), t.get("label_smoothing", "-"), rec[-1]["epoch"] if rec else 0,
            f"**{percent(best['accuracy'])}** (epoch {best['epoch']})" if best else "-",
            weights_and_tta(best["weights"], best["tta"], short=True) if best else "-",
            number(rec[-1].get("val/loss")) if rec else "-", f"{sum(speed) / len(speed):,.0f}" if speed else "-"]


def section_full_training(ctx: Loaded, figs: Figures, s: Section):
    runs = ctx.full_runs
    if not runs:
        return s.missing_input("no training run (a run folder with metrics.jsonl, not an overfit run)",
                               "python recipes/train.py --output checkpoints/recommended")
    s.table(["run", "parameters", "optimizer lr", "weight decay", "scheduler", "batch", "label smoothing",
             "epochs", "best val acc", "weights, TTA", "final val loss", "img/s"],
            [_full_run_summary(ctx, r) for r in runs], right=(1, 5, 6, 7, 8, 10, 11))
    s.add("Best val accuracy: with train.ema the better of the raw and the EMA weights' (as best.safetensors keeps "
          "them), measured with the TTA of the run's evaluations (train.tta); column weights, TTA says which.", "")
    for run in runs:
        s.add(f"### {run['name']}", "", f"`{run['path']}`: {_settings(run['config'])}.", "")
        if not run["metrics"]:
            s.missing_input(f"no metrics.jsonl in {run['path']}", "python recipes/train.py")
            continue
        s.add(plot_training(figs, run), "")
        extra = (run.get("meta") or {}).get("extra") or {}
        if run.get("checkpoint") and extra.get("val_accuracy") is not None:
            s.add(f"Best checkpoint `{run['checkpoint'].name}`: epoch {extra.get('epoch')}, val accuracy "
                  f"{percent(extra['val_accuracy'])} on split `{extra.get('val_split', 'val')}` "
                  f"({weights_and_tta(_checkpoint_weights(extra), extra.get('tta'))}).", "")
    if len(runs) > 1:
        s.add("### Comparison", "", plot_comparison(figs, runs), "")


# ============================================================================= 7. Final evaluation

def section_evaluation(ctx: Loaded, figs: Figures, s: Section, top: int = 5):
    if not ctx.evaluations:
        return s.missing_input("no evaluation JSON",
                               "python recipes/evaluate.py --checkpoint checkpoints/recommended/best.safetensors "
                               "--split test --json checkpoints/test.json")
    def evaluated_weights(e):
        meta = (ctx.evaluated_run(e) or {}).get("meta") or checkpoint_metadata(e.get("checkpoint"))
        return _checkpoint_weights(meta.get("extra") or {}) if meta else None

    s.table(["evaluation", "split", "images", "top-1", "top-5", "loss", "weights, TTA", "checkpoint"],
            [[f"`{e['_name']}`", f"`{e.get('split')}`", count(e.get("num_samples", 0)),
              f"**{percent(e.get('accuracy'))}**", percent(e.get("top5")), number(e.get("loss")),
              weights_and_tta(evaluated_weights(e), e.get("tta"), short=True),
              f"`{e.get('checkpoint', '-')}`"] for e in ctx.evaluations], right=(2, 3, 4, 5))
    s.add("Weights: the evaluated checkpoint's (its metadata: raw, or EMA with train.ema; ? when the checkpoint "
          "was not found); TTA: the evaluation's own (`recipes/evaluate.py --tta flip`).", "")
    for e in ctx.evaluations:
        if len(ctx.evaluations) > 1:
            s.add(f"### {e['_name']}", "")
        _, manifest = ctx.manifest(e.get("data"))
        s.add(holdout_note(e, manifest), "")
        run = ctx.evaluated_run(e)
        meta = (run or {}).get("meta") or checkpoint_metadata(e.get("checkpoint"))
        extra = (meta or {}).get("extra") or {}
        if extra.get("val_accuracy") is not None:
            origin = f"run `{run['name']}`" if run else f"`{e.get('checkpoint')}`"
            s.add(f"The checkpoint comes from {origin} (epoch {extra.get('epoch')}), chosen with "
                  f"{percent(extra['val_accuracy'])} on `{extra.get('val_split', 'val')}` "
                  f"({weights_and_tta(_checkpoint_weights(extra), extra.get('tta'))}).", "")
            if extra.get("val_split") == e.get("split"):
                s.add(f"> **caution:** the checkpoint was chosen on `{e.get('split')}`, the split evaluated here: "
                      "this accuracy is a validation figure, not a test result.", "")
        most, least = class_extremes(e["per_class"], top)
        if not most:
            continue
        s.add(f"Most and least accurate classes on `{e.get('split')}` ({len(e['per_class'])} classes):", "")
        s.table(["", "rank", "class", "wnid", "name", "accuracy", "images"],
                [[which, i + 1, c["index"], c["wnid"], c["name"], percent(c["accuracy"], 1), c.get("num_samples", "-")]
                 for which, classes in (("most", most), ("least", least)) for i, c in enumerate(classes)],
                right=(1, 2, 5, 6))
        s.add(plot_classes(figs, e), "")


# ============================================================================= 8. Reproducibility

def section_reproducibility(ctx: Loaded, figs: Figures, s: Section, command: Optional[Sequence[str]] = None):
    runs = ctx.full_runs + ctx.overfit_runs
    # (name, run.json, seed) of every training run, of one run per grid search, of the checks and LR finders
    infos = [(r["name"], r["info"], (((r.get("config") or {}).get("train") or {}).get("seed", "-")))
             for r in runs if r.get("info")]
    infos += [(f"grid search {g['name']} (its first run)", g["run_info"], _grid_seeds(g)) for g in ctx.grids
              if g.get("run_info")]
    infos += [(f"checks {Path(path).name}", c["environment"], "-") for path, c in ctx.checks if c.get("environment")]
    infos += [(f"LR finder {r['name']}", r["environment"], "-") for r in ctx.lr_finders if r.get("environment")]
    main = ctx.main_run()
    if not runs and not infos:
        s.missing_input("no training run folder (config.yaml, run.json)", "python recipes/train.py")
    if infos:
        s.add("### Commands", "")
        for name, info, _ in infos:
            cmd = info.get("command")
            text = shlex.join(cmd) if isinstance(cmd, list) else str(cmd)
            s.add(f"- {name} (started {info.get('started', '?')}, in `{info.get('cwd', '?')}`):", "",
                  f"  ```bash\n  {text}\n  ```", "")
    without = [r["name"] for r in runs if not r.get("info")]
    if without:
        s.missing_input(f"no run.json in {', '.join(without)} (written by train.py since runs record their "
                        "command, versions and hardware)", "python recipes/train.py")
    if infos:
        s.add("### Seeds, devices", "")
        s.table(["run", "seed", "device", "processes", "mixed precision"],
                [[name, seed, info.get("device", "-"), info.get("num_processes", "-"), info.get("mixed_precision", "-")]
                 for name, info, seed in infos], right=(1, 3))
        s.add("### Package versions", "")
        _versions_table(s, infos)
        s.add("### Hardware", "")
        hw_sets = {json.dumps(info.get("hardware") or {}, sort_keys=True): name for name, info, _ in infos}
        for hw_json, name in hw_sets.items():
            label = "all runs" if len(hw_sets) == 1 else name
            s.add(f"- {label}: " + ", ".join(f"{k} {v}" for k, v in json.loads(hw_json).items()), "")
    if main is not None and main.get("config"):
        s.add(f"### Configuration of `{main['name']}`", "",
              f"`{main['path'] / 'config.yaml'}` (the resolved config the run trained with; "
              f"`python recipes/train.py --config {main['path'] / 'config.yaml'}` repeats it):", "",
              "```yaml", yaml.safe_dump(main["config"], sort_keys=False).rstrip(), "```", "")
        for r in runs:
            if r is not main and r.get("config"):
                s.add(f"<details><summary>config.yaml of <code>{r['name']}</code></summary>", "", "```yaml",
                      yaml.safe_dump(r["config"], sort_keys=False).rstrip(), "```", "", "</details>", "")
    s.add("### This report", "")
    if command:
        s.add("```bash", shlex.join(command), "```", "")
    from ... import __version__
    s.add(f"Written {time.strftime('%Y-%m-%d %H:%M:%S %z')} by tinycnn {__version__}; its figures are in "
          "`figures/`.", "")


def _grid_seeds(g: Dict[str, Any]) -> Any:
    """The seed of a grid's runs, or its seeds (grid.seeds: one run per seed)."""
    seeds = sorted({r["seed"] for r in g["rows"] if r.get("seed") is not None})
    return ", ".join(map(str, seeds)) if seeds else (g.get("base") or {}).get("seed", "-")


def _versions_table(s: Section, infos):
    packages: List[str] = []
    for _, info, _ in infos:
        packages += [k for k in (info.get("versions") or {}) if k not in packages]
    columns: Dict[str, List[str]] = {}
    for name, info, _ in infos:
        columns.setdefault(json.dumps(info.get("versions") or {}, sort_keys=True), []).append(name)
    heads = ["package"] + (["version (all runs)"] if len(columns) == 1 else [", ".join(v) for v in columns.values()])
    s.table(heads, [[p] + [json.loads(k).get(p) or "-" for k in columns] for p in packages])


# ============================================================================= the header

_LABELS = {"shards": "shards", "checks": "checks", "lr_finder": "LR finder", "grid": "grid search",
           "run": "training run", "evaluation": "evaluation"}


def header(ctx: Loaded, title: str) -> List[str]:
    """The title, the inputs found (and the ones not recognized), the warnings met, the contents."""
    out = [f"# {title}", "", f"Built from {len(ctx.inputs)} outputs of the tinycnn recipes, without re-running them.",
           ""]
    rows = []
    for kind in KINDS:
        for p in getattr(ctx.inputs, kind):
            extra = ""
            if kind == "run":
                r = next((r for r in ctx.runs if r["path"] == p), None)
                extra = f" ({'overfit' if r['kind'] == 'overfit' else 'full training'})" if r else ""
            rows.append([_LABELS[kind] + extra, f"`{p}`"])
    rows += [["shards (found at a run's data path)", f"`{p}`"] for p, _ in ctx.manifests if p.resolve() in ctx.discovered]
    if rows:
        out += markdown_table(["input", "path"], rows)
    for p in ctx.inputs.unrecognized:
        out += [f"> not recognized (no output of a tinycnn recipe in it): `{p}`", ""]
    for w in ctx.warnings:
        out += [f"> warning: {w}", ""]
    out += ["Contents: " + " · ".join(f"[{i}. {t}](#{i}-{t.lower().replace(' ', '-')})"
                                      for i, t in enumerate(SECTIONS, 1)), ""]
    return out
