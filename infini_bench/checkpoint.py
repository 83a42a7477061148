"""Checkpoints, in one place: save, load, checksums, the atomic swap, crash recovery, and the config a run had.

Nothing else reads or writes a checkpoint's files. A checkpoint is a torch.distributed.checkpoint (DCP) folder
keyed by parameter name, so a run saved on N GPUs (FSDP2) resumes on M GPUs, or in one process without FSDP;
`extra.json` beside the shards holds the step, the trainer, the summary so far and the run's config, and
`checksums.json` the sha256 of every file. `Checkpointer` is one training phase's `<folder>/last`, what the
trainer saves and resumes; the run-folder functions at the end serve run.py before a run starts.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from infini_bench.distributed import barrier, is_distributed, is_main_process
from infini_bench.errors import ConfigError
from infini_bench.faults import fault
from infini_bench.files import atomic_write_text

if TYPE_CHECKING:
    from infini_bench.tracking import Run


@contextmanager
def _single_process_ok() -> Iterator[None]:
    """DCP warns on every single-process save and load; here that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    return state


FOLDER = "checkpoints"  # in a run folder: the main phase's `last`, and a subfolder per earlier phase
# What a checkpoint holds beside its shards: the step, the trainer, the summary, the run's config.
EXTRA = "extra.json"
# Every checkpoint file's sha256, written last: a folder with this file is complete, and loading checks it.
MANIFEST = "checksums.json"
# What a DCP `.metadata` pickle may name: its own dataclasses, torch's sizes, dtypes and layouts, paths.
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata", "BytesStorageMetadata",
        "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo", "_StoragePrefix"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


