"""Run folders and configs come from anyone: a run name is never a path, --overwrite replaces only tinycnn's own
output, a lock or marker is never written through a symlink, a saved `pipe:` command never runs by itself, and a
hostile config (alias bomb, wrong encoding, numbers out of range) is one line, at once."""
import errno
import json
import os
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tinycnn.workflow import grid
from tinycnn.config import ConfigError, load_config
from tinycnn.cli import config_from_args, recipe_parser, release_output, run_main
from tinycnn.runs import (LOCK_NAME, MARKER_NAME, RunFolderError, RunLock, claim_folder, folder_kind,
                          holds_results, _describe_holder)

REPO = Path(__file__).resolve().parents[1]
TINY = ["stage_channels=[8,16]", "stage_repeats=[1,1]", "train.batch_size=32", "data.num_workers=0",
        "train.overfit_small=true", "train.overfit_small_size=128", "train.val_subset_size=64", "train.log_every=1"]


def one_error_line(proc) -> str:
    """The recipe failed with exit code 2 and one line on stderr, no traceback: that line."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]


def user_folder(path: Path) -> dict:
    """A folder of the user's own files; returns what it holds, to compare after."""
    (path / "data").mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    (path / "data" / "table.csv").write_text("a,b\n1,2\n")
    return snapshot(path)


def snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


# ============================================================================= a run name is a name

@pytest.mark.parametrize("bad", ["../../x", "/tmp/x", "a/b", "..", ".hidden", "a..b", "a b", "x" * 201])
def test_run_name_must_be_a_plain_name(bad):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"run_name={bad}"])
    assert "run_name must be a plain name" in str(e.value) and "\n" not in str(e.value)


def test_a_run_name_that_climbs_out_of_checkpoints_creates_nothing(tmp_path, run_recipe):
    unique = f"trust-{uuid.uuid4().hex[:8]}"
    checkpoints_before = sorted(os.listdir(REPO / "checkpoints")) if (REPO / "checkpoints").is_dir() else []
    targets = {f"../../{unique}": REPO.parent / unique, f"/tmp/{unique}": Path("/tmp") / unique,
               f"a/{unique}": REPO / "checkpoints" / "a" / unique}
    for name, target in targets.items():
        proc = run_recipe("train", "--data", tmp_path / "no-data", f"run_name={name}")
        assert "run_name must be a plain name" in one_error_line(proc)
        assert not target.exists()
    assert not (tmp_path / "no-data").exists()
    after = sorted(os.listdir(REPO / "checkpoints")) if (REPO / "checkpoints").is_dir() else []
    assert after == checkpoints_before
    # a config file's own name is made a plain name; an explicit one is kept
    (tmp_path / "my config.yaml").write_text("train:\n  epochs: 2\n")
    assert load_config(tmp_path / "my config.yaml").run_name == "my-config"
    grid_name = grid.run_name(3, 0.002, 1e-4, [64, 128, 256], [2, 2, 2])
    assert load_config(None, [f"run_name={grid_name}"]).run_name == grid_name


# ============================================================================= --overwrite replaces only ours

def test_overwrite_refuses_a_folder_of_user_files(tmp_path, run_recipe):
    mine = tmp_path / "mine"
    before = user_folder(mine)
    with pytest.raises(RunFolderError) as e:
        claim_folder(mine, overwrite=True)
    message = str(e.value)
    assert "does not look like a tinycnn run folder" in message and "--overwrite only replaces" in message
    assert "\n" not in message
    assert snapshot(mine) == before and not (mine / LOCK_NAME).exists()  # not even a lock was left there
    # a config.yaml among the user's files does not make it a run folder
    (mine / "config.yaml").write_text("train:\n  epochs: 1\n")
    (mine / "metrics.jsonl").write_text("{}\n")
    before = snapshot(mine)
    with pytest.raises(RunFolderError, match="does not look like a tinycnn run folder"):
        claim_folder(mine, overwrite=True)
    assert snapshot(mine) == before
    # the same from the command line: one line, nothing touched
    line = one_error_line(run_recipe("report", tmp_path / "nothing", "--output", mine, "--overwrite"))
    assert f"{mine} does not look like a tinycnn report folder" in line and "choose another --output" in line
    assert snapshot(mine) == before


