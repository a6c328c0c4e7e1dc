"""The report's figures: PNG files in OUTPUT/figures, drawn with matplotlib's Agg canvas (no pyplot, so the
user's backend is left alone). Each `plot_*` saves one figure and returns its Markdown image line."""
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .. import grid
from ..lr_finder import REPORT_HINT  # one install hint for every plot
from .inputs import ReportError

__all__ = ["REPORT_HINT", "DPI", "require_matplotlib", "Figures", "plot_class_distribution", "plot_overfit",
           "plot_lr_finder", "plot_grid_curves", "plot_effects", "plot_training", "plot_comparison", "plot_classes"]

FIGSIZE, DPI = (7, 4), 120


def require_matplotlib():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        raise ReportError(f"the report draws its figures with matplotlib, which is not installed: {REPORT_HINT}") from None


class Figures:
    """The PNG files of one report, in `folder` (emptied of an earlier report's figures), each name used once."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        for old in self.folder.glob("*.png"):
            old.unlink()
        self.files: List[Path] = []

    def reserve(self, name: str) -> Path:
        """A new file in the folder named after `name` (made file-safe; _2, _3, ... when taken)."""
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "figure"
        path, i = self.folder / f"{stem}.png", 2
        while path in self.files:
            path, i = self.folder / f"{stem}_{i}.png", i + 1
        self.files.append(path)
        return path

    def image(self, path: Path, alt: str) -> str:
        return f"![{alt}]({self.folder.name}/{path.name})"

    def save(self, fig, name: str, alt: str) -> str:
        path = self.reserve(name)
        fig.savefig(path, dpi=DPI)
        return self.image(path, alt)

    def copy(self, src: Path, name: str, alt: str) -> str:
        path = self.reserve(name)
        shutil.copyfile(src, path)
        return self.image(path, alt)


# ============================================================================= drawing helpers

def _figure(ncols: int = 1, size: Tuple[float, float] = FIGSIZE, nrows: int = 1, **kw):
    """A Figure on the Agg canvas and its axes."""
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


def _curves(records: List[Dict[str, Any]], key: str) -> Tuple[List[int], List[float]]:
    pts = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def short_class_name(name: str, width: int = 16) -> str:
    """The first of a class's comma-separated names, cut to `width` characters."""
    first = name.split(",")[0].strip()
    return first if len(first) <= width else first[:width - 1] + "."


def run_label(r: Dict[str, Any]) -> str:
    """A grid run's settings in a legend: lr, weight decay, widths, depths (and its seed, with grid.seeds)."""
    return ", ".join(f"{short} {grid.format_value(key, r[key])}" for key, short in
                     (("lr", "lr"), ("weight_decay", "wd"), ("stage_channels", "ch"), ("stage_repeats", "rep"))
                     + ((("seed", "seed"),) if r.get("seed") is not None else ()))


def _tta_suffix(rec: List[Dict[str, Any]]) -> str:
    ttas = sorted({r["tta"] for r in rec if r.get("tta")})
    return f", {'/'.join(ttas)} TTA" if ttas else ""


def _plot_losses(ax, rec: List[Dict[str, Any]], train_label: str):
    """Train and val loss per epoch."""
    x, y = _curves(rec, "train/loss")
    ax.plot(x, y, "o-", color="C0", label=train_label)
    x, y = _curves(rec, "val/loss")
    ax.plot(x, y, "s--", color="C1", label="val loss")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title("Loss")


def _plot_val_accuracy(ax, rec: List[Dict[str, Any]]):
    """Val top-1 (its best in the legend) and top-5 per epoch, on a 0-100% axis; with train.ema the EMA weights'
    top-1 beside the raw weights'; the legend names the TTA (train.tta) the evaluations used."""
    tta = _tta_suffix(rec)
    x, y = _curves(rec, "val/accuracy")
    best = max(range(len(y)), key=lambda k: y[k]) if y else None
    ema = any(r.get("val_ema/accuracy") is not None for r in rec)
    ax.plot(x, y, "s-", color="C1", label="val top-1" + (", raw weights" if ema else "") + tta
            + (f" (best {y[best]:.1%}, epoch {x[best]})" if y else ""))
    if ema:
        xe, ye = _curves(rec, "val_ema/accuracy")
        best = max(range(len(ye)), key=lambda k: ye[k]) if ye else None
        ax.plot(xe, ye, "D-", color="C3", label=f"val top-1, EMA weights{tta}"
                + (f" (best {ye[best]:.1%}, epoch {xe[best]})" if ye else ""))
    x5, y5 = _curves(rec, "val/top5")
    if y5:
        ax.plot(x5, y5, "^:", color="C2", label="val top-5" + (", raw weights" if ema else ""))
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    _percent_axis(ax)


# ============================================================================= the figures

