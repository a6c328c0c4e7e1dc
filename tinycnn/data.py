"""Streaming loader: WebDataset shards -> uint8 batches -> the device.

The CPU only reads tar members and decodes JPEGs into uint8 (B, 3, 64, 64) batches; augmentation and
normalization run on the device (tinycnn.augment). uint8 crosses the bus, never float32.

Where shards come from. `root` is a tinycnn-prepare folder or a URL of one (see `is_url`): http(s)://
through urllib, `pipe:` commands through webdataset's gopen, anything else (s3://, gs://, ...) through
fsspec and its backends (s3fs, gcsfs). The manifest is ROOT/manifest.json and each shard ROOT/<file>
(or ROOT with `{}` replaced by the file name). Transient network errors are retried with exponential
backoff; a shard that still cannot be read is a ShardError naming its URL.

How samples are split. Every (rank, worker) pair is one *consumer*. With at least as many shards as
consumers, consumer c reads the shards j with j % C == c; with fewer, consumers share a shard and
each keeps every m-th sample of it. Both are exact partitions of the split, so:
  - evaluation (train=False) sees every sample exactly once across all workers and processes, with
    no padding duplicates and no drops: sum metrics over ranks and they equal a 1-process run;
  - training (train=True) streams each consumer's part in a loop (reshuffled each pass) and every
    rank stops after the same `len(loader)` batches, so DDP never waits on an empty rank.
The shard-to-consumer assignment is reshuffled every epoch (`set_epoch`), so ranks see different
data from epoch to epoch.

Do not pass these loaders through `accelerator.prepare`: accelerate's default for iterable datasets
(`dispatch_batches=True`) makes rank 0 read and decode everything; here each rank reads its own shards.
"""
import http.client
import io
import itertools
import json
import math
import multiprocessing
import os
import random
import re
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
try:  # torchvision 0.29 deprecates its image io in favour of torchcodec; PIL when it is gone
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:
    decode_jpeg = None

from .tar import iter_samples

__all__ = [
    "ShardError", "is_url", "read_manifest", "read_shard", "split_shards", "ShardStream", "ShardLoader",
    "build_loader", "default_num_workers", "DevicePrefetcher", "DeviceResidentLoader",
]

PREPARE_HINT = ("prepare the data first, e.g. `tinycnn-prepare path/to/tiny-imagenet-200.zip --out shards/tiny-imagenet` "
                "(or `tinycnn-prepare download --out shards/tiny-imagenet`)")
SKIP_HINT = ("re-run tinycnn-prepare with --force, or skip and count bad samples with data.skip_bad=true "
             "on the recipes' command line (skip_bad=True in Python)")

RETRIES = 5          # tries after the first one, on transient errors only
RETRY_WAIT = 0.5     # seconds before the first retry, doubling each time up to 30 s (5 tries: 15.5 s at most)
URL_TIMEOUT = 60     # seconds without a byte before an http(s) read counts as a (transient) failure


class ShardError(RuntimeError):
    """A missing, truncated or corrupt shard or sample, or a shard URL that cannot be read."""


def is_url(root: Union[str, Path]) -> bool:
    """True when `root` is read over the network or through a command: scheme://... or pipe:..."""
    return isinstance(root, str) and (root.startswith("pipe:") or re.match(r"[a-zA-Z][\w+.-]+://", root) is not None)


def _locate(root: Union[str, Path], file: str) -> str:
    """Where `file` of a shards folder or URL is (`{}` in a URL stands for the file name)."""
    if not is_url(root):
        return str(Path(root) / file)
    if "{}" in root:
        return root.replace("{}", file)
    return root.rstrip("/") + "/" + file