def test_overwrite_replaces_a_folder_tinycnn_wrote(tmp_path):
    folder, lock = claim_folder(tmp_path / "run")
    assert json.loads((folder / MARKER_NAME).read_text()) == {"kind": "run"}
    (folder / "metrics.jsonl").write_text("{}\n")
    (folder / "notes.txt").write_text("in a folder proven ours: replaced with it")
    (folder / "state").mkdir()
    (folder / "state" / "progress.json").write_text("{}")
    lock.release()
    said = []
    again, lock = claim_folder(tmp_path / "run", overwrite=True, say=said.append)
    assert again == folder and not holds_results(folder) and "removed the earlier run" in said[0]
    assert (folder / MARKER_NAME).is_file()
    lock.release()
    # another kind of tinycnn output is not replaced by a run
    lr, lock = claim_folder(tmp_path / "lr", what="LR finder result")
    (lr / "lr_finder.json").write_text("{}")
    lock.release()
    with pytest.raises(RunFolderError, match="holds a tinycnn LR finder result, not a run"):
        claim_folder(lr, overwrite=True)
    assert (lr / "lr_finder.json").read_text() == "{}"


def test_an_earlier_versions_folder_is_recognized_by_its_files(tmp_path):
    old = tmp_path / "old"  # no marker: as train.py wrote it before the marker existed
    (old / "state").mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl", "run.json", "best.safetensors", ".config.yaml.abc123.tmp"):
        (old / name).write_text("x")
    assert folder_kind(old) == "run"
    folder, lock = claim_folder(old, overwrite=True, say=lambda m: None)
    assert not holds_results(folder) and folder_kind(folder) == "run"
    lock.release()
    for what, files in (("report", ["report.md"]), ("LR finder result", ["lr_finder.csv", "lr_finder.png"]),
                        ("set of checks", ["checks.json", "augment_grid.png"])):
        f = tmp_path / what.replace(" ", "_")
        f.mkdir()
        for name in files:
            (f / name).write_text("x")
        claim_folder(f, overwrite=True, what=what, say=lambda m: None)[1].release()
        assert not holds_results(f)
    # one file the kind never writes: not recognized, refused
    (tmp_path / "mixed").mkdir()
    for name in ("config.yaml", "metrics.jsonl", "thesis.tex"):
        (tmp_path / "mixed" / name).write_text("x")
    assert folder_kind(tmp_path / "mixed") is None
    with pytest.raises(RunFolderError, match="does not look like"):
        claim_folder(tmp_path / "mixed", overwrite=True)
    assert (tmp_path / "mixed" / "thesis.tex").read_text() == "x"


def test_overwrite_unlinks_a_symlink_never_its_target(tmp_path):
    user = tmp_path / "user"
    before = user_folder(user)
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    folder, lock = claim_folder(tmp_path / "run")
    (folder / "metrics.jsonl").write_text("{}\n")
    (folder / "tb").symlink_to(user, target_is_directory=True)
    (folder / "best.safetensors").symlink_to(precious)
    (folder / "state").mkdir()
    (folder / "state" / "inner").symlink_to(user, target_is_directory=True)
    lock.release()
    claim_folder(folder, overwrite=True, say=lambda m: None)[1].release()
    assert not holds_results(folder)
    assert snapshot(user) == before and precious.read_text() == "keep me"


def test_holds_results_counts_the_marker_like_the_lock(tmp_path):
    folder, lock = claim_folder(tmp_path / "run")
    assert sorted(os.listdir(folder)) == [LOCK_NAME, MARKER_NAME] and not holds_results(folder)
    release_output(folder, lock)  # a run that wrote nothing leaves no folder
    assert not folder.exists()


# ============================================================================= locks and markers are not links

