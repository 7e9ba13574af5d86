"""Augmentation: image and mask move together, ids survive, off-frame is ignored, seeds repeat."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segsearch.data.augment import _adjust_brightness, _adjust_contrast, build_augment
from segsearch.errors import UserError

IGNORE = 255
STEP = 0.2  # image channel 0 = class id × STEP: the image carries its own mask
NUM_CLASSES = 4
BAND = 2  # px either side of a class boundary where bilinear blending is allowed

GEOMETRIC = {
    "flip": {"flip": True},
    "jitter_px": {"jitter_px": 12},
    "scale": {"scale": 0.3},
    "elastic": {"elastic": True},
    "elastic_strong": {"elastic": {"sigma": 6.0, "grid": 5}},
}
ALL = {"flip": True, "jitter_px": 8, "scale": 0.25, "elastic": True, "color": 0.2}
CONFIGS = {**GEOMETRIC, "color": {"color": 0.3}, "all": ALL}


def blocky_batch(n: int = 6, size: tuple[int, int] = (64, 96), seed: int = 0):
    """Masks of 16×16 blocks of random ids (a few ignored); image channel 0 encodes the mask."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    blocks = torch.randint(0, NUM_CLASSES, (n, h // 16, w // 16), generator=g)
    blocks[torch.rand(blocks.shape, generator=g) < 0.05] = IGNORE
    mask = blocks.repeat_interleave(16, 1).repeat_interleave(16, 2)
    image = torch.rand(n, 3, h, w, generator=g)
    image[:, 0] = torch.where(mask == IGNORE, 0.9, mask.float() * STEP)
    return image, mask


def decode(image: torch.Tensor) -> torch.Tensor:
    return (image[:, 0] / STEP).round().long()


def interior(mask: torch.Tensor, radius: int = BAND) -> torch.Tensor:
    """Pixels whose (2r+1)² neighbourhood holds one class and no frame edge: bilinear is exact
    there (at the edge it blends in the zero padding)."""
    padded = F.pad(mask.float().unsqueeze(1), (radius,) * 4, value=-1.0)
    k = 2 * radius + 1
    same_max = F.max_pool2d(padded, k, stride=1).squeeze(1) == mask
    same_min = -F.max_pool2d(-padded, k, stride=1).squeeze(1) == mask
    return same_max & same_min & (mask != IGNORE)


def assert_aligned(image: torch.Tensor, mask: torch.Tensor) -> None:
    inner = interior(mask)
    assert inner.float().mean() > 0.3, "too few interior pixels to judge alignment"
    assert torch.equal(decode(image)[inner], mask[inner])


@pytest.mark.parametrize("name", [*GEOMETRIC, "all"])
def test_mask_stays_aligned_with_image(name: str) -> None:
    image, mask = blocky_batch()
    out_image, out_mask = build_augment(CONFIGS[name])(
        image, mask, generator=torch.Generator().manual_seed(1)
    )
    if name != "all":  # colour jitter changes the encoded values, geometry alone must not
        assert_aligned(out_image, out_mask)
    else:
        plain = {k: v for k, v in ALL.items() if k != "color"}
        ref_image, ref_mask = build_augment(plain)(
            image, mask, generator=torch.Generator().manual_seed(1)
        )
        assert torch.equal(out_mask, ref_mask)
        assert_aligned(ref_image, ref_mask)
    assert not torch.equal(out_mask, mask)


def test_alignment_check_catches_a_shift_just_wider_than_its_border_band() -> None:
    image, mask = blocky_batch()
    assert_aligned(image, mask)
    with pytest.raises(AssertionError):
        assert_aligned(image, torch.roll(mask, BAND + 1, dims=2))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_class_ids_are_preserved(name: str) -> None:
    image, mask = blocky_batch()
    out_image, out_mask = build_augment(CONFIGS[name])(
        image, mask, generator=torch.Generator().manual_seed(2)
    )
    assert out_image.shape == image.shape and out_image.dtype == image.dtype
    assert out_mask.shape == mask.shape and out_mask.dtype == torch.long
    assert set(out_mask.unique().tolist()) <= set(range(NUM_CLASSES)) | {IGNORE}


