"""Start-up: torch.distributed (nccl on GPU, gloo on CPU), megatron-core process groups, seeds.

Works under ``torchrun`` (reads RANK / WORLD_SIZE / MASTER_ADDR from the environment) and as
a plain single process (a one-rank group, so the same model code runs everywhere).
"""

from __future__ import annotations

import datetime
import os
import random

import numpy as np
import torch
import torch.distributed as dist

from megatron_k15 import platform


# how long a collective may wait for the slowest rank (--distributed-timeout-minutes)
DEFAULT_TIMEOUT_MINUTES = 30.0


def initialize_distributed(backend: str | None = None, timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> None:
    if dist.is_initialized():
        return
    backend = backend or platform.default_backend()
    if platform.has_cuda():
        torch.cuda.set_device(platform.local_rank() % torch.cuda.device_count())
    timeout = datetime.timedelta(minutes=timeout_minutes)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if "MASTER_ADDR" in os.environ or world_size > 1:
        dist.init_process_group(backend, init_method="env://", timeout=timeout)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def check_world_size(world_size: int, tp: int, pp: int, cp: int, ep: int = 1) -> None:
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
            f"--pipeline-model-parallel-size {pp} x --context-parallel-size {cp} = {model_parallel}; "
            "launch a multiple of that many processes"
        )
    dp_cp = world_size // (tp * pp)
    if dp_cp % ep:
        raise ValueError(
            f"--expert-model-parallel-size {ep} must divide the data x context parallel size {dp_cp} "
            f"(world size {world_size} / (--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size "
            f"{pp})): experts are split over the ranks that hold different data")


def initialize_model_parallel(tp: int = 1, pp: int = 1, cp: int = 1, backend: str | None = None,
                              ep: int = 1, timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> None:
    """Process groups in Megatron's order (tp fastest, then cp, dp, pp); the expert-parallel
    groups (``ep``) split the dp x cp ranks of each tp rank and stage (``parallel.expert``).
    ``timeout_minutes``: how long a collective may wait for the slowest rank (a rank done with
    its rollouts waits for the others' in the gather) before the run is aborted."""
    from megatron.core import parallel_state

    initialize_distributed(backend, timeout_minutes)
    check_world_size(dist.get_world_size(), tp, pp, cp, ep)
    if parallel_state.model_parallel_is_initialized():
        destroy_model_parallel_groups()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
        create_gloo_process_groups=dist.get_backend() != "gloo",
        distributed_timeout_minutes=timeout_minutes,
    )
    _create_pipeline_token_groups(pp, datetime.timedelta(minutes=timeout_minutes))


_PIPELINE_TOKEN_GROUP = None


def _create_pipeline_token_groups(pp: int, timeout: datetime.timedelta) -> None:
    """A second communicator per pipeline group, for the generation engine's sampled tokens
    that travel from the last stage back to the others while hidden states travel forward on
    the pipeline group (on one NCCL communicator both directions share a stream per peer
    pair). Every rank creates every group, in the same order, as ``new_group`` requires."""
    global _PIPELINE_TOKEN_GROUP
    from megatron.core import parallel_state

    _PIPELINE_TOKEN_GROUP = None
    if pp == 1:
        return
    world, rank = dist.get_world_size(), dist.get_rank()
    stride = world // pp  # Megatron's order: pp varies slowest
    own = dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())
    for first in range(stride):
        ranks = list(range(first, world, stride))
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            if ranks != own:
                raise RuntimeError(f"pipeline group {own} is not laid out as expected ({ranks})")
            _PIPELINE_TOKEN_GROUP = group


def pipeline_token_group(pp_group):
    """The token communicator of ``pp_group`` when it is this rank's Megatron pipeline group;
    otherwise ``pp_group`` itself (hand-made groups, e.g. in tests)."""
    g = _PIPELINE_TOKEN_GROUP
    if g is not None and dist.get_process_group_ranks(g) == dist.get_process_group_ranks(pp_group):
        return g
    return pp_group


def set_seed(seed: int) -> None:
    """Same seed on every rank: tp ranks must initialise and sample identically."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if platform.has_cuda():
        torch.cuda.manual_seed_all(seed)
        try:
            from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

            model_parallel_cuda_manual_seed(seed)
        except Exception:  # noqa: BLE001 - the RNG tracker is only needed for dropout
            pass


def initialize_parallel_from_args(args) -> None:
    """The process groups of the parsed parallelism flags (sizes, backend, timeout)."""
    initialize_model_parallel(
        args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size,
        backend=getattr(args, "distributed_backend", None),
        ep=getattr(args, "expert_model_parallel_size", 1) or 1,
        timeout_minutes=getattr(args, "distributed_timeout_minutes", None) or DEFAULT_TIMEOUT_MINUTES,
    )


def initialize_megatron(args) -> None:
    """Everything an entry point needs before building the model, from parsed arguments."""
    initialize_parallel_from_args(args)
    set_seed(args.seed)


def destroy_model_parallel_groups() -> None:
    """Forget megatron-core's groups and ours, and destroy them: megatron-core's
    ``destroy_model_parallel`` only drops its references, and each forgotten group keeps its
    sockets (68 descriptors per re-initialisation of one rank under gloo)."""
    from megatron.core import parallel_state

    global _PIPELINE_TOKEN_GROUP
    groups = [g for g in (getattr(parallel_state, "_global_process_group_list", None) or []) if g is not None]
    if _PIPELINE_TOKEN_GROUP is not None:
        groups.append(_PIPELINE_TOKEN_GROUP)
    _PIPELINE_TOKEN_GROUP = None
    parallel_state.destroy_model_parallel()
    if not dist.is_initialized():
        return
    live = dist.distributed_c10d._world.pg_map
    for group in dict.fromkeys(groups):  # once each
        if group is not dist.group.WORLD and group in live:
            dist.destroy_process_group(group)


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        destroy_model_parallel_groups()
    if dist.is_initialized():
        dist.destroy_process_group()
