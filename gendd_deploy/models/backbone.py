"""timm backbones for teachers and students: creation by name, pooled features, classifier.

The contract every model follows (timm's): `forward_features(x)` -> feature map,
`forward_head(fmap, pre_logits=True)` -> pooled feature (B, D), `get_classifier()` -> the final
Linear (C, D). D is `head_hidden_size` where timm has one (MobileNetV3 / EfficientNet-style heads
put a conv after pooling, so it differs from `num_features`); `check_contract` confirms it with one
dry forward.

Small inputs (8x8 digits, 28x28 Fashion-MNIST, 32x32 CIFAR) get a 3x3 stride-1 stem without
max-pool, as CIFAR ResNets do, so the feature map is not pooled away. The stem is as wide as the
first stage (timm's plain ResNet stem is always 64 wide, whatever `channels` says). ResNets with
three stages (`layers = [5, 5, 5]`) get an empty fourth stage.

`zero_init_last` (timm's default: on) zero-initialises the last BN of every residual branch. From
scratch, a one-block-per-stage network then starts as a chain of 1x1 downsample convs; recipes
default it off. It is recorded in the architecture with the stem width, so a reload rebuilds the
same module.
"""

from __future__ import annotations

import copy
import difflib
import os

import timm
import torch
from torch import nn

from gendd_deploy.errors import UsageError


def _check_name(name: str) -> None:
    if name in timm.list_models() or name in timm.list_models(pretrained=True):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
    raise UsageError(f"unknown timm model '{name}'{hint}")


def _init_conv(conv: nn.Conv2d) -> None:
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")


def _new_bn(like: nn.Module, channels: int) -> nn.Module:
    bn = type(like)(channels) if isinstance(like, nn.BatchNorm2d) else nn.BatchNorm2d(channels)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    return bn


def _first_stage_planes(model: nn.Module) -> int:
    block = model.layer1[0]
    last = getattr(block, "conv3", None) or block.conv2
    return last.out_channels // getattr(type(block), "expansion", 1)


