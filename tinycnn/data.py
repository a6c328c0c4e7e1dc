"""Streaming loader: WebDataset shards -> uint8 batches -> the device.

The CPU only reads tar members and decodes JPEGs into uint8 (B, 3, 64, 64) batches; augmentation and
normalization run on the device (tinycnn.augment). uint8 crosses the bus, never float32.

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
import io
import itertools
import json
import math
import multiprocessing
import os
import random
import tarfile
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

from .tar import tar_samples

__all__ = [
    "ShardError", "read_manifest", "split_shards", "ShardStream", "ShardLoader", "build_loader",
    "DevicePrefetcher", "DeviceResidentLoader", "OVERFIT_TRAIN_SIZE", "VAL_SUBSET_SIZE",
]

OVERFIT_TRAIN_SIZE = 4096  # the course project's "overfit a small subset" check
VAL_SUBSET_SIZE = 1000

PREPARE_HINT = ("prepare the data first, e.g. `tinycnn-prepare path/to/tiny-imagenet-200.zip --out shards/tiny-imagenet` "
                "(or `tinycnn-prepare download --out shards/tiny-imagenet`)")


class ShardError(RuntimeError):
    """A missing, truncated or corrupt shard or sample."""


def read_manifest(root: Union[str, Path]) -> Dict:
    root = Path(root)
    path = root / "manifest.json"
    if not path.is_file():
        what = "does not exist" if not root.exists() else "has no manifest.json"
        raise FileNotFoundError(f"shards folder {root} {what}: {PREPARE_HINT}")
    with open(path) as f:
        return json.load(f)


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
                 image_shape=(3, 64, 64), skip_bad=False):
        self.shards, self.batch_size, self.train = list(shards), batch_size, train
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.image_shape, self.skip_bad = shuffle_buffer, tuple(image_shape), skip_bad
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
        try:
            read = 0
            for i, sample in enumerate(tar_samples(part.path)):
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
            if isinstance(e, FileNotFoundError):
                raise ShardError(f"shard {part.path} is missing: {PREPARE_HINT}") from None
            self._bad(part.path, "?", f"unreadable shard ({e})")

    def _bad(self, shard: str, key: str, why: str):
        if not self.skip_bad:
            raise ShardError(f"shard {shard}, sample {key}: {why} (re-run tinycnn-prepare with --force, "
                             f"or pass skip_bad=True to skip and count bad samples)")
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

    def __init__(self, stream: ShardStream, num_samples: int, num_workers: int, pin_memory: bool):
        self.stream, self.num_samples, self.num_workers = stream, num_samples, num_workers
        self.pin_memory = pin_memory
        self.batch_size = stream.batch_size
        self._loader: Optional[DataLoader] = None
        if stream.train:
            self.num_batches = num_samples // (stream.batch_size * stream.world_size)
            if self.num_batches == 0:
                raise ValueError(f"{num_samples} samples make no full batch of {stream.batch_size} "
                                 f"on each of {stream.world_size} processes: lower the batch size")
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
            # persistent workers: no process start-up per epoch; each epoch restarts their streams
            # (DataLoader discards batches prefetched for an epoch that stopped early)
            self._loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                                      pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0,
                                      prefetch_factor=4 if self.num_workers else None)
        it = iter(self._loader)
        return itertools.islice(it, self.num_batches) if self.stream.train else it

    def close(self):
        """Stop the worker processes (they start again on the next iteration)."""
        self._loader = None


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
) -> ShardLoader:
    """A loader of uint8 (B,3,64,64) / int64 (B,) batches over `split` of a tinycnn-prepare folder.

    train: shuffled, endless per worker, exactly len(loader) full batches per rank and epoch.
    Otherwise every sample of the split (or subset) exactly once across all workers and ranks.
    subset: only the first `subset` samples of the split (deterministic; see OVERFIT_TRAIN_SIZE).
    num_workers: decoding processes (default: the cores this process may use, up to 8).
    pin_memory: default True when CUDA is available.
    """
    root = Path(root)
    manifest = read_manifest(root)
    if split not in manifest["splits"]:
        raise KeyError(f"{root} has no split {split!r} (it has {sorted(manifest['splits'])}); "
                       f"`tinycnn-prepare --holdout 0` writes no test split")
    info = manifest["splits"][split]
    shards = [(str(root / s["file"]), int(s["num_samples"])) for s in info["shards"]]
    missing = [p for p, _ in shards if not os.path.exists(p)]
    if missing:
        raise ShardError(f"{len(missing)} shard(s) of split {split!r} missing, e.g. {missing[0]}: {PREPARE_HINT}")
    if subset is not None and subset > info["num_samples"]:
        raise ValueError(f"subset of {subset} samples asked from split {split!r} of {info['num_samples']}")
    shards = _subset(shards, subset)
    num_samples = sum(c for _, c in shards)
    if num_workers is None:
        num_workers = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    # a worker with nothing to read would only cost a process
    num_workers = max(0, min(num_workers, math.ceil(num_samples / world_size)))
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    stream = ShardStream(shards, batch_size=batch_size, train=train, rank=rank, world_size=world_size, seed=seed,
                         shuffle_buffer=shuffle_buffer, image_shape=tuple(manifest.get("input_shape", (3, 64, 64))),
                         skip_bad=skip_bad)
    return ShardLoader(stream, num_samples, num_workers, pin_memory)


class DevicePrefetcher:
    """Copies batch n+1 to the device on a side CUDA stream while batch n computes.

    On CPU and MPS it is a plain pass-through (`.to(device)`).
    """

    def __init__(self, loader, device: Union[str, torch.device]):
        self.loader, self.device = loader, torch.device(device)

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch: int):
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(epoch)

    def __iter__(self):
        if self.device.type != "cuda":
            for images, labels in self.loader:
                yield images.to(self.device), labels.to(self.device)
            return
        stream = torch.cuda.Stream(self.device)

        def copy(batch):
            with torch.cuda.stream(stream):
                return tuple(t.to(self.device, non_blocking=True) for t in batch)

        it = iter(self.loader)
        nxt = next(it, None)
        nxt = copy(nxt) if nxt is not None else None
        while nxt is not None:
            torch.cuda.current_stream(self.device).wait_stream(stream)
            batch = nxt
            for t in batch:  # the compute stream owns these now: don't let the allocator reuse them early
                t.record_stream(torch.cuda.current_stream(self.device))
            following = next(it, None)
            nxt = copy(following) if following is not None else None
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

    def _perm(self, n: int) -> torch.Tensor:
        g = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(n, generator=g).to(self.device)

    def __iter__(self):
        if self.images is None:
            yield from self._first_epoch()
            return
        n = self.images.shape[0]
        idx = self._perm(n)
        reps = math.ceil(self.num_batches * self.batch_size / n)
        if reps > 1:  # this rank holds fewer samples than its epoch needs: go round again
            idx = torch.cat([idx] + [self._perm(n) for _ in range(reps - 1)])
        for b in range(self.num_batches):
            sel = idx[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.images[sel], self.labels[sel]

    def _first_epoch(self):
        images, labels, pending, served = [], [], [], 0
        g = torch.Generator().manual_seed(self.seed)
        for x, y in DevicePrefetcher(self.loader, self.device):
            images.append(x)
            labels.append(y)
            pending.append((x, y))
            # serve full batches from what has arrived, mixing arrivals a little
            while served < self.num_batches and sum(t.shape[0] for t, _ in pending) >= self.batch_size:
                xs, ys = torch.cat([t for t, _ in pending]), torch.cat([t for _, t in pending])
                order = torch.randperm(xs.shape[0], generator=g).to(self.device)
                xs, ys = xs[order], ys[order]
                yield xs[:self.batch_size], ys[:self.batch_size]
                served += 1
                pending = [(xs[self.batch_size:], ys[self.batch_size:])]
        self.images, self.labels = torch.cat(images), torch.cat(labels)
        self.loader.close()  # its workers are not needed again
        while served < self.num_batches:  # short rank: fill from the cache
            sel = self._perm(self.images.shape[0])[:self.batch_size]
            yield self.images[sel], self.labels[sel]
            served += 1
