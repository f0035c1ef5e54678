"""timm backbones for teachers and students: creation by name, pooled features, classifier.

The contract every model follows (timm's): `forward_features(x)` -> feature map,
`forward_head(fmap, pre_logits=True)` -> pooled feature (B, D), `get_classifier()` -> the final
Linear (C, D). Small inputs (8x8 digits, 28x28 Fashion-MNIST, 32x32 CIFAR) get a 3x3 stride-1
stem without max-pool, as CIFAR ResNets do, so the feature map is not pooled away.
"""

from __future__ import annotations

import difflib
import os

import torch
from torch import nn

from gendd_deploy.errors import UsageError


def _check_name(name: str) -> None:
    import timm

    if name in timm.list_models() or name in timm.list_models(pretrained=True):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
    raise UsageError(f"unknown timm model '{name}'{hint}")


def _small_input_stem(model: nn.Module, name: str, in_chans: int) -> None:
    """Replace a ResNet-style stem (conv1 + maxpool) with a 3x3 stride-1 conv and no pooling."""
    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise UsageError(
            f"small_input = true needs a ResNet-style model with conv1 and maxpool; '{name}' has none. "
            "Use a resnet* model, or set small_input = false and image_size large enough for its stem"
        )
    model.conv1 = nn.Conv2d(in_chans, conv.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()


def create_backbone(
    name: str,
    num_classes: int,
    in_chans: int,
    small_input: bool = False,
    kwargs: dict | None = None,
    pretrained: bool = False,
) -> nn.Module:
    import timm

    _check_name(name)
    kwargs = dict(kwargs or {})
    # timm takes tuples for stage layouts; TOML gives lists.
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    if pretrained:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: use the local cache or fail
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except TypeError as e:
        raise UsageError(f"timm model '{name}' rejected model_kwargs {kwargs}: {e}") from None
    except Exception as e:  # hub / file errors when pretrained weights are not cached
        if pretrained:
            raise UsageError(
                f"pretrained weights for '{name}' are not in the local cache and nothing is downloaded here ({type(e).__name__}); "
                "set checkpoint = 'FILE.pt' with a state_dict instead"
            ) from None
        raise
    if small_input:
        _small_input_stem(model, name, in_chans)
    return model


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, D): the pooled pre-classifier feature."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def classifier(model: nn.Module) -> nn.Linear:
    fc = model.get_classifier()
    if not isinstance(fc, nn.Linear):
        raise UsageError(f"{type(model).__name__} has no Linear classifier (got {type(fc).__name__}); GenDD needs W_t (C, D_t)")
    return fc


def feature_dim(model: nn.Module) -> int:
    return int(model.num_features)


def architecture(name: str, num_classes: int, in_chans: int, small_input: bool, kwargs: dict) -> dict:
    """Everything needed to rebuild the module before loading its state_dict."""
    return {"model": name, "num_classes": num_classes, "in_chans": in_chans, "small_input": small_input, "model_kwargs": kwargs}


def build_from_architecture(arch: dict) -> nn.Module:
    return create_backbone(arch["model"], arch["num_classes"], arch["in_chans"], arch["small_input"], arch["model_kwargs"])


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
