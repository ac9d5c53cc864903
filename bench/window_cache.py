"""KV-cache memory of sliding-window models: sliding layers holding only their window's blocks
(``GenerationEngine(window_cache=True)``, the default) vs every token of every layer.

A random model with a layer pattern (``--pattern``: ``gpt-oss`` alternates sliding and full
layers, ``olmo3`` has three sliding per full one, ``gemma3`` five; window ``--window`` tokens)
generates an RL-shaped batch twice in the same fixed KV-cache memory (``--kv-mib``), with and
without the window cache: ``--prompts`` prompts x ``--samples-per-prompt`` samples, prompt
lengths uniform in [prompt/8, prompt], budgets in [new/8, new], EOS off. Printed per pattern:
the memory the batch needs (the cache's peak with room for everything at once), the peak in
the fixed memory, how many requests were preempted there (their tokens prefilled again later),
and generated tokens per second (on CPU per CPU-second of the process), and how many requests
generated the same tokens in both runs (seeded sampling: all of them unless a preemption's
re-prefill, which rounds differently from decode, flips a sample where two tokens nearly tie).

Examples:
    python bench/window_cache.py                                   # CPU-sized defaults
    python bench/window_cache.py --pattern gpt-oss --window 128 --prompt 2048 --new-tokens 2048 \\
        --hidden 1024 --layers 24 --kv-mib 2048                      # GPU
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from bench._cli import size_arg  # noqa: E402  (the repository root is on sys.path above)

FULL_EVERY = {"gpt-oss": 2, "olmo3": 4, "gemma3": 6}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pattern", choices=sorted(FULL_EVERY), nargs="+", default=["gpt-oss", "olmo3", "gemma3"])
    p.add_argument("--window", type=size_arg, default=64, help="sliding window W (tokens a query sees)")
    add_request_args(p, new_tokens=512)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=256)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def add_request_args(p, new_tokens: int) -> None:
    """The RL-shaped batch (``make_requests``) and the fixed KV-cache memory; shared with
    bench/mla_cache.py."""
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--samples-per-prompt", type=int, default=4)
    p.add_argument("--prompt", type=size_arg, default=256)
    p.add_argument("--new-tokens", type=size_arg, default=new_tokens)
    p.add_argument("--kv-mib", type=float, default=8.0, help="KV-cache memory of the fixed-memory runs")
    p.add_argument("--block-size", type=int, default=16)


def generate_timed(engine, prompts, budgets, seed: int, device):
    """(output ids, engine stats, seconds: wall on GPU, CPU time of the process on CPU) of one
    seeded sampling run."""
    from megatron_k15.generation.sampling import SamplingParams, request_generator

    gens = [request_generator(seed, i) for i in range(len(prompts))]
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = clock()
    out = engine.generate(prompts, budgets, SamplingParams(temperature=1.0), gens, [])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return [r.output_ids for r in out], engine.stats, clock() - t0


def build_model(args, pattern: str, device, dtype):
    from megatron.core import parallel_state

    from megatron_k15.models.config import GPTConfig, every_nth_full
    from megatron_k15.models.gpt import GPTModel

    torch.manual_seed(args.seed)
    cfg = GPTConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                    num_query_groups=args.kv_heads, ffn_hidden_size=args.ffn, vocab_size=args.vocab,
                    max_position_embeddings=args.prompt + args.new_tokens + 16, init_method_std=0.2,
                    sliding_window=args.window, layer_types=every_nth_full(args.layers, FULL_EVERY[pattern]))
    model = GPTModel(cfg, tp_group=parallel_state.get_tensor_model_parallel_group(), attention_backend="auto")
    return model.to(device=device, dtype=dtype).eval()


def make_requests(args, gen):
    prompts, budgets = [], []
    for _ in range(args.prompts):
        n = int(torch.randint(max(1, args.prompt // 8), args.prompt + 1, (1,), generator=gen))
        prompt = torch.randint(3, args.vocab, (n,), generator=gen).tolist()
        for _ in range(args.samples_per_prompt):
            prompts.append(prompt)
            budgets.append(int(torch.randint(max(1, args.new_tokens // 8), args.new_tokens + 1, (1,),
                                             generator=gen)))
    return prompts, budgets


def run(model, prompts, budgets, args, window_cache: bool, device, dtype, kv_mib=None):
    from megatron_k15.generation.engine import GenerationEngine
    from megatron_k15.generation.kv_cache import bytes_per_block, page_layout

    windows = [layer.self_attention.window_size[0] for layer in model.layers.values()]
    per_block = page_layout(windows)[0] if window_cache else len(windows)
    block_bytes = bytes_per_block(per_block, args.block_size, args.kv_heads, model.config.head_dim, dtype)
    num_blocks = int((kv_mib or args.kv_mib) * 2**20) // block_bytes - 1
    engine = GenerationEngine(model, block_size=args.block_size, num_blocks=num_blocks,
                              max_batch_size=len(prompts), window_cache=window_cache)
    return generate_timed(engine, prompts, budgets, args.seed, device)


def setup(args):
    """One rank, the threads, the device and dtype (bf16 on GPU, fp32 on CPU), the requests and
    the rate's unit: (device, dtype, prompts, budgets, unit)."""
    from megatron_k15.initialize import initialize_model_parallel

    initialize_model_parallel(1)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    prompts, budgets = make_requests(args, torch.Generator().manual_seed(args.seed))
    return device, dtype, prompts, budgets, "tokens/s" if device.type == "cuda" else "tokens/CPU-s"


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype, prompts, budgets, unit = setup(args)
    print(f"# {len(prompts)} requests ({args.prompts} prompts x {args.samples_per_prompt}), prompts <= "
          f"{args.prompt}, budgets <= {args.new_tokens} ({sum(budgets):,} tokens), window {args.window}, "
          f"{args.layers} layers, KV cache {args.kv_mib:g} MiB, blocks of {args.block_size}, {dtype}, {device}")
    print(f"| pattern | window cache | needed MiB | peak MiB in {args.kv_mib:g} | preempted | {unit} | same tokens |")
    print("|---|---|---|---|---|---|---|")
    ample = 2 * len(prompts) * (args.prompt + args.new_tokens + args.block_size) * 2 * args.layers * args.kv_heads \
        * (args.hidden // args.heads) * torch.finfo(dtype).bits / 8 / 2**20
    for pattern in args.pattern:
        model = build_model(args, pattern, device, dtype)
        ids = {}
        for window_cache in (False, True):
            needed = run(model, prompts, budgets, args, window_cache, device, dtype, ample)[1].peak_cache_bytes
            ids[window_cache], stats, seconds = run(model, prompts, budgets, args, window_cache, device, dtype)
            same = sum(a == b for a, b in zip(ids[window_cache], ids[False]))
            print(f"| {pattern} | {'on' if window_cache else 'off'} | {needed / 2**20:.2f} | "
                  f"{stats.peak_cache_bytes / 2**20:.2f} | "
                  f"{stats.preemptions} | {sum(budgets) / seconds:,.0f} | {same}/{len(prompts)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
