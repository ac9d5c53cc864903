"""Reading and validating JSONL inputs: RL prompt records, SFT records, generic lines.

Every problem is a :class:`DataError` whose message starts with ``FILE:LINE:`` and names the
field, e.g. ``data/p.jsonl:7: field 'answer': missing (required for task 'math')``. Readers
stop at the first bad line, or, with ``skip_bad=True``, skip it and count it (``.skipped``,
``.errors``). Blank lines are ignored; a file with no records at all is an error.

Prompt records (DESIGN.md section 5), normalised by :func:`validate_prompt_record`:

``{"id": str, "prompt": str, "task": str, "answer": str, "tests": [{"input", "output"}],
"difficulty": float, ...}``

- ``prompt``: required, non-empty str.
- ``id``: str (an int is turned into str); default ``"<file name>:<line>"``; must be unique.
- ``task``: str; default ``"math"`` when ``answer`` is given, ``"code"`` when ``tests`` is.
- ``answer``: required for ``math``; str (int/float accepted and turned into str).
- ``tests``: required for ``code``; a non-empty list of ``{"input": str (default ""),
  "output": str}``, or with ``fn_name`` (the function a call-based test calls: LeetCode /
  APPS style, top level or a method of ``class Solution``) ``{"input": [arguments],
  "output": the returned value}`` in JSON.
- ``difficulty``: a number (not bool); default 0.0.
- ``pass_rate``: optional, a number in [0, 1] (``tools/curate_prompts.py``).
- ``timeout_s``: optional, seconds > 0 (the code reward's limit per test).
- ``compare`` (``"lines"`` | ``"tokens"``) and ``float_tolerance`` (number >= 0): optional,
  the code reward's checker (``rewards.code.outputs_match``).
- ``checker``: optional, instead of those: Python source defining ``check(input, output,
  expected) -> bool`` for problems with several right answers (run in the code sandbox).
- other fields (``reward_fn``, ...) are kept as they are.
- ``wrapped_outputs``: optional bool, with ``fn_name``: an expected ``[v]`` also accepts ``v``
  (APPS / TACO's convention, ``rewards.code``).
- GSM8K and MATH records (prompt + answer), APPS / TACO and CodeContests records (code
  prompts with tests) are read in these fields (``data/public_formats.py``).

SFT records (:func:`validate_sft_record`): ``{"prompt": str, "response": str}`` or
``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]}`` with at
least one assistant message; ShareGPT's ``{"conversations": [{"from", "value"}, ...]}`` (an
optional top-level ``system``) and Alpaca's ``{"instruction", "input", "output"}`` are read as
those.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Iterator, Mapping, Optional, Union

__all__ = [
    "DataError",
    "FieldError",
    "JsonlReader",
    "read_jsonl",
    "read_prompt_records",
    "validate_prompt_record",
    "validate_sft_record",
    "validate_generation_record",
    "parse_json_line",
    "iter_raw_lines",
    "input_size",
    "DuplicateIdChecker",
    "SFT_ROLES",
]

SFT_ROLES = ("system", "user", "assistant", "tool")


class FieldError(ValueError):
    """A problem with one field of one record (no location yet)."""

    def __init__(self, field: Optional[str], msg: str):
        self.field = field
        self.msg = msg
        super().__init__(f"field '{field}': {msg}" if field else msg)


class DataError(ValueError):
    """A bad input line: ``FILE:LINE: field 'F': message``."""

    def __init__(self, path: str, line: Optional[int], field: Optional[str], msg: str):
        self.path = str(path)
        self.line = line
        self.field = field
        self.msg = msg
        loc = f"{self.path}:{line}" if line is not None else self.path
        what = f"field '{field}': {msg}" if field else msg
        super().__init__(f"{loc}: {what}")

    def __reduce__(self):  # picklable across worker processes
        return (DataError, (self.path, self.line, self.field, self.msg))


# -- raw lines ---------------------------------------------------------------------------
def iter_raw_lines(path: str, label: Optional[str] = None) -> Iterator[tuple[int, bytes]]:
    """``(line_number, raw_bytes)`` for every line (1-based), newline stripped. A file that is
    one JSON array (``[{...}, {...}]``, as Alpaca's and many ShareGPT dumps are) gives each
    element instead, as one compact JSON line numbered by the line it starts on (for errors;
    an element without an ``id`` gets ``FILE:K``, K its position, as several may share a
    line; ``label`` replaces the file name there). A Parquet file (as Hugging Face datasets are
    published) gives each row as a JSON line numbered by its row (1-based); it needs ``pyarrow``."""
    if _is_parquet(path):
        yield from _iter_parquet(path)
        return
    if _is_json_array(path):
        yield from _iter_json_array(path, label)
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            yield lineno, raw.rstrip(b"\r\n")


PARQUET_MAGIC = b"PAR1"


def _is_parquet(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(len(PARQUET_MAGIC)) == PARQUET_MAGIC


def _parquet_file(path: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(path, None, None, "is a Parquet file; reading it needs pyarrow (pip install pyarrow, "
                        "or convert it to JSONL)") from None
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a damaged file
        raise DataError(path, None, None, f"is not a readable Parquet file ({type(e).__name__}: {e})") from None


def _json_value(v: Any) -> Any:
    """What ``json.dumps`` cannot write, from a Parquet cell: bytes as UTF-8 text, the rest
    (dates, decimals) as their str."""
    return v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else str(v)


def _iter_parquet(path: str) -> Iterator[tuple[int, bytes]]:
    row = 0
    for batch in _parquet_file(path).iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            row += 1
            yield row, json.dumps(rec, ensure_ascii=False, default=_json_value).encode("utf-8")


def input_size(path: str) -> tuple[int, str]:
    """How much there is to read, for a progress bar: (rows, "rows") of a Parquet file, else
    (bytes, "B")."""
    if _is_parquet(path):
        return _parquet_file(path).metadata.num_rows, "rows"
    return os.path.getsize(path), "B"


def _is_json_array(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf").lstrip()
    return head.startswith(b"[")


def _iter_json_array(path: str, label: Optional[str] = None) -> Iterator[tuple[int, bytes]]:
    raw = open(path, "rb").read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, raw.count(b"\n", 0, e.start) + 1, None,
                        f"not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
    decoder, n = json.JSONDecoder(), len(text)
    pos, line, counted, index, base = text.index("[") + 1, 1, 0, 0, label or os.path.basename(path)

    def line_at(p: int) -> int:  # newlines counted incrementally: positions only grow
        nonlocal line, counted
        line += text.count("\n", counted, p)
        counted = p
        return line

    def skip_ws(p: int) -> int:
        while p < n and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip_ws(pos)
    if pos < n and text[pos] == "]":
        return
    while True:
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(path, e.lineno, None, f"invalid JSON ({e.msg} at column {e.colno})") from None
        index += 1
        if isinstance(obj, dict) and obj.get("id") is None:  # default ids by position: lines may repeat
            obj = {**obj, "id": f"{base}:{index}"}
        yield line_at(pos), json.dumps(obj, ensure_ascii=False).encode("utf-8")
        pos = skip_ws(end)
        if pos < n and text[pos] == ",":
            pos = skip_ws(pos + 1)
            continue
        if pos < n and text[pos] == "]" and not text[pos + 1:].strip():
            return
        raise DataError(path, line_at(min(pos, n)), None, "invalid JSON array (expected ',' or a final ']')")


def parse_json_line(path: str, lineno: int, raw: Union[bytes, str]) -> Optional[dict]:
    """Decode one line to a dict; None for a blank line; DataError for anything else."""
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(path, lineno, None,
                            f"not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
    else:
        text = raw
    if lineno == 1 and text.startswith("\ufeff"):
        text = text[1:]  # a UTF-8 byte-order mark
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, lineno, None, f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(path, lineno, None, f"expected a JSON object, got {type(obj).__name__}")
    return obj


# -- field validation ---------------------------------------------------------------------
def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _require_str(obj: Mapping, field: str, *, non_empty: bool = True, label: Optional[str] = None) -> str:
    label = label or field
    if field not in obj:
        raise FieldError(label, "missing")
    v = obj[field]
    if not isinstance(v, str):
        raise FieldError(label, f"expected a string, got {_type_name(v)}")
    if non_empty and not v.strip():
        raise FieldError(label, "is empty")
    return v


def _validate_tests(tests: Any, call_based: bool = False) -> list[dict]:
    """stdin tests ``{"input": str, "output": str}``, or with ``fn_name`` call-based ones
    ``{"input": [arguments], "output": returned value}`` (JSON values)."""
    if not isinstance(tests, list):
        raise FieldError("tests", f"expected a list of {{'input','output'}} objects, got {_type_name(tests)}")
    if not tests:
        raise FieldError("tests", "is empty (code prompts need at least one test)")
    out = []
    for i, t in enumerate(tests):
        if not isinstance(t, dict):
            raise FieldError(f"tests[{i}]", f"expected an object with 'input' and 'output', got {_type_name(t)}")
        if "output" not in t:
            raise FieldError(f"tests[{i}].output", "missing")
        if call_based:
            if not isinstance(t.get("input"), list):
                raise FieldError(f"tests[{i}].input", "expected a list of the function's arguments (fn_name is "
                                 f"set), got {_type_name(t.get('input'))}")
            from megatron_k15.rewards.code import is_json_value

            for key in ("input", "output"):
                if not is_json_value(t[key]):
                    raise FieldError(f"tests[{i}].{key}", "is not a JSON value (no NaN or infinity)")
            if t["output"] is None:  # a function that does nothing would pass it
                raise FieldError(f"tests[{i}].output", "is null (the returned value a call must match)")
            out.append(dict(t))
            continue
        inp = t.get("input", "")
        if not isinstance(inp, str):
            raise FieldError(f"tests[{i}].input", f"expected a string, got {_type_name(inp)}")
        if not isinstance(t["output"], str):
            raise FieldError(f"tests[{i}].output", f"expected a string, got {_type_name(t['output'])}")
        out.append({**t, "input": inp})
    return out


def validate_prompt_record(obj: Mapping, default_id: Optional[str] = None, *,
                           tests_required: bool = True) -> dict:
    """A normalised copy of one prompt record (see the module docstring); FieldError if bad.
    ``tests_required=False``: a code prompt may come without tests (one whose tests are still
    to be built, ``tools/build_code_tests.py``)."""
    from megatron_k15.data.public_formats import prompt_dataset_fields  # (it imports this module)

    obj = prompt_dataset_fields(obj)
    rec = dict(obj)
    rec["prompt"] = _require_str(obj, "prompt")

    if "id" in obj and obj["id"] is not None:
        v = obj["id"]
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise FieldError("id", f"expected a string, got {_type_name(v)}")
        rec["id"] = str(v)
        if not rec["id"]:
            raise FieldError("id", "is empty")
    elif default_id is not None:
        rec["id"] = default_id
    else:
        raise FieldError("id", "missing")

    has_answer = obj.get("answer") is not None
    has_tests = obj.get("tests") is not None
    if "task" in obj and obj["task"] is not None:
        task = obj["task"]
        if not isinstance(task, str) or not task.strip():
            raise FieldError("task", f"expected a non-empty string, got {task!r}")
    elif has_answer:
        task = "math"
    elif has_tests:
        task = "code"
    else:
        raise FieldError("task", "missing (and no 'answer' or 'tests' to infer it from)")
    rec["task"] = task

    if has_answer:
        a = obj["answer"]
        if isinstance(a, bool) or not isinstance(a, (str, int, float)):
            raise FieldError("answer", f"expected a string, got {_type_name(a)}")
        if isinstance(a, float) and not math.isfinite(a):
            raise FieldError("answer", f"expected a string, got non-finite {a!r}")
        rec["answer"] = a if isinstance(a, str) else str(a)
        if not rec["answer"].strip():
            raise FieldError("answer", "is empty")
    elif task == "math":
        raise FieldError("answer", "missing (required for task 'math')")
    else:
        rec.pop("answer", None)

    from megatron_k15.rewards.code import checker_error, custom_checker_error, fn_name_error  # the code reward's

    fn_error = fn_name_error(obj.get("fn_name"))
    if fn_error:
        raise FieldError("fn_name", fn_error)
    wrapped = obj.get("wrapped_outputs")
    if wrapped is not None and (not isinstance(wrapped, bool) or (wrapped and obj.get("fn_name") is None)):
        raise FieldError("wrapped_outputs", f"expected true or false, with fn_name set, got {wrapped!r}")
    if has_tests:
        rec["tests"] = _validate_tests(obj["tests"], call_based=obj.get("fn_name") is not None)
    elif task == "code" and tests_required:
        raise FieldError("tests", "missing (required for task 'code')")
    else:
        rec.pop("tests", None)

    d = obj.get("difficulty", None)
    if d is None:
        rec["difficulty"] = 0.0
    else:
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d):
            raise FieldError("difficulty", f"expected a number, got {d!r}")
        rec["difficulty"] = float(d)
    timeout = obj.get("timeout_s", None)
    if timeout is not None:  # the code reward's wall-clock limit per test for this prompt
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
            raise FieldError("timeout_s", f"expected seconds (a number > 0), got {timeout!r}")
    error = checker_error(obj.get("compare", "lines"), obj.get("float_tolerance"))
    if error:
        raise FieldError(*error)
    if obj.get("checker") is not None:  # a custom checker (problems with several right answers)
        why = custom_checker_error(obj["checker"])
        if why:
            raise FieldError("checker", why)
        if obj.get("fn_name") is not None:
            raise FieldError("checker", "judges printed output: call-based tests (fn_name) compare returned values")
        for field in ("compare", "float_tolerance"):
            if obj.get(field) is not None:
                raise FieldError("checker", f"replaces {field}: give one or the other")
    rate = obj.get("pass_rate", None)
    if rate is not None:  # tools/curate_prompts.py: the prioritized sampler starts from it
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
            raise FieldError("pass_rate", f"expected a number in [0, 1], got {rate!r}")
        rec["pass_rate"] = float(rate)
    return rec


# ShareGPT's speaker names -> our roles
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "model": "assistant", "tool": "tool",
                  "observation": "tool", "function": "tool"}


def _turns(obj: Mapping, field: str, role_key: str, content_key: str, roles: Mapping[str, str]) -> list[dict]:
    """``obj[field]``, a list of ``{role_key, content_key}`` objects, as ``[{"role", "content"}]``
    with each role mapped through ``roles`` (whose keys are the accepted names)."""
    turns = obj[field]
    if not isinstance(turns, list):
        raise FieldError(field, f"expected a list of {{'{role_key}','{content_key}'}} objects, got {_type_name(turns)}")
    out = []
    for i, t in enumerate(turns):
        where = f"{field}[{i}]"
        if not isinstance(t, dict):
            raise FieldError(where, f"expected an object with '{role_key}' and '{content_key}', got {_type_name(t)}")
        role = _require_str(t, role_key, label=f"{where}.{role_key}")
        if role not in roles:
            raise FieldError(f"{where}.{role_key}", f"{role!r} is not one of {', '.join(roles)}")
        out.append({"role": roles[role],
                    "content": _require_str(t, content_key, non_empty=False, label=f"{where}.{content_key}")})
    return out


def _sharegpt_messages(obj: Mapping) -> dict:
    """ShareGPT's ``{"conversations": [{"from": "human"|"gpt"|..., "value": str}], "system"?}``
    as ``{"messages": [...]}``."""
    msgs = []
    if obj.get("system") is not None and _require_str(obj, "system", non_empty=False):  # "" in many dumps
        msgs.append({"role": "system", "content": obj["system"]})
    msgs += _turns(obj, "conversations", "from", "value", SHAREGPT_ROLES)
    if not any(m["role"] == "assistant" for m in msgs):
        raise FieldError("conversations", "has no gpt/assistant turn (nothing to train on)")
    return {"messages": msgs}


def _alpaca_pair(obj: Mapping) -> dict:
    """Alpaca's ``{"instruction", "input"?, "output"}`` as ``{"prompt", "response"}``: the
    prompt is the instruction, then a blank line and the input when there is one."""
    instruction = _require_str(obj, "instruction", non_empty=False)
    extra = _require_str(obj, "input", non_empty=False) if obj.get("input") is not None else ""
    return {"prompt": f"{instruction}\n\n{extra}" if extra else instruction,
            "response": _require_str(obj, "output")}


def validate_sft_record(obj: Mapping) -> dict:
    """``{"prompt", "response"}`` or ``{"messages": [...]}`` (also ShareGPT's
    ``{"conversations": [{"from", "value"}]}`` and Alpaca's ``{"instruction", "input"?,
    "output"}``), returned as ``{"messages": [...]}`` (a prompt/response pair becomes one
    user and one assistant message, and keeps ``"pair": True``); FieldError if bad."""
    ours = any(k in obj for k in ("messages", "prompt", "response"))  # our fields win over any others
    if not ours and "conversations" in obj:
        obj = _sharegpt_messages(obj)
    elif not ours and "instruction" in obj:
        obj = _alpaca_pair(obj)
    if "messages" in obj:
        out = _turns(obj, "messages", "role", "content", {r: r for r in SFT_ROLES})
        if not out:
            raise FieldError("messages", "is empty")
        if not any(m["role"] == "assistant" for m in out):
            raise FieldError("messages", "has no assistant message (nothing to train on)")
        return {"messages": out}
    if "prompt" not in obj and "response" not in obj:
        raise FieldError("prompt", "missing (an SFT line needs 'prompt' and 'response', or 'messages'; "
                                   "ShareGPT 'conversations' and Alpaca 'instruction'/'output' are read too)")
    prompt = _require_str(obj, "prompt", non_empty=False)
    response = _require_str(obj, "response")
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
            "pair": True}


def validate_generation_record(obj: Mapping) -> dict:
    """``{"prompt": str}`` or ``{"prompt_ids": [int, ...]}`` (for the generate CLI)."""
    if "prompt_ids" in obj:
        ids = obj["prompt_ids"]
        if not isinstance(ids, list) or not ids:
            raise FieldError("prompt_ids", f"expected a non-empty list of ints, got {_type_name(ids)}")
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise FieldError(f"prompt_ids[{i}]", f"expected a non-negative int, got {t!r}")
        return dict(obj)
    _require_str(obj, "prompt")
    return dict(obj)


def _check_required(obj: Mapping, required) -> None:
    if required is None:
        return
    if isinstance(required, Mapping):
        for name, typ in required.items():
            if name not in obj:
                raise FieldError(name, "missing")
            if typ is not None:
                v = obj[name]
                bad_bool = isinstance(v, bool) and typ in (int, float, (int, float))
                if bad_bool or not isinstance(v, typ):
                    tn = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
                    raise FieldError(name, f"expected {tn}, got {_type_name(v)}")
    else:
        for name in required:
            if name not in obj:
                raise FieldError(name, "missing")


# -- readers -------------------------------------------------------------------------------
class DuplicateIdChecker:
    """Remembers ids with their line; ``check(path, line, id)`` raises DataError on a repeat."""

    def __init__(self):
        self._seen: dict[str, tuple[str, int]] = {}

    def check(self, path: str, line: int, rid: str) -> None:
        first = self._seen.get(rid)
        if first is not None:
            where = f"line {first[1]}" if first[0] == path else f"{first[0]}:{first[1]}"
            raise DataError(path, line, "id", f"duplicate id {rid!r} (first on {where})")
        self._seen[rid] = (path, line)


class JsonlReader:
    """Iterates validated records of a JSONL file.

    ``validate(obj, path, lineno) -> dict`` returns the record or raises FieldError/DataError.
    With ``skip_bad`` bad lines are skipped: ``.skipped`` counts them and ``.errors`` keeps
    their DataErrors. ``.records`` counts records yielded. With ``with_lineno`` the iterator
    yields ``(line_number, record)``.
    """

    def __init__(self, path: str, validate: Callable[[dict, str, int], dict], *,
                 skip_bad: bool = False, with_lineno: bool = False, allow_empty: bool = False):
        self.path = os.fspath(path)
        self.validate = validate
        self.skip_bad = skip_bad
        self.with_lineno = with_lineno
        self.allow_empty = allow_empty
        self.skipped = 0
        self.records = 0
        self.errors: list[DataError] = []

    def _start(self) -> None:
        """Called at the start of every iteration (subclasses reset their state here)."""

    def __iter__(self):
        self.skipped, self.records, self.errors = 0, 0, []
        self._start()
        seen_any = False
        last = 0
        for lineno, raw in iter_raw_lines(self.path):
            last = lineno
            try:
                obj = parse_json_line(self.path, lineno, raw)
                if obj is None:
                    continue
                seen_any = True
                try:
                    rec = self.validate(obj, self.path, lineno)
                except FieldError as e:
                    raise DataError(self.path, lineno, e.field, e.msg) from None
            except DataError as e:
                if not self.skip_bad:
                    raise
                seen_any = True
                self.skipped += 1
                self.errors.append(e)
                continue
            self.records += 1
            yield (lineno, rec) if self.with_lineno else rec
        if not seen_any and not self.allow_empty:
            raise DataError(self.path, max(1, last), None, "file is empty (no records)")


def read_jsonl(path: str, required=None, *, validate: Optional[Callable[[dict], dict]] = None,
               skip_bad: bool = False, with_lineno: bool = False,
               allow_empty: bool = False) -> JsonlReader:
    """Dicts from a JSONL file, with ``FILE:LINE`` errors.

    ``required``: field names that must be present, or ``{name: type or tuple of types}``
    (bool is not accepted as int/float). ``validate``: an optional function of the dict that
    returns the record or raises :class:`FieldError` (e.g. :func:`validate_generation_record`).
    """

    def _v(obj, _path, _lineno):
        _check_required(obj, required)
        return validate(obj) if validate is not None else obj

    return JsonlReader(path, _v, skip_bad=skip_bad, with_lineno=with_lineno, allow_empty=allow_empty)


def read_prompt_records(path: str, *, skip_bad: bool = False, with_lineno: bool = False,
                        allow_empty: bool = False,
                        validate_record: Callable[..., dict] = validate_prompt_record) -> JsonlReader:
    """Validated, normalised prompt records (see the module docstring); ids are unique.
    ``validate_record(obj, default_id)``: the check of one record (records that extend prompt
    records, e.g. code problems with reference solutions, bring their own)."""
    reader = _PromptReader(path, None, skip_bad=skip_bad, with_lineno=with_lineno,
                           allow_empty=allow_empty)
    reader.validate_record = validate_record
    return reader


class _PromptReader(JsonlReader):
    validate_record = staticmethod(validate_prompt_record)

    def _start(self) -> None:
        self._ids = DuplicateIdChecker()
        self._base = os.path.basename(self.path)
        self.validate = self._validate

    def _validate(self, obj: dict, path: str, lineno: int) -> dict:
        rec = self.validate_record(obj, default_id=f"{self._base}:{lineno}")
        self._ids.check(path, lineno, rec["id"])
        return rec
