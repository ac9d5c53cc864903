"""tools/build_code_tests.py: tests for code prompts decided by reference solutions (Kimi k1.5's
test-case generation), checked against outputs computed here and through the code reward."""

import functools
import json
import os
import subprocess
import sys

import pytest

from megatron_k15.data.code_tests import at_least, select_tests, solutions_passing
from megatron_k15.rewards.code import code_reward, outputs_match

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "build_code_tests.py")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX sandbox")

SUM_OK = ["a, b = map(int, input().split())\nprint(a + b)\n",
          "import sys\nprint(sum(int(x) for x in sys.stdin.read().split()))\n",
          "x = input().split()\nprint(int(x[0]) + int(x[1]))\n"]
SUM_WRONG = "a, b = map(int, input().split())\nprint(a + b + (a > 5))\n"  # off by one when a > 5
# reads a seed, prints one input: seeds 0..7 give 8 pairs, some with a > 5
SUM_GEN = "import random\nrandom.seed(int(input()))\nprint(random.randint(0, 9), random.randint(0, 9))\n"


def test_at_least_counts_exactly():
    assert [at_least(0.7, 10), at_least(0.9, 10), at_least(0.7, 3), at_least(0.9, 1), at_least(0.6, 5)] == \
        [7, 9, 3, 1, 3]
    # where a plain ceil is off by one: 0.55 * 100 = 55.00000000000001, 0.28 * 25 = 7.000000000000001
    assert [at_least(0.55, 100), at_least(0.28, 25)] == [55, 7]


def test_select_tests_needs_enough_votes_and_no_tie():
    inputs = ["i0", "i1", "i2", "i3"]
    outputs = [["a", "a", None, "x"]] * 6 + [["a", None, None, "x"]] + [["b", None, None, "y"]] * 3
    # i0: 7 votes for "a"; i1: 6 for "a" (4 did not run); i2: nothing ran; i3: 7 for "x"
    assert select_tests(inputs, outputs, 7) == [(0, "a", 7), (3, "x", 7)]
    assert select_tests(inputs, outputs, 6) == [(0, "a", 7), (1, "a", 6), (3, "x", 7)]
    # a tie decides nothing; agreeing on printing nothing makes no test
    assert select_tests(["i"], [["p"], ["p"], ["q"], ["q"]], 2) == []
    assert select_tests(["i", "j"], [["", "1"]] * 3, 3) == [(1, "1", 3)]
    tests = select_tests(inputs, outputs, 7)
    assert solutions_passing(outputs, tests) == 7  # the 3 "b"/"y" solutions fail i0
    # with a float checker the votes count what it accepts; the first best output is expected
    same = functools.partial(outputs_match, float_tolerance=1e-5)
    outs = [["0.333333"], ["0.3333333"], ["0.33333333333"], ["0.5"]]
    # the most digits among the best: 0.3333343 (1.0e-6 from 1/3) passes it, not "0.333333"
    assert select_tests(["i"], outs, 3, same) == [(0, "0.33333333333", 3)] and select_tests(["i"], outs, 3) == []
    assert solutions_passing(outs, [(0, "0.33333333333", 3)], same) == 3
    assert same("0.3333343", "0.33333333333") and not functools.partial(outputs_match, float_tolerance=1e-6)(
        "0.3333343", "0.333333")
    assert solutions_passing(outputs, [(0, "a", 7)]) == 7 and solutions_passing(outputs, []) == 10


def _write(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def _run(*args):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, timeout=600)


def _read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("code_tests")
    problems = [
        {"id": "sum", "prompt": "Read a and b, print a+b.", "solutions": SUM_OK + [SUM_WRONG],
         "input_generator": SUM_GEN, "difficulty": 0.5},
        # scraped tests: one right, one wrong; the solutions decide
        {"id": "given", "prompt": "Print a+b.", "solutions": SUM_OK,
         "tests": [{"input": "1 2\n", "output": "3\n"}, {"input": "2 2\n", "output": "5\n"}],
         "test_inputs": ["40 2\n"]},
        # several right answers (a special judge's problem): the solutions never agree
        {"id": "any", "prompt": "Print any number.", "solutions": ["import random\nprint(random.random())", "from random import random\nprint(random())",
                       "import random\nx = random.random()\nprint(x)"],
         "test_inputs": ["\n", "x\n"]},
        {"id": "badgen", "prompt": "p", "solutions": SUM_OK, "input_generator": "raise SystemExit(3)"},
        # one wrong program five times and one right one: the copies are one vote, so only the
        # input on which the two agree becomes a test
        {"id": "dup", "prompt": "Print a+b.", "solutions": [SUM_WRONG] * 5 + SUM_OK[:1],
         "test_inputs": ["7 1\n", "8 2\n", "1 1\n"]},
        # all agree to print nothing on "0": no test; empty scraped tests and a null task are
        # the same as none given
        {"id": "silent", "prompt": "Double it unless 0.", "task": None, "tests": [], "test_inputs": ["0\n", "3\n"],
         "solutions": ["s = input()\nif s != '0':\n    print(2 * int(s))\n",
                       "n = int(input())\nif n:\n    print(n + n)\n"]},
    ]
    src = tmp / "problems.jsonl"
    _write(src, problems)
    outs = {}
    for name, extra in (("loose", ["--problem-pass-rate", "0.75"]), ("strict", []),
                        ("workers", ["--problem-pass-rate", "0.75", "--workers", "2"])):
        out = tmp / f"{name}.jsonl"
        # a generous --timeout-s: a right solution timing out on a loaded machine would drop its
        # input or its problem, and the checks below would fail for the machine's sake
        res = _run("--input", str(src), "--output", str(out), "--num-generated", "8", "--timeout-s", "30", *extra)
        outs[name] = (res, out)
    return outs


