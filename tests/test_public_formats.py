"""APPS / TACO and CodeContests records read as code prompt records (data/public_formats.py):
the fields they map to, the code reward judging them as those datasets' checkers would, the
errors naming the dataset's own fields, and build_code_tests re-checking scraped tests."""

import json
import sys

import pytest

from megatron_k15.data.code_tests import BuildSettings, build_problem_tests, validate_code_problem
from megatron_k15.data.prompts import DataError, read_prompt_records, validate_prompt_record
from megatron_k15.rewards.code import code_reward, returned_value_matches

posix_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX sandbox")

SUM = "a, b = map(int, input().split())\nprint(a + b)\n"
# an APPS line as the dataset stores it: input_output and solutions are JSON text; one test's
# input and output are lists of lines
APPS = {"problem_id": 4021, "question": "Read a and b, print their sum.", "starter_code": "",
        "difficulty": "interview", "url": "https://codeforces.com/problemset/problem/1/A",
        "solutions": json.dumps([SUM]),
        "input_output": json.dumps({"inputs": ["1 2\n", ["3 4"]], "outputs": ["3\n", ["7"]]})}
ADD = "def add(a, b):\n    return a + b\n"
# a TACO call-based line: the expected values wrapped in one-element lists, as TACO stores them
TACO = {"question": "Return the sum of a and b.", "starter_code": "def add(a, b):\n\t",
        "difficulty": "EASY", "source": "codewars", "solutions": json.dumps([ADD]),
        "input_output": json.dumps({"fn_name": "add", "inputs": [[1, 2], [3, 4], [[1], [2]]],
                                    "outputs": [[3], [7], [[1, 2]]]})}
CODECONTESTS = {"name": "1_A. Sum", "description": "Print a + b.", "cf_rating": 800, "difficulty": 7,
                "public_tests": {"input": ["1 2\n"], "output": ["3\n"]},
                "private_tests": {"input": ["5 5\n"], "output": ["10\n"]},
                "generated_tests": {"input": ["0 0\n"], "output": ["0\n"]},
                "solutions": {"language": [2, 3, 1], "solution": ["int main(){}", SUM, "print 1"]},
                "time_limit": {"seconds": 2, "nanos": 0}}


def test_apps_record_fields():
    rec = validate_prompt_record(APPS, "apps.jsonl:1")
    assert rec["id"] == "4021" and rec["task"] == "code" and rec["prompt"] == APPS["question"]
    assert rec["tests"] == [{"input": "1 2\n", "output": "3\n"}, {"input": "3 4", "output": "7"}]
    assert rec["compare"] == "tokens" and rec["float_tolerance"] == 1e-5
    assert "fn_name" not in rec and "wrapped_outputs" not in rec
    assert rec["difficulty"] == 2.0 and rec["difficulty_label"] == "interview"
    assert rec["url"] == APPS["url"] and "input_output" not in rec
    assert "solutions" not in rec and validate_code_problem(APPS, "x")["solutions"] == [SUM]  # build_code_tests'
    assert validate_prompt_record(rec, "x") == rec  # already ours: unchanged


def test_taco_call_based_record_fields():
    rec = validate_prompt_record(TACO, "taco.jsonl:3")
    assert rec["id"] == "taco.jsonl:3" and rec["fn_name"] == "add" and rec["wrapped_outputs"] is True
    assert rec["prompt"] == ("Return the sum of a and b.\n\nYour code should start with:\n"
                             "```python\ndef add(a, b):\n```")
    assert rec["tests"][0] == {"input": [1, 2], "output": [3]}
    assert rec["difficulty"] == 1.0 and "compare" not in rec
    unknown = validate_prompt_record(dict(TACO, difficulty="UNKNOWN_DIFFICULTY"), "x")
    assert unknown["difficulty"] == 0.0 and unknown["difficulty_label"] == "UNKNOWN_DIFFICULTY"


def test_codecontests_record_fields():
    rec = validate_prompt_record(CODECONTESTS, "cc:1")
    assert rec["id"] == "1_A. Sum" and rec["prompt"] == "Print a + b." and rec["compare"] == "tokens"
    assert [t["input"] for t in rec["tests"]] == ["1 2\n", "5 5\n", "0 0\n"]  # public, private, generated
    assert "solutions" not in rec and "incorrect_solutions" not in validate_prompt_record(
        dict(CODECONTESTS, incorrect_solutions={"language": [3], "solution": ["print(0)"]}), "cc:1")
    assert validate_code_problem(CODECONTESTS, "cc:1")["solutions"] == [SUM]  # Python 3 only (not C++, not Python 2)
    assert rec["difficulty"] == 800.0 and rec["difficulty_label"] == "A"  # the rating, where there is one
    atcoder = validate_prompt_record(dict(CODECONTESTS, cf_rating=0, difficulty=2), "cc:2")
    assert atcoder["difficulty"] == 0.0 and atcoder["difficulty_label"] == "MEDIUM"  # no common scale


