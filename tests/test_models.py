"""segsearch.models: every registered family x upsampling x output stride, config errors, export,
and a tiny U-Net that must learn a synthetic shape."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segsearch.errors import UserError
from segsearch.metrics import ConfusionMatrix
from segsearch.models import (
    ARCHS,
    UPSAMPLERS,
    ModelConfig,
    build_model,
    count_parameters,
)
from segsearch.models.upsample import TransposeUp

# Small enough that the whole grid runs in seconds; depth 4 so that output_stride 8 dilates.
SMALL = {"depth": 4, "width": 4, "growth_rate": 4, "layers_per_block": 2}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tensors this small gain nothing from threads, and on a shared 2-core machine two
    contending threads made the file ~5x slower in wall time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(**cfg: object) -> nn.Module:
    torch.manual_seed(0)
    return build_model({**SMALL, **cfg}, in_channels=3, num_classes=5)


def _params_without_gradient(model: nn.Module) -> list[str]:
    return [
        name
        for name, p in model.named_parameters()
        if p.grad is None or not bool(p.grad.abs().sum() > 0)
    ]


@pytest.mark.parametrize("output_stride", [None, 8])
@pytest.mark.parametrize("upsample", UPSAMPLERS.names())
@pytest.mark.parametrize("arch", ARCHS.names())
def test_every_family(arch: str, upsample: str, output_stride: int | None) -> None:
    model = _build(arch=arch, upsample=upsample, output_stride=output_stride)
    assert model.encoder.stride == (output_stride or 16)
    x = torch.randn(2, 3, 37, 50)

    logits = model(x)
    assert logits.shape == (2, 5, 37, 50)
    logits.square().mean().backward()
    # DDP runs with find_unused_parameters=False: every parameter must take part every forward.
    assert _params_without_gradient(model) == []
    assert 1_000 < count_parameters(model) < 500_000

    model.eval()
    with torch.no_grad():
        single = model(x[:1])
    assert single.shape == (1, 5, 37, 50)
    assert torch.isfinite(single).all()


@pytest.mark.parametrize("arch", ARCHS.names())
def test_group_norm_dropout_and_other_depths(arch: str) -> None:
    for depth in (2, 3, 5):
        model = _build(arch=arch, depth=depth, norm="group", dropout=0.2)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
        logits = model(torch.randn(2, 3, 21, 34))
        assert logits.shape == (2, 5, 21, 34)
        logits.mean().backward()
        assert _params_without_gradient(model) == []


@pytest.mark.parametrize("skips", ["32s", "16s", "8s"])
def test_fcn_fuses_more_levels_with_finer_skips(skips: str) -> None:
    model = _build(arch="fcn", fcn_skips=skips)
    assert model.decoder.levels == {"32s": [4], "16s": [4, 3], "8s": [4, 3, 2]}[skips]
    assert model(torch.randn(1, 3, 19, 23)).shape == (1, 5, 19, 23)


@pytest.mark.parametrize("arch", ARCHS.names())
def test_output_stride_dilates_the_last_levels(arch: str) -> None:
    model = _build(arch=arch, output_stride=4)
    assert model.encoder.dilation_rates == (1, 1, 1, 2, 4)
    features, _ = model.encoder(torch.randn(1, 3, 32, 48))
    assert [f.shape[-2:] for f in features] == [(32, 48), (16, 24), (8, 12), (8, 12), (8, 12)]
    for level, rate in [(2, 1), (3, 2), (4, 4)]:
        stage = model.encoder.stages[level]
        convs = [m for m in stage.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
        assert convs and all(m.dilation == (rate, rate) for m in convs)


def test_output_stride_at_or_above_the_depth_changes_nothing() -> None:
    plain = _build(arch="unet", depth=3)
    capped = _build(arch="unet", depth=3, output_stride=16)
    assert capped.encoder.stride == plain.encoder.stride == 8
    assert count_parameters(capped) == count_parameters(plain)
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(capped.eval()(x), plain.eval()(x))


def test_unpool_keeps_indices_only_where_it_pools() -> None:
    model = _build(arch="unet", upsample="unpool", output_stride=8)
    _, indices = model.encoder(torch.randn(1, 3, 32, 32))
    assert [i is not None for i in indices] == [False, True, True, True, False]
    _, indices = _build(arch="unet", upsample="bilinear").encoder(torch.randn(1, 3, 32, 32))
    assert all(i is None for i in indices)


def test_transposed_convs_have_kernels_a_multiple_of_their_stride() -> None:
    for arch in ARCHS.names():
        model = _build(arch=arch, upsample="transpose", depth=5)
        for m in model.modules():
            if isinstance(m, nn.ConvTranspose2d):
                assert m.kernel_size[0] % m.stride[0] == 0 and m.kernel_size[0] > m.stride[0]


def test_width_preserving_transpose_starts_as_bilinear_interpolation() -> None:
    up = TransposeUp(2, 2, pools=[(3, 2), (2, 2), (1, 2)])  # factor 8
    x = torch.randn(1, 2, 6, 5)
    expected = F.interpolate(x, scale_factor=8, mode="bilinear", align_corners=False)
    with torch.no_grad():
        got = up(x, [])
    # Away from the border (where the transposed conv sees zeros) they agree exactly.
    torch.testing.assert_close(got[..., 8:-8, 8:-8], expected[..., 8:-8, 8:-8])


def test_defaults_match_the_contract() -> None:
    assert ModelConfig().model_dump() == {
        "arch": "unet",
        "depth": 4,
        "width": 32,
        "fcn_skips": "8s",
        "growth_rate": 12,
        "layers_per_block": 4,
        "output_stride": None,
        "upsample": "transpose",
        "norm": "batch",
        "dropout": 0.0,
    }


def test_keys_of_other_archs_are_accepted_and_ignored() -> None:
    with_extra = _build(arch="unet", fcn_skips="32s", growth_rate=20, layers_per_block=7)
    assert count_parameters(with_extra) == count_parameters(_build(arch="unet"))


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"arch": "segnet"}, r"unknown model.arch 'segnet'; choose from \['densenet', 'fcn'"),
        ({"depht": 3}, r"unknown model key\(s\) \['depht'\]; valid keys: \['arch', 'depth'"),
        ({"depth": 6}, r"model.depth must be an integer from 2 to 5, got 6"),
        ({"depth": "4"}, r"model.depth must be an integer from 2 to 5, got '4'"),
        ({"depth": True}, r"model.depth must be an integer"),
        ({"width": 0}, r"model.width must be an integer from 1 to 1024, got 0"),
        ({"growth_rate": 2.5}, r"model.growth_rate must be an integer"),
        ({"layers_per_block": 0}, r"model.layers_per_block must be an integer from 1 to 32"),
        ({"fcn_skips": "4s"}, r"unknown model.fcn_skips '4s'; choose from \['32s', '16s', '8s'\]"),
        ({"output_stride": 12}, r"unknown model.output_stride 12; choose from \[None, 4, 8, 16"),
        ({"output_stride": 8.0}, r"unknown model.output_stride 8.0"),
        ({"upsample": "up"}, r"unknown model.upsample 'up'; choose from \['bilinear', 'transp"),
        ({"norm": "layer"}, r"unknown model.norm 'layer'; choose from \['batch', 'group'\]"),
        ({"dropout": 1.0}, r"model.dropout must be a number in \[0, 1\), got 1.0"),
        ({"dropout": "0.1"}, r"model.dropout must be a number in \[0, 1\)"),
    ],
)
def test_invalid_config_is_a_user_error_naming_the_choices(cfg: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        build_model(cfg, in_channels=3, num_classes=2)


def test_invalid_channels_or_classes_are_user_errors() -> None:
    with pytest.raises(UserError, match="in_channels must be a positive integer, got 0"):
        build_model({}, in_channels=0, num_classes=2)
    with pytest.raises(UserError, match="num_classes must be a positive integer"):
        build_model({}, in_channels=3, num_classes=None)  # type: ignore[arg-type]
    with pytest.raises(UserError, match="model must be a mapping, got list"):
        build_model(["unet"], in_channels=3, num_classes=2)  # type: ignore[arg-type]


def test_exports_with_dynamic_height_and_width() -> None:
    """MLflow logs pt2 (torch.export) models; padding to the stride must stay symbolic.

    The program then serves any H, W above the stride (8 here), multiples of it included."""
    model = _build(arch="unet", upsample="unpool", output_stride=8, depth=4).eval()
    auto = torch.export.Dim.AUTO
    program = torch.export.export(
        model, (torch.randn(2, 3, 37, 50),), dynamic_shapes=({0: auto, 2: auto, 3: auto},)
    )
    for height, width in [(61, 29), (64, 64), (17, 100), (9, 9)]:
        x = torch.randn(1, 3, height, width)
        torch.testing.assert_close(program.module()(x), model(x))


def _shapes(n: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy images with a disc (class 1) and a square (class 2) at random places."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        cy, cx, sy, sx = torch.randint(6, size - 6, (4,), generator=generator).tolist()
        masks[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= 25] = 1
        masks[i][((yy - sy).abs() <= 4) & ((xx - sx).abs() <= 4)] = 2
    images = masks[:, None].float() + 0.3 * torch.randn(n, 1, size, size, generator=generator)
    return images, masks


def test_tiny_unet_overfits_four_images() -> None:
    generator = torch.Generator().manual_seed(0)
    images, masks = _shapes(4, 32, generator)
    torch.manual_seed(0)
    model = build_model({"arch": "unet", "depth": 2, "width": 8}, in_channels=1, num_classes=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(80):
        optimizer.zero_grad()
        F.cross_entropy(model(images), masks).backward()
        optimizer.step()
    matrix = ConfusionMatrix(3)
    with torch.no_grad():
        matrix.update(model.eval()(images).argmax(1), masks)
    miou = matrix.compute()["miou"]
    assert not math.isnan(miou) and miou > 0.9
