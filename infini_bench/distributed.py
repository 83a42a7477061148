"""Multi-GPU training from PyTorch's own pieces: torchrun, FSDP2 `fully_shard`, distributed checkpoints.

Thin wrappers, applied to an unchanged model (torchtitan's layout): each `Block` is its own FSDP unit,
optionally activation-checkpointed and compiled; the root unit holds `embed`, `norm` and `lm_head`, so a
tied embedding and head stay one parameter. Checkpoints are torch.distributed.checkpoint (DCP) folders
keyed by parameter name, so a run saved on N GPUs resumes on M GPUs, or in one process without FSDP.

Launch: `torchrun --nproc_per_node=N run.py ...`; without torchrun everything runs as a single process.
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
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh

T = TypeVar("T")

try:  # public since torch 2.6
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
except ImportError:  # torch 2.5
    from torch.distributed._composable.fsdp import (
        FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method,
    )


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank among world_size, its GPU (or the CPU)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPU); a plain single process otherwise."""
    if "WORLD_SIZE" not in os.environ:
        return DistInfo(0, 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():  # device_id binds NCCL to this GPU at once (no "device unknown" barriers)
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return DistInfo(rank, world, local, device)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def shard_model(
    model: nn.Module,
    *,
    param_dtype: torch.dtype | None = torch.bfloat16,
    reduce_dtype: torch.dtype | None = torch.float32,
    activation_checkpointing: bool = True,
    compile: bool = False,
) -> nn.Module:
    """FSDP2 in place: per block (checkpointed, compiled if asked), then the root; returns the model.

    param_dtype is what forward and backward compute in (None: the parameters' own dtype); the sharded
    master weights and the optimizer state keep the parameters' dtype (load them in fp32). Leave the model's
    own `cfg.activation_checkpointing` off: the wrapper here does that job.
    """
    if not is_distributed():
        raise RuntimeError("shard_model needs a process group: launch with torchrun and call init_distributed()")
    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    # forward() and the blocks take the fp32 memory state (M, z): never cast inputs
    # (docs/PAPER_NOTES.md, pitfall 4).
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    compile = compile and model.prepare_compile()
    for i, block in enumerate(model.layers):
        if activation_checkpointing:  # state-dict keys are unchanged: the wrapper strips its own prefix
            block = checkpoint_wrapper(block)
        if compile:
            block.compile()  # in place, so parameter names keep no `_orig_mod.` prefix
        fully_shard(block, mesh=mesh, mp_policy=mp)
        model.layers[i] = block
    fully_shard(model, mesh=mesh, mp_policy=mp)
    register_fsdp_forward_method(model, "hidden")  # `train.lm_loss` calls hidden(), not forward()
    return model


@contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """The whole model as a plain replica on every rank, for inference code that calls submodules directly
    (the cached decoding steps): a collective, so every rank enters it and runs the same calls. The replica
    is fp32 like the sharded master weights and is freed on exit; without FSDP, the model itself."""
    if not any(isinstance(m, FSDPModule) for m in model.modules()):
        yield model
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))  # whole, on every rank
    with torch.device("meta"):  # no second copy: the replica takes the gathered tensors themselves
        replica = type(model)(model.cfg)
    replica.load_state_dict(state, assign=True)
    del state
    if model.cfg.tie_embeddings:
        replica.lm_head.weight = replica.embed.weight
    replica.rotary.inv_freq = model.rotary.inv_freq.clone()  # a non-persistent buffer: not in the state dict
    device = replica.embed.weight.device
    replica.train(model.training)
    try:
        yield replica
    finally:
        del replica
        if device.type == "cuda":
            torch.cuda.empty_cache()


def all_reduce_mean(x: Tensor) -> Tensor:
    """The mean of x over ranks (x itself in a single process)."""
    if not is_distributed():
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / dist.get_world_size()


def all_reduce_max(x: Tensor) -> Tensor:
    """The largest x over ranks (x itself in a single process)."""
    if not is_distributed():
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def all_finite(tensors: list[Tensor]) -> list[bool]:
    """Whether each tensor is finite everywhere, on every rank (one collective under torchrun)."""
    if not tensors:
        return []
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]  # an FSDP shard: this rank's part
    bad = torch.stack([(~torch.isfinite(t.detach())).any() for t in local]).float()
    return [not b for b in all_reduce_max(bad).tolist()]


def full_tensor(x: Tensor) -> Tensor:
    """A DTensor (an FSDP parameter, a gradient norm from clip_grad_norm_) gathered whole; other tensors as is."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def is_main_process() -> bool:
    return not is_distributed() or dist.get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


_WAIT_GROUPS: dict[float, Any] = {}


def _wait_group(timeout_h: float):
    """One gloo group per timeout, made by every rank at its first main_first (a collective, so in the same
    order everywhere) and kept until cleanup(). Destroying it after each broadcast let rank 0 tear it down
    while a slower rank was still receiving, which aborted that rank."""
    if timeout_h not in _WAIT_GROUPS:
        _WAIT_GROUPS[timeout_h] = dist.new_group(backend="gloo", timeout=timedelta(hours=timeout_h))
    return _WAIT_GROUPS[timeout_h]


def main_first(fn: Callable[[], T], timeout_h: float = 12.0) -> T | None:
    """Run fn on rank 0 only while the other ranks wait, for hours if need be (streaming a data set from the hub
    outlasts NCCL's timeout, so the wait is on a CPU group). Every rank gets rank 0's result or, if fn raised,
    its exception; returns None on ranks other than 0, which then read what rank 0 wrote."""
    if not is_distributed():
        return fn()
    group = _wait_group(timeout_h)
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - handed to every rank below
            error = err
    message = [error]
    dist.broadcast_object_list(message, src=0, group=group)
    if message[0] is not None:
        raise message[0]
    return result


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()  # every group, main_first's too
    _WAIT_GROUPS.clear()


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
    from infini_bench.errors import ConfigError

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

    from infini_bench.faults import fault
    from infini_bench.files import atomic_write_text

    final = Path(directory)
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    with _single_process_ok():
        dcp.save(_state(model, optimizer), checkpoint_id=str(tmp), no_dist=not is_distributed())
    barrier()
    if is_main_process():
        atomic_write_text(tmp / "extra.json", json.dumps(extra or {}, indent=1))
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
            from infini_bench.errors import ConfigError

            refused = [exc for exc, _ in err.failures.values() if isinstance(exc, ConfigError)]
            if refused:
                raise refused[0] from None
            raise
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        # strict=False lets those parameters go without state; every state the checkpoint has is still loaded.
        set_optimizer_state_dict(model, optimizer, state["optim"], options=StateDictOptions(strict=False))
    return json.loads((directory / "extra.json").read_text())
