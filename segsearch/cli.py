"""The `segsearch` command line: thin click wrappers over the Python API."""

from __future__ import annotations

import sys

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