def test_inputs_are_not_modified() -> None:
    image, mask = blocky_batch()
    before = image.clone(), mask.clone()
    build_augment(ALL)(image, mask, generator=torch.Generator().manual_seed(0))
    assert torch.equal(image, before[0]) and torch.equal(mask, before[1])


def test_jitter_is_an_integer_shift_with_ignore_index_in_the_gap() -> None:
    image, mask = blocky_batch(n=8)
    mask[mask == IGNORE] = 0
    out_image, out_mask = build_augment({"jitter_px": 6}, ignore_index=99)(
        image, mask, generator=torch.Generator().manual_seed(3)
    )
    for i in range(len(mask)):
        gap = out_mask[i] == 99
        rows, cols = gap.all(1), gap.all(0)
        assert torch.equal(gap, rows[:, None] | cols[None, :]), "the gap is whole rows/columns"
        dy, dx = int(rows.sum()), int(cols.sum())
        assert dy <= 6 and dx <= 6
        dy = dy if rows[0] else -dy
        dx = dx if cols[0] else -dx
        shifted = torch.roll(mask[i], (dy, dx), dims=(0, 1))
        assert torch.equal(out_mask[i][~gap], shifted[~gap])
        assert torch.allclose(
            out_image[i][:, ~gap], torch.roll(image[i], (dy, dx), (1, 2))[:, ~gap], atol=1e-5
        )
        assert out_image[i][:, gap].abs().max() < 1e-5  # zero padding


@pytest.mark.parametrize("cfg", [{"scale": 0.4}, {"scale": 0.4, "elastic": {"sigma": 8.0}}])
def test_out_of_frame_is_ignore_index_and_zero_padding(cfg: dict) -> None:
    image, mask = blocky_batch(n=16)
    mask[mask == IGNORE] = 0
    out_image, out_mask = build_augment(cfg, ignore_index=7)(
        image, mask, generator=torch.Generator().manual_seed(4)
    )
    gap = out_mask == 7
    assert gap.float().mean() > 0.02
    # Off the frame the image is zero padding, but for the edge where bilinear still blends.
    noise = out_image[:, 1]  # uniform noise in 0..1, never exactly 0 in the frame
    assert torch.all(noise[gap & ~near(~gap, 3)] == 0)
    assert torch.all(noise[~near(gap, 1)] > 0)


def near(region: torch.Tensor, px: int) -> torch.Tensor:
    """Pixels within `px` (chessboard distance) of `region`."""
    grown = F.max_pool2d(region.float().unsqueeze(1), 2 * px + 1, stride=1, padding=px)
    return grown.squeeze(1) > 0


def test_flip_gives_one_of_the_four_flips_exactly_and_all_of_them_occur() -> None:
    image, mask = blocky_batch(n=1)
    image, mask = image.expand(32, -1, -1, -1), mask.expand(32, -1, -1)
    out_image, out_mask = build_augment({"flip": True})(
        image, mask, generator=torch.Generator().manual_seed(5)
    )
    flips = [[], [-1], [-2], [-2, -1]]
    seen = set()
    for i in range(32):
        match = [k for k, dims in enumerate(flips) if torch.equal(out_mask[i], mask[i].flip(dims))]
        assert len(match) == 1
        assert torch.allclose(out_image[i], image[i].flip(flips[match[0]]), atol=1e-5)
        seen.add(match[0])
    assert seen == {0, 1, 2, 3}


def test_color_touches_the_image_only() -> None:
    image, mask = blocky_batch()
    out_image, out_mask = build_augment({"color": 0.5})(
        image, mask, generator=torch.Generator().manual_seed(6)
    )
    assert out_mask is mask
    assert not torch.allclose(out_image, image)
    assert out_image.min() >= 0 and out_image.max() <= 1


