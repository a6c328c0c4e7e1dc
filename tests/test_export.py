"""tinycnn-export: the Hugging Face layout that timm reads (local-dir:, hf-hub:), offline; --push with the upload mocked."""
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import tinycnn
from tinycnn.hub import export_hub, push_hub
from tinycnn.weights import WeightsError, load_model, read_metadata, save_model

pytest.importorskip("huggingface_hub")

REPO = Path(__file__).resolve().parents[1]
WNIDS = [f"n{i:08d}" for i in range(10)]
MEAN, STD = (0.48, 0.45, 0.40), (0.27, 0.26, 0.28)  # not timm's defaults, so a dropped value would show


@pytest.fixture
def odd_weights(tmp_path):
    """A non-default model: 10 classes, 48/96/192 channels, 1 block per stage, its own mean/std."""
    torch.manual_seed(2)
    model = timm.create_model("tinycnn", num_classes=10, stage_channels=[48, 96, 192], stage_repeats=[1, 1, 1],
                              pretrained_cfg_overlay=dict(mean=MEAN, std=STD)).eval()
    with torch.no_grad():  # non-trivial BN statistics, so a forgotten buffer would show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
    path = save_model(model, tmp_path / "w.safetensors", classes=WNIDS,
                      class_names=[f"class {i}" for i in range(10)], extra={"epoch": 4, "val_accuracy": 0.31})
    return model, path


def _inputs():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_export_writes_timms_layout(odd_weights, tmp_path):
    _, path = odd_weights
    out = export_hub(path, tmp_path / "hub")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "tinycnn" and cfg["num_classes"] == 10
    assert cfg["model_args"]["stage_channels"] == [48, 96, 192] and cfg["model_args"]["stage_repeats"] == [1, 1, 1]
    assert cfg["label_names"] == WNIDS and cfg["label_descriptions"]["n00000003"] == "class 3"
    pcfg = cfg["pretrained_cfg"]
    assert pcfg["input_size"] == [3, 64, 64]
    assert pcfg["mean"] == pytest.approx(MEAN) and pcfg["std"] == pytest.approx(STD)
    assert cfg["tinycnn"]["extra"] == {"epoch": 4, "val_accuracy": 0.31}


@pytest.mark.slow
def test_timm_alone_rebuilds_the_exported_model_in_a_fresh_process(odd_weights, tmp_path):
    model, path = odd_weights
    out = export_hub(path, tmp_path / "hub")
    code = f"""
import sys, torch, timm, tinycnn  # tinycnn only registers the architecture
x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
model = timm.create_model('local-dir:{out}', pretrained=True).eval()
cfg = model.pretrained_cfg
assert list(cfg['label_names']) == {WNIDS!r}, cfg
assert tuple(cfg['mean']) == {MEAN!r} and tuple(cfg['std']) == {STD!r}, cfg
assert timm.data.resolve_data_config(model=model)['input_size'] == (3, 64, 64)
torch.save(model(x), sys.argv[1])
"""
    logits = tmp_path / "logits.pt"
    subprocess.run([sys.executable, "-c", code, str(logits)], check=True)
    assert torch.equal(torch.load(logits), model(_inputs()))


def test_load_model_and_read_metadata_take_the_folder(odd_weights, tmp_path):
    model, path = odd_weights
    out = export_hub(path, tmp_path / "hub")
    loaded = load_model(out).eval()
    assert torch.equal(loaded(_inputs()), model(_inputs()))
    assert loaded.pretrained_cfg["label_names"] == tuple(WNIDS)
    assert read_metadata(out) == {**read_metadata(path), "tinycnn_version": tinycnn.__version__}
    again = export_hub(out, tmp_path / "hub2")  # a folder exports like the file it came from
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_exported_folder_follows_the_umask(odd_weights, tmp_path):
    _, path = odd_weights
    old = os.umask(0o022)
    try:
        out = export_hub(path, tmp_path / "hub")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}


