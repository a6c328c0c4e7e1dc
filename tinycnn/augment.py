"""Batched, device-side data augmentation for 64x64 RGB images (pure torch).

The CPU only decodes JPEGs into ``uint8`` batches ``(B, 3, H, W)``; everything else runs
batched on the images' device (CUDA, MPS or CPU) with per-sample randomness and no Python
loop over samples.  The defaults reproduce the original course project's torchvision
training pipeline::

    RandomCrop(64, padding=4)              # zero padding
    RandomHorizontalFlip(p=0.5)
    ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05)
    ToTensor() / ToDtype(float32, scale=True)
    Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))

with torchvision's semantics for each op (factor ranges ``[1-x, 1+x]``, hue in ``[-h, h]``,
the four colour adjustments in a random order per sample, contrast blending with the mean of
each image's grayscale, saturation blending with the grayscale image, hue through HSV, a
clamp to ``[0, 1]`` after every op).

Usage::

    aug = GPUAugment().to(device)          # or GPUAugment.from_config(cfg["augment"])
    aug = GPUAugment.for_model(model, cfg["augment"]).to(device)   # mean/std from the model's pretrained_cfg
    x = aug(images_uint8)                  # train: sample + apply, float32, normalized
    x = aug.eval_transform(images_uint8)   # val / test: uint8 -> [0, 1] -> normalize
    x = eval_transform(images_uint8)       # the same as a plain function

Replaying::

    params = aug.sample(B, generator=g, device=device)   # dict of per-sample tensors
    x = aug.apply(images_uint8, params)                   # deterministic given params

``params`` holds ``crop_offsets`` (B, 2) int64 (top, left) in the padded image (0..2*padding),
``flip`` (B,) bool, ``brightness``/``contrast``/``saturation`` (B,) float factors (1 = identity),
``hue`` (B,) float shift (0 = identity) and ``jitter_order`` (B, 4) int64, a permutation of
0=brightness 1=contrast 2=saturation 3=hue per sample.  ``apply`` runs crop, flip, the colour
ops in each sample's order, then normalization; ops switched off in the instance are skipped
(their factors in ``params`` are ignored).  ``apply`` works under ``torch.compile`` as one graph
(tinycnn.step.TrainStep compiles it by default on CUDA) and takes ``out_dtype`` (e.g. the autocast
dtype, so the cast is part of its last pass).  ``sample`` keeps every draw on the device (no host sync).

Recipe pieces of timm's train.py, all off by default::

    GPUAugment(policy="trivialaugment")                  # torchvision TrivialAugmentWide, per sample
    GPUAugment(policy="randaugment", ra_num_ops=2, ra_magnitude=9)
    GPUAugment(erase_p=0.25, erase_mode="pixel")        # timm RandomErasing, after normalization
    MixupCutmix(num_classes, mixup_alpha=0.8, cutmix_alpha=1.0)   # timm Mixup (mode='elem') + soft targets
    tta_flip_logits(model, x)                            # mean logits of x and its mirror image

A policy runs after crop and flip on the uint8 values, before the colour jitter, with torchvision's op
set, magnitude bins, signs and uint8 semantics (nearest sampling and zero / ``policy_fill`` fill for the
affine ops, the uint8 truncation after each op); each sample draws its own ops and magnitudes.  Its
params are ``policy_ops`` (B, n) int64 indices into POLICY_OPS, ``policy_bins`` (B, n) int64 magnitude
bins and ``policy_negate`` (B, n) bool (the sign of the signed ops), n = 1 for TrivialAugmentWide and
``ra_num_ops`` for RandAugment.  Random erasing's params are timm's draws as uniforms: ``erase_apply``
(B,) bool, ``erase_count`` (B,) int64, ``erase_attempts`` (B, K, 10, 2) and ``erase_position`` (B, K, 2)
with K = ``erase_count``, plus ``erase_colors`` (B, K, 3) in mode 'rand' and, in mode 'pixel',
``erase_noise`` (B, 3, H, W) when ``sample`` is given ``image_size`` (``aug(x)`` does so; without it
``apply`` draws the noise from torch's RNG).
"""
from __future__ import annotations

import itertools
import math
import numbers
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

__all__ = [
    "JITTER_OPS",
    "PARAM_KEYS",
    "POLICIES",
    "POLICY_OPS",
    "POLICY_PARAM_KEYS",
    "ERASE_MODES",
    "ERASE_PARAM_KEYS",
    "GPUAugment",
    "EvalTransform",
    "eval_transform",
    "policy_magnitudes",
    "MixupCutmix",
    "tta_flip_logits",
]

#: the colour ops in the numbering used by ``params["jitter_order"]``
JITTER_OPS: Tuple[str, str, str, str] = ("brightness", "contrast", "saturation", "hue")
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
#: the keys of the dict returned by :meth:`GPUAugment.sample`
PARAM_KEYS: Tuple[str, ...] = ("crop_offsets", "flip", "brightness", "contrast", "saturation", "hue",
                               "jitter_order")

#: the augmentation policies GPUAugment(policy=...) runs (torchvision.transforms.v2's TrivialAugmentWide, RandAugment)
POLICIES: Tuple[str, str] = ("trivialaugment", "randaugment")
#: the policies' ops, in torchvision's order: the numbering used by ``params["policy_ops"]``
POLICY_OPS: Tuple[str, ...] = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
                               "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
(IDENTITY, SHEAR_X, SHEAR_Y, TRANSLATE_X, TRANSLATE_Y, ROTATE, BRIGHTNESS_OP, COLOR, CONTRAST_OP, SHARPNESS,
 POSTERIZE, SOLARIZE, AUTOCONTRAST, EQUALIZE) = range(len(POLICY_OPS))
#: the ops whose magnitude gets a random sign (torchvision's "signed" flag)
_SIGNED_OPS = (SHEAR_X, SHEAR_Y, TRANSLATE_X, TRANSLATE_Y, ROTATE, BRIGHTNESS_OP, COLOR, CONTRAST_OP, SHARPNESS)
#: the keys :meth:`GPUAugment.sample` adds with a policy
POLICY_PARAM_KEYS: Tuple[str, ...] = ("policy_ops", "policy_bins", "policy_negate")
#: timm RandomErasing's fill modes: zeros, one normal colour per box, normal noise per pixel
ERASE_MODES: Tuple[str, str, str] = ("const", "rand", "pixel")
#: the keys :meth:`GPUAugment.sample` adds with random erasing (plus ``erase_colors`` in mode 'rand' and
#: ``erase_noise`` in mode 'pixel' when sample() is given the image size)
ERASE_PARAM_KEYS: Tuple[str, ...] = ("erase_apply", "erase_count", "erase_attempts", "erase_position")
_ERASE_TRIES = 10                       # timm's attempts per box
# bounds on what a config may ask for (each policy op is ~40 passes over the batch; each box a mask)
_MAX_POLICY_OPS, _MAX_POLICY_BINS, _MAX_ERASE_COUNT = 16, 1024, 16

# ITU-R 601-2 luma, the coefficients torchvision's rgb_to_grayscale uses
_GRAY_R, _GRAY_G, _GRAY_B = 0.2989, 0.587, 0.114

_Range = Union[float, Sequence[float], None]


# ----------------------------------------------------------------------------- helpers

