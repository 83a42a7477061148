"""infini-bench command line: `python run.py task=passkey model=tiny memory=delta model.segment_len=64`.

Bad input (an unknown option, a bad value) gets one line naming the key and the accepted values, exit code 2,
and no results written. The checks before Hydra starts and the run folder's lock and clean-up are in tasks/cli.py.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

# Importing tasks.cli registers the resolvers conf/ uses (run_folder, group_help).
from tasks.cli import (check_keys_and_run_dir, check_overrides, code_change, extend, fail, hydra_args,
                       lock_run_folder, remove_if_only_hydra, restore_hydra_files)


def hydra_info() -> dict:
    """What Hydra chose and was told, for W&B's config and the report: the group choices, the overrides, the
    command that reruns the run, and in a sweep the sweep's own arguments (W&B's group)."""
    hc = HydraConfig.get()
    info = {"choices": {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra")},
            "overrides": list(hc.overrides.task), "command": " ".join(["python run.py", *hc.overrides.task]),
            "mode": hc.mode.name if hc.mode is not None else "RUN"}
    if info["mode"] == "MULTIRUN":
        swept = [a for a in sys.argv[1:] if "=" in a and not a.startswith(("-", "hydra"))]
        info["sweep"] = " ".join(swept)[:120] if swept else hc.sweep.dir  # another launcher's argv is not ours
    return info


def print_results(out_dir: Path, config: dict) -> None:
    """The results table a run ends with, and a line to the log file."""
    import logging

    from infini_bench.report.tables import results_table

    text = results_table(json.loads((out_dir / "results.json").read_text()), out_dir)
    print(text)
    logging.getLogger("run").info("results: %s", out_dir / "results.json")


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    import torch

    from infini_bench.errors import ConfigError, check_int
    from infini_bench.tracking import Run
    from tasks.runner import check_run, run_task

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    if threading.current_thread() is threading.main_thread():  # training installs its own, graceful handler
        signal.signal(signal.SIGTERM, _terminate)
    try:
        OmegaConf.resolve(cfg)
        from infini_bench.checkpoint import check_same_config, has_checkpoint, recover_run, stored_config
        from infini_bench.distributed import init_distributed, is_main_process

        if os.environ.get("RANK", "0") == "0":
            lock_run_folder(out_dir)
        check_int("seed", cfg.seed)
        if cfg.device not in ("auto", "cpu", "cuda"):
            raise ConfigError("device", f"{cfg.device!r} is not one of auto, cpu, cuda")
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device", "'cuda' but no GPU is visible to torch; use device=cpu or device=auto")
        config = OmegaConf.to_container(cfg, resolve=True)
        config["hydra"] = hydra_info()
        info = init_distributed()  # torchrun: one process per GPU, each on its own device; else a no-op
        recover_run(out_dir)  # a swap a crash interrupted
        stored, finished = stored_config(out_dir)
        steps_done = None  # when a larger trainer.steps extends the run: the trainer.steps it had
        if cfg.trainer.resume and stored is not None:
            steps_done = check_same_config(config, stored, out_dir)
            history = list((stored.get("hydra") or {}).get("extended_from") or [])
            if steps_done is not None:
                history.append(steps_done)
            if history:  # results.json says which step counts the run was extended from
                config["hydra"]["extended_from"] = history
            if finished and steps_done is None:
                if is_main_process():
                    print(f"results: {out_dir / 'results.json'} (this run had finished{code_change(out_dir)}; "
                          "trainer.resume=false runs it again)")
                    sweep_outcome(out_dir, earlier=True)
                return
        elif not cfg.trainer.resume and (out_dir / "results.json").exists() and is_main_process():
            os.replace(out_dir / "results.json", out_dir / "results.previous.json")  # kept until the new one
        device = str(info.device) if info.world_size > 1 else (None if cfg.device == "auto" else cfg.device)
        tcfg = check_run(cfg)  # every value checked before W&B starts a run for a job that can't run
        if steps_done is not None and is_main_process():
            extend(out_dir, steps_done, tcfg, finished)
        run = Run(out_dir, config, dict(cfg.logger), device=device, is_main=info.is_main)
        if not has_checkpoint(out_dir):  # nothing to resume: every row is redone
            run.truncate_metrics(0, rows=0)
        results = run_task(cfg, run)
        run.finish(results)
        if run.is_main:
            print_results(out_dir, config)
            sweep_outcome(out_dir)
    except BaseException as err:  # noqa: BLE001 - what a user can act on gets one line, a bug its traceback
        line = error_line(err, out_dir)
        if line is not None and isinstance(err, ConfigError):
            restore_hydra_files(out_dir)  # a refused run leaves the folder as it found it
            remove_if_only_hydra(out_dir)  # never anything this run did not create
        if in_sweep() and not isinstance(err, _stops_a_sweep()):  # the sweep goes on to its next job
            if line is None:
                traceback.print_exc()
            message = line[0] if line is not None else f"{type(err).__name__}: {err}".splitlines()[0]
            print(f"error: {message}", file=sys.stderr)
            sweep_outcome(out_dir, error=message)
            return
        if line is None:
            raise
        fail(*line)


def in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_outcome(out_dir: Path, error: str | None = None, earlier: bool = False) -> None:
    """In a sweep (else nothing), this job's outcome for the table the sweep ends with (tasks/sweep.py): its
    error, or the main number of its results.json (`earlier`: a run that had finished before this sweep)."""
    if not in_sweep():
        return
    from infini_bench.report.tables import headline
    from tasks.sweep import record_outcome

    detail = error
    if error is None:
        record = json.loads((out_dir / "results.json").read_text())
        detail = ("finished earlier: " if earlier else "") + headline(record["config"], record["results"])
    hc = HydraConfig.get()
    record_outcome(int(hc.job.num), list(hc.overrides.task), error is None, detail, str(out_dir))


def _stops_a_sweep() -> tuple[type, ...]:
    """Errors that end a whole sweep, not just its job: the user stopping it."""
    from infini_bench.errors import Terminated
    from infini_bench.train import Interrupted

    return KeyboardInterrupt, SystemExit, Terminated, Interrupted


def _terminate(signum, frame) -> None:
    from infini_bench.errors import Terminated

    raise Terminated


def error_line(err: BaseException, out_dir: Path) -> tuple[str, int] | None:
    """The one line and exit code for an error the user can act on; None for anything else."""
    import torch

    from infini_bench.errors import ConfigError, ResourceError, Terminated
    from infini_bench.train import Interrupted, TrainingDiverged

    if isinstance(err, Terminated):
        return ("terminated (SIGTERM) outside training (setup, evaluation or export), before the results were "
                "written; rerun the same command: it resumes from the last checkpoint", 143)
    if isinstance(err, ConfigError):
        return str(err), 2
    if isinstance(err, (TrainingDiverged, ResourceError)):
        return str(err), 1
    if isinstance(err, Interrupted):
        return str(err), 130
    if isinstance(err, KeyboardInterrupt):
        return "interrupted; rerun the same command to resume from the last checkpoint", 130
    # the CPU allocator raises a RuntimeError, not OutOfMemoryError
    if isinstance(err, torch.OutOfMemoryError) or (isinstance(err, RuntimeError)
                                                   and "DefaultCPUAllocator: can't allocate memory" in str(err)):
        return ("trainer.batch_size: out of memory; lower trainer.batch_size (raise trainer.grad_accum to keep "
                "the batch), task.seq_len or model.segment_len, or set model.activation_checkpointing=true", 1)
    if isinstance(err, PermissionError) and str(err.filename or "").startswith(str(out_dir)):
        return f"hydra.run.dir: {err.filename} can't be written ({err.strerror}); pick a writable folder", 2
    return None


if __name__ == "__main__":
    args = hydra_args(sys.argv[1:])  # --version prints Hydra's and exits here
    if not (args.shell_completion or args.hydra_help or args.experimental_rerun):  # their arguments are no config
        multirun = args.multirun or "hydra.mode=MULTIRUN" in args.overrides
        job = not (args.help or args.cfg or args.info)  # those print, and run nothing
        check_keys_and_run_dir(args.overrides, make_folder=job and not multirun)
        check_overrides(args.overrides, multirun)
    main()
