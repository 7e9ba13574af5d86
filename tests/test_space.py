"""Search spaces: every shipped YAML samples cleanly; malformed ones fail naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from segsearch.config import TrialConfig
from segsearch.errors import UserError
from segsearch.space import (
    enqueued_points,
    flatten_sections,
    load_space,
    nest,
    parse_space,
    search_image_sizes,
)

SPACES = sorted(Path(__file__).resolve().parent.parent.joinpath("search_spaces").glob("*.yaml"))
optuna.logging.set_verbosity(optuna.logging.WARNING)


def sample(spec, n: int, seed: int = 0) -> list[dict]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    configs = []
    for _ in range(n):
        trial = study.ask()
        constants = spec.define_by_run(trial)
        configs.append(nest({**trial.params, **constants}))
        study.tell(trial, 0.0)
    return configs


def test_the_shipped_spaces_exist():
    assert {p.name for p in SPACES} >= {"demo.yaml", "unet_family.yaml", "full.yaml"}


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_every_shipped_space_samples_valid_trial_configs(path):
    spec = load_space(path)
    for config in sample(spec, 40):
        trial = TrialConfig.from_dict(config)
        assert "arch" in trial.model.model_fields_set
        assert trial.model.arch in {"fcn", "unet", "resunet", "densenet"}
        if trial.model.arch != "fcn":
            assert "fcn_skips" not in trial.model.model_fields_set
        if trial.model.arch != "densenet":
            assert "growth_rate" not in trial.model.model_fields_set


def test_when_makes_a_parameter_conditional():
    spec = parse_space(
        {
            "name": "t",
            "space": {
                "model.arch": {"choice": ["fcn", "unet"]},
                "model.fcn_skips": {"choice": ["8s", "16s"], "when": {"model.arch": "fcn"}},
            },
        }
    )
    configs = sample(spec, 30)
    assert {c["model"]["arch"] for c in configs} == {"fcn", "unet"}
    for config in configs:
        assert ("fcn_skips" in config["model"]) == (config["model"]["arch"] == "fcn")


def test_fixed_values_reach_every_trial_nested():
    spec = parse_space(
        {
            "name": "t",
            "fixed": {"batch_size": 4, "image_size": [32, 48], "optim": {"name": "sgd"}},
            "space": {"optim.lr": {"float": [0.001, 0.1], "log": True}},
        }
    )
    (config,) = sample(spec, 1)
    assert config["batch_size"] == 4 and config["image_size"] == [32, 48]
    assert config["optim"]["name"] == "sgd" and 0.001 <= config["optim"]["lr"] <= 0.1


def test_image_sizes_a_search_can_draw_are_known_when_chosen_from_a_list():
    chosen = parse_space({"name": "t", "space": {"image_size": {"choice": ["128x128", "256x192"]}}})
    assert search_image_sizes(chosen) == {(128, 128), (256, 192)}
    assert {TrialConfig.from_dict(c).image_size for c in sample(chosen, 20)} == {
        (128, 128),
        (256, 192),
    }
    with_native = parse_space({"name": "t", "space": {"image_size": {"choice": ["64x64", None]}}})
    assert search_image_sizes(with_native) == {(64, 64), None}
    fixed = parse_space({"name": "t", "fixed": {"image_size": [32, 48]}})
    assert search_image_sizes(fixed) == {(32, 48)}
    assert search_image_sizes(parse_space({"name": "t"})) == {None}


def test_int_step_and_log_are_honoured():
    spec = parse_space({"name": "t", "space": {"aug.jitter_px": {"int": [0, 32], "step": 8}}})
    values = {c["aug"]["jitter_px"] for c in sample(spec, 50)}
    assert values <= {0, 8, 16, 24, 32} and len(values) > 2


def test_nest_and_flatten_sections_are_inverse():
    flat = {"model.arch": "unet", "model.depth": 3, "batch_size": 8, "image_size": [8, 8]}
    assert flatten_sections(nest(flat)) == flat


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"model.depth": {"int": [6, 5]}}, "space.model.depth: int range low 6 > high 5"),
        ({"model.depth": {"int": [2.5, 5]}}, "space.model.depth: int range bounds must be ints"),
        ({"model.arch": {"choice": []}}, "space.model.arch: choice needs a non-empty list"),
        ({"model.arch": {"choice": [[1, 2]]}}, "space.model.arch: choice values must be"),
        ({"model.arch": {"choice": ["a"], "int": [1, 2]}}, "give exactly one of"),
        ({"model.arch": {"choice": ["a"], "log": True}}, "unknown field(s) ['log']"),
        ({"optim.lr": {"float": [0, 1], "log": True}}, "space.optim.lr: log scale needs low > 0"),
        ({"trainer.lr": {"float": [0.1, 1]}}, "space.trainer.lr: unknown parameter"),
        ({"model.arch": "unet"}, "space.model.arch: expected a mapping"),
        (
            {"model.fcn_skips": {"choice": ["8s"], "when": {"model.arch": "fcn"}}},
            "space.model.fcn_skips.when: model.arch must be defined above it",
        ),
    ],
)
def test_malformed_space_names_the_key_and_rule(space, message):
    with pytest.raises(UserError) as err:
        parse_space({"name": "bad", "space": space}, source="bad.yaml")
    assert message in str(err.value)
    assert str(err.value).startswith("bad.yaml: ")


@pytest.mark.parametrize(
    ("top", "message"),
    [
        ({"trials": 0}, "trials: Input should be greater than or equal to 1"),
        ({"mode": "up"}, "mode: Input should be 'max' or 'min'"),
        ({"scheduler": {"kind": "hyperband"}}, "scheduler.kind"),
        ({"resources": {"gpus": 1}}, "resources.gpus: Extra inputs are not permitted"),
        ({"resources": {"placement": "strict"}}, "resources.placement: Input should be 'pack'"),
        ({"fixed": {"learning_rate": 1}}, "fixed.learning_rate: unknown key"),
    ],
)
def test_malformed_top_level_names_the_field(top, message):
    with pytest.raises(UserError) as err:
        parse_space({"name": "bad", **top}, source="bad.yaml")
    assert message in str(err.value)


def test_placement_is_ray_trains_strategy_pack_by_default():
    assert parse_space({"name": "p"}).resources.placement_strategy == "PACK"
    spread = parse_space({"name": "p", "resources": {"workers": 2, "placement": "spread"}})
    assert spread.resources.placement_strategy == "SPREAD"


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nspace:\n  model.arch: {choice: [unet\n")
    with pytest.raises(UserError, match=r"broken.yaml: line \d+ not valid YAML"):
        load_space(path)


def test_cli_rejects_a_malformed_space_before_ray_starts(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "space": {"model.depth": {"int": [6, 5]}}}))
    proc = subprocess.run(
        [sys.executable, "-m", "segsearch", "search", str(path), "--dataset", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"error: {path}: space.model.depth: int range low 6 > high 5"]
    assert "ray" not in proc.stdout.lower()


def _enqueue_space(*entries) -> dict:
    return {
        "name": "q",
        "fixed": {"batch_size": 4},
        "space": {
            "model.arch": {"choice": ["fcn", "unet"]},
            "model.fcn_skips": {"choice": ["16s", "8s"], "when": {"model.arch": "fcn"}},
            "optim.lr": {"float": [1e-4, 1e-2], "log": True},
        },
        "enqueue": list(entries),
    }


def test_enqueued_configurations_are_fitted_to_the_space_and_may_be_partial():
    spec = parse_space(
        _enqueue_space(
            {"model": {"arch": "unet"}, "optim.lr": 1e-3, "batch_size": 4},
            {"model.fcn_skips": "8s"},  # arch left to the sampler: skips kept for when it is fcn
        )
    )
    assert enqueued_points(spec) == [
        {"model.arch": "unet", "optim.lr": 1e-3},
        {"model.fcn_skips": "8s"},
    ]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"model.width": 16}, r"enqueue\[1\]\.model\.width: not a parameter of this space"),
        ({"optim.lr": 0.5}, r"enqueue\[1\]\.optim\.lr: 0\.5 is outside this space"),
        ({"batch_size": 8}, r"enqueue\[1\]\.batch_size: 8, but the space fixes it to 4"),
        (
            {"model.arch": "unet", "model.fcn_skips": "8s"},
            r"enqueue\[1\]\.model\.fcn_skips: this configuration does not use it",
        ),
    ],
)
def test_an_enqueued_configuration_that_does_not_fit_names_the_entry(entry, message):
    with pytest.raises(UserError, match=rf"^<space>: {message}"):
        parse_space(_enqueue_space({"model.arch": "fcn"}, entry))


@pytest.mark.parametrize("name", ["full.yaml", "unet_family.yaml"])
def test_the_shipped_spaces_try_the_default_unet_first(name):
    """The configuration a user would train by hand (bench/search_quality.py's BASELINE, within
    the space's fixed settings) is the first trial, so a search is never blind to it."""
    spec = load_space(Path(__file__).resolve().parent.parent / "search_spaces" / name)
    first = enqueued_points(spec)[0]
    trial = TrialConfig.from_dict(nest({**flatten_sections(spec.fixed), **first}))
    chosen = {**flatten_sections(spec.fixed), **first}
    assert all(p.key in first for p in spec.params if p.active(chosen))  # nothing left to chance
    model = (trial.model.arch, trial.model.depth, trial.model.width, trial.model.upsample)
    assert model == ("unet", 4, 16, "transpose")
    assert (trial.loss.kind, trial.optim.name, trial.optim.lr) == ("ce", "adamw", 1e-3)
    assert trial.aug.flip and trial.model.dropout == 0.0


def test_an_enqueued_configuration_that_cannot_be_built_fails_before_ray_naming_its_entry(
    tmp_path,
):
    from segsearch.data.demo import DEMO_CLASSES, generate_demo_samples
    from segsearch.data.ingest import write_dataset
    from segsearch.data.shards import open_dataset
    from segsearch.search.tuner import check_trial_configs

    samples = [
        *generate_demo_samples(n=2, size=(16, 16), seed=0, split="train"),
        *generate_demo_samples(n=2, size=(16, 16), seed=0, split="val"),
    ]
    write_dataset(tmp_path / "data", samples, classes=DEMO_CLASSES)
    info = open_dataset(str(tmp_path / "data")).info
    space = {"name": "c", "space": {"model.width": {"int": [0, 64]}}}
    check_trial_configs(parse_space({**space, "enqueue": [{"model.width": 8}]}), info)
    with pytest.raises(UserError, match=r"^enqueue\[1\]: model\.width must be an integer from 1"):
        spec = parse_space({**space, "enqueue": [{"model.width": 8}, {"model.width": 0}]})
        check_trial_configs(spec, info)
