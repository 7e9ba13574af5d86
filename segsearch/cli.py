"""The `segsearch` command line: thin click wrappers over the Python API.

Exit codes: 0 done, 1 the work failed (every trial of a search, a followed job, an export check,
no Pareto-front member meeting `promote --pick`), 2 bad input,
3 a service did not answer (S3, MLflow, Ray), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time
import traceback
from typing import Any

import click

from segsearch import __version__
from segsearch.console import console
from segsearch.errors import ServiceUnavailable, UserError

MODEL_TRACKING_HELP = "MLflow tracking URI for models:/ and runs:/ URIs."
TRACKING_HELP = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)."
JSON_HELP = "Print the result as JSON on stdout, for scripts (progress goes to stderr)."
#: Exit code of work that ran and failed: every trial of a search, a followed job.
EXIT_FAILED = 1
#: Exit code of bad input (a UserError).
EXIT_BAD_INPUT = 2
#: Exit code of an unreachable service: S3, MLflow, Ray (ServiceUnavailable).
EXIT_UNAVAILABLE = 3
#: Exit code of a command stopped by Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130
_VERBOSITY = "segsearch.verbosity"
EPILOG = (
    "Exit codes: 0 done, 1 the work failed (all trials of a search, a followed job, nothing "
    "meeting promote --pick), 2 bad "
    "input, 3 a service did not answer (S3, MLflow, Ray), 130 interrupted."
)

logger = logging.getLogger("segsearch.cli")


def _count(delta: int):
    """A -v/-q callback: add `delta` per use to the verbosity (one for group and command)."""

    def add(ctx: click.Context, _param: click.Parameter, uses: int) -> None:
        meta = ctx.meta
        meta[_VERBOSITY] = meta.get(_VERBOSITY, 0) + delta * uses

    return add


def _verbosity_params() -> list[click.Option]:
    """-v (repeatable) and -q, given before or after the command name."""
    return [
        click.Option(
            ["-v", "--verbose"],
            count=True,
            expose_value=False,
            callback=_count(1),
            help="Also segsearch's debug lines, Ray's and MLflow's warnings and the workers' logs.",
        ),
        click.Option(
            ["-q", "--quiet"],
            count=True,
            expose_value=False,
            callback=_count(-1),
            help="Warnings and results only: no progress lines.",
        ),
    ]


def verbosity() -> int:
    """The -v/-q balance of the running command: below 0 quiet, above 0 verbose."""
    context = click.get_current_context(silent=True)
    return context.meta.get(_VERBOSITY, 0) if context is not None else 0


class _Command(click.Command):
    """A command with -v/-q whose log records show on the console while it runs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("epilog", EPILOG)
        super().__init__(*args, **kwargs)
        self.params.extend(_verbosity_params())

    def invoke(self, ctx: click.Context) -> Any:
        stream = "stderr" if ctx.params.get("as_json") else "stdout"
        with console(ctx.meta.get(_VERBOSITY, 0), info_stream=stream):
            return super().invoke(ctx)


