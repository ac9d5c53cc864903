"""One rank's part of a model replica for generation, from a checkpoint (generate CLI, evaluate).

The tp x cp x pp ranks of a replica decode together: each rank builds its pipeline stage
(``--decoder-first/last-pipeline-num-layers`` as in training), loads that stage's weights
(``--load``; resharded when the checkpoint was saved under another layout), and the engine gets
the pipeline group (stages pass hidden states on) and the context-parallel group (the KV
cache of every sequence is sharded over it). A model with sliding-window layers or attention
sinks does not decode cp-sharded (``cp_decodes_together``): its cp ranks then take requests of
their own, like data-parallel replicas (``request_split``). Requests are split over data-parallel replicas;
with ``--expert-model-parallel-size`` the replicas split the experts of an MoE model between
them (the engine keeps them in step). A judge (``load_dir``) keeps all its experts.
"""

from __future__ import annotations

from typing import Optional

from megatron_k15.generation.engine import build_generator


def cp_decodes_together(cfg, cp: int) -> bool:
    """Whether a replica's cp ranks decode the same requests with the KV cache sharded over
    them: not with sliding-window layers or attention sinks (a shard holds every cp-th
    position; windows and sinks are not done there), nor without cp."""
    return cp > 1 and not (cfg.has_sliding_layers or cfg.attention_sinks)


def request_split(args, cfg):
    """(rank, size, group) among the ranks that take different requests: the data-parallel
    replicas, and their cp ranks too when those do not decode together."""
    from megatron.core import parallel_state

    with_cp = not cp_decodes_together(cfg, args.context_parallel_size)
    return (parallel_state.get_data_parallel_rank(with_context_parallel=with_cp),
            parallel_state.get_data_parallel_world_size(with_context_parallel=with_cp),
            parallel_state.get_data_parallel_group(with_context_parallel=with_cp))


def load_generation_replica(args, cfg, *, max_batch_size: int, load_dir=None,
                            shard_kv_over_cp: Optional[bool] = None, max_sequence_length: Optional[int] = None):
    """(model stage in eval mode, generator) for this rank; model parallel is initialised.
    ``load_dir``: another checkpoint than ``--load`` (a judge; its layers split evenly over the
    stages, the --decoder-*-pipeline-num-layers flags describe the policy, and --longrope-factors
    too: the judge chooses by its own context).
    ``shard_kv_over_cp``: the cp ranks decode together (default: ``cp_decodes_together``);
    False: each cp rank decodes its own requests (RL's generation ranks).
    ``max_sequence_length``: the longest prompt + budget (LongRoPE's choice of factors)."""
    from megatron.core import parallel_state

    from megatron_k15 import platform
    from megatron_k15.checkpointing import load_model_checkpoint
    from megatron_k15.models.gpt import GPTModel
    from megatron_k15.models.sharding import pipeline_layer_ranges

    pp, cp = args.pipeline_model_parallel_size, args.context_parallel_size
    if shard_kv_over_cp is None:
        shard_kv_over_cp = cp_decodes_together(cfg, cp)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    uneven = load_dir is None
    ranges = pipeline_layer_ranges(cfg.num_layers, pp,
                                   getattr(args, "decoder_first_pipeline_num_layers", None) if uneven else None,
                                   getattr(args, "decoder_last_pipeline_num_layers", None) if uneven else None)
    ep = getattr(args, "expert_model_parallel_size", 1) or 1
    ep_group = parallel_state.get_expert_model_parallel_group() if ep > 1 and uneven and cfg.is_moe else None
    model = GPTModel(cfg, attention_backend=args.attention_backend, params_dtype=args.params_dtype,
                     device=platform.current_device(), pp_rank=pp_rank, pp_size=pp, layer_ranges=ranges,
                     ep_group=ep_group, moe_grouped_gemm=getattr(args, "moe_grouped_gemm", None),
                     longrope_factors=getattr(args, "longrope_factors", "auto") if load_dir is None else "auto",
                     max_sequence_length=max_sequence_length)
    load_model_checkpoint(model, load_dir or args.load, pp_rank, pp)
    model.eval().requires_grad_(False)
    generator = build_generator(
        model, args, max_batch_size=max_batch_size,
        pp_group=parallel_state.get_pipeline_model_parallel_group() if pp > 1 else None,
        cp_group=parallel_state.get_context_parallel_group() if cp > 1 and shard_kv_over_cp else None)
    return model, generator
