"""What packing RL trajectories into token-budget microbatches saves, from lengths alone.

    python bench/rl_packing.py [--trajectories 256] [--seed 0]

Long-CoT response lengths span orders of magnitude, so a padded (B, T) microbatch computes
B * T_max token positions and (causal) B * T_max^2 / 2 attention pairs for sum_i n_i useful
tokens and sum_i n_i^2 / 2 useful pairs. ``--use-dynamic-batch-size --max-tokens-per-gpu N``
(``rl/trainer.py pack_by_tokens``: first-fit decreasing, per-sequence attention boundaries)
computes only the useful ones, in microbatches of at most N tokens (a longer trajectory alone),
which also bounds activation memory by N instead of B * T_max. The table prints, per length
distribution of one iteration's trajectories on one data-parallel rank (in generation order,
i.e. unsorted), the useful fraction of token positions and of attention pairs, the number of
microbatches and the largest microbatch, for padded microbatches of 1/4/8 and packed budgets.
No GPU needed: it counts; the time saved on a GPU follows the fractions (MLP/GEMM work is
linear in tokens, attention in pairs).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import os

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_k15.rl.trainer import pack_by_tokens  # noqa: E402

PROMPT = 512


def lengths_for(name: str, n: int, rng: random.Random) -> list[int]:
    """Prompt + response lengths of ``n`` trajectories."""
    if name == "long-cot":  # median 4K, long tail to the 128K budget
        resp = [min(int(rng.lognormvariate(math.log(4096), 1.0)), 131072 - PROMPT) for _ in range(n)]
    elif name == "short-math":  # median 600, up to 8K
        resp = [min(int(rng.lognormvariate(math.log(600), 0.7)), 8192 - PROMPT) for _ in range(n)]
    else:  # uniform 1..32K
        resp = [rng.randint(1, 32768) for _ in range(n)]
    return [PROMPT + max(1, r) for r in resp]


def padded(lengths: list[int], mbs: int) -> tuple[int, int, int, int]:
    """(token positions, attention pairs, microbatches, largest microbatch) of padded (B, T)."""
    tokens = pairs = biggest = 0
    count = 0
    for s in range(0, len(lengths), mbs):
        part = lengths[s:s + mbs]
        t = max(part)
        tokens += len(part) * t
        pairs += len(part) * t * t // 2
        biggest = max(biggest, len(part) * t)
        count += 1
    return tokens, pairs, count, biggest


def packed(lengths: list[int], budget: int) -> tuple[int, int, int, int]:
    bins = pack_by_tokens(lengths, budget)
    sizes = [sum(lengths[i] for i in b) for b in bins]
    return sum(lengths), sum(n * n // 2 for n in lengths), len(bins), max(sizes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trajectories", type=int, default=256, help="per data-parallel rank and iteration")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(f"{args.trajectories} trajectories (prompt {PROMPT} tokens + response), seed {args.seed}")
    print(f"{'lengths':<11} {'microbatches':<16} {'useful tokens':>13} {'useful attn':>11} {'count':>6} "
          f"{'largest mb':>11}")
    for name in ("long-cot", "short-math", "uniform"):
        lengths = lengths_for(name, args.trajectories, random.Random(args.seed))
        useful_tokens, useful_pairs = sum(lengths), sum(n * n // 2 for n in lengths)
        rows = [(f"padded x{m}", padded(lengths, m)) for m in (1, 4, 8)]
        rows += [(f"packed {b // 1024}K", packed(lengths, b)) for b in (32768, 131072)]
        for label, (tokens, pairs, count, biggest) in rows:
            print(f"{name:<11} {label:<16} {useful_tokens / tokens:>13.1%} {useful_pairs / pairs:>11.1%} "
                  f"{count:>6} {biggest:>11,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
