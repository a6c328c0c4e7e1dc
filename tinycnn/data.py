"""Streaming loader: shards -> uint8 batches for each rank and worker.

The CPU only reads tar members and decodes JPEGs into uint8 (B, 3, 64, 64) batches; augmentation and
normalization run on the device (tinycnn.augment), after tinycnn.transfer moves the batches there. uint8
crosses the bus, never float32. The shard bytes come from tinycnn.storage (a folder or a URL).

Shards are untrusted input: each is read and decompressed within the limits its manifest entry sets
(storage.shard_limits), each JPEG's frame header must give the manifest's input_shape before it is decoded, and
each label must be a class index (or -1, unlabeled). A sample that fails is a bad sample (ShardError, or
skipped and counted with skip_bad).

How samples are split. Every (rank, worker) pair is one *consumer*. With at least as many shards as
consumers, consumer c reads the shards j with j % C == c; with fewer, consumers share a shard and
each keeps every m-th sample of it. Both are exact partitions of the split, so:
  - evaluation (train=False) sees every sample exactly once across all workers and processes, with
    no padding duplicates and no drops: sum metrics over ranks and they equal a 1-process run;
  - training (train=True) streams each consumer's part in a loop (reshuffled each pass) and every
    rank stops after the same `len(loader)` batches, so DDP never waits on an empty rank.
The shard-to-consumer assignment is reshuffled every epoch (`set_epoch`), so ranks see different
data from epoch to epoch.

Shards read from a URL can be kept in a node-local cache (`cache_dir`, tinycnn.cache): later epochs and runs
read them from disk, checked against the manifest.

Only the main process decides when to stop: the decoding workers ignore SIGTERM, SIGINT and SIGHUP, which a
cluster or a terminal sends to the whole process group, so that the main process can stop cleanly (save its
state, then ShardLoader.close) instead of failing on workers killed under it. A worker still dies with the
process that started it (PR_SET_PDEATHSIG on Linux; torch's workers also watch their parent).

The workers start by the program's start method: fork on Linux, spawn on macOS (and forkserver on Linux from
Python 3.14), where each worker unpickles the stream and imports tinycnn afresh. So the stream and the
worker_init_fn are plain picklable objects, and the counters shared with the workers (epoch, skipped samples) are
multiprocessing Values made under that same start method.

Do not pass these loaders through `accelerator.prepare`: accelerate's default for iterable datasets
(`dispatch_batches=True`) makes rank 0 read and decode everything; here each rank reads its own shards.
"""
import atexit
import ctypes
import io
import itertools
import math
import multiprocessing
import os
import random
import signal
import struct
import sys
import tarfile
import threading
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
try:  # torchvision 0.29 deprecates its image io in favour of torchcodec; PIL when it is gone
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:
    decode_jpeg = None

from .cache import ShardCache
from .config import ConfigError
from .environment import available_cpus
from .storage import PREPARE_HINT, RETRIES, ShardError, is_url, locate, read_manifest, read_shard, shard_limits
from .tar import MAX_TAR_BYTES, iter_samples

__all__ = ["split_shards", "ShardStream", "ShardLoader", "build_loader", "default_num_workers", "jpeg_frame"]

SKIP_HINT = ("re-run tinycnn-prepare with --force, or skip and count bad samples with data.skip_bad=true "
             "on the recipes' command line (skip_bad=True in Python)")


class SplitError(ConfigError, KeyError):
    """A split the prepared folder does not have (a KeyError too: a lookup by name)."""


@dataclass(frozen=True)
class ShardPart:
    """Samples `start, start + step, ...` below `limit` of one shard."""
    path: str
    limit: int
    start: int = 0
    step: int = 1

    def __len__(self) -> int:
        return max(0, math.ceil((self.limit - self.start) / self.step))


