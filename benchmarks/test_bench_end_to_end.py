"""end to end: an epoch over real shards through loader, prefetch, augmentation and train step,
as a fraction of the same train step (tinycnn.step.TrainStep with GPUAugment) on a uint8 batch already on
the device (1.0 = data is free).

- step alone: TrainStep on a normalized float batch already on the device (no augmentation);
- synthetic: TrainStep with GPUAugment on one uint8 batch already on the device: the ceiling for the
  epochs below (step alone -> synthetic is the augmentation's cost, synthetic -> streaming the data's);
- streaming: build_loader(train=True, default workers) -> DevicePrefetcher -> TrainStep with GPUAugment,
  one warm epoch (after a first epoch that starts the persistent workers and fills the shuffle buffer),
  as tinycnn.train runs it; the note gives the cold first epoch and, when the prefetcher counts them, the
  share of batches whose copy had finished when the step asked for them;
- original: what a user would otherwise do: the original per-sample pipeline (PIL + torchvision.transforms in
  DataLoader workers, the library's default worker count) -> float32 batches -> the device -> step;
- device-resident: DeviceResidentLoader; its first epoch streams and fills the cache (reported in the
  note), the figure is a later epoch served from the device.

On CUDA: the default model, bf16 autocast, channels_last, eager model (GPUAugment.apply compiled, the
library's default there), TINYCNN_BENCH_BATCH images per step, one epoch = all repeated train shards. On
CPU, to finish quickly: a small model (stage_channels 16/32/64), fp32, batch 64 and epochs of 384
images (batch 16, 64 images with TINYCNN_BENCH_QUICK=1); the loader workers then share the CPU with the train step, so the CPU ratios say little about a
GPU run.
"""
import time

import pytest
import torch

from _bench import BATCH, DEVICE, NCORES, ON_CUDA, QUICK, JpegDataset, make_step, optimizer_steps, real_uint8_batch, synthetic_batch

GROUP = "end-to-end"
if ON_CUDA:
    MODEL = {}
    E2E_BATCH, SUBSET, BF16, CL = BATCH, None, True, True
    SYNTH_STEPS, ROUNDS, RESIDENT_ROUNDS = 50, 3, 3
else:
    MODEL = {"stage_channels": [16, 32, 64]}
    E2E_BATCH, SUBSET, BF16, CL = (16, 64, False, False) if QUICK else (64, 384, False, False)
    SYNTH_STEPS, ROUNDS, RESIDENT_ROUNDS = 6, 2, 1  # 6 steps = as many images as one CPU epoch
SETUP = (f"{'default model' if not MODEL else 'small model 16/32/64'}, {'bf16' if BF16 else 'fp32'}"
         f"{', channels_last' if CL else ''}, batch {E2E_BATCH}")


def _step(augment=True):
    return make_step(channels_last=CL, bf16=BF16, augment=augment, **MODEL)


def _train_loader(bench_data):
    from tinycnn.data import build_loader
    return build_loader(bench_data.root, "train", batch_size=E2E_BATCH, train=True, subset=SUBSET)


def _epoch(batches, step):
    n, loss = 0, None
    for images, labels in batches:
        assert images.dtype == torch.uint8 and images.device.type == DEVICE.type
        loss = step(images, labels)
        n += images.shape[0]
    return n, loss


def _repeat(step, x, y):
    def run():
        loss = None
        for _ in range(SYNTH_STEPS):
            loss = step(x, y)
        return loss
    return run


def test_step_alone(bench_factory):
    bench = bench_factory(GROUP)
    step, model, optimizer = _step(augment=False)
    best = bench.run(_repeat(step, *synthetic_batch(E2E_BATCH, channels_last=CL)), rounds=ROUNDS, warmup=1)
    assert torch.isfinite(bench.result) and optimizer_steps(optimizer) == SYNTH_STEPS * bench.calls
    bench.rate("e2e/step_alone", f"train step alone, normalized float batch on the device ({SETUP})",
               SYNTH_STEPS * E2E_BATCH, best)


def test_synthetic(bench_factory, bench_data):
    bench = bench_factory(GROUP)
    step, model, optimizer = _step()
    x = real_uint8_batch(bench_data.jpegs, E2E_BATCH)
    y = torch.randint(0, 200, (E2E_BATCH,), device=DEVICE)
    best = bench.run(_repeat(step, x, y), rounds=ROUNDS, warmup=1)
    assert torch.isfinite(bench.result) and optimizer_steps(optimizer) == SYNTH_STEPS * bench.calls
    bench.rate("e2e/synthetic", f"train step + GPUAugment, uint8 batch on the device ({SETUP})",
               SYNTH_STEPS * E2E_BATCH, best)
    bench.ratio("vs_step_alone", "e2e/synthetic", "e2e/step_alone", note="{:.1%} of the step alone")


