"""tinycnn.augment's timm-recipe pieces: TrivialAugmentWide / RandAugment and random erasing inside
GPUAugment, the Mixup/CutMix wrapper, flip test-time augmentation.

The policies are replayed sample by sample against torchvision.transforms.v2.functional: each sample's
op (ops[i], magnitude bin, sign) is run with the functional op torchvision's policies call, with the
magnitude they pass, on the same uint8 image.  Random erasing is replayed against timm's own
RandomErasing, fed the same draws.  Mixup/CutMix is timm's; its tests check the per-sample mixing and
the soft-target loss by hand.
"""
import io
import math
import zipfile

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.io import ImageReadMode, decode_jpeg

from tinycnn.augment import (ERASE_PARAM_KEYS, PARAM_KEYS, POLICY_OPS, POLICY_PARAM_KEYS, GPUAugment, MixupCutmix,
                             policy_magnitudes, tta_flip_logits)

LEVEL = 1 / 255                              # one uint8 step in [0, 1] units
OFF = dict(crop_padding=0, flip_p=0.0, brightness=0, contrast=0, saturation=0, hue=0, mean=None, std=None)
SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness"}
# per-op tolerance against torchvision (on this CPU every op is bit-exact; the tolerances leave room for
# other float hardware): ops on whole numbers only must match exactly
EXACT_OPS = {"Identity", "TranslateX", "TranslateY", "Posterize", "Solarize", "AutoContrast", "Equalize"}
# float blends then the uint8 truncation: a rounding difference moves a pixel by one level
BLEND_OPS = {"Brightness", "Color", "Contrast", "Sharpness"}
BLEND_MAX_FRACTION = 0.01                    # of pixels one level off, at most
# nearest sampling at float coordinates: a coordinate on the other side of a pixel edge takes the
# neighbour's value (any difference), so bound the share of such pixels instead
SAMPLED_OPS = {"ShearX", "ShearY", "Rotate"}
SAMPLED_MAX_FRACTION = 0.002


# ----------------------------------------------------------------------------- images and the reference

