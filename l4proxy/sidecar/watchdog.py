"""What the supervisor's watchdog and a ``--single-process`` run's own
share (Supervisor._watchdog, run._watch_alone and the stop's deadline): one
place, so the two keep the same cadence and the same deadline."""

from __future__ import annotations

# past --drain-duration, what a stopping worker gets to close before it is
# killed (the supervisor) or exits 1 (--single-process)
DRAIN_GRACE_S = 10.0


def check_interval(timeout: float) -> float:
    """How often a watchdog of *timeout* (``--watchdog-timeout``, > 0) checks:
    a fifth of it, 0.2 s at least."""
    return max(0.2, timeout / 5)
