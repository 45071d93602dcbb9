"""Photometric augmentation: none is identity, patch mode draws per patch, ops keep pixels in place."""

import pytest
import torch

from pwself.augment import PhotometricAugment, PhotometricConfig, from_patches, to_patches

OFF = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0, noise_p=0.0)


def test_patch_roundtrip_and_token_order():
    x = torch.arange(2 * 3 * 8 * 12, dtype=torch.float32).view(2, 3, 8, 12)
    p = to_patches(x, 4)
    assert p.shape == (2 * 2 * 3, 3, 4, 4)
    torch.testing.assert_close(p[4], x[0, :, 4:8, 4:8])  # token 4 of a 2x3 grid = row 1, col 1
    torch.testing.assert_close(from_patches(p, 2, 8, 12), x)


@pytest.mark.parametrize("channels", [1, 3])
def test_none_is_identity_and_all_off_is_identity(channels):
    x = torch.rand(3, channels, 8, 8)
    assert torch.equal(PhotometricAugment(PhotometricConfig(mode="none"), 4)(x), x)
    for mode in ("image", "patch"):
        y = PhotometricAugment(PhotometricConfig(mode=mode, **OFF), 4)(x, torch.Generator().manual_seed(0))
        torch.testing.assert_close(y, x)


def test_patch_mode_gives_each_patch_its_own_parameters():
    x = torch.full((2, 1, 16, 16), 0.5)
    cfg = PhotometricConfig(mode="patch", **{**OFF, "jitter_p": 1.0}, contrast=0.0)
    y = PhotometricAugment(cfg, 4)(x, torch.Generator().manual_seed(0))
    factors = to_patches(y, 4)[:, 0] / 0.5  # brightness only: each patch is uniformly scaled
    per_patch = factors.flatten(1)
    assert torch.allclose(per_patch.min(1).values, per_patch.max(1).values)  # uniform inside a patch
    assert len(torch.unique(per_patch[:, 0])) == 32  # 2 images x 16 patches, all different
    # Image mode: one factor per view.
    y_img = PhotometricAugment(PhotometricConfig(mode="image", **{**OFF, "jitter_p": 1.0}, contrast=0.0), 4)(
        x, torch.Generator().manual_seed(0))
    assert len(torch.unique(y_img[0])) == 1 and len(torch.unique(y_img[1])) == 1


def test_solarize_matches_formula_and_grayscale_rgb():
    x = torch.rand(4, 3, 8, 8)
    y = PhotometricAugment(PhotometricConfig(mode="image", **{**OFF, "solarize_p": 1.0}), 4)(x, torch.Generator())
    torch.testing.assert_close(y, torch.where(x >= 0.5, 1 - x, x))
    g = PhotometricAugment(PhotometricConfig(mode="image", **{**OFF, "grayscale_p": 1.0}), 4)(x, torch.Generator())
    assert torch.allclose(g[:, 0], g[:, 1]) and torch.allclose(g[:, 1], g[:, 2])


def test_all_ops_on_stay_in_range_and_differ_between_patches():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    cfg = PhotometricConfig(mode="patch", jitter_p=1.0, grayscale_p=0.5, blur_p=0.5, solarize_p=0.5, noise_p=0.5)
    y = PhotometricAugment(cfg, 4)(x, torch.Generator().manual_seed(1))
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1 and not torch.allclose(y, x)


def test_patch_mode_rejects_sizes_not_multiple_of_patch():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        PhotometricAugment(PhotometricConfig(mode="patch"), 4)(torch.rand(1, 1, 10, 10))


@pytest.mark.parametrize("mode", ["image", "patch"])
def test_blur_and_noise_fire_only_where_drawn_and_leave_input_untouched(mode):
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    before = x.clone()
    cfg = PhotometricConfig(mode=mode, **{**OFF, "blur_p": 0.5, "noise_p": 0.5})
    y = PhotometricAugment(cfg, 4)(x, torch.Generator().manual_seed(1))
    assert torch.equal(x, before)
    units = (to_patches(y, 4), to_patches(x, 4)) if mode == "patch" else (y, x)
    changed = (units[0] != units[1]).flatten(1).any(1)
    assert 0 < int(changed.sum()) < len(changed)  # some samples/patches untouched, some augmented


def _fixed(aug, n_samples, **params):
    """Make ``aug`` apply exactly ``params`` to every sample (nothing fires unless given)."""
    base = {"jitter": False, "brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0, "grayscale": False,
            "blur": False, "sigma": 0.5, "solarize": False, "noise": False, "noise_std": 0.0}
    base.update(params)
    aug.draw = lambda n, c, g: {k: torch.full((n,), v) for k, v in base.items()}
    return aug


def test_colour_jitter_is_torchvisions_brightness_contrast_saturation_hue():
    """DINO's ColorJitter order with fixed factors, against torchvision's functional ops (its grayscale weight
    for red is 0.2989, ours 0.299: a difference below 1e-3)."""
    import torchvision.transforms.v2.functional as TF

    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    aug = _fixed(PhotometricAugment(PhotometricConfig(mode="image"), 4), 3, jitter=True, brightness=1.3,
                 contrast=0.7, saturation=1.4, hue=0.08)
    want = TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x, 1.3), 0.7), 1.4), 0.08)
    torch.testing.assert_close(aug(x.clone()), want, rtol=0, atol=2e-3)
    for op, ref in (("brightness", TF.adjust_brightness), ("contrast", TF.adjust_contrast),
                    ("saturation", TF.adjust_saturation)):
        one = _fixed(PhotometricAugment(PhotometricConfig(mode="image"), 4), 3, jitter=True, **{op: 1.5})
        torch.testing.assert_close(one(x.clone()), ref(x, 1.5), rtol=0, atol=1e-3, msg=op)


def test_grayscale_is_torchvisions_luma_and_gray_input_keeps_its_contrast():
    import torchvision.transforms.v2.functional as TF

    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    aug = _fixed(PhotometricAugment(PhotometricConfig(mode="image"), 4), 2, grayscale=True)
    torch.testing.assert_close(aug(x.clone()), TF.rgb_to_grayscale(x, num_output_channels=3), rtol=0, atol=1e-3)
    g = x[:, :1]  # one channel: contrast about the image's own mean
    one = _fixed(PhotometricAugment(PhotometricConfig(mode="image"), 4), 2, jitter=True, contrast=0.5)
    torch.testing.assert_close(one(g.clone()), (g - g.mean((1, 2, 3), keepdim=True)) * 0.5
                               + g.mean((1, 2, 3), keepdim=True))


def test_blur_is_torchvisions_gaussian_blur():
    """Kernel side 2 * ceil(2 * max sigma) + 1 (capped by the view), reflect padding, the drawn sigma."""
    import torchvision.transforms.v2.functional as TF

    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    aug = _fixed(PhotometricAugment(PhotometricConfig(mode="image", blur_sigma=(0.1, 1.0)), 4), 2, blur=True,
                 sigma=0.7)
    torch.testing.assert_close(aug(x.clone()), TF.gaussian_blur(x, [5, 5], [0.7, 0.7]), rtol=0, atol=1e-5)


def test_noise_is_additive_gaussian_of_the_drawn_std():
    x = torch.full((4, 1, 64, 64), 0.5)
    aug = _fixed(PhotometricAugment(PhotometricConfig(mode="image"), 4), 4, noise=True, noise_std=0.05)
    d = aug(x.clone(), torch.Generator().manual_seed(3)) - 0.5
    assert abs(float(d.mean())) < 0.003 and float(d.std()) == pytest.approx(0.05, rel=0.03)