def test_original_pipeline(bench_factory, bench_data):
    from torch.utils.data import DataLoader

    bench = bench_factory(GROUP)
    step, model, optimizer = _step(augment=False)    # this pipeline augments on the CPU
    num = SUBSET or bench_data.num_train
    ds = JpegDataset(bench_data.jpegs, bench_data.labels, length=num)
    workers = min(8, NCORES)  # build_loader's default
    loader = DataLoader(ds, batch_size=E2E_BATCH, shuffle=True, drop_last=True, num_workers=workers,
                        pin_memory=ON_CUDA)

    def run():
        n, loss = 0, None
        for x, y in loader:
            x, y = x.to(DEVICE, non_blocking=True), y.to(DEVICE, non_blocking=True)
            if CL:
                x = x.contiguous(memory_format=torch.channels_last)
            loss = step(x, y)
            n += x.shape[0]
        return n, loss

    best = bench.run(run, rounds=1)
    n, loss = bench.result
    assert n == num // E2E_BATCH * E2E_BATCH and torch.isfinite(loss)
    assert optimizer_steps(optimizer) == num // E2E_BATCH * bench.calls
    bench.rate("e2e/original", f"original per-sample pipeline epoch, {workers} workers ({SETUP})", n, best)
    bench.ratio("vs_synthetic", "e2e/original", "e2e/synthetic", note="{:.1%} of synthetic")


# the default worker count, and on a many-core GPU host also 8 workers (does decoding limit the epoch?)
WORKERS = [None] + ([8] if ON_CUDA and NCORES > 9 else [])


@pytest.mark.parametrize("workers", WORKERS, ids=lambda w: "default_workers" if w is None else f"{w}_workers")
def test_streaming(bench_factory, bench_data, workers):
    from tinycnn.data import build_loader
    from tinycnn.transfer import DevicePrefetcher

    bench = bench_factory(GROUP)
    step, model, optimizer = _step()
    loader = build_loader(bench_data.root, "train", batch_size=E2E_BATCH, train=True, subset=SUBSET,
                          num_workers=workers)
    batches = DevicePrefetcher(loader, DEVICE)
    epochs = iter(range(10 ** 6))
    cold = []

    def run():
        batches.set_epoch(next(epochs))
        t0 = time.perf_counter()
        out = _epoch(batches, step)
        if len(cold) == 0:
            if ON_CUDA:
                torch.cuda.synchronize()
            cold.append(time.perf_counter() - t0)
        return out

    best = bench.run(run, rounds=1, warmup=1)   # the warm-up round is the cold first epoch
    n, loss = bench.result
    assert n == len(loader) * E2E_BATCH and torch.isfinite(loss)
    assert optimizer_steps(optimizer) == len(loader) * bench.calls
    note = f"cold first epoch: {n / cold[0]:,.0f} img/s" if bench.calls > 1 else "one cold epoch (--benchmark-disable)"
    if hasattr(batches, "ready"):  # DevicePrefetcher's count of batches already copied when asked for
        note += f"; copy done when asked: {batches.ready / max(batches.served, 1):.1%} of batches"
    key = "e2e/streaming" if workers is None else f"e2e/streaming_{workers}w"
    bench.rate(key, f"streaming epoch (warm), {loader.num_workers} workers ({SETUP})", n, best,
               note=note, workers=loader.num_workers)
    bench.ratio("vs_synthetic", key, "e2e/synthetic", note="{:.1%} of synthetic")


def test_device_resident(bench_factory, bench_data):
    from tinycnn.data import build_loader
    from tinycnn.transfer import DeviceResidentLoader

    bench = bench_factory(GROUP)
    step, model, optimizer = _step()
    num_batches = len(_train_loader(bench_data))
    once = build_loader(bench_data.root, "train", batch_size=E2E_BATCH, train=False, subset=SUBSET)
    resident = DeviceResidentLoader(once, DEVICE, num_batches=num_batches, batch_size=E2E_BATCH)

    t0 = time.perf_counter()
    n, loss = _epoch(resident, step)  # epoch 1: streams and fills the cache
    if ON_CUDA:
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    assert n == num_batches * E2E_BATCH and resident.images is not None
    assert resident.images.shape[0] == once.num_samples
    epochs = iter(range(1, 10 ** 6))

    def run():
        resident.set_epoch(next(epochs))
        return _epoch(resident, step)

    best = bench.run(run, rounds=RESIDENT_ROUNDS)
    n, loss = bench.result
    assert n == num_batches * E2E_BATCH and torch.isfinite(loss)
    assert optimizer_steps(optimizer) == num_batches * (1 + bench.calls)
    bench.rate("e2e/resident", f"device-resident epoch, from the cache ({SETUP})", n, best,
               note=f"first epoch (streaming, filling the cache): {n / first:,.0f} img/s",
               first_epoch_img_per_s=round(n / first, 1))
    bench.ratio("vs_synthetic", "e2e/resident", "e2e/synthetic", note="{:.1%} of synthetic")

