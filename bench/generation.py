"""Generation throughput: our KV-cached engine vs transformers' ``generate`` on the same model.

Both generate ``--new-tokens`` tokens for ``batch`` random prompts of ``prompt`` tokens with the
same random-weight Qwen2-shaped model (``--hidden``, ``--layers``, ...), greedy, no early stop
(EOS disabled), so both do exactly the same work. Tokens/s counts generated tokens over wall
time, prefill included. On a GPU the table adds the decode bandwidth bound of one step:

    bound tokens/s = batch / ((bytes of weights + bytes of K/V cached) / HBM bandwidth)

Examples:
    python bench/generation.py                                  # CPU-sized default grid
    python bench/generation.py --batch 1 64 256 --prompt 2048 --new-tokens 256 \\
        --hidden 896 --layers 24 --heads 14 --kv-heads 2 --ffn 4864 --vocab 151936  # GPU, 0.5B
    python bench/generation.py --skip-hf                        # ours only
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

KNOWN_BANDWIDTH_TBS = {"H200": 4.8, "H100": 3.35, "A100": 2.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32, 256])
    p.add_argument("--prompt", type=int, nargs="+", default=[64, 512])
    p.add_argument("--new-tokens", type=int, default=64)
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
    args = p.parse_args(argv)
    for name in ("new_tokens", "hidden", "layers", "heads", "kv_heads", "ffn", "vocab"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(b < 1 for b in args.batch) or any(n < 1 for n in args.prompt):
        p.error("--batch and --prompt values must be >= 1")
    if args.heads % args.kv_heads:
        p.error("--heads must be a multiple of --kv-heads")
    return args


def build_models(args, device, dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megatron_k15.testing import gpt_from_hf

    torch.manual_seed(args.seed)
    hf = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, tie_word_embeddings=False,
        max_position_embeddings=max(args.prompt) + args.new_tokens + 16,
        bos_token_id=1, eos_token_id=2)).eval()
    ours = gpt_from_hf(hf, attention_backend="auto").to(device=device, dtype=dtype).eval()
    return hf.to(device=device, dtype=dtype), ours


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ours(model, prompts, args, device) -> float:
    from megatron_k15.generation.engine import GenerationEngine
    from megatron_k15.generation.sampling import SamplingParams

    engine = GenerationEngine(model, block_size=args.block_size, max_batch_size=len(prompts))
    engine.generate([prompts[0]], 2, SamplingParams(temperature=0.0), None, [])  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    out = engine.generate(prompts, args.new_tokens, SamplingParams(temperature=0.0), None, [])
    _sync(device)
    assert all(len(r.output_ids) == args.new_tokens for r in out)
    return time.perf_counter() - t0


@torch.no_grad()
def time_hf(hf, prompts, args, device) -> float:
    ids = torch.tensor(prompts, device=device)  # equal lengths: no padding needed
    kw = dict(do_sample=False, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
              pad_token_id=0, eos_token_id=None)
    hf.generate(ids[:1], **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    out = hf.generate(ids, **kw)
    _sync(device)
    assert out.shape[1] == len(prompts[0]) + args.new_tokens
    return time.perf_counter() - t0


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


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_k15.initialize import initialize_model_parallel

    initialize_model_parallel(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    hf, ours = build_models(args, device, dtype)
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"# {n_params / 1e6:.1f}M parameters, {dtype}, {device}"
          f"{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}, "
          f"{args.new_tokens} new tokens, torch threads {torch.get_num_threads()}")
    print("| batch | prompt | ours tokens/s | transformers tokens/s | speed-up | bound tokens/s |")
    print("|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(args.seed)
    hf_too_slow = args.skip_hf
    for prompt_len in args.prompt:
        for batch in args.batch:
            prompts = torch.randint(3, args.vocab, (batch, prompt_len), generator=gen).tolist()
            tokens = batch * args.new_tokens
            ours_tps = tokens / time_ours(ours, prompts, args, device)
            hf_tps = float("nan")
            if not hf_too_slow:
                seconds = time_hf(hf, prompts, args, device)
                hf_tps = tokens / seconds
                hf_too_slow = seconds > args.max_hf_seconds
            bound = bandwidth_bound(ours, batch, prompt_len + args.new_tokens, device)
            speedup = ours_tps / hf_tps if hf_tps == hf_tps else float("nan")
            print(f"| {batch} | {prompt_len} | {ours_tps:,.0f} | {hf_tps:,.0f} | {speedup:.2f}x | "
                  f"{bound:,.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
