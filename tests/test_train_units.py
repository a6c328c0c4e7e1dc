"""train()'s small pieces that need no training run."""
import json

import pytest

from tinycnn.train import _keep_metrics_until


def test_resume_keeps_only_the_epochs_of_the_saved_state(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"epoch": e, "step": 10 * e} for e in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"epoch": 4, "st')  # killed mid-write
    _keep_metrics_until(path, 2)
    assert [json.loads(line)["epoch"] for line in path.read_text().splitlines()] == [1, 2]
    _keep_metrics_until(path, 2)  # nothing to drop: left as it is
    assert [json.loads(line)["epoch"] for line in path.read_text().splitlines()] == [1, 2]


def test_a_split_too_small_for_one_step_is_refused_with_the_fix(sample_shards, tmp_path):
    from tinycnn.config import load_config
    from tinycnn.train import train

    # one full batch, but two are accumulated per optimizer step
    cfg = load_config(None, [f"data.root={sample_shards}", "train.batch_size=4096", "train.grad_accum_steps=2",
                             "data.num_workers=0", "train.device=cpu"])
    with pytest.raises(ValueError, match="no optimizer step of train.batch_size=4096.*lower train.batch_size"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    cfg = cfg.replace(["train.batch_size=5000", "train.grad_accum_steps=1"])  # not even one batch: the loader says
    with pytest.raises(ValueError, match=r"no full batch of 5000.*train\.batch_size"):
        train(cfg, tmp_path / "run", progress=False)
