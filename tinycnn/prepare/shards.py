"""The checked images labeled, split (seeded, stratified holdout) and written as WebDataset shards."""
from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

from ..tar import _gzip, tar_bytes
from .errors import PrepareError
from .sources import Item

DEFAULT_NUM_SHARDS = {"train": 64, "val": 16, "test": 16, "unlabeled": 16}
SPLITS = tuple(DEFAULT_NUM_SHARDS)
_MAX_KEY_BYTES = 95  # a tar header holds 100 bytes of name: <key>.jpg and <key>.cls must fit


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
        if it.error is None:
            try:
                if len(it.key.encode("utf-8")) > _MAX_KEY_BYTES:
                    it.error = f"file name too long for a shard member (key of {len(it.key.encode())} bytes, " \
                               f"at most {_MAX_KEY_BYTES}); rename it"
            except UnicodeEncodeError:
                it.error = "file name is not valid UTF-8; rename it"
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


def write_recorded_shard(path: Path, samples: List[dict], compress: bool) -> dict:
    """Write one shard (as tinycnn.tar.write_shard does) and return what the manifest records of it:
    its size in `bytes`, for gzip shards the size of the tar inside in `tar_bytes`, and its `sha256`,
    hashed here from the bytes already in memory. Readers use them as caps and checks."""
    data = tar_bytes(samples)
    packed = _gzip(data) if compress else data
    with open(path, "xb") as f:  # a new file in our own temporary folder
        f.write(packed)
    record = {"bytes": len(packed), "sha256": hashlib.sha256(packed).hexdigest()}
    if compress:
        record["tar_bytes"] = len(data)
    return record


def write_split(folder: Path, split: str, members: List[Item], num_shards: int, compress: bool, pool,
                 advance) -> List[dict]:
    """Write `members` in order as `num_shards` shards (never more than samples) of near-equal size.

    A sample is <key>.cls and <key>.jpg: the class's wnid and name are in the manifest. Each shard's
    entry: file, num_samples, bytes, sha256 and (gzip shards) tar_bytes.
    """
    n = min(num_shards, len(members))
    shards, pending = [], []
    for s in range(n):
        part = members[s * len(members) // n:(s + 1) * len(members) // n]  # sizes differ by at most 1
        name = f"{split}-{s:05d}.tar" + (".gz" if compress else "")
        samples = [{"__key__": it.key, "cls": str(it.label), "jpg": it.data} for it in part]
        shards.append({"file": name, "num_samples": len(part)})
        if pool is None:
            shards[-1].update(write_recorded_shard(folder / name, samples, compress))
            advance(len(part))
        else:
            pending.append((shards[-1], pool.submit(write_recorded_shard, folder / name, samples, compress),
                            len(part)))
    for entry, fut, count in pending:
        entry.update(fut.result())
        advance(count)
    return shards