def plot_class_distribution(figs: Figures, stats: Dict[str, Dict[str, Any]], names: Optional[List[str]]) -> str:
    """Images per class, one colour per split."""
    splits = [(n, s["class_counts"]) for n, s in stats.items() if s.get("class_counts")]
    num = max(len(c) for _, c in splits)
    wide = num > 40
    fig, (ax,) = _figure(size=(9 if num > 20 else 7, 4))
    width = 0.8 / len(splits)
    for i, (name, counts) in enumerate(splits):
        label = f"{name} ({sum(counts):,} images)"
        if wide:  # hundreds of bars side by side alias into stripes: one filled outline per split
            edges = [j - 0.5 for j in range(len(counts) + 1)]
            ax.stairs(counts, edges, fill=True, alpha=0.55, color=f"C{i}", label=label)
            ax.stairs(counts, edges, color=f"C{i}", lw=1.2)
        else:
            xs = [j + (i - (len(splits) - 1) / 2) * width for j in range(len(counts))]
            ax.bar(xs, counts, width=width * 0.95, label=label, color=f"C{i}", linewidth=0)
    ax.set_ylabel("images per class")
    ax.set_title(f"Images per class and split ({num} classes)")
    if names and num <= 20:
        ax.set_xticks(range(num))
        ax.set_xticklabels([short_class_name(n) for n in names[:num]], rotation=35, ha="right", fontsize=8)
        ax.set_xlabel("class")
    else:
        ax.set_xlabel("class index")
        ax.set_xlim(-0.5 if wide else -1, num - (0.5 if wide else 0))
    ax.legend(loc="upper right", fontsize=8, ncols=len(splits), framealpha=0.9)
    ax.set_ylim(0, max(max(c) for _, c in splits) * 1.18)
    ax.grid(True, axis="y", alpha=0.3)
    return figs.save(fig, "class_distribution", "images per class and split")


def plot_overfit(figs: Figures, run: Dict[str, Any]) -> str:
    """Loss and accuracy per epoch of an overfit run, train (the subset) beside val."""
    rec = run["metrics"]
    fig, (ax1, ax2) = _figure(2, size=(10, 3.8))
    _plot_losses(ax1, rec, "train loss (subset)")
    _plot_val_accuracy(ax2, rec)
    x, y = _curves(rec, "train/accuracy")
    if y:  # runs from before train.py logged it have none
        ax2.plot(x, y, "o-", color="C0", label="train top-1 (subset)")
    ax2.set_title("Accuracy" if y else "Val accuracy (this run logged no train accuracy)")
    for ax in (ax1, ax2):
        _epoch_axis(ax, rec[-1]["epoch"])
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Overfit run {run['name']}")
    return figs.save(fig, f"overfit_{run['name']}", f"overfit run {run['name']}: loss and accuracy per epoch")


def plot_lr_finder(figs: Figures, r: Dict[str, Any]) -> str:
    """The LR finder's own plot (tinycnn.workflow.lr_finder.plot_lr_finder), at the report's resolution."""
    import matplotlib

    from ..lr_finder import plot_lr_finder as draw

    path = figs.reserve(f"lr_finder_{r['name']}")
    with matplotlib.rc_context({"savefig.dpi": DPI}):  # it saves at its figure's dpi otherwise
        draw(r, path)
    return figs.image(path, f"LR finder {r['name']}: loss vs learning rate")


def plot_grid_curves(figs: Figures, g: Dict[str, Any]) -> str:
    """Val accuracy per epoch of every grid run (with train.ema, of the better of its raw and EMA weights, as the
    table ranks them): the best 8 in colour, the rest grey."""
    rows = [r for r in g["rows"] if r["metrics"]]
    labelled = 8
    fig, (ax,) = _figure(size=(9, 4.5))
    grey_done = False
    ema = any(m.get("val_ema/accuracy") is not None for r in rows for m in r["metrics"])
    for i, r in reversed(list(enumerate(rows))):
        pts = [(m["epoch"], f["accuracy"]) for m in r["metrics"] if (f := grid.val_figures(m)) is not None]
        x, y = [p[0] for p in pts], [p[1] for p in pts]
        if not x:
            continue
        if i < labelled:
            ax.plot(x, y, "o-", color=f"C{i % 10}", lw=1.8, ms=5, label=f"#{r['rank']} {run_label(r)}", zorder=3)
        else:
            ax.plot(x, y, "o-", color="0.75", lw=1, ms=3, zorder=1,
                    label=None if grey_done else f"other runs ({len(rows) - labelled})")
            grey_done = True
    ax.set_ylabel("val accuracy" + (" (better of raw and EMA)" if ema else "")
                  + _tta_suffix([m for r in rows for m in r["metrics"]]))
    _percent_axis(ax)
    _epoch_axis(ax, max(r["metrics"][-1]["epoch"] for r in rows))
    ax.set_title(f"Grid search {g['name']}: val accuracy per epoch ({len(rows)} runs)")
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], fontsize=7.5, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return figs.save(fig, f"grid_{g['name']}_curves", "val accuracy per epoch of every grid run")


