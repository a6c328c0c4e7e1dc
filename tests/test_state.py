"""Resumable state without pickle (tinycnn.state): exact round trips, atomic saves, and folders others wrote."""
import copy
import json
import os
import pickle
import random
import shlex
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from timm.optim import create_optimizer_v2

import tinycnn.state
from tinycnn.state import StateError, has_saved_state, load_state, save_state

PROGRESS = {"epoch": 2, "step": 6, "best_accuracy": 0.25, "best_epoch": 1, "reason": "epoch"}


def cpu_accelerator(rank=0, world=1, scaler=None):
    """What save_state/load_state use of an Accelerator, for one CPU process without accelerate's global state."""
    return SimpleNamespace(is_main_process=rank == 0, process_index=rank, num_processes=world,
                           device=torch.device("cpu"), scaler=scaler, wait_for_everyone=lambda: None)


def small_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5))


OPTIMIZERS = {
    # the project's default: timm's param groups (no weight decay on norms and biases), fused on the CPU
    "adamw-timm-fused": lambda m: create_optimizer_v2(m, "adamw", lr=1e-2, weight_decay=0.05, betas=(0.9, 0.99),
                                                      fused=True),
    "adam-amsgrad": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, amsgrad=True),
    "sgd-momentum": lambda m: create_optimizer_v2(m, "sgd", lr=0.1, weight_decay=1e-4, momentum=0.9, nesterov=True),
    "adamp-int-step": lambda m: create_optimizer_v2(m, "adamp", lr=1e-3, weight_decay=0.01),  # step: a python int
}


class Run:
    """A model, its optimizer and an lr schedule, stepped on inputs drawn from every generator a run uses."""

    def __init__(self, optimizer_name, seed=0):
        self.model = small_model(seed)
        self.optimizer = OPTIMIZERS[optimizer_name](self.model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1 / (1 + s))

    def step(self):
        x = torch.rand(4, 3, 8, 8) + random.random() + float(np.random.rand())
        self.model(x).square().mean().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def save(self, folder, progress=PROGRESS, **kw):
        save_state(folder, accelerator=cpu_accelerator(**kw), model=self.model, optimizer=self.optimizer,
                   scheduler=self.scheduler, progress=progress)

    def load(self, folder, **kw):
        return load_state(folder, accelerator=cpu_accelerator(**kw), model=self.model, optimizer=self.optimizer,
                          scheduler=self.scheduler)

    def params(self):
        return [p.detach().clone() for p in self.model.state_dict().values()]


