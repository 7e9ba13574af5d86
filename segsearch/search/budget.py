"""A search's compute budget (the space's `budget:` or `--budget`), in Ray Tune's terms.

A trial's cost is the device-seconds it holds: its CPUs (`trial_cpus`) or GPUs (workers ×
gpus_per_worker) × the seconds from Tune's start of the trial to its latest result, by the
driver's clock (`time_held_s`; Tune's own `time_total_s` leaves out the trial's start-up and
checkpointing, a few times its training on tiny data). One `Ledger` keeps every trial's cost;
three Tune parts share it:

- `BudgetSearch` wraps the searcher: it suggests no new trial once the next one would exceed the
  budget. A trial's cost is estimated as the most any finished trial cost; before any finished,
  as the full-epochs cost of the running ones (their cost per epoch × epochs); before any epoch
  was reported, nothing is known and trials start (the hard limit still holds). While running
  trials, counted at their estimate, leave no room it waits (they may stop early and cost less).
- `BudgetStopper` stops every running trial (`stop_all`) at the hard limit, the budget itself;
  a running trial's cost grows with the time since its last result.
- `TrialCosts` times each trial, puts `time_held_s`, `cost_cpu_s` and `cost_gpu_s` on each
  result (so the trial's MLflow run and its history in Tune hold them) and records it in the
  ledger.

A `wall` budget counts the search's own wall time (across `--resume`) instead of device-seconds,
and a trial's estimate is its wall time. The refit is not counted: it trains a known number of
epochs the user asked for after the search, and its cost is reported beside the search's.

A budget given on `--resume` replaces the search's own if it is of the same kind
(`resumed_budget`); `BudgetGenerator` then lets a search its old budget stopped start trials
again.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ray.tune import Callback
from ray.tune.search import ConcurrencyLimiter, Searcher, SearchGenerator
from ray.tune.stopper import Stopper

from segsearch.errors import UserError
from segsearch.search.capacity import trial_cpus
from segsearch.space import BudgetSpec, ResourcesSpec
from segsearch.values import is_number

COST_METRICS = ("cost_cpu_s", "cost_gpu_s")
#: The result key of the seconds a trial has held its resources.
HELD_KEY = "time_held_s"
#: What one unit of each budget is called in the output.
UNITS = {"gpu_hours": "GPU", "cpu_hours": "CPU", "wall": "wall"}


def held(resources: ResourcesSpec) -> tuple[float, float]:
    """(CPUs, GPUs) one trial holds while it runs: as capacity.py places it."""
    return trial_cpus(resources), resources.workers * resources.gpus_per_worker


def trial_cost(resources: ResourcesSpec, seconds: float) -> dict[str, float]:
    """A trial's `cost_cpu_s` and `cost_gpu_s` after `seconds` in Tune."""
    cpus, gpus = held(resources)
    return {"cost_cpu_s": cpus * seconds, "cost_gpu_s": gpus * seconds}


def held_seconds(result: Mapping[str, Any]) -> float:
    """The seconds a result says its trial has held its resources (0 when it does not say)."""
    value = result.get(HELD_KEY)
    return float(value) if is_number(value) and value == value else 0.0


def row_cost(row: Mapping[str, Any], resources: ResourcesSpec) -> dict[str, float]:
    """A trial row's cost, at its latest reported epoch."""
    seconds = max((held_seconds(epoch) for epoch in row.get("history", ())), default=0.0)
    return trial_cost(resources, seconds)


def with_costs(rows: Sequence[dict[str, Any]], resources: ResourcesSpec) -> list[dict[str, Any]]:
    """The rows, each with its `cost_cpu_s` and `cost_gpu_s`."""
    return [{**row, **row_cost(row, resources)} for row in rows]


