"""The three source layouts read as one stream of images, and the fingerprint that tells sources apart.

Layouts: the official `tiny-imagenet-200.zip` (read in place), its extracted folder, or a folder of
Hugging Face parquet files (`zh-plus/tiny-imagenet`). `open_source` tells which and lists the images;
`fingerprint` and `source_mismatch` say whether a prepared folder was made from a given source.

A source is untrusted: every read is capped before it happens (declared sizes first, then at most the
cap plus one byte, whatever the size claims), the whole source is capped in members and bytes, and a
folder source reads nothing outside itself (a symbolic link out of it is listed as a problem, never read).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Dict, Iterator, List, Optional, Union

from .errors import PrepareError

_MIB = 1 << 20

# Caps on what a source may hold. The official zip: ~120,600 entries, ~250 MB of JPEGs of ~2 KB each,
# words.txt (the largest text file) 2.6 MB. Module constants so that tests can lower them.
MAX_IMAGE_BYTES = 4 * _MIB          # one image file
MAX_TEXT_BYTES = 64 * _MIB          # wnids.txt, words.txt, val_annotations.txt, a parquet footer
MAX_MEMBERS = 500_000               # entries of a zip, files of a folder, rows of the parquet files
MAX_SOURCE_BYTES = 2 << 30          # all images together (they are held in memory until written)
MAX_ZIP_DIRECTORY_BYTES = 256 * _MIB  # a zip's central directory (~10 MB for the official zip)


class Refused(Exception):
    """A source file that is not read, and why: the message is a phrase that follows the file's name."""


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", _MIB), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{n} bytes"


def _too_big(size: int, limit: int, declared: bool = False) -> Refused:
    what = "declares" if declared else "is"
    return Refused(f"{what} {_size(size)}, over the {_size(limit)} limit for this kind of file "
                   "(not a Tiny ImageNet file)")


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


def _not_tiny_imagenet(path: Path, what: str) -> PrepareError:
    return PrepareError(f"{path}: {what}; not the Tiny ImageNet zip (a damaged or wrong download?): download it "
                        "again, or pass the extracted folder")


def _check_zip_directory(path: Path):
    """Refuse a zip whose end record announces too many entries or too large a central directory,
    before zipfile reads and parses that directory into memory."""
    try:
        with open(path, "rb") as f:
            end = zipfile._EndRecData(f)  # the record zipfile itself reads first; None: not a zip
    except (AttributeError, OSError):  # no such helper in this Python, or unreadable: ZipFile says why
        return
    if end is None:
        return
    if end[zipfile._ECD_ENTRIES_TOTAL] > MAX_MEMBERS:
        raise _not_tiny_imagenet(path, f"it announces {end[zipfile._ECD_ENTRIES_TOTAL]:,} entries, more than "
                                       f"the {MAX_MEMBERS:,} allowed (the official zip holds ~120,600)")
    if end[zipfile._ECD_SIZE] > MAX_ZIP_DIRECTORY_BYTES:
        raise _not_tiny_imagenet(path, f"its directory is {_size(end[zipfile._ECD_SIZE])}, over the "
                                       f"{_size(MAX_ZIP_DIRECTORY_BYTES)} allowed")


class _ZipTree:
    def __init__(self, path: Path):
        _check_zip_directory(path)
        try:
            self.zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise PrepareError(f"{path}: not a readable zip file ({e}); a corrupt or incomplete download? "
                               "Download it again or pass the extracted folder") from None
        infos = self.zf.infolist()
        if len(infos) > MAX_MEMBERS:
            raise _not_tiny_imagenet(path, f"it holds {len(infos):,} entries, more than the {MAX_MEMBERS:,} allowed")
        declared = sum(i.file_size for i in infos)
        if declared > MAX_SOURCE_BYTES:
            raise _not_tiny_imagenet(path, f"its members declare {_size(declared)} uncompressed, over the "
                                           f"{_size(MAX_SOURCE_BYTES)} allowed (Tiny ImageNet unpacks to ~250 MB)")
        self.names = [i.filename for i in infos if not i.is_dir()]  # archive order: sequential reads
        self.links: List[tuple] = []  # a zip read by zipfile holds no symbolic links

    def read(self, name: str, limit: int) -> bytes:
        info = self.zf.getinfo(name)
        if info.file_size > limit:
            raise _too_big(info.file_size, limit, declared=True)
        with self.zf.open(info) as f:
            data = f.read(limit + 1)  # bounded even when the declared size lies
        if len(data) > limit:
            raise Refused(f"holds more than the {_size(limit)} limit for this kind of file "
                          f"(declares {_size(info.file_size)})")
        return data