@pytest.fixture(scope="module")
def sample_images(sample_zip):
    """62 Tiny ImageNet train JPEGs (the real sample, or the synthetic one without it) spread over the classes,
    plus a grayscale one, uint8."""
    from PIL import Image

    with zipfile.ZipFile(sample_zip) as z:
        names = sorted(n for n in z.namelist() if "/train/" in n and n.endswith(".JPEG"))
        picked = names[::len(names) // 61][:61]
        picked.append(next(n for n in names if Image.open(io.BytesIO(z.read(n))).mode == "L"))
        imgs = [decode_jpeg(torch.frombuffer(bytearray(z.read(n)), dtype=torch.uint8), mode=ImageReadMode.RGB)
                for n in picked]
    return torch.stack(imgs)


def synthetic_images(b=31, h=40, w=56, seed=0):
    """Random uint8 images with flat channels, gray rows, 0 and 255: the edge cases of AutoContrast,
    Equalize, Solarize and Color."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=g)
    x[:, :, :4] = x[:, :1, :4]                 # gray rows
    x[:, :, 4:6] = 255
    x[:, :, 6:8] = 0
    x[0] = 77                                  # a flat image
    x[1, 1] = 200                              # a flat channel
    x[2] = x[2] // 64 * 64                     # four values only
    return x


def torchvision_op(image, name, magnitude, fill=None):
    """The call torchvision.transforms.v2's TrivialAugmentWide/RandAugment make for op `name` at
    `magnitude` (their _apply_image_or_video_transform), on one uint8 image (3, H, W)."""
    nearest = TF.InterpolationMode.NEAREST
    if name == "Identity":
        return image
    if name in ("ShearX", "ShearY"):
        shear = math.degrees(math.atan(magnitude))
        return TF.affine(image, angle=0.0, translate=[0, 0], scale=1.0, interpolation=nearest, fill=fill,
                         shear=[shear, 0.0] if name == "ShearX" else [0.0, shear], center=[0, 0])
    if name in ("TranslateX", "TranslateY"):
        shift = [int(magnitude), 0] if name == "TranslateX" else [0, int(magnitude)]
        return TF.affine(image, angle=0.0, translate=shift, scale=1.0, interpolation=nearest, shear=[0.0, 0.0],
                         fill=fill)
    if name == "Rotate":
        return TF.rotate(image, angle=magnitude, interpolation=nearest, fill=fill)
    if name == "Brightness":
        return TF.adjust_brightness(image, brightness_factor=1.0 + magnitude)
    if name == "Color":
        return TF.adjust_saturation(image, saturation_factor=1.0 + magnitude)
    if name == "Contrast":
        return TF.adjust_contrast(image, contrast_factor=1.0 + magnitude)
    if name == "Sharpness":
        return TF.adjust_sharpness(image, sharpness_factor=1.0 + magnitude)
    if name == "Posterize":
        return TF.posterize(image, bits=int(magnitude))
    if name == "Solarize":
        return TF.solarize(image, threshold=255.0 * magnitude)
    if name == "AutoContrast":
        return TF.autocontrast(image)
    if name == "Equalize":
        return TF.equalize(image)
    raise ValueError(name)


def signed_magnitude(table, op, bin_, negate):
    m = float(table[op, bin_])
    return -m if negate and POLICY_OPS[op] in SIGNED else m


def policy_reference(images, params, policy, fill=None, bins=31):
    """Every sample's ops in order, with torchvision's functional ops, one sample at a time (uint8)."""
    out = []
    for i in range(images.shape[0]):
        x = images[i]
        table = policy_magnitudes(policy, bins, *x.shape[-2:])
        for op, bin_, negate in zip(params["policy_ops"][i].tolist(), params["policy_bins"][i].tolist(),
                                    params["policy_negate"][i].tolist()):
            x = torchvision_op(x, POLICY_OPS[op], signed_magnitude(table, op, bin_, negate), fill)
        out.append(x)
    return torch.stack(out)


def one_op_params(aug, images, op, seed=0):
    """Params giving every sample op `op` with every magnitude bin in turn and both signs."""
    B = images.shape[0]
    params = aug.sample(B, generator=torch.Generator().manual_seed(seed))
    n = aug.policy_bins
    bins = torch.arange(B) % n if aug.policy == "trivialaugment" else torch.full((B,), aug.ra_magnitude)
    negate = (torch.arange(B) // n + torch.arange(B)) % 2 == 1
    params.update(policy_ops=torch.full((B, 1), op), policy_bins=bins.view(B, 1), policy_negate=negate.view(B, 1))
    return params


def as_uint8(out):
    """[0, 1] floats holding whole uint8 levels -> uint8 (the policies' output is a uint8 image's floats)."""
    return (out * 255).round().to(torch.uint8)


def assert_op_matches(name, out, ref):
    diff = (out.int() - ref.int()).abs()
    wrong = (diff > 0).float().mean().item()
    if name in EXACT_OPS:
        assert torch.equal(out, ref), f"{name}: {wrong:.2%} of pixels differ, up to {diff.max().item()} levels"
    elif name in BLEND_OPS:
        assert diff.max() <= 1 and wrong <= BLEND_MAX_FRACTION, f"{name}: {wrong:.2%} differ, max {diff.max().item()}"
    else:
        assert name in SAMPLED_OPS
        assert wrong <= SAMPLED_MAX_FRACTION, f"{name}: {wrong:.3%} of pixels differ"
    return wrong


# ----------------------------------------------------------------------------- the op set and bins

@pytest.mark.parametrize("policy", ["trivialaugment", "randaugment"])
def test_magnitude_bins_are_torchvisions(policy):
    """The op set, order, sign flags and bins of torchvision's own policy classes (their
    _AUGMENTATION_SPACE), at a square and an oblong size (RandAugment's translations scale with it)."""
    import torchvision.transforms.v2 as v2

    cls = v2.TrivialAugmentWide if policy == "trivialaugment" else v2.RandAugment
    space = getattr(cls, "_AUGMENTATION_SPACE", None)
    if space is None:
        pytest.skip("this torchvision keeps its policy table elsewhere")
    assert tuple(space) == POLICY_OPS
    assert {name for name, (_, signed) in space.items() if signed} == SIGNED
    for h, w in ((64, 64), (40, 56)):
        ours = policy_magnitudes(policy, 31, h, w)
        for k, (fn, _) in enumerate(space.values()):
            theirs = fn(31, h, w)
            if theirs is None:
                assert torch.all(ours[k] == 0)
            else:
                assert torch.equal(ours[k], theirs.float()), POLICY_OPS[k]
    assert torch.equal(policy_magnitudes(policy, 11)[10], cls._AUGMENTATION_SPACE["Posterize"][0](11, 64, 64).float())


def test_reference_is_torchvisions_dispatch():
    """torchvision_op above makes the same call as torchvision's policies (their private dispatch)."""
    import torchvision.transforms.v2 as v2

    ta = v2.TrivialAugmentWide()
    dispatch = getattr(ta, "_apply_image_or_video_transform", None)
    if dispatch is None:
        pytest.skip("this torchvision dispatches its policy ops elsewhere")
    images = synthetic_images(4, 24, 32)
    table = policy_magnitudes("trivialaugment", 31)
    for k, name in enumerate(POLICY_OPS):
        for bin_ in (0, 7, 20, 30):
            for negate in (False, True):
                m = signed_magnitude(table, k, bin_, negate)
                theirs = dispatch(images[bin_ % 4], name, m, interpolation=ta.interpolation, fill=ta._fill)
                assert torch.equal(torchvision_op(images[bin_ % 4], name, m), theirs), (name, m)


# ----------------------------------------------------------------------------- each op against torchvision

@pytest.mark.parametrize("policy", ["trivialaugment", "randaugment"])
@pytest.mark.parametrize("name", POLICY_OPS)
def test_each_policy_op_matches_torchvision(sample_images, policy, name):
    """Every sample gets op `name` (TrivialAugmentWide: each of the 31 bins, both signs; RandAugment:
    bin 9, both signs), batched; torchvision's functional op on each image must agree."""
    aug = GPUAugment(**OFF, policy=policy, ra_num_ops=1)
    op = POLICY_OPS.index(name)
    params = one_op_params(aug, sample_images, op)
    out = aug.apply(sample_images, params)
    assert torch.equal(out, TF.to_dtype(as_uint8(out), torch.float32, scale=True))   # whole uint8 levels
    out = as_uint8(out)
    assert_op_matches(name, out, policy_reference(sample_images, params, policy))
    changed = (out != sample_images).flatten(1).any(1).float().mean()
    if name == "Identity":
        assert changed == 0
    else:   # the op acts (bin 0 is the identity for most ops, and some images are already "auto-contrasted")
        assert changed > (0.2 if name == "AutoContrast" else 0.5), f"{name} changed only {changed:.0%} of the images"


@pytest.mark.parametrize("name", POLICY_OPS)
def test_each_policy_op_matches_torchvision_oblong_with_fill(name):
    """The same on 40 x 56 synthetic images full of edge cases, with a fill colour for the affine ops
    (RandAugment at magnitude 30: its strongest, translations scaled to the oblong image)."""
    images = synthetic_images()
    fill = (124, 116, 104)
    for policy, kwargs in (("trivialaugment", {}), ("randaugment", dict(ra_magnitude=30))):
        aug = GPUAugment(**OFF, policy=policy, ra_num_ops=1, policy_fill=fill, **kwargs)
        params = one_op_params(aug, images, POLICY_OPS.index(name), seed=1)
        out = as_uint8(aug.apply(images, params))
        assert_op_matches(name, out, policy_reference(images, params, policy, fill=list(fill)))
    if name in ("TranslateX", "Rotate"):            # the fill colour shows where the image moved away
        assert (out == torch.tensor(fill, dtype=torch.uint8).view(1, 3, 1, 1)).all(1).any()


@pytest.mark.parametrize("policy", ["trivialaugment", "randaugment"])
def test_composed_pipeline_matches_torchvision(sample_images, policy):
    """crop + flip, then the policy's own random ops (RandAugment: 2 per sample, in order), then the default
    colour jitter and normalization, against torchvision's functional ops sample by sample."""
    aug = GPUAugment(policy=policy)
    params = aug.sample(len(sample_images), generator=torch.Generator().manual_seed(5))
    out = aug.apply(sample_images, params)
    mean, std = aug.mean.flatten().tolist(), aug.std.flatten().tolist()
    adjust = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
              "saturation": TF.adjust_saturation, "hue": TF.adjust_hue}
    cropped = []
    for i, img in enumerate(sample_images):
        top, left = params["crop_offsets"][i].tolist()
        img = TF.crop(TF.pad(img, [4]), top, left, 64, 64)
        cropped.append(TF.horizontal_flip(img) if params["flip"][i] else img)
    after_policy = policy_reference(torch.stack(cropped), params, policy)
    ref = []
    for i, img in enumerate(after_policy):
        x = TF.to_dtype(img, torch.float32, scale=True)
        for j in params["jitter_order"][i].tolist():
            name = ("brightness", "contrast", "saturation", "hue")[j]
            x = adjust[name](x, float(params[name][i]))
        ref.append(TF.normalize(x, mean, std))
    err = (out - torch.stack(ref)).abs() * aug.std
    assert err.max() <= 2 * LEVEL and err.mean() <= 1e-4, f"max {err.max() * 255:.2f}/255, mean {err.mean():.1e}"
    assert params["policy_ops"].shape == (len(sample_images), 1 if policy == "trivialaugment" else 2)


