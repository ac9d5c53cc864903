#!/usr/bin/env python
"""Write synthetic, verifiable SFT and RL data (DESIGN.md section 5), offline and deterministic.

    python tools/make_synthetic_data.py --out-dir data/synth --seed 1234 \\
        --num-sft 2000 --num-rl 1000 --num-eval 200 --levels 1,2,3 --template minimal

Outputs in --out-dir:

- ``sft.jsonl``           ``{"prompt": str, "response": str}`` per line;
- ``rl_prompts.jsonl``    prompt records ``{"id", "prompt", "task": "math", "answer": str,
                          "difficulty": int}`` (plus ``--code-problems`` records with
                          ``"task": "code"`` and ``"tests": [{"input", "output"}]``);
- ``eval_prompts.jsonl``  held-out math prompt records, same format.

Math problem families, by difficulty level (M is --max-operand):

    1  single-digit addition             3+4                operands 0..min(9, M)
    2  two-digit addition/subtraction    12+7, 53-18        operands 0..min(99, M), at least
                                                            one >= 10, results >= 0
    3  multiplication of small numbers   6*7                factors 2..min(12, M)
    4  two-operation expressions         5+3*4, 3*4+5, 3*4-5
                                                            operands 1..min(12, M), result >= 0
    5  small linear equations            Solve for x: 3x + 4 = 19   (answer "5")
                                                            coefficient 2..min(9, M), constant
                                                            1..min(20, M), x 0..min(12, M)

--max-operand defaults to 99. Every problem appears at most once across all three
files (sft, rl, eval are disjoint). Problems are spread evenly over --levels; a level with fewer
distinct problems than its share (level 1 has only 100) gives all it has and the other
levels make up the difference (a note says so), and every split gets each level in about
the same proportion. The run fails with a clear error when all levels together have fewer
distinct problems than requested.

Templates: ``minimal`` (for a tiny byte-level model: prompt ``12+7=``, response ``19``;
equations ``3x+4=19,x=``), ``cot`` (prompt ``What is 12 + 7? Think step by step.``, response
a short reasoning ending in ``The answer is \\boxed{19}.``). Every SFT response verifies
against its answer with :func:`megatron_k15.rewards.math.verify`.

The same --seed and flags always give byte-identical files. Files are written under
temporary names and renamed into place only after all of them are complete.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Optional

LEVELS = (1, 2, 3, 4, 5)
LEVEL_NAMES = {
    1: "single-digit addition",
    2: "two-digit addition/subtraction",
    3: "multiplication",
    4: "two-operation expressions",
    5: "linear equations",
}
TEMPLATES = ("minimal", "cot")
DEFAULT_MAX_OPERAND = 99


# ----------------------------------------------------------------------------------------
# Math problems


@dataclass(frozen=True)
class MathProblem:
    """One arithmetic problem; ``key`` identifies it across splits and templates."""

    level: int
    kind: str  # "binop", "expr2" or "linear"
    nums: tuple  # operands; see _render_* for their meaning per kind
    ops: tuple  # operator characters
    answer: int

    @property
    def key(self) -> str:
        if self.kind == "linear":
            a, b, c = self.nums
            return f"{a}x{self.ops[0]}{b}={c}"
        if self.kind == "binop":
            return f"{self.nums[0]}{self.ops[0]}{self.nums[1]}"
        a, b, c = self.nums
        return f"{a}{self.ops[0]}{b}{self.ops[1]}{c}"


def _level_pool(level: int, max_operand: int) -> list[MathProblem]:
    """Every distinct problem of a level, in a fixed order."""
    m = max_operand
    out: list[MathProblem] = []
    if level == 1:
        hi = min(9, m)
        for a in range(hi + 1):
            for b in range(hi + 1):
                out.append(MathProblem(1, "binop", (a, b), ("+",), a + b))
    elif level == 2:
        hi = min(99, m)
        for a in range(hi + 1):
            for b in range(hi + 1):
                if a < 10 and b < 10:
                    continue
                out.append(MathProblem(2, "binop", (a, b), ("+",), a + b))
                if a >= b:
                    out.append(MathProblem(2, "binop", (a, b), ("-",), a - b))
    elif level == 3:
        hi = min(12, m)
        for a in range(2, hi + 1):
            for b in range(2, hi + 1):
                out.append(MathProblem(3, "binop", (a, b), ("*",), a * b))
    elif level == 4:
        hi = min(12, m)
        for a in range(1, hi + 1):
            for b in range(1, hi + 1):
                for c in range(1, hi + 1):
                    # a + b*c, a*b + c, a*b - c
                    out.append(MathProblem(4, "expr2", (a, b, c), ("+", "*"), a + b * c))
                    out.append(MathProblem(4, "expr2", (a, b, c), ("*", "+"), a * b + c))
                    if a * b - c >= 0:
                        out.append(MathProblem(4, "expr2", (a, b, c), ("*", "-"), a * b - c))
    elif level == 5:
        for a in range(2, min(9, m) + 1):
            for b in range(1, min(20, m) + 1):
                for x in range(0, min(12, m) + 1):
                    out.append(MathProblem(5, "linear", (a, b, a * x + b), ("+",), x))
                    if a * x - b >= 0:
                        out.append(MathProblem(5, "linear", (a, b, a * x - b), ("-",), x))
    else:  # pragma: no cover - levels are validated by the argument parser
        raise ValueError(f"unknown level {level}")
    return out


def _sp(op: str) -> str:
    return f" {op} "


def render_prompt(p: MathProblem, template: str) -> str:
    if p.kind == "linear":
        a, b, c = p.nums
        if template == "minimal":
            return f"{a}x{p.ops[0]}{b}={c},x="
        return f"Solve for x: {a}x{_sp(p.ops[0])}{b} = {c}. Think step by step."
    if template == "minimal":
        return p.key + "="
    if p.kind == "binop":
        expr = f"{p.nums[0]}{_sp(p.ops[0])}{p.nums[1]}"
    else:
        a, b, c = p.nums
        expr = f"{a}{_sp(p.ops[0])}{b}{_sp(p.ops[1])}{c}"
    return f"What is {expr}? Think step by step."


def render_response(p: MathProblem, template: str) -> str:
    ans = str(p.answer)
    if template == "minimal":
        return ans
    if p.kind == "binop":
        a, b = p.nums
        op = p.ops[0]
        if op == "+":
            steps = f"We add {a} and {b}: {a} + {b} = {ans}."
        elif op == "-":
            steps = f"We subtract {b} from {a}: {a} - {b} = {ans}."
        else:
            steps = f"We multiply {a} by {b}: {a} * {b} = {ans}."
    elif p.kind == "expr2":
        a, b, c = p.nums
        if p.ops[0] == "+":  # a + b*c
            steps = (f"Multiplication comes before addition: {b} * {c} = {b * c}. "
                     f"Then {a} + {b * c} = {ans}.")
        else:  # a*b +/- c
            verb = "addition" if p.ops[1] == "+" else "subtraction"
            steps = (f"Multiplication comes before {verb}: {a} * {b} = {a * b}. "
                     f"Then {a * b}{_sp(p.ops[1])}{c} = {ans}.")
    else:
        a, b, c = p.nums
        if p.ops[0] == "+":
            first = f"Subtract {b} from both sides: {a}x = {c} - {b} = {c - b}."
            rhs = c - b
        else:
            first = f"Add {b} to both sides: {a}x = {c} + {b} = {c + b}."
            rhs = c + b
        steps = f"{first} Divide both sides by {a}: x = {rhs} / {a} = {ans}."
    return f"{steps}\nThe answer is \\boxed{{{ans}}}."


# ----------------------------------------------------------------------------------------
# Code problems


@dataclass
class CodeProblem:
    key: str
    statement: str
    difficulty: int
    solution: str
    make_input: Callable[[random.Random], str] = field(repr=False)


def _ints(rng: random.Random, n: int, lo: int = -100, hi: int = 100) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(n)]


def _list_input(rng: random.Random) -> str:
    n = rng.randint(1, 8)
    return f"{n}\n{' '.join(map(str, _ints(rng, n)))}\n"


def _word(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 12)))


def _code_pool() -> list[CodeProblem]:
    """Distinct code problems with a reference solution and a random-input generator."""
    two = lambda r: " ".join(map(str, _ints(r, 2))) + "\n"  # noqa: E731
    one_nat = lambda r: f"{r.randint(0, 100)}\n"  # noqa: E731
    one_int = lambda r: f"{r.randint(-1000, 1000)}\n"  # noqa: E731
    pool = [
        CodeProblem("sum2", "Read two integers a and b separated by a space on one line and "
                    "print their sum.", 1,
                    "a, b = map(int, input().split())\nprint(a + b)\n", two),
        CodeProblem("diff2", "Read two integers a and b separated by a space on one line and "
                    "print a - b.", 1,
                    "a, b = map(int, input().split())\nprint(a - b)\n", two),
        CodeProblem("prod2", "Read two integers a and b separated by a space on one line and "
                    "print their product.", 1,
                    "a, b = map(int, input().split())\nprint(a * b)\n", two),
        CodeProblem("max2", "Read two integers a and b separated by a space on one line and "
                    "print the larger of the two.", 1,
                    "a, b = map(int, input().split())\nprint(max(a, b))\n", two),
        CodeProblem("parity", "Read an integer n and print EVEN if it is even, else ODD.", 1,
                    "n = int(input())\nprint('EVEN' if n % 2 == 0 else 'ODD')\n", one_int),
        CodeProblem("strlen", "Read a word and print its length.", 1,
                    "print(len(input().strip()))\n", lambda r: _word(r) + "\n"),
        CodeProblem("reverse", "Read a word and print it reversed.", 1,
                    "print(input().strip()[::-1])\n", lambda r: _word(r) + "\n"),
        CodeProblem("vowels", "Read a lowercase word and print how many vowels (a, e, i, o, u) "
                    "it contains.", 2,
                    "print(sum(c in 'aeiou' for c in input().strip()))\n",
                    lambda r: _word(r) + "\n"),
        CodeProblem("triangular", "Read a non-negative integer n and print 1 + 2 + ... + n "
                    "(0 when n is 0).", 2,
                    "n = int(input())\nprint(n * (n + 1) // 2)\n", one_nat),
        CodeProblem("listmax", "Read an integer n on the first line and n integers on the "
                    "second line; print the largest of them.", 2,
                    "input()\nprint(max(map(int, input().split())))\n", _list_input),
        CodeProblem("listmin", "Read an integer n on the first line and n integers on the "
                    "second line; print the smallest of them.", 2,
                    "input()\nprint(min(map(int, input().split())))\n", _list_input),
        CodeProblem("listsum", "Read an integer n on the first line and n integers on the "
                    "second line; print their sum.", 2,
                    "input()\nprint(sum(map(int, input().split())))\n", _list_input),
        CodeProblem("sort", "Read an integer n on the first line and n integers on the second "
                    "line; print them in ascending order separated by spaces.", 2,
                    "input()\nprint(*sorted(map(int, input().split())))\n", _list_input),
        CodeProblem("factorial", "Read an integer n (0 <= n <= 12) and print n factorial.", 2,
                    "import math\nprint(math.factorial(int(input())))\n",
                    lambda r: f"{r.randint(0, 12)}\n"),
    ]
    # Parametric families: each constant makes a distinct problem.
    for k in range(2, 21):
        pool.append(CodeProblem(f"mul{k}", f"Read an integer n and print n multiplied by {k}.",
                                1, f"print(int(input()) * {k})\n", one_int))
    for k in range(1, 51):
        pool.append(CodeProblem(f"add{k}", f"Read an integer n and print n + {k}.",
                                1, f"print(int(input()) + {k})\n", one_int))
    for k in range(2, 11):
        pool.append(CodeProblem(f"mod{k}", f"Read a non-negative integer n and print the "
                                f"remainder of n divided by {k}.", 1,
                                f"print(int(input()) % {k})\n", one_nat))
    return pool


CODE_POOL_SIZE = len(_code_pool())


def _run_reference(solution: str, stdin: str) -> str:
    """Output of a reference solution (trusted code we wrote) on ``stdin``, in-process."""
    import contextlib
    import io

    lines = iter(stdin.splitlines())
    out = io.StringIO()
    env = {"__name__": "__main__", "input": lambda *a: next(lines)}
    with contextlib.redirect_stdout(out):
        exec(compile(solution, "<reference>", "exec"), env)  # noqa: S102
    return out.getvalue()


def render_code_prompt(p: CodeProblem, template: str) -> str:
    text = f"Write a Python program that reads from standard input and writes to standard " \
           f"output. {p.statement}"
    if template == "cot":
        text += " Think step by step, then give the program in a ```python code block."
    else:
        text += " Reply with the program in a ```python code block."
    return text


# ----------------------------------------------------------------------------------------
# Generation


def _allocate(split_sizes: list[int], capacity: dict[int, int]) -> list[dict[int, int]]:
    """How many problems of each level every split gets.

    First the total is spread evenly over the levels, a level with too few distinct problems
    giving all it has and the rest going to the others ("water filling"); then each level's
    share is divided among the splits in proportion to their sizes (largest remainder), so
    every split sees every level in about the same proportion.
    """
    total = sum(split_sizes)
    order = sorted(capacity, key=lambda lv: (capacity[lv], lv))
    level_total: dict[int, int] = {}
    left = total
    for i, lv in enumerate(order):
        k = len(order) - i
        level_total[lv] = min(capacity[lv], -(-left // k))
        left -= level_total[lv]
    if left > 0:
        raise ValueError("not enough distinct problems")
    remaining = dict(level_total)
    n_left = total
    out = []
    for n in split_sizes:
        quota: dict[int, int] = {}
        if n_left == 0:
            out.append({lv: 0 for lv in capacity})
            continue
        fracs = []
        for lv in sorted(capacity):
            t = n * remaining[lv] / n_left
            quota[lv] = int(t)
            fracs.append((-(t - int(t)), lv))
        short = n - sum(quota.values())
        for _, lv in sorted(fracs)[:short]:
            quota[lv] += 1
        for lv in quota:
            remaining[lv] -= quota[lv]
        n_left -= n
        out.append(quota)
    return out


def generate(num_sft: int, num_rl: int, num_eval: int, levels: list[int], max_operand: int,
             template: str, seed: int, code_problems: int = 0, code_tests: int = 5) -> dict:
    """All records, in memory. Returns ``{"sft": [...], "rl": [...], "eval": [...],
    "solutions": {id: reference program}}``. Raises ValueError when a request cannot be
    met (the message names the flag)."""
    rng = random.Random(seed)
    splits = (("eval", num_eval), ("rl", num_rl), ("sft", num_sft))

    pools: dict[int, list[MathProblem]] = {}
    for lv in sorted(set(levels)):
        pool = _level_pool(lv, max_operand)
        # Each level gets its own stream so adding a level does not reshuffle the others.
        random.Random(f"{seed}:level{lv}").shuffle(pool)
        pools[lv] = pool
    capacity = {lv: len(pool) for lv, pool in pools.items()}
    for lv, c in sorted(capacity.items()):
        if c == 0:
            raise ValueError(f"--levels includes {lv} ({LEVEL_NAMES[lv]}) but --max-operand "
                             f"{max_operand} leaves no problems of that level")
    total = sum(n for _, n in splits)
    if total > sum(capacity.values()):
        detail = ", ".join(f"level {lv}: {c}" for lv, c in sorted(capacity.items()))
        raise ValueError(
            f"--num-sft/--num-rl/--num-eval ask for {total} distinct problems but --levels "
            f"{','.join(map(str, levels))} with --max-operand {max_operand} have only "
            f"{sum(capacity.values())} ({detail}); lower the counts, add levels or raise "
            f"--max-operand")
    quotas = _allocate([n for _, n in splits], capacity)
    notes = [f"level {lv} ({LEVEL_NAMES[lv]}) has only {c} distinct problems with "
             f"--max-operand {max_operand}; the other levels make up the difference"
             for lv, c in sorted(capacity.items())
             if sum(q[lv] for q in quotas) == c and total > c * len(capacity)]

    taken = {lv: 0 for lv in pools}
    chosen: dict[str, list[MathProblem]] = {}
    for (name, _), quota in zip(splits, quotas):
        picks = []
        for lv in sorted(quota):
            picks.extend(pools[lv][taken[lv]: taken[lv] + quota[lv]])
            taken[lv] += quota[lv]
        rng.shuffle(picks)
        chosen[name] = picks

    def prompt_record(split: str, i: int, p: MathProblem) -> dict:
        return {"id": f"{split}-{i:06d}", "prompt": render_prompt(p, template), "task": "math",
                "answer": str(p.answer), "difficulty": p.level}

    out: dict = {
        "eval": [prompt_record("eval", i, p) for i, p in enumerate(chosen["eval"])],
        "rl": [prompt_record("rl", i, p) for i, p in enumerate(chosen["rl"])],
        "sft": [{"prompt": render_prompt(p, template), "response": render_response(p, template)}
                for p in chosen["sft"]],
        "solutions": {},
        "levels": {name: [p.level for p in chosen[name]] for name, _ in splits},
        "notes": notes,
    }

    if code_problems:
        pool = _code_pool()
        if code_problems > len(pool):
            raise ValueError(f"--code-problems {code_problems}: only {len(pool)} distinct code "
                             f"problems are available")
        crng = random.Random(f"{seed}:code")
        picks = crng.sample(pool, code_problems)
        for i, p in enumerate(picks):
            tests, seen = [], set()
            for _ in range(code_tests * 20):
                if len(tests) == code_tests:
                    break
                inp = p.make_input(crng)
                if inp in seen:
                    continue
                seen.add(inp)
                tests.append({"input": inp, "output": _run_reference(p.solution, inp)})
            rid = f"rl-code-{i:06d}"
            out["rl"].append({"id": rid, "prompt": render_code_prompt(p, template),
                              "task": "code", "tests": tests, "difficulty": p.difficulty})
            out["solutions"][rid] = p.solution
        out["levels"]["code"] = [p.difficulty for p in picks]
    return out


def _dumps_lines(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_outputs(out_dir: str, data: dict) -> dict[str, str]:
    """Write the three files atomically: all go to temporary names first, then renamed."""
    os.makedirs(out_dir, exist_ok=True)
    files = {"sft.jsonl": data["sft"], "rl_prompts.jsonl": data["rl"],
             "eval_prompts.jsonl": data["eval"]}
    tmp_paths: dict[str, str] = {}
    try:
        for name, records in files.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out_dir)
            tmp_paths[name] = tmp
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
                f.write(_dumps_lines(records))
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
        final = {}
        for name, tmp in tmp_paths.items():
            dst = os.path.join(out_dir, name)
            os.replace(tmp, dst)
            final[name] = dst
        return final
    except BaseException:
        for tmp in tmp_paths.values():
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        raise


# ----------------------------------------------------------------------------------------
# Command line


def _nonneg_int(flag: str):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {s!r}")
        if v < 0:
            raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {s!r}")
        return v

    parse.__name__ = flag
    return parse


def _pos_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _levels(s: str) -> list[int]:
    out = []
    for part in s.split(","):
        part = part.strip()
        if not part:
            raise argparse.ArgumentTypeError(f"empty level in {s!r} (expected e.g. 1,2,3)")
        try:
            lv = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"level {part!r} is not an integer "
                                             f"(choose from {','.join(map(str, LEVELS))})")
        if lv not in LEVELS:
            raise argparse.ArgumentTypeError(f"unknown level {lv} "
                                             f"(choose from {','.join(map(str, LEVELS))})")
        if lv in out:
            raise argparse.ArgumentTypeError(f"level {lv} is listed twice in {s!r}")
        out.append(lv)
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="Write deterministic synthetic math (and optional code) data: "
                    "sft.jsonl, rl_prompts.jsonl and eval_prompts.jsonl, with disjoint "
                    "problems. Levels: " + "; ".join(f"{k} = {v}" for k, v in
                                                      LEVEL_NAMES.items()) + ".",
        epilog="Example: python tools/make_synthetic_data.py --out-dir data/synth "
               "--num-sft 2000 --num-rl 1000 --num-eval 200 --levels 1,2 --template minimal")
    ap.add_argument("--out-dir", required=True, help="directory for the three .jsonl files "
                    "(created if missing; existing files are replaced)")
    ap.add_argument("--seed", type=int, default=1234, help="random seed (default 1234); the "
                    "same seed and flags give byte-identical files")
    ap.add_argument("--num-sft", type=_nonneg_int("--num-sft"), default=1000,
                    help="SFT examples (default 1000)")
    ap.add_argument("--num-rl", type=_nonneg_int("--num-rl"), default=500,
                    help="RL math prompts (default 500)")
    ap.add_argument("--num-eval", type=_nonneg_int("--num-eval"), default=200,
                    help="held-out evaluation math prompts (default 200)")
    ap.add_argument("--levels", type=_levels, default=list(LEVELS),
                    help="comma-separated difficulty levels to draw from, e.g. 1,2,3 "
                         "(default 1,2,3,4,5); problems are spread evenly over them")
    ap.add_argument("--max-operand", type=_pos_int, default=DEFAULT_MAX_OPERAND,
                    help="upper bound on the numbers in a problem (each level also has its "
                         f"own cap, see the module docstring; default {DEFAULT_MAX_OPERAND})")
    ap.add_argument("--template", choices=TEMPLATES, default="minimal",
                    help="minimal: '12+7=' -> '19' (tiny byte-level models); cot: "
                         "'What is 12 + 7? Think step by step.' -> reasoning + "
                         "'The answer is \\boxed{19}.' (default minimal)")
    ap.add_argument("--code-problems", type=_nonneg_int("--code-problems"), default=0,
                    help=f"add N code problems (task 'code', with tests) to rl_prompts.jsonl "
                         f"(at most {CODE_POOL_SIZE}; default 0)")
    ap.add_argument("--code-tests", type=_pos_int, default=5,
                    help="tests per code problem (default 5)")
    ap.add_argument("--quiet", action="store_true", help="do not print the summary")
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.num_sft + args.num_rl + args.num_eval + args.code_problems == 0:
        ap.error("--num-sft, --num-rl, --num-eval and --code-problems are all 0: nothing to write")
    if args.code_problems > CODE_POOL_SIZE:
        ap.error(f"--code-problems: at most {CODE_POOL_SIZE} distinct code problems are "
                 f"available, got {args.code_problems}")
    try:
        data = generate(args.num_sft, args.num_rl, args.num_eval, args.levels,
                        args.max_operand, args.template, args.seed,
                        code_problems=args.code_problems, code_tests=args.code_tests)
    except ValueError as e:
        ap.error(str(e))
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        ap.error(f"--out-dir {args.out_dir!r} exists and is not a directory")
    try:
        paths = write_outputs(args.out_dir, data)
    except OSError as e:
        print(f"make_synthetic_data.py: error: cannot write to --out-dir {args.out_dir!r}: {e}",
              file=sys.stderr)
        return 1
    for note in data["notes"]:
        print(f"note: {note}", file=sys.stderr)
    if not args.quiet:
        print(f"wrote {args.out_dir} (seed {args.seed}, template {args.template}, "
              f"max operand {args.max_operand})")
        names = {"sft": "sft.jsonl", "rl": "rl_prompts.jsonl", "eval": "eval_prompts.jsonl"}
        for split in ("sft", "rl", "eval"):
            lv = data["levels"][split]
            counts = ", ".join(f"L{k}={lv.count(k)}" for k in args.levels)
            extra = ""
            if split == "rl" and args.code_problems:
                extra = f" + {args.code_problems} code"
            print(f"  {names[split]:<20} {len(lv):>7} math ({counts}){extra}  "
                  f"-> {paths[names[split]]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