class _DirTree:
    """The files of an extracted folder. Symbolic links to folders are never entered (they are listed in
    `links` with the reason); a file is read only when its real path is inside the folder."""

    def __init__(self, path: Path):
        self.root = path  # resolved by open_source: the real folder
        self.names: List[str] = []
        self.links: List[tuple] = []  # (relative name, reason): linked folders, not followed
        for d, dirs, files in os.walk(path, followlinks=False):
            rel = Path(d).relative_to(path).as_posix()
            linked = {x for x in dirs if os.path.islink(os.path.join(d, x))}
            for x in sorted(linked):
                target = Path(os.path.realpath(os.path.join(d, x)))
                where = "outside the source folder" if not target.is_relative_to(path) else "inside the source folder"
                self.links.append((x if rel == "." else f"{rel}/{x}",
                                   f"a symbolic link to the folder {target} ({where}): not followed; "
                                   "put the folder itself there"))
            dirs[:] = sorted(x for x in dirs if x not in linked)
            self.names += [f if rel == "." else f"{rel}/{f}" for f in sorted(files)]
            if len(self.names) > MAX_MEMBERS:
                raise PrepareError(f"{path}: more than {MAX_MEMBERS:,} files below it (Tiny ImageNet has "
                                   "~120,000); pass the tiny-imagenet-200 folder itself")

    def read(self, name: str, limit: int) -> bytes:
        real = (self.root / name).resolve()
        if not real.is_relative_to(self.root):
            raise Refused(f"a symbolic link to {real}, outside the source folder: not read; "
                          "put the file itself there")
        # the real path, not followed again: what was checked above is what is opened
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise Refused("not a regular file: not read")
            if st.st_size > limit:
                raise _too_big(st.st_size, limit)
            data = f.read(limit + 1)  # the file may grow while we read
        if len(data) > limit:
            raise _too_big(len(data), limit)
        return data


def _lines(data: bytes) -> List[str]:
    # utf-8-sig + splitlines + strip: BOM, CRLF, blank lines and a missing final newline all read the same
    return [ln.strip() for ln in data.decode("utf-8-sig").splitlines() if ln.strip()]


def _text_lines(tree, name: str, path: Path) -> List[str]:
    """The lines of a text file of the layout (wnids.txt...), read under MAX_TEXT_BYTES."""
    try:
        return _lines(tree.read(name, MAX_TEXT_BYTES))
    except Refused as e:
        raise PrepareError(f"{path}: {name} {e}; fix the source or download it again") from None
    except UnicodeDecodeError:
        raise PrepareError(f"{path}: {name} is not UTF-8 text; fix the source or download it again") from None
    except Exception as e:  # a damaged zip member, an unreadable file
        raise PrepareError(f"{path}: cannot read {name} ({e}); fix the source or download it again") from None


def _key(name: str) -> str:
    # WebDataset splits a member name at the first dot of its basename: keys must not hold dots
    return PurePosixPath(name).stem.replace(".", "_")


