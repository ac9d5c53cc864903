"""Stdin/stdout tests for code prompts, built from reference solutions (Kimi k1.5 section 2.3).

Many coding problems come without tests, and scraped tests can be wrong. Kimi's recipe: produce
candidate inputs (a generator program, 50 per problem), run ~10 sampled ground-truth
solutions on each, keep an input as a test when at least 7 of the 10 print the same output
(that output becomes the expected one), and keep the problem when at least 9 of the 10 pass
every kept test. Problems with several right answers need the record's own ``checker``
(``rewards.code``): the votes then count the outputs it accepts against each candidate
(every pair of an input's distinct outputs, in one sandboxed run per input), and the kept
test stores the candidate with the most votes as the reference the checker will see; without
one, their solutions rarely agree and too few inputs become tests (--min-tests). Inputs on which
the solutions agree to print nothing are not tests (an empty program would pass them).
Identical solutions count once. Votes use the checker the code reward will apply to the
record (its ``compare`` and ``float_tolerance``): at a tolerance of 1e-6, "0.333333" and
"0.3333333" agree.

Problem records are prompt records (``data/prompts.py``; ``task`` defaults to ``"code"``,
``tests`` may be absent) with:

- ``solutions``: a non-empty list of Python programs (stdin -> stdout) believed correct;
- candidate inputs from any of: ``test_inputs`` (list of str), ``input_generator`` (a Python
  program, or a list of them, that reads an integer seed on stdin and prints one input; it
  runs in the sandbox, standard library only), and the inputs of ``tests`` already given
  (their stated outputs must agree with the solutions', else the test is dropped and counted).

Kimi had the model write the generators: :data:`GENERATOR_PROMPT` asks for one, and the
programs in the answers (``rewards.code.extract_program``) join the problem's generators.

Call-based problems (``fn_name``, LeetCode / APPS style; ``rewards.code``): an input is the
JSON list of the function's arguments (``test_inputs`` holds such lists; a generator prints
one as JSON), an output the returned value, and votes compare values
(``rewards.code.values_match``). Inputs on which the solutions agree to return nothing (null)
are not tests either.

Every program runs in the code reward's sandbox (``rewards/code.py``), with the record's
``timeout_s`` when it has one.
"""

from __future__ import annotations

import functools
import json
import math
import operator
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

from megatron_k15.data.prompts import FieldError, _type_name, validate_prompt_record
from megatron_k15.data.public_formats import prompt_dataset_fields
from megatron_k15.rewards.code import (is_json_value, normalize_output, outputs_match, returned_value_matches,
                                       run_tests, values_match)

__all__ = ["BuildSettings", "CALL_GENERATOR_PROMPT", "GENERATOR_PROMPT", "ProblemResult", "at_least",
           "build_problem_tests", "generator_prompt",
           "has_input_source", "select_tests", "solutions_passing", "validate_code_problem"]

PROBLEM_FIELDS = ("solutions", "incorrect_solutions", "test_inputs", "input_generator")

GENERATOR_PROMPT = (
    "Below is a programming problem. Write a Python 3 program that generates one random, valid "
    "test input for it. The program reads one integer seed from standard input, calls "
    "random.seed with it, and prints the input exactly in the format the problem specifies, "
    "within all of its constraints (prefer small and medium sizes, and include edge cases "
    "sometimes). Use only the standard library. Reply with the program in one ```python block."
    "\n\nProblem:\n{problem}")

# a call-based problem's generator prints the function's arguments instead of an input text
CALL_GENERATOR_PROMPT = (
    "Below is a programming problem solved by a Python function named {fn_name}. Write a Python 3 "
    "program that generates the arguments of one random, valid call of it. The program reads one "
    "integer seed from standard input, calls random.seed with it, and prints one line: a JSON list "
    "of the positional arguments (json.dumps), within all of the problem's constraints (prefer "
    "small and medium sizes, and include edge cases sometimes). Use only the standard library. "
    "Reply with the program in one ```python block.\n\nProblem:\n{problem}")


def generator_prompt(rec: Mapping) -> str:
    """The prompt asking a model for ``rec``'s input generator (stdin text or call arguments)."""
    if rec.get("fn_name") is not None:
        return CALL_GENERATOR_PROMPT.format(fn_name=rec["fn_name"], problem=rec["prompt"])
    return GENERATOR_PROMPT.format(problem=rec["prompt"])


