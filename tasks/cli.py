"""What run.py does around Hydra: the command line checked before Hydra composes it (one line per bad key or
value), the run folder's name, lock and clean-up after a refused run, the note a run extended to more steps prints,
and the option lists of --help. Importing it registers the `run_folder` and `group_help` resolvers conf/ uses."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import NamedTuple

from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"


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
