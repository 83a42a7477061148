"""Benchmarks behind one contract: a module with `run_task(cfg, run) -> dict` of `split/metric` results, and
optionally `check_values(cfg)`, which names a bad task value before the run starts (before W&B)."""
from importlib import import_module

TASKS = ("lm", "passkey", "booksum")


def get_task(name: str):
    from infini_bench.errors import check_choice

    check_choice("task", name, TASKS)
    return import_module(f"tasks.{name}")
