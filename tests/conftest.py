"""Fixtures shared across the suite live in tests/fixtures/, one module per outside system."""

pytest_plugins = [
    "tests.fixtures.kafka",
    "tests.fixtures.model",
    "tests.fixtures.prometheus",
    "tests.fixtures.s3",
    "tests.fixtures.seed",
    "tests.fixtures.worker",
]
