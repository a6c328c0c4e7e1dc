"""The host -> device step: uint8 batches from a loader onto the device the model runs on.

DevicePrefetcher copies batch n+1 on a side CUDA stream while batch n computes (a pass-through elsewhere);
DeviceResidentLoader copies the decoded split once and serves later epochs from device memory.
"""
import math
import warnings
from typing import Optional, Union

import torch

from .data import ShardLoader

__all__ = ["DevicePrefetcher", "DeviceResidentLoader"]


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
