"""`prepare`: source -> checked images -> splits -> shards, _info.json and manifest.json in a new folder;
`ensure_prepared`: the same, only when the folder is not prepared yet."""
from __future__ import annotations

import json
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from .. import __version__
from ..environment import available_cpus
from .scan import IMAGE_SIZE, make_pool, scan
from .downloader import DEFAULT_URL, OFFICIAL_MD5, download_official
from .errors import PrepareError
from .folder import (FORMAT, FORMAT_VERSION, building, foreign_entries, is_ours, lock, read_manifest,
                     remove_stale)
from .shards import DEFAULT_NUM_SHARDS, SPLITS, label_items, make_splits, write_split
from .sources import Source, fingerprint, open_source, source_mismatch

_MAX_LISTED = 10        # bad files named in an error message


def prepare(source, out, *, holdout_per_class: int = 50, seed: int = 0,
            num_shards: Union[None, int, Mapping[str, int]] = None, skip_bad: bool = False, force: bool = False,
            include_unlabeled: bool = False, compress: bool = False, workers: Optional[int] = None,
            progress: bool = True) -> dict:
    """Write Tiny ImageNet from `source` as WebDataset shards into `out`; return the manifest.

    source: tiny-imagenet-200.zip, its extracted folder, or a folder holding the Hugging Face parquet
        files (train-*.parquet, valid-*.parquet anywhere below it). None: only check that `out` is
        already prepared with these settings.
    holdout_per_class: train images per class held out as split `val` (seeded, stratified); the
        official validation images become `test`. 0: train = all train images, val = official
        validation, no test.
    num_shards: shards per split, e.g. {"train": 64, "val": 16} (defaults 64 / 16 / 16 / 16), or one int
        for all; never more shards than samples.
    skip_bad: leave out bad images (truncated, not JPEG, not 64x64, unknown wnid, duplicate key...) and
        list them in manifest["skipped"] instead of raising PrepareError.
    force: rebuild even when `out` already holds a complete dataset (otherwise that is a no-op, or an
        error when it was made from another source or with other settings).
    include_unlabeled: also write the official unlabeled test images as split `unlabeled` (cls -1).
    compress: gzip-compressed shards (<split>-NNNNN.tar.gz), for readers that pay for bandwidth.
    workers: processes for the decode check and the shard writing (default: the usable cores).
    progress: show progress bars and the summary table.
    """
    started = time.perf_counter()
    out = Path(out).expanduser().absolute()
    console = Console(stderr=True, quiet=not progress)
    shard_counts = _num_shards(num_shards)
    if holdout_per_class < 0:
        raise PrepareError(f"holdout_per_class must be >= 0, got {holdout_per_class}")
    settings = {"holdout_per_class": holdout_per_class, "seed": seed, "include_unlabeled": include_unlabeled,
                "compress": compress}

    if out.exists() and not out.is_dir():
        raise PrepareError(f"{out} exists and is not a folder; choose a new or empty folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrepareError(f"cannot create {out.parent} ({e.strerror}); choose another --out") from None
    with lock(out):
        remove_stale(out, Console(stderr=True))
        existing = read_manifest(out)
        if existing is not None and not force:
            _check_existing(existing, out, source, settings)
            console.print(Text(f"{out} is already prepared (pass --force to rebuild)", style="green"),
                          soft_wrap=True)
            return existing
        if source is None:
            raise PrepareError(f"{out} is not prepared and no source was given: "
                               f"tinycnn-prepare /path/to/tiny-imagenet-200.zip --out {out}")
        if out.is_symlink():  # replacing it would replace the link, not the folder it points to
            raise PrepareError(f"{out} is a symbolic link; pass the folder it points to as --out "
                               f"({out.resolve()}), or choose another --out")
        if out.exists() and not is_ours(out) and (not out.is_dir() or any(out.iterdir())):
            # never delete what we did not write (an incomplete folder of ours is rebuilt)
            foreign = foreign_entries(out) if out.is_dir() and (out / "manifest.json").is_file() else []
            holds = f" (it holds {', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}, which " \
                    "tinycnn-prepare does not write)" if foreign else ""
            raise PrepareError(f"{out} exists and is not a prepared dataset{holds}; nothing was changed: "
                               "choose a new or empty folder")
        workers = workers or available_cpus()
        src = open_source(source, include_unlabeled)
        with building(out) as tmp:
            manifest = _write_dataset(src, tmp, out.name, settings, shard_counts, skip_bad, workers, console,
                                      progress)
    if progress:
        _summary(manifest, time.perf_counter() - started, out, Console())
        for p in manifest["skipped"][:_MAX_LISTED]:
            console.print(Text(f"skipped {p['file']}: {p['reason']}", style="yellow"), soft_wrap=True)
    return manifest


def _check_existing(manifest: dict, out: Path, source, settings: dict):
    """Refuse to take a prepared folder as it is when it was made from another source or with other settings."""
    if source is not None:
        why = source_mismatch(manifest, source)
        if why:
            raise PrepareError(f"{out} is already prepared, {why}; rebuild it: tinycnn-prepare {source} "
                               f"--out {out} --force, or choose another --out")
    have = {"holdout_per_class": manifest.get("holdout_per_class"), "seed": manifest.get("seed"),
            "include_unlabeled": "unlabeled" in manifest["splits"],
            "compress": bool(manifest.get("compress", False))}
    if have != settings:
        differ = ", ".join(f"{k} {have[k]} (asked {settings[k]})" for k in settings if settings[k] != have[k])
        raise PrepareError(f"{out} is already prepared with other settings: {differ}; "
                           "pass --force (force=True) to rebuild it")


def _write_dataset(src: Source, tmp: Path, dataset_name: str, settings: dict, shard_counts: Dict[str, int],
                   skip_bad: bool, workers: int, console: Console, progress: bool) -> dict:
    """Check every image, split, write the shards, _info.json and (last) manifest.json into `tmp`."""
    columns = (TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with make_pool(workers, src.total) as pool, Progress(*columns, console=console, disable=not progress) as bars:
        task = bars.add_task(f"checking {src.kind}", total=src.total)
        items = scan(src, pool, lambda n: bars.advance(task, n))

        problems = list(src.problems)
        wnids = src.wnids or sorted({it.wnid for it in items
                                     if it.origin == "train" and it.error is None and it.wnid})
        if not wnids:
            raise PrepareError(f"{src.path}: no usable train images")
        names = src.names or {w: w for w in wnids}
        good = label_items(items, wnids, problems)
        if problems and not skip_bad:  # one line: recipes and the command line print it as it is
            listed = "; ".join(f"{p['file']}: {p['reason']}" for p in problems[:_MAX_LISTED])
            more = f"; ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
            raise PrepareError(f"{len(problems)} bad input(s) in {src.path}: {listed}{more}. "
                               "Fix the source, or pass --skip-bad (skip_bad=True) to leave them out "
                               "and list them in manifest.json")
        splits = make_splits(good, len(wnids), settings["holdout_per_class"], settings["seed"])

        task = bars.add_task("writing shards", total=sum(map(len, splits.values())))
        manifest_splits = {}
        for name, members in splits.items():
            shards = write_split(tmp, name, members, shard_counts[name], settings["compress"], pool,
                                  lambda n: bars.advance(task, n))
            counts = Counter(it.label for it in members)
            manifest_splits[name] = {
                "num_samples": len(members),
                "grayscale": sum(it.gray for it in members),
                "shards": shards,
                "class_counts": [counts[i] for i in range(len(wnids))],
            }

    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "tinycnn_version": __version__,
        "source": {"kind": src.kind, "path": str(src.path), **fingerprint(src.path)},
        "seed": settings["seed"], "holdout_per_class": settings["holdout_per_class"],
        "compress": settings["compress"],
        "num_classes": len(wnids), "input_shape": [3, IMAGE_SIZE, IMAGE_SIZE],
        "classes": [{"wnid": w, "name": names.get(w, w)} for w in wnids],
        "splits": manifest_splits,
        "skipped": problems,
    }
    # the same splits for timm: create_dataset("wds/tiny-imagenet", root=out, split="train")
    info = {"name": dataset_name, "num_classes": len(wnids), "splits": {
        split: {"name": split, "num_samples": s["num_samples"],
                "filenames": [x["file"] for x in s["shards"]],
                "shard_lengths": [x["num_samples"] for x in s["shards"]]}
        for split, s in manifest_splits.items()}}
    (tmp / "_info.json").write_text(json.dumps(info, indent=1) + "\n")
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")  # last: marks completeness
    return manifest


def _num_shards(num_shards) -> Dict[str, int]:
    if num_shards is None:
        return dict(DEFAULT_NUM_SHARDS)
    if isinstance(num_shards, int):
        num_shards = {s: num_shards for s in SPLITS}
    unknown = set(num_shards) - set(SPLITS)
    if unknown:
        raise PrepareError(f"num_shards: unknown split {sorted(unknown)[0]!r} (splits: {', '.join(SPLITS)})")
    if any(not isinstance(v, int) or v < 1 for v in num_shards.values()):
        raise PrepareError(f"num_shards: every count must be a positive integer, got {dict(num_shards)}")
    return {**DEFAULT_NUM_SHARDS, **num_shards}


def _summary(manifest: dict, seconds: float, out: Path, console: Console):
    table = Table(title=f"Tiny ImageNet shards in {out}", title_justify="left")
    for col in ("split", "images", "per class min / mean / max", "grayscale", "shards"):
        table.add_column(col, justify="left" if col == "split" else "right")
    total = 0
    for name, s in manifest["splits"].items():
        counts = s["class_counts"]
        spread = "-" if name == "unlabeled" else \
            f"{min(counts)} / {sum(counts) / len(counts):.1f} / {max(counts)}"
        table.add_row(name, str(s["num_samples"]), spread, str(s["grayscale"]), str(len(s["shards"])))
        total += s["num_samples"]
    table.caption = (f"{manifest['num_classes']} classes, {total} images, {len(manifest['skipped'])} skipped; "
                     f"{seconds:.1f} s ({total / max(seconds, 1e-9):.0f} images/s)")
    console.print(table)


def _why_unprepared(out: Path) -> str:
    if not out.exists():
        return "does not exist"
    if out.is_dir() and not any(out.iterdir()):
        return "is empty"
    return "holds no prepared dataset (no complete manifest.json)"


def ensure_prepared(out, *, source=None, download: bool = False, url: str = DEFAULT_URL,
                    md5: Optional[str] = OFFICIAL_MD5, **prepare_kwargs) -> Path:
    """Return `out` once it holds a complete prepared dataset made from `source` (when given).

    out prepared: returned as it is; a `source` it was not made from (other content, by fingerprint)
        is a PrepareError that names both.
    out not prepared: prepared from `source`; without one, download=True fetches the official zip into
        `out.parent / "downloads"` (saying so first), otherwise a PrepareError says how to prepare it.
    """
    out = Path(out).expanduser().absolute()
    manifest = read_manifest(out)
    if manifest is not None:
        if source is not None and (why := source_mismatch(manifest, source)):
            raise PrepareError(f"the shards in {out} were {why}: rebuild them with "
                               f"`tinycnn-prepare {source} --out {out} --force`, or choose another folder "
                               "with --data")
        if source is not None and "fingerprint" not in manifest.get("source", {}):
            warnings.warn(f"{out} records no source fingerprint (made by an older tinycnn-prepare, or by hand): "
                          "data.source was checked by path only")
        return out
    if source is None:
        if not download:
            raise PrepareError(f"shards folder {out} {_why_unprepared(out)}; prepare it first: "
                               f"tinycnn-prepare /path/to/tiny-imagenet-200.zip --out {out}")
        source = download_official(out, out.parent / "downloads", url, md5,
                                    progress=prepare_kwargs.get("progress", True))
    prepare(source, out, **prepare_kwargs)
    return out