def test_a_symlinked_lock_is_refused_and_its_target_unchanged(tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_NAME).symlink_to(precious)
    with pytest.raises(RunFolderError) as e:
        claim_folder(folder)
    assert str(e.value) == f"{folder / LOCK_NAME} is a symlink: remove it"
    assert precious.read_text() == "keep me"
    (folder / "metrics.jsonl").write_text("{}\n")  # a folder with results: its lock is read, not taken
    with pytest.raises(RunFolderError, match="is a symlink: remove it"):
        claim_folder(folder)
    assert precious.read_text() == "keep me" and not (tmp_path / "run-2").exists()


def test_a_lock_or_marker_that_is_no_plain_file_is_refused(tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    hard = tmp_path / "hard"
    hard.mkdir()
    os.link(precious, hard / LOCK_NAME)  # truncating it would truncate the user's file
    with pytest.raises(RunFolderError, match="has other hard links: remove it"):
        RunLock(hard).acquire()
    assert precious.read_text() == "keep me"
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / LOCK_NAME)
    t0 = time.monotonic()
    with pytest.raises(RunFolderError, match="not a regular file: remove it"):
        claim_folder(fifo)
    assert time.monotonic() - t0 < 10  # never waits for a writer
    marked = tmp_path / "marked"
    marked.mkdir()
    (marked / MARKER_NAME).symlink_to(precious)
    with pytest.raises(RunFolderError, match=f"{MARKER_NAME} is a symlink: remove it"):
        claim_folder(marked)
    assert precious.read_text() == "keep me"
    assert RunLock(marked).acquire() is not None  # the refusal released the lock


def test_a_lock_file_written_by_anyone_names_no_one_it_cannot(tmp_path):
    for text in ("[1, 2]", '{"pid": "x"}', "\xff\xfe", '{"pid": 1, "command": "' + "a\\n" * 1000 + '"}'):
        described = _describe_holder(text)
        assert "\n" not in described and len(described) <= 300


# ============================================================================= saved commands never run

def saved_run(folder: Path, **changes) -> Path:
    """A run folder as train.py leaves it (config.yaml, metrics.jsonl, run.json), with `changes` to its config."""
    data = load_config(None, TINY).to_dict()
    for key, value in changes.items():
        section, name = key.split("__")
        data[section][name] = value
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    (folder / "metrics.jsonl").write_text("")
    (folder / "run.json").write_text("{}")
    return folder


def test_resume_never_runs_a_pipe_command_saved_in_the_run(tmp_path, run_recipe):
    marker = tmp_path / "MARKER"
    command = f"pipe:touch {marker}; cat {{}}"
    run = saved_run(tmp_path / "run", data__root=command)
    line = one_error_line(run_recipe("train", "--resume", "--output", run))
    assert f"--resume: {run / 'config.yaml'} reads its data through a command" in line
    assert f"pass --data '{command}' again" in line
    assert not marker.exists()
    # given again now, it is the user's own: the config is taken (nothing runs at this stage)
    parser = recipe_parser("train", resumable=True)
    cfg = config_from_args(parser.parse_args(["--resume", "--output", str(run), "--data", command]))
    assert cfg.data.root == command and not marker.exists()
    # a --config file is what the user gives now: its pipe: root is theirs
    given = tmp_path / "given.yaml"
    given.write_text(yaml.safe_dump({"data": {"root": command}}))
    assert config_from_args(parser.parse_args(["--config", str(given)])).data.root == command
    assert not marker.exists()


# ============================================================================= hostile configs

def alias_bomb(levels: int = 9, width: int = 9) -> str:
    lines = ['l0: &l0 ["lol"]']
    for i in range(1, levels + 1):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path, run_recipe):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="anchors and aliases"):
        load_config(bomb)
    assert time.monotonic() - t0 < 10
    assert "anchors and aliases" in one_error_line(run_recipe("train", "--config", bomb))
    run = saved_run(tmp_path / "run")  # the same as a saved run's config.yaml: it is read on --resume
    (run / "config.yaml").write_text(alias_bomb())
    t0 = time.monotonic()
    line = one_error_line(run_recipe("train", "--resume", "--output", run))
    assert str(run / "config.yaml") in line and "anchors and aliases" in line and time.monotonic() - t0 < 10


