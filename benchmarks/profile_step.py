"""Kernels and time per train step, under torch.profiler: the step alone, + GPUAugment with apply eager,
+ GPUAugment with apply compiled (TrainStep's default on CUDA).  Eager GPUAugment is estimated at ~130
small kernels a step; this counts them on the device at hand.

    python benchmarks/profile_step.py                      # default model, bf16 + channels_last, batch 256
    python benchmarks/profile_step.py --batch 8 --steps 2 --out profile.txt   # what .ci/gpu --smoke runs

On CUDA it counts kernel launches (CUDA events of the profiler) per step; on the CPU, aten ops (nested
calls included). The table of the slowest ops of the eager-apply variant follows.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import DEVICE, ON_CUDA, make_step, sync  # noqa: E402

VARIANTS = [("step alone (normalized float batch)", dict(augment=False)),
            ("step + GPUAugment, apply eager", dict(augment=True, compile_augment=False)),
            ("step + GPUAugment, apply compiled", dict(augment=True, compile_augment=True))]


def profile(kwargs, batch: int, steps: int, model_kwargs):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step, model, _ = make_step(channels_last=True, bf16=True, **kwargs, **model_kwargs)
    g = torch.Generator().manual_seed(0)
    if kwargs["augment"]:
        x = torch.randint(0, 256, (batch, 3, 64, 64), dtype=torch.uint8, generator=g).to(DEVICE)
    else:
        x = torch.randn(batch, 3, 64, 64, generator=g).to(DEVICE).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, model.num_classes, (batch,), generator=g).to(DEVICE)
    for _ in range(3):                                   # compile, cudnn autotuning, allocator warm-up
        step(x, y)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ON_CUDA else [])
    with torch_profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step(x, y)
        sync()
        seconds = time.perf_counter() - t0
    if ON_CUDA:
        launches = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    else:
        launches = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    return launches / steps, 1000 * seconds / steps, prof


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--small", action="store_true", help="a small model (stage_channels 16/32/64), for the CPU")
    parser.add_argument("--out", help="also write the report to this file")
    args = parser.parse_args(argv)
    model_kwargs = {"stage_channels": [16, 32, 64]} if args.small else {}
    unit = "CUDA kernels" if ON_CUDA else "aten ops"
    lines = [f"device {DEVICE}, batch {args.batch}, {args.steps} profiled steps, bf16 + channels_last, "
             f"{'small' if args.small else 'default'} model", f"{'variant':<40} {unit + ' / step':>20} {'ms / step':>10}"]
    eager_prof, short = None, []
    for name, kwargs in VARIANTS:
        if kwargs.get("compile_augment") and not ON_CUDA:
            lines.append(f"{name:<40} {'skipped: inductor on the CPU compiles for ~1 min':>32}")
            continue
        per_step, ms, prof = profile(kwargs, args.batch, args.steps, model_kwargs)
        lines.append(f"{name:<40} {per_step:>20.0f} {ms:>10.2f}")
        short.append(f"{name.split(',')[-1].split('(')[0].strip()}: {per_step:.0f} {unit.split()[-1]}, {ms:.2f} ms")
        if kwargs.get("compile_augment") is False:
            eager_prof = prof
    if eager_prof is not None:
        sort = "cuda_time_total" if ON_CUDA else "cpu_time_total"
        lines += ["", f"slowest ops, step + GPUAugment with apply eager (sorted by {sort}):",
                  eager_prof.key_averages().table(sort_by=sort, row_limit=15)]
    lines.insert(2, "per step: " + "; ".join(short))   # one line for .ci/gpu's table
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
