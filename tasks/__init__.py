"""Benchmarks behind one contract: a module with `run_task(cfg, run) -> dict` of `split/metric` results, and
optionally `check_values(cfg)`, which names a bad task value before the run starts (before W&B)."""
from importlib import import_module

TASKS = ("lm", "passkey", "booksum")
# Keys that were renamed: the old name stops a run with one line giving the new one.
RENAMED = {
    "task.warmup_steps": "task.local_warmup_steps (passkey's warm-up on local attention; trainer.warmup_steps is "
                         "the learning rate's)",
    "task.warmup_segment_len": "task.local_warmup_segment_len (the segment length of passkey's local warm-up)",
    "task.setting": "scale (tiny | paper; each model sets its own: scale=tiny on model=1b is the CPU check)",
    "model.scale": "scale (tiny | paper; each model sets its own: scale=paper on model=tiny takes the paper's values)",
}


def get_task(name: str):
    from infini_bench.errors import check_choice

    check_choice("task", name, TASKS)
    return import_module(f"tasks.{name}")
