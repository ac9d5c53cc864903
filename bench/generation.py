"""Generation throughput: our KV-cached engine vs transformers' ``generate`` on the same model.

Both run the same random-weight Qwen2-shaped model (``--hidden``, ``--layers``, ...), greedy,
EOS disabled, on ``batch`` random prompts. Two workloads:

- ``uniform``: every prompt has ``prompt`` tokens and every request ``--new-tokens`` new tokens,
  so both do exactly the same arithmetic (this measures the per-token efficiency);
- ``mixed`` (what RL rollouts look like): prompt lengths uniform in [prompt/8, prompt] and
  response budgets uniform in [new/8, new] (standing in for EOS at different lengths).
  transformers runs one static batch: prompts left-padded to the longest, every row decoded
  until the longest budget is met (its rows cannot stop early without EOS), and its tokens/s
  counts only the tokens the requests asked for. Our engine packs prompts without padding
  and frees a row the moment its request is done (continuous batching);
- ``rl`` (a rollout batch): ``batch / --samples-per-prompt`` distinct prompts (lengths as in
  ``mixed``), each repeated ``--samples-per-prompt`` times, budgets as in ``mixed``. Our
  engine prefills each prompt once and forks its cache; transformers runs the same static
  batch as above (its ``num_return_sequences`` would also repeat the prompt rows).

Tokens/s counts generated tokens over wall time, prefill included; on CPU it uses the
process CPU time instead (a shared machine's wall time says little). On a GPU the table adds
the decode bandwidth bound of one step:

    bound tokens/s = batch / ((bytes of weights + bytes of K/V cached) / HBM bandwidth)

Examples:
    python bench/generation.py                                  # CPU-sized default grid
    python bench/generation.py --batch 1 64 256 --prompt 2048 --new-tokens 256 \\
        --hidden 896 --layers 24 --heads 14 --kv-heads 2 --ffn 4864 --vocab 151936  # GPU, 0.5B
    python bench/generation.py --skip-hf                        # ours only
    python bench/generation.py --pp 2 --threads 1 --batch 32 --prompt 128 --new-tokens 128

``--pp N`` measures pipelined decode instead: N gloo ranks, one pipeline stage each, run the
same requests with one lane (a step passes the stages one after the other) and with N lanes
(decode microbatches overlapping across the stages); wall-clock tokens/s, since the point is
that stages work at the same time (give each rank its own core: ``--threads 1``).
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

from bench._cli import add_profile_ops_arg, profile_ops  # noqa: E402  (the repository root is on sys.path above)

KNOWN_BANDWIDTH_TBS = {"H200": 4.8, "H100": 3.35, "A100": 2.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32, 256])
    p.add_argument("--prompt", type=int, nargs="+", default=[64, 512])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--workload", choices=["uniform", "mixed", "rl"], nargs="+",
                   default=["uniform", "mixed", "rl"])
    p.add_argument("--samples-per-prompt", type=int, default=8, help="rl workload: k samples per prompt")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=704)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--skip-hf", action="store_true", help="do not run transformers")
    p.add_argument("--max-hf-seconds", type=float, default=600.0,
                   help="skip transformers for larger rows once one row took longer than this")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    add_profile_ops_arg(p, "after the table, run our engine on the last configuration")
    p.add_argument("--pp", type=int, default=1,
                   help="> 1: compare pipelined (N lanes) with unpipelined decode over N stages")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default); 1 gives stable figures on a shared machine")
    p.add_argument("--repeat", type=int, default=1,
                   help="time each generation this many times and keep the fastest (a shared machine's noise)")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error(f"--repeat must be >= 1, got {args.repeat}")
    for name in ("new_tokens", "hidden", "layers", "heads", "kv_heads", "ffn", "vocab"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(b < 1 for b in args.batch) or any(n < 1 for n in args.prompt):
        p.error("--batch and --prompt values must be >= 1")
    if args.heads % args.kv_heads:
        p.error("--heads must be a multiple of --kv-heads")
    if args.pp < 1 or args.pp > args.layers:
        p.error(f"--pp must be in [1, --layers={args.layers}], got {args.pp}")
    return args


def build_models(args, device, dtype, pp_size=1, pp_rank=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megatron_k15.testing import gpt_from_hf

    torch.manual_seed(args.seed)
    hf = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, tie_word_embeddings=False,
        max_position_embeddings=max(args.prompt) + args.new_tokens + 16,
        bos_token_id=1, eos_token_id=2)).eval()
    ours = gpt_from_hf(hf, attention_backend="auto", pp_size=pp_size, pp_rank=pp_rank).to(
        device=device, dtype=dtype).eval()
    return hf.to(device=device, dtype=dtype), ours


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _clock(device):
    return time.perf_counter() if device.type == "cuda" else time.process_time()


def time_ours(model, prompts, budgets, args, device) -> float:
    from megatron_k15.generation.engine import GenerationEngine
    from megatron_k15.generation.sampling import SamplingParams

    engine = GenerationEngine(model, block_size=args.block_size, max_batch_size=len(prompts))
    engine.generate([prompts[0]], 2, SamplingParams(temperature=0.0), None, [])  # warm-up
    best = float("inf")
    for _ in range(args.repeat):
        _sync(device)
        t0 = _clock(device)
        out = engine.generate(prompts, budgets, SamplingParams(temperature=0.0), None, [])
        _sync(device)
        assert [len(r.output_ids) for r in out] == budgets
        best = min(best, _clock(device) - t0)
    return best


@torch.no_grad()
def time_hf(hf, prompts, budgets, args, device) -> float:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as decoder-only batched generation needs
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    new = max(budgets)
    kw = dict(do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0, eos_token_id=None)
    hf.generate(ids[:1], attention_mask=mask[:1], **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})
    best = float("inf")
    for _ in range(args.repeat):
        _sync(device)
        t0 = _clock(device)
        out = hf.generate(ids, attention_mask=mask, **kw)
        _sync(device)
        assert out.shape[1] == width + new
        best = min(best, _clock(device) - t0)
    return best


def bandwidth_bound(model, batch, context, device) -> float:
    """tokens/s if one decode step only had to read the weights and the batch's K/V once."""
    if device.type != "cuda":
        return float("nan")
    name = torch.cuda.get_device_name(device)
    tbs = next((v for k, v in KNOWN_BANDWIDTH_TBS.items() if k in name), 3.35)
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    elem = next(model.parameters()).element_size()
    kv = 2 * cfg.num_layers * cfg.num_query_groups * cfg.head_dim * elem * batch * context
    return batch / ((weights + kv) / (tbs * 1e12))


