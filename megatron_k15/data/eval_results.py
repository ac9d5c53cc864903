"""The per-problem results ``tools/evaluate.py --output`` writes, read back by the tools that
build on them (long2short data, prompt curation): one JSON object per problem with its
``id``, its ``samples`` (each with ``text``, ``correct`` and ``length`` in tokens) and
``num_correct``."""

from __future__ import annotations

from typing import Callable, Mapping, Optional

from megatron_k15.data.prompts import DuplicateIdChecker, FieldError, JsonlReader, _type_name


def validate_result_record(obj: Mapping) -> dict:
    """One evaluate.py results line, checked: ``id`` (str; int accepted), ``samples`` (a
    non-empty list of {"text": str, "correct": bool, "length": int >= 0, ...}), optional
    ``num_correct`` (must match the samples) and ``prompt`` (str). FieldError if bad."""
    rid = obj.get("id")
    if rid is None:
        raise FieldError("id", "missing")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise FieldError("id", f"expected a string, got {_type_name(rid)}")
    samples = obj.get("samples")
    if samples is None:
        raise FieldError("samples", "missing (is this a tools/evaluate.py --output file?)")
    if not isinstance(samples, list):
        raise FieldError("samples", f"expected a list of responses, got {_type_name(samples)}")
    if not samples:
        raise FieldError("samples", "is empty")
    out = []
    for i, s in enumerate(samples):
        if not isinstance(s, dict):
            raise FieldError(f"samples[{i}]", f"expected an object, got {_type_name(s)}")
        for key in ("text", "correct", "length"):
            if key not in s:
                raise FieldError(f"samples[{i}].{key}", "missing")
        if not isinstance(s["text"], str):
            raise FieldError(f"samples[{i}].text", f"expected a string, got {_type_name(s['text'])}")
        if not isinstance(s["correct"], bool):
            raise FieldError(f"samples[{i}].correct", f"expected true/false, got {s['correct']!r}")
        n = s["length"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise FieldError(f"samples[{i}].length", f"expected a token count (int >= 0), got {n!r}")
        out.append({"text": s["text"], "correct": s["correct"], "length": n})
    if obj.get("num_correct") is not None:
        c = sum(s["correct"] for s in out)
        if obj["num_correct"] != c:
            raise FieldError("num_correct", f"is {obj['num_correct']!r} but {c} samples are correct")
    rec = {"id": str(rid), "samples": out}
    if obj.get("prompt") is not None:
        if not isinstance(obj["prompt"], str):
            raise FieldError("prompt", f"expected a string, got {_type_name(obj['prompt'])}")
        rec["prompt"] = obj["prompt"]
    return rec


class _ResultsReader(JsonlReader):
    def __init__(self, path: str, finish: Optional[Callable[[dict], dict]]):
        super().__init__(path, self._validate, with_lineno=True)
        self.finish = finish

    def _start(self) -> None:
        self._ids = DuplicateIdChecker()  # per pass over the file

    def _validate(self, obj, _path, lineno):
        rec = validate_result_record(obj)
        self._ids.check(self.path, lineno, rec["id"])
        return self.finish(rec) if self.finish is not None else rec


def read_eval_results(path: str, finish: Optional[Callable[[dict], dict]] = None) -> JsonlReader:
    """``(line, record)`` for every line of a results file, validated (``validate_result_record``)
    with unique ids; ``finish(record)`` may complete or check each one (raising FieldError)."""
    return _ResultsReader(path, finish)
