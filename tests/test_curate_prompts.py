"""tools/curate_prompts.py (Kimi k1.5's RL prompt curation): difficulty from the pass rate of
several samples, prompts dropped by pass rate and as easy to hack (answered without
reasoning), bad input refused with FILE:LINE and no output; the prioritized sampler starts
from a curated prompt's pass rate."""

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("curate_prompts_tool", REPO / "tools" / "curate_prompts.py")
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)

# id: (correct of 10 with reasoning, correct of 8 without)
OUTCOMES = {"p0": (10, 0), "p1": (5, 0), "p2": (0, 0), "p3": (3, 2), "p4": (7, 0)}


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _results(path, which, n):
    rows = []
    for pid, outcome in OUTCOMES.items():
        c = outcome[which]
        rows.append({"id": pid, "task": "math", "prompt": f"{pid}?", "num_correct": c,
                     "samples": [{"text": str(k), "correct": k < c, "length": 3, "stop_reason": "eos"}
                                 for k in range(n)]})
    return _write(path, rows)


@pytest.fixture
def inputs(tmp_path):
    prompts = _write(tmp_path / "prompts.jsonl", [{"id": pid, "prompt": f"{pid}?", "task": "math", "answer": "1",
                                                   "source": f"set-{i}"} for i, pid in enumerate(OUTCOMES)])
    return {"prompts": prompts, "results": _results(tmp_path / "pass.jsonl", 0, 10),
            "nocot": _results(tmp_path / "nocot.jsonl", 1, 8), "out": str(tmp_path / "curated.jsonl")}


def test_difficulty_and_drops(inputs, capsys):
    rc = tool.main(["--input", inputs["prompts"], "--results", inputs["results"], "--no-cot-results",
                    inputs["nocot"], "--min-pass-rate", "0.05", "--max-pass-rate", "0.9", "--output", inputs["out"]])
    assert rc == 0
    kept = [json.loads(line) for line in open(inputs["out"])]
    # p0 solved every time (easy), p2 never (hard), p3 answered twice without reasoning (hackable)
    assert [r["id"] for r in kept] == ["p1", "p4"]
    # exact: 1 - 0.7 would be 0.30000000000000004, outside --curriculum-threshold 0.3
    assert [(r["pass_rate"], r["difficulty"]) for r in kept] == [(0.5, 0.5), (0.7, 0.3)]
    assert [r["source"] for r in kept] == ["set-1", "set-4"]  # other fields stay
    out = capsys.readouterr().out
    assert "kept 2 of 5 prompts" in out and "1 answered without reasoning" in out
    assert "1 pass rate above --max-pass-rate" in out and "1 pass rate below --min-pass-rate" in out
    assert "[0.2,0.4): 1" in out and "[0.4,0.6): 1" in out
    # defaults keep everything but what is answered without reasoning (--max-no-cot-correct 0)
    assert tool.main(["--input", inputs["prompts"], "--results", inputs["results"], "--output", inputs["out"]]) == 0
    assert [json.loads(line)["id"] for line in open(inputs["out"])] == list(OUTCOMES)
    assert tool.main(["--input", inputs["prompts"], "--results", inputs["results"], "--no-cot-results",
                      inputs["nocot"], "--max-no-cot-correct", "2", "--output", inputs["out"]]) == 0
    assert len(open(inputs["out"]).readlines()) == 5


def test_bad_input_names_file_and_line_and_writes_nothing(inputs, tmp_path, capsys):
    partial = _write(tmp_path / "partial.jsonl", open(inputs["results"]).read().splitlines()[:2])
    assert tool.main(["--input", inputs["prompts"], "--results", partial, "--output", inputs["out"]]) == 1
    err = capsys.readouterr().err
    assert f"{inputs['prompts']}:3: field 'id': 'p2' has no results in --results {partial} (3 prompts without)" in err
    lines = open(inputs["results"]).read().splitlines()
    bad = _write(tmp_path / "bad.jsonl", lines[:3] + ['{"id": "p3", "samples": "yes"}'] + lines[4:])
    assert tool.main(["--input", inputs["prompts"], "--results", bad, "--output", inputs["out"]]) == 1
    assert f"{bad}:4: field 'samples'" in capsys.readouterr().err
    dup = _write(tmp_path / "dup.jsonl", lines + lines[:1])
    assert tool.main(["--input", inputs["prompts"], "--results", dup, "--output", inputs["out"]]) == 1
    assert f"{dup}:6: field 'id': duplicate id 'p0'" in capsys.readouterr().err
    # everything dropped: an error, not an empty prompt set
    assert tool.main(["--input", inputs["prompts"], "--results", inputs["results"], "--min-pass-rate", "0.95",
                      "--max-pass-rate", "0.99", "--no-cot-results", inputs["nocot"], "--output", inputs["out"]]) == 1
    assert "nothing written" in capsys.readouterr().err
    assert not list(tmp_path.glob("curated.jsonl*"))
    with pytest.raises(SystemExit) as e:
        tool.main(["--input", inputs["prompts"], "--results", inputs["results"], "--min-pass-rate", "0.8",
                   "--max-pass-rate", "0.2", "--output", inputs["out"]])
    assert e.value.code == 2 and "--min-pass-rate 0.8 is above --max-pass-rate 0.2" in capsys.readouterr().err


def test_no_cot_results_without_a_correct_answer_warn(inputs, tmp_path, capsys):
    """All wrong without reasoning: likely graded inside a cut-off <think> block."""
    rows = [json.loads(line) for line in open(inputs["nocot"])]
    for r in rows:
        r["num_correct"] = 0
        for smp in r["samples"]:
            smp["correct"] = False
    nocot = _write(tmp_path / "wrong.jsonl", rows + [dict(rows[0], id="elsewhere")])
    assert tool.main(["--input", inputs["prompts"], "--results", inputs["results"], "--no-cot-results", nocot,
                      "--output", inputs["out"]]) == 0
    captured = capsys.readouterr()
    assert "no sample is correct" in captured.err and "--reasoning-tags none" in captured.err


def test_pass_rate_field_is_checked():
    from megatron_k15.data.prompts import FieldError, validate_prompt_record

    base = {"id": "a", "prompt": "1+1=", "answer": "2"}
    assert validate_prompt_record({**base, "pass_rate": 0.3})["pass_rate"] == 0.3
    for bad in ("0.3", True, float("nan"), 1.5, -0.1):
        with pytest.raises(FieldError, match="pass_rate"):
            validate_prompt_record({**base, "pass_rate": bad})


def test_prioritized_sampling_starts_from_the_pass_rate():
    from megatron_k15.rl.sampling import build_sampler

    recs = [{"id": "a", "pass_rate": 0.25}, {"id": "b"}, {"id": "c", "pass_rate": 1.0}]
    s = build_sampler("prioritized", recs, seed=0, floor=0.05)
    w = [0.75 + 0.05, 1.0 + 0.05, 0.0 + 0.05]  # (1 - s_i) + floor, s_i the pass rate (0 without)
    assert s.probabilities().tolist() == pytest.approx([x / sum(w) for x in w])