def total_cost(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    return {key: sum(float(row.get(key, 0.0)) for row in rows) for key in COST_METRICS}


#: The ledger of each search running in this process, by name (a restored Tuner brings its own).
_LEDGERS: dict[str, Ledger] = {}


def ledger_of(search: str) -> Ledger | None:
    """The ledger of the search `search` in this process: the one its Tuner uses."""
    return _LEDGERS.get(search)


def forget_ledger(search: str) -> None:
    """Drop the search's ledger: a Tuner restored after this brings its own, if it had one."""
    _LEDGERS.pop(search, None)


class Ledger:
    """What every trial has cost so far, in the budget's seconds; shared by the Tune parts."""

    def __init__(
        self, search: str, budget: BudgetSpec, resources: ResourcesSpec, *, epochs: int
    ) -> None:
        self.search = search
        self.budget = budget
        self.limit_s = budget.limit_s
        cpus, gpus = held(resources)
        self.rate = {"gpu_hours": gpus, "cpu_hours": cpus, "wall": 1.0}[budget.kind]
        self.epochs = epochs
        self.costs: dict[str, float] = {}
        self.epoch_costs: dict[str, float] = {}
        self.live: set[str] = set()
        self.finished: set[str] = set()
        self.stopped = False
        self.wall_before_s = 0.0
        self._started = time.monotonic()
        self._seen: dict[str, float] = {}
        _LEDGERS[search] = self

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickled with a restored Tuner (after `forget_ledger`): the search's ledger from now
        on. A copy unpickled later (Tune's experiment state holds the stopper) is not."""
        self.__dict__.update(state)
        self._started = time.monotonic()
        self._seen = {}
        _LEDGERS.setdefault(self.search, self)

    def apply(self, budget: BudgetSpec) -> None:
        """Count against `budget` from now on: a resumed search's own, of this ledger's kind."""
        self.budget = budget
        self.limit_s = budget.limit_s

    def record(self, trial_id: str, seconds: float, epoch: int) -> None:
        """A trial's result: it has held its resources `seconds` by the end of `epoch`."""
        cost = self.rate * seconds
        self.costs[trial_id] = cost
        if epoch >= 1:
            self.epoch_costs[trial_id] = cost / epoch
        self._seen[trial_id] = time.monotonic()

    def started(self, trial_id: str) -> None:
        self.live.add(trial_id)

    def ended(self, trial_id: str) -> None:
        self.live.discard(trial_id)
        if trial_id in self.costs:
            self.finished.add(trial_id)

    def wall_s(self) -> float:
        return self.wall_before_s + time.monotonic() - self._started

    def spent_s(self) -> float:
        """Spent so far: the search's wall time, or every trial's cost, a running trial's grown
        by the time since its last result."""
        if self.budget.kind == "wall":
            return self.wall_s()
        now = time.monotonic()
        growing = sum(self.rate * (now - self._seen[t]) for t in self.live if t in self._seen)
        return sum(self.costs.values()) + growing

    def estimate_s(self) -> float:
        """What one more trial is expected to cost (see the module's docstring)."""
        done = [self.costs[t] for t in self.finished]
        if done:
            return max(done)
        return max(self.epoch_costs.values(), default=0.0) * self.epochs

    def may_start(self) -> bool | None:
        """True: one more trial fits; None: not while the running ones may still cost their
        estimate; False: never again (spending only grows)."""
        estimate = self.estimate_s()
        if self.spent_s() + estimate > self.limit_s:
            return False
        if self.budget.kind == "wall":
            return True
        running = sum(max(self.costs.get(t, 0.0), estimate) for t in self.live)
        finished = sum(self.costs[t] for t in self.costs if t not in self.live)
        return True if finished + running + estimate <= self.limit_s else None

    def state(self) -> dict[str, Any]:
        fields = ("costs", "epoch_costs", "live", "finished", "stopped")
        return {**{f: getattr(self, f) for f in fields}, "wall_before_s": self.wall_s()}

    def load(self, state: Mapping[str, Any]) -> None:
        """Restore in place: the stopper holds this same object."""
        for key, value in state.items():
            setattr(self, key, value)
        self._started = time.monotonic()
        self._seen = {}


class BudgetSearch(Searcher):
    """Wraps the search's searcher: no new trial once the next would exceed the budget.

    A wrapper in Tune's sense (it has `searcher`): Tune saves its `get_state` beside the wrapped
    searcher's own checkpoint, so a resumed search knows what was spent.
    """

    def __init__(self, searcher: Searcher, ledger: Ledger) -> None:
        super().__init__(metric=searcher.metric, mode=searcher.mode)
        self.searcher = searcher
        self.ledger = ledger
        self.latest: dict[str, dict] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.latest = {}  # each running trial's latest result, this process only

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec):
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        decision = self.ledger.may_start()
        if decision is False:
            self.ledger.stopped = True
            return Searcher.FINISHED
        if decision is None:
            return None
        suggestion = self.searcher.suggest(trial_id)
        if suggestion not in (None, Searcher.FINISHED):
            self.ledger.started(trial_id)
        return suggestion

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.latest[trial_id] = result
        self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        self.latest.pop(trial_id, None)
        self.ledger.ended(trial_id)
        self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def add_evaluated_point(self, *args: Any, **kwargs: Any) -> None:
        self.searcher.add_evaluated_point(*args, **kwargs)

    def get_state(self) -> dict[str, Any]:
        return self.ledger.state()

    def set_state(self, state: dict[str, Any]) -> None:
        self.ledger.load(state)

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)


class BudgetGenerator(SearchGenerator):
    """Tune's generator of a budgeted search, which a resumed search with room left reopens.

    Tune saves whether its generator has finished, and a restored one that has suggests no
    trial: without this a search its budget stopped would stay stopped under a larger budget.
    """

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        ledger = ledger_in(self.searcher)
        stopped = self._finished and ledger is not None and ledger.stopped
        if stopped and ledger.may_start() is not False:
            self._finished = ledger.stopped = False

    def set_finished(self) -> None:
        """Tune calls this as it stops every unfinished trial at once (the budget's hard limit),
        and tells the searcher of none of them: tell it here, with each one's latest result, so
        the study, the concurrency limit and the ledger see them end (a search resumed under a
        larger budget starts trials again only then)."""
        super().set_finished()
        search = _budget_search(self.searcher)
        for trial_id in list(search.ledger.live if search else ()):
            self.searcher.on_trial_complete(trial_id, result=search.latest.get(trial_id))


