"""train step: tinycnn.step.TrainStep (forward + backward + optimizer step) of the default model.

Eager vs torch.compile, fp32 vs bf16 autocast, NCHW vs channels_last, on synthetic normalized batches
already on the device (TINYCNN_BENCH_BATCH images: 256 on CUDA, 32 on CPU): the step alone, without the
augmentation (its cost is measured in test_bench_augment and test_bench_end_to_end). The compiled
variants run on CUDA, and on CPU only with TINYCNN_BENCH_COMPILE=1 (compiling takes about a minute per
variant there). TINYCNN_BENCH_QUICK=1 keeps the variants the goals name (and the fp32 NCHW baseline).
FLOPs per training image are counted from the model (torch.utils.flop_counter: conv and linear, 2 FLOPs
per multiply-add; training = 3 x forward) and give the model-FLOPs utilisation on a GPU.
"""
import functools

import pytest
import torch

from _bench import (BATCH, COMPILE, ON_CUDA, PEAK_BF16_FLOPS, QUICK, make_step, optimizer_steps, record,
                    synthetic_batch, value)

GROUP = "train-step"
EXPECTED_TRAIN_FLOPS = 3.67e9  # per image, default model: 3 x 1.222 GFLOP forward
STEPS = 20 if ON_CUDA else 1   # steps per round
ROUNDS = 5 if ON_CUDA else 2


@functools.lru_cache()
def count_flops():
    """(forward FLOPs per image, counted forward + backward FLOPs per image) of the default model."""
    import timm
    from torch.utils.flop_counter import FlopCounterMode

    import tinycnn  # noqa: F401
    model = timm.create_model("tinycnn")
    x = torch.randn(2, 3, 64, 64)
    with FlopCounterMode(display=False) as fc:
        model(x)
    forward = fc.get_total_flops() / 2
    with FlopCounterMode(display=False) as fc:
        torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    return forward, fc.get_total_flops() / 2


def test_flops_per_image():
    forward, counted = count_flops()
    train = 3 * forward
    assert abs(train - EXPECTED_TRAIN_FLOPS) / EXPECTED_TRAIN_FLOPS < 0.005, train
    assert 0.95 * train < counted <= train  # backward of the first conv needs no input gradient
    record(GROUP, "train/forward_flops", "forward FLOPs per image (default model)", forward, "FLOP")
    record(GROUP, "train/flops_per_image", "training FLOPs per image (3 x forward)", train, "FLOP",
           note=f"counted forward + backward: {counted / 1e9:.3f} GFLOP; "
                f"compute ceiling at {PEAK_BF16_FLOPS / 1e12:.0f} TFLOP/s: {PEAK_BF16_FLOPS / train:,.0f} img/s")


VARIANTS = [(compiled, bf16, cl, BATCH) for compiled in (False, True) for bf16 in (False, True) for cl in (False, True)]
if QUICK:
    VARIANTS = [(False, False, False, BATCH), (False, True, True, BATCH), (True, True, True, BATCH)]
if ON_CUDA:
    VARIANTS.append((False, True, True, 1024))  # how the eager rate scales with the batch


def _name(compiled, bf16, cl, batch):
    return (f"{'compiled' if compiled else 'eager'}_{'bf16' if bf16 else 'fp32'}_{'cl' if cl else 'nchw'}"
            + (f"_b{batch}" if batch != BATCH else ""))


@pytest.mark.parametrize("compiled,bf16,channels_last,batch", VARIANTS, ids=[_name(*v) for v in VARIANTS])
def test_train_step(bench_factory, compiled, bf16, channels_last, batch):
    if compiled and not COMPILE:
        pytest.skip("torch.compile variants are off on CPU (about a minute of compiling each): "
                    "set TINYCNN_BENCH_COMPILE=1 to run them")
    bench = bench_factory(GROUP)
    step, model, optimizer = make_step(channels_last=channels_last, bf16=bf16, compiled=compiled)
    x, y = synthetic_batch(batch, channels_last=channels_last)

    def run():
        loss = None
        for _ in range(STEPS):
            loss = step(x, y)
        return loss

    best = bench.run(run, rounds=ROUNDS, warmup=1)
    assert torch.isfinite(bench.result)
    assert optimizer_steps(optimizer) == STEPS * bench.calls
    key = f"train/{_name(compiled, bf16, channels_last, batch)}"
    label = (f"{'torch.compile' if compiled else 'eager'}, {'bf16 autocast' if bf16 else 'fp32'}, "
             f"{'channels_last' if channels_last else 'NCHW'}, batch {batch}")
    rate = bench.rate(key, label, STEPS * batch, best)
    flops = value("train/flops_per_image") or 3 * count_flops()[0]
    achieved = rate * flops
    note = f"{achieved / 1e12:.2f} TFLOP/s"
    if ON_CUDA:
        note += f", MFU {achieved / PEAK_BF16_FLOPS:.1%} of {PEAK_BF16_FLOPS / 1e12:.0f} TFLOP/s bf16"
    bench.record(key, label, rate, "img/s", note=note, tflops=round(achieved / 1e12, 3),
                 mfu_vs_bf16_peak=round(achieved / PEAK_BF16_FLOPS, 5))
    if compiled:
        bench.ratio("compiled_vs_eager", key, key.replace("compiled", "eager"), note="{:.2f}x eager")
