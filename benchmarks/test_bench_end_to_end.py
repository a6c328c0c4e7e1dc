"""end to end: an epoch over real shards through loader, prefetch, augmentation and train step,
as a fraction of the train-step rate on synthetic batches already on the device (1.0 = data is free).

- synthetic: the train step alone on one normalized float batch already on the device;
- streaming: build_loader(train=True, default workers) -> DevicePrefetcher -> GPUAugment -> step, one
  epoch, worker start-up included (as in tinycnn.train);
- original: what a user would otherwise do: the original per-sample pipeline (PIL + torchvision.transforms in
  DataLoader workers, the library's default worker count) -> float32 batches -> the device -> step;
- device-resident: DeviceResidentLoader; its first epoch streams and fills the cache (reported in the
  note), the figure is a later epoch served from the device.

On CUDA: the default model, bf16 autocast, channels_last, eager, TINYCNN_BENCH_BATCH images per step, one
epoch = all repeated train shards. On CPU, to finish quickly: a small model (stage_channels 16/32/64),
fp32, batch 64 and epochs of 384 images; the loader workers then share the CPU with the train step,
so the CPU ratios say little about a GPU run.
"""
import time

import torch

from _bench import BATCH, DEVICE, NCORES, ON_CUDA, JpegDataset, make_train_step, optimizer_steps, synthetic_batch

GROUP = "end-to-end"
if ON_CUDA:
    MODEL = {}
    E2E_BATCH, SUBSET, BF16, CL = BATCH, None, True, True
    SYNTH_STEPS, ROUNDS, RESIDENT_ROUNDS = 50, 3, 3
else:
    MODEL = {"stage_channels": [16, 32, 64]}
    E2E_BATCH, SUBSET, BF16, CL = 64, 384, False, False
    SYNTH_STEPS, ROUNDS, RESIDENT_ROUNDS = 6, 2, 1  # 6 steps = as many images as one CPU epoch
SETUP = (f"{'default model' if not MODEL else 'small model 16/32/64'}, {'bf16' if BF16 else 'fp32'}"
         f"{', channels_last' if CL else ''}, batch {E2E_BATCH}")


def _model():
    return make_train_step(channels_last=CL, bf16=BF16, **MODEL)


def _aug():
    from tinycnn.augment import GPUAugment
    return GPUAugment(channels_last=CL).to(DEVICE)


def _train_loader(bench_data):
    from tinycnn.data import build_loader
    return build_loader(bench_data.root, "train", batch_size=E2E_BATCH, train=True, subset=SUBSET)


def _epoch(batches, aug, step):
    n, loss = 0, None
    for images, labels in batches:
        assert images.dtype == torch.uint8 and images.device.type == DEVICE.type
        loss = step(aug(images), labels)
        n += images.shape[0]
    return n, loss


def test_synthetic(bench_factory):
    bench = bench_factory(GROUP)
    step, model, optimizer = _model()
    x, y = synthetic_batch(E2E_BATCH, channels_last=CL)

    def run():
        loss = None
        for _ in range(SYNTH_STEPS):
            loss = step(x, y)
        return loss

    best = bench.run(run, rounds=ROUNDS, warmup=1)
    assert torch.isfinite(bench.result) and optimizer_steps(optimizer) == SYNTH_STEPS * bench.calls
    bench.rate("e2e/synthetic", f"train step on synthetic device batches ({SETUP})", SYNTH_STEPS * E2E_BATCH, best)


def test_original_pipeline(bench_factory, bench_data):
    from torch.utils.data import DataLoader

    bench = bench_factory(GROUP)
    step, model, optimizer = _model()
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


def test_streaming(bench_factory, bench_data):
    from tinycnn.data import DevicePrefetcher

    bench = bench_factory(GROUP)
    step, model, optimizer = _model()
    aug = _aug()
    loader = _train_loader(bench_data)
    batches = DevicePrefetcher(loader, DEVICE)
    epochs = iter(range(10 ** 6))

    def run():
        batches.set_epoch(next(epochs))
        return _epoch(batches, aug, step)

    best = bench.run(run, rounds=1)
    n, loss = bench.result
    assert n == len(loader) * E2E_BATCH and torch.isfinite(loss)
    assert optimizer_steps(optimizer) == len(loader) * bench.calls
    bench.rate("e2e/streaming", f"streaming epoch, {loader.num_workers} workers ({SETUP})", n, best,
               workers=loader.num_workers)
    bench.ratio("vs_synthetic", "e2e/streaming", "e2e/synthetic", note="{:.1%} of synthetic")


def test_device_resident(bench_factory, bench_data):
    from tinycnn.data import DeviceResidentLoader, build_loader

    bench = bench_factory(GROUP)
    step, model, optimizer = _model()
    aug = _aug()
    num_batches = len(_train_loader(bench_data))
    once = build_loader(bench_data.root, "train", batch_size=E2E_BATCH, train=False, subset=SUBSET)
    resident = DeviceResidentLoader(once, DEVICE, num_batches=num_batches, batch_size=E2E_BATCH)

    t0 = time.perf_counter()
    n, loss = _epoch(resident, aug, step)  # epoch 1: streams and fills the cache
    if ON_CUDA:
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    assert n == num_batches * E2E_BATCH and resident.images is not None
    assert resident.images.shape[0] == once.num_samples
    epochs = iter(range(1, 10 ** 6))

    def run():
        resident.set_epoch(next(epochs))
        return _epoch(resident, aug, step)

    best = bench.run(run, rounds=RESIDENT_ROUNDS)
    n, loss = bench.result
    assert n == num_batches * E2E_BATCH and torch.isfinite(loss)
    assert optimizer_steps(optimizer) == num_batches * (1 + bench.calls)
    bench.rate("e2e/resident", f"device-resident epoch, from the cache ({SETUP})", n, best,
               note=f"first epoch (streaming, filling the cache): {n / first:,.0f} img/s",
               first_epoch_img_per_s=round(n / first, 1))
    bench.ratio("vs_synthetic", "e2e/resident", "e2e/synthetic", note="{:.1%} of synthetic")

