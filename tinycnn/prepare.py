"""`tinycnn-prepare`: turn Tiny ImageNet into WebDataset shards (format: shards/README.md).

Sources: the official `tiny-imagenet-200.zip` (read in place), its extracted folder, or a folder of
Hugging Face parquet files (`zh-plus/tiny-imagenet`). `tinycnn-prepare download` fetches the zip first.

Every image is strict-decoded once (in parallel) so that a truncated, non-JPEG or wrongly sized image
is refused before anything is written; shards keep the original JPEG bytes. The output is built in a
temporary folder beside `--out` and renamed into place only when complete, so a folder holding a
manifest.json is always a complete dataset.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import http.client
import json
import multiprocessing
import os
import random
import re
import secrets
import shutil
import signal
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
import zlib
from collections import Counter, defaultdict, deque
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Dict, Iterator, List, Mapping, Optional, Union

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn)
from rich.table import Table
from rich.text import Text

from .tar import write_shard

__all__ = ["PrepareError", "prepare", "download", "download_hf", "ensure_prepared", "is_prepared", "main"]

DEFAULT_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
OFFICIAL_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
HF_REPO = "zh-plus/tiny-imagenet"
DEFAULT_NUM_SHARDS = {"train": 64, "val": 16, "test": 16, "unlabeled": 16}
SPLITS = tuple(DEFAULT_NUM_SHARDS)
IMAGE_SIZE = 64
FORMAT, FORMAT_VERSION = "tinycnn-shards", 2  # 2: no .wnid member, optional gzip, source fingerprint

_CHUNK = 256            # images per decode-check task
_MIN_POOL_IMAGES = 2000  # below this a process pool costs more than it saves
_MAX_LISTED = 10        # bad files named in an error message
_LOCAL_HINT = "tinycnn-prepare /path/to/tiny-imagenet-200.zip --out DIR"
_MIB = 1 << 20
_OFFICIAL_MB = 248      # size of the official zip, said before downloading it


class PrepareError(ValueError):
    """Bad input or environment; the message says what is wrong and where (a ValueError: the recipes
    print it as one line)."""


@dataclass
class _Item:
    key: str                    # WebDataset __key__: the source image's stem
    file: str                   # where it came from, for messages and manifest["skipped"]
    origin: str                 # official split: "train", "val" (labeled) or "test" (unlabeled)
    wnid: Optional[str]
    data: bytes = b""
    error: Optional[str] = None
    gray: bool = False
    label: int = -1


# ----------------------------------------------------------------------------------------------
# Sources


@dataclass
class _Source:
    kind: str                   # "zip" | "folder" | "parquet"
    path: Path
    wnids: Optional[List[str]]  # None: the wnids present in the train images (parquet)
    names: Dict[str, str]
    total: int                  # number of images items() yields, for the progress bar
    items: Iterator[_Item]
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


def _layout_source(tree, kind: str, path: Path, include_unlabeled: bool) -> _Source:
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
            it = _Item(_key(name), f, origin, wnid)
            try:
                it.data = tree.read(f)
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
                it.error = f"cannot read it: {e}"
            yield it

    return _Source(kind, path, sorted(wnids), names, len(entries), items(), problems)


def _import_pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PrepareError('reading parquet files needs pyarrow: pip install "tinycnn[parquet]"') from None
    return pq


def _parquet_source(path: Path, files: List[Path], include_unlabeled: bool) -> _Source:
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
                        it = _Item(_key(p) if p else f"{split_name}_{row}", f"{rel}[row {row}]", origin, None)
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

    return _Source("parquet", path, None, {}, total, items(), [])


def _open_source(source, include_unlabeled: bool) -> _Source:
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
# Strict decode check (runs in worker processes)


def _check_jpeg(data: bytes):
    """Channel count (1 or 3) of a valid 64x64 JPEG, else the reason it is refused."""
    if not data.startswith(b"\xff\xd8"):
        return "not a JPEG (no start-of-image marker)"
    # libjpeg decodes a truncated file with a grey bottom and (in older torchvision) only a warning:
    # the end-of-image marker is the sure sign of a complete file
    if not data.rstrip(b"\0\r\n ").endswith(b"\xff\xd9"):
        return "truncated JPEG (no end-of-image marker)"
    try:
        shape = _decode_shape(data)
    except (RuntimeError, UserWarning, OSError, SyntaxError) as e:
        return f"JPEG does not decode ({str(e).rsplit(', ', 1)[-1].strip()})"
    c, h, w = shape
    if (h, w) != (IMAGE_SIZE, IMAGE_SIZE):
        return f"image is {w}x{h}, expected {IMAGE_SIZE}x{IMAGE_SIZE}"
    if c not in (1, 3):
        return f"image has {c} channels, expected 1 (grayscale) or 3"
    return c


def _decode_shape(data: bytes):
    """(channels, height, width) after a full decode; raises on a damaged image."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # libjpeg's "premature end of data" must not pass
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 deprecates its decoders
        try:
            import torch
            from torchvision.io import ImageReadMode, decode_jpeg
        except ImportError:  # a torchvision without image decoding: PIL, strict by default
            import io
            from PIL import Image
            with Image.open(io.BytesIO(data)) as im:
                if im.format != "JPEG":
                    raise OSError(f"a {im.format} image, not a JPEG")
                im.load()
                return len(im.getbands()), im.height, im.width
        return tuple(decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                 mode=ImageReadMode.UNCHANGED).shape)


