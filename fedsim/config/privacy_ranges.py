"""Range checks of privacy settings shared by the config checks and the privacy functions (no heavy imports; in
config/ so that the config checks need nothing from the layers above)."""

from __future__ import annotations


def delta_problem(delta: float) -> str | None:
    """The problem line for a ``privacy.delta`` outside (0, 1), or None when it is in range."""
    if 0 < delta < 1:
        return None
    return f"privacy.delta must be in (0, 1) (got {delta}); use e.g. 1e-5, below 1 / N for the smallest client"