def test_contrast_blends_towards_the_luma_mean_and_brightness_adds_within_0_1() -> None:
    rgb = torch.tensor([0.2, 0.6, 1.0]).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    luma = 0.299 * 0.2 + 0.587 * 0.6 + 0.114 * 1.0
    out = _adjust_contrast(rgb, torch.tensor([0.5, 1.5]))
    assert torch.allclose(out[0, :, 0, 0], 0.5 * torch.tensor([0.2, 0.6, 1.0]) + 0.5 * luma)
    assert torch.allclose(
        out[1, :, 0, 0], (1.5 * torch.tensor([0.2, 0.6, 1.0]) - 0.5 * luma).clamp(0, 1)
    )
    gray = torch.tensor([0.0, 0.4]).view(1, 1, 1, 2)
    assert torch.allclose(_adjust_contrast(gray, torch.tensor([0.0])), torch.full_like(gray, 0.2))
    shifted = _adjust_brightness(rgb, torch.tensor([0.1, -0.3]))
    assert torch.allclose(shifted[0, :, 0, 0], torch.tensor([0.3, 0.7, 1.0]))
    assert torch.allclose(shifted[1, :, 0, 0], torch.tensor([0.0, 0.3, 0.7]))


def test_same_seed_same_batch_other_seed_other_batch() -> None:
    image, mask = blocky_batch()
    aug = build_augment(ALL)
    first = aug(image, mask, generator=torch.Generator().manual_seed(7))
    again = aug(image, mask, generator=torch.Generator().manual_seed(7))
    other = aug(image, mask, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1])


def test_global_rng_is_used_without_a_generator() -> None:
    image, mask = blocky_batch()
    aug = build_augment(ALL)
    torch.manual_seed(9)
    first = aug(image, mask)
    torch.manual_seed(9)
    assert torch.equal(first[1], aug(image, mask)[1])


@pytest.mark.parametrize(
    "cfg",
    [{}, {"flip": False, "jitter_px": 0, "scale": 0.0, "elastic": False, "color": 0}],
    ids=["empty", "all-off"],
)
def test_empty_or_all_off_config_returns_the_inputs(cfg: dict) -> None:
    image, mask = blocky_batch()
    out_image, out_mask = build_augment(cfg)(image, mask)
    assert out_image is image and out_mask is mask


def test_grayscale_and_batch_of_one() -> None:
    image, mask = blocky_batch(n=1)
    gray = image[:, :1]
    out_image, out_mask = build_augment(ALL)(gray, mask, generator=torch.Generator())
    assert out_image.shape == gray.shape and out_mask.shape == mask.shape


def test_crop_is_an_exact_window_of_the_image_and_its_mask_at_random_places() -> None:
    image, mask = blocky_batch(n=16, size=(64, 96))
    out_image, out_mask = build_augment({"crop": [24, 40]})(
        image, mask, generator=torch.Generator().manual_seed(10)
    )
    assert out_image.shape == (16, 3, 24, 40) and out_mask.shape == (16, 24, 40)
    places = set()
    for i in range(16):
        # Channel 1 is noise: its top-left value says where the window can sit.
        corner = (image[i, 1, : 64 - 24 + 1, : 96 - 40 + 1] - out_image[i, 1, 0, 0]).abs()
        y, x = divmod(int(corner.argmin()), 96 - 40 + 1)
        assert torch.equal(out_mask[i], mask[i, y : y + 24, x : x + 40])
        assert torch.allclose(out_image[i], image[i, :, y : y + 24, x : x + 40], atol=1e-5)
        places.add((y, x))
    assert len(places) > 8, "the windows should sit at many places"


def test_crop_with_other_geometry_keeps_the_mask_aligned() -> None:
    image, mask = blocky_batch(n=8, size=(96, 96))
    out_image, out_mask = build_augment({**ALL, "color": 0.0, "crop": [48, 64]})(
        image, mask, generator=torch.Generator().manual_seed(11)
    )
    assert out_mask.shape == (8, 48, 64)
    assert_aligned(out_image, out_mask)


