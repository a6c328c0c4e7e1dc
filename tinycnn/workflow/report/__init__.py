"""An experiment report like the course project's, built from the outputs of the other recipes: `build_report`.

    build_report(["checkpoints/"], "report/")       # -> report/report.md + report/figures/*.png

Each input is a folder (or file) written by a recipe; `detect` tells which by the files it holds:

    kind          holds                                             written by
    shards        manifest.json                                     tinycnn-prepare
    checks        checks.json (+ augment_grid.png)                  recipes/checks.py
    lr_finder     lr_finder.json or lr_finder.csv                   recipes/lr_finder.py
    grid          results.json/.csv/.md or gs_* run folders         recipes/grid_search.py
    run           metrics.jsonl (+ config.yaml, run.json, *.safetensors)   recipes/train.py
    evaluation    a JSON file with accuracy and per_class           recipes/evaluate.py --json
A folder that is none of these is searched below (so the parent folder of all outputs works too).

Sections, as in the course report: Data, Model, Overfit run, LR finder, Grid search, Full training,
Final evaluation, Reproducibility. A section whose input is missing says so and names the recipe that
writes it. Nothing is trained or evaluated again: the report reads JSON/YAML/CSV files, and builds the
model once (timm, forward hooks on a (1, 3, 64, 64) input) for the layer table. Plots need matplotlib
(`pip install "tinycnn[report]"`) and use its Agg canvas without pyplot.

The package: `inputs` finds and loads the outputs, `figures` draws, `sections` writes the Markdown.
"""
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

from .figures import REPORT_HINT, Figures, require_matplotlib
from .inputs import (KINDS, Inputs, Loaded, ReportError, collect, detect, layer_table, load_grid, load_lr_finder,
                     load_run)
from . import sections as S
from .sections import SECTIONS, Section, class_extremes, header, holdout_note, hyperparameter_effects

__all__ = ["ReportError", "SECTIONS", "KINDS", "Inputs", "Report", "detect", "collect", "load_run", "load_grid",
           "load_lr_finder", "hyperparameter_effects", "layer_table", "holdout_note", "class_extremes",
           "write_report", "build_report", "REPORT_HINT"]


@dataclass
class Report:
    """A written report: its Markdown file, its sections (each knows the inputs it lacked), its figures."""
    path: Path
    sections: List[Section]
    figures: List[Path]


def write_report(paths: Sequence[Union[str, Path]], output: Union[str, Path], *, title: str = "Experiment report",
                 top: int = 5, command: Optional[Sequence[str]] = None) -> Report:
    """Write OUTPUT/report.md and OUTPUT/figures/*.png from the recipe outputs under `paths`.

    `top`: classes listed among the most and the least accurate. `command`: shown under Reproducibility
    (recipes/report.py passes its own)."""
    require_matplotlib()
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ReportError(f"{output} is a file: the report needs a folder (for report.md and figures/), "
                          "give another --output")
    loaded = Loaded(collect(paths))
    figs = Figures(output / "figures")
    builders = [S.section_data, S.section_model, S.section_overfit, S.section_lr_finder, S.section_grid,
                S.section_full_training, functools.partial(S.section_evaluation, top=top),
                functools.partial(S.section_reproducibility, command=command)]
    sections = [Section(number, name) for number, name in enumerate(SECTIONS, 1)]
    for build, section in zip(builders, sections):
        build(loaded, figs, section)
    lines = header(loaded, title)  # after the sections: it lists the warnings met while writing them
    for section in sections:
        lines += section.markdown()
    path, tmp = output / "report.md", output / "report.md.tmp"
    tmp.write_text("\n".join(lines).rstrip() + "\n")
    tmp.replace(path)
    return Report(path, sections, list(figs.files))


def build_report(paths: Sequence[Union[str, Path]], output: Union[str, Path], **kwargs) -> Path:
    """`write_report(...)`, returning the report's path."""
    return write_report(paths, output, **kwargs).path
