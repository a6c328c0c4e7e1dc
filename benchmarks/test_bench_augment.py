"""augmentation: GPUAugment (batched, per-sample randomness) vs torchvision v2 one sample at a time.

Both run on the device at hand (CUDA when available, else the CPU) on real sample images, with the
same transforms: RandomCrop(64, padding=4), RandomHorizontalFlip, ColorJitter(0.2, 0.2, 0.2, 0.05),
to float, Normalize. torchvision's v2 transforms draw one set of random parameters per call, so
per-sample randomness with torchvision means one call per sample.
On CUDA, also GPUAugment's cost inside tinycnn.step.TrainStep (bf16 + channels_last, eager model), with
its apply() eager and compiled (the library's default on CUDA).
Beside the plain GPUAugment, the timm-recipe options on the same batch: TrivialAugmentWide, RandAugment
(2 ops, magnitude 9), random erasing (p 0.25, pixel noise); and for comparison timm's own RandomErasing
(a Python loop over the samples) and timm's Mixup/CutMix per sample (MixupCutmix, mode 'elem'), each
after the plain GPUAugment.
"""
import pytest
import torch

from _bench import BATCH, DEVICE, ON_CUDA, QUICK, make_step, optimizer_steps, real_uint8_batch, sync

GROUP = "augment"
ROUNDS = 5 if ON_CUDA else 10  # cheap: more rounds, best of them (the CPU is shared)
AUG_BATCH = BATCH if ON_CUDA or QUICK else 256
ITERS = 20 if ON_CUDA else 1          # batches per round
V2_IMAGES = 256 if ON_CUDA else 32 if QUICK else 128   # images per round for the per-sample baseline


def test_gpu_augment(bench_factory, bench_data):
    from tinycnn.augment import GPUAugment

    bench = bench_factory(GROUP)
    x = real_uint8_batch(bench_data.jpegs, AUG_BATCH)
    aug = GPUAugment().to(DEVICE)

    def run():
        out = None
        for _ in range(ITERS):
            out = aug(x)
        return out

    best = bench.run(run, rounds=ROUNDS, warmup=1)
    out = bench.result
    assert out.shape == (AUG_BATCH, 3, 64, 64) and out.dtype == torch.float32 and out.device.type == DEVICE.type
    assert bool(torch.isfinite(out).all())
    bench.rate("augment/gpu_augment", f"GPUAugment on {DEVICE.type}, batch {AUG_BATCH}", ITERS * AUG_BATCH, best,
               note=f"{best / ITERS * 1e3:.1f} ms per batch")


