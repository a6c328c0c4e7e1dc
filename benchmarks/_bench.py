"""Shared settings, result registry and helpers of the benchmark suite (imported by conftest and the tests)."""
import io
import os
import platform
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from tinycnn.environment import available_cpus

# ----------------------------------------------------------------------------- settings


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.type == "cuda"
NCORES = available_cpus()
#: train shards repeated this many times (18 x 5,000 = 90,000 images = one full Tiny ImageNet epoch)
REPEAT = _env_int("TINYCNN_BENCH_REPEAT", 18 if ON_CUDA else 4)
#: torch.compile variants of the train step (off on CPU by default: compiling takes ~1 min per variant)
COMPILE = _env_flag("TINYCNN_BENCH_COMPILE", ON_CUDA)
#: fewer variants and rounds (.ci/gpu): the main train-step variants only, one round of the slow baselines
QUICK = _env_flag("TINYCNN_BENCH_QUICK", False)
#: images per train step (the recipe's default batch on CUDA; small on CPU to keep the run short)
BATCH = _env_int("TINYCNN_BENCH_BATCH", 256 if ON_CUDA else 32)
#: an H100's bf16 dense peak (measured), for the model-FLOPs utilisation
PEAK_BF16_FLOPS = 798e12

def sync():
    if ON_CUDA:
        torch.cuda.synchronize()


def machine() -> Dict[str, str]:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"cpu": cpu, "cores": str(NCORES), "torch": torch.__version__, "gpu": gpu, "device": str(DEVICE),
            "python": platform.python_version()}


# ----------------------------------------------------------------------------- results and goals

RESULTS: "OrderedDict[str, dict]" = OrderedDict()


def value(key: str) -> Optional[float]:
    r = RESULTS.get(key)
    return None if r is None else r["value"]


def ratio_of(num: str, den: str, scale: float = 1.0) -> Optional[float]:
    a, b = value(num), value(den)
    if a is None or b is None or b == 0:
        return None
    return a / (b * scale)


@dataclass
class Goal:
    group: str
    text: str
    compute: Callable[[], Optional[float]]
    target: float
    kind: str = "ratio"        # ratio (x), fraction (%), rate (img/s)
    higher_is_better: bool = True
    gpu_only: bool = False
    note: str = ""


def _fmt(v: Optional[float], kind: str) -> str:
    """A goal's figure: kind ratio (x), fraction (%) or img/s, written like the measured values."""
    if v is None:
        return "-"
    return _value_text({"value": v, "unit": "x" if kind == "ratio" else kind})


GOALS: List[Goal] = [
    Goal("loader", "build_loader, all cores / original per-sample pipeline, all cores",
         lambda: ratio_of("loader/ours_all", "loader/original_all"), 5.0, "ratio"),
    Goal("loader", "build_loader, all cores / decode ceiling x cores",
         lambda: ratio_of("loader/ours_all", "loader/decode_ceiling_all"), 0.70, "fraction"),
    Goal("host-to-device", "pinned uint8 batch, non_blocking / raw pinned bandwidth",
         lambda: ratio_of("h2d/pinned_uint8_non_blocking", "h2d/raw_pinned"), 0.80, "fraction", gpu_only=True),
    Goal("host-to-device", "train steps fed by DevicePrefetcher / steps on data already on the device",
         lambda: ratio_of("h2d/overlap_prefetcher", "h2d/overlap_resident"), 0.98, "fraction", gpu_only=True,
         note="'fully hidden' read as <= 2% slower than no copy"),
    Goal("augment", "GPUAugment time / train-step time (bf16, channels_last, apply compiled as by default)",
         lambda: value("augment/fraction_of_step"), 0.05, "fraction", higher_is_better=False, gpu_only=True),
    Goal("train-step", "eager, bf16 + channels_last (one H100)",
         lambda: value("train/eager_bf16_cl"), 50_000, "img/s", gpu_only=True),
    Goal("train-step", "torch.compile, bf16 + channels_last (one H100)",
         lambda: value("train/compiled_bf16_cl"), 80_000, "img/s", gpu_only=True),
    Goal("end-to-end", "streaming epoch (warm) / train step + GPUAugment on device batches",
         lambda: ratio_of("e2e/streaming", "e2e/synthetic"), 0.90, "fraction", gpu_only=True),
    Goal("end-to-end", "device-resident epoch / train step + GPUAugment on device batches",
         lambda: ratio_of("e2e/resident", "e2e/synthetic"), 0.90, "fraction", gpu_only=True),
]


