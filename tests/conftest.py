"""Fixtures shared across the suite live in tests/fixtures/, one module per outside system."""

pytest_plugins = [
    "tests.fixtures.hub",
    "tests.fixtures.kafka",
    "tests.fixtures.model",
    "tests.fixtures.prometheus",
    "tests.fixtures.registry",
    "tests.fixtures.s3",
    "tests.fixtures.seed",
    "tests.fixtures.worker",
]

# Imported while the stack is shallow: hypothesis's pytest plugin otherwise imports it first in
# its terminal summary, where assertion rewriting it can fail on CPython 3.11 ("AST constructor
# recursion depth mismatch") when no collected test imported it (a subset run).
import hypothesis  # noqa: E402, F401