class _Group(click.Group):
    """Turns errors into one line on stderr and a distinct exit code, never a traceback: bad
    input 2, an unreachable service 3, Ctrl-C 130 (-v adds the traceback)."""

    command_class = _Command

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ServiceUnavailable as err:
            _fail(ctx, err, EXIT_UNAVAILABLE)
        except UserError as err:
            _fail(ctx, err, EXIT_BAD_INPUT)
        except KeyboardInterrupt as stop:
            click.echo(f"interrupted: {stop}" if str(stop) else "interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)


def _fail(ctx: click.Context, err: UserError, code: int) -> None:
    """The error's one line (under -v after its traceback), and exit `code`."""
    if ctx.meta.get(_VERBOSITY, 0) > 0:
        click.echo("".join(traceback.format_exception(err)).rstrip(), err=True)
    click.echo(f"error: {err}", err=True)
    sys.exit(code)


@click.group(
    cls=_Group,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=EPILOG,
    params=_verbosity_params(),
)
@click.version_option(__version__, "-V", "--version", prog_name="segsearch")
def main() -> None:
    """Search semantic-segmentation models with Optuna in Ray Tune, tracked in MLflow.

    Shell completion: eval "$(_SEGSEARCH_COMPLETE=bash_source segsearch)" in ~/.bashrc
    (zsh_source for zsh, fish_source for fish).
    """
    # MLflow's download bar would come before a command's own output and its one-line error.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@main.command()
@click.argument("images", type=click.Path(file_okay=False))
@click.argument("masks", type=click.Path(file_okay=False))
@click.argument("dest")
@click.option("--classes", required=True, help="Class names in class-id order: a,b,c.")
@click.option(
    "--val-fraction",
    type=float,
    default=0.2,
    show_default=True,
    help="Share of pairs held out for val (ignored for a train/ + val/ layout).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the val split.")
@click.option("--shard-size-mb", type=click.IntRange(min=1), default=256, show_default=True)
@click.option(
    "--colors",
    help='Mask colour per class, in class order: "r,g,b;r,g,b;..." or grey values "0;255".',
)
@click.option(
    "--ignore-index",
    type=click.IntRange(0, 255),
    default=255,
    show_default=True,
    help="Mask value (or grey colour) that no loss or metric counts.",
)
@click.option("--overwrite", is_flag=True, help="Replace a dataset already at DEST.")
def ingest(
    images: str,
    masks: str,
    dest: str,
    classes: str,
    val_fraction: float,
    seed: int,
    shard_size_mb: int,
    colors: str | None,
    ignore_index: int,
    overwrite: bool,
) -> None:
    """Pair IMAGES with MASKS by file name and write Parquet shards + dataset.json to DEST.

    DEST is a local folder or s3://bucket/prefix (S3 settings from the AWS_* variables).
    """
    from segsearch.data.ingest import ingest as run_ingest

    info = run_ingest(
        images,
        masks,
        dest,
        classes=classes,
        val_fraction=val_fraction,
        seed=seed,
        shard_size_mb=shard_size_mb,
        colors=colors,
        ignore_index=ignore_index,
        overwrite=overwrite,
        progress=verbosity() >= 0,
    )
    splits = ", ".join(f"{name} {count}" for name, count in info.splits.items())
    click.echo(
        f"ingested {sum(info.splits.values())} images ({splits}) into {dest}: "
        f"{info.num_classes} classes, {info.channels} channel(s)"
    )
    absent = [c for c, n in zip(info.classes, info.class_pixel_counts, strict=True) if not n]
    if absent:
        click.echo(
            f"warning: no train pixels of class {', '.join(absent)}; masks are read as class "
            "ids unless --colors maps their values",
            err=True,
        )


_dashboard_option = click.option(
    "--dashboard",
    is_flag=True,
    help="Start the local Ray with its dashboard (on 127.0.0.1) and print its URL; with "
    "--address, print the cluster's.",
)


@main.command()
@click.argument("space_file", type=click.Path(dir_okay=False))
@click.option("--dataset", required=True, help="Dataset URI: a local folder or s3://bucket/prefix.")
@click.option("--name", help="Search name (default: the space's name); the MLflow experiment too.")
@click.option("--trials", type=click.IntRange(min=1), help="Override the space's trial count.")
@click.option("--epochs", type=click.IntRange(min=1), help="Override the epochs per trial.")
@click.option("--storage", help="Where Tune state and checkpoints go: a folder or s3:// URI.")
@click.option("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else local Ray).")
@click.option("--tracking-uri", help=TRACKING_HELP)
@click.option("--resume", is_flag=True, help="Continue an interrupted search of this name.")
@click.option(
    "--optuna-storage",
    help="SQLAlchemy URL of the Optuna study's database (default: optuna.db beside a local "
    "MLflow store, else in --storage, else in ~/.segsearch; $SEGSEARCH_OPTUNA_STORAGE).",
)
@click.option(
    "--warm-start",
    metavar="SEARCH",
    help="First try the best configurations of this earlier search (the space's warm_start).",
)
@click.option(
    "--refit",
    metavar="EPOCHS[:TOP_K[:ON]]",
    help="After the search, train its TOP_K best configurations (default 1) for EPOCHS on ON "
    "(train, the default, or train+val); overrides the space's refit.",
)
@click.option(
    "--budget",
    metavar="KIND=AMOUNT",
    help="Stop launching trials once the next would exceed this compute: gpu_hours=40, "
    "cpu_hours=0.5 or wall=6h (s, m, h); overrides the space's budget.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Check space, dataset, tracking and cluster; print sampled configs and the resource "
    "plan; run and write nothing.",
)
@_dashboard_option
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def search(
    space_file: str,
    dataset: str,
    name: str | None,
    trials: int | None,
    epochs: int | None,
    storage: str | None,
    address: str | None,
    tracking_uri: str | None,
    resume: bool,
    optuna_storage: str | None,
    warm_start: str | None,
    refit: str | None,
    budget: str | None,
    dry_run: bool,
    dashboard: bool,
    as_json: bool,
) -> None:
    """Search the YAML space SPACE_FILE over a dataset; print the best trials."""
    from segsearch.console import echo
    from segsearch.mlflow_uri import without_password
    from segsearch.space import check_budget, load_space, parse_budget, parse_refit

    spec = load_space(space_file).with_overrides(
        name=name,
        trials=trials,
        epochs=epochs,
        warm_start=warm_start,
        refit=parse_refit(refit) if refit else None,
        budget=parse_budget(budget) if budget else None,
    )
    check_budget(spec)
    logger.debug(f"search {spec.name}: {spec.trials} trials × {spec.epochs} epochs on {dataset}")
    if dry_run:
        from segsearch.search.plan import plan_search

        plan = plan_search(spec, dataset=dataset, address=address, tracking_uri=tracking_uri)
        _emit(plan.to_dict() if as_json else plan.describe(), as_json)
        return
    from segsearch.search.tuner import SearchInterrupted, run_search

    try:
        result = run_search(
            spec,
            dataset=dataset,
            storage=storage,
            resume=resume,
            address=address,
            tracking_uri=tracking_uri,
            space_path=space_file,
            echo=echo,
            optuna_storage=optuna_storage,
            dashboard=dashboard,
        )
    except SearchInterrupted as stop:
        options = {
            "--dataset": dataset,
            "--name": stop.name,
            "--trials": trials,
            "--epochs": epochs,
            "--storage": storage,
            "--address": address,
            "--tracking-uri": tracking_uri,
            "--optuna-storage": optuna_storage and without_password(optuna_storage),
            "--refit": refit,
            "--budget": budget,
        }
        _interrupted(space_file, options)
    _print_result(result, as_json=as_json)


@main.command()
@click.option("--trials", type=click.IntRange(min=1), help="Override the demo's trial count.")
@click.option("--epochs", type=click.IntRange(min=1), help="Override the epochs per trial.")
@click.option("--data", default="segsearch-data/demo", show_default=True, help="Demo dataset.")
@click.option("--storage", help="Where Tune state and checkpoints go (default ./segsearch-runs).")
@click.option("--tracking-uri", help=TRACKING_HELP)
@_dashboard_option
def demo(
    trials: int | None,
    epochs: int | None,
    data: str,
    storage: str | None,
    tracking_uri: str | None,
    dashboard: bool,
) -> None:
    """Run a real search on a built-in dataset with local Ray; print the best and worst trial."""
    from segsearch.console import echo
    from segsearch.data.demo import make_demo_dataset
    from segsearch.data.format import read_dataset_info
    from segsearch.search.tuner import SearchInterrupted, run_search
    from segsearch.space import load_space, packaged_space

    try:
        read_dataset_info(data)
    except UserError:
        echo(f"writing the demo dataset to {data}")
        make_demo_dataset(data, n_train=256, n_val=48, size=(48, 48), overwrite=True)
    space_path = packaged_space("demo.yaml")
    name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    spec = load_space(space_path).with_overrides(name=name, trials=trials, epochs=epochs)
    try:
        result = run_search(
            spec,
            dataset=data,
            storage=storage,
            tracking_uri=tracking_uri,
            space_path=space_path,
            echo=echo,
            dashboard=dashboard,
        )
    except SearchInterrupted as stop:
        options = {
            "--dataset": data,
            "--name": stop.name,
            "--trials": trials,
            "--epochs": epochs,
            "--storage": storage,
            "--tracking-uri": tracking_uri,
        }
        _interrupted(str(space_path), options)
    _print_result(result)


def _interrupted(space_file: str, options: dict[str, object]) -> None:
    """Say how to continue an interrupted search, and exit 130 (never 0: it did not finish)."""
    words = ["segsearch", "search", space_file]
    for option, value in options.items():
        if value is not None:
            words += [option, str(value)]
    click.echo(f"interrupted — continue with `{shlex.join([*words, '--resume'])}`", err=True)
    sys.exit(EXIT_INTERRUPTED)


def _print_result(result, *, as_json: bool = False) -> None:
    """The trials table and the best trial (or the result as JSON); exit 1 if all trials failed."""
    failed = [trial for trial in result.trials if trial["error"] is not None]
    all_failed = bool(failed) and len(failed) == len(result.trials)
    if as_json:
        _emit(result.to_dict(), True)
    else:
        click.echo(f"\n{result.table()}\n")
        for trial in failed:
            click.echo(f"trial {trial['trial_id']} failed: {trial['error']}")
    if all_failed:
        click.echo(f"error: all {len(failed)} trials failed ({failed[0]['error']})", err=True)
        sys.exit(EXIT_FAILED)
    if result.best_trial_id is None:
        budget = result.budget
        spent = (
            f" ({budget.describe()}; raise the budget: --resume --budget {budget.budget.kind}=MORE)"
            if budget
            else ""
        )
        raise UserError(f"search {result.name!r}: no trial reported {result.metric}{spent}")
    if as_json:
        return
    if result.budget is not None:
        click.echo(result.budget.describe())
    click.echo(
        f"best trial {result.best_trial_id}: {result.metric}={result.best_metric:.4f} "
        f"(worst {result.worst_metric:.4f})"
    )
    click.echo(f"best checkpoint: {result.best_checkpoint}")


def _emit(value: Any, as_json: bool) -> None:
    """A command's result on stdout: JSON for scripts, else the text as it is."""
    click.echo(json.dumps(value, indent=2, default=str) if as_json else value)


_address_option = click.option(
    "--address",
    required=True,
    envvar=["RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"],
    help="The cluster's dashboard, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, else "
    "$RAY_ADDRESS, as `ray job` reads them).",
)


@main.command()
@click.argument("space_file", type=click.Path(dir_okay=False))
@click.argument("search_args", nargs=-1, type=click.UNPROCESSED)
@_address_option
@click.option("--dataset", required=True, help="Dataset URI the cluster can read (s3://...).")
@click.option("--name", help="Search name (default: the space's name); the MLflow experiment too.")
@click.option(
    "--tracking-uri",
    help="MLflow tracking server as the cluster sees it, http(s)://MLFLOW:5000.",
)
@click.option("--storage", help="Where checkpoints and Tune's state go: s3://BUCKET/PREFIX.")
@click.option(
    "--shared-storage",
    metavar="PATH",
    help="Instead of --storage: an absolute path that every node of the cluster mounts.",
)
@click.option(
    "--cluster-defaults",
    is_flag=True,
    help="Take storage and tracking not given here from the cluster's SEGSEARCH_STORAGE and "
    "MLFLOW_TRACKING_URI (checked on the head before the search starts).",
)
@click.option(
    "--env",
    "env_pairs",
    multiple=True,
    metavar="KEY=VALUE",
    help="An environment variable for the job (repeatable); its value is never printed.",
)
@click.option(
    "--forward-env/--no-forward-env",
    default=True,
    show_default=True,
    help="Pass local settings (AWS_REGION, AWS_ENDPOINT_URL, MLFLOW_S3_ENDPOINT_URL, ...) on to "
    "the job; never credentials.",
)
@click.option(
    "--forward-secrets",
    is_flag=True,
    help="Also pass local AWS_* and MLFLOW_TRACKING_* credentials, in plain text in the job's "
    "info and Ray's logs; prefer the cluster's own credentials (cluster/README.md).",
)
@click.option("--wait", is_flag=True, help="Follow the logs to the end; exit 1 if the job failed.")
def submit(
    space_file: str,
    search_args: tuple[str, ...],
    address: str,
    dataset: str,
    name: str | None,
    tracking_uri: str | None,
    storage: str | None,
    shared_storage: str | None,
    cluster_defaults: bool,
    env_pairs: tuple[str, ...],
    forward_env: bool,
    forward_secrets: bool,
    wait: bool,
) -> None:
    """Run `segsearch search SPACE_FILE` on a Ray cluster as a Ray Job.

    Results must outlive the job: give --storage s3://... (or --shared-storage PATH) and
    --tracking-uri http(s)://..., or --cluster-defaults. Arguments after `--` go to
    `segsearch search` on the cluster, for example `-- --trials 16`.
    """
    from segsearch import jobs

    env = jobs.job_env(env_pairs, forward=forward_env, forward_secrets=forward_secrets)
    try:
        jobs.submit(
            space_file,
            address=address,
            dataset=dataset,
            name=name,
            tracking_uri=tracking_uri,
            storage=storage,
            shared_storage=shared_storage,
            cluster_defaults=cluster_defaults,
            env=env,
            wait=wait,
            extra_args=search_args,
            echo=click.echo,
            warn=lambda line: click.echo(line, err=True),
        )
    except jobs.JobFailed as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_FAILED)


