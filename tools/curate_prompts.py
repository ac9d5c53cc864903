#!/usr/bin/env python
"""Curate an RL prompt set from the SFT model's own results (Kimi k1.5 section 2.1).

    # difficulty: each prompt sampled 10 times at a high temperature
    python tools/evaluate.py --load ckpt/sft --input prompts.jsonl --output pass.jsonl \\
        --n-samples 10 --temperature 1.0 --max-new-tokens 8192
    # easy to hack: answered without reasoning (no room for it, or a prompt asking for the answer
    # only); --reasoning-tags none grades the bare answer (a cut-off <think> block scores 0)
    python tools/evaluate.py --load ckpt/sft --input prompts.jsonl --output nocot.jsonl \\
        --n-samples 8 --temperature 1.0 --max-new-tokens 16 --reasoning-tags none
    python tools/curate_prompts.py --input prompts.jsonl --results pass.jsonl \\
        --no-cot-results nocot.jsonl --max-pass-rate 0.9 --output curated.jsonl

Every prompt of --input gets ``pass_rate`` (its correct samples / samples in --results) and
``difficulty = 1 - pass_rate`` (Kimi's model-based difficulty: what the curriculum sampler
orders by, and the prioritized sampler starts from ``pass_rate`` as the prompt's success
rate), and is kept unless:

- its pass rate is below --min-pass-rate or above --max-pass-rate (a prompt every sample
  solves teaches nothing: --max-pass-rate 0.9; one none solves may be mislabelled:
  --min-pass-rate 0.01 drops those), or
- with --no-cot-results, more than --max-no-cot-correct of its samples answered correctly
  without reasoning: its answer can be guessed, so rewarding it would reward guessing.

Records keep their other fields and their order. The output is written under a temporary name
and renamed when complete. A bad line in any input (invalid JSON, a missing or mistyped
field, a duplicate id, a prompt without results) stops the run with exit code 1,
"FILE:LINE: field 'NAME': ..." on stderr and no output file.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections import Counter
from typing import Optional

if importlib.util.find_spec("megatron_k15") is None:  # run from a checkout: tools/ sits next to it
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_k15.data.eval_results import read_eval_results  # noqa: E402
from megatron_k15.data.prompts import DataError, FieldError, read_prompt_records  # noqa: E402
from megatron_k15.files import atomic_file  # noqa: E402

DROP_EASY = "pass rate above --max-pass-rate"
DROP_HARD = "pass rate below --min-pass-rate"
DROP_HACKABLE = "answered without reasoning (--no-cot-results)"


def correct_counts(path: str, flag: str) -> dict[str, tuple[int, int]]:
    """id -> (correct samples, samples) of a tools/evaluate.py results file."""
    if not os.path.isfile(path):
        raise DataError(path, None, None, f"no such file ({flag})")
    return {r["id"]: (sum(s["correct"] for s in r["samples"]), len(r["samples"]))
            for _, r in read_eval_results(path)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="curate_prompts.py",
        description="Difficulty from pass rates and removal of easy-to-hack prompts (Kimi k1.5 "
                    "RL prompt curation).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2] if __doc__ else None,
    )
    p.add_argument("--input", required=True, metavar="FILE.jsonl", help="the prompt JSONL (DESIGN.md section 5)")
    p.add_argument("--results", required=True, metavar="FILE.jsonl",
                   help="tools/evaluate.py --output on --input, several samples per prompt")
    p.add_argument("--no-cot-results", default=None, metavar="FILE.jsonl",
                   help="tools/evaluate.py --output of answers without reasoning (e.g. --max-new-tokens 16)")
    p.add_argument("--output", required=True, metavar="FILE.jsonl", help="curated prompt JSONL to write")
    p.add_argument("--min-pass-rate", type=float, default=0.0, metavar="P", help="drop prompts solved less often")
    p.add_argument("--max-pass-rate", type=float, default=1.0, metavar="P", help="drop prompts solved more often")
    p.add_argument("--max-no-cot-correct", type=int, default=0, metavar="N",
                   help="drop prompts with more than N correct answers in --no-cot-results")
    return p


def run(args: argparse.Namespace) -> Counter:
    """Write ``args.output``; returns the counts. DataError on bad input (no output then)."""
    if not os.path.isfile(args.input):
        raise DataError(args.input, None, None, "no such file (--input)")
    numbered = list(read_prompt_records(args.input, with_lineno=True))
    records = [r for _, r in numbered]
    passes = correct_counts(args.results, "--results")
    no_cot = correct_counts(args.no_cot_results, "--no-cot-results") if args.no_cot_results else None
    for table, flag, path in ((passes, "--results", args.results), (no_cot, "--no-cot-results", args.no_cot_results)):
        missing = [(line, r["id"]) for line, r in numbered if table is not None and r["id"] not in table]
        if missing:
            raise DataError(args.input, missing[0][0], "id", f"{missing[0][1]!r} has no results in {flag} {path} "
                                                             f"({len(missing)} prompts without)")
    counts: Counter = Counter({"kept": 0, DROP_EASY: 0, DROP_HARD: 0})
    if no_cot is not None:
        counts[DROP_HACKABLE] = 0
    kept = []
    ids = {r["id"] for r in records}
    counts["results of prompts not in --input"] = sum(rid not in ids for rid in passes)
    if no_cot is not None and not any(c for c, _ in no_cot.values()):
        print(f"warning: --no-cot-results {args.no_cot_results}: no sample is correct, so no prompt is "
              f"dropped as easy to hack; was it graded with --reasoning-tags none?", file=sys.stderr)
    for r in records:
        c, n = passes[r["id"]]
        rate = c / n
        if no_cot is not None and no_cot[r["id"]][0] > args.max_no_cot_correct:
            counts[DROP_HACKABLE] += 1
        elif rate > args.max_pass_rate:
            counts[DROP_EASY] += 1
        elif rate < args.min_pass_rate:
            counts[DROP_HARD] += 1
        else:
            # (n - c) / n, not 1 - rate: 7 of 10 must give 0.3 exactly (--curriculum-threshold 0.3)
            kept.append({**r, "pass_rate": rate, "difficulty": (n - c) / n})
            counts["kept"] += 1
            counts[f"difficulty bin {min(4, 5 * (n - c) // n)}"] += 1
    if not kept:
        raise DataError(args.input, None, None, f"every one of the {len(records)} prompts was dropped "
                                                f"({_drops(counts)}); nothing written")
    with atomic_file(args.output) as f:
        for rec in kept:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    counts["prompts"] = len(records)
    return counts


def _drops(counts: Counter) -> str:
    return ", ".join(f"{counts[k]} {k}" for k in (DROP_HACKABLE, DROP_EASY, DROP_HARD) if k in counts)


def main(argv: Optional[list] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("min_pass_rate", "max_pass_rate"):
        v = getattr(args, flag)
        if not 0.0 <= v <= 1.0:
            parser.error(f"--{flag.replace('_', '-')} must be in [0, 1], got {v}")
    if args.min_pass_rate > args.max_pass_rate:
        parser.error(f"--min-pass-rate {args.min_pass_rate} is above --max-pass-rate {args.max_pass_rate}")
    if args.max_no_cot_correct < 0:
        parser.error(f"--max-no-cot-correct must be >= 0, got {args.max_no_cot_correct}")
    try:
        counts = run(args)
    except (DataError, FieldError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    bins = " ".join(f"[{b / 5:.1f},{(b + 1) / 5:.1f}{']' if b == 4 else ')'}: {counts[f'difficulty bin {b}']}"
                    for b in range(5))
    extra = counts["results of prompts not in --input"]
    print(f"wrote {args.output}: kept {counts['kept']} of {counts['prompts']} prompts (dropped: {_drops(counts)}); "
          f"difficulty {bins}" + (f"; {extra} results of prompts not in --input ignored" if extra else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