def _corrupt(directory: Path, what: str) -> Exception:
    return ConfigError("trainer.resume", f"the checkpoint {directory} {what}; trainer.resume=false starts over")


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles only the classes a checkpoint's metadata is made of; anything else could run code."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def read_metadata(directory: str | Path) -> Any:
    """A checkpoint's DCP metadata, through the restricted unpickler (plain pickle runs whatever it names)."""
    from torch.distributed.checkpoint.metadata import StorageMeta

    path = Path(directory) / ".metadata"
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as err:
        raise _corrupt(Path(directory), f"has a .metadata that names {err}, which no checkpoint holds; "
                       "refusing to load it") from None
    except (OSError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise _corrupt(Path(directory), f"has an unreadable .metadata ({type(err).__name__})") from None
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    return metadata


def _reader(directory: Path):
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        """DCP's file reader, with the metadata read through the restricted unpickler."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = read_metadata(directory)
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(directory)


def _planner(directory: Path):
    """DCP's load planner, with every non-tensor entry (the optimizer's lr, betas, group names...) read by
    torch.load(weights_only=True): plain numbers, strings and containers, never an object that runs code."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner.load_bytes uses
    from torch.distributed.checkpoint.planner import ReadItem

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
            try:
                loaded = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as err:
                named = re.search(r"GLOBAL ([\w.]+)", str(err))
                raise _corrupt(directory, f"holds a non-tensor entry {read_item.dest_index.fqn} that is not plain "
                               f"data (it names {named.group(1) if named else 'an object'}); refusing to load it"
                               ) from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return SafePlanner()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _checksums(folder: Path, names: list[str]) -> dict[str, str]:
    """sha256 of the named files; under torchrun each rank hashes a share of them (a collective)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)
    mine = {name: _sha256(folder / name) for name in sorted(names)[rank::world]}
    if world == 1:
        return mine
    shares: list[dict[str, str] | None] = [None] * world
    dist.all_gather_object(shares, mine)
    return {k: v for share in shares for k, v in share.items()}


def verify_checkpoint(directory: str | Path) -> None:
    """Check every file of a checkpoint against its recorded sha256 (a collective under torchrun)."""
    directory = Path(directory)
    try:
        recorded = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        raise _corrupt(directory, f"has no readable {MANIFEST}") from None
    present = {p.name for p in directory.iterdir() if p.is_file()} - {MANIFEST}
    if present != set(recorded):
        raise _corrupt(directory, f"holds other files than {MANIFEST} lists")
    found = _checksums(directory, sorted(recorded))
    bad = sorted(name for name in recorded if found[name] != recorded[name])
    if bad:
        raise _corrupt(directory, f"is corrupt: {bad[0]} does not match its recorded checksum")


def recover_checkpoint(directory: str | Path) -> None:
    """Finish a checkpoint swap that a crash interrupted (a collective: every rank calls it).

    `save_checkpoint` writes `<last>.tmp` (its checksums last), renames `last` to `last.old`, `last.tmp` to
    `last`, then deletes `last.old`. Killed between the renames, `last` is missing: the newer complete folder
    takes its name. Killed during the deletion, `last.old` is left half-deleted beside a good `last`.
    """
    final = Path(directory)
    if is_main_process():
        found = complete_checkpoint(final)
        if found is not None and found != final:
            os.replace(found, final)
        if final.exists():
            shutil.rmtree(final.with_name(final.name + ".old"), ignore_errors=True)
    barrier()


def complete_checkpoint(directory: str | Path) -> Path | None:
    """The folder a resume from `directory` loads: `directory` itself, or, when a crash stopped a swap between its
    renames, the complete `.tmp` or `.old` that `recover_checkpoint` renames to it; None when there is none."""
    final = Path(directory)
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    if final.exists():
        return final
    if (tmp / MANIFEST).exists():
        return tmp
    return old if old.exists() else None


def save_checkpoint(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    extra: dict | None = None) -> None:
    """Every rank writes its shards to a DCP folder; `extra` (step, data position...) goes to extra.json.

    Written to `<directory>.tmp`, with the sha256 of every file in checksums.json, and swapped in when
    complete, so a crash never leaves a half checkpoint (`recover_checkpoint` finishes an interrupted swap).
    """
    import torch.distributed.checkpoint as dcp

    final = Path(directory)
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    with _single_process_ok():
        dcp.save(_state(model, optimizer), checkpoint_id=str(tmp), no_dist=not is_distributed())
    barrier()
    if is_main_process():
        atomic_write_text(tmp / EXTRA, json.dumps(extra or {}, indent=1))
    barrier()
    sums = _checksums(tmp, [p.name for p in tmp.iterdir() if p.is_file()])
    if is_main_process():
        atomic_write_text(tmp / MANIFEST, json.dumps(sums, indent=1, sort_keys=True))
        shutil.rmtree(old, ignore_errors=True)  # left by a crash during an earlier clean-up
        if final.exists():
            os.replace(final, old)
            fault("between_checkpoint_renames")
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def load_checkpoint(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
                    ) -> dict:
    """Restore model (and optimizer) in place from a DCP folder written at any world size; returns `extra`.

    The files are checked against their recorded checksums first. A parameter that never had a gradient
    (the gate with memory=none) has no optimizer state in the checkpoint, and gets none here either.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, set_model_state_dict, set_optimizer_state_dict,
    )

    directory = Path(directory)
    verify_checkpoint(directory)
    state = _state(model, optimizer)
    if optimizer is not None:
        stored = read_metadata(directory).state_dict_metadata
        prefixes = {key.rsplit(".", 1)[0] for key in stored if key.startswith("optim.state.")}
        state["optim"]["state"] = {name: s for name, s in state["optim"]["state"].items()
                                   if f"optim.state.{name}" in prefixes}
    with _single_process_ok():
        try:
            dcp.load(state, storage_reader=_reader(directory), planner=_planner(directory),
                     no_dist=not is_distributed())
        except dcp.api.CheckpointException as err:  # a BaseException that wraps each rank's error
            refused = [exc for exc, _ in err.failures.values() if isinstance(exc, ConfigError)]
            if refused:
                raise refused[0] from None
            raise
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        # strict=False lets those parameters go without state; every state the checkpoint has is still loaded.
        set_optimizer_state_dict(model, optimizer, state["optim"], options=StateDictOptions(strict=False))
    return json.loads((directory / EXTRA).read_text())