@main.command()
@click.argument("job_id")
@_address_option
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def status(job_id: str, address: str, as_json: bool) -> None:
    """Show a submitted job's status."""
    from segsearch import jobs

    info = jobs.status(job_id, address=address)
    search_name = (info.metadata or {}).get("segsearch.search")
    if as_json:
        shown = {
            "job_id": job_id,
            "status": str(info.status),
            "search": search_name,
            "start_time": info.start_time,
            "end_time": info.end_time,
            "message": jobs.headline(info.message) or None,
        }
        _emit(shown, True)
        return
    click.echo(f"job {job_id}: {info.status}")
    if search_name:
        click.echo(f"search: {search_name}")
    for label, stamp in (("started", info.start_time), ("ended", info.end_time)):
        if stamp:
            click.echo(f"{label}: {time.strftime('%F %T', time.localtime(stamp / 1000))}")
    if info.message:
        click.echo(f"message: {jobs.headline(info.message)}")


@main.command()
@click.argument("job_id")
@_address_option
@click.option("--follow", "-f", is_flag=True, help="Keep streaming until the job ends.")
def logs(job_id: str, address: str, follow: bool) -> None:
    """Print a submitted job's logs."""
    from segsearch import jobs

    jobs.logs(job_id, address=address, follow_logs=follow, echo=click.echo)


