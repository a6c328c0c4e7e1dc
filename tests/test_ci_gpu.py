"""The GPU CI script (.ci/gpu) must not rot between the GPU runs: its --smoke mode runs the same steps on the CPU at
tiny sizes (prepare, the benchmark suite once each, untimed, the short training runs, the profile), the CUDA-only
steps skipped with their reason."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = ["environment", "prepare", "cuda-tests", "benchmarks", "run:eager-streaming", "run:compiled-streaming",
         "run:eager-resident", "run:timm-like-streaming", "profile"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or sys.platform == "win32", reason="the GPU CI script is bash")
def test_the_gpu_ci_script_runs_every_step_on_the_cpu(sample_zip, tmp_path):
    pytest.importorskip("pytest_benchmark", reason="the benchmark step needs the dev extra: pip install -e \".[dev]\"")
    out = tmp_path / "out"
    # its own pytest (the benchmark step) is not a worker of this one; its figures are not measurements, so one
    # thread, as beside other tests
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(OMP_NUM_THREADS="1", PYTHON=sys.executable, PATH=f"{Path(sys.executable).parent}{os.pathsep}"
                                                                   f"{env.get('PATH', '')}")
    proc = subprocess.run(["bash", ".ci/gpu", "--smoke", str(sample_zip), str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200)
    log = (out / "gpu.log").read_text() if (out / "gpu.log").is_file() else ""
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:] + log[-4000:]
    rows = [line.split(None, 2) for line in (out / "summary.txt").read_text().splitlines()[2:] if line.strip()]
    status = {row[0]: row[1] for row in rows}
    assert list(status) == STEPS, proc.stdout[-4000:]
    assert {name for name, s in status.items() if s != "ok"} == {"cuda-tests", "run:compiled-streaming"}, \
        proc.stdout[-4000:]
    for name in ("bench.txt", "profile.txt", "metrics.jsonl", "runs.tar.gz"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
