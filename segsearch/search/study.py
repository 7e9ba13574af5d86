"""The search's Optuna study in a database, so optuna-dashboard and the `optuna` CLI show it live.

Tune's OptunaSearch keeps its study in memory unless it is given a storage; here it always gets an
RDB storage (SQLite beside the MLflow store by default, any SQLAlchemy URL by choice) and a study
named after the search. Tune pickles its searcher twice: into tuner.pkl when the Tuner is built and
into searcher-state files every few seconds. The storage URL may hold a password, so `StudySearch`
pickles without it and, unpickled by `Tuner.restore`, reopens the study from the URL this process
registered for the search (`registered`), the way tracking's callbacks find their tracker.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import urllib.parse
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ray.tune.search.optuna import OptunaSearch

from segsearch.errors import UserError, first_line
from segsearch.mlflow_uri import without_password
from segsearch.space import SearchSpec
from segsearch.values import is_number

#: Environment variable read when --optuna-storage is not given.
STORAGE_ENV = "SEGSEARCH_OPTUNA_STORAGE"
#: The default SQLite file's name, beside the MLflow store or in the search storage.
STUDY_FILE = "optuna.db"
#: Where the default study file goes when neither MLflow nor Tune keeps files locally.
HOME_FOLDER = Path("~/.segsearch")
#: System attribute set on a study trial found RUNNING on resume that Tune did not know.
LOST_REASON = "lost with the driver before Tune saved its state"

_URLS: dict[str, str] = {}


def resolve_study_storage(value: str | None, *, tracking_uri: str, storage: str) -> str:
    """The study's SQLAlchemy URL: --optuna-storage, else $SEGSEARCH_OPTUNA_STORAGE, else SQLite.

    The SQLite default lies beside a local MLflow store (sqlite:/// file or file store), else in
    a local search storage, else in ~/.segsearch (a driver on a cluster: pass a shared database
    to keep the study with the search).
    """
    value = value or os.environ.get(STORAGE_ENV)
    if value:
        return value
    folder = _local_store_folder(tracking_uri)
    if folder is None:
        folder = Path(storage) if "://" not in storage else HOME_FOLDER.expanduser()
    return f"sqlite:///{folder.resolve() / STUDY_FILE}"


def _local_store_folder(tracking_uri: str) -> Path | None:
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri[len("sqlite:///") :].split("?")[0]).parent
    if tracking_uri.startswith("file://"):
        return Path(tracking_uri[len("file://") :]).parent
    if "://" not in tracking_uri:
        return Path(tracking_uri).parent
    return None


def open_storage(url: str) -> Any:
    """An RDBStorage at `url` (a SQLite file's folder is made); UserError naming the masked URL."""
    import optuna

    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :].split("?")[0]).parent.mkdir(parents=True, exist_ok=True)
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as err:
        reason = first_line(err)
        password = urllib.parse.urlsplit(url).password
        if password:
            reason = reason.replace(password, "***")
        raise UserError(
            f"Optuna storage {without_password(url)}: cannot open ({reason}); "
            "pass another --optuna-storage"
        ) from None


def load_study(name: str, url: str, *, sampler: Any = None) -> Any:
    """The study `name` at `url` (UserError when it is not there)."""
    import optuna

    try:
        return optuna.load_study(
            study_name=name,
            storage=open_storage(url),
            sampler=sampler,
            pruner=optuna.pruners.NopPruner(),
        )
    except KeyError:
        raise UserError(
            f"no Optuna study named {name!r} in {without_password(url)}; pass the "
            "--optuna-storage the search was started with"
        ) from None


def check_new_study(name: str, url: str) -> None:
    """UserError when a new search would add its trials to an earlier study of the same name."""
    storage = open_storage(url)
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return
    trials = len(storage.get_all_trials(study_id, deepcopy=False))
    if trials:
        raise UserError(
            f"an Optuna study named {name!r} with {trials} trial(s) is already in "
            f"{without_password(url)}; choose another --name, or delete it with `optuna "
            f"delete-study --study-name {name} --storage URL`"
        )


