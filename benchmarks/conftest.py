"""Fixtures and the summary table of the tinycnn benchmark suite (`pytest benchmarks`, see benchmarks/README.md).

Real data: the Tiny ImageNet sample zip, located as in tests/conftest.py (TINYCNN_SAMPLE_DATA, default
../shared/data beside the checkout; every benchmark skips with a reason when it is not there). It is
prepared once per pytest run into a temporary folder (`tinycnn.prepare.prepare(..., holdout_per_class=0)`:
the sample's 5,000 train JPEGs) and its train shards are repeated TINYCNN_BENCH_REPEAT times (hard
links) so that an epoch is long enough to reach a steady state.

Every measured figure goes into _bench.RESULTS and into the benchmark's `extra_info` (so into
`--benchmark-json`); `pytest_terminal_summary` prints them side by side with the goals (benchmarks/README.md).
Timing goals are never asserted: the tests assert only that they ran what they name (counts, shapes).
"""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the test modules import _bench too (pytest's default import mode adds HERE)
    sys.path.insert(0, str(HERE))
import _bench  # noqa: E402
from _bench import ON_CUDA, REPEAT, BenchData, Bench, link_or_copy, read_split  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def sample_data_dir() -> Path:
    """The same rule as tests/conftest.py."""
    env = os.environ.get("TINYCNN_SAMPLE_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def sample_zip() -> Path:
    d = sample_data_dir()
    z = d / "tiny-imagenet-200-sample.zip"
    if not z.is_file():
        pytest.skip(f"real Tiny ImageNet sample not found at {d}: set TINYCNN_SAMPLE_DATA to the folder "
                    "holding tiny-imagenet-200-sample.zip")
    return z


@pytest.fixture(scope="session")
def bench_data(sample_zip, tmp_path_factory) -> BenchData:
    """The sample prepared once (train = its 5,000 train JPEGs), train shards repeated REPEAT times."""
    from tinycnn.prepare import prepare

    tmp = tmp_path_factory.mktemp("bench")
    base = tmp / "sample"
    manifest = prepare(sample_zip, base, holdout_per_class=0, progress=False)
    jpegs, labels = read_split(base, manifest, "train")
    assert len(jpegs) == manifest["splits"]["train"]["num_samples"] > 0

    root = tmp / f"sample-x{REPEAT}"
    root.mkdir()
    train = manifest["splits"]["train"]
    shards = []
    for r in range(REPEAT):
        for s in train["shards"]:
            name = f"train-r{r:02d}-{s['file']}"
            link_or_copy(base / s["file"], root / name)
            shards.append({"file": name, "num_samples": s["num_samples"]})
    for s in manifest["splits"]["val"]["shards"]:
        link_or_copy(base / s["file"], root / s["file"])
    rep = dict(manifest)
    rep["splits"] = {
        "train": {**train, "num_samples": train["num_samples"] * REPEAT, "shards": shards,
                  "class_counts": [c * REPEAT for c in train["class_counts"]]},
        "val": manifest["splits"]["val"],
    }
    (root / "manifest.json").write_text(json.dumps(rep))
    return BenchData(base=base, root=root, jpegs=jpegs, labels=labels, repeat=REPEAT)


@pytest.fixture
def bench_factory(benchmark):
    """bench_factory(group) -> a Bench around this test's `benchmark` fixture."""
    return lambda group: Bench(benchmark, group)


@pytest.fixture(scope="session", autouse=True)
def _cuda_settings():
    """What tinycnn.train sets on CUDA when not deterministic."""
    if ON_CUDA:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    yield


_ORDER = ["test_bench_loader", "test_bench_transfer", "test_bench_augment", "test_bench_train_step",
          "test_bench_end_to_end"]


def pytest_collection_modifyitems(session, config, items):
    """Run the groups in a fixed order (loader, transfer, augment, train step, end to end)."""
    here = Path(__file__).parent

    def ours(item):
        return Path(str(item.fspath)).parent == here

    def key(item):
        stem = Path(str(item.fspath)).stem
        return _ORDER.index(stem) if stem in _ORDER else len(_ORDER)

    if any(ours(i) for i in items):
        items[:] = [i for i in items if not ours(i)] + sorted((i for i in items if ours(i)), key=key)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _bench.RESULTS:
        return
    tr = terminalreporter
    tr.write_sep("=", "tinycnn benchmark summary")
    lines = _bench.summary_lines()
    for line in lines:
        tr.write_line(line)
    out = os.environ.get("TINYCNN_BENCH_SUMMARY")
    if out:
        Path(out).write_text("\n".join(lines) + "\n")
        tr.write_line(f"(summary written to {out})")
