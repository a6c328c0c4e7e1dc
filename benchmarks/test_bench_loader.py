"""loader: shards -> uint8 batches (build_loader) vs the original per-sample pipeline vs the decode ceiling.

All three read the same JPEG bytes (the sample's train split). Rates are images/s of whole epochs,
worker start-up included (both loaders start their workers every epoch).
"""
import json
import time

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_jpeg

from _bench import NCORES, ON_CUDA, REPEAT, JpegDataset, value

GROUP = "loader"
LOADER_BATCH = 256           # the recipe's default batch size
ORIGINAL_BATCH = 128         # the original project's batch size
WORKERS = sorted({0, 1, 2, NCORES})
EPOCH_ROUNDS = 2             # whole epochs per benchmark (best of them: the CPU may be shared)


class _OneThread:
    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


def test_decode_ceiling_loop(bench_factory, bench_data):
    """torchvision.io.decode_jpeg, one image per call, in a tight loop on one core (bytes already tensors)."""
    bench = bench_factory(GROUP)
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in bench_data.jpegs]

    def decode_all():
        n = 0
        for t in data:
            img = decode_jpeg(t, mode=ImageReadMode.RGB)
            n += 1
        return n, tuple(img.shape)

    with _OneThread():
        best = bench.run(decode_all, rounds=3, warmup=1)
    n, shape = bench.result
    assert n == len(bench_data.jpegs) and shape == (3, 64, 64)
    bench.rate("loader/decode_loop_1core", "decode_jpeg, one image per call, 1 core", n, best)


def test_decode_ceiling_batched(bench_factory, bench_data):
    """decode_jpeg on lists of 256 images (what ShardStream does), one core."""
    bench = bench_factory(GROUP)
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in bench_data.jpegs]
    chunks = [data[i:i + LOADER_BATCH] for i in range(0, len(data), LOADER_BATCH)]

    def decode_all():
        n = 0
        for chunk in chunks:
            imgs = decode_jpeg(chunk, mode=ImageReadMode.RGB)
            n += len(imgs)
        return n, tuple(imgs[0].shape)

    with _OneThread():
        best = bench.run(decode_all, rounds=3, warmup=1)
    n, shape = bench.result
    assert n == len(bench_data.jpegs) and shape == (3, 64, 64)
    bench.rate("loader/decode_batched_1core", "decode_jpeg on lists of 256, 1 core", n, best)
    # the ceiling: the faster of the two ways of calling the decoder, times the cores
    ceiling = max(v for v in (value("loader/decode_loop_1core"), n / best) if v is not None)
    bench.record("loader/decode_ceiling_1core", "decode ceiling, 1 core (faster of the two)", ceiling, "img/s")
    bench.record("loader/decode_ceiling_all", f"decode ceiling x {NCORES} cores", ceiling * NCORES, "img/s")