def test_a_crop_as_large_as_the_image_keeps_all_of_it() -> None:
    image, mask = blocky_batch(n=2, size=(32, 48))
    out_image, out_mask = build_augment({"crop": [32, 48]})(image, mask)
    assert torch.equal(out_mask, mask) and torch.allclose(out_image, image, atol=1e-5)


def test_a_crop_larger_than_the_image_names_both_sizes() -> None:
    image, mask = blocky_batch(n=2, size=(32, 48))
    with pytest.raises(UserError, match=r"aug.crop \[40, 40\] does not fit in a 32x48 image"):
        build_augment({"crop": [40, 40]})(image, mask)


def test_mismatched_shapes_are_refused() -> None:
    image, mask = blocky_batch()
    with pytest.raises(ValueError, match="mask"):
        build_augment(ALL)(image, mask[:, :-1])


def test_unknown_key_lists_the_valid_keys() -> None:
    with pytest.raises(UserError, match=r"rotate.*color.*crop.*elastic.*flip.*jitter_px.*scale"):
        build_augment({"rotate": 10})


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"flip": 1}, "aug.flip must be true or false"),
        ({"jitter_px": -1}, "aug.jitter_px must be an integer"),
        ({"jitter_px": 2.5}, "aug.jitter_px must be an integer"),
        ({"jitter_px": True}, "aug.jitter_px must be an integer"),
        ({"scale": 1.0}, r"aug.scale must be a number s in \[0, 1\)"),
        ({"scale": -0.1}, "aug.scale"),
        ({"scale": "0.1"}, "aug.scale"),
        ({"scale": float("nan")}, "aug.scale"),
        ({"elastic": "yes"}, "aug.elastic must be true, false or a mapping"),
        ({"elastic": {"alpha": 3}}, r"aug.elastic .*\['grid', 'sigma'\]"),
        ({"elastic": {"sigma": -1}}, "aug.elastic.sigma"),
        ({"elastic": {"grid": 1}}, "aug.elastic.grid must be an integer >= 2"),
        ({"color": 1.5}, r"aug.color must be a jitter strength in \[0, 1\]"),
        ({"crop": 32}, r"aug.crop must be \[height, width\]"),
        ({"crop": [32, 4]}, r"aug.crop must be .*, each an integer >= 8, got \[32, 4\]"),
        ({"crop": [32, 32, 3]}, r"aug.crop must be \[height, width\]"),
    ],
)
def test_bad_values_name_the_key_and_the_rule(cfg: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        build_augment(cfg)


def test_aug_must_be_a_mapping() -> None:
    with pytest.raises(UserError, match="aug must be a mapping"):
        build_augment(["flip"])  # type: ignore[arg-type]


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_cuda_with_a_cpu_generator_matches_cpu() -> None:
    image, mask = blocky_batch()
    aug = build_augment({"flip": True, "jitter_px": 8, "scale": 0.25})
    cpu = aug(image, mask, generator=torch.Generator().manual_seed(10))
    gpu = aug(image.cuda(), mask.cuda(), generator=torch.Generator().manual_seed(10))
    assert gpu[0].is_cuda and gpu[1].is_cuda
    assert torch.equal(gpu[1].cpu(), cpu[1])
    assert torch.allclose(gpu[0].cpu(), cpu[0], atol=1e-5)


@needs_cuda
def test_cuda_generator_is_deterministic_and_keeps_alignment() -> None:
    image, mask = blocky_batch()
    image, mask = image.cuda(), mask.cuda()
    aug = build_augment({k: v for k, v in ALL.items() if k != "color"})
    g = torch.Generator(device="cuda")
    first = aug(image, mask, generator=g.manual_seed(11))
    again = aug(image, mask, generator=g.manual_seed(11))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert_aligned(first[0].cpu(), first[1].cpu())
