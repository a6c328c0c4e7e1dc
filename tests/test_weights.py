import os
import stat
import subprocess
import sys

import pytest
import timm
import torch

import tinycnn
from tinycnn.weights import WeightsError, load_model, read_metadata, save_model



@pytest.fixture
def trained_like(tmp_path):
    torch.manual_seed(1)
    model = timm.create_model("tinycnn_narrow", num_classes=10).eval()
    with torch.no_grad():  # non-trivial BN statistics, so a forgotten buffer would show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
    path = tmp_path / "w.safetensors"
    wnids = [f"n{i:08d}" for i in range(10)]
    save_model(model, path, classes=wnids, class_names=[f"class {i}" for i in range(10)], extra={"epoch": 3})
    return model, path, wnids


def test_weights_are_self_describing(trained_like):
    model, path, wnids = trained_like
    meta = read_metadata(path)
    assert meta["architecture"] == "tinycnn_narrow" and meta["stage_channels"] == [48, 96, 192]
    assert meta["stage_repeats"] == [2, 2, 2] and meta["num_classes"] == 10 and meta["in_chans"] == 3
    assert meta["classes"] == wnids and meta["extra"] == {"epoch": 3}
    assert meta["mean"] == pytest.approx([0.485, 0.456, 0.406])
    loaded = load_model(path).eval()
    assert loaded.pretrained_cfg["label_names"] == tuple(wnids)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(loaded(x), model(x))
    with open(path, "rb") as f:
        assert b"pickle" not in f.read(4096)


@pytest.mark.slow
def test_weights_load_in_a_fresh_process_with_timm_alone(trained_like):
    model, path, _ = trained_like
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    expected = model(x)
    # tinycnn must be imported for the name 'tinycnn_narrow' to exist, but nothing else of it is used
    code = f"""
import sys, torch, timm, tinycnn
x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
a = tinycnn.load_model({str(path)!r}).eval()(x)
b = timm.create_model('tinycnn_narrow', pretrained=True,
                      pretrained_cfg_overlay=dict(file={str(path)!r}, num_classes=10)).eval()(x)
torch.save(torch.stack([a, b]), sys.argv[1])
"""
    out = path.parent / "logits.pt"
    subprocess.run([sys.executable, "-c", code, str(out)], check=True)
    a, b = torch.load(out)
    assert torch.equal(a, expected) and torch.equal(b, expected)


def test_weights_errors(tmp_path, trained_like):
    _, path, _ = trained_like
    with pytest.raises(WeightsError, match="no such"):
        load_model(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(WeightsError, match="not a safetensors"):
        load_model(junk)
    from safetensors.torch import save_file
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(WeightsError, match="without tinycnn metadata"):
        load_model(foreign)
    with pytest.raises(WeightsError, match="10-class model, 200 classes"):
        load_model(path, num_classes=200)
    with pytest.raises(WeightsError, match="3 class names"):
        save_model(timm.create_model("tinycnn", num_classes=10), tmp_path / "x.safetensors", classes=["a", "b", "c"])


def test_interrupted_save_keeps_the_old_file(trained_like, monkeypatch):
    model, path, _ = trained_like
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tinycnn.weights, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_model(timm.create_model("tinycnn", num_classes=10), path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_save_unwraps_compiled_models(tmp_path):
    model = timm.create_model("tinycnn", stage_channels=[8], stage_repeats=[1], num_classes=3)
    save_model(torch.compile(model), tmp_path / "c.safetensors")
    assert set(load_model(tmp_path / "c.safetensors").state_dict()) == set(model.state_dict())


def test_save_unwraps_data_parallel_and_ema(tmp_path):
    from timm.utils import ModelEmaV3

    model = timm.create_model("tinycnn", stage_channels=[8], stage_repeats=[1], num_classes=3)
    for i, wrapped in enumerate([torch.nn.DataParallel(model), ModelEmaV3(model)]):
        path = save_model(wrapped, tmp_path / f"{i}.safetensors")
        assert set(load_model(path).state_dict()) == set(model.state_dict())


def test_saved_weights_are_readable_by_others(tmp_path, trained_like):
    # mkstemp creates 0600 files: weights shared on a cluster must follow the umask like any other file
    model, _, _ = trained_like
    old = os.umask(0o022)
    try:
        path = save_model(model, tmp_path / "shared.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