def _open_once(url: str) -> bytes:
    scheme = url.split(":", 1)[0]
    if scheme in ("http", "https"):
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT) as response:
            return response.read()
    if scheme == "pipe":  # webdataset's convention; run here rather than by its gopen to report the command's stderr
        done = subprocess.run(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if done.returncode:
            raise _CommandError(done.returncode, url, done.stderr.decode(errors="replace"))
        return done.stdout
    import fsspec  # s3://, gs://, hf://...: fsspec's backends (s3fs, gcsfs, ...), installed by the user
    with fsspec.open(url, "rb") as f:
        return f.read()


class _CommandError(OSError):
    """A pipe: command that exited with an error."""

    def __init__(self, status: int, url: str, stderr: str):
        last = stderr.strip().splitlines()[-1] if stderr.strip() else "no output on stderr"
        super().__init__(f"`{url[len('pipe:'):]}` exited with status {status}: {last}")
        self.status = status


def _is_transient(error: Exception) -> bool:
    """Worth another try: connection errors, timeouts, 5xx/429, failed commands; not 404, 403, a bad URL or a
    command that does not exist."""
    if isinstance(error, urllib.error.HTTPError):
        return error.code >= 500 or error.code in (408, 429)
    if isinstance(error, _CommandError):
        return error.status not in (126, 127)  # the shell's "not executable" / "not found"
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    return isinstance(error, (OSError, http.client.HTTPException, TimeoutError))


def _is_missing(error: Exception) -> bool:
    if isinstance(error, urllib.error.HTTPError):
        return error.code in (404, 410)
    return isinstance(error, FileNotFoundError)


def _read_url(url: str, retries: int = RETRIES) -> bytes:
    """The bytes at `url`, retried with exponential backoff (and jitter, for many ranks) on transient errors."""
    for attempt in itertools.count():
        try:
            return _open_once(url)
        except Exception as e:
            if attempt >= retries or not _is_transient(e):
                e.tries = attempt + 1  # for the message
                raise
            time.sleep(min(RETRY_WAIT * 2 ** attempt, 30) * random.uniform(0.5, 1.0))


def _why(error: Exception) -> str:
    """One line: what went wrong reading a URL."""
    if isinstance(error, urllib.error.HTTPError):
        what = f"HTTP {error.code} {error.reason}"
    elif isinstance(error, urllib.error.URLError):
        what = f"{error.reason}"
    else:
        what = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    tries = getattr(error, "tries", 1)
    return f"{what} (after {tries} tries)" if tries > 1 else what


def read_manifest(root: Union[str, Path], retries: int = RETRIES) -> Dict:
    """The manifest.json of a tinycnn-prepare folder or URL."""
    if is_url(root):
        url = _locate(root, "manifest.json")
        try:
            text = _read_url(url, retries)
        except Exception as e:
            if _is_missing(e):
                raise FileNotFoundError(f"no manifest at {url} ({_why(e)}): check the URL; it must point at a "
                                        "tinycnn-prepare output folder served as is") from None
            raise ShardError(f"cannot read {url}: {_why(e)}") from None
        try:
            return json.loads(text)
        except ValueError:
            raise ValueError(f"{url} is not a tinycnn manifest (not JSON): check the URL") from None
    root = Path(root)
    path = root / "manifest.json"
    if not path.is_file() and re.match(r"[a-zA-Z][\w+.-]+:/[^/]", str(root)):
        raise FileNotFoundError(f"{root} looks like a URL made into a Path (one slash after the scheme): "
                                "pass URLs as strings")
    if not path.is_file():
        what = "does not exist" if not root.exists() else "has no manifest.json"
        raise FileNotFoundError(f"shards folder {root} {what}: {PREPARE_HINT}")
    with open(path) as f:
        return json.load(f)


def read_shard(location: str, retries: int = RETRIES) -> bytes:
    """The bytes of one shard file or URL; ShardError naming it when it is missing or cannot be read."""
    if not is_url(location):
        try:
            with open(location, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise ShardError(f"shard {location} is missing: {PREPARE_HINT}") from None
        except OSError as e:
            raise ShardError(f"cannot read shard {location}: {e}") from None
    try:
        return _read_url(location, retries)
    except Exception as e:
        if _is_missing(e):
            raise ShardError(f"shard {location} is missing ({_why(e)}): check that the whole shards folder "
                             "is served at that URL") from None
        raise ShardError(f"cannot read shard {location}: {_why(e)}") from None


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



class ShardStream(IterableDataset):
    """Yields (uint8 images (B,3,H,W), int64 labels (B,)) batches of this worker's part of a split.

    train: loop over the part forever, shuffled (shard order + a shuffle buffer), full batches only.
    Otherwise: one pass in shard order, the last batch may be short.
    """

    def __init__(self, shards, *, batch_size, train, rank=0, world_size=1, seed=0, shuffle_buffer=2048,
                 image_shape=(3, 64, 64), skip_bad=False, retries=RETRIES):
        self.shards, self.batch_size, self.train = list(shards), batch_size, train
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.image_shape, self.skip_bad = shuffle_buffer, tuple(image_shape), skip_bad
        self.retries = retries
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
        data = read_shard(part.path, self.retries)  # missing or unreachable: a ShardError, even with skip_bad
        try:
            read = 0
            for i, sample in enumerate(iter_samples(data, part.path)):
                if i >= part.limit:
                    break
                read = i + 1
                if i < part.start or (i - part.start) % part.step:
                    continue
                key = sample["__key__"]
                if "jpg" not in sample or "cls" not in sample:
                    self._bad(part.path, key, f"missing members (has {sorted(k for k in sample if not k.startswith('__'))})")
                    continue
                yield part.path, key, sample["jpg"], int(sample["cls"])
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
                raise ValueError(f"{num_samples} samples make no full batch of {stream.batch_size} "
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
            self._loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                                      pin_memory=pin, persistent_workers=self.num_workers > 0,
                                      prefetch_factor=4 if self.num_workers else None)
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

    def close(self):
        """Stop the worker processes now (they start again on the next iteration)."""
        if self._loader is not None and self._loader._iterator is not None:
            # torch stops persistent workers only when its iterator is garbage, which an iterator still
            # held anywhere (an abandoned epoch) prevents
            self._loader._iterator._shutdown_workers()
        self._loader = None


def default_num_workers() -> int:
    """Decoding processes per rank: the cores this process may use, one left for each process's main thread
    (the train step, the pin-memory thread), shared among the processes of this host (LOCAL_WORLD_SIZE, set by
    torchrun and accelerate). Decoding scales with cores up to the GPU's appetite, so no fixed cap: a 16-core
    host with one GPU decodes with 15 workers."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(1, (cores - local) // local)


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
) -> ShardLoader:
    """A loader of uint8 (B,3,64,64) / int64 (B,) batches over `split` of a tinycnn-prepare folder or URL.

    root: a folder, or a URL of one (`is_url`: http(s)://, s3://, gs://, pipe:...); shards are streamed.
    train: shuffled, endless per worker, exactly len(loader) full batches per rank and epoch.
    Otherwise every sample of the split (or subset) exactly once across all workers and ranks.
    subset: only the first `subset` samples of the split (deterministic).
    num_workers: decoding processes (default: `default_num_workers()`).
    pin_memory: default: pinned when DevicePrefetcher copies to CUDA (else when CUDA is available).
    retries: tries again after transient network errors (connection, timeout, HTTP 5xx), with backoff.
    """
    manifest = read_manifest(root, retries)
    if split not in manifest["splits"]:
        raise KeyError(f"{root} has no split {split!r} (it has {sorted(manifest['splits'])}); "
                       f"`tinycnn-prepare --holdout 0` writes no test split")
    info = manifest["splits"][split]
    shards = [(_locate(root, s["file"]), int(s["num_samples"])) for s in info["shards"]]
    missing = [p for p, _ in shards if not is_url(p) and not os.path.exists(p)]
    if missing:
        raise ShardError(f"{len(missing)} shard(s) of split {split!r} missing, e.g. {missing[0]}: {PREPARE_HINT}")
    if subset is not None and subset > info["num_samples"]:
        raise ValueError(f"subset of {subset} samples asked from split {split!r} of {info['num_samples']}")
    shards = _subset(shards, subset)
    num_samples = sum(c for _, c in shards)
    if num_workers is None:
        num_workers = default_num_workers()
    # a worker with nothing to read would only cost a process
    num_workers = max(0, min(num_workers, math.ceil(num_samples / world_size)))
    stream = ShardStream(shards, batch_size=batch_size, train=train, rank=rank, world_size=world_size, seed=seed,
                         shuffle_buffer=shuffle_buffer, image_shape=tuple(manifest.get("input_shape", (3, 64, 64))),
                         skip_bad=skip_bad, retries=retries)
    return ShardLoader(stream, num_samples, num_workers, pin_memory)


class _CudaCopier:
    """DevicePrefetcher's CUDA calls: copies on a side stream, handed over to the compute stream.

    (Tests give DevicePrefetcher a fake with the same two methods to check its logic on the CPU.)
    """

    def __init__(self, device: torch.device):
        self.device, self.side = device, torch.cuda.Stream(device)
        self.checked_pinned = False

    def copy(self, batch):
        """Queue the copies of `batch` on the side stream: (device tensors, an event marking their end)."""
        if not self.checked_pinned:
            self.checked_pinned = True
            if not all(t.is_pinned() for t in batch):
                warnings.warn("DevicePrefetcher got batches in pageable memory: each copy blocks the host; "
                              "build the loader with pin_memory=True")
        with torch.cuda.stream(self.side):
            out = tuple(t.to(self.device, non_blocking=True) for t in batch)
            done = torch.cuda.Event()
            done.record(self.side)
        return out, done

    def hand_over(self, batch, done):
        """The compute stream waits for the copy; the allocator learns it uses the memory (no early reuse)."""
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(done)
        for t in batch:
            t.record_stream(compute)


class DevicePrefetcher:
    """Copies batch n+1 to the device on a side CUDA stream while batch n computes.

    On other devices it is a plain pass-through (`.to(device)`). Pins the loader's batches for CUDA when the
    loader left `pin_memory` undecided (build_loader's default).

    `ready` of `served` batches had finished copying when the consumer asked for them: an event query, no host
    sync. ready / served near 1 means the copies are hidden. It is a lower bound: a consumer running ahead of the
    GPU asks before the GPU needs the batch.
    """

    def __init__(self, loader, device: Union[str, torch.device], *, copier=None):
        self.loader, self.device = loader, torch.device(device)
        if getattr(loader, "pin_memory", False) is None:
            loader.pin_memory = self.device.type == "cuda"
        self.copier = copier
        self.ready = self.served = 0

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch: int):
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(epoch)

    def __iter__(self):
        copier = self.copier or (_CudaCopier(self.device) if self.device.type == "cuda" else None)
        if copier is None:
            for images, labels in self.loader:
                self.served += 1
                self.ready += 1
                yield images.to(self.device), labels.to(self.device)
            return
        it = iter(self.loader)
        nxt = next(it, None)
        pending = copier.copy(nxt) if nxt is not None else None
        while pending is not None:
            batch, done = pending
            self.served += 1
            self.ready += bool(done.query())
            copier.hand_over(batch, done)
            nxt = next(it, None)
            pending = copier.copy(nxt) if nxt is not None else None  # batch n+1 copies while n computes
            yield batch


class DeviceResidentLoader:
    """Streams the first epoch from `loader`, keeps the decoded uint8 batches on the device, serves later
    epochs from there, reshuffled on the device. Each rank keeps its own part of the split.

    `loader` must be an exactly-once loader (build_loader(..., train=False)) so the cache holds every sample of
    this rank once; epochs are `num_batches` full batches (the same on every rank).
    """

    def __init__(self, loader: ShardLoader, device: Union[str, torch.device], *, num_batches: int, batch_size: int,
                 seed: int = 0, headroom: float = 0.5):
        self.loader, self.device = loader, torch.device(device)
        self.num_batches, self.batch_size, self.seed = num_batches, batch_size, seed
        self.epoch = 0
        self.images: Optional[torch.Tensor] = None
        self.labels: Optional[torch.Tensor] = None
        need = loader.num_samples * math.prod(loader.stream.image_shape) // loader.stream.world_size
        free = self._free_bytes()
        if free is not None and need > headroom * free:
            raise MemoryError(f"device-resident data needs {need / 2**30:.2f} GiB on {self.device}, "
                              f"but only {free / 2**30:.2f} GiB are free (at most {headroom:.0%} of it is used "
                              f"for data): use the streaming loader (data.device_resident: false)")

    def _free_bytes(self) -> Optional[int]:
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[0]
        if self.device.type == "mps":
            return torch.mps.recommended_max_memory() - torch.mps.current_allocated_memory()
        return None

    def __len__(self):
        return self.num_batches

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def _generator(self, seed: int) -> torch.Generator:
        # permutations drawn where they are used: a CPU randperm would cost a blocking copy per use
        return torch.Generator(device=self.device).manual_seed(seed)

    def __iter__(self):
        if self.images is None:
            yield from self._first_epoch()
            return
        n = self.images.shape[0]
        g = self._generator(self.seed * 1_000_003 + self.epoch)
        reps = math.ceil(self.num_batches * self.batch_size / n)  # > 1: this rank holds fewer samples than an epoch
        idx = torch.cat([torch.randperm(n, generator=g, device=self.device) for _ in range(reps)])
        for b in range(self.num_batches):
            sel = idx[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.images[sel], self.labels[sel]

    def _first_epoch(self):
        images, labels, pending, served = [], [], [], 0
        g = self._generator(self.seed)
        for x, y in DevicePrefetcher(self.loader, self.device):
            images.append(x)
            labels.append(y)
            pending.append((x, y))
            # serve full batches from what has arrived, mixing arrivals a little
            while served < self.num_batches and sum(t.shape[0] for t, _ in pending) >= self.batch_size:
                xs, ys = torch.cat([t for t, _ in pending]), torch.cat([t for _, t in pending])
                order = torch.randperm(xs.shape[0], generator=g, device=self.device)
                xs, ys = xs[order], ys[order]
                yield xs[:self.batch_size], ys[:self.batch_size]
                served += 1
                pending = [(xs[self.batch_size:], ys[self.batch_size:])]
        self.images, self.labels = torch.cat(images), torch.cat(labels)
        self.loader.close()  # its workers are not needed again
        while served < self.num_batches:  # short rank: fill from the cache
            sel = torch.randperm(self.images.shape[0], generator=g, device=self.device)[:self.batch_size]
            yield self.images[sel], self.labels[sel]
            served += 1
