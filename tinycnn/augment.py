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
"""
from __future__ import annotations

import itertools
import numbers
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

__all__ = [
    "JITTER_OPS",
    "PARAM_KEYS",
    "GPUAugment",
    "EvalTransform",
    "eval_transform",
]

#: the colour ops in the numbering used by ``params["jitter_order"]``
JITTER_OPS: Tuple[str, str, str, str] = ("brightness", "contrast", "saturation", "hue")
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
#: the keys of the dict returned by :meth:`GPUAugment.sample`
PARAM_KEYS: Tuple[str, ...] = ("crop_offsets", "flip", "brightness", "contrast", "saturation", "hue",
                               "jitter_order")

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
        if self.normalize:
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return x.to(out_dtype or self.out_dtype).contiguous(memory_format=fmt)

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
    """Random crop (zero padding) + horizontal flip + ColorJitter + normalization, batched on the device.

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

    ``aug(images)`` samples on the images' device (``generator`` optional) and applies.
    """

    def __init__(self, crop_padding: Optional[int] = 4, flip_p: float = 0.5,
                 brightness: _Range = 0.2, contrast: _Range = 0.2, saturation: _Range = 0.2, hue: _Range = 0.05,
                 jitter_p: float = 1.0,
                 mean: Optional[Sequence[float]] = IMAGENET_DEFAULT_MEAN, std: Optional[Sequence[float]] = IMAGENET_DEFAULT_STD,
                 out_dtype: Union[str, torch.dtype] = torch.float32, channels_last: bool = False):
        super().__init__(mean=mean, std=std, out_dtype=out_dtype, channels_last=channels_last)
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

    # -- configuration ------------------------------------------------------------------------

    _CONFIG_KEYS = ("crop_padding", "flip_p", "brightness", "contrast", "saturation", "hue", "jitter_p",
                    "mean", "std", "out_dtype", "channels_last")

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
        for key in ("mean", "std", "brightness", "contrast", "saturation", "hue"):
            if isinstance(cfg.get(key), list):
                cfg[key] = tuple(cfg[key])
        if not enabled:
            cfg.update(crop_padding=0, flip_p=0.0, brightness=0, contrast=0, saturation=0, hue=0)
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
        }

    @property
    def enabled(self) -> bool:
        """False when every random op is off (then ``aug(x) == aug.eval_transform(x)``)."""
        return bool(self.crop_padding or self.flip_p > 0 or self._blend_ops or self._hue_on)

    def extra_repr(self) -> str:
        parts = [f"crop_padding={self.crop_padding}", f"flip_p={self.flip_p}"]
        parts += [f"{k}={list(v) if v else 0}" for k, v in self.ranges.items()]
        parts.append(f"jitter_p={self.jitter_p}")
        return ", ".join(parts) + ", " + super().extra_repr()

    # -- sampling -----------------------------------------------------------------------------

    def sample(self, batch_size: int, generator: Optional[torch.Generator] = None,
               device: Optional[Union[str, torch.device]] = None) -> Dict[str, torch.Tensor]:
        """Per-sample parameters for a batch (see the module docstring), drawn with one torch RNG call.

        ``device`` defaults to the generator's device, else the module's (buffers') device.  With a
        generator on another device the draw happens there and the result is moved to ``device``."""
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
        x = _to_unit_float(images)
        if self._blend_ops or self._hue_on:
            x = self._jitter(x, params)
        return self._finish(x, fmt, out_dtype)

    def eval_transform(self, images: torch.Tensor) -> torch.Tensor:
        """No augmentation: uint8 -> [0, 1] -> this instance's normalization (for val / test)."""
        return EvalTransform.forward(self, images)

    def forward(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        _check_images(images)
        return self.apply(images, self.sample(images.shape[0], generator=generator, device=images.device))