# ----------------------------------------------------------------------------- sampling

@pytest.mark.parametrize("policy", ["trivialaugment", "randaugment"])
def test_policy_draws(policy):
    n = 28000
    aug = GPUAugment(policy=policy, ra_num_ops=3, ra_magnitude=12)
    p = aug.sample(n, generator=torch.Generator().manual_seed(6))
    steps = 1 if policy == "trivialaugment" else 3
    assert set(p) == set(PARAM_KEYS) | set(POLICY_PARAM_KEYS)
    ops, bins, negate = p["policy_ops"], p["policy_bins"], p["policy_negate"]
    assert ops.shape == bins.shape == negate.shape == (n, steps)
    assert ops.dtype == bins.dtype == torch.int64 and negate.dtype == torch.bool
    op_share = torch.bincount(ops.flatten(), minlength=len(POLICY_OPS)).float() / ops.numel()
    assert (op_share - 1 / len(POLICY_OPS)).abs().max() < 0.01               # uniform over the 14 ops
    assert abs(negate.float().mean() - 0.5) < 0.01
    if policy == "trivialaugment":
        bin_share = torch.bincount(bins.flatten(), minlength=31).float() / bins.numel()
        assert bins.min() == 0 and bins.max() == 30 and (bin_share - 1 / 31).abs().max() < 0.008
    else:
        assert torch.all(bins == 12)
        assert (ops[:, 0] != ops[:, 1]).float().mean() > 0.9                  # each op drawn on its own
    # each sample its own draw, and the default draws are not disturbed by the policy's
    assert len(set(map(tuple, torch.cat([ops, bins], 1)[:64].tolist()))) > 50
    plain = GPUAugment().sample(n, generator=torch.Generator().manual_seed(6))
    for key in PARAM_KEYS:
        assert torch.equal(p[key], plain[key]), key