def _layout_source(tree, kind: str, path: Path, include_unlabeled: bool) -> Source:
    """The tiny-imagenet-200 layout, at the top of `tree` or inside a single top folder."""
    files = [f for f in tree.names if not _IGNORED.search(f)]
    tops = [f for f in files if f.count("/") <= 1 and PurePosixPath(f).name == "wnids.txt"]
    if not tops:
        linked = " (symbolic links to folders are not followed: pass the folder they point to)" \
            if tree.links else ""
        raise PrepareError(f"{path}: no wnids.txt at the top or in a single top folder; expected the "
                           f"tiny-imagenet-200 layout (wnids.txt, words.txt, train/<wnid>/images/, val/){linked}")
    if len(tops) > 1:
        raise PrepareError(f"{path}: several datasets in one source ({', '.join(tops)}); pass one of them")
    prefix = tops[0][: -len("wnids.txt")]
    wnids = _text_lines(tree, tops[0], path)
    if not wnids:
        raise PrepareError(f"{path}: {tops[0]} lists no classes")
    dup = [w for w, n in Counter(wnids).items() if n > 1]
    if dup:
        raise PrepareError(f"{path}: {tops[0]} lists {dup[0]} twice")

    # words.txt names 82k WordNet ids: keep ours; a class without a name is named by its wnid
    names = {w: w for w in wnids}
    if prefix + "words.txt" in files:
        for ln in _text_lines(tree, prefix + "words.txt", path):
            wnid, _, name = ln.partition("\t")
            if wnid in names and name.strip():
                names[wnid] = name.strip()

    ann_name = prefix + "val/val_annotations.txt"
    annotations: Dict[str, str] = {}
    if ann_name in files:
        for n, ln in enumerate(_text_lines(tree, ann_name, path), 1):
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
    problems += [{"file": name, "reason": why} for name, why in tree.links
                 if name.startswith(prefix) and not _IGNORED.search(name)]
    budget = _Budget(path)

    def items():
        for f, origin, wnid, name in entries:
            it = Item(_key(name), f, origin, wnid)
            try:
                data = tree.read(f, MAX_IMAGE_BYTES)
            except Refused as e:
                it.error = str(e)
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError, RuntimeError, NotImplementedError,
                    ValueError) as e:  # damaged, encrypted, or compressed in a way zipfile cannot read
                it.error = f"cannot read it: {e}"
            else:
                it.data = budget.take(data)
            yield it

    return Source(kind, path, sorted(wnids), names, len(entries), items(), problems)


class _Budget:
    """The bytes of all images read so far, refused past MAX_SOURCE_BYTES (they are all held in memory)."""

    def __init__(self, path: Path):
        self.path, self.used = path, 0

    def take(self, data: bytes) -> bytes:
        self.used += len(data)
        if self.used > MAX_SOURCE_BYTES:
            raise PrepareError(f"{self.path}: its images hold more than {_size(MAX_SOURCE_BYTES)} (Tiny ImageNet: "
                               "~250 MB); pass tiny-imagenet-200.zip, its extracted folder or its parquet files")
        return data


def _import_pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PrepareError('reading parquet files needs pyarrow: pip install "tinycnn[parquet]"') from None
    return pq


