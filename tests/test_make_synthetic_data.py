"""tools/make_synthetic_data.py: determinism, disjoint splits, levels, verifiable answers,
code problems that pass the sandbox with a reference solution, CLI errors, atomic writes."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from megatron_k15.data.prompts import validate_prompt_record, validate_sft_record
from megatron_k15.rewards.code import run_tests
from megatron_k15.rewards.math import verify

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "make_synthetic_data.py"
FILES = ("sft.jsonl", "rl_prompts.jsonl", "eval_prompts.jsonl")


@pytest.fixture(scope="module")
def tool():
    name = "make_synthetic_data_tool"
    spec = importlib.util.spec_from_file_location(name, TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(name, None)


def _run(tool, out_dir, *extra):
    argv = ["--out-dir", str(out_dir), "--quiet", *map(str, extra)]
    assert tool.main(argv) == 0
    return {name: [json.loads(line) for line in open(out_dir / name, encoding="utf-8")]
            for name in FILES}


def _read_bytes(d):
    return {name: (d / name).read_bytes() for name in FILES}


# ----------------------------------------------------------------------------------------
# An independent solver for the generated problems (does not use the tool's code)

_COT_WHAT = re.compile(r"^What is (.+)\? Think step by step\.$")
_COT_SOLVE = re.compile(r"^Solve for x: (\d+)x ([+-]) (\d+) = (-?\d+)\. Think step by step\.$")
_MIN_SOLVE = re.compile(r"^(\d+)x([+-])(\d+)=(-?\d+),x=$")
_MIN_EXPR = re.compile(r"^([0-9+*-]+)=$")


def _eval_expr(expr):
    expr = expr.replace(" ", "")
    assert re.fullmatch(r"\d+([+*-]\d+){1,2}", expr), expr
    return eval(expr)  # noqa: S307 - digits and + - * only, checked above


def solve(prompt):
    """(answer, level) recomputed from the prompt text alone."""
    m = _COT_SOLVE.match(prompt) or _MIN_SOLVE.match(prompt)
    if m:
        a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        x = Fraction(c - b if op == "+" else c + b, a)
        assert x.denominator == 1, prompt
        return int(x), 5
    m = _COT_WHAT.match(prompt) or _MIN_EXPR.match(prompt)
    assert m, f"unrecognised prompt {prompt!r}"
    expr = m[1].replace(" ", "")
    nums = [int(t) for t in re.findall(r"\d+", expr)]
    ops = re.findall(r"[+*-]", expr)
    if len(ops) == 2:
        level = 4
    elif ops == ["*"]:
        level = 3
    elif ops == ["+"] and max(nums) <= 9:
        level = 1
    else:
        level = 2
    return _eval_expr(expr), level


# ----------------------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_differs(tool, tmp_path):
    args = ("--num-sft", 120, "--num-rl", 60, "--num-eval", 30, "--code-problems", 4,
            "--template", "cot")
    _run(tool, tmp_path / "a", "--seed", 7, *args)
    _run(tool, tmp_path / "b", "--seed", 7, *args)
    _run(tool, tmp_path / "c", "--seed", 8, *args)
    a, b, c = (_read_bytes(tmp_path / d) for d in "abc")
    assert all(a[n] for n in FILES)
    assert a == b
    assert all(a[n] != c[n] for n in FILES)


@pytest.mark.parametrize("template", ["minimal", "cot"])
def test_splits_disjoint_and_levels_present(tool, tmp_path, template):
    d = _run(tool, tmp_path, "--num-sft", 400, "--num-rl", 200, "--num-eval", 100,
             "--template", template, "--seed", 3)
    sft, rl, ev = d["sft.jsonl"], d["rl_prompts.jsonl"], d["eval_prompts.jsonl"]
    assert (len(sft), len(rl), len(ev)) == (400, 200, 100)
    prompts = {"sft": [r["prompt"] for r in sft], "rl": [r["prompt"] for r in rl],
               "eval": [r["prompt"] for r in ev]}
    for name, ps in prompts.items():
        assert len(set(ps)) == len(ps), f"duplicate problems in {name}"
    assert not set(prompts["sft"]) & set(prompts["rl"])
    assert not set(prompts["sft"]) & set(prompts["eval"])
    assert not set(prompts["rl"]) & set(prompts["eval"])
    ids = [r["id"] for r in rl + ev]
    assert len(set(ids)) == len(ids)
    for name, records in (("rl", rl), ("eval", ev)):
        levels = {r["difficulty"] for r in records}
        assert levels == {1, 2, 3, 4, 5}, name
    assert {solve(p)[1] for p in prompts["sft"]} == {1, 2, 3, 4, 5}


def test_levels_flag_restricts_and_difficulty_matches_family(tool, tmp_path):
    d = _run(tool, tmp_path, "--levels", "2,5", "--num-sft", 60, "--num-rl", 40,
             "--num-eval", 20)
    for r in d["rl_prompts.jsonl"] + d["eval_prompts.jsonl"]:
        assert r["difficulty"] in (2, 5)
        assert solve(r["prompt"])[1] == r["difficulty"], r
    assert {solve(r["prompt"])[1] for r in d["sft.jsonl"]} == {2, 5}
    # evenly spread over the two levels
    levels = [r["difficulty"] for r in d["rl_prompts.jsonl"]]
    assert levels.count(2) == levels.count(5) == 20


def test_max_operand_bounds_numbers(tool, tmp_path):
    d = _run(tool, tmp_path, "--max-operand", 15, "--levels", "1,2,3,4",
             "--num-sft", 100, "--num-rl", 50, "--num-eval", 20)
    for name in FILES:
        for r in d[name]:
            nums = [int(t) for t in re.findall(r"\d+", r["prompt"])]
            assert max(nums) <= 15, r


@pytest.mark.parametrize("template", ["minimal", "cot"])
def test_answers_correct_and_sft_responses_verify(tool, tmp_path, template):
    d = _run(tool, tmp_path, "--num-sft", 250, "--num-rl", 100, "--num-eval", 50,
             "--template", template, "--seed", 11)
    for r in d["rl_prompts.jsonl"] + d["eval_prompts.jsonl"]:
        truth, level = solve(r["prompt"])
        assert r["task"] == "math"
        assert r["answer"] == str(truth), r
        assert r["difficulty"] == level and isinstance(r["difficulty"], int)
        validate_prompt_record(r)
    for r in d["sft.jsonl"]:
        assert set(r) == {"prompt", "response"}
        validate_sft_record(r)
        truth, _ = solve(r["prompt"])
        assert verify(r["response"], str(truth)), r
        assert not verify(r["response"], str(truth + 1)), r
        if template == "minimal":
            assert r["response"] == str(truth)
        else:
            assert r["response"].endswith(f"The answer is \\boxed{{{truth}}}.")
            assert "\n" in r["response"]  # some reasoning before the answer


def test_minimal_and_cot_prompt_shapes(tool, tmp_path):
    m = _run(tool, tmp_path / "m", "--levels", 2, "--num-sft", 5, "--num-rl", 0,
             "--num-eval", 0, "--template", "minimal")
    c = _run(tool, tmp_path / "c", "--levels", 2, "--num-sft", 5, "--num-rl", 0,
             "--num-eval", 0, "--template", "cot")
    for r in m["sft.jsonl"]:
        assert re.fullmatch(r"\d+[+-]\d+=", r["prompt"]) and r["response"].isdigit()
    for r in c["sft.jsonl"]:
        assert re.fullmatch(r"What is \d+ [+-] \d+\? Think step by step\.", r["prompt"])
    # same problems (same seed), only the rendering differs
    assert [solve(r["prompt"]) for r in m["sft.jsonl"]] == \
        [solve(r["prompt"]) for r in c["sft.jsonl"]]


def test_small_level_gives_all_it_has_and_others_fill_in(tool, tmp_path, capsys):
    # level 1 has only 100 distinct problems: all used once, level 2 makes up the rest
    d = _run(tool, tmp_path, "--levels", "1,2", "--num-sft", 300, "--num-rl", 150,
             "--num-eval", 50)
    assert "level 1" in capsys.readouterr().err
    l1 = [r for name in FILES for r in d[name] if solve(r["prompt"])[1] == 1]
    assert len(l1) == 100 == len({r["prompt"] for r in l1})
    for name in FILES:
        assert any(solve(r["prompt"])[1] == 1 for r in d[name]), name


def test_code_problems_pass_with_reference_solution(tool, tmp_path):
    n = tool.CODE_POOL_SIZE
    data = tool.generate(0, 3, 0, [1], 99, "cot", seed=5, code_problems=n, code_tests=4)
    code = [r for r in data["rl"] if r["task"] == "code"]
    assert len(code) == n and len(data["rl"]) == n + 3
    assert len({r["prompt"] for r in code}) == n
    for r in code:
        validate_prompt_record(r)
        assert len(r["tests"]) == 4
        assert all(set(t) == {"input", "output"} and t["output"] for t in r["tests"])
        assert len({t["input"] for t in r["tests"]}) == 4
    # the sandbox is slow-ish: every fixed family plus a few parametric ones
    fixed = [r for r in code if not re.search(r"print n [+*]|multiplied by|remainder",
                                              r["prompt"])]
    param = [r for r in code if r not in fixed][:4]
    assert len(fixed) >= 10
    for r in fixed + param:
        res = run_tests(data["solutions"][r["id"]], r["tests"], timeout_s=5.0)
        assert res["status"] == "ok" and res["passed"] == 4, (r["prompt"], res)
    # and the tests can tell a wrong program apart
    r = code[0]
    wrong = run_tests("print(123456789)\n", r["tests"], timeout_s=5.0)
    assert wrong["status"] == "failed"


def _ints_of(s):
    return [int(t) for t in s.split()]


# Independent answers keyed by the problem statement (does not use the tool's solutions).
_CODE_ORACLES = [
    (r"on one line and print their sum\.", lambda s: sum(_ints_of(s))),
    (r"print a - b\.", lambda s: _ints_of(s)[0] - _ints_of(s)[1]),
    (r"print their product\.", lambda s: _ints_of(s)[0] * _ints_of(s)[1]),
    (r"print the larger of the two\.", lambda s: max(_ints_of(s))),
    (r"print EVEN if it is even, else ODD\.", lambda s: "ODD" if int(s) % 2 else "EVEN"),
    (r"Read a word and print its length\.", lambda s: len(s.strip())),
    (r"Read a word and print it reversed\.", lambda s: s.strip()[::-1]),
    (r"how many vowels", lambda s: sum(s.count(v) for v in "aeiou")),
    (r"print 1 \+ 2 \+ \.\.\. \+ n", lambda s: sum(range(int(s) + 1))),
    (r"print the largest of them\.", lambda s: max(_ints_of(s.split("\n")[1]))),
    (r"print the smallest of them\.", lambda s: min(_ints_of(s.split("\n")[1]))),
    (r"n integers on the second line; print their sum\.",
     lambda s: sum(_ints_of(s.split("\n")[1]))),
    (r"ascending order", lambda s: " ".join(map(str, sorted(_ints_of(s.split("\n")[1]))))),
    (r"print n factorial\.", lambda s: __import__("math").prod(range(1, int(s) + 1))),
    (r"print n multiplied by (\d+)\.", lambda s, k: int(s) * k),
    (r"print n \+ (\d+)\.", lambda s, k: int(s) + k),
    (r"remainder of n divided by (\d+)\.", lambda s, k: int(s) % k),
]


def test_code_tests_match_the_statement(tool):
    data = tool.generate(0, 0, 0, [1], 99, "minimal", seed=9,
                         code_problems=tool.CODE_POOL_SIZE, code_tests=6)
    matched = 0
    for r in data["rl"]:
        hits = [(m, fn) for rx, fn in _CODE_ORACLES if (m := re.search(rx, r["prompt"]))]
        assert len(hits) == 1, r["prompt"]
        m, fn = hits[0]
        for t in r["tests"]:
            want = fn(t["input"], *map(int, m.groups()))
            assert t["output"].strip() == str(want), (r["prompt"], t)
        matched += 1
    assert matched == tool.CODE_POOL_SIZE


def test_code_problems_written_to_rl_only(tool, tmp_path):
    d = _run(tool, tmp_path, "--num-sft", 10, "--num-rl", 10, "--num-eval", 10,
             "--code-problems", 6, "--code-tests", 3)
    rl = d["rl_prompts.jsonl"]
    assert sum(r["task"] == "code" for r in rl) == 6
    assert all(len(r["tests"]) == 3 for r in rl if r["task"] == "code")
    assert all(r["task"] == "math" for r in d["eval_prompts.jsonl"])
    assert len({r["id"] for r in rl}) == len(rl) == 16


def test_summary_counts_per_level(tool, tmp_path, capsys):
    assert tool.main(["--out-dir", str(tmp_path), "--levels", "3,4", "--num-sft", "10",
                      "--num-rl", "6", "--num-eval", "4"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"sft\.jsonl\s+10 math \(L3=5, L4=5\)", out), out
    assert re.search(r"rl_prompts\.jsonl\s+6 math \(L3=3, L4=3\)", out), out
    assert re.search(r"eval_prompts\.jsonl\s+4 math \(L3=2, L4=2\)", out), out


@pytest.mark.parametrize("argv,flag", [
    (["--levels", "1,9"], "--levels"),
    (["--levels", "1,,2"], "--levels"),
    (["--levels", "two"], "--levels"),
    (["--levels", "1,1"], "--levels"),
    (["--num-rl", "-1"], "--num-rl"),
    (["--num-sft", "many"], "--num-sft"),
    (["--max-operand", "0"], "--max-operand"),
    (["--template", "verbose"], "--template"),
    (["--code-problems", "100000"], "--code-problems"),
    (["--levels", "1", "--num-sft", "90", "--num-rl", "20"], "--num-sft"),
    (["--levels", "2", "--max-operand", "5"], "--max-operand"),
    (["--num-sft", "0", "--num-rl", "0", "--num-eval", "0"], "--num-sft"),
])
def test_bad_arguments_give_clear_errors(tool, tmp_path, capsys, argv, flag):
    with pytest.raises(SystemExit) as e:
        tool.main(["--out-dir", str(tmp_path / "out"), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and flag in err, err
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_cli_help_and_error_exit_codes(tmp_path):
    h = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True,
                       timeout=60)
    assert h.returncode == 0
    for flag in ("--out-dir", "--seed", "--num-sft", "--num-rl", "--num-eval", "--levels",
                 "--max-operand", "--template", "--code-problems"):
        assert flag in h.stdout
    r = subprocess.run([sys.executable, str(TOOL), "--levels", "0"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "--out-dir" in r.stderr
    r = subprocess.run([sys.executable, str(TOOL), "--out-dir", str(tmp_path), "--num-sft",
                        "4", "--num-rl", "2", "--num-eval", "2", "--levels", "1,3"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "L1=2, L3=2" in r.stdout
    assert sorted(os.listdir(tmp_path)) == sorted(FILES)


def test_writes_atomically(tool, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    _run(tool, out, "--num-sft", 5, "--num-rl", 5, "--num-eval", 5, "--seed", 1)
    before = _read_bytes(out)
    real = tool._dumps_lines
    calls = []

    def failing(records):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(records)

    monkeypatch.setattr(tool, "_dumps_lines", failing)
    assert tool.main(["--out-dir", str(out), "--quiet", "--num-sft", "5", "--num-rl", "5",
                      "--num-eval", "5", "--seed", "2"]) == 1
    assert len(calls) == 3
    assert "disk full" in capsys.readouterr().err
    # nothing replaced, no temporary files left behind
    assert sorted(os.listdir(out)) == sorted(FILES)
    assert _read_bytes(out) == before
