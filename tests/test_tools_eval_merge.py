"""tools/evaluate.py (pass@k through the reward registry) and tools/merge_models.py."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from megatron_k15.checkpointing import read_full_state_dict
from megatron_k15.rl.evaluation import pass_at_k
from megatron_k15.testing import save_tiny_hf_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name):
    path = os.path.join(ROOT, "tools", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _convert(tmp, name, seed):
    hf = tmp / f"hf_{name}"
    save_tiny_hf_checkpoint(str(hf), "qwen2", seed=seed)
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "checkpoint", "convert_hf_to_megatron.py"),
                    "--hf-dir", str(hf), "--save", str(tmp / name)], check=True, capture_output=True)
    return str(tmp / name)


def test_pass_at_k_matches_the_combinatorial_formula():
    for n, c, k in [(8, 0, 1), (8, 3, 1), (8, 3, 4), (5, 5, 2), (10, 1, 10), (6, 2, 5)]:
        expect = 1.0 - (math.comb(n - c, k) / math.comb(n, k) if n - c >= k else 0.0)
        assert abs(pass_at_k(n, c, k) - expect) < 1e-12


def test_merge_is_the_weighted_average_at_any_layout(tmp_path):
    a, b = _convert(tmp_path, "a", 1), _convert(tmp_path, "b", 2)
    merge = _tool("merge_models")
    assert merge.main(["--load-a", a, "--load-b", b, "--weight-a", "0.25", "--save", str(tmp_path / "m"),
                       "--tensor-model-parallel-size", "2"]) == 0
    (sa, _), (sb, _), (sm, _) = (read_full_state_dict(p) for p in (a, b, str(tmp_path / "m")))
    for k in sa:
        assert torch.allclose(sm[k], 0.25 * sa[k] + 0.75 * sb[k], atol=1e-7), k
    assert merge.main(["--load-a", a, "--load-b", b, "--save", str(tmp_path / "m")]) != 0  # exists


@pytest.mark.parametrize("inputs", [("hf_a", "hf_b"), ("hf_a", "b")])
def test_merge_takes_hugging_face_directories_as_they_are(tmp_path, inputs):
    """Two released HF models (or one and one of our checkpoints) merge without converting:
    the result equals merging their conversions, and carries the first one's side files."""
    a, b = _convert(tmp_path, "a", 1), _convert(tmp_path, "b", 2)
    (tmp_path / "hf_a" / "generation_config.json").write_text("{}")
    (tmp_path / "hf_a" / "tokenizer.json").write_text("{}")
    merge = _tool("merge_models")
    assert merge.main(["--load-a", a, "--load-b", b, "--weight-a", "0.25", "--save", str(tmp_path / "m")]) == 0
    out = tmp_path / "m_hf"
    assert merge.main(["--load-a", str(tmp_path / inputs[0]), "--load-b", str(tmp_path / inputs[1]),
                       "--weight-a", "0.25", "--save", str(out), "--pipeline-model-parallel-size", "2"]) == 0
    (want, _), (got, _) = read_full_state_dict(str(tmp_path / "m")), read_full_state_dict(str(out))
    assert sorted(want) == sorted(got) and all(torch.equal(want[k], got[k]) for k in want)
    assert sorted(os.listdir(out / "tokenizer")) == ["tokenizer.json"]
    assert sorted(os.listdir(out / "hf_files")) == ["generation_config.json"]


def test_merge_rejects_different_architectures(tmp_path, capsys):
    a = _convert(tmp_path, "a", 1)
    hf = tmp_path / "hf_c"
    save_tiny_hf_checkpoint(str(hf), "qwen2", num_hidden_layers=3)
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "checkpoint", "convert_hf_to_megatron.py"),
                    "--hf-dir", str(hf), "--save", str(tmp_path / "c")], check=True, capture_output=True)
    assert _tool("merge_models").main(["--load-a", a, "--load-b", str(tmp_path / "c"),
                                       "--save", str(tmp_path / "m")]) != 0
    assert "different architectures" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def always_right(response, record):
    return 1.0


def always_wrong(response, record):
    return 0.0


