"""Where a trial's Train workers run. Each worker reports its node with its metrics (the trial's
report joins them, `failover.TrialReport`), and its placement group: the workaround for groups
Ray Train leaves behind has both halves here, the report and a Tune callback on the driver that
removes the group when the trial ends.

Ray Train removes a run's group through a cleaner actor that needs the state API (the
dashboard); on a local instance without one, or beside another Ray instance, it never does, and
the CPUs of every trial that Tune stopped (ASHA) stay reserved until later trials cannot start.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.tune import Callback

#: The result key each Train worker reports its placement group under.
RESULT_KEY = "placement_group"
#: The result key each Train worker reports its Ray node id under.
NODE_KEY = "node_id"


def current_node_id() -> str:
    """The Ray node this worker runs on (hex id)."""
    return ray.get_runtime_context().get_node_id()


def current_group_id() -> str | None:
    """This Train run's placement group (hex id), for the search to release if Tune stops it."""
    from ray.util import get_current_placement_group

    group = get_current_placement_group()
    return group.id.hex() if group else None


class ReleasePlacementGroups(Callback):
    """Frees the Train workers' placement group of a trial that Tune stopped (ASHA) or lost."""

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _release((trial.last_result or {}).get(RESULT_KEY))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _release((trial.last_result or {}).get(RESULT_KEY))


def _release(group_id: str | None) -> None:
    from ray.util.placement_group import (
        PlacementGroup,
        placement_group_table,
        remove_placement_group,
    )

    if group_id and placement_group_table().get(group_id, {}).get("state") == "CREATED":
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id))))
