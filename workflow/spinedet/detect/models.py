"""Detector registry: Faster R-CNN on ResNet-50-FPN and on VGG-16, built from a
model config entry (config.yaml `models:`), plus loading of trained weights.

Every detector takes grayscale slices (float tensors [1, H, W] in 0..1); the
model's own transform repeats the channel to the 3 channels the backbones
expect and normalises with grayscale statistics, so the files stay 1-channel.

Normalisation (`norm:` in a model config), in the backbone and the FPN:
- `frozen_bn`: batch norm with fixed statistics and affine terms
  (torchvision's choice on pretrained ResNet-50 weights, and its default);
- `bn`: trainable batch norm (statistics from each small batch);
- `gn`: GroupNorm, 32 groups (He, Girshick & Dollar 2019: detectors trained
  from scratch with GN match pretrained ones); the default from scratch;
- `none`: no normalisation layer (the original VGG-16; its default on
  pretrained weights, as torchvision's classic VGG-16 weights have none).
The box head (two fully connected layers) has none in every variant.

Backbone weights (`pretrained:` in a model config):
- `none`: random initialisation; nothing is downloaded or read.
- `imagenet`: torchvision's ImageNet classification weights, read from the
  TORCH_HOME cache (`$TORCH_HOME/hub/checkpoints/<file>`) and downloaded there
  only when missing.
- a path: a *backbone* state dict in torchvision's classification layout
  (`torchvision.models.resnet50().state_dict()`; `vgg16().state_dict()` for
  VGG-16 with norm none, `vgg16_bn().state_dict()` with bn or frozen_bn; the
  ImageNet files themselves qualify). Classifier keys (`fc.*`,
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
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d

from spinedet import SpinedetError
from spinedet.config import is_pretrained, model_norm

log = logging.getLogger(__name__)

# ImageNet channel statistics averaged over R, G, B: a grayscale slice
# repeated to 3 channels then sits where ImageNet-trained filters expect it.
GRAYSCALE_MEAN = [0.449, 0.449, 0.449]
GRAYSCALE_STD = [0.226, 0.226, 0.226]
DEFAULT_ASPECT_RATIOS = [0.5, 1.0, 2.0]

# conv1_1 .. conv2_2 and pool2: frozen when starting from pretrained weights,
# as in the original Faster R-CNN (they are generic edge detectors).
VGG16_FROZEN_CONVS = 4
GROUPNORM_GROUPS = 32
# VGG-16's output stride is 16 at conv5_3 (the paper's); 8 drops pool4.
VGG16_OUTPUT_STRIDES = (16, 8)


class GrayscaleRCNNTransform(GeneralizedRCNNTransform):
    """GeneralizedRCNNTransform that accepts 1-channel images by repeating the channel.

    With `native_size` it does not resample in training: torchvision would
    scale a 128 px training crop up to min_size (256) and the model would
    learn lesions at twice their size. In inference it resizes as usual, so a
    slice of another size reaches the model at the training slice size (a
    slice of that size passes unchanged).
    """

    def __init__(self, *args, native_size: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.native_size = native_size

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        return super().normalize(image)

    def resize(self, image, target=None):
        if self.native_size and self.training:
            return image, target
        return super().resize(image, target)


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


def norm_layer(norm: str) -> Callable[[int], nn.Module] | None:
    """A factory `channels -> normalisation module`, or None for `none`."""
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "gn":
        return lambda channels: nn.GroupNorm(GROUPNORM_GROUPS, channels)
    return None


def check_pretrained_norm(model_cfg: dict, norm: str, fitting: tuple[str, ...]) -> None:
    if is_pretrained(model_cfg) and norm not in fitting:
        raise SpinedetError(
            f"models.*: pretrained: {model_cfg['pretrained']} with norm: {norm} - the "
            f"{model_cfg['arch']} weights fit norm {' or '.join(fitting)} only; "
            "use one of those, or pretrained: none"
        )


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
        # Keyword arguments of torchvision's FasterRCNN: proposal and sampling
        # counts, thresholds (e.g. 300 test proposals as in the original).
        **model_cfg.get("detector_kwargs", {}),
        # By default min_size = max_size = the native slice size: no resampling
        # (torchvision's default 800 would upsample and cost about 3x).
        "min_size": int(model_cfg.get("min_size") or image_size),
        "max_size": int(model_cfg.get("max_size") or image_size),
        "image_mean": GRAYSCALE_MEAN,
        "image_std": GRAYSCALE_STD,
    }


def use_grayscale_transform(model: FasterRCNN, model_cfg: dict | None = None) -> FasterRCNN:
    """Grayscale input; training crops stay at native size unless min_size/max_size are configured."""
    model_cfg = model_cfg or {}
    old = model.transform
    model.transform = GrayscaleRCNNTransform(
        old.min_size, old.max_size, old.image_mean, old.image_std, size_divisible=old.size_divisible,
        native_size=not (model_cfg.get("min_size") or model_cfg.get("max_size")),
    )
    return model


def build_fasterrcnn_resnet50_fpn(
    model_cfg: dict, num_classes: int, image_size: int, load_weights: bool = True
) -> FasterRCNN:
    is_trained = is_pretrained(model_cfg)
    norm = model_norm(model_cfg)
    check_pretrained_norm(model_cfg, norm, ("frozen_bn", "bn"))
    # torchvision's choice: 3 trainable stages on pretrained weights,
    # everything trainable from scratch.
    trainable_layers = 3 if is_trained else 5
    layer = norm_layer(norm) or (lambda channels: nn.Identity())
    resnet = torchvision.models.resnet50(weights=None, norm_layer=layer)
    if is_trained and load_weights:
        state = backbone_state_dict(model_cfg["pretrained"], torchvision.models.ResNet50_Weights.IMAGENET1K_V1)
        load_backbone_weights(resnet, state, "fc.", str(model_cfg["pretrained"]))
    # The FPN gets the same trainable normalisation (none for frozen_bn, as torchvision).
    fpn_norm = None if norm == "frozen_bn" else norm_layer(norm)
    backbone = _resnet_fpn_extractor(resnet, trainable_layers, norm_layer=fpn_norm)
    model = FasterRCNN(
        backbone,
        num_classes=num_classes,
        rpn_anchor_generator=anchor_generator(model_cfg, levels=5),
        **detector_options(model_cfg, image_size),
    )
    return use_grayscale_transform(model, model_cfg)


def vgg16_features(norm: str, output_stride: int = 16) -> nn.Sequential:
    """VGG-16's 13 convolutions in torchvision's `features` layout, each followed
    by the normalisation (as vgg16_bn when norm is bn) and ReLU; the last
    max-pool dropped, so conv5_3 comes out at stride 16. At output_stride 8,
    pool4 becomes an identity (module indices, and so weight names, stay).
    """
    layer = norm_layer(norm)
    modules: list[nn.Module] = []
    channels = 3
    pools = 0
    for width in torchvision.models.vgg.cfgs["D"]:
        if width == "M":
            pools += 1
            keep = pools < 5 and not (pools == 4 and output_stride == 8)
            modules.append(nn.MaxPool2d(kernel_size=2, stride=2) if keep else nn.Identity())
            continue
        conv = nn.Conv2d(channels, width, kernel_size=3, padding=1)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.constant_(conv.bias, 0)
        modules.append(conv)
        if layer is not None:
            modules.append(layer(width))
        modules.append(nn.ReLU(inplace=True))
        channels = width
    return nn.Sequential(*modules[:-1])  # the fifth pool (an identity placeholder) goes


def vgg16_backbone(model_cfg: dict, load_weights: bool = True) -> nn.Sequential:
    """VGG-16 `features` through conv5_3 + ReLU: stride 16 (or 8), 512 channels.

    Built without VGG's classifier (120M parameters the detector never uses).
    ImageNet weights: vgg16 for norm none, vgg16_bn for bn and frozen_bn.
    """
    norm = model_norm(model_cfg)
    check_pretrained_norm(model_cfg, norm, ("none", "bn", "frozen_bn"))
    output_stride = int(model_cfg.get("output_stride", 16))
    if output_stride not in VGG16_OUTPUT_STRIDES:
        raise SpinedetError(f"models.*.output_stride: {output_stride} is not one of {VGG16_OUTPUT_STRIDES}")
    backbone = vgg16_features(norm, output_stride)
    if is_pretrained(model_cfg) and load_weights:
        weights = (torchvision.models.VGG16_Weights.IMAGENET1K_V1 if norm == "none"
                   else torchvision.models.VGG16_BN_Weights.IMAGENET1K_V1)
        state = backbone_state_dict(model_cfg["pretrained"], weights)
        # A VGG-16 classification state dict: features.N.* are ours, classifier.* is not needed.
        features = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
        load_backbone_weights(backbone, features, "classifier.", str(model_cfg["pretrained"]))
    if is_pretrained(model_cfg):
        convs = [i for i, m in enumerate(backbone) if isinstance(m, nn.Conv2d)]
        # through pool2, which follows the fourth convolution's ReLU
        for module in backbone[: convs[VGG16_FROZEN_CONVS]]:
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
    return use_grayscale_transform(model, model_cfg)


def build_fasterrcnn_vgg16_fpn(
    model_cfg: dict, num_classes: int, image_size: int, load_weights: bool = True
) -> FasterRCNN:
    """VGG-16's 13 convolutions under the FPN neck of ResNet-50-FPN: conv3_3,
    conv4_3 and conv5_3 (strides 4, 8, 16) plus a max-pooled level, 256
    channels each. The two detectors then differ only in their backbone.
    """
    if int(model_cfg.get("output_stride", 16)) != 16:
        raise SpinedetError("models.*.output_stride: fasterrcnn_vgg16_fpn takes its strides (4, 8, 16, 32) "
                            "from the FPN; leave output_stride at 16")
    features = vgg16_backbone(model_cfg, load_weights)
    norm = model_norm(model_cfg)
    # The ReLU ending blocks 3 and 4 (each followed by a max-pool) and conv5_3's.
    pools = [i for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)]
    return_layers = {str(pools[2] - 1): "0", str(pools[3] - 1): "1", str(len(features) - 1): "2"}
    fpn_norm = None if norm in ("frozen_bn", "none") else norm_layer(norm)
    backbone = BackboneWithFPN(features, return_layers, in_channels_list=[256, 512, 512], out_channels=256,
                               norm_layer=fpn_norm)
    model = FasterRCNN(
        backbone,
        num_classes=num_classes,
        rpn_anchor_generator=anchor_generator(model_cfg, levels=4),
        box_roi_pool=MultiScaleRoIAlign(featmap_names=["0", "1", "2"], output_size=7, sampling_ratio=2),
        **detector_options(model_cfg, image_size),
    )
    return use_grayscale_transform(model, model_cfg)


ARCHITECTURES: dict[str, Callable[..., FasterRCNN]] = {
    "fasterrcnn_resnet50_fpn": build_fasterrcnn_resnet50_fpn,
    "fasterrcnn_vgg16": build_fasterrcnn_vgg16,
    "fasterrcnn_vgg16_fpn": build_fasterrcnn_vgg16_fpn,
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


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device of config `train.device` (auto: CUDA when available), for every verb."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SpinedetError("train.device: cuda was asked for but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise SpinedetError(f"train.device: {name!r} is not one of auto, cpu, cuda")
    return torch.device(name)


def count_parameters(model: nn.Module) -> dict:
    """Total and trainable parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def load_trained(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Load best.pt written by `spinedet train`: (model in eval mode on `device`,
    channels-last for speed, metadata).

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
    model_cfg = checkpoint["model_config"]
    if "norm" not in model_cfg:
        # Weights trained before `norm` existed: batch norm (frozen on
        # pretrained weights) in ResNet-50, none in VGG-16.
        legacy = "none" if model_cfg.get("arch", "").startswith("fasterrcnn_vgg16") else (
            "frozen_bn" if is_pretrained(model_cfg) else "bn")
        model_cfg = {**model_cfg, "norm": legacy}
    # The trained state dict replaces the backbone weights: don't fetch them.
    model = build_model(
        model_cfg,
        num_classes=len(checkpoint["classes"]) + 1,
        image_size=checkpoint["image_size"],
        load_weights=False,
    )
    model.load_state_dict(checkpoint["model"])
    # channels-last: 0.90x the time per slice on 2 CPU cores, the same detections
    # (benchmarks/inference_steps.py)
    model.to(device, memory_format=torch.channels_last).eval()
    return model, meta
