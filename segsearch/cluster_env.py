"""Run on the head before a search submitted with `segsearch submit --cluster-defaults`.

The search then takes SEGSEARCH_STORAGE and MLFLOW_TRACKING_URI from the cluster's environment;
without them (or with a relative path, or a SQLite store) its checkpoints and MLflow store would
land in the job's temporary working directory and vanish with it. Fails in one line, exit 2.
"""

from __future__ import annotations

import os
import sys

from segsearch.errors import UserError
from segsearch.jobs import check_cluster_environment


def main(names: list[str]) -> int:
    try:
        check_cluster_environment(names, os.environ)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