@main.command()
@click.argument("job_id")
@_address_option
def stop(job_id: str, address: str) -> None:
    """Stop a submitted job."""
    from segsearch import jobs

    if jobs.stop(job_id, address=address):
        click.echo(f"stop requested for job {job_id}")
    else:
        final = jobs.status(job_id, address=address).status
        click.echo(f"job {job_id} had already ended ({final})")


@main.command()
@click.argument("search_name")
@click.option("--model-name", required=True, help="Registered model to add a version to.")
@click.option("--alias", default="champion", show_default=True, help="Alias to point at it.")
@click.option(
    "--metric",
    help="Metric that ranks trials [default: val_miou; a multi-objective search's first "
    "objective].",
)
@click.option(
    "--mode",
    type=click.Choice(["max", "min"]),
    help="Whether a larger or a smaller metric is better [default: max; a multi-objective "
    "search's first objective's].",
)
@click.option(
    "--pick",
    help="Multi-objective search: choose from its Pareto front the member best in the first "
    'objective among those meeting every constraint, e.g. "latency_ms<=20,num_params<1e6" '
    "(<=, <, >=, > on objectives); none meets them: exit 1.",
)
@click.option("--force", is_flag=True, help="Move the alias even to a model that scored worse.")
@click.option("--tracking-uri", help=TRACKING_HELP)
@click.option(
    "--export",
    "export_format",
    type=click.Choice(["onnx", "torchscript", "pt2"]),
    help="Also export the model (as `segsearch export`), check it on its dataset and attach the "
    "file to the version, under export/ in its files; a failed check changes nothing (exit 1).",
)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def promote(
    search_name: str,
    model_name: str,
    alias: str,
    metric: str | None,
    mode: str | None,
    pick: str | None,
    force: bool,
    tracking_uri: str | None,
    export_format: str | None,
    as_json: bool,
) -> None:
    """Register the best finished trial of SEARCH_NAME in the MLflow Model Registry."""
    from segsearch.serve.export import ExportFailed
    from segsearch.serve.promote import NothingMeets
    from segsearch.serve.promote import promote as run_promote

    try:
        done = run_promote(
            search_name,
            model_name=model_name,
            alias=alias,
            metric=metric,
            mode=mode,
            force=force,
            tracking_uri=tracking_uri,
            export=export_format,
            pick=pick,
        )
    except (ExportFailed, NothingMeets) as err:
        click.echo(f"error: {err}; nothing promoted", err=True)
        sys.exit(EXIT_FAILED)
    _emit(done.to_dict() if as_json else done.describe(), as_json)
    if done.export and not as_json:
        click.echo(done.export)