RECIPES = {
    "trivialaugment": ("GPUAugment + TrivialAugmentWide", dict(policy="trivialaugment")),
    "randaugment": ("GPUAugment + RandAugment (2 ops, magnitude 9)", dict(policy="randaugment")),
    "erasing": ("GPUAugment + random erasing (p 0.25, pixel)", dict(erase_p=0.25, erase_mode="pixel")),
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_gpu_augment_recipe(bench_factory, bench_data, recipe):
    """GPUAugment with one of the timm-recipe options on, batched on the device like the plain one."""
    from tinycnn.augment import GPUAugment

    bench = bench_factory(GROUP)
    x = real_uint8_batch(bench_data.jpegs, AUG_BATCH)
    label, kwargs = RECIPES[recipe]
    aug = GPUAugment(**kwargs).to(DEVICE)

    def run():
        out = None
        for _ in range(ITERS):
            out = aug(x)
        return out

    best = bench.run(run, rounds=ROUNDS, warmup=1)
    out = bench.result
    assert out.shape == (AUG_BATCH, 3, 64, 64) and out.dtype == torch.float32 and out.device.type == DEVICE.type
    assert bool(torch.isfinite(out).all())
    key = f"augment/gpu_augment_{recipe}"
    bench.rate(key, f"{label}, batch {AUG_BATCH}", ITERS * AUG_BATCH, best,
               note=f"{best / ITERS * 1e3:.1f} ms per batch")
    bench.ratio(f"{recipe}_vs_plain", key, "augment/gpu_augment", note="{:.0%} of plain GPUAugment's rate")


@pytest.mark.parametrize("extra", ["timm_random_erasing", "mixup_cutmix_elem"])
def test_timm_per_sample_after_gpu_augment(bench_factory, bench_data, extra):
    """timm's per-sample loops on the augmented batch: RandomErasing(0.25, mode='pixel') as timm runs it,
    and Mixup/CutMix (mixup 0.8, cutmix 1.0, mode 'elem'); timed with the plain GPUAugment before them."""
    from timm.data.random_erasing import RandomErasing

    from tinycnn.augment import GPUAugment, MixupCutmix

    bench = bench_factory(GROUP)
    x = real_uint8_batch(bench_data.jpegs, AUG_BATCH)
    y = torch.randint(0, 200, (AUG_BATCH,), device=DEVICE)
    aug = GPUAugment().to(DEVICE)
    if extra == "timm_random_erasing":
        eraser = RandomErasing(0.25, mode="pixel", device=DEVICE)
        label = "GPUAugment + timm RandomErasing (p 0.25, pixel; per-sample loop)"
        step = lambda: eraser(aug(x))                                  # noqa: E731
    else:
        mix = MixupCutmix(200, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
        label = "GPUAugment + timm Mixup/CutMix (mode elem)"
        step = lambda: mix(aug(x), y)[0]                               # noqa: E731

    def run():
        out = None
        for _ in range(ITERS):
            out = step()
        return out

    best = bench.run(run, rounds=ROUNDS, warmup=1)
    out = bench.result
    assert out.shape == (AUG_BATCH, 3, 64, 64) and out.device.type == DEVICE.type and bool(torch.isfinite(out).all())
    key = f"augment/gpu_augment_{extra}"
    bench.rate(key, f"{label}, batch {AUG_BATCH}", ITERS * AUG_BATCH, best,
               note=f"{best / ITERS * 1e3:.1f} ms per batch")
    bench.ratio(f"{extra}_vs_plain", key, "augment/gpu_augment", note="{:.0%} of plain GPUAugment's rate")


def test_eval_transform_floor(bench_factory, bench_data):
    """uint8 -> float -> normalize only: the least any augmentation pipeline has to do (a floor on its cost)."""
    from tinycnn.augment import GPUAugment

    bench = bench_factory(GROUP)
    x = real_uint8_batch(bench_data.jpegs, AUG_BATCH)
    aug = GPUAugment().to(DEVICE)

    def run():
        out = None
        for _ in range(ITERS):
            out = aug.eval_transform(x)
        return out

    best = bench.run(run, rounds=ROUNDS, warmup=1)
    out = bench.result
    assert out.shape == (AUG_BATCH, 3, 64, 64) and out.dtype == torch.float32 and out.device.type == DEVICE.type
    bench.rate("augment/eval_floor", f"eval_transform only (to float + normalize), batch {AUG_BATCH}",
               ITERS * AUG_BATCH, best)
    bench.ratio("gpu_augment_vs_floor", "augment/gpu_augment", "augment/eval_floor", note="{:.0%} of the floor's rate")


def test_torchvision_v2_per_sample(bench_factory, bench_data):
    import torchvision.transforms.v2 as v2

    bench = bench_factory(GROUP)
    tf = v2.Compose([
        v2.RandomCrop(64, padding=4),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(0.2, 0.2, 0.2, 0.05),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    x = real_uint8_batch(bench_data.jpegs, V2_IMAGES)

    def run():
        return torch.stack([tf(img) for img in x])

    best = bench.run(run, rounds=3, warmup=1)
    out = bench.result
    assert out.shape == (V2_IMAGES, 3, 64, 64) and out.dtype == torch.float32 and out.device.type == DEVICE.type
    bench.rate("augment/v2_per_sample", f"torchvision v2, one sample per call, on {DEVICE.type}", V2_IMAGES, best)
    r = bench.ratio("gpu_augment_speedup", "augment/gpu_augment", "augment/v2_per_sample")
    if r is not None:
        bench.record("augment/speedup", "GPUAugment / torchvision v2 per sample", r, "x")


@pytest.mark.skipif(not ON_CUDA, reason="the augmentation's share of a train step is a GPU figure "
                                        "(no CUDA device here)")
@pytest.mark.parametrize("compile_augment", [False, True], ids=["eager_apply", "compiled_apply"])
def test_augment_fraction_of_train_step(bench_factory, bench_data, compile_augment):
    """TrainStep with GPUAugment on uint8 batches vs the same step on already-augmented batches; the
    difference is the augmentation's cost (sampling included)."""
    import time

    bench = bench_factory(GROUP)
    step, model, optimizer = make_step(channels_last=True, bf16=True, augment=True, compile_augment=compile_augment)
    alone, _, alone_opt = make_step(channels_last=True, bf16=True)
    train_step = step.train_step
    x = real_uint8_batch(bench_data.jpegs, BATCH)
    y = torch.randint(0, 200, (BATCH,), device=DEVICE)
    ready = train_step.model_input(x)          # augmented, in bf16: what the model gets

    def with_aug():
        loss = None
        for _ in range(ITERS):
            loss = step(x, y)
        return loss

    def without_aug():
        loss = None
        for _ in range(ITERS):
            loss = alone(ready, y)
        return loss

    def aug_only():
        out = None
        for _ in range(ITERS):
            out = train_step.model_input(x)
        return out

    def best_of(fn, rounds=5):
        fn()  # warm-up
        times = []
        for _ in range(rounds):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return min(times)

    t_with = bench.run(with_aug, rounds=5, warmup=1)
    assert torch.isfinite(bench.result) and train_step.augment_compiled == compile_augment
    assert optimizer_steps(optimizer) == ITERS * bench.calls
    t_without = best_of(without_aug)
    t_aug = best_of(aug_only)
    assert optimizer_steps(alone_opt) == ITERS * 6
    how = "compiled" if compile_augment else "eager"
    bench.rate(f"augment/step_with_aug_{how}", f"train step + GPUAugment, apply {how} (bf16, channels_last)",
               ITERS * BATCH, t_with)
    bench.record(f"augment/step_without_aug_{how}", "train step alone (same batches, pre-augmented)",
                 ITERS * BATCH / t_without, "img/s")
    key = "augment/fraction_of_step" if compile_augment else "augment/fraction_of_step_eager"
    bench.record(key, f"GPUAugment cost / train step with it, apply {how}", max(0.0, 1 - t_without / t_with),
                 "fraction", note=f"GPUAugment alone: {t_aug / t_with:.1%} of the step time")
