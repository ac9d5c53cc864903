"""Public RL datasets' records read as our prompt records (``data/prompts.py``).

A record that has a ``prompt`` of its own is ours and passes unchanged. Otherwise:

- GSM8K ``{"question", "answer": "<reasoning> #### 72"}``: prompt = question, answer = what
  follows the last ``####``.
- MATH ``{"problem", "solution": "... \\boxed{x}"}``: prompt = problem, answer = the content of
  the solution's last ``\\boxed{}`` (unless the record has an ``answer``).
- APPS / TACO ``{"question", "input_output", "solutions", "starter_code", "difficulty", ...}``
  (``input_output`` and ``solutions`` as JSON text, as the datasets store them, or decoded):
  prompt = question, followed by the starter code when there is one; ``tests`` from
  ``inputs`` / ``outputs`` (a list of lines is one text joined by newlines, as APPS's
  checker does); ``fn_name`` makes them call-based, with ``wrapped_outputs`` (an expected
  ``[v]`` also accepts ``v``: ``rewards.code``); stdin tests are compared by tokens, decimals
  within 1e-5 (their checker ignores whitespace and compares floats with ``np.allclose``); ``solutions`` a list of programs (for
  ``tools/build_code_tests.py``, which re-checks the scraped tests with them); ``id`` = ``problem_id``; ``difficulty`` a number
  (:data:`CODE_DIFFICULTY`; the label stays in ``difficulty_label``).
- CodeContests ``{"name", "description", "public_tests", "private_tests", "generated_tests",
  "solutions": {"language", "solution"}, ...}``: prompt = description, ``id`` = name,
  ``tests`` = public + private + generated (stdin, compared by tokens), ``solutions`` = the
  Python 3 ones; ``difficulty`` = ``cf_rating`` where the problem has one (Codeforces), else
  unknown (0.0), the dataset's own level (an enum: EASY..HARDEST, A..V) kept in
  ``difficulty_label``.

Fields the conversion does not use are kept, as for our own records, except the reference
programs (``solutions``, ``incorrect_solutions``), which only ``tools/build_code_tests.py``
keeps. Errors are
:class:`FieldError` naming the dataset's own field (``input_output.outputs[3]``), so the
reader's ``FILE:LINE:`` message points at what is in the file.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional

from megatron_k15.data.prompts import FieldError, _require_str, _type_name

__all__ = ["CODE_DIFFICULTY", "prompt_dataset_fields"]

# APPS's three levels and TACO's five, as numbers (higher is harder) for the curriculum;
# TACO's UNKNOWN_DIFFICULTY leaves the default (0.0).
CODE_DIFFICULTY = {"introductory": 1.0, "interview": 2.0, "competition": 3.0,
                   "EASY": 1.0, "MEDIUM": 2.0, "MEDIUM_HARD": 3.0, "HARD": 4.0, "VERY_HARD": 5.0,
                   "UNKNOWN_DIFFICULTY": None}

APPS_FLOAT_TOLERANCE = 1e-5  # APPS's checker: np.allclose (rtol 1e-5) on float tokens
CODECONTESTS_TEST_FIELDS = ("public_tests", "private_tests", "generated_tests")
# CodeContests' Difficulty enum: levels of other sites, then Codeforces' problem letters A..V
CODECONTESTS_LEVELS = (["UNKNOWN_DIFFICULTY", "EASY", "MEDIUM", "HARD", "HARDER", "HARDEST", "EXTERNAL"]
                       + [chr(ord("A") + k) for k in range(22)])
SOLUTION_FIELDS = ("solutions", "incorrect_solutions")
CODECONTESTS_PYTHON3 = 3  # CodeContests' Language enum: UNKNOWN, PYTHON (2), CPP, PYTHON3, JAVA


def prompt_dataset_fields(obj: Mapping, *, with_solutions: bool = False) -> Mapping:
    """``obj`` in our prompt-record fields when it is a GSM8K, MATH, APPS/TACO or CodeContests
    record (module docstring); unchanged otherwise, and always when it has a ``prompt``.
    A code dataset's reference programs (often hundreds of kB a problem) are dropped unless
    ``with_solutions`` (``tools/build_code_tests.py``): RL prompt sets do not need them."""
    if "prompt" in obj:
        return obj
    code = None
    if "input_output" in obj and "question" in obj:
        code = _apps_fields(obj)
    elif "description" in obj and any(f in obj for f in CODECONTESTS_TEST_FIELDS):
        code = _codecontests_fields(obj)
    if code is not None:
        if not with_solutions:
            for field in SOLUTION_FIELDS:
                code.pop(field, None)
        return code
    if "question" in obj or "problem" in obj:
        return _math_fields(obj)
    return obj


def _math_fields(obj: Mapping) -> dict:
    source = "question" if "question" in obj else "problem"
    rec = {k: v for k, v in obj.items() if k != source}
    rec["prompt"] = obj[source]
    answer = obj.get("answer")
    if isinstance(answer, str) and "####" in answer:
        rec["answer"] = answer.rsplit("####", 1)[1].strip()
    elif answer is None and isinstance(obj.get("solution"), str):
        from megatron_k15.rewards.math import last_boxed

        boxed = last_boxed(obj["solution"])
        if boxed is None or not boxed.strip():
            raise FieldError("solution", "has no \\boxed{} answer (give the record an 'answer')")
        rec["answer"] = boxed.strip()
    return rec


def _json_field(obj: Mapping, field: str) -> Any:
    """``obj[field]`` decoded when the dataset stores it as JSON text ("" is None)."""
    v = obj.get(field)
    if not isinstance(v, str):
        return v
    if not v.strip():
        return None
    try:
        return json.loads(v)
    except ValueError as e:
        raise FieldError(field, f"is text but not JSON ({e})") from None


def _lines_text(v: Any, label: str) -> str:
    """A stdin test's input or output: a str, or a list of lines joined by newlines."""
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return "\n".join(v)
    if not isinstance(v, str):
        raise FieldError(label, f"expected a string or a list of lines, got {_type_name(v)}")
    return v