def test_evaluate_reports_pass_at_k_through_the_registry(tmp_path):
    ck = _convert(tmp_path, "a", 1)
    me = "test_tools_eval_merge"
    with open(tmp_path / "eval.jsonl", "w") as f:
        for i in range(4):
            fn = "always_right" if i % 2 == 0 else "always_wrong"
            f.write(json.dumps({"id": f"e{i}", "prompt": f"{i}+{i}=", "task": "alpha" if i < 3 else "beta",
                                "reward_fn": f"{me}:{fn}"}) + "\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.dirname(os.path.abspath(__file__))]))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "evaluate.py"), "--load", ck,
                           "--tokenizer", "byte", "--input", str(tmp_path / "eval.jsonl"),
                           "--output", str(tmp_path / "res.jsonl"), "--n-samples", "3", "--temperature", "1.0",
                           "--max-new-tokens", "4", "--reward-workers", "3"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in open(tmp_path / "res.jsonl")]
    assert [r["num_correct"] for r in rows] == [3, 0, 3, 0]  # threaded grading keeps the order
    assert all(len(r["samples"]) == 3 and all(s["length"] <= 4 for s in r["samples"]) for r in rows)
    summary = json.load(open(tmp_path / "res.summary.json"))
    assert summary["pass@1"] == 0.5 and summary["pass@3"] == 0.5
    # per task (e0-e2 alpha: right, wrong, right; e3 beta: wrong)
    assert summary["alpha/accuracy"] == summary["alpha/pass@3"] == pytest.approx(2 / 3)
    assert summary["beta/accuracy"] == summary["beta/pass@3"] == 0.0
    assert summary["alpha/problems"] == 3 and summary["beta/problems"] == 1
    assert "maj@3" not in summary  # no math problem to vote on


def test_evaluate_resumes_an_interrupted_run(tmp_path):
    """A run cut after two problems (its OUTPUT.partial: two whole lines and one cut short)
    resumes with --resume in chunks of one and writes the very results of one uninterrupted
    pass: every sample is seeded by its problem's place in the file. Without --resume the
    partial results are not overwritten; a partial file from another input is refused."""
    ck = _convert(tmp_path, "a", 1)
    with open(tmp_path / "eval.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"id": f"e{i}", "prompt": f"{i}*{i}=", "task": "t",
                                "reward_fn": "test_tools_eval_merge:always_right"}) + "\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.dirname(os.path.abspath(__file__))]))

    def run(out, *extra):
        return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "evaluate.py"), "--load", ck,
                               "--tokenizer", "byte", "--input", str(tmp_path / "eval.jsonl"), "--output", str(out),
                               "--n-samples", "2", "--temperature", "1.0", "--max-new-tokens", "6", *extra],
                              capture_output=True, text=True, env=env)

    whole = run(tmp_path / "whole.jsonl")
    assert whole.returncode == 0, whole.stderr[-2000:]
    lines = open(tmp_path / "whole.jsonl").read().splitlines(keepends=True)
    partial = tmp_path / "resumed.jsonl.partial"
    partial.write_text(lines[0] + lines[1] + lines[2][:25])  # killed while writing problem 3
    refused = run(tmp_path / "resumed.jsonl")
    assert refused.returncode != 0 and "pass --resume" in refused.stderr
    resumed = run(tmp_path / "resumed.jsonl", "--resume", "--chunk-size", "1")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming: 2 of 4 problems done" in resumed.stdout
    assert open(tmp_path / "resumed.jsonl").read() == "".join(lines) and not partial.exists()
    summaries = [json.load(open(tmp_path / f"{name}.summary.json")) for name in ("whole", "resumed")]
    for k, v in summaries[0].items():
        if k != "generation_tokens_per_s":
            assert summaries[1][k] == v, k
    (tmp_path / "other.jsonl.partial").write_text(lines[1].replace('"e1"', '"x1"'))
    other = run(tmp_path / "other.jsonl", "--resume")
    assert other.returncode != 0 and "other.jsonl.partial:1: field 'id'" in other.stderr


