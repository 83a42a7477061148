"""infini-bench command line: `python run.py task=passkey model=tiny memory=delta model.segment_len=64`.

Bad input (an unknown option, a bad value) gets one line naming the key and the accepted values, exit code 2,
and no results written.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import NamedTuple

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

CONF = Path(__file__).resolve().parent / "conf"


def short_name(path: str) -> str:
    """A checkpoint path as a few readable characters and a hash of the path: `1b-linear-3f2a9c1e` for
    outputs/continual/1b-linear/model.safetensors (its folder, since every export is model.safetensors)."""
    where = Path(path)
    readable = where.parent.name if where.stem == "model" and where.parent.name else where.stem
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", readable)[:24].strip("_.")
    digest = hashlib.sha256(path.encode()).hexdigest()[:8]
    return f"{readable}-{digest}" if readable else digest


def run_folder(overrides: list[str], exclude: list[str], kind: str = "run") -> str:
    """A run folder's name from its command line, as Hydra's override_dirname (the sorted key=value overrides,
    the excluded keys left out), with model.init_from shortened by short_name: a long path would make a name
    the file system refuses. The same command gives the same name, so a rerun resumes the same run.

    A plain run (`kind` run) leaves out a trainer.steps above 0 too: rerunning with more steps extends the run
    in its folder. A sweep's job (`kind` sweep) keeps it, so a sweep over steps makes one run per value; so does
    trainer.steps=0, an evaluation, which has no run to extend."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    items = []
    for override in OverridesParser.create().parse_overrides([str(o) for o in overrides]):
        line = override.input_line
        if override.key_or_group in exclude:
            continue
        if kind == "run" and override.key_or_group == "trainer.steps" and override.value() != 0:
            continue
        if override.key_or_group == "model.init_from" and override.value() is not None and not override.is_delete():
            line = f"{line.partition('=')[0]}={short_name(str(override.value()))}"
        items.append(line)
    return ",".join(sorted(items))


OmegaConf.register_new_resolver("run_folder", run_folder, replace=True)


def group_help(group: str) -> str:
    """For --help (conf/hydra/help/infini_bench.yaml): one line per option of a config group, its name and the
    first sentence of the comment its yaml file opens with (so an option describes itself where it is defined),
    cut at its first colon or semicolon outside brackets when it is longer than 100 characters."""
    paths = sorted((CONF / group).glob("*.yaml"))
    width = max((len(p.stem) for p in paths), default=0)
    lines = []
    for path in paths:
        comment = []
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            if not line.startswith("# @package"):
                comment.append(line.lstrip("#").strip())
        first = re.split(r"(?<=\.)\s+(?=[A-Z])", " ".join(comment), maxsplit=1)[0]  # not at `et al. 2022`
        if len(first) > 100:
            first = _head_clause(first)
        lines.append(f"  {path.stem:<{width}}  {first.rstrip('.')}".rstrip())
    return "\n".join(lines).replace("$", "$$")  # Hydra fills the help template with string.Template


def _head_clause(sentence: str) -> str:
    """A sentence up to its first `: ` or `; ` outside brackets (all of it when it has none)."""
    depth = 0
    for i, char in enumerate(sentence):
        depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(char, 0)
        if depth == 0 and sentence[i:i + 2] in (": ", "; "):
            return sentence[:i]
    return sentence


OmegaConf.register_new_resolver("group_help", group_help, replace=True)


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def hydra_args(argv: list[str]) -> argparse.Namespace:
    """The command line as Hydra reads it, with Hydra's own parser, so that the arguments of its flags
    (`-sc install=bash`, `--info defaults`, `-p trainer`) are never taken for overrides."""
    from hydra._internal.utils import get_args_parser  # what hydra.main parses sys.argv with

    return get_args_parser().parse_args(argv)


