"""The course project's staged CNN as a timm model.

For each stage s: `stage_repeats[s]` blocks of Conv3x3 (padding 1, no bias) -> BatchNorm2d -> ReLU,
the first block of a stage changing the width to `stage_channels[s]`; MaxPool2d(2) between stages;
global average pooling; Linear(last width -> num_classes). The default (64/128/256, 2/2/2, 200
classes) has exactly 1,197,704 parameters.

The pooling is kept as the first layer of stages 1.. (timm's convention: a stage starts by
downsampling), which computes exactly the original's conv-conv-pool-conv-conv-pool-conv-conv and lets
every stage's output be a feature map for `features_only` / `forward_intermediates`.
"""
import inspect
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

__all__ = ["TinyCNN"]

# timm >= 1.0.20 builds layers straight on a device/dtype (create_model(..., device='meta')); older timm does not.
_HEAD_TAKES_DD = "device" in inspect.signature(ClassifierHead.__init__).parameters


class ConvBnReLU(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, **dd):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size=3, padding=1, bias=False, **dd)
        self.bn = nn.BatchNorm2d(out_chs, **dd)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class TinyStage(nn.Module):
    """An optional MaxPool2d(2), then `depth` ConvBnReLU blocks (the first one changing the width)."""

    def __init__(self, in_chs: int, out_chs: int, depth: int, downsample: bool, **dd):
        super().__init__()
        self.downsample = nn.MaxPool2d(2) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[ConvBnReLU(in_chs if i == 0 else out_chs, out_chs, **dd) for i in range(depth)])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class TinyCNN(nn.Module):
    """Stages of Conv3x3-BN-ReLU blocks with max pooling between them, then a pooled linear classifier.

    Args:
        stage_channels: Width of each stage.
        stage_repeats: Number of blocks in each stage (as many entries as stage_channels).
        num_classes: Number of classes of the classifier (0: no classifier, the pooled features come out).
        in_chans: Number of input channels.
        global_pool: Global pooling type of the head ('avg', 'max', ..., '' for none).
        drop_rate: Dropout rate before the classifier.
        device: Device to create the parameters on (timm >= 1.0.20).
        dtype: Data type of the parameters (timm >= 1.0.20).
    """

    def __init__(
            self,
            stage_channels: Sequence[int] = (64, 128, 256),
            stage_repeats: Sequence[int] = (2, 2, 2),
            num_classes: int = 200,
            in_chans: int = 3,
            global_pool: str = "avg",
            drop_rate: float = 0.0,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {k: v for k, v in dict(device=device, dtype=dtype).items() if v is not None}
        stage_channels, stage_repeats = tuple(int(c) for c in stage_channels), tuple(int(r) for r in stage_repeats)
        if len(stage_channels) != len(stage_repeats) or not stage_channels:
            raise ValueError(f"stage_channels {list(stage_channels)} and stage_repeats {list(stage_repeats)} "
                             "must be non-empty and of the same length (one entry per stage)")
        if min(stage_repeats) < 1 or min(stage_channels) < 1:
            raise ValueError(f"every stage needs at least one block and one channel, got channels "
                             f"{list(stage_channels)}, repeats {list(stage_repeats)}")
        self.stage_channels, self.stage_repeats = stage_channels, stage_repeats
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate

        stages, self.feature_info, prev = [], [], in_chans
        for i, (chs, depth) in enumerate(zip(stage_channels, stage_repeats)):
            stages.append(TinyStage(prev, chs, depth, downsample=i > 0, **dd))
            self.feature_info.append(dict(num_chs=chs, reduction=2 ** i, module=f"stages.{i}"))
            prev = chs
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = prev
        self.head = ClassifierHead(prev, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                   **(dd if _HEAD_TAKES_DD else {}))

        # torchvision ResNet's init for the convs (kaiming normal, fan_out, relu gain); BatchNorm and the
        # classifier keep torch's defaults
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for layer-wise lr decay: the first block as the stem, then the stages or blocks.

        Args:
            coarse: One group per stage instead of one per block.
        """
        return dict(
            stem=r"^stages\.0\.blocks\.0\.",
            blocks=r"^stages\.(\d+)" if coarse else [(r"^stages\.(\d+)\.blocks\.(\d+)", None)],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        """Enable or disable gradient checkpointing of every stage's blocks.

        Args:
            enable: Whether to recompute the blocks' activations in the backward pass instead of storing them.
        """
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier layer (head.fc)."""
        return self.head.fc

    def _param_dd(self) -> Dict[str, Any]:
        p = next(self.parameters())  # new head layers follow the model's device and dtype
        return dict(device=p.device, dtype=p.dtype) if _HEAD_TAKES_DD else {}

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        """Replace the classifier.

        Args:
            num_classes: Number of classes of the new classifier (0: none, the pooled features come out).
            global_pool: New global pooling type (None: keep the current one).
        """
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, **self._param_dd())

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features, also returning the output of the chosen stages.

        Args:
            x: Input images, (B, in_chans, H, W).
            indices: Stages to return: the last n if int, all if None, the given indices if a sequence.
            norm: Unused (the stages end with BatchNorm-ReLU already); kept for timm's API.
            stop_early: Stop after the last stage in `indices`.
            output_fmt: Shape of the outputs; only 'NCHW'.
            intermediates_only: Return only the intermediates.

        Returns:
            The list of intermediates, or (final features, intermediates).
        """
        assert output_fmt in ("NCHW",), "Output shape must be NCHW."
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        if torch.jit.is_scripting() or not stop_early:  # can't slice blocks in torchscript
            stages = self.stages
        else:
            stages = self.stages[:max_index + 1]
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last one in `indices`, for a model that only feeds forward_intermediates.

        Args:
            indices: Stages to keep an output of (as in forward_intermediates).
            prune_norm: Unused (there is no final norm); kept for timm's API.
            prune_head: Replace the classifier by an identity (always done when stages are dropped: the
                classifier was sized for the last stage).

        Returns:
            The indices of the stages taken.
        """
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if max_index + 1 < len(self.stage_channels):
            self.num_features = self.head_hidden_size = self.stage_channels[max_index]
            prune_head = True
        if prune_head:
            self.head = ClassifierHead(self.num_features, 0, pool_type=self.head.global_pool.pool_type,
                                       **self._param_dd())
            self.num_classes = 0
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map.

        Args:
            x: Input images, (B, in_chans, H, W).

        Returns:
            (B, num_features, H / 2 ** (num_stages - 1), W / 2 ** (num_stages - 1)).
        """
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global pooling, dropout and the classifier.

        Args:
            x: A feature map from forward_features.
            pre_logits: Return the pooled features, (B, num_features), instead of the logits.

        Returns:
            Logits (B, num_classes), or the pooled features.
        """
        return self.head(x, pre_logits=pre_logits) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_tinycnn(variant: str, pretrained: bool = False, **kwargs) -> TinyCNN:
    num_stages = len(kwargs["stage_channels"])
    if num_stages != 3:  # the default cfgs describe 3 stages (16x16 pooled from 64x64)
        size = 64 // 2 ** (num_stages - 1)
        kwargs["pretrained_cfg_overlay"] = dict(pool_size=(size, size), **(kwargs.get("pretrained_cfg_overlay") or {}))
    return build_model_with_cfg(
        TinyCNN, variant, pretrained,
        feature_cfg=dict(flatten_sequential=True, out_indices=tuple(range(num_stages))),
        **kwargs,
    )


