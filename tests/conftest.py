"""Shared fixtures. The end-to-end tests run on the Tiny ImageNet sample: the real one when it is there, read in place
(never copied into the repo), else a synthetic one of the same layouts, sizes and quirks (tests/synthetic.py),
written once per pytest run into pytest's temporary folder. So every test runs on a fresh clone.

Set TINYCNN_SAMPLE_DATA to the folder holding `tiny-imagenet-200-sample.zip` and `tiny-imagenet-hf-sample/`;
.ci/run sets it to ../shared/data. Without it, tests look at ../shared/data beside the checkout. Tests whose claim
is about the real images themselves are marked `real_data` and skip with a reason when the real sample is not there
(TINYCNN_SAMPLE_DATA=/nonexistent runs the suite as a clone without it does).

`run_recipe` runs a recipe script in the test's process; tests start a real process only where one is what
they check (DDP, a signal through a launcher, a lock held elsewhere, a fresh interpreter).
"""
import contextlib
import ctypes
import importlib.util
import io
import multiprocessing
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

import synthetic

REPO = Path(__file__).resolve().parents[1]


def keep_freed_memory_in_the_heap():
    """glibc gives every freed block over 32 MB (a batch's activations) back to the kernel and faults it in again on
    the next step: a third of a small CPU training's time went to page faults. Kept in the heap instead, the tests
    that train use about a quarter less CPU. For this process (mallopt) and every process it starts (glibc reads
    the same settings from the environment); elsewhere than glibc, nothing to do."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return
    os.environ.setdefault("MALLOC_MMAP_MAX_", "0")  # no block of its own for large allocations
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(1 << 30))  # nor the heap's top, up to 1 GB
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
    libc = ctypes.CDLL(None)
    libc.mallopt(M_MMAP_MAX, int(os.environ["MALLOC_MMAP_MAX_"]))
    libc.mallopt(M_TRIM_THRESHOLD, int(os.environ["MALLOC_TRIM_THRESHOLD_"]))


keep_freed_memory_in_the_heap()

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n N`: N tests at once, each (and each process it starts) on one thread: the tests' tensors are tiny,
    # and a second thread mostly spins waiting for work that another test could have done
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # a worker holds execnet's threads (and a test's HTTP server thread), and a loader worker forked
    # from such a process can wait forever on a message that never comes. A forkserver is a fresh single-threaded
    # process to fork them from (preloaded, so each starts in a fraction of a second); tests about the start
    # methods themselves set theirs in a process of their own.
    multiprocessing.set_start_method("forkserver", force=True)
    multiprocessing.set_forkserver_preload(["torch", "tinycnn"])


def sample_data_dir():
    env = os.environ.get("TINYCNN_SAMPLE_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def has_real_sample():
    return (sample_data_dir() / synthetic.ZIP_NAME).is_file()


# The files that take longest, longest first (`pytest --durations`): `pytest -n 2` hands out whole files in
# collection order, and one of these handed out last would keep one worker busy long after the other is done.
LONGEST_FILES = ["test_train.py", "test_grid.py", "test_multinode.py", "test_ci_gpu.py", "test_spawn.py",
                 "test_recipe_options.py", "test_report.py", "test_runs.py", "test_prepare.py", "test_group_signal.py"]


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: without it installed, nothing to do
def pytest_xdist_make_scheduler(config, log):
    """`pytest -n N`: a worker takes whole files (a file's tests share its fixtures: the two-process training, the
    grid, the report's project), in collection order (xdist's default, by test count, would hand the longest last).
    --dist load (the default with -n) becomes this; another --dist stays as given."""
    if config.getoption("dist") == "load":
        from xdist.scheduler import LoadFileScheduling

        config.option.loadscopereorder = False
        return LoadFileScheduling(config, log)
    return None


def pytest_collection_modifyitems(config, items):
    """The longest files first; without the real sample, the tests marked real_data skip."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order stays
    if has_real_sample():
        return
    skip = pytest.mark.skip(reason=f"real Tiny ImageNet sample not found at {sample_data_dir()}: set "
                                   "TINYCNN_SAMPLE_DATA to the folder holding tiny-imagenet-200-sample.zip and "
                                   "tiny-imagenet-hf-sample/")
    for item in items:
        if item.get_closest_marker("real_data"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """A synthetic sample folder (zip, and parquet files when pyarrow is installed), whether or not the real one is
    there: see tests/synthetic.py."""
    return synthetic.write_sample(tmp_path_factory.mktemp("synthetic-sample"))


@pytest.fixture(scope="session")
def sample_data(request):
    """The folder holding the sample zip and parquet files: the real sample when it is there, else the synthetic one
    (looked up only then, so a run with the real sample does not write it)."""
    if has_real_sample():
        return sample_data_dir()
    return request.getfixturevalue("synthetic_data")


@pytest.fixture(scope="session")
def sample_zip(sample_data):
    return sample_data / synthetic.ZIP_NAME


@pytest.fixture(scope="session")
def sample_parquet(sample_data):
    d = sample_data / synthetic.PARQUET_DIR
    if not d.is_dir():  # the synthetic sample has none without pyarrow (the parquet extra)
        pytest.skip(f"parquet sample not found at {d}")
    return d


@pytest.fixture(scope="session")
def sample_shards(sample_zip, tmp_path_factory):
    """The sample prepared once per pytest run with default settings (450/50 per class + official val as test)."""
    from tinycnn.prepare import prepare

    out = tmp_path_factory.mktemp("shards") / "tiny-sample"
    prepare(sample_zip, out)
    return out


@pytest.fixture(scope="session")
def run_recipe():
    """`run_recipe(name, *args)` runs recipes/NAME.py in this process as its command line does (argv, run_main's
    one-line errors, exit code) and returns a CompletedProcess with what it printed. For tests where no process
    boundary is under test: it saves a fresh interpreter (seconds of imports) per run."""
    return _run_recipe


def load_recipe(name):
    """recipes/NAME.py as a module, loaded from the checkout's file as `python recipes/NAME.py` loads it."""
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_recipe(name, *args):
    from tinycnn import cli as recipe

    argv = [f"recipes/{name}.py", *map(str, args)]
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.setattr(sys, "argv", argv)
        mp.chdir(REPO)  # relative paths (recipes/configs/...) as from the checkout
        mp.delenv("TINYCNN_TRACEBACK", raising=False)  # errors as the user sees them
        # the parent-death signal is for a trainer under a launcher: never arm it on pytest itself
        mp.setattr(recipe, "die_with_launcher", lambda: None)
        try:
            code = recipe.run_main(load_recipe(name).main)
        except SystemExit as e:  # argparse: --help, a bad flag
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if code == 130 or "SIGINT at step" in err.getvalue():
        raise KeyboardInterrupt  # Ctrl-C stopped the recipe (train saves its state first): stop pytest too
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """3 classes of 16 noise images (4 each held out for val) through tinycnn-prepare: an epoch is 3 steps."""
    import zipfile

    import numpy as np
    from PIL import Image

    from tinycnn.prepare import prepare

    top, wnids, files, annotations = "tiny-imagenet-200/", ["n01000000", "n02000000", "n03000000"], {}, []
    generator = np.random.default_rng(0)

    def noise_jpeg(c):
        pixels = generator.integers(0, 128, (64, 64, 3), dtype=np.uint8) + np.uint8(40 * c)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG")
        return buffer.getvalue()

    for c, wnid in enumerate(wnids):
        for i in range(16):
            files[f"{top}train/{wnid}/images/{wnid}_{i}.JPEG"] = noise_jpeg(c)
        files[f"{top}val/images/val_{c}.JPEG"] = noise_jpeg(c)  # the official val: the test split
        annotations.append(f"val_{c}.JPEG\t{wnid}\t0\t0\t63\t63")
    files[top + "wnids.txt"] = "\n".join(wnids).encode()
    files[top + "val/val_annotations.txt"] = ("\n".join(annotations) + "\n").encode()
    root = tmp_path_factory.mktemp("tiny")
    with zipfile.ZipFile(root / "tiny.zip", "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    prepare(root / "tiny.zip", root / "shards", holdout_per_class=4, progress=False)
    return root / "shards"
