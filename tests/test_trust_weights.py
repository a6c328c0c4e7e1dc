"""Untrusted weights: descriptions are checked, and matched against the file's tensors, before anything is built."""
import json
import resource
import time
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

import tinycnn  # noqa: F401  (registers the tinycnn architectures)
from tinycnn.model import TinyCNN
from tinycnn.weights import MAX_METADATA_BYTES, WeightsError, load_model, read_metadata, save_model

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def describe(architecture, **fields):
    """A complete description as save_model writes it, for a 3-class model on 3-channel 64x64 images."""
    meta = {"architecture": architecture, "num_classes": 3, "in_chans": 3, "mean": MEAN, "std": STD,
            "input_size": [3, 64, 64], "classes": None, "class_names": None, "extra": {}}
    if architecture.startswith("tinycnn"):
        meta.update(stage_channels=[8], stage_repeats=[1])
    else:
        meta["model_args"] = {}
    return {**meta, **fields}


def tiny_tensors():
    """The state_dict of tinycnn with one 8-channel stage and 3 classes (describe('tinycnn')'s model)."""
    model = TinyCNN(stage_channels=[8], stage_repeats=[1], num_classes=3)  # not timm.create_model: tests patch it
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def write_weights(path: Path, meta, tensors=None) -> Path:
    """A safetensors file holding `tensors` and `meta` (a dict, or the raw metadata string) as tinycnn's metadata."""
    text = meta if isinstance(meta, str) else json.dumps(meta)
    save_file(tiny_tensors() if tensors is None else tensors, str(path), metadata={"format": "pt", "tinycnn": text})
    return path


def refusal(call, *args, **kwargs) -> str:
    """The message of the WeightsError that call(*args) raises, checked to be one line."""
    with pytest.raises(WeightsError) as refused:
        call(*args, **kwargs)
    message = str(refused.value)
    assert message and "\n" not in message, message
    return message


@pytest.fixture
def no_build(monkeypatch):
    """timm.create_model fails the test whenever it is called."""
    def create_model(*args, **kwargs):
        pytest.fail(f"timm.create_model{args} was called")

    monkeypatch.setattr(timm, "create_model", create_model)


@pytest.fixture
def meta_builds_only(monkeypatch):
    """timm.create_model works on the meta device only; the devices it was called on are recorded."""
    real, devices = timm.create_model, []

    def create_model(*args, **kwargs):
        devices.append(torch.get_default_device().type)
        if devices[-1] != "meta":
            pytest.fail(f"timm.create_model{args} built a model for real")
        return real(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_model)
    return devices