def _check_images(images: Any) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"expected a uint8 torch.Tensor of shape (B, 3, H, W), got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(
            f"expected uint8 images of shape (B, 3, H, W) with values 0..255, got dtype {images.dtype}; "
            "pass the decoded uint8 batch, the conversion to float happens here")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected a uint8 batch of shape (B, 3, H, W), got shape {tuple(images.shape)}; "
                         "convert grayscale images to 3 channels when decoding (decode_jpeg mode=RGB)")


def _factor_range(name: str, value: _Range, *, hue: bool = False) -> Optional[Tuple[float, float]]:
    """torchvision ColorJitter's ``_check_input``: a number x -> [1-x, 1+x] (lower end clipped at 0),
    hue h -> [-h, h]; a (min, max) pair is taken as is.  Returns None when the op is the identity."""
    center = 0.0 if hue else 1.0
    if value is None:
        return None
    if isinstance(value, numbers.Number):
        value = float(value)
        if value < 0:
            raise ValueError(f"{name} must be non-negative, got {value}")
        if hue and value > 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {value}")
        lo, hi = center - value, center + value
        if not hue:
            lo = max(lo, 0.0)
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        lo, hi = float(value[0]), float(value[1])
        bound = (-0.5, 0.5) if hue else (0.0, float("inf"))
        if not bound[0] <= lo <= hi <= bound[1]:
            raise ValueError(f"{name} range {value} must satisfy {bound[0]} <= min <= max <= {bound[1]}")
    else:
        raise TypeError(f"{name} must be a number or a (min, max) pair, got {value!r}")
    if lo == hi == center:
        return None
    return (lo, hi)


def _whole_number(name: str, value: Any, low: int, high: Optional[int] = None) -> int:
    """A whole number in [low, high] (the upper bound keeps a config's cost bounded), else ValueError."""
    span = f"in {low}..{high}" if high is not None else f">= {low}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) and not (
            isinstance(value, float) and value.is_integer()):
        raise ValueError(f"{name} must be a whole number {span}, got {value!r}")
    if int(value) < low or high is not None and int(value) > high:
        raise ValueError(f"{name} must be a whole number {span}, got {value!r}")
    return int(value)


def _number_pair(name: str, value: Any) -> Tuple[float, float]:
    """A (min, max) pair of numbers, else ValueError naming the option."""
    try:
        pair = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (min, max) pair of numbers, got {value!r}") from None
    if len(pair) != 2 or pair[0] > pair[1]:
        raise ValueError(f"{name} must be a (min, max) pair of numbers with min <= max, got {value!r}")
    return pair


def _as_dtype(value: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value).replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"out_dtype must be a floating point dtype, got {value!r}")
    return dtype


def _norm_values(mean: Optional[Sequence[float]], std: Optional[Sequence[float]]):
    """Validated (mean, std) as two 3-tuples of floats, or None for no normalization."""
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        raise ValueError("mean and std must both be given (or both None for no normalization)")
    mean_v = tuple(float(v) for v in (mean.flatten().tolist() if isinstance(mean, torch.Tensor) else mean))
    std_v = tuple(float(v) for v in (std.flatten().tolist() if isinstance(std, torch.Tensor) else std))
    if len(mean_v) != 3 or len(std_v) != 3:
        raise ValueError(f"mean and std need 3 values (one per RGB channel), got {mean_v} and {std_v}")
    if min(std_v) <= 0:
        raise ValueError(f"std must be positive, got {std_v}")
    return mean_v, std_v


def _out_format(images: torch.Tensor, channels_last: bool) -> torch.memory_format:
    if channels_last:
        return torch.channels_last
    if not images.is_contiguous() and images.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 0..1, exactly as torchvision's to_dtype(scale=True)."""
    return images.to(torch.float32).mul_(1.0 / 255)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma, torchvision's float formula."""
    r, g, b = x.unbind(dim=1)
    return r.mul(_GRAY_R).add_(g, alpha=_GRAY_G).add_(b, alpha=_GRAY_B).unsqueeze(1)


