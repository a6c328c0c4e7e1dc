"""Shared fixtures. Real-data tests read the Tiny ImageNet sample in place (never copied into the repo).

Set TINYCNN_SAMPLE_DATA to the folder holding `tiny-imagenet-200-sample.zip` and
`tiny-imagenet-hf-sample/`; .ci/run sets it to ../shared/data. Without it, tests look at
../shared/data beside the checkout and skip with a reason when it is not there.
"""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def sample_data_dir():
    env = os.environ.get("TINYCNN_SAMPLE_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def sample_data():
    d = sample_data_dir()
    if not (d / "tiny-imagenet-200-sample.zip").is_file():
        pytest.skip(f"real Tiny ImageNet sample not found at {d}: set TINYCNN_SAMPLE_DATA to the folder "
                    "holding tiny-imagenet-200-sample.zip and tiny-imagenet-hf-sample/")
    return d


@pytest.fixture(scope="session")
def sample_zip(sample_data):
    return sample_data / "tiny-imagenet-200-sample.zip"


@pytest.fixture(scope="session")
def sample_parquet(sample_data):
    d = sample_data / "tiny-imagenet-hf-sample"
    if not d.is_dir():
        pytest.skip(f"parquet sample not found at {d}")
    return d


@pytest.fixture(scope="session")
def sample_shards(sample_zip, tmp_path_factory):
    """The real sample prepared once per session with default settings (450/50 per class + official val as test)."""
    from tinycnn.prepare import prepare

    out = tmp_path_factory.mktemp("shards") / "tiny-sample"
    prepare(sample_zip, out)
    return out