def _str_list(obj: Mapping, name: str, *, non_empty_items: bool) -> list[str]:
    v = obj[name]
    if not isinstance(v, list):
        raise FieldError(name, f"expected a list of strings, got {_type_name(v)}")
    for i, item in enumerate(v):
        if not isinstance(item, str):
            raise FieldError(f"{name}[{i}]", f"expected a string, got {_type_name(item)}")
        if non_empty_items and not item.strip():
            raise FieldError(f"{name}[{i}]", "is empty")
    return list(v)


def validate_code_problem(obj: Mapping, default_id: Optional[str] = None) -> dict:
    """A normalised copy of one problem record (module docstring); FieldError if bad."""
    obj = prompt_dataset_fields(obj, with_solutions=True)  # APPS / TACO / CodeContests: solutions as a list of programs
    obj = {**obj, "task": obj.get("task") or "code"}
    if obj.get("tests") == []:  # no scraped tests: the same as none given
        obj.pop("tests")
    rec = validate_prompt_record(obj, default_id, tests_required=False)
    if obj.get("solutions") is None:
        raise FieldError("solutions", "missing (reference programs that decide the expected outputs)")
    rec["solutions"] = _str_list(obj, "solutions", non_empty_items=True)
    if not rec["solutions"]:
        raise FieldError("solutions", "is empty")
    if obj.get("test_inputs") is not None and rec.get("fn_name") is not None:  # argument lists
        v = obj["test_inputs"]
        if not isinstance(v, list):
            raise FieldError("test_inputs", f"expected a list of argument lists, got {_type_name(v)}")
        for i, item in enumerate(v):
            if not isinstance(item, list) or not is_json_value(item):
                raise FieldError(f"test_inputs[{i}]", "expected a JSON list of the function's arguments "
                                 f"(fn_name is set), got {_type_name(item)}")
        rec["test_inputs"] = list(v)
    elif obj.get("test_inputs") is not None:
        rec["test_inputs"] = _str_list(obj, "test_inputs", non_empty_items=False)
    gen = obj.get("input_generator")
    if gen is not None:
        if isinstance(gen, str):
            if not gen.strip():
                raise FieldError("input_generator", "is empty")
            rec["input_generator"] = [gen]
        else:
            rec["input_generator"] = _str_list(obj, "input_generator", non_empty_items=True)
    return rec


def _canonical(value) -> str:
    """One text per JSON value (keys sorted): call-based inputs and outputs vote as strings."""
    return json.dumps(value, sort_keys=True)


def has_input_source(rec: Mapping) -> bool:
    """Whether a problem has candidate inputs: test_inputs, generators or given tests."""
    return bool(rec.get("test_inputs") or rec.get("input_generator") or rec.get("tests"))


def at_least(fraction: float, n: int) -> int:
    """The smallest count that is at least ``fraction`` of ``n``: 0.55 of 100 is 55, not 56
    (as ``ceil(0.55 * 100)`` gives: 0.55 * 100 is 55.00000000000001 in floating point)."""
    return max(1, math.ceil(round(fraction * n, 9)))


def select_tests(inputs: Sequence[str], outputs: Sequence[Sequence[Optional[str]]], min_agree: int,
                 same: Callable[[str, str], bool] = operator.eq,
                 same_at: Optional[Callable[[int], Callable[[str, str], bool]]] = None) -> list[tuple[int, str, int]]:
    """Tests on which the solutions agree: ``outputs[s][i]`` is solution s's output on
    ``inputs[i]`` (None: it did not run to completion), ``same(got, want)`` the checker. An
    output's votes are the outputs it accepts as expected answer (with a tolerance these need
    not accept each other); the expected output is the one with the most votes, the longest
    among equals (the most digits, so that answers near the others' rounding still pass).
    Returns ``(i, output, votes)`` for each input whose expected output has at least
    ``min_agree`` votes, no output it rejects as many (a tie decides nothing) and is not
    blank."""
    chosen = []
    for i in range(len(inputs)):
        counts = Counter(o[i] for o in outputs if o[i] is not None)  # distinct outputs, once each
        if not counts:
            continue
        sm = same if same_at is None else same_at(i)
        # a candidate the checker rejects as an answer to itself is no answer (a custom checker
        # may ignore the reference: a wrong output would collect the right ones' votes)
        votes = {c: sum(n for x, n in counts.items() if sm(x, c)) if sm(c, c) else 0 for c in counts}
        top = max(votes.values())
        best = max((c for c in counts if votes[c] == top), key=len)  # Counter keeps first-seen order
        if top < min_agree or any(v == top and not sm(c, best) for c, v in votes.items()):
            continue
        if not best.strip():  # agreed on printing nothing: a program that prints nothing passes it
            continue
        chosen.append((i, best, top))
    return chosen