def test_export_replaces_an_earlier_export_and_nothing_else(odd_weights, tmp_path):
    _, path = odd_weights
    out = tmp_path / "hub"
    export_hub(path, out)
    (out / "model.safetensors").write_bytes(b"stale")
    export_hub(path, out)
    assert load_model(out).num_classes == 10
    export_hub(path, tmp_path / "empty").rename(tmp_path / "gone")
    (tmp_path / "empty").mkdir()
    export_hub(path, tmp_path / "empty")  # an empty folder is fine
    with pytest.raises(WeightsError, match="not an exported model folder: give a new or empty --out"):
        export_hub(path, tmp_path)  # holds w.safetensors: never deleted
    assert path.is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_interrupted_export_keeps_the_old_folder(odd_weights, tmp_path, monkeypatch):
    _, path = odd_weights
    out = export_hub(path, tmp_path / "hub")
    before = (out / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(timm.models, "save_for_hf", crash)
    with pytest.raises(KeyboardInterrupt):
        export_hub(path, out)
    assert (out / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_folder_errors(odd_weights, tmp_path):
    _, path = odd_weights
    with pytest.raises(WeightsError, match="no such weights file or model folder"):
        export_hub(tmp_path / "missing", tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsError, match="a folder without config.json"):
        load_model(empty)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"architecture": "not_a_model", "num_classes": 10,
                                                     "pretrained_cfg": {}}))
    (foreign / "model.safetensors").write_bytes(b"")
    with pytest.raises(WeightsError, match="holds a not_a_model model, which timm does not know: import the package"):
        load_model(foreign)
    (foreign / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match="not a timm model config"):
        read_metadata(foreign)
    out = export_hub(path, tmp_path / "hub")
    with pytest.raises(WeightsError, match="part of an exported model folder: give the folder"):
        load_model(out / "model.safetensors")
    (out / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no model.safetensors in the folder"):
        load_model(out)


def test_load_model_reads_a_folder_timm_wrote_for_a_named_variant(tmp_path):
    # timm's own save_for_hf on tinycnn_narrow records no widths/depths: the variant's name says them
    from timm.models import save_for_hf

    torch.manual_seed(4)
    model = timm.create_model("tinycnn_narrow", num_classes=10).eval()
    save_for_hf(model, tmp_path, safe_serialization=True)
    assert "stage_channels" not in json.loads((tmp_path / "config.json").read_text()).get("model_args", {})
    meta = read_metadata(tmp_path)
    assert meta["stage_channels"] == [48, 96, 192] and meta["stage_repeats"] == [2, 2, 2]
    assert torch.equal(load_model(tmp_path).eval()(_inputs()), model(_inputs()))


def test_other_timm_models_save_load_and_export(tmp_path):
    # model=<any timm model> in a run config: its weights are saved, evaluated and exported like tinycnn's
    torch.manual_seed(3)
    model = timm.create_model("resnet10t", num_classes=10, pretrained_cfg_overlay=dict(mean=MEAN, std=STD)).eval()
    path = save_model(model, tmp_path / "r.safetensors", classes=WNIDS)
    meta = read_metadata(path)
    assert meta["architecture"] == "resnet10t" and meta["num_classes"] == 10 and "stage_channels" not in meta
    out = export_hub(path, tmp_path / "hub")
    exported = read_metadata(out)
    assert exported.pop("model_args") == {"global_pool": "avg"}  # timm records the pooling it exports
    assert exported == {k: v for k, v in meta.items() if k != "model_args"}
    for loaded in (load_model(path), load_model(out), timm.create_model(f"local-dir:{out}", pretrained=True)):
        loaded.eval()
        assert type(loaded) is type(model) and torch.equal(loaded(_inputs()), model(_inputs()))
        assert list(loaded.pretrained_cfg["label_names"]) == WNIDS
        assert tuple(loaded.pretrained_cfg["mean"]) == pytest.approx(MEAN)


class FakeHfApi:
    """huggingface_hub.HfApi as push_to_hf_hub uses it, keeping a copy of what would be uploaded."""
    uploads = []

    def __init__(self, token=None, **kwargs):
        self.token = token

    def create_repo(self, repo_id, private=False, exist_ok=False):
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def file_exists(self, repo_id, filename, revision=None):
        return False

    def upload_folder(self, repo_id, folder_path, **kwargs):
        copy = Path(os.environ["FAKE_HUB_DIR"]) / repo_id
        shutil.copytree(folder_path, copy)
        FakeHfApi.uploads.append((repo_id, copy, kwargs))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/0"})()


def test_push_uploads_what_hf_hub_loads(odd_weights, tmp_path, monkeypatch):
    model, path = odd_weights
    monkeypatch.setattr("timm.models._hub.HfApi", FakeHfApi)
    monkeypatch.setenv("FAKE_HUB_DIR", str(tmp_path / "hub"))
    FakeHfApi.uploads.clear()
    assert push_hub(path, "someone/tinycnn-test") == "https://huggingface.co/someone/tinycnn-test/commit/0"
    [(repo_id, folder, _)] = FakeHfApi.uploads
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]  # no pickle
    card = (folder / "README.md").read_text()
    assert "hf-hub:someone/tinycnn-test" in card and "[48, 96, 192]" in card and "license: apache-2.0" in card

    def from_fake_hub(repo_id, filename, revision=None, cache_dir=None, **kwargs):
        return str(tmp_path / "hub" / repo_id / filename)

    monkeypatch.setattr("timm.models._hub.hf_hub_download", from_fake_hub)
    pulled = timm.create_model("hf-hub:someone/tinycnn-test", pretrained=True).eval()
    assert torch.equal(pulled(_inputs()), model(_inputs()))
    assert list(pulled.pretrained_cfg["label_names"]) == WNIDS


