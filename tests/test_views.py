"""Views: the recorded box and flip reproduce the view pixels; boxes follow the crop rule."""

import torch
import torch.nn.functional as F

from pwself.views import MultiCrop, crop_and_resize, sample_boxes


def test_integer_box_of_output_size_is_exact_copy():
    img = torch.rand(3, 2, 20, 24)
    boxes = torch.tensor([[0.0, 0, 8, 8], [5, 3, 13, 11], [16, 12, 24, 20]])
    flips = torch.tensor([False, True, False])
    out = crop_and_resize(img, boxes, 8, flips)
    torch.testing.assert_close(out[0], img[0, :, 0:8, 0:8])
    torch.testing.assert_close(out[1], img[1, :, 3:11, 5:13].flip(-1))
    torch.testing.assert_close(out[2], img[2, :, 12:20, 16:24])


def test_box_twice_the_output_is_area_average():
    img = torch.rand(2, 1, 24, 24)
    boxes = torch.tensor([[0.0, 0, 16, 16], [2.0, 4, 18, 20]])
    out = crop_and_resize(img, boxes, 8)
    torch.testing.assert_close(out[0], F.avg_pool2d(img[0:1, :, :16, :16], 2)[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1], F.avg_pool2d(img[1:2, :, 4:20, 2:18], 2)[0], rtol=1e-5, atol=1e-6)


def test_multicrop_views_are_reproduced_from_recorded_boxes():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 28, 28, generator=g)
    views = MultiCrop(2, 3, global_size=16, local_size=8)(images, torch.Generator().manual_seed(1))
    assert views.global_crops.shape == (8, 3, 16, 16) and views.local_crops.shape == (12, 3, 8, 8)
    assert views.boxes.shape == (5, 4, 4) and views.flips.shape == (5, 4)
    for v in range(5):
        for b in range(4):
            size = 16 if v < 2 else 8
            crop = crop_and_resize(images[b : b + 1], views.boxes[v, b : b + 1], size)[0]
            if views.flips[v, b]:
                crop = crop.flip(-1)
            got = views.global_crops[v * 4 + b] if v < 2 else views.local_crops[(v - 2) * 4 + b]
            torch.testing.assert_close(got, crop)
    # Per-sample crops: no two samples share a box.
    assert len({tuple(bx.tolist()) for bx in views.boxes[0]}) == 4
    assert views.flips.any() and not views.flips.all()


def test_sample_boxes_respect_image_scale_and_ratio():
    boxes = sample_boxes(2000, 28, 32, (0.05, 0.4), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 32 + 1e-4).all() and (boxes[:, 3] <= 28 + 1e-4).all()
    area = w * h / (28 * 32)
    assert area.min() >= 0.05 - 1e-4 and area.max() <= 0.4 + 1e-4
    assert (w / h).min() >= 0.75 - 1e-4 and (w / h).max() <= 4 / 3 + 1e-4


def test_fallback_box_when_no_draw_fits():
    # A 4x40 image cannot hold a 0.9-area crop with ratio in [3/4, 4/3]: central crop, ratio clamped.
    boxes = sample_boxes(5, 4, 40, (0.9, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    torch.testing.assert_close(boxes[0], torch.tensor([17.3333, 0.0, 22.6667, 4.0]), rtol=1e-4, atol=1e-4)


def test_same_seed_same_views():
    images = torch.rand(2, 1, 20, 20)
    mc = MultiCrop(2, 2, 16, 8)
    a = mc(images, torch.Generator().manual_seed(5))
    b = mc(images, torch.Generator().manual_seed(5))
    assert torch.equal(a.global_crops, b.global_crops) and torch.equal(a.boxes, b.boxes)