@contextlib.contextmanager
def registered(name: str, url: str) -> Iterator[None]:
    """While the search `name` runs, its restored searchers reopen their study at `url`."""
    _URLS[name] = url
    try:
        yield
    finally:
        _URLS.pop(name, None)


def sampler_for(spec: SearchSpec) -> Any:
    """Random search, or multivariate TPE over grouped (conditional) parameters that treats
    trials in flight as already scored (constant liar), so parallel trials spread out."""
    import optuna

    if spec.sampler.kind == "random":
        return optuna.samplers.RandomSampler(seed=spec.sampler.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=spec.sampler.seed,
            n_startup_trials=spec.sampler.startup_for(spec.trials),
            multivariate=True,
            group=True,
            constant_liar=True,
        )


class StudySearch(OptunaSearch):
    """OptunaSearch on a persistent study: every epoch's metric is an intermediate value, a trial
    that ASHA stopped before its last epoch is PRUNED, and pickles hold no storage URL."""

    def __init__(
        self,
        *,
        spec: SearchSpec,
        url: str,
        points_to_evaluate: list[dict[str, Any]] | None = None,
    ) -> None:
        self._url = url
        self._shown_url = without_password(url)
        self._epochs = spec.epochs
        self._reported: dict[str, int] = {}
        super().__init__(
            space=spec.define_by_run,
            metric=spec.metric,
            mode=spec.mode,
            sampler=sampler_for(spec),
            study_name=spec.name,
            storage=open_storage(url),
            points_to_evaluate=points_to_evaluate,
        )

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Report the epoch's metric once (a resumed trial repeats its last result)."""
        import optuna

        step, value = _epoch(result), result.get(self.metric)
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        if not is_number(value) or step <= self._reported.get(trial_id, 0):
            return
        try:
            self._ot_trials[trial_id].report(float(value), step)
        except optuna.exceptions.UpdateFinishedTrialError:
            return
        self._reported[trial_id] = step

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        """Tune withholds the result on which ASHA stops a trial: report it, then tell PRUNED."""
        import optuna

        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        if result and not error:
            self.on_trial_result(trial_id, result)
        if not result or error or _epoch(result) >= self._epochs:
            super().on_trial_complete(trial_id, result=result, error=error)
            return
        state = optuna.trial.TrialState.PRUNED
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            self._ot_study.tell(self._ot_trials[trial_id], state=state)
        self._completed_trials.add(trial_id)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_url", "_storage", "_ot_study"):
            state.pop(key, None)
        state["_ot_trials"] = {tid: trial._trial_id for tid, trial in self._ot_trials.items()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        import optuna

        trial_ids = state.pop("_ot_trials")
        self.__dict__.update(state)
        url = _URLS.get(self._study_name)
        if url is None:
            raise UserError(
                f"the Optuna storage of search {self._study_name!r} ({self._shown_url}) is not "
                "open in this process"
            )
        self._url = url
        self._ot_study = load_study(self._study_name, url, sampler=self._sampler)
        self._storage = self._ot_study._storage
        self._ot_trials = {
            tid: optuna.Trial(self._ot_study, number) for tid, number in trial_ids.items()
        }

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.__getstate__(), file)

    def restore(self, checkpoint_path: str) -> None:
        """Continue the saved searcher; a study trial left RUNNING that it does not know (asked
        after Tune last saved, then lost with the driver) is marked FAIL."""
        import optuna

        with open(checkpoint_path, "rb") as file:
            self.__setstate__(pickle.load(file))
        known = {trial._trial_id for trial in self._ot_trials.values()}
        running = optuna.trial.TrialState.RUNNING
        for trial in self._ot_study.get_trials(deepcopy=False, states=(running,)):
            if trial._trial_id not in known:
                self._storage.set_trial_system_attr(trial._trial_id, "fail_reason", LOST_REASON)
                self._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)


def _epoch(result: dict) -> int:
    """The epoch a result is about (`epoch` from training, else Tune's iteration)."""
    epoch = result.get("epoch")
    if not is_number(epoch) or math.isnan(epoch):
        epoch = result.get("training_iteration") or 0
    return int(epoch)
