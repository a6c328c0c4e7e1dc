"""The training recipe's options, each off by default: augmentation policies and random erasing, Mixup / CutMix,
a moving average of the weights (EMA), flip test-time augmentation, and the CPU run-length notice."""
import contextlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file
from timm.utils import ModelEmaV3

import tinycnn  # noqa: F401  (registers the models)
import tinycnn.train
from tinycnn.augment import GPUAugment, MixupCutmix
from tinycnn.config import Config, ConfigError, load_config
from tinycnn.plan import RunPlan, build_augment, build_mixup
from tinycnn.state import StateError, load_state, save_state
from tinycnn.step import TrainStep

SMALL = dict(stage_channels=[8, 16, 32], stage_repeats=[1, 1, 1])


# ============================================================================= config keys

# (key, a valid value other than the default, an invalid value, the refusal's words)
NEW_KEYS = [
    ("augment.policy", "trivialaugment", "autoaugment",
     "augment.policy must be one of trivialaugment, randaugment or null"),
    ("augment.policy", "randaugment", 3, "augment.policy must be one of"),
    ("augment.ra_num_ops", 3, 17, "augment.ra_num_ops must be >= 0 and <= 16, got 17"),
    ("augment.ra_magnitude", 12, -1, "augment.ra_magnitude must be >= 0"),
    ("augment.ra_magnitude", 12, 31, "augment.ra_magnitude must be a bin below augment.policy_bins=31, got 31"),
    ("augment.policy_bins", 11, 1, "augment.policy_bins must be >= 2 and <= 1024, got 1"),
    ("augment.policy_bins", 1024, 1025, "augment.policy_bins must be >= 2 and <= 1024"),
    ("augment.policy_fill", [124.0, 116.0, 104.0], [1, 2], "augment.policy_fill must be one value or three"),
    ("augment.policy_fill", [128.0], [256], "augment.policy_fill must be >= 0 and <= 255, got 256"),
    ("augment.erase_p", 0.25, 1.5, "augment.erase_p must be >= 0 and <= 1, got 1.5"),
    ("augment.erase_mode", "const", "noise", "augment.erase_mode must be one of pixel, rand, const, got 'noise'"),
    ("augment.erase_count", 3, 17, "augment.erase_count must be >= 1 and <= 16, got 17"),
    ("augment.erase_area", [0.1, 0.5], [0.5, 0.1], "augment.erase_area must be two numbers [min, max]"),
    ("augment.erase_area", [0.1, 0.5], [0.0, 0.5], "augment.erase_area must be > 0 and <= 1, got 0.0"),
    ("augment.erase_aspect", [0.5, 2.0], [0.5, 2.0, 3.0], "augment.erase_aspect must be two numbers [min, max]"),
    ("augment.erase_aspect", [0.5, 2.0], [-1, 2.0], "augment.erase_aspect must be > 0"),
    ("augment.crop_padding", 32, 33, "augment.crop_padding must be >= 0 and <= 32, got 33"),
    ("mixup.mixup_alpha", 0.8, -0.1, "mixup.mixup_alpha must be >= 0, got -0.1"),
    ("mixup.cutmix_alpha", 1.0, "strong", "mixup.cutmix_alpha must be a number, got 'strong'"),
    ("mixup.prob", 0.5, 1.1, "mixup.prob must be >= 0 and <= 1, got 1.1"),
    ("mixup.switch_prob", 0.25, -1, "mixup.switch_prob must be >= 0 and <= 1"),
    ("mixup.mode", "batch", "element", "mixup.mode must be one of elem, pair, batch, got 'element'"),
    ("train.ema", True, "yes please", "train.ema must be true or false"),
    ("train.ema_decay", 0.9998, 1.0, "train.ema_decay must be >= 0 and < 1, got 1.0"),
    ("train.ema_warmup", True, 2, "train.ema_warmup must be true or false, got 2"),
    ("train.tta", "flip", "hflip", "train.tta must be one of flip or null, got 'hflip'"),
]


