"""Detector registry: both architectures build, run, and load weights without a network."""

import math
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models.detection import FasterRCNN
from torchvision.ops.misc import FrozenBatchNorm2d

from spinedet import SpinedetError
from spinedet.detect.models import (
    ARCHITECTURES,
    GrayscaleRCNNTransform,
    build_model,
    count_parameters,
    load_trained,
)

torch.set_num_threads(1)

RESNET = {"arch": "fasterrcnn_resnet50_fpn", "pretrained": "none", "anchor_sizes": [[16], [32], [64], [128], [256]]}
VGG = {"arch": "fasterrcnn_vgg16", "pretrained": "none", "anchor_sizes": [[16, 32, 64, 128]]}
VGG_FPN = {"arch": "fasterrcnn_vgg16_fpn", "pretrained": "none", "anchor_sizes": [[8], [16], [32], [64]]}
CONFIGS = {"fasterrcnn_resnet50_fpn": RESNET, "fasterrcnn_vgg16": VGG, "fasterrcnn_vgg16_fpn": VGG_FPN}


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch, tmp_path):
    """An empty TORCH_HOME and no network: any download attempt fails loudly."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def refuse(url, *args, **kwargs):
        raise urllib.error.URLError(f"network disabled in tests ({url})")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_registry_has_every_architecture():
    assert set(CONFIGS) <= set(ARCHITECTURES)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_build_model_heads_and_native_size(arch):
    model = build_model(CONFIGS[arch], num_classes=3, image_size=128)
    assert isinstance(model, FasterRCNN)
    assert model.roi_heads.box_predictor.cls_score.out_features == 3
    assert model.roi_heads.box_predictor.bbox_pred.out_features == 3 * 4
    # No resampling: the slice's native size is both min and max size.
    assert isinstance(model.transform, GrayscaleRCNNTransform)
    assert tuple(model.transform.min_size) == (128,)
    assert model.transform.max_size == 128
    counts = count_parameters(model)
    assert 0 < counts["trainable"] <= counts["total"]
    assert counts["total"] == sum(p.numel() for p in model.parameters())


def test_vgg16_backbone_is_conv5_3_at_stride_16():
    model = build_model(VGG, num_classes=3, image_size=128)
    backbone = model.backbone
    convs = [m for m in backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 13
    assert isinstance(backbone[-1], torch.nn.ReLU)  # conv5_3 + ReLU, last max-pool dropped
    assert backbone.out_channels == 512
    features = backbone(torch.zeros(1, 3, 128, 96))
    assert features.shape == (1, 512, 128 // 16, 96 // 16)
    # One feature map, 4 sizes x 3 aspect ratios per location.
    assert model.rpn.anchor_generator.num_anchors_per_location() == [12]
    assert model.roi_heads.box_roi_pool.featmap_names == ["0"]
    assert model.roi_heads.box_roi_pool.output_size == (7, 7)


def test_resnet50_fpn_has_five_levels():
    model = build_model(RESNET, num_classes=3, image_size=128)
    features = model.backbone(torch.zeros(1, 3, 128, 128))
    assert [f.shape[-1] for f in features.values()] == [32, 16, 8, 4, 2]
    assert model.rpn.anchor_generator.num_anchors_per_location() == [3] * 5


def test_vgg16_fpn_reads_conv3_3_to_conv5_3_at_strides_4_to_32():
    model = build_model({**VGG_FPN, "norm": "bn"}, num_classes=3, image_size=128)
    body = model.backbone.body
    assert len([m for m in body.modules() if isinstance(m, torch.nn.Conv2d)]) == 13
    features = model.backbone(torch.zeros(1, 3, 128, 96))
    assert list(features) == ["0", "1", "2", "pool"]
    assert [tuple(f.shape[-2:]) for f in features.values()] == [(32, 24), (16, 12), (8, 6), (4, 3)]
    assert all(f.shape[1] == 256 for f in features.values())
    assert model.rpn.anchor_generator.num_anchors_per_location() == [3] * 4
    assert model.roi_heads.box_roi_pool.featmap_names == ["0", "1", "2"]
    with pytest.raises(SpinedetError, match="output_stride"):
        build_model({**VGG_FPN, "output_stride": 8}, num_classes=3, image_size=128)


def vgg16_bn_weights_file(tmp_path: Path, seed: int) -> tuple[dict, Path]:
    """A vgg16_bn classification state dict (features only) saved as a local weights file."""
    torch.manual_seed(seed)
    saved = {f"features.{k}": v for k, v in torchvision.models.vgg16_bn(weights=None).features.state_dict().items()}
    path = tmp_path / "vgg16_bn_backbone.pth"
    torch.save(saved, path)
    return saved, path


def test_vgg16_fpn_loads_the_vgg16_bn_layout(tmp_path):
    saved, path = vgg16_bn_weights_file(tmp_path, 6)
    model = build_model({**VGG_FPN, "pretrained": str(path), "norm": "frozen_bn"}, num_classes=3, image_size=128)
    body = model.backbone.body
    assert torch.equal(body.state_dict()["40.weight"], saved["features.40.weight"])  # conv5_3
    assert isinstance(body["1"], FrozenBatchNorm2d)
    assert not body["0"].weight.requires_grad and body["40"].weight.requires_grad


def test_anchor_levels_must_match_feature_maps():
    with pytest.raises(SpinedetError, match="anchor_sizes"):
        build_model({**VGG, "anchor_sizes": [[16], [32]]}, num_classes=3, image_size=128)


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(SpinedetError, match="unknown architecture 'yolo'"):
        build_model({**VGG, "arch": "yolo"}, num_classes=3, image_size=128)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_forward_train_and_eval_on_grayscale(arch):
    torch.manual_seed(0)
    model = build_model(CONFIGS[arch], num_classes=3, image_size=128)
    images = [torch.rand(1, 96, 128), torch.rand(1, 96, 128)]
    targets = [
        {"boxes": torch.tensor([[20.0, 30.0, 50.0, 60.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # a negative slice
    ]
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(math.isfinite(float(v.detach())) for v in losses.values())
    sum(losses.values()).backward()

    model.eval()
    with torch.no_grad():
        outputs = model([torch.rand(1, 64, 64)])
    assert len(outputs) == 1
    assert outputs[0]["boxes"].shape[1:] == (4,)
    assert len(outputs[0]["boxes"]) == len(outputs[0]["scores"]) == len(outputs[0]["labels"])
    if len(outputs[0]["boxes"]):
        assert outputs[0]["boxes"].max() <= 64  # boxes come back in input pixels


NORM_TYPES = {
    "frozen_bn": FrozenBatchNorm2d,
    "bn": torch.nn.BatchNorm2d,
    "gn": torch.nn.GroupNorm,
}


@pytest.mark.parametrize("norm", ["frozen_bn", "bn", "gn", "none"])
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_every_norm_builds_and_takes_a_training_step(arch, norm):
    torch.manual_seed(0)
    model = build_model({**CONFIGS[arch], "norm": norm}, num_classes=3, image_size=64)
    kinds = {type(m) for m in model.backbone.modules()}
    norms = kinds & {FrozenBatchNorm2d, torch.nn.BatchNorm2d, torch.nn.GroupNorm}
    assert norms == ({NORM_TYPES[norm]} if norm in NORM_TYPES else set())
    if arch == "fasterrcnn_resnet50_fpn" and norm in ("bn", "gn"):
        fpn_kinds = {type(m) for m in model.backbone.fpn.modules()}
        assert NORM_TYPES[norm] in fpn_kinds  # the neck is normalised too
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.001)
    before = model.roi_heads.box_predictor.cls_score.weight.detach().clone()
    losses = model(
        [torch.rand(1, 64, 64), torch.rand(1, 64, 64)],
        [{"boxes": torch.tensor([[10.0, 12.0, 30.0, 28.0]]), "labels": torch.tensor([2])},
         {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}],
    )
    loss = sum(losses.values())
    assert math.isfinite(float(loss.detach()))
    loss.backward()
    optimizer.step()
    assert not torch.equal(before, model.roi_heads.box_predictor.cls_score.weight)


def test_default_norm_is_gn_from_scratch_and_torchvisions_on_pretrained_weights():
    from spinedet.detect.models import model_norm

    assert model_norm(RESNET) == "gn"
    assert model_norm({**RESNET, "pretrained": "imagenet"}) == "frozen_bn"
    assert model_norm({**VGG, "pretrained": "imagenet"}) == "none"  # the classic VGG-16 weights
    with pytest.raises(SpinedetError, match="not one of"):
        model_norm({**RESNET, "norm": "layernorm"})


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_pretrained_weights_with_group_norm_are_refused(arch, tmp_path):
    with pytest.raises(SpinedetError, match="weights fit norm"):
        build_model({**CONFIGS[arch], "pretrained": "imagenet", "norm": "gn"}, num_classes=3, image_size=64)


def test_vgg16_output_stride_8_drops_pool4_and_keeps_weight_names():
    at16 = build_model({**VGG, "norm": "bn"}, num_classes=3, image_size=128).backbone
    at8 = build_model({**VGG, "norm": "bn", "output_stride": 8}, num_classes=3, image_size=128).backbone
    assert at8(torch.zeros(1, 3, 128, 96)).shape == (1, 512, 16, 12)
    assert at16(torch.zeros(1, 3, 128, 96)).shape == (1, 512, 8, 6)
    assert at8.state_dict().keys() == at16.state_dict().keys()
    with pytest.raises(SpinedetError, match="output_stride"):
        build_model({**VGG, "output_stride": 4}, num_classes=3, image_size=128)


def test_crops_are_not_resized_to_the_slice_size():
    """min_size = max_size = 128 would scale a 64 px crop up 2x; the native transform keeps it."""
    model = build_model(RESNET, num_classes=3, image_size=128)
    boxes = torch.tensor([[10.0, 10.0, 20.0, 20.0]])
    batch, targets = model.transform([torch.rand(1, 64, 64)], [{"boxes": boxes, "labels": torch.tensor([1])}])
    assert batch.image_sizes == [(64, 64)] and torch.equal(targets[0]["boxes"], boxes)
    resizing = build_model({**RESNET, "min_size": 128, "max_size": 128}, num_classes=3, image_size=128)
    batch, _ = resizing.transform([torch.rand(1, 64, 64)])
    assert batch.image_sizes == [(128, 128)]
    # In inference a slice of another size is brought to the training slice size (predict).
    model.eval()
    batch, _ = model.transform([torch.rand(1, 64, 64)])
    assert batch.image_sizes == [(128, 128)]


def test_grayscale_transform_repeats_the_channel():
    model = build_model(RESNET, num_classes=3, image_size=64)
    batch, _ = model.transform([torch.full((1, 64, 64), 0.5)])
    assert batch.tensors.shape == (1, 3, 64, 64)
    assert torch.allclose(batch.tensors[0, 0], batch.tensors[0, 2])


def test_resnet50_loads_local_backbone_state_dict(tmp_path):
    torch.manual_seed(1)
    saved = torchvision.models.resnet50(weights=None).state_dict()
    path = tmp_path / "resnet50_backbone.pth"
    torch.save(saved, path)
    model = build_model({**RESNET, "pretrained": str(path)}, num_classes=3, image_size=128)
    body = model.backbone.body.state_dict()
    for key in ("conv1.weight", "layer1.0.conv1.weight", "layer4.2.bn3.running_var", "layer4.2.conv3.weight"):
        assert torch.equal(body[key], saved[key]), key
    # Pretrained weights follow torchvision: frozen batch norm, conv1 and layer1 frozen.
    assert isinstance(model.backbone.body.bn1, FrozenBatchNorm2d)
    assert not model.backbone.body.conv1.weight.requires_grad
    assert model.backbone.body.layer4[0].conv1.weight.requires_grad


def test_vgg16_loads_local_backbone_state_dict(tmp_path):
    torch.manual_seed(2)
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    # The layout of torchvision's vgg16().state_dict(), without the (ignored) classifier.
    saved = {f"features.{k}": v for k, v in features.state_dict().items()}
    path = tmp_path / "vgg16_backbone.pth"
    torch.save(saved, path)
    model = build_model({**VGG, "pretrained": str(path)}, num_classes=3, image_size=128)
    loaded = model.backbone.state_dict()
    assert loaded.keys() == {k.removeprefix("features.") for k in saved} - {"30.weight", "30.bias"}
    for key, value in loaded.items():
        assert torch.equal(value, saved[f"features.{key}"]), key
    assert not model.backbone[0].weight.requires_grad  # conv1_1 frozen on pretrained weights
    assert model.backbone[28].weight.requires_grad  # conv5_3 trains


def test_vgg16_bn_loads_a_vgg16_bn_state_dict(tmp_path):
    saved, path = vgg16_bn_weights_file(tmp_path, 5)
    model = build_model({**VGG, "pretrained": str(path), "norm": "frozen_bn"}, num_classes=3, image_size=128)
    loaded = model.backbone.state_dict()
    assert torch.equal(loaded["40.weight"], saved["features.40.weight"])  # conv5_3
    assert torch.equal(loaded["41.running_var"], saved["features.41.running_var"])
    assert isinstance(model.backbone[1], FrozenBatchNorm2d)
    assert not model.backbone[0].weight.requires_grad and model.backbone[40].weight.requires_grad


def test_state_dict_of_another_network_is_refused(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
    with pytest.raises(SpinedetError, match="do not fit the backbone"):
        build_model({**VGG, "pretrained": str(path)}, num_classes=3, image_size=128)


def test_missing_pretrained_file_is_a_clear_error(tmp_path):
    with pytest.raises(SpinedetError, match="neither 'none', 'imagenet' nor an existing"):
        build_model({**RESNET, "pretrained": str(tmp_path / "nope.pth")}, num_classes=3, image_size=128)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_imagenet_without_cache_or_network_is_a_clear_error(arch, tmp_path):
    with pytest.raises(SpinedetError) as caught:
        build_model({**CONFIGS[arch], "pretrained": "imagenet"}, num_classes=3, image_size=128)
    message = str(caught.value)
    assert "pretrained: imagenet" in message
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in message
    assert "could not be downloaded" in message
    assert not any((tmp_path / "torch_home" / "hub" / "checkpoints").glob("*"))  # no partial file left


def test_imagenet_weights_come_from_the_torch_home_cache(tmp_path):
    torch.manual_seed(3)
    saved = torchvision.models.resnet50(weights=None).state_dict()
    url = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(saved, cache / Path(url).name)
    model = build_model({**RESNET, "pretrained": "imagenet"}, num_classes=3, image_size=128)
    assert torch.equal(model.backbone.body.layer2[0].conv2.weight, saved["layer2.0.conv2.weight"])


@pytest.mark.parametrize("pretrained", ["none", "imagenet"])
def test_load_trained_round_trip(tmp_path, pretrained):
    torch.manual_seed(4)
    # An imagenet-configured model builds with frozen batch norm; load_trained
    # must rebuild that structure without fetching any weights.
    from spinedet.config import model_norm

    model_cfg = {**RESNET, "pretrained": pretrained}
    model_cfg["norm"] = model_norm(model_cfg)  # as spinedet train saves it
    model = build_model(model_cfg, num_classes=3, image_size=64, load_weights=False)
    path = tmp_path / "best.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "model_name": "resnet50",
            "model_config": model_cfg,
            "classes": ["disc_herniation", "cord_injury"],
            "image_size": 64,
            "epoch": 3,
            "val_ap50": 0.5,
        },
        path,
    )
    loaded, meta = load_trained(path)
    assert not loaded.training
    assert meta["classes"] == ["disc_herniation", "cord_injury"]
    assert meta["epoch"] == 3 and meta["image_size"] == 64 and meta["model_name"] == "resnet50"
    assert "model" not in meta
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_weights_trained_before_norm_existed_still_load(arch, tmp_path):
    """best.pt of the earlier releases: no `norm` key; batch norm in ResNet-50, none in VGG-16."""
    legacy_norm = "bn" if arch == "fasterrcnn_resnet50_fpn" else "none"
    model = build_model({**CONFIGS[arch], "norm": legacy_norm}, num_classes=3, image_size=64)
    path = tmp_path / "best.pt"
    torch.save({"model": model.state_dict(), "model_config": CONFIGS[arch], "classes": ["a", "b"],
                "image_size": 64}, path)
    loaded, _ = load_trained(path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_load_trained_rejects_other_files(tmp_path):
    with pytest.raises(SpinedetError, match="not found"):
        load_trained(tmp_path / "missing.pt")
    path = tmp_path / "other.pt"
    torch.save({"weights": 1}, path)
    with pytest.raises(SpinedetError, match="not a spinedet best.pt"):
        load_trained(path)
