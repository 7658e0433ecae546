"""Shared pytest fixtures and hooks.

Sections:
  1. Session hooks   - session-wide set-up (clean-up of lab namespaces left by crashed runs)
  2. Lab fixtures    - network-namespace "lab nodes" (netwatchd.lab.netns); need root
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from netwatchd.lab.netns import Lab, cleanup_stale

# ----------------------------------------------------------------------------------------------------
# 1. Session hooks
# ----------------------------------------------------------------------------------------------------


def pytest_sessionstart(session: pytest.Session) -> None:
    """Remove ``nwlab-*`` namespaces whose creating process is dead (interrupted earlier runs)."""
    if os.geteuid() == 0:
        cleanup_stale()


# ----------------------------------------------------------------------------------------------------
# 2. Lab fixtures
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A fresh :class:`Lab`, always closed (processes killed, namespaces deleted) after the test."""
    if os.geteuid() != 0:
        pytest.skip("lab namespaces need root")
    lab = Lab()
    try:
        yield lab
    finally:
        lab.close()
