"""Every test in tests/faults/ injects a fault or a misuse into real components: marked `faults`,
so the default suite skips them and `pytest -m faults` (run by .ci/run) takes them all."""

from __future__ import annotations

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/faults/" in item.path.as_posix():
            item.add_marker(pytest.mark.faults)
