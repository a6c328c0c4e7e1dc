"""Which device a run gets, and what it says when the device's memory runs out."""
from pathlib import Path

import pytest
import torch

from tinycnn.config import load_config
from tinycnn.device import make_accelerator, out_of_memory_message, resolve_device


def test_an_explicit_device_that_is_not_there_says_what_to_use():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cuda", "mps", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device is visible.*train.device=auto or cpu"):
            resolve_device("cuda:1")


def test_out_of_memory_message_names_the_fix():
    cfg = load_config(None, ["train.device=cpu", "train.batch_size=256", "data.device_resident=true"])
    msg = out_of_memory_message(cfg, make_accelerator(cfg, log=False))
    assert "train.batch_size=256" in msg and "train.batch_size=128" in msg and "data.device_resident=false" in msg


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the OOM path only exists on a GPU")
def test_cuda_out_of_memory_is_one_clear_line(sample_shards, tmp_path):
    from tinycnn.train import train

    cfg = load_config(None, [f"data.root={sample_shards}", "train.batch_size=256", "train.max_steps=2",
                             "data.num_workers=0", "train.mixed_precision=no"])
    torch.cuda.set_per_process_memory_fraction(0.002)  # ~160 MB of an 80 GB card: the first step cannot fit
    try:
        with pytest.raises(RuntimeError, match=r"ran out of memory .* train.batch_size=256 .* lower it"):
            train(cfg, tmp_path / "run", progress=False)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: cudnn settings only matter on a GPU")
@pytest.mark.parametrize("deterministic", [False, True])
def test_cudnn_autotuning_follows_train_deterministic(sample_shards, tmp_path, deterministic):
    """Fixed 64x64 shapes: cudnn.benchmark picks the fastest kernels once; train.deterministic turns it off."""
    from tinycnn.train import train

    cfg = load_config(None, [f"data.root={sample_shards}", "train.batch_size=64", "train.max_steps=1",
                             "train.val_subset_size=64", "data.num_workers=0",
                             f"train.deterministic={str(deterministic).lower()}"])
    before = torch.backends.cudnn.benchmark
    try:
        train(cfg, tmp_path / "run", progress=False)
        assert torch.backends.cudnn.benchmark is (not deterministic)
        assert torch.backends.cuda.matmul.allow_tf32 or deterministic
    finally:
        torch.backends.cudnn.benchmark = before
        torch.use_deterministic_algorithms(False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: without it cuda:N is refused as absent")
def test_a_numbered_cuda_device_is_refused_with_the_way_to_pick_a_gpu():
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES=1 and train.device=cuda"):
        resolve_device("cuda:1")


@pytest.fixture
def mac(monkeypatch):
    """Apple silicon as MPS sees it: `mac(macos, torch_version, accelerate_version)` sets what the mixed precision
    rule asks (macOS through torch.backends.mps.is_macos_or_newer, which a build without MPS cannot answer)."""
    import accelerate

    def setup(macos=(14, 0), torch_version="2.8.0", accelerate_version="1.11.0"):
        monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: macos >= (major, minor))
        monkeypatch.setattr(torch, "__version__", torch_version)
        monkeypatch.setattr(accelerate, "__version__", accelerate_version)
    return setup


@pytest.mark.parametrize("macos,torch_version,accelerate_version,expected", [
    ((14, 0), "2.6.0", "1.11.0", "bf16"),      # bfloat16 kernels from macOS 14, MPS bf16 autocast from torch 2.6
    ((15, 4), "2.14.1", "1.16.0", "bf16"),
    ((13, 5), "2.8.0", "1.11.0", "fp16"),      # no bfloat16 before macOS 14; fp16 loss scaling on MPS from 2.8
    ((14, 0), "2.8.0.dev20250601", "1.11.0", "bf16"),
    ((13, 5), "2.7.1", "1.11.0", "no"),        # fp16 autocast, but no GradScaler on MPS before 2.8
    ((15, 0), "2.5.1", "1.11.0", "no"),        # fp16 autocast only, and without loss scaling
    ((15, 0), "2.8.0", "1.10.1", "no"),        # accelerate refuses bf16 and fp16 on MPS before 1.11
])
def test_auto_mixed_precision_on_mps(mac, macos, torch_version, accelerate_version, expected):
    from tinycnn.device import resolve_mixed_precision

    mac(macos, torch_version, accelerate_version)
    assert resolve_mixed_precision("auto", "mps") == expected
    assert resolve_mixed_precision("no", "mps") == "no"


def test_explicit_mixed_precision_mps_cannot_run_is_refused_with_what_auto_picks(mac):
    from tinycnn.device import resolve_mixed_precision

    mac(macos=(13, 5), torch_version="2.8.0")
    assert resolve_mixed_precision("fp16", "mps") == "fp16"
    with pytest.raises(ValueError, match=r"^train.mixed_precision=bf16 on mps needs macOS 14 or newer: "
                                         r"use train.mixed_precision=fp16 \(what auto picks here\)$"):
        resolve_mixed_precision("bf16", "mps")
    mac(macos=(14, 0), torch_version="2.7.1")
    assert resolve_mixed_precision("bf16", "mps") == "bf16"
    with pytest.raises(ValueError, match=r"fp16 on mps needs torch>=2.8: use train.mixed_precision=bf16"):
        resolve_mixed_precision("fp16", "mps")
    mac(macos=(14, 0), torch_version="2.8.0", accelerate_version="1.10.0")
    with pytest.raises(ValueError, match=r"needs accelerate>=1.11: use train.mixed_precision=no"):
        resolve_mixed_precision("bf16", "mps")


def test_mixed_precision_elsewhere_is_unchanged(mac, monkeypatch):
    from tinycnn.device import resolve_mixed_precision

    mac(macos=(13, 0), torch_version="2.1.0", accelerate_version="0.34.0")  # the MPS rule must not leak out
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_mixed_precision("auto", "cuda") == "bf16"
    assert resolve_mixed_precision("auto", "cpu") == "no"
    assert resolve_mixed_precision("bf16", "cpu") == "bf16"
    assert resolve_mixed_precision("fp16", "cuda") == "fp16"


def test_mps_and_cpu_batches_are_never_pinned(tiny_shards, monkeypatch):
    """Unified memory: nothing to pin (torch's DataLoader would only warn and not pin on MPS). Pinned only when
    the batches go to CUDA, even on a host where CUDA is visible."""
    from tinycnn.data import build_loader
    from tinycnn.transfer import DevicePrefetcher

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for device, pinned in (("mps", False), ("cpu", False), ("cuda", True)):
        loader = build_loader(tiny_shards, "val", batch_size=4, train=False, num_workers=0)
        assert loader.pin_memory is None  # build_loader leaves it to where the batches go
        DevicePrefetcher(loader, device)
        assert loader.pin_memory is pinned, device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no prefetcher on a Mac: not pinned either
    loader = build_loader(tiny_shards, "val", batch_size=4, train=False, num_workers=0)
    next(iter(loader))
    assert loader._loader.pin_memory is False


def test_compile_is_off_by_default_on_mps(monkeypatch):
    """torch.compile's inductor makes fast code with triton on CUDA; on MPS compiling is opt-in (train.compile)."""
    import torch.utils._triton

    from tinycnn.config import load_config
    from tinycnn.step import can_compile

    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)
    assert can_compile("cuda") and not can_compile("mps") and not can_compile(torch.device("mps"))
    configs = sorted((Path(__file__).parents[1] / "recipes" / "configs").glob("*.yaml"))
    assert configs and not any(load_config(c).train.compile for c in configs + [None])
