#!/usr/bin/env python
"""Build verified stdin/stdout tests for code prompts from reference solutions (Kimi k1.5 §2.3).

    python tools/build_code_tests.py --input problems.jsonl --output code_prompts.jsonl \\
        --num-generated 50 --max-solutions 10 --test-agreement 0.7 --problem-pass-rate 0.9 \\
        --min-tests 40 --workers 8

Each line of --input is a code problem: a prompt record with ``solutions`` (Python programs
believed correct) and candidate inputs (``test_inputs``, an ``input_generator`` program that
reads a seed on stdin and prints one input, and/or ``tests`` whose outputs are then checked),
e.g. ``{"id": "p1", "prompt": "Read a and b, print a+b.", "solutions": ["..."],
"input_generator": "import random\\nrandom.seed(int(input()))\\nprint(random.randint(1, 9), 7)"}``.
Call-based problems (``fn_name``: LeetCode / APPS style, a function called with arguments)
take ``test_inputs`` as JSON argument lists, generators that print one, and vote on the
returned values (``megatron_k15/data/code_tests.py``). APPS / TACO and CodeContests lines are
read as they are (``megatron_k15/data/public_formats.py``): their scraped tests become
candidate inputs, kept only where the solutions agree with the stated output.

Generators written by a model, as Kimi did: --write-generator-prompts FILE writes
--generator-samples prompts per problem asking for one; run them through the generate CLI
(``python -m megatron_k15.generate --input FILE --output gens.jsonl --chat-template ...``,
which keeps each line's ``id`` and adds the answer as ``text``) and pass --generators
gens.jsonl: the program in each answer becomes one of its problem's input generators.

Every program runs in the code reward's sandbox. An input becomes a test when at least
--test-agreement of the sampled solutions print the same output (the expected output); a
problem is kept when it has at least --min-tests tests and at least --problem-pass-rate of
its solutions pass all of them. Kept problems are written as code prompt records (DESIGN.md
section 5) with ``tests``, in input order, without ``solutions``/``test_inputs``/
``input_generator`` (--keep-solutions keeps the solutions). The output is written under a
temporary name and renamed when complete. A bad line stops the run before any program runs,
with exit code 1, "FILE:LINE: field 'NAME': ..." on stderr and no output file.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from tqdm import tqdm

if importlib.util.find_spec("megatron_k15") is None:  # run from a checkout: tools/ sits next to it
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_k15.data.code_tests import (DROP_DISAGREE, DROP_FEW_TESTS, DROP_NO_INPUTS,  # noqa: E402
                                          BuildSettings, build_problem_tests, generator_prompt,
                                          has_input_source, validate_code_problem)
from megatron_k15.data.prompts import DataError, read_jsonl, read_prompt_records  # noqa: E402
from megatron_k15.files import atomic_file  # noqa: E402
from megatron_k15.rewards.code import extract_program  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="build_code_tests.py",
        description="Tests for code prompts on which sampled reference solutions agree (Kimi k1.5 "
                    "test-case generation).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2] if __doc__ else None,
    )
    d = BuildSettings()
    p.add_argument("--input", required=True, metavar="FILE.jsonl", help="code problems with solutions")
    p.add_argument("--output", default=None, metavar="FILE.jsonl", help="code prompt JSONL to write")
    p.add_argument("--generators", default=None, metavar="FILE.jsonl",
                   help="generate CLI output on --write-generator-prompts' prompts: the program in each "
                        "line's 'text' is an input generator of the problem with its 'id'")
    p.add_argument("--write-generator-prompts", default=None, metavar="FILE.jsonl",
                   help="only write prompts asking a model for input generators, then stop")
    p.add_argument("--generator-samples", type=int, default=4, metavar="K",
                   help="generator prompts per problem (--write-generator-prompts)")
    p.add_argument("--num-generated", type=int, default=d.num_generated, metavar="N",
                   help="inputs asked of each input_generator (seeds 0..N-1)")
    p.add_argument("--max-solutions", type=int, default=d.max_solutions, metavar="N",
                   help="solutions sampled per problem (all when it has fewer)")
    p.add_argument("--test-agreement", type=float, default=d.test_agreement, metavar="P",
                   help="fraction of the sampled solutions that must print the same output")
    p.add_argument("--problem-pass-rate", type=float, default=d.problem_pass_rate, metavar="P",
                   help="fraction of the sampled solutions that must pass every selected test")
    p.add_argument("--min-tests", type=int, default=d.min_tests, metavar="N", help="drop problems with fewer tests")
    p.add_argument("--max-tests", type=int, default=None, metavar="N", help="keep at most N tests per problem")
    p.add_argument("--timeout-s", type=float, default=d.timeout_s, metavar="S",
                   help="wall-clock limit per program run (a record's timeout_s wins)")
    p.add_argument("--memory-mb", type=int, default=d.memory_mb, metavar="MB", help="address-space limit per run")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the solution sampling")
    p.add_argument("--keep-solutions", action="store_true", help="keep the solutions in the output records")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="problems built in parallel (threads)")
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if (args.output is None) == (args.write_generator_prompts is None):
        parser.error("give --output (build the tests) or --write-generator-prompts (ask a model for "
                     "input generators first), not both or neither")
    if args.generator_samples < 1:
        parser.error(f"--generator-samples must be >= 1, got {args.generator_samples}")
    for flag in ("test_agreement", "problem_pass_rate"):
        v = getattr(args, flag)
        if not 0.0 < v <= 1.0:
            parser.error(f"--{flag.replace('_', '-')} must be in (0, 1], got {v}")
    if args.test_agreement <= 0.5:
        parser.error(f"--test-agreement {args.test_agreement}: at most half the solutions could then "
                     "outvote the rest; use a value above 0.5")
    for flag, low in (("num_generated", 0), ("max_solutions", 1), ("min_tests", 1), ("workers", 1)):
        if getattr(args, flag) < low:
            parser.error(f"--{flag.replace('_', '-')} must be >= {low}, got {getattr(args, flag)}")
    if args.max_tests is not None and args.max_tests < args.min_tests:
        parser.error(f"--max-tests {args.max_tests} is below --min-tests {args.min_tests}")
    if args.timeout_s <= 0:
        parser.error(f"--timeout-s must be > 0, got {args.timeout_s}")
    if args.memory_mb < 64:
        parser.error(f"--memory-mb {args.memory_mb}: the Python interpreter alone needs more; use >= 64")


def settings_from(args: argparse.Namespace) -> BuildSettings:
    """The flags of the same names (every BuildSettings field is one)."""
    return BuildSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BuildSettings)})


def write_generator_prompts(args: argparse.Namespace) -> int:
    """``--generator-samples`` prompts per problem asking for an input generator; returns the
    number of lines written."""
    records = read_problems(args.input)
    with atomic_file(args.write_generator_prompts) as f:
        for _, rec in records:
            line = json.dumps({"id": rec["id"], "prompt": generator_prompt(rec)},
                              ensure_ascii=False)
            f.write((line + "\n") * args.generator_samples)
    return len(records) * args.generator_samples


def read_problems(path: str) -> list:
    if not os.path.isfile(path):
        raise DataError(path, None, None, "no such file (--input)")
    return list(read_prompt_records(path, validate_record=validate_code_problem, with_lineno=True))


def add_generators(records: list, path: str, counts: Counter) -> None:
    """The programs in the generate CLI's answers (``--generators``) join their problems'."""
    if not os.path.isfile(path):
        raise DataError(path, None, None, "no such file (--generators)")
    by_id = {rec["id"]: rec for _, rec in records}
    for _, line in read_jsonl(path, {"id": (str, int), "text": str}, with_lineno=True):
        rec = by_id.get(str(line["id"]))
        # a fenced program only: prose without one would run as a "program" 50 times for nothing
        program = extract_program(line["text"]).strip() if "```" in line["text"] else ""
        if rec is None:
            counts["generator answers for ids not in --input"] += 1
        elif not program:
            counts["generator answers without a program"] += 1
        else:
            rec.setdefault("input_generator", []).append(program + "\n")
            counts["model-written generators"] += 1


def run(args: argparse.Namespace, progress: bool = True) -> Counter:
    """Write ``args.output``; returns the counts. DataError on bad input (no output then)."""
    numbered = read_problems(args.input)
    counts: Counter = Counter()
    if args.generators:
        add_generators(numbered, args.generators, counts)
    for line, rec in numbered:
        if not has_input_source(rec):
            raise DataError(args.input, line, "test_inputs", "missing: give test_inputs, an input_generator "
                                                             "or tests (or its generators in --generators)")
    records = [rec for _, rec in numbered]
    build = functools.partial(build_problem_tests, s=settings_from(args))
    results = []
    # threads: each problem's work is waiting on its sandboxed programs, as in grading
    with ThreadPoolExecutor(min(args.workers, len(records))) as pool, \
            tqdm(total=len(records), unit="problem", desc="build_code_tests", file=sys.stderr,
                 dynamic_ncols=True, disable=not progress) as bar:
        for res in pool.map(build, records):  # in input order
            results.append(res)
            bar.update()
    counts.update({"kept": 0, DROP_NO_INPUTS: 0, DROP_FEW_TESTS: 0, DROP_DISAGREE: 0})
    kept = []
    for res in results:
        counts.update(res.counts)
        if res.record is None:
            counts[res.reason] += 1
        else:
            kept.append(res.record)
            counts["kept"] += 1
            counts["tests in kept problems"] += len(res.record["tests"])
    counts["problems"] = len(records)
    if not kept:
        raise DataError(args.input, None, None, f"every one of the {len(records)} problems was dropped "
                                                f"({_drops(counts)}); nothing written")
    with atomic_file(args.output) as f:
        for rec in kept:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return counts


def _drops(counts: Counter) -> str:
    return ", ".join(f"{counts[k]} {k}" for k in (DROP_NO_INPUTS, DROP_FEW_TESTS, DROP_DISAGREE))


def main(argv: Optional[list] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        if args.write_generator_prompts:
            n = write_generator_prompts(args)
            print(f"wrote {args.write_generator_prompts}: {n} prompts asking for input generators")
            return 0
        counts = run(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    per = counts["tests in kept problems"] / max(1, counts["kept"])
    print(f"wrote {args.output}: kept {counts['kept']} of {counts['problems']} problems (dropped: {_drops(counts)}); "
          f"{per:.1f} tests per kept problem from {counts['candidate inputs']} candidate inputs; "
          f"{counts['given tests contradicted']} given tests contradicted by the solutions; "
          f"{counts['repeated solutions']} repeated solutions counted once; "
          f"{counts['generator runs failed']} generator and {counts['solution runs failed']} solution runs failed"
          + "".join(f"; {counts[k]} {k}" for k in ("model-written generators", "generator answers without a program",
                                                  "generator answers for ids not in --input") if counts[k]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
