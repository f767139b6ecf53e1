"""The process group across a job's pods, from the rendezvous environment the operator sets.

The operator sets NNODES, NODE_RANK (the Indexed Job's completion index), WORLD_SIZE (nodes x
gpusPerNode), MASTER_ADDR and MASTER_PORT on multi-node jobs, and NPROC_PER_NODE (gpusPerNode) on
every job. A pod with several GPUs runs one process per GPU (`launcher`), which sets LOCAL_RANK,
RANK and LOCAL_WORLD_SIZE for each, as torchrun does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from datetime import timedelta

from finetune_trainer.config import ConfigError

log = logging.getLogger(__name__)
SHARED_MEMORY_OP = "deepspeed_shm_comm"  # deepspeed.ops.op_builder.cpu.ShareMemCommBuilder.NAME
JOIN_TIMEOUT = timedelta(minutes=30)  # rank 0 evaluates the baseline while the others wait
# Once joined, a rank that waits this long on a collective gives up: its peer is gone (a killed pod
# whose connections were never closed, a lost node), and the Job retries every rank, which resumes
# from the last committed checkpoint. Rank 0's longest lone work in training is verifying the
# first checkpoint.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class Rendezvous:
    rank: int
    local_rank: int
    world_size: int
    node_rank: int
    nodes: int
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        """World rank 0: the one process that evaluates, reports and uploads."""
        return self.rank == 0

    @property
    def per_pod(self) -> int:
        return self.world_size // self.nodes

    @property
    def multi_process(self) -> bool:
        return self.world_size > 1


SINGLE = Rendezvous(rank=0, local_rank=0, world_size=1, node_rank=0, nodes=1, master_addr="", master_port=0)


def _int(env: Mapping[str, str], name: str, default: int | None = None, minimum: int = 0) -> int:
    raw = env.get(name, "").strip()
    if not raw and default is not None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ConfigError(
            [
                f"env {name}: got {raw or '(unset)'!r}: must be an integer >= {minimum} "
                "(fix: let the operator set the rendezvous variables, or set them as torchrun does)"
            ]
        )
    return value


def rendezvous_from_env(env: Mapping[str, str], cuda_devices: int) -> Rendezvous:
    """This process's place in the job. `cuda_devices` is how many GPUs the pod sees."""
    nodes = _int(env, "NNODES", 1, minimum=1)
    launched = "LOCAL_RANK" in env  # one of several processes of a pod (see `launcher`)
    if not launched and nodes == 1:
        return SINGLE
    node_rank = _int(env, "NODE_RANK", 0 if nodes == 1 else None)
    if node_rank >= nodes:
        raise ConfigError(
            [f"env NODE_RANK: got {node_rank}: must be below NNODES {nodes} (fix: 0 to {nodes - 1})"]
        )
    per_node = _int(env, "LOCAL_WORLD_SIZE", 1, minimum=1) if launched else 1
    local_rank = _int(env, "LOCAL_RANK", 0)
    if cuda_devices and local_rank >= cuda_devices:
        raise ConfigError(
            [
                f"env LOCAL_RANK: got {local_rank} but the pod sees {cuda_devices} GPUs "
                f"(fix: resources.gpusPerNode {per_node} must match the GPUs the pod gets)"
            ]
        )
    world = nodes * per_node
    if launched and _int(env, "WORLD_SIZE", world, minimum=1) != world:
        raise ConfigError(
            [
                f"env WORLD_SIZE: got {env['WORLD_SIZE']} but NNODES x LOCAL_WORLD_SIZE is {world} "
                "(fix: let the operator and the launcher set the rendezvous variables)"
            ]
        )
    return Rendezvous(
        rank=node_rank * per_node + local_rank,
        local_rank=local_rank,
        world_size=world,
        node_rank=node_rank,
        nodes=nodes,
        master_addr=_required(env, "MASTER_ADDR"),
        master_port=_int(env, "MASTER_PORT", minimum=1),
    )


