"""Which device a run gets, and what it says when the device's memory runs out."""
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
