"""Search spaces in YAML → a validated `SearchSpec` and an Optuna define-by-run function."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from segsearch.errors import UserError
from segsearch.values import is_number

Scalar = str | int | float | bool | None
SECTIONS = ("model", "loss", "optim", "aug")
TOP_LEVEL_KEYS = ("batch_size", "image_size", "seed")
#: Configurations of the earlier search a warm start tries first, unless `top_k` says.
DEFAULT_WARM_TOP_K = 3
#: What a trial reports that an objective may name (besides `val_iou_<class>`): its scores, and
#: the costs measured after it trains (segsearch.search.cost; num_params always).
OBJECTIVE_METRICS = (
    "val_miou",
    "val_dice",
    "val_pixel_acc",
    "train_loss",
    "latency_ms",
    "num_params",
    "peak_memory_mb",
)
CLASS_IOU_PREFIX = "val_iou_"
#: The objectives that need the model's forward pass timed after training.
MEASURED_COSTS = ("latency_ms", "peak_memory_mb")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SchedulerSpec(_Strict):
    kind: Literal["asha", "none"] = "asha"
    grace_period: int | None = Field(default=None, ge=1)
    reduction_factor: float = Field(default=3, gt=1)

    def grace_for(self, epochs: int) -> int:
        """ASHA's first rung: as given, else a third of the epochs and never before epoch 2, so
        trials are compared after the first epochs in which every model predicts background."""
        grace = self.grace_period or max(2, math.ceil(epochs / 3))
        return min(grace, epochs)


class SamplerSpec(_Strict):
    kind: Literal["tpe", "random", "nsga2"] = "tpe"
    seed: int | None = 0
    startup_trials: int | None = Field(default=None, ge=1)

    def startup_for(self, trials: int) -> int:
        """Random trials before TPE models the results: as given, else a third of the trials
        between 2 and Optuna's own 10 (with 10, a search of 10 trials or fewer is random)."""
        return self.startup_trials or min(10, max(2, trials // 3))


class WarmStartSpec(_Strict):
    """Start with the best `top_k` configurations of an earlier search that fit this space."""

    search: str = Field(min_length=1)
    top_k: int = Field(default=DEFAULT_WARM_TOP_K, ge=1)


class ResourcesSpec(_Strict):
    """One trial's Train workers. `placement` is Ray Train's placement strategy for them, both
    best-effort: `pack` fills as few nodes as possible (fast collectives), `spread` puts each
    worker on a different node where there are enough (one lost node costs fewer workers); a
    trial whose nodes are gone restarts on whatever nodes are left."""

    workers: int = Field(default=1, ge=1)
    gpus_per_worker: float = Field(default=0, ge=0)
    cpus_per_worker: float = Field(default=1, gt=0)
    placement: Literal["pack", "spread"] = "pack"

    @property
    def placement_strategy(self) -> str:
        """The strategy as Ray names it (PACK, SPREAD)."""
        return self.placement.upper()


class RefitSpec(_Strict):
    """Train the search's best configurations again at full fidelity, after the search.

    `on: train+val` trains on both splits: the refit then has no held-out val score, and its
    model is the last epoch's. `from: checkpoint` starts each refit from its trial's best-epoch
    weights (with a fresh optimizer and lr schedule over the refit's epochs: a warm restart),
    so the search's training of the winner is kept; `from: scratch` trains it anew.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    epochs: int = Field(ge=1)
    top_k: int = Field(default=1, ge=1)
    on: Literal["train", "train+val"] = "train"
    start: Literal["checkpoint", "scratch"] = Field(default="checkpoint", alias="from")


#: Seconds per unit of a `wall` budget's duration: `45s`, `90m`, `6h`.
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}
BUDGET_KINDS = ("gpu_hours", "cpu_hours", "wall")


def parse_duration(value: Any) -> float:
    """`45s`, `90m`, `6h` (or a number of seconds) as seconds; ValueError naming the forms."""
    text = str(value).strip()
    number, unit = (text[:-1], text[-1]) if text[-1:] in DURATION_UNITS else (text, "s")
    try:
        seconds = float(number) * DURATION_UNITS[unit]
    except ValueError:
        seconds = math.nan
    if isinstance(value, bool) or not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{value!r} is not a positive duration; give e.g. 45s, 90m or 6h")
    return seconds


class BudgetSpec(_Strict):
    """What the search may spend: GPU-hours or CPU-hours held by its trials, or wall time."""

    gpu_hours: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    cpu_hours: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    wall: float | None = None  # seconds

    @field_validator("wall", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        if value is None:
            return None
        try:
            return parse_duration(value)
        except ValueError as err:
            raise PydanticCustomError("duration", str(err)) from None

    @model_validator(mode="after")
    def _exactly_one(self) -> BudgetSpec:
        given = [kind for kind in BUDGET_KINDS if getattr(self, kind) is not None]
        if len(given) != 1:
            raise PydanticCustomError(
                "budget", f"give exactly one of {', '.join(BUDGET_KINDS)} (got {given or 'none'})"
            )
        return self

    @property
    def kind(self) -> str:
        return next(kind for kind in BUDGET_KINDS if getattr(self, kind) is not None)

    @property
    def limit_s(self) -> float:
        """The budget in seconds: GPU-, CPU- or wall-seconds."""
        value = getattr(self, self.kind)
        return value if self.kind == "wall" else value * 3600

    def describe(self) -> str:
        value = getattr(self, self.kind)
        shown = _duration_text(value) if self.kind == "wall" else f"{value:g}"
        return f"{self.kind}={shown}"


def _duration_text(seconds: float) -> str:
    for unit in ("h", "m"):
        count = seconds / DURATION_UNITS[unit]
        if count >= 1 and count.is_integer():
            return f"{count:g}{unit}"
    return f"{seconds:g}s"


class SearchSpec(_Strict):
    """A whole search-space file; `space` holds the parameters as `Param`s in file order.

    `objectives` (metric → max|min, two or more, in order) makes the search multi-objective: its
    first objective is the search's `metric`/`mode` (ASHA, the best epoch, refit and the best
    trial go by it), and a space that gives `metric` or `mode` as well must give the same.
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    metric: str = "val_miou"
    mode: Literal["max", "min"] = "max"
    objectives: dict[str, Literal["max", "min"]] | None = None
    trials: int = Field(default=8, ge=1)
    max_concurrent: int | None = Field(default=None, ge=1)
    epochs: int = Field(default=10, ge=1)
    scheduler: SchedulerSpec = SchedulerSpec()
    sampler: SamplerSpec = SamplerSpec()
    warm_start: WarmStartSpec | None = None
    resources: ResourcesSpec = ResourcesSpec()
    refit: RefitSpec | None = None
    budget: BudgetSpec | None = None
    #: Configurations tried first (`enqueued_points`): e.g. the one a user would train by hand.
    enqueue: list[dict[str, Any]] = Field(default_factory=list)
    fixed: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, Any] = Field(default_factory=dict)

    @field_validator("warm_start", mode="before")
    @classmethod
    def _warm_start_by_name(cls, value: Any) -> Any:
        return {"search": value} if isinstance(value, str) else value

    @property
    def multi_objective(self) -> bool:
        return bool(self.objectives)

    @property
    def objective_names(self) -> list[str]:
        """The objectives in order; a single-objective search's one is its metric."""
        return list(self.objectives) if self.objectives else [self.metric]

    @property
    def objective_modes(self) -> list[str]:
        return list(self.objectives.values()) if self.objectives else [self.mode]

    @property
    def measures_cost(self) -> bool:
        """Whether trials time their model after training (an objective needs it)."""
        return any(name in MEASURED_COSTS for name in self.objective_names)

    @property
    def params(self) -> list[Param]:
        return [parse_param(key, value) for key, value in self.space.items()]

    def define_by_run(self, trial: Any) -> dict[str, Any]:
        """Optuna define-by-run: suggest each parameter whose `when` holds; return the constants."""
        chosen: dict[str, Any] = flatten_sections(self.fixed)
        for param in self.params:
            if param.active(chosen):
                chosen[param.key] = param.suggest(trial)
        return flatten_sections(self.fixed)

    def with_overrides(self, **overrides: Any) -> SearchSpec:
        """A copy with CLI overrides (trials, epochs, name, warm_start) applied where given."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if isinstance(given.get("warm_start"), str):
            top_k = self.warm_start.top_k if self.warm_start else DEFAULT_WARM_TOP_K
            given["warm_start"] = WarmStartSpec(search=given["warm_start"], top_k=top_k)
        return self.model_copy(update=given)


@dataclass(frozen=True)
class Param:
    """One search dimension: `key` in dotted form, a distribution, and an optional condition."""

    key: str
    kind: Literal["choice", "int", "float"]
    choices: tuple[Scalar, ...] = ()
    low: float = 0
    high: float = 0
    step: float | None = None
    log: bool = False
    when: tuple[tuple[str, tuple[Scalar, ...]], ...] = ()

    def active(self, chosen: Mapping[str, Any]) -> bool:
        return all(key in chosen and chosen[key] in values for key, values in self.when)

    def suggest(self, trial: Any) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(
                self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def contains(self, value: Any) -> bool:
        """Whether Optuna could suggest `value` here (a choice of the same type, or inside the
        range and on its step)."""
        from optuna.distributions import FloatDistribution, IntDistribution

        if self.kind == "choice":
            return any(type(value) is type(c) and value == c for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.kind == "int":
            if not float(value).is_integer():
                return False
            dist: Any = IntDistribution(
                int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        else:
            dist = FloatDistribution(self.low, self.high, step=self.step, log=self.log)
        return dist._contains(dist.to_internal_repr(value))


def enqueued_points(spec: SearchSpec) -> list[dict[str, Any]]:
    """The space's `enqueue:` configurations as the parameters Optuna is told to try first; a
    parameter an entry leaves out is sampled. UserError naming the entry when one does not fit:
    an unknown key, a value outside the space, a fixed key with another value, or a parameter
    whose `when` the entry rules out."""
    return [_fit_entry(spec, entry, f"enqueue[{i}]") for i, entry in enumerate(spec.enqueue)]


def _fit_entry(spec: SearchSpec, entry: Mapping[str, Any], where: str) -> dict[str, Any]:
    given = flatten_sections(entry)
    fixed = flatten_sections(spec.fixed)
    params = {param.key: param for param in spec.params}
    for key, value in given.items():
        if key in fixed and fixed[key] != value:
            raise UserError(f"{where}.{key}: {value!r}, but the space fixes it to {fixed[key]!r}")
        if key not in fixed and key not in params:
            raise UserError(f"{where}.{key}: not a parameter of this space")
    chosen: dict[str, Any] = dict(fixed)
    point: dict[str, Any] = {}
    for param in spec.params:
        decided = all(key in chosen for key, _ in param.when)
        if decided and not param.active(chosen):
            if param.key in given:
                raise UserError(f"{where}.{param.key}: this configuration does not use it (when)")
            continue
        if param.key not in given:
            continue
        if not param.contains(given[param.key]):
            raise UserError(f"{where}.{param.key}: {given[param.key]!r} is outside this space")
        chosen[param.key] = point[param.key] = given[param.key]
    return point


def parse_refit(text: str) -> RefitSpec:
    """`--refit EPOCHS[:TOP_K[:ON]]` (e.g. `30`, `30:2`, `30:1:train+val`) as a RefitSpec."""
    parts = text.split(":")
    rule = "give EPOCHS[:TOP_K[:train|train+val]], e.g. 30:2:train+val"
    if len(parts) > 3 or not all(p.strip() for p in parts):
        raise UserError(f"--refit {text!r}: {rule}")
    fields: dict[str, Any] = {"on": parts[2].strip()} if len(parts) == 3 else {}
    for name, part in zip(("epochs", "top_k"), parts[:2], strict=False):
        if not part.strip().isdigit():
            raise UserError(f"--refit {text!r}: {name} must be a whole number; {rule}")
        fields[name] = int(part)
    try:
        return RefitSpec.model_validate(fields)
    except ValidationError as err:
        first = err.errors()[0]
        raise UserError(f"--refit {text!r}: {first['loc'][0]}: {first['msg']}") from None


def parse_budget(text: str) -> BudgetSpec:
    """`--budget KIND=AMOUNT` (`gpu_hours=40`, `cpu_hours=0.5`, `wall=90m`) as a BudgetSpec."""
    kind, sep, amount = text.partition("=")
    kind = kind.strip()
    if not sep or kind not in BUDGET_KINDS or not amount.strip():
        raise UserError(
            f"--budget {text!r}: give KIND=AMOUNT with KIND one of {', '.join(BUDGET_KINDS)}, "
            "e.g. gpu_hours=40 or wall=6h"
        )
    try:
        return BudgetSpec.model_validate({kind: amount.strip()})
    except ValidationError as err:
        raise UserError(f"--budget {text!r}: {err.errors()[0]['msg']}") from None


def check_budget(spec: SearchSpec) -> None:
    """UserError when the budget counts a device the trials do not hold (GPU-hours, no GPU)."""
    if spec.budget is not None and spec.budget.gpu_hours and not spec.resources.gpus_per_worker:
        raise UserError(
            "budget.gpu_hours: the trials hold no GPU (resources.gpus_per_worker is 0); "
            "budget cpu_hours or wall instead"
        )


def parse_param(key: str, spec: Any) -> Param:
    """Validate one `space:` entry; every error names `space.<key>` and the rule broken."""
    where = f"space.{key}"
    section = key.split(".", 1)[0]
    known = section in SECTIONS if "." in key else key in TOP_LEVEL_KEYS
    if not known:
        raise UserError(
            f"{where}: unknown parameter; use <section>.<name> with a section from "
            f"{list(SECTIONS)}, or one of {list(TOP_LEVEL_KEYS)}"
        )
    if not isinstance(spec, Mapping):
        raise UserError(f"{where}: expected a mapping like {{choice: [...]}}, got {spec!r}")
    kinds = [k for k in ("choice", "int", "float") if k in spec]
    if len(kinds) != 1:
        raise UserError(f"{where}: give exactly one of choice, int, float (got {sorted(spec)})")
    kind = kinds[0]
    allowed = {kind, "when"} | ({"step", "log"} if kind != "choice" else set())
    extra = sorted(set(spec) - allowed)
    if extra:
        raise UserError(f"{where}: unknown field(s) {extra}; allowed here: {sorted(allowed)}")
    when = _parse_when(where, spec.get("when"))
    if kind == "choice":
        return Param(key, "choice", choices=_parse_choices(where, spec["choice"]), when=when)
    low, high = _parse_range(where, kind, spec[kind])
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise UserError(f"{where}: log must be true or false, got {log!r}")
    if log and low <= 0:
        raise UserError(f"{where}: log scale needs low > 0, got {low}")
    step = spec.get("step")
    if step is not None:
        if not is_number(step) or step <= 0:
            raise UserError(f"{where}: step must be a positive number, got {step!r}")
        if kind == "int" and not float(step).is_integer():
            raise UserError(f"{where}: int step must be a whole number, got {step}")
        if log:
            raise UserError(f"{where}: step and log cannot be combined")
    return Param(key, kind, low=low, high=high, step=step, log=log, when=when)


def _parse_choices(where: str, choices: Any) -> tuple[Scalar, ...]:
    if not isinstance(choices, list) or not choices:
        raise UserError(f"{where}: choice needs a non-empty list, got {choices!r}")
    for value in choices:
        if not isinstance(value, str | int | float | bool) and value is not None:
            raise UserError(
                f"{where}: choice values must be strings, numbers, booleans or null, got {value!r}"
            )
    if len({repr(v) for v in choices}) != len(choices):
        raise UserError(f"{where}: choice lists a value twice: {choices}")
    return tuple(choices)


def _parse_range(where: str, kind: str, bounds: Any) -> tuple[float, float]:
    if not isinstance(bounds, list) or len(bounds) != 2:
        raise UserError(f"{where}: {kind} range must be [low, high], got {bounds!r}")
    for value in bounds:
        if not is_number(value) or (kind == "int" and not float(value).is_integer()):
            raise UserError(f"{where}: {kind} range bounds must be {kind}s, got {value!r}")
        if not math.isfinite(value):
            raise UserError(f"{where}: {kind} range bounds must be finite, got {value!r}")
    low, high = bounds
    if low > high:
        raise UserError(f"{where}: {kind} range low {low} > high {high}")
    return float(low), float(high)


def _parse_when(where: str, when: Any) -> tuple[tuple[str, tuple[Scalar, ...]], ...]:
    if when is None:
        return ()
    if not isinstance(when, Mapping) or not when:
        raise UserError(f"{where}.when: expected a mapping like {{model.arch: fcn}}, got {when!r}")
    parsed = []
    for key, value in when.items():
        values = tuple(value) if isinstance(value, list) else (value,)
        parsed.append((str(key), values))
    return tuple(parsed)


def search_image_sizes(spec: SearchSpec) -> set[tuple[int, int] | None]:
    """Every image_size a trial of `spec` can train at: the fixed one, or each a `choice`
    lists ("HEIGHTxWIDTH"); None stands for each image's own size."""
    from segsearch.config import check_image_size

    drawn = next((param for param in spec.params if param.key == "image_size"), None)
    if drawn is None:
        return {check_image_size(spec.fixed.get("image_size"))}
    return {check_image_size(choice) for choice in drawn.choices}