def record(group: str, key: str, label: Optional[str], v: float, unit: str, note: str = "") -> float:
    RESULTS[key] = {"group": group, "label": label, "value": float(v), "unit": unit, "note": note}
    return float(v)


class Bench:
    """The `benchmark` fixture plus our own bookkeeping: best-of-rounds wall time (CUDA synchronized),
    images/s, ratios, all recorded in RESULTS and benchmark.extra_info."""

    def __init__(self, benchmark, group: str):
        self.benchmark = benchmark
        benchmark.group = group
        self.group = group
        self.times: List[float] = []
        self.calls = 0
        self.result = None

    def run(self, fn: Callable, *, rounds: int, warmup: int = 0, setup: Optional[Callable] = None) -> float:
        """Run fn (through benchmark.pedantic) warmup + rounds times; return the best round in seconds.

        Works with --benchmark-disable too (one call then)."""
        times = []

        def target(*args, **kwargs):
            sync()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            times.append(time.perf_counter() - t0)
            self.result = out
            return out

        self.benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=warmup, iterations=1)
        self.calls = len(times)  # warm-up rounds included (1 call with --benchmark-disable)
        self.times = times[-rounds:]
        self.benchmark.extra_info["rounds_s"] = [round(t, 4) for t in self.times]
        return min(self.times)

    def record(self, key: str, label: Optional[str], v: float, unit: str, note: str = "", **info) -> float:
        """RESULTS[key] = v and extra_info[key without its group] = v; label None: not a row of the table."""
        record(self.group, key, label, v, unit, note)
        self.benchmark.extra_info[f"{key.split('/', 1)[1]} [{unit}]"] = float(v)
        for k, x in info.items():
            self.benchmark.extra_info[k] = x
        return float(v)

    def rate(self, key: str, label: str, items: int, seconds: float, unit: str = "img/s", note: str = "",
             **info) -> float:
        return self.record(key, label, items / seconds, unit, note, items=items, seconds=round(seconds, 4), **info)

    def ratio(self, name: str, num: str, den: str, scale: float = 1.0, note: Optional[str] = None) -> Optional[float]:
        """extra_info[name] = num / (den * scale) when both were measured; `note` (a format string such as
        "{:.0%} of raw") is then added to num's note in the table."""
        r = ratio_of(num, den, scale)
        if r is not None:
            self.benchmark.extra_info[name] = round(r, 4)
            if note:
                old = RESULTS[num]["note"]
                RESULTS[num]["note"] = (old + "; " if old else "") + note.format(r)
        return r


# ----------------------------------------------------------------------------- train step


def make_step(*, channels_last: bool, bf16: bool, compiled: bool = False, augment: bool = False,
              compile_augment="auto", **model_kwargs):
    """tinycnn.step.TrainStep as training builds it (tinycnn.plan.build_training) from the recipe's defaults:
    timm's fused AdamW, label smoothing 0.1; the default model unless model_kwargs say otherwise.

    augment=False: the step takes normalized float batches (the step alone); True: uint8 batches and a
    GPUAugment on the device (its apply compiled per compile_augment: "auto" = on CUDA, the library default).
    Returns (step(x, y) -> loss, model, optimizer)."""
    import json

    from tinycnn.config import load_config
    from tinycnn.plan import build_training

    overrides = [f"train.channels_last={str(channels_last).lower()}", f"train.compile={str(compiled).lower()}",
                 f"train.mixed_precision={'bf16' if bf16 else 'no'}"]
    num_classes = model_kwargs.pop("num_classes", 200)
    overrides += [f"{key}={json.dumps(value)}" for key, value in model_kwargs.items()]
    cfg = load_config(None, overrides)
    run = build_training(cfg, num_classes, device=DEVICE, augment=augment,
                         compile_augment=compile_augment)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return run.step(x, y)[0]

    step.train_step = run.step
    return step, run.model, run.optimizer


def optimizer_steps(optimizer: torch.optim.Optimizer) -> int:
    """How many optimizer steps were taken (from the first parameter's state)."""
    p = optimizer.param_groups[0]["params"][0]
    return int(optimizer.state[p]["step"]) if p in optimizer.state else 0