def make_workload(args, workload, prompt_len, batch, gen):
    """(prompts, budgets) of one table row (see the module docstring)."""
    if workload == "uniform":
        lengths, budgets = [prompt_len] * batch, [args.new_tokens] * batch
    else:
        lengths = torch.randint(max(1, prompt_len // 8), prompt_len + 1, (batch,), generator=gen).tolist()
        budgets = torch.randint(max(1, args.new_tokens // 8), args.new_tokens + 1, (batch,),
                                generator=gen).tolist()
    prompts = [torch.randint(3, args.vocab, (n,), generator=gen).tolist() for n in lengths]
    if workload == "rl":
        k = max(1, min(args.samples_per_prompt, batch))
        prompts = [prompts[i - i % k] for i in range(batch)]
    return prompts, budgets


def _pipeline_rank(rank, world_size, args, rows):
    """One pipeline stage: wall seconds of every row with 1 lane and with ``world_size`` lanes."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_k15.generation.engine import GenerationEngine
    from megatron_k15.generation.sampling import SamplingParams
    from megatron_k15.initialize import initialize_model_parallel

    initialize_model_parallel(pp=world_size)
    torch.set_num_threads(max(1, args.threads))
    _, model = build_models(args, torch.device("cpu"), torch.float32, world_size,
                            parallel_state.get_pipeline_model_parallel_rank())
    group = parallel_state.get_pipeline_model_parallel_group()
    greedy = SamplingParams(temperature=0.0)
    seconds = []
    for prompts, budgets in rows:
        row = {}
        for lanes in (1, world_size):
            engine = GenerationEngine(model, block_size=args.block_size, max_batch_size=len(prompts),
                                      pp_group=group, num_lanes=lanes)
            engine.generate([prompts[0]], 2, greedy, None, [])  # warm-up
            dist.barrier()
            t0 = time.perf_counter()
            engine.generate(prompts, budgets, greedy, None, [])
            dist.barrier()
            row[lanes] = time.perf_counter() - t0
        seconds.append(row)
    return seconds


def pipeline_main(args) -> int:
    from megatron_k15.testing import run_distributed

    gen = torch.Generator().manual_seed(args.seed)
    rows, labels = [], []
    for workload in args.workload:
        for prompt_len in args.prompt:
            for batch in args.batch:
                rows.append(make_workload(args, workload, prompt_len, batch, gen))
                labels.append((workload, batch, prompt_len))
    per_rank = run_distributed(_pipeline_rank, args.pp, args, rows, timeout=3600)
    print(f"# pipelined decode on CPU: {args.pp} stages (gloo ranks), {args.layers} layers, hidden "
          f"{args.hidden}, {args.threads or 'default'} torch thread(s) per rank, greedy, wall clock")
    print(f"| workload | batch | prompt | 1 lane tokens/s | {args.pp} lanes tokens/s | speed-up |")
    print("|---|---|---|---|---|---|")
    for (workload, batch, prompt_len), (_, budgets), i in zip(labels, rows, range(len(rows))):
        one = max(r[i][1] for r in per_rank)
        many = max(r[i][args.pp] for r in per_rank)
        tokens = sum(budgets)
        print(f"| {workload} | {batch} | {prompt_len} | {tokens / one:,.0f} | {tokens / many:,.0f} | "
              f"{one / many:.2f}x |", flush=True)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.pp > 1:
        return pipeline_main(args)
    from megatron_k15.initialize import initialize_model_parallel

    initialize_model_parallel(1)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    hf, ours = build_models(args, device, dtype)
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"# {n_params / 1e6:.1f}M parameters, {dtype}, {device}"
          f"{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}, "
          f"{args.new_tokens} new tokens, torch threads {torch.get_num_threads()}")
    unit = "tokens/s" if device.type == "cuda" else "tokens/CPU-s"
    print(f"| workload | batch | prompt | ours {unit} | transformers {unit} | speed-up | bound tokens/s |")
    print("|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(args.seed)
    hf_too_slow = args.skip_hf
    for workload in args.workload:
        for prompt_len in args.prompt:
            for batch in args.batch:
                prompts, budgets = make_workload(args, workload, prompt_len, batch, gen)
                tokens = sum(budgets)
                ours_tps = tokens / time_ours(ours, prompts, budgets, args, device)
                hf_tps = float("nan")
                if not hf_too_slow:
                    seconds = time_hf(hf, prompts, budgets, args, device)
                    hf_tps = tokens / seconds
                    hf_too_slow = seconds > args.max_hf_seconds
                bound = bandwidth_bound(ours, batch, prompt_len + args.new_tokens, device)
                speedup = ours_tps / hf_tps if hf_tps == hf_tps else float("nan")
                print(f"| {workload} | {batch} | {prompt_len} | {ours_tps:,.0f} | {hf_tps:,.0f} | "
                      f"{speedup:.2f}x | {bound:,.0f} |", flush=True)
    if args.profile_ops:
        print(profile_ops(lambda: time_ours(ours, prompts, budgets, args, device), args.profile_ops,
                          f"our engine on {workload} batch {batch} x {prompt_len} + {args.new_tokens} tokens "
                          f"under torch.profiler, the {args.profile_ops} most expensive ops:"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
