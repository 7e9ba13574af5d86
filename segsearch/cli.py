"""The `segsearch` command line: thin click wrappers over the Python API."""

from __future__ import annotations

import sys
import time

import click

from segsearch.errors import UserError


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
@click.argument("space_file", type=click.Path(dir_okay=False))
@click.option("--dataset", required=True, help="Dataset URI: a local folder or s3://bucket/prefix.")
@click.option("--name", help="Search name (default: the space's name); the MLflow experiment too.")
@click.option("--trials", type=click.IntRange(min=1), help="Override the space's trial count.")
@click.option("--epochs", type=click.IntRange(min=1), help="Override the epochs per trial.")
@click.option("--storage", help="Where Tune state and checkpoints go: a folder or s3:// URI.")
@click.option("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else local Ray).")
@click.option("--resume", is_flag=True, help="Continue an interrupted search of this name.")
def search(
    space_file: str,
    dataset: str,
    name: str | None,
    trials: int | None,
    epochs: int | None,
    storage: str | None,
    address: str | None,
    resume: bool,
) -> None:
    """Search the YAML space SPACE_FILE over a dataset; print the best trials."""
    from segsearch.search import run_search
    from segsearch.space import load_space

    spec = load_space(space_file).with_overrides(name=name, trials=trials, epochs=epochs)
    result = run_search(spec, dataset=dataset, storage=storage, resume=resume, address=address)
    _print_result(result)


@main.command()
@click.option("--trials", type=click.IntRange(min=1), help="Override the demo's trial count.")
@click.option("--epochs", type=click.IntRange(min=1), help="Override the epochs per trial.")
@click.option("--data", default="segsearch-data/demo", show_default=True, help="Demo dataset.")
@click.option("--storage", help="Where Tune state and checkpoints go (default ./segsearch-runs).")
def demo(trials: int | None, epochs: int | None, data: str, storage: str | None) -> None:
    """Run a real search on a built-in dataset with local Ray; print the best and worst trial."""
    from segsearch.data.demo import make_demo_dataset
    from segsearch.data.format import read_dataset_info
    from segsearch.search import run_search
    from segsearch.space import load_space, packaged_space

    try:
        read_dataset_info(data)
    except UserError:
        click.echo(f"writing the demo dataset to {data}")
        make_demo_dataset(data, size=(64, 64), overwrite=True)
    spec = load_space(packaged_space("demo.yaml"))
    name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    spec = spec.with_overrides(name=name, trials=trials, epochs=epochs)
    result = run_search(spec, dataset=data, storage=storage)
    _print_result(result)


def _print_result(result) -> None:
    click.echo(f"\n{result.table()}\n")
    if result.best_trial_id is None:
        raise UserError(f"search {result.name!r}: no trial reported {result.metric}")
    click.echo(
        f"best trial {result.best_trial_id}: {result.metric}={result.best_metric:.4f} "
        f"(worst {result.worst_metric:.4f})"
    )
    click.echo(f"best checkpoint: {result.best_checkpoint}")
