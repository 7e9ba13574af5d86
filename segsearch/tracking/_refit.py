"""What the tracker needs to know while a search's best configurations are trained again."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from segsearch.tracking.tags import REFIT_OF, REFIT_ON, REFIT_RANK, ROLE

#: The refit run's own record of the search score that chose its configuration.
SEARCH_SCORE_PREFIX = "search_"


@dataclass(frozen=True)
class RefitPhase:
    """The refit's settings and its sources: (search trial id, its config, its search score),
    best first. A refit trial is matched to its source by its config (Tune passes it as given)."""

    epochs: int
    on: str
    sources: tuple[tuple[str, Mapping[str, Any], float | None], ...]

    @property
    def held_out(self) -> bool:
        """Whether val stayed out of training, so the refit's val scores mean something."""
        return self.on == "train"

    def rank_of(self, config: Mapping[str, Any]) -> int | None:
        """1 for the search's best configuration, …; None for a config not among the sources."""
        for rank, (_, source, _) in enumerate(self.sources, start=1):
            if dict(source) == dict(config):
                return rank
        return None

    def tags_for(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The refit run's tags: its role, source trial, rank and training splits."""
        rank = self.rank_of(config)
        tags: dict[str, Any] = {ROLE: "refit", REFIT_ON: self.on}
        if rank is not None:
            tags.update({REFIT_OF: self.sources[rank - 1][0], REFIT_RANK: rank})
        return tags

    def search_score(self, config: Mapping[str, Any]) -> float | None:
        rank = self.rank_of(config)
        return None if rank is None else self.sources[rank - 1][2]
