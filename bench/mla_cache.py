"""KV-cache memory and decode speed of multi-latent attention (DeepSeek-V3, Moonlight, Kimi K2):
the latent cache (``GenerationEngine(latent_cache=True)``, the default: kv_lora_rank +
qk_pos_emb_head_dim values per token and layer, decode with queries absorbed into the latent)
vs every head's K and zero-padded V (2 x heads x head_dim values).

A random MLA model (Moonlight's proportions scaled down: ``--hidden``, ``--heads``,
``--kv-lora-rank``, heads of ``--qk-head-dim`` + ``--rope-dim`` channels and v of
``--v-head-dim``; dense MLPs) generates an RL-shaped batch (``bench/window_cache.py``'s
requests) with both caches: in ample memory (the memory the batch needs) and in a fixed
``--kv-mib``. Printed: the needed MiB, the preemptions in the fixed memory, generated tokens per
second (per CPU-second on CPU), and how many requests gave the same tokens in both runs.

Examples:
    python bench/mla_cache.py --threads 1                                      # CPU-sized
    python bench/mla_cache.py --hidden 2048 --heads 16 --kv-lora-rank 512 --qk-head-dim 128 \\
        --rope-dim 64 --v-head-dim 128 --layers 8 --prompt 2048 --new-tokens 2048 --kv-mib 2048   # GPU
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from bench.window_cache import add_request_args, generate_timed, setup  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_request_args(p, new_tokens=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-lora-rank", type=int, default=64)
    p.add_argument("--qk-head-dim", type=int, default=32)
    p.add_argument("--rope-dim", type=int, default=16)
    p.add_argument("--v-head-dim", type=int, default=32)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_model(args, device, dtype):
    from megatron.core import parallel_state

    from megatron_k15.models.config import GPTConfig
    from megatron_k15.models.gpt import GPTModel

    torch.manual_seed(args.seed)
    cfg = GPTConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                    ffn_hidden_size=args.ffn, vocab_size=args.vocab, init_method_std=0.2,
                    max_position_embeddings=args.prompt + args.new_tokens + 16, multi_latent_attention=True,
                    kv_lora_rank=args.kv_lora_rank, qk_head_dim=args.qk_head_dim, qk_pos_emb_head_dim=args.rope_dim,
                    v_head_dim=args.v_head_dim, architecture="deepseek_v3").validate()
    model = GPTModel(cfg, tp_group=parallel_state.get_tensor_model_parallel_group(), attention_backend="auto")
    return model.to(device=device, dtype=dtype).eval()


def run(model, prompts, budgets, args, latent: bool, device, kv_mib: float):
    from megatron_k15.generation.engine import GenerationEngine

    probe = GenerationEngine(model, block_size=args.block_size, num_blocks=1, latent_cache=latent)
    probe._ensure_cache([])
    num_blocks = max(1, int(kv_mib * 2**20) // probe.cache.bytes_per_block - 1)
    engine = GenerationEngine(model, block_size=args.block_size, num_blocks=num_blocks,
                              max_batch_size=len(prompts), latent_cache=latent)
    return generate_timed(engine, prompts, budgets, args.seed, device)


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype, prompts, budgets, unit = setup(args)
    model = build_model(args, device, dtype)
    d = model.config.head_dim
    print(f"# {len(prompts)} requests ({args.prompts} prompts x {args.samples_per_prompt}), prompts <= "
          f"{args.prompt}, budgets <= {args.new_tokens} ({sum(budgets):,} tokens); {args.layers} layers, "
          f"{args.heads} heads of {d} (v {args.v_head_dim}), latent {args.kv_lora_rank} + {args.rope_dim}; "
          f"blocks of {args.block_size}, {dtype}, {device}")
    print(f"| cache | values / token / layer | needed MiB | preempted in {args.kv_mib:g} MiB | {unit} | same tokens |")
    print("|---|---|---|---|---|---|")
    ample = 4 * len(prompts) * (args.prompt + args.new_tokens + args.block_size) * 2 * args.layers * args.heads \
        * d * torch.finfo(dtype).bits / 8 / 2**20
    ids = {}
    for latent in (False, True):
        needed = run(model, prompts, budgets, args, latent, device, ample)[1].peak_cache_bytes
        ids[latent], stats, seconds = run(model, prompts, budgets, args, latent, device, args.kv_mib)
        same = sum(a == b for a, b in zip(ids[latent], ids[False]))
        heads, dim, keys_only = model.config.kv_cache_row(1, latent)
        values = (1 if keys_only else 2) * heads * dim
        print(f"| {'latent' if latent else 'heads'} | {values} | {needed / 2**20:.2f} | {stats.preemptions} | "
              f"{sum(budgets) / seconds:,.0f} | {same}/{len(prompts)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