def _small_input_stem(model: nn.Module, name: str, in_chans: int, width: int | None) -> int:
    """Replace a ResNet-style stem (conv1 + maxpool) with a 3x3 stride-1 conv, no pooling.

    width None keeps the stem's own width (artifacts made before the width followed the first
    stage). Returns the stem width used.
    """
    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not hasattr(model, "maxpool") or not hasattr(model, "layer1"):
        raise UsageError(
            f"small_input = true needs a ResNet-style model with a plain conv1 stem and maxpool; '{name}' has none. "
            "Use a resnet* model, or set small_input = false and an image_size (or model_kwargs) its stem can take"
        )
    width = conv.out_channels if width is None else width
    model.conv1 = nn.Conv2d(in_chans, width, kernel_size=3, stride=1, padding=1, bias=False)
    _init_conv(model.conv1)
    model.maxpool = nn.Identity()
    if width == conv.out_channels:
        return width
    # the stem's width changed: rebuild what reads it (bn1, the first block's input and shortcut)
    model.bn1 = _new_bn(model.bn1, width)
    block = model.layer1[0]
    old = block.conv1
    block.conv1 = nn.Conv2d(width, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
    _init_conv(block.conv1)
    out_ch = (getattr(block, "conv3", None) or block.conv2).out_channels
    stride = old.stride[0] if isinstance(old.stride, tuple) else old.stride
    if width == out_ch and stride == 1:
        block.downsample = None  # identity shortcut, as timm builds when the widths agree
    elif block.downsample is None:
        conv1x1 = nn.Conv2d(width, out_ch, 1, stride=stride, bias=False)
        _init_conv(conv1x1)
        block.downsample = nn.Sequential(conv1x1, _new_bn(model.bn1, out_ch))
    else:
        ds = block.downsample
        convs = [i for i, m in enumerate(ds) if isinstance(m, nn.Conv2d)]
        c = ds[convs[0]]
        ds[convs[0]] = nn.Conv2d(width, c.out_channels, c.kernel_size, c.stride, c.padding, bias=False)
        _init_conv(ds[convs[0]])
    model.feature_info[0]["num_chs"] = width
    return width


def _fill_missing_stages(model: nn.Module) -> None:
    """timm ResNet with 3 entries in `layers` builds layer1..3 but forward_features runs layer4."""
    if isinstance(model, timm.models.resnet.ResNet):
        for i in range(1, 5):
            if not hasattr(model, f"layer{i}"):
                setattr(model, f"layer{i}", nn.Sequential())


def _create(name: str, pretrained: bool, zero_init_last: bool | None, **kwargs) -> tuple[nn.Module, bool | None]:
    """timm.create_model, passing zero_init_last to the families that take it (None: not taken)."""
    if zero_init_last is not None:
        try:
            return timm.create_model(name, pretrained=pretrained, zero_init_last=zero_init_last, **kwargs), zero_init_last
        except TypeError as e:
            if "zero_init_last" not in str(e):
                raise
    return timm.create_model(name, pretrained=pretrained, **kwargs), None


def create_backbone(
    name: str,
    num_classes: int,
    in_chans: int,
    small_input: bool = False,
    kwargs: dict | None = None,
    *,
    pretrained: bool = False,
    zero_init_last: bool | None = False,
    stem_width: int | None | str = "first_stage",
) -> nn.Module:
    """A timm model with the project's small-input stem; `architecture(model)` tells how to rebuild it.

    stem_width: "first_stage" (new models), an int (a reload), or None (legacy: the stem's own 64).
    """
    _check_name(name)
    kwargs = dict(kwargs or {})
    # timm takes tuples for stage layouts; TOML gives lists.
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    if pretrained:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: use the local cache or fail
    try:
        model, zil = _create(name, pretrained, zero_init_last, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except (TypeError, ValueError, AssertionError, IndexError) as e:
        raise UsageError(f"timm model '{name}' rejected model_kwargs {kwargs}: {type(e).__name__}: {e}") from None
    except Exception as e:  # hub / file errors when pretrained weights are not cached
        if pretrained:
            raise UsageError(
                f"pretrained weights for '{name}' are not in the local cache and nothing is downloaded here ({type(e).__name__}); "
                "set checkpoint = 'FILE.pt' with a state_dict instead"
            ) from None
        raise
    _fill_missing_stages(model)
    used_stem = None
    if small_input:
        if stem_width == "first_stage":
            stem_width = _first_stage_planes(model) if hasattr(model, "layer1") else None
        used_stem = _small_input_stem(model, name, in_chans, stem_width)
    model.gendd_architecture = {
        "model": name,
        "num_classes": num_classes,
        "in_chans": in_chans,
        "small_input": small_input,
        "model_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
        "stem_width": used_stem,
        "zero_init_last": zil,
    }
    return model


def architecture(model: nn.Module) -> dict:
    """Everything needed to rebuild the module before loading its state_dict."""
    return copy.deepcopy(model.gendd_architecture)


def build_from_architecture(arch: dict) -> nn.Module:
    # manifests written before stem_width was recorded used timm's 64-wide stem (None here)
    return create_backbone(
        arch["model"], arch["num_classes"], arch["in_chans"], arch["small_input"], arch["model_kwargs"],
        zero_init_last=None, stem_width=arch.get("stem_width"),
    )


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, D): the pooled pre-classifier feature."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def classifier(model: nn.Module) -> nn.Linear:
    fc = model.get_classifier()
    if not isinstance(fc, nn.Linear):
        raise UsageError(f"{type(model).__name__} has no Linear classifier (got {type(fc).__name__}); GenDD needs W_t (C, D_t)")
    return fc


def feature_dim(model: nn.Module) -> int:
    """Width of the pooled feature: timm's head_hidden_size where it has one, else num_features."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


@torch.no_grad()
def check_contract(model: nn.Module, in_chans: int, image_size: int) -> int:
    """One dry forward: the pooled feature is (B, D) with D = feature_dim = classifier.in_features."""
    name = getattr(model, "gendd_architecture", {}).get("model", type(model).__name__)
    fc = classifier(model)
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros(2, in_chans, image_size, image_size, device=next(model.parameters()).device)
        feat = pooled_features(model, x)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(
            f"timm model '{name}' cannot take {in_chans}x{image_size}x{image_size} images ({type(e).__name__}: {first}); "
            "set model_kwargs (e.g. img_size / patch_size for a ViT), small_input, or [data] image_size"
        ) from None
    finally:
        model.train(was_training)
    d = feature_dim(model)
    if feat.ndim != 2 or feat.shape[1] != d or fc.in_features != d:
        raise UsageError(
            f"timm model '{name}' breaks the backbone contract: pooled feature {tuple(feat.shape)}, "
            f"feature dim {d}, classifier in_features {fc.in_features}; pick another model or global_pool"
        )
    return d


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