def test_majority_vote_pools_equal_answers():
    """maj@n by hand: equal answers in other forms pool their votes; ties go to the answer
    given first; samples without an answer do not vote; votes only for math responses."""
    from megatron_k15.rl.evaluation import majority_correct, vote_key

    def samples(*pairs):
        return [{"answer": a, "correct": c} for a, c in pairs]

    # 1/2 three times in three forms (right) against 3 twice (wrong): pass@1 0.6, maj right
    assert majority_correct(samples(("3", False), ("1/2", True), ("3", False), ("\\frac{1}{2}", True),
                                    ("0.5", True)))
    assert not majority_correct(samples(("3", False), ("3", False), ("1/2", True), (None, False)))
    assert majority_correct(samples(("7", True), ("8", False)))  # a tie: the first given
    assert not majority_correct(samples(("8", False), ("7", True)))
    assert not majority_correct(samples((None, False), (None, False)))
    math = {"task": "math", "answer": "2"}
    assert vote_key("so \\boxed{\\dfrac12}.", math) == "\\dfrac12"
    assert vote_key(None, math) is None and vote_key("\\boxed{2}", {"task": "code", "tests": []}) is None


def test_evaluate_rejects_greedy_with_many_samples(tmp_path):
    ck = _convert(tmp_path, "a", 1)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "evaluate.py"), "--load", ck,
                           "--input", __file__, "--output", str(tmp_path / "x"), "--n-samples", "4"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "--n-samples > 1 needs --temperature > 0" in proc.stderr.splitlines()[-1]
    assert not (tmp_path / "x").exists()


def even_length(response, record):
    return float(len(response) % 2 == 0)


EVAL_PROMPTS = ["1+1=", "The quick brown fox jumps over the lazy dog. ", "x", "abcabcabcabcabcabcabc", "Q: 7*6? A:"]


@pytest.fixture(scope="module")
def layout_eval(tmp_path_factory):
    """A tied-embedding checkpoint saved at pp=2 (so pp=2 loads it as saved and one rank or cp=2
    reshard it), a prompt file, and the single-rank greedy results of evaluate on it."""
    tmp = tmp_path_factory.mktemp("eval_layouts")
    common = _eval_setup(tmp, "llama", ["--pipeline-model-parallel-size", "2"], max_new_tokens=10)
    proc = _run_evaluate(tmp, [], common + ["--output", str(tmp / "one.jsonl")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, common, _eval_outputs(tmp, "one")


def _eval_setup(tmp, kind, convert_args, max_new_tokens, **hf_overrides):
    """A converted tiny ``kind`` checkpoint, the EVAL_PROMPTS file, and evaluate's greedy arguments."""
    # a larger init makes the random model's distribution peaked, so greedy has clear winners
    save_tiny_hf_checkpoint(str(tmp / "hf"), kind, seed=5, initializer_range=0.2, **hf_overrides)
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "checkpoint", "convert_hf_to_megatron.py"),
                    "--hf-dir", str(tmp / "hf"), "--save", str(tmp / "ck")] + convert_args, check=True,
                   capture_output=True)
    with open(tmp / "eval.jsonl", "w") as f:
        for i, prompt in enumerate(EVAL_PROMPTS):
            f.write(json.dumps({"id": f"e{i}", "prompt": prompt, "task": "custom",
                                "reward_fn": "test_tools_eval_merge:even_length"}) + "\n")
    return ["--load", str(tmp / "ck"), "--tokenizer", "byte", "--input", str(tmp / "eval.jsonl"), "--temperature",
            "0", "--max-new-tokens", str(max_new_tokens), "--batch-size", "3", "--kv-cache-block-size", "4"]


def _run_evaluate(tmp, launch, argv):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.dirname(os.path.abspath(__file__))]))
    return subprocess.run([sys.executable, *launch, os.path.join(ROOT, "tools", "evaluate.py"), *argv],
                          capture_output=True, text=True, env=env, cwd=str(tmp), timeout=600)


