"""The `segsearch` command line: thin click wrappers over the Python API."""

from __future__ import annotations

import shlex
import sys
import time

import click

from segsearch.errors import UserError

MODEL_TRACKING_HELP = "MLflow tracking URI for models:/ and runs:/ URIs."
TRACKING_HELP = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)."
#: Exit code of a search stopped by Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130


class _Group(click.Group):
    """Turns UserError into a one-line message on stderr and exit code 2, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="segsearch")
def main() -> None:
    """Search semantic-segmentation models with Optuna in Ray Tune, tracked in MLflow."""


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
        progress=True,
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
    "--refit",
    metavar="EPOCHS[:TOP_K[:ON]]",
    help="After the search, train its TOP_K best configurations (default 1) for EPOCHS on ON "
    "(train, the default, or train+val); overrides the space's refit.",
)
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
    refit: str | None,
) -> None:
    """Search the YAML space SPACE_FILE over a dataset; print the best trials."""
    from segsearch.search.tuner import SearchInterrupted, run_search
    from segsearch.space import load_space, parse_refit

    spec = load_space(space_file).with_overrides(
        name=name, trials=trials, epochs=epochs, refit=parse_refit(refit) if refit else None
    )
    try:
        result = run_search(
            spec,
            dataset=dataset,
            storage=storage,
            resume=resume,
            address=address,
            tracking_uri=tracking_uri,
            space_path=space_file,
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
            "--refit": refit,
        }
        _interrupted(space_file, options)
    _print_result(result)


@main.command()
@click.option("--trials", type=click.IntRange(min=1), help="Override the demo's trial count.")
@click.option("--epochs", type=click.IntRange(min=1), help="Override the epochs per trial.")
@click.option("--data", default="segsearch-data/demo", show_default=True, help="Demo dataset.")
@click.option("--storage", help="Where Tune state and checkpoints go (default ./segsearch-runs).")
@click.option("--tracking-uri", help=TRACKING_HELP)
def demo(
    trials: int | None, epochs: int | None, data: str, storage: str | None, tracking_uri: str | None
) -> None:
    """Run a real search on a built-in dataset with local Ray; print the best and worst trial."""
    from segsearch.data.demo import make_demo_dataset
    from segsearch.data.format import read_dataset_info
    from segsearch.search.tuner import SearchInterrupted, run_search
    from segsearch.space import load_space, packaged_space

    try:
        read_dataset_info(data)
    except UserError:
        click.echo(f"writing the demo dataset to {data}")
        make_demo_dataset(data, n_train=256, n_val=48, size=(48, 48), overwrite=True)
    space_path = packaged_space("demo.yaml")
    name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    spec = load_space(space_path).with_overrides(name=name, trials=trials, epochs=epochs)
    try:
        result = run_search(
            spec, dataset=data, storage=storage, tracking_uri=tracking_uri, space_path=space_path
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


def _print_result(result) -> None:
    click.echo(f"\n{result.table()}\n")
    failed = [trial for trial in result.trials if trial["error"] is not None]
    for trial in failed:
        click.echo(f"trial {trial['trial_id']} failed: {trial['error']}")
    if failed and len(failed) == len(result.trials):
        click.echo(f"error: all {len(failed)} trials failed ({failed[0]['error']})", err=True)
        sys.exit(1)
    if result.best_trial_id is None:
        raise UserError(f"search {result.name!r}: no trial reported {result.metric}")
    click.echo(
        f"best trial {result.best_trial_id}: {result.metric}={result.best_metric:.4f} "
        f"(worst {result.worst_metric:.4f})"
    )
    click.echo(f"best checkpoint: {result.best_checkpoint}")


_address_option = click.option(
    "--address",
    required=True,
    envvar="RAY_API_SERVER_ADDRESS",
    help="The cluster's dashboard, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS).",
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
        sys.exit(1)


@main.command()
@click.argument("job_id")
@_address_option
def status(job_id: str, address: str) -> None:
    """Show a submitted job's status."""
    from segsearch import jobs

    info = jobs.status(job_id, address=address)
    click.echo(f"job {job_id}: {info.status}")
    search_name = (info.metadata or {}).get("segsearch.search")
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
@click.option("--metric", default="val_miou", show_default=True, help="Metric that ranks trials.")
@click.option(
    "--mode",
    type=click.Choice(["max", "min"]),
    default="max",
    show_default=True,
    help="Whether a larger or a smaller metric is better.",
)
@click.option("--force", is_flag=True, help="Move the alias even to a model that scored worse.")
@click.option(
    "--tracking-uri",
    help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).",
)
def promote(
    search_name: str,
    model_name: str,
    alias: str,
    metric: str,
    mode: str,
    force: bool,
    tracking_uri: str | None,
) -> None:
    """Register the best finished trial of SEARCH_NAME in the MLflow Model Registry."""
    from segsearch.serve.promote import promote as run_promote

    done = run_promote(
        search_name,
        model_name=model_name,
        alias=alias,
        metric=metric,
        mode=mode,
        force=force,
        tracking_uri=tracking_uri,
    )
    click.echo(done.describe())


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