def test_agreed_tests_hold_the_right_outputs(built):
    res, out = built["loose"]
    assert res.returncode == 0, res.stderr
    recs = {r["id"]: r for r in _read(out)}
    assert sorted(recs) == ["dup", "given", "silent", "sum"]  # "any" and "badgen" dropped
    assert recs["dup"]["tests"] == [{"input": "1 1\n", "output": "2\n"}]
    assert recs["silent"]["tests"] == [{"input": "3\n", "output": "6\n"}] and recs["silent"]["task"] == "code"
    s = recs["sum"]
    assert s["task"] == "code" and s["difficulty"] == 0.5 and "solutions" not in s and "input_generator" not in s
    # every generated input that the 3 right solutions agree on (all of them), with a+b
    assert 4 <= len(s["tests"]) <= 8
    for t in s["tests"]:
        a, b = map(int, t["input"].split())
        assert t["output"] == f"{a + b}\n"
    assert any(int(t["input"].split()[0]) > 5 for t in s["tests"])  # the wrong solution fails those
    # the scraped test with the wrong output is dropped, the right one kept, the extra input added
    assert recs["given"]["tests"] == [{"input": "40 2\n", "output": "42\n"}, {"input": "1 2\n", "output": "3\n"}]
    # the records reward as code prompts: right programs pass, the off-by-one one does not
    response = "```python\n" + SUM_OK[0] + "```"
    assert code_reward(response, s) == 1.0 and code_reward(response, recs["given"]) == 1.0
    assert code_reward("```python\n" + SUM_WRONG + "```", s) == 0.0
    assert "kept 4 of 6 problems" in res.stdout and "1 given tests contradicted" in res.stdout
    assert "4 repeated solutions counted once" in res.stdout
    assert "1 no test inputs" in res.stdout and "1 fewer than --min-tests" in res.stdout


def test_problem_pass_rate_drops_problems_whose_solutions_disagree(built):
    res, out = built["strict"]  # default 0.9: 3 of the 4 solutions of "sum" pass
    assert res.returncode == 0, res.stderr
    assert [r["id"] for r in _read(out)] == ["given", "dup", "silent"]
    assert "1 too few solutions pass every selected test" in res.stdout


def test_workers_give_the_same_file(built):
    (_, a), (res, b) = built["loose"], built["workers"]
    assert res.returncode == 0, res.stderr
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("line,field", [
    ('{"id": "x", "prompt": "p", "test_inputs": ["1"]}', "solutions"),
    ('{"id": "x", "prompt": "p", "solutions": "print(1)", "test_inputs": ["1"]}', "solutions"),
    ('{"id": "x", "prompt": "p", "solutions": ["print(1)", 3], "test_inputs": ["1"]}', "solutions[1]"),
    ('{"id": "x", "prompt": "p", "solutions": ["print(1)"]}', "test_inputs"),
    ('{"id": "x", "prompt": "p", "solutions": ["print(1)"], "test_inputs": [1]}', "test_inputs[0]"),
    ('{"id": "x", "prompt": "p", "solutions": ["print(1)"], "input_generator": 5}', "input_generator"),
    ('{"id": "x", "solutions": ["print(1)"], "test_inputs": ["1"]}', "prompt"),
    ('{"id": "x", "prompt": "p", "solutions": ["print(1)"], "test_inputs": ["1"], "timeout_s": "4s"}', "timeout_s"),
    ('{"id": "x", "prompt": "p", "solutions": ["print(1)"], "test_inputs": ["1"], "compare": "exact"}', "compare"),
    ('{"id": "x", "prompt": "p", "solutions": ["print(1)"], "test_inputs": ["1"], "float_tolerance": -1}',
     "float_tolerance"),
])
def test_a_bad_line_names_file_line_and_field_and_writes_nothing(tmp_path, line, field):
    src, out = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    _write(src, [{"id": "ok", "prompt": "p", "solutions": ["print(1)"], "test_inputs": ["\n"]}, line])
    res = _run("--input", str(src), "--output", str(out))
    assert res.returncode == 1
    assert f"p.jsonl:2: field '{field}'" in res.stderr, res.stderr
    assert not out.exists() and os.listdir(tmp_path) == ["p.jsonl"]