def synthetic_batch(batch: int, *, channels_last: bool = False, num_classes: int = 200, seed: int = 0):
    """A normalized float batch and labels already on the device."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 64, 64, generator=g).to(DEVICE)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, num_classes, (batch,), generator=g).to(DEVICE)


def real_uint8_batch(jpegs: List[bytes], batch: int) -> torch.Tensor:
    """The first `batch` sample images (repeated if needed), decoded, uint8 (B, 3, 64, 64), on the device."""
    from torchvision.io import ImageReadMode, decode_jpeg
    data = [torch.frombuffer(bytearray(jpegs[i % len(jpegs)]), dtype=torch.uint8) for i in range(batch)]
    return torch.stack(decode_jpeg(data, mode=ImageReadMode.RGB)).to(DEVICE)


# ----------------------------------------------------------------------------- data

class JpegDataset(torch.utils.data.Dataset):
    """The original project's per-sample pipeline over the same JPEG bytes: PIL decode + torchvision.transforms."""

    def __init__(self, jpegs: List[bytes], labels: List[int], length: Optional[int] = None):
        import torchvision.transforms as T
        self.jpegs, self.labels = jpegs, labels
        self.length = len(jpegs) if length is None else length  # > len(jpegs): the sample repeated
        self.transform = T.Compose([
            T.RandomCrop(64, padding=4),
            T.RandomHorizontalFlip(),
            T.ColorJitter(0.2, 0.2, 0.2, 0.05),
            T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ])

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        from PIL import Image
        i %= len(self.jpegs)
        img = Image.open(io.BytesIO(self.jpegs[i])).convert("RGB")
        return self.transform(img), self.labels[i]


@dataclass
class BenchData:
    base: Path                  # the prepared sample (train: 5,000 images, val: the official val images)
    root: Path                  # the same with the train shards repeated REPEAT times
    jpegs: List[bytes]          # the train JPEG bytes (shard order)
    labels: List[int]
    repeat: int

    @property
    def num_train(self) -> int:
        return len(self.jpegs) * self.repeat


def read_split(base: Path, manifest: dict, split: str):
    """The JPEG bytes and labels of a split, in shard order (tinycnn.tar, the library's own reader)."""
    from tinycnn.tar import tar_samples

    jpegs, labels = [], []
    for s in manifest["splits"][split]["shards"]:
        for sample in tar_samples(base / s["file"]):
            jpegs.append(sample["jpg"])
            labels.append(int(sample["cls"]))
    return jpegs, labels


def link_or_copy(src: Path, dst: Path):
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copyfile(src, dst)


# ----------------------------------------------------------------------------- summary

def _value_text(r: dict) -> str:
    v, unit = r["value"], r["unit"]
    if unit in ("img/s", "steps/s"):
        return f"{v:,.0f} {unit}"
    if unit == "GB/s":
        return f"{v:.2f} GB/s"
    if unit == "fraction":
        return f"{v:.1%}"
    if unit == "x":
        return f"{v:.2f}x"
    if unit == "FLOP":
        return f"{v / 1e9:.3f} GFLOP"
    return f"{v:.4g} {unit}"


def summary_lines() -> List[str]:
    m = machine()
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu']}, torch {m['torch']}, "
             f"python {m['python']}, device {m['device']}",
             f"settings: TINYCNN_BENCH_REPEAT={REPEAT} (train images per epoch: {REPEAT} x sample), "
             f"TINYCNN_BENCH_BATCH={BATCH}, TINYCNN_BENCH_COMPILE={int(COMPILE)}, TINYCNN_BENCH_QUICK={int(QUICK)}", ""]
    rows = [r for r in RESULTS.values() if r["label"]]
    w = max([len(r["label"]) for r in rows] + [10])
    lines.append(f"{'group':<15} {'figure':<{w}}  {'value':>18}  note")
    for r in rows:
        lines.append(f"{r['group']:<15} {r['label']:<{w}}  {_value_text(r):>18}  {r['note']}")
    lines += ["", "goals:"]
    w = max(len(g.text) for g in GOALS)
    lines.append(f"{'group':<15} {'goal':<{w}}  {'measured':>14}  {'target':>14}  status")
    for g in GOALS:
        v = g.compute()
        target = ("<= " if not g.higher_is_better else ">= ") + _fmt(g.target, g.kind)
        if v is None:
            status = "not measured" + (f" (GPU goal, device here: {DEVICE.type})" if g.gpu_only and not ON_CUDA else "")
        elif g.gpu_only and not ON_CUDA:
            status = "GPU goal: not assessed on CPU"
        else:
            met = v >= g.target if g.higher_is_better else v <= g.target
            status = "met" if met else "NOT met"
        note = f" ({g.note})" if g.note else ""
        lines.append(f"{g.group:<15} {g.text:<{w}}  {_fmt(v, g.kind):>14}  {target:>14}  {status}{note}")
    return lines

