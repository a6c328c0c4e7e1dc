"""tinycnn.augment: GPUAugment replayed against torchvision.transforms.v2.functional, per sample.

The reference applies each sample's own parameters (crop offsets, flip, colour factors, op order)
with torchvision's functional ops on float images: F.pad + F.crop, F.horizontal_flip,
F.adjust_brightness/contrast/saturation/hue in the sample's order, F.normalize.
"""
import io
import itertools
import zipfile

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN, IMAGENET_DEFAULT_STD as IMAGENET_STD
from torchvision.io import ImageReadMode, decode_jpeg

from tinycnn.augment import (JITTER_OPS, PARAM_KEYS, EvalTransform, GPUAugment,
                             eval_transform)

TOL = 2 / 255          # the spec: every pixel within 2/255 of torchvision (in [0, 1] units)
MEAN_TOL = 1e-4        # and on average far closer (the maths is the same up to float rounding)
OFF = dict(crop_padding=0, flip_p=0.0, brightness=0, contrast=0, saturation=0, hue=0)
STRONG = dict(crop_padding=8, flip_p=0.5, brightness=0.9, contrast=0.9, saturation=0.9, hue=0.5)
_ADJUST = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
           "saturation": TF.adjust_saturation, "hue": TF.adjust_hue}


# ----------------------------------------------------------------------------- fixtures / reference