@main.command("list")
@click.option("--tracking-uri", help=TRACKING_HELP)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def list_command(tracking_uri: str | None, as_json: bool) -> None:
    """List the searches in the tracking store: state, trials, best score; newest first."""
    from segsearch.tracking.catalog import list_searches

    found = list_searches(tracking_uri=tracking_uri)
    if as_json:
        _emit([summary.to_dict() for summary in found], True)
        return
    if not found:
        click.echo("no searches in this tracking store")
        return
    rows = [["search", "state", "trials", "best", "trial", "started"]] + [
        [
            s.name,
            s.state,
            str(s.trials),
            "-" if s.best_metric is None else f"{s.metric}={s.best_metric:.4f}",
            s.best_trial_id or "-",
            time.strftime("%F %T", time.localtime(s.started / 1000)),
        ]
        for s in found
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


@main.command()
@click.argument("search_name")
@click.option("--tracking-uri", help=TRACKING_HELP)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def best(search_name: str, tracking_uri: str | None, as_json: bool) -> None:
    """Show the best trial of SEARCH_NAME: score, MLflow run, logged model, parameters."""
    from segsearch.tracking.catalog import best_trial

    found = best_trial(search_name, tracking_uri=tracking_uri)
    _emit(found.to_dict() if as_json else found.describe(), as_json)


def _inference_options(command):
    """--batch-size, --device and --tracking-uri, shared by the commands that run a model."""
    for option in reversed(
        (
            click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True),
            click.option(
                "--device",
                type=click.Choice(["auto", "cpu", "cuda"]),
                default="auto",
                show_default=True,
            ),
            click.option("--tracking-uri", help=MODEL_TRACKING_HELP),
        )
    ):
        command = option(command)
    return command


