"""Every memory behind one contract (`base.Memory`, and `base.StackMemory` for one that changes the stack),
registered by name: `memory=<name>` on the command line.

Importing this package registers the built-in memories; `memory_names()` lists them for the configs, the
tests, the benchmark and the report. docs/EXTENDING.md says how to add one.
"""
from infini_bench.attention import Context
from infini_bench.memories.base import (MEMORIES, Footprint, Memory, StackMemory, memory_class, memory_names,
                                        register_memory, resolve_args)
from infini_bench.memories import infini, memorizing, rmt, txl  # noqa: F401  (registration)

__all__ = ["MEMORIES", "Context", "Footprint", "Memory", "StackMemory", "memory_class", "memory_names",
           "register_memory", "resolve_args"]
