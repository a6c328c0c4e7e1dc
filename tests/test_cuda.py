"""The CUDA-only paths, each tested where CUDA is present; every test skips without it.

What can run on the CPU is tested there too: tests/test_step.py (the step, accelerate, torch.compile
recompiles and partial batches with aot_eager), tests/test_augment.py (no host reads in sample(), the
compiled apply), tests/test_transfer.py (the prefetcher's logic).  `bash .ci/gpu` runs this file first.
"""
import contextlib
import types

import pytest
import timm
import torch

import tinycnn  # noqa: F401  (registers the models)
from tinycnn.augment import GPUAugment
from tinycnn.step import TrainStep

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bash .ci/gpu on a GPU machine)")

DEV = torch.device("cuda")


def uint8_batch(b=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (b, 3, 64, 64), dtype=torch.uint8, generator=g),
            torch.randint(0, 200, (b,), generator=g))


def default_step(*, compile=False, compile_options=None, grad_clip=1.0, augment=None, **kw):
    """The recipe's setup: default model, channels_last, fused AdamW, bf16, GPUAugment emitting bf16."""
    model = timm.create_model("tinycnn").to(DEV, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, fused=True)
    aug = GPUAugment.for_model(model, augment, channels_last=True).to(DEV)
    step = TrainStep(model, optimizer, augment=aug, label_smoothing=0.1, grad_clip=grad_clip,
                     mixed_precision="bf16", compile=compile, compile_options=compile_options, **kw)
    return step, model, optimizer


@contextlib.contextmanager
def no_host_sync():
    """Any synchronizing CUDA call (.item(), nonzero, a blocking copy) raises inside the block."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------------- DevicePrefetcher

def test_prefetcher_orders_copies_before_use_and_records_the_stream(monkeypatch):
    """While the compute stream is busy, batch n+1 copies on the side stream; each batch's values must be
    its own (the compute stream waited for its copy) and each tensor record_stream'd on the compute stream."""
    from tinycnn.transfer import DevicePrefetcher

    recorded = []
    real = torch.Tensor.record_stream

    def spy(self, stream):
        recorded.append(stream)
        return real(self, stream)

    monkeypatch.setattr(torch.Tensor, "record_stream", spy)
    host = [(torch.full((256, 3, 64, 64), i, dtype=torch.uint8).pin_memory(), torch.full((256,), i).pin_memory())
            for i in range(12)]
    compute = torch.cuda.current_stream()
    seen = []
    for images, labels in DevicePrefetcher(host, DEV):
        torch.cuda._sleep(2_000_000)                     # keep the compute stream busy: copies must not race it
        seen.append((images.float().mean(), labels.float().mean()))
    torch.cuda.synchronize()
    assert [(int(a), int(b)) for a, b in seen] == [(i, i) for i in range(12)]
    assert len(recorded) >= 2 * 12 and all(s == compute for s in recorded)


def test_pinned_batches_with_persistent_workers(sample_shards):
    """The loader's batches arrive pinned (a non_blocking copy from pageable memory blocks the host), in the
    first epoch and in the next one served by the same persistent workers."""
    from tinycnn.data import build_loader
    from tinycnn.transfer import DevicePrefetcher

    loader = build_loader(sample_shards, "train", batch_size=64, train=True, num_workers=2)
    DevicePrefetcher(loader, DEV)                        # what training builds around it (may decide pinning)
    try:
        for epoch in range(2):
            loader.set_epoch(epoch)
            for i, (images, labels) in enumerate(loader):
                assert images.is_pinned() and labels.is_pinned(), f"epoch {epoch}, batch {i}"
                if i == 3:
                    break
    finally:
        loader.close()


# ----------------------------------------------------------------------------- the hot loop

def test_hot_loop_makes_no_host_sync():
    """TrainStep + GPUAugment + the scheduler + the loss/accuracy sums of tinycnn.train's loop, with
    torch.cuda.set_sync_debug_mode("error"): nothing in a step waits for the GPU."""
    step, model, optimizer = default_step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10))
    images, labels = (t.to(DEV) for t in uint8_batch())
    step(images, labels)                                 # first call: cudnn autotuning, lazy inits
    loss_sum = torch.zeros((), device=DEV)
    correct = torch.zeros((), dtype=torch.int64, device=DEV)
    with no_host_sync():
        for _ in range(3):
            loss, logits = step(images, labels)
            scheduler.step()
            loss_sum += loss
            correct += (logits.argmax(dim=1) == labels).sum()
    assert torch.isfinite(loss_sum) and 0 <= int(correct) <= 3 * 64


