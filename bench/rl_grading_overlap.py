"""How much of an RL iteration's grading --overlap-grading hides behind the rollout (no GPU needed).

    python bench/rl_grading_overlap.py [--prompts 8] [--samples 8] [--max-tokens 256] [--tests 5]
                                       [--workers 1 2] [--iterations 2]

One rank, a tiny random model and code prompts: every response runs in the code reward's
sandbox (a random model's response is no program, so each stops at the first of --tests
tests, as most wrong answers do). For each --reward-workers count the same iterations run
with the responses graded after the rollout and while it goes on; the table prints the
rollout's and the remaining grading's seconds (``rollout_time_s``, ``score_time_s``) per
iteration. The rewards are the same either way (checked).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rl_args(overlap: bool, workers: int, samples: int, max_tokens: int) -> argparse.Namespace:
    """train_rl's flags with their defaults, as the CLI would parse them for this run."""
    import torch

    from megatron_k15.arguments import build_parser
    from megatron_k15.models.config import preset
    from megatron_k15.train_rl import add_rl_args

    parser = build_parser(extra_args_provider=add_rl_args,
                          groups=("model", "parallel", "precision", "training", "checkpoint", "inference"))
    args = parser.parse_args([
        "--prompt-data", "unused", "--samples-per-prompt", str(samples), "--rollout-max-tokens", str(max_tokens),
        "--rollout-batch-size", "64", "--reward-workers", str(workers), "--lr", "1e-4",
        "--micro-batch-size", "8", "--attention-backend", "sdpa",
        "--overlap-grading" if overlap else "--no-overlap-grading"])
    args.model_config = preset("tiny", num_layers=2)
    args.params_dtype = torch.float32
    return args


def run(overlap: bool, workers: int, a) -> list[dict]:
    from megatron_k15.data.tokenizer import ByteTokenizer
    from megatron_k15.rl.trainer import RLIteration
    from megatron_k15.training import build_train_context

    args = rl_args(overlap, workers, a.samples, a.max_tokens)
    ctx = build_train_context(args, args.model_config, seed=1)
    tok = ByteTokenizer()
    tests = [{"input": f"{i} {i + 1}\n", "output": f"{2 * i + 1}\n"} for i in range(a.tests)]
    records = [{"id": f"p{i}", "prompt": f"Read a and b, print a+b. #{i}\n", "task": "code", "tests": tests}
               for i in range(a.prompts)]
    rl = RLIteration(ctx, args, tok, records, [tok.encode(r["prompt"]) for r in records])
    return [rl.run(it, list(range(a.prompts)), 1e-4) for it in range(a.iterations)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=8, help="responses per prompt")
    p.add_argument("--max-tokens", type=int, default=256, help="response budget")
    p.add_argument("--tests", type=int, default=5, help="tests per prompt")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="--reward-workers values")
    p.add_argument("--iterations", type=int, default=2)
    a = p.parse_args(argv)
    import torch

    from megatron_k15.initialize import initialize_model_parallel

    torch.set_num_threads(1)
    initialize_model_parallel(1)
    print(f"{a.prompts} prompts x {a.samples} responses of up to {a.max_tokens} tokens, {a.tests} code tests "
          f"each, {a.iterations} iterations (mean per iteration; the first includes warm-up)")
    print(f"{'workers':>7} {'grading':>8} {'rollout s':>10} {'grading left s':>15} {'sum s':>7}")
    for workers in a.workers:
        rewards = {}
        for overlap in (False, True):
            t0 = time.time()
            metrics = run(overlap, workers, a)
            rollout = sum(m["rollout_time_s"] for m in metrics) / len(metrics)
            score = sum(m["score_time_s"] for m in metrics) / len(metrics)
            rewards[overlap] = [m.get("reward_mean") for m in metrics]
            print(f"{workers:>7} {'during' if overlap else 'after':>8} {rollout:>10.2f} {score:>15.2f} "
                  f"{rollout + score:>7.2f}   ({time.time() - t0:.1f} s in all)")
        if rewards[False] != rewards[True]:
            print(f"rewards differ: {rewards}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