def test_defaults_are_unchanged():
    """Every new option is off by default: same params, same output, same config as before."""
    images = synthetic_images(8, 64, 64)
    aug = GPUAugment()
    assert aug.policy is None and aug.erase_p == 0 and aug.policy_steps == 0
    p = aug.sample(8, generator=torch.Generator().manual_seed(7), image_size=(64, 64))
    assert set(p) == set(PARAM_KEYS)
    assert not set(p) & (set(POLICY_PARAM_KEYS) | set(ERASE_PARAM_KEYS))
    explicit = GPUAugment(policy=None, erase_p=0.0)
    torch.testing.assert_close(explicit.apply(images, p), aug.apply(images, p), rtol=0, atol=0)
    assert not GPUAugment(**OFF).enabled
    assert GPUAugment(**OFF, policy="trivialaugment").enabled and GPUAugment(**OFF, erase_p=0.1).enabled
    assert not GPUAugment(**OFF, policy="randaugment", ra_num_ops=0).enabled


# ----------------------------------------------------------------------------- config

def test_config_keys_round_trip_and_enabled_false():
    cfg = {"policy": "randaugment", "ra_num_ops": 3, "ra_magnitude": 15, "policy_bins": 21,
           "policy_fill": [124, 116, 104], "erase_p": 0.25, "erase_mode": "rand", "erase_count": 2,
           "erase_area": [0.05, 0.2], "erase_aspect": [0.5, 2.0], "hue": 0}
    aug = GPUAugment.from_config(cfg)
    assert (aug.policy, aug.ra_num_ops, aug.ra_magnitude, aug.policy_bins) == ("randaugment", 3, 15, 21)
    assert aug.policy_steps == 3
    assert aug.policy_fill == (124.0, 116.0, 104.0) and aug.erase_area == (0.05, 0.2)
    assert (aug.erase_p, aug.erase_mode, aug.erase_count) == (0.25, "rand", 2)
    again = GPUAugment.from_config(aug.to_config())
    assert again.to_config() == aug.to_config()
    assert GPUAugment.from_config({"policy": "TrivialAugmentWide"}).policy == "trivialaugment"
    off = GPUAugment.from_config({**cfg, "enabled": False})
    assert off.policy is None and off.erase_p == 0 and not off.enabled
    assert "policy=randaugment" in repr(aug) and "erase_p=0.25" in repr(aug)