def peak_memory_growth(call) -> int:
    """How far (bytes) the process's peak resident memory rose while running call() (Linux: ru_maxrss in KiB)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    call()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024


@pytest.mark.parametrize("architecture,reason", [
    ("hf-hub:timm/resnet18", "not a plain timm model name"),
    ("local-dir:/tmp", "not a plain timm model name"),
    ("timm/resnet18", "not a plain timm model name"),
    ("ResNet18", "not a plain timm model name"),
    ("resnet18\nimport os", "not a plain timm model name"),
    ("no_such_architecture_anywhere", "which timm does not know: import the package that registers it first"),
])
def test_architectures_that_are_not_registered_timm_names_are_refused_before_any_build(
        tmp_path, no_build, architecture, reason):
    path = write_weights(tmp_path / "w.safetensors", describe(architecture))
    assert reason in refusal(read_metadata, path)
    assert reason in refusal(load_model, path)


@pytest.mark.parametrize("model_args,reason", [
    ({"checkpoint_path": "/tmp/other.pth"}, "holds checkpoint_path, which makes timm load"),
    ({"pretrained_cfg": "resnet10t.a1_in1k"}, "holds pretrained_cfg, which makes timm load"),
    ({"pretrained": True}, "holds pretrained, which makes timm load"),
    ({"pretrained_cfg_overlay": None}, "holds pretrained_cfg_overlay"),
    ({"cache_dir": "/tmp"}, "holds cache_dir"),
    ({"features_only": True}, "holds features_only"),
    ({"out_indices": [1, 2]}, "holds out_indices"),
    ({"scriptable": True}, "holds scriptable"),
    ({"num_classes": 1000}, "holds num_classes"),
    ({"global_pool": "https://example.com/pool.py"}, "names a location"),
    ({"global_pool": "hf-hub:timm/resnet18"}, "names a location"),
    ({"global_pool": "LOCAL-DIR:/tmp"}, "names a location"),
    ({"act_layer": ["relu", "file:///etc/passwd"]}, "names a location"),
    ({"global_pool": {"type": "avg"}}, "must be a JSON number, string, boolean, null or a list"),
    ({"depths": [[1, 2]]}, "must be a JSON number, string, boolean, null or a list"),
    ({"width": 2 ** 40}, "out of range"),
    ({"not an identifier": 1}, "not an argument name"),
    ({f"arg{i}": i for i in range(100)}, "at most 64 arguments"),
    ([1, 2], "model_args must be a JSON object"),
])
def test_model_args_that_load_fetch_or_escape_are_refused_before_any_build(tmp_path, no_build, model_args, reason):
    path = write_weights(tmp_path / "w.safetensors", describe("resnet10t", model_args=model_args))
    assert reason in refusal(load_model, path)


@pytest.mark.parametrize("fields,reason", [
    ({"stage_channels": [65536, 65536, 65536], "stage_repeats": [1, 1, 1]}, "stage_channels must be a list"),
    ({"stage_repeats": [65]}, "stage_repeats must be a list"),
    ({"stage_channels": [], "stage_repeats": []}, "stage_channels must be a list"),
    ({"stage_channels": [8, 8], "stage_repeats": [1]}, "one entry per stage"),
    ({"stage_channels": [8.0]}, "stage_channels must be a list"),
    ({"model_args": {"drop_rate": 0.1}}, "not model_args"),
    ({"num_classes": 0}, "num_classes must be an integer from 1 to 100000"),
    ({"num_classes": 10 ** 6}, "num_classes must be an integer"),
    ({"num_classes": "3"}, "num_classes must be an integer"),
    ({"num_classes": True}, "num_classes must be an integer"),
    ({"in_chans": 0}, "in_chans must be an integer"),
    ({"input_size": [3, 64]}, "input_size must be [channels, height, width]"),
    ({"input_size": [3, 64, 10 ** 9]}, "input_size must be"),
    ({"mean": ["a", "b", "c"]}, "mean must be a list of 1 to 1024 finite numbers"),
    ({"mean": [float("nan"), 0.5, 0.5]}, "mean must be a list"),
    ({"std": [0.0, 0.2, 0.2]}, "std must be a list of 1 to 1024 finite numbers above 0"),
    ({"classes": ["n01", "n02"]}, "classes must be a list of 3 strings"),
    ({"class_names": [1, 2, 3]}, "class_names must be a list of 3 strings"),
    ({"extra": ["not", "an", "object"]}, "extra must be a JSON object"),
    ({"tinycnn_version": 7}, "tinycnn_version must be a string"),
])
def test_fields_out_of_type_or_range_are_refused_before_any_build(tmp_path, no_build, fields, reason):
    path = write_weights(tmp_path / "w.safetensors", describe("tinycnn", **fields))
    assert reason in refusal(load_model, path)


def test_stage_channels_outside_the_bounds_are_refused_without_allocating(tmp_path, no_build):
    # 65536-wide stages would be ~450 GB of parameters: refused from the description alone
    path = write_weights(tmp_path / "w.safetensors",
                         describe("tinycnn", stage_channels=[65536] * 3, stage_repeats=[2, 2, 2]))
    started = time.perf_counter()
    growth = peak_memory_growth(lambda: refusal(load_model, path))
    assert time.perf_counter() - started < 5 and growth < 256 * 2 ** 20


def test_a_description_far_larger_than_its_tensors_is_refused_on_the_meta_device(tmp_path, meta_builds_only):
    # in range (8192 channels), but ~3 G parameters described for a file of a few hundred values
    path = write_weights(tmp_path / "w.safetensors",
                         describe("tinycnn", stage_channels=[8192] * 3, stage_repeats=[2, 2, 2]))
    started = time.perf_counter()
    messages = []
    growth = peak_memory_growth(lambda: messages.append(refusal(load_model, path)))
    assert time.perf_counter() - started < 5 and growth < 256 * 2 ** 20
    assert "stages.0.blocks.0.conv.weight is [8192, 3, 3, 3] in the model but [8, 3, 3, 3] in the file" in messages[0]
    assert meta_builds_only == ["meta"]


def test_tensors_of_the_wrong_shape_name_the_first_mismatching_key(tmp_path, meta_builds_only):
    path = write_weights(tmp_path / "w.safetensors", describe("tinycnn", stage_channels=[16]))
    message = refusal(load_model, path)
    assert "weights do not match the tinycnn model its metadata describes" in message
    assert "stages.0.blocks.0.conv.weight is [16, 3, 3, 3] in the model but [8, 3, 3, 3] in the file" in message

    tensors = tiny_tensors()
    del tensors["head.fc.bias"]
    write_weights(path, describe("tinycnn"), tensors)
    assert "head.fc.bias is [3] in the model but missing in the file" in refusal(load_model, path)

    write_weights(path, describe("tinycnn"), {**tiny_tensors(), "extra.weight": torch.zeros(2)})
    assert "extra.weight ([2]) is in the file but not in the model" in refusal(load_model, path)
    assert set(meta_builds_only) == {"meta"}


def test_weights_are_built_on_the_meta_device_first(tmp_path, monkeypatch):
    real, devices = timm.create_model, []

    def create_model(*args, **kwargs):
        devices.append(torch.get_default_device().type)
        return real(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_model)
    tensors = tiny_tensors()
    model = load_model(write_weights(tmp_path / "w.safetensors", describe("tinycnn"), tensors))
    assert devices == ["meta", "cpu"]
    assert all(torch.equal(v, tensors[k]) for k, v in model.state_dict().items())


def test_save_model_writes_only_what_load_model_accepts(tmp_path):
    features = timm.create_model("tinycnn", stage_channels=[8], stage_repeats=[1], num_classes=0)
    message = refusal(save_model, features, tmp_path / "features.safetensors")
    assert "save_model cannot write weights load_model would refuse" in message and "num_classes must be" in message
    assert list(tmp_path.iterdir()) == []


def _with_header(path: Path, header: bytes) -> Path:
    """Replace the file's header (after its 8-byte length) by `header`, of the same length."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    assert len(header) == length
    path.write_bytes(data[:8] + header + data[8 + length:])
    return path