def solutions_passing(outputs: Sequence[Sequence[Optional[str]]], tests: Sequence[tuple[int, str, int]],
                      same: Callable[[str, str], bool] = operator.eq,
                      same_at: Optional[Callable[[int], Callable[[str, str], bool]]] = None) -> int:
    """How many solutions print an accepted output on every selected test (``same_at(i)``: the
    checker of input i, for custom checkers whose verdicts depend on the input)."""
    def ok(i, got, want):
        return got is not None and (same if same_at is None else same_at(i))(got, want)
    return sum(all(ok(i, o[i], want) for i, want, _ in tests) for o in outputs)


@dataclass
class BuildSettings:
    """The recipe's knobs (Kimi's: 50 generated inputs, 10 solutions, 7 of 10 agree, 9 of 10 pass)."""
    num_generated: int = 50
    max_solutions: int = 10
    test_agreement: float = 0.7
    problem_pass_rate: float = 0.9
    min_tests: int = 1
    max_tests: Optional[int] = None
    timeout_s: float = 4.0
    memory_mb: int = 1024
    seed: int = 0
    keep_solutions: bool = False


@dataclass
class ProblemResult:
    """One problem's outcome: ``record`` (None when dropped, with ``reason``) and counts."""
    record: Optional[dict]
    reason: Optional[str] = None
    counts: Counter = field(default_factory=Counter)


DROP_NO_INPUTS = "no test inputs (the generators failed on every seed)"
DROP_FEW_TESTS = "fewer than --min-tests inputs the solutions agree on"
DROP_DISAGREE = "too few solutions pass every selected test (--problem-pass-rate)"


def _run_outputs(program: str, inputs: Sequence[str], s: BuildSettings, timeout_s: float,
                 fn_name: Optional[str] = None) -> list[Optional[str]]:
    """``program``'s stdout on each input (None where it timed out, crashed or hit a limit);
    with ``fn_name`` the canonical JSON of what the function returned on each (canonical JSON)
    argument list."""
    if fn_name is None:
        tests = [{"input": x, "output": ""} for x in inputs]
    else:
        tests = [{"input": json.loads(x), "output": ""} for x in inputs]  # output unused: kept, not judged
    res = run_tests(program, tests, timeout_s, memory_mb=s.memory_mb, keep_output=True, fn_name=fn_name)
    out: list[Optional[str]] = [None] * len(inputs)
    for i, r in enumerate(res["results"][:len(inputs)]):
        if r["status"] not in ("ok", "failed"):  # ran to completion ("failed": not the stated output)
            continue
        if fn_name is None:
            out[i] = r.get("stdout", "")
        elif r.get("returned") is not None:
            try:
                out[i] = _canonical(json.loads(r["returned"]))
            except ValueError:
                pass
    return out


def _generated_arguments(text: Optional[str]) -> Optional[str]:
    """A generator's output for a call-based problem: a JSON list of arguments, canonical."""
    try:
        value = json.loads(text) if text is not None else None
    except ValueError:
        return None
    return _canonical(value) if isinstance(value, list) and is_json_value(value) else None


def _custom_checker_votes(checker: str, inputs, outputs, given: dict, s: BuildSettings, timeout_s: float):
    """``same_at(i)`` for a record with a custom checker: its verdict on every pair of the
    distinct outputs of input i (and on each against a given test's output), asked in one
    sandboxed run per input; a pair it was not asked about, or an input whose run failed,
    counts as rejected."""
    from megatron_k15.rewards.code import checker_verdicts

    cases = []
    for i, inp in enumerate(inputs):
        distinct = list(dict.fromkeys(o[i] for o in outputs if o[i] is not None))
        wants = distinct + ([given[inp]] if given.get(inp) is not None and given[inp] not in distinct else [])
        cases.append((inp, [(x, w) for w in wants for x in distinct]))
    # the checker sees what the code reward will give it: outputs as printed and the stored
    # expected output, each ending in a newline (the votes compare them normalised)
    verdicts = checker_verdicts(checker, [(inp, [(x + "\n", w + "\n") for x, w in pairs]) for inp, pairs in cases],
                                timeout_s, s.memory_mb)
    accepted = [{pair for pair, ok in zip(pairs, v or []) if ok} for (_, pairs), v in zip(cases, verdicts)]
    return lambda i: (lambda got, want: (got, want) in accepted[i])


