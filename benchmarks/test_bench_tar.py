"""tar: tinycnn.tar's reader and writer beside tarfile and webdataset, on the same real-sample shard bytes.

Reading: every sample of the sample's 64 train shards (5,000 samples, two members each), from bytes
already in memory, grouped into webdataset-style samples; plain and gzip-compressed (`--compress`).
Writing: the same 5,000 samples as 64 shard files, with tinycnn.tar.write_shard and webdataset.TarWriter.
The loader pair measures what decompression costs a whole build_loader epoch. Each ratio comes from
figures measured side by side in this run.
"""
import io
import tarfile
from collections import OrderedDict
from pathlib import Path

import pytest
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_iterator

from tinycnn.tar import iter_samples, write_shard

GROUP = "tar"
ROUNDS = 3


@pytest.fixture(scope="module")
def shard_bytes(bench_data):
    """(plain, gzip) bytes of each train shard of the prepared sample."""
    import gzip
    plain = [p.read_bytes() for p in sorted(bench_data.base.glob("train-*.tar"))]
    return plain, [gzip.compress(b, compresslevel=6, mtime=0) for b in plain]


@pytest.fixture(scope="module")
def gz_root(sample_zip, tmp_path_factory):
    """The sample prepared as bench_data.base is, with --compress."""
    from tinycnn.prepare import prepare
    root = tmp_path_factory.mktemp("bench-gz") / "sample-gz"
    prepare(sample_zip, root, holdout_per_class=0, compress=True, progress=False)
    return root


def read_ours(shards):
    return [s for data in shards for s in iter_samples(data)]


def read_tarfile(shards):
    out = []
    for data in shards:
        samples = OrderedDict()
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # mode "r:*": gzip detected
            for m in tar:
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(m).read()
        out += samples.values()
    return out


def read_webdataset(shards):
    return [s for data in shards
            for s in group_by_keys({**m, "__url__": "mem"} for m in tar_file_iterator(io.BytesIO(data)))]


READERS = {"tinycnn.tar": read_ours, "tarfile": read_tarfile, "webdataset": read_webdataset}


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("reader", list(READERS))
def test_read(bench_factory, bench_data, shard_bytes, reader, compressed):
    bench = bench_factory(GROUP)
    shards = shard_bytes[compressed]
    best = bench.run(lambda: READERS[reader](shards), rounds=ROUNDS, warmup=1)
    samples = bench.result
    assert len(samples) == len(bench_data.jpegs) and [s["jpg"] for s in samples] == bench_data.jpegs
    kind = "gzip" if compressed else "plain"
    key = f"tar/read_{reader.split('.')[-1]}_{kind}"
    bench.rate(key, f"read {kind} shards: {reader}", len(samples), best, unit="img/s",
               note=f"{sum(map(len, shards)) / 2**20:.1f} MiB")
    if reader != "tinycnn.tar":
        bench.ratio(f"tar_vs_{reader}_{kind}", f"tar/read_tar_{kind}", key,
                    note=f"tinycnn.tar: {{:.1f}}x {reader}")
    if compressed:
        bench.ratio(f"gzip_vs_plain_{reader}", key, key.replace("gzip", "plain"), note="{:.0%} of plain")


def _samples(bench_data):
    return [{"__key__": f"s{i:05d}", "cls": label, "jpg": jpg}
            for i, (jpg, label) in enumerate(zip(bench_data.jpegs, bench_data.labels))]


def _chunks(samples, n=64):
    return [samples[i * len(samples) // n:(i + 1) * len(samples) // n] for i in range(n)]


def write_ours(folder: Path, chunks, compress=False):
    return sum(write_shard(folder / f"{i:05d}.tar", chunk, compress=compress) for i, chunk in enumerate(chunks))


def write_tarwriter(folder: Path, chunks):
    for i, chunk in enumerate(chunks):
        with wds.TarWriter(str(folder / f"{i:05d}.tar")) as w:
            for sample in chunk:
                w.write(sample)
    return sum(p.stat().st_size for p in folder.glob("*.tar"))


WRITERS = {"tinycnn.tar": write_ours, "tinycnn.tar gzip": lambda f, c: write_ours(f, c, compress=True),
           "webdataset.TarWriter": write_tarwriter}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_write(bench_factory, bench_data, tmp_path, writer):
    bench = bench_factory(GROUP)
    chunks = _chunks(_samples(bench_data))
    best = bench.run(lambda: WRITERS[writer](tmp_path, chunks), rounds=ROUNDS, warmup=1)
    written = bench.result
    back = [s for p in sorted(tmp_path.glob("*.tar")) for s in iter_samples(p.read_bytes())]
    assert [s["jpg"] for s in back] == bench_data.jpegs and [int(s["cls"]) for s in back] == bench_data.labels
    key = {"tinycnn.tar": "tar/write_tar", "tinycnn.tar gzip": "tar/write_tar_gzip",
           "webdataset.TarWriter": "tar/write_tarwriter"}[writer]
    bench.rate(key, f"write 64 shards: {writer}", len(back), best, unit="img/s",
               note=f"{written / 2**20:.1f} MiB")
    if writer == "webdataset.TarWriter":
        bench.ratio("tar_vs_tarwriter", "tar/write_tar", key, note="tinycnn.tar: {:.1f}x TarWriter")
    if writer == "tinycnn.tar gzip":
        bench.ratio("gzip_vs_plain_write", key, "tar/write_tar", note="{:.0%} of plain")


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
def test_loader_epoch(bench_factory, bench_data, gz_root, compressed):
    """build_loader(train=False, num_workers=0) over the sample's 5,000 train images: the loader's whole
    cost of reading plain or compressed shards (decode included), in this process."""
    from tinycnn.data import build_loader

    bench = bench_factory(GROUP)
    root = gz_root if compressed else bench_data.base
    loader = build_loader(root, "train", batch_size=256, train=False, num_workers=0, pin_memory=False)
    best = bench.run(lambda: sum(x.shape[0] for x, _ in loader), rounds=2, warmup=1)
    assert bench.result == len(bench_data.jpegs)
    kind = "gzip" if compressed else "plain"
    bench.rate(f"tar/loader_{kind}", f"build_loader epoch, {kind} shards, 0 workers", bench.result, best)
    if compressed:
        bench.ratio("loader_gzip_vs_plain", "tar/loader_gzip", "tar/loader_plain", note="{:.0%} of plain")