def _eval_outputs(tmp, name):
    rows = [json.loads(line) for line in open(tmp / f"{name}.jsonl")]
    summary = json.load(open(tmp / f"{name}.summary.json"))
    return rows, {k: v for k, v in summary.items() if k != "generation_tokens_per_s"}


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--pipeline-model-parallel-size", "--context-parallel-size"])
def test_evaluate_pipeline_and_context_parallel_equal_one_rank(layout_eval, flag):
    """torchrun with pp=2 (stages pass hidden states on) or cp=2 (KV cache sharded over cp):
    one model replica over two ranks, greedy per-problem results and summary identical to one
    rank, and only global rank 0 writes and prints."""
    tmp, common, (one_rows, one_summary) = layout_eval
    name = "pp2" if "pipeline" in flag else "cp2"
    proc = _run_evaluate(tmp, ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"],
                         common + [flag, "2", "--output", str(tmp / f"{name}.jsonl")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, summary = _eval_outputs(tmp, name)
    assert [r["id"] for r in rows] == [f"e{i}" for i in range(len(EVAL_PROMPTS))]
    assert rows == one_rows
    assert summary == one_summary
    assert sum(s["length"] for r in rows for s in r["samples"]) > len(EVAL_PROMPTS)  # it did generate
    assert proc.stdout.count("pass@1") == 1  # the summary line, from rank 0 only
    assert not [f for f in os.listdir(tmp) if ".tmp-" in f]


@pytest.mark.slow
def test_evaluate_cp2_of_a_sliding_window_model_splits_problems(tmp_path):
    """gpt-oss (a sliding layer of window 8, attention sinks) at cp=2: its cp ranks cannot
    decode one sequence together, so they take different problems, each with a whole KV cache;
    results and summary equal one rank's."""
    common = _eval_setup(tmp_path, "gpt_oss", [], max_new_tokens=12, sliding_window=8)
    proc = _run_evaluate(tmp_path, [], common + ["--output", str(tmp_path / "one.jsonl")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _run_evaluate(tmp_path, ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"],
                         common + ["--context-parallel-size", "2", "--output", str(tmp_path / "cp2.jsonl")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _eval_outputs(tmp_path, "cp2") == _eval_outputs(tmp_path, "one")
    rows = _eval_outputs(tmp_path, "one")[0]
    assert sum(s["length"] for r in rows for s in r["samples"]) > len(EVAL_PROMPTS)  # it did generate


@pytest.mark.parametrize("flag", ["--pipeline-model-parallel-size", "--context-parallel-size"])
def test_evaluate_rejects_recompute_engine_under_pp_or_cp(tmp_path, monkeypatch, capsys, flag):
    ck = _convert(tmp_path, "a", 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        _tool("evaluate").main(["--load", ck, "--input", __file__, "--output", str(tmp_path / "x"),
                                "--inference-engine", "recompute", flag, "2"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--inference-engine recompute supports tensor parallelism only" in err
    assert not (tmp_path / "x").exists()


def test_evaluate_reports_majority_vote_for_math():
    """evaluate() on scripted responses: maj@3 counts the problems whose pooled majority answer
    is right (2 of 3), next to pass@1 (5/9); each math sample records its answer."""
    from types import SimpleNamespace

    from megatron_k15.data.tokenizer import ByteTokenizer
    from megatron_k15.rl.evaluation import evaluate

    responses = [["\\boxed{3}", "so \\boxed{0.5}", "\\boxed{\\frac12}"],  # 1/2: right 2 of 3, majority right
                 ["\\boxed{5}", "\\boxed{5}", "\\boxed{4}"],              # 4: right 1 of 3, majority wrong
                 ["The answer is 9", "\\boxed{9}", "no idea"]]            # 9: right 2 of 3, majority right
    tok = ByteTokenizer()

    class Scripted:  # the engine's generate(), answering each (problem, sample) request from the script
        def generate(self, prompts, max_new_tokens, params, generators, eos_ids, repeat_detector=None,
                     on_finish=None):
            return [SimpleNamespace(output_ids=tok.encode(responses[i][s]), output_logprobs=[0.0] * len(responses[i][s]),
                                    stop_reason="eos") for i in range(3) for s in range(3)]

    recs = [{"id": f"m{i}", "prompt": "?", "task": "math", "answer": a} for i, a in enumerate(["1/2", "4", "9"])]
    res = evaluate(None, tok, recs, [tok.encode("?")] * 3, max_new_tokens=8, eos_ids=[], n_samples=3,
                   temperature=1.0, generator=Scripted())
    assert res["pass@1"] == pytest.approx(5 / 9) and res["maj@3"] == pytest.approx(2 / 3)
    assert [s.get("answer") for s in res["results"][2]["samples"]] == ["9", "9", None]