def test_hot_loop_under_accelerate_makes_no_host_sync():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        acc = Accelerator(mixed_precision="bf16", gradient_accumulation_steps=2)
        model = timm.create_model("tinycnn").to(DEV, memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        model, optimizer = acc.prepare(model, optimizer)
        aug = GPUAugment(channels_last=True).to(DEV)
        step = TrainStep(model, optimizer, augment=aug, grad_clip=1.0, accelerator=acc)
        images, labels = (t.to(DEV) for t in uint8_batch())
        step(images, labels)
        with no_host_sync():
            for _ in range(4):
                loss, _ = step(images, labels)
        assert torch.isfinite(loss)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_gpu_augment_draws_on_the_device():
    aug = GPUAugment(channels_last=True).to(DEV)
    images = uint8_batch(32)[0].to(DEV)
    aug(images)
    with no_host_sync():
        params = aug.sample(32)
        out = aug.apply(images, params, out_dtype=torch.bfloat16)
    assert all(v.device.type == "cuda" for v in params.values())
    assert out.dtype == torch.bfloat16


def test_channels_last_through_gpu_augment_matches_the_cpu():
    images = uint8_batch(16)[0]
    cpu = GPUAugment(channels_last=True)
    params = cpu.sample(16, generator=torch.Generator().manual_seed(1))
    gpu = GPUAugment(channels_last=True).to(DEV)
    for layout in (torch.contiguous_format, torch.channels_last):
        x = images.to(DEV).contiguous(memory_format=layout)
        out = gpu.apply(x, {k: v.to(DEV) for k, v in params.items()})
        assert out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out.cpu(), cpu.apply(images, params), rtol=0, atol=2e-5)


# ----------------------------------------------------------------------------- compile

def test_compiled_step_no_graph_breaks_one_recompile_for_a_partial_batch():
    """Inductor, fullgraph (a graph break raises): the model and GPUAugment.apply each compile once, a last
    partial batch recompiles once with a dynamic batch, later sizes reuse it."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    step, model, optimizer = default_step(compile=True, compile_options={"backend": counter, "fullgraph": True})
    assert step.compiled and step.augment_compiled
    images, labels = (t.to(DEV) for t in uint8_batch(64))
    step(images, labels)
    first = counter.frame_count
    for b in (40, 24, 64, 17):
        loss, logits = step(images[:b], labels[:b])
        assert logits.shape == (b, model.num_classes)
        assert torch.isfinite(loss)
    assert first >= 2 and counter.frame_count <= 2 * first


def test_compile_augment_is_on_by_default_on_cuda():
    step, _, _ = default_step()
    assert step.augment_compiled and not step.compiled


# ----------------------------------------------------------------------------- bf16 + fused AdamW + clipping

def test_bf16_fused_adamw_with_clipping_learns_a_batch():
    step, model, optimizer = default_step(grad_clip=1.0, augment={"enabled": False})   # fixed input: loss must fall
    assert optimizer.defaults["fused"]
    images, labels = (t.to(DEV) for t in uint8_batch(64))
    losses = [step(images, labels)[0] for _ in range(30)]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.isfinite(torch.stack(losses)).all()
    assert losses[-1] < 0.5 * losses[0]


# ----------------------------------------------------------------------------- device-resident data

def test_device_resident_memory_check():
    from tinycnn.transfer import DeviceResidentLoader

    def fake_loader(num_samples):
        stream = types.SimpleNamespace(image_shape=(3, 64, 64), world_size=1)
        return types.SimpleNamespace(num_samples=num_samples, stream=stream)

    free = torch.cuda.mem_get_info(DEV)[0]
    too_many = int(free / (3 * 64 * 64)) + 1                   # more images than free memory holds
    with pytest.raises(MemoryError, match="device_resident"):
        DeviceResidentLoader(fake_loader(too_many), DEV, num_batches=1, batch_size=1)
    DeviceResidentLoader(fake_loader(100_000), DEV, num_batches=1, batch_size=1)   # Tiny ImageNet: 1.2 GB fits