@pytest.mark.parametrize("metadata,reason", [
    ("{not json", "unreadable tinycnn metadata, not saved by tinycnn.save_model (not JSON"),
    ("[1, 2, 3]", "the tinycnn metadata is list, not a JSON object"),
    ("null", "the tinycnn metadata is NoneType, not a JSON object"),
    ("[" * 200_000 + "]" * 200_000, "unreadable tinycnn metadata"),
    ("x" * (MAX_METADATA_BYTES + 1), f"more than the {MAX_METADATA_BYTES:,} bytes tinycnn reads"),
])
def test_unreadable_metadata_is_one_line(tmp_path, no_build, metadata, reason):
    path = write_weights(tmp_path / "w.safetensors", metadata)
    assert reason in refusal(read_metadata, path)
    assert reason in refusal(load_model, path)


def test_metadata_that_is_not_utf8_is_one_line(tmp_path, no_build):
    path = write_weights(tmp_path / "w.safetensors", "PLACEHOLDER")
    header = path.read_bytes()[8:8 + int.from_bytes(path.read_bytes()[:8], "little")]
    _with_header(path, header.replace(b"PLACEHOLDER", b"\xff\xfe" * 5 + b"\x80"))
    assert "not a safetensors file" in refusal(load_model, path)


def test_safetensors_headers_are_checked_before_they_are_read(tmp_path, no_build):
    path = write_weights(tmp_path / "w.safetensors", describe("tinycnn"))
    data = path.read_bytes()
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes((2 ** 40).to_bytes(8, "little") + data[8:])
    assert "its header claims 1,099,511,627,776 bytes, more than 100,000,000" in refusal(load_model, huge)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[:100])
    assert "header runs past the end of the file" in refusal(load_model, truncated)
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x00")
    assert "not a safetensors file" in refusal(load_model, short)
    length = int.from_bytes(data[:8], "little")
    _with_header(path, b"[" + b" " * (length - 1))  # a JSON list, not a safetensors header object
    assert "not a safetensors file" in refusal(load_model, path)