def assert_same_tree(a, b):
    """Equal state_dicts: tensors bitwise (dtype and shape too), everything else ==, tuples stay tuples."""
    assert type(a) is type(b), (a, b)
    if torch.is_tensor(a):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_tree(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tree(x, y)
    else:
        assert a == b


def seeded(seed=0):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


@pytest.fixture
def saved(tmp_path):
    """A valid state folder (AdamW, timm's groups) after three steps, and the run that saved it."""
    seeded()
    run = Run("adamw-timm-fused")
    for _ in range(3):
        run.step()
    run.save(tmp_path / "state")
    return tmp_path / "state", run


def one_line_refusal(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg and "Traceback" not in msg
    for w in words:
        assert w in msg, msg
    return msg


# ============================================================================= exact round trips

@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_loaded_state_continues_bitwise_like_the_run_that_saved_it(tmp_path, name):
    seeded()
    run = Run(name)
    for _ in range(3):
        run.step()
    run.save(tmp_path / "state")
    # deep copies: a state_dict holds the live tensors, which the next steps change in place
    saved_optimizer, saved_scheduler = copy.deepcopy(run.optimizer.state_dict()), run.scheduler.state_dict()
    run.step()
    run.step()
    expected = run.params(), torch.rand(3), random.random(), np.random.rand()

    seeded(123)  # other generators, other weights: all of it must come from the folder
    fresh = Run(name, seed=1)
    progress = fresh.load(tmp_path / "state")
    assert progress == PROGRESS
    assert_same_tree(fresh.optimizer.state_dict(), saved_optimizer)
    assert fresh.scheduler.state_dict() == saved_scheduler
    fresh.step()
    fresh.step()
    got = fresh.params(), torch.rand(3), random.random(), np.random.rand()
    assert all(torch.equal(a, b) for a, b in zip(got[0], expected[0]))
    assert torch.equal(got[1], expected[1]) and got[2:] == expected[2:]


def test_the_folder_holds_safetensors_and_json_only(saved):
    folder, run = saved
    progress = json.loads((folder / "progress.json").read_text())
    slot = folder / progress["slot"]
    assert {p.name for p in folder.iterdir()} == {"progress.json", progress["slot"]}
    assert {p.name for p in slot.iterdir()} == {"model.safetensors", "optimizer.safetensors", "optimizer.json",
                                                "scheduler.json", "rng-0.safetensors", "rng-0.json"}
    for path in slot.iterdir():
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            load_file(path)
    optimizer_tensors = load_file(slot / "optimizer.safetensors")
    in_order = [p for group in run.optimizer.param_groups for p in group["params"]]  # the state_dict's indices
    for i, param in enumerate(in_order):
        assert optimizer_tensors[f"state.{i}.exp_avg"].shape == param.shape
        assert optimizer_tensors[f"state.{i}.step"].shape == ()
    assert json.loads((slot / "optimizer.json").read_text())["param_groups"][1]["betas"] == [0.9, 0.99]


def test_the_fp16_scaler_comes_back(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    scaler._lazy_init_scale_growth_tracker(torch.device("cpu"))
    scaler._growth_tracker.fill_(3)
    seeded()
    run = Run("sgd-momentum")
    run.step()
    run.save(tmp_path / "state", scaler=scaler)
    fresh_scaler = torch.amp.GradScaler("cpu")
    Run("sgd-momentum", seed=2).load(tmp_path / "state", scaler=fresh_scaler)
    assert fresh_scaler.state_dict() == scaler.state_dict() == {
        "scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 7, "_growth_tracker": 3}


def test_each_process_saves_and_loads_its_own_generators(tmp_path):
    seeded()
    run = Run("sgd-momentum")
    run.step()
    generators_at_save = torch.get_rng_state()
    barrier, failures = threading.Barrier(2, timeout=30), []

    def process(rank):  # two processes of one run, as threads meeting at wait_for_everyone
        accelerator = cpu_accelerator(rank, world=2)
        accelerator.wait_for_everyone = barrier.wait
        try:
            save_state(tmp_path / "state", accelerator=accelerator, model=run.model, optimizer=run.optimizer,
                       scheduler=run.scheduler, progress=PROGRESS)
        except BaseException as e:
            failures.append(e)
            barrier.abort()

    threads = [threading.Thread(target=process, args=(rank,)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    progress = json.loads((tmp_path / "state" / "progress.json").read_text())
    assert progress["processes"] == 2
    slot = tmp_path / "state" / progress["slot"]
    assert {p.name for p in slot.iterdir()} >= {"rng-0.json", "rng-0.safetensors", "rng-1.json", "rng-1.safetensors"}
    # rank 1's own process had other streams: give its files those
    torch.manual_seed(11)
    tensors, meta = tinycnn.state._rng_state(torch.device("cpu"))
    save_file(tensors, slot / "rng-1.safetensors")
    (slot / "rng-1.json").write_text(json.dumps(meta))

    for rank, state in ((0, generators_at_save), (1, torch.manual_seed(11).get_state())):
        torch.set_rng_state(state)
        expected = torch.rand(4)
        torch.manual_seed(99)
        Run("sgd-momentum", seed=2).load(tmp_path / "state", rank=rank, world=2)
        assert torch.equal(torch.rand(4), expected), rank
    # a process the saved run did not have keeps its own generators
    third = Run("sgd-momentum", seed=2)
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    third.load(tmp_path / "state", rank=2, world=3)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_run_continues_bitwise_with_its_generators_and_fp16_scaler(tmp_path):
    device = torch.device("cuda")

    def make(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5)).to(device)
        optimizer = create_optimizer_v2(model, "adamw", lr=1e-2, weight_decay=0.05, fused=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (1 + s))
        return SimpleNamespace(model=model, optimizer=optimizer, scheduler=scheduler,
                               scaler=torch.amp.GradScaler("cuda", init_scale=256.0))

    def step(run):
        x = torch.rand(4, 12, device=device)  # the CUDA generator
        with torch.autocast("cuda", dtype=torch.float16):
            loss = run.model(x).float().square().mean()
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()

    def accelerator(run):
        return SimpleNamespace(is_main_process=True, process_index=0, num_processes=1, device=device,
                               scaler=run.scaler, wait_for_everyone=lambda: None)

    run = make(0)
    for _ in range(3):
        step(run)
    save_state(tmp_path / "state", accelerator=accelerator(run), model=run.model, optimizer=run.optimizer,
               scheduler=run.scheduler, progress=PROGRESS)
    slot = tmp_path / "state" / json.loads((tmp_path / "state" / "progress.json").read_text())["slot"]
    assert {f"cuda.{i}" for i in range(torch.cuda.device_count())} <= set(load_file(slot / "rng-0.safetensors"))
    for _ in range(2):
        step(run)
    expected = [p.clone() for p in run.model.state_dict().values()], torch.rand(3, device=device)

    fresh = make(1)
    torch.cuda.manual_seed_all(123)
    load_state(tmp_path / "state", accelerator=accelerator(fresh), model=fresh.model, optimizer=fresh.optimizer,
               scheduler=fresh.scheduler)
    for _ in range(2):
        step(fresh)
    assert all(torch.equal(a, b) for a, b in zip(fresh.model.state_dict().values(), expected[0]))
    assert torch.equal(torch.rand(3, device=device), expected[1])
    assert fresh.scaler.state_dict() == run.scaler.state_dict()


def test_loaded_tensors_are_copies_not_views_of_the_files(saved):
    folder, _ = saved
    fresh = Run("adamw-timm-fused", seed=3)
    fresh.load(folder)
    optimizer_before = copy.deepcopy(fresh.optimizer.state_dict())
    slot = folder / json.loads((folder / "progress.json").read_text())["slot"]
    for name in ("optimizer.safetensors", "model.safetensors"):  # rewritten in place (safetensors maps its files)
        data = bytearray((slot / name).read_bytes())
        data[-64:] = b"\x7f" * 64
        with open(slot / name, "r+b") as f:
            f.write(bytes(data))
    assert_same_tree(fresh.optimizer.state_dict(), optimizer_before)


# ============================================================================= a kill during a save

class Killed(BaseException):
    """Stands for a kill (SIGKILL, power): nothing after it runs."""


def kill(*args, **kwargs):
    raise Killed


@pytest.mark.parametrize("killed_at", range(7))  # 7 writes: 2 generator files, 4 shared files, progress.json last
def test_a_kill_during_a_save_leaves_the_previous_save_whole(saved, monkeypatch, killed_at):
    folder, run = saved
    before = run.params()
    run.step()
    writes, atomic_write = [], tinycnn.state.atomic_write

    def killed_after_some(path, write_fn):
        if len(writes) == killed_at:
            raise Killed
        writes.append(Path(path).name)
        return atomic_write(path, write_fn)

    monkeypatch.setattr(tinycnn.state, "atomic_write", killed_after_some)
    with pytest.raises(Killed):
        run.save(folder, progress={**PROGRESS, "step": 7})
    assert len(writes) == killed_at and "progress.json" not in writes
    fresh = Run("adamw-timm-fused", seed=3)
    assert fresh.load(folder)["step"] == PROGRESS["step"]
    assert all(torch.equal(a, b) for a, b in zip(fresh.params(), before))


def test_the_next_save_after_a_kill_commits_and_cleans_up(saved, monkeypatch):
    folder, run = saved
    first_slot = json.loads((folder / "progress.json").read_text())["slot"]
    monkeypatch.setattr(tinycnn.state, "save_file", kill)
    with pytest.raises(Killed):
        run.save(folder)
    monkeypatch.undo()
    run.step()
    run.save(folder, progress={**PROGRESS, "step": 7})
    progress = json.loads((folder / "progress.json").read_text())
    assert progress["slot"] != first_slot and progress["step"] == 7
    assert {p.name for p in folder.iterdir()} == {"progress.json", progress["slot"]}
    assert Run("adamw-timm-fused", seed=3).load(folder)["step"] == 7


def test_nothing_saved_yet_is_not_a_state(tmp_path):
    assert not has_saved_state(tmp_path / "state")
    (tmp_path / "state" / "slot-0").mkdir(parents=True)  # a run killed during its first save
    assert not has_saved_state(tmp_path / "state")


# ============================================================================= folders someone else wrote

class RunsACommand:
    """Unpickling this runs `touch MARKER`: what a hostile pickle in a run folder would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, ("touch " + shlex.quote(str(self.marker)),)


ACCELERATE_FILES = ("pytorch_model.bin", "model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl",
                    "custom_checkpoint_0.pkl", "scaler.pt")


def plant_pickles(folder, marker, names=ACCELERATE_FILES):
    payload = pickle.dumps(RunsACommand(marker))
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(payload)


def test_the_payload_is_live(tmp_path):
    """The planted files would create the marker if anything unpickled them (so the tests below can fail)."""
    marker = tmp_path / "MARKER"
    plant_pickles(tmp_path / "p", marker, ["optimizer.bin"])
    pickle.loads((tmp_path / "p" / "optimizer.bin").read_bytes())
    assert marker.exists()


def test_planted_pickles_next_to_a_valid_state_are_never_opened(saved, tmp_path):
    folder, run = saved
    marker = tmp_path / "MARKER"
    slot = folder / json.loads((folder / "progress.json").read_text())["slot"]
    plant_pickles(folder, marker)
    planted = [n for n in ACCELERATE_FILES if n != "model.safetensors"] + ["optimizer.pt", "rng-0.pkl"]
    plant_pickles(slot, marker, planted)
    fresh = Run("adamw-timm-fused", seed=3)
    assert fresh.load(folder) == PROGRESS
    assert all(torch.equal(a, b) for a, b in zip(fresh.params(), run.params()))
    assert not marker.exists()


@pytest.mark.parametrize("with_progress", [True, False])
def test_a_state_saved_by_accelerate_is_refused_in_one_line(tmp_path, with_progress):
    marker, folder = tmp_path / "MARKER", tmp_path / "run" / "state"
    plant_pickles(folder, marker)
    if with_progress:  # the old progress.json: counters only
        (folder / "progress.json").write_text(json.dumps({"epoch": 1, "step": 4, "best_accuracy": 0.1,
                                                          "best_epoch": 1, "reason": "epoch"}))
    assert has_saved_state(folder)
    with pytest.raises(StateError) as excinfo:
        Run("sgd-momentum").load(folder)
    one_line_refusal(excinfo, str(folder), "older tinycnn", "no longer loaded for safety", "start a new run")
    assert not marker.exists()


def damage_cases():
    """(name, how to damage a saved folder, a word the refusal must hold)."""
    def slot(folder):
        return folder / json.loads((folder / "progress.json").read_text())["slot"]

    def edit_json(path, change):
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))

    def edit_tensors(path, change):
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, path)

    def progress(change):
        return lambda f: edit_json(f / "progress.json", change)

    return [
        ("truncated progress", lambda f: (f / "progress.json").write_text((f / "progress.json").read_text()[:20]),
         "progress.json"),
        ("garbage optimizer json", lambda f: (slot(f) / "optimizer.json").write_bytes(b"\x80\x03garbage"),
         "optimizer.json is not JSON"),
        ("deeply nested json", lambda f: (slot(f) / "scheduler.json").write_text("[" * 100_000 + "]" * 100_000),
         "scheduler.json"),
        ("missing scheduler", lambda f: (slot(f) / "scheduler.json").unlink(), "scheduler.json is missing"),
        ("missing rng", lambda f: (slot(f) / "rng-0.safetensors").unlink(), "rng-0.safetensors is missing"),
        ("slot outside the folder", progress(lambda d: d.update(slot="../elsewhere")), "slot"),
        ("negative step", progress(lambda d: d.update(step=-1)), "step"),
        ("text epoch", progress(lambda d: d.update(epoch="3")), "epoch"),
        ("future format", progress(lambda d: d.update(version=99)), "version"),
        ("not a mapping", progress(lambda d: d.clear()), "progress.json"),
        ("model tensor of another shape",
         lambda f: edit_tensors(slot(f) / "model.safetensors",
                                lambda t: t.update({"0.weight": torch.zeros(4, 3, 5, 5)})),
         "'0.weight' has shape [4, 3, 5, 5]"),
        ("model tensor of another dtype",
         lambda f: edit_tensors(slot(f) / "model.safetensors", lambda t: t.update({"0.bias": t["0.bias"].double()})),
         "torch.float64"),
        ("model missing a tensor", lambda f: edit_tensors(slot(f) / "model.safetensors", lambda t: t.pop("4.bias")),
         "missing ['4.bias']"),
        ("optimizer buffer of another shape",
         lambda f: edit_tensors(slot(f) / "optimizer.safetensors",
                                lambda t: t.update({"state.0.exp_avg": torch.zeros(1000)})), "has shape [1000]"),
        ("optimizer state for a parameter that is not there",
         lambda f: edit_tensors(slot(f) / "optimizer.safetensors",
                                lambda t: t.update({"state.99.exp_avg": torch.zeros(1)})), "parameter 99"),
        ("an unknown optimizer tensor",
         lambda f: edit_tensors(slot(f) / "optimizer.safetensors", lambda t: t.update({"__class__": torch.zeros(1)})),
         "unexpected tensor"),
        ("optimizer group setting of another kind",
         lambda f: edit_json(slot(f) / "optimizer.json", lambda d: d["param_groups"][0].update(lr="0.1")), "lr"),
        ("optimizer group with another setting",
         lambda f: edit_json(slot(f) / "optimizer.json", lambda d: d["param_groups"][0].update(momentum=0.9)),
         "settings"),
        ("optimizer with fewer groups",
         lambda f: edit_json(slot(f) / "optimizer.json", lambda d: d["param_groups"].pop()), "parameter groups"),
        ("scheduler attribute injected",
         lambda f: edit_json(slot(f) / "scheduler.json", lambda d: d.update(optimizer=1)), "scheduler.json"),
        ("scheduler lrs for other groups",
         lambda f: edit_json(slot(f) / "scheduler.json", lambda d: d.update(base_lrs=[0.1])), "base_lrs"),
        ("python random state out of range",
         lambda f: edit_json(slot(f) / "rng-0.json", lambda d: d["python"]["state"].__setitem__(-1, 10_000)),
         "python random"),
        ("torch generator of another size",
         lambda f: edit_tensors(slot(f) / "rng-0.safetensors", lambda t: t.update(torch=t["torch"][:100])),
         "'torch' has shape [100]"),
        ("a safetensors file that is not one", lambda f: (slot(f) / "optimizer.safetensors").write_bytes(b"\0" * 64),
         "optimizer.safetensors is not a safetensors file"),
    ]


@pytest.mark.parametrize("name,damage,word", damage_cases(), ids=[c[0] for c in damage_cases()])
def test_a_damaged_state_is_refused_in_one_line_and_changes_nothing(saved, name, damage, word):
    folder, _ = saved
    damage(folder)
    seeded(7)
    fresh = Run("adamw-timm-fused", seed=3)
    before, optimizer_before = fresh.params(), fresh.optimizer.state_dict()
    with pytest.raises(StateError) as excinfo:
        fresh.load(folder)
    one_line_refusal(excinfo, f"{folder} is not a tinycnn state folder or is damaged", word,
                     "start a new run or --resume from a good copy")
    assert all(torch.equal(a, b) for a, b in zip(fresh.params(), before))
    assert_same_tree(fresh.optimizer.state_dict(), optimizer_before)


def test_a_state_of_another_model_is_refused(saved):
    folder, _ = saved
    other = Run("adamw-timm-fused")
    other.model[4] = torch.nn.Linear(4 * 6 * 6, 7)  # another number of classes
    other.optimizer = OPTIMIZERS["adamw-timm-fused"](other.model)
    with pytest.raises(StateError) as excinfo:
        other.load(folder)
    one_line_refusal(excinfo, "'4.weight' has shape [5, 144], expected [7, 144]")


def test_an_optimizer_of_another_kind_is_refused(saved):
    folder, _ = saved
    other = Run("sgd-momentum")
    with pytest.raises(StateError) as excinfo:
        other.load(folder)
    one_line_refusal(excinfo, "settings")


def test_a_slot_replaced_by_a_link_is_removed_not_followed(saved, tmp_path):
    folder, run = saved
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    committed = json.loads((folder / "progress.json").read_text())["slot"]
    other = next(s for s in ("slot-0", "slot-1") if s != committed)
    (folder / other).symlink_to(elsewhere, target_is_directory=True)
    run.save(folder)
    assert (elsewhere / "keep.txt").read_text() == "mine"
    assert Run("adamw-timm-fused", seed=3).load(folder) == PROGRESS


def test_a_state_folder_that_is_a_link_is_replaced_never_written_through(saved, tmp_path):
    folder, run = saved
    user = tmp_path / "user"
    shutil.copytree(folder, user)  # a valid state, and someone's folder: loaded through the link, never written
    (user / "slot-0").mkdir(exist_ok=True)
    (user / "slot-1").mkdir(exist_ok=True)
    (user / "slot-0" / "notes.txt").write_text("mine")
    (user / "slot-1" / "notes.txt").write_text("mine")
    link = tmp_path / "run" / "state"
    link.parent.mkdir()
    link.symlink_to(user, target_is_directory=True)
    run.save(link)
    assert not link.is_symlink() and Run("adamw-timm-fused", seed=3).load(link) == PROGRESS
    assert (user / "slot-0" / "notes.txt").read_text() == (user / "slot-1" / "notes.txt").read_text() == "mine"


def test_a_fifo_in_place_of_a_file_is_refused_not_waited_on(saved):
    folder, run = saved
    slot = folder / json.loads((folder / "progress.json").read_text())["slot"]
    (slot / "scheduler.json").unlink()
    os.mkfifo(slot / "scheduler.json")
    with pytest.raises(StateError, match="scheduler.json is missing"):
        Run("adamw-timm-fused", seed=3).load(folder)
    (folder / "progress.json").unlink()
    os.mkfifo(folder / "progress.json")
    assert not has_saved_state(folder)
    run.save(folder)  # the next save replaces it
    assert Run("adamw-timm-fused", seed=3).load(folder) == PROGRESS


# ============================================================================= train(): resumed equals uninterrupted

def tiny_config(shards, *extra):
    from tinycnn.config import load_config

    # augmentation on (crop and flip: random, and cheap on a busy CPU): the resumed epoch draws from the
    # restored generators
    return load_config(None, [f"data.root={shards}", "stage_channels=[8,16]", "stage_repeats=[1,1]",
                              "train.batch_size=12", "train.epochs=2", "data.num_workers=0", "train.device=cpu",
                              "train.log_every=1", "data.shuffle_buffer=16", "augment.brightness=0",
                              "augment.contrast=0", "augment.saturation=0", "augment.hue=0", *extra])


@pytest.mark.slow
def test_a_resumed_train_equals_an_uninterrupted_one(tiny_shards, tmp_path, monkeypatch, capsys):
    import tinycnn.train
    from tinycnn.train import train

    cfg = tiny_config(tiny_shards)
    whole = train(cfg, tmp_path / "whole", progress=False)
    assert whole["steps"] == 2 * (36 // 12) and whole["history"][0]["train/loss"] != whole["history"][1]["train/loss"]

    save_state = tinycnn.train.save_state

    def save_then_kill(folder, **kwargs):
        save_state(folder, **kwargs)
        if kwargs["progress"]["epoch"] == 1:
            raise Killed  # right after epoch 1 was logged and its state committed

    monkeypatch.setattr(tinycnn.train, "save_state", save_then_kill)
    with pytest.raises(Killed):
        train(cfg, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(tinycnn.train, "save_state", save_state)
    marker = tmp_path / "MARKER"
    plant_pickles(tmp_path / "resumed" / "state", marker)  # beside a good state: never read
    capsys.readouterr()
    resumed = train(cfg, tmp_path / "resumed", resume=True, progress=False)
    assert f"resuming {tmp_path / 'resumed'} at epoch 1, step 3 of 6" in capsys.readouterr().out
    assert not marker.exists()
    assert resumed["steps"] == whole["steps"] and resumed["best_accuracy"] == whole["best_accuracy"]
    a, b = load_file(tmp_path / "whole" / "last.safetensors"), load_file(tmp_path / "resumed" / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    same = ("epoch", "step", "train/loss", "train/accuracy", "lr", "val/loss", "val/accuracy")
    assert [{k: r[k] for k in same} for r in rows] == [{k: r[k] for k in same} for r in expected]


def test_resume_of_a_run_saved_by_accelerate_is_refused(sample_shards, tmp_path, run_recipe):
    marker, out = tmp_path / "MARKER", tmp_path / "run"
    proc = run_recipe("train", "--data", sample_shards, "--output", out, "--no-progress", "train.epochs=1",
                      "stage_channels=[8,16]", "stage_repeats=[1,1]", "train.batch_size=32", "data.num_workers=0",
                      "train.overfit_small=true", "train.overfit_small_size=64", "train.val_subset_size=32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.rmtree(out / "state")  # what an older tinycnn left there instead
    plant_pickles(out / "state", marker)
    (out / "state" / "progress.json").write_text(json.dumps({"epoch": 1, "step": 2, "best_accuracy": 0.1,
                                                             "best_epoch": 1, "reason": "epoch"}))
    proc = run_recipe("train", "--resume", "--output", out, "--no-progress", "train.epochs=2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "older tinycnn" in proc.stderr, proc.stderr
    assert not marker.exists()


@pytest.mark.slow
def test_a_kill_between_the_epochs_line_and_its_state_logs_every_epoch_once(tiny_shards, tmp_path, monkeypatch):
    """The epoch's metrics line is written before the state that commits the epoch: a kill in between trains the
    epoch again on --resume, and its line is not doubled (here before any state exists at all)."""
    import json

    import tinycnn.train
    from tinycnn.train import train

    cfg = tiny_config(tiny_shards)
    monkeypatch.setattr(tinycnn.train, "save_state", lambda folder, **kwargs: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        train(cfg, tmp_path / "run", progress=False)
    assert [json.loads(line)["epoch"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1]
    monkeypatch.undo()
    train(cfg, tmp_path / "run", resume=True, progress=False)
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