@pytest.mark.parametrize("bad", [dict(policy="autoaugment"), dict(ra_num_ops=-1), dict(ra_num_ops=1.5),
                                 dict(ra_magnitude=31), dict(policy_bins=1), dict(policy_fill=(300, 0, 0)),
                                 dict(policy_fill=(1, 2)), dict(policy_fill="red"), dict(erase_p=1.5),
                                 dict(erase_p="0.5"), dict(erase_mode="noise"), dict(erase_count=0),
                                 dict(erase_area=(0.5, 0.1)), dict(erase_area=0.3), dict(erase_aspect=(0, 2)),
                                 # a config's cost stays bounded: no endless op chains, boxes or bins
                                 dict(ra_num_ops=10 ** 9), dict(erase_count=10 ** 9), dict(policy_bins=10 ** 9)])
def test_bad_options_are_one_line_errors(bad):
    with pytest.raises(ValueError) as info:
        GPUAugment(**bad)
    assert "\n" not in str(info.value) and list(bad)[0] in str(info.value)


# ----------------------------------------------------------------------------- random erasing vs timm

class ReplayRandom:
    """Stands in for the `random` module inside timm.data.random_erasing, serving the draws in `params`
    in the order timm's RandomErasing asks for them (per sample: apply?, count, per box the attempts'
    area and aspect uniforms, then the corner)."""

    def __init__(self, params, p, noise=None):
        self.params, self.p = params, p
        self.noise = noise
        self.i = -1

    def random(self):                                 # timm: erase when random() <= probability
        self.i += 1
        self.k = self.t = self.half = 0
        self.corner = []
        return 0.0 if bool(self.params["erase_apply"][self.i]) else min(1.0, self.p + (1 - self.p) / 2)

    def randint(self, a, b):
        if a == 1:                                    # the box count, 1..max_count
            return int(self.params["erase_count"][self.i])
        u = float(self.params["erase_position"][self.i, self.k, len(self.corner)])
        value = a + int(u * (b - a + 1))
        self.corner.append(value)
        if len(self.corner) == 2:                     # top, left: the box is placed, the next one starts
            self.box = (self.i, self.k, *self.corner)
            self.k, self.t, self.corner = self.k + 1, 0, []
        return value

    def uniform(self, a, b):
        if self.t == 10:                              # no attempt fitted: timm moves on to the next box
            self.k, self.t = self.k + 1, 0
        u = float(self.params["erase_attempts"][self.i, self.k, self.t, self.half])
        self.half ^= 1
        self.t += self.half == 0
        return a + (b - a) * u

    def pixels(self, per_pixel, rand_color, patch_size, dtype=torch.float32, device="cpu"):
        """timm's _get_pixels, with our noise / colours at the box it is filling."""
        i, k, top, left = self.box
        c, h, w = patch_size
        if per_pixel:
            return self.noise[i, :, top:top + h, left:left + w].to(dtype)
        if rand_color:
            return self.params["erase_colors"][i, k].view(c, 1, 1).to(dtype)
        return torch.zeros((c, 1, 1), dtype=dtype)