def test_bad_flags_are_refused(tmp_path):
    src = tmp_path / "p.jsonl"
    _write(src, [{"id": "ok", "prompt": "p", "solutions": ["print(1)"], "test_inputs": ["\n"]}])
    for flags, msg in ((["--test-agreement", "0.5"], "--test-agreement"), (["--problem-pass-rate", "0"], "--problem-pass-rate"),
                       (["--min-tests", "3", "--max-tests", "2"], "--max-tests"), (["--memory-mb", "0"], "--memory-mb")):
        res = _run("--input", str(src), "--output", str(tmp_path / "o.jsonl"), *flags)
        assert res.returncode == 2 and msg in res.stderr, (flags, res.stderr)
    assert not (tmp_path / "o.jsonl").exists()


def test_model_written_generators_round_trip(tmp_path):
    """--write-generator-prompts -> (the generate CLI) -> --generators: the program in each
    answer generates inputs for its problem; answers for unknown ids or without code count."""
    src = tmp_path / "problems.jsonl"
    _write(src, [{"id": 7, "prompt": "Read a and b, print a+b.", "solutions": SUM_OK}])
    prompts = tmp_path / "gen_prompts.jsonl"
    res = _run("--input", str(src), "--write-generator-prompts", str(prompts), "--generator-samples", "2")
    assert res.returncode == 0, res.stderr
    lines = _read(prompts)
    assert len(lines) == 2 and all(ln["id"] == "7" and "Read a and b, print a+b." in ln["prompt"] for ln in lines)
    # what the generate CLI writes: the input line's keys plus the answer as "text"
    answers = [dict(lines[0], text="Here is a generator:\n```python\n" + SUM_GEN + "```\nDone."),
               dict(lines[1], text="I would print two numbers."), {"id": "nope", "text": "```python\nprint(1)\n```"}]
    gens = tmp_path / "gens.jsonl"
    _write(gens, answers)
    out = tmp_path / "out.jsonl"
    res = _run("--input", str(src), "--generators", str(gens), "--output", str(out), "--num-generated", "4",
               "--timeout-s", "30")
    assert res.returncode == 0, res.stderr
    (rec,) = _read(out)
    assert 2 <= len(rec["tests"]) <= 4
    for t in rec["tests"]:
        a, b = map(int, t["input"].split())
        assert t["output"] == f"{a + b}\n"
    assert "1 model-written generators" in res.stdout and "1 generator answers without a program" in res.stdout
    assert "1 generator answers for ids not in --input" in res.stdout
    # without the generators the problem has no inputs: named with its line, nothing written
    res = _run("--input", str(src), "--output", str(tmp_path / "none.jsonl"))
    assert res.returncode == 1 and "problems.jsonl:1: field 'test_inputs'" in res.stderr
    assert not (tmp_path / "none.jsonl").exists()
    res = _run("--input", str(src), "--output", str(out), "--write-generator-prompts", str(prompts))
    assert res.returncode == 2 and "not both" in res.stderr


def test_float_answers_agree_under_the_records_tolerance():
    """Solutions printing 1/n at different precisions agree only under the record's float
    checker; the tests then reward a program at yet another precision."""
    from megatron_k15.data.code_tests import BuildSettings, build_problem_tests

    sols = ["print(1 / int(input()))", "print(f'{1 / int(input()):.9f}')", "print('%.7f' % (1 / int(input())))"]
    rec = {"id": "inv", "prompt": "Print 1/n.", "task": "code", "solutions": sols, "test_inputs": ["3\n", "7\n"]}
    settings = BuildSettings(problem_pass_rate=1.0, timeout_s=30.0)
    exact = build_problem_tests(rec, settings)
    assert exact.record is None and exact.counts["tests"] == 0
    res = build_problem_tests(dict(rec, float_tolerance=1e-6), settings)
    assert [t["input"] for t in res.record["tests"]] == ["3\n", "7\n"] and res.record["float_tolerance"] == 1e-6
    rec = dict(res.record, timeout_s=10.0)
    assert code_reward("```python\nprint(round(1 / int(input()), 8))\n```", rec) == 1.0
    assert code_reward("```python\nprint(round(1 / int(input()), 3))\n```", rec) == 0.0