def build_problem_tests(rec: dict, s: BuildSettings) -> ProblemResult:
    """Candidate inputs -> sampled solutions' outputs -> agreed tests -> keep or drop (module
    docstring). The kept record is a code prompt record with ``tests`` (and without the
    solutions unless ``keep_solutions``)."""
    counts: Counter = Counter()
    timeout_s = float(rec.get("timeout_s", s.timeout_s))
    fn_name = rec.get("fn_name")  # call-based: inputs and outputs are canonical JSON texts
    given: dict = {}
    for t in rec.get("tests") or []:  # two scraped tests of one input that disagree: neither is trusted
        if fn_name is None:
            inp, out = t["input"], normalize_output(t["output"])
        else:
            inp, out = _canonical(t["input"]), _canonical(t["output"])
        given[inp] = out if given.get(inp, out) == out else None
    inputs = [x if fn_name is None else _canonical(x) for x in rec.get("test_inputs") or []] + list(given)
    for generator in rec.get("input_generator") or []:
        generated = _run_outputs(generator, [f"{k}\n" for k in range(s.num_generated)], s, timeout_s)
        if fn_name is not None:
            generated = [_generated_arguments(g) for g in generated]
        counts["generator runs failed"] += sum(g is None for g in generated)
        inputs += [g for g in generated if g is not None]
    inputs = list(dict.fromkeys(inputs))  # distinct, in order
    counts["candidate inputs"] += len(inputs)
    if not inputs:
        return ProblemResult(None, DROP_NO_INPUTS, counts)
    solutions = list(dict.fromkeys(rec["solutions"]))  # a repeated program is one vote
    counts["repeated solutions"] += len(rec["solutions"]) - len(solutions)
    if len(solutions) > s.max_solutions:
        solutions = random.Random(f"{s.seed}:{rec['id']}").sample(solutions, s.max_solutions)
    outputs = [_run_outputs(p, inputs, s, timeout_s, fn_name) for p in solutions]
    if fn_name is None:
        outputs = [[None if o is None else normalize_output(o) for o in row] for row in outputs]
    counts["solution runs failed"] += sum(o is None for row in outputs for o in row)
    # the checker the code reward will use on this record, so that the votes count what it accepts
    same_at = None
    if fn_name is None and rec.get("checker") is not None:  # its verdicts on every pair, per input
        same, same_at = operator.eq, _custom_checker_votes(rec["checker"], inputs, outputs, given, s, timeout_s)
    elif fn_name is None:
        same = functools.partial(outputs_match, compare=rec.get("compare", "lines"),
                                 float_tolerance=rec.get("float_tolerance"))
    else:
        tol = rec.get("float_tolerance")
        def same(got, want):
            try:
                return values_match(json.loads(got), json.loads(want), tol)
            except RecursionError:  # nested too deep to compare: no agreement
                return False
    tests = select_tests(inputs, outputs, at_least(s.test_agreement, len(solutions)), same, same_at)
    if fn_name is not None:  # agreed to return nothing: a function that does nothing passes it
        tests = [t for t in tests if t[1] != "null"]
    def contradicts(i, out):  # the given test's output against the agreed one (the checker: the
        want = given[inputs[i]]  # agreed output judged with the given one as the reference)
        if want is None:
            return True
        if same_at is not None:
            return not same_at(i)(out, want)
        if fn_name is not None:  # APPS / TACO's stated [v] stands for v (wrapped_outputs)
            try:
                return not returned_value_matches(json.loads(out), json.loads(want), rec.get("float_tolerance"),
                                                  bool(rec.get("wrapped_outputs")))
            except RecursionError:
                return True
        return not same(want, out)

    contradicted = {i for i, out, _ in tests if inputs[i] in given and contradicts(i, out)}
    counts["given tests contradicted"] += len(contradicted)
    tests = [t for t in tests if t[0] not in contradicted]
    if s.max_tests is not None:
        tests = tests[:s.max_tests]
    counts["tests"] += len(tests)
    if len(tests) < s.min_tests:
        return ProblemResult(None, DROP_FEW_TESTS, counts)
    if solutions_passing(outputs, tests, same, same_at) < at_least(s.problem_pass_rate, len(solutions)):
        return ProblemResult(None, DROP_DISAGREE, counts)
    # the kept tests hold what the solutions returned, unwrapped: wrapped_outputs no longer applies
    out = {k: v for k, v in rec.items() if (k not in PROBLEM_FIELDS or (s.keep_solutions and k == "solutions"))
           and k != "wrapped_outputs"}
    if fn_name is None:
        out["tests"] = [{"input": inputs[i], "output": want + "\n"} for i, want, _ in tests]
    else:
        out["tests"] = [{"input": json.loads(inputs[i]), "output": json.loads(want)} for i, want, _ in tests]
    return ProblemResult(out, None, counts)