@pytest.mark.parametrize("key, good, bad, message", NEW_KEYS, ids=lambda v: v if isinstance(v, str) else None)
def test_every_new_key_round_trips_and_is_range_checked(tmp_path, key, good, bad, message):
    section, name = key.split(".")
    text = yaml.safe_dump({section: {name: good}})
    (tmp_path / "c.yaml").write_text(text)
    cfg = load_config(tmp_path / "c.yaml", check_model=False)
    assert getattr(getattr(cfg, section), name) == good
    again = tmp_path / "again.yaml"  # what a run saves as its config.yaml, read again on --resume
    again.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    assert load_config(again, check_model=False) == cfg
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}={json.dumps(bad)}"], check_model=False)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_every_option_is_off_by_default():
    cfg = Config()
    assert cfg.augment.policy is None and cfg.augment.erase_p == 0 and cfg.train.tta is None
    assert cfg.mixup.mixup_alpha == cfg.mixup.cutmix_alpha == 0 and cfg.train.ema is False
    model = timm.create_model("tinycnn", num_classes=3, **SMALL)
    aug = build_augment(cfg, RunPlan.from_config(cfg), model)
    assert aug.policy_steps == 0 and aug.erase_p == 0
    assert build_mixup(cfg, RunPlan.from_config(cfg), 3) is None


def test_the_augment_section_reaches_gpu_augment():
    cfg = load_config(None, ["augment.policy=randaugment", "augment.ra_num_ops=3", "augment.ra_magnitude=5",
                             "augment.policy_fill=[100]", "augment.erase_p=0.3", "augment.erase_mode=rand",
                             "augment.erase_count=2", "augment.erase_area=[0.1,0.2]"], check_model=False)
    model = timm.create_model("tinycnn", num_classes=3, **SMALL)
    aug = build_augment(cfg, RunPlan.from_config(cfg), model)
    assert (aug.policy, aug.policy_steps, aug.ra_magnitude, aug.policy_fill) == ("randaugment", 3, 5, (100.0,) * 3)
    assert (aug.erase_p, aug.erase_mode, aug.erase_count, aug.erase_area) == (0.3, "rand", 2, (0.1, 0.2))
    overfit = cfg.replace(["train.overfit_small=true"])  # the memorization check: none of it
    aug = build_augment(overfit, RunPlan.from_config(overfit), model)
    assert aug.policy_steps == 0 and aug.erase_p == 0 and not aug.enabled


def test_mixup_is_built_only_when_an_alpha_is_set_and_never_in_overfit_runs():
    def mixup(*overrides):
        cfg = load_config(None, list(overrides), check_model=False)
        return build_mixup(cfg, RunPlan.from_config(cfg), 7)

    assert mixup() is None and mixup("mixup.prob=0.5") is None
    mix = mixup("mixup.cutmix_alpha=1.0", "mixup.mode=pair", "train.label_smoothing=0.2")
    assert isinstance(mix, MixupCutmix) and mix.num_classes == 7 and mix.label_smoothing == 0.2
    assert mix.mixup.mode == "pair" and mix.mixup.cutmix_alpha == 1.0 and mix.mixup.mixup_alpha == 0.0
    assert mixup("mixup.mixup_alpha=0.8", "augment.enabled=false") is None
    assert mixup("mixup.mixup_alpha=0.8", "train.overfit_small=true") is None


# ============================================================================= the step with mixup

def small_model(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("tinycnn", num_classes=10, **SMALL)


def batch(b=8, seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g),
            torch.randint(0, 10, (b,), generator=g))


