"""Fault injection for the tests: `INFINI_BENCH_FAULT=<point>` kills the process at that named point
(`INFINI_BENCH_FAULT_SIGNAL=TERM` sends SIGTERM instead, as a scheduler's preemption does, `INT` SIGINT, as
Ctrl-C does; `RAISE` raises InjectedFault, an unexpected error with its traceback, as a bug would, once per
process, so that a sweep's next job goes through).

The points sit where a crash is hardest to recover from (between the renames of a checkpoint swap, say), so
the tests can kill a run exactly there instead of guessing with timers. Unset, `fault()` does nothing.
"""
from __future__ import annotations

import os
import signal

ENV = "INFINI_BENCH_FAULT"
SIGNAL_ENV = "INFINI_BENCH_FAULT_SIGNAL"


class InjectedFault(RuntimeError):
    """The error INFINI_BENCH_FAULT_SIGNAL=RAISE raises: not one a user can act on, so it keeps its traceback."""


def fault(point: str) -> None:
    """If INFINI_BENCH_FAULT names `point`: SIGKILL this process (no clean-up runs, as in a real crash), send it
    the signal INFINI_BENCH_FAULT_SIGNAL names, or raise InjectedFault."""
    if os.environ.get(ENV) != point:
        return
    how = os.environ.get(SIGNAL_ENV, "KILL")
    if how == "RAISE":
        del os.environ[ENV]
        raise InjectedFault(f"injected at {point} ({ENV})")
    os.kill(os.getpid(), getattr(signal, "SIG" + how))
