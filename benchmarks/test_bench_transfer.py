"""host-to-device (CUDA only): what a batch costs to cross the bus, and whether DevicePrefetcher hides it.

- raw pinned bandwidth: one 256 MiB pinned buffer copied with copy_(non_blocking=True): the ceiling;
- one train batch (TINYCNN_BENCH_BATCH images) pageable vs pinned, uint8 vs float32, blocking vs
  non_blocking: GB/s and the fraction of the raw pinned bandwidth;
- overlap: the bf16 + channels_last train step (with GPUAugment) fed from batches already on the
  device, from DevicePrefetcher (side-stream copies), from blocking copies of pinned batches, and as a
  user would otherwise do it (pageable float32 batches augmented on the CPU, blocking copies).
"""
import pytest
import torch

from _bench import BATCH, DEVICE, ON_CUDA, make_step, optimizer_steps

pytestmark = pytest.mark.skipif(not ON_CUDA, reason="host-to-device transfers need a CUDA device "
                                                    "(torch.cuda.is_available() is False)")

GROUP = "host-to-device"
RAW_BYTES = 256 * 2 ** 20
RAW_COPIES = 10
NBUF = 8            # distinct source batches, cycled (so no copy is of a buffer just copied)
COPIES = 50         # batch copies per round
STEPS = 50          # train steps per round in the overlap benchmark
SHAPE = (BATCH, 3, 64, 64)


def test_raw_pinned_copy(bench_factory):
    bench = bench_factory(GROUP)
    g = torch.Generator().manual_seed(0)
    src = torch.randint(0, 256, (RAW_BYTES,), dtype=torch.uint8, generator=g).pin_memory()
    dst = torch.empty(RAW_BYTES, dtype=torch.uint8, device=DEVICE)

    def copy():
        for _ in range(RAW_COPIES):
            dst.copy_(src, non_blocking=True)
        return RAW_COPIES

    best = bench.run(copy, rounds=5, warmup=1)
    assert bench.result == RAW_COPIES
    assert torch.equal(dst[:1 << 20].cpu(), src[:1 << 20]) and torch.equal(dst[-1024:].cpu(), src[-1024:])
    bench.record("h2d/raw_pinned", "raw pinned copy (256 MiB buffer)", RAW_COPIES * RAW_BYTES / best / 1e9, "GB/s")


CASES = [(pinned, dtype, nb) for pinned in (False, True) for dtype in ("uint8", "float32") for nb in (False, True)]


@pytest.mark.parametrize("pinned,dtype,non_blocking", CASES,
                         ids=[f"{'pinned' if p else 'pageable'}-{d}-{'non_blocking' if nb else 'blocking'}"
                              for p, d, nb in CASES])
def test_batch_copy(bench_factory, pinned, dtype, non_blocking):
    bench = bench_factory(GROUP)
    g = torch.Generator().manual_seed(0)
    if dtype == "uint8":
        srcs = [torch.randint(0, 256, SHAPE, dtype=torch.uint8, generator=g) for _ in range(NBUF)]
    else:
        srcs = [torch.randn(SHAPE, generator=g) for _ in range(NBUF)]
    if pinned:
        srcs = [s.pin_memory() for s in srcs]

    def copies():
        out = None
        for i in range(COPIES):
            out = srcs[i % NBUF].to(DEVICE, non_blocking=non_blocking)
        return out

    best = bench.run(copies, rounds=5, warmup=1)
    out = bench.result
    assert out.device.type == DEVICE.type and out.shape == SHAPE and torch.equal(out.cpu(), srcs[(COPIES - 1) % NBUF])
    nbytes = COPIES * srcs[0].numel() * srcs[0].element_size()
    key = f"h2d/{'pinned' if pinned else 'pageable'}_{dtype}_{'non_blocking' if non_blocking else 'blocking'}"
    images_per_s = COPIES * BATCH / best
    bench.record(key, f"{'pinned' if pinned else 'pageable'} {dtype} batch, "
                      f"{'non_blocking' if non_blocking else 'blocking'}", nbytes / best / 1e9, "GB/s",
                 note=f"{images_per_s:,.0f} img/s", images_per_s=round(images_per_s))
    bench.ratio("fraction_of_raw_pinned", key, "h2d/raw_pinned", note="{:.0%} of raw pinned")


FEEDS = ["resident", "prefetcher", "blocking_pinned", "user_pageable_float32"]
FEED_LABELS = {
    "resident": "train steps, batches already on the device",
    "prefetcher": "train steps fed by DevicePrefetcher (pinned uint8)",
    "blocking_pinned": "train steps, blocking copies of pinned uint8",
    "user_pageable_float32": "train steps, pageable float32 batches (as a CPU pipeline gives them), blocking",
}


@pytest.mark.parametrize("feed", FEEDS)
def test_copy_overlap(bench_factory, feed):
    from tinycnn.augment import GPUAugment, eval_transform
    from tinycnn.transfer import DevicePrefetcher

    bench = bench_factory(GROUP)
    step, model, optimizer = make_step(channels_last=True, bf16=True)
    aug = GPUAugment(channels_last=True).to(DEVICE)   # applied eagerly, the same in every feed
    g = torch.Generator().manual_seed(0)
    host = [(torch.randint(0, 256, SHAPE, dtype=torch.uint8, generator=g),
             torch.randint(0, 200, (BATCH,), generator=g)) for _ in range(NBUF)]
    if feed == "user_pageable_float32":  # normalized float32 on the CPU, as a torchvision pipeline hands it over
        host = [(eval_transform(x), y) for x, y in host]
    else:
        host = [(x.pin_memory(), y.pin_memory()) for x, y in host]
    order = [host[i % NBUF] for i in range(STEPS)]
    on_device = [(x.to(DEVICE), y.to(DEVICE)) for x, y in host]

    prefetchers = []

    def batches():
        if feed == "resident":
            return (on_device[i % NBUF] for i in range(STEPS))
        if feed == "prefetcher":
            prefetchers.append(DevicePrefetcher(order, DEVICE))
            return iter(prefetchers[-1])
        return ((x.to(DEVICE), y.to(DEVICE)) for x, y in order)

    def run():
        n, loss = 0, None
        for x, y in batches():
            x = x if feed == "user_pageable_float32" else aug(x)
            loss = step(x, y)
            n += x.shape[0]
        return n, loss

    best = bench.run(run, rounds=3, warmup=1)
    n, loss = bench.result
    assert n == STEPS * BATCH and torch.isfinite(loss)
    assert optimizer_steps(optimizer) == STEPS * bench.calls
    note = ""
    if prefetchers and hasattr(prefetchers[-1], "ready"):  # batches whose copy had finished when asked for
        note = f"copy done when asked: {prefetchers[-1].ready / max(prefetchers[-1].served, 1):.1%} of batches"
    bench.rate(f"h2d/overlap_{feed}", FEED_LABELS[feed], n, best, note=note)
    if feed != "resident":
        bench.ratio("vs_resident", f"h2d/overlap_{feed}", "h2d/overlap_resident", note="{:.1%} of resident")
