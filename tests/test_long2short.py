"""tools/build_long2short_data.py (shortest rejection sampling, DPO pair rules, bad records)
and examples/long2short.sh (syntax, and end to end on a tiny model on CPU)."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "build_long2short_data.py"


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tool = _load(TOOL, "build_long2short_data_tool")


def _s(text, correct, length):
    return {"text": text, "correct": correct, "length": length, "stop_reason": "eos"}


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _read(path):
    return [json.loads(line) for line in open(path)]


# one problem per rule; evaluate.py's record format ({id, task, samples, num_correct})
RESULTS = [
    {"id": "p0", "task": "math", "samples": [_s("long right", True, 30), _s("short right", True, 10),
                                              _s("tie right", True, 10), _s("wrong", False, 5)]},
    {"id": "p1", "task": "math", "samples": [_s("wrong long", False, 40), _s("right", True, 20),
                                              _s("wrong short", False, 20), _s("right but long", True, 30),
                                              _s("right a bit longer", True, 29)]},
    {"id": "p2", "task": "math", "samples": [_s("w1", False, 3), _s("w2", False, 50)]},  # nothing correct
    {"id": "p3", "task": "math", "samples": [_s("only right", True, 7), _s("short wrong", False, 7)]},
]
PROMPTS = [{"id": f"p{i}", "prompt": f"question {i}", "task": "math", "answer": "1"} for i in range(4)]


def _run(tmp_path, capsys, *argv, results=RESULTS):
    res = _write(tmp_path / "results.jsonl", results)
    prm = _write(tmp_path / "prompts.jsonl", PROMPTS)
    out = tmp_path / "out" / "data.jsonl"
    rc = tool.main(["--results", res, "--prompts", prm, "--output", str(out), *map(str, argv)])
    return rc, out, capsys.readouterr().err


def test_shortest_rejection_keeps_the_shortest_correct(tmp_path, capsys):
    rc, out, err = _run(tmp_path, capsys, "--mode", "sft")
    assert rc == 0, err
    rows = _read(out)
    assert rows == [{"id": "p0", "prompt": "question 0", "response": "short right"},  # tie: the first
                    {"id": "p1", "prompt": "question 1", "response": "right"},
                    {"id": "p3", "prompt": "question 3", "response": "only right"}]
    assert "4 problems" in err and "kept 3" in err and "1 no correct response" in err
    # the exact format preprocess_data.py --mode sft reads
    from megatron_k15.data.indexed import load_sft_dataset
    from megatron_k15.data.tokenizer import ByteTokenizer

    pre = _load(REPO / "tools" / "preprocess_data.py", "preprocess_data_tool")
    assert pre.main(["--mode", "sft", "--input", str(out), "--output-prefix", str(tmp_path / "sft"),
                     "--tokenizer", "byte", "--no-progress"]) == 0
    ds = load_sft_dataset(str(tmp_path / "sft"))
    tok = ByteTokenizer()
    assert [tok.decode(s.tokens[s.loss_mask == 1]) for s in ds] == ["short right", "right", "only right"]


def test_dpo_pair_rules():
    # chosen = shortest correct (index 1, length 20); longer wrong (40) first; the wrong one of
    # equal length is not longer; correct ones >= 1.5 x 20 = 30 (not 29) follow
    s = RESULTS[1]["samples"]
    assert tool.dpo_pairs(s, 1.5, 4) == [(1, 0, "wrong"), (1, 3, "long")]
    assert tool.dpo_pairs(s, 1.45, 4) == [(1, 0, "wrong"), (1, 3, "long"), (1, 4, "long")]
    assert tool.dpo_pairs(s, 1.45, 2) == [(1, 0, "wrong"), (1, 3, "long")]  # the cap
    assert tool.dpo_pairs(RESULTS[2]["samples"]) == []  # no correct response: no pair
    assert tool.dpo_pairs(RESULTS[3]["samples"]) == []  # the wrong one is not longer
    dup = [_s("a", True, 2), _s("b", False, 5), _s("b", False, 6), _s("", False, 9)]
    assert tool.dpo_pairs(dup) == [(0, 1, "wrong")]  # same text once, empty text never
    assert tool.shortest_correct([_s(" ", True, 1), _s("x", True, 3)]) == 1


def test_dpo_mode_writes_pairs_and_counts(tmp_path, capsys):
    rc, out, err = _run(tmp_path, capsys, "--mode", "dpo", "--max-pairs-per-problem", "3")
    assert rc == 0, err
    got = [(r["id"], r["chosen"], r["rejected"]) for r in _read(out)]
    assert got == [("p0", "short right", "long right"),
                   ("p1", "right", "wrong long"), ("p1", "right", "right but long")]
    assert all(r["prompt"] == f"question {r['id'][1]}" and set(r) == {"id", "prompt", "chosen", "rejected"}
               for r in _read(out))
    assert "kept 2" in err and "1 no correct response" in err and "1 no rejected candidate" in err
    assert "1 longer wrong, 2 correct >= 1.5x longer" in err


@pytest.mark.parametrize("bad,field", [
    ({"id": "x", "samples": [{"text": "a", "correct": "yes", "length": 3}]}, "samples[0].correct"),
    ({"id": "x", "samples": [{"text": "a", "correct": True}]}, "samples[0].length"),
    ({"id": "x", "samples": [{"text": "a", "correct": True, "length": -1}]}, "samples[0].length"),
    ({"id": "x", "samples": [_s("a", True, 3)], "num_correct": 2}, "num_correct"),
    ({"id": "p0", "samples": [_s("a", True, 3)]}, "id"),  # duplicate
    ({"id": "zz", "samples": [_s("a", True, 3)]}, "id"),  # not in --prompts
    ({"samples": []}, "id"),
    ({"id": "x"}, "samples"),
])
def test_bad_record_stops_with_location_and_writes_nothing(tmp_path, capsys, bad, field):
    rc, out, err = _run(tmp_path, capsys, "--mode", "dpo", results=RESULTS[:2] + [bad])
    assert rc == 1
    assert f"results.jsonl:3: field '{field}'" in err, err
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_invalid_json_missing_prompts_and_nothing_kept(tmp_path, capsys):
    rc, out, err = _run(tmp_path, capsys, "--mode", "sft", results=RESULTS[:1] + ["{not json"])
    assert rc == 1 and "results.jsonl:2: invalid JSON" in err
    res = _write(tmp_path / "r.jsonl", RESULTS)
    assert tool.main(["--mode", "sft", "--results", res, "--output", str(tmp_path / "o.jsonl")]) == 1
    assert "r.jsonl:1: field 'prompt': missing (pass --prompts" in capsys.readouterr().err
    rc, out, err = _run(tmp_path, capsys, "--mode", "sft", results=RESULTS[2:3])
    assert rc == 1 and "every one of the 1 problems was skipped" in err and not out.exists()
    # a record may carry its prompt itself
    with_prompt = [dict(RESULTS[0], prompt="inline")]
    assert tool.main(["--mode", "sft", "--results", _write(tmp_path / "r2.jsonl", with_prompt),
                      "--output", str(tmp_path / "o2.jsonl")]) == 0
    assert _read(tmp_path / "o2.jsonl")[0]["prompt"] == "inline"


def test_cli_help():
    proc = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)
    assert proc.returncode == 0
    for flag in ("--mode", "--results", "--prompts", "--length-ratio", "--max-pairs-per-problem"):
        assert flag in proc.stdout
    assert "shortest" in proc.stdout


# -- examples/long2short.sh -------------------------------------------------------------------
SCRIPT = REPO / "examples" / "long2short.sh"


def test_example_script_syntax():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = SCRIPT.read_text()
    assert "--length-penalty-weight" in text and "--rollout-max-tokens" in text  # long2short RL


def parity_reward(response, record):
    """A verifier a random tiny model passes about half the time."""
    return float(sum(response.encode("utf-8", "replace")) % 2 == 0)


def _tiny_checkpoint(path):
    import argparse

    import torch

    from megatron_k15.checkpointing import save_checkpoint
    from megatron_k15.initialize import initialize_model_parallel
    from megatron_k15.models.config import preset
    from megatron_k15.training import build_train_context

    initialize_model_parallel(1)
    args = argparse.Namespace(lr=0.0, attention_backend="sdpa", params_dtype=torch.float32)
    ctx = build_train_context(args, preset("tiny", num_layers=2), seed=5)
    save_checkpoint(str(path), None, ctx, save_optimizer=False)


@pytest.mark.slow
def test_example_runs_end_to_end(tmp_path):
    ckpt = tmp_path / "rl"
    _tiny_checkpoint(ckpt)
    prompts = [{"id": f"q{i}", "prompt": f"{i} + {i} =", "task": "parity",
                "reward_fn": "test_long2short:parity_reward"} for i in range(6)]
    _write(tmp_path / "prompts.jsonl", prompts)
    env = dict(os.environ, CKPT=str(ckpt), PROMPTS=str(tmp_path / "prompts.jsonl"), OUT=str(tmp_path / "out"),
               N_SAMPLES="4", MAX_NEW_TOKENS="6", SEQ_LENGTH="64", GLOBAL_BATCH="2", TRAIN_ITERS="2",
               LR="1e-3", MERGE_WEIGHT="0.5",
               PYTHONPATH=os.pathsep.join([str(REPO), str(Path(__file__).parent)]))
    t0 = time.time()
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("long2short ")]
    assert len(lines) == 2 and "pass@1" in lines[0] and "mean response length" in lines[1], proc.stdout
    out = tmp_path / "out"
    assert (out / "sft" / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert (out / "merged_sft" / "latest_checkpointed_iteration.txt").exists()
    # each kept record is the shortest correct of its problem's samples
    samples = {r["id"]: r["samples"] for r in _read(out / "samples.jsonl")}
    for rec in _read(out / "data" / "l2s_sft.jsonl"):
        right = [s for s in samples[rec["id"]] if s["correct"] and s["text"].strip()]
        assert rec["response"] == min(right, key=lambda s: s["length"])["text"]
    # a second run skips every stage
    again = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and again.stdout.splitlines()[-2:] == lines
    print(f"long2short.sh end to end: {time.time() - t0:.0f}s")
