"""The streaming loader of this checkout against the one of an earlier git revision, side by side in one process.

    python benchmarks/loader_ab.py BASE_REV SHARDS [--rounds 20] [--split train] [--batch 256]

Both versions read the same shards (a tinycnn-prepare folder) with `build_loader(..., num_workers=0)`, one full
pass each, alternating round by round so that a busy machine slows both alike; the medians and best rounds of
wall and CPU time are printed as images/s with the ratio (this checkout / BASE_REV). One torch thread: the
loader's work is the CPU's reading, tar parsing, checks and JPEG decoding.
"""
import argparse
import importlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_revision(rev: str, where: Path):
    """The `tinycnn` package of git revision `rev`, imported as `tinycnn_base` (its imports are relative)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "tinycnn"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    shutil.move(str(where / "tinycnn"), str(where / "tinycnn_base"))
    sys.path.insert(0, str(where))
    with warnings.catch_warnings():  # its models register again under the same names: not used here
        warnings.simplefilter("ignore", UserWarning)
        return importlib.import_module("tinycnn_base")


def one_pass(build_loader, shards: str, split: str, batch: int) -> tuple:
    loader = build_loader(shards, split, batch_size=batch, train=False, num_workers=0)
    wall, cpu = time.perf_counter(), time.process_time()
    images = sum(x.shape[0] for x, _ in loader)
    return images, time.perf_counter() - wall, time.process_time() - cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", help="the git revision to compare with (e.g. a tag, or HEAD~3)")
    parser.add_argument("shards", help="a tinycnn-prepare output folder")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--split", default="train")
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()

    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, str(REPO))
    import tinycnn
    with tempfile.TemporaryDirectory() as tmp:
        base = load_revision(args.base, Path(tmp))
        loaders = {"this checkout": tinycnn.build_loader, args.base: base.build_loader}
        times = {name: [] for name in loaders}
        for _ in range(args.rounds):
            for name, build in loaders.items():
                times[name].append(one_pass(build, args.shards, args.split, args.batch))
    print(f"{'loader':<16} {'images':>7} {'median img/s':>13} {'best img/s':>11} {'median img/CPU-s':>17}")
    rates = {}
    for name, runs in times.items():
        n = runs[0][0]
        wall = [n / w for _, w, _ in runs]
        cpu = [n / c for _, _, c in runs]
        rates[name] = (statistics.median(wall), max(wall), statistics.median(cpu))
        print(f"{name:<16} {n:>7,} {rates[name][0]:>13,.0f} {rates[name][1]:>11,.0f} {rates[name][2]:>17,.0f}")
    new, old = rates["this checkout"], rates[args.base]
    print(f"ratio (this checkout / {args.base}): median {new[0] / old[0]:.3f}, best {new[1] / old[1]:.3f}, "
          f"CPU {new[2] / old[2]:.3f}")


if __name__ == "__main__":
    main()
