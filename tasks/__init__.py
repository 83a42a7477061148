"""Benchmarks behind one contract: a module whose `TASK` subclasses `tasks.runner.Task` (its checks, data, training
phases, evaluation and artefacts); `tasks.runner.run_task` runs any of them."""
from importlib import import_module

TASKS = ("lm", "passkey", "booksum", "recall")
# Keys that were renamed: the old name stops a run with one line giving the new one.
RENAMED = {
    "task.warmup_steps": "task.local_warmup_steps (passkey's warm-up on local attention; trainer.warmup_steps is "
                         "the learning rate's)",
    "task.warmup_segment_len": "task.local_warmup_segment_len (the segment length of passkey's local warm-up)",
    "task.setting": "scale (tiny | paper; each model sets its own: scale=tiny on model=1b is the CPU check)",
    "model.scale": "scale (tiny | paper; each model sets its own: scale=paper on model=tiny takes the paper's values)",
}


def get_task(name: str) -> type:
    """The Task class of a registered task (a `tasks.runner.Task`), its module imported now."""
    from infini_bench.errors import check_choice

    check_choice("task", name, TASKS)
    return import_module(f"tasks.{name}").TASK