def _check_jpegs(blobs: List[bytes]) -> list:
    return [_check_jpeg(b) for b in blobs]


def _die_with_parent(parent: int):
    """End this worker when its parent dies, even by SIGKILL (no orphaned workers): on Linux the kernel
    kills it (PR_SET_PDEATHSIG); elsewhere a thread notices that the parent changed."""
    if sys.platform.startswith("linux"):
        import ctypes
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    else:
        threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # the parent died before this took effect
        os._exit(1)


def _exit_when_orphaned(parent: int, every: float = 0.5):
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(1)


def _init_worker(parent: int):
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent shuts the pool down
    import torch
    torch.set_num_threads(1)  # one process per core already


@contextlib.contextmanager
def _make_pool(workers: int, total: int):
    """Worker processes for the decode check and the shard writing; None: do it in this process."""
    if workers <= 1 or total < _MIN_POOL_IMAGES:  # a pool costs more than it saves on small inputs
        yield None
        return
    from concurrent.futures import ProcessPoolExecutor
    # fork: workers start at once and need not re-import torch (spawn would cost seconds per worker)
    ctx = multiprocessing.get_context("fork") if sys.platform.startswith("linux") else None
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(os.getpid(),))
    try:
        pool.submit(int).result()  # fork all workers now, before the progress bar starts its thread
        yield pool
    finally:
        pool.shutdown(cancel_futures=True)


def _scan(src: _Source, pool, advance) -> List[_Item]:
    """Read every image (sequentially) and decode-check it (in parallel); errors land on the items."""
    items: List[_Item] = []
    pending = deque()  # (item indices, future)

    def settle(idx, results):
        for i, r in zip(idx, results):
            if isinstance(r, str):
                items[i].error = r
            else:
                items[i].gray = r == 1
        advance(len(idx))

    def submit(idx):
        blobs = [items[i].data for i in idx]
        if pool is None:
            settle(idx, _check_jpegs(blobs))
        else:
            pending.append((idx, pool.submit(_check_jpegs, blobs)))
            while pending and pending[0][1].done():
                i, fut = pending.popleft()
                settle(i, fut.result())

    chunk = []
    for it in src.items:
        items.append(it)
        if it.error:
            advance(1)
            continue
        chunk.append(len(items) - 1)
        if len(chunk) == _CHUNK:
            submit(chunk)
            chunk = []
    if chunk:
        submit(chunk)
    while pending:
        i, fut = pending.popleft()
        settle(i, fut.result())
    return items


# ----------------------------------------------------------------------------------------------
# Splits and shards


