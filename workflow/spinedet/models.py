"""Detector registry: Faster R-CNN on ResNet-50-FPN and on VGG-16, built from a
model config entry (config.yaml `models:`), plus loading of trained weights.

Every detector takes grayscale slices (float tensors [1, H, W] in 0..1); the
model's own transform repeats the channel to the 3 channels the backbones
expect and normalises with grayscale statistics, so the files stay 1-channel.

Backbone weights (`pretrained:` in a model config):
- `none`: random initialisation; nothing is downloaded or read.
- `imagenet`: torchvision's ImageNet classification weights, read from the
  TORCH_HOME cache (`$TORCH_HOME/hub/checkpoints/<file>`) and downloaded there
  only when missing.
- a path: a *backbone* state dict in torchvision's classification layout
  (`torchvision.models.resnet50().state_dict()` or `vgg16().state_dict()`;
  the ImageNet files themselves qualify). Classifier keys (`fc.*`,
  `classifier.*`) are ignored; every other key must match.
"""

from __future__ import annotations

import logging
import urllib.error
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d

from spinedet import SpinedetError

log = logging.getLogger(__name__)

# ImageNet channel statistics averaged over R, G, B: a grayscale slice
# repeated to 3 channels then sits where ImageNet-trained filters expect it.
GRAYSCALE_MEAN = [0.449, 0.449, 0.449]
GRAYSCALE_STD = [0.226, 0.226, 0.226]
DEFAULT_ASPECT_RATIOS = [0.5, 1.0, 2.0]

# conv1_1 .. conv2_2 and pool2: frozen when starting from pretrained weights,
# as in the original Faster R-CNN (they are generic edge detectors).
VGG16_FROZEN_MODULES = 10


class GrayscaleRCNNTransform(GeneralizedRCNNTransform):
    """GeneralizedRCNNTransform that accepts 1-channel images by repeating the channel."""

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        return super().normalize(image)


def imagenet_state_dict(weights: torchvision.models.WeightsEnum) -> dict:
    """torchvision ImageNet weights from the TORCH_HOME cache, downloading them only if missing."""
    cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
    cached = cache_dir / Path(weights.url).name
    if not cached.is_file():
        log.info("downloading %s to %s", weights.url, cached)
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name(cached.name + ".partial")
        try:
            torch.hub.download_url_to_file(weights.url, str(partial), progress=False)
        except (urllib.error.URLError, OSError, RuntimeError, ValueError) as exc:
            partial.unlink(missing_ok=True)
            raise SpinedetError(
                f"pretrained: imagenet needs {cached.name} ({weights}), which is not in the "
                f"TORCH_HOME cache {cache_dir} and could not be downloaded ({exc}). Copy the file "
                f"there, set TORCH_HOME to a folder holding hub/checkpoints/{cached.name}, "
                "or set the model's pretrained: none (or a path to a local state dict)."
            ) from exc
        partial.replace(cached)
    return torch.load(cached, map_location="cpu", weights_only=True)


def local_state_dict(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SpinedetError(
            f"pretrained: {path} is neither 'none', 'imagenet' nor an existing state dict file"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a bad file
        raise SpinedetError(f"pretrained: cannot read {path} as a torch state dict ({exc})") from exc
    if not isinstance(state, dict):
        raise SpinedetError(f"pretrained: {path} holds a {type(state).__name__}, not a state dict")
    return state


def is_pretrained(model_cfg: dict) -> bool:
    return str(model_cfg.get("pretrained", "none")).lower() != "none"


def backbone_state_dict(pretrained: str, imagenet_weights: torchvision.models.WeightsEnum) -> dict | None:
    """The backbone weights a model config asks for, or None for `pretrained: none`."""
    pretrained = str(pretrained)
    if pretrained.lower() == "none":
        return None
    if pretrained.lower() == "imagenet":
        return imagenet_state_dict(imagenet_weights)
    return local_state_dict(pretrained)


def load_backbone_weights(backbone: nn.Module, state: dict, ignore_prefix: str, source: str) -> None:
    """Load a classification network's state dict into `backbone`, ignoring its classifier."""
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefix)}
    result = backbone.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(ignore_prefix)]
    if missing or result.unexpected_keys:
        raise SpinedetError(
            f"pretrained weights {source} do not fit the backbone: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {result.unexpected_keys[:5]}{'...' if len(result.unexpected_keys) > 5 else ''}"
        )


def anchor_generator(model_cfg: dict, levels: int) -> AnchorGenerator:
    """Anchor sizes and aspect ratios (height / width): one list per feature map."""
    sizes = tuple(tuple(int(s) for s in level) for level in model_cfg["anchor_sizes"])
    ratios = tuple(tuple(float(r) for r in level) for level in aspect_ratios(model_cfg))
    for key, value in (("anchor_sizes", sizes), ("aspect_ratios", ratios)):
        if len(value) != levels:
            raise SpinedetError(
                f"models.*.{key} has {len(value)} lists but {model_cfg['arch']} has {levels} "
                "feature map(s): give one list per feature map"
            )
    return AnchorGenerator(sizes=sizes, aspect_ratios=ratios)


def aspect_ratios(model_cfg: dict) -> list[list[float]]:
    """Configured aspect ratios per level; [0.5, 1, 2] on every level when absent."""
    default = [DEFAULT_ASPECT_RATIOS] * len(model_cfg["anchor_sizes"])
    return model_cfg.get("aspect_ratios") or default


