"""Fixtures of the cluster tests: one real Ray head for the session (tests/cluster/ray_head.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster.ray_head import Head, start_head


@pytest.fixture(scope="session")
def head() -> Iterator[Head]:
    """A one-node Ray cluster (4 CPUs: two 2-worker runs at once; dashboard on) started with ``ray start --head``;
    killed at the end."""
    with start_head(cpus=4) as h:
        yield h