def _adjust_hue(x: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Per-sample hue shift of x (B, 3, H, W) in [0, 1] by hue (B,) in [-0.5, 0.5].

    The same maths as torchvision's adjust_hue (RGB -> HSV, h += hue mod 1, HSV -> RGB), fused:
    with v = max, delta = max - min (= v * s), channel n of the result is
    ``v - delta * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6 h) mod 6`` and n = 5, 3, 1 for
    R, G, B (the textbook HSV -> RGB formula; torchvision's sector table gives the same values).  Gray pixels (delta = 0) come back unchanged, as in torchvision."""
    r, g, b = x.unbind(dim=1)
    maxc = torch.amax(x, dim=1)
    delta = maxc - torch.amin(x, dim=1)
    is_r = maxc == r
    is_g = maxc == g
    # h6 = 6 * hue in [-1, 5]: (g - b) / delta where max = r, else (b - r) / delta + 2 where max = g,
    # else (r - g) / delta + 4 (torchvision's priority r, g, b); delta = 0 -> 0 (s = 0, hue irrelevant)
    h6 = torch.where(is_r, g - b, torch.where(is_g, (b - r).add_(delta, alpha=2.0), (r - g).add_(delta, alpha=4.0)))
    h6 = h6.div_(delta.masked_fill(delta == 0, 1.0)).add_(hue.view(-1, 1, 1), alpha=6.0)
    n = torch.arange(5.0, 0.0, -2.0, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)   # 5, 3, 1 (no H2D copy)
    k = (h6.unsqueeze(1) + n).remainder_(6.0)                       # the "mod 1" of the hue happens here
    w = k.sub_(2.0).abs_().neg_().add_(2.0).clamp_(0.0, 1.0)        # min(k, 4 - k) clamped to [0, 1]
    return w.mul_(delta.unsqueeze(1)).neg_().add_(maxc.unsqueeze(1))


def _slot_table(blend_ops: Sequence[int], hue_on: bool) -> torch.Tensor:
    """Schedule the blend-type ops (brightness, contrast, saturation) of every op order around one hue step.

    Every sample runs the hue exactly once, so the hue (the costly op) runs once for the whole batch: a
    sample's n_pre enabled blend ops before its hue go, in its order, to the slots just before the hue
    step, the others to the slots just after.  With n enabled blend ops that is 2n slots (n without hue).
    Row ``code`` of the table (code = the order in base 4, 256 rows, the 24 permutations filled) gives
    for each slot the index into ``blend_ops`` of the op it runs, or n for an empty slot.  Built once on
    the host, so a batch's plan is one lookup instead of ~30 small kernels."""
    n = len(blend_ops)
    n_slots = 2 * n if hue_on else n
    table = torch.full((256, max(n_slots, 1)), n, dtype=torch.long)
    for order in itertools.permutations(range(4)):
        pos = {op: i for i, op in enumerate(order)}
        ranked = sorted(range(n), key=lambda k: pos[blend_ops[k]])          # enabled ops in this order
        n_pre = sum(pos[j] < pos[HUE] for j in blend_ops) if hue_on else n
        code = sum(op * 4 ** (3 - i) for i, op in enumerate(order))
        for rank, k in enumerate(ranked):
            table[code, rank + (n - n_pre) if hue_on else rank] = k
    return table[:, :n_slots]


# ----------------------------------------------------------------------------- policies (TrivialAugmentWide, RandAugmen

def policy_magnitudes(policy: str, num_bins: int = 31, height: int = 64, width: int = 64) -> torch.Tensor:
    """(len(POLICY_OPS), num_bins) float32: each op's magnitude bins, as torchvision.transforms.v2's
    TrivialAugmentWide / RandAugment define them (``_AUGMENTATION_SPACE``), unsigned; a row of zeros for
    the ops without a magnitude.  Only RandAugment's translations depend on the image size."""
    policy = _check_policy(policy)
    if policy is None:
        raise ValueError("policy_magnitudes needs a policy: 'trivialaugment' or 'randaugment'")
    n = int(num_bins)
    zero = torch.zeros(n)
    if policy == "trivialaugment":
        shear, tx, ty, rotate, colour, posterize_div = 0.99, 32.0, 32.0, 135.0, 0.99, 6
    else:
        shear, tx, ty, rotate, colour, posterize_div = 0.3, 150.0 / 331.0 * width, 150.0 / 331.0 * height, 30.0, 0.9, 4
    posterize = (8 - (torch.arange(n) / ((n - 1) / posterize_div))).round().int().float()
    rows = [zero, torch.linspace(0.0, shear, n), torch.linspace(0.0, shear, n), torch.linspace(0.0, tx, n),
            torch.linspace(0.0, ty, n), torch.linspace(0.0, rotate, n)]
    rows += [torch.linspace(0.0, colour, n)] * 4                  # Brightness, Color, Contrast, Sharpness
    rows += [posterize, torch.linspace(1.0, 0.0, n), zero, zero]  # Posterize (bits), Solarize, AutoContrast, Equalize
    return torch.stack(rows)


def _check_policy(policy: Optional[str]) -> Optional[str]:
    if policy is None or policy in ("", "none"):
        return None
    name = str(policy).lower().replace("_", "").replace("-", "")
    name = {"trivialaugmentwide": "trivialaugment", "ta": "trivialaugment", "ra": "randaugment"}.get(name, name)
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {[None, *POLICIES]}, got {policy!r}")
    return name


def _sel(op: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) op ids -> (B, 1, 1, 1) bool: the samples whose op is k."""
    return (op == k).view(-1, 1, 1, 1)


def _policy_affine(x: torch.Tensor, op: torch.Tensor, mag: torch.Tensor, fill: Optional[torch.Tensor]) -> torch.Tensor:
    """ShearX/Y, TranslateX/Y and Rotate of x (B, C, H, W) float holding uint8 values, one op per sample
    (other samples untouched), as one grid_sample with per-sample matrices.

    The matrices are torchvision's ``_get_inverse_affine_matrix`` for the calls its policies make
    (F.affine with shear = degrees(atan(m)) about the top-left corner, translate = int(m); F.rotate by m
    about the centre), computed in float64 and cast to float32 as torchvision does; the grid is its
    ``_affine_grid``; nearest sampling, outside pixels 0 or ``fill`` (B, C, 1, 1 or 1, C, 1, 1)."""
    B, C, H, W = x.shape
    dt = torch.float32 if x.device.type == "mps" else torch.float64     # MPS has no float64
    m = mag.to(dt)
    zero = torch.zeros_like(m)
    shear_deg = torch.rad2deg(torch.atan(m))
    shear_x = torch.where(op == SHEAR_X, shear_deg, zero)
    shear_y = torch.where(op == SHEAR_Y, shear_deg, zero)
    tx = torch.where(op == TRANSLATE_X, m.trunc(), zero)
    ty = torch.where(op == TRANSLATE_Y, m.trunc(), zero)
    # F.rotate(angle) = affine matrix of -(angle mod 360) about the centre
    angle = torch.where(op == ROTATE, -torch.remainder(m, 360.0), zero)
    corner = (op == SHEAR_X) | (op == SHEAR_Y)                           # shears pivot on pixel (0, 0)'s corner
    cx = torch.where(corner, zero - 0.5 * W, zero)
    cy = torch.where(corner, zero - 0.5 * H, zero)
    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(shear_x), torch.deg2rad(shear_y)
    cos_sy, tan_sx, rot_minus_sy = torch.cos(sy), torch.tan(sx), rot - sy
    a = torch.cos(rot_minus_sy) / cos_sy
    b = -(a * tan_sx + torch.sin(rot))
    c = torch.sin(rot_minus_sy) / cos_sy
    d = torch.cos(rot) - c * tan_sx
    cx_tx, cy_ty = cx + tx, cy + ty
    m0, m1, m3, m4 = d, -b, -c, a
    m2 = cx - m0 * cx_tx - m1 * cy_ty
    m5 = cy - m3 * cx_tx - m4 * cy_ty
    theta = torch.stack([m0, m1, m2, m3, m4, m5], dim=1).view(B, 2, 3).to(torch.float32)
    # torchvision's _affine_grid, batched: pixel-centred coordinates (x, y, 1) @ theta^T / (w/2, h/2).  The
    # 3-term dot product is written out: the same float32 sums as torchvision's bmm on the CPU, and never
    # TF32 (which CUDA matmuls may use; its ~1e-3 error would move nearest samples across pixel edges)
    scaled = theta.transpose(1, 2).contiguous()                          # (B, 3, 2)
    scaled[..., 0].div_(0.5 * W)
    scaled[..., 1].div_(0.5 * H)
    xs = torch.linspace((1.0 - W) * 0.5, (W - 1.0) * 0.5, steps=W, device=x.device).view(1, 1, W, 1)
    ys = torch.linspace((1.0 - H) * 0.5, (H - 1.0) * 0.5, steps=H, device=x.device).view(1, H, 1, 1)
    rows = scaled.view(B, 1, 1, 3, 2)
    grid = xs * rows[..., 0, :] + ys * rows[..., 1, :] + rows[..., 2, :]   # (B, H, W, 2)
    src = x if fill is None else torch.cat([x, torch.ones_like(x[:, :1])], dim=1)   # + a mask channel
    warped = F.grid_sample(src, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    if fill is not None:
        warped, mask = warped[:, :C], warped[:, C:]
        warped = torch.where(mask < 0.5, fill.to(warped.dtype).expand_as(warped), warped)
    geometric = (op >= SHEAR_X) & (op <= ROTATE)
    return torch.where(geometric.view(B, 1, 1, 1), warped, x)


def _policy_blend(x: torch.Tensor, op: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    """Brightness, Color (saturation), Contrast and Sharpness with factor 1 + m, one op per sample, as one
    blend ``floor(clamp(x * f + target * (1 - f), 0, 255))`` (the uint8 cast of torchvision's ``_blend``):
    target 0, the floored grayscale, its mean, or for Sharpness f = 1 and target the difference
    between torchvision's rounded 3x3 smoothing and x (0 on the one-pixel border it leaves alone)."""
    B, C, H, W = x.shape
    gray = _grayscale(x).floor_()                                       # torchvision's uint8 grayscale
    target = torch.where(_sel(op, COLOR), gray, torch.zeros_like(gray))
    target = torch.where(_sel(op, CONTRAST_OP), gray.mean(dim=(1, 2, 3), keepdim=True), target)
    if H > 2 and W > 2:
        # torchvision's kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, then rounded: on whole numbers the
        # sums below are exact and (sum + 4 * centre) / 13 is never within 1/26 of a rounding tie, so
        # this separable form rounds to the same values as its float32 convolution, in fewer passes
        rows = x[..., :-2] + x[..., 1:-1] + x[..., 2:]
        box = rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]
        centre = x[..., 1:-1, 1:-1]
        blurred = box.add_(centre, alpha=4.0).div_(13.0).round_()
        sharp = F.pad(blurred - centre, (1, 1, 1, 1))
        target = torch.where(_sel(op, SHARPNESS), sharp, target)
    blend = (op >= BRIGHTNESS_OP) & (op <= SHARPNESS)
    weight = torch.where(blend, -mag, torch.zeros_like(mag)).view(B, 1, 1, 1)     # 1 - f, exactly as in float64
    factor = torch.where(blend & (op != SHARPNESS), 1.0 + mag, torch.ones_like(mag)).view(B, 1, 1, 1)
    # addcmul: one rounding for target * weight + x * factor, like torchvision's add_(target, alpha=1 - f)
    return torch.addcmul(x * factor, target, weight).clamp_(0.0, 255.0).floor_()


def _policy_tone(x: torch.Tensor, op: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    """Posterize (keep ``mag`` bits), Solarize (invert values >= 255 * mag) and AutoContrast (stretch each
    channel's min..max to 0..255), one op per sample, each exact on uint8 values as torchvision's."""
    B = x.shape[0]
    # posterize: x & mask on uint8 == floor(x / 2^(8-bits)) * 2^(8-bits), exact in float
    dropped = torch.where(op == POSTERIZE, (8.0 - mag).clamp(min=0.0), torch.zeros_like(mag))
    step = torch.ldexp(torch.ones_like(mag), dropped).view(B, 1, 1, 1)
    x = x.div(step).floor_().mul_(step)
    # solarize: torchvision compares with the threshold 255 * m cast to float32; 256 = never
    threshold = torch.where(op == SOLARIZE, mag * 255.0, torch.full_like(mag, 256.0)).view(B, 1, 1, 1)
    x = torch.where(x >= threshold, 255.0 - x, x)
    # autocontrast: torchvision's maths (inv_scale = (max - min) / 255, flat channels left alone)
    low = x.amin(dim=(-2, -1), keepdim=True)
    high = x.amax(dim=(-2, -1), keepdim=True)
    flat = (high == low) | ~_sel(op, AUTOCONTRAST)
    inv_scale = torch.where(flat, torch.ones_like(high), (high - low).mul_(1.0 / 255))
    low = torch.where(flat, torch.zeros_like(low), low)
    return x.sub(low).div_(inv_scale).clamp_(0.0, 255.0).floor_()


def _policy_equalize(x: torch.Tensor, op: torch.Tensor) -> torch.Tensor:
    """Equalize, exact: torchvision's own batched kernel (per image and channel histograms, PIL's LUT)."""
    from torchvision.transforms.v2.functional import equalize_image

    equalized = equalize_image(x.to(torch.uint8)).to(x.dtype)
    return torch.where(_sel(op, EQUALIZE), equalized, x)


# ----------------------------------------------------------------------------- random erasing

def _erase_boxes(params: Mapping[str, torch.Tensor], height: int, width: int, area_range: Tuple[float, float],
                 log_aspect: Tuple[float, float]):
    """timm RandomErasing's boxes from the uniforms in ``params``, batched: per box up to 10 attempts of
    (area uniform in area_range of the image / count, aspect log-uniform, h and w rounded half to even),
    the first that fits (h < H and w < W) is used, its corner uniform over the positions that fit.
    Returns (top, left, h, w) int64 (B, K) and ``present`` (B, K) bool."""
    attempts = params["erase_attempts"]                                 # (B, K, tries, 2) uniforms
    dt = torch.float32 if attempts.device.type == "mps" else torch.float64
    u = attempts.to(dt)
    count = params["erase_count"]
    K = u.shape[1]
    lo, hi = area_range
    target_area = (lo + (hi - lo) * u[..., 0]) * float(height * width) / count.to(dt).view(-1, 1, 1)
    aspect = torch.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * u[..., 1])
    h = torch.sqrt(target_area * aspect).round_()
    w = torch.sqrt(target_area / aspect).round_()
    fits = (w < width) & (h < height)
    first = fits.to(torch.uint8).argmax(dim=-1, keepdim=True)          # the first attempt that fits
    h = h.gather(-1, first).squeeze(-1)
    w = w.gather(-1, first).squeeze(-1)
    box_index = torch.arange(K, device=count.device)
    present = fits.any(dim=-1) & (box_index < count.view(-1, 1)) & params["erase_apply"].view(-1, 1)
    pos = params["erase_position"].to(dt)                               # (B, K, 2) uniforms
    top = torch.minimum((pos[..., 0] * (height - h + 1)).floor_(), height - h)
    left = torch.minimum((pos[..., 1] * (width - w + 1)).floor_(), width - w)
    return top.long(), left.long(), h.long(), w.long(), present


# ----------------------------------------------------------------------------- eval / normalize

def eval_transform(images: torch.Tensor, mean: Optional[Sequence[float]] = IMAGENET_DEFAULT_MEAN,
                   std: Optional[Sequence[float]] = IMAGENET_DEFAULT_STD, out_dtype: Union[str, torch.dtype] = torch.float32,
                   channels_last: bool = False) -> torch.Tensor:
    """Validation / test transform: uint8 (B, 3, H, W) -> float in [0, 1] -> (x - mean) / std.

    ``mean=std=None`` skips the normalization.  The memory format of ``images`` is kept unless
    ``channels_last=True``.  For a hot loop prefer :class:`EvalTransform` (stats kept on the device)
    or :meth:`GPUAugment.eval_transform`."""
    _check_images(images)
    stats = _norm_values(mean, std)
    fmt = _out_format(images, channels_last)
    x = _to_unit_float(images)
    if stats is not None:
        for c, (m, s) in enumerate(zip(*stats)):
            x[:, c].sub_(m).div_(s)                                     # python scalars: no H2D copy
    return x.to(_as_dtype(out_dtype)).contiguous(memory_format=fmt)


class EvalTransform(nn.Module):
    """:func:`eval_transform` as a module: mean/std are buffers that move with ``.to(device)``."""

    def __init__(self, mean: Optional[Sequence[float]] = IMAGENET_DEFAULT_MEAN, std: Optional[Sequence[float]] = IMAGENET_DEFAULT_STD,
                 out_dtype: Union[str, torch.dtype] = torch.float32, channels_last: bool = False):
        super().__init__()
        stats = _norm_values(mean, std)
        self.normalize = stats is not None
        m, s = stats if stats is not None else ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        self.register_buffer("mean", torch.tensor(m, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(s, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.out_dtype = _as_dtype(out_dtype)
        self.channels_last = bool(channels_last)

    def _finish(self, x: torch.Tensor, fmt: torch.memory_format,
                out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """float in [0, 1] -> normalized, cast, in the output memory format."""
        return self._normalized(x).to(out_dtype or self.out_dtype).contiguous(memory_format=fmt)

    def _normalized(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        return self._finish(_to_unit_float(images), _out_format(images, self.channels_last))

    def extra_repr(self) -> str:
        if not self.normalize:
            return f"normalize=False, out_dtype={self.out_dtype}, channels_last={self.channels_last}"
        mean = [round(v, 4) for v in self.mean.flatten().tolist()]
        std = [round(v, 4) for v in self.std.flatten().tolist()]
        return f"mean={mean}, std={std}, out_dtype={self.out_dtype}, channels_last={self.channels_last}"


# ----------------------------------------------------------------------------- train augmentation

class GPUAugment(EvalTransform):
    """Random crop (zero padding) + horizontal flip + ColorJitter + normalization, batched on the device;
    optionally TrivialAugmentWide / RandAugment (after the flip) and random erasing (after normalization).

    Args:
        crop_padding: zero padding on each side before the random crop back to the input size
            (torchvision ``RandomCrop(H, padding=crop_padding)``); 0 or None switches the crop off.
        flip_p: probability of a horizontal flip per sample (0 = off).
        brightness, contrast, saturation: a number x gives factors uniform in [max(0, 1-x), 1+x],
            a (min, max) pair that range; 0 or None = off.
        hue: a number h in [0, 0.5] gives shifts uniform in [-h, h], or a (min, max) pair in
            [-0.5, 0.5]; 0 or None = off.
        jitter_p: probability that a sample gets the colour jitter at all (others get identity
            factors), like ``RandomApply([ColorJitter(...)], p=jitter_p)``; 1 = always (default).
        mean, std: per-channel normalization after the augmentation; None for both = no normalization.
        out_dtype: output dtype (float32 default; e.g. bfloat16).  The maths runs in float32.
        channels_last: return channels_last tensors; otherwise the input's memory format is kept.
        policy: None (default, off), "trivialaugment" (torchvision TrivialAugmentWide: one op per sample,
            a random magnitude bin) or "randaugment" (RandAugment: ``ra_num_ops`` ops per sample at bin
            ``ra_magnitude``), run on the uint8 values after crop and flip, before the colour jitter.
            Colour jitter stays on unless switched off (timm drops it when a policy is set).
        ra_num_ops, ra_magnitude: RandAugment's ``num_ops`` (2) and ``magnitude`` (9, a bin index).
        policy_bins: the policies' ``num_magnitude_bins`` (31).
        policy_fill: value(s) in 0..255 for the pixels the affine ops bring in (torchvision's ``fill``,
            e.g. timm's mean colour (124, 116, 104)); None = 0.
        erase_p: timm RandomErasing's ``probability`` per sample (0 = off), on the normalized image.
        erase_mode: "pixel" (normal noise per pixel, timm train.py's default), "rand" (a normal colour
            per box) or "const" (zeros).
        erase_count: timm's ``max_count``: each erased sample gets 1..erase_count boxes.
        erase_area: (min_area, max_area) of a box as a fraction of the image (split over the boxes).
        erase_aspect: (min_aspect, max_aspect) of a box, drawn log-uniform.

    ``aug(images)`` samples on the images' device (``generator`` optional) and applies.
    """

    def __init__(self, crop_padding: Optional[int] = 4, flip_p: float = 0.5,
                 brightness: _Range = 0.2, contrast: _Range = 0.2, saturation: _Range = 0.2, hue: _Range = 0.05,
                 jitter_p: float = 1.0,
                 mean: Optional[Sequence[float]] = IMAGENET_DEFAULT_MEAN, std: Optional[Sequence[float]] = IMAGENET_DEFAULT_STD,
                 out_dtype: Union[str, torch.dtype] = torch.float32, channels_last: bool = False,
                 policy: Optional[str] = None, ra_num_ops: int = 2, ra_magnitude: int = 9, policy_bins: int = 31,
                 policy_fill: Union[float, Sequence[float], None] = None,
                 erase_p: float = 0.0, erase_mode: str = "pixel", erase_count: int = 1,
                 erase_area: Sequence[float] = (0.02, 1 / 3), erase_aspect: Sequence[float] = (0.3, 1 / 0.3)):
        super().__init__(mean=mean, std=std, out_dtype=out_dtype, channels_last=channels_last)
        self._init_policy(policy, ra_num_ops, ra_magnitude, policy_bins, policy_fill)
        self._init_erasing(erase_p, erase_mode, erase_count, erase_area, erase_aspect)
        padding = int(crop_padding or 0)
        if padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        if not 0.0 <= float(flip_p) <= 1.0:
            raise ValueError(f"flip_p must be in [0, 1], got {flip_p}")
        if not 0.0 <= float(jitter_p) <= 1.0:
            raise ValueError(f"jitter_p must be in [0, 1], got {jitter_p}")
        self.crop_padding = padding
        self.flip_p = float(flip_p)
        self.jitter_p = float(jitter_p)
        self.ranges: Dict[str, Optional[Tuple[float, float]]] = {
            "brightness": _factor_range("brightness", brightness),
            "contrast": _factor_range("contrast", contrast),
            "saturation": _factor_range("saturation", saturation),
            "hue": _factor_range("hue", hue, hue=True),
        }
        if self.jitter_p == 0.0:
            self.ranges = dict.fromkeys(self.ranges)
        # the blend-type ops switched on, in their numbering (0 brightness, 1 contrast, 2 saturation)
        self._blend_ops = tuple(j for j in (BRIGHTNESS, CONTRAST, SATURATION) if self.ranges[JITTER_OPS[j]] is not None)
        self._hue_on = self.ranges["hue"] is not None
        # factor = u * span + low per op (span 0, low = identity for an op that is off): one pass for all four
        lows = [r[0] if r else (0.0 if j == HUE else 1.0) for j, r in enumerate(self.ranges.values())]
        spans = [r[1] - r[0] if r else 0.0 for r in self.ranges.values()]
        self.register_buffer("_factor_low", torch.tensor(lows, dtype=torch.float32), persistent=False)
        self.register_buffer("_factor_span", torch.tensor(spans, dtype=torch.float32), persistent=False)
        self.register_buffer("_identity", torch.tensor([1.0, 1.0, 1.0, 0.0]), persistent=False)
        # the slot plan of every jitter_order, looked up by the order's base-4 code (see _slot_plan)
        self.register_buffer("_order_code", torch.tensor([64, 16, 4, 1]), persistent=False)
        self.register_buffer("_slot_table", _slot_table(self._blend_ops, self._hue_on), persistent=False)

    def _init_policy(self, policy, ra_num_ops, ra_magnitude, policy_bins, policy_fill) -> None:
        self.policy = _check_policy(policy)
        self.policy_bins = _whole_number("policy_bins", policy_bins, low=2, high=_MAX_POLICY_BINS)
        self.ra_num_ops = _whole_number("ra_num_ops", ra_num_ops, low=0, high=_MAX_POLICY_OPS)
        self.ra_magnitude = _whole_number("ra_magnitude", ra_magnitude, low=0)
        if self.ra_magnitude >= self.policy_bins:
            raise ValueError(f"ra_magnitude must be a bin index below policy_bins={self.policy_bins}, "
                             f"got {ra_magnitude}")
        fill = None
        if policy_fill is not None:
            try:
                values = ([float(policy_fill)] * 3 if isinstance(policy_fill, numbers.Number)
                          else [float(v) for v in policy_fill])
            except (TypeError, ValueError):
                values = []
            if len(values) == 1:
                values *= 3
            if len(values) != 3 or not all(0.0 <= v <= 255.0 for v in values):
                raise ValueError(f"policy_fill must be one value or 3 (RGB) in 0..255, got {policy_fill!r}")
            fill = tuple(values) if any(values) else None          # 0 fills like no fill (zero padding)
        self.policy_fill = fill
        # (op, bin) -> unsigned magnitude; RandAugment's translations are rescaled to the image in apply
        table = policy_magnitudes(self.policy or "trivialaugment", self.policy_bins)
        self.register_buffer("_policy_table", table, persistent=False)
        self.register_buffer("_policy_signed", torch.isin(torch.arange(len(POLICY_OPS)), torch.tensor(_SIGNED_OPS)),
                             persistent=False)
        self.register_buffer("_policy_fill", torch.tensor(fill or (0.0, 0.0, 0.0)).view(1, 3, 1, 1), persistent=False)

    def _init_erasing(self, erase_p, erase_mode, erase_count, erase_area, erase_aspect) -> None:
        if not isinstance(erase_p, numbers.Real) or not 0.0 <= float(erase_p) <= 1.0:
            raise ValueError(f"erase_p must be a number in [0, 1], got {erase_p!r}")
        mode = str(erase_mode).lower()
        if mode not in ERASE_MODES:
            raise ValueError(f"erase_mode must be one of {list(ERASE_MODES)}, got {erase_mode!r}")
        area = _number_pair("erase_area", erase_area)
        aspect = _number_pair("erase_aspect", erase_aspect)
        if not 0.0 < area[0] <= area[1] <= 1.0:
            raise ValueError(f"erase_area must be (min, max) with 0 < min <= max <= 1, got {erase_area!r}")
        if not 0.0 < aspect[0] <= aspect[1] < math.inf:
            raise ValueError(f"erase_aspect must be (min, max) with 0 < min <= max, got {erase_aspect!r}")
        self.erase_p = float(erase_p)
        self.erase_mode = mode
        self.erase_count = _whole_number("erase_count", erase_count, low=1, high=_MAX_ERASE_COUNT)
        self.erase_area = area
        self.erase_aspect = aspect
        self._log_aspect = (math.log(aspect[0]), math.log(aspect[1]))

    @property
    def policy_steps(self) -> int:
        """Ops each sample gets from the policy: 1 (TrivialAugmentWide), ra_num_ops (RandAugment), 0 (off)."""
        if self.policy is None:
            return 0
        return 1 if self.policy == "trivialaugment" else self.ra_num_ops

    # -- configuration ------------------------------------------------------------------------

    _CONFIG_KEYS = ("crop_padding", "flip_p", "brightness", "contrast", "saturation", "hue", "jitter_p",
                    "mean", "std", "out_dtype", "channels_last", "policy", "ra_num_ops", "ra_magnitude",
                    "policy_bins", "policy_fill", "erase_p", "erase_mode", "erase_count", "erase_area", "erase_aspect")

    @classmethod
    def from_config(cls, config: Optional[Mapping[str, Any]] = None, **overrides: Any) -> "GPUAugment":
        """Build from a YAML ``augment:`` section: keys are the constructor arguments, plus
        ``enabled: false`` meaning no augmentation (normalization only, i.e. :meth:`eval_transform`).
        Unknown keys raise ValueError.  ``overrides`` win over ``config``."""
        cfg = dict(config or {})
        cfg.update(overrides)
        enabled = cfg.pop("enabled", True)
        unknown = sorted(set(cfg) - set(cls._CONFIG_KEYS))
        if unknown:
            raise ValueError(f"unknown augment option(s) {unknown}; valid: {['enabled', *cls._CONFIG_KEYS]}")
        for key in ("mean", "std", "brightness", "contrast", "saturation", "hue", "policy_fill", "erase_area",
                    "erase_aspect"):
            if isinstance(cfg.get(key), list):
                cfg[key] = tuple(cfg[key])
        if not enabled:
            cfg.update(crop_padding=0, flip_p=0.0, brightness=0, contrast=0, saturation=0, hue=0, policy=None,
                       erase_p=0.0)
        return cls(**cfg)

    @classmethod
    def for_model(cls, model: nn.Module, config: Optional[Mapping[str, Any]] = None, **overrides: Any) -> "GPUAugment":
        """:meth:`from_config` with the normalization the model was made for (mean/std of its timm
        ``pretrained_cfg``, through ``timm.data.resolve_model_data_config``), so the constants live with the
        model.  ``overrides`` still win (e.g. ``channels_last=True``)."""
        from timm.data import resolve_model_data_config

        data_cfg = resolve_model_data_config(model)
        return cls.from_config(config, **{"mean": data_cfg["mean"], "std": data_cfg["std"], **overrides})

    def to_config(self) -> Dict[str, Any]:
        """The constructor arguments of this instance (plain Python values, for logging / YAML)."""
        def rng(name):
            r = self.ranges[name]
            return 0 if r is None else list(r)
        return {
            "crop_padding": self.crop_padding, "flip_p": self.flip_p,
            "brightness": rng("brightness"), "contrast": rng("contrast"), "saturation": rng("saturation"),
            "hue": rng("hue"), "jitter_p": self.jitter_p,
            "mean": self.mean.flatten().tolist() if self.normalize else None,
            "std": self.std.flatten().tolist() if self.normalize else None,
            "out_dtype": str(self.out_dtype).replace("torch.", ""), "channels_last": self.channels_last,
            "policy": self.policy, "ra_num_ops": self.ra_num_ops, "ra_magnitude": self.ra_magnitude,
            "policy_bins": self.policy_bins, "policy_fill": list(self.policy_fill) if self.policy_fill else None,
            "erase_p": self.erase_p, "erase_mode": self.erase_mode, "erase_count": self.erase_count,
            "erase_area": list(self.erase_area), "erase_aspect": list(self.erase_aspect),
        }

    @property
    def enabled(self) -> bool:
        """False when every random op is off (then ``aug(x) == aug.eval_transform(x)``)."""
        return bool(self.crop_padding or self.flip_p > 0 or self._blend_ops or self._hue_on or self.policy_steps
                    or self.erase_p > 0)

    def extra_repr(self) -> str:
        parts = [f"crop_padding={self.crop_padding}", f"flip_p={self.flip_p}"]
        parts += [f"{k}={list(v) if v else 0}" for k, v in self.ranges.items()]
        parts.append(f"jitter_p={self.jitter_p}")
        if self.policy == "trivialaugment":
            parts.append(f"policy=trivialaugment, policy_bins={self.policy_bins}")
        elif self.policy == "randaugment":
            parts.append(f"policy=randaugment, ra_num_ops={self.ra_num_ops}, ra_magnitude={self.ra_magnitude}, "
                         f"policy_bins={self.policy_bins}")
        if self.policy and self.policy_fill:
            parts.append(f"policy_fill={list(self.policy_fill)}")
        if self.erase_p > 0:
            parts.append(f"erase_p={self.erase_p}, erase_mode={self.erase_mode}, erase_count={self.erase_count}")
        return ", ".join(parts) + ", " + super().extra_repr()

    # -- sampling -----------------------------------------------------------------------------

    def sample(self, batch_size: int, generator: Optional[torch.Generator] = None,
               device: Optional[Union[str, torch.device]] = None,
               image_size: Optional[Sequence[int]] = None) -> Dict[str, torch.Tensor]:
        """Per-sample parameters for a batch (see the module docstring), drawn with one torch RNG call
        (one more for a policy, one more for random erasing).

        ``device`` defaults to the generator's device, else the module's (buffers') device.  With a
        generator on another device the draw happens there and the result is moved to ``device``.
        ``image_size`` (H, W) matters only for erasing in mode 'pixel': given, the noise is drawn here
        (``erase_noise``), so that ``apply`` is a function of ``params``; otherwise ``apply`` draws it."""
        if device is None:
            device = generator.device if generator is not None else self.mean.device
        device = torch.device(device)
        draw_device = generator.device if generator is not None else device
        B = int(batch_size)
        u = torch.rand(B, 12, generator=generator, device=draw_device)
        if draw_device != device:
            u = u.to(device)
        p = self.crop_padding
        if p:
            crop = (u[:, 0:2] * (2 * p + 1)).floor_().long().clamp_(0, 2 * p)
        else:
            crop = torch.zeros(B, 2, dtype=torch.long, device=device)
        flip = u[:, 2] < self.flip_p
        jitter_on = u[:, 7:8] < self.jitter_p
        low, span, identity = (t.to(device) for t in (self._factor_low, self._factor_span, self._identity))
        factors = torch.where(jitter_on, u[:, 3:7] * span + low, identity)   # (B, 4): the ops in JITTER_OPS order
        params: Dict[str, torch.Tensor] = {"crop_offsets": crop, "flip": flip}
        params.update(zip(JITTER_OPS, factors.unbind(dim=1)))
        params["jitter_order"] = u[:, 8:12].argsort(dim=1)
        if self.policy_steps:
            params.update(self._sample_policy(B, generator, draw_device, device))
        if self.erase_p > 0:
            params.update(self._sample_erasing(B, generator, draw_device, device, image_size))
        return params

    def _sample_policy(self, B: int, generator, draw_device, device) -> Dict[str, torch.Tensor]:
        """ops uniform over POLICY_OPS, bins uniform (TrivialAugmentWide) or ra_magnitude (RandAugment),
        a sign per op (torchvision negates when its draw is <= 0.5); (B, policy_steps) each."""
        n = self.policy_steps
        u = torch.rand(B, n, 3, generator=generator, device=draw_device)
        if draw_device != device:
            u = u.to(device)
        ops = (u[..., 0] * len(POLICY_OPS)).floor_().long().clamp_(max=len(POLICY_OPS) - 1)
        if self.policy == "trivialaugment":
            bins = (u[..., 1] * self.policy_bins).floor_().long().clamp_(max=self.policy_bins - 1)
        else:
            bins = torch.full((B, n), self.ra_magnitude, dtype=torch.long, device=device)
        return {"policy_ops": ops, "policy_bins": bins, "policy_negate": u[..., 2] <= 0.5}

    def _sample_erasing(self, B: int, generator, draw_device, device, image_size) -> Dict[str, torch.Tensor]:
        """timm RandomErasing's draws as uniforms: apply (u <= erase_p), count (1..erase_count), per box
        10 attempts of (area, aspect) and the corner position; 'rand' mode: a normal colour per box."""
        K = self.erase_count
        u = torch.rand(B, 2 + K * (2 * _ERASE_TRIES + 2), generator=generator, device=draw_device)
        if draw_device != device:
            u = u.to(device)
        params = {
            "erase_apply": u[:, 0] <= self.erase_p,
            "erase_count": (u[:, 1] * K).floor_().long().clamp_(max=K - 1).add_(1),
            "erase_attempts": u[:, 2:2 + 2 * K * _ERASE_TRIES].reshape(B, K, _ERASE_TRIES, 2),
            "erase_position": u[:, 2 + 2 * K * _ERASE_TRIES:].reshape(B, K, 2),
        }
        if self.erase_mode == "rand":
            params["erase_colors"] = torch.randn(B, K, 3, generator=generator, device=draw_device).to(device)
        elif self.erase_mode == "pixel" and image_size is not None:
            H, W = (int(v) for v in image_size)
            params["erase_noise"] = torch.randn(B, 3, H, W, generator=generator, device=draw_device).to(device)
        return params

    # -- applying -----------------------------------------------------------------------------

    def _crop_flip(self, images: torch.Tensor, crop: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """One gather on the (zero-padded) uint8 batch: crop at per-sample (top, left), flipped per sample."""
        B, C, H, W = images.shape
        p = self.crop_padding
        x = F.pad(images, (p, p, p, p)) if p else images
        Hp, Wp = H + 2 * p, W + 2 * p
        ar_h = torch.arange(H, device=images.device)
        ar_w = torch.arange(W, device=images.device)
        rows = crop[:, 0:1] + ar_h                                       # (B, H)
        cols = crop[:, 1:2] + torch.where(flip.view(B, 1), (W - 1) - ar_w, ar_w)  # (B, W)
        idx = (rows.unsqueeze(2) * Wp + cols.unsqueeze(1)).view(B, 1, H * W).expand(B, C, H * W)
        return x.reshape(B, C, Hp * Wp).gather(2, idx).view(B, C, H, W)

    def _slot_plan(self, params: Mapping[str, torch.Tensor]):
        """Per-sample factors and blend weights of each blend slot (see :func:`_slot_table`).

        Returns (hue_at: the number of slots before the hue step, factors (B, n_slots), and the per-slot
        blend weights (1 - f) of the grayscale (saturation) and of its mean (contrast): (B, n_slots), or
        None when that op is off); an empty slot has factor 1 and weights 0."""
        ops = self._blend_ops
        B = params["jitter_order"].shape[0]
        which = self._slot_table[(params["jitter_order"] * self._order_code).sum(dim=1)]   # (B, n_slots)
        table = torch.stack([params[JITTER_OPS[j]].float() for j in ops] + [params[JITTER_OPS[ops[0]]].new_ones(B)],
                            dim=1)
        factors = table.gather(1, which)
        one_minus = 1.0 - factors
        sat = one_minus * (which == ops.index(SATURATION)) if SATURATION in ops else None
        con = one_minus * (which == ops.index(CONTRAST)) if CONTRAST in ops else None
        return len(ops) if self._hue_on else 0, factors, sat, con

    def _jitter(self, x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The colour ops on x (B, 3, H, W) float in [0, 1], in each sample's order.

        Each slot is torchvision's _blend, ``clamp(x * f + target * (1 - f), 0, 1)``, with target 0
        (brightness), the image's mean gray (contrast) or its grayscale (saturation); f = 1 in an
        empty slot."""
        B = x.shape[0]
        sat = con = None
        if self._blend_ops:
            hue_at, factors, sat, con = self._slot_plan(params)
            n_slots = factors.shape[1]
        else:
            hue_at, n_slots = 0, 0
        for t in range(n_slots + 1):
            if t == hue_at and self._hue_on:
                x = _adjust_hue(x, params["hue"].to(x.dtype))
            if t == n_slots:
                break
            f = factors[:, t].to(x.dtype).view(B, 1, 1, 1)
            if sat is None and con is None:
                x = x * f
            else:
                gray = _grayscale(x)
                target = None
                if con is not None:
                    target = gray.mean(dim=(1, 2, 3), keepdim=True) * con[:, t].to(x.dtype).view(B, 1, 1, 1)
                if sat is not None:
                    w = sat[:, t].to(x.dtype).view(B, 1, 1, 1)
                    target = gray * w if target is None else torch.addcmul(target, gray, w)
                x = torch.addcmul(target, x, f)
            x = x.clamp_(0.0, 1.0)
        return x

    def apply(self, images: torch.Tensor, params: Mapping[str, torch.Tensor],
              out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Apply ``params`` (from :meth:`sample`) to a uint8 batch: crop, flip, colour ops in each
        sample's ``jitter_order``, normalize.  Deterministic; works under torch.compile.

        ``out_dtype`` overrides the instance's output dtype for this call (e.g. the autocast dtype, so
        the cast happens in the last pass instead of before the model's first conv)."""
        _check_images(images)
        fmt = _out_format(images, self.channels_last)
        if self.crop_padding or self.flip_p > 0:
            images = self._crop_flip(images, params["crop_offsets"], params["flip"])
        if self.policy_steps:
            x = self._policy(images.to(torch.float32), params).mul_(1.0 / 255)   # = _to_unit_float of its uint8
        else:
            x = _to_unit_float(images)
        if self._blend_ops or self._hue_on:
            x = self._jitter(x, params)
        if self.erase_p > 0:
            x = self._erase(self._normalized(x), params)
            return x.to(out_dtype or self.out_dtype).contiguous(memory_format=fmt)
        return self._finish(x, fmt, out_dtype)

    def _policy(self, x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The policy's ops on x (B, 3, H, W) float32 holding uint8 values, each sample its own op and
        magnitude per step.  Every op family runs on the whole batch with identity parameters for the
        samples that drew another op (no data-dependent indexing, so no host sync), and each op ends in
        the uint8 truncation torchvision's uint8 kernels do, so the values stay whole numbers."""
        B, _, H, W = x.shape
        ops, bins = params["policy_ops"], params["policy_bins"]
        table = self._policy_table
        if self.policy == "randaugment":                                 # translations scale with the image
            n = self.policy_bins
            table = torch.cat([table[:TRANSLATE_X],
                               torch.linspace(0.0, 150.0 / 331.0 * W, n, device=table.device).unsqueeze(0),
                               torch.linspace(0.0, 150.0 / 331.0 * H, n, device=table.device).unsqueeze(0),
                               table[TRANSLATE_Y + 1:]])
        magnitude = table.flatten()[ops * table.shape[1] + bins]          # (B, steps)
        magnitude = torch.where(params["policy_negate"] & self._policy_signed[ops], -magnitude, magnitude)
        fill = self._policy_fill if self.policy_fill else None
        for step in range(ops.shape[1]):
            op, mag = ops[:, step], magnitude[:, step]
            x = _policy_affine(x, op, mag, fill)
            x = _policy_blend(x, op, mag)
            x = _policy_tone(x, op, mag)
            x = _policy_equalize(x, op)
        return x

    def _erase(self, x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """timm RandomErasing on the normalized batch x (B, 3, H, W), per sample, as masks (no loop over
        samples): pixels in a sample's boxes become noise, the box's colour, or 0 (see erase_mode)."""
        B, C, H, W = x.shape
        top, left, h, w, present = _erase_boxes(params, H, W, self.erase_area, self._log_aspect)
        rows = torch.arange(H, device=x.device)
        cols = torch.arange(W, device=x.device)
        in_rows = (rows >= top.unsqueeze(-1)) & (rows < (top + h).unsqueeze(-1))       # (B, K, H)
        in_cols = (cols >= left.unsqueeze(-1)) & (cols < (left + w).unsqueeze(-1))     # (B, K, W)
        boxes = in_rows.unsqueeze(-1) & in_cols.unsqueeze(-2) & present.view(B, -1, 1, 1)  # (B, K, H, W)
        if self.erase_mode == "rand":                                    # later boxes paint over earlier ones
            colors = params["erase_colors"].to(x.dtype)
            for k in range(boxes.shape[1]):
                x = torch.where(boxes[:, k:k + 1], colors[:, k].view(B, C, 1, 1), x)
            return x
        erased = boxes.any(dim=1, keepdim=True)
        if self.erase_mode == "const":
            return x.masked_fill(erased, 0.0)
        noise = params.get("erase_noise")
        if noise is None:
            noise = torch.randn(x.shape, dtype=x.dtype, device=x.device)
        return torch.where(erased, noise.to(x.dtype), x)

    def eval_transform(self, images: torch.Tensor) -> torch.Tensor:
        """No augmentation: uint8 -> [0, 1] -> this instance's normalization (for val / test)."""
        return EvalTransform.forward(self, images)

    def forward(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        _check_images(images)
        return self.apply(images, self.sample(images.shape[0], generator=generator, device=images.device,
                                              image_size=images.shape[-2:]))


# ----------------------------------------------------------------------------- mixup / cutmix, flip TTA

class MixupCutmix:
    """timm's Mixup / CutMix on an augmented device batch, with soft targets for
    ``timm.loss.SoftTargetCrossEntropy`` (``self.loss``)::

        mix = MixupCutmix(num_classes=200, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
        x, soft = mix(aug(images), labels)          # x mixed in place; soft (B, num_classes) float32
        loss = mix.loss(model(x), soft)             # the label smoothing is in the targets

    A thin wrapper of ``timm.data.Mixup`` (its draws, boxes and lambda correction): ``mode='elem'`` (the
    default) gives every sample its own lambda and its own choice of mixup or cutmix, mixing sample i
    with sample B-1-i.  timm needs an even batch: in an odd one the last sample is left unmixed (its
    target is the smoothed one-hot).  timm draws on the host (numpy) and loops over the samples in
    Python, and its per-sample lambdas go to the device in a blocking copy: use ``mode='batch'`` where
    that shows in a profile.
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, prob: float = 1.0,
                 switch_prob: float = 0.5, mode: str = "elem", label_smoothing: float = 0.1, correct_lam: bool = True):
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        if float(mixup_alpha) < 0 or float(cutmix_alpha) < 0 or not (mixup_alpha or cutmix_alpha):
            raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0 and one of them > 0, got {mixup_alpha} "
                             f"and {cutmix_alpha}; leave mixing off instead of building a MixupCutmix")
        for name, value in (("prob", prob), ("switch_prob", switch_prob)):
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if mode not in ("elem", "pair", "batch"):
            raise ValueError(f"mode must be 'elem', 'pair' or 'batch', got {mode!r}")
        self.num_classes = _whole_number("num_classes", num_classes, low=1)
        self.label_smoothing = float(label_smoothing)
        self.mixup = Mixup(mixup_alpha=float(mixup_alpha), cutmix_alpha=float(cutmix_alpha), prob=float(prob),
                           switch_prob=float(switch_prob), mode=mode, correct_lam=bool(correct_lam),
                           label_smoothing=self.label_smoothing, num_classes=self.num_classes)
        self.loss = SoftTargetCrossEntropy()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(images mixed in place, soft targets (B, num_classes) float32)."""
        from timm.data.mixup import mixup_target

        B = images.shape[0]
        even = B - B % 2
        parts = []
        if even:
            _, mixed = self.mixup(images[:even], labels[:even])         # a view: mixes ``images`` in place
            parts.append(mixed.float())
        if B % 2:
            parts.append(mixup_target(labels[even:], self.num_classes, 1.0, self.label_smoothing).float())
        return images, torch.cat(parts)


def tta_flip_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Horizontal-flip test-time augmentation: the mean of the model's logits on ``images`` and on their
    mirror images (one forward pass on both), in float32 (or the logits' dtype if wider).

    The mean of the logits, as timm's validate.py reduces its test-time augmentations, rather than the
    mean of the softmaxes: the two rarely disagree on the top class, and logits keep the loss defined.
    ``images`` are the model's input (normalized float, e.g. from ``eval_transform``); run the model in
    eval mode (in train mode batch norm would pool the two halves' statistics)."""
    both = model(torch.cat([images, images.flip(-1)]))
    dtype = torch.promote_types(both.dtype, torch.float32)
    plain, mirrored = both.to(dtype).chunk(2)
    return (plain + mirrored) * 0.5