def _run_cli(monkeypatch, capsys, *args):
    from tinycnn.cli import run_main
    from tinycnn.recipes import export

    monkeypatch.setattr(sys, "argv", ["tinycnn-export", *map(str, args)])
    return run_main(export.main), capsys.readouterr()


@pytest.mark.slow
def test_cli(odd_weights, tmp_path):
    _, path = odd_weights
    ok = subprocess.run([sys.executable, str(REPO / "recipes" / "export.py"), str(path), "--out", "exported"],
                        cwd=tmp_path, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "local-dir:exported" in ok.stdout and load_model(tmp_path / "exported").num_classes == 10


@pytest.mark.parametrize("args,message", [
    (("nope.safetensors", "--out", "x"), "no such weights file"),
    ((REPO / "README.md", "--out", "x"), "not a safetensors file"),
    (("w.safetensors", "--out", "."), "not an exported model folder"),
])
def test_cli_errors_are_one_line(odd_weights, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    code, out = _run_cli(monkeypatch, capsys, *args)
    assert code == 2 and message in out.err and out.err.count("\n") == 1, out.err


def test_cli_needs_out_or_push(odd_weights, monkeypatch, capsys):
    _, path = odd_weights
    with pytest.raises(SystemExit) as stopped:
        _run_cli(monkeypatch, capsys, path)
    assert stopped.value.code == 2 and "give --out DIR, --push REPO_ID, or both" in capsys.readouterr().err


@pytest.mark.parametrize("error,hint", [(ConnectionError("[Errno -2] Name or service not known"), True),
                                        (RuntimeError("401 Client Error: Unauthorized\nmore details"), True),
                                        (ValueError("Repo id must use alphanumeric chars"), False)])
def test_cli_push_failure_is_one_line(odd_weights, monkeypatch, capsys, error, hint):
    class Offline(FakeHfApi):
        def create_repo(self, *args, **kwargs):
            raise error

    _, path = odd_weights
    monkeypatch.setattr("timm.models._hub.HfApi", Offline)
    code, out = _run_cli(monkeypatch, capsys, path, "--push", "someone/x")
    err = out.err
    assert code == 2 and err.count("\n") == 1 and f"pushing to someone/x failed: {type(error).__name__}" in err
    assert str(error).splitlines()[0] in err and ("hf auth login" in err) == hint
