"""The fault suite's marker reaches every test here (so `pytest -m faults` runs them)."""


def test_fault_tests_carry_the_faults_marker(request) -> None:
    assert request.node.get_closest_marker("faults") is not None