def _folder(tmp_path: Path, config) -> Path:
    """An exported-looking folder: `config` as config.json (a dict, or raw bytes) and tiny weights."""
    folder = tmp_path / "exported"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_bytes(config if isinstance(config, bytes) else json.dumps(config).encode())
    save_file(tiny_tensors(), str(folder / "model.safetensors"))
    return folder


def _hub_config(architecture="tinycnn", **model_args):
    return {"architecture": architecture, "num_classes": 3, "pretrained_cfg": {"input_size": [3, 64, 64]},
            "model_args": {"stage_channels": [8], "stage_repeats": [1], "num_classes": 3, "in_chans": 3,
                           **model_args}}


def test_an_exported_folder_is_read_through_the_same_checks(tmp_path, meta_builds_only):
    folder = _folder(tmp_path, _hub_config())
    assert read_metadata(folder)["stage_channels"] == [8]
    assert "holds pretrained_cfg" in refusal(read_metadata, _folder(tmp_path, _hub_config(pretrained_cfg="x")))
    message = refusal(load_model, _folder(tmp_path, _hub_config(stage_channels=[4096])))
    assert "stages.0.blocks.0.conv.weight is [4096, 3, 3, 3] in the model but [8, 3, 3, 3]" in message


@pytest.mark.parametrize("config,reason", [
    ({**_hub_config(), "architecture": "hf-hub:timm/resnet18"}, "not a plain timm model name"),
    ({**_hub_config(), "architecture": "local-dir:/tmp"}, "not a plain timm model name"),
    ({"architecture": "resnet10t", "pretrained_cfg": {}, "model_args": {"checkpoint_path": "/tmp/x.pth"}},
     "holds checkpoint_path"),
    ({"architecture": "tinycnn_narrow", "pretrained_cfg": {}, "model_args": {"features_only": True}},
     "holds features_only"),
    ({**_hub_config(), "pretrained_cfg": {"mean": 5}}, "mean must be a list"),
    ({**_hub_config(), "pretrained_cfg": ["a"]}, "not a timm model config"),
    ([1, 2], "not a timm model config"),
    (b"\xff\xfe{}", "not a timm model config (not UTF-8 text)"),
    (b" " * (MAX_METADATA_BYTES + 1), "not a timm model config (more than"),
])
def test_exported_folders_with_hostile_configs_are_refused_before_any_build(tmp_path, no_build, config, reason):
    folder = _folder(tmp_path, config)
    assert reason in refusal(read_metadata, folder)
    assert reason in refusal(load_model, folder)


# A timm architecture whose constructor reads a tensor's values, which the meta device cannot do.
default_cfgs = generate_default_cfgs({"trust_test_meta_shy_net": {"input_size": (3, 64, 64), "num_classes": 3}})


class MetaShyNet(nn.Module):
    def __init__(self, width: int = 8, num_classes: int = 3, in_chans: int = 3):
        super().__init__()
        self.drop_rates = torch.linspace(0, 0.1, 2).tolist()  # "Cannot copy out of meta tensor"
        self.conv = nn.Conv2d(in_chans, width, 3)
        self.fc = nn.Linear(width, num_classes)
        self.num_classes = num_classes

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


@register_model
def trust_test_meta_shy_net(pretrained: bool = False, **kwargs) -> MetaShyNet:
    return build_model_with_cfg(MetaShyNet, "trust_test_meta_shy_net", pretrained, **kwargs)