def test_mixup_changes_the_loss_only_when_on():
    """The step mixes the augmented batch (timm's draws) and scores soft targets; with no mixing drawn the
    soft-target loss is the smoothed cross-entropy of the plain step."""
    images, labels = batch()
    aug = GPUAugment(brightness=0, contrast=0, saturation=0, hue=0)

    def one_step(mixup):
        model = small_model()
        step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), augment=aug, label_smoothing=0.1,
                         mixup=mixup)
        torch.manual_seed(1)
        np.random.seed(1)
        return step(images, labels)

    plain_loss, plain_logits = one_step(None)
    never = MixupCutmix(10, mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.0, label_smoothing=0.1)
    never_loss, never_logits = one_step(never)
    torch.testing.assert_close(never_logits, plain_logits)
    torch.testing.assert_close(never_loss, plain_loss)

    mix = MixupCutmix(10, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    mixed_loss, mixed_logits = one_step(mix)
    assert not torch.allclose(mixed_logits, plain_logits) and not torch.isclose(mixed_loss, plain_loss)
    # by hand: the same augmentation draw, timm's mix of it with the same numpy draw, soft-target cross-entropy
    model = small_model()
    torch.manual_seed(1)
    np.random.seed(1)
    x = aug.apply(images, aug.sample(8, image_size=images.shape[-2:]))
    x, soft = MixupCutmix(10, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)(x, labels)
    logits = model(x)
    expected = torch.sum(-soft * F.log_softmax(logits, dim=-1), dim=-1).mean()
    torch.testing.assert_close(mixed_logits, logits.detach())
    torch.testing.assert_close(mixed_loss, expected.detach())
    assert soft.shape == (8, 10) and torch.allclose(soft.sum(1), torch.ones(8))


def test_mixup_without_augmentation_leaves_the_callers_batch_alone():
    model = small_model()
    x = torch.randn(6, 3, 32, 32)
    before = x.clone()
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1),
                     mixup=MixupCutmix(10, mixup_alpha=1.0, label_smoothing=0.0))
    np.random.seed(0)
    step(x, torch.arange(6))
    assert torch.equal(x, before)


# ============================================================================= EMA in the resumable state

def cpu_accelerator():
    return SimpleNamespace(is_main_process=True, process_index=0, num_processes=1, device=torch.device("cpu"),
                           scaler=None, wait_for_everyone=lambda: None)


class Run:
    def __init__(self, seed=0, ema=True):
        self.model = small_model(seed)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0)
        self.ema = ModelEmaV3(self.model, decay=0.9) if ema else None

    def step(self, n):
        for s in range(1, n + 1):
            self.model(torch.randn(4, 3, 32, 32)).square().mean().backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.ema.update(self.model, step=s)

    def save(self, folder):
        save_state(folder, accelerator=cpu_accelerator(), model=self.model, optimizer=self.optimizer,
                   scheduler=self.scheduler, progress={"epoch": 1, "step": 3, "best_accuracy": 0.5, "best_epoch": 1},
                   ema=self.ema)

    def load(self, folder):
        return load_state(folder, accelerator=cpu_accelerator(), model=self.model, optimizer=self.optimizer,
                          scheduler=self.scheduler, ema=self.ema)


def slot(folder):
    return Path(folder) / json.loads((Path(folder) / "progress.json").read_text())["slot"]


def test_the_ema_weights_are_saved_and_loaded_back_bitwise(tmp_path):
    run = Run()
    run.step(3)
    run.save(tmp_path / "state")
    assert (slot(tmp_path / "state") / "ema.safetensors").is_file()
    other = Run(seed=5)
    a, b = run.ema.module.state_dict(), other.ema.module.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # another average before the load
    other.load(tmp_path / "state")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    # the average is not the model: both came back, each its own
    assert any(not torch.equal(a[k], v) for k, v in other.model.state_dict().items())


def test_a_state_without_ema_is_refused_when_the_run_keeps_one(tmp_path):
    Run(ema=False).save(tmp_path / "state")
    with pytest.raises(StateError) as e:
        Run().load(tmp_path / "state")
    assert "without train.ema" in str(e.value) and "\n" not in str(e.value)
    Run(ema=False).load(tmp_path / "state")  # and a run without one never opens the file
    saved = Run()
    saved.save(tmp_path / "with")
    Run(ema=False).load(tmp_path / "with")