def _required(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise ConfigError(
            [f"env {name}: not set on a multi-node job (fix: let the operator set the rendezvous env)"]
        )
    return value


def select_gpu(r: Rendezvous) -> None:
    """This rank's GPU, before anything is loaded onto one (LOCAL_RANK is GPU LOCAL_RANK)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(r.local_rank)


def cuda_devices() -> int:
    import torch

    return int(torch.cuda.device_count())


LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


def hide_until_join(env: MutableMapping[str, str]) -> None:
    """Rank 0 evaluates the baseline on a plain Trainer before the process group starts; with the
    launcher's variables set, accelerate would start the group itself there. `join` sets them."""
    for name in LAUNCHER_VARIABLES:
        env.pop(name, None)


def export(r: Rendezvous, env: MutableMapping[str, str]) -> None:
    """The variables torch.distributed, accelerate and DeepSpeed read, as a launcher would set them."""
    env.update(
        RANK=str(r.rank),
        LOCAL_RANK=str(r.local_rank),
        WORLD_SIZE=str(r.world_size),
        LOCAL_WORLD_SIZE=str(r.world_size // r.nodes),
        MASTER_ADDR=r.master_addr or "127.0.0.1",
        MASTER_PORT=str(r.master_port),
    )


def backend(cuda: bool) -> str:
    # DeepSpeed's CPU accelerator would pick oneCCL where installed; gloo needs nothing extra.
    return "nccl" if cuda else "gloo"


def join(r: Rendezvous, cuda: bool, deepspeed: bool = True) -> None:
    """Start the process group and hand it to accelerate, configured for DeepSpeed or for
    data-parallel training (DDP) of LoRA and QLoRA.

    accelerate finds no backend on a machine without GPUs unless it is told one, and would then
    treat every rank as a lone process (no data sharding, every rank "process zero"); so the
    state is configured here and TrainingArguments reuses it (`use_configured_state`).
    """
    import torch
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, PartialState
    from torch.distributed import HashStore  # type: ignore[attr-defined]

    export(r, os.environ)
    name = backend(cuda)
    if cuda:
        torch.cuda.set_device(r.local_rank)
    else:
        skip_shared_memory_op()
    if r.multi_process:
        log.info(
            "joining the process group: rank %d of %d (node %d of %d) at %s:%d, backend %s",
            *(r.rank, r.world_size, r.node_rank, r.nodes, r.master_addr, r.master_port, name),
        )
        dist.init_process_group(
            name, init_method="env://", rank=r.rank, world_size=r.world_size, timeout=JOIN_TIMEOUT
        )
        dist.set_timeout(COLLECTIVE_TIMEOUT)
    else:  # one process: an in-memory store, so no port is taken on a host that pods share
        dist.init_process_group(name, store=HashStore(), rank=0, world_size=1)
    AcceleratorState._reset_state(reset_partial_state=True)
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true" if deepspeed else "false"
    state = PartialState(backend=name)
    log.info(
        "process group ready: rank %d of world size %d, backend %s, device %s",
        *(state.process_index, state.num_processes, name, state.device),
    )


def skip_shared_memory_op() -> None:
    """DeepSpeed's CPU backend compiles a shared-memory all-reduce op when it starts (2.5 minutes on
    2 cores, again in every fresh pod) unless the installed deepspeed ships it prebuilt. The op
    speeds up ranks that share one host's memory, which only CPU runs (tests) have: skipped."""
    import deepspeed.ops
    from deepspeed.git_version_info import installed_ops

    if not installed_ops.get(SHARED_MEMORY_OP, False):
        deepspeed.ops.__compatible_ops__[SHARED_MEMORY_OP] = False


def barrier(r: Rendezvous) -> None:
    if r.multi_process:
        import torch.distributed as dist

        dist.barrier()


# A slow object store still moves this much; rank 0 uploads, then downloads and loads to verify.
MIN_STORE_BYTES_PER_SECOND = 50e6
VERIFY_PASSES = 3


def checkpoint_wait(part_bytes: int, world_size: int) -> timedelta:
    """How long the other ranks wait while rank 0 stores and verifies a checkpoint: three passes
    over the whole checkpoint (about this rank's part times the ranks) at a slow store's rate, and
    never less than COLLECTIVE_TIMEOUT."""
    seconds = VERIFY_PASSES * part_bytes * max(world_size, 1) / MIN_STORE_BYTES_PER_SECOND
    return max(COLLECTIVE_TIMEOUT, timedelta(seconds=seconds))


def patient_barrier(part_bytes: int = 0) -> None:
    """Wait for every rank while rank 0 may upload and verify a checkpoint (the first one), which
    takes longer than COLLECTIVE_TIMEOUT for large models. `part_bytes`: this rank's checkpoint."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    dist.set_timeout(checkpoint_wait(part_bytes, dist.get_world_size()))
    try:
        dist.barrier()
    finally:
        dist.set_timeout(COLLECTIVE_TIMEOUT)


def share_from_main(r: Rendezvous, value: dict[str, str]) -> dict[str, str]:
    """Rank 0's `value` on every rank (the other ranks' `value` is ignored)."""
    if not r.multi_process:
        return value
    import torch.distributed as dist

    box: list[object] = [value]
    dist.broadcast_object_list(box, src=0)
    shared: dict[str, str] = box[0]  # type: ignore[assignment]
    return shared


def all_ranks_ok(r: Rendezvous, ok: bool) -> bool:
    """Whether every rank reports `ok`; each rank must call it."""
    if not r.multi_process:
        return ok
    import torch
    import torch.distributed as dist

    flag = torch.tensor([int(ok)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