def flatten_sections(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"arch": "unet"}} → {"model.arch": "unet"}, Optuna's parameter names: only the
    trial config's sections are flattened (the inverse of `nest`); dotted keys pass through."""
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and key in SECTIONS:
            flat.update(flatten_sections(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"model.arch": "unet", "batch_size": 8} → {"model": {"arch": "unet"}, "batch_size": 8}."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def packaged_space(filename: str) -> Path:
    """A space shipped with segsearch: in an installed package its `search_spaces/` folder (the
    wheel copies the repository's there), in a source checkout the repository's `search_spaces/`."""
    package = Path(__file__).resolve().parent
    folders = (package / "search_spaces", package.parent / "search_spaces")
    for folder in folders:
        if (folder / filename).is_file():
            return folder / filename
    raise UserError(f"{filename}: not found in {folders[0]}; pass a space file explicitly")


class _SpaceLoader(yaml.SafeLoader):
    """YAML's safe loader, with every mapping key read as the text written: YAML 1.1 reads a bare
    `on` (refit's `on: train`) as the boolean True, and keys in a space are names."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key_node.tag = "tag:yaml.org,2002:str"
        return super().construct_mapping(node, deep=deep)


def load_space(path: str | Path) -> SearchSpec:
    """Read and validate a search-space YAML file; errors name the file and the key."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_SpaceLoader)
    except FileNotFoundError:
        raise UserError(f"{path}: search-space file not found") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{where} not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(raw, Mapping):
        raise UserError(f"{path}: expected a mapping at the top level")
    return parse_space(raw, source=str(path))


def parse_space(raw: Mapping[str, Any], *, source: str = "<space>") -> SearchSpec:
    """Validate a search space given as a mapping (the parsed YAML)."""
    try:
        spec = SearchSpec.model_validate(dict(raw))
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise UserError(f"{source}: {field}: {first['msg']}") from None
    try:
        _check_params(spec)
        spec = _with_objectives(spec)
        check_budget(spec)
        enqueued_points(spec)
    except UserError as err:
        raise UserError(f"{source}: {err}") from None
    return spec


def _with_objectives(spec: SearchSpec) -> SearchSpec:
    """Check `objectives` and make its first one the search's metric and mode."""
    if spec.objectives is None:
        return spec
    if len(spec.objectives) < 2:
        raise UserError(
            f"objectives: give two or more (got {list(spec.objectives)}); "
            "for one, use metric and mode"
        )
    for name in spec.objectives:
        if name not in OBJECTIVE_METRICS and not name.startswith(CLASS_IOU_PREFIX):
            raise UserError(
                f"objectives.{name}: unknown metric; use one of {list(OBJECTIVE_METRICS)} "
                f"or {CLASS_IOU_PREFIX}<class>"
            )
    first, direction = next(iter(spec.objectives.items()))
    given = spec.model_fields_set
    for field, value, wanted in (("metric", spec.metric, first), ("mode", spec.mode, direction)):
        if field in given and value != wanted:
            raise UserError(
                f"{field}: {value!r} differs from the first objective ({first}: {direction}); "
                f"drop {field} or make it {wanted!r}"
            )
    return spec.model_copy(update={"metric": first, "mode": direction})


def _check_params(spec: SearchSpec) -> None:
    defined = set(flatten_sections(spec.fixed))
    for key in defined:
        section = key.split(".", 1)[0]
        if key not in TOP_LEVEL_KEYS and section not in SECTIONS:
            raise UserError(
                f"fixed.{key}: unknown key; use a section from {list(SECTIONS)} "
                f"or one of {list(TOP_LEVEL_KEYS)}"
            )
    for param in spec.params:
        if param.key in defined:
            raise UserError(f"space.{param.key}: defined twice (also in fixed or earlier)")
        for key, _ in param.when:
            if key not in defined:
                raise UserError(
                    f"space.{param.key}.when: {key} must be defined above it or in fixed"
                )
        defined.add(param.key)