def test_call_based_problems_vote_on_returned_values():
    """fn_name (LeetCode / APPS style): argument lists from test_inputs and from a generator
    that prints JSON, solutions (a class Solution method and a top-level function) vote on the
    returned values; a wrong solution loses, inputs on which all return null are no tests, and
    the built tests reward a new program through the code reward."""
    from megatron_k15.data.code_tests import BuildSettings, build_problem_tests, validate_code_problem

    ok = ["class Solution:\n    def rev(self, xs):\n        return xs[::-1] or None\n",
          "def rev(xs):\n    print('debug')\n    return list(reversed(xs)) or None\n",
          "def rev(xs):\n    out = []\n    for x in xs:\n        out.insert(0, x)\n    return out or None\n"]
    wrong = "def rev(xs):\n    return sorted(xs, reverse=True) or None\n"
    gen = ("import json, random\nrandom.seed(int(input()))\n"
           "print(json.dumps([[random.randint(0, 9) for _ in range(random.randint(1, 4))]]))\n")
    rec = {"id": "rev", "prompt": "Reverse a list.", "fn_name": "rev", "solutions": ok + [wrong],
           "test_inputs": [[[1, 2, 3]], [[]]], "input_generator": gen}
    with pytest.raises(Exception, match="test_inputs\\[0\\]"):  # argument lists, not stdin text
        validate_code_problem(dict(rec, test_inputs=["1 2 3"]))
    res = build_problem_tests(validate_code_problem(rec), BuildSettings(num_generated=6, test_agreement=0.7, problem_pass_rate=0.7,
                                                 timeout_s=30.0))
    assert res.record is not None, res
    tests = res.record["tests"]
    assert tests[0] == {"input": [[1, 2, 3]], "output": [3, 2, 1]}
    assert all(t["output"] is not None for t in tests)  # [] -> null for all: not a test
    assert all(t["output"] == t["input"][0][::-1] for t in tests) and len(tests) >= 3
    rec = dict(res.record, timeout_s=10.0)
    assert code_reward("```python\ndef rev(xs):\n    return xs[::-1]\n```", rec) == 1.0
    from megatron_k15.data.code_tests import generator_prompt  # a model writes argument generators

    assert "named rev" in generator_prompt(rec) and "JSON list" in generator_prompt(rec)
    assert "JSON" not in generator_prompt({"prompt": "Read a and b."})
    assert code_reward("```python\n" + wrong + "```", rec) == 0.0  # e.g. [9, 8] is no reversal of [9, 8]


PERM_SOLUTIONS = ["n = int(input())\nprint(*range(1, n + 1))\n",
                  "n = int(input())\nprint(*range(n, 0, -1))\n",
                  "n = int(input())\nprint(*(list(range(2, n + 1)) + [1]))\n"]
PERM_CHECKER = ("def check(input, output, expected):\n"
                "    n = int(input)\n"
                "    return sorted(map(int, output.split())) == list(range(1, n + 1))\n")


def test_custom_checker_lets_different_right_answers_agree():
    """'Print any permutation of 1..n': three solutions print three different permutations.
    Compared exactly only n = 1 gets 3 of 3 votes and the problem is dropped; with the record's
    checker every output votes for every other, the tests are kept (each input's reference one
    of the permutations), a wrong fourth solution fails them, and the code reward with the
    built record accepts all three and rejects the wrong one."""
    from megatron_k15.data.code_tests import BuildSettings, build_problem_tests

    rec = {"id": "perm", "prompt": "any permutation", "task": "code", "solutions": PERM_SOLUTIONS,
           "test_inputs": ["3\n", "5\n", "1\n"]}
    s = BuildSettings(test_agreement=1.0, problem_pass_rate=1.0, min_tests=2)
    exact = build_problem_tests(dict(rec), s)
    assert exact.record is None and exact.counts["tests"] == 1  # only n = 1 has one answer
    built = build_problem_tests(dict(rec, checker=PERM_CHECKER), s)
    assert built.record is not None, built
    assert [t["input"] for t in built.record["tests"]] == ["3\n", "5\n", "1\n"]
    assert built.record["checker"] == PERM_CHECKER and built.counts["tests"] == 3
    for program in PERM_SOLUTIONS:
        assert code_reward("```python\n" + program + "```", built.record) == 1.0
    wrong = "n = int(input())\nprint(*([1] * n))\n"
    assert code_reward("```python\n" + wrong + "```", built.record) == 0.0
    # a wrong solution among four: 3 of 4 vote for every kept test, and it fails them
    four = build_problem_tests(dict(rec, checker=PERM_CHECKER, solutions=PERM_SOLUTIONS + [wrong]),
                               BuildSettings(test_agreement=0.75, problem_pass_rate=0.75))
    # (n = 1 too: there the wrong one prints the right answer); without the rule that a candidate
    # must pass against itself, "1 1 1" would tie with the right answers as a reference
    assert four.record is not None and len(four.record["tests"]) == 3
    assert code_reward("```python\n" + wrong + "```", four.record) == 0.0