@main.command()
@click.argument("model_uri")
@click.argument("input_path", metavar="INPUT")
@click.argument("output")
@click.option("--overlay", is_flag=True, help="Also write OUTPUT/overlays/<name>.png.")
@_inference_options
def predict(
    model_uri: str,
    input_path: str,
    output: str,
    overlay: bool,
    batch_size: int,
    device: str,
    tracking_uri: str | None,
) -> None:
    """Segment INPUT (image folder or dataset) with MODEL_URI; masks go to OUTPUT/masks.

    MODEL_URI: models:/NAME@alias, models:/NAME/VERSION, runs:/RUN_ID/model, or a checkpoint
    directory (local or s3://). Each mask is a PNG of class ids, the size of its image.
    """
    from segsearch.serve.predict import predict as run_predict

    count = run_predict(
        model_uri,
        input_path,
        output,
        overlay=overlay,
        batch_size=batch_size,
        device=device,
        tracking_uri=tracking_uri,
    )
    click.echo(f"wrote {count} masks to {output}")


@main.command()
@click.argument("model_uri")
@click.argument("dataset")
@click.option("--split", default="test", show_default=True, help="The dataset split to score.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON, for scripts.")
@click.option(
    "--log/--no-log",
    default=True,
    show_default=True,
    help="Log the scores to the MLflow run that logged the model (models:/ and runs:/ URIs).",
)
@_inference_options
def evaluate(
    model_uri: str,
    dataset: str,
    split: str,
    as_json: bool,
    log: bool,
    batch_size: int,
    device: str,
    tracking_uri: str | None,
) -> None:
    """Score MODEL_URI on a split of DATASET at the images' own resolution.

    mIoU, per-class IoU, Dice and pixel accuracy, pixels of the dataset's ignore index left out.
    MODEL_URI: models:/NAME@alias, models:/NAME/VERSION, runs:/RUN_ID/model, or a checkpoint
    directory (local or s3://). A model from MLflow gets metrics <split>_miou, <split>_dice and
    <split>_pixel_acc on its run (val_native_miou … for val, whose val_miou training logs), and
    evaluation/<split>/confusion.png, per_class.csv and evaluation.json.
    """
    import json

    from segsearch.serve.evaluate import artifact_dir
    from segsearch.serve.evaluate import evaluate as run_evaluate

    result = run_evaluate(
        model_uri,
        dataset,
        split=split,
        tracking_uri=tracking_uri,
        batch_size=batch_size,
        device=device,
        log=log,
    )
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    click.echo(result.table())
    if result.run_id is not None:
        names = ", ".join(result.metrics())
        click.echo(f"logged to run {result.run_id}: {names}; files in {artifact_dir(split)}/")
    elif log:
        click.echo(f"not logged: {model_uri} has no MLflow run (checkpoint folders have none)")