@pytest.fixture(scope="module")
def sample_images(sample_zip):
    """64 train JPEGs of the sample (uint8, B x 3 x 64 x 64), the last one grayscale (decoded as RGB): real Tiny
    ImageNet photos when the real sample is there, else the synthetic sample's images (conftest.py)."""
    from PIL import Image

    with zipfile.ZipFile(sample_zip) as z:
        names = sorted(n for n in z.namelist() if "/train/" in n and n.endswith(".JPEG"))
        picked = names[::len(names) // 63][:63]                   # spread over all classes of the sample
        gray = next(n for n in names if Image.open(io.BytesIO(z.read(n))).mode == "L")
        picked.append(gray)
        imgs = [decode_jpeg(torch.frombuffer(bytearray(z.read(n)), dtype=torch.uint8), mode=ImageReadMode.RGB)
                for n in picked]
    batch = torch.stack(imgs)
    assert batch.shape == (64, 3, 64, 64) and batch.dtype == torch.uint8
    assert torch.equal(batch[-1, 0], batch[-1, 1]) and torch.equal(batch[-1, 0], batch[-1, 2])  # gray -> RGB
    assert not torch.equal(batch[0, 0], batch[0, 1])
    return batch


def synthetic_images(b=32, h=64, w=64, seed=0):
    """Random uint8 images with the hard cases for hue: gray pixels, ties between channels, 0 and 255."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=g)
    x[:, :, :8] = x[:, :1, :8]                      # gray rows (r = g = b)
    x[:, 1, 8:12] = x[:, 0, 8:12]                   # r = g ties
    x[:, 2, 12:16] = x[:, 1, 12:16]                 # g = b ties
    x[:, :, 16:18] = 255
    x[:, :, 18:20] = 0
    x[:, 0, 20:22] = 255                            # saturated red channel
    return x


def reference(aug, images, params):
    """torchvision.transforms.v2.functional replay of params, one sample at a time."""
    out = []
    p = aug.crop_padding
    mean, std = aug.mean.flatten().tolist(), aug.std.flatten().tolist()
    for i in range(images.shape[0]):
        x = TF.to_dtype(images[i], torch.float32, scale=True)
        h, w = x.shape[-2:]
        if p:
            top, left = params["crop_offsets"][i].tolist()
            x = TF.crop(TF.pad(x, [p]), top, left, h, w)
        if aug.flip_p > 0 and bool(params["flip"][i]):
            x = TF.horizontal_flip(x)
        for j in params["jitter_order"][i].tolist():
            name = JITTER_OPS[j]
            if aug.ranges[name] is not None:
                x = _ADJUST[name](x, float(params[name][i]))
        if aug.normalize:
            x = TF.normalize(x, mean, std)
        out.append(x)
    return torch.stack(out)


def unit(images):
    return TF.to_dtype(images, torch.float32, scale=True)


def unit_error(aug, out, ref):
    """|out - ref| in [0, 1] pixel units (undoing the division by std)."""
    return (out - ref).abs() * aug.std


def assert_close_to_reference(aug, images, params):
    out = aug.apply(images, params)
    ref = reference(aug, images, params)
    err = unit_error(aug, out, ref)
    assert err.max().item() <= TOL, f"max error {err.max().item() * 255:.3f}/255"
    assert err.mean().item() <= MEAN_TOL, f"mean error {err.mean().item():.2e}"
    return out, ref


# ----------------------------------------------------------------------------- torchvision equivalence

SINGLE_OPS = {
    "crop": dict(OFF, crop_padding=4),
    "flip": dict(OFF, flip_p=0.5),
    "brightness": dict(OFF, brightness=0.2),
    "contrast": dict(OFF, contrast=0.2),
    "saturation": dict(OFF, saturation=0.2),
    "hue": dict(OFF, hue=0.05),
    "brightness_strong": dict(OFF, brightness=0.9),
    "contrast_strong": dict(OFF, contrast=0.9),
    "saturation_strong": dict(OFF, saturation=0.9),
    "hue_strong": dict(OFF, hue=0.5),
}


@pytest.mark.parametrize("name", list(SINGLE_OPS))
def test_each_op_alone_matches_torchvision(sample_images, name):
    aug = GPUAugment(**SINGLE_OPS[name], mean=None, std=None)
    params = aug.sample(len(sample_images), generator=torch.Generator().manual_seed(1))
    out, _ = assert_close_to_reference(aug, sample_images, params)
    # the op really did something (and the draw covers both sides of identity)
    plain = unit(sample_images)
    changed = (out - plain).abs().flatten(1).amax(1) > TOL
    if name == "crop":
        assert changed.float().mean() > 0.8 and len(set(map(tuple, params["crop_offsets"].tolist()))) > 20
    elif name == "flip":
        assert 10 < int(params["flip"].sum()) < 54
        assert torch.equal(changed[:-1], params["flip"][:-1])        # exactly the flipped ones change
    else:
        op = name.split("_")[0]
        f = params[op]
        identity = 0.0 if op == "hue" else 1.0
        assert (f < identity).any() and (f > identity).any()
        assert changed[:-1].float().mean() > 0.5   # (not all: factors near 1, dull images; the gray one)


@pytest.mark.parametrize("config", ["default", "strong", "strong_jitter_p", "no_hue", "hue_and_contrast"])
def test_composed_matches_torchvision(sample_images, config):
    kwargs = {"default": {}, "strong": STRONG, "strong_jitter_p": dict(STRONG, jitter_p=0.5),
              "no_hue": dict(STRONG, hue=0), "hue_and_contrast": dict(OFF, contrast=0.5, hue=0.3, flip_p=0.5)}[config]
    aug = GPUAugment(**kwargs)
    assert aug.normalize
    params = aug.sample(len(sample_images), generator=torch.Generator().manual_seed(2))
    assert_close_to_reference(aug, sample_images, params)
    # every op can land at every position in this batch
    order = params["jitter_order"]
    for op in range(4):
        assert set((order == op).nonzero()[:, 1].tolist()) == {0, 1, 2, 3}


def test_composed_matches_torchvision_synthetic():
    """Same check without the sample zip, on images full of hue edge cases, at a non-64 size."""
    images = synthetic_images(24, 40, 56)
    for kwargs in ({}, STRONG):
        aug = GPUAugment(**kwargs)
        params = aug.sample(len(images), generator=torch.Generator().manual_seed(3))
        assert_close_to_reference(aug, images, params)


def test_jitter_order_is_honoured(sample_images):
    """Running the same factors in another order gives different images: so the reference comparison
    above would catch an implementation that ignores or misreads jitter_order."""
    aug = GPUAugment(**dict(STRONG, crop_padding=0, flip_p=0))
    params = aug.sample(len(sample_images), generator=torch.Generator().manual_seed(4))
    out = aug.apply(sample_images, params)
    reversed_ = dict(params, jitter_order=params["jitter_order"].flip(1))
    other = aug.apply(sample_images, reversed_)
    assert unit_error(aug, other, reference(aug, sample_images, reversed_)).max() <= TOL
    differs = unit_error(aug, out, other).flatten(1).amax(1) > TOL
    # brightness commutes with the others up to clamping, so not every reversal shows
    assert differs[:-1].float().mean() > 0.75
    fixed = dict(params, jitter_order=torch.arange(4).expand(len(sample_images), 4))
    assert (unit_error(aug, out, reference(aug, sample_images, fixed)).flatten(1).amax(1) > TOL).sum() > 20


# ----------------------------------------------------------------------------- randomness

def test_each_sample_gets_its_own_draw():
    aug = GPUAugment()
    one = synthetic_images(1)
    batch = one.expand(64, -1, -1, -1).contiguous()
    params = aug.sample(64, generator=torch.Generator().manual_seed(5))
    for key in ("brightness", "contrast", "saturation", "hue"):
        assert params[key].unique().numel() == 64, key
    assert len(set(map(tuple, params["crop_offsets"].tolist()))) > 30
    assert len(set(map(tuple, params["jitter_order"].tolist()))) > 15
    assert 0 < int(params["flip"].sum()) < 64
    out = aug(batch, generator=torch.Generator().manual_seed(6))
    flat = out.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(64) * 1e9).min() > 1.0  # all 64 outputs pairwise different


def test_generator_reproducibility():
    aug = GPUAugment()
    images = synthetic_images(16)
    p1 = aug.sample(16, generator=torch.Generator().manual_seed(123))
    p2 = aug.sample(16, generator=torch.Generator().manual_seed(123))
    p3 = aug.sample(16, generator=torch.Generator().manual_seed(124))
    assert set(p1) == set(PARAM_KEYS)
    for k in PARAM_KEYS:
        assert torch.equal(p1[k], p2[k]), k
    assert not torch.equal(p1["brightness"], p3["brightness"])
    o1 = aug(images, generator=torch.Generator().manual_seed(7))
    o2 = aug(images, generator=torch.Generator().manual_seed(7))
    assert torch.equal(o1, o2)
    assert not torch.equal(o1, aug(images, generator=torch.Generator().manual_seed(8)))
    torch.manual_seed(9)
    o3 = aug(images)
    torch.manual_seed(9)
    assert torch.equal(o3, aug(images))
    assert torch.equal(aug.apply(images, p1), aug.apply(images, p2))  # apply is deterministic


def test_parameter_ranges_and_distribution():
    n = 20000
    aug = GPUAugment()
    p = aug.sample(n, generator=torch.Generator().manual_seed(10))
    assert p["crop_offsets"].shape == (n, 2) and p["crop_offsets"].dtype == torch.int64
    assert p["flip"].shape == (n,) and p["flip"].dtype == torch.bool
    assert p["jitter_order"].shape == (n, 4) and p["jitter_order"].dtype == torch.int64
    assert set(p["crop_offsets"].unique().tolist()) == set(range(9))       # 0..2*padding, all reached
    counts = torch.bincount(p["crop_offsets"].flatten(), minlength=9).float() / (2 * n)
    assert (counts - 1 / 9).abs().max() < 0.01
    assert 0.48 < p["flip"].float().mean() < 0.52
    for key in ("brightness", "contrast", "saturation"):
        f = p[key]
        assert f.dtype == torch.float32 and f.shape == (n,)
        assert f.min() >= 0.8 and f.max() <= 1.2 and f.min() < 0.801 and f.max() > 1.199, key
        assert abs(f.mean().item() - 1.0) < 0.005
    assert p["hue"].min() >= -0.05 and p["hue"].max() <= 0.05
    assert p["hue"].min() < -0.0499 and p["hue"].max() > 0.0499
    order = p["jitter_order"]
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand(n, 4))   # permutations
    perms = set(map(tuple, order.tolist()))
    assert perms == set(itertools.permutations(range(4)))
    first = torch.bincount(order[:, 0], minlength=4).float() / n
    assert (first - 0.25).abs().max() < 0.02


def test_ranges_tuple_jitter_p_and_off():
    n = 4000
    aug = GPUAugment(crop_padding=2, flip_p=0.0, brightness=(0.5, 0.6), contrast=0, saturation=None,
                     hue=(-0.1, 0.3), jitter_p=0.25)
    p = aug.sample(n, generator=torch.Generator().manual_seed(11))
    assert p["crop_offsets"].min() == 0 and p["crop_offsets"].max() == 4
    assert not p["flip"].any()
    assert torch.all(p["contrast"] == 1) and torch.all(p["saturation"] == 1)
    applied = p["brightness"] != 1
    assert 0.22 < applied.float().mean() < 0.28
    assert torch.equal(applied, p["hue"] != 0)                 # one jitter_p draw per sample for all ops
    assert p["brightness"][applied].min() >= 0.5 and p["brightness"][applied].max() <= 0.6
    assert p["hue"][applied].min() >= -0.1 and p["hue"][applied].max() <= 0.3
    assert (p["hue"][applied] > 0.2).any() and (p["hue"][applied] < 0).any()
    assert GPUAugment(brightness=1.5).ranges["brightness"] == (0.0, 2.5)   # lower end clipped at 0
    for bad in (dict(hue=0.6), dict(brightness=-0.1), dict(contrast=(1.2, 0.8)), dict(flip_p=1.5),
                dict(crop_padding=-1), dict(mean=(0.5, 0.5, 0.5), std=None), dict(jitter_p=2)):
        with pytest.raises((ValueError, TypeError)):
            GPUAugment(**bad)


# ----------------------------------------------------------------------------- off switches / eval

def test_off_switches_give_pure_normalization():
    images = synthetic_images(8)
    aug = GPUAugment(**OFF)
    assert not aug.enabled
    p = aug.sample(8)
    assert torch.all(p["crop_offsets"] == 0) and not p["flip"].any()
    assert torch.all(p["brightness"] == 1) and torch.all(p["contrast"] == 1)
    assert torch.all(p["saturation"] == 1) and torch.all(p["hue"] == 0)
    expected = TF.normalize(TF.to_dtype(images, torch.float32, scale=True), list(IMAGENET_MEAN), list(IMAGENET_STD))
    torch.testing.assert_close(aug(images), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(aug(images), eval_transform(images), rtol=0, atol=1e-6)
    raw = GPUAugment(**OFF, mean=None, std=None)
    assert torch.equal(raw(images), unit(images))
    # with every jitter factor at identity (jitter_p=0), only crop + flip act
    cf = GPUAugment(jitter_p=0.0, mean=None, std=None)
    p = cf.sample(8, generator=torch.Generator().manual_seed(12))
    assert torch.all(p["brightness"] == 1) and torch.all(p["hue"] == 0)
    out = cf.apply(images, p)
    ref = reference(GPUAugment(flip_p=0.5, brightness=0, contrast=0, saturation=0, hue=0, mean=None, std=None),
                    images, p)
    assert torch.equal(out, ref)


def test_flip_only_and_crop_only_exact():
    images = synthetic_images(16)
    flip = GPUAugment(**dict(OFF, flip_p=0.5), mean=None, std=None)
    p = flip.sample(16, generator=torch.Generator().manual_seed(13))
    out = flip.apply(images, p)
    plain = unit(images)
    expected = torch.where(p["flip"].view(-1, 1, 1, 1), plain.flip(-1), plain)
    assert torch.equal(out, expected)
    crop = GPUAugment(**dict(OFF, crop_padding=4), mean=None, std=None)
    p = crop.sample(16, generator=torch.Generator().manual_seed(14))
    p["crop_offsets"][0] = torch.tensor([0, 0])
    p["crop_offsets"][1] = torch.tensor([8, 8])
    p["crop_offsets"][2] = torch.tensor([4, 4])
    out = crop.apply(images, p)
    assert torch.all(out[0, :, :4] == 0) and torch.all(out[0, :, :, :4] == 0)        # zero padding
    assert torch.equal(out[0, :, 4:, 4:], plain[0, :, :60, :60])
    assert torch.all(out[1, :, 60:] == 0) and torch.equal(out[1, :, :60, :60], plain[1, :, 4:, 4:])
    assert torch.equal(out[2], plain[2])                                               # centre = identity


def test_eval_transform_is_normalization_only():
    images = synthetic_images(8)
    expected = TF.normalize(TF.to_dtype(images, torch.float32, scale=True), list(IMAGENET_MEAN), list(IMAGENET_STD))
    for out in (eval_transform(images), EvalTransform()(images), GPUAugment().eval_transform(images),
                GPUAugment.from_config({"enabled": False})(images)):
        assert out.dtype == torch.float32 and out.shape == images.shape
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    assert torch.equal(eval_transform(images, mean=None, std=None), unit(images))
    other = eval_transform(images, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    torch.testing.assert_close(other, (unit(images) - 0.5) / 0.25, rtol=0, atol=1e-5)
    assert eval_transform(images, out_dtype="bfloat16").dtype == torch.bfloat16


def test_from_config():
    cfg = {"crop_padding": 2, "flip_p": 0.25, "brightness": 0.1, "contrast": [0.7, 1.1], "saturation": 0,
           "hue": 0.02, "jitter_p": 0.8, "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2],
           "out_dtype": "float16", "channels_last": True, "enabled": True}
    aug = GPUAugment.from_config(cfg)
    assert aug.crop_padding == 2 and aug.flip_p == 0.25 and aug.jitter_p == 0.8
    assert aug.ranges == {"brightness": (0.9, 1.1), "contrast": (0.7, 1.1), "saturation": None, "hue": (-0.02, 0.02)}
    assert aug.out_dtype == torch.float16 and aug.channels_last
    torch.testing.assert_close(aug.std.flatten(), torch.full((3,), 0.2))
    again = GPUAugment.from_config(aug.to_config())
    assert again.to_config() == aug.to_config()
    assert GPUAugment.from_config(None).to_config() == GPUAugment().to_config()
    assert GPUAugment.from_config({"hue": 0}, flip_p=0.0).flip_p == 0.0
    off = GPUAugment.from_config({"enabled": False, "brightness": 0.4, "mean": None, "std": None})
    assert not off.enabled and not off.normalize
    with pytest.raises(ValueError, match="unknown augment option"):
        GPUAugment.from_config({"brightnes": 0.2})


def test_for_model_reads_the_models_normalization():
    import timm

    import tinycnn  # noqa: F401
    model = timm.create_model("tinycnn", stage_channels=[8, 16, 32], stage_repeats=[1, 1, 1])
    model.pretrained_cfg = dict(model.pretrained_cfg, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    aug = GPUAugment.for_model(model, {"hue": 0}, channels_last=True)
    torch.testing.assert_close(aug.mean.flatten(), torch.tensor([0.5, 0.4, 0.3]))
    torch.testing.assert_close(aug.std.flatten(), torch.tensor([0.2, 0.25, 0.3]))
    assert aug.ranges["hue"] is None and aug.channels_last
    assert GPUAugment.for_model(timm.create_model("tinycnn")).to_config() == GPUAugment().to_config()


def _argsort_slot_plan(order, ops, hue_on):
    """The slot schedule computed directly from each order (what the lookup table must reproduce)."""
    n = len(ops)
    pos = order.argsort(dim=1)
    pos_e = torch.stack([pos[:, j] for j in ops], dim=1)
    rank = (pos_e.unsqueeze(1) < pos_e.unsqueeze(2)).sum(dim=2)
    if hue_on:
        slot = rank + (n - (pos_e < pos[:, 3:4]).sum(dim=1, keepdim=True))
    else:
        slot = rank
    which = torch.full((order.shape[0], 2 * n if hue_on else n), n, dtype=torch.long)
    return which.scatter_(1, slot, torch.arange(n).expand(order.shape[0], n))


@pytest.mark.parametrize("config", [{}, dict(contrast=0), dict(brightness=0, saturation=0), dict(hue=0),
                                    dict(brightness=0, contrast=0, hue=0)])
def test_slot_table_is_the_schedule_of_every_order(config):
    aug = GPUAugment(**config)
    if not aug._blend_ops:
        return
    order = torch.tensor(list(itertools.permutations(range(4))))
    which = aug._slot_table[(order * aug._order_code).sum(dim=1)]
    assert torch.equal(which, _argsort_slot_plan(order, aug._blend_ops, aug._hue_on))


def test_out_dtype_per_call_is_the_cast_of_the_float_result():
    images = synthetic_images(8)
    aug = GPUAugment(channels_last=True)
    params = aug.sample(8, generator=torch.Generator().manual_seed(21))
    out = aug.apply(images, params, out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, aug.apply(images, params).to(torch.bfloat16))
    assert aug.apply(images, params).dtype == torch.float32                # the instance's dtype otherwise


def test_sample_reads_nothing_back_to_the_host(monkeypatch):
    """sample() draws on the device: no .item()/.tolist()/bool() on a tensor (each is a host sync on CUDA)."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("host read in GPUAugment.sample")

    aug = GPUAugment(jitter_p=0.5)
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    params = aug.sample(16, generator=torch.Generator().manual_seed(22))
    monkeypatch.undo()
    assert set(params) == set(PARAM_KEYS) and params["hue"].shape == (16,)


# ----------------------------------------------------------------------------- shapes, dtypes, errors

def test_shapes_dtypes_and_memory_format():
    images = synthetic_images(8)
    aug = GPUAugment()
    out = aug(images)
    assert out.shape == (8, 3, 64, 64) and out.dtype == torch.float32 and out.is_contiguous()
    assert torch.equal(images, synthetic_images(8))                    # input untouched
    cl = images.contiguous(memory_format=torch.channels_last)
    p = aug.sample(8, generator=torch.Generator().manual_seed(15))
    out_cl = aug.apply(cl, p)
    assert out_cl.is_contiguous(memory_format=torch.channels_last) and not out_cl.is_contiguous()
    assert torch.equal(out_cl, aug.apply(images, p))
    assert eval_transform(cl).is_contiguous(memory_format=torch.channels_last)
    forced = GPUAugment(channels_last=True).apply(images, p)
    assert forced.is_contiguous(memory_format=torch.channels_last)
    half = GPUAugment(out_dtype=torch.bfloat16).apply(images, p)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), aug.apply(images, p), rtol=1e-2, atol=2e-2)
    small = aug(synthetic_images(3, 32, 48))
    assert small.shape == (3, 3, 32, 48)
    assert aug(synthetic_images(1)).shape == (1, 3, 64, 64)