@pytest.mark.parametrize("mode", ["pixel", "rand", "const"])
@pytest.mark.parametrize("count", [1, 3])
def test_erasing_matches_timm_random_erasing(monkeypatch, mode, count):
    """GPUAugment's batched erasing = timm's RandomErasing (per-sample loop) fed the same draws, on the
    normalized batch."""
    import timm.data.random_erasing as timm_re

    images = synthetic_images(48, 40, 56)
    kwargs = dict(crop_padding=2, erase_mode=mode, erase_count=count, erase_area=(0.02, 0.6))
    aug = GPUAugment(**kwargs, erase_p=0.6)
    params = aug.sample(48, generator=torch.Generator().manual_seed(8), image_size=(40, 56))
    assert set(ERASE_PARAM_KEYS) <= set(params)
    assert ("erase_noise" in params) == (mode == "pixel") and ("erase_colors" in params) == (mode == "rand")
    ours = aug.apply(images, params)
    before = GPUAugment(**kwargs).apply(images, params)                # the same without erasing
    replay = ReplayRandom(params, 0.6, params.get("erase_noise"))
    monkeypatch.setattr(timm_re, "random", replay)
    monkeypatch.setattr(timm_re, "_get_pixels", replay.pixels)
    eraser = timm_re.RandomErasing(0.6, min_area=0.02, max_area=0.6, mode=mode, max_count=count, device="cpu")
    theirs = eraser(before.clone())
    assert replay.i == 47                                              # timm asked for every sample's draws
    assert torch.equal(ours, theirs)
    erased = (ours != before).flatten(1).any(1)
    assert 0.4 < erased.float().mean() < 0.8 and torch.equal(erased, params["erase_apply"] & erased)


def test_erasing_boxes_follow_timms_distribution():
    """Boxes of timm's sizes: per erased sample 2%..1/3 of the image, erase_p of the samples."""
    n = 3000
    aug = GPUAugment(**dict(OFF, erase_p=0.25, erase_mode="const"))
    images = torch.full((n, 3, 32, 32), 255, dtype=torch.uint8)
    out = aug(images, generator=torch.Generator().manual_seed(9))
    erased_area = (out[:, 0] == 0).flatten(1).float().mean(1)
    hit = erased_area > 0
    assert 0.22 < hit.float().mean() < 0.28
    assert torch.all((out == 0) | (out == 1))                         # only erasing happened
    # rounding h and w moves the area a little around the bounds
    assert erased_area[hit].min() >= 0.01 and erased_area[hit].max() <= 0.40
    assert 0.12 < erased_area[hit].mean() < 0.22                       # ~ (0.02 + 1/3) / 2, less the misfits
    # and each box is a rectangle: its rows and columns span exactly its pixel count
    for i in hit.nonzero().flatten()[:20].tolist():
        mask = out[i, 0] == 0
        rows, cols = mask.any(1).sum(), mask.any(0).sum()
        assert rows * cols == mask.sum()


def test_erasing_noise_drawn_in_apply_and_reproducible():
    """Without erase_noise in params (TrainStep's sample() call) apply draws N(0, 1) noise itself; pixels
    outside the boxes are the unerased output; aug(x, generator) is reproducible from the generator."""
    images = synthetic_images(64, 64, 64)
    aug = GPUAugment(erase_p=1.0, erase_area=(0.2, 0.3))
    params = aug.sample(64, generator=torch.Generator().manual_seed(10))
    assert "erase_noise" not in params
    torch.manual_seed(0)
    out = aug.apply(images, params)
    torch.manual_seed(0)
    assert torch.equal(out, aug.apply(images, params))
    plain = GPUAugment().apply(images, params)
    erased = out != plain
    assert erased.flatten(1).any(1).all()
    noise = out[erased]
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05
    g = lambda: torch.Generator().manual_seed(11)                      # noqa: E731
    assert torch.equal(aug(images, generator=g()), aug(images, generator=g()))


# ----------------------------------------------------------------------------- host syncs, compile