def _label_items(items: List[_Item], wnids: List[str], problems: List[dict]) -> List[_Item]:
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


def _split(items: List[_Item], num_classes: int, holdout: int, seed: int) -> Dict[str, List[_Item]]:
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


def _write_split(folder: Path, split: str, members: List[_Item], num_shards: int, compress: bool, pool,
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


# ----------------------------------------------------------------------------------------------
# Output folder


def _version() -> str:
    # tinycnn/__init__ sets __version__ before it imports anything that could import us
    version = getattr(sys.modules.get(__package__ or "tinycnn"), "__version__", None)
    if version:
        return version
    try:
        from importlib.metadata import version as dist_version
        return dist_version("tinycnn")
    except Exception:
        return "unknown"


def _read_manifest(out: Path) -> Optional[dict]:
    """The manifest of a complete prepared folder, else None."""
    try:
        manifest = json.loads((out / "manifest.json").read_text())
        complete = manifest.get("format") == FORMAT and (out / "_info.json").is_file() and all(
            (out / s["file"]).is_file() for split in manifest["splits"].values() for s in split["shards"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return manifest if complete else None


def _is_ours(out: Path) -> bool:
    try:
        return json.loads((out / "manifest.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def is_prepared(out) -> bool:
    """True when `out` holds a complete prepared dataset (manifest.json and every shard it lists)."""
    return _read_manifest(Path(out)) is not None


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


def _install(tmp: Path, out: Path):
    """Rename the finished temporary folder to `out`, replacing an earlier prepared folder."""
    old = None
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        else:  # a folder of ours (checked before we started): move it aside until the new one is in place
            old = out.with_name(f"{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
            out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _lock(out: Path):
    """Hold OUT.lock (with our pid in it) while we write `out`: a second prepare into the same folder
    stops at once. The OS drops the lock when the process dies, however it dies."""
    import fcntl
    path = out.with_name(out.name + ".lock")
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise PrepareError(f"cannot create {path} ({e.strerror}); choose an --out in a folder you can write") \
                from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise PrepareError(f"{out} is being written by another tinycnn-prepare (pid {holder}); "
                               "wait for it to finish or stop it, or choose another --out") from None
        if os.path.exists(path) and os.path.samestat(os.fstat(fd), os.stat(path)):
            break  # else the holder removed the file as we opened it: lock the new one
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    try:
        yield
    finally:
        os.unlink(path)
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _remove_stale(out: Path, console: Console):
    """Remove OUT.tmp-* / OUT.old-* folders left by a prepare that died (called while holding the lock).

    Their names carry the writer's pid; a folder whose pid is alive is left alone.
    """
    for p in sorted(out.parent.glob(f"{glob.escape(out.name)}.*-*")):
        m = re.fullmatch(re.escape(out.name) + r"\.(tmp|old)-(?:(\d+)-)?[0-9a-f]{8}", p.name)
        if not m or not p.is_dir() or (m[2] and int(m[2]) != os.getpid() and _pid_alive(int(m[2]))):
            continue
        shutil.rmtree(p, ignore_errors=True)
        who = f"process {m[2]}" if m[2] else "an earlier run"
        console.print(Text(f"removed {p}, left by {who} that did not finish", style="yellow"), soft_wrap=True)


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


# ----------------------------------------------------------------------------------------------
# Provenance: what a prepared folder was made from


def _fingerprint(path: Path) -> Dict[str, Union[int, str]]:
    """Size and a cheap content fingerprint of a source, computed in well under a second.

    A file: sha256 over its size and its first and last MiB. A folder: sha256 over the list of its
    files (as _open_source sees them) with their sizes.
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


def _source_mismatch(manifest: dict, source) -> Optional[str]:
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
    given = _fingerprint(path)
    if given["fingerprint"] == recorded["fingerprint"]:
        return None  # same content, wherever it lives now
    return f"made from {made_from}, not from {path} ({given['size']} bytes, other content)"


# ----------------------------------------------------------------------------------------------
# prepare


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
    with _lock(out):
        _remove_stale(out, Console(stderr=True))
        existing = _read_manifest(out)
        if existing is not None and not force:
            _check_existing(existing, out, source, settings)
            console.print(Text(f"{out} is already prepared (pass --force to rebuild)", style="green"),
                          soft_wrap=True)
            return existing
        if source is None:
            raise PrepareError(f"{out} is not prepared and no source was given: "
                               f"tinycnn-prepare /path/to/tiny-imagenet-200.zip --out {out}")
        if out.exists() and not _is_ours(out) and (not out.is_dir() or any(out.iterdir())):
            # never delete what we did not write (an incomplete folder of ours is rebuilt)
            raise PrepareError(f"{out} exists and is not a prepared dataset; choose a new or empty folder")
        workers = workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                              else os.cpu_count() or 1)
        src = _open_source(source, include_unlabeled)
        # the owner's pid in the name: a later run removes the folder only once that process is gone
        tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        tmp.mkdir()
        try:
            manifest = _write_dataset(src, tmp, out.name, settings, shard_counts, skip_bad, workers, console,
                                      progress)
            _install(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if progress:
        _summary(manifest, time.perf_counter() - started, out, Console())
        for p in manifest["skipped"][:_MAX_LISTED]:
            console.print(Text(f"skipped {p['file']}: {p['reason']}", style="yellow"), soft_wrap=True)
    return manifest


def _check_existing(manifest: dict, out: Path, source, settings: dict):
    """Refuse to take a prepared folder as it is when it was made from another source or with other settings."""
    if source is not None:
        why = _source_mismatch(manifest, source)
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


def _write_dataset(src: _Source, tmp: Path, dataset_name: str, settings: dict, shard_counts: Dict[str, int],
                   skip_bad: bool, workers: int, console: Console, progress: bool) -> dict:
    """Check every image, split, write the shards, _info.json and (last) manifest.json into `tmp`."""
    columns = (TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with _make_pool(workers, src.total) as pool, Progress(*columns, console=console, disable=not progress) as bars:
        task = bars.add_task(f"checking {src.kind}", total=src.total)
        items = _scan(src, pool, lambda n: bars.advance(task, n))

        problems = list(src.problems)
        wnids = src.wnids or sorted({it.wnid for it in items
                                     if it.origin == "train" and it.error is None and it.wnid})
        if not wnids:
            raise PrepareError(f"{src.path}: no usable train images")
        names = src.names or {w: w for w in wnids}
        good = _label_items(items, wnids, problems)
        if problems and not skip_bad:
            listed = "\n".join(f"  {p['file']}: {p['reason']}" for p in problems[:_MAX_LISTED])
            more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
            raise PrepareError(f"{len(problems)} bad input(s) in {src.path}:\n{listed}{more}\n"
                               "Fix the source, or pass --skip-bad (skip_bad=True) to leave them out "
                               "and list them in manifest.json")
        splits = _split(good, len(wnids), settings["holdout_per_class"], settings["seed"])

        task = bars.add_task("writing shards", total=sum(map(len, splits.values())))
        manifest_splits = {}
        for name, members in splits.items():
            shards = _write_split(tmp, name, members, shard_counts[name], settings["compress"], pool,
                                  lambda n: bars.advance(task, n))
            counts = Counter(it.label for it in members)
            manifest_splits[name] = {
                "num_samples": len(members),
                "grayscale": sum(it.gray for it in members),
                "shards": shards,
                "class_counts": [counts[i] for i in range(len(wnids))],
            }

    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "tinycnn_version": _version(),
        "source": {"kind": src.kind, "path": str(src.path), **_fingerprint(src.path)},
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


# ----------------------------------------------------------------------------------------------
# Download


def _offline(url: str, reason) -> PrepareError:
    return PrepareError(f"cannot reach {url} ({reason}). Offline? Copy tiny-imagenet-200.zip to this machine "
                        f"and pass the local copy: {_LOCAL_HINT}")


def _verify(path: Path, md5: Optional[str], sha256: Optional[str]):
    for algo, want in (("md5", md5), ("sha256", sha256)):
        if not want:
            continue
        h = hashlib.new(algo)
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        if h.hexdigest() != want.lower():
            raise PrepareError(f"checksum mismatch for {path.name}: {algo} {h.hexdigest()}, expected {want}. "
                               "The download is corrupt or not the expected file; run again to re-download, "
                               "or pass the right --md5/--sha256 (or --no-verify)")


def _fetch(url: str, part: Path, timeout: float, progress: bool, retried: bool = False):
    """Download `url` into `part`, continuing a partial file with an HTTP Range request."""
    # hand-written because torchvision's download_url (and huggingface_hub, for non-Hub URLs) restart an
    # interrupted 248 MB download from zero; this one continues it
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": f"tinycnn-prepare/{_version()}"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have and not retried:
            # nothing left past our end: complete if the sizes agree, else start over
            total = (e.headers.get("Content-Range") or "").rpartition("/")[2]
            if total.isdigit() and int(total) == have:
                return
            part.unlink()
            return _fetch(url, part, timeout, progress, retried=True)
        raise PrepareError(f"download failed: HTTP {e.code} {e.reason} for {url}") from None
    except (urllib.error.URLError, OSError) as e:  # DNS failure, connection refused, timeout
        raise _offline(url, getattr(e, "reason", e)) from None
    with resp:
        start = have
        if resp.status == 206:
            m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
            if not m or int(m[1]) != have:
                raise PrepareError(f"download failed: the server answered range {resp.headers.get('Content-Range')} "
                                   f"to bytes={have}-; delete {part} and run again")
        else:  # 200: the server ignores Range and sends everything
            start = 0
        length = resp.headers.get("Content-Length")
        total = start + int(length) if length and length.isdigit() else None
        done = start
        columns = (TextColumn("downloading"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn())
        with open(part, "ab" if start else "wb") as f, \
                Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
            task = bar.add_task("download", total=total, completed=start)
            try:
                while block := resp.read(1 << 20):
                    f.write(block)
                    done += len(block)
                    bar.update(task, completed=done)
            except (OSError, http.client.HTTPException) as e:
                raise PrepareError(f"download interrupted after {done} bytes ({e!r}); "
                                   "run the same command again to resume") from None
    if total is not None and done < total:
        raise PrepareError(f"download interrupted after {done} of {total} bytes; run the same command again to resume")


def download(out_dir, url: str = DEFAULT_URL, md5: Optional[str] = OFFICIAL_MD5, *, sha256: Optional[str] = None,
             timeout: float = 10.0, progress: bool = True) -> Path:
    """Fetch the Tiny ImageNet zip into `out_dir` (resumable, checksum-verified) and return its path.

    An existing complete file is verified and reused. md5=None and sha256=None skip the check (the
    default md5 is the official zip's). Offline, it fails at once with a hint to pass a local copy.
    """
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / (PurePosixPath(urllib.parse.urlparse(url).path).name or "tiny-imagenet-200.zip")
    if dest.exists():
        _verify(dest, md5, sha256)
        return dest
    part = dest.with_name(dest.name + ".part")
    _fetch(url, part, timeout, progress)
    try:
        _verify(part, md5, sha256)
    except PrepareError:
        part.unlink()  # resuming a corrupt file would never fix it
        raise
    part.replace(dest)
    return dest


def download_hf(out_dir, *, repo_id: str = HF_REPO) -> Path:
    """Fetch the Hugging Face parquet files of `repo_id` into `out_dir`/<name> and return that folder."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise PrepareError('--hf needs huggingface_hub: pip install "tinycnn[download]"') from None
    local = Path(out_dir).expanduser() / repo_id.replace("/", "--")
    try:
        return Path(snapshot_download(repo_id=repo_id, repo_type="dataset", local_dir=local,
                                      allow_patterns=["*.parquet", "README.md"]))
    except Exception as e:  # offline errors differ between huggingface_hub versions
        raise _offline(f"https://huggingface.co/datasets/{repo_id}", f"{type(e).__name__}: {e}") from None


def _download_official(out: Path, where: Path, url: str, md5: Optional[str], sha256: Optional[str] = None,
                       progress: bool = True) -> Path:
    """The zip at `url` in `where`, fetched (or reused) after saying what, how big and where."""
    Console(stderr=True).print(
        Text(f"downloading {url} (the official zip is ~{_OFFICIAL_MB} MB) into {where}, "
             f"then writing shards to {out}", style="cyan"), soft_wrap=True)
    return download(where, url, md5, sha256=sha256, progress=progress)


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
    manifest = _read_manifest(out)
    if manifest is not None:
        if source is not None and (why := _source_mismatch(manifest, source)):
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
        source = _download_official(out, out.parent / "downloads", url, md5,
                                    progress=prepare_kwargs.get("progress", True))
    prepare(source, out, **prepare_kwargs)
    return out


# ----------------------------------------------------------------------------------------------
# CLI

_EPILOG = """\
sources:
  tiny-imagenet-200.zip   the official zip, read in place (any single top folder, or none)
  FOLDER                  the extracted zip (the folder holding wnids.txt, or its parent)
  FOLDER                  Hugging Face parquet files (train-*.parquet, valid-*.parquet below it)
  download                fetch the official zip (or with --hf the parquet files) first

splits (default): train = official train minus --holdout images per class, val = the held-out
images, test = the official validation images. --holdout 0: train = all train images, val = official
validation, no test. The official test images have no labels and are left out unless
--include-unlabeled (split 'unlabeled', cls -1).

Every image is decoded once: a truncated or non-JPEG file, an image that is not 64x64, an unknown
wnid or a duplicate key stops the run (exit 2) naming the file; --skip-bad leaves such files out
and lists them in manifest.json. Output appears only when complete (built in DIR.tmp-<pid>-*,
removed by the next run if this one is killed); DIR.lock stops a second prepare into DIR.
manifest.json records the source's path, size and fingerprint: re-running with another source
into a prepared DIR is an error unless --force.

--compress writes gzip-compressed shards (<split>-NNNNN.tar.gz, ~0.4x the bytes of plain ones, ~0.7x
the JPEG bytes; webdataset, timm and tinycnn read them as they are): for readers that pay for
bandwidth (object storage, HTTP, many nodes). On a local disk plain shards read faster.

examples:
  tinycnn-prepare ~/Downloads/tiny-imagenet-200.zip --out shards/tiny-imagenet
  tinycnn-prepare data/tiny-imagenet-200 --out shards/tiny-imagenet --holdout 0
  tinycnn-prepare data/hf-tiny-imagenet --out shards/tiny-imagenet --num-shards train=32,val=8,test=8
  tinycnn-prepare ~/Downloads/tiny-imagenet-200.zip --out shards/tiny-imagenet-gz --compress
  tinycnn-prepare download --out shards/tiny-imagenet
  tinycnn-prepare download --hf --out shards/tiny-imagenet
  tinycnn-prepare download --url http://mirror.example/tiny-imagenet-200.zip --out shards/tiny-imagenet
"""


def _parse_num_shards(text: str):
    if text.strip().isdigit() and int(text) > 0:
        return int(text)
    counts = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or not value.strip().isdigit() or int(value) < 1 or name.strip() not in SPLITS:
            raise argparse.ArgumentTypeError(f"expected e.g. train=64,val=16,test=16 or one number, got {text!r}")
        counts[name.strip()] = int(value)
    return counts


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tinycnn-prepare", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG,
        description="Write Tiny ImageNet as WebDataset shards (original JPEG bytes; label = index of the wnid in\n"
                    "the sorted wnids) with manifest.json and timm's _info.json. Layout: shards/README.md.")
    p.add_argument("source", help="tiny-imagenet-200.zip, its extracted folder, a folder of parquet files, "
                                  "or 'download'")
    p.add_argument("--out", type=Path, default=Path("shards/tiny-imagenet"),
                   help="output folder (default: %(default)s)")
    p.add_argument("--holdout", type=int, default=50, metavar="N",
                   help="train images per class held out as val; 0: official validation as val, no test "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the holdout and the shuffle (default: %(default)s)")
    p.add_argument("--num-shards", type=_parse_num_shards, default=None, metavar="SPEC",
                   help="shards per split, e.g. train=64,val=16,test=16 (the default), or one number for all")
    p.add_argument("--skip-bad", action="store_true", help="leave out bad images and list them in manifest.json")
    p.add_argument("--force", action="store_true", help="rebuild an output folder that is already prepared")
    p.add_argument("--include-unlabeled", action="store_true",
                   help="also write the official unlabeled test images as split 'unlabeled' (cls -1)")
    p.add_argument("--include-unlabeled-test", dest="include_unlabeled", action="store_true",
                   help=argparse.SUPPRESS)  # the flag's old name
    p.add_argument("--compress", action="store_true",
                   help="gzip-compressed shards (<split>-NNNNN.tar.gz): ~0.4x the bytes, for remote readers")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes for the decode check and the shard writing (default: all usable cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars and no summary table")
    d = p.add_argument_group("download (with source 'download')")
    d.add_argument("--url", default=None, help=f"where to fetch the zip (default: {DEFAULT_URL}); "
                                               "a mirror is checked against the official md5 unless told otherwise")
    d.add_argument("--hf", action="store_true", help=f"fetch the parquet files of {HF_REPO} via huggingface_hub")
    d.add_argument("--md5", default=None, help=f"expected md5 of the zip (default: the official {OFFICIAL_MD5})")
    d.add_argument("--sha256", default=None, help="expected sha256 of the zip (given alone, it replaces the md5 check)")
    d.add_argument("--no-verify", action="store_true", help="skip the checksum check")
    d.add_argument("--download-dir", type=Path, default=None,
                   help="where downloads go (default: OUT/../downloads); a partial download there is resumed")
    return p


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    is_download = args.source == "download"
    download_flags = [f for f, v in (("--url", args.url), ("--hf", args.hf), ("--md5", args.md5),
                                     ("--sha256", args.sha256), ("--no-verify", args.no_verify),
                                     ("--download-dir", args.download_dir)) if v]
    if download_flags and not is_download:
        parser.error(f"{', '.join(download_flags)} only go with the source 'download'")
    console = Console(stderr=True)
    progress = not args.no_progress
    try:
        with _stop_on_termination():
            source = args.source
            if is_download:
                source = _download_source(args, progress)
            prepare(source, args.out, holdout_per_class=args.holdout, seed=args.seed, num_shards=args.num_shards,
                    skip_bad=args.skip_bad, force=args.force, include_unlabeled=args.include_unlabeled,
                    compress=args.compress, workers=args.workers, progress=progress)
    except PrepareError as e:
        console.print(Text(f"error: {e}", style="bold red"), soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print(Text("interrupted; nothing was left in the output folder", style="red"))
        return 130
    return 0


def _download_source(args, progress: bool) -> Optional[Path]:
    """The downloaded source for `tinycnn-prepare download`; None when --out is already prepared
    (prepare() then only checks its settings)."""
    if not args.force and is_prepared(args.out):
        return None
    out = args.out.expanduser().absolute()
    where = args.download_dir or out.parent / "downloads"
    if args.hf:
        return download_hf(where)
    md5 = None if args.no_verify else (args.md5 or (None if args.sha256 else OFFICIAL_MD5))
    sha256 = None if args.no_verify else args.sha256
    return _download_official(out, where, args.url or DEFAULT_URL, md5, sha256, progress)


@contextlib.contextmanager
def _stop_on_termination():
    """SIGTERM and SIGHUP (a scheduler or a closed terminal) stop the run like Ctrl-C: the temporary folder
    is removed and the pool shut down, instead of the process vanishing mid-write."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {s: signal.signal(s, interrupt) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(main())
