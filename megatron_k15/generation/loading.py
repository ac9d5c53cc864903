"""One rank's part of a model replica for generation, from a checkpoint (generate CLI, evaluate).

The tp x cp x pp ranks of a replica decode together: each rank builds its pipeline stage
(``--decoder-first/last-pipeline-num-layers`` as in training), loads that stage's weights
(``--load``; resharded when the checkpoint was saved under another layout), and the engine gets
the pipeline group (stages pass hidden states on) and the context-parallel group (the KV
cache of every sequence is sharded over it). Requests are split over data-parallel replicas;
with ``--expert-model-parallel-size`` the replicas split the experts of an MoE model between
them (the engine keeps them in step). A judge (``load_dir``) keeps all its experts.
"""

from __future__ import annotations

from megatron_k15.generation.engine import build_generator


def load_generation_replica(args, cfg, *, max_batch_size: int, load_dir=None, shard_kv_over_cp: bool = True):
    """(model stage in eval mode, generator) for this rank; model parallel is initialised.
    ``load_dir``: another checkpoint than ``--load`` (a judge; its layers split evenly over the
    stages, the --decoder-*-pipeline-num-layers flags describe the policy).
    ``shard_kv_over_cp=False``: each cp rank decodes its own requests (RL's generation ranks)."""
    from megatron.core import parallel_state

    from megatron_k15 import platform
    from megatron_k15.checkpointing import load_model_checkpoint
    from megatron_k15.models.gpt import GPTModel
    from megatron_k15.models.sharding import pipeline_layer_ranges

    pp, cp = args.pipeline_model_parallel_size, args.context_parallel_size
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    uneven = load_dir is None
    ranges = pipeline_layer_ranges(cfg.num_layers, pp,
                                   getattr(args, "decoder_first_pipeline_num_layers", None) if uneven else None,
                                   getattr(args, "decoder_last_pipeline_num_layers", None) if uneven else None)
    ep = getattr(args, "expert_model_parallel_size", 1) or 1
    ep_group = parallel_state.get_expert_model_parallel_group() if ep > 1 and uneven and cfg.is_moe else None
    model = GPTModel(cfg, attention_backend=args.attention_backend, params_dtype=args.params_dtype,
                     device=platform.current_device(), pp_rank=pp_rank, pp_size=pp, layer_ranges=ranges,
                     ep_group=ep_group, moe_grouped_gemm=getattr(args, "moe_grouped_gemm", None))
    load_model_checkpoint(model, load_dir or args.load, pp_rank, pp)
    model.eval().requires_grad_(False)
    generator = build_generator(
        model, args, max_batch_size=max_batch_size,
        pp_group=parallel_state.get_pipeline_model_parallel_group() if pp > 1 else None,
        cp_group=parallel_state.get_context_parallel_group() if cp > 1 and shard_kv_over_cp else None)
    return model, generator