def plot_effects(figs: Figures, g: Dict[str, Any], effects: Dict[str, List[Dict[str, Any]]],
                 labels: Sequence[Tuple[str, str]]) -> str:
    """Mean best val accuracy per value of each hyperparameter: one panel per (key, label)."""
    fig, axes = _figure(len(labels), size=(11, 3.6), sharey=True)
    for ax, (key, label) in zip(axes, labels):
        es = effects[key]
        xs = list(range(len(es)))
        bars = ax.bar(xs, [e["mean_val_accuracy"] or 0.0 for e in es], color=[f"C{i}" for i in xs], width=0.6)
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
    return figs.save(fig, f"grid_{g['name']}_effects", "mean best val accuracy per value of each hyperparameter")


def _lr_schedule(run: Dict[str, Any]) -> Optional[Tuple[List[float], List[float]]]:
    """The per-step lr of a run, recomputed from its config (the same lambda as train.py) and its steps per
    epoch (from metrics.jsonl): (epoch positions, lrs). None when it cannot be recomputed."""
    from ...config import from_dict
    from ...plan import build_lr_lambda

    cfg, rec = run["config"] or {}, run["metrics"]
    t = cfg.get("train") or {}
    try:
        steps = [r["step"] for r in rec]
        diffs = [b - a for a, b in zip([0] + steps, steps)]
        per_epoch = max(set(diffs[:-1] or diffs), key=(diffs[:-1] or diffs).count)
        total = t.get("max_steps") or per_epoch * int(t["epochs"])
        fn = build_lr_lambda(from_dict({"train": {"scheduler": t["scheduler"]}}).train.scheduler, total, per_epoch)
        base = float(t["optimizer"]["lr"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):  # ConfigError is a ValueError
        return None
    if per_epoch <= 0 or total <= 0:
        return None
    # LambdaLR: after s optimizer steps the lr is base * fn(s) (the value train.py logs at an epoch's end)
    n = min(total + 1, 2000)
    idx = sorted({round(i * total / max(n - 1, 1)) for i in range(n)})
    return [s / per_epoch for s in idx], [base * fn(s) for s in idx]


def plot_training(figs: Figures, run: Dict[str, Any]) -> str:
    """Loss, val accuracy and the lr schedule per epoch of a training run."""
    rec = run["metrics"]
    fig, (ax1, ax2, ax3) = _figure(3, size=(12, 3.8))
    _plot_losses(ax1, rec, "train loss (epoch mean)")
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
    return figs.save(fig, f"train_{run['name']}", f"training run {run['name']}: loss, val accuracy, lr per epoch")


def plot_comparison(figs: Figures, runs: List[Dict[str, Any]]) -> str:
    """The training runs' losses and val accuracies on shared axes."""
    fig, (ax1, ax2) = _figure(2, size=(11, 4))
    for i, run in enumerate(runs):
        c = f"C{i % 10}"
        x, y = _curves(run["metrics"], "train/loss")
        ax1.plot(x, y, "o-", color=c, label=f"{run['name']} train")
        x, y = _curves(run["metrics"], "val/loss")
        ax1.plot(x, y, "s--", color=c, alpha=0.8, label=f"{run['name']} val")
        x, y = _curves(run["metrics"], "val/accuracy")
        ema = any(m.get("val_ema/accuracy") is not None for m in run["metrics"])
        ax2.plot(x, y, "s-", color=c, label=run["name"] + (" raw" if ema else "") + _tta_suffix(run["metrics"]))
        if ema:
            x, y = _curves(run["metrics"], "val_ema/accuracy")
            ax2.plot(x, y, "D:", color=c, label=f"{run['name']} EMA")
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
    return figs.save(fig, "train_comparison", "the training runs compared")


def plot_classes(figs: Figures, e: Dict[str, Any], k: int = 10) -> str:
    """Per-class accuracy of an evaluation: every class, or the k least and k most accurate."""
    scored = sorted((c for c in e["per_class"] if c.get("accuracy") is not None),
                    key=lambda c: (c["accuracy"], c["index"]))
    shown = scored if len(scored) <= 2 * k else scored[:k] + scored[-k:]
    fig, (ax,) = _figure(size=(7, max(3.0, 0.26 * len(shown) + 1.2)))
    ys = list(range(len(shown)))
    colors = ["C3" if c["accuracy"] < e["accuracy"] else "C2" for c in shown]
    ax.barh(ys, [c["accuracy"] for c in shown], color=colors, height=0.7)
    ax.set_yticks(ys)
    ax.set_yticklabels([f"{short_class_name(c['name'], 24)} ({c['index']})" for c in shown], fontsize=8)
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
    return figs.save(fig, f"eval_{e['_name']}_classes", f"per-class accuracy of {e['_name']}")
