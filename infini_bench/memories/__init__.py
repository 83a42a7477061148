"""Every memory behind one contract (`base.Memory`, and `base.StackMemory` for one that changes the stack),
registered by name: `memory=<name>` on the command line.

Importing this package registers the built-in memories; `memory_names()` lists them, in `MEMORY_ORDER`, for the
configs, the tests, the benchmark and the report. docs/EXTENDING.md says how to add one.
"""
from infini_bench.attention import Context
from infini_bench.memories.base import (MEMORIES, MEMORY_ORDER, Footprint, Memory, StackMemory, memory_class,
                                        memory_names, register_memory, resolve_args)
from infini_bench.memories import infini, memorizing, rmt, txl  # noqa: F401  (registration)

__all__ = ["MEMORIES", "MEMORY_ORDER", "Context", "Footprint", "Memory", "StackMemory", "memory_class",
           "memory_names", "register_memory", "resolve_args"]
