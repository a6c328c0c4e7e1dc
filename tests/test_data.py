"""tinycnn.data: the streaming loader (exact partitions, shuffling, bad samples, workers) and the fast tar reader, over
synthetic shards and the prepared sample (conftest.py); make_shards is shared with test_remote_shards.py and
test_transfer.py."""
import contextlib
import json
from collections import Counter

import pytest
import torch
import webdataset as wds
from torchvision.io import encode_jpeg

import tinycnn.data as data
from tinycnn.data import build_loader, default_num_workers, split_shards
from tinycnn.storage import ShardError, read_manifest
from tinycnn.tar import tar_samples


def make_shards(root, num_samples=103, num_shards=5, num_classes=7, corrupt=None):
    """Synthetic shards in tinycnn-prepare's format: sample i has label i % num_classes, key s<i>,
    and its index written into pixel (0, 0, 0..1) so tests can tell samples apart after decoding."""
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    per = [len(range(j, num_samples, num_shards)) for j in range(num_shards)]
    for j in range(num_shards):
        name = f"train-{j:05d}.tar"
        with wds.TarWriter(str(root / name)) as w:
            for i in range(j, num_samples, num_shards):
                img = torch.full((3, 64, 64), 128, dtype=torch.uint8)
                jpg = encode_jpeg(img, quality=95).numpy().tobytes()
                if corrupt == i:
                    jpg = jpg[: len(jpg) // 3]
                w.write({"__key__": f"s{i}", "jpg": jpg, "cls": str(i % num_classes), "wnid": f"n{i % num_classes}"})
        shards.append({"file": name, "num_samples": per[j]})
    manifest = {"format": "tinycnn-shards", "num_classes": num_classes, "input_shape": [3, 64, 64],
                "splits": {"train": {"num_samples": num_samples, "shards": shards}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.mark.parametrize("num_shards,consumers", [(5, 1), (5, 2), (5, 5), (3, 4), (2, 7), (64, 6)])
def test_split_shards_is_an_exact_partition(num_shards, consumers):
    shards = [(f"s{j}", 10 + j) for j in range(num_shards)]
    seen = Counter()
    for c in range(consumers):
        for part in split_shards(shards, c, consumers):
            seen.update((part.path, i) for i in range(part.start, part.limit, part.step))
    assert seen == Counter((f"s{j}", i) for j in range(num_shards) for i in range(10 + j))


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (1, 2), (2, 2), (3, 1), (4, 2)])
def test_eval_sees_every_sample_once(tmp_path, world_size, num_workers):
    root = make_shards(tmp_path / "s", num_samples=103, num_shards=5)
    counts = Counter()
    total_batches = 0
    for rank in range(world_size):
        loader = build_loader(root, "train", batch_size=8, train=False, num_workers=num_workers,
                              rank=rank, world_size=world_size)
        batches = list(loader)
        assert len(batches) == len(loader)
        total_batches += len(batches)
        for x, y in batches:
            assert x.dtype == torch.uint8 and x.shape[1:] == (3, 64, 64) and y.dtype == torch.int64
            counts.update(y.tolist())
    # 103 samples, labels i % 7: every sample once means exactly these label counts
    assert counts == Counter(i % 7 for i in range(103))


def test_train_batches_are_equal_per_rank_and_reshuffle(tmp_path):
    root = make_shards(tmp_path / "s", num_samples=103, num_shards=3)
    lens = []
    for rank in range(2):
        loader = build_loader(root, "train", batch_size=8, train=True, num_workers=2, rank=rank, world_size=2, seed=1)
        batches = list(loader)
        assert len(batches) == len(loader) == 103 // 16
        assert all(x.shape[0] == 8 for x, _ in batches)
        lens.append(len(batches))
    assert lens[0] == lens[1]
    loader = build_loader(root, "train", batch_size=8, train=True, num_workers=0, seed=1)
    e0 = torch.cat([y for _, y in loader])
    assert torch.equal(e0, torch.cat([y for _, y in loader]))  # same epoch, same order
    loader.set_epoch(1)
    assert not torch.equal(e0, torch.cat([y for _, y in loader]))


def test_subset_is_deterministic_and_exact(tmp_path):
    root = make_shards(tmp_path / "s", num_samples=103, num_shards=5)
    a = build_loader(root, "train", batch_size=10, train=False, subset=37, num_workers=2)
    b = build_loader(root, "train", batch_size=10, train=False, subset=37, num_workers=0)
    ya, yb = torch.cat([y for _, y in a]), torch.cat([y for _, y in b])
    assert a.num_samples == 37 and len(ya) == len(yb) == 37
    assert sorted(ya.tolist()) == sorted(yb.tolist())
    with pytest.raises(ValueError, match="subset of 500"):
        build_loader(root, "train", batch_size=10, train=False, subset=500)


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tinycnn-prepare"):
        build_loader(tmp_path / "nowhere", "train", batch_size=4, train=True)
    root = make_shards(tmp_path / "s", num_samples=20, num_shards=2)
    with pytest.raises(KeyError, match="no split 'test'"):
        build_loader(root, "test", batch_size=4, train=False)
    with pytest.raises(ValueError, match="no full batch"):
        build_loader(root, "train", batch_size=64, train=True)
    (root / "train-00001.tar").unlink()
    with pytest.raises(ShardError, match="missing.*tinycnn-prepare"):
        build_loader(root, "train", batch_size=4, train=False)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_sample_is_named_or_skipped(tmp_path, num_workers):
    root = make_shards(tmp_path / "s", num_samples=30, num_shards=3, corrupt=7)
    with pytest.raises(Exception, match=r"train-00001\.tar, sample s7"):
        list(build_loader(root, "train", batch_size=4, train=False, num_workers=num_workers))
    loader = build_loader(root, "train", batch_size=4, train=False, num_workers=num_workers, skip_bad=True)
    with pytest.warns(UserWarning, match="s7") if num_workers == 0 else contextlib.nullcontext():
        n = sum(len(y) for _, y in loader)
    assert n == 29 and loader.skipped == 1


def test_truncated_shard_is_an_error_not_a_hang(tmp_path):
    root = make_shards(tmp_path / "s", num_samples=30, num_shards=3)
    shard = root / "train-00002.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(Exception, match="train-00002.tar"):
        list(build_loader(root, "train", batch_size=4, train=False, num_workers=2))


# --- on the prepared sample ---------------------------------------------------------------------------

def test_real_test_split_once_with_two_workers(sample_shards):
    manifest = read_manifest(sample_shards)
    loader = build_loader(sample_shards, "test", batch_size=64, train=False, num_workers=2)
    ys = []
    for x, y in loader:
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 64, 64)
        ys.append(y)
    ys = torch.cat(ys)
    assert len(ys) == manifest["splits"]["test"]["num_samples"] == 500
    assert torch.bincount(ys).tolist() == manifest["splits"]["test"]["class_counts"]


