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


def test_save_every_steps_saves_within_the_epoch_and_resume_continues_from_there(sample_shards, tmp_path,
                                                                                  monkeypatch, capsys):
    from tinycnn import train as train_module
    from tinycnn.config import load_config

    cfg = load_config(None, [f"data.root={sample_shards}", "train.device=cpu", "data.num_workers=0",
                             "train.batch_size=32", "train.epochs=1", "train.max_steps=8", "train.save_every_steps=3",
                             "train.val_subset_size=64", "stage_channels=[8,16,32]", "stage_repeats=[1,1,1]",
                             "train.scheduler.name=none"])
    out = tmp_path / "run"
    real_after_step = train_module._CpuRunEstimate.after_step

    def killed_at_step_5(self, step):
        if step == 5:
            raise RuntimeError("killed")  # as a kill would: nothing saved after the last interval
        real_after_step(self, step)

    monkeypatch.setattr(train_module._CpuRunEstimate, "after_step", killed_at_step_5)
    with pytest.raises(RuntimeError, match="killed"):
        train_module.train(cfg, out, progress=False)
    monkeypatch.setattr(train_module._CpuRunEstimate, "after_step", real_after_step)
    assert not (out / "metrics.jsonl").exists()  # the epoch never ended

    saved_at = []
    real_save = train_module.save_state
    monkeypatch.setattr(train_module, "save_state", lambda *a, **k: (saved_at.append(k["progress"]["step"]),
                                                                       real_save(*a, **k)))
    capsys.readouterr()
    summary = train_module.train(cfg, out, resume=True, progress=False)
    assert "at epoch 0, step 3 of 8" in capsys.readouterr().out   # the save at step 3, not the epoch's start
    assert summary["steps"] == 8 and saved_at == [6, 8]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in records] == [(1, 8)]