def _cfg(url: str = "", **kwargs) -> Dict[str, Any]:
    return {
        "url": url,
        "num_classes": 200, "input_size": (3, 64, 64), "pool_size": (16, 16),
        "crop_pct": 1.0, "interpolation": "bilinear", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stages.0.blocks.0.conv", "classifier": "head.fc", "license": "apache-2.0",
        **kwargs,
    }


# Tiny ImageNet weights are not hosted anywhere: train them with recipes/train.py and load the file with
# tinycnn.load_model, or export it for timm's local-dir:/hf-hub: loader.
default_cfgs = generate_default_cfgs({
    "tinycnn": _cfg(),
    "tinycnn_narrow": _cfg(),
    "tinycnn_shallow": _cfg(),
    "tinycnn_deep": _cfg(),
    "tinycnn_wide": _cfg(),
})


# The named variants cover the course project's grid search: widths 48-96-192 / 64-128-256 and depths 1x/2x/3x.

@register_model
def tinycnn(pretrained: bool = False, **kwargs) -> TinyCNN:
    """The course project's model: 64/128/256 channels, 2 blocks per stage, 1,197,704 parameters."""
    model_args = dict(stage_channels=(64, 128, 256), stage_repeats=(2, 2, 2))
    return _create_tinycnn("tinycnn", pretrained, **dict(model_args, **kwargs))


@register_model
def tinycnn_narrow(pretrained: bool = False, **kwargs) -> TinyCNN:
    """48/96/192 channels, 2 blocks per stage (the narrow width of the original grid)."""
    model_args = dict(stage_channels=(48, 96, 192), stage_repeats=(2, 2, 2))
    return _create_tinycnn("tinycnn_narrow", pretrained, **dict(model_args, **kwargs))


@register_model
def tinycnn_shallow(pretrained: bool = False, **kwargs) -> TinyCNN:
    """64/128/256 channels, 1 block per stage."""
    model_args = dict(stage_channels=(64, 128, 256), stage_repeats=(1, 1, 1))
    return _create_tinycnn("tinycnn_shallow", pretrained, **dict(model_args, **kwargs))


@register_model
def tinycnn_deep(pretrained: bool = False, **kwargs) -> TinyCNN:
    """64/128/256 channels, 3 blocks per stage."""
    model_args = dict(stage_channels=(64, 128, 256), stage_repeats=(3, 3, 3))
    return _create_tinycnn("tinycnn_deep", pretrained, **dict(model_args, **kwargs))


@register_model
def tinycnn_wide(pretrained: bool = False, **kwargs) -> TinyCNN:
    """96/192/384 channels, 2 blocks per stage."""
    model_args = dict(stage_channels=(96, 192, 384), stage_repeats=(2, 2, 2))
    return _create_tinycnn("tinycnn_wide", pretrained, **dict(model_args, **kwargs))
