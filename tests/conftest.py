"""Shared fixtures live in tests/fixtures/, one module per real service."""

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.ray_local",
    "tests.fixtures.ray_head",
    "tests.fixtures.ray_nodes",
    "tests.fixtures.mlflow_server",
]