def test_real_eval_equal_across_process_counts(sample_shards):
    """The 2-rank split (ranks are plain arguments; the process boundary is tested by test_train's 2-process
    run) together yields exactly the 1-rank multiset of images."""
    def image_means(rank, world):
        loader = build_loader(sample_shards, "val", batch_size=50, train=False, num_workers=2, rank=rank,
                              world_size=world)
        means = [f"{v:.4f}" for x, _ in loader for v in x.float().mean(dim=(1, 2, 3)).tolist()]
        loader.close()
        return means
    one = image_means(0, 1)
    two = image_means(0, 2) + image_means(1, 2)
    assert len(one) == 500 and sorted(one) == sorted(two)


def _wds_samples(path):
    from webdataset.tariterators import group_by_keys, tar_file_iterator
    with open(path, "rb") as f:
        return [{k: v for k, v in s.items() if k != "__url__"}
                for s in group_by_keys({**m, "__url__": path} for m in tar_file_iterator(f))]


def test_fast_tar_reader_matches_webdataset(tmp_path):
    root = make_shards(tmp_path / "s", num_samples=20, num_shards=2)
    shard = str(root / "train-00000.tar")
    assert list(tar_samples(shard)) == _wds_samples(shard)
    # a member name too long for a plain header (pax/GNU extension): handed to webdataset's reader
    long_tar = str(tmp_path / "long.tar")
    with wds.TarWriter(long_tar) as w:
        w.write({"__key__": "k" * 150, "cls": "1", "jpg": b"x"})
        w.write({"__key__": "short", "cls": "2", "jpg": b"y"})
    got = list(tar_samples(long_tar))
    assert got == _wds_samples(long_tar) and [s["__key__"] for s in got] == ["k" * 150, "short"]
    # a member kind the fast reader does not walk (a symlink): webdataset's reader takes over
    import io
    import tarfile
    odd = str(tmp_path / "odd.tar")
    with tarfile.open(odd, "w", format=tarfile.GNU_FORMAT) as t:
        for name, data in (("a.cls", b"1"), ("a.jpg", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("b.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "a.jpg"
        t.addfile(link)
    assert list(tar_samples(odd))[0] == {"__key__": "a", "cls": b"1", "jpg": b"x"}


def test_fast_tar_reader_reports_damage(tmp_path):
    root = make_shards(tmp_path / "s", num_samples=20, num_shards=1)
    shard = root / "train-00000.tar"
    data = bytearray(shard.read_bytes())
    data[1024 * 3 + 148] ^= 0x01  # corrupt a header checksum further in
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    with pytest.raises(Exception, match="checksum|truncated"):
        list(tar_samples(str(bad)))


def test_fast_tar_reader_on_real_shards(sample_shards):
    for shard in sorted(sample_shards.glob("*.tar"))[:5]:
        assert list(tar_samples(str(shard))) == _wds_samples(str(shard))


def test_persistent_workers_follow_set_epoch_and_early_stops(tmp_path):
    root = make_shards(tmp_path / "s", num_samples=103, num_shards=4)
    loader = build_loader(root, "train", batch_size=8, train=True, num_workers=2, seed=3)
    reference = build_loader(root, "train", batch_size=8, train=True, num_workers=2, seed=3)
    e0 = torch.cat([y for _, y in loader])
    first = loader._loader
    loader.set_epoch(1)
    e1 = torch.cat([y for _, y in loader])
    assert loader._loader is first  # the same worker processes served both epochs
    assert not torch.equal(e0, e1)
    # a fresh loader told epoch 1 up front gives what the persistent workers gave
    reference.set_epoch(1)
    assert torch.equal(e1, torch.cat([y for _, y in reference]))
    # an epoch abandoned after one batch leaves nothing behind for the next one
    loader.set_epoch(0)
    next(iter(loader))
    assert torch.equal(e0, torch.cat([y for _, y in loader]))


def test_pil_decoding_when_torchvision_has_no_jpeg_decoder(tmp_path, monkeypatch):
    import tinycnn.data as data
    root = make_shards(tmp_path / "s", num_samples=20, num_shards=2, corrupt=3)
    with pytest.warns(UserWarning, match="s3"):
        expected = [x for x, _ in build_loader(root, "train", batch_size=8, train=False, num_workers=0, skip_bad=True)]
    monkeypatch.setattr(data, "decode_jpeg", None)
    loader = build_loader(root, "train", batch_size=8, train=False, num_workers=0, skip_bad=True)
    with pytest.warns(UserWarning, match="s3"):
        got = [x for x, _ in loader]
    assert loader.skipped == 1 and sum(len(x) for x in got) == 19
    # libjpeg through PIL or torchvision: the same decoder, within rounding of the IDCT
    for a, b in zip(expected, got):
        assert a.shape == b.shape and (a.int() - b.int()).abs().max() <= 2


# --- errors from workers, stopping workers, defaults ----------------------------------------------------

@pytest.mark.parametrize("num_workers", [0, 1])
def test_bad_shard_error_is_one_line_with_the_command_line_fix(tmp_path, num_workers):
    root = make_shards(tmp_path / "s", num_samples=30, num_shards=3, corrupt=7)
    loader = build_loader(root, "train", batch_size=4, train=False, num_workers=num_workers)
    with pytest.raises(ShardError) as caught:
        list(loader)
    msg = str(caught.value)
    assert type(caught.value) is ShardError  # not torch's wrapper around the worker's traceback
    assert "\n" not in msg and "worker" not in msg and "Traceback" not in msg
    assert "train-00001.tar, sample s7" in msg
    assert "data.skip_bad=true" in msg and "skip_bad=True" in msg
    loader.close()


def test_close_stops_persistent_workers(tmp_path):
    root = make_shards(tmp_path / "s", num_samples=103, num_shards=4)
    loader = build_loader(root, "train", batch_size=8, train=True, num_workers=2)
    abandoned = iter(loader)  # an epoch stopped early: the caller still holds its iterator
    next(abandoned)
    workers = list(loader._loader._iterator._workers)
    assert len(workers) == 2 and all(w.is_alive() for w in workers)
    loader.close()
    assert not any(w.is_alive() for w in workers)
    assert len(list(loader)) == len(loader)  # and start again on the next epoch
    loader.close()


@pytest.mark.parametrize("cores,local,expected",
                         [(16, 1, 15), (16, 8, 1), (64, 4, 15), (2, 1, 1), (1, 1, 1), (4, 8, 1)])
def test_default_num_workers_leaves_a_core_per_process(monkeypatch, cores, local, expected):
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
    assert default_num_workers() == expected