def _ensemble_options(command):
    """--top-k, --search, --metric and --mode: an ensemble of a search's best trials."""
    for option in reversed(
        (
            click.option(
                "--top-k",
                type=click.IntRange(min=1),
                help="Use the K best finished trials of --search that have a logged model, "
                "as an ensemble (instead of MODEL_URIs).",
            ),
            click.option("--search", "search_name", help="The search whose trials --top-k takes."),
            click.option(
                "--metric",
                default="val_miou",
                show_default=True,
                help="Metric that ranks the trials for --top-k.",
            ),
            click.option(
                "--mode", type=click.Choice(["max", "min"]), default="max", show_default=True
            ),
        )
    ):
        command = option(command)
    return command


def _model_uris(
    given: tuple[str, ...],
    *,
    top_k: int | None,
    search_name: str | None,
    metric: str,
    mode: str,
    tracking_uri: str | None,
) -> list[str]:
    """The MODEL_URIs given, or those of --top-k K --search NAME; never both, never none."""
    from segsearch.serve.ensemble import top_models

    if (top_k is None) != (search_name is None):
        raise UserError("--top-k and --search go together")
    if top_k is None:
        if not given:
            raise UserError("give MODEL_URI (several for an ensemble), or --top-k K --search NAME")
        return list(given)
    if given:
        raise UserError("give either MODEL_URIs or --top-k/--search, not both")
    return top_models(search_name, top_k, metric=metric, mode=mode, tracking_uri=tracking_uri)