def detector_options(model_cfg: dict, image_size: int) -> dict:
    """FasterRCNN keyword arguments shared by every architecture."""
    return {
        # By default min_size = max_size = the native slice size: no resampling
        # (torchvision's default 800 would upsample and cost about 3x).
        "min_size": int(model_cfg.get("min_size") or image_size),
        "max_size": int(model_cfg.get("max_size") or image_size),
        "image_mean": GRAYSCALE_MEAN,
        "image_std": GRAYSCALE_STD,
        # Proposal and sampling counts (torchvision FasterRCNN keywords), e.g.
        # 300 test proposals as in the original Faster R-CNN instead of 1000.
        **model_cfg.get("detector_kwargs", {}),
    }


def use_grayscale_transform(model: FasterRCNN) -> FasterRCNN:
    old = model.transform
    model.transform = GrayscaleRCNNTransform(
        old.min_size, old.max_size, old.image_mean, old.image_std, size_divisible=old.size_divisible
    )
    return model


def build_fasterrcnn_resnet50_fpn(
    model_cfg: dict, num_classes: int, image_size: int, load_weights: bool = True
) -> FasterRCNN:
    is_trained = is_pretrained(model_cfg)
    # torchvision's choice: frozen BN and 3 trainable stages on pretrained
    # weights; plain BN and everything trainable from scratch.
    norm_layer = FrozenBatchNorm2d if is_trained else nn.BatchNorm2d
    trainable_layers = 3 if is_trained else 5
    resnet = torchvision.models.resnet50(weights=None, norm_layer=norm_layer)
    if is_trained and load_weights:
        state = backbone_state_dict(model_cfg["pretrained"], torchvision.models.ResNet50_Weights.IMAGENET1K_V1)
        load_backbone_weights(resnet, state, "fc.", str(model_cfg["pretrained"]))
    backbone = _resnet_fpn_extractor(resnet, trainable_layers)
    model = FasterRCNN(
        backbone,
        num_classes=num_classes,
        rpn_anchor_generator=anchor_generator(model_cfg, levels=5),
        **detector_options(model_cfg, image_size),
    )
    return use_grayscale_transform(model)


def vgg16_backbone(model_cfg: dict, load_weights: bool = True) -> nn.Sequential:
    """VGG-16 `features` through conv5_3 + ReLU (the last max-pool dropped): stride 16, 512 channels.

    Built without VGG's classifier (120M parameters the detector never uses);
    `layers` get the same initialisation as torchvision's VGG.
    """
    layers = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"], batch_norm=False)
    for module in layers.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.constant_(module.bias, 0)
    if is_pretrained(model_cfg) and load_weights:
        state = backbone_state_dict(model_cfg["pretrained"], torchvision.models.VGG16_Weights.IMAGENET1K_V1)
        # A VGG-16 classification state dict: features.N.* are ours, classifier.* is not needed.
        features = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
        load_backbone_weights(layers, features, "classifier.", str(model_cfg["pretrained"]))
    backbone = layers[:-1]
    if is_pretrained(model_cfg):
        for module in backbone[:VGG16_FROZEN_MODULES]:
            module.requires_grad_(False)
    backbone.out_channels = 512
    return backbone


def build_fasterrcnn_vgg16(
    model_cfg: dict, num_classes: int, image_size: int, load_weights: bool = True
) -> FasterRCNN:
    backbone = vgg16_backbone(model_cfg, load_weights)
    model = FasterRCNN(
        backbone,
        num_classes=num_classes,
        rpn_anchor_generator=anchor_generator(model_cfg, levels=1),
        box_roi_pool=MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2),
        **detector_options(model_cfg, image_size),
    )
    return use_grayscale_transform(model)


ARCHITECTURES: dict[str, Callable[..., FasterRCNN]] = {
    "fasterrcnn_resnet50_fpn": build_fasterrcnn_resnet50_fpn,
    "fasterrcnn_vgg16": build_fasterrcnn_vgg16,
}


def build_model(model_cfg: dict, num_classes: int, image_size: int, *, load_weights: bool = True) -> nn.Module:
    """A detector for `num_classes` classes (background included) on `image_size` px slices.

    `load_weights=False` builds the same structure as `pretrained:` asks for
    (e.g. frozen batch norm) without reading or downloading backbone weights,
    for loading a trained state dict on top.
    """
    arch = model_cfg.get("arch")
    if arch not in ARCHITECTURES:
        raise SpinedetError(
            f"models.*.arch: unknown architecture {arch!r}; known: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[arch](model_cfg, num_classes, int(image_size), load_weights=load_weights)


def count_parameters(model: nn.Module) -> dict:
    """Total and trainable parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def load_trained(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Load best.pt written by `spinedet train`: (model in eval mode on `device`, metadata).

    The metadata holds every key of best.pt except the weights: model_name,
    model_config, classes, image_size, epoch, val_ap50.
    """
    path = Path(path)
    if not path.is_file():
        raise SpinedetError(f"trained weights not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SpinedetError(f"cannot read trained weights {path} ({exc})") from exc
    required = {"model", "model_config", "classes", "image_size"}
    if not isinstance(checkpoint, dict) or not required <= checkpoint.keys():
        raise SpinedetError(f"{path} is not a spinedet best.pt (needs keys {sorted(required)})")
    meta = {k: v for k, v in checkpoint.items() if k != "model"}
    # The trained state dict replaces the backbone weights: don't fetch them.
    model = build_model(
        checkpoint["model_config"],
        num_classes=len(checkpoint["classes"]) + 1,
        image_size=checkpoint["image_size"],
        load_weights=False,
    )
    model.load_state_dict(checkpoint["model"])
    model.to(device).eval()
    return model, meta