def test_original_pipeline(bench_factory, bench_data):
    """torch Dataset + PIL + torchvision.transforms in DataLoader workers (all cores), batch 128, one epoch
    of the sample's train images repeated once per 2 cores (so worker start-up stays a small part of it)."""
    bench = bench_factory(GROUP)
    repeat = max(1, min(REPEAT, NCORES // 2))
    ds = JpegDataset(bench_data.jpegs, bench_data.labels, length=len(bench_data.jpegs) * repeat)

    def epoch():
        loader = DataLoader(ds, batch_size=ORIGINAL_BATCH, shuffle=True, num_workers=NCORES, pin_memory=ON_CUDA)
        n, shape, dtype = 0, None, None
        for x, y in loader:
            n += x.shape[0]
            shape, dtype = tuple(x.shape[1:]), x.dtype
            assert y.shape[0] == x.shape[0]
        return n, shape, dtype

    best = bench.run(epoch, rounds=EPOCH_ROUNDS)
    n, shape, dtype = bench.result
    assert n == len(ds) and shape == (3, 64, 64) and dtype == torch.float32
    bench.rate("loader/original_all", f"original per-sample pipeline, {NCORES} workers", n, best,
               note="PIL + transforms, float32 out")


@pytest.mark.parametrize("workers", WORKERS, ids=[f"workers={w}" for w in WORKERS])
def test_build_loader(bench_factory, bench_data, workers):
    """build_loader(train=True): one epoch of full uint8 batches over the repeated shards."""
    from tinycnn.data import build_loader

    bench = bench_factory(GROUP)
    loader = build_loader(bench_data.root, "train", batch_size=LOADER_BATCH, train=True, num_workers=workers)
    first = []

    def epoch():
        t0 = time.perf_counter()
        n, shape, dtype = 0, None, None
        for x, y in loader:
            if not n:
                first.append(time.perf_counter() - t0)
            n += x.shape[0]
            shape, dtype = tuple(x.shape), x.dtype
            assert y.shape == (x.shape[0],) and y.dtype == torch.int64
        return n, shape, dtype

    best = bench.run(epoch, rounds=EPOCH_ROUNDS)
    n, shape, dtype = bench.result
    assert n == len(loader) * LOADER_BATCH == bench_data.num_train // LOADER_BATCH * LOADER_BATCH
    assert shape == (LOADER_BATCH, 3, 64, 64) and dtype == torch.uint8
    label = f"build_loader, {workers} worker{'s' if workers != 1 else ''}"
    label += " (all cores)" if workers == NCORES else ""
    bench.rate(f"loader/ours_w{workers}", label, n, best, note=f"first batch after {min(first):.2f} s",
               first_batch_s=round(min(first), 3))
    if workers == NCORES:
        bench.record("loader/ours_all", None, n / best, "img/s")
        bench.ratio("vs_original", "loader/ours_all", "loader/original_all")
        bench.ratio("vs_decode_ceiling", "loader/ours_all", "loader/decode_ceiling_all")
    if workers == 1:
        bench.ratio("vs_decode_ceiling_1core", "loader/ours_w1", "loader/decode_ceiling_1core")


GZIP_WORKERS = sorted({1, NCORES})


def _alternating(variants: dict, times: dict):
    """The (kind, variant) pairs, in reverse order every other round: neither kind always runs first (cold)."""
    items = list(variants.items())
    return items if len(times[items[0][0]]) % 2 == 0 else items[::-1]


@pytest.fixture(scope="module")
def gzip_root(bench_data, sample_zip):
    """The sample prepared again with `compress=True` (tinycnn-prepare --compress: <split>-NNNNN.tar.gz, the
    same samples in the same shards), train shards repeated as in bench_data; and its size / the plain size."""
    from _bench import link_or_copy
    from tinycnn.prepare import prepare

    base = bench_data.root.parent / "sample-gz"
    manifest = prepare(sample_zip, base, holdout_per_class=0, compress=True, progress=False)
    root = bench_data.root.parent / f"{bench_data.root.name}-gz"
    root.mkdir(exist_ok=True)
    train = manifest["splits"]["train"]
    shards = []
    for r in range(bench_data.repeat):
        for shard in train["shards"]:
            name = f"train-r{r:02d}-{shard['file']}"
            link_or_copy(base / shard["file"], root / name)
            shards.append({**shard, "file": name})
    splits = {"train": {**train, "num_samples": train["num_samples"] * bench_data.repeat, "shards": shards}}
    (root / "manifest.json").write_text(json.dumps({**manifest, "splits": splits}))
    size = sum((base / s["file"]).stat().st_size for s in train["shards"])
    plain = sum(p.stat().st_size for p in bench_data.base.glob("train-*.tar"))
    return root, size / plain


@pytest.mark.parametrize("workers", GZIP_WORKERS, ids=[f"workers={w}" for w in GZIP_WORKERS])
def test_build_loader_gzip(bench_factory, bench_data, gzip_root, workers):
    """build_loader(train=True) over gzip shards and over plain shards of the same samples, epochs alternating in each
    round so that both see the same load on a shared machine: the cost of decompression in img/s."""
    from tinycnn.data import build_loader

    bench = bench_factory(GROUP)
    root, size_ratio = gzip_root
    loaders = {kind: build_loader(r, "train", batch_size=LOADER_BATCH, train=True, num_workers=workers)
               for kind, r in (("plain", bench_data.root), ("gzip", root))}
    times = {"plain": [], "gzip": []}

    def epochs():
        counts = {}
        for kind, loader in _alternating(loaders, times):
            t0 = time.perf_counter()
            counts[kind] = sum(x.shape[0] for x, _ in loader)
            times[kind].append(time.perf_counter() - t0)
        return counts

    bench.run(epochs, rounds=EPOCH_ROUNDS)
    for loader in loaders.values():
        loader.close()
    assert bench.result["plain"] == bench.result["gzip"] == len(loaders["gzip"]) * LOADER_BATCH > 0
    n = bench.result["gzip"]
    s = "s" if workers != 1 else ""
    bench.rate(f"loader/plain_w{workers}", f"build_loader, plain shards, {workers} worker{s}", n, min(times["plain"]))
    bench.rate(f"loader/gzip_w{workers}", f"build_loader, gzip shards, {workers} worker{s}", n, min(times["gzip"]),
               note=f"shards {size_ratio:.0%} of the plain bytes", size_ratio=round(size_ratio, 4))
    bench.ratio("gzip_vs_plain", f"loader/gzip_w{workers}", f"loader/plain_w{workers}", note="{:.0%} of plain")