def test_wrapped_outputs_rule():
    """APPS's checker: an expected [v] also accepts v; kept to one-element lists and only
    where the record says so."""
    assert returned_value_matches(3, [3], wrapped_outputs=True)
    assert returned_value_matches([3], [3], wrapped_outputs=True)
    assert not returned_value_matches(3, [3])
    assert not returned_value_matches(1, [1, 2], wrapped_outputs=True)
    assert returned_value_matches(0.5000001, [0.5], 1e-6, wrapped_outputs=True)
    with pytest.raises(ValueError, match="wrapped_outputs"):  # needs fn_name
        validate_prompt_record({"prompt": "p", "tests": [{"input": "", "output": "1"}], "wrapped_outputs": True}, "x")


@posix_only
def test_code_reward_judges_converted_records():
    apps = validate_prompt_record(APPS, "a")
    assert code_reward(f"```python\n{SUM}```", apps) == 1.0
    spaced = "a, b = map(int, input().split())\nprint(' ', a + b, ' ')\n"  # tokens: spaces do not count
    assert code_reward(f"```python\n{spaced}```", apps) == 1.0
    assert code_reward("```python\nprint(3)\n```", apps) == 0.0
    thirds = validate_prompt_record(dict(APPS, input_output=json.dumps({"inputs": ["3\n"], "outputs": ["0.3333333333\n"]})),
                                    "a")
    assert code_reward("```python\nprint(round(1 / int(input()), 9))\n```", thirds) == 1.0  # np.allclose's 1e-5
    assert code_reward("```python\nprint(round(1 / int(input()), 3))\n```", thirds) == 0.0
    taco = validate_prompt_record(TACO, "t")
    assert code_reward(f"```python\n{ADD}```", taco) == 1.0  # returns v for [v], and [1, 2] for [[1, 2]]
    assert code_reward("```python\ndef add(a, b):\n    return [a + b]\n```", taco) == 1.0  # APPS accepts it too
    assert code_reward("```python\ndef add(a, b):\n    return a - b\n```", taco) == 0.0
    cc = validate_prompt_record(CODECONTESTS, "c")
    assert code_reward(f"```python\n{SUM}```", cc) == 1.0


@pytest.mark.parametrize("change, field", [
    ({"input_output": "{not json"}, "input_output"),
    ({"input_output": json.dumps({"inputs": ["1"], "outputs": []})}, "input_output"),
    ({"input_output": json.dumps({"inputs": [5], "outputs": ["1"]})}, "input_output.inputs[0]"),
    ({"input_output": json.dumps({"fn_name": "f", "inputs": ["1 2"], "outputs": [3]})}, "input_output.inputs[0]"),
    ({"difficulty": "medium"}, "difficulty"),
    ({"solutions": "[1, 2]"}, "solutions"),
    ({"question": ""}, "question"),
])
def test_bad_records_name_file_line_and_the_datasets_field(tmp_path, change, field):
    path = tmp_path / "apps.jsonl"
    path.write_text(json.dumps(APPS) + "\n" + json.dumps(dict(APPS, problem_id=1, **change)) + "\n")
    with pytest.raises(DataError) as e:
        list(read_prompt_records(str(path)))
    assert str(e.value).startswith(f"{path}:2: field '{field}'"), str(e.value)


def test_records_without_tests():
    """An APPS line with an empty input_output is no RL prompt, but build_code_tests takes it
    (its tests are still to be built from the solutions)."""
    no_tests = dict(APPS, input_output="")
    with pytest.raises(ValueError, match="'tests': missing"):
        validate_prompt_record(no_tests, "x")
    rec = validate_code_problem(dict(no_tests, input_generator="print(1, 2)"), "x")
    assert "tests" not in rec and rec["solutions"] == [SUM]


@posix_only
def test_build_code_tests_rechecks_scraped_tests():
    """TACO's wrapped [v] agrees with solutions that return v; a wrong scraped test is dropped;
    the built record holds the returned values and no longer needs wrapped_outputs."""
    io = {"fn_name": "add", "inputs": [[1, 2], [3, 4], [5, 5]], "outputs": [[3], [7], [11]]}  # 5 + 5 is not 11
    alt = "class Solution:\n    def add(self, a, b):\n        return sum((a, b))\n"
    rec = validate_code_problem(dict(TACO, input_output=json.dumps(io), solutions=json.dumps([ADD, alt])), "t")
    res = build_problem_tests(rec, BuildSettings(test_agreement=1.0, problem_pass_rate=1.0, min_tests=2,
                                                 timeout_s=30.0))
    assert res.record is not None, res
    assert res.record["tests"] == [{"input": [1, 2], "output": 3}, {"input": [3, 4], "output": 7}]
    assert res.counts["given tests contradicted"] == 1 and "wrapped_outputs" not in res.record
    cc = build_problem_tests(validate_code_problem(dict(CODECONTESTS, incorrect_solutions={"language": [3],
                                                                                          "solution": ["print(0)"]}),
                                                   "cc"), BuildSettings(min_tests=1, timeout_s=30.0))
    assert cc.record is not None and "incorrect_solutions" not in cc.record and "solutions" not in cc.record
    assert code_reward(f"```python\n{ADD}```", dict(res.record, timeout_s=10.0)) == 1.0
