"""The three source layouts read as one stream of images, and the fingerprint that tells sources apart.

Layouts: the official `tiny-imagenet-200.zip` (read in place), its extracted folder, or a folder of
Hugging Face parquet files (`zh-plus/tiny-imagenet`). `open_source` tells which and lists the images;
`fingerprint` and `source_mismatch` say whether a prepared folder was made from a given source.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Dict, Iterator, List, Optional, Union

from .errors import PrepareError

_MIB = 1 << 20


@dataclass
class Item:
    """One source image on its way to a shard; a set `error` is why it is refused."""
    key: str                    # WebDataset __key__: the source image's stem
    file: str                   # where it came from, for messages and manifest["skipped"]
    origin: str                 # official split: "train", "val" (labeled) or "test" (unlabeled)
    wnid: Optional[str]
    data: bytes = b""
    error: Optional[str] = None
    gray: bool = False
    label: int = -1


@dataclass
class Source:
    """An opened source: its classes and a single pass over its images."""
    kind: str                   # "zip" | "folder" | "parquet"
    path: Path
    wnids: Optional[List[str]]  # None: the wnids present in the train images (parquet)
    names: Dict[str, str]
    total: int                  # number of images items() yields, for the progress bar
    items: Iterator[Item]
    problems: List[dict]        # bad entries found while listing (e.g. an annotation without image)


# macOS zips carry __MACOSX/ and ._* files; editors leave dotfiles
_IGNORED = re.compile(r"(^|/)(__MACOSX|\.[^/]*)(/|$)")


class _ZipTree:
    def __init__(self, path: Path):
        try:
            self.zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise PrepareError(f"{path}: not a readable zip file ({e}); a corrupt or incomplete download? "
                               "Download it again or pass the extracted folder") from None
        self.names = [i.filename for i in self.zf.infolist() if not i.is_dir()]  # archive order: sequential reads

    def read(self, name: str) -> bytes:
        return self.zf.read(name)


class _DirTree:
    def __init__(self, path: Path):
        self.root = path
        self.names = []
        for d, dirs, files in os.walk(path):
            dirs.sort()
            rel = Path(d).relative_to(path).as_posix()
            self.names += [f if rel == "." else f"{rel}/{f}" for f in sorted(files)]

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()


def _lines(data: bytes) -> List[str]:
    # utf-8-sig + splitlines + strip: BOM, CRLF, blank lines and a missing final newline all read the same
    return [ln.strip() for ln in data.decode("utf-8-sig").splitlines() if ln.strip()]


def _key(name: str) -> str:
    # WebDataset splits a member name at the first dot of its basename: keys must not hold dots
    return PurePosixPath(name).stem.replace(".", "_")


def _layout_source(tree, kind: str, path: Path, include_unlabeled: bool) -> Source:
    """The tiny-imagenet-200 layout, at the top of `tree` or inside a single top folder."""
    files = [f for f in tree.names if not _IGNORED.search(f)]
    tops = [f for f in files if f.count("/") <= 1 and PurePosixPath(f).name == "wnids.txt"]
    if not tops:
        raise PrepareError(f"{path}: no wnids.txt at the top or in a single top folder; expected the "
                           "tiny-imagenet-200 layout (wnids.txt, words.txt, train/<wnid>/images/, val/)")
    if len(tops) > 1:
        raise PrepareError(f"{path}: several datasets in one source ({', '.join(tops)}); pass one of them")
    prefix = tops[0][: -len("wnids.txt")]
    wnids = _lines(tree.read(tops[0]))
    if not wnids:
        raise PrepareError(f"{path}: {tops[0]} lists no classes")
    dup = [w for w, n in Counter(wnids).items() if n > 1]
    if dup:
        raise PrepareError(f"{path}: {tops[0]} lists {dup[0]} twice")

    # words.txt names 82k WordNet ids: keep ours; a class without a name is named by its wnid
    names = {w: w for w in wnids}
    if prefix + "words.txt" in files:
        for ln in _lines(tree.read(prefix + "words.txt")):
            wnid, _, name = ln.partition("\t")
            if wnid in names and name.strip():
                names[wnid] = name.strip()

    ann_name = prefix + "val/val_annotations.txt"
    annotations: Dict[str, str] = {}
    if ann_name in files:
        for n, ln in enumerate(_lines(tree.read(ann_name)), 1):
            fields = ln.split("\t") if "\t" in ln else ln.split()
            if len(fields) < 2:
                raise PrepareError(f"{path}: {ann_name} line {n}: expected 'file<TAB>wnid...', got {ln!r}")
            if annotations.get(fields[0], fields[1]) != fields[1]:
                raise PrepareError(f"{path}: {ann_name} labels {fields[0]} twice, differently")
            annotations[fields[0]] = fields[1]

    p = re.escape(prefix)
    train_re = re.compile(p + r"train/([^/]+)/images/([^/]+)$")
    val_re = re.compile(p + r"val/images/([^/]+)$")
    test_re = re.compile(p + r"test/images/([^/]+)$")
    entries = []  # (file, origin, wnid, basename)
    for f in files:
        if m := train_re.match(f):
            entries.append((f, "train", m[1], m[2]))
        elif m := val_re.match(f):
            entries.append((f, "val", annotations.get(m[1]), m[1]))
        elif include_unlabeled and (m := test_re.match(f)):
            entries.append((f, "test", None, m[1]))
    val_files = {e[3] for e in entries if e[1] == "val"}
    if not any(e[1] == "train" for e in entries):
        raise PrepareError(f"{path}: no train images (expected {prefix}train/<wnid>/images/*.JPEG)")
    if not val_files:
        raise PrepareError(f"{path}: no validation images (expected {prefix}val/images/*.JPEG)")
    if not annotations:
        raise PrepareError(f"{path}: no labels for the validation images (expected {ann_name})")
    problems = [{"file": f"{prefix}val/images/{name}", "reason": f"listed in {ann_name} but missing"}
                for name in sorted(set(annotations) - val_files)]

    def items():
        for f, origin, wnid, name in entries:
            it = Item(_key(name), f, origin, wnid)
            try:
                it.data = tree.read(f)
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
                it.error = f"cannot read it: {e}"
            yield it

    return Source(kind, path, sorted(wnids), names, len(entries), items(), problems)


def _import_pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PrepareError('reading parquet files needs pyarrow: pip install "tinycnn[parquet]"') from None
    return pq


def _parquet_source(path: Path, files: List[Path], include_unlabeled: bool) -> Source:
    pq = _import_pyarrow()
    groups: Dict[str, List[tuple]] = {"train": [], "val": [], "test": []}
    for f in files:
        if m := re.match(r"(train|valid|validation|val|test)[-_.]", f.name):
            origin = "val" if m[1].startswith("val") else m[1]
            if origin != "test" or include_unlabeled:
                groups[origin].append((f, m[1]))
    if not groups["train"] or not groups["val"]:
        raise PrepareError(f"{path}: expected train-*.parquet and valid-*.parquet files below it, found "
                           f"{', '.join(f.name for f in files) or 'none'}")

    # ClassLabel names (all 200 official wnids) live in the schema metadata that `datasets` writes
    try:
        meta = json.loads(pq.read_schema(groups["train"][0][0]).metadata[b"huggingface"])
        all_names = meta["info"]["features"]["label"]["names"]
    except Exception:
        raise PrepareError(f"{groups['train'][0][0]}: no class names in the parquet metadata "
                           "(key 'huggingface' -> info.features.label.names)") from None
    total = sum(pq.ParquetFile(f).metadata.num_rows for g in groups.values() for f, _ in g)

    def items():
        for origin, group in groups.items():
            row = 0  # fallback keys count rows across the files of a split
            for f, split_name in group:
                pf = pq.ParquetFile(f)
                if not {"image", "label"} <= set(pf.schema_arrow.names):
                    raise PrepareError(f"{f}: expected columns 'image' and 'label', found {pf.schema_arrow.names}")
                rel = f.relative_to(path).as_posix()
                for batch in pf.iter_batches(batch_size=1024, columns=["image", "label"]):
                    image = batch.column("image")
                    blobs = image.field("bytes").to_pylist()
                    has_path = "path" in [image.type.field(i).name for i in range(image.type.num_fields)]
                    paths = image.field("path").to_pylist() if has_path else [None] * len(blobs)
                    for data, p, label in zip(blobs, paths, batch.column("label").to_pylist()):
                        it = Item(_key(p) if p else f"{split_name}_{row}", f"{rel}[row {row}]", origin, None)
                        if origin != "test":
                            if label is not None and 0 <= label < len(all_names):
                                it.wnid = all_names[label]
                            else:
                                it.error = f"label {label} is outside the {len(all_names)} class names"
                        if data is None:
                            it.error = "no image bytes"
                        it.data = data or b""
                        row += 1
                        yield it

    return Source("parquet", path, None, {}, total, items(), [])


def open_source(source, include_unlabeled: bool) -> Source:
    path = Path(source).expanduser().resolve()
    if not path.exists():
        raise PrepareError(f"source not found: {source}. Pass tiny-imagenet-200.zip, its extracted folder, "
                           "a folder of Hugging Face parquet files, or the word 'download'")
    if path.is_file():
        if path.suffix.lower() == ".zip" or zipfile.is_zipfile(path):
            return _layout_source(_ZipTree(path), "zip", path, include_unlabeled)
        raise PrepareError(f"{path}: unsupported source file; expected tiny-imagenet-200.zip")
    tops = [p for p in (path / "wnids.txt", *path.glob("*/wnids.txt")) if p.is_file()]
    if tops:
        return _layout_source(_DirTree(path), "folder", path, include_unlabeled)
    # hidden folders: huggingface_hub keeps its download state in .cache/
    parquets = sorted(f for f in path.rglob("*.parquet") if not _IGNORED.search(f.relative_to(path).as_posix()))
    if parquets:
        return _parquet_source(path, parquets, include_unlabeled)
    raise PrepareError(f"{path}: neither the tiny-imagenet-200 layout (wnids.txt, train/, val/) nor parquet files")


# ----------------------------------------------------------------------------------------------
# Provenance: what a prepared folder was made from


def fingerprint(path: Path) -> Dict[str, Union[int, str]]:
    """Size and a cheap content fingerprint of a source, computed in well under a second.

    A file: sha256 over its size and its first and last MiB. A folder: sha256 over the list of its
    files (as open_source sees them) with their sizes.
    """
    h = hashlib.sha256()
    if path.is_file():
        size = path.stat().st_size
        h.update(b"%d\n" % size)
        with open(path, "rb") as f:
            h.update(f.read(_MIB))
            f.seek(max(size - _MIB, 0))
            h.update(f.read(_MIB))
    else:
        size = 0
        for d, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                rel = Path(d, name).relative_to(path).as_posix()
                if not _IGNORED.search(rel):
                    n = os.stat(os.path.join(d, name)).st_size
                    size += n
                    h.update(f"{rel}\t{n}\n".encode())
    return {"size": size, "fingerprint": "sha256:" + h.hexdigest()}


def source_mismatch(manifest: dict, source) -> Optional[str]:
    """Why `source` is not what the prepared `manifest` was made from, or None when it is."""
    recorded = manifest.get("source", {})
    path = Path(source).expanduser().resolve()
    made_from = f"{recorded.get('path')} ({recorded.get('kind')}, {recorded.get('size', '?')} bytes)"
    if "fingerprint" not in recorded:  # shards from before fingerprints: the path is all we have
        if not recorded.get("path") or str(path) == recorded.get("path"):
            return None  # nothing recorded at all (a manifest written by hand): nothing to compare
        return f"made from {made_from}, not from {path} (compared by path: these shards record no fingerprint)"
    if not path.exists():
        # the source deleted after preparing is fine; a different path that does not exist is a typo
        return None if str(path) == recorded.get("path") else f"made from {made_from}; {path} does not exist"
    given = fingerprint(path)
    if given["fingerprint"] == recorded["fingerprint"]:
        return None  # same content, wherever it lives now
    return f"made from {made_from}, not from {path} ({given['size']} bytes, other content)"