def test_policies_and_erasing_queue_device_work_only(monkeypatch):
    """No .item()/bool()/nonzero and no tensors from Python data in sample() or apply()."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    images = synthetic_images(6, 32, 32)
    augs = [GPUAugment(policy="trivialaugment", erase_p=0.5, policy_fill=(124, 116, 104)),
            GPUAugment(policy="randaugment", erase_p=0.5, erase_mode="rand", erase_count=2)]
    with Record() as rec:
        for aug in augs:
            aug(images, generator=torch.Generator().manual_seed(0))
            aug.apply(images, aug.sample(6))
    assert {"aten.grid_sampler_2d", "aten.scatter_add_", "aten.addcmul"} <= rec.ops     # it recorded the work
    bad = {op for op in rec.ops if op in ("aten._local_scalar_dense", "aten.lift_fresh", "aten.item",
                                           "aten.is_nonzero", "aten.nonzero")}
    assert not bad

    def refuse(self, *args, **kwargs):
        raise AssertionError("host read in GPUAugment.sample")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for aug in augs:
        aug.sample(6, generator=torch.Generator().manual_seed(1), image_size=(32, 32))


@pytest.mark.slow
def test_policies_and_erasing_compile_to_one_graph():
    """apply() under torch.compile(fullgraph=True) (no graph breaks) gives the eager result.  aot_eager on
    the CPU, as tests/test_augment.py does (inductor's CPU compile is slow and no faster here)."""
    images = synthetic_images(8, 32, 32)
    for aug in (GPUAugment(policy="trivialaugment", erase_p=0.5), GPUAugment(policy="randaugment", erase_p=0.5,
                                                                               erase_mode="rand")):
        compiled = torch.compile(aug.apply, backend="aot_eager", fullgraph=True)
        for seed in (12, 13):
            params = aug.sample(8, generator=torch.Generator().manual_seed(seed), image_size=(32, 32))
            torch.testing.assert_close(compiled(images, params), aug.apply(images, params), rtol=0, atol=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA (eager and inductor) check: no CUDA device here")
def test_policies_and_erasing_on_cuda_match_the_cpu():
    """On CUDA, eager and inductor-compiled apply() agree with the CPU.  Fused float maths may round a blend
    or a grayscale the other way, a uint8 level that later ops (Equalize, Posterize) can carry on, so bound
    the share of pixels off by more than a level rather than ask for equality."""
    images = synthetic_images(64, 64, 64)
    for kwargs in (dict(policy="trivialaugment", erase_p=0.5), dict(policy="randaugment", erase_p=0.5,
                                                                      erase_mode="rand", policy_fill=128)):
        aug = GPUAugment(**kwargs)
        params = aug.sample(64, generator=torch.Generator().manual_seed(19), image_size=(64, 64))
        on_cpu = aug.apply(images, params)
        cuda_aug = GPUAugment(**kwargs).to("cuda")
        cuda_params = {k: v.cuda() for k, v in params.items()}
        eager = cuda_aug.apply(images.cuda(), cuda_params)
        compiled = torch.compile(cuda_aug.apply, fullgraph=True)(images.cuda(), cuda_params)
        for out in (eager, compiled):
            off = ((out.cpu() - on_cpu).abs() * aug.std > 1.5 * LEVEL).float().mean()
            assert off < 0.005, f"{kwargs}: {off:.3%} of pixels more than a level off the CPU"


# ----------------------------------------------------------------------------- mixup / cutmix

def constant_batch(values, size=16):
    """(B, 3, size, size) float images, image i filled with values[i]."""
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, size, size).clone()


def smoothed_one_hot(labels, num_classes, smoothing):
    t = torch.full((len(labels), num_classes), smoothing / num_classes, dtype=torch.float64)
    t[torch.arange(len(labels)), labels] += 1 - smoothing
    return t


def test_mixup_elem_mixes_each_sample_and_soft_loss_is_the_hand_computation():
    import numpy as np

    B, C, smoothing = 32, 40, 0.1
    values = torch.arange(B, dtype=torch.float64) * 3 + 1           # all distinct
    labels = torch.arange(B) % C
    np.random.seed(14)
    mix = MixupCutmix(C, mixup_alpha=0.8, label_smoothing=smoothing)
    x, targets = mix(constant_batch(values.tolist()), labels)
    assert targets.shape == (B, C) and targets.dtype == torch.float32
    mirror = values.flip(0)
    lam = (x[:, 0, 0, 0].double() - mirror) / (values - mirror)      # x_i = lam_i x_i + (1 - lam_i) x_{B-1-i}
    assert torch.allclose(x.double(), x[:, :1, :1, :1].double().expand_as(x))    # still constant: a blend
    assert ((lam >= -1e-5) & (lam <= 1 + 1e-5)).all()
    assert len(set(lam.round(decimals=4).tolist())) > B // 2        # per sample, not one lambda per batch
    expected = lam.view(-1, 1) * smoothed_one_hot(labels, C, smoothing) \
        + (1 - lam.view(-1, 1)) * smoothed_one_hot(labels.flip(0), C, smoothing)
    torch.testing.assert_close(targets.double(), expected, rtol=0, atol=1e-5)
    logits = torch.randn(B, C, generator=torch.Generator().manual_seed(15))
    log_p = logits.double() - torch.logsumexp(logits.double(), dim=1, keepdim=True)
    by_hand = -(expected * log_p).sum(1).mean()
    assert abs(mix.loss(logits, targets).item() - by_hand.item()) < 1e-5


def test_cutmix_elem_targets_are_the_pasted_area():
    """Per sample, the share of the image pasted from the mirror sample is that sample's target weight."""
    import numpy as np

    B, C = 24, 24
    values = (torch.arange(B, dtype=torch.float32) + 1).tolist()
    np.random.seed(16)
    mix = MixupCutmix(C, cutmix_alpha=1.0, label_smoothing=0.0)
    x, targets = mix(constant_batch(values, 20), torch.arange(B))
    mirror = torch.tensor(values).flip(0)
    pasted = (x[:, 0] == mirror.view(-1, 1, 1)).flatten(1).float().mean(1)
    kept = (x[:, 0] == torch.tensor(values).view(-1, 1, 1)).flatten(1).float().mean(1)
    torch.testing.assert_close(pasted + kept, torch.ones(B))
    torch.testing.assert_close(targets[torch.arange(B), torch.arange(B).flip(0)], pasted, rtol=0, atol=1e-6)
    torch.testing.assert_close(targets[torch.arange(B), torch.arange(B)], kept, rtol=0, atol=1e-6)
    assert len(set(pasted.tolist())) > B // 2


def test_mixup_odd_batch_and_bad_options():
    import numpy as np

    np.random.seed(17)
    mix = MixupCutmix(5, mixup_alpha=1.0, label_smoothing=0.2)
    x = constant_batch([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], 4)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    out, targets = mix(x, labels)
    assert out.shape == (7, 3, 4, 4) and targets.shape == (7, 5)
    assert torch.all(out[6] == 7.0)                                   # the odd one out is not mixed
    torch.testing.assert_close(targets[6], smoothed_one_hot(labels[6:], 5, 0.2)[0].float())
    torch.testing.assert_close(targets.sum(1), torch.ones(7))
    assert not torch.equal(out[:6], constant_batch([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 4))
    for bad in (dict(), dict(mixup_alpha=-1.0), dict(mixup_alpha=1.0, mode="half"), dict(cutmix_alpha=1.0, prob=2),
                dict(mixup_alpha=1.0, label_smoothing=1.0)):
        with pytest.raises(ValueError) as info:
            MixupCutmix(5, **bad)
        assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- flip TTA

def test_tta_flip_logits_is_the_mean_of_both_views():
    torch.manual_seed(18)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 10 * 10, 6)).eval()
    x = torch.randn(5, 3, 12, 12)
    with torch.no_grad():
        tta = tta_flip_logits(model, x)
        plain, mirrored = model(x), model(x.flip(-1))
        assert tta.shape == (5, 6) and tta.dtype == torch.float32
        torch.testing.assert_close(tta, (plain + mirrored) / 2, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(tta, plain, atol=1e-3)               # the model is not mirror-symmetric
        torch.testing.assert_close(tta_flip_logits(model, x.flip(-1)), tta, rtol=1e-5, atol=1e-6)  # but TTA is
        half = tta_flip_logits(lambda t: model(t.float()).to(torch.bfloat16), x)
        assert half.dtype == torch.float32
