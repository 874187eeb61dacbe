"""Training data: box-aware crops and class-balanced sampling weights."""

import pytest
import torch

import numpy as np
from PIL import Image

from spinedet import SpinedetError
from spinedet.dataset.data import CocoSlices, LesionCrop, sampling_weights


def boxes(*rows):
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def test_lesion_crop_holds_the_lesion_whole_at_native_size():
    torch.manual_seed(0)
    image = torch.arange(256 * 256, dtype=torch.float32).reshape(1, 256, 256)
    lesion = boxes([200.5, 10.0, 212.25, 22.0])
    crop = LesionCrop(128, lesion_share=1.0)
    for _ in range(50):
        cropped, kept, labels = crop(image, lesion, torch.tensor([2]))
        assert cropped.shape == (1, 128, 128)
        assert len(kept) == 1 and labels.tolist() == [2]
        # the box moved with the pixels: its corner pixel value is the same
        top = int(cropped[0, 0, 0].item()) // 256
        left = int(cropped[0, 0, 0].item()) % 256
        assert torch.allclose(kept[0], lesion[0] - torch.tensor([left, top, left, top], dtype=torch.float32))
        assert kept[0, 0] >= 0 and kept[0, 2] <= 128 and kept[0, 1] >= 0 and kept[0, 3] <= 128


def test_random_crops_keep_boxes_with_half_their_area_and_drop_slivers():
    image = torch.zeros(1, 256, 256)
    crop = LesionCrop(128, lesion_share=0.0)
    torch.manual_seed(1)
    top, left, _, _ = crop.window(256, 256, boxes([0, 0, 1, 1]))  # draws as with boxes present
    # a box cut in the middle stays (clipped), a box with 1/5 visible goes
    half_in = boxes([left + 120, top + 10, left + 136, top + 20])
    sliver = boxes([left + 124, top + 40, left + 144, top + 50])
    torch.manual_seed(1)
    _, kept, labels = crop(image, torch.cat([half_in, sliver]), torch.tensor([1, 2]))
    assert labels.tolist() == [1]
    assert kept.tolist() == [[120.0, 10.0, 128.0, 20.0]]


def test_slices_no_larger_than_the_crop_pass_unchanged():
    image, box = torch.rand(1, 96, 128), boxes([1, 2, 3, 4])
    out, kept, labels = LesionCrop(128)(image, box, torch.tensor([1]))
    assert out is image and torch.equal(kept, box) and labels.tolist() == [1]


def test_sampling_weights_balance_classes_and_negatives():
    coco = {
        "images": [{"id": i} for i in range(1, 11)],
        "annotations": (
            [{"image_id": i, "category_id": 1} for i in range(1, 7)]  # 6 herniation slices
            + [{"image_id": 7, "category_id": 1}, {"image_id": 7, "category_id": 2}]  # 1 with both
        ),
    }
    weights = sampling_weights(coco, negative_share=0.2)
    assert sum(weights) == pytest.approx(1.0)
    assert sum(weights[7:]) == pytest.approx(0.2)  # 3 negatives
    assert weights[6] == pytest.approx(0.4)  # the only cord-injury slice: its class's whole share
    assert sum(weights[:6]) == pytest.approx(0.4)


def test_sampling_weights_without_negatives_or_boxes():
    coco = {"images": [{"id": 1}, {"id": 2}], "annotations": [{"image_id": 1, "category_id": 1},
                                                               {"image_id": 2, "category_id": 1}]}
    assert sampling_weights(coco, 0.2) == pytest.approx([0.5, 0.5])
    assert sampling_weights({"images": [{"id": 1}], "annotations": []}, 0.2) == [1.0]


def test_a_missing_slice_image_is_named_with_the_command_that_regenerates_it(tmp_path):
    images = [{"id": k, "file_name": f"sub-a/sub-a_slice-0{k}.png", "width": 8, "height": 8} for k in (1, 2, 3)]
    (tmp_path / "sub-a").mkdir()
    for image in images[:2]:
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / image["file_name"])
    coco = {"images": images, "annotations": [], "categories": []}
    assert len(CocoSlices({**coco, "images": images[:2]}, tmp_path)) == 2
    with pytest.raises(SpinedetError, match=r"1 of the 3 slice images .*sub-a/sub-a_slice-03.png.*--forcerun slices"):
        CocoSlices(coco, tmp_path)