@main.command()
@click.argument("model_uris", nargs=-1, metavar="[MODEL_URI]...")
@click.argument("input_path", metavar="INPUT")
@click.argument("output")
@click.option("--overlay", is_flag=True, help="Also write OUTPUT/overlays/<name>.png.")
@_ensemble_options
@_inference_options
def predict(
    model_uris: tuple[str, ...],
    input_path: str,
    output: str,
    overlay: bool,
    top_k: int | None,
    search_name: str | None,
    metric: str,
    mode: str,
    batch_size: int,
    device: str,
    tracking_uri: str | None,
) -> None:
    """Segment INPUT (image folder or dataset) with MODEL_URI; masks go to OUTPUT/masks.

    MODEL_URI: models:/NAME@alias, models:/NAME/VERSION, runs:/RUN_ID/model, or a checkpoint
    directory (local or s3://). Each mask is a PNG of class ids, the size of its image. Several
    MODEL_URIs (or --top-k K --search NAME) predict as an ensemble: the mean of their softmax
    probabilities at each image's own size.
    """
    from segsearch.serve.predict import predict as run_predict

    uris = _model_uris(
        model_uris,
        top_k=top_k,
        search_name=search_name,
        metric=metric,
        mode=mode,
        tracking_uri=tracking_uri,
    )
    count = run_predict(
        uris,
        input_path,
        output,
        overlay=overlay,
        batch_size=batch_size,
        device=device,
        tracking_uri=tracking_uri,
    )
    ensemble = f" (ensemble of {len(uris)} models)" if len(uris) > 1 else ""
    click.echo(f"wrote {count} masks to {output}{ensemble}")


@main.command()
@click.argument("model_uris", nargs=-1, metavar="[MODEL_URI]...")
@click.argument("dataset")
@click.option("--split", default="test", show_default=True, help="The dataset split to score.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@click.option(
    "--log/--no-log",
    default=True,
    show_default=True,
    help="Log the scores to the MLflow run that logged the model (models:/ and runs:/ URIs).",
)
@_ensemble_options
@_inference_options
def evaluate(
    model_uris: tuple[str, ...],
    dataset: str,
    split: str,
    as_json: bool,
    log: bool,
    top_k: int | None,
    search_name: str | None,
    metric: str,
    mode: str,
    batch_size: int,
    device: str,
    tracking_uri: str | None,
) -> None:
    """Score MODEL_URI on a split of DATASET at the images' own resolution.

    mIoU, per-class IoU, Dice and pixel accuracy, pixels of the dataset's ignore index left out.
    MODEL_URI: models:/NAME@alias, models:/NAME/VERSION, runs:/RUN_ID/model, or a checkpoint
    directory (local or s3://). A model from MLflow gets metrics <split>_miou, <split>_dice and
    <split>_pixel_acc on its run (val_native_miou … for val, whose val_miou training logs), and
    evaluation/<split>/confusion.png, per_class.csv and evaluation.json. Several MODEL_URIs (or
    --top-k K --search NAME) are scored as one ensemble, as `segsearch predict` runs it; an
    ensemble has no run, so it is not logged.
    """
    from segsearch.serve.evaluate import artifact_dir
    from segsearch.serve.evaluate import evaluate as run_evaluate

    uris = _model_uris(
        model_uris,
        top_k=top_k,
        search_name=search_name,
        metric=metric,
        mode=mode,
        tracking_uri=tracking_uri,
    )
    result = run_evaluate(
        uris,
        dataset,
        split=split,
        tracking_uri=tracking_uri,
        batch_size=batch_size,
        device=device,
        log=log,
    )
    if as_json:
        _emit(result.to_dict(), True)
        return
    click.echo(result.table())
    if result.run_id is not None:
        names = ", ".join(result.metrics())
        click.echo(f"logged to run {result.run_id}: {names}; files in {artifact_dir(split)}/")
    elif log and len(uris) > 1:
        click.echo("not logged: an ensemble has no MLflow run of its own")
    elif log:
        click.echo(f"not logged: {uris[0]} has no MLflow run (checkpoint folders have none)")