def split_shards(shards: Sequence[Tuple[str, int]], consumer: int, num_consumers: int) -> List[ShardPart]:
    """The part of `shards` [(path, num_samples)] that `consumer` of `num_consumers` reads (an exact partition)."""
    n = len(shards)
    if n == 0:  # an empty split
        return []
    if n >= num_consumers:
        return [ShardPart(p, c) for j, (p, c) in enumerate(shards) if j % num_consumers == consumer]
    j = consumer % n
    sharing = len(range(j, num_consumers, n))  # consumers reading shard j
    return [ShardPart(shards[j][0], shards[j][1], start=consumer // n, step=sharing)]


def _subset(shards: Sequence[Tuple[str, int]], size: Optional[int]) -> List[Tuple[str, int]]:
    """The first `size` samples in shard order (shards are shuffled at write time: a class-balanced-ish mix)."""
    if size is None:
        return list(shards)
    out, left = [], size
    for path, count in shards:
        if left <= 0:
            break
        out.append((path, min(count, left)))
        left -= count
    return out


def _as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_image(data: bytes) -> torch.Tensor:
    """JPEG bytes -> uint8 (3, H, W); grayscale becomes 3 channels."""
    if decode_jpeg is None:
        return _decode_pil(data)
    return decode_jpeg(_as_tensor(data), mode=ImageReadMode.RGB)


def _decode_pil(data: bytes) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for broken images
        raise RuntimeError(str(e)) from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def _decode_list(blobs: List[bytes]) -> List[torch.Tensor]:
    if decode_jpeg is None:
        return [_decode_pil(b) for b in blobs]
    return decode_jpeg([_as_tensor(b) for b in blobs], mode=ImageReadMode.RGB)


_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_MARKER = struct.Struct(">BBH").unpack_from  # 0xFF, marker, segment length
_FRAME = struct.Struct(">HHB").unpack_from   # height, width, components of a frame (SOFn) header


def jpeg_frame(data: bytes) -> Optional[Tuple[int, int, int]]:
    """(height, width, components) from a JPEG's frame header, without decoding; None if it has none.

    Walks the segments before the image data by their lengths (a few steps: APPn, DQT, SOFn), so a file cannot
    make a decoder allocate the image its header claims before its size is checked.
    """
    if data[:2] != b"\xff\xd8":
        return None
    pos, last = 2, len(data) - 4
    while pos <= last:
        ff, marker, length = _MARKER(data, pos)
        if ff != 0xFF:
            return None
        if marker in _SOF_MARKERS:
            return _FRAME(data, pos + 5) if pos + 10 <= len(data) else None
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
        elif marker == 0xDA or marker == 0xD9:  # image data or its end before any frame header
            return None
        else:
            pos += 2 + length  # length counts itself: every step moves forward
    return None


class ShardStream(IterableDataset):
    """Yields (uint8 images (B,3,H,W), int64 labels (B,)) batches of this worker's part of a split.

    train: loop over the part forever, shuffled (shard order + a shuffle buffer), full batches only.
    Otherwise: one pass in shard order, the last batch may be short.
    """

    def __init__(self, shards, *, batch_size, train, rank=0, world_size=1, seed=0, shuffle_buffer=2048,
                 image_shape=(3, 64, 64), skip_bad=False, retries=RETRIES,
                 shard_limits: Optional[Mapping[str, Tuple[int, int]]] = None, num_classes: Optional[int] = None,
                 cache: Optional[ShardCache] = None):
        """shard_limits: path -> (most bytes of the file, most bytes of its tar) (storage.shard_limits; default
        storage.MAX_SHARD_BYTES). num_classes: labels outside -1..num_classes-1 are bad samples (-1: unlabeled).
        cache: where the shards it lists are read from and kept (tinycnn.cache), instead of their URLs each time."""
        self.shards, self.batch_size, self.train = list(shards), batch_size, train
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.image_shape, self.skip_bad = shuffle_buffer, tuple(image_shape), skip_bad
        self.retries, self.shard_limits, self.num_classes = retries, dict(shard_limits or {}), num_classes
        self.cache = cache
        # shared with the worker processes: persistent workers see set_epoch, the main process sees skips
        self._epoch = multiprocessing.Value("i", 0)
        self.skipped = multiprocessing.Value("i", 0)

    @property
    def epoch(self) -> int:
        return self._epoch.value

    @epoch.setter
    def epoch(self, value: int):
        self._epoch.value = value

    def consumer(self) -> Tuple[int, int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return self.rank * workers + worker, self.world_size * workers

    def my_parts(self) -> List[ShardPart]:
        shards = self.shards
        if self.train:  # a new shard -> consumer assignment each epoch
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            shards = [shards[i] for i in torch.randperm(len(shards), generator=g).tolist()]
        return split_shards(shards, *self.consumer())

    def samples(self, parts: Sequence[ShardPart]) -> Iterator[Tuple[str, str, bytes, int]]:
        for part in parts:
            yield from self._read_part(part)

    def _read_part(self, part: ShardPart):
        file_limit, tar_limit = self.shard_limits.get(part.path, (None, MAX_TAR_BYTES))
        # missing, unreachable or over its limit: a ShardError, even with skip_bad
        if self.cache is not None and part.path in self.cache:
            data = self.cache.read(part.path, self.retries, file_limit)
        else:
            data = read_shard(part.path, self.retries, max_bytes=file_limit)
        height, width = self.image_shape[1:]
        labels = range(-1, self.num_classes) if self.num_classes is not None else None
        try:
            read = 0
            for i, sample in enumerate(iter_samples(data, part.path, max_tar_bytes=tar_limit)):
                if i >= part.limit:
                    break
                read = i + 1
                if i < part.start or (i - part.start) % part.step:
                    continue
                key = sample["__key__"]
                if "jpg" not in sample or "cls" not in sample:
                    self._bad(part.path, key, f"missing members (has {sorted(k for k in sample if not k.startswith('__'))})")
                    continue
                jpg = sample["jpg"]
                # checked before decoding: a decoder allocates whatever size the header claims
                frame = jpeg_frame(jpg)
                if frame is None or frame[0] != height or frame[1] != width or frame[2] not in (1, 3, 4):
                    what = "no JPEG frame header" if frame is None else \
                        f"a JPEG of {frame[1]}x{frame[0]} with {frame[2]} channels"
                    self._bad(part.path, key, f"{what}, expected {width}x{height}")
                    continue
                try:
                    label = int(sample["cls"])
                except ValueError:
                    label = None
                if label is None or (labels is not None and label not in labels):
                    self._bad(part.path, key, f"label {sample['cls'][:20]!r} is not a class index")
                    continue
                yield part.path, key, jpg, label
            if read < part.limit:  # tar readers stop quietly at a cut between members
                self._bad(part.path, "?", f"truncated shard: {read} of {part.limit} samples")
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            self._bad(part.path, "?", f"unreadable shard ({e})")

    def _bad(self, shard: str, key: str, why: str):
        if not self.skip_bad:
            raise ShardError(f"shard {shard}, sample {key}: {why}: {SKIP_HINT}")
        with self.skipped.get_lock():
            self.skipped.value += 1
        warnings.warn(f"skipping bad sample: shard {shard}, sample {key}: {why}")

    def _batches(self, stream) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Decode `batch_size` JPEGs per decode_jpeg call (a list: less per-image overhead) and stack them.

        Bad samples are skipped (or raise) one by one; train batches are always full.
        """
        images: List[torch.Tensor] = []
        labels: List[int] = []
        while True:
            chunk = list(itertools.islice(stream, self.batch_size))
            if not chunk:
                break
            try:
                decoded = _decode_list([jpg for _, _, jpg, _ in chunk])
            except RuntimeError:  # one bad image fails the list: find it one by one
                decoded = [self._decode_one(shard, key, jpg) for shard, key, jpg, _ in chunk]
            for (shard, key, _, label), img in zip(chunk, decoded):
                if img is None:
                    continue
                if img.shape != self.image_shape:
                    self._bad(shard, key, f"image of shape {tuple(img.shape)}, expected {self.image_shape}")
                    continue
                images.append(img)
                labels.append(label)
            while len(images) >= self.batch_size:
                yield torch.stack(images[:self.batch_size]), torch.tensor(labels[:self.batch_size])
                del images[:self.batch_size], labels[:self.batch_size]
        if images and not self.train:
            yield torch.stack(images), torch.tensor(labels)

    def _decode_one(self, shard, key, jpg) -> Optional[torch.Tensor]:
        try:
            return decode_image(jpg)
        except RuntimeError as e:
            self._bad(shard, key, f"JPEG does not decode ({e})")
            return None

    def _shuffled(self, stream, rng: random.Random):
        if self.shuffle_buffer <= 0:  # shard order is still reshuffled each pass
            yield from stream
            return
        buf = []
        for item in stream:
            if len(buf) < self.shuffle_buffer:
                buf.append(item)
                continue
            i = rng.randrange(len(buf))
            buf[i], item = item, buf[i]
            yield item
        rng.shuffle(buf)
        yield from buf

    def __iter__(self):
        try:
            yield from self._stream()
        except ShardError as e:
            if get_worker_info() is None:
                raise
            # torch would re-raise it wrapped in the worker's traceback: hand it over as an item instead,
            # ShardLoader raises it as is in the main process
            yield e

    def _stream(self):
        parts = self.my_parts()
        if not any(len(p) for p in parts):
            return
        c, _ = self.consumer()
        if self.train:
            def endless():
                for rep in itertools.count():
                    rng = random.Random(hash((self.seed, self.epoch, c, rep)))
                    order = list(range(len(parts)))
                    rng.shuffle(order)
                    yield from self._shuffled(self.samples([parts[i] for i in order]), rng)
            stream = endless()
        else:
            stream = self.samples(parts)
        yield from self._batches(stream)


_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))


class _WorkerStart:
    """Run first in each decoding worker (DataLoader's worker_init_fn), then `then` (another worker_init_fn).

    The stop signals a cluster (SLURM, `timeout`) or a terminal sends to the whole process group are ignored:
    only the main process decides to stop, then ends the workers itself (ShardLoader.close). torch's workers die
    on SIGTERM by default, which failed the main process's clean stop with "DataLoader worker ... is killed by
    signal". With `parent` (the pid that starts the workers from its main thread, Linux) a worker is killed when
    that process dies, however busy it is (torch's own check of the parent runs only between batches).
    """

    def __init__(self, parent: Optional[int] = None, then=None):
        self.parent, self.then = parent, then

    def __call__(self, worker_id: int):
        for sig in _STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        if self.parent is not None:
            _die_with_parent(self.parent)
        if self.then is not None:
            self.then(worker_id)


def _die_with_parent(parent: int):
    """SIGKILL this process when `parent` (the process that started it) dies (Linux; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the call above
        os.kill(os.getpid(), signal.SIGKILL)


# ShardLoaders with worker processes: stopped at exit, before multiprocessing's own clean-up, which would wait
# forever for workers that ignore its SIGTERM
_LOADERS_WITH_WORKERS: "weakref.WeakSet[ShardLoader]" = weakref.WeakSet()


@atexit.register  # after torch's and multiprocessing's registration: runs before them
def _close_loaders():
    for loader in list(_LOADERS_WITH_WORKERS):
        loader.close()


class ShardLoader:
    """An epoch of uint8 batches for this rank. `len()` is the number of batches this rank yields."""

    def __init__(self, stream: ShardStream, num_samples: int, num_workers: int, pin_memory: Optional[bool]):
        self.stream, self.num_samples, self.num_workers = stream, num_samples, num_workers
        self.pin_memory = pin_memory  # None: DevicePrefetcher decides (pinned for CUDA), else CUDA available
        self.batch_size = stream.batch_size
        self._loader: Optional[DataLoader] = None
        if stream.train:
            self.num_batches = num_samples // (stream.batch_size * stream.world_size)
            if self.num_batches == 0:
                raise ConfigError(f"{num_samples} samples make no full batch of {stream.batch_size} "
                                 f"on each of {stream.world_size} processes: lower the batch size (train.batch_size)")
        else:
            workers = max(1, num_workers)
            parts = [split_shards(stream.shards, stream.rank * workers + w, stream.world_size * workers)
                     for w in range(workers)]
            self.num_batches = sum(math.ceil(sum(len(p) for p in ps) / stream.batch_size) for ps in parts)

    @property
    def skipped(self) -> int:
        return self.stream.skipped.value

    def set_epoch(self, epoch: int):
        self.stream.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        if self._loader is None:
            pin = torch.cuda.is_available() if self.pin_memory is None else self.pin_memory
            # persistent workers: no process start-up per epoch; each epoch restarts their streams
            # (DataLoader discards batches prefetched for an epoch that stopped early)
            start = _WorkerStart(self._parent_to_watch()) if self.num_workers else None
            self._loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                                      pin_memory=pin, persistent_workers=self.num_workers > 0,
                                      prefetch_factor=4 if self.num_workers else None, worker_init_fn=start)
            if self.num_workers:
                _LOADERS_WITH_WORKERS.add(self)
        it = self._raise_relayed(self._loader) if self.num_workers else iter(self._loader)
        return itertools.islice(it, self.num_batches) if self.stream.train else it

    def _raise_relayed(self, batches):
        """The workers' batches; a ShardError a worker handed over (ShardStream.__iter__) is raised here as is."""
        for batch in batches:
            if isinstance(batch, ShardError):
                # the epoch is lost: stop the workers now rather than when the garbage collector finds them
                # (torch's clean-up from there waits seconds for each worker)
                self.close()
                raise batch
            yield batch

    @staticmethod
    def _parent_to_watch() -> Optional[int]:
        """This process's pid when its workers die with it: they are its own children (started by fork or spawn,
        not a forkserver) from its main thread (the death signal follows the thread that starts a process)."""
        # allow_none: asking must not fix the start method for the program (the first listed is the default)
        method = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
        if method not in ("fork", "spawn") or threading.current_thread() is not threading.main_thread():
            return None
        return os.getpid()

    def close(self, kill: bool = False):
        """Stop the worker processes now (they start again on the next iteration). kill: without asking them to
        finish their batch first (a loader nobody holds: its batches are nobody's)."""
        if self._loader is not None and self._loader._iterator is not None:
            iterator = self._loader._iterator
            if kill and not hasattr(iterator, "_pin_memory_thread"):  # (a worker killed mid-batch could leave
                # the pinning thread a half-written batch to wait for forever)
                for worker in getattr(iterator, "_workers", ()):
                    worker.kill()
            # torch stops persistent workers only when its iterator is garbage, which an iterator still
            # held anywhere (an abandoned epoch) prevents
            iterator._shutdown_workers()
            # a worker still busy (a shard still downloading) outlives torch's SIGTERM, which workers ignore
            for worker in getattr(iterator, "_workers", ()):
                if worker.is_alive():
                    worker.kill()
                    worker.join(timeout=5)
        self._loader = None
        _LOADERS_WITH_WORKERS.discard(self)

    def __del__(self):
        # dropped without close(): torch's own clean-up waits 5 s for a worker, then sends the SIGTERM the workers
        # ignore; a worker still busy (a loaded host, a slow spawn start) would then outlive its loader and make
        # multiprocessing's exit wait for it forever. Killed at once instead: this runs on whatever thread the
        # garbage collector is on, and waiting here stalled a new loader's start for 5 s a worker.
        if self.num_workers and self._loader is not None:
            self.close(kill=True)


def default_num_workers() -> int:
    """Decoding processes per rank: the cores this process may use, one left for each process's main thread
    (the train step, the pin-memory thread), shared among the processes of this host (LOCAL_WORLD_SIZE, set by
    torchrun and accelerate). Decoding scales with cores up to the GPU's appetite, so no fixed cap: a 16-core
    host with one GPU decodes with 15 workers."""
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(1, (available_cpus() - local) // local)


def build_loader(
        root: Union[str, Path],
        split: str,
        *,
        batch_size: int,
        train: bool,
        num_workers: Optional[int] = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        subset: Optional[int] = None,
        shuffle_buffer: int = 2048,
        pin_memory: Optional[bool] = None,
        skip_bad: bool = False,
        retries: int = RETRIES,
        cache_dir: Optional[Union[str, Path]] = None,
        cache_max_bytes: Optional[int] = None,
) -> ShardLoader:
    """A loader of uint8 (B,3,64,64) / int64 (B,) batches over `split` of a tinycnn-prepare folder or URL.

    root: a folder, or a URL of one (`tinycnn.storage.is_url`: http(s)://, s3://, gs://, pipe:...); shards are streamed.
    train: shuffled, endless per worker, exactly len(loader) full batches per rank and epoch.
    Otherwise every sample of the split (or subset) exactly once across all workers and ranks.
    subset: only the first `subset` samples of the split (deterministic).
    num_workers: decoding processes (default: `default_num_workers()`).
    pin_memory: default: pinned when tinycnn.transfer.DevicePrefetcher copies to CUDA (else when CUDA is available);
    never for MPS (unified memory: torch's DataLoader does not pin for it) or the CPU.
    retries: tries again after transient network errors (connection, timeout, HTTP 5xx), with backoff.
    cache_dir: with a URL root (pipe: commands included), keep each shard read in this folder (tinycnn.cache),
    checked against the manifest: later epochs, loaders and runs on this node read it from disk. Off by default;
    ignored for a folder root. cache_max_bytes: the bound on all shards cached there (default
    tinycnn.cache.DEFAULT_MAX_BYTES, 50 GiB; least recently used shards go first).
    """
    manifest = read_manifest(root, retries)  # checked: names are plain file names, counts whole numbers
    if split not in manifest["splits"]:
        raise SplitError(f"{root} has no split {split!r} (it has {sorted(manifest['splits'])}); "
                       f"`tinycnn-prepare --holdout 0` writes no test split")
    info = manifest["splits"][split]
    shards = [(locate(root, s["file"]), s["num_samples"]) for s in info["shards"]]
    limits = {path: shard_limits(s) for (path, _), s in zip(shards, info["shards"])}
    cache = None
    if cache_dir and is_url(root):  # the manifest is read again each time: never cached
        cache = ShardCache(cache_dir, root, {path: s for (path, _), s in zip(shards, info["shards"])},
                           max_bytes=cache_max_bytes)
        cache.check()
    missing = [p for p, _ in shards if not is_url(p) and not os.path.exists(p)]
    if missing:
        raise ShardError(f"{len(missing)} shard(s) of split {split!r} missing, e.g. {missing[0]}: {PREPARE_HINT}")
    if subset is not None and subset > info["num_samples"]:
        raise ConfigError(f"subset of {subset} samples asked from split {split!r} of {info['num_samples']}")
    shards = _subset(shards, subset)
    num_samples = sum(c for _, c in shards)
    if num_workers is None:
        num_workers = default_num_workers()
    # a worker with nothing to read would only cost a process
    num_workers = max(0, min(num_workers, math.ceil(num_samples / world_size)))
    stream = ShardStream(shards, batch_size=batch_size, train=train, rank=rank, world_size=world_size, seed=seed,
                         shuffle_buffer=shuffle_buffer, image_shape=tuple(manifest.get("input_shape", (3, 64, 64))),
                         skip_bad=skip_bad, retries=retries, shard_limits=limits, num_classes=manifest["num_classes"],
                         cache=cache)
    return ShardLoader(stream, num_samples, num_workers, pin_memory)
