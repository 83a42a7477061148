"""Fault injection for the tests: `INFINI_BENCH_FAULT=<point>` kills the process at that named point
(`INFINI_BENCH_FAULT_SIGNAL=TERM` sends SIGTERM instead, as a scheduler's preemption does).

The points sit where a crash is hardest to recover from (between the renames of a checkpoint swap, say), so
the tests can kill a run exactly there instead of guessing with timers. Unset, `fault()` does nothing.
"""
from __future__ import annotations

import os
import signal

ENV = "INFINI_BENCH_FAULT"
SIGNAL_ENV = "INFINI_BENCH_FAULT_SIGNAL"


def fault(point: str) -> None:
    """SIGKILL this process if INFINI_BENCH_FAULT names `point`: no clean-up runs, as in a real crash."""
    if os.environ.get(ENV) == point:
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get(SIGNAL_ENV, "KILL")))
