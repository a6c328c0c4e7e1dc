"""timm's own generic model tests, run on every registered tinycnn model.

They live in timm's source distribution, not its wheel: .ci/run fetches the sdist of the installed
timm and points TIMM_TESTS_DIR at its tests/ folder. Elsewhere these skip with that reason.
"""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm

import tinycnn  # noqa: F401

TIMM_TESTS = Path(os.environ.get("TIMM_TESTS_DIR", "")) / "test_models.py"
pytestmark = pytest.mark.skipif(
    not os.environ.get("TIMM_TESTS_DIR") or not TIMM_TESTS.is_file(),
    reason="timm's tests/test_models.py not found: set TIMM_TESTS_DIR to the tests/ folder of timm's "
           "source distribution (`pip download --no-deps --no-binary :all: timm==<version>`), as .ci/run does")


def test_timm_generic_model_tests_pass():
    # -p tinycnn imports tinycnn before timm's module-level list_models() picks the models to test
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tinycnn", str(TIMM_TESTS), "-k", "tinycnn", "-q",
         "-p", "no:cacheprovider", "-W", "ignore"],
        capture_output=True, text=True, cwd=TIMM_TESTS.parent.parent)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    # forward, backward, default cfgs, torchscript, features, fx: 8 tests for each registered model
    assert f"{8 * len(timm.list_models('tinycnn*'))} passed" in last, last


@pytest.fixture(scope="module")
def timm_test_models(request):
    # timm selects its intermediates tests by model module, a list tinycnn is not on: call them directly
    for name in sorted(set(re.findall(r"pytest\.mark\.(\w+)", TIMM_TESTS.read_text()))):
        request.config.addinivalue_line("markers", f"{name}: timm's own")  # its marks, under --strict-markers
    sys.path.insert(0, str(TIMM_TESTS.parent))
    spec = importlib.util.spec_from_file_location("timm_test_models", TIMM_TESTS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(TIMM_TESTS.parent))


@pytest.mark.parametrize("name", timm.list_models("tinycnn*"))
def test_timm_intermediates_tests_pass(timm_test_models, name):
    timm_test_models.test_model_forward_intermediates(name, 1)
    timm_test_models.test_model_forward_intermediates_features(name, 1)
