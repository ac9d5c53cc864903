#!/usr/bin/env python
"""Long2short data from tools/evaluate.py results: shortest-rejection SFT data or DPO pairs.

    python tools/evaluate.py --load ckpt/rl --input prompts.jsonl --output results.jsonl \\
        --n-samples 8 --temperature 1.0
    python tools/build_long2short_data.py --mode sft --results results.jsonl \\
        --prompts prompts.jsonl --output l2s_sft.jsonl
    python tools/build_long2short_data.py --mode dpo --results results.jsonl \\
        --prompts prompts.jsonl --output l2s_dpo.jsonl --length-ratio 1.5 --max-pairs-per-problem 4

Kimi k1.5's long2short recipes (DESIGN.md section 3), per problem of the results file (n
sampled responses, each with "correct" and "length" in tokens):

- sft (shortest rejection sampling): keep the shortest correct response (ties: the first) as
  {"id", "prompt", "response"}, the format tools/preprocess_data.py --mode sft reads.
- dpo: chosen = that shortest correct response (length L); rejected = every wrong response
  longer than L, then every other correct response of length >= --length-ratio * L, in
  sample order, at most --max-pairs-per-problem pairs; {"id", "prompt", "chosen", "rejected"},
  the format tools/preprocess_data.py --mode dpo reads.

Problems without a correct response (and, for dpo, without a rejected candidate) are skipped
and counted; when every problem is skipped nothing is written and the exit code is 1.
Responses whose text is empty are never used. The prompt text comes from the results
record's "prompt" if it has one, else from --prompts (the --input given to evaluate.py),
matched by id.

The output is written under a temporary name and renamed when complete. A bad results line
(invalid JSON, missing or mistyped field, duplicate id, id not in --prompts) stops the run
with exit code 1, "FILE:LINE: field 'NAME': ..." on stderr and no output file.
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
from megatron_k15.files import atomic_file  # noqa: E402
from megatron_k15.data.prompts import DataError, FieldError, read_prompt_records  # noqa: E402

SKIP_NO_CORRECT = "no correct response"
SKIP_NO_REJECTED = "no rejected candidate (no longer wrong response, no correct one >= ratio x longer)"


# -- the selection rules (pure functions of one problem's samples) ------------------------------
def shortest_correct(samples: list[dict]) -> Optional[int]:
    """Index of the shortest correct response with non-empty text (ties: the first), or None."""
    best = None
    for i, s in enumerate(samples):
        if s["correct"] and s["text"].strip() and (best is None or s["length"] < samples[best]["length"]):
            best = i
    return best


def dpo_pairs(samples: list[dict], length_ratio: float = 1.5, max_pairs: int = 4) -> list[tuple[int, int, str]]:
    """(chosen index, rejected index, kind) for one problem; kind "wrong" (a wrong response
    longer than the chosen) or "long" (a correct one >= length_ratio x the chosen's length).
    Wrong ones first, then long ones, each in sample order; texts already used are skipped;
    at most ``max_pairs``. Empty when there is no correct response."""
    c = shortest_correct(samples)
    if c is None:
        return []
    n_c = samples[c]["length"]
    wrong = [i for i, s in enumerate(samples) if not s["correct"] and s["length"] > n_c]
    long = [i for i, s in enumerate(samples)
            if s["correct"] and i != c and s["length"] >= length_ratio * n_c]
    out, seen = [], {samples[c]["text"]}
    for kind, idx in (("wrong", wrong), ("long", long)):
        for i in idx:
            text = samples[i]["text"]
            if len(out) >= max_pairs or not text.strip() or text in seen:
                continue
            seen.add(text)
            out.append((c, i, kind))
    return out


# -- the run ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="build_long2short_data.py",
        description="Shortest-rejection SFT data or DPO pairs from tools/evaluate.py results "
                    "(Kimi k1.5 long2short).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2] if __doc__ else None,
    )
    p.add_argument("--mode", choices=("sft", "dpo"), required=True,
                   help="sft: shortest correct response per problem; dpo: preference pairs")
    p.add_argument("--results", required=True, metavar="FILE.jsonl", help="tools/evaluate.py --output")
    p.add_argument("--prompts", default=None, metavar="FILE.jsonl",
                   help="the prompt JSONL evaluated (evaluate.py --input), for the prompt texts")
    p.add_argument("--output", required=True, metavar="FILE.jsonl", help="SFT or preference JSONL to write")
    p.add_argument("--length-ratio", type=float, default=1.5, metavar="R",
                   help="dpo: a correct response of length >= R x the shortest correct one is rejected")
    p.add_argument("--max-pairs-per-problem", type=int, default=4, metavar="N",
                   help="dpo: at most N pairs per problem")
    return p


def _load_prompts(path: Optional[str]) -> dict:
    if path is None:
        return {}
    if not os.path.isfile(path):
        raise DataError(path, None, None, "no such file (--prompts)")
    return {r["id"]: r["prompt"] for r in read_prompt_records(path)}


def _records(path: str, prompts: dict, prompts_path: Optional[str]):
    """(line, validated record with its prompt) for every results line."""

    def with_prompt(rec):
        if "prompt" not in rec:
            if rec["id"] not in prompts:
                if prompts_path is None:
                    raise FieldError("prompt", "missing (pass --prompts, the prompt JSONL given to evaluate.py)")
                raise FieldError("id", f"{rec['id']!r} is not in --prompts {prompts_path}")
            rec["prompt"] = prompts[rec["id"]]
        return rec

    return read_eval_results(path, with_prompt)


class NothingToWrite(RuntimeError):
    """Every problem was skipped."""


def run(args: argparse.Namespace) -> Counter:
    """Write ``args.output``; returns the counts. DataError on a bad line, NothingToWrite when
    every problem is skipped (no output file then)."""
    if not os.path.isfile(args.results):
        raise DataError(args.results, None, None, "no such file (--results)")
    prompts = _load_prompts(args.prompts)
    counts: Counter = Counter({"skipped: " + SKIP_NO_CORRECT: 0})
    if args.mode == "dpo":
        counts.update({"skipped: " + SKIP_NO_REJECTED: 0, "pairs with a wrong rejected": 0,
                       "pairs with a longer correct rejected": 0})
    with atomic_file(args.output) as f:
        for _lineno, rec in _records(args.results, prompts, args.prompts):
            counts["problems"] += 1
            samples = rec["samples"]
            counts["responses"] += len(samples)
            c = shortest_correct(samples)
            if c is None:
                counts["skipped: " + SKIP_NO_CORRECT] += 1
                continue
            if args.mode == "sft":
                rows = [{"id": rec["id"], "prompt": rec["prompt"], "response": samples[c]["text"]}]
            else:
                pairs = dpo_pairs(samples, args.length_ratio, args.max_pairs_per_problem)
                if not pairs:
                    counts["skipped: " + SKIP_NO_REJECTED] += 1
                    continue
                rows = [{"id": rec["id"], "prompt": rec["prompt"], "chosen": samples[ci]["text"],
                         "rejected": samples[ri]["text"]} for ci, ri, _ in pairs]
                for _, _, kind in pairs:
                    counts[f"pairs with a {'wrong' if kind == 'wrong' else 'longer correct'} rejected"] += 1
            counts["kept"] += 1
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                counts["records"] += 1
        if counts["records"] == 0:  # inside: the output is not written
            raise NothingToWrite(f"{args.results}: every one of the {counts['problems']} problems was skipped "
                                 f"({_skips(counts)}); nothing written")
    return counts


def _skips(counts: Counter) -> str:
    return ", ".join(f"{counts[k]} {k[len('skipped: '):]}" for k in sorted(counts) if k.startswith("skipped"))


def main(argv: Optional[list] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.length_ratio < 1.0:
        parser.error(f"--length-ratio must be >= 1, got {args.length_ratio}")
    if args.max_pairs_per_problem < 1:
        parser.error(f"--max-pairs-per-problem must be >= 1, got {args.max_pairs_per_problem}")
    try:
        counts = run(args)
    except (DataError, NothingToWrite) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    what = "SFT records" if args.mode == "sft" else "preference pairs"
    lines = [f"wrote {args.output} ({args.mode}): {counts['records']} {what} from {counts['problems']} problems "
             f"({counts['responses']} responses): kept {counts['kept']}, skipped "
             f"{counts['problems'] - counts['kept']} ({_skips(counts)})"]
    if args.mode == "dpo":
        lines.append(f"  rejected: {counts['pairs with a wrong rejected']} longer wrong, "
                     f"{counts['pairs with a longer correct rejected']} correct >= {args.length_ratio}x longer "
                     f"(at most {args.max_pairs_per_problem} pairs per problem)")
    print("\n".join(lines), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