def test_input_validation():
    aug = GPUAugment()
    images = synthetic_images(2)
    with pytest.raises(TypeError, match="uint8"):
        aug(unit(images))
    with pytest.raises(TypeError, match="uint8"):
        aug.apply(images.float(), aug.sample(2))
    with pytest.raises(TypeError, match="uint8"):
        eval_transform(images.float())
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        aug(images[0])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        aug(images[:, :1])
    with pytest.raises(TypeError):
        aug(images.numpy())


# ----------------------------------------------------------------------------- compile / devices

def test_no_host_sync_or_host_data_in_hot_path():
    """aug(x) and eval_transform(x) queue device work only: no .item()/bool() on device tensors and no
    tensors built from Python data (an H2D copy that stalls on CUDA)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    images = synthetic_images(4)
    aug = GPUAugment()
    with Record() as rec:
        aug(images, generator=torch.Generator().manual_seed(0))
        aug.eval_transform(images)
        eval_transform(images)
    assert "aten.gather" in rec.ops and "aten.amax" in rec.ops               # it did record the work
    bad = {op for op in rec.ops if op in ("aten._local_scalar_dense", "aten.lift_fresh", "aten.item",
                                             "aten.is_nonzero", "aten.nonzero")}
    assert not bad


def _check_compiled(aug, images, backend):
    compiled = torch.compile(aug.apply, backend=backend, fullgraph=True)   # fullgraph: no graph breaks
    for seed in (16, 17):
        params = aug.sample(len(images), generator=torch.Generator().manual_seed(seed),
                            device=images.device)
        eager = aug.apply(images, params)
        torch.testing.assert_close(compiled(images, params), eager, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    """torch.compile of apply traces as one graph and gives the eager result.  On CPU this uses the
    aot_eager backend: inductor's C++ compile of this graph takes 10-20 s on a small CPU (and is no
    faster than eager there); the inductor test below runs on CUDA."""
    _check_compiled(GPUAugment(), synthetic_images(8), "aot_eager")
    _check_compiled(GPUAugment(**dict(OFF, hue=0.1, flip_p=0.5)), synthetic_images(4), "aot_eager")


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor (triton) compile test needs CUDA")
def test_torch_compile_inductor_cuda():
    aug = GPUAugment().to("cuda")
    _check_compiled(aug, synthetic_images(64).cuda(), "inductor")


def _accelerators():
    devs = []
    if torch.cuda.is_available():
        devs.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devs.append("mps")
    return devs


@pytest.mark.skipif(not _accelerators(), reason="no CUDA or MPS device here")
@pytest.mark.parametrize("device", _accelerators())
def test_on_accelerator_matches_cpu(device):
    images = synthetic_images(16)
    aug = GPUAugment()
    params = aug.sample(16, generator=torch.Generator().manual_seed(18))
    dev_aug = GPUAugment().to(device)
    out = dev_aug.apply(images.to(device), {k: v.to(device) for k, v in params.items()})
    assert out.device.type == device
    assert (out.cpu() - aug.apply(images, params)).abs().mul(aug.std).max() <= TOL
    assert dev_aug(images.to(device)).device.type == device                # samples on the images' device
    assert dev_aug.sample(4)["flip"].device.type == device                  # default: the module's device