class Checkpointer:
    """One training phase's checkpoint, `<folder>/last`: what the trainer saves, resumes from and reports."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / "last"

    @classmethod
    def of_run(cls, out_dir: str | Path, phase: str | None = None) -> Checkpointer:
        """A run folder's checkpointer: the main phase's, or a named earlier phase's (passkey's warm-up)."""
        folder = Path(out_dir) / FOLDER
        return cls(folder / phase if phase else folder)

    def recover(self) -> None:
        """Finish a swap a crash interrupted, before looking for the checkpoint (a collective)."""
        recover_checkpoint(self.path)

    def exists(self) -> bool:
        """Whether there is a checkpoint to resume from (after `recover`)."""
        return self.path.exists()

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, trainer: dict,
             summary: dict[str, float] | None = None, run: Run | None = None) -> None:
        """Every rank writes its shards (a collective); step, trainer, the summary so far, and the run's config
        and count of logged metric rows (so a resume drops the rows logged after it) go to extra.json."""
        extra = {"step": step, "trainer": trainer, "summary": summary or {}}
        if run is not None:
            extra.update(config=run.config, metrics_rows=run.metrics_rows())
        save_checkpoint(self.path, model, optimizer, extra=extra)

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
        """Restore model (and optimizer) in place, from a checkpoint saved on any number of GPUs; returns extra."""
        return load_checkpoint(self.path, model, optimizer)

    def complete_step(self) -> int | None:
        """The step of the last complete checkpoint, the one a resume loads even when a crash stopped a swap
        between its renames; None before the first."""
        found = complete_checkpoint(self.path)
        return None if found is None else json.loads((found / EXTRA).read_text())["step"]


def recover_run(out_dir: str | Path) -> None:
    """Finish every checkpoint swap a crash interrupted in a run folder, of every phase (a collective)."""
    for last in sorted({p.with_name("last") for p in Path(out_dir).glob(f"{FOLDER}/**/last*")}):
        recover_checkpoint(last)


def has_checkpoint(out_dir: str | Path) -> bool:
    """Whether a run folder holds a checkpoint of any phase, mid-swap ones included."""
    return any(Path(out_dir).glob(f"{FOLDER}/**/{EXTRA}"))


# Keys that may change between a run and its resume: they do not change what is trained.
_MAY_CHANGE = ("trainer.resume", "trainer.progress", "logger", "device", "cache_dir", "hydra")
# Names of the scale choice, not values (a run stored with task.setting and presets resumes under scale).
_MAY_CHANGE += ("scale", "model.scale", "task.setting", "task.presets", "trainer.setting", "trainer.presets")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def stored_config(out_dir: Path) -> tuple[dict | None, bool]:
    """The config an earlier run in this folder used (from results.json, else a checkpoint), and whether that
    run finished."""
    checkpoints = sorted(out_dir.glob(f"{FOLDER}/**/{EXTRA}"))
    sources = [(out_dir / "results.json", True)] + [(p, False) for p in checkpoints]
    for path, finished in sources:
        if path.exists():
            try:
                config = json.loads(path.read_text()).get("config")
            except ValueError:
                raise ConfigError("trainer.resume", f"{path} is corrupt; trainer.resume=false starts over") from None
            if config is not None:
                return config, finished
    return None, False


def check_same_config(config: dict, stored: dict, out_dir: Path) -> int | None:
    """Resuming a folder with another config would mix two runs: refuse, naming what differs. A larger
    trainer.steps alone is an extension: the steps the run had are returned, and it trains on to the new count
    (not when task.train_segments or trainer.time_budget_s decides the length instead)."""
    now, then = _flat(config), _flat(stored)
    differ = sorted(k for k in set(now) | set(then)
                    if now.get(k) != then.get(k) and not k.startswith(_MAY_CHANGE))
    length_set_elsewhere = now.get("task.train_segments") is not None or now.get("trainer.time_budget_s") is not None
    counts = (now.get("trainer.steps"), then.get("trainer.steps"))
    if differ == ["trainer.steps"] and not length_set_elsewhere and all(type(n) is int for n in counts):
        if now["trainer.steps"] > then["trainer.steps"]:
            return then["trainer.steps"]
        raise ConfigError("trainer.steps", f"{now['trainer.steps']} is fewer than the {then['trainer.steps']} steps "
                          f"of the run in {out_dir}: a run can be extended (a larger trainer.steps), not shortened; "
                          "trainer.resume=false starts it over, or pick another hydra.run.dir")
    if differ:
        more = f" (and {len(differ) - 1} more)" if len(differ) > 1 else ""
        raise ConfigError(differ[0], f"{now.get(differ[0])!r} differs from {then.get(differ[0])!r}, which the run in "
                          f"{out_dir} used{more}; trainer.resume=false starts it over, or pick another hydra.run.dir")