def test_ema_weights_of_another_shape_are_refused_and_change_nothing(tmp_path):
    run = Run()
    run.save(tmp_path / "state")
    path = slot(tmp_path / "state") / "ema.safetensors"
    tensors = load_file(path)
    key = next(k for k, v in tensors.items() if v.dim() == 4)
    tensors[key] = torch.zeros(1, 1, 1, 1)
    save_file(tensors, path)
    other = Run(seed=5)
    before = {k: v.clone() for k, v in other.model.state_dict().items()}
    with pytest.raises(StateError, match=rf"ema.safetensors: '{key}' has shape \[1, 1, 1, 1\]"):
        other.load(tmp_path / "state")
    assert all(torch.equal(before[k], v) for k, v in other.model.state_dict().items())


# ============================================================================= train() with every option

def every_option(shards, *extra):
    return load_config(None, [f"data.root={shards}", "stage_channels=[8,16,32]", "stage_repeats=[1,1,1]",
                              "train.batch_size=12", "train.epochs=2", "data.num_workers=0", "train.device=cpu",
                              "train.log_every=1", "data.shuffle_buffer=16", "augment.policy=trivialaugment",
                              "augment.brightness=0", "augment.contrast=0", "augment.saturation=0", "augment.hue=0",
                              "augment.erase_p=0.5", "mixup.mixup_alpha=0.8", "mixup.cutmix_alpha=1.0",
                              "train.ema=true", "train.ema_decay=0.6", "train.tta=flip", *extra])


def train_quietly(cfg, output, **kw):
    """train() with what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = tinycnn.train.train(cfg, output, progress=False, **kw)
    return summary, out.getvalue()


@pytest.fixture(scope="module")
def whole_run(tiny_shards, tmp_path_factory):
    """2 epochs with every option on; the CPU notice's thresholds lowered so that this short run gives it."""
    out = tmp_path_factory.mktemp("runs") / "whole"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tinycnn.train, "CPU_ESTIMATE_STEPS", 2)
        mp.setattr(tinycnn.train, "CPU_ESTIMATE_NOTICE_S", 0.0)
        summary, printed = train_quietly(every_option(tiny_shards), out)
    return SimpleNamespace(out=out, summary=summary, printed=printed)


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_run_with_every_option_records_the_average_and_keeps_the_better_weights(whole_run):
    from tinycnn.weights import read_metadata

    rows = metrics(whole_run.out)
    assert [r["epoch"] for r in rows] == [1, 2] and whole_run.summary["steps"] == 6
    for r in rows:
        assert {"val/accuracy", "val/loss", "val_ema/accuracy", "val_ema/loss", "val_ema/top5"} <= set(r)
        assert r["tta"] == "flip" and 0 <= r["train/accuracy"] <= 1 and np.isfinite(r["train/loss"])
    best_row = max(rows, key=lambda r: max(r["val/accuracy"], r["val_ema/accuracy"]))
    kind = "ema" if best_row["val_ema/accuracy"] > best_row["val/accuracy"] else "raw"
    extra = read_metadata(whole_run.out / "best.safetensors")["extra"]
    assert extra["weights"] == kind and extra["tta"] == "flip" and extra["epoch"] == best_row["epoch"]
    assert extra["val_accuracy"] == max(best_row["val/accuracy"], best_row["val_ema/accuracy"])
    assert whole_run.summary["best_accuracy"] == extra["val_accuracy"]
    # last.safetensors: the raw weights; last_ema.safetensors: the average, which is another set of weights
    assert read_metadata(whole_run.out / "last.safetensors")["extra"]["weights"] == "raw"
    assert read_metadata(whole_run.out / "last_ema.safetensors")["extra"]["weights"] == "ema"
    raw, ema = load_file(whole_run.out / "last.safetensors"), load_file(whole_run.out / "last_ema.safetensors")
    assert raw.keys() == ema.keys() and any(not torch.equal(raw[k], ema[k]) for k in raw)
    if extra["epoch"] == 2:
        kept = load_file(whole_run.out / "best.safetensors")
        assert all(torch.equal(kept[k], (ema if kind == "ema" else raw)[k]) for k in kept)


