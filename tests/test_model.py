import json

import pytest
import timm
import torch

import tinycnn  # noqa: F401  (registers the tinycnn models with timm)
from tinycnn.model import TinyCNN

VARIANTS = timm.list_models("tinycnn*")


def test_default_model_matches_the_course_project():
    model = timm.create_model("tinycnn")
    assert sum(p.numel() for p in model.parameters()) == 1_197_704
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 200)
    # the original's layer sequence: conv-bn-relu x2, pool, x2, pool, x2, avgpool, linear
    kinds = [type(m).__name__ for m in model.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.ReLU, torch.nn.MaxPool2d, torch.nn.Linear))]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU"] * 2 + ["MaxPool2d"] + ["Conv2d", "BatchNorm2d", "ReLU"] * 2 + \
        ["MaxPool2d"] + ["Conv2d", "BatchNorm2d", "ReLU"] * 2 + ["Linear"]
    assert all(m.bias is None and m.kernel_size == (3, 3) and m.padding == (1, 1)
               for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def test_registered_variants_and_kwargs():
    assert {"tinycnn", "tinycnn_narrow", "tinycnn_shallow", "tinycnn_deep", "tinycnn_wide"} <= set(VARIANTS)
    assert timm.create_model("tinycnn_narrow").stage_channels == (48, 96, 192)
    assert timm.create_model("tinycnn_deep").stage_repeats == (3, 3, 3)
    m = timm.create_model("tinycnn", num_classes=10, stage_channels=[8, 16, 32, 64], stage_repeats=[1, 2, 1, 1],
                          in_chans=1, drop_rate=0.1)
    assert m(torch.randn(3, 1, 64, 64)).shape == (3, 10)
    assert [f["num_chs"] for f in m.feature_info] == [8, 16, 32, 64]
    assert m.head.drop.p == 0.1
    with pytest.raises(ValueError, match="same length"):
        TinyCNN(stage_channels=(8, 16), stage_repeats=(1,))


@pytest.mark.parametrize("name", VARIANTS)
def test_timm_api(name):
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(x)
    assert feats.shape[-2:] == model.pretrained_cfg["pool_size"] and feats.shape[1] == model.num_features
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.head_hidden_size)
    assert torch.equal(model.forward_head(feats), model(x))
    assert model.get_classifier() is model.head.fc
    out, inter = model.forward_intermediates(x)
    torch.testing.assert_close(out, feats)
    assert [t.shape[1] for t in inter] == [f["num_chs"] for f in model.feature_info]
    assert [64 // t.shape[-1] for t in inter] == [f["reduction"] for f in model.feature_info]
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)
    model.reset_classifier(0, "")
    assert model(x).shape == feats.shape


def test_features_only_and_pruning():
    fmodel = timm.create_model("tinycnn", features_only=True, out_indices=(1, 2))
    outs = fmodel(torch.randn(1, 3, 64, 64))
    assert [o.shape[1:] for o in outs] == [(128, 32, 32), (256, 16, 16)]
    model = timm.create_model("tinycnn")
    assert model.prune_intermediate_layers(indices=(1,), prune_head=True) == [1]
    assert len(model.stages) == 2 and model.num_features == 128
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 128)


def test_grad_checkpointing_gives_the_same_gradients():
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = timm.create_model("tinycnn", num_classes=5)
        model.set_grad_checkpointing(ckpt)
        model(x).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_grad_checkpointing_recomputes_every_block_once():
    model = timm.create_model("tinycnn", stage_channels=[8, 16], stage_repeats=[2, 1], num_classes=5)
    calls = []
    for name, m in model.named_modules():
        if name.count("blocks.") and name.endswith(".conv"):
            m.register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    model.set_grad_checkpointing()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    # checkpointed at one level: each block runs in the forward pass and once more in the backward pass
    assert sorted(calls) == sorted(2 * ["stages.0.blocks.0.conv", "stages.0.blocks.1.conv", "stages.1.blocks.0.conv"])
    calls.clear()
    model.set_grad_checkpointing(False)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert len(calls) == 3


def test_group_matcher_splits_stem_blocks_and_head():
    from timm.models._manipulate import group_parameters
    model = timm.create_model("tinycnn")
    groups = group_parameters(model, model.group_matcher())
    assert len(groups) == 1 + 6  # stem + the other 5 blocks + head
    assert "stages.0.blocks.0.conv.weight" in groups[0]


def test_channels_last_and_compile():
    torch.manual_seed(0)
    model = timm.create_model("tinycnn", stage_channels=[8, 16], stage_repeats=[1, 1], num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    ref = model(x)
    cl = model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(cl(x.to(memory_format=torch.channels_last)), ref, rtol=1e-4, atol=1e-5)
    compiled = torch.compile(model, backend="aot_eager")  # dynamo + AOTAutograd; inductor's C++ build adds ~15 s
    torch.testing.assert_close(compiled(x), ref, rtol=1e-4, atol=1e-5)


def test_timm_hub_config_rebuilds_the_model(tmp_path):
    """timm's local-dir:/hf-hub: loader passes config.json's model_args (stage_channels, ...) to create_model."""
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model("tinycnn_narrow", num_classes=10, stage_channels=[8, 16], stage_repeats=[1, 2]).eval()
    assert model.pretrained_cfg["pool_size"] == (32, 32)  # 2 stages: 64x64 pooled once
    save_for_hf(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_args"]["stage_channels"] == [8, 16] and config["model_args"]["stage_repeats"] == [1, 2]
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert (loaded.stage_channels, loaded.stage_repeats, loaded.num_classes) == ((8, 16), (1, 2), 10)
    assert set(loaded.state_dict()) == set(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(loaded(x), model(x))
    # the same arguments by hand, as JSON gives them (lists)
    again = timm.create_model(config["architecture"], **config["model_args"])
    assert again.stage_channels == (8, 16) and again.pretrained_cfg["pool_size"] == (32, 32)