@pytest.mark.parametrize("content, expected", [
    ("run_name: café\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9"),
    (b"train:\n  epochs: 1e400\n", "train.epochs must be an integer, got inf"),
    (b"train:\n  optimizer:\n    lr: 1e400\n", "train.optimizer.lr must be a finite number, got inf"),
    (b"train:\n  optimizer:\n    lr: .nan\n", "train.optimizer.lr must be a finite number, got nan"),
    (b"train:\n  epochs: 1" + b"0" * 100 + b"\n", "train.epochs must be at most 100,000"),
    (b"train:\n  batch_size: 1" + b"0" * 5000 + b"\n", "an integer of more than 4300 digits"),
    (b"train:\n  batch_size: -3\n", "train.batch_size must be a positive integer, got -3"),
    (b"train:\n  seed: -1\n", "train.seed must be >= 0"),
    (b"stage_channels: [100000000, 1, 1]\n", "stage_channels takes at most 64 stages of at most 8,192"),
    (b"grid:\n  lr: [" + b",".join(b"0.0%d" % i for i in range(1, 200)) + b"]\n"
     b"  weight_decay: [" + b",".join(b"0.0%d" % i for i in range(1, 200)) + b"]\n", "at most 10,000 in one grid"),
    (b"1: 2\n", "unknown config key '1'"),
    (b"stage_channels: " + b"[" * 3000 + b"]" * 3000 + b"\n", "nested more than 32 levels deep"),
    (b"x: " + b"a" * (300 << 10) + b"\n", "KiB: not a config file"),
])
def test_a_hostile_config_is_one_line(tmp_path, run_recipe, content, expected):
    path = tmp_path / "hostile.yaml"
    path.write_bytes(content)
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert expected in str(e.value) and "\n" not in str(e.value) and len(str(e.value)) < 400
    assert time.monotonic() - t0 < 10
    line = one_error_line(run_recipe("train", "--config", path))
    assert expected in line


def test_overrides_out_of_range_are_one_line():
    for override, expected in (("train.epochs=1e400", "train.epochs must be an integer"),
                               ("train.epochs=" + "9" * 500, "train.epochs must be at most 100,000"),
                               ("grid.lr=[0.1,1e400]", "grid.lr must be a finite number"),
                               ("train.optimizer.lr=" + "9" * 400, "train.optimizer.lr must be a finite number"),
                               ("train.batch_size=1000000", "train.batch_size must be at most 65,536")):
        with pytest.raises(ConfigError) as e:
            load_config(None, [override])
        assert expected in str(e.value) and "\n" not in str(e.value) and len(str(e.value)) < 400


# ============================================================================= a disk that takes nothing

@pytest.mark.parametrize("code, start, hint", [
    (errno.EROFS, "cannot write to", "choose another --output"),
    (errno.EACCES, "cannot write to or read", "fix its permissions"),
    (errno.EPERM, "cannot write to or read", "fix its permissions"),
    (errno.ENOSPC, "cannot write to", "free space"),
    (errno.EDQUOT, "cannot write to", "free space")])
def test_an_output_that_takes_nothing_is_one_line(code, start, hint, capsys):
    def main():
        raise OSError(code, os.strerror(code), "/somewhere/run/metrics.jsonl")

    def broken_disk():
        raise OSError(errno.EIO, os.strerror(errno.EIO), "/somewhere/run/metrics.jsonl")

    assert run_main(main) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {start} /somewhere/run/metrics.jsonl: {os.strerror(code)}: ")
    assert hint in err and len(err.splitlines()) == 1
    with pytest.raises(OSError):  # other OSErrors are not hidden behind a line
        run_main(broken_disk)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_one_line(tmp_path, run_recipe):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        line = one_error_line(run_recipe("report", tmp_path / "nothing", "--output", parent / "report"))
        assert line.startswith(f"error: cannot write to or read {parent / 'report'}: Permission denied")
        assert "choose another --output" in line and not (parent / "report").exists()
    finally:
        parent.chmod(0o755)


