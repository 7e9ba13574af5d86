"""A search in MLflow: one experiment per search name, a parent run, a nested child run per trial.

Trial events come from the Tune driver (a Tune callback), which only queues the MLflow calls: the
writer's one background thread runs them (see _writer.py), so a store has one writer and training
never waits on MLflow. Runs are found again by tags (`segsearch.search` on the parent,
`segsearch.trial_id` on each child), so a resumed search continues its runs instead of making new
ones.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric
from PIL import Image
from ray.tune import Callback

from segsearch.checkpoint import CONFUSION_FILE, MODEL_FILE, OVERLAYS_FILE
from segsearch.errors import UserError
from segsearch.mlflow_uri import check_tracking_server, resolve_tracking_uri
from segsearch.search.system_metrics import PREFIX as SYSTEM_PREFIX
from segsearch.tracking import _files, _pictures, _runs
from segsearch.tracking._callback import TrackingCallback, register, unregister
from segsearch.tracking._clean import clean, mask, plain_data, safe_key
from segsearch.tracking._outcome import (
    ERROR,
    TrialOutcome,
    best_of,
    end_status,
    epoch_of,
    error_text,
    outcome_of,
)
from segsearch.tracking._refit import SEARCH_SCORE_PREFIX, RefitPhase
from segsearch.tracking._writer import Writer, masked_first_line
from segsearch.tracking.tags import (
    BEST_MODEL_URI,
    BEST_RUN_ID,
    BEST_TRIAL_ID,
    DATASET_FINGERPRINT,
    EPOCHS_RUN,
    METRIC,
    MODEL_CHECKPOINT,
    MODEL_URI,
    REASON,
    REFIT_MODEL_URI,
    REFIT_RUN_ID,
    STATUS,
    TEST_MODEL,
)
from segsearch.tracking.tags import ERROR as ERROR_TAG
from segsearch.values import is_number

#: Metrics logged per epoch (CONTRACTS.md, plus lr and startup_s, which train.py also reports).
EPOCH_METRICS = (
    "epoch",
    "train_loss",
    "val_miou",
    "val_dice",
    "val_pixel_acc",
    "epoch_time_s",
    "images_per_s",
    "num_params",
    "lr",
    "startup_s",
)
CLASS_IOU_PREFIX = "val_iou_"
#: Checkpoint pictures also logged with `log_image(key=..., step=epoch)`: file → image key.
STEPPED_PICTURES = {OVERLAYS_FILE: "overlays", CONFUSION_FILE: "confusion"}
#: Unlogged items named in the closing warning line (all of them are in the returned summary).
SHOWN_UNLOGGED = 8
#: `segsearch.status` of a search, or a trial, stopped by Ctrl-C.
INTERRUPTED = "interrupted"
#: Status tag of a trial run whose trial the restored search does not have.
LOST = "lost"
LOST_REASON = "lost with the driver before its state was saved; not resumed"
#: How long `finish` waits in all for queued MLflow calls (the best model among them) before it
#: lists them as not logged. Only a store that answers, slowly, takes that long: while it is down
#: or hangs, `finish` stops waiting after one more try (CALL_TIMEOUT_S + HEALTH_TIMEOUT_S).
FINISH_WAIT_S = 300.0
#: How long a search that was interrupted or failed waits for MLflow to take its last calls:
#: the user is waiting at a prompt, and what does not make it is listed, its files kept.
ABORT_WAIT_S = 30.0


@dataclass(frozen=True)
class TrackingSummary:
    """Where the search went in MLflow, and what could not be logged (empty when all was)."""

    experiment_id: str
    parent_run_id: str
    best_trial_id: str | None
    best_run_id: str | None
    model_uri: str | None
    unlogged: tuple[str, ...]
    refit_run_id: str | None = None
    refit_model_uri: str | None = None


def _log(line: str) -> None:
    """Tracking notes and warnings as segsearch log records (shown by the CLI, -q hides notes)."""
    from segsearch.console import echo

    echo(line)


class SearchTracker:
    """Logs one search to MLflow. Build it with `SearchTracker.start` before the first trial."""

    def __init__(
        self,
        writer: Writer,
        *,
        search_name: str,
        experiment_id: str,
        parent_run_id: str,
        children: dict[str, str],
        epochs: int,
        staging: Path,
        refit_children: set[str] | None = None,
        metric: str = "val_miou",
    ) -> None:
        self.writer = writer
        self.search_name = search_name
        self.metric = metric
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.epochs = epochs
        self.key = (writer.tracking_uri, search_name)
        self._children = children
        self._staging = staging
        self._steps: dict[str, int] = {}
        self._logged: dict[str, int] = {}
        self._imaged: dict[tuple[str, str], int] = {}
        self._pictures = ThreadPoolExecutor(max_workers=1, thread_name_prefix="segsearch-pictures")
        self._started: set[str] = set()
        self._ended: set[str] = set()
        self._model_uri: str | None = None
        self._refit: RefitPhase | None = None
        self._refit_model_uri: str | None = None
        self._refit_run_id: str | None = None
        self._refit_children: set[str] = set(refit_children or ())

    @classmethod
    def start(
        cls,
        *,
        tracking_uri: str | None,
        search_name: str,
        space_path: str | Path | None,
        dataset_uri: str,
        dataset_info: Any,
        settings: Mapping[str, Any],
        epochs: int,
        dataset_fingerprint: str | None = None,
        metric: str = "val_miou",
        echo: Callable[[str], None] = _log,
        retry_every_s: float = 15.0,
    ) -> SearchTracker:
        """Open (or reopen, on resume) the search's parent run; UserError if MLflow is unusable.

        `dataset_fingerprint` (segsearch.data.fingerprint) becomes the parent's and every trial
        run's `segsearch.dataset_fingerprint` tag, what the promote gate compares.
        """
        uri = resolve_tracking_uri(tracking_uri)
        check_tracking_server(uri)
        staging = Path(tempfile.mkdtemp(prefix="segsearch-tracking-"))
        params = {"dataset": dataset_uri, **plain_data(settings)}
        params.setdefault("epochs", epochs)
        writer: Writer | None = None
        try:
            writer = Writer(uri, echo=echo, retry_every_s=retry_every_s)
            experiment_id = writer.now(lambda c: _runs.experiment_for(c, search_name))
            parent_id, reused = writer.now(
                lambda c: _runs.open_parent(c, experiment_id, search_name)
            )
            writer.now(lambda c: _runs.log_params(c, parent_id, params, echo=echo))
            if dataset_fingerprint:
                fingerprint = {DATASET_FINGERPRINT: dataset_fingerprint}
                writer.now(lambda c: _runs.log_tags(c, parent_id, fingerprint))
            for path in _files.parent_files(staging, space_path, dataset_info):
                writer.now(lambda c, path=path: c.log_artifact(parent_id, str(path)))
            children = writer.now(lambda c: _runs.children_of(c, experiment_id, parent_id))
            refits = writer.now(
                lambda c: _runs.children_of(c, experiment_id, parent_id, role="refit")
            )
        except Exception as err:
            if writer is not None:
                writer.close()
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(err, UserError):
                raise
            raise UserError(
                f"MLflow tracking at {mask(uri)} is unusable ({masked_first_line(err)}); check "
                "--tracking-uri / MLFLOW_TRACKING_URI"
            ) from None
        if reused:
            echo(
                f"tracking: continuing MLflow run {parent_id} of search {search_name!r} "
                f"({len(children)} trial runs so far)"
            )
        tracker = cls(
            writer,
            search_name=search_name,
            experiment_id=experiment_id,
            parent_run_id=parent_id,
            children=children,
            epochs=epochs,
            staging=staging,
            refit_children=set(refits),
            metric=metric,
        )
        tracker._children.update(refits)
        register(tracker)
        return tracker

    def tune_callback(self) -> Callback:
        """The Tune callback that logs every trial event of this search."""
        return TrackingCallback(self)

    def begin_refit(self, results: Any, phase: RefitPhase) -> None:
        """From now on, trials are refits of the search's best configurations (`phase`); the
        search's own trials whose end this process did not see are logged first."""
        for result in results:
            self._catch_up(outcome_of(result, epochs=self.epochs))
        self._refit = phase

    def _epochs_of(self, trial_id: str) -> int:
        refit = self._refit is not None and trial_id in self._refit_children
        return self._refit.epochs if refit else self.epochs

    def trial_started(self, trial_id: str, config: Mapping[str, Any]) -> None:
        """Queue: open the trial's child run (or reopen it) and log its params."""
        self._started.add(trial_id)
        tags: dict[str, Any] = {}
        if self._refit is not None:
            self._refit_children.add(trial_id)
            tags = self._refit.tags_for(config)
        params = {**config}
        params.setdefault("epochs", self._epochs_of(trial_id))

        def open_run(client: MlflowClient) -> None:
            run_id = _runs.open_child(
                client,
                experiment_id=self.experiment_id,
                parent_id=self.parent_run_id,
                search_name=self.search_name,
                trial_id=trial_id,
                known=self._children.get(trial_id),
                tags=tags,
            )
            self._children[trial_id] = run_id
            self._logged[trial_id] = _runs.last_step(client, run_id)
            for key, step in _runs.image_steps(client, run_id).items():
                self._imaged[trial_id, key] = step
            _runs.log_params(client, run_id, params, echo=self.writer.echo)
            score = self._refit.search_score(config) if self._refit else None
            if score is not None:
                name = safe_key(f"{SEARCH_SCORE_PREFIX}{self.metric}")
                _runs.log_batch(client, run_id, metrics=[Metric(name, score, _now_ms(), 0)])

        self.writer.submit(f"trial {trial_id}: run and params", open_run)

    def end_lost_runs(self, restored: set[str]) -> None:
        """Queue: end KILLED, tagged lost, the trial runs of an earlier driver whose trials the
        restored search does not have (started after Tune last saved its state), and say so.

        Tune saves its state every few seconds; a trial started since then is gone with the
        driver, its run left RUNNING and its work drawn again as a new trial.
        """
        phase = {t for t in self._children if (t in self._refit_children) == bool(self._refit)}
        lost = sorted(phase - restored - self._started)
        if not lost:
            return
        tags = {STATUS: LOST, REASON: LOST_REASON}
        for trial_id in lost:
            run_id = self._children.pop(trial_id)
            self.writer.submit(
                f"trial {trial_id}: end (lost)",
                lambda c, run_id=run_id: _runs.mark_lost(c, run_id, tags),
            )
        self.writer.echo(f"tracking: trial run(s) {', '.join(lost)} ended as lost: {LOST_REASON}")

    def trial_result(self, trial_id: str, result: Mapping[str, Any], filesystem: Any) -> None:
        """Queue an epoch's metrics (step = epoch) and its checkpoint's pictures.

        On Tune's event loop: nothing here waits. The pictures are copied at once, since Train
        keeps only the last checkpoints, but on the pictures thread (a checkpoint may be on S3),
        which then queues their upload.
        """
        step = epoch_of(dict(result))
        if self._steps.get(trial_id) == step:
            return
        self._steps[trial_id] = step
        timestamp = _now_ms()
        values = epoch_metrics(result)
        if trial_id in self._refit_children and self._refit and not self._refit.held_out:
            values = {k: v for k, v in values.items() if not k.startswith("val_")}
        metrics = [Metric(k, v, timestamp, step) for k, v in values.items()]
        self.writer.submit(
            f"trial {trial_id}: metrics of epoch {step}",
            lambda c: self._log_epoch(c, trial_id, step, metrics),
        )
        checkpoint = result.get("checkpoint_path")
        if checkpoint:
            self._pictures.submit(self._stage_pictures, trial_id, str(checkpoint), filesystem, step)

    def _stage_pictures(self, trial_id: str, checkpoint: str, filesystem: Any, step: int) -> None:
        """On the pictures thread: copy an epoch's pictures and queue them, each at the run's
        root (the latest wins) and the PNGs also with `log_image(key, step=epoch)`, which the
        MLflow UI shows on an image slider."""
        with self._reported(f"trial {trial_id}: pictures of epoch {step}"):
            folder = self._staging / trial_id / f"epoch_{step:03d}"
            for local in _files.stage_pictures(checkpoint, filesystem, folder):
                self.writer.submit(
                    f"trial {trial_id}: artifact {local.name} of epoch {step}",
                    lambda c, local=local: c.log_artifact(self._run(trial_id), str(local)),
                )
                if local.name in STEPPED_PICTURES:
                    key = STEPPED_PICTURES[local.name]
                    self.writer.submit(
                        f"trial {trial_id}: image {key} of epoch {step}",
                        lambda c, local=local, key=key: self._log_image(
                            c, trial_id, key, local, step
                        ),
                    )

    def _log_image(
        self, client: MlflowClient, trial_id: str, key: str, path: Path, step: int
    ) -> None:
        """On the writer thread: one picture at step = epoch, once per step (a resumed trial
        reports its last epoch again)."""
        if step <= self._imaged.get((trial_id, key), 0):
            return
        with Image.open(path) as image:
            client.log_image(
                self._run(trial_id), image.convert("RGB"), key=key, step=step, synchronous=True
            )
        self._imaged[trial_id, key] = step

    def trial_ended(
        self,
        trial_id: str,
        last: Mapping[str, Any],
        error: str | None,
        *,
        only_if_running: bool = False,
    ) -> None:
        """Queue: tag how the trial ended (completed, stopped_early, error) and end its run.

        `error` is the failure's text (a traceback): its last line becomes a tag, the whole of
        it (secrets masked) the run's error.txt. With `only_if_running`, a run that MLflow no
        longer has RUNNING (ended by an earlier process) is left as it is.
        """
        status = end_status(dict(last), epochs=self._epochs_of(trial_id), failed=error is not None)
        tags = {STATUS: status, EPOCHS_RUN: epoch_of(dict(last))}

        def run_to_end(client: MlflowClient) -> str | None:
            run_id = self._run(trial_id)
            if only_if_running and client.get_run(run_id).info.status != "RUNNING":
                return None
            return run_id

        if error is not None:
            tags[ERROR_TAG] = error_text(error)
            path = self._staging / trial_id / "error.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(mask(error))

            def log_error(client: MlflowClient) -> None:
                if run_id := run_to_end(client):
                    client.log_artifact(run_id, str(path))

            self.writer.submit(f"trial {trial_id}: artifact error.txt", log_error)

        def end(client: MlflowClient) -> None:
            if run_id := run_to_end(client):
                _runs.end_run(client, run_id, tags, failed=error is not None)

        self._ended.add(trial_id)
        self.writer.submit(f"trial {trial_id}: end ({status})", end)

    def finish(
        self,
        results: Any,
        *,
        metric: str,
        mode: str = "max",
        study: Any = None,
        refit: Any = (),
        refit_choice: str | None = None,
        parent_metrics: Mapping[str, float] | None = None,
        evaluation: Any = None,
        evaluated_trial: str | None = None,
        wait_s: float = FINISH_WAIT_S,
    ) -> TrackingSummary:
        """Log the best trial and its model, the pictures of `study` (the search's Optuna study)
        and the trials table; end the parent run.

        A trial's score and model are its best epoch's (`best_epoch` and `best_<metric>` on its
        run). With `refit` (the results after `begin_refit`), each refit run logs its model and
        the parent names the one promote takes (trial `refit_choice`). `parent_metrics` (the
        compute spent) and `evaluation` (a segsearch.serve.evaluate.Evaluation of
        `evaluated_trial`'s model) go on the parent run, the evaluation also on that trial's.

        Never raises for MLflow failures: the search itself is done. It waits at most `wait_s`
        in all for MLflow; what could not be logged by then is in the summary's `unlogged` and
        in one warning line, its files kept in the staging folder.
        """
        deadline = time.monotonic() + wait_s
        self.drain(wait_s)
        outcomes = sorted(
            (outcome_of(r, epochs=self.epochs, metric=metric, mode=mode) for r in results),
            key=lambda o: o.trial_id,
        )
        refits = self._refit_outcomes(refit, metric=metric, mode=mode)
        for outcome in [*outcomes, *refits]:
            self._catch_up(outcome)
        for outcome in outcomes + [o for o in refits if self._refit and self._refit.held_out]:
            self._record_best_epoch(outcome, metric)
        best = best_of(outcomes, metric=metric, mode=mode)
        with self._reported("search run: best trial"):
            if best is not None:
                self._record_best(best, metric)
        with self._reported("search run: refit models"):
            self._record_refits(refits, refit_choice)
        if parent_metrics:
            stamp = _now_ms()
            values = [Metric(safe_key(k), float(v), stamp, 0) for k, v in parent_metrics.items()]
            self.writer.submit(
                "search run: compute",
                lambda c: _runs.log_batch(c, self.parent_run_id, metrics=values),
            )
        if evaluation is not None:
            self._record_evaluation(evaluation, evaluated_trial)
        with self._reported("search run: pictures and trials table"):
            self._log_search_files(results, metric=metric, study=study)
        failed = bool(outcomes) and all(o.status == ERROR for o in outcomes)
        self.writer.submit(
            "search run: end",
            lambda c: _runs.end_run(
                c, self.parent_run_id, {STATUS: "failed" if failed else "finished"}, failed=failed
            ),
        )
        self.drain(max(0.0, deadline - time.monotonic()))
        self.writer.close()
        unlogged = tuple(self.writer.unlogged)
        self._close()
        best_id = best.trial_id if best else None
        return TrackingSummary(
            experiment_id=self.experiment_id,
            parent_run_id=self.parent_run_id,
            best_trial_id=best_id,
            best_run_id=self._children.get(best_id) if best_id else None,
            model_uri=self._model_uri,
            unlogged=unlogged,
            refit_run_id=self._refit_run_id,
            refit_model_uri=self._refit_model_uri,
        )

    def interrupted(self) -> None:
        """End the search interrupted (Ctrl-C): its running trial runs and the parent run KILLED,
        tagged `interrupted`, so it never looks finished; `--resume` reopens them."""
        self._end_search(status="KILLED", tags={STATUS: INTERRUPTED})

    def failed(self, reason: str) -> None:
        """End the search that failed before it could finish (bad data met on the driver, Tune
        set-up): running runs and the parent FAILED, with `reason` (one line) as their error."""
        self._end_search(status="FAILED", tags={STATUS: "failed", ERROR_TAG: mask(reason)})

    def _end_search(self, *, status: str, tags: Mapping[str, Any]) -> None:
        """End every run this search left RUNNING with `status`; then the staging folder goes
        (kept, and named, when something could not be logged)."""
        for trial_id, run_id in list(self._children.items()):
            if trial_id in self._ended:
                continue
            self.writer.submit(
                f"trial {trial_id}: end ({status.lower()})",
                lambda c, run_id=run_id: _runs.terminate_if_running(c, run_id, tags, status=status),
            )
        self.writer.submit(
            f"search run: end ({status.lower()})",
            lambda c: _runs.terminate(c, self.parent_run_id, tags, status=status),
        )
        self.drain(ABORT_WAIT_S)
        self.writer.close()
        self._close()

    def _close(self) -> None:
        """Say what could not be logged (its files kept), else remove the staging folder."""
        unlogged = tuple(self.writer.unlogged)
        if unlogged:
            shown = "; ".join(unlogged[:SHOWN_UNLOGGED])
            if len(unlogged) > SHOWN_UNLOGGED:
                shown += f"; and {len(unlogged) - SHOWN_UNLOGGED} more"
            self.writer.echo(
                f"warning: {len(unlogged)} item(s) not logged to MLflow at "
                f"{mask(self.writer.tracking_uri)}: {shown} (files kept in {self._staging})"
            )
        else:
            shutil.rmtree(self._staging, ignore_errors=True)
        self._pictures.shutdown(wait=False, cancel_futures=True)
        unregister(self)

    def drain(self, timeout_s: float) -> bool:
        """Wait (at most `timeout_s`) until every queued MLflow call is done; True when all are.

        Pictures still being copied are waited for first, so their uploads are queued. While the
        store is down, it is tried once more and this returns when that fails too.
        """
        deadline = time.monotonic() + timeout_s
        with contextlib.suppress(TimeoutError, RuntimeError):  # RuntimeError: already shut down
            self._pictures.submit(lambda: None).result(timeout=timeout_s)
        return self.writer.drain(max(0.0, deadline - time.monotonic()))

    @contextlib.contextmanager
    def _reported(self, what: str) -> Iterator[None]:
        """Preparing something to log failed: list it as not logged and carry on."""
        try:
            yield
        except Exception as err:
            reason = masked_first_line(err)
            self.writer.note_dropped(f"{what} ({reason})")
            self.writer.echo(f"warning: tracking could not prepare {what}: {reason}")

    def _log_epoch(
        self, client: MlflowClient, trial_id: str, step: int, metrics: list[Metric]
    ) -> None:
        """On the writer thread: log an epoch after the run's last logged one, never again (a
        resumed trial reports its last result a second time)."""
        if step <= self._logged.get(trial_id, 0):
            return
        _runs.log_batch(client, self._run(trial_id), metrics=metrics)
        self._logged[trial_id] = step

    def _run(self, trial_id: str) -> str:
        if trial_id not in self._children:
            raise KeyError(f"no MLflow run for trial {trial_id} yet")
        return self._children[trial_id]

    def _catch_up(self, outcome: TrialOutcome) -> None:
        """Log a trial whose end this process did not see (resumed search, missed events)."""
        trial_id = outcome.trial_id
        if not trial_id or trial_id in self._ended:  # no id: it never reported anything
            return
        known = trial_id in self._started or trial_id in self._children
        if not known:
            self.trial_started(trial_id, outcome.config)
            self.trial_result(trial_id, outcome.metrics, outcome.filesystem)
        self.trial_ended(trial_id, outcome.metrics, outcome.error, only_if_running=known)

    def _record_best(self, best: TrialOutcome, metric: str) -> None:
        """Tag the best trial on the parent run and its own run; log its model to its run."""
        trial_id, value = best.trial_id, best.value(metric)
        config_file = self._staging / "best_config.json"
        _files.write_json(config_file, clean(best.config))

        def on_parent(client: MlflowClient) -> None:
            run_id = self._run(trial_id)
            tags = {
                BEST_TRIAL_ID: trial_id,
                BEST_RUN_ID: run_id,
                METRIC: metric,
            }
            _runs.log_tags(client, self.parent_run_id, tags)
            stamp = int(time.time() * 1000)
            best_metric = Metric(safe_key(f"best_{metric}"), value, stamp, 0)
            _runs.log_batch(client, self.parent_run_id, metrics=[best_metric])
            client.log_artifact(self.parent_run_id, str(config_file))
            _runs.mark_best(client, self.experiment_id, self.parent_run_id, run_id)

        self.writer.submit(f"search run: best trial {trial_id}", on_parent)
        if best.checkpoint:
            self._log_model(best, folder="best_model", parent_tag=BEST_MODEL_URI)

    def _log_model(self, outcome: TrialOutcome, *, folder: str, parent_tag: str | None) -> None:
        """Log the model of the outcome's checkpoint (its best epoch's) to its run, once; with
        `parent_tag`, name it on the parent run."""
        trial_id, checkpoint = outcome.trial_id, str(outcome.checkpoint)
        model_dir = self._staging / folder
        shutil.rmtree(model_dir, ignore_errors=True)

        def log_model(client: MlflowClient) -> None:
            from segsearch.serve.mlflow_model import log_model

            run_id = self._run(trial_id)
            tags = client.get_run(run_id).data.tags
            if tags.get(MODEL_CHECKPOINT) == mask(checkpoint):
                uri = tags.get(MODEL_URI)
            else:
                with _runs.global_tracking_uri(self.writer.tracking_uri):
                    uri = log_model(str(model_dir), run_id=run_id)
                model_tags = {MODEL_URI: uri, MODEL_CHECKPOINT: checkpoint}
                _runs.log_tags(client, run_id, model_tags)
            if parent_tag is not None and uri:
                _runs.log_tags(client, self.parent_run_id, {parent_tag: uri})
            if parent_tag == BEST_MODEL_URI:
                self._model_uri = uri
            elif parent_tag == REFIT_MODEL_URI:
                self._refit_model_uri = uri

        with self._reported(f"trial {trial_id}: model from {mask(checkpoint)}"):
            _files.copy_checkpoint(checkpoint, outcome.filesystem, model_dir)
            if not (model_dir / MODEL_FILE).is_file():
                raise FileNotFoundError(f"the checkpoint has no {MODEL_FILE}")
            self.writer.submit(f"trial {trial_id}: model", log_model)

    def _refit_outcomes(self, results: Any, *, metric: str, mode: str) -> list[TrialOutcome]:
        """The refit trials as outcomes: scored by their best val epoch when val was held out,
        else by their last epoch (nothing to choose an epoch by)."""
        if self._refit is None:
            return []
        scored_by = metric if self._refit.held_out else None
        epochs = self._refit.epochs
        return sorted(
            (outcome_of(r, epochs=epochs, metric=scored_by, mode=mode) for r in results),
            key=lambda o: o.trial_id,
        )

    def _record_best_epoch(self, outcome: TrialOutcome, metric: str) -> None:
        """`best_epoch` and `best_<metric>` on the trial's run: what its model and score are of."""
        value = outcome.value(metric)
        if value is None or not outcome.trial_id:
            return
        stamp = _now_ms()
        metrics = [
            Metric("best_epoch", float(outcome.best_epoch), stamp, 0),
            Metric(safe_key(f"best_{metric}"), value, stamp, 0),
        ]
        self.writer.submit(
            f"trial {outcome.trial_id}: best epoch",
            lambda c: _runs.log_batch(c, self._run(outcome.trial_id), metrics=metrics),
        )

    def _record_refits(self, refits: list[TrialOutcome], choice: str | None) -> None:
        """Log every finished refit run's model; name on the parent the one promote takes."""
        for outcome in refits:
            if outcome.status == ERROR or not outcome.checkpoint:
                continue
            chosen = outcome.trial_id == choice
            self._log_model(
                outcome,
                folder=f"refit_model_{outcome.trial_id}",
                parent_tag=REFIT_MODEL_URI if chosen else None,
            )
        if choice is None:
            return

        def on_parent(client: MlflowClient) -> None:
            self._refit_run_id = self._run(choice)
            _runs.log_tags(client, self.parent_run_id, {REFIT_RUN_ID: self._refit_run_id})

        self.writer.submit("search run: refit run", on_parent)

    def _record_evaluation(self, evaluation: Any, trial_id: str | None) -> None:
        """The evaluation's metrics and files on the parent run and on the evaluated model's."""
        from segsearch.serve.evaluate import log_evaluation

        uri = self.writer.tracking_uri
        model = {TEST_MODEL: f"{trial_id or '?'}: {mask(evaluation.model_uri)}"}

        def on_parent(client: MlflowClient) -> None:
            log_evaluation(evaluation, run_id=self.parent_run_id, tracking_uri=uri)
            _runs.log_tags(client, self.parent_run_id, model)

        self.writer.submit(f"search run: {evaluation.split} evaluation", on_parent)
        if trial_id:
            self.writer.submit(
                f"trial {trial_id}: {evaluation.split} evaluation",
                lambda c: log_evaluation(evaluation, run_id=self._run(trial_id), tracking_uri=uri),
            )

    def _log_search_files(self, results: Any, *, metric: str, study: Any) -> None:
        """trials.csv and the Optuna study's pictures (`_pictures.PICTURES`) on the parent."""
        folder = self._staging / "search"
        folder.mkdir(exist_ok=True)
        files = [folder / "trials.csv"]
        _files.trials_table(results, self._children, files[0])
        if study is None:
            self.writer.echo("tracking: no Optuna pictures (no study)")
        else:
            drawn, missing = _pictures.study_pictures(study, folder, metric=metric)
            files += drawn
            if missing:
                self.writer.echo(f"tracking: not drawn: {'; '.join(missing)}")
        for path in files:
            self.writer.submit(
                f"search run: artifact {path.name}",
                lambda c, path=path: c.log_artifact(self.parent_run_id, str(path)),
            )


def epoch_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The numeric per-epoch metrics of a result that go to MLflow: EPOCH_METRICS, per-class IoUs
    and the node's system metrics (`system/...`, shown in the UI's System metrics tab)."""
    return {
        safe_key(key): float(value)
        for key, value in result.items()
        if (key in EPOCH_METRICS or key.startswith((CLASS_IOU_PREFIX, SYSTEM_PREFIX)))
        and is_number(value)
    }


def _now_ms() -> int:
    return int(time.time() * 1000)
