"""tinycnn.step.TrainStep on the CPU: the step's maths, clipping, mixed precision, accelerate, torch.compile.

The compile tests use a counting backend around aot_eager (no inductor: its C++ compile takes ~40 s on a
small CPU); tests/test_cuda.py runs the same paths with inductor on CUDA.
"""
import pytest
import timm
import torch
import torch.nn.functional as F

import tinycnn  # noqa: F401  (registers the models)
from tinycnn.augment import GPUAugment
from tinycnn.step import TrainStep, autocast_dtype, can_compile

SMALL = dict(stage_channels=[8, 16, 32], stage_repeats=[1, 1, 1], num_classes=10)


def small_model(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("tinycnn", **SMALL)


def batch(b=8, seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g),
            torch.randint(0, 10, (b,), generator=g))


def opt_steps(optimizer):
    p = optimizer.param_groups[0]["params"][0]
    return int(optimizer.state[p]["step"]) if p in optimizer.state else 0


def test_step_is_the_reference_step():
    """augment -> forward -> smoothed cross-entropy -> backward -> AdamW step, as written out by hand."""
    images, labels = batch()
    model, ref = small_model(), small_model()
    aug = GPUAugment()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    step = TrainStep(model, opt, augment=aug, label_smoothing=0.1)
    for seed in (1, 2):
        torch.manual_seed(seed)
        loss, logits = step(images, labels)
        torch.manual_seed(seed)
        ref_logits = ref(aug(images))
        ref_loss = F.cross_entropy(ref_logits, labels, label_smoothing=0.1)
        ref_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        torch.testing.assert_close(loss, ref_loss.detach())
        torch.testing.assert_close(logits, ref_logits.detach())
    assert not loss.requires_grad and not logits.requires_grad
    assert opt_steps(opt) == 2
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)
        assert p.grad is None                                            # zero_grad(set_to_none=True)


def test_without_augment_the_images_are_the_input():
    model = small_model()
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x = torch.randn(4, 3, 32, 32)
    assert step.model_input(x) is x
    loss, logits = step(x, torch.tensor([0, 1, 2, 3]))
    assert logits.shape == (4, 10) and torch.isfinite(loss)


def test_grad_clip_bounds_the_update():
    """SGD with lr 1 and no momentum moves the parameters by exactly the (clipped) gradient."""
    images, labels = batch()
    for clip in (None, 1e-3):
        model = small_model()
        before = [p.detach().clone() for p in model.parameters()]
        step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=1.0), augment=GPUAugment(), grad_clip=clip)
        step(images, labels)
        moved = torch.stack([(p.detach() - b).norm() for p, b in zip(model.parameters(), before)]).norm()
        if clip:
            assert moved <= clip * 1.001
        else:
            assert moved > 1e-2                                          # the unclipped gradient is much larger


def test_bf16_autocast_and_augment_emits_bf16():
    images, labels = batch()
    model = small_model().to(memory_format=torch.channels_last)
    aug = GPUAugment(channels_last=True)
    step = TrainStep(model, torch.optim.AdamW(model.parameters(), lr=1e-3), augment=aug, mixed_precision="bf16")
    x = step.model_input(images)
    assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)
    loss, logits = step(images, labels)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())    # autocast, not a bf16 model
    torch.manual_seed(3)
    params = aug.sample(len(images))
    torch.testing.assert_close(aug.apply(images, params, out_dtype=torch.bfloat16),
                               aug.apply(images, params).to(torch.bfloat16), rtol=0, atol=0)


def test_fp16_without_accelerator_scales_the_loss():
    images, labels = batch()
    model = small_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = TrainStep(model, opt, augment=GPUAugment(), mixed_precision="fp16", grad_clip=1.0)
    assert step.scaler is not None
    loss, _ = step(images, labels)
    assert torch.isfinite(loss) and opt_steps(opt) == 1


def test_bad_mixed_precision_is_one_clear_error():
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        autocast_dtype("bfloat16")
    model = small_model()
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), mixed_precision="fp32")


@pytest.fixture
def accelerator_factory():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    def make(**kw):
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(cpu=True, **kw)

    yield make
    AcceleratorState._reset_state(reset_partial_state=True)


def test_accelerator_accumulates_gradients(accelerator_factory):
    acc = accelerator_factory(gradient_accumulation_steps=2)
    model = small_model()
    model, opt = acc.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    step = TrainStep(model, opt, augment=GPUAugment(), grad_clip=1.0, accelerator=acc)
    images, labels = batch()
    first = next(model.parameters()).detach().clone()
    step(images, labels)
    assert torch.equal(next(model.parameters()), first)                 # accumulating: no step yet
    assert next(model.parameters()).grad is not None
    step(images, labels)
    assert not torch.equal(next(model.parameters()), first)
    assert opt_steps(opt.optimizer) == 1


def test_accelerator_mixed_precision_is_the_accelerators(accelerator_factory):
    acc = accelerator_factory(mixed_precision="bf16")
    model = small_model()
    model, opt = acc.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    assert "_original_forward" in model.__dict__                        # accelerate's autocast wrapper
    step = TrainStep(model, opt, augment=GPUAugment(), accelerator=acc)
    assert step.dtype == torch.bfloat16
    loss, logits = step(*batch())
    assert torch.isfinite(loss) and logits.dtype == torch.float32   # accelerate's wrapper returns fp32 logits
    with pytest.raises(ValueError, match="leave mixed_precision unset"):
        TrainStep(model, opt, accelerator=acc, mixed_precision="no")


def _counting_backend():
    from torch._dynamo.testing import CompileCounterWithBackend
    return CompileCounterWithBackend("aot_eager")


@pytest.mark.slow
def test_compiled_step_takes_a_last_partial_batch():
    torch._dynamo.reset()
    counter = _counting_backend()
    model = small_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = TrainStep(model, opt, augment=GPUAugment(), mixed_precision="bf16", compile=True,
                     compile_options={"backend": counter})
    step(*batch(8))
    first = counter.frame_count
    for b in (5, 3, 7, 8):
        loss, logits = step(*batch(b))
        assert logits.shape == (b, 10) and torch.isfinite(loss)
    assert counter.frame_count <= 2 * first                             # one recompile (dynamic batch), then none
    assert opt_steps(opt) == 5


def test_compile_augment_auto_is_off_on_cpu():
    assert not can_compile("cpu")
    model = small_model()
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), augment=GPUAugment())
    assert not step.compiled and not step.augment_compiled and step.forward is model
    off = GPUAugment.from_config({"enabled": False})
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), augment=off, compile=True,
                     compile_options={"backend": "eager"})
    assert step.compiled and not step.augment_compiled                  # nothing to fuse in normalize-only