# ============================================================================= the grid's run folders

def test_the_grid_never_empties_a_folder_it_did_not_write(sample_shards, tmp_path):
    cfg = load_config(REPO / "recipes" / "configs" / "grid_search.yaml",
                      [f"data.root={sample_shards}", "grid.lr=[0.001]", "grid.weight_decay=[1e-4]",
                       "grid.stage_channels=[[8,16]]", "grid.stage_repeats=[[1,1]]", "grid.epochs=1",
                       "train.batch_size=32", "train.max_steps=1", "data.num_workers=0", "train.device=cpu"])
    out = tmp_path / "grid"
    before = user_folder(out / grid.grid_plan(cfg)[0].name)
    import tinycnn.train

    def no_training(*args, **kwargs):
        raise AssertionError("trained into a folder that is not tinycnn's")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tinycnn.train, "train", no_training)
        for overwrite in (False, True):
            with pytest.raises(RunFolderError, match="does not look like a tinycnn run folder"):
                grid.run_grid(cfg, out, progress=False, overwrite=overwrite)
    assert snapshot(out / grid.grid_plan(cfg)[0].name) == before


def test_hparams_are_never_written_through_a_symlinked_tb(tmp_path):
    user = tmp_path / "user"
    (user / "hparams").mkdir(parents=True)
    (user / "hparams" / "mine.txt").write_text("keep me")
    run = tmp_path / "gs_000"
    run.mkdir()
    (run / "tb").symlink_to(user, target_is_directory=True)
    result = {"lr": 0.1, "weight_decay": 0.0, "stage_channels": [8], "stage_repeats": [1], "val_accuracy": 0.5}
    assert grid.write_hparams(result, run) is None
    assert (user / "hparams" / "mine.txt").read_text() == "keep me"


# ============================================================================= a real run folder, end to end

@pytest.mark.slow
def test_a_run_folder_train_wrote_is_replaced_and_one_it_did_not_is_not(sample_shards, tmp_path, run_recipe):
    out = tmp_path / "run"
    args = ["--data", sample_shards, "--output", out, "train.epochs=1", "--no-progress", *TINY]
    assert run_recipe("train", *args).returncode == 0
    assert folder_kind(out) == "run" and json.loads((out / MARKER_NAME).read_text()) == {"kind": "run"}
    (out / MARKER_NAME).unlink()  # as an earlier version left it: recognized by its files alone
    assert folder_kind(out) == "run", sorted(os.listdir(out))
    again = run_recipe("train", *args, "--overwrite")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "--overwrite: removed the earlier run" in " ".join(again.stdout.split())
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    mine = tmp_path / "mine"
    before = user_folder(mine)
    line = one_error_line(run_recipe("train", *[a if a != out else mine for a in args], "--overwrite"))
    assert "does not look like a tinycnn run folder" in line and snapshot(mine) == before


def test_resumed_metrics_are_never_read_or_written_through_a_link(tmp_path):
    from tinycnn.train import _keep_metrics_until

    secret = tmp_path / "secret.txt"
    secret.write_text('{"epoch": 9}\nuser data\n')
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").symlink_to(secret)
    with pytest.raises(ValueError, match="not a regular file"):
        _keep_metrics_until(run / "metrics.jsonl", 1)
    assert secret.read_text() == '{"epoch": 9}\nuser data\n'


def test_damaged_metrics_lines_are_dropped_on_resume(tmp_path):
    from tinycnn.train import _keep_metrics_until

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1}\n[1, 2]\n{"epoch": "x"}\n' + "[" * 5000 + "\n" + '{"epoch": 2}\n{"epoch": 3}\n')
    _keep_metrics_until(path, 2)
    assert path.read_text() == '{"epoch": 1}\n{"epoch": 2}\n'