def _parquet_footer_check(f: Path):
    """Refuse a file that is not parquet, or whose footer (read into memory whole by pyarrow) is too large."""
    try:
        with open(f, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            fh.seek(max(size - 8, 0))
            tail = fh.read(8)
    except OSError as e:
        raise PrepareError(f"{f}: cannot read it ({e.strerror}); fix the source or download it again") from None
    if size < 12 or tail[4:] != b"PAR1":
        raise PrepareError(f"{f}: not a parquet file (no PAR1 footer); a damaged download? Download it again")
    footer = int.from_bytes(tail[:4], "little")
    if footer > MAX_TEXT_BYTES or footer > size - 12:
        raise PrepareError(f"{f}: its parquet footer claims {_size(footer)} (allowed: {_size(MAX_TEXT_BYTES)}, "
                           "within the file); a damaged download? Download it again")


def _parquet_file(pq, f: Path):
    _parquet_footer_check(f)
    try:
        return pq.ParquetFile(f)
    except Exception as e:  # pyarrow's errors for a damaged file differ between versions
        raise PrepareError(f"{f}: not a readable parquet file ({e}); download it again") from None


def _parquet_source(path: Path, files: List[Path], include_unlabeled: bool) -> Source:
    # huggingface_hub may leave the files as links into its cache, outside `path`: parquet links are followed
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

    # row counts and declared sizes from the footers, before any image is read
    total = declared = 0
    for f, _ in (x for g in groups.values() for x in g):
        meta = _parquet_file(pq, f).metadata
        total += meta.num_rows
        declared += sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    if total > MAX_MEMBERS:
        raise PrepareError(f"{path}: its parquet files hold {total:,} rows, more than the {MAX_MEMBERS:,} allowed "
                           "(Tiny ImageNet: ~120,000); pass the Tiny ImageNet parquet files only")
    if declared > MAX_SOURCE_BYTES:
        raise PrepareError(f"{path}: its parquet files declare {_size(declared)} of data, over the "
                           f"{_size(MAX_SOURCE_BYTES)} allowed (Tiny ImageNet: ~250 MB); pass the Tiny ImageNet "
                           "parquet files only")

    # ClassLabel names (all 200 official wnids) live in the schema metadata that `datasets` writes
    try:
        meta = json.loads(pq.read_schema(groups["train"][0][0]).metadata[b"huggingface"])
        all_names = meta["info"]["features"]["label"]["names"]
        if not isinstance(all_names, list) or not all(isinstance(n, str) for n in all_names):
            raise TypeError
    except Exception:
        raise PrepareError(f"{groups['train'][0][0]}: no class names in the parquet metadata "
                           "(key 'huggingface' -> info.features.label.names)") from None
    budget = _Budget(path)

    def columns(f: Path, batch):
        """(image bytes, image paths, labels) of a batch, or a one-line error for a file of another layout."""
        try:
            image = batch.column("image")
            blobs = image.field("bytes").to_pylist()
            has_path = "path" in [image.type.field(i).name for i in range(image.type.num_fields)]
            paths = image.field("path").to_pylist() if has_path else [None] * len(blobs)
            return blobs, paths, batch.column("label").to_pylist()
        except Exception as e:
            raise PrepareError(f"{f}: cannot read its images ({type(e).__name__}: {e}); expected the Hugging Face "
                               "layout (image: {bytes, path}, label: int)") from None

    def batches(f: Path, pf):
        it = pf.iter_batches(batch_size=1024, columns=["image", "label"])
        while True:
            try:
                batch = next(it, None)
            except Exception as e:  # a damaged page
                raise PrepareError(f"{f}: cannot read it ({type(e).__name__}: {e}); a damaged download? "
                                   "Download it again") from None
            if batch is None:
                return
            yield columns(f, batch)

    def items():
        for origin, group in groups.items():
            row = 0  # fallback keys count rows across the files of a split
            for f, split_name in group:
                pf = _parquet_file(pq, f)
                if not {"image", "label"} <= set(pf.schema_arrow.names):
                    raise PrepareError(f"{f}: expected columns 'image' and 'label', found {pf.schema_arrow.names}")
                rel = f.relative_to(path).as_posix()
                for blobs, paths, labels in batches(f, pf):
                    for data, p, label in zip(blobs, paths, labels):
                        key = _key(p) if isinstance(p, str) and p else f"{split_name}_{row}"
                        it = Item(key, f"{rel}[row {row}]", origin, None)
                        if origin != "test":
                            if isinstance(label, int) and 0 <= label < len(all_names):
                                it.wnid = all_names[label]
                            else:
                                it.error = f"label {label} is outside the {len(all_names)} class names"
                        if not isinstance(data, bytes):
                            it.error = "no image bytes"
                        elif len(data) > MAX_IMAGE_BYTES:
                            it.error = str(_too_big(len(data), MAX_IMAGE_BYTES))
                        else:
                            it.data = budget.take(data)
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
                    try:
                        n = os.stat(os.path.join(d, name)).st_size
                    except OSError:  # a dangling link: its own size
                        n = os.lstat(os.path.join(d, name)).st_size
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