# Why the command line is checked here, before Hydra, rather than by Hydra's structured-config validation: Hydra
# reports a bad override in several lines (`Could not override 'trainer.stepz'.` then `To append to your config
# use +trainer.stepz=...`; `Error merging override trainer.lr=abc` with the reason in a chained exception),
# names neither the accepted keys nor the accepted values, and meets a bad sweep value only when its job starts,
# after the jobs before it ran. The checks below give one line naming the key and what it accepts, for every
# value of a sweep before any job; the values themselves are judged by the code that uses them (TrainConfig's
# __post_init__ for the trainer, by key) before W&B starts a run.
def check_overrides(overrides: list[str], multirun: bool) -> None:
    """Compose the config once before Hydra does, to turn its multi-line errors into one line.

    A sweep (`python run.py -m memory=linear,none model.segment_len=range(32,97,32)`) is checked one value at
    a time: every group choice it names must exist and the config must compose with each value. Values only a
    job can judge (a segment length the model rejects) the job checks, with the same one line. Sweeps the
    sweeper draws itself (`interval(...)`, for Optuna and the like) are left to it.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType
    from hydra.errors import HydraException

    overrides = [a for a in overrides if "=" in a and not a.startswith("hydra")]
    groups = {p.name: sorted(f.stem for f in p.glob("*.yaml")) for p in CONF.iterdir() if p.is_dir()}
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        fail(str(err).strip().splitlines()[0])
    fixed, sweeps = [], []  # sweeps: one list of single-valued overrides per swept key
    for arg, override in zip(overrides, parsed):
        key, prefix = override.key_or_group, arg[: len(arg) - len(arg.lstrip("+~"))]
        if not override.is_sweep_override():
            values, fixed = [arg.partition("=")[2]], fixed + [arg]
        elif not multirun:
            fail(f"{key}: {arg.partition('=')[2]!r} is a sweep; run it with -m (python run.py -m {arg})")
        elif override.value_type in (ValueType.CHOICE_SWEEP, ValueType.SIMPLE_CHOICE_SWEEP, ValueType.RANGE_SWEEP):
            values = list(override.sweep_string_iterator())
        elif override.value_type == ValueType.GLOB_CHOICE_SWEEP and key in groups:
            values = override.value().filter(groups[key])
        else:
            values = []
        if override.is_sweep_override() and values:
            sweeps.append([f"{prefix}{key}={v}" for v in values])
        for value in values if key in groups and not override.is_delete() else ():
            if value not in groups[key] and value != "null":
                fail(f"{key}={value!r} is not one of {', '.join(groups[key])}")
    firsts = [values[0] for values in sweeps]
    variants = [fixed + firsts] + [fixed + firsts[:i] + [v] + firsts[i + 1:]
                                   for i, values in enumerate(sweeps) for v in values[1:]]
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            for variant in variants:
                compose("config", overrides=variant)
    except HydraException as err:
        fail(str(err).strip().splitlines()[0])
    except Exception as err:  # e.g. an override that is not valid Hydra syntax
        fail(f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}")


def check_keys_and_run_dir(overrides: list[str], make_folder: bool) -> None:
    """Before Hydra starts: a misspelt key gets the valid ones listed, and, when the command runs a single job
    (`make_folder`: not a sweep, nor --cfg, --help or --info, which make no folder), a run folder that can't be
    made (a name over the file system's limit, a path through a file) gets one line instead of a traceback."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig as Hydra

    from tasks import RENAMED

    overrides = [a for a in overrides if "=" in a]
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            groups = [a for a in overrides if "." not in a.partition("=")[0]]  # task=lm, trainer=continual...
            known = OmegaConf.to_container(compose("config", overrides=groups), resolve=False)
            for arg in overrides:
                key = arg.partition("=")[0]
                if key.lstrip("+~") in RENAMED:
                    fail(f"{key.lstrip('+~')}: was renamed {RENAMED[key.lstrip('+~')]}")
                if key.startswith(("+", "~", "hydra")) or "." not in key:
                    continue
                group, _, field = key.partition(".")
                if isinstance(known.get(group), dict) and field.split(".")[0] not in known[group]:
                    fail(f"{key}: is not a {group} option; accepted: {', '.join(sorted(known[group]))}")
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
            Hydra.instance().set_config(cfg)
            run_dir = Path(str(cfg.hydra.run.dir))
    except Exception:  # noqa: BLE001 - check_overrides and Hydra report everything else
        return
    if not make_folder:
        return
    try:  # what the folder holds now (a name the file system refuses is reported below)
        hydra_dir = run_dir / ".hydra"
        _BEFORE[str(run_dir.resolve())] = Before(
            {p.name for p in run_dir.iterdir()} if run_dir.is_dir() else None,
            {p.name: p.read_bytes() for p in hydra_dir.iterdir() if p.is_file()} if hydra_dir.is_dir() else None)
    except OSError:
        pass
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_test.{os.getpid()}"  # one per process: torchrun ranks probe at once
        probe.touch()
        probe.unlink()
    except OSError as err:
        fail(f"hydra.run.dir: {str(run_dir)[:80]}{'...' if len(str(run_dir)) > 80 else ''} can't be written "
             f"({err.strerror or type(err).__name__}); pick a shorter or writable folder with hydra.run.dir=...")


_LOCK = []  # the open lock file, held until the process exits (a kill -9 releases it too)


class Before(NamedTuple):
    """A run folder before this run touched it, so that a refused run removes only what it created and puts
    back the .hydra/ files Hydra rewrote before main()."""

    names: set[str] | None  # what it held; None: it did not exist
    hydra: dict[str, bytes] | None  # the files of its .hydra/, when it had one


_BEFORE: dict[str, Before] = {}  # by resolved run folder


def _before(out_dir: Path) -> Before:
    return _BEFORE.get(str(out_dir.resolve()), Before(None, None))


def restore_hydra_files(out_dir: Path) -> None:
    """A refused run leaves .hydra/ as the earlier run left it (Hydra wrote the refused run's config there)."""
    saved = _before(out_dir).hydra
    if saved is None:
        return
    hydra_dir = out_dir / ".hydra"
    for path in hydra_dir.iterdir() if hydra_dir.is_dir() else ():
        if path.is_file() and path.name not in saved:
            path.unlink()
    hydra_dir.mkdir(exist_ok=True)
    for name, data in saved.items():
        tmp = hydra_dir / f".{name}.restore"
        tmp.write_bytes(data)
        os.replace(tmp, hydra_dir / name)


def lock_run_folder(out_dir: Path) -> None:
    """One run per folder: a second run into a folder in use stops with one line (and touches nothing there)."""
    import fcntl

    handle = open(out_dir / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        restore_hydra_files(out_dir)
        fail(f"hydra.run.dir: {out_dir} is in use by another run; wait for it to finish or pick another folder")
    _LOCK.append(handle)


def code_change(out_dir: Path) -> str:
    """', with the code at <commit>; the checkout is now at <commit>' when the finished run's results were made
    by another commit than the checkout's (its numbers may be stale), else ''."""
    from infini_bench.tracking import code_version

    try:
        then = json.loads((out_dir / "results.json").read_text()).get("environment", {}).get("git_commit")
    except (OSError, ValueError):
        return ""
    now, _ = code_version()
    if then and now and then != now:
        return f", with the code at {then[:10]}; the checkout is now at {now[:10]}"
    return ""


def extend(out_dir: Path, steps_done: int, tcfg, finished: bool) -> None:
    """Before a run set to `steps_done` steps is extended to tcfg.steps: keep its results so far, and say what
    the extension does with the learning rate (the schedule is laid over the new count of steps)."""
    import dataclasses
    import logging

    from infini_bench.train import lr_factor

    kept = ""
    if finished and (out_dir / "results.json").exists():
        os.replace(out_dir / "results.json", out_dir / f"results.step{steps_done}.json")
        kept = f"; its results after {steps_done} steps are kept as results.step{steps_done}.json"
    before = dataclasses.replace(tcfg, steps=steps_done)
    if all(lr_factor(i, before) == lr_factor(i, tcfg) for i in range(steps_done)):
        lr = (f"the learning-rate schedule is laid over {tcfg.steps} steps, and the first {steps_done} had the rate "
              f"a straight {tcfg.steps}-step run gives them, so this trains as that run would")
    else:
        lr = (f"the learning-rate schedule is recomputed for {tcfg.steps} steps: from step {steps_done + 1} on the "
              f"rate is a straight {tcfg.steps}-step run's, but the first {steps_done} followed the {steps_done}-step "
              f"schedule, so the weights and results differ from a straight {tcfg.steps}-step run's")
    for line in (f"extending the run in {out_dir} from {steps_done} to {tcfg.steps} training steps: training "
                 f"resumes from its last checkpoint{kept}", f"note: {lr}"):
        print(line)
        logging.getLogger("run").info(line)


def remove_if_only_hydra(out_dir: Path) -> None:
    """After a config error: remove what Hydra and the lock put in the run folder, if that is all this run put
    there, and the folder itself if this run made it. Nothing that was there before the run is touched."""
    before = _before(out_dir).names
    own = {".hydra", ".lock", "run.log"} - (before or set())
    if not out_dir.is_dir() or not {p.name for p in out_dir.iterdir()} <= own | (before or set()):
        return
    for name in own:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()
    if before is None:
        out_dir.rmdir()


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
    from tasks import get_task
    from tasks.runner import run_task

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
        task = get_task(cfg.task.name)
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
        from tasks.common import check_limit, train_config

        check_limit(cfg.task)
        tcfg = train_config(cfg)  # every trainer value, checked before W&B starts a run for a job that can't run
        task.check_values(cfg)
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
