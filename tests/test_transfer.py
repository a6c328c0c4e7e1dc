"""tinycnn.transfer: DevicePrefetcher and DeviceResidentLoader over synthetic shards (CUDA paths where present).

tests/test_cuda.py holds the other CUDA checks (stream ordering under load, pinned batches on the sample).
"""
from collections import Counter

import pytest
import torch

from tinycnn.data import build_loader
from tinycnn.transfer import DevicePrefetcher, DeviceResidentLoader

from test_data import make_shards

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_prefetcher_passes_through_on_cpu(tmp_path):
    root = make_shards(tmp_path / "s", num_samples=20, num_shards=2)
    loader = build_loader(root, "train", batch_size=4, train=False, num_workers=0)
    fetched = list(DevicePrefetcher(loader, "cpu"))
    assert len(fetched) == len(loader) == 5
    assert all(x.device.type == "cpu" and x.dtype == torch.uint8 for x, _ in fetched)


def test_device_resident_serves_later_epochs_from_memory(tmp_path):
    root = make_shards(tmp_path / "s", num_samples=50, num_shards=3)
    base = build_loader(root, "train", batch_size=8, train=False, num_workers=0)
    resident = DeviceResidentLoader(base, "cpu", num_batches=50 // 8, batch_size=8, seed=0)
    first = torch.cat([y for _, y in resident])
    assert len(first) == 48 and resident.images.shape == (50, 3, 64, 64)
    (root / "train-00000.tar").unlink()  # later epochs must not touch the shards
    resident.set_epoch(1)
    second = torch.cat([y for _, y in resident])
    assert len(second) == 48
    assert Counter(resident.labels.tolist()) == Counter(i % 7 for i in range(50))


def test_device_resident_refuses_when_it_would_not_fit(tmp_path, monkeypatch):
    root = make_shards(tmp_path / "s", num_samples=20, num_shards=2)
    base = build_loader(root, "train", batch_size=4, train=False, num_workers=0)
    monkeypatch.setattr(DeviceResidentLoader, "_free_bytes", lambda self: 1000)
    with pytest.raises(MemoryError, match="streaming loader"):
        DeviceResidentLoader(base, "cpu", num_batches=5, batch_size=4)


# --- the prefetcher's logic on the CPU (a fake copier stands for the CUDA streams) ---------------------

class _FakeEvent:
    def __init__(self, done):
        self.done = done

    def query(self):
        return self.done


class _FakeCopier:
    """Logs what DevicePrefetcher asks of the CUDA streams; every other copy is still running when asked."""

    def __init__(self, log):
        self.log, self.copies = log, 0

    def copy(self, batch):
        self.log.append(("copy", int(batch[1][0])))
        self.copies += 1
        return tuple(t.clone() for t in batch), _FakeEvent(self.copies % 2 == 0)

    def hand_over(self, batch, done):
        self.log.append(("hand_over", int(batch[1][0])))


def test_prefetcher_copies_the_next_batch_before_handing_out_this_one():
    batches = [(torch.full((2, 3), k, dtype=torch.uint8), torch.full((2,), k)) for k in range(4)]
    log = []
    prefetcher = DevicePrefetcher(batches, "cpu", copier=_FakeCopier(log))
    for x, y in prefetcher:
        k = int(y[0])
        log.append(("got", k))
        assert torch.equal(x, batches[k][0])
        # the step gets batch k only after it was handed to the compute stream and batch k+1's copy was queued
        assert log[-3:] == [("hand_over", k), ("copy", k + 1), ("got", k)] if k < 3 else \
            log[-2:] == [("hand_over", k), ("got", k)]
    assert [e for e in log if e[0] == "got"] == [("got", k) for k in range(4)]
    assert (prefetcher.served, prefetcher.ready) == (4, 2)
    assert list(DevicePrefetcher([], "cpu", copier=_FakeCopier([]))) == []


def test_prefetcher_leaves_pinning_to_the_device(tmp_path):
    root = make_shards(tmp_path / "s", num_samples=20, num_shards=2)
    loaders = {d: build_loader(root, "train", batch_size=4, train=False, num_workers=0) for d in ("cpu", "cuda")}
    assert all(loader.pin_memory is None for loader in loaders.values())
    DevicePrefetcher(loaders["cpu"], "cpu")
    DevicePrefetcher(loaders["cuda"], "cuda")  # constructing it touches no CUDA
    assert loaders["cpu"].pin_memory is False and loaders["cuda"].pin_memory is True
    explicit = build_loader(root, "train", batch_size=4, train=False, num_workers=0, pin_memory=False)
    DevicePrefetcher(explicit, "cuda")
    assert explicit.pin_memory is False


def test_device_resident_draws_a_new_permutation_for_each_pass(tmp_path):
    # labels identify samples here (fewer samples than classes)
    root = make_shards(tmp_path / "s", num_samples=20, num_shards=2, num_classes=1000)
    base = build_loader(root, "train", batch_size=4, train=False, num_workers=0)
    resident = DeviceResidentLoader(base, "cpu", num_batches=10, batch_size=4, seed=0)
    first = [y.tolist() for _, y in resident]
    streamed, filled = first[:5], first[5:]  # 20 samples stream in, the rest of the epoch comes from the cache
    assert sorted(sum(streamed, [])) == list(range(20))
    assert len({tuple(b) for b in filled}) > 1  # not the same batch drawn again and again
    resident.set_epoch(1)
    second = torch.cat([y for _, y in resident]).tolist()
    assert sorted(second[:20]) == sorted(second[20:]) == list(range(20)) and second[:20] != second[20:]


# --- CUDA paths (run where CUDA is present) ---------------------------------------------------------------

@requires_cuda
def test_cuda_batches_are_pinned_with_persistent_workers(tmp_path):
    root = make_shards(tmp_path / "s", num_samples=60, num_shards=3)
    loader = build_loader(root, "train", batch_size=8, train=True, num_workers=1)
    DevicePrefetcher(loader, "cuda")
    for epoch in range(2):  # the second epoch runs on the same (persistent) workers
        loader.set_epoch(epoch)
        assert all(x.is_pinned() and y.is_pinned() for x, y in loader)
    loader.close()


@requires_cuda
def test_cuda_prefetcher_matches_the_host_batches_without_host_syncs(tmp_path):
    root = make_shards(tmp_path / "s", num_samples=60, num_shards=3)
    host = list(build_loader(root, "train", batch_size=8, train=False, num_workers=0))
    prefetcher = DevicePrefetcher(build_loader(root, "train", batch_size=8, train=False, num_workers=1), "cuda")
    list(prefetcher)  # CUDA, the workers and the pinned-memory pool start outside the checked epoch
    prefetcher.ready = prefetcher.served = 0
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = [(x.clone(), y.clone()) for x, y in prefetcher]  # clone on the compute stream: uses the copies
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(got) == len(host)
    for (x, y), (hx, hy) in zip(got, host):
        assert x.is_cuda and torch.equal(x.cpu(), hx) and torch.equal(y.cpu(), hy)
    assert prefetcher.served == len(host) and 0 <= prefetcher.ready <= prefetcher.served


@requires_cuda
def test_cuda_device_resident_epochs_without_host_syncs(tmp_path):
    root = make_shards(tmp_path / "s", num_samples=50, num_shards=3)
    base = build_loader(root, "train", batch_size=8, train=False, num_workers=0, pin_memory=True)
    resident = DeviceResidentLoader(base, "cuda", num_batches=8, batch_size=8, seed=0)
    torch.zeros(1, device="cuda").sum().item()  # CUDA starts outside the checked epochs
    torch.cuda.set_sync_debug_mode("error")
    try:
        for epoch in range(2):
            resident.set_epoch(epoch)
            labels = [y for _, y in resident]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(labels) == 8 and all(y.is_cuda and y.shape == (8,) for y in labels)