def test_an_architecture_that_cannot_be_built_on_meta_is_built_within_a_memory_bound(tmp_path):
    with pytest.raises(NotImplementedError):
        with torch.device("meta"):
            timm.create_model("trust_test_meta_shy_net")
    model = timm.create_model("trust_test_meta_shy_net", width=4, num_classes=3)
    path = save_model(model, tmp_path / "shy.safetensors")
    loaded = load_model(path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())

    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    wider = write_weights(tmp_path / "wider.safetensors", {**read_metadata(path), "model_args": {"width": 8}}, tensors)
    assert "conv.weight is [8, 3, 3, 3] in the model but [4, 3, 3, 3] in the file" in refusal(load_model, wider)

    huge = write_weights(tmp_path / "huge.safetensors",  # a 1 GB convolution described by 100 values
                         {**read_metadata(path), "model_args": {"width": 10 ** 7}}, tensors)
    started = time.perf_counter()
    messages = []
    growth = peak_memory_growth(lambda: messages.append(refusal(load_model, huge)))
    assert time.perf_counter() - started < 5 and growth < 256 * 2 ** 20
    assert "needs more than" in messages[0] and "far more than the tensors the file holds" in messages[0]

    unknown = write_weights(tmp_path / "unknown.safetensors",
                            {**read_metadata(path), "model_args": {"depth": 3}}, tensors)
    assert "timm cannot build the trust_test_meta_shy_net model its metadata describes (TypeError" in refusal(
        load_model, unknown)


# tinycnn-export's --out: only an empty folder or an earlier export is ever replaced

@pytest.fixture
def weights(tmp_path):
    pytest.importorskip("huggingface_hub")
    return save_model(timm.create_model("tinycnn", stage_channels=[8], stage_repeats=[1], num_classes=3),
                      tmp_path / "w.safetensors")


def _snapshot(folder: Path):
    return {p.name: (p.is_symlink(), p.read_bytes() if p.is_file() else None) for p in folder.iterdir()}


def test_export_replaces_an_export_with_its_model_card(weights, tmp_path):
    from tinycnn.hub import export_hub

    out = export_hub(weights, tmp_path / "hub")
    (out / "README.md").write_text("model card")  # what --push adds beside the files
    export_hub(weights, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("spoil", ["extra file", "subfolder", "foreign config", "config symlink", "weights symlink",
                                   "folder symlink", "dangling symlink", "plain file"])
def test_export_refuses_to_replace_anything_it_did_not_write(weights, tmp_path, spoil):
    from tinycnn.hub import export_hub

    out = export_hub(weights, tmp_path / "hub")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("keep me")
    target = out
    if spoil == "extra file":
        (out / "notes.txt").write_text("mine")
    elif spoil == "subfolder":
        (out / "runs").mkdir()
    elif spoil == "foreign config":
        (out / "config.json").write_text(json.dumps({"architecture": "resnet18", "pretrained_cfg": {}}))
    elif spoil == "config symlink":
        (out / "config.json").rename(elsewhere / "config.json")
        (out / "config.json").symlink_to(elsewhere / "config.json")
    elif spoil == "weights symlink":
        (out / "model.safetensors").unlink()
        (out / "model.safetensors").symlink_to(elsewhere / "precious.txt")
    elif spoil == "folder symlink":
        target = tmp_path / "link"
        target.symlink_to(out, target_is_directory=True)
    elif spoil == "dangling symlink":
        target = tmp_path / "dangling"
        target.symlink_to(tmp_path / "nowhere")
    else:
        target = elsewhere / "precious.txt"
    before = {p: _snapshot(p) for p in (out, elsewhere)}
    message = refusal(export_hub, weights, target)
    assert "is not an exported model folder: give a new or empty --out" in message
    assert {p: _snapshot(p) for p in (out, elsewhere)} == before
    if spoil in ("folder symlink", "dangling symlink"):
        assert target.is_symlink()  # the link itself is left as it was, not replaced
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_folder_that_changed_since_it_was_checked_is_put_back(tmp_path):
    from tinycnn.hub import _swap_into_place

    new, target = tmp_path / "new", tmp_path / "target"
    new.mkdir()
    (new / "config.json").write_text("{}")
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    assert "changed while exporting" in refusal(_swap_into_place, new, target)
    assert (target / "precious.txt").read_text() == "keep me" and (new / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "target"]