@pytest.mark.slow
def test_a_cpu_run_that_takes_long_says_so_once(whole_run):
    lines = [line for line in whole_run.printed.splitlines() if "on the CPU this run takes about" in line]
    assert len(lines) == 1, whole_run.printed
    assert "2 epochs" in lines[0] and "parameters" in lines[0]


@pytest.mark.slow
def test_an_ema_run_stopped_after_epoch_1_and_resumed_equals_the_uninterrupted_one(whole_run, tiny_shards,
                                                                                   tmp_path, monkeypatch):
    save_state = tinycnn.train.save_state

    def save_then_kill(folder, **kwargs):
        save_state(folder, **kwargs)
        if kwargs["progress"]["epoch"] == 1:
            raise KeyboardInterrupt  # right after epoch 1 was logged and its state committed

    cfg = every_option(tiny_shards)
    # timed, but far under the notice's threshold: the uninterrupted run gave the notice, and what it does to
    # print it must not change the run (it once drew from the generators the augmentation draws from)
    monkeypatch.setattr(tinycnn.train, "CPU_ESTIMATE_STEPS", 2)
    monkeypatch.setattr(tinycnn.train, "save_state", save_then_kill)
    with pytest.raises(KeyboardInterrupt):
        train_quietly(cfg, tmp_path / "resumed")
    monkeypatch.setattr(tinycnn.train, "save_state", save_state)
    summary, printed = train_quietly(cfg, tmp_path / "resumed", resume=True)
    assert "resuming" in printed and "takes about" not in printed
    assert summary["steps"] == whole_run.summary["steps"]
    for name in ("last.safetensors", "last_ema.safetensors"):
        a, b = load_file(whole_run.out / name), load_file(tmp_path / "resumed" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    same = ("train/loss", "val/accuracy", "val/loss", "val_ema/accuracy", "val_ema/loss", "tta")
    assert [{k: r[k] for k in same} for r in metrics(tmp_path / "resumed")] == \
        [{k: r[k] for k in same} for r in metrics(whole_run.out)]


@pytest.mark.slow
def test_best_keeps_whichever_weights_scored_higher(tiny_shards, tmp_path, monkeypatch):
    """Epoch 1: the average scores higher and is kept; epoch 2: the raw weights beat it and replace it."""
    from tinycnn.weights import read_metadata

    evaluate, scores = tinycnn.train.evaluate, {(1, "ema"): 0.9, (1, "raw"): 0.1, (2, "ema"): 0.2, (2, "raw"): 0.95}
    calls = []

    def scored(model, *args, **kwargs):  # each evaluation: the raw weights, then the average
        results = evaluate(model, *args, **kwargs)
        kind = "raw" if len(calls) % 2 == 0 else "ema"
        calls.append((kind, id(model)))
        return {**results, "accuracy": scores[(len(calls) + 1) // 2, kind]}

    monkeypatch.setattr(tinycnn.train, "evaluate", scored)
    picks = {}

    def log(accelerator, output, record):
        picks[record["epoch"]] = (read_metadata(output / "best.safetensors")["extra"],
                                  load_file(output / "best.safetensors"), load_file(output / "last.safetensors"),
                                  load_file(output / "last_ema.safetensors"))

    monkeypatch.setattr(tinycnn.train, "_log_epoch", log)
    train_quietly(every_option(tiny_shards, "train.tta=null"), tmp_path / "run")
    assert len(calls) == 4 and len({calls[0][1], calls[2][1]}) == 1 and len({calls[1][1], calls[3][1]}) == 1
    assert calls[0][1] != calls[1][1]  # two sets of weights, each the same object every epoch
    for epoch, kind, accuracy in ((1, "ema", 0.9), (2, "raw", 0.95)):
        extra, best, raw, ema = picks[epoch]
        assert (extra["weights"], extra["val_accuracy"], extra["epoch"], extra["tta"]) == (kind, accuracy, epoch, None)
        kept = ema if kind == "ema" else raw
        assert all(torch.equal(best[k], kept[k]) for k in best)


# ============================================================================= the CPU notice, unit by unit

class FakeClock:
    def __init__(self, seconds_per_step):
        self.now, self.per_step = 0.0, seconds_per_step

    def __call__(self):
        self.now += self.per_step
        return self.now


def notices(monkeypatch, *, device="cpu", seconds_per_step=1.0, total_steps=1000, start_step=0):
    printed = []
    accelerator = SimpleNamespace(device=torch.device(device), print=printed.append)
    monkeypatch.setattr(tinycnn.train.time, "perf_counter", FakeClock(seconds_per_step))
    estimate = tinycnn.train._CpuRunEstimate(accelerator, timm.create_model("tinycnn", num_classes=200), 200,
                                             total_steps=total_steps, start_step=start_step, epochs=20)
    for step in range(start_step + 1, total_steps + 1):
        estimate.after_step(step)
    return printed


def test_the_cpu_notice_gives_the_length_of_a_long_run_once(monkeypatch):
    printed = notices(monkeypatch, seconds_per_step=4.4312)  # 1000 steps at 4.43 s
    assert printed == [printed[0]] and "on the CPU this run takes about 1:13:51 (20 epochs" in printed[0]
    assert "1,197,704 parameters" in printed[0] and "recipes/configs/cpu.yaml trains a 37k-parameter" in printed[0]
    resumed = notices(monkeypatch, seconds_per_step=4.4312, start_step=500)
    assert "the rest of this run takes about 0:36:56" in resumed[0]


@pytest.mark.parametrize("case", [dict(seconds_per_step=0.5),                 # 1000 steps: about 8 minutes
                                  dict(seconds_per_step=10.0, device="cuda"),  # never on a GPU
                                  dict(seconds_per_step=100.0, total_steps=20)])  # too short to time
def test_no_cpu_notice_for_short_runs_or_other_devices(monkeypatch, case):
    assert notices(monkeypatch, **case) == []


# ============================================================================= flip TTA in evaluate

@pytest.fixture(scope="module")
def random_checkpoint(tiny_shards, tmp_path_factory):
    from tinycnn.storage import read_manifest
    from tinycnn.weights import save_model

    classes = [c["wnid"] for c in read_manifest(tiny_shards)["classes"]]
    torch.manual_seed(3)
    model = timm.create_model("tinycnn", num_classes=len(classes), **SMALL)
    with torch.no_grad():  # BatchNorm statistics of these images' scale: logits that differ between mirror images
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("ckpt") / "random.safetensors"
    save_model(model, path, classes=classes, extra={"tta": "flip"})
    return path


def by_hand(checkpoint, shards, flip):
    """Accuracy and mean loss of the checkpoint on the val split, the flip TTA as mean logits, written out."""
    from tinycnn.augment import eval_transform
    from tinycnn.data import build_loader
    from tinycnn.weights import load_model

    model = load_model(checkpoint).eval()
    correct = total = 0
    loss = 0.0
    loader = build_loader(shards, "val", batch_size=5, train=False, num_workers=0)
    with torch.no_grad():
        for images, labels in loader:
            x = eval_transform(images)
            logits = model(x)
            if flip:
                logits = (logits + model(torch.flip(x, dims=[3]))) / 2
            correct += (logits.argmax(1) == labels).sum().item()
            loss += F.cross_entropy(logits.double(), labels, reduction="sum").item()
            total += len(labels)
    loader.close()
    return correct / total, loss / total


@pytest.mark.parametrize("tta", [None, "flip"])
def test_evaluate_tta_flip_scores_the_mean_logits(random_checkpoint, tiny_shards, tmp_path, run_recipe, tta):
    out = tmp_path / "eval.json"
    proc = run_recipe("evaluate", "--checkpoint", random_checkpoint, "--data", tiny_shards, "--split", "val",
                      "--num_workers", "0", "--device", "cpu", "--json", out, *(["--tta", tta] if tta else []))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    accuracy, loss = by_hand(random_checkpoint, tiny_shards, flip=tta == "flip")
    assert results["tta"] == tta and results["num_samples"] == 12
    assert results["accuracy"] == pytest.approx(accuracy) and results["loss"] == pytest.approx(loss, rel=1e-5)
    other_accuracy, other_loss = by_hand(random_checkpoint, tiny_shards, flip=tta != "flip")
    assert results["loss"] != pytest.approx(other_loss, rel=1e-5)  # the two differ: the check can fail
    assert ("(tta flip)" in proc.stdout) == (tta == "flip")
    assert ("measured with --tta flip" in proc.stdout) == (tta is None)  # the checkpoint's metadata says flip


def test_evaluate_refuses_an_unknown_tta(random_checkpoint, tiny_shards, run_recipe):
    proc = run_recipe("evaluate", "--checkpoint", random_checkpoint, "--data", tiny_shards, "--tta", "crop")
    assert proc.returncode == 2 and "--tta: invalid choice: 'crop'" in proc.stderr


# ============================================================================= several processes

@pytest.mark.slow
def test_two_processes_evaluate_and_save_one_average(tiny_shards, tmp_path, run_recipe):
    """Under DDP each rank updates its own average from identical weights, with its own BatchNorm statistics:
    rank 0's are broadcast before every evaluation, so the val_ema numbers of 2 processes are those of the
    saved average evaluated alone."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "2", "--cpu",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", "0"]  # a free port: other tests may train beside this one
    args = ["recipes/train.py", "--data", str(tiny_shards), "--output", str(out), "--no-progress",
            "stage_channels=[8,16,32]", "stage_repeats=[1,1,1]", "train.batch_size=6", "train.epochs=2",
            "data.num_workers=0", "data.shuffle_buffer=16", "train.ema=true", "train.ema_decay=0.6",
            "augment.erase_p=0.5", "mixup.mixup_alpha=0.8"]
    proc = subprocess.run(launch + args, capture_output=True, text=True, cwd=repo, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = metrics(out)[-1]
    result = tmp_path / "ema.json"
    proc = run_recipe("evaluate", "--checkpoint", out / "last_ema.safetensors", "--data", tiny_shards, "--split",
                      "val", "--num_workers", "0", "--device", "cpu", "--json", result)
    assert proc.returncode == 0, proc.stderr[-3000:]
    alone = json.loads(result.read_text())
    assert alone["accuracy"] == last["val_ema/accuracy"]
    assert alone["loss"] == pytest.approx(last["val_ema/loss"], rel=1e-6)


@pytest.mark.slow
def test_mixing_after_a_compiled_augmentation_is_the_eager_step():
    """The augmentation compiled (aot_eager: no C++ compiler on the CPU), the mix after it, outside the graph."""
    images, labels = batch(b=7)  # odd: timm mixes the first 6, the last keeps its smoothed one-hot target
    aug = GPUAugment(policy="trivialaugment", erase_p=0.5)

    def two_steps(compile):
        model = small_model()
        step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), augment=aug, label_smoothing=0.1,
                         mixup=MixupCutmix(10, mixup_alpha=0.8, cutmix_alpha=1.0), compile=compile,
                         compile_options={"backend": "aot_eager"} if compile else None)
        results = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            np.random.seed(seed)
            results.append(step(images, labels))
        assert step.augment_compiled == compile
        return results

    for (loss, logits), (compiled_loss, compiled_logits) in zip(two_steps(False), two_steps(True)):
        torch.testing.assert_close(compiled_loss, loss)
        torch.testing.assert_close(compiled_logits, logits)
