"""Process groups and model wrapping, applied from outside the model.

``setup(device)`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), picks the device
(``cuda:LOCAL_RANK`` when CUDA is available and asked for, else the CPU) and initialises the process
group (nccl on CUDA, gloo on the CPU) when WORLD_SIZE > 1. ``wrap(model, env, fsdp)`` returns DDP, or
FSDP2 (``fully_shard`` on every repeated block and then on the root) when asked or when the fp32
model plus AdamW state (16 bytes per parameter) would not fit in 60 % of one GPU's memory. Under
FSDP2 with a bf16 compute dtype the gathered parameters are bf16 (half the all-gather traffic, no
per-op casts) and gradients are reduced in fp32 into the fp32 shards the optimizer updates.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from dslm.errors import ConfigError, UsageError


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_STARTED_PROCESS_GROUP = False   # set once this process has run init_process_group


def exit_process(code: int) -> int:
    """The end of a command-line process: when it ran a process group, flush the output and leave
    with ``os._exit(code)``; otherwise return ``code``. With gloo, interpreter teardown sometimes
    destroys a process-group thread that is still joinable and the C++ runtime aborts (SIGABRT,
    "terminate called without an active exception") after a run that finished and wrote all its
    files: about 1 run in 10 of the 2-process CPU tests. Nothing is left to finalise by then
    (checkpoints and logs are closed), so skipping the teardown is safe."""
    if not _STARTED_PROCESS_GROUP:
        return code
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"environment variable {name}={value!r}: expected an integer") from None


def setup(device: str = "auto") -> DistEnv:
    """Detect torchrun, choose the device, start the process group (idempotent)."""
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"{{device}} {device!r}: expected auto, cpu or cuda")
    rank, world, local = _int_env("RANK", 0), _int_env("WORLD_SIZE", 1), _int_env("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("{device} cuda: no CUDA device is visible")
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices are visible")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        global _STARTED_PROCESS_GROUP
        _STARTED_PROCESS_GROUP = True
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=30),
                                device_id=dev if use_cuda else None)
    return DistEnv(rank, world, local, dev)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj, env: DistEnv):
    """Rank 0's ``obj`` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The elements of every ``nn.ModuleList`` whose members share one class (transformer layers)."""
    blocks = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            blocks.extend(module)
    return blocks


def needs_sharding(model: nn.Module, device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    n = sum(p.numel() for p in model.parameters())
    return 16 * n > 0.6 * torch.cuda.get_device_properties(device).total_memory


def wrap(model: nn.Module, env: DistEnv, fsdp: bool = False, compute_dtype: torch.dtype | None = None,
         reshard_after_forward: bool = True) -> nn.Module:
    """Move ``model`` to the device and wrap it for data parallelism (no-op for one process).
    ``compute_dtype`` (bf16 under bf16 training): FSDP2 gathers parameters in it
    (``MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=float32)``); the master
    weights and the optimizer stay fp32. DDP ignores it (autocast casts per op).
    ``reshard_after_forward``: FSDP2 frees each block's gathered parameters after its forward and
    gathers them again for its backward (least memory); False keeps them until the backward."""
    shard = fsdp or needs_sharding(model, env.device)
    if shard and env.distributed:
        try:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        except ImportError:     # torch < 2.6: the same FSDP2 before it became public
            from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard

        model.to(env.device)
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32
                                      if compute_dtype is not None else None)
        for block in repeated_blocks(model):
            fully_shard(block, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        fully_shard(model, mp_policy=policy)
        model.dslm_fsdp = True
        return model
    model.to(env.device)
    if not env.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None,
               gradient_as_bucket_view=True, static_graph=False)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
