"""Multi-GPU training from PyTorch's own pieces: torchrun, FSDP2 `fully_shard`, collectives.

Thin wrappers, applied to an unchanged model (torchtitan's layout): each `Block` is its own FSDP unit,
optionally activation-checkpointed and compiled; the root unit holds `embed`, `norm` and `lm_head`, so a
tied embedding and head stay one parameter. Checkpoints of the sharded model, which resume at any world size,
are `infini_bench/checkpoint.py`'s.

Launch: `torchrun --nproc_per_node=N run.py ...`; without torchrun everything runs as a single process.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh

from infini_bench.attention import attention_backends

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
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPU); a plain single process otherwise.
    Either way without SDPA's cuDNN backend (`attention_backends`)."""
    attention_backends()
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