def _apps_fields(obj: Mapping) -> dict:
    rec = {k: v for k, v in obj.items() if k not in ("question", "input_output")}
    question = _require_str(obj, "question")
    starter = obj.get("starter_code") or ""
    if not isinstance(starter, str):
        raise FieldError("starter_code", f"expected a string, got {_type_name(starter)}")
    rec["prompt"] = question
    if starter.strip():
        rec["prompt"] = f"{question.rstrip()}\n\nYour code should start with:\n```python\n{starter.rstrip()}\n```"
    rec.setdefault("task", "code")
    if obj.get("id") is None and obj.get("problem_id") is not None:
        rec["id"] = obj["problem_id"]

    io = _json_field(obj, "input_output") or {}
    if not isinstance(io, dict):
        raise FieldError("input_output", f"expected an object with 'inputs' and 'outputs', got {_type_name(io)}")
    inputs, outputs = io.get("inputs") or [], io.get("outputs") or []
    for key, v in (("inputs", inputs), ("outputs", outputs)):
        if not isinstance(v, list):
            raise FieldError(f"input_output.{key}", f"expected a list, got {_type_name(v)}")
    if len(inputs) != len(outputs):
        raise FieldError("input_output", f"has {len(inputs)} inputs but {len(outputs)} outputs")
    fn_name = io.get("fn_name")
    if fn_name is None:
        tests = [{"input": _lines_text(x, f"input_output.inputs[{i}]"),
                  "output": _lines_text(y, f"input_output.outputs[{i}]")} for i, (x, y) in enumerate(zip(inputs, outputs))]
        rec.setdefault("compare", "tokens")
        rec.setdefault("float_tolerance", APPS_FLOAT_TOLERANCE)
    else:
        for i, x in enumerate(inputs):
            if not isinstance(x, list):
                raise FieldError(f"input_output.inputs[{i}]", "expected a list of the function's arguments "
                                 f"(fn_name is set), got {_type_name(x)}")
        tests = [{"input": x, "output": y} for x, y in zip(inputs, outputs)]
        rec["fn_name"] = fn_name
        rec["wrapped_outputs"] = True
    if tests:
        rec["tests"] = tests

    solutions = _json_field(obj, "solutions")
    if solutions is None:
        rec.pop("solutions", None)
    elif not isinstance(solutions, list) or not all(isinstance(s, str) for s in solutions):
        raise FieldError("solutions", f"expected a list of programs, got {_type_name(solutions)}")
    else:
        rec["solutions"] = solutions
    _code_difficulty(obj, rec)
    return rec