@main.command(name="export")
@click.argument("model_uri")
@click.argument("out")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["onnx", "torchscript", "pt2"]),
    help="File format (default: from OUT's suffix, .onnx, .pt or .pt2).",
)
@click.option("--dataset", help="Dataset whose images check the file (default: the model's own).")
@click.option(
    "--check-images",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="How many of its images (val split when it has one) the check runs.",
)
@click.option("--tracking-uri", help=MODEL_TRACKING_HELP)
def export_model(
    model_uri: str,
    out: str,
    fmt: str | None,
    dataset: str | None,
    check_images: int,
    tracking_uri: str | None,
) -> None:
    """Write MODEL_URI as one file OUT that takes uint8 images of any size, once it is checked.

    The file holds the whole predictor (resize, normalise, network, resize back, argmax): input
    `images` uint8 (N,H,W,C); outputs `masks` int64 (N,H,W) and `logits` float32 (N,K,H,W). It is
    run in its own runtime on real images against PyTorch and kept only when masks are equal on
    ≥ 99.9 % of the pixels and logits within 1e-3 + 1e-3·|logit|; otherwise exit 1, nothing
    written. ONNX needs the onnx extra: pip install 'segsearch[onnx]'.
    """
    from pathlib import PurePosixPath

    from segsearch.serve.export import FORMATS, ExportFailed, export

    suffixes = {suffix: name for name, suffix in FORMATS.items()}
    fmt = fmt or suffixes.get(PurePosixPath(out).suffix)
    if fmt is None:
        raise UserError(f"cannot tell the format from {out}: pass --format onnx|torchscript|pt2")
    try:
        done = export(
            model_uri,
            out,
            fmt=fmt,
            dataset=dataset,
            images=check_images,
            tracking_uri=tracking_uri,
        )
    except ExportFailed as err:
        click.echo(f"error: {err}; nothing written to {out}", err=True)
        sys.exit(EXIT_FAILED)
    click.echo(f"wrote {out} ({fmt}); checked on {done.dataset} ({done.split}):")
    click.echo(f"  {done.check.describe()}")


@main.command(name="reproduce")
@click.argument("run_id")
@click.option("--tracking-uri", help=TRACKING_HELP)
@click.option("--dataset", help="The trial's data at another path (it must have its fingerprint).")
@click.option("--storage", help="Where the rerun's checkpoints go (default: a temporary folder).")
def reproduce_trial(
    run_id: str, tracking_uri: str | None, dataset: str | None, storage: str | None
) -> None:
    """Train the trial of MLflow run RUN_ID again, alone, from its manifest; print both metrics.

    Same config, seed, workers and epochs, same data (checked by fingerprint), no early stopping.
    """
    from segsearch.reproduce import reproduce

    done = reproduce(run_id, tracking_uri=tracking_uri, dataset=dataset, storage=storage)
    click.echo(done.describe())
