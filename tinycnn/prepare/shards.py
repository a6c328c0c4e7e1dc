"""The checked images labeled, split (seeded, stratified holdout) and written as WebDataset shards."""
from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

from ..tar import write_shard
from .errors import PrepareError
from .sources import Item

DEFAULT_NUM_SHARDS = {"train": 64, "val": 16, "test": 16, "unlabeled": 16}
SPLITS = tuple(DEFAULT_NUM_SHARDS)


def label_items(items: List[Item], wnids: List[str], problems: List[dict]) -> List[Item]:
    """Labels from wnids; bad, unlabeled, unknown-wnid and duplicate items move to `problems`."""
    index = {w: i for i, w in enumerate(wnids)}
    good, seen = [], {}
    for it in items:
        if it.error is None and it.origin != "test":
            if it.wnid is None:
                it.error = "no label in val/val_annotations.txt"
            elif it.wnid not in index:
                it.error = f"unknown wnid {it.wnid} (not one of the dataset's {len(wnids)} classes)"
            else:
                it.label = index[it.wnid]
        if it.error is None and it.key in seen:
            it.error = f"duplicate key {it.key} (also {seen[it.key]})"
        if it.error:
            problems.append({"file": it.file, "reason": it.error})
            it.data = b""
        else:
            seen[it.key] = it.file
            good.append(it)
    return good


def make_splits(items: List[Item], num_classes: int, holdout: int, seed: int) -> Dict[str, List[Item]]:
    train = sorted((it for it in items if it.origin == "train"), key=lambda it: it.key)
    val = sorted((it for it in items if it.origin == "val"), key=lambda it: it.key)
    test = sorted((it for it in items if it.origin == "test"), key=lambda it: it.key)
    if holdout:
        # stratified: the same `holdout` images of every class, chosen from key-sorted lists so that
        # every source (zip, folder, parquet) gives the same split
        by_class = defaultdict(list)
        for it in train:
            by_class[it.label].append(it)
        rng = random.Random(seed)
        train, held = [], []
        for label in range(num_classes):
            members = by_class[label]
            if len(members) <= holdout:
                raise PrepareError(f"class {label} has {len(members)} train images: too few to hold out "
                                   f"{holdout} (pass a smaller --holdout)")
            pick = set(rng.sample(range(len(members)), holdout))
            for i, it in enumerate(members):
                (held if i in pick else train).append(it)
        splits = {"train": train, "val": held, "test": val}
    else:
        splits = {"train": train, "val": val}
    if test:
        splits["unlabeled"] = test
    for name, members in splits.items():
        # the source is sorted by class: shuffle so that every shard holds a mix of classes
        members.sort(key=lambda it: it.key)
        random.Random(f"tinycnn-{seed}-{name}").shuffle(members)
    return splits


def write_split(folder: Path, split: str, members: List[Item], num_shards: int, compress: bool, pool,
                 advance) -> List[dict]:
    """Write `members` in order as `num_shards` shards (never more than samples) of near-equal size.

    A sample is <key>.cls and <key>.jpg: the class's wnid and name are in the manifest.
    """
    n = min(num_shards, len(members))
    shards, pending = [], []
    for s in range(n):
        part = members[s * len(members) // n:(s + 1) * len(members) // n]  # sizes differ by at most 1
        name = f"{split}-{s:05d}.tar" + (".gz" if compress else "")
        samples = [{"__key__": it.key, "cls": str(it.label), "jpg": it.data} for it in part]
        if pool is None:
            write_shard(folder / name, samples, compress=compress)
            advance(len(part))
        else:
            pending.append((pool.submit(write_shard, folder / name, samples, compress=compress), len(part)))
        shards.append({"file": name, "num_samples": len(part)})
    for fut, count in pending:
        fut.result()
        advance(count)
    return shards