def budgeted(searcher: Searcher, ledger: Ledger, *, concurrency: int) -> BudgetGenerator:
    """A budgeted search's algorithm, limited to `concurrency` trials at once as Tune would
    (its `max_concurrent_trials` limits only a Searcher it wraps itself)."""
    limited = ConcurrencyLimiter(BudgetSearch(searcher, ledger), max_concurrent=concurrency)
    return BudgetGenerator(limited)


def ledger_in(search_alg: Any) -> Ledger | None:
    """The ledger of the BudgetSearch in a search algorithm's wrappers (None: no budget)."""
    search = _budget_search(search_alg)
    return search.ledger if search is not None else None


def _budget_search(search_alg: Any) -> BudgetSearch | None:
    while search_alg is not None and not isinstance(search_alg, BudgetSearch):
        search_alg = getattr(search_alg, "searcher", None)
    return search_alg


def resumed_budget(
    search: str, started: BudgetSpec | None, given: BudgetSpec | None
) -> BudgetSpec | None:
    """The budget a resumed search runs under: the one given (space or --budget) if it is of
    the kind of the search's own (`started`: what was spent is counted in that kind), else its
    own."""
    if given is None:
        return started
    if started is None:
        raise UserError(
            f"budget {given.describe()}: search {search!r} has no budget and resumes without "
            "one; start a new search (another --name) to search within a budget"
        )
    if given.kind != started.kind:
        raise UserError(
            f"budget {given.describe()}: search {search!r} has budget {started.describe()} and "
            f"resumes with a budget of that kind only; give --budget {started.kind}=AMOUNT"
        )
    return given


class BudgetStopper(Stopper):
    """Stops every trial at the hard limit (the budget itself)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Tune's experiment state holds the stopper too, with its own copy of the ledger, and a
        resumed search's controller takes that one: it must count what the searcher counts."""
        self.__dict__.update(state)
        self.ledger = ledger_of(self.ledger.search) or self.ledger

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return False

    def stop_all(self) -> bool:
        if self.ledger.spent_s() < self.ledger.limit_s:
            return False
        self.ledger.stopped = True
        return True


class TrialCosts(Callback):
    """Times each trial and puts its cost so far on each result, before the tracker and Tune's
    loggers read it (a callback may change a result in place; this one goes first).

    A trial started again (a retry, `--resume`) counts on from its last result's time.
    """

    def __init__(self, resources: ResourcesSpec, ledger: Ledger | None = None) -> None:
        self.resources = resources
        self.ledger = ledger
        self._started: dict[str, tuple[float, float]] = {}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        before = held_seconds(trial.last_result or {})
        self._started[trial.trial_id] = (time.monotonic(), before)

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        started, before = self._started.setdefault(trial.trial_id, (time.monotonic(), 0.0))
        seconds = before + time.monotonic() - started
        result[HELD_KEY] = seconds
        result.update(trial_cost(self.resources, seconds))
        if self.ledger is not None:
            epoch = result.get("epoch", result.get("training_iteration"))
            self.ledger.record(trial.trial_id, seconds, int(epoch) if is_number(epoch) else 0)


@dataclass(frozen=True)
class BudgetReport:
    """How a search went against its budget, for its output and parent run."""

    budget: BudgetSpec
    spent_s: float
    trials_ran: int
    trials_requested: int
    stopped: bool

    def describe(self) -> str:
        unit, limit = UNITS[self.budget.kind], self.budget.limit_s
        spent = f"{self.spent_s:.0f} of {limit:.0f} {unit}-s ({self.budget.describe()})"
        if self.stopped:
            return f"budget spent: {self.trials_ran} of {self.trials_requested} trials ran; {spent}"
        return f"budget: {spent}; all {self.trials_ran} trials ran"

    def metrics(self) -> dict[str, float]:
        return {
            "budget_limit_s": self.budget.limit_s,
            "budget_spent_s": self.spent_s,
            "budget_trials_ran": self.trials_ran,
            "budget_trials_requested": self.trials_requested,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget.describe(),
            "spent_s": self.spent_s,
            "limit_s": self.budget.limit_s,
            "trials_ran": self.trials_ran,
            "trials_requested": self.trials_requested,
            "stopped": self.stopped,
        }


def budget_report(
    ledger: Ledger, rows: Sequence[Mapping[str, Any]], *, requested: int
) -> BudgetReport:
    """The report after the search: spent is the trials' cost (or the wall time), by the rows."""
    kind = ledger.budget.kind
    if kind == "wall":
        spent = ledger.wall_s()
    else:
        key = "cost_gpu_s" if kind == "gpu_hours" else "cost_cpu_s"
        spent = sum(float(row.get(key, 0.0)) for row in rows)
    return BudgetReport(ledger.budget, spent, len(rows), requested, ledger.stopped)