def _code_difficulty(obj: Mapping, rec: dict) -> None:
    label = obj.get("difficulty")
    if not isinstance(label, str):
        return
    if label not in CODE_DIFFICULTY:
        raise FieldError("difficulty", f"expected a number or one of {', '.join(CODE_DIFFICULTY)}, got {label!r}")
    rec["difficulty_label"] = label
    rec["difficulty"] = CODE_DIFFICULTY[label]


def _codecontests_fields(obj: Mapping) -> dict:
    rec = {k: v for k, v in obj.items() if k not in ("description",) + CODECONTESTS_TEST_FIELDS}
    rec["prompt"] = _require_str(obj, "description")
    rec.setdefault("task", "code")
    if obj.get("id") is None and obj.get("name") is not None:
        rec["id"] = obj["name"]
    tests = []
    for field in CODECONTESTS_TEST_FIELDS:
        group = obj.get(field) or {}
        if not isinstance(group, dict):
            raise FieldError(field, f"expected an object with 'input' and 'output' lists, got {_type_name(group)}")
        ins, outs = group.get("input") or [], group.get("output") or []
        if not isinstance(ins, list) or not isinstance(outs, list) or len(ins) != len(outs):
            raise FieldError(field, "expected 'input' and 'output' lists of the same length")
        tests += [{"input": _lines_text(x, f"{field}.input[{i}]"), "output": _lines_text(y, f"{field}.output[{i}]")}
                  for i, (x, y) in enumerate(zip(ins, outs))]
    if tests:
        rec["tests"] = tests
    rec.setdefault("compare", "tokens")
    level = obj.get("difficulty")
    if isinstance(level, int) and not isinstance(level, bool) and 0 <= level < len(CODECONTESTS_LEVELS):
        rec["difficulty_label"] = CODECONTESTS_LEVELS[level]  # no common scale with the rating: not a number
        rating = obj.get("cf_rating")
        rec["difficulty"] = float(rating) if isinstance(rating, (int, float)) and rating > 0 else 0.0
    solutions = _codecontests_python3(obj.get("solutions"))
    if solutions is None:
        rec.pop("solutions", None)
    else:
        rec["solutions"] = solutions
    return rec


def _codecontests_python3(v: Any) -> Optional[list]:
    """The Python 3 programs of a CodeContests ``solutions`` ``{"language": [int],
    "solution": [str]}`` (None when it has none)."""
    if v is None or isinstance(v, list):
        return v or None
    if not isinstance(v, dict):
        raise FieldError("solutions", f"expected an object with 'language' and 'solution' lists, got {_type_name(v)}")
    langs, progs = v.get("language") or [], v.get("solution") or []
    if not isinstance(langs, list) or not isinstance(progs, list) or len(langs) != len(progs):
        raise FieldError("solutions", "expected 'language' and 'solution' lists of the same length")
    return [p for lang, p in zip(langs, progs) if lang == CODECONTESTS_PYTHON3 and isinstance(p, str)] or None
