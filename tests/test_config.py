"""TrialConfig: every section typed and validated once, errors one line naming key and rule."""

from __future__ import annotations

import json
import pickle

import pytest
from pydantic import ValidationError

from segsearch.config import TrialConfig
from segsearch.errors import UserError
from segsearch.losses import LOSSES

FULL = {
    "model": {"arch": "fcn", "depth": 3, "fcn_skips": "16s", "output_stride": 8},
    "loss": {"kind": "border_ce", "w0": 5, "foreground_classes": [1, 2]},
    "optim": {"name": "sgd", "lr": 0.01, "schedule": "poly"},
    "aug": {"flip": True, "elastic": {"sigma": 4.0}},
    "batch_size": 4,
    "image_size": [32, 48],
    "epochs": 3,
    "seed": 7,
}


@pytest.mark.parametrize("text", ["32x48", "32X48", " 32 x 48 "])
def test_a_size_may_be_written_as_height_x_width(text: str) -> None:
    trial = TrialConfig.from_dict({"image_size": text, "aug": {"crop": text}})
    assert trial.image_size == (32, 48) and trial.aug.crop == (32, 48)
    assert trial.to_dict()["image_size"] == [32, 48]


def test_to_dict_is_json_and_rebuilds_the_same_config() -> None:
    trial = TrialConfig.from_dict(FULL)
    data = json.loads(json.dumps(trial.to_dict()))
    assert TrialConfig.from_dict(data) == trial
    assert data["image_size"] == [32, 48] and data["loss"]["kind"] == "border_ce"
    assert data["model"]["width"] == 32  # defaults are recorded too
    assert pickle.loads(pickle.dumps(trial)) == trial  # how Ray carries it to a worker


def test_an_empty_section_means_its_defaults() -> None:
    assert TrialConfig.from_dict({"aug": None, "loss": {}}) == TrialConfig()


def test_sections_are_frozen() -> None:
    trial = TrialConfig.from_dict(FULL)
    with pytest.raises(ValidationError):
        trial.model.depth = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (
            {"image_size": [4, 8]},
            'image_size must be [height, width] or "HEIGHTxWIDTH", each an integer >= 8, '
            "got [4, 8]",
        ),
        ({"image_size": [8.5, 9]}, "image_size must be [height, width] or"),
        ({"image_size": 64}, "each an integer >= 8, got 64"),
        ({"image_size": ["a", 9]}, "image_size must be [height, width] or"),
        ({"image_size": "64 by 64"}, "each an integer >= 8, got '64 by 64'"),
        ({"image_size": "4x8"}, "each an integer >= 8, got '4x8'"),
        ({"image_size": [8, 8, 8]}, "image_size must be [height, width]"),
        ({"batch_size": True}, "batch_size must be an integer >= 1, got True"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"epochs": 2.5}, "epochs must be an integer >= 1, got 2.5"),
        ({"epochs": 0}, "epochs must be an integer >= 1, got 0"),
        ({"seed": -1}, "seed must be an integer >= 0, got -1"),
        ({"optim": {"lr": "1e-3"}}, "optim.lr must be a number > 0, got '1e-3'"),
        ({"optim": {"lr": True}}, "optim.lr must be a number > 0, got True"),
        ({"optim": {"momentum": -0.1}}, "optim.momentum must be a number >= 0, got -0.1"),
        ({"optim": {"name": "adam"}}, "unknown optim.name 'adam'; choose from ['adamw', 'sgd']"),
        ({"optim": {"beta": 1}}, "unknown optim key(s) ['beta']; valid keys: ['lr', 'momentum'"),
        ({"trainer": {}}, "unknown trial config key(s) ['trainer']; valid keys: ['aug', "),
        ({"model": {"depth": 7}}, "model.depth must be an integer from 2 to 5, got 7"),
        ({"model": {"arch": "x"}}, "unknown model.arch 'x'; choose from ['densenet', 'fcn'"),
        ({"model": {"output_stride": True}}, "unknown model.output_stride True; choose from"),
        ({"loss": {"kind": "dice", "foo": 1}}, "unknown loss key(s) ['foo'] for kind dice"),
        ({"loss": {"kind": "focal"}}, "unknown loss kind 'focal'; choose from ['border_ce'"),
        ({"loss": {"kind": "border_ce", "foreground_classes": [1, "a"]}}, "got [1, 'a']"),
        ({"loss": []}, "loss must be a mapping, got list"),
        ({"aug": {"elastic": {"grid": 1.5}}}, "aug.elastic.grid must be an integer >= 2"),
        (
            {"image_size": [64, 64], "aug": {"crop": [32, 96]}},
            "aug.crop [32, 96] does not fit in image_size [64, 64]",
        ),
        ({"aug": {"scale": float("inf")}}, "aug.scale must be a number s in [0, 1)"),
    ],
)
def test_bad_values_are_one_line_naming_key_and_rule(cfg: dict, message: str) -> None:
    with pytest.raises(UserError) as error:
        TrialConfig.from_dict(cfg)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("kind", LOSSES.names())
def test_each_loss_kind_takes_exactly_its_own_options(kind: str) -> None:
    own = set(LOSSES.get(kind).model_fields) - {"kind"}
    others = {name for k in LOSSES.names() for name in LOSSES.get(k).model_fields} - own
    defaults = LOSSES.get(kind)().model_dump()
    assert TrialConfig.from_dict({"loss": defaults}).loss.kind == kind
    for option in sorted(others - {"kind"}):
        with pytest.raises(UserError, match=rf"unknown loss key\(s\) \['{option}'\] for kind"):
            TrialConfig.from_dict({"loss": {"kind": kind, option: 1}})
